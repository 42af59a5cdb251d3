//! xent's fused softmax cross-entropy as a differentiable loss for [Candle](https://github.com/huggingface/candle)
//! tensors on the CPU, through Candle's `CustomOp2`.
//!
//! `candle_nn::loss::cross_entropy` is `log_softmax` + gather + mean: three passes with two
//! `[N, V]` temporaries and no `ignore_index`, class weights or label smoothing. This loss runs
//! xent's fused CPU kernel: the forward pass computes the loss and the gradient w.r.t. the logits
//! together (f32 arithmetic for f32, f16 and bf16 logits) and keeps the gradient for the backward
//! pass, which only scales it by the upstream gradient.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use xent::{CrossEntropy, Reduction};
//!
//! let logits = Var::new(&[[2.0f32, 0.5, -1.0], [0.1, 0.2, 0.3]], &Device::Cpu)?;
//! let targets = Tensor::new(&[0i64, -100], &Device::Cpu)?; // the second row is ignored
//! let cfg = CrossEntropy::default().with_label_smoothing(0.1);
//! let loss = xent_candle::cross_entropy(logits.as_tensor(), &targets, &cfg)?;
//! let grads = loss.backward()?;
//! let g = grads.get(logits.as_tensor()).expect("a gradient");
//! assert_eq!(g.dims(), &[2, 3]);
//! # Ok::<(), candle_core::Error>(())
//! ```
//!
//! [`linear_cross_entropy`] takes the hidden states and the output layer's weight instead of
//! the logits: the loss of `hidden @ weight.T + bias` as one fused op, so that a model never
//! materialises the `[N, V]` logits or their gradient. [`linear_logprobs`] returns the per-row
//! log-probabilities of the targets and the softmax entropies from the same inputs (RL
//! scoring), differentiable through both. [`distill`] is knowledge distillation of student
//! logits towards a teacher's (KL, reverse KL or JSD at a temperature), loss and gradient in
//! one pass.
//!
//! The ops run on one process-wide `xent::Cpu`, one thread per core by default; [`set_cpu`]
//! chooses another (threads, matrix kernels, and for bf16 models PyTorch's bf16 gradient
//! precision).
//!
//! Errors are `candle_core::Error`s that keep xent's typed [`XentError`] (its variant, row and
//! value); [`xent_error`] returns it.

#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs)]

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use ndarray::{ArrayView1, ArrayView2};
use xent::cpu::SharedCpu;
use xent::{Cpu, CrossEntropy, Logits, Reduction, Targets, Tensor2, XentError};

mod distill;
mod linear;
mod logprobs;
pub use distill::distill;
pub use linear::linear_cross_entropy;
pub use logprobs::linear_logprobs;

/// The loss op: options, the CPU backend, and the gradient its forward pass leaves for backward.
struct XentLoss {
    cfg: CrossEntropy,
    cpu: Arc<Cpu>,
    grad: Mutex<Option<Tensor>>,
}

/// A Candle error holding xent's typed error: `Error::WrappedContext`, whose `wrapped` is the
/// [`XentError`] itself ([`xent_error`] finds it; `candle_core::Error::wrap` would keep only its
/// text, as a `dyn Display`).
fn err(e: XentError) -> candle_core::Error {
    candle_core::Error::WrappedContext { wrapped: Box::new(e), context: "xent-candle".into() }.bt()
}

/// The [`XentError`] inside a Candle error returned by this crate (through Candle's backtrace,
/// context and path wrappers), or `None` for Candle's own errors.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use xent::{LinearCe, XentError};
/// let hidden = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu)?;
/// let weight = Tensor::zeros((5, 4), candle_core::DType::F32, &Device::Cpu)?; // D differs
/// let targets = Tensor::new(&[0u32, 1], &Device::Cpu)?;
/// let e = xent_candle::linear_cross_entropy(&hidden, &weight, None, &targets, &LinearCe::default())
///     .unwrap_err();
/// assert!(matches!(xent_candle::xent_error(&e), Some(XentError::Shape(_))));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn xent_error(e: &candle_core::Error) -> Option<&XentError> {
    use candle_core::Error as E;
    match e {
        E::WrappedContext { wrapped, .. } => wrapped.downcast_ref::<XentError>(),
        E::WithBacktrace { inner, .. } | E::Context { inner, .. } | E::WithPath { inner, .. } => xent_error(inner),
        _ => None,
    }
}

/// A contiguous slice of `storage` as laid out by `layout`.
fn slice<'a, T>(v: &'a [T], layout: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => Err(err(XentError::InvalidOption(format!("{what} must be contiguous")))),
    }
}

impl XentLoss {
    fn run(&self, x: Logits<'_>, t: Targets<'_>) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = x.dim();
        let mut g = Tensor2::zeros(x.dtype(), (n, v));
        let out = self.cpu.cross_entropy_into(x, t, &self.cfg, g.view_mut()).map_err(err)?;
        let grad = match g {
            Tensor2::F32(a) => Tensor::from_vec(a.into_raw_vec_and_offset().0, (n, v), &candle_core::Device::Cpu)?,
            Tensor2::F16(a) => Tensor::from_vec(a.into_raw_vec_and_offset().0, (n, v), &candle_core::Device::Cpu)?,
            Tensor2::BF16(a) => Tensor::from_vec(a.into_raw_vec_and_offset().0, (n, v), &candle_core::Device::Cpu)?,
        };
        *self.grad.lock().unwrap() = Some(grad);
        Ok(match self.cfg.reduction {
            Reduction::None => {
                let rows = out.row_loss.expect("per-row losses for reduction none");
                (CpuStorage::F32(rows.to_vec()), Shape::from(n))
            }
            _ => (CpuStorage::F32(vec![out.loss as f32]), Shape::from(())),
        })
    }
}

impl CustomOp2 for XentLoss {
    fn name(&self) -> &'static str {
        "xent-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l1.shape().dims();
        if dims.len() != 2 {
            return Err(err(XentError::Shape(format!("logits must be [N, V], got {dims:?}"))));
        }
        let (n, v) = (dims[0], dims[1]);
        let shape = (n, v);
        let view = |e: ndarray::ShapeError| err(XentError::Shape(format!("logits layout: {e}")));
        let t_i64: Vec<i64>;
        let targets: Targets = match s2 {
            CpuStorage::I64(t) => Targets::I64(ArrayView1::from(slice(t, l2, "targets")?)),
            CpuStorage::I32(t) => Targets::I32(ArrayView1::from(slice(t, l2, "targets")?)),
            CpuStorage::U32(t) => {
                t_i64 = slice(t, l2, "targets")?.iter().map(|&y| y as i64).collect();
                Targets::I64(ArrayView1::from(&t_i64[..]))
            }
            CpuStorage::U8(t) => {
                t_i64 = slice(t, l2, "targets")?.iter().map(|&y| y as i64).collect();
                Targets::I64(ArrayView1::from(&t_i64[..]))
            }
            CpuStorage::F32(p) => {
                Targets::Probs(ArrayView2::from_shape(shape, slice(p, l2, "target probabilities")?).map_err(view)?)
            }
            other => {
                return Err(err(XentError::InvalidOption(format!(
                    "targets must be integer class indices or f32 probabilities, got {:?}",
                    other.dtype()
                ))))
            }
        };
        match s1 {
            CpuStorage::F32(x) => {
                self.run(ArrayView2::from_shape(shape, slice(x, l1, "logits")?).map_err(view)?.into(), targets)
            }
            CpuStorage::F16(x) => {
                self.run(ArrayView2::from_shape(shape, slice(x, l1, "logits")?).map_err(view)?.into(), targets)
            }
            CpuStorage::BF16(x) => {
                self.run(ArrayView2::from_shape(shape, slice(x, l1, "logits")?).map_err(view)?.into(), targets)
            }
            other => {
                Err(err(XentError::InvalidOption(format!("logits must be f32, f16 or bf16, got {:?}", other.dtype()))))
            }
        }
    }

    fn bwd(
        &self,
        logits: &Tensor,
        _targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(saved_times_upstream(&self.grad, grad_res, self.cfg.reduction, logits.dtype())?), None))
    }
}

/// The fused gradient `[N, V]` that an op's forward pass left in `saved` (taken: a second
/// backward is an error) times the upstream gradient of its loss (a scalar, or `[N]` with
/// reduction `none`), in `dtype`. `loss.backward()` on the loss itself gives an upstream
/// gradient of 1: the fused gradient is the answer (no [N, V] multiply; the scalar is on the
/// CPU, so reading it does not sync).
pub(crate) fn saved_times_upstream(
    saved: &Mutex<Option<Tensor>>,
    grad_res: &Tensor,
    reduction: Reduction,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    let g = saved
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .ok_or_else(|| err(XentError::InvalidOption("backward ran twice, or without a forward pass".into())))?;
    let up = grad_res.to_dtype(g.dtype())?;
    let grad = match reduction {
        Reduction::None => g.broadcast_mul(&up.unsqueeze(1)?)?,
        _ if grad_res.to_dtype(DType::F32)?.to_scalar::<f32>()? == 1.0 => g,
        _ => g.broadcast_mul(&up)?,
    };
    grad.to_dtype(dtype)
}

/// Softmax cross-entropy of `logits [N, V]` (f32, f16 or bf16, on the CPU) against class
/// indices `[N]` (i64, i32, u32 or u8; rows equal to `cfg.ignore_index` are ignored) or f32
/// probability rows `[N, V]`, with every option of [`CrossEntropy`] (PyTorch's semantics).
/// Returns the loss as a scalar (`Mean`, `Sum`) or per row (`None`), differentiable w.r.t. the
/// logits: the gradient is computed in the same pass and scaled by the upstream gradient in
/// backward.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, cfg: &CrossEntropy) -> candle_core::Result<Tensor> {
    if !logits.device().is_cpu() {
        return Err(err(XentError::InvalidOption("xent-candle runs on Candle's CPU device".into())));
    }
    let cfg = cfg.clone().with_per_row(cfg.outputs.per_row || cfg.reduction == Reduction::None);
    logits.apply_op2(targets, XentLoss { cfg, cpu: cpu(), grad: Mutex::new(None) })
}

static CPU: SharedCpu = SharedCpu::new();

/// Makes xent-candle's ops from now on run on `cpu`: its thread count
/// ([`Cpu::with_threads`]; by default one thread per core, beside Candle's own pool), its
/// matrix-product kernels ([`Cpu::with_matmul`]) and how its bf16 kernels take the f32
/// gradient ([`Cpu::with_bf16_grad`]: `Bf16Grad::Rounded` is PyTorch's bf16 precision and
/// faster, the default `Split` keeps f32 accuracy). Process-wide: every op made afterwards, on
/// any thread; an op already made keeps the backend it was made with, its backward included.
///
/// ```
/// use xent::cpu::Bf16Grad;
/// use xent::Cpu;
///
/// xent_candle::set_cpu(Cpu::with_threads(2)?.with_bf16_grad(Bf16Grad::Rounded));
/// assert_eq!(xent_candle::cpu().threads(), 2);
/// assert_eq!(xent_candle::cpu().bf16_grad_terms()?, (1, 1));
/// # Ok::<(), xent::XentError>(())
/// ```
pub fn set_cpu(cpu: Cpu) {
    CPU.set(cpu);
}

/// The CPU backend xent-candle's ops are made with now ([`set_cpu`]'s, else one thread per
/// core with the kernels the CPU has): for asking it which kernels a call would use
/// ([`Cpu::linear_matmul`], [`Cpu::bf16_grad_terms`]), or for xent's own calls beside Candle's.
pub fn cpu() -> Arc<Cpu> {
    CPU.get()
}
