//! `xent eval` and `xent log-softmax`.

use std::path::{Path, PathBuf};

use clap::Args;
use xent::parallel::Collective;
use xent::{check, CrossEntropy, DType, Reduction, Result, SoftmaxKind, Targets, Totals, XentError};

use super::linear::LinearArgs;
use super::out_tensor;
use crate::blocks::{block_rows, BlockTargets, CeJob};
use crate::common::{emitln, non_negative, num, BackendArgs, Obj, ReductionArg};
use crate::io::out::Outputs;
use crate::io::tensor::{read_targets, read_weights};
use crate::io::{FileDType, TensorFile};

/// The arguments of `xent eval`.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  xent eval --logits logits.npy --targets targets.npy
  xent eval --logits logits.safetensors:logits --targets t.npy --label-smoothing 0.1 --grad-out g.safetensors --grad-dtype bf16
  xent eval --hidden h.npy --weight w.npy --targets t.npy --grad-weight-out gw.npy --json
  mpirun -n 4 xent eval --logits huge.npy --targets t.npy --backend cpu")]
pub struct EvalArgs {
    /// Logits [N, V]: float32, float16 or bfloat16; .npy, .safetensors or file.safetensors:NAME.
    #[arg(long, required_unless_present = "hidden", conflicts_with = "hidden", help_heading = "Inputs")]
    logits: Option<PathBuf>,
    #[command(flatten)]
    linear: LinearArgs,
    /// Write d(loss)/d(hidden) [N, D] (with --hidden; dtype from --grad-dtype).
    #[arg(long, requires = "hidden", help_heading = "Outputs")]
    grad_hidden_out: Option<PathBuf>,
    /// Write d(loss)/d(weight) [V, D] (with --hidden; dtype from --grad-dtype).
    #[arg(long, requires = "hidden", help_heading = "Outputs")]
    grad_weight_out: Option<PathBuf>,
    /// Write d(loss)/d(bias), float32 [V] (with --bias).
    #[arg(long, requires = "bias", help_heading = "Outputs")]
    grad_bias_out: Option<PathBuf>,
    /// Class indices, int64 or int32 [N].
    #[arg(long, required_unless_present = "target_probs", conflicts_with = "target_probs", help_heading = "Inputs")]
    targets: Option<PathBuf>,
    /// Target probabilities, float32 [N, V] (instead of --targets).
    #[arg(long, help_heading = "Inputs")]
    target_probs: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendArgs,
    /// How row losses are combined.
    #[arg(long, value_enum, default_value = "mean", help_heading = "Loss")]
    reduction: ReductionArg,
    /// Rows with this target are ignored.
    #[arg(long, default_value_t = -100, allow_hyphen_values = true, help_heading = "Loss")]
    ignore_index: i64,
    /// Per-class weights, float32 [V].
    #[arg(long, help_heading = "Loss")]
    class_weight: Option<PathBuf>,
    /// Per-sample weights, float32 [N].
    #[arg(long, help_heading = "Loss")]
    sample_weight: Option<PathBuf>,
    /// Label smoothing in [0, 1].
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true, help_heading = "Loss")]
    label_smoothing: f32,
    /// z-loss coefficient (adds s * lse^2 per counted row).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true, help_heading = "Loss")]
    z_loss: f32,
    /// Soft-cap the logits: c * tanh(x / c).
    #[arg(long, allow_hyphen_values = true, help_heading = "Loss")]
    softcap: Option<f32>,
    /// Divide the logits by this first.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true, help_heading = "Loss")]
    temperature: f32,
    /// Write d(loss)/d(logits) [N, V] (.npy or .safetensors; for `none`: of the sum of row losses).
    #[arg(long, help_heading = "Outputs")]
    grad_out: Option<PathBuf>,
    /// The gradient's dtype: f32, or f16/bf16 rounded once from f32 (bf16 needs .safetensors).
    #[arg(long, value_enum, default_value = "f32", help_heading = "Outputs")]
    grad_dtype: GradDType,
    /// Write per-row losses, float32 [N] (0 for ignored rows).
    #[arg(long, help_heading = "Outputs")]
    loss_out: Option<PathBuf>,
    /// Rows per block streamed through memory (default: about 32 MiB of logits).
    #[arg(long, help_heading = "Backend")]
    block_rows: Option<usize>,
    /// Print one JSON object on the last line.
    #[arg(long, help_heading = "Outputs")]
    json: bool,
}

/// Opens a 2-D float logits tensor.
pub fn open_logits(path: &Path) -> Result<(TensorFile, DType)> {
    let t = TensorFile::open(path, "logits")?;
    t.want_rank(&[2], "logits")?;
    let dtype = t.dtype.logits().ok_or_else(|| XentError::Format {
        path: path.display().to_string(),
        message: format!("logits must be float32, float16 or bfloat16, got {}", t.dtype.name()),
    })?;
    Ok((t, dtype))
}

/// The dtype of a written gradient.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradDType {
    /// float32, as computed.
    F32,
    /// float16, rounded once to nearest even from f32.
    F16,
    /// bfloat16, rounded once to nearest even from f32 (safetensors only: .npy has no bf16).
    Bf16,
}

impl From<GradDType> for FileDType {
    fn from(d: GradDType) -> FileDType {
        match d {
            GradDType::F32 => FileDType::F32,
            GradDType::F16 => FileDType::F16,
            GradDType::Bf16 => FileDType::BF16,
        }
    }
}

/// What one process of `eval` found in its rows: loss sum, counted rows, weight sum, top-1
/// hits (summed over ranks), and what the report names.
struct EvalPart {
    sums: [f64; 4],
    n: usize,
    v: usize,
    dtype: DType,
    backend: String,
}

/// Runs `xent eval`: cross-entropy of a logits file (or of hidden states and a weight) streamed in
/// row blocks, with the rows split across the ranks of `comm`; prints the loss and writes the
/// requested gradient and per-row outputs.
pub fn run_eval(a: &EvalArgs, comm: &dyn Collective) -> Result<()> {
    if let Some((h, w)) = a.linear.paths() {
        crate::dist::single(comm, "eval --hidden")?;
        return run_linear_eval(a, h, w);
    }
    if comm.size() > 1 && (a.grad_out.is_some() || a.loss_out.is_some()) {
        return Err(XentError::InvalidOption(
            "--grad-out and --loss-out are written by one process; run them without mpirun".into(),
        ));
    }
    // Each rank scores its share of the rows; every failure is agreed before the one merge.
    let local = eval_rows(a, comm.rank(), comm.size());
    let mut part = xent::parallel::agree(comm, local)?;
    comm.all_reduce_sum(&mut part.sums)?;
    let mut rss = [crate::common::peak_rss() as f64];
    comm.all_reduce_max(&mut rss)?;
    let [mut loss, counted, weight_sum, hits] = part.sums;
    let (n, v, reduction) = (part.n, part.v, Reduction::from(a.reduction));
    if n == 0 && reduction == Reduction::Mean {
        loss = f64::NAN;
    }
    if comm.rank() != 0 {
        return Ok(());
    }
    let obj = Obj::default()
        .set("loss", if reduction == Reduction::None { serde_json::Value::Null } else { num(loss) })
        .set("rows", n)
        .set("classes", v)
        .set("counted", counted as u64)
        .num("weight_sum", weight_sum)
        .set("dtype", part.dtype.name())
        .set("backend", part.backend)
        .set("reduction", a.reduction.name())
        .set("peak_rss_bytes", rss[0] as u64);
    let obj = if comm.size() > 1 { obj.set("ranks", comm.size()) } else { obj };
    let obj = if reduction == Reduction::Mean { obj.num("perplexity", loss.exp()) } else { obj };
    // Top-1 accuracy over counted rows (class-index targets), from the same pass.
    let obj = if a.targets.is_some() {
        obj.num("accuracy", if counted == 0.0 { f64::NAN } else { hits / counted })
    } else {
        obj
    };
    obj.print(a.json);
    Ok(())
}

/// `eval` over rank `rank` of `ranks`'s share of the rows (all of them in one process).
fn eval_rows(a: &EvalArgs, rank: usize, ranks: usize) -> Result<EvalPart> {
    let logits_path = a.logits.as_ref().expect("clap requires --logits or --hidden");
    let (logits, dtype) = open_logits(logits_path)?;
    let (n, v) = (logits.shape[0], logits.shape[1]);
    let gfile = FileDType::from(a.grad_dtype);
    let mut inputs: Vec<&Path> = vec![logits_path];
    inputs.extend(a.targets.iter().map(PathBuf::as_path));
    inputs.extend(a.target_probs.iter().map(PathBuf::as_path));
    let outs: Vec<(&Path, &str)> = [(&a.grad_out, "--grad-out"), (&a.loss_out, "--loss-out")]
        .into_iter()
        .filter_map(|(p, w)| p.as_deref().map(|p| (p, w)))
        .collect();
    Outputs::check(&outs, &inputs, true)?;

    let reduction: Reduction = a.reduction.into();
    let mut cfg = ce_options(a, n, v)?.with_ranks(true);
    // Targets, and every check, before a device is opened or an output file created.
    let (classes, probs) = match (&a.targets, &a.target_probs) {
        (Some(t), _) => {
            let (t, _) = read_targets(t, &[1])?;
            check::cross_entropy((n, v), &Targets::I64(t.view()), &cfg)?;
            // Range checks up front: an error should not wait for the blocks to find it.
            check::class_targets(&Targets::I64(t.view()), v, a.ignore_index)?;
            (Some(t), None)
        }
        (None, Some(p)) => {
            let p = TensorFile::open(p, "target probabilities")?;
            p.want_rank(&[2], "target probabilities")?;
            if p.shape != [n, v] || p.dtype != FileDType::F32 {
                return Err(XentError::Shape(format!(
                    "logits are [{n}, {v}] but target probabilities are {:?} {}",
                    p.shape,
                    p.dtype.name()
                )));
            }
            // Shapes and options now; the probabilities themselves are checked block by block,
            // before either backend sees them (`CeJob::run`).
            check::cross_entropy((n, v), &Targets::I64(ndarray::Array1::zeros(n).view()), &cfg)?;
            (None, Some(p))
        }
        (None, None) => unreachable!("clap requires --targets or --target-probs"),
    };
    if reduction == Reduction::Mean {
        cfg.data.totals = Some(match &classes {
            Some(t) => Totals::of(&Targets::I64(t.view()), &cfg),
            None => Totals {
                counted: n as u64,
                weight_sum: cfg.data.sample_weight.as_ref().map_or(n as f64, |w| w.iter().map(|&x| x as f64).sum()),
            },
        });
    }
    let mut outputs = Outputs::default();
    let grad = out_tensor(a.grad_out.as_deref(), gfile, &[n, v], "gradient")?;
    let loss_out = out_tensor(a.loss_out.as_deref(), FileDType::F32, &[n], "row losses")?;
    let engine = a.backend.open()?;
    let job = CeJob {
        logits: &logits,
        span: xent::parallel::row_range(n, rank, ranks),
        classes: v,
        dtype,
        targets: match (&classes, &probs) {
            (Some(t), _) => BlockTargets::Classes(t.as_slice().expect("contiguous")),
            (None, Some(p)) => BlockTargets::Probs(p),
            _ => unreachable!(),
        },
        cfg: &cfg,
        grad: grad.as_ref(),
        block_rows: block_rows(n, v, dtype.size(), a.block_rows, 1)?,
    };
    let (mut loss, mut counted, mut weight_sum, mut hits) = (0.0f64, 0u64, 0.0f64, 0u64);
    let mut row_loss = Vec::new();
    job.run(&engine, &mut |_, out| {
        loss += out.loss;
        counted += out.counted;
        weight_sum += out.weight_sum;
        hits += out.row_rank.as_ref().map_or(0, |r| r.iter().filter(|&&k| k == 0).count() as u64);
        if let Some(r) = &out.row_loss {
            if loss_out.is_some() {
                row_loss.extend_from_slice(r.as_slice().expect("contiguous"));
            }
        }
        Ok(())
    })?;
    if let Some(g) = grad {
        outputs.tensors.push(g);
    }
    if let Some(l) = loss_out {
        l.write(0, &row_loss)?;
        outputs.tensors.push(l);
    }
    outputs.commit()?;
    Ok(EvalPart {
        sums: [loss, counted as f64, weight_sum, hits as f64],
        n,
        v,
        dtype,
        backend: engine.name().to_string(),
    })
}

/// The options of `eval` as a [`CrossEntropy`], for `n` rows of `v` classes.
fn ce_options(a: &EvalArgs, n: usize, v: usize) -> Result<CrossEntropy> {
    Ok(CrossEntropy::default()
        .with_reduction(a.reduction.into())
        .with_ignore_index(a.ignore_index)
        .with_label_smoothing(non_negative(a.label_smoothing, "--label-smoothing")?)
        .with_class_weight(a.class_weight.as_ref().map(|p| read_weights(p, "--class-weight", v, "class")).transpose()?)
        .with_sample_weight(a.sample_weight.as_ref().map(|p| read_weights(p, "--sample-weight", n, "row")).transpose()?)
        .with_z_loss(non_negative(a.z_loss, "--z-loss")?)
        .with_softcap(a.softcap)
        .with_temperature(a.temperature)
        .with_per_row(a.loss_out.is_some()))
}

/// `eval --hidden H --weight W`: fused linear cross-entropy.
fn run_linear_eval(a: &EvalArgs, hidden: &Path, weight: &Path) -> Result<()> {
    use super::linear::{eval, LinearInputs, LinearOutputs};
    if a.target_probs.is_some() || a.grad_out.is_some() {
        return Err(XentError::InvalidOption(
            "--hidden takes class-index --targets and writes --grad-hidden-out / --grad-weight-out / --grad-bias-out"
                .into(),
        ));
    }
    let targets = a.targets.as_deref().expect("clap requires --targets without --target-probs");
    let mut inputs_paths: Vec<&Path> = vec![hidden, weight, targets];
    inputs_paths.extend(a.linear.bias.as_deref());
    let outs: Vec<(&Path, &str)> = [
        (&a.grad_hidden_out, "--grad-hidden-out"),
        (&a.grad_weight_out, "--grad-weight-out"),
        (&a.grad_bias_out, "--grad-bias-out"),
        (&a.loss_out, "--loss-out"),
    ]
    .into_iter()
    .filter_map(|(p, w)| p.as_deref().map(|p| (p, w)))
    .collect();
    Outputs::check(&outs, &inputs_paths, false)?;
    let inputs = LinearInputs::read(hidden, weight, a.linear.bias.as_deref(), targets, Some(a.ignore_index))?;
    let (n, v) = (inputs.rows(), inputs.classes());
    let ce = ce_options(a, n, v)?;
    let reduction = ce.reduction;
    check::cross_entropy((n, v), &Targets::I64(inputs.targets.view()), &ce)?;
    let loss_out = out_tensor(a.loss_out.as_deref(), FileDType::F32, &[n], "row losses")?;
    let engine = a.backend.open()?;
    let gdt = FileDType::from(a.grad_dtype);
    let paths = LinearOutputs {
        hidden: a.grad_hidden_out.as_deref(),
        weight: a.grad_weight_out.as_deref(),
        bias: a.grad_bias_out.as_deref(),
        dtype: gdt,
    };
    let (o, dtype) = eval(&inputs, ce, &paths, &engine)?;
    if let (Some(f), Some(r)) = (loss_out, &o.row_loss) {
        f.write(0, r.as_slice().expect("contiguous"))?;
        f.commit()?;
    }
    let obj = Obj::default()
        .set("loss", if reduction == Reduction::None { serde_json::Value::Null } else { num(o.loss) })
        .set("rows", n)
        .set("classes", v)
        .set("d", inputs.hidden.dim().1)
        .set("counted", o.counted)
        .num("weight_sum", o.weight_sum)
        .set("dtype", dtype.name())
        .set("backend", engine.name())
        .set("reduction", a.reduction.name())
        .set("chunk_rows", o.chunk_rows)
        .set("peak_rss_bytes", crate::common::peak_rss());
    let obj = if reduction == Reduction::Mean { obj.num("perplexity", o.loss.exp()) } else { obj };
    obj.print(a.json);
    Ok(())
}

/// The arguments of `xent log-softmax`.
#[derive(Args, Debug)]
pub struct LogSoftmaxArgs {
    /// Logits [N, V]: float32, float16 or bfloat16.
    #[arg(long)]
    logits: PathBuf,
    /// Output, float32 [N, V] (.npy or .safetensors; may be the logits file itself).
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

/// Runs `xent log-softmax`: row-wise log-softmax (or softmax) of a logits file into an output file.
pub fn run_log_softmax(a: &LogSoftmaxArgs) -> Result<()> {
    let (logits, dtype) = open_logits(&a.logits)?;
    let (n, v) = (logits.shape[0], logits.shape[1]);
    if v == 0 {
        return Err(XentError::Shape(format!("{}: logits [{n}, 0] have no classes", a.logits.display())));
    }
    let out = out_tensor(Some(&a.out), FileDType::F32, &[n, v], "log-softmax")?.expect("an output");
    let engine = a.backend.open()?;
    let kind = if a.softmax { SoftmaxKind::Softmax } else { SoftmaxKind::LogSoftmax };
    let rows = block_rows(n, v, dtype.size(), None, 1)?;
    let name = if a.softmax { "softmax" } else { "log_softmax" };
    let mut r0 = 0;
    while r0 < n {
        let r1 = (r0 + rows).min(n);
        let block = crate::blocks::read_block(&logits, dtype, r0..r1, v)?;
        let y = engine.backend().log_softmax(block.view(), kind)?;
        out.write(r0 * v, y.as_slice().expect("standard layout"))?;
        r0 = r1;
    }
    out.commit()?;
    if a.json {
        let obj = Obj::default()
            .set("rows", n)
            .set("classes", v)
            .set("op", name)
            .set("dtype", dtype.name())
            .set("backend", engine.name())
            .set("out", a.out.display().to_string());
        emitln(obj.line());
    } else {
        emitln(format!("wrote {name} [{n}, {v}] to {}", a.out.display()));
    }
    Ok(())
}
