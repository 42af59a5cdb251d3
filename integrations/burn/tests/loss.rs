//! xent's Burn loss against Burn's own `CrossEntropyLoss`, the f64 reference and PyTorch's
//! golden values, on Flex (CPU) and on wgpu (lavapipe in CI, Burn's fusion wrapper and the plain
//! cube backend), with the host transfers of the wgpu path counted.

mod common;
#[path = "../../../tests/common/golden_ce.rs"]
mod golden_ce;

use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;
use common::devices;
#[cfg(feature = "gpu")]
use common::wgpu;
use ndarray::Array2;
use xent::cpu::reference;
use xent::{CrossEntropy, Reduction};

fn logits_of(x: &Array2<f32>, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(x.iter().copied().collect::<Vec<f32>>(), [x.nrows(), x.ncols()]), device)
}

fn targets_of(t: &[i64], device: &Device) -> Tensor<1, Int> {
    Tensor::from_data(TensorData::new(t.to_vec(), [t.len()]), device)
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// xent's loss and gradient under autodiff (the gradient of the sum for reduction `none`).
fn xent_loss_grad(x: &Array2<f32>, t: &[i64], cfg: &CrossEntropy, device: &Device) -> (Vec<f32>, Vec<f32>) {
    let device = device.clone().autodiff();
    let logits = logits_of(x, &device).require_grad();
    let loss = xent_burn::cross_entropy(logits.clone(), targets_of(t, &device), cfg).unwrap();
    let grads = loss.clone().sum().backward();
    (host(loss), host(logits.grad(&grads).unwrap()))
}

fn max_diff(a: &[f32], b: impl IntoIterator<Item = f64>) -> f64 {
    a.iter().zip(b).fold(0.0, |m, (&x, y)| m.max((x as f64 - y).abs()))
}

/// Burn's `CrossEntropyLoss` with pad tokens is PyTorch's `ignore_index` set to the pad class.
#[test]
fn equals_burns_own_cross_entropy_with_pad_rows_and_smoothing() {
    let (n, v, pad) = (48, 700, 3usize);
    let (x, t) = xent::workload::synthetic(n, v, 3.0, 0, 11);
    let mut t = t.to_vec();
    for i in (0..n).step_by(5) {
        t[i] = pad as i64;
    }
    for (name, device) in devices() {
        for smoothing in [None, Some(0.1f32)] {
            let ad = device.clone().autodiff();
            let logits = logits_of(&x, &ad).require_grad();
            let mut burn_cfg = CrossEntropyLossConfig::new().with_pad_tokens(Some(vec![pad]));
            if let Some(s) = smoothing {
                burn_cfg = burn_cfg.with_smoothing(Some(s));
            }
            let theirs = burn_cfg.init(&ad).forward(logits.clone(), targets_of(&t, &ad));
            let g = theirs.backward();
            let (loss_ref, grad_ref) = (host(theirs)[0], host(logits.grad(&g).unwrap()));
            let cfg =
                CrossEntropy::default().with_ignore_index(pad as i64).with_label_smoothing(smoothing.unwrap_or(0.0));
            let (loss, grad) = xent_loss_grad(&x, &t, &cfg, &device);
            assert!(
                (loss[0] - loss_ref).abs() <= 2e-6 * loss_ref.abs(),
                "{name} {smoothing:?}: {} vs Burn {loss_ref}",
                loss[0]
            );
            let worst = max_diff(&grad, grad_ref.iter().map(|&g| g as f64));
            assert!(worst < 2e-7, "{name} {smoothing:?}: gradients differ by {worst}");
        }
    }
}

#[test]
fn pytorch_golden_cases() {
    for (name, device) in devices() {
        let mut ran = 0;
        for case in golden_ce::cases() {
            let x = Array2::from_shape_fn((case.rows, case.classes), |(i, j)| case.logits[i * case.classes + j] as f32);
            let (loss, grad) = xent_loss_grad(&x, &case.targets, &case.cfg, &device);
            assert_eq!(loss.len(), case.loss.len(), "{name} {}", case.name);
            for (&got, &want) in loss.iter().zip(&case.loss) {
                assert!(golden_ce::close(got as f64, want, 2e-6, 2e-6), "{name} {}: loss {got} vs {want}", case.name);
            }
            if let Some(want) = &case.grad {
                for (&a, &b) in grad.iter().zip(want) {
                    assert!(golden_ce::close(a as f64, b, 2e-5, 1e-7), "{name} {}: gradient {a} vs {b}", case.name);
                }
            } else {
                // All-ignored batches: no gradient in the golden set; every row is ignored.
                assert!(grad.iter().all(|&g| g == 0.0), "{name} {}: ignored rows have zero gradient", case.name);
            }
            ran += 1;
        }
        assert!(ran >= 50, "{name}: only {ran} golden cases");
    }
}

#[test]
fn options_match_the_f64_reference() {
    let (n, v) = (37, 513);
    let (x, t) = xent::workload::synthetic(n, v, 4.0, 6, 5);
    let t = t.to_vec();
    let cw = ndarray::Array1::from_shape_fn(v, |c| 0.5 + (c % 7) as f32 * 0.1);
    let sw = ndarray::Array1::from_shape_fn(n, |i| 0.25 + (i % 5) as f32 * 0.5);
    let configs = [
        CrossEntropy::default().with_sample_weight(sw.clone()).with_class_weight(cw.clone()),
        CrossEntropy::default().with_z_loss(1e-3).with_softcap(6.0).with_temperature(1.5),
        CrossEntropy::default().with_reduction(Reduction::Sum).with_label_smoothing(0.2).with_grad_scale(0.5),
        CrossEntropy::default().with_reduction(Reduction::None).with_class_weight(cw).with_label_smoothing(0.05),
    ];
    for (name, device) in devices() {
        for cfg in &configs {
            let r = reference::cross_entropy(&x, &t[..], cfg).unwrap();
            let (loss, grad) = xent_loss_grad(&x, &t, cfg, &device);
            let want: Vec<f64> = if cfg.reduction == Reduction::None { r.row_loss.to_vec() } else { vec![r.loss] };
            for (&a, &b) in loss.iter().zip(&want) {
                assert!(golden_ce::close(a as f64, b, 3e-6, 1e-6), "{name} {cfg:?}: loss {a} vs {b}");
            }
            let worst = max_diff(&grad, r.grad.iter().copied());
            assert!(worst < 2e-7, "{name} {cfg:?}: gradient off by {worst}");
        }
    }
}

#[test]
fn all_ignored_batch_and_out_of_range_targets() {
    let x = Array2::from_shape_fn((4, 9), |(i, j)| (i * 9 + j) as f32 * 0.05);
    for (name, device) in devices() {
        let (loss, grad) = xent_loss_grad(&x, &[-100; 4], &CrossEntropy::default(), &device);
        assert!(loss[0].is_nan(), "{name}: an all-ignored mean is NaN, as in PyTorch");
        assert!(grad.iter().all(|&g| g == 0.0), "{name}: ignored rows have zero gradient");
        let (loss, _) =
            xent_loss_grad(&x, &[-100; 4], &CrossEntropy::default().with_reduction(Reduction::Sum), &device);
        assert_eq!(loss[0], 0.0, "{name}: an all-ignored sum is 0");

        let ad = device.clone().autodiff();
        let bad =
            xent_burn::cross_entropy(logits_of(&x, &ad), targets_of(&[0, 9, 1, 2], &ad), &CrossEntropy::default());
        if name == "flex" {
            // On the CPU the targets are at hand: a typed error.
            assert!(matches!(bad, Err(xent::XentError::TargetOutOfRange { .. })), "{name}: {bad:?}");
        } else {
            // On a GPU a check would need a sync: the loss is NaN instead of a plausible number.
            assert!(host(bad.unwrap())[0].is_nan(), "{name}: an out-of-range target gives NaN");
        }
        let short = xent_burn::cross_entropy(logits_of(&x, &ad), targets_of(&[0, 1], &ad), &CrossEntropy::default());
        assert!(matches!(short, Err(xent::XentError::Shape(_))), "{name}: {short:?}");
        let sw = CrossEntropy::default().with_sample_weight(ndarray::Array1::ones(3));
        assert!(xent_burn::cross_entropy(logits_of(&x, &ad), targets_of(&[0, 1, 2, 3], &ad), &sw).is_err());
        let eps = CrossEntropy::default().with_label_smoothing(1.5);
        assert!(xent_burn::cross_entropy(logits_of(&x, &ad), targets_of(&[0, 1, 2, 3], &ad), &eps).is_err());
    }
}

/// Half-precision logits: arithmetic in f32, the gradient in the logits' dtype.
#[test]
fn bf16_and_f16_logits_on_flex() {
    let (x, t) = xent::workload::synthetic(16, 300, 3.0, 2, 3);
    let t = t.to_vec();
    let device = Device::flex().autodiff();
    for dtype in [burn::tensor::DType::BF16, burn::tensor::DType::F16] {
        let logits = logits_of(&x, &device).cast(dtype).require_grad();
        let rounded = Array2::from_shape_vec((16, 300), host(logits.clone().inner())).unwrap();
        let loss = xent_burn::cross_entropy(logits.clone(), targets_of(&t, &device), &CrossEntropy::default()).unwrap();
        assert_eq!(loss.dtype(), dtype);
        let grads = loss.clone().backward();
        let g = logits.grad(&grads).unwrap();
        assert_eq!(g.dtype(), dtype);
        let r = reference::cross_entropy(&rounded, &t[..], &CrossEntropy::default()).unwrap();
        let tol = if dtype == burn::tensor::DType::BF16 { 1e-2 } else { 1e-3 };
        assert!((host(loss)[0] as f64 - r.loss).abs() <= tol * r.loss, "{dtype:?} loss");
        // One rounding of an f32 gradient: within half an ulp of the value's dtype.
        let worst = host(g)
            .iter()
            .zip(r.grad.iter())
            .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b).abs() / b.abs().max(1e-3)));
        assert!(
            worst < if dtype == burn::tensor::DType::BF16 { 4e-3 } else { 5e-4 },
            "{dtype:?} gradient off by {worst}"
        );
    }
}

/// Logits that start inside a larger buffer (a row slice of a bigger tensor) and a strided view
/// (a transposed tensor, made contiguous first).
#[test]
fn sliced_and_strided_logits() {
    let (x, t) = xent::workload::synthetic(30, 200, 3.0, 4, 8);
    let t = t.to_vec();
    let r = reference::cross_entropy(&x.slice(ndarray::s![7..23, ..]).to_owned(), &t[7..23], &CrossEntropy::default())
        .unwrap();
    for (name, device) in devices() {
        let whole = logits_of(&x, &device);
        let part = whole.clone().slice([7..23, 0..200]);
        let loss = xent_burn::cross_entropy(part, targets_of(&t[7..23], &device), &CrossEntropy::default()).unwrap();
        assert!((host(loss)[0] as f64 - r.loss).abs() < 2e-6 * r.loss, "{name}: row slice");
        let tr = logits_of(&x.t().to_owned(), &device).transpose();
        let loss = xent_burn::cross_entropy(tr, targets_of(&t, &device), &CrossEntropy::default()).unwrap();
        let full = reference::cross_entropy(&x, &t[..], &CrossEntropy::default()).unwrap();
        assert!((host(loss)[0] as f64 - full.loss).abs() < 2e-6 * full.loss, "{name}: transposed view");
    }
}

/// Several training steps on Burn's wgpu device: the logits and gradient never leave the device
/// (xent's counters show no readback; the only uploads are the plans' parameter blocks), and
/// the host fallback is never taken.
#[cfg(feature = "gpu")]
#[test]
fn wgpu_steps_move_no_logits_or_gradients_through_the_host() {
    let Some(device) = wgpu() else { return };
    let ad = device.clone().autodiff();
    let (n, v) = (256, 4096);
    let (x, t) = xent::workload::synthetic(n, v, 3.0, 0, 1);
    let targets = targets_of(&t.to_vec(), &ad);
    let mut w = logits_of(&x, &ad).require_grad();
    let fallback = xent_burn::host_transfers();
    // The first step compiles pipelines and uploads the plan's parameters.
    let step = |w: Tensor<2>| {
        let loss = xent_burn::cross_entropy(w.clone(), targets.clone(), &CrossEntropy::default()).unwrap();
        let grads = loss.backward();
        (w.clone().inner() - w.grad(&grads).unwrap() * 100.0).autodiff().require_grad()
    };
    w = step(w);
    let before = xent_burn::shared_counters(&device).expect("a shared device");
    for _ in 0..5 {
        w = step(w);
    }
    let after = xent_burn::shared_counters(&device).unwrap();
    assert_eq!(after.bytes_to_host, before.bytes_to_host, "no readback from xent");
    assert!(
        after.bytes_to_device - before.bytes_to_device < 4096,
        "only parameter blocks uploaded: {before:?} -> {after:?}"
    );
    assert_eq!(xent_burn::host_transfers(), fallback, "the host path was not taken");
    // Training lowered the loss (the steps ran, in order, on the device).
    let final_loss = host(xent_burn::cross_entropy(w.inner(), targets.inner(), &CrossEntropy::default()).unwrap())[0];
    let first = reference::cross_entropy(&x, t.view(), &CrossEntropy::default()).unwrap().loss;
    assert!((final_loss as f64) < first * 0.9, "loss {first} -> {final_loss}");
}

/// The plain cube backend (no fusion wrapper), reached through Burn's backend trait directly.
#[cfg(feature = "gpu")]
#[test]
fn plain_cube_backend_without_fusion() {
    use burn::backend::ops::{FloatTensorOps, IntTensorOps};
    use burn::backend::DispatchDevice;
    use burn_cubecl::CubeBackend;
    use xent_burn::{XentArgs, XentOps};
    let Some(device) = wgpu() else { return };
    let DispatchDevice::Cube(cube) = device.as_dispatch() else { panic!("a cube device") };
    let (x, t) = xent::workload::synthetic(20, 333, 3.0, 3, 4);
    let logits =
        CubeBackend::float_from_data(TensorData::new(x.iter().copied().collect::<Vec<f32>>(), [20, 333]), cube);
    let targets = CubeBackend::int_from_data(TensorData::new(t.to_vec(), [20]), cube);
    let cfg = CrossEntropy::default().with_label_smoothing(0.1);
    let (loss, grad) = CubeBackend::xent_cross_entropy_with_grad(logits, targets, XentArgs::new(&cfg));
    let read = |p| burn_cubecl::ops::into_data_sync(p).convert::<f32>().try_to_vec::<f32>().unwrap();
    let r = reference::cross_entropy(&x, t.view(), &cfg).unwrap();
    assert!((read(loss)[0] as f64 - r.loss).abs() < 2e-6 * r.loss, "{:?}", xent_burn::take_error());
    assert!(max_diff(&read(grad), r.grad.iter().copied()) < 2e-7);
}
