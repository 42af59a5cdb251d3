//! Vocabulary-parallel cross-entropy over MPI: each rank holds a slice of a seeded workload's
//! vocabulary (as a tensor-parallel model's output layer would), one all-reduce per batch
//! merges the rows' statistics, and each rank writes its slice of the gradient. Every rank also
//! computes the whole tensor in one process and compares its slice; rank 0 prints one JSON
//! line, `{"ranks", "loss", "loss_single", "max_grad_diff", ...}`, and the exit status is
//! non-zero when they differ beyond f32 tolerance.
//!
//! Run: `mpirun -n 2 target/release/examples/vocab_parallel [--rows N] [--classes V]
//! [--smoothing E] [--z-loss Z] [--class-weights] [--ignore-every K] [--fail-rank R] [--gpu]
//! [--linear D]`
//! (build: `cargo build --release --features mpi --example vocab_parallel`).
//! `--fail-rank R` gives rank R a gradient of the wrong shape: every rank must then stop with
//! that one error, none waiting. `--gpu` computes each rank's shard on its GPU (feature `gpu`).
//! `--linear D` shards a linear layer's weight `[V, D]` instead (fused linear cross-entropy
//! from hidden states `[N, D]`): `max_grad_diff` then covers `grad_hidden` and this rank's
//! rows of `grad_weight`.

use ndarray::{s, Array1, Array2};
use xent::parallel::VocabShard;
use xent::parallel::{agree, mpi::MpiCollective, row_range, Collective};
use xent::{workload, Cpu, CrossEntropy, LinearCe, Result, XentError};

struct Args {
    rows: usize,
    classes: usize,
    smoothing: f32,
    z_loss: f32,
    class_weights: bool,
    ignore_every: usize,
    fail_rank: Option<usize>,
    gpu: bool,
    linear: Option<usize>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        rows: 512,
        classes: 32000,
        smoothing: 0.0,
        z_loss: 0.0,
        class_weights: false,
        ignore_every: 0,
        fail_rank: None,
        gpu: false,
        linear: None,
    };
    let mut it = std::env::args().skip(1);
    let bad = |w: &str| XentError::InvalidOption(format!("bad value for {w}"));
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| XentError::InvalidOption(format!("{flag} needs a value")));
        match flag.as_str() {
            "--rows" => a.rows = val()?.parse().map_err(|_| bad("--rows"))?,
            "--classes" => a.classes = val()?.parse().map_err(|_| bad("--classes"))?,
            "--smoothing" => a.smoothing = val()?.parse().map_err(|_| bad("--smoothing"))?,
            "--z-loss" => a.z_loss = val()?.parse().map_err(|_| bad("--z-loss"))?,
            "--ignore-every" => a.ignore_every = val()?.parse().map_err(|_| bad("--ignore-every"))?,
            "--fail-rank" => a.fail_rank = Some(val()?.parse().map_err(|_| bad("--fail-rank"))?),
            "--class-weights" => a.class_weights = true,
            "--gpu" => a.gpu = true,
            "--linear" => a.linear = Some(val()?.parse().map_err(|_| bad("--linear"))?),
            other => return Err(XentError::InvalidOption(format!("unknown argument {other}"))),
        }
    }
    Ok(a)
}

fn run(comm: &MpiCollective) -> Result<()> {
    let a = agree(comm, args())?;
    let (n, v) = (a.rows, a.classes);
    if comm.size() > v {
        return Err(XentError::InvalidOption(format!("{} ranks for {v} classes", comm.size())));
    }
    let cfg = CrossEntropy::default()
        .with_label_smoothing(a.smoothing)
        .with_z_loss(a.z_loss)
        .with_class_weight(a.class_weights.then(|| Array1::from_shape_fn(v, |c| 0.25 + (c % 11) as f32 * 0.15)));
    if let Some(d) = a.linear {
        return run_linear(comm, &a, d, cfg);
    }
    // The same seeded workload on every rank; this rank keeps its columns.
    let (x, t) = workload::try_synthetic(n, v, 4.0, a.ignore_every, 42)?;
    let cols = row_range(v, comm.rank(), comm.size());
    let shard = x.slice(s![.., cols.clone()]).to_owned();
    let gcols = if a.fail_rank == Some(comm.rank()) { cols.len() + 1 } else { cols.len() };
    let mut grad = Array2::<f32>::zeros((n, gcols));
    // Touched before the clock starts: a training loop reuses its gradient buffer.
    grad.fill(1.0);
    let cpu = Cpu::new();
    let sh = VocabShard { class0: cols.start, classes: v };
    let started = std::time::Instant::now();
    let out = if a.gpu {
        gpu_shard(comm, &shard, &t, sh, &cfg, &mut grad)?
    } else {
        cpu.cross_entropy_vocab_parallel(&shard, t.view(), sh, &cfg, comm, Some((&mut grad).into()))?
    };
    let seconds = started.elapsed().as_secs_f64();
    // One process, the whole tensor: this rank's columns of its gradient against ours.
    let single = cpu.cross_entropy_with_grad(&x, t.view(), &cfg)?;
    let whole = single.grad.expect("asked for the gradient");
    let mut diff =
        [grad.iter().zip(whole.slice(s![.., cols]).iter()).fold(0.0f64, |m, (&a, &b)| m.max((a - b).abs() as f64))];
    comm.all_reduce_max(&mut diff)?;
    // f64 records on the CPU; f32 on the GPU.
    let tol = if a.gpu { 1e-5 } else { 1e-6 };
    report(comm, &a, if a.gpu { "gpu" } else { "cpu" }, (out.loss, single.loss), diff[0], tol, seconds)
}

/// Rank 0's JSON line; an error (on every rank) when the results differ beyond `tol`.
fn report(
    comm: &MpiCollective,
    a: &Args,
    backend: &str,
    (loss, single): (f64, f64),
    diff: f64,
    tol: f64,
    seconds: f64,
) -> Result<()> {
    let ok = (loss - single).abs() <= 1e-5 * single.abs().max(1.0) && diff <= tol;
    if comm.rank() == 0 {
        println!(
            "{{\"ranks\": {}, \"loss\": {loss}, \"loss_single\": {single}, \"max_grad_diff\": {diff:e}, \"rows\": {}, \"classes\": {}, \"backend\": \"{backend}\", \"seconds\": {seconds:.4}, \"ok\": {ok}}}",
            comm.size(),
            a.rows,
            a.classes
        );
    }
    if !ok {
        return Err(XentError::InvalidOption(format!(
            "vocabulary-parallel result differs: loss {loss} vs {single}, gradient by {diff:e}"
        )));
    }
    Ok(())
}

/// `--linear D`: the weight `[V, D]` split by rows (vocabulary) across the ranks.
fn run_linear(comm: &MpiCollective, a: &Args, d: usize, cfg: CrossEntropy) -> Result<()> {
    let (n, v) = (a.rows, a.classes);
    let (h, _) = workload::try_synthetic(n, d, 1.0, 0, 7)?;
    let (w, _) = workload::try_synthetic(v, d, 0.3, 0, 8)?;
    let t = Array1::from_shape_fn(n, |i| {
        if a.ignore_every > 0 && i % a.ignore_every == a.ignore_every - 1 {
            -100
        } else {
            ((i * 7919) % v) as i64
        }
    });
    let rows = row_range(v, comm.rank(), comm.size());
    let ws = w.slice(s![rows.clone(), ..]).to_owned();
    let cfg = LinearCe::default().with_ce(cfg).with_grad_bias(false);
    let cpu = Cpu::new();
    let sh = VocabShard { class0: rows.start, classes: v };
    let started = std::time::Instant::now();
    let out = if a.gpu {
        gpu_linear(comm, &h, &ws, &t, sh, &cfg)?
    } else {
        cpu.linear_cross_entropy_vocab_parallel(&h, &ws, None, t.view(), sh, &cfg, comm)?
    };
    let seconds = started.elapsed().as_secs_f64();
    let single = cpu.linear_cross_entropy(&h, &w, None, t.view(), &cfg)?;
    let max_diff = |a: &Array2<f32>, b: ndarray::ArrayView2<f32>| {
        a.iter().zip(b.iter()).fold(0.0f64, |m, (x, y)| m.max((x - y).abs() as f64))
    };
    let (gh, gw) = (out.grad_hidden.expect("asked").to_f32(), out.grad_weight.expect("asked").to_f32());
    let (sh_gh, sh_gw) = (single.grad_hidden.expect("asked").to_f32(), single.grad_weight.expect("asked").to_f32());
    let mut diff = [max_diff(&gh, sh_gh.view()).max(max_diff(&gw, sh_gw.slice(s![rows, ..])))];
    comm.all_reduce_max(&mut diff)?;
    let backend = if a.gpu { "gpu-linear" } else { "cpu-linear" };
    report(comm, a, backend, (out.loss, single.loss), diff[0], 1e-5, seconds)
}

/// This rank's shard on its GPU (every rank agrees first that each has one).
#[cfg(feature = "gpu")]
fn gpu_shard(
    comm: &MpiCollective,
    shard: &Array2<f32>,
    t: &Array1<i64>,
    sh: VocabShard,
    cfg: &CrossEntropy,
    grad: &mut Array2<f32>,
) -> Result<xent::CeOutput> {
    let gpu = agree(comm, xent::GpuContext::new())?;
    gpu.cross_entropy_vocab_parallel(shard, t.view(), sh, cfg, comm, Some(grad.into()))
}

/// `--gpu --linear`: this rank's weight shard on its GPU.
#[cfg(feature = "gpu")]
fn gpu_linear(
    comm: &MpiCollective,
    h: &Array2<f32>,
    ws: &Array2<f32>,
    t: &Array1<i64>,
    sh: VocabShard,
    cfg: &LinearCe,
) -> Result<xent::LinearCeOutput> {
    let gpu = agree(comm, xent::GpuContext::new())?;
    gpu.linear_cross_entropy_vocab_parallel(h, ws, None, t.view(), sh, cfg, comm)
}

#[cfg(not(feature = "gpu"))]
fn gpu_linear(
    _: &MpiCollective,
    _: &Array2<f32>,
    _: &Array2<f32>,
    _: &Array1<i64>,
    _: VocabShard,
    _: &LinearCe,
) -> Result<xent::LinearCeOutput> {
    Err(XentError::InvalidOption("--gpu needs the `gpu` feature".into()))
}

#[cfg(not(feature = "gpu"))]
fn gpu_shard(
    _: &MpiCollective,
    _: &Array2<f32>,
    _: &Array1<i64>,
    _: VocabShard,
    _: &CrossEntropy,
    _: &mut Array2<f32>,
) -> Result<xent::CeOutput> {
    Err(XentError::InvalidOption("--gpu needs the `gpu` feature".into()))
}

fn main() {
    let comm = match MpiCollective::init() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = run(&comm) {
        // One message, from rank 0: its own error, or the failing rank's (`agree` sent it).
        if comm.rank() == 0 {
            eprintln!("error: {e}");
        }
        // Every rank waits for that line: mpirun ends the job when one process exits non-zero.
        let _ = comm.all_reduce_max(&mut [0.0]);
        drop(comm);
        std::process::exit(1);
    }
}
