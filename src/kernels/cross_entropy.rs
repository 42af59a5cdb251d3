//! Fused softmax cross-entropy on the GPU: three dispatches in one submission.
//!
//! 1. `ce_weights` (one workgroup): target range check, counted rows and weight sum.
//! 2. `ce_fused` (one workgroup per row, per chunk): statistic, row loss, lse, gradient.
//! 3. `ce_reduce` (one workgroup): sum of row losses and of lse^2.
//!
//! Only the 32-byte scalar block (plus per-row vectors or the gradient when asked) is read back.

use bytemuck::{Pod, Zeroable};
use ndarray::{Array1, Array2, ArrayView2, ArrayViewMut2};

use super::source::{Shader, Variant};
use super::{bind, bind_group, dispatch, flags, param_binding, row_chunks, upload_params, Params};
use crate::api::config::{CeOutput, CrossEntropy, GradMode, Reduction};
use crate::api::targets::{Targets, IGNORED};
use crate::context::GpuContext;
use crate::cpu::reduce;
use crate::error::{Result, XentError};

/// Mirrors `Scalars` in `shaders/common.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
struct Scalars {
    weight_sum: f32,
    count: u32,
    loss_sum: f32,
    lse2_sum: f32,
    err_row: u32,
    err_target: i32,
    _pad: [u32; 2],
}
const SCALARS: u64 = std::mem::size_of::<Scalars>() as u64;

use wgpu::BufferUsages as U;

/// Logits already on the GPU, for [`GpuContext::cross_entropy_device`].
#[derive(Debug, Clone, Copy)]
pub struct DeviceCe<'a> {
    /// Row-major f32 logits `[rows, classes]` (needs `STORAGE`; `COPY_SRC` to read the gradient back).
    pub logits: &'a wgpu::Buffer,
    /// i32 class indices `[rows]` (`STORAGE`); `ignore_index` must fit in i32.
    pub targets: &'a wgpu::Buffer,
    /// Rows N.
    pub rows: usize,
    /// Classes V.
    pub classes: usize,
    /// Gradient output `[rows, classes]` f32 for `GradMode::Separate` (`STORAGE`).
    pub grad: Option<&'a wgpu::Buffer>,
}

struct Job<'a> {
    n: usize,
    v: usize,
    logits: &'a wgpu::Buffer,
    /// Class indices, or `None` with `probs` for probability targets.
    targets: Option<&'a wgpu::Buffer>,
    /// Probability targets `[N, V]`, chunked like the logits.
    probs: Option<&'a wgpu::Buffer>,
    ignore_index: i32,
    grad: Option<&'a wgpu::Buffer>,
    /// Where the gradient goes on the host (from `grad`, or from `logits` when in place).
    grad_host: Option<&'a mut [f32]>,
}

fn params(cfg: &CrossEntropy, n: usize, v: usize, ignore_index: i32, soft: bool) -> Params {
    let mut f = if soft { flags::SOFT } else { 0 };
    if cfg.class_weight.is_some() {
        f |= flags::CLASS_W;
    }
    if cfg.sample_weight.is_some() {
        f |= flags::SAMPLE_W;
    }
    if cfg.softcap.is_some() {
        f |= flags::SOFTCAP;
    }
    if cfg.temperature != 1.0 {
        f |= flags::TEMP;
    }
    if cfg.label_smoothing > 0.0 {
        f |= flags::SMOOTH;
    }
    if cfg.reduction == Reduction::Mean {
        f |= flags::MEAN;
    }
    if cfg.z_loss > 0.0 {
        f |= flags::ZLOSS;
    }
    if cfg.ranks {
        f |= flags::RANK;
    }
    if cfg.gaps {
        f |= flags::GAP;
    }
    Params {
        ignore_index,
        flags: f,
        smoothing: cfg.label_smoothing,
        z_loss: cfg.z_loss,
        softcap: cfg.softcap.unwrap_or(1.0),
        inv_temp: 1.0 / cfg.temperature,
        grad_scale: cfg.grad_scale,
        ..Params::new(n, v)
    }
}

impl GpuContext {
    fn run_ce(&self, job: Job<'_>, cfg: &CrossEntropy) -> Result<CeOutput> {
        let Job { n, v, logits, targets, probs, ignore_index, grad, grad_host } = job;
        let per_row = cfg.per_row || cfg.reduction == Reduction::None;
        if n == 0 {
            return Ok(CeOutput {
                loss: reduce(cfg, 0.0, 0.0, 0, 0.0),
                counted: 0,
                weight_sum: 0.0,
                row_loss: per_row.then(|| Array1::zeros(0)),
                row_lse: cfg.per_row.then(|| Array1::zeros(0)),
                row_max: cfg.ranks.then(|| Array1::zeros(0)),
                row_rank: cfg.ranks.then(|| Array1::zeros(0)),
                row_gap: cfg.gaps.then(|| Array1::zeros(0)),
                grad: None,
            });
        }
        let chunks = row_chunks(self, n, v, "logits")?;
        let variant = Variant {
            vec4: v % 4 == 0,
            subgroup: self.subgroups,
            grad: cfg.grad == GradMode::Separate,
            in_place: cfg.grad == GradMode::InPlace,
            extras: cfg.label_smoothing > 0.0 || cfg.ranks || probs.is_some(),
        };
        let small = Variant { subgroup: self.subgroups, ..Default::default() };
        let k_weights = self.kernel(Shader::CeWeights, small)?;
        let k_fused = self.kernel(Shader::CeFused, variant)?;
        let k_reduce = self.kernel(Shader::CeReduce, small)?;

        // Parameter blocks: [weights/reduce, chunk 0, chunk 1, ...].
        let base = params(cfg, n, v, ignore_index, probs.is_some());
        let blocks: Vec<Params> =
            std::iter::once(base).chain(chunks.iter().map(|c| base.for_chunk(self, c, c.rows))).collect();
        let pbuf = upload_params(self, &blocks)?;
        let init = Scalars { err_row: u32::MAX, ..Zeroable::zeroed() };
        let sbuf = self.upload(bytemuck::bytes_of(&init), U::STORAGE | U::COPY_SRC, "scalars")?;
        let cw = match &cfg.class_weight {
            Some(w) => Some(self.upload(bytemuck::cast_slice(&w.to_vec()), U::STORAGE, "class_weight")?),
            None => None,
        };
        let sw = match &cfg.sample_weight {
            Some(w) => Some(self.upload(bytemuck::cast_slice(&w.to_vec()), U::STORAGE, "sample_weight")?),
            None => None,
        };
        let rows_bytes = n as u64 * 4;
        // Row results: loss, lse, max, rank, gap (see ce_fused.wgsl).
        let rows_buf = self.take(5 * rows_bytes, U::STORAGE | U::COPY_SRC, "row results")?;
        let any_rows = per_row || cfg.ranks || cfg.gaps;
        let small_len = SCALARS + if any_rows { 5 * rows_bytes } else { 0 };
        let staging = self.take(small_len, U::MAP_READ | U::COPY_DST, "staging")?;
        let grad_bytes = (n * v) as u64 * 4;
        let grad_staging = match grad_host {
            Some(_) => Some(self.take(grad_bytes, U::MAP_READ | U::COPY_DST, "gradient staging")?),
            None => None,
        };

        let shared = |i: usize| -> [Option<wgpu::BindingResource<'_>>; crate::context::SLOTS] {
            [
                Some(param_binding(&pbuf, i)),
                None,
                targets.map(|t| bind(t, 0, rows_bytes)),
                cw.as_ref().map(|b| b.as_entire_binding()),
                sw.as_ref().map(|b| b.as_entire_binding()),
                Some(bind(&sbuf, 0, SCALARS)),
                Some(bind(&rows_buf, 0, 5 * rows_bytes)),
                None,
                None,
                None,
                None,
            ]
        };
        let bg_weights = bind_group(self, &k_weights, shared(0));
        let bg_reduce = bind_group(self, &k_reduce, shared(0));
        let bg_chunks: Vec<_> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut slots = shared(i + 1);
                let (off, size) = (c.offset, c.size(v));
                slots[1] = Some(bind(logits, off, size));
                slots[8] = grad.map(|g| bind(g, off, size));
                slots[9] = probs.map(|p| bind(p, off, size));
                bind_group(self, &k_fused, slots)
            })
            .collect();

        let mut enc = self.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            dispatch(self, &mut pass, &k_weights, &[(1, &bg_weights)]);
            let runs: Vec<_> = chunks.iter().map(|c| c.rows).zip(&bg_chunks).collect();
            dispatch(self, &mut pass, &k_fused, &runs);
            dispatch(self, &mut pass, &k_reduce, &[(1, &bg_reduce)]);
        }
        enc.copy_buffer_to_buffer(&sbuf, 0, &staging, 0, SCALARS);
        if any_rows {
            enc.copy_buffer_to_buffer(&rows_buf, 0, &staging, SCALARS, 5 * rows_bytes);
        }
        if let Some(gs) = &grad_staging {
            let src = grad.unwrap_or(logits);
            enc.copy_buffer_to_buffer(src, 0, gs, 0, grad_bytes);
        }
        self.submit_wait(enc)?;

        let mut head = vec![0f32; (small_len / 4) as usize];
        self.read_staging(&staging, small_len, bytemuck::cast_slice_mut(&mut head))?;
        let sc: Scalars = bytemuck::pod_read_unaligned(bytemuck::cast_slice(&head[..8]));
        if let (Some(gs), Some(out)) = (&grad_staging, grad_host) {
            self.read_staging(gs, grad_bytes, bytemuck::cast_slice_mut(out))?;
        }
        for b in [pbuf, sbuf, rows_buf, staging].into_iter().chain(cw).chain(sw).chain(grad_staging) {
            self.give(b);
        }
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
        let loss = reduce(cfg, sc.loss_sum as f64 - z * lse2, lse2, counted, weight_sum);
        let rows = |k: usize| Array1::from(head[8 + k * n..8 + (k + 1) * n].to_vec());
        Ok(CeOutput {
            loss,
            counted,
            weight_sum,
            row_loss: per_row.then(|| rows(0)),
            row_lse: cfg.per_row.then(|| rows(1)),
            row_max: cfg.ranks.then(|| rows(2)),
            row_rank: cfg.ranks.then(|| rows(3).mapv(|r| if r < 0.0 { u32::MAX } else { r as u32 })),
            row_gap: cfg.gaps.then(|| rows(4)),
            grad: None,
        })
    }

    /// Softmax cross-entropy of host logits `[N, V]` (see [`CrossEntropy`]); the gradient, if
    /// asked for with `GradMode::Separate`, comes back as `CeOutput::grad`.
    pub fn cross_entropy(&self, logits: ArrayView2<f32>, targets: Targets, cfg: &CrossEntropy) -> Result<CeOutput> {
        if cfg.grad == GradMode::InPlace {
            return Err(XentError::InvalidOption(
                "GradMode::InPlace needs mutable logits: call cross_entropy_in_place".into(),
            ));
        }
        let (n, v) = logits.dim();
        crate::api::check::ce_inputs(n, v, targets.len(), cfg)?;
        let t = targets.normalise(v, cfg.ignore_index)?;
        let tb = self.upload(bytemuck::cast_slice(&t), U::STORAGE, "targets")?;
        self.host_separate(logits, Some(tb), None, cfg)
    }

    /// Runs host logits against uploaded targets (indices or probabilities), reading back the
    /// gradient for `GradMode::Separate`; the pooled buffers go back to the pool.
    fn host_separate(
        &self,
        logits: ArrayView2<f32>,
        targets: Option<wgpu::Buffer>,
        probs: Option<wgpu::Buffer>,
        cfg: &CrossEntropy,
    ) -> Result<CeOutput> {
        let (n, v) = logits.dim();
        let x = logits.as_standard_layout();
        let lb = self.upload(bytemuck::cast_slice(x.as_slice().expect("standard layout")), U::STORAGE, "logits")?;
        let want = cfg.grad == GradMode::Separate;
        let gbuf = if want { Some(self.take((n * v) as u64 * 4, U::STORAGE | U::COPY_SRC, "gradient")?) } else { None };
        let mut host = if want { Some(Array2::<f32>::zeros((n, v))) } else { None };
        let job = Job {
            n,
            v,
            logits: &lb,
            targets: targets.as_ref(),
            probs: probs.as_ref(),
            ignore_index: IGNORED,
            grad: gbuf.as_ref(),
            grad_host: host.as_mut().map(|h| h.as_slice_mut().expect("fresh array")),
        };
        let mut out = self.run_ce(job, cfg)?;
        out.grad = host;
        for b in [lb].into_iter().chain(targets).chain(probs).chain(gbuf) {
            self.give(b);
        }
        Ok(out)
    }

    /// Cross-entropy that overwrites `logits` with the gradient (computed in place on the GPU,
    /// so no separate gradient buffer is allocated).
    pub fn cross_entropy_in_place(
        &self,
        mut logits: ArrayViewMut2<f32>,
        targets: Targets,
        cfg: &CrossEntropy,
    ) -> Result<CeOutput> {
        let (n, v) = logits.dim();
        let cfg = CrossEntropy { grad: GradMode::InPlace, ..cfg.clone() };
        crate::api::check::ce_inputs(n, v, targets.len(), &cfg)?;
        let t = targets.normalise(v, cfg.ignore_index)?;
        let x = logits.as_standard_layout().into_owned();
        // COPY_SRC: the gradient is read back from this buffer.
        let lb = self.upload(
            bytemuck::cast_slice(x.as_slice().expect("standard layout")),
            U::STORAGE | U::COPY_SRC,
            "logits",
        )?;
        let tb = self.upload(bytemuck::cast_slice(&t), U::STORAGE, "targets")?;
        drop(x);
        let mut host = vec![0f32; n * v];
        let job = Job {
            n,
            v,
            logits: &lb,
            targets: Some(&tb),
            probs: None,
            ignore_index: IGNORED,
            grad: None,
            grad_host: Some(&mut host),
        };
        let out = self.run_ce(job, &cfg)?;
        logits.assign(&ndarray::ArrayView2::from_shape((n, v), &host).expect("same shape"));
        self.give(lb);
        self.give(tb);
        Ok(out)
    }

    /// Cross-entropy of logits that already live on the GPU. The gradient stays on the GPU:
    /// in `dev.grad` for `GradMode::Separate`, over `dev.logits` for `GradMode::InPlace`.
    /// Only the scalars (and per-row vectors when `cfg.per_row`) are read back.
    pub fn cross_entropy_device(&self, dev: DeviceCe<'_>, cfg: &CrossEntropy) -> Result<CeOutput> {
        let DeviceCe { logits, targets, rows: n, classes: v, grad } = dev;
        crate::api::check::ce_inputs(n, v, n, cfg)?;
        let ignore_index = i32::try_from(cfg.ignore_index).map_err(|_| {
            XentError::InvalidOption(format!("ignore_index {} does not fit the i32 targets", cfg.ignore_index))
        })?;
        let need = (n * v) as u64 * 4;
        let check = |b: &wgpu::Buffer, bytes: u64, what: &str| -> Result<()> {
            if b.size() < bytes {
                return Err(XentError::Shape(format!("{what} buffer has {} bytes, needs {bytes}", b.size())));
            }
            if !b.usage().contains(U::STORAGE) {
                return Err(XentError::InvalidOption(format!("{what} buffer lacks BufferUsages::STORAGE")));
            }
            Ok(())
        };
        check(logits, need, "logits")?;
        check(targets, n as u64 * 4, "targets")?;
        match (cfg.grad, grad) {
            (GradMode::Separate, Some(g)) => check(g, need, "gradient")?,
            (GradMode::Separate, None) => {
                return Err(XentError::InvalidOption("GradMode::Separate needs DeviceCe::grad".into()))
            }
            _ => {}
        }
        let grad = if cfg.grad == GradMode::Separate { grad } else { None };
        self.run_ce(Job { n, v, logits, targets: Some(targets), probs: None, ignore_index, grad, grad_host: None }, cfg)
    }

    /// Cross-entropy with probability targets `[N, V]` (soft labels; see
    /// [`crate::Cpu::cross_entropy_soft`] for the formula). The gradient, for
    /// `GradMode::Separate`, comes back as `CeOutput::grad`.
    pub fn cross_entropy_soft(
        &self,
        logits: ArrayView2<f32>,
        probs: ArrayView2<f32>,
        cfg: &CrossEntropy,
    ) -> Result<CeOutput> {
        crate::api::check::soft_inputs(logits.dim(), probs, cfg)?;
        let y = probs.as_standard_layout();
        let pb = self.upload(bytemuck::cast_slice(y.as_slice().expect("standard layout")), U::STORAGE, "probs")?;
        self.host_separate(logits, None, Some(pb), cfg)
    }
}
