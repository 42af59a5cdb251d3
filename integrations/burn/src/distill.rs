//! Knowledge distillation of student logits towards teacher logits as one differentiable Burn
//! function over xent's [`Distill`] (forward KL, reverse KL or generalised JSD at a
//! temperature, times `T^2`): the loss and the gradient w.r.t. the student in one pass over the
//! two `[N, V]` inputs.
//!
//! Under autodiff the forward pass keeps that gradient as the op's state and the backward pass
//! multiplies it by the upstream gradient (a scalar, or one value per row with reduction
//! `none`; not at all on Flex when it is exactly 1, as after `loss.backward()`). Burn's own
//! composition (two `log_softmax`es, `exp`, products and a sum) makes a pass and an `[N, V]`
//! temporary per op, and as many again in its backward pass.
//!
//! - **Flex**: xent's CPU kernel reads both tensors' storage in place, on the backend
//!   [`crate::set_cpu`] chose.
//! - **wgpu** (feature `gpu`): on a device from [`crate::wgpu_device`] xent's recorded
//!   distillation plan runs on Burn's queue, reading Burn's buffers and writing the loss and
//!   the gradient into buffers Burn owns (no host round trip, no wait); on other cube devices
//!   through the host, counted by [`crate::host_transfers`].

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, AutodiffBackend, Backend, Dispatch, Flex};
use burn::prelude::*;
use burn::tensor::DType as BurnDType;
use burn_flex::FlexTensor;
use ndarray::ArrayViewMut2;
use xent::{Distill, DistillOutput, Reduction, XentError};

use crate::flex::contiguous;
use crate::linear::view;
use crate::ops::{cpu, record_error};
use crate::pool;

/// The options of one distillation call, as the backend extension carries them (cheap to
/// clone).
#[derive(Debug, Clone)]
pub struct XentDistillArgs {
    cfg: Arc<Distill>,
}

impl XentDistillArgs {
    /// Wraps `cfg`.
    pub fn new(cfg: &Distill) -> XentDistillArgs {
        XentDistillArgs { cfg: Arc::new(cfg.clone()) }
    }

    /// The options.
    pub fn cfg(&self) -> &Distill {
        &self.cfg
    }

    /// The loss's shape for `rows` rows: `[N]` with reduction `none`, else `[1]`.
    pub fn loss_shape(&self, rows: usize) -> Shape {
        match self.cfg.reduction {
            Reduction::None => Shape::new([rows]),
            _ => Shape::new([1]),
        }
    }

    /// The loss values of a result: `T^2 D_n` per row with reduction `none` (xent's rows are
    /// `D_n`), else the reduced loss.
    pub(crate) fn loss_values(&self, out: &DistillOutput) -> Vec<f32> {
        match self.cfg.reduction {
            Reduction::None => self.cfg.row_losses(out),
            _ => vec![out.loss as f32],
        }
    }
}

#[cfg(feature = "gpu")]
fn loss_meta(
    student: &burn::backend::fusion::custom::TensorSpec,
    _teacher: &burn::backend::fusion::custom::TensorSpec,
    args: &XentDistillArgs,
) -> burn::backend::fusion::custom::TensorSpec {
    burn::backend::fusion::custom::TensorSpec::new(args.loss_shape(student.shape[0]), student.dtype)
}

#[cfg(feature = "gpu")]
fn fused_meta(
    student: &burn::backend::fusion::custom::TensorSpec,
    teacher: &burn::backend::fusion::custom::TensorSpec,
    args: &XentDistillArgs,
) -> (burn::backend::fusion::custom::TensorSpec, burn::backend::fusion::custom::TensorSpec) {
    (loss_meta(student, teacher, args), student.clone())
}

#[cfg(feature = "gpu")]
fn backward_meta(
    grad: &burn::backend::fusion::custom::TensorSpec,
    _upstream: &burn::backend::fusion::custom::TensorSpec,
    _args: &XentDistillArgs,
) -> burn::backend::fusion::custom::TensorSpec {
    grad.clone()
}

/// xent's distillation as a Burn backend extension: on Flex xent's CPU kernel, on Burn's wgpu
/// backends (cube and fusion) xent's WGSL kernel on Burn's device, and under autodiff.
/// [`distill`] is the way to call it; the trait is public so that other backends can implement
/// it.
#[backend_extension(Cube: cfg(feature = "gpu"), Fusion: cfg(feature = "gpu"), Flex, Autodiff)]
pub trait XentDistillOps: Backend {
    /// The loss of `student [N, V]` towards `teacher [N, V]` (`[N]` with reduction `none`,
    /// else `[1]`), in the student's dtype. Differentiable under autodiff w.r.t. the student.
    #[fusion(meta = loss_meta)]
    fn xent_distill(student: FloatTensor<Self>, teacher: FloatTensor<Self>, args: XentDistillArgs)
        -> FloatTensor<Self>;

    /// The loss and its gradient w.r.t. the student (`[N, V]`, the student's dtype), in one
    /// pass. Not differentiable: the gradient is the result.
    #[fusion(meta = fused_meta)]
    fn xent_distill_with_grad(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        args: XentDistillArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The fused gradient times `upstream` (the loss's gradient: `[1]`, or `[N]` with
    /// reduction `none`), broadcast over the rows.
    #[fusion(meta = backward_meta)]
    fn xent_distill_backward(
        grad: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
        args: XentDistillArgs,
    ) -> FloatTensor<Self>;
}

// ---------------------------------------------------------------------------------------------
// Flex

/// xent's CPU distillation on Flex storage; an error (a call through the trait that skipped
/// the checks, out of memory) leaves NaN outputs and waits in [`crate::take_error`].
fn flex_run(
    student: FlexTensor,
    teacher: FlexTensor,
    args: &XentDistillArgs,
    with_grad: bool,
) -> (FlexTensor, Option<FlexTensor>) {
    let (student, teacher) = (contiguous(student), contiguous(teacher));
    let dims = student.layout().shape().clone();
    let n = dims[0];
    let dtype = student.dtype();
    let (s, t) = (view(&student), view(&teacher));
    let in_dtype = |values: Vec<f32>, shape: Shape| {
        let data = TensorData::new(values, shape);
        FlexTensor::from_data(if dtype == BurnDType::F32 { data } else { data.convert_dtype(dtype) })
    };
    let failed = |e: XentError| {
        record_error(e);
        vec![f32::NAN; args.loss_shape(n).num_elements()]
    };
    if with_grad && dtype == BurnDType::F32 {
        // An f32 gradient in a pooled buffer (the last one Burn dropped, of this size), handed
        // to Burn without a copy: no fresh [N, V] mapping to fault in per step.
        let (values, grad) = pool::filled(dims.num_elements(), |g: &mut [f32]| {
            let gv = ArrayViewMut2::from_shape((n, dims[1]), &mut *g).expect("[N, V]");
            match cpu().distill_into(s, t, args.cfg(), gv) {
                Ok(out) => args.loss_values(&out),
                Err(e) => {
                    g.fill(f32::NAN);
                    failed(e)
                }
            }
        });
        let grad = FlexTensor::from_data(TensorData::from_bytes(grad, dims, BurnDType::F32));
        return (in_dtype(values, args.loss_shape(n)), Some(grad));
    }
    // 16-bit students: xent's f32 gradient, rounded once into the student's dtype.
    let res = if with_grad { cpu().distill_with_grad(s, t, args.cfg()) } else { cpu().distill(s, t, args.cfg()) };
    let (values, grad) = match res {
        Ok(out) => (args.loss_values(&out), out.grad.map(|g| g.into_raw_vec_and_offset().0)),
        Err(e) => (failed(e), with_grad.then(|| vec![f32::NAN; dims.num_elements()])),
    };
    (in_dtype(values, args.loss_shape(n)), grad.map(|g| in_dtype(g, dims)))
}

impl XentDistillOps for Flex {
    fn xent_distill(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        args: XentDistillArgs,
    ) -> FloatTensor<Self> {
        flex_run(student, teacher, &args, false).0
    }

    fn xent_distill_with_grad(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        args: XentDistillArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (loss, grad) = flex_run(student, teacher, &args, true);
        (loss, grad.expect("a gradient was asked for"))
    }

    fn xent_distill_backward(
        grad: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
        args: XentDistillArgs,
    ) -> FloatTensor<Self> {
        crate::flex::times_upstream(grad, upstream, args.cfg().reduction)
    }
}

// ---------------------------------------------------------------------------------------------
// Autodiff

/// The backward step: its parent is the student; its state the fused gradient.
#[derive(Debug)]
struct DistillBackward {
    args: XentDistillArgs,
}

impl<B: XentDistillOps> Backward<B, 1> for DistillBackward {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [parent] = ops.parents;
        let upstream = grads.consume::<B>(&ops.node);
        if let Some(node) = parent {
            grads.register::<B>(node.id, B::xent_distill_backward(ops.state, upstream, self.args));
        }
    }
}

impl<B: XentDistillOps, C: CheckpointStrategy> XentDistillOps for Autodiff<B, C> {
    fn xent_distill(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        args: XentDistillArgs,
    ) -> FloatTensor<Self> {
        let (s, node) = student.into_parts();
        let t = Self::inner(teacher);
        match (DistillBackward { args: args.clone() }).prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (loss, grad) = B::xent_distill_with_grad(s, t, args);
                prep.finish(grad, loss)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::xent_distill(s, t, args)),
        }
    }

    fn xent_distill_with_grad(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        args: XentDistillArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (loss, grad) = B::xent_distill_with_grad(Self::inner(student), Self::inner(teacher), args);
        (Self::from_inner(loss), Self::from_inner(grad))
    }

    fn xent_distill_backward(
        grad: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
        args: XentDistillArgs,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::xent_distill_backward(Self::inner(grad), Self::inner(upstream), args))
    }
}

// ---------------------------------------------------------------------------------------------
// The public functions

/// Checks everything that is known without reading a device tensor.
fn check(student: &Tensor<2>, teacher: &Tensor<2>, cfg: &Distill) -> Result<(), XentError> {
    cfg.validate()?;
    xent::check::same_rows(
        (student.dims()[0], student.dims()[1]),
        (teacher.dims()[0], teacher.dims()[1]),
        "student and teacher logits",
    )?;
    if student.device() != teacher.device() {
        return Err(XentError::InvalidOption("student and teacher logits are on different devices".into()));
    }
    for (x, what) in [(student, "student"), (teacher, "teacher")] {
        match x.dtype() {
            BurnDType::F32 | BurnDType::F16 | BurnDType::BF16 => {}
            d => return Err(XentError::InvalidOption(format!("{what} logits of {d:?}: xent reads f32, f16 and bf16"))),
        }
    }
    if teacher.is_tracked() {
        return Err(XentError::InvalidOption(
            "the teacher logits are tracked by autodiff, and distillation differentiates only the student: pass \
             teacher.detach() (of a teacher that does not itself require grad)"
                .into(),
        ));
    }
    Ok(())
}

/// Knowledge distillation of `student [N, V]` towards `teacher [N, V]` logits with the options
/// of [`Distill`]: forward KL(teacher_T || student_T) by default (Hinton et al.), reverse KL or
/// generalised JSD (`DistillMode`), at temperature `T`, times `T^2`. With `Reduction::Mean`
/// (the default) a `[1]` tensor, the mean over rows (PyTorch's `F.kl_div(log_softmax(s / T),
/// log_softmax(t / T), log_target=True, reduction='batchmean') * T**2`); with `Sum` the sum;
/// with `None` the `[N]` rows `T^2 D_n`, for masking padded positions before a reduction of
/// one's own. In the student's dtype (f32, f16 or bf16; the teacher may have another of the
/// three); arithmetic in f32 with f64 sums on the CPU, f32 on the GPU.
///
/// Differentiable w.r.t. the student under autodiff: the gradient is computed in the forward
/// pass, kept, and multiplied by the upstream gradient in the backward pass. The teacher is a
/// constant: a teacher that autodiff tracks is an error (pass `teacher.detach()`; Burn's
/// `detach` keeps a leaf's `require_grad`, so a leaf teacher must not require grad), since its
/// gradient would otherwise be silently missing. Shapes, dtypes, devices and options are
/// checked here.
///
/// ```
/// use burn::prelude::*;
/// use xent::{Distill, Reduction};
///
/// let device = Device::flex().autodiff();
/// let student = Tensor::<2>::from_floats([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], &device).require_grad();
/// let teacher = Tensor::<2>::from_floats([[1.5, 1.0, -2.0], [0.0, 0.9, 0.3]], &device);
/// let cfg = Distill::default().with_temperature(2.0);
/// let loss = xent_burn::distill(student.clone(), teacher.clone(), &cfg)?;
/// let g = student.grad(&loss.backward()).expect("a gradient");
/// // A softmax gradient: each row sums to zero.
/// let sums: Vec<f32> = g.sum_dim(1).to_data().to_vec().unwrap();
/// assert!(sums.iter().all(|s| s.abs() < 1e-6));
///
/// // Per-row losses, masked: the second row is padding.
/// let rows = xent_burn::distill(student.clone(), teacher, &cfg.with_reduction(Reduction::None))?;
/// let mask = Tensor::<1>::from_floats([1.0, 0.0], &device);
/// let g = student.grad(&(rows * mask).sum().backward()).expect("a gradient");
/// let g1: Vec<f32> = g.slice([1..2, 0..3]).to_data().to_vec().unwrap();
/// assert!(g1.iter().all(|&x| x == 0.0));
/// # Ok::<(), xent::XentError>(())
/// ```
pub fn distill(student: Tensor<2>, teacher: Tensor<2>, cfg: &Distill) -> Result<Tensor<1>, XentError> {
    check(&student, &teacher, cfg)?;
    let out = Dispatch::xent_distill(student.into_dispatch(), teacher.into_dispatch(), XentDistillArgs::new(cfg));
    Ok(Tensor::from_dispatch(out))
}

/// The loss (as [`distill`]) and its gradient w.r.t. the student logits (`[N, V]`, the
/// student's dtype), computed together, outside autodiff: for hand-written backward passes and
/// for measuring.
pub fn distill_with_grad(
    student: Tensor<2>,
    teacher: Tensor<2>,
    cfg: &Distill,
) -> Result<(Tensor<1>, Tensor<2>), XentError> {
    check(&student, &teacher, cfg)?;
    let args = XentDistillArgs::new(cfg);
    let (loss, grad) = Dispatch::xent_distill_with_grad(student.into_dispatch(), teacher.into_dispatch(), args);
    Ok((Tensor::from_dispatch(loss), Tensor::from_dispatch(grad)))
}
