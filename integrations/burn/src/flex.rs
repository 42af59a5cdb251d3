//! Burn's Flex CPU backend: xent's CPU kernels read the logits' storage in place and write the
//! gradient straight into a new Flex tensor (no copies).

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::Flex;
use burn::tensor::{DType as BurnDType, Shape, TensorData};
use burn_flex::FlexTensor;
use half::{bf16, f16};
use ndarray::{ArrayView1, ArrayView2, ArrayViewMut2};
use xent::{Logits, LogitsMut, Targets};

use crate::ops::cpu_cross_entropy;
use crate::pool;
use crate::{XentArgs, XentOps};

/// Contiguous storage of a Flex tensor (copied only if it is a strided view).
pub(crate) fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.is_contiguous() && t.layout().start_offset() == 0 {
        t
    } else {
        t.to_contiguous()
    }
}

fn loss_tensor(values: Vec<f32>, shape: Shape, dtype: BurnDType) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape).convert_dtype(dtype))
}

fn run(logits: FlexTensor, targets: FlexTensor, args: &XentArgs, with_grad: bool) -> (FlexTensor, Option<FlexTensor>) {
    let logits = contiguous(logits);
    let targets = contiguous(targets);
    let dims = logits.layout().shape().clone();
    let (n, v) = (dims[0], dims[1]);
    let dtype = logits.dtype();
    let t64: Vec<i64>;
    let t = match targets.dtype() {
        BurnDType::I64 => Targets::I64(ArrayView1::from(targets.storage::<i64>())),
        BurnDType::I32 => Targets::I32(ArrayView1::from(targets.storage::<i32>())),
        _ => {
            // Narrower or unsigned integer targets: widened once (N values).
            let data = targets.clone().into_data().convert::<i64>();
            // A failed conversion leaves no targets: xent's length check then reports it.
            t64 = data.try_to_vec::<i64>().unwrap_or_default();
            Targets::I64(ArrayView1::from(&t64[..]))
        }
    };
    fn view(x: &FlexTensor, n: usize, v: usize) -> Logits<'_> {
        match x.dtype() {
            BurnDType::F16 => {
                Logits::F16(ArrayView2::from_shape((n, v), x.storage::<f16>()).expect("contiguous [N, V]"))
            }
            BurnDType::BF16 => {
                Logits::BF16(ArrayView2::from_shape((n, v), x.storage::<bf16>()).expect("contiguous [N, V]"))
            }
            _ => Logits::F32(ArrayView2::from_shape((n, v), x.storage::<f32>()).expect("contiguous [N, V]")),
        }
    }
    let loss_shape = args.loss_shape(n);
    if !with_grad {
        let values = cpu_cross_entropy(view(&logits, n, v), t, args.cfg(), None);
        return (loss_tensor(values, loss_shape, dtype), None);
    }
    // The gradient in a pooled buffer (the last one Burn dropped, of this size), handed to Burn
    // without a copy; it returns to the pool when Burn drops the tensor.
    let shape = Shape::new([n, v]);
    let (values, grad) = match dtype {
        BurnDType::F16 => pool::filled(n * v, |g: &mut [f16]| {
            let g = ArrayViewMut2::from_shape((n, v), g).expect("[N, V]");
            cpu_cross_entropy(view(&logits, n, v), t, args.cfg(), Some(LogitsMut::F16(g)))
        }),
        BurnDType::BF16 => pool::filled(n * v, |g: &mut [bf16]| {
            let g = ArrayViewMut2::from_shape((n, v), g).expect("[N, V]");
            cpu_cross_entropy(view(&logits, n, v), t, args.cfg(), Some(LogitsMut::BF16(g)))
        }),
        _ => pool::filled(n * v, |g: &mut [f32]| {
            let g = ArrayViewMut2::from_shape((n, v), g).expect("[N, V]");
            cpu_cross_entropy(view(&logits, n, v), t, args.cfg(), Some(LogitsMut::F32(g)))
        }),
    };
    let grad_dtype = if matches!(dtype, BurnDType::F16 | BurnDType::BF16) { dtype } else { BurnDType::F32 };
    let grad = FlexTensor::from_data(TensorData::from_bytes(grad, shape, grad_dtype));
    (loss_tensor(values, loss_shape, dtype), Some(grad))
}

impl XentOps for Flex {
    fn xent_cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>, args: XentArgs) -> FloatTensor<Self> {
        run(logits, targets, &args, false).0
    }

    fn xent_cross_entropy_with_grad(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        args: XentArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (loss, grad) = run(logits, targets, &args, true);
        (loss, grad.expect("a gradient was asked for"))
    }

    fn xent_cross_entropy_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        args: XentArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        // The fused gradient is the state: the backward pass only scales it.
        Self::xent_cross_entropy_with_grad(logits, targets, args)
    }

    fn xent_cross_entropy_backward(
        _logits: FloatTensor<Self>,
        _targets: IntTensor<Self>,
        state: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
        args: XentArgs,
    ) -> FloatTensor<Self> {
        times_upstream(state, upstream, args.cfg().reduction)
    }
}

/// A fused gradient `[N, V]` times the upstream gradient of its loss (`[1]`, or `[N]` with
/// reduction `none`). `loss.backward()` on the loss itself gives an upstream gradient of
/// exactly 1, which leaves the gradient as it is (the common case: no [N, V] multiply).
pub(crate) fn times_upstream(grad: FlexTensor, upstream: FlexTensor, reduction: xent::Reduction) -> FlexTensor {
    let up = contiguous(upstream.clone());
    let one = match up.dtype() {
        BurnDType::F32 => up.storage::<f32>() == [1.0],
        BurnDType::F16 => up.storage::<f16>() == [f16::ONE],
        BurnDType::BF16 => up.storage::<bf16>() == [bf16::ONE],
        _ => false,
    };
    if one && reduction != xent::Reduction::None {
        return grad;
    }
    let rows = grad.layout().shape()[0];
    crate::ops::scale_by_upstream::<Flex>(grad, upstream, reduction, rows)
}
