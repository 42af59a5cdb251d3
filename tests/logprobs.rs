//! Linear log-probs and entropies (`linear_logprobs`) on the CPU and every GPU context: against
//! an f64 reference that materialises the logits, against central finite differences in f64,
//! f32/f16/bf16 inputs, ignored rows, temperatures, several chunks, forward-only calls, typed
//! errors for a bad upstream gradient, bit-identical reruns, and agreement with `LinearCe`.
//!
//! Tolerances (stated where asserted): log-probs and entropies within `2e-5 + 2e-5 |x|` of the
//! f64 values (f32 logits of `D <= 40` products and f32 row sums); each gradient entry within
//! [`GRAD_TOL`] of its sum of absolute terms (`sum_c |G_nc| |W_cd|` for `grad_hidden`: the
//! scale of any rounding error, where the sum itself may cancel), plus `2^-8 |x|` for a gradient
//! rounded once to bf16 or f16.

mod common;

use common::*;
use ndarray::{Array1, Array2, ArrayView1, Axis};
use xent::*;

/// The f64 reference of one call: per-row log-probs and entropies, and the gradients of
/// `sum_n a_n logp_n + b_n H_n` w.r.t. hidden, weight and bias.
struct Ref {
    logp: Array1<f64>,
    ent: Array1<f64>,
    gh: Array2<f64>,
    gw: Array2<f64>,
    gb: Array1<f64>,
    /// The products of absolute values, `|G| |W|`, `|G|^T |H|` and `1^T |G|`, where `|G|` is
    /// the sum of the absolute terms of `G` (`|a| ([c == y] + p_c) + |b| p_c |z_c - mu|`, over
    /// `T`): the scale of each gradient entry's rounding error (its sums may cancel, its error
    /// does not).
    gh_abs: Array2<f64>,
    gw_abs: Array2<f64>,
    gb_abs: Array1<f64>,
}

/// Everything in f64: `z = (h w^T + b) / temp`, then the row terms and `G = d loss / d(h w^T + b)`.
fn reference64(
    h: &Array2<f64>,
    w: &Array2<f64>,
    b: Option<&Array1<f64>>,
    t: &[i64],
    temp: f64,
    (ua, ub): (&[f64], &[f64]),
) -> Ref {
    let mut x = h.dot(&w.t());
    if let Some(b) = b {
        x += b;
    }
    let (n, v) = x.dim();
    let (mut logp, mut ent) = (Array1::zeros(n), Array1::zeros(n));
    let mut g = Array2::<f64>::zeros((n, v));
    // The scale of G's terms: |a| ([c == y] + p_c) + |b| p_c |z_c - mu|, over T.
    let mut ga = Array2::<f64>::zeros((n, v));
    for r in 0..n {
        if t[r] == -100 {
            continue;
        }
        let y = t[r] as usize;
        let z: Vec<f64> = x.row(r).iter().map(|&v| v / temp).collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = z.iter().map(|&v| (v - m).exp()).sum();
        let lse = m + s.ln();
        let p: Vec<f64> = z.iter().map(|&v| (v - lse).exp()).collect();
        let mu: f64 = p.iter().zip(&z).map(|(p, z)| p * z).sum();
        logp[r] = z[y] - lse;
        ent[r] = lse - mu;
        for c in 0..v {
            let dlogp = if c == y { 1.0 } else { 0.0 } - p[c];
            let dent = -p[c] * (z[c] - mu);
            g[[r, c]] = (ua[r] * dlogp + ub[r] * dent) / temp;
            let one = if c == y { 1.0 } else { 0.0 };
            ga[[r, c]] = (ua[r].abs() * (one + p[c]) + ub[r].abs() * dent.abs()) / temp;
        }
    }
    Ref {
        logp,
        ent,
        gh: g.dot(w),
        gw: g.t().dot(h),
        gb: g.sum_axis(Axis(0)),
        gh_abs: ga.dot(&w.mapv(f64::abs)),
        gw_abs: ga.t().dot(&h.mapv(f64::abs)),
        gb_abs: ga.sum_axis(Axis(0)),
    }
}

/// [`reference64`] of f32 inputs (exactly widened) and upstream.
fn reference(h: &Array2<f32>, w: &Array2<f32>, b: Option<&Array1<f32>>, t: &[i64], temp: f32, up: &Up) -> Ref {
    let w64 = |a: &Array1<f32>| a.iter().map(|&x| x as f64).collect::<Vec<_>>();
    reference64(
        &h.mapv(f64::from),
        &w.mapv(f64::from),
        b.map(|b| b.mapv(f64::from)).as_ref(),
        t,
        temp as f64,
        (&w64(&up.0), &w64(&up.1)),
    )
}

type Up = (Array1<f32>, Array1<f32>);

/// Gradient error bound in units of the entry's sum of absolute terms (`sum_c |G_c| |X_c|`, `|G_c|`
/// itself the sum of its terms' absolute values):
/// f32 logits and row sums give `G` within a few 1e-6 of itself; bf16 products on AVX512-BF16
/// split `G` into two bf16 terms (`2^-16`, `docs/cpu-bf16-matmul.md`).
const GRAD_TOL: f64 = 3e-5;

fn inputs(n: usize, d: usize, v: usize, seed: u64) -> (Array2<f32>, Array2<f32>, Array1<f32>, Array1<i64>, Up) {
    let mut rng = Rng(seed);
    let h = rng.logits(n, d, 1.0);
    let w = rng.logits(v, d, 0.4);
    let b = Array1::from_shape_fn(v, |c| ((c * 37 % 11) as f32 - 5.0) * 0.1);
    let t = rng.targets(n, v, 4);
    let a = Array1::from_shape_fn(n, |_| rng.normal() as f32);
    let bb = Array1::from_shape_fn(n, |_| rng.normal() as f32);
    (h, w, b, t, (a, bb))
}

/// Largest `(|got - want| - rel |want|) / (|G| |X|)` over the entries: the error beyond a
/// final rounding (`rel`) in units of the sum of absolute terms of that entry.
fn worst(got: &Array2<f32>, want: &Array2<f64>, scale: &Array2<f64>, rel: f64) -> f64 {
    assert_eq!(got.dim(), want.dim());
    let mut m = 0f64;
    for ((&a, &b), &s) in got.iter().zip(want.iter()).zip(scale.iter()) {
        m = m.max(((a as f64 - b).abs() - rel * b.abs()) / (s + 1e-30));
    }
    m
}

fn worst1(got: &Array1<f32>, want: &Array1<f64>, scale: &Array1<f64>, rel: f64) -> f64 {
    let row = |a: &Array1<f64>| a.clone().insert_axis(Axis(0));
    worst(&got.clone().insert_axis(Axis(0)), &row(want), &row(scale), rel)
}

type Run = Box<
    dyn Fn(
        Logits<'_>,
        Logits<'_>,
        Option<ArrayView1<'_, f32>>,
        ArrayView1<'_, i64>,
        &LinearLogprobs,
        Option<(ArrayView1<'_, f32>, ArrayView1<'_, f32>)>,
    ) -> Result<LinearLogprobsOutput>,
>;

/// The CPU and every GPU context (default, no subgroups, 64 KiB bindings, split rows).
fn runners() -> Vec<(&'static str, Run)> {
    let cpu = Cpu::new();
    #[allow(unused_mut)] // pushed to with the `gpu` feature
    let mut v: Vec<(&'static str, Run)> =
        vec![("cpu", Box::new(move |h, w, b, t, c, u| cpu.linear_logprobs(h, w, b, t, c, u)))];
    #[cfg(feature = "gpu")]
    for (name, g) in gpus() {
        v.push((name, Box::new(move |h, w, b, t, c, u| g.linear_logprobs(h, w, b, t, c, u))));
    }
    v
}

fn up_view(u: &Up) -> Option<(ArrayView1<'_, f32>, ArrayView1<'_, f32>)> {
    Some((u.0.view(), u.1.view()))
}

/// Per-row values within `2e-5 + 2e-5 |x|` of the reference.
fn assert_rows(what: &str, o: &LinearLogprobsOutput, r: &Ref) {
    assert_close_1d(&format!("{what}: logprob"), o.logprob.view(), r.logp.view(), 2e-5, 2e-5);
    assert_close_1d(&format!("{what}: entropy"), o.entropy.view(), r.ent.view(), 2e-5, 2e-5);
}

/// Each gradient entry within `tol sum_c |G_c| |X_c|` of the reference (plus `rel |x|` for a
/// gradient rounded to a 16-bit dtype).
fn assert_grads(what: &str, o: &LinearLogprobsOutput, r: &Ref, tol: f64, rel: f64) {
    let gh = worst(&o.grad_hidden.as_ref().expect("grad_hidden").to_f32(), &r.gh, &r.gh_abs, rel);
    let gw = worst(&o.grad_weight.as_ref().expect("grad_weight").to_f32(), &r.gw, &r.gw_abs, rel);
    assert!(gh < tol, "{what}: grad_hidden off by {gh:e} of sum |G||W|");
    assert!(gw < tol, "{what}: grad_weight off by {gw:e} of sum |G||H|");
    if let Some(gb) = o.grad_bias.as_ref() {
        let e = worst1(gb, &r.gb, &r.gb_abs, rel);
        assert!(e < tol, "{what}: grad_bias off by {e:e} of sum |G|");
    }
    eprintln!("{what}: gradient errors {gh:.1e} {gw:.1e} of the absolute sums");
}

#[test]
fn matches_the_f64_reference_in_chunks_with_temperatures() {
    let (n, d, v) = (37, 24, 301);
    let (h, w, b, t, up) = inputs(n, d, v, 1);
    let counted = t.iter().filter(|&&y| y != -100).count() as u64;
    let runs = runners();
    for temp in [1.0f32, 0.7, 1.9] {
        let r = reference(&h, &w, Some(&b), t.as_slice().unwrap(), temp, &up);
        // One chunk, a few chunks, one row per chunk.
        for ((name, run), rows) in runs.iter().flat_map(|r| [n, 10, 1].map(|rows| (r, rows))) {
            let cfg = LinearLogprobs::default().with_temperature(temp).with_workspace_bytes(Some(rows * v * 4));
            let o = run((&h).into(), (&w).into(), Some(b.view()), t.view(), &cfg, up_view(&up)).unwrap();
            let what = format!("{name} T={temp} rows={rows}");
            assert!(o.chunk_rows <= rows, "{what}: chunk rows {}", o.chunk_rows);
            assert_eq!(o.counted, counted, "{what}");
            assert_rows(&what, &o, &r);
            assert_grads(&what, &o, &r, GRAD_TOL, 0.0);
            for (i, &y) in t.iter().enumerate() {
                if y == -100 {
                    assert_eq!((o.logprob[i], o.entropy[i]), (0.0, 0.0), "{what}: ignored row {i}");
                    let gh = o.grad_hidden.as_ref().unwrap().to_f32();
                    assert!(gh.row(i).iter().all(|&x| x == 0.0), "{what}: ignored row {i} has a gradient");
                }
            }
        }
    }
}

#[test]
fn odd_sizes_one_class_and_no_bias() {
    for (n, d, v) in [(5, 3, 1), (7, 5, 13), (1, 9, 1027), (0, 4, 6)] {
        let (h, w, _, t, up) = inputs(n, d, v, 7 + v as u64);
        let r = reference(&h, &w, None, t.as_slice().unwrap(), 1.3, &up);
        for (name, run) in runners() {
            let cfg = LinearLogprobs::default().with_temperature(1.3).with_workspace_bytes(Some(2 * v * 4));
            let o = run((&h).into(), (&w).into(), None, t.view(), &cfg, up_view(&up)).unwrap();
            let what = format!("{name} {n}x{d}x{v}");
            assert_eq!(o.logprob.len(), n, "{what}");
            assert_rows(&what, &o, &r);
            assert_grads(&what, &o, &r, GRAD_TOL, 0.0);
            assert_eq!(o.grad_bias, None, "{what}: no bias given");
        }
    }
}

#[test]
fn half_precision_inputs_and_gradients_in_the_input_dtype() {
    let (n, d, v) = (40, 32, 257);
    let (h, w, b, t, up) = inputs(n, d, v, 2);
    for dtype in [DType::F16, DType::BF16] {
        let round = |a: &Array2<f32>| Tensor2::from_f32(a.clone(), dtype);
        let (hq, wq) = (round(&h), round(&w));
        let r = reference(&hq.to_f32(), &wq.to_f32(), Some(&b), t.as_slice().unwrap(), 0.9, &up);
        for (name, run) in runners() {
            let what = format!("{name} {dtype}");
            let cfg = LinearLogprobs::default().with_temperature(0.9).with_workspace_bytes(Some(9 * v * 4));
            let o = run(hq.view(), wq.view(), Some(b.view()), t.view(), &cfg, up_view(&up)).unwrap();
            assert_rows(&what, &o, &r);
            assert_grads(&what, &o, &r, GRAD_TOL, 0.0);
            assert_eq!(o.grad_hidden.as_ref().unwrap().dtype(), DType::F32, "{what}");
            let cfg = cfg.with_grads_in_input_dtype(true);
            let o = run(hq.view(), wq.view(), Some(b.view()), t.view(), &cfg, up_view(&up)).unwrap();
            let gw = o.grad_weight.as_ref().unwrap();
            assert_eq!(gw.dtype(), dtype, "{what}");
            // One rounding to the input dtype (bf16: 2^-8 relative, f16 2^-11).
            assert_grads(&format!("{what} rounded once"), &o, &r, GRAD_TOL, 2f64.powi(-8));
        }
    }
}

#[test]
fn the_f64_reference_and_every_backend_match_central_finite_differences() {
    let (n, d, v) = (4, 3, 6);
    let (h, w, b, mut t, up) = inputs(n, d, v, 11);
    t[1] = -100;
    let temp = 0.8;
    let (h64, w64, b64) = (h.mapv(f64::from), w.mapv(f64::from), b.mapv(f64::from));
    let (ua, ub): (Vec<f64>, Vec<f64>) =
        (up.0.iter().map(|&x| x as f64).collect(), up.1.iter().map(|&x| x as f64).collect());
    let ts = t.as_slice().unwrap();
    let loss = |h: &Array2<f64>, w: &Array2<f64>, b: &Array1<f64>| {
        let r = reference64(h, w, Some(b), ts, temp, (&ua, &ub));
        (0..n).map(|i| ua[i] * r.logp[i] + ub[i] * r.ent[i]).sum::<f64>()
    };
    let r = reference64(&h64, &w64, Some(&b64), ts, temp, (&ua, &ub));
    let eps = 1e-6;
    // Central differences: error O(eps^2) + rounding O(1e-16 / eps): about 1e-9 here.
    let fd_h = Array2::from_shape_fn(h64.dim(), |(i, j)| {
        let (mut p, mut m) = (h64.clone(), h64.clone());
        p[[i, j]] += eps;
        m[[i, j]] -= eps;
        (loss(&p, &w64, &b64) - loss(&m, &w64, &b64)) / (2.0 * eps)
    });
    let fd_w = Array2::from_shape_fn(w64.dim(), |(i, j)| {
        let (mut p, mut m) = (w64.clone(), w64.clone());
        p[[i, j]] += eps;
        m[[i, j]] -= eps;
        (loss(&h64, &p, &b64) - loss(&h64, &m, &b64)) / (2.0 * eps)
    });
    let fd_b = Array1::from_shape_fn(v, |j| {
        let (mut p, mut m) = (b64.clone(), b64.clone());
        p[j] += eps;
        m[j] -= eps;
        (loss(&h64, &w64, &p) - loss(&h64, &w64, &m)) / (2.0 * eps)
    });
    let close = |a: &[f64], e: &[f64], tol: f64, what: &str| {
        for (k, (&x, &y)) in a.iter().zip(e).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{what}[{k}]: {x} vs finite difference {y}");
        }
    };
    let sl = |a: &Array2<f64>| a.iter().cloned().collect::<Vec<_>>();
    close(&sl(&r.gh), &sl(&fd_h), 1e-7, "f64 reference grad_hidden");
    close(&sl(&r.gw), &sl(&fd_w), 1e-7, "f64 reference grad_weight");
    close(r.gb.as_slice().unwrap(), fd_b.as_slice().unwrap(), 1e-7, "f64 reference grad_bias");
    // Every backend against the finite differences themselves (f32: 1e-5 relative).
    for (name, run) in runners() {
        let cfg = LinearLogprobs::default().with_temperature(temp as f32);
        let o = run((&h).into(), (&w).into(), Some(b.view()), t.view(), &cfg, up_view(&up)).unwrap();
        let f64s = |a: &Tensor2| a.to_f32().iter().map(|&x| x as f64).collect::<Vec<_>>();
        close(&f64s(o.grad_hidden.as_ref().unwrap()), &sl(&fd_h), 1e-5, &format!("{name} grad_hidden"));
        close(&f64s(o.grad_weight.as_ref().unwrap()), &sl(&fd_w), 1e-5, &format!("{name} grad_weight"));
        let gb: Vec<f64> = o.grad_bias.as_ref().unwrap().iter().map(|&x| x as f64).collect();
        close(&gb, fd_b.as_slice().unwrap(), 1e-5, &format!("{name} grad_bias"));
    }
}

#[test]
fn forward_only_gives_the_same_rows_and_no_gradients() {
    let (n, d, v) = (20, 16, 130);
    let (h, w, b, t, up) = inputs(n, d, v, 4);
    for (name, run) in runners() {
        let cfg = LinearLogprobs::default().with_temperature(1.1).with_workspace_bytes(Some(6 * v * 4));
        let fwd = run((&h).into(), (&w).into(), Some(b.view()), t.view(), &cfg, None).unwrap();
        assert!(fwd.grad_hidden.is_none() && fwd.grad_weight.is_none() && fwd.grad_bias.is_none(), "{name}");
        let both = run((&h).into(), (&w).into(), Some(b.view()), t.view(), &cfg, up_view(&up)).unwrap();
        assert_eq!(fwd.logprob, both.logprob, "{name}: the same row kernel with or without gradients");
        assert_eq!(fwd.entropy, both.entropy, "{name}");
        // Flags off: only the gradients asked for.
        let cfg = cfg.with_grad_weight(false).with_grad_bias(false);
        let o = run((&h).into(), (&w).into(), Some(b.view()), t.view(), &cfg, up_view(&up)).unwrap();
        assert!(o.grad_hidden.is_some() && o.grad_weight.is_none() && o.grad_bias.is_none(), "{name}");
    }
}

#[test]
fn bad_input_is_one_typed_error_on_every_backend() {
    let (n, d, v) = (6, 4, 10);
    let (h, w, b, t, up) = inputs(n, d, v, 5);
    let short = Array1::<f32>::zeros(n - 1);
    let mut nan = up.1.clone();
    nan[3] = f32::NAN;
    let mut bad_t = t.clone();
    bad_t[2] = v as i64;
    let cfg = LinearLogprobs::default();
    for (name, run) in runners() {
        let call = |t: &Array1<i64>, cfg: &LinearLogprobs, u: Option<(ArrayView1<'_, f32>, ArrayView1<'_, f32>)>| {
            run((&h).into(), (&w).into(), Some(b.view()), t.view(), cfg, u).unwrap_err()
        };
        let e = call(&t, &cfg, Some((short.view(), up.1.view())));
        assert!(matches!(&e, XentError::Shape(m) if m.contains("upstream logprob")), "{name}: {e}");
        let e = call(&t, &cfg, Some((up.0.view(), short.view())));
        assert!(matches!(&e, XentError::Shape(m) if m.contains("upstream entropy")), "{name}: {e}");
        let e = call(&t, &cfg, Some((up.0.view(), nan.view())));
        assert!(
            matches!(&e, XentError::InvalidValue { input, index, .. } if input == "upstream entropy" && index == &[3]),
            "{name}: {e}"
        );
        let e = call(&bad_t, &cfg, None);
        assert!(matches!(e, XentError::TargetOutOfRange { row: 2, .. }), "{name}: {e}");
        let e = call(&t, &cfg.clone().with_temperature(0.0), None);
        assert!(matches!(&e, XentError::InvalidOption(m) if m.contains("temperature")), "{name}: {e}");
        let e = call(&t, &cfg.clone().with_workspace_bytes(Some(0)), None);
        assert!(matches!(e, XentError::InvalidOption(_)), "{name}: {e}");
    }
}

#[test]
fn same_bits_on_every_run_and_cpu_thread_count() {
    let (n, d, v) = (48, 40, 700);
    let (h, w, b, t, up) = inputs(n, d, v, 3);
    let cfg = LinearLogprobs::default().with_temperature(0.6).with_workspace_bytes(Some(7 * v * 4));
    let bits = |o: &LinearLogprobsOutput| {
        let mut v: Vec<u32> = o.logprob.iter().chain(o.entropy.iter()).map(|x| x.to_bits()).collect();
        for g in [&o.grad_hidden, &o.grad_weight] {
            v.extend(g.as_ref().unwrap().to_f32().iter().map(|x| x.to_bits()));
        }
        v.extend(o.grad_bias.as_ref().unwrap().iter().map(|x| x.to_bits()));
        v
    };
    let cpu = |threads| {
        Cpu::with_threads(threads)
            .unwrap()
            .linear_logprobs(&h, &w, Some(b.view()), t.view(), &cfg, up_view(&up))
            .unwrap()
    };
    let first = bits(&cpu(2));
    for threads in [1, 3] {
        assert_eq!(bits(&cpu(threads)), first, "{threads} threads");
    }
    for (name, run) in runners().into_iter().skip(1) {
        let go = || bits(&run((&h).into(), (&w).into(), Some(b.view()), t.view(), &cfg, up_view(&up)).unwrap());
        assert_eq!(go(), go(), "{name}: two runs");
    }
}

/// With `a = 1` on counted rows and `b = 0`, `-logprob` is `LinearCe`'s per-row loss and the
/// gradients are `LinearCe`'s (reduction sum) negated, up to f32 rounding of two kernels.
#[test]
fn agrees_with_linear_cross_entropy() {
    let (n, d, v) = (30, 20, 211);
    let (h, w, b, t, _) = inputs(n, d, v, 9);
    let a: Array1<f32> = t.iter().map(|&y| if y == -100 { 0.0 } else { 1.0 }).collect();
    let zero = Array1::<f32>::zeros(n);
    for (name, run) in runners() {
        let cfg = LinearLogprobs::default().with_temperature(1.4).with_workspace_bytes(Some(8 * v * 4));
        let o = run((&h).into(), (&w).into(), Some(b.view()), t.view(), &cfg, Some((a.view(), zero.view()))).unwrap();
        let mut lc = LinearCe::default();
        lc.ce.reduction = Reduction::None;
        lc.ce.temperature = 1.4;
        lc.grad_hidden = false;
        lc.grad_weight = false;
        lc.grad_bias = false;
        let want = reference(&h, &w, Some(&b), t.as_slice().unwrap(), 1.4, &(a.clone(), zero.clone()));
        let cpu = Cpu::new();
        let rows = cpu.linear_cross_entropy(&h, &w, Some(b.view()), t.view(), &lc).unwrap().row_loss.unwrap();
        for (i, (&lp, &l)) in o.logprob.iter().zip(rows.iter()).enumerate() {
            assert!((-lp - l).abs() <= 1e-5 * (1.0 + l.abs()), "{name} row {i}: -logprob {} vs loss {l}", -lp);
        }
        lc.ce.reduction = Reduction::Sum;
        (lc.grad_hidden, lc.grad_weight, lc.grad_bias) = (true, true, true);
        let ce = cpu.linear_cross_entropy(&h, &w, Some(b.view()), t.view(), &lc).unwrap();
        let neg = |g: &Tensor2| g.to_f32().mapv(|x| -(x as f64));
        let r = Ref {
            gh: neg(ce.grad_hidden.as_ref().unwrap()),
            gw: neg(ce.grad_weight.as_ref().unwrap()),
            gb: ce.grad_bias.as_ref().unwrap().mapv(|x| -(x as f64)),
            ..want
        };
        // Two f32 computations, each within GRAD_TOL of the f64 gradient.
        assert_grads(&format!("{name} vs LinearCe"), &o, &r, 2.0 * GRAD_TOL, 0.0);
    }
}

/// Ignored rows inside the row kernel (the products run over every row when an ignored row
/// holds a non-finite hidden state, or every row is ignored): 0 and no gradient there, and, as
/// `LinearCe` (and PyTorch), the non-finite state reaches `grad_weight`.
#[test]
fn ignored_rows_in_the_row_kernel() {
    let (n, d, v) = (9, 6, 40);
    let (mut h, w, b, mut t, up) = inputs(n, d, v, 13);
    t.iter_mut().enumerate().for_each(|(i, y)| *y = if i % 3 == 1 { -100 } else { (i * 7 % v) as i64 });
    let r = reference(&h, &w, Some(&b), t.as_slice().unwrap(), 1.0, &up);
    h[[4, 2]] = f32::NAN;
    let all_ignored = Array1::from_elem(n, -100i64);
    for (name, run) in runners() {
        let cfg = LinearLogprobs::default().with_workspace_bytes(Some(4 * v * 4));
        let o = run((&h).into(), (&w).into(), Some(b.view()), t.view(), &cfg, up_view(&up)).unwrap();
        assert_rows(name, &o, &r);
        let gh = o.grad_hidden.as_ref().unwrap().to_f32();
        for i in 0..n {
            let finite = gh.row(i).iter().all(|x| x.is_finite());
            assert!(finite, "{name}: row {i}'s grad_hidden is finite");
            if t[i] == -100 {
                assert!(gh.row(i).iter().all(|&x| x == 0.0), "{name}: ignored row {i} has a gradient");
            }
        }
        assert!(o.grad_weight.as_ref().unwrap().to_f32().iter().any(|x| x.is_nan()), "{name}: NaN reaches grad_weight");
        let o = run((&h).into(), (&w).into(), Some(b.view()), all_ignored.view(), &cfg, up_view(&up)).unwrap();
        assert_eq!(o.counted, 0, "{name}");
        assert!(o.logprob.iter().chain(o.entropy.iter()).all(|&x| x == 0.0), "{name}: all ignored");
        assert!(o.grad_hidden.as_ref().unwrap().to_f32().iter().all(|&x| x == 0.0), "{name}: all ignored");
        assert!(o.grad_bias.as_ref().unwrap().iter().all(|&x| x == 0.0), "{name}: all ignored");
    }
}
