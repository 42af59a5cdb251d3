//! The loss under Burn's autodiff: the forward pass runs the inner backend's loss and keeps
//! its state (on wgpu three floats per row; on the CPU the fused gradient); the backward pass
//! turns it into the gradient times the upstream gradient (a scalar for `sum`/`mean`, one value
//! per row for `none`): on wgpu in one read of the logits, written over them when Burn holds
//! them nowhere else.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::AutodiffBackend;

use crate::{XentArgs, XentOps};

/// The backward step: the inner backend's logits, targets and forward state.
#[derive(Debug)]
struct XentBackward {
    args: XentArgs,
}

impl<B: XentOps> Backward<B, 1> for XentBackward {
    type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [parent] = ops.parents;
        let upstream = grads.consume::<B>(&ops.node);
        if let Some(node) = parent {
            let (logits, targets, state) = ops.state;
            let grad = B::xent_cross_entropy_backward(logits, targets, state, upstream, self.args);
            grads.register::<B>(node.id, grad);
        }
    }
}

impl<B: XentOps, C: CheckpointStrategy> XentOps for Autodiff<B, C> {
    fn xent_cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>, args: XentArgs) -> FloatTensor<Self> {
        let (primitive, node) = logits.into_parts();
        match (XentBackward { args: args.clone() }).prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (loss, state) = B::xent_cross_entropy_forward(primitive.clone(), targets.clone(), args);
                prep.finish((primitive, targets, state), loss)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::xent_cross_entropy(primitive, targets, args)),
        }
    }

    fn xent_cross_entropy_with_grad(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        args: XentArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (loss, grad) = B::xent_cross_entropy_with_grad(Self::inner(logits), targets, args);
        (Self::from_inner(loss), Self::from_inner(grad))
    }

    fn xent_cross_entropy_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        args: XentArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (loss, state) = B::xent_cross_entropy_forward(Self::inner(logits), targets, args);
        (Self::from_inner(loss), Self::from_inner(state))
    }

    fn xent_cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        state: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
        args: XentArgs,
    ) -> FloatTensor<Self> {
        let grad = B::xent_cross_entropy_backward(
            Self::inner(logits),
            targets,
            Self::inner(state),
            Self::inner(upstream),
            args,
        );
        Self::from_inner(grad)
    }
}
