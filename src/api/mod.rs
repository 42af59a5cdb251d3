//! The public API: option structs, targets, results, and the [`Backend`] abstraction.

pub mod calibration;
pub mod config;
pub mod gaussian;
pub mod linear;
pub mod logprobs;
pub(crate) mod methods;
pub mod preference;
pub mod sequence;
pub mod targets;

use ndarray::{Array2, ArrayView2};

use crate::dtype::{Logits, LogitsMut};
use crate::error::Result;
use config::{Bce, BceOutput, CeOutput, CrossEntropy, Distill, DistillOutput, Measures, SoftmaxKind};
use targets::Targets;

/// What both backends offer, so that user code and benchmarks run either with the same code.
/// Object safe: tensors are passed as the typed enums [`Logits`], [`LogitsMut`] and
/// [`Targets`] (`.into()` from ndarray views).
///
/// ```
/// use ndarray::array;
/// use xent::{Backend, Cpu, CrossEntropy};
/// fn mean_loss(b: &dyn Backend) -> f64 {
///     let logits = array![[1.0f32, 2.0, 3.0]];
///     b.cross_entropy((&logits).into(), (&[2i64][..]).into(), &CrossEntropy::default()).unwrap().loss
/// }
/// assert!((mean_loss(&Cpu::new()) - 0.40760596).abs() < 1e-6);
/// ```
pub trait Backend {
    /// `"cpu"` or `"gpu"`.
    fn name(&self) -> &'static str;
    /// Softmax cross-entropy (class indices or probability rows); loss only.
    fn cross_entropy(&self, logits: Logits<'_>, targets: Targets<'_>, cfg: &CrossEntropy) -> Result<CeOutput>;
    /// Cross-entropy and its f32 gradient in [`CeOutput::grad`].
    fn cross_entropy_with_grad(&self, logits: Logits<'_>, targets: Targets<'_>, cfg: &CrossEntropy)
        -> Result<CeOutput>;
    /// Cross-entropy with the gradient written into a caller-owned tensor (any dtype).
    fn cross_entropy_into(
        &self,
        logits: Logits<'_>,
        targets: Targets<'_>,
        cfg: &CrossEntropy,
        grad: LogitsMut<'_>,
    ) -> Result<CeOutput>;
    /// Cross-entropy that overwrites `logits` with the gradient.
    fn cross_entropy_in_place(
        &self,
        logits: LogitsMut<'_>,
        targets: Targets<'_>,
        cfg: &CrossEntropy,
    ) -> Result<CeOutput>;
    /// Row-wise log-softmax or softmax.
    fn log_softmax(&self, logits: Logits<'_>, kind: SoftmaxKind) -> Result<Array2<f32>>;
    /// Binary cross-entropy from logits.
    fn bce_with_logits(&self, logits: ArrayView2<f32>, targets: ArrayView2<f32>, cfg: &Bce) -> Result<BceOutput>;
    /// Binary cross-entropy from probabilities.
    fn bce(&self, probs: ArrayView2<f32>, targets: ArrayView2<f32>, cfg: &Bce) -> Result<BceOutput>;
    /// Knowledge distillation of student towards teacher logits; `grad` asks for the gradient
    /// w.r.t. the student logits.
    fn distill(&self, student: Logits<'_>, teacher: Logits<'_>, cfg: &Distill, grad: bool) -> Result<DistillOutput>;
    /// Entropy, cross-entropy, KL and JS of probability rows.
    fn measures(&self, p: ArrayView2<f64>, q: ArrayView2<f64>) -> Result<Measures>;
    /// The same measures of softmaxed logits.
    fn measures_from_logits(&self, p: Logits<'_>, q: Logits<'_>) -> Result<Measures>;
    /// Per-row Hessian-vector products of softmax cross-entropy w.r.t. the logits.
    fn hvp(&self, logits: Logits<'_>, v: ArrayView2<f32>) -> Result<Array2<f32>>;
}

/// Implements [`Backend`] by forwarding to the type's inherent methods of the same names
/// (invoked beside each backend: `cpu/backend.rs`, `gpu/context.rs`).
macro_rules! forward_backend {
    ($ty:ty, $name:literal) => {
        #[rustfmt::skip]
        const _: () = {
        use ndarray::{Array2, ArrayView2};
        use $crate::{Backend, Bce, BceOutput, CeOutput, CrossEntropy, Distill, DistillOutput, Logits, LogitsMut,
            Measures, Result, SoftmaxKind, Targets};
        impl Backend for $ty {
            fn name(&self) -> &'static str {
                $name
            }
            fn cross_entropy(&self, l: Logits<'_>, t: Targets<'_>, cfg: &CrossEntropy) -> Result<CeOutput> {
                <$ty>::cross_entropy(self, l, t, cfg)
            }
            fn cross_entropy_with_grad(&self, l: Logits<'_>, t: Targets<'_>, cfg: &CrossEntropy) -> Result<CeOutput> {
                <$ty>::cross_entropy_with_grad(self, l, t, cfg)
            }
            fn cross_entropy_into(
                &self,
                l: Logits<'_>,
                t: Targets<'_>,
                cfg: &CrossEntropy,
                g: LogitsMut<'_>,
            ) -> Result<CeOutput> {
                <$ty>::cross_entropy_into(self, l, t, cfg, g)
            }
            fn cross_entropy_in_place(&self, l: LogitsMut<'_>, t: Targets<'_>, cfg: &CrossEntropy) -> Result<CeOutput> {
                <$ty>::cross_entropy_in_place(self, l, t, cfg)
            }
            fn log_softmax(&self, l: Logits<'_>, kind: SoftmaxKind) -> Result<Array2<f32>> {
                <$ty>::log_softmax(self, l, kind)
            }
            fn bce_with_logits(&self, x: ArrayView2<f32>, y: ArrayView2<f32>, cfg: &Bce) -> Result<BceOutput> {
                <$ty>::bce_with_logits(self, x, y, cfg)
            }
            fn bce(&self, p: ArrayView2<f32>, y: ArrayView2<f32>, cfg: &Bce) -> Result<BceOutput> {
                <$ty>::bce(self, p, y, cfg)
            }
            fn distill(&self, s: Logits<'_>, t: Logits<'_>, cfg: &Distill, grad: bool) -> Result<DistillOutput> {
                if grad {
                    <$ty>::distill_with_grad(self, s, t, cfg)
                } else {
                    <$ty>::distill(self, s, t, cfg)
                }
            }
            fn measures(&self, p: ArrayView2<f64>, q: ArrayView2<f64>) -> Result<Measures> {
                <$ty>::measures(self, p, q)
            }
            fn measures_from_logits(&self, p: Logits<'_>, q: Logits<'_>) -> Result<Measures> {
                <$ty>::measures_from_logits(self, p, q)
            }
            fn hvp(&self, l: Logits<'_>, v: ArrayView2<f32>) -> Result<Array2<f32>> {
                <$ty>::hvp(self, l, v)
            }
        }
        };
    };
}
pub(crate) use forward_backend;
