//! The matrix-product family's interface, mirrored by `shaders/matmul_io.wgsl` and checked
//! against it by naga (in `matmul.rs`'s tests): the compile-time switches ([`Mm`]: layout,
//! load widths, cooperative tile size) and the preprocessor names they define, the parameter
//! block ([`MatmulParams`]: the chunk header, then the product's sizes, strides and bias
//! offset), the flag bits ([`mm_flags`]) and the bindings by slot and name ([`BINDINGS`],
//! which `matmul.rs`'s `FAMILY` declares for both kernels). An
//! option of the products is added here, in `matmul.rs` where it is set, and in the family's
//! WGSL.

use crate::gpu::params::{flag_bits, mirror, Block, Header};

/// Which operand axis is contiguous in a matrix product `C = A B` (the `Matmul` kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MatmulLayout {
    /// `A[m, k]` rows and `B(k, n) = W[n, k]` rows contiguous in k: `H W^T`.
    #[default]
    Nt,
    /// `A[m, k]` contiguous in k, `B[k, n]` contiguous in n: `G W`.
    Nn,
    /// `A(m, k) = G[k, m]` and `B[k, n]` contiguous in m and n: `G^T H`.
    Tn,
}

/// Compile-time switches of the matrix-product family (its part of a kernel [`Variant`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Mm {
    /// The operands' layout.
    pub layout: MatmulLayout,
    /// A is read 4 contiguous elements at a time (offset and row stride multiples of 4).
    pub a4: bool,
    /// B is read 4 contiguous elements at a time.
    pub b4: bool,
    /// Cooperative-matrix tiles of 8 x 8 rather than 16 x 16 (`MatmulCoop` only).
    pub coop8: bool,
    /// Built without runtime bounds checks (the SIMT kernel, where the host has proven every
    /// access in range: `matmul.rs`'s `in_range`, the conditions in `shaders/matmul.wgsl`). The
    /// source is the same.
    pub unchecked: bool,
}

impl Mm {
    /// The value of a preprocessor name this family owns (`MM_NT`, `MM_NN`, `MM_TN`, `A4`,
    /// `B4`, `COOP8`); `None` for any other name.
    pub(crate) fn defined(&self, name: &str) -> Option<bool> {
        Some(match name {
            "MM_NT" => self.layout == MatmulLayout::Nt,
            "MM_NN" => self.layout == MatmulLayout::Nn,
            "MM_TN" => self.layout == MatmulLayout::Tn,
            "A4" => self.a4,
            "B4" => self.b4,
            "COOP8" => self.coop8,
            _ => return None,
        })
    }
}

/// The family's WGSL interface (parameters, flags, bindings, element access), put between
/// `common.wgsl` and the kernel's own file.
pub(crate) const WGSL: &str = include_str!("../../../shaders/matmul_io.wgsl");

mirror! {
    /// Parameters of one product; mirrors `MatmulParams` in `shaders/matmul_io.wgsl`.
    /// `C[m, n] (+)= sum_k A(m, k) B(k, n) (+ bias)`: A and B from elements `x_off` / `y_off`
    /// (header) of their bindings with row strides `a_rs` / `b_rs` along the layout's strided
    /// axis, C from element `o_off` with row stride `c_rs`, the bias from entry `bias0`.
    pub(crate) struct MatmulParams {
        pub head: Header,
        pub m: u32,
        pub n: u32,
        pub k: u32,
        pub a_rs: u32,
        pub b_rs: u32,
        pub c_rs: u32,
        pub bias0: u32,
    }
}

impl Block for MatmulParams {
    fn head(&self) -> &Header {
        &self.head
    }
}

flag_bits! {
    /// Flag bits of a product (in its header's `flags`; `MM_*` constants in `matmul_io.wgsl`).
    pub(crate) mod mm_flags("MM_") {
        /// Add C's old value (products accumulated over row chunks).
        ACCUMULATE = 1,
        /// Add `bias[bias0 + column]`.
        BIAS = 2,
    }
}

/// The family's binding slots (`@binding(n)` in `matmul_io.wgsl`).
pub(crate) mod slot {
    /// The left operand A (the input dtype).
    pub const A: usize = 1;
    /// The right operand B (the second dtype).
    pub const B: usize = 2;
    /// The f32 result C.
    pub const C: usize = 3;
    /// The f32 bias, added per column.
    pub const BIAS: usize = 4;
}

/// Every kernel of the family binds these, as (slot, read-only, WGSL name).
pub(crate) const BINDINGS: [(u32, bool, &str); 4] = [
    (slot::A as u32, true, "mm_a"),
    (slot::B as u32, true, "mm_b"),
    (slot::C as u32, false, "mm_c"),
    (slot::BIAS as u32, true, "mm_bias"),
];
