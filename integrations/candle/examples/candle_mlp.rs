//! A Candle MLP classifier trained on synthetic data with xent's loss, compared with
//! `candle_nn::loss::cross_entropy` on the same batches.
//!
//! Prints the loss curve, then one JSON line: `framework`, `steps`, `final_loss`, `loss_ref`
//! (Candle's own loss of the final model on the same batch), `max_grad_diff` (largest difference
//! between the two losses' parameter gradients), and `step_s_xent` / `step_s_ref` (median time
//! of a training step with each loss).
//!
//! `cargo run --release -p xent-candle --example candle_mlp [-- --steps 200]`
//! `... -- --bench 4096 32000` times the loss alone (forward + backward) at N x V instead.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var, D};
use candle_nn::{linear, Linear, Module, Optimizer, VarBuilder, VarMap, SGD};
use xent::CrossEntropy;

const IN: usize = 64;
const HIDDEN: usize = 128;
const CLASSES: usize = 10;
const BATCH: usize = 512;

struct Mlp {
    a: Linear,
    b: Linear,
}

impl Mlp {
    fn new(vb: VarBuilder) -> Result<Mlp> {
        Ok(Mlp { a: linear(IN, HIDDEN, vb.pp("a"))?, b: linear(HIDDEN, CLASSES, vb.pp("b"))? })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.b.forward(&self.a.forward(x)?.relu()?)
    }
}

/// A batch from a hidden linear teacher: features and their argmax labels.
fn batch(step: u64) -> Result<(Tensor, Tensor)> {
    let (x, _) = xent::workload::synthetic(BATCH, IN, 1.0, 0, 1000 + step);
    let (w, _) = xent::workload::synthetic(IN, CLASSES, 1.0, 0, 7);
    let labels: Vec<u32> = x
        .dot(&w)
        .rows()
        .into_iter()
        .map(|r| r.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32)
        .collect();
    Ok((
        Tensor::from_vec(x.into_raw_vec_and_offset().0, (BATCH, IN), &Device::Cpu)?,
        Tensor::from_vec(labels, BATCH, &Device::Cpu)?,
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench(n: usize, v: usize) -> Result<()> {
    let (x, t) = xent::workload::synthetic(n, v, 3.0, 0, 0);
    let logits = Var::from_tensor(&Tensor::from_vec(x.into_raw_vec_and_offset().0, (n, v), &Device::Cpu)?)?;
    let targets = Tensor::from_vec(t.iter().map(|&y| y as u32).collect::<Vec<u32>>(), n, &Device::Cpu)?;
    let cfg = CrossEntropy::default();
    let time = |f: &dyn Fn() -> Result<f32>| -> Result<(f64, f32)> {
        let loss = f()?; // warm-up
        let mut ts = Vec::new();
        for _ in 0..3 {
            let t0 = Instant::now();
            f()?;
            ts.push(t0.elapsed().as_secs_f64());
        }
        Ok((median(ts), loss))
    };
    let (s_x, l_x) = time(&|| {
        let loss = xent_candle::cross_entropy(logits.as_tensor(), &targets, &cfg)?;
        let g = loss.backward()?;
        let _ = g.get(logits.as_tensor()).expect("gradient");
        loss.to_scalar::<f32>()
    })?;
    let (s_r, l_r) = time(&|| {
        let loss = candle_nn::loss::cross_entropy(logits.as_tensor(), &targets)?;
        let g = loss.backward()?;
        let _ = g.get(logits.as_tensor()).expect("gradient");
        loss.to_scalar::<f32>()
    })?;
    println!(
        "{{\"framework\": \"candle\", \"bench\": \"loss fwd+bwd\", \"n\": {n}, \"v\": {v}, \"loss\": {l_x}, \"loss_ref\": {l_r}, \"s_xent\": {s_x}, \"s_ref\": {s_r}, \"speedup\": {}}}",
        s_r / s_x
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--bench") {
        let n = args.get(i + 1).and_then(|s| s.parse().ok()).unwrap_or(4096);
        let v = args.get(i + 2).and_then(|s| s.parse().ok()).unwrap_or(32000);
        return bench(n, v);
    }
    let steps: usize =
        args.iter().position(|a| a == "--steps").and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(200);
    let cfg = CrossEntropy::default();
    let run = |use_xent: bool, steps: usize| -> Result<(VarMap, Mlp, Vec<f64>)> {
        let vars = VarMap::new();
        let model = Mlp::new(VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))?;
        let mut opt = SGD::new(vars.all_vars(), 0.5)?;
        let mut times = Vec::new();
        for step in 0..steps {
            let (x, y) = batch(step as u64)?;
            let t0 = Instant::now();
            let logits = model.forward(&x)?;
            let loss = if use_xent {
                xent_candle::cross_entropy(&logits, &y, &cfg)?
            } else {
                candle_nn::loss::cross_entropy(&logits, &y)?
            };
            opt.backward_step(&loss)?;
            times.push(t0.elapsed().as_secs_f64());
            if use_xent && (step % 25 == 0 || step + 1 == steps) {
                println!("step {step:4}: loss {:.4}", loss.to_scalar::<f32>()?);
            }
        }
        Ok((vars, model, times))
    };
    let (vars, model, times) = run(true, steps)?;
    let (_, _, times_ref) = run(false, steps)?;
    // Both losses and their gradients for the trained model on one batch.
    let (x, y) = batch(99_999)?;
    let logits = model.forward(&x)?;
    let ours = xent_candle::cross_entropy(&logits, &y, &cfg)?;
    let theirs = candle_nn::loss::cross_entropy(&logits, &y)?;
    let (g1, g2) = (ours.backward()?, theirs.backward()?);
    let mut max_diff = 0.0f32;
    for var in vars.all_vars() {
        let (a, b) = (g1.get(var.as_tensor()).expect("grad"), g2.get(var.as_tensor()).expect("grad"));
        max_diff = max_diff.max((a - b)?.abs()?.flatten_all()?.max(D::Minus1)?.to_scalar::<f32>()?);
    }
    println!(
        "{{\"framework\": \"candle\", \"steps\": {steps}, \"final_loss\": {}, \"loss_ref\": {}, \"max_grad_diff\": {max_diff:e}, \"step_s_xent\": {}, \"step_s_ref\": {}}}",
        ours.to_scalar::<f32>()?,
        theirs.to_scalar::<f32>()?,
        median(times),
        median(times_ref)
    );
    Ok(())
}
