//! The public API: option structs, targets, results, and the [`Backend`] abstraction.

pub mod calibration;
pub(crate) mod check;
pub mod config;
pub mod gaussian;
pub mod preference;
pub mod sequence;
pub mod targets;

use ndarray::{Array2, ArrayView2, ArrayViewMut2};

use crate::context::GpuContext;
use crate::cpu::Cpu;
use crate::error::Result;
use config::{Bce, BceOutput, CeOutput, CrossEntropy, Distill, DistillOutput, Measures, SoftmaxKind};
use targets::Targets;

/// What both backends offer, so that user code and benchmarks run either with the same code.
///
/// ```
/// use ndarray::array;
/// use xent::{Backend, Cpu, CrossEntropy};
/// fn mean_loss(b: &dyn Backend) -> f64 {
///     let logits = array![[1.0f32, 2.0, 3.0]];
///     b.cross_entropy(logits.view(), (&[2i64][..]).into(), &CrossEntropy::default()).unwrap().loss
/// }
/// assert!((mean_loss(&Cpu::new()) - 0.40760596).abs() < 1e-6);
/// ```
pub trait Backend {
    /// `"cpu"` or `"gpu"`.
    fn name(&self) -> &'static str;
    /// Softmax cross-entropy with class-index targets.
    fn cross_entropy(&self, logits: ArrayView2<f32>, targets: Targets, cfg: &CrossEntropy) -> Result<CeOutput>;
    /// Cross-entropy that overwrites `logits` with the gradient.
    fn cross_entropy_in_place(
        &self,
        logits: ArrayViewMut2<f32>,
        targets: Targets,
        cfg: &CrossEntropy,
    ) -> Result<CeOutput>;
    /// Cross-entropy with probability targets `[N, V]`.
    fn cross_entropy_soft(
        &self,
        logits: ArrayView2<f32>,
        probs: ArrayView2<f32>,
        cfg: &CrossEntropy,
    ) -> Result<CeOutput>;
    /// Row-wise log-softmax or softmax.
    fn log_softmax(&self, logits: ArrayView2<f32>, kind: SoftmaxKind) -> Result<Array2<f32>>;
    /// Binary cross-entropy from logits.
    fn bce_with_logits(&self, logits: ArrayView2<f32>, targets: ArrayView2<f32>, cfg: &Bce) -> Result<BceOutput>;
    /// Binary cross-entropy from probabilities.
    fn bce(&self, probs: ArrayView2<f32>, targets: ArrayView2<f32>, cfg: &Bce) -> Result<BceOutput>;
    /// Knowledge distillation of student towards teacher logits.
    fn distill(&self, student: ArrayView2<f32>, teacher: ArrayView2<f32>, cfg: &Distill) -> Result<DistillOutput>;
    /// Entropy, cross-entropy, KL and JS of probability rows.
    fn measures(&self, p: ArrayView2<f64>, q: ArrayView2<f64>) -> Result<Measures>;
    /// The same measures of softmaxed logits.
    fn measures_from_logits(&self, p: ArrayView2<f32>, q: ArrayView2<f32>) -> Result<Measures>;
    /// Per-row Hessian-vector products of softmax cross-entropy w.r.t. the logits.
    fn hvp(&self, logits: ArrayView2<f32>, v: ArrayView2<f32>) -> Result<Array2<f32>>;
}

impl Backend for Cpu {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn cross_entropy(&self, logits: ArrayView2<f32>, targets: Targets, cfg: &CrossEntropy) -> Result<CeOutput> {
        Cpu::cross_entropy(self, logits, targets, cfg)
    }
    fn cross_entropy_in_place(&self, l: ArrayViewMut2<f32>, t: Targets, cfg: &CrossEntropy) -> Result<CeOutput> {
        Cpu::cross_entropy_in_place(self, l, t, cfg)
    }
    fn cross_entropy_soft(&self, l: ArrayView2<f32>, p: ArrayView2<f32>, cfg: &CrossEntropy) -> Result<CeOutput> {
        Cpu::cross_entropy_soft(self, l, p, cfg)
    }
    fn log_softmax(&self, logits: ArrayView2<f32>, kind: SoftmaxKind) -> Result<Array2<f32>> {
        Cpu::log_softmax(self, logits, kind)
    }
    fn bce_with_logits(&self, x: ArrayView2<f32>, y: ArrayView2<f32>, cfg: &Bce) -> Result<BceOutput> {
        Cpu::bce_with_logits(self, x, y, cfg)
    }
    fn bce(&self, p: ArrayView2<f32>, y: ArrayView2<f32>, cfg: &Bce) -> Result<BceOutput> {
        Cpu::bce(self, p, y, cfg)
    }
    fn distill(&self, s: ArrayView2<f32>, t: ArrayView2<f32>, cfg: &Distill) -> Result<DistillOutput> {
        Cpu::distill(self, s, t, cfg)
    }
    fn measures(&self, p: ArrayView2<f64>, q: ArrayView2<f64>) -> Result<Measures> {
        Cpu::measures(self, p, q)
    }
    fn measures_from_logits(&self, p: ArrayView2<f32>, q: ArrayView2<f32>) -> Result<Measures> {
        Cpu::measures_from_logits(self, p, q)
    }
    fn hvp(&self, logits: ArrayView2<f32>, v: ArrayView2<f32>) -> Result<Array2<f32>> {
        Cpu::hvp(self, logits, v)
    }
}

impl Backend for GpuContext {
    fn name(&self) -> &'static str {
        "gpu"
    }
    fn cross_entropy(&self, logits: ArrayView2<f32>, targets: Targets, cfg: &CrossEntropy) -> Result<CeOutput> {
        GpuContext::cross_entropy(self, logits, targets, cfg)
    }
    fn cross_entropy_in_place(&self, l: ArrayViewMut2<f32>, t: Targets, cfg: &CrossEntropy) -> Result<CeOutput> {
        GpuContext::cross_entropy_in_place(self, l, t, cfg)
    }
    fn cross_entropy_soft(&self, l: ArrayView2<f32>, p: ArrayView2<f32>, cfg: &CrossEntropy) -> Result<CeOutput> {
        GpuContext::cross_entropy_soft(self, l, p, cfg)
    }
    fn log_softmax(&self, logits: ArrayView2<f32>, kind: SoftmaxKind) -> Result<Array2<f32>> {
        GpuContext::log_softmax(self, logits, kind)
    }
    fn bce_with_logits(&self, x: ArrayView2<f32>, y: ArrayView2<f32>, cfg: &Bce) -> Result<BceOutput> {
        GpuContext::bce_with_logits(self, x, y, cfg)
    }
    fn bce(&self, p: ArrayView2<f32>, y: ArrayView2<f32>, cfg: &Bce) -> Result<BceOutput> {
        GpuContext::bce(self, p, y, cfg)
    }
    fn distill(&self, s: ArrayView2<f32>, t: ArrayView2<f32>, cfg: &Distill) -> Result<DistillOutput> {
        GpuContext::distill(self, s, t, cfg)
    }
    fn measures(&self, p: ArrayView2<f64>, q: ArrayView2<f64>) -> Result<Measures> {
        GpuContext::measures(self, p, q)
    }
    fn measures_from_logits(&self, p: ArrayView2<f32>, q: ArrayView2<f32>) -> Result<Measures> {
        GpuContext::measures_from_logits(self, p, q)
    }
    fn hvp(&self, logits: ArrayView2<f32>, v: ArrayView2<f32>) -> Result<Array2<f32>> {
        GpuContext::hvp(self, logits, v)
    }
}
