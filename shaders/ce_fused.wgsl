// Pass 2 of cross-entropy, one workgroup per row: the row's (max, sum) statistic in one read
// of the logits, its loss and log-sum-exp, and (GRAD / IN_PLACE) the gradient of the reduced
// loss in a second read, written to OUT or over the logits.

fn row_target(row: u32) -> i32 {
    let t = T[row];
    if (t == P.ignore_index || t < 0 || t >= i32(P.v)) {
        return -1; // ignored (out-of-range targets were flagged by the weights pass)
    }
    return t;
}

#if GRAD
fn put(r: u32, i: u32, g: vec4<f32>) {
#if VEC4
    OUT[row_base(r) + i] = g;
#else
    OUT[row_base(r) + i] = g.x;
#endif
}
#endif
#if IN_PLACE
fn put(r: u32, i: u32, g: vec4<f32>) {
#if VEC4
    X[row_base(r) + i] = g;
#else
    X[row_base(r) + i] = g.x;
#endif
}
#endif

// Per-row constants of the gradient (see the loss in the comment of `main`).
struct GradCoef {
    m: f32,
    s: f32,
    big_s: f32,
    hard: f32,
    c0: f32,
    k: f32,
    tu: u32,
    // P.flags, held in a register: the loop below tests it per element.
    fl: u32,
}

// d(loss)/d(x_c) for logit x of class c (y: its target probability with F_SOFT).
fn grad_at(gc: GradCoef, x: f32, c: u32, y: f32) -> f32 {
    var z = x;
    var d = 1.0;
    if ((gc.fl & F_TEMP) != 0u) {
        z = z * P.inv_temp;
        d = P.inv_temp;
    }
    if ((gc.fl & F_SOFTCAP) != 0u) {
        z = P.softcap * tanh(z / P.softcap);
        let t = z / P.softcap;
        d = d * (1.0 - t * t);
    }
    let e = exp(z - gc.m);
    var wc = 1.0;
    if ((gc.fl & F_CLASS_W) != 0u) {
        wc = CW[c];
    }
#if EXTRAS
    if ((gc.fl & F_SOFT) != 0u) {
        wc = wc * soft_q(y);
    }
#endif
    var g = gc.k * e - gc.c0 * wc;
    if (c == gc.tu) {
        // p_t - 1 = (expm1(z_t - m) - s) / (1 + s): no cancellation when p_t ~ 1.
        g = gc.hard * ((expm1_(z - gc.m) - gc.s) / gc.big_s) + (gc.k - gc.hard / gc.big_s) * e - gc.c0 * wc;
    }
    return g * d;
}

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
    let soft = has(F_SOFT);
    var t = -1;
    if (!soft) {
        t = row_target(row);
    }
    // The target's logit, known before the pass so that the pass can rank it.
    var zt = 0.0;
    if (t >= 0) {
        zt = tr(load(r, u32(t)));
    }
    let part = row_part(r, lid, zt);
    let st = reduce_stat(part.st, lid, lane, sg, nsg);
    var acc = vec2<f32>(0.0, 0.0);
    if (has(F_SMOOTH | F_SOFT)) {
        acc = reduce_v2(part.acc, lid, lane, sg, nsg);
    }
    var rank = 0.0;
    if (has(F_RANK)) {
        rank = reduce_v2(vec2<f32>(part.above, 0.0), lid, lane, sg, nsg).x;
    }
    let m = st.m;
    let s = st.s;
    let l1p = log1p_(s);
    let lse = m + l1p;
    // E_p[z] - z_t = sum_c e_c (z_c - z_t) / (1 + s): d(NLL)/d(log T) is its negative.
    var gap = 0.0;
    if (has(F_GAP)) {
        var g = 0.0;
        for (var i = lid; i < P.v; i += WG) {
            let z = tr(load(r, i));
            g += exp(z - m) * (z - zt);
        }
        // Zero for ignored rows (masked after the reduction: its barriers need uniform control flow).
        gap = select(0.0, reduce_v2(vec2<f32>(g, 0.0), lid, lane, sg, nsg).x / (1.0 + s), t >= 0);
    }
    let eps = P.smoothing;
    let vf = f32(P.v);
    var swn = 1.0;
    if (has(F_SAMPLE_W)) {
        swn = SW[row];
    }
    var w = 0.0;
    if (t >= 0) {
        w = swn * class_w(u32(t));
    }
    var wtot = vf;
    if (has(F_CLASS_W)) {
        wtot = acc.y;
    }
    if (lid == 0u) {
        var loss = 0.0;
        if (soft) {
            // sum_c w_c q_c (lse - z_c), w_c the class weight.
            loss = swn * (acc.y * lse - acc.x);
            if (has(F_ZLOSS)) {
                loss += P.z_loss * lse * lse;
            }
        } else if (t >= 0) {
            loss = w * (1.0 - eps) * ((m - zt) + l1p);
            if (has(F_SMOOTH)) {
                loss += swn * (eps / vf) * (wtot * lse - acc.x);
            }
            // The row's full loss, as reduction `none` reports it; the host splits the
            // z-loss back out for `mean` (it is averaged over rows, not weights).
            if (has(F_ZLOSS)) {
                loss += P.z_loss * lse * lse;
            }
        }
        ROWS[row] = loss;
        ROWS[P.n_rows + row] = lse;
        if (has(F_RANK)) {
            ROWS[2u * P.n_rows + row] = m;
            ROWS[3u * P.n_rows + row] = select(-1.0, rank, t >= 0);
        }
        if (has(F_GAP)) {
            ROWS[4u * P.n_rows + row] = gap;
        }
    }
#if GRAD || IN_PLACE
    var a = P.grad_scale;
    var b = P.grad_scale;
    if (has(F_MEAN)) {
        a = P.grad_scale / SC.weight_sum;
        b = P.grad_scale / f32(SC.count);
    }
    let big_s = 1.0 + s;
    let hard = a * w * (1.0 - eps);
    var c0 = 0.0;
    if (has(F_SMOOTH)) {
        c0 = a * swn * eps / vf;
    }
    var zc = 0.0;
    if (has(F_ZLOSS)) {
        zc = b * 2.0 * P.z_loss * lse;
    }
    if (soft) {
        // g_j = a sw (sum_c w_c q_c) p_j - a sw w_j q_j: c0 multiplies w_j q_j below.
        c0 = a * swn;
    }
    var k = (hard + c0 * wtot + zc) / big_s;
    if (soft) {
        k = (a * swn * acc.y + zc) / big_s;
    }
    let live = t >= 0 || soft;
    let gc = GradCoef(m, s, big_s, hard, c0, k, u32(t), P.flags);
#if VEC4
    let n4 = P.v / 4u;
#else
    let n4 = P.v;
#endif
    for (var i = lid; i < n4; i += WG) {
        var g = vec4<f32>(0.0, 0.0, 0.0, 0.0);
        if (live) {
            var y = vec4<f32>(0.0);
#if VEC4
            let x = X[row_base(r) + i];
#if EXTRAS
            if (soft) {
                y = Y[row_base(r) + i];
            }
#endif
            // Unrolled: a loop indexing the vec4 would spill it on software rasterisers.
            let c = 4u * i;
            g = vec4<f32>(grad_at(gc, x.x, c, y.x), grad_at(gc, x.y, c + 1u, y.y), grad_at(gc, x.z, c + 2u, y.z), grad_at(gc, x.w, c + 3u, y.w));
#else
#if EXTRAS
            if (soft) {
                y.x = Y[row_base(r) + i];
            }
#endif
            g.x = grad_at(gc, X[row_base(r) + i], i, y.x);
#endif
        }
        put(r, i, g);
    }
#endif
}
