//! What the Burn language-model examples share (included by `burn_lm_bench` and `burn_lm`
//! through `#[path]`): measuring a step (time and the process's resident-set growth), and the
//! loss forward + backward of an output head three ways on the same arrays (`--bench-flex` of
//! `burn_lm_bench`, `--bench` of `burn_lm`).

use std::time::Instant;

use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;
use burn::tensor::DType as BurnDType;
use ndarray::{Array1, Array2};
use xent::cpu::Bf16Grad;
use xent::half::bf16;
use xent::{Cpu, LinearCe, Logits};

/// The benchmark's element type and how xent's bf16 kernels take the f32 gradient:
/// `--dtype f32|bf16` (hidden, weight and, for Burn's composition, the bias; default f32) and
/// `--bf16-grad split|rounded` (default: the backend's), taken out of the arguments.
pub struct Precision {
    pub bf16: bool,
    pub grad: Option<Bf16Grad>,
}

impl Precision {
    /// Removes the two flags and their values from `args`; a bad value exits with status 2.
    pub fn take(args: &mut Vec<String>) -> Precision {
        let mut take = |flag: &str| -> Option<String> {
            let i = args.iter().position(|a| a == flag)?;
            if i + 1 >= args.len() {
                eprintln!("{flag} needs a value");
                std::process::exit(2);
            }
            let value = args.remove(i + 1);
            args.remove(i);
            Some(value)
        };
        let bf16 = match take("--dtype").as_deref() {
            None | Some("f32") => false,
            Some("bf16") => true,
            Some(other) => {
                eprintln!("--dtype takes f32 or bf16, not {other}");
                std::process::exit(2);
            }
        };
        let grad = take("--bf16-grad").map(|g| {
            g.parse::<Bf16Grad>().unwrap_or_else(|e| {
                eprintln!("--bf16-grad: {e}");
                std::process::exit(2);
            })
        });
        Precision { bf16, grad }
    }
}

pub fn status_kib(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|x| x.parse().ok())
        .unwrap_or(0)
}

/// Resets the high-water mark and returns the resident set now, in bytes.
pub fn rss_mark() -> u64 {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    status_kib("VmRSS:") * 1024
}

/// The peak resident set since the mark, minus the resident set at the mark.
pub fn rss_growth(mark: u64) -> u64 {
    (status_kib("VmHWM:") * 1024).saturating_sub(mark)
}

/// Makes glibc's allocator hand every freed block of 128 KiB or more back to the system at
/// once (a fixed mmap threshold instead of the dynamic one, which grows to 32 MiB after the
/// first large free, and a trim threshold as low), and returns what it holds free now. After
/// it, the resident set follows the live memory, so that a step's growth ([`rss_growth`]) does
/// not depend on what earlier steps freed and the allocator kept. Steps run slower under it
/// (every large block is mapped afresh): time them before. Elsewhere than Linux with glibc it
/// does nothing.
pub fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt and malloc_trim only change and apply the allocator's thresholds.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 10);
        libc::malloc_trim(0);
    }
}

/// The largest resident-set growth of a step per way, after [`return_freed_memory`] (so
/// measured after the steps are timed): as [`measure`], with `reps` rounds.
pub fn measure_memory(reps: usize, ways: &mut [(&str, &mut dyn FnMut() -> f32)]) -> Vec<u64> {
    return_freed_memory();
    measure(reps, ways).into_iter().map(|r| r.1).collect()
}

/// One timed step: its time and memory growth.
pub fn timed(step: &mut dyn FnMut() -> f32) -> (f64, u64, f32) {
    let mark = rss_mark();
    let t0 = Instant::now();
    let loss = step();
    (t0.elapsed().as_secs_f64(), rss_growth(mark), loss)
}

/// Each way once to warm up, then `reps` rounds that run every way once in turn (so that a
/// change in the machine's load falls on all of them alike): per way the median step time,
/// the largest memory growth and the last loss.
pub fn measure(reps: usize, ways: &mut [(&str, &mut dyn FnMut() -> f32)]) -> Vec<(f64, u64, f32)> {
    for (what, step) in ways.iter_mut() {
        let (t, _, loss) = timed(*step);
        eprintln!("{what}: warm-up {t:.3}s, loss {loss}");
    }
    let mut runs = vec![Vec::new(); ways.len()];
    for _ in 0..reps {
        for (i, (_, step)) in ways.iter_mut().enumerate() {
            runs[i].push(timed(*step));
        }
    }
    ways.iter()
        .zip(runs)
        .map(|((what, _), r)| {
            let mut times: Vec<f64> = r.iter().map(|x| x.0).collect();
            let peak = r.iter().map(|x| x.1).max().unwrap_or(0);
            eprintln!("{what}: step times {times:?}, peak growth {:.1} MB", peak as f64 / 1e6);
            times.sort_by(f64::total_cmp);
            (times[times.len() / 2], peak, r.last().map_or(f32::NAN, |x| x.2))
        })
        .collect()
}

/// The loss of a language model's output head, forward + backward (gradients of hidden,
/// weight and bias, all read back), at `n x d` hidden states and a `v x d` unembedding, in
/// `p`'s dtype, three ways on the same arrays (xent-burn on the backend `xent_burn::set_cpu`
/// was given, Burn's composition, xent's own CPU pass on that same backend; see
/// `burn_lm_bench`'s docs): prints the per-step times to stderr and returns the JSON line.
pub fn bench_flex(n: usize, d: usize, v: usize, reps: usize, p: &Precision) -> String {
    let (h, t) = xent::workload::synthetic(n, d, 1.0, 0, 1);
    let (w, _) = xent::workload::synthetic(v, d, 1.0 / (d as f32).sqrt(), 0, 2);
    // Targets spread over the whole vocabulary.
    let t: Array1<i64> =
        t.iter().enumerate().map(|(i, &y)| ((y.unsigned_abs() as usize * 61 + i * 7919) % v) as i64).collect();
    let b: Array1<f32> = (0..v).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect();
    let h: Array2<f32> = h.as_standard_layout().into_owned();
    let w: Array2<f32> = w.as_standard_layout().into_owned();
    let dtype = if p.bf16 { BurnDType::BF16 } else { BurnDType::F32 };

    let flex = Device::flex();
    let device = flex.clone().autodiff();
    let hb =
        Tensor::<2>::from_data(TensorData::new(h.iter().copied().collect::<Vec<f32>>(), [n, d]), &flex).cast(dtype);
    let wb =
        Tensor::<2>::from_data(TensorData::new(w.iter().copied().collect::<Vec<f32>>(), [v, d]), &flex).cast(dtype);
    let bb = Tensor::<1>::from_data(TensorData::new(b.to_vec(), [v]), &flex);
    let targets = Tensor::<1, Int>::from_data(TensorData::new(t.to_vec(), [n]), &device);
    let cfg = LinearCe::default();
    if let Some(g) = p.grad {
        xent_burn::set_cpu(Cpu::new().with_bf16_grad(g));
    }
    // One backend for both xent ways: xent-burn's, which xent's own call uses too.
    let cpu = xent_burn::cpu();
    let xdtype = if p.bf16 { xent::DType::BF16 } else { xent::DType::F32 };
    let kernels = cpu.linear_matmul(xdtype).expect("matrix kernels");
    let terms = match cpu.bf16_grad_terms().expect("bf16 terms") {
        (gh, gw) if kernels.multiplies_bf16() => format!("[{gh},{gw}]"),
        _ => "null".into(),
    };

    // Both Burn ways: the leaves are fresh tracked tensors over the same storage each step, and
    // the step ends when all three gradients are read.
    let scalar = |x: Tensor<1>| x.cast(BurnDType::F32).into_scalar::<f32>();
    let burn_step = |fused: bool| -> f32 {
        let hh = hb.clone().autodiff().require_grad();
        let ww = wb.clone().autodiff().require_grad();
        let bbb = bb.clone().autodiff().require_grad();
        let loss = if fused {
            xent_burn::linear_cross_entropy(hh.clone(), ww.clone(), Some(bbb.clone()), targets.clone(), &cfg)
                .expect("xent-burn linear_cross_entropy")
        } else {
            let logits = hh.clone().matmul(ww.clone().transpose()) + bbb.clone().cast(dtype).unsqueeze_dim(0);
            CrossEntropyLossConfig::new().init(&device).forward(logits, targets.clone())
        };
        let grads = loss.backward();
        let gh = hh.grad(&grads).expect("d hidden");
        let gw = ww.grad(&grads).expect("d weight");
        let gb = bbb.grad(&grads).expect("d bias");
        #[allow(clippy::single_range_in_vec_init)] // Burn's slice of one axis
        let probe: f32 = scalar(gh.slice([0..1, 0..1]).reshape([1]))
            + scalar(gw.slice([0..1, 0..1]).reshape([1]))
            + scalar(gb.slice([0..1]));
        assert!(probe.is_finite(), "non-finite gradient");
        scalar(loss)
    };

    // xent's own call on the same (rounded) values.
    let (h16, w16) = (h.mapv(bf16::from_f32), w.mapv(bf16::from_f32));
    let (hx, wx): (Logits<'_>, Logits<'_>) =
        if p.bf16 { (h16.view().into(), w16.view().into()) } else { (h.view().into(), w.view().into()) };
    let mut native = || {
        let out = cpu.linear_cross_entropy(hx, wx, Some(b.view()), t.view(), &cfg).expect("LinearCe");
        assert!(out.grad_hidden.is_some() && out.grad_weight.is_some() && out.grad_bias.is_some());
        out.loss as f32
    };
    let mut fused = || burn_step(true);
    let mut composed = || burn_step(false);
    let mut ways: [(&str, &mut dyn FnMut() -> f32); 3] =
        [("native", &mut native), ("xent-burn", &mut fused), ("burn ref", &mut composed)];
    let r = measure(reps, &mut ways);
    let [(s_native, _, l_native), (s_xent, _, l_xent), (s_ref, _, l_ref)] = r[..] else { unreachable!("three ways") };
    let [p_native, p_xent, p_ref] = measure_memory(reps.min(2), &mut ways)[..] else { unreachable!("three ways") };

    format!(
        "{{\"framework\":\"burn\",\"backend\":\"flex\",\"n\":{n},\"d\":{d},\"v\":{v},\"dtype\":\"{}\",\
         \"cpu_matmul\":\"{kernels}\",\"grad_terms\":{terms},\"reps\":{reps},\
         \"step_s_xent\":{s_xent:.4},\"step_s_ref\":{s_ref:.4},\"step_s_native\":{s_native:.4},\
         \"peak_bytes_xent\":{p_xent},\"peak_bytes_ref\":{p_ref},\"peak_bytes_native\":{p_native},\
         \"loss_xent\":{l_xent},\"loss_ref\":{l_ref},\"loss_native\":{l_native}}}",
        if p.bf16 { "bf16" } else { "f32" }
    )
}
