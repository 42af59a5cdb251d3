//! Which kernels run the CPU's matrix products (those of the fused linear cross-entropy):
//! chosen at run time from cpuid, overridable by [`crate::Cpu::with_matmul`] or the environment
//! variable `XENT_CPU_MATMUL` (`f32`, `avx512-bf16`, `amx-bf16`; `auto` or unset: the best this
//! CPU has);
//! and how the bf16 products take the f32 gradient ([`Bf16Grad`]).

use std::fmt;
use std::str::FromStr;

use crate::dtype::DType;
use crate::error::{Result, XentError};

/// The kernels of the CPU's matrix products.
///
/// ```
/// use xent::cpu::CpuMatmul;
/// let best = CpuMatmul::detect();
/// assert!(best.available());
/// assert_eq!("f32".parse::<CpuMatmul>().unwrap(), CpuMatmul::F32);
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CpuMatmul {
    /// f32 products (the `gemm` crate) for every dtype; f16 and bf16 inputs are widened first.
    F32,
    /// bf16 inputs multiplied as bf16 on AVX512-BF16 (`vdpbf16ps`) with f32 sums; the f32
    /// gradient of the logits split into bf16 terms (see `docs/cpu-bf16-matmul.md` for the
    /// bound). f32 and f16 inputs still take [`CpuMatmul::F32`].
    Avx512Bf16,
    /// bf16 inputs multiplied on AMX tiles (`tdpbf16ps`, Intel Sapphire Rapids and later) with
    /// f32 sums: the same operands, terms of the gradient and bound as
    /// [`CpuMatmul::Avx512Bf16`], 16 x 16 x 32 products per instruction. Offered where cpuid
    /// reports AMX-BF16 and AVX512-BF16, Linux grants the tile data (`arch_prctl`, once per
    /// process), and a small product on them agrees with [`CpuMatmul::Avx512Bf16`]'s (checked
    /// once per process). f32 and f16 inputs still take [`CpuMatmul::F32`].
    AmxBf16,
}

impl CpuMatmul {
    /// Every kernel, slowest first (a slice, so that kernels can be added).
    pub const ALL: &'static [CpuMatmul] = &[CpuMatmul::F32, CpuMatmul::Avx512Bf16, CpuMatmul::AmxBf16];

    /// The name `XENT_CPU_MATMUL` and `xent bench` use: `f32`, `avx512-bf16`, `amx-bf16`.
    pub fn name(self) -> &'static str {
        match self {
            CpuMatmul::F32 => "f32",
            CpuMatmul::Avx512Bf16 => "avx512-bf16",
            CpuMatmul::AmxBf16 => "amx-bf16",
        }
    }

    /// Whether this CPU (and, for AMX, its OS) runs these kernels: cpuid at run time.
    pub fn available(self) -> bool {
        self.unavailable().is_none()
    }

    /// Why this CPU does not run these kernels, or `None` where it does.
    ///
    /// ```
    /// use xent::cpu::CpuMatmul;
    /// assert_eq!(CpuMatmul::F32.unavailable(), None);
    /// if let Some(why) = CpuMatmul::AmxBf16.unavailable() {
    ///     println!("no AMX here: {why}");
    /// }
    /// ```
    pub fn unavailable(self) -> Option<&'static str> {
        // Only the kernels asked about are probed (AMX's probe asks Linux for the tile data).
        match self {
            CpuMatmul::F32 => None,
            #[cfg(target_arch = "x86_64")]
            CpuMatmul::Avx512Bf16 => (!super::matmul_bf16::available()).then_some("cpuid reports no AVX512-BF16"),
            #[cfg(target_arch = "x86_64")]
            CpuMatmul::AmxBf16 => super::matmul_amx::unavailable(),
            #[cfg(not(target_arch = "x86_64"))]
            CpuMatmul::Avx512Bf16 | CpuMatmul::AmxBf16 => Some("not an x86-64 CPU"),
        }
    }

    /// The fastest kernels this CPU runs: AMX tiles, else AVX512-BF16, else f32.
    pub fn detect() -> CpuMatmul {
        CpuMatmul::ALL.iter().rev().copied().find(|m| m.available()).unwrap_or(CpuMatmul::F32)
    }

    /// Whether these kernels multiply bf16 inputs as bf16 (and so take the gradient of the
    /// logits as [`Bf16Grad`] says).
    pub fn multiplies_bf16(self) -> bool {
        self != CpuMatmul::F32
    }

    /// The kernels that run products of `dtype` inputs when these are asked for.
    pub fn for_dtype(self, dtype: DType) -> CpuMatmul {
        match dtype {
            DType::BF16 => self,
            _ => CpuMatmul::F32,
        }
    }

    /// `XENT_CPU_MATMUL` when set (and not `auto`), else [`CpuMatmul::detect`]; an unknown name
    /// or kernels this CPU lacks are an [`XentError::InvalidOption`].
    pub fn from_env() -> Result<CpuMatmul> {
        match std::env::var("XENT_CPU_MATMUL") {
            Ok(s) if !s.trim().is_empty() && s.trim() != "auto" => {
                let m = s.parse::<CpuMatmul>().map_err(|e| match e {
                    XentError::InvalidOption(msg) => XentError::InvalidOption(format!("XENT_CPU_MATMUL: {msg}")),
                    other => other,
                })?;
                m.check().map_err(|e| match e {
                    XentError::InvalidOption(msg) => XentError::InvalidOption(format!("XENT_CPU_MATMUL: {msg}")),
                    other => other,
                })
            }
            _ => Ok(CpuMatmul::detect()),
        }
    }

    /// `self`, or an [`XentError::InvalidOption`] saying why when this CPU lacks it.
    pub fn check(self) -> Result<CpuMatmul> {
        let need = match self {
            CpuMatmul::F32 => "",
            CpuMatmul::Avx512Bf16 => "AVX512-BF16 (vdpbf16ps)",
            CpuMatmul::AmxBf16 => "AMX-BF16 tiles (tdpbf16ps), AVX512-BF16 and the OS's leave to use the tiles",
        };
        match self.unavailable() {
            None => Ok(self),
            Some(why) => {
                Err(XentError::InvalidOption(format!("{} matrix products need {need}, but {why}", self.name())))
            }
        }
    }
}

impl fmt::Display for CpuMatmul {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CpuMatmul {
    type Err = XentError;

    fn from_str(s: &str) -> Result<CpuMatmul> {
        match s.trim() {
            "f32" => Ok(CpuMatmul::F32),
            "avx512-bf16" => Ok(CpuMatmul::Avx512Bf16),
            "amx-bf16" => Ok(CpuMatmul::AmxBf16),
            other => Err(XentError::InvalidOption(format!(
                "unknown CPU matrix kernels {other:?}: use f32, avx512-bf16, amx-bf16 or auto"
            ))),
        }
    }
}

/// How the bf16 products of the fused linear losses take the f32 gradient of the logits `G`
/// (in `grad_hidden = G W` and `grad_weight = G^T H`), where they run on bf16 kernels
/// ([`CpuMatmul::Avx512Bf16`], [`CpuMatmul::AmxBf16`]); other kernels ignore it. Set by [`crate::Cpu::with_bf16_grad`];
/// `XENT_CPU_BF16_TERMS=gh,gw` (1 to 3 terms per product) overrides the default for
/// measurement. The bounds are element-wise: `|product - exact| <= u sum_k |g_k x_k|` plus f32
/// summation, tested in `tests/cpu_matmul.rs` and measured in `docs/cpu-bf16-matmul.md`.
///
/// ```
/// use xent::cpu::Bf16Grad;
/// assert_eq!("rounded".parse::<Bf16Grad>()?, Bf16Grad::Rounded);
/// assert_eq!(Bf16Grad::default(), Bf16Grad::Split);
/// # Ok::<(), xent::XentError>(())
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Bf16Grad {
    /// `G` split into two bf16 terms per product, `u = 2^-16`: as accurate as the f32 products
    /// to within the f32 gradient's own rounding (the default; passes the f64 and PyTorch
    /// float64 golden checks unchanged).
    #[default]
    Split,
    /// `G` rounded to bf16 once, `u = 2^-8`, as PyTorch's bf16 autograd does (its `grad_output`
    /// of the bf16 `F.linear` is bf16): the two gradient products run twice as fast, with
    /// errors of a few 1e-3 of an entry (relative l2 error about 2e-3), PyTorch's own precision.
    Rounded,
}

impl Bf16Grad {
    /// The name `xent bench --bf16-grad` uses: `split`, `rounded`.
    pub fn name(self) -> &'static str {
        match self {
            Bf16Grad::Split => "split",
            Bf16Grad::Rounded => "rounded",
        }
    }

    /// bf16 terms of `G` per gradient product `(G W, G^T H)`.
    pub fn terms(self) -> (usize, usize) {
        match self {
            Bf16Grad::Split => (2, 2),
            Bf16Grad::Rounded => (1, 1),
        }
    }
}

impl fmt::Display for Bf16Grad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Bf16Grad {
    type Err = XentError;

    fn from_str(s: &str) -> Result<Bf16Grad> {
        match s.trim() {
            "split" => Ok(Bf16Grad::Split),
            "rounded" => Ok(Bf16Grad::Rounded),
            other => {
                Err(XentError::InvalidOption(format!("unknown bf16 gradient form {other:?}: use split or rounded")))
            }
        }
    }
}
