//! AVX-512 versions of the hot row loops (16 lanes), picked at run time where the CPU has
//! AVX-512F/BW/VL, and the 16-bit conversions (bf16 and f16 to and from f32) with the row
//! maximum folded into the widening pass.
//!
//! The exponential uses the same reduction and polynomial as [`super::simd`]'s portable and AVX2
//! versions (the paths agree to an ulp), with the power of two applied by `vscalefps`; where
//! only a sum of exponentials is wanted (the loss, and gradient rows rounded to 16 bits) a
//! 32-entry table and a quadratic serve ([`exp16_for_sum`]). Hand-written because LLVM keeps the
//! autovectorised 8-lane loops at 256 bits. Rows are prefetched one ahead while the current
//! row's exponentials are computed: this is what lets the f32 path run at memory bandwidth.
//!
//! On the 16-bit paths the loops are bound by instruction count, not memory, so each step is
//! counted: the row maximum compares raw 16-bit words, a bf16 row widens with one `vpermw`, the
//! maximum's own 1 is summed with the others (left out in a second sum only where the total is
//! small enough for it to matter), and eight vectors per iteration keep enough independent
//! polynomial chains in the scheduler to issue close to two vector instructions per cycle.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::exp_consts::{BLOCK, EXP_POLY, LN2_HI, LN2_LO, LOG2E, ROUND};

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
    // max(lo, x) keeps a NaN x (the second operand is returned when either is NaN) and
    // turns -inf into lo, whose exponential scales to exactly 0.
    let xc = _mm512_max_ps(_mm512_set1_ps(-110.0), x);
    // Round x log2(e) to an integer by adding 1.5 * 2^23 (one FMA and a subtraction, where
    // `vrndscaleps` after a product costs three instructions).
    let round = _mm512_set1_ps(ROUND);
    let t = _mm512_sub_ps(_mm512_fmadd_ps(xc, _mm512_set1_ps(LOG2E), round), round);
    let r = _mm512_fnmadd_ps(t, _mm512_set1_ps(LN2_HI), xc);
    let r = _mm512_fnmadd_ps(t, _mm512_set1_ps(LN2_LO), r);
    let mut q = _mm512_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(*c));
    }
    let one = _mm512_set1_ps(1.0);
    _mm512_scalef_ps(_mm512_fmadd_ps(_mm512_fmadd_ps(q, r, one), r, one), t)
}

/// exp(x) for x <= 0 where only a sum of them is wanted (the loss, and gradient rows later
/// rounded to 16 bits): [`exp16_table`] with `x` clamped at -110 first, so that -inf (and any
/// x far below the range) gives exactly 0. Ten instructions per 16 lanes with the subtraction
/// of the maximum, where [`exp16`]'s degree-6 polynomial takes twelve.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp16_for_sum(x: __m512) -> __m512 {
    exp16_table(_mm512_max_ps(_mm512_set1_ps(-110.0), x))
}

/// exp(x) as 2^(x log2 e) split into `2^n 2^(j/32) e^r`, with `2^(j/32)` from a 32-entry table
/// in two registers (one `vpermt2ps`), so that `|r| <= ln 2 / 64` needs only a quadratic.
/// Within 2.5e-7 relative (about 2 ulp; the quadratic's own error is 5.3e-8) plus `|x| 2.7e-9`
/// (the reduction by one f32 ln 2), for x in [-87, 88] (below, subnormal and then 0). Far
/// below (x under about -1e20, and -inf) the result is 0, inf or NaN, never a finite wrong
/// value, as for a NaN x: callers either clamp ([`exp16_for_sum`]) or check the sum
/// ([`PLAIN_LIMIT`]).
#[inline]
#[target_feature(enable = "avx512f")]
fn exp16_table(x: __m512) -> __m512 {
    // Adding 1.5 * 2^18 rounds x log2(e) to a multiple of 1/32, whose 32nds land in the
    // low five mantissa bits of `y`: `vpermt2ps` reads exactly those as the table index,
    // and `vscalefps` takes the floor of `k`, the power of two left after the table's.
    let round = _mm512_set1_ps(ROUND_32ND);
    let y = _mm512_fmadd_ps(x, _mm512_set1_ps(LOG2E), round);
    let k = _mm512_sub_ps(y, round);
    let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(std::f32::consts::LN_2), x);
    let t = _mm512_permutex2var_ps(EXP2_32NDS.0, _mm512_castps_si512(y), EXP2_32NDS.1);
    // t e^r = t + (t r)(c1 + c2 r): no operand of an FMA is needed after it, so no register
    // copies.
    let q = _mm512_fmadd_ps(r, _mm512_set1_ps(EXP_QUAD[1]), _mm512_set1_ps(EXP_QUAD[0]));
    _mm512_scalef_ps(_mm512_fmadd_ps(_mm512_mul_ps(t, r), q, t), k)
}

/// 1.5 * 2^18: adding it rounds to a multiple of 1/32 (the ulp at 2^18).
const ROUND_32ND: f32 = 393_216.0;
/// `1 + c1 r + c2 r^2`, the relative minimax fit to e^r on `|r| <= ln 2 / 64` (fitted by
/// Lawson's iteration in f64; the test below checks the resulting error bound).
const EXP_QUAD: [f32; 2] = [1.000_014_7, 0.500_000_54];

/// `2^(j/32)` for `j` in `0..32`, rounded to f32, as the two `vpermt2ps` table halves (the
/// test below checks every entry against f64).
struct Table32(__m512, __m512);
// SAFETY: the bit patterns are `[f32; 16]`s, valid `__m512`s.
const EXP2_32NDS: Table32 = unsafe {
    Table32(
        std::mem::transmute::<[f32; 16], __m512>([
            1.0,
            1.021_897_2,
            1.044_273_7,
            1.067_140_5,
            1.090_507_7,
            1.114_386_8,
            1.138_788_6,
            1.163_724_9,
            1.189_207_1,
            1.215_247_4,
            1.241_857_8,
            1.269_051,
            1.296_839_6,
            1.325_236_7,
            1.354_255_6,
            1.383_91,
        ]),
        std::mem::transmute::<[f32; 16], __m512>([
            std::f32::consts::SQRT_2,
            1.445_180_8,
            1.476_826_2,
            1.509_164_5,
            1.542_210_8,
            1.575_980_9,
            1.610_490_3,
            1.645_755_5,
            1.681_792_9,
            1.718_619_3,
            1.756_252_2,
            1.794_709_1,
            1.834_008_1,
            1.874_167_7,
            1.915_206_6,
            1.957_144_1,
        ]),
    )
};

/// Adds `e` to `acc` except where `d == 0` (the max's own 1), and counts the others in `cnt`
/// (the ties are the lanes less those). Masking with `d != 0` rather than with the negation of
/// `d == 0` keeps the add one merge-masked instruction.
#[inline]
#[target_feature(enable = "avx512f")]
fn fold(d: __m512, e: __m512, acc: &mut __m512, cnt: &mut __m512) {
    // Unordered: a NaN is added (and is no tie).
    let other = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(d, _mm512_setzero_ps());
    *acc = _mm512_mask_add_ps(*acc, other, *acc, e);
    *cnt = _mm512_mask_add_ps(*cnt, other, *cnt, _mm512_set1_ps(1.0));
}

/// The mask of the first `k <= 16` lanes (a masked tail).
#[inline(always)]
fn lanes(k: usize) -> __mmask16 {
    if k >= 16 {
        0xffff
    } else {
        (1u16 << k) - 1
    }
}

/// f64 lanes of a sum: f32 partial sums are added into them every [`BLOCK`] elements, and
/// reduced once at the end of a row or block.
#[derive(Clone, Copy)]
struct Wide(__m512d, __m512d);

impl Wide {
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn zero() -> Wide {
        Wide(_mm512_setzero_pd(), _mm512_setzero_pd())
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn add(&mut self, v: __m512) {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        self.0 = _mm512_add_pd(self.0, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
        self.1 = _mm512_add_pd(self.1, _mm512_cvtps_pd(hi));
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn total(self) -> f64 {
        _mm512_reduce_add_pd(_mm512_add_pd(self.0, self.1))
    }
}

/// How the row loops below read their input: f32, or bf16/f16 widened in registers (the
/// const parameter `K`), so that a 16-bit row is never copied into an f32 scratch row.
pub const F32: u8 = 0;
/// bf16: the high half of an f32.
pub const BF16: u8 = 1;
/// IEEE f16, widened exactly by `vcvtph2ps`.
pub const F16: u8 = 2;

/// 16 elements from `p` (element index `i`) as f32, in order.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn load<const K: u8>(p: *const u8, i: usize) -> __m512 {
    // SAFETY (all arms): the caller guarantees 16 elements from i.
    unsafe {
        match K {
            F32 => _mm512_loadu_ps((p as *const f32).add(i)),
            BF16 => {
                // One `vpermw` puts word j in the high half of lane j and zeroes the low
                // halves, where widening and shifting take two instructions.
                let h = _mm512_castsi256_si512(_mm256_loadu_si256((p as *const u16).add(i) as *const __m256i));
                _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xaaaa_aaaa, BF16_SPREAD.0, h))
            }
            _ => _mm512_cvtph_ps(_mm256_loadu_si256((p as *const u16).add(i) as *const __m256i)),
        }
    }
}

/// A constant vector of 16-bit permutation indices (a wrapper, so that it can be a `const`).
struct Spread(__m512i);
/// `vpermw` indices for [`load`]: word `2j + 1` takes word `j` (the even words are masked to 0).
// SAFETY: the bit patterns are the `[u16; 32]` below, a valid `__m512i`.
const BF16_SPREAD: Spread = Spread(unsafe {
    std::mem::transmute::<[u16; 32], __m512i>([
        0, 0, 0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0, 7, 0, 8, 0, 9, 0, 10, 0, 11, 0, 12, 0, 13, 0, 14, 0, 15,
    ])
});

/// `vpermt2w` indices for rounding to bf16: output word `j` of 32 is the high half of lane `j`
/// of the first vector, or of lane `j - 16` of the second (index bit 5 picks the second), which
/// is word `2j + 1` either way.
// SAFETY: the bit patterns are a `[u16; 32]`, a valid `__m512i`.
const BF16_PICK: Spread = Spread(unsafe {
    std::mem::transmute::<[u16; 32], __m512i>({
        let mut a = [0u16; 32];
        let mut j = 0;
        while j < 32 {
            a[j] = (2 * j + 1) as u16;
            j += 1;
        }
        a
    })
});

/// The first `n < 16` (or all 16) elements from `i` as f32, the other lanes `fill`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn load_part<const K: u8>(p: *const u8, i: usize, mask: __mmask16, fill: f32) -> __m512 {
    let f = _mm512_set1_ps(fill);
    // SAFETY (all arms): masked loads touch only the lanes in `mask`, which the caller owns.
    unsafe {
        match K {
            F32 => _mm512_mask_loadu_ps(f, mask, (p as *const f32).add(i)),
            BF16 => {
                let h = _mm256_maskz_loadu_epi16(mask, (p as *const u16).add(i) as *const i16);
                let v = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)));
                _mm512_mask_blend_ps(mask, f, v)
            }
            _ => {
                let h = _mm256_maskz_loadu_epi16(mask, (p as *const u16).add(i) as *const i16);
                _mm512_mask_blend_ps(mask, f, _mm512_cvtph_ps(h))
            }
        }
    }
}

/// 32 elements from `i` as two f32 vectors, in an order only a sum or a maximum may use: a
/// bf16 pair shares one 32-bit lane, so one 64-byte load and a mask or a shift give both.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn load32_any_order<const K: u8>(p: *const u8, i: usize) -> (__m512, __m512) {
    // SAFETY: the caller guarantees 32 elements from i.
    unsafe {
        if K == BF16 {
            let w = _mm512_loadu_si512((p as *const u16).add(i) as *const __m512i);
            let hi = _mm512_and_si512(w, _mm512_set1_epi32(0xffff_0000u32 as i32));
            (_mm512_castsi512_ps(_mm512_slli_epi32::<16>(w)), _mm512_castsi512_ps(hi))
        } else {
            (load::<K>(p, i), load::<K>(p, i + 16))
        }
    }
}

/// The row maximum (NaN entries are skipped here and surface in [`exp_sum`]).
#[target_feature(enable = "avx512f")]
pub unsafe fn max(x: &[f32]) -> f32 {
    // SAFETY: `x` holds x.len() f32 elements; AVX-512BW/VL come with the caller's check.
    unsafe { max_k::<F32>(x.as_ptr() as *const u8, x.len()) }
}

/// The maximum of `n` elements of storage `K` at `p` (NaN skipped).
///
/// # Safety
/// `p` holds `n` elements of storage `K`; the CPU has AVX-512F/BW/VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn max_k<const K: u8>(p: *const u8, n: usize) -> f32 {
    if K != F32 {
        // SAFETY: as the caller's.
        if let Some(m) = unsafe { max16(p, n, if K == BF16 { 0x7f80 } else { 0x7c00 }) } {
            return if K == BF16 { f32::from_bits((m as u32) << 16) } else { half::f16::from_bits(m).to_f32() };
        }
    }
    let mut m0 = _mm512_set1_ps(f32::NEG_INFINITY);
    let (mut m1, mut m2, mut m3) = (m0, m0, m0);
    let mut i = 0;
    // Four chains: one would wait on the latency of `vmaxps`.
    while i + 64 <= n {
        // SAFETY: i + 64 <= n.
        let ((a, b), (c, d)) = unsafe { (load32_any_order::<K>(p, i), load32_any_order::<K>(p, i + 32)) };
        // max_ps(v, m) returns m when v is NaN: NaN is skipped.
        m0 = _mm512_max_ps(a, m0);
        m1 = _mm512_max_ps(b, m1);
        m2 = _mm512_max_ps(c, m2);
        m3 = _mm512_max_ps(d, m3);
        i += 64;
    }
    m0 = _mm512_max_ps(m0, m2);
    m1 = _mm512_max_ps(m1, m3);
    while i < n {
        let k = (n - i).min(16);
        let mask = lanes(k);
        // SAFETY: the masked load touches only the k elements from i.
        m0 = _mm512_max_ps(unsafe { load_part::<K>(p, i, mask, f32::NEG_INFINITY) }, m0);
        i += k;
    }
    _mm512_reduce_max_ps(_mm512_max_ps(m0, m1))
}

/// The bits of the largest of `n` bf16 or f16 values at `p` (`inf`: the storage's +inf bits),
/// found on the raw 16-bit words: 32 per instruction, where widening to f32 first takes four
/// instructions per 32. Both formats are sign and magnitude, so among non-negative values the
/// largest signed word is the largest value, and among negative ones the smallest signed word
/// (the smallest magnitude) is. `None` where a NaN could be the answer (NaN is skipped, as in
/// the f32 loop, which the caller then runs) or `n == 0`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn max16(p: *const u8, n: usize, inf: u16) -> Option<u16> {
    if n == 0 {
        return None;
    }
    let q = p as *const i16;
    // A non-negative largest word is the answer; only a run of negative values (the sign bit
    // set in every word) needs the smallest word. A run that sits in L1 (a block of the
    // one-read loss) is compared for the largest alone, and read again for the smallest only
    // when every value is negative; a longer run (a whole row, from L2 or memory) tracks both
    // in one read rather than read twice.
    // SAFETY (all): as the caller's.
    let (hi, lo) = unsafe {
        if n > ONLINE_BLOCK {
            extremes16::<true>(q, n)
        } else {
            match extremes16::<false>(q, n) {
                (hi, _) if hi >= 0 => (hi, 0),
                _ => extremes16::<true>(q, n),
            }
        }
    };
    let m = if hi >= 0 { hi } else { lo } as u16;
    (m & 0x7fff <= inf).then_some(m)
}

/// The largest signed 16-bit word of `n > 0` at `q`, and with `BOTH` the smallest (else 0).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn extremes16<const BOTH: bool>(q: *const i16, n: usize) -> (i32, i32) {
    let (mut hi0, mut lo0) = (_mm512_set1_epi16(i16::MIN), _mm512_set1_epi16(i16::MAX));
    let (mut hi1, mut lo1) = (hi0, lo0);
    let mut i = 0;
    while i + 64 <= n {
        // SAFETY: i + 64 <= n.
        let (a, b) =
            unsafe { (_mm512_loadu_si512(q.add(i) as *const _), _mm512_loadu_si512(q.add(i + 32) as *const _)) };
        (hi0, hi1) = (_mm512_max_epi16(hi0, a), _mm512_max_epi16(hi1, b));
        if BOTH {
            (lo0, lo1) = (_mm512_min_epi16(lo0, a), _mm512_min_epi16(lo1, b));
        }
        i += 64;
    }
    while i < n {
        let k = (n - i).min(32);
        let mask: __mmask32 = if k == 32 { u32::MAX } else { (1u32 << k) - 1 };
        // SAFETY: the masked load touches only the k words from i.
        let a = unsafe { _mm512_maskz_loadu_epi16(mask, q.add(i)) };
        hi0 = _mm512_mask_max_epi16(hi0, mask, hi0, a);
        if BOTH {
            lo0 = _mm512_mask_min_epi16(lo0, mask, lo0, a);
        }
        i += k;
    }
    let halves = |v: __m512i| {
        (_mm512_cvtepi16_epi32(_mm512_castsi512_si256(v)), _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64::<1>(v)))
    };
    let (a, b) = halves(_mm512_max_epi16(hi0, hi1));
    let hi = _mm512_reduce_max_epi32(_mm512_max_epi32(a, b));
    if !BOTH {
        return (hi, 0);
    }
    let (c, d) = halves(_mm512_min_epi16(lo0, lo1));
    (hi, _mm512_reduce_min_epi32(_mm512_min_epi32(c, d)))
}

/// [`super::simd::exp_sum`]'s pair, storing each exponential in `out` when given: the maxima
/// are summed as the others (one add per 16 lanes) unless the sum comes to under 2, when it is
/// summed again with them left out. `ahead` (the next row's input) is prefetched into L2 along
/// the way, so that its read from memory overlaps this row's exponentials.
#[target_feature(enable = "avx512f")]
pub unsafe fn exp_sum(x: &[f32], m: f32, out: Option<&mut [f32]>, ahead: &[u8]) -> (f64, f64) {
    // SAFETY: `x` holds x.len() f32 elements; AVX-512BW/VL come with the caller's check.
    unsafe { exp_sum_k::<F32, false>(x.as_ptr() as *const u8, x.len(), m, out, ahead) }
}

/// [`exp_sum`] over `n` elements of storage `K` at `p`. With `COARSE`, the stored exponentials
/// are [`exp16_for_sum`]'s (within 2.5e-7 where `exp16` is within 1.3 ulp): enough for a
/// gradient row that is then rounded to bf16 or f16, for two instructions fewer per 16 lanes.
///
/// # Safety
/// `p` holds `n` elements of storage `K`, `out` (when given) has `n` elements; the CPU has
/// AVX-512F/BW/VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn exp_sum_k<const K: u8, const COARSE: bool>(
    p: *const u8,
    n: usize,
    m: f32,
    mut out: Option<&mut [f32]>,
    ahead: &[u8],
) -> (f64, f64) {
    assert!(out.as_ref().is_none_or(|o| o.len() == n));
    // Cache lines of `ahead` per 32 elements of the row, rounded up.
    let lines = ahead.len().div_ceil(64);
    let per_step = lines.div_ceil(n.div_ceil(32).max(1)).max(1);
    let mut next = 0usize;
    let mut prefetch = |steps: usize| {
        for _ in 0..steps {
            if next < lines {
                // SAFETY: a prefetch never faults; the address is inside `ahead`.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(ahead.as_ptr().add(next * 64) as *const i8) };
                next += 1;
            }
        }
    };
    let mv = _mm512_set1_ps(m);
    // First with the maxima summed as the others (one add per 16 lanes).
    // SAFETY: the row holds n elements, and `out` (when given) n.
    let (s, _) =
        unsafe { sum_blocks::<K, COARSE, false, false>(p, 0, n, mv, out.as_deref_mut(), &mut prefetch, per_step) };
    // Where the others sum to under 1 if the maximum occurs once, its 1 would round them off:
    // summed again with the maxima left out, from the stored exponentials where there are
    // some (an exponential is exactly 1 at the maximum, and a value it leaves out because it
    // rounded to 1 counts the same 1 as a tie).
    if s >= 2.0 || s.is_nan() {
        return (s, 0.0);
    }
    match out {
        Some(o) => sum_except_ones(o),
        // SAFETY: as above; nothing more to prefetch.
        None => unsafe { sum_blocks::<K, COARSE, true, false>(p, 0, n, mv, None, &mut |_| {}, per_step) },
    }
}

/// `(sum of e_j != 1, count of e_j == 1)` in f64 (NaN is summed).
#[target_feature(enable = "avx512f")]
fn sum_except_ones(e: &[f32]) -> (f64, f64) {
    let one = _mm512_set1_ps(1.0);
    let (mut total, mut others) = (Wide::zero(), Wide::zero());
    for b in e.chunks(BLOCK) {
        let (mut acc, mut cnt) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i < b.len() {
            let k = (b.len() - i).min(16);
            let mask = lanes(k);
            // SAFETY: the masked load touches only the k elements from i.
            let v = unsafe { _mm512_mask_loadu_ps(one, mask, b.as_ptr().add(i)) };
            // The masked-off lanes load as 1: neither summed nor counted as others.
            fold(_mm512_sub_ps(v, one), v, &mut acc, &mut cnt);
            i += k;
        }
        total.add(acc);
        others.add(cnt);
    }
    let s = total.total();
    (s, e.len() as f64 - others.total())
}

/// One block of [`exp_sum_k`]: elements `b0..b0 + len` against the maximum `mv`, calling
/// `prefetch` with a count of cache lines to fetch ahead (`per_step` per 32 elements). Returns
/// the sum and the tie count as f32 lanes (at most [`BLOCK`] elements, so f32 keeps them).
/// With `EXCLUDE` false the ties are summed as the others (one add per 16 lanes where
/// [`fold`] takes three) and the count is 0: for a block whose maximum is not the row's, or
/// whose sum is large enough that the maximum's 1 costs the others no precision. With `PLAIN`,
/// `mv` is ignored: the sum is of `exp(x_j)` themselves, with neither the subtraction nor the
/// clamp ([`PLAIN_LIMIT`] says when that is safe, and the caller checks the sum is finite).
#[inline(always)]
unsafe fn block_sum<const K: u8, const COARSE: bool, const EXCLUDE: bool, const PLAIN: bool>(
    p: *const u8,
    b0: usize,
    len: usize,
    mv: __m512,
    mut ob: Option<&mut [f32]>,
    prefetch: &mut impl FnMut(usize),
    per_step: usize,
) -> (__m512, __m512) {
    let zero = _mm512_setzero_ps();
    let (mut a0, mut a1, mut c0, mut c1) = (zero, zero, zero, zero);
    let full = len / 16 * 16;
    // Stored exponentials of an f32 gradient row take `exp16`; a sum, or a row rounded to 16
    // bits later, the table exponential.
    let precise = !COARSE && ob.is_some();
    let mut i = 0;
    // Eight vectors per iteration: independent polynomial chains hide FMA latency.
    while i + 128 <= full {
        prefetch(4 * per_step);
        // SAFETY: b0 + i + 128 <= the caller's n, and `o` has len elements.
        unsafe {
            let mut v = [zero; 8];
            for h in 0..4 {
                (v[2 * h], v[2 * h + 1]) = match ob {
                    // The sum alone: any lane order will do.
                    None => load32_any_order::<K>(p, b0 + i + 32 * h),
                    Some(_) => (load::<K>(p, b0 + i + 32 * h), load::<K>(p, b0 + i + 32 * h + 16)),
                };
            }
            let d = v.map(|x| shifted::<PLAIN>(x, mv));
            let e = d.map(|x| exp_of::<PLAIN>(x, precise));
            for h in 0..4 {
                if EXCLUDE {
                    fold(d[2 * h], e[2 * h], &mut a0, &mut c0);
                    fold(d[2 * h + 1], e[2 * h + 1], &mut a1, &mut c1);
                } else {
                    a0 = _mm512_add_ps(a0, e[2 * h]);
                    a1 = _mm512_add_ps(a1, e[2 * h + 1]);
                }
            }
            if let Some(o) = ob.as_deref_mut() {
                let q = o.as_mut_ptr().add(i);
                for (j, &x) in e.iter().enumerate() {
                    _mm512_storeu_ps(q.add(16 * j), x);
                }
            }
        }
        i += 128;
    }
    // Every lane of the vectors so far (each lane position saw this many).
    let mut vectors = i / 16;
    // The rest, 16 lanes at a time with the tail masked off.
    while i < len {
        prefetch(per_step / 2 + 1);
        let k = (len - i).min(16);
        let mask = lanes(k);
        // SAFETY: the masked load and store touch only the k elements from b0 + i.
        unsafe {
            // The masked-off tail's lanes load as -inf (exponential 0), or -1000 unclamped
            // (whose exponential is 0 too, where that of -inf is NaN).
            let fill = if PLAIN { -1000.0 } else { f32::NEG_INFINITY };
            let d = shifted::<PLAIN>(load_part::<K>(p, b0 + i, mask, fill), mv);
            let e = exp_of::<PLAIN>(d, precise);
            if EXCLUDE {
                fold(d, e, &mut a0, &mut c0);
            } else {
                a0 = _mm512_add_ps(a0, e);
            }
            if let Some(o) = ob.as_deref_mut() {
                _mm512_mask_storeu_ps(o.as_mut_ptr().add(i), mask, e);
            }
        }
        i += k;
        vectors += 1;
    }
    let ties = if EXCLUDE { _mm512_sub_ps(_mm512_set1_ps(vectors as f32), _mm512_add_ps(c0, c1)) } else { zero };
    (_mm512_add_ps(a0, a1), ties)
}

/// `x - mv`, or with `PLAIN` (see [`block_sum`]) `x` itself.
#[inline(always)]
unsafe fn shifted<const PLAIN: bool>(x: __m512, mv: __m512) -> __m512 {
    // SAFETY: inlined into callers that enable AVX-512F.
    if PLAIN {
        x
    } else {
        unsafe { _mm512_sub_ps(x, mv) }
    }
}

/// The exponential [`block_sum`] takes of `d`: unclamped with `PLAIN`, else [`exp16`] where
/// `precise`, else [`exp16_for_sum`].
#[inline(always)]
unsafe fn exp_of<const PLAIN: bool>(d: __m512, precise: bool) -> __m512 {
    // SAFETY: inlined into callers that enable AVX-512F.
    unsafe {
        if PLAIN {
            exp16_table(d)
        } else if precise {
            exp16(d)
        } else {
            exp16_for_sum(d)
        }
    }
}

/// The row maximum `m` with a pair `(a, t)` like [`exp_sum`]'s, reading the row from memory
/// once. Only `a + t - 1` is fixed: the sum of `exp(x_j - m)` over all but one occurrence of
/// the maximum (`t` may be 0 with the ties summed in `a`). Each block's maximum `mb` is taken
/// and its exponentials summed against it while the block is in L1, with its maxima summed as
/// the others; blocks merge in f64 (a block below the running maximum adds its whole sum times
/// `exp(mb - m)`). Only a block that raises the running maximum and sums to under 2 is summed
/// again with the maximum left out, so a confident row keeps the precision of the two-pass
/// form.
///
/// # Safety
/// `p` holds `n` elements of storage `K`; the CPU has AVX-512F/BW/VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn lse_k<const K: u8>(p: *const u8, n: usize, ahead: &[u8]) -> (f32, f64, f64) {
    let bytes = if K == F32 { 4 } else { 2 };
    // Software prefetch a block and PREFETCH_DIST bytes ahead of the block being summed (on
    // into the next row, `ahead`): the hardware prefetcher alone leaves the reads waiting on
    // memory. The cursor is a local the loops below keep in a register.
    let row_bytes = n * bytes;
    let mut next = ONLINE_BLOCK * bytes + PREFETCH_DIST;
    let mut prefetch = |lines: usize| {
        for _ in 0..lines {
            // SAFETY: a prefetch never faults; the address is inside the row or `ahead`.
            unsafe {
                if next < row_bytes {
                    _mm_prefetch::<_MM_HINT_T0>(p.add(next) as *const i8);
                } else if next - row_bytes < ahead.len() {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.as_ptr().add(next - row_bytes) as *const i8);
                }
            }
            next += 64;
        }
    };
    // Cache lines per 32 elements.
    let per_step = bytes / 2;
    let (mut m, mut a, mut t) = (f32::NEG_INFINITY, 0.0f64, 0.0f64);
    let mut plain = true;
    let mut b0 = 0;
    while b0 < n {
        let len = (n - b0).min(ONLINE_BLOCK);
        // SAFETY: b0 + len <= n.
        let mb = unsafe { max_k::<K>(p.add(b0 * bytes), len) };
        // A block of nothing but -inf (and NaN) is summed against 0: it adds nothing, except a
        // NaN.
        let mv = if mb == f32::NEG_INFINITY { _mm512_setzero_ps() } else { _mm512_set1_ps(mb) };
        // The block's exponentials against `mv`, f32 lanes flushed to f64 every BLOCK elements,
        // first with its maxima summed as the others: without subtracting `mb` where that is
        // safe, scaled by exp(-mb) in f64 (a sum that is not finite means a NaN or a value far
        // below the range in the block, which is then summed against `mv`, and so is the rest
        // of the row).
        let mut sum = None;
        if plain && mb.abs() <= PLAIN_LIMIT {
            // SAFETY: b0 + len <= n.
            let (s, _) = unsafe { sum_blocks::<K, true, false, true>(p, b0, len, mv, None, &mut prefetch, per_step) };
            plain = s.is_finite();
            sum = plain.then(|| (s * (-(mb as f64)).exp(), 0.0));
        }
        // SAFETY: b0 + len <= n. (After a sum that was not finite, the prefetches run a block
        // further ahead for the rest of the row.)
        let (mut ab, mut tb) = sum.unwrap_or_else(|| unsafe {
            sum_blocks::<K, true, false, false>(p, b0, len, mv, None, &mut prefetch, per_step)
        });
        if mb > m && ab < 2.0 {
            // The block holds the row's maximum so far, and the others sum to under 1 if it
            // occurs once: summed again (from L1) with the maximum's 1 left out, so that a
            // confident row's tiny sum is not rounded against it.
            // SAFETY: as above; nothing more to prefetch.
            (ab, tb) = unsafe { sum_blocks::<K, true, true, false>(p, b0, len, mv, None, &mut |_| {}, per_step) };
        }
        if mb == f32::NEG_INFINITY {
            a += ab;
        } else {
            if mb > m {
                a = (a + t) * (m as f64 - mb as f64).exp() + ab;
                (m, t) = (mb, tb);
            } else if mb == m {
                a += ab;
                t += tb;
            } else {
                a += (ab + tb) * (mb as f64 - m as f64).exp();
            }
        }
        b0 += len;
    }
    if m == f32::NEG_INFINITY {
        // As the two-pass form: every x_j - m is NaN.
        return (m, f64::NAN, 0.0);
    }
    (m, a, t)
}

/// [`block_sum`] over each [`BLOCK`] of elements `b0..b0 + len` (a row of [`exp_sum_k`], or a
/// block of [`lse_k`]), as `(sum, ties)` in f64; `out` (when given) has `len` elements.
#[inline(always)]
unsafe fn sum_blocks<const K: u8, const COARSE: bool, const EXCLUDE: bool, const PLAIN: bool>(
    p: *const u8,
    b0: usize,
    len: usize,
    mv: __m512,
    mut out: Option<&mut [f32]>,
    prefetch: &mut impl FnMut(usize),
    per_step: usize,
) -> (f64, f64) {
    let (mut sum, mut ties) = (Wide::zero(), Wide::zero());
    let mut i = 0;
    while i < len {
        let l = (len - i).min(BLOCK);
        let ob = out.as_deref_mut().map(|o| &mut o[i..i + l]);
        // SAFETY: the caller's range holds b0 + i + l elements, and `ob` has l.
        let (x, c) = unsafe { block_sum::<K, COARSE, EXCLUDE, PLAIN>(p, b0 + i, l, mv, ob, prefetch, per_step) };
        sum.add(x);
        ties.add(c);
        i += l;
    }
    (sum.total(), ties.total())
}

/// `e_j <- k e_j - c0`.
#[target_feature(enable = "avx512f")]
pub unsafe fn scale_shift(e: &mut [f32], k: f32, c0: f32) {
    let (kv, cv) = (_mm512_set1_ps(k), _mm512_set1_ps(-c0));
    let mut i = 0;
    while i < e.len() {
        let n = (e.len() - i).min(16);
        let mask = lanes(n);
        // SAFETY: the masked load and store touch only the n elements from i.
        unsafe {
            let p = e.as_mut_ptr().add(i);
            _mm512_mask_storeu_ps(p, mask, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, p), kv, cv));
        }
        i += n;
    }
}

/// Widens bf16 or f16 (storage `K`, as raw u16) to f32, exactly, and returns the maximum (NaN
/// skipped).
///
/// # Safety
/// The CPU has AVX-512F/BW/VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn widen_max_k<const K: u8>(src: &[u16], dst: &mut [f32]) -> f32 {
    assert_eq!(src.len(), dst.len());
    let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < src.len() {
        let n = (src.len() - i).min(16);
        let mask = lanes(n);
        // SAFETY: masked loads and stores touch only the n elements from i.
        unsafe {
            let v = load_part::<K>(src.as_ptr() as *const u8, i, mask, f32::NEG_INFINITY);
            _mm512_mask_storeu_ps(dst.as_mut_ptr().add(i), mask, v);
            m = _mm512_mask_max_ps(m, mask, v, m);
        }
        i += n;
    }
    _mm512_reduce_max_ps(m)
}

/// f32 to bf16 bits, rounded to nearest even (NaN stays a quiet NaN), in the high half of
/// each 32-bit lane.
#[inline]
#[target_feature(enable = "avx512f")]
fn round_bf16(x: __m512) -> __m512i {
    let b = _mm512_castps_si512(x);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
    let rounded = _mm512_add_epi32(_mm512_add_epi32(b, lsb), _mm512_set1_epi32(0x7fff));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
    _mm512_mask_or_epi32(rounded, nan, b, _mm512_set1_epi32(0x0040_0000))
}

/// Rounds `k src_j - c0` (with `SCALE`; else `src_j` itself) to bf16 (`K = BF16`: to nearest
/// even, NaN stays a quiet NaN) or f16 (`K = F16`: IEEE rounding, overflow and subnormals) into
/// `dst`, as raw u16: the last step of a 16-bit gradient row in one pass.
///
/// # Safety
/// The CPU has AVX-512F/BW/VL.
pub unsafe fn narrow_k<const K: u8, const SCALE: bool>(src: &[f32], k: f32, c0: f32, dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len());
    // SAFETY: the caller's AVX-512F/BW/VL, and AVX512-BF16/DQ where detected.
    unsafe {
        let d = dst.as_mut_ptr() as *mut u8;
        if K == BF16 && bf16_convert() {
            narrow_ne::<SCALE>(src, k, c0, d)
        } else {
            narrow_int::<K, SCALE>(src, k, c0, d)
        }
    }
}

/// Whether the CPU converts f32 to bf16 in one instruction (`vcvtne2ps2bf16`, AVX512-BF16).
fn bf16_convert() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512bf16") && std::arch::is_x86_feature_detected!("avx512dq")
    })
}

/// [`narrow_k`] with the rounding in integer instructions (`K = F32`: [`scale_store`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn narrow_int<const K: u8, const SCALE: bool>(src: &[f32], k: f32, c0: f32, dst: *mut u8) {
    // SAFETY: as the caller's.
    unsafe { narrow_body::<K, SCALE, false>(src, k, c0, dst) }
}

/// [`narrow_k`] for bf16 with `vcvtne2ps2bf16`, which rounds 32 lanes to nearest even in one
/// instruction but flushes subnormal inputs to zero: a 32-lane group holding one takes the
/// integer rounding instead (`vfpclassps` finds them).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")]
unsafe fn narrow_ne<const SCALE: bool>(src: &[f32], k: f32, c0: f32, dst: *mut u8) {
    // SAFETY: as the caller's.
    unsafe { narrow_body::<BF16, SCALE, true>(src, k, c0, dst) }
}

/// The loop of [`narrow_k`] and [`scale_store`] (`dst` holds src.len() elements of storage
/// `K`), inlined into a caller that enables its target features (`NE`: AVX512-BF16 and DQ as
/// well).
#[inline(always)]
unsafe fn narrow_body<const K: u8, const SCALE: bool, const NE: bool>(src: &[f32], k: f32, c0: f32, d: *mut u8) {
    let (kv, cv) = (_mm512_set1_ps(k), _mm512_set1_ps(-c0));
    let pick = BF16_PICK.0;
    let (n, s) = (src.len(), src.as_ptr());
    let bytes = if K == F32 { 4 } else { 2 };
    // A long row goes to memory with streaming stores from its first 64-byte boundary on: the
    // gradient is far bigger than the caches, and a normal store would first read each line.
    let stream = n >= STREAM_MIN;
    let head = if stream { ((64 - (d as usize % 64)) % 64 / bytes).min(n) } else { 0 };
    // SAFETY: head <= n elements from 0.
    unsafe { narrow_part::<K, SCALE>(s, d, 0, head, kv, cv) };
    let mut i = head;
    while i + 32 <= n {
        // SAFETY: i + 32 <= n for both slices; with `stream`, d + i is 64-byte aligned.
        unsafe {
            let a = _mm512_loadu_ps(s.add(i));
            let b = _mm512_loadu_ps(s.add(i + 16));
            let (a, b) = if SCALE { (_mm512_fmadd_ps(a, kv, cv), _mm512_fmadd_ps(b, kv, cv)) } else { (a, b) };
            if K == F32 {
                let q = (d as *mut f32).add(i);
                if stream {
                    _mm512_stream_ps(q, a);
                    _mm512_stream_ps(q.add(16), b);
                } else {
                    _mm512_storeu_ps(q, a);
                    _mm512_storeu_ps(q.add(16), b);
                }
                i += 32;
                continue;
            }
            let w = if K == BF16 && NE {
                let sub = _mm512_fpclass_ps_mask::<0x20>(a) | _mm512_fpclass_ps_mask::<0x20>(b);
                if sub == 0 {
                    std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(b, a))
                } else {
                    _mm512_permutex2var_epi16(round_bf16(a), pick, round_bf16(b))
                }
            } else if K == BF16 {
                _mm512_permutex2var_epi16(round_bf16(a), pick, round_bf16(b))
            } else {
                const R: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(_mm512_cvtps_ph::<R>(a)), _mm512_cvtps_ph::<R>(b))
            };
            let q = (d as *mut u16).add(i) as *mut __m512i;
            if stream {
                _mm512_stream_si512(q, w);
            } else {
                _mm512_storeu_si512(q, w);
            }
        }
        i += 32;
    }
    // SAFETY: i <= n.
    unsafe { narrow_part::<K, SCALE>(s, d, i, n, kv, cv) };
    if stream {
        // Streaming stores are weakly ordered: fence them before the row is handed on.
        _mm_sfence();
    }
}

/// A block whose maximum is within this of 0 is summed as `exp(x_j)` (no subtraction, no clamp:
/// two instructions fewer per 16 lanes), then scaled by `exp(-max)` in f64. Its terms stay
/// normal f32 (no term that matters sits below `exp(-87)`, nor the sum of a block above
/// `2048 exp(64)`), and the reduction's `|x| 2.7e-9` stays under 1.8e-7 relative.
const PLAIN_LIMIT: f32 = 64.0;

/// Elements per block of [`lse_k`] (in L1 between its two reads).
const ONLINE_BLOCK: usize = 4 * BLOCK;

/// `dst_j = k src_j - c0` in f32, with streaming stores for long rows (as [`narrow_k`]).
///
/// # Safety
/// The CPU has AVX-512F/BW/VL.
pub unsafe fn scale_store(src: &[f32], k: f32, c0: f32, dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    // SAFETY: `dst` holds src.len() f32; the caller's CPU features.
    unsafe { narrow_int::<F32, true>(src, k, c0, dst.as_mut_ptr() as *mut u8) }
}

/// How far beyond the next block [`lse_k`] prefetches, in bytes.
const PREFETCH_DIST: usize = 2048;

/// Rows at least this long (elements) are written with streaming stores.
const STREAM_MIN: usize = 4096;

/// [`narrow_k`] of elements `i0..i1`, 16 at a time with masked loads and stores.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn narrow_part<const K: u8, const SCALE: bool>(
    s: *const f32,
    d: *mut u8,
    i0: usize,
    i1: usize,
    kv: __m512,
    cv: __m512,
) {
    let mut i = i0;
    while i < i1 {
        let m = (i1 - i).min(16);
        let mask = lanes(m);
        // SAFETY: masked loads and stores touch only the m elements from i, which the caller owns.
        unsafe {
            let x = _mm512_maskz_loadu_ps(mask, s.add(i));
            let x = if SCALE { _mm512_fmadd_ps(x, kv, cv) } else { x };
            if K == F32 {
                _mm512_mask_storeu_ps((d as *mut f32).add(i), mask, x);
                i += m;
                continue;
            }
            let h = if K == BF16 {
                _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(round_bf16(x)))
            } else {
                _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x)
            };
            _mm256_mask_storeu_epi16((d as *mut i16).add(i), mask, h);
        }
        i += m;
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
        let want: f64 = x.iter().map(|&v| (v as f64).exp()).sum();
        assert!(((s + ties - want) / want).abs() < 1e-7, "{s} + {ties} vs {want}");
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

    #[test]
    fn table_exponential_for_sums_stays_within_its_stated_bound() {
        if !available() {
            return;
        }
        // The table is 2^(j/32) rounded to nearest f32.
        // SAFETY: two `__m512`s are 32 f32s.
        let table: [f32; 32] = unsafe { std::mem::transmute((EXP2_32NDS.0, EXP2_32NDS.1)) };
        for (j, &t) in table.iter().enumerate() {
            assert_eq!(t, 2f64.powf(j as f64 / 32.0) as f32, "entry {j}");
        }
        // Every f32 step of 2^-14 over [-20, 0], which covers each table entry and both ends of
        // the reduced range many times, and the values the clamp and scaling must get right.
        let mut x: Vec<f32> = (0..=20 << 14).map(|i| -(i as f32) / 16384.0).collect();
        x.extend([-87.0, -100.0, -103.9, -109.9, -1e-30, -0.0, -1e30, f32::NEG_INFINITY, f32::MIN]);
        let mut worst = 0.0f64;
        for c in x.chunks(16) {
            let mut v = [f32::NEG_INFINITY; 16];
            v[..c.len()].copy_from_slice(c);
            // SAFETY: AVX-512 was just detected.
            let e: [f32; 16] =
                unsafe { std::mem::transmute(exp16_for_sum(std::mem::transmute::<[f32; 16], __m512>(v))) };
            for (&e, &v) in e.iter().zip(&v) {
                let w = (v as f64).exp();
                let rel = (e as f64 - w).abs() / w;
                if v >= -87.0 {
                    // The stated bound: 2.5e-7 relative, plus |x| 2.7e-9 from the one-f32 ln 2.
                    assert!(rel <= 2.5e-7 + 2.7e-9 * -(v as f64), "exp({v}) = {e}, want {w}");
                    if v >= -10.0 {
                        worst = worst.max(rel);
                    }
                } else {
                    // Below the normal range: as close as the subnormal spacing allows, then 0.
                    assert!((e as f64 - w).abs() <= 2.0 * 1.4e-45 + 1e-6 * w, "exp({v}) = {e}, want {w}");
                }
            }
        }
        assert!(worst > 5e-8, "the test reaches the worst case ({worst})");
        let nan: [f32; 16] = unsafe { std::mem::transmute(exp16_for_sum(_mm512_set1_ps(f32::NAN))) };
        assert!(nan.iter().all(|v| v.is_nan()));
        // Unclamped, as a block within PLAIN_LIMIT sums it: the same bound over [-87, 88] in
        // steps of 2^-10, and never a finite wrong value below the range.
        let one = |x: f32| {
            // SAFETY: AVX-512 was just detected.
            let e: [f32; 16] = unsafe { std::mem::transmute(exp16_table(_mm512_set1_ps(x))) };
            e[0]
        };
        for i in -(87 << 10)..=(88 << 10) {
            let x = i as f32 / 1024.0;
            let (e, w) = (one(x), (x as f64).exp());
            assert!((e as f64 - w).abs() / w <= 2.5e-7 + 2.7e-9 * x.abs() as f64, "exp({x}) = {e}, want {w}");
        }
        for x in [-100.0, -1e3, -1e7, -1e20, -1e30, -2e38, f32::MIN, f32::NEG_INFINITY] {
            let (e, w) = (one(x), (x as f64).exp());
            assert!(!e.is_finite() || (e as f64 - w).abs() <= 2.0 * 1.4e-45, "exp({x}) = {e}");
        }
        assert!(one(f32::NAN).is_nan());
    }

    /// Values exactly representable in bf16 and in f16, with ties of the maximum.
    fn row16(n: usize) -> Vec<f32> {
        (0..n).map(|i| if i % 97 == 5 { 3.0 } else { ((i * 7919) % 211) as f32 * -0.0625 }).collect()
    }

    #[test]
    fn sixteen_bit_max_on_raw_words_skips_nan_as_the_f32_loop() {
        if !available() {
            return;
        }
        let want = |x: &[f32]| x.iter().copied().filter(|v| !v.is_nan()).fold(f32::NEG_INFINITY, f32::max);
        let (inf, nan) = (f32::INFINITY, f32::NAN);
        let cases: Vec<Vec<f32>> = vec![
            vec![],
            vec![-0.0],
            vec![0.0, -0.0],
            vec![-3.0, -0.5, -7.0],
            vec![-3.0, 2.0, -7.0, 0.25],
            vec![-inf, -inf],
            vec![nan, -inf],
            vec![-nan, -2.0],
            vec![nan, 1.5, -nan],
            vec![nan],
            vec![-1e-40, -5.0],
            vec![inf, nan, 3.0],
        ];
        for base in cases {
            // Each case at several lengths and positions: the 64-word loop, the masked tail.
            // The longest pads a run past ONLINE_BLOCK, which tracks both extremes in one read.
            for (pad, at) in [(0, 0), (37, 5), (130, 100), (64, 63), (5000, 4100)] {
                let mut x = vec![-100.0f32; pad];
                for (j, &v) in base.iter().enumerate() {
                    x.insert((at + j).min(x.len()), v);
                }
                let b: Vec<u16> = x.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
                let h: Vec<u16> = x.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
                let wb = want(&b.iter().map(|&v| half::bf16::from_bits(v).to_f32()).collect::<Vec<_>>());
                let wh = want(&h.iter().map(|&v| half::f16::from_bits(v).to_f32()).collect::<Vec<_>>());
                // SAFETY: AVX-512 was just detected; each row holds x.len() elements.
                let (mb, mh) = unsafe {
                    (max_k::<BF16>(b.as_ptr() as *const u8, x.len()), max_k::<F16>(h.as_ptr() as *const u8, x.len()))
                };
                assert_eq!(mb, wb, "bf16 {x:?}");
                assert_eq!(mh, wh, "f16 {x:?}");
            }
        }
    }

    #[test]
    fn sixteen_bit_rows_read_in_registers_match_the_f32_loops() {
        if !available() {
            return;
        }
        for n in [0, 1, 15, 16, 17, 31, 33, 63, 64, 65, 511, 512, 513, 1000, 4099] {
            let x = row16(n);
            let b: Vec<u16> = x.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
            let h: Vec<u16> = x.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
            // SAFETY: AVX-512 was just detected; each row holds n elements.
            unsafe {
                let m = max(&x);
                assert_eq!(max_k::<BF16>(b.as_ptr() as *const u8, n), m, "bf16 max, n = {n}");
                assert_eq!(max_k::<F16>(h.as_ptr() as *const u8, n), m, "f16 max, n = {n}");
                let mut want = vec![0.0; n];
                let (s, ties) = exp_sum(&x, m, Some(&mut want), &[]);
                for (raw, k) in [(&b, BF16), (&h, F16)] {
                    let p = raw.as_ptr() as *const u8;
                    let mut got = vec![0.0; n];
                    let (s1, t1) = if k == BF16 {
                        exp_sum_k::<BF16, false>(p, n, m, Some(&mut got), &[])
                    } else {
                        exp_sum_k::<F16, false>(p, n, m, Some(&mut got), &[])
                    };
                    assert_eq!(got, want, "stored exponentials, n = {n}");
                    assert_eq!((s1, t1), (s, ties), "sum with stores, n = {n}");
                    // The sum alone reads lanes in another order: equal to f32 rounding.
                    let (s2, t2) = if k == BF16 {
                        exp_sum_k::<BF16, false>(p, n, m, None, &[])
                    } else {
                        exp_sum_k::<F16, false>(p, n, m, None, &[])
                    };
                    assert_eq!(t2, ties);
                    assert!((s2 - s).abs() <= 1e-6 * s.abs(), "{s2} vs {s}, n = {n}");
                }
            }
        }
    }

    #[test]
    fn fused_scale_and_rounding_matches_half_on_streamed_rows() {
        if !available() {
            return;
        }
        let mut x: Vec<f32> = (0..9000).map(|i| ((i * 7919) % 4001) as f32 * 1.37e-4 - 0.2).collect();
        x[17] = f32::NAN;
        x[4500] = 1e-39;
        x[4501] = -3e-39;
        x[8999] = f32::INFINITY;
        // Rounding alone (k = 1, c0 = 0 and no scaling) keeps the subnormals.
        let mut plain = vec![0u16; x.len() + 1];
        // SAFETY: AVX-512 was just detected.
        unsafe { narrow_k::<BF16, false>(&x, 0.0, 0.0, &mut plain[1..]) };
        for (j, &v) in x.iter().enumerate().filter(|(_, v)| !v.is_nan()) {
            assert_eq!(plain[1 + j], half::bf16::from_f32(v).to_bits(), "bf16 of {v:e}");
        }
        let (k, c0) = (0.731f32, 0.0123f32);
        // Offsets 0..3 put the first 64-byte boundary (where streaming starts) at every phase.
        for off in 0..4 {
            for n in [4095, 4096, 4097, 8999 - off] {
                let src = &x[..n];
                let mut buf = vec![0u16; n + off];
                // SAFETY: AVX-512 was just detected.
                unsafe { narrow_k::<BF16, true>(src, k, c0, &mut buf[off..]) };
                let mut fb = vec![0u16; n + off];
                unsafe { narrow_k::<F16, true>(src, k, c0, &mut fb[off..]) };
                let mut f = vec![0f32; n + off];
                unsafe { scale_store(src, k, c0, &mut f[off..]) };
                for (j, &v) in src.iter().enumerate() {
                    let g = v.mul_add(k, -c0);
                    assert!(f[off + j].to_bits() == g.to_bits() || g.is_nan(), "f32 at {j}, offset {off}");
                }
                for (j, &v) in src.iter().enumerate() {
                    let g = v.mul_add(k, -c0);
                    let (wb, wh) = (half::bf16::from_f32(g), half::f16::from_f32(g));
                    if g.is_nan() {
                        assert!(
                            half::bf16::from_bits(buf[off + j]).is_nan() && half::f16::from_bits(fb[off + j]).is_nan()
                        );
                    } else {
                        assert_eq!(buf[off + j], wb.to_bits(), "bf16 at {j}, offset {off}, n {n}");
                        assert_eq!(fb[off + j], wh.to_bits(), "f16 at {j}, offset {off}, n {n}");
                    }
                }
            }
        }
    }

    #[test]
    fn one_read_lse_matches_the_two_pass_form() {
        if !available() {
            return;
        }
        let two_pass = |x: &[f32]| {
            // SAFETY: AVX-512 was just detected.
            let m = unsafe { max(x) };
            let (s, t) = unsafe { exp_sum(x, m, None, &[]) };
            (m, s, t)
        };
        let mut rows: Vec<Vec<f32>> = Vec::new();
        for n in [1, 16, 100, 2047, 2048, 2049, 5000, 9000] {
            rows.push(row16(n));
            // A confident row whose maximum sits in a late block, with ties in two blocks.
            let mut c: Vec<f32> = (0..n).map(|i| -30.0 - (i % 13) as f32).collect();
            c[n - 1] = 5.0;
            rows.push(c.clone());
            c[n / 3] = 5.0;
            rows.push(c);
        }
        // Whole blocks of -inf before and after the maximum; one with a NaN in it.
        let mut inf: Vec<f32> = vec![f32::NEG_INFINITY; 7000];
        inf[3000] = 1.0;
        inf[3001] = -2.0;
        rows.push(inf.clone());
        inf[6500] = f32::NAN;
        rows.push(inf);
        rows.push(vec![f32::NEG_INFINITY; 3000]);
        let mut pinf = row16(4000);
        pinf[100] = f32::INFINITY;
        rows.push(pinf);
        // Values far below their block's maximum, which the exponential must clamp: finite
        // masks such as the format's lowest value, and non-negative values far below a large
        // maximum. (All exact in bf16; the ones in f16's range exact there too.)
        let lowest_bf16 = half::bf16::MIN.to_f32();
        for (far, at) in [(lowest_bf16, 10), (-(2f32.powi(100)), 2100), (-992.0, 5), (-1008.0, 5), (-1048576.0, 4000)] {
            let mut x = row16(4500);
            x[at] = far;
            rows.push(x);
        }
        let mut big = vec![0.5f32; 3000];
        big[7] = 2f32.powi(127);
        big[2500] = 2f32.powi(100);
        rows.push(big);
        // Maxima at both edges of PLAIN_LIMIT and past them; -inf masks and far values (whose
        // unclamped exponentials may be inf or NaN) in a row summed without the subtraction.
        for shift in [-70.0, -64.0, -40.0, 40.0, 60.75, 64.0, 64.5, 70.0] {
            rows.push(row16(5000).iter().map(|v| v + shift).collect());
        }
        for far in [f32::NEG_INFINITY, -3e38, -1e30] {
            let mut x = row16(7000);
            x[2100] = far;
            x[4500] = far;
            rows.push(x);
        }
        for x in &rows {
            let (m, s, t) = two_pass(x);
            // SAFETY: AVX-512 was just detected; `x` holds x.len() f32 values.
            // What the callers use: the sum over all but one occurrence of the maximum, which
            // for a confident row is tiny and must keep its relative precision.
            let s = s + (t - 1.0);
            let (m1, s1, t1) = unsafe { lse_k::<F32>(x.as_ptr() as *const u8, x.len(), &[]) };
            let s1 = s1 + (t1 - 1.0);
            assert_eq!(m1, m, "max, n = {}", x.len());
            if s.is_nan() {
                assert!(s1.is_nan(), "NaN sum, n = {}", x.len());
            } else {
                assert!((s1 - s).abs() <= 2e-7 * s.abs(), "{s1} vs {s}, n = {}", x.len());
            }
            let same = |(m2, s2, t2): (f32, f64, f64), what: &str| {
                let s2 = s2 + (t2 - 1.0);
                assert_eq!(m2, m, "{what}, n = {}", x.len());
                assert!(
                    s2 == s1 || (s2 - s1).abs() <= 2e-7 * s1.abs() || (s2.is_nan() && s1.is_nan()),
                    "{what}: {s2} vs {s1}, n = {}",
                    x.len()
                );
            };
            if x.iter().all(|v| v.is_nan() || half::bf16::from_f32(*v).to_f32() == *v) {
                let b: Vec<u16> = x.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
                same(unsafe { lse_k::<BF16>(b.as_ptr() as *const u8, b.len(), &[]) }, "bf16");
            }
            if x.iter().all(|v| v.is_nan() || half::f16::from_f32(*v).to_f32() == *v) {
                let h: Vec<u16> = x.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
                same(unsafe { lse_k::<F16>(h.as_ptr() as *const u8, h.len(), &[]) }, "f16");
            }
        }
    }
}
