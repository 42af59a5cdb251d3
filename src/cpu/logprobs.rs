//! Linear log-probs and entropies on the CPU: the chunk loop of the fused linear
//! cross-entropy (`super::linear`: `Z = H_c W^T + b`, then `G W`, `G^T H_c`, `colsum(G)`) with
//! a row kernel of its own in place of the cross-entropy: per row, the log-prob of the target
//! and the entropy, and (with an upstream gradient) `Z` overwritten by `G = d loss / d Z`.
//! The math is in [`LinearLogprobs`].

use rayon::prelude::*;

use super::linear::ChunkRun;
use super::linear_vocab::ShardSteps;
use super::{simd, Cpu};
use crate::api::linear::counted_rows;
use crate::api::logprobs::{check, counted, LinearLogprobsOutput, LogprobsCall};
use crate::error::Result;
use crate::parallel::vocab::{logprob_row, merge_logprobs, Sharded, LP_REC};

/// One row of logits `x` (overwritten): `(logp, H)` of `z = x * inv_t` for target `y`
/// (`None`: an ignored row, `(0, 0)`), and with `up = Some((a, b))` the row becomes
/// `G = d(a logp + b H) / dx` (0 for an ignored row). `e` is a scratch row of the same length.
pub(super) fn row_terms(
    x: &mut [f32],
    e: &mut [f32],
    y: Option<usize>,
    inv_t: f32,
    up: Option<(f32, f32)>,
) -> (f32, f32) {
    let Some(y) = y else {
        if up.is_some() {
            x.fill(0.0);
        }
        return (0.0, 0.0);
    };
    let (logp, entropy, stat) = logprob_row(&row_record(x, e, Some(y), inv_t));
    if let Some(up) = up {
        row_grad(x, e, Some(y), inv_t, stat, up);
    }
    (logp, entropy)
}

/// The record ([`LP_REC`]) of a row of logits `x` (a whole row or a vocabulary shard's part;
/// `y`: the target's column here, if here), leaving `z = x * inv_t` in `x` and
/// `exp(z_c - m)` in `e`.
fn row_record(x: &mut [f32], e: &mut [f32], y: Option<usize>, inv_t: f32) -> [f64; LP_REC] {
    if inv_t != 1.0 {
        x.iter_mut().for_each(|v| *v *= inv_t);
    }
    let m = simd::max(x);
    if x.is_empty() || m == f32::NEG_INFINITY {
        return [f64::NEG_INFINITY, 0.0, 0.0, y.map_or(0.0, |y| x[y] as f64)];
    }
    // sum_c exp(z_c - m) - 1: the sum over all but the max's occurrences, plus their count - 1.
    let (rest, ties) = simd::exp_sum(x, m, Some(&mut *e));
    let s = if m == f32::INFINITY { f64::NAN } else { rest + (ties - 1.0) };
    let c = simd::centred_sum(x, e, m);
    [m as f64, s, c, y.map_or(0.0, |y| x[y] as f64)]
}

/// `G = d(a logp + b H) / dx` over a row (or a shard's part) holding `z = x * inv_t` and
/// `e_c = exp(z_c - m)`, from the row's `(m, S, mu - m)` (see `logprob_row`); `y`: the
/// target's column here, if here.
fn row_grad(x: &mut [f32], e: &[f32], y: Option<usize>, inv_t: f32, (m, s, mu_m): (f64, f64, f64), (a, b): (f32, f32)) {
    // G_c = inv_t (a [c == y] - p_c (a + b ((z_c - m) - (mu - m)))), p_c = e_c / S.
    let k = (-(inv_t as f64) / s) as f32;
    simd::logprob_grad(x, e, m as f32, k, a, b, mu_m as f32);
    if let Some(y) = y {
        x[y] += inv_t * a;
    }
}

impl Cpu {
    /// [`Self::linear_logprobs`]'s work here (the public method: `crate::api::methods`).
    pub(crate) fn logprobs_run(&self, call: LogprobsCall<'_>) -> Result<LinearLogprobsOutput> {
        let c = check(&call, None)?;
        let LogprobsCall { hidden, weight, bias, targets, cfg, .. } = call;
        let (n, v) = (c.n, c.v);
        // Ignored rows are left out of the products (as LinearCe's are).
        let kept = counted_rows(&hidden, &targets, &c.lc);
        let run = ChunkRun {
            rows: c.lc.chunk_rows(n, v),
            kept: kept.as_deref(),
            grad_hidden: c.lc.grad_hidden,
            grad_weight: c.lc.grad_weight,
            grad_bias: c.lc.grad_bias,
        };
        let grads = c.any_grad(bias.is_some());
        let inv_t = 1.0 / cfg.temperature;
        let (mut logp, mut ent) = (vec![0f32; n], vec![0f32; n]);
        let out = self.linear_chunks(&hidden, &weight, bias, &run, |c0, _, idx, zc| {
            let batch_row = |i: usize| idx.map_or(c0 + i, |ix| ix[i]);
            let rows: Vec<(f32, f32)> = self.pool.install(|| {
                zc.par_chunks_mut(v.max(1))
                    .enumerate()
                    .map_init(
                        || vec![0f32; v],
                        |e, (i, x)| {
                            let r = batch_row(i);
                            let y = targets.get(r);
                            let y = (y != cfg.ignore_index).then_some(y as usize);
                            row_terms(x, e, y, inv_t, grads.then(|| c.upstream_at(r)))
                        },
                    )
                    .collect()
            });
            for (i, (lp, h)) in rows.into_iter().enumerate() {
                let r = batch_row(i);
                (logp[r], ent[r]) = (lp, h);
            }
            Ok(())
        })?;
        let gb = out.bias.map(|b| b.into_iter().map(|x| x as f32).collect());
        let count = counted(&targets, cfg.ignore_index);
        Ok(c.output((logp, ent), count, (out.hidden, out.weight, gb), hidden.dtype(), run.rows))
    }

    /// [`Self::linear_logprobs_vocab_parallel`]'s work here (the public method:
    /// `crate::api::methods`).
    pub(crate) fn logprobs_vocab(&self, call: LogprobsCall<'_>, sh: Sharded<'_>) -> Result<LinearLogprobsOutput> {
        let (LogprobsCall { hidden, weight, bias, targets, cfg, upstream }, Sharded { shard, comm }) = (call, sh);
        let checked = check(&call, Some(shard));
        let lc = cfg.linear_ce(upstream.is_some());
        let (vl, inv_t) = (weight.dim().0, 1.0 / cfg.temperature);
        // The target's column in this shard, if here (None also for an ignored row).
        let local = |r: usize| {
            let y = targets.get(r);
            (y != cfg.ignore_index && y >= shard.class0 as i64 && ((y as usize) - shard.class0) < vl)
                .then(|| y as usize - shard.class0)
        };
        let records = |_: &_, z: &mut [f32], r0: usize, rec: &mut [f64]| {
            if vl == 0 {
                // No classes here: every row's record is empty.
                return rec.chunks_mut(LP_REC).for_each(|r| r.copy_from_slice(&[f64::NEG_INFINITY, 0.0, 0.0, 0.0]));
            }
            self.pool.install(|| {
                rec.par_chunks_mut(LP_REC).zip(z.par_chunks_mut(vl.max(1))).enumerate().for_each_init(
                    || vec![0f32; vl],
                    |e, (i, (out, x))| out.copy_from_slice(&row_record(x, e, local(r0 + i), inv_t)),
                )
            })
        };
        let finish = |_: &_, rec: &[f64]| -> (Vec<f32>, Vec<f32>) {
            let row = |(r, x): (usize, &[f64])| {
                let (logp, entropy, _) = logprob_row(x);
                if targets.get(r) == cfg.ignore_index {
                    (0.0, 0.0)
                } else {
                    (logp, entropy)
                }
            };
            rec.chunks(LP_REC).enumerate().map(row).unzip()
        };
        let grad = |c: &crate::api::logprobs::Checked<'_>, _: &_, rec: &[f64], z: &mut [f32], r0: usize| {
            self.pool.install(|| {
                z.par_chunks_mut(vl.max(1)).zip(rec.par_chunks(LP_REC)).enumerate().for_each_init(
                    || vec![0f32; vl],
                    |e, (i, (x, r))| {
                        let row = r0 + i;
                        if targets.get(row) == cfg.ignore_index {
                            return x.fill(0.0);
                        }
                        let stat = logprob_row(r).2;
                        if inv_t != 1.0 {
                            x.iter_mut().for_each(|v| *v *= inv_t);
                        }
                        simd::exp_sum(x, stat.0 as f32, Some(&mut *e));
                        row_grad(x, e, local(row), inv_t, stat, c.upstream_at(row));
                    },
                )
            })
        };
        let steps = ShardSteps { width: LP_REC, merge: merge_logprobs, records, finish, grad };
        let (c, (logp, ent), g, rows) = self.vocab_passes((&hidden, &weight, bias), &lc, checked, comm, steps)?;
        let gb = g.bias.map(|b| b.into_iter().map(|x| x as f32).collect());
        let count = counted(&targets, cfg.ignore_index);
        Ok(c.output((logp, ent), count, (g.hidden, g.weight, gb), hidden.dtype(), rows))
    }
}
