//! Fused linear cross-entropy as a Candle op: the loss of `hidden @ weight.T (+ bias)` without
//! the `[N, V]` logits or their gradient.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Layout, Shape, Storage, Tensor, WithDType};
use ndarray::{Array2, ArrayView1, ArrayView2};
use xent::half::{bf16, f16};
use xent::{Cpu, LinearCe, LinearCeOutput, Logits, Reduction, Targets, Tensor2, XentError};

use crate::{cpu, err, slice};

/// The gradients a forward pass leaves for backward.
#[derive(Default)]
struct Grads {
    hidden: Option<Tensor>,
    weight: Option<Tensor>,
    bias: Option<Tensor>,
}

/// The op: options (gradient flags narrowed to the inputs Candle tracks), the targets as i64,
/// and for `Mean`/`Sum` the gradients of the forward pass until backward takes them.
struct LinearOp {
    cfg: LinearCe,
    targets: Vec<i64>,
    cpu: Arc<Cpu>,
    cache: Mutex<Option<Grads>>,
}

/// A `[rows, cols]` matrix of Candle's CPU storage as xent's typed view.
pub(crate) fn matrix<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<Logits<'a>> {
    let &[r, c] = l.shape().dims() else {
        return Err(err(XentError::Shape(format!("{what} must be a matrix, got shape {:?}", l.shape().dims()))));
    };
    let view = |e: ndarray::ShapeError| err(XentError::Shape(format!("{what}: {e}")));
    Ok(match s {
        CpuStorage::F32(x) => ArrayView2::from_shape((r, c), slice(x, l, what)?).map_err(view)?.into(),
        CpuStorage::F16(x) => ArrayView2::from_shape((r, c), slice(x, l, what)?).map_err(view)?.into(),
        CpuStorage::BF16(x) => ArrayView2::from_shape((r, c), slice(x, l, what)?).map_err(view)?.into(),
        other => {
            return Err(err(XentError::InvalidOption(format!(
                "{what} must be f32, f16 or bf16, got {:?}",
                other.dtype()
            ))))
        }
    })
}

/// The bias `[V]` widened to f32 (xent takes an f32 bias).
pub(crate) fn bias_f32(s: &CpuStorage, l: &Layout) -> candle_core::Result<Vec<f32>> {
    if l.shape().rank() != 1 {
        return Err(err(XentError::Shape(format!("bias must be a vector [V], got shape {:?}", l.shape().dims()))));
    }
    Ok(match s {
        CpuStorage::F32(x) => slice(x, l, "bias")?.to_vec(),
        CpuStorage::F16(x) => slice(x, l, "bias")?.iter().map(|v| v.to_f32()).collect(),
        CpuStorage::BF16(x) => slice(x, l, "bias")?.iter().map(|v| v.to_f32()).collect(),
        CpuStorage::F64(x) => slice(x, l, "bias")?.iter().map(|&v| v as f32).collect(),
        other => {
            return Err(err(XentError::InvalidOption(format!(
                "bias must be f32, f64, f16 or bf16, got {:?}",
                other.dtype()
            ))))
        }
    })
}

/// f32 values as Candle storage of `dtype` (the loss in the hidden states' dtype).
pub(crate) fn storage_in(values: Vec<f32>, dtype: xent::DType) -> CpuStorage {
    match dtype {
        xent::DType::F32 => CpuStorage::F32(values),
        xent::DType::F16 => CpuStorage::F16(values.into_iter().map(f16::from_f32).collect()),
        xent::DType::BF16 => CpuStorage::BF16(values.into_iter().map(bf16::from_f32).collect()),
    }
}

/// An owned ndarray matrix as a Candle tensor (no copy for the standard layout xent returns).
fn array_tensor<T: WithDType>(a: Array2<T>) -> candle_core::Result<Tensor> {
    let dim = a.dim();
    let a = if a.is_standard_layout() { a } else { a.as_standard_layout().into_owned() };
    let (v, off) = a.into_raw_vec_and_offset();
    debug_assert!(off.is_none_or(|o| o == 0));
    Tensor::from_vec(v, dim, &Device::Cpu)
}

pub(crate) fn tensor2(t: Tensor2) -> candle_core::Result<Tensor> {
    match t {
        Tensor2::F32(a) => array_tensor(a),
        Tensor2::F16(a) => array_tensor(a),
        Tensor2::BF16(a) => array_tensor(a),
    }
}

impl Grads {
    fn of(out: &mut LinearCeOutput) -> candle_core::Result<Grads> {
        Ok(Grads {
            hidden: out.grad_hidden.take().map(tensor2).transpose()?,
            weight: out.grad_weight.take().map(tensor2).transpose()?,
            bias: out.grad_bias.take().map(|b| Tensor::from_vec(b.to_vec(), b.len(), &Device::Cpu)).transpose()?,
        })
    }
}

/// Runs `f` on the CPU storage of `t`.
pub(crate) fn with_cpu<R>(
    t: &Tensor,
    f: impl FnOnce(&CpuStorage, &Layout) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(c, l),
        _ => Err(err(XentError::InvalidOption("xent-candle runs on Candle's CPU device".into()))),
    }
}

impl LinearOp {
    /// xent's fused pass over the given storages with options `cfg` and targets `targets`.
    fn run(
        &self,
        h: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
        targets: &[i64],
        cfg: &LinearCe,
        upstream: Option<&[f32]>,
    ) -> candle_core::Result<(LinearCeOutput, xent::DType)> {
        let hidden = matrix(h.0, h.1, "hidden")?;
        let weight = matrix(w.0, w.1, "weight")?;
        let bias = b.map(|(s, l)| bias_f32(s, l)).transpose()?;
        let dtype = hidden.dtype();
        let (bias, t) = (bias.as_deref().map(ArrayView1::from), Targets::I64(ArrayView1::from(targets)));
        let out = match upstream {
            Some(u) => self.cpu.linear_cross_entropy_with_upstream(hidden, weight, bias, t, ArrayView1::from(u), cfg),
            None => self.cpu.linear_cross_entropy(hidden, weight, bias, t, cfg),
        };
        Ok((out.map_err(err)?, dtype))
    }

    /// The same pass on the op's argument tensors (backward).
    fn run_tensors(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        targets: &[i64],
        cfg: &LinearCe,
        upstream: Option<&[f32]>,
    ) -> candle_core::Result<LinearCeOutput> {
        with_cpu(hidden, |hs, hl| {
            with_cpu(weight, |ws, wl| match bias {
                Some(bias) => {
                    with_cpu(bias, |bs, bl| Ok(self.run((hs, hl), (ws, wl), Some((bs, bl)), targets, cfg, upstream)?.0))
                }
                None => Ok(self.run((hs, hl), (ws, wl), None, targets, cfg, upstream)?.0),
            })
        })
    }

    fn fwd(
        &self,
        h: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let none = self.cfg.ce.reduction == Reduction::None;
        let mut cfg = self.cfg.clone();
        if none {
            // Per-row losses only: backward runs its own weighted pass.
            (cfg.grad_hidden, cfg.grad_weight, cfg.grad_bias) = (false, false, false);
        }
        let (mut out, dtype) = self.run(h, w, b, &self.targets, &cfg, None)?;
        if none {
            let rows = out.row_loss.take().expect("per-row losses for reduction none");
            let n = rows.len();
            return Ok((storage_in(rows.to_vec(), dtype), Shape::from(n)));
        }
        let grads = Grads::of(&mut out)?;
        if grads.hidden.is_some() || grads.weight.is_some() || grads.bias.is_some() {
            *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(grads);
        }
        Ok((storage_in(vec![out.loss as f32], dtype), Shape::from(())))
    }

    /// Gradients w.r.t. hidden, weight and bias (in their dtypes) for the upstream `grad_res`.
    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grads = if self.cfg.ce.reduction == Reduction::None {
            let g: Vec<f32> = grad_res.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            self.weighted_backward(hidden, weight, bias, &g)?
        } else {
            let cached = self.cache.lock().unwrap_or_else(|e| e.into_inner()).take();
            let grads = match cached {
                Some(g) => g,
                // A second backward (or one after the cache was taken): the pass again.
                None => Grads::of(&mut self.run_tensors(hidden, weight, bias, &self.targets, &self.cfg, None)?)?,
            };
            // `loss.backward()` on the loss itself: the upstream gradient is 1 and the fused
            // gradients are the answer. The scalar is on the CPU: no sync.
            let up = grad_res.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            let scale =
                |t: Option<Tensor>| t.map(|t| if up == 1.0 { Ok(t) } else { t.affine(up as f64, 0.0) }).transpose();
            Grads { hidden: scale(grads.hidden)?, weight: scale(grads.weight)?, bias: scale(grads.bias)? }
        };
        let cast = |g: Option<Tensor>, like: Option<&Tensor>| match (g, like) {
            (Some(g), Some(like)) => g.to_dtype(like.dtype()).map(Some),
            _ => Ok(None),
        };
        Ok((cast(grads.hidden, Some(hidden))?, cast(grads.weight, Some(weight))?, cast(grads.bias, bias)?))
    }

    /// Backward of `reduction = none`: the gradient of `sum_n g_n loss_n` for the upstream
    /// per-row gradient `g`, as PyTorch's backward through `reduction='none'` computes it.
    ///
    /// One pass of xent's `linear_cross_entropy_with_upstream` (every option, the z-loss
    /// included, which folding `g` into the sample weights would miss).
    fn weighted_backward(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        g: &[f32],
    ) -> candle_core::Result<Grads> {
        let ce = &self.cfg.ce;
        let n = self.targets.len();
        if g.len() != n {
            return Err(err(XentError::Shape(format!(
                "the upstream gradient of the per-row losses has {} entries for {n} rows",
                g.len()
            ))));
        }
        let counted = |r: &usize| self.targets[*r] != ce.ignore_index;
        if let Some(r) = (0..n).filter(counted).find(|&r| !g[r].is_finite()) {
            return Err(err(XentError::InvalidValue {
                input: "the upstream gradient of the per-row losses".into(),
                domain: "finite".into(),
                value: g[r] as f64,
                index: vec![r],
            }));
        }
        // One pass with the per-row upstream (ignored rows' entries, which may be anything, as 0).
        let mut cfg = self.cfg.clone();
        cfg.ce.outputs = Default::default();
        let u: Vec<f32> = (0..n).map(|r| if counted(&r) { g[r] } else { 0.0 }).collect();
        Grads::of(&mut self.run_tensors(hidden, weight, bias, &self.targets, &cfg, Some(&u))?)
    }
}

/// `CustomOp2` (hidden, weight) and `CustomOp3` (hidden, weight, bias) for an op type with
/// inherent `fwd(h, w, Option<b>)` and `bwd(hidden, weight, Option<&bias>, grad)`: the one
/// forward and backward of the fused linear ops, with and without a bias.
macro_rules! linear_custom_ops {
    ($op:ty, $name:literal) => {
        impl candle_core::CustomOp2 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                s1: &candle_core::CpuStorage,
                l1: &candle_core::Layout,
                s2: &candle_core::CpuStorage,
                l2: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                self.fwd((s1, l1), (s2, l2), None)
            }

            fn bwd(
                &self,
                hidden: &candle_core::Tensor,
                weight: &candle_core::Tensor,
                _res: &candle_core::Tensor,
                grad_res: &candle_core::Tensor,
            ) -> candle_core::Result<(Option<candle_core::Tensor>, Option<candle_core::Tensor>)> {
                let (h, w, _) = <$op>::bwd(self, hidden, weight, None, grad_res)?;
                Ok((h, w))
            }
        }

        impl candle_core::CustomOp3 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                s1: &candle_core::CpuStorage,
                l1: &candle_core::Layout,
                s2: &candle_core::CpuStorage,
                l2: &candle_core::Layout,
                s3: &candle_core::CpuStorage,
                l3: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                self.fwd((s1, l1), (s2, l2), Some((s3, l3)))
            }

            #[allow(clippy::type_complexity)]
            fn bwd(
                &self,
                hidden: &candle_core::Tensor,
                weight: &candle_core::Tensor,
                bias: &candle_core::Tensor,
                _res: &candle_core::Tensor,
                grad_res: &candle_core::Tensor,
            ) -> candle_core::Result<(
                Option<candle_core::Tensor>,
                Option<candle_core::Tensor>,
                Option<candle_core::Tensor>,
            )> {
                <$op>::bwd(self, hidden, weight, Some(bias), grad_res)
            }
        }
    };
}
pub(crate) use linear_custom_ops;

linear_custom_ops!(LinearOp, "xent-linear-cross-entropy");

/// Class indices `[N]` of any integer dtype as i64 (`what`: the loss, for the error).
pub(crate) fn class_indices(targets: &Tensor, what: &str) -> candle_core::Result<Vec<i64>> {
    if targets.rank() != 1 {
        return Err(err(XentError::Shape(format!("targets must be a vector [N], got shape {:?}", targets.dims()))));
    }
    match targets.dtype() {
        DType::I64 => targets.to_vec1::<i64>(),
        DType::U32 => Ok(targets.to_vec1::<u32>()?.into_iter().map(i64::from).collect()),
        DType::I32 => Ok(targets.to_vec1::<i32>()?.into_iter().map(i64::from).collect()),
        DType::I16 => Ok(targets.to_vec1::<i16>()?.into_iter().map(i64::from).collect()),
        DType::U8 => Ok(targets.to_vec1::<u8>()?.into_iter().map(i64::from).collect()),
        other => {
            Err(err(XentError::InvalidOption(format!("{what} takes integer class indices as targets, got {other:?}"))))
        }
    }
}

/// Fused linear cross-entropy: the loss of `cross_entropy(hidden @ weight.T + bias, targets)`
/// (PyTorch's semantics and every [`LinearCe`] option: `ignore_index`, class and sample
/// weights, label smoothing, z-loss, softcap, temperature, reduction), differentiable w.r.t.
/// `hidden`, `weight` and `bias`, without the `[N, V]` logits or their gradient: xent's CPU
/// pass holds one chunk of logits at a time ([`LinearCe::workspace_bytes`]).
///
/// - `hidden`: `[N, D]`, f32, f16 or bf16; `weight`: `[V, D]` (the layout of
///   `candle_nn::Linear`'s weight), the same dtype; `bias`: `[V]`, any float dtype;
///   `targets`: `[N]` class indices (u8, u32, i16, i32 or i64; rows equal to
///   `cfg.ce.ignore_index` add nothing). All on Candle's CPU device; non-contiguous inputs are
///   made contiguous first.
/// - Returns the loss in `hidden`'s dtype, as `candle_nn::loss::cross_entropy` does for the
///   logits it replaces (so it adds to other losses of the model without a cast): a scalar
///   for `Mean` and `Sum`, the per-row losses `[N]` for `None`. The arithmetic is f32 (the
///   products, the softmax and the gradients); for f16 and bf16 inputs only the returned loss
///   is rounded to that dtype (call it with f32 tensors for a full-precision loss value).
///
/// **Backward, `Mean` and `Sum`.** The forward pass computes the loss and its gradients
/// w.r.t. the inputs Candle tracks (a `Var` or a tensor computed from one) in one fused pass,
/// as Liger-Kernel does, and keeps them in the op until backward, which only multiplies them by
/// the upstream gradient (not at all when it is 1, as in `loss.backward()`). The forward
/// therefore holds `[N, D] + [V, D] (+ [V])` f32 gradients (the inputs' dtype with
/// `cfg.grads_in_input_dtype`) from the forward until backward or until the loss tensor is
/// dropped, instead of the `2 x [N, V]` a logits-level loss holds. Inputs Candle does not
/// track get no gradient computed; `cfg.grad_hidden`/`grad_weight`/`grad_bias = false`
/// leave that gradient out (a frozen input). A second backward through the same loss finds the
/// cache empty and runs the pass again.
///
/// **Backward, `None`.** The forward computes the per-row losses alone. Backward receives
/// the upstream gradient `g [N]` of the per-row losses and returns the gradient of
/// `sum_n g_n loss_n`, as PyTorch's backward through `reduction='none'` does: one pass with
/// `g` as xent's per-row upstream gradient. A non-finite `g_n` on a counted row is an error.
///
/// Errors are `candle_core::Error`s holding a typed [`XentError`]: [`crate::xent_error`]
/// returns it.
///
/// ```
/// use candle_core::{DType, Device, Tensor, Var};
/// use xent::LinearCe;
///
/// let dev = Device::Cpu;
/// let hidden = Var::randn(0f32, 1.0, (4, 8), &dev)?; // [N, D]
/// let weight = Var::randn(0f32, 0.3, (100, 8), &dev)?; // [V, D]
/// let bias = Var::zeros(100, DType::F32, &dev)?;
/// let targets = Tensor::new(&[3i64, 99, -100, 0], &dev)?; // row 2 is ignored
/// let mut cfg = LinearCe::default();
/// cfg.ce.label_smoothing = 0.1;
/// let loss = xent_candle::linear_cross_entropy(&hidden, &weight, Some(&bias), &targets, &cfg)?;
/// let grads = loss.backward()?;
/// assert_eq!(grads.get(&weight).expect("d loss / d weight").dims(), &[100, 8]);
/// assert_eq!(grads.get(&bias).expect("d loss / d bias").dims(), &[100]);
/// // The ignored row has no gradient.
/// let gh = grads.get(&hidden).expect("d loss / d hidden").to_vec2::<f32>()?;
/// assert!(gh[2].iter().all(|&g| g == 0.0));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &Tensor,
    cfg: &LinearCe,
) -> candle_core::Result<Tensor> {
    if ![Some(hidden), Some(weight), bias, Some(targets)].into_iter().flatten().all(|t| t.device().is_cpu()) {
        return Err(err(XentError::InvalidOption("xent-candle runs on Candle's CPU device".into())));
    }
    let targets = class_indices(targets, "the fused linear cross-entropy")?;
    let mut cfg = cfg.clone();
    // Gradients only for what Candle's backward will ask for.
    cfg.grad_hidden &= hidden.track_op();
    cfg.grad_weight &= weight.track_op();
    cfg.grad_bias &= bias.is_some_and(|b| b.track_op());
    let op = LinearOp { cfg, targets, cpu: cpu(), cache: Mutex::new(None) };
    apply_linear(hidden, weight, bias, op)
}

/// Applies a fused linear op to contiguous hidden and weight, and the bias when there is one
/// (its `CustomOp3` form; `CustomOp2` without).
pub(crate) fn apply_linear<O>(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    op: O,
) -> candle_core::Result<Tensor>
where
    O: candle_core::CustomOp2 + candle_core::CustomOp3 + Send + Sync + 'static,
{
    let (hidden, weight) = (hidden.contiguous()?, weight.contiguous()?);
    match bias {
        Some(b) => hidden.apply_op3(&weight, &b.contiguous()?, op),
        None => hidden.apply_op2(&weight, op),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grads_are_not_computed_for_untracked_inputs() {
        let dev = Device::Cpu;
        let h = Tensor::ones((3, 4), DType::F32, &dev).unwrap();
        let w = Tensor::ones((5, 4), DType::F32, &dev).unwrap();
        let t = Tensor::new(&[0u32, 1, 2], &dev).unwrap();
        let loss = linear_cross_entropy(&h, &w, None, &t, &LinearCe::default()).unwrap();
        // Uniform logits: log 5 per row.
        assert!((loss.to_scalar::<f32>().unwrap() - 5f32.ln()).abs() < 1e-6);
        assert!(!loss.track_op());
    }

    #[test]
    fn matrix_rejects_other_dtypes() {
        let s = CpuStorage::F64(vec![0.0; 4]);
        let l = Layout::contiguous((2, 2));
        let Err(e) = matrix(&s, &l, "hidden") else { panic!("f64 hidden states accepted") };
        assert!(matches!(crate::xent_error(&e), Some(XentError::InvalidOption(_))));
    }
}
