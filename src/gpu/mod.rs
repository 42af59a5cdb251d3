//! The wgpu backend (cargo feature `gpu`, on by default).
//!
//! - `context`: the device as a guest ([`crate::GpuContext`]), the pipeline cache, the bounded
//!   buffer pool ([`PoolStats`]).
//! - `launch`: the one builder every kernel is launched with (chunked bindings, 2-D grids,
//!   parameter blocks, recording into the caller's encoder).
//! - `params`: Rust mirrors of the WGSL structs, checked against naga's layout.
//! - `variant`: the kernels, their compile-time switches, and what a kernel family declares.
//! - `source`: the WGSL sources (`shaders/`): each kernel's family and file, the preprocessor.
//! - `kernels`: one module per operation.

pub(crate) mod context;
pub(crate) mod kernels;
pub(crate) mod launch;
pub(crate) mod params;
mod pending;
pub(crate) mod pool;
pub(crate) mod source;
pub(crate) mod variant;

// Public here (`xent::gpu::...`).
pub use context::FEATURES;
#[doc(hidden)]
pub use kernels::matmul::MatmulArgs;
pub use kernels::matmul_io::MatmulLayout;
pub use pool::PoolStats;
