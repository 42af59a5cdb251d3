// Operand bindings and element access of the matrix-product kernels (matmul.wgsl,
// matmul_coop.wgsl): A in slot 12 (the input dtype), B in slot 13 (the second dtype), C in
// slot 14 (f32). A4 / B4: the operand is read as vec4<f32> or pairs of 16-bit words, so that
// 4 contiguous elements starting at a multiple of 4 are one load.

#if A4 && IN16
@group(0) @binding(12) var<storage, read> mm_a: array<vec2<u32>>;
#elif A4
@group(0) @binding(12) var<storage, read> mm_a: array<vec4<f32>>;
#elif IN16
@group(0) @binding(12) var<storage, read> mm_a: array<u32>;
#else
@group(0) @binding(12) var<storage, read> mm_a: array<f32>;
#endif

#if B4 && SEC16
@group(0) @binding(13) var<storage, read> mm_b: array<vec2<u32>>;
#elif B4
@group(0) @binding(13) var<storage, read> mm_b: array<vec4<f32>>;
#elif SEC16
@group(0) @binding(13) var<storage, read> mm_b: array<u32>;
#else
@group(0) @binding(13) var<storage, read> mm_b: array<f32>;
#endif

@group(0) @binding(14) var<storage, read_write> mm_c: array<f32>;

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

// Stores element (row, col) of C from its accumulated value: plus the bias (flag 2, read from
// the class-weight binding at class0) and C's old value (flag 1, accumulate). Both kernels end here.
fn store_c(row: u32, col: u32, acc: f32) {
    var c = acc;
    if ((P.mm_flags & 2u) != 0u) {
        c += class_weight[P.class0 + col];
    }
    let o = P.o_off + row * P.c_rs + col;
    if ((P.mm_flags & 1u) != 0u) {
        c += mm_c[o];
    }
    mm_c[o] = c;
}
