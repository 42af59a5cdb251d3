//! Tensor files: `.npy` (headers through the `npyz` crate) and safetensors (headers through the
//! `safetensors` crate), read whole or row block by row block with positional reads, and
//! outputs written atomically.
//!
//! The element data is moved by xent's own code rather than the crates' element iterators: a
//! little-endian file's bytes go straight into a typed buffer (`pread`), which is what lets a
//! file larger than memory stream through in row blocks at disk speed.

pub mod out;
pub mod pos;
pub mod tensor;

pub use out::OutFile;
pub use tensor::{FileDType, TensorFile};
