//! Row-wise log-softmax / softmax on the GPU (one workgroup per row, chunked like the logits).

use ndarray::{Array2, ArrayView2};

use super::source::{Shader, Variant};
use super::{bind, bind_group, flags, grid, row_chunks, Params, PARAM_STRIDE};
use crate::api::config::SoftmaxKind;
use crate::context::GpuContext;
use crate::error::{Result, XentError};

use wgpu::BufferUsages as U;

impl GpuContext {
    /// Row-wise log-softmax (or softmax) of host logits `[N, V]`.
    pub fn log_softmax(&self, logits: ArrayView2<f32>, kind: SoftmaxKind) -> Result<Array2<f32>> {
        let (n, v) = logits.dim();
        if v == 0 {
            return Err(XentError::Shape(format!("logits [{n}, 0] have no classes")));
        }
        if n == 0 {
            return Ok(Array2::zeros((0, v)));
        }
        let chunks = row_chunks(self, n, v, "logits")?;
        let variant = Variant { vec4: v % 4 == 0, subgroup: self.subgroups, grad: true, in_place: false };
        let k = self.kernel(Shader::LogSoftmax, variant)?;
        let bytes = (n * v) as u64 * 4;
        let x = logits.as_standard_layout();
        let xb = self.take(bytes, U::STORAGE | U::COPY_DST, "logits")?;
        self.queue.write_buffer(&xb, 0, bytemuck::cast_slice(x.as_slice().expect("standard layout")));
        let ob = self.take(bytes, U::STORAGE | U::COPY_SRC, "log_softmax output")?;
        let staging = self.take(bytes, U::MAP_READ | U::COPY_DST, "staging")?;

        let mut pbytes = vec![0u8; PARAM_STRIDE as usize * chunks.len()];
        for (i, c) in chunks.iter().enumerate() {
            let p = Params {
                n_rows: n as u32,
                v: v as u32,
                row0: c.row0 as u32,
                grid_x: grid(self, c.rows).0,
                chunk_rows: c.rows as u32,
                ignore_index: 0,
                flags: if kind == SoftmaxKind::Softmax { flags::SOFTMAX } else { 0 },
                neg_inf: f32::NEG_INFINITY,
                smoothing: 0.0,
                z_loss: 0.0,
                softcap: 1.0,
                inv_temp: 1.0,
                grad_scale: 1.0,
                x_off: c.skip,
                part_off: 0,
                _pad: 0,
            };
            let o = i * PARAM_STRIDE as usize;
            pbytes[o..o + std::mem::size_of::<Params>()].copy_from_slice(bytemuck::bytes_of(&p));
        }
        let pbuf = self.take(pbytes.len() as u64, U::UNIFORM | U::COPY_DST, "params")?;
        self.queue.write_buffer(&pbuf, 0, &pbytes);

        let groups: Vec<_> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (off, size) = (c.offset, c.size(v));
                let mut slots: [Option<wgpu::BindingResource>; crate::context::SLOTS] = Default::default();
                slots[0] = Some(bind(&pbuf, i as u64 * PARAM_STRIDE, std::mem::size_of::<Params>() as u64));
                slots[1] = Some(bind(&xb, off, size));
                slots[8] = Some(bind(&ob, off, size));
                bind_group(self, &k, slots)
            })
            .collect();
        let mut enc = self.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&k.pipeline);
            for (c, bg) in chunks.iter().zip(&groups) {
                let (gx, gy) = grid(self, c.rows);
                pass.set_bind_group(0, bg, &[]);
                pass.dispatch_workgroups(gx, gy, 1);
            }
        }
        enc.copy_buffer_to_buffer(&ob, 0, &staging, 0, bytes);
        self.submit_wait(enc)?;
        let mut out = Array2::<f32>::zeros((n, v));
        self.read_staging(&staging, bytes, bytemuck::cast_slice_mut(out.as_slice_mut().expect("fresh array")))?;
        for b in [xb, ob, staging, pbuf] {
            self.give(b);
        }
        Ok(out)
    }
}
