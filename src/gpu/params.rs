//! The chunk header every kernel family's parameters start with ([`Header`], [`Block`]); the
//! row kernels' family's mirrors of the WGSL structs the host writes or reads (`Params`,
//! `Scalars` in `shaders/rows.wgsl`) and its flag bits; and the unit tests that check every
//! field's name, offset and size, and every flag, against naga's view of the shaders. Other
//! families (the matrix products: `kernels/matmul.rs`) declare their own block beside their
//! kernel and check it with [`tests::check_block`].

use bytemuck::{Pod, Zeroable};

/// Declares a `#[repr(C)]` Rust mirror of a WGSL struct (Pod, so it is written to a buffer as
/// it is) and, for the unit tests, its field list (name, offset, size) taken from the same
/// declaration: a field added here is compared with the shader with no other edit.
macro_rules! mirror {
    ($(#[$m:meta])* $vis:vis struct $name:ident { $($(#[$fm:meta])* $fvis:vis $f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
        $vis struct $name { $($(#[$fm])* $fvis $f: $t),* }

        #[cfg(test)]
        impl crate::gpu::params::Mirror for $name {
            fn fields() -> Vec<(&'static str, u32, u32)> {
                vec![$((stringify!($f), std::mem::offset_of!($name, $f) as u32, std::mem::size_of::<$t>() as u32)),*]
            }
        }
    };
}
pub(crate) use mirror;

/// Declares a kernel family's flag bits as `u32` constants in a module, with the list of
/// (WGSL name, bit) the family's unit test compares with the shader's constants (the WGSL
/// name is the prefix followed by the Rust name).
macro_rules! flag_bits {
    ($(#[$m:meta])* $vis:vis mod $module:ident ($prefix:literal) { $($(#[$fm:meta])* $f:ident = $bit:expr),* $(,)? }) => {
        $(#[$m])*
        $vis mod $module {
            $($(#[$fm])* pub const $f: u32 = $bit;)*
            /// Every flag as (its WGSL constant's name, its bit).
            #[cfg(test)]
            pub const ALL: &[(&str, u32)] = &[$((concat!($prefix, stringify!($f)), $f)),*];
            /// The WGSL constants' common prefix.
            #[cfg(test)]
            pub const PREFIX: &str = $prefix;
        }
    };
}
pub(crate) use flag_bits;

/// A mirrored struct's fields (name, offset, size), from [`mirror!`].
#[cfg(test)]
pub(crate) trait Mirror {
    fn fields() -> Vec<(&'static str, u32, u32)>;
}

mirror! {
    /// The chunk header every kernel family's parameter block starts with: the call's rows and
    /// row length, and what [`crate::gpu::launch::Recorder`] writes per chunk (first row, rows,
    /// grid width, element offsets of the chunked bindings, first partial-sum slot). A family's
    /// WGSL struct begins with `#chunk_header`, which the preprocessor expands to
    /// [`HEADER_WGSL`]; its Rust mirror begins with `head: Header` and implements [`Block`].
    pub(crate) struct Header {
        pub n_rows: u32,
        pub v: u32,
        pub row0: u32,
        pub grid_x: u32,
        pub chunk_rows: u32,
        pub x_off: u32,
        pub y_off: u32,
        pub o_off: u32,
        pub part_off: u32,
    }
}

/// The WGSL fields of [`Header`], in order (what `#chunk_header` expands to).
pub(crate) const HEADER_WGSL: &str =
    "    // Rows of the whole call (row_values and reductions index 0..n_rows); elements per row.
    n_rows: u32,
    v: u32,
    // First row of this chunk, the folded grid's width, rows in this chunk.
    row0: u32,
    grid_x: u32,
    chunk_rows: u32,
    // Elements between the start of the chunked bindings and the chunk's first element
    // (chunks are bound at offsets rounded down to the device's alignment).
    x_off: u32,
    y_off: u32,
    o_off: u32,
    // First partial-sum slot of this chunk.
    part_off: u32,
";

impl Header {
    /// The header of a call over `n` rows of `v` elements.
    pub fn new(n: usize, v: usize) -> Header {
        Header { n_rows: n as u32, v: v as u32, ..Zeroable::zeroed() }
    }
}

/// A kernel family's parameter block: a `#[repr(C)]` struct whose first field is its
/// [`Header`] (so its first bytes are the header's), mirrored by a WGSL struct that begins with
/// `#chunk_header`. [`crate::gpu::launch::Launch`] takes any block and rewrites the header per
/// chunk; the family's unit test compares the rest with the shader through naga
/// ([`tests::check_block`]).
pub(crate) trait Block: Pod {
    /// The header this block starts with.
    fn head(&self) -> &Header;
}

mirror! {
    /// The row kernels' parameters; mirrors `Params` in `shaders/rows.wgsl`.
    pub(crate) struct Params {
        pub head: Header,
        pub ignore_index: i32,
        pub flags: u32,
        pub neg_inf: f32,
        pub smoothing: f32,
        pub z_loss: f32,
        pub softcap: f32,
        pub inv_temp: f32,
        pub grad_scale: f32,
        pub v_total: u32,
        pub class0: u32,
        pub segs: u32,
        pub seg_len: u32,
        pub mode: i32,
        pub beta: f32,
        pub den_w: f32,
        pub den_n: f32,
        pub parts: u32,
    }
}

impl Block for Params {
    fn head(&self) -> &Header {
        &self.head
    }
}

mirror! {
    /// Scalars a cross-entropy pass leaves on the device; mirrors `Scalars` in `rows.wgsl`.
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
}

/// Bytes of [`Scalars`].
pub(crate) const SCALARS: u64 = std::mem::size_of::<Scalars>() as u64;

impl Scalars {
    /// The state a pass starts from: no target error seen.
    pub fn initial() -> Scalars {
        Scalars { err_row: u32::MAX, ..Zeroable::zeroed() }
    }
}

flag_bits! {
    /// The row kernels' flag bits (`F_*` in `shaders/rows.wgsl`).
    pub(crate) mod flags("F_") {
        CLASS_W = 1,
        SAMPLE_W = 2,
        SOFTCAP = 4,
        TEMP = 8,
        SMOOTH = 16,
        MEAN = 32,
        SOFTMAX = 64,
        ZLOSS = 128,
        SOFT = 256,
        POS_W = 512,
        PROBS = 1024,
        ELEM = 2048,
        LOGITS = 4096,
        RANK = 8192,
        GAP = 16384,
        ELEM_W = 32768,
        EXT_DENOM = 65536,
        UPSTREAM = 131072,
        UP_ROWS = 262144,
        SAVE = 524288,
        FROM_SAVED = 1048576,
        SHARD = 2097152,
    }
}

/// Bytes between per-dispatch parameter blocks in the uniform buffer (the largest
/// `min_uniform_buffer_offset_alignment` any adapter asks for).
pub(crate) const PARAM_STRIDE: u64 = 256;

impl Params {
    /// Parameters of a kernel over `n` rows of `v`: no flags, no transform, unit scale.
    pub fn new(n: usize, v: usize) -> Params {
        Params {
            head: Header::new(n, v),
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
pub(crate) mod tests {
    use super::*;

    /// (name, offset, size) of each member of the WGSL struct `name`, and its size.
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

    /// Checks the Rust mirror `T` against the WGSL struct `name` of `module`: every field's
    /// name, offset and size, and the struct's size. A leading `head: Header` field stands for
    /// the header's fields (`#chunk_header` in the shader).
    pub(crate) fn check_struct<T: Mirror>(module: &naga::Module, name: &str) {
        let mut rust = Vec::new();
        for (f, off, size) in T::fields() {
            if f == "head" {
                assert_eq!((off, size), (0, std::mem::size_of::<Header>() as u32), "{name}: head first");
                rust.extend(Header::fields());
            } else {
                rust.push((f, off, size));
            }
        }
        let (wgsl, span) = wgsl_struct(module, name);
        let wgsl: Vec<(&str, u32, u32)> = wgsl.iter().map(|(n, o, s)| (n.as_str(), *o, *s)).collect();
        assert_eq!(rust, wgsl, "{name}: fields (name, offset, size)");
        assert_eq!(std::mem::size_of::<T>() as u32, span, "{name}: size");
    }

    /// Checks a family's parameter block `T` against its WGSL struct `name` (see
    /// [`check_struct`]), that it starts with the header, and that it fits one block.
    pub(crate) fn check_block<T: Mirror + Block>(module: &naga::Module, name: &str) {
        assert_eq!(T::fields().first().map(|f| f.0), Some("head"), "{name}: a block starts with its header");
        check_struct::<T>(module, name);
        assert!(std::mem::size_of::<T>() as u64 <= PARAM_STRIDE, "{name}: larger than a parameter block");
    }

    /// Checks a family's flag bits (`ALL`, from [`flag_bits!`]) against the u32 constants of
    /// `module` whose names start with `prefix`: the same names and bits, none missing on
    /// either side, one distinct bit each.
    pub(crate) fn check_flags(module: &naga::Module, prefix: &str, all: &[(&str, u32)]) {
        let mut rust: Vec<(String, u32)> = all.iter().map(|&(n, b)| (n.to_string(), b)).collect();
        let mut wgsl: Vec<(String, u32)> = module
            .constants
            .iter()
            .filter_map(|(_, c)| {
                let name = c.name.clone()?;
                if !name.starts_with(prefix) {
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
        assert_eq!(rust, wgsl, "flag bits (Rust vs WGSL {prefix}*)");
        let bits: Vec<u32> = rust.iter().map(|(_, b)| *b).collect();
        assert!(bits.iter().all(|b| b.is_power_of_two()), "one bit per flag");
        assert_eq!(bits.iter().fold(0, |acc, b| acc | b).count_ones() as usize, rust.len(), "distinct bits");
    }

    fn rows_module() -> naga::Module {
        let src = crate::gpu::source::Shader::CeFused
            .source(crate::gpu::source::Variant { grad: true, ..Default::default() });
        naga::front::wgsl::parse_str(&src).unwrap()
    }

    #[test]
    fn rust_mirrors_match_the_shader_layouts() {
        let module = rows_module();
        check_block::<Params>(&module, "Params");
        check_struct::<Scalars>(&module, "Scalars");
    }

    /// Every flag bit of [`flags`] equals its `F_*` constant in `rows.wgsl` (by name, as naga
    /// parses it), and the shader has no `F_*` flag the Rust side lacks.
    #[test]
    fn flag_bits_match_the_shader_constants() {
        check_flags(&rows_module(), flags::PREFIX, flags::ALL);
    }
}
