//! Vocabulary-parallel cross-entropy on the CPU: this shard's row records in f64, one
//! all-reduce, and this shard's gradient (the shared logic is in [`crate::dist::vocab`]).

use ndarray::Axis;
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
        mut grad: Option<LogitsMut<'_>>,
    ) -> Result<CeOutput> {
        let (x, targets) = (logits.into(), targets.into());
        let (n, vl) = x.dim();
        let v = shard.classes;
        // Checks and this shard's records, then one agreement: a rank that fails here must
        // not leave the others waiting in the all-reduce.
        let local = self.vocab_records(&x, &targets, shard, cfg, grad.as_ref().map(|g| g.dim()));
        let (t, xf, mut rec) = crate::dist::agree(comm, local)?;
        comm.all_reduce_with(&mut rec, REC, merge)?;
        let cw = |c: usize| cfg.class_weight.as_ref().map_or(1.0, |w| w[c] as f64);
        let (smooth, c0) = (cfg.label_smoothing > 0.0, shard.class0);
        let fin = finish(&rec, &t, &targets, cfg, v);
        let (den_w, den_n) = (fin.den_w, fin.den_n);
        let (eps, zl, vf) = (cfg.label_smoothing as f64, cfg.z_loss as f64, v as f64);
        let wtot_global = if cfg.class_weight.is_some() { None } else { Some(vf) };
        if let Some(g) = grad.as_mut() {
            let gs = cfg.grad_scale as f64;
            let (a, b) = match cfg.reduction {
                Reduction::Mean => (gs / den_w, gs / den_n),
                _ => (gs, gs),
            };
            let mut out = ndarray::Array2::<f32>::zeros((n, vl));
            self.pool.install(|| {
                out.axis_iter_mut(Axis(0))
                    .into_par_iter()
                    .zip(xf.axis_iter(Axis(0)).into_par_iter())
                    .enumerate()
                    .for_each(|(i, (mut go, row))| {
                        let y = t[i];
                        if y == cfg.ignore_index {
                            return;
                        }
                        let r = &rec[i * REC..(i + 1) * REC];
                        let (m, s) = (r[0], r[1]);
                        let lse = m + s.ln_1p();
                        let sw = cfg.sample_weight.as_ref().map_or(1.0, |w| w[i] as f64);
                        let w = sw * cw(y as usize);
                        let wtot = wtot_global.unwrap_or(r[4]);
                        let hard = a * w * (1.0 - eps);
                        let c_s = if smooth { a * sw * eps / vf } else { 0.0 };
                        let k = hard + c_s * wtot + b * 2.0 * zl * lse;
                        for (j, (gv, &xv)) in go.iter_mut().zip(row.iter()).enumerate() {
                            let (z, d) = transform(xv as f64, cfg);
                            let c = c0 + j;
                            let p = (z - lse).exp();
                            let mut gr = k * p - c_s * cw(c);
                            if c == y as usize {
                                // p_t - 1 = (expm1(z_t - m) - s) / (1 + s): no cancellation when p_t ~ 1.
                                let pm1 = ((z - m).exp_m1() - s) / (1.0 + s);
                                gr = hard * pm1 + (k - hard) * p - c_s * cw(c);
                            }
                            *gv = (gr * d) as f32;
                        }
                    })
            });
            g.assign_f32(out.view());
        }
        Ok(fin.out)
    }

    /// The checks of [`Self::cross_entropy_vocab_parallel`] and this shard's record of every row.
    fn vocab_records(
        &self,
        x: &Logits<'_>,
        targets: &Targets<'_>,
        shard: VocabShard,
        cfg: &CrossEntropy,
        grad_dim: Option<(usize, usize)>,
    ) -> Result<(Vec<i64>, ndarray::Array2<f32>, Vec<f64>)> {
        let n = x.dim().0;
        let t = check(x.dim(), targets, shard, cfg, grad_dim)?;
        let cw = |c: usize| cfg.class_weight.as_ref().map_or(1.0, |w| w[c] as f64);
        let smooth = cfg.label_smoothing > 0.0;
        let xf = x.to_f32();
        let c0 = shard.class0;
        // This shard's record of every row.
        let mut rec = vec![0f64; n * REC];
        self.pool.install(|| {
            rec.par_chunks_mut(REC).zip(xf.axis_iter(Axis(0)).into_par_iter()).zip(t.par_iter()).for_each(
                |((r, row), &y)| {
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
                },
            )
        });
        Ok((t, xf, rec))
    }
}
