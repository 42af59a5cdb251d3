//! The public methods that [`crate::Cpu`] and [`crate::GpuContext`] both offer with the same
//! signature and meaning, written once: [`backend_methods!`] expands them on each backend
//! around the backend's own `pub(crate)` implementation of each (`ce_run`, `ce_vocab`,
//! `distill_run`, `linear_ce`, `linear_vocab`, `logprobs_run`, `logprobs_vocab`), which
//! take their operands as one call struct (`CeCall`, `LinearCall`, `LogprobsCall`) and a
//! vocabulary shard as `Sharded`. The docs name the backend and its constructor, and carry one
//! note about what the backend does differently; the examples run on the CPU and are compiled
//! (`no_run`) for the GPU.

/// Expands the shared public methods on `$ty`: `$name` (the type's name in the examples),
/// `$ctor` (an expression that makes one, in a function returning `Result`), `$fence` (the
/// examples' code fence: "```" or "```no_run"), `$note` (a sentence on what this backend does).
macro_rules! backend_methods {
    ($ty:ty, $name:literal, $ctor:literal, $fence:literal, $note:literal) => {
        #[rustfmt::skip]
        const _: () = {
        use ndarray::ArrayView1;
        use $crate::api::linear::LinearCall;
        use $crate::api::logprobs::LogprobsCall;
        use $crate::parallel::{Collective, VocabShard};
        use $crate::parallel::vocab::Sharded;
        use $crate::api::config::{CeCall, CeLogits, GradDest};
        use $crate::{CeOutput, CrossEntropy, Distill, DistillOutput, LinearCe, LinearCeOutput, LinearLogprobs,
            LinearLogprobsOutput, Logits, LogitsMut, Result, Targets};

        impl $ty {
            #[doc = concat!("Softmax cross-entropy of logits `[N, V]` (f32, f16 or bf16) against class indices or
probability rows (see [`CrossEntropy`]); the loss only. ", $note, "

With probability targets `y [N, V]` (soft labels, PyTorch's float target):

```text
q_nc = (1 - eps) y_nc + eps / V
L_n  = sample_weight[n] sum_c class_weight[c] q_nc (lse_n - z_nc)  (+ z_loss lse_n^2)
```

`Mean` then divides by the number of rows (by the sum of sample weights when given) and
`ignore_index` does not apply.

", $fence, "
use ndarray::array;
use xent::{", $name, ", CrossEntropy};
let x = array![[1.0f32, 2.0, 3.0]];
let be = ", $ctor, ";
let hard = be.cross_entropy(&x, &[2i64][..], &CrossEntropy::default())?;
let soft = be.cross_entropy(&x, &array![[0.0f32, 0.0, 1.0]], &CrossEntropy::default())?;
assert!((hard.loss - soft.loss).abs() < 1e-6);
# Ok::<(), xent::XentError>(())
```")]
            pub fn cross_entropy<'a, 'b>(
                &self,
                logits: impl Into<Logits<'a>>,
                targets: impl Into<Targets<'b>>,
                cfg: &CrossEntropy,
            ) -> Result<CeOutput> {
                self.ce_run(CeCall::new(CeLogits::Read(logits.into().reborrow()), targets, GradDest::None, cfg), cfg)
            }

            /// Cross-entropy and its gradient w.r.t. the logits, as a new f32 array in
            /// [`CeOutput::grad`].
            pub fn cross_entropy_with_grad<'a, 'b>(
                &self,
                logits: impl Into<Logits<'a>>,
                targets: impl Into<Targets<'b>>,
                cfg: &CrossEntropy,
            ) -> Result<CeOutput> {
                self.ce_run(CeCall::new(CeLogits::Read(logits.into().reborrow()), targets, GradDest::New, cfg), cfg)
            }

            #[doc = concat!("Cross-entropy whose gradient is written into `grad`, a caller-owned `[N, V]` tensor of
any dtype (f32, or the logits' f16/bf16, rounded once from f32): a training loop reuses it and
allocates nothing per call.

", $fence, "
use ndarray::{array, Array2};
use xent::{", $name, ", CrossEntropy};
let be = ", $ctor, ";
let x = array![[1.0f32, 2.0, 3.0]];
let mut g = Array2::<f32>::zeros((1, 3));
be.cross_entropy_into(&x, &[2i64][..], &CrossEntropy::default(), &mut g)?;
assert!(g[[0, 2]] < 0.0 && g[[0, 0]] > 0.0);
# Ok::<(), xent::XentError>(())
```")]
            pub fn cross_entropy_into<'a, 'b, 'c>(
                &self,
                logits: impl Into<Logits<'a>>,
                targets: impl Into<Targets<'b>>,
                cfg: &CrossEntropy,
                grad: impl Into<LogitsMut<'c>>,
            ) -> Result<CeOutput> {
                let mut grad = grad.into();
                let call = CeCall::new(CeLogits::Read(logits.into().reborrow()), targets, GradDest::Into(grad.reborrow()), cfg);
                self.ce_run(call, cfg)
            }

            /// Cross-entropy that overwrites `logits` (any dtype) with the gradient.
            pub fn cross_entropy_in_place<'a, 'b>(
                &self,
                logits: impl Into<LogitsMut<'a>>,
                targets: impl Into<Targets<'b>>,
                cfg: &CrossEntropy,
            ) -> Result<CeOutput> {
                let mut logits = logits.into();
                self.ce_run(CeCall::new(CeLogits::InPlace(logits.reborrow()), targets, GradDest::None, cfg), cfg)
            }

            #[doc = concat!("Knowledge distillation of `student` towards `teacher` logits `[N, V]` (any dtypes; see
[`Distill`]).

", $fence, "
use ndarray::array;
use xent::{", $name, ", Distill};
let x = array![[1.0f32, 2.0, 3.0]];
let same = ", $ctor, ".distill(&x, &x, &Distill::default())?;
assert!(same.loss.abs() < 1e-12);
# Ok::<(), xent::XentError>(())
```")]
            pub fn distill<'a, 'b>(
                &self,
                student: impl Into<Logits<'a>>,
                teacher: impl Into<Logits<'b>>,
                cfg: &Distill,
            ) -> Result<DistillOutput> {
                self.distill_run(student.into().reborrow(), teacher.into().reborrow(), cfg, false)
            }

            /// Distillation and its f32 gradient w.r.t. the student logits ([`DistillOutput::grad`]).
            pub fn distill_with_grad<'a, 'b>(
                &self,
                student: impl Into<Logits<'a>>,
                teacher: impl Into<Logits<'b>>,
                cfg: &Distill,
            ) -> Result<DistillOutput> {
                self.distill_run(student.into().reborrow(), teacher.into().reborrow(), cfg, true)
            }

            #[doc = concat!("Fused linear cross-entropy: the loss of `F.cross_entropy(hidden @ weight.T + bias,
targets)` (PyTorch's semantics, every [`CrossEntropy`] option) and its gradients w.r.t.
`hidden [N, D]`, `weight [V, D]` (both f32, f16 or bf16, one dtype) and `bias [V]`, never
holding more than a chunk of rows of logits ([`LinearCe::workspace_bytes`]). ", $note, "

", $fence, "
use ndarray::array;
use xent::{", $name, ", LinearCe};
let hidden = array![[1.0f32, 0.5], [-0.5, 2.0], [0.0, 1.0]];
let weight = array![[0.2f32, -0.1], [0.4, 0.3], [-0.3, 0.8], [0.1, 0.1]];
let out = ", $ctor, ".linear_cross_entropy(&hidden, &weight, None, &[1i64, 2, -100][..], &LinearCe::default())?;
assert_eq!(out.grad_weight.unwrap().dim(), (4, 2));
# Ok::<(), xent::XentError>(())
```")]
            pub fn linear_cross_entropy<'a, 'b, 'c>(
                &self,
                hidden: impl Into<Logits<'a>>,
                weight: impl Into<Logits<'b>>,
                bias: Option<ArrayView1<'_, f32>>,
                targets: impl Into<Targets<'c>>,
                cfg: &LinearCe,
            ) -> Result<LinearCeOutput> {
                self.linear_ce(LinearCall::new(hidden, weight, bias, targets, None, cfg.ce.data.sample_weight.as_ref()), cfg)
            }

            #[doc = concat!("[`Self::linear_cross_entropy`] with reduction `none` and a per-row upstream gradient
`upstream [N]` (`d(total)/d(loss_n)`, what a framework's backward pass hands down): the
gradients are those of `grad_scale * sum_n upstream[n] * loss_n`, `loss_n` the row's loss as
PyTorch's `reduction='none'` returns it (sample and class weights, smoothing, z-loss, softcap
and temperature included; ignored rows add nothing). The losses returned are unchanged
(`loss` is their plain sum). Folding `upstream` into the sample weights instead is wrong with
z-loss, which sample weights do not scale. ", $note, "

Errors (the same on every backend): another reduction is [`crate::XentError::InvalidOption`],
`upstream` not of `N` entries [`crate::XentError::Shape`], a non-finite entry
[`crate::XentError::InvalidValue`].

", $fence, "
use ndarray::array;
use xent::{", $name, ", CrossEntropy, LinearCe, Reduction};
let hidden = array![[1.0f32, 0.5], [-0.5, 2.0], [0.0, 1.0]];
let weight = array![[0.2f32, -0.1], [0.4, 0.3], [-0.3, 0.8], [0.1, 0.1]];
let t = [1i64, 2, 0];
let ce = CrossEntropy::default().with_reduction(Reduction::None).with_z_loss(1e-2);
let cfg = LinearCe::default().with_ce(ce);
let be = ", $ctor, ";
// The gradient of 2 * loss_0 + 0 * loss_1 - loss_2 ...
let up = array![2.0f32, 0.0, -1.0];
let out = be.linear_cross_entropy_with_upstream(&hidden, &weight, None, &t[..], up.view(), &cfg)?;
// ... is, row by row, the rows' own gradients scaled (row 1 gets none).
let plain = be.linear_cross_entropy(&hidden, &weight, None, &t[..], &cfg)?;
let (g, g1) = (out.grad_hidden.unwrap().to_f32(), plain.grad_hidden.unwrap().to_f32());
for r in 0..3 {
    for k in 0..2 {
        assert!((g[[r, k]] - up[r] * g1[[r, k]]).abs() < 1e-6);
    }
}
assert_eq!(out.loss, plain.loss);
# Ok::<(), xent::XentError>(())
```")]
            pub fn linear_cross_entropy_with_upstream<'a, 'b, 'c>(
                &self,
                hidden: impl Into<Logits<'a>>,
                weight: impl Into<Logits<'b>>,
                bias: Option<ArrayView1<'_, f32>>,
                targets: impl Into<Targets<'c>>,
                upstream: ArrayView1<'_, f32>,
                cfg: &LinearCe,
            ) -> Result<LinearCeOutput> {
                self.linear_ce(LinearCall::new(hidden, weight, bias, targets, Some(upstream), cfg.ce.data.sample_weight.as_ref()), cfg)
            }

            #[doc = concat!("Fused linear cross-entropy over a vocabulary split across the ranks of `comm`:
`hidden [N, D]` (the same on every rank), this rank's `weight [V_local, D]` and `bias
[V_local]` (classes `shard.class0 ..` of `shard.classes`), global `targets [N]`. Returns the
whole batch's loss on every rank, `grad_hidden [N, D]` summed over the ranks, and this
shard's `grad_weight [V_local, D]` and `grad_bias`. Options as
[`Self::linear_cross_entropy`] (class weights are the global `[V]`); per-row ranks are not
computed here. Collectives: one of five f64 per row, and one of `N x D` f32 when
`grad_hidden` is asked for. ", $note, "

", $fence, "
use ndarray::array;
use xent::{parallel::{SingleProcess, VocabShard}, ", $name, ", LinearCe};
let hidden = array![[1.0f32, 0.5], [-0.5, 2.0]];
let weight = array![[0.2f32, -0.1], [0.4, 0.3], [-0.3, 0.8]];
let shard = VocabShard { class0: 0, classes: 3 };
let (t, be) = ([1i64, 2], ", $ctor, ");
let sharded = be.linear_cross_entropy_vocab_parallel(&hidden, &weight, None, &t[..], shard, &LinearCe::default(), &SingleProcess)?;
let whole = be.linear_cross_entropy(&hidden, &weight, None, &t[..], &LinearCe::default())?;
assert!((sharded.loss - whole.loss).abs() < 1e-6);
# Ok::<(), xent::XentError>(())
```")]
            #[allow(clippy::too_many_arguments)]
            pub fn linear_cross_entropy_vocab_parallel<'a, 'b, 'c>(
                &self,
                hidden: impl Into<Logits<'a>>,
                weight: impl Into<Logits<'b>>,
                bias: Option<ArrayView1<'_, f32>>,
                targets: impl Into<Targets<'c>>,
                shard: VocabShard,
                cfg: &LinearCe,
                comm: &dyn Collective,
            ) -> Result<LinearCeOutput> {
                self.linear_vocab(LinearCall::new(hidden, weight, bias, targets, None, cfg.ce.data.sample_weight.as_ref()), Sharded { shard, comm }, cfg)
            }

            #[doc = concat!("[`Self::linear_cross_entropy_vocab_parallel`] with reduction `none` and a per-row
upstream gradient `upstream [N]` (the same on every rank): the gradients of
`grad_scale * sum_n upstream[n] * loss_n`, as [`Self::linear_cross_entropy_with_upstream`]
(its semantics and errors). ", $note, "

", $fence, "
use ndarray::array;
use xent::{parallel::{SingleProcess, VocabShard}, ", $name, ", CrossEntropy, LinearCe, Reduction};
let hidden = array![[1.0f32, 0.5], [-0.5, 2.0]];
let weight = array![[0.2f32, -0.1], [0.4, 0.3], [-0.3, 0.8]];
let shard = VocabShard { class0: 0, classes: 3 };
let (t, up) = ([1i64, 2], array![0.5f32, -2.0]);
let cfg = LinearCe::default().with_ce(CrossEntropy::default().with_reduction(Reduction::None).with_z_loss(1e-3));
let be = ", $ctor, ";
let sharded = be.linear_cross_entropy_vocab_parallel_with_upstream(&hidden, &weight, None, &t[..], up.view(), shard, &cfg, &SingleProcess)?;
let whole = be.linear_cross_entropy_with_upstream(&hidden, &weight, None, &t[..], up.view(), &cfg)?;
let (a, b) = (sharded.grad_weight.unwrap().to_f32(), whole.grad_weight.unwrap().to_f32());
assert!(a.iter().zip(b.iter()).all(|(x, y)| (x - y).abs() < 1e-6));
# Ok::<(), xent::XentError>(())
```")]
            #[allow(clippy::too_many_arguments)]
            pub fn linear_cross_entropy_vocab_parallel_with_upstream<'a, 'b, 'c>(
                &self,
                hidden: impl Into<Logits<'a>>,
                weight: impl Into<Logits<'b>>,
                bias: Option<ArrayView1<'_, f32>>,
                targets: impl Into<Targets<'c>>,
                upstream: ArrayView1<'_, f32>,
                shard: VocabShard,
                cfg: &LinearCe,
                comm: &dyn Collective,
            ) -> Result<LinearCeOutput> {
                let call = LinearCall::new(hidden, weight, bias, targets, Some(upstream), cfg.ce.data.sample_weight.as_ref());
                self.linear_vocab(call, Sharded { shard, comm }, cfg)
            }

            #[doc = concat!("Per-row log-probabilities of the targets and softmax entropies of
`z = (hidden @ weight.T + bias) / temperature`, from hidden states `[N, D]` and the
unembedding `weight [V, D]` (f32, f16 or bf16, one dtype), never holding more than a chunk of
rows of logits ([`LinearLogprobs::workspace_bytes`]). With `upstream = Some((a, b))` (`[N]`
each, finite) the gradients of `sum_n a_n logp_n + b_n H_n` w.r.t. hidden, weight and bias
are returned as the options ask; with `None`, none. Rows whose target is `ignore_index` give
0 and no gradient. The math is in [`LinearLogprobs`]. ", $note, "

", $fence, "
use ndarray::array;
use xent::{", $name, ", LinearLogprobs};
let hidden = array![[1.0f32, 0.5], [-0.5, 2.0], [0.0, 1.0]];
let weight = array![[0.2f32, -0.1], [0.4, 0.3], [-0.3, 0.8], [0.1, 0.1]];
let cfg = LinearLogprobs::default().with_temperature(0.8);
let (a, b) = (array![1.0f32, 1.0, 1.0], array![0.0f32, 0.01, 0.0]);
let out = ", $ctor, ".linear_logprobs(&hidden, &weight, None, &[1i64, 2, -100][..], &cfg, Some((a.view(), b.view())))?;
assert!(out.logprob[0] < 0.0 && out.entropy[0] > 0.0 && out.entropy[0] < 4f32.ln());
assert_eq!((out.logprob[2], out.counted), (0.0, 2));
assert_eq!(out.grad_weight.unwrap().dim(), (4, 2));
# Ok::<(), xent::XentError>(())
```")]
            pub fn linear_logprobs<'a, 'b, 'c>(
                &self,
                hidden: impl Into<Logits<'a>>,
                weight: impl Into<Logits<'b>>,
                bias: Option<ArrayView1<'_, f32>>,
                targets: impl Into<Targets<'c>>,
                cfg: &LinearLogprobs,
                upstream: Option<(ArrayView1<'_, f32>, ArrayView1<'_, f32>)>,
            ) -> Result<LinearLogprobsOutput> {
                self.logprobs_run(LogprobsCall::new(LinearCall::new(hidden, weight, bias, targets, None, None), cfg, upstream))
            }

            #[doc = concat!("[`Self::linear_logprobs`] over a vocabulary split across the ranks of `comm`:
`hidden [N, D]` (the same on every rank), this rank's `weight [V_local, D]` and `bias
[V_local]` (classes `shard.class0 ..` of `shard.classes`), global `targets [N]` and the
upstream gradient `(a, b)` (the same on every rank). Each rank's row records of its shard
(`max`, exponential sum, centred sum and target logit, `crate::parallel::vocab`) are merged in
one all-reduce of four f64 per row; every rank returns the whole batch's log-probs and
entropies, `grad_hidden` summed over the ranks (a second collective, `N x D` f32, with an
upstream gradient), and its own shard's `grad_weight` and `grad_bias`. ", $note, "

", $fence, "
use ndarray::array;
use xent::{parallel::{SingleProcess, VocabShard}, ", $name, ", LinearLogprobs};
let hidden = array![[1.0f32, 0.5], [-0.5, 2.0]];
let weight = array![[0.2f32, -0.1], [0.4, 0.3], [-0.3, 0.8]];
let shard = VocabShard { class0: 0, classes: 3 };
let (t, cfg, be) = ([1i64, 2], LinearLogprobs::default(), ", $ctor, ");
let sharded = be.linear_logprobs_vocab_parallel(&hidden, &weight, None, &t[..], shard, &cfg, None, &SingleProcess)?;
let whole = be.linear_logprobs(&hidden, &weight, None, &t[..], &cfg, None)?;
assert!((sharded.logprob[1] - whole.logprob[1]).abs() < 1e-6);
# Ok::<(), xent::XentError>(())
```")]
            #[allow(clippy::too_many_arguments)]
            pub fn linear_logprobs_vocab_parallel<'a, 'b, 'c>(
                &self,
                hidden: impl Into<Logits<'a>>,
                weight: impl Into<Logits<'b>>,
                bias: Option<ArrayView1<'_, f32>>,
                targets: impl Into<Targets<'c>>,
                shard: VocabShard,
                cfg: &LinearLogprobs,
                upstream: Option<(ArrayView1<'_, f32>, ArrayView1<'_, f32>)>,
                comm: &dyn Collective,
            ) -> Result<LinearLogprobsOutput> {
                let call = LogprobsCall::new(LinearCall::new(hidden, weight, bias, targets, None, None), cfg, upstream);
                self.logprobs_vocab(call, Sharded { shard, comm })
            }

            #[doc = concat!("Cross-entropy over a vocabulary split across the ranks of `comm`: this rank's
logits `[N, V_local]` (f32, f16 or bf16) cover classes `shard.class0 ..` of `shard.classes`;
`targets [N]` are global class indices (the same on every rank). Every [`CrossEntropy`]
option with class targets applies (class weights are the global `[V]`). Returns the whole
batch's loss on every rank and, into `grad` (this rank's `[N, V_local]`, any dtype), this
shard's gradient. One all-reduce of five f64 per row. ", $note, "

", $fence, "
use ndarray::array;
use xent::{parallel::{SingleProcess, VocabShard}, ", $name, ", CrossEntropy};
let x = array![[2.0f32, 0.5, -1.0], [0.1, 0.2, 0.3]];
let shard = VocabShard { class0: 0, classes: 3 };
let be = ", $ctor, ";
let out = be.cross_entropy_vocab_parallel(&x, &[0i64, 2][..], shard, &CrossEntropy::default(), &SingleProcess, None)?;
let whole = be.cross_entropy(&x, &[0i64, 2][..], &CrossEntropy::default())?;
assert!((out.loss - whole.loss).abs() < 1e-6);
# Ok::<(), xent::XentError>(())
```")]
            pub fn cross_entropy_vocab_parallel<'a, 'b>(
                &self,
                logits: impl Into<Logits<'a>>,
                targets: impl Into<Targets<'b>>,
                shard: VocabShard,
                cfg: &CrossEntropy,
                comm: &dyn Collective,
                grad: Option<LogitsMut<'_>>,
            ) -> Result<CeOutput> {
                let mut grad = grad;
                let grad = grad.as_mut().map_or(GradDest::None, |g| GradDest::Into(g.reborrow()));
                let call = CeCall::new(CeLogits::Read(logits.into().reborrow()), targets, grad, cfg);
                self.ce_vocab(call, Sharded { shard, comm }, cfg)
            }
        }
        };
    };
}
pub(crate) use backend_methods;
