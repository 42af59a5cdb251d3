//! Binary cross-entropy on the GPU: one elementwise dispatch per chunk, then the host adds the
//! per-workgroup partial sums in f64 (a few KB, however large the input).

use ndarray::{Array2, ArrayView2};

use crate::api::config::{Bce, BceOutput, BceWeight, Reduction};
use crate::check::{bce_inputs, BceInput};
use crate::error::Result;
use crate::gpu::context::GpuContext;
use crate::gpu::launch::{Bind, Groups, Launch, Recorder, Skip};
use crate::gpu::params::{flag_bits, mirror, Block, Header};
use crate::gpu::variant::{Binding, Family, Shader, Variant};

use super::rows;

use wgpu::BufferUsages as U;

flag_bits! {
    /// Binary cross-entropy's flag bits (`BCE_*` in `shaders/bce.wgsl`).
    pub(crate) mod bce_flags("BCE_") {
        /// Per-class weights (slot 3).
        CLASS_W = 1,
        /// `pos_weight` (slot 10).
        POS_W = 2,
        /// The inputs are probabilities, not logits.
        PROBS = 4,
        /// Element losses wanted (`reduction = none`).
        ELEM = 8,
        /// Per-element weights (slot 11).
        ELEM_W = 16,
    }
}

mirror! {
    /// Binary cross-entropy's parameters; mirrors `BceParams` in `shaders/bce.wgsl`.
    pub(crate) struct BceParams {
        pub head: Header,
        pub grad_scale: f32,
    }
}

impl Block for BceParams {
    fn head(&self) -> &Header {
        &self.head
    }
}

/// Elements per workgroup (`WG * PER_THREAD` in `shaders/bce.wgsl`).
const PER_GROUP: usize = 256 * 8;

/// The binary cross-entropy kernel: f32 inputs (slot 1) and targets (second rows), the
/// family's weights and element losses, partial sums in the row values, the gradient as output
/// rows.
pub(crate) const FAMILY: Family = Family {
    io: &[rows::WGSL],
    bindings: |_, v| {
        const OWN: [Binding; 4] =
            [(3, true, "class_weight"), (7, false, "elem_loss"), (10, true, "pos_weight"), (11, true, "elem_weight")];
        let mut b = vec![rows::input(v), rows::SECOND, rows::ROW_VALUES];
        b.extend(OWN);
        rows::with_output(v, b)
    },
    #[cfg(test)]
    variants: |_| rows::keep(|v| !v.in_place && rows::f32_scalar(v)),
};

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
        let k =
            self.kernel(Shader::Bce, Variant { subgroup: self.inner.subgroups, grad: cfg.grad, ..Default::default() })?;
        let mut f = if input == BceInput::Probs { bce_flags::PROBS } else { 0 };
        if none {
            f |= bce_flags::ELEM;
        }
        match &cfg.weight {
            Some(BceWeight::PerClass(_)) => f |= bce_flags::CLASS_W,
            Some(BceWeight::PerElement(_)) => f |= bce_flags::ELEM_W,
            None => {}
        }
        if cfg.pos_weight.is_some() {
            f |= bce_flags::POS_W;
        }
        let scale = cfg.grad_scale as f64 / if cfg.reduction == Reduction::Mean { count } else { 1.0 };
        let base = BceParams { head: Header { flags: f, ..Header::new(n, c) }, grad_scale: scale as f32 };
        let up = |a: ArrayView2<f32>, what: &str| {
            let s = a.as_standard_layout();
            self.upload(bytemuck::cast_slice(s.as_slice().expect("standard layout")), U::STORAGE, what)
        };
        let xb = up(x, "inputs")?;
        let yb = up(y, "targets")?;
        let (cw, ew) = match &cfg.weight {
            Some(BceWeight::PerClass(w)) => {
                (Some(self.upload(bytemuck::cast_slice(&w.to_vec()), U::STORAGE, "weight")?), None)
            }
            Some(BceWeight::PerElement(w)) => (None, Some(up(w.view(), "weight")?)),
            None => (None, None),
        };
        let pwb = cfg
            .pos_weight
            .as_ref()
            .map(|p| self.upload(bytemuck::cast_slice(&p.to_vec()), U::STORAGE, "pos_weight"))
            .transpose()?;
        let bytes = (n * c) as u64 * 4;
        let elem = none.then(|| self.take(bytes, U::STORAGE | U::COPY_SRC, "element losses")).transpose()?;
        let gbuf = cfg.grad.then(|| self.take(bytes, U::STORAGE | U::COPY_SRC, "gradient")).transpose()?;
        // Partial sums: at most one per workgroup of every chunk.
        let max_parts = (n * c).div_ceil(PER_GROUP) + n + 1;
        let parts = self.take(max_parts as u64 * 4, U::STORAGE | U::COPY_SRC, "partial sums")?;
        let mut l = Launch::new(k, base, n, c)
            .groups(Groups::Elements(PER_GROUP))
            .rows(1, &xb, 0, 4, Skip::X)
            .rows(9, &yb, 0, 4, Skip::X)
            .bind(6, Bind::all(&parts));
        if let Some(b) = &cw {
            l = l.bind(3, Bind::all(b));
        }
        if let Some(b) = &ew {
            l = l.rows(11, b, 0, 4, Skip::X);
        }
        if let Some(b) = &pwb {
            l = l.bind(10, Bind::all(b));
        }
        if let Some(b) = &elem {
            l = l.rows(7, b, 0, 4, Skip::X);
        }
        if let Some(b) = &gbuf {
            l = l.rows(8, b, 0, 4, Skip::X);
        }
        let mut rec = Recorder::new(self);
        rec.push(l)?;
        let total_groups: usize = rec.headers().last().map_or(0, |h| h.part_off as usize)
            + rec.headers().last().map_or(0, |h| (h.chunk_rows as usize * c).div_ceil(PER_GROUP));
        let params = rec.params_pooled()?;
        let mut enc = self.device().create_command_encoder(&Default::default());
        rec.record(&mut enc, &params)?;
        self.submit_wait(enc)?;
        let mut partials = vec![0f32; total_groups];
        self.read_back(&parts, 0, bytemuck::cast_slice_mut(&mut partials), None)?;
        let total: f64 = partials.iter().map(|&v| v as f64).sum();
        let read = |b: &crate::gpu::pool::Pooled| -> Result<Array2<f32>> {
            let mut a = crate::alloc::zeros2::<f32>((n, c), "BCE output")?;
            self.read_back(b, 0, bytemuck::cast_slice_mut(a.as_slice_mut().expect("fresh")), None)?;
            Ok(a)
        };
        Ok(BceOutput {
            loss: if cfg.reduction == Reduction::Mean { total / count } else { total },
            elements: (n * c) as u64,
            elem_loss: elem.as_ref().map(read).transpose()?,
            grad: gbuf.as_ref().map(read).transpose()?,
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

#[cfg(test)]
mod interface_tests {
    use super::*;
    use crate::gpu::params::tests::check_family;

    /// The family's parameters and flag bits declared here are what its WGSL declares.
    #[test]
    fn the_family_interface_matches_its_wgsl() {
        check_family::<BceParams>(Shader::Bce, "BceParams", Some((bce_flags::PREFIX, bce_flags::ALL)));
    }
}
