//! The default job (`xent` with no arguments): a seeded synthetic workload, mean cross-entropy
//! and gradient on the GPU and the CPU, compared and timed.

use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{Array2, Zip};
use xent::{workload, CrossEntropy, Result, XentError};

use crate::common::{cpu, emit};

/// The arguments of the main job (`xent` or `xent demo`).
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Rows N.
    #[arg(long, default_value_t = 4096)]
    rows: usize,
    /// Classes V.
    #[arg(long, default_value_t = 32000)]
    classes: usize,
    /// Seed of the synthetic workload.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// CPU worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs { rows: 4096, classes: 32000, seed: 42, threads: None }
    }
}

fn bar(steps: u64) -> ProgressBar {
    let pb = ProgressBar::new(steps);
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .expect("valid template"),
    );
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

fn gbps(bytes: f64, t: Duration) -> f64 {
    bytes / t.as_secs_f64() / 1e9
}

fn max_abs_diff(a: &Array2<f32>, b: &Array2<f32>) -> f64 {
    let mut m = 0.0f64;
    Zip::from(a).and(b).for_each(|&x, &y| m = m.max((x as f64 - y as f64).abs()));
    m
}

/// Runs the main job: a seeded workload's mean cross-entropy and gradient on the CPU and the GPU,
/// with the largest difference between them and the time and throughput of each.
pub fn run(a: &DemoArgs) -> Result<()> {
    let (n, v) = (a.rows, a.classes);
    if n == 0 || v == 0 {
        return Err(XentError::InvalidOption("rows and classes must be positive".into()));
    }
    let pb = bar(4);
    pb.set_message(format!("generating {n} x {v} logits (seed {})", a.seed));
    let (x, t) = workload::try_synthetic(n, v, 2.0, 16, a.seed)?;
    pb.inc(1);
    let cfg = CrossEntropy::default();
    let traffic = 2.0 * (n * v) as f64 * 4.0; // read logits, write gradient

    pb.set_message("CPU: mean cross-entropy + gradient");
    let cpu = cpu(a.threads)?;
    let t0 = Instant::now();
    let c = cpu.cross_entropy_with_grad(&x, &t, &cfg)?;
    let cpu_first = t0.elapsed();
    // A training loop writes into one reused gradient array: time that too (after a warm-up
    // call that faults its pages in).
    let mut reuse = Array2::<f32>::zeros((n, v));
    cpu.cross_entropy_into(&x, &t, &cfg, &mut reuse)?;
    let t0 = Instant::now();
    cpu.cross_entropy_into(&x, &t, &cfg, &mut reuse)?;
    let cpu_time = t0.elapsed();
    drop(reuse);
    pb.inc(1);

    let mut text = format!("xent default job: {n} x {v} f32 logits (seed {}), mean cross-entropy + gradient\n", a.seed);
    text += &format!("  rows counted: {} of {n} (every 16th row ignored)\n", c.counted);
    text += &format!("  CPU ({} threads): loss {:.6}  perplexity {:.3}\n", cpu.threads(), c.loss, c.loss.exp());
    text += &format!(
        "  CPU time {:.3} s into a reused gradient array ({:.2} GB/s, {:.0} rows/s); {:.3} s allocating a new one\n",
        cpu_time.as_secs_f64(),
        gbps(traffic, cpu_time),
        n as f64 / cpu_time.as_secs_f64(),
        cpu_first.as_secs_f64()
    );
    #[cfg(feature = "gpu")]
    {
        pb.set_message("GPU: opening the adapter");
        match xent::GpuContext::new() {
            Ok(g) => {
                pb.set_message(format!("GPU ({}): warm-up, then timed runs", g.adapter_name()));
                // Compile the pipelines on a small input of the same row length.
                let (wx, wt) = workload::try_synthetic(4, v, 2.0, 16, 1)?;
                g.cross_entropy_with_grad(&wx, &wt, &cfg)?;
                let t0 = Instant::now();
                g.cross_entropy_with_grad(&x, &t, &cfg)?;
                let first_time = t0.elapsed();
                // Again: the first call of a shape allocates its (pooled) buffers, a repeat does not.
                let t0 = Instant::now();
                let o = g.cross_entropy_with_grad(&x, &t, &cfg)?;
                let host_time = t0.elapsed();
                pb.inc(1);
                pb.set_message("GPU: device-resident run (logits and gradient stay on the GPU)");
                let dev_time = device_resident(&g, &x, &t, &cfg)?;
                let (gg, cg) = (o.grad.as_ref().expect("gradient"), c.grad.as_ref().expect("gradient"));
                text += &format!("  GPU {}: loss {:.6}  perplexity {:.3}\n", g.adapter_name(), o.loss, o.loss.exp());
                text += &format!(
                    "  GPU time {:.3} s with uploads and gradient readback ({:.3} s on the first call, which allocates)\n",
                    host_time.as_secs_f64(),
                    first_time.as_secs_f64()
                );
                text += &format!(
                    "  GPU time {:.3} s device-resident, logits and gradient staying on the GPU ({:.2} GB/s, {:.0} rows/s)\n",
                    dev_time.as_secs_f64(),
                    gbps(traffic, dev_time),
                    n as f64 / dev_time.as_secs_f64()
                );
                text += &format!(
                    "  largest GPU-vs-CPU difference: loss {:.3e}, gradient {:.3e}\n",
                    (o.loss - c.loss).abs(),
                    max_abs_diff(gg, cg)
                );
            }
            Err(XentError::NoAdapter { message: why, .. }) => {
                pb.suspend(|| {
                    eprintln!("no GPU adapter ({why}): running the CPU part only.");
                    eprintln!("  `apt-get install mesa-vulkan-drivers` gives a software Vulkan driver (lavapipe).");
                });
                text += "  GPU: not run (no adapter)\n";
            }
            Err(e) => return Err(e),
        }
    }
    #[cfg(not(feature = "gpu"))]
    {
        text += "  GPU: not run (built without the `gpu` feature)\n";
    }
    pb.inc(2);
    pb.finish_and_clear();
    emit(&text);
    Ok(())
}

/// Times one recorded call on logits already on the GPU, gradient left there.
#[cfg(feature = "gpu")]
fn device_resident(
    g: &xent::GpuContext,
    x: &Array2<f32>,
    t: &ndarray::Array1<i64>,
    cfg: &CrossEntropy,
) -> Result<Duration> {
    use wgpu::BufferUsages as U;
    use xent::{CeInputs, DType, DeviceGrad, DeviceTargets};
    let (n, v) = x.dim();
    let logits = g.create_buffer((n * v * 4) as u64, U::STORAGE | U::COPY_DST, "demo logits")?;
    g.write_buffer(&logits, 0, bytemuck::cast_slice(x.as_slice().expect("standard layout")))?;
    let ti = xent::Targets::I64(t.view()).device_classes(v, cfg.ignore_index)?;
    let targets = g.create_buffer((n * 4) as u64, U::STORAGE | U::COPY_DST, "demo targets")?;
    g.write_buffer(&targets, 0, bytemuck::cast_slice(&ti))?;
    let grad = g.create_buffer((n * v * 4) as u64, U::STORAGE, "demo gradient")?;
    let plan = g.cross_entropy_plan_device_classes(n, v, DType::F32, cfg)?;
    let inputs = CeInputs {
        logits: logits.slice(..),
        targets: DeviceTargets::Classes(targets.slice(..)),
        sample_weight: None,
        grad: DeviceGrad::Separate(grad.slice(..), DType::F32),
    };
    let step = || -> Result<()> {
        let mut enc = g.device().create_command_encoder(&Default::default());
        plan.record(&mut enc, inputs)?;
        let p = plan.read_back(&mut enc, false)?;
        g.submit_encoder(enc)?;
        p.wait().map(drop)
    };
    step()?;
    let t0 = Instant::now();
    step()?;
    Ok(t0.elapsed())
}
