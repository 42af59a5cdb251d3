//! xent-candle's `linear_logprobs` against Candle's own composition (`matmul` + bias, divided by
//! the temperature, `log_softmax`, gather of the targets, entropy `-sum p log p`, ignored rows
//! masked out), through Candle's autograd: both outputs, and the gradients w.r.t. hidden,
//! weight and bias of losses that use one or both of them.

use candle_core::{DType, Tensor, D};
use xent::{LinearLogprobs, XentError};

mod common;
use common::{assert_grads_close, f32s, inputs, rel_diff, targets_tensor, var, DEV};

/// Random upstream weights `[n]` (N(0, 1)), as f32 tensors.
fn upstream(n: usize, seed: u64) -> Tensor {
    let (a, _) = xent::workload::synthetic(1, n, 1.0, 0, seed);
    Tensor::from_vec(a.into_raw_vec_and_offset().0, n, &DEV).unwrap()
}

/// Candle's own composition: `z = (h W^T + b) / temperature`, `logp = log_softmax(z)[y]`,
/// `H = -sum_c p_c log p_c`, both 0 on ignored rows (target < 0).
fn composition(h: &Tensor, w: &Tensor, b: Option<&Tensor>, t: &[i64], temperature: f64) -> (Tensor, Tensor) {
    let mut z = h.matmul(&w.t().unwrap()).unwrap();
    if let Some(b) = b {
        z = z.broadcast_add(b).unwrap();
    }
    let z = (z / temperature).unwrap();
    let lsm = candle_nn::ops::log_softmax(&z, D::Minus1).unwrap();
    let idx: Vec<u32> = t.iter().map(|&y| y.max(0) as u32).collect();
    let idx = Tensor::from_vec(idx, (t.len(), 1), &DEV).unwrap();
    let mask: Vec<f32> = t.iter().map(|&y| if y < 0 { 0.0 } else { 1.0 }).collect();
    let mask = Tensor::from_vec(mask, t.len(), &DEV).unwrap().to_dtype(z.dtype()).unwrap();
    let logp = lsm.gather(&idx, 1).unwrap().squeeze(1).unwrap();
    let ent = (lsm.exp().unwrap() * &lsm).unwrap().sum(1).unwrap().neg().unwrap();
    ((logp * &mask).unwrap(), (ent * &mask).unwrap())
}

/// `sum_n a_n logp_n + b_n H_n` in f32.
fn mixed(logp: &Tensor, ent: &Tensor, a: &Tensor, b: &Tensor) -> Tensor {
    let (logp, ent) = (logp.to_dtype(DType::F32).unwrap(), ent.to_dtype(DType::F32).unwrap());
    ((logp * a).unwrap() + (ent * b).unwrap()).unwrap().sum_all().unwrap()
}

/// f32: both outputs and the three gradients of `sum(a logp + b H)` (random `a`, `b`) equal
/// Candle's composition, with and without bias, at temperatures 1 and 0.7, with ignored rows
/// (0 values, no gradient).
#[test]
fn f32_equals_the_candle_composition_for_a_mixed_loss() {
    let (n, d, v) = (45, 32, 700);
    let (h0, w0, b0, t) = inputs(n, d, v, 4, 1);
    assert!(t.iter().filter(|&&y| y == -100).count() >= 8);
    let targets = targets_tensor(&t);
    let (a, b) = (upstream(n, 11), upstream(n, 12));
    for with_bias in [false, true] {
        for temperature in [1.0f32, 0.7] {
            let what = format!("bias {with_bias}, T {temperature}");
            let (h, w, bv) = (var(&h0, DType::F32), var(&w0, DType::F32), var(&b0, DType::F32));
            let bias = with_bias.then_some(bv.as_tensor());
            let cfg = LinearLogprobs::default().with_temperature(temperature);
            let (lp, ent) = xent_candle::linear_logprobs(&h, &w, bias, &targets, &cfg).unwrap();
            assert_eq!((lp.dims(), ent.dims(), lp.dtype(), ent.dtype()), (&[n][..], &[n][..], DType::F32, DType::F32));
            let (lp_c, ent_c) = composition(&h, &w, bias, &t, temperature as f64);
            assert!(rel_diff(&lp, &lp_c) < 2e-6, "{what}: log-probs");
            assert!(rel_diff(&ent, &ent_c) < 2e-6, "{what}: entropies");
            let (lpv, entv) = (f32s(&lp), f32s(&ent));
            for (r, &y) in t.iter().enumerate() {
                if y == -100 {
                    assert_eq!((lpv[r], entv[r]), (0.0, 0.0), "{what}: ignored row {r}");
                } else {
                    assert!(lpv[r] < 0.0 && entv[r] > 0.0, "{what}: row {r}");
                }
            }
            let (ga, ge) =
                (mixed(&lp, &ent, &a, &b).backward().unwrap(), mixed(&lp_c, &ent_c, &a, &b).backward().unwrap());
            assert_grads_close(&what, &ga, &ge, &[&h, &w], 1e-5);
            match bias {
                Some(bt) => assert_grads_close(&what, &ga, &ge, &[bt], 1e-5),
                None => assert!(ga.get(&bv).is_none(), "{what}: no bias, no gradient"),
            }
            let gh = ga.get(&h).unwrap().to_vec2::<f32>().unwrap();
            for (r, &y) in t.iter().enumerate() {
                assert_eq!(gh[r].iter().all(|&g| g == 0.0), y == -100, "{what}: gradient of row {r}");
            }
        }
    }
}

/// A loss of one output alone (the other's upstream gradient is zero), a loss that uses an
/// output twice (the upstream gradients add), and scalar scaling: the composition's gradients.
#[test]
fn losses_of_one_output_or_the_same_output_twice() {
    let (n, d, v) = (30, 16, 257);
    let (h0, w0, b0, t) = inputs(n, d, v, 5, 2);
    let targets = targets_tensor(&t);
    let a = upstream(n, 21);
    let cfg = LinearLogprobs::default().with_temperature(1.3);
    for case in ["logp", "entropy", "twice"] {
        let (h, w, bv) = (var(&h0, DType::F32), var(&w0, DType::F32), var(&b0, DType::F32));
        let loss = |lp: &Tensor, ent: &Tensor| match case {
            "logp" => (lp * &a).unwrap().sum_all().unwrap(),
            "entropy" => (ent.sum_all().unwrap() * -0.5).unwrap(),
            _ => ((lp * &a).unwrap().sum_all().unwrap() + lp.mean_all().unwrap() + (ent * &a).unwrap().max(0).unwrap())
                .unwrap(),
        };
        let (lp, ent) = xent_candle::linear_logprobs(&h, &w, Some(&bv), &targets, &cfg).unwrap();
        let (lp_c, ent_c) = composition(&h, &w, Some(&bv), &t, 1.3);
        let (ga, ge) = (loss(&lp, &ent).backward().unwrap(), loss(&lp_c, &ent_c).backward().unwrap());
        assert_grads_close(case, &ga, &ge, &[&h, &w, &bv], 1e-5);
    }
}

/// bf16 and f16 hidden, weight and bias: outputs and gradients in the inputs' dtype, against the
/// f32 composition of the same rounded values (the arithmetic is f32: the outputs within one
/// rounding to the dtype, the gradients within 1% of the largest entry as for
/// `linear_cross_entropy`).
#[test]
fn half_precision_equals_the_f32_composition_of_the_rounded_values() {
    let (n, d, v) = (40, 64, 513);
    for (dtype, ulp) in [(DType::BF16, 1.0f32 / 256.0), (DType::F16, 1.0 / 2048.0)] {
        let (h0, w0, b0, t) = inputs(n, d, v, 6, 3);
        let round = |x: &Tensor| x.to_dtype(dtype).unwrap();
        let (h0, w0, b0) = (round(&h0), round(&w0), round(&b0));
        let targets = targets_tensor(&t);
        let (a, b) = (upstream(n, 31), upstream(n, 32));
        for with_bias in [false, true] {
            let what = format!("{dtype:?}, bias {with_bias}");
            let (h, w, bv) = (var(&h0, dtype), var(&w0, dtype), var(&b0, dtype));
            let bias = with_bias.then_some(bv.as_tensor());
            let cfg = LinearLogprobs::default().with_temperature(0.8);
            let (lp, ent) = xent_candle::linear_logprobs(&h, &w, bias, &targets, &cfg).unwrap();
            assert_eq!((lp.dtype(), ent.dtype()), (dtype, dtype), "{what}: outputs in the inputs' dtype");
            let (hf, wf, bf) = (var(&h0, DType::F32), var(&w0, DType::F32), var(&b0, DType::F32));
            let bias_f = with_bias.then_some(bf.as_tensor());
            let (lp_c, ent_c) = composition(&hf, &wf, bias_f, &t, 0.8);
            for (name, x, y) in [("logp", &lp, &lp_c), ("entropy", &ent, &ent_c)] {
                for (r, (x, y)) in f32s(x).into_iter().zip(f32s(y)).enumerate() {
                    assert!((x - y).abs() <= y.abs() * ulp + 1e-6, "{what}: {name} of row {r}: {x} vs {y}");
                }
            }
            let (ga, ge) =
                (mixed(&lp, &ent, &a, &b).backward().unwrap(), mixed(&lp_c, &ent_c, &a, &b).backward().unwrap());
            let mut pairs = vec![("hidden", h.as_tensor(), hf.as_tensor()), ("weight", w.as_tensor(), wf.as_tensor())];
            if with_bias {
                pairs.push(("bias", bv.as_tensor(), bf.as_tensor()));
            }
            for (name, x, y) in pairs {
                let g = ga.get(x).unwrap();
                assert_eq!(g.dtype(), dtype, "{what}: grad {name} in the input's dtype");
                let diff = rel_diff(g, ge.get(y).unwrap());
                assert!(diff < 1e-2, "{what}: grad {name} differs by {diff}");
            }
        }
    }
}

/// xent's own `Cpu::linear_logprobs` with the same upstream: the same bits (the op adds
/// nothing of its own), and a frozen weight (a plain tensor) gets no gradient.
#[test]
fn equals_xent_s_own_call_and_frozen_inputs_get_no_gradient() {
    let (n, d, v) = (20, 16, 100);
    let (h0, w0, _, t) = inputs(n, d, v, 3, 4);
    let (a, b) = (upstream(n, 41), upstream(n, 42));
    let cfg = LinearLogprobs::default().with_temperature(0.9);
    let h = var(&h0, DType::F32);
    let (lp, ent) = xent_candle::linear_logprobs(&h, &w0, None, &targets_tensor(&t), &cfg).unwrap();
    let g = mixed(&lp, &ent, &a, &b).backward().unwrap();
    assert!(g.get(&w0).is_none(), "a frozen weight has no gradient");
    let ha = ndarray::Array2::from_shape_vec((n, d), f32s(&h0)).unwrap();
    let wa = ndarray::Array2::from_shape_vec((v, d), f32s(&w0)).unwrap();
    let (aa, ba) = (ndarray::Array1::from(f32s(&a)), ndarray::Array1::from(f32s(&b)));
    let native = xent::Cpu::new()
        .linear_logprobs(&ha, &wa, None, &t[..], &cfg.clone().with_grad_weight(false), Some((aa.view(), ba.view())))
        .unwrap();
    assert_eq!(f32s(&lp), native.logprob.to_vec());
    assert_eq!(f32s(&ent), native.entropy.to_vec());
    let gh = native.grad_hidden.unwrap().to_f32();
    assert_eq!(f32s(g.get(&h).unwrap()), gh.iter().copied().collect::<Vec<f32>>());
}

/// Bad input is a Candle error holding xent's typed error.
#[test]
fn errors_hold_the_typed_xent_error() {
    let (h0, w0, b0, t) = inputs(6, 8, 20, 0, 6);
    let targets = targets_tensor(&t);
    let cfg = LinearLogprobs::default();
    let h = var(&h0, DType::F32);
    let typed = |r: candle_core::Result<(Tensor, Tensor)>| -> XentError {
        let e = r.expect_err("an error");
        let x = xent_candle::xent_error(&e).cloned().unwrap_or_else(|| panic!("not a typed xent error: {e}"));
        assert!(e.to_string().contains("xent-candle"), "{e}");
        x
    };
    // hidden [6, 8] against weight [20, 7]: the inner dimensions differ.
    let w7 = Tensor::zeros((20, 7), DType::F32, &DEV).unwrap();
    let e = typed(xent_candle::linear_logprobs(&h, &w7, None, &targets, &cfg));
    assert!(matches!(e, XentError::Shape(ref m) if m.contains("inner dimensions")), "{e}");
    let e = typed(xent_candle::linear_logprobs(&h, &w0, Some(&b0.narrow(0, 0, 19).unwrap()), &targets, &cfg));
    assert!(matches!(e, XentError::Shape(_)), "bias length: {e}");
    let bad = Tensor::new(&[0u32, 1, 2, 3, 4, 20], &DEV).unwrap();
    let e = typed(xent_candle::linear_logprobs(&h, &w0, None, &bad, &cfg));
    assert!(matches!(e, XentError::TargetOutOfRange { row: 5, target: 20, classes: 20 }), "{e}");
    let e = typed(xent_candle::linear_logprobs(&h, &w0, None, &targets.narrow(0, 0, 5).unwrap(), &cfg));
    assert!(matches!(e, XentError::Shape(_)), "5 targets for 6 rows: {e}");
    let e = typed(xent_candle::linear_logprobs(&h, &w0, None, &b0.narrow(0, 0, 6).unwrap(), &cfg));
    assert!(matches!(e, XentError::InvalidOption(_)), "float targets: {e}");
    let e = typed(xent_candle::linear_logprobs(&h, &w0.to_dtype(DType::BF16).unwrap(), None, &targets, &cfg));
    assert!(matches!(e, XentError::InvalidOption(_)), "mixed dtypes: {e}");
    let e = typed(xent_candle::linear_logprobs(&h, &w0, None, &targets, &cfg.clone().with_temperature(0.0)));
    assert!(matches!(e, XentError::InvalidOption(ref m) if m.contains("temperature")), "{e}");
    // A non-finite upstream gradient fails in backward, typed, naming the output.
    let (lp, ent) = xent_candle::linear_logprobs(&h, &w0, None, &targets, &cfg).unwrap();
    let up = Tensor::new(&[1f32, 1.0, f32::NAN, 1.0, 1.0, 1.0], &DEV).unwrap();
    let loss = (lp.sum_all().unwrap() + (ent * up).unwrap().sum_all().unwrap()).unwrap();
    let e = typed(loss.backward().map(|_| (h0.clone(), h0.clone())));
    assert!(
        matches!(e, XentError::InvalidValue { ref input, ref index, .. } if input.contains("entropy") && index == &[2]),
        "{e}"
    );
}
