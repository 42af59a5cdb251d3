//! GPU kernels: one module per operation, each recording its dispatches on a [`GpuContext`].
//!
//! Large tensors are split into row chunks that each fit one storage binding, bound at
//! aligned offsets; rows of a chunk are folded into a 2-D grid of at most 65,535 x 65,535
//! workgroups.

pub(crate) mod cross_entropy;
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
    pub _pad: [u32; 3],
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
}

/// Bytes between per-dispatch parameter blocks in the uniform buffer.
pub(crate) const PARAM_STRIDE: u64 = 256;

/// A run of rows bound as one storage binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Chunk {
    pub row0: usize,
    pub rows: usize,
}

/// Splits `n` rows of `v` f32 into chunks that fit one binding at an aligned offset.
pub(crate) fn row_chunks(ctx: &GpuContext, n: usize, v: usize, what: &str) -> Result<Vec<Chunk>> {
    let row_bytes = v as u64 * 4;
    let total = row_bytes * n as u64;
    if total > ctx.max_buffer {
        return Err(XentError::TooLarge { what: what.into(), bytes: total, limit: ctx.max_buffer });
    }
    if total <= ctx.max_binding {
        return Ok(vec![Chunk { row0: 0, rows: n }]);
    }
    // Chunk starts must sit on the offset alignment: a multiple of q rows does.
    let align = ctx.offset_align.max(16);
    let q = align / gcd(row_bytes, align);
    let per = (ctx.max_binding / row_bytes) / q * q;
    if per == 0 {
        return Err(XentError::TooLarge {
            what: format!("one row of {what} ({v} classes, in aligned groups of {q} rows)"),
            bytes: row_bytes * q,
            limit: ctx.max_binding,
        });
    }
    let per = per as usize;
    Ok((0..n).step_by(per).map(|row0| Chunk { row0, rows: per.min(n - row0) }).collect())
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
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

/// Builds a bind group over the shared slot table, with placeholders for empty slots.
pub(crate) fn bind_group(
    ctx: &GpuContext,
    layout: &wgpu::BindGroupLayout,
    slots: [Option<wgpu::BindingResource<'_>>; 9],
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry> = slots
        .into_iter()
        .enumerate()
        .map(|(i, r)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource: r.unwrap_or_else(|| ctx.placeholder(i).as_entire_binding()),
        })
        .collect();
    ctx.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout, entries: &entries })
}
