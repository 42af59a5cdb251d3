//! What vocabulary-parallel cross-entropy does the same on every backend (Megatron-LM's
//! layout, [`crate::Cpu::cross_entropy_vocab_parallel`] and, with the `gpu` feature,
//! `GpuContext::cross_entropy_vocab_parallel`): each rank holds the logits of a slice of the
//! vocabulary, `[N, V_local]`, and makes a record per row, `(max, sum, target logit,
//! sum w_c z_c, sum w_c)`; **one** all-reduce with `merge` combines them (the `(max, sum)`
//! pair merged as the kernels merge lanes, the rest summed). Every rank then knows each row's
//! log-sum-exp over the whole vocabulary, finishes the loss here, and writes its own slice of
//! the gradient with no further communication. Label smoothing uses the global `V` and the
//! global class-weight sum (exact, unlike a per-partition approximation).

use ndarray::Array1;

use crate::api::config::{CeOutput, CrossEntropy, Reduction, Totals};
use crate::api::linear::{LinearCall, LinearCe};
use crate::api::targets::Targets;
use crate::error::{Result, XentError};

/// Where a rank's logit shard sits in the vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VocabShard {
    /// Global index of the shard's first class.
    pub class0: usize,
    /// Classes of the whole vocabulary (`V`).
    pub classes: usize,
}

/// This rank's part of a vocabulary-parallel call, as each backend's implementation takes it:
/// where its shard sits in the vocabulary and the collective that joins the ranks.
#[derive(Clone, Copy)]
pub(crate) struct Sharded<'a> {
    pub shard: VocabShard,
    pub comm: &'a dyn super::Collective,
}

/// Floats per row record: max, sum (all but one occurrence of the max), target logit,
/// sum of class-weighted logits, sum of class weights.
pub(crate) const REC: usize = 5;

/// Merges two row records (the all-reduce's operation).
pub(crate) fn merge(x: &[f64], acc: &mut [f64]) {
    (acc[0], acc[1]) = merge_stat((acc[0], acc[1]), (x[0], x[1]));
    for k in 2..REC {
        acc[k] += x[k];
    }
}

/// Two `(max, sum of exp(z - max) over all but one occurrence of the max)` pairs merged
/// (`-inf`: no classes).
fn merge_stat((am, asum): (f64, f64), (bm, bsum): (f64, f64)) -> (f64, f64) {
    if bm == f64::NEG_INFINITY {
        (am, asum + bsum)
    } else if am == f64::NEG_INFINITY {
        (bm, asum + bsum)
    } else if am >= bm {
        (am, asum + (bsum + 1.0) * (bm - am).exp())
    } else {
        (bm, bsum + (asum + 1.0) * (am - bm).exp())
    }
}

/// Floats per row record of vocabulary-parallel log-probs and entropies
/// ([`crate::Cpu::linear_logprobs_vocab_parallel`]), of `z = x / T` over a shard: max `m`,
/// `s = sum_c exp(z_c - m) - 1` (as [`REC`]'s), `c = sum_c exp(z_c - m) (z_c - m)`, and the
/// target's `z` (from the shard that holds it; 0 elsewhere). A shard of no classes: `(-inf,
/// 0, 0, 0)`.
pub(crate) const LP_REC: usize = 4;

/// Merges two log-prob row records: `(m, s)` as [`merge`]'s, `c` moved to the merged max
/// (`sum e^(z - M) (z - M) = e^(m - M) (c + (m - M) (s + 1))`), target logits summed.
pub(crate) fn merge_logprobs(x: &[f64], acc: &mut [f64]) {
    let big = acc[0].max(x[0]);
    let moved = |r: &[f64]| {
        if r[0] == f64::NEG_INFINITY {
            0.0
        } else {
            (r[0] - big).exp() * (r[2] + (r[0] - big) * (r[1] + 1.0))
        }
    };
    acc[2] = moved(acc) + moved(x);
    (acc[0], acc[1]) = merge_stat((acc[0], acc[1]), (x[0], x[1]));
    acc[3] += x[3];
}

/// A row's log-prob and entropy from its (merged) record, and what its gradient needs:
/// `(logp, H, (m, S, mu - m))` with `S = sum_c exp(z_c - m)` and `mu = sum_c p_c z_c`
/// (`H = log S - (mu - m) >= 0`: every term of `c` is `<= 0`).
pub(crate) fn logprob_row(r: &[f64]) -> (f32, f32, (f64, f64, f64)) {
    let (m, s, c, zt) = (r[0], r[1], r[2], r[3]);
    let l1p = s.ln_1p();
    let big_s = 1.0 + s;
    let mu_m = c / big_s;
    (((zt - m) - l1p) as f32, (l1p - mu_m) as f32, (m, big_s, mu_m))
}

/// Checks that a shard of `vl` classes fits the vocabulary.
pub(crate) fn check_fits(vl: usize, shard: VocabShard) -> Result<()> {
    let v = shard.classes;
    if shard.class0 + vl > v {
        return Err(XentError::Shape(format!(
            "a shard of {vl} classes at {} passes the vocabulary's {v}",
            shard.class0
        )));
    }
    Ok(())
}

/// The checks of a vocabulary-parallel call; the targets as i64.
pub(crate) fn check(
    dim: (usize, usize),
    targets: &Targets<'_>,
    shard: VocabShard,
    cfg: &CrossEntropy,
    grad_dim: Option<(usize, usize)>,
) -> Result<Vec<i64>> {
    let (n, vl) = dim;
    let v = shard.classes;
    check_fits(vl, shard)?;
    if matches!(targets, Targets::Probs(_)) {
        return Err(XentError::InvalidOption("vocabulary-parallel cross-entropy takes class-index targets".into()));
    }
    if cfg.outputs.ranks || cfg.outputs.gaps {
        return Err(XentError::InvalidOption("target ranks and gaps are not computed vocabulary-parallel".into()));
    }
    crate::check::cross_entropy((n, v), targets, cfg)?;
    crate::check::class_targets(targets, v, cfg.ignore_index)?;
    if let Some(g) = grad_dim {
        if g != (n, vl) {
            return Err(XentError::Shape(format!("gradient {g:?} and logit shard {:?} differ in shape", (n, vl))));
        }
    }
    Ok(match targets {
        Targets::I64(t) => t.to_vec(),
        Targets::I32(t) => t.iter().map(|&y| y as i64).collect(),
        Targets::Probs(_) => unreachable!("checked"),
    })
}

/// The checks of a vocabulary-sharded fused linear cross-entropy (`hidden [N, D]`, this
/// shard's `weight [V_local, D]` and `bias [V_local]`, a per-row upstream gradient); the
/// targets as i64 and `(n, d, vl)`.
pub(crate) fn check_linear(
    call: &LinearCall<'_>,
    shard: VocabShard,
    cfg: &LinearCe,
) -> Result<(Vec<i64>, usize, usize, usize)> {
    let (n, d, vl) = crate::api::linear::check_operands(&call.hidden, &call.weight, call.bias, cfg)?;
    crate::api::linear::check_upstream(call.upstream, n, cfg)?;
    Ok((check((n, vl), &call.targets, shard, &cfg.ce, None)?, n, d, vl))
}

/// The loss from the merged records, and what the gradient needs.
pub(crate) struct Finished {
    pub out: CeOutput,
    /// Mean denominators (weight sum, counted rows) of the whole batch.
    pub den_w: f64,
    pub den_n: f64,
}

impl Finished {
    /// A vocabulary-parallel linear call's output: this loss, the gradients (hidden, this
    /// shard's weight and bias) and the rows of logits held at once.
    pub fn linear_output(
        self,
        grads: crate::api::linear::LinearGrads,
        chunk_rows: usize,
    ) -> crate::api::linear::LinearCeOutput {
        let (o, (grad_hidden, grad_weight, grad_bias)) = (self.out, grads);
        crate::api::linear::LinearCeOutput {
            loss: o.loss,
            counted: o.counted,
            weight_sum: o.weight_sum,
            row_loss: o.row_loss,
            row_lse: o.row_lse,
            row_rank: None,
            grad_hidden,
            grad_weight,
            grad_bias,
            chunk_rows,
        }
    }
}

/// Finishes the loss of the batch from the merged records (every rank, the same bits).
pub(crate) fn finish(rec: &[f64], t: &[i64], targets: &Targets<'_>, cfg: &CrossEntropy, v: usize) -> Finished {
    let n = t.len();
    let cw = |c: usize| cfg.class_weight.as_ref().map_or(1.0, |w| w[c] as f64);
    let totals = Totals::of(targets, cfg);
    let (den_w, den_n) = match cfg.data.totals {
        Some(t) => (t.weight_sum, t.counted as f64),
        None => (totals.weight_sum, totals.counted as f64),
    };
    let (eps, zl, vf) = (cfg.label_smoothing as f64, cfg.z_loss as f64, v as f64);
    let smooth = eps > 0.0;
    let (mut loss_w, mut lse2) = (0.0, 0.0);
    let mut row_loss = vec![0f32; n];
    let mut row_lse = vec![0f32; n];
    for (i, r) in rec.chunks(REC).enumerate() {
        let y = t[i];
        let lse = r[0] + r[1].ln_1p();
        row_lse[i] = lse as f32;
        if y == cfg.ignore_index {
            continue;
        }
        let sw = cfg.data.sample_weight.as_ref().map_or(1.0, |w| w[i] as f64);
        let w = sw * cw(y as usize);
        let wtot = if cfg.class_weight.is_some() { r[4] } else { vf };
        let mut l = w * (1.0 - eps) * (lse - r[2]);
        if smooth {
            l += sw * (eps / vf) * (wtot * lse - r[3]);
        }
        loss_w += l;
        lse2 += lse * lse;
        row_loss[i] = (l + zl * lse * lse) as f32;
    }
    let loss = match cfg.reduction {
        Reduction::Mean => loss_w / den_w + if zl > 0.0 { zl * lse2 / den_n } else { 0.0 },
        _ => loss_w + zl * lse2,
    };
    let per_row = cfg.outputs.row_losses(cfg.reduction);
    let out = CeOutput {
        loss,
        counted: totals.counted,
        weight_sum: totals.weight_sum,
        row_loss: per_row.then(|| Array1::from(row_loss)),
        row_lse: cfg.outputs.per_row.then(|| Array1::from(row_lse)),
        grad: None,
        row_max: None,
        row_rank: None,
        row_gap: None,
    };
    Finished { out, den_w, den_n }
}
