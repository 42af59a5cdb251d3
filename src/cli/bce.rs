//! `xent bce`: binary cross-entropy from logits or probabilities.

use std::path::PathBuf;

use clap::Args;
use ndarray::Array2;

use super::eval::ReductionArg;
use super::json::{num, Obj};
use super::{check_out, BackendArgs};
use crate::error::Result;
use crate::{npy, Bce, BceWeight, Reduction};

#[derive(Args, Debug)]
pub(crate) struct BceArgs {
    /// Logits, float32 [N, C] (or [N]).
    #[arg(long, required_unless_present = "probs", conflicts_with = "probs")]
    logits: Option<PathBuf>,
    /// Probabilities in [0, 1], float32 [N, C] (or [N]).
    #[arg(long)]
    probs: Option<PathBuf>,
    /// Targets in [0, 1], float32, shaped like the inputs.
    #[arg(long)]
    targets: PathBuf,
    /// Weights: float32 [C] (per class) or shaped like the inputs (per element).
    #[arg(long)]
    weight: Option<PathBuf>,
    /// Weight of positive targets, float32 [C] (logits only).
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

/// Reads a float32 array of rank 1 or 2 as 2-D (a vector becomes one column), keeping its shape.
fn read_matrix(p: &PathBuf, what: &str) -> Result<(Array2<f32>, Vec<usize>)> {
    let a = npy::read_f32_nd(p, what)?;
    let shape = a.shape().to_vec();
    let m = match shape.len() {
        1 => a.into_shape_with_order((shape[0], 1)).expect("shape"),
        2 => a.into_dimensionality().expect("rank 2"),
        _ => {
            return Err(crate::XentError::Shape(format!(
                "{}: {what} must have 1 or 2 dimensions, got {shape:?}",
                p.display()
            )))
        }
    };
    Ok((m, shape))
}

pub(crate) fn run(a: &BceArgs) -> Result<()> {
    check_out(&a.grad_out)?;
    check_out(&a.loss_out)?;
    let (input_path, from_probs) = match (&a.logits, &a.probs) {
        (Some(l), _) => (l, false),
        (None, Some(p)) => (p, true),
        (None, None) => unreachable!("clap requires --logits or --probs"),
    };
    let (x, shape) = read_matrix(input_path, if from_probs { "probabilities" } else { "logits" })?;
    let (y, yshape) = read_matrix(&a.targets, "targets")?;
    if yshape != shape {
        return Err(crate::XentError::Shape(format!("inputs are {shape:?} but targets are {yshape:?}")));
    }
    let weight = match &a.weight {
        Some(p) => {
            let (w, wshape) = read_matrix(p, "weight")?;
            Some(if wshape == shape && shape.len() == 2 || wshape.len() == 1 && shape.len() == 1 {
                BceWeight::PerElement(w)
            } else if wshape.len() == 1 {
                BceWeight::PerClass(w.column(0).to_owned())
            } else {
                return Err(crate::XentError::Shape(format!("weight {wshape:?} does not broadcast to {shape:?}")));
            })
        }
        None => None,
    };
    let pos_weight = a.pos_weight.as_ref().map(|p| npy::read_f32_1d(p, "pos_weight")).transpose()?;
    let reduction = a.reduction.into();
    let cfg = Bce { reduction, weight, pos_weight, grad: a.grad_out.is_some(), grad_scale: 1.0 };
    let backend = a.backend.open()?;
    let out = if from_probs {
        backend.bce(x.view(), y.view(), &cfg)?
    } else {
        backend.bce_with_logits(x.view(), y.view(), &cfg)?
    };
    if let (Some(p), Some(g)) = (&a.grad_out, &out.grad) {
        npy::write_f32(p, &shape, g.as_slice().expect("standard layout"))?;
    }
    if let Some(p) = &a.loss_out {
        let e = match &out.elem_loss {
            Some(e) => e.clone(),
            None => {
                // Element losses for any reduction: evaluate once more without reducing.
                let none = Bce { reduction: Reduction::None, grad: false, ..cfg.clone() };
                let o = if from_probs {
                    backend.bce(x.view(), y.view(), &none)?
                } else {
                    backend.bce_with_logits(x.view(), y.view(), &none)?
                };
                o.elem_loss.expect("element losses")
            }
        };
        npy::write_f32(p, &shape, e.as_slice().expect("standard layout"))?;
    }
    let loss = if reduction == Reduction::None { serde_json::Value::Null } else { num(out.loss) };
    let obj = Obj::default()
        .set("loss", loss)
        .set("elements", out.elements)
        .set("shape", shape)
        .set("input", if from_probs { "probs" } else { "logits" })
        .set("backend", backend.name())
        .set("reduction", format!("{:?}", a.reduction).to_lowercase());
    obj.print(a.json);
    Ok(())
}
