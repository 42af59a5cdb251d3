//! Knowledge distillation of student logits towards teacher logits as a Candle op: xent's
//! fused [`xent::Cpu::distill_with_grad`] (forward KL, reverse KL or generalised JSD at a
//! temperature, `T^2`-scaled), which computes the loss and its gradient w.r.t. the student in
//! one pass over both `[N, V]` inputs, with no `[N, V]` temporaries besides the gradient.
//!
//! The composed Candle equivalent is two `log_softmax`es, an `exp`, a subtraction, a product
//! and a sum, each a pass over `[N, V]` with its own temporary, and as many again in backward.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use xent::{Cpu, Distill, Reduction, XentError};

use crate::linear::{matrix, storage_in};
use crate::{cpu, err};

/// The op: options, the backend, whether Candle will ask for the student's gradient, and the
/// gradient its forward pass leaves for backward.
struct DistillOp {
    cfg: Distill,
    cpu: Arc<Cpu>,
    want_grad: bool,
    grad: Mutex<Option<Tensor>>,
}

impl CustomOp2 for DistillOp {
    fn name(&self) -> &'static str {
        "xent-distill"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let student = matrix(s1, l1, "student logits")?;
        let teacher = matrix(s2, l2, "teacher logits")?;
        let dtype = student.dtype();
        let (n, v) = student.dim();
        let mut out = if self.want_grad {
            self.cpu.distill_with_grad(student, teacher, &self.cfg)
        } else {
            self.cpu.distill(student, teacher, &self.cfg)
        }
        .map_err(err)?;
        if let Some(g) = out.grad.take() {
            let g = Tensor::from_vec(g.into_raw_vec_and_offset().0, (n, v), &candle_core::Device::Cpu)?;
            *self.grad.lock().unwrap_or_else(|p| p.into_inner()) = Some(g);
        }
        Ok(match self.cfg.reduction {
            Reduction::None => (storage_in(self.cfg.row_losses(&out), dtype), Shape::from(n)),
            _ => (storage_in(vec![out.loss as f32], dtype), Shape::from(())),
        })
    }

    fn bwd(
        &self,
        student: &Tensor,
        _teacher: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(crate::saved_times_upstream(&self.grad, grad_res, self.cfg.reduction, student.dtype())?), None))
    }
}

/// Knowledge distillation of `student [N, V]` towards `teacher [N, V]` logits (f32, f16 or
/// bf16 each, on the CPU) with the options of [`Distill`]: forward KL(teacher_T || student_T)
/// by default (Hinton et al.), reverse KL or generalised JSD (`DistillMode`), at temperature
/// `T`, times `T^2`. With `Reduction::Mean` (the default) a scalar, the mean over rows
/// (PyTorch's `F.kl_div(log_softmax(s / T), log_softmax(t / T), log_target=True,
/// reduction='batchmean') * T**2`); with `Sum` the sum; with `None` the `[N]` rows `T^2 D_n`,
/// for masking padded positions before a reduction of one's own. In the student's dtype;
/// arithmetic in f32 with f64 sums (`docs/accuracy.md`).
///
/// Differentiable w.r.t. the student: the gradient is computed in the forward pass (f32) and
/// scaled by the upstream gradient in backward, and not computed at all when the student is
/// not tracked. The teacher is a constant: a teacher that Candle's autograd tracks is an error
/// (pass `teacher.detach()`), since its gradient would otherwise be silently missing.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use xent::{Distill, DistillMode, Reduction};
///
/// let dev = Device::Cpu;
/// let student = Var::new(&[[2.0f32, 0.5, -1.0], [0.1, 0.2, 0.3]], &dev)?;
/// let teacher = Tensor::new(&[[1.5f32, 1.0, -2.0], [0.0, 0.9, 0.3]], &dev)?;
/// let cfg = Distill::default().with_temperature(2.0);
/// let loss = xent_candle::distill(student.as_tensor(), &teacher, &cfg)?;
/// let g = loss.backward()?.get(student.as_tensor()).expect("a gradient").to_vec2::<f32>()?;
/// // A softmax gradient: each row sums to zero.
/// assert!(g.iter().all(|row| row.iter().sum::<f32>().abs() < 1e-6));
///
/// // Per-row losses, masked: the second row is padding.
/// let rows = xent_candle::distill(student.as_tensor(), &teacher, &cfg.with_reduction(Reduction::None))?;
/// let mask = Tensor::new(&[1.0f32, 0.0], &dev)?;
/// let masked = (rows * &mask)?.sum_all()?;
/// let g = masked.backward()?.get(student.as_tensor()).expect("a gradient").to_vec2::<f32>()?;
/// assert!(g[1].iter().all(|&x| x == 0.0));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn distill(student: &Tensor, teacher: &Tensor, cfg: &Distill) -> candle_core::Result<Tensor> {
    if !(student.device().is_cpu() && teacher.device().is_cpu()) {
        return Err(err(XentError::InvalidOption("xent-candle runs on Candle's CPU device".into())));
    }
    if teacher.track_op() {
        return Err(err(XentError::InvalidOption(
            "the teacher logits are tracked by autograd, and distillation differentiates only the student: pass \
             teacher.detach()"
                .into(),
        )));
    }
    cfg.validate().map_err(err)?;
    let op = DistillOp { cfg: cfg.clone(), cpu: cpu(), want_grad: student.track_op(), grad: Mutex::new(None) };
    student.contiguous()?.apply_op2(&teacher.contiguous()?, op)
}
