//! A Burn MLP classifier trained end to end with xent's loss, then compared with Burn's own
//! `CrossEntropyLoss` on the same batch.
//!
//! ```text
//! cargo run --release -p xent-burn --example burn_mlp                    # wgpu (Burn's device, shared)
//! cargo run --release -p xent-burn --example burn_mlp -- --backend flex  # Burn's CPU backend
//! cargo run --release -p xent-burn --example burn_mlp -- --bench 1024 32000 [--backend flex] [--reps 5]
//! ```
//!
//! Training prints the loss every 10 steps and, last, one JSON line: `framework`, `steps`,
//! `final_loss`, `loss_ref` (Burn's loss on the same batch), `max_grad_diff` (the two losses'
//! gradients w.r.t. the logits), `step_s_xent` and `step_s_ref` (median seconds of a whole
//! training step with each loss). `--bench N V` times the loss alone (forward + backward of
//! `[N, V]` f32 logits, inside autodiff, loss read back and the device synced) for both.

use std::time::Instant;

use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use xent::CrossEntropy;

#[derive(Module, Debug)]
struct Mlp {
    hidden: Linear,
    act: Relu,
    out: Linear,
}

impl Mlp {
    fn new(inputs: usize, hidden: usize, classes: usize, device: &Device) -> Self {
        Mlp {
            hidden: LinearConfig::new(inputs, hidden).init(device),
            act: Relu::new(),
            out: LinearConfig::new(hidden, classes).init(device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.out.forward(self.act.forward(self.hidden.forward(x)))
    }
}

/// Which loss a step uses.
#[derive(Clone, Copy, PartialEq)]
enum Loss {
    Xent,
    Burn,
}

fn loss_of(which: Loss, logits: Tensor<2>, targets: Tensor<1, Int>, device: &Device) -> Tensor<1> {
    match which {
        Loss::Xent => xent_burn::cross_entropy(logits, targets, &CrossEntropy::default()).expect("valid inputs"),
        Loss::Burn => CrossEntropyLossConfig::new().init(device).forward(logits, targets),
    }
}

/// Synthetic classification data: each class a random centre in `inputs` dimensions, samples
/// the centre plus noise (seeded, the same on every backend).
fn data(rows: usize, inputs: usize, classes: usize, device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
    };
    let centres: Vec<f32> = (0..classes * inputs).map(|_| next()).collect();
    let mut x = Vec::with_capacity(rows * inputs);
    let mut y = Vec::with_capacity(rows);
    for r in 0..rows {
        let c = (r * 7919) % classes;
        y.push(c as i64);
        x.extend((0..inputs).map(|k| centres[c * inputs + k] + 0.5 * next()));
    }
    (
        Tensor::from_data(TensorData::new(x, [rows, inputs]), device),
        Tensor::from_data(TensorData::new(y, [rows]), device),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn arg<T: std::str::FromStr>(args: &[String], flag: &str, default: T) -> T {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{flag}: not a number: {v}")))
        .unwrap_or(default)
}

fn device_for(backend: &str) -> Device {
    match backend {
        "flex" => Device::flex(),
        "wgpu" => xent_burn::wgpu_device().unwrap_or_else(|e| {
            eprintln!("burn_mlp: {e}");
            std::process::exit(1)
        }),
        other => {
            eprintln!("burn_mlp: --backend wgpu|flex, not {other}");
            std::process::exit(2)
        }
    }
}

/// Loss forward + backward of `[n, v]` logits, xent's and Burn's, as the peers are timed.
fn bench(backend: &str, n: usize, v: usize, reps: usize) {
    let inner = device_for(backend);
    let device = inner.clone().autodiff();
    let (x, t) = xent::workload::synthetic(n, v, 3.0, 17, 0);
    let base = Tensor::<2>::from_data(TensorData::new(x.into_raw_vec_and_offset().0, [n, v]), &inner);
    let targets = Tensor::<1, Int>::from_data(TensorData::new(t.to_vec(), [n]), &device);
    inner.sync().expect("sync");
    let mut out = Vec::new();
    for which in [Loss::Xent, Loss::Burn] {
        // Burn's loss has no ignore_index: both see all rows (the -100 rows become class 0).
        let targets = targets.clone().clamp_min(0);
        let run = || {
            let x = base.clone().autodiff().require_grad();
            let loss = loss_of(which, x.clone(), targets.clone(), &device);
            let grads = loss.backward();
            let g = x.grad(&grads).expect("a gradient");
            let l: f32 = loss.into_scalar();
            device.sync().expect("sync");
            let g00: f32 = g.slice([0..1, 0..1]).into_scalar();
            assert!(l.is_finite() && g00.is_finite());
            l
        };
        let warm = Instant::now();
        let loss = run();
        eprintln!(
            "{}: warm-up {:.3}s",
            if which == Loss::Xent { "xent" } else { "burn" },
            warm.elapsed().as_secs_f64()
        );
        let times: Vec<f64> = (0..reps)
            .map(|_| {
                let t0 = Instant::now();
                run();
                t0.elapsed().as_secs_f64()
            })
            .collect();
        eprintln!("times {times:?}");
        out.push((median(times), loss));
    }
    println!(
        "{{\"framework\":\"burn\",\"backend\":\"{backend}\",\"n\":{n},\"v\":{v},\"reps\":{reps},\"xent_s\":{},\"burn_s\":{},\"speedup\":{},\"loss_xent\":{},\"loss_burn\":{}}}",
        out[0].0,
        out[1].0,
        out[1].0 / out[0].0,
        out[0].1,
        out[1].1
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let backend = arg(&args, "--backend", "wgpu".to_string());
    if let Some(i) = args.iter().position(|a| a == "--bench") {
        let n = args.get(i + 1).and_then(|s| s.parse().ok()).unwrap_or(1024);
        let v = args.get(i + 2).and_then(|s| s.parse().ok()).unwrap_or(32000);
        return bench(&backend, n, v, arg(&args, "--reps", 5));
    }
    let steps: usize = arg(&args, "--steps", 200);
    let (rows, inputs, hidden, classes) = (arg(&args, "--batch", 512), 64, 256, arg(&args, "--classes", 1000));
    let device = device_for(&backend).autodiff();
    let (x, y) = data(rows, inputs, classes, &device);
    let mut model = Mlp::new(inputs, hidden, classes, &device);
    let mut optim = AdamConfig::new().init();
    let lr = 3e-3;
    for step in 1..=steps {
        let loss = loss_of(Loss::Xent, model.forward(x.clone()), y.clone(), &device);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(lr, model, grads);
        // Reading the loss waits for the device: only every 10 steps.
        if step % 10 == 0 || step == steps {
            println!("step {step:4}  loss {:.6}", loss.into_scalar::<f32>());
        }
    }

    // Both losses on the final model's logits for the same batch.
    let logits = model.forward(x.clone()).detach();
    let grad_of = |which| {
        let z = logits.clone().require_grad();
        let loss = loss_of(which, z.clone(), y.clone(), &device);
        let g = z.grad(&loss.backward()).expect("a gradient");
        (loss.into_scalar::<f32>(), g.into_data().convert::<f32>().try_to_vec::<f32>().unwrap())
    };
    let (final_loss, g_xent) = grad_of(Loss::Xent);
    let (loss_ref, g_ref) = grad_of(Loss::Burn);
    let max_grad_diff = g_xent.iter().zip(&g_ref).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));

    // Whole training steps (forward, loss, backward, optimiser, device synced) with each loss.
    let mut step_s = Vec::new();
    for which in [Loss::Xent, Loss::Burn] {
        let mut m = model.clone();
        let mut o = AdamConfig::new().init();
        let times: Vec<f64> = (0..6)
            .map(|_| {
                let t0 = Instant::now();
                let loss = loss_of(which, m.forward(x.clone()), y.clone(), &device);
                let grads = GradientsParams::from_grads(loss.backward(), &m);
                m = o.step(lr, m.clone(), grads);
                device.sync().expect("sync");
                t0.elapsed().as_secs_f64()
            })
            .collect();
        step_s.push(median(times[1..].to_vec()));
    }
    println!(
        "{{\"framework\":\"burn-{backend}\",\"steps\":{steps},\"final_loss\":{final_loss},\"loss_ref\":{loss_ref},\"max_grad_diff\":{max_grad_diff},\"step_s_xent\":{},\"step_s_ref\":{}}}",
        step_s[0], step_s[1]
    );
}
