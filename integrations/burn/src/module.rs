//! A Burn module that a language model's output head can own in place of `Linear` +
//! `CrossEntropyLoss`: the unembedding weight (and bias) as parameters, the loss through
//! [`crate::linear_cross_entropy`].

use burn::module::{Initializer, Param};
use burn::prelude::*;
use xent::{LinearCe, XentError};

/// The configuration of a [`LinearCrossEntropy`] output head: `d_model` inputs, `vocab`
/// classes, a bias or not, the weights' initializer (Burn's `Linear`'s by default), and the
/// loss's `ignore_index`, label smoothing and class weights (more options through
/// [`LinearCrossEntropy::with_loss`]).
///
/// ```
/// use burn::prelude::*;
/// use xent_burn::LinearCrossEntropyConfig;
///
/// let device = Device::flex().autodiff();
/// let head = LinearCrossEntropyConfig::new(8, 100).with_bias(false).init(&device);
/// let hidden = Tensor::<2>::ones([4, 8], &device).require_grad();
/// let targets = Tensor::<1, Int>::from_ints([1, 2, 3, -100], &device);
/// let loss = head.forward(hidden.clone(), targets)?;
/// let grads = loss.backward();
/// assert_eq!(head.weight.grad(&grads).expect("d weight").dims(), [100, 8]);
/// assert_eq!(head.logits(hidden).dims(), [4, 100]);
/// # Ok::<(), xent::XentError>(())
/// ```
#[derive(Config, Debug)]
pub struct LinearCrossEntropyConfig {
    /// Width of the hidden states (`D`).
    pub d_model: usize,
    /// Number of classes (`V`, the vocabulary).
    pub vocab: usize,
    /// Whether the head has a bias `[V]`.
    #[config(default = true)]
    pub bias: bool,
    /// Target value whose rows are left out of the loss (PyTorch's `ignore_index`).
    #[config(default = "-100")]
    pub ignore_index: i64,
    /// Label smoothing in `[0, 1]`.
    #[config(default = 0.0)]
    pub label_smoothing: f32,
    /// Per-class weights `[V]` (PyTorch's `weight`; Burn's `CrossEntropyLossConfig::weights`),
    /// or `None`. A mean divides by the summed weights of the counted rows.
    #[config(default = "None")]
    pub weights: Option<Vec<f32>>,
    /// The weights' initializer: Burn's `Linear`'s default (Kaiming uniform, gain `1/sqrt(3)`,
    /// that is `U(-1/sqrt(d_model), 1/sqrt(d_model))`).
    #[config(default = "Initializer::KaimingUniform{gain:1.0 / 3.0f64.sqrt(), fan_out_only:false}")]
    pub initializer: Initializer,
}

/// An output head with a fused linear cross-entropy loss: `weight [V, D]` (the layout of
/// PyTorch's `nn.Linear` and of Burn's `Linear` saved in column layout) and an optional
/// `bias [V]`. [`Self::forward`] returns the loss without forming the `[N, V]` logits;
/// [`Self::logits`] forms them, for inference. Made by [`LinearCrossEntropyConfig::init`].
#[derive(Module, Debug)]
pub struct LinearCrossEntropy {
    /// The unembedding `[V, D]`.
    pub weight: Param<Tensor<2>>,
    /// The bias `[V]`, if the head has one.
    pub bias: Option<Param<Tensor<1>>>,
    /// The loss's options (not a parameter: not saved with the module's record).
    #[module(skip)]
    pub loss: LinearCe,
}

impl LinearCrossEntropyConfig {
    /// A head on `device` with freshly initialised parameters (as Burn's `Linear` with
    /// `d_input = d_model`, `d_output = vocab`).
    pub fn init(&self, device: &Device) -> LinearCrossEntropy {
        let (d, v) = (self.d_model, self.vocab);
        let weight = self.initializer.init_with([v, d], Some(d), Some(v), device);
        let bias = self.bias.then(|| self.initializer.init_with([v], Some(d), Some(v), device));
        #[allow(clippy::field_reassign_with_default)]
        let loss = {
            let mut loss = LinearCe::default();
            loss.ce.ignore_index = self.ignore_index;
            loss.ce.label_smoothing = self.label_smoothing;
            loss.ce.class_weight = self.weights.clone().map(ndarray::Array1::from);
            loss
        };
        LinearCrossEntropy { weight, bias, loss }
    }
}

impl LinearCrossEntropy {
    /// The head with these loss options (reduction, class weights, z-loss, ... all of
    /// [`LinearCe`]).
    pub fn with_loss(mut self, loss: LinearCe) -> Self {
        self.loss = loss;
        self
    }

    /// The loss of `hidden [N, D]` against `targets [N]`, as [`crate::linear_cross_entropy`]
    /// with this head's weight, bias and options (a `[1]` tensor for `mean`/`sum`, `[N]` for
    /// `none`; f32). Differentiable w.r.t. `hidden` and the parameters. On Flex and on Burn's
    /// wgpu device (see [`crate::linear_cross_entropy`]); bad shapes, targets or options are an
    /// error, not a panic.
    pub fn forward(&self, hidden: Tensor<2>, targets: Tensor<1, Int>) -> Result<Tensor<1>, XentError> {
        crate::linear_cross_entropy(hidden, self.weight.val(), self.bias.as_ref().map(|b| b.val()), targets, &self.loss)
    }

    /// [`Self::forward`] with per-row sample weights `sample_weight [N]` (a Burn tensor of the
    /// head's device, read once; not differentiated): row `n`'s loss is scaled by
    /// `sample_weight[n]`, and a mean divides by the summed weights of the counted rows, as
    /// xent's `CrossEntropy::sample_weight`. A length other than `N` or a non-finite weight is
    /// an error. On a wgpu device reading the weights waits for the device (the one wait of
    /// this call); a z-loss with sample weights is an error there.
    pub fn forward_weighted(
        &self,
        hidden: Tensor<2>,
        targets: Tensor<1, Int>,
        sample_weight: Tensor<1>,
    ) -> Result<Tensor<1>, XentError> {
        let w: Vec<f32> = sample_weight
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| XentError::InvalidOption(format!("sample weights: {e:?}")))?;
        let mut loss = self.loss.clone();
        loss.ce.data.sample_weight = Some(ndarray::Array1::from(w));
        crate::linear_cross_entropy(hidden, self.weight.val(), self.bias.as_ref().map(|b| b.val()), targets, &loss)
    }

    /// The logits `hidden @ weight^T + bias` (`[N, V]`), with Burn's own ops: for inference
    /// and sampling, where the whole row of logits is wanted.
    pub fn logits(&self, hidden: Tensor<2>) -> Tensor<2> {
        let z = hidden.matmul(self.weight.val().transpose());
        match &self.bias {
            Some(b) => z + b.val().unsqueeze_dim(0),
            None => z,
        }
    }
}
