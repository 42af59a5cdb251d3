//! Fused linear cross-entropy on backends without a linear kernel of xent's own (Burn's wgpu
//! backends, plain cube or fusion): per row chunk, the backend's own matrix product computes
//! the chunk's logits, xent's fused logits-level kernel ([`XentOps::xent_cross_entropy_with_grad`])
//! turns them into per-row losses and their gradient in one pass, and the backend's products
//! turn that gradient into the chunk's part of `grad_hidden`, `grad_weight` and `grad_bias`.
//!
//! This is Liger-Kernel's scheme on CUDA (cuBLAS products around a fused Triton loss kernel):
//! the products are the framework's, autotuned for the device by cubecl, and xent contributes
//! the pass over the logits. Everything stays on the device and on the backend's queue: no host
//! transfer and no wait, and the `[N, V]` logits never exist, only `[chunk, V]` of them (twice:
//! the logits and their gradient; at least 1024 rows a chunk by default: the products are
//! the backend's, and tall operands are what they need, `LinearCe::device_chunk_rows`).
//!
//! The loss's definition is xent's ([`xent::LinearCe`]) and is kept exact by splitting it into
//! the per-row part the kernel computes and a per-row weight applied outside: the chunk runs with
//! reduction `none`, no sample weights and a gradient scale of 1, so row `n` gives `l_n` (class
//! weights, label smoothing, z-loss, softcap and temperature inside) and `dl_n/dz`. The call's
//! gradients are those of `sum_n r_n l_n` for the row weights
//! - `sample_weight[n] / sum_{counted} sample_weight * class_weight[y]` (reduction `mean`; the
//!   denominator reduced on the device, from the targets),
//! - `sample_weight[n]` (reduction `sum`, and `none`'s gradients, those of the per-row sum),
//! - `upstream[n] * sample_weight[n]` (an upstream gradient per row),
//!
//! times `grad_scale`; `r` scales rows of `[chunk, D]` operands, never of `[chunk, V]` ones.
//! xent's z-loss term is not multiplied by sample weights and its mean divides by the counted
//! rows instead of the weight sum, so a z-loss with sample weights, or with class weights and
//! reduction `mean`, has no such split: [`unsupported`] names it and the public function
//! returns that error before anything runs.
//!
//! Arithmetic is f32: f16 and bf16 inputs are converted once (the weight then exists in f32
//! beside the original, as does its f32 gradient in xent's own GPU path), so the logits are as
//! accurate as xent's other paths; gradients return in the inputs' dtype.

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{get_device_settings, Scalar, Slice, TensorMetadata};
use burn::tensor::{DType as BurnDType, FloatDType, IndexingUpdateOp, Shape, TensorData};
use xent::{CrossEntropy, LinearCe, Reduction, XentError};

use crate::{XentArgs, XentOps};

/// The loss and the gradients of hidden, weight and bias.
pub(crate) type Grads<T> = (T, Option<T>, Option<T>, Option<T>);

/// The option combination this composition cannot express exactly (see the module docs), if
/// `cfg` has it.
pub(crate) fn unsupported(cfg: &LinearCe) -> Option<XentError> {
    let ce = &cfg.ce;
    let split = ce.z_loss == 0.0
        || (ce.data.sample_weight.is_none() && (ce.class_weight.is_none() || ce.reduction != Reduction::Mean));
    (!split).then(|| {
        XentError::InvalidOption(
            "z_loss with sample weights, or with class weights and reduction mean: not available on Burn's \
             wgpu backend (its mean has two denominators); use Flex, or drop one of the options"
                .into(),
        )
    })
}

fn range(a: usize, b: usize) -> Slice {
    Slice::new(a as isize, Some(b as isize), 1)
}

fn to_f32<B: burn::backend::Backend>(t: FloatTensor<B>) -> FloatTensor<B> {
    if t.dtype() == BurnDType::F32 {
        t
    } else {
        B::float_cast(t, FloatDType::F32)
    }
}

fn to_dtype<B: burn::backend::Backend>(t: FloatTensor<B>, dtype: BurnDType) -> FloatTensor<B> {
    match dtype {
        BurnDType::F16 => B::float_cast(t, FloatDType::F16),
        BurnDType::BF16 => B::float_cast(t, FloatDType::BF16),
        _ => t,
    }
}

/// Values on the device as an f32 tensor of `shape`.
fn upload<B: burn::backend::Backend>(values: Vec<f32>, shape: Shape, device: &B::Device) -> FloatTensor<B> {
    B::float_from_data(TensorData::new(values, shape), device)
}

/// The fused linear cross-entropy of `hidden [N, D]`, `weight [V, D]`, `bias [V]` (or `[0]`),
/// `targets [N]`, as [`crate::XentLinearOps::xent_linear_cross_entropy_with_grads`] (with
/// `with_grads` false, the loss alone); `row_scale` `[N]` or `[0]`.
pub(crate) fn linear_ce<B: XentOps>(
    hidden: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
    targets: IntTensor<B>,
    row_scale: FloatTensor<B>,
    cfg: &LinearCe,
    with_grads: bool,
) -> Grads<FloatTensor<B>> {
    let ce = &cfg.ce;
    // What has no exact split here (the public function refused it already; a call through the
    // trait gets NaN outputs and the error in `take_error`, never wrong numbers).
    let refused = unsupported(cfg).map(crate::ops::record_error).is_some();
    let device = hidden.device();
    let (n, d) = (hidden.shape()[0], hidden.shape()[1]);
    let v = weight.shape()[0];
    let (in_dtype, bias_dtype) = (hidden.dtype(), bias.dtype());
    let has_bias = bias.shape().num_elements() > 0;
    let upstream = (row_scale.shape().num_elements() > 0).then(|| to_f32::<B>(row_scale));
    let want = |flag: bool| with_grads && flag;
    let (g_h, g_w, g_b) = (want(cfg.grad_hidden), want(cfg.grad_weight), want(cfg.grad_bias && has_bias));
    let any_grad = g_h || g_w || g_b;

    let h = to_f32::<B>(hidden);
    let w = to_f32::<B>(weight);
    let wt = B::float_transpose(w.clone());
    let b = has_bias.then(|| B::float_reshape(to_f32::<B>(bias), Shape::new([1, v])));

    // Per-row weights: the sample weights (all 1 without), times the upstream values.
    let sw = ce.data.sample_weight.as_ref().map(|s| upload::<B>(s.to_vec(), Shape::new([n]), &device));
    let row_w = match (&sw, &upstream) {
        (Some(s), Some(u)) => Some(B::float_mul(s.clone(), u.clone())),
        (Some(s), None) => Some(s.clone()),
        (None, Some(u)) => Some(u.clone()),
        (None, None) => None,
    };
    let ones = || upload::<B>(vec![1.0; n], Shape::new([n]), &device);
    // A mean's denominator: the weights of the counted rows, summed on the device.
    let mean = ce.reduction == Reduction::Mean && upstream.is_none();
    let bool_dtype = get_device_settings::<B>(&device).bool_dtype;
    let den = mean.then(|| {
        let counted = B::int_not_equal_elem(targets.clone(), Scalar::Int(ce.ignore_index), bool_dtype);
        let mut wts = B::bool_into_float(counted, FloatDType::F32);
        if let Some(s) = &sw {
            wts = B::float_mul(wts, s.clone());
        }
        if let Some(cw) = &ce.class_weight {
            let cw = upload::<B>(cw.to_vec(), Shape::new([v]), &device);
            let idx = B::int_clamp(targets.clone(), Scalar::Int(0), Scalar::Int(v.saturating_sub(1) as i64));
            wts = B::float_mul(wts, B::float_gather(0, cw, idx));
        }
        B::float_sum(wts)
    });
    // The gradients' row scale r (module docs); 0 rather than infinity when nothing counts, so
    // that the gradients are zeros there (the loss is 0/0, NaN, as PyTorch's).
    let r = any_grad.then(|| {
        let mut r = row_w.clone().unwrap_or_else(ones);
        if let Some(den) = &den {
            let zero = B::float_equal_elem(den.clone(), Scalar::Float(0.0), bool_dtype);
            let inv = B::float_mask_fill(B::float_recip(den.clone()), zero, Scalar::Float(0.0));
            r = B::float_mul(r, inv);
        }
        if ce.grad_scale != 1.0 {
            r = B::float_mul_scalar(r, Scalar::Float(ce.grad_scale as f64));
        }
        B::float_reshape(r, Shape::new([n, 1]))
    });

    // The loss's definition with reduction none and no scale; the call's data (sample weights,
    // per-row outputs) stays outside the kernel.
    let mut chunk_cfg: CrossEntropy = ce.clone();
    chunk_cfg.reduction = Reduction::None;
    chunk_cfg.grad_scale = 1.0;
    chunk_cfg.data = Default::default();
    chunk_cfg.outputs = Default::default();
    let chunk_args = XentArgs::new(&chunk_cfg);
    let rows = cfg.device_chunk_rows(n, v);
    let mut losses = Vec::new();
    let mut gh_parts = Vec::new();
    let mut gw: Option<FloatTensor<B>> = None;
    let mut gb: Option<FloatTensor<B>> = None;
    for r0 in (0..n).step_by(rows.max(1)) {
        let r1 = (r0 + rows).min(n);
        let hc = B::float_slice(h.clone(), &[range(r0, r1), range(0, d)]);
        let tc = B::int_slice(targets.clone(), &[range(r0, r1)]);
        let mut z = B::float_matmul(hc.clone(), wt.clone());
        if let Some(b) = &b {
            z = B::float_add(z, b.clone());
        }
        let Some(r) = &r else {
            losses.push(to_f32::<B>(B::xent_cross_entropy(z, tc, chunk_args.clone())));
            continue;
        };
        let (loss, g) = B::xent_cross_entropy_with_grad(z, tc, chunk_args.clone());
        losses.push(to_f32::<B>(loss));
        let rc = B::float_slice(r.clone(), &[range(r0, r1), range(0, 1)]);
        if g_h {
            gh_parts.push(B::float_mul(B::float_matmul(g.clone(), w.clone()), rc.clone()));
        }
        if g_w {
            let part = B::float_matmul(B::float_transpose(g.clone()), B::float_mul(hc, rc.clone()));
            gw = Some(match gw {
                Some(acc) => B::float_add(acc, part),
                None => part,
            });
        }
        if g_b {
            let part = B::float_matmul(B::float_transpose(rc), g);
            gb = Some(match gb {
                Some(acc) => B::float_add(acc, part),
                None => part,
            });
        }
    }
    let zeros = |shape: Shape| B::float_zeros(shape, &device, FloatDType::F32);
    let row_loss = match losses.len() {
        0 => zeros(Shape::new([0])),
        1 => losses.pop().expect("one"),
        _ => B::float_cat(losses, 0),
    };
    let weighted = match &row_w {
        Some(w) => B::float_mul(row_loss, w.clone()),
        None => row_loss,
    };
    let loss = match (ce.reduction, upstream.is_some()) {
        (Reduction::None, false) => weighted,
        _ => {
            let total = B::float_reshape(B::float_sum(weighted), Shape::new([1]));
            match den {
                Some(den) => B::float_div(total, B::float_reshape(den, Shape::new([1]))),
                None => total,
            }
        }
    };
    let nan = |t: FloatTensor<B>| if refused { B::float_mul_scalar(t, Scalar::Float(f64::NAN)) } else { t };
    let loss = nan(loss);
    let gh = g_h.then(|| {
        let g = match gh_parts.len() {
            0 => zeros(Shape::new([0, d])),
            1 => gh_parts.pop().expect("one"),
            _ => B::float_cat(gh_parts, 0),
        };
        to_dtype::<B>(nan(g), in_dtype)
    });
    let gw = g_w.then(|| to_dtype::<B>(nan(gw.unwrap_or_else(|| zeros(Shape::new([v, d])))), in_dtype));
    let gb = g_b.then(|| {
        let g = gb.map(|g| B::float_reshape(g, Shape::new([v]))).unwrap_or_else(|| zeros(Shape::new([v])));
        to_dtype::<B>(nan(g), bias_dtype)
    });
    (loss, gh, gw, gb)
}

/// Per-row log-probs and entropies of `softmax((hidden @ weight^T + bias) / T)` and, with an
/// upstream `[2, N]` (`a`, `b`), the gradients of `sum_n a_n logp_n + b_n H_n`, as
/// [`crate::XentLogprobsOps::xent_linear_logprobs_with_grads`], composed per row chunk from the
/// backend's own ops: Burn's products as in [`linear_ce`], and the row statistics in Burn's
/// element-wise ops (max-subtracted, f32), which its fusion backend fuses. The chunk's gradient
/// over the logits is `(a (onehot(y) - p) - b p (log p + H)) / T`; ignored rows give 0 and no
/// gradient; a target out of range (not ignored) gives NaN in its row, since reading the
/// targets to check them would wait for the device.
pub(crate) fn linear_logprobs<B: burn::backend::Backend>(
    hidden: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
    targets: IntTensor<B>,
    upstream: Option<FloatTensor<B>>,
    cfg: &xent::LinearLogprobs,
) -> Grads<FloatTensor<B>> {
    let device = hidden.device();
    let (n, d) = (hidden.shape()[0], hidden.shape()[1]);
    let v = weight.shape()[0];
    let (in_dtype, bias_dtype) = (hidden.dtype(), bias.dtype());
    let has_bias = bias.shape().num_elements() > 0;
    let with_grads = upstream.is_some();
    let (g_h, g_w, g_b) =
        (with_grads && cfg.grad_hidden, with_grads && cfg.grad_weight, with_grads && cfg.grad_bias && has_bias);
    let bool_dtype = get_device_settings::<B>(&device).bool_dtype;
    let h = to_f32::<B>(hidden);
    let w = to_f32::<B>(weight);
    let wt = B::float_transpose(w.clone());
    let b = has_bias.then(|| B::float_reshape(to_f32::<B>(bias), Shape::new([1, v])));
    let inv_t = 1.0 / cfg.temperature as f64;
    let up = upstream.map(|u| to_f32::<B>(u));
    let rows = cfg.device_chunk_rows(n, v);
    let (mut logps, mut ents, mut gh_parts) = (Vec::new(), Vec::new(), Vec::new());
    let (mut gw, mut gb): (Option<FloatTensor<B>>, Option<FloatTensor<B>>) = (None, None);
    for r0 in (0..n).step_by(rows.max(1)) {
        let r1 = (r0 + rows).min(n);
        let bn = r1 - r0;
        let hc = B::float_slice(h.clone(), &[range(r0, r1), range(0, d)]);
        let tc = B::int_slice(targets.clone(), &[range(r0, r1)]);
        let mut z = B::float_matmul(hc.clone(), wt.clone());
        if let Some(b) = &b {
            z = B::float_add(z, b.clone());
        }
        let z = B::float_mul_scalar(z, Scalar::Float(inv_t));
        // log p = s - log sum exp s, s = z - max z.
        let s = B::float_sub(z.clone(), B::float_max_dim(z, 1));
        let lsm = B::float_sub(s.clone(), B::float_log(B::float_sum_dim(B::float_exp(s), 1)));
        let p = B::float_exp(lsm.clone());
        // Rows: counted (not ignored), and of those the ones whose target is out of range.
        let ignored = B::int_equal_elem(tc.clone(), Scalar::Int(cfg.ignore_index), bool_dtype);
        let low = B::int_lower_elem(tc.clone(), Scalar::Int(0), bool_dtype);
        let high = B::int_greater_equal_elem(tc.clone(), Scalar::Int(v as i64), bool_dtype);
        let out_of_range = B::bool_and(B::bool_or(low, high), B::bool_not(ignored.clone()));
        let keep = B::float_reshape(B::bool_into_float(B::bool_not(ignored), FloatDType::F32), Shape::new([bn, 1]));
        let idx = B::int_reshape(
            B::int_clamp(tc, Scalar::Int(0), Scalar::Int(v.saturating_sub(1) as i64)),
            Shape::new([bn, 1]),
        );
        let logp = B::float_mul(B::float_gather(1, lsm.clone(), idx.clone()), keep.clone());
        let logp = B::float_mask_fill(B::float_reshape(logp, Shape::new([bn])), out_of_range, Scalar::Float(f64::NAN));
        let ent = B::float_neg(B::float_sum_dim(B::float_mul(p.clone(), lsm.clone()), 1)); // [bn, 1]
        logps.push(logp);
        ents.push(B::float_reshape(B::float_mul(ent.clone(), keep.clone()), Shape::new([bn])));
        let Some(up) = &up else { continue };
        let col = |row: usize| {
            let u = B::float_slice(up.clone(), &[range(row, row + 1), range(r0, r1)]);
            B::float_mul(B::float_reshape(u, Shape::new([bn, 1])), keep.clone())
        };
        let (a, bb) = (col(0), col(1));
        // G = (a (onehot - p) - b p (log p + H)) / T.
        let mut g =
            B::float_neg(B::float_mul(p.clone(), B::float_add(a.clone(), B::float_mul(bb, B::float_add(lsm, ent)))));
        g = B::float_scatter(1, g, idx, a, IndexingUpdateOp::Add);
        let g = B::float_mul_scalar(g, Scalar::Float(inv_t));
        if g_h {
            gh_parts.push(B::float_matmul(g.clone(), w.clone()));
        }
        if g_w {
            let part = B::float_matmul(B::float_transpose(g.clone()), hc);
            gw = Some(match gw {
                Some(acc) => B::float_add(acc, part),
                None => part,
            });
        }
        if g_b {
            let part = B::float_sum_dim(g, 0);
            gb = Some(match gb {
                Some(acc) => B::float_add(acc, part),
                None => part,
            });
        }
    }
    let zeros = |shape: Shape| B::float_zeros(shape, &device, FloatDType::F32);
    let cat = |mut parts: Vec<FloatTensor<B>>, empty: Shape| match parts.len() {
        0 => zeros(empty),
        1 => parts.pop().expect("one"),
        _ => B::float_cat(parts, 0),
    };
    let values = B::float_cat(
        vec![
            B::float_reshape(cat(logps, Shape::new([0])), Shape::new([1, n])),
            B::float_reshape(cat(ents, Shape::new([0])), Shape::new([1, n])),
        ],
        0,
    );
    let gh = g_h.then(|| to_dtype::<B>(cat(gh_parts, Shape::new([0, d])), in_dtype));
    let gw = g_w.then(|| to_dtype::<B>(gw.unwrap_or_else(|| zeros(Shape::new([v, d]))), in_dtype));
    let gb = g_b.then(|| {
        let g = gb.map(|g| B::float_reshape(g, Shape::new([v]))).unwrap_or_else(|| zeros(Shape::new([v])));
        to_dtype::<B>(g, bias_dtype)
    });
    (values, gh, gw, gb)
}
