//! Per-row log-probabilities and entropies from hidden states as a Candle op (RL scoring):
//! `log_softmax(z)[y]` and `H(softmax(z))` for `z = (hidden @ weight.T + bias) / T`, without
//! the `[N, V]` logits, differentiable through both outputs at once.
//!
//! Candle's `CustomOp2`/`CustomOp3` returns one tensor and its backward receives one upstream
//! gradient, so the op returns the two results stacked as `[2, N]` (row 0 the log-probs, row 1
//! the entropies) and [`linear_logprobs`] hands out its two rows (`Tensor::get`, a narrow).
//! Candle's autograd sums the gradients reaching either row into the op's `[2, N]` upstream
//! gradient, whose rows are exactly the `(a, b)` of `sum_n a_n logp_n + b_n H_n` that
//! [`xent::Cpu::linear_logprobs`] takes: backward is one call of it.

use std::sync::Arc;

use candle_core::{CpuStorage, DType, Device, Layout, Shape, Tensor};
use ndarray::ArrayView1;
use xent::{Cpu, LinearLogprobs, LinearLogprobsOutput, Targets, XentError};

use crate::linear::{bias_f32, class_indices, matrix, storage_in, tensor2, with_cpu};
use crate::{cpu, err};

/// The op: options (gradient flags narrowed to the inputs Candle tracks) and the targets as i64.
struct LogprobsOp {
    cfg: LinearLogprobs,
    targets: Vec<i64>,
    cpu: Arc<Cpu>,
}

impl LogprobsOp {
    /// xent's pass over the given storages, with the upstream gradient `(a, b)` in backward.
    fn run(
        &self,
        h: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
        upstream: Option<(&[f32], &[f32])>,
    ) -> candle_core::Result<(LinearLogprobsOutput, xent::DType)> {
        let hidden = matrix(h.0, h.1, "hidden")?;
        let weight = matrix(w.0, w.1, "weight")?;
        let bias = b.map(|(s, l)| bias_f32(s, l)).transpose()?;
        let dtype = hidden.dtype();
        let out = self
            .cpu
            .linear_logprobs(
                hidden,
                weight,
                bias.as_deref().map(ArrayView1::from),
                Targets::I64(ArrayView1::from(&self.targets[..])),
                &self.cfg,
                upstream.map(|(a, b)| (ArrayView1::from(a), ArrayView1::from(b))),
            )
            .map_err(err)?;
        Ok((out, dtype))
    }

    /// The forward: log-probs and entropies (no gradients), stacked `[2, N]` in `hidden`'s dtype.
    fn fwd(
        &self,
        h: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (out, dtype) = self.run(h, w, b, None)?;
        let n = out.logprob.len();
        let mut both = Vec::with_capacity(2 * n);
        both.extend(out.logprob.iter());
        both.extend(out.entropy.iter());
        Ok((storage_in(both, dtype), Shape::from((2, n))))
    }

    /// Gradients of `sum_n a_n logp_n + b_n H_n` w.r.t. hidden, weight and bias (in their
    /// dtypes), `[a; b]` being the upstream gradient `[2, N]` of the stacked output.
    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = self.targets.len();
        if grad_res.dims() != [2, n] {
            return Err(err(XentError::Shape(format!(
                "the upstream gradient of the stacked log-probs and entropies is {:?}, not [2, {n}]",
                grad_res.dims()
            ))));
        }
        let up: Vec<f32> = grad_res.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let (a, b) = up.split_at(n);
        let mut out = with_cpu(hidden, |hs, hl| {
            with_cpu(weight, |ws, wl| match bias {
                Some(bias) => {
                    with_cpu(bias, |bs, bl| Ok(self.run((hs, hl), (ws, wl), Some((bs, bl)), Some((a, b)))?.0))
                }
                None => Ok(self.run((hs, hl), (ws, wl), None, Some((a, b)))?.0),
            })
        })?;
        let gh = out.grad_hidden.take().map(tensor2).transpose()?;
        let gw = out.grad_weight.take().map(tensor2).transpose()?;
        let gb = out.grad_bias.take().map(|g| Tensor::from_vec(g.to_vec(), g.len(), &Device::Cpu)).transpose()?;
        let cast = |g: Option<Tensor>, like: Option<&Tensor>| match (g, like) {
            (Some(g), Some(like)) => g.to_dtype(like.dtype()).map(Some),
            _ => Ok(None),
        };
        Ok((cast(gh, Some(hidden))?, cast(gw, Some(weight))?, cast(gb, bias)?))
    }
}

crate::linear::linear_custom_ops!(LogprobsOp, "xent-linear-logprobs");

/// Per-row log-probabilities of the targets and entropies of
/// `softmax((hidden @ weight.T + bias) / cfg.temperature)`, as two differentiable `[N]`
/// tensors `(logprobs, entropy)`, without the `[N, V]` logits (xent's CPU pass holds one chunk
/// of them at a time, [`LinearLogprobs::workspace_bytes`]). For RL post-training (PPO, GRPO):
/// the log-probs of the chosen tokens and an entropy bonus, from the policy's last hidden states
/// and unembedding matrix.
///
/// - `hidden`: `[N, D]`, f32, f16 or bf16; `weight`: `[V, D]` (the layout of
///   `candle_nn::Linear`'s weight), the same dtype; `bias`: `[V]`, any float dtype;
///   `targets`: `[N]` class indices (u8, u32, i16, i32 or i64). Rows whose target is
///   `cfg.ignore_index` give log-prob 0 and entropy 0 and get no gradient. All on Candle's
///   CPU device; non-contiguous inputs are made contiguous first.
/// - Both outputs come back in `hidden`'s dtype, as [`crate::linear_cross_entropy`] returns its
///   loss and as Candle's own `log_softmax` of bf16/f16 logits would: they combine with the
///   model's other terms without a cast. The arithmetic is f32 (products, softmax, entropy,
///   gradients); for f16 and bf16 inputs only the returned values are rounded to that dtype
///   (give f32 inputs for full-precision log-probs). They are the two rows of one `[2, N]`
///   tensor (row 0 log-probs, row 1 entropies), each contiguous.
///
/// **Backward.** The forward computes the values only. Candle's autograd gathers the upstream
/// gradients `a = dL/d logp` and `b = dL/d H` of whatever loss `L` uses either output (zeros
/// for an output `L` does not use) into the op's `[2, N]` upstream gradient, and backward makes
/// one call of [`xent::Cpu::linear_logprobs`] with the upstream `(a, b)`: the gradients of
/// `sum_n a_n logp_n + b_n H_n` w.r.t. hidden, weight and bias in one fused pass (the logits
/// recomputed chunk by chunk, nothing `[N, V]` kept). Gradients come back in each input's
/// dtype; only the inputs Candle tracks (a `Var` or a tensor computed from one) get one
/// computed, and `cfg.grad_hidden`/`grad_weight`/`grad_bias = false` leave one out (a frozen
/// input). A non-finite upstream entry is an error (`XentError::InvalidValue`).
///
/// Errors are `candle_core::Error`s holding a typed [`XentError`]: [`crate::xent_error`]
/// returns it.
///
/// ```
/// use candle_core::{DType, Device, Tensor, Var};
/// use xent::LinearLogprobs;
///
/// let dev = Device::Cpu;
/// let hidden = Var::randn(0f32, 1.0, (4, 8), &dev)?; // [N, D]
/// let weight = Var::randn(0f32, 0.3, (100, 8), &dev)?; // [V, D]
/// let bias = Var::zeros(100, DType::F32, &dev)?;
/// let tokens = Tensor::new(&[3i64, 99, -100, 0], &dev)?; // row 2 is padding
/// let cfg = LinearLogprobs::default().with_temperature(0.7);
/// let (logp, entropy) = xent_candle::linear_logprobs(&hidden, &weight, Some(&bias), &tokens, &cfg)?;
/// assert_eq!((logp.dims(), entropy.dims()), (&[4][..], &[4][..]));
/// assert_eq!(logp.to_vec1::<f32>()?[2], 0.0);
/// // A policy-gradient loss with an entropy bonus: -(adv * logp) - 0.01 H, summed.
/// let adv = Tensor::new(&[0.5f32, -1.0, 0.0, 2.0], &dev)?;
/// let loss = ((logp * &adv)?.neg()? - (entropy * 0.01)?)?.sum_all()?;
/// let grads = loss.backward()?;
/// assert_eq!(grads.get(&weight).expect("d loss / d weight").dims(), &[100, 8]);
/// assert_eq!(grads.get(&bias).expect("d loss / d bias").dims(), &[100]);
/// // The padding row has no gradient.
/// let gh = grads.get(&hidden).expect("d loss / d hidden").to_vec2::<f32>()?;
/// assert!(gh[2].iter().all(|&g| g == 0.0));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn linear_logprobs(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &Tensor,
    cfg: &LinearLogprobs,
) -> candle_core::Result<(Tensor, Tensor)> {
    if ![Some(hidden), Some(weight), bias, Some(targets)].into_iter().flatten().all(|t| t.device().is_cpu()) {
        return Err(err(XentError::InvalidOption("xent-candle runs on Candle's CPU device".into())));
    }
    let targets = class_indices(targets, "linear_logprobs")?;
    // Gradients only for what Candle's backward will ask for.
    let cfg = cfg
        .clone()
        .with_grad_hidden(cfg.grad_hidden && hidden.track_op())
        .with_grad_weight(cfg.grad_weight && weight.track_op())
        .with_grad_bias(cfg.grad_bias && bias.is_some_and(|b| b.track_op()));
    let op = LogprobsOp { cfg, targets, cpu: cpu() };
    let both = crate::linear::apply_linear(hidden, weight, bias, op)?;
    Ok((both.get(0)?, both.get(1)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untracked_inputs_give_values_without_an_op_to_differentiate() {
        let dev = Device::Cpu;
        let h = Tensor::ones((3, 4), DType::F32, &dev).unwrap();
        let w = Tensor::ones((5, 4), DType::F32, &dev).unwrap();
        let t = Tensor::new(&[0u32, 1, 2], &dev).unwrap();
        let (lp, ent) = linear_logprobs(&h, &w, None, &t, &LinearLogprobs::default()).unwrap();
        // Uniform logits: log-prob -log 5 and entropy log 5 per row.
        for (x, want) in [(&lp, -(5f32.ln())), (&ent, 5f32.ln())] {
            assert!(x.to_vec1::<f32>().unwrap().iter().all(|&v| (v - want).abs() < 1e-6));
            assert!(!x.track_op());
        }
    }
}
