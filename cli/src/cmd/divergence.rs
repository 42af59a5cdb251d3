//! `xent distill` and `xent dist`.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use ndarray::Array2;
use xent::{Distill, DistillMode, Reduction, Result, Tensor2};

use super::{commit_f32, out_tensor};
use crate::common::{num, nums, BackendArgs, Obj, ReductionArg};
use crate::io::out::Outputs;
use crate::io::{FileDType, TensorFile};

/// The divergence `xent distill --mode` minimises.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeArg {
    /// KL(teacher || student).
    Kl,
    /// KL(student || teacher).
    ReverseKl,
    /// Generalised Jensen-Shannon with --beta.
    Jsd,
}

/// The arguments of `xent distill`.
#[derive(Args, Debug)]
pub struct DistillArgs {
    /// Student logits [N, V]: float32, float16 or bfloat16.
    #[arg(long)]
    student: PathBuf,
    /// Teacher logits [N, V]: float32, float16 or bfloat16.
    #[arg(long)]
    teacher: PathBuf,
    /// Temperature dividing both logits.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    temperature: f32,
    /// Which divergence.
    #[arg(long, value_enum, default_value = "kl")]
    mode: ModeArg,
    /// JSD mixing weight in [0, 1] (--mode jsd).
    #[arg(long, default_value_t = 0.5, allow_hyphen_values = true)]
    beta: f32,
    /// How rows are combined: `mean` is PyTorch's `batchmean` (the sum over rows divided by
    /// N), `sum` the sum, `none` one loss per row (see --loss-out).
    #[arg(long, value_enum, default_value = "mean")]
    reduction: ReductionArg,
    #[command(flatten)]
    backend: BackendArgs,
    /// Write d(loss)/d(student logits), float32 [N, V] (for `none`: of the sum).
    #[arg(long)]
    grad_out: Option<PathBuf>,
    /// Write the per-row losses T^2 D_n, float32 [N].
    #[arg(long)]
    loss_out: Option<PathBuf>,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

/// A whole 2-D float tensor in its own dtype.
pub fn read_logits(p: &Path, what: &str) -> Result<Tensor2> {
    let t = TensorFile::open(p, what)?;
    t.want_rank(&[2], what)?;
    let dtype = t.dtype.logits().ok_or_else(|| xent::XentError::Format {
        path: p.display().to_string(),
        message: format!("{what} must be float32, float16 or bfloat16, got {}", t.dtype.name()),
    })?;
    crate::blocks::read_block(&t, dtype, 0..t.shape[0], t.shape[1])
}

/// Runs `xent distill`: the distillation loss of student logits against teacher logits at a
/// temperature, and optionally its gradient w.r.t. the student logits.
pub fn run_distill(a: &DistillArgs) -> Result<()> {
    let outs: Vec<_> = [(&a.grad_out, "--grad-out"), (&a.loss_out, "--loss-out")]
        .into_iter()
        .filter_map(|(p, flag)| p.as_deref().map(|p| (p, flag)))
        .collect();
    Outputs::check(&outs, &[a.student.as_path(), a.teacher.as_path()], true)?;
    let s = read_logits(&a.student, "student logits")?;
    let t = read_logits(&a.teacher, "teacher logits")?;
    let mode = match a.mode {
        ModeArg::Kl => DistillMode::Kl,
        ModeArg::ReverseKl => DistillMode::ReverseKl,
        ModeArg::Jsd => DistillMode::Jsd { beta: a.beta },
    };
    let reduction = Reduction::from(a.reduction);
    let cfg = Distill::default()
        .with_temperature(a.temperature)
        .with_mode(mode)
        .with_grad_scale(1.0)
        .with_reduction(reduction);
    cfg.validate()?;
    xent::check::same_rows(s.dim(), t.dim(), "student and teacher logits")?;
    let (n, v) = s.dim();
    let grad_out = out_tensor(a.grad_out.as_deref(), FileDType::F32, &[n, v], "gradient")?;
    let loss_out = out_tensor(a.loss_out.as_deref(), FileDType::F32, &[n], "row losses")?;
    let engine = a.backend.open()?;
    let out = engine.backend().distill(s.view(), t.view(), &cfg, grad_out.is_some())?;
    commit_f32(grad_out, out.grad.as_ref().and_then(|g| g.as_slice()))?;
    let rows = cfg.row_losses(&out);
    commit_f32(loss_out, Some(&rows[..]))?;
    let loss = if reduction == Reduction::None { serde_json::Value::Null } else { num(out.loss) };
    let obj = Obj::default()
        .set("loss", loss)
        .set("reduction", a.reduction.name())
        .set("rows", n)
        .set("classes", v)
        .set("mode", format!("{:?}", a.mode).to_lowercase())
        .num("temperature", a.temperature as f64)
        .set("backend", engine.name());
    let obj = if a.mode == ModeArg::Jsd { obj.num("beta", a.beta as f64) } else { obj };
    obj.print(a.json);
    Ok(())
}

/// The arguments of `xent dist`.
#[derive(Args, Debug)]
pub struct DistArgs {
    /// Distribution p (rows), float [N, V].
    #[arg(long)]
    p: PathBuf,
    /// Distribution q (rows), float [N, V].
    #[arg(long)]
    q: PathBuf,
    /// The inputs are logits: measure softmax(p) and softmax(q).
    #[arg(long)]
    logits: bool,
    #[command(flatten)]
    backend: BackendArgs,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

fn read_real_2d(p: &Path, what: &str) -> Result<Array2<f64>> {
    let t = TensorFile::open(p, what)?;
    t.want_rank(&[2], what)?;
    let v = t.read_f64(what)?;
    Ok(Array2::from_shape_vec((t.shape[0], t.shape[1]), v).expect("shape matches data"))
}

/// Runs `xent dist`: entropy, cross-entropy, KL and Jensen-Shannon divergence per row of two
/// distributions (probability rows, or the softmaxes of logits).
pub fn run_dist(a: &DistArgs) -> Result<()> {
    let engine;
    let m = if a.logits {
        let (p, q) = (read_logits(&a.p, "p logits")?, read_logits(&a.q, "q logits")?);
        xent::check::same_rows(p.dim(), q.dim(), "p and q")?;
        engine = a.backend.open()?;
        engine.backend().measures_from_logits(p.view(), q.view())?
    } else {
        let (p, q) = (read_real_2d(&a.p, "p")?, read_real_2d(&a.q, "q")?);
        xent::check::same_rows(p.dim(), q.dim(), "p and q")?;
        xent::check::probability_rows(p.view(), "p")?;
        xent::check::probability_rows(q.view(), "q")?;
        engine = a.backend.open()?;
        engine.backend().measures(p.view(), q.view())?
    };
    let obj = Obj::default()
        .set("entropy", nums(m.entropy.iter().copied()))
        .set("cross_entropy", nums(m.cross_entropy.iter().copied()))
        .set("kl", nums(m.kl.iter().copied()))
        .set("js", nums(m.js.iter().copied()))
        .set("rows", m.entropy.len())
        .set("backend", engine.name());
    obj.print(a.json);
    Ok(())
}
