//! Option structs shared by the GPU and CPU backends.

use ndarray::Array1;

use crate::api::targets::Targets;
use crate::error::{Result, XentError};

/// How per-row losses are combined, with PyTorch's semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Reduction {
    /// Per-row losses; `loss` in the output is their sum (the quantity the gradient is of).
    None,
    /// Sum of weighted per-row losses.
    Sum,
    /// Sum of weighted losses divided by the sum of the weights of counted rows
    /// (NaN when every row is ignored).
    #[default]
    Mean,
}

impl std::str::FromStr for Reduction {
    type Err = XentError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Reduction::None),
            "sum" => Ok(Reduction::Sum),
            "mean" => Ok(Reduction::Mean),
            _ => Err(XentError::InvalidOption(format!("reduction must be none, sum or mean, got {s:?}"))),
        }
    }
}

/// Options of softmax cross-entropy: the loss's definition (the fields below), this call's
/// data ([`Self::data`]: sample weights, a larger batch's totals) and the per-row results it
/// returns ([`Self::outputs`]). A call made of parts (row chunks of a linear loss, blocks
/// streamed from a file, vocabulary shards) keeps the definition and makes the data of each
/// part.
///
/// Row `n` with target `y` has weight `w_n = sample_weight[n] * class_weight[y]` and loss
///
/// ```text
/// L_n = w_n (1 - eps) (lse_n - z_ny) + sample_weight[n] (eps / V) sum_c class_weight[c] (lse_n - z_nc)
/// ```
///
/// where `z = softcap(x / temperature)` and `lse_n = log sum_c exp(z_nc)`. `Mean` divides the sum
/// of `L_n` by the sum of `w_n` over counted rows (PyTorch's rule). The z-loss
/// `z_loss * lse_n^2` is added per counted row and, for `Mean`, averaged over counted rows
/// (unweighted, as in Liger-Kernel).
///
/// Built from [`Default`] with the `with_*` builders (or by assigning fields: the struct is
/// `#[non_exhaustive]`, so that new options are not breaking changes):
///
/// ```
/// use ndarray::array;
/// use xent::{CrossEntropy, Reduction};
/// let cfg = CrossEntropy::default()
///     .with_reduction(Reduction::Sum)
///     .with_ignore_index(-1)
///     .with_label_smoothing(0.1)
///     .with_class_weight(array![1.0f32, 2.0, 1.0]);
/// assert!(cfg.validate(3).is_ok());
/// let mut same = CrossEntropy::default();
/// same.reduction = Reduction::Sum;
/// same.ignore_index = -1;
/// same.label_smoothing = 0.1;
/// same.class_weight = Some(array![1.0f32, 2.0, 1.0]);
/// assert_eq!(cfg, same);
/// // The call's data and output requests are their own parts.
/// let weighted = cfg.clone().with_sample_weight(array![1.0f32, 0.5]).with_per_row(true);
/// assert_eq!(weighted.data.sample_weight, Some(array![1.0f32, 0.5]));
/// assert!(weighted.outputs.per_row && !weighted.outputs.ranks);
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CrossEntropy {
    /// How rows are combined.
    pub reduction: Reduction,
    /// Rows whose target equals this are ignored (loss 0, gradient 0, not counted).
    pub ignore_index: i64,
    /// Label smoothing `eps` in `[0, 1]`.
    pub label_smoothing: f32,
    /// Optional per-class weights `[V]`.
    pub class_weight: Option<Array1<f32>>,
    /// z-loss coefficient `s` (PaLM): adds `s * lse^2` per counted row. 0 disables it.
    pub z_loss: f32,
    /// Logit soft-capping `c * tanh(x / c)` (Gemma 2); `None` disables it.
    pub softcap: Option<f32>,
    /// Logits are divided by this before everything else.
    pub temperature: f32,
    /// Upstream gradient d(total)/d(loss) multiplied into the gradient.
    pub grad_scale: f32,
    /// This call's data: per-sample weights, and a larger batch's totals (see [`CeData`]).
    /// Kept apart from the definition above, which a chunked, streamed or sharded call passes
    /// on unchanged while it makes the data of each part.
    pub data: CeData,
    /// What the call returns besides the loss and gradient (see [`CeOutputs`]).
    pub outputs: CeOutputs,
}

/// A cross-entropy call's data, apart from the loss's definition ([`CrossEntropy::data`]).
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct CeData {
    /// Optional per-sample weights `[N]`.
    pub sample_weight: Option<Array1<f32>>,
    /// The denominators of `Reduction::Mean` when this call sees one block of a larger batch
    /// (rows streamed from a file in blocks, or split across processes): the whole batch's
    /// counted rows and weight sum. The gradient is then that of the whole batch's mean, and
    /// `loss` is this block's share of it (the shares add up to the mean). `None`: this call's
    /// own rows.
    pub totals: Option<Totals>,
}

/// Per-row results a cross-entropy call returns besides the loss, computed in the same pass
/// ([`CrossEntropy::outputs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CeOutputs {
    /// Also return per-row losses and log-sum-exp values.
    pub per_row: bool,
    /// Also return each row's max logit and the target's rank (classes with a strictly larger
    /// logit: rank < k means a top-k hit).
    pub ranks: bool,
    /// Also return each row's expected logit gap `E_p[z] - z_target`; `-gap` is the derivative
    /// of the row's NLL w.r.t. log(temperature) (temperature fitting).
    pub gaps: bool,
}

impl CeOutputs {
    /// Whether per-row losses are computed: asked for, or the reduction is `none`.
    pub(crate) fn row_losses(&self, reduction: Reduction) -> bool {
        self.per_row || reduction == Reduction::None
    }
}

/// A call's data and output requests as the kernels take them, beside the definition (the
/// rest of a [`CrossEntropy`], which they read nothing else from): the public methods make it
/// from the options ([`CrossEntropy::call_data`]); a chunked, streamed or sharded call makes
/// one per part (its rows' sample weights, the batch's totals) and never copies or patches the
/// definition.
#[derive(Debug, Clone, Default)]
pub(crate) struct CallData<'a> {
    pub sample_weight: Option<ndarray::CowArray<'a, f32, ndarray::Ix1>>,
    pub totals: Option<Totals>,
    pub outputs: CeOutputs,
}

impl CallData<'_> {
    /// This call's totals and output requests without its sample weights (a GPU plan's, whose
    /// weights are uploaded or bound per record).
    #[cfg(feature = "gpu")]
    pub fn unweighted(&self) -> CallData<'static> {
        CallData { sample_weight: None, totals: self.totals, outputs: self.outputs }
    }

    /// Checks the totals against the definition (sample weights are checked against the
    /// rows, `crate::check::ce_call`).
    pub fn validate(&self, cfg: &CrossEntropy) -> Result<()> {
        if let Some(t) = self.totals {
            if cfg.reduction != Reduction::Mean {
                return Err(XentError::InvalidOption("totals only apply to Reduction::Mean".into()));
            }
            if !(t.weight_sum.is_finite()) {
                return Err(XentError::InvalidOption(format!(
                    "totals.weight_sum must be finite, got {}",
                    t.weight_sum
                )));
            }
        }
        Ok(())
    }

    /// Row `r`'s sample weight (1 without weights).
    pub fn sw(&self, r: usize) -> f64 {
        self.sample_weight.as_ref().map_or(1.0, |w| w[r] as f64)
    }

    /// [`CrossEntropy::reduce`] with this call's totals.
    pub fn reduce(&self, cfg: &CrossEntropy, sum_ce: f64, sum_lse2: f64, counted: u64, weight_sum: f64) -> f64 {
        let z = cfg.z_loss as f64;
        let (counted, weight_sum) = self.totals.map_or((counted, weight_sum), |t| (t.counted, t.weight_sum));
        match cfg.reduction {
            Reduction::Mean => {
                let ce = sum_ce / weight_sum;
                if z > 0.0 {
                    ce + z * sum_lse2 / counted as f64
                } else {
                    ce
                }
            }
            _ => sum_ce + z * sum_lse2,
        }
    }

    /// [`CrossEntropy::grad_coefficients`] with this call's totals.
    pub fn grad_coefficients(&self, cfg: &CrossEntropy, counted: u64, weight_sum: f64) -> (f64, f64) {
        let scale = cfg.grad_scale as f64;
        let (counted, weight_sum) = self.totals.map_or((counted, weight_sum), |t| (t.counted, t.weight_sum));
        match cfg.reduction {
            Reduction::Mean => (scale / weight_sum, scale / counted as f64),
            _ => (scale, scale),
        }
    }
}

/// Counted rows and their weight sum: the denominators of a mean (see [`CeData::totals`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Totals {
    /// Rows not ignored.
    pub counted: u64,
    /// Sum of `sample_weight[n] * class_weight[y_n]` over counted rows.
    pub weight_sum: f64,
}

impl Default for CrossEntropy {
    fn default() -> Self {
        CrossEntropy {
            reduction: Reduction::Mean,
            ignore_index: -100,
            label_smoothing: 0.0,
            class_weight: None,
            z_loss: 0.0,
            softcap: None,
            temperature: 1.0,
            grad_scale: 1.0,
            data: CeData::default(),
            outputs: CeOutputs::default(),
        }
    }
}

with_builders!(CrossEntropy {
    set with_reduction => reduction: Reduction,
    set with_ignore_index => ignore_index: i64,
    set with_label_smoothing => label_smoothing: f32,
    some with_class_weight => class_weight: Array1<f32>,
    set with_z_loss => z_loss: f32,
    some with_softcap => softcap: f32,
    set with_temperature => temperature: f32,
    set with_grad_scale => grad_scale: f32,
});

impl CrossEntropy {
    /// Sets [`CeData::sample_weight`] (builder): a value sets `Some(value)`, an `Option` is
    /// taken as it is.
    #[must_use]
    pub fn with_sample_weight(mut self, sample_weight: impl Into<Option<Array1<f32>>>) -> Self {
        self.data.sample_weight = sample_weight.into();
        self
    }

    /// Sets [`CeData::totals`] (builder): a value sets `Some(value)`, an `Option` is taken as
    /// it is.
    #[must_use]
    pub fn with_totals(mut self, totals: impl Into<Option<Totals>>) -> Self {
        self.data.totals = totals.into();
        self
    }

    /// Sets [`CeOutputs::per_row`] (builder).
    #[must_use]
    pub fn with_per_row(mut self, per_row: bool) -> Self {
        self.outputs.per_row = per_row;
        self
    }

    /// Sets [`CeOutputs::ranks`] (builder).
    #[must_use]
    pub fn with_ranks(mut self, ranks: bool) -> Self {
        self.outputs.ranks = ranks;
        self
    }

    /// Sets [`CeOutputs::gaps`] (builder).
    #[must_use]
    pub fn with_gaps(mut self, gaps: bool) -> Self {
        self.outputs.gaps = gaps;
        self
    }

    /// This call's data and output requests as the kernels take them (a view of
    /// [`Self::data`] and [`Self::outputs`]).
    pub(crate) fn call_data(&self) -> CallData<'_> {
        CallData {
            sample_weight: self.data.sample_weight.as_ref().map(|w| w.view().into()),
            totals: self.data.totals,
            outputs: self.outputs,
        }
    }
}

impl CrossEntropy {
    /// Checks the options against a row length of `classes`.
    pub fn validate(&self, classes: usize) -> Result<()> {
        self.validate_definition(classes)?;
        self.call_data().validate(self)
    }

    /// [`Self::validate`]'s checks of the definition (all but [`Self::data`]).
    pub(crate) fn validate_definition(&self, classes: usize) -> Result<()> {
        let bad = |m: String| Err(XentError::InvalidOption(m));
        if !(0.0..=1.0).contains(&self.label_smoothing) {
            return bad(format!("label_smoothing must be in [0, 1], got {}", self.label_smoothing));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature must be > 0, got {}", self.temperature));
        }
        if let Some(c) = self.softcap {
            if !(c > 0.0 && c.is_finite()) {
                return bad(format!("softcap must be > 0, got {c}"));
            }
        }
        if !(self.z_loss >= 0.0 && self.z_loss.is_finite()) {
            return bad(format!("z_loss must be a finite value >= 0, got {}", self.z_loss));
        }
        if !self.grad_scale.is_finite() {
            return bad(format!("grad_scale must be finite, got {}", self.grad_scale));
        }
        if let Some(w) = &self.class_weight {
            if w.len() != classes {
                return Err(XentError::Shape(format!(
                    "class_weight has {} entries but the logits have {classes} classes",
                    w.len()
                )));
            }
            crate::error::finite(w.view(), "class_weight")?;
        }
        Ok(())
    }

    /// The reduced loss from a call's sums, the same on every backend: `sum_ce` (weighted CE
    /// part of the row losses), `sum_lse2` (`lse^2` over counted rows, for the z-loss), and
    /// this call's `counted` rows and `weight_sum` (replaced by [`CeData::totals`] when
    /// set). `Mean` divides the CE part by the weight sum and the z-loss part by the counted
    /// rows.
    ///
    /// ```
    /// use xent::{CrossEntropy, Reduction};
    /// let mean = CrossEntropy::default().with_z_loss(0.5);
    /// assert_eq!(mean.reduce(6.0, 4.0, 2, 3.0), 6.0 / 3.0 + 0.5 * 4.0 / 2.0);
    /// let sum = mean.with_reduction(Reduction::Sum);
    /// assert_eq!(sum.reduce(6.0, 4.0, 2, 3.0), 6.0 + 0.5 * 4.0);
    /// ```
    pub fn reduce(&self, sum_ce: f64, sum_lse2: f64, counted: u64, weight_sum: f64) -> f64 {
        self.call_data().reduce(self, sum_ce, sum_lse2, counted, weight_sum)
    }

    /// The factors `(a, b)` by which the CE and z-loss parts of each row's gradient are
    /// scaled (`grad_scale`, divided by the weight sum and the counted rows for `Mean`), the
    /// same on every backend.
    pub fn grad_coefficients(&self, counted: u64, weight_sum: f64) -> (f64, f64) {
        self.call_data().grad_coefficients(self, counted, weight_sum)
    }

    /// Whether logits are transformed (temperature or softcap) before the softmax.
    pub fn transforms_logits(&self) -> bool {
        self.softcap.is_some() || self.temperature != 1.0
    }
}

/// Result of a cross-entropy evaluation (`#[non_exhaustive]`: later versions may return more).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CeOutput {
    /// The reduced loss (for `Reduction::None`, the sum of the per-row losses).
    pub loss: f64,
    /// Rows whose target is not `ignore_index`.
    pub counted: u64,
    /// Sum of the weights of counted rows (the `Mean` denominator).
    pub weight_sum: f64,
    /// Per-row losses (0 for ignored rows), when asked for or when the reduction is `None`.
    pub row_loss: Option<Array1<f32>>,
    /// Per-row log-sum-exp of the (transformed) logits, when asked for.
    pub row_lse: Option<Array1<f32>>,
    /// The gradient of `loss` w.r.t. the logits, times `grad_scale`, from the `*_with_grad` calls.
    pub grad: Option<ndarray::Array2<f32>>,
    /// Per-row max of the (transformed) logits, with `ranks`.
    pub row_max: Option<Array1<f32>>,
    /// Per-row rank of the target (`u32::MAX` for ignored rows), with `ranks`.
    pub row_rank: Option<Array1<u32>>,
    /// Per-row `E_p[z] - z_target` (0 for ignored rows), with `gaps`.
    pub row_gap: Option<Array1<f32>>,
}

impl CeOutput {
    /// Top-k accuracy over counted rows (needs `ranks`; NaN when no row counts).
    ///
    /// ```
    /// use ndarray::array;
    /// use xent::{Cpu, CrossEntropy};
    /// let x = array![[3.0f32, 1.0, 2.0], [0.0, 5.0, 1.0]];
    /// let cfg = CrossEntropy::default().with_ranks(true);
    /// let out = Cpu::new().cross_entropy(&x, &[2i64, 1][..], &cfg).unwrap();
    /// assert_eq!(out.accuracy(1), Some(0.5));
    /// assert_eq!(out.accuracy(2), Some(1.0));
    /// ```
    pub fn accuracy(&self, k: u32) -> Option<f64> {
        let ranks = self.row_rank.as_ref()?;
        let counted = ranks.iter().filter(|&&r| r != u32::MAX).count();
        let hits = ranks.iter().filter(|&&r| r < k).count();
        Some(if counted == 0 { f64::NAN } else { hits as f64 / counted as f64 })
    }
}

/// Which row-wise normalisation `log_softmax` computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SoftmaxKind {
    /// `x - lse(x)`.
    #[default]
    LogSoftmax,
    /// `exp(x - lse(x))`.
    Softmax,
}

/// Weights of binary cross-entropy, broadcast like PyTorch's `weight`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum BceWeight {
    /// One weight per class (last dimension) `[C]`.
    PerClass(Array1<f32>),
    /// One weight per element `[N, C]`.
    PerElement(ndarray::Array2<f32>),
}

/// Options of binary cross-entropy (`binary_cross_entropy_with_logits` / `binary_cross_entropy`).
///
/// From logits `x`, targets `y` in `[0, 1]` (soft targets allowed):
///
/// ```text
/// l = w [ pos_weight y softplus(-x) + (1 - y) softplus(x) ]      (= -w [pw y log s(x) + (1-y) log(1-s(x))])
/// ```
///
/// stable for any |x|. From probabilities `p`: `l = -w [y max(log p, -100) + (1-y) max(log(1-p), -100)]`.
/// `Mean` averages over all elements.
///
/// Built from [`Default`] with the `with_*` builders or by assigning fields
/// (`#[non_exhaustive]`):
///
/// ```
/// use ndarray::array;
/// use xent::{Bce, BceWeight, Reduction};
/// let cfg = Bce::default()
///     .with_reduction(Reduction::Sum)
///     .with_grad(true)
///     .with_weight(BceWeight::PerClass(array![1.0f32, 0.5]));
/// assert!(cfg.pos_weight.is_none());
/// let mut same = Bce::default();
/// same.reduction = Reduction::Sum;
/// same.grad = true;
/// same.weight = Some(BceWeight::PerClass(array![1.0f32, 0.5]));
/// assert_eq!(cfg, same);
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Bce {
    /// How elements are combined.
    pub reduction: Reduction,
    /// Optional weights.
    pub weight: Option<BceWeight>,
    /// Optional weight of positive targets per class `[C]` (logits only).
    pub pos_weight: Option<Array1<f32>>,
    /// Also return d(loss)/d(input).
    pub grad: bool,
    /// Upstream gradient multiplied into the gradient.
    pub grad_scale: f32,
}

impl Default for Bce {
    fn default() -> Self {
        Bce { reduction: Reduction::Mean, weight: None, pos_weight: None, grad: false, grad_scale: 1.0 }
    }
}

with_builders!(Bce {
    set with_reduction => reduction: Reduction,
    some with_weight => weight: BceWeight,
    some with_pos_weight => pos_weight: Array1<f32>,
    set with_grad => grad: bool,
    set with_grad_scale => grad_scale: f32,
});

/// Result of a binary cross-entropy evaluation (`#[non_exhaustive]`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BceOutput {
    /// Reduced loss (for `Reduction::None`, the sum of the element losses).
    pub loss: f64,
    /// Number of elements.
    pub elements: u64,
    /// Element losses, for `Reduction::None`.
    pub elem_loss: Option<ndarray::Array2<f32>>,
    /// Gradient w.r.t. the input (logits or probabilities), when asked for.
    pub grad: Option<ndarray::Array2<f32>>,
}

/// Which divergence distillation minimises (teacher `t`, student `s`, both softmaxed at the
/// temperature).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub enum DistillMode {
    /// Forward KL(t || s) (Hinton et al.).
    #[default]
    Kl,
    /// Reverse KL(s || t).
    ReverseKl,
    /// Generalised Jensen-Shannon, as in Liger-Kernel: `beta KL(t || m) + (1 - beta) KL(s || m)`
    /// with `m = beta t + (1 - beta) s`; `beta = 0` is forward KL and `beta = 1` reverse KL.
    Jsd {
        /// Mixing weight in [0, 1].
        beta: f32,
    },
}

/// Options of knowledge distillation: `loss = T^2 * mean over rows of D(teacher_T, student_T)`
/// (`batchmean`, Hinton's `T^2` keeps gradient magnitudes comparable across temperatures), or
/// with [`Self::reduction`] the sum over rows, or the rows themselves.
///
/// Built from [`Default`] with the `with_*` builders or by assigning fields
/// (`#[non_exhaustive]`):
///
/// ```
/// use xent::{Distill, DistillMode};
/// let cfg = Distill::default().with_temperature(2.0).with_mode(DistillMode::Jsd { beta: 0.5 });
/// assert!(cfg.validate().is_ok());
/// let mut same = Distill::default();
/// same.temperature = 2.0;
/// same.mode = DistillMode::Jsd { beta: 0.5 };
/// assert_eq!(cfg, same);
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Distill {
    /// Temperature T > 0 dividing both logits.
    pub temperature: f32,
    /// The divergence.
    pub mode: DistillMode,
    /// Upstream gradient multiplied into the gradient.
    pub grad_scale: f32,
    /// How rows are combined: `Mean` (the default) is PyTorch's `kl_div(..., reduction=
    /// 'batchmean')`, the sum over rows divided by `N` (not `kl_div`'s `'mean'`, which also
    /// divides by `V`); `Sum` the sum over rows; `None` keeps the rows
    /// ([`DistillOutput::row_loss`]), and `loss` is then their sum, the quantity the gradient is
    /// of (as [`CrossEntropy`]'s `None`). Each is times `T^2`.
    pub reduction: Reduction,
}

impl Default for Distill {
    fn default() -> Self {
        Distill { temperature: 1.0, mode: DistillMode::Kl, grad_scale: 1.0, reduction: Reduction::Mean }
    }
}

with_builders!(Distill {
    set with_temperature => temperature: f32,
    set with_mode => mode: DistillMode,
    set with_grad_scale => grad_scale: f32,
    set with_reduction => reduction: Reduction,
});

impl Distill {
    /// Checks the options.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(XentError::InvalidOption(format!("temperature must be > 0, got {}", self.temperature)));
        }
        if let DistillMode::Jsd { beta } = self.mode {
            if !(0.0..=1.0).contains(&beta) {
                return Err(XentError::InvalidOption(format!("beta must be in [0, 1], got {beta}")));
            }
        }
        if !self.grad_scale.is_finite() {
            return Err(XentError::InvalidOption(format!("grad_scale must be finite, got {}", self.grad_scale)));
        }
        Ok(())
    }

    /// What the sum of `T^2 D_n` over `rows` rows is multiplied by to give the loss: `1 / N`
    /// for `Mean`, else 1. The gradient w.r.t. the logits is `grad_scale * T * this * dD/dz`.
    pub(crate) fn row_factor(&self, rows: usize) -> f64 {
        match self.reduction {
            Reduction::Mean => 1.0 / rows as f64,
            Reduction::Sum | Reduction::None => 1.0,
        }
    }

    /// The per-row losses of `out`, a call with these options: `T^2 D_n` (the rows of
    /// [`DistillOutput::row_loss`] are `D_n`), whose mean is the `Mean` loss and sum the `Sum`
    /// one.
    ///
    /// ```
    /// use ndarray::array;
    /// use xent::{Cpu, Distill};
    /// let cfg = Distill::default().with_temperature(2.0);
    /// let out = Cpu::new().distill(&array![[1.0f32, 2.0], [0.0, 1.0]], &array![[2.0f32, 1.0], [0.0, 0.0]], &cfg)?;
    /// let rows = cfg.row_losses(&out);
    /// assert!((rows.iter().map(|&r| r as f64).sum::<f64>() / 2.0 - out.loss).abs() < 1e-6);
    /// # Ok::<(), xent::XentError>(())
    /// ```
    pub fn row_losses(&self, out: &DistillOutput) -> Vec<f32> {
        let t2 = self.temperature * self.temperature;
        out.row_loss.iter().map(|&d| t2 * d).collect()
    }

    /// The mode as the kernel's code and beta.
    pub(crate) fn mode_code(&self) -> (i32, f32) {
        match self.mode {
            DistillMode::Kl | DistillMode::Jsd { beta: 0.0 } => (0, 0.0),
            DistillMode::ReverseKl | DistillMode::Jsd { beta: 1.0 } => (1, 1.0),
            DistillMode::Jsd { beta } => (2, beta),
        }
    }
}

/// Result of a distillation evaluation (`#[non_exhaustive]`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DistillOutput {
    /// `T^2` times the mean over rows of the divergence (the sum with `Reduction::Sum` or
    /// `None`; see [`Distill::reduction`]).
    pub loss: f64,
    /// Per-row divergence (without `T^2`).
    pub row_loss: Array1<f32>,
    /// Gradient of `loss` w.r.t. the student logits, times `grad_scale` (from `distill_with_grad`).
    pub grad: Option<ndarray::Array2<f32>>,
}

/// Per-row entropy, cross-entropy, KL and Jensen-Shannon divergence of two distributions (nats)
/// (`#[non_exhaustive]`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Measures {
    /// H(p).
    pub entropy: Array1<f64>,
    /// H(p, q) (+inf where q = 0 but p > 0).
    pub cross_entropy: Array1<f64>,
    /// KL(p || q) (+inf on support mismatch).
    pub kl: Array1<f64>,
    /// JS(p, q) = KL(p || m)/2 + KL(q || m)/2, m = (p + q)/2 (always finite, at most ln 2).
    pub js: Array1<f64>,
}

/// Options of a fused linear cross-entropy.
///
/// Built from [`Default`] with the `with_*` builders or by assigning fields (the struct is
/// `#[non_exhaustive]`, so that new options are not breaking changes):
///
/// ```
/// use xent::{CrossEntropy, LinearCe, Reduction};
/// let cfg = LinearCe::default()
///     .with_ce(CrossEntropy::default().with_reduction(Reduction::Sum))
///     .with_grad_bias(false)
///     .with_workspace_bytes(1 << 20);
/// let mut same = LinearCe::default();
/// same.ce.reduction = Reduction::Sum;
/// same.grad_bias = false;
/// same.workspace_bytes = Some(1 << 20);
/// assert_eq!(cfg, same);
/// assert_eq!(cfg.chunk_rows(1000, 1024), 256); // 1 MiB of 4 KiB rows
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LinearCe {
    /// The cross-entropy of the logits `hidden @ weight.T + bias`: reduction, `ignore_index`,
    /// class and sample weights, label smoothing, z-loss, softcap, temperature, `grad_scale`,
    /// per-row results. (`totals` is set by the call itself.)
    pub ce: CrossEntropy,
    /// Return d(loss)/d(hidden) `[N, D]`.
    pub grad_hidden: bool,
    /// Return d(loss)/d(weight) `[V, D]` (accumulated in f32 over row chunks, in order).
    pub grad_weight: bool,
    /// Return d(loss)/d(bias) `[V]` (when a bias is given).
    pub grad_bias: bool,
    /// Gradients in the inputs' dtype (rounded once from f32) instead of f32.
    pub grads_in_input_dtype: bool,
    /// Bytes of logits the call may hold at once. `None`: 256 MiB or `N * V * 4 / 8`,
    /// whichever is smaller (at least one row); on a GPU at least 1024 rows within 256 MiB
    /// ([`Self::device_chunk_rows`]).
    pub workspace_bytes: Option<usize>,
}

impl Default for LinearCe {
    fn default() -> Self {
        LinearCe {
            ce: CrossEntropy::default(),
            grad_hidden: true,
            grad_weight: true,
            grad_bias: true,
            grads_in_input_dtype: false,
            workspace_bytes: None,
        }
    }
}

with_builders!(LinearCe {
    set with_ce => ce: CrossEntropy,
    set with_grad_hidden => grad_hidden: bool,
    set with_grad_weight => grad_weight: bool,
    set with_grad_bias => grad_bias: bool,
    set with_grads_in_input_dtype => grads_in_input_dtype: bool,
    some with_workspace_bytes => workspace_bytes: usize,
});

impl LinearCe {
    /// Rows of logits per chunk for `n x v` (the workspace bound over one row's bytes).
    pub fn chunk_rows(&self, n: usize, v: usize) -> usize {
        let row = v.max(1) * 4;
        let default = (256usize << 20).min(n.saturating_mul(row) / 8);
        let budget = self.workspace_bytes.unwrap_or(default);
        (budget / row).clamp(1, n.max(1))
    }

    /// Rows of logits per chunk where the products run on a GPU: the workspace bound when
    /// `workspace_bytes` is set; else [`Self::chunk_rows`]'s default, but at least
    /// [`Self::DEVICE_MIN_ROWS`] rows as long as their f32 logits fit in 256 MiB. A GPU matrix
    /// product needs tall operands to reach its speed: on lavapipe, xent's own products over
    /// 64-row chunks made the fused loss at 512 x 256 x 8000 1.4x slower than one 512-row
    /// chunk, and Burn's (cubecl's) over 128 rows 1.3x slower than over 1024 (see
    /// `docs/gpu-matmul.md`). Memory: `[rows, V]` f32, at most 256 MiB unless `N * V * 4 / 8`
    /// is larger.
    ///
    /// ```
    /// use xent::LinearCe;
    /// assert_eq!(LinearCe::default().chunk_rows(4096, 32000), 512); // an eighth
    /// assert_eq!(LinearCe::default().device_chunk_rows(4096, 32000), 1024);
    /// assert_eq!(LinearCe::default().device_chunk_rows(4096, 256000), 262); // 256 MiB
    /// assert_eq!(LinearCe::default().with_workspace_bytes(1 << 20).device_chunk_rows(4096, 1024), 256);
    /// ```
    pub fn device_chunk_rows(&self, n: usize, v: usize) -> usize {
        let rows = self.chunk_rows(n, v);
        if self.workspace_bytes.is_some() {
            return rows;
        }
        let fit = (256usize << 20) / (4 * v.max(1));
        rows.max(fit.clamp(1, Self::DEVICE_MIN_ROWS)).clamp(1, n.max(1))
    }

    /// The fewest rows a chunk gets by default on a GPU ([`Self::device_chunk_rows`]).
    pub const DEVICE_MIN_ROWS: usize = 1024;
}

/// The operands of one cross-entropy call as every backend and form (one process,
/// vocabulary-parallel) takes them: the logits (read, or overwritten by their gradient), the
/// targets, where the gradient goes, and the call's data (beside the definition, which the
/// backend is given apart).
pub(crate) struct CeCall<'a> {
    pub logits: CeLogits<'a>,
    pub targets: Targets<'a>,
    pub grad: GradDest<'a>,
    pub data: CallData<'a>,
}

impl<'a> CeCall<'a> {
    /// The operands of a public method with the options' own data (the targets' borrow
    /// shortened to the call's).
    pub fn new<'t: 'a>(
        logits: CeLogits<'a>,
        targets: impl Into<Targets<'t>>,
        grad: GradDest<'a>,
        cfg: &'a CrossEntropy,
    ) -> Self {
        CeCall { logits, targets: targets.into().reborrow(), grad, data: cfg.call_data() }
    }

    /// The read-only logits and given gradient destination of a form that offers no other
    /// (vocabulary-parallel).
    pub fn read_into(self) -> Result<(crate::dtype::Logits<'a>, Targets<'a>, Option<crate::dtype::LogitsMut<'a>>)> {
        let grad = match self.grad {
            GradDest::None => None,
            GradDest::Into(g) => Some(g),
            GradDest::New => {
                return Err(XentError::InvalidOption("this form writes its gradient into a given tensor".into()))
            }
        };
        match self.logits {
            CeLogits::Read(x) => Ok((x, self.targets, grad)),
            CeLogits::InPlace(_) => Err(XentError::InvalidOption("this form does not overwrite its logits".into())),
        }
    }
}

/// A cross-entropy call's logits: read, or overwritten by their gradient.
pub(crate) enum CeLogits<'a> {
    Read(crate::dtype::Logits<'a>),
    InPlace(crate::dtype::LogitsMut<'a>),
}

/// Where a cross-entropy call puts the gradient (both backends).
pub(crate) enum GradDest<'a> {
    /// Loss only.
    None,
    /// A new f32 array, returned in `CeOutput::grad`.
    New,
    /// A caller-owned `[N, V]` tensor of any dtype.
    Into(crate::dtype::LogitsMut<'a>),
}
