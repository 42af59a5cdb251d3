//! Fused linear cross-entropy with the weight split by vocabulary across ranks (Megatron-LM's
//! column-parallel output layer): every rank holds all of `hidden [N, D]` and the rows
//! `class0 ..` of the weight. Logits exist one row chunk of this shard at a time: a first pass
//! makes each row's record (`crate::parallel::vocab`), one all-reduce merges them, and a second
//! pass recomputes each chunk's logits, turns them into the gradient in place and takes the
//! three products, as Cut Cross-Entropy recomputes rather than stores. `grad_hidden` is this
//! shard's `G W` summed over ranks (a second collective, of `N x D` f32); `grad_weight` and
//! `grad_bias` are this shard's rows.

use std::borrow::Cow;

use ndarray::{ArrayView1, ArrayView2, ArrayViewMut2};

use super::linear::{add_col_sums, bf16_rows, fill_bias, widen_rows, ChunkGrads, RowSel, Rows, Weight};
use super::vocab::{shard_grad, shard_records, GradCtx};
use super::Cpu;
use crate::alloc::zeros2;
use crate::api::linear::{grad_dtype, LinearCall, LinearCe, LinearCeOutput};
use crate::dtype::{Logits, Tensor2};
use crate::error::Result;
use crate::parallel::vocab::{check_linear, finish, merge, Finished, Sharded, REC};
use crate::parallel::{agree, Collective, Merge};

/// What the two passes share: the inputs as the products read them and the workspaces.
struct Passes<'p, 'h> {
    cpu: &'p Cpu,
    hidden: &'p Logits<'h>,
    w: &'p Weight<'p>,
    bias: Option<&'p [f32]>,
    d: usize,
    vl: usize,
    rows: usize,
}

impl Passes<'_, '_> {
    /// Logits of rows `r0..r1` of this shard into `z` (`[r1 - r0, V_local]`); the chunk's
    /// hidden rows (f32 in `h_buf`, or bf16 for the bf16 products) are returned for the products.
    fn logits<'b>(
        &'b self,
        r0: usize,
        r1: usize,
        z: &mut [f32],
        h_buf: &'b mut [f32],
        hb: &'b mut Vec<u16>,
    ) -> Rows<'b> {
        let (b, d, vl) = (r1 - r0, self.d, self.vl);
        let h = if self.w.bf16() {
            Rows::Bf16(self.cpu.pool.install(|| bf16_rows(self.hidden, RowSel::Range(r0, r1), hb)))
        } else {
            let h = &mut h_buf[..b * d];
            widen_rows(self.hidden, r0, r1, h);
            Rows::F32(h)
        };
        if let Some(bias) = self.bias {
            self.cpu.pool.install(|| fill_bias(z, bias));
        }
        let threads = self.cpu.threads();
        self.cpu.pool.install(|| self.w.logits(threads, (b, vl, d), z, self.bias.is_some(), h));
        h
    }
}

/// What a vocabulary-sharded fused linear loss does in [`Cpu::vocab_passes`], given what this
/// rank's checks returned (`T`): each chunk's records of this shard (`records(t, z, r0, rec)`,
/// `z` the chunk's logits of rows `r0 ..`, scratch), how two ranks' records of a row merge
/// (`width` f64 each), what the merged records of the batch give (`finish`), and each chunk's
/// gradient over its logits, in place (`grad(t, finished, rec, z, r0)`).
pub(super) struct ShardSteps<R, F, G> {
    pub width: usize,
    pub merge: Merge,
    pub records: R,
    pub finish: F,
    pub grad: G,
}

impl Cpu {
    /// The two passes of a vocabulary-sharded fused linear loss over this rank's `weight
    /// [V_local, D]` (and bias): per chunk of rows `Z = H_c W^T + b` and its records; one
    /// agreement on this rank's checks (`checked`) and workspaces, one all-reduce of the
    /// records; then per chunk `Z` again, the gradient over it and the products, where `lc`
    /// asks for gradients; `grad_hidden` summed over the ranks. Returns the checks' value,
    /// what `finish` made of the merged records, the f32 gradients and the rows per chunk.
    pub(super) fn vocab_passes<T, X, R, F, G>(
        &self,
        (hidden, weight, bias): (&Logits<'_>, &Logits<'_>, Option<ArrayView1<'_, f32>>),
        lc: &LinearCe,
        checked: Result<T>,
        comm: &dyn Collective,
        steps: ShardSteps<R, F, G>,
    ) -> Result<(T, X, ChunkGrads, usize)>
    where
        R: Fn(&T, &mut [f32], usize, &mut [f64]),
        F: FnOnce(&T, &[f64]) -> X,
        G: Fn(&T, &X, &[f64], &mut [f32], usize),
    {
        let (n, d) = hidden.dim();
        let vl = weight.dim().0;
        let width = steps.width;
        let wants = lc.grad_hidden || lc.grad_weight || (lc.grad_bias && bias.is_some());
        let bias_c = bias.map(|b| b.to_vec());
        // Checks, workspaces and the first pass; then one agreement before any collective.
        // The weight as the products read it (a bad XENT_CPU_MATMUL is this rank's error).
        let mut w_err = None;
        let w = self
            .linear_matmul(hidden.dtype())
            .and_then(|path| Weight::new(weight, path, lc.grad_hidden, self.bf16_grad_terms()?))
            .unwrap_or_else(|e| {
                w_err = Some(e);
                Weight::F32(Cow::Borrowed(&[]))
            });
        let local = (|| -> Result<_> {
            if let Some(e) = w_err.take() {
                return Err(e);
            }
            let t = checked?;
            let rows = lc.chunk_rows(n, vl).min(n).max(1);
            let mut z = zeros2::<f32>((rows, vl), "linear workspace")?;
            let mut h_buf = zeros2::<f32>((if w.bf16() { 0 } else { rows }, d), "hidden chunk")?;
            let mut hb = Vec::new();
            let gh = if lc.grad_hidden { Some(zeros2::<f32>((n, d), "grad_hidden")?) } else { None };
            let gw = if lc.grad_weight { Some(zeros2::<f32>((vl, d), "grad_weight")?) } else { None };
            let p = Passes { cpu: self, hidden, w: &w, bias: bias_c.as_deref(), d, vl, rows };
            let mut rec = vec![0f64; n * width];
            for r0 in (0..n).step_by(rows) {
                let r1 = (r0 + rows).min(n);
                let zc = &mut z.as_slice_mut().expect("fresh")[..(r1 - r0) * vl];
                p.logits(r0, r1, zc, h_buf.as_slice_mut().expect("fresh"), &mut hb);
                (steps.records)(&t, zc, r0, &mut rec[r0 * width..r1 * width]);
            }
            Ok((p, t, z, h_buf, hb, gh, gw, rec))
        })();
        let (p, t, mut z, mut h_buf, mut hb, mut gh, mut gw, mut rec) = agree(comm, local)?;
        comm.all_reduce_with(&mut rec, width, steps.merge)?;
        let fin = (steps.finish)(&t, &rec);
        let mut gb = (lc.grad_bias && bias.is_some()).then(|| vec![0f64; vl]);
        if wants {
            let threads = self.threads();
            for r0 in (0..n).step_by(p.rows) {
                let r1 = (r0 + p.rows).min(n);
                let b = r1 - r0;
                let zc = &mut z.as_slice_mut().expect("fresh")[..b * vl];
                let h = p.logits(r0, r1, zc, h_buf.as_slice_mut().expect("fresh"), &mut hb);
                (steps.grad)(&t, &fin, &rec[r0 * width..r1 * width], zc, r0);
                let g: &[f32] = zc;
                if let Some(gh) = gh.as_mut() {
                    let dst = &mut gh.as_slice_mut().expect("fresh")[r0 * d..r1 * d];
                    self.pool.install(|| w.hidden_grad(threads, (b, d, vl), dst, g));
                }
                if let Some(gw) = gw.as_mut() {
                    let dst = gw.as_slice_mut().expect("fresh");
                    self.pool.install(|| w.weight_grad(threads, (vl, d, b), dst, r0 > 0, g, h));
                }
                if let Some(gb) = gb.as_mut() {
                    self.pool.install(|| add_col_sums(gb, g));
                }
            }
        }
        // Every shard's share of d(loss)/d(hidden), summed.
        if let Some(gh) = gh.as_mut() {
            comm.all_reduce_sum_f32(gh.as_slice_mut().expect("fresh"))?;
        }
        Ok((t, fin, ChunkGrads { hidden: gh, weight: gw, bias: gb }, p.rows))
    }

    /// Both of the above: each chunk's products and shard records on the thread pool.
    pub(crate) fn linear_vocab(&self, call: LinearCall<'_>, sh: Sharded<'_>, cfg: &LinearCe) -> Result<LinearCeOutput> {
        let Sharded { shard, comm } = sh;
        let LinearCall { hidden, weight, bias, targets, upstream, .. } = &call;
        let (bias, upstream) = (*bias, *upstream);
        let checked = check_linear(&call, shard, cfg).map(|(t, ..)| t);
        let records = |t: &Vec<i64>, z: &mut [f32], r0: usize, rec: &mut [f64]| {
            let (b, vl) = (rec.len() / REC, weight.dim().0);
            let zv = ArrayView2::from_shape((b, vl), &*z).expect("chunk");
            self.pool.install(|| shard_records(zv, &t[r0..r0 + b], shard.class0, &cfg.ce, rec))
        };
        let finish = |t: &Vec<i64>, rec: &[f64]| finish(rec, t, targets, &cfg.ce, shard.classes);
        let grad = |t: &Vec<i64>, fin: &Finished, rec: &[f64], z: &mut [f32], r0: usize| {
            let b = rec.len() / REC;
            let ctx = GradCtx {
                cfg: &cfg.ce,
                shard,
                rec,
                t: &t[r0..r0 + b],
                row0: r0,
                den_w: fin.den_w,
                den_n: fin.den_n,
                upstream,
            };
            let zv = ArrayViewMut2::from_shape((b, z.len() / b.max(1)), z).expect("chunk");
            self.pool.install(|| shard_grad(zv, None, &ctx))
        };
        let steps = ShardSteps { width: REC, merge, records, finish, grad };
        let (_, fin, g, rows) = self.vocab_passes((hidden, weight, bias), cfg, checked, comm, steps)?;
        let (gh, gw, gb) = (g.hidden, g.weight, g.bias);
        let gdt = grad_dtype(cfg, hidden.dtype());
        let gb = gb.map(|b| b.into_iter().map(|x| x as f32).collect());
        Ok(fin.linear_output((gh.map(|a| Tensor2::from_f32(a, gdt)), gw.map(|a| Tensor2::from_f32(a, gdt)), gb), rows))
    }
}
