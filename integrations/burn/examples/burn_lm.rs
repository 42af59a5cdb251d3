//! A small causal language model trained on Flex (Burn's CPU backend) under autodiff, twice
//! from the same initialisation and on the same tokens: once with xent-burn's
//! [`LinearCrossEntropy`] output head (the `[N, V]` logits never exist), once with Burn's own
//! `Linear` + `CrossEntropyLoss`. The two runs alternate step by step, so that a change in the
//! machine's load falls on both alike.
//!
//! ```text
//! cargo run --release -p xent-burn --example burn_lm                      # N=512 D=256 V=32000, 20 steps
//! cargo run --release -p xent-burn --example burn_lm -- --steps 40 [--rows N] [--dim D] [--vocab V] [--lr LR]
//! cargo run --release -p xent-burn --example burn_lm -- --bench 4096 512 32000 [REPS] [--dtype bf16] [--bf16-grad rounded]
//! ```
//!
//! The model: token embedding `[V, D]`, one residual MLP block (`D -> 4D -> D`, GELU), then the
//! output head `[V, D]` + bias over the next token (a context of one token). The data: a fixed
//! random Markov source over 512 token ids spread over the vocabulary, each followed by one of
//! four successors with probabilities 0.55/0.25/0.15/0.05 (entropy 1.15 nats): the loss starts
//! near `ln V` and falls as the model learns which tokens occur and which follow which. Adam.
//!
//! Prints both loss curves (a line every few steps) and, last, one JSON line:
//! `{"framework":"burn","backend":"flex","steps","final_loss","loss_ref","max_grad_diff",
//! "step_s_xent","step_s_ref","step_s_native","peak_bytes_xent","peak_bytes_ref"}`:
//! `final_loss` and `loss_ref` are the last step's losses of the two runs; `max_grad_diff` the
//! largest difference between the two runs' gradients of the head weight at step 1 (same
//! parameters, same batch); `step_s_*` the median time of a whole training step (forward,
//! backward, optimiser) of each run, and `step_s_native` of xent's own
//! `Cpu::linear_cross_entropy` (forward + backward of the head's loss alone, outside Burn) on
//! the final model's hidden states, head weight and bias; `peak_bytes_*` the growth of the
//! process's resident set during one more training step of each model after the timed ones
//! (the high-water mark as in `burn_lm_bench`), with glibc's allocator set to hand freed
//! blocks back to the system at once, so that neither way's growth hides in memory that the
//! other way's step freed and the allocator kept (the largest of 3 such steps per way).
//!
//! `--bench N D V [REPS] [--dtype f32|bf16] [--bf16-grad split|rounded]` times the head's loss
//! alone three ways, as `burn_lm_bench --bench-flex` (the same code).

#[path = "shared/lm_bench.rs"]
mod lm_bench;

use burn::module::Param;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Embedding, EmbeddingConfig, Gelu, Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use ndarray::{Array1, Array2};
use xent::{Cpu, LinearCe};
use xent_burn::{LinearCrossEntropy, LinearCrossEntropyConfig};

/// Embedding and one residual MLP block: the hidden states `[N, D]` of `N` tokens.
#[derive(Module, Debug)]
struct Body {
    embed: Embedding,
    up: Linear,
    down: Linear,
    act: Gelu,
}

impl Body {
    fn new(v: usize, d: usize, device: &Device) -> Body {
        Body {
            embed: EmbeddingConfig::new(v, d).init(device),
            up: LinearConfig::new(d, 4 * d).init(device),
            down: LinearConfig::new(4 * d, d).init(device),
            act: Gelu::new(),
        }
    }

    fn forward(&self, tokens: Tensor<1, Int>) -> Tensor<2> {
        let n = tokens.dims()[0];
        let d = self.embed.weight.dims()[1];
        let x = self.embed.forward(tokens.reshape([1, n])).reshape([n, d]);
        x.clone() + self.down.forward(self.act.forward(self.up.forward(x)))
    }
}

/// The model with xent-burn's fused head.
#[derive(Module, Debug)]
struct XentLm {
    body: Body,
    head: LinearCrossEntropy,
}

/// The same model with Burn's `Linear` head (and `CrossEntropyLoss`).
#[derive(Module, Debug)]
struct RefLm {
    body: Body,
    head: Linear,
}

/// A fixed random Markov source: `states` token ids spread over `[0, v)`, each followed by one
/// of four successors. Returns `len` tokens of one chain.
fn markov_tokens(len: usize, v: usize, seed: u64) -> Vec<i64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s >> 11
    };
    let states = 512.min(v);
    let gap = v / states;
    let id = |k: usize| (k * gap + (k * 37) % gap) as i64;
    let succ: Vec<[usize; 4]> = (0..states).map(|_| std::array::from_fn(|_| next() as usize % states)).collect();
    let cumulative = [0.55, 0.80, 0.95, 1.0];
    let mut k = 0;
    (0..len)
        .map(|_| {
            let t = id(k);
            let u = (next() as f64) / (1u64 << 53) as f64;
            k = succ[k][cumulative.iter().position(|&c| u < c).unwrap_or(3)];
            t
        })
        .collect()
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 values")
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

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--bench") {
        let precision = lm_bench::Precision::take(&mut args);
        let i = args.iter().position(|a| a == "--bench").unwrap_or(i);
        let nums: Vec<usize> = args[i + 1..].iter().map_while(|a| a.parse().ok()).collect();
        let (n, d, v, reps) = match nums[..] {
            [n, d, v] => (n, d, v, 3),
            [n, d, v, r, ..] => (n, d, v, r),
            _ => {
                eprintln!("usage: burn_lm --bench N D V [REPS] [--dtype f32|bf16] [--bf16-grad split|rounded]");
                std::process::exit(2);
            }
        };
        println!("{}", lm_bench::bench_flex(n, d, v, reps, &precision));
        return;
    }
    let steps: usize = arg(&args, "--steps", 20);
    let (n, d, v) = (arg(&args, "--rows", 512), arg(&args, "--dim", 256), arg(&args, "--vocab", 32000));
    let lr: f64 = arg(&args, "--lr", 1e-2);
    assert!(steps > 0 && n > 0 && d > 0 && v > 0, "positive sizes and steps");

    let device = Device::flex().autodiff();
    device.seed(42);
    let tokens = markov_tokens(steps * n + 1, v, 7);
    let batch = |step: usize| {
        let x = &tokens[step * n..(step + 1) * n];
        let y = &tokens[step * n + 1..(step + 1) * n + 1];
        (
            Tensor::<1, Int>::from_data(TensorData::new(x.to_vec(), [n]), &device),
            Tensor::<1, Int>::from_data(TensorData::new(y.to_vec(), [n]), &device),
        )
    };

    // One initialisation, two models: the reference head holds the same weight as Burn's
    // `Linear` expects it (`[D, V]`, here the transposed view of the `[V, D]` values).
    let body = Body::new(v, d, &device);
    let head = LinearCrossEntropyConfig::new(d, v).init(&device);
    let ref_head = Linear {
        weight: Param::from_tensor(head.weight.val().transpose().detach()),
        bias: head.bias.as_ref().map(|b| Param::from_tensor(b.val().detach())),
    };
    let mut xm = XentLm { body: body.clone(), head };
    let mut rm = RefLm { body, head: ref_head };
    let mut xo = AdamConfig::new().init();
    let mut ro = AdamConfig::new().init();
    let ce = CrossEntropyLossConfig::new().init(&device);

    println!("burn_lm: N={n} D={d} V={v}, {steps} steps, Adam lr {lr}; loss starts near ln V = {:.3}", (v as f64).ln());
    println!("{:>5}  {:>10}  {:>10}  {:>8}  {:>8}", "step", "xent loss", "burn loss", "xent s", "burn s");
    let every = (steps / 10).max(1);
    let (mut times_x, mut times_r) = (Vec::new(), Vec::new());
    let (mut final_loss, mut loss_ref, mut max_grad_diff) = (f32::NAN, f32::NAN, f32::NAN);
    for step in 0..steps {
        let (x, y) = batch(step);
        let mut gw_x = None;
        let mut step_x = || {
            let loss = xm.head.forward(xm.body.forward(x.clone()), y.clone()).expect("xent-burn head loss");
            let grads = loss.backward();
            if step == 0 {
                gw_x = Some(host(xm.head.weight.grad(&grads).expect("d head weight")));
            }
            let grads = GradientsParams::from_grads(grads, &xm);
            xm = xo.step(lr, xm.clone(), grads);
            loss.into_scalar::<f32>()
        };
        let (tx, _, lx) = lm_bench::timed(&mut step_x);
        let mut gw_r = None;
        let mut step_r = || {
            let logits = rm.head.forward(rm.body.forward(x.clone()));
            let loss = ce.forward(logits, y.clone());
            let grads = loss.backward();
            if step == 0 {
                // `[D, V]`: transposed to the xent head's `[V, D]`.
                gw_r = Some(host(rm.head.weight.grad(&grads).expect("d head weight").transpose()));
            }
            let grads = GradientsParams::from_grads(grads, &rm);
            rm = ro.step(lr, rm.clone(), grads);
            loss.into_scalar::<f32>()
        };
        let (tr, _, lr_) = lm_bench::timed(&mut step_r);
        if let (Some(a), Some(b)) = (gw_x, gw_r) {
            max_grad_diff = a.iter().zip(&b).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
            println!("step 1: head-weight gradients differ by at most {max_grad_diff:e} (largest entry {scale:e})");
        }
        times_x.push(tx);
        times_r.push(tr);
        (final_loss, loss_ref) = (lx, lr_);
        if (step + 1) % every == 0 || step + 1 == steps {
            println!("{:>5}  {lx:>10.4}  {lr_:>10.4}  {tx:>8.3}  {tr:>8.3}", step + 1);
        }
    }
    // Medians over the steps after the first (which warms up both).
    let rest = |t: &[f64]| median(if t.len() > 1 { t[1..].to_vec() } else { t.to_vec() });
    let (step_s_xent, step_s_ref) = (rest(&times_x), rest(&times_r));

    // xent's own pass on the final model's head inputs, outside Burn.
    let (x, y) = batch(steps - 1);
    let h = Array2::from_shape_vec((n, d), host(xm.body.forward(x).detach())).expect("[N, D]");
    let w = Array2::from_shape_vec((v, d), host(xm.head.weight.val().detach())).expect("[V, D]");
    let b = Array1::from(host(xm.head.bias.as_ref().expect("a bias").val().detach()));
    let t = Array1::from(y.into_data().convert::<i64>().try_to_vec::<i64>().expect("i64 targets"));
    let cpu = Cpu::new();
    let cfg = LinearCe::default();
    let mut native = || {
        let out = cpu.linear_cross_entropy(h.view(), w.view(), Some(b.view()), t.view(), &cfg).expect("LinearCe");
        assert!(out.grad_hidden.is_some() && out.grad_weight.is_some() && out.grad_bias.is_some());
        out.loss as f32
    };
    let step_s_native = lm_bench::measure(3, &mut [("native", &mut native)])[0].0;

    // Memory: training steps of copies of both models (and optimiser states) on the last
    // batch, alternating, with freed memory handed back at once (see `return_freed_memory`).
    let (x, y) = batch(steps - 1);
    let (mut xm2, mut xo2, mut rm2, mut ro2) = (xm.clone(), xo.clone(), rm.clone(), ro.clone());
    let mut probe_x = || {
        let loss = xm2.head.forward(xm2.body.forward(x.clone()), y.clone()).expect("xent-burn head loss");
        let grads = GradientsParams::from_grads(loss.backward(), &xm2);
        xm2 = xo2.step(lr, xm2.clone(), grads);
        loss.into_scalar::<f32>()
    };
    let mut probe_r = || {
        let loss = ce.forward(rm2.head.forward(rm2.body.forward(x.clone())), y.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &rm2);
        rm2 = ro2.step(lr, rm2.clone(), grads);
        loss.into_scalar::<f32>()
    };
    let peaks = lm_bench::measure_memory(3, &mut [("xent-burn memory", &mut probe_x), ("burn memory", &mut probe_r)]);
    let (peak_x, peak_r) = (peaks[0], peaks[1]);
    eprintln!("step times (s): xent {times_x:.3?}, burn {times_r:.3?}");

    println!(
        "{{\"framework\":\"burn\",\"backend\":\"flex\",\"steps\":{steps},\"final_loss\":{final_loss},\
         \"loss_ref\":{loss_ref},\"max_grad_diff\":{max_grad_diff:e},\"step_s_xent\":{step_s_xent:.4},\
         \"step_s_ref\":{step_s_ref:.4},\"step_s_native\":{step_s_native:.4},\"peak_bytes_xent\":{peak_x},\
         \"peak_bytes_ref\":{peak_r}}}"
    );
}
