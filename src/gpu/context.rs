//! The GPU context: adapter, device and queue, the pipeline cache, the buffer pool, and the
//! translation of wgpu errors and device loss into [`XentError`].
//!
//! A context is a guest on its device: [`GpuContext::from_device`] wraps a device the caller
//! already uses (a training loop, Burn) without installing callbacks. Errors are caught with
//! error scopes around every call xent makes, and device loss is recognised from the errors and
//! failed maps it causes, so the caller's own device-lost and uncaptured-error handlers keep
//! working and several contexts can share one device.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::pool::{size_class, Pool, PoolStats, Pooled};
use super::variant::{Shader, Variant};
use crate::error::{GpuSource, Result, XentError};

/// Options for creating a [`GpuContext`].
///
/// Built from [`Default`] with the `with_*` builders or by assigning fields (the struct is
/// `#[non_exhaustive]`, so that new options are not breaking changes):
///
/// ```
/// use xent::GpuOptions;
/// let opts = GpuOptions::default().with_subgroups(false).with_max_binding_bytes(1 << 20);
/// let mut same = GpuOptions::default();
/// same.subgroups = false;
/// same.max_binding_bytes = Some(1 << 20);
/// assert_eq!(opts, same);
/// // let ctx = xent::GpuContext::with_options(opts)?;
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct GpuOptions {
    /// Use subgroup operations when the device has them (otherwise workgroup memory).
    pub subgroups: bool,
    /// Cap on one storage binding, below the device's own limit (tests use it to force chunking).
    pub max_binding_bytes: Option<u64>,
    /// Which adapter to prefer.
    pub power_preference: wgpu::PowerPreference,
    /// Bytes of free buffers the pool may keep. `None`: twice the largest recent working set
    /// (at least 16 MiB).
    pub pool_budget_bytes: Option<u64>,
    /// Split cross-entropy rows longer than this into segments of this many columns (rounded
    /// up to a multiple of 4), each its own workgroup. `None`: chosen from the shape and the
    /// adapter.
    pub segment_len: Option<usize>,
    /// Invocations per workgroup of the row kernels (a power of two, 32 to 1024). `None`:
    /// chosen from the adapter.
    pub workgroup_size: Option<u16>,
    /// Read 16-bit (bf16/f16) rows with 16-byte loads of eight values where the rows allow it
    /// (a multiple of 8 elements, every row tensor at a 16-byte aligned offset, segments a
    /// multiple of 8 columns); other rows take the narrower loads. `Some(false)` keeps 8-byte
    /// loads of four values everywhere (the earlier kernels, for side-by-side comparison),
    /// `Some(true)` asks for the wide loads on any adapter. `None` (the default): wide loads on
    /// GPUs, 8-byte loads on software rasterisers (lavapipe ran its row passes 2-3x slower with
    /// the wide ones).
    pub wide_loads: Option<bool>,
    /// Run the matrix products of the fused linear losses on cooperative matrices (tensor
    /// cores): f16 tiles, each scaled by a power of two so that nothing overflows, with f32
    /// accumulation (relative error about 2^-10 of the sum of |a||b| per output, against
    /// about 2^-24 per term in f32; see `shaders/matmul_coop.wgsl`). Only with
    /// [`GpuContext::with_options`], and only where the adapter lists an f16 x f16 -> f32
    /// configuration of 16 x 16 x 16 (or else 8 x 8 x 8) and has one subgroup size; otherwise
    /// creating the context fails with [`XentError::InvalidOption`]. Off by default (the f32
    /// SIMT kernel).
    pub cooperative_matrix: bool,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            subgroups: true,
            max_binding_bytes: None,
            power_preference: wgpu::PowerPreference::HighPerformance,
            pool_budget_bytes: None,
            segment_len: None,
            workgroup_size: None,
            wide_loads: None,
            cooperative_matrix: false,
        }
    }
}

with_builders!(GpuOptions {
    set with_subgroups => subgroups: bool,
    some with_max_binding_bytes => max_binding_bytes: u64,
    set with_power_preference => power_preference: wgpu::PowerPreference,
    some with_pool_budget_bytes => pool_budget_bytes: u64,
    some with_segment_len => segment_len: usize,
    some with_workgroup_size => workgroup_size: u16,
    some with_wide_loads => wide_loads: bool,
    set with_cooperative_matrix => cooperative_matrix: bool,
});

/// Binding slots a kernel may use (0 is the parameter block; the row kernels' table is in
/// `shaders/rows.wgsl`, the matrix products' in `shaders/matmul_io.wgsl`).
pub(crate) const SLOTS: usize = 15;

pub(crate) struct Kernel {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
    /// Storage slots in the layout (slot 0, the uniform, is always there).
    pub bindings: Vec<usize>,
}

/// A snapshot of what a context has created and holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CounterSnapshot {
    /// Compute pipelines compiled so far.
    pub pipelines: usize,
    /// GPU buffers created so far (pool misses and plan buffers).
    pub buffers: usize,
    /// The buffer pool.
    pub pool: PoolStats,
    /// Bytes copied from the host to the device so far (uploads, parameter blocks).
    pub bytes_to_device: u64,
    /// Bytes read back from the device to the host so far.
    pub bytes_to_host: u64,
    /// Matrix products recorded so far with the SIMT kernel built without runtime bounds
    /// checks (every access proven in range; see `docs/gpu-matmul.md`).
    pub unchecked_products: u64,
}

type PipelineSlot = Arc<Mutex<Option<Arc<Kernel>>>>;

/// What a [`GpuContext`] shares between its clones (private: callers use the context's
/// accessors).
pub(crate) struct Inner {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    adapter_name: String,
    pub(crate) subgroups: bool,
    pub(crate) max_binding: u64,
    pub(crate) offset_align: u64,
    pub(crate) max_buffer: u64,
    pub(crate) max_groups: u32,
    /// A software rasteriser (lavapipe): workgroups run as loops on CPU threads.
    pub(crate) software: bool,
    /// The device's limit on invocations per workgroup.
    pub(crate) max_invocations: u32,
    pub(crate) segment_len: Option<usize>,
    pub(crate) workgroup_size: Option<u16>,
    /// 16-byte loads of 16-bit rows where they apply ([`GpuOptions::wide_loads`]).
    pub(crate) wide_loads: bool,
    /// The matrix product shares A fragments by subgroup broadcast (subgroups in use, and at
    /// least 8 lanes in every subgroup).
    pub(crate) mm_subgroup: bool,
    /// Cooperative-matrix products: (tile size, subgroup size), when asked for and offered.
    pub(crate) coop: Option<(u32, u32)>,
    pipelines: Mutex<HashMap<(Shader, Variant), PipelineSlot>>,
    pool: Pool,
    placeholders: Vec<wgpu::Buffer>,
    lost: Mutex<Option<String>>,
    pipelines_built: AtomicUsize,
    pub(crate) unchecked_products: AtomicU64,
    buffers_built: AtomicUsize,
    pub(crate) bytes_to_device: AtomicU64,
    pub(crate) bytes_to_host: AtomicU64,
}

/// Device, queue and caches shared by every GPU kernel. Cheap to clone (the clones share one
/// device, pipeline cache and pool), and safe to use from several threads.
///
/// ```no_run
/// let ctx = xent::GpuContext::new().expect("a GPU adapter");
/// println!("{}", ctx.adapter_name());
/// ```
#[derive(Clone)]
pub struct GpuContext {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext").field("adapter", &self.inner.adapter_name).finish()
    }
}

/// The features xent uses when the adapter offers them.
pub const FEATURES: wgpu::Features = wgpu::Features::SUBGROUP
    .union(wgpu::Features::SUBGROUP_BARRIER)
    .union(wgpu::Features::SHADER_F16)
    .union(wgpu::Features::TIMESTAMP_QUERY);

/// The cooperative-matrix tile xent can use on `adapter` (16, else 8): an f16 x f16 -> f32
/// configuration of that size, the features the kernel needs, and one subgroup size (the kernel
/// is one subgroup per workgroup).
fn coop_tile(adapter: &wgpu::Adapter) -> Option<u32> {
    let need = wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP;
    let info = adapter.get_info();
    if !adapter.features().contains(need)
        || info.subgroup_min_size != info.subgroup_max_size
        || !(8..=1024).contains(&info.subgroup_min_size)
    {
        return None;
    }
    let props = adapter.cooperative_matrix_properties();
    [16, 8].into_iter().find(|&t| {
        props.iter().any(|p| {
            p.m_size == t
                && p.n_size == t
                && p.k_size == t
                && p.ab_type == wgpu::CooperativeScalarType::F16
                && p.cr_type == wgpu::CooperativeScalarType::F32
        })
    })
}

impl GpuContext {
    /// Picks the best adapter (honouring `WGPU_BACKEND` / `WGPU_ADAPTER_NAME`) with default options.
    pub fn new() -> Result<Self> {
        Self::with_options(GpuOptions::default())
    }

    /// Picks an adapter and creates a device with the adapter's own limits and the optional
    /// features xent can use ([`FEATURES`]).
    pub fn with_options(opts: GpuOptions) -> Result<Self> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: opts.power_preference,
            force_fallback_adapter: false,
            ..Default::default()
        }))
        .map_err(|e| XentError::NoAdapter { message: e.to_string(), source: Some(GpuSource::new(e)) })?;
        let info = adapter.get_info();
        let name = format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type);
        let coop = if opts.cooperative_matrix {
            let tile = coop_tile(&adapter).ok_or_else(|| {
                XentError::InvalidOption(format!(
                    "cooperative_matrix: adapter {name} has no cooperative matrix f16 16x16x16 (or 8x8x8) -> f32 \
                     configuration with one subgroup size"
                ))
            })?;
            Some((tile, info.subgroup_min_size))
        } else {
            None
        };
        let mut features = adapter.features() & FEATURES;
        if coop.is_some() {
            features |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("xent"),
            required_features: features,
            required_limits: adapter.limits(),
            experimental_features: if coop.is_some() {
                // SAFETY: wgpu asks callers of its experimental features to acknowledge that
                // they may have bugs; only the cooperative-matrix kernel, which the caller
                // opted into, uses it.
                unsafe { wgpu::ExperimentalFeatures::enabled() }
            } else {
                wgpu::ExperimentalFeatures::disabled()
            },
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| XentError::RequestDevice { message: e.to_string(), source: Some(GpuSource::new(e)) })?;
        Self::build(device, queue, name, opts, coop)
    }

    /// Wraps a device the caller already has (a training loop sharing its device with xent).
    /// Installs no callbacks: the caller's device-lost and uncaptured-error handlers stay theirs.
    /// Subgroups are used if the device was created with `Features::SUBGROUP`; the device's
    /// limits decide chunking (WebGPU's defaults work: each kernel binds at most 8 storage
    /// buffers).
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue, opts: GpuOptions) -> Result<Self> {
        let info = device.adapter_info();
        let name = format!("{} ({:?}, {:?}, shared device)", info.name, info.backend, info.device_type);
        if opts.cooperative_matrix {
            return Err(XentError::InvalidOption(
                "cooperative_matrix needs GpuContext::with_options (which reads the adapter's configurations)".into(),
            ));
        }
        Self::build(device, queue, name, opts, None)
    }

    fn build(
        device: wgpu::Device,
        queue: wgpu::Queue,
        adapter_name: String,
        opts: GpuOptions,
        coop: Option<(u32, u32)>,
    ) -> Result<Self> {
        if let Some(wg) = opts.workgroup_size {
            if !wg.is_power_of_two()
                || !(32..=1024).contains(&wg)
                || u32::from(wg) > device.limits().max_compute_invocations_per_workgroup
            {
                return Err(XentError::InvalidOption(format!(
                    "workgroup_size {wg}: a power of two from 32 to the device's {}",
                    device.limits().max_compute_invocations_per_workgroup.min(1024)
                )));
            }
        }
        if opts.segment_len == Some(0) {
            return Err(XentError::InvalidOption("segment_len must be positive".into()));
        }
        let software = device.adapter_info().device_type == wgpu::DeviceType::Cpu;
        let limits = device.limits();
        let mut max_binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        if let Some(cap) = opts.max_binding_bytes {
            max_binding = max_binding.min(cap.max(256));
        }
        let subgroups = opts.subgroups && device.features().contains(wgpu::Features::SUBGROUP);
        let inner = Inner {
            subgroups,
            mm_subgroup: subgroups && device.adapter_info().subgroup_min_size >= 8,
            coop,
            max_binding,
            offset_align: (limits.min_storage_buffer_offset_alignment as u64).max(16),
            max_buffer: limits.max_buffer_size,
            max_groups: limits.max_compute_workgroups_per_dimension,
            software,
            max_invocations: limits.max_compute_invocations_per_workgroup.max(64),
            segment_len: opts.segment_len.map(|l| l.next_multiple_of(4)),
            workgroup_size: opts.workgroup_size,
            wide_loads: opts.wide_loads.unwrap_or(!software),
            placeholders: Vec::new(),
            device,
            queue,
            adapter_name,
            pipelines: Mutex::new(HashMap::new()),
            pool: Pool::new(opts.pool_budget_bytes),
            lost: Mutex::new(None),
            pipelines_built: AtomicUsize::new(0),
            unchecked_products: AtomicU64::new(0),
            buffers_built: AtomicUsize::new(0),
            bytes_to_device: AtomicU64::new(0),
            bytes_to_host: AtomicU64::new(0),
        };
        let mut ctx = GpuContext { inner: Arc::new(inner) };
        // Placeholders for binding slots a kernel variant does not use (one per slot, so a
        // read-only and a read-write use never meet on one buffer).
        let placeholders = ctx.scoped(|| {
            (0..SLOTS)
                .map(|i| {
                    ctx.device().create_buffer(&wgpu::BufferDescriptor {
                        label: Some(&format!("xent placeholder {i}")),
                        size: 256,
                        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::UNIFORM,
                        mapped_at_creation: false,
                    })
                })
                .collect()
        })?;
        Arc::get_mut(&mut ctx.inner).expect("not shared yet").placeholders = placeholders;
        Ok(ctx)
    }

    /// Whether 16-bit rows are read with 16-byte loads where they allow it
    /// ([`GpuOptions::wide_loads`], resolved for this adapter).
    pub fn wide_loads(&self) -> bool {
        self.inner.wide_loads
    }

    /// Adapter name, backend and type.
    pub fn adapter_name(&self) -> &str {
        &self.inner.adapter_name
    }

    /// Whether reductions use subgroup operations.
    pub fn uses_subgroups(&self) -> bool {
        self.inner.subgroups
    }

    /// The device, for callers that create their own buffers.
    pub fn device(&self) -> &wgpu::Device {
        &self.inner.device
    }

    /// The queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.inner.queue
    }

    /// Largest storage binding used (the device limit, or the cap from [`GpuOptions`]).
    pub fn max_binding_bytes(&self) -> u64 {
        self.inner.max_binding
    }

    /// How the cross-entropy row pass runs for `rows x classes`: invocations per workgroup and
    /// the segment length (`classes` for whole rows). `gaps` (a second full-row reduction)
    /// needs whole rows.
    pub(crate) fn ce_layout(&self, rows: usize, classes: usize, gaps: bool) -> (u16, usize) {
        // A software rasteriser runs each workgroup as a loop over SIMD-wide slices of lanes,
        // with barriers as coroutine switches: fewer lanes cost less per barrier.
        // A GPU: enough invocations per row for several loads in flight per multiprocessor,
        // about 16 elements each (1024 measured 2.8x faster than 256 at V = 32000 on an H200).
        let hw = (classes / 16).next_power_of_two().clamp(64, self.inner.max_invocations.min(1024) as usize) as u16;
        let wg = self.inner.workgroup_size.unwrap_or(if self.inner.software { 64 } else { hw });
        let auto = if self.inner.software || classes < 65536 || rows >= 2048 {
            classes
        } else {
            // Few long rows: enough workgroups to fill a GPU.
            32768
        };
        let seg = if gaps { classes } else { self.inner.segment_len.unwrap_or(auto) };
        (wg, seg.clamp(4, classes.max(4)).next_multiple_of(4).min(classes.max(1)))
    }

    /// The alignment that offsets of recorded inputs must have (the device's
    /// `min_storage_buffer_offset_alignment`, at least 16 bytes).
    pub fn offset_alignment(&self) -> u64 {
        self.inner.offset_align
    }

    /// How many pipelines and buffers have been created so far, what the pool holds, and how
    /// many bytes have crossed between host and device.
    pub fn counters(&self) -> CounterSnapshot {
        CounterSnapshot {
            pipelines: self.inner.pipelines_built.load(Ordering::Relaxed),
            buffers: self.inner.buffers_built.load(Ordering::Relaxed),
            pool: self.inner.pool.stats(),
            bytes_to_device: self.inner.bytes_to_device.load(Ordering::Relaxed),
            bytes_to_host: self.inner.bytes_to_host.load(Ordering::Relaxed),
            unchecked_products: self.inner.unchecked_products.load(Ordering::Relaxed),
        }
    }

    /// Creates a buffer on the context's device, with wgpu's errors (size over the device's
    /// limit, out of memory, lost device) returned as [`XentError`] instead of reaching the
    /// device's uncaptured-error handler.
    pub fn create_buffer(&self, size: u64, usage: wgpu::BufferUsages, label: &str) -> Result<wgpu::Buffer> {
        self.create(size.max(4).next_multiple_of(4), usage, label)
    }

    /// Writes `data` into `buf` at `offset` through the queue (before the next submission),
    /// padding a tail that is not a whole 4-byte word with zeros.
    pub fn write_buffer(&self, buf: &wgpu::Buffer, offset: u64, data: &[u8]) -> Result<()> {
        let need = offset + (data.len() as u64).next_multiple_of(4);
        if need > buf.size() || !offset.is_multiple_of(4) {
            return Err(XentError::Shape(format!(
                "{} bytes at offset {offset} do not fit a {}-byte buffer (or the offset is not a multiple of 4)",
                data.len(),
                buf.size()
            )));
        }
        self.write(buf, offset, data)
    }

    /// Submits an encoder, with errors returned as [`XentError`].
    pub fn submit_encoder(&self, encoder: wgpu::CommandEncoder) -> Result<wgpu::SubmissionIndex> {
        self.submit(encoder)
    }

    /// Maps `out.len()` bytes of a `MAP_READ` buffer filled by a submitted copy, waits for the
    /// copy, and copies the bytes out.
    pub fn read_staging(&self, staging: &wgpu::Buffer, out: &mut [u8]) -> Result<()> {
        let len = (out.len() as u64).next_multiple_of(4);
        if len > staging.size() {
            return Err(XentError::Shape(format!("{} bytes from a {}-byte buffer", out.len(), staging.size())));
        }
        if len == out.len() as u64 {
            return self.read_mapped(staging, len, out);
        }
        let mut tmp = vec![0u8; len as usize];
        self.read_mapped(staging, len, &mut tmp)?;
        out.copy_from_slice(&tmp[..out.len()]);
        Ok(())
    }

    /// Reads `out.len()` bytes of any `COPY_SRC` buffer from `offset`, waiting for the device
    /// (through a bounded staging buffer, however large the tensor).
    pub fn read_buffer(&self, buf: &wgpu::Buffer, offset: u64, out: &mut [u8]) -> Result<()> {
        if offset + out.len() as u64 > buf.size() || !offset.is_multiple_of(4) {
            return Err(XentError::Shape(format!(
                "{} bytes at offset {offset} from a {}-byte buffer",
                out.len(),
                buf.size()
            )));
        }
        self.read_back(buf, offset, out, None)
    }

    /// Drops every pooled buffer (frees GPU memory held for reuse).
    pub fn trim(&self) {
        self.inner.pool.clear();
    }

    pub(crate) fn placeholder(&self, slot: usize) -> &wgpu::Buffer {
        &self.inner.placeholders[slot]
    }

    /// The compiled pipeline of `shader` in `variant`, compiled on first use. Two threads that
    /// miss at once compile it once: the second waits on the first.
    pub(crate) fn kernel(&self, shader: Shader, variant: Variant) -> Result<Arc<Kernel>> {
        let slot = self.inner.pipelines.lock().unwrap().entry((shader, variant)).or_default().clone();
        let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = guard.as_ref() {
            return Ok(k.clone());
        }
        let kernel = Arc::new(self.scoped(|| self.compile(shader, variant))?);
        self.inner.pipelines_built.fetch_add(1, Ordering::Relaxed);
        *guard = Some(kernel.clone());
        Ok(kernel)
    }

    fn compile(&self, shader: Shader, variant: Variant) -> Kernel {
        let src = shader.source(variant);
        let desc =
            wgpu::ShaderModuleDescriptor { label: Some(shader.name()), source: wgpu::ShaderSource::Wgsl(src.into()) };
        let module = if variant.runtime_checks() {
            self.device().create_shader_module(desc)
        } else {
            // SAFETY: only the SIMT product is built so, in a launch whose every access its
            // host has proven in range (`kernels::matmul::in_range`; the argument is in
            // `shaders/matmul.wgsl`). On lavapipe the checks cost a quarter of the fused loss.
            unsafe { self.device().create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked()) }
        };
        let entry = |binding: u32, ty: wgpu::BufferBindingType| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer { ty, has_dynamic_offset: false, min_binding_size: None },
            count: None,
        };
        let bindings = shader.bindings(variant);
        let entries: Vec<_> = std::iter::once(entry(0, wgpu::BufferBindingType::Uniform))
            .chain(bindings.iter().map(|&(b, read_only, _)| entry(b, wgpu::BufferBindingType::Storage { read_only })))
            .collect();
        let layout = self.device().create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(shader.name()),
            entries: &entries,
        });
        let pl = self.device().create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(shader.name()),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = self.device().create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(shader.name()),
            layout: Some(&pl),
            module: &module,
            entry_point: Some("main"),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &[],
                // Every workgroup-memory cell is written before it is read.
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        Kernel { pipeline, layout, bindings: bindings.iter().map(|b| b.0 as usize).collect() }
    }

    fn create(&self, size: u64, usage: wgpu::BufferUsages, what: &str) -> Result<wgpu::Buffer> {
        if size > self.inner.max_buffer {
            return Err(XentError::TooLarge { what: what.into(), bytes: size, limit: self.inner.max_buffer });
        }
        let buf = self.scoped(|| {
            self.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some(what),
                size,
                usage,
                mapped_at_creation: false,
            })
        })?;
        self.inner.buffers_built.fetch_add(1, Ordering::Relaxed);
        Ok(buf)
    }

    /// A pooled buffer of at least `size` bytes with `usage`; it returns to the pool on drop.
    pub(crate) fn take(&self, size: u64, usage: wgpu::BufferUsages, what: &str) -> Result<Pooled> {
        let class = size_class(size);
        // A class above the device limit falls back to the exact (4-byte rounded) size.
        let class = if class > self.inner.max_buffer { size.max(4).next_multiple_of(4) } else { class };
        if let Some(b) = self.inner.pool.take(class, usage) {
            return Ok(b);
        }
        let buf = self.create(class, usage, what)?;
        self.inner.pool.note_taken(class);
        Ok(self.inner.pool.wrap(buf))
    }

    /// A buffer owned for its holder's lifetime (a plan's), freed rather than pooled on drop:
    /// commands recorded into a caller's encoder may still use it after the call returns.
    pub(crate) fn owned(&self, size: u64, usage: wgpu::BufferUsages, what: &str) -> Result<Pooled> {
        Ok(Pooled::unpooled(self.create(size.max(4).next_multiple_of(4), usage, what)?))
    }

    /// Writes `data` at `offset` through the queue (ordered before the next submission), padded
    /// to the 4-byte copy alignment.
    pub(crate) fn write(&self, buf: &wgpu::Buffer, offset: u64, data: &[u8]) -> Result<()> {
        self.inner.bytes_to_device.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.scoped(|| {
            let whole = data.len() / 4 * 4;
            if whole > 0 {
                self.queue().write_buffer(buf, offset, &data[..whole]);
            }
            if whole < data.len() {
                let mut tail = [0u8; 4];
                tail[..data.len() - whole].copy_from_slice(&data[whole..]);
                self.queue().write_buffer(buf, offset + whole as u64, &tail);
            }
        })
    }

    /// A new buffer created holding `data` (mapped at creation: its contents are in place
    /// before any submission, whenever the caller submits).
    pub(crate) fn buffer_init(&self, data: &[u8], usage: wgpu::BufferUsages, what: &str) -> Result<wgpu::Buffer> {
        let size = (data.len() as u64).max(4).next_multiple_of(4);
        let buf = self.scoped(|| {
            self.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some(what),
                size,
                usage,
                mapped_at_creation: true,
            })
        })?;
        {
            let mut view = match buf.get_mapped_range_mut(..) {
                Ok(v) => v,
                Err(e) => {
                    self.probe_lost()?;
                    return Err(XentError::gpu(format!("{what}: {e}"), e));
                }
            };
            view.slice(..data.len()).copy_from_slice(data);
        }
        buf.unmap();
        self.inner.bytes_to_device.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.inner.buffers_built.fetch_add(1, Ordering::Relaxed);
        Ok(buf)
    }

    /// A pooled buffer holding `data`.
    pub(crate) fn upload(&self, data: &[u8], usage: wgpu::BufferUsages, what: &str) -> Result<Pooled> {
        let buf = self.take(data.len() as u64, usage | wgpu::BufferUsages::COPY_DST, what)?;
        self.write_bounded(&buf, 0, data)?;
        Ok(buf)
    }

    /// Writes a large host array in pieces of at most 64 MiB, each submitted and finished
    /// before the next, so the queue's staging copy never holds more than one piece.
    pub(crate) fn write_bounded(&self, buf: &wgpu::Buffer, offset: u64, data: &[u8]) -> Result<()> {
        const PIECE: usize = 64 << 20;
        if data.len() <= PIECE {
            return self.write(buf, offset, data);
        }
        for (i, piece) in data.chunks(PIECE).enumerate() {
            self.write(buf, offset + (i * PIECE) as u64, piece)?;
            let idx = self.scoped(|| self.queue().submit([]))?;
            self.wait(idx)?;
        }
        Ok(())
    }

    /// Fails if device loss was seen before.
    pub(crate) fn check_alive(&self) -> Result<()> {
        match self.inner.lost.lock().unwrap().clone() {
            Some(msg) => Err(XentError::DeviceLost(msg)),
            None => Ok(()),
        }
    }

    /// Turns a wgpu error into ours. wgpu reports no errors for a lost device's objects (they are
    /// silently invalid, as WebGPU specifies), so every error is followed by a probe of the device.
    fn classify(&self, e: wgpu::Error) -> XentError {
        let mut text = e.to_string().replace('\n', " ");
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
        while let Some(s) = src {
            text.push_str(": ");
            text.push_str(&s.to_string());
            src = s.source();
        }
        if let Err(lost) = self.probe_lost() {
            return lost;
        }
        match e {
            wgpu::Error::OutOfMemory { .. } => XentError::gpu(format!("out of GPU memory: {text}"), e),
            _ => XentError::gpu(text, e),
        }
    }

    /// Whether the device still works: a lost device's buffers cannot be mapped, not even at
    /// creation. Loss is remembered, so later calls fail at once with the same error.
    fn probe_lost(&self) -> Result<()> {
        self.check_alive()?;
        let scope = self.device().push_error_scope(wgpu::ErrorFilter::Validation);
        let buf = self.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("xent probe"),
            size: 4,
            usage: wgpu::BufferUsages::MAP_WRITE,
            mapped_at_creation: true,
        });
        let ok = buf.get_mapped_range_mut(..).is_ok();
        if ok {
            buf.unmap();
        }
        drop(pollster::block_on(scope.pop()));
        if ok {
            return Ok(());
        }
        let msg = "the device was lost (destroyed, reset or removed)".to_string();
        *self.inner.lost.lock().unwrap() = Some(msg.clone());
        Err(XentError::DeviceLost(msg))
    }

    /// Runs `f` inside out-of-memory, validation and internal error scopes and returns what
    /// they caught (scopes are per thread, so concurrent callers do not see each other's errors).
    pub(crate) fn scoped<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        self.check_alive()?;
        let oom = self.device().push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let internal = self.device().push_error_scope(wgpu::ErrorFilter::Internal);
        let val = self.device().push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let v = pollster::block_on(val.pop());
        let i = pollster::block_on(internal.pop());
        let o = pollster::block_on(oom.pop());
        if let Some(e) = v.or(i).or(o) {
            return Err(self.classify(e));
        }
        Ok(out)
    }

    /// Submits `encoder` (inside error scopes) and returns its index.
    pub(crate) fn submit(&self, encoder: wgpu::CommandEncoder) -> Result<wgpu::SubmissionIndex> {
        self.scoped(|| self.queue().submit([encoder.finish()]))
    }

    /// Waits for a submission.
    pub(crate) fn wait(&self, idx: wgpu::SubmissionIndex) -> Result<()> {
        if let Err(e) = self.device().poll(wgpu::PollType::Wait { submission_index: Some(idx), timeout: None }) {
            // A submission to a lost device never happened: say so rather than "wrong index".
            self.probe_lost()?;
            return Err(XentError::gpu(e.to_string(), e));
        }
        self.check_alive()
    }

    /// Submits `encoder` and waits for it.
    pub(crate) fn submit_wait(&self, encoder: wgpu::CommandEncoder) -> Result<()> {
        let idx = self.submit(encoder)?;
        self.wait(idx)
    }

    /// Maps `len` bytes of `staging` (a MAP_READ buffer filled by a submitted command) and
    /// copies them into `out`, waiting for the map.
    pub(crate) fn read_mapped(&self, staging: &wgpu::Buffer, len: u64, out: &mut [u8]) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        // The callback may run on whichever thread polls next (several threads can share this
        // context), so wait for the callback itself, polling until it has fired.
        let (tx, rx) = std::sync::mpsc::channel();
        self.scoped(|| {
            staging.map_async(wgpu::MapMode::Read, 0..len, move |r| {
                let _ = tx.send(r);
            })
        })?;
        let result = loop {
            if let Err(e) = self.device().poll(wgpu::PollType::wait_indefinitely()) {
                self.probe_lost()?;
                return Err(XentError::gpu(e.to_string(), e));
            }
            match rx.recv_timeout(std::time::Duration::from_millis(1)) {
                Ok(r) => break r,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => self.check_alive()?,
                Err(e) => return Err(XentError::gpu(format!("map callback dropped: {e}"), e)),
            }
        };
        if let Err(e) = result {
            self.probe_lost()?;
            return Err(XentError::gpu(format!("map failed: {e}"), e));
        }
        {
            let view = staging.get_mapped_range(0..len).map_err(|e| XentError::gpu(format!("mapped range: {e}"), e))?;
            out.copy_from_slice(&view[..out.len()]);
        }
        staging.unmap();
        self.inner.bytes_to_host.fetch_add(out.len() as u64, Ordering::Relaxed);
        self.check_alive()
    }

    /// Reads a tensor of `dst`'s shape and dtype from the start of `src` into `dst` (a strided
    /// destination through a contiguous copy). `first` as for [`Self::read_back`].
    pub(crate) fn read_back_into(
        &self,
        src: &wgpu::Buffer,
        mut dst: crate::dtype::LogitsMut<'_>,
        first: Option<wgpu::CommandEncoder>,
    ) -> Result<()> {
        if let Some(b) = dst.bytes_mut() {
            return self.read_back(src, 0, b, first);
        }
        let mut tmp = crate::dtype::Tensor2::zeros(dst.dtype(), dst.dim());
        self.read_back(src, 0, tmp.view_mut().bytes_mut().expect("fresh"), first)?;
        dst.assign_f32(tmp.to_f32().view());
        Ok(())
    }

    /// Reads `out.len()` bytes of `src` from `offset` back to the host through a staging buffer
    /// of at most 64 MiB, piece by piece (bounded memory however large the tensor). `first`,
    /// when given, is an encoder whose commands must run before the first copy.
    pub(crate) fn read_back(
        &self,
        src: &wgpu::Buffer,
        offset: u64,
        out: &mut [u8],
        first: Option<wgpu::CommandEncoder>,
    ) -> Result<()> {
        const PIECE: u64 = 64 << 20;
        let total = out.len() as u64;
        let piece = total.clamp(4, PIECE).next_multiple_of(4);
        let staging = self.take(piece, wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST, "staging")?;
        let mut first = first;
        let mut done = 0u64;
        while done < total || first.is_some() {
            let mut enc = first.take().unwrap_or_else(|| self.device().create_command_encoder(&Default::default()));
            let n = (total - done).min(piece);
            let copy = n.next_multiple_of(4);
            if n > 0 {
                enc.copy_buffer_to_buffer(src, offset + done, &staging, 0, copy);
            }
            self.submit_wait(enc)?;
            if n > 0 {
                let mut tmp;
                let dst = &mut out[done as usize..(done + n) as usize];
                if copy == n {
                    self.read_mapped(&staging, copy, dst)?;
                } else {
                    tmp = vec![0u8; copy as usize];
                    self.read_mapped(&staging, copy, &mut tmp)?;
                    dst.copy_from_slice(&tmp[..n as usize]);
                }
            }
            done += n;
        }
        Ok(())
    }
}

crate::api::forward_backend!(GpuContext, "gpu");
crate::api::methods::backend_methods!(
    GpuContext,
    "GpuContext",
    "GpuContext::new()?",
    "```no_run",
    "On the GPU: host arrays in and out, the work on the device; the linear forms hold their logits there one row chunk at a time ([`LinearCe::device_chunk_rows`] rows by default), their products by the kernel [`crate::GpuContext::matmul_kind`] names."
);
