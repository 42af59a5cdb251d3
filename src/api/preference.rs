//! Pairwise preference losses (the cross-entropy of a Bradley-Terry model): mean of
//! `-log sigmoid(beta (chosen - rejected) - margin)`, and DPO, whose scores are policy-minus-
//! reference log-probabilities. Evaluated as binary cross-entropy with logits (target 1), so it
//! is stable for any score difference and runs on either backend.

use ndarray::{Array1, Array2, ArrayView1};

use crate::api::config::{Bce, Reduction};
use crate::api::Backend;
use crate::error::{Result, XentError};

/// Options of the pairwise preference loss.
///
/// Built from [`Default`] with the `with_*` builders or by assigning fields (the struct is
/// `#[non_exhaustive]`, so that new options are not breaking changes):
///
/// ```
/// use xent::{preference::Preference, Reduction};
/// let cfg = Preference::default().with_beta(0.1).with_margin(0.5).with_reduction(Reduction::Sum).with_grad(true);
/// let mut same = Preference::default();
/// (same.beta, same.margin, same.reduction, same.grad) = (0.1, 0.5, Reduction::Sum, true);
/// assert_eq!(cfg, same);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Preference {
    /// Scale of the score difference (DPO's beta).
    pub beta: f32,
    /// Margin subtracted from the scaled difference.
    pub margin: f32,
    /// How pairs are combined.
    pub reduction: Reduction,
    /// Also return gradients w.r.t. the chosen and rejected scores.
    pub grad: bool,
}

impl Default for Preference {
    fn default() -> Self {
        Preference { beta: 1.0, margin: 0.0, reduction: Reduction::Mean, grad: false }
    }
}

with_builders!(Preference {
    set with_beta => beta: f32,
    set with_margin => margin: f32,
    set with_reduction => reduction: Reduction,
    set with_grad => grad: bool,
});

/// Result of a preference loss (`#[non_exhaustive]`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PreferenceOutput {
    /// The reduced loss (sum of pair losses for `None`).
    pub loss: f64,
    /// Per-pair losses, for `Reduction::None`.
    pub pair_loss: Option<Array1<f32>>,
    /// Fraction of pairs whose (scaled, margin-adjusted) difference is positive.
    pub accuracy: f64,
    /// d(loss)/d(chosen).
    pub grad_chosen: Option<Array1<f32>>,
    /// d(loss)/d(rejected).
    pub grad_rejected: Option<Array1<f32>>,
}

/// Bradley-Terry loss of score pairs.
///
/// ```
/// use ndarray::array;
/// use xent::{preference::{preference, Preference}, Cpu};
/// let out = preference(&Cpu::new(), array![2.0f32, 0.0].view(), array![0.0f32, 0.0].view(), &Preference::default()).unwrap();
/// let want = ((1.0 + (-2.0f64).exp()).ln() + 2f64.ln()) / 2.0;
/// assert!((out.loss - want).abs() < 1e-7);
/// ```
pub fn preference(
    b: &dyn Backend,
    chosen: ArrayView1<f32>,
    rejected: ArrayView1<f32>,
    cfg: &Preference,
) -> Result<PreferenceOutput> {
    if chosen.len() != rejected.len() {
        return Err(XentError::Shape(format!("{} chosen but {} rejected scores", chosen.len(), rejected.len())));
    }
    if !(cfg.beta.is_finite() && cfg.beta > 0.0 && cfg.margin.is_finite()) {
        return Err(XentError::InvalidOption(format!(
            "beta must be > 0 and margin finite, got {} and {}",
            cfg.beta, cfg.margin
        )));
    }
    let n = chosen.len();
    let d: Array2<f32> = Array2::from_shape_fn((n, 1), |(i, _)| cfg.beta * (chosen[i] - rejected[i]) - cfg.margin);
    if let Some(i) = d.iter().position(|v| !v.is_finite()) {
        return Err(XentError::InvalidOption(format!("score difference of pair {i} is not finite")));
    }
    let ones = Array2::from_elem((n, 1), 1.0f32);
    let out = b.bce_with_logits(
        d.view(),
        ones.view(),
        &Bce { reduction: cfg.reduction, grad: cfg.grad, ..Default::default() },
    )?;
    let accuracy = d.iter().filter(|&&v| v > 0.0).count() as f64 / n as f64;
    let (gc, gr) = match out.grad {
        Some(g) => {
            let gd = g.column(0).to_owned();
            (Some(gd.mapv(|v| cfg.beta * v)), Some(gd.mapv(|v| -cfg.beta * v)))
        }
        None => (None, None),
    };
    Ok(PreferenceOutput {
        loss: out.loss,
        pair_loss: out.elem_loss.map(|e| e.column(0).to_owned()),
        accuracy,
        grad_chosen: gc,
        grad_rejected: gr,
    })
}

/// DPO: preference on `policy - reference` log-probabilities of the chosen and rejected
/// responses, scaled by `beta` (Rafailov et al.); gradients are w.r.t. the policy log-probs.
pub fn dpo(
    b: &dyn Backend,
    policy_chosen: ArrayView1<f32>,
    policy_rejected: ArrayView1<f32>,
    ref_chosen: ArrayView1<f32>,
    ref_rejected: ArrayView1<f32>,
    cfg: &Preference,
) -> Result<PreferenceOutput> {
    if ref_chosen.len() != policy_chosen.len() || ref_rejected.len() != policy_rejected.len() {
        return Err(XentError::Shape("policy and reference log-probabilities differ in length".into()));
    }
    let c = &policy_chosen - &ref_chosen;
    let r = &policy_rejected - &ref_rejected;
    preference(b, c.view(), r.view(), cfg)
}
