//! A language model's output-head loss, forward + backward through Burn's autodiff on Flex
//! (Burn's CPU backend), three ways in one process on the same arrays:
//!
//! - `xent`: [`xent_burn::linear_cross_entropy`] (the `[N, V]` logits never exist);
//! - `ref`: Burn's own `Linear`-style composition `hidden @ weight^T + bias` and
//!   `CrossEntropyLoss` (as the peer program `burn_linear_ce` times it, plus the bias);
//! - `native`: xent's own `Cpu::linear_cross_entropy` on the same host arrays, outside Burn.
//!
//! ```text
//! cargo run --release -p xent-burn --example burn_lm_bench -- --bench-flex 4096 512 32000 [REPS]
//! ```
//!
//! Each way runs once to warm up, then `REPS` rounds (default 3) run each way once in turn, so
//! that a change in the machine's load falls on all three alike; the median step time is
//! reported. Peak memory growth of a step is measured the same way for each: the process's
//! resident-set high-water mark (`VmHWM`, reset through `/proc/self/clear_refs`) minus the
//! resident set before the step, the largest over the timed steps. Prints the per-step times to
//! stderr and one JSON line: `{"framework":"burn","backend":"flex","n","d","v","step_s_xent",
//! "step_s_ref","step_s_native","peak_bytes_xent","peak_bytes_ref","peak_bytes_native",
//! "loss_xent","loss_ref","loss_native"}`.

use std::time::Instant;

use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;
use ndarray::{Array1, Array2};
use xent::{Cpu, LinearCe};

fn status_kib(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|x| x.parse().ok())
        .unwrap_or(0)
}

/// Resets the high-water mark and returns the resident set now, in bytes.
fn rss_mark() -> u64 {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    status_kib("VmRSS:") * 1024
}

/// The peak resident set since the mark, minus the resident set at the mark.
fn rss_growth(mark: u64) -> u64 {
    (status_kib("VmHWM:") * 1024).saturating_sub(mark)
}

/// One timed step: its time and memory growth.
fn timed(step: &mut dyn FnMut() -> f32) -> (f64, u64, f32) {
    let mark = rss_mark();
    let t0 = Instant::now();
    let loss = step();
    (t0.elapsed().as_secs_f64(), rss_growth(mark), loss)
}

/// Each way once to warm up, then `reps` rounds that run every way once in turn (so that a
/// change in the machine's load falls on all of them alike): per way the median step time,
/// the largest memory growth and the last loss.
fn measure(reps: usize, ways: &mut [(&str, &mut dyn FnMut() -> f32)]) -> Vec<(f64, u64, f32)> {
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

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: burn_lm_bench --bench-flex N D V [REPS]";
    if argv.first().map(String::as_str) != Some("--bench-flex") {
        eprintln!("{usage}");
        std::process::exit(2);
    }
    let nums: Vec<usize> = argv[1..]
        .iter()
        .map(|a| a.parse().ok().filter(|&x| x > 0).unwrap_or_else(|| panic!("not a positive number: {a}\n{usage}")))
        .collect();
    let (n, d, v, reps) = match nums[..] {
        [n, d, v] => (n, d, v, 3),
        [n, d, v, r] => (n, d, v, r),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };

    let (h, t) = xent::workload::synthetic(n, d, 1.0, 0, 1);
    let (w, _) = xent::workload::synthetic(v, d, 1.0 / (d as f32).sqrt(), 0, 2);
    // Targets spread over the whole vocabulary.
    let t: Array1<i64> =
        t.iter().enumerate().map(|(i, &y)| ((y.unsigned_abs() as usize * 61 + i * 7919) % v) as i64).collect();
    let b: Array1<f32> = (0..v).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect();
    let h: Array2<f32> = h.as_standard_layout().into_owned();
    let w: Array2<f32> = w.as_standard_layout().into_owned();

    let flex = Device::flex();
    let device = flex.clone().autodiff();
    let hb = Tensor::<2>::from_data(TensorData::new(h.iter().copied().collect::<Vec<f32>>(), [n, d]), &flex);
    let wb = Tensor::<2>::from_data(TensorData::new(w.iter().copied().collect::<Vec<f32>>(), [v, d]), &flex);
    let bb = Tensor::<1>::from_data(TensorData::new(b.to_vec(), [v]), &flex);
    let targets = Tensor::<1, Int>::from_data(TensorData::new(t.to_vec(), [n]), &device);
    let cfg = LinearCe::default();

    // Both Burn ways: the leaves are fresh tracked tensors over the same storage each step, and
    // the step ends when all three gradients are read.
    let burn_step = |fused: bool| -> f32 {
        let hh = hb.clone().autodiff().require_grad();
        let ww = wb.clone().autodiff().require_grad();
        let bbb = bb.clone().autodiff().require_grad();
        let loss = if fused {
            xent_burn::linear_cross_entropy(hh.clone(), ww.clone(), Some(bbb.clone()), targets.clone(), &cfg)
                .expect("xent-burn linear_cross_entropy")
        } else {
            let logits = hh.clone().matmul(ww.clone().transpose()) + bbb.clone().unsqueeze_dim(0);
            CrossEntropyLossConfig::new().init(&device).forward(logits, targets.clone())
        };
        let grads = loss.backward();
        let gh = hh.grad(&grads).expect("d hidden");
        let gw = ww.grad(&grads).expect("d weight");
        let gb = bbb.grad(&grads).expect("d bias");
        #[allow(clippy::single_range_in_vec_init)] // Burn's slice of one axis
        let probe: f32 = gh.slice([0..1, 0..1]).into_scalar::<f32>()
            + gw.slice([0..1, 0..1]).into_scalar::<f32>()
            + gb.slice([0..1]).into_scalar::<f32>();
        assert!(probe.is_finite(), "non-finite gradient");
        loss.into_scalar::<f32>()
    };

    let cpu = Cpu::new();
    let mut native = || {
        let out = cpu.linear_cross_entropy(h.view(), w.view(), Some(b.view()), t.view(), &cfg).expect("LinearCe");
        assert!(out.grad_hidden.is_some() && out.grad_weight.is_some() && out.grad_bias.is_some());
        out.loss as f32
    };
    let mut fused = || burn_step(true);
    let mut composed = || burn_step(false);
    let r = measure(reps, &mut [("native", &mut native), ("xent-burn", &mut fused), ("burn ref", &mut composed)]);
    let [(s_native, p_native, l_native), (s_xent, p_xent, l_xent), (s_ref, p_ref, l_ref)] = r[..] else {
        unreachable!("three ways")
    };

    println!(
        "{{\"framework\":\"burn\",\"backend\":\"flex\",\"n\":{n},\"d\":{d},\"v\":{v},\"reps\":{reps},\
         \"step_s_xent\":{s_xent:.4},\"step_s_ref\":{s_ref:.4},\"step_s_native\":{s_native:.4},\
         \"peak_bytes_xent\":{p_xent},\"peak_bytes_ref\":{p_ref},\"peak_bytes_native\":{p_native},\
         \"loss_xent\":{l_xent},\"loss_ref\":{l_ref},\"loss_native\":{l_native}}}"
    );
}
