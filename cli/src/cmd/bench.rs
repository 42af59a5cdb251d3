//! `xent bench`: median and minimum times of mean cross-entropy (ignore_index on every 16th row)
//! over shapes, dtypes and backends, the useful traffic in GB/s, that traffic as a fraction of
//! the device's own copy rate measured in the same run, and the process's peak memory.
//!
//! `--load-width 16,8` runs the GPU once per width of the loads that read 16-bit rows (16: eight
//! values per load where the rows allow it; 8: four, the earlier kernels), so that both are
//! measured in one process; f32 rows are measured once. Without it the library chooses (16 on
//! GPUs, 8 on software rasterisers).
//!
//! `--op copy` reports the ceiling itself: a buffer-to-buffer copy of the logits (GB/s of read
//! plus written bytes) and a read-only row-sum kernel over the same bytes (GB/s read).
//!
//! The CPU runs on host arrays (forward-backward writes into one reused gradient array, as a
//! training loop would); the GPU runs device-resident (logits uploaded once, the gradient left
//! on the GPU, one recorded plan per shape), so neither side pays for allocation or transfers
//! inside the timed region.

use indicatif::{ProgressBar, ProgressStyle};
use xent::{workload, CrossEntropy, DType, Logits, Result, Tensor2, XentError};

use crate::common::{cpu, emit, emitln, peak_rss, BackendKind, Obj};
use crate::plot::{self, Point};

use super::bench_args::time;
pub use super::bench_args::{BenchArgs, GpuMatmul, Op};

/// One measured (backend, shape, dtype).
struct Row {
    backend: &'static str,
    dtype: DType,
    n: usize,
    v: usize,
    median: f64,
    min: f64,
    gbps: f64,
    /// The copy rate (read + written bytes per second) on the same backend and bytes.
    copy_gbps: f64,
    /// Read-only rate (`--op copy`).
    read_gbps: Option<f64>,
    peak_rss: u64,
    /// GPU, 16-bit rows: the widest load of the row kernels (`--load-width`, or the library's
    /// choice).
    load_width: Option<u8>,
}

fn parse_shape(s: &str) -> Result<(usize, usize)> {
    let bad = || XentError::InvalidOption(format!("shape must be NxV with positive N and V, got {s:?}"));
    let (a, b) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let (n, v): (usize, usize) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
    if n == 0 || v == 0 || n.checked_mul(v).is_none_or(|e| e > isize::MAX as usize / 8) {
        return Err(bad());
    }
    Ok((n, v))
}

/// The seeded workload in `dtype` (allocations checked: an impossible shape is an error).
/// Rows are generated independently, so the first `m` rows are the workload of `m` rows.
fn workload(n: usize, v: usize, dtype: DType) -> Result<(Tensor2, ndarray::Array1<i64>)> {
    let (x, t) = workload::try_synthetic(n, v, 2.0, 16, 42)?;
    // Every dtype in xent's allocator (`Tensor2::from_f32`, as the f32 workload), so that the
    // dtypes differ in bytes only.
    Ok((Tensor2::from_f32(x, dtype), t))
}

/// The first `n` rows of `x`.
fn head_rows(x: &Tensor2, n: usize) -> Logits<'_> {
    use ndarray::s;
    match x {
        Tensor2::F32(a) => Logits::F32(a.slice(s![..n, ..])),
        Tensor2::F16(a) => Logits::F16(a.slice(s![..n, ..])),
        Tensor2::BF16(a) => Logits::BF16(a.slice(s![..n, ..])),
    }
}

/// Runs `xent bench`: times the chosen operation for every backend, shape and dtype, and prints a
/// table or JSON lines (and a plot with `--plot`).
pub fn run(a: &BenchArgs) -> Result<()> {
    if a.reps == 0 {
        return Err(XentError::InvalidOption("--reps must be at least 1".into()));
    }
    if a.op == Op::LinearFwdBwd {
        return crate::cmd::bench_linear::run(a);
    }
    let plot_out = match &a.plot {
        Some(p) => {
            if !matches!(p.extension().and_then(|e| e.to_str()), Some("svg" | "png")) {
                return Err(XentError::InvalidOption(format!(
                    "--plot writes SVG or PNG: name a .svg or .png file, got {}",
                    p.display()
                )));
            }
            Some(crate::io::OutFile::create(p, "plot")?)
        }
        None => None,
    };
    let shapes = a.shapes.iter().map(|s| parse_shape(s)).collect::<Result<Vec<_>>>()?;
    let dtypes = a.dtype.iter().map(|s| s.parse::<DType>()).collect::<Result<Vec<_>>>()?;
    // `None`: the library's choice.
    let mut widths: Vec<Option<u8>> = Vec::new();
    for &w in &a.load_width {
        if w != 8 && w != 16 {
            return Err(XentError::InvalidOption(format!("--load-width takes 8 or 16 (bytes per load), got {w}")));
        }
        if !widths.contains(&Some(w)) {
            widths.push(Some(w));
        }
    }
    if widths.is_empty() {
        widths.push(None);
    }
    let cpu = if a.backend.contains(&BackendKind::Cpu) { Some(cpu(a.threads)?) } else { None };
    // One context per load width (the width is a context option).
    #[cfg(feature = "gpu")]
    let gpus: Vec<(u8, xent::GpuContext)> = if a.backend.contains(&BackendKind::Gpu) {
        let mut out = Vec::new();
        for &w in &widths {
            let opts = xent::GpuOptions::default()
                .with_workgroup_size(a.workgroup_size)
                .with_segment_len(a.segment_len)
                .with_wide_loads(w.map(|w| w == 16));
            match xent::GpuContext::with_options(opts) {
                Ok(g) => out.push((if g.wide_loads() { 16 } else { 8 }, g)),
                Err(e) if a.backend.len() == 1 => return Err(e),
                Err(e) => {
                    eprintln!("gpu skipped: {e}");
                    break;
                }
            }
        }
        out
    } else {
        Vec::new()
    };
    #[cfg(not(feature = "gpu"))]
    let gpus: Vec<(u8, ())> = {
        if a.backend.contains(&BackendKind::Gpu) {
            eprintln!("gpu skipped: built without the `gpu` feature");
        }
        Vec::new()
    };
    #[cfg(feature = "gpu")]
    let device_name = gpus.first().map(|g| g.1.adapter_name().to_string());
    #[cfg(not(feature = "gpu"))]
    let device_name: Option<String> = None;
    let cfg = CrossEntropy::default();
    // Each measurement is timed reps times, the ceilings three times more.
    let per = if a.op == Op::Copy { 3 } else { 4 };
    let runs = (shapes.len() * dtypes.len() * (cpu.is_some() as usize + gpus.len()) * a.reps * per) as u64;
    let pb = ProgressBar::new(runs);
    pb.set_style(ProgressStyle::with_template("{spinner} {bar:30} {pos}/{len} {msg}").expect("valid template"));
    let op = a.op.name();
    let mut rows = Vec::new();
    // One workload per (V, dtype), of the most rows any shape with that V asks for.
    let mut data: Option<(usize, DType, Tensor2, ndarray::Array1<i64>)> = None;
    for &(n, v) in &shapes {
        for &dtype in &dtypes {
            if data.as_ref().is_none_or(|d| d.0 != v || d.1 != dtype || d.2.dim().0 < n) {
                drop(data.take()); // free the last one first
                let most = shapes.iter().filter(|s| s.1 == v).map(|s| s.0).max().unwrap_or(n);
                pb.set_message(format!("{most}x{v} {dtype}: generating"));
                let (x, t) = workload(most, v, dtype)?;
                data = Some((v, dtype, x, t));
            }
            let (_, _, all_x, all_t) = data.as_ref().expect("generated");
            let x = head_rows(all_x, n);
            let t = all_t.slice(ndarray::s![..n]);
            let elems = (n * v) as f64 * dtype.size() as f64;
            let traffic = if a.op == Op::FwdBwd { 2.0 * elems } else { elems };
            let bytes = elems;
            if let Some(c) = &cpu {
                pb.set_message(format!("{n}x{v} {dtype}: cpu {op}"));
                let (copy_s, read_s) = cpu_ceiling(x, a.reps, &pb)?;
                let copy_gbps = 2.0 * bytes / copy_s / 1e9;
                let (median, min, read_gbps) = match a.op {
                    Op::Copy => (copy_s, copy_s, Some(bytes / read_s / 1e9)),
                    Op::FwdBwd => {
                        let mut g = Tensor2::zeros(dtype, (n, v));
                        let (m, mn) = time(a.reps, &pb, || c.cross_entropy_into(x, t, &cfg, g.view_mut()).map(drop))?;
                        (m, mn, Some(bytes / read_s / 1e9))
                    }
                    Op::Fwd | Op::LinearFwdBwd => {
                        let (m, mn) = time(a.reps, &pb, || c.cross_entropy(x, t, &cfg).map(drop))?;
                        (m, mn, Some(bytes / read_s / 1e9))
                    }
                };
                let gbps = if a.op == Op::Copy { copy_gbps } else { traffic / median / 1e9 };
                rows.push(Row {
                    backend: "cpu",
                    dtype,
                    n,
                    v,
                    median,
                    min,
                    gbps,
                    copy_gbps,
                    read_gbps,
                    peak_rss: peak_rss(),
                    load_width: None,
                });
            }
            #[cfg(feature = "gpu")]
            for (k, (width, g)) in gpus.iter().enumerate() {
                if dtype == DType::F32 && k > 0 {
                    // The load width applies to 16-bit rows only.
                    pb.inc((a.reps * per) as u64);
                    continue;
                }
                pb.set_message(format!("{n}x{v} {dtype}: gpu {op}, {width}-byte loads"));
                let (copy_s, read_s) = gpu_ceiling(g, x, a.reps, &pb)?;
                let copy_gbps = 2.0 * bytes / copy_s / 1e9;
                let (median, min, read_gbps) = if a.op == Op::Copy {
                    (copy_s, copy_s, Some(bytes / read_s / 1e9))
                } else {
                    let (m, mn) = gpu_time(g, x, t, &cfg, a.op, a.reps, &pb)?;
                    (m, mn, Some(bytes / read_s / 1e9))
                };
                let gbps = if a.op == Op::Copy { copy_gbps } else { traffic / median / 1e9 };
                rows.push(Row {
                    backend: "gpu",
                    dtype,
                    n,
                    v,
                    median,
                    min,
                    gbps,
                    copy_gbps,
                    read_gbps,
                    peak_rss: peak_rss(),
                    load_width: (dtype != DType::F32).then_some(*width),
                });
                g.trim();
            }
        }
    }
    pb.finish_and_clear();

    if a.json {
        for r in &rows {
            let mut o = Obj::default()
                .set("backend", r.backend)
                .set("n", r.n)
                .set("v", r.v)
                .set("dtype", r.dtype.name())
                .set("op", op)
                .num("median_s", r.median)
                .num("min_s", r.min)
                .num("gbps", r.gbps)
                .num("copy_gbps", r.copy_gbps)
                .num("fraction_of_copy", r.gbps / r.copy_gbps);
            if let Some(rd) = r.read_gbps {
                o = o.num("read_gbps", rd);
                if op == "fwd" {
                    // The forward pass reads the logits once: the read-only kernel is its ceiling.
                    o = o.num("fraction_of_read", r.gbps / rd);
                }
            }
            if let (Some(d), "gpu") = (&device_name, r.backend) {
                o = o.set("device", d.as_str());
            }
            if let Some(w) = r.load_width {
                o = o.set("load_width", w);
            }
            emitln(o.set("peak_rss_bytes", r.peak_rss).set("reps", a.reps).line());
        }
    } else {
        let mut text = String::new();
        if let Some(c) = &cpu {
            text.push_str(&format!("cpu: {} threads\n", c.threads()));
        }
        #[cfg(feature = "gpu")]
        if let Some((_, g)) = gpus.first() {
            text.push_str(&format!("gpu: {} (device-resident)\n", g.adapter_name()));
        }
        text.push_str(&format!(
            "{:<8} {:>8} {:>8} {:<5} {:<8} {:>10} {:>10} {:>8} {:>8} {:>8} {:>10}\n",
            "backend", "N", "V", "dtype", "op", "median s", "min s", "GB/s", "copy", "of copy", "peak MiB"
        ));
        for r in &rows {
            let backend = match r.load_width {
                Some(w) if widths.len() > 1 => format!("{}/{w}B", r.backend),
                _ => r.backend.to_string(),
            };
            text.push_str(&format!(
                "{:<8} {:>8} {:>8} {:<5} {:<8} {:>10.4} {:>10.4} {:>8.2} {:>8.2} {:>7.0}% {:>10.0}\n",
                backend,
                r.n,
                r.v,
                r.dtype.name(),
                op,
                r.median,
                r.min,
                r.gbps,
                r.copy_gbps,
                100.0 * r.gbps / r.copy_gbps,
                r.peak_rss as f64 / (1 << 20) as f64
            ));
            if let (Some(rd), Op::Copy) = (r.read_gbps, a.op) {
                text.push_str(&format!(
                    "{:<8} {:>8} {:>8} {:<5} {:<8} read-only {rd:.2} GB/s\n",
                    backend,
                    r.n,
                    r.v,
                    r.dtype.name(),
                    "read"
                ));
            }
        }
        emit(&text);
    }
    if let Some(out) = plot_out {
        let points: Vec<Point> = rows
            .iter()
            .map(|r| {
                let series = match r.load_width {
                    Some(w) if widths.len() > 1 => {
                        format!("{}/{w}B {}", r.backend, r.dtype.name())
                    }
                    _ => format!("{} {}", r.backend, r.dtype.name()),
                };
                Point { series, v: r.v, gbps: r.gbps }
            })
            .collect();
        // Drawn to the temporary file, then renamed over the target.
        plot::throughput(out.temp_path(), &points, &format!("xent cross-entropy {op}: throughput against V"))?;
        out.commit()?;
    }
    Ok(())
}

/// The CPU's ceiling over the logits' bytes: (copy seconds, read-only seconds), medians.
fn cpu_ceiling(x: Logits<'_>, reps: usize, pb: &ProgressBar) -> Result<(f64, f64)> {
    use rayon::prelude::*;
    let src = x.bytes();
    let mut dst = xent::alloc::filled(src.len(), 0u8, "copy destination")?;
    const CHUNK: usize = 1 << 20;
    let copy = time(reps, pb, || {
        dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| d.copy_from_slice(s));
        Ok(())
    })?;
    let mut sink = 0u64;
    let read = time(reps, pb, || {
        sink ^= src
            .par_chunks(CHUNK)
            .map(|c| {
                c.chunks_exact(8).fold(0u64, |a, w| a.wrapping_add(u64::from_le_bytes(w.try_into().expect("8 bytes"))))
            })
            .reduce(|| 0, u64::wrapping_add);
        Ok(())
    })?;
    std::hint::black_box(sink);
    Ok((copy.0, read.0))
}

/// The GPU's ceiling over the logits' bytes: a buffer-to-buffer copy or a copy kernel,
/// whichever moves more, and the row-sum kernel (same rows, same dtype), each submitted and
/// waited for: (copy seconds, read-only seconds).
#[cfg(feature = "gpu")]
fn gpu_ceiling(g: &xent::GpuContext, x: Logits<'_>, reps: usize, pb: &ProgressBar) -> Result<(f64, f64)> {
    use wgpu::BufferUsages as U;
    let (n, v) = x.dim();
    let bytes = (n * v * x.dtype().size()) as u64;
    let src = g.create_buffer(bytes, U::STORAGE | U::COPY_SRC | U::COPY_DST, "bench source")?;
    g.write_buffer(&src, 0, &x.bytes())?;
    let dst = g.create_buffer(bytes, U::COPY_DST | U::COPY_SRC, "bench copy")?;
    let mut probe = [0u8; 4];
    let copy = time(reps, pb, || {
        let mut enc = g.device().create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&src, 0, &dst, 0, bytes);
        g.submit_encoder(enc)?;
        g.read_buffer(&dst, 0, &mut probe)
    })?;
    let plan = g.row_sum_plan(n, v, x.dtype())?;
    let read = time(reps, pb, || {
        let mut enc = g.device().create_command_encoder(&Default::default());
        plan.record(&mut enc, crate::common::head(&src, bytes))?;
        g.submit_encoder(enc)?;
        g.read_buffer(plan.row_buffer(), 0, &mut probe)
    })?;
    // A copy by a kernel of the same shape (f32 rows out): some drivers run buffer copies on
    // a DMA engine well below the memory's rate; the ceiling is the faster of the two.
    let f32_bytes = (n * v * 4) as u64;
    let out = g.create_buffer(f32_bytes, U::STORAGE, "bench kernel copy")?;
    let kernel = time(reps, pb, || {
        let mut enc = g.device().create_command_encoder(&Default::default());
        plan.record_copy(&mut enc, crate::common::head(&src, bytes), crate::common::head(&out, f32_bytes))?;
        g.submit_encoder(enc)?;
        g.read_buffer(plan.row_buffer(), 0, &mut probe)
    })?;
    // Seconds a copy of `bytes` read and `bytes` written takes at the better of the two rates.
    let kernel_equiv = kernel.0 * 2.0 * bytes as f64 / (bytes + f32_bytes) as f64;
    Ok((copy.0.min(kernel_equiv), read.0))
}

/// Times one recorded plan per rep on logits already on the GPU, gradient left there.
#[cfg(feature = "gpu")]
fn gpu_time(
    g: &xent::GpuContext,
    x: Logits<'_>,
    t: ndarray::ArrayView1<'_, i64>,
    cfg: &CrossEntropy,
    op: Op,
    reps: usize,
    pb: &ProgressBar,
) -> Result<(f64, f64)> {
    use wgpu::BufferUsages as U;
    use xent::{CeInputs, DeviceGrad, DeviceTargets};
    let (n, v) = x.dim();
    let dtype = x.dtype();
    let lb = g.create_buffer((n * v * dtype.size()) as u64, U::STORAGE | U::COPY_DST, "bench logits")?;
    g.write_buffer(&lb, 0, &x.bytes())?;
    let ti = xent::Targets::I64(t).device_classes(v, cfg.ignore_index)?;
    let tb = g.create_buffer((n * 4) as u64, U::STORAGE | U::COPY_DST, "bench targets")?;
    g.write_buffer(&tb, 0, bytemuck::cast_slice(&ti))?;
    let gb = match op {
        Op::FwdBwd => Some(g.create_buffer((n * v * dtype.size()) as u64, U::STORAGE, "bench gradient")?),
        Op::Fwd | Op::Copy | Op::LinearFwdBwd => None,
    };
    let plan = g.cross_entropy_plan_device_classes(n, v, dtype, cfg)?;
    let inputs = CeInputs {
        logits: crate::common::head(&lb, (n * v * dtype.size()) as u64),
        targets: DeviceTargets::Classes(crate::common::head(&tb, (n * 4) as u64)),
        sample_weight: None,
        grad: match &gb {
            Some(b) => DeviceGrad::Separate(crate::common::head(b, (n * v * dtype.size()) as u64), dtype),
            None => DeviceGrad::None,
        },
    };
    time(reps, pb, || {
        let mut enc = g.device().create_command_encoder(&Default::default());
        plan.record(&mut enc, inputs)?;
        let p = plan.read_back(&mut enc, false)?;
        g.submit_encoder(enc)?;
        p.wait().map(drop)
    })
}
