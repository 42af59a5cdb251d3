//! A kernel's identity and compile-time switches, and what its family declares about it: the
//! kernels xent ships ([`Shader`]), the switches a kernel is built with ([`Variant`]: the row
//! interface's and each family's own), and the shape of a family's declaration ([`Family`],
//! [`Binding`]). The families fill these in (their `FAMILY`, beside their kernels); `source.rs`
//! maps each kernel to its family and file and builds its WGSL.

use crate::dtype::DType;
use crate::gpu::kernels::ce_io::CeSwitches;
use crate::gpu::kernels::matmul_io::Mm;

/// Compile-time switches of a kernel: those of the row interface every row family shares
/// (`kernels/rows.rs`: dtypes, vector reads, subgroups, output, workgroup size), and each
/// family's own, which that family's module declares ([`CeSwitches`], [`Mm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Variant {
    /// Stored type of the input rows (slot 1).
    pub input: DType,
    /// Stored type of the second rows (slot 9: probability targets, teacher logits, ...).
    pub second: DType,
    /// Stored type of the output rows (slot 8; the input's type when `in_place`).
    pub output: DType,
    /// Rows are a multiple of 4 elements and read 4 at a time.
    pub vec4: bool,
    /// With `vec4` and 16-bit input: rows are a multiple of 8 elements, start 16-byte aligned,
    /// and are read 8 at a time (one 16-byte load of four words instead of two 8-byte loads);
    /// a 16-bit output is written 8 at a time too.
    pub vec8: bool,
    /// Rows have an odd number of elements (16-bit edge words are shared by two rows).
    pub odd: bool,
    /// Reductions use subgroup operations.
    pub subgroup: bool,
    /// A separate output is written (gradient or log-softmax output).
    pub grad: bool,
    /// The gradient overwrites the input.
    pub in_place: bool,
    /// Invocations per workgroup; 0 means 256.
    pub wg: u16,
    /// Cross-entropy's switches (the cross-entropy family only; it owns them: `kernels/ce_io.rs`).
    pub ce: CeSwitches,
    /// Matrix-product switches (the matrix-product family only; it owns them:
    /// `kernels/matmul_io.rs`).
    pub mm: Mm,
}

impl Variant {
    /// Whether the kernel is built with WGSL's runtime bounds checks (all but the proven
    /// matrix products, [`Mm::unchecked`]).
    pub(crate) fn runtime_checks(&self) -> bool {
        !self.mm.unchecked
    }

    pub(crate) fn defined(&self, name: &str) -> bool {
        let out = if self.in_place { self.input } else { self.output };
        match name {
            "IN16" => self.input != DType::F32,
            "IN_BF16" => self.input == DType::BF16,
            "SEC16" => self.second != DType::F32,
            "SEC_BF16" => self.second == DType::BF16,
            "OUT16" => (self.grad || self.in_place) && out != DType::F32,
            "OUT_BF16" => (self.grad || self.in_place) && out == DType::BF16,
            "VEC4" => self.vec4,
            "VEC8" => self.vec8,
            "ODD" => self.odd,
            "SUBGROUP" => self.subgroup,
            "GRAD" => self.grad,
            "IN_PLACE" => self.in_place,
            other => self
                .ce
                .defined(other)
                .or_else(|| self.mm.defined(other))
                .unwrap_or_else(|| panic!("unknown shader define {other}")),
        }
    }
}

/// A binding of a kernel variant, uniform slot 0 aside: (slot, read-only, the WGSL variable's
/// name).
pub(crate) type Binding = (u32, bool, &'static str);

/// What a kernel family declares about its kernels beside its parameter block (which its
/// module declares with `mirror!`): the interface WGSL that goes between `common.wgsl` and each
/// kernel's own file, each variant's bindings by slot, access and name (in the shader's
/// order), and, for the tests, every variant the host builds. Each family's module holds one
/// (`cross_entropy::FAMILY`, `matmul::FAMILY`, `bce::FAMILY`, ...); the naga test in
/// `source.rs` checks every family's bindings against its WGSL.
pub(crate) struct Family {
    /// The family's interface WGSL, in order.
    pub io: &'static [&'static str],
    /// The bindings a kernel of the family uses in a variant. Kept to at most 8 storage
    /// buffers, WebGPU's default per-stage limit, so that xent runs on devices created with
    /// default limits.
    pub bindings: fn(Shader, &Variant) -> Vec<Binding>,
    /// Every variant the host builds a kernel of the family in (for the validation tests).
    #[cfg(test)]
    pub variants: fn(Shader) -> Vec<Variant>,
}

/// The kernels xent ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shader {
    /// Target check and weight sum (one workgroup).
    CeWeights,
    /// Per-row statistic, loss and gradient.
    CeFused,
    /// Sum of per-row losses (one workgroup).
    CeReduce,
    /// Row-wise log-softmax / softmax.
    LogSoftmax,
    /// Elementwise binary cross-entropy with partial sums.
    Bce,
    /// Distillation divergences between student and teacher rows.
    Distill,
    /// Entropy, cross-entropy, KL and JS of row pairs.
    Dist,
    /// Hessian-vector products.
    Hvp,
    /// Row sums (the read-only bandwidth probe).
    RowSum,
    /// Matrix products of fused linear cross-entropy, one variant per operand layout.
    Matmul,
    /// The same products on cooperative matrices (f16 tiles, f32 accumulation).
    MatmulCoop,
    /// Per-row log-prob and entropy of f32 logits, and their gradient in place (linear log-probs).
    Logprobs,
}

impl Shader {
    /// Every kernel, for tests.
    #[cfg(test)]
    pub const ALL: [Shader; 12] = [
        Shader::CeWeights,
        Shader::CeFused,
        Shader::CeReduce,
        Shader::LogSoftmax,
        Shader::Bce,
        Shader::Distill,
        Shader::Dist,
        Shader::Hvp,
        Shader::RowSum,
        Shader::Matmul,
        Shader::MatmulCoop,
        Shader::Logprobs,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Shader::CeWeights => "ce_weights",
            Shader::CeFused => "ce_fused",
            Shader::CeReduce => "ce_reduce",
            Shader::LogSoftmax => "log_softmax",
            Shader::Bce => "bce",
            Shader::Distill => "distill",
            Shader::Dist => "dist",
            Shader::Hvp => "hvp",
            Shader::RowSum => "row_sum",
            Shader::Matmul => "matmul",
            Shader::MatmulCoop => "matmul_coop",
            Shader::Logprobs => "logprobs",
        }
    }
}
