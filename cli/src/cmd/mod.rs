//! One module per command.

pub mod bce;
pub mod bench;
pub mod bench_args;
pub mod bench_linear;
pub mod demo;
pub mod divergence;
pub mod eval;
pub mod linear;
pub mod metrics;
pub mod score;

use std::path::Path;

use xent::Result;

use crate::io::out::TensorOut;
use crate::io::FileDType;

/// Creates an output tensor (header and temporary file) before the work starts.
pub fn out_tensor(path: Option<&Path>, dtype: FileDType, shape: &[usize], what: &str) -> Result<Option<TensorOut>> {
    path.map(|p| TensorOut::create(p, dtype, shape, what)).transpose()
}

/// Writes a whole f32 array to an output created with [`out_tensor`] and commits it.
pub fn commit_f32(out: Option<TensorOut>, data: Option<&[f32]>) -> Result<()> {
    if let (Some(o), Some(d)) = (out, data) {
        o.write(0, d)?;
        o.commit()?;
    }
    Ok(())
}
