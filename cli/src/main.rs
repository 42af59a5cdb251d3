//! The `xent` command line, a client of the `xent` library's public API: the default job,
//! `eval`, `log-softmax`, `bce`, `distill`, `dist`, `score`, `perplexity`, `calibrate`,
//! `preference` and `bench`.
//!
//! Every failure ends in one line on stderr, `error: ...`, and exit status 1 (2 for bad
//! arguments); outputs are written atomically (see `io::out`); a closed stdout ends the process
//! quietly with status 141, as a SIGPIPE would.

use clap::{Parser, Subcommand};
use xent::parallel::Collective;
use xent::Result;
use xent_cli::{cmd, common, dist};

#[global_allocator]
static HEAP: xent_cli::heap::Counting = xent_cli::heap::Counting;

#[derive(Parser, Debug)]
#[command(name = "xent", version, about = "Cross-entropy losses on the GPU (wgpu) and CPU")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Cross-entropy (loss and gradient) of logits in .npy / safetensors files, any size.
    Eval(cmd::eval::EvalArgs),
    /// Row-wise log-softmax (or softmax) of logits.
    LogSoftmax(cmd::eval::LogSoftmaxArgs),
    /// Binary cross-entropy from logits or probabilities.
    Bce(cmd::bce::BceArgs),
    /// Knowledge distillation: T^2 * batchmean KL(teacher_T || student_T) (or reverse KL, JSD).
    Distill(cmd::divergence::DistillArgs),
    /// Entropy, cross-entropy, KL and Jensen-Shannon per row of two distributions.
    Dist(cmd::divergence::DistArgs),
    /// Per-token log-probs and entropies from hidden states and the unembedding (RL scoring),
    /// any size.
    Score(cmd::score::ScoreArgs),
    /// Corpus and per-sequence perplexity of masked token sequences, any size.
    Perplexity(cmd::metrics::PerplexityArgs),
    /// Fit the temperature that minimises validation NLL; ECE before and after.
    Calibrate(cmd::metrics::CalibrateArgs),
    /// Bradley-Terry preference loss of chosen/rejected score pairs.
    Preference(cmd::metrics::PreferenceArgs),
    /// Time cross-entropy on the CPU and GPU over a set of shapes.
    Bench(cmd::bench::BenchArgs),
    /// The default job: a seeded 4096 x 32000 workload on GPU and CPU, compared.
    Demo(cmd::demo::DemoArgs),
}

fn run(cmd: Option<Cmd>, comm: &dyn Collective) -> Result<()> {
    match &cmd {
        Some(Cmd::Eval(_)) | Some(Cmd::Perplexity(_)) => {}
        _ => dist::single(comm, "this command")?,
    }
    match cmd {
        None => cmd::demo::run(&cmd::demo::DemoArgs::default()),
        Some(Cmd::Demo(a)) => cmd::demo::run(&a),
        Some(Cmd::Eval(a)) => cmd::eval::run_eval(&a, comm),
        Some(Cmd::LogSoftmax(a)) => cmd::eval::run_log_softmax(&a),
        Some(Cmd::Bench(a)) => cmd::bench::run(&a),
        Some(Cmd::Bce(a)) => cmd::bce::run(&a),
        Some(Cmd::Distill(a)) => cmd::divergence::run_distill(&a),
        Some(Cmd::Dist(a)) => cmd::divergence::run_dist(&a),
        Some(Cmd::Perplexity(a)) => cmd::metrics::run_perplexity(&a, comm),
        Some(Cmd::Score(a)) => cmd::score::run(&a),
        Some(Cmd::Calibrate(a)) => cmd::metrics::run_calibrate(&a),
        Some(Cmd::Preference(a)) => cmd::metrics::run_preference(&a),
    }
}

fn main() {
    // A write over a file-size limit then fails with EFBIG (one error line, the target left
    // as it was) instead of the signal ending the process.
    xent_cli::ignore_sigxfsz();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                common::emit(&e.to_string());
                std::process::exit(0);
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
            common::error_line(&msg.join(" "));
            std::process::exit(2);
        }
    };
    let comm = match dist::world() {
        Ok(c) => c,
        Err(e) => {
            common::error_line(&format!("error: {e}"));
            std::process::exit(1);
        }
    };
    let res = run(cli.cmd, &*comm);
    if let Err(e) = &res {
        // In a group, one message: rank 0's (its own error, or the failing rank's, which
        // `xent::parallel::agree` sent to every rank).
        if comm.rank() == 0 {
            common::error_line(&format!("error: {}", e.to_string().replace('\n', " ")));
        }
        // Every rank waits for that line before any exits: mpirun ends the whole job as soon
        // as one process exits non-zero.
        if comm.size() > 1 {
            let _ = comm.all_reduce_max(&mut [0.0]);
        }
    }
    // MPI is finalised here (process::exit runs no destructors).
    drop(comm);
    if res.is_err() {
        std::process::exit(1);
    }
}
