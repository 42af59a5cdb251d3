//! The GPU context: adapter, device, queue, the pipeline cache, a buffer pool, and the
//! translation of wgpu errors and device loss into [`XentError`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Result, XentError};
use crate::kernels::source::{Shader, Variant};

/// Options for creating a [`GpuContext`].
#[derive(Debug, Clone)]
pub struct GpuOptions {
    /// Use subgroup operations when the adapter has them (otherwise workgroup memory).
    pub subgroups: bool,
    /// Cap on one storage binding, below the device's own limit (tests use it to force chunking).
    pub max_binding_bytes: Option<u64>,
    /// Which adapter to prefer.
    pub power_preference: wgpu::PowerPreference,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            subgroups: true,
            max_binding_bytes: None,
            power_preference: wgpu::PowerPreference::HighPerformance,
        }
    }
}

/// Binding slots shared by every kernel (see `shaders/common.wgsl`).
pub(crate) const SLOTS: usize = 11;

pub(crate) struct Kernel {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
    /// Storage slots in the layout (slot 0, the uniform, is always there).
    pub bindings: Vec<usize>,
}

/// Counters that show whether repeated calls allocate or compile anything.
#[derive(Debug, Default)]
pub struct Counters {
    /// Compute pipelines compiled so far.
    pub pipelines: AtomicUsize,
    /// GPU buffers created so far (pool misses).
    pub buffers: AtomicUsize,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Compute pipelines compiled so far.
    pub pipelines: usize,
    /// GPU buffers created so far.
    pub buffers: usize,
}

/// Device, queue and caches shared by every GPU kernel.
///
/// ```no_run
/// let ctx = xent::GpuContext::new().expect("a GPU adapter");
/// println!("{}", ctx.adapter_name());
/// ```
pub struct GpuContext {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    adapter_name: String,
    pub(crate) subgroups: bool,
    pub(crate) max_binding: u64,
    pub(crate) offset_align: u64,
    pub(crate) max_buffer: u64,
    pub(crate) max_groups: u32,
    pipelines: Mutex<HashMap<(Shader, Variant), Arc<Kernel>>>,
    pool: Mutex<HashMap<(u64, wgpu::BufferUsages), Vec<wgpu::Buffer>>>,
    placeholders: Vec<wgpu::Buffer>,
    lost: Arc<Mutex<Option<String>>>,
    uncaptured: Arc<Mutex<Option<String>>>,
    counters: Counters,
}

impl GpuContext {
    /// Picks the best adapter (honouring `WGPU_BACKEND` / `WGPU_ADAPTER_NAME`) with default options.
    pub fn new() -> Result<Self> {
        Self::with_options(GpuOptions::default())
    }

    /// Picks an adapter and creates a device with the adapter's own limits and the optional
    /// features xent can use (subgroups, f16, timestamps).
    pub fn with_options(opts: GpuOptions) -> Result<Self> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: opts.power_preference,
            force_fallback_adapter: false,
            ..Default::default()
        }))
        .map_err(|e| XentError::NoAdapter(e.to_string()))?;
        let wanted = wgpu::Features::SUBGROUP
            | wgpu::Features::SUBGROUP_BARRIER
            | wgpu::Features::SHADER_F16
            | wgpu::Features::TIMESTAMP_QUERY;
        let features = adapter.features() & wanted;
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("xent"),
            required_features: features,
            required_limits: adapter.limits(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| XentError::RequestDevice(e.to_string()))?;
        let info = adapter.get_info();
        let name = format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type);
        Ok(Self::build(device, queue, name, opts))
    }

    /// Wraps a device the caller already has (a training loop sharing its device with xent).
    /// Subgroups are used if the device was created with `Features::SUBGROUP`.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue, opts: GpuOptions) -> Self {
        Self::build(device, queue, "user-provided device".into(), opts)
    }

    fn build(device: wgpu::Device, queue: wgpu::Queue, adapter_name: String, opts: GpuOptions) -> Self {
        let limits = device.limits();
        let lost = Arc::new(Mutex::new(None));
        let l2 = lost.clone();
        device.set_device_lost_callback(move |reason, msg| {
            *l2.lock().unwrap() = Some(format!("{reason:?}: {msg}"));
        });
        let uncaptured = Arc::new(Mutex::new(None));
        let u2 = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            u2.lock().unwrap().get_or_insert_with(|| e.to_string());
        }));
        let mut max_binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        if let Some(cap) = opts.max_binding_bytes {
            max_binding = max_binding.min(cap.max(256));
        }
        // Placeholders for binding slots a kernel variant does not use (one per slot, so a
        // read-only and a read-write use never meet on one buffer).
        let placeholders = (0..SLOTS)
            .map(|i| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(&format!("xent placeholder {i}")),
                    size: 256,
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::UNIFORM,
                    mapped_at_creation: false,
                })
            })
            .collect();
        GpuContext {
            subgroups: opts.subgroups && device.features().contains(wgpu::Features::SUBGROUP),
            max_binding,
            offset_align: limits.min_storage_buffer_offset_alignment as u64,
            max_buffer: limits.max_buffer_size,
            max_groups: limits.max_compute_workgroups_per_dimension,
            device,
            queue,
            adapter_name,
            pipelines: Mutex::new(HashMap::new()),
            pool: Mutex::new(HashMap::new()),
            placeholders,
            lost,
            uncaptured,
            counters: Counters::default(),
        }
    }

    /// Adapter name, backend and type.
    pub fn adapter_name(&self) -> &str {
        &self.adapter_name
    }

    /// Whether reductions use subgroup operations.
    pub fn uses_subgroups(&self) -> bool {
        self.subgroups
    }

    /// The device, for callers that create their own buffers.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// Largest storage binding used (the device limit, or the cap from [`GpuOptions`]).
    pub fn max_binding_bytes(&self) -> u64 {
        self.max_binding
    }

    /// How many pipelines and buffers have been created so far.
    pub fn counters(&self) -> CounterSnapshot {
        CounterSnapshot {
            pipelines: self.counters.pipelines.load(Ordering::Relaxed),
            buffers: self.counters.buffers.load(Ordering::Relaxed),
        }
    }

    /// Drops every pooled buffer (frees GPU memory held for reuse).
    pub fn trim(&self) {
        self.pool.lock().unwrap().clear();
    }

    pub(crate) fn placeholder(&self, slot: usize) -> &wgpu::Buffer {
        &self.placeholders[slot]
    }

    /// The compiled pipeline of `shader` in `variant`, compiled on first use.
    pub(crate) fn kernel(&self, shader: Shader, variant: Variant) -> Result<Arc<Kernel>> {
        let key = (shader, variant);
        if let Some(k) = self.pipelines.lock().unwrap().get(&key) {
            return Ok(k.clone());
        }
        let kernel = self.scoped(|| self.compile(shader, variant))?;
        self.counters.pipelines.fetch_add(1, Ordering::Relaxed);
        let kernel = Arc::new(kernel);
        self.pipelines.lock().unwrap().insert(key, kernel.clone());
        Ok(kernel)
    }

    fn compile(&self, shader: Shader, variant: Variant) -> Kernel {
        let src = shader.source(variant);
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(shader.name()),
            source: wgpu::ShaderSource::Wgsl(src.into()),
        });
        let storage = |binding: u32, read_only: bool| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        }];
        let bindings = shader.bindings(variant);
        entries.extend(bindings.iter().map(|&(b, ro)| storage(b, ro)));
        let layout = self.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(shader.name()),
            entries: &entries,
        });
        let pl = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(shader.name()),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
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

    /// A pooled buffer of at least `size` bytes with `usage`; return it with [`Self::give`].
    pub(crate) fn take(&self, size: u64, usage: wgpu::BufferUsages, what: &str) -> Result<wgpu::Buffer> {
        let size = size.max(16).div_ceil(256) * 256;
        if size > self.max_buffer {
            return Err(XentError::TooLarge { what: what.into(), bytes: size, limit: self.max_buffer });
        }
        if let Some(b) = self.pool.lock().unwrap().get_mut(&(size, usage)).and_then(|v| v.pop()) {
            return Ok(b);
        }
        self.counters.buffers.fetch_add(1, Ordering::Relaxed);
        self.scoped(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(what),
                size,
                usage,
                mapped_at_creation: false,
            })
        })
    }

    /// A pooled buffer holding `data` (written through the queue before the next submission).
    pub(crate) fn upload(&self, data: &[u8], usage: wgpu::BufferUsages, what: &str) -> Result<wgpu::Buffer> {
        let buf = self.take(data.len() as u64, usage | wgpu::BufferUsages::COPY_DST, what)?;
        self.queue.write_buffer(&buf, 0, data);
        Ok(buf)
    }

    /// Returns a buffer from [`Self::take`] to the pool.
    pub(crate) fn give(&self, buf: wgpu::Buffer) {
        self.pool.lock().unwrap().entry((buf.size(), buf.usage())).or_default().push(buf);
    }

    /// Fails if the device was lost or reported an error outside a scope.
    pub(crate) fn check_alive(&self) -> Result<()> {
        if let Some(msg) = self.lost.lock().unwrap().clone() {
            return Err(XentError::DeviceLost(msg));
        }
        if let Some(msg) = self.uncaptured.lock().unwrap().take() {
            return Err(XentError::Gpu(msg));
        }
        Ok(())
    }

    /// Runs `f` inside validation and out-of-memory error scopes and returns what they caught.
    pub(crate) fn scoped<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        self.check_alive()?;
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let val = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let v = pollster::block_on(val.pop());
        let o = pollster::block_on(oom.pop());
        if let Some(e) = v.or(o) {
            return Err(XentError::Gpu(e.to_string()));
        }
        self.check_alive()?;
        Ok(out)
    }

    /// Submits `encoder` and waits for it.
    pub(crate) fn submit_wait(&self, encoder: wgpu::CommandEncoder) -> Result<()> {
        self.scoped(|| self.queue.submit([encoder.finish()]))?;
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| XentError::Gpu(e.to_string()))?;
        self.check_alive()
    }

    /// Maps `staging` (a MAP_READ buffer already filled by a finished submission) and copies
    /// `len` bytes out.
    pub(crate) fn read_staging(&self, staging: &wgpu::Buffer, len: u64, out: &mut [u8]) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        // The callback may run on whichever thread polls next (several threads can share this
        // context), so wait for the callback itself, polling until it has fired.
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, 0..len, move |r| {
            let _ = tx.send(r);
        });
        let result = loop {
            self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| XentError::Gpu(e.to_string()))?;
            match rx.recv_timeout(std::time::Duration::from_millis(1)) {
                Ok(r) => break r,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => self.check_alive()?,
                Err(e) => return Err(XentError::Gpu(format!("map callback dropped: {e}"))),
            }
        };
        result.map_err(|e| XentError::Gpu(format!("map failed: {e}")))?;
        {
            let view = staging.get_mapped_range(0..len).map_err(|e| XentError::Gpu(format!("mapped range: {e}")))?;
            out.copy_from_slice(&view[..out.len()]);
        }
        staging.unmap();
        self.check_alive()
    }
}
