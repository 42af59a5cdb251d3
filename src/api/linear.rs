//! Fused linear cross-entropy: `F.cross_entropy(hidden @ weight.T + bias, targets)` and its
//! gradients w.r.t. `hidden`, `weight` and `bias`, without an `[N, V]` tensor: the logits exist
//! one row chunk at a time in a workspace of bounded size (see [`LinearCe::workspace_bytes`]).

use ndarray::{Array1, ArrayView1};

pub(crate) use crate::api::config::LinearCe;
use crate::api::config::{CallData, CeOutput, CeOutputs, CrossEntropy, Reduction, Totals};
use crate::api::targets::Targets;
use crate::dtype::{DType, Logits, Tensor2};
use crate::error::{Result, XentError};

/// What a fused linear cross-entropy returns (`#[non_exhaustive]`: later versions may return
/// more).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LinearCeOutput {
    /// The reduced loss (the sum of per-row losses for `Reduction::None`).
    pub loss: f64,
    /// Rows not ignored.
    pub counted: u64,
    /// Their weight sum (the mean's denominator).
    pub weight_sum: f64,
    /// Per-row losses (with `ce.per_row` or reduction `none`).
    pub row_loss: Option<Array1<f32>>,
    /// Per-row log-sum-exp (with `ce.per_row`).
    pub row_lse: Option<Array1<f32>>,
    /// Per-row rank of the target (`u32::MAX` for ignored rows), with `ce.ranks`.
    pub row_rank: Option<Array1<u32>>,
    /// d(loss)/d(hidden) `[N, D]`.
    pub grad_hidden: Option<Tensor2>,
    /// d(loss)/d(weight) `[V, D]`.
    pub grad_weight: Option<Tensor2>,
    /// d(loss)/d(bias) `[V]`.
    pub grad_bias: Option<Array1<f32>>,
    /// Rows of logits the call held at once.
    pub chunk_rows: usize,
}

impl From<LinearCeOutput> for CeOutput {
    /// The scored rows of a fused linear cross-entropy as a [`CeOutput`] (loss, counts, per-row
    /// losses, log-sum-exps and ranks; no gradient), for code that consumes cross-entropy
    /// results (`sequence::CorpusEval::add_scored`).
    fn from(o: LinearCeOutput) -> CeOutput {
        CeOutput {
            loss: o.loss,
            counted: o.counted,
            weight_sum: o.weight_sum,
            row_loss: o.row_loss,
            row_lse: o.row_lse,
            grad: None,
            row_max: None,
            row_rank: o.row_rank,
            row_gap: None,
        }
    }
}

impl Totals {
    /// Counted rows and their weight sum for class-index `targets` under `cfg` (probability
    /// targets: every row counts, with its sample weight).
    ///
    /// ```
    /// use xent::{CrossEntropy, Totals};
    /// let t = Totals::of(&(&[0i64, -100, 2][..]).into(), &CrossEntropy::default());
    /// assert_eq!((t.counted, t.weight_sum), (2, 2.0));
    /// ```
    pub fn of(targets: &Targets<'_>, cfg: &CrossEntropy) -> Totals {
        Totals::weighted(targets, cfg, cfg.data.sample_weight.as_ref().map(|w| w.view()))
    }

    /// [`Self::of`] with the sample weights `sample_weight` (a call's, beside the definition).
    pub(crate) fn weighted(
        targets: &Targets<'_>,
        cfg: &CrossEntropy,
        sample_weight: Option<ArrayView1<'_, f32>>,
    ) -> Totals {
        let mut out = Totals::default();
        let mut add = |r: usize, y: Option<i64>| {
            let sw = sample_weight.as_ref().map_or(1.0, |w| w[r] as f64);
            let cw = match (y, &cfg.class_weight) {
                (Some(y), Some(w)) if y >= 0 && (y as usize) < w.len() => w[y as usize] as f64,
                _ => 1.0,
            };
            out.counted += 1;
            out.weight_sum += sw * cw;
        };
        match targets {
            Targets::I64(t) => {
                t.iter().enumerate().filter(|(_, &y)| y != cfg.ignore_index).for_each(|(r, &y)| add(r, Some(y)))
            }
            Targets::I32(t) => t
                .iter()
                .enumerate()
                .filter(|(_, &y)| y as i64 != cfg.ignore_index)
                .for_each(|(r, &y)| add(r, Some(y as i64))),
            Targets::Probs(p) => (0..p.nrows()).for_each(|r| add(r, None)),
        }
        out
    }
}

/// The operands of one fused linear cross-entropy call, as every backend and form (one
/// process, vocabulary-parallel) takes them: hidden states, weight, bias, class-index targets,
/// the rows' sample weights (the call's data, beside the definition in [`LinearCe::ce`]) and,
/// with reduction `none`, a per-row upstream gradient.
pub(crate) struct LinearCall<'a> {
    pub hidden: Logits<'a>,
    pub weight: Logits<'a>,
    pub bias: Option<ArrayView1<'a, f32>>,
    pub targets: Targets<'a>,
    pub sample_weight: Option<ArrayView1<'a, f32>>,
    pub upstream: Option<ArrayView1<'a, f32>>,
}

impl<'a> LinearCall<'a> {
    /// The operands of a public method, converted (and their borrows shortened to one), and
    /// the rows' sample weights (a linear cross-entropy's options' own: `cfg.ce.data`).
    pub fn new<'h: 'a, 'w: 'a, 'b: 'a, 't: 'a, 'u: 'a>(
        hidden: impl Into<Logits<'h>>,
        weight: impl Into<Logits<'w>>,
        bias: Option<ArrayView1<'b, f32>>,
        targets: impl Into<Targets<'t>>,
        upstream: Option<ArrayView1<'u, f32>>,
        sample_weight: Option<&'a Array1<f32>>,
    ) -> Self {
        LinearCall {
            hidden: hidden.into().reborrow(),
            weight: weight.into().reborrow(),
            bias: bias.map(|b| b.reborrow()),
            targets: targets.into().reborrow(),
            sample_weight: sample_weight.map(|w| w.view()),
            upstream: upstream.map(|u| u.reborrow()),
        }
    }

    /// The call's data as a chunk's cross-entropy takes it, for `rows` of the batch (in order:
    /// `Ok`, a range of rows, or `Err`, rows picked): their sample weights, the whole batch's
    /// `totals` (mean), and the per-row results the call returns (per-row losses also with
    /// reduction `none`).
    pub fn chunk_data(
        &self,
        cfg: &LinearCe,
        totals: Totals,
        rows: std::result::Result<std::ops::Range<usize>, &[usize]>,
    ) -> CallData<'_> {
        let sample_weight = self.sample_weight.map(|w| match rows {
            Ok(range) => w.slice_move(ndarray::s![range]).into(),
            Err(picked) => picked.iter().map(|&r| w[r]).collect::<Array1<f32>>().into(),
        });
        let ce = &cfg.ce;
        CallData {
            sample_weight,
            totals: (ce.reduction == Reduction::Mean).then_some(totals),
            outputs: CeOutputs { per_row: ce.outputs.row_losses(ce.reduction), ..ce.outputs },
        }
    }

    /// [`Totals::of`] this call's rows under `cfg`.
    pub fn totals(&self, cfg: &LinearCe) -> Totals {
        Totals::weighted(&self.targets, &cfg.ce, self.sample_weight)
    }
}

/// Checks a fused linear cross-entropy's inputs (and a per-row upstream gradient, see
/// [`check_upstream`]); returns `(n, d, v)`.
pub(crate) fn check(call: &LinearCall<'_>, cfg: &LinearCe) -> Result<(usize, usize, usize)> {
    let LinearCall { hidden, weight, bias, targets, sample_weight, upstream } = call;
    let (n, d, v) = check_operands(hidden, weight, *bias, cfg)?;
    check_upstream(*upstream, n, cfg)?;
    if matches!(targets, Targets::Probs(_)) {
        return Err(XentError::InvalidOption("fused linear cross-entropy takes class-index targets".into()));
    }
    let data = CallData { sample_weight: sample_weight.map(Into::into), totals: None, outputs: cfg.ce.outputs };
    crate::check::ce_call((n, v), targets, &cfg.ce, &data)?;
    crate::check::class_targets(targets, v, cfg.ce.ignore_index)?;
    Ok((n, d, v))
}

/// Checks a per-row upstream gradient `u [N]` of a fused linear cross-entropy (every backend,
/// one-process and vocabulary-parallel): only with reduction `none` (the gradient is then that
/// of `sum_n u_n loss_n`), `N` entries, all finite. `None` passes.
pub(crate) fn check_upstream(upstream: Option<ArrayView1<'_, f32>>, n: usize, cfg: &LinearCe) -> Result<()> {
    let Some(u) = upstream else { return Ok(()) };
    if cfg.ce.reduction != Reduction::None {
        let r = if cfg.ce.reduction == Reduction::Sum { "sum" } else { "mean" };
        return Err(XentError::InvalidOption(format!(
            "a per-row upstream gradient needs reduction none (per-row losses), not {r}: \
             scale a mean or sum with grad_scale"
        )));
    }
    if u.len() != n {
        return Err(XentError::Shape(format!("the upstream gradient has {} entries for {n} rows", u.len())));
    }
    crate::error::finite(u, "upstream gradient")
}

/// The checks of the operands and options alone (also for a weight that is one vocabulary
/// shard): `(n, d, v)`, `v` the weight's rows ([`crate::check::linear_operands`]).
pub(crate) fn check_operands(
    hidden: &Logits<'_>,
    weight: &Logits<'_>,
    bias: Option<ArrayView1<'_, f32>>,
    cfg: &LinearCe,
) -> Result<(usize, usize, usize)> {
    crate::check::linear_operands(
        (hidden.dim(), hidden.dtype()),
        (weight.dim(), weight.dtype()),
        bias.map(|b| b.len()),
        cfg,
    )
}

/// The batch rows a fused linear cross-entropy needs, when that is not all of them: rows whose
/// target is ignored add nothing to the loss or to any gradient, so where no per-row output is
/// asked for they are left out of the matrix products (as Cut Cross-Entropy filters ignored
/// tokens). `None` (every row) where no row is ignored, all are, per-row outputs are asked
/// for, or an ignored row holds a non-finite hidden state: the products then carry it into
/// `grad_weight` as NaN, as PyTorch's do.
pub(crate) fn counted_rows(hidden: &Logits<'_>, targets: &Targets<'_>, cfg: &LinearCe) -> Option<Vec<usize>> {
    let ce = &cfg.ce;
    if ce.outputs.row_losses(ce.reduction) || ce.outputs.ranks {
        return None;
    }
    if targets.is_probs() {
        return None;
    }
    let ignored = |r: usize| targets.get(r) == ce.ignore_index;
    let n = hidden.dim().0;
    let kept: Vec<usize> = (0..n).filter(|&r| !ignored(r)).collect();
    let finite = |r: usize| match hidden {
        Logits::F32(a) => a.row(r).iter().all(|x| x.is_finite()),
        Logits::F16(a) => a.row(r).iter().all(|x| x.is_finite()),
        Logits::BF16(a) => a.row(r).iter().all(|x| x.is_finite()),
    };
    // (An all-ignored batch keeps every row: its loss is the reduction's own 0/0 or 0.)
    (!kept.is_empty() && kept.len() < n && (0..n).filter(|&r| ignored(r)).all(finite)).then_some(kept)
}

/// The counted rows `kept` of a batch as a batch of their own, for a backend that uploads its
/// inputs whole: their hidden states (in their dtype), targets, and sample weights.
#[cfg(feature = "gpu")]
pub(crate) fn gather_batch(
    hidden: &Logits<'_>,
    targets: &Targets<'_>,
    sample_weight: Option<ArrayView1<'_, f32>>,
    kept: &[usize],
) -> (Tensor2, Array1<i64>, Option<Array1<f32>>) {
    let h = match hidden {
        Logits::F32(a) => Tensor2::F32(a.select(ndarray::Axis(0), kept)),
        Logits::F16(a) => Tensor2::F16(a.select(ndarray::Axis(0), kept)),
        Logits::BF16(a) => Tensor2::BF16(a.select(ndarray::Axis(0), kept)),
    };
    let t = kept.iter().map(|&r| targets.get(r)).collect();
    (h, t, sample_weight.map(|w| kept.iter().map(|&r| w[r]).collect()))
}

/// `grad_hidden` of the counted rows `kept` placed in a batch of `n` rows (the others 0).
#[cfg(feature = "gpu")]
pub(crate) fn scatter_rows(g: Tensor2, kept: &[usize], n: usize) -> Result<Tensor2> {
    fn go<T: Copy + bytemuck::Zeroable>(g: ndarray::Array2<T>, kept: &[usize], n: usize) -> Result<ndarray::Array2<T>> {
        let mut out = crate::alloc::zeros2::<T>((n, g.ncols()), "grad_hidden")?;
        for (row, &r) in g.rows().into_iter().zip(kept) {
            out.row_mut(r).assign(&row);
        }
        Ok(out)
    }
    Ok(match g {
        Tensor2::F32(a) => Tensor2::F32(go(a, kept, n)?),
        Tensor2::F16(a) => Tensor2::F16(go(a, kept, n)?),
        Tensor2::BF16(a) => Tensor2::BF16(go(a, kept, n)?),
    })
}

/// The gradients of a linear call as it returns them: hidden, weight, bias.
pub(crate) type LinearGrads = (Option<Tensor2>, Option<Tensor2>, Option<Array1<f32>>);

/// The dtype gradients are returned in.
pub(crate) fn grad_dtype(cfg: &LinearCe, input: DType) -> DType {
    if cfg.grads_in_input_dtype {
        input
    } else {
        DType::F32
    }
}

/// The loss and per-row results of a chunked linear call, gathered chunk by chunk in row order
/// (on both backends).
pub(crate) struct ChunkOutputs {
    loss: f64,
    row_loss: Option<Vec<f32>>,
    row_lse: Option<Vec<f32>>,
    row_rank: Option<Vec<u32>>,
}

impl ChunkOutputs {
    /// Room for what `cfg` asks of `n` rows.
    pub fn new(cfg: &LinearCe, n: usize) -> Self {
        let outs = cfg.ce.outputs;
        let per_row = outs.row_losses(cfg.ce.reduction);
        ChunkOutputs {
            loss: 0.0,
            row_loss: per_row.then(|| Vec::with_capacity(n)),
            row_lse: outs.per_row.then(|| Vec::with_capacity(n)),
            row_rank: outs.ranks.then(|| Vec::with_capacity(n)),
        }
    }

    /// The next chunk's results.
    pub fn add(&mut self, out: &CeOutput) {
        self.loss += out.loss;
        if let (Some(all), Some(part)) = (self.row_loss.as_mut(), out.row_loss.as_ref()) {
            all.extend(part.iter());
        }
        if let (Some(all), Some(part)) = (self.row_lse.as_mut(), out.row_lse.as_ref()) {
            all.extend(part.iter());
        }
        if let (Some(all), Some(part)) = (self.row_rank.as_mut(), out.row_rank.as_ref()) {
            all.extend(part.iter());
        }
    }

    /// The call's output: these results, the batch's `totals`, the gradients (hidden, weight,
    /// bias) and the rows a chunk held.
    pub fn finish(
        self,
        totals: Totals,
        (grad_hidden, grad_weight, grad_bias): LinearGrads,
        chunk_rows: usize,
    ) -> LinearCeOutput {
        LinearCeOutput {
            loss: self.loss,
            counted: totals.counted,
            weight_sum: totals.weight_sum,
            row_loss: self.row_loss.map(Array1::from),
            row_lse: self.row_lse.map(Array1::from),
            row_rank: self.row_rank.map(Array1::from),
            grad_hidden,
            grad_weight,
            grad_bias,
            chunk_rows,
        }
    }
}
