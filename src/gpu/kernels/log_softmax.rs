//! Row-wise log-softmax / softmax on the GPU (one workgroup per row, chunked like the logits),
//! recorded through a [`LogSoftmaxPlan`]; the host API is built on the same plan.

use ndarray::Array2;

use super::rows;
use super::{RowJob, RowOut, RowPlan};
use crate::api::config::SoftmaxKind;
use crate::dtype::{DType, Logits};
use crate::error::{Result, XentError};
use crate::gpu::context::GpuContext;
use crate::gpu::params::{flag_bits, Header};
use crate::gpu::variant::{Family, Shader};

flag_bits! {
    /// Log-softmax's flag bit (`LS_*` in `shaders/log_softmax.wgsl`).
    pub(crate) mod ls_flags("LS_") {
        /// Softmax rather than log-softmax.
        SOFTMAX = 1,
    }
}

fn base(n: usize, v: usize, kind: SoftmaxKind) -> Result<Header> {
    if v == 0 {
        return Err(XentError::Shape(format!("logits [{n}, 0] have no classes")));
    }
    let f = if kind == SoftmaxKind::Softmax { ls_flags::SOFTMAX } else { 0 };
    Ok(Header { flags: f, ..Header::new(n, v) })
}

/// A reusable row-wise log-softmax (or softmax) of one shape, recorded into the caller's
/// encoder: logits `[N, V]` of the plan's dtype in, f32 `[N, V]` out, both device slices.
///
/// ```no_run
/// # fn main() -> xent::Result<()> {
/// use xent::{DType, GpuContext, SoftmaxKind};
/// let gpu = GpuContext::new()?;
/// let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
/// let mk = |size| gpu.device().create_buffer(&wgpu::BufferDescriptor { label: None, size, usage, mapped_at_creation: false });
/// let (logits, out) = (mk(64 * 1000 * 4), mk(64 * 1000 * 4));
/// let plan = gpu.log_softmax_plan(64, 1000, DType::F32, SoftmaxKind::LogSoftmax)?;
/// let mut enc = gpu.device().create_command_encoder(&Default::default());
/// plan.record(&mut enc, logits.slice(..), out.slice(..))?;
/// gpu.queue().submit([enc.finish()]);
/// # Ok(()) }
/// ```
pub struct LogSoftmaxPlan {
    plan: RowPlan,
}

impl std::fmt::Debug for LogSoftmaxPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogSoftmaxPlan").field("rows", &self.plan.n).field("classes", &self.plan.v).finish()
    }
}

impl LogSoftmaxPlan {
    /// Records the log-softmax of `logits` into `out` (f32; any 4-byte aligned offsets).
    pub fn record(
        &self,
        enc: &mut wgpu::CommandEncoder,
        logits: wgpu::BufferSlice<'_>,
        out: wgpu::BufferSlice<'_>,
    ) -> Result<()> {
        if self.plan.n == 0 {
            return Ok(());
        }
        let l = self.plan.launch(logits, None, Some((out, RowOut::Rows)))?;
        self.plan.record(enc, vec![l])
    }
}

/// The log-softmax kernel: input rows in any dtype, f32 output rows (vectors where the rows
/// allow).
pub(crate) const FAMILY: Family = Family {
    io: &[rows::WGSL],
    bindings: |_, v| rows::with_output(v, vec![rows::input(v)]),
    #[cfg(test)]
    variants: |_| rows::keep(|v| v.grad && !v.in_place && rows::f32_second_and_output(v)),
};

impl GpuContext {
    /// A reusable log-softmax (or softmax) of `rows x classes` logits of `dtype`.
    pub fn log_softmax_plan(
        &self,
        rows: usize,
        classes: usize,
        dtype: DType,
        kind: SoftmaxKind,
    ) -> Result<LogSoftmaxPlan> {
        let base = base(rows, classes, kind)?;
        Ok(LogSoftmaxPlan {
            plan: RowPlan::new(self, Shader::LogSoftmax, base, (rows, classes), dtype, None, 0, false)?,
        })
    }

    /// Row-wise log-softmax (or softmax) of host logits `[N, V]` of any dtype (f32 output).
    pub fn log_softmax<'a>(&self, logits: impl Into<Logits<'a>>, kind: SoftmaxKind) -> Result<Array2<f32>> {
        let logits = logits.into();
        let (n, v) = logits.dim();
        let base = base(n, v, kind)?;
        let out = self.run_rows(RowJob {
            shader: Shader::LogSoftmax,
            base: base.into(),
            input: logits,
            second: None,
            row_values: 0,
            out: Some(RowOut::Rows),
        })?;
        Ok(out.out_rows.expect("output rows"))
    }
}

#[cfg(test)]
mod interface_tests {
    use super::*;
    use crate::gpu::params::tests::check_family;

    /// The family's parameters and flag bits declared here are what its WGSL declares.
    #[test]
    fn the_family_interface_matches_its_wgsl() {
        check_family::<Header>(Shader::LogSoftmax, "ChunkHeader", Some((ls_flags::PREFIX, ls_flags::ALL)));
    }
}
