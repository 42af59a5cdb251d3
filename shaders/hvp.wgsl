// Hessian-vector products of softmax cross-entropy in logit space, one workgroup per row:
// H = diag(p) - p p^T, so H v = p * v - p (p . v), with `input` = logits and `second` = v.
// Three reads of the row (statistic, p . v, output), no V x V matrix.

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
    let xb = x_row(r);
    let yb = y_row(r);
    let a = reduce_stat(row_stat_part(r, lid, 1.0), lid, lane, sg, nsg);
    let inv = 1.0 / (1.0 + a.s);
    var d = 0.0;
    for (var i = lid; i < P.v; i += WG) {
        d += exp(in1(xb + i) - a.m) * sec1(yb + i);
    }
    let pv = reduce_v2(vec2<f32>(d, 0.0), lid, lane, sg, nsg).x * inv;
    for (var i = lid; i < P.v; i += WG) {
        let p = exp(in1(xb + i) - a.m) * inv;
        put1(o_row(r) + i, p * (sec1(yb + i) - pv));
    }
}
