// Cross-entropy's family interface (ce_weights.wgsl, ce_fused.wgsl, ce_reduce.wgsl; also the
// reduce pass of distillation): its flag bits and parameters, mirrored by `flags` and
// `CeParams` in src/gpu/kernels/cross_entropy.rs (a unit test compares them through naga), and
// the helpers that read them.

const F_CLASS_W: u32 = 1u;
const F_SAMPLE_W: u32 = 2u;
const F_SOFTCAP: u32 = 4u;
const F_TEMP: u32 = 8u;
const F_SMOOTH: u32 = 16u;
const F_MEAN: u32 = 32u;
const F_ZLOSS: u32 = 128u;
// Probability targets in `second` instead of class indices in `targets`.
const F_SOFT: u32 = 256u;
// Cross-entropy row statistics: the target's rank (classes with a strictly larger logit) and
// the row max; the expected logit gap E_p[z] - z_t (temperature fitting).
const F_RANK: u32 = 8192u;
const F_GAP: u32 = 16384u;
// The mean's denominators come from P.den_w / P.den_n (the whole batch) instead of this call.
const F_EXT_DENOM: u32 = 65536u;
// A backward pass scales the gradient by the upstream gradient: scalars.upstream, or
// (F_UP_ROWS) one value per row in row vector 4.
const F_UPSTREAM: u32 = 131072u;
const F_UP_ROWS: u32 = 262144u;
// A row pass also saves its row statistic (for a later gradient or backward pass).
const F_SAVE: u32 = 524288u;
// A split row's gradient pass reads the statistic saved by an earlier pass.
const F_FROM_SAVED: u32 = 1048576u;
// A vocabulary shard (P.class0, P.v of P.v_total classes): segment records carry the target logit.
const F_SHARD: u32 = 2097152u;

struct CeParams {
#chunk_header
    ignore_index: i32,
    smoothing: f32,
    z_loss: f32,
    softcap: f32,
    inv_temp: f32,
    grad_scale: f32,
    // Global class count and the global index of column 0 (vocabulary shards).
    v_total: u32,
    class0: u32,
    // Segments per row and elements per segment (split rows).
    segs: u32,
    seg_len: u32,
    // The whole batch's weight sum and counted rows, with F_EXT_DENOM.
    den_w: f32,
    den_n: f32,
    // Partials per row of a split cross-entropy row pass.
    parts: u32,
}

@group(0) @binding(0) var<uniform> P: CeParams;

// Class indices (i32; ignored rows hold the ignore index).
@group(0) @binding(2) var<storage, read> targets: array<i32>;
// Class weights [v_total].
@group(0) @binding(3) var<storage, read> class_weight: array<f32>;
// Sample weights [n_rows].
@group(0) @binding(4) var<storage, read> sample_weight: array<f32>;

// What a pass leaves on the device for the next (mirrored by `Scalars` in
// src/gpu/kernels/cross_entropy.rs).
struct Scalars {
    weight_sum: f32,
    count: u32,
    loss_sum: f32,
    lse2_sum: f32,
    // First row whose target is out of range (0xffffffff when none) and its value.
    err_row: atomic<u32>,
    err_target: i32,
    // The reduced loss, as the host API reports it.
    loss: f32,
    // d(total)/d(loss) for a recorded backward pass of a reduced loss (F_UPSTREAM).
    upstream: f32,
}

@group(0) @binding(5) var<storage, read_write> scalars: Scalars;

// Temperature, then soft-capping: the logits the softmax sees.
// Compiled in only for the TRANSFORM variant: SIMD lanes (lavapipe) run even uniform branches
// masked, so plain logits must not pay for a tanh per element.
fn tr(x: f32) -> f32 {
#if TRANSFORM
    var z = x;
    if (has(F_TEMP)) {
        z = z * P.inv_temp;
    }
    if (has(F_SOFTCAP)) {
        z = P.softcap * tanh(z / P.softcap);
    }
    return z;
#else
    return x;
#endif
}

// Denominators (weight sum, counted rows) of a mean.
fn denominators() -> vec2<f32> {
    if (has(F_EXT_DENOM)) {
        return vec2<f32>(P.den_w, P.den_n);
    }
    return vec2<f32>(scalars.weight_sum, f32(scalars.count));
}
