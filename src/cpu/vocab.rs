//! Vocabulary-parallel cross-entropy on the CPU: this shard's row records (the one-process
//! row kernels: f32 elements, f64 sums), one all-reduce, and this shard's gradient (the shared logic is in [`crate::parallel::vocab`]).
//! [`shard_records`] and [`shard_grad`] also serve the vocabulary-sharded linear
//! cross-entropy (`cpu/linear_vocab.rs`), one row chunk at a time.

use ndarray::{ArrayView2, ArrayViewMut2, Axis, CowArray, Ix2};
use rayon::prelude::*;

use super::{simd, Cpu};
use crate::api::config::{CeCall, CeOutput, CrossEntropy, Reduction};
use crate::dtype::{Logits, LogitsMut};
use crate::error::Result;
use crate::parallel::vocab::{check, finish, merge, Sharded, VocabShard, REC};

/// `softcap(x / T)` of a row into `buf` (the row itself when there is no transform).
fn transformed<'a>(x: &'a [f32], cfg: &CrossEntropy, buf: &'a mut Vec<f32>) -> &'a [f32] {
    if cfg.temperature == 1.0 && cfg.softcap.is_none() {
        return x;
    }
    let inv_t = 1.0 / cfg.temperature;
    buf.clear();
    match cfg.softcap {
        Some(c) => buf.extend(x.iter().map(|&v| c * (v * inv_t / c).tanh())),
        None => buf.extend(x.iter().map(|&v| v * inv_t)),
    }
    buf
}

/// This shard's record of each row of `x` (columns are classes `c0 ..`; `t` the rows' global
/// targets), `REC` f64 per row, into `rec`. The row kernels of the one-process path (f32
/// elements, f64 sums): max, then the exponential sum over all but one occurrence of it.
pub(crate) fn shard_records(x: ArrayView2<'_, f32>, t: &[i64], c0: usize, cfg: &CrossEntropy, rec: &mut [f64]) {
    let vl = x.ncols();
    let cw = cfg.class_weight.as_ref().map(|w| &w.as_slice().expect("contiguous class weights")[c0..c0 + vl]);
    let smooth = cfg.label_smoothing > 0.0;
    rec.par_chunks_mut(REC).zip(x.axis_iter(Axis(0)).into_par_iter()).zip(t.par_iter()).for_each_init(
        Vec::new,
        |buf, ((r, row), &y)| {
            let row = row.as_slice().expect("standard layout");
            let z = transformed(row, cfg, buf);
            let m = simd::max(z);
            let s = if vl == 0 || m == f32::NEG_INFINITY {
                0.0
            } else if m == f32::INFINITY {
                f64::NAN
            } else {
                let (s0, ties) = simd::exp_sum(z, m, None);
                s0 + (ties - 1.0)
            };
            let local = y - c0 as i64;
            let zt = if y >= 0 && local >= 0 && (local as usize) < vl { z[local as usize] as f64 } else { 0.0 };
            let (ax, ay) = if smooth { simd::weighted_sum(z, cw) } else { (0.0, 0.0) };
            let m = if vl == 0 { f64::NEG_INFINITY } else { m as f64 };
            r.copy_from_slice(&[m, s, zt, ax, ay]);
        },
    );
}

/// What [`shard_grad`] needs besides the rows: the shard, the merged records of the rows, the
/// first row's index in the batch (for sample weights), and the mean's denominators.
pub(crate) struct GradCtx<'a> {
    pub cfg: &'a CrossEntropy,
    pub shard: VocabShard,
    pub rec: &'a [f64],
    pub t: &'a [i64],
    pub row0: usize,
    pub den_w: f64,
    pub den_n: f64,
    /// A per-row upstream gradient of the whole batch (reduction `none`): row `row0 + i`'s
    /// gradient is scaled by its entry.
    pub upstream: Option<ndarray::ArrayView1<'a, f32>>,
}

/// Writes into `z` (rows `row0 ..` of the batch, this shard's columns) the gradient of the
/// batch's loss, from the rows' merged records and the logits `src` (`None`: `z` holds them
/// and is overwritten): the one-process row kernels with the global max, sum and class-weight
/// sum.
pub(crate) fn shard_grad(mut z: ArrayViewMut2<'_, f32>, src: Option<ArrayView2<'_, f32>>, g: &GradCtx<'_>) {
    let cfg = g.cfg;
    let (vl, c0) = (z.ncols(), g.shard.class0);
    let cw = cfg.class_weight.as_ref().map(|w| &w.as_slice().expect("contiguous class weights")[c0..c0 + vl]);
    let cw_at = |c: usize| cfg.class_weight.as_ref().map_or(1.0, |w| w[c] as f64);
    let (eps, zl, vf) = (cfg.label_smoothing as f64, cfg.z_loss as f64, g.shard.classes as f64);
    let gs = cfg.grad_scale as f64;
    let (a, b) = match cfg.reduction {
        Reduction::Mean => (gs / g.den_w, gs / g.den_n),
        _ => (gs, gs),
    };
    let transform = cfg.temperature != 1.0 || cfg.softcap.is_some();
    z.axis_iter_mut(Axis(0)).into_par_iter().enumerate().for_each_init(
        || (Vec::new(), Vec::new()),
        |(buf, zs): &mut (Vec<f32>, Vec<f32>), (i, mut row)| {
            let row = row.as_slice_mut().expect("standard layout");
            let x: &[f32] = match &src {
                Some(s) => s.row(i).to_slice().expect("standard layout"),
                None => {
                    // In place: the logits move to scratch before the row is overwritten.
                    zs.clear();
                    zs.extend_from_slice(row);
                    zs
                }
            };
            let y = g.t[i];
            if y == cfg.ignore_index {
                row.fill(0.0);
                return;
            }
            let up = g.upstream.map_or(1.0, |u| u[g.row0 + i] as f64);
            let (a, b) = (a * up, b * up);
            let r = &g.rec[i * REC..(i + 1) * REC];
            let (m, s) = (r[0], r[1]);
            let lse = m + s.ln_1p();
            let sw = cfg.data.sample_weight.as_ref().map_or(1.0, |w| w[g.row0 + i] as f64);
            let w = sw * cw_at(y as usize);
            let wtot = if cfg.class_weight.is_some() { r[4] } else { vf };
            let big_s = 1.0 + s;
            let hard = a * w * (1.0 - eps);
            let c_s = if eps > 0.0 { a * sw * eps / vf } else { 0.0 };
            let k = (hard + c_s * wtot + b * 2.0 * zl * lse) / big_s;
            // The transformed row (kept for the target and the chain rule).
            let zs = transformed(x, cfg, buf);
            simd::exp_sum(zs, m as f32, Some(row));
            simd::scale_shift(row, k as f32, c_s as f32, cw);
            let local = y - c0 as i64;
            if local >= 0 && (local as usize) < vl {
                // p_t - 1 = (expm1(z_t - m) - s) / (1 + s): no cancellation when p_t ~ 1.
                let zy = zs[local as usize] as f64;
                let ey = (zy - m).exp();
                let gy = hard * (((zy - m).exp_m1() - s) / big_s) + (k - hard / big_s) * ey - c_s * cw_at(y as usize);
                row[local as usize] = gy as f32;
            }
            if transform {
                let inv_t = 1.0 / cfg.temperature;
                match cfg.softcap {
                    Some(c) => row.iter_mut().zip(zs.iter()).for_each(|(g, &zv)| {
                        let th = zv / c;
                        *g *= (1.0 - th * th) * inv_t
                    }),
                    None => row.iter_mut().for_each(|g| *g *= inv_t),
                }
            }
        },
    );
}

impl Cpu {
    /// [`Self::cross_entropy_vocab_parallel`]'s work here (the public method:
    /// `crate::api::methods`).
    pub(crate) fn ce_vocab(&self, call: CeCall<'_>, sh: Sharded<'_>, cfg: &CrossEntropy) -> Result<CeOutput> {
        let ((x, targets, grad), Sharded { shard, comm }) = (call.read_into()?, sh);
        // Checks and this shard's records, then one agreement: a rank that fails here must
        // not leave the others waiting in the all-reduce.
        let local = check(x.dim(), &targets, shard, cfg, grad.as_ref().map(|g| g.dim())).map(|t| {
            // f32 logits in standard layout are read where they are; others widened once.
            let xf: CowArray<'_, f32, Ix2> = match &x {
                Logits::F32(a) if a.is_standard_layout() => CowArray::from(a.view()),
                other => CowArray::from(other.to_f32()),
            };
            let mut rec = vec![0f64; t.len() * REC];
            self.pool.install(|| shard_records(xf.view(), &t, shard.class0, cfg, &mut rec));
            (t, xf, rec)
        });
        let (t, xf, mut rec) = crate::parallel::agree(comm, local)?;
        comm.all_reduce_with(&mut rec, REC, merge)?;
        let fin = finish(&rec, &t, &targets, cfg, shard.classes);
        if let Some(mut g) = grad {
            let ctx =
                GradCtx { cfg, shard, rec: &rec, t: &t, row0: 0, den_w: fin.den_w, den_n: fin.den_n, upstream: None };
            match &mut g {
                // Straight into an f32 destination in standard layout.
                LogitsMut::F32(dst) if dst.is_standard_layout() => {
                    self.pool.install(|| shard_grad(dst.view_mut(), Some(xf.view()), &ctx))
                }
                _ => {
                    let mut tmp = xf.to_owned();
                    self.pool.install(|| shard_grad(tmp.view_mut(), None, &ctx));
                    g.assign_f32(tmp.view());
                }
            }
        }
        Ok(fin.out)
    }
}
