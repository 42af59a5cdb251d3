// Cross-entropy's first pass (one workgroup): checks targets and sums the weights of counted
// rows, the denominator that the row pass needs before it can write the gradient of a mean.

var<workgroup> red_n: array<u32, WG>;

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) lid: u32,
#subgroup_args
) {
#subgroup_lets
    var w = 0.0;
    var comp = 0.0; // Kahan compensation
    var n = 0u;
    for (var r = lid; r < P.n_rows; r += WG) {
        var wr = 1.0;
        if (!has(F_SOFT)) {
            let t = targets[r];
            if (t == P.ignore_index) {
                continue;
            }
            if (t < 0 || t >= i32(P.v_total)) {
                atomicMin(&scalars.err_row, r);
                continue;
            }
            if (has(F_CLASS_W)) {
                wr = class_weight[u32(t)];
            }
        }
        // Probability targets: every row counts, with its sample weight.
        if (has(F_SAMPLE_W)) {
            wr = wr * sample_weight[r];
        }
        let y = wr - comp;
        let tot = w + y;
        comp = (tot - w) - y;
        w = tot;
        n += 1u;
    }
    red_n[lid] = n;
    let ws = reduce_v2(vec2<f32>(w, 0.0), lid, lane, sg, nsg);
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            red_n[lid] += red_n[lid + stride];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        scalars.weight_sum = ws.x;
        scalars.count = red_n[0];
        let bad = atomicLoad(&scalars.err_row);
        if (bad != 0xffffffffu) {
            scalars.err_target = targets[bad];
        }
    }
}
