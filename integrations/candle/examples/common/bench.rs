//! Shared by the Candle examples (`#[path]` modules): a counting global allocator, one measured
//! step (time, heap growth, RSS growth), medians, and `candle_linear_bench`'s benchmark of the
//! loss alone, which `candle_lm --bench` runs too.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use xent::cpu::Bf16Grad;
use xent::half::{bf16, f16};
use xent::Tensor2;
use xent::{Cpu, LinearCe};

/// The system allocator, counting the bytes live and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(now, Relaxed);
}

// SAFETY: every call goes to `System` with the caller's arguments; the counters do not touch
// the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Relaxed);
            grew(new);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn status_kib(key: &str) -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// One measured step: seconds, heap growth, RSS growth, and what the step returned.
pub fn measure<T>(f: impl FnOnce() -> Result<T>) -> Result<(f64, usize, usize, T)> {
    let _ = std::fs::write("/proc/self/clear_refs", "5"); // resets VmHWM to the current RSS
    let rss0 = status_kib("VmRSS:") * 1024;
    let live0 = LIVE.load(Relaxed);
    PEAK.store(live0, Relaxed);
    let t0 = Instant::now();
    let out = f()?;
    let s = t0.elapsed().as_secs_f64();
    let heap = PEAK.load(Relaxed).saturating_sub(live0);
    let rss = (status_kib("VmHWM:") * 1024).saturating_sub(rss0);
    Ok((s, heap, rss, out))
}

/// xent's dtype of the benchmark's Candle dtype (f32, f16 or bf16).
fn xent_dtype(d: DType) -> xent::DType {
    match d {
        DType::BF16 => xent::DType::BF16,
        DType::F16 => xent::DType::F16,
        _ => xent::DType::F32,
    }
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The benchmark: `--bench N D V` (default 4096 512 32000), `--reps R` (3), `--dtype f32|f16|bf16`
/// (f32), `--bf16-grad split|rounded` (how xent's bf16 kernels take the gradient; default: the
/// backend's) from `args`; progress on stderr, one JSON line on stdout.
pub fn run(args: &[String]) -> Result<()> {
    let num = |i: usize, default: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default);
    let (n, d, v) = match args.iter().position(|a| a == "--bench") {
        Some(i) => (num(i + 1, 4096), num(i + 2, 512), num(i + 3, 32000)),
        None => (4096, 512, 32000),
    };
    let reps = args.iter().position(|a| a == "--reps").map_or(3, |i| num(i + 1, 3)).max(1);
    let dtype = match args.iter().position(|a| a == "--dtype").and_then(|i| args.get(i + 1)).map(String::as_str) {
        None | Some("f32") => DType::F32,
        Some("f16") => DType::F16,
        Some("bf16") => DType::BF16,
        Some(other) => {
            eprintln!("--dtype takes f32, f16 or bf16, not {other}");
            std::process::exit(2);
        }
    };

    // How the CPU's bf16 kernels take the f32 gradient, for both xent ways (`xent_candle::set_cpu`).
    let grad = args.iter().position(|a| a == "--bf16-grad").and_then(|i| args.get(i + 1)).map(|g| {
        g.parse::<Bf16Grad>().unwrap_or_else(|e| {
            eprintln!("--bf16-grad: {e}");
            std::process::exit(2);
        })
    });

    // hidden ~ N(0, 1), weight ~ N(0, 1/D) (an initialised unembedding), targets uniform.
    let (ha, t) = xent::workload::synthetic(n, d, 1.0, 0, 1);
    let (wa, _) = xent::workload::synthetic(v, d, 1.0 / (d as f32).sqrt(), 0, 2);
    let t: Vec<i64> = t.iter().enumerate().map(|(i, &y)| (y * 7919 + i as i64 * 31) % v as i64).collect();
    let dev = Device::Cpu;
    let h =
        Var::from_tensor(&Tensor::from_slice(ha.as_slice().expect("standard layout"), (n, d), &dev)?.to_dtype(dtype)?)?;
    let w =
        Var::from_tensor(&Tensor::from_slice(wa.as_slice().expect("standard layout"), (v, d), &dev)?.to_dtype(dtype)?)?;
    // The same (rounded) values for xent's own call.
    let typed = |a: ndarray::Array2<f32>| match dtype {
        DType::BF16 => Tensor2::BF16(a.mapv(bf16::from_f32)),
        DType::F16 => Tensor2::F16(a.mapv(f16::from_f32)),
        _ => Tensor2::F32(a),
    };
    let (ha, wa) = (typed(ha), typed(wa));
    let targets = Tensor::from_vec(t.iter().map(|&y| y as u32).collect::<Vec<u32>>(), n, &dev)?;
    let cfg = LinearCe::default();
    if let Some(g) = grad {
        xent_candle::set_cpu(Cpu::new().with_bf16_grad(g));
    }
    // One backend for both xent ways: xent-candle's, which xent's own call uses too.
    let cpu = xent_candle::cpu();
    let kernels = cpu.linear_matmul(xent_dtype(dtype)).map_err(candle_core::Error::wrap)?;
    // bf16 terms of the gradient per product, where the kernels multiply bf16 (else none).
    let terms = match cpu.bf16_grad_terms().map_err(candle_core::Error::wrap)? {
        (gh, gw) if kernels.multiplies_bf16() => format!("[{gh}, {gw}]"),
        _ => "null".into(),
    };

    let xent_step = || -> Result<(f32, Tensor, Tensor)> {
        let loss = xent_candle::linear_cross_entropy(&h, &w, None, &targets, &cfg)?;
        let g = loss.backward()?;
        let l = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        Ok((l, g.get(&h).expect("grad").clone(), g.get(&w).expect("grad").clone()))
    };
    let ref_step = || -> Result<(f32, Tensor, Tensor)> {
        let logits = h.matmul(&w.t()?)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &targets)?;
        let g = loss.backward()?;
        let l = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        Ok((l, g.get(&h).expect("grad").clone(), g.get(&w).expect("grad").clone()))
    };
    let native_step = || -> Result<xent::LinearCeOutput> {
        cpu.linear_cross_entropy(ha.view(), wa.view(), None, &t[..], &cfg).map_err(candle_core::Error::wrap)
    };

    // Warm-up (thread pools, first-touch of the allocator's pages), and the answers compared.
    let (l_x, gh_x, gw_x) = xent_step()?;
    let (l_r, gh_r, gw_r) = ref_step()?;
    let l_n = native_step()?.loss as f32;
    let mut max_grad_diff = 0f32;
    for (a, b) in [(&gh_x, &gh_r), (&gw_x, &gw_r)] {
        let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
        let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let diff = (&a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        max_grad_diff = max_grad_diff.max(diff / scale);
    }
    drop((gh_x, gw_x, gh_r, gw_r));
    eprintln!(
        "warm-up: loss xent {l_x}, candle_nn {l_r}, native {l_n}; max relative gradient difference {max_grad_diff:e}"
    );

    let (mut sx, mut sr, mut sn) = (Vec::new(), Vec::new(), Vec::new());
    let (mut px, mut pr, mut pn) = (0, 0, 0);
    let (mut rx, mut rr, mut rn) = (0, 0, 0);
    for rep in 0..reps {
        let (s, p, r, _) = measure(xent_step)?;
        (px, rx) = (px.max(p), rx.max(r));
        sx.push(s);
        let (s, p, r, _) = measure(ref_step)?;
        (pr, rr) = (pr.max(p), rr.max(r));
        sr.push(s);
        let (s, p, r, _) = measure(native_step)?;
        (pn, rn) = (pn.max(p), rn.max(r));
        sn.push(s);
        eprintln!("rep {rep}: xent {:.3} s, candle_nn {:.3} s, native {:.3} s", sx[rep], sr[rep], sn[rep]);
    }
    let (step_x, step_r, step_n) = (median(&sx), median(&sr), median(&sn));
    eprintln!(
        "xent-candle: {:.2}x faster than candle_nn, {:.3} of its peak heap growth, {:.3}x native's time",
        step_r / step_x,
        px as f64 / pr as f64,
        step_x / step_n
    );
    println!(
        "{{\"framework\": \"candle\", \"backend\": \"cpu\", \"n\": {n}, \"d\": {d}, \"v\": {v}, \"dtype\": \"{}\", \"cpu_matmul\": \"{kernels}\", \
         \"grad_terms\": {terms}, \"reps\": {reps}, \
         \"step_s_xent\": {step_x}, \"step_s_ref\": {step_r}, \"step_s_native\": {step_n}, \
         \"peak_bytes_xent\": {px}, \"peak_bytes_ref\": {pr}, \"peak_bytes_native\": {pn}, \
         \"rss_bytes_xent\": {rx}, \"rss_bytes_ref\": {rr}, \"rss_bytes_native\": {rn}, \
         \"loss_xent\": {l_x}, \"loss_ref\": {l_r}, \"loss_native\": {l_n}, \"max_grad_diff\": {max_grad_diff:e}}}",
        dtype.as_str()
    );
    Ok(())
}
