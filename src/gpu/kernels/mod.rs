//! GPU kernels: one module per operation, each only its parameters and its launches; the
//! launching itself is [`crate::gpu::launch`].

pub(crate) mod bce;
pub(crate) mod cross_entropy;
pub(crate) mod divergence;
pub(crate) mod hessian;
pub(crate) mod log_softmax;

use ndarray::Array2;

use crate::dtype::{DType, Logits};
use crate::error::Result;
use crate::gpu::context::GpuContext;
use crate::gpu::launch::{Bind, Launch, Recorder, Skip};
use crate::gpu::params::Params;
use crate::gpu::source::{Shader, Variant};

use wgpu::BufferUsages as U;

/// A one-workgroup-per-row kernel over host rows: `input` (and `second`) uploaded, results
/// read back.
pub(crate) struct RowJob<'a> {
    pub shader: Shader,
    pub base: Params,
    pub input: Logits<'a>,
    pub second: Option<Logits<'a>>,
    /// f32 values per row written to `row_values` (slot 6).
    pub row_values: usize,
    /// An f32 `[N, V]` output in slot 8, chunked like the input.
    pub out_rows: bool,
    /// Or this many f32 per row in slot 8, bound whole.
    pub out_whole: usize,
}

/// What a [`RowJob`] returns.
pub(crate) struct RowResult {
    pub row_values: Vec<f32>,
    pub out_rows: Option<Array2<f32>>,
    pub out_whole: Vec<f32>,
}

impl GpuContext {
    pub(crate) fn run_rows(&self, job: RowJob<'_>) -> Result<RowResult> {
        let (n, v) = job.input.dim();
        if n == 0 {
            return Ok(RowResult {
                row_values: vec![],
                out_rows: job.out_rows.then(|| Array2::zeros((0, v))),
                out_whole: vec![],
            });
        }
        let variant = Variant {
            input: job.input.dtype(),
            second: job.second.map_or(DType::F32, |s| s.dtype()),
            vec4: job.shader == Shader::LogSoftmax && v % 4 == 0,
            subgroup: self.subgroups,
            grad: job.out_rows || job.out_whole > 0,
            ..Default::default()
        };
        let kernel = self.kernel(job.shader, variant)?;
        let xb = self.upload(&job.input.bytes(), U::STORAGE, "input rows")?;
        let yb = job.second.map(|s| self.upload(&s.bytes(), U::STORAGE, "second rows")).transpose()?;
        let rv_bytes = (n * job.row_values) as u64 * 4;
        let rb = self.take(rv_bytes.max(4), U::STORAGE | U::COPY_SRC, "row values")?;
        let ow_bytes = (n * job.out_whole) as u64 * 4;
        let out_bytes = if job.out_rows { (n * v) as u64 * 4 } else { ow_bytes };
        let ob = (out_bytes > 0).then(|| self.take(out_bytes, U::STORAGE | U::COPY_SRC, "output")).transpose()?;
        let mut l = Launch::new(kernel, Params { n_rows: n as u32, ..job.base }, n, v).rows(
            1,
            &xb,
            0,
            variant.input.size(),
            Skip::X,
        );
        if let Some(y) = &yb {
            l = l.rows(9, y, 0, variant.second.size(), Skip::Y);
        }
        if job.row_values > 0 {
            l = l.bind(6, Bind::first(&rb, rv_bytes));
        }
        match (&ob, job.out_rows) {
            (Some(o), true) => l = l.rows(8, o, 0, 4, Skip::O),
            (Some(o), false) => l = l.bind(8, Bind::first(o, ow_bytes)),
            (None, _) => {}
        }
        let mut rec = Recorder::new(self);
        rec.push(l)?;
        let params = rec.params_pooled()?;
        let mut enc = self.device.create_command_encoder(&Default::default());
        rec.record(&mut enc, &params)?;
        self.submit_wait(enc)?;
        let mut row_values = vec![0f32; n * job.row_values];
        self.read_back(&rb, 0, bytemuck::cast_slice_mut(&mut row_values), None)?;
        let mut out_rows = None;
        let mut out_whole = vec![];
        if let Some(o) = &ob {
            if job.out_rows {
                let mut a = crate::alloc::zeros2::<f32>((n, v), "output")?;
                self.read_back(o, 0, bytemuck::cast_slice_mut(a.as_slice_mut().expect("fresh")), None)?;
                out_rows = Some(a);
            } else {
                out_whole = vec![0f32; n * job.out_whole];
                self.read_back(o, 0, bytemuck::cast_slice_mut(&mut out_whole), None)?;
            }
        }
        Ok(RowResult { row_values, out_rows, out_whole })
    }
}
