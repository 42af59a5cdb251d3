//! Distillation and distribution measures on the GPU: one workgroup per row pair, the two
//! inputs chunked alike; only per-row values (and the gradient, when asked) come back. A
//! [`DistillPlan`] records distillation into the caller's encoder, its loss summed on the device.

use ndarray::{Array1, ArrayView2};

use super::ce_io::{flags, CeParams, Scalars, SCALARS};
use super::{rows, RowJob, RowOut, RowPlan, RowResult};
use crate::api::config::{Distill, DistillOutput, Measures};
use crate::check::{probability_rows, same_rows};
use crate::dtype::{DType, Logits};
use crate::error::Result;
use crate::gpu::context::GpuContext;
use crate::gpu::launch::{Bind, Groups, Launch};
use crate::gpu::params::{flag_bits, mirror, Block, Header};
use crate::gpu::pending::PendingBytes;
use crate::gpu::pool::Pooled;
use crate::gpu::variant::{Family, Shader, Variant};

use wgpu::BufferUsages as U;

mirror! {
    /// Distillation's parameters; mirrors `DistillParams` in `shaders/distill.wgsl`.
    pub(crate) struct DistillParams {
        pub head: Header,
        pub inv_temp: f32,
        pub grad_scale: f32,
        pub mode: i32,
        pub beta: f32,
    }
}

impl Block for DistillParams {
    fn head(&self) -> &Header {
        &self.head
    }
}

flag_bits! {
    /// The distribution measures' flag bit (`DIST_*` in `shaders/dist.wgsl`).
    pub(crate) mod dist_flags("DIST_") {
        /// The rows are logits, not probabilities.
        LOGITS = 1,
    }
}

/// The distillation kernel's parameters: d(T^2 mean_n D_n)/dx = T / N dD/dz (no 1 / N for a
/// sum).
fn distill_params(n: usize, v: usize, cfg: &Distill) -> Result<DistillParams> {
    cfg.validate()?;
    let t = cfg.temperature as f64;
    let (mode, beta) = cfg.mode_code();
    let coef = cfg.grad_scale as f64 * t * cfg.row_factor(n.max(1));
    Ok(DistillParams { head: Header::new(n, v), inv_temp: (1.0 / t) as f32, grad_scale: coef as f32, mode, beta })
}

/// The device tensors of one recorded distillation: student and teacher logits `[N, V]` of the
/// plan's dtypes, and optionally an f32 `[N, V]` buffer for the gradient w.r.t. the student.
#[derive(Debug, Clone, Copy)]
pub struct DistillInputs<'a> {
    /// Student logits.
    pub student: wgpu::BufferSlice<'a>,
    /// Teacher logits.
    pub teacher: wgpu::BufferSlice<'a>,
    /// Where the gradient goes (f32), or `None` for the loss alone.
    pub grad: Option<wgpu::BufferSlice<'a>>,
}

/// A reusable distillation (see [`Distill`]) of one shape, recorded into the caller's encoder:
/// the per-row divergences and the loss `T^2 mean_n D_n` (or the sum, as the options say) stay
/// on the device
/// ([`Self::row_buffer`], [`Self::scalars_buffer`]) until [`Self::read_back`] asks for the loss.
pub struct DistillPlan {
    plan: RowPlan,
    /// Rows / T^2 (1 / T^2 for a sum): the loss is the sum of row divergences over this.
    den: f32,
    scalars: Pooled,
    scalars_init: Pooled,
}

impl std::fmt::Debug for DistillPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DistillPlan").field("rows", &self.plan.n).field("classes", &self.plan.v).finish()
    }
}

/// The distillation kernel (student and teacher rows, one divergence per row, the student's
/// gradient) and the measures kernel (entropy, cross-entropy, KL and JS per row pair, as
/// output rows of 4): any input dtypes, f32 out.
pub(crate) const FAMILY: Family = Family {
    io: &[rows::WGSL],
    bindings: |shader, v| {
        let mut b = vec![rows::input(v), rows::SECOND];
        if shader == Shader::Distill {
            b.push(rows::ROW_VALUES);
        }
        rows::with_output(v, b)
    },
    #[cfg(test)]
    variants: |shader| {
        rows::keep(|v| {
            (shader == Shader::Distill || v.grad)
                && !v.in_place
                && !v.vec4
                && !v.odd
                && v.output == crate::dtype::DType::F32
        })
    },
};

impl DistillPlan {
    /// Records the distillation of `inputs` into `enc` (no submission, no wait).
    pub fn record(&self, enc: &mut wgpu::CommandEncoder, inputs: DistillInputs<'_>) -> Result<()> {
        let (ctx, n) = (&self.plan.ctx, self.plan.n);
        if n == 0 {
            return Ok(());
        }
        let rows = inputs.grad.map(|g| (g, RowOut::Rows));
        let distill = self.plan.launch(inputs.student, Some(inputs.teacher), rows)?;
        // The sum of row divergences (Kahan and a tree) divided by N / T^2: cross-entropy's
        // reduce pass with an external mean denominator.
        let small = Variant { subgroup: ctx.inner.subgroups, ..Default::default() };
        let base = CeParams { den_w: self.den, den_n: 1.0, ..CeParams::new(n, self.plan.v) }
            .with_flags(flags::MEAN | flags::EXT_DENOM);
        let reduce = Launch::new(ctx.kernel(Shader::CeReduce, small)?, base, n, self.plan.v)
            .groups(Groups::One)
            .bind(5, Bind::first(&self.scalars, SCALARS))
            .bind(6, Bind::first(&self.plan.rows, n as u64 * 4));
        enc.copy_buffer_to_buffer(&self.scalars_init, 0, &self.scalars, 0, SCALARS);
        self.plan.record(enc, vec![distill, reduce])
    }

    /// The device buffer of scalars: the f32 loss at byte 24 (32 bytes, as [`crate::CePlan`]'s).
    pub fn scalars_buffer(&self) -> &wgpu::Buffer {
        &self.scalars
    }

    /// The device buffer of per-row divergences `D_n` (f32 `[N]`, before `T^2` and the mean).
    pub fn row_buffer(&self) -> &wgpu::Buffer {
        &self.plan.rows
    }

    /// Records a copy of the loss into a staging buffer; after the caller submits `enc`,
    /// [`PendingLoss::wait`] or [`PendingLoss::try_get`] returns it.
    pub fn read_back(&self, enc: &mut wgpu::CommandEncoder) -> Result<PendingLoss> {
        let ctx = &self.plan.ctx;
        let staging =
            (self.plan.n > 0).then(|| ctx.take(SCALARS, U::MAP_READ | U::COPY_DST, "scalars staging")).transpose()?;
        if let Some(s) = &staging {
            enc.copy_buffer_to_buffer(&self.scalars, 0, s, 0, SCALARS);
        }
        Ok(PendingLoss { bytes: PendingBytes::new(ctx, staging, SCALARS) })
    }
}

/// A loss on its way back from the device (see [`DistillPlan::read_back`]). An empty batch
/// reads back 0.
pub struct PendingLoss {
    bytes: PendingBytes,
}

impl std::fmt::Debug for PendingLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingLoss")
    }
}

fn loss_of(bytes: &[u8]) -> f64 {
    let sc: Scalars = bytemuck::pod_read_unaligned(&bytes[..SCALARS as usize]);
    sc.loss as f64
}

impl PendingLoss {
    /// Waits for the submission that holds the copy and returns the loss.
    pub fn wait(self) -> Result<f64> {
        Ok(loss_of(&self.bytes.wait()?))
    }

    /// Without blocking: `None` until the copy has finished, then the loss once.
    pub fn try_get(&mut self) -> Option<Result<f64>> {
        Some(self.bytes.try_get()?.map(|b| loss_of(&b)))
    }
}

impl GpuContext {
    /// A reusable distillation of `rows x classes` student logits of `student` dtype towards
    /// teacher logits of `teacher` dtype.
    pub fn distill_plan(
        &self,
        rows: usize,
        classes: usize,
        student: DType,
        teacher: DType,
        cfg: &Distill,
    ) -> Result<DistillPlan> {
        let base = distill_params(rows, classes, cfg)?;
        let t = cfg.temperature as f64;
        let plan = RowPlan::new(self, Shader::Distill, base, (rows, classes), student, Some(teacher), 1, false)?;
        let scalars = self.owned(SCALARS, U::STORAGE | U::COPY_SRC | U::COPY_DST, "scalars")?;
        let scalars_init = self.owned(SCALARS, U::COPY_SRC | U::COPY_DST, "scalars init")?;
        self.write(&scalars_init, 0, bytemuck::bytes_of(&Scalars::initial()))?;
        Ok(DistillPlan { plan, den: (1.0 / (cfg.row_factor(rows) * t * t)) as f32, scalars, scalars_init })
    }

    pub(crate) fn distill_run<'a>(
        &self,
        student: Logits<'a>,
        teacher: Logits<'a>,
        cfg: &Distill,
        grad: bool,
    ) -> Result<DistillOutput> {
        same_rows(student.dim(), teacher.dim(), "student and teacher logits")?;
        let (n, v) = student.dim();
        let t = cfg.temperature as f64;
        let base = distill_params(n, v, cfg)?;
        let out = self.run_rows(RowJob {
            shader: Shader::Distill,
            base: base.into(),
            input: student,
            second: Some(teacher),
            row_values: 1,
            out: grad.then_some(RowOut::Rows),
        })?;
        let sum: f64 = out.row_values.iter().map(|&d| d as f64).sum();
        Ok(DistillOutput {
            loss: t * t * sum * cfg.row_factor(n),
            row_loss: Array1::from(out.row_values),
            grad: out.out_rows,
        })
    }

    /// Entropy, cross-entropy, KL and JS per row of probability rows `p`, `q` (computed in f32).
    pub fn measures(&self, p: ArrayView2<f64>, q: ArrayView2<f64>) -> Result<Measures> {
        same_rows(p.dim(), q.dim(), "p and q")?;
        probability_rows(p, "p")?;
        probability_rows(q, "q")?;
        let (pf, qf) = (p.mapv(|v| v as f32), q.mapv(|v| v as f32));
        self.measures_run((&pf).into(), (&qf).into(), 0)
    }

    /// The same measures of `softmax(p_logits)` and `softmax(q_logits)` (any dtypes).
    pub fn measures_from_logits<'a, 'b>(
        &self,
        p_logits: impl Into<Logits<'a>>,
        q_logits: impl Into<Logits<'b>>,
    ) -> Result<Measures> {
        let (p, q) = (p_logits.into().reborrow(), q_logits.into().reborrow());
        same_rows(p.dim(), q.dim(), "p and q logits")?;
        self.measures_run(p, q, dist_flags::LOGITS)
    }

    fn measures_run<'a>(&self, p: Logits<'a>, q: Logits<'a>, f: u32) -> Result<Measures> {
        let (n, v) = q.dim();
        let RowResult { out_whole, .. } = self.run_rows(RowJob {
            shader: Shader::Dist,
            base: Header { flags: f, ..Header::new(n, v) }.into(),
            input: q,
            second: Some(p),
            row_values: 0,
            out: Some(RowOut::Whole(4)),
        })?;
        let col = |k: usize| out_whole.chunks(4).map(|r| r[k] as f64).collect::<Array1<f64>>();
        Ok(Measures { entropy: col(0), cross_entropy: col(1), kl: col(2), js: col(3) })
    }
}

#[cfg(test)]
mod interface_tests {
    use super::*;
    use crate::gpu::params::tests::check_family;

    /// The family's parameters and flag bits declared here are what its WGSL declares.
    #[test]
    fn the_family_interface_matches_its_wgsl() {
        check_family::<DistillParams>(Shader::Distill, "DistillParams", None);
    }

    #[test]
    fn the_measures_flags_match_the_shader() {
        check_family::<Header>(Shader::Dist, "ChunkHeader", Some((dist_flags::PREFIX, dist_flags::ALL)));
    }
}
