//! Input checks shared by every backend, so that all of them reject the same inputs the same
//! way. Public so that front ends (the `xent` command line, framework integrations) can check a
//! call before they open a device or read a large file.
//!
//! What is refused, before any work and with the same [`XentError`] on the CPU and the GPU:
//! - shapes that disagree (targets, sample weights, class weights, probability targets);
//! - class indices outside `0..V` that are not the ignore index ([`XentError::TargetOutOfRange`]);
//! - probability targets with a NaN, infinite or negative entry, and class, sample or BCE
//!   weights with a NaN or infinite entry ([`XentError::InvalidValue`], which names the input
//!   and the entry: `class_weight must be finite, got NaN at index 2`). PyTorch computes on and
//!   returns NaN for these; xent refuses them, because a NaN loss hours into a run says neither
//!   which input nor which entry was bad. A front end names the input in its own words (the
//!   command line says `--class-weight w.npy`, and checks a large `--target-probs` file block
//!   by block with [`target_probabilities`], giving the file's row).
//!
//! What is accepted, as in PyTorch: probability rows that do not sum to 1, negative or zero
//! weights, and NaN or infinite logits (scored as PyTorch scores them: `-inf` masks a class, a
//! NaN makes its row's loss NaN).

use ndarray::{ArrayView, ArrayView2, Dimension};

use crate::api::config::LinearCe;
use crate::api::config::{CallData, CrossEntropy};
use crate::api::targets::Targets;
use crate::dtype::DType;
use crate::error::{Result, XentError};

/// Checks a cross-entropy call: logits of `shape = (N, V)` with at least one class, targets
/// with N rows (probability targets: `[N, V]`, finite and non-negative), sample weights with N
/// entries, and the options against V. Class indices are range-checked by the call itself.
///
/// ```
/// use xent::{check, CrossEntropy};
/// let cfg = CrossEntropy::default();
/// assert!(check::cross_entropy((2, 5), &(&[0i64, 4][..]).into(), &cfg).is_ok());
/// assert!(check::cross_entropy((3, 5), &(&[0i64, 4][..]).into(), &cfg).is_err());
/// ```
pub fn cross_entropy(shape: (usize, usize), targets: &Targets, cfg: &CrossEntropy) -> Result<()> {
    ce_call(shape, targets, cfg, &cfg.call_data())
}

/// The checks of [`cross_entropy`] that depend on the options and the number of classes only
/// (not on the rows, their targets or their sample weights): for a caller that checks the
/// options once and its rows' data per call.
///
/// ```
/// use xent::{check, CrossEntropy};
/// assert!(check::cross_entropy_options(5, &CrossEntropy::default().with_label_smoothing(0.1)).is_ok());
/// assert!(check::cross_entropy_options(5, &CrossEntropy::default().with_label_smoothing(2.0)).is_err());
/// assert!(check::cross_entropy_options(0, &CrossEntropy::default()).is_err());
/// ```
pub fn cross_entropy_options(classes: usize, cfg: &CrossEntropy) -> Result<()> {
    if classes == 0 {
        return Err(XentError::Shape("logits have no classes".into()));
    }
    definition(classes, cfg)?;
    cfg.call_data().validate(cfg)
}

/// The definition's checks against `classes` (not 0).
fn definition(classes: usize, cfg: &CrossEntropy) -> Result<()> {
    if classes > i32::MAX as usize {
        return Err(XentError::Shape(format!("{classes} classes do not fit 32-bit class indices")));
    }
    cfg.validate_definition(classes)
}

/// [`cross_entropy`]'s checks of a call whose data is given apart from the definition `cfg`.
pub(crate) fn ce_call(shape: (usize, usize), targets: &Targets, cfg: &CrossEntropy, call: &CallData<'_>) -> Result<()> {
    let (n, v) = shape;
    if v == 0 {
        return Err(XentError::Shape(format!("logits [{n}, 0] have no classes")));
    }
    if targets.len() != n {
        return Err(XentError::Shape(format!("logits have {n} rows but targets have {}", targets.len())));
    }
    if let Some(w) = &call.sample_weight {
        if w.len() != n {
            return Err(XentError::Shape(format!(
                "sample_weight has {} entries but the logits have {n} rows",
                w.len()
            )));
        }
        finite_values(w.view(), "sample_weight")?;
    }
    definition(v, cfg)?;
    call.validate(cfg)?;
    if let Targets::Probs(probs) = targets {
        if probs.dim() != (n, v) {
            return Err(XentError::Shape(format!(
                "logits are [{n}, {v}] but target probabilities are {:?}",
                probs.dim()
            )));
        }
        target_probabilities(probs.view(), 0, "target probabilities")?;
    }
    Ok(())
}

/// Checks that every entry of a weight tensor (class weights, sample weights, BCE weights) is
/// finite, naming the first that is not as `input` and its index. Weights may be negative or
/// zero, as in PyTorch; a NaN or infinite weight is refused on every backend rather than turned
/// into a NaN loss.
///
/// ```
/// use ndarray::array;
/// use xent::check;
/// assert!(check::finite_values(array![0.5f32, -1.0, 0.0].view(), "class_weight").is_ok());
/// let e = check::finite_values(array![1.0f32, f32::INFINITY].view(), "--class-weight w.npy");
/// assert_eq!(e.unwrap_err().to_string(), "--class-weight w.npy must be finite, got inf at index 1");
/// ```
pub fn finite_values<D: Dimension>(values: ArrayView<f32, D>, input: &str) -> Result<()> {
    crate::error::finite(values, input)
}

/// Checks probability targets: every entry finite and `>= 0` (rows need not sum to 1, as in
/// PyTorch). `first_row` is the row of `probs[0]` in the whole input (for a front end that
/// checks a large file block by block), so the error names the row the user would look at.
///
/// ```
/// use ndarray::array;
/// use xent::check;
/// let p = array![[0.5f32, 0.5], [0.2, f32::NAN]];
/// let e = check::target_probabilities(p.view(), 10, "target probabilities").unwrap_err();
/// assert_eq!(e.to_string(), "target probabilities must be finite and >= 0, got NaN at row 11, column 1");
/// ```
pub fn target_probabilities(probs: ArrayView2<f32>, first_row: usize, input: &str) -> Result<()> {
    probabilities(probs.indexed_iter().map(|(at, &p)| (at, p as f64)), first_row, input)
}

/// The first entry of a probability matrix that is NaN, infinite or negative, as an error.
fn probabilities(
    mut entries: impl Iterator<Item = ((usize, usize), f64)>,
    first_row: usize,
    input: &str,
) -> Result<()> {
    match entries.find(|(_, p)| !(*p >= 0.0 && p.is_finite())) {
        Some(((r, c), p)) => Err(XentError::InvalidValue {
            input: input.to_string(),
            domain: "finite and >= 0".into(),
            value: p,
            index: vec![first_row + r, c],
        }),
        None => Ok(()),
    }
}

/// Checks that every class-index target is in `[0, classes)` or equals `ignore_index` (the
/// kernels report the first bad row themselves; this is for callers that must know before).
///
/// ```
/// use xent::check;
/// assert!(check::class_targets(&(&[0i64, -100, 4][..]).into(), 5, -100).is_ok());
/// assert!(check::class_targets(&(&[0i64, 5][..]).into(), 5, -100).is_err());
/// ```
pub fn class_targets(targets: &Targets, classes: usize, ignore_index: i64) -> Result<()> {
    let bad = |(row, t): (usize, i64)| (t != ignore_index && (t < 0 || t >= classes as i64)).then_some((row, t));
    let first = match targets {
        Targets::I64(t) => t.iter().copied().enumerate().find_map(bad),
        Targets::I32(t) => t.iter().map(|&t| t as i64).enumerate().find_map(bad),
        Targets::Probs(_) => None,
    };
    match first {
        Some((row, target)) => Err(XentError::TargetOutOfRange { row, target, classes }),
        None => Ok(()),
    }
}

/// Whether BCE's input is logits or probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BceInput {
    /// Logits (`binary_cross_entropy_with_logits`).
    Logits,
    /// Probabilities in [0, 1] (`binary_cross_entropy`).
    Probs,
}

/// Checks binary cross-entropy inputs: equal shapes, targets in [0, 1], probabilities in
/// [0, 1], weights that broadcast, pos_weight only with logits.
pub fn bce_inputs(
    x: ArrayView2<f32>,
    y: ArrayView2<f32>,
    cfg: &crate::api::config::Bce,
    input: BceInput,
) -> Result<()> {
    use crate::api::config::BceWeight;
    let (n, c) = x.dim();
    if y.dim() != (n, c) {
        return Err(XentError::Shape(format!("inputs are [{n}, {c}] but targets are {:?}", y.dim())));
    }
    let bad_y = y.indexed_iter().find(|(_, &t)| !(0.0..=1.0).contains(&t));
    if let Some(((r, k), &t)) = bad_y {
        return Err(XentError::InvalidOption(format!("targets must be in [0, 1], got {t} at [{r}, {k}]")));
    }
    if input == BceInput::Probs {
        if let Some(((r, k), &p)) = x.indexed_iter().find(|(_, &p)| !(0.0..=1.0).contains(&p)) {
            return Err(XentError::InvalidOption(format!("probabilities must be in [0, 1], got {p} at [{r}, {k}]")));
        }
        if cfg.pos_weight.is_some() {
            return Err(XentError::InvalidOption("pos_weight applies to logits only".into()));
        }
    }
    match &cfg.weight {
        Some(BceWeight::PerClass(w)) if w.len() != c => {
            return Err(XentError::Shape(format!("weight has {} entries but the inputs have {c} columns", w.len())))
        }
        Some(BceWeight::PerElement(w)) if w.dim() != (n, c) => {
            return Err(XentError::Shape(format!("weight is {:?} but the inputs are [{n}, {c}]", w.dim())))
        }
        Some(BceWeight::PerClass(w)) => finite_values(w.view(), "weight")?,
        Some(BceWeight::PerElement(w)) => finite_values(w.view(), "weight")?,
        None => {}
    }
    if let Some(pw) = &cfg.pos_weight {
        if pw.len() != c {
            return Err(XentError::Shape(format!(
                "pos_weight has {} entries but the inputs have {c} columns",
                pw.len()
            )));
        }
        finite_values(pw.view(), "pos_weight")?;
    }
    if !cfg.grad_scale.is_finite() {
        return Err(XentError::InvalidOption(format!("grad_scale must be finite, got {}", cfg.grad_scale)));
    }
    Ok(())
}

/// Two row sets of the same shape with at least one column.
pub fn same_rows(a: (usize, usize), b: (usize, usize), what: &str) -> Result<()> {
    if a != b {
        return Err(XentError::Shape(format!("{what}: shapes {a:?} and {b:?} differ")));
    }
    if a.1 == 0 {
        return Err(XentError::Shape(format!("{what}: rows have no classes")));
    }
    Ok(())
}

/// Probability rows: finite and non-negative.
pub fn probability_rows(p: ArrayView2<f64>, what: &str) -> Result<()> {
    probabilities(p.indexed_iter().map(|(at, &v)| (at, v)), 0, what)
}

/// Checks the operands and options of a fused linear loss before any work: `hidden [N, D]`
/// and `weight [V, D]` (each its shape and dtype; a vocabulary shard's weight is `[V_local, D]`)
/// with one inner dimension and one dtype, a bias of `bias_len = V` entries, no preset
/// `totals`, a positive `workspace_bytes`. Returns `(N, D, V)`. The library's linear losses
/// call it; a framework integration calls it on its tensors' shapes before it reads them.
///
/// ```
/// use xent::{check, DType, LinearCe};
/// let cfg = LinearCe::default();
/// assert_eq!(check::linear_operands(((4, 8), DType::F32), ((10, 8), DType::F32), Some(10), &cfg)?, (4, 8, 10));
/// let e = check::linear_operands(((4, 8), DType::F32), ((10, 7), DType::F32), None, &cfg).unwrap_err();
/// assert!(e.to_string().contains("inner dimensions differ"));
/// # Ok::<(), xent::XentError>(())
/// ```
pub fn linear_operands(
    ((n, d), hidden_dtype): ((usize, usize), DType),
    ((v, dw), weight_dtype): ((usize, usize), DType),
    bias_len: Option<usize>,
    cfg: &LinearCe,
) -> Result<(usize, usize, usize)> {
    if d != dw {
        return Err(XentError::Shape(format!(
            "hidden is [{n}, {d}] but weight is [{v}, {dw}]: the inner dimensions differ"
        )));
    }
    if hidden_dtype != weight_dtype {
        return Err(XentError::InvalidOption(format!(
            "hidden is {hidden_dtype} but weight is {weight_dtype}: give both in one dtype"
        )));
    }
    if let Some(b) = bias_len {
        if b != v {
            return Err(XentError::Shape(format!("bias has {b} entries for {v} classes")));
        }
    }
    if cfg.ce.data.totals.is_some() {
        return Err(XentError::InvalidOption("LinearCe computes its own totals: leave ce.data.totals unset".into()));
    }
    if cfg.workspace_bytes == Some(0) {
        return Err(XentError::InvalidOption("workspace_bytes must be positive".into()));
    }
    Ok((n, d, v))
}
