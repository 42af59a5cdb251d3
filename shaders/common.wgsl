// Shared by every kernel family: the workgroup size, the 16-bit conversions, log1p / expm1,
// and the folded-grid row index. Nothing here declares a binding or reads a family's
// parameters beyond the chunk header every family's `P` starts with (`#chunk_header`, written
// per chunk by src/gpu/launch.rs). Preprocessed by src/gpu/source.rs: `#if A`,
// `#if A && !B || C`, `#elif`, `#else`, `#endif`, `#chunk_header`, `#subgroup_args`,
// `#subgroup_lets`.

const WG: u32 = 256u;

// The parameters of a kernel that needs nothing beyond the header (`Header` in
// src/gpu/params.rs): log-softmax, measures, Hessian-vector products, row sums.
struct ChunkHeader {
#chunk_header
}

// ---- 16-bit conversions ----

fn unpack_bf16(w: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
}

// f16 bits (low half of h) -> f32, exactly; written out because unpack2x16float needs a
// downlevel capability that not every adapter reports.
fn half_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let em = h & 0x7fffu;
    // Normal: rebias the exponent (15 -> 127); subnormal: m 2^-24; inf/NaN: all-ones exponent.
    var r = bitcast<f32>((em << 13u) + 0x38000000u);
    r = select(r, f32(em) * 5.9604645e-8, em < 0x400u);
    r = select(r, bitcast<f32>((em << 13u) | 0x7f800000u), em >= 0x7c00u);
    return bitcast<f32>(bitcast<u32>(r) | sign);
}

fn unpack_f16(w: u32) -> vec2<f32> {
    return vec2<f32>(half_to_f32(w & 0xffffu), half_to_f32(w >> 16u));
}

// f32 -> bf16 bits, round to nearest even; NaN stays a quiet NaN.
fn bf16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return (b >> 16u) | 0x40u;
    }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

// f32 -> f16 bits, round to nearest even (WGSL's pack2x16float leaves the rounding and
// out-of-range results to the implementation); overflow gives infinity, NaN stays NaN.
fn f16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = (b >> 16u) & 0x8000u;
    let a = b & 0x7fffffffu;
    if (a > 0x7f800000u) {
        return sign | 0x7e00u;
    }
    if (a >= 0x477ff000u) {
        return sign | 0x7c00u;
    }
    if (a >= 0x38800000u) {
        // Rebias the exponent (127 -> 15) and round the mantissa at bit 13.
        return sign | ((a + 0xc8000fffu + ((a >> 13u) & 1u)) >> 13u);
    }
    // Subnormal: a multiple of 2^-24, found exactly by scaling; round() is half-to-even.
    return sign | u32(round(bitcast<f32>(a) * 16777216.0));
}

fn in_unpack(w: u32) -> vec2<f32> {
#if IN_BF16
    return unpack_bf16(w);
#else
    return unpack_f16(w);
#endif
}

fn sec_unpack(w: u32) -> vec2<f32> {
#if SEC_BF16
    return unpack_bf16(w);
#else
    return unpack_f16(w);
#endif
}

fn out_pack(g: vec2<f32>) -> u32 {
#if OUT_BF16
    return bf16_bits(g.x) | (bf16_bits(g.y) << 16u);
#else
    return f16_bits(g.x) | (f16_bits(g.y) << 16u);
#endif
}

// log(1 + x) for x >= 0 with full relative precision: GPU log() only promises an absolute
// error of 2^-21 near 1, so small arguments use 2 atanh(x / (2 + x)) as a series.
fn log1p_(x: f32) -> f32 {
    if (x > -0.5 && x < 1.0) {
        let z = x / (2.0 + x);
        let z2 = z * z;
        var p = 1.0 / 17.0;
        p = p * z2 + 1.0 / 15.0;
        p = p * z2 + 1.0 / 13.0;
        p = p * z2 + 1.0 / 11.0;
        p = p * z2 + 1.0 / 9.0;
        p = p * z2 + 1.0 / 7.0;
        p = p * z2 + 1.0 / 5.0;
        p = p * z2 + 1.0 / 3.0;
        p = p * z2 + 1.0;
        return 2.0 * z * p;
    }
    return log(1.0 + x);
}

// exp(x) - 1 with full relative precision near 0 (Taylor series on |x| < 0.5).
fn expm1_(x: f32) -> f32 {
    if (abs(x) < 0.5) {
        var p = 1.0 / 3628800.0;
        p = p * x + 1.0 / 362880.0;
        p = p * x + 1.0 / 40320.0;
        p = p * x + 1.0 / 5040.0;
        p = p * x + 1.0 / 720.0;
        p = p * x + 1.0 / 120.0;
        p = p * x + 1.0 / 24.0;
        p = p * x + 1.0 / 6.0;
        p = p * x + 0.5;
        p = p * x + 1.0;
        return p * x;
    }
    return exp(x) - 1.0;
}

// True for +inf (so that rows holding one give NaN, as in PyTorch, instead of inf - inf
// handled as a finite max).
fn is_pos_inf(x: f32) -> bool {
    return bitcast<u32>(x) == 0x7f800000u;
}


// Local row index of this workgroup in a 2-D folded grid.
fn local_row(wid: vec3<u32>) -> u32 {
    return wid.y * P.grid_x + wid.x;
}
