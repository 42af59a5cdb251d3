//! Row-wise log-softmax / softmax on the GPU (one workgroup per row, chunked like the logits).

use ndarray::{Array2, ArrayView2};

use super::source::{Shader, Variant};
use super::{bind, bind_group, dispatch, flags, param_binding, row_chunks, upload_params, Params};
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
        let variant = Variant { vec4: v % 4 == 0, subgroup: self.subgroups, grad: true, ..Default::default() };
        let k = self.kernel(Shader::LogSoftmax, variant)?;
        let bytes = (n * v) as u64 * 4;
        let x = logits.as_standard_layout();
        let xb = self.upload(bytemuck::cast_slice(x.as_slice().expect("standard layout")), U::STORAGE, "logits")?;
        let ob = self.take(bytes, U::STORAGE | U::COPY_SRC, "log_softmax output")?;
        let staging = self.take(bytes, U::MAP_READ | U::COPY_DST, "staging")?;
        let base = Params { flags: if kind == SoftmaxKind::Softmax { flags::SOFTMAX } else { 0 }, ..Params::new(n, v) };
        let blocks: Vec<Params> = chunks.iter().map(|c| base.for_chunk(self, c, c.rows)).collect();
        let pbuf = upload_params(self, &blocks)?;
        let groups: Vec<_> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (off, size) = (c.offset, c.size(v));
                let mut slots: [Option<wgpu::BindingResource>; crate::context::SLOTS] = Default::default();
                slots[0] = Some(param_binding(&pbuf, i));
                slots[1] = Some(bind(&xb, off, size));
                slots[8] = Some(bind(&ob, off, size));
                bind_group(self, &k, slots)
            })
            .collect();
        let mut enc = self.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            let runs: Vec<_> = chunks.iter().map(|c| c.rows).zip(&groups).collect();
            dispatch(self, &mut pass, &k, &runs);
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
