//! AVX-512 versions of the hot row loops (16 lanes), picked at run time where the CPU has
//! AVX-512F/BW/VL, and the 16-bit conversions (bf16 and f16 to and from f32) with the row
//! maximum folded into the widening pass.
//!
//! The exponential uses the same reduction and polynomial as [`super::simd`]'s portable and AVX2
//! versions (the paths agree to an ulp), with the power of two applied by `vscalefps`.
//! Hand-written because LLVM keeps the autovectorised 8-lane loops at 256 bits. Rows are
//! prefetched one ahead while the current row's exponentials are computed: this is what lets
//! the f32 path run at memory bandwidth.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::simd::{BLOCK, EXP_POLY, LN2_HI, LN2_LO, LOG2E};

/// Whether this CPU runs the kernels below.
pub fn available() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::env::var_os("XENT_NO_AVX512").is_none()
    })
}

/// exp(x) for x <= 0: the same reduction and polynomial as the portable `exp8`, with the power
/// of two applied by `vscalefps` (which also gives 0 far below the range, so no masking).
#[inline]
#[target_feature(enable = "avx512f")]
fn exp16(x: __m512) -> __m512 {
    // max(lo, x) keeps a NaN x (the second operand is returned when either is NaN) and turns
    // -inf into lo, whose exponential scales to exactly 0.
    let xc = _mm512_max_ps(_mm512_set1_ps(-110.0), x);
    let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        xc,
        _mm512_set1_ps(LOG2E),
    ));
    let r = _mm512_fnmadd_ps(t, _mm512_set1_ps(LN2_HI), xc);
    let r = _mm512_fnmadd_ps(t, _mm512_set1_ps(LN2_LO), r);
    let mut q = _mm512_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(*c));
    }
    let p = _mm512_fmadd_ps(q, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0)));
    _mm512_scalef_ps(p, t)
}

/// Adds `e` to `acc` except where `d == 0` (the max's own 1), and counts those in `cnt`.
#[inline]
#[target_feature(enable = "avx512f")]
fn fold(d: __m512, e: __m512, acc: &mut __m512, cnt: &mut u32) {
    let is_max = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(d, _mm512_setzero_ps());
    *acc = _mm512_mask_add_ps(*acc, !is_max, *acc, e);
    *cnt += is_max.count_ones();
}

#[target_feature(enable = "avx512f")]
fn hsum(v: __m512) -> f64 {
    let mut a = [0f32; 16];
    // SAFETY: `a` has room for 16 lanes.
    unsafe { _mm512_storeu_ps(a.as_mut_ptr(), v) };
    a.iter().map(|&x| x as f64).sum()
}

/// The row maximum (NaN entries are skipped here and surface in [`exp_sum`]).
#[target_feature(enable = "avx512f")]
pub unsafe fn max(x: &[f32]) -> f32 {
    let mut m0 = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut m1 = m0;
    let mut i = 0;
    while i + 32 <= x.len() {
        // SAFETY: i + 32 <= x.len().
        unsafe {
            // max_ps(v, m) returns m when v is NaN: NaN is skipped.
            m0 = _mm512_max_ps(_mm512_loadu_ps(x.as_ptr().add(i)), m0);
            m1 = _mm512_max_ps(_mm512_loadu_ps(x.as_ptr().add(i + 16)), m1);
        }
        i += 32;
    }
    let m = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
    x[i..].iter().fold(m, |b, &v| if v > b { v } else { b })
}

/// `(sum of exp(x_j - m) over x_j != m, count of x_j == m)` in f64, storing each exponential in
/// `out` when given. `ahead` (the next row's input) is prefetched into L2 along the way, so that
/// its read from memory overlaps this row's exponentials.
#[target_feature(enable = "avx512f")]
pub unsafe fn exp_sum(x: &[f32], m: f32, mut out: Option<&mut [f32]>, ahead: &[u8]) -> (f64, f64) {
    // Cache lines of `ahead` per 32 elements of `x`, rounded up.
    let lines = ahead.len().div_ceil(64);
    let per_step = lines.div_ceil(x.len().div_ceil(32).max(1)).max(1);
    let mut next = 0usize;
    let mv = _mm512_set1_ps(m);
    let zero = _mm512_setzero_ps();
    let (mut total, mut ties) = (0.0f64, 0.0f64);
    for (b, xb) in x.chunks(BLOCK).enumerate() {
        let mut ob = out.as_deref_mut().map(|o| &mut o[b * BLOCK..b * BLOCK + xb.len()]);
        let (mut a0, mut a1, mut c0, mut c1) = (zero, zero, 0u32, 0u32);
        let full = xb.len() / 16 * 16;
        let mut i = 0;
        // Four vectors per iteration: independent polynomial chains hide FMA latency.
        while i + 64 <= full {
            for _ in 0..2 * per_step {
                if next < lines {
                    // SAFETY: a prefetch never faults; the address is inside `ahead`.
                    unsafe { _mm_prefetch::<_MM_HINT_T1>(ahead.as_ptr().add(next * 64) as *const i8) };
                    next += 1;
                }
            }
            // SAFETY: i + 64 <= xb.len(), and `o` has xb.len() elements.
            unsafe {
                let p = xb.as_ptr().add(i);
                let d0 = _mm512_sub_ps(_mm512_loadu_ps(p), mv);
                let d1 = _mm512_sub_ps(_mm512_loadu_ps(p.add(16)), mv);
                let d2 = _mm512_sub_ps(_mm512_loadu_ps(p.add(32)), mv);
                let d3 = _mm512_sub_ps(_mm512_loadu_ps(p.add(48)), mv);
                let (e0, e1, e2, e3) = (exp16(d0), exp16(d1), exp16(d2), exp16(d3));
                fold(d0, e0, &mut a0, &mut c0);
                fold(d1, e1, &mut a1, &mut c1);
                fold(d2, e2, &mut a0, &mut c0);
                fold(d3, e3, &mut a1, &mut c1);
                if let Some(o) = ob.as_deref_mut() {
                    let q = o.as_mut_ptr().add(i);
                    _mm512_storeu_ps(q, e0);
                    _mm512_storeu_ps(q.add(16), e1);
                    _mm512_storeu_ps(q.add(32), e2);
                    _mm512_storeu_ps(q.add(48), e3);
                }
            }
            i += 64;
        }
        while i + 32 <= full {
            for _ in 0..per_step {
                if next < lines {
                    // SAFETY: a prefetch never faults; the address is inside `ahead`.
                    unsafe { _mm_prefetch::<_MM_HINT_T1>(ahead.as_ptr().add(next * 64) as *const i8) };
                    next += 1;
                }
            }
            // SAFETY: i + 32 <= xb.len(), and `o` has xb.len() elements.
            unsafe {
                let d0 = _mm512_sub_ps(_mm512_loadu_ps(xb.as_ptr().add(i)), mv);
                let d1 = _mm512_sub_ps(_mm512_loadu_ps(xb.as_ptr().add(i + 16)), mv);
                let (e0, e1) = (exp16(d0), exp16(d1));
                fold(d0, e0, &mut a0, &mut c0);
                fold(d1, e1, &mut a1, &mut c1);
                if let Some(o) = ob.as_deref_mut() {
                    _mm512_storeu_ps(o.as_mut_ptr().add(i), e0);
                    _mm512_storeu_ps(o.as_mut_ptr().add(i + 16), e1);
                }
            }
            i += 32;
        }
        // The rest, 16 lanes at a time with the tail masked off (as -inf, whose exponential is 0).
        while i < xb.len() {
            let k = (xb.len() - i).min(16);
            let mask: __mmask16 = if k == 16 { 0xffff } else { (1u16 << k) - 1 };
            // SAFETY: the masked load and store touch only the k elements from i.
            unsafe {
                let v = _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), mask, xb.as_ptr().add(i));
                let d = _mm512_sub_ps(v, mv);
                let e = exp16(d);
                fold(d, e, &mut a0, &mut c0);
                if let Some(o) = ob.as_deref_mut() {
                    _mm512_mask_storeu_ps(o.as_mut_ptr().add(i), mask, e);
                }
            }
            i += k;
        }
        total += hsum(_mm512_add_ps(a0, a1));
        ties += (c0 + c1) as f64;
    }
    (total, ties)
}

/// `e_j <- k e_j - c0`.
#[target_feature(enable = "avx512f")]
pub unsafe fn scale_shift(e: &mut [f32], k: f32, c0: f32) {
    let (kv, cv) = (_mm512_set1_ps(k), _mm512_set1_ps(-c0));
    let mut i = 0;
    while i < e.len() {
        let n = (e.len() - i).min(16);
        let mask: __mmask16 = if n == 16 { 0xffff } else { (1u16 << n) - 1 };
        // SAFETY: the masked load and store touch only the n elements from i.
        unsafe {
            let p = e.as_mut_ptr().add(i);
            _mm512_mask_storeu_ps(p, mask, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, p), kv, cv));
        }
        i += n;
    }
}

/// Widens bf16 (as raw u16) to f32 and returns the maximum (NaN skipped).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn widen_bf16_max(src: &[u16], dst: &mut [f32]) -> f32 {
    assert_eq!(src.len(), dst.len());
    let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < src.len() {
        let n = (src.len() - i).min(16);
        let mask: __mmask16 = if n == 16 { 0xffff } else { (1u16 << n) - 1 };
        // SAFETY: masked loads and stores touch only the n elements from i.
        unsafe {
            let h = _mm256_maskz_loadu_epi16(mask, src.as_ptr().add(i) as *const i16);
            let v = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)));
            _mm512_mask_storeu_ps(dst.as_mut_ptr().add(i), mask, v);
            m = _mm512_mask_max_ps(m, mask, v, m);
        }
        i += n;
    }
    _mm512_reduce_max_ps(m)
}

/// Widens f16 (as raw u16) to f32, exactly, and returns the maximum (NaN skipped).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn widen_f16_max(src: &[u16], dst: &mut [f32]) -> f32 {
    assert_eq!(src.len(), dst.len());
    let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < src.len() {
        let n = (src.len() - i).min(16);
        let mask: __mmask16 = if n == 16 { 0xffff } else { (1u16 << n) - 1 };
        // SAFETY: masked loads and stores touch only the n elements from i.
        unsafe {
            let h = _mm256_maskz_loadu_epi16(mask, src.as_ptr().add(i) as *const i16);
            let v = _mm512_cvtph_ps(h);
            _mm512_mask_storeu_ps(dst.as_mut_ptr().add(i), mask, v);
            m = _mm512_mask_max_ps(m, mask, v, m);
        }
        i += n;
    }
    _mm512_reduce_max_ps(m)
}

/// Rounds f32 to bf16 (to nearest even; NaN stays a quiet NaN), as raw u16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn narrow_bf16(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len());
    let bias = _mm512_set1_epi32(0x7fff);
    let one = _mm512_set1_epi32(1);
    let quiet = _mm512_set1_epi32(0x40);
    let mut i = 0;
    while i < src.len() {
        let n = (src.len() - i).min(16);
        let mask: __mmask16 = if n == 16 { 0xffff } else { (1u16 << n) - 1 };
        // SAFETY: masked loads and stores touch only the n elements from i.
        unsafe {
            let x = _mm512_maskz_loadu_ps(mask, src.as_ptr().add(i));
            let b = _mm512_castps_si512(x);
            let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), one);
            let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, _mm512_add_epi32(bias, lsb)));
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
            let q = _mm512_or_si512(_mm512_srli_epi32::<16>(b), quiet);
            let r = _mm512_mask_blend_epi32(nan, rounded, q);
            _mm256_mask_storeu_epi16(dst.as_mut_ptr().add(i) as *mut i16, mask, _mm512_cvtepi32_epi16(r));
        }
        i += n;
    }
}

/// Rounds f32 to f16 (to nearest even, IEEE overflow and subnormals), as raw u16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn narrow_f16(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len());
    let mut i = 0;
    while i < src.len() {
        let n = (src.len() - i).min(16);
        let mask: __mmask16 = if n == 16 { 0xffff } else { (1u16 << n) - 1 };
        // SAFETY: masked loads and stores touch only the n elements from i.
        unsafe {
            let x = _mm512_maskz_loadu_ps(mask, src.as_ptr().add(i));
            let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
            _mm256_mask_storeu_epi16(dst.as_mut_ptr().add(i) as *mut i16, mask, h);
        }
        i += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avx512_matches_the_portable_path() {
        if !available() {
            return;
        }
        let mut x: Vec<f32> = (0..4099).map(|i| ((i * 7919) % 2003) as f32 * -0.013).collect();
        x[5] = f32::NEG_INFINITY;
        x[77] = 0.0; // a tie with the max
        x[100] = -95.0; // below the portable path's cut-off: both give (almost) nothing
                        // SAFETY: AVX-512 was just detected.
        let m = unsafe { max(&x) };
        assert_eq!(m, 0.0);
        let mut o = vec![0.0; x.len()];
        let (s, ties) = unsafe { exp_sum(&x, m, Some(&mut o), &[0u8; 100]) };
        assert_eq!(ties, x.iter().filter(|&&v| v == 0.0).count() as f64);
        let want: f64 = x.iter().filter(|&&v| v != 0.0).map(|&v| (v as f64).exp()).sum();
        assert!(((s - want) / want).abs() < 1e-7, "{s} vs {want}");
        for (&e, &v) in o.iter().zip(&x) {
            let w = (v as f64).exp();
            assert!((e as f64 - w).abs() <= 2.5e-7 * w + 1e-38, "exp({v}) = {e}, want {w}");
        }
        assert_eq!(o[5], 0.0, "exp(-inf) is exactly 0");
        let (nan, _) = unsafe { exp_sum(&[1.0, f32::NAN, 0.5], 1.0, None, &[]) };
        assert!(nan.is_nan());
        let mut g = o.clone();
        unsafe { scale_shift(&mut g, 2.0, 0.5) };
        assert!(g.iter().zip(&o).all(|(g, e)| (g - (2.0 * e - 0.5)).abs() <= 1e-6));
    }
}
