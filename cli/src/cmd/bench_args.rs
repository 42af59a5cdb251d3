//! The arguments of `xent bench` and its timing loop, shared by the cross-entropy benchmark
//! (`bench`) and the fused linear one (`bench_linear`), which both read them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use indicatif::ProgressBar;
use xent::Result;

use crate::common::BackendKind;

/// The operation `xent bench --op` times.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Loss only.
    Fwd,
    /// Loss and gradient w.r.t. the logits.
    FwdBwd,
    /// The ceiling: a copy of the logits, and a read-only pass over them.
    Copy,
    /// Fused linear cross-entropy, loss and all gradients (`--shapes NxDxV`).
    LinearFwdBwd,
}

impl Op {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Op::Fwd => "fwd",
            Op::FwdBwd => "fwd-bwd",
            Op::Copy => "copy",
            Op::LinearFwdBwd => "linear-fwd-bwd",
        }
    }
}

/// The arguments of `xent bench` (read by `bench_linear` for `--op linear-fwd-bwd` too).
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Backends, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "cpu,gpu")]
    pub(crate) backend: Vec<BackendKind>,
    /// Shapes NxV, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4096x32000")]
    pub(crate) shapes: Vec<String>,
    /// Logit dtypes (f32, f16, bf16), comma-separated; the gradient has the logits' dtype.
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    pub(crate) dtype: Vec<String>,
    /// Timed repetitions (after one warm-up).
    #[arg(long, default_value_t = 5)]
    pub(crate) reps: usize,
    /// What to time.
    #[arg(long, value_enum, default_value = "fwd-bwd")]
    pub(crate) op: Op,
    /// One JSON object per (backend, shape, dtype) line instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Draw throughput against V for each backend and dtype to this .svg or .png file.
    #[arg(long)]
    pub(crate) plot: Option<PathBuf>,
    /// CPU worker threads (default: one per core).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// `--op linear-fwd-bwd`: bytes of logits the call may hold at once (default: the
    /// library's, min(256 MiB, N V 4 / 8); on the GPU at least 1024 rows within 256 MiB).
    #[arg(long)]
    pub(crate) workspace_bytes: Option<usize>,
    /// `--op linear-fwd-bwd`: CPU matrix-product kernels to time side by side, comma-separated
    /// (`auto`: the best this CPU has, or XENT_CPU_MATMUL's; `f32`; `avx512-bf16`; `amx-bf16`).
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    pub(crate) cpu_matmul: Vec<String>,
    /// `--op linear-fwd-bwd`, bf16 on bf16 CPU kernels: how the gradient products take the f32
    /// gradient, comma-separated to time side by side: `split` (two bf16 terms, f32 accuracy),
    /// `rounded` (rounded to bf16 as PyTorch's autograd does, faster), `auto` (the library's
    /// choice: XENT_CPU_BF16_TERMS, else split). Rows say which ran (`bf16_grad`).
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    pub(crate) bf16_grad: Vec<String>,
    /// `--op linear-fwd-bwd`: GPU matrix-product kernels to time side by side, comma-separated:
    /// `simt` (f32 FMA, every adapter) or `coop16` (cooperative matrices: f16 tiles, f32
    /// accumulation, 16 x 16 x 16 or else 8 x 8 x 8 as the adapter offers; an error where it
    /// offers neither). Each row's `matmul` names the kernel that ran.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "simt")]
    pub(crate) matmul: Vec<GpuMatmul>,
    /// GPU: invocations per workgroup of the row kernels (default: chosen from the adapter).
    #[arg(long)]
    pub(crate) workgroup_size: Option<u16>,
    /// GPU: split rows into segments of this many columns, one workgroup each (default:
    /// chosen from the shape and the adapter).
    #[arg(long)]
    pub(crate) segment_len: Option<usize>,
    /// GPU: bytes per load of 16-bit rows, comma-separated to measure several in one run: 16
    /// (eight values per load where V is a multiple of 8) or 8 (four values per load, the
    /// earlier kernels). f32 rows are measured with the first width only. Default: the
    /// library's choice for the adapter.
    #[arg(long, value_delimiter = ',')]
    pub(crate) load_width: Vec<u8>,
}

/// The GPU matrix-product kernel of `--matmul`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuMatmul {
    /// Register-tiled f32 FMA products (every adapter).
    Simt,
    /// Cooperative-matrix products (`GpuOptions::cooperative_matrix`).
    Coop16,
}

/// Median and minimum seconds of `t`.
pub(crate) fn stats(mut t: Vec<Duration>) -> (f64, f64) {
    t.sort();
    let s: Vec<f64> = t.iter().map(Duration::as_secs_f64).collect();
    let m = s.len();
    let median = if m % 2 == 1 { s[m / 2] } else { 0.5 * (s[m / 2 - 1] + s[m / 2]) };
    (median, s[0])
}

/// Runs `f` once to warm up (and, the first time in a process, for a quarter second), then
/// `reps` times: the median and minimum seconds.
pub(crate) fn time(reps: usize, pb: &ProgressBar, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    // Warm-up: pipelines, pages, caches; and, the first time in a process, a quarter second
    // of work, so that a GPU leaves its idle clocks before anything is timed.
    static FIRST: std::sync::Once = std::sync::Once::new();
    let mut spin = Duration::ZERO;
    FIRST.call_once(|| spin = Duration::from_millis(250));
    let t0 = Instant::now();
    f()?;
    while t0.elapsed() < spin {
        f()?;
    }
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        t.push(t0.elapsed());
        pb.inc(1);
    }
    Ok(stats(t))
}
