//! Helpers shared by xent-candle's test files of the fused linear ops: deterministic inputs,
//! variables, and comparisons.

#![allow(dead_code)]

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

pub const DEV: Device = Device::Cpu;

/// Deterministic inputs: hidden `[n, d]`, weight `[v, d]` (scaled by 1/sqrt(d)), bias `[v]`,
/// targets in `0..v` with every `ignore_every`-th row -100 (0: none).
pub fn inputs(n: usize, d: usize, v: usize, ignore_every: usize, seed: u64) -> (Tensor, Tensor, Tensor, Vec<i64>) {
    let (h, t) = xent::workload::synthetic(n, d, 1.0, ignore_every, seed);
    let (w, _) = xent::workload::synthetic(v, d, 1.0 / (d as f32).sqrt(), 0, seed + 1);
    let (b, _) = xent::workload::synthetic(1, v, 0.5, 0, seed + 2);
    // `synthetic` draws the targets in 0..d: spread them over 0..v.
    let t: Vec<i64> =
        t.iter().enumerate().map(|(i, &y)| if y < 0 { y } else { (y * 7919 + i as i64) % v as i64 }).collect();
    (
        Tensor::from_vec(h.into_raw_vec_and_offset().0, (n, d), &DEV).unwrap(),
        Tensor::from_vec(w.into_raw_vec_and_offset().0, (v, d), &DEV).unwrap(),
        Tensor::from_vec(b.into_raw_vec_and_offset().0, v, &DEV).unwrap(),
        t,
    )
}

pub fn var(t: &Tensor, dtype: DType) -> Var {
    Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
}

pub fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Largest |a - b| over the largest |b|.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (f32s(a), f32s(b));
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(f32::MIN_POSITIVE);
    a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Asserts that the gradient of each of `xs` in `got` is within `tol` of the one in `want`
/// (relative to its largest entry); `what` names the case.
pub fn assert_grads_close(what: &str, got: &GradStore, want: &GradStore, xs: &[&Tensor], tol: f32) {
    for x in xs {
        let diff = rel_diff(got.get(x).expect("a gradient"), want.get(x).expect("a gradient"));
        assert!(diff < tol, "{what}: gradient of {:?} differs by {diff}", x.dims());
    }
}

pub fn targets_tensor(t: &[i64]) -> Tensor {
    Tensor::new(t, &DEV).unwrap()
}
