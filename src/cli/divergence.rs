//! `xent distill` and `xent dist`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use ndarray::Array2;

use super::json::{num, Obj};
use super::{check_out, BackendArgs};
use crate::error::{Result, XentError};
use crate::{npy, Distill, DistillMode};

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ModeArg {
    /// KL(teacher || student).
    Kl,
    /// KL(student || teacher).
    ReverseKl,
    /// Generalised Jensen-Shannon with --beta.
    Jsd,
}

#[derive(Args, Debug)]
pub(crate) struct DistillArgs {
    /// Student logits, float32 [N, V].
    #[arg(long)]
    student: PathBuf,
    /// Teacher logits, float32 [N, V].
    #[arg(long)]
    teacher: PathBuf,
    /// Temperature dividing both logits.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Which divergence.
    #[arg(long, value_enum, default_value = "kl")]
    mode: ModeArg,
    /// JSD mixing weight in [0, 1] (--mode jsd).
    #[arg(long, default_value_t = 0.5)]
    beta: f32,
    #[command(flatten)]
    backend: BackendArgs,
    /// Write d(loss)/d(student logits), float32 [N, V].
    #[arg(long)]
    grad_out: Option<PathBuf>,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run_distill(a: &DistillArgs) -> Result<()> {
    check_out(&a.grad_out)?;
    let s = npy::read_f32_2d(&a.student, "student logits")?;
    let t = npy::read_f32_2d(&a.teacher, "teacher logits")?;
    let mode = match a.mode {
        ModeArg::Kl => DistillMode::Kl,
        ModeArg::ReverseKl => DistillMode::ReverseKl,
        ModeArg::Jsd => DistillMode::Jsd { beta: a.beta },
    };
    let cfg = Distill { temperature: a.temperature, mode, grad: a.grad_out.is_some(), grad_scale: 1.0 };
    cfg.validate()?;
    crate::api::check::same_rows(s.dim(), t.dim(), "student and teacher logits")?;
    let backend = a.backend.open()?;
    let out = backend.distill(s.view(), t.view(), &cfg)?;
    if let (Some(p), Some(g)) = (&a.grad_out, &out.grad) {
        npy::write_f32(p, &[s.nrows(), s.ncols()], g.as_slice().expect("standard layout"))?;
    }
    let obj = Obj::default()
        .num("loss", out.loss)
        .set("rows", s.nrows())
        .set("classes", s.ncols())
        .set("mode", format!("{:?}", a.mode).to_lowercase())
        .num("temperature", a.temperature as f64)
        .set("backend", backend.name());
    let obj = if a.mode == ModeArg::Jsd { obj.num("beta", a.beta as f64) } else { obj };
    obj.print(a.json);
    Ok(())
}

#[derive(Args, Debug)]
pub(crate) struct DistArgs {
    /// Distribution p (rows), float32 or float64 [N, V].
    #[arg(long)]
    p: PathBuf,
    /// Distribution q (rows), float32 or float64 [N, V].
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

fn read_real_2d(p: &PathBuf, what: &str) -> Result<Array2<f64>> {
    let a = npy::read_f64(p)?;
    if a.ndim() != 2 {
        return Err(XentError::Shape(format!("{}: {what} must have 2 dimensions, got {:?}", p.display(), a.shape())));
    }
    Ok(a.into_dimensionality().expect("rank 2"))
}

pub(crate) fn run_dist(a: &DistArgs) -> Result<()> {
    let p = read_real_2d(&a.p, "p")?;
    let q = read_real_2d(&a.q, "q")?;
    crate::api::check::same_rows(p.dim(), q.dim(), "p and q")?;
    if !a.logits {
        crate::api::check::probability_rows(p.view(), "p")?;
        crate::api::check::probability_rows(q.view(), "q")?;
    }
    let backend = a.backend.open()?;
    let m = if a.logits {
        backend.measures_from_logits(p.mapv(|v| v as f32).view(), q.mapv(|v| v as f32).view())?
    } else {
        backend.measures(p.view(), q.view())?
    };
    let arr = |v: &ndarray::Array1<f64>| serde_json::Value::Array(v.iter().map(|&x| num(x)).collect());
    let obj = Obj::default()
        .set("entropy", arr(&m.entropy))
        .set("cross_entropy", arr(&m.cross_entropy))
        .set("kl", arr(&m.kl))
        .set("js", arr(&m.js))
        .set("rows", p.nrows())
        .set("backend", backend.name());
    obj.print(a.json);
    Ok(())
}
