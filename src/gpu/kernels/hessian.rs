//! Hessian-vector products on the GPU (see `shaders/hvp.wgsl`).

use ndarray::{Array2, ArrayView2};

use super::rows;
use super::{RowJob, RowOut};
use crate::dtype::Logits;
use crate::error::Result;
use crate::gpu::context::GpuContext;
use crate::gpu::params::Header;
use crate::gpu::variant::{Family, Shader};

/// The Hessian-vector product kernel: the logits (slot 1), `v` (second rows) and the products
/// (output rows), f32 out.
pub(crate) const FAMILY: Family = Family {
    io: &[rows::WGSL],
    bindings: |_, v| rows::with_output(v, vec![rows::input(v), rows::SECOND]),
    #[cfg(test)]
    variants: |_| rows::keep(|v| v.grad && !v.in_place && !v.vec4 && !v.odd && rows::f32_second_and_output(v)),
};

impl GpuContext {
    /// Per-row Hessian-vector products `H_n v_n` of softmax cross-entropy w.r.t. the logits,
    /// `H_n = diag(p_n) - p_n p_n^T` (independent of the target), without forming `H`.
    pub fn hvp<'a>(&self, logits: impl Into<Logits<'a>>, v: ArrayView2<f32>) -> Result<Array2<f32>> {
        let logits = logits.into().reborrow();
        crate::check::same_rows(logits.dim(), v.dim(), "logits and v")?;
        let (n, c) = logits.dim();
        let out = self.run_rows(RowJob {
            shader: Shader::Hvp,
            base: Header::new(n, c).into(),
            input: logits,
            second: Some(v.reborrow().into()),
            row_values: 0,
            out: Some(RowOut::Rows),
        })?;
        Ok(out.out_rows.expect("output rows"))
    }
}
