// Distribution measures per row, one workgroup per row: `second` = p, `input` = q, as
// probabilities or (DIST_LOGITS) as logits. Writes output[4 row + k] = (H(p), H(p, q), KL(p || q), JS(p, q)), with
// 0 log 0 = 0 and +inf where p > 0 but q = 0.

// Flag bit (`dist_flags` in src/gpu/kernels/divergence.rs): the rows are logits.
const DIST_LOGITS: u32 = 1u;

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
    let row = P.row0 + r;
    let xb = x_row(r);
    let yb = y_row(r);
    let logits = has(DIST_LOGITS);
    var lse_q = 0.0;
    var lse_p = 0.0;
    if (logits) {
        var sq = Stat(P.neg_inf, 0.0);
        var sp = Stat(P.neg_inf, 0.0);
        for (var i = lid; i < P.v; i += WG) {
            sq = push(sq, in1(xb + i));
            sp = push(sp, sec1(yb + i));
        }
        let a = reduce_stat(sq, lid, lane, sg, nsg);
        let b = reduce_stat(sp, lid, lane, sg, nsg);
        lse_q = a.m + log1p_(a.s);
        lse_p = b.m + log1p_(b.s);
    }
    var h = 0.0;
    var ce = 0.0;
    var kl = 0.0;
    var js = 0.0;
    for (var i = lid; i < P.v; i += WG) {
        var lq = 0.0;
        var lp = 0.0;
        var q = 0.0;
        var p = 0.0;
        if (logits) {
            lq = in1(xb + i) - lse_q;
            lp = sec1(yb + i) - lse_p;
            q = exp(lq);
            p = exp(lp);
        } else {
            q = in1(xb + i);
            p = sec1(yb + i);
            lq = log(q);
            lp = log(p);
        }
        let lm = log(0.5 * (p + q));
        if (p > 0.0) {
            h -= p * lp;
            ce -= p * lq;
            kl += p * (lp - lq);
            js += 0.5 * p * (lp - lm);
        }
        if (q > 0.0) {
            js += 0.5 * q * (lq - lm);
        }
    }
    let s1 = reduce_v2(vec2<f32>(h, ce), lid, lane, sg, nsg);
    let s2 = reduce_v2(vec2<f32>(kl, js), lid, lane, sg, nsg);
    if (lid == 0u) {
        output[4u * row] = s1.x;
        output[4u * row + 1u] = s1.y;
        output[4u * row + 2u] = s2.x;
        output[4u * row + 3u] = s2.y;
    }
}
