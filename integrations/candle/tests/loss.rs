//! xent's Candle loss against Candle's own `cross_entropy`, the f64 reference (for the options
//! Candle lacks) and PyTorch's golden values.

#[path = "../../../tests/common/golden_ce.rs"]
mod golden_ce;

use candle_core::{DType, Device, Tensor, Var};
use ndarray::Array2;
use xent::cpu::reference;
use xent::{CrossEntropy, Reduction};

fn rng_logits(n: usize, v: usize, seed: u64) -> (Array2<f32>, Vec<i64>) {
    let (x, t) = xent::workload::synthetic(n, v, 3.0, 5, seed);
    (x, t.to_vec())
}

fn var(x: &Array2<f32>) -> Var {
    Var::from_tensor(&Tensor::from_vec(x.iter().copied().collect::<Vec<f32>>(), x.dim(), &Device::Cpu).unwrap())
        .unwrap()
}

fn to_array(t: &Tensor) -> Array2<f32> {
    let (n, v) = t.dims2().unwrap();
    Array2::from_shape_vec((n, v), t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()).unwrap()
}

fn max_diff(a: &Array2<f32>, b: &Array2<f64>) -> f64 {
    a.iter().zip(b.iter()).fold(0.0, |m, (&x, &y)| m.max((x as f64 - y).abs()))
}

#[test]
fn equals_candles_own_loss_without_ignored_rows() {
    let (x, _) = rng_logits(64, 1000, 1);
    let t: Vec<u32> = (0..64).map(|i| (i * 37 % 1000) as u32).collect();
    let targets = Tensor::new(t.as_slice(), &Device::Cpu).unwrap();
    let logits = var(&x);
    let ours = xent_candle::cross_entropy(logits.as_tensor(), &targets, &CrossEntropy::default()).unwrap();
    let theirs = candle_nn::loss::cross_entropy(logits.as_tensor(), &targets).unwrap();
    let (a, b) = (ours.to_scalar::<f32>().unwrap(), theirs.to_scalar::<f32>().unwrap());
    assert!((a - b).abs() <= 2e-6 * b.abs(), "{a} vs {b}");
    let (ga, gb) = (ours.backward().unwrap(), theirs.backward().unwrap());
    let (ga, gb) = (to_array(ga.get(logits.as_tensor()).unwrap()), to_array(gb.get(logits.as_tensor()).unwrap()));
    let worst = ga.iter().zip(gb.iter()).fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
    assert!(worst < 1e-8, "largest gradient difference {worst}");
}

#[test]
fn options_candle_lacks_match_the_reference() {
    let (x, t) = rng_logits(40, 333, 2);
    let targets = Tensor::new(t.as_slice(), &Device::Cpu).unwrap();
    let cw = ndarray::Array1::from_shape_fn(333, |c| 0.5 + (c % 7) as f32 * 0.1);
    for cfg in [
        CrossEntropy::default().with_label_smoothing(0.1),
        CrossEntropy::default().with_class_weight(cw.clone()).with_z_loss(1e-3),
        CrossEntropy::default().with_reduction(Reduction::Sum).with_softcap(5.0),
        CrossEntropy::default().with_reduction(Reduction::None).with_label_smoothing(0.2),
    ] {
        let logits = var(&x);
        let loss = xent_candle::cross_entropy(logits.as_tensor(), &targets, &cfg).unwrap();
        let r = reference::cross_entropy(&x, &t[..], &cfg).unwrap();
        let got = loss.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        let want = if cfg.reduction == Reduction::None { r.row_loss.sum() } else { r.loss };
        assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{cfg:?}: {got} vs {want}");
        // For `none` the upstream gradient of `sum` is 1 per row: the gradient of the sum.
        let g = loss.sum_all().unwrap().backward().unwrap();
        let g = to_array(g.get(logits.as_tensor()).unwrap());
        assert!(max_diff(&g, &r.grad) < 1e-7, "{cfg:?}: gradient");
    }
}

#[test]
fn all_ignored_batch_bf16_logits_and_bad_input() {
    let x = Array2::from_shape_fn((3, 5), |(i, j)| (i * 5 + j) as f32 * 0.1);
    let logits = var(&x);
    let ignored = Tensor::new(&[-100i64, -100, -100], &Device::Cpu).unwrap();
    let loss = xent_candle::cross_entropy(logits.as_tensor(), &ignored, &CrossEntropy::default()).unwrap();
    assert!(loss.to_scalar::<f32>().unwrap().is_nan(), "an all-ignored mean is NaN, as in PyTorch");
    let g = loss.backward().unwrap();
    assert!(to_array(g.get(logits.as_tensor()).unwrap()).iter().all(|&v| v == 0.0));
    // bf16 logits: the f64 reference of the rounded inputs, gradient in bf16.
    let xb = Var::from_tensor(&logits.as_tensor().to_dtype(DType::BF16).unwrap()).unwrap();
    let t = Tensor::new(&[1u32, 4, 0], &Device::Cpu).unwrap();
    let loss = xent_candle::cross_entropy(xb.as_tensor(), &t, &CrossEntropy::default()).unwrap();
    let rounded = to_array(xb.as_tensor());
    let r = reference::cross_entropy(&rounded, &[1i64, 4, 0][..], &CrossEntropy::default()).unwrap();
    assert!((loss.to_scalar::<f32>().unwrap() as f64 - r.loss).abs() < 1e-6);
    let g = loss.backward().unwrap();
    let g = g.get(xb.as_tensor()).unwrap();
    assert_eq!(g.dtype(), DType::BF16);
    assert!(max_diff(&to_array(g), &r.grad) < 4e-3 * 0.5);
    // Out-of-range targets and wrong ranks are errors, not panics.
    let bad = Tensor::new(&[9u32, 0, 0], &Device::Cpu).unwrap();
    assert!(xent_candle::cross_entropy(logits.as_tensor(), &bad, &CrossEntropy::default()).is_err());
    let flat = logits.as_tensor().flatten_all().unwrap();
    assert!(xent_candle::cross_entropy(&flat, &bad, &CrossEntropy::default()).is_err());
}

/// The PyTorch float64 cases of the repository's golden set with class-index targets.
#[test]
fn pytorch_golden_cases() {
    let mut ran = 0;
    for case in golden_ce::cases() {
        let x32: Vec<f32> = case.logits.iter().map(|&v| v as f32).collect();
        let logits =
            Var::from_tensor(&Tensor::from_vec(x32, (case.rows, case.classes), &Device::Cpu).unwrap()).unwrap();
        let targets = Tensor::new(case.targets.as_slice(), &Device::Cpu).unwrap();
        let loss = xent_candle::cross_entropy(logits.as_tensor(), &targets, &case.cfg).unwrap();
        let got: Vec<f32> = loss.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got.len(), case.loss.len(), "{}", case.name);
        for (&a, &b) in got.iter().zip(&case.loss) {
            assert!(golden_ce::close(a as f64, b, 2e-6, 2e-6), "{}: loss {a} vs {b}", case.name);
        }
        // The gradient of the loss (of the sum of per-row losses for `none`).
        let grads = loss.sum_all().unwrap().backward().unwrap();
        let ga = to_array(grads.get(logits.as_tensor()).unwrap());
        match &case.grad {
            Some(g) => {
                for (a, b) in ga.iter().zip(g) {
                    assert!(golden_ce::close(*a as f64, *b, 2e-5, 1e-7), "{}: gradient {a} vs {b}", case.name);
                }
            }
            None => assert!(ga.iter().all(|&g| g == 0.0), "{}: all rows ignored", case.name),
        }
        ran += 1;
    }
    assert!(ran >= 50, "only {ran} golden cases ran");
}
