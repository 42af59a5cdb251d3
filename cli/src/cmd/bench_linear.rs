//! `xent bench --op linear-fwd-bwd --shapes NxDxV`: fused linear cross-entropy, loss and the
//! gradients w.r.t. hidden states, weight and bias, timed per backend: median and minimum
//! seconds, GFLOP/s of its three matrix products (6 N D V), and the extra memory it held (CPU:
//! peak heap growth over the inputs, gradients included; and the resident-set growth). CPU
//! rows say which matrix-product kernels ran (`cpu_matmul`: `f32`, `avx512-bf16`, `amx-bf16`), one row per
//! `--cpu-matmul` choice, and how bf16 kernels took the gradient (`bf16_grad`: `split`,
//! `rounded`), one row per `--bf16-grad` choice.

use indicatif::ProgressBar;
use ndarray::Array1;
use xent::cpu::{Bf16Grad, CpuMatmul};
use xent::{workload, DType, LinearCe, Result, Tensor2, XentError};

use super::bench_args::{time, BenchArgs, GpuMatmul};
use crate::common::{cpu, emit, emitln, peak_rss, BackendKind, Obj};

fn parse(s: &str) -> Result<(usize, usize, usize)> {
    let bad =
        || XentError::InvalidOption(format!("--op linear-fwd-bwd takes shapes NxDxV with positive sizes, got {s:?}"));
    let parts: Vec<usize> = s.split(['x', 'X']).map(|p| p.trim().parse().map_err(|_| bad())).collect::<Result<_>>()?;
    match parts[..] {
        [n, d, v] if n > 0 && d > 0 && v > 0 && n.checked_mul(v).is_some_and(|e| e <= isize::MAX as usize / 8) => {
            Ok((n, d, v))
        }
        _ => Err(bad()),
    }
}

/// Seeded hidden states `[N, D]`, an unembedding `[V, D]` (scaled by 1/sqrt(D)), a bias, and
/// targets with every 16th row ignored.
fn inputs(n: usize, d: usize, v: usize, dtype: DType) -> Result<(Tensor2, Tensor2, Array1<f32>, Array1<i64>)> {
    let (h, t) = workload::try_synthetic(n, d, 1.0, 16, 42)?;
    let (w, _) = workload::try_synthetic(v, d, 1.0 / (d as f32).sqrt(), 0, 43)?;
    let b = Array1::from_shape_fn(v, |c| ((c % 13) as f32 - 6.0) * 0.01);
    let t = t.mapv(|y| if y < 0 { y } else { y % v as i64 });
    let conv = |x| Tensor2::from_f32(x, dtype);
    Ok((conv(h), conv(w), b, t))
}

/// Runs `xent bench --op linear-fwd-bwd`: times the fused linear cross-entropy (loss and every
/// gradient) on seeded `NxDxV` workloads for each backend and dtype.
pub fn run(a: &BenchArgs) -> Result<()> {
    let shapes = a.shapes.iter().map(|s| parse(s)).collect::<Result<Vec<_>>>()?;
    let dtypes = a.dtype.iter().map(|s| s.parse::<DType>()).collect::<Result<Vec<_>>>()?;
    let pb = ProgressBar::hidden();
    let cfg = LinearCe::default().with_workspace_bytes(a.workspace_bytes);
    // `None`: the library's own choice (XENT_CPU_MATMUL, else cpuid).
    let matmuls = a
        .cpu_matmul
        .iter()
        .map(|s| if s.trim() == "auto" { Ok(None) } else { s.parse::<CpuMatmul>().map(Some) })
        .collect::<Result<Vec<_>>>()?;
    let grads = a
        .bf16_grad
        .iter()
        .map(|s| if s.trim() == "auto" { Ok(None) } else { s.parse::<Bf16Grad>().map(Some) })
        .collect::<Result<Vec<_>>>()?;
    let mut text =
        String::from("backend        N      D        V dtype   median s      min s   GFLOP/s   heap MiB  matmul\n");
    for &(n, d, v) in &shapes {
        for &dtype in &dtypes {
            let (h, w, b, t) = inputs(n, d, v, dtype)?;
            let flop = 6.0 * n as f64 * d as f64 * v as f64;
            let mut report = |backend: &str,
                              (median, min): (f64, f64),
                              extra: Option<(u64, u64)>,
                              matmul: Option<(CpuMatmul, Option<String>)>,
                              gpu_matmul: Option<&'static str>| {
                let gflops = flop / median / 1e9;
                if a.json {
                    let mut o = Obj::default()
                        .set("backend", backend)
                        .set("op", "linear-fwd-bwd")
                        .set("n", n)
                        .set("d", d)
                        .set("v", v)
                        .set("dtype", dtype.name())
                        .num("median_s", median)
                        .num("min_s", min)
                        .num("gflops", gflops)
                        .set("reps", a.reps);
                    if let Some((rss, heap)) = extra {
                        o = o.set("extra_rss_bytes", rss).set("extra_heap_bytes", heap);
                    }
                    if let Some((m, grad)) = &matmul {
                        o = o.set("cpu_matmul", m.name());
                        if let Some(g) = grad {
                            o = o.set("bf16_grad", g.as_str());
                        }
                    }
                    // Which product kernel the GPU ran ("simt", "coop16", "coop8").
                    if let Some(kind) = gpu_matmul {
                        o = o.set("matmul", kind);
                    }
                    emitln(o.line());
                } else {
                    let mib =
                        extra.map_or("-".to_string(), |(_, heap)| format!("{:.0}", heap as f64 / (1 << 20) as f64));
                    text.push_str(&format!(
                        "{backend:<8} {n:>6} {d:>6} {v:>8} {:<5} {median:>10.4} {min:>10.4} {gflops:>9.1} {mib:>10}  {}\n",
                        dtype.name(),
                        match &matmul {
                            Some((m, Some(g))) => format!("{m} ({g})"),
                            Some((m, None)) => m.to_string(),
                            None => gpu_matmul.unwrap_or("-").to_string(),
                        },
                    ));
                }
            };
            let cpu_runs = matmuls.iter().flat_map(|&m| grads.iter().map(move |&g| (m, g)));
            for (matmul, grad) in cpu_runs.filter(|_| a.backend.contains(&BackendKind::Cpu)) {
                let mut c = match matmul {
                    Some(m) => cpu(a.threads)?.with_matmul(m)?,
                    None => cpu(a.threads)?,
                };
                if let Some(g) = grad {
                    c = c.with_bf16_grad(g);
                }
                let used = c.linear_matmul(dtype)?;
                // How the bf16 kernels took the gradient (only they read it).
                let grad_form = used.multiplies_bf16().then(|| -> Result<String> {
                    Ok(match c.bf16_grad_terms()? {
                        t if t == Bf16Grad::Split.terms() => Bf16Grad::Split.to_string(),
                        t if t == Bf16Grad::Rounded.terms() => Bf16Grad::Rounded.to_string(),
                        (gh, gw) => format!("terms {gh},{gw}"),
                    })
                });
                let grad_form = grad_form.transpose()?;
                let before = peak_rss();
                let live = crate::heap::reset_peak();
                let times = time(a.reps, &pb, || {
                    c.linear_cross_entropy(h.view(), w.view(), Some(b.view()), t.view(), &cfg).map(drop)
                })?;
                let heap = crate::heap::peak().saturating_sub(live) as u64;
                report("cpu", times, Some((peak_rss().saturating_sub(before), heap)), Some((used, grad_form)), None);
            }
            #[cfg(feature = "gpu")]
            for &mm in a.matmul.iter().filter(|_| a.backend.contains(&BackendKind::Gpu)) {
                let coop = mm == GpuMatmul::Coop16;
                let g = xent::GpuContext::with_options(xent::GpuOptions::default().with_cooperative_matrix(coop))?;
                let times = time(a.reps, &pb, || {
                    g.linear_cross_entropy(h.view(), w.view(), Some(b.view()), t.view(), &cfg).map(drop)
                })?;
                report("gpu", times, None, None, Some(g.matmul_kind()));
            }
        }
    }
    if !a.json {
        emit(&text);
    }
    Ok(())
}
