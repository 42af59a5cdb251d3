//! The f64 reference: plain, obviously-correct loops that tests compare both fast paths against.
//!
//! Same signatures and semantics as the GPU kernels and the fast CPU path, computed in f64
//! from the f32 inputs.

use ndarray::{Array1, Array2, ArrayView2, Axis};

use crate::api::config::{CrossEntropy, Distill, DistillOutput, Reduction, SoftmaxKind};
use crate::api::targets::{Targets, IGNORED};
use crate::dtype::Logits;
use crate::error::{Result, XentError};

/// Cross-entropy results in f64.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RefCe {
    /// Reduced loss (sum of row losses for `Reduction::None`).
    pub loss: f64,
    /// Counted (non-ignored) rows.
    pub counted: u64,
    /// Sum of the weights of counted rows.
    pub weight_sum: f64,
    /// Per-row losses including the z-loss term (0 for ignored rows).
    pub row_loss: Array1<f64>,
    /// Per-row log-sum-exp of the transformed logits.
    pub row_lse: Array1<f64>,
    /// Gradient of `loss` w.r.t. the logits, times `grad_scale`.
    pub grad: Array2<f64>,
    /// Per-row max of the transformed logits.
    pub row_max: Array1<f64>,
    /// Per-row rank of the target (`u32::MAX` for ignored rows).
    pub row_rank: Array1<u32>,
    /// Per-row `E_p[z] - z_target` (0 for ignored rows).
    pub row_gap: Array1<f64>,
}

fn transform(cfg: &CrossEntropy, x: f64) -> (f64, f64) {
    // Returns z and dz/dx.
    let t = cfg.temperature as f64;
    match cfg.softcap {
        Some(c) => {
            let c = c as f64;
            let th = (x / t / c).tanh();
            (c * th, (1.0 - th * th) / t)
        }
        None => (x / t, 1.0 / t),
    }
}

/// `m + ln(sum_j exp(z_j - m))` for the maximum `m` of `z`, with one occurrence of `m` kept
/// out of the sum and added back by `ln_1p`: adding thousands of tiny terms to that 1 would
/// round each to f64's ulp of 1, which leaves a confident row at a 4k vocabulary 1e-5 off.
/// A non-finite `m` takes the plain form (its NaN or infinity as before).
fn lse_of(z: impl Iterator<Item = f64>, m: f64) -> f64 {
    if !m.is_finite() {
        return m + z.map(|z| (z - m).exp()).sum::<f64>().ln();
    }
    let mut first = true;
    let s: f64 = z.filter(|&z| !(z == m && std::mem::take(&mut first))).map(|z| (z - m).exp()).sum();
    m + s.ln_1p()
}

/// Knowledge distillation (see [`Distill`]) in f64 per element from logits of any dtypes, one
/// thread: the loss, the per-row divergences and, with `grad`, the f32 gradient w.r.t. the
/// student logits.
pub fn distill<'a, 'b>(
    student: impl Into<Logits<'a>>,
    teacher: impl Into<Logits<'b>>,
    cfg: &Distill,
    grad: bool,
) -> Result<DistillOutput> {
    crate::cpu::divergence::distill_with(None, student.into(), teacher.into(), cfg, grad, true)
}

/// Softmax cross-entropy in f64 (see [`CrossEntropy`] for the formula), with class-index or
/// probability targets, from logits of any dtype (widened exactly to f64).
pub fn cross_entropy<'a>(
    logits: impl Into<Logits<'a>>,
    targets: impl Into<Targets<'a>>,
    cfg: &CrossEntropy,
) -> Result<RefCe> {
    let logits = logits.into().to_f32();
    let logits = logits.view();
    let targets = targets.into();
    if let Targets::Probs(p) = targets {
        return cross_entropy_soft(logits, p, cfg);
    }
    let (n, v) = logits.dim();
    crate::check::cross_entropy((n, v), &targets, cfg)?;
    let t = targets.normalise(v, cfg.ignore_index)?;
    let cw = |c: usize| cfg.class_weight.as_ref().map_or(1.0, |w| w[c] as f64);
    let sw = |r: usize| cfg.data.sample_weight.as_ref().map_or(1.0, |w| w[r] as f64);
    let eps = cfg.label_smoothing as f64;
    let zl = cfg.z_loss as f64;
    let wtot: f64 = (0..v).map(cw).sum();

    let mut counted = 0u64;
    let mut weight_sum = 0.0;
    for (r, &tr) in t.iter().enumerate() {
        if tr != IGNORED {
            counted += 1;
            weight_sum += sw(r) * cw(tr as usize);
        }
    }
    let scale = cfg.grad_scale as f64;
    let (den_n, den_w) = cfg.data.totals.map_or((counted, weight_sum), |t| (t.counted, t.weight_sum));
    let (a, b) = match cfg.reduction {
        Reduction::Mean => (scale / den_w, scale / den_n as f64),
        _ => (scale, scale),
    };

    let mut row_loss = Array1::zeros(n);
    let mut row_lse = Array1::zeros(n);
    let mut row_max = Array1::zeros(n);
    let mut row_rank = Array1::from_elem(n, u32::MAX);
    let mut row_gap = Array1::zeros(n);
    let mut grad = Array2::zeros((n, v));
    let (mut sum_l, mut sum_z) = (0.0, 0.0);
    for (r, row) in logits.axis_iter(Axis(0)).enumerate() {
        let zd: Vec<(f64, f64)> = row.iter().map(|&x| transform(cfg, x as f64)).collect();
        let m = zd.iter().fold(f64::NEG_INFINITY, |m, &(z, _)| if z > m { z } else { m });
        let lse = lse_of(zd.iter().map(|&(z, _)| z), m);
        row_lse[r] = lse;
        row_max[r] = m;
        if t[r] == IGNORED {
            continue;
        }
        let y = t[r] as usize;
        row_rank[r] = zd.iter().filter(|&&(z, _)| z > zd[y].0).count() as u32;
        row_gap[r] = zd.iter().map(|&(z, _)| (z - lse).exp() * z).sum::<f64>() - zd[y].0;
        let w = sw(r) * cw(y);
        let mut l = w * (1.0 - eps) * (lse - zd[y].0);
        if eps > 0.0 {
            let smooth: f64 = (0..v).map(|c| cw(c) * (lse - zd[c].0)).sum();
            l += sw(r) * eps / v as f64 * smooth;
        }
        sum_l += l;
        sum_z += zl * lse * lse;
        row_loss[r] = l + zl * lse * lse;
        for c in 0..v {
            let p = (zd[c].0 - lse).exp();
            let hit = if c == y { 1.0 } else { 0.0 };
            let g = a * w * (1.0 - eps) * (p - hit)
                + a * sw(r) * eps / v as f64 * (wtot * p - cw(c))
                + b * 2.0 * zl * lse * p;
            grad[[r, c]] = g * zd[c].1;
        }
    }
    let loss = match cfg.reduction {
        Reduction::Mean => sum_l / den_w + sum_z / den_n as f64,
        _ => sum_l + sum_z,
    };
    Ok(RefCe { loss, counted, weight_sum, row_loss, row_lse, grad, row_max, row_rank, row_gap })
}

/// Cross-entropy with probability targets in f64 (see [`crate::Cpu::cross_entropy`]).
fn cross_entropy_soft(logits: ArrayView2<f32>, probs: ArrayView2<f32>, cfg: &CrossEntropy) -> Result<RefCe> {
    let (n, v) = logits.dim();
    crate::check::cross_entropy((n, v), &Targets::Probs(probs), cfg)?;
    let cw = |c: usize| cfg.class_weight.as_ref().map_or(1.0, |w| w[c] as f64);
    let sw = |r: usize| cfg.data.sample_weight.as_ref().map_or(1.0, |w| w[r] as f64);
    let eps = cfg.label_smoothing as f64;
    let zl = cfg.z_loss as f64;
    let weight_sum: f64 = (0..n).map(sw).sum();
    let scale = cfg.grad_scale as f64;
    let (a, b) = match cfg.reduction {
        Reduction::Mean => (scale / weight_sum, scale / n as f64),
        _ => (scale, scale),
    };
    let mut row_loss = Array1::zeros(n);
    let mut row_lse = Array1::zeros(n);
    let mut grad = Array2::zeros((n, v));
    let (mut sum_l, mut sum_z) = (0.0, 0.0);
    for r in 0..n {
        let zd: Vec<(f64, f64)> = logits.row(r).iter().map(|&x| transform(cfg, x as f64)).collect();
        let m = zd.iter().fold(f64::NEG_INFINITY, |m, &(z, _)| if z > m { z } else { m });
        let lse = lse_of(zd.iter().map(|&(z, _)| z), m);
        let q: Vec<f64> = (0..v).map(|c| cw(c) * ((1.0 - eps) * probs[[r, c]] as f64 + eps / v as f64)).collect();
        let sq: f64 = q.iter().sum();
        let l = sw(r) * (0..v).map(|c| q[c] * (lse - zd[c].0)).sum::<f64>();
        row_lse[r] = lse;
        row_loss[r] = l + zl * lse * lse;
        sum_l += l;
        sum_z += zl * lse * lse;
        for c in 0..v {
            let p = (zd[c].0 - lse).exp();
            grad[[r, c]] = (a * sw(r) * (sq * p - q[c]) + b * 2.0 * zl * lse * p) * zd[c].1;
        }
    }
    let loss = match cfg.reduction {
        Reduction::Mean => sum_l / weight_sum + sum_z / n as f64,
        _ => sum_l + sum_z,
    };
    let (row_max, row_rank, row_gap) = (Array1::zeros(n), Array1::from_elem(n, u32::MAX), Array1::zeros(n));
    Ok(RefCe { loss, counted: n as u64, weight_sum, row_loss, row_lse, grad, row_max, row_rank, row_gap })
}

/// Row-wise log-softmax or softmax in f64.
pub fn log_softmax<'a>(logits: impl Into<Logits<'a>>, kind: SoftmaxKind) -> Result<Array2<f64>> {
    let logits = logits.into().to_f32();
    let (n, v) = logits.dim();
    if v == 0 {
        return Err(XentError::Shape(format!("logits [{n}, 0] have no classes")));
    }
    let mut out = Array2::zeros((n, v));
    for (r, row) in logits.axis_iter(Axis(0)).enumerate() {
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let lse = lse_of(row.iter().map(|&x| x as f64), m);
        for (c, &x) in row.iter().enumerate() {
            let ls = x as f64 - lse;
            out[[r, c]] = match kind {
                SoftmaxKind::LogSoftmax => ls,
                SoftmaxKind::Softmax => ls.exp(),
            };
        }
    }
    Ok(out)
}
