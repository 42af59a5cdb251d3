//! Row primitives of the fast CPU path, written as 8-lane loops that LLVM vectorises.
//!
//! Each primitive is compiled twice: once for the baseline target and once with AVX2+FMA, picked
//! at run time; the hottest also have 16-lane AVX-512 versions (`super::avx512`). The exponential
//! is a minimax polynomial (max error about 2 ulp over the range used here), because `f32::exp`
//! is a libm call that does not vectorise.

use super::exp_consts::{BLOCK, EXP_MIN, EXP_POLY, LN2_HI, LN2_LO, LOG2E, ROUND};

const LANES: usize = 8;

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

type V8 = [f32; LANES];

/// exp(x) for x <= 0 (the max-subtracted logits), 8 lanes at a time; exactly 0 below the f32
/// range and for -inf, NaN for NaN. Each step is a separate lane loop so that LLVM emits
/// packed instructions.
#[inline(always)]
fn exp8<const FMA: bool>(x: V8) -> V8 {
    let mut xc = [0.0; LANES];
    let mut t = [0.0; LANES];
    let mut r = [0.0; LANES];
    let mut p = [0.0; LANES];
    let mut out = [0.0; LANES];
    for l in 0..LANES {
        // A select (not f32::max) so that NaN stays NaN.
        xc[l] = if x[l] < EXP_MIN { EXP_MIN } else { x[l] };
    }
    for l in 0..LANES {
        t[l] = madd::<FMA>(xc[l], LOG2E, ROUND);
    }
    for l in 0..LANES {
        let n = t[l] - ROUND;
        r[l] = madd::<FMA>(n, -LN2_LO, madd::<FMA>(n, -LN2_HI, xc[l]));
    }
    for l in 0..LANES {
        let q = EXP_POLY[1..].iter().fold(EXP_POLY[0], |q, &c| madd::<FMA>(q, r[l], c));
        p[l] = madd::<FMA>(madd::<FMA>(q, r[l], 1.0), r[l], 1.0);
    }
    for l in 0..LANES {
        let ni = (t[l].to_bits() as i32).wrapping_sub(0x4B40_0000);
        let scale = f32::from_bits(((ni + 127) << 23) as u32);
        out[l] = if x[l] < EXP_MIN { 0.0 } else { p[l] * scale };
    }
    out
}

#[cfg(test)]
fn exp_neg<const FMA: bool>(x: f32) -> f32 {
    exp8::<FMA>([x; LANES])[0]
}

#[inline(always)]
fn max_body(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rem = chunks.remainder();
    for ch in chunks {
        for l in 0..LANES {
            m[l] = if ch[l] > m[l] { ch[l] } else { m[l] };
        }
    }
    let mut best = f32::NEG_INFINITY;
    for v in m.into_iter().chain(rem.iter().copied()) {
        best = if v > best { v } else { best };
    }
    best
}

/// `(sum over x_j != m of exp(x_j - m), count of x_j == m)`: the max's own 1 (and the 1 of
/// every tie) is kept out of the f32 sums and added back exactly by the caller.
#[inline(always)]
fn exp_acc<const FMA: bool>(d: V8, acc: &mut V8, cnt: &mut V8) -> V8 {
    let e = exp8::<FMA>(d);
    for l in 0..LANES {
        let is_max = d[l] == 0.0;
        acc[l] += if is_max { 0.0 } else { e[l] };
        cnt[l] += if is_max { 1.0 } else { 0.0 };
    }
    e
}

#[inline(always)]
fn exp_sum_body<const FMA: bool>(x: &[f32], m: f32, mut out: Option<&mut [f32]>) -> (f64, f64) {
    let mut total = 0.0f64;
    let mut ties = 0.0f64;
    for (b, xb) in x.chunks(BLOCK).enumerate() {
        let mut acc = [0.0f32; LANES];
        let mut cnt = [0.0f32; LANES];
        let mut ob = out.as_deref_mut().map(|o| &mut o[b * BLOCK..b * BLOCK + xb.len()]);
        let chunks = xb.chunks_exact(LANES);
        let rem = chunks.remainder();
        match ob.as_deref_mut() {
            Some(o) => {
                for (ch, oc) in chunks.zip(o.chunks_exact_mut(LANES)) {
                    let d: V8 = std::array::from_fn(|l| ch[l] - m);
                    oc.copy_from_slice(&exp_acc::<FMA>(d, &mut acc, &mut cnt));
                }
            }
            None => {
                for ch in chunks {
                    let d: V8 = std::array::from_fn(|l| ch[l] - m);
                    exp_acc::<FMA>(d, &mut acc, &mut cnt);
                }
            }
        }
        if !rem.is_empty() {
            // Tail padded with -inf, whose exponential is 0.
            let mut d = [f32::NEG_INFINITY; LANES];
            d.iter_mut().zip(rem).for_each(|(d, &v)| *d = v - m);
            let e = exp_acc::<FMA>(d, &mut acc, &mut cnt);
            if let Some(o) = ob {
                let base = xb.len() - rem.len();
                o[base..].copy_from_slice(&e[..rem.len()]);
            }
        }
        total += acc.iter().map(|&a| a as f64).sum::<f64>();
        ties += cnt.iter().map(|&a| a as f64).sum::<f64>();
    }
    (total, ties)
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

#[inline(always)]
fn soft_sums_body(z: &[f32], y: &[f32], w: Option<&[f32]>, a: f32, b: f32) -> (f64, f64) {
    let (mut sz, mut sq) = (0.0f64, 0.0f64);
    for (i, (zb, yb)) in z.chunks(BLOCK).zip(y.chunks(BLOCK)).enumerate() {
        let mut az = [0.0f32; LANES];
        let mut aq = [0.0f32; LANES];
        let wb = w.map(|w| &w[i * BLOCK..i * BLOCK + zb.len()]);
        for (j, (&zv, &yv)) in zb.iter().zip(yb).enumerate() {
            let q = a * yv + b;
            let q = wb.map_or(q, |w| q * w[j]);
            az[j % LANES] += q * zv;
            aq[j % LANES] += q;
        }
        sz += az.iter().map(|&v| v as f64).sum::<f64>();
        sq += aq.iter().map(|&v| v as f64).sum::<f64>();
    }
    (sz, sq)
}

#[inline(always)]
fn soft_grad_body(g: &mut [f32], y: &[f32], w: Option<&[f32]>, qa: f32, qb: f32, k: f32, c: f32) {
    match w {
        Some(w) => g.iter_mut().zip(y).zip(w).for_each(|((g, &yv), &wv)| *g = k * *g - c * wv * (qa * yv + qb)),
        None => g.iter_mut().zip(y).for_each(|(g, &yv)| *g = k * *g - c * (qa * yv + qb)),
    }
}

#[inline(always)]
fn count_greater_body(x: &[f32], t: f32) -> usize {
    let mut c = [0u32; LANES];
    for (i, &v) in x.iter().enumerate() {
        c[i % LANES] += (v > t) as u32;
    }
    c.iter().map(|&k| k as usize).sum()
}

/// `sum_j e_j (z_j - m)` in f32 lanes folded into f64 per [`BLOCK`] (every term <= 0 where
/// `m` is the maximum: no cancellation).
#[inline(always)]
fn centred_sum_body(z: &[f32], e: &[f32], m: f32) -> f64 {
    let mut total = 0.0f64;
    for (zb, eb) in z.chunks(BLOCK).zip(e.chunks(BLOCK)) {
        let mut acc = [0.0f32; LANES];
        let (zc, ec) = (zb.chunks_exact(LANES), eb.chunks_exact(LANES));
        let tail: f32 = zc.remainder().iter().zip(ec.remainder()).map(|(&zv, &ev)| ev * (zv - m)).sum();
        for (z8, e8) in zc.zip(ec) {
            for l in 0..LANES {
                acc[l] += e8[l] * (z8[l] - m);
            }
        }
        total += acc.iter().map(|&a| a as f64).sum::<f64>() + tail as f64;
    }
    total
}

#[inline(always)]
fn logprob_grad_body<const FMA: bool>(g: &mut [f32], e: &[f32], m: f32, k: f32, a: f32, b: f32, mu_m: f32) {
    for (g, &ev) in g.iter_mut().zip(e) {
        *g = k * ev * madd::<FMA>(b, (*g - m) - mu_m, a);
    }
}

/// ln(x) on 8 lanes, one step per loop and selects only, so that LLVM emits packed
/// instructions (as [`exp8`]): `x = 2^k f` with `f` in `[sqrt(1/2), sqrt(2))` (subnormals
/// scaled by 2^23 first), `ln f = 2 atanh(u)` with `u = (f - 1) / (f + 1)` (`|u| <= 0.1716`)
/// summed to `u^11` (series truncation below 1e-9 relative), `k ln 2` with ln 2 split in two.
/// Within one ulp of ln for positive finite `x` (`ln_is_within_one_ulp` sweeps it);
/// `ln(0) = -inf`, `ln(+inf) = +inf`, NaN for negative `x` and NaN.
#[inline(always)]
fn ln8<const FMA: bool>(x: V8) -> V8 {
    const SQRT_HALF_BITS: i32 = 0x3f35_04f3;
    let mut bits = [0i32; LANES];
    let mut k = [0.0f32; LANES];
    let mut u = [0.0f32; LANES];
    let mut out = [0.0f32; LANES];
    for l in 0..LANES {
        let xs = if x[l] < f32::MIN_POSITIVE { x[l] * 8_388_608.0 } else { x[l] };
        bits[l] = xs.to_bits() as i32;
    }
    for l in 0..LANES {
        let e = bits[l].wrapping_sub(SQRT_HALF_BITS) >> 23;
        let f = f32::from_bits(bits[l].wrapping_sub(e << 23) as u32);
        k[l] = e as f32 - if x[l] < f32::MIN_POSITIVE { 23.0 } else { 0.0 };
        u[l] = (f - 1.0) / (f + 1.0);
    }
    for l in 0..LANES {
        let u2 = u[l] * u[l];
        let q =
            [1.0 / 11.0, 1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0].iter().fold(0.0f32, |q, &c| madd::<FMA>(q, u2, c));
        let lnf = madd::<FMA>(2.0 * u[l], q * u2, 2.0 * u[l]);
        out[l] = madd::<FMA>(k[l], LN2_HI, madd::<FMA>(k[l], LN2_LO, lnf));
    }
    for l in 0..LANES {
        let v = x[l];
        let r = if v == f32::INFINITY { f32::INFINITY } else { out[l] };
        let r = if v == 0.0 { f32::NEG_INFINITY } else { r };
        // Negative or NaN (a NaN fails every comparison).
        out[l] = if (v >= 0.0) as u8 == 0 { f32::NAN } else { r };
    }
    out
}

/// One 8-lane step of the generalised JSD's sums: `lm` stored, the two terms added.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn jsd_step<const FMA: bool>(
    e: (&[f32], &[f32]),
    z: (&[f32], &[f32]),
    k: (f32, f32),
    lse: (f32, f32),
    beta: f32,
    lm: &mut [f32],
    acc: (&mut V8, &mut V8),
) {
    let lanes = |x: &[f32]| -> V8 { x.try_into().expect("8 lanes") };
    let (e0, e1, z0, z1) = (lanes(e.0), lanes(e.1), lanes(z.0), lanes(z.1));
    let (mut ps, mut pt, mut mix) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
    for l in 0..LANES {
        ps[l] = k.0 * e0[l];
        pt[l] = k.1 * e1[l];
        mix[l] = madd::<FMA>(beta, pt[l], (1.0 - beta) * ps[l]);
    }
    let m = ln8::<FMA>(mix);
    lm.copy_from_slice(&m);
    for l in 0..LANES {
        // A class whose mixture underflowed (log m = -inf) adds nothing: its p is too. (Selects
        // of terms computed anyway, so that the lanes stay packed.)
        let live = m[l] > f32::NEG_INFINITY;
        let a = pt[l] * ((z1[l] - lse.1) - m[l]);
        let b = ps[l] * ((z0[l] - lse.0) - m[l]);
        acc.0[l] += if (pt[l] > 0.0) & live { a } else { 0.0 };
        acc.1[l] += if (ps[l] > 0.0) & live { b } else { 0.0 };
    }
}

/// The generalised JSD's sums over one row (see [`jsd_sums`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn jsd_sums_body<const FMA: bool>(
    es: &[f32],
    et: &[f32],
    zs: &[f32],
    zt: &[f32],
    ks: f32,
    kt: f32,
    lse_s: f32,
    lse_t: f32,
    beta: f32,
    lm: &mut [f32],
) -> (f64, f64) {
    let (mut ta, mut tb) = (0.0f64, 0.0f64);
    let (k, lse) = ((ks, kt), (lse_s, lse_t));
    let blocks = es.chunks(BLOCK).zip(et.chunks(BLOCK)).zip(zs.chunks(BLOCK)).zip(zt.chunks(BLOCK));
    for ((((esb, etb), zsb), ztb), lmb) in blocks.zip(lm.chunks_mut(BLOCK)) {
        let (mut acc_a, mut acc_b) = ([0.0f32; LANES], [0.0f32; LANES]);
        let full = esb.len() / LANES * LANES;
        let lanes = esb[..full]
            .chunks_exact(LANES)
            .zip(etb[..full].chunks_exact(LANES))
            .zip(zsb[..full].chunks_exact(LANES))
            .zip(ztb[..full].chunks_exact(LANES))
            .zip(lmb[..full].chunks_exact_mut(LANES));
        for ((((e0, e1), z0), z1), m) in lanes {
            jsd_step::<FMA>((e0, e1), (z0, z1), k, lse, beta, m, (&mut acc_a, &mut acc_b));
        }
        let rest = esb.len() - full;
        if rest > 0 {
            // The tail padded with zero weights, which add nothing.
            let pad = |x: &[f32]| -> V8 { std::array::from_fn(|l| if l < rest { x[full + l] } else { 0.0 }) };
            let (e0, e1, z0, z1) = (pad(esb), pad(etb), pad(zsb), pad(ztb));
            let mut m = [0.0f32; LANES];
            jsd_step::<FMA>((&e0, &e1), (&z0, &z1), k, lse, beta, &mut m, (&mut acc_a, &mut acc_b));
            lmb[full..].copy_from_slice(&m[..rest]);
        }
        ta += acc_a.iter().map(|&x| x as f64).sum::<f64>();
        tb += acc_b.iter().map(|&x| x as f64).sum::<f64>();
    }
    (ta, tb)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn jsd_grad_body<const FMA: bool>(
    g: &mut [f32],
    es: &[f32],
    zs: &[f32],
    lm: &[f32],
    k: f32,
    lse_s: f32,
    w: f32,
    c: f32,
) {
    for (((g, &e), &z), &m) in g.iter_mut().zip(es).zip(zs).zip(lm) {
        // Where the mixture underflowed to 0 (log m = -inf) the student's share is below f32's
        // range too: its entry is 0, as where e_j = 0.
        *g = if e > 0.0 && m > f32::NEG_INFINITY { k * e * madd::<FMA>(w, (z - lse_s) - m, -c) } else { 0.0 };
    }
}

/// `sum_j [e_j > 0] e_j ((a_j - b_j) - c)` in f32 lanes folded into f64 per [`BLOCK`]: a
/// divergence's sum over classes, a class of zero weight (a masked one, `-inf`) adding nothing.
#[inline(always)]
fn weighted_diff_sum_body(e: &[f32], a: &[f32], b: &[f32], c: f32) -> f64 {
    let term = |e: f32, a: f32, b: f32| if e > 0.0 { e * ((a - b) - c) } else { 0.0 };
    let mut total = 0.0f64;
    for ((eb, ab), bb) in e.chunks(BLOCK).zip(a.chunks(BLOCK)).zip(b.chunks(BLOCK)) {
        let mut acc = [0.0f32; LANES];
        let (ec, ac, bc) = (eb.chunks_exact(LANES), ab.chunks_exact(LANES), bb.chunks_exact(LANES));
        let tail: f32 =
            ec.remainder().iter().zip(ac.remainder()).zip(bc.remainder()).map(|((&e, &a), &b)| term(e, a, b)).sum();
        for ((e8, a8), b8) in ec.zip(ac).zip(bc) {
            for l in 0..LANES {
                acc[l] += term(e8[l], a8[l], b8[l]);
            }
        }
        total += acc.iter().map(|&x| x as f64).sum::<f64>() + tail as f64;
    }
    total
}

#[inline(always)]
fn scaled_difference_body<const FMA: bool>(g: &mut [f32], x: &[f32], y: &[f32], kx: f32, ky: f32) {
    for ((g, &x), &y) in g.iter_mut().zip(x).zip(y) {
        *g = madd::<FMA>(kx, x, -(ky * y));
    }
}

#[inline(always)]
fn scaled_log_ratio_body(g: &mut [f32], e: &[f32], a: &[f32], b: &[f32], k: f32, c: f32) {
    for (((g, &e), &a), &b) in g.iter_mut().zip(e).zip(a).zip(b) {
        *g = k * e * ((a - b) - c);
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

/// The row maximum (NaN entries are skipped here and surface in [`exp_sum`]).
pub fn max(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::avx512::available() {
        // SAFETY: AVX-512F was just detected.
        return unsafe { super::avx512::max(x) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: AVX2 and FMA were just detected.
        return unsafe { avx2::max(x) };
    }
    max_body(x)
}

/// `(a, t)` in f64 where `a + t - 1` is the sum of `exp(x_j - m)` over all but one
/// occurrence of the maximum `m`, optionally storing every `exp(x_j - m)` in `out`. `t` counts
/// the occurrences of `m` left out of `a`: a loop may sum them in `a` (and give `t = 0`) where
/// `a >= 2`, since only a sum under 1 (a confident row) loses precision against the
/// maximum's 1.
pub fn exp_sum(x: &[f32], m: f32, out: Option<&mut [f32]>) -> (f64, f64) {
    exp_sum_ahead(x, m, out, &[])
}

/// [`exp_sum`] that also prefetches `ahead` (the next row's bytes) into the cache.
pub fn exp_sum_ahead(x: &[f32], m: f32, out: Option<&mut [f32]>, ahead: &[u8]) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if super::avx512::available() {
        // SAFETY: AVX-512F was just detected.
        return unsafe { super::avx512::exp_sum(x, m, out, ahead) };
    }
    let _ = ahead;
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: AVX2 and FMA were just detected.
        return unsafe { avx2::exp_sum(x, m, out) };
    }
    exp_sum_body::<false>(x, m, out)
}

/// One row as the row loops read it: f32, or 16-bit elements widened in registers by the
/// AVX-512 loops (elsewhere a 16-bit row is widened into an f32 row first).
#[derive(Clone, Copy)]
pub(crate) enum RowIn<'a> {
    F32(&'a [f32]),
    /// Raw bf16 or f16 bits.
    Half(&'a [u16], crate::DType),
}

impl<'a> RowIn<'a> {
    /// A 16-bit row read in registers, where this CPU has the loops for it.
    pub fn half<T: crate::dtype::Element>(x: &'a [T]) -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if T::DTYPE != crate::DType::F32 && super::avx512::available() {
            return Some(RowIn::Half(bytemuck::cast_slice(x), T::DTYPE));
        }
        let _ = x;
        None
    }

    /// The f32 row (`None` for a 16-bit one).
    pub fn as_f32(&self) -> Option<&'a [f32]> {
        match *self {
            RowIn::F32(x) => Some(x),
            RowIn::Half(..) => None,
        }
    }

    /// Element `j` as f32.
    pub fn at(&self, j: usize) -> f32 {
        match *self {
            RowIn::F32(x) => x[j],
            RowIn::Half(x, crate::DType::BF16) => half::bf16::from_bits(x[j]).to_f32(),
            RowIn::Half(x, _) => half::f16::from_bits(x[j]).to_f32(),
        }
    }

    /// The row maximum, as [`max`].
    pub fn max(&self) -> f32 {
        match *self {
            RowIn::F32(x) => max(x),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `half` only builds this variant where AVX-512 was detected.
            RowIn::Half(x, d) => unsafe {
                use super::avx512::{max_k, BF16, F16};
                match d {
                    crate::DType::BF16 => max_k::<BF16>(x.as_ptr() as *const u8, x.len()),
                    _ => max_k::<F16>(x.as_ptr() as *const u8, x.len()),
                }
            },
            #[cfg(not(target_arch = "x86_64"))]
            RowIn::Half(..) => unreachable!("16-bit rows are read in registers on x86-64 only"),
        }
    }

    /// The row maximum `m` and [`exp_sum`]'s pair against it, reading the row once where the
    /// CPU has AVX-512 (else [`max`], then [`exp_sum`]).
    pub fn lse_parts(&self, ahead: &[u8]) -> (f32, f64, f64) {
        #[cfg(target_arch = "x86_64")]
        if super::avx512::available() {
            use super::avx512::{lse_k, BF16, F16, F32};
            // SAFETY: AVX-512 was just detected; each pointer holds the row's elements.
            return unsafe {
                match *self {
                    RowIn::F32(x) => lse_k::<F32>(x.as_ptr() as *const u8, x.len(), ahead),
                    RowIn::Half(x, crate::DType::BF16) => lse_k::<BF16>(x.as_ptr() as *const u8, x.len(), ahead),
                    RowIn::Half(x, _) => lse_k::<F16>(x.as_ptr() as *const u8, x.len(), ahead),
                }
            };
        }
        let m = self.max();
        let (s, t) = self.exp_sum_ahead(m, None, ahead, false);
        (m, s, t)
    }

    /// As [`exp_sum_ahead`]. `coarse`: the stored exponentials will be rounded to 16 bits, so
    /// the AVX-512 loop may take its cheaper exponential (a few f32 ulp; the sum is as exact).
    pub fn exp_sum_ahead(&self, m: f32, out: Option<&mut [f32]>, ahead: &[u8], coarse: bool) -> (f64, f64) {
        #[cfg(target_arch = "x86_64")]
        use super::avx512::{exp_sum_k, BF16, F16, F32};
        match *self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512 was just detected; `out` (when given) has the row's length.
            RowIn::F32(x) if coarse && super::avx512::available() => unsafe {
                assert!(out.as_ref().is_none_or(|o| o.len() == x.len()));
                exp_sum_k::<F32, true>(x.as_ptr() as *const u8, x.len(), m, out, ahead)
            },
            RowIn::F32(x) => exp_sum_ahead(x, m, out, ahead),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `half` only builds this variant where AVX-512 was detected; the row loop
            // checks `out`'s length.
            RowIn::Half(x, d) => unsafe {
                let p = x.as_ptr() as *const u8;
                match (d, coarse) {
                    (crate::DType::BF16, true) => exp_sum_k::<BF16, true>(p, x.len(), m, out, ahead),
                    (crate::DType::BF16, false) => exp_sum_k::<BF16, false>(p, x.len(), m, out, ahead),
                    (_, true) => exp_sum_k::<F16, true>(p, x.len(), m, out, ahead),
                    (_, false) => exp_sum_k::<F16, false>(p, x.len(), m, out, ahead),
                }
            },
            #[cfg(not(target_arch = "x86_64"))]
            RowIn::Half(..) => unreachable!("16-bit rows are read in registers on x86-64 only"),
        }
    }
}

/// Explicit AVX2+FMA versions of the two hot loops (LLVM does not reliably vectorise the
/// polynomial exponential on its own). Same arithmetic as [`exp8`], lane for lane.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BLOCK, EXP_MIN, EXP_POLY, LN2_HI, LN2_LO, LOG2E, ROUND};
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        let lo = _mm256_set1_ps(EXP_MIN);
        let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo);
        let xc = _mm256_blendv_ps(x, lo, under);
        let round = _mm256_set1_ps(ROUND);
        let t = _mm256_fmadd_ps(xc, _mm256_set1_ps(LOG2E), round);
        let n = _mm256_sub_ps(t, round);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), xc);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut q = _mm256_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(*c));
        }
        let one = _mm256_set1_ps(1.0);
        let p = _mm256_fmadd_ps(_mm256_fmadd_ps(q, r, one), r, one);
        let ni = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B40_0000));
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(ni, _mm256_set1_epi32(127))));
        _mm256_andnot_ps(under, _mm256_mul_ps(p, scale))
    }

    /// Adds `e` to `acc` except where `d == 0` (the max's own 1), and counts those in `cnt`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn fold(d: __m256, e: __m256, acc: &mut __m256, cnt: &mut __m256) {
        let is_max = _mm256_cmp_ps::<_CMP_EQ_OQ>(d, _mm256_setzero_ps());
        *acc = _mm256_add_ps(*acc, _mm256_andnot_ps(is_max, e));
        *cnt = _mm256_add_ps(*cnt, _mm256_and_ps(is_max, _mm256_set1_ps(1.0)));
    }

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f64 {
        let mut a = [0f32; 8];
        // SAFETY: `a` has room for 8 lanes.
        unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) };
        a.iter().map(|&x| x as f64).sum()
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn max(x: &[f32]) -> f32 {
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        let chunks = x.chunks_exact(8);
        let rem = chunks.remainder();
        for ch in chunks {
            // SAFETY: `ch` has 8 elements.
            let v = unsafe { _mm256_loadu_ps(ch.as_ptr()) };
            // max_ps(v, m) returns m when v is NaN: NaN is skipped, as in the portable path.
            m = _mm256_max_ps(v, m);
        }
        let mut a = [0f32; 8];
        // SAFETY: `a` has room for 8 lanes.
        unsafe { _mm256_storeu_ps(a.as_mut_ptr(), m) };
        a.into_iter().chain(rem.iter().copied()).fold(f32::NEG_INFINITY, |b, v| if v > b { v } else { b })
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sum(x: &[f32], m: f32, mut out: Option<&mut [f32]>) -> (f64, f64) {
        let mv = _mm256_set1_ps(m);
        let zero = _mm256_setzero_ps();
        let (mut total, mut ties) = (0.0f64, 0.0f64);
        for (b, xb) in x.chunks(BLOCK).enumerate() {
            let mut acc = zero;
            let mut cnt = zero;
            let mut ob = out.as_deref_mut().map(|o| &mut o[b * BLOCK..b * BLOCK + xb.len()]);
            let full = xb.len() / 8 * 8;
            let mut i = 0;
            // Two vectors per iteration: two independent polynomial chains hide FMA latency.
            let (mut acc2, mut cnt2) = (zero, zero);
            while i + 16 <= full {
                // SAFETY: i + 16 <= xb.len(), and `o` has xb.len() elements.
                unsafe {
                    let d0 = _mm256_sub_ps(_mm256_loadu_ps(xb.as_ptr().add(i)), mv);
                    let d1 = _mm256_sub_ps(_mm256_loadu_ps(xb.as_ptr().add(i + 8)), mv);
                    let (e0, e1) = (exp8(d0), exp8(d1));
                    fold(d0, e0, &mut acc, &mut cnt);
                    fold(d1, e1, &mut acc2, &mut cnt2);
                    if let Some(o) = ob.as_deref_mut() {
                        _mm256_storeu_ps(o.as_mut_ptr().add(i), e0);
                        _mm256_storeu_ps(o.as_mut_ptr().add(i + 8), e1);
                    }
                }
                i += 16;
            }
            acc = _mm256_add_ps(acc, acc2);
            cnt = _mm256_add_ps(cnt, cnt2);
            let mut step = |d: __m256| -> __m256 {
                let e = exp8(d);
                fold(d, e, &mut acc, &mut cnt);
                e
            };
            while i < full {
                // SAFETY: i + 8 <= xb.len(), and `o` has xb.len() elements.
                unsafe {
                    let e = step(_mm256_sub_ps(_mm256_loadu_ps(xb.as_ptr().add(i)), mv));
                    if let Some(o) = ob.as_deref_mut() {
                        _mm256_storeu_ps(o.as_mut_ptr().add(i), e);
                    }
                }
                i += 8;
            }
            if full < xb.len() {
                // Tail padded with -inf, whose exponential is 0.
                let mut d = [f32::NEG_INFINITY; 8];
                d.iter_mut().zip(&xb[full..]).for_each(|(d, &v)| *d = v - m);
                let mut e = [0f32; 8];
                // SAFETY: both arrays hold 8 lanes.
                unsafe { _mm256_storeu_ps(e.as_mut_ptr(), step(_mm256_loadu_ps(d.as_ptr()))) };
                if let Some(o) = ob {
                    o[full..].copy_from_slice(&e[..xb.len() - full]);
                }
            }
            total += hsum(acc);
            ties += hsum(cnt);
        }
        (total, ties)
    }
}
multiversion! {
    /// `sum_j e_j (z_j - m)` in f64 (f32 lanes per block).
    pub fn centred_sum(z: &[f32], e: &[f32], m: f32) -> f64 => centred_sum_body;
}
multiversion! {
    /// `g_j <- k e_j (a + b ((g_j - m) - mu_m))`: logits to the gradient of `a logp + b H`
    /// (`e_j = exp(g_j - m)`), the target's own term added by the caller.
    pub fn logprob_grad(g: &mut [f32], e: &[f32], m: f32, k: f32, a: f32, b: f32, mu_m: f32) -> () => logprob_grad_body::<true>;
}
multiversion! {
    /// `sum_j [e_j > 0] e_j ((a_j - b_j) - c)` in f64 (f32 lanes per block; zero-weight terms
    /// skipped, so a masked class's `-inf` adds nothing).
    pub fn weighted_diff_sum(e: &[f32], a: &[f32], b: &[f32], c: f32) -> f64 => weighted_diff_sum_body;
}
multiversion! {
    /// The generalised JSD's sums over a row, `(sum_j [pt_j > 0] pt_j (lt_j - lm_j), sum_j
    /// [ps_j > 0] ps_j (ls_j - lm_j))` in f64 (f32 lanes per block), with `ps = ks es`,
    /// `pt = kt et`, `ls = zs - lse_s`, `lt = zt - lse_t` and `lm = ln(beta pt + (1 - beta)
    /// ps)`, which is stored in `lm` for the gradient.
    #[allow(clippy::too_many_arguments)]
    pub fn jsd_sums(es: &[f32], et: &[f32], zs: &[f32], zt: &[f32], ks: f32, kt: f32, lse_s: f32, lse_t: f32, beta: f32, lm: &mut [f32]) -> (f64, f64) => jsd_sums_body::<true>;
}
multiversion! {
    /// `g_j <- k e_j (w ((z_j - lse) - lm_j) - c)`, 0 where `e_j = 0` or `lm_j = -inf`.
    #[allow(clippy::too_many_arguments)]
    pub fn jsd_grad(g: &mut [f32], es: &[f32], zs: &[f32], lm: &[f32], k: f32, lse_s: f32, w: f32, c: f32) -> () => jsd_grad_body::<true>;
}
multiversion! {
    /// `g_j <- kx x_j - ky y_j`.
    pub fn scaled_difference(g: &mut [f32], x: &[f32], y: &[f32], kx: f32, ky: f32) -> () => scaled_difference_body::<true>;
}
multiversion! {
    /// `g_j <- k e_j ((a_j - b_j) - c)`.
    pub fn scaled_log_ratio(g: &mut [f32], e: &[f32], a: &[f32], b: &[f32], k: f32, c: f32) -> () => scaled_log_ratio_body;
}
multiversion! {
    /// `(sum_j w_j x_j, sum_j w_j)` in f64 (w = 1 when `None`).
    pub fn weighted_sum(x: &[f32], w: Option<&[f32]>) -> (f64, f64) => dot_body;
}
multiversion! {
    /// `e_j <- k e_j - c0 w_j` (w = 1 when `None`), 8 lanes.
    pub fn scale_shift8(e: &mut [f32], k: f32, c0: f32, w: Option<&[f32]>) -> () => scale_shift_body::<true>;
}

/// `e_j <- k e_j - c0 w_j` (w = 1 when `None`): turns exponentials into a gradient row.
pub fn scale_shift(e: &mut [f32], k: f32, c0: f32, w: Option<&[f32]>) {
    #[cfg(target_arch = "x86_64")]
    if w.is_none() && super::avx512::available() {
        // SAFETY: AVX-512F was just detected.
        return unsafe { super::avx512::scale_shift(e, k, c0) };
    }
    scale_shift8(e, k, c0, w)
}
multiversion! {
    /// `(sum_c w_c q_c z_c, sum_c w_c q_c)` in f64 with `q_c = qa y_c + qb` (w = 1 when `None`).
    pub fn soft_sums(z: &[f32], y: &[f32], w: Option<&[f32]>, qa: f32, qb: f32) -> (f64, f64) => soft_sums_body;
}
multiversion! {
    /// `g_j <- k g_j - c w_j q_j` with `q_j = qa y_j + qb`: exponentials to a soft-target gradient.
    pub fn soft_grad(g: &mut [f32], y: &[f32], w: Option<&[f32]>, qa: f32, qb: f32, k: f32, c: f32) -> () => soft_grad_body;
}
multiversion! {
    /// How many `x_j > t` (the rank of a target logit `t`).
    pub fn count_greater(x: &[f32], t: f32) -> usize => count_greater_body;
}
multiversion! {
    /// `out_j = (x_j - m) - l`.
    pub fn log_softmax_row(x: &[f32], m: f32, l: f32, out: &mut [f32]) -> () => log_softmax_body;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ln_lane<const FMA: bool>(x: f32) -> f32 {
        ln8::<FMA>([x; LANES])[0]
    }

    /// ln against f64's over every binade of f32 (subnormals included), 4099 values each, and
    /// around 1, where ln crosses 0: within one ulp of the result, or near 1 within half an
    /// f32 epsilon absolute (the argument's own rounding there). Worst measured: 0.77.
    #[test]
    fn ln_is_within_one_ulp() {
        let mut worst = 0.0f64;
        let mut check = |x: f32| {
            for fma in [false, true] {
                let got = if fma { ln_lane::<true>(x) } else { ln_lane::<false>(x) } as f64;
                let want = (x as f64).ln();
                // One ulp of the result, or of the argument's relative step near ln = 0.
                let ulp = (want.abs() * f32::EPSILON as f64).max(f32::EPSILON as f64 * 0.5);
                let e = (got - want).abs() / ulp;
                assert!(e <= 1.0, "ln({x:e}) = {got} vs {want} ({e:.2} ulp, fma {fma})");
                worst = worst.max(e);
            }
        };
        for e in -149..128 {
            let base = 2f64.powi(e);
            for i in 0..4099 {
                let x = (base * (1.0 + i as f64 / 4099.0)) as f32;
                if x > 0.0 && x.is_finite() {
                    check(x);
                }
            }
        }
        for i in -5000..5000 {
            check(1.0 + i as f32 * 1e-6);
        }
        check(f32::MAX);
        check(f32::from_bits(1));
        println!("ln: worst {worst:.3} ulp");
        assert_eq!(ln_lane::<true>(0.0), f32::NEG_INFINITY);
        assert_eq!(ln_lane::<true>(f32::INFINITY), f32::INFINITY);
        assert!(ln_lane::<true>(-1.0).is_nan() && ln_lane::<true>(f32::NAN).is_nan());
        assert_eq!(ln_lane::<true>(1.0), 0.0);
    }

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
    fn avx2_and_portable_paths_agree() {
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            let mut x: Vec<f32> = (0..4099).map(|i| ((i * 7919) % 2003) as f32 * -0.013).collect();
            x[5] = f32::NEG_INFINITY;
            x[77] = 0.0; // a tie with the max
            let m = max_body(&x);
            // SAFETY: AVX2 and FMA were just detected.
            assert_eq!(unsafe { avx2::max(&x) }, m);
            let (mut o1, mut o2) = (vec![0.0; x.len()], vec![0.0; x.len()]);
            let a = exp_sum_body::<false>(&x, m, Some(&mut o1));
            // SAFETY: as above.
            let b = unsafe { avx2::exp_sum(&x, m, Some(&mut o2)) };
            assert_eq!(a.1, b.1);
            assert!((a.0 - b.0).abs() <= 1e-6 * a.0);
            assert!(o1.iter().zip(&o2).all(|(p, q)| (p - q).abs() <= 2e-7 * p.abs()));
            assert_eq!(o2[5], 0.0);
            let (nan, _) = unsafe { avx2::exp_sum(&[1.0, f32::NAN, 0.5], 1.0, None) };
            assert!(nan.is_nan());
        }
    }

    #[test]
    fn sums_match_f64() {
        let x: Vec<f32> = (0..10_007).map(|i| ((i * 7919) % 1000) as f32 * -0.01).collect();
        let want: f64 = x.iter().map(|&v| (v as f64).exp()).sum();
        let mut out = vec![0.0; x.len()];
        let (s, ties) = exp_sum(&x, 0.0, Some(&mut out));
        // x = 0 every 1000 elements: 11 ties, summed in `s` or counted in `ties`.
        assert!(((s + ties - want) / want).abs() < 1e-7);
        assert_eq!(max(&x), 0.0);
        assert!(out.iter().zip(&x).all(|(&e, &v)| ((e as f64 - (v as f64).exp()) / (v as f64).exp()).abs() < 3e-7));
        let (s, n) = weighted_sum(&x, None);
        assert_eq!(n, x.len() as f64);
        let want: f64 = x.iter().map(|&v| v as f64).sum();
        assert!((s - want).abs() < 1e-9 * want.abs().max(1.0) * 1e3);
    }
}
