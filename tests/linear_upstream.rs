//! Fused linear cross-entropy with reduction `none` and a per-row upstream gradient `u`: the
//! gradients are those of `sum_n u_n loss_n` (PyTorch's `(F.cross_entropy(h @ w.T + b, t,
//! reduction='none') * u).sum().backward()`), on the CPU and every GPU context, one-process
//! and vocabulary-parallel (one rank here; 2 and 3 ranks in `tests/distributed.rs`), against
//! the f64 reference and central finite differences; and the errors, the same on every backend.

mod common;

use common::*;
use ndarray::{s, Array1, Array2, ArrayView1};
use xent::parallel::{SingleProcess, VocabShard};
use xent::*;

/// The f64 reference of the gradients of `sum_n u_n loss_n`: the reference gradient of the
/// per-row losses (reduction `none`: row `n` is `d loss_n / d z_n`) with row `n` scaled by
/// `u_n`, through the products in f64. Also the per-row losses.
struct Ref {
    row_loss: Array1<f64>,
    gh: Array2<f64>,
    gw: Array2<f64>,
    gb: Array1<f64>,
}

fn reference(h: &Array2<f32>, w: &Array2<f32>, b: &Array1<f32>, t: &[i64], ce: &CrossEntropy, u: &Array1<f32>) -> Ref {
    let (r, h64, w64) = linear_reference(h, w, Some(b), t, ce);
    let mut g = r.grad.clone();
    for (mut row, &un) in g.rows_mut().into_iter().zip(u) {
        row *= un as f64;
    }
    Ref { row_loss: r.row_loss.clone(), gh: g.dot(&w64), gw: g.t().dot(&h64), gb: g.sum_axis(ndarray::Axis(0)) }
}

/// Hidden states, weight, bias, targets and upstream gradient.
type Inputs = (Array2<f32>, Array2<f32>, Array1<f32>, Array1<i64>, Array1<f32>);

fn inputs(n: usize, d: usize, v: usize, seed: u64) -> Inputs {
    let mut rng = Rng(seed);
    let h = rng.logits(n, d, 1.0);
    let w = rng.logits(v, d, 0.3);
    let b = Array1::from_shape_fn(v, |c| ((c * 37 % 11) as f32 - 5.0) * 0.1);
    // Every fourth row ignored (rows 1, 5, 9, ...).
    let t = rng.targets(n, v, 4);
    // Mixed signs, a zero, large and small values.
    let u = Array1::from_shape_fn(n, |r| match r % 5 {
        0 => 1.0,
        1 => -0.5,
        2 => 0.0,
        3 => 3.25,
        _ => 0.125,
    });
    (h, w, b, t, u)
}

/// Options with z-loss (which sample weights do not scale), smoothing and both weights; and
/// softcap, temperature and `grad_scale`.
fn configs(n: usize, v: usize) -> Vec<CrossEntropy> {
    let none = CrossEntropy::default().with_reduction(Reduction::None);
    vec![
        none.clone()
            .with_z_loss(0.05)
            .with_label_smoothing(0.1)
            .with_sample_weight(Array1::from_shape_fn(n, |r| 0.5 + (r % 3) as f32 * 0.25))
            .with_class_weight(Array1::from_shape_fn(v, |c| 0.5 + (c % 5) as f32 * 0.3)),
        none.with_z_loss(1e-3).with_softcap(4.0).with_temperature(1.7).with_grad_scale(0.5),
    ]
}

type Run = Box<
    dyn Fn(
        Logits<'_>,
        Logits<'_>,
        Option<ArrayView1<'_, f32>>,
        ArrayView1<'_, i64>,
        ArrayView1<'_, f32>,
        &LinearCe,
    ) -> Result<LinearCeOutput>,
>;

/// Every backend and form: the CPU and each GPU context, one-process and vocabulary-parallel
/// (one rank holding the whole vocabulary).
fn runners() -> Vec<(String, Run)> {
    let cpu = Cpu::new();
    let all = |w: &Logits<'_>| VocabShard { class0: 0, classes: w.dim().0 };
    #[allow(unused_mut)] // pushed to with the `gpu` feature
    let mut v: Vec<(String, Run)> = vec![
        ("cpu".into(), Box::new(move |h, w, b, t, u, c| cpu.linear_cross_entropy_with_upstream(h, w, b, t, u, c))),
        (
            "cpu-vocab-parallel".into(),
            Box::new(move |h, w, b, t, u, c| {
                let sh = all(&w);
                Cpu::new().linear_cross_entropy_vocab_parallel_with_upstream(h, w, b, t, u, sh, c, &SingleProcess)
            }),
        ),
    ];
    #[cfg(feature = "gpu")]
    for (name, g) in gpus() {
        v.push((name.into(), Box::new(move |h, w, b, t, u, c| g.linear_cross_entropy_with_upstream(h, w, b, t, u, c))));
        v.push((
            format!("{name}-vocab-parallel"),
            Box::new(move |h, w, b, t, u, c| {
                let sh = all(&w);
                g.linear_cross_entropy_vocab_parallel_with_upstream(h, w, b, t, u, sh, c, &SingleProcess)
            }),
        ));
    }
    v
}

#[test]
fn upstream_gradients_match_the_f64_reference() {
    let (n, d, v) = (37, 24, 301);
    let (h, w, b, t, u) = inputs(n, d, v, 11);
    let runs = runners();
    for (k, ce) in configs(n, v).into_iter().enumerate() {
        let r = reference(&h, &w, &b, t.as_slice().unwrap(), &ce, &u);
        // One chunk, a few chunks, one row per chunk.
        for ((name, run), rows) in runs.iter().flat_map(|r| [n, 10, 1].map(|rows| (r, rows))) {
            let cfg = LinearCe::default().with_ce(ce.clone()).with_workspace_bytes(rows * v * 4);
            let o = run((&h).into(), (&w).into(), Some(b.view()), t.view(), u.view(), &cfg).unwrap();
            let what = format!("{name} rows {rows} config {k}");
            // The losses are the per-row losses, unscaled; `loss` their sum.
            let rl = o.row_loss.as_ref().unwrap();
            assert_close_1d(&format!("{what}: row_loss"), rl.view(), r.row_loss.view(), 1e-5, 2e-6);
            assert_scalar(&format!("{what}: loss"), o.loss, r.row_loss.sum(), 1e-5, 2e-6);
            let gh = o.grad_hidden.as_ref().unwrap().to_f32();
            assert_close_2d(&format!("{what}: grad_hidden"), gh.view(), r.gh.view(), 1e-5, 1e-4);
            let gw = o.grad_weight.as_ref().unwrap().to_f32();
            assert_close_2d(&format!("{what}: grad_weight"), gw.view(), r.gw.view(), 1e-5, 1e-4);
            let gb = o.grad_bias.as_ref().unwrap();
            assert_close_1d(&format!("{what}: grad_bias"), gb.view(), r.gb.view(), 1e-5, 1e-4);
            // Ignored rows and rows whose upstream value is 0: no gradient at all.
            for row in (0..n).filter(|&i| t[i] == -100 || u[i] == 0.0) {
                assert!(gh.row(row).iter().all(|&x| x == 0.0), "{what}: row {row} has a gradient");
            }
        }
    }
}

#[test]
fn bf16_inputs_with_upstream() {
    let (n, d, v) = (40, 32, 257);
    let (h, w, b, t, u) = inputs(n, d, v, 12);
    let (hb, wb) = (h.mapv(half::bf16::from_f32), w.mapv(half::bf16::from_f32));
    let ce = configs(n, v).remove(0);
    let r = reference(&hb.mapv(f32::from), &wb.mapv(f32::from), &b, t.as_slice().unwrap(), &ce, &u);
    for (name, run) in runners() {
        let cfg = LinearCe::default().with_ce(ce.clone()).with_workspace_bytes(16 * v * 4);
        let o = run((&hb).into(), (&wb).into(), Some(b.view()), t.view(), u.view(), &cfg).unwrap();
        let rl = o.row_loss.as_ref().unwrap();
        assert_close_1d(&format!("{name}: bf16 row_loss"), rl.view(), r.row_loss.view(), 1e-5, 2e-6);
        // f32 gradients of bf16 inputs (the CPU's bf16 products: the bound of tests/linear.rs).
        let gh = o.grad_hidden.as_ref().unwrap().to_f32();
        assert_close_2d(&format!("{name}: bf16 grad_hidden"), gh.view(), r.gh.view(), 1e-5, 1e-4);
        let gw = o.grad_weight.as_ref().unwrap().to_f32();
        assert_close_2d(&format!("{name}: bf16 grad_weight"), gw.view(), r.gw.view(), 1e-5, 1e-4);
        // In the inputs' dtype: one bf16 rounding of those.
        let o =
            run((&hb).into(), (&wb).into(), Some(b.view()), t.view(), u.view(), &cfg.with_grads_in_input_dtype(true))
                .unwrap();
        let gw = o.grad_weight.unwrap();
        assert_eq!(gw.dtype(), DType::BF16, "{name}");
        assert_close_2d(&format!("{name}: bf16 grad_weight as bf16"), gw.to_f32().view(), r.gw.view(), 1e-4, 8e-3);
    }
}

/// `T(h) = sum_n u_n loss_n(h)` by central differences in f64 (the logits formed in f64 and
/// rounded to f32, as the kernels see them), against `grad_hidden`: the semantics checked
/// without the reference gradient. Folding `u` into the sample weights, as a framework might,
/// leaves the z-loss unscaled and misses by far more than the tolerance.
#[test]
fn upstream_gradients_match_finite_differences() {
    let (n, d, v) = (9, 6, 40);
    let (h, w, b, t, u) = inputs(n, d, v, 13);
    let ce = CrossEntropy::default()
        .with_reduction(Reduction::None)
        .with_z_loss(0.2)
        .with_label_smoothing(0.1)
        .with_sample_weight(Array1::from_shape_fn(n, |r| 0.5 + (r % 3) as f32 * 0.5));
    let total = |h: &Array2<f32>| -> f64 {
        let (r, ..) = linear_reference(h, &w, Some(&b), t.as_slice().unwrap(), &ce);
        r.row_loss.iter().zip(&u).map(|(l, &un)| l * un as f64).sum()
    };
    let cfg = LinearCe::default().with_ce(ce.clone());
    // The fold: reduction sum with sample weights sw * u (right only without z-loss).
    let sw = ce.data.sample_weight.as_ref().unwrap();
    let folded_ce = ce.clone().with_reduction(Reduction::Sum).with_sample_weight(sw * &u);
    let folded = Cpu::new()
        .linear_cross_entropy(&h, &w, Some(b.view()), t.view(), &cfg.clone().with_ce(folded_ce))
        .unwrap()
        .grad_hidden
        .unwrap()
        .to_f32();
    let eps = 1e-2f32;
    let mut fd = Array2::<f64>::zeros((n, d));
    for i in 0..n {
        for k in 0..d {
            let (mut hp, mut hm) = (h.clone(), h.clone());
            hp[[i, k]] += eps;
            hm[[i, k]] -= eps;
            fd[[i, k]] = (total(&hp) - total(&hm)) / ((hp[[i, k]] - hm[[i, k]]) as f64);
        }
    }
    let fold_miss = folded.iter().zip(&fd).fold(0.0f64, |m, (&a, &e)| m.max((a as f64 - e).abs()));
    assert!(fold_miss > 1e-2, "the sample-weight fold should miss the z-loss's scaling (off by {fold_miss})");
    for (name, run) in runners() {
        let o = run((&h).into(), (&w).into(), Some(b.view()), t.view(), u.view(), &cfg).unwrap();
        let gh = o.grad_hidden.unwrap().to_f32();
        // Truncation (eps^2 f''' / 6) and f32 logits' rounding / eps: a few 1e-5.
        assert_close_2d(&format!("{name}: grad_hidden vs central differences"), gh.view(), fd.view(), 5e-4, 1e-3);
    }
}

/// Without z-loss the fold into sample weights is exact: both forms agree.
#[test]
fn without_z_loss_upstream_equals_sample_weights_times_upstream() {
    let (n, d, v) = (21, 16, 97);
    let (h, w, b, t, u) = inputs(n, d, v, 14);
    let sw = Array1::from_shape_fn(n, |r| 0.5 + (r % 4) as f32 * 0.25);
    let ce = CrossEntropy::default().with_reduction(Reduction::None).with_label_smoothing(0.05);
    let cfg = LinearCe::default().with_ce(ce.clone().with_sample_weight(sw.clone()));
    let folded = LinearCe::default().with_ce(ce.with_reduction(Reduction::Sum).with_sample_weight(&sw * &u));
    let want = Cpu::new().linear_cross_entropy(&h, &w, Some(b.view()), t.view(), &folded).unwrap();
    let want_gw = want.grad_weight.unwrap().to_f32().mapv(f64::from);
    for (name, run) in runners() {
        let o = run((&h).into(), (&w).into(), Some(b.view()), t.view(), u.view(), &cfg).unwrap();
        let gw = o.grad_weight.unwrap().to_f32();
        assert_close_2d(&format!("{name}: grad_weight vs the fold"), gw.view(), want_gw.view(), 1e-6, 1e-4);
    }
}

/// Bad upstream gradients: one typed error each, the same words on every backend and form.
#[test]
fn bad_upstream_gradients_are_typed_errors() {
    let (n, d, v) = (6, 8, 20);
    let (h, w, b, t, u) = inputs(n, d, v, 15);
    let none = LinearCe::default().with_ce(CrossEntropy::default().with_reduction(Reduction::None));
    let mean = LinearCe::default();
    let sum = LinearCe::default().with_ce(CrossEntropy::default().with_reduction(Reduction::Sum));
    let short = u.slice(s![..n - 1]).to_owned();
    let mut nan = u.clone();
    nan[3] = f32::NAN;
    let mut inf = u.clone();
    inf[0] = f32::INFINITY;
    let cases: [(&str, &Array1<f32>, &LinearCe); 5] =
        [("short", &short, &none), ("nan", &nan, &none), ("inf", &inf, &none), ("mean", &u, &mean), ("sum", &u, &sum)];
    let runs = runners();
    for (case, up, cfg) in cases {
        let mut first: Option<String> = None;
        for (name, run) in &runs {
            let e = run((&h).into(), (&w).into(), Some(b.view()), t.view(), up.view(), cfg).unwrap_err();
            let ok = match case {
                "short" => matches!(e, XentError::Shape(_)),
                "nan" | "inf" => matches!(&e, XentError::InvalidValue { input, .. } if input == "upstream gradient"),
                _ => matches!(e, XentError::InvalidOption(_)),
            };
            assert!(ok, "{name} {case}: {e:?}");
            let msg = e.to_string();
            assert_eq!(first.get_or_insert_with(|| msg.clone()), &msg, "{name} {case}: the same words everywhere");
        }
    }
    // The plain methods are unchanged: a mean with no upstream gradient is fine.
    assert!(Cpu::new().linear_cross_entropy(&h, &w, Some(b.view()), t.view(), &mean).is_ok());
}
