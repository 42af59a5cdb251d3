//! The semver-safe public API: the `with_*` builders of the `#[non_exhaustive]` option structs
//! set exactly the field they name (the same options as `Default` plus field assignment), and
//! `XentError` keeps the operating system's and wgpu's errors as its `source`.

mod common;

use std::error::Error;

use ndarray::array;
use xent::preference::Preference;
use xent::*;

#[test]
fn cross_entropy_builders_equal_field_assignment() {
    let totals = Totals { counted: 3, weight_sum: 2.5 };
    let built = CrossEntropy::default()
        .with_reduction(Reduction::Mean)
        .with_ignore_index(-1)
        .with_label_smoothing(0.1)
        .with_class_weight(array![1.0f32, 2.0])
        .with_sample_weight(Some(array![0.5f32]))
        .with_z_loss(1e-4)
        .with_softcap(30.0)
        .with_temperature(2.0)
        .with_grad_scale(0.5)
        .with_per_row(true)
        .with_ranks(true)
        .with_gaps(true)
        .with_totals(totals);
    let mut assigned = CrossEntropy::default();
    assigned.reduction = Reduction::Mean;
    assigned.ignore_index = -1;
    assigned.label_smoothing = 0.1;
    assigned.class_weight = Some(array![1.0f32, 2.0]);
    assigned.data.sample_weight = Some(array![0.5f32]);
    assigned.z_loss = 1e-4;
    assigned.softcap = Some(30.0);
    assigned.temperature = 2.0;
    assigned.grad_scale = 0.5;
    assigned.outputs.per_row = true;
    assigned.outputs.ranks = true;
    assigned.outputs.gaps = true;
    assigned.data.totals = Some(totals);
    assert_eq!(built, assigned);
    // Every field differs from its default, so each builder was seen to set its own field.
    let d = CrossEntropy::default();
    assert!(d.ignore_index != -1 && d.label_smoothing == 0.0 && d.class_weight.is_none() && d.softcap.is_none());
    assert!(
        d.temperature == 1.0
            && d.grad_scale == 1.0
            && !d.outputs.per_row
            && !d.outputs.ranks
            && !d.outputs.gaps
            && d.data.totals.is_none()
    );
    // An `Option` clears a field again.
    assert_eq!(built.clone().with_softcap(None).softcap, None);
    assert_eq!(built.with_reduction(Reduction::Sum).reduction, Reduction::Sum);
}

#[test]
fn linear_bce_distill_preference_builders_equal_field_assignment() {
    let ce = CrossEntropy::default().with_reduction(Reduction::Sum);
    let built = LinearCe::default()
        .with_ce(ce.clone())
        .with_grad_hidden(false)
        .with_grad_weight(false)
        .with_grad_bias(false)
        .with_grads_in_input_dtype(true)
        .with_workspace_bytes(4096);
    let mut assigned = LinearCe::default();
    assigned.ce = ce;
    assigned.grad_hidden = false;
    assigned.grad_weight = false;
    assigned.grad_bias = false;
    assigned.grads_in_input_dtype = true;
    assigned.workspace_bytes = Some(4096);
    assert_eq!(built, assigned);
    assert_ne!(built, LinearCe::default());

    let built = Bce::default()
        .with_reduction(Reduction::None)
        .with_weight(BceWeight::PerClass(array![2.0f32]))
        .with_pos_weight(array![3.0f32])
        .with_grad(true)
        .with_grad_scale(0.25);
    let mut assigned = Bce::default();
    assigned.reduction = Reduction::None;
    assigned.weight = Some(BceWeight::PerClass(array![2.0f32]));
    assigned.pos_weight = Some(array![3.0f32]);
    assigned.grad = true;
    assigned.grad_scale = 0.25;
    assert_eq!(built, assigned);

    let built = Distill::default()
        .with_temperature(4.0)
        .with_mode(DistillMode::ReverseKl)
        .with_grad_scale(2.0)
        .with_reduction(Reduction::Sum);
    let mut assigned = Distill::default();
    assert_eq!(assigned.reduction, Reduction::Mean, "batchmean by default");
    assigned.temperature = 4.0;
    assigned.mode = DistillMode::ReverseKl;
    assigned.grad_scale = 2.0;
    assigned.reduction = Reduction::Sum;
    assert_eq!(built, assigned);

    let built = Preference::default().with_beta(0.1).with_margin(1.0).with_reduction(Reduction::Sum).with_grad(true);
    let mut assigned = Preference::default();
    assigned.beta = 0.1;
    assigned.margin = 1.0;
    assigned.reduction = Reduction::Sum;
    assigned.grad = true;
    assert_eq!(built, assigned);
}

#[cfg(feature = "gpu")]
#[test]
fn gpu_options_builders_equal_field_assignment() {
    let built = GpuOptions::default()
        .with_subgroups(false)
        .with_max_binding_bytes(1 << 16)
        .with_power_preference(wgpu::PowerPreference::LowPower)
        .with_pool_budget_bytes(1 << 20)
        .with_segment_len(96)
        .with_workgroup_size(32)
        .with_wide_loads(false)
        .with_cooperative_matrix(true);
    let mut assigned = GpuOptions::default();
    assigned.subgroups = false;
    assigned.max_binding_bytes = Some(1 << 16);
    assigned.power_preference = wgpu::PowerPreference::LowPower;
    assigned.pool_budget_bytes = Some(1 << 20);
    assigned.segment_len = Some(96);
    assigned.workgroup_size = Some(32);
    assigned.wide_loads = Some(false);
    assigned.cooperative_matrix = true;
    assert_eq!(built, assigned);
    assert_ne!(built, GpuOptions::default());
}

/// Options built with builders give the same results as options built by assignment.
#[test]
fn builder_options_compute_the_same_loss() {
    let x = array![[2.0f32, 0.5, -1.0], [0.1, 0.2, 0.3]];
    let t = [0i64, 2];
    let built = CrossEntropy::default().with_label_smoothing(0.1).with_reduction(Reduction::Sum);
    let mut assigned = CrossEntropy::default();
    assigned.label_smoothing = 0.1;
    assigned.reduction = Reduction::Sum;
    let cpu = Cpu::new();
    let a = cpu.cross_entropy_with_grad(&x, &t[..], &built).unwrap();
    let b = cpu.cross_entropy_with_grad(&x, &t[..], &assigned).unwrap();
    assert_eq!(a.loss, b.loss);
    assert_eq!(a.grad, b.grad);
    let mean = cpu.cross_entropy(&x, &t[..], &CrossEntropy::default().with_label_smoothing(0.1)).unwrap();
    assert!((a.loss / 2.0 - mean.loss).abs() < 1e-6, "sum {} and mean {}", a.loss, mean.loss);
}

#[test]
fn io_errors_keep_their_source() {
    let missing = std::env::temp_dir().join("xent-api-test-no-such-dir/none.npy");
    let os = std::fs::File::open(&missing).unwrap_err();
    let e = XentError::io(missing.display(), os);
    assert!(e.to_string().starts_with(&missing.display().to_string()), "{e}");
    let source = e.source().expect("a source").downcast_ref::<IoSource>().expect("an IoSource");
    assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
    // Clones share the source and compare equal.
    let copy = e.clone();
    assert_eq!(copy, e);
    assert!(copy.source().is_some());
    // Errors without one say so.
    assert!(XentError::Shape("x".into()).source().is_none());
    assert!(XentError::gpu_message("no source").source().is_none());
}

/// A wgpu validation error (a write into a buffer that is not `COPY_DST`) reaches the caller as
/// `XentError::Gpu` whose source is the `wgpu::Error` itself, with wgpu's words in the message.
#[cfg(feature = "gpu")]
#[test]
fn wgpu_errors_keep_their_source() {
    let Some(ctx) = common::fresh_gpu() else { return };
    let buf = ctx.create_buffer(256, wgpu::BufferUsages::STORAGE, "no copy_dst").unwrap();
    let e = ctx.write_buffer(&buf, 0, &[0u8; 16]).unwrap_err();
    let XentError::Gpu { message, source } = &e else { panic!("expected XentError::Gpu, got {e:?}") };
    assert!(message.contains("COPY_DST"), "{message}");
    let kept = e.source().expect("a source").downcast_ref::<GpuSource>().expect("a GpuSource");
    assert_eq!(Some(kept), source.as_ref());
    let wgpu_error = kept.downcast_ref::<wgpu::Error>().expect("the wgpu::Error");
    assert!(matches!(wgpu_error, wgpu::Error::Validation { .. }), "{wgpu_error:?}");
    assert_eq!(e.clone(), e);
    // The context still works after the caught error.
    let ok = ctx.create_buffer(256, wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST, "ok").unwrap();
    ctx.write_buffer(&ok, 0, &[1u8; 16]).unwrap();
}
