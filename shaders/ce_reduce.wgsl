// Cross-entropy's last pass (one workgroup): sums the per-row losses and, for the z-loss, lse^2
// over counted rows (Kahan within a thread, a tree across threads), and stores the reduced loss
// so that device-side consumers can read it without the host.

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) lid: u32,
#subgroup_args
) {
#subgroup_lets
    var acc = vec2<f32>(0.0, 0.0);
    var comp = vec2<f32>(0.0, 0.0);
    for (var r = lid; r < P.n_rows; r += WG) {
        var x = vec2<f32>(row_values[r], 0.0);
        if (has(F_ZLOSS)) {
            var counted = true;
            if (!has(F_SOFT)) {
                let t = targets[r];
                counted = t != P.ignore_index && t >= 0 && t < i32(P.v_total);
            }
            if (counted) {
                let l = row_values[P.n_rows + r];
                x.y = l * l;
            }
        }
        let y = x - comp;
        let tot = acc + y;
        comp = (tot - acc) - y;
        acc = tot;
    }
    let s = reduce_v2(acc, lid, lane, sg, nsg);
    if (lid == 0u) {
        scalars.loss_sum = s.x;
        scalars.lse2_sum = s.y;
        var loss = s.x;
        if (has(F_MEAN)) {
            let den = denominators();
            let ce = s.x - P.z_loss * s.y;
            loss = ce / den.x;
            if (has(F_ZLOSS)) {
                loss += P.z_loss * s.y / den.y;
            }
        }
        scalars.loss = loss;
    }
}
