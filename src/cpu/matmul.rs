//! Which kernels run the CPU's matrix products (those of the fused linear cross-entropy):
//! chosen at run time from cpuid, overridable by [`crate::Cpu::with_matmul`] or the environment
//! variable `XENT_CPU_MATMUL` (`f32`, `avx512-bf16`; `auto` or unset: the best this CPU has).

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
}

impl CpuMatmul {
    /// The name `XENT_CPU_MATMUL` and `xent bench` use: `f32`, `avx512-bf16`.
    pub fn name(self) -> &'static str {
        match self {
            CpuMatmul::F32 => "f32",
            CpuMatmul::Avx512Bf16 => "avx512-bf16",
        }
    }

    /// Whether this CPU runs these kernels (cpuid at run time).
    pub fn available(self) -> bool {
        match self {
            CpuMatmul::F32 => true,
            #[cfg(target_arch = "x86_64")]
            CpuMatmul::Avx512Bf16 => super::matmul_bf16::available(),
            #[cfg(not(target_arch = "x86_64"))]
            CpuMatmul::Avx512Bf16 => false,
        }
    }

    /// The fastest kernels this CPU runs.
    pub fn detect() -> CpuMatmul {
        if CpuMatmul::Avx512Bf16.available() {
            CpuMatmul::Avx512Bf16
        } else {
            CpuMatmul::F32
        }
    }

    /// The kernels that run products of `dtype` inputs when these are asked for.
    pub fn for_dtype(self, dtype: DType) -> CpuMatmul {
        match (self, dtype) {
            (CpuMatmul::Avx512Bf16, DType::BF16) => CpuMatmul::Avx512Bf16,
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

    /// `self`, or an [`XentError::InvalidOption`] when this CPU lacks it.
    pub fn check(self) -> Result<CpuMatmul> {
        if self.available() {
            Ok(self)
        } else {
            Err(XentError::InvalidOption(format!(
                "{} matrix products need a CPU with AVX512-BF16 (vdpbf16ps), which this one lacks",
                self.name()
            )))
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
            "amx-bf16" => Err(XentError::InvalidOption(
                "amx-bf16 matrix products are not implemented in this version; use f32 or avx512-bf16".into(),
            )),
            other => Err(XentError::InvalidOption(format!(
                "unknown CPU matrix kernels {other:?}: use f32, avx512-bf16 or auto"
            ))),
        }
    }
}
