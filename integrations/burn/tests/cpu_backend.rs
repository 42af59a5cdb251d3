//! `xent_burn::set_cpu`: the CPU calls (on Flex) run on the backend the caller chose (its
//! threads, matrix-product kernels and bf16 gradient precision), checked against xent's own
//! calls on a backend set the same way. A test binary of its own: the setting is process-wide.

use burn::prelude::*;
use burn::tensor::DType as BurnDType;
use ndarray::{Array1, Array2};
use xent::cpu::{Bf16Grad, CpuMatmul};
use xent::half::bf16;
use xent::{Cpu, LinearCe, LinearLogprobs};

mod common;
use common::{host, t1, t2, ti, values};

#[test]
fn calls_run_on_the_backend_set() {
    // Odd sizes; every 5th row ignored.
    let (n, d, v) = (37, 64, 1031);
    let device = Device::flex().autodiff();
    let round = |x: Vec<f32>| -> Vec<f32> { x.into_iter().map(|x| bf16::from_f32(x).to_f32()).collect() };
    let (h0, w0) = (round(values(n * d, 1, 1.0)), round(values(v * d, 2, 0.125)));
    let t: Vec<i64> = (0..n).map(|i| if i % 5 == 4 { -100 } else { ((i * 7919) % v) as i64 }).collect();
    // Upstream gradients of the log-probabilities and entropies, of either sign.
    let (a0, b0) = (values(n, 3, 1.5), values(n, 4, 1.5));
    let mut ce = LinearCe::default();
    ce.grads_in_input_dtype = true;
    let mut lp = LinearLogprobs::default();
    lp.grads_in_input_dtype = true;

    // Gradients w.r.t. hidden and weight through Burn's autodiff on Flex, on the backend
    // xent-burn holds now: of the mean loss, then of `sum(a logp + b entropy)`.
    let through_burn = || -> Vec<Vec<f32>> {
        let h = t2(&h0, [n, d], &device).cast(BurnDType::BF16).require_grad();
        let w = t2(&w0, [v, d], &device).cast(BurnDType::BF16).require_grad();
        let loss = xent_burn::linear_cross_entropy(h.clone(), w.clone(), None, ti(&t, &device), &ce).unwrap();
        let g = loss.backward();
        let (logp, ent) = xent_burn::linear_logprobs(h.clone(), w.clone(), None, ti(&t, &device), &lp).unwrap();
        let g2 = ((logp * t1(&a0, &device)).sum() + (ent * t1(&b0, &device)).sum()).backward();
        [h.grad(&g), w.grad(&g), h.grad(&g2), w.grad(&g2)].into_iter().map(|x| host(x.unwrap())).collect()
    };
    // The same on xent's own calls on `cpu`.
    let ha = Array2::from_shape_vec((n, d), h0.iter().map(|&x| bf16::from_f32(x)).collect()).unwrap();
    let wa = Array2::from_shape_vec((v, d), w0.iter().map(|&x| bf16::from_f32(x)).collect()).unwrap();
    let (a, b) = (Array1::from(a0.clone()), Array1::from(b0.clone()));
    let native = |cpu: &Cpu| -> Vec<Vec<f32>> {
        let o = cpu.linear_cross_entropy(ha.view(), wa.view(), None, &t[..], &ce).unwrap();
        let l = cpu.linear_logprobs(ha.view(), wa.view(), None, &t[..], &lp, Some((a.view(), b.view()))).unwrap();
        [o.grad_hidden, o.grad_weight, l.grad_hidden, l.grad_weight]
            .into_iter()
            .map(|g| g.unwrap().to_f32().iter().copied().collect())
            .collect()
    };

    // By default: one thread per core and the kernels the CPU has.
    assert_eq!(xent_burn::cpu().threads(), Cpu::new().threads());
    let default = through_burn();
    assert_eq!(default, native(&Cpu::new()));

    // One thread, PyTorch's bf16 precision for the gradient: the same bits as xent's own call
    // with that precision (results do not depend on the thread count).
    xent_burn::set_cpu(Cpu::with_threads(1).unwrap().with_bf16_grad(Bf16Grad::Rounded));
    assert_eq!(xent_burn::cpu().threads(), 1);
    assert_eq!(xent_burn::cpu().bf16_grad_terms().unwrap(), (1, 1));
    let rounded = through_burn();
    assert_eq!(rounded, native(&Cpu::new().with_bf16_grad(Bf16Grad::Rounded)));
    let kernels = xent_burn::cpu().linear_matmul(xent::DType::BF16).unwrap();
    if kernels == CpuMatmul::F32 {
        // f32 products do not read the precision: nothing to tell apart.
        assert_eq!(rounded, default);
        println!("set_cpu's bf16 precision: skipped, this CPU has no bf16 matrix kernels");
    } else if xent_burn::cpu().bf16_grad_terms().unwrap() != Cpu::new().bf16_grad_terms().unwrap() {
        // Rounding G to bf16 changes some gradients by more than their bf16 rounding.
        let differ = rounded.iter().zip(&default).map(|(r, d)| r.iter().zip(d).filter(|(x, y)| x != y).count());
        let differ: Vec<usize> = differ.collect();
        assert!(differ.iter().all(|&c| c > 0), "{differ:?} entries differ");
        println!("set_cpu's bf16 precision on {kernels}: {differ:?} gradient entries differ from the default");
    }

    // The matrix kernels: f32 products, as xent's own call on f32 kernels.
    xent_burn::set_cpu(Cpu::new().with_matmul(CpuMatmul::F32).unwrap());
    assert_eq!(xent_burn::cpu().linear_matmul(xent::DType::BF16).unwrap(), CpuMatmul::F32);
    assert_eq!(through_burn(), native(&Cpu::new().with_matmul(CpuMatmul::F32).unwrap()));
}
