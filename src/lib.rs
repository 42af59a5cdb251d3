//! # xent
//!
//! The cross-entropy family of losses on large logit tensors: WGSL compute shaders on wgpu,
//! with a fast CPU path beside them and an f64 reference that tests hold both to. Logits may be
//! f32, f16 or bf16; all arithmetic is f32.
//!
//! - [`Cpu`]: the fast CPU backend; [`cpu::reference`]: the f64 reference.
//! - [`GpuContext`] (feature `gpu`, default): the wgpu backend, host-array calls and recorded
//!   plans ([`CePlan`]) for training loops that keep everything on the device.
//! - [`CrossEntropy`] and the other option structs, [`Targets`], [`Logits`] and the
//!   [`Backend`] trait that runs the same code on either backend.
//! - [`check`]: the input checks every backend applies, for front ends.
//!
//! ```
//! use ndarray::array;
//! use xent::{Cpu, CrossEntropy, Reduction};
//!
//! let logits = array![[2.0f32, 0.5, -1.0], [0.1, 0.2, 0.3]];
//! let targets = [0i64, -100]; // the second row is ignored
//! let cfg = CrossEntropy::default().with_reduction(Reduction::Mean);
//! let out = Cpu::new().cross_entropy_with_grad(&logits, &targets[..], &cfg).unwrap();
//! assert_eq!(out.counted, 1);
//! assert!((out.loss - 0.24131).abs() < 1e-4);
//! let g = out.grad.unwrap();
//! assert!(g.row(1).iter().all(|&x| x == 0.0));
//! ```

// docs.rs (`--cfg docsrs`, nightly) marks the items that need a feature.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs)]

// GPU buffers and file data are little-endian and are cast, not converted.
#[cfg(target_endian = "big")]
compile_error!("xent assumes a little-endian host");

/// `with_*` builders of an option struct: one consuming setter per field, so that callers
/// outside the crate (where `#[non_exhaustive]` forbids struct literals) build options in one
/// expression. `set name => field: T` sets the field to the value; `some name => field: T` sets
/// an `Option<T>` field from a `T` (`Some`) or an `Option<T>`.
macro_rules! with_builders {
    ($ty:ident { $($kind:ident $name:ident => $field:ident : $t:ty),* $(,)? }) => {
        impl $ty {
            $(with_builders!(@$kind $ty, $name, $field, $t);)*
        }
    };
    (@set $ty:ident, $name:ident, $field:ident, $t:ty) => {
        #[doc = concat!("Sets [`", stringify!($ty), "::", stringify!($field), "`] (builder).")]
        #[must_use]
        pub fn $name(mut self, $field: $t) -> Self {
            self.$field = $field;
            self
        }
    };
    (@some $ty:ident, $name:ident, $field:ident, $t:ty) => {
        #[doc = concat!("Sets [`", stringify!($ty), "::", stringify!($field), "`] (builder): a value sets `Some(value)`, an `Option` is taken as it is.")]
        #[must_use]
        pub fn $name(mut self, $field: impl Into<Option<$t>>) -> Self {
            self.$field = $field.into();
            self
        }
    };
}

pub mod alloc;
mod api;
pub mod check;
pub mod cpu;
mod dtype;
mod error;
#[cfg(feature = "gpu")]
#[cfg_attr(docsrs, doc(cfg(feature = "gpu")))]
pub mod gpu;
pub mod parallel;
pub mod workload;

pub use api::config::LinearCe;
pub use api::config::{
    Bce, BceOutput, BceWeight, CeData, CeOutput, CeOutputs, CrossEntropy, Distill, DistillMode, DistillOutput,
    Measures, Reduction, SoftmaxKind, Totals,
};
pub use api::linear::LinearCeOutput;
pub use api::logprobs::{LinearLogprobs, LinearLogprobsOutput};
pub use api::targets::{Targets, DEVICE_IGNORED};
pub use api::Backend;
pub use api::{calibration, gaussian, preference, sequence};
pub use cpu::backend::Cpu;
pub use dtype::{DType, Element, Logits, LogitsMut, Tensor2};
pub use error::{GpuSource, IoSource, Result, XentError};
#[cfg(feature = "gpu")]
#[cfg_attr(docsrs, doc(cfg(feature = "gpu")))]
pub use gpu::context::{CounterSnapshot, GpuContext, GpuOptions};
#[cfg(feature = "gpu")]
#[cfg_attr(docsrs, doc(cfg(feature = "gpu")))]
pub use gpu::kernels::{
    cross_entropy::{CeBackward, CeInputs, CePlan, DeviceGrad, DeviceTargets, PendingCe},
    divergence::{DistillInputs, DistillPlan, PendingLoss},
    log_softmax::LogSoftmaxPlan,
    row_sum::RowSumPlan,
};
/// The `half` crate whose `f16`/`bf16` xent's tensors hold, so that callers name the same types.
pub use half;
/// The `wgpu` crate of xent's public GPU API (buffers, encoders, devices), so that callers
/// record into xent's plans with the same version.
#[cfg(feature = "gpu")]
pub use wgpu;

/// The README's Rust examples, compiled and run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(all(doctest, feature = "gpu"))]
pub struct ReadmeDoctests;

/// The Rust examples of the pages under `docs/`, compiled and run as doc tests.
#[doc = include_str!("../docs/api.md")]
#[doc = include_str!("../docs/losses.md")]
#[doc = include_str!("../docs/distributed.md")]
#[doc = include_str!("../docs/frameworks.md")]
#[doc = include_str!("../docs/rl-logprobs.md")]
#[cfg(all(doctest, feature = "gpu"))]
pub struct DocsDoctests;
