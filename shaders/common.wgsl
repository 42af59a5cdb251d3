// Shared by every kernel: parameters, the online (max, sum) statistic, log1p/expm1, and
// workgroup reductions (subgroup operations when available, workgroup memory otherwise).
// Preprocessed by src/kernels/source.rs: `#if NAME` / `#else` / `#endif`.

const WG: u32 = 256u;

const F_CLASS_W: u32 = 1u;
const F_SAMPLE_W: u32 = 2u;
const F_SOFTCAP: u32 = 4u;
const F_TEMP: u32 = 8u;
const F_SMOOTH: u32 = 16u;
const F_MEAN: u32 = 32u;
const F_SOFTMAX: u32 = 64u;
const F_ZLOSS: u32 = 128u;
// Probability targets in Y instead of class indices in T.
const F_SOFT: u32 = 256u;
// Binary cross-entropy: pos_weight given, inputs are probabilities, element losses wanted.
const F_POS_W: u32 = 512u;
const F_PROBS: u32 = 1024u;
const F_ELEM: u32 = 2048u;
// Distribution measures of logits rather than probabilities.
const F_LOGITS: u32 = 4096u;
// Cross-entropy row statistics: the target's rank (classes with a strictly larger logit) and
// the row max; the expected logit gap E_p[z] - z_t (temperature fitting).
const F_RANK: u32 = 8192u;
const F_GAP: u32 = 16384u;

struct Params {
    n_rows: u32,
    v: u32,
    row0: u32,
    grid_x: u32,
    chunk_rows: u32,
    ignore_index: i32,
    flags: u32,
    // -inf has no WGSL literal; the host passes it.
    neg_inf: f32,
    smoothing: f32,
    z_loss: f32,
    softcap: f32,
    inv_temp: f32,
    grad_scale: f32,
    // Elements between the start of the X / OUT bindings and row 0 of the chunk (chunks
    // are bound at offsets rounded down to the device's alignment).
    x_off: u32,
    // First partial-sum slot of this chunk (binary cross-entropy).
    part_off: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;

// Logits of the current row chunk.
#if VEC4
#if IN_PLACE
@group(0) @binding(1) var<storage, read_write> X: array<vec4<f32>>;
#else
@group(0) @binding(1) var<storage, read> X: array<vec4<f32>>;
#endif
#else
#if IN_PLACE
@group(0) @binding(1) var<storage, read_write> X: array<f32>;
#else
@group(0) @binding(1) var<storage, read> X: array<f32>;
#endif
#endif

// Every kernel shares this binding table (unused slots get a small placeholder buffer).
@group(0) @binding(2) var<storage, read> T: array<i32>;
@group(0) @binding(3) var<storage, read> CW: array<f32>;
@group(0) @binding(4) var<storage, read> SW: array<f32>;

struct Scalars {
    weight_sum: f32,
    count: u32,
    loss_sum: f32,
    lse2_sum: f32,
    // First row whose target is out of range (0xffffffff when none) and its value.
    err_row: atomic<u32>,
    err_target: i32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(5) var<storage, read_write> SC: Scalars;
// Per-row results: cross-entropy writes loss at [row] and lse at [n_rows + row]; other kernels
// write their row values or partial sums here.
@group(0) @binding(6) var<storage, read_write> ROWS: array<f32>;
// Per-element losses of binary cross-entropy, chunked like X.
@group(0) @binding(7) var<storage, read_write> AUX: array<f32>;
#if VEC4
@group(0) @binding(8) var<storage, read_write> OUT: array<vec4<f32>>;
#else
@group(0) @binding(8) var<storage, read_write> OUT: array<f32>;
#endif

// Probability targets (F_SOFT), laid out and chunked like X.
#if VEC4
@group(0) @binding(9) var<storage, read> Y: array<vec4<f32>>;
#else
@group(0) @binding(9) var<storage, read> Y: array<f32>;
#endif

// pos_weight of binary cross-entropy [C].
@group(0) @binding(10) var<storage, read> PW: array<f32>;

fn has(flag: u32) -> bool {
    return (P.flags & flag) != 0u;
}

// Index of local row r's first element (VEC4: first vec4) in X and OUT.
fn row_base(r: u32) -> u32 {
#if VEC4
    return (P.x_off + r * P.v) / 4u;
#else
    return P.x_off + r * P.v;
#endif
}

// Element j of local row r.
fn load(r: u32, j: u32) -> f32 {
#if VEC4
    return X[row_base(r) + j / 4u][j % 4u];
#else
    return X[row_base(r) + j];
#endif
}

// Temperature, then soft-capping: the logits the softmax sees.
fn tr(x: f32) -> f32 {
    var z = x;
    if (has(F_TEMP)) {
        z = z * P.inv_temp;
    }
    if (has(F_SOFTCAP)) {
        z = P.softcap * tanh(z / P.softcap);
    }
    return z;
}

// log(1 + x) for x >= 0 with full relative precision: GPU log() only promises an absolute
// error of 2^-21 near 1, so small arguments use 2 atanh(x / (2 + x)) as a series.
fn log1p_(x: f32) -> f32 {
    if (x > -0.5 && x < 1.0) {
        let z = x / (2.0 + x);
        let z2 = z * z;
        var p = 1.0 / 17.0;
        p = p * z2 + 1.0 / 15.0;
        p = p * z2 + 1.0 / 13.0;
        p = p * z2 + 1.0 / 11.0;
        p = p * z2 + 1.0 / 9.0;
        p = p * z2 + 1.0 / 7.0;
        p = p * z2 + 1.0 / 5.0;
        p = p * z2 + 1.0 / 3.0;
        p = p * z2 + 1.0;
        return 2.0 * z * p;
    }
    return log(1.0 + x);
}

// exp(x) - 1 with full relative precision near 0 (Taylor series on |x| < 0.5).
fn expm1_(x: f32) -> f32 {
    if (abs(x) < 0.5) {
        var p = 1.0 / 3628800.0;
        p = p * x + 1.0 / 362880.0;
        p = p * x + 1.0 / 40320.0;
        p = p * x + 1.0 / 5040.0;
        p = p * x + 1.0 / 720.0;
        p = p * x + 1.0 / 120.0;
        p = p * x + 1.0 / 24.0;
        p = p * x + 1.0 / 6.0;
        p = p * x + 0.5;
        p = p * x + 1.0;
        return p * x;
    }
    return exp(x) - 1.0;
}

// Running softmax statistic: m = max so far, s = sum of exp(x - m) over every element
// except one occurrence of the max. Keeping the max's 1 out of s is what lets
// log1p(s) resolve confident rows whose s is below f32's epsilon.
struct Stat {
    m: f32,
    s: f32,
}

fn push(st: Stat, z: f32) -> Stat {
    // Branch-free with one exp: SIMD lanes (lavapipe) and warps would otherwise run both
    // sides of `z > m`, paying two exponentials per element.
    let up = z > st.m;
    let e = exp(-abs(z - st.m));
    // z > m: the old max and its s rescale by e. Else: z adds e. An empty state
    // (m = -inf) gives e = 0; NaN gives NaN and propagates.
    let s = select(st.s + e, (st.s + 1.0) * e, up);
    // -inf adds nothing (and -inf - -inf would be NaN).
    let skip = z == P.neg_inf;
    return Stat(select(max(st.m, z), st.m, skip), select(s, st.s, skip));
}

fn merge(a: Stat, b: Stat) -> Stat {
    if (b.m == P.neg_inf) {
        return Stat(a.m, a.s + b.s);
    }
    if (a.m == P.neg_inf) {
        return Stat(b.m, a.s + b.s);
    }
    if (a.m >= b.m) {
        return Stat(a.m, a.s + (b.s + 1.0) * exp(b.m - a.m));
    }
    return Stat(b.m, b.s + (a.s + 1.0) * exp(a.m - b.m));
}

var<workgroup> red_m: array<f32, WG>;
var<workgroup> red_s: array<f32, WG>;
var<workgroup> red_v: array<vec2<f32>, WG>;

#if SUBGROUP
// One subgroup's statistic: the max, and the sums rescaled to it, with exactly one lane
// holding the max keeping its s as is (so the max's own 1 is not added).
fn subgroup_stat(st: Stat, lane: u32) -> Stat {
    let mx = subgroupMax(st.m);
    let is_max = st.m == mx;
    let first = subgroupMin(select(0xffffffffu, lane, is_max));
    var c = 0.0;
    if (is_max && lane == first) {
        c = st.s;
    } else if (st.m != P.neg_inf) {
        c = (st.s + 1.0) * exp(st.m - mx);
    } else {
        c = st.s;
    }
    return Stat(mx, subgroupAdd(c));
}

fn reduce_stat(st: Stat, lid: u32, lane: u32, sg: u32, nsg: u32) -> Stat {
    let r = subgroup_stat(st, lane);
    if (lane == 0u) {
        red_m[sg] = r.m;
        red_s[sg] = r.s;
    }
    workgroupBarrier();
    if (lid == 0u) {
        var acc = Stat(red_m[0], red_s[0]);
        for (var i = 1u; i < nsg; i++) {
            acc = merge(acc, Stat(red_m[i], red_s[i]));
        }
        red_m[0] = acc.m;
        red_s[0] = acc.s;
    }
    workgroupBarrier();
    let out = Stat(red_m[0], red_s[0]);
    workgroupBarrier();
    return out;
}

fn reduce_v2(x: vec2<f32>, lid: u32, lane: u32, sg: u32, nsg: u32) -> vec2<f32> {
    let r = subgroupAdd(x);
    if (lane == 0u) {
        red_v[sg] = r;
    }
    workgroupBarrier();
    if (lid == 0u) {
        var acc = red_v[0];
        for (var i = 1u; i < nsg; i++) {
            acc += red_v[i];
        }
        red_v[0] = acc;
    }
    workgroupBarrier();
    let out = red_v[0];
    workgroupBarrier();
    return out;
}
#else
fn reduce_stat(st: Stat, lid: u32, lane: u32, sg: u32, nsg: u32) -> Stat {
    red_m[lid] = st.m;
    red_s[lid] = st.s;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            let r = merge(Stat(red_m[lid], red_s[lid]), Stat(red_m[lid + stride], red_s[lid + stride]));
            red_m[lid] = r.m;
            red_s[lid] = r.s;
        }
        workgroupBarrier();
    }
    let out = Stat(red_m[0], red_s[0]);
    workgroupBarrier();
    return out;
}

fn reduce_v2(x: vec2<f32>, lid: u32, lane: u32, sg: u32, nsg: u32) -> vec2<f32> {
    red_v[lid] = x;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            red_v[lid] = red_v[lid] + red_v[lid + stride];
        }
        workgroupBarrier();
    }
    let out = red_v[0];
    workgroupBarrier();
    return out;
}
#endif

// This thread's share of one row's statistic; with F_SMOOTH also (sum w_c z_c, sum w_c);
// with F_RANK the number of logits above the target's.
struct RowPart {
    st: Stat,
    acc: vec2<f32>,
    above: f32,
}

fn class_w(c: u32) -> f32 {
    if (has(F_CLASS_W)) {
        return CW[c];
    }
    return 1.0;
}

// Smoothed target probability q_c = (1 - eps) y_c + eps / V (F_SOFT).
fn soft_q(y: f32) -> f32 {
    return (1.0 - P.smoothing) * y + P.smoothing / f32(P.v);
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

fn row_part(r: u32, lid: u32, zt: f32) -> RowPart {
    var p = RowPart(Stat(P.neg_inf, 0.0), vec2<f32>(0.0, 0.0), 0.0);
    let soft = has(F_SOFT);
    let base = row_base(r);
#if VEC4
    let v4 = P.v / 4u;
    for (var i = lid; i < v4; i += WG) {
        let x = X[base + i];
        var y = vec4<f32>(0.0);
#if EXTRAS
        if (soft) {
            y = Y[base + i];
        }
#endif
        p = visit(p, tr(x.x), 4u * i, y.x, zt);
        p = visit(p, tr(x.y), 4u * i + 1u, y.y, zt);
        p = visit(p, tr(x.z), 4u * i + 2u, y.z, zt);
        p = visit(p, tr(x.w), 4u * i + 3u, y.w, zt);
    }
#else
    for (var i = lid; i < P.v; i += WG) {
        var y = 0.0;
#if EXTRAS
        if (soft) {
            y = Y[base + i];
        }
#endif
        p = visit(p, tr(X[base + i]), i, y, zt);
    }
#endif
    return p;
}

// Local row index of this workgroup in a 2-D folded grid.
fn local_row(wid: vec3<u32>) -> u32 {
    return wid.y * P.grid_x + wid.x;
}
