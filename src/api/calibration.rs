//! Calibration: expected calibration error with a reliability table, and temperature scaling
//! fitted by a safeguarded root search on d(NLL)/d(1/T), one fused cross-entropy pass per step.

use ndarray::ArrayView2;

use crate::api::config::{CeOutput, CrossEntropy, Reduction};
use crate::api::targets::Targets;
use crate::api::Backend;
use crate::error::{Result, XentError};

/// One equal-width confidence bin.
#[derive(Debug, Clone, PartialEq)]
pub struct Bin {
    /// Lower edge (inclusive, except the first bin includes 0).
    pub lower: f64,
    /// Upper edge.
    pub upper: f64,
    /// Counted rows whose confidence falls here.
    pub count: u64,
    /// Their mean confidence (max probability); NaN when empty.
    pub confidence: f64,
    /// Their top-1 accuracy; NaN when empty.
    pub accuracy: f64,
}

/// Calibration of one set of predictions.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// Mean NLL over counted rows.
    pub nll: f64,
    /// Top-1 accuracy over counted rows.
    pub accuracy: f64,
    /// Expected calibration error: sum over bins of (count / total) |accuracy - confidence|.
    pub ece: f64,
    /// The reliability table.
    pub bins: Vec<Bin>,
}

/// Bins confidence `exp(max - lse)` and correctness (rank 0) of a pass made with `ranks` and `per_row`.
fn from_rows(out: &CeOutput, bins: usize) -> Calibration {
    let (max, lse, rank) = (
        out.row_max.as_ref().expect("ranks"),
        out.row_lse.as_ref().expect("per_row"),
        out.row_rank.as_ref().expect("ranks"),
    );
    let mut acc = vec![(0u64, 0.0f64, 0u64); bins];
    let mut total = 0u64;
    for i in 0..rank.len() {
        if rank[i] == u32::MAX {
            continue;
        }
        let conf = ((max[i] as f64) - (lse[i] as f64)).exp().min(1.0);
        // Bins are (lo, hi]; confidence 0 goes to the first.
        let b = ((conf * bins as f64).ceil() as usize).clamp(1, bins) - 1;
        acc[b].0 += 1;
        acc[b].1 += conf;
        acc[b].2 += (rank[i] == 0) as u64;
        total += 1;
    }
    let mut ece = 0.0;
    let table = acc
        .iter()
        .enumerate()
        .map(|(b, &(n, c, hit))| {
            let (confidence, accuracy) =
                if n == 0 { (f64::NAN, f64::NAN) } else { (c / n as f64, hit as f64 / n as f64) };
            if n > 0 {
                ece += n as f64 / total as f64 * (accuracy - confidence).abs();
            }
            Bin { lower: b as f64 / bins as f64, upper: (b + 1) as f64 / bins as f64, count: n, confidence, accuracy }
        })
        .collect();
    Calibration {
        nll: out.loss,
        accuracy: out.accuracy(1).unwrap_or(f64::NAN),
        ece: if total == 0 { f64::NAN } else { ece },
        bins: table,
    }
}

fn pass(b: &dyn Backend, x: ArrayView2<f32>, t: Targets, temperature: f32, gaps: bool) -> Result<CeOutput> {
    let cfg = CrossEntropy {
        reduction: Reduction::Mean,
        temperature,
        per_row: true,
        ranks: true,
        gaps,
        ..Default::default()
    };
    b.cross_entropy(x, t, &cfg)
}

/// Calibration of `softmax(logits / temperature)` against class-index targets, with `bins`
/// equal-width confidence bins.
///
/// ```
/// use ndarray::array;
/// use xent::{calibration::calibrate, Cpu};
/// let x = array![[4.0f32, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 0.0]];
/// let c = calibrate(&Cpu::new(), x.view(), (&[0i64, 0, 1, 1][..]).into(), 1.0, 10).unwrap();
/// assert_eq!(c.accuracy, 0.75);
/// assert!(c.ece > 0.2); // 98% confident, 75% right
/// ```
pub fn calibrate(
    b: &dyn Backend,
    logits: ArrayView2<f32>,
    targets: Targets,
    temperature: f32,
    bins: usize,
) -> Result<Calibration> {
    if bins == 0 {
        return Err(XentError::InvalidOption("bins must be at least 1".into()));
    }
    Ok(from_rows(&pass(b, logits, targets, temperature, false)?, bins))
}

/// Result of temperature scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct TemperatureFit {
    /// The temperature T minimising mean NLL of `softmax(logits / T)`.
    pub temperature: f64,
    /// Before (T = 1) and after.
    pub before: Calibration,
    /// At the fitted temperature.
    pub after: Calibration,
    /// Cross-entropy passes used by the search.
    pub passes: usize,
}

/// Mean NLL and its derivative w.r.t. beta = 1/T at `beta`: dNLL/dbeta = T mean(E_p[z] - z_y).
fn nll_and_slope(b: &dyn Backend, x: ArrayView2<f32>, t: Targets, beta: f64) -> Result<(f64, f64)> {
    let out = pass(b, x, t, (1.0 / beta) as f32, true)?;
    let gaps = out.row_gap.as_ref().expect("gaps");
    let ranks = out.row_rank.as_ref().expect("ranks");
    let (mut s, mut n) = (0.0f64, 0u64);
    for (g, r) in gaps.iter().zip(ranks.iter()) {
        if *r != u32::MAX {
            s += *g as f64;
            n += 1;
        }
    }
    Ok((out.loss, s / n as f64 / beta))
}

/// Fits the temperature minimising validation NLL. NLL is convex in beta = 1/T, so its
/// derivative is monotone: the search brackets the root by doubling/halving beta, then runs
/// Illinois-modified regula falsi with bisection as the safeguard; every step is one fused
/// pass giving both the NLL and its derivative. Stops when the bracket is narrower than 1e-7
/// relative (a few tens of passes at most).
///
/// ```
/// use ndarray::array;
/// use xent::{calibration::fit_temperature, Cpu};
/// let x = array![[6.0f32, 0.0], [6.0, 0.0], [0.0, 6.0], [6.0, 0.0]];
/// let fit = fit_temperature(&Cpu::new(), x.view(), (&[0i64, 0, 1, 1][..]).into(), 10).unwrap();
/// assert!(fit.temperature > 1.0 && fit.after.nll < fit.before.nll);
/// ```
pub fn fit_temperature(
    b: &dyn Backend,
    logits: ArrayView2<f32>,
    targets: Targets,
    bins: usize,
) -> Result<TemperatureFit> {
    let before = calibrate(b, logits, targets, 1.0, bins)?;
    if before.nll.is_nan() {
        return Err(XentError::InvalidOption("no counted rows to fit a temperature on".into()));
    }
    let mut passes = 1;
    let mut eval = |beta: f64| {
        passes += 1;
        nll_and_slope(b, logits, targets, beta)
    };
    // Bracket the root of the (increasing) slope.
    let (mut lo, mut hi) = (1.0f64, 1.0f64);
    let (_, s1) = eval(1.0)?;
    let (mut s_lo, mut s_hi) = (s1, s1);
    let limit = 1e6;
    while s_lo > 0.0 {
        hi = lo;
        s_hi = s_lo;
        lo /= 2.0;
        if lo < 1.0 / limit {
            break;
        }
        s_lo = eval(lo)?.1;
    }
    while s_hi < 0.0 {
        lo = hi;
        s_lo = s_hi;
        hi *= 2.0;
        if hi > limit {
            break;
        }
        s_hi = eval(hi)?.1;
    }
    let beta = if s_lo > 0.0 {
        lo // optimum below the range: the most uncertain temperature tried
    } else if s_hi < 0.0 {
        hi // separable data: NLL keeps falling as T -> 0
    } else {
        // Illinois: regula falsi that halves a stale end's slope so both ends move.
        let mut side = 0;
        let mut x = 0.5 * (lo + hi);
        for _ in 0..60 {
            if hi - lo <= 1e-7 * hi {
                break;
            }
            x = (lo * s_hi - hi * s_lo) / (s_hi - s_lo);
            if !(x > lo && x < hi) {
                x = 0.5 * (lo + hi);
            }
            let s = eval(x)?.1;
            if s == 0.0 {
                break;
            }
            if s < 0.0 {
                lo = x;
                s_lo = s;
                if side == -1 {
                    s_hi *= 0.5;
                }
                side = -1;
            } else {
                hi = x;
                s_hi = s;
                if side == 1 {
                    s_lo *= 0.5;
                }
                side = 1;
            }
        }
        x
    };
    let temperature = 1.0 / beta;
    let after = calibrate(b, logits, targets, temperature as f32, bins)?;
    Ok(TemperatureFit { temperature, before, after, passes: passes + 1 })
}
