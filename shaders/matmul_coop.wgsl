// The matrix products of matmul.wgsl on cooperative matrices (tensor cores, simdgroup
// matrices): f16 x f16 products of T x T tiles (T = 16, or 8 with COOP8) accumulated in f32.
// `enable f16; enable wgpu_cooperative_matrix;` is put first by src/gpu/source.rs.
//
// One workgroup is one subgroup (the host builds this kernel with WG = the adapter's one
// subgroup size) and computes a 2T x 2T tile of C as four T x T cooperative products per
// k-step of T. Each k-step stages A (2T x T) and B (T x 2T) in workgroup memory as f16, each
// scaled by a power of two so that its largest magnitude lies in [2^14, 2^15): nothing
// overflows f16's 65504, and every element within 2^-24 of the tile's largest stays a normal
// f16 (relative rounding error at most 2^-10 with WGSL's f32 -> f16 conversion, which may round
// either way). The four products (f32) are stored to workgroup memory and added, unscaled
// (exact powers of two), into f32 accumulators. The bound and a CPU mirror of the scaling are
// in src/gpu/kernels/matmul.rs (`coop_scale`) and its tests.
//
// Layouts as matmul.wgsl (MM_NT, MM_NN, MM_TN); elements outside A or B are staged as 0.

#if COOP8
const T: u32 = 8u;
var<workgroup> sa: array<f16, 128>;
var<workgroup> sb: array<f16, 128>;
var<workgroup> prod: array<f32, 256>;
var<workgroup> acc: array<f32, 256>;
#else
const T: u32 = 16u;
var<workgroup> sa: array<f16, 512>;
var<workgroup> sb: array<f16, 512>;
var<workgroup> prod: array<f32, 1024>;
var<workgroup> acc: array<f32, 1024>;
#endif

// A(m, k), 0 outside the matrix.
fn a_at(m: u32, k: u32) -> f32 {
    if (m >= P.m || k >= P.k) {
        return 0.0;
    }
#if MM_TN
    return a1(P.x_off + k * P.a_rs + m);
#else
    return a1(P.x_off + m * P.a_rs + k);
#endif
}

// B(k, n), 0 outside the matrix.
fn b_at(k: u32, n: u32) -> f32 {
    if (k >= P.k || n >= P.n) {
        return 0.0;
    }
#if MM_NT
    return b1(P.y_off + n * P.b_rs + k);
#else
    return b1(P.y_off + k * P.b_rs + n);
#endif
}

// The power of two 2^s (and 2^-s) that puts a largest magnitude `mx` in [2^14, 2^15); 1 for
// 0, infinities and NaN (which then propagate as they would in f32).
fn coop_scale(mx: f32) -> vec2<f32> {
    let bits = bitcast<u32>(mx);
    let ex = i32((bits >> 23u) & 0xffu) - 127;
    if (mx == 0.0 || ex == 128) {
        return vec2<f32>(1.0, 1.0);
    }
    let s = clamp(14 - ex, -126, 126);
    return vec2<f32>(bitcast<f32>(u32(s + 127) << 23u), bitcast<f32>(u32(127 - s) << 23u));
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // No early return (cooperative operations need uniform control flow): a workgroup past
    // the last tile (a folded grid's remainder) has col0 >= N, reads zeros and stores nothing.
    let g = local_row(wid);
    let t2 = 2u * T;
    let tiles_m = (P.m + t2 - 1u) / t2;
    let row0 = (g % tiles_m) * t2;
    let col0 = (g / tiles_m) * t2;
    let area = t2 * t2;
    for (var e = lid; e < area; e += WG) {
        acc[e] = 0.0;
    }
    for (var k0 = 0u; k0 < P.k; k0 += T) {
        // A: 2T rows x T k (row-major, stride T); B: T k x 2T columns (stride 2T).
        var ma = 0.0;
        var mb = 0.0;
        for (var e = lid; e < t2 * T; e += WG) {
            ma = max(ma, abs(a_at(row0 + e / T, k0 + e % T)));
            mb = max(mb, abs(b_at(k0 + e / t2, col0 + e % t2)));
        }
        let s_a = coop_scale(subgroupMax(ma));
        let s_b = coop_scale(subgroupMax(mb));
        for (var e = lid; e < t2 * T; e += WG) {
            sa[e] = f16(a_at(row0 + e / T, k0 + e % T) * s_a.x);
            sb[e] = f16(b_at(k0 + e / t2, col0 + e % t2) * s_b.x);
        }
        workgroupBarrier();
#if COOP8
        let a0 = coopLoadT<coop_mat8x8<f16, A>>(&sa[0], T);
        let a1_ = coopLoadT<coop_mat8x8<f16, A>>(&sa[T * T], T);
        let b0 = coopLoadT<coop_mat8x8<f16, B>>(&sb[0], t2);
        let b1_ = coopLoadT<coop_mat8x8<f16, B>>(&sb[T], t2);
        let z = coop_mat8x8<f32, C>();
#else
        let a0 = coopLoadT<coop_mat16x16<f16, A>>(&sa[0], T);
        let a1_ = coopLoadT<coop_mat16x16<f16, A>>(&sa[T * T], T);
        let b0 = coopLoadT<coop_mat16x16<f16, B>>(&sb[0], t2);
        let b1_ = coopLoadT<coop_mat16x16<f16, B>>(&sb[T], t2);
        let z = coop_mat16x16<f32, C>();
#endif
        coopStoreT(coopMultiplyAdd(a0, b0, z), &prod[0], t2);
        coopStoreT(coopMultiplyAdd(a0, b1_, z), &prod[T], t2);
        coopStoreT(coopMultiplyAdd(a1_, b0, z), &prod[T * t2], t2);
        coopStoreT(coopMultiplyAdd(a1_, b1_, z), &prod[T * t2 + T], t2);
        workgroupBarrier();
        for (var e = lid; e < area; e += WG) {
            acc[e] += (prod[e] * s_a.y) * s_b.y;
        }
        workgroupBarrier();
    }
    for (var e = lid; e < area; e += WG) {
        let row = row0 + e / t2;
        let col = col0 + e % t2;
        if (row < P.m && col < P.n) {
            store_c(row, col, acc[e]);
        }
    }
}
