//! `xent perplexity`, `xent calibrate` and `xent preference`.

use std::path::PathBuf;

use clap::Args;
use serde_json::Value;

use super::json::{num, Obj};
use super::{check_out, BackendArgs};
use crate::api::calibration::fit_temperature;
use crate::api::preference::{preference, Preference};
use crate::api::sequence::{CorpusEval, SeqMask};
use crate::error::{Result, XentError};
use crate::{npy, Reduction};

fn nums(v: impl IntoIterator<Item = f64>) -> Value {
    Value::Array(v.into_iter().map(num).collect())
}

#[derive(Args, Debug)]
pub(crate) struct PerplexityArgs {
    /// Logits, float32 [B*T, V] (rows in sequence order) or [B, T, V].
    #[arg(long)]
    logits: PathBuf,
    /// Targets, int64 or int32 [B*T] or [B, T].
    #[arg(long)]
    targets: PathBuf,
    /// Counted tokens, uint8/bool (or any integer) [B, T].
    #[arg(long, required_unless_present = "lengths", conflicts_with = "lengths")]
    mask: Option<PathBuf>,
    /// Counted prefix length of each sequence, integer [B].
    #[arg(long)]
    lengths: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendArgs,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run_perplexity(a: &PerplexityArgs) -> Result<()> {
    let x = npy::read_f32_nd(&a.logits, "logits")?;
    let shape = x.shape().to_vec();
    let v = *shape.last().unwrap_or(&0);
    let rows: usize = shape[..shape.len().saturating_sub(1)].iter().product();
    if shape.len() < 2 || shape.len() > 3 || v == 0 {
        return Err(XentError::Shape(format!("logits must be [B*T, V] or [B, T, V], got {shape:?}")));
    }
    let x = x.into_shape_with_order((rows, v)).expect("same size");
    let t = npy::read_f64(&a.targets)?;
    if t.len() != rows {
        return Err(XentError::Shape(format!("{} targets for {rows} logit rows", t.len())));
    }
    let targets: ndarray::Array1<i64> = t.iter().map(|&y| y as i64).collect();
    let (b, mask_arr, lengths) = match (&a.mask, &a.lengths) {
        (Some(m), _) => {
            let m = npy::read_f64(m)?;
            if m.ndim() != 2 {
                return Err(XentError::Shape(format!("mask must be [B, T], got {:?}", m.shape())));
            }
            let m = m.into_dimensionality::<ndarray::Ix2>().expect("rank 2").mapv(|v| (v != 0.0) as u8);
            (m.nrows(), Some(m), None)
        }
        (None, Some(l)) => {
            let l: ndarray::Array1<i64> = npy::read_f64(l)?.iter().map(|&v| v as i64).collect();
            (l.len(), None, Some(l))
        }
        (None, None) => unreachable!("clap requires --mask or --lengths"),
    };
    if b == 0 || !rows.is_multiple_of(b) {
        return Err(XentError::Shape(format!("{rows} logit rows are not {b} sequences of equal length")));
    }
    let seq_len = rows / b;
    let mask = match (&mask_arr, &lengths) {
        (Some(m), _) => SeqMask::Mask(m.view()),
        (None, Some(l)) => SeqMask::Lengths(l.view()),
        _ => unreachable!(),
    };
    let backend = a.backend.open()?;
    let mut acc = CorpusEval::default();
    acc.add_batch(backend.as_ref(), x.view(), targets.view(), seq_len, mask)?;
    let r = acc.finish();
    let obj = Obj::default()
        .num("corpus_nll", r.corpus_nll)
        .num("corpus_ppl", r.corpus_ppl)
        .num("bits_per_token", r.bits_per_token)
        .set("ppl_per_sequence", nums(r.ppl_per_sequence.iter().copied()))
        .set("nll_per_sequence", nums(r.nll_per_sequence.iter().copied()))
        .set("tokens", r.tokens)
        .set("sequences", b)
        .num("accuracy", r.top1)
        .num("top5_accuracy", r.top5)
        .set("backend", backend.name());
    obj.print(a.json);
    Ok(())
}

#[derive(Args, Debug)]
pub(crate) struct CalibrateArgs {
    /// Validation logits, float32 [N, V].
    #[arg(long)]
    logits: PathBuf,
    /// Class indices, int64 or int32 [N] (-100 = ignored).
    #[arg(long)]
    targets: PathBuf,
    /// Equal-width confidence bins for the expected calibration error.
    #[arg(long, default_value_t = 15)]
    bins: usize,
    #[command(flatten)]
    backend: BackendArgs,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run_calibrate(a: &CalibrateArgs) -> Result<()> {
    let x = npy::read_f32_2d(&a.logits, "logits")?;
    let t = npy::read_targets(&a.targets)?;
    if a.bins == 0 {
        return Err(XentError::InvalidOption("--bins must be at least 1".into()));
    }
    crate::api::check::ce_inputs(x.nrows(), x.ncols(), t.len(), &Default::default())?;
    let backend = a.backend.open()?;
    let fit = fit_temperature(backend.as_ref(), x.view(), t.view().into(), a.bins)?;
    let table = |c: &crate::api::calibration::Calibration| {
        Value::Array(
            c.bins
                .iter()
                .map(|b| {
                    Obj::default()
                        .num("lower", b.lower)
                        .num("upper", b.upper)
                        .set("count", b.count)
                        .num("confidence", b.confidence)
                        .num("accuracy", b.accuracy)
                        .0
                        .into()
                })
                .collect(),
        )
    };
    let obj = Obj::default()
        .num("temperature", fit.temperature)
        .num("nll_before", fit.before.nll)
        .num("nll_after", fit.after.nll)
        .num("ece_before", fit.before.ece)
        .num("ece_after", fit.after.ece)
        .num("accuracy", fit.before.accuracy)
        .set("passes", fit.passes)
        .set("bins", a.bins)
        .set("reliability_before", table(&fit.before))
        .set("reliability_after", table(&fit.after))
        .set("backend", backend.name());
    obj.print(a.json);
    Ok(())
}

#[derive(Args, Debug)]
pub(crate) struct PreferenceArgs {
    /// Scores of the chosen responses, float32 [N].
    #[arg(long)]
    chosen: PathBuf,
    /// Scores of the rejected responses, float32 [N].
    #[arg(long)]
    rejected: PathBuf,
    /// Margin subtracted from beta * (chosen - rejected).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    margin: f32,
    /// Scale of the difference (DPO's beta).
    #[arg(long, default_value_t = 1.0)]
    beta: f32,
    /// Write d(loss)/d(chosen), float32 [N].
    #[arg(long)]
    grad_chosen_out: Option<PathBuf>,
    /// Write d(loss)/d(rejected), float32 [N].
    #[arg(long)]
    grad_rejected_out: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendArgs,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run_preference(a: &PreferenceArgs) -> Result<()> {
    check_out(&a.grad_chosen_out)?;
    check_out(&a.grad_rejected_out)?;
    let c = npy::read_f32_1d(&a.chosen, "chosen scores")?;
    let r = npy::read_f32_1d(&a.rejected, "rejected scores")?;
    let grad = a.grad_chosen_out.is_some() || a.grad_rejected_out.is_some();
    let cfg = Preference { beta: a.beta, margin: a.margin, reduction: Reduction::Mean, grad };
    let backend = a.backend.open()?;
    let out = preference(backend.as_ref(), c.view(), r.view(), &cfg)?;
    for (p, g) in [(&a.grad_chosen_out, &out.grad_chosen), (&a.grad_rejected_out, &out.grad_rejected)] {
        if let (Some(p), Some(g)) = (p, g) {
            npy::write_f32(p, &[g.len()], g.as_slice().expect("contiguous"))?;
        }
    }
    let obj = Obj::default()
        .num("loss", out.loss)
        .num("accuracy", out.accuracy)
        .set("pairs", c.len())
        .num("margin", a.margin as f64)
        .num("beta", a.beta as f64)
        .set("backend", backend.name());
    obj.print(a.json);
    Ok(())
}
