// Linear log-probs and entropies (src/gpu/kernels/logprobs.rs; the math is in
// src/api/logprobs.rs), one workgroup per row of f32 logits x, z = x * P.inv_temp: the row's
// log-prob of its target goes to row_values[row] and its entropy to row_values[n_rows + row]
// (0 for an ignored row). With IN_PLACE the row then becomes G = d(a logp + b H) / dx, the
// row's upstream (a, b) read from slot 4 as [a (n_rows); b (n_rows)]; 0 for an ignored row.
// Three reads of the row: the (max, sum) statistic, sum_c e_c (z_c - m), and the gradient;
// VEC4: four elements at a time (V a multiple of 4).
// A vocabulary shard (LP_SHARD: columns are the classes P.class0 ..; targets are global): the
// row's record (m, s, sum_c e_c (z_c - m), the target's z if here, else 0) goes to
// row_values[4 row ..] instead; with LP_FROM_SAVED the gradient pass reads the merged record
// of the whole vocabulary's row there (m, s, c) in place of the row's own statistic.

// Mirrored by `LogprobsParams` and `lp_flags` in src/gpu/kernels/logprobs.rs.
const LP_SHARD: u32 = 1u;
const LP_FROM_SAVED: u32 = 2u;

struct LogprobsParams {
#chunk_header
    ignore_index: i32,
    inv_temp: f32,
    // The first class of a vocabulary shard (0 without one).
    class0: u32,
}

@group(0) @binding(0) var<uniform> P: LogprobsParams;
// Class indices (i32; ignored rows hold P.ignore_index).
@group(0) @binding(2) var<storage, read> targets: array<i32>;
// The upstream gradient [a (n_rows); b (n_rows)] (IN_PLACE).
@group(0) @binding(4) var<storage, read> upstream: array<f32>;

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
    let y = targets[row];
    let counted = y != P.ignore_index;
    // The target's column here (P.class0 = 0 without shards), and whether this row holds it.
    let yl = y - i32(P.class0);
    let here = counted && yl >= 0 && yl < i32(P.v);
    let xb = x_row(r);
    // The target's logit, read before any invocation overwrites the row.
    var zt = 0.0;
    if (here) {
        zt = in1(xb + u32(yl)) * P.inv_temp;
    }
    var m = 0.0;
    var s = 0.0;
    var csum = 0.0;
    if (has(LP_FROM_SAVED)) {
        m = row_values[4u * row];
        s = row_values[4u * row + 1u];
        csum = row_values[4u * row + 2u];
    } else {
        // S = 1 + s = sum_c exp(z_c - m).
        let st = reduce_stat(row_stat_part(r, lid, P.inv_temp), lid, lane, sg, nsg);
        m = st.m;
        s = st.s;
        csum = centred_sum(xb, m, lid, lane, sg, nsg);
    }
    let l1p = log1p_(s);
    let inv_s = 1.0 / (1.0 + s);
    let mu_m = csum * inv_s;
    if (lid == 0u && !has(LP_FROM_SAVED)) {
        if (has(LP_SHARD)) {
            row_values[4u * row] = m;
            row_values[4u * row + 1u] = s;
            row_values[4u * row + 2u] = csum;
            row_values[4u * row + 3u] = zt;
        } else {
            row_values[row] = select(0.0, (zt - m) - l1p, counted);
            row_values[P.n_rows + row] = select(0.0, l1p - mu_m, counted);
        }
    }
#if IN_PLACE
    let a = upstream[row];
    let b = upstream[P.n_rows + row];
    // G_c = inv_t (a [c == y] - p_c (a + b ((z_c - m) - (mu - m)))), p_c = e_c / S.
    let k = -P.inv_temp * inv_s;
    let ka = P.inv_temp * a;
#if VEC4
    for (var q = lid; q < P.v / 4u; q += WG) {
        let d = in4(xb / 4u + q) * P.inv_temp - vec4<f32>(m);
        let cols = vec4<i32>(4 * i32(q)) + vec4<i32>(0, 1, 2, 3);
        let at_y = (cols == vec4<i32>(yl)) & vec4<bool>(here);
        let g = k * exp(d) * (vec4<f32>(a) + b * (d - vec4<f32>(mu_m))) + select(vec4<f32>(0.0), vec4<f32>(ka), at_y);
        // An ignored row's gradient is 0 whatever its logits hold.
        put4(xb / 4u + q, select(vec4<f32>(0.0), g, counted));
    }
#else
    for (var j = lid; j < P.v; j += WG) {
        let d = in1(xb + j) * P.inv_temp - m;
        let g = k * exp(d) * (a + b * (d - mu_m)) + select(0.0, ka, here && i32(j) == yl);
        // An ignored row's gradient is 0 whatever its logits hold.
        put1(xb + j, select(0.0, g, counted));
    }
#endif
#endif
}

// sum_c e_c (z_c - m) of local row r (every term <= 0), reduced over the workgroup.
fn centred_sum(xb: u32, m: f32, lid: u32, lane: u32, sg: u32, nsg: u32) -> f32 {
    var c = 0.0;
#if VEC4
    var c4 = vec4<f32>(0.0);
    for (var q = lid; q < P.v / 4u; q += WG) {
        let d = in4(xb / 4u + q) * P.inv_temp - vec4<f32>(m);
        c4 += exp(d) * d;
    }
    c = (c4.x + c4.y) + (c4.z + c4.w);
#else
    for (var j = lid; j < P.v; j += WG) {
        let d = in1(xb + j) * P.inv_temp - m;
        c += exp(d) * d;
    }
#endif
    return reduce_v2(vec2<f32>(c, 0.0), lid, lane, sg, nsg).x;
}
