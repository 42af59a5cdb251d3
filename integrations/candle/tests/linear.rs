//! xent-candle's fused linear cross-entropy against Candle's own composition
//! (`hidden.matmul(&weight.t())` + bias + `candle_nn::loss::cross_entropy`, or the same with a
//! mask where rows are ignored), through Candle's autograd: the loss and the gradients w.r.t.
//! hidden, weight and bias.

use candle_core::{DType, Tensor, D};
use xent::{LinearCe, Reduction, XentError};

mod common;
use common::{assert_grads_close, f32s, inputs, rel_diff, targets_tensor, var, DEV};

/// Candle's own composition: logits, then per-row losses `-log softmax(z)_y` (0 for ignored
/// rows) plus `z_loss * lse^2` on counted rows, and the mask of counted rows.
fn composition_rows(h: &Tensor, w: &Tensor, b: Option<&Tensor>, t: &[i64], z_loss: f64) -> (Tensor, Tensor) {
    let mut z = h.matmul(&w.t().unwrap()).unwrap();
    if let Some(b) = b {
        z = z.broadcast_add(b).unwrap();
    }
    let logp = candle_nn::ops::log_softmax(&z, D::Minus1).unwrap();
    let idx: Vec<u32> = t.iter().map(|&y| y.max(0) as u32).collect();
    let idx = Tensor::from_vec(idx, (t.len(), 1), &DEV).unwrap();
    let mask: Vec<f32> = t.iter().map(|&y| if y < 0 { 0.0 } else { 1.0 }).collect();
    let mask = Tensor::from_vec(mask, t.len(), &DEV).unwrap().to_dtype(z.dtype()).unwrap();
    let mut rows = logp.gather(&idx, 1).unwrap().squeeze(1).unwrap().neg().unwrap();
    if z_loss != 0.0 {
        // lse = z - log_softmax(z) (any class); small logits here, no overflow concerns.
        let lse = z.exp().unwrap().sum(1).unwrap().log().unwrap();
        rows = (rows + (lse.sqr().unwrap() * z_loss).unwrap()).unwrap();
    }
    ((rows * &mask).unwrap(), mask)
}

/// The loss and the three gradients equal `candle_nn::loss::cross_entropy` of Candle's own
/// linear layer, for mean and sum, with and without bias, in f32.
#[test]
fn equals_candle_nn_linear_and_cross_entropy_f32() {
    let (n, d, v) = (48, 32, 700);
    let (h0, w0, b0, t) = inputs(n, d, v, 0, 1);
    let tu: Vec<u32> = t.iter().map(|&y| y as u32).collect();
    let targets = Tensor::new(tu.as_slice(), &DEV).unwrap();
    for with_bias in [false, true] {
        for reduction in [Reduction::Mean, Reduction::Sum] {
            let (h, w, b) = (var(&h0, DType::F32), var(&w0, DType::F32), var(&b0, DType::F32));
            let bias = with_bias.then_some(b.as_tensor());
            let mut cfg = LinearCe::default();
            cfg.ce.reduction = reduction;
            let ours = xent_candle::linear_cross_entropy(&h, &w, bias, &targets, &cfg).unwrap();
            assert_eq!(ours.dtype(), DType::F32);
            assert_eq!(ours.dims(), &[] as &[usize]);
            let mut z = h.matmul(&w.t().unwrap()).unwrap();
            if let Some(b) = bias {
                z = z.broadcast_add(b).unwrap();
            }
            let mut theirs = candle_nn::loss::cross_entropy(&z, &targets).unwrap();
            if reduction == Reduction::Sum {
                theirs = (theirs * n as f64).unwrap();
            }
            let (a, e) = (ours.to_scalar::<f32>().unwrap(), theirs.to_scalar::<f32>().unwrap());
            let what = format!("bias {with_bias}, {reduction:?}");
            assert!((a - e).abs() <= 2e-6 * e.abs(), "{what}: loss {a} vs {e}");
            let (ga, ge) = (ours.backward().unwrap(), theirs.backward().unwrap());
            assert_grads_close(&what, &ga, &ge, &[&h, &w], 1e-5);
            match bias {
                Some(b) => assert_grads_close(&what, &ga, &ge, &[b], 1e-5),
                None => assert!(ga.get(&b).is_none(), "{what}: no bias, no gradient"),
            }
        }
    }
}

/// bf16 hidden, weight and bias: the loss in bf16, gradients in bf16, against the composition
/// in f32 on the same (rounded) values.
#[test]
fn bf16_equals_the_f32_composition_of_the_rounded_values() {
    let (n, d, v) = (40, 64, 513);
    let (h0, w0, b0, t) = inputs(n, d, v, 0, 2);
    let round = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
    let (h0, w0, b0) = (round(&h0), round(&w0), round(&b0));
    let targets = targets_tensor(&t);
    for with_bias in [false, true] {
        let (h, w, b) = (var(&h0, DType::BF16), var(&w0, DType::BF16), var(&b0, DType::BF16));
        let bias = with_bias.then_some(b.as_tensor());
        let ours = xent_candle::linear_cross_entropy(&h, &w, bias, &targets, &LinearCe::default()).unwrap();
        assert_eq!(ours.dtype(), DType::BF16, "the loss in the inputs' dtype");
        let (hf, wf, bf) = (var(&h0, DType::F32), var(&w0, DType::F32), var(&b0, DType::F32));
        let mut z = hf.matmul(&wf.t().unwrap()).unwrap();
        if with_bias {
            z = z.broadcast_add(&bf).unwrap();
        }
        let theirs = candle_nn::loss::cross_entropy(&z, &targets).unwrap();
        let (a, e) = (f32s(&ours)[0], theirs.to_scalar::<f32>().unwrap());
        // One bf16 rounding of the loss (8 significant bits).
        assert!((a - e).abs() <= e.abs() / 256.0, "bias {with_bias}: loss {a} vs {e}");
        let (ga, ge) = (ours.backward().unwrap(), theirs.backward().unwrap());
        for (name, x, y) in [("hidden", h.as_tensor(), hf.as_tensor()), ("weight", w.as_tensor(), wf.as_tensor())] {
            let g = ga.get(x).unwrap();
            assert_eq!(g.dtype(), DType::BF16, "{name}");
            // f32 gradients rounded once to bf16 (and bf16 products of f32 sums where the CPU
            // has AVX512-BF16): within 1% of the largest entry.
            assert!(rel_diff(g, ge.get(y).unwrap()) < 1e-2, "bias {with_bias}: grad {name}");
        }
        if with_bias {
            let g = ga.get(&b).unwrap();
            assert_eq!(g.dtype(), DType::BF16);
            assert!(rel_diff(g, ge.get(&bf).unwrap()) < 1e-2, "grad bias");
        }
    }
}

/// Ignored rows (i64 targets with -100): against the composition that masks them out of the
/// mean (Candle's `cross_entropy` has no ignore_index), mean and sum, with bias.
#[test]
fn ignored_rows_equal_the_masked_composition() {
    let (n, d, v) = (51, 24, 300);
    let (h0, w0, b0, t) = inputs(n, d, v, 5, 3);
    assert!(t.iter().filter(|&&y| y == -100).count() >= 10);
    for reduction in [Reduction::Mean, Reduction::Sum] {
        let (h, w, b) = (var(&h0, DType::F32), var(&w0, DType::F32), var(&b0, DType::F32));
        let mut cfg = LinearCe::default();
        cfg.ce.reduction = reduction;
        let ours = xent_candle::linear_cross_entropy(&h, &w, Some(&b), &targets_tensor(&t), &cfg).unwrap();
        let (rows, mask) = composition_rows(&h, &w, Some(&b), &t, 0.0);
        let mut theirs = rows.sum_all().unwrap();
        if reduction == Reduction::Mean {
            theirs = theirs.broadcast_div(&mask.sum_all().unwrap()).unwrap();
        }
        let (a, e) = (ours.to_scalar::<f32>().unwrap(), theirs.to_scalar::<f32>().unwrap());
        assert!((a - e).abs() <= 2e-6 * e.abs(), "{reduction:?}: loss {a} vs {e}");
        let (ga, ge) = (ours.backward().unwrap(), theirs.backward().unwrap());
        assert_grads_close(&format!("{reduction:?}"), &ga, &ge, &[&h, &w, &b], 1e-5);
        let gh = ga.get(&h).unwrap().to_vec2::<f32>().unwrap();
        for (r, &y) in t.iter().enumerate() {
            if y == -100 {
                assert!(gh[r].iter().all(|&g| g == 0.0), "ignored row {r} has no gradient");
            }
        }
    }
}

/// Reduction none: per-row losses `[N]`, and backward through them with an arbitrary upstream
/// gradient `g` is the gradient of `sum_n g_n loss_n` (PyTorch's semantics), with and without
/// z-loss (which takes the grouped path when `g` has several values).
#[test]
fn reduction_none_with_per_row_upstream_gradients() {
    let (n, d, v) = (30, 16, 257);
    let (h0, w0, b0, t) = inputs(n, d, v, 4, 4);
    let g: Vec<f32> = (0..n).map(|i| [0.5f32, -1.25, 2.0, 0.0, 1.0][i % 5]).collect();
    let g = Tensor::from_vec(g, n, &DEV).unwrap();
    for z_loss in [0.0f32, 1e-2] {
        for upstream in ["weighted", "sum", "mean"] {
            let (h, w, b) = (var(&h0, DType::F32), var(&w0, DType::F32), var(&b0, DType::F32));
            let mut cfg = LinearCe::default();
            cfg.ce.reduction = Reduction::None;
            cfg.ce.z_loss = z_loss;
            let ours = xent_candle::linear_cross_entropy(&h, &w, Some(&b), &targets_tensor(&t), &cfg).unwrap();
            assert_eq!(ours.dims(), &[n]);
            let (rows, _) = composition_rows(&h, &w, Some(&b), &t, z_loss as f64);
            assert!(rel_diff(&ours, &rows) < 2e-6, "z_loss {z_loss}: per-row losses");
            let total = |x: &Tensor| match upstream {
                "weighted" => (x * &g).unwrap().sum_all().unwrap(),
                "sum" => x.sum_all().unwrap(),
                _ => x.mean_all().unwrap(),
            };
            let (ga, ge) = (total(&ours).backward().unwrap(), total(&rows).backward().unwrap());
            assert_grads_close(&format!("z_loss {z_loss}, {upstream}"), &ga, &ge, &[&h, &w, &b], 1e-5);
        }
    }
}

/// The upstream gradient scales the cached gradients; a second backward through the same
/// loss recomputes them; an input Candle does not track gets no gradient.
#[test]
fn upstream_scale_second_backward_and_untracked_inputs() {
    let (n, d, v) = (20, 16, 100);
    let (h0, w0, _, t) = inputs(n, d, v, 3, 5);
    let (h, w) = (var(&h0, DType::F32), var(&w0, DType::F32));
    let targets = targets_tensor(&t);
    let loss = xent_candle::linear_cross_entropy(&h, &w, None, &targets, &LinearCe::default()).unwrap();
    let first = loss.backward().unwrap();
    let second = loss.backward().unwrap();
    for x in [&h, &w] {
        assert_eq!(f32s(first.get(x).unwrap()), f32s(second.get(x).unwrap()), "recomputed gradients");
    }
    let loss = xent_candle::linear_cross_entropy(&h, &w, None, &targets, &LinearCe::default()).unwrap();
    let scaled = (loss * -0.25).unwrap().backward().unwrap();
    for x in [&h, &w] {
        let want = (first.get(x).unwrap() * -0.25).unwrap();
        assert!(rel_diff(scaled.get(x).unwrap(), &want) < 1e-7);
    }
    // A frozen weight (a plain tensor): the hidden states' gradient alone.
    let loss = xent_candle::linear_cross_entropy(&h, &w0, None, &targets, &LinearCe::default()).unwrap();
    let g = loss.backward().unwrap();
    assert!(g.get(&w0).is_none());
    assert!(rel_diff(g.get(&h).unwrap(), first.get(&h).unwrap()) < 1e-7);
    // Options Candle lacks reach xent: the same numbers as xent's own call.
    let mut cfg = LinearCe::default();
    cfg.ce.label_smoothing = 0.1;
    cfg.ce.class_weight = Some(ndarray::Array1::from_shape_fn(v, |c| 0.5 + (c % 3) as f32 * 0.25));
    cfg.ce.data.sample_weight = Some(ndarray::Array1::from_shape_fn(n, |r| 1.0 + (r % 4) as f32 * 0.5));
    cfg.ce.softcap = Some(4.0);
    let loss = xent_candle::linear_cross_entropy(&h, &w, None, &targets, &cfg).unwrap();
    let g = loss.backward().unwrap();
    let ha = ndarray::Array2::from_shape_vec((n, d), f32s(&h0)).unwrap();
    let wa = ndarray::Array2::from_shape_vec((v, d), f32s(&w0)).unwrap();
    let native = xent::Cpu::new().linear_cross_entropy(&ha, &wa, None, &t[..], &cfg).unwrap();
    assert_eq!(loss.to_scalar::<f32>().unwrap(), native.loss as f32);
    let gh = native.grad_hidden.unwrap().to_f32();
    assert_eq!(f32s(g.get(&h).unwrap()), gh.iter().copied().collect::<Vec<f32>>());
}

/// Bad input is a Candle error holding xent's typed error.
#[test]
fn errors_hold_the_typed_xent_error() {
    let (h0, w0, b0, t) = inputs(6, 8, 20, 0, 6);
    let targets = targets_tensor(&t);
    let cfg = LinearCe::default();
    let h = var(&h0, DType::F32);
    let typed = |r: candle_core::Result<Tensor>| -> XentError {
        let e = r.expect_err("an error");
        let x = xent_candle::xent_error(&e).cloned().unwrap_or_else(|| panic!("not a typed xent error: {e}"));
        // The message reaches the Candle error's text.
        assert!(e.to_string().contains("xent-candle"), "{e}");
        x
    };
    // hidden [6, 8] against weight [20, 7]: the inner dimensions differ.
    let w7 = Tensor::zeros((20, 7), DType::F32, &DEV).unwrap();
    let e = typed(xent_candle::linear_cross_entropy(&h, &w7, None, &targets, &cfg));
    assert!(matches!(e, XentError::Shape(ref m) if m.contains("inner dimensions")), "{e}");
    // Candle's own error type: the variant holds xent's error itself.
    let raw = xent_candle::linear_cross_entropy(&h, &w7, None, &targets, &cfg).unwrap_err();
    let mut inner = &raw;
    while let candle_core::Error::WithBacktrace { inner: i, .. } = inner {
        inner = i;
    }
    assert!(
        matches!(inner, candle_core::Error::WrappedContext { wrapped, .. } if wrapped.downcast_ref::<XentError>().is_some())
    );
    let e = typed(xent_candle::linear_cross_entropy(&h, &w0, Some(&b0.narrow(0, 0, 19).unwrap()), &targets, &cfg));
    assert!(matches!(e, XentError::Shape(_)), "{e}");
    let bad = Tensor::new(&[0u32, 1, 2, 3, 4, 20], &DEV).unwrap();
    let e = typed(xent_candle::linear_cross_entropy(&h, &w0, None, &bad, &cfg));
    assert!(matches!(e, XentError::TargetOutOfRange { row: 5, target: 20, classes: 20 }), "{e}");
    let e = typed(xent_candle::linear_cross_entropy(&h, &w0.to_dtype(DType::BF16).unwrap(), None, &targets, &cfg));
    assert!(matches!(e, XentError::InvalidOption(_)), "mixed dtypes: {e}");
    let e = typed(xent_candle::linear_cross_entropy(&h, &w0, None, &h0, &cfg));
    assert!(matches!(e, XentError::Shape(_)), "float matrix targets: {e}");
    let e = typed(xent_candle::linear_cross_entropy(&h, &w0, None, &b0.narrow(0, 0, 6).unwrap(), &cfg));
    assert!(matches!(e, XentError::InvalidOption(_)), "float targets: {e}");
    // A non-finite upstream gradient of per-row losses fails in backward, typed.
    let mut none = LinearCe::default();
    none.ce.reduction = Reduction::None;
    let rows = xent_candle::linear_cross_entropy(&h, &w0, None, &targets, &none).unwrap();
    let up = Tensor::new(&[1f32, f32::NAN, 1.0, 1.0, 1.0, 1.0], &DEV).unwrap();
    let e = typed((rows * up).unwrap().sum_all().unwrap().backward().map(|_| h0.clone()));
    assert!(matches!(e, XentError::InvalidValue { ref index, .. } if index == &[1]), "{e}");
}
