// The matrix products of fused linear cross-entropy, C[m, n] (+)= sum_k A(m, k) B(k, n)
// (+ bias[bias0 + n]), one specialised kernel per layout (each operand's contiguous axis):
//   MM_NT  A[m, k] at a_rs m + k, B(k, n) = W[n, k] at b_rs n + k   (Z = H W^T, vocab-sized)
//   MM_NN  A[m, k] at a_rs m + k, B[k, n]        at b_rs k + n      (grad_hidden = G W)
//   MM_TN  A(m, k) = G[k, m] at a_rs k + m, B[k, n] at b_rs k + n   (grad_weight = G^T H)
// A (slot 1, the input dtype) and B (slot 2, the second dtype) are read 4 contiguous elements
// at a time (A4 / B4: vec4<f32> or two 16-bit words; without them, 4 scalar loads); C (slot 3)
// is f32, row-major with row stride c_rs. f32 accumulation, k in order.
//
// One workgroup computes a 16 x 256 tile of C: each of its 64 invocations owns 4 adjacent
// columns of the same 16 rows (16 x 4 accumulators in registers) and reads B for them itself.
// The 16 rows' A values are shared rather than re-read: with SUBGROUP, lane l of a subgroup (of
// 8 or more lanes; the host checks) loads two 4-element fragments of A (l % 8 and l % 8 + 8) and
// the others take them by subgroupBroadcast; without, each invocation loads all 16 fragments.
// Per k-step of 4 an invocation loads 16 values of B and 8 of A for 256 FMAs (8 x 4 tiles: 16
// and 4 for 128). No workgroup memory: on a software rasteriser every memory access is a
// per-lane loop, so staging tiles in workgroup memory costs a store and a load more per element
// than reading the (cache-resident) operands; see docs/gpu-matmul.md for what was measured.
//
// Full k-steps of 4 run without checks; the last partial step masks k >= K to 0. Rows past M
// and columns past N are read clamped (at the last row, or the last aligned 4 rows or columns)
// and never stored.
//
// In range without runtime checks (`Mm::unchecked`, chosen by the host in `matmul.rs`): with
// 4-wide A and B (each operand's first element and row stride multiples of 4), M, N and K
// multiples of 4 (no partial k-step; every 4-wide row or column group is whole), and bindings
// that hold every element of A, B, C and the bias that the product covers, every load above
// starts at a multiple of 4 inside the operand (rows, k and the 4-groups of columns or rows are
// clamped into it) and every store is inside C. Anything else keeps WGSL's checks, which then
// also cover the partial k-step's and scalar loads' reads past a row's end.

const R: u32 = 16u;
const TN: u32 = 256u;

// Fragment f (0..15) of A for the k-step at k0: NT / NN: row f of the tile, k0 .. k0 + 3;
// TN: k0 + f / 4, tile rows 4 (f % 4) .. + 3. `lim` (1..4) k values are valid; the rest are 0.
fn frag(f: u32, row0: u32, k0: u32, lim: u32) -> vec4<f32> {
#if MM_TN
    let kk = f >> 2u;
    // Tile rows past M are read (and never stored) at the last aligned 4 rows instead.
    let r4 = row0 + (f & 3u) * 4u;
    let x = a4(P.x_off + min(k0 + kk, P.k - 1u) * P.a_rs + select(r4, (P.m - 1u) & ~3u, r4 >= P.m));
    return select(vec4<f32>(0.0), x, kk < lim);
#else
    let x = a4(P.x_off + min(row0 + f, P.m - 1u) * P.a_rs + k0);
    return select(vec4<f32>(0.0), x, vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(lim));
#endif
}

// One k-step of 4 (the first `lim` valid): acc[r] += sum_j A(row0 + r, k0 + j) B(k0 + j, cols).
fn kstep(acc: ptr<function, array<vec4<f32>, 16>>, row0: u32, col0: u32, k0: u32, lim: u32, fl: u32) {
    // B for this invocation's 4 columns, one vec4 (over columns) per k.
#if MM_NT
    let n1 = P.n - 1u;
    let w0 = b4(P.y_off + min(col0, n1) * P.b_rs + k0);
    let w1 = b4(P.y_off + min(col0 + 1u, n1) * P.b_rs + k0);
    let w2 = b4(P.y_off + min(col0 + 2u, n1) * P.b_rs + k0);
    let w3 = b4(P.y_off + min(col0 + 3u, n1) * P.b_rs + k0);
    let z = vec4<f32>(0.0);
    let b0 = vec4<f32>(w0.x, w1.x, w2.x, w3.x);
    let b1 = select(z, vec4<f32>(w0.y, w1.y, w2.y, w3.y), 1u < lim);
    let b2 = select(z, vec4<f32>(w0.z, w1.z, w2.z, w3.z), 2u < lim);
    let b3 = select(z, vec4<f32>(w0.w, w1.w, w2.w, w3.w), 3u < lim);
#else
    let k1 = P.k - 1u;
    let z = vec4<f32>(0.0);
    // Columns past N are read (and never stored) at the last aligned 4 columns instead.
    let cb = select(col0, (P.n - 1u) & ~3u, col0 >= P.n);
    let b0 = b4(P.y_off + k0 * P.b_rs + cb);
    let b1 = select(z, b4(P.y_off + min(k0 + 1u, k1) * P.b_rs + cb), 1u < lim);
    let b2 = select(z, b4(P.y_off + min(k0 + 2u, k1) * P.b_rs + cb), 2u < lim);
    let b3 = select(z, b4(P.y_off + min(k0 + 3u, k1) * P.b_rs + cb), 3u < lim);
#endif
    // The 16 fragments of A: lane f loads fragments f and f + 8 and broadcasts them, or each
    // invocation loads all 16.
#if SUBGROUP
    let mine = frag(fl, row0, k0, lim);
    let mine2 = frag(fl + 8u, row0, k0, lim);
    let f0 = subgroupBroadcast(mine, 0u);
    let f1 = subgroupBroadcast(mine, 1u);
    let f2 = subgroupBroadcast(mine, 2u);
    let f3 = subgroupBroadcast(mine, 3u);
    let f4 = subgroupBroadcast(mine, 4u);
    let f5 = subgroupBroadcast(mine, 5u);
    let f6 = subgroupBroadcast(mine, 6u);
    let f7 = subgroupBroadcast(mine, 7u);
    let f8 = subgroupBroadcast(mine2, 0u);
    let f9 = subgroupBroadcast(mine2, 1u);
    let f10 = subgroupBroadcast(mine2, 2u);
    let f11 = subgroupBroadcast(mine2, 3u);
    let f12 = subgroupBroadcast(mine2, 4u);
    let f13 = subgroupBroadcast(mine2, 5u);
    let f14 = subgroupBroadcast(mine2, 6u);
    let f15 = subgroupBroadcast(mine2, 7u);
#else
    let f0 = frag(0u, row0, k0, lim);
    let f1 = frag(1u, row0, k0, lim);
    let f2 = frag(2u, row0, k0, lim);
    let f3 = frag(3u, row0, k0, lim);
    let f4 = frag(4u, row0, k0, lim);
    let f5 = frag(5u, row0, k0, lim);
    let f6 = frag(6u, row0, k0, lim);
    let f7 = frag(7u, row0, k0, lim);
    let f8 = frag(8u, row0, k0, lim);
    let f9 = frag(9u, row0, k0, lim);
    let f10 = frag(10u, row0, k0, lim);
    let f11 = frag(11u, row0, k0, lim);
    let f12 = frag(12u, row0, k0, lim);
    let f13 = frag(13u, row0, k0, lim);
    let f14 = frag(14u, row0, k0, lim);
    let f15 = frag(15u, row0, k0, lim);
#endif
    // Row r's four k values.
#if MM_TN
    var g = array<vec4<f32>, 16>(
        vec4<f32>(f0.x, f4.x, f8.x, f12.x),
        vec4<f32>(f0.y, f4.y, f8.y, f12.y),
        vec4<f32>(f0.z, f4.z, f8.z, f12.z),
        vec4<f32>(f0.w, f4.w, f8.w, f12.w),
        vec4<f32>(f1.x, f5.x, f9.x, f13.x),
        vec4<f32>(f1.y, f5.y, f9.y, f13.y),
        vec4<f32>(f1.z, f5.z, f9.z, f13.z),
        vec4<f32>(f1.w, f5.w, f9.w, f13.w),
        vec4<f32>(f2.x, f6.x, f10.x, f14.x),
        vec4<f32>(f2.y, f6.y, f10.y, f14.y),
        vec4<f32>(f2.z, f6.z, f10.z, f14.z),
        vec4<f32>(f2.w, f6.w, f10.w, f14.w),
        vec4<f32>(f3.x, f7.x, f11.x, f15.x),
        vec4<f32>(f3.y, f7.y, f11.y, f15.y),
        vec4<f32>(f3.z, f7.z, f11.z, f15.z),
        vec4<f32>(f3.w, f7.w, f11.w, f15.w),
    );
#else
    var g = array<vec4<f32>, 16>(f0, f1, f2, f3, f4, f5, f6, f7, f8, f9, f10, f11, f12, f13, f14, f15);
#endif
    for (var r = 0u; r < R; r++) {
        let a = g[r];
        var c = (*acc)[r];
        c = fma(vec4<f32>(a.x), b0, c);
        c = fma(vec4<f32>(a.y), b1, c);
        c = fma(vec4<f32>(a.z), b2, c);
        c = fma(vec4<f32>(a.w), b3, c);
        (*acc)[r] = c;
    }
}

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
#subgroup_args
) {
#subgroup_lets
    let g = local_row(wid);
    let tiles_m = (P.m + R - 1u) / R;
    if (g >= tiles_m * ((P.n + TN - 1u) / TN)) {
        return;
    }
    // Row tiles vary fastest: consecutive workgroups share their columns of B.
    let row0 = (g % tiles_m) * R;
    let col0 = (g / tiles_m) * TN + lid * 4u;
    let fl = lane % 8u;
    var acc: array<vec4<f32>, 16>;
    let kfull = P.k & ~3u;
    for (var k0 = 0u; k0 < kfull; k0 += 4u) {
        kstep(&acc, row0, col0, k0, 4u, fl);
#if MM_NN
        // G W has the vocabulary as k (thousands of rows of W): a barrier every 64 k keeps
        // the invocations of a workgroup on the same rows of W, which a software rasteriser
        // (running them one after another between barriers) then reads from cache.
        if ((k0 & 63u) == 60u) {
            workgroupBarrier();
        }
#endif
    }
    if (kfull < P.k) {
        kstep(&acc, row0, col0, kfull, P.k - kfull, fl);
    }
    for (var r = 0u; r < R; r++) {
        let row = row0 + r;
        if (row >= P.m) {
            break;
        }
        for (var j = 0u; j < 4u; j++) {
            let col = col0 + j;
            if (col < P.n) {
                store_c(row, col, acc[r][j]);
            }
        }
    }
}
