//! The seed notebook's checks (../shared/seed/theory-notebook.txt), each computed with xent on
//! every backend. Section numbers follow the notebook.

mod common;

use common::*;
use ndarray::{array, Array1, Array2};
use xent::cpu::reference;
use xent::*;

fn backends() -> Vec<(&'static str, &'static dyn Backend)> {
    static CPU: std::sync::OnceLock<Cpu> = std::sync::OnceLock::new();
    let mut v: Vec<(&'static str, &'static dyn Backend)> = vec![("cpu", CPU.get_or_init(Cpu::new))];
    for (name, g) in gpus() {
        v.push((name, g));
    }
    v
}

fn row(p: &[f64]) -> Array2<f64> {
    Array2::from_shape_vec((1, p.len()), p.to_vec()).unwrap()
}

/// Sections 1, 6 and 22: H(p, q) = H(p) + KL(p || q), H(p, q) >= H(p), KL >= 0.
#[test]
fn s01_s06_s22_cross_entropy_is_entropy_plus_kl() {
    let mut rng = Rng(123);
    let mut cases = vec![(vec![0.7, 0.2, 0.1], vec![0.5, 0.3, 0.2])];
    for _ in 0..5 {
        let mut p: Vec<f64> = (0..5).map(|_| 0.1 + 0.9 * rng.uniform()).collect();
        let mut q: Vec<f64> = (0..5).map(|_| 0.1 + 0.9 * rng.uniform()).collect();
        let (sp, sq) = (p.iter().sum::<f64>(), q.iter().sum::<f64>());
        p.iter_mut().for_each(|v| *v /= sp);
        q.iter_mut().for_each(|v| *v /= sq);
        cases.push((p, q));
    }
    for (name, b) in backends() {
        for (p, q) in &cases {
            let m = b.measures(row(p).view(), row(q).view()).unwrap();
            let (h, ce, kl) = (m.entropy[0], m.cross_entropy[0], m.kl[0]);
            let tol = if name == "cpu" { 1e-12 } else { 2e-6 };
            assert!((ce - (h + kl)).abs() <= tol, "{name}: {ce} != {h} + {kl}");
            assert!(ce + tol >= h && kl >= -tol, "{name}");
        }
        // The notebook's first example against its own formulas, -sum p ln p and -sum p ln q.
        let (p, q) = (&cases[0].0, &cases[0].1);
        let m = b.measures(row(p).view(), row(q).view()).unwrap();
        let h: f64 = -p.iter().map(|v| v * v.ln()).sum::<f64>();
        let ce: f64 = -p.iter().zip(q).map(|(a, b)| a * b.ln()).sum::<f64>();
        assert_scalar(&format!("{name} H(p)"), m.entropy[0], h, 1e-6, 0.0);
        assert_scalar(&format!("{name} H(p,q)"), m.cross_entropy[0], ce, 1e-6, 0.0);
    }
}

/// Section 2: the cross-entropy H(p, q) over q is minimised at q = p (Bernoulli, via BCE).
#[test]
fn s02_minimum_at_the_true_distribution() {
    let qs = Array2::from_shape_fn((250, 1), |(i, _)| (0.01 + 0.98 * i as f64 / 249.0) as f32);
    let y = Array2::from_elem((250, 1), 0.8f32);
    for (name, b) in backends() {
        let out = b.bce(qs.view(), y.view(), &Bce::default().with_reduction(Reduction::None)).unwrap();
        let l = out.elem_loss.unwrap();
        let best = (0..250).min_by(|&i, &j| l[[i, 0]].total_cmp(&l[[j, 0]])).unwrap();
        assert!((qs[[best, 0]] - 0.8).abs() < 1e-2, "{name}: minimum at {}", qs[[best, 0]]);
    }
}

/// Section 3: the sample average of -log q(x), x ~ p, approximates H(p, q).
#[test]
fn s03_empirical_cross_entropy() {
    let (p, q): ([f64; 3], [f64; 3]) = ([0.7, 0.2, 0.1], [0.5, 0.3, 0.2]);
    let mut rng = Rng(42);
    let n = 5000;
    let t: Array1<i64> = (0..n)
        .map(|_| {
            let u = rng.uniform();
            if u < p[0] {
                0
            } else if u < p[0] + p[1] {
                1
            } else {
                2
            }
        })
        .collect();
    let x = Array2::from_shape_fn((n, 3), |(_, c)| q[c].ln() as f32);
    let analytic = -(0..3).map(|c| p[c] * q[c].ln()).sum::<f64>();
    for (name, b) in backends() {
        let out = b.cross_entropy(x.view().into(), t.view().into(), &CrossEntropy::default()).unwrap();
        assert!((out.loss - analytic).abs() < 0.03, "{name}: {} vs {analytic}", out.loss);
    }
}

/// Section 7: support mismatch gives +inf cross-entropy and KL, as it should.
#[test]
fn s07_support_mismatch_is_infinite() {
    for (name, b) in backends() {
        let m = b.measures(row(&[0.6, 0.4]).view(), row(&[1.0, 0.0]).view()).unwrap();
        assert_eq!(m.cross_entropy[0], f64::INFINITY, "{name}");
        assert_eq!(m.kl[0], f64::INFINITY, "{name}");
        assert!(m.js[0].is_finite(), "{name}");
    }
}

/// Sections 8-9: BCE from logits is exact at z = +-20 where the probability path saturates.
#[test]
fn s09_stable_bce_from_logits() {
    let z = array![[-20.0f32], [-5.0], [0.0], [5.0], [20.0]];
    let y = Array2::from_elem((5, 1), 1.0f32);
    for (name, b) in backends() {
        let out = b.bce_with_logits(z.view(), y.view(), &Bce::default().with_reduction(Reduction::None)).unwrap();
        let l = out.elem_loss.unwrap();
        for (i, &zi) in z.iter().enumerate() {
            let want = (1.0 + (-(zi as f64)).exp()).ln(); // softplus(-z), exact in f64
            assert!((l[[i, 0]] as f64 - want).abs() <= 1e-6 * want.max(1e-9) + 1e-12, "{name} z={zi}: {}", l[[i, 0]]);
        }
        // z = 20: the loss is 2.06e-9, not 0 (f32 sigmoid(20) rounds to 1).
        assert!(l[[4, 0]] > 2.0e-9 && l[[4, 0]] < 2.1e-9, "{name}");
    }
}

/// Section 10: cross-entropy from probabilities equals cross-entropy from logits.
#[test]
fn s10_probability_space_and_logit_space_agree() {
    let z = array![[2.2f32, 0.4, -1.1, 1.7]];
    for (name, b) in backends() {
        let ce = b.cross_entropy(z.view().into(), (&[3i64][..]).into(), &CrossEntropy::default()).unwrap().loss;
        let p = b.log_softmax(z.view().into(), SoftmaxKind::Softmax).unwrap();
        assert!((ce + (p[[0, 3]] as f64).ln()).abs() < 1e-6, "{name}");
    }
}

/// Sections 11-12: soft targets; smoothing raises the target's entropy and equals the soft
/// target (1 - eps) onehot + eps / K.
#[test]
fn s11_s12_soft_targets_and_label_smoothing() {
    let z = array![[3.0f32, 0.5, -0.2, -1.5]];
    let soft = array![[0.85f32, 0.10, 0.03, 0.02]];
    let (k, eps) = (5usize, 0.1f32);
    let hard = Array2::from_shape_fn((1, k), |(_, c)| if c == 2 { 1.0 } else { 0.0 });
    let smoothed = hard.mapv(|h: f64| (1.0 - eps as f64) * h + eps as f64 / k as f64);
    let x5 = array![[0.3f32, -1.0, 2.0, 0.1, 0.5]];
    for (name, b) in backends() {
        let ls = b.log_softmax(z.view().into(), SoftmaxKind::LogSoftmax).unwrap();
        let want: f64 = -(0..4).map(|c| soft[[0, c]] as f64 * ls[[0, c]] as f64).sum::<f64>();
        let got = b.cross_entropy(z.view().into(), soft.view().into(), &CrossEntropy::default()).unwrap().loss;
        assert!((got - want).abs() < 1e-6, "{name}: {got} vs {want}");
        let e = b.measures(smoothed.view(), smoothed.view()).unwrap().entropy[0];
        let e0 = b.measures(hard.view(), hard.view()).unwrap().entropy[0];
        assert!(e > e0 && e0 == 0.0, "{name}: smoothing must raise entropy ({e0} -> {e})");
        let by_option = b
            .cross_entropy(x5.view().into(), (&[2i64][..]).into(), &CrossEntropy::default().with_label_smoothing(eps))
            .unwrap()
            .loss;
        let by_target = b
            .cross_entropy(x5.view().into(), smoothed.mapv(|v| v as f32).view().into(), &CrossEntropy::default())
            .unwrap()
            .loss;
        assert!((by_option - by_target).abs() < 1e-6, "{name}: {by_option} vs {by_target}");
    }
}

/// Section 13: distillation. Soft-target CE at temperature tau equals H(teacher) + KL, and the
/// distillation loss is tau^2 KL.
#[test]
fn s13_distillation_with_temperature() {
    let teacher = array![[7.0f32, 5.5, 1.0, -0.5]];
    let student = array![[4.5f32, 3.7, 0.2, -0.7]];
    for (name, b) in backends() {
        for tau in [1.0f32, 2.0, 4.0] {
            let (ts, ss) = (teacher.mapv(|v| v / tau), student.mapv(|v| v / tau));
            let tp = b.log_softmax(ts.view().into(), SoftmaxKind::Softmax).unwrap();
            let kd_ce = b.cross_entropy(ss.view().into(), tp.view().into(), &CrossEntropy::default()).unwrap().loss;
            let m = b.measures_from_logits(ts.view().into(), ss.view().into()).unwrap();
            assert!((kd_ce - (m.entropy[0] + m.kl[0])).abs() < 2e-6, "{name} tau={tau}");
            let d = b
                .distill(student.view().into(), teacher.view().into(), &Distill::default().with_temperature(tau), false)
                .unwrap();
            let want = (tau * tau) as f64 * m.kl[0];
            assert!((d.loss - want).abs() <= 2e-6 * want.max(1.0), "{name} tau={tau}: {} vs {want}", d.loss);
        }
    }
}

/// Section 14: the max-subtracted log-sum-exp does not overflow at logits of 1000.
#[test]
fn s14_stable_log_sum_exp() {
    let z = array![[1000.0f32, 1001.0, 999.0]];
    let want = reference::log_softmax(z.view(), SoftmaxKind::LogSoftmax).unwrap();
    for (name, b) in backends() {
        let got = b.log_softmax(z.view().into(), SoftmaxKind::LogSoftmax).unwrap();
        assert!(got.iter().all(|v| v.is_finite()), "{name}");
        assert_close_2d(name, got.view(), want.view(), 1e-6, 1e-6);
        let ce = b.cross_entropy(z.view().into(), (&[1i64][..]).into(), &CrossEntropy::default()).unwrap().loss;
        assert!((ce + want[[0, 1]]).abs() < 1e-6, "{name}");
    }
}

/// Section 15: the gradient equals softmax minus target, by finite differences.
#[test]
fn s15_gradient_is_softmax_minus_target() {
    let z = array![[0.8f32, -0.4, 1.2]];
    let cfg = CrossEntropy::default();
    // Central differences of the f64 loss (h = 1e-6).
    let f = |zz: &Array2<f32>| reference::cross_entropy(zz.view(), &[2i64][..], &CrossEntropy::default()).unwrap().loss;
    for (name, b) in backends() {
        let g = b.cross_entropy_with_grad(z.view().into(), (&[2i64][..]).into(), &cfg).unwrap().grad.unwrap();
        let p = b.log_softmax(z.view().into(), SoftmaxKind::Softmax).unwrap();
        for c in 0..3 {
            let closed = p[[0, c]] as f64 - if c == 2 { 1.0 } else { 0.0 };
            let h = 1e-3f32;
            let (mut zp, mut zm) = (z.clone(), z.clone());
            zp[[0, c]] += h;
            zm[[0, c]] -= h;
            let fd = (f(&zp) - f(&zm)) / ((zp[[0, c]] - zm[[0, c]]) as f64);
            assert!((g[[0, c]] as f64 - closed).abs() < 1e-6, "{name}: grad {c}");
            assert!((g[[0, c]] as f64 - fd).abs() < 1e-6, "{name}: finite difference {c}: {fd}");
        }
    }
}

/// Section 17: expected log-loss is minimised at the true probability (a proper scoring rule).
#[test]
fn s17_strictly_proper_scoring_rule() {
    let qs = Array2::from_shape_fn((400, 1), |(i, _)| (0.01 + 0.98 * i as f64 / 399.0) as f32);
    let y = Array2::from_elem((400, 1), 0.73f32);
    for (name, b) in backends() {
        let l = b.bce(qs.view(), y.view(), &Bce::default().with_reduction(Reduction::None)).unwrap().elem_loss.unwrap();
        let best = (0..400).min_by(|&i, &j| l[[i, 0]].total_cmp(&l[[j, 0]])).unwrap();
        assert!((qs[[best, 0]] - 0.73).abs() < 5e-3, "{name}: {}", qs[[best, 0]]);
    }
}

/// Section 19: weighted BCE emphasises positives; the masked average is not the naive average
/// that counts masked positions as zeros (xent's ignore_index gives the former).
#[test]
fn s19_weighted_and_masked_losses() {
    let probs = array![[0.9f32], [0.8], [0.7], [0.4], [0.3], [0.2]];
    let labels = array![[0.0f32], [0.0], [0.0], [1.0], [1.0], [1.0]];
    let w = labels.mapv(|y| if y == 1.0 { 3.0 } else { 1.0 });
    // The notebook's per-example loss -(y ln p + (1 - y) ln(1 - p)), in f64.
    let per: Vec<f64> = probs
        .iter()
        .zip(labels.iter())
        .map(|(&p, &y)| -((y as f64) * (p as f64).ln() + (1.0 - y as f64) * (1.0 - p as f64).ln()))
        .collect();
    let want_plain = per.iter().sum::<f64>() / 6.0;
    let want_weighted = per.iter().zip(w.iter()).map(|(l, &w)| l * w as f64).sum::<f64>() / w.sum() as f64;
    for (name, b) in backends() {
        let plain = b.bce(probs.view(), labels.view(), &Bce::default()).unwrap().loss;
        let cfg = Bce::default().with_reduction(Reduction::Sum).with_weight(BceWeight::PerElement(w.clone()));
        let weighted = b.bce(probs.view(), labels.view(), &cfg).unwrap().loss / w.sum() as f64;
        assert_scalar(&format!("{name} plain"), plain, want_plain, 1e-6, 1e-6);
        assert_scalar(&format!("{name} weighted"), weighted, want_weighted, 1e-6, 1e-6);
        // Emphasis on positives: the weighted average moves towards the positives' mean loss.
        let pos_mean = per[3..].iter().sum::<f64>() / 3.0;
        assert!((weighted - pos_mean).abs() < (plain - pos_mean).abs(), "{name}: {weighted} vs {plain}");
    }
    // Token losses of 6 rows with a mask: mean over counted rows, not over all.
    let losses = [0.4f64, 0.9, 1.2, 0.3, 2.0, 0.6];
    let mask = [1, 1, 0, 1, 0, 1];
    // Two-class rows whose CE is exactly the listed loss: logits (0, ln(e^l - 1)), target 0.
    let x = Array2::from_shape_fn((6, 2), |(i, c)| if c == 0 { 0.0 } else { (losses[i].exp() - 1.0).ln() as f32 });
    let t: Array1<i64> = (0..6).map(|i| if mask[i] == 1 { 0 } else { -100 }).collect();
    for (name, b) in backends() {
        let m = b.cross_entropy(x.view().into(), t.view().into(), &CrossEntropy::default()).unwrap().loss;
        assert_scalar(&format!("{name} masked mean"), m, 0.55, 1e-6, 0.0);
        let naive = b
            .cross_entropy(x.view().into(), t.view().into(), &CrossEntropy::default().with_reduction(Reduction::Sum))
            .unwrap()
            .loss
            / 6.0;
        assert!((naive - 0.55).abs() > 0.1, "{name}: the naive average differs");
    }
}

/// Section 20: the same accuracy can hide very different cross-entropy.
#[test]
fn s20_same_accuracy_different_cross_entropy() {
    let a = array![[0.51, 0.49], [0.51, 0.49], [0.51, 0.49], [0.49, 0.51]];
    let b2 = array![[0.99, 0.01], [0.95, 0.05], [0.97, 0.03], [0.01, 0.99]];
    let t = array![0i64, 0, 0, 1];
    // The notebook's mean of -ln p[i, y_i], in f64; both predictors are 100% accurate.
    let want = |p: &Array2<f64>| t.iter().enumerate().map(|(i, &y)| -p[[i, y as usize]].ln()).sum::<f64>() / 4.0;
    for (name, b) in backends() {
        let ce = |p: &Array2<f64>| {
            let x = p.mapv(|v| v.ln() as f32);
            b.cross_entropy(x.view().into(), t.view().into(), &CrossEntropy::default()).unwrap().loss
        };
        let (ca, cb) = (ce(&a), ce(&b2));
        assert_scalar(&format!("{name} CE A"), ca, want(&a), 1e-6, 1e-6);
        assert_scalar(&format!("{name} CE B"), cb, want(&b2), 1e-6, 1e-6);
        assert!(ca > 20.0 * cb, "{name}: same accuracy, very different CE ({ca} vs {cb})");
    }
}
