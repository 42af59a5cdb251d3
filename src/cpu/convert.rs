//! Row conversions between the stored dtypes and f32: widening with the row maximum folded in
//! (one pass instead of two), and rounding to nearest even on the way out. AVX-512 where the CPU
//! has it, the `half` crate's (F16C-accelerated) slice conversions or plain loops elsewhere.

use crate::dtype::{DType, Element};

/// Widens `src` into `dst` and returns the maximum (NaN entries skipped, -inf for none).
pub(crate) fn widen_max<T: Element>(src: &[T], dst: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::avx512::available() {
        let raw: &[u16] = match T::DTYPE {
            DType::F32 => &[],
            _ => bytemuck::cast_slice(src),
        };
        // SAFETY: AVX-512F/BW were just detected.
        match T::DTYPE {
            DType::BF16 => return unsafe { super::avx512::widen_max_k::<{ super::avx512::BF16 }>(raw, dst) },
            DType::F16 => return unsafe { super::avx512::widen_max_k::<{ super::avx512::F16 }>(raw, dst) },
            DType::F32 => {}
        }
    }
    T::widen(src, dst);
    super::simd::max(dst)
}

/// Rounds `src` into `dst` (to nearest even; NaN stays NaN, overflow gives infinity).
pub(crate) fn narrow<T: Element>(src: &[f32], dst: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    if super::avx512::available() && T::DTYPE != DType::F32 {
        let raw: &mut [u16] = bytemuck::cast_slice_mut(dst);
        // SAFETY: AVX-512F/BW were just detected.
        unsafe {
            match T::DTYPE {
                DType::BF16 => super::avx512::narrow_k::<{ super::avx512::BF16 }, false>(src, 1.0, 0.0, raw),
                _ => super::avx512::narrow_k::<{ super::avx512::F16 }, false>(src, 1.0, 0.0, raw),
            }
        }
        return;
    }
    T::narrow(src, dst);
}

/// Rounds `k src_j - c0` into `dst` in one pass (the scaling of [`super::simd::scale_shift`]
/// fused with [`narrow`], for gradient rows of every dtype; f32 ones are streamed too).
pub(crate) fn scale_narrow<T: Element>(src: &mut [f32], k: f32, c0: f32, dst: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    if super::avx512::available() {
        use super::avx512::{narrow_k, scale_store, BF16, F16};
        // SAFETY: AVX-512F/BW/VL were just detected.
        unsafe {
            match T::DTYPE {
                DType::F32 => scale_store(src, k, c0, bytemuck::cast_slice_mut(dst)),
                DType::BF16 => narrow_k::<BF16, true>(src, k, c0, bytemuck::cast_slice_mut(dst)),
                DType::F16 => narrow_k::<F16, true>(src, k, c0, bytemuck::cast_slice_mut(dst)),
            }
        }
        return;
    }
    super::simd::scale_shift(src, k, c0, None);
    narrow(src, dst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    fn values() -> Vec<f32> {
        let mut v: Vec<f32> = (0..3001).map(|i| ((i * 7919 % 4001) as f32 - 2000.0) * 0.0371).collect();
        v.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e-40,
            -3e-39,
            6.0e-8,
            65504.0,
            65520.0,
            1e30,
            f32::from_bits(0x3f80_8000), // exactly between two bf16 values: rounds to even
            f32::from_bits(0x3f81_8000),
        ]);
        v
    }

    #[test]
    fn narrowing_is_round_to_nearest_even_on_every_path() {
        let v = values();
        let mut b = vec![bf16::ZERO; v.len()];
        narrow(&v, &mut b);
        let mut h = vec![f16::ZERO; v.len()];
        narrow(&v, &mut h);
        for (i, &x) in v.iter().enumerate() {
            let (wb, wh) = (bf16::from_f32(x), f16::from_f32(x));
            if x.is_nan() {
                assert!(b[i].is_nan() && h[i].is_nan());
            } else {
                assert_eq!(b[i].to_bits(), wb.to_bits(), "bf16 of {x:e}");
                assert_eq!(h[i].to_bits(), wh.to_bits(), "f16 of {x:e}");
            }
        }
    }

    #[test]
    fn widening_is_exact_and_finds_the_max() {
        let v: Vec<f32> = values().into_iter().filter(|x| x.is_finite() && x.abs() < 60000.0).collect();
        let b: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
        let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
        for n in [0, 1, 15, 16, 17, v.len()] {
            let mut d = vec![0f32; n];
            let m = widen_max(&b[..n], &mut d);
            assert!(d.iter().zip(&b[..n]).all(|(x, y)| x.to_bits() == y.to_f32().to_bits()));
            assert_eq!(m, b[..n].iter().map(|x| x.to_f32()).fold(f32::NEG_INFINITY, f32::max));
            let m = widen_max(&h[..n], &mut d);
            assert!(d.iter().zip(&h[..n]).all(|(x, y)| x.to_bits() == y.to_f32().to_bits()));
            assert_eq!(m, h[..n].iter().map(|x| x.to_f32()).fold(f32::NEG_INFINITY, f32::max));
        }
    }
}
