//! Property tests: random shapes, dtypes, options and non-finite values, every backend against
//! the f64 reference of the same (rounded) inputs. Seeded: every CI run checks the same
//! few hundred cases, and a failure reproduces.

mod common;

use common::*;
use half::{bf16, f16};
use ndarray::{Array1, Array2};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use xent::cpu::reference;
use xent::*;

/// One generated cross-entropy call.
#[derive(Debug, Clone)]
struct Case {
    n: usize,
    v: usize,
    dtype: DType,
    /// Where the gradient goes: 0 none, 1 new f32, 2 into the logits' dtype, 3 in place.
    grad: u8,
    soft: bool,
    reduction: Reduction,
    smoothing: bool,
    zloss: bool,
    class_w: bool,
    sample_w: bool,
    softcap: bool,
    temperature: f32,
    /// Non-finite values planted: 0 none, 1 -inf masks, 2 a +inf, 3 a NaN, 4 an all -inf row.
    special: u8,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    let shape = (0usize..10, prop_oneof![1usize..40, Just(255usize), Just(256), Just(1001), Just(4099)]);
    let dtype = prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)];
    let reduction = prop_oneof![Just(Reduction::Mean), Just(Reduction::Sum), Just(Reduction::None)];
    (
        shape,
        dtype,
        0u8..4,
        any::<bool>(),
        reduction,
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
        prop_oneof![Just(1.0f32), Just(0.7), Just(2.0)],
        prop_oneof![4 => Just(0u8), 1 => 1u8..5],
        any::<u64>(),
    )
        .prop_map(
            |(
                (n, v),
                dtype,
                grad,
                soft,
                reduction,
                (smoothing, zloss, class_w, sample_w, softcap),
                temperature,
                special,
                seed,
            )| Case {
                n,
                v,
                dtype,
                grad,
                soft,
                reduction,
                smoothing,
                zloss,
                class_w,
                sample_w,
                softcap,
                temperature,
                special,
                seed,
            },
        )
}

/// Logits rounded to the case's dtype (returned widened, exactly, as f32 too).
fn data(c: &Case) -> (Tensor2, Array2<f32>, Array1<i64>, Array2<f32>, CrossEntropy) {
    let mut rng = Rng(c.seed);
    let mut x = rng.logits(c.n, c.v, 3.0);
    if c.n > 0 {
        let r = rng.below(c.n);
        match c.special {
            1 => {
                for j in (0..c.v).step_by(3) {
                    x[[r, j]] = f32::NEG_INFINITY;
                }
            }
            2 => x[[r, rng.below(c.v)]] = f32::INFINITY,
            3 => x[[r, rng.below(c.v)]] = f32::NAN,
            4 => x.row_mut(r).fill(f32::NEG_INFINITY),
            _ => {}
        }
    }
    let t = match c.dtype {
        DType::F32 => Tensor2::F32(x.clone()),
        DType::F16 => Tensor2::F16(x.mapv(f16::from_f32)),
        DType::BF16 => Tensor2::BF16(x.mapv(bf16::from_f32)),
    };
    let x32 = t.to_f32();
    let targets = rng.targets(c.n, c.v, 3);
    let mut probs = Array2::from_shape_fn((c.n, c.v), |_| rng.uniform() as f32);
    for mut row in probs.rows_mut() {
        let s: f32 = row.sum();
        row.mapv_inplace(|p| p / s);
    }
    let cfg = CrossEntropy::default()
        .with_reduction(c.reduction)
        .with_label_smoothing(if c.smoothing { 0.1 } else { 0.0 })
        .with_z_loss(if c.zloss { 1e-3 } else { 0.0 })
        .with_class_weight(c.class_w.then(|| Array1::from_shape_fn(c.v, |_| (0.3 + rng.uniform()) as f32)))
        .with_sample_weight(c.sample_w.then(|| Array1::from_shape_fn(c.n, |_| (0.5 + rng.uniform()) as f32)))
        .with_softcap(c.softcap.then_some(6.0))
        .with_temperature(c.temperature)
        .with_per_row(true);
    (t, x32, targets, probs, cfg)
}

/// One ulp of `dtype` at |w| (f32: relative 2^-23, a loose floor for f32 rounding).
fn ulp(dtype: DType, w: f64) -> f64 {
    let mant = match dtype {
        DType::F32 => 23,
        DType::F16 => 10,
        DType::BF16 => 7,
    };
    let e = if w == 0.0 { -126 } else { w.abs().log2().floor() as i32 };
    let min_exp = if dtype == DType::F16 { -14 } else { -126 };
    2f64.powi(e.max(min_exp) - mant)
}

fn same_class(g: f64, w: f64) -> bool {
    (g.is_nan() && w.is_nan()) || (g.is_infinite() && g == w) || (g.is_finite() && w.is_finite())
}

fn check(name: &str, c: &Case, b: &dyn Backend) -> std::result::Result<(), TestCaseError> {
    let (x, x32, t, p, cfg) = data(c);
    let targets: Targets = if c.soft { (&p).into() } else { (&t).into() };
    let r = reference::cross_entropy(&x32, targets, &cfg).unwrap();
    let gdt = match c.grad {
        2 | 3 => c.dtype,
        _ => DType::F32,
    };
    let (out, grad) = match c.grad {
        0 => (b.cross_entropy(x.view(), targets, &cfg).unwrap(), None),
        1 => {
            let mut o = b.cross_entropy_with_grad(x.view(), targets, &cfg).unwrap();
            let g = o.grad.take().map(Tensor2::F32);
            (o, g)
        }
        2 => {
            let mut g = Tensor2::zeros(c.dtype, (c.n, c.v));
            (b.cross_entropy_into(x.view(), targets, &cfg, g.view_mut()).unwrap(), Some(g))
        }
        _ => {
            let mut y = x.clone();
            (b.cross_entropy_in_place(y.view_mut(), targets, &cfg).unwrap(), Some(y))
        }
    };
    let what = format!("{name} {c:?}");
    // The reduced loss and the row losses, to f32 tolerance (non-finite: the same kind).
    prop_assert!(same_class(out.loss, r.loss), "{what}: loss {} want {}", out.loss, r.loss);
    if r.loss.is_finite() {
        prop_assert!(
            (out.loss - r.loss).abs() <= 1e-6 + 2e-5 * r.loss.abs(),
            "{what}: loss {} want {}",
            out.loss,
            r.loss
        );
    }
    let rows = out.row_loss.as_ref().expect("per-row losses");
    for i in 0..c.n {
        let (g, w) = (rows[i] as f64, r.row_loss[i]);
        prop_assert!(same_class(g, w), "{what}: row {i} loss {g} want {w}");
        if w.is_finite() {
            prop_assert!((g - w).abs() <= 2e-5 + 2e-5 * w.abs(), "{what}: row {i} loss {g} want {w}");
        }
    }
    if let Some(g) = grad {
        let g = g.to_f32();
        let scale = r.grad.iter().filter(|v| v.is_finite()).fold(0.0f64, |m, &v| m.max(v.abs()));
        for ((i, j), &w) in r.grad.indexed_iter() {
            let gv = g[[i, j]] as f64;
            prop_assert!(same_class(gv, w), "{what}: grad[{i},{j}] {gv} want {w}");
            if w.is_finite() {
                // f32 error (relative to the row's scale), then one rounding to the stored dtype.
                let tol = 4e-6 * scale + 2e-5 * w.abs() + if gdt == DType::F32 { 0.0 } else { ulp(gdt, w) };
                prop_assert!((gv - w).abs() <= tol, "{what}: grad[{i},{j}] {gv} want {w} (tol {tol:e})");
            }
        }
    }
    Ok(())
}

fn config() -> Config {
    Config { cases: 300, rng_seed: RngSeed::Fixed(0x7865_6e74), failure_persistence: None, ..Config::default() }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn cpu_matches_the_reference(c in case()) {
        check("cpu", &c, &Cpu::new())?;
    }

    #[test]
    fn gpus_match_the_reference(c in case()) {
        for (name, g) in gpu_backends() {
            check(name, &c, g.as_ref())?;
        }
    }
}

/// Many rows per CPU task and long rows (the deferred, streamed last step of each gradient row,
/// with the next row prefetched meanwhile): the batch must write the same bits as the rows one
/// call at a time, for every gradient dtype, with ignored rows, -inf masks and a NaN row among
/// them, and match the reference.
#[test]
fn cpu_batched_gradient_rows_match_row_by_row() {
    let cpu = Cpu::new();
    for (n, v) in [(160, 4099), (96, 5000)] {
        let mut rng = Rng(7 + v as u64);
        let mut x = rng.logits(n, v, 3.0);
        for j in (0..v).step_by(3) {
            x[[5, j]] = f32::NEG_INFINITY;
        }
        x[[9, 17]] = f32::NAN;
        x[[12, 3]] = 40.0; // a confident row
        let mut t = rng.targets(n, v, 0);
        t[3] = -100;
        t[40] = -100;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            // Summed, so that a row's gradient does not depend on how many rows are counted.
            let sum = CrossEntropy::default().with_reduction(Reduction::Sum);
            for cfg in [sum.clone(), sum.clone().with_label_smoothing(0.1)] {
                let xt = Tensor2::from_f32(x.clone(), dtype);
                let mut g = Tensor2::zeros(dtype, (n, v));
                let out = cpu.cross_entropy_into(xt.view(), &t, &cfg, g.view_mut()).unwrap();
                let what = format!("{n}x{v} {dtype:?} smoothing {}", cfg.label_smoothing);
                let r = reference::cross_entropy(&xt.to_f32(), &t, &cfg).unwrap();
                assert!(out.loss.is_nan() && r.loss.is_nan(), "{what}: the NaN row makes the loss NaN");
                let (gb, rows) = (g.to_f32(), xt.to_f32());
                for i in 0..n {
                    let xi = Tensor2::from_f32(rows.slice(ndarray::s![i..i + 1, ..]).to_owned(), dtype);
                    let mut gi = Tensor2::zeros(dtype, (1, v));
                    cpu.cross_entropy_into(xi.view(), t.slice(ndarray::s![i..i + 1]), &cfg, gi.view_mut()).unwrap();
                    let (a, b) = (gb.row(i), gi.to_f32());
                    assert!(
                        a.iter().zip(b.row(0)).all(|(p, q)| p.to_bits() == q.to_bits()),
                        "{what}: row {i} differs from the row alone"
                    );
                    if i != 9 {
                        let scale = r.grad.row(i).iter().fold(0.0f64, |m, &w| m.max(w.abs()));
                        for (j, (&gv, &w)) in a.iter().zip(r.grad.row(i)).enumerate() {
                            let tol =
                                4e-6 * scale + 2e-5 * w.abs() + if dtype == DType::F32 { 0.0 } else { ulp(dtype, w) };
                            assert!((gv as f64 - w).abs() <= tol, "{what}: grad[{i},{j}] {gv} want {w}");
                        }
                    }
                }
            }
        }
    }
}

/// One generated hostile call (issue 26): a well-formed problem with one input spoiled.
#[derive(Debug, Clone)]
struct Hostile {
    n: usize,
    v: usize,
    /// 0 probability entry negative, 1 NaN, 2 +inf, 3 rows left unnormalised (accepted),
    /// 4 class weight non-finite, 5 sample weight non-finite, 6 sample weights of the wrong
    /// length, 7 probability rows of the wrong shape.
    spoil: u8,
    /// Which non-finite value: NaN, +inf or -inf.
    bad: u8,
    reduction: Reduction,
    grad: bool,
    seed: u64,
}

fn hostile() -> impl Strategy<Value = Hostile> {
    let reduction = prop_oneof![Just(Reduction::Mean), Just(Reduction::Sum), Just(Reduction::None)];
    (1usize..9, 1usize..300, 0u8..8, 0u8..3, reduction, any::<bool>(), any::<u64>())
        .prop_map(|(n, v, spoil, bad, reduction, grad, seed)| Hostile { n, v, spoil, bad, reduction, grad, seed })
}

/// The call's result as something two backends can be compared on: the error's words, or the
/// loss.
fn outcome(h: &Hostile, b: &dyn Backend) -> std::result::Result<f64, String> {
    let mut rng = Rng(h.seed);
    let (n, v) = (h.n, h.v);
    let x = Array2::from_shape_fn((n, v), |_| rng.normal() as f32);
    let bad = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][h.bad as usize];
    let (r, c) = (rng.below(n), rng.below(v));
    let mut p = Array2::from_shape_fn((n, v), |_| rng.uniform() as f32);
    p.rows_mut().into_iter().for_each(|mut row| {
        let s: f32 = row.sum();
        row.mapv_inplace(|q| q / s.max(1e-30));
    });
    let mut cfg = CrossEntropy::default().with_reduction(h.reduction);
    let targets_classes = Array1::from_shape_fn(n, |_| rng.below(v) as i64);
    let mut soft = true;
    match h.spoil {
        0 => p[(r, c)] = -0.25,
        1 => p[(r, c)] = f32::NAN,
        2 => p[(r, c)] = f32::INFINITY,
        3 => p[(r, c)] += 3.0,
        4 => {
            soft = false;
            let mut w = Array1::from_elem(v, 0.5f32);
            w[c] = bad;
            cfg.class_weight = Some(w);
        }
        5 => {
            soft = false;
            let mut w = Array1::from_elem(n, 2.0f32);
            w[r] = bad;
            cfg.data.sample_weight = Some(w);
        }
        6 => cfg.data.sample_weight = Some(Array1::ones(n + 1)),
        _ => p = Array2::zeros((n, v + 1)),
    }
    let targets: Targets = if soft { p.view().into() } else { targets_classes.view().into() };
    let out = if h.grad {
        b.cross_entropy_with_grad(x.view().into(), targets, &cfg)
    } else {
        b.cross_entropy(x.view().into(), targets, &cfg)
    };
    out.map(|o| o.loss).map_err(|e| e.to_string())
}

proptest! {
    #![proptest_config(Config { cases: 120, ..config() })]

    /// CPU and every GPU context agree on accepting or refusing a hostile input, and on the
    /// words of the refusal; what they accept, they score alike.
    #[test]
    fn backends_agree_on_hostile_inputs(h in hostile()) {
        let cpu = outcome(&h, &Cpu::new());
        // Spoiled entries and shapes are refused, unnormalised rows are not.
        prop_assert_eq!(cpu.is_ok(), h.spoil == 3, "{:?}: {:?}", h, cpu);
        for (name, g) in gpu_backends() {
            let gpu = outcome(&h, g.as_ref());
            match (&cpu, &gpu) {
                (Err(a), Err(b)) => prop_assert_eq!(a, b, "{}: {:?}", name, h),
                (Ok(a), Ok(b)) => {
                    prop_assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{}: {} vs {} {:?}", name, a, b, h)
                }
                _ => prop_assert!(false, "{}: cpu {:?}, gpu {:?} for {:?}", name, cpu, gpu, h),
            }
        }
    }
}
