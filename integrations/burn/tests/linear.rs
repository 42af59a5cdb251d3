//! xent-burn's fused linear cross-entropy against Burn's own composition (`hidden @ weight^T +
//! bias`, then `CrossEntropyLoss`) under `Autodiff<Flex>`: the loss and the gradients of hidden,
//! weight and bias through `loss.backward()`; ignored rows against Burn's pad tokens and against
//! xent's own `Cpu::linear_cross_entropy`; reduction `none` with a non-uniform upstream
//! gradient; the module; errors; and Burn's wgpu backend (lavapipe in CI) against Flex.

use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;
use ndarray::{Array1, Array2};
use xent::{Cpu, LinearCe, Reduction, XentError};
use xent_burn::{linear_cross_entropy, LinearCrossEntropyConfig};

mod common;
#[cfg(feature = "gpu")]
use common::wgpu;
use common::{host, t1, t2, ti, values};

struct Case {
    n: usize,
    d: usize,
    v: usize,
    h: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    t: Vec<i64>,
}

fn case(n: usize, d: usize, v: usize, seed: u64) -> Case {
    let t = values(n, seed + 3, 1.0).iter().map(|x| ((x + 1.0) * 0.5 * v as f32) as i64 % v as i64).collect();
    Case {
        n,
        d,
        v,
        h: values(n * d, seed, 2.0),
        w: values(v * d, seed + 1, 1.0 / (d as f32).sqrt() * 2.0),
        b: values(v, seed + 2, 0.5),
        t,
    }
}

/// Loss and gradients (hidden, weight, bias) of one differentiable loss function.
struct Out {
    loss: Vec<f32>,
    gh: Vec<f32>,
    gw: Vec<f32>,
    gb: Option<Vec<f32>>,
}

fn run(c: &Case, bias: bool, f: impl Fn(Tensor<2>, Tensor<2>, Option<Tensor<1>>, Tensor<1, Int>) -> Tensor<1>) -> Out {
    run_on(&Device::flex().autodiff(), c, bias, f)
}

/// [`run`] on `device` (an autodiff one).
fn run_on(
    device: &Device,
    c: &Case,
    bias: bool,
    f: impl Fn(Tensor<2>, Tensor<2>, Option<Tensor<1>>, Tensor<1, Int>) -> Tensor<1>,
) -> Out {
    let device = device.clone();
    let h = t2(&c.h, [c.n, c.d], &device).require_grad();
    let w = t2(&c.w, [c.v, c.d], &device).require_grad();
    let b = bias.then(|| t1(&c.b, &device).require_grad());
    let loss = f(h.clone(), w.clone(), b.clone(), ti(&c.t, &device));
    let grads = loss.backward();
    Out {
        loss: host(loss),
        gh: host(h.grad(&grads).expect("d hidden")),
        gw: host(w.grad(&grads).expect("d weight")),
        gb: b.map(|b| host(b.grad(&grads).expect("d bias"))),
    }
}

/// Burn's own composition: `hidden @ weight^T + bias`, then `CrossEntropyLoss` (mean; `sum`
/// as the mean times the counted rows), with `pad` as its pad token.
fn burn_ref(c: &Case, bias: bool, reduction: Reduction, pad: Option<usize>) -> Out {
    burn_ref_on(&Device::flex().autodiff(), c, bias, reduction, pad)
}

/// [`burn_ref`] on `device` (an autodiff one).
fn burn_ref_on(device: &Device, c: &Case, bias: bool, reduction: Reduction, pad: Option<usize>) -> Out {
    let counted = c.t.iter().filter(|&&t| pad.is_none_or(|p| t != p as i64)).count() as f32;
    run_on(device, c, bias, |h, w, b, t| {
        let device = h.device();
        let mut z = h.matmul(w.transpose());
        if let Some(b) = b {
            z = z + b.unsqueeze_dim(0);
        }
        let loss = CrossEntropyLossConfig::new().with_pad_tokens(pad.map(|p| vec![p])).init(&device).forward(z, t);
        match reduction {
            Reduction::Sum => loss * counted,
            _ => loss,
        }
    })
}

fn xent_run(c: &Case, bias: bool, cfg: &LinearCe) -> Out {
    run(c, bias, |h, w, b, t| linear_cross_entropy(h, w, b, t, cfg).expect("linear_cross_entropy"))
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

/// [`compare`] with tolerances for the loss and the gradients (relative to the largest entry).
fn compare_tol(what: &str, got: &Out, want: &Out, loss_tol: f32, grad_tol: f32) {
    close(&format!("{what} loss"), &got.loss, &want.loss, loss_tol);
    close(&format!("{what} d hidden"), &got.gh, &want.gh, grad_tol);
    close(&format!("{what} d weight"), &got.gw, &want.gw, grad_tol);
    match (&got.gb, &want.gb) {
        (Some(g), Some(w)) => close(&format!("{what} d bias"), g, w, grad_tol),
        (None, None) => {}
        _ => panic!("{what}: a bias gradient on one side only"),
    }
}

fn cfg(reduction: Reduction) -> LinearCe {
    let mut cfg = LinearCe::default();
    cfg.ce.reduction = reduction;
    cfg
}

#[test]
fn equals_burns_composition_mean_and_sum_with_and_without_bias() {
    let c = case(37, 24, 301, 1);
    for reduction in [Reduction::Mean, Reduction::Sum] {
        for bias in [true, false] {
            let want = burn_ref(&c, bias, reduction, None);
            let got = xent_run(&c, bias, &cfg(reduction));
            compare(&format!("{reduction:?} bias={bias}"), &got, &want);
        }
    }
}

#[test]
fn several_row_chunks_equal_burns_composition() {
    // A workspace of 5 rows of logits: 8 chunks over 37 rows.
    let c = case(37, 16, 257, 2);
    let mut cfg = cfg(Reduction::Mean);
    cfg.workspace_bytes = Some(5 * 257 * 4);
    compare("chunked", &xent_run(&c, true, &cfg), &burn_ref(&c, true, Reduction::Mean, None));
}

#[test]
fn pad_tokens_equal_burns_pad_token_option() {
    let mut c = case(40, 16, 200, 3);
    for r in (0..c.n).step_by(3) {
        c.t[r] = 7;
    }
    let mut cfg = cfg(Reduction::Mean);
    cfg.ce.ignore_index = 7;
    compare("pad", &xent_run(&c, true, &cfg), &burn_ref(&c, true, Reduction::Mean, Some(7)));
}

#[test]
fn ignored_rows_equal_xents_own_linear_cross_entropy() {
    let mut c = case(33, 16, 150, 4);
    for r in (1..c.n).step_by(4) {
        c.t[r] = -100;
    }
    for reduction in [Reduction::Mean, Reduction::Sum] {
        let cfg = cfg(reduction);
        let got = xent_run(&c, true, &cfg);
        let h = Array2::from_shape_vec((c.n, c.d), c.h.clone()).unwrap();
        let w = Array2::from_shape_vec((c.v, c.d), c.w.clone()).unwrap();
        let b = Array1::from(c.b.clone());
        let t = Array1::from(c.t.clone());
        let out = Cpu::new().linear_cross_entropy(h.view(), w.view(), Some(b.view()), t.view(), &cfg).unwrap();
        let f = |g: Option<xent::Tensor2>| g.expect("a gradient").to_f32().iter().copied().collect::<Vec<f32>>();
        let want = Out {
            loss: vec![out.loss as f32],
            gh: f(out.grad_hidden),
            gw: f(out.grad_weight),
            gb: Some(out.grad_bias.expect("d bias").to_vec()),
        };
        compare(&format!("ignored {reduction:?}"), &got, &want);
        // Ignored rows get no gradient at all.
        for r in (1..c.n).step_by(4) {
            assert!(got.gh[r * c.d..(r + 1) * c.d].iter().all(|&x| x == 0.0), "row {r} ignored");
        }
    }
}

#[test]
fn reduction_none_with_a_per_row_upstream_gradient() {
    let mut c = case(21, 12, 90, 5);
    c.t[4] = -100;
    let up: Vec<f32> = values(c.n, 99, 1.0);
    let got = run(&c, true, |h, w, b, t| {
        let device = h.device();
        let rows = linear_cross_entropy(h, w, b, t, &cfg(Reduction::None)).unwrap();
        (rows * t1(&up, &device)).sum()
    });
    let want = run(&c, true, |h, w, b, t| {
        let device = h.device();
        let mut z = h.matmul(w.transpose());
        if let Some(b) = b {
            z = z + b.unsqueeze_dim(0);
        }
        // Per-row losses from Burn's ops: -log_softmax(z)[y], 0 for the ignored row.
        let n = t.dims()[0];
        let keep: Vec<f32> = c.t.iter().map(|&y| if y == -100 { 0.0 } else { 1.0 }).collect();
        let safe = t.clone().clamp_min(0);
        let rows = -burn::tensor::activation::log_softmax(z, 1).gather(1, safe.reshape([n, 1])).reshape([n]);
        (rows * t1(&keep, &device) * t1(&up, &device)).sum()
    });
    compare("none", &got, &want);
    // The per-row losses themselves.
    let device = Device::flex();
    let rows = linear_cross_entropy(
        t2(&c.h, [c.n, c.d], &device),
        t2(&c.w, [c.v, c.d], &device),
        Some(t1(&c.b, &device)),
        ti(&c.t, &device),
        &cfg(Reduction::None),
    )
    .unwrap();
    assert_eq!(rows.dims(), [c.n]);
    assert_eq!(host(rows)[4], 0.0);
}

/// With a z-loss (`z lse_n^2` per counted row, not scaled by sample weights) the per-row
/// upstream must scale it too: the gradients of `sum_n u_n L_n` against Burn's composition of
/// `lse - z_y + z lse^2`, with sample weights on the cross-entropy term.
#[test]
fn reduction_none_upstream_with_z_loss_and_sample_weights() {
    let mut c = case(17, 10, 70, 8);
    c.t[3] = -100;
    let up: Vec<f32> = values(c.n, 77, 1.0);
    let sw: Vec<f32> = values(c.n, 78, 1.0).iter().map(|x| 0.5 + x.abs()).collect();
    let z = 0.05f32;
    let mut lc = cfg(Reduction::None);
    lc.ce.z_loss = z;
    lc.ce.data.sample_weight = Some(sw.clone().into());
    let got = run(&c, true, |h, w, b, t| {
        let device = h.device();
        let rows = linear_cross_entropy(h, w, b, t, &lc).unwrap();
        (rows * t1(&up, &device)).sum()
    });
    let want = run(&c, true, |h, w, b, t| {
        let device = h.device();
        let mut logits = h.matmul(w.transpose());
        if let Some(b) = b {
            logits = logits + b.unsqueeze_dim(0);
        }
        let n = t.dims()[0];
        let keep: Vec<f32> = c.t.iter().map(|&y| if y == -100 { 0.0 } else { 1.0 }).collect();
        let safe = t.clone().clamp_min(0);
        let lse = burn::tensor::activation::log_softmax(logits.clone(), 1).neg() + logits.clone();
        let lse = lse.slice([0..n, 0..1]).reshape([n]);
        let zy = logits.gather(1, safe.reshape([n, 1])).reshape([n]);
        let rows = (lse.clone() - zy) * t1(&sw, &device) + lse.clone() * lse * z;
        (rows * t1(&keep, &device) * t1(&up, &device)).sum()
    });
    compare("none + z-loss", &got, &want);
}

#[test]
fn upstream_scalar_scales_the_gradients() {
    let c = case(17, 8, 60, 6);
    let got = run(&c, true, |h, w, b, t| linear_cross_entropy(h, w, b, t, &cfg(Reduction::Mean)).unwrap() * 2.5);
    let want = run(&c, true, |h, w, b, t| linear_cross_entropy(h, w, b, t, &cfg(Reduction::Mean)).unwrap());
    let x = |v: &[f32]| v.iter().map(|x| x * 2.5).collect::<Vec<f32>>();
    close("scaled d hidden", &got.gh, &x(&want.gh), 1e-6);
    close("scaled d weight", &got.gw, &x(&want.gw), 1e-6);
    close("scaled d bias", got.gb.as_ref().unwrap(), &x(want.gb.as_ref().unwrap()), 1e-6);
}

#[test]
fn only_tracked_inputs_get_gradients_and_flex_without_autodiff_works() {
    let c = case(9, 8, 30, 7);
    let device = Device::flex().autodiff();
    let h = t2(&c.h, [c.n, c.d], &device); // not tracked
    let w = t2(&c.w, [c.v, c.d], &device).require_grad();
    let loss = linear_cross_entropy(h.clone(), w.clone(), None, ti(&c.t, &device), &cfg(Reduction::Mean)).unwrap();
    let grads = loss.backward();
    assert!(h.grad(&grads).is_none());
    let want = burn_ref(&c, false, Reduction::Mean, None);
    close("weight only", &host(w.grad(&grads).unwrap()), &want.gw, 1e-4);
    // Plain Flex: the loss alone.
    let flex = Device::flex();
    let loss = linear_cross_entropy(
        t2(&c.h, [c.n, c.d], &flex),
        t2(&c.w, [c.v, c.d], &flex),
        None,
        ti(&c.t, &flex),
        &cfg(Reduction::Mean),
    )
    .unwrap();
    close("plain flex loss", &host(loss), &want.loss, 2e-5);
}

#[test]
fn with_grads_outside_autodiff() {
    let c = case(11, 8, 40, 8);
    let flex = Device::flex();
    let (loss, gh, gw, gb) = xent_burn::linear_cross_entropy_with_grads(
        t2(&c.h, [c.n, c.d], &flex),
        t2(&c.w, [c.v, c.d], &flex),
        Some(t1(&c.b, &flex)),
        ti(&c.t, &flex),
        &cfg(Reduction::Mean),
    )
    .unwrap();
    let want = burn_ref(&c, true, Reduction::Mean, None);
    let got = Out { loss: host(loss), gh: host(gh.unwrap()), gw: host(gw.unwrap()), gb: gb.map(host) };
    compare("with_grads", &got, &want);
}

#[test]
fn module_forward_backward_equals_linear_and_cross_entropy() {
    let (n, d, v) = (13, 16, 120);
    let device = Device::flex().autodiff();
    for bias in [true, false] {
        let head = LinearCrossEntropyConfig::new(d, v).with_bias(bias).init(&device);
        assert_eq!(head.weight.dims(), [v, d]);
        assert_eq!(head.bias.as_ref().map(|b| b.dims()), bias.then_some([v]));
        let c = case(n, d, v, 9);
        let h = t2(&c.h, [n, d], &device).require_grad();
        let loss = head.forward(h.clone(), ti(&c.t, &device)).unwrap();
        let grads = loss.backward();
        let got = Out {
            loss: host(loss),
            gh: host(h.grad(&grads).unwrap()),
            gw: host(head.weight.grad(&grads).unwrap()),
            gb: head.bias.as_ref().map(|b| host(b.grad(&grads).unwrap())),
        };
        // The same parameters through Burn's ops and loss.
        let h2 = t2(&c.h, [n, d], &device).require_grad();
        let logits = head.logits(h2.clone());
        let loss2 = CrossEntropyLossConfig::new().init(&device).forward(logits, ti(&c.t, &device));
        let grads2 = loss2.backward();
        let want = Out {
            loss: host(loss2),
            gh: host(h2.grad(&grads2).unwrap()),
            gw: host(head.weight.grad(&grads2).unwrap()),
            gb: head.bias.as_ref().map(|b| host(b.grad(&grads2).unwrap())),
        };
        compare(&format!("module bias={bias}"), &got, &want);
    }
    // Initialised as Burn's Linear: U(-1/sqrt(d), 1/sqrt(d)).
    let head = LinearCrossEntropyConfig::new(d, v).init(&device);
    let bound = 1.0 / (d as f32).sqrt();
    assert!(host(head.weight.val()).iter().all(|x| x.abs() <= bound));
}

/// Class weights from the module's config equal Burn's `CrossEntropyLoss` with the same
/// `weights`; sample weights (a Burn tensor) equal Burn's per-row composition.
#[test]
fn module_class_and_sample_weights_equal_burns() {
    let (n, d, v) = (11, 8, 40);
    let device = Device::flex().autodiff();
    let cw: Vec<f32> = values(v, 31, 1.0).iter().map(|x| 0.25 + x.abs()).collect();
    let head = LinearCrossEntropyConfig::new(d, v).with_weights(Some(cw.clone())).init(&device);
    let c = case(n, d, v, 12);
    let grads_of = |loss: Tensor<1>, h: Tensor<2>| {
        let g = loss.backward();
        Out {
            loss: host(loss),
            gh: host(h.grad(&g).unwrap()),
            gw: host(head.weight.grad(&g).unwrap()),
            gb: head.bias.as_ref().map(|b| host(b.grad(&g).unwrap())),
        }
    };
    let h = t2(&c.h, [n, d], &device).require_grad();
    let got = grads_of(head.forward(h.clone(), ti(&c.t, &device)).unwrap(), h);
    let h2 = t2(&c.h, [n, d], &device).require_grad();
    let logits = head.logits(h2.clone());
    let burn_loss = CrossEntropyLossConfig::new().with_weights(Some(cw.clone())).init(&device);
    let want = grads_of(burn_loss.forward(logits, ti(&c.t, &device)), h2);
    compare("class weights", &got, &want);
    // Sample weights: sum_n s_n cw_y ce_n / sum_n s_n cw_y.
    let sw: Vec<f32> = values(n, 32, 1.0).iter().map(|x| 0.5 + x.abs()).collect();
    let h = t2(&c.h, [n, d], &device).require_grad();
    let got = grads_of(head.forward_weighted(h.clone(), ti(&c.t, &device), t1(&sw, &device)).unwrap(), h);
    let h2 = t2(&c.h, [n, d], &device).require_grad();
    let logits = head.logits(h2.clone());
    let t = ti(&c.t, &device);
    let ce = -burn::tensor::activation::log_softmax(logits, 1).gather(1, t.reshape([n, 1])).reshape([n]);
    let w: Vec<f32> = c.t.iter().zip(&sw).map(|(&y, s)| s * cw[y as usize]).collect();
    let total: f32 = w.iter().sum();
    let want = grads_of((ce * t1(&w, &device)).sum() / total, h2);
    compare("sample weights", &got, &want);
    assert!(head.forward_weighted(t2(&c.h, [n, d], &device), ti(&c.t, &device), t1(&sw[1..], &device)).is_err());
}

#[test]
fn bf16_and_f16_inputs_get_gradients_in_their_dtype() {
    for dtype in [burn::tensor::DType::BF16, burn::tensor::DType::F16] {
        half_inputs(&Device::flex().autodiff(), dtype);
    }
}

/// Hidden and weight in `dtype` (an f32 bias beside them) on `device` (autodiff): gradients in
/// their own dtypes, close to the f32 run (the inputs rounded to 8 (bf16) or 11 (f16) bits).
fn half_inputs(device: &Device, dtype: burn::tensor::DType) {
    let c = case(19, 16, 70, 11);
    let want = xent_run(&c, true, &cfg(Reduction::Mean));
    let h = t2(&c.h, [c.n, c.d], device).cast(dtype).require_grad();
    let w = t2(&c.w, [c.v, c.d], device).cast(dtype).require_grad();
    let b = t1(&c.b, device).require_grad();
    let loss =
        linear_cross_entropy(h.clone(), w.clone(), Some(b.clone()), ti(&c.t, device), &cfg(Reduction::Mean)).unwrap();
    let grads = loss.backward();
    let (gh, gw, gb) = (h.grad(&grads).unwrap(), w.grad(&grads).unwrap(), b.grad(&grads).unwrap());
    assert_eq!((gh.dtype(), gw.dtype(), gb.dtype()), (dtype, dtype, burn::tensor::DType::F32), "{dtype:?}");
    close(&format!("{dtype:?} loss"), &host(loss), &want.loss, 2e-2);
    close(&format!("{dtype:?} d hidden"), &host(gh), &want.gh, 5e-2);
    close(&format!("{dtype:?} d weight"), &host(gw), &want.gw, 5e-2);
    close(&format!("{dtype:?} d bias"), &host(gb), want.gb.as_ref().unwrap(), 5e-2);
}

#[test]
fn bad_input_is_a_typed_error() {
    let c = case(6, 4, 10, 10);
    let device = Device::flex().autodiff();
    let h = t2(&c.h, [c.n, c.d], &device);
    let w = t2(&c.w, [c.v, c.d], &device);
    let t = ti(&c.t, &device);
    let m = cfg(Reduction::Mean);
    let wrong_w = Tensor::<2>::zeros([c.v, c.d + 1], &device);
    assert!(matches!(linear_cross_entropy(h.clone(), wrong_w, None, t.clone(), &m), Err(XentError::Shape(_))));
    let wrong_b = Tensor::<1>::zeros([c.v + 1], &device);
    assert!(matches!(
        linear_cross_entropy(h.clone(), w.clone(), Some(wrong_b), t.clone(), &m),
        Err(XentError::Shape(_))
    ));
    let short_t = ti(&c.t[..3], &device);
    assert!(matches!(linear_cross_entropy(h.clone(), w.clone(), None, short_t, &m), Err(XentError::Shape(_))));
    let mut bad_t = c.t.clone();
    bad_t[2] = c.v as i64;
    assert!(linear_cross_entropy(h.clone(), w.clone(), None, ti(&bad_t, &device), &m).is_err());
    let mut bad_cfg = m.clone();
    bad_cfg.ce.label_smoothing = 2.0;
    assert!(linear_cross_entropy(h.clone(), w.clone(), None, t.clone(), &bad_cfg).is_err());
    let mut bad_cfg = m.clone();
    bad_cfg.workspace_bytes = Some(0);
    assert!(matches!(linear_cross_entropy(h, w, None, t, &bad_cfg), Err(XentError::InvalidOption(_))));
}

/// On Burn's wgpu device (fusion, under autodiff) the composed path (Burn's products around
/// xent's fused kernel) equals the Flex path (xent's own CPU kernel, checked above against
/// Burn's composition) for every option it takes: reductions, bias or none, several chunks,
/// ignored rows, class weights with label smoothing, z-loss with softcap and temperature,
/// sample weights, a per-row upstream (with a z-loss), a scalar upstream, and a gradient scale;
/// and Burn's own composition on the same device; with no host transfer.
#[cfg(feature = "gpu")]
#[test]
fn wgpu_equals_flex_for_every_option() {
    let Some(gpu) = wgpu() else { return };
    let before = xent_burn::host_transfers();
    let mut c = case(45, 24, 301, 21);
    for r in (2..c.n).step_by(5) {
        c.t[r] = -100;
    }
    let sw: Vec<f32> = values(c.n, 31, 1.0).iter().map(|x| 0.5 + x.abs()).collect();
    let cw: Vec<f32> = values(c.v, 32, 1.0).iter().map(|x| 0.25 + x.abs()).collect();
    let up: Vec<f32> = values(c.n, 33, 1.0);
    let mut cases: Vec<(&str, bool, LinearCe)> = vec![
        ("mean", true, cfg(Reduction::Mean)),
        ("mean, no bias", false, cfg(Reduction::Mean)),
        ("sum", true, cfg(Reduction::Sum)),
    ];
    let mut chunked = cfg(Reduction::Mean);
    chunked.workspace_bytes = Some(7 * c.v * 4); // 7 rows a chunk: 7 chunks
    cases.push(("chunked", true, chunked));
    let mut smooth = cfg(Reduction::Mean);
    smooth.ce.class_weight = Some(cw.clone().into());
    smooth.ce.label_smoothing = 0.1;
    cases.push(("class weights + smoothing", true, smooth));
    let mut z = cfg(Reduction::Mean);
    z.ce.z_loss = 1e-2;
    z.ce.softcap = Some(5.0);
    z.ce.temperature = 1.5;
    z.ce.grad_scale = 0.5;
    cases.push(("z-loss + softcap + temperature + grad scale", true, z));
    for reduction in [Reduction::Mean, Reduction::Sum] {
        let mut w = cfg(reduction);
        w.ce.data.sample_weight = Some(sw.clone().into());
        w.ce.class_weight = Some(cw.clone().into());
        cases.push((if reduction == Reduction::Mean { "weights, mean" } else { "weights, sum" }, true, w));
    }
    for (what, bias, lc) in &cases {
        let f = |h, w, b, t| linear_cross_entropy(h, w, b, t, lc).expect("linear_cross_entropy") * 1.5;
        let want = run(&c, *bias, f);
        let got = run_on(&gpu.clone().autodiff(), &c, *bias, f);
        compare_tol(what, &got, &want, 1e-4, 2e-4);
    }
    // Reduction none, a per-row upstream (with a z-loss and class weights: still one split).
    let mut none = cfg(Reduction::None);
    none.ce.z_loss = 1e-2;
    none.ce.class_weight = Some(cw.clone().into());
    let f = |h: Tensor<2>, w, b, t| {
        let device = h.device();
        (linear_cross_entropy(h, w, b, t, &none).expect("none") * t1(&up, &device)).sum()
    };
    compare_tol("none + upstream", &run_on(&gpu.clone().autodiff(), &c, true, f), &run(&c, true, f), 1e-4, 2e-4);
    // The per-row losses themselves, outside autodiff.
    let rows = |d: &Device| {
        let (h, w, b, t) = (t2(&c.h, [c.n, c.d], d), t2(&c.w, [c.v, c.d], d), t1(&c.b, d), ti(&c.t, d));
        host(linear_cross_entropy(h, w, Some(b), t, &none).expect("rows"))
    };
    close("none rows", &rows(&gpu), &rows(&Device::flex()), 1e-4);
    // And against Burn's own composition on the same wgpu device (`matmul` + `CrossEntropyLoss`).
    let plain = case(40, 16, 230, 22);
    for reduction in [Reduction::Mean, Reduction::Sum] {
        for bias in [true, false] {
            let want = burn_ref_on(&gpu.clone().autodiff(), &plain, bias, reduction, None);
            let f = |h, w, b, t| linear_cross_entropy(h, w, b, t, &cfg(reduction)).expect("linear_cross_entropy");
            let got = run_on(&gpu.clone().autodiff(), &plain, bias, f);
            compare_tol(&format!("Burn's own, wgpu, {reduction:?} bias={bias}"), &got, &want, 1e-4, 2e-4);
        }
    }
    assert_eq!(xent_burn::host_transfers(), before, "the wgpu path moved logits or a gradient through the host");
}

/// Half-precision operands on wgpu: gradients in their dtype, close to the f32 ones. (f16 only:
/// Burn 0.22's WGSL compiler has no bf16 type, so no Burn wgpu tensor is bf16.)
#[cfg(feature = "gpu")]
#[test]
fn wgpu_f16_inputs() {
    let Some(gpu) = wgpu() else { return };
    half_inputs(&gpu.autodiff(), burn::tensor::DType::F16);
}

/// What the wgpu path cannot express is a typed error before anything runs; the gradients
/// outside autodiff (`linear_cross_entropy_with_grads`) equal Flex's.
#[cfg(feature = "gpu")]
#[test]
fn wgpu_errors_and_grads_outside_autodiff() {
    let Some(gpu) = wgpu() else { return };
    let c = case(13, 8, 40, 12);
    let (h, w, b, t) = (t2(&c.h, [c.n, c.d], &gpu), t2(&c.w, [c.v, c.d], &gpu), t1(&c.b, &gpu), ti(&c.t, &gpu));
    let mut both = cfg(Reduction::Mean);
    both.ce.z_loss = 1e-3;
    both.ce.data.sample_weight = Some(vec![1.0; c.n].into());
    match linear_cross_entropy(h.clone(), w.clone(), None, t.clone(), &both) {
        Err(XentError::InvalidOption(m)) => assert!(m.contains("z_loss"), "{m}"),
        other => panic!("expected InvalidOption, got {other:?}"),
    }
    let wrong_w = Tensor::<2>::zeros([c.v, c.d + 1], &gpu);
    assert!(matches!(
        linear_cross_entropy(h.clone(), wrong_w, None, t.clone(), &cfg(Reduction::Mean)),
        Err(XentError::Shape(_))
    ));
    let flex = Device::flex();
    let on = |d: &Device| {
        let (h, w, b, t) = (t2(&c.h, [c.n, c.d], d), t2(&c.w, [c.v, c.d], d), t1(&c.b, d), ti(&c.t, d));
        let (l, gh, gw, gb) =
            xent_burn::linear_cross_entropy_with_grads(h, w, Some(b), t, &cfg(Reduction::Sum)).unwrap();
        Out { loss: host(l), gh: host(gh.unwrap()), gw: host(gw.unwrap()), gb: Some(host(gb.unwrap())) }
    };
    drop((h, w, b, t));
    compare_tol("with grads", &on(&gpu), &on(&flex), 1e-4, 2e-4);
}

/// The plain cube backend (no fusion wrapper), through Burn's backend trait directly: the
/// trait's default (composed) method, against Flex.
#[cfg(feature = "gpu")]
#[test]
fn wgpu_plain_cube_backend_without_fusion() {
    use burn::backend::ops::{FloatTensorOps, IntTensorOps};
    use burn::backend::DispatchDevice;
    use burn_cubecl::CubeBackend;
    use xent_burn::{XentLinearArgs, XentLinearOps};
    let Some(gpu) = wgpu() else { return };
    let DispatchDevice::Cube(cube) = gpu.as_dispatch() else { panic!("a cube device") };
    let mut c = case(23, 16, 130, 14);
    c.t[5] = -100;
    let mut lc = cfg(Reduction::Mean);
    lc.ce.label_smoothing = 0.1;
    lc.workspace_bytes = Some(6 * c.v * 4);
    let f = |x: &[f32], shape: Vec<usize>| CubeBackend::float_from_data(TensorData::new(x.to_vec(), shape), cube);
    // The case's operands through the trait, with the options `lc`.
    let with_grads = |lc: &LinearCe| {
        CubeBackend::xent_linear_cross_entropy_with_grads(
            f(&c.h, vec![c.n, c.d]),
            f(&c.w, vec![c.v, c.d]),
            f(&c.b, vec![c.v]),
            CubeBackend::int_from_data(TensorData::new(c.t.clone(), [c.n]), cube),
            f(&[], vec![0]),
            XentLinearArgs::new(lc),
        )
    };
    let (loss, gh, gw, gb) = with_grads(&lc);
    let read = |p| burn_cubecl::ops::into_data_sync(p).convert::<f32>().try_to_vec::<f32>().unwrap();
    let got = Out { loss: read(loss), gh: read(gh.unwrap()), gw: read(gw.unwrap()), gb: Some(read(gb.unwrap())) };
    let d = Device::flex();
    let (h, w, b, t) = (t2(&c.h, [c.n, c.d], &d), t2(&c.w, [c.v, c.d], &d), t1(&c.b, &d), ti(&c.t, &d));
    let (l, gh, gw, gb) = xent_burn::linear_cross_entropy_with_grads(h, w, Some(b), t, &lc).unwrap();
    let want = Out { loss: host(l), gh: host(gh.unwrap()), gw: host(gw.unwrap()), gb: Some(host(gb.unwrap())) };
    compare_tol("plain cube", &got, &want, 1e-4, 2e-4);
    // What the composition cannot express, reached through the trait (no public check): NaN
    // outputs and the error waiting in take_error, never wrong numbers.
    let mut both = lc.clone();
    both.ce.z_loss = 1e-3;
    both.ce.data.sample_weight = Some(vec![1.0; c.n].into());
    let (loss, gh, _, _) = with_grads(&both);
    assert!(read(loss)[0].is_nan() && read(gh.unwrap()).iter().all(|x| x.is_nan()));
    assert!(matches!(xent_burn::take_error(), Some(XentError::InvalidOption(m)) if m.contains("z_loss")));
}
