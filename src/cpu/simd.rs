//! Row primitives of the fast CPU path, written as 8-lane loops that LLVM vectorises.
//!
//! Each primitive is compiled twice: once for the baseline target and once with AVX2+FMA, picked
//! at run time. The exponential is a Cephes-style polynomial (max error about 1 ulp over the
//! range used here), because `f32::exp` is a libm call that does not vectorise.

const LANES: usize = 8;
/// Lane partial sums are flushed into f64 every this many elements, so a long row is summed
/// pairwise-ish (f32 within a block, f64 across blocks).
const BLOCK: usize = 512;

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// exp(x) for x <= 0 (the max-subtracted logits); returns exactly 0 below the f32 range and for -inf.
#[inline(always)]
fn exp_neg<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
                                     // Written as a select (not f32::max) so that NaN stays NaN.
    let xc = if x < -87.0 { -87.0 } else { x };
    let t = madd::<FMA>(xc, LOG2E, ROUND);
    let n = t - ROUND;
    let r = madd::<FMA>(n, -LN2_HI, xc);
    let r = madd::<FMA>(n, -LN2_LO, r);
    let mut p = 1.987_569_1e-4_f32;
    p = madd::<FMA>(p, r, 1.398_199_9e-3);
    p = madd::<FMA>(p, r, 8.333_452e-3);
    p = madd::<FMA>(p, r, 4.166_579_6e-2);
    p = madd::<FMA>(p, r, 1.666_666_5e-1);
    p = madd::<FMA>(p, r, 0.5);
    let p = madd::<FMA>(p, r * r, r + 1.0);
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let scale = f32::from_bits(((ni + 127) << 23) as u32);
    let y = p * scale;
    if x < -87.0 {
        0.0
    } else {
        y
    }
}

#[inline(always)]
fn max_argmax_body(x: &[f32]) -> (f32, usize) {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut idx = [0u32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rem = chunks.remainder();
    for (c, ch) in chunks.enumerate() {
        for l in 0..LANES {
            let take = ch[l] > m[l];
            m[l] = if take { ch[l] } else { m[l] };
            idx[l] = if take { (c * LANES + l) as u32 } else { idx[l] };
        }
    }
    let mut best = f32::NEG_INFINITY;
    let mut bi = usize::MAX;
    for l in 0..LANES {
        if m[l] > best || (m[l] == best && (idx[l] as usize) < bi) {
            best = m[l];
            bi = idx[l] as usize;
        }
    }
    let base = x.len() - rem.len();
    for (i, &v) in rem.iter().enumerate() {
        if v > best {
            best = v;
            bi = base + i;
        }
    }
    if bi == usize::MAX {
        // All -inf (or NaN): any index will do; the sums below turn it into NaN.
        bi = 0;
    }
    (best, bi)
}

#[inline(always)]
fn exp_sum_body<const FMA: bool>(x: &[f32], m: f32, mut out: Option<&mut [f32]>) -> f64 {
    let mut total = 0.0f64;
    for (b, xb) in x.chunks(BLOCK).enumerate() {
        let mut acc = [0.0f32; LANES];
        let chunks = xb.chunks_exact(LANES);
        let rem = chunks.remainder();
        match out.as_deref_mut() {
            Some(o) => {
                let ob = &mut o[b * BLOCK..b * BLOCK + xb.len()];
                for (ch, oc) in chunks.zip(ob.chunks_exact_mut(LANES)) {
                    for l in 0..LANES {
                        let e = exp_neg::<FMA>(ch[l] - m);
                        oc[l] = e;
                        acc[l] += e;
                    }
                }
                let base = xb.len() - rem.len();
                for (i, &v) in rem.iter().enumerate() {
                    let e = exp_neg::<FMA>(v - m);
                    ob[base + i] = e;
                    acc[0] += e;
                }
            }
            None => {
                for ch in chunks {
                    for l in 0..LANES {
                        acc[l] += exp_neg::<FMA>(ch[l] - m);
                    }
                }
                for &v in rem {
                    acc[0] += exp_neg::<FMA>(v - m);
                }
            }
        }
        total += acc.iter().map(|&a| a as f64).sum::<f64>();
    }
    total
}

#[inline(always)]
fn dot_body(x: &[f32], w: Option<&[f32]>) -> (f64, f64) {
    // Returns (sum w*x, sum w); with no weights, w = 1.
    let mut sx = 0.0f64;
    let mut sw = 0.0f64;
    for (b, xb) in x.chunks(BLOCK).enumerate() {
        let mut ax = [0.0f32; LANES];
        let mut aw = [0.0f32; LANES];
        match w {
            Some(w) => {
                let wb = &w[b * BLOCK..b * BLOCK + xb.len()];
                for (i, (&xv, &wv)) in xb.iter().zip(wb).enumerate() {
                    ax[i % LANES] += xv * wv;
                    aw[i % LANES] += wv;
                }
            }
            None => {
                for (i, &xv) in xb.iter().enumerate() {
                    ax[i % LANES] += xv;
                }
                sw += xb.len() as f64;
            }
        }
        sx += ax.iter().map(|&a| a as f64).sum::<f64>();
        sw += aw.iter().map(|&a| a as f64).sum::<f64>();
    }
    (sx, sw)
}

#[inline(always)]
fn scale_shift_body<const FMA: bool>(e: &mut [f32], k: f32, c0: f32, w: Option<&[f32]>) {
    match w {
        Some(w) => {
            for (g, &wv) in e.iter_mut().zip(w) {
                *g = madd::<FMA>(*g, k, -c0 * wv);
            }
        }
        None => {
            for g in e.iter_mut() {
                *g = madd::<FMA>(*g, k, -c0);
            }
        }
    }
}

#[inline(always)]
fn log_softmax_body(x: &[f32], m: f32, l: f32, out: &mut [f32]) {
    // (x - m) first: exact near the max, so confident rows keep their tiny log-probabilities.
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v - m) - l;
    }
}

macro_rules! multiversion {
    ($(#[$doc:meta])* pub fn $name:ident($($arg:ident : $ty:ty),*) -> $ret:ty => $body:ident $(::<$fma:tt>)?;) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn fast($($arg: $ty),*) -> $ret {
                        $body $(::<$fma>)? ($($arg),*)
                    }
                    // SAFETY: the CPU was just checked for AVX2 and FMA.
                    return unsafe { fast($($arg),*) };
                }
            }
            multiversion!(@plain $body $(, $fma)?)($($arg),*)
        }
    };
    (@plain $body:ident, true) => { $body::<false> };
    (@plain $body:ident) => { $body };
}

multiversion! {
    /// The row maximum and the index of its first occurrence.
    pub fn max_argmax(x: &[f32]) -> (f32, usize) => max_argmax_body;
}
multiversion! {
    /// `sum_j exp(x_j - m)` in f64, optionally storing each `exp(x_j - m)` in `out`.
    pub fn exp_sum(x: &[f32], m: f32, out: Option<&mut [f32]>) -> f64 => exp_sum_body::<true>;
}
multiversion! {
    /// `(sum_j w_j x_j, sum_j w_j)` in f64 (w = 1 when `None`).
    pub fn weighted_sum(x: &[f32], w: Option<&[f32]>) -> (f64, f64) => dot_body;
}
multiversion! {
    /// `e_j <- k e_j - c0 w_j` (w = 1 when `None`): turns exponentials into a gradient row.
    pub fn scale_shift(e: &mut [f32], k: f32, c0: f32, w: Option<&[f32]>) -> () => scale_shift_body::<true>;
}
multiversion! {
    /// `out_j = (x_j - m) - l`.
    pub fn log_softmax_row(x: &[f32], m: f32, l: f32, out: &mut [f32]) -> () => log_softmax_body;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_to_two_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let got = exp_neg::<false>(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp_neg::<false>(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_neg::<false>(0.0), 1.0);
        assert!(exp_neg::<false>(f32::NAN).is_nan());
    }

    #[test]
    fn sums_match_f64() {
        let x: Vec<f32> = (0..10_007)
            .map(|i| ((i * 7919) % 1000) as f32 * -0.01)
            .collect();
        let want: f64 = x.iter().map(|&v| (v as f64).exp()).sum();
        let mut out = vec![0.0; x.len()];
        let got = exp_sum(&x, 0.0, Some(&mut out));
        assert!(((got - want) / want).abs() < 1e-7);
        assert_eq!(max_argmax(&x), (0.0, 0));
        let (s, n) = weighted_sum(&x, None);
        assert_eq!(n, x.len() as f64);
        let want: f64 = x.iter().map(|&v| v as f64).sum();
        assert!((s - want).abs() < 1e-9 * want.abs().max(1.0) * 1e3);
    }
}
