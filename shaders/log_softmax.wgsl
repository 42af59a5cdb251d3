// Row-wise log-softmax (or softmax with LS_SOFTMAX), one workgroup per row: statistic in one
// read, f32 output in a second.

// Flag bit (`ls_flags` in src/gpu/kernels/log_softmax.rs): softmax rather than log-softmax.
const LS_SOFTMAX: u32 = 1u;

@group(0) @binding(0) var<uniform> P: ChunkHeader;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
#subgroup_args
) {
#subgroup_lets
    let r = local_row(wid);
    if (r >= P.chunk_rows) {
        return;
    }
    let st = reduce_stat(row_stat_part(r, lid, 1.0), lid, lane, sg, nsg);
    let l1p = log1p_(st.s);
    let inv = 1.0 / (1.0 + st.s);
    let soft = has(LS_SOFTMAX);
    let xb = x_row(r);
    let ob = o_row(r);
#if VEC8
    for (var o = lid; o < P.v / 8u; o += WG) {
        let x = in8(xb / 8u + o);
        let dl = x.lo - vec4<f32>(st.m);
        let dh = x.hi - vec4<f32>(st.m);
        let lo = select(dl - vec4<f32>(l1p), exp(dl) * inv, soft);
        let hi = select(dh - vec4<f32>(l1p), exp(dh) * inv, soft);
        put8(ob + 8u * o, V8(lo, hi));
    }
#elif VEC4
    for (var q = lid; q < P.v / 4u; q += WG) {
        let d = in4(xb / 4u + q) - vec4<f32>(st.m);
        put4(ob / 4u + q, select(d - vec4<f32>(l1p), exp(d) * inv, soft));
    }
#else
    for (var j = lid; j < P.v; j += WG) {
        let d = in1(xb + j) - st.m;
        put1(ob + j, select(d - l1p, exp(d) * inv, soft));
    }
#endif
}
