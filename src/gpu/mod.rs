//! The wgpu backend (cargo feature `gpu`, on by default).
//!
//! - [`context`]: the device as a guest, the pipeline cache, the bounded buffer pool.
//! - `launch`: the one builder every kernel is launched with (chunked bindings, 2-D grids,
//!   parameter blocks, recording into the caller's encoder).
//! - `params`: Rust mirrors of the WGSL structs, checked against naga's layout.
//! - [`source`]: the WGSL sources (`shaders/`), their variants and preprocessor.
//! - `kernels`: one module per operation.

pub mod context;
mod kernels;
pub(crate) mod launch;
pub(crate) mod params;
mod pending;
pub mod pool;
pub mod source;

pub use context::{CounterSnapshot, GpuContext, GpuOptions};
pub use kernels::cross_entropy::{CeBackward, CeInputs, CePlan, DeviceGrad, DeviceTargets, PendingCe};
pub use kernels::divergence::{DistillInputs, DistillPlan, PendingLoss};
pub use kernels::log_softmax::LogSoftmaxPlan;
#[doc(hidden)]
pub use kernels::matmul::MatmulArgs;
pub use kernels::row_sum::RowSumPlan;
pub use pool::PoolStats;
pub use source::MatmulLayout;
