//! Fused softmax cross-entropy on the GPU: three dispatches recorded into one compute pass.
//!
//! 1. `ce_weights` (one workgroup): target range check, counted rows and weight sum.
//! 2. `ce_fused` (one workgroup per row, per chunk): statistic, row loss, lse, gradient.
//! 3. `ce_reduce` (one workgroup): sum of row losses and of lse^2, and the reduced loss.
//!
//! A [`CePlan`] owns what a shape needs across calls (scalars, per-row results, uploaded
//! weights, parameter blocks) and records the three dispatches into the caller's encoder with
//! no host round trip; [`PendingCe`] reads the loss back when the caller asks. The host-array
//! API (`GpuContext::cross_entropy` and friends) is built on the same plan.

use ndarray::{Array1, ArrayView1};

use super::ce_io::{flags, CeParams, CeSwitches, Scalars, Seg, SCALARS};
use super::{check_slice, rows};
use crate::api::config::{CallData, CeCall, CeLogits, CeOutput, CrossEntropy, GradDest, Reduction};
use crate::api::targets::{Targets, DEVICE_IGNORED};
use crate::dtype::{DType, LogitsMut};
use crate::error::{Result, XentError};
use crate::gpu::context::GpuContext;
use crate::gpu::launch::{Bind, Groups, Launch, ParamsCache, Recorder, Skip};
use crate::gpu::pending::PendingBytes;
use crate::gpu::pool::Pooled;
use crate::gpu::variant::{Binding, Family, Shader, Variant};
use std::sync::Arc;

use wgpu::BufferUsages as U;

/// What a recorded cross-entropy scores the logits against.
#[derive(Debug, Clone, Copy)]
pub enum DeviceTargets<'a> {
    /// i32 class indices `[N]` (ignored rows hold `cfg.ignore_index`, which must fit in i32).
    Classes(wgpu::BufferSlice<'a>),
    /// f32 probability rows `[N, V]`.
    Probs(wgpu::BufferSlice<'a>),
}

/// Where the gradient of a recorded cross-entropy goes: said once, at the call.
#[derive(Debug, Clone, Copy)]
pub enum DeviceGrad<'a> {
    /// Loss only.
    None,
    /// A separate `[N, V]` tensor of the given dtype (f32, or f16/bf16 rounded once from f32).
    Separate(wgpu::BufferSlice<'a>, DType),
    /// Over the logits, in their dtype.
    InPlace,
}

/// The device tensors of one recorded cross-entropy. Logits, probabilities and a separate
/// gradient may start at any offset that is a multiple of 4 bytes and of their element size;
/// targets and sample weights must start at a multiple of [`GpuContext::offset_alignment`].
/// Buffers need `STORAGE` usage.
#[derive(Debug, Clone, Copy)]
pub struct CeInputs<'a> {
    /// Row-major logits `[N, V]` of the plan's dtype.
    pub logits: wgpu::BufferSlice<'a>,
    /// Class indices or probabilities.
    pub targets: DeviceTargets<'a>,
    /// f32 sample weights `[N]`, overriding the plan's (`cfg.data.sample_weight`) for this call.
    pub sample_weight: Option<wgpu::BufferSlice<'a>>,
    /// The gradient's destination.
    pub grad: DeviceGrad<'a>,
}

/// The device tensors of a recorded backward pass ([`CePlan::record_backward`]).
#[derive(Debug, Clone, Copy)]
pub struct CeBackward<'a> {
    /// The logits of the forward pass (unchanged since).
    pub logits: wgpu::BufferSlice<'a>,
    /// The targets of the forward pass.
    pub targets: DeviceTargets<'a>,
    /// The sample weights of the forward pass, if they were given at the call.
    pub sample_weight: Option<wgpu::BufferSlice<'a>>,
    /// What [`CePlan::save_state`] copied after the forward pass (`COPY_SRC`).
    pub state: wgpu::BufferSlice<'a>,
    /// `d(total)/d(loss)`, f32: one value, or `[N]` with reduction `none` (`COPY_SRC`).
    pub upstream: wgpu::BufferSlice<'a>,
    /// Where the gradient goes: a separate tensor, or over the logits.
    pub grad: DeviceGrad<'a>,
}

/// A reusable cross-entropy of one shape and configuration, recorded into the caller's
/// encoder: a training step is forward, loss, backward and optimiser in one submission, with
/// the loss read back only when asked for ([`CePlan::read_back`]).
///
/// The plan owns its device buffers (scalars, per-row results, weights, parameter blocks):
/// repeated records allocate nothing. Each record overwrites the plan's results, so read them
/// (or use another plan) before recording the same plan again into a later submission.
///
/// ```no_run
/// # fn main() -> xent::Result<()> {
/// use xent::{CeInputs, CrossEntropy, DType, DeviceGrad, DeviceTargets, GpuContext};
/// let gpu = GpuContext::new()?;
/// let (n, v) = (1024, 32000);
/// let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
/// let mk = |size| gpu.device().create_buffer(&wgpu::BufferDescriptor { label: None, size, usage, mapped_at_creation: false });
/// let (logits, targets) = (mk((n * v * 4) as u64), mk((n * 4) as u64));
/// let plan = gpu.cross_entropy_plan(n, v, DType::F32, &CrossEntropy::default())?;
/// let mut enc = gpu.device().create_command_encoder(&Default::default());
/// // ... the model's forward pass writes `logits` here ...
/// plan.record(&mut enc, CeInputs {
///     logits: logits.slice(..),
///     targets: DeviceTargets::Classes(targets.slice(..)),
///     sample_weight: None,
///     grad: DeviceGrad::InPlace, // the backward pass reads the gradient from `logits`
/// })?;
/// let pending = plan.read_back(&mut enc, false)?; // optional: every k steps
/// gpu.queue().submit([enc.finish()]);
/// println!("loss {}", pending.wait()?.loss);
/// # Ok(()) }
/// ```
pub struct CePlan {
    pub(crate) ctx: GpuContext,
    pub(crate) n: usize,
    pub(crate) v: usize,
    pub(crate) dtype: DType,
    /// The loss's definition (shared with the plan's pending results).
    pub(crate) cfg: Arc<CrossEntropy>,
    /// The plan's call data: totals and output requests (its sample weights are uploaded:
    /// `sample_weight`).
    pub(crate) call: CallData<'static>,
    /// The value of an ignored row's device target.
    pub(crate) ignore: i32,
    pub(crate) class_weight: Option<Pooled>,
    pub(crate) sample_weight: Option<Pooled>,
    pub(crate) scalars: Pooled,
    pub(crate) scalars_init: Pooled,
    pub(crate) rows: Pooled,
    /// Invocations per workgroup of the row pass.
    pub(crate) wg: u16,
    /// Columns per segment (`v`: whole rows) and segments per row.
    pub(crate) seg_len: usize,
    pub(crate) parts: usize,
    /// The last parameter blocks and their buffer (forward and backward passes).
    params: ParamsCache,
    backward_params: ParamsCache,
    /// The vocabulary shard the plan's columns are (see `super::vocab`).
    pub(crate) shard: Option<crate::parallel::VocabShard>,
}

impl std::fmt::Debug for CePlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CePlan").field("rows", &self.n).field("classes", &self.v).field("dtype", &self.dtype).finish()
    }
}

/// Per-row results a plan writes (loss, lse, max, rank, gap).
pub(crate) const ROW_VECTORS: u64 = 5;
/// Floats per row of the statistic a forward pass saves for a backward pass.
pub(crate) const SAVED: u64 = 3;

/// Floats of a plan's row buffer: row vectors, saved statistics, segment partials.
fn row_floats(n: usize, parts: usize, shard: bool) -> usize {
    (ROW_VECTORS + SAVED) as usize * n.max(1) + if parts > 1 || shard { 5 * n * parts } else { 0 }
}

impl GpuContext {
    /// A reusable cross-entropy of `rows x classes` logits of `dtype` with the options `cfg`
    /// (class and sample weights are uploaded once, here). Ignored rows' targets hold
    /// `cfg.ignore_index` on the device, which must fit in i32; for targets encoded by
    /// [`crate::Targets::device_classes`], see [`Self::cross_entropy_plan_device_classes`].
    pub fn cross_entropy_plan(&self, rows: usize, classes: usize, dtype: DType, cfg: &CrossEntropy) -> Result<CePlan> {
        let ignore = i32::try_from(cfg.ignore_index).map_err(|_| {
            XentError::InvalidOption(format!("ignore_index {} does not fit the device's i32 targets", cfg.ignore_index))
        })?;
        CePlan::build(self, (rows, classes, dtype), cfg, &cfg.call_data(), ignore, false, None)
    }

    /// [`Self::cross_entropy_plan`] for targets encoded by [`crate::Targets::device_classes`]:
    /// ignored rows hold [`crate::DEVICE_IGNORED`] on the device, whatever `cfg.ignore_index`
    /// is (it need not fit in i32).
    pub fn cross_entropy_plan_device_classes(
        &self,
        rows: usize,
        classes: usize,
        dtype: DType,
        cfg: &CrossEntropy,
    ) -> Result<CePlan> {
        CePlan::build(self, (rows, classes, dtype), cfg, &cfg.call_data(), DEVICE_IGNORED, false, None)
    }
}

impl CePlan {
    /// A plan whose buffers come from the pool (for host-API calls that wait before dropping
    /// it), for targets whose ignored rows hold `ignore` on the device.
    pub(crate) fn new_pooled(
        ctx: &GpuContext,
        (n, v, dtype): (usize, usize, DType),
        cfg: &CrossEntropy,
        call: &CallData<'_>,
        ignore: i32,
    ) -> Result<CePlan> {
        CePlan::build(ctx, (n, v, dtype), cfg, call, ignore, true, None)
    }

    /// A pooled plan over `v` columns of a vocabulary shard (class weights are the global `[V]`),
    /// for device-encoded targets.
    pub(crate) fn new_shard(
        ctx: &GpuContext,
        (n, v, dtype): (usize, usize, DType),
        cfg: &CrossEntropy,
        call: &CallData<'_>,
        shard: crate::parallel::VocabShard,
    ) -> Result<CePlan> {
        CePlan::build(ctx, (n, v, dtype), cfg, call, DEVICE_IGNORED, true, Some(shard))
    }

    fn build(
        ctx: &GpuContext,
        (n, v, dtype): (usize, usize, DType),
        cfg: &CrossEntropy,
        call: &CallData<'_>,
        ignore: i32,
        pooled: bool,
        shard: Option<crate::parallel::VocabShard>,
    ) -> Result<CePlan> {
        // The options against the classes (sample weights against the rows, below).
        let ignored: Targets = Targets::I32(ndarray::ArrayView1::from(&[][..]));
        let classes = shard.map_or(v, |s| s.classes);
        let unweighted = call.unweighted();
        crate::check::ce_call((0, classes), &ignored, cfg, &unweighted)?;
        if let Some(w) = &call.sample_weight {
            if w.len() != n {
                return Err(XentError::Shape(format!(
                    "sample_weight has {} entries but the plan has {n} rows",
                    w.len()
                )));
            }
        }
        let alloc = |size: u64, usage: U, what: &str| {
            if pooled {
                ctx.take(size, usage, what)
            } else {
                ctx.owned(size, usage, what)
            }
        };
        let upload = |w: ArrayView1<'_, f32>, what: &str| -> Result<Pooled> {
            let b = alloc((w.len() * 4) as u64, U::STORAGE | U::COPY_DST, what)?;
            ctx.write(&b, 0, bytemuck::cast_slice(&w.to_vec()))?;
            Ok(b)
        };
        let class_weight = cfg.class_weight.as_ref().map(|w| upload(w.view(), "class_weight")).transpose()?;
        let sample_weight = call.sample_weight.as_ref().map(|w| upload(w.view(), "sample_weight")).transpose()?;
        let scalars = alloc(SCALARS, U::STORAGE | U::COPY_SRC | U::COPY_DST, "scalars")?;
        let scalars_init = alloc(SCALARS, U::COPY_SRC | U::COPY_DST, "scalars init")?;
        ctx.write(&scalars_init, 0, bytemuck::bytes_of(&Scalars::initial()))?;
        let (wg, seg_len) = ctx.ce_layout(n, v, call.outputs.gaps);
        let parts = v.div_ceil(seg_len.max(1)).max(1);
        let usage = U::STORAGE | U::COPY_SRC | U::COPY_DST;
        let rows = alloc((row_floats(n, parts, shard.is_some()) * 4) as u64, usage, "row results")?;
        Ok(CePlan {
            ctx: ctx.clone(),
            n,
            v,
            dtype,
            cfg: Arc::new(cfg.clone()),
            call: unweighted,
            ignore,
            class_weight,
            sample_weight,
            scalars,
            scalars_init,
            rows,
            wg,
            seg_len,
            parts,
            params: ParamsCache::new(pooled),
            backward_params: ParamsCache::new(pooled),
            shard,
        })
    }

    /// Rows N.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Classes V.
    pub fn classes(&self) -> usize {
        self.v
    }

    /// The device buffer of the scalars the last record computed: f32 `weight_sum`, u32
    /// `count`, f32 `loss_sum`, f32 `lse2_sum`, u32 `err_row`, i32 `err_target`, f32 `loss`
    /// (the reduced loss), padding; 32 bytes. Device-side consumers can read the loss here.
    pub fn scalars_buffer(&self) -> &wgpu::Buffer {
        &self.scalars
    }

    /// The device buffer of per-row results: f32 `[5, N]`: loss, lse, max, rank (with
    /// `cfg.ranks`; -1 for ignored rows), gap (with `cfg.gaps`).
    pub fn row_buffer(&self) -> &wgpu::Buffer {
        &self.rows
    }

    /// Bytes of per-row results and segment partials.
    pub(crate) fn rows_bytes(&self) -> u64 {
        (row_floats(self.n, self.parts, self.shard.is_some()) * 4) as u64
    }

    /// Segments each row is split into (1: one workgroup per row).
    pub fn segments(&self) -> usize {
        self.parts
    }

    /// Checks the device inputs of a record against the plan's shape; whether the targets are
    /// probability rows.
    fn check_inputs(
        &self,
        logits: wgpu::BufferSlice<'_>,
        targets: DeviceTargets<'_>,
        sample_weight: Option<wgpu::BufferSlice<'_>>,
    ) -> Result<bool> {
        let (n, align) = (self.n as u64, self.ctx.inner.offset_align);
        let (nv, elem) = (n * self.v as u64, self.dtype.size() as u64);
        check_slice(logits, nv * elem, 4u64.max(elem), "logits")?;
        match targets {
            DeviceTargets::Classes(t) => check_slice(t, n * 4, align, "targets")?,
            DeviceTargets::Probs(p) => check_slice(p, nv * 4, 4, "target probabilities")?,
        }
        if let Some(sw) = sample_weight {
            check_slice(sw, n * 4, align, "sample_weight")?;
        }
        Ok(matches!(targets, DeviceTargets::Probs(_)))
    }

    /// The gradient's destination, checked (a separate one must not overlap the logits): the
    /// separate slice, whether it is over the logits, and its dtype.
    fn grad_dest<'a>(
        &self,
        logits: wgpu::BufferSlice<'_>,
        grad: DeviceGrad<'a>,
    ) -> Result<(Option<wgpu::BufferSlice<'a>>, bool, DType)> {
        let (nv, elem) = ((self.n * self.v) as u64, self.dtype.size() as u64);
        Ok(match grad {
            DeviceGrad::None => (None, false, DType::F32),
            DeviceGrad::Separate(g, d) => {
                check_slice(g, nv * d.size() as u64, 4u64.max(d.size() as u64), "gradient")?;
                if g.buffer() == logits.buffer() {
                    let (a, b) = (g.offset(), logits.offset());
                    if a < b + nv * elem && b < a + nv * d.size() as u64 {
                        return Err(XentError::InvalidOption(
                            "the gradient overlaps the logits: use DeviceGrad::InPlace".into(),
                        ));
                    }
                }
                (Some(g), false, d)
            }
            DeviceGrad::InPlace => (None, true, self.dtype),
        })
    }

    /// The parameters of this plan's calls: its definition, totals and output requests, its
    /// device ignore marker, and sample weights flagged when the plan holds them (a record
    /// adds them when given at the call).
    pub(crate) fn base(&self, soft: bool) -> CeParams {
        let (cfg, call) = (&self.cfg, &self.call);
        let mut f = if soft { flags::SOFT } else { 0 };
        let on = |c: bool, bit: u32| if c { bit } else { 0 };
        f |= on(cfg.class_weight.is_some(), flags::CLASS_W);
        f |= on(self.sample_weight.is_some(), flags::SAMPLE_W);
        f |= on(cfg.softcap.is_some(), flags::SOFTCAP);
        f |= on(cfg.temperature != 1.0, flags::TEMP);
        f |= on(cfg.label_smoothing > 0.0, flags::SMOOTH);
        f |= on(cfg.reduction == Reduction::Mean, flags::MEAN);
        f |= on(cfg.z_loss > 0.0, flags::ZLOSS);
        f |= on(call.outputs.ranks, flags::RANK);
        f |= on(call.outputs.gaps, flags::GAP);
        f |= on(call.totals.is_some(), flags::EXT_DENOM);
        let t = call.totals.unwrap_or_default();
        CeParams {
            den_w: t.weight_sum as f32,
            den_n: t.counted as f32,
            ignore_index: self.ignore,
            smoothing: cfg.label_smoothing,
            z_loss: cfg.z_loss,
            softcap: cfg.softcap.unwrap_or(1.0),
            inv_temp: 1.0 / cfg.temperature,
            grad_scale: cfg.grad_scale,
            ..CeParams::new(self.n, self.v).with_flags(f)
        }
    }

    /// Whether a row pass reads its per-element extras (`CeSwitches::extras`): label
    /// smoothing's sums, probability targets (`soft`), or, in a pass that computes them
    /// (`ranks`: a forward pass), the targets' ranks.
    pub(crate) fn extras(&self, soft: bool, ranks: bool) -> bool {
        self.cfg.label_smoothing > 0.0 || soft || ranks && self.call.outputs.ranks
    }

    /// The row pass's variant for this plan, its row tensors bound at offset 0: gradient
    /// dtype, a separate gradient or one over the logits, the per-element extras (smoothing
    /// sums, soft targets, ranks), the stage.
    pub(crate) fn row_variant(&self, output: DType, grad: bool, in_place: bool, extras: bool, seg: Seg) -> Variant {
        self.row_variant_at(output, grad, in_place, extras, seg, &[(self.dtype, 0), (output, 0)])
    }

    /// [`Self::row_variant`] for row tensors at the given (dtype, byte offset)s, the logits
    /// first: they decide whether rows are read as vectors (see `super::row_vectors`).
    pub(crate) fn row_variant_at(
        &self,
        output: DType,
        grad: bool,
        in_place: bool,
        extras: bool,
        seg: Seg,
        rows: &[(DType, u64)],
    ) -> Variant {
        let (v, cfg) = (self.v, &self.cfg);
        let (vec4, vec8) = super::row_vectors(self.ctx.inner.wide_loads, v, self.seg_len, rows);
        Variant {
            input: self.dtype,
            output,
            vec4,
            vec8,
            odd: v % 2 == 1 && output != DType::F32 && (grad || in_place) && v % 4 != 0,
            subgroup: self.ctx.inner.subgroups,
            grad,
            in_place,
            wg: self.wg,
            ce: CeSwitches {
                extras,
                seg,
                transform: cfg.temperature != 1.0 || cfg.softcap.is_some(),
                class_w: cfg.class_weight.is_some(),
            },
            ..Default::default()
        }
    }

    /// The row tensors of a record as (dtype, byte offset): logits, probability targets, a
    /// separate gradient.
    fn row_tensors(
        &self,
        logits: wgpu::BufferSlice<'_>,
        targets: DeviceTargets<'_>,
        grad: Option<wgpu::BufferSlice<'_>>,
        gdtype: DType,
    ) -> Vec<(DType, u64)> {
        let mut rows = vec![(self.dtype, logits.offset())];
        if let DeviceTargets::Probs(p) = targets {
            rows.push((DType::F32, p.offset()));
        }
        if let Some(g) = grad {
            rows.push((gdtype, g.offset()));
        }
        rows
    }

    /// Records the cross-entropy of `inputs` into `enc` (no submission, no wait).
    pub fn record(&self, enc: &mut wgpu::CommandEncoder, inputs: CeInputs<'_>) -> Result<()> {
        let (ctx, n, v) = (&self.ctx, self.n, self.v);
        if n == 0 {
            return Ok(());
        }
        let soft = self.check_inputs(inputs.logits, inputs.targets, inputs.sample_weight)?;
        let (grad, in_place, gdtype) = self.grad_dest(inputs.logits, inputs.grad)?;
        let extras = self.extras(soft, true);
        let rows = self.row_tensors(inputs.logits, inputs.targets, grad, gdtype);
        let variant = self.row_variant_at(gdtype, grad.is_some(), in_place, extras, Seg::Whole, &rows);
        let split = self.parts > 1;
        let small = Variant { subgroup: ctx.inner.subgroups, ..Default::default() };
        let mut base = self.base(soft);
        if inputs.sample_weight.is_some() {
            base.head.flags |= flags::SAMPLE_W;
        }
        // Every forward pass leaves the row statistic a later backward pass needs.
        base.head.flags |= flags::SAVE;
        let sw = inputs.sample_weight.map(Bind::slice).or(self.sample_weight.as_deref().map(Bind::all));
        let scalars = Bind::first(&self.scalars, SCALARS);
        let rows = Bind::first(&self.rows, self.rows_bytes());
        let class_weight = self.class_weight.as_deref().map(Bind::all);
        // A row pass with what every row pass reads bound.
        let row_pass = |variant: Variant, params: CeParams, groups: Groups| -> Result<Launch<'_>> {
            let mut l = Launch::new(ctx.kernel(Shader::CeFused, variant)?, params, n, v)
                .groups(groups)
                .bind(5, scalars)
                .bind(6, rows)
                .rows(1, inputs.logits.buffer(), inputs.logits.offset(), self.dtype.size(), Skip::X);
            match inputs.targets {
                DeviceTargets::Classes(t) => l = l.bind(2, Bind::slice(t)),
                DeviceTargets::Probs(p) => l = l.rows(9, p.buffer(), p.offset(), 4, Skip::Y),
            }
            if let Some(cw) = class_weight {
                l = l.bind(3, cw);
            }
            if let Some(sw) = sw {
                l = l.bind(4, sw);
            }
            if let (Some(g), true) = (grad, variant.grad) {
                l = l.rows(8, g.buffer(), g.offset(), gdtype.size(), Skip::O);
            }
            Ok(l)
        };
        let mut weights =
            Launch::new(ctx.kernel(Shader::CeWeights, small)?, base, n, v).groups(Groups::One).bind(5, scalars);
        let mut reduce = Launch::new(ctx.kernel(Shader::CeReduce, small)?, base, n, v)
            .groups(Groups::One)
            .bind(5, scalars)
            .bind(6, rows);
        if let DeviceTargets::Classes(t) = inputs.targets {
            weights = weights.bind(2, Bind::slice(t));
            reduce = reduce.bind(2, Bind::slice(t));
        }
        if let Some(cw) = class_weight {
            weights = weights.bind(3, cw);
        }
        if let Some(sw) = sw {
            weights = weights.bind(4, sw);
        }
        let mut rec = Recorder::new(ctx);
        rec.push(weights)?;
        if split {
            // Split rows: partial statistics per segment; the row's loss from the merged
            // partials (one workgroup per row, which saves the merged statistic); then the
            // gradient per segment from the saved statistic.
            let parts = self.parts as u32;
            let seg_base = CeParams { segs: parts, seg_len: self.seg_len as u32, parts, ..base };
            let loss_only = Variant { grad: false, in_place: false, odd: false, output: DType::F32, ..variant };
            rec.push(row_pass(loss_only.with_seg(Seg::Stat), seg_base, Groups::PerRowTimes(self.parts))?)?;
            rec.push(row_pass(loss_only.with_seg(Seg::Finish), CeParams { segs: 1, ..seg_base }, Groups::PerRow)?)?;
            if variant.grad || variant.in_place {
                let f = (seg_base.head.flags & !flags::SAVE) | flags::FROM_SAVED;
                rec.push(row_pass(
                    variant.with_seg(Seg::Finish),
                    seg_base.with_flags(f),
                    Groups::PerRowTimes(self.parts),
                )?)?;
            }
        } else {
            rec.push(row_pass(variant, base, Groups::PerRow)?)?;
        }
        rec.push(reduce)?;
        let params = self.params.get(&rec)?;
        enc.copy_buffer_to_buffer(&self.scalars_init, 0, &self.scalars, 0, SCALARS);
        rec.record(enc, &params)
    }

    /// Bytes of the state a recorded forward pass leaves for [`Self::record_backward`]: the
    /// scalars (32 bytes) and three f32 per row.
    pub fn state_bytes(&self) -> u64 {
        SCALARS + SAVED * self.n as u64 * 4
    }

    /// Records a copy of the state the last [`Self::record`] left (see [`Self::state_bytes`])
    /// into `dst`, so that the plan can be recorded again before the backward pass.
    pub fn save_state(&self, enc: &mut wgpu::CommandEncoder, dst: wgpu::BufferSlice<'_>) -> Result<()> {
        let need = self.state_bytes();
        if !dst.buffer().usage().contains(U::COPY_DST) || !dst.offset().is_multiple_of(4) || dst.size() < need {
            return Err(XentError::InvalidOption(format!(
                "the state needs {need} bytes of a COPY_DST buffer at a 4-byte aligned offset"
            )));
        }
        if self.n > 0 {
            enc.copy_buffer_to_buffer(&self.scalars, 0, dst.buffer(), dst.offset(), SCALARS);
            let saved = ROW_VECTORS * self.n as u64 * 4;
            enc.copy_buffer_to_buffer(&self.rows, saved, dst.buffer(), dst.offset() + SCALARS, need - SCALARS);
        }
        Ok(())
    }

    /// Records the gradient of a loss recorded earlier, from the state that forward pass saved
    /// ([`Self::save_state`]), scaled by the upstream gradient `d(total)/d(loss)`: one f32 for
    /// reductions `mean` and `sum`, `[N]` f32 for `none`. One read of the logits and one write
    /// of the gradient (separate, or in place over the logits); nothing is kept between the
    /// passes but the state. The gradient equals what [`Self::record`] writes, times upstream.
    pub fn record_backward(&self, enc: &mut wgpu::CommandEncoder, b: CeBackward<'_>) -> Result<()> {
        let (ctx, n, v, cfg) = (&self.ctx, self.n, self.v, &self.cfg);
        if n == 0 {
            return Ok(());
        }
        let soft = self.check_inputs(b.logits, b.targets, b.sample_weight)?;
        let rows_up = cfg.reduction == Reduction::None;
        let up_bytes = if rows_up { n as u64 * 4 } else { 4 };
        for (s, need, what) in [(b.state, self.state_bytes(), "state"), (b.upstream, up_bytes, "upstream gradient")] {
            if !s.buffer().usage().contains(U::COPY_SRC) || !s.offset().is_multiple_of(4) || s.size() < need {
                return Err(XentError::InvalidOption(format!(
                    "the {what} needs {need} bytes of a COPY_SRC buffer at a 4-byte aligned offset"
                )));
            }
        }
        if matches!(b.grad, DeviceGrad::None) {
            return Err(XentError::InvalidOption("a backward pass needs a gradient destination".into()));
        }
        let (grad, in_place, gdtype) = self.grad_dest(b.logits, b.grad)?;
        let rows = self.row_tensors(b.logits, b.targets, grad, gdtype);
        let variant =
            self.row_variant_at(gdtype, grad.is_some(), in_place, self.extras(soft, false), Seg::Finish, &rows);
        let mut base = self.base(soft);
        base.head.flags &= !(flags::RANK | flags::GAP);
        base.head.flags |= flags::FROM_SAVED | flags::UPSTREAM | if rows_up { flags::UP_ROWS } else { 0 };
        if b.sample_weight.is_some() {
            base.head.flags |= flags::SAMPLE_W;
        }
        // No reduction left to do: rows split into the plan's segments for parallelism.
        let segs = self.parts as u32;
        let base = CeParams { segs, seg_len: self.seg_len as u32, parts: segs, ..base };
        let mut l = Launch::new(ctx.kernel(Shader::CeFused, variant)?, base, n, v)
            .groups(Groups::PerRowTimes(self.parts))
            .bind(5, Bind::first(&self.scalars, SCALARS))
            .bind(6, Bind::first(&self.rows, self.rows_bytes()))
            .rows(1, b.logits.buffer(), b.logits.offset(), self.dtype.size(), Skip::X);
        match b.targets {
            DeviceTargets::Classes(t) => l = l.bind(2, Bind::slice(t)),
            DeviceTargets::Probs(p) => l = l.rows(9, p.buffer(), p.offset(), 4, Skip::Y),
        }
        if let Some(cw) = self.class_weight.as_deref() {
            l = l.bind(3, Bind::all(cw));
        }
        if let Some(sw) = b.sample_weight.map(Bind::slice).or(self.sample_weight.as_deref().map(Bind::all)) {
            l = l.bind(4, sw);
        }
        if let Some(g) = grad {
            l = l.rows(8, g.buffer(), g.offset(), gdtype.size(), Skip::O);
        }
        // The saved state back into place, and the upstream gradient beside it.
        enc.copy_buffer_to_buffer(b.state.buffer(), b.state.offset(), &self.scalars, 0, SCALARS);
        let saved = ROW_VECTORS * n as u64 * 4;
        enc.copy_buffer_to_buffer(
            b.state.buffer(),
            b.state.offset() + SCALARS,
            &self.rows,
            saved,
            SAVED * n as u64 * 4,
        );
        if rows_up {
            enc.copy_buffer_to_buffer(b.upstream.buffer(), b.upstream.offset(), &self.rows, 4 * n as u64 * 4, up_bytes);
        } else {
            enc.copy_buffer_to_buffer(b.upstream.buffer(), b.upstream.offset(), &self.scalars, 28, 4);
        }
        let mut rec = Recorder::new(ctx);
        rec.push(l)?;
        let params = self.backward_params.get(&rec)?;
        rec.record(enc, &params)
    }

    /// Records a copy of the scalars (and, with `per_row`, the per-row results) into a staging
    /// buffer; after the caller submits `enc`, [`PendingCe::wait`] or [`PendingCe::try_get`]
    /// returns them as a [`CeOutput`] (without gradient).
    pub fn read_back(&self, enc: &mut wgpu::CommandEncoder, per_row: bool) -> Result<PendingCe> {
        let n = self.n as u64;
        let rows_bytes = if per_row { ROW_VECTORS * n * 4 } else { 0 };
        let len = SCALARS + rows_bytes;
        let staging =
            (self.n > 0).then(|| self.ctx.take(len, U::MAP_READ | U::COPY_DST, "scalars staging")).transpose()?;
        if let Some(staging) = &staging {
            enc.copy_buffer_to_buffer(&self.scalars, 0, staging, 0, SCALARS);
            if per_row {
                enc.copy_buffer_to_buffer(&self.rows, 0, staging, SCALARS, rows_bytes);
            }
        }
        Ok(PendingCe {
            bytes: PendingBytes::new(&self.ctx, staging, len),
            n: self.n,
            v: self.v,
            cfg: self.cfg.clone(),
            call: self.call.clone(),
            per_row,
        })
    }
}

/// A loss on its way back from the device (see [`CePlan::read_back`]).
pub struct PendingCe {
    bytes: PendingBytes,
    n: usize,
    v: usize,
    cfg: Arc<CrossEntropy>,
    call: CallData<'static>,
    per_row: bool,
}

impl std::fmt::Debug for PendingCe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingCe").field("rows", &self.n).finish()
    }
}

impl PendingCe {
    /// Waits for the submission that holds the copy and returns the results.
    pub fn wait(self) -> Result<CeOutput> {
        let head = self.bytes.wait()?;
        Self::decode(self.n, self.v, (&self.cfg, &self.call), self.per_row, &head)
    }

    /// Without blocking: `None` while the copy has not finished, then the results once. Call it
    /// only after the encoder holding the copy was submitted.
    pub fn try_get(&mut self) -> Option<Result<CeOutput>> {
        let head = self.bytes.try_get()?;
        Some(head.and_then(|h| Self::decode(self.n, self.v, (&self.cfg, &self.call), self.per_row, &h)))
    }

    fn decode(
        n: usize,
        v: usize,
        (cfg, call): (&CrossEntropy, &CallData<'_>),
        got: bool,
        head: &[u8],
    ) -> Result<CeOutput> {
        let (per_row, outs) = (call.outputs.row_losses(cfg.reduction), call.outputs);
        if n == 0 {
            return Ok(CeOutput {
                loss: call.reduce(cfg, 0.0, 0.0, 0, 0.0),
                counted: 0,
                weight_sum: 0.0,
                row_loss: per_row.then(|| Array1::zeros(0)),
                row_lse: outs.per_row.then(|| Array1::zeros(0)),
                row_max: outs.ranks.then(|| Array1::zeros(0)),
                row_rank: outs.ranks.then(|| Array1::zeros(0)),
                row_gap: outs.gaps.then(|| Array1::zeros(0)),
                grad: None,
            });
        }
        let sc: Scalars = bytemuck::pod_read_unaligned(&head[..SCALARS as usize]);
        if sc.err_row != u32::MAX {
            return Err(XentError::TargetOutOfRange {
                row: sc.err_row as usize,
                target: sc.err_target as i64,
                classes: v,
            });
        }
        let counted = sc.count as u64;
        let weight_sum = sc.weight_sum as f64;
        let z = cfg.z_loss as f64;
        let lse2 = sc.lse2_sum as f64;
        let loss = call.reduce(cfg, sc.loss_sum as f64 - z * lse2, lse2, counted, weight_sum);
        let rows: &[f32] = if got { bytemuck::cast_slice(&head[SCALARS as usize..]) } else { &[] };
        let row = |k: usize| Array1::from(rows[k * n..(k + 1) * n].to_vec());
        Ok(CeOutput {
            loss,
            counted,
            weight_sum,
            row_loss: (got && per_row).then(|| row(0)),
            row_lse: (got && outs.per_row).then(|| row(1)),
            row_max: (got && outs.ranks).then(|| row(2)),
            row_rank: (got && outs.ranks).then(|| row(3).mapv(|r| if r < 0.0 { u32::MAX } else { r as u32 })),
            row_gap: (got && outs.gaps).then(|| row(4)),
            grad: None,
        })
    }
}

impl GpuContext {
    /// The cross-entropy of host tensors: uploads them, records on a plan, waits, and reads
    /// back what was asked for (the public methods: `crate::api::methods`).
    pub(crate) fn ce_run(&self, call: CeCall<'_>, cfg: &CrossEntropy) -> Result<CeOutput> {
        let CeCall { logits, targets, grad: dest, data } = call;
        let (logits, in_place) = match logits {
            CeLogits::Read(l) => (Some(l), None),
            CeLogits::InPlace(x) => (None, Some(x)),
        };
        let (dim, dtype) = match (&logits, &in_place) {
            (Some(l), _) => (l.dim(), l.dtype()),
            (_, Some(x)) => (x.dim(), x.dtype()),
            _ => unreachable!("logits"),
        };
        let (n, v) = dim;
        crate::check::ce_call((n, v), &targets, cfg, &data)?;
        if let GradDest::Into(g) = &dest {
            if g.dim() != (n, v) {
                return Err(XentError::Shape(format!(
                    "gradient {:?} and logits {:?} differ in shape",
                    g.dim(),
                    (n, v)
                )));
            }
        }
        // Ignored rows carry a value no class can have.
        let t = targets.device_classes(v, cfg.ignore_index)?;
        let plan = CePlan::new_pooled(self, (n, v, dtype), cfg, &data, DEVICE_IGNORED)?;
        let outs = data.outputs;
        let want_rows = outs.row_losses(cfg.reduction) || outs.ranks || outs.gaps;
        if n == 0 {
            let mut out =
                plan.read_back(&mut self.device().create_command_encoder(&Default::default()), want_rows)?.wait()?;
            if matches!(dest, GradDest::New) {
                out.grad = Some(ndarray::Array2::zeros((0, v)));
            }
            return Ok(out);
        }
        let copy = if in_place.is_some() { U::COPY_SRC } else { U::empty() };
        let lb = match (&logits, &in_place) {
            (Some(l), _) => self.upload(&l.bytes(), U::STORAGE | copy, "logits")?,
            (_, Some(x)) => self.upload(&x.view().bytes(), U::STORAGE | copy, "logits")?,
            _ => unreachable!("logits"),
        };
        let (tb, pb) = match targets {
            Targets::Probs(p) => {
                let p = p.as_standard_layout();
                (None, Some(self.upload(bytemuck::cast_slice(p.as_slice().expect("standard")), U::STORAGE, "probs")?))
            }
            _ => (Some(self.upload(bytemuck::cast_slice(&t), U::STORAGE, "targets")?), None),
        };
        let gdtype = match &dest {
            GradDest::Into(g) => g.dtype(),
            _ => DType::F32,
        };
        let nv = (n * v) as u64;
        let gb = match dest {
            GradDest::None => None,
            _ => Some(self.take(nv * gdtype.size() as u64, U::STORAGE | U::COPY_SRC, "gradient")?),
        };
        let mut enc = self.device().create_command_encoder(&Default::default());
        fn nb(b: &Pooled, bytes: u64) -> wgpu::BufferSlice<'_> {
            b.slice(..bytes.max(4).next_multiple_of(4).min(b.size()))
        }
        let inputs = CeInputs {
            logits: nb(&lb, nv * dtype.size() as u64),
            targets: match (&tb, &pb) {
                (Some(t), _) => DeviceTargets::Classes(nb(t, n as u64 * 4)),
                (None, Some(p)) => DeviceTargets::Probs(nb(p, nv * 4)),
                _ => unreachable!("targets or probabilities"),
            },
            sample_weight: None,
            grad: match (&gb, in_place.is_some()) {
                (Some(g), _) => DeviceGrad::Separate(nb(g, nv * gdtype.size() as u64), gdtype),
                (None, true) => DeviceGrad::InPlace,
                (None, false) => DeviceGrad::None,
            },
        };
        plan.record(&mut enc, inputs)?;
        let pending = plan.read_back(&mut enc, want_rows)?;
        self.submit_wait(enc)?;
        let mut out = pending.wait()?;
        // The gradient comes back piece by piece, straight into its destination.
        let read = |src: &Pooled, dst: LogitsMut<'_>| self.read_back_into(src, dst, None);
        match (dest, gb, in_place) {
            (GradDest::New, Some(g), _) => {
                let mut host = crate::alloc::zeros2::<f32>((n, v), "gradient")?;
                read(&g, (&mut host).into())?;
                out.grad = Some(host);
            }
            (GradDest::Into(dst), Some(g), _) => read(&g, dst)?,
            (_, None, Some(x)) => read(&lb, x)?,
            _ => {}
        }
        Ok(out)
    }
}

impl Variant {
    /// This variant for the pass `seg` of a split row.
    pub(crate) fn with_seg(self, seg: Seg) -> Variant {
        Variant { ce: CeSwitches { seg, ..self.ce }, ..self }
    }
}

/// The family's kernels: their interface WGSL, bindings and variants.
pub(crate) const FAMILY: Family = Family {
    io: &[rows::WGSL, super::ce_io::WGSL],
    bindings,
    #[cfg(test)]
    variants,
};

/// The family's own bindings (`ce_io.wgsl`); the row tensors are `rows.rs`'s.
mod own {
    use crate::gpu::variant::Binding;
    pub const TARGETS: Binding = (2, true, "targets");
    pub const CLASS_WEIGHT: Binding = (3, true, "class_weight");
    pub const SAMPLE_WEIGHT: Binding = (4, true, "sample_weight");
    pub const SCALARS: Binding = (5, false, "scalars");
}

fn bindings(shader: Shader, v: &Variant) -> Vec<Binding> {
    use own::*;
    let ce = v.ce;
    match shader {
        Shader::CeWeights => vec![TARGETS, CLASS_WEIGHT, SAMPLE_WEIGHT, SCALARS],
        Shader::CeReduce => vec![TARGETS, SCALARS, rows::ROW_VALUES],
        _ => {
            let mut b = vec![rows::input(v), TARGETS];
            // The split-row statistic pass reads only logits, targets and (extras) class weights.
            if ce.seg == Seg::Stat {
                if ce.extras && ce.class_w {
                    b.push(CLASS_WEIGHT);
                }
            } else {
                if ce.class_w {
                    b.push(CLASS_WEIGHT);
                }
                b.push(SAMPLE_WEIGHT);
            }
            b.push(rows::ROW_VALUES);
            b.extend(rows::output(v));
            if ce.extras && (ce.seg != Seg::Finish || v.grad || v.in_place) {
                // Probability targets in the second rows (not read by a split row's loss-only
                // finish).
                b.push(rows::SECOND);
            }
            if v.grad || v.in_place {
                // The gradient's mean coefficient comes from the scalars of the weights pass.
                b.push(SCALARS);
            }
            b
        }
    }
}

/// Every variant the host builds the family's kernels in: the row switches with every
/// combination of the family's own (those that do not depend on the dtypes with one dtype
/// pairing only).
#[cfg(test)]
fn variants(shader: Shader) -> Vec<Variant> {
    use crate::dtype::DType;
    let mut out = Vec::new();
    for v in rows::variants() {
        let one_pairing = v.second == DType::F32 && v.output == v.input;
        for bits in 0..8u32 {
            for seg in [Seg::Whole, Seg::Stat, Seg::Finish] {
                let ce = CeSwitches { extras: bits & 1 != 0, seg, transform: bits & 2 != 0, class_w: bits & 4 != 0 };
                if bits >= 2 && !one_pairing {
                    continue;
                }
                let v = Variant { ce, ..v };
                if valid(shader, &v) {
                    out.push(v);
                }
            }
        }
    }
    out
}

/// Whether the host ever builds `shader` in `v`.
#[cfg(test)]
fn valid(shader: Shader, v: &Variant) -> bool {
    use crate::dtype::DType;
    let f32_only = |d: DType| d == DType::F32;
    match shader {
        Shader::CeWeights | Shader::CeReduce => *v == Variant { subgroup: v.subgroup, ..Default::default() },
        _ => {
            let ce = v.ce;
            // Soft targets are f32; the output dtype only matters with an output; the statistic
            // pass of a split row writes no gradient.
            !(ce.seg == Seg::Stat && (v.grad || v.in_place))
                && f32_only(v.second)
                && (v.grad || v.in_place || f32_only(v.output))
                && (!v.in_place || f32_only(v.output))
        }
    }
}

#[cfg(test)]
mod interface_tests {
    use super::*;
    use crate::gpu::kernels::ce_io::{flags, CeParams, Scalars};
    use crate::gpu::params::tests::check_family;

    /// The family's parameters and flag bits declared here are what its WGSL declares.
    #[test]
    fn the_family_interface_matches_its_wgsl() {
        check_family::<CeParams>(Shader::CeFused, "CeParams", Some((flags::PREFIX, flags::ALL)));
        let v = Variant { grad: true, ..Default::default() };
        let module = naga::front::wgsl::parse_str(&Shader::CeFused.source(v)).unwrap();
        crate::gpu::params::tests::check_struct::<Scalars>(&module, "Scalars");
    }
}
