//! xent-burn's linear log-probs and entropies against Burn's own composition under
//! `Autodiff<Flex>`: `z = (hidden @ weight^T + bias) / T`, `log_softmax` + gather for the
//! log-probs, `-sum(p log p)` for the entropies, and Burn's backward pass for the gradients of
//! hidden, weight and bias, through losses that use both outputs with random per-row
//! coefficients (and one output alone); ignored rows; several row chunks; against xent's own
//! `Cpu::linear_logprobs` with the same upstream gradient; errors; and Burn's wgpu backend
//! (lavapipe in CI) against the Flex path and Burn's own composition there.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use ndarray::{Array1, Array2};
use xent::{Cpu, LinearLogprobs, XentError};
use xent_burn::{linear_logprobs, linear_logprobs_with_grads};

mod common;
use common::{host, t1, t2, ti, values};

struct Case {
    n: usize,
    d: usize,
    v: usize,
    h: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    t: Vec<i64>,
    /// Per-row coefficients of the log-probs and of the entropies in the loss.
    a: Vec<f32>,
    c: Vec<f32>,
}

/// A case whose rows `ignored` (every k-th, from 1) have target -100.
fn case(n: usize, d: usize, v: usize, seed: u64, ignored: Option<usize>) -> Case {
    let mut t: Vec<i64> =
        values(n, seed + 3, 1.0).iter().map(|x| ((x + 1.0) * 0.5 * v as f32) as i64 % v as i64).collect();
    if let Some(k) = ignored {
        for r in (1..n).step_by(k) {
            t[r] = -100;
        }
    }
    Case {
        n,
        d,
        v,
        h: values(n * d, seed, 2.0),
        w: values(v * d, seed + 1, 2.0 / (d as f32).sqrt()),
        b: values(v, seed + 2, 0.5),
        t,
        a: values(n, seed + 4, 1.5),
        c: values(n, seed + 5, 0.8),
    }
}

/// Which outputs the loss uses: `sum(a * logp) + sum(c * H)`, or one term alone.
#[derive(Clone, Copy, Debug)]
enum Use {
    Both,
    Logp,
    Entropy,
}

/// Values and gradients (hidden, weight, bias) of one log-prob/entropy function.
struct Out {
    logp: Vec<f32>,
    entropy: Vec<f32>,
    gh: Vec<f32>,
    gw: Vec<f32>,
    gb: Option<Vec<f32>>,
}

type LogprobsFn<'a> = dyn Fn(Tensor<2>, Tensor<2>, Option<Tensor<1>>, Tensor<1, Int>) -> (Tensor<1>, Tensor<1>) + 'a;

fn run(c: &Case, bias: bool, used: Use, f: &LogprobsFn<'_>) -> Out {
    run_on(&Device::flex().autodiff(), c, bias, used, f)
}

/// [`run`] on `device` (an autodiff one).
fn run_on(device: &Device, c: &Case, bias: bool, used: Use, f: &LogprobsFn<'_>) -> Out {
    let device = device.clone();
    let h = t2(&c.h, [c.n, c.d], &device).require_grad();
    let w = t2(&c.w, [c.v, c.d], &device).require_grad();
    let b = bias.then(|| t1(&c.b, &device).require_grad());
    let (logp, entropy) = f(h.clone(), w.clone(), b.clone(), ti(&c.t, &device));
    let (la, lc) = ((logp.clone() * t1(&c.a, &device)).sum(), (entropy.clone() * t1(&c.c, &device)).sum());
    let loss = match used {
        Use::Both => la + lc,
        Use::Logp => la,
        Use::Entropy => lc,
    };
    let grads = loss.backward();
    Out {
        logp: host(logp),
        entropy: host(entropy),
        gh: host(h.grad(&grads).expect("d hidden")),
        gw: host(w.grad(&grads).expect("d weight")),
        gb: b.map(|b| host(b.grad(&grads).expect("d bias"))),
    }
}

/// Burn's own composition: `z = (hidden @ weight^T + bias) / T`, `log_softmax`, the gather of
/// the targets, `-sum(p log p)`; ignored rows multiplied by 0.
fn burn_ref(c: &Case, bias: bool, temperature: f32, used: Use) -> Out {
    burn_ref_on(&Device::flex().autodiff(), c, bias, temperature, used)
}

/// [`burn_ref`] on `device` (an autodiff one).
fn burn_ref_on(device: &Device, c: &Case, bias: bool, temperature: f32, used: Use) -> Out {
    let keep: Vec<f32> = c.t.iter().map(|&y| if y == -100 { 0.0 } else { 1.0 }).collect();
    run_on(device, c, bias, used, &|h, w, b, t| {
        let device = h.device();
        let n = t.dims()[0];
        let mut z = h.matmul(w.transpose());
        if let Some(b) = b {
            z = z + b.unsqueeze_dim(0);
        }
        let lsm = log_softmax(z / temperature, 1);
        let keep = t1(&keep, &device);
        let safe = t.clamp_min(0).reshape([n, 1]);
        let logp = lsm.clone().gather(1, safe).reshape([n]) * keep.clone();
        let entropy = -(lsm.clone().exp() * lsm).sum_dim(1).reshape([n]) * keep;
        (logp, entropy)
    })
}

fn xent_run(c: &Case, bias: bool, cfg: &LinearLogprobs, used: Use) -> Out {
    run(c, bias, used, &|h, w, b, t| linear_logprobs(h, w, b, t, cfg).expect("linear_logprobs"))
}

#[track_caller]
fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-3);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * scale + tol * w.abs(), "{what}[{i}]: {g} vs {w} (scale {scale})");
    }
}

fn compare(what: &str, got: &Out, want: &Out) {
    compare_tol(what, got, want, 2e-5, 1e-4);
}

/// [`compare`] with tolerances for the values and the gradients (relative to the largest entry).
fn compare_tol(what: &str, got: &Out, want: &Out, tol: f32, grad_tol: f32) {
    close(&format!("{what} logp"), &got.logp, &want.logp, tol);
    close(&format!("{what} entropy"), &got.entropy, &want.entropy, tol);
    close(&format!("{what} d hidden"), &got.gh, &want.gh, grad_tol);
    close(&format!("{what} d weight"), &got.gw, &want.gw, grad_tol);
    match (&got.gb, &want.gb) {
        (Some(g), Some(w)) => close(&format!("{what} d bias"), g, w, grad_tol),
        (None, None) => {}
        _ => panic!("{what}: a bias gradient on one side only"),
    }
}

#[test]
fn values_and_gradients_equal_burns_composition() {
    // Both outputs in the loss with random per-row coefficients; ignored rows; T != 1.
    let c = case(37, 24, 301, 1, Some(5));
    for temperature in [0.7, 1.0, 1.6] {
        for bias in [true, false] {
            let cfg = LinearLogprobs::default().with_temperature(temperature);
            let want = burn_ref(&c, bias, temperature, Use::Both);
            let got = xent_run(&c, bias, &cfg, Use::Both);
            compare(&format!("T={temperature} bias={bias}"), &got, &want);
        }
    }
}

#[test]
fn one_output_alone_gets_the_other_a_zero_upstream() {
    let c = case(23, 16, 150, 2, Some(4));
    let cfg = LinearLogprobs::default().with_temperature(0.8);
    for used in [Use::Logp, Use::Entropy] {
        compare(&format!("{used:?}"), &xent_run(&c, true, &cfg, used), &burn_ref(&c, true, 0.8, used));
    }
}

#[test]
fn several_row_chunks_equal_burns_composition() {
    // A workspace of 5 rows of logits: 8 chunks over 37 rows.
    let c = case(37, 16, 257, 3, Some(6));
    let cfg = LinearLogprobs::default().with_temperature(1.3).with_workspace_bytes(Some(5 * 257 * 4));
    compare("chunked", &xent_run(&c, true, &cfg, Use::Both), &burn_ref(&c, true, 1.3, Use::Both));
}

#[test]
fn ignored_rows_give_zero_and_no_gradient_and_equal_xents_own_call() {
    let c = case(33, 16, 150, 4, Some(3));
    let cfg = LinearLogprobs::default().with_temperature(0.9);
    let got = xent_run(&c, true, &cfg, Use::Both);
    for r in (1..c.n).step_by(3) {
        assert_eq!((got.logp[r], got.entropy[r]), (0.0, 0.0), "row {r} ignored");
        assert!(got.gh[r * c.d..(r + 1) * c.d].iter().all(|&x| x == 0.0), "row {r}: no gradient");
    }
    assert!(got.logp.iter().zip(&c.t).all(|(&lp, &y)| y == -100 || lp < 0.0));
    // xent's own Cpu::linear_logprobs with the loss's coefficients as its upstream gradient:
    // what the backward step passes on.
    let h = Array2::from_shape_vec((c.n, c.d), c.h.clone()).unwrap();
    let w = Array2::from_shape_vec((c.v, c.d), c.w.clone()).unwrap();
    let (b, t) = (Array1::from(c.b.clone()), Array1::from(c.t.clone()));
    let (a, cc) = (Array1::from(c.a.clone()), Array1::from(c.c.clone()));
    let out = Cpu::new()
        .linear_logprobs(h.view(), w.view(), Some(b.view()), t.view(), &cfg, Some((a.view(), cc.view())))
        .unwrap();
    let f = |g: Option<xent::Tensor2>| g.expect("a gradient").to_f32().iter().copied().collect::<Vec<f32>>();
    let want = Out {
        logp: out.logprob.to_vec(),
        entropy: out.entropy.to_vec(),
        gh: f(out.grad_hidden),
        gw: f(out.grad_weight),
        gb: Some(out.grad_bias.expect("d bias").to_vec()),
    };
    compare("native", &got, &want);
    close("native d weight (tight)", &got.gw, &want.gw, 1e-6);
}

#[test]
fn only_tracked_inputs_get_gradients_and_flex_without_autodiff_works() {
    let c = case(9, 8, 30, 5, None);
    let cfg = LinearLogprobs::default().with_temperature(2.0);
    let device = Device::flex().autodiff();
    let h = t2(&c.h, [c.n, c.d], &device); // not tracked
    let w = t2(&c.w, [c.v, c.d], &device).require_grad();
    let b = t1(&c.b, &device); // not tracked
    let (logp, entropy) = linear_logprobs(h.clone(), w.clone(), Some(b.clone()), ti(&c.t, &device), &cfg).unwrap();
    let loss = (logp * t1(&c.a, &device)).sum() + (entropy * t1(&c.c, &device)).sum();
    let grads = loss.backward();
    assert!(h.grad(&grads).is_none() && b.grad(&grads).is_none());
    let want = burn_ref(&c, true, 2.0, Use::Both);
    close("weight only", &host(w.grad(&grads).unwrap()), &want.gw, 1e-4);
    // Plain Flex: the values alone.
    let flex = Device::flex();
    let (logp, entropy) = linear_logprobs(
        t2(&c.h, [c.n, c.d], &flex),
        t2(&c.w, [c.v, c.d], &flex),
        Some(t1(&c.b, &flex)),
        ti(&c.t, &flex),
        &cfg,
    )
    .unwrap();
    close("plain flex logp", &host(logp), &want.logp, 2e-5);
    close("plain flex entropy", &host(entropy), &want.entropy, 2e-5);
}

#[test]
fn with_grads_outside_autodiff() {
    let c = case(11, 8, 40, 6, Some(4));
    let cfg = LinearLogprobs::default().with_temperature(0.6);
    let flex = Device::flex();
    let (logp, entropy, gh, gw, gb) = linear_logprobs_with_grads(
        t2(&c.h, [c.n, c.d], &flex),
        t2(&c.w, [c.v, c.d], &flex),
        Some(t1(&c.b, &flex)),
        ti(&c.t, &flex),
        (t1(&c.a, &flex), t1(&c.c, &flex)),
        &cfg,
    )
    .unwrap();
    let got = Out {
        logp: host(logp),
        entropy: host(entropy),
        gh: host(gh.unwrap()),
        gw: host(gw.unwrap()),
        gb: gb.map(host),
    };
    compare("with_grads", &got, &burn_ref(&c, true, 0.6, Use::Both));
    // The options' flags turn gradients off.
    let (_, _, gh, gw, gb) = linear_logprobs_with_grads(
        t2(&c.h, [c.n, c.d], &flex),
        t2(&c.w, [c.v, c.d], &flex),
        Some(t1(&c.b, &flex)),
        ti(&c.t, &flex),
        (t1(&c.a, &flex), t1(&c.c, &flex)),
        &cfg.clone().with_grad_weight(false).with_grad_bias(false),
    )
    .unwrap();
    assert!(gh.is_some() && gw.is_none() && gb.is_none());
}

#[test]
fn bf16_inputs_get_gradients_in_their_dtype() {
    use burn::tensor::DType;
    let c = case(19, 16, 70, 7, Some(5));
    let cfg = LinearLogprobs::default().with_temperature(0.9);
    let want = xent_run(&c, true, &cfg, Use::Both);
    let device = Device::flex().autodiff();
    let h = t2(&c.h, [c.n, c.d], &device).cast(DType::BF16).require_grad();
    let w = t2(&c.w, [c.v, c.d], &device).cast(DType::BF16).require_grad();
    let b = t1(&c.b, &device).require_grad(); // an f32 bias beside bf16 operands
    let (logp, entropy) = linear_logprobs(h.clone(), w.clone(), Some(b.clone()), ti(&c.t, &device), &cfg).unwrap();
    assert_eq!((logp.dtype(), entropy.dtype()), (DType::F32, DType::F32));
    let loss = (logp.clone() * t1(&c.a, &device)).sum() + (entropy.clone() * t1(&c.c, &device)).sum();
    let grads = loss.backward();
    let (gh, gw, gb) = (h.grad(&grads).unwrap(), w.grad(&grads).unwrap(), b.grad(&grads).unwrap());
    assert_eq!((gh.dtype(), gw.dtype(), gb.dtype()), (DType::BF16, DType::BF16, DType::F32));
    // Inputs rounded to 8 bits: a loose tolerance against f32.
    close("bf16 logp", &host(logp), &want.logp, 3e-2);
    close("bf16 entropy", &host(entropy), &want.entropy, 3e-2);
    close("bf16 d hidden", &host(gh), &want.gh, 5e-2);
    close("bf16 d weight", &host(gw), &want.gw, 5e-2);
    close("bf16 d bias", &host(gb), want.gb.as_ref().unwrap(), 5e-2);
}

#[test]
fn bad_input_is_a_typed_error() {
    let c = case(6, 4, 10, 8, None);
    let device = Device::flex().autodiff();
    let h = t2(&c.h, [c.n, c.d], &device);
    let w = t2(&c.w, [c.v, c.d], &device);
    let t = ti(&c.t, &device);
    let cfg = LinearLogprobs::default();
    let call = |h: Tensor<2>, w: Tensor<2>, b: Option<Tensor<1>>, t: Tensor<1, Int>, cfg: &LinearLogprobs| {
        linear_logprobs(h, w, b, t, cfg).map(|_| ())
    };
    let wrong_w = Tensor::<2>::zeros([c.v, c.d + 1], &device);
    assert!(matches!(call(h.clone(), wrong_w, None, t.clone(), &cfg), Err(XentError::Shape(_))));
    let wrong_b = Tensor::<1>::zeros([c.v + 1], &device);
    assert!(matches!(call(h.clone(), w.clone(), Some(wrong_b), t.clone(), &cfg), Err(XentError::Shape(_))));
    let short_t = ti(&c.t[..3], &device);
    assert!(matches!(call(h.clone(), w.clone(), None, short_t, &cfg), Err(XentError::Shape(_))));
    let mut bad_t = c.t.clone();
    bad_t[2] = c.v as i64;
    assert!(call(h.clone(), w.clone(), None, ti(&bad_t, &device), &cfg).is_err());
    for temperature in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let bad = cfg.clone().with_temperature(temperature);
        match call(h.clone(), w.clone(), None, t.clone(), &bad) {
            Err(XentError::InvalidOption(m)) => assert!(m.contains("temperature"), "{m}"),
            other => panic!("temperature {temperature}: expected InvalidOption, got {other:?}"),
        }
    }
    let bad = cfg.clone().with_workspace_bytes(Some(0));
    assert!(matches!(call(h.clone(), w.clone(), None, t.clone(), &bad), Err(XentError::InvalidOption(_))));
    let f16_w = w.clone().cast(burn::tensor::DType::F16);
    assert!(matches!(call(h.clone(), f16_w, None, t.clone(), &cfg), Err(XentError::InvalidOption(_))));
    // Upstream gradients of the wrong length, or not finite.
    let up = |a: Vec<f32>, b: Vec<f32>| (t1(&a, &device), t1(&b, &device));
    let with = |u: (Tensor<1>, Tensor<1>)| {
        linear_logprobs_with_grads(h.clone(), w.clone(), None, t.clone(), u, &cfg).map(|_| ())
    };
    assert!(matches!(with(up(vec![1.0; c.n - 1], vec![0.0; c.n])), Err(XentError::Shape(_))));
    assert!(matches!(with(up(vec![1.0; c.n], vec![0.0; c.n + 1])), Err(XentError::Shape(_))));
    let mut nan = vec![0.0; c.n];
    nan[3] = f32::NAN;
    assert!(with(up(vec![1.0; c.n], nan)).is_err());
    // The good call goes through.
    assert!(with(up(vec![1.0; c.n], vec![0.5; c.n])).is_ok());
    assert!(xent_burn::take_error().is_none());
}

/// On Burn's wgpu device (fusion, under autodiff) the composed path (Burn's products and
/// element-wise ops per row chunk) equals the Flex path (xent's own kernel, checked above against
/// Burn's composition): values and gradients, temperatures 0.7 and 1.6, with and without bias,
/// ignored rows, several chunks, each output alone; a target out of range is NaN in its row
/// (not an error: the targets stay on the device); no host transfer.
#[cfg(feature = "gpu")]
#[test]
fn wgpu_equals_flex() {
    let Some(device) = common::wgpu() else { return };
    let before = xent_burn::host_transfers();
    let c = case(29, 16, 211, 41, Some(4));
    let gpu = device.clone().autodiff();
    for (temperature, bias, used, workspace) in [
        (1.0, true, Use::Both, None),
        (0.7, false, Use::Both, Some(6 * 211 * 4)),
        (1.6, true, Use::Logp, None),
        (1.0, true, Use::Entropy, Some(10 * 211 * 4)),
    ] {
        let mut cfg = LinearLogprobs::default().with_temperature(temperature);
        cfg.workspace_bytes = workspace;
        let f = |h, w, b, t| linear_logprobs(h, w, b, t, &cfg).expect("linear_logprobs");
        let what = format!("T={temperature} bias={bias} {used:?} {workspace:?}");
        let want = run(&c, bias, used, &f);
        let got = run_on(&gpu, &c, bias, used, &f);
        compare_tol(&what, &got, &want, 1e-5, 2e-4);
    }
    // And against Burn's own composition on the same wgpu device.
    let want = burn_ref_on(&gpu, &c, true, 1.3, Use::Both);
    let cfg = LinearLogprobs::default().with_temperature(1.3);
    let got = run_on(&gpu, &c, true, Use::Both, &|h, w, b, t| linear_logprobs(h, w, b, t, &cfg).expect("logprobs"));
    compare_tol("Burn's own, wgpu", &got, &want, 1e-5, 2e-4);
    assert_eq!(xent_burn::host_transfers(), before, "the wgpu path moved data through the host");
    // A target out of range: NaN in its row only.
    let mut bad = c.t.clone();
    bad[3] = c.v as i64;
    let (h, w, t) = (t2(&c.h, [c.n, c.d], &device), t2(&c.w, [c.v, c.d], &device), ti(&bad, &device));
    let (logp, _) = linear_logprobs(h, w, None, t, &LinearLogprobs::default()).unwrap();
    let logp = host(logp);
    assert!(logp[3].is_nan() && logp.iter().enumerate().all(|(i, x)| i == 3 || x.is_finite()), "{logp:?}");
}

#[test]
fn an_empty_batch_gives_empty_outputs() {
    let device = Device::flex().autodiff();
    let h = Tensor::<2>::zeros([0, 4], &device).require_grad();
    let w = Tensor::<2>::ones([10, 4], &device).require_grad();
    let t = Tensor::<1, Int>::zeros([0], &device);
    let (logp, entropy) = linear_logprobs(h, w, None, t, &LinearLogprobs::default()).unwrap();
    assert_eq!((logp.dims(), entropy.dims()), ([0], [0]));
    // Outside autodiff: zero gradients of the right shapes.
    let flex = Device::flex();
    let none = || Tensor::<1>::zeros([0], &flex);
    let (logp, _, gh, gw, _) = linear_logprobs_with_grads(
        Tensor::<2>::zeros([0, 4], &flex),
        Tensor::<2>::ones([10, 4], &flex),
        None,
        Tensor::<1, Int>::zeros([0], &flex),
        (none(), none()),
        &LinearLogprobs::default(),
    )
    .unwrap();
    assert_eq!((logp.dims(), gh.unwrap().dims()), ([0], [0, 4]));
    let gw = gw.unwrap();
    assert_eq!(gw.dims(), [10, 4]);
    assert!(host(gw).iter().all(|&x| x == 0.0));
}
