//! GPU kernels: one module per operation, each recording its dispatches on a [`GpuContext`].
//!
//! Large tensors are split into row chunks that each fit one storage binding, bound at
//! aligned offsets; rows of a chunk are folded into a 2-D grid of at most 65,535 x 65,535
//! workgroups.

pub(crate) mod bce;
pub(crate) mod cross_entropy;
pub(crate) mod divergence;
pub(crate) mod hessian;
pub(crate) mod log_softmax;
pub mod source;

use bytemuck::{Pod, Zeroable};

use crate::context::GpuContext;
use crate::error::{Result, XentError};

/// Kernel parameters; mirrors `Params` in `shaders/common.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct Params {
    pub n_rows: u32,
    pub v: u32,
    pub row0: u32,
    pub grid_x: u32,
    pub chunk_rows: u32,
    pub ignore_index: i32,
    pub flags: u32,
    pub neg_inf: f32,
    pub smoothing: f32,
    pub z_loss: f32,
    pub softcap: f32,
    pub inv_temp: f32,
    pub grad_scale: f32,
    pub x_off: u32,
    pub part_off: u32,
    pub _pad: u32,
}

pub(crate) mod flags {
    pub const CLASS_W: u32 = 1;
    pub const SAMPLE_W: u32 = 2;
    pub const SOFTCAP: u32 = 4;
    pub const TEMP: u32 = 8;
    pub const SMOOTH: u32 = 16;
    pub const MEAN: u32 = 32;
    pub const SOFTMAX: u32 = 64;
    pub const ZLOSS: u32 = 128;
    pub const SOFT: u32 = 256;
    pub const POS_W: u32 = 512;
    pub const PROBS: u32 = 1024;
    pub const ELEM: u32 = 2048;
    pub const LOGITS: u32 = 4096;
    pub const RANK: u32 = 8192;
    pub const GAP: u32 = 16384;
}

/// Bytes between per-dispatch parameter blocks in the uniform buffer.
pub(crate) const PARAM_STRIDE: u64 = 256;

impl Params {
    /// Parameters of a kernel over `n` rows of `v`: no flags, no transform, unit scale.
    pub(crate) fn new(n: usize, v: usize) -> Params {
        Params {
            n_rows: n as u32,
            v: v as u32,
            row0: 0,
            grid_x: 1,
            chunk_rows: 0,
            ignore_index: 0,
            flags: 0,
            neg_inf: f32::NEG_INFINITY,
            smoothing: 0.0,
            z_loss: 0.0,
            softcap: 1.0,
            inv_temp: 1.0,
            grad_scale: 1.0,
            x_off: 0,
            part_off: 0,
            _pad: 0,
        }
    }

    /// This block for chunk `c` dispatched as `groups` workgroups.
    pub(crate) fn for_chunk(self, ctx: &GpuContext, c: &Chunk, groups: usize) -> Params {
        Params { row0: c.row0 as u32, chunk_rows: c.rows as u32, grid_x: grid(ctx, groups).0, x_off: c.skip, ..self }
    }
}

/// Uploads one parameter block per dispatch, `PARAM_STRIDE` apart (see [`param_binding`]).
pub(crate) fn upload_params(ctx: &GpuContext, blocks: &[Params]) -> Result<wgpu::Buffer> {
    let mut bytes = vec![0u8; PARAM_STRIDE as usize * blocks.len()];
    for (i, p) in blocks.iter().enumerate() {
        let o = i * PARAM_STRIDE as usize;
        bytes[o..o + std::mem::size_of::<Params>()].copy_from_slice(bytemuck::bytes_of(p));
    }
    ctx.upload(&bytes, wgpu::BufferUsages::UNIFORM, "params")
}

/// The binding of parameter block `i` of a buffer from [`upload_params`].
pub(crate) fn param_binding(buf: &wgpu::Buffer, i: usize) -> wgpu::BindingResource<'_> {
    bind(buf, i as u64 * PARAM_STRIDE, std::mem::size_of::<Params>() as u64)
}

/// Records `kernel` once per `(workgroups, bind group)`, each grid folded into two dimensions.
pub(crate) fn dispatch(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    kernel: &crate::context::Kernel,
    runs: &[(usize, &wgpu::BindGroup)],
) {
    pass.set_pipeline(&kernel.pipeline);
    for &(groups, bg) in runs {
        let (gx, gy) = grid(ctx, groups);
        pass.set_bind_group(0, bg, &[]);
        pass.dispatch_workgroups(gx, gy, 1);
    }
}

/// A run of rows bound as one storage binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Chunk {
    pub row0: usize,
    pub rows: usize,
    /// Binding offset in bytes: the chunk start rounded down to the offset alignment.
    pub offset: u64,
    /// Elements from `offset` to the chunk's first row (`Params::x_off`).
    pub skip: u32,
}

impl Chunk {
    /// Bytes to bind: the skipped lead-in plus the chunk's rows.
    pub fn size(&self, v: usize) -> u64 {
        self.skip as u64 * 4 + (self.rows * v) as u64 * 4
    }
}

/// Splits `n` rows of `v` f32 into chunks that each fit one storage binding. Chunks are bound
/// at offsets rounded down to the alignment, so any row length works.
pub(crate) fn row_chunks(ctx: &GpuContext, n: usize, v: usize, what: &str) -> Result<Vec<Chunk>> {
    let row_bytes = v as u64 * 4;
    let total = row_bytes * n as u64;
    if total > ctx.max_buffer {
        return Err(XentError::TooLarge { what: what.into(), bytes: total, limit: ctx.max_buffer });
    }
    if total <= ctx.max_binding {
        return Ok(vec![Chunk { row0: 0, rows: n, offset: 0, skip: 0 }]);
    }
    let align = ctx.offset_align.max(16);
    let per = ctx.max_binding.saturating_sub(align) / row_bytes;
    if per == 0 {
        return Err(XentError::TooLarge {
            what: format!("one row of {what} ({v} classes)"),
            bytes: row_bytes + align,
            limit: ctx.max_binding,
        });
    }
    let per = per as usize;
    Ok((0..n)
        .step_by(per)
        .map(|row0| {
            let start = row0 as u64 * row_bytes;
            let offset = start / align * align;
            Chunk { row0, rows: per.min(n - row0), offset, skip: ((start - offset) / 4) as u32 }
        })
        .collect())
}

/// Workgroup grid `(x, y)` covering `rows` workgroups.
pub(crate) fn grid(ctx: &GpuContext, rows: usize) -> (u32, u32) {
    let x = rows.clamp(1, ctx.max_groups as usize);
    (x as u32, rows.div_ceil(x) as u32)
}

/// A binding of `size` bytes of `buf` at `offset`.
pub(crate) fn bind(buf: &wgpu::Buffer, offset: u64, size: u64) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer: buf, offset, size: std::num::NonZeroU64::new(size) })
}

/// Builds a bind group for `kernel` from the shared slot table: the slots its layout has, with
/// placeholders for those left empty (a flag tells the shader not to touch them).
pub(crate) fn bind_group(
    ctx: &GpuContext,
    kernel: &crate::context::Kernel,
    mut slots: [Option<wgpu::BindingResource<'_>>; crate::context::SLOTS],
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry> = std::iter::once(0)
        .chain(kernel.bindings.iter().copied())
        .map(|i| wgpu::BindGroupEntry {
            binding: i as u32,
            resource: slots[i].take().unwrap_or_else(|| ctx.placeholder(i).as_entire_binding()),
        })
        .collect();
    ctx.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &kernel.layout, entries: &entries })
}
