//! Per-row log-probabilities of the targets and softmax entropies straight from hidden states
//! (RL scoring: PPO/GRPO), as one differentiable Burn function over xent's
//! [`LinearLogprobs`]: `logp_n = log softmax(z_n)[y_n]` and `H_n = -sum_c p_nc log p_nc` for
//! `z = (hidden @ weight^T + bias) / temperature`, the `[N, V]` logits existing one row chunk
//! at a time inside xent.
//!
//! **Two outputs, one autodiff node.** A Burn backward step has one output node, so the op
//! produces one `[2, N]` f32 tensor (row 0 the log-probs, row 1 the entropies) and
//! [`linear_logprobs`] hands back its two rows as `[N]` tensors (Burn's `slice` + `reshape`).
//! Burn's autodiff sums the gradients of both slices into the `[2, N]` upstream gradient of the
//! node, row 0 `a = d loss / d logp` and row 1 `b = d loss / d H` (zeros for an output the loss
//! does not use). The backward step passes `(a, b)` to xent's `Cpu::linear_logprobs` as its
//! upstream gradient: one fused pass that returns the gradients of `sum_n a_n logp_n + b_n H_n`
//! w.r.t. hidden, weight and bias (those the graph tracks), with no Burn ops on `[N, V]`. The
//! forward pass keeps its inputs (no `[N, V]` state); the backward pass computes the logits'
//! row chunks again inside xent, since the upstream values are unknown before it.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{backend_extension, AutodiffBackend, Backend, Dispatch, Flex};
use burn::prelude::*;
use burn_flex::FlexTensor;
use ndarray::ArrayView1;
use xent::{LinearCe, LinearLogprobs, XentError};

use crate::linear::{check_operands, check_targets, f32_tensor, f32_values, targets_view, view, FlexOperands};
use crate::ops::{cpu, record_error};

/// The options of one linear log-prob call, as the backend extension carries them (cheap to
/// clone).
#[derive(Debug, Clone)]
pub struct XentLogprobsArgs {
    cfg: Arc<LinearLogprobs>,
}

impl XentLogprobsArgs {
    /// Wraps `cfg`.
    pub fn new(cfg: &LinearLogprobs) -> XentLogprobsArgs {
        XentLogprobsArgs { cfg: Arc::new(cfg.clone()) }
    }

    /// The options.
    pub fn cfg(&self) -> &LinearLogprobs {
        &self.cfg
    }
}

/// xent's linear log-probs and entropies as a Burn backend extension: on Flex (Burn's CPU
/// backend) xent's own CPU kernel; on Burn's wgpu backends (cube and fusion) the default
/// methods, composed per row chunk from the backend's own products and element-wise ops (see
/// [`linear_logprobs`]); and under autodiff. [`linear_logprobs`] is the way to call it; the trait
/// is public so that other backends can implement it (or take the defaults).
#[backend_extension(Cube: cfg(feature = "gpu"), Fusion: cfg(feature = "gpu"), Flex, Autodiff)]
pub trait XentLogprobsOps: Backend {
    /// Per-row log-probs (row 0) and entropies (row 1) of `softmax((hidden [N, D] @ weight
    /// [V, D]^T + bias [V]) / temperature)` for class indices `targets [N]`: one `[2, N]` f32
    /// tensor; 0 in both rows for an ignored row. Differentiable under autodiff w.r.t. hidden,
    /// weight and bias. No bias: a bias of no elements (`[0]`).
    #[fusion(default)]
    fn xent_linear_logprobs(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        targets: IntTensor<Self>,
        args: XentLogprobsArgs,
    ) -> FloatTensor<Self> {
        crate::compose::linear_logprobs::<Self>(hidden, weight, bias, targets, None, args.cfg()).0
    }

    /// The `[2, N]` values (as [`Self::xent_linear_logprobs`]) and, for the upstream gradient
    /// `upstream [2, N]` (row 0 `a`, row 1 `b`), the gradients of `sum_n a_n logp_n + b_n H_n`
    /// w.r.t. hidden, weight and bias that the options ask for (`grad_hidden`, `grad_weight`,
    /// `grad_bias`; in the inputs' dtype), in one fused pass. Not differentiable.
    #[allow(clippy::type_complexity)]
    #[fusion(default)]
    fn xent_linear_logprobs_with_grads(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        targets: IntTensor<Self>,
        upstream: FloatTensor<Self>,
        args: XentLogprobsArgs,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>, Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) {
        crate::compose::linear_logprobs::<Self>(hidden, weight, bias, targets, Some(upstream), args.cfg())
    }
}

// ---------------------------------------------------------------------------------------------
// Flex

type Out<T> = (T, Option<T>, Option<T>, Option<T>);

/// xent's `Cpu::linear_logprobs` on Flex storage: the `[2, N]` values and, with an upstream
/// `[2, N]`, the gradients the options ask for. An error (a call through the trait that skipped
/// the checks, out of memory) leaves NaN outputs and waits in [`crate::take_error`].
fn flex_run(
    hidden: FlexTensor,
    weight: FlexTensor,
    bias: FlexTensor,
    targets: FlexTensor,
    upstream: Option<FlexTensor>,
    args: &XentLogprobsArgs,
) -> Out<FlexTensor> {
    let ops = FlexOperands::new(hidden, weight, bias, targets);
    let n = ops.n;
    let mut t64 = Vec::new();
    let t = targets_view(&ops.targets, &mut t64);
    let mut cfg = args.cfg().clone();
    cfg.grads_in_input_dtype = true;
    // Row 0 of the upstream gradient is `a`, row 1 `b` (a wrong length is xent's Shape error).
    let up = upstream.map(f32_values);
    let up = up.as_deref().map(|u| u.split_at(n.min(u.len())));
    let with_grads = up.is_some();
    let res = cpu().linear_logprobs(
        view(&ops.hidden),
        view(&ops.weight),
        ops.bias_view(),
        t,
        &cfg,
        up.map(|(a, b)| (ArrayView1::from(a), ArrayView1::from(b))),
    );
    match res {
        Ok(out) => {
            let mut values = out.logprob.to_vec();
            values.extend(out.entropy.iter());
            let (gh, gw, gb) = ops.grads(out.grad_hidden, out.grad_weight, out.grad_bias);
            (f32_tensor(values, Shape::new([2, n])), gh, gw, gb)
        }
        Err(e) => {
            record_error(e);
            let (gh, gw, gb) = ops.nan_grads(
                with_grads && cfg.grad_hidden,
                with_grads && cfg.grad_weight,
                with_grads && cfg.grad_bias,
            );
            (f32_tensor(vec![f32::NAN; 2 * n], Shape::new([2, n])), gh, gw, gb)
        }
    }
}

impl XentLogprobsOps for Flex {
    fn xent_linear_logprobs(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        targets: IntTensor<Self>,
        args: XentLogprobsArgs,
    ) -> FloatTensor<Self> {
        flex_run(hidden, weight, bias, targets, None, &args).0
    }

    fn xent_linear_logprobs_with_grads(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        targets: IntTensor<Self>,
        upstream: FloatTensor<Self>,
        args: XentLogprobsArgs,
    ) -> Out<FloatTensor<Self>> {
        flex_run(hidden, weight, bias, targets, Some(upstream), &args)
    }
}

// ---------------------------------------------------------------------------------------------
// Autodiff

/// The backward step; its parents are hidden, weight and bias (a bias of no elements, never
/// tracked, when there is none); its state the inner backend's inputs.
#[derive(Debug)]
struct LogprobsBackward {
    args: XentLogprobsArgs,
}

impl<B: XentLogprobsOps> Backward<B, 3> for LogprobsBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, IntTensor<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [ph, pw, pb] = ops.parents;
        // `[2, N]`: d loss / d logp in row 0, d loss / d H in row 1.
        let upstream = grads.consume::<B>(&ops.node);
        let (h, w, b, t) = ops.state;
        // The gradients the graph tracks, and only those.
        let mut cfg = self.args.cfg().clone();
        cfg.grad_hidden = ph.is_some();
        cfg.grad_weight = pw.is_some();
        cfg.grad_bias = pb.is_some();
        let (_, gh, gw, gb) = B::xent_linear_logprobs_with_grads(h, w, b, t, upstream, XentLogprobsArgs::new(&cfg));
        for (parent, g) in [(ph, gh), (pw, gw), (pb, gb)] {
            if let (Some(node), Some(g)) = (parent, g) {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

impl<B: XentLogprobsOps, C: CheckpointStrategy> XentLogprobsOps for Autodiff<B, C> {
    fn xent_linear_logprobs(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        targets: IntTensor<Self>,
        args: XentLogprobsArgs,
    ) -> FloatTensor<Self> {
        let (h, nh) = hidden.into_parts();
        let (w, nw) = weight.into_parts();
        let (b, nb) = bias.into_parts();
        let op = LogprobsBackward { args: args.clone() };
        match op.prepare::<C>([nh, nw, nb]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                // The upstream values come in the backward pass: keep the inputs (no [N, V]).
                let out = B::xent_linear_logprobs(h.clone(), w.clone(), b.clone(), targets.clone(), args);
                prep.finish((h, w, b, targets), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::xent_linear_logprobs(h, w, b, targets, args)),
        }
    }

    fn xent_linear_logprobs_with_grads(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        targets: IntTensor<Self>,
        upstream: FloatTensor<Self>,
        args: XentLogprobsArgs,
    ) -> Out<FloatTensor<Self>> {
        let (out, gh, gw, gb) = B::xent_linear_logprobs_with_grads(
            Self::inner(hidden),
            Self::inner(weight),
            Self::inner(bias),
            targets,
            Self::inner(upstream),
            args,
        );
        (Self::from_inner(out), gh.map(Self::from_inner), gw.map(Self::from_inner), gb.map(Self::from_inner))
    }
}

// ---------------------------------------------------------------------------------------------
// The public functions

/// Checks everything that is known before the call; targets are read (CPU device). Returns N.
fn check(
    hidden: &Tensor<2>,
    weight: &Tensor<2>,
    bias: Option<&Tensor<1>>,
    targets: &Tensor<1, Int>,
    cfg: &LinearLogprobs,
) -> Result<usize, XentError> {
    let mut lc = LinearCe::default();
    lc.workspace_bytes = cfg.workspace_bytes;
    let (n, _, v) = check_operands(hidden, weight, bias, targets, &lc)?;
    if !(cfg.temperature > 0.0 && cfg.temperature.is_finite()) {
        return Err(XentError::InvalidOption(format!("temperature must be > 0, got {}", cfg.temperature)));
    }
    // On Burn's wgpu backends the targets stay on the device (reading them would wait): a
    // target out of range gives NaN in its row there.
    if crate::ops::is_host(&hidden.device()) {
        check_targets(targets, v, cfg.ignore_index)?;
    }
    Ok(n)
}

/// The `[2, N]` result's two rows as `[N]` tensors.
fn split(out: Tensor<2>, n: usize) -> (Tensor<1>, Tensor<1>) {
    // (squeeze_dim, not reshape: Burn's reshape reads a 0 as "keep this axis".)
    let logp = out.clone().slice([0..1, 0..n]).squeeze_dim(0);
    let entropy = out.slice([1..2, 0..n]).squeeze_dim(0);
    (logp, entropy)
}

/// Per-row log-probabilities of the targets and softmax entropies from hidden states: for
/// `z = (hidden @ weight^T + bias) / temperature` (`hidden [N, D]`, `weight [V, D]`, `bias
/// [V]`) and class indices `targets [N]`, returns `(logp, entropy)`, each `[N]` f32:
/// `logp_n = log softmax(z_n)[y_n]` and `entropy_n = -sum_c p_nc log p_nc`, with the options
/// of [`LinearLogprobs`] (temperature, `ignore_index`, workspace bound). Rows whose target is
/// `ignore_index` give 0 in both and no gradient. The `[N, V]` logits never exist: xent's
/// `Cpu::linear_logprobs` computes them one row chunk at a time. Hidden and weight may be f32,
/// f16 or bf16 (one dtype; arithmetic in f32).
///
/// Under autodiff both outputs are differentiable w.r.t. `hidden`, `weight` and `bias`
/// (whichever the graph tracks; gradients in the inputs' dtype, `cfg`'s `grad_*` flags decided
/// by the graph). Internally the op is one `[2, N]` tensor (row 0 the log-probs, row 1 the
/// entropies) whose two rows are returned: Burn's autodiff sums the gradients of both into the
/// op's `[2, N]` upstream gradient, so its backward step receives `(d loss / d logp, d loss /
/// d entropy)` at once and makes one fused xent call with them (no Burn ops on `[N, V]`). The
/// forward pass keeps only its inputs; the backward pass computes the logits' row chunks again
/// inside xent, since the upstream values are unknown before it.
///
/// Backends, plain or under autodiff:
/// - Burn's Flex (CPU) backend: xent's CPU kernel reads Flex's storage in place.
/// - Burn's wgpu backends (feature `gpu`; fusion or plain cube): per row chunk, Burn's own
///   products and element-wise ops (max-subtracted log-softmax in f32, fused by Burn's fusion
///   backend), all on the device (no host transfer, no wait); at least 1024 rows a chunk unless
///   `workspace_bytes` is set. The targets stay on the device: one out of range gives NaN in its
///   row there instead of an error.
///
/// Shapes, dtypes, devices, the temperature, the workspace bound and (on Flex) the targets'
/// range are checked here: bad input is a typed error.
///
/// ```
/// use burn::prelude::*;
/// use xent::LinearLogprobs;
///
/// let device = Device::flex().autodiff();
/// let hidden = Tensor::<2>::from_floats([[0.5, -1.0], [2.0, 0.25], [0.0, 1.0]], &device).require_grad();
/// let weight = Tensor::<2>::from_floats([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]], &device).require_grad();
/// let targets = Tensor::<1, Int>::from_ints([3, -100, 1], &device); // the second row is ignored
/// let cfg = LinearLogprobs::default().with_temperature(0.7);
/// let (logp, entropy) = xent_burn::linear_logprobs(hidden.clone(), weight.clone(), None, targets, &cfg)?;
/// // A policy-gradient-style loss: advantages times log-probs, minus an entropy bonus.
/// let advantages = Tensor::<1>::from_floats([1.5, 0.0, -0.5], &device);
/// let loss = -(logp.clone() * advantages).sum() - entropy.clone().sum() * 0.01;
/// let grads = loss.backward();
/// assert_eq!(hidden.grad(&grads).expect("d hidden").dims(), [3, 2]);
/// assert_eq!(weight.grad(&grads).expect("d weight").dims(), [4, 2]);
/// let (lp, h): (Vec<f32>, Vec<f32>) = (logp.to_data().to_vec().unwrap(), entropy.to_data().to_vec().unwrap());
/// assert!(lp[0] < 0.0 && h[0] > 0.0 && h[0] < 4f32.ln());
/// assert_eq!((lp[1], h[1]), (0.0, 0.0));
/// # Ok::<(), xent::XentError>(())
/// ```
pub fn linear_logprobs(
    hidden: Tensor<2>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    targets: Tensor<1, Int>,
    cfg: &LinearLogprobs,
) -> Result<(Tensor<1>, Tensor<1>), XentError> {
    let n = check(&hidden, &weight, bias.as_ref(), &targets, cfg)?;
    let bias = bias.unwrap_or_else(|| Tensor::empty([0], &hidden.device()));
    let out = Dispatch::xent_linear_logprobs(
        hidden.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        targets.into_dispatch(),
        XentLogprobsArgs::new(cfg),
    );
    Ok(split(Tensor::from_dispatch(out), n))
}

/// The log-probs and entropies (as [`linear_logprobs`]) and, for upstream gradients
/// `upstream = (a, b)` (`[N]` each, finite), the gradients of `sum_n a_n logp_n + b_n H_n`
/// w.r.t. hidden `[N, D]`, weight `[V, D]` and bias `[V]` (when given), in one fused pass
/// outside autodiff: for hand-written backward passes and for measuring. Gradients in the
/// inputs' dtype; those `cfg` turns off are `None`.
#[allow(clippy::type_complexity)]
pub fn linear_logprobs_with_grads(
    hidden: Tensor<2>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    targets: Tensor<1, Int>,
    upstream: (Tensor<1>, Tensor<1>),
    cfg: &LinearLogprobs,
) -> Result<(Tensor<1>, Tensor<1>, Option<Tensor<2>>, Option<Tensor<2>>, Option<Tensor<1>>), XentError> {
    let n = check(&hidden, &weight, bias.as_ref(), &targets, cfg)?;
    let device = hidden.device();
    // The upstream values are read here (N each; a CPU device) to be checked, and go to the op
    // as one `[2, N]` tensor.
    let mut up = Vec::with_capacity(2 * n);
    for (u, name) in [(&upstream.0, "upstream logprob"), (&upstream.1, "upstream entropy")] {
        if u.device() != device {
            return Err(XentError::InvalidOption(format!("{name} is on another device than hidden")));
        }
        let [len] = u.dims();
        if len != n {
            return Err(XentError::Shape(format!("{name} has {len} entries for {n} rows")));
        }
        let x: Vec<f32> = u
            .to_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| XentError::InvalidOption(format!("{name}: {e:?}")))?;
        xent::check::finite_values(ArrayView1::from(&x), name)?;
        up.extend(x);
    }
    let up = Tensor::<2>::from_data(TensorData::new(up, [2, n]), &device);
    let bias = bias.unwrap_or_else(|| Tensor::empty([0], &device));
    let (out, gh, gw, gb) = Dispatch::xent_linear_logprobs_with_grads(
        hidden.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        targets.into_dispatch(),
        up.into_dispatch(),
        XentLogprobsArgs::new(cfg),
    );
    let (logp, entropy) = split(Tensor::from_dispatch(out), n);
    Ok((logp, entropy, gh.map(Tensor::from_dispatch), gw.map(Tensor::from_dispatch), gb.map(Tensor::from_dispatch)))
}
