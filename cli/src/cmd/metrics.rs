//! `xent perplexity`, `xent calibrate` and `xent preference`.

use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::Value;
use xent::calibration::{fit_temperature_by, Calibration, CalibrationAcc};
use xent::parallel::{corpus::all_reduce_corpus, Collective};
use xent::preference::{preference, Preference};
use xent::sequence::CorpusEval;
use xent::{DType, Reduction, Result, XentError};

use super::{commit_f32, out_tensor};
use crate::blocks::{block_rows, BlockTargets, CeJob};
use crate::common::{nums, BackendArgs, Engine, Obj};
use crate::io::out::Outputs;
use crate::io::tensor::{read_f32_1d, read_targets};
use crate::io::{FileDType, TensorFile};

/// The arguments of `xent perplexity`.
#[derive(Args, Debug)]
pub struct PerplexityArgs {
    /// Logits [B*T, V] (rows in sequence order) or [B, T, V]: float32, float16 or bfloat16.
    #[arg(long, required_unless_present = "hidden", conflicts_with = "hidden")]
    logits: Option<PathBuf>,
    #[command(flatten)]
    linear: crate::cmd::linear::LinearArgs,
    /// Targets, int64 or int32 [B*T] or [B, T].
    #[arg(long)]
    targets: PathBuf,
    /// Counted tokens, bool/uint8 (or any integer) [B, T].
    #[arg(long, required_unless_present = "lengths", conflicts_with = "lengths")]
    mask: Option<PathBuf>,
    /// Counted prefix length of each sequence, integer [B].
    #[arg(long)]
    lengths: Option<PathBuf>,
    /// Sequences' rows per block streamed through memory (default: about 32 MiB of logits).
    #[arg(long)]
    block_rows: Option<usize>,
    #[command(flatten)]
    backend: BackendArgs,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

/// Opens logits of rank 2 or 3 as `[rows, V]` (rank 3: `[B, T, V]`, T returned).
fn open_rows(path: &Path) -> Result<(TensorFile, DType, usize, usize, Option<usize>)> {
    let t = TensorFile::open(path, "logits")?;
    t.want_rank(&[2, 3], "logits")?;
    let dtype = t.dtype.logits().ok_or_else(|| XentError::Format {
        path: path.display().to_string(),
        message: format!("logits must be float32, float16 or bfloat16, got {}", t.dtype.name()),
    })?;
    let v = *t.shape.last().expect("rank >= 2");
    let rows: usize = t.shape[..t.shape.len() - 1].iter().product();
    if v == 0 {
        return Err(XentError::Shape(format!("logits {:?} have no classes", t.shape)));
    }
    let seq = (t.shape.len() == 3).then(|| t.shape[1]);
    Ok((t, dtype, rows, v, seq))
}

/// One process's share of `perplexity`: the accumulator of its sequences
/// `first .. first + acc.sequences.len()` of `sequences`.
struct PplPart {
    acc: CorpusEval,
    first: usize,
    sequences: usize,
    dtype: DType,
    backend: String,
}

/// Runs `xent perplexity`: token NLL, per-sequence and corpus perplexity and top-k accuracy of
/// masked or length-delimited sequences, with whole sequences split across the ranks of `comm`
/// and their exact accumulators merged.
pub fn run_perplexity(a: &PerplexityArgs, comm: &dyn Collective) -> Result<()> {
    if a.linear.hidden.is_some() {
        crate::dist::single(comm, "perplexity --hidden")?;
    }
    // Each rank scores whole sequences; the accumulators merge exactly (bit for bit one
    // process's result), after every rank's failure, if any, is agreed.
    let local = perplexity_rows(a, comm.rank(), comm.size());
    let p = xent::parallel::agree(comm, local)?;
    let acc = all_reduce_corpus(comm, Ok(p.acc), p.first, p.sequences)?;
    if comm.rank() == 0 {
        report(&acc, p.sequences, p.dtype, &p.backend, comm.size(), a.json);
    }
    Ok(())
}

/// `perplexity` over rank `rank` of `ranks`'s share of the sequences.
fn perplexity_rows(a: &PerplexityArgs, rank: usize, ranks: usize) -> Result<PplPart> {
    // The scores come from logits streamed in blocks, or from hidden states and a weight.
    let linear = match a.linear.paths() {
        Some((h, w)) => Some(crate::cmd::linear::LinearInputs::read(h, w, a.linear.bias.as_deref(), &a.targets, None)?),
        None => None,
    };
    let logits_file = match (&linear, &a.logits) {
        (None, Some(p)) => Some(open_rows(p)?),
        _ => None,
    };
    let (dtype, rows, v) = match (&linear, &logits_file) {
        (Some(l), _) => (l.hidden.dtype(), l.rows(), l.classes()),
        (None, Some(f)) => (f.1, f.2, f.3),
        (None, None) => unreachable!("clap requires --logits or --hidden"),
    };
    let (targets, tshape) = read_targets(&a.targets, &[1, 2])?;
    if targets.len() != rows {
        return Err(XentError::Shape(format!(
            "--targets {}: {} targets for {rows} logit rows",
            a.targets.display(),
            targets.len()
        )));
    }
    // The batch's layout [B, T], where the logits ([B, T, V]) or the targets ([B, T]) give it;
    // the mask or lengths must then match it exactly. Flat logits and targets take B from them.
    let logits3 = logits_file.as_ref().filter(|f| f.0.shape.len() == 3).map(|f| (f.0.shape[0], f.0.shape[1]));
    let layout = match (logits3, tshape.as_slice()) {
        (Some((b3, t3)), [b, t]) if [*b, *t] != [b3, t3] => {
            return Err(XentError::Shape(format!(
                "--targets {} is [{b}, {t}] but the logits are [{b3}, {t3}, {v}]",
                a.targets.display()
            )))
        }
        (Some(bt), _) => Some(bt),
        (None, [b, t]) => Some((*b, *t)),
        (None, _) => None,
    };
    // Which tokens count, as a [B, T] mask.
    let (b, counted): (usize, Box<dyn Fn(usize, usize) -> bool>) = match (&a.mask, &a.lengths) {
        (Some(m), _) => {
            let t = TensorFile::open(m, "mask")?;
            t.want_rank(&[2], "mask")?;
            let (b, tt) = (t.shape[0], t.shape[1]);
            let expected = layout.map_or(b * tt == rows, |(lb, lt)| [lb, lt] == [b, tt]);
            if !expected {
                let want =
                    layout.map_or(format!("[B, T] with B * T = {rows} logit rows"), |(lb, lt)| format!("[{lb}, {lt}]"));
                return Err(XentError::Shape(format!(
                    "--mask {} is {:?} but the batch is {want}",
                    m.display(),
                    t.shape
                )));
            }
            let m = t.read_ints("mask")?;
            (b, Box::new(move |s, k| m[s * tt + k] != 0))
        }
        (None, Some(l)) => {
            let t = TensorFile::open(l, "lengths")?;
            t.want_rank(&[1], "lengths")?;
            let l = t.read_ints("lengths")?;
            let fits = layout.map_or(!l.is_empty() && rows.is_multiple_of(l.len()), |(lb, _)| lb == l.len());
            if !fits {
                let want = layout
                    .map_or(format!("B sequences of equal length ({rows} logit rows)"), |(lb, _)| format!("[{lb}]"));
                return Err(XentError::Shape(format!(
                    "--lengths {} is [{}] but the batch is {want}",
                    t.path.display(),
                    l.len()
                )));
            }
            (l.len(), Box::new(move |s, k| (k as i64) < l[s]))
        }
        (None, None) => unreachable!("clap requires --mask or --lengths"),
    };
    if b == 0 || !rows.is_multiple_of(b) {
        return Err(XentError::Shape(format!("{rows} logit rows are not {b} sequences of equal length")));
    }
    let seq_len = rows / b;
    if let Some(l) = &a.lengths {
        let lens = TensorFile::open(l, "lengths")?.read_ints("lengths")?;
        if let Some((i, &n)) = lens.iter().enumerate().find(|(_, &n)| n < 0 || n as usize > seq_len) {
            return Err(XentError::InvalidOption(format!(
                "--lengths {}: length {n} of sequence {i} is outside 0..={seq_len}",
                l.display()
            )));
        }
    }
    let t: Vec<i64> =
        (0..rows).map(|i| if counted(i / seq_len, i % seq_len) { targets[i] } else { CorpusEval::IGNORED }).collect();
    // This rank's whole sequences, and only their targets checked (it reads only their rows).
    let seqs = xent::parallel::row_range(b, rank, ranks);
    let span = seqs.start * seq_len..seqs.end * seq_len;
    let bad = t[span.clone()].iter().enumerate().find(|(_, &y)| y != CorpusEval::IGNORED && (y < 0 || y >= v as i64));
    if let Some((k, &target)) = bad {
        return Err(XentError::TargetOutOfRange { row: span.start + k, target, classes: v });
    }
    let cfg = CorpusEval::pass_config();
    let engine = a.backend.open()?;
    let mut acc = CorpusEval::default();
    if let Some(l) = &linear {
        let lcfg = xent::LinearCe::default()
            .with_ce(cfg)
            .with_grad_hidden(false)
            .with_grad_weight(false)
            .with_grad_bias(false);
        let inputs = crate::cmd::linear::LinearInputs { targets: ndarray::Array1::from(t.clone()), ..l.clone() };
        let o = inputs.run(&engine, &lcfg)?;
        let scored = xent::CeOutput::from(o);
        acc.add_scored(&scored, ndarray::ArrayView1::from(&t), seq_len)?;
        return Ok(PplPart { acc, first: 0, sequences: b, dtype, backend: engine.name().to_string() });
    }
    let logits = &logits_file.expect("logits").0;
    let job = CeJob {
        logits,
        span,
        classes: v,
        dtype,
        targets: BlockTargets::Classes(&t),
        cfg: &cfg,
        grad: None,
        block_rows: block_rows(rows, v, dtype.size(), a.block_rows, seq_len)?,
    };
    job.run(&engine, &mut |r, out| acc.add_scored(&out, ndarray::ArrayView1::from(&t[r]), seq_len))?;
    Ok(PplPart { acc, first: seqs.start, sequences: b, dtype, backend: engine.name().to_string() })
}

/// Prints a corpus's perplexity report.
fn report(acc: &CorpusEval, b: usize, dtype: DType, backend: &str, ranks: usize, json: bool) {
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
        .set("dtype", dtype.name())
        .set("backend", backend);
    let obj = if ranks > 1 { obj.set("ranks", ranks) } else { obj };
    obj.print(json);
}

/// The arguments of `xent calibrate`.
#[derive(Args, Debug)]
pub struct CalibrateArgs {
    /// Validation logits [N, V]: float32, float16 or bfloat16.
    #[arg(long)]
    logits: PathBuf,
    /// Class indices, int64 or int32 [N].
    #[arg(long)]
    targets: PathBuf,
    /// Rows with this target are ignored.
    #[arg(long, default_value_t = -100, allow_hyphen_values = true)]
    ignore_index: i64,
    /// Equal-width confidence bins for the expected calibration error (1..=100000).
    #[arg(long, default_value_t = 15)]
    bins: usize,
    /// Rows per block streamed through memory (default: about 32 MiB of logits).
    #[arg(long)]
    block_rows: Option<usize>,
    #[command(flatten)]
    backend: BackendArgs,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

/// One pass over a logits file at a temperature, into a calibration accumulator.
fn calibration_pass(job: &CeJob, engine: &Engine, bins: usize) -> Result<CalibrationAcc> {
    let mut acc = CalibrationAcc::new(bins)?;
    job.run(engine, &mut |_, out| {
        acc.add(&out);
        Ok(())
    })?;
    Ok(acc)
}

/// Runs `xent calibrate`: fits the temperature that minimises the validation NLL and reports the
/// expected calibration error before and after.
pub fn run_calibrate(a: &CalibrateArgs) -> Result<()> {
    if !(1..=100_000).contains(&a.bins) {
        return Err(XentError::InvalidOption(format!("--bins must be in 1..=100000, got {}", a.bins)));
    }
    let (logits, dtype, rows, v, seq) = open_rows(&a.logits)?;
    if seq.is_some() {
        return Err(XentError::Shape(format!("calibrate takes logits [N, V], got {:?}", logits.shape)));
    }
    let (t, _) = read_targets(&a.targets, &[1])?;
    if t.len() != rows {
        return Err(XentError::Shape(format!("logits have {rows} rows but targets have {}", t.len())));
    }
    xent::check::class_targets(&xent::Targets::I64(t.view()), v, a.ignore_index)?;
    let t = t.to_vec();
    let engine = a.backend.open()?;
    let br = block_rows(rows, v, dtype.size(), a.block_rows, 1)?;
    let fit = fit_temperature_by(&mut |temperature, gaps| {
        let cfg = CalibrationAcc::pass_config(temperature, gaps).with_ignore_index(a.ignore_index);
        let job = CeJob {
            logits: &logits,
            span: 0..rows,
            classes: v,
            dtype,
            targets: BlockTargets::Classes(&t),
            cfg: &cfg,
            grad: None,
            block_rows: br,
        };
        calibration_pass(&job, &engine, a.bins)
    })?;
    let table = |c: &Calibration| {
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
        .set("dtype", dtype.name())
        .set("backend", engine.name());
    obj.print(a.json);
    Ok(())
}

/// The arguments of `xent preference`.
#[derive(Args, Debug)]
pub struct PreferenceArgs {
    /// Scores of the chosen responses, float [N].
    #[arg(long)]
    chosen: PathBuf,
    /// Scores of the rejected responses, float [N].
    #[arg(long)]
    rejected: PathBuf,
    /// Margin subtracted from beta * (chosen - rejected).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    margin: f32,
    /// Scale of the difference (DPO's beta).
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
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

/// Runs `xent preference`: the Bradley-Terry loss of chosen and rejected score pairs, and
/// optionally its gradients.
pub fn run_preference(a: &PreferenceArgs) -> Result<()> {
    let outs: Vec<_> = [(&a.grad_chosen_out, "--grad-chosen-out"), (&a.grad_rejected_out, "--grad-rejected-out")]
        .into_iter()
        .filter_map(|(p, w)| p.as_deref().map(|p| (p, w)))
        .collect();
    Outputs::check(&outs, &[a.chosen.as_path(), a.rejected.as_path()], true)?;
    let c = read_f32_1d(&a.chosen, "chosen scores")?;
    let r = read_f32_1d(&a.rejected, "rejected scores")?;
    let grad = a.grad_chosen_out.is_some() || a.grad_rejected_out.is_some();
    let cfg =
        Preference::default().with_beta(a.beta).with_margin(a.margin).with_reduction(Reduction::Mean).with_grad(grad);
    let gc = out_tensor(a.grad_chosen_out.as_deref(), FileDType::F32, &[c.len()], "gradient")?;
    let gr = out_tensor(a.grad_rejected_out.as_deref(), FileDType::F32, &[c.len()], "gradient")?;
    let engine = a.backend.open()?;
    let out = preference(engine.backend(), c.view(), r.view(), &cfg)?;
    commit_f32(gc, out.grad_chosen.as_ref().and_then(|g| g.as_slice()))?;
    commit_f32(gr, out.grad_rejected.as_ref().and_then(|g| g.as_slice()))?;
    let obj = Obj::default()
        .num("loss", out.loss)
        .num("accuracy", out.accuracy)
        .set("pairs", c.len())
        .num("margin", a.margin as f64)
        .num("beta", a.beta as f64)
        .set("backend", engine.name());
    obj.print(a.json);
    Ok(())
}
