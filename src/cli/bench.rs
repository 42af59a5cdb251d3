//! `xent bench`: median and minimum times of mean cross-entropy (ignore_index on every 16th row)
//! over shapes and backends, the useful traffic in GB/s, and the process's peak memory.
//!
//! The CPU runs on host arrays (forward-backward writes into one reused gradient array, as a
//! training loop would); the GPU runs device-resident (logits uploaded once, the gradient left
//! on the GPU), so neither side pays for allocation or transfers inside the timed region.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::Array2;
use wgpu::util::DeviceExt;

use super::json::Obj;
use super::plot::{Chart, Point};
use super::{cpu, BackendKind};
use crate::error::{Result, XentError};
use crate::{workload, CrossEntropy, DeviceCe, GpuContext, GradMode};

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// Loss only.
    Fwd,
    /// Loss and gradient w.r.t. the logits.
    FwdBwd,
}

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// Backends, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "cpu,gpu")]
    backend: Vec<BackendKind>,
    /// Shapes NxV, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4096x32000")]
    shapes: Vec<String>,
    /// Timed repetitions (after one warm-up).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// What to time.
    #[arg(long, value_enum, default_value = "fwd-bwd")]
    op: Op,
    /// One JSON object per (backend, shape, op) line instead of a table.
    #[arg(long)]
    json: bool,
    /// Draw throughput against V for each backend to this .svg or .png file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// CPU worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

/// One measured (backend, shape, op).
struct Row {
    backend: &'static str,
    n: usize,
    v: usize,
    median: f64,
    min: f64,
    gbps: f64,
    peak_rss: u64,
}

fn parse_shape(s: &str) -> Result<(usize, usize)> {
    let bad = || XentError::InvalidOption(format!("shape must be NxV with positive N and V, got {s:?}"));
    let (a, b) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let (n, v) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
    if n == 0 || v == 0 {
        return Err(bad());
    }
    Ok((n, v))
}

/// Peak resident memory of this process so far (VmHWM), in bytes; 0 where unknown.
pub(crate) fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn stats(mut t: Vec<Duration>) -> (f64, f64) {
    t.sort();
    let s: Vec<f64> = t.iter().map(Duration::as_secs_f64).collect();
    let m = s.len();
    let median = if m % 2 == 1 { s[m / 2] } else { 0.5 * (s[m / 2 - 1] + s[m / 2]) };
    (median, s[0])
}

fn time(reps: usize, pb: &ProgressBar, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    f()?; // warm-up: pipelines, pages, caches
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        t.push(t0.elapsed());
        pb.inc(1);
    }
    Ok(stats(t))
}

pub(crate) fn run(a: &BenchArgs) -> Result<()> {
    if a.reps == 0 {
        return Err(XentError::InvalidOption("--reps must be at least 1".into()));
    }
    if let Some(p) = &a.plot {
        if !matches!(p.extension().and_then(|e| e.to_str()), Some("svg" | "png")) {
            return Err(XentError::InvalidOption(format!(
                "--plot writes SVG or PNG: name a .svg or .png file, got {}",
                p.display()
            )));
        }
        super::check_out(&Some(p.clone()))?;
    }
    let shapes = a.shapes.iter().map(|s| parse_shape(s)).collect::<Result<Vec<_>>>()?;
    let cpu = if a.backend.contains(&BackendKind::Cpu) { Some(cpu(a.threads)?) } else { None };
    let gpu = if a.backend.contains(&BackendKind::Gpu) {
        match GpuContext::new() {
            Ok(g) => Some(g),
            Err(e) if a.backend.len() == 1 => return Err(e),
            Err(e) => {
                eprintln!("gpu skipped: {e}");
                None
            }
        }
    } else {
        None
    };
    let cfg = CrossEntropy {
        grad: if a.op == Op::FwdBwd { GradMode::Separate } else { GradMode::Off },
        ..Default::default()
    };
    let runs = (shapes.len() * (cpu.is_some() as usize + gpu.is_some() as usize) * a.reps) as u64;
    let pb = ProgressBar::new(runs);
    pb.set_style(ProgressStyle::with_template("{spinner} {bar:30} {pos}/{len} {msg}").expect("valid template"));
    let op = match a.op {
        Op::Fwd => "fwd",
        Op::FwdBwd => "fwd-bwd",
    };
    let mut rows = Vec::new();
    for &(n, v) in &shapes {
        pb.set_message(format!("{n}x{v}: generating"));
        let (x, t) = workload::synthetic(n, v, 2.0, 16, 42);
        let elems = (n * v) as f64 * 4.0;
        let traffic = if a.op == Op::FwdBwd { 2.0 * elems } else { elems };
        if let Some(c) = &cpu {
            pb.set_message(format!("{n}x{v}: cpu {op}"));
            let (median, min) = if a.op == Op::FwdBwd {
                let mut g = Array2::<f32>::zeros((n, v));
                time(a.reps, &pb, || c.cross_entropy_into(x.view(), t.view().into(), &cfg, g.view_mut()).map(drop))?
            } else {
                time(a.reps, &pb, || c.cross_entropy(x.view(), t.view().into(), &cfg).map(drop))?
            };
            rows.push(Row { backend: "cpu", n, v, median, min, gbps: traffic / median / 1e9, peak_rss: peak_rss() });
        }
        if let Some(g) = &gpu {
            pb.set_message(format!("{n}x{v}: gpu {op}"));
            let d = g.device();
            let init = |contents: &[u8]| {
                d.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("bench"),
                    contents,
                    usage: wgpu::BufferUsages::STORAGE,
                })
            };
            let lb = init(bytemuck::cast_slice(x.as_slice().expect("standard layout")));
            let ti: Vec<i32> = t.iter().map(|&y| y as i32).collect();
            let tb = init(bytemuck::cast_slice(&ti));
            let gb = (a.op == Op::FwdBwd).then(|| {
                d.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("bench gradient"),
                    size: (n * v * 4) as u64,
                    usage: wgpu::BufferUsages::STORAGE,
                    mapped_at_creation: false,
                })
            });
            let job = DeviceCe { logits: &lb, targets: &tb, rows: n, classes: v, grad: gb.as_ref() };
            let (median, min) = time(a.reps, &pb, || g.cross_entropy_device(job, &cfg).map(drop))?;
            rows.push(Row { backend: "gpu", n, v, median, min, gbps: traffic / median / 1e9, peak_rss: peak_rss() });
            g.trim();
        }
    }
    pb.finish_and_clear();

    if a.json {
        for r in &rows {
            let o = Obj::default()
                .set("backend", r.backend)
                .set("n", r.n)
                .set("v", r.v)
                .set("op", op)
                .num("median_s", r.median)
                .num("min_s", r.min)
                .num("gbps", r.gbps)
                .set("peak_rss_bytes", r.peak_rss)
                .set("reps", a.reps);
            println!("{}", o.line());
        }
    } else {
        if let Some(c) = &cpu {
            println!("cpu: {} threads", c.threads());
        }
        if let Some(g) = &gpu {
            println!("gpu: {} (device-resident)", g.adapter_name());
        }
        println!(
            "{:<8} {:>8} {:>8} {:<8} {:>10} {:>10} {:>8} {:>10}",
            "backend", "N", "V", "op", "median s", "min s", "GB/s", "peak MiB"
        );
        for r in &rows {
            println!(
                "{:<8} {:>8} {:>8} {:<8} {:>10.4} {:>10.4} {:>8.2} {:>10.0}",
                r.backend,
                r.n,
                r.v,
                op,
                r.median,
                r.min,
                r.gbps,
                r.peak_rss as f64 / (1 << 20) as f64
            );
        }
    }
    if let Some(p) = &a.plot {
        let points: Vec<Point> =
            rows.iter().map(|r| Point { backend: r.backend, n: r.n, v: r.v, gbps: r.gbps }).collect();
        let chart = Chart::throughput(&points, op);
        let bytes =
            if p.extension().and_then(|e| e.to_str()) == Some("png") { chart.png() } else { chart.svg().into_bytes() };
        std::fs::write(p, bytes)
            .map_err(|e| XentError::Io { path: p.display().to_string(), message: e.to_string() })?;
    }
    Ok(())
}
