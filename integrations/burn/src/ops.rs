//! What the backends share: dtype mapping, the CPU computation (Flex, and the host fallback of
//! cube devices xent does not share) and the record of device-side failures.

use std::sync::{Arc, Mutex};

use burn::backend::DispatchDevice;
use burn::prelude::Device;
use xent::cpu::SharedCpu;
use xent::{Cpu, CrossEntropy, Logits, LogitsMut, Reduction, Targets, XentError};

/// True when `device` (autodiff or not) is a CPU backend: its tensors can be read directly.
pub(crate) fn is_host(device: &Device) -> bool {
    matches!(device.clone().inner().as_dispatch(), DispatchDevice::Flex(_))
}

/// xent's dtype for a Burn float dtype (callers checked that it is one of the three).
#[cfg(feature = "gpu")]
pub(crate) fn xent_dtype(d: burn::tensor::DType) -> xent::DType {
    match d {
        burn::tensor::DType::F16 => xent::DType::F16,
        burn::tensor::DType::BF16 => xent::DType::BF16,
        _ => xent::DType::F32,
    }
}

static CPU: SharedCpu = SharedCpu::new();

/// Makes xent-burn's CPU calls from now on (on Flex, and the host fallback of cube devices
/// xent does not share) run on `cpu`: its thread count ([`Cpu::with_threads`]; by default one
/// thread per core, beside Burn's own), its matrix-product kernels ([`Cpu::with_matmul`]) and
/// how its bf16 kernels take the f32 gradient ([`Cpu::with_bf16_grad`]: `Bf16Grad::Rounded` is
/// PyTorch's bf16 precision and faster, the default `Split` keeps f32 accuracy). Process-wide,
/// as a Burn device is; a call already running keeps the backend it began with. Burn's wgpu
/// devices do not read it.
///
/// ```
/// use xent::cpu::Bf16Grad;
/// use xent::Cpu;
///
/// xent_burn::set_cpu(Cpu::with_threads(2)?.with_bf16_grad(Bf16Grad::Rounded));
/// assert_eq!(xent_burn::cpu().threads(), 2);
/// assert_eq!(xent_burn::cpu().bf16_grad_terms()?, (1, 1));
/// # Ok::<(), xent::XentError>(())
/// ```
pub fn set_cpu(cpu: Cpu) {
    CPU.set(cpu);
}

/// The CPU backend of xent-burn's CPU calls now ([`set_cpu`]'s, else one thread per core with
/// the kernels the CPU has): for asking it which kernels a call would use
/// ([`Cpu::linear_matmul`], [`Cpu::bf16_grad_terms`]).
pub fn cpu() -> Arc<Cpu> {
    CPU.get()
}

static LAST_ERROR: Mutex<Option<XentError>> = Mutex::new(None);

/// Records an error that a backend op cannot return (its outputs are NaN instead).
pub(crate) fn record_error(e: XentError) {
    *LAST_ERROR.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
}

/// The last error that a loss call met after its checks had passed (device lost, out of
/// memory, a target out of range on a CPU backend reached through the backend trait directly),
/// taken: such a call cannot return it, so its outputs are NaN and the error waits here.
pub fn take_error() -> Option<XentError> {
    LAST_ERROR.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// The loss values of one call: `[N]` per-row losses for reduction `none`, else `[loss]`.
pub(crate) fn loss_values(out: &xent::CeOutput, n: usize, cfg: &CrossEntropy) -> Vec<f32> {
    match (cfg.reduction, &out.row_loss) {
        (Reduction::None, Some(rows)) => rows.to_vec(),
        (Reduction::None, None) => vec![f32::NAN; n],
        _ => vec![out.loss as f32],
    }
}

/// xent's CPU cross-entropy; on an error the loss (and `grad`) are NaN and the error is
/// recorded for [`take_error`].
pub(crate) fn cpu_cross_entropy(
    x: Logits<'_>,
    t: Targets<'_>,
    cfg: &CrossEntropy,
    grad: Option<LogitsMut<'_>>,
) -> Vec<f32> {
    let n = x.dim().0;
    let cfg = cfg.clone().with_per_row(cfg.reduction == Reduction::None);
    let res = match grad {
        Some(mut g) => cpu().cross_entropy_into(x, t, &cfg, g.reborrow()).map_err(|e| (e, Some(g))),
        None => cpu().cross_entropy(x, t, &cfg).map_err(|e| (e, None)),
    };
    match res {
        Ok(out) => loss_values(&out, n, &cfg),
        Err((e, g)) => {
            record_error(e);
            if let Some(mut g) = g {
                let (n, v) = g.dim();
                g.assign_f32(ndarray::Array2::from_elem((n, v), f32::NAN).view());
            }
            vec![f32::NAN; if cfg.reduction == Reduction::None { n } else { 1 }]
        }
    }
}

/// `grad [N, V]` times the upstream gradient (`[1]`, or `[N]` with reduction `none`),
/// broadcast over the rows, in the gradient's dtype.
pub(crate) fn scale_by_upstream<B: burn::backend::Backend>(
    grad: burn::backend::tensor::FloatTensor<B>,
    upstream: burn::backend::tensor::FloatTensor<B>,
    reduction: Reduction,
    rows: usize,
) -> burn::backend::tensor::FloatTensor<B> {
    use burn::backend::TensorMetadata;
    let shape = match reduction {
        Reduction::None => burn::tensor::Shape::new([rows, 1]),
        _ => burn::tensor::Shape::new([1, 1]),
    };
    let dtype = grad.dtype();
    let up = B::float_reshape(upstream, shape);
    let up = if up.dtype() == dtype { up } else { B::float_cast(up, dtype.into()) };
    B::float_mul(grad, up)
}
