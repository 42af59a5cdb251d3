//! The constants that the portable/AVX2 row primitives (`simd`) and the AVX-512 ones
//! (`avx512`) share, so that both paths agree lane for lane: the exponential's range
//! reduction and polynomial, and the block after which lane sums are flushed into f64. Kept
//! apart so that neither file imports the other for them.

/// Lane partial sums are flushed into f64 every this many elements, so a long row is summed
/// pairwise-ish (f32 within a block, f64 across blocks).
pub(crate) const BLOCK: usize = 512;

// The exponential of both paths (portable `exp8` and `avx2::exp8`), so they agree lane for lane:
// x = n ln2 + r with ln2 split in two for an exact product, then a degree-6 polynomial.
pub(crate) const LOG2E: f32 = std::f32::consts::LOG2_E;
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
pub(crate) const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
/// Below this the result is 0 (and 2^n would underflow).
pub(crate) const EXP_MIN: f32 = -87.0;
/// `exp(r) = 1 + r (1 + r q(r))` on |r| <= ln2/2 with q of degree 4, all in Horner form from
/// the highest coefficient: a minimax fit of relative error 3e-9, so with FMA the f32 result is
/// within 1.3 ulp of exp (the rounding of the last steps; the form `1 + r + r^2 q` was within
/// 2 ulp and took one instruction more).
pub(crate) const EXP_POLY: [f32; 5] = [1.381_574_9e-3, 8.368_71e-3, 4.166_836_7e-2, 1.666_652_1e-1, 0.499_999_94];
