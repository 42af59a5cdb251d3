//! The recorded, device-resident path: plans record into the caller's encoder, logits and
//! gradient stay on the GPU, nothing is re-allocated or recompiled on repeated calls; the
//! context is a well-behaved guest on a user's device; the pool stays bounded.
#![cfg(feature = "gpu")]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use ndarray::Array2;
use wgpu::util::DeviceExt;
use xent::cpu::reference;
use xent::*;

fn storage(g: &GpuContext, data: &[u8]) -> wgpu::Buffer {
    g.device().create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: data,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
    })
}

fn read_back(g: &GpuContext, buf: &wgpu::Buffer, offset: u64, len: u64) -> Vec<f32> {
    let staging = g.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: len,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = g.device().create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(buf, offset, &staging, 0, len);
    g.queue().submit([enc.finish()]);
    staging.map_async(wgpu::MapMode::Read, .., |r| r.unwrap());
    g.device().poll(wgpu::PollType::wait_indefinitely()).unwrap();
    let v = bytemuck::cast_slice(&staging.get_mapped_range(..).unwrap()).to_vec();
    v
}

fn i32s(t: &ndarray::Array1<i64>) -> Vec<i32> {
    t.iter().map(|&y| y as i32).collect()
}

#[test]
fn recorded_gradient_separate_and_in_place() {
    let mut rng = Rng(21);
    let (n, v) = (50, 700);
    let x = rng.logits(n, v, 3.0);
    let t = rng.targets(n, v, 5);
    let cfg = CrossEntropy::default().with_label_smoothing(0.05).with_grad_scale(2.0);
    let r = reference::cross_entropy(&x, &t, &cfg).unwrap();
    for (name, g) in gpus() {
        let logits = storage(g, bytemuck::cast_slice(x.as_slice().unwrap()));
        let targets = storage(g, bytemuck::cast_slice(&i32s(&t)));
        let grad = storage(g, &vec![0u8; n * v * 4]);
        let plan = g.cross_entropy_plan(n, v, DType::F32, &cfg).unwrap();
        let mut enc = g.device().create_command_encoder(&Default::default());
        let inputs = CeInputs {
            logits: logits.slice(..),
            targets: DeviceTargets::Classes(targets.slice(..)),
            sample_weight: None,
            grad: DeviceGrad::Separate(grad.slice(..), DType::F32),
        };
        plan.record(&mut enc, inputs).unwrap();
        let pending = plan.read_back(&mut enc, false).unwrap();
        g.queue().submit([enc.finish()]);
        let o = pending.wait().unwrap();
        assert_scalar(&format!("{name} loss"), o.loss, r.loss, 1e-6, 1e-5);
        let got = Array2::from_shape_vec((n, v), read_back(g, &grad, 0, grad.size())).unwrap();
        assert_close_2d(&format!("{name} recorded grad"), got.view(), r.grad.view(), 1e-9, 1e-4);

        // In place over the logits, the loss read without blocking.
        let mut enc = g.device().create_command_encoder(&Default::default());
        plan.record(&mut enc, CeInputs { grad: DeviceGrad::InPlace, ..inputs }).unwrap();
        let mut pending = plan.read_back(&mut enc, true).unwrap();
        g.queue().submit([enc.finish()]);
        let o = loop {
            if let Some(o) = pending.try_get() {
                break o.unwrap();
            }
            std::thread::yield_now();
        };
        assert_scalar(&format!("{name} in-place loss"), o.loss, r.loss, 1e-6, 1e-5);
        let got = Array2::from_shape_vec((n, v), read_back(g, &logits, 0, logits.size())).unwrap();
        assert_close_2d(&format!("{name} in-place grad"), got.view(), r.grad.view(), 1e-9, 1e-4);
        // The loss is also on the device, for device-side consumers.
        let scalars = read_back(g, plan.scalars_buffer(), 0, 32);
        assert_scalar(&format!("{name} device loss"), scalars[6] as f64, r.loss, 1e-6, 1e-5);
    }
}

/// A forward pass now, its gradient later: the state saved after the forward pass survives
/// another record of the same plan, and the backward pass scales by a device upstream gradient
/// (a scalar, or one value per row for reduction `none`), separate or in place.
#[test]
fn recorded_backward_from_saved_state() {
    let mut rng = Rng(23);
    let (n, v) = (24, 501);
    let (x, x2) = (rng.logits(n, v, 3.0), rng.logits(n, v, 3.0));
    let t = rng.targets(n, v, 4);
    let cw = ndarray::Array1::from_shape_fn(v, |c| 0.5 + (c % 5) as f32 * 0.25);
    for cfg in [
        CrossEntropy::default().with_label_smoothing(0.1).with_class_weight(cw.clone()).with_z_loss(1e-3),
        CrossEntropy::default().with_reduction(Reduction::None).with_softcap(4.0).with_temperature(1.3),
    ] {
        let r = reference::cross_entropy(&x, &t, &cfg).unwrap();
        let rows = cfg.reduction == Reduction::None;
        let up: Vec<f32> = if rows { (0..n).map(|i| 0.5 + i as f32 * 0.1).collect() } else { vec![2.5] };
        let mut want = r.grad.clone();
        for (i, mut row) in want.rows_mut().into_iter().enumerate() {
            row *= up[if rows { i } else { 0 }] as f64;
        }
        let mut ctxs = gpus();
        let chunked = gpu_segments_chunked();
        if let Some(c) = &chunked {
            ctxs.push(("gpu-split-rows-chunked", c));
        }
        for (name, g) in ctxs {
            let logits = storage(g, bytemuck::cast_slice(x.as_slice().unwrap()));
            let other = storage(g, bytemuck::cast_slice(x2.as_slice().unwrap()));
            let targets = storage(g, bytemuck::cast_slice(&i32s(&t)));
            let plan = g.cross_entropy_plan(n, v, DType::F32, &cfg).unwrap();
            let state = storage(g, &vec![0u8; plan.state_bytes() as usize]);
            let upstream = storage(g, bytemuck::cast_slice(&up));
            let grad = storage(g, &vec![0u8; n * v * 4]);
            fn fwd<'a>(logits: &'a wgpu::Buffer, targets: &'a wgpu::Buffer) -> CeInputs<'a> {
                CeInputs {
                    logits: logits.slice(..),
                    targets: DeviceTargets::Classes(targets.slice(..)),
                    sample_weight: None,
                    grad: DeviceGrad::None,
                }
            }
            fn back<'a>(bufs: [&'a wgpu::Buffer; 4], grad: DeviceGrad<'a>) -> CeBackward<'a> {
                let [logits, targets, state, upstream] = bufs;
                CeBackward {
                    logits: logits.slice(..),
                    targets: DeviceTargets::Classes(targets.slice(..)),
                    sample_weight: None,
                    state: state.slice(..),
                    upstream: upstream.slice(..),
                    grad,
                }
            }
            let bufs = [&logits, &targets, &state, &upstream];
            let mut enc = g.device().create_command_encoder(&Default::default());
            plan.record(&mut enc, fwd(&logits, &targets)).unwrap();
            let loss = plan.read_back(&mut enc, true).unwrap();
            plan.save_state(&mut enc, state.slice(..)).unwrap();
            // The plan records another batch before the backward pass of the first.
            plan.record(&mut enc, fwd(&other, &targets)).unwrap();
            plan.record_backward(&mut enc, back(bufs, DeviceGrad::Separate(grad.slice(..), DType::F32))).unwrap();
            g.queue().submit([enc.finish()]);
            let o = loss.wait().unwrap();
            assert_scalar(&format!("{name} loss"), o.loss, r.loss, 1e-6, 1e-5);
            let got = Array2::from_shape_vec((n, v), read_back(g, &grad, 0, grad.size())).unwrap();
            assert_close_2d(&format!("{name} {:?} backward", cfg.reduction), got.view(), want.view(), 1e-8, 1e-4);
            // In place over the logits.
            let mut enc = g.device().create_command_encoder(&Default::default());
            plan.record_backward(&mut enc, back(bufs, DeviceGrad::InPlace)).unwrap();
            g.queue().submit([enc.finish()]);
            let got = Array2::from_shape_vec((n, v), read_back(g, &logits, 0, logits.size())).unwrap();
            assert_close_2d(&format!("{name} in-place backward"), got.view(), want.view(), 1e-8, 1e-4);
            // A backward pass needs somewhere to write.
            let mut enc = g.device().create_command_encoder(&Default::default());
            assert!(plan.record_backward(&mut enc, back(bufs, DeviceGrad::None)).is_err());
        }
    }
}

/// Rows split into segments and bound in small chunks, with confident rows, -inf masks, an odd
/// V and 16-bit gradients, against the f64 reference.
#[test]
fn split_rows_in_small_chunks() {
    let Some(g) = gpu_segments_chunked() else { return };
    let mut rng = Rng(24);
    for (n, v) in [(13, 1001), (7, 2048), (40, 97)] {
        let mut x = rng.logits(n, v, 4.0);
        x[[0, 3]] = 90.0; // a confident row
        for c in 0..v / 2 {
            x[[1, c]] = f32::NEG_INFINITY; // half the row masked
        }
        let t = rng.targets(n, v, 6);
        let cfg = CrossEntropy::default().with_label_smoothing(0.05);
        let plan = g.cross_entropy_plan(n, v, DType::F32, &cfg).unwrap();
        assert!(plan.segments() > 1, "{n}x{v}: rows split");
        let r = reference::cross_entropy(&x, &t, &cfg).unwrap();
        let o = g.cross_entropy_with_grad(&x, &t, &cfg).unwrap();
        assert_scalar(&format!("{n}x{v} loss"), o.loss, r.loss, 1e-6, 1e-5);
        assert_close_2d(&format!("{n}x{v} grad"), o.grad.unwrap().view(), r.grad.view(), 1e-8, 1e-4);
        let xb = x.mapv(half::bf16::from_f32);
        let mut gb = ndarray::Array2::from_elem((n, v), half::bf16::ZERO);
        let o = g.cross_entropy_into(&xb, &t, &cfg, &mut gb).unwrap();
        let rb = reference::cross_entropy(&xb.mapv(f32::from), &t, &cfg).unwrap();
        assert_scalar(&format!("{n}x{v} bf16 loss"), o.loss, rb.loss, 1e-6, 1e-5);
        let gf = gb.mapv(f32::from);
        assert_close_2d(&format!("{n}x{v} bf16 grad"), gf.view(), rb.grad.view(), 1e-6, 8e-3);
    }
}

#[test]
fn slices_at_nonzero_offsets() {
    let mut rng = Rng(22);
    let (n, v) = (9, 37);
    let x = rng.logits(n, v, 2.0);
    let t = rng.targets(n, v, 4);
    let cfg = CrossEntropy::default().with_z_loss(1e-3);
    let r = reference::cross_entropy(&x, &t, &cfg).unwrap();
    for (name, g) in gpus() {
        let align = g.offset_alignment() as usize;
        // Logits 12 bytes in (any 4-byte offset works for row tensors); targets at the alignment.
        let mut lbytes = vec![0u8; 12];
        lbytes.extend_from_slice(bytemuck::cast_slice(x.as_slice().unwrap()));
        let mut tbytes = vec![0u8; align];
        tbytes.extend_from_slice(bytemuck::cast_slice(&i32s(&t)));
        let logits = storage(g, &lbytes);
        let targets = storage(g, &tbytes);
        let grad = storage(g, &vec![0u8; 256 + n * v * 4]);
        let plan = g.cross_entropy_plan(n, v, DType::F32, &cfg).unwrap();
        let mut enc = g.device().create_command_encoder(&Default::default());
        plan.record(
            &mut enc,
            CeInputs {
                logits: logits.slice(12..),
                targets: DeviceTargets::Classes(targets.slice(align as u64..)),
                sample_weight: None,
                grad: DeviceGrad::Separate(grad.slice(256..), DType::F32),
            },
        )
        .unwrap();
        let pending = plan.read_back(&mut enc, false).unwrap();
        g.queue().submit([enc.finish()]);
        assert_scalar(&format!("{name} loss"), pending.wait().unwrap().loss, r.loss, 1e-6, 1e-5);
        let got = Array2::from_shape_vec((n, v), read_back(g, &grad, 256, (n * v * 4) as u64)).unwrap();
        assert_close_2d(&format!("{name} offset grad"), got.view(), r.grad.view(), 1e-9, 1e-4);
        // A misaligned targets slice is a typed error, not a wgpu validation panic.
        let mut enc = g.device().create_command_encoder(&Default::default());
        let bad = CeInputs {
            logits: logits.slice(12..),
            targets: DeviceTargets::Classes(targets.slice(4..)),
            sample_weight: None,
            grad: DeviceGrad::None,
        };
        assert!(matches!(plan.record(&mut enc, bad), Err(XentError::InvalidOption(_))), "{name}");
    }
}

#[test]
fn recorded_path_reports_bad_targets_found_on_the_gpu() {
    let Some(g) = gpu() else { return };
    let x = Array2::<f32>::zeros((4, 3));
    let logits = storage(g, bytemuck::cast_slice(x.as_slice().unwrap()));
    let targets = storage(g, bytemuck::cast_slice(&[0i32, 2, 5, -7]));
    let plan = g.cross_entropy_plan(4, 3, DType::F32, &CrossEntropy::default()).unwrap();
    let inputs = CeInputs {
        logits: logits.slice(..),
        targets: DeviceTargets::Classes(targets.slice(..)),
        sample_weight: None,
        grad: DeviceGrad::None,
    };
    let mut enc = g.device().create_command_encoder(&Default::default());
    plan.record(&mut enc, inputs).unwrap();
    let pending = plan.read_back(&mut enc, false).unwrap();
    g.queue().submit([enc.finish()]);
    assert_eq!(pending.wait().unwrap_err(), XentError::TargetOutOfRange { row: 2, target: 5, classes: 3 });
    // Ignore index outside i32 cannot match i32 targets.
    let cfg = CrossEntropy::default().with_ignore_index(1 << 40);
    assert!(matches!(g.cross_entropy_plan(4, 3, DType::F32, &cfg), Err(XentError::InvalidOption(_))));
    // A gradient buffer that is too small, or one overlapping the logits.
    let tiny = storage(g, &[0u8; 16]);
    let mut enc = g.device().create_command_encoder(&Default::default());
    let small = CeInputs { grad: DeviceGrad::Separate(tiny.slice(..), DType::F32), ..inputs };
    assert!(matches!(plan.record(&mut enc, small), Err(XentError::Shape(_))));
    let overlap = CeInputs { grad: DeviceGrad::Separate(logits.slice(..), DType::F32), ..inputs };
    assert!(matches!(plan.record(&mut enc, overlap), Err(XentError::InvalidOption(_))));
}

#[test]
fn repeated_calls_allocate_and_compile_nothing() {
    // A private context so that other tests' calls do not move the counters.
    let Some(g) = fresh_gpu() else { return };
    let mut rng = Rng(2);
    let (n, v) = (64, 1024);
    let x = rng.logits(n, v, 1.0);
    let t = rng.targets(n, v, 3);
    let cfg = CrossEntropy::default();
    g.cross_entropy_with_grad(&x, &t, &cfg).unwrap();
    let after_first = g.counters();
    assert!(after_first.pipelines >= 3 && after_first.buffers > 0);
    for _ in 0..5 {
        g.cross_entropy_with_grad(&x, &t, &cfg).unwrap();
    }
    let again = g.counters();
    assert_eq!(
        (again.pipelines, again.buffers),
        (after_first.pipelines, after_first.buffers),
        "host path: same shape must reuse pipelines and buffers"
    );

    let logits = storage(&g, bytemuck::cast_slice(x.as_slice().unwrap()));
    let targets = storage(&g, bytemuck::cast_slice(&i32s(&t)));
    let grad = storage(&g, &vec![0u8; n * v * 4]);
    let plan = g.cross_entropy_plan(n, v, DType::F32, &cfg).unwrap();
    let inputs = CeInputs {
        logits: logits.slice(..),
        targets: DeviceTargets::Classes(targets.slice(..)),
        sample_weight: None,
        grad: DeviceGrad::Separate(grad.slice(..), DType::F32),
    };
    let step = || {
        let mut enc = g.device().create_command_encoder(&Default::default());
        plan.record(&mut enc, inputs).unwrap();
        let p = plan.read_back(&mut enc, false).unwrap();
        g.queue().submit([enc.finish()]);
        p.wait().unwrap()
    };
    step();
    let warm = g.counters();
    for _ in 0..5 {
        step();
    }
    let after = g.counters();
    assert_eq!((after.pipelines, after.buffers), (warm.pipelines, warm.buffers), "recorded path reuses everything");
}

#[test]
fn a_step_of_several_recorded_ops_in_one_submission() {
    // Two micro-batches' losses and a log-softmax of a third tensor, one submit, one read.
    let Some(g) = gpu() else { return };
    let mut rng = Rng(8);
    let (n, v) = (16, 300);
    let (x1, x2) = (rng.logits(n, v, 2.0), rng.logits(n, v, 2.0));
    let (t1, t2) = (rng.targets(n, v, 5), rng.targets(n, v, 0));
    let cfg = CrossEntropy::default().with_reduction(Reduction::Sum);
    let (r1, r2) =
        (reference::cross_entropy(&x1, &t1, &cfg).unwrap(), reference::cross_entropy(&x2, &t2, &cfg).unwrap());
    let (p1, p2) =
        (g.cross_entropy_plan(n, v, DType::F32, &cfg).unwrap(), g.cross_entropy_plan(n, v, DType::F32, &cfg).unwrap());
    let (l1, l2) = (
        storage(g, bytemuck::cast_slice(x1.as_slice().unwrap())),
        storage(g, bytemuck::cast_slice(x2.as_slice().unwrap())),
    );
    let (b1, b2) = (storage(g, bytemuck::cast_slice(&i32s(&t1))), storage(g, bytemuck::cast_slice(&i32s(&t2))));
    let mut enc = g.device().create_command_encoder(&Default::default());
    for (p, l, b) in [(&p1, &l1, &b1), (&p2, &l2, &b2)] {
        let inputs = CeInputs {
            logits: l.slice(..),
            targets: DeviceTargets::Classes(b.slice(..)),
            sample_weight: None,
            grad: DeviceGrad::InPlace,
        };
        p.record(&mut enc, inputs).unwrap();
    }
    // A log-softmax of a third tensor and a distillation of the first towards it, read from
    // and written to slices at non-zero offsets, in the same submission.
    let x3 = rng.logits(n, v, 3.0);
    let off = 256u64;
    let mut padded = vec![0f32; off as usize / 4];
    padded.extend(x3.iter());
    let l3 = storage(g, bytemuck::cast_slice(&padded));
    let x1_copy = storage(g, bytemuck::cast_slice(x1.as_slice().unwrap()));
    let bytes = (n * v * 4) as u64;
    let outs = storage(g, &vec![0u8; (off + 2 * bytes) as usize]);
    let ls = g.log_softmax_plan(n, v, DType::F32, SoftmaxKind::LogSoftmax).unwrap();
    ls.record(&mut enc, l3.slice(off..), outs.slice(off..off + bytes)).unwrap();
    let dcfg = Distill::default().with_temperature(2.0);
    let dp = g.distill_plan(n, v, DType::F32, DType::F32, &dcfg).unwrap();
    let inputs =
        DistillInputs { student: x1_copy.slice(..), teacher: l3.slice(off..), grad: Some(outs.slice(off + bytes..)) };
    dp.record(&mut enc, inputs).unwrap();
    let qd = dp.read_back(&mut enc).unwrap();
    let (q1, q2) = (p1.read_back(&mut enc, false).unwrap(), p2.read_back(&mut enc, false).unwrap());
    g.queue().submit([enc.finish()]);
    assert_scalar("first", q1.wait().unwrap().loss, r1.loss, 1e-6, 1e-5);
    assert_scalar("second", q2.wait().unwrap().loss, r2.loss, 1e-6, 1e-5);
    let got = Array2::from_shape_vec((n, v), read_back(g, &l2, 0, l2.size())).unwrap();
    assert_close_2d("second grad", got.view(), r2.grad.view(), 1e-8, 1e-4);
    let want = reference::log_softmax(&x3, SoftmaxKind::LogSoftmax).unwrap();
    let got = Array2::from_shape_vec((n, v), read_back(g, &outs, off, bytes)).unwrap();
    assert_close_2d("log-softmax", got.view(), want.view(), 2e-6, 2e-6);
    // The CPU path (f64 per row, checked against PyTorch's goldens) as the reference.
    let rd = Cpu::new().distill_with_grad(&x1, &x3, &dcfg).unwrap();
    assert_scalar("distillation", qd.wait().unwrap(), rd.loss, 1e-6, 1e-5);
    let got = Array2::from_shape_vec((n, v), read_back(g, &outs, off + bytes, bytes)).unwrap();
    let want = rd.grad.unwrap().mapv(f64::from);
    assert_close_2d("distillation grad", got.view(), want.view(), 1e-8, 1e-4);
}

/// A recorded distillation with each reduction: the loss on the device, its per-row
/// divergences and the gradient, against the CPU's call with the same options (the sum is N
/// times the mean, so a plan that ignored the option fails).
#[test]
fn recorded_distillation_reductions() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(47);
    let (n, v) = (13, 777);
    let (s, t) = (rng.logits(n, v, 3.0), rng.logits(n, v, 3.0));
    let (sb, tb) = (
        storage(g, bytemuck::cast_slice(s.as_slice().unwrap())),
        storage(g, bytemuck::cast_slice(t.as_slice().unwrap())),
    );
    let mut losses = Vec::new();
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        let cfg = Distill::default()
            .with_temperature(1.5)
            .with_mode(DistillMode::Jsd { beta: 0.3 })
            .with_reduction(reduction);
        let want = Cpu::new().distill_with_grad(&s, &t, &cfg).unwrap();
        let plan = g.distill_plan(n, v, DType::F32, DType::F32, &cfg).unwrap();
        let grad = storage(g, &vec![0u8; n * v * 4]);
        let mut enc = g.device().create_command_encoder(&Default::default());
        plan.record(
            &mut enc,
            DistillInputs { student: sb.slice(..), teacher: tb.slice(..), grad: Some(grad.slice(..)) },
        )
        .unwrap();
        let pending = plan.read_back(&mut enc).unwrap();
        g.queue().submit([enc.finish()]);
        let what = format!("{reduction:?}");
        let loss = pending.wait().unwrap();
        assert_scalar(&format!("{what} loss"), loss, want.loss, 1e-6, 1e-5);
        let rows = read_back(g, plan.row_buffer(), 0, n as u64 * 4);
        for (r, (&got, &w)) in rows.iter().zip(want.row_loss.iter()).enumerate() {
            assert_scalar(&format!("{what} row {r}"), got as f64, w as f64, 1e-6, 1e-5);
        }
        let got = Array2::from_shape_vec((n, v), read_back(g, &grad, 0, (n * v * 4) as u64)).unwrap();
        let want_g = want.grad.unwrap().mapv(f64::from);
        let scale = want_g.iter().fold(0.0f64, |m, &x| m.max(x.abs()));
        assert_close_2d(&format!("{what} grad"), got.view(), want_g.view(), 2e-6 * scale, 1e-4);
        losses.push(loss);
    }
    assert_scalar("sum = N mean", losses[1], n as f64 * losses[0], 1e-6, 1e-6);
    assert_eq!(losses[1], losses[2], "none's loss is the sum");
}

#[test]
fn guest_on_a_user_device() {
    if gpu().is_none() {
        return;
    }
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&Default::default())).unwrap();
    let (device, queue) = pollster::block_on(adapter.request_device(&Default::default())).unwrap();
    // Two contexts on the one device, created before the user sets their own callbacks.
    let a = GpuContext::from_device(device.clone(), queue.clone(), GpuOptions::default()).unwrap();
    let b =
        GpuContext::from_device(device.clone(), queue.clone(), GpuOptions::default().with_subgroups(false)).unwrap();
    assert!(!a.uses_subgroups(), "no SUBGROUP feature was requested");
    let errors = Arc::new(AtomicUsize::new(0));
    let e2 = errors.clone();
    device.on_uncaptured_error(Arc::new(move |_e: wgpu::Error| {
        e2.fetch_add(1, Ordering::SeqCst);
    }));
    let x = ndarray::array![[1.0f32, 2.0, 3.0], [0.0, 0.0, 0.0]];
    let t = ndarray::array![2i64, 0];
    let want = ((1.0f64 + 1f64.exp() + 2f64.exp()).ln() - 2.0 + 3f64.ln()) / 2.0;
    for ctx in [&a, &b] {
        let o = ctx.cross_entropy(&x, &t, &CrossEntropy::default()).unwrap();
        assert_scalar("loss", o.loss, want, 1e-6, 1e-6);
    }
    // xent's own errors are caught in its scopes and never reach the user's handler.
    let bad = ctx_error(&a);
    assert!(matches!(bad, XentError::TargetOutOfRange { .. } | XentError::Gpu { .. }), "{bad}");
    assert_eq!(errors.load(Ordering::SeqCst), 0);
    // The user's own error still reaches the user's handler.
    let _ = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 16,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    assert_eq!(errors.load(Ordering::SeqCst), 1, "the user's handler fires for the user's error");
    // And xent still works afterwards, on both contexts, not reporting a lost device.
    for ctx in [&a, &b] {
        let o = ctx.cross_entropy(&x, &t, &CrossEntropy::default()).unwrap();
        assert_scalar("loss after", o.loss, want, 1e-6, 1e-6);
    }
}

fn ctx_error(g: &GpuContext) -> XentError {
    let x = Array2::<f32>::zeros((2, 3));
    g.cross_entropy(&x, &[0i64, 9][..], &CrossEntropy::default()).unwrap_err()
}

#[test]
fn concurrent_pipeline_misses_compile_once() {
    let Some(g) = fresh_gpu() else { return };
    let x = Array2::<f32>::from_shape_fn((8, 50), |(i, j)| ((i * 7 + j) % 13) as f32 * 0.3);
    let t: Vec<i64> = (0..8).map(|i| (i * 5 % 50) as i64).collect();
    let want = Cpu::new().cross_entropy(&x, &t[..], &CrossEntropy::default()).unwrap().loss;
    let barrier = std::sync::Barrier::new(8);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                barrier.wait();
                let o = g.cross_entropy(&x, &t[..], &CrossEntropy::default()).unwrap();
                assert!((o.loss - want).abs() < 1e-5);
            });
        }
    });
    // Three kernels (weights, fused, reduce), each compiled once however many threads missed.
    assert_eq!(g.counters().pipelines, 3);
}

#[test]
fn the_pool_stays_within_its_budget() {
    let Some(g) = fresh_gpu() else { return };
    let mut rng = Rng(99);
    let mut largest = 0u64;
    for _ in 0..200 {
        let n = 1 + rng.below(5000);
        let v = 1 + rng.below(40_000);
        // Keep each call small enough for a software GPU: at most ~4M elements.
        let (n, v) = if n * v > 4_000_000 { (n.min(4_000_000 / v).max(1), v) } else { (n, v) };
        let x = Array2::<f32>::zeros((n, v));
        let t = ndarray::Array1::<i64>::zeros(n);
        g.cross_entropy(&x, &t, &CrossEntropy::default()).unwrap();
        largest = largest.max((n * v * 4) as u64);
        let c = g.counters();
        assert!(c.pool.free_bytes <= c.pool.budget_bytes, "{c:?}");
    }
    let c = g.counters();
    // The default budget is a small multiple of the largest working set seen recently.
    assert!(c.pool.budget_bytes <= 4 * largest.max(16 << 20), "{c:?} largest {largest}");
    assert_eq!(c.pool.in_use_bytes, 0, "every buffer went back to the pool");
    // A fixed budget is honoured too.
    let tight = GpuContext::with_options(GpuOptions::default().with_pool_budget_bytes(1 << 20)).unwrap();
    for v in [1000, 2000, 3000, 4000] {
        let x = Array2::<f32>::zeros((64, v));
        tight.cross_entropy(&x, &ndarray::Array1::<i64>::zeros(64), &CrossEntropy::default()).unwrap();
        assert!(tight.counters().pool.free_bytes <= 1 << 20);
    }
}

#[test]
fn lost_device_is_a_typed_error() {
    let Some(g) = fresh_gpu() else { return };
    let x = ndarray::array![[1.0f32, 2.0, 3.0]];
    let t = ndarray::array![0i64];
    g.cross_entropy(&x, &t, &CrossEntropy::default()).unwrap();
    g.device().destroy();
    let e = g.cross_entropy(&x, &t, &CrossEntropy::default()).unwrap_err();
    assert!(matches!(e, XentError::DeviceLost(_)), "{e}");
    // And it stays the same typed error, without panicking, on every later call.
    let e = g.log_softmax(&x, SoftmaxKind::LogSoftmax).unwrap_err();
    assert!(matches!(e, XentError::DeviceLost(_)), "{e}");
}
