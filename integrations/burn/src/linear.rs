//! Fused linear cross-entropy from hidden states: `cross_entropy(hidden @ weight^T + bias,
//! targets)` as one differentiable Burn function, so that neither the `[N, V]` logits nor their
//! gradient exists as a tensor (xent's [`LinearCe`] computes the logits one row chunk at a time).
//!
//! Under autodiff with reduction `mean` or `sum` the forward pass computes the loss and the
//! gradients of `hidden`, `weight` and `bias` in one pass (those the graph tracks), keeps them
//! as the op's state, and the backward pass only multiplies them by the upstream scalar (not
//! at all when it is exactly 1, as after `loss.backward()`). With reduction `none` the
//! upstream gradient has one value per row, which the forward pass cannot know: the forward
//! pass then computes the per-row losses alone and the backward pass runs the fused pass again
//! with the upstream values folded into the sample weights and reduction `sum` (the gradient of
//! `sum_n u_n loss_n`).

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{backend_extension, AutodiffBackend, Backend, Dispatch, Flex, TensorMetadata};
use burn::prelude::*;
use burn::tensor::DType as BurnDType;
use burn_flex::FlexTensor;
use half::{bf16, f16};
use ndarray::{ArrayView1, ArrayView2};
use xent::{LinearCe, Logits, Reduction, Targets, Tensor2, XentError};

use crate::ops::{cpu, is_host, record_error};
use crate::XentOps;

/// The options of one fused linear cross-entropy call, as the backend extension carries them
/// (cheap to clone).
#[derive(Debug, Clone)]
pub struct XentLinearArgs {
    cfg: Arc<LinearCe>,
}

impl XentLinearArgs {
    /// Wraps `cfg`.
    pub fn new(cfg: &LinearCe) -> XentLinearArgs {
        XentLinearArgs { cfg: Arc::new(cfg.clone()) }
    }

    /// The options.
    pub fn cfg(&self) -> &LinearCe {
        &self.cfg
    }

    /// The loss's shape for `rows` rows: `[N]` with reduction `none`, else `[1]`.
    pub fn loss_shape(&self, rows: usize) -> Shape {
        match self.cfg.ce.reduction {
            Reduction::None => Shape::new([rows]),
            _ => Shape::new([1]),
        }
    }
}

/// xent's fused linear cross-entropy as a Burn backend extension: on Flex (Burn's CPU backend)
/// xent's own CPU kernel; on Burn's wgpu backends (cube and fusion) the default methods, which
/// compose the backend's matrix products with xent's fused logits-level kernel one row chunk at
/// a time (see the crate docs); and under autodiff. [`linear_cross_entropy`] is the way to call
/// it; the trait is public so that other backends can implement it (or take the defaults).
#[backend_extension(Cube: cfg(feature = "gpu"), Fusion: cfg(feature = "gpu"), Flex, Autodiff)]
pub trait XentLinearOps: XentOps {
    /// The loss of `hidden [N, D] @ weight[V, D]^T + bias [V]` against class indices
    /// `targets [N]`: `[N]` with reduction `none`, else `[1]`, in f32. Differentiable under
    /// autodiff w.r.t. hidden, weight and bias. No bias: a bias of no elements (`[0]`).
    #[fusion(default)]
    fn xent_linear_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        targets: IntTensor<Self>,
        args: XentLinearArgs,
    ) -> FloatTensor<Self> {
        let none = Self::float_zeros(Shape::new([0]), &hidden.device(), burn::tensor::FloatDType::F32);
        crate::compose::linear_ce::<Self>(hidden, weight, bias, targets, none, args.cfg(), false).0
    }

    /// The loss and the gradients the options ask for (`grad_hidden`, `grad_weight`,
    /// `grad_bias`; in the inputs' dtype), in one pass. With a `row_scale` `u` of `N` values
    /// the gradients are those of `sum_n u_n L_n`, `L_n` the per-row losses of reduction
    /// `none` with every option (xent's `linear_cross_entropy_with_upstream`), and the loss is
    /// that sum (`[1]`); a `row_scale` of no elements leaves the options as they are. No bias: a bias of no elements. Not differentiable.
    #[allow(clippy::type_complexity)]
    #[fusion(default)]
    fn xent_linear_cross_entropy_with_grads(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        targets: IntTensor<Self>,
        row_scale: FloatTensor<Self>,
        args: XentLinearArgs,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>, Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) {
        crate::compose::linear_ce::<Self>(hidden, weight, bias, targets, row_scale, args.cfg(), true)
    }

    /// `grad` times the scalar `upstream` (`[1]`), in `grad`'s dtype; `grad` itself when
    /// `upstream` is exactly 1 (known on a CPU backend; a device multiplies).
    #[fusion(default)]
    fn xent_linear_scale(grad: FloatTensor<Self>, upstream: FloatTensor<Self>) -> FloatTensor<Self> {
        let dtype = grad.dtype();
        let shape = if grad.shape().num_dims() == 1 { Shape::new([1]) } else { Shape::new([1, 1]) };
        let up = Self::float_reshape(upstream, shape);
        let up = if up.dtype() == dtype { up } else { Self::float_cast(up, dtype.into()) };
        Self::float_mul(grad, up)
    }
}

// ---------------------------------------------------------------------------------------------
// Flex

/// Contiguous storage of a Flex tensor (copied only if it is a strided view).
pub(crate) fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.is_contiguous() && t.layout().start_offset() == 0 {
        t
    } else {
        t.to_contiguous()
    }
}

pub(crate) fn view(x: &FlexTensor) -> Logits<'_> {
    let dims = x.layout().shape().clone();
    let (r, c) = (dims[0], dims[1]);
    match x.dtype() {
        BurnDType::F16 => Logits::F16(ArrayView2::from_shape((r, c), x.storage::<f16>()).expect("contiguous 2-d")),
        BurnDType::BF16 => Logits::BF16(ArrayView2::from_shape((r, c), x.storage::<bf16>()).expect("contiguous 2-d")),
        _ => Logits::F32(ArrayView2::from_shape((r, c), x.storage::<f32>()).expect("contiguous 2-d")),
    }
}

/// The values of a 1-d float Flex tensor as f32 (copied: V or N values).
pub(crate) fn f32_values(t: FlexTensor) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap_or_default()
}

pub(crate) fn f32_tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// A gradient from xent as a Flex tensor (no copy).
pub(crate) fn grad_tensor(g: Tensor2) -> FlexTensor {
    fn vec<T: Clone>(a: ndarray::Array2<T>) -> (Vec<T>, [usize; 2]) {
        let dims = [a.nrows(), a.ncols()];
        let a = if a.is_standard_layout() { a } else { a.as_standard_layout().into_owned() };
        (a.into_raw_vec_and_offset().0, dims)
    }
    match g {
        Tensor2::F32(a) => {
            let (v, s) = vec(a);
            FlexTensor::from_data(TensorData::new(v, s))
        }
        Tensor2::F16(a) => {
            let (v, s) = vec(a);
            FlexTensor::from_data(TensorData::new(v, s))
        }
        Tensor2::BF16(a) => {
            let (v, s) = vec(a);
            FlexTensor::from_data(TensorData::new(v, s))
        }
    }
}

/// Class-index targets of a contiguous Flex int tensor, read in place when they are i64 or
/// i32 (else widened once into `widened`: N values).
pub(crate) fn targets_view<'a>(targets: &'a FlexTensor, widened: &'a mut Vec<i64>) -> Targets<'a> {
    match targets.dtype() {
        BurnDType::I64 => Targets::I64(ArrayView1::from(targets.storage::<i64>())),
        BurnDType::I32 => Targets::I32(ArrayView1::from(targets.storage::<i32>())),
        _ => {
            // Narrower or unsigned integer targets: widened once (N values).
            *widened = targets.clone().into_data().convert::<i64>().try_to_vec::<i64>().unwrap_or_default();
            Targets::I64(ArrayView1::from(&widened[..]))
        }
    }
}

/// A bias gradient (f32 from xent) as a Flex tensor in the bias's own dtype.
pub(crate) fn bias_tensor(grad: Vec<f32>, dtype: BurnDType) -> FlexTensor {
    let len = grad.len();
    let b = FlexTensor::from_data(TensorData::new(grad, [len]));
    if dtype == BurnDType::F32 {
        b
    } else {
        FlexTensor::from_data(b.into_data().convert_dtype(dtype))
    }
}

type Grads<T> = (T, Option<T>, Option<T>, Option<T>);

/// The Flex operands of a fused linear op (cross-entropy or log-probs), read once: contiguous
/// hidden, weight and targets, their sizes, and the bias as f32 values. Gradients go back in
/// the inputs' dtype, the bias's in its own.
pub(crate) struct FlexOperands {
    pub hidden: FlexTensor,
    pub weight: FlexTensor,
    pub targets: FlexTensor,
    pub bias: Option<Vec<f32>>,
    /// Rows `N`, classes `V`, width `D`.
    pub n: usize,
    pub v: usize,
    pub d: usize,
    in_dtype: BurnDType,
    bias_dtype: BurnDType,
}

impl FlexOperands {
    /// The operands (a bias of no elements: none).
    pub fn new(hidden: FlexTensor, weight: FlexTensor, bias: FlexTensor, targets: FlexTensor) -> Self {
        let (hidden, weight, targets) = (contiguous(hidden), contiguous(weight), contiguous(targets));
        let n = hidden.layout().shape()[0];
        let (v, d) = (weight.layout().shape()[0], weight.layout().shape()[1]);
        let (in_dtype, bias_dtype) = (hidden.dtype(), bias.dtype());
        let bias = (bias.layout().shape().num_elements() > 0).then(|| f32_values(bias));
        FlexOperands { hidden, weight, targets, bias, n, v, d, in_dtype, bias_dtype }
    }

    /// The bias values as xent reads them.
    pub fn bias_view(&self) -> Option<ArrayView1<'_, f32>> {
        self.bias.as_deref().map(ArrayView1::from)
    }

    /// xent's gradients as Flex tensors.
    pub fn grads(
        &self,
        hidden: Option<Tensor2>,
        weight: Option<Tensor2>,
        bias: Option<ndarray::Array1<f32>>,
    ) -> (Option<FlexTensor>, Option<FlexTensor>, Option<FlexTensor>) {
        (hidden.map(grad_tensor), weight.map(grad_tensor), bias.map(|b| bias_tensor(b.to_vec(), self.bias_dtype)))
    }

    /// NaN gradients of the inputs whose flag is set (the bias's only when there is one):
    /// what a failed call returns while its error waits in [`crate::take_error`].
    pub fn nan_grads(
        &self,
        hidden: bool,
        weight: bool,
        bias: bool,
    ) -> (Option<FlexTensor>, Option<FlexTensor>, Option<FlexTensor>) {
        let nan = |shape: Shape, dtype: BurnDType| {
            FlexTensor::from_data(TensorData::new(vec![f32::NAN; shape.num_elements()], shape).convert_dtype(dtype))
        };
        (
            hidden.then(|| nan(Shape::new([self.n, self.d]), self.in_dtype)),
            weight.then(|| nan(Shape::new([self.v, self.d]), self.in_dtype)),
            (bias && self.bias.is_some()).then(|| nan(Shape::new([self.v]), self.bias_dtype)),
        )
    }
}

fn flex_run(
    hidden: FlexTensor,
    weight: FlexTensor,
    bias: FlexTensor,
    targets: FlexTensor,
    row_scale: FlexTensor,
    args: &XentLinearArgs,
    with_grads: bool,
) -> Grads<FlexTensor> {
    let ops = FlexOperands::new(hidden, weight, bias, targets);
    let n = ops.n;
    let mut t64 = Vec::new();
    let t = targets_view(&ops.targets, &mut t64);
    let mut cfg = args.cfg().clone();
    cfg.grads_in_input_dtype = true;
    if !with_grads {
        cfg.grad_hidden = false;
        cfg.grad_weight = false;
        cfg.grad_bias = false;
    }
    // A per-row upstream: the gradients of sum_n u_n L_n, L_n the per-row losses (every option,
    // the z-loss included, which folding u into the sample weights would miss).
    let scale = (row_scale.layout().shape().num_elements() > 0).then(|| f32_values(row_scale));
    if scale.is_some() {
        cfg.ce.reduction = Reduction::None;
    }
    let bias_view = ops.bias_view();
    let (h, w) = (view(&ops.hidden), view(&ops.weight));
    let res = match &scale {
        Some(u) => cpu().linear_cross_entropy_with_upstream(h, w, bias_view, t, ArrayView1::from(&u[..]), &cfg),
        None => cpu().linear_cross_entropy(h, w, bias_view, t, &cfg),
    };
    // With an upstream the loss is sum_n u_n L_n, one value.
    let loss_shape = if scale.is_some() { Shape::new([1]) } else { XentLinearArgs::new(&cfg).loss_shape(n) };
    match res {
        Ok(out) => {
            let loss = match (&scale, cfg.ce.reduction, out.row_loss) {
                (Some(u), _, Some(rows)) => {
                    vec![rows.iter().zip(u).map(|(l, u)| (*l as f64) * (*u as f64)).sum::<f64>() as f32]
                }
                (Some(_), _, None) => vec![f32::NAN],
                (None, Reduction::None, Some(rows)) => rows.to_vec(),
                (None, Reduction::None, None) => vec![f32::NAN; n],
                _ => vec![out.loss as f32],
            };
            let (gh, gw, gb) = ops.grads(out.grad_hidden, out.grad_weight, out.grad_bias);
            (f32_tensor(loss, loss_shape), gh, gw, gb)
        }
        Err(e) => {
            // The public function checked everything it could: an error here (out of memory,
            // or a call through the trait directly) leaves NaN outputs and waits in take_error.
            record_error(e);
            let (gh, gw, gb) = ops.nan_grads(cfg.grad_hidden, cfg.grad_weight, cfg.grad_bias);
            (f32_tensor(vec![f32::NAN; loss_shape.num_elements()], loss_shape), gh, gw, gb)
        }
    }
}

pub(crate) fn empty_flex() -> FlexTensor {
    FlexTensor::from_data(TensorData::new(Vec::<f32>::new(), [0]))
}

fn mul<B: Backend>(a: FloatTensor<B>, b: FloatTensor<B>) -> FloatTensor<B> {
    B::float_mul(a, b)
}

impl XentLinearOps for Flex {
    fn xent_linear_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        targets: IntTensor<Self>,
        args: XentLinearArgs,
    ) -> FloatTensor<Self> {
        flex_run(hidden, weight, bias, targets, empty_flex(), &args, false).0
    }

    fn xent_linear_cross_entropy_with_grads(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        targets: IntTensor<Self>,
        row_scale: FloatTensor<Self>,
        args: XentLinearArgs,
    ) -> Grads<FloatTensor<Self>> {
        flex_run(hidden, weight, bias, targets, row_scale, &args, true)
    }

    fn xent_linear_scale(grad: FloatTensor<Self>, upstream: FloatTensor<Self>) -> FloatTensor<Self> {
        let up = f32_values(upstream);
        if up == [1.0] {
            return grad;
        }
        let dtype = grad.dtype();
        let shape = if grad.layout().shape().num_dims() == 1 { Shape::new([1]) } else { Shape::new([1, 1]) };
        let s = FlexTensor::from_data(TensorData::new(up, shape).convert_dtype(dtype));
        mul::<Flex>(grad, s)
    }
}

// ---------------------------------------------------------------------------------------------
// Autodiff

/// What the backward pass needs: the gradients themselves (reduction `mean`/`sum`), or the
/// inputs to run the fused pass again with per-row upstream values (reduction `none`).
#[derive(Debug, Clone)]
enum LinearState<B: Backend> {
    Grads(Option<FloatTensor<B>>, Option<FloatTensor<B>>, Option<FloatTensor<B>>),
    Inputs(FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, IntTensor<B>),
}

/// The backward step; its parents are hidden, weight and bias (a bias of no elements, never
/// tracked, when there is none).
#[derive(Debug)]
struct LinearBackward {
    args: XentLinearArgs,
}

impl<B: XentLinearOps> Backward<B, 3> for LinearBackward {
    type State = LinearState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [ph, pw, pb] = ops.parents;
        let upstream = grads.consume::<B>(&ops.node);
        let (gh, gw, gb) = match ops.state {
            LinearState::Grads(gh, gw, gb) => {
                let scale = |g: Option<FloatTensor<B>>| g.map(|g| B::xent_linear_scale(g, upstream.clone()));
                (scale(gh), scale(gw), scale(gb))
            }
            LinearState::Inputs(h, w, b, t) => {
                let (_, gh, gw, gb) = B::xent_linear_cross_entropy_with_grads(h, w, b, t, upstream, self.args);
                (gh, gw, gb)
            }
        };
        for (parent, g) in [(ph, gh), (pw, gw), (pb, gb)] {
            if let (Some(node), Some(g)) = (parent, g) {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

impl<B: XentLinearOps, C: CheckpointStrategy> XentLinearOps for Autodiff<B, C> {
    fn xent_linear_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        targets: IntTensor<Self>,
        args: XentLinearArgs,
    ) -> FloatTensor<Self> {
        let (th, tw, tb) = (hidden.is_tracked(), weight.is_tracked(), bias.is_tracked());
        let (h, nh) = hidden.into_parts();
        let (w, nw) = weight.into_parts();
        let (b, nb) = bias.into_parts();
        let op = LinearBackward { args: args.clone() };
        match op.prepare::<C>([nh, nw, nb]).compute_bound().stateful() {
            OpsKind::Tracked(prep) if args.cfg().ce.reduction == Reduction::None => {
                // Per-row upstream values come in the backward pass: keep the inputs.
                let loss = B::xent_linear_cross_entropy(h.clone(), w.clone(), b.clone(), targets.clone(), args);
                prep.finish(LinearState::Inputs(h, w, b, targets), loss)
            }
            OpsKind::Tracked(prep) => {
                // One fused pass: the loss and the gradients the graph tracks.
                let mut cfg = args.cfg().clone();
                cfg.grad_hidden = th;
                cfg.grad_weight = tw;
                cfg.grad_bias = tb;
                let empty = B::float_zeros(
                    Shape::new([0]),
                    &burn::backend::TensorMetadata::device(&h),
                    burn::tensor::FloatDType::F32,
                );
                let (loss, gh, gw, gb) =
                    B::xent_linear_cross_entropy_with_grads(h, w, b, targets, empty, XentLinearArgs::new(&cfg));
                prep.finish(LinearState::Grads(gh, gw, gb), loss)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::xent_linear_cross_entropy(h, w, b, targets, args)),
        }
    }

    fn xent_linear_cross_entropy_with_grads(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        targets: IntTensor<Self>,
        row_scale: FloatTensor<Self>,
        args: XentLinearArgs,
    ) -> Grads<FloatTensor<Self>> {
        let (loss, gh, gw, gb) = B::xent_linear_cross_entropy_with_grads(
            Self::inner(hidden),
            Self::inner(weight),
            Self::inner(bias),
            targets,
            Self::inner(row_scale),
            args,
        );
        (Self::from_inner(loss), gh.map(Self::from_inner), gw.map(Self::from_inner), gb.map(Self::from_inner))
    }

    fn xent_linear_scale(grad: FloatTensor<Self>, upstream: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::xent_linear_scale(Self::inner(grad), Self::inner(upstream)))
    }
}

// ---------------------------------------------------------------------------------------------
// The public function

/// xent's dtype of a Burn float dtype xent reads (f32, f16, bf16), else a typed error.
pub(crate) fn float_dtype(what: &str, d: BurnDType) -> Result<xent::DType, XentError> {
    match d {
        BurnDType::F32 => Ok(xent::DType::F32),
        BurnDType::F16 => Ok(xent::DType::F16),
        BurnDType::BF16 => Ok(xent::DType::BF16),
        d => Err(XentError::InvalidOption(format!("{what} of {d:?}: xent reads f32, f16 and bf16"))),
    }
}

/// Checks the operands of a fused linear op: one device; `N` targets; shapes and dtypes as
/// [`xent::check::linear_operands`] (`lc`: its workspace bound). Returns `(N, D, V)`.
pub(crate) fn check_operands(
    hidden: &Tensor<2>,
    weight: &Tensor<2>,
    bias: Option<&Tensor<1>>,
    targets: &Tensor<1, Int>,
    lc: &LinearCe,
) -> Result<(usize, usize, usize), XentError> {
    let [n, d] = hidden.dims();
    let [v, dw] = weight.dims();
    let [nt] = targets.dims();
    let device = hidden.device();
    if weight.device() != device || targets.device() != device || bias.is_some_and(|b| b.device() != device) {
        return Err(XentError::InvalidOption("hidden, weight, bias and targets are on different devices".into()));
    }
    if nt != n {
        return Err(XentError::Shape(format!("hidden has {n} rows but targets have {nt}")));
    }
    let bias_len = match bias {
        Some(b) => {
            float_dtype("bias", b.dtype())?;
            Some(b.dims()[0])
        }
        None => None,
    };
    xent::check::linear_operands(
        ((n, d), float_dtype("hidden", hidden.dtype())?),
        ((v, dw), float_dtype("weight", weight.dtype())?),
        bias_len,
        lc,
    )
}

/// Checks class-index targets against `v` classes (read: a CPU device).
pub(crate) fn check_targets(targets: &Tensor<1, Int>, v: usize, ignore_index: i64) -> Result<(), XentError> {
    let t: Vec<i64> = targets
        .to_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .map_err(|e| XentError::InvalidOption(format!("targets: {e:?}")))?;
    xent::check::class_targets(&Targets::I64(ArrayView1::from(&t)), v, ignore_index)
}

/// Checks everything that is known before the call; targets are read (CPU device).
fn check(
    hidden: &Tensor<2>,
    weight: &Tensor<2>,
    bias: Option<&Tensor<1>>,
    targets: &Tensor<1, Int>,
    cfg: &LinearCe,
) -> Result<(), XentError> {
    let (n, _, v) = check_operands(hidden, weight, bias, targets, cfg)?;
    xent::check::cross_entropy_options(v, &cfg.ce)?;
    if let Some(w) = &cfg.ce.data.sample_weight {
        if w.len() != n {
            return Err(XentError::Shape(format!("sample_weight has {} entries for {n} rows", w.len())));
        }
    }
    if !is_host(&hidden.device()) {
        // Burn's wgpu backends: the targets stay on the device (reading them would wait for
        // the queue), so a target out of range gives NaN there, as in `cross_entropy`.
        return crate::compose::unsupported(cfg).map_or(Ok(()), Err);
    }
    check_targets(targets, v, cfg.ce.ignore_index)
}

/// Fused linear cross-entropy: the cross-entropy of the logits `hidden @ weight^T + bias`
/// (`hidden [N, D]`, `weight [V, D]`, `bias [V]`) against class indices `targets [N]`, with
/// every option of [`LinearCe`] (reduction, `ignore_index`, class and sample weights, label
/// smoothing, z-loss, softcap, temperature, workspace bound) and PyTorch's semantics, without
/// ever holding the `[N, V]` logits or their gradient: xent computes them one row chunk at a
/// time. Returns `[N]` per-row losses with `Reduction::None`, else a `[1]` tensor, in f32
/// (hidden and weight may be f32, f16 or bf16, in one dtype; arithmetic in f32).
///
/// Under autodiff it is differentiable w.r.t. `hidden`, `weight` and `bias`, whichever the graph
/// tracks. With reduction `mean` or `sum` the gradients are computed in the forward pass (one
/// fused pass) and kept until the backward pass, which scales them by the upstream gradient:
/// the state is `[N, D] + [V, D] + [V]` values, never `[N, V]`. With reduction `none` the
/// backward pass runs the fused pass again, with the upstream per-row gradient folded into the
/// sample weights and reduction `sum`. Gradients come back in the inputs' dtype; `cfg`'s
/// `grad_*` flags are decided by what the graph tracks, and `grads_in_input_dtype` is implied.
///
/// Backends, plain or under autodiff:
/// - Burn's Flex (CPU) backend: xent's CPU kernel reads Flex's storage in place.
/// - Burn's wgpu backends (feature `gpu`; fusion or plain cube, on a device from
///   [`crate::wgpu_device`]): per row chunk, Burn's own matrix product makes the chunk's
///   logits, xent's fused kernel their per-row losses and gradient, and Burn's products the
///   gradients' parts, all on the device and queue (no host transfer, no wait). Arithmetic in
///   f32 (f16 operands are converted once). Chunks are at least 1024 rows unless
///   `workspace_bytes` is set. Targets stay on the device: one out of range gives NaN there
///   instead of an error. A z-loss together with sample weights, or with class weights and
///   reduction `mean`, is [`XentError::InvalidOption`] there (use Flex).
///
/// Shapes, dtypes, devices, options and (on Flex) the targets' range are checked here: bad
/// input is an error, never a panic.
///
/// ```
/// use burn::prelude::*;
/// use xent::LinearCe;
///
/// let device = Device::flex().autodiff();
/// let hidden = Tensor::<2>::from_floats([[0.5, -1.0], [2.0, 0.25], [0.0, 1.0]], &device).require_grad();
/// let weight = Tensor::<2>::from_floats([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]], &device).require_grad();
/// let bias = Tensor::<1>::from_floats([0.1, 0.0, -0.1, 0.2], &device).require_grad();
/// let targets = Tensor::<1, Int>::from_ints([3, -100, 1], &device); // the second row is ignored
/// let loss = xent_burn::linear_cross_entropy(hidden.clone(), weight.clone(), Some(bias.clone()), targets, &LinearCe::default())?;
/// let grads = loss.backward();
/// assert_eq!(hidden.grad(&grads).expect("d hidden").dims(), [3, 2]);
/// assert_eq!(weight.grad(&grads).expect("d weight").dims(), [4, 2]);
/// assert_eq!(bias.grad(&grads).expect("d bias").dims(), [4]);
/// # Ok::<(), xent::XentError>(())
/// ```
pub fn linear_cross_entropy(
    hidden: Tensor<2>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    targets: Tensor<1, Int>,
    cfg: &LinearCe,
) -> Result<Tensor<1>, XentError> {
    check(&hidden, &weight, bias.as_ref(), &targets, cfg)?;
    let bias = bias.unwrap_or_else(|| Tensor::empty([0], &hidden.device()));
    let out = Dispatch::xent_linear_cross_entropy(
        hidden.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        targets.into_dispatch(),
        XentLinearArgs::new(cfg),
    );
    Ok(Tensor::from_dispatch(out))
}

/// The loss (as [`linear_cross_entropy`]) and its gradients w.r.t. hidden `[N, D]`, weight
/// `[V, D]` and bias `[V]` (when given), in one fused pass outside autodiff: for hand-written
/// backward passes and for measuring. Gradients in the inputs' dtype; those `cfg` turns off
/// are `None`. With reduction `none` the gradients are those of the sum of the per-row losses.
#[allow(clippy::type_complexity)]
pub fn linear_cross_entropy_with_grads(
    hidden: Tensor<2>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    targets: Tensor<1, Int>,
    cfg: &LinearCe,
) -> Result<(Tensor<1>, Option<Tensor<2>>, Option<Tensor<2>>, Option<Tensor<1>>), XentError> {
    check(&hidden, &weight, bias.as_ref(), &targets, cfg)?;
    let device = hidden.device();
    let bias = bias.unwrap_or_else(|| Tensor::empty([0], &device));
    let (loss, gh, gw, gb) = Dispatch::xent_linear_cross_entropy_with_grads(
        hidden.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        targets.into_dispatch(),
        Tensor::<1>::empty([0], &device).into_dispatch(),
        XentLinearArgs::new(cfg),
    );
    Ok((
        Tensor::from_dispatch(loss),
        gh.map(Tensor::from_dispatch),
        gw.map(Tensor::from_dispatch),
        gb.map(Tensor::from_dispatch),
    ))
}
