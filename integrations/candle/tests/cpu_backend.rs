//! `xent_candle::set_cpu`: the ops run on the CPU backend the caller chose (its threads,
//! matrix-product kernels and bf16 gradient precision), checked against xent's own calls on a
//! backend set the same way. A test binary of its own: the setting is process-wide.

use candle_core::{DType, Tensor};
use ndarray::{Array1, Array2};
use xent::cpu::{Bf16Grad, CpuMatmul};
use xent::half::bf16;
use xent::{Cpu, LinearCe, LinearLogprobs};

mod common;
use common::{f32s, inputs, targets_tensor, var, DEV};

/// bf16 values of a Candle tensor as an ndarray `[r, c]`.
fn bf16_array(t: &Tensor, r: usize, c: usize) -> Array2<bf16> {
    Array2::from_shape_vec((r, c), t.flatten_all().unwrap().to_vec1::<bf16>().unwrap()).unwrap()
}

/// f32 values rounded to bf16 and back, as Candle rounds a bf16 input's gradient.
fn as_bf16(x: impl IntoIterator<Item = f32>) -> Vec<f32> {
    x.into_iter().map(|v| bf16::from_f32(v).to_f32()).collect()
}

#[test]
fn ops_run_on_the_backend_set() {
    // Odd sizes; every 5th row ignored.
    let (n, d, v) = (37, 64, 1031);
    let (h0, w0, _, t) = inputs(n, d, v, 5, 11);
    let targets = targets_tensor(&t);
    let (h, w) = (var(&h0, DType::BF16), var(&w0, DType::BF16));
    let (ha, wa) = (bf16_array(h.as_tensor(), n, d), bf16_array(w.as_tensor(), v, d));
    // Upstream gradients of the log-probabilities and entropies, of either sign.
    let up = |k: usize| {
        let x: Vec<f32> = (0..n).map(|i| ((i * k) % 11) as f32 / 4.0 - 1.25).collect();
        Tensor::from_vec(x, n, &DEV).unwrap().to_dtype(DType::BF16).unwrap() // exact in bf16
    };
    let (a0, b0) = (up(7), up(5));
    let (a, b) = (Array1::from(f32s(&a0)), Array1::from(f32s(&b0)));
    let (ce, lp) = (LinearCe::default(), LinearLogprobs::default());

    // Gradients w.r.t. hidden and weight through Candle, on the backend xent-candle holds now:
    // of the mean loss, then of `sum(a logp + b entropy)`.
    let through_candle = || -> Vec<Vec<f32>> {
        let loss = xent_candle::linear_cross_entropy(&h, &w, None, &targets, &ce).unwrap();
        let g = loss.backward().unwrap();
        let (logp, ent) = xent_candle::linear_logprobs(&h, &w, None, &targets, &lp).unwrap();
        let mixed = ((logp * &a0).unwrap().sum_all().unwrap() + (ent * &b0).unwrap().sum_all().unwrap()).unwrap();
        let g2 = mixed.backward().unwrap();
        [g.get(&h), g.get(&w), g2.get(&h), g2.get(&w)].into_iter().map(|x| f32s(x.unwrap())).collect()
    };
    // The same on xent's own calls on `cpu`, rounded to bf16 as Candle's gradients are.
    let native = |cpu: &Cpu| -> Vec<Vec<f32>> {
        let o = cpu.linear_cross_entropy(ha.view(), wa.view(), None, &t[..], &ce).unwrap();
        let l = cpu.linear_logprobs(ha.view(), wa.view(), None, &t[..], &lp, Some((a.view(), b.view()))).unwrap();
        [o.grad_hidden, o.grad_weight, l.grad_hidden, l.grad_weight]
            .into_iter()
            .map(|g| as_bf16(g.unwrap().to_f32().iter().copied()))
            .collect()
    };

    // By default: one thread per core and the kernels the CPU has.
    assert_eq!(xent_candle::cpu().threads(), Cpu::new().threads());
    let default = through_candle();
    assert_eq!(default, native(&Cpu::new()));

    // One thread, PyTorch's bf16 precision for the gradient: the same bits as xent's own call
    // with that precision (results do not depend on the thread count).
    xent_candle::set_cpu(Cpu::with_threads(1).unwrap().with_bf16_grad(Bf16Grad::Rounded));
    assert_eq!(xent_candle::cpu().threads(), 1);
    assert_eq!(xent_candle::cpu().bf16_grad_terms().unwrap(), (1, 1));
    let rounded = through_candle();
    assert_eq!(rounded, native(&Cpu::new().with_bf16_grad(Bf16Grad::Rounded)));
    let kernels = xent_candle::cpu().linear_matmul(xent::DType::BF16).unwrap();
    if kernels == CpuMatmul::F32 {
        // f32 products do not read the precision: nothing to tell apart.
        assert_eq!(rounded, default);
        println!("set_cpu's bf16 precision: skipped, this CPU has no bf16 matrix kernels");
    } else if xent_candle::cpu().bf16_grad_terms().unwrap() != Cpu::new().bf16_grad_terms().unwrap() {
        // Rounding G to bf16 changes some gradients by more than their bf16 rounding.
        let differ = rounded.iter().zip(&default).map(|(r, d)| r.iter().zip(d).filter(|(x, y)| x != y).count());
        let differ: Vec<usize> = differ.collect();
        assert!(differ.iter().all(|&c| c > 0), "{differ:?} entries differ");
        println!("set_cpu's bf16 precision on {kernels}: {differ:?} gradient entries differ from the default");
    }

    // The matrix kernels: f32 products, as xent's own call on f32 kernels.
    xent_candle::set_cpu(Cpu::new().with_matmul(CpuMatmul::F32).unwrap());
    assert_eq!(xent_candle::cpu().linear_matmul(xent::DType::BF16).unwrap(), CpuMatmul::F32);
    assert_eq!(through_candle(), native(&Cpu::new().with_matmul(CpuMatmul::F32).unwrap()));
}
