//! A small causal language model trained in Candle twice from the same initialisation on the same
//! batches: once with xent-candle's fused [`xent_candle::linear_cross_entropy`] on the hidden
//! states (the `[N, V]` logits never exist), once with `candle_nn::Linear` +
//! `candle_nn::loss::cross_entropy` (Candle's own way).
//!
//! Model: token embedding `[V, D]`, one residual MLP block (`h = x + W2 relu(W1 x + b1) + b2`,
//! width `4 D`), and an output head `[V, D]` + bias `[V]` over the vocabulary, predicting the
//! next token. Data: a fixed random Markov source over `V` tokens (each token has 4 successors
//! drawn from a Zipf law, taken with probabilities 0.5, 0.25, 0.15, 0.1), so the loss falls
//! from `log V` towards the source's entropy rate as the model learns the frequent tokens and
//! their successors. Every step is a fresh batch of `N` consecutive tokens. Optimiser: AdamW.
//!
//! Per step (interleaved: the xent model's step, the reference model's step, then xent's own
//! `Cpu::linear_cross_entropy` forward + backward on the xent model's hidden states and head of
//! that step, outside Candle), each measured the same way as `candle_linear_bench` (the shared
//! `common/bench.rs`): time, heap growth and peak RSS growth. Step 0 is the warm-up, and its
//! head-weight gradients (same initialisation, same batch) are compared; the figures are the
//! medians (times) and maxima (memory) of steps 1.. .
//!
//! `cargo run --release -p xent-candle --example candle_lm [-- --steps 20] [--n 512] [--d 256] [--v 32000]`
//! `... -- --bench N D V [--reps R] [--dtype f32|f16|bf16] [--bf16-grad split|rounded]` times the loss forward + backward
//! alone, three ways (`candle_linear_bench`'s benchmark).
//!
//! Prints the loss curves, then on its last line one JSON object: `framework`, `backend`,
//! `steps`, `final_loss` (the xent model's loss at the last step), `loss_ref` (the reference
//! model's), `max_grad_diff` (largest absolute difference of the two head-weight gradients at
//! the first step), `step_s_xent`, `step_s_ref` (median full training step: forward, backward,
//! optimiser), `step_s_native` (median of xent's own fused loss forward + backward),
//! `peak_bytes_xent`, `peak_bytes_ref` (largest growth of the process's peak RSS during a
//! training step).

#[path = "common/bench.rs"]
mod bench;

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{AdamW, Embedding, Linear, Optimizer, ParamsAdamW};
use ndarray::{Array1, Array2};
use xent::{Cpu, LinearCe};

/// SplitMix64: a small deterministic generator for the data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The Markov source: `succ[t * 4 + k]` is token `t`'s `k`-th successor.
struct Source {
    succ: Vec<u32>,
}

const SUCC_P: [f64; 4] = [0.5, 0.25, 0.15, 0.1];

impl Source {
    fn new(v: usize, rng: &mut Rng) -> Source {
        // Zipf(1.1) over the vocabulary, sampled through its CDF.
        let mut cdf: Vec<f64> = (1..=v).map(|r| (r as f64).powf(-1.1)).collect();
        for i in 1..v {
            cdf[i] += cdf[i - 1];
        }
        let total = cdf[v - 1];
        let succ = (0..v * 4)
            .map(|_| {
                let u = rng.unit() * total;
                cdf.partition_point(|&c| c <= u).min(v - 1) as u32
            })
            .collect();
        Source { succ }
    }

    /// `len` consecutive tokens from token 0.
    fn sample(&self, len: usize, rng: &mut Rng) -> Vec<u32> {
        let mut t = 0u32;
        (0..len)
            .map(|_| {
                let u = rng.unit();
                let mut k = 0;
                let mut acc = SUCC_P[0];
                while u >= acc && k < 3 {
                    k += 1;
                    acc += SUCC_P[k];
                }
                t = self.succ[t as usize * 4 + k];
                t
            })
            .collect()
    }
}

/// The model's parameters.
struct Lm {
    emb: Var,
    w1: Var,
    b1: Var,
    w2: Var,
    b2: Var,
    head_w: Var,
    head_b: Var,
}

impl Lm {
    /// Deterministic initialisation (the same values for every call with the same sizes).
    fn new(v: usize, d: usize) -> Result<Lm> {
        let f = 4 * d;
        let normal = |rows: usize, cols: usize, std: f32, seed: u64| -> Result<Var> {
            let (a, _) = xent::workload::synthetic(rows, cols, std, 0, seed);
            let t = Tensor::from_vec(a.into_raw_vec_and_offset().0, (rows, cols), &Device::Cpu)?;
            Var::from_tensor(&t)
        };
        Ok(Lm {
            emb: normal(v, d, 1.0, 101)?,
            w1: normal(f, d, 1.0 / (d as f32).sqrt(), 102)?,
            b1: Var::zeros(f, DType::F32, &Device::Cpu)?,
            w2: normal(d, f, 1.0 / (f as f32).sqrt(), 103)?,
            b2: Var::zeros(d, DType::F32, &Device::Cpu)?,
            head_w: normal(v, d, 1.0 / (d as f32).sqrt(), 104)?,
            head_b: Var::zeros(v, DType::F32, &Device::Cpu)?,
        })
    }

    fn vars(&self) -> Vec<Var> {
        [&self.emb, &self.w1, &self.b1, &self.w2, &self.b2, &self.head_w, &self.head_b].map(Var::clone).to_vec()
    }

    /// Hidden states `[N, D]` of tokens `ids [N]`.
    fn hidden(&self, ids: &Tensor) -> Result<Tensor> {
        let d = self.emb.dim(1)?;
        let x = Embedding::new(self.emb.as_tensor().clone(), d).forward(ids)?;
        let a = Linear::new(self.w1.as_tensor().clone(), Some(self.b1.as_tensor().clone())).forward(&x)?.relu()?;
        let m = Linear::new(self.w2.as_tensor().clone(), Some(self.b2.as_tensor().clone())).forward(&a)?;
        x + m
    }

    fn head(&self) -> Linear {
        Linear::new(self.head_w.as_tensor().clone(), Some(self.head_b.as_tensor().clone()))
    }
}

/// What a training step returns: the loss, the head-weight gradient (kept at the first step)
/// and the hidden states (for xent's own call).
struct Step {
    loss: f32,
    grad_head: Option<Tensor>,
    hidden: Tensor,
}

/// One training step (forward, backward, AdamW) of `lm` on `ids -> targets`, with xent's fused
/// loss or Candle's.
fn train_step(lm: &Lm, opt: &mut AdamW, ids: &Tensor, targets: &Tensor, fused: bool, keep: bool) -> Result<Step> {
    let h = lm.hidden(ids)?;
    let loss = if fused {
        xent_candle::linear_cross_entropy(&h, &lm.head_w, Some(&lm.head_b), targets, &LinearCe::default())?
    } else {
        candle_nn::loss::cross_entropy(&lm.head().forward(&h)?, targets)?
    };
    let grads = loss.backward()?;
    opt.step(&grads)?;
    let grad_head = if keep { grads.get(&lm.head_w).cloned() } else { None };
    Ok(Step { loss: loss.to_scalar::<f32>()?, grad_head, hidden: h.detach() })
}

fn array2(t: &Tensor) -> Result<Array2<f32>> {
    let (r, c) = t.dims2()?;
    Array2::from_shape_vec((r, c), t.flatten_all()?.to_vec1()?).map_err(candle_core::Error::wrap)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench") {
        return bench::run(&args);
    }
    let opt_num = |flag: &str, default: usize| {
        args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(default)
    };
    let (steps, n, d, v) =
        (opt_num("--steps", 20).max(2), opt_num("--n", 512), opt_num("--d", 256), opt_num("--v", 32000));
    let dev = Device::Cpu;
    let mut rng = Rng(42);
    let source = Source::new(v, &mut rng);
    let tokens = source.sample(steps * n + 1, &mut rng);
    let batch = |s: usize| -> Result<(Tensor, Tensor, Vec<i64>)> {
        let ids = &tokens[s * n..s * n + n];
        let next = &tokens[s * n + 1..s * n + n + 1];
        Ok((Tensor::new(ids, &dev)?, Tensor::new(next, &dev)?, next.iter().map(|&t| t as i64).collect()))
    };
    eprintln!("candle_lm: N={n} tokens per step, D={d}, V={v}, {steps} steps, AdamW lr 3e-3, f32, CPU");

    let params = ParamsAdamW { lr: 3e-3, weight_decay: 0.0, ..Default::default() };
    let (lm_x, lm_r) = (Lm::new(v, d)?, Lm::new(v, d)?);
    let (mut opt_x, mut opt_r) = (AdamW::new(lm_x.vars(), params.clone())?, AdamW::new(lm_r.vars(), params)?);
    let cpu = Cpu::new();
    let cfg = LinearCe::default();

    let (mut sx, mut sr, mut sn) = (Vec::new(), Vec::new(), Vec::new());
    let (mut rss_x, mut rss_r, mut heap_x, mut heap_r) = (0, 0, 0, 0);
    let (mut last_x, mut last_r, mut max_grad_diff) = (f32::NAN, f32::NAN, f32::NAN);
    println!("step  loss_xent  loss_ref  step_s_xent  step_s_ref");
    for s in 0..steps {
        let (ids, targets, t) = batch(s)?;
        let first = s == 0;
        let (tx, hx, rx, out_x) = bench::measure(|| train_step(&lm_x, &mut opt_x, &ids, &targets, true, first))?;
        let (tr, hr, rr, out_r) = bench::measure(|| train_step(&lm_r, &mut opt_r, &ids, &targets, false, first))?;
        // xent's own fused loss forward + backward on the same arrays, outside Candle.
        let (h, w, b) = (array2(&out_x.hidden)?, array2(lm_x.head_w.as_tensor())?, lm_x.head_b.to_vec1::<f32>()?);
        let b = Array1::from(b);
        let (tn, ..) = bench::measure(|| {
            cpu.linear_cross_entropy(&h, &w, Some(b.view()), &t[..], &cfg).map_err(candle_core::Error::wrap)
        })?;
        if let (Some(gx), Some(gr)) = (&out_x.grad_head, &out_r.grad_head) {
            max_grad_diff = (gx - gr)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let scale = gr.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            eprintln!(
                "step 0: head-weight gradients differ by at most {max_grad_diff:e} (largest entry {scale:e}); \
                 losses {} vs {}",
                out_x.loss, out_r.loss
            );
        }
        if !first {
            sx.push(tx);
            sr.push(tr);
            sn.push(tn);
            (rss_x, rss_r, heap_x, heap_r) = (rss_x.max(rx), rss_r.max(rr), heap_x.max(hx), heap_r.max(hr));
        }
        (last_x, last_r) = (out_x.loss, out_r.loss);
        if s % 2 == 0 || s + 1 == steps {
            println!("{s:4}  {:9.4}  {:8.4}  {tx:11.3}  {tr:10.3}", out_x.loss, out_r.loss);
        }
    }
    let (step_x, step_r, step_n) = (bench::median(&sx), bench::median(&sr), bench::median(&sn));
    eprintln!(
        "median step: xent {step_x:.3} s, candle_nn {step_r:.3} s ({:.2}x), native loss alone {step_n:.3} s; \
         peak RSS growth per step: xent {:.1} MB, candle_nn {:.1} MB; heap growth: xent {:.1} MB, candle_nn {:.1} MB",
        step_r / step_x,
        rss_x as f64 / 1e6,
        rss_r as f64 / 1e6,
        heap_x as f64 / 1e6,
        heap_r as f64 / 1e6,
    );
    println!(
        "{{\"framework\": \"candle\", \"backend\": \"cpu\", \"steps\": {steps}, \"final_loss\": {last_x}, \
         \"loss_ref\": {last_r}, \"max_grad_diff\": {max_grad_diff:e}, \"step_s_xent\": {step_x}, \
         \"step_s_ref\": {step_r}, \"step_s_native\": {step_n}, \"peak_bytes_xent\": {rss_x}, \
         \"peak_bytes_ref\": {rss_r}}}"
    );
    Ok(())
}
