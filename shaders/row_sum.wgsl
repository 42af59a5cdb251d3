// Row sums, one workgroup per row reading it once: the read-only bandwidth probe of
// `xent bench --op copy` (the access pattern of the cross-entropy row pass, no softmax).
// With GRAD the rows are also copied to `output` (f32): the read-and-write probe.

@group(0) @binding(0) var<uniform> P: ChunkHeader;

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
    let xb = x_row(r);
    var acc = vec2<f32>(0.0, 0.0);
#if VEC8
    // 16-bit rows, eight values per 16-byte load.
    for (var o = lid; o < P.v / 8u; o += WG) {
        let x = in8(xb / 8u + o);
        acc += vec2<f32>((x.lo.x + x.lo.y) + (x.lo.z + x.lo.w), (x.hi.x + x.hi.y) + (x.hi.z + x.hi.w));
#if GRAD
        put8(o_row(r) + 8u * o, x);
#endif
    }
#elif VEC4
    for (var q = lid; q < P.v / 4u; q += WG) {
        let x = in4(xb / 4u + q);
        acc += vec2<f32>(x.x + x.y, x.z + x.w);
#if GRAD
        put4(o_row(r) / 4u + q, x);
#endif
    }
#else
    for (var j = lid; j < P.v; j += WG) {
        acc.x += in1(xb + j);
#if GRAD
        put1(o_row(r) + j, in1(xb + j));
#endif
    }
#endif
    let s = reduce_v2(acc, lid, lane, sg, nsg);
    if (lid == 0u) {
        row_values[P.row0 + r] = s.x + s.y;
    }
}
