//! Per-row log-probabilities of chosen tokens and softmax entropies straight from hidden
//! states (RL scoring: PPO/GRPO), with gradients: the fused linear form of
//! `log_softmax(z)[y]` and `H = -sum_c p_c log p_c` for `z = (hidden @ weight.T + bias) /
//! temperature`, the logits existing one row chunk at a time (as [`crate::LinearCe`]).
//!
//! Per row, with `p = softmax(z)`, `lse = log sum_c exp(z_c)` and `mu = sum_c p_c z_c`:
//!
//! - `logp = z_y - lse`, `H = lse - mu`;
//! - `d logp / d z_c = [c == y] - p_c`, `d H / d z_c = -p_c (z_c - mu)`;
//! - for upstream `(a, b)`, the gradient of `sum_n a_n logp_n + b_n H_n` w.r.t. the logits
//!   `x = z T` is `G_c = (a ([c == y] - p_c) - b p_c (z_c - mu)) / T`, and w.r.t. hidden,
//!   weight and bias `G W`, `G^T H` and `1^T G` (the products of [`crate::LinearCe`]).
//!
//! Both backends compute the row statistic after subtracting the row maximum `m`: with
//! `e_c = exp(z_c - m)` and `S = sum_c e_c`, `lse = m + log S`, `logp = (z_y - m) - log S`,
//! `H = log S - sum_c e_c (z_c - m) / S`.

use ndarray::{Array1, ArrayView1};

use crate::api::config::CrossEntropy;
use crate::api::linear::{check_operands, LinearCe};
use crate::api::targets::Targets;
use crate::dtype::{DType, Logits, Tensor2};
use crate::error::{Result, XentError};

/// Options of [`crate::Cpu::linear_logprobs`] (and the GPU's): per-row log-probabilities of the
/// targets and entropies of `softmax((hidden @ weight.T + bias) / temperature)`.
///
/// Per row, with `p = softmax(z)`, `lse = log sum_c exp(z_c)` and `mu = sum_c p_c z_c`:
///
/// - `logp = z_y - lse`, `H = lse - mu`;
/// - `d logp / d z_c = [c == y] - p_c`, `d H / d z_c = -p_c (z_c - mu)`;
/// - for upstream `(a, b)`, the gradient of `sum_n a_n logp_n + b_n H_n` w.r.t. the logits
///   `x = z T` is `G_c = (a ([c == y] - p_c) - b p_c (z_c - mu)) / T`, and w.r.t. hidden,
///   weight and bias `G W`, `G^T H` and `1^T G` (the products of [`crate::LinearCe`]).
///
/// Both backends compute the row statistic after subtracting the row maximum `m`: with
/// `e_c = exp(z_c - m)` and `S = sum_c e_c`, `lse = m + log S`, `logp = (z_y - m) - log S`,
/// `H = log S - sum_c e_c (z_c - m) / S` (no cancellation: `H >= 0`).
///
/// ```
/// use xent::LinearLogprobs;
/// let cfg = LinearLogprobs::default().with_temperature(0.7).with_grad_weight(false);
/// assert_eq!((cfg.temperature, cfg.grad_weight, cfg.ignore_index), (0.7, false, -100));
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct LinearLogprobs {
    /// Rows whose target equals this give log-prob 0, entropy 0 and no gradient.
    pub ignore_index: i64,
    /// The logits are divided by it before the softmax (finite, > 0).
    pub temperature: f32,
    /// Return d(loss)/d(hidden) `[N, D]` (with an upstream gradient).
    pub grad_hidden: bool,
    /// Return d(loss)/d(weight) `[V, D]` (accumulated in f32 over row chunks, in order).
    pub grad_weight: bool,
    /// Return d(loss)/d(bias) `[V]` (when a bias is given).
    pub grad_bias: bool,
    /// Gradients in the inputs' dtype (rounded once from f32) instead of f32.
    pub grads_in_input_dtype: bool,
    /// Bytes of logits the call may hold at once, as [`LinearCe::workspace_bytes`].
    pub workspace_bytes: Option<usize>,
}

impl Default for LinearLogprobs {
    fn default() -> Self {
        LinearLogprobs {
            ignore_index: -100,
            temperature: 1.0,
            grad_hidden: true,
            grad_weight: true,
            grad_bias: true,
            grads_in_input_dtype: false,
            workspace_bytes: None,
        }
    }
}

with_builders!(LinearLogprobs {
    set with_ignore_index => ignore_index: i64,
    set with_temperature => temperature: f32,
    set with_grad_hidden => grad_hidden: bool,
    set with_grad_weight => grad_weight: bool,
    set with_grad_bias => grad_bias: bool,
    set with_grads_in_input_dtype => grads_in_input_dtype: bool,
    some with_workspace_bytes => workspace_bytes: usize,
});

impl LinearLogprobs {
    /// Rows of logits per chunk for `n x v` (as [`LinearCe::chunk_rows`]).
    pub fn chunk_rows(&self, n: usize, v: usize) -> usize {
        self.linear_ce(false).chunk_rows(n, v)
    }

    /// Rows of logits per chunk where the products run on a GPU (as
    /// [`LinearCe::device_chunk_rows`]: at least 1024 rows within 256 MiB unless
    /// `workspace_bytes` is set).
    pub fn device_chunk_rows(&self, n: usize, v: usize) -> usize {
        self.linear_ce(false).device_chunk_rows(n, v)
    }

    /// The [`LinearCe`] options whose operand checks, chunking, gradient flags and gradient
    /// dtype this call shares (`grads`: whether an upstream gradient is given).
    pub(crate) fn linear_ce(&self, grads: bool) -> LinearCe {
        // (`..Default::default()`: whatever options LinearCe gains keep their defaults.)
        let mut lc = LinearCe {
            // (For `counted_rows`: which rows the products may leave out.)
            ce: CrossEntropy { ignore_index: self.ignore_index, ..Default::default() },
            grad_hidden: grads && self.grad_hidden,
            grad_weight: grads && self.grad_weight,
            grad_bias: grads && self.grad_bias,
            ..Default::default()
        };
        lc.grads_in_input_dtype = self.grads_in_input_dtype;
        lc.workspace_bytes = self.workspace_bytes;
        lc
    }
}

/// What [`crate::Cpu::linear_logprobs`] returns.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct LinearLogprobsOutput {
    /// `log softmax(z)_y` per row (0 for ignored rows).
    pub logprob: Array1<f32>,
    /// `-sum_c p_c log p_c` per row (0 for ignored rows).
    pub entropy: Array1<f32>,
    /// Rows not ignored.
    pub counted: u64,
    /// d(loss)/d(hidden) `[N, D]`, with an upstream gradient and `grad_hidden`.
    pub grad_hidden: Option<Tensor2>,
    /// d(loss)/d(weight) `[V, D]`, with an upstream gradient and `grad_weight`.
    pub grad_weight: Option<Tensor2>,
    /// d(loss)/d(bias) `[V]`, with an upstream gradient, a bias and `grad_bias`.
    pub grad_bias: Option<Array1<f32>>,
    /// Rows of logits the call held at once.
    pub chunk_rows: usize,
}

/// f32 gradients w.r.t. hidden, weight and bias, as a backend computed them.
pub(crate) type Grads = (Option<ndarray::Array2<f32>>, Option<ndarray::Array2<f32>>, Option<Vec<f32>>);

/// A checked call: its sizes (rows, classes), the shared [`LinearCe`] options, and the upstream gradient.
pub(crate) struct Checked<'u> {
    pub n: usize,
    pub v: usize,
    pub lc: LinearCe,
    pub upstream: Option<(ArrayView1<'u, f32>, ArrayView1<'u, f32>)>,
}

/// The operands and options of one linear log-probs call, as every backend and form (one
/// process, vocabulary-parallel) takes them.
#[derive(Clone, Copy)]
pub(crate) struct LogprobsCall<'a> {
    pub hidden: Logits<'a>,
    pub weight: Logits<'a>,
    pub bias: Option<ArrayView1<'a, f32>>,
    pub targets: Targets<'a>,
    pub cfg: &'a LinearLogprobs,
    /// The upstream gradient `(a, b)` w.r.t. (log-prob, entropy) per row.
    pub upstream: Option<(ArrayView1<'a, f32>, ArrayView1<'a, f32>)>,
}

impl<'a> LogprobsCall<'a> {
    /// The operands of a public method, converted (and their borrows shortened to one).
    pub fn new<'u: 'a>(
        operands: crate::api::linear::LinearCall<'a>,
        cfg: &'a LinearLogprobs,
        upstream: Option<(ArrayView1<'u, f32>, ArrayView1<'u, f32>)>,
    ) -> Self {
        let crate::api::linear::LinearCall { hidden, weight, bias, targets, .. } = operands;
        let upstream = upstream.map(|(a, b)| (a.reborrow(), b.reborrow()));
        LogprobsCall { hidden, weight, bias, targets, cfg, upstream }
    }
}

/// Checks a linear log-prob call (the same errors on every backend): the operands as
/// [`LinearCe`]'s, class-index targets in range, the temperature, and an upstream gradient of
/// `N` finite entries per array. With `shard`, the weight is that vocabulary shard (targets are
/// global class indices) and `v` of the result is the shard's classes.
pub(crate) fn check<'u>(call: &LogprobsCall<'u>, shard: Option<crate::parallel::VocabShard>) -> Result<Checked<'u>> {
    let LogprobsCall { hidden, weight, bias, targets, cfg, upstream } = call;
    let (bias, upstream) = (*bias, *upstream);
    let lc = cfg.linear_ce(upstream.is_some());
    let (n, _, v) = check_operands(hidden, weight, bias, &lc)?;
    if let Some(sh) = shard {
        crate::parallel::vocab::check_fits(v, sh)?;
    }
    if !(cfg.temperature > 0.0 && cfg.temperature.is_finite()) {
        return Err(XentError::InvalidOption(format!("temperature must be > 0, got {}", cfg.temperature)));
    }
    if matches!(targets, Targets::Probs(_)) {
        return Err(XentError::InvalidOption("linear log-probs take class-index targets".into()));
    }
    if targets.len() != n {
        return Err(XentError::Shape(format!("{} targets for {n} rows of hidden states", targets.len())));
    }
    crate::check::class_targets(targets, shard.map_or(v, |s| s.classes), cfg.ignore_index)?;
    if let Some((a, b)) = upstream {
        for (x, name) in [(a, "upstream logprob"), (b, "upstream entropy")] {
            if x.len() != n {
                return Err(XentError::Shape(format!("{name} has {} entries for {n} rows", x.len())));
            }
            crate::check::finite_values(x, name)?;
        }
    }
    Ok(Checked { n, v, lc, upstream })
}

impl Checked<'_> {
    /// Whether any gradient is computed.
    pub fn any_grad(&self, has_bias: bool) -> bool {
        self.lc.grad_hidden || self.lc.grad_weight || (self.lc.grad_bias && has_bias)
    }

    /// The upstream gradient of row `r`: `(a_r, b_r)`, `(0, 0)` without one.
    pub fn upstream_at(&self, r: usize) -> (f32, f32) {
        self.upstream.map_or((0.0, 0.0), |(a, b)| (a[r], b[r]))
    }

    /// The output, from the per-row results and the f32 gradients (`dtype`: the inputs').
    pub fn output(
        &self,
        (logprob, entropy): (Vec<f32>, Vec<f32>),
        counted: u64,
        (gh, gw, gb): Grads,
        dtype: DType,
        chunk_rows: usize,
    ) -> LinearLogprobsOutput {
        let gdt = crate::api::linear::grad_dtype(&self.lc, dtype);
        LinearLogprobsOutput {
            logprob: Array1::from(logprob),
            entropy: Array1::from(entropy),
            counted,
            grad_hidden: gh.map(|a| Tensor2::from_f32(a, gdt)),
            grad_weight: gw.map(|a| Tensor2::from_f32(a, gdt)),
            grad_bias: gb.map(Array1::from),
            chunk_rows: chunk_rows.min(self.n),
        }
    }
}

/// Rows whose target is not `ignore_index`.
pub(crate) fn counted(targets: &Targets<'_>, ignore_index: i64) -> u64 {
    (0..targets.len()).filter(|&r| targets.get(r) != ignore_index).count() as u64
}
