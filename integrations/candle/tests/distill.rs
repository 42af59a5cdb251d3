//! xent-candle's distillation against the same divergence composed from Candle's own ops in
//! f64 (its autograd giving the reference gradient), for every mode, reduction and input
//! dtype; the upstream gradient; untracked students; and the errors.

use candle_core::{DType, Device, Tensor, Var};
use xent::{Distill, DistillMode, Reduction, XentError};

fn logits(n: usize, v: usize, seed: u64, scale: f32) -> Tensor {
    let (x, _) = xent::workload::synthetic(n, v, scale, 0, seed);
    Tensor::from_vec(x.iter().copied().collect::<Vec<f32>>(), (n, v), &Device::Cpu).unwrap()
}

fn log_softmax(x: &Tensor) -> Tensor {
    candle_nn::ops::log_softmax(x, 1).unwrap()
}

/// `T^2 D_n` per row, composed from Candle's ops (the inputs are f64).
fn composed_rows(s: &Tensor, t: &Tensor, cfg: &Distill) -> Tensor {
    let tau = cfg.temperature as f64;
    let (ls, lt) = (log_softmax(&(s / tau).unwrap()), log_softmax(&(t / tau).unwrap()));
    // KL(p || q) per row from log-probabilities.
    let kl = |lp: &Tensor, lq: &Tensor| (lp.exp().unwrap() * (lp - lq).unwrap()).unwrap().sum(1).unwrap();
    let d = match cfg.mode {
        DistillMode::Kl => kl(&lt, &ls),
        DistillMode::ReverseKl => kl(&ls, &lt),
        DistillMode::Jsd { beta } => {
            let b = beta as f64;
            let m = ((lt.exp().unwrap() * b).unwrap() + (ls.exp().unwrap() * (1.0 - b)).unwrap()).unwrap();
            let lm = m.log().unwrap();
            ((kl(&lt, &lm) * b).unwrap() + (kl(&ls, &lm) * (1.0 - b)).unwrap()).unwrap()
        }
        _ => unreachable!("a mode this test does not know"),
    };
    (d * (tau * tau)).unwrap()
}

fn max_rel(got: &Tensor, want: &Tensor) -> f64 {
    let got = got.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let want = want.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-30);
    got.iter().zip(&want).fold(0.0f64, |m, (g, w)| m.max((g - w).abs() / scale))
}

#[test]
fn equals_candles_composition_in_f64() {
    let (n, v) = (23, 517);
    // Upstream weights per row: a mask with a padded row, and other values.
    let up: Vec<f64> = (0..n).map(|r| if r == 4 { 0.0 } else { 0.5 + (r % 3) as f64 }).collect();
    let up64 = Tensor::new(up.as_slice(), &Device::Cpu).unwrap();
    for (sd, td) in [(DType::F32, DType::F32), (DType::BF16, DType::BF16), (DType::F16, DType::F32)] {
        let s = logits(n, v, 5, 4.0).to_dtype(sd).unwrap();
        let t = logits(n, v, 6, 4.0).to_dtype(td).unwrap();
        // The reference reads the same (rounded) values in f64.
        let s64 = Var::from_tensor(&s.to_dtype(DType::F64).unwrap()).unwrap();
        let t64 = t.to_dtype(DType::F64).unwrap();
        let student = Var::from_tensor(&s).unwrap();
        for mode in [DistillMode::Kl, DistillMode::ReverseKl, DistillMode::Jsd { beta: 0.3 }] {
            for temperature in [1.0, 2.5] {
                for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                    let cfg =
                        Distill::default().with_temperature(temperature).with_mode(mode).with_reduction(reduction);
                    let what = format!("{sd:?}/{td:?} {mode:?} T={temperature} {reduction:?}");
                    let rows = composed_rows(s64.as_tensor(), &t64, &cfg);
                    let (want, want_loss) = match reduction {
                        Reduction::Mean => (rows.mean_all().unwrap(), rows.mean_all().unwrap()),
                        Reduction::Sum => (rows.sum_all().unwrap(), rows.sum_all().unwrap()),
                        _ => (rows.clone(), (&rows * &up64).unwrap().sum_all().unwrap()),
                    };
                    let got = xent_candle::distill(student.as_tensor(), &t, &cfg).unwrap();
                    assert_eq!(got.dtype(), sd, "{what}: the loss in the student's dtype");
                    assert_eq!(got.dims(), want.dims(), "{what}");
                    // The loss is rounded once to the student's dtype (bf16: 2^-8 relative, its unit roundoff).
                    let tol = if sd == DType::F32 { 1e-6 } else { 4e-3 };
                    let e = max_rel(&got, &want);
                    assert!(e <= tol, "{what}: loss off by {e:.2e} (relative)");
                    // The gradient through each autograd: a scalar, or the rows weighted by `up`.
                    let (ours, theirs) = match reduction {
                        Reduction::None => {
                            let up32 = up64.to_dtype(sd).unwrap();
                            ((got * up32).unwrap().sum_all().unwrap(), want_loss)
                        }
                        _ => ((got * 3.0).unwrap(), (want_loss * 3.0).unwrap()),
                    };
                    let g = ours.backward().unwrap().remove(student.as_tensor()).expect("a gradient");
                    let gw = theirs.backward().unwrap().remove(s64.as_tensor()).expect("a reference gradient");
                    assert_eq!(g.dtype(), sd, "{what}: the gradient in the student's dtype");
                    // f32 gradient: within a few ulp of each term (docs/accuracy.md); 16-bit: rounded once to the dtype (2^-8).
                    let tol = if sd == DType::F32 { 2e-6 } else { 4e-3 };
                    let e = max_rel(&g, &gw);
                    assert!(e <= tol, "{what}: gradient off by {e:.2e} of its largest entry");
                    if reduction == Reduction::None {
                        let g4 = g.get(4).unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
                        assert!(g4.iter().all(|&x| x == 0.0), "{what}: the masked row has a gradient");
                    }
                }
            }
        }
    }
}

#[test]
fn equals_xents_own_call() {
    let (s, t) = (logits(9, 300, 1, 3.0), logits(9, 300, 2, 3.0));
    let cfg = Distill::default().with_temperature(2.0).with_mode(DistillMode::Jsd { beta: 0.5 });
    let view =
        |x: &Tensor| ndarray::Array2::from_shape_vec((9, 300), x.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    let want = xent::Cpu::new().distill_with_grad(&view(&s).unwrap(), &view(&t).unwrap(), &cfg).unwrap();
    let student = Var::from_tensor(&s).unwrap();
    let loss = xent_candle::distill(student.as_tensor(), &t, &cfg).unwrap();
    assert_eq!(loss.to_scalar::<f32>().unwrap(), want.loss as f32);
    let g = loss.backward().unwrap().remove(student.as_tensor()).unwrap();
    assert_eq!(view(&g).unwrap(), want.grad.unwrap(), "the fused gradient itself for an upstream of 1");
}

#[test]
fn untracked_student_and_errors() {
    let (s, t) = (logits(4, 10, 1, 3.0), logits(4, 10, 2, 3.0));
    // Inference: no graph, no gradient computed.
    let loss = xent_candle::distill(&s, &t, &Distill::default()).unwrap();
    assert!(!loss.track_op() && loss.to_scalar::<f32>().unwrap() > 0.0);

    let student = Var::from_tensor(&s).unwrap();
    let is = |r: candle_core::Result<Tensor>, f: fn(&XentError) -> bool, what: &str| {
        let e = r.expect_err(what);
        let x = xent_candle::xent_error(&e).unwrap_or_else(|| panic!("{what}: not xent's error: {e}"));
        assert!(f(x), "{what}: {x}");
        println!("{what}: {x}");
    };
    let teacher_var = Var::from_tensor(&t).unwrap();
    is(
        xent_candle::distill(student.as_tensor(), teacher_var.as_tensor(), &Distill::default()),
        |e| matches!(e, XentError::InvalidOption(m) if m.contains("detach")),
        "a tracked teacher",
    );
    // Detached, the same teacher is fine.
    assert!(xent_candle::distill(student.as_tensor(), &teacher_var.as_tensor().detach(), &Distill::default()).is_ok());
    is(
        xent_candle::distill(student.as_tensor(), &logits(4, 11, 2, 3.0), &Distill::default()),
        |e| matches!(e, XentError::Shape(_)),
        "a teacher of another shape",
    );
    is(
        xent_candle::distill(student.as_tensor(), &t, &Distill::default().with_temperature(0.0)),
        |e| matches!(e, XentError::InvalidOption(m) if m.contains("temperature")),
        "temperature 0",
    );
    is(
        xent_candle::distill(student.as_tensor(), &t, &Distill::default().with_mode(DistillMode::Jsd { beta: 1.5 })),
        |e| matches!(e, XentError::InvalidOption(m) if m.contains("beta")),
        "beta 1.5",
    );
    is(
        xent_candle::distill(&s.to_dtype(DType::F64).unwrap(), &t, &Distill::default()),
        |e| matches!(e, XentError::InvalidOption(m) if m.contains("f32, f16 or bf16")),
        "f64 student logits",
    );
    is(
        xent_candle::distill(&s.flatten_all().unwrap(), &t.flatten_all().unwrap(), &Distill::default()),
        |e| matches!(e, XentError::Shape(_)),
        "vectors",
    );
}
