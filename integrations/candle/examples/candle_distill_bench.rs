//! Knowledge distillation, forward + backward through Candle's autograd on the CPU, two ways in
//! one process on the same logits:
//!
//! - `xent`: [`xent_candle::distill`] of a student `Var` `[N, V]` towards teacher logits,
//!   `loss.backward()`, the student's gradient read from the grad store;
//! - `ref`: the same divergence composed from Candle's ops (`candle_nn::ops::log_softmax` of
//!   both at the temperature, `exp`, the difference, the product, `sum_all`, `/ N`, `* T^2`),
//!   the same backward.
//!
//! One warm-up step of each (their losses and gradients compared), then `--reps` rounds
//! (default 3), each timing one step of each way in turn; the medians are reported, with the
//! heap and peak-RSS growth per step measured as `candle_linear_bench` measures them.
//!
//! `cargo run --release -p xent-candle --example candle_distill_bench [-- --bench N V] [--reps R]
//! [--temperature T] [--mode kl|reverse-kl|jsd]` (default 4096 x 32000, T = 2, forward KL
//! (`jsd`: beta 0.5), f32 logits: student ~ 3 N(0, 1) and teacher the student plus noise).
//!
//! The last line is one JSON object: `framework`, `op` (`distill-` and the mode), `n`, `v`, `temperature`, `reps`,
//! `step_s_xent`, `step_s_ref`, `peak_bytes_xent`, `peak_bytes_ref`, `rss_bytes_xent`,
//! `rss_bytes_ref`, `loss_xent`, `loss_ref`, `max_grad_diff` (largest difference of the
//! gradients over the largest entry).

#[allow(dead_code)]
#[path = "common/bench.rs"]
mod bench;

use bench::{measure, median};
use candle_core::{Device, Result, Tensor, Var};
use xent::{Distill, DistillMode};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize, default: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default);
    let (n, v) = match args.iter().position(|a| a == "--bench") {
        Some(i) => (num(i + 1, 4096), num(i + 2, 32000)),
        None => (4096, 32000),
    };
    let reps = args.iter().position(|a| a == "--reps").map_or(3, |i| num(i + 1, 3)).max(1);
    let tau: f32 =
        args.iter().position(|a| a == "--temperature").and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(2.0);

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
    let (s, _) = xent::workload::synthetic(n, v, 3.0, 0, 1);
    let (noise, _) = xent::workload::synthetic(n, v, 1.0, 0, 2);
    let t = &s + &noise;
    let dev = Device::Cpu;
    let student = Var::from_tensor(&Tensor::from_slice(s.as_slice().expect("standard layout"), (n, v), &dev)?)?;
    let teacher = Tensor::from_slice(t.as_slice().expect("standard layout"), (n, v), &dev)?;
    let cfg = Distill::default().with_temperature(tau).with_mode(mode);

    let xent_step = || -> Result<(f32, Tensor)> {
        let loss = xent_candle::distill(&student, &teacher, &cfg)?;
        let g = loss.backward()?;
        Ok((loss.to_scalar::<f32>()?, g.get(&student).expect("grad").clone()))
    };
    let ref_step = || -> Result<(f32, Tensor)> {
        let tau = tau as f64;
        let ls = candle_nn::ops::log_softmax(&(student.as_tensor() / tau)?, 1)?;
        let lt = candle_nn::ops::log_softmax(&(&teacher / tau)?, 1)?;
        let kl = |lp: &Tensor, lq: &Tensor| (lp.exp()? * (lp - lq)?)?.sum_all();
        let d = match mode {
            DistillMode::Kl => kl(&lt, &ls)?,
            DistillMode::ReverseKl => kl(&ls, &lt)?,
            _ => {
                let lm = ((lt.exp()? + ls.exp()?)? * 0.5)?.log()?;
                ((kl(&lt, &lm)? + kl(&ls, &lm)?)? * 0.5)?
            }
        };
        let loss = ((d / n as f64)? * (tau * tau))?;
        let g = loss.backward()?;
        Ok((loss.to_scalar::<f32>()?, g.get(&student).expect("grad").clone()))
    };

    let (l_x, g_x) = xent_step()?;
    let (l_r, g_r) = ref_step()?;
    let scale = g_r.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let max_grad_diff = (&g_x - &g_r)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? / scale;
    drop((g_x, g_r));
    eprintln!("warm-up: loss xent {l_x}, composed {l_r}; max relative gradient difference {max_grad_diff:e}");

    let (mut sx, mut sr) = (Vec::new(), Vec::new());
    let (mut px, mut pr, mut rx, mut rr) = (0, 0, 0, 0);
    for rep in 0..reps {
        let (s, p, r, _) = measure(xent_step)?;
        (px, rx) = (px.max(p), rx.max(r));
        sx.push(s);
        let (s, p, r, _) = measure(ref_step)?;
        (pr, rr) = (pr.max(p), rr.max(r));
        sr.push(s);
        eprintln!("rep {rep}: xent {:.3} s, composed {:.3} s", sx[rep], sr[rep]);
    }
    let (step_x, step_r) = (median(&sx), median(&sr));
    eprintln!(
        "xent-candle: {:.2}x faster than Candle's composition, {:.3} of its peak heap growth",
        step_r / step_x,
        px as f64 / pr as f64
    );
    println!(
        "{{\"framework\": \"candle\", \"op\": \"distill-{mode_name}\", \"n\": {n}, \"v\": {v}, \"temperature\": {tau}, \
         \"reps\": {reps}, \"step_s_xent\": {step_x}, \"step_s_ref\": {step_r}, \"peak_bytes_xent\": {px}, \
         \"peak_bytes_ref\": {pr}, \"rss_bytes_xent\": {rx}, \"rss_bytes_ref\": {rr}, \"loss_xent\": {l_x}, \
         \"loss_ref\": {l_r}, \"max_grad_diff\": {max_grad_diff:e}}}"
    );
    Ok(())
}
