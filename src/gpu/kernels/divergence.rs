//! Distillation and distribution measures on the GPU: one workgroup per row pair, the two
//! inputs chunked alike; only per-row values (and the gradient, when asked) come back.

use ndarray::{Array1, ArrayView2};

use super::{RowJob, RowResult};
use crate::api::config::{Distill, DistillOutput, Measures};
use crate::check::{probability_rows, same_rows};
use crate::dtype::Logits;
use crate::error::Result;
use crate::gpu::context::GpuContext;
use crate::gpu::params::{flags, Params};
use crate::gpu::source::Shader;

impl GpuContext {
    fn distill_run<'a>(
        &self,
        student: Logits<'a>,
        teacher: Logits<'a>,
        cfg: &Distill,
        grad: bool,
    ) -> Result<DistillOutput> {
        cfg.validate()?;
        same_rows(student.dim(), teacher.dim(), "student and teacher logits")?;
        let (n, v) = student.dim();
        let t = cfg.temperature as f64;
        let (mode, beta) = cfg.mode_code();
        // d(T^2 mean_n D_n)/dx = T / N dD/dz.
        let coef = cfg.grad_scale as f64 * t / n.max(1) as f64;
        let base = Params { mode, beta, inv_temp: (1.0 / t) as f32, grad_scale: coef as f32, ..Params::new(n, v) };
        let out = self.run_rows(RowJob {
            shader: Shader::Distill,
            base,
            input: student,
            second: Some(teacher),
            row_values: 1,
            out_rows: grad,
            out_whole: 0,
        })?;
        let sum: f64 = out.row_values.iter().map(|&d| d as f64).sum();
        Ok(DistillOutput { loss: t * t * sum / n as f64, row_loss: Array1::from(out.row_values), grad: out.out_rows })
    }

    /// Knowledge distillation of `student` towards `teacher` logits (any dtypes; see [`Distill`]).
    pub fn distill<'a, 'b>(
        &self,
        student: impl Into<Logits<'a>>,
        teacher: impl Into<Logits<'b>>,
        cfg: &Distill,
    ) -> Result<DistillOutput> {
        self.distill_run(student.into().reborrow(), teacher.into().reborrow(), cfg, false)
    }

    /// Distillation and its f32 gradient w.r.t. the student logits.
    pub fn distill_with_grad<'a, 'b>(
        &self,
        student: impl Into<Logits<'a>>,
        teacher: impl Into<Logits<'b>>,
        cfg: &Distill,
    ) -> Result<DistillOutput> {
        self.distill_run(student.into().reborrow(), teacher.into().reborrow(), cfg, true)
    }

    /// Entropy, cross-entropy, KL and JS per row of probability rows `p`, `q` (computed in f32).
    pub fn measures(&self, p: ArrayView2<f64>, q: ArrayView2<f64>) -> Result<Measures> {
        same_rows(p.dim(), q.dim(), "p and q")?;
        probability_rows(p, "p")?;
        probability_rows(q, "q")?;
        let (pf, qf) = (p.mapv(|v| v as f32), q.mapv(|v| v as f32));
        self.measures_run((&pf).into(), (&qf).into(), 0)
    }

    /// The same measures of `softmax(p_logits)` and `softmax(q_logits)` (any dtypes).
    pub fn measures_from_logits<'a, 'b>(
        &self,
        p_logits: impl Into<Logits<'a>>,
        q_logits: impl Into<Logits<'b>>,
    ) -> Result<Measures> {
        let (p, q) = (p_logits.into().reborrow(), q_logits.into().reborrow());
        same_rows(p.dim(), q.dim(), "p and q logits")?;
        self.measures_run(p, q, flags::LOGITS)
    }

    fn measures_run<'a>(&self, p: Logits<'a>, q: Logits<'a>, f: u32) -> Result<Measures> {
        let (n, v) = q.dim();
        let RowResult { out_whole, .. } = self.run_rows(RowJob {
            shader: Shader::Dist,
            base: Params { flags: f, ..Params::new(n, v) },
            input: q,
            second: Some(p),
            row_values: 0,
            out_rows: false,
            out_whole: 4,
        })?;
        let col = |k: usize| out_whole.chunks(4).map(|r| r[k] as f64).collect::<Array1<f64>>();
        Ok(Measures { entropy: col(0), cross_entropy: col(1), kl: col(2), js: col(3) })
    }
}
