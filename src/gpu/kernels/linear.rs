//! Fused linear cross-entropy on the GPU: per chunk of rows, `Z = H_c W^T + b` by the
//! product kernel (`super::matmul`, `shaders/matmul.wgsl`) into a `[chunk, V]` f32 workspace, xent's fused
//! cross-entropy over `Z` in place (a [`CePlan`] with the whole batch's mean denominators),
//! then `grad_hidden[c] = G W`, `grad_weight += G^T H_c` and `grad_bias += 1^T G` by the same
//! kernel. The vocabulary is walked in blocks that fit one storage binding, so the weight and
//! its gradient may be larger than a binding; chunks and blocks run in order, so the result is
//! the same bits on every run.

use std::collections::HashMap;

use ndarray::{Array1, ArrayView1};

use super::ce_io::SCALARS;
use super::cross_entropy::{CeBackward, CeInputs, CePlan, DeviceGrad, DeviceTargets, PendingCe, SAVED};
use crate::api::linear::{
    check, counted_rows, gather_batch, grad_dtype, scatter_rows, ChunkOutputs, LinearCall, LinearCe, LinearCeOutput,
};
use crate::api::targets::Targets;
use crate::dtype::{DType, Logits, Tensor2};
use crate::error::{Result, XentError};
use crate::gpu::context::GpuContext;
use crate::gpu::kernels::matmul_io::MatmulLayout;
use crate::gpu::launch::{Bind, Recorder};
use crate::gpu::pool::Pooled;

use super::matmul::{range, Operand, Product};

use wgpu::BufferUsages as U;

/// The device inputs of a fused linear cross-entropy (hidden `[N, D]`, weight `[V, D]` and
/// bias, uploaded) and how the vocabulary is walked (`block` weight rows per binding).
pub(super) struct LinearDev {
    pub hb: Pooled,
    pub wb: Pooled,
    pub bb: Option<Pooled>,
    pub d: usize,
    pub v: usize,
    pub dt: DType,
    pub block: usize,
}

/// Where the products of a chunk's gradient go.
pub(super) struct GradOut<'a> {
    pub gh: Option<&'a Pooled>,
    pub gw: Option<&'a Pooled>,
    pub gb: Option<&'a Pooled>,
    /// `[chunk]` ones (the bias gradient is `1^T G`).
    pub ones: &'a Pooled,
}

impl LinearDev {
    /// Uploads the inputs; `rows` is what the caller's workspace allows.
    pub fn new(
        ctx: &GpuContext,
        hidden: &Logits<'_>,
        weight: &Logits<'_>,
        bias: Option<ArrayView1<'_, f32>>,
    ) -> Result<LinearDev> {
        let (d, v) = (hidden.dim().1, weight.dim().0);
        let room = ctx.inner.max_binding.saturating_sub(ctx.inner.offset_align);
        // Vocabulary rows per block: one binding for the weight and its f32 gradient.
        // A multiple of 4 where it can be, so that every block starts 4-element aligned.
        let block = (room / (d as u64 * 4).max(1)) as usize;
        let block = if block >= 4 { block / 4 * 4 } else { block };
        if block == 0 {
            return Err(XentError::TooLarge {
                what: format!("one row of {d} features"),
                bytes: d as u64 * 4,
                limit: ctx.inner.max_binding,
            });
        }
        Ok(LinearDev {
            hb: ctx.upload(&hidden.bytes(), U::STORAGE, "hidden")?,
            wb: ctx.upload(&weight.bytes(), U::STORAGE, "weight")?,
            bb: bias.map(|b| ctx.upload(bytemuck::cast_slice(&b.to_vec()), U::STORAGE, "bias")).transpose()?,
            d,
            v,
            dt: hidden.dtype(),
            block,
        })
    }

    /// Rows per chunk for a workspace budget: also one binding for the logits and hidden rows.
    pub fn chunk_rows(&self, ctx: &GpuContext, budget_rows: usize) -> Result<usize> {
        let room = ctx.inner.max_binding.saturating_sub(ctx.inner.offset_align);
        let rows = budget_rows
            .min((room / (self.v as u64 * 4).max(1)) as usize)
            .min((room / (self.d as u64 * 4).max(1)) as usize);
        if rows == 0 {
            return Err(XentError::TooLarge {
                what: format!("one row of {} logits", self.v),
                bytes: self.v as u64 * 4,
                limit: ctx.inner.max_binding,
            });
        }
        Ok(rows)
    }

    /// Records `Z = H[r0 .. r0 + b] W^T (+ bias)` into `z` (`[b, V]` f32), block by block.
    pub fn record_logits<'a>(
        &'a self,
        ctx: &GpuContext,
        rec: &mut Recorder<'a>,
        z: &'a Pooled,
        r0: usize,
        b: usize,
    ) -> Result<()> {
        let (d, v, es, align) = (self.d, self.v, self.dt.size() as u64, ctx.inner.offset_align);
        let (h_bind, h_off) = range(&self.hb, es, (r0 * d) as u64, (b * d) as u64, align);
        for vb0 in (0..v).step_by(self.block) {
            let nb = (vb0 + self.block).min(v) - vb0;
            let (w_bind, w_off) = range(&self.wb, es, (vb0 * d) as u64, (nb * d) as u64, align);
            ctx.product(
                rec,
                Product {
                    layout: MatmulLayout::Nt,
                    mnk: (b, nb, d),
                    a: Operand { bind: h_bind, first: h_off, rs: d, dtype: self.dt },
                    b: Operand { bind: w_bind, first: w_off, rs: d, dtype: self.dt },
                    c: (Bind::all(z), vb0 as u32, v),
                    accumulate: false,
                    bias: self.bb.as_ref().map(|bb| (Bind::all(bb), vb0 as u32)),
                },
            )?;
        }
        Ok(())
    }

    /// Records the products of the gradient `G` in `z` (rows `r0 .. r0 + b`):
    /// `grad_hidden[rows] = G W`, `grad_weight (+)= G^T H`, `grad_bias (+)= 1^T G`.
    pub fn record_grads<'a>(
        &'a self,
        ctx: &GpuContext,
        rec: &mut Recorder<'a>,
        z: &'a Pooled,
        r0: usize,
        b: usize,
        out: &GradOut<'a>,
    ) -> Result<()> {
        let (d, v, es, align) = (self.d, self.v, self.dt.size() as u64, ctx.inner.offset_align);
        let (h_bind, h_off) = range(&self.hb, es, (r0 * d) as u64, (b * d) as u64, align);
        for vb0 in (0..v).step_by(self.block) {
            let nb = (vb0 + self.block).min(v) - vb0;
            // G (rows of z, the block's columns), read along its rows or its columns.
            let g = Operand { bind: Bind::all(z), first: vb0 as u32, rs: v, dtype: DType::F32 };
            if let Some(gh) = out.gh {
                let (w_bind, w_off) = range(&self.wb, es, (vb0 * d) as u64, (nb * d) as u64, align);
                let (c, c_off) = range(gh, 4, (r0 * d) as u64, (b * d) as u64, align);
                let p = Product {
                    layout: MatmulLayout::Nn,
                    mnk: (b, d, nb),
                    a: g,
                    b: Operand { bind: w_bind, first: w_off, rs: d, dtype: self.dt },
                    c: (c, c_off, d),
                    accumulate: vb0 > 0,
                    bias: None,
                };
                ctx.product(rec, p)?;
            }
            if let Some(gw) = out.gw {
                let (c, c_off) = range(gw, 4, (vb0 * d) as u64, (nb * d) as u64, align);
                let p = Product {
                    layout: MatmulLayout::Tn,
                    mnk: (nb, d, b),
                    a: g,
                    b: Operand { bind: h_bind, first: h_off, rs: d, dtype: self.dt },
                    c: (c, c_off, d),
                    accumulate: r0 > 0,
                    bias: None,
                };
                ctx.product(rec, p)?;
            }
            if let Some(gb) = out.gb {
                let p = Product {
                    layout: MatmulLayout::Nn,
                    mnk: (1, nb, b),
                    a: Operand { bind: Bind::all(out.ones), first: 0, rs: 0, dtype: DType::F32 },
                    b: g,
                    c: (Bind::all(gb), vb0 as u32, 0),
                    accumulate: r0 > 0,
                    bias: None,
                };
                ctx.product(rec, p)?;
            }
        }
        Ok(())
    }
}

impl GpuContext {
    /// Both of the above.
    pub(crate) fn linear_ce(&self, call: LinearCall<'_>, cfg: &LinearCe) -> Result<LinearCeOutput> {
        let (n, d, v) = check(&call, cfg)?;
        let totals = call.totals(cfg);
        let LinearCall { hidden, weight, bias, targets, sample_weight, upstream } = &call;
        let (hidden, weight, bias, targets, upstream) = (*hidden, *weight, *bias, *targets, *upstream);
        // Ignored rows cost nothing (as on the CPU): the counted ones go up as a batch of their
        // own, and their grad_hidden rows come back to their places (never with an upstream
        // gradient: that is reduction none, which keeps every row).
        if let Some(kept) = counted_rows(&hidden, &targets, cfg) {
            let (h, t, sw) = gather_batch(&hidden, &targets, *sample_weight, &kept);
            let kept_call = LinearCall::new(h.view(), weight, bias, t.view(), None, sw.as_ref());
            let mut out = self.linear_ce(kept_call, cfg)?;
            out.grad_hidden = out.grad_hidden.map(|g| scatter_rows(g, &kept, n)).transpose()?;
            return Ok(out);
        }
        // The device's targets are i32: an ignore_index outside i32 becomes i32::MIN there (the
        // targets were checked: every other one is a class index).
        let ignore_index = cfg.ce.ignore_index;
        let dev_ignore = i32::try_from(ignore_index).unwrap_or(i32::MIN);
        let dev = LinearDev::new(self, &hidden, &weight, bias)?;
        let rows = dev.chunk_rows(self, cfg.device_chunk_rows(n, v))?;
        let (dt, v64, d64) = (dev.dt, v as u64, d as u64);
        let per_row = cfg.ce.outputs.row_losses(cfg.ce.reduction);
        let any_grad = cfg.grad_hidden || cfg.grad_weight || (cfg.grad_bias && bias.is_some());
        let ti: Vec<i32> = match &targets {
            Targets::I64(t) => t.iter().map(|&y| if y == ignore_index { dev_ignore } else { y as i32 }).collect(),
            Targets::I32(t) => t.to_vec(),
            Targets::Probs(_) => unreachable!("checked: class indices"),
        };
        let tb = self.upload(bytemuck::cast_slice(&ti), U::STORAGE | U::COPY_SRC, "targets")?;
        let swb = sample_weight
            .map(|w| self.upload(bytemuck::cast_slice(&w.to_vec()), U::STORAGE | U::COPY_SRC, "sample weights"))
            .transpose()?;
        let chunk = rows.min(n).max(1) as u64;
        let z = self.take(chunk * v64 * 4, U::STORAGE | U::COPY_SRC, "linear workspace")?;
        let tchunk = self.take(chunk * 4, U::STORAGE | U::COPY_DST, "targets chunk")?;
        let swchunk =
            swb.as_ref().map(|_| self.take(chunk * 4, U::STORAGE | U::COPY_DST, "sample weights chunk")).transpose()?;
        let ones = self.upload(bytemuck::cast_slice(&vec![1f32; chunk as usize]), U::STORAGE, "ones")?;
        let out = |what: &str, bytes: u64| self.take(bytes, U::STORAGE | U::COPY_SRC, what);
        let gh = cfg.grad_hidden.then(|| out("grad_hidden", n as u64 * d64 * 4)).transpose()?;
        let gw = cfg.grad_weight.then(|| out("grad_weight", v64 * d64 * 4)).transpose()?;
        let gb = (cfg.grad_bias && bias.is_some()).then(|| out("grad_bias", v64 * 4)).transpose()?;
        // With an upstream gradient: all of it (the chunk's part is read by the backward pass),
        // and the room for a chunk's saved state between the loss and the backward pass.
        let up = match upstream.filter(|_| any_grad && n > 0) {
            Some(u) => {
                let ub = self.upload(bytemuck::cast_slice(&u.to_vec()), U::COPY_SRC, "upstream")?;
                let state = self.take(SCALARS + SAVED * chunk * 4, U::COPY_SRC | U::COPY_DST, "loss state")?;
                Some((ub, state))
            }
            None => None,
        };
        let mut plans: HashMap<usize, CePlan> = HashMap::new();
        let mut pending: Vec<PendingCe> = Vec::new();
        for r0 in (0..n).step_by(rows) {
            let r1 = (r0 + rows).min(n);
            let b = r1 - r0;
            let (r0u, bu) = (r0 as u64, b as u64);
            // The chunk's data (its sample weights are bound per chunk, below).
            let data = call.chunk_data(cfg, totals, Ok(r0..r1)).unweighted();
            let plan = match plans.entry(b) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(CePlan::new_pooled(self, (b, v, DType::F32), &cfg.ce, &data, dev_ignore)?)
                }
            };
            let plan = &*plan;
            let mut enc = self.device().create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&tb, r0u * 4, &tchunk, 0, bu * 4);
            if let (Some(src), Some(dst)) = (&swb, &swchunk) {
                enc.copy_buffer_to_buffer(src, r0u * 4, dst, 0, bu * 4);
            }
            let mut rec = Recorder::new(self);
            dev.record_logits(self, &mut rec, &z, r0, b)?;
            let params = rec.params_pooled()?;
            rec.record(&mut enc, &params)?;
            // The cross-entropy over Z, its gradient over Z.
            let (logits, targets) = (z.slice(..bu * v64 * 4), DeviceTargets::Classes(tchunk.slice(..bu * 4)));
            let sample_weight = swchunk.as_ref().map(|s| s.slice(..bu * 4));
            let grad = if any_grad && up.is_none() { DeviceGrad::InPlace } else { DeviceGrad::None };
            plan.record(&mut enc, CeInputs { logits, targets, sample_weight, grad })?;
            pending.push(plan.read_back(&mut enc, per_row)?);
            if let Some((ub, state)) = &up {
                // Reduction none: the backward pass from the saved statistic, each row's
                // gradient scaled by its upstream value (`UP_ROWS`).
                let state = state.slice(..plan.state_bytes());
                plan.save_state(&mut enc, state)?;
                let upstream = ub.slice(r0u * 4..r1 as u64 * 4);
                let back = CeBackward { logits, targets, sample_weight, state, upstream, grad: DeviceGrad::InPlace };
                plan.record_backward(&mut enc, back)?;
            }
            let mut rec = Recorder::new(self);
            let outs = GradOut { gh: gh.as_ref(), gw: gw.as_ref(), gb: gb.as_ref(), ones: &ones };
            dev.record_grads(self, &mut rec, &z, r0, b, &outs)?;
            let params = rec.params_pooled()?;
            rec.record(&mut enc, &params)?;
            // One submission per chunk, waited for: the workspace and plans are reused.
            let idx = self.submit(enc)?;
            self.wait(idx)?;
        }
        let mut outs = ChunkOutputs::new(cfg, n);
        for p in pending {
            outs.add(&p.wait()?);
        }
        let read2 = |buf: &Pooled, dim: (usize, usize)| -> Result<Tensor2> {
            let mut a = crate::alloc::zeros2::<f32>(dim, "gradient")?;
            self.read_back(buf, 0, bytemuck::cast_slice_mut(a.as_slice_mut().expect("fresh")), None)?;
            Ok(Tensor2::from_f32(a, grad_dtype(cfg, dt)))
        };
        let grad_hidden = gh.as_ref().map(|b| read2(b, (n, d))).transpose()?;
        let grad_weight = gw.as_ref().map(|b| read2(b, (v, d))).transpose()?;
        let grad_bias = gb
            .as_ref()
            .map(|b| -> Result<Array1<f32>> {
                let mut out = vec![0f32; v];
                self.read_back(b, 0, bytemuck::cast_slice_mut(&mut out), None)?;
                Ok(Array1::from(out))
            })
            .transpose()?;
        Ok(outs.finish(totals, (grad_hidden, grad_weight, grad_bias), rows.min(n)))
    }
}
