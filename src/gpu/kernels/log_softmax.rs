//! Row-wise log-softmax / softmax on the GPU (one workgroup per row, chunked like the logits).

use ndarray::Array2;

use super::RowJob;
use crate::api::config::SoftmaxKind;
use crate::dtype::Logits;
use crate::error::{Result, XentError};
use crate::gpu::context::GpuContext;
use crate::gpu::params::{flags, Params};
use crate::gpu::source::Shader;

impl GpuContext {
    /// Row-wise log-softmax (or softmax) of host logits `[N, V]` of any dtype (f32 output).
    pub fn log_softmax<'a>(&self, logits: impl Into<Logits<'a>>, kind: SoftmaxKind) -> Result<Array2<f32>> {
        let logits = logits.into();
        let (n, v) = logits.dim();
        if v == 0 {
            return Err(XentError::Shape(format!("logits [{n}, 0] have no classes")));
        }
        let f = if kind == SoftmaxKind::Softmax { flags::SOFTMAX } else { 0 };
        let base = Params { flags: f, ..Params::new(n, v) };
        let out = self.run_rows(RowJob {
            shader: Shader::LogSoftmax,
            base,
            input: logits,
            second: None,
            row_values: 0,
            out_rows: true,
            out_whole: 0,
        })?;
        Ok(out.out_rows.expect("output rows"))
    }
}
