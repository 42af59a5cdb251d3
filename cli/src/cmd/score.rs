//! `xent score --hidden H --weight W [--bias B] --targets T`: per-token log-probs of the target
//! tokens and the entropy of each row's softmax, `z = (hidden @ weight.T + bias) / temperature`,
//! as RL post-training (PPO/GRPO scoring) needs them, straight from hidden states: the hidden
//! states are read and scored one block of rows at a time (the logits never exist beyond the
//! library's row-chunk workspace), so a file larger than memory scores in bounded memory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use ndarray::{Array1, Array2};
use xent::{DType, LinearLogprobs, LinearLogprobsOutput, Logits, Result, Tensor2, XentError};

use super::linear::{check_pair, read_matrix};
use crate::common::{BackendArgs, Engine, Obj};
use crate::io::out::{Outputs, TensorOut};
use crate::io::tensor::{read_f32_1d, read_targets};
use crate::io::{FileDType, TensorFile};

/// `xent score`'s arguments.
#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    xent score --hidden h.npy --weight w.npy --targets t.npy --json\n  \
    xent score --hidden h.safetensors:hidden --weight w.safetensors:lm_head --targets t.npy \\\n    \
    --temperature 0.7 --logprobs-out lp.npy --entropy-out ent.npy")]
pub struct ScoreArgs {
    /// Hidden states [N, D] (.npy, or file.safetensors:name); f32, f16 or bf16. Read in blocks of
    /// rows: any size.
    #[arg(long)]
    pub hidden: PathBuf,
    /// The unembedding [V, D], in the hidden states' dtype (read whole).
    #[arg(long)]
    pub weight: PathBuf,
    /// The logits' bias, float32 [V].
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(long)]
    pub bias: Option<PathBuf>,
    /// The tokens whose log-probs are scored, integer [N].
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(long)]
    pub targets: PathBuf,
    /// Rows whose target is this value score 0 and are not counted.
    #[arg(long, default_value_t = -100, allow_hyphen_values = true)]
    pub ignore_index: i64,
    /// Divides the logits (sampling temperature); positive.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Writes the per-row log-probs, float32 [N] (0 for ignored rows).
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(long, value_name = "PATH")]
    pub logprobs_out: Option<PathBuf>,
    /// Writes the per-row entropies (nats), float32 [N] (0 for ignored rows).
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(long, value_name = "PATH")]
    pub entropy_out: Option<PathBuf>,
    /// Rows of hidden states read and scored at once (default: 64 MiB of them).
    #[arg(long)]
    pub block_rows: Option<usize>,
    /// One JSON object on the last line: rows, counted, mean_logprob, mean_entropy, perplexity.
    #[arg(long)]
    pub json: bool,
    /// Which backend runs it, and its CPU threads.
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// One block of rows `r0..r0 + rows` of `file` (`[N, D]`, C order) in its dtype.
fn read_block(file: &TensorFile, dtype: DType, r0: usize, rows: usize, d: usize) -> Result<Tensor2> {
    fn go<T: bytemuck::Pod + Default>(f: &TensorFile, r0: usize, rows: usize, d: usize) -> Result<Array2<T>> {
        let mut v = xent::alloc::filled(rows * d, T::default(), "hidden block")?;
        f.read_into(r0 * d, &mut v)?;
        Ok(Array2::from_shape_vec((rows, d), v).expect("rows x d elements"))
    }
    Ok(match dtype {
        DType::F32 => Tensor2::F32(go(file, r0, rows, d)?),
        DType::F16 => Tensor2::F16(go(file, r0, rows, d)?),
        DType::BF16 => Tensor2::BF16(go(file, r0, rows, d)?),
    })
}

/// Rows `r0..r1` of `x`, borrowed.
fn rows(x: &Tensor2, r0: usize, r1: usize) -> Logits<'_> {
    let s = ndarray::s![r0..r1, ..];
    match x {
        Tensor2::F32(a) => Logits::F32(a.slice(s)),
        Tensor2::F16(a) => Logits::F16(a.slice(s)),
        Tensor2::BF16(a) => Logits::BF16(a.slice(s)),
    }
}

fn score_block(
    engine: &Engine,
    h: Logits<'_>,
    w: &Tensor2,
    bias: Option<&Array1<f32>>,
    t: ndarray::ArrayView1<'_, i64>,
    cfg: &LinearLogprobs,
) -> Result<LinearLogprobsOutput> {
    let (w, b) = (w.view(), bias.map(|b| b.view()));
    match engine {
        Engine::Cpu(c) => c.linear_logprobs(h, w, b, t, cfg, None),
        #[cfg(feature = "gpu")]
        Engine::Gpu(g) => g.linear_logprobs(h, w, b, t, cfg, None),
    }
}

/// Runs `xent score`.
pub fn run(a: &ScoreArgs) -> Result<()> {
    let started = Instant::now();
    let mut outs: Vec<(&Path, &str)> = Vec::new();
    if let Some(p) = &a.logprobs_out {
        outs.push((p, "--logprobs-out"));
    }
    if let Some(p) = &a.entropy_out {
        outs.push((p, "--entropy-out"));
    }
    let mut inputs: Vec<&Path> = vec![&a.hidden, &a.weight, &a.targets];
    inputs.extend(a.bias.as_deref());
    Outputs::check(&outs, &inputs, false)?;
    if a.block_rows == Some(0) {
        return Err(XentError::InvalidOption("--block-rows must be positive".into()));
    }
    // Checks of every input before any work: shapes, dtypes, target range, options.
    let hidden = TensorFile::open(&a.hidden, "hidden states")?;
    hidden.want_rank(&[2], "hidden states")?;
    let (n, d) = (hidden.shape[0], hidden.shape[1]);
    let dtype = hidden.dtype.logits().ok_or_else(|| XentError::Format {
        path: hidden.path.display().to_string(),
        message: format!("hidden states must be float32, float16 or bfloat16, got {}", hidden.dtype.name()),
    })?;
    let weight = read_matrix(&a.weight, "weight")?;
    let bias = a.bias.as_deref().map(|b| read_f32_1d(b, "bias")).transpose()?;
    let v = check_pair((n, d), dtype, &weight, bias.as_ref())?;
    let (targets, _) = read_targets(&a.targets, &[1, 2])?;
    if targets.len() != n {
        return Err(XentError::Shape(format!("{} targets for {n} rows of hidden states", targets.len())));
    }
    xent::check::class_targets(&xent::Targets::I64(targets.view()), v, a.ignore_index)?;
    let cfg = LinearLogprobs::default().with_ignore_index(a.ignore_index).with_temperature(a.temperature);
    let engine = a.backend.open()?;
    // An empty first call checks the options (the temperature) with the library's words.
    let empty = read_block(&hidden, dtype, 0, 0, d)?;
    score_block(&engine, empty.view(), &weight, bias.as_ref(), targets.slice(ndarray::s![0..0]), &cfg)?;
    let lp_out =
        a.logprobs_out.as_deref().map(|p| TensorOut::create(p, FileDType::F32, &[n], "logprobs")).transpose()?;
    let ent_out =
        a.entropy_out.as_deref().map(|p| TensorOut::create(p, FileDType::F32, &[n], "entropy")).transpose()?;
    let block = a.block_rows.unwrap_or_else(|| ((64usize << 20) / (d.max(1) * dtype.size())).max(1)).min(n.max(1));
    // A Fortran-order file has no contiguous rows: it is read whole.
    let whole = hidden.fortran.then(|| read_matrix(&a.hidden, "hidden states")).transpose()?;
    let (mut sum_lp, mut sum_ent, mut counted) = (0f64, 0f64, 0u64);
    for r0 in (0..n).step_by(block.max(1)) {
        let r1 = (r0 + block).min(n);
        let block_data = match &whole {
            Some(_) => None,
            None => Some(read_block(&hidden, dtype, r0, r1 - r0, d)?),
        };
        let h = match (&whole, &block_data) {
            (Some(all), _) => rows(all, r0, r1),
            (None, Some(b)) => b.view(),
            (None, None) => unreachable!("a block is read when the file is not read whole"),
        };
        let t = targets.slice(ndarray::s![r0..r1]);
        let o = score_block(&engine, h, &weight, bias.as_ref(), t, &cfg)?;
        for ((&lp, &ent), &y) in o.logprob.iter().zip(&o.entropy).zip(t) {
            if y != a.ignore_index {
                sum_lp += lp as f64;
                sum_ent += ent as f64;
            }
        }
        counted += o.counted;
        if let Some(f) = &lp_out {
            f.write(r0, o.logprob.as_slice().expect("contiguous"))?;
        }
        if let Some(f) = &ent_out {
            f.write(r0, o.entropy.as_slice().expect("contiguous"))?;
        }
    }
    let mut done = Outputs::default();
    done.tensors.extend(lp_out);
    done.tensors.extend(ent_out);
    done.commit()?;
    let mean = |s: f64| if counted > 0 { s / counted as f64 } else { f64::NAN };
    let (mean_lp, mean_ent) = (mean(sum_lp), mean(sum_ent));
    Obj::default()
        .set("rows", n)
        .set("counted", counted)
        .num("mean_logprob", mean_lp)
        .num("mean_entropy", mean_ent)
        .num("perplexity", (-mean_lp).exp())
        .num("sum_logprob", sum_lp)
        .set("backend", engine.name())
        .set("dtype", dtype.name())
        .set("block_rows", block)
        .set("peak_rss_bytes", crate::common::peak_rss())
        .num("seconds", started.elapsed().as_secs_f64())
        .print(a.json);
    Ok(())
}
