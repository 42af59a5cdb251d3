//! The CPU backend: a fast f32 path (rayon + vectorised primitives) and the f64 reference.

mod avx512;
pub(crate) mod backend;
pub(crate) mod bce;
mod convert;
mod cross_entropy;
pub(crate) mod divergence;
mod exp_consts;
mod hessian;
mod linear;
mod linear_vocab;
mod log_softmax;
mod logprobs;
mod matmul;
mod matmul_amx;
mod matmul_bf16;
pub mod reference;
mod simd;
mod vocab;

pub use hessian::{hessian, symmetric_eigenvalues};
pub use matmul::{Bf16Grad, CpuMatmul};

pub(crate) use backend::Cpu;
pub use backend::SharedCpu;
