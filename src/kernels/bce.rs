//! Binary cross-entropy on the GPU: one elementwise dispatch per chunk, then the host adds the
//! per-workgroup partial sums in f64 (a few KB, however large the input).

use ndarray::{Array2, ArrayView2};

use super::source::{Shader, Variant};
use super::{bind, bind_group, dispatch, flags, param_binding, row_chunks, upload_params, Params};
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
        let base = Params { flags: f, grad_scale: scale as f32, ..Params::new(n, c) };
        let mut part_off = 0;
        let blocks: Vec<Params> = chunks
            .iter()
            .zip(&groups)
            .map(|(ch, &g)| {
                let p = Params { part_off: part_off as u32, ..base.for_chunk(self, ch, g) };
                part_off += g;
                p
            })
            .collect();
        let pbuf = upload_params(self, &blocks)?;
        let up = |data: &[u8], what: &str| self.upload(data, U::STORAGE, what);
        let xs = x.as_standard_layout();
        let ys = y.as_standard_layout();
        let xb = up(bytemuck::cast_slice(xs.as_slice().expect("standard layout")), "inputs")?;
        let yb = up(bytemuck::cast_slice(ys.as_slice().expect("standard layout")), "targets")?;
        let wb = match &cfg.weight {
            Some(BceWeight::PerClass(w)) => Some(up(bytemuck::cast_slice(&w.to_vec()), "weight")?),
            Some(BceWeight::PerElement(w)) => {
                let ws = w.as_standard_layout();
                Some(up(bytemuck::cast_slice(ws.as_slice().expect("standard layout")), "weight")?)
            }
            None => None,
        };
        let pwb = match &cfg.pos_weight {
            Some(p) => Some(up(bytemuck::cast_slice(&p.to_vec()), "pos_weight")?),
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
                s[0] = Some(param_binding(&pbuf, i));
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
            let runs: Vec<_> = groups.iter().copied().zip(&bgs).collect();
            dispatch(self, &mut pass, &k, &runs);
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
