//! Burn's cube backend on wgpu: xent's kernels on Burn's own device, queue and buffers.
//!
//! A device made by [`wgpu_device`] or [`share_wgpu`] has an xent [`GpuContext`] on the same
//! `wgpu::Device` and `wgpu::Queue` as Burn's runtime. A loss call then
//! 1. flushes Burn's pending work to the queue (a submit, not a wait),
//! 2. reaches the logits', targets' and two new output buffers through Burn's client,
//! 3. records xent's cross-entropy plan reading the logits in place and writing the gradient
//!    and the loss into the buffers Burn owns, and submits it on the same queue.
//!
//! The queue orders the three: Burn's earlier kernels, then xent's, then whatever Burn records
//! next (the backward pass reading the gradient). Nothing waits and nothing crosses to the host.
//! Cube devices without a shared context (another wgpu device, CUDA, the cubecl CPU runtime)
//! take the host path, counted by [`crate::host_transfers`].

use std::sync::{Arc, Mutex};

use burn::backend::ops::{FloatTensorOps, IntTensorOps};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::DispatchDevice;
use burn::prelude::{Device, DeviceKind};
use burn::tensor::{DType as BurnDType, FloatDType, IntDType, Shape, TensorData};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeDevice};
use cubecl::server::Handle;
use cubecl::wgpu::{AutoCompiler, AutoGraphicsApi, RuntimeOptions, WgpuDevice, WgpuServer, WgpuSetup};
use xent::{
    CeBackward, CeInputs, CePlan, CrossEntropy, DeviceGrad, DeviceTargets, GpuContext, GpuOptions, GpuSource, Logits,
    Tensor2, XentError,
};

use crate::count_host_transfer;
use crate::ops::{cpu_cross_entropy, record_error, xent_dtype};
use crate::{XentArgs, XentLinearOps, XentLogprobsOps, XentOps};

mod distill;

/// Plans kept per shared device (shapes and options of recent calls).
const PLANS: usize = 8;

struct Shared {
    device: CubeDevice,
    ctx: GpuContext,
    /// Recently used plans, most recent last.
    plans: Mutex<Vec<(PlanKey, Arc<Planned>)>>,
    /// Recently used distillation plans, most recent last.
    distill_plans: Mutex<Vec<(distill::DistillKey, Arc<distill::DistillPlanned>)>>,
}

/// What a plan is for: rows, classes, dtype, options.
type PlanKey = (usize, usize, xent::DType, CrossEntropy);

/// A plan with the buffers of its own that a call needs besides Burn's.
struct Planned {
    plan: CePlan,
    /// The targets, copied here: Burn's small tensors share pooled pages with other tensors,
    /// and one buffer cannot be bound read-only and read-write in one dispatch.
    targets: wgpu::Buffer,
    /// The gradient when Burn placed it in the logits' page (then copied into place).
    scratch: Mutex<Option<wgpu::Buffer>>,
}

static SHARED: Mutex<Vec<Arc<Shared>>> = Mutex::new(Vec::new());

fn shared(device: &CubeDevice) -> Option<Arc<Shared>> {
    SHARED.lock().unwrap_or_else(|p| p.into_inner()).iter().find(|s| &s.device == device).cloned()
}

fn register(setup: WgpuSetup, device: Device) -> Result<Device, XentError> {
    let DispatchDevice::Cube(key) = device.as_dispatch() else {
        return Err(XentError::gpu_message("Burn did not return a wgpu device"));
    };
    let ctx = GpuContext::from_device(setup.device, setup.queue, GpuOptions::default())?;
    let mut all = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    all.retain(|s| &s.device != key);
    all.push(Arc::new(Shared {
        device: key.clone(),
        ctx,
        plans: Mutex::new(Vec::new()),
        distill_plans: Mutex::new(Vec::new()),
    }));
    Ok(device)
}

/// Burn's default wgpu device, brought up so that xent shares it: call it before any other use
/// of `Device::wgpu(DeviceKind::DefaultDevice)` (Burn's runtime cannot be set up twice), and
/// use the device it returns (`.autodiff()` for training). Later calls return the same device.
///
/// ```no_run
/// let device = xent_burn::wgpu_device()?.autodiff();
/// # Ok::<(), xent::XentError>(())
/// ```
pub fn wgpu_device() -> Result<Device, XentError> {
    static DEFAULT: Mutex<Option<Device>> = Mutex::new(None);
    let mut slot = DEFAULT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(d) = slot.as_ref() {
        return Ok(d.clone());
    }
    let setup =
        cubecl::wgpu::try_init_setup::<AutoGraphicsApi>(&WgpuDevice::default(), RuntimeOptions::default()).map_err(
            |e| XentError::NoAdapter { message: format!("Burn's wgpu runtime: {e}"), source: Some(GpuSource::new(e)) },
        )?;
    let device = register(setup, Device::wgpu(DeviceKind::DefaultDevice))?;
    *slot = Some(device.clone());
    Ok(device)
}

/// Registers an application's own wgpu device and queue with Burn (`Device::wgpu_options()
/// .setup(..)`) and with xent, and returns the Burn device. The device must have the features
/// Burn's compiler needs (see Burn's `WgpuOptions::setup`).
pub fn share_wgpu(setup: WgpuSetup) -> Result<Device, XentError> {
    let device = Device::wgpu_options().setup(setup.clone()).init().map_err(|e| XentError::RequestDevice {
        message: format!("Burn's wgpu runtime: {e}"),
        source: Some(GpuSource::new(e)),
    })?;
    register(setup, device)
}

type Server = WgpuServer<AutoCompiler>;

impl Shared {
    fn plan(&self, n: usize, v: usize, dtype: xent::DType, cfg: &CrossEntropy) -> Result<Arc<Planned>, XentError> {
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = plans.iter().position(|(k, _)| k.0 == n && k.1 == v && k.2 == dtype && &k.3 == cfg) {
            let hit = plans.remove(i);
            let plan = hit.1.clone();
            plans.push(hit);
            return Ok(plan);
        }
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
        let plan = Arc::new(Planned {
            plan: self.ctx.cross_entropy_plan(n, v, dtype, cfg)?,
            targets: self.ctx.create_buffer((n * 4) as u64, usage, "xent-burn targets")?,
            scratch: Mutex::new(None),
        });
        if plans.len() == PLANS {
            plans.remove(0);
        }
        plans.push(((n, v, dtype, cfg.clone()), plan.clone()));
        Ok(plan)
    }

    /// Records `job` on `logits` on Burn's queue: new buffers from Burn's client for what it
    /// writes, xent's plan reading Burn's buffers in place.
    fn run(
        &self,
        logits: &CubeTensor,
        targets: &CubeTensor,
        cfg: &CrossEntropy,
        job: &Job<'_>,
    ) -> Result<Outs, XentError> {
        let client = &logits.client;
        let dims = logits.meta.shape();
        let (n, v) = (dims[0], dims[1]);
        let dtype = xent_dtype(logits.dtype);
        let elem = dtype.size() as u64;
        let nv = (n * v) as u64;
        let none = cfg.reduction == xent::Reduction::None;
        let loss_bytes = if none { n * 4 } else { 4 };
        let planned = self.plan(n, v, dtype, cfg)?;
        let plan = &planned.plan;
        let backward = matches!(job, Job::Backward { .. });
        let loss = (!backward).then(|| client.empty(loss_bytes));
        let in_place = matches!(job, Job::Backward { in_place: true, .. });
        let grad = (matches!(job, Job::LossGrad) || backward && !in_place).then(|| client.empty(n * v * dtype.size()));
        let state = matches!(job, Job::LossState).then(|| client.empty(plan.state_bytes() as usize));
        let gpu = |e: cubecl::server::ServerError| XentError::gpu(format!("Burn's wgpu runtime: {e}"), e);
        // Burn's recorded work (which wrote the inputs) goes to the queue before ours.
        client.flush().map_err(gpu)?;
        let res = |h: &Handle| client.get_resource::<Server>(h.clone()).map_err(gpu);
        let (x, t) = (res(&logits.handle)?, res(&targets.handle)?);
        let (x, t) = (x.resource(), t.resource());
        let l = loss.as_ref().map(res).transpose()?;
        let g = grad.as_ref().map(res).transpose()?;
        let st = state.as_ref().map(res).transpose()?;
        let mut enc = self.ctx.device().create_command_encoder(&Default::default());
        let tbytes = n as u64 * 4;
        enc.copy_buffer_to_buffer(&t.buffer, t.offset, &planned.targets, 0, tbytes);
        let mut scratch = planned.scratch.lock().unwrap_or_else(|p| p.into_inner());
        // Where the kernel writes the gradient: Burn's buffer, or scratch when that buffer is
        // also the logits' (one buffer cannot be bound read-only and read-write at once).
        let dest = match &g {
            Some(g) if g.resource().buffer == x.buffer => {
                if scratch.as_ref().is_none_or(|b| b.size() < nv * elem) {
                    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
                    *scratch = Some(self.ctx.create_buffer(nv * elem, usage, "xent-burn gradient")?);
                }
                scratch.as_ref().map(|b| (b, 0u64))
            }
            Some(g) => Some((&g.resource().buffer, g.resource().offset)),
            None => None,
        };
        let grad_dest = match dest {
            Some((b, o)) => DeviceGrad::Separate(b.slice(o..o + nv * elem), dtype),
            None if in_place => DeviceGrad::InPlace,
            None => DeviceGrad::None,
        };
        let logits_slice = x.buffer.slice(x.offset..x.offset + nv * elem);
        let targets_slice = DeviceTargets::Classes(planned.targets.slice(..tbytes));
        match job {
            Job::Backward { state, upstream, .. } => {
                let (sr, ur) = (res(&state.handle)?, res(&upstream.handle)?);
                let (sr, ur) = (sr.resource(), ur.resource());
                let up_bytes = if none { tbytes } else { 4 };
                plan.record_backward(
                    &mut enc,
                    CeBackward {
                        logits: logits_slice,
                        targets: targets_slice,
                        sample_weight: None,
                        state: sr.buffer.slice(sr.offset..sr.offset + plan.state_bytes()),
                        upstream: ur.buffer.slice(ur.offset..ur.offset + up_bytes),
                        grad: grad_dest,
                    },
                )?;
            }
            _ => {
                let inputs =
                    CeInputs { logits: logits_slice, targets: targets_slice, sample_weight: None, grad: grad_dest };
                plan.record(&mut enc, inputs)?;
                let l = l.as_ref().expect("a loss buffer").resource();
                // The loss: the reduced scalar (byte 24 of the plan's scalars) or the per-row losses.
                if none {
                    enc.copy_buffer_to_buffer(plan.row_buffer(), 0, &l.buffer, l.offset, loss_bytes as u64);
                } else {
                    enc.copy_buffer_to_buffer(plan.scalars_buffer(), 24, &l.buffer, l.offset, 4);
                }
                if let Some(st) = &st {
                    let st = st.resource();
                    plan.save_state(&mut enc, st.buffer.slice(st.offset..st.offset + plan.state_bytes()))?;
                }
            }
        }
        if let (Some(g), Some((b, 0))) = (&g, dest) {
            let g = g.resource();
            if b != &g.buffer {
                enc.copy_buffer_to_buffer(b, 0, &g.buffer, g.offset, nv * elem);
            }
        }
        self.ctx.submit_encoder(enc)?;
        Ok(Outs { loss, grad, state })
    }
}

/// What a call records.
enum Job<'a> {
    /// The loss.
    Loss,
    /// The loss and its gradient, fused.
    LossGrad,
    /// The loss and the state of a later backward pass.
    LossState,
    /// The gradient from a saved state times the upstream gradient (f32), over the logits when
    /// Burn holds them nowhere else.
    Backward { state: &'a CubeTensor, upstream: &'a CubeTensor, in_place: bool },
}

/// New buffers a call wrote.
struct Outs {
    loss: Option<Handle>,
    grad: Option<Handle>,
    state: Option<Handle>,
}

/// NaN outputs of the right shapes, for a call whose error was recorded.
fn nan_outputs(logits: &CubeTensor, loss_shape: Shape, with_grad: bool) -> (CubeTensor, Option<CubeTensor>) {
    let dims = logits.meta.shape().clone();
    let device = logits.device.clone();
    let fill = |shape: Shape| {
        let t = CubeBackend::float_from_data(TensorData::new(vec![f32::NAN; shape.num_elements()], shape), &device);
        cast(t, logits.dtype)
    };
    (fill(loss_shape), with_grad.then(|| fill(dims)))
}

fn cast(t: CubeTensor, dtype: BurnDType) -> CubeTensor {
    match dtype {
        BurnDType::F16 => CubeBackend::float_cast(t, FloatDType::F16),
        BurnDType::BF16 => CubeBackend::float_cast(t, FloatDType::BF16),
        _ => t,
    }
}

/// The host path: logits to the host, xent's CPU kernels, gradient back.
fn run_host(
    logits: &CubeTensor,
    targets: &CubeTensor,
    args: &XentArgs,
    with_grad: bool,
) -> (CubeTensor, Option<CubeTensor>) {
    let dims = logits.meta.shape().clone();
    let (n, v) = (dims[0], dims[1]);
    let device = logits.device.clone();
    let read = |t: &CubeTensor| burn_cubecl::ops::into_data_sync(t.clone());
    let x = read(logits).convert::<f32>().try_to_vec::<f32>().unwrap_or_default();
    let t = read(targets).convert::<i64>().try_to_vec::<i64>().unwrap_or_default();
    count_host_transfer();
    let xv = ndarray::ArrayView2::from_shape((n, v), &x[..]);
    let Ok(xv) = xv else {
        record_error(XentError::gpu_message("logits could not be read back"));
        return nan_outputs(logits, args.loss_shape(n), with_grad);
    };
    let tv = xent::Targets::I64(ndarray::ArrayView1::from(&t[..]));
    let mut g = with_grad.then(|| Tensor2::zeros(xent::DType::F32, (n, v)));
    let values = cpu_cross_entropy(Logits::F32(xv), tv, args.cfg(), g.as_mut().map(|g| g.view_mut()));
    let loss = cast(CubeBackend::float_from_data(TensorData::new(values, args.loss_shape(n)), &device), logits.dtype);
    let grad = g.map(|g| {
        let Tensor2::F32(a) = g else { unreachable!("an f32 gradient was made") };
        cast(
            CubeBackend::float_from_data(TensorData::new(a.into_raw_vec_and_offset().0, dims.clone()), &device),
            logits.dtype,
        )
    });
    (loss, grad)
}

/// Contiguous logits and i32 targets.
fn prepare(logits: CubeTensor, targets: CubeTensor) -> (CubeTensor, CubeTensor) {
    let logits = into_contiguous(logits);
    let targets = if targets.dtype == BurnDType::I32 { targets } else { CubeBackend::int_cast(targets, IntDType::I32) };
    (logits, into_contiguous(targets))
}

/// Runs a forward job: on a shared device, or through the host.
fn forward(logits: CubeTensor, targets: CubeTensor, args: &XentArgs, job: Job<'_>) -> (CubeTensor, Option<CubeTensor>) {
    let (logits, targets) = prepare(logits, targets);
    let dims = logits.meta.shape().clone();
    let n = dims[0];
    let loss_shape = args.loss_shape(n);
    let with_grad = !matches!(job, Job::Loss);
    let Some(sh) = shared(&logits.device).filter(|_| n > 0) else {
        let (loss, grad) = run_host(&logits, &targets, args, !matches!(job, Job::Loss | Job::LossState));
        if matches!(job, Job::LossState) {
            // The host path recomputes in the backward pass: its state is a placeholder of the
            // shared path's shape (a lazy backend described it before it ran).
            let zeros = TensorData::new(vec![0f32; state_len(n)], [state_len(n)]);
            return (loss, Some(CubeBackend::float_from_data(zeros, &logits.device)));
        }
        return (loss, grad);
    };
    match sh.run(&logits, &targets, args.cfg(), &job) {
        Ok(out) => {
            let (client, device) = (logits.client.clone(), logits.device.clone());
            let loss = out.loss.expect("a loss");
            let loss = CubeTensor::new_contiguous(client.clone(), device.clone(), loss_shape, loss, BurnDType::F32);
            let second = match (out.grad, out.state) {
                (Some(g), _) => Some(CubeTensor::new_contiguous(client, device, dims, g, logits.dtype)),
                (_, Some(s)) => {
                    let len = Shape::new([state_len(n)]);
                    Some(CubeTensor::new_contiguous(client, device, len, s, BurnDType::F32))
                }
                _ => None,
            };
            (cast(loss, logits.dtype), second)
        }
        Err(e) => {
            record_error(e);
            nan_outputs(&logits, loss_shape, with_grad)
        }
    }
}

/// f32 values of the state a forward pass keeps for the backward pass: the scalars (8) and
/// three per row.
pub(crate) fn state_len(rows: usize) -> usize {
    8 + 3 * rows
}

impl XentOps for CubeBackend {
    fn xent_cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>, args: XentArgs) -> FloatTensor<Self> {
        forward(logits, targets, &args, Job::Loss).0
    }

    fn xent_cross_entropy_with_grad(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        args: XentArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (loss, grad) = forward(logits, targets, &args, Job::LossGrad);
        (loss, grad.expect("a gradient was asked for"))
    }

    fn xent_cross_entropy_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        args: XentArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (loss, state) = forward(logits, targets, &args, Job::LossState);
        (loss, state.expect("a state was asked for"))
    }

    fn xent_cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        state: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
        args: XentArgs,
    ) -> FloatTensor<Self> {
        let dtype = logits.dtype;
        let upstream = if upstream.dtype == BurnDType::F32 {
            upstream
        } else {
            CubeBackend::float_cast(upstream, FloatDType::F32)
        };
        let upstream = into_contiguous(upstream);
        let (logits, targets) = prepare(logits, targets);
        let dims = logits.meta.shape().clone();
        let n = dims[0];
        let Some(sh) = shared(&logits.device).filter(|_| n > 0) else {
            // The host path: the fused gradient recomputed, times the upstream gradient.
            let grad = run_host(&logits, &targets, &args, true).1.expect("a gradient");
            return crate::ops::scale_by_upstream::<Self>(grad, upstream, args.cfg().reduction, n);
        };
        // Over the logits when nothing else holds them (no new [N, V] buffer at all).
        let in_place = logits.can_mut() && logits.is_contiguous_buffer();
        let job = Job::Backward { state: &state, upstream: &upstream, in_place };
        match sh.run(&logits, &targets, args.cfg(), &job) {
            Ok(out) => match out.grad {
                Some(g) => CubeTensor::new_contiguous(logits.client.clone(), logits.device.clone(), dims, g, dtype),
                None => logits,
            },
            Err(e) => {
                record_error(e);
                nan_outputs(&logits, Shape::new([1]), true).1.expect("a gradient")
            }
        }
    }
}

/// The fused linear cross-entropy on Burn's cube backend: the trait's default methods (the
/// backend's products around xent's fused kernel, one row chunk at a time: `crate::compose`).
impl XentLinearOps for CubeBackend {}

/// Linear log-probs and entropies on Burn's cube backend: the trait's default methods (the
/// backend's own products and element-wise ops, one row chunk at a time: `crate::compose`).
impl XentLogprobsOps for CubeBackend {}

/// xent's counters for a device it shares with Burn (plan buffers, bytes moved between host and
/// device); `None` for a device xent does not share.
pub fn shared_counters(device: &Device) -> Option<xent::CounterSnapshot> {
    match device.clone().inner().as_dispatch() {
        DispatchDevice::Cube(d) => shared(d).map(|s| s.ctx.counters()),
        _ => None,
    }
}
