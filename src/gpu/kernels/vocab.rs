//! Vocabulary-parallel cross-entropy on the GPU (see [`crate::parallel::vocab`]): the row pass's
//! segment-statistic variant over this rank's shard writes each (row, segment) record (max,
//! sum, smoothing sums, and the target logit from the segment that holds it); the host merges
//! a row's segments and the ranks' records (one all-reduce) and finishes the loss; the
//! gradient pass then runs from the merged statistic, as a backward pass runs from a saved
//! one, with the global class count, class weights and denominators. Only 20 bytes per row
//! and segment come back to the host; the logits are read twice on the device.

use super::ce_io::{flags, CeParams, Seg, SCALARS};
use super::cross_entropy::{CePlan, ROW_VECTORS, SAVED};
use crate::api::config::{CallData, CeCall, CeOutput, CrossEntropy};
use crate::dtype::DType;
use crate::error::Result;
use crate::gpu::context::GpuContext;
use crate::gpu::launch::{Bind, Groups, Launch, ParamsCache, Recorder, Skip};

use crate::gpu::pool::Pooled;
use crate::gpu::variant::{Shader, Variant};
use crate::parallel::agree;
use crate::parallel::vocab::{check, finish, merge, Sharded, REC};

use wgpu::BufferUsages as U;

/// The device side of one call: the shard's plan and its uploaded logits and targets.
/// The device side of one shard's pass over a block of rows: the plan (its results and
/// uploaded weights) and the logits and targets it reads.
pub(crate) struct Shard<'b> {
    pub plan: CePlan,
    pub logits: &'b wgpu::Buffer,
    pub targets: &'b wgpu::Buffer,
    /// Sample weights bound instead of the plan's (a chunk's, copied in before each pass), so
    /// that one plan serves every chunk of its size.
    sample_weight: Option<&'b wgpu::Buffer>,
    /// Holds the last parameter blocks: they must outlive the submission that reads them
    /// (a pooled buffer dropped before it would go to another thread's dispatch).
    params: ParamsCache,
}

impl<'b> Shard<'b> {
    pub fn new(plan: CePlan, logits: &'b wgpu::Buffer, targets: &'b wgpu::Buffer) -> Self {
        Shard { plan, logits, targets, sample_weight: None, params: ParamsCache::new(true) }
    }

    /// Reads the sample weights from `sw` (at least the plan's rows), not from the plan.
    pub fn with_sample_weight(mut self, sw: Option<&'b wgpu::Buffer>) -> Self {
        self.sample_weight = sw;
        self
    }
}

impl Shard<'_> {
    /// The row pass over the shard (statistics, or the gradient from the merged statistic).
    fn launch<'a>(
        &'a self,
        variant: Variant,
        params: CeParams,
        grad: Option<(&'a Pooled, DType)>,
    ) -> Result<Launch<'a>> {
        let p = &self.plan;
        let mut l = Launch::new(p.ctx.kernel(Shader::CeFused, variant)?, params, p.n, p.v)
            .groups(Groups::PerRowTimes(p.parts))
            .bind(5, Bind::first(&p.scalars, SCALARS))
            .bind(6, Bind::first(&p.rows, p.rows_bytes()))
            .rows(1, self.logits, 0, p.dtype.size(), Skip::X)
            .bind(2, Bind::first(self.targets, p.n as u64 * 4));
        if let Some(cw) = p.class_weight.as_deref() {
            l = l.bind(3, Bind::all(cw));
        }
        if let Some(sw) = self.sample_weight.or(p.sample_weight.as_deref()) {
            l = l.bind(4, Bind::all(sw));
        }
        if let Some((g, d)) = grad {
            l = l.rows(8, g, 0, d.size(), Skip::O);
        }
        Ok(l)
    }

    fn variant(&self, seg: Seg, grad: bool, in_place: bool, output: DType) -> Variant {
        // Class targets; no ranks in a shard's passes.
        self.plan.row_variant(output, grad, in_place, self.plan.extras(false, false), seg)
    }

    fn params(&self, extra: u32) -> CeParams {
        let p = &self.plan;
        let shard = p.shard.expect("a shard plan");
        let mut base = p.base(false);
        base.head.flags &= !(flags::RANK | flags::GAP | flags::SAVE);
        base.head.flags |= flags::SHARD | extra;
        if self.sample_weight.is_some() {
            base.head.flags |= flags::SAMPLE_W;
        }
        let parts = p.parts as u32;
        CeParams {
            v_total: shard.classes as u32,
            class0: shard.class0 as u32,
            segs: parts,
            seg_len: p.seg_len as u32,
            parts,
            ..base
        }
    }

    /// Records the segment-statistic pass into `enc` (after what it holds), runs it, and
    /// returns this shard's record of every row (`REC` f64 each), its segments merged.
    pub fn records(&self, mut enc: wgpu::CommandEncoder) -> Result<Vec<f64>> {
        let p = &self.plan;
        let (n, parts) = (p.n, p.parts);
        let mut rec = vec![0f64; n * REC];
        if n == 0 {
            return Ok(rec);
        }
        let stat = self.launch(self.variant(Seg::Stat, false, false, DType::F32), self.params(0), None)?;
        let mut r = Recorder::new(&p.ctx);
        r.push(stat)?;
        let params = self.params.get(&r)?;
        r.record(&mut enc, &params)?;
        // Segment records: 5 f32 per (row, segment) after the row vectors and saved statistics.
        let mut raw = vec![0f32; 5 * n * parts];
        let offset = (ROW_VECTORS + SAVED) * n as u64 * 4;
        p.ctx.read_back(&p.rows, offset, bytemuck::cast_slice_mut(&mut raw), Some(enc))?;
        for (row, out) in rec.chunks_mut(REC).enumerate() {
            out.copy_from_slice(&[f64::NEG_INFINITY, 0.0, 0.0, 0.0, 0.0]);
            for g in raw[5 * row * parts..5 * (row + 1) * parts].chunks(5) {
                // Device order: max, sum, sum w z, sum w, target logit.
                merge(&[g[0] as f64, g[1] as f64, g[4] as f64, g[2] as f64, g[3] as f64], out);
            }
        }
        Ok(rec)
    }

    /// Records into `enc` the gradient of the batch's loss for these rows, from their merged
    /// records `rec` and the mean's denominators: into `dest` (a buffer and its dtype) or, with
    /// `None`, over the logits. `upstream`: these rows' upstream gradient (reduction `none`),
    /// which scales each row's gradient as a backward pass's does (`UP_ROWS`).
    pub fn record_grad(
        &self,
        enc: &mut wgpu::CommandEncoder,
        rec: &[f64],
        (den_w, den_n): (f64, f64),
        dest: Option<(&Pooled, DType)>,
        upstream: Option<&[f32]>,
    ) -> Result<()> {
        let p = &self.plan;
        if p.n == 0 || p.v == 0 {
            return Ok(());
        }
        // The merged statistic where a backward pass finds a saved one: max, sum, weight sum.
        let saved: Vec<f32> = rec.chunks(REC).flat_map(|r| [r[0] as f32, r[1] as f32, r[4] as f32]).collect();
        p.ctx.write(&p.rows, ROW_VECTORS * p.n as u64 * 4, bytemuck::cast_slice(&saved))?;
        let mut extra = flags::FROM_SAVED | flags::EXT_DENOM;
        if let Some(u) = upstream {
            // Where a backward pass finds per-row upstream values: row vector 4.
            p.ctx.write(&p.rows, 4 * p.n as u64 * 4, bytemuck::cast_slice(u))?;
            extra |= flags::UPSTREAM | flags::UP_ROWS;
        }
        let params = CeParams { den_w: den_w as f32, den_n: den_n as f32, ..self.params(extra) };
        let variant = match dest {
            Some((_, d)) => self.variant(Seg::Finish, true, false, d),
            None => self.variant(Seg::Finish, false, true, p.dtype),
        };
        let l = self.launch(variant, params, dest)?;
        let mut r = Recorder::new(&p.ctx);
        r.push(l)?;
        let pb = self.params.get(&r)?;
        r.record(enc, &pb)
    }
}

/// As one pass: a +inf logit makes its row NaN (the merged sum carries it).
pub(crate) fn poison_infinite(rec: &mut [f64]) {
    for r in rec.chunks_mut(REC) {
        if r[0] == f64::INFINITY {
            r[1] = f64::NAN;
        }
    }
}

impl GpuContext {
    /// [`Self::cross_entropy_vocab_parallel`]'s work here (the public method:
    /// `crate::api::methods`).
    pub(crate) fn ce_vocab(&self, call: CeCall<'_>, sh: Sharded<'_>, cfg: &CrossEntropy) -> Result<CeOutput> {
        let call_sw = call.data.sample_weight.clone();
        let ((x, targets, grad), Sharded { shard, comm }) = (call.read_into()?, sh);
        let (n, vl) = x.dim();
        // Checks, uploads and this shard's records; then one agreement, so that a rank that
        // fails here does not leave the others waiting in the all-reduce.
        let uploads = (|| -> Result<_> {
            let t = check(x.dim(), &targets, shard, cfg, grad.as_ref().map(|g| g.dim()))?;
            let ti = targets.device_classes(shard.classes, cfg.ignore_index)?;
            let logits = self.upload(&x.bytes(), U::STORAGE, "logits shard")?;
            let tb = self.upload(bytemuck::cast_slice(&ti), U::STORAGE, "targets")?;
            Ok((t, logits, tb))
        })();
        let local = match &uploads {
            Err(e) => Err(e.clone()),
            Ok((t, logits, tb)) => (|| {
                // The sample weights in the plan; the loss and its denominators come from the
                // merged records.
                let data = CallData { sample_weight: call_sw.clone(), ..CallData::default() };
                let plan = CePlan::new_shard(self, (n, vl, x.dtype()), cfg, &data, shard)?;
                let dev = Shard::new(plan, logits, tb);
                let rec = dev.records(self.device().create_command_encoder(&Default::default()))?;
                Ok((t.clone(), dev, rec))
            })(),
        };
        let (t, dev, mut rec) = agree(comm, local)?;
        comm.all_reduce_with(&mut rec, REC, merge)?;
        poison_infinite(&mut rec);
        let fin = finish(&rec, &t, &targets, cfg, shard.classes);
        let Some(dst) = grad else { return Ok(fin.out) };
        if n == 0 || vl == 0 {
            return Ok(fin.out);
        }
        let gdtype = dst.dtype();
        let gb = self.take((n * vl * gdtype.size()) as u64, U::STORAGE | U::COPY_SRC, "gradient shard")?;
        let mut enc = self.device().create_command_encoder(&Default::default());
        dev.record_grad(&mut enc, &rec, (fin.den_w, fin.den_n), Some((&gb, gdtype)), None)?;
        self.read_back_into(&gb, dst, Some(enc))?;
        Ok(fin.out)
    }
}
