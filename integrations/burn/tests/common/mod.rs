//! Helpers shared by xent-burn's test files: deterministic values and Burn tensors from
//! slices and back.

#![allow(dead_code)]

use burn::prelude::*;

/// Deterministic values in `[-scale, scale)`.
pub fn values(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

pub fn t2(x: &[f32], shape: [usize; 2], device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(x.to_vec(), shape), device)
}

pub fn t1(x: &[f32], device: &Device) -> Tensor<1> {
    Tensor::from_data(TensorData::new(x.to_vec(), [x.len()]), device)
}

pub fn ti(t: &[i64], device: &Device) -> Tensor<1, Int> {
    Tensor::from_data(TensorData::new(t.to_vec(), [t.len()]), device)
}

pub fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// Burn's wgpu device shared with xent, or `None` (a printed notice) when there is no adapter
/// and `XENT_REQUIRE_GPU` is not set; with it set, a missing adapter fails the test.
#[cfg(feature = "gpu")]
pub fn wgpu() -> Option<Device> {
    match xent_burn::wgpu_device() {
        Ok(d) => Some(d),
        Err(e) if std::env::var("XENT_REQUIRE_GPU").is_ok_and(|v| !v.is_empty() && v != "0") => {
            panic!("XENT_REQUIRE_GPU is set but Burn's wgpu device is unusable: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED wgpu test: {e} (set XENT_REQUIRE_GPU=1 to make this a failure)");
            None
        }
    }
}

/// Without the `gpu` feature there is no wgpu device.
#[cfg(not(feature = "gpu"))]
pub fn wgpu() -> Option<Device> {
    None
}

/// Flex always; Burn's wgpu device (fusion) when there is an adapter.
pub fn devices() -> Vec<(&'static str, Device)> {
    let mut v = vec![("flex", Device::flex())];
    if let Some(d) = wgpu() {
        v.push(("wgpu", d));
    }
    v
}
