// What the row kernels (cross-entropy, log-softmax, distillation, measures, Hessian-vector
// products, row sums, binary cross-entropy, log-probs) share: the row tensors' bindings
// (slots 1, 6, 8 and 9: `kernels/rows.rs`), dtype-aware element access, the online (max, sum)
// statistic, and workgroup reductions (subgroup operations when available, workgroup memory
// otherwise).
//
// Stored dtypes: IN16 / IN_BF16 (input rows, slot 1), SEC16 / SEC_BF16 (second rows, slot 9),
// OUT16 / OUT_BF16 (output rows, slot 8; for IN_PLACE the input's dtype). 16-bit rows are read
// from u32 words; all arithmetic is f32. VEC4: rows are a multiple of 4 elements and read 4 at a
// time. VEC8 (with VEC4 and 16-bit input): rows are a multiple of 8 elements, start at 16-byte
// boundaries, and are read 8 at a time, one 16-byte load of four words each. ODD: rows have an
// odd length, so a 16-bit word can hold the end of one row and the start of the next; such edge
// words are written with atomic and/or on their own half only.

// Each family declares its own parameters, which begin with the chunk header (`#chunk_header`),
// as `P` at binding 0: `CeParams` (ce_io.wgsl), `BceParams` (bce.wgsl), `DistillParams`
// (distill.wgsl), `LogprobsParams` (logprobs.wgsl), or the header alone (`ChunkHeader`, in
// common.wgsl). What is here reads only the header's fields.

// ---- slot 1: input rows (logits; student logits; q; BCE inputs) ----
#if IN16
#if VEC8
#if IN_PLACE
@group(0) @binding(1) var<storage, read_write> input: array<vec4<u32>>;
#else
@group(0) @binding(1) var<storage, read> input: array<vec4<u32>>;
#endif
#elif VEC4
#if IN_PLACE
@group(0) @binding(1) var<storage, read_write> input: array<vec2<u32>>;
#else
@group(0) @binding(1) var<storage, read> input: array<vec2<u32>>;
#endif
#elif IN_PLACE && ODD
@group(0) @binding(1) var<storage, read_write> input: array<atomic<u32>>;
#elif IN_PLACE
@group(0) @binding(1) var<storage, read_write> input: array<u32>;
#else
@group(0) @binding(1) var<storage, read> input: array<u32>;
#endif
#else
#if VEC4
#if IN_PLACE
@group(0) @binding(1) var<storage, read_write> input: array<vec4<f32>>;
#else
@group(0) @binding(1) var<storage, read> input: array<vec4<f32>>;
#endif
#elif IN_PLACE
@group(0) @binding(1) var<storage, read_write> input: array<f32>;
#else
@group(0) @binding(1) var<storage, read> input: array<f32>;
#endif
#endif

// Per-row results: cross-entropy writes loss at [row], lse at [n_rows + row], max, rank and gap
// after them; other kernels write their row values or partial sums here.
@group(0) @binding(6) var<storage, read_write> row_values: array<f32>;
// Every other slot belongs to one family, which declares it in its own WGSL and names it in
// its Rust module's binding list: 2-5 (targets, class and sample weights, scalars) in
// ce_io.wgsl, 2 and 4 (targets, upstream) in logprobs.wgsl, 3, 7, 10 and 11 in bce.wgsl.

// ---- slot 8: output rows (gradient, log-softmax, Hessian-vector products, measures) ----
#if OUT16
#if VEC8
@group(0) @binding(8) var<storage, read_write> output: array<vec4<u32>>;
#elif VEC4
@group(0) @binding(8) var<storage, read_write> output: array<vec2<u32>>;
#elif ODD
@group(0) @binding(8) var<storage, read_write> output: array<atomic<u32>>;
#else
@group(0) @binding(8) var<storage, read_write> output: array<u32>;
#endif
#elif VEC4
@group(0) @binding(8) var<storage, read_write> output: array<vec4<f32>>;
#else
@group(0) @binding(8) var<storage, read_write> output: array<f32>;
#endif

// ---- slot 9: second rows (probability targets, teacher logits, p, v, BCE targets) ----
#if SEC16
#if VEC4
@group(0) @binding(9) var<storage, read> second: array<vec2<u32>>;
#else
@group(0) @binding(9) var<storage, read> second: array<u32>;
#endif
#elif VEC4
@group(0) @binding(9) var<storage, read> second: array<vec4<f32>>;
#else
@group(0) @binding(9) var<storage, read> second: array<f32>;
#endif


fn has(flag: u32) -> bool {
    return (P.flags & flag) != 0u;
}

// ---- element access; e and q count from the start of the binding ----

#if IN16 && !VEC4
// Word i of the input.
fn in_word(i: u32) -> u32 {
#if IN_PLACE && ODD
    return atomicLoad(&input[i]);
#else
    return input[i];
#endif
}
#endif

// Input element e.
fn in1(e: u32) -> f32 {
#if IN16 && VEC8
    let h = in_unpack(input[e >> 3u][(e >> 1u) & 3u]);
    return select(h.x, h.y, (e & 1u) == 1u);
#elif IN16 && VEC4
    let h = in_unpack(input[e >> 2u][(e >> 1u) & 1u]);
    return select(h.x, h.y, (e & 1u) == 1u);
#elif IN16
    let h = in_unpack(in_word(e >> 1u));
    return select(h.x, h.y, (e & 1u) == 1u);
#elif VEC4
    return input[e >> 2u][e & 3u];
#else
    return input[e];
#endif
}

#if VEC4
// Input elements 4q .. 4q + 3.
fn in4(q: u32) -> vec4<f32> {
#if IN16 && VEC8
    let w = input[q >> 1u];
    let h = select(w.xy, w.zw, (q & 1u) == 1u);
    return vec4<f32>(in_unpack(h.x), in_unpack(h.y));
#elif IN16
    let w = input[q];
    return vec4<f32>(in_unpack(w.x), in_unpack(w.y));
#else
    return input[q];
#endif
}

// Second elements 4q .. 4q + 3.
fn sec4(q: u32) -> vec4<f32> {
#if SEC16
    let w = second[q];
    return vec4<f32>(sec_unpack(w.x), sec_unpack(w.y));
#else
    return second[q];
#endif
}
#endif

#if VEC8
// Eight consecutive elements.
struct V8 {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

fn v8_splat(x: f32) -> V8 {
    return V8(vec4<f32>(x), vec4<f32>(x));
}

fn v8_add(a: V8, x: f32) -> V8 {
    return V8(a.lo + vec4<f32>(x), a.hi + vec4<f32>(x));
}

// Input elements 8o .. 8o + 7: one 16-byte load of four words.
fn in8(o: u32) -> V8 {
    let w = input[o];
    return V8(vec4<f32>(in_unpack(w.x), in_unpack(w.y)), vec4<f32>(in_unpack(w.z), in_unpack(w.w)));
}

// Second elements e .. e + 7 (e a multiple of 4).
fn sec8(e: u32) -> V8 {
    return V8(sec4(e >> 2u), sec4((e >> 2u) + 1u));
}
#endif

// Second element e.
fn sec1(e: u32) -> f32 {
#if SEC16 && VEC4
    let h = sec_unpack(second[e >> 2u][(e >> 1u) & 1u]);
    return select(h.x, h.y, (e & 1u) == 1u);
#elif SEC16
    let h = sec_unpack(second[e >> 1u]);
    return select(h.x, h.y, (e & 1u) == 1u);
#elif VEC4
    return second[e >> 2u][e & 3u];
#else
    return second[e];
#endif
}

// First element of local row r in the input, second and output bindings.
fn x_row(r: u32) -> u32 {
    return P.x_off + r * P.v;
}
fn y_row(r: u32) -> u32 {
    return P.y_off + r * P.v;
}
fn o_row(r: u32) -> u32 {
#if IN_PLACE
    return P.x_off + r * P.v;
#else
    return P.o_off + r * P.v;
#endif
}

// ---- output stores (to the output binding, or over the input with IN_PLACE) ----

#if GRAD || IN_PLACE
#if VEC8
// Output elements e .. e + 7 (e a multiple of 8 for 16-bit output, of 4 for f32): one 16-byte
// store of four words, or two of f32 vectors.
fn put8(e: u32, g: V8) {
#if OUT16
    let w = vec4<u32>(out_pack(g.lo.xy), out_pack(g.lo.zw), out_pack(g.hi.xy), out_pack(g.hi.zw));
#if IN_PLACE
    input[e >> 3u] = w;
#else
    output[e >> 3u] = w;
#endif
#else
    output[e >> 2u] = g.lo;
    output[(e >> 2u) + 1u] = g.hi;
#endif
}
#elif VEC4
// Output elements 4q .. 4q + 3.
fn put4(q: u32, g: vec4<f32>) {
#if OUT16 && IN_PLACE
    input[q] = vec2<u32>(out_pack(g.xy), out_pack(g.zw));
#elif OUT16
    output[q] = vec2<u32>(out_pack(g.xy), out_pack(g.zw));
#elif IN_PLACE
    input[q] = g;
#else
    output[q] = g;
#endif
}
#elif OUT16
// 16-bit word w; `lanes` says which halves belong to the caller (1 low, 2 high, 3 both).
fn put_word(w: u32, g: vec2<f32>, lanes: u32) {
    let bits = out_pack(g);
#if ODD && IN_PLACE
    if (lanes == 3u) {
        atomicStore(&input[w], bits);
    } else {
        let keep = select(0x0000ffffu, 0xffff0000u, lanes == 1u);
        atomicAnd(&input[w], keep);
        atomicOr(&input[w], bits & ~keep);
    }
#elif ODD
    if (lanes == 3u) {
        atomicStore(&output[w], bits);
    } else {
        let keep = select(0x0000ffffu, 0xffff0000u, lanes == 1u);
        atomicAnd(&output[w], keep);
        atomicOr(&output[w], bits & ~keep);
    }
#elif IN_PLACE
    if (lanes == 3u) {
        input[w] = bits;
    } else {
        // One half, written by one invocation alone (see `put_one`).
        let keep = select(0x0000ffffu, 0xffff0000u, lanes == 1u);
        input[w] = (input[w] & keep) | (bits & ~keep);
    }
#else
    if (lanes == 3u) {
        output[w] = bits;
    } else {
        let keep = select(0x0000ffffu, 0xffff0000u, lanes == 1u);
        output[w] = (output[w] & keep) | (bits & ~keep);
    }
#endif
}
#else
// Output element e.
fn put1(e: u32, g: f32) {
#if IN_PLACE
    input[e] = g;
#else
    output[e] = g;
#endif
}
#endif
#endif

#if GRAD || IN_PLACE
// Output element e alone, by one invocation after the bulk writes of its row and a storage
// barrier (read-modify-write of the vector or 16-bit word that holds it).
fn put_one(e: u32, g: f32) {
#if VEC8 && OUT16
    let k = (e >> 1u) & 3u;
    let keep = select(0xffff0000u, 0x0000ffffu, (e & 1u) == 1u);
    let bits = out_pack(vec2<f32>(g, g)) & ~keep;
#if IN_PLACE
    input[e >> 3u][k] = (input[e >> 3u][k] & keep) | bits;
#else
    output[e >> 3u][k] = (output[e >> 3u][k] & keep) | bits;
#endif
#elif VEC4 && OUT16
    let k = (e >> 1u) & 1u;
    let keep = select(0xffff0000u, 0x0000ffffu, (e & 1u) == 1u);
    let bits = out_pack(vec2<f32>(g, g)) & ~keep;
#if IN_PLACE
    input[e >> 2u][k] = (input[e >> 2u][k] & keep) | bits;
#else
    output[e >> 2u][k] = (output[e >> 2u][k] & keep) | bits;
#endif
#elif VEC4
#if IN_PLACE
    input[e >> 2u][e & 3u] = g;
#else
    output[e >> 2u][e & 3u] = g;
#endif
#elif OUT16
    put_word(e >> 1u, vec2<f32>(g, g), select(1u, 2u, (e & 1u) == 1u));
#else
    put1(e, g);
#endif
}
#endif

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
    // -inf adds nothing (and -inf - -inf would be NaN). A +inf leaves m = +inf, which
    // `finish_stat` turns into NaN once per row.
    let skip = z == P.neg_inf;
    return Stat(select(max(st.m, z), st.m, skip), select(s, st.s, skip));
}

// A quiet NaN (WGSL has no NaN literal).
fn nan_f32() -> f32 {
    return bitcast<f32>(0x7fc00000u);
}

// A row holding +inf is NaN, as PyTorch's max-subtracted softmax gives (inf - inf).
fn finish_stat(st: Stat) -> Stat {
    if (is_pos_inf(st.m)) {
        return Stat(st.m, nan_f32());
    }
    return st;
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
    return finish_stat(out);
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
    return finish_stat(out);
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

// The plain statistic of local row r's input elements (times `scale`), this thread's share.
fn row_stat_part(r: u32, lid: u32, scale: f32) -> Stat {
    var st = Stat(P.neg_inf, 0.0);
    let b = x_row(r);
#if VEC8
    for (var o = lid; o < P.v / 8u; o += WG) {
        let x = in8(b / 8u + o);
        let lo = x.lo * scale;
        let hi = x.hi * scale;
        st = push(st, lo.x);
        st = push(st, lo.y);
        st = push(st, lo.z);
        st = push(st, lo.w);
        st = push(st, hi.x);
        st = push(st, hi.y);
        st = push(st, hi.z);
        st = push(st, hi.w);
    }
#elif VEC4
    for (var q = lid; q < P.v / 4u; q += WG) {
        let x = in4(b / 4u + q) * scale;
        st = push(st, x.x);
        st = push(st, x.y);
        st = push(st, x.z);
        st = push(st, x.w);
    }
#else
    for (var j = lid; j < P.v; j += WG) {
        st = push(st, in1(b + j) * scale);
    }
#endif
    return st;
}

