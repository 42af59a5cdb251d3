//! The CPU backend: a fast f32 path (rayon + vectorised primitives) and the f64 reference.

pub(crate) mod bce;
mod cross_entropy;
pub(crate) mod divergence;
mod hessian;
mod log_softmax;
pub mod reference;
mod simd;

pub(crate) use cross_entropy::reduce;
pub use hessian::{hessian, symmetric_eigenvalues};

use ndarray::{Array2, ArrayView2, ArrayViewMut2};

use crate::api::check::BceInput;
use crate::api::config::{
    Bce, BceOutput, CeOutput, CrossEntropy, Distill, DistillOutput, GradMode, Measures, SoftmaxKind,
};
use crate::api::targets::Targets;
use crate::error::{Result, XentError};
use cross_entropy::{Logits, Target};

/// The CPU backend. Owns a thread pool (one thread per core by default).
///
/// ```
/// use ndarray::array;
/// use xent::{Cpu, CrossEntropy};
/// let cpu = Cpu::new();
/// let logits = array![[2.0f32, 0.5, -1.0], [0.0, 0.0, 0.0]];
/// let out = cpu.cross_entropy(logits.view(), (&[0i64, 2][..]).into(), &CrossEntropy::default()).unwrap();
/// assert!((out.loss - 0.669_962).abs() < 1e-5);
/// ```
pub struct Cpu {
    pool: rayon::ThreadPool,
}

impl Default for Cpu {
    fn default() -> Self {
        Self::new()
    }
}

impl Cpu {
    /// A backend with one thread per available core.
    pub fn new() -> Self {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_threads(n).expect("a thread pool with the machine's core count")
    }

    /// A backend with exactly `threads` worker threads.
    pub fn with_threads(threads: usize) -> Result<Self> {
        if threads == 0 {
            return Err(XentError::InvalidOption("threads must be at least 1".into()));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("xent-cpu-{i}"))
            .build()
            .map_err(|e| XentError::InvalidOption(format!("thread pool: {e}")))?;
        Ok(Cpu { pool })
    }

    /// Worker threads in use.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Softmax cross-entropy with class-index targets (see [`CrossEntropy`]).
    ///
    /// `GradMode::InPlace` is rejected here; use [`Cpu::cross_entropy_in_place`].
    pub fn cross_entropy(&self, logits: ArrayView2<f32>, targets: Targets, cfg: &CrossEntropy) -> Result<CeOutput> {
        if cfg.grad == GradMode::InPlace {
            return Err(XentError::InvalidOption(
                "GradMode::InPlace needs mutable logits: call cross_entropy_in_place".into(),
            ));
        }
        cross_entropy::cross_entropy(&self.pool, Logits::View(logits), Target::Classes(targets), cfg, None)
    }

    /// Cross-entropy whose gradient (`GradMode::Separate` implied) is written into `grad`, a
    /// caller-owned `[N, V]` array: a training loop reuses it and allocates nothing per call.
    ///
    /// ```
    /// use ndarray::{array, Array2};
    /// use xent::{Cpu, CrossEntropy};
    /// let cpu = Cpu::new();
    /// let x = array![[1.0f32, 2.0, 3.0]];
    /// let mut g = Array2::zeros((1, 3));
    /// cpu.cross_entropy_into(x.view(), (&[2i64][..]).into(), &CrossEntropy::default(), g.view_mut()).unwrap();
    /// assert!(g[[0, 2]] < 0.0 && g[[0, 0]] > 0.0);
    /// ```
    pub fn cross_entropy_into(
        &self,
        logits: ArrayView2<f32>,
        targets: Targets,
        cfg: &CrossEntropy,
        mut grad: ArrayViewMut2<f32>,
    ) -> Result<CeOutput> {
        if grad.dim() != logits.dim() {
            return Err(XentError::Shape(format!(
                "gradient {:?} and logits {:?} differ in shape",
                grad.dim(),
                logits.dim()
            )));
        }
        let cfg = CrossEntropy { grad: GradMode::Separate, ..cfg.clone() };
        match grad.as_slice_mut() {
            Some(g) => {
                cross_entropy::cross_entropy(&self.pool, Logits::View(logits), Target::Classes(targets), &cfg, Some(g))
            }
            None => {
                let mut out = cross_entropy::cross_entropy(
                    &self.pool,
                    Logits::View(logits),
                    Target::Classes(targets),
                    &cfg,
                    None,
                )?;
                grad.assign(out.grad.as_ref().expect("gradient"));
                out.grad = None;
                Ok(out)
            }
        }
    }

    /// Cross-entropy that overwrites `logits` with the gradient (whatever `cfg.grad` says).
    pub fn cross_entropy_in_place(
        &self,
        mut logits: ArrayViewMut2<f32>,
        targets: Targets,
        cfg: &CrossEntropy,
    ) -> Result<CeOutput> {
        let dim = logits.dim();
        let cfg = CrossEntropy { grad: GradMode::InPlace, ..cfg.clone() };
        match logits.as_slice_mut() {
            Some(x) => {
                cross_entropy::cross_entropy(&self.pool, Logits::InPlace(x, dim), Target::Classes(targets), &cfg, None)
            }
            None => {
                let mut tmp = logits.as_standard_layout().into_owned();
                let out = cross_entropy::cross_entropy(
                    &self.pool,
                    Logits::InPlace(tmp.as_slice_mut().expect("standard layout"), dim),
                    Target::Classes(targets),
                    &cfg,
                    None,
                )?;
                logits.assign(&tmp);
                Ok(out)
            }
        }
    }

    /// Cross-entropy with probability targets `[N, V]` (soft labels), as PyTorch's
    /// `cross_entropy` with a float target:
    ///
    /// ```text
    /// q_nc = (1 - eps) y_nc + eps / V
    /// L_n  = sample_weight[n] sum_c class_weight[c] q_nc (lse_n - z_nc)  (+ z_loss lse_n^2)
    /// ```
    ///
    /// `Mean` divides by the number of rows (by the sum of sample weights when given);
    /// `ignore_index` does not apply. Targets must be finite and non-negative.
    ///
    /// ```
    /// use ndarray::array;
    /// use xent::{Cpu, CrossEntropy};
    /// let x = array![[1.0f32, 2.0, 3.0]];
    /// let hard = Cpu::new().cross_entropy(x.view(), (&[2i64][..]).into(), &CrossEntropy::default()).unwrap();
    /// let soft = Cpu::new().cross_entropy_soft(x.view(), array![[0.0f32, 0.0, 1.0]].view(), &CrossEntropy::default()).unwrap();
    /// assert!((hard.loss - soft.loss).abs() < 1e-6);
    /// ```
    pub fn cross_entropy_soft(
        &self,
        logits: ArrayView2<f32>,
        probs: ArrayView2<f32>,
        cfg: &CrossEntropy,
    ) -> Result<CeOutput> {
        // (`soft_inputs` rejects GradMode::InPlace.)
        cross_entropy::cross_entropy(&self.pool, Logits::View(logits), Target::Probs(probs), cfg, None)
    }

    /// Binary cross-entropy from logits `[N, C]` with targets in `[0, 1]` (see [`Bce`]).
    ///
    /// ```
    /// use ndarray::array;
    /// use xent::{Bce, Cpu};
    /// let out = Cpu::new().bce_with_logits(array![[0.0f32]].view(), array![[1.0f32]].view(), &Bce::default()).unwrap();
    /// assert!((out.loss - std::f64::consts::LN_2).abs() < 1e-12);
    /// ```
    pub fn bce_with_logits(&self, logits: ArrayView2<f32>, targets: ArrayView2<f32>, cfg: &Bce) -> Result<BceOutput> {
        bce::bce(&self.pool, logits, targets, cfg, BceInput::Logits)
    }

    /// Binary cross-entropy from probabilities `[N, C]` in `[0, 1]` (logs clamped at -100).
    pub fn bce(&self, probs: ArrayView2<f32>, targets: ArrayView2<f32>, cfg: &Bce) -> Result<BceOutput> {
        bce::bce(&self.pool, probs, targets, cfg, BceInput::Probs)
    }

    /// Knowledge distillation of `student` towards `teacher` logits `[N, V]` (see [`Distill`]).
    ///
    /// ```
    /// use ndarray::array;
    /// use xent::{Cpu, Distill};
    /// let x = array![[1.0f32, 2.0, 3.0]];
    /// let same = Cpu::new().distill(x.view(), x.view(), &Distill::default()).unwrap();
    /// assert!(same.loss.abs() < 1e-12);
    /// ```
    pub fn distill(&self, student: ArrayView2<f32>, teacher: ArrayView2<f32>, cfg: &Distill) -> Result<DistillOutput> {
        divergence::distill(&self.pool, student, teacher, cfg)
    }

    /// Entropy, cross-entropy, KL and JS per row of probability rows `p`, `q` (f64).
    pub fn measures(&self, p: ArrayView2<f64>, q: ArrayView2<f64>) -> Result<Measures> {
        divergence::measures(&self.pool, p, q)
    }

    /// The same measures of `softmax(p_logits)` and `softmax(q_logits)`.
    pub fn measures_from_logits(&self, p_logits: ArrayView2<f32>, q_logits: ArrayView2<f32>) -> Result<Measures> {
        divergence::measures_from_logits(&self.pool, p_logits, q_logits)
    }

    /// Per-row Hessian-vector products `(diag(p) - p p^T) v` of softmax cross-entropy w.r.t.
    /// the logits, without forming the Hessian.
    pub fn hvp(&self, logits: ArrayView2<f32>, v: ArrayView2<f32>) -> Result<Array2<f32>> {
        hessian::hvp(&self.pool, logits, v)
    }

    /// Row-wise log-softmax or softmax.
    pub fn log_softmax(&self, logits: ArrayView2<f32>, kind: SoftmaxKind) -> Result<Array2<f32>> {
        log_softmax::log_softmax(&self.pool, logits, kind)
    }
}
