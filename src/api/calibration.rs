//! Calibration: expected calibration error with a reliability table, and temperature scaling
//! fitted by a safeguarded root search on d(NLL)/d(1/T), one fused cross-entropy pass per step.

use crate::api::config::{CeOutput, CrossEntropy, Reduction};
use crate::api::targets::Targets;
use crate::api::Backend;
use crate::dtype::Logits;
use crate::error::{Result, XentError};

/// One equal-width confidence bin.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
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
#[non_exhaustive]
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

/// What a pass over (possibly many blocks of) predictions accumulates: per-bin counts,
/// confidence sums and hits, the NLL and the expected-logit-gap sums. Blocks are added with
/// [`CalibrationAcc::add`] and accumulators merged with [`CalibrationAcc::merge`], so a file
/// larger than memory is calibrated block by block.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationAcc {
    bins: Vec<(u64, f64, u64)>,
    nll: f64,
    gap: f64,
    counted: u64,
    hits: u64,
}

impl CalibrationAcc {
    /// An empty accumulator of `bins` equal-width confidence bins.
    pub fn new(bins: usize) -> Result<CalibrationAcc> {
        if bins == 0 {
            return Err(XentError::InvalidOption("bins must be at least 1".into()));
        }
        Ok(CalibrationAcc {
            bins: crate::alloc::filled(bins, (0, 0.0, 0), "calibration bins")?,
            nll: 0.0,
            gap: 0.0,
            counted: 0,
            hits: 0,
        })
    }

    /// The options of a pass that [`Self::add`] can use, at `temperature`.
    pub fn pass_config(temperature: f32, gaps: bool) -> CrossEntropy {
        CrossEntropy { reduction: Reduction::Sum, temperature, ..Default::default() }
            .with_per_row(true)
            .with_ranks(true)
            .with_gaps(gaps)
    }

    /// Adds a block's results, from a pass with [`Self::pass_config`].
    pub fn add(&mut self, out: &CeOutput) {
        let n_bins = self.bins.len();
        let (max, lse, rank, loss) = (
            out.row_max.as_ref().expect("ranks"),
            out.row_lse.as_ref().expect("per_row"),
            out.row_rank.as_ref().expect("ranks"),
            out.row_loss.as_ref().expect("per_row"),
        );
        for i in 0..rank.len() {
            if rank[i] == u32::MAX {
                continue;
            }
            let conf = ((max[i] as f64) - (lse[i] as f64)).exp().min(1.0);
            // Bins are (lo, hi]; confidence 0 goes to the first.
            let b = ((conf * n_bins as f64).ceil() as usize).clamp(1, n_bins) - 1;
            self.bins[b].0 += 1;
            self.bins[b].1 += conf;
            self.bins[b].2 += (rank[i] == 0) as u64;
            self.nll += loss[i] as f64;
            self.hits += (rank[i] == 0) as u64;
            self.counted += 1;
            if let Some(g) = &out.row_gap {
                self.gap += g[i] as f64;
            }
        }
    }

    /// Adds another accumulator (same bins).
    pub fn merge(&mut self, o: &CalibrationAcc) {
        for (a, b) in self.bins.iter_mut().zip(&o.bins) {
            a.0 += b.0;
            a.1 += b.1;
            a.2 += b.2;
        }
        self.nll += o.nll;
        self.gap += o.gap;
        self.counted += o.counted;
        self.hits += o.hits;
    }

    /// Mean NLL over counted rows (NaN with none).
    pub fn mean_nll(&self) -> f64 {
        if self.counted == 0 {
            f64::NAN
        } else {
            self.nll / self.counted as f64
        }
    }

    /// The calibration report.
    pub fn finish(&self) -> Calibration {
        let n_bins = self.bins.len();
        let total = self.counted;
        let mut ece = 0.0;
        let table = self
            .bins
            .iter()
            .enumerate()
            .map(|(b, &(n, c, hit))| {
                let (confidence, accuracy) =
                    if n == 0 { (f64::NAN, f64::NAN) } else { (c / n as f64, hit as f64 / n as f64) };
                if n > 0 {
                    ece += n as f64 / total as f64 * (accuracy - confidence).abs();
                }
                Bin {
                    lower: b as f64 / n_bins as f64,
                    upper: (b + 1) as f64 / n_bins as f64,
                    count: n,
                    confidence,
                    accuracy,
                }
            })
            .collect();
        let div = |a: f64| if total == 0 { f64::NAN } else { a / total as f64 };
        Calibration {
            nll: div(self.nll),
            accuracy: div(self.hits as f64),
            ece: if total == 0 { f64::NAN } else { ece },
            bins: table,
        }
    }
}

fn pass(b: &dyn Backend, x: Logits, t: Targets, temperature: f32, gaps: bool, bins: usize) -> Result<CalibrationAcc> {
    let out = b.cross_entropy(x, t, &CalibrationAcc::pass_config(temperature, gaps))?;
    let mut acc = CalibrationAcc::new(bins)?;
    acc.add(&out);
    Ok(acc)
}

/// Calibration of `softmax(logits / temperature)` against class-index targets, with `bins`
/// equal-width confidence bins.
///
/// ```
/// use ndarray::array;
/// use xent::{calibration::calibrate, Cpu};
/// let x = array![[4.0f32, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 0.0]];
/// let c = calibrate(&Cpu::new(), &x, &[0i64, 0, 1, 1][..], 1.0, 10).unwrap();
/// assert_eq!(c.accuracy, 0.75);
/// assert!(c.ece > 0.2); // 98% confident, 75% right
/// ```
pub fn calibrate<'a, 'b>(
    b: &dyn Backend,
    logits: impl Into<Logits<'a>>,
    targets: impl Into<Targets<'b>>,
    temperature: f32,
    bins: usize,
) -> Result<Calibration> {
    let (logits, targets) = (logits.into(), targets.into());
    Ok(pass(b, logits, targets, temperature, false, bins)?.finish())
}

/// Result of temperature scaling.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
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
/// let fit = fit_temperature(&Cpu::new(), &x, &[0i64, 0, 1, 1][..], 10).unwrap();
/// assert!(fit.temperature > 1.0 && fit.after.nll < fit.before.nll);
/// ```
pub fn fit_temperature<'a, 'b>(
    b: &dyn Backend,
    logits: impl Into<Logits<'a>>,
    targets: impl Into<Targets<'b>>,
    bins: usize,
) -> Result<TemperatureFit> {
    let (logits, targets) = (logits.into(), targets.into());
    fit_temperature_by(&mut |t, gaps| pass(b, logits, targets, t, gaps, bins))
}

/// [`fit_temperature`] over any source of predictions: `pass(temperature, gaps)` evaluates
/// every row at `temperature` (with expected logit gaps when `gaps`) into one accumulator,
/// e.g. streaming a file block by block.
pub fn fit_temperature_by(pass: &mut dyn FnMut(f32, bool) -> Result<CalibrationAcc>) -> Result<TemperatureFit> {
    let first = pass(1.0, true)?;
    let before = first.finish();
    if first.counted == 0 {
        return Err(XentError::InvalidOption("no counted rows (every target ignored) to fit a temperature on".into()));
    }
    if !before.nll.is_finite() {
        return Err(XentError::InvalidOption(format!(
            "the NLL at T = 1 is {} (non-finite logits?): no temperature can be fitted",
            before.nll
        )));
    }
    let mut passes = 1;
    // Mean NLL and its derivative w.r.t. beta = 1/T: dNLL/dbeta = T mean(E_p[z] - z_y).
    let slope = |acc: &CalibrationAcc, beta: f64| acc.gap / acc.counted as f64 / beta;
    let mut eval = |beta: f64| -> Result<f64> {
        passes += 1;
        let acc = pass((1.0 / beta) as f32, true)?;
        let s = slope(&acc, beta);
        if !s.is_finite() {
            return Err(XentError::InvalidOption(format!(
                "the NLL's slope at T = {} is not finite: no temperature can be fitted",
                1.0 / beta
            )));
        }
        Ok(s)
    };
    // Bracket the root of the (increasing) slope.
    let (mut lo, mut hi) = (1.0f64, 1.0f64);
    let s1 = slope(&first, 1.0);
    if s1 == 0.0 {
        return Ok(TemperatureFit { temperature: 1.0, after: before.clone(), before, passes: 1 });
    }
    let (mut s_lo, mut s_hi) = (s1, s1);
    let limit = 1e6;
    while s_lo > 0.0 {
        hi = lo;
        s_hi = s_lo;
        lo /= 2.0;
        if lo < 1.0 / limit {
            break;
        }
        s_lo = eval(lo)?;
    }
    // A slope of exactly 0 on the way up is saturation (every probability 0 or 1, separable
    // data), not the optimum: keep going, and report it if the bracket runs out.
    while s_hi < 0.0 || (s_hi == 0.0 && hi > 1.0) {
        if s_hi < 0.0 {
            lo = hi;
            s_lo = s_hi;
        }
        hi *= 2.0;
        if hi > limit {
            s_hi = -1.0;
            break;
        }
        s_hi = eval(hi)?;
    }
    if s_lo > 0.0 || s_hi < 0.0 {
        // The optimum lies outside T in [1e-6, 1e6]: say so rather than report the cap as a fit.
        let side = if s_lo > 0.0 {
            "above 1e6 (predictions carry no information)"
        } else {
            "below 1e-6 (the data is separable)"
        };
        return Err(XentError::InvalidOption(format!(
            "the NLL-minimising temperature lies {side}: the search bracket [1e-6, 1e6] does not contain it"
        )));
    }
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
        let s = eval(x)?;
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
    let temperature = 1.0 / x;
    let after = pass(temperature as f32, false)?.finish();
    Ok(TemperatureFit { temperature, before, after, passes: passes + 1 })
}
