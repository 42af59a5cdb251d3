//! Binary cross-entropy on the GPU: one elementwise dispatch per chunk, then the host adds the
//! per-workgroup partial sums in f64 (a few KB, however large the input).

use ndarray::{Array2, ArrayView2};

use super::source::{Shader, Variant};
use super::{bind, bind_group, flags, grid, row_chunks, Params, PARAM_STRIDE};
use crate::api::check::{bce_inputs, BceInput};
use crate::api::config::{Bce, BceOutput, BceWeight, Reduction};
use crate::context::GpuContext;
use crate::error::Result;

use wgpu::BufferUsages as U;

/// Elements per workgroup (`WG * PER_THREAD` in `shaders/bce.wgsl`).
const PER_GROUP: usize = 256 * 8;

impl GpuContext {
    fn bce_run(&self, x: ArrayView2<f32>, y: ArrayView2<f32>, cfg: &Bce, input: BceInput) -> Result<BceOutput> {
        bce_inputs(x, y, cfg, input)?;
        let (n, c) = x.dim();
        let count = (n * c) as f64;
        let none = cfg.reduction == Reduction::None;
        if n * c == 0 {
            let loss = if cfg.reduction == Reduction::Mean { f64::NAN } else { 0.0 };
            return Ok(BceOutput {
                loss,
                elements: 0,
                elem_loss: none.then(|| Array2::zeros((n, c))),
                grad: cfg.grad.then(|| Array2::zeros((n, c))),
            });
        }
        let chunks = row_chunks(self, n, c, "inputs")?;
        let k = self.kernel(Shader::Bce, Variant { subgroup: self.subgroups, grad: cfg.grad, ..Default::default() })?;
        let mut f = if input == BceInput::Probs { flags::PROBS } else { 0 };
        if none {
            f |= flags::ELEM;
        }
        match &cfg.weight {
            Some(BceWeight::PerClass(_)) => f |= flags::CLASS_W,
            Some(BceWeight::PerElement(_)) => f |= flags::SAMPLE_W,
            None => {}
        }
        if cfg.pos_weight.is_some() {
            f |= flags::POS_W;
        }
        let scale = cfg.grad_scale as f64 / if cfg.reduction == Reduction::Mean { count } else { 1.0 };
        let groups: Vec<usize> = chunks.iter().map(|ch| (ch.rows * c).div_ceil(PER_GROUP)).collect();
        let total_groups: usize = groups.iter().sum();
        let mut pbytes = vec![0u8; PARAM_STRIDE as usize * chunks.len()];
        let mut part_off = 0;
        for (i, (ch, &g)) in chunks.iter().zip(&groups).enumerate() {
            let p = Params {
                n_rows: n as u32,
                v: c as u32,
                row0: ch.row0 as u32,
                grid_x: grid(self, g).0,
                chunk_rows: ch.rows as u32,
                ignore_index: 0,
                flags: f,
                neg_inf: f32::NEG_INFINITY,
                smoothing: 0.0,
                z_loss: 0.0,
                softcap: 1.0,
                inv_temp: 1.0,
                grad_scale: scale as f32,
                x_off: ch.skip,
                part_off: part_off as u32,
                _pad: 0,
            };
            part_off += g;
            let o = i * PARAM_STRIDE as usize;
            pbytes[o..o + std::mem::size_of::<Params>()].copy_from_slice(bytemuck::bytes_of(&p));
        }
        let up = |data: &[u8], usage: U, what: &str| -> Result<wgpu::Buffer> {
            let b = self.take(data.len() as u64, usage | U::COPY_DST, what)?;
            self.queue.write_buffer(&b, 0, data);
            Ok(b)
        };
        let pbuf = up(&pbytes, U::UNIFORM, "params")?;
        let xs = x.as_standard_layout();
        let ys = y.as_standard_layout();
        let xb = up(bytemuck::cast_slice(xs.as_slice().expect("standard layout")), U::STORAGE, "inputs")?;
        let yb = up(bytemuck::cast_slice(ys.as_slice().expect("standard layout")), U::STORAGE, "targets")?;
        let wb = match &cfg.weight {
            Some(BceWeight::PerClass(w)) => Some(up(bytemuck::cast_slice(&w.to_vec()), U::STORAGE, "weight")?),
            Some(BceWeight::PerElement(w)) => {
                let ws = w.as_standard_layout();
                Some(up(bytemuck::cast_slice(ws.as_slice().expect("standard layout")), U::STORAGE, "weight")?)
            }
            None => None,
        };
        let pwb = match &cfg.pos_weight {
            Some(p) => Some(up(bytemuck::cast_slice(&p.to_vec()), U::STORAGE, "pos_weight")?),
            None => None,
        };
        let bytes = (n * c) as u64 * 4;
        let part_bytes = total_groups as u64 * 4;
        let parts = self.take(part_bytes, U::STORAGE | U::COPY_SRC, "partial sums")?;
        let elem = if none { Some(self.take(bytes, U::STORAGE | U::COPY_SRC, "element losses")?) } else { None };
        let gbuf = if cfg.grad { Some(self.take(bytes, U::STORAGE | U::COPY_SRC, "gradient")?) } else { None };
        let out_len = part_bytes + if none { bytes } else { 0 } + if cfg.grad { bytes } else { 0 };
        let staging = self.take(out_len, U::MAP_READ | U::COPY_DST, "staging")?;

        let bgs: Vec<_> = chunks
            .iter()
            .enumerate()
            .map(|(i, ch)| {
                let (off, size) = (ch.offset, ch.size(c));
                let mut s: [Option<wgpu::BindingResource>; crate::context::SLOTS] = Default::default();
                s[0] = Some(bind(&pbuf, i as u64 * PARAM_STRIDE, std::mem::size_of::<Params>() as u64));
                s[1] = Some(bind(&xb, off, size));
                s[9] = Some(bind(&yb, off, size));
                match (&cfg.weight, &wb) {
                    (Some(BceWeight::PerClass(_)), Some(b)) => s[3] = Some(b.as_entire_binding()),
                    (Some(BceWeight::PerElement(_)), Some(b)) => s[4] = Some(bind(b, off, size)),
                    _ => {}
                }
                s[10] = pwb.as_ref().map(|b| b.as_entire_binding());
                s[6] = Some(bind(&parts, 0, part_bytes));
                s[7] = elem.as_ref().map(|b| bind(b, off, size));
                s[8] = gbuf.as_ref().map(|b| bind(b, off, size));
                bind_group(self, &k, s)
            })
            .collect();
        let mut enc = self.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&k.pipeline);
            for (bg, &g) in bgs.iter().zip(&groups) {
                let (gx, gy) = grid(self, g);
                pass.set_bind_group(0, bg, &[]);
                pass.dispatch_workgroups(gx, gy, 1);
            }
        }
        enc.copy_buffer_to_buffer(&parts, 0, &staging, 0, part_bytes);
        let mut at = part_bytes;
        if let Some(e) = &elem {
            enc.copy_buffer_to_buffer(e, 0, &staging, at, bytes);
            at += bytes;
        }
        if let Some(g) = &gbuf {
            enc.copy_buffer_to_buffer(g, 0, &staging, at, bytes);
        }
        self.submit_wait(enc)?;
        let mut host = vec![0f32; (out_len / 4) as usize];
        self.read_staging(&staging, out_len, bytemuck::cast_slice_mut(&mut host))?;
        for b in [pbuf, xb, yb, parts, staging].into_iter().chain(wb).chain(pwb).chain(elem).chain(gbuf) {
            self.give(b);
        }
        let total: f64 = host[..total_groups].iter().map(|&v| v as f64).sum();
        let mut rest = &host[total_groups..];
        let mut next = |take: bool| {
            take.then(|| {
                let a = Array2::from_shape_vec((n, c), rest[..n * c].to_vec()).expect("shape");
                rest = &rest[n * c..];
                a
            })
        };
        let elem_loss = next(none);
        let grad = next(cfg.grad);
        Ok(BceOutput {
            loss: if cfg.reduction == Reduction::Mean { total / count } else { total },
            elements: (n * c) as u64,
            elem_loss,
            grad,
        })
    }

    /// Binary cross-entropy from logits `[N, C]` (see [`Bce`]).
    pub fn bce_with_logits(&self, logits: ArrayView2<f32>, targets: ArrayView2<f32>, cfg: &Bce) -> Result<BceOutput> {
        self.bce_run(logits, targets, cfg, BceInput::Logits)
    }

    /// Binary cross-entropy from probabilities `[N, C]` (logs clamped at -100).
    pub fn bce(&self, probs: ArrayView2<f32>, targets: ArrayView2<f32>, cfg: &Bce) -> Result<BceOutput> {
        self.bce_run(probs, targets, cfg, BceInput::Probs)
    }
}
