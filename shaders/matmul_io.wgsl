// The matrix-product family's interface (matmul.wgsl, matmul_coop.wgsl): its parameters, flag
// bits, bindings and element access, mirrored by src/gpu/kernels/matmul.rs (`MatmulParams`,
// `mm_flags`, `slot`; a unit test compares them through naga). A in slot 1 (the input dtype),
// B in slot 2 (the second dtype), C in slot 3 (f32), the bias in slot 4 (f32). A4 / B4: the
// operand is read as vec4<f32> or pairs of 16-bit words, so that 4 contiguous elements starting
// at a multiple of 4 are one load.

// C (+)= A B: add C's old value.
const MM_ACCUMULATE: u32 = 1u;
// Add bias[bias0 + column].
const MM_BIAS: u32 = 2u;

// C[m, n] (+)= sum_k A(m, k) B(k, n) (+ bias): A and B from element x_off / y_off of their
// bindings with row strides a_rs / b_rs along the layout's strided axis (the other axis is
// contiguous), C from element o_off, row-major with row stride c_rs.
struct MatmulParams {
#chunk_header
    m: u32,
    n: u32,
    k: u32,
    a_rs: u32,
    b_rs: u32,
    c_rs: u32,
    // The bias entry of column 0.
    bias0: u32,
}

@group(0) @binding(0) var<uniform> P: MatmulParams;

#if A4 && IN16
@group(0) @binding(1) var<storage, read> mm_a: array<vec2<u32>>;
#elif A4
@group(0) @binding(1) var<storage, read> mm_a: array<vec4<f32>>;
#elif IN16
@group(0) @binding(1) var<storage, read> mm_a: array<u32>;
#else
@group(0) @binding(1) var<storage, read> mm_a: array<f32>;
#endif

#if B4 && SEC16
@group(0) @binding(2) var<storage, read> mm_b: array<vec2<u32>>;
#elif B4
@group(0) @binding(2) var<storage, read> mm_b: array<vec4<f32>>;
#elif SEC16
@group(0) @binding(2) var<storage, read> mm_b: array<u32>;
#else
@group(0) @binding(2) var<storage, read> mm_b: array<f32>;
#endif

@group(0) @binding(3) var<storage, read_write> mm_c: array<f32>;
@group(0) @binding(4) var<storage, read> mm_bias: array<f32>;

// Element e of A.
fn a1(e: u32) -> f32 {
#if A4 && IN16
    let h = in_unpack(mm_a[e >> 2u][(e >> 1u) & 1u]);
    return select(h.x, h.y, (e & 1u) == 1u);
#elif IN16
    let h = in_unpack(mm_a[e >> 1u]);
    return select(h.x, h.y, (e & 1u) == 1u);
#elif A4
    return mm_a[e >> 2u][e & 3u];
#else
    return mm_a[e];
#endif
}

// Elements e .. e + 3 of A (e a multiple of 4 with A4).
fn a4(e: u32) -> vec4<f32> {
#if A4 && IN16
    let w = mm_a[e >> 2u];
    return vec4<f32>(in_unpack(w.x), in_unpack(w.y));
#elif A4
    return mm_a[e >> 2u];
#else
    return vec4<f32>(a1(e), a1(e + 1u), a1(e + 2u), a1(e + 3u));
#endif
}

// Element e of B.
fn b1(e: u32) -> f32 {
#if B4 && SEC16
    let h = sec_unpack(mm_b[e >> 2u][(e >> 1u) & 1u]);
    return select(h.x, h.y, (e & 1u) == 1u);
#elif SEC16
    let h = sec_unpack(mm_b[e >> 1u]);
    return select(h.x, h.y, (e & 1u) == 1u);
#elif B4
    return mm_b[e >> 2u][e & 3u];
#else
    return mm_b[e];
#endif
}

// Elements e .. e + 3 of B (e a multiple of 4 with B4).
fn b4(e: u32) -> vec4<f32> {
#if B4 && SEC16
    let w = mm_b[e >> 2u];
    return vec4<f32>(sec_unpack(w.x), sec_unpack(w.y));
#elif B4
    return mm_b[e >> 2u];
#else
    return vec4<f32>(b1(e), b1(e + 1u), b1(e + 2u), b1(e + 3u));
#endif
}

// Stores element (row, col) of C from its accumulated value: plus the bias (MM_BIAS) and C's
// old value (MM_ACCUMULATE). Both kernels end here.
fn store_c(row: u32, col: u32, acc: f32) {
    var c = acc;
    if ((P.flags & MM_BIAS) != 0u) {
        c += mm_bias[P.bias0 + col];
    }
    let o = P.o_off + row * P.c_rs + col;
    if ((P.flags & MM_ACCUMULATE) != 0u) {
        c += mm_c[o];
    }
    mm_c[o] = c;
}
