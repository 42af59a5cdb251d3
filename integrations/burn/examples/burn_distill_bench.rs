//! Knowledge distillation, forward + backward through Burn's autodiff, two ways in one process
//! on the same logits and device:
//!
//! - `xent`: [`xent_burn::distill`] of a student `[N, V]` (`require_grad`) towards teacher
//!   logits, `loss.backward()`, the student's gradient;
//! - `ref`: the same divergence composed from Burn's ops (`log_softmax` of both at the
//!   temperature, `exp`, the difference, the product, `sum_dim`, `mean`, `* T^2`), the same
//!   backward.
//!
//! One warm-up step of each (their losses and gradients compared), then `--reps` rounds
//! (default 3), each timing one step of each way in turn (the device synchronised after each);
//! the medians are reported.
//!
//! `cargo run --release -p xent-burn --example burn_distill_bench [-- --bench N V] [--reps R]
//! [--temperature T] [--mode kl|reverse-kl|jsd] [--wgpu]` (default 4096 x 32000 on Flex, T = 2,
//! forward KL (`jsd`: beta 0.5), f32 logits:
//! student ~ 3 N(0, 1) and teacher the student plus noise; `--wgpu`: Burn's wgpu device shared
//! with xent).
//!
//! The last line is one JSON object: `framework`, `backend`, `op` (`distill-` and the mode), `n`,
//! `v`, `temperature`,
//! `reps`, `step_s_xent`, `step_s_ref`, `loss_xent`, `loss_ref`, `max_grad_diff` (largest
//! difference of the gradients over the largest entry).

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use xent::{Distill, DistillMode};

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize, default: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default);
    let (n, v) = match args.iter().position(|a| a == "--bench") {
        Some(i) => (num(i + 1, 4096), num(i + 2, 32000)),
        None => (4096, 32000),
    };
    let reps = args.iter().position(|a| a == "--reps").map_or(3, |i| num(i + 1, 3)).max(1);
    let tau: f32 =
        args.iter().position(|a| a == "--temperature").and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(2.0);
    let wgpu = args.iter().any(|a| a == "--wgpu");
    let mode_name = args.iter().position(|a| a == "--mode").and_then(|i| args.get(i + 1)).map_or("kl", String::as_str);
    let mode = match mode_name {
        "kl" => DistillMode::Kl,
        "reverse-kl" => DistillMode::ReverseKl,
        "jsd" => DistillMode::Jsd { beta: 0.5 },
        other => {
            eprintln!("--mode takes kl, reverse-kl or jsd, not {other}");
            std::process::exit(2);
        }
    };
    let (device, backend) = if wgpu { (wgpu_device(), "wgpu") } else { (Device::flex(), "flex") };
    let ad = device.clone().autodiff();

    let (s, _) = xent::workload::synthetic(n, v, 3.0, 0, 1);
    let (noise, _) = xent::workload::synthetic(n, v, 1.0, 0, 2);
    let t = &s + &noise;
    let tensor =
        |a: ndarray::Array2<f32>| Tensor::<2>::from_data(TensorData::new(a.into_raw_vec_and_offset().0, [n, v]), &ad);
    let (student, teacher) = (tensor(s), tensor(t));
    let cfg = Distill::default().with_temperature(tau).with_mode(mode);
    let sync = || device.sync().expect("the device synchronises");

    let xent_step = || {
        let w = student.clone().require_grad();
        let loss = xent_burn::distill(w.clone(), teacher.clone(), &cfg).expect("valid inputs");
        let g = w.grad(&loss.clone().backward()).expect("a gradient");
        (loss, g)
    };
    let ref_step = || {
        let w = student.clone().require_grad();
        let (ls, lt) = (log_softmax(w.clone() / tau, 1), log_softmax(teacher.clone() / tau, 1));
        let kl = |lp: Tensor<2>, lq: Tensor<2>| (lp.clone().exp() * (lp - lq)).sum_dim(1);
        let d = match mode {
            DistillMode::Kl => kl(lt, ls),
            DistillMode::ReverseKl => kl(ls, lt),
            _ => {
                let lm = ((lt.clone().exp() + ls.clone().exp()) * 0.5).log();
                (kl(lt, lm.clone()) + kl(ls, lm)) * 0.5
            }
        };
        let loss = d.mean() * (tau * tau);
        let g = w.grad(&loss.clone().backward()).expect("a gradient");
        (loss, g)
    };
    let scalar = |t: Tensor<1>| t.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32")[0];

    let (l_x, g_x) = xent_step();
    let (l_r, g_r) = ref_step();
    let scale = scalar(g_r.clone().abs().max().reshape([1]));
    let max_grad_diff = scalar((g_x - g_r).abs().max().reshape([1])) / scale;
    let (l_x, l_r) = (scalar(l_x), scalar(l_r));
    eprintln!(
        "warm-up ({backend}): loss xent {l_x}, composed {l_r}; max relative gradient difference {max_grad_diff:e}"
    );

    let time = |step: &dyn Fn() -> (Tensor<1>, Tensor<2>)| {
        sync();
        let t0 = Instant::now();
        let out = step();
        sync();
        let s = t0.elapsed().as_secs_f64();
        drop(out);
        s
    };
    let (mut sx, mut sr) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        sx.push(time(&xent_step));
        sr.push(time(&ref_step));
        eprintln!("rep {rep}: xent {:.3} s, composed {:.3} s", sx[rep], sr[rep]);
    }
    let (step_x, step_r) = (median(&sx), median(&sr));
    eprintln!("xent-burn: {:.2}x faster than Burn's composition", step_r / step_x);
    println!(
        "{{\"framework\": \"burn\", \"backend\": \"{backend}\", \"op\": \"distill-{mode_name}\", \"n\": {n}, \"v\": {v}, \
         \"temperature\": {tau}, \"reps\": {reps}, \"step_s_xent\": {step_x}, \"step_s_ref\": {step_r}, \
         \"loss_xent\": {l_x}, \"loss_ref\": {l_r}, \"max_grad_diff\": {max_grad_diff:e}}}"
    );
}

#[cfg(feature = "gpu")]
fn wgpu_device() -> Device {
    xent_burn::wgpu_device().expect("Burn's wgpu device")
}

#[cfg(not(feature = "gpu"))]
fn wgpu_device() -> Device {
    eprintln!("--wgpu needs xent-burn's `gpu` feature");
    std::process::exit(2);
}
