//! The default job (`xent` with no arguments): a seeded synthetic workload, mean cross-entropy
//! and gradient on the GPU and the CPU, compared and timed.

use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{Array2, Zip};

use crate::error::{Result, XentError};
use crate::{workload, CrossEntropy, DeviceCe, GpuContext, GradMode};

#[derive(Args, Debug, Clone)]
pub(crate) struct DemoArgs {
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

pub(crate) fn run(a: &DemoArgs) -> Result<()> {
    let (n, v) = (a.rows, a.classes);
    if n == 0 || v == 0 {
        return Err(XentError::InvalidOption("rows and classes must be positive".into()));
    }
    let pb = bar(4);
    pb.set_message(format!("generating {n} x {v} logits (seed {})", a.seed));
    let (x, t) = workload::synthetic(n, v, 2.0, 16, a.seed);
    pb.inc(1);
    let cfg = CrossEntropy { grad: GradMode::Separate, ..Default::default() };
    let traffic = 2.0 * (n * v) as f64 * 4.0; // read logits, write gradient

    pb.set_message("CPU: mean cross-entropy + gradient");
    let cpu = super::cpu(a.threads)?;
    let t0 = Instant::now();
    let c = cpu.cross_entropy(x.view(), t.view().into(), &cfg)?;
    let cpu_first = t0.elapsed();
    // A training loop writes into one reused gradient array: time that too (after a warm-up
    // call that faults its pages in).
    let mut reuse = Array2::<f32>::zeros((n, v));
    cpu.cross_entropy_into(x.view(), t.view().into(), &cfg, reuse.view_mut())?;
    let t0 = Instant::now();
    cpu.cross_entropy_into(x.view(), t.view().into(), &cfg, reuse.view_mut())?;
    let cpu_time = t0.elapsed();
    drop(reuse);
    pb.inc(1);

    pb.set_message("GPU: opening the adapter");
    let gpu = match GpuContext::new() {
        Ok(g) => Some(g),
        Err(XentError::NoAdapter(why)) => {
            pb.suspend(|| {
                eprintln!("no GPU adapter ({why}): running the CPU part only.");
                eprintln!("  `apt-get install mesa-vulkan-drivers` gives a software Vulkan driver (lavapipe).");
            });
            None
        }
        Err(e) => return Err(e),
    };
    let mut gpu_res = None;
    if let Some(g) = &gpu {
        pb.set_message(format!("GPU ({}): warm-up, then timed runs", g.adapter_name()));
        // Compile the pipelines on a small input of the same row length.
        let (wx, wt) = workload::synthetic(4, v, 2.0, 16, 1);
        g.cross_entropy(wx.view(), wt.view().into(), &cfg)?;
        let t0 = Instant::now();
        g.cross_entropy(x.view(), t.view().into(), &cfg)?;
        let first_time = t0.elapsed();
        // Again: the first call of a shape allocates its (pooled) buffers, a repeat does not.
        let t0 = Instant::now();
        let o = g.cross_entropy(x.view(), t.view().into(), &cfg)?;
        let host_time = t0.elapsed();
        pb.inc(1);
        pb.set_message("GPU: device-resident run (logits and gradient stay on the GPU)");
        let dev_time = device_resident(g, &x, &t, &cfg)?;
        gpu_res = Some((o, first_time, host_time, dev_time));
    } else {
        pb.inc(1);
    }
    pb.inc(1);
    pb.finish_and_clear();

    println!("xent default job: {n} x {v} f32 logits (seed {}), mean cross-entropy + gradient", a.seed);
    println!("  rows counted: {} of {n} (every 16th row ignored)", c.counted);
    println!("  CPU ({} threads): loss {:.6}  perplexity {:.3}", cpu.threads(), c.loss, c.loss.exp());
    println!(
        "  CPU time {:.3} s into a reused gradient array ({:.2} GB/s, {:.0} rows/s); {:.3} s allocating a new one",
        cpu_time.as_secs_f64(),
        gbps(traffic, cpu_time),
        n as f64 / cpu_time.as_secs_f64(),
        cpu_first.as_secs_f64()
    );
    match (&gpu, gpu_res) {
        (Some(g), Some((o, first_time, host_time, dev_time))) => {
            let (gg, cg) = (o.grad.as_ref().expect("gradient"), c.grad.as_ref().expect("gradient"));
            println!("  GPU {}: loss {:.6}  perplexity {:.3}", g.adapter_name(), o.loss, o.loss.exp());
            println!(
                "  GPU time {:.3} s with uploads and gradient readback ({:.3} s on the first call, which allocates)",
                host_time.as_secs_f64(),
                first_time.as_secs_f64()
            );
            println!(
                "  GPU time {:.3} s device-resident, logits and gradient staying on the GPU ({:.2} GB/s, {:.0} rows/s)",
                dev_time.as_secs_f64(),
                gbps(traffic, dev_time),
                n as f64 / dev_time.as_secs_f64()
            );
            println!(
                "  largest GPU-vs-CPU difference: loss {:.3e}, gradient {:.3e}",
                (o.loss - c.loss).abs(),
                max_abs_diff(gg, cg)
            );
        }
        _ => println!("  GPU: not run (no adapter)"),
    }
    Ok(())
}

fn max_abs_diff(a: &Array2<f32>, b: &Array2<f32>) -> f64 {
    let mut m = 0.0f64;
    Zip::from(a).and(b).for_each(|&x, &y| m = m.max((x as f64 - y as f64).abs()));
    m
}

/// Times one call on logits already on the GPU, gradient left there.
fn device_resident(g: &GpuContext, x: &Array2<f32>, t: &ndarray::Array1<i64>, cfg: &CrossEntropy) -> Result<Duration> {
    use wgpu::util::DeviceExt;
    let (n, v) = x.dim();
    let d = g.device();
    let logits = d.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("demo logits"),
        contents: bytemuck::cast_slice(x.as_slice().expect("standard layout")),
        usage: wgpu::BufferUsages::STORAGE,
    });
    let ti: Vec<i32> = t.iter().map(|&y| y as i32).collect();
    let targets = d.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("demo targets"),
        contents: bytemuck::cast_slice(&ti),
        usage: wgpu::BufferUsages::STORAGE,
    });
    let grad = d.create_buffer(&wgpu::BufferDescriptor {
        label: Some("demo gradient"),
        size: (n * v * 4) as u64,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let job = DeviceCe { logits: &logits, targets: &targets, rows: n, classes: v, grad: Some(&grad) };
    g.cross_entropy_device(job, cfg)?;
    let t0 = Instant::now();
    g.cross_entropy_device(job, cfg)?;
    Ok(t0.elapsed())
}
