// Binary cross-entropy, elementwise over a chunk of [rows, C]: from logits (stable softplus
// form, any |x|) or from probabilities (logs clamped at -100, as PyTorch). Each workgroup takes
// WG * PER_THREAD consecutive elements, writes their gradients (GRAD) and losses (F_ELEM), and
// one Kahan partial sum of its losses to row_values[P.part_off + group]; the host adds the
// partials in f64.

const PER_THREAD: u32 = 8u;

// log(1 + exp(x)) without overflow.
fn softplus(x: f32) -> f32 {
    return max(x, 0.0) + log1p_(exp(-abs(x)));
}

// 1 / (1 + exp(-x)) without overflow.
fn sigmoid(x: f32) -> f32 {
    if (x >= 0.0) {
        return 1.0 / (1.0 + exp(-x));
    }
    let e = exp(x);
    return e / (1.0 + e);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
#subgroup_args
) {
#subgroup_lets
    let group = local_row(wid);
    let n_el = P.chunk_rows * P.v;
    let start = group * WG * PER_THREAD;
    if (start >= n_el) {
        return;
    }
    var acc = 0.0;
    var comp = 0.0;
    for (var k = 0u; k < PER_THREAD; k++) {
        let e = start + k * WG + lid;
        if (e < n_el) {
            let c = e % P.v;
            let i = P.x_off + e;
            let x = in1(i);
            let y = sec1(i);
            var w = 1.0;
            if (has(F_CLASS_W)) {
                w = w * class_weight[c];
            }
            if (has(F_ELEM_W)) {
                w = w * elem_weight[i];
            }
            var l = 0.0;
            var g = 0.0;
            if (has(F_PROBS)) {
                let lp = max(log(x), -100.0);
                let lq = max(log1p_(-x), -100.0);
                l = -w * (y * lp + (1.0 - y) * lq);
                g = w * (x - y) / max((1.0 - x) * x, 1e-12);
            } else {
                var pw = 1.0;
                if (has(F_POS_W)) {
                    pw = pos_weight[c];
                }
                // -log sigmoid(x) = softplus(-x); -log(1 - sigmoid(x)) = softplus(x) = softplus(-x) + x.
                let sn = softplus(-x);
                l = w * (pw * y * sn + (1.0 - y) * (sn + x));
                g = w * ((1.0 - y) * sigmoid(x) - pw * y * sigmoid(-x));
            }
            let t = l - comp;
            let tot = acc + t;
            comp = (tot - acc) - t;
            acc = tot;
            if (has(F_ELEM)) {
                elem_loss[i] = l;
            }
#if GRAD
            output[i] = g * P.grad_scale;
#endif
        }
    }
    let s = reduce_v2(vec2<f32>(acc, 0.0), lid, lane, sg, nsg);
    if (lid == 0u) {
        row_values[P.part_off + group] = s.x;
    }
}
