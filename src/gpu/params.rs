//! The chunk header every kernel family's parameters start with ([`Header`], [`Block`]), the
//! macros a family declares its parameters and flag bits with ([`mirror!`], [`flag_bits!`]),
//! and the unit-test helpers that
//! check a family's declarations against naga's view of its WGSL (`tests::check_block`,
//! `tests::check_flags`). Each family declares its own block and flags beside its kernel
//! (`kernels/cross_entropy.rs`: `CeParams`; `kernels/matmul.rs`: `MatmulParams`; ...).

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
    /// row length, what [`crate::gpu::launch::Recorder`] writes per chunk (first row, rows,
    /// grid width, element offsets of the chunked bindings, first partial-sum slot), the
    /// family's flag bits (each family names its own, [`flag_bits!`]) and -inf. A family's
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
        pub flags: u32,
        pub neg_inf: f32,
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
    // The family's flag bits (each family declares its own), and -inf (no WGSL literal).
    flags: u32,
    neg_inf: f32,
";

impl Header {
    /// The header of a call over `n` rows of `v` elements, no flags.
    pub fn new(n: usize, v: usize) -> Header {
        Header { n_rows: n as u32, v: v as u32, neg_inf: f32::NEG_INFINITY, ..Zeroable::zeroed() }
    }
}

/// A kernel family's parameter block: a `#[repr(C)]` struct whose first field is its
/// [`Header`] (so its first bytes are the header's), mirrored by a WGSL struct that begins with
/// `#chunk_header`. [`crate::gpu::launch::Launch`] takes any block and rewrites the header per
/// chunk; the family's unit test compares the rest with the shader through naga
/// (`tests::check_block`).
pub(crate) trait Block: Pod {
    /// The header this block starts with.
    fn head(&self) -> &Header;
}

/// A kernel whose parameters are the header alone (`ChunkHeader` in `common.wgsl`).
impl Block for Header {
    fn head(&self) -> &Header {
        self
    }
}

/// Bytes a family may add after the header in one parameter block.
const TAIL_MAX: usize = PARAM_STRIDE as usize - std::mem::size_of::<Header>();

/// Any family's block, its type erased: the header (rewritten per chunk) and the family's own
/// bytes after it, as they are (held inline, so that a block is `Copy` and costs no
/// allocation per launch). What [`crate::gpu::launch::Launch`] and the row plans hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct AnyBlock {
    pub head: Header,
    tail: [u8; TAIL_MAX],
    tail_len: usize,
}

impl<B: Block> From<B> for AnyBlock {
    fn from(b: B) -> AnyBlock {
        let bytes = bytemuck::bytes_of(&b);
        let h = std::mem::size_of::<Header>();
        debug_assert_eq!(&bytes[..h], bytemuck::bytes_of(b.head()), "a block starts with its header");
        let rest = &bytes[h..];
        assert!(rest.len() <= TAIL_MAX, "a parameter block larger than {PARAM_STRIDE} bytes");
        let mut tail = [0u8; TAIL_MAX];
        tail[..rest.len()].copy_from_slice(rest);
        AnyBlock { head: *b.head(), tail, tail_len: rest.len() }
    }
}

impl AnyBlock {
    /// The family's bytes after the header.
    pub fn tail(&self) -> &[u8] {
        &self.tail[..self.tail_len]
    }

    /// Bytes of the whole block.
    pub fn size(&self) -> u64 {
        (std::mem::size_of::<Header>() + self.tail_len) as u64
    }
}

/// Bytes between per-dispatch parameter blocks in the uniform buffer (the largest
/// `min_uniform_buffer_offset_alignment` any adapter asks for).
pub(crate) const PARAM_STRIDE: u64 = 256;

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

    /// Checks a family's declarations against `shader` (its first test variant): the block `T`
    /// against the WGSL struct `name` ([`check_block`]; `Header` itself for `ChunkHeader`), and
    /// the flag bits `(prefix, all)` from [`flag_bits!`] against its constants.
    pub(crate) fn check_family<T: Mirror + Block>(
        shader: crate::gpu::variant::Shader,
        name: &str,
        flags: Option<(&str, &[(&str, u32)])>,
    ) {
        let v = shader.variants()[0];
        let src = shader.source(v);
        let (module, _) = crate::gpu::source::tests::validate(&src, v.subgroup).unwrap();
        if name == "ChunkHeader" {
            check_struct::<T>(&module, name);
        } else {
            check_block::<T>(&module, name);
        }
        if let Some((prefix, all)) = flags {
            check_flags(&module, prefix, all);
        }
    }

    /// The header as the shaders declare it (`ChunkHeader`).
    #[test]
    fn rust_mirrors_match_the_shader_layouts() {
        let src = crate::gpu::variant::Shader::CeFused
            .source(crate::gpu::variant::Variant { grad: true, ..Default::default() });
        let module = naga::front::wgsl::parse_str(&src).unwrap();
        check_struct::<Header>(&module, "ChunkHeader");
    }
}
