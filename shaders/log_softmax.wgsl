// Row-wise log-softmax (or softmax with F_SOFTMAX), one workgroup per row:
// statistic in one read, output in a second.

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
    let st = reduce_stat(row_part(r, lid, 0.0).st, lid, lane, sg, nsg);
    let l1p = log1p_(st.s);
    let inv = 1.0 / (1.0 + st.s);
    let soft = has(F_SOFTMAX);
#if VEC4
    let n4 = P.v / 4u;
    for (var i = lid; i < n4; i += WG) {
        let d = X[row_base(r) + i] - vec4<f32>(st.m);
        if (soft) {
            OUT[row_base(r) + i] = exp(d) * inv;
        } else {
            OUT[row_base(r) + i] = d - vec4<f32>(l1p);
        }
    }
#else
    for (var i = lid; i < P.v; i += WG) {
        let d = X[row_base(r) + i] - st.m;
        if (soft) {
            OUT[row_base(r) + i] = exp(d) * inv;
        } else {
            OUT[row_base(r) + i] = d - l1p;
        }
    }
#endif
}
