//! Hessian-vector products on the GPU (see `shaders/hvp.wgsl`).

use ndarray::{Array2, ArrayView2};

use super::source::Shader;
use crate::context::GpuContext;
use crate::error::Result;

impl GpuContext {
    /// Per-row Hessian-vector products `H_n v_n` of softmax cross-entropy w.r.t. the logits,
    /// `H_n = diag(p_n) - p_n p_n^T` (independent of the target), without forming `H`.
    pub fn hvp(&self, logits: ArrayView2<f32>, v: ArrayView2<f32>) -> Result<Array2<f32>> {
        crate::api::check::same_rows(logits.dim(), v.dim(), "logits and v")?;
        let base = Self::pair_params(0, 0, 0.0, 1.0, 1.0);
        let out = self.pair_rows(Shader::Hvp, logits, v, base, 0, true)?;
        Ok(out.grad.expect("output"))
    }
}
