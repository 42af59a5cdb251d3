//! Rust mirrors of the WGSL structs the host writes or reads (`Params`, `Scalars` in
//! `shaders/common.wgsl`), the flag bits, and a unit test that checks every field's name,
//! offset and size against naga's layout of the shader structs.

use bytemuck::{Pod, Zeroable};

/// Kernel parameters; mirrors `Params` in `shaders/common.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub(crate) struct Params {
    pub n_rows: u32,
    pub v: u32,
    pub row0: u32,
    pub grid_x: u32,
    pub chunk_rows: u32,
    pub ignore_index: i32,
    pub flags: u32,
    pub neg_inf: f32,
    pub smoothing: f32,
    pub z_loss: f32,
    pub softcap: f32,
    pub inv_temp: f32,
    pub grad_scale: f32,
    pub x_off: u32,
    pub y_off: u32,
    pub o_off: u32,
    pub part_off: u32,
    pub v_total: u32,
    pub class0: u32,
    pub segs: u32,
    pub seg_len: u32,
    pub mode: i32,
    pub beta: f32,
    pub den_w: f32,
    pub den_n: f32,
    pub parts: u32,
    pub mm_m: u32,
    pub mm_n: u32,
    pub mm_k: u32,
    pub a_rs: u32,
    pub a_cs: u32,
    pub b_rs: u32,
    pub b_cs: u32,
    pub c_rs: u32,
    pub mm_flags: u32,
}

/// Scalars a cross-entropy pass leaves on the device; mirrors `Scalars` in `common.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub(crate) struct Scalars {
    pub weight_sum: f32,
    pub count: u32,
    pub loss_sum: f32,
    pub lse2_sum: f32,
    pub err_row: u32,
    pub err_target: i32,
    pub loss: f32,
    pub upstream: f32,
}

/// Bytes of [`Scalars`].
pub(crate) const SCALARS: u64 = std::mem::size_of::<Scalars>() as u64;

impl Scalars {
    /// The state a pass starts from: no target error seen.
    pub fn initial() -> Scalars {
        Scalars { err_row: u32::MAX, ..Zeroable::zeroed() }
    }
}

pub(crate) mod flags {
    pub const CLASS_W: u32 = 1;
    pub const SAMPLE_W: u32 = 2;
    pub const SOFTCAP: u32 = 4;
    pub const TEMP: u32 = 8;
    pub const SMOOTH: u32 = 16;
    pub const MEAN: u32 = 32;
    pub const SOFTMAX: u32 = 64;
    pub const ZLOSS: u32 = 128;
    pub const SOFT: u32 = 256;
    pub const POS_W: u32 = 512;
    pub const PROBS: u32 = 1024;
    pub const ELEM: u32 = 2048;
    pub const LOGITS: u32 = 4096;
    pub const RANK: u32 = 8192;
    pub const GAP: u32 = 16384;
    pub const ELEM_W: u32 = 32768;
    pub const EXT_DENOM: u32 = 65536;
    pub const UPSTREAM: u32 = 131072;
    pub const UP_ROWS: u32 = 262144;
    pub const SAVE: u32 = 524288;
    pub const FROM_SAVED: u32 = 1048576;
    pub const SHARD: u32 = 2097152;
}

/// Bytes between per-dispatch parameter blocks in the uniform buffer (the largest
/// `min_uniform_buffer_offset_alignment` any adapter asks for).
pub(crate) const PARAM_STRIDE: u64 = 256;

impl Params {
    /// Parameters of a kernel over `n` rows of `v`: no flags, no transform, unit scale.
    pub fn new(n: usize, v: usize) -> Params {
        Params {
            n_rows: n as u32,
            v: v as u32,
            v_total: v as u32,
            neg_inf: f32::NEG_INFINITY,
            softcap: 1.0,
            inv_temp: 1.0,
            grad_scale: 1.0,
            segs: 1,
            seg_len: v as u32,
            parts: 1,
            ..Zeroable::zeroed()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, offset, size) of each field of a Rust mirror.
    macro_rules! fields {
        ($t:ty: $($f:ident),*) => {
            vec![$((stringify!($f), std::mem::offset_of!($t, $f) as u32, std::mem::size_of_val(&<$t as Zeroable>::zeroed().$f) as u32)),*]
        };
    }

    fn wgsl_struct(module: &naga::Module, name: &str) -> (Vec<(String, u32, u32)>, u32) {
        let (_, ty) = module.types.iter().find(|(_, t)| t.name.as_deref() == Some(name)).expect("struct in shader");
        match &ty.inner {
            naga::TypeInner::Struct { members, span } => {
                let mut layouter = naga::proc::Layouter::default();
                layouter.update(module.to_ctx()).unwrap();
                let v = members.iter().map(|m| (m.name.clone().unwrap(), m.offset, layouter[m.ty].size)).collect();
                (v, *span)
            }
            other => panic!("{name} is {other:?}"),
        }
    }

    #[test]
    fn rust_mirrors_match_the_shader_layouts() {
        let src = crate::gpu::source::Shader::CeFused
            .source(crate::gpu::source::Variant { grad: true, ..Default::default() });
        let module = naga::front::wgsl::parse_str(&src).unwrap();
        let params = fields!(Params: n_rows, v, row0, grid_x, chunk_rows, ignore_index, flags, neg_inf, smoothing,
            z_loss, softcap, inv_temp, grad_scale, x_off, y_off, o_off, part_off, v_total, class0, segs, seg_len,
            mode, beta, den_w, den_n, parts, mm_m, mm_n, mm_k, a_rs, a_cs, b_rs, b_cs, c_rs, mm_flags);
        let scalars = fields!(Scalars: weight_sum, count, loss_sum, lse2_sum, err_row, err_target, loss, upstream);
        for (name, rust, size) in
            [("Params", params, std::mem::size_of::<Params>()), ("Scalars", scalars, std::mem::size_of::<Scalars>())]
        {
            let (wgsl, span) = wgsl_struct(&module, name);
            let wgsl: Vec<(&str, u32, u32)> = wgsl.iter().map(|(n, o, s)| (n.as_str(), *o, *s)).collect();
            assert_eq!(rust, wgsl, "{name}: fields (name, offset, size)");
            assert_eq!(size as u32, span, "{name}: size");
        }
        assert!(std::mem::size_of::<Params>() as u64 <= PARAM_STRIDE);
    }

    /// Every flag bit of [`flags`] equals its `F_*` constant in `common.wgsl` (by name, as
    /// naga parses it), and the shader has no `F_*` flag the Rust side lacks: the two lists
    /// are written twice, once per language, and this test compares them.
    #[test]
    fn flag_bits_match_the_shader_constants() {
        macro_rules! rust_flags {
            ($($f:ident),*) => { vec![$((concat!("F_", stringify!($f)).to_string(), flags::$f)),*] };
        }
        let mut rust = rust_flags!(
            CLASS_W, SAMPLE_W, SOFTCAP, TEMP, SMOOTH, MEAN, SOFTMAX, ZLOSS, SOFT, POS_W, PROBS, ELEM, LOGITS, RANK,
            GAP, ELEM_W, EXT_DENOM, UPSTREAM, UP_ROWS, SAVE, FROM_SAVED, SHARD
        );
        let src = crate::gpu::source::Shader::CeFused
            .source(crate::gpu::source::Variant { grad: true, ..Default::default() });
        let module = naga::front::wgsl::parse_str(&src).unwrap();
        let mut wgsl: Vec<(String, u32)> = module
            .constants
            .iter()
            .filter_map(|(_, c)| {
                let name = c.name.clone()?;
                if !name.starts_with("F_") {
                    return None;
                }
                match module.global_expressions[c.init] {
                    naga::Expression::Literal(naga::Literal::U32(v)) => Some((name, v)),
                    ref other => panic!("{name} is {other:?}, not a u32 literal"),
                }
            })
            .collect();
        rust.sort();
        wgsl.sort();
        assert_eq!(rust, wgsl, "flag bits (Rust flags:: vs common.wgsl F_*)");
        let mut bits: Vec<u32> = rust.iter().map(|(_, b)| *b).collect();
        bits.dedup();
        assert!(bits.iter().all(|b| b.is_power_of_two()), "one bit per flag");
        assert_eq!(bits.iter().fold(0, |acc, b| acc | b).count_ones() as usize, rust.len(), "distinct bits");
    }
}
