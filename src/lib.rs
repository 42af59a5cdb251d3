//! # xent
//!
//! The cross-entropy family of losses on large logit tensors: WGSL compute shaders on wgpu,
//! with a fast CPU path beside them and an f64 reference that tests hold both to.
//!
//! - [`context`]: the GPU device, pipeline cache and buffer pool ([`GpuContext`]).
//! - [`kernels`]: one module per GPU operation, WGSL in `shaders/`.
//! - [`cpu`]: the fast CPU backend ([`Cpu`]) and the f64 [`cpu::reference`].
//! - [`api`]: options ([`CrossEntropy`]), targets, results and the [`Backend`] trait.
//!
//! ```
//! use ndarray::array;
//! use xent::{Backend, Cpu, CrossEntropy, GradMode, Reduction};
//!
//! let logits = array![[2.0f32, 0.5, -1.0], [0.1, 0.2, 0.3]];
//! let targets = [0i64, -100]; // the second row is ignored
//! let cfg = CrossEntropy { reduction: Reduction::Mean, grad: GradMode::Separate, ..Default::default() };
//! let out = Cpu::new().cross_entropy(logits.view(), (&targets[..]).into(), &cfg).unwrap();
//! assert_eq!(out.counted, 1);
//! assert!((out.loss - 0.24131).abs() < 1e-4);
//! let g = out.grad.unwrap();
//! assert!(g.row(1).iter().all(|&x| x == 0.0));
//! ```

// GPU buffers and .npy data are little-endian and are cast, not converted.
#[cfg(target_endian = "big")]
compile_error!("xent assumes a little-endian host");

pub mod api;
pub mod context;
pub mod cpu;
pub mod error;
pub mod kernels;
pub mod npy;
pub mod workload;

pub use api::config::{
    Bce, BceOutput, BceWeight, CeOutput, CrossEntropy, Distill, DistillMode, DistillOutput, GradMode, Measures,
    Reduction, SoftmaxKind,
};
pub use api::targets::Targets;
pub use api::Backend;
pub use api::{calibration, gaussian, preference, sequence};
pub use context::{GpuContext, GpuOptions};
pub use cpu::Cpu;
pub use error::{Result, XentError};
pub use kernels::cross_entropy::DeviceCe;

/// True when `XENT_REQUIRE_GPU` is set to a non-empty value other than `0`: GPU tests then fail
/// instead of skipping when no adapter is found.
pub fn gpu_required() -> bool {
    std::env::var("XENT_REQUIRE_GPU").is_ok_and(|v| !v.is_empty() && v != "0")
}
pub mod cli;

/// The README's Rust examples, compiled and run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
