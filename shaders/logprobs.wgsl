// Linear log-probs and entropies (src/gpu/kernels/logprobs.rs; the math is in
// src/api/logprobs.rs), one workgroup per row of f32 logits x, z = x * P.inv_temp: the row's
// log-prob of its target goes to row_values[row] and its entropy to row_values[n_rows + row]
// (0 for an ignored row). With IN_PLACE the row then becomes G = d(a logp + b H) / dx, the
// row's upstream (a, b) read from slot 4 as [a (n_rows); b (n_rows)]; 0 for an ignored row.
// Three reads of the row: the (max, sum) statistic, sum_c e_c (z_c - m), and the gradient;
// VEC4: four elements at a time (V a multiple of 4).

// Mirrored by `LogprobsParams` in src/gpu/kernels/logprobs.rs.
struct LogprobsParams {
#chunk_header
    ignore_index: i32,
    inv_temp: f32,
}

@group(0) @binding(0) var<uniform> P: LogprobsParams;

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
    let xb = x_row(r);
    // The target's logit, read before any invocation overwrites the row.
    var zt = 0.0;
    if (counted) {
        zt = in1(xb + u32(y)) * P.inv_temp;
    }
    // S = 1 + s = sum_c exp(z_c - m).
    let st = reduce_stat(row_stat_part(r, lid, P.inv_temp), lid, lane, sg, nsg);
    let m = st.m;
    let l1p = log1p_(st.s);
    let inv_s = 1.0 / (1.0 + st.s);
    // sum_c e_c (z_c - m): every term <= 0.
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
    // Reduced for every row (its barriers need uniform control flow), masked after.
    let mu_m = reduce_v2(vec2<f32>(c, 0.0), lid, lane, sg, nsg).x * inv_s;
    if (lid == 0u) {
        row_values[row] = select(0.0, (zt - m) - l1p, counted);
        row_values[P.n_rows + row] = select(0.0, l1p - mu_m, counted);
    }
#if IN_PLACE
    let a = sample_weight[row];
    let b = sample_weight[P.n_rows + row];
    // G_c = inv_t (a [c == y] - p_c (a + b ((z_c - m) - (mu - m)))), p_c = e_c / S.
    let k = -P.inv_temp * inv_s;
    let ka = P.inv_temp * a;
#if VEC4
    for (var q = lid; q < P.v / 4u; q += WG) {
        let d = in4(xb / 4u + q) * P.inv_temp - vec4<f32>(m);
        let cols = vec4<u32>(4u * q) + vec4<u32>(0u, 1u, 2u, 3u);
        let at_y = cols == vec4<u32>(u32(y));
        let g = k * exp(d) * (vec4<f32>(a) + b * (d - vec4<f32>(mu_m))) + select(vec4<f32>(0.0), vec4<f32>(ka), at_y);
        // An ignored row's gradient is 0 whatever its logits hold.
        put4(xb / 4u + q, select(vec4<f32>(0.0), g, counted));
    }
#else
    for (var j = lid; j < P.v; j += WG) {
        let d = in1(xb + j) * P.inv_temp - m;
        let g = k * exp(d) * (a + b * (d - mu_m)) + select(0.0, ka, i32(j) == y);
        // An ignored row's gradient is 0 whatever its logits hold.
        put1(xb + j, select(0.0, g, counted));
    }
#endif
#endif
}
