//! `xent eval --hidden H --weight W [--bias B] --targets T ...` and `xent perplexity --hidden H
//! --weight W ...`: fused linear cross-entropy from files, the logits never materialised.

use std::path::{Path, PathBuf};

use clap::Args;
use ndarray::{Array1, Array2};
use xent::{CrossEntropy, DType, LinearCe, LinearCeOutput, Result, Tensor2, XentError};

use super::out_tensor;
use crate::common::Engine;
use crate::io::out::Outputs;
use crate::io::tensor::{read_f32_1d, read_targets};
use crate::io::{FileDType, TensorFile};

/// `--hidden`, `--weight` and `--bias`: the inputs of a fused linear cross-entropy, given
/// instead of `--logits` (`eval` and `perplexity`).
#[derive(Args, Debug)]
#[command(next_help_heading = "Fused linear (logits from hidden states)")]
pub struct LinearArgs {
    /// Hidden states [N, D] (instead of --logits; rows in sequence order for perplexity): the
    /// logits are hidden @ weight.T + bias, one chunk of rows at a time, never materialised
    /// (fused linear cross-entropy); f32, f16 or bf16.
    #[arg(long, requires = "weight")]
    pub hidden: Option<PathBuf>,
    /// The unembedding [V, D], in the hidden states' dtype (with --hidden).
    #[arg(long, requires = "hidden")]
    pub weight: Option<PathBuf>,
    /// The logits' bias, float32 [V] (with --hidden).
    // (`[V]` is a shape in clap's help text, not a rustdoc link.)
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(long, requires = "hidden")]
    pub bias: Option<PathBuf>,
}

impl LinearArgs {
    /// The hidden states' and weight's paths, when the logits come from them.
    pub fn paths(&self) -> Option<(&Path, &Path)> {
        self.hidden.as_deref().zip(self.weight.as_deref())
    }
}

/// Hidden states `[N, D]` or the unembedding `[V, D]` (f32, f16 or bf16), read whole.
pub(crate) fn read_matrix(path: &Path, what: &str) -> Result<Tensor2> {
    let t = TensorFile::open(path, what)?;
    t.want_rank(&[2], what)?;
    let dim = (t.shape[0], t.shape[1]);
    let bad = || XentError::Format {
        path: path.display().to_string(),
        message: format!("{what} must be float32, float16 or bfloat16, got {}", t.dtype.name()),
    };
    fn shape<T>(dim: (usize, usize), v: Vec<T>, what: &str) -> Result<Array2<T>> {
        Array2::from_shape_vec(dim, v).map_err(|e| XentError::Shape(format!("{what}: {e}")))
    }
    Ok(match t.dtype.logits().ok_or_else(bad)? {
        DType::F32 => Tensor2::F32(shape(dim, t.read_all::<f32>()?, what)?),
        DType::F16 => Tensor2::F16(shape(dim, t.read_all::<half::f16>()?, what)?),
        DType::BF16 => Tensor2::BF16(shape(dim, t.read_all::<half::bf16>()?, what)?),
    })
}

/// Checks hidden states of shape `(n, d)` and `dtype` against the weight and bias read from
/// files (the library's [`xent::check::linear_operands`]: inner dimensions, one dtype, one bias
/// entry per class); returns the number of classes V.
pub(crate) fn check_pair(
    (n, d): (usize, usize),
    dtype: DType,
    weight: &Tensor2,
    bias: Option<&Array1<f32>>,
) -> Result<usize> {
    let operands = ((weight.dim(), weight.dtype()), bias.map(|b| b.len()));
    let (_, _, v) = xent::check::linear_operands(((n, d), dtype), operands.0, operands.1, &LinearCe::default())?;
    Ok(v)
}

/// The inputs of a fused linear cross-entropy from files.
#[derive(Clone)]
pub struct LinearInputs {
    /// Hidden states `[N, D]`.
    pub hidden: Tensor2,
    /// The unembedding `[V, D]`, in the hidden states' dtype.
    pub weight: Tensor2,
    /// The logits' bias `[V]`, if any.
    pub bias: Option<Array1<f32>>,
    /// Class-index targets `[N]`.
    pub targets: Array1<i64>,
}

impl LinearInputs {
    /// Reads and checks the files (shapes, dtypes, and with `ignore_index` the targets' range)
    /// before any work.
    pub fn read(
        hidden: &Path,
        weight: &Path,
        bias: Option<&Path>,
        targets: &Path,
        ignore_index: Option<i64>,
    ) -> Result<LinearInputs> {
        let hidden_t = read_matrix(hidden, "hidden states")?;
        let weight_t = read_matrix(weight, "weight")?;
        let n = hidden_t.dim().0;
        let bias = bias.map(|b| read_f32_1d(b, "bias")).transpose()?;
        let v = check_pair(hidden_t.dim(), hidden_t.dtype(), &weight_t, bias.as_ref())?;
        let (targets, _) = read_targets(targets, &[1, 2])?;
        if targets.len() != n {
            return Err(XentError::Shape(format!("{} targets for {n} rows of hidden states", targets.len())));
        }
        if let Some(ignore) = ignore_index {
            xent::check::class_targets(&xent::Targets::I64(targets.view()), v, ignore)?;
        }
        Ok(LinearInputs { hidden: hidden_t, weight: weight_t, bias, targets })
    }

    /// The number of rows N.
    pub fn rows(&self) -> usize {
        self.hidden.dim().0
    }

    /// The number of classes V (the weight's rows).
    pub fn classes(&self) -> usize {
        self.weight.dim().0
    }

    /// Runs the fused linear cross-entropy on `engine`.
    pub fn run(&self, engine: &Engine, cfg: &LinearCe) -> Result<LinearCeOutput> {
        let (h, w, b, t) =
            (self.hidden.view(), self.weight.view(), self.bias.as_ref().map(|b| b.view()), self.targets.view());
        match engine {
            Engine::Cpu(c) => c.linear_cross_entropy(h, w, b, t, cfg),
            #[cfg(feature = "gpu")]
            Engine::Gpu(g) => g.linear_cross_entropy(h, w, b, t, cfg),
        }
    }
}

/// Where `xent eval` writes the gradients of a fused linear cross-entropy.
pub struct LinearOutputs<'a> {
    /// Where `grad_hidden` goes (`--grad-hidden-out`), if anywhere.
    pub hidden: Option<&'a Path>,
    /// Where `grad_weight` goes (`--grad-weight-out`), if anywhere.
    pub weight: Option<&'a Path>,
    /// Where `grad_bias` goes (`--grad-bias-out`), if anywhere.
    pub bias: Option<&'a Path>,
    /// The element type of the hidden-state and weight gradients (`--grad-dtype`).
    pub dtype: FileDType,
}

/// `xent eval` with hidden states and a weight: loss and gradients; returns the output and the
/// input dtype.
pub fn eval(
    inputs: &LinearInputs,
    ce: CrossEntropy,
    outs: &LinearOutputs<'_>,
    engine: &Engine,
) -> Result<(LinearCeOutput, DType)> {
    let (n, v) = (inputs.rows(), inputs.classes());
    let d = inputs.hidden.dim().1;
    if outs.bias.is_some() && inputs.bias.is_none() {
        return Err(XentError::InvalidOption("--grad-bias-out needs --bias".into()));
    }
    let cfg = LinearCe::default()
        .with_ce(ce)
        .with_grad_hidden(outs.hidden.is_some())
        .with_grad_weight(outs.weight.is_some())
        .with_grad_bias(outs.bias.is_some())
        .with_grads_in_input_dtype(false);
    // Output files exist (as temporaries) before the work: a bad path fails first.
    let gh = out_tensor(outs.hidden, outs.dtype, &[n, d], "grad_hidden")?;
    let gw = out_tensor(outs.weight, outs.dtype, &[v, d], "grad_weight")?;
    let gb = out_tensor(outs.bias, FileDType::F32, &[v], "grad_bias")?;
    let o = inputs.run(engine, &cfg)?;
    let mut done = Outputs::default();
    for (file, grad) in [(gh, &o.grad_hidden), (gw, &o.grad_weight)] {
        if let (Some(f), Some(g)) = (file, grad) {
            match (outs.dtype, g.to_f32()) {
                (FileDType::F16, a) => f.write(0, &a.iter().map(|&x| half::f16::from_f32(x)).collect::<Vec<_>>())?,
                (FileDType::BF16, a) => f.write(0, &a.iter().map(|&x| half::bf16::from_f32(x)).collect::<Vec<_>>())?,
                (_, a) => f.write(0, a.as_slice().expect("contiguous"))?,
            }
            done.tensors.push(f);
        }
    }
    if let (Some(f), Some(g)) = (gb, &o.grad_bias) {
        f.write(0, g.as_slice().expect("contiguous"))?;
        done.tensors.push(f);
    }
    done.commit()?;
    Ok((o, inputs.hidden.dtype()))
}
