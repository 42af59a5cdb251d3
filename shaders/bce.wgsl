// Binary cross-entropy, elementwise over a chunk of [rows, C]: from logits (stable softplus
// form, any |x|) or from probabilities (logs clamped at -100, as PyTorch). Each workgroup takes
// WG * PER_THREAD consecutive elements, writes their gradients (GRAD) and losses (BCE_ELEM), and
// one Kahan partial sum of its losses to row_values[P.part_off + group]; the host adds the
// partials in f64.

// Flag bits (`bce_flags` in src/gpu/kernels/bce.rs): per-class weights (slot 3), pos_weight
// (slot 10), inputs are probabilities, element losses wanted, per-element weights (slot 11).
const BCE_CLASS_W: u32 = 1u;
const BCE_POS_W: u32 = 2u;
const BCE_PROBS: u32 = 4u;
const BCE_ELEM: u32 = 8u;
const BCE_ELEM_W: u32 = 16u;

// Mirrored by `BceParams` in src/gpu/kernels/bce.rs.
struct BceParams {
#chunk_header
    // The loss's scale (1 / count for a mean) times the caller's gradient scale.
    grad_scale: f32,
}

@group(0) @binding(0) var<uniform> P: BceParams;
// Per-class weights [C] (BCE_CLASS_W).
@group(0) @binding(3) var<storage, read> class_weight: array<f32>;
// Per-element losses (BCE_ELEM), chunked like the input.
@group(0) @binding(7) var<storage, read_write> elem_loss: array<f32>;
// pos_weight [C] (BCE_POS_W).
@group(0) @binding(10) var<storage, read> pos_weight: array<f32>;
// Per-element weights (BCE_ELEM_W), chunked like the input.
@group(0) @binding(11) var<storage, read> elem_weight: array<f32>;

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
            if (has(BCE_CLASS_W)) {
                w = w * class_weight[c];
            }
            if (has(BCE_ELEM_W)) {
                w = w * elem_weight[i];
            }
            var l = 0.0;
            var g = 0.0;
            if (has(BCE_PROBS)) {
                let lp = max(log(x), -100.0);
                let lq = max(log1p_(-x), -100.0);
                l = -w * (y * lp + (1.0 - y) * lq);
                g = w * (x - y) / max((1.0 - x) * x, 1e-12);
            } else {
                var pw = 1.0;
                if (has(BCE_POS_W)) {
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
            if (has(BCE_ELEM)) {
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
