//! Linear log-probs and entropies on the CPU: the chunk loop of the fused linear
//! cross-entropy (`super::linear`: `Z = H_c W^T + b`, then `G W`, `G^T H_c`, `colsum(G)`) with
//! a row kernel of its own in place of the cross-entropy: per row, the log-prob of the target
//! and the entropy, and (with an upstream gradient) `Z` overwritten by `G = d loss / d Z`.
//! The math is in [`LinearLogprobs`].

use ndarray::ArrayView1;
use rayon::prelude::*;

use super::linear::ChunkRun;
use super::{simd, Cpu};
use crate::api::linear::counted_rows;
use crate::api::logprobs::{check, counted, LinearLogprobs, LinearLogprobsOutput};
use crate::api::targets::Targets;
use crate::dtype::Logits;
use crate::error::Result;

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
    if inv_t != 1.0 {
        x.iter_mut().for_each(|v| *v *= inv_t);
    }
    let m = simd::max(x);
    // S = sum_c exp(z_c - m): the sum over all but the max's occurrences, plus their count.
    let (rest, ties) = simd::exp_sum(x, m, Some(&mut *e));
    let s = rest + ties;
    let log_s = s.ln();
    // mu - m = sum_c p_c (z_c - m) <= 0.
    let mu_m = simd::centred_sum(x, e, m) / s;
    let logp = ((x[y] - m) as f64 - log_s) as f32;
    let entropy = (log_s - mu_m) as f32;
    if let Some((a, b)) = up {
        // G_c = inv_t (a [c == y] - p_c (a + b ((z_c - m) - (mu - m)))), p_c = e_c / S.
        let k = (-(inv_t as f64) / s) as f32;
        let mu_m = mu_m as f32;
        simd::logprob_grad(x, e, m, k, a, b, mu_m);
        x[y] += inv_t * a;
    }
    (logp, entropy)
}

impl Cpu {
    /// Per-row log-probabilities of the targets and softmax entropies of
    /// `z = (hidden @ weight.T + bias) / temperature`, from hidden states `[N, D]` and the
    /// unembedding `weight [V, D]` (f32, f16 or bf16, one dtype; the products as in
    /// [`Cpu::linear_cross_entropy`]), never holding more than
    /// [`LinearLogprobs::chunk_rows`] rows of logits. With `upstream = Some((a, b))` (`[N]`
    /// each, finite) the gradients of `sum_n a_n logp_n + b_n H_n` w.r.t. hidden, weight and
    /// bias are returned as the options ask; with `None`, none. Rows whose target is
    /// `ignore_index` give 0 and no gradient. The math is in [`LinearLogprobs`].
    ///
    /// ```
    /// use ndarray::array;
    /// use xent::{Cpu, LinearLogprobs};
    /// let hidden = array![[1.0f32, 0.5], [-0.5, 2.0], [0.0, 1.0]];
    /// let weight = array![[0.2f32, -0.1], [0.4, 0.3], [-0.3, 0.8], [0.1, 0.1]];
    /// let cfg = LinearLogprobs::default().with_temperature(0.8);
    /// let (a, b) = (array![1.0f32, 1.0, 1.0], array![0.0f32, 0.01, 0.0]);
    /// let out = Cpu::new().linear_logprobs(&hidden, &weight, None, &[1i64, 2, -100][..], &cfg, Some((a.view(), b.view())))?;
    /// assert!(out.logprob[0] < 0.0 && out.entropy[0] > 0.0 && out.entropy[0] < 4f32.ln());
    /// assert_eq!((out.logprob[2], out.counted), (0.0, 2));
    /// assert_eq!(out.grad_weight.unwrap().dim(), (4, 2));
    /// # Ok::<(), xent::XentError>(())
    /// ```
    pub fn linear_logprobs<'a, 'b, 'c>(
        &self,
        hidden: impl Into<Logits<'a>>,
        weight: impl Into<Logits<'b>>,
        bias: Option<ArrayView1<'_, f32>>,
        targets: impl Into<Targets<'c>>,
        cfg: &LinearLogprobs,
        upstream: Option<(ArrayView1<'_, f32>, ArrayView1<'_, f32>)>,
    ) -> Result<LinearLogprobsOutput> {
        let (hidden, weight, targets) = (hidden.into(), weight.into(), targets.into());
        let c = check(&hidden, &weight, bias, &targets, cfg, upstream)?;
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
}
