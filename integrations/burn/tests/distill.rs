//! xent-burn's distillation on Flex and on wgpu (lavapipe in CI; Burn's fusion wrapper and the
//! plain cube backend) against xent's f64 reference (checked against PyTorch's goldens) and
//! against the divergence composed from Burn's own ops; the upstream gradient of per-row
//! losses; no host round trip on wgpu; and the errors.

mod common;

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::FloatDType;
use common::*;
use ndarray::Array2;
use xent::{Distill, DistillMode, Reduction, XentError};

fn array(x: &[f32], n: usize, v: usize) -> Array2<f32> {
    Array2::from_shape_vec((n, v), x.to_vec()).unwrap()
}

fn rel(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-30);
    got.iter().zip(want).fold(0.0f64, |m, (&g, w)| m.max((g as f64 - w).abs() / scale))
}

#[test]
fn equals_the_f64_reference_on_every_device_dtype_and_reduction() {
    let (n, v) = (19, 611);
    // The upstream gradient of per-row losses: a mask with a padded row, and other weights.
    let up: Vec<f32> = (0..n).map(|r| if r == 2 { 0.0 } else { 0.5 + (r % 4) as f32 }).collect();
    for (name, device) in devices() {
        let ad = device.clone().autodiff();
        // Burn 0.22's WGSL compiler has no bf16 type: no Burn wgpu tensor is bf16.
        let dtypes = if name == "flex" {
            [
                (FloatDType::F32, FloatDType::F32),
                (FloatDType::BF16, FloatDType::BF16),
                (FloatDType::F16, FloatDType::F32),
            ]
        } else {
            [(FloatDType::F32, FloatDType::F32), (FloatDType::F16, FloatDType::F32), (FloatDType::F32, FloatDType::F16)]
        };
        for (sd, td) in dtypes {
            let s = t2(&values(n * v, 1, 5.0), [n, v], &ad).cast(sd);
            let t = t2(&values(n * v, 2, 5.0), [n, v], &ad).cast(td);
            // The reference reads the same rounded values.
            let (s_host, t_host) = (array(&host(s.clone()), n, v), array(&host(t.clone()), n, v));
            for mode in [DistillMode::Kl, DistillMode::ReverseKl, DistillMode::Jsd { beta: 0.3 }] {
                for temperature in [1.0f32, 2.0] {
                    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                        let cfg =
                            Distill::default().with_temperature(temperature).with_mode(mode).with_reduction(reduction);
                        let what = format!("{name} {sd:?}/{td:?} {mode:?} T={temperature} {reduction:?}");
                        // The f64 reference (held to PyTorch's goldens).
                        let want = xent::cpu::reference::distill(&s_host, &t_host, &cfg, true).unwrap();
                        let student = s.clone().require_grad();
                        let loss = xent_burn::distill(student.clone(), t.clone(), &cfg).unwrap();
                        assert_eq!(loss.dtype(), sd.into(), "{what}: the loss in the student's dtype");
                        let t2x = (temperature * temperature) as f64;
                        let (want_loss, objective, k): (Vec<f64>, Tensor<1>, Vec<f64>) = match reduction {
                            Reduction::None => (
                                want.row_loss.iter().map(|&d| t2x * d as f64).collect(),
                                loss.clone() * t1(&up, &ad).cast(sd),
                                up.iter().map(|&u| u as f64).collect(),
                            ),
                            _ => (vec![want.loss], loss.clone() * 3.0, vec![3.0; n]),
                        };
                        // f32: the f32 paths of the CPU and the GPU (docs/accuracy.md: each
                        // entry carries about 2^-24 (|z| + |lse|) of its size, and |lse| is
                        // about 7 here), within 5e-6 of the largest entry; 16-bit: the gradient is
                        // rounded to the dtype and multiplied by the upstream gradient in it,
                        // two roundings of 2^-8 (bf16's unit roundoff).
                        let (tol_loss, tol_grad) = match sd {
                            FloatDType::F32 => (1e-5, 5e-6),
                            _ => (4e-3, 8e-3),
                        };
                        let e = rel(&host(loss), &want_loss);
                        assert!(e <= tol_loss, "{what}: loss off by {e:.2e} ({:?})", xent_burn::take_error());
                        let g = student.grad(&objective.sum().backward()).expect("a gradient");
                        assert_eq!(g.dtype(), sd.into(), "{what}: the gradient in the student's dtype");
                        let wg = want.grad.unwrap();
                        let wg: Vec<f64> = wg.indexed_iter().map(|((r, _), &x)| k[r] * x as f64).collect();
                        let g = host(g);
                        let e = rel(&g, &wg);
                        assert!(e <= tol_grad, "{what}: gradient off by {e:.2e} of its largest entry");
                        if reduction == Reduction::None {
                            assert!(g[2 * v..3 * v].iter().all(|&x| x == 0.0), "{what}: the masked row has a gradient");
                        }
                    }
                }
            }
        }
    }
}

/// The same divergences composed from Burn's own ops (two log-softmaxes, exp, products, a
/// sum) and differentiated by Burn's autodiff.
#[test]
fn equals_burns_own_composition() {
    let (n, v) = (12, 257);
    for (name, device) in devices() {
        let ad = device.clone().autodiff();
        let s = t2(&values(n * v, 3, 4.0), [n, v], &ad);
        let t = t2(&values(n * v, 4, 4.0), [n, v], &ad);
        for mode in [DistillMode::Kl, DistillMode::ReverseKl, DistillMode::Jsd { beta: 0.7 }] {
            let tau = 1.5f32;
            let cfg = Distill::default().with_temperature(tau).with_mode(mode);
            let what = format!("{name} {mode:?}");
            let ours = s.clone().require_grad();
            let loss = xent_burn::distill(ours.clone(), t.clone(), &cfg).unwrap();
            let g_ours = host(ours.grad(&loss.clone().backward()).unwrap());

            let theirs = s.clone().require_grad();
            let (ls, lt) = (log_softmax(theirs.clone() / tau, 1), log_softmax(t.clone() / tau, 1));
            let kl = |lp: Tensor<2>, lq: Tensor<2>| (lp.clone().exp() * (lp - lq)).sum_dim(1);
            let d = match mode {
                DistillMode::Kl => kl(lt, ls),
                DistillMode::ReverseKl => kl(ls, lt),
                DistillMode::Jsd { beta } => {
                    let lm = (lt.clone().exp() * beta + ls.clone().exp() * (1.0 - beta)).log();
                    kl(lt, lm.clone()) * beta + kl(ls, lm) * (1.0 - beta)
                }
                _ => unreachable!("a mode this test does not know"),
            };
            let composed = d.mean() * (tau * tau);
            let g_theirs = host(theirs.grad(&composed.clone().backward()).unwrap());
            let (a, b) = (host(loss)[0], host(composed)[0]);
            assert!((a - b).abs() <= 1e-5 * b.abs(), "{what}: loss {a} vs Burn's {b}");
            let e = rel(&g_ours, &g_theirs.iter().map(|&x| x as f64).collect::<Vec<_>>());
            assert!(e <= 1e-5, "{what}: gradient off by {e:.2e} of Burn's largest entry");
        }
    }
}

/// A training loop on wgpu: distillation steps move nothing between device and host and
/// bring the student to the teacher.
#[cfg(feature = "gpu")]
#[test]
fn wgpu_distillation_steps_stay_on_the_device() {
    let Some(device) = wgpu() else { return };
    let ad = device.clone().autodiff();
    let (n, v) = (64, 3000);
    let teacher = t2(&values(n * v, 5, 4.0), [n, v], &ad);
    let mut w = t2(&values(n * v, 6, 4.0), [n, v], &ad).require_grad();
    // Summed over rows: a gradient of T (p_s - p_t) per entry.
    let cfg = Distill::default().with_temperature(2.0).with_reduction(Reduction::Sum);
    let step = |w: Tensor<2>| {
        let loss = xent_burn::distill(w.clone(), teacher.clone(), &cfg).unwrap();
        let g = w.grad(&loss.backward()).unwrap();
        (w.clone().inner() - g * 500.0).autodiff().require_grad()
    };
    let first = host(xent_burn::distill(w.clone().inner(), teacher.clone().inner(), &cfg).unwrap())[0];
    w = step(w);
    let fallback = xent_burn::host_transfers();
    let before = xent_burn::shared_counters(&device).expect("a shared device");
    for _ in 0..5 {
        w = step(w);
    }
    let after = xent_burn::shared_counters(&device).unwrap();
    assert_eq!(after.bytes_to_host, before.bytes_to_host, "no readback from xent");
    assert!(after.bytes_to_device - before.bytes_to_device < 4096, "{before:?} -> {after:?}");
    assert_eq!(xent_burn::host_transfers(), fallback, "the host path was not taken");
    let last = host(xent_burn::distill(w.inner(), teacher.inner(), &cfg).unwrap())[0];
    assert!(last < 0.5 * first, "distillation loss {first} -> {last}");
}

/// The plain cube backend (no fusion wrapper), through Burn's backend trait directly.
#[cfg(feature = "gpu")]
#[test]
fn plain_cube_backend_without_fusion() {
    use burn::backend::ops::FloatTensorOps;
    use burn::backend::DispatchDevice;
    use burn_cubecl::CubeBackend;
    use xent_burn::{XentDistillArgs, XentDistillOps};
    let Some(device) = wgpu() else { return };
    let DispatchDevice::Cube(cube) = device.as_dispatch() else { panic!("a cube device") };
    let (n, v) = (21, 345);
    let (s, t) = (values(n * v, 7, 3.0), values(n * v, 8, 3.0));
    let up = |x: &[f32]| CubeBackend::float_from_data(TensorData::new(x.to_vec(), [n, v]), cube);
    let read = |p| burn_cubecl::ops::into_data_sync(p).convert::<f32>().try_to_vec::<f32>().unwrap();
    for reduction in [Reduction::Mean, Reduction::None] {
        let cfg = Distill::default().with_mode(DistillMode::ReverseKl).with_temperature(3.0).with_reduction(reduction);
        let (loss, grad) = CubeBackend::xent_distill_with_grad(up(&s), up(&t), XentDistillArgs::new(&cfg));
        let want = xent::Cpu::new().distill_with_grad(&array(&s, n, v), &array(&t, n, v), &cfg).unwrap();
        let want_loss: Vec<f64> = match reduction {
            Reduction::None => want.row_loss.iter().map(|&d| 9.0 * d as f64).collect(),
            _ => vec![want.loss],
        };
        let e = rel(&read(loss), &want_loss);
        assert!(e <= 1e-5, "{reduction:?}: loss off by {e:.2e} ({:?})", xent_burn::take_error());
        let e = rel(&read(grad), &want.grad.unwrap().iter().map(|&x| x as f64).collect::<Vec<_>>());
        assert!(e <= 2e-6, "{reduction:?}: gradient off by {e:.2e}");
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    for (name, device) in devices() {
        let ad = device.clone().autodiff();
        let s = t2(&values(40, 1, 3.0), [4, 10], &ad).require_grad();
        let t = t2(&values(40, 2, 3.0), [4, 10], &ad);
        let is = |r: Result<Tensor<1>, XentError>, f: fn(&XentError) -> bool, what: &str| {
            let e = r.expect_err(what);
            assert!(f(&e), "{name} {what}: {e}");
            println!("{name} {what}: {e}");
        };
        is(
            xent_burn::distill(s.clone(), t.clone().require_grad(), &Distill::default()),
            |e| matches!(e, XentError::InvalidOption(m) if m.contains("detach")),
            "a tracked teacher",
        );
        // A teacher computed from tracked tensors, detached (Burn's `detach` keeps a leaf's
        // `require_grad`, so the teacher is an intermediate here, as a model's output is).
        let computed = t.clone().require_grad() * 2.0;
        assert!(computed.is_tracked());
        assert!(xent_burn::distill(s.clone(), computed.detach(), &Distill::default()).is_ok());
        is(
            xent_burn::distill(s.clone(), t2(&values(44, 2, 3.0), [4, 11], &ad), &Distill::default()),
            |e| matches!(e, XentError::Shape(_)),
            "a teacher of another shape",
        );
        is(
            xent_burn::distill(s.clone(), t.clone(), &Distill::default().with_temperature(-1.0)),
            |e| matches!(e, XentError::InvalidOption(m) if m.contains("temperature")),
            "temperature -1",
        );
        if name == "flex" {
            is(
                xent_burn::distill(s.clone(), t.clone().cast(FloatDType::F64), &Distill::default()),
                |e| matches!(e, XentError::InvalidOption(m) if m.contains("f32, f16 and bf16")),
                "f64 teacher logits",
            );
        }
        if let (Some(gpu), "flex") = (wgpu(), name) {
            is(
                xent_burn::distill(s.clone(), t2(&values(40, 2, 3.0), [4, 10], &gpu.autodiff()), &Distill::default()),
                |e| matches!(e, XentError::InvalidOption(m) if m.contains("different devices")),
                "teacher on another device",
            );
        }
    }
}
