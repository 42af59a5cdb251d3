//! `xent eval` and `xent log-softmax`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use super::json::{num, Obj};
use super::{check_out, path_str, BackendArgs};
use crate::error::{Result, XentError};
use crate::{npy, CrossEntropy, GradMode, Reduction, SoftmaxKind};

#[derive(ValueEnum, Clone, Copy, Debug)]
pub(crate) enum ReductionArg {
    Mean,
    Sum,
    None,
}

impl From<ReductionArg> for Reduction {
    fn from(r: ReductionArg) -> Reduction {
        match r {
            ReductionArg::Mean => Reduction::Mean,
            ReductionArg::Sum => Reduction::Sum,
            ReductionArg::None => Reduction::None,
        }
    }
}

#[derive(Args, Debug)]
pub(crate) struct EvalArgs {
    /// Logits, float32 [N, V].
    #[arg(long)]
    logits: PathBuf,
    /// Class indices, int64 or int32 [N].
    #[arg(long, required_unless_present = "target_probs", conflicts_with = "target_probs")]
    targets: Option<PathBuf>,
    /// Target probabilities, float32 [N, V] (instead of --targets).
    #[arg(long)]
    target_probs: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendArgs,
    /// How row losses are combined.
    #[arg(long, value_enum, default_value = "mean")]
    reduction: ReductionArg,
    /// Rows with this target are ignored.
    #[arg(long, default_value_t = -100, allow_negative_numbers = true)]
    ignore_index: i64,
    /// Per-class weights, float32 [V].
    #[arg(long)]
    class_weight: Option<PathBuf>,
    /// Per-sample weights, float32 [N].
    #[arg(long)]
    sample_weight: Option<PathBuf>,
    /// Label smoothing in [0, 1].
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f32,
    /// z-loss coefficient (adds s * lse^2 per counted row).
    #[arg(long, default_value_t = 0.0)]
    z_loss: f32,
    /// Soft-cap the logits: c * tanh(x / c).
    #[arg(long)]
    softcap: Option<f32>,
    /// Divide the logits by this first.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Write d(loss)/d(logits), float32 [N, V] (for `none`: of the sum of row losses).
    #[arg(long)]
    grad_out: Option<PathBuf>,
    /// Write per-row losses, float32 [N] (0 for ignored rows).
    #[arg(long)]
    loss_out: Option<PathBuf>,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run_eval(a: &EvalArgs) -> Result<()> {
    check_out(&a.grad_out)?;
    check_out(&a.loss_out)?;
    let logits = npy::read_f32_2d(&a.logits, "logits")?;
    let (n, v) = logits.dim();
    let class_weight = a.class_weight.as_ref().map(|p| npy::read_f32_1d(p, "class weights")).transpose()?;
    let sample_weight = a.sample_weight.as_ref().map(|p| npy::read_f32_1d(p, "sample weights")).transpose()?;
    let reduction = a.reduction.into();
    let cfg = CrossEntropy {
        reduction,
        ignore_index: a.ignore_index,
        label_smoothing: a.label_smoothing,
        class_weight,
        sample_weight,
        z_loss: a.z_loss,
        softcap: a.softcap,
        temperature: a.temperature,
        grad: if a.grad_out.is_some() { GradMode::Separate } else { GradMode::Off },
        grad_scale: 1.0,
        per_row: a.loss_out.is_some(),
        ranks: true,
        gaps: false,
    };
    // Shape and option errors before opening a device.
    let out = match (&a.targets, &a.target_probs) {
        (Some(t), _) => {
            let targets = npy::read_targets(t)?;
            crate::api::check::ce_inputs(n, v, targets.len(), &cfg)?;
            let backend = a.backend.open()?;
            (backend.cross_entropy(logits.view(), targets.view().into(), &cfg)?, backend.name())
        }
        (None, Some(p)) => {
            let probs = npy::read_f32_2d(p, "target probabilities")?;
            crate::api::check::soft_inputs((n, v), probs.view(), &cfg)?;
            let backend = a.backend.open()?;
            (backend.cross_entropy_soft(logits.view(), probs.view(), &cfg)?, backend.name())
        }
        (None, None) => unreachable!("clap requires --targets or --target-probs"),
    };
    let (out, backend_name) = out;
    if let (Some(p), Some(g)) = (&a.grad_out, &out.grad) {
        npy::write_f32(p, &[n, v], g.as_slice().expect("standard layout"))?;
    }
    if let (Some(p), Some(r)) = (&a.loss_out, &out.row_loss) {
        npy::write_f32(p, &[n], r.as_slice().expect("standard layout"))?;
    }
    let loss = if reduction == Reduction::None { serde_json::Value::Null } else { num(out.loss) };
    let obj = Obj::default()
        .set("loss", loss)
        .set("rows", n)
        .set("classes", v)
        .set("counted", out.counted)
        .num("weight_sum", out.weight_sum)
        .set("backend", backend_name)
        .set("reduction", format!("{:?}", a.reduction).to_lowercase());
    let obj = if reduction == Reduction::Mean { obj.num("perplexity", out.loss.exp()) } else { obj };
    // Top-1 accuracy over counted rows (class-index targets), from the same pass.
    let obj = match (a.targets.is_some(), out.accuracy(1)) {
        (true, Some(acc)) => obj.num("accuracy", acc),
        _ => obj,
    };
    obj.print(a.json);
    Ok(())
}

#[derive(Args, Debug)]
pub(crate) struct LogSoftmaxArgs {
    /// Logits, float32 [N, V].
    #[arg(long)]
    logits: PathBuf,
    /// Output, float32 [N, V].
    #[arg(long)]
    out: PathBuf,
    /// Softmax instead of log-softmax.
    #[arg(long)]
    softmax: bool,
    #[command(flatten)]
    backend: BackendArgs,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run_log_softmax(a: &LogSoftmaxArgs) -> Result<()> {
    check_out(&Some(a.out.clone()))?;
    let logits = npy::read_f32_2d(&a.logits, "logits")?;
    let (n, v) = logits.dim();
    if v == 0 {
        return Err(XentError::Shape(format!("{}: logits [{n}, 0] have no classes", path_str(&a.logits))));
    }
    let backend = a.backend.open()?;
    let kind = if a.softmax { SoftmaxKind::Softmax } else { SoftmaxKind::LogSoftmax };
    let out = backend.log_softmax(logits.view(), kind)?;
    npy::write_f32(&a.out, &[n, v], out.as_slice().expect("standard layout"))?;
    let obj = Obj::default()
        .set("rows", n)
        .set("classes", v)
        .set("op", if a.softmax { "softmax" } else { "log_softmax" })
        .set("backend", backend.name())
        .set("out", path_str(&a.out));
    if a.json {
        println!("{}", obj.line());
    } else {
        println!("wrote {} [{n}, {v}] to {}", if a.softmax { "softmax" } else { "log-softmax" }, path_str(&a.out));
    }
    Ok(())
}
