// Knowledge distillation, one workgroup per row: `input` = student logits, `second` = teacher
// logits, both divided by the temperature. P.mode: 0 forward KL(teacher || student),
// 1 reverse KL(student || teacher), 2 generalised JSD with P.beta (Liger-Kernel's definition;
// beta 0 and 1 are the two KLs). The row loss (before T^2 and the batch mean) goes to
// row_values; with GRAD the gradient w.r.t. the student logits, times P.grad_scale, to `output`.

// Mirrored by `DistillParams` in src/gpu/kernels/divergence.rs.
struct DistillParams {
#chunk_header
    inv_temp: f32,
    grad_scale: f32,
    // 0 forward KL, 1 reverse KL, 2 generalised JSD with beta.
    mode: i32,
    beta: f32,
}

@group(0) @binding(0) var<uniform> P: DistillParams;

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
    let xb = x_row(r);
    let yb = y_row(r);
    let it = P.inv_temp;
    var ss = Stat(P.neg_inf, 0.0);
    var st = Stat(P.neg_inf, 0.0);
    for (var i = lid; i < P.v; i += WG) {
        ss = push(ss, in1(xb + i) * it);
        st = push(st, sec1(yb + i) * it);
    }
    let a = reduce_stat(ss, lid, lane, sg, nsg);
    let b = reduce_stat(st, lid, lane, sg, nsg);
    let lse_s = a.m + log1p_(a.s);
    let lse_t = b.m + log1p_(b.s);
    let mode = P.mode;
    let beta = P.beta;
    // (divergence, sum_k p_s,k g_k) where g is d(divergence)/d(p_s) up to a constant.
    var acc = vec2<f32>(0.0, 0.0);
    for (var i = lid; i < P.v; i += WG) {
        let ls = in1(xb + i) * it - lse_s;
        let lt = sec1(yb + i) * it - lse_t;
        let ps = exp(ls);
        let pt = exp(lt);
        if (mode == 0) {
            if (pt > 0.0) {
                acc.x += pt * (lt - ls);
            }
        } else if (mode == 1) {
            if (ps > 0.0) {
                acc.x += ps * (ls - lt);
            }
        } else {
            let lm = log(beta * pt + (1.0 - beta) * ps);
            if (pt > 0.0) {
                acc.x += beta * pt * (lt - lm);
            }
            if (ps > 0.0) {
                let g = (1.0 - beta) * (ls - lm);
                acc.x += ps * g;
                acc.y += ps * g;
            }
        }
    }
    let tot = reduce_v2(acc, lid, lane, sg, nsg);
    if (lid == 0u) {
        row_values[row] = tot.x;
    }
#if GRAD
    for (var i = lid; i < P.v; i += WG) {
        let ls = in1(xb + i) * it - lse_s;
        let lt = sec1(yb + i) * it - lse_t;
        let ps = exp(ls);
        var g = 0.0;
        if (mode == 0) {
            g = ps - exp(lt);
        } else if (mode == 1) {
            g = ps * ((ls - lt) - tot.x);
        } else {
            let lm = log(beta * exp(lt) + (1.0 - beta) * ps);
            g = ps * ((1.0 - beta) * (ls - lm) - tot.y);
        }
        put1(o_row(r) + i, P.grad_scale * g);
    }
#endif
}
