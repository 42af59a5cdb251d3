//! GPU kernels and the fast CPU path against the f64 reference, over shapes and options.
//!
//! Tolerances: loss |err| <= 1e-5 |loss| + 1e-6; gradient |err| <= 1e-7 + 1e-4 |g| scaled by
//! the reduction (a mean gradient is ~1/N of a sum gradient). Every GPU context in
//! `common::gpus()` is exercised: subgroup reductions, workgroup-memory reductions and
//! 64 KiB bindings (many chunks per tensor).

mod common;

use common::*;
use ndarray::{Array1, Array2};
use xent::cpu::reference;
use xent::*;

fn check(backend: &dyn Backend, label: &str, x: &Array2<f32>, t: &Array1<i64>, cfg: &CrossEntropy, grad: bool) {
    let r = reference::cross_entropy(x, t, cfg).unwrap();
    let o = if grad {
        backend.cross_entropy_with_grad(x.into(), t.into(), cfg).unwrap()
    } else {
        backend.cross_entropy(x.into(), t.into(), cfg).unwrap()
    };
    let what = format!("{label} {}x{} {:?}", x.nrows(), x.ncols(), cfg.reduction);
    assert_scalar(&format!("{what} loss"), o.loss, r.loss, 1e-6, 1e-5);
    assert_eq!(o.counted, r.counted, "{what} counted");
    assert_scalar(&format!("{what} weight_sum"), o.weight_sum, r.weight_sum, 1e-6, 1e-6);
    if cfg.outputs.per_row || cfg.reduction == Reduction::None {
        let rows = o.row_loss.as_ref().expect("per-row losses");
        assert_close_1d(&format!("{what} row loss"), rows.view(), r.row_loss.view(), 1e-5, 1e-5);
    }
    if cfg.outputs.per_row {
        let lse = o.row_lse.as_ref().expect("per-row lse");
        assert_close_1d(&format!("{what} lse"), lse.view(), r.row_lse.view(), 1e-5, 1e-6);
    }
    if grad {
        let scale = r.grad.iter().fold(0.0f64, |m, &g| m.max(g.abs())).max(1e-30);
        assert_close_2d(&format!("{what} grad"), o.grad.as_ref().unwrap().view(), r.grad.view(), 2e-6 * scale, 1e-4);
    }
}

fn backends() -> Vec<(String, Box<dyn Backend>)> {
    let mut v: Vec<(String, Box<dyn Backend>)> = vec![("cpu".into(), Box::new(Cpu::new()))];
    v.push(("cpu-1-thread".into(), Box::new(Cpu::with_threads(1).unwrap())));
    for (name, g) in gpu_backends() {
        v.push((name.into(), g));
    }
    v
}

#[test]
fn shapes_and_reductions() {
    let mut rng = Rng(7);
    let shapes = [(1, 1), (3, 1), (4, 2), (7, 5), (5, 4), (9, 255), (6, 256), (33, 1000), (17, 4099), (8, 12288)];
    for (name, b) in backends() {
        for &(n, v) in &shapes {
            let x = rng.logits(n, v, 3.0);
            let t = rng.targets(n, v, 4);
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                let cfg = CrossEntropy::default().with_reduction(reduction).with_per_row(true);
                check(b.as_ref(), &name, &x, &t, &cfg, true);
            }
        }
    }
}

#[test]
fn every_option_together_and_apart() {
    let mut rng = Rng(11);
    let (n, v) = (23, 517);
    let x = rng.logits(n, v, 4.0);
    let t = rng.targets(n, v, 5);
    let cw = Array1::from_shape_fn(v, |_| (0.2 + rng.uniform()) as f32);
    let sw = Array1::from_shape_fn(n, |_| (0.5 + rng.uniform()) as f32);
    let base = CrossEntropy::default().with_per_row(true);
    let variants = vec![
        base.clone().with_label_smoothing(0.1),
        base.clone().with_class_weight(cw.clone()),
        base.clone().with_sample_weight(sw.clone()),
        base.clone().with_z_loss(1e-3),
        base.clone().with_softcap(5.0),
        base.clone().with_temperature(2.5),
        base.clone().with_grad_scale(0.25),
        base.clone().with_ignore_index(3),
        base.clone()
            .with_label_smoothing(0.2)
            .with_class_weight(cw.clone())
            .with_sample_weight(sw.clone())
            .with_z_loss(1e-4)
            .with_softcap(8.0)
            .with_temperature(0.7)
            .with_grad_scale(3.0),
    ];
    // Under ignore_index = 3 the ignored rows carry 3 instead of -100.
    let t3 = t.mapv(|y| if y == -100 { 3 } else { y });
    for (name, b) in backends() {
        for cfg in &variants {
            let t = if cfg.ignore_index == 3 { &t3 } else { &t };
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                let cfg = cfg.clone().with_reduction(reduction);
                check(b.as_ref(), &name, &x, t, &cfg, true);
            }
        }
    }
}

#[test]
fn more_rows_than_one_dispatch_dimension() {
    // 70,000 rows: the row grid folds into two dimensions.
    let mut rng = Rng(3);
    let (n, v) = (70_000, 12);
    let x = rng.logits(n, v, 2.0);
    let t = rng.targets(n, v, 7);
    let cfg = CrossEntropy::default().with_per_row(true);
    for (name, g) in gpu_backends() {
        check(g.as_ref(), name, &x, &t, &cfg, true);
    }
    check(&Cpu::new(), "cpu", &x, &t, &cfg, true);
}

#[cfg(feature = "gpu")]
#[test]
fn tensor_over_the_real_binding_limit() {
    // ~141 MB of logits: more than lavapipe's 128 MiB binding, so the default context chunks too.
    let (n, v) = (1100, 32_000);
    let (x, t) = workload::synthetic(n, v, 2.0, 9, 5);
    let cfg = CrossEntropy::default().with_per_row(true);
    let c = Cpu::new().cross_entropy_with_grad(&x, &t, &cfg).unwrap();
    if let Some(g) = gpu() {
        assert!(g.max_binding_bytes() < (n * v * 4) as u64 || g.max_binding_bytes() > 1 << 30);
        let o = g.cross_entropy_with_grad(&x, &t, &cfg).unwrap();
        assert_scalar("loss", o.loss, c.loss, 1e-6, 2e-6);
        let (og, cg) = (o.grad.unwrap(), c.grad.unwrap());
        let worst = og.iter().zip(cg.iter()).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst < 1e-9, "largest gradient difference {worst}");
        let (ol, cl) = (o.row_lse.unwrap(), c.row_lse.unwrap());
        assert!(ol.iter().zip(cl.iter()).all(|(a, b)| (a - b).abs() <= 2e-6 * b.abs()));
    }
}

#[test]
fn vocabulary_of_a_million_classes() {
    let mut rng = Rng(5);
    let (n, v) = (3, (1 << 20) + 3);
    let x = rng.logits(n, v, 1.0);
    let t = Array1::from(vec![0i64, (v - 1) as i64, 12345]);
    let cfg = CrossEntropy::default().with_per_row(true).with_label_smoothing(0.05);
    // A 4 MiB row cannot fit the 64 KiB test bindings (errors.rs checks that it says so).
    for (name, b) in backends().into_iter().filter(|(n, _)| !n.contains("64KiB")) {
        check(b.as_ref(), &name, &x, &t, &cfg, true);
    }
}

#[test]
fn log_softmax_and_softmax() {
    let mut rng = Rng(9);
    for &(n, v) in &[(1, 1), (5, 9), (3, 4096), (17, 4099), (2, 100_003)] {
        let x = rng.logits(n, v, 5.0);
        for kind in [SoftmaxKind::LogSoftmax, SoftmaxKind::Softmax] {
            let want = reference::log_softmax(&x, kind).unwrap();
            for (name, b) in backends().into_iter().filter(|(n, _)| v < 16_000 || !n.contains("64KiB")) {
                let got = b.log_softmax((&x).into(), kind).unwrap();
                assert_close_2d(&format!("{name} {kind:?} {n}x{v}"), got.view(), want.view(), 1e-6, 2e-6);
            }
        }
    }
}

#[test]
fn in_place_gradient_matches_separate() {
    let mut rng = Rng(13);
    let (n, v) = (37, 333);
    let x = rng.logits(n, v, 3.0);
    let t = rng.targets(n, v, 6);
    let cfg = CrossEntropy::default().with_label_smoothing(0.1).with_z_loss(1e-3);
    let r = reference::cross_entropy(&x, &t, &cfg).unwrap();
    for (name, b) in backends() {
        let mut y = x.clone();
        let o = b.cross_entropy_in_place((&mut y).into(), (&t).into(), &cfg).unwrap();
        assert!(o.grad.is_none());
        assert_scalar(&format!("{name} in-place loss"), o.loss, r.loss, 1e-6, 1e-5);
        assert_close_2d(&format!("{name} in-place grad"), y.view(), r.grad.view(), 1e-9, 1e-4);
        // A strided (transposed-then-transposed-back) view works too.
        let mut z = Array2::<f32>::zeros((v, n));
        z.assign(&x.t());
        let o = b.cross_entropy_in_place(z.view_mut().reversed_axes().into(), (&t).into(), &cfg).unwrap();
        assert_scalar(&format!("{name} strided loss"), o.loss, r.loss, 1e-6, 1e-5);
        assert_close_2d(&format!("{name} strided grad"), z.t(), r.grad.view(), 1e-9, 1e-4);
    }
}

#[test]
fn int32_targets_match_int64() {
    let mut rng = Rng(17);
    let (n, v) = (11, 50);
    let x = rng.logits(n, v, 1.0);
    let t = rng.targets(n, v, 3);
    let t32: Array1<i32> = t.mapv(|y| y as i32);
    let cfg = CrossEntropy::default();
    for (name, b) in backends() {
        let a = b.cross_entropy((&x).into(), (&t).into(), &cfg).unwrap();
        let c = b.cross_entropy((&x).into(), (&t32).into(), &cfg).unwrap();
        assert_eq!(a.loss, c.loss, "{name}");
    }
}

#[test]
fn probability_targets() {
    let mut rng = Rng(23);
    for &(n, v) in &[(1, 1), (6, 7), (13, 256), (9, 3001)] {
        let x = rng.logits(n, v, 3.0);
        // Rows of random probabilities, some with zeros.
        let mut y = Array2::from_shape_fn((n, v), |_| if rng.uniform() < 0.3 { 0.0 } else { rng.uniform() as f32 });
        for mut row in y.rows_mut() {
            let s: f32 = row.sum().max(1e-6);
            row.mapv_inplace(|p| p / s);
        }
        let cw = Array1::from_shape_fn(v, |_| (0.5 + rng.uniform()) as f32);
        let sw = Array1::from_shape_fn(n, |_| (0.5 + rng.uniform()) as f32);
        let base = CrossEntropy::default().with_per_row(true);
        let cfgs = [
            base.clone(),
            base.clone().with_label_smoothing(0.2),
            base.clone().with_class_weight(cw.clone()).with_sample_weight(sw.clone()),
            base.clone().with_z_loss(1e-3).with_softcap(4.0).with_temperature(1.5),
        ];
        for cfg in &cfgs {
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                let cfg = cfg.clone().with_reduction(reduction);
                let r = reference::cross_entropy(&x, &y, &cfg).unwrap();
                for (name, b) in backends() {
                    let o = b.cross_entropy_with_grad((&x).into(), (&y).into(), &cfg).unwrap();
                    let what = format!("{name} soft {n}x{v} {reduction:?}");
                    assert_scalar(&format!("{what} loss"), o.loss, r.loss, 1e-6, 1e-5);
                    assert_eq!(o.counted, n as u64);
                    assert_close_1d(
                        &format!("{what} rows"),
                        o.row_loss.as_ref().unwrap().view(),
                        r.row_loss.view(),
                        1e-5,
                        1e-5,
                    );
                    let scale = r.grad.iter().fold(0.0f64, |m, &g| m.max(g.abs())).max(1e-30);
                    assert_close_2d(
                        &format!("{what} grad"),
                        o.grad.as_ref().unwrap().view(),
                        r.grad.view(),
                        2e-6 * scale,
                        1e-4,
                    );
                }
            }
        }
        // One-hot probabilities reproduce class-index targets.
        let t = rng.targets(n, v, 0);
        let onehot = Array2::from_shape_fn((n, v), |(i, c)| if t[i] == c as i64 { 1.0f32 } else { 0.0 });
        let cfg = base.clone().with_label_smoothing(0.1);
        for (name, b) in backends() {
            let h = b.cross_entropy((&x).into(), (&t).into(), &cfg).unwrap();
            let s = b.cross_entropy((&x).into(), (&onehot).into(), &cfg).unwrap();
            assert_scalar(&format!("{name} one-hot"), s.loss, h.loss, 1e-6, 1e-5);
        }
    }
}

#[test]
fn binary_cross_entropy() {
    let mut rng = Rng(29);
    let cpu = Cpu::new();
    for &(n, c) in &[(1, 1), (20, 7), (300, 33), (5, 5000)] {
        // Logits up to |x| = 1e4 must neither overflow nor hit log(0).
        let x = Array2::from_shape_fn((n, c), |(i, j)| {
            if (i + j) % 11 == 0 {
                if (i + j) % 2 == 0 {
                    1e4
                } else {
                    -1e4
                }
            } else {
                (rng.normal() * 6.0) as f32
            }
        });
        let p = x.mapv(|v| 1.0 / (1.0 + (-v / 1e3).exp()));
        let y = Array2::from_shape_fn((n, c), |_| {
            if rng.uniform() < 0.3 {
                rng.uniform() as f32
            } else {
                (rng.below(2)) as f32
            }
        });
        let wc = Array1::from_shape_fn(c, |_| (0.5 + rng.uniform()) as f32);
        let we = Array2::from_shape_fn((n, c), |_| (0.5 + rng.uniform()) as f32);
        let pw = Array1::from_shape_fn(c, |_| (0.2 + 3.0 * rng.uniform()) as f32);
        for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
            let cfgs = [
                Bce::default().with_reduction(reduction).with_grad(true),
                Bce::default()
                    .with_reduction(reduction)
                    .with_grad(true)
                    .with_weight(BceWeight::PerClass(wc.clone()))
                    .with_pos_weight(pw.clone())
                    .with_grad_scale(2.0),
                Bce::default().with_reduction(reduction).with_grad(true).with_weight(BceWeight::PerElement(we.clone())),
            ];
            for cfg in &cfgs {
                let want = cpu.bce_with_logits(x.view(), y.view(), cfg).unwrap();
                assert!(want.loss.is_finite());
                let want_p = cpu.bce(p.view(), y.view(), &cfg.clone().with_pos_weight(None)).unwrap();
                for (name, g) in gpus() {
                    let what = format!("{name} bce {n}x{c} {reduction:?}");
                    let got = g.bce_with_logits(x.view(), y.view(), cfg).unwrap();
                    assert_scalar(&format!("{what} loss"), got.loss, want.loss, 1e-6, 2e-6);
                    // With soft targets the two gradient terms cancel: the error is relative to the
                    // gradient's scale, not to each (possibly tiny) element.
                    let (gg, wg) = (got.grad.unwrap(), want.grad.as_ref().unwrap().mapv(f64::from));
                    let scale = wg.iter().fold(0.0f64, |m, &v| m.max(v.abs()));
                    assert_close_2d(&format!("{what} grad"), gg.view(), wg.view(), 1e-6 * scale, 1e-5);
                    if reduction == Reduction::None {
                        let we = want.elem_loss.as_ref().unwrap().mapv(f64::from);
                        assert_close_2d(
                            &format!("{what} elements"),
                            got.elem_loss.unwrap().view(),
                            we.view(),
                            1e-6,
                            2e-6,
                        );
                    }
                    let got = g.bce(p.view(), y.view(), &cfg.clone().with_pos_weight(None)).unwrap();
                    assert_scalar(&format!("{what} probs loss"), got.loss, want_p.loss, 1e-6, 1e-5);
                    let wg = want_p.grad.as_ref().unwrap().mapv(f64::from);
                    let scale = wg.iter().fold(0.0f64, |m, &v| m.max(v.abs()));
                    assert_close_2d(
                        &format!("{what} probs grad"),
                        got.grad.unwrap().view(),
                        wg.view(),
                        1e-6 * scale,
                        1e-4,
                    );
                }
            }
        }
    }
}

#[test]
fn distillation_and_measures() {
    let mut rng = Rng(31);
    let cpu = Cpu::new();
    for &(n, v) in &[(1, 1), (9, 30), (40, 1001), (3, 50_000)] {
        let s = rng.logits(n, v, 3.0);
        let t = rng.logits(n, v, 3.0);
        // A masked teacher class is fine for forward KL and JSD; reverse KL is then +inf.
        let mut tm = t.clone();
        if v > 1 {
            tm[[0, 0]] = f32::NEG_INFINITY;
            let rev = Distill::default().with_mode(DistillMode::ReverseKl);
            assert_eq!(cpu.distill(&s, &tm, &rev).unwrap().loss, f64::INFINITY);
        }
        for mode in
            [DistillMode::Kl, DistillMode::ReverseKl, DistillMode::Jsd { beta: 0.5 }, DistillMode::Jsd { beta: 0.1 }]
        {
            let t = if mode == DistillMode::ReverseKl { &t } else { &tm };
            for temperature in [1.0, 2.0, 4.0] {
                let cfg = Distill::default().with_temperature(temperature).with_mode(mode).with_grad_scale(1.5);
                // The f64 reference (held to PyTorch's goldens), and the CPU's fast path beside it.
                let want = reference::distill(&s, t, &cfg, true).unwrap();
                assert!(want.loss.is_finite() && want.loss >= 0.0, "{mode:?}: {}", want.loss);
                let fast = cpu.distill_with_grad(&s, t, &cfg).unwrap();
                assert_scalar(&format!("cpu {mode:?} T={temperature} {n}x{v} loss"), fast.loss, want.loss, 1e-6, 1e-5);
                for (name, g) in gpus().into_iter().filter(|(n, _)| v < 16_000 || !n.contains("64KiB")) {
                    let what = format!("{name} {mode:?} T={temperature} {n}x{v}");
                    let got = g.distill_with_grad(&s, t, &cfg).unwrap();
                    assert_scalar(&format!("{what} loss"), got.loss, want.loss, 1e-6, 1e-5);
                    let wg = want.grad.as_ref().unwrap().mapv(f64::from);
                    let scale = wg.iter().fold(0.0f64, |m, &x| m.max(x.abs()));
                    assert_close_2d(&format!("{what} grad"), got.grad.unwrap().view(), wg.view(), 2e-6 * scale, 1e-4);
                }
            }
        }
        // Measures of softmaxed logits and of the probability rows themselves agree.
        let (ps, pt) = (
            reference::log_softmax(&s, SoftmaxKind::Softmax).unwrap(),
            reference::log_softmax(&t, SoftmaxKind::Softmax).unwrap(),
        );
        let a = cpu.measures_from_logits(&t, &s).unwrap();
        let b = cpu.measures(pt.view(), ps.view()).unwrap();
        for (x, y) in [(&a.entropy, &b.entropy), (&a.cross_entropy, &b.cross_entropy), (&a.kl, &b.kl), (&a.js, &b.js)] {
            assert!(x.iter().zip(y.iter()).all(|(x, y)| (x - y).abs() <= 1e-9 * (1.0 + y.abs())));
        }
        for (name, g) in gpus().into_iter().filter(|(n, _)| v < 16_000 || !n.contains("64KiB")) {
            for (got, want) in
                [(g.measures_from_logits(&t, &s).unwrap(), &a), (g.measures(pt.view(), ps.view()).unwrap(), &b)]
            {
                for (x, y) in [
                    (&got.entropy, &want.entropy),
                    (&got.cross_entropy, &want.cross_entropy),
                    (&got.kl, &want.kl),
                    (&got.js, &want.js),
                ] {
                    for (&x, &y) in x.iter().zip(y.iter()) {
                        assert_scalar(&format!("{name} measures {n}x{v}"), x, y, 2e-5, 2e-5);
                    }
                }
            }
        }
    }
}

#[test]
fn ranks_max_and_gaps() {
    let mut rng = Rng(37);
    for &(n, v) in &[(1, 1), (50, 10), (33, 1000), (7, 4099)] {
        let mut x = rng.logits(n, v, 2.0);
        let t = rng.targets(n, v, 5);
        // Ties with the target count as hits (only strictly larger logits rank above it).
        if v > 1 && t[0] >= 0 {
            let y = t[0] as usize;
            x[[0, (y + 1) % v]] = x[[0, y]];
        }
        for cfg in [
            CrossEntropy::default().with_ranks(true).with_gaps(true),
            CrossEntropy::default().with_ranks(true).with_gaps(true).with_temperature(2.0),
        ] {
            let r = reference::cross_entropy(&x, &t, &cfg).unwrap();
            for (name, b) in backends() {
                let o = b.cross_entropy((&x).into(), (&t).into(), &cfg).unwrap();
                assert_eq!(o.row_rank.as_ref().unwrap(), &r.row_rank, "{name} {n}x{v} ranks");
                assert_close_1d(
                    &format!("{name} max"),
                    o.row_max.as_ref().unwrap().view(),
                    r.row_max.view(),
                    0.0,
                    1e-7,
                );
                assert_close_1d(
                    &format!("{name} gap"),
                    o.row_gap.as_ref().unwrap().view(),
                    r.row_gap.view(),
                    2e-5,
                    2e-5,
                );
                let counted = r.row_rank.iter().filter(|&&k| k != u32::MAX).count() as f64;
                for k in [1, 5] {
                    let want = r.row_rank.iter().filter(|&&q| q < k).count() as f64 / counted;
                    assert_eq!(o.accuracy(k), Some(want), "{name} top-{k}");
                }
            }
        }
    }
}

/// 16-bit rows many vectors long per invocation (the row pass's unrolled loops, not only its
/// tail), with V a multiple of 4 and not, soft targets and smoothing (the extras), and the
/// gradient separate (in the logits' dtype) or over the logits.
#[cfg(feature = "gpu")]
#[test]
fn sixteen_bit_long_rows() {
    use half::{bf16, f16};
    for (name, g) in gpus() {
        for (n, v) in [(6, 5000), (5, 4099), (3, 8192)] {
            let (mut x, t) = workload::synthetic(n, v, 3.0, 4, 21);
            x[[0, 17]] = 40.0; // a confident row
            for cfg in [CrossEntropy::default(), CrossEntropy::default().with_label_smoothing(0.1).with_ranks(true)] {
                // bf16: rounded logits, the reference on the rounded values.
                let xb = x.mapv(bf16::from_f32);
                let xr = xb.mapv(f32::from);
                let r = reference::cross_entropy(&xr, &t, &cfg).unwrap();
                let what = format!("{name} bf16 {n}x{v} smoothing {}", cfg.label_smoothing);
                let mut gb = Array2::from_elem((n, v), bf16::ZERO);
                let o = g.cross_entropy_into(&xb, &t, &cfg, &mut gb).unwrap();
                assert_scalar(&format!("{what} loss"), o.loss, r.loss, 1e-6, 1e-5);
                assert_close_2d(&format!("{what} grad"), gb.mapv(f32::from).view(), r.grad.view(), 1e-6, 8e-3);
                let mut inplace = xb.clone();
                let o2 = g.cross_entropy_in_place(&mut inplace, &t, &cfg).unwrap();
                assert_scalar(&format!("{what} in-place loss"), o2.loss, r.loss, 1e-6, 1e-5);
                assert_eq!(inplace, gb, "{what}: in place and separate write the same bits");
                // f16 forward with ranks.
                let xh = x.mapv(f16::from_f32);
                let rh = reference::cross_entropy(&xh.mapv(f32::from), &t, &cfg).unwrap();
                let oh = g.cross_entropy(&xh, &t, &cfg).unwrap();
                assert_scalar(&format!("{name} f16 {n}x{v} loss"), oh.loss, rh.loss, 1e-6, 1e-5);
            }
            // Probability targets (the second rows read beside the logits).
            let p = Array2::from_shape_fn((n, v), |(i, j)| if j == (i * 7) % v { 0.7 } else { 0.3 / (v - 1) as f32 });
            let xb = x.mapv(bf16::from_f32);
            let r = reference::cross_entropy(&xb.mapv(f32::from), &p, &CrossEntropy::default()).unwrap();
            let o = g.cross_entropy_with_grad(&xb, &p, &CrossEntropy::default()).unwrap();
            assert_scalar(&format!("{name} bf16 soft {n}x{v} loss"), o.loss, r.loss, 1e-6, 1e-5);
            assert_close_2d(
                &format!("{name} bf16 soft {n}x{v} grad"),
                o.grad.unwrap().view(),
                r.grad.view(),
                1e-7,
                1e-4,
            );
        }
    }
}
