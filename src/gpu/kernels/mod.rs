//! GPU kernels: one module per operation, each only its parameters and its launches; the
//! launching itself is [`crate::gpu::launch`].

pub(crate) mod bce;
pub(crate) mod ce_io;
pub(crate) mod cross_entropy;
pub(crate) mod divergence;
pub(crate) mod hessian;
pub(crate) mod linear;
pub(crate) mod linear_vocab;
pub(crate) mod log_softmax;
pub(crate) mod logprobs;
pub(crate) mod matmul;
pub(crate) mod matmul_io;
pub(crate) mod row_sum;
pub(crate) mod rows;
pub(crate) mod vocab;

use ndarray::Array2;

use crate::dtype::{DType, Logits};
use crate::error::{Result, XentError};
use crate::gpu::context::GpuContext;
use crate::gpu::launch::{Bind, Launch, ParamsCache, Recorder, Skip};
use crate::gpu::params::AnyBlock;
use crate::gpu::pool::Pooled;
use crate::gpu::variant::{Shader, Variant};

use wgpu::BufferUsages as U;

/// Checks a device slice: usage, offset alignment, length.
pub(crate) fn check_slice(s: wgpu::BufferSlice<'_>, need: u64, align: u64, what: &str) -> Result<()> {
    let b = s.buffer();
    if !b.usage().contains(U::STORAGE) {
        return Err(XentError::InvalidOption(format!("{what} buffer lacks BufferUsages::STORAGE")));
    }
    if !s.offset().is_multiple_of(align) {
        return Err(XentError::InvalidOption(format!(
            "{what} starts at byte {}, not a multiple of {align}",
            s.offset()
        )));
    }
    let need4 = need.max(4).next_multiple_of(4);
    if s.size() < need || b.size() - s.offset() < need4 {
        return Err(XentError::Shape(format!(
            "{what} slice has {} bytes, needs {need} (and {need4} bytes to the buffer's end)",
            s.size()
        )));
    }
    Ok(())
}

/// How a row kernel may read rows of `v` elements split into segments of `seg_len` columns
/// (`v` for whole rows), given every row tensor it binds as (dtype, byte offset), the input
/// first: `(vec4, vec8)`. Vectors of four need `v` and `seg_len` multiples of 4 and each tensor
/// at an offset that is a multiple of four of its elements (the bound chunks then start rows on
/// vector boundaries); 16-byte loads of eight 16-bit values (`wide`: the context's
/// `wide_loads`) need 16-bit input, multiples of 8 and 16-byte aligned offsets.
pub(crate) fn row_vectors(wide: bool, v: usize, seg_len: usize, rows: &[(DType, u64)]) -> (bool, bool) {
    let vec4 = v.is_multiple_of(4)
        && seg_len.is_multiple_of(4)
        && rows.iter().all(|&(d, off)| off.is_multiple_of(4 * d.size() as u64));
    let vec8 = vec4
        && wide
        && rows.first().is_some_and(|r| r.0 != DType::F32)
        && v.is_multiple_of(8)
        && seg_len.is_multiple_of(8)
        && rows.iter().all(|&(_, off)| off.is_multiple_of(16));
    (vec4, vec8)
}

/// Where a row kernel's output (slot 8) goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowOut {
    /// f32 `[N, V]`, chunked with the input.
    Rows,
    /// f32 `[N, k]`, bound whole.
    Whole(usize),
}

/// A one-workgroup-per-row kernel of one shape (`input` rows, optionally `second` rows of the
/// same shape), recorded into a caller's encoder: the plan owns its per-row values and its
/// parameter blocks. The host API (`run_rows`) and the public recorded plans are built on it.
pub(crate) struct RowPlan {
    pub ctx: GpuContext,
    shader: Shader,
    base: AnyBlock,
    pub n: usize,
    pub v: usize,
    input: DType,
    second: Option<DType>,
    /// f32 values per row written to `row_values` (slot 6).
    row_values: usize,
    pub rows: Pooled,
    params: ParamsCache,
}

impl RowPlan {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: &GpuContext,
        shader: Shader,
        base: impl Into<AnyBlock>,
        (n, v): (usize, usize),
        input: DType,
        second: Option<DType>,
        row_values: usize,
        pooled: bool,
    ) -> Result<RowPlan> {
        if v == 0 {
            return Err(XentError::Shape(format!("[{n}, 0] rows have no classes")));
        }
        let bytes = ((n * row_values) as u64 * 4).max(4);
        let usage = U::STORAGE | U::COPY_SRC;
        let rows = if pooled { ctx.take(bytes, usage, "row values")? } else { ctx.owned(bytes, usage, "row values")? };
        Ok(RowPlan {
            ctx: ctx.clone(),
            shader,
            base: {
                let mut base = base.into();
                base.head.n_rows = n as u32;
                base
            },
            n,
            v,
            input,
            second,
            row_values,
            rows,
            params: ParamsCache::new(pooled),
        })
    }

    /// The row kernel's launch over device slices (checked).
    pub fn launch<'a>(
        &'a self,
        input: wgpu::BufferSlice<'a>,
        second: Option<wgpu::BufferSlice<'a>>,
        out: Option<(wgpu::BufferSlice<'a>, RowOut)>,
    ) -> Result<Launch<'a>> {
        let (n, v) = (self.n, self.v);
        let nv = (n * v) as u64;
        let elem = self.input.size() as u64;
        check_slice(input, nv * elem, 4u64.max(elem), "input rows")?;
        if let (Some(s), Some(d)) = (second, self.second) {
            check_slice(s, nv * d.size() as u64, 4u64.max(d.size() as u64), "second rows")?;
        } else if second.is_some() != self.second.is_some() {
            return Err(XentError::InvalidOption("second rows given to a plan without them, or missing".into()));
        }
        // Vector reads in the row kernels that have them, where the tensors' offsets allow.
        let mut rows = vec![(self.input, input.offset())];
        rows.extend(second.zip(self.second).map(|(s, d)| (d, s.offset())));
        if let Some((o, RowOut::Rows)) = out {
            rows.push((DType::F32, o.offset()));
        }
        let (vec4, vec8) = row_vectors(self.ctx.inner.wide_loads, v, v, &rows);
        let vectors = matches!(self.shader, Shader::LogSoftmax | Shader::RowSum);
        let variant = Variant {
            input: self.input,
            second: self.second.unwrap_or(DType::F32),
            vec4: vectors && vec4,
            vec8: vectors && vec8,
            subgroup: self.ctx.inner.subgroups,
            grad: out.is_some(),
            wg: self.ctx.ce_layout(n, v, true).0,
            ..Default::default()
        };
        let kernel = self.ctx.kernel(self.shader, variant)?;
        let mut l =
            Launch::new(kernel, self.base, n, v).rows(1, input.buffer(), input.offset(), self.input.size(), Skip::X);
        if let (Some(s), Some(d)) = (second, self.second) {
            l = l.rows(9, s.buffer(), s.offset(), d.size(), Skip::Y);
        }
        if self.row_values > 0 {
            l = l.bind(6, Bind::first(&self.rows, (n * self.row_values) as u64 * 4));
        }
        match out {
            Some((o, RowOut::Rows)) => {
                check_slice(o, nv * 4, 4, "output rows")?;
                l = l.rows(8, o.buffer(), o.offset(), 4, Skip::O);
            }
            Some((o, RowOut::Whole(k))) => {
                check_slice(o, (n * k) as u64 * 4, self.ctx.inner.offset_align, "output")?;
                l = l.bind(8, Bind::slice(o));
            }
            None => {}
        }
        Ok(l)
    }

    /// Records `launches` into one compute pass of `enc`.
    pub fn record(&self, enc: &mut wgpu::CommandEncoder, launches: Vec<Launch<'_>>) -> Result<()> {
        let mut rec = Recorder::new(&self.ctx);
        for l in launches {
            rec.push(l)?;
        }
        let params = self.params.get(&rec)?;
        rec.record(enc, &params)
    }
}

/// A one-workgroup-per-row kernel over host rows: `input` (and `second`) uploaded, results
/// read back.
pub(crate) struct RowJob<'a> {
    pub shader: Shader,
    pub base: AnyBlock,
    pub input: Logits<'a>,
    pub second: Option<Logits<'a>>,
    /// f32 values per row written to `row_values` (slot 6).
    pub row_values: usize,
    /// An f32 output in slot 8.
    pub out: Option<RowOut>,
}

/// What a [`RowJob`] returns.
pub(crate) struct RowResult {
    pub row_values: Vec<f32>,
    pub out_rows: Option<Array2<f32>>,
    pub out_whole: Vec<f32>,
}

impl GpuContext {
    /// Uploads a [`RowJob`]'s rows, records it on a pooled [`RowPlan`], waits, reads back.
    pub(crate) fn run_rows(&self, job: RowJob<'_>) -> Result<RowResult> {
        let (n, v) = job.input.dim();
        if n == 0 {
            return Ok(RowResult {
                row_values: vec![],
                out_rows: (job.out == Some(RowOut::Rows)).then(|| Array2::zeros((0, v))),
                out_whole: vec![],
            });
        }
        let second = job.second.map(|s| s.dtype());
        let plan = RowPlan::new(self, job.shader, job.base, (n, v), job.input.dtype(), second, job.row_values, true)?;
        let xb = self.upload(&job.input.bytes(), U::STORAGE, "input rows")?;
        let yb = job.second.map(|s| self.upload(&s.bytes(), U::STORAGE, "second rows")).transpose()?;
        let out_bytes = match job.out {
            Some(RowOut::Rows) => (n * v) as u64 * 4,
            Some(RowOut::Whole(k)) => (n * k) as u64 * 4,
            None => 0,
        };
        let ob = job.out.map(|_| self.take(out_bytes, U::STORAGE | U::COPY_SRC, "output")).transpose()?;
        let out = ob.as_ref().zip(job.out).map(|(o, k)| (o.slice(..out_bytes), k));
        let launch = plan.launch(xb.slice(..), yb.as_ref().map(|y| y.slice(..)), out)?;
        let mut enc = self.device().create_command_encoder(&Default::default());
        plan.record(&mut enc, vec![launch])?;
        self.submit_wait(enc)?;
        let mut row_values = vec![0f32; n * job.row_values];
        self.read_back(&plan.rows, 0, bytemuck::cast_slice_mut(&mut row_values), None)?;
        let mut out_rows = None;
        let mut out_whole = vec![];
        match (&ob, job.out) {
            (Some(o), Some(RowOut::Rows)) => {
                let mut a = crate::alloc::zeros2::<f32>((n, v), "output")?;
                self.read_back(o, 0, bytemuck::cast_slice_mut(a.as_slice_mut().expect("fresh")), None)?;
                out_rows = Some(a);
            }
            (Some(o), Some(RowOut::Whole(k))) => {
                out_whole = vec![0f32; n * k];
                self.read_back(o, 0, bytemuck::cast_slice_mut(&mut out_whole), None)?;
            }
            _ => {}
        }
        Ok(RowResult { row_values, out_rows, out_whole })
    }
}

#[cfg(test)]
mod tests {
    use super::row_vectors;
    use crate::dtype::DType::{BF16, F16, F32};

    #[test]
    fn row_vectors_need_lengths_and_offsets_that_fit() {
        // 16-byte loads: 16-bit rows, V and segments multiples of 8, 16-byte aligned offsets.
        assert_eq!(row_vectors(true, 32000, 32000, &[(BF16, 0)]), (true, true));
        assert_eq!(row_vectors(true, 32000, 32000, &[(F16, 16), (F16, 48)]), (true, true));
        assert_eq!(row_vectors(true, 32000, 32000, &[(BF16, 0), (F32, 32)]), (true, true));
        assert_eq!(row_vectors(true, 32000, 4096, &[(BF16, 0)]), (true, true));
        // ... and not otherwise: the option off, f32 input, V or a segment 4 mod 8, an offset.
        assert_eq!(row_vectors(false, 32000, 32000, &[(BF16, 0)]), (true, false));
        assert_eq!(row_vectors(true, 32000, 32000, &[(F32, 0)]), (true, false));
        assert_eq!(row_vectors(true, 1004, 1004, &[(BF16, 0)]), (true, false));
        assert_eq!(row_vectors(true, 32000, 100, &[(BF16, 0)]), (true, false));
        assert_eq!(row_vectors(true, 32000, 32000, &[(BF16, 8)]), (true, false));
        assert_eq!(row_vectors(true, 32000, 32000, &[(BF16, 0), (F32, 48), (BF16, 8)]), (true, false));
        // Vectors of four need each tensor at a multiple of four of its elements.
        assert_eq!(row_vectors(true, 32, 32, &[(F32, 12)]), (false, false));
        assert_eq!(row_vectors(true, 32, 32, &[(BF16, 4)]), (false, false));
        assert_eq!(row_vectors(true, 32, 32, &[(F32, 16), (BF16, 4)]), (false, false));
        assert_eq!(row_vectors(true, 1002, 1002, &[(BF16, 0)]), (false, false));
    }
}
