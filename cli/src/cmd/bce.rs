//! `xent bce`: binary cross-entropy from logits or probabilities.

use std::path::{Path, PathBuf};

use clap::Args;
use ndarray::Array2;
use xent::{Bce, BceWeight, Reduction, Result, XentError};

use super::{commit_f32, out_tensor};
use crate::common::{num, BackendArgs, Obj, ReductionArg};
use crate::io::out::Outputs;
use crate::io::tensor::read_weights;
use crate::io::{FileDType, TensorFile};

/// The arguments of `xent bce`.
#[derive(Args, Debug)]
pub struct BceArgs {
    /// Logits, float [N, C] (or [N]).
    #[arg(long, required_unless_present = "probs", conflicts_with = "probs")]
    logits: Option<PathBuf>,
    /// Probabilities in [0, 1], float [N, C] (or [N]).
    #[arg(long)]
    probs: Option<PathBuf>,
    /// Targets in [0, 1], float, shaped like the inputs.
    #[arg(long)]
    targets: PathBuf,
    /// Weights: float [C] (per class) or shaped like the inputs (per element).
    #[arg(long)]
    weight: Option<PathBuf>,
    /// Weight of positive targets, float [C] (logits only).
    #[arg(long)]
    pos_weight: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendArgs,
    /// How elements are combined.
    #[arg(long, value_enum, default_value = "mean")]
    reduction: ReductionArg,
    /// Write d(loss)/d(input), float32, shaped like the inputs (for `none`: of the sum).
    #[arg(long)]
    grad_out: Option<PathBuf>,
    /// Write element losses, float32, shaped like the inputs.
    #[arg(long)]
    loss_out: Option<PathBuf>,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

/// Reads a float array of rank 1 or 2 as 2-D (a vector becomes one column), keeping its shape.
fn read_matrix(p: &Path, what: &str) -> Result<(Array2<f32>, Vec<usize>)> {
    let t = TensorFile::open(p, what)?;
    t.want_rank(&[1, 2], what)?;
    let shape = t.shape.clone();
    let v = t.read_f32(what)?;
    let dim = if shape.len() == 1 { (shape[0], 1) } else { (shape[0], shape[1]) };
    Ok((Array2::from_shape_vec(dim, v).expect("shape matches data"), shape))
}

/// Runs `xent bce`: binary cross-entropy of logits or probabilities against targets in [0, 1],
/// printing the loss and writing the requested outputs.
pub fn run(a: &BceArgs) -> Result<()> {
    let (input_path, from_probs) = match (&a.logits, &a.probs) {
        (Some(l), _) => (l, false),
        (None, Some(p)) => (p, true),
        (None, None) => unreachable!("clap requires --logits or --probs"),
    };
    let outs: Vec<_> = [(&a.grad_out, "--grad-out"), (&a.loss_out, "--loss-out")]
        .into_iter()
        .filter_map(|(p, w)| p.as_deref().map(|p| (p, w)))
        .collect();
    Outputs::check(&outs, &[input_path.as_path(), a.targets.as_path()], true)?;
    let (x, shape) = read_matrix(input_path, if from_probs { "probabilities" } else { "logits" })?;
    let (y, yshape) = read_matrix(&a.targets, "targets")?;
    if yshape != shape {
        return Err(XentError::Shape(format!("inputs are {shape:?} but targets are {yshape:?}")));
    }
    let weight = match &a.weight {
        Some(p) => {
            let (w, wshape) = read_matrix(p, "weight")?;
            let name = format!("--weight {}", p.display());
            match wshape.len() {
                1 => xent::check::finite_values(w.column(0), &name)?,
                _ => xent::check::finite_values(w.view(), &name)?,
            }
            Some(if wshape == shape && shape.len() == 2 || wshape.len() == 1 && shape.len() == 1 {
                BceWeight::PerElement(w)
            } else if wshape.len() == 1 {
                BceWeight::PerClass(w.column(0).to_owned())
            } else {
                return Err(XentError::Shape(format!("weight {wshape:?} does not broadcast to {shape:?}")));
            })
        }
        None => None,
    };
    let pos_weight = a.pos_weight.as_ref().map(|p| read_weights(p, "--pos-weight", x.ncols(), "column")).transpose()?;
    let reduction = a.reduction.into();
    let cfg = Bce::default()
        .with_reduction(reduction)
        .with_weight(weight)
        .with_pos_weight(pos_weight)
        .with_grad(a.grad_out.is_some())
        .with_grad_scale(1.0);
    let input = if from_probs { xent::check::BceInput::Probs } else { xent::check::BceInput::Logits };
    xent::check::bce_inputs(x.view(), y.view(), &cfg, input)?;
    let grad_out = out_tensor(a.grad_out.as_deref(), FileDType::F32, &shape, "gradient")?;
    let loss_out = out_tensor(a.loss_out.as_deref(), FileDType::F32, &shape, "element losses")?;
    let engine = a.backend.open()?;
    let b = engine.backend();
    let run = |cfg: &Bce| {
        if from_probs {
            b.bce(x.view(), y.view(), cfg)
        } else {
            b.bce_with_logits(x.view(), y.view(), cfg)
        }
    };
    let out = run(&cfg)?;
    let elem = match (&loss_out, &out.elem_loss) {
        (None, _) => None,
        (Some(_), Some(e)) => Some(e.clone()),
        // Element losses for any reduction: evaluate once more without reducing.
        (Some(_), None) => run(&cfg.clone().with_reduction(Reduction::None).with_grad(false))?.elem_loss,
    };
    commit_f32(grad_out, out.grad.as_ref().and_then(|g| g.as_slice()))?;
    commit_f32(loss_out, elem.as_ref().and_then(|e| e.as_slice()))?;
    let loss = if reduction == Reduction::None { serde_json::Value::Null } else { num(out.loss) };
    let obj = Obj::default()
        .set("loss", loss)
        .set("elements", out.elements)
        .set("shape", shape)
        .set("input", if from_probs { "probs" } else { "logits" })
        .set("backend", engine.name())
        .set("reduction", a.reduction.name());
    obj.print(a.json);
    Ok(())
}
