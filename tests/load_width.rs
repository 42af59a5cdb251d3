//! 16-byte loads of 16-bit rows (`GpuOptions::wide_loads`, the default on GPUs: eight bf16/f16
//! values per load where V is a multiple of 8) against the 8-byte loads of the earlier kernels (four
//! values per load), in two contexts on one adapter, for the cross-entropy forward and
//! gradient passes (whole and split rows), the backward pass, log-softmax, softmax, row sums
//! and the copy kernel.
//!
//! Rows whose V is not a multiple of 8 take the same kernels in both contexts: the results are
//! bit-identical. Where V is a multiple of 8 a thread reads eight consecutive values per load
//! instead of four, so the row statistic is summed in another order; every element's own
//! arithmetic is unchanged. Tolerances, from at most ~130 f32 additions per thread and level
//! (V <= 8192, 32 or more invocations per row): a statistic-derived f32 value x (loss,
//! log-softmax, softmax, f32 gradient) |d| <= 1e-7 + 1e-5 |x|; a 16-bit gradient, rounded once
//! from such f32 values, one unit in the last place of its dtype (2^-7 |x| for bf16, 2^-10 |x|
//! + 2^-24 for f16); row sums 1e-6 sum |x|; the copy kernel's f32 rows exactly the inputs.
#![cfg(feature = "gpu")]

mod common;

use common::*;
use half::{bf16, f16};
use ndarray::{Array1, Array2};
use xent::cpu::reference;
use xent::*;

/// (name, 16-byte context, 8-byte context): default layout, and rows split into segments of
/// 96 columns (a multiple of 8) with 32-invocation workgroups.
fn pairs() -> Vec<(&'static str, GpuContext, GpuContext)> {
    let mut out = Vec::new();
    for (name, base) in [
        ("whole rows", GpuOptions::default()),
        ("split rows", GpuOptions::default().with_segment_len(96).with_workgroup_size(32)),
    ] {
        let wide = gpu_with(base.clone().with_wide_loads(true));
        let narrow = gpu_with(base.with_wide_loads(false));
        if let (Some(w), Some(n)) = (wide, narrow) {
            assert!(w.wide_loads() && !n.wide_loads(), "{name}: the option reaches the context");
            out.push((name, w, n));
        }
    }
    out
}

/// Asserts |a - b| <= atol + rtol |b| element-wise, or equal bits when `exact`.
fn close(what: &str, a: &[f32], b: &[f32], exact: bool, atol: f64, rtol: f64) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let mut worst = 0f64;
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        if exact {
            assert!(x.to_bits() == y.to_bits(), "{what}[{i}]: 16-byte {x:e}, 8-byte {y:e}: not the same bits");
            continue;
        }
        if x.is_nan() || y.is_nan() || x.is_infinite() || y.is_infinite() {
            assert!(x.is_nan() && y.is_nan() || x == y, "{what}[{i}]: 16-byte {x}, 8-byte {y}");
            continue;
        }
        let d = (x as f64 - y as f64).abs();
        worst = worst.max(d / (atol + rtol * (y as f64).abs()));
        assert!(
            d <= atol + rtol * (y as f64).abs(),
            "{what}[{i}]: 16-byte {x:e}, 8-byte {y:e} (atol {atol}, rtol {rtol})"
        );
    }
    if !exact {
        // Seen with --nocapture: how much of the tolerance the two orders of summation used.
        println!("{what}: largest difference {worst:.3} of the tolerance");
    }
}

/// The seeded logits of a test shape: a confident row, a row with a large negative run.
fn logits(n: usize, v: usize) -> (Array2<f32>, Array1<i64>) {
    let (mut x, t) = workload::synthetic(n, v, 3.0, 4, 7 + v as u64);
    x[[0, v / 3]] = 40.0;
    for j in 0..v / 2 {
        x[[n - 1, j]] = -60.0;
    }
    (x, t)
}

const SHAPES: [(usize, usize); 6] = [(7, 8), (7, 96), (6, 1000), (6, 1001), (5, 1004), (5, 4104)];

#[test]
fn cross_entropy_equals_the_eight_byte_kernels() {
    for (ctx, wide, narrow) in pairs() {
        for (n, v) in SHAPES {
            let exact = v % 8 != 0;
            let (x, t) = logits(n, v);
            let what = |s: &str| format!("{ctx} {n}x{v} {s}");
            for cfg in [
                CrossEntropy::default(),
                CrossEntropy::default().with_label_smoothing(0.1).with_ranks(true).with_reduction(Reduction::Sum),
            ] {
                let tag = if cfg.label_smoothing > 0.0 { "smoothing+ranks" } else { "plain" };
                // bf16: loss and a bf16 gradient, separate and in place, and the f32 gradient.
                let xb = x.mapv(bf16::from_f32);
                let mut grads = Vec::new();
                let mut losses = Vec::new();
                for g in [&wide, &narrow] {
                    let mut gb = Array2::from_elem((n, v), bf16::ZERO);
                    let o = g.cross_entropy_into(&xb, &t, &cfg, &mut gb).unwrap();
                    let mut ip = xb.clone();
                    let o2 = g.cross_entropy_in_place(&mut ip, &t, &cfg).unwrap();
                    assert_eq!(ip, gb, "{}: in place and separate write the same bits", what(tag));
                    assert_eq!(o.loss.to_bits(), o2.loss.to_bits(), "{}", what(tag));
                    let f = g.cross_entropy_with_grad(&xb, &t, &cfg).unwrap();
                    assert_eq!(f.loss.to_bits(), o.loss.to_bits(), "{}", what(tag));
                    losses.push([o.loss as f32]);
                    grads.push((gb.mapv(f32::from), f.grad.unwrap(), o.row_rank.clone()));
                }
                let r = reference::cross_entropy(&xb.mapv(f32::from), &t, &cfg).unwrap();
                assert_scalar(&what("bf16 loss against f64"), losses[0][0] as f64, r.loss, 1e-6, 1e-5);
                close(&what(&format!("bf16 {tag} loss")), &losses[0], &losses[1], exact, 1e-7, 1e-5);
                let (gw, fw, rw) = &grads[0];
                let (gn, fn_, rn) = &grads[1];
                let gw = gw.as_slice().unwrap();
                let gn = gn.as_slice().unwrap();
                close(&what(&format!("bf16 {tag} bf16 grad")), gw, gn, exact, 0.0, 1.0 / 128.0);
                close(
                    &what(&format!("bf16 {tag} f32 grad")),
                    fw.as_slice().unwrap(),
                    fn_.as_slice().unwrap(),
                    exact,
                    1e-7,
                    1e-5,
                );
                assert_eq!(rw, rn, "{}: ranks", what(tag));
                // f16 logits and gradient.
                let xh = x.mapv(f16::from_f32);
                let mut hs = Vec::new();
                for g in [&wide, &narrow] {
                    let mut gh = Array2::from_elem((n, v), f16::ZERO);
                    let o = g.cross_entropy_into(&xh, &t, &cfg, &mut gh).unwrap();
                    hs.push(([o.loss as f32], gh.mapv(f32::from)));
                }
                close(&what(&format!("f16 {tag} loss")), &hs[0].0, &hs[1].0, exact, 1e-7, 1e-5);
                let (a, b) = (hs[0].1.as_slice().unwrap(), hs[1].1.as_slice().unwrap());
                close(&what(&format!("f16 {tag} f16 grad")), a, b, exact, 6e-8, 1.0 / 1024.0);
            }
            // Probability targets (f32 rows read beside the 16-bit logits).
            let p = Array2::from_shape_fn((n, v), |(i, j)| if j == (i * 7) % v { 0.7 } else { 0.3 / (v - 1) as f32 });
            let xb = x.mapv(bf16::from_f32);
            let o: Vec<CeOutput> = [&wide, &narrow]
                .iter()
                .map(|g| g.cross_entropy_with_grad(&xb, &p, &CrossEntropy::default()).unwrap())
                .collect();
            close(&what("soft loss"), &[o[0].loss as f32], &[o[1].loss as f32], exact, 1e-7, 1e-5);
            let (a, b) = (o[0].grad.as_ref().unwrap(), o[1].grad.as_ref().unwrap());
            close(&what("soft grad"), a.as_slice().unwrap(), b.as_slice().unwrap(), exact, 1e-7, 1e-5);
        }
    }
}

#[test]
fn backward_pass_equals_the_eight_byte_kernels() {
    use wgpu::util::DeviceExt;
    let (n, v) = (6, 4104);
    let (x, t) = logits(n, v);
    let xb = x.mapv(bf16::from_f32);
    let cfg = CrossEntropy::default();
    let mut got = Vec::new();
    for (_, wide, narrow) in pairs().into_iter().take(1) {
        for g in [wide, narrow] {
            let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
            let mk = |data: &[u8]| {
                g.device().create_buffer_init(&wgpu::util::BufferInitDescriptor { label: None, contents: data, usage })
            };
            let logits = mk(bytemuck::cast_slice(xb.as_slice().unwrap()));
            let ti: Vec<i32> = t.iter().map(|&y| y as i32).collect();
            let targets = mk(bytemuck::cast_slice(&ti));
            let grad = mk(&vec![0u8; n * v * 2]);
            let plan = g.cross_entropy_plan(n, v, DType::BF16, &cfg.clone().with_ignore_index(-100)).unwrap();
            let state = mk(&vec![0u8; plan.state_bytes() as usize]);
            let upstream = mk(bytemuck::cast_slice(&[0.5f32]));
            let mut enc = g.device().create_command_encoder(&Default::default());
            let tg = DeviceTargets::Classes(targets.slice(..));
            plan.record(
                &mut enc,
                CeInputs { logits: logits.slice(..), targets: tg, sample_weight: None, grad: DeviceGrad::None },
            )
            .unwrap();
            plan.save_state(&mut enc, state.slice(..)).unwrap();
            plan.record_backward(
                &mut enc,
                CeBackward {
                    logits: logits.slice(..),
                    targets: tg,
                    sample_weight: None,
                    state: state.slice(..),
                    upstream: upstream.slice(..),
                    grad: DeviceGrad::Separate(grad.slice(..), DType::BF16),
                },
            )
            .unwrap();
            let pending = plan.read_back(&mut enc, false).unwrap();
            g.queue().submit([enc.finish()]);
            let loss = pending.wait().unwrap().loss;
            let mut bytes = vec![0u8; n * v * 2];
            g.read_buffer(&grad, 0, &mut bytes).unwrap();
            let gv: Vec<f32> = bytemuck::cast_slice::<u8, bf16>(&bytes).iter().map(|h| h.to_f32()).collect();
            got.push((loss as f32, gv));
        }
    }
    if got.is_empty() {
        return;
    }
    let r = reference::cross_entropy(&xb.mapv(f32::from), &t, &cfg).unwrap();
    let want: Vec<f64> = r.grad.iter().map(|g| 0.5 * g).collect();
    for (loss, g) in &got {
        assert_scalar("backward loss against f64", *loss as f64, r.loss, 1e-6, 1e-5);
        let got2 = Array2::from_shape_vec((n, v), g.clone()).unwrap();
        assert_close_2d(
            "backward grad against f64",
            got2.view(),
            Array2::from_shape_vec((n, v), want.clone()).unwrap().view(),
            1e-6,
            8e-3,
        );
    }
    close("backward loss", &[got[0].0], &[got[1].0], false, 1e-7, 1e-5);
    close("backward bf16 grad", &got[0].1, &got[1].1, false, 0.0, 1.0 / 128.0);
}

#[test]
fn log_softmax_equals_the_eight_byte_kernels() {
    for (ctx, wide, narrow) in pairs().into_iter().take(1) {
        for (n, v) in SHAPES {
            let exact = v % 8 != 0;
            let (x, _) = logits(n, v);
            for kind in [SoftmaxKind::LogSoftmax, SoftmaxKind::Softmax] {
                let what = format!("{ctx} {n}x{v} {kind:?}");
                let xb = x.mapv(bf16::from_f32);
                let a = wide.log_softmax(&xb, kind).unwrap();
                let b = narrow.log_softmax(&xb, kind).unwrap();
                close(&format!("{what} bf16"), a.as_slice().unwrap(), b.as_slice().unwrap(), exact, 1e-7, 1e-5);
                let xh = x.mapv(f16::from_f32);
                let a = wide.log_softmax(&xh, kind).unwrap();
                let b = narrow.log_softmax(&xh, kind).unwrap();
                close(&format!("{what} f16"), a.as_slice().unwrap(), b.as_slice().unwrap(), exact, 1e-7, 1e-5);
            }
        }
    }
}

/// Row sums and the copy kernel of `xent bench --op copy` over device rows of `x`'s bytes.
fn row_sum_and_copy(g: &GpuContext, bytes: &[u8], n: usize, v: usize, dtype: DType) -> (Vec<f32>, Vec<f32>) {
    use wgpu::util::DeviceExt;
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
    let src = g.device().create_buffer_init(&wgpu::util::BufferInitDescriptor { label: None, contents: bytes, usage });
    let out = g.create_buffer((n * v * 4) as u64, usage, "copy").unwrap();
    let plan = g.row_sum_plan(n, v, dtype).unwrap();
    let mut enc = g.device().create_command_encoder(&Default::default());
    plan.record_copy(&mut enc, src.slice(..), out.slice(..)).unwrap();
    g.submit_encoder(enc).unwrap();
    let mut sums = vec![0f32; n];
    g.read_buffer(plan.row_buffer(), 0, bytemuck::cast_slice_mut(&mut sums)).unwrap();
    let mut copy = vec![0f32; n * v];
    g.read_buffer(&out, 0, bytemuck::cast_slice_mut(&mut copy)).unwrap();
    // The read-only pass gives the same sums.
    let mut enc = g.device().create_command_encoder(&Default::default());
    plan.record(&mut enc, src.slice(..)).unwrap();
    g.submit_encoder(enc).unwrap();
    let mut again = vec![0f32; n];
    g.read_buffer(plan.row_buffer(), 0, bytemuck::cast_slice_mut(&mut again)).unwrap();
    assert_eq!(sums, again, "row sums with and without the copy");
    (sums, copy)
}

#[test]
fn row_sums_and_copies_equal_the_eight_byte_kernels() {
    for (ctx, wide, narrow) in pairs().into_iter().take(1) {
        for (n, v) in SHAPES {
            let exact = v % 8 != 0;
            let (x, _) = logits(n, v);
            for dtype in [DType::BF16, DType::F16] {
                let what = format!("{ctx} {n}x{v} {dtype}");
                let (bytes, vals): (Vec<u8>, Vec<f32>) = match dtype {
                    DType::BF16 => {
                        let h = x.mapv(bf16::from_f32);
                        (bytemuck::cast_slice(h.as_slice().unwrap()).to_vec(), h.iter().map(|h| h.to_f32()).collect())
                    }
                    _ => {
                        let h = x.mapv(f16::from_f32);
                        (bytemuck::cast_slice(h.as_slice().unwrap()).to_vec(), h.iter().map(|h| h.to_f32()).collect())
                    }
                };
                let (sw, cw) = row_sum_and_copy(&wide, &bytes, n, v, dtype);
                let (sn, cn) = row_sum_and_copy(&narrow, &bytes, n, v, dtype);
                // The copies are the values themselves, bit for bit.
                close(&format!("{what} copy (16-byte)"), &cw, &vals, true, 0.0, 0.0);
                close(&format!("{what} copy (8-byte)"), &cn, &vals, true, 0.0, 0.0);
                for (i, (a, b)) in sw.iter().zip(&sn).enumerate() {
                    let row = &vals[i * v..(i + 1) * v];
                    let abs: f64 = row.iter().map(|&y| (y as f64).abs()).sum();
                    let exact_sum: f64 = row.iter().map(|&y| y as f64).sum();
                    assert!(((*a as f64) - exact_sum).abs() <= 1e-6 * abs, "{what} row {i}: sum {a}, f64 {exact_sum}");
                    close(&format!("{what} row sum {i}"), &[*a], &[*b], exact, 1e-6 * abs, 0.0);
                }
            }
        }
    }
}

#[test]
fn misaligned_offsets_fall_back_to_narrower_loads() {
    // Tensors at offsets that are multiples of 4 bytes but not of a vector: the kernels must
    // not read vectors that straddle rows (f32 at 12 bytes with V = 32, bf16 at 4 and 8 bytes
    // with V = 64), and the results equal the reference.
    use wgpu::util::DeviceExt;
    let (n, v) = (5, 64);
    let (x, t) = logits(n, v);
    let cfg = CrossEntropy::default();
    for (ctx, g, _) in pairs() {
        for (dtype, off, goff) in [
            (DType::F32, 12usize, 4usize),
            (DType::BF16, 4, 8),
            (DType::BF16, 8, 4),
            (DType::BF16, 16, 8),
            (DType::BF16, 32, 16),
        ] {
            let what = format!("{ctx} {dtype} logits at {off}, gradient at {goff}");
            let (bytes, xr): (Vec<u8>, Array2<f32>) = match dtype {
                DType::F32 => (bytemuck::cast_slice(x.as_slice().unwrap()).to_vec(), x.clone()),
                _ => {
                    let h = x.mapv(bf16::from_f32);
                    (bytemuck::cast_slice(h.as_slice().unwrap()).to_vec(), h.mapv(f32::from))
                }
            };
            let r = reference::cross_entropy(&xr, &t, &cfg).unwrap();
            let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
            let mk = |data: &[u8]| {
                g.device().create_buffer_init(&wgpu::util::BufferInitDescriptor { label: None, contents: data, usage })
            };
            let mut lb = vec![0u8; off];
            lb.extend_from_slice(&bytes);
            let logits = mk(&lb);
            let ti: Vec<i32> = t.iter().map(|&y| y as i32).collect();
            let targets = mk(bytemuck::cast_slice(&ti));
            let grad = mk(&vec![0u8; goff + n * v * 4]);
            let plan = g.cross_entropy_plan(n, v, dtype, &cfg.clone().with_ignore_index(-100)).unwrap();
            let mut enc = g.device().create_command_encoder(&Default::default());
            plan.record(
                &mut enc,
                CeInputs {
                    logits: logits.slice(off as u64..),
                    targets: DeviceTargets::Classes(targets.slice(..)),
                    sample_weight: None,
                    grad: DeviceGrad::Separate(grad.slice(goff as u64..), DType::F32),
                },
            )
            .unwrap();
            let pending = plan.read_back(&mut enc, false).unwrap();
            g.queue().submit([enc.finish()]);
            assert_scalar(&format!("{what}: loss"), pending.wait().unwrap().loss, r.loss, 1e-6, 1e-5);
            let mut gb = vec![0f32; n * v];
            g.read_buffer(&grad, goff as u64, bytemuck::cast_slice_mut(&mut gb)).unwrap();
            let got = Array2::from_shape_vec((n, v), gb).unwrap();
            assert_close_2d(&format!("{what}: grad"), got.view(), r.grad.view(), 1e-8, 1e-4);
            // Log-softmax and row sums through their plans at the same offsets.
            let out = mk(&vec![0u8; goff + n * v * 4]);
            let lsp = g.log_softmax_plan(n, v, dtype, SoftmaxKind::LogSoftmax).unwrap();
            let mut enc = g.device().create_command_encoder(&Default::default());
            lsp.record(&mut enc, logits.slice(off as u64..), out.slice(goff as u64..)).unwrap();
            g.submit_encoder(enc).unwrap();
            let mut ls = vec![0f32; n * v];
            g.read_buffer(&out, goff as u64, bytemuck::cast_slice_mut(&mut ls)).unwrap();
            let want = reference::log_softmax(&xr, SoftmaxKind::LogSoftmax).unwrap();
            let got = Array2::from_shape_vec((n, v), ls).unwrap();
            assert_close_2d(&format!("{what}: log-softmax"), got.view(), want.view(), 1e-5, 1e-5);
        }
    }
}
