//! The one way a kernel is launched. A [`Launch`] names a kernel variant, its base parameters
//! (any family's [`Block`](super::params::Block): the launch rewrites only the chunk [`Header`] it starts with),
//! its whole-call bindings (targets, weights, scalars) and its row bindings (tensors of `[N, V]`
//! elements of some dtype); a [`Recorder`] splits every launch into row chunks that each fit
//! one storage binding (bound at offsets rounded down to the device's alignment, the remainder
//! passed to the shader as an element offset), folds each chunk's workgroups into a 2-D grid,
//! writes one parameter block per dispatch and records all of them into one compute pass of
//! the caller's encoder.

use std::sync::Arc;

use super::context::{GpuContext, Kernel, SLOTS};
use super::params::{AnyBlock, Header, PARAM_STRIDE};
use crate::error::{Result, XentError};

/// A byte range of a buffer bound whole.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bind<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
}

impl<'a> Bind<'a> {
    pub fn all(buffer: &'a wgpu::Buffer) -> Self {
        Bind { buffer, offset: 0, size: buffer.size() }
    }
    pub fn first(buffer: &'a wgpu::Buffer, size: u64) -> Self {
        Bind { buffer, offset: 0, size: size.max(4).next_multiple_of(4) }
    }
    pub fn slice(s: wgpu::BufferSlice<'a>) -> Self {
        Bind { buffer: s.buffer(), offset: s.offset(), size: s.size() }
    }
}

/// Which parameter receives a row binding's element offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Skip {
    X,
    Y,
    O,
}

/// A tensor of `[N, V]` elements of `elem` bytes starting at byte `offset` of `buffer`.
#[derive(Debug, Clone, Copy)]
struct RowsBind<'a> {
    slot: usize,
    buffer: &'a wgpu::Buffer,
    offset: u64,
    elem: u64,
    skip: Skip,
}

/// How many workgroups a chunk of rows takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Groups {
    /// One per row.
    PerRow,
    /// This many per row (rows split into segments).
    PerRowTimes(usize),
    /// One per this many elements.
    Elements(usize),
    /// One for the whole call.
    One,
}

/// One kernel dispatch (split into chunks when its rows exceed a binding).
pub(crate) struct Launch<'a> {
    kernel: Arc<Kernel>,
    /// The base block (its header rewritten per chunk).
    base: AnyBlock,
    n: usize,
    v: usize,
    whole: Vec<(usize, Bind<'a>)>,
    rows: Vec<RowsBind<'a>>,
    groups: Groups,
}

impl<'a> Launch<'a> {
    /// A launch of `kernel` over `n` rows of `v` elements with parameters `base` (the
    /// kernel's family's block).
    pub fn new(kernel: Arc<Kernel>, base: impl Into<AnyBlock>, n: usize, v: usize) -> Self {
        Launch { kernel, base: base.into(), n, v, whole: Vec::new(), rows: Vec::new(), groups: Groups::PerRow }
    }

    /// Binds a byte range to `slot` for every chunk.
    pub fn bind(mut self, slot: usize, b: Bind<'a>) -> Self {
        self.whole.push((slot, b));
        self
    }

    /// Binds a `[N, V]` tensor of `elem`-byte elements at `offset` to `slot`, chunked with the
    /// launch; its element offset goes to the parameter `skip`.
    pub fn rows(mut self, slot: usize, buffer: &'a wgpu::Buffer, offset: u64, elem: usize, skip: Skip) -> Self {
        self.rows.push(RowsBind { slot, buffer, offset, elem: elem as u64, skip });
        self
    }

    pub fn groups(mut self, g: Groups) -> Self {
        self.groups = g;
        self
    }
}

/// A chunk of a launch: its header, the binding range of each row tensor, its grid.
struct Planned {
    head: Header,
    ranges: Vec<(u64, u64)>,
    grid: (u32, u32),
}

/// Launches planned into chunks, ready to record.
pub(crate) struct Recorder<'a> {
    ctx: &'a GpuContext,
    runs: Vec<(Launch<'a>, Vec<Planned>)>,
}

/// Workgroup grid `(x, y)` covering `groups` workgroups.
fn grid(ctx: &GpuContext, groups: usize) -> Result<(u32, u32)> {
    let max = ctx.inner.max_groups as usize;
    let x = groups.clamp(1, max);
    let y = groups.div_ceil(x);
    if y > max {
        return Err(XentError::TooLarge {
            what: "workgroup grid".into(),
            bytes: groups as u64,
            limit: (max * max) as u64,
        });
    }
    Ok((x as u32, y as u32))
}

impl<'a> Recorder<'a> {
    pub fn new(ctx: &'a GpuContext) -> Self {
        Recorder { ctx, runs: Vec::new() }
    }

    /// Plans `l` into chunks that each fit one binding of every row tensor.
    pub fn push(&mut self, l: Launch<'a>) -> Result<()> {
        let ctx = self.ctx;
        let (n, v) = (l.n, l.v);
        let align = ctx.inner.offset_align;
        let elem = l.rows.iter().map(|r| r.elem).max().unwrap_or(0);
        let row_bytes = v as u64 * elem;
        let per = if row_bytes == 0 || row_bytes * n as u64 + align <= ctx.inner.max_binding {
            n.max(1)
        } else {
            let per = ctx.inner.max_binding.saturating_sub(align) / row_bytes;
            if per == 0 {
                return Err(XentError::TooLarge {
                    what: format!("one row of {v} elements"),
                    bytes: row_bytes + align,
                    limit: ctx.inner.max_binding,
                });
            }
            per as usize
        };
        let mut planned = Vec::new();
        let mut part_off = 0usize;
        let mut row0 = 0usize;
        loop {
            let rows = per.min(n - row0);
            let mut head = Header { row0: row0 as u32, chunk_rows: rows as u32, ..l.base.head };
            let mut ranges = Vec::new();
            for rb in &l.rows {
                let start = rb.offset + (row0 * v) as u64 * rb.elem;
                let off = start / align * align;
                let skip = ((start - off) / rb.elem) as u32;
                let size = ((start - off) + (rows * v) as u64 * rb.elem).max(4).next_multiple_of(4);
                let size = size.min(rb.buffer.size() - off);
                match rb.skip {
                    Skip::X => head.x_off = skip,
                    Skip::Y => head.y_off = skip,
                    Skip::O => head.o_off = skip,
                }
                ranges.push((off, size));
            }
            let groups = match l.groups {
                Groups::PerRow => rows,
                Groups::PerRowTimes(k) => rows * k,
                Groups::Elements(per_group) => (rows * v).div_ceil(per_group),
                Groups::One => 1,
            };
            let g = grid(ctx, groups)?;
            head.grid_x = g.0;
            head.part_off = part_off as u32;
            part_off += groups;
            planned.push(Planned { head, ranges, grid: g });
            row0 += rows;
            if row0 >= n || l.rows.is_empty() {
                break;
            }
        }
        self.runs.push((l, planned));
        Ok(())
    }

    /// Every chunk's header, in dispatch order.
    pub fn headers(&self) -> Vec<Header> {
        self.runs.iter().flat_map(|(_, p)| p.iter().map(|c| c.head)).collect()
    }

    /// The blocks laid out `PARAM_STRIDE` apart, as the uniform buffer holds them: each
    /// chunk's header followed by its launch's own parameters.
    pub fn block_bytes(&self) -> Vec<u8> {
        let count: usize = self.runs.iter().map(|(_, p)| p.len()).sum();
        let mut bytes = vec![0u8; PARAM_STRIDE as usize * count.max(1)];
        let h = std::mem::size_of::<Header>();
        let chunks = self.runs.iter().flat_map(|(l, p)| p.iter().map(move |c| (l, c)));
        for (i, (l, c)) in chunks.enumerate() {
            let o = i * PARAM_STRIDE as usize;
            bytes[o..o + h].copy_from_slice(bytemuck::bytes_of(&c.head));
            bytes[o + h..o + h + l.base.tail().len()].copy_from_slice(l.base.tail());
        }
        bytes
    }

    /// A uniform buffer holding the blocks, for this recording alone (created mapped, so its
    /// contents are in place whenever the caller submits).
    pub fn params_buffer(&self) -> Result<wgpu::Buffer> {
        self.ctx.buffer_init(&self.block_bytes(), wgpu::BufferUsages::UNIFORM, "xent params")
    }

    /// The blocks in a pooled uniform buffer written through the queue: for calls that submit
    /// and wait before the buffer can go back to the pool.
    pub fn params_pooled(&self) -> Result<crate::gpu::pool::Pooled> {
        self.ctx.upload(&self.block_bytes(), wgpu::BufferUsages::UNIFORM, "xent params")
    }

    /// Records every launch into one compute pass of `enc`, with parameter blocks read from
    /// `params` (laid out as [`Self::block_bytes`]).
    pub fn record(&self, enc: &mut wgpu::CommandEncoder, params: &wgpu::Buffer) -> Result<()> {
        let ctx = self.ctx;
        let groups: Vec<Vec<wgpu::BindGroup>> = ctx.scoped(|| {
            let mut block = 0u64;
            self.runs
                .iter()
                .map(|(l, planned)| {
                    planned
                        .iter()
                        .map(|c| {
                            let mut slots: [Option<Bind>; SLOTS] = [None; SLOTS];
                            for &(slot, b) in &l.whole {
                                slots[slot] = Some(b);
                            }
                            for (rb, &(off, size)) in l.rows.iter().zip(&c.ranges) {
                                slots[rb.slot] = Some(Bind { buffer: rb.buffer, offset: off, size });
                            }
                            fn resource(b: Bind<'_>) -> wgpu::BindingResource<'_> {
                                wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                    buffer: b.buffer,
                                    offset: b.offset,
                                    size: std::num::NonZeroU64::new(b.size),
                                })
                            }
                            let mut entries = vec![wgpu::BindGroupEntry {
                                binding: 0,
                                resource: resource(Bind {
                                    buffer: params,
                                    offset: block * PARAM_STRIDE,
                                    size: l.base.size(),
                                }),
                            }];
                            entries.extend(l.kernel.bindings.iter().map(|&i| wgpu::BindGroupEntry {
                                binding: i as u32,
                                resource: match slots[i] {
                                    Some(b) => resource(b),
                                    None => ctx.placeholder(i).as_entire_binding(),
                                },
                            }));
                            block += 1;
                            ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
                                label: None,
                                layout: &l.kernel.layout,
                                entries: &entries,
                            })
                        })
                        .collect()
                })
                .collect()
        })?;
        let mut pass = enc.begin_compute_pass(&Default::default());
        for ((l, planned), bgs) in self.runs.iter().zip(&groups) {
            pass.set_pipeline(&l.kernel.pipeline);
            for (c, bg) in planned.iter().zip(bgs) {
                pass.set_bind_group(0, bg, &[]);
                pass.dispatch_workgroups(c.grid.0, c.grid.1, 1);
            }
        }
        Ok(())
    }
}

/// A plan's parameter blocks: its own uniform buffer, or a pooled one for the host API.
pub(crate) enum ParamsBuf {
    Owned(wgpu::Buffer),
    Pooled(crate::gpu::pool::Pooled),
}

impl std::ops::Deref for ParamsBuf {
    type Target = wgpu::Buffer;
    fn deref(&self) -> &wgpu::Buffer {
        match self {
            ParamsBuf::Owned(b) => b,
            ParamsBuf::Pooled(b) => b,
        }
    }
}

/// The parameter blocks of a plan's last recording and their buffer: a new buffer when they
/// change, never an overwrite (an earlier record may still be waiting for its submission).
pub(crate) struct ParamsCache {
    last: std::sync::Mutex<Option<(Vec<u8>, Arc<ParamsBuf>)>>,
    /// Pooled buffers (the host API, which waits before the plan drops).
    pooled: bool,
}

impl ParamsCache {
    pub fn new(pooled: bool) -> Self {
        ParamsCache { last: std::sync::Mutex::new(None), pooled }
    }

    /// The buffer holding `rec`'s blocks.
    pub fn get(&self, rec: &Recorder<'_>) -> Result<Arc<ParamsBuf>> {
        let bytes = rec.block_bytes();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((b, buf)) = last.as_ref() {
            if *b == bytes {
                return Ok(buf.clone());
            }
        }
        let buf = Arc::new(if self.pooled {
            ParamsBuf::Pooled(rec.params_pooled()?)
        } else {
            ParamsBuf::Owned(rec.params_buffer()?)
        });
        *last = Some((bytes, buf.clone()));
        Ok(buf)
    }
}
