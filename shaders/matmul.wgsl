// The matrix products of fused linear cross-entropy: C[m, n] (+)= sum_k A[m, k] B[k, n]
// (+ bias[class0 + n]), with A (`input`, any dtype) and B (`second`, any dtype) addressed by
// element strides (so one kernel does H W^T, G W and G^T H) and C (`output`, f32) row-major.
// One workgroup per 64 x 64 tile of C, 4 x 4 outputs per invocation, K in steps of 16
// through workgroup memory; f32 accumulation.

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;

var<workgroup> a_tile: array<f32, 1024>;
var<workgroup> b_tile: array<f32, 1024>;

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = local_row(wid);
    let tiles_n = (P.mm_n + TN - 1u) / TN;
    let row0 = (g / tiles_n) * TM;
    let col0 = (g % tiles_n) * TN;
    if (row0 >= P.mm_m) {
        return;
    }
    let tx = lid % 16u;
    let ty = lid / 16u;
    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < P.mm_k; k0 += TK) {
        for (var i = 0u; i < 4u; i++) {
            let e = lid + i * 256u;
            // A tile, stored k-major: a_tile[kk * TM + mm].
            let mm = e / TK;
            let kk = e % TK;
            var x = 0.0;
            if (row0 + mm < P.mm_m && k0 + kk < P.mm_k) {
                x = in1(P.x_off + (row0 + mm) * P.a_rs + (k0 + kk) * P.a_cs);
            }
            a_tile[kk * TM + mm] = x;
            // B tile: b_tile[kk * TN + nn].
            let kb = e / TN;
            let nn = e % TN;
            var y = 0.0;
            if (k0 + kb < P.mm_k && col0 + nn < P.mm_n) {
                y = sec1(P.y_off + (k0 + kb) * P.b_rs + (col0 + nn) * P.b_cs);
            }
            b_tile[kb * TN + nn] = y;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let ab = kk * TM + ty * 4u;
            let bb = kk * TN + tx * 4u;
            let b = vec4<f32>(b_tile[bb], b_tile[bb + 1u], b_tile[bb + 2u], b_tile[bb + 3u]);
            acc[0] += a_tile[ab] * b;
            acc[1] += a_tile[ab + 1u] * b;
            acc[2] += a_tile[ab + 2u] * b;
            acc[3] += a_tile[ab + 3u] * b;
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let row = row0 + ty * 4u + i;
        if (row >= P.mm_m) {
            break;
        }
        for (var j = 0u; j < 4u; j++) {
            let col = col0 + tx * 4u + j;
            if (col < P.mm_n) {
                var c = acc[i][j];
                if ((P.mm_flags & 2u) != 0u) {
                    c += class_weight[P.class0 + col];
                }
                let o = P.o_off + row * P.c_rs + col;
                if ((P.mm_flags & 1u) != 0u) {
                    c += output[o];
                }
                output[o] = c;
            }
        }
    }
}
