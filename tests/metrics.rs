//! Sequence metrics, calibration, temperature scaling, second order, preference losses and
//! Gaussian cross-entropy (issue 4; the seed notebook's sections 4, 5 and 15-21).

mod common;

use common::*;
use ndarray::{array, s, Array1, Array2};
use xent::calibration::{calibrate, fit_temperature};
use xent::cpu::{hessian, reference, symmetric_eigenvalues};
use xent::preference::{dpo, preference, Preference};
use xent::sequence::{CorpusEval, SeqMask};
use xent::*;

fn backends() -> Vec<(&'static str, &'static dyn Backend)> {
    static CPU: std::sync::OnceLock<Cpu> = std::sync::OnceLock::new();
    let mut v: Vec<(&'static str, &'static dyn Backend)> = vec![("cpu", CPU.get_or_init(Cpu::new))];
    for (name, g) in gpus() {
        v.push((name, g));
    }
    v
}

/// A corpus of B sequences of T tokens with random lengths.
fn corpus(b: usize, t: usize, v: usize, seed: u64) -> (Array2<f32>, Array1<i64>, Array1<i64>) {
    let mut rng = Rng(seed);
    let x = rng.logits(b * t, v, 2.0);
    let y = rng.targets(b * t, v, 0);
    let lengths = Array1::from_shape_fn(b, |_| rng.below(t + 1) as i64);
    (x, y, lengths)
}

#[test]
fn corpus_in_batches_equals_one_call_exactly() {
    let (b, t, v) = (24, 13, 301);
    let (x, y, lengths) = corpus(b, t, v, 1);
    for (name, be) in backends() {
        let mut whole = CorpusEval::default();
        whole.add_batch(be, x.view(), y.view(), t, SeqMask::Lengths(lengths.view())).unwrap();
        // Uneven batches, accumulated in two "workers" and merged.
        let splits = [0, 5, 6, 14, 24];
        let (mut w1, mut w2) = (CorpusEval::default(), CorpusEval::default());
        for (k, win) in splits.windows(2).enumerate() {
            let (lo, hi) = (win[0], win[1]);
            let acc = if k < 2 { &mut w1 } else { &mut w2 };
            let xs = x.slice(s![lo * t..hi * t, ..]);
            let ys = y.slice(s![lo * t..hi * t]);
            acc.add_batch(be, xs, ys, t, SeqMask::Lengths(lengths.slice(s![lo..hi]))).unwrap();
        }
        w1.merge(&w2);
        assert_eq!(w1, whole, "{name}: the merged accumulator is bit-identical");
        assert_eq!(w1.finish(), whole.finish(), "{name}");
        // Against the f64 reference: token-weighted NLL over counted tokens.
        let mut tt = y.clone();
        for s in 0..b {
            for k in lengths[s] as usize..t {
                tt[s * t + k] = -100;
            }
        }
        let r = reference::cross_entropy(x.view(), tt.view(), &CrossEntropy::default()).unwrap();
        let rep = whole.finish();
        assert_scalar(&format!("{name} corpus nll"), rep.corpus_nll, r.loss, 1e-6, 1e-6);
        assert_eq!(rep.tokens, lengths.sum() as u64);
        assert!((rep.bits_per_token - rep.corpus_nll / std::f64::consts::LN_2).abs() < 1e-12);
        assert_eq!(rep.ppl_per_sequence.len(), b);
    }
}

#[test]
fn masks_and_lengths_agree_and_the_naive_average_does_not() {
    let (b, t, v) = (6, 11, 50);
    let (x, y, lengths) = corpus(b, t, v, 2);
    let mask = Array2::from_shape_fn((b, t), |(s, k)| ((k as i64) < lengths[s]) as u8);
    let cpu = Cpu::new();
    let (mut a, mut c) = (CorpusEval::default(), CorpusEval::default());
    a.add_batch(&cpu, x.view(), y.view(), t, SeqMask::Mask(mask.view())).unwrap();
    c.add_batch(&cpu, x.view(), y.view(), t, SeqMask::Lengths(lengths.view())).unwrap();
    assert_eq!(a, c);
    // Seed section 19/5: averaging over all B*T positions with zeros for masked ones is wrong.
    let rep = a.finish();
    let naive = a.nll.value() / (b * t) as f64;
    assert!(rep.corpus_nll > naive * 1.2, "{} vs naive {naive}", rep.corpus_nll);
    // Per-sequence perplexity is exp of that sequence's mean NLL.
    for (p, n) in rep.ppl_per_sequence.iter().zip(&rep.nll_per_sequence) {
        assert!(p.is_nan() && n.is_nan() || (p - n.exp()).abs() <= 1e-12 * p);
    }
}

#[test]
fn s05_perplexity_is_exp_of_mean_token_cross_entropy() {
    // The notebook's five token probabilities, as one sequence of two-class rows.
    let probs = [0.30f64, 0.70, 0.40, 0.10, 0.55];
    let x = Array2::from_shape_fn(
        (5, 2),
        |(i, c)| if c == 0 { probs[i].ln() as f32 } else { (1.0 - probs[i]).ln() as f32 },
    );
    let y = Array1::<i64>::zeros(5);
    let want_nll = -probs.iter().map(|p| p.ln()).sum::<f64>() / 5.0;
    for (name, b) in backends() {
        let mut acc = CorpusEval::default();
        acc.add_batch(b, x.view(), y.view(), 5, SeqMask::Lengths(array![5i64].view())).unwrap();
        let r = acc.finish();
        assert_scalar(&format!("{name} nll"), r.corpus_nll, want_nll, 1e-6, 1e-6);
        assert_scalar(&format!("{name} ppl"), r.corpus_ppl, want_nll.exp(), 0.0, 2e-6);
    }
}

/// Logits generated at temperature `t_star`: labels are drawn from softmax(z), the model
/// reports `t_star * z` (overconfident); temperature scaling should recover `t_star`.
fn overconfident(n: usize, v: usize, t_star: f32, seed: u64) -> (Array2<f32>, Array1<i64>) {
    let mut rng = Rng(seed);
    let z = rng.logits(n, v, 1.5);
    let y: Array1<i64> = z
        .rows()
        .into_iter()
        .map(|row| {
            let m = row.iter().fold(f32::MIN, |a, &b| a.max(b));
            let e: Vec<f64> = row.iter().map(|&v| ((v - m) as f64).exp()).collect();
            let mut u = rng.uniform() * e.iter().sum::<f64>();
            e.iter()
                .position(|&p| {
                    u -= p;
                    u <= 0.0
                })
                .unwrap_or(v - 1) as i64
        })
        .collect();
    (z.mapv(|v| v * t_star), y)
}

#[test]
fn temperature_scaling_recovers_a_known_temperature() {
    let (x, y) = overconfident(60_000, 10, 2.5, 7);
    // Each search step is one pass; the GPU variants are covered by the other tests, so the
    // CPU and the default GPU context suffice here.
    for (name, b) in backends().into_iter().take(2) {
        let fit = fit_temperature(b, x.view(), y.view(), 15).unwrap();
        println!(
            "{name}: T = {} after {} passes, NLL {} -> {}, ECE {} -> {}",
            fit.temperature, fit.passes, fit.before.nll, fit.after.nll, fit.before.ece, fit.after.ece
        );
        assert!((fit.temperature - 2.5).abs() < 0.025, "{name}: fitted {}", fit.temperature);
        assert!(fit.after.nll < fit.before.nll && fit.after.ece < fit.before.ece / 3.0, "{name}");
        assert!(fit.passes < 40, "{name}: {} passes", fit.passes);
        // Top-1 accuracy does not depend on the temperature.
        assert_eq!(fit.before.accuracy, fit.after.accuracy);
    }
}

#[test]
fn s18_fitted_temperature_beats_the_seed_grid() {
    let x = array![[5.0f32, 0.8, -1.0], [4.5, 0.3, -0.2], [3.8, 1.1, -0.1], [0.2, 1.7, 0.1], [1.0, 0.7, 0.4]];
    let y = array![0i64, 0, 1, 1, 2];
    let nll = |t: f64| {
        reference::cross_entropy(x.view(), y.view(), &CrossEntropy::default().with_temperature(t as f32)).unwrap().loss
    };
    let grid_best = (0..150).map(|i| 0.5 + 2.5 * i as f64 / 149.0).map(nll).fold(f64::INFINITY, f64::min);
    for (name, b) in backends() {
        let fit = fit_temperature(b, x.view(), y.view(), 5).unwrap();
        assert!(fit.after.nll <= grid_best + 1e-6, "{name}: {} vs grid {grid_best}", fit.after.nll);
        // At the optimum the derivative vanishes: nearby temperatures are no better.
        for dt in [-1e-3, 1e-3] {
            assert!(nll(fit.temperature + dt) >= fit.after.nll - 1e-6, "{name}");
        }
    }
}

#[test]
fn expected_calibration_error_and_reliability_table() {
    // Two confidence levels inside bins: 0.85 (right 3 of 4) and 0.55 (right 1 of 2).
    let l9 = (0.85f64 / 0.15).ln() as f32;
    let l6 = (0.55f64 / 0.45).ln() as f32;
    let x = array![[l9, 0.0], [l9, 0.0], [l9, 0.0], [l9, 0.0], [l6, 0.0], [l6, 0.0]];
    let y = array![0i64, 0, 0, 1, 0, 1];
    let want = 4.0 / 6.0 * (0.75f64 - 0.85).abs() + 2.0 / 6.0 * (0.5f64 - 0.55).abs();
    for (name, b) in backends() {
        let c = calibrate(b, x.view(), y.view(), 1.0, 10).unwrap();
        assert_scalar(&format!("{name} ece"), c.ece, want, 1e-6, 0.0);
        assert_scalar(&format!("{name} accuracy"), c.accuracy, 4.0 / 6.0, 0.0, 0.0);
        assert_eq!(c.bins.iter().map(|b| b.count).sum::<u64>(), 6);
        assert_eq!(c.bins[8].count, 4);
        assert_eq!(c.bins[5].count, 2);
        assert!(c.bins[0].confidence.is_nan());
    }
}

#[test]
fn hessian_vector_products_match_finite_differences() {
    let mut rng = Rng(5);
    for &(n, v) in &[(1, 1), (4, 7), (16, 1000), (3, 20_000)] {
        let x = rng.logits(n, v, 2.0);
        let dv = rng.logits(n, v, 1.0);
        let t = rng.targets(n, v, 0);
        // (g(x + h v) - g(x - h v)) / 2h with the f64 reference gradient of the summed loss.
        let h = 1e-3f32;
        let g = |xx: &Array2<f32>| {
            reference::cross_entropy(xx.view(), t.view(), &CrossEntropy::default().with_reduction(Reduction::Sum))
                .unwrap()
                .grad
        };
        let (xp, xm) = (&x + &dv.mapv(|e| e * h), &x - &dv.mapv(|e| e * h));
        let fd = (g(&xp) - g(&xm)) / (2.0 * h as f64);
        let scale = fd.iter().fold(0.0f64, |m, &e| m.max(e.abs())).max(1e-12);
        for (name, b) in backends().into_iter().filter(|(n, _)| v < 16_000 || !n.contains("64KiB")) {
            let hv = b.hvp(x.view().into(), dv.view()).unwrap();
            assert_close_2d(&format!("{name} hvp {n}x{v}"), hv.view(), fd.view(), 1e-4 * scale, 1e-3);
        }
    }
}

#[test]
fn s16_dense_hessian_is_symmetric_psd_with_zero_row_sums() {
    let z = array![1.4f32, 0.1, -0.8, 0.3];
    let h = hessian(z.view()).unwrap();
    assert!(h.iter().zip(h.t().iter()).all(|(a, b)| a == b), "symmetric");
    let eig = symmetric_eigenvalues(&h).unwrap();
    assert!(eig[0] >= -1e-12 && eig[0].abs() < 1e-12, "PSD with one zero eigenvalue (the ones vector): {eig:?}");
    assert!(h.rows().into_iter().all(|r| r.sum().abs() < 1e-15), "row sums are zero");
    // The HVP kernel agrees with the dense product.
    let v = array![[0.3f32, -1.0, 2.0, 0.5]];
    let dense = h.dot(&v.row(0).mapv(f64::from));
    for (name, b) in backends() {
        let hv = b.hvp(z.view().insert_axis(ndarray::Axis(0)).into(), v.view()).unwrap();
        assert_close_1d(name, hv.row(0), dense.view(), 1e-7, 1e-6);
    }
    // Eigenvalues of a known matrix.
    let m = array![[2.0, 1.0], [1.0, 2.0]];
    let e = symmetric_eigenvalues(&m).unwrap();
    assert!((e[0] - 1.0).abs() < 1e-12 && (e[1] - 3.0).abs() < 1e-12);
}

#[test]
fn s21_preference_loss_is_stable_with_correct_gradients() {
    let c = array![1e4f32, -1e4, 0.0, 3.0, -2.0, 0.5];
    let r = array![-1e4f32, 1e4, 0.0, 1.0, 2.0, 0.5];
    let want = |d: f64| (1.0 + (-d).exp()).ln(); // -log sigmoid(d), d = c - r - margin
    for (name, b) in backends() {
        for margin in [0.0f32, 0.5] {
            let cfg = Preference::default().with_margin(margin).with_grad(true);
            let out = preference(b, c.view(), r.view(), &cfg).unwrap();
            let d: Vec<f64> = c.iter().zip(&r).map(|(a, q)| (*a as f64) - (*q as f64) - margin as f64).collect();
            let expect = d.iter().map(|&d| if d < -30.0 { -d } else { want(d) }).sum::<f64>() / 6.0;
            assert_scalar(&format!("{name} loss"), out.loss, expect, 1e-6, 1e-6);
            let (gc, gr) = (out.grad_chosen.unwrap(), out.grad_rejected.unwrap());
            for i in 0..6 {
                let sig_neg = 1.0 / (1.0 + d[i].exp());
                assert!((gc[i] as f64 + sig_neg / 6.0).abs() < 1e-7, "{name} grad chosen {i}");
                assert_eq!(gc[i], -gr[i]);
            }
        }
        // DPO is preference on policy-minus-reference log-probabilities, scaled by beta.
        let (pc, pr, rc, rr) =
            (array![-1.0f32, -2.0], array![-1.5f32, -1.0], array![-1.2f32, -2.2], array![-1.4f32, -1.1]);
        let d = dpo(b, pc.view(), pr.view(), rc.view(), rr.view(), &Preference::default().with_beta(0.1)).unwrap();
        let want_dpo = [(0.2f64, -0.1f64), (0.2, 0.1)].iter().map(|&(a, q)| want(0.1 * (a - q))).sum::<f64>() / 2.0;
        assert_scalar(&format!("{name} dpo"), d.loss, want_dpo, 1e-6, 1e-6);
    }
}

#[test]
fn s04_gaussian_cross_entropy_closed_form_matches_monte_carlo() {
    let (mp, sp, mq, sq) = (0.0, 1.0, 0.4, 1.3);
    let mut rng = Rng(42);
    let n = 200_000;
    let mc = (0..n)
        .map(|_| {
            let x = mp + sp * rng.normal();
            0.5 * (2.0 * std::f64::consts::PI * sq * sq).ln() + 0.5 * ((x - mq) / sq).powi(2)
        })
        .sum::<f64>()
        / n as f64;
    let closed = gaussian::cross_entropy(mp, sp, mq, sq);
    assert!((mc - closed).abs() < 0.01, "{mc} vs {closed}");
    assert!((gaussian::kl(mp, sp, mq, sq) - (closed - gaussian::entropy(sp))).abs() < 1e-12);
    assert!(gaussian::kl(1.0, 2.0, 1.0, 2.0).abs() < 1e-15);
}
