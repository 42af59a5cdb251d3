//! xent's fused softmax cross-entropy as a differentiable loss for [Burn](https://burn.dev) 0.22.
//!
//! Burn's `CrossEntropyLoss` is composed from `log_softmax`, a gather and a mean: several passes
//! over `[N, V]` and two `[N, V]` temporaries, and its backward pass another few. This crate's
//! [`cross_entropy`] computes the loss and its gradient w.r.t. the logits in one fused pass
//! (PyTorch's semantics and every option of [`xent::CrossEntropy`]: `ignore_index`, class and
//! sample weights, label smoothing, z-loss, softcap, temperature), keeps the gradient for the
//! backward pass, and there only multiplies it by the upstream gradient.
//!
//! - **wgpu** (feature `gpu`, on by default): on a device made by [`wgpu_device`] (or
//!   [`share_wgpu`]) xent's WGSL kernels run on Burn's own wgpu device and queue, reading the
//!   logits from Burn's buffer and writing the gradient into a buffer Burn owns: no copy and no
//!   host round trip. Burn's fusion wrapper (the default) and the plain `CubeBackend` are both
//!   served. On any other cube device the loss is computed through the host (counted by
//!   [`host_transfers`]).
//! - **Flex** (Burn's CPU backend): xent's CPU kernels read Burn's tensor storage in place, on
//!   the `xent::Cpu` that [`set_cpu`] chose (threads, matrix kernels, bf16 gradient precision).
//!
//! From hidden states, [`linear_cross_entropy`] fuses the output head's product with the loss
//! (xent's [`LinearCe`]): the `[N, V]` logits and their gradient never exist, only row chunks of
//! them; [`LinearCrossEntropyConfig`] makes a module (weight `[V, D]`, optional bias) that a
//! model's output head can own in place of `Linear` + `CrossEntropyLoss`. On Flex xent's own CPU
//! kernel runs; on Burn's wgpu backends (fusion or plain cube) Burn's matrix products run around
//! xent's fused logits kernel, one row chunk at a time, on the device (no host transfer).
//!
//! For RL scoring (PPO/GRPO), [`linear_logprobs`] returns the per-row log-probabilities of the
//! targets and the softmax entropies from the same operands (xent's [`LinearLogprobs`], with a
//! temperature), both differentiable: one fused xent call in the backward pass takes the
//! upstream gradients of both outputs; on Flex and on Burn's wgpu backends (there composed from
//! Burn's own ops per row chunk, on the device).
//!
//! ```
//! use burn::prelude::*;
//! use xent::CrossEntropy;
//!
//! let device = Device::flex().autodiff();
//! let logits = Tensor::<2>::from_floats([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], &device).require_grad();
//! let targets = Tensor::<1, Int>::from_ints([0, -100], &device); // the second row is ignored
//! let cfg = CrossEntropy::default().with_label_smoothing(0.1);
//! let loss = xent_burn::cross_entropy(logits.clone(), targets, &cfg)?;
//! let grads = loss.backward();
//! let g = logits.grad(&grads).expect("a gradient");
//! assert_eq!(g.dims(), [2, 3]);
//! # Ok::<(), xent::XentError>(())
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs)]

mod autodiff;
mod compose;
#[cfg(feature = "gpu")]
mod cube;
mod distill;
mod flex;
mod linear;
mod logprobs;
mod module;
mod ops;
mod pool;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[cfg(feature = "gpu")]
use burn::backend::fusion::custom::TensorSpec;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{backend_extension, Backend, Dispatch};
use burn::prelude::*;
use burn::tensor::DType as BurnDType;

pub use distill::{distill, distill_with_grad, XentDistillArgs, XentDistillOps};
pub use linear::{linear_cross_entropy, linear_cross_entropy_with_grads, XentLinearArgs, XentLinearOps};
pub use logprobs::{linear_logprobs, linear_logprobs_with_grads, XentLogprobsArgs, XentLogprobsOps};
pub use module::{LinearCrossEntropy, LinearCrossEntropyConfig};
pub use ops::{cpu, set_cpu, take_error};
pub use pool::{pooled_bytes, release_pooled_buffers};
pub use xent::{CrossEntropy, Distill, DistillMode, LinearCe, LinearLogprobs, Reduction, XentError};

#[cfg(feature = "gpu")]
#[cfg_attr(docsrs, doc(cfg(feature = "gpu")))]
pub use cube::{share_wgpu, shared_counters, wgpu_device};

/// The options of one loss call, as the backend extension carries them (cheap to clone).
#[derive(Debug, Clone)]
pub struct XentArgs {
    cfg: Arc<CrossEntropy>,
}

impl XentArgs {
    /// Wraps `cfg`.
    pub fn new(cfg: &CrossEntropy) -> XentArgs {
        XentArgs { cfg: Arc::new(cfg.clone()) }
    }

    /// The options.
    pub fn cfg(&self) -> &CrossEntropy {
        &self.cfg
    }

    /// The loss's shape for `rows` rows: `[N]` with reduction `none`, else `[1]` (as Burn's
    /// own losses).
    pub fn loss_shape(&self, rows: usize) -> Shape {
        match self.cfg.reduction {
            Reduction::None => Shape::new([rows]),
            _ => Shape::new([1]),
        }
    }
}

#[cfg(feature = "gpu")]
fn loss_meta(logits: &TensorSpec, _targets: &TensorSpec, args: &XentArgs) -> TensorSpec {
    TensorSpec::new(args.loss_shape(logits.shape[0]), logits.dtype)
}

#[cfg(feature = "gpu")]
fn fused_meta(logits: &TensorSpec, targets: &TensorSpec, args: &XentArgs) -> (TensorSpec, TensorSpec) {
    (loss_meta(logits, targets, args), logits.clone())
}

/// The lazy (fusion) backends are cube ones: their state is the cube backend's.
#[cfg(feature = "gpu")]
fn forward_meta(logits: &TensorSpec, targets: &TensorSpec, args: &XentArgs) -> (TensorSpec, TensorSpec) {
    let state = Shape::new([cube::state_len(logits.shape[0])]);
    (loss_meta(logits, targets, args), TensorSpec::new(state, BurnDType::F32))
}

#[cfg(feature = "gpu")]
fn backward_meta(logits: &TensorSpec, _t: &TensorSpec, _s: &TensorSpec, _u: &TensorSpec, _a: &XentArgs) -> TensorSpec {
    logits.clone()
}

/// xent's cross-entropy as a Burn backend extension. [`cross_entropy`] is the way to call it;
/// the trait is public so that other backends can implement it.
#[backend_extension(Cube: cfg(feature = "gpu"), Fusion: cfg(feature = "gpu"), Flex, Autodiff)]
pub trait XentOps: Backend {
    /// The loss of `logits [N, V]` against class indices `targets [N]` (`[N]` with reduction
    /// `none`, else `[1]`), in the logits' dtype. Differentiable under autodiff.
    #[fusion(meta = loss_meta)]
    fn xent_cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>, args: XentArgs) -> FloatTensor<Self>;

    /// The loss and its gradient w.r.t. the logits (`[N, V]`, the logits' dtype), in one pass.
    /// Not differentiable: the gradient is the result.
    #[fusion(meta = fused_meta)]
    fn xent_cross_entropy_with_grad(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        args: XentArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The loss and what the backend keeps for [`Self::xent_cross_entropy_backward`]: on wgpu
    /// three floats per row (the gradient is computed in the backward pass, so no `[N, V]`
    /// tensor lives between the passes); on the CPU the fused gradient itself.
    #[fusion(meta = forward_meta)]
    fn xent_cross_entropy_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        args: XentArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The gradient w.r.t. the logits times `upstream` (the loss's gradient: `[1]`, or `[N]`
    /// with reduction `none`), from the state of the forward pass on the same logits.
    #[fusion(meta = backward_meta)]
    fn xent_cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        state: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
        args: XentArgs,
    ) -> FloatTensor<Self>;
}

static HOST_TRANSFERS: AtomicU64 = AtomicU64::new(0);

/// How many times a loss call moved logits or a gradient between device and host (only the
/// fallback for cube devices that xent does not share: see the crate docs). Zero on a device
/// from [`wgpu_device`] and on Flex, where the logits are read in place.
pub fn host_transfers() -> u64 {
    HOST_TRANSFERS.load(Ordering::Relaxed)
}

#[cfg(feature = "gpu")]
pub(crate) fn count_host_transfer() {
    HOST_TRANSFERS.fetch_add(1, Ordering::Relaxed);
}

/// Checks everything that is known without reading a device tensor.
fn check(logits: &Tensor<2>, targets: &Tensor<1, Int>, cfg: &CrossEntropy) -> Result<(), XentError> {
    let [n, v] = logits.dims();
    let [nt] = targets.dims();
    if nt != n {
        return Err(XentError::Shape(format!("logits have {n} rows but targets have {nt}")));
    }
    if logits.device() != targets.device() {
        return Err(XentError::InvalidOption("logits and targets are on different devices".into()));
    }
    match logits.dtype() {
        BurnDType::F32 | BurnDType::F16 | BurnDType::BF16 => {}
        d => return Err(XentError::InvalidOption(format!("logits of {d:?}: xent reads f32, f16 and bf16"))),
    }
    xent::check::cross_entropy_options(v, cfg)?;
    if let Some(w) = &cfg.data.sample_weight {
        if w.len() != n {
            return Err(XentError::Shape(format!("sample_weight has {} entries for {n} rows", w.len())));
        }
    }
    if i32::try_from(cfg.ignore_index).is_err() {
        return Err(XentError::InvalidOption(format!("ignore_index {} does not fit i32", cfg.ignore_index)));
    }
    // On a CPU backend the targets are at hand: an out-of-range one is an error here.
    if ops::is_host(&targets.device()) {
        let t: Vec<i64> = targets
            .to_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .map_err(|e| XentError::InvalidOption(format!("targets: {e:?}")))?;
        xent::check::class_targets(&xent::Targets::I64(ndarray::ArrayView1::from(&t)), v, cfg.ignore_index)?;
    }
    Ok(())
}

/// The cross-entropy of `logits [N, V]` against class indices `targets [N]` with xent's
/// options and PyTorch's semantics: `[N]` per-row losses with `Reduction::None`, else a `[1]`
/// tensor, in the logits' dtype (f32, f16 or bf16; arithmetic in f32). Under autodiff its
/// backward pass is xent's fused gradient times the upstream gradient.
///
/// Shapes, dtypes and options are checked here. Targets are checked against `V` here on CPU
/// devices (an error); on a GPU that would need a sync, so a row whose target is out of range
/// gets a NaN loss and gradient instead.
pub fn cross_entropy(logits: Tensor<2>, targets: Tensor<1, Int>, cfg: &CrossEntropy) -> Result<Tensor<1>, XentError> {
    check(&logits, &targets, cfg)?;
    let args = XentArgs::new(cfg);
    let out = Dispatch::xent_cross_entropy(logits.into_dispatch(), targets.into_dispatch(), args);
    Ok(Tensor::from_dispatch(out))
}

/// The loss (as [`cross_entropy`]) and its gradient w.r.t. the logits, computed together,
/// outside autodiff: for hand-written backward passes and for measuring.
pub fn cross_entropy_with_grad(
    logits: Tensor<2>,
    targets: Tensor<1, Int>,
    cfg: &CrossEntropy,
) -> Result<(Tensor<1>, Tensor<2>), XentError> {
    check(&logits, &targets, cfg)?;
    let args = XentArgs::new(cfg);
    let (loss, grad) = Dispatch::xent_cross_entropy_with_grad(logits.into_dispatch(), targets.into_dispatch(), args);
    Ok((Tensor::from_dispatch(loss), Tensor::from_dispatch(grad)))
}
