// Pass 3 of cross-entropy (one workgroup): sums the per-row weighted losses and, for the
// z-loss, lse^2 over counted rows. Kahan within a thread, a tree across threads.

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) lid: u32,
#subgroup_args
) {
#subgroup_lets
    var acc = vec2<f32>(0.0, 0.0);
    var comp = vec2<f32>(0.0, 0.0);
    for (var r = lid; r < P.n_rows; r += WG) {
        var x = vec2<f32>(ROWS[r], 0.0);
        if (has(F_ZLOSS)) {
            var t = 0;
            if (!has(F_SOFT)) {
                t = T[r];
            }
            if (t != P.ignore_index && t >= 0 && t < i32(P.v)) {
                let l = ROWS[P.n_rows + r];
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
        SC.loss_sum = s.x;
        SC.lse2_sum = s.y;
    }
}
