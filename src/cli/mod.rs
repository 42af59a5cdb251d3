//! The `xent` command line: the default job, `eval`, `log-softmax` and `bench`.
//!
//! Every failure ends in one line on stderr, `error: ...`, and a non-zero exit code.

mod bce;
mod bench;
mod default_job;
mod divergence;
mod eval;
mod json;
mod metrics;
mod plot;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::error::{Result, XentError};
use crate::{Backend, Cpu, GpuContext};

#[derive(Parser, Debug)]
#[command(name = "xent", version, about = "Cross-entropy losses on the GPU (wgpu) and CPU")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Cross-entropy (loss and gradient) of logits in .npy files.
    Eval(eval::EvalArgs),
    /// Row-wise log-softmax (or softmax) of logits in a .npy file.
    LogSoftmax(eval::LogSoftmaxArgs),
    /// Binary cross-entropy from logits or probabilities.
    Bce(bce::BceArgs),
    /// Knowledge distillation: T^2 * batchmean KL(teacher_T || student_T) (or reverse KL, JSD).
    Distill(divergence::DistillArgs),
    /// Entropy, cross-entropy, KL and Jensen-Shannon per row of two distributions.
    Dist(divergence::DistArgs),
    /// Corpus and per-sequence perplexity of masked token sequences.
    Perplexity(metrics::PerplexityArgs),
    /// Fit the temperature that minimises validation NLL; ECE before and after.
    Calibrate(metrics::CalibrateArgs),
    /// Bradley-Terry preference loss of chosen/rejected score pairs.
    Preference(metrics::PreferenceArgs),
    /// Time cross-entropy on the CPU and GPU over a set of shapes.
    Bench(bench::BenchArgs),
    /// The default job: a seeded 4096 x 32000 workload on GPU and CPU, compared.
    Demo(default_job::DemoArgs),
}

/// Which backend runs a command.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BackendKind {
    Gpu,
    Cpu,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct BackendArgs {
    /// Backend to run on.
    #[arg(long, value_enum, default_value = "gpu")]
    backend: BackendKind,
    /// CPU worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

impl BackendArgs {
    fn open(&self) -> Result<Box<dyn Backend>> {
        Ok(match self.backend {
            BackendKind::Gpu => Box::new(GpuContext::new()?),
            BackendKind::Cpu => Box::new(cpu(self.threads)?),
        })
    }
}

pub(crate) fn cpu(threads: Option<usize>) -> Result<Cpu> {
    match threads {
        Some(t) => Cpu::with_threads(t),
        None => Ok(Cpu::new()),
    }
}

pub(crate) fn path_str(p: &std::path::Path) -> String {
    p.display().to_string()
}

/// Output files must be writable: check before the work, not after.
pub(crate) fn check_out(p: &Option<PathBuf>) -> Result<()> {
    if let Some(p) = p {
        let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        if !dir.is_dir() {
            return Err(XentError::Io { path: path_str(p), message: "directory does not exist".into() });
        }
    }
    Ok(())
}

/// Runs the command line and returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                print!("{e}");
                return 0;
            }
            // clap's message spans lines (problem, details, usage); fold the problem and its
            // details into one line.
            let text = e.to_string();
            let msg: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("{}", msg.join(" "));
            return 2;
        }
    };
    let res = match cli.cmd {
        None => default_job::run(&default_job::DemoArgs::default()),
        Some(Cmd::Demo(a)) => default_job::run(&a),
        Some(Cmd::Eval(a)) => eval::run_eval(&a),
        Some(Cmd::LogSoftmax(a)) => eval::run_log_softmax(&a),
        Some(Cmd::Bench(a)) => bench::run(&a),
        Some(Cmd::Bce(a)) => bce::run(&a),
        Some(Cmd::Distill(a)) => divergence::run_distill(&a),
        Some(Cmd::Dist(a)) => divergence::run_dist(&a),
        Some(Cmd::Perplexity(a)) => metrics::run_perplexity(&a),
        Some(Cmd::Calibrate(a)) => metrics::run_calibrate(&a),
        Some(Cmd::Preference(a)) => metrics::run_preference(&a),
    };
    match res {
        Ok(()) => 0,
        Err(e) => {
            let msg = e.to_string().replace('\n', " ");
            eprintln!("error: {msg}");
            1
        }
    }
}
