//! Vocabulary-parallel cross-entropy on the CPU: this shard's row records in f64, one
//! all-reduce, and this shard's gradient (the shared logic is in [`crate::dist::vocab`]).
//! [`shard_records`] and [`shard_grad`] also serve the vocabulary-sharded linear
//! cross-entropy (`cpu/linear_vocab.rs`), one row chunk at a time.

use ndarray::{ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;

use super::Cpu;
use crate::api::config::{CeOutput, CrossEntropy, Reduction};
use crate::api::targets::Targets;
use crate::dist::vocab::{check, finish, merge, VocabShard, REC};
use crate::dist::Collective;
use crate::dtype::{Logits, LogitsMut};
use crate::error::Result;

/// `z = softcap(x / T)` and `dz/dx`.
fn transform(x: f64, cfg: &CrossEntropy) -> (f64, f64) {
    let mut z = x / cfg.temperature as f64;
    let mut d = 1.0 / cfg.temperature as f64;
    if let Some(c) = cfg.softcap {
        let c = c as f64;
        let t = (z / c).tanh();
        z = c * t;
        d *= 1.0 - t * t;
    }
    (z, d)
}

/// This shard's record of each row of `x` (columns are classes `c0 ..`; `t` the rows' global
/// targets), `REC` f64 per row, into `rec`.
pub(crate) fn shard_records(x: ArrayView2<'_, f32>, t: &[i64], c0: usize, cfg: &CrossEntropy, rec: &mut [f64]) {
    let cw = |c: usize| cfg.class_weight.as_ref().map_or(1.0, |w| w[c] as f64);
    let smooth = cfg.label_smoothing > 0.0;
    rec.par_chunks_mut(REC).zip(x.axis_iter(Axis(0)).into_par_iter()).zip(t.par_iter()).for_each(|((r, row), &y)| {
        let (mut m, mut s) = (f64::NEG_INFINITY, 0.0);
        let (mut zt, mut ax, mut ay) = (0.0, 0.0, 0.0);
        for (j, &xv) in row.iter().enumerate() {
            let (z, _) = transform(xv as f64, cfg);
            if z == f64::NEG_INFINITY {
                continue;
            }
            if z > m {
                s = if m == f64::NEG_INFINITY { 0.0 } else { (s + 1.0) * (m - z).exp() };
                m = z;
            } else {
                s += (z - m).exp();
            }
            if y >= 0 && (y as usize) == c0 + j {
                zt = z;
            }
            if smooth {
                let w = cw(c0 + j);
                ax += w * z;
                ay += w;
            }
        }
        if m == f64::INFINITY {
            s = f64::NAN;
        }
        r.copy_from_slice(&[m, s, zt, ax, ay]);
    });
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
}

/// Overwrites the logits `z` (rows `row0 ..` of the batch, this shard's columns) with the
/// gradient of the batch's loss, from the rows' merged records.
pub(crate) fn shard_grad(mut z: ArrayViewMut2<'_, f32>, g: &GradCtx<'_>) {
    let cfg = g.cfg;
    let cw = |c: usize| cfg.class_weight.as_ref().map_or(1.0, |w| w[c] as f64);
    let (eps, zl, vf) = (cfg.label_smoothing as f64, cfg.z_loss as f64, g.shard.classes as f64);
    let smooth = eps > 0.0;
    let gs = cfg.grad_scale as f64;
    let (a, b) = match cfg.reduction {
        Reduction::Mean => (gs / g.den_w, gs / g.den_n),
        _ => (gs, gs),
    };
    let c0 = g.shard.class0;
    z.axis_iter_mut(Axis(0)).into_par_iter().enumerate().for_each(|(i, mut row)| {
        let y = g.t[i];
        if y == cfg.ignore_index {
            row.fill(0.0);
            return;
        }
        let r = &g.rec[i * REC..(i + 1) * REC];
        let (m, s) = (r[0], r[1]);
        let lse = m + s.ln_1p();
        let sw = cfg.sample_weight.as_ref().map_or(1.0, |w| w[g.row0 + i] as f64);
        let w = sw * cw(y as usize);
        let wtot = if cfg.class_weight.is_some() { r[4] } else { vf };
        let hard = a * w * (1.0 - eps);
        let c_s = if smooth { a * sw * eps / vf } else { 0.0 };
        let k = hard + c_s * wtot + b * 2.0 * zl * lse;
        for (j, gv) in row.iter_mut().enumerate() {
            let (zv, d) = transform(*gv as f64, cfg);
            let c = c0 + j;
            let p = (zv - lse).exp();
            let mut gr = k * p - c_s * cw(c);
            if c == y as usize {
                // p_t - 1 = (expm1(z_t - m) - s) / (1 + s): no cancellation when p_t ~ 1.
                let pm1 = ((zv - m).exp_m1() - s) / (1.0 + s);
                gr = hard * pm1 + (k - hard) * p - c_s * cw(c);
            }
            *gv = (gr * d) as f32;
        }
    });
}

impl Cpu {
    /// Cross-entropy over a vocabulary split across the ranks of `comm`: this rank's logits
    /// `[N, V_local]` cover classes `shard.class0 ..` of `shard.classes`; `targets [N]` are
    /// global class indices (the same on every rank). Every [`CrossEntropy`] option with class
    /// targets applies (class weights are the global `[V]`). Returns the whole batch's loss on
    /// every rank and, into `grad` (this rank's `[N, V_local]`), this shard's gradient. One
    /// all-reduce of five f64 per row.
    ///
    /// ```
    /// use ndarray::array;
    /// use xent::{dist::SingleProcess, cpu::VocabShard, Cpu, CrossEntropy};
    /// let x = array![[2.0f32, 0.5, -1.0], [0.1, 0.2, 0.3]];
    /// let shard = VocabShard { class0: 0, classes: 3 };
    /// let out = Cpu::new().cross_entropy_vocab_parallel(&x, &[0i64, 2][..], shard, &CrossEntropy::default(), &SingleProcess, None)?;
    /// let whole = Cpu::new().cross_entropy(&x, &[0i64, 2][..], &CrossEntropy::default())?;
    /// assert!((out.loss - whole.loss).abs() < 1e-6);
    /// # Ok::<(), xent::XentError>(())
    /// ```
    pub fn cross_entropy_vocab_parallel<'a, 'b>(
        &self,
        logits: impl Into<Logits<'a>>,
        targets: impl Into<Targets<'b>>,
        shard: VocabShard,
        cfg: &CrossEntropy,
        comm: &dyn Collective,
        grad: Option<LogitsMut<'_>>,
    ) -> Result<CeOutput> {
        let (x, targets) = (logits.into(), targets.into());
        // Checks and this shard's records, then one agreement: a rank that fails here must
        // not leave the others waiting in the all-reduce.
        let local = check(x.dim(), &targets, shard, cfg, grad.as_ref().map(|g| g.dim())).map(|t| {
            let xf = x.to_f32();
            let mut rec = vec![0f64; t.len() * REC];
            self.pool.install(|| shard_records(xf.view(), &t, shard.class0, cfg, &mut rec));
            (t, xf, rec)
        });
        let (t, mut xf, mut rec) = crate::dist::agree(comm, local)?;
        comm.all_reduce_with(&mut rec, REC, merge)?;
        let fin = finish(&rec, &t, &targets, cfg, shard.classes);
        if let Some(mut g) = grad {
            let ctx = GradCtx { cfg, shard, rec: &rec, t: &t, row0: 0, den_w: fin.den_w, den_n: fin.den_n };
            self.pool.install(|| shard_grad(xf.view_mut(), &ctx));
            g.assign_f32(xf.view());
        }
        Ok(fin.out)
    }
}
