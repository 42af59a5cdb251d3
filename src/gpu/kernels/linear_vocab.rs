//! Fused linear cross-entropy with the weight split by vocabulary across ranks, on the GPU
//! (the CPU's `cpu/linear_vocab.rs` on the device): per chunk of rows, `Z = H_c W_shard^T + b`
//! by the tiled product kernel, then the shard's segment-statistic pass over `Z`
//! (`super::vocab::Shard`); one all-reduce of the rows' records; then per chunk `Z` again, the
//! gradient pass from the merged statistic over `Z` in place, and the three products.
//! `grad_hidden` is summed over ranks (a second collective).

use std::collections::hash_map::{Entry, HashMap};

use ndarray::Array1;

use super::cross_entropy::CePlan;
use super::linear::{GradOut, LinearDev};
use super::vocab::{poison_infinite, Shard};
use crate::api::config::CallData;
use crate::api::linear::{grad_dtype, LinearCall, LinearCe, LinearCeOutput};
use crate::dtype::{DType, Tensor2};
use crate::error::Result;
use crate::gpu::context::GpuContext;
use crate::gpu::launch::Recorder;
use crate::gpu::pool::Pooled;
use crate::parallel::agree;
use crate::parallel::vocab::{check_linear, finish, merge, Sharded, VocabShard, REC};

use wgpu::BufferUsages as U;

/// What both passes use: inputs on the device, targets, workspace.
struct Prep {
    t: Vec<i64>,
    n: usize,
    vl: usize,
    rows: usize,
    dev: LinearDev,
    tb: Pooled,
    z: Pooled,
    tchunk: Pooled,
    /// All sample weights, and a chunk's copy.
    sw: Option<(Pooled, Pooled)>,
    /// The per-row upstream gradient (reduction `none`).
    up: Option<Vec<f32>>,
}

impl GpuContext {
    /// Both of the above: each chunk's logits and records on the device, the collectives on
    /// the host.
    pub(crate) fn linear_vocab(&self, call: LinearCall<'_>, sh: Sharded<'_>, cfg: &LinearCe) -> Result<LinearCeOutput> {
        let Sharded { shard, comm } = sh;
        let LinearCall { hidden, weight, bias, targets, upstream, .. } = &call;
        let (bias, upstream) = (*bias, *upstream);
        // Checks, uploads and the first pass; then one agreement before any collective.
        let prep = (|| -> Result<Prep> {
            let (t, n, _, vl) = check_linear(&call, shard, cfg)?;
            let dev = LinearDev::new(self, hidden, weight, bias)?;
            let rows = dev.chunk_rows(self, cfg.device_chunk_rows(n, vl))?.min(n).max(1);
            let ti = targets.device_classes(shard.classes, cfg.ce.ignore_index)?;
            let tb = self.upload(bytemuck::cast_slice(&ti), U::STORAGE | U::COPY_SRC, "targets")?;
            let z = self.take((rows * vl.max(1) * 4) as u64, U::STORAGE | U::COPY_SRC, "linear workspace")?;
            let tchunk = self.take((rows * 4) as u64, U::STORAGE | U::COPY_DST, "targets chunk")?;
            let sw = match call.sample_weight {
                Some(w) => Some((
                    self.upload(bytemuck::cast_slice(&w.to_vec()), U::STORAGE | U::COPY_SRC, "sample weights")?,
                    self.take((rows * 4) as u64, U::STORAGE | U::COPY_DST, "sample weights chunk")?,
                )),
                None => None,
            };
            let up = upstream.map(|u| u.to_vec());
            Ok(Prep { t, n, vl, rows, dev, tb, z, tchunk, sw, up })
        })();
        let local = match &prep {
            Err(e) => Err(e.clone()),
            Ok(p) => self.shard_pass(p, cfg, shard, None),
        };
        let mut rec = agree(comm, local)?;
        let p = prep?;
        comm.all_reduce_with(&mut rec, REC, merge)?;
        poison_infinite(&mut rec);
        let fin = finish(&rec, &p.t, targets, &cfg.ce, shard.classes);
        let (n, d, vl) = (p.n, p.dev.d, p.vl);
        let out = |what: &str, bytes: usize| self.take(bytes.max(4) as u64, U::STORAGE | U::COPY_SRC, what);
        let gh = cfg.grad_hidden.then(|| out("grad_hidden", n * d * 4)).transpose()?;
        let gw = cfg.grad_weight.then(|| out("grad_weight", vl * d * 4)).transpose()?;
        let gb = (cfg.grad_bias && bias.is_some()).then(|| out("grad_bias", vl * 4)).transpose()?;
        if gh.is_some() || gw.is_some() || gb.is_some() {
            let ones = self.upload(bytemuck::cast_slice(&vec![1f32; p.rows]), U::STORAGE, "ones")?;
            let outs = GradOut { gh: gh.as_ref(), gw: gw.as_ref(), gb: gb.as_ref(), ones: &ones };
            self.shard_pass(&p, cfg, shard, Some((&rec, (fin.den_w, fin.den_n), &outs)))?;
        }
        let read = |buf: &Pooled, len: usize| -> Result<Vec<f32>> {
            let mut v = vec![0f32; len];
            if len > 0 {
                self.read_back(buf, 0, bytemuck::cast_slice_mut(&mut v), None)?;
            }
            Ok(v)
        };
        let gdt = grad_dtype(cfg, hidden.dtype());
        let tensor = |v: Vec<f32>, dim| Tensor2::from_f32(ndarray::Array2::from_shape_vec(dim, v).expect("shape"), gdt);
        // Every shard's share of d(loss)/d(hidden), summed.
        let grad_hidden = match &gh {
            Some(b) => {
                let mut v = read(b, n * d)?;
                comm.all_reduce_sum_f32(&mut v)?;
                Some(tensor(v, (n, d)))
            }
            None => None,
        };
        let grad_weight = gw.as_ref().map(|b| read(b, vl * d).map(|v| tensor(v, (vl, d)))).transpose()?;
        let grad_bias = gb.as_ref().map(|b| read(b, vl).map(Array1::from)).transpose()?;
        Ok(fin.linear_output((grad_hidden, grad_weight, grad_bias), p.rows))
    }

    /// One pass over the row chunks: `Z` for each, then its shard records (`grad: None`; the
    /// records are returned) or, from the merged records, its gradient over `Z` and the
    /// products (returns nothing).
    #[allow(clippy::type_complexity)]
    fn shard_pass(
        &self,
        p: &Prep,
        cfg: &LinearCe,
        shard: VocabShard,
        grad: Option<(&[f64], (f64, f64), &GradOut<'_>)>,
    ) -> Result<Vec<f64>> {
        let (n, vl) = (p.n, p.vl);
        let mut rec = Vec::new();
        if vl == 0 {
            // No classes here: each row's record is empty, and it adds no gradient.
            if grad.is_none() {
                rec = [f64::NEG_INFINITY, 0.0, 0.0, 0.0, 0.0].repeat(n);
            }
            return Ok(rec);
        }
        // One plan per chunk size (the last chunk may be shorter), its sample weights bound per
        // chunk: the loss and denominators come from the merged records, not the plan.
        let no_data = CallData::default();
        let mut shards: HashMap<usize, Shard<'_>> = HashMap::new();
        for r0 in (0..n).step_by(p.rows) {
            let r1 = (r0 + p.rows).min(n);
            let b = r1 - r0;
            let sh = match shards.entry(b) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    let plan = CePlan::new_shard(self, (b, vl, DType::F32), &cfg.ce, &no_data, shard)?;
                    let sw = p.sw.as_ref().map(|(_, chunk)| &**chunk);
                    e.insert(Shard::new(plan, &p.z, &p.tchunk).with_sample_weight(sw))
                }
            };
            let mut enc = self.device().create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&p.tb, (r0 * 4) as u64, &p.tchunk, 0, (b * 4) as u64);
            if let Some((all, chunk)) = &p.sw {
                enc.copy_buffer_to_buffer(all, (r0 * 4) as u64, chunk, 0, (b * 4) as u64);
            }
            let mut r = Recorder::new(self);
            p.dev.record_logits(self, &mut r, &p.z, r0, b)?;
            let params = r.params_pooled()?;
            r.record(&mut enc, &params)?;
            match grad {
                None => rec.extend(sh.records(enc)?),
                Some((merged, den, outs)) => {
                    let up = p.up.as_ref().map(|u| &u[r0..r1]);
                    sh.record_grad(&mut enc, &merged[r0 * REC..r1 * REC], den, None, up)?;
                    let mut r = Recorder::new(self);
                    p.dev.record_grads(self, &mut r, &p.z, r0, b, outs)?;
                    let params = r.params_pooled()?;
                    r.record(&mut enc, &params)?;
                    let idx = self.submit(enc)?;
                    self.wait(idx)?;
                }
            }
        }
        Ok(rec)
    }
}
