//! Fused linear cross-entropy beside Burn's composed one, in one process: Burn's `matmul` +
//! `CrossEntropyLoss` forward + backward on Burn's wgpu device (as the peer program
//! `burn_linear_ce` times it), xent-burn's `linear_cross_entropy` forward + backward through
//! Burn's autodiff on the same device, Burn's `matmul` alone (`H W^T`), xent's GPU `LinearCe`
//! forward + backward, and xent's forward product alone (`H W^T`, device-resident).
//!
//! ```text
//! cargo run --release -p xent-burn --example burn_linear_bench -- 512 256 8000 5
//! ```
//!
//! Arguments: `N D V REPS [WORKSPACE_MIB]` (the linear losses' logits workspace; default: xent's,
//! an eighth of the logits up to 256 MiB). One JSON line per measurement: `what`, `n`, `d`, `v`, `median_s`,
//! `min_s`, `gflops` (6 N D V flop for forward + backward, 2 N D V for a product alone); the
//! losses of both forward + backward runs are printed to stderr, to compare.

use std::time::Instant;

use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;
use xent::gpu::MatmulLayout;
use xent::{DType, LinearCe};

fn stats(mut t: Vec<f64>) -> (f64, f64) {
    t.sort_by(f64::total_cmp);
    (t[t.len() / 2], t[0])
}

/// Times `run` once to warm up, then `reps` times.
fn time(reps: usize, mut run: impl FnMut()) -> (f64, f64) {
    run();
    stats(
        (0..reps)
            .map(|_| {
                let t0 = Instant::now();
                run();
                t0.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn report(what: &str, [n, d, v]: [usize; 3], flop: f64, (median, min): (f64, f64)) {
    println!(
        "{{\"what\":\"{what}\",\"n\":{n},\"d\":{d},\"v\":{v},\"median_s\":{median},\"min_s\":{min},\"gflops\":{}}}",
        flop / median / 1e9
    );
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("N D V REPS: positive numbers")).collect();
    let (&[n, d, v, reps], workspace) = (&args[..4.min(args.len())], args.get(4)) else {
        eprintln!("usage: burn_linear_bench N D V REPS [WORKSPACE_MIB]");
        std::process::exit(2);
    };
    let ndv = [n, d, v];
    let flop = 2.0 * (n * d * v) as f64;
    let (h, t) = xent::workload::synthetic(n, d, 1.0, 0, 1);
    let (w, _) = xent::workload::synthetic(v, d, 1.0 / (d as f32).sqrt(), 0, 2);
    let t = t.mapv(|y| y.rem_euclid(v as i64));

    // Burn: its own device, matmul and loss.
    let inner = xent_burn::wgpu_device().unwrap_or_else(|e| {
        eprintln!("burn_linear_bench: {e}");
        std::process::exit(1)
    });
    let device = inner.clone().autodiff();
    let hb = Tensor::<2>::from_data(TensorData::new(h.iter().copied().collect::<Vec<_>>(), [n, d]), &inner);
    let wb = Tensor::<2>::from_data(TensorData::new(w.iter().copied().collect::<Vec<_>>(), [v, d]), &inner);
    let targets = Tensor::<1, Int>::from_data(TensorData::new(t.to_vec(), [n]), &device);
    inner.sync().expect("sync");
    // One step through Burn's autodiff with `loss_of(hidden, weight)`: the loss, the gradients
    // of hidden and weight, read back; returns the loss.
    let step = |loss_of: &dyn Fn(Tensor<2>, Tensor<2>) -> Tensor<1>| -> f32 {
        let hg = hb.clone().autodiff().require_grad();
        let wg = wb.clone().autodiff().require_grad();
        let loss = loss_of(hg.clone(), wg.clone());
        let grads = loss.backward();
        let gh = hg.grad(&grads).expect("grad hidden");
        let gw = wg.grad(&grads).expect("grad weight");
        let value = loss.into_scalar();
        device.sync().expect("sync");
        let a: f32 = gh.slice([0..1, 0..1]).into_scalar();
        let b: f32 = gw.slice([0..1, 0..1]).into_scalar();
        assert!(a.is_finite() && b.is_finite(), "non-finite gradient");
        value
    };
    let ce = CrossEntropyLossConfig::new().init(&device);
    let burn_of = |h: Tensor<2>, w: Tensor<2>| ce.forward(h.matmul(w.transpose()), targets.clone());
    let mut burn_loss = 0.0;
    let burn = time(reps, || burn_loss = step(&burn_of));
    report("burn-matmul+cross-entropy-fwd-bwd", ndv, 3.0 * flop, burn);
    // xent-burn's fused linear loss on the same device, through Burn's autodiff: Burn's products
    // around xent's fused kernel, one row chunk at a time.
    let mut cfg = LinearCe::default();
    cfg.workspace_bytes = workspace.map(|m| m << 20);
    let xb_of = |h, w| xent_burn::linear_cross_entropy(h, w, None, targets.clone(), &cfg).expect("xent-burn linear CE");
    let mut xb_loss = 0.0;
    let xb = time(reps, || xb_loss = step(&xb_of));
    report("xent-burn-linear-ce-fwd-bwd", ndv, 3.0 * flop, xb);
    let burn_mm = time(reps, || {
        let z = hb.clone().matmul(wb.clone().transpose());
        inner.sync().expect("sync");
        let _: f32 = z.slice([0..1, 0..1]).into_scalar();
    });
    report("burn-matmul", ndv, flop, burn_mm);

    // xent: its own context on the same adapter.
    let gpu = xent::GpuContext::new().expect("a GPU adapter");
    let mut xent_loss = 0.0;
    let xent = time(reps, || {
        let out = gpu.linear_cross_entropy(h.view(), w.view(), None, t.view(), &cfg).expect("xent linear CE");
        xent_loss = out.loss;
    });
    report(&format!("xent-linear-ce-fwd-bwd-{}", gpu.matmul_kind()), ndv, 3.0 * flop, xent);
    let product = gpu.bench_matmul(MatmulLayout::Nt, (n, v, d), DType::F32, reps.max(1)).expect("xent product");
    report(&format!("xent-product-{}", gpu.matmul_kind()), ndv, flop, product);
    eprintln!("losses: burn {burn_loss}, xent-burn {xb_loss}, xent {xent_loss}");
}
