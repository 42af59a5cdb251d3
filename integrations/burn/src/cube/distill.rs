//! Distillation on Burn's cube backend: xent's recorded [`DistillPlan`] on Burn's own queue,
//! reading the student's and teacher's buffers in place and writing the loss and the f32
//! gradient into buffers Burn owns (see the parent module for the ordering); on cube devices
//! xent does not share, through the host.

use std::sync::{Arc, Mutex};

use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::tensor::{DType as BurnDType, Shape, TensorData};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use cubecl::server::Handle;
use xent::{Distill, DistillInputs, DistillPlan, Logits, Reduction, XentError};

use super::{cast, shared, Server, Shared, PLANS};
use crate::distill::{XentDistillArgs, XentDistillOps};
use crate::ops::{cpu, record_error, xent_dtype};

/// What a distillation plan is for: rows, classes, the two dtypes, options.
pub(super) type DistillKey = (usize, usize, xent::DType, xent::DType, Distill);

/// A distillation plan with a scratch gradient for when Burn places the gradient in a page of
/// the student or the teacher (one buffer cannot be bound read-only and read-write at once).
pub(super) struct DistillPlanned {
    plan: DistillPlan,
    scratch: Mutex<Option<wgpu::Buffer>>,
}

impl Shared {
    fn distill_plan(&self, key: DistillKey) -> Result<Arc<DistillPlanned>, XentError> {
        let mut plans = self.distill_plans.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = plans.iter().position(|(k, _)| k == &key) {
            let hit = plans.remove(i);
            let plan = hit.1.clone();
            plans.push(hit);
            return Ok(plan);
        }
        let (n, v, sd, td, cfg) = &key;
        let planned =
            Arc::new(DistillPlanned { plan: self.ctx.distill_plan(*n, *v, *sd, *td, cfg)?, scratch: Mutex::new(None) });
        if plans.len() == PLANS {
            plans.remove(0);
        }
        plans.push((key, planned.clone()));
        Ok(planned)
    }

    /// Records the distillation of `student` towards `teacher` on Burn's queue: new f32 buffers
    /// from Burn's client for the loss (`[1]`, or the `[N]` divergences `D_n` with reduction
    /// `none`) and, when asked, the gradient.
    fn distill(
        &self,
        student: &CubeTensor,
        teacher: &CubeTensor,
        cfg: &Distill,
        with_grad: bool,
    ) -> Result<(Handle, Option<Handle>), XentError> {
        let client = &student.client;
        let dims = student.meta.shape();
        let (n, v) = (dims[0], dims[1]);
        let (sd, td) = (xent_dtype(student.dtype), xent_dtype(teacher.dtype));
        let planned = self.distill_plan((n, v, sd, td, cfg.clone()))?;
        let plan = &planned.plan;
        let none = cfg.reduction == Reduction::None;
        let loss_bytes = if none { n * 4 } else { 4 };
        let nv4 = (n * v * 4) as u64;
        let loss = client.empty(loss_bytes);
        let grad = with_grad.then(|| client.empty(n * v * 4));
        let gpu = |e: cubecl::server::ServerError| XentError::gpu(format!("Burn's wgpu runtime: {e}"), e);
        // Burn's recorded work (which wrote the inputs) goes to the queue before ours.
        client.flush().map_err(gpu)?;
        let res = |h: &Handle| client.get_resource::<Server>(h.clone()).map_err(gpu);
        let (s, t, l) = (res(&student.handle)?, res(&teacher.handle)?, res(&loss)?);
        let (s, t, l) = (s.resource(), t.resource(), l.resource());
        let g = grad.as_ref().map(res).transpose()?;
        let mut scratch = planned.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let dest = match &g {
            Some(g) if g.resource().buffer == s.buffer || g.resource().buffer == t.buffer => {
                if scratch.as_ref().is_none_or(|b| b.size() < nv4) {
                    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
                    *scratch = Some(self.ctx.create_buffer(nv4, usage, "xent-burn distillation gradient")?);
                }
                scratch.as_ref().map(|b| (b, 0u64))
            }
            Some(g) => Some((&g.resource().buffer, g.resource().offset)),
            None => None,
        };
        let mut enc = self.ctx.device().create_command_encoder(&Default::default());
        let bytes = |d: xent::DType| (n * v * d.size()) as u64;
        let inputs = DistillInputs {
            student: s.buffer.slice(s.offset..s.offset + bytes(sd)),
            teacher: t.buffer.slice(t.offset..t.offset + bytes(td)),
            grad: dest.map(|(b, o)| b.slice(o..o + nv4)),
        };
        plan.record(&mut enc, inputs)?;
        // The loss: the reduced scalar (byte 24 of the plan's scalars) or the per-row values.
        if none {
            enc.copy_buffer_to_buffer(plan.row_buffer(), 0, &l.buffer, l.offset, loss_bytes as u64);
        } else {
            enc.copy_buffer_to_buffer(plan.scalars_buffer(), 24, &l.buffer, l.offset, 4);
        }
        if let (Some(g), Some((b, 0))) = (&g, dest) {
            let g = g.resource();
            if b != &g.buffer {
                enc.copy_buffer_to_buffer(b, 0, &g.buffer, g.offset, nv4);
            }
        }
        self.ctx.submit_encoder(enc)?;
        Ok((loss, grad))
    }
}

/// The host path: both inputs to the host, xent's CPU kernel, loss and gradient back (in the
/// student's dtype). An error leaves NaN outputs and waits in [`crate::take_error`].
fn run_host(
    student: &CubeTensor,
    teacher: &CubeTensor,
    args: &XentDistillArgs,
    with_grad: bool,
) -> (CubeTensor, Option<CubeTensor>) {
    let dims = student.meta.shape().clone();
    let (n, v) = (dims[0], dims[1]);
    let device = student.device.clone();
    let read = |t: &CubeTensor| {
        burn_cubecl::ops::into_data_sync(t.clone()).convert::<f32>().try_to_vec::<f32>().unwrap_or_default()
    };
    let (s, t) = (read(student), read(teacher));
    crate::count_host_transfer();
    let res = match (ndarray::ArrayView2::from_shape((n, v), &s[..]), ndarray::ArrayView2::from_shape((n, v), &t[..])) {
        (Ok(s), Ok(t)) => {
            let (s, t) = (Logits::F32(s), Logits::F32(t));
            if with_grad {
                cpu().distill_with_grad(s, t, args.cfg())
            } else {
                cpu().distill(s, t, args.cfg())
            }
        }
        _ => Err(XentError::gpu_message("student or teacher logits could not be read back")),
    };
    let (values, grad) = match res {
        Ok(out) => (args.loss_values(&out), out.grad.map(|g| g.into_raw_vec_and_offset().0)),
        Err(e) => {
            record_error(e);
            (vec![f32::NAN; args.loss_shape(n).num_elements()], with_grad.then(|| vec![f32::NAN; n * v]))
        }
    };
    let up = |values: Vec<f32>, shape: Shape| {
        cast(CubeBackend::float_from_data(TensorData::new(values, shape), &device), student.dtype)
    };
    (up(values, args.loss_shape(n)), grad.map(|g| up(g, dims.clone())))
}

/// Runs a distillation: on a shared device, or through the host.
fn run(
    student: CubeTensor,
    teacher: CubeTensor,
    args: &XentDistillArgs,
    with_grad: bool,
) -> (CubeTensor, Option<CubeTensor>) {
    let (student, teacher) = (into_contiguous(student), into_contiguous(teacher));
    let dims = student.meta.shape().clone();
    let n = dims[0];
    let Some(sh) = shared(&student.device).filter(|_| n > 0) else {
        return run_host(&student, &teacher, args, with_grad);
    };
    match sh.distill(&student, &teacher, args.cfg(), with_grad) {
        Ok((loss, grad)) => {
            let (client, device) = (student.client.clone(), student.device.clone());
            let loss =
                CubeTensor::new_contiguous(client.clone(), device.clone(), args.loss_shape(n), loss, BurnDType::F32);
            // xent's rows are D_n; the op's rows T^2 D_n (lazily, on the device).
            let loss = if args.cfg().reduction == Reduction::None {
                let t = args.cfg().temperature;
                CubeBackend::float_mul_scalar(loss, (t * t).into())
            } else {
                loss
            };
            let grad =
                grad.map(|g| cast(CubeTensor::new_contiguous(client, device, dims, g, BurnDType::F32), student.dtype));
            (cast(loss, student.dtype), grad)
        }
        Err(e) => {
            record_error(e);
            super::nan_outputs(&student, args.loss_shape(n), with_grad)
        }
    }
}

impl XentDistillOps for CubeBackend {
    fn xent_distill(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        args: XentDistillArgs,
    ) -> FloatTensor<Self> {
        run(student, teacher, &args, false).0
    }

    fn xent_distill_with_grad(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        args: XentDistillArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (loss, grad) = run(student, teacher, &args, true);
        (loss, grad.expect("a gradient was asked for"))
    }

    fn xent_distill_backward(
        grad: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
        args: XentDistillArgs,
    ) -> FloatTensor<Self> {
        let rows = grad.meta.shape()[0];
        crate::ops::scale_by_upstream::<Self>(grad, upstream, args.cfg().reduction, rows)
    }
}
