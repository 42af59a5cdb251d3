//! The device-resident path: logits and gradient stay on the GPU, nothing is re-allocated or
//! recompiled on repeated calls, and a user-provided device works.

mod common;

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

fn read_back(g: &GpuContext, buf: &wgpu::Buffer) -> Vec<f32> {
    let staging = g.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: buf.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = g.device().create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(buf, 0, &staging, 0, buf.size());
    g.queue().submit([enc.finish()]);
    staging.map_async(wgpu::MapMode::Read, .., |r| r.unwrap());
    g.device().poll(wgpu::PollType::wait_indefinitely()).unwrap();
    let v = bytemuck::cast_slice(&staging.get_mapped_range(..).unwrap()).to_vec();
    v
}

#[test]
fn device_resident_gradient_separate_and_in_place() {
    let mut rng = Rng(21);
    let (n, v) = (50, 700);
    let x = rng.logits(n, v, 3.0);
    let t = rng.targets(n, v, 5);
    let cfg = CrossEntropy { grad: GradMode::Separate, label_smoothing: 0.05, grad_scale: 2.0, ..Default::default() };
    let r = reference::cross_entropy(x.view(), t.view().into(), &cfg).unwrap();
    for (name, g) in gpus() {
        let t32: Vec<i32> = t.iter().map(|&y| y as i32).collect();
        let logits = storage(g, bytemuck::cast_slice(x.as_slice().unwrap()));
        let targets = storage(g, bytemuck::cast_slice(&t32));
        let grad = storage(g, &vec![0u8; n * v * 4]);
        let dev = DeviceCe { logits: &logits, targets: &targets, rows: n, classes: v, grad: Some(&grad) };
        let o = g.cross_entropy_device(dev, &cfg).unwrap();
        assert_scalar(&format!("{name} loss"), o.loss, r.loss, 1e-6, 1e-5);
        let got = Array2::from_shape_vec((n, v), read_back(g, &grad)).unwrap();
        assert_close_2d(&format!("{name} device grad"), got.view(), r.grad.view(), 1e-9, 1e-4);

        let cfg_in = CrossEntropy { grad: GradMode::InPlace, ..cfg.clone() };
        let o = g.cross_entropy_device(dev, &cfg_in).unwrap();
        assert_scalar(&format!("{name} in-place loss"), o.loss, r.loss, 1e-6, 1e-5);
        let got = Array2::from_shape_vec((n, v), read_back(g, &logits)).unwrap();
        assert_close_2d(&format!("{name} in-place device grad"), got.view(), r.grad.view(), 1e-9, 1e-4);
    }
}

#[test]
fn device_path_reports_bad_targets_found_on_the_gpu() {
    let Some(g) = gpu() else { return };
    let x = Array2::<f32>::zeros((4, 3));
    let logits = storage(g, bytemuck::cast_slice(x.as_slice().unwrap()));
    let targets = storage(g, bytemuck::cast_slice(&[0i32, 2, 5, -7]));
    let dev = DeviceCe { logits: &logits, targets: &targets, rows: 4, classes: 3, grad: None };
    let e = g.cross_entropy_device(dev, &CrossEntropy::default()).unwrap_err();
    assert_eq!(e, XentError::TargetOutOfRange { row: 2, target: 5, classes: 3 });
    // Ignore index outside i32 cannot match i32 targets.
    let cfg = CrossEntropy { ignore_index: 1 << 40, ..Default::default() };
    assert!(matches!(g.cross_entropy_device(dev, &cfg), Err(XentError::InvalidOption(_))));
    // Separate gradient without a buffer, and a buffer that is too small.
    let cfg = CrossEntropy { grad: GradMode::Separate, ..Default::default() };
    assert!(matches!(g.cross_entropy_device(dev, &cfg), Err(XentError::InvalidOption(_))));
    let tiny = storage(g, &[0u8; 16]);
    let dev2 = DeviceCe { grad: Some(&tiny), ..dev };
    assert!(matches!(g.cross_entropy_device(dev2, &cfg), Err(XentError::Shape(_))));
}

#[test]
fn repeated_calls_allocate_and_compile_nothing() {
    // A private context so that other tests' calls do not move the counters.
    let Some(g) = fresh_gpu() else { return };
    let mut rng = Rng(2);
    let (n, v) = (64, 1024);
    let x = rng.logits(n, v, 1.0);
    let t = rng.targets(n, v, 3);
    let cfg = CrossEntropy { grad: GradMode::Separate, ..Default::default() };
    g.cross_entropy(x.view(), t.view().into(), &cfg).unwrap();
    let after_first = g.counters();
    assert!(after_first.pipelines >= 3 && after_first.buffers > 0);
    for _ in 0..5 {
        g.cross_entropy(x.view(), t.view().into(), &cfg).unwrap();
    }
    assert_eq!(g.counters(), after_first, "host path: same shape must reuse pipelines and buffers");

    let t32: Vec<i32> = t.iter().map(|&y| y as i32).collect();
    let logits = storage(&g, bytemuck::cast_slice(x.as_slice().unwrap()));
    let targets = storage(&g, bytemuck::cast_slice(&t32));
    let grad = storage(&g, &vec![0u8; n * v * 4]);
    let dev = DeviceCe { logits: &logits, targets: &targets, rows: n, classes: v, grad: Some(&grad) };
    g.cross_entropy_device(dev, &cfg).unwrap();
    let warm = g.counters();
    for _ in 0..5 {
        g.cross_entropy_device(dev, &cfg).unwrap();
    }
    assert_eq!(g.counters(), warm, "device path: same shape must reuse pipelines and buffers");
}

#[test]
fn user_provided_device() {
    if gpu().is_none() {
        return;
    }
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&Default::default())).unwrap();
    let (device, queue) = pollster::block_on(adapter.request_device(&Default::default())).unwrap();
    let g = GpuContext::from_device(device, queue, GpuOptions::default());
    assert!(!g.uses_subgroups(), "no SUBGROUP feature was requested");
    let x = ndarray::array![[1.0f32, 2.0, 3.0], [0.0, 0.0, 0.0]];
    let t = ndarray::array![2i64, 0];
    let o = g.cross_entropy(x.view(), t.view().into(), &CrossEntropy::default()).unwrap();
    let want = ((1.0f64 + 1f64.exp() + 2f64.exp()).ln() - 2.0 + 3f64.ln()) / 2.0;
    assert_scalar("loss", o.loss, want, 1e-6, 1e-6);
}

#[test]
fn device_resident_distillation() {
    let mut rng = Rng(41);
    let (n, v) = (12, 333);
    let s = rng.logits(n, v, 2.0);
    let t = rng.logits(n, v, 2.0);
    let cfg = Distill { temperature: 2.0, mode: DistillMode::Jsd { beta: 0.3 }, grad: true, grad_scale: 1.0 };
    let want = Cpu::new().distill(s.view(), t.view(), &cfg).unwrap();
    for (name, g) in gpus() {
        let sb = storage(g, bytemuck::cast_slice(s.as_slice().unwrap()));
        let tb = storage(g, bytemuck::cast_slice(t.as_slice().unwrap()));
        let gb = storage(g, &vec![0u8; n * v * 4]);
        let out = g.distill_device(&sb, &tb, (n, v), Some(&gb), &cfg).unwrap();
        assert!(out.grad.is_none(), "the gradient stays on the GPU");
        assert_scalar(&format!("{name} loss"), out.loss, want.loss, 1e-6, 1e-5);
        let got = Array2::from_shape_vec((n, v), read_back(g, &gb)).unwrap();
        let w = want.grad.as_ref().unwrap().mapv(f64::from);
        let scale = w.iter().fold(0.0f64, |m, &x| m.max(x.abs()));
        assert_close_2d(&format!("{name} device distill grad"), got.view(), w.view(), 2e-6 * scale, 1e-4);
        // A missing gradient buffer, or one that is too small, is an error.
        assert!(matches!(g.distill_device(&sb, &tb, (n, v), None, &cfg), Err(XentError::InvalidOption(_))));
        let small = storage(g, &[0u8; 64]);
        assert!(matches!(g.distill_device(&sb, &small, (n, v), None, &cfg), Err(XentError::Shape(_))));
    }
}

#[test]
fn lost_device_is_a_typed_error() {
    let Some(g) = fresh_gpu() else { return };
    let x = ndarray::array![[1.0f32, 2.0, 3.0]];
    let t = ndarray::array![0i64];
    g.cross_entropy(x.view(), t.view().into(), &CrossEntropy::default()).unwrap();
    g.device().destroy();
    let e = g.cross_entropy(x.view(), t.view().into(), &CrossEntropy::default()).unwrap_err();
    assert!(matches!(e, XentError::DeviceLost(ref m) if m.contains("Destroyed")), "{e}");
    // And it stays the same typed error, without panicking, on every later call.
    let e = g.log_softmax(x.view(), SoftmaxKind::LogSoftmax).unwrap_err();
    assert!(matches!(e, XentError::DeviceLost(_)), "{e}");
}
