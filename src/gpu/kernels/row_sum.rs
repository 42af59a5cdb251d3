//! Row sums of `[N, V]` logits (one workgroup per row, one read): the read-only half of the
//! bandwidth ceiling `xent bench --op copy` measures beside a buffer-to-buffer copy.

use super::rows;
use super::RowPlan;
use crate::dtype::DType;
use crate::error::Result;
use crate::gpu::context::GpuContext;
use crate::gpu::params::Header;
use crate::gpu::variant::{Family, Shader};

/// A reusable row sum of one shape, recorded into the caller's encoder; the f32 sums `[N]`
/// stay in [`Self::row_buffer`].
pub struct RowSumPlan {
    plan: RowPlan,
}

impl std::fmt::Debug for RowSumPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowSumPlan").field("rows", &self.plan.n).field("classes", &self.plan.v).finish()
    }
}

impl RowSumPlan {
    /// Records the sums of the rows of `input` (the plan's dtype, any 4-byte aligned offset).
    pub fn record(&self, enc: &mut wgpu::CommandEncoder, input: wgpu::BufferSlice<'_>) -> Result<()> {
        if self.plan.n == 0 {
            return Ok(());
        }
        let l = self.plan.launch(input, None, None)?;
        self.plan.record(enc, vec![l])
    }

    /// Records the row sums and a copy of the rows, as f32, into `out` (`[N, V]` f32): the
    /// read-and-write probe.
    pub fn record_copy(
        &self,
        enc: &mut wgpu::CommandEncoder,
        input: wgpu::BufferSlice<'_>,
        out: wgpu::BufferSlice<'_>,
    ) -> Result<()> {
        if self.plan.n == 0 {
            return Ok(());
        }
        let l = self.plan.launch(input, None, Some((out, super::RowOut::Rows)))?;
        self.plan.record(enc, vec![l])
    }

    /// The f32 row sums of the last record.
    pub fn row_buffer(&self) -> &wgpu::Buffer {
        &self.plan.rows
    }
}

/// The row-sum kernel: input rows in any dtype, one f32 per row, and (`grad`) an f32 copy of
/// the rows (the copy probe).
pub(crate) const FAMILY: Family = Family {
    io: &[rows::WGSL],
    bindings: |_, v| rows::with_output(v, vec![rows::input(v), rows::ROW_VALUES]),
    #[cfg(test)]
    variants: |_| rows::keep(|v| !v.in_place && !v.odd && rows::f32_second_and_output(v)),
};

impl GpuContext {
    /// A reusable row sum of `rows x classes` values of `dtype`.
    pub fn row_sum_plan(&self, rows: usize, classes: usize, dtype: DType) -> Result<RowSumPlan> {
        let base = Header::new(rows, classes);
        Ok(RowSumPlan { plan: RowPlan::new(self, Shader::RowSum, base, (rows, classes), dtype, None, 1, false)? })
    }
}
