// Cross-entropy's row pass, one workgroup per row: the row's (max, sum) statistic in one read
// of the logits, its loss and log-sum-exp, and (GRAD / IN_PLACE) the gradient of the reduced
// loss in a second read, written to `output` or over the logits.
//
// Long rows split into P.segs segments of P.seg_len columns, one workgroup each, in two
// dispatches: SEG_STAT writes each segment's partial statistic (max, sum, smoothing sums,
// rank count) after the row vectors in `row_values`; SEG_FINISH merges a row's partials in
// segment order (as lanes are merged), writes the row's loss from segment 0, and the gradient
// of its own segment.

fn row_target(row: u32) -> i32 {
    let t = targets[row];
    if (t == P.ignore_index) {
        return -1;
    }
    if (t < 0 || t >= i32(P.v_total)) {
        // Out of range: flagged by the weights pass for the host; device-side consumers see a
        // NaN loss and gradient for the row rather than a plausible number.
        return -2;
    }
    return t;
}

// This thread's share of one row's statistic; with F_SMOOTH also (sum w_c z_c, sum w_c);
// with F_RANK the number of logits above the target's.
struct RowPart {
    st: Stat,
    acc: vec2<f32>,
    above: f32,
}

// The class weight of column c (of a vocabulary shard starting at P.class0).
fn class_w(c: u32) -> f32 {
    return class_w_global(P.class0 + c);
}

fn class_w_global(g: u32) -> f32 {
#if CLASS_W
    if (has(F_CLASS_W)) {
        return class_weight[g];
    }
#endif
    return 1.0;
}

// Smoothed target probability q_c = (1 - eps) y_c + eps / V (F_SOFT).
fn soft_q(y: f32) -> f32 {
    return (1.0 - P.smoothing) * y + P.smoothing / f32(P.v_total);
}

// acc gathers (sum_c w_c z_c, sum_c w_c) where w_c is the class weight (label smoothing) or
// the class weight times q_c (probability targets).
fn visit(p: RowPart, z: f32, c: u32, y: f32, zt: f32) -> RowPart {
    var q = RowPart(push(p.st, z), p.acc, p.above);
    // Compiled in only for the variant that needs them: SIMD lanes (lavapipe) run even
    // uniform branches masked, so plain cross-entropy must not carry them.
#if EXTRAS
    if (has(F_RANK) && z > zt) {
        q.above += 1.0;
    }
    if (has(F_SMOOTH | F_SOFT)) {
        var w = class_w(c);
        if (has(F_SOFT)) {
            w = w * soft_q(y);
        }
        q.acc += vec2<f32>(w * z, w);
    }
#endif
    return q;
}

// This thread's share of columns [col0, col1) of row r (col0 a multiple of 4 with VEC4).
fn visit4(p: RowPart, x: vec4<f32>, c: u32, y: vec4<f32>, zt: f32) -> RowPart {
    var q = visit(p, tr(x.x), c, y.x, zt);
    q = visit(q, tr(x.y), c + 1u, y.y, zt);
    q = visit(q, tr(x.z), c + 2u, y.z, zt);
    return visit(q, tr(x.w), c + 3u, y.w, zt);
}

#if VEC8
// Columns c .. c + 7 (y: their target probabilities with F_SOFT).
fn visit8(p: RowPart, x: V8, c: u32, y: V8, zt: f32) -> RowPart {
    return visit4(visit4(p, x.lo, c, y.lo, zt), x.hi, c + 4u, y.hi, zt);
}
#endif

fn row_part(r: u32, lid: u32, zt: f32, col0: u32, col1: u32) -> RowPart {
    var p = RowPart(Stat(P.neg_inf, 0.0), vec2<f32>(0.0, 0.0), 0.0);
    let xb = x_row(r);
#if VEC8
    // Two 16-byte loads (16 elements) per iteration into two running statistics, as below.
    var p1 = p;
    var o = col0 / 8u + lid;
    let oe = col1 / 8u;
    for (; o + WG < oe; o += 2u * WG) {
        let x0 = in8(xb / 8u + o);
        let x1 = in8(xb / 8u + o + WG);
        var y0 = v8_splat(0.0);
        var y1 = v8_splat(0.0);
#if EXTRAS
        if (has(F_SOFT)) {
            y0 = sec8(y_row(r) + 8u * o);
            y1 = sec8(y_row(r) + 8u * (o + WG));
        }
#endif
        p = visit8(p, x0, 8u * o, y0, zt);
        p1 = visit8(p1, x1, 8u * (o + WG), y1, zt);
    }
    if (o < oe) {
        var y = v8_splat(0.0);
#if EXTRAS
        if (has(F_SOFT)) {
            y = sec8(y_row(r) + 8u * o);
        }
#endif
        p = visit8(p, in8(xb / 8u + o), 8u * o, y, zt);
    }
    p = RowPart(merge(p.st, p1.st), p.acc + p1.acc, p.above + p1.above);
#elif VEC4
    // Two vectors per iteration into two running statistics (merged below): two loads in
    // flight per thread and two independent exp chains.
    var p1 = p;
    var q = col0 / 4u + lid;
    let qe = col1 / 4u;
    for (; q + WG < qe; q += 2u * WG) {
        let x0 = in4(xb / 4u + q);
        let x1 = in4(xb / 4u + q + WG);
        var y0 = vec4<f32>(0.0);
        var y1 = vec4<f32>(0.0);
#if EXTRAS
        if (has(F_SOFT)) {
            y0 = sec4(y_row(r) / 4u + q);
            y1 = sec4(y_row(r) / 4u + q + WG);
        }
#endif
        p = visit4(p, x0, 4u * q, y0, zt);
        p1 = visit4(p1, x1, 4u * (q + WG), y1, zt);
    }
    if (q < qe) {
        var y = vec4<f32>(0.0);
#if EXTRAS
        if (has(F_SOFT)) {
            y = sec4(y_row(r) / 4u + q);
        }
#endif
        p = visit4(p, in4(xb / 4u + q), 4u * q, y, zt);
    }
    p = RowPart(merge(p.st, p1.st), p.acc + p1.acc, p.above + p1.above);
#else
    for (var j = col0 + lid; j < col1; j += WG) {
        var y = 0.0;
#if EXTRAS
        if (has(F_SOFT)) {
            y = sec1(y_row(r) + j);
        }
#endif
        p = visit(p, tr(in1(xb + j)), j, y, zt);
    }
#endif
    return p;
}

// `row_values` holds five row vectors (loss, lse, max, rank, gap), then each row's saved
// statistic (max, sum, class-weight sum) for a later backward pass, then segment partials
// (5 floats per (row, segment)).
fn saved_slot(row: u32) -> u32 {
    return 5u * P.n_rows + 3u * row;
}
fn part_slot(row: u32, seg: u32) -> u32 {
    return 8u * P.n_rows + 5u * (row * P.parts + seg);
}

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

// d(loss)/d(x_c) for logit x of class c (y: its target probability with F_SOFT), for every
// class but the target's (see `grad_target`): no per-element branch on the class, which SIMD
// lanes (lavapipe) would all pay for.
fn grad_at(gc: GradCoef, x: f32, c: u32, y: f32) -> f32 {
    var z = x;
    var d = 1.0;
#if TRANSFORM
    if ((gc.fl & F_TEMP) != 0u) {
        z = z * P.inv_temp;
        d = P.inv_temp;
    }
    if ((gc.fl & F_SOFTCAP) != 0u) {
        z = P.softcap * tanh(z / P.softcap);
        let t = z / P.softcap;
        d = d * (1.0 - t * t);
    }
#endif
    let e = exp(z - gc.m);
    var wc = class_w(c);
#if EXTRAS
    if ((gc.fl & F_SOFT) != 0u) {
        wc = wc * soft_q(y);
    }
#endif
    return (gc.k * e - gc.c0 * wc) * d;
}

#if VEC8
// The gradient of elements 8o .. 8o + 7 of a row starting at xb (zero for a row not live).
fn grad8(gc: GradCoef, live: bool, xb: u32, yb: u32, o: u32) -> V8 {
    if (!live) {
        return v8_splat(0.0);
    }
    var y = v8_splat(0.0);
#if EXTRAS
    if ((gc.fl & F_SOFT) != 0u) {
        y = sec8(yb + 8u * o);
    }
#endif
    let x = in8(xb / 8u + o);
    let c = 8u * o;
    let lo = vec4<f32>(
        grad_at(gc, x.lo.x, c, y.lo.x),
        grad_at(gc, x.lo.y, c + 1u, y.lo.y),
        grad_at(gc, x.lo.z, c + 2u, y.lo.z),
        grad_at(gc, x.lo.w, c + 3u, y.lo.w),
    );
    let hi = vec4<f32>(
        grad_at(gc, x.hi.x, c + 4u, y.hi.x),
        grad_at(gc, x.hi.y, c + 5u, y.hi.y),
        grad_at(gc, x.hi.z, c + 6u, y.hi.z),
        grad_at(gc, x.hi.w, c + 7u, y.hi.w),
    );
    return V8(lo, hi);
}
#elif VEC4
// The gradient of elements 4q .. 4q + 3 of a row starting at xb (zero for a row not live).
fn grad4(gc: GradCoef, live: bool, xb: u32, yb: u32, q: u32) -> vec4<f32> {
    if (!live) {
        return vec4<f32>(0.0);
    }
    var y = vec4<f32>(0.0);
#if EXTRAS
    if ((gc.fl & F_SOFT) != 0u) {
        y = sec4(yb / 4u + q);
    }
#endif
    let x = in4(xb / 4u + q);
    // Unrolled: a loop indexing the vec4 would spill it on software rasterisers.
    let c = 4u * q;
    return vec4<f32>(grad_at(gc, x.x, c, y.x), grad_at(gc, x.y, c + 1u, y.y), grad_at(gc, x.z, c + 2u, y.z), grad_at(gc, x.w, c + 3u, y.w));
}
#endif

// The target class's own gradient from its transformed logit z (= tr(x_t)):
// p_t - 1 = (expm1(z_t - m) - s) / (1 + s), without cancellation when p_t ~ 1.
fn grad_target(gc: GradCoef, z: f32, c: u32) -> f32 {
    var d = 1.0;
    if ((gc.fl & F_TEMP) != 0u) {
        d = P.inv_temp;
    }
    if ((gc.fl & F_SOFTCAP) != 0u) {
        let t = z / P.softcap;
        d = d * (1.0 - t * t);
    }
    let e = exp(z - gc.m);
    let g = gc.hard * ((expm1_(z - gc.m) - gc.s) / gc.big_s) + (gc.k - gc.hard / gc.big_s) * e - gc.c0 * class_w(c);
    return g * d;
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
#subgroup_args
) {
#subgroup_lets
    let g = local_row(wid);
    // This workgroup's row and its columns [col0, col1): the whole row, or one segment.
    let r = g / P.segs;
    let seg = g % P.segs;
    if (r >= P.chunk_rows) {
        return;
    }
    let col0 = min(seg * P.seg_len, P.v);
    let col1 = min(col0 + P.seg_len, P.v);
    let row = P.row0 + r;
    let soft = has(F_SOFT);
    var t = -1;
    if (!soft) {
        t = row_target(row);
    }
    // tg: the global target (or -1 ignored, -2 out of range); t: its column here, -3 when
    // another vocabulary shard holds it (the row still counts). Without shards t = tg.
    let tg = t;
    if (t >= 0) {
        t = t - i32(P.class0);
        if (t < 0 || t >= i32(P.v)) {
            t = -3;
        }
    }
    // The target's logit, known before the pass so that the pass can rank it. A gradient pass
    // over one segment of a row reads it only if the segment holds it: with IN_PLACE another
    // segment's workgroup may be overwriting it.
    var zt = 0.0;
    let from_saved = has(F_FROM_SAVED);
    if (t >= 0 && (!from_saved || (u32(t) >= col0 && u32(t) < col1))) {
        zt = tr(in1(x_row(r) + u32(t)));
    }
#if SEG_FINISH
    var st = Stat(P.neg_inf, 0.0);
    var acc = vec2<f32>(0.0, 0.0);
    var rank = 0.0;
    if (from_saved) {
        // A gradient pass: the statistic an earlier pass saved (only what the gradient needs).
        let b = saved_slot(row);
        st = Stat(row_values[b], row_values[b + 1u]);
        acc = vec2<f32>(0.0, row_values[b + 2u]);
    } else {
        // The row's partials merged in segment order: the same bits in every segment's workgroup.
        for (var k = 0u; k < P.parts; k++) {
            let b = part_slot(row, k);
            st = merge(st, Stat(row_values[b], row_values[b + 1u]));
            acc += vec2<f32>(row_values[b + 2u], row_values[b + 3u]);
            rank += row_values[b + 4u];
        }
        st = finish_stat(st);
    }
#else
    let part = row_part(r, lid, zt, col0, col1);
    let st = reduce_stat(part.st, lid, lane, sg, nsg);
    var acc = vec2<f32>(0.0, 0.0);
    if (has(F_SMOOTH | F_SOFT)) {
        acc = reduce_v2(part.acc, lid, lane, sg, nsg);
    }
    var rank = 0.0;
    if (has(F_RANK)) {
        rank = reduce_v2(vec2<f32>(part.above, 0.0), lid, lane, sg, nsg).x;
    }
#endif
#if SEG_STAT
    if (lid == 0u) {
        let b = part_slot(row, seg);
        row_values[b] = st.m;
        row_values[b + 1u] = st.s;
        row_values[b + 2u] = acc.x;
        row_values[b + 3u] = acc.y;
        // A shard's record carries the target logit (from the segment holding it) for the host.
        let here = t >= 0 && u32(t) >= col0 && u32(t) < col1;
        row_values[b + 4u] = select(rank, select(0.0, zt, here), has(F_SHARD));
    }
    return;
#else
    if (has(F_SAVE) && lid == 0u && seg == 0u) {
        let b = saved_slot(row);
        row_values[b] = st.m;
        row_values[b + 1u] = st.s;
        row_values[b + 2u] = acc.y;
    }
    let m = st.m;
    let s = st.s;
    let l1p = log1p_(s);
    let lse = m + l1p;
    // E_p[z] - z_t = sum_c e_c (z_c - z_t) / (1 + s): d(NLL)/d(log T) is its negative. A second
    // read of the row, only when asked for (temperature fitting; whole rows only).
    var gap = 0.0;
#if !SEG_FINISH
    if (has(F_GAP)) {
        var gsum = 0.0;
        for (var i = lid; i < P.v; i += WG) {
            let z = tr(in1(x_row(r) + i));
            gsum += exp(z - m) * (z - zt);
        }
        // Zero for ignored rows (masked after the reduction: its barriers need uniform control flow).
        gap = select(0.0, reduce_v2(vec2<f32>(gsum, 0.0), lid, lane, sg, nsg).x / (1.0 + s), t >= 0);
    }
#endif
    let eps = P.smoothing;
    let vf = f32(P.v_total);
    var swn = 1.0;
    if (has(F_SAMPLE_W)) {
        swn = sample_weight[row];
    }
    var w = 0.0;
    if (tg >= 0) {
        w = swn * class_w_global(u32(tg));
    }
    var wtot = vf;
    if (has(F_CLASS_W)) {
        wtot = acc.y;
    }
    if (lid == 0u && seg == 0u && !from_saved) {
        var loss = 0.0;
        if (soft) {
            // sum_c w_c q_c (lse - z_c), w_c the class weight.
            loss = swn * (acc.y * lse - acc.x);
            if (has(F_ZLOSS)) {
                loss += P.z_loss * lse * lse;
            }
        } else if (t == -2) {
            loss = nan_f32();
        } else if (t >= 0) {
            loss = w * (1.0 - eps) * ((m - zt) + l1p);
            if (has(F_SMOOTH)) {
                loss += swn * (eps / vf) * (wtot * lse - acc.x);
            }
            // The row's full loss, as reduction `none` reports it; the reduce pass splits the
            // z-loss back out for `mean` (it is averaged over rows, not weights).
            if (has(F_ZLOSS)) {
                loss += P.z_loss * lse * lse;
            }
        }
        row_values[row] = loss;
        row_values[P.n_rows + row] = lse;
        if (has(F_RANK)) {
            row_values[2u * P.n_rows + row] = m;
            row_values[3u * P.n_rows + row] = select(-1.0, rank, t >= 0);
        }
        if (has(F_GAP)) {
            row_values[4u * P.n_rows + row] = gap;
        }
    }
#if GRAD || IN_PLACE
    var a = P.grad_scale;
    var b = P.grad_scale;
    if (has(F_MEAN)) {
        let den = denominators();
        a = P.grad_scale / den.x;
        b = P.grad_scale / den.y;
    }
    if (has(F_UPSTREAM)) {
        var up = scalars.upstream;
        if (has(F_UP_ROWS)) {
            up = row_values[4u * P.n_rows + row];
        }
        a = a * up;
        b = b * up;
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
    let live = tg >= 0 || soft;
    // A row with an out-of-range target gets a NaN gradient (see `row_target`).
    let bad = select(0.0, nan_f32(), tg == -2);
    let gc = GradCoef(m, s, big_s, hard, c0, k, u32(t), P.flags);
    let xb = x_row(r);
    let ob = o_row(r);
#if VEC8
    // Two 16-byte loads per iteration, both issued before either store.
    var o = col0 / 8u + lid;
    let oe = col1 / 8u;
    let yb = y_row(r);
    for (; o + WG < oe; o += 2u * WG) {
        let g0 = grad8(gc, live, xb, yb, o);
        let g1 = grad8(gc, live, xb, yb, o + WG);
        put8(ob + 8u * o, v8_add(g0, bad));
        put8(ob + 8u * (o + WG), v8_add(g1, bad));
    }
    if (o < oe) {
        put8(ob + 8u * o, v8_add(grad8(gc, live, xb, yb, o), bad));
    }
#elif VEC4
    // Two vectors per iteration: both loads issued before either store.
    var q = col0 / 4u + lid;
    let qe = col1 / 4u;
    let yb = y_row(r);
    for (; q + WG < qe; q += 2u * WG) {
        let g0 = grad4(gc, live, xb, yb, q);
        let g1 = grad4(gc, live, xb, yb, q + WG);
        put4(ob / 4u + q, g0 + bad);
        put4(ob / 4u + q + WG, g1 + bad);
    }
    if (q < qe) {
        put4(ob / 4u + q, grad4(gc, live, xb, yb, q) + bad);
    }
#elif OUT16
    // 16-bit words of the output row; the first and last may be shared with the neighbours.
    let w_first = (ob + col0) >> 1u;
    let w_last = (ob + col1 - 1u) >> 1u;
    for (var wi = w_first + lid; wi <= w_last; wi += WG) {
        let c_lo = i32(2u * wi) - i32(ob);
        var g = vec2<f32>(0.0, 0.0);
        var lanes = 0u;
        for (var h = 0; h < 2; h++) {
            let c = c_lo + h;
            if (c >= i32(col0) && c < i32(col1)) {
                lanes |= 1u << u32(h);
                if (live) {
                    var y = 0.0;
#if EXTRAS
                    if (soft) {
                        y = sec1(y_row(r) + u32(c));
                    }
#endif
                    g[h] = grad_at(gc, in1(xb + u32(c)), u32(c), y);
                }
                g[h] += bad;
            }
        }
        put_word(wi, g, lanes);
    }
#else
    for (var j = col0 + lid; j < col1; j += WG) {
        var g = 0.0;
        if (live) {
            var y = 0.0;
#if EXTRAS
            if (soft) {
                y = sec1(y_row(r) + j);
            }
#endif
            g = grad_at(gc, in1(xb + j), j, y);
        }
        put1(ob + j, g + bad);
    }
#endif
    // The target's element, rewritten by one invocation once the row's writes are done.
    storageBarrier();
    if (lid == 0u && t >= 0 && u32(t) >= col0 && u32(t) < col1) {
        put_one(ob + u32(t), grad_target(gc, zt, u32(t)));
    }
#endif
#endif
}
