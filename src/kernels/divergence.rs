//! Distillation and distribution measures on the GPU: one workgroup per row pair, the two
//! inputs chunked alike; only per-row values (and the gradient, when asked) come back.

use ndarray::{Array1, Array2, ArrayView2};

use super::source::{Shader, Variant};
use super::{bind, bind_group, dispatch, flags, param_binding, row_chunks, upload_params, Params};
use crate::api::check::{probability_rows, same_rows};
use crate::api::config::{Distill, DistillOutput, Measures};
use crate::context::GpuContext;
use crate::error::{Result, XentError};

use wgpu::BufferUsages as U;

/// Where a row-pair kernel's gradient goes.
pub(crate) enum Grad<'a> {
    /// Not computed.
    None,
    /// Into a pooled buffer, read back.
    Host,
    /// Into the caller's buffer, left on the GPU.
    Device(&'a wgpu::Buffer),
}

/// What a row-pair dispatch returns.
pub(crate) struct PairOut {
    /// Per-row values: 1 per row (distill) or 4 (measures).
    pub rows: Vec<f32>,
    pub grad: Option<Array2<f32>>,
}

impl GpuContext {
    /// Runs `shader` over host row pairs (`x` in slot X, `y` in slot Y). `per_row` values per
    /// row go to ROWS (1) or OUT (4); with `grad`, OUT receives the chunked gradient instead,
    /// read back into `PairOut::grad`.
    pub(crate) fn pair_rows(
        &self,
        shader: Shader,
        x: ArrayView2<f32>,
        y: ArrayView2<f32>,
        base: Params,
        per_row: usize,
        grad: bool,
    ) -> Result<PairOut> {
        let (n, v) = x.dim();
        if n == 0 {
            return Ok(PairOut { rows: vec![], grad: grad.then(|| Array2::zeros((0, v))) });
        }
        let up = |data: &[u8], what: &str| self.upload(data, U::STORAGE, what);
        let xs = x.as_standard_layout();
        let ys = y.as_standard_layout();
        let xb = up(bytemuck::cast_slice(xs.as_slice().expect("standard layout")), "x")?;
        let yb = up(bytemuck::cast_slice(ys.as_slice().expect("standard layout")), "y")?;
        let out =
            self.pair_buffers(shader, (n, v), &xb, &yb, base, per_row, if grad { Grad::Host } else { Grad::None });
        self.give(xb);
        self.give(yb);
        out
    }

    /// The same over rows already on the GPU; the gradient goes to `grad` as asked.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn pair_buffers(
        &self,
        shader: Shader,
        (n, v): (usize, usize),
        xb: &wgpu::Buffer,
        yb: &wgpu::Buffer,
        base: Params,
        per_row: usize,
        grad: Grad<'_>,
    ) -> Result<PairOut> {
        let chunks = row_chunks(self, n, v, "logits")?;
        let want_grad = !matches!(grad, Grad::None);
        let k = self.kernel(shader, Variant { subgroup: self.subgroups, grad: want_grad, ..Default::default() })?;
        let blocks: Vec<Params> = chunks
            .iter()
            .map(|c| Params { n_rows: n as u32, v: v as u32, ..base }.for_chunk(self, c, c.rows))
            .collect();
        let pbuf = upload_params(self, &blocks)?;
        // Per-row values (none for an elementwise output such as Hessian-vector products).
        let row_bytes = (n * per_row) as u64 * 4;
        let rbuf = self.take(row_bytes.max(4), U::STORAGE | U::COPY_SRC, "row values")?;
        let bytes = (n * v) as u64 * 4;
        let own = if matches!(grad, Grad::Host) {
            Some(self.take(bytes, U::STORAGE | U::COPY_SRC, "gradient")?)
        } else {
            None
        };
        let gbuf = match grad {
            Grad::Device(b) => Some(b),
            _ => own.as_ref(),
        };
        let back = if own.is_some() { bytes } else { 0 };
        let out_len = row_bytes + back;
        let staging = self.take(out_len.max(4), U::MAP_READ | U::COPY_DST, "staging")?;
        let bgs: Vec<_> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (off, size) = (c.offset, c.size(v));
                let mut s: [Option<wgpu::BindingResource>; crate::context::SLOTS] = Default::default();
                s[0] = Some(param_binding(&pbuf, i));
                s[1] = Some(bind(xb, off, size));
                s[9] = Some(bind(yb, off, size));
                match per_row {
                    0 => s[8] = gbuf.map(|g| bind(g, off, size)),
                    1 => {
                        s[6] = Some(bind(&rbuf, 0, row_bytes));
                        s[8] = gbuf.map(|g| bind(g, off, size));
                    }
                    _ => s[8] = Some(bind(&rbuf, 0, row_bytes)),
                }
                bind_group(self, &k, s)
            })
            .collect();
        let mut enc = self.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            let runs: Vec<_> = chunks.iter().map(|c| c.rows).zip(&bgs).collect();
            dispatch(self, &mut pass, &k, &runs);
        }
        if row_bytes > 0 {
            enc.copy_buffer_to_buffer(&rbuf, 0, &staging, 0, row_bytes);
        }
        if let Some(g) = &own {
            enc.copy_buffer_to_buffer(g, 0, &staging, row_bytes, bytes);
        }
        self.submit_wait(enc)?;
        let mut host = vec![0f32; (out_len / 4) as usize];
        self.read_staging(&staging, out_len, bytemuck::cast_slice_mut(&mut host))?;
        let grad = own.is_some().then(|| Array2::from_shape_vec((n, v), host[n * per_row..].to_vec()).expect("shape"));
        for b in [pbuf, rbuf, staging].into_iter().chain(own) {
            self.give(b);
        }
        Ok(PairOut { rows: host[..n * per_row].to_vec(), grad })
    }

    /// Row-pair parameters: flags, mode (in `ignore_index`), beta (in `smoothing`), 1/T, scale.
    pub(crate) fn pair_params(flags: u32, mode: i32, beta: f32, inv_temp: f32, grad_scale: f32) -> Params {
        Params { ignore_index: mode, flags, smoothing: beta, inv_temp, grad_scale, ..Params::new(0, 0) }
    }

    /// Knowledge distillation of `student` towards `teacher` logits (see [`Distill`]).
    pub fn distill(&self, student: ArrayView2<f32>, teacher: ArrayView2<f32>, cfg: &Distill) -> Result<DistillOutput> {
        cfg.validate()?;
        same_rows(student.dim(), teacher.dim(), "student and teacher logits")?;
        let out =
            self.pair_rows(Shader::Distill, student, teacher, Self::distill_params(cfg, student.nrows()), 1, cfg.grad)?;
        Ok(Self::distill_output(cfg, out))
    }

    /// Distillation with student and teacher logits already on the GPU (f32 `[rows, classes]`,
    /// `STORAGE`): only the per-row divergences come back; with `cfg.grad`, the gradient
    /// w.r.t. the student logits is written to `grad` and stays on the GPU.
    pub fn distill_device(
        &self,
        student: &wgpu::Buffer,
        teacher: &wgpu::Buffer,
        (rows, classes): (usize, usize),
        grad: Option<&wgpu::Buffer>,
        cfg: &Distill,
    ) -> Result<DistillOutput> {
        cfg.validate()?;
        if classes == 0 {
            return Err(XentError::Shape("student and teacher logits: rows have no classes".into()));
        }
        let need = (rows * classes) as u64 * 4;
        for (b, what) in [(Some(student), "student"), (Some(teacher), "teacher"), (grad, "gradient")] {
            if let Some(b) = b {
                if b.size() < need || !b.usage().contains(U::STORAGE) {
                    return Err(XentError::Shape(format!(
                        "{what} buffer needs {need} bytes with STORAGE usage, has {} bytes ({:?})",
                        b.size(),
                        b.usage()
                    )));
                }
            }
        }
        let dest = match (cfg.grad, grad) {
            (true, Some(g)) => Grad::Device(g),
            (true, None) => return Err(XentError::InvalidOption("cfg.grad needs a gradient buffer".into())),
            (false, _) => Grad::None,
        };
        if rows == 0 {
            return Ok(DistillOutput { loss: f64::NAN, row_loss: Array1::zeros(0), grad: None });
        }
        let out = self.pair_buffers(
            Shader::Distill,
            (rows, classes),
            student,
            teacher,
            Self::distill_params(cfg, rows),
            1,
            dest,
        )?;
        Ok(Self::distill_output(cfg, out))
    }

    fn distill_params(cfg: &Distill, n: usize) -> Params {
        let t = cfg.temperature as f64;
        let (mode, beta) = cfg.mode_code();
        // d(T^2 mean_n D_n)/dx = T / N dD/dz.
        let coef = cfg.grad_scale as f64 * t / n.max(1) as f64;
        Self::pair_params(0, mode, beta, (1.0 / t) as f32, coef as f32)
    }

    fn distill_output(cfg: &Distill, out: PairOut) -> DistillOutput {
        let t = cfg.temperature as f64;
        let n = out.rows.len();
        let sum: f64 = out.rows.iter().map(|&d| d as f64).sum();
        DistillOutput { loss: t * t * sum / n as f64, row_loss: Array1::from(out.rows), grad: out.grad }
    }

    /// Entropy, cross-entropy, KL and JS per row of probability rows `p`, `q` (computed in f32).
    pub fn measures(&self, p: ArrayView2<f64>, q: ArrayView2<f64>) -> Result<Measures> {
        same_rows(p.dim(), q.dim(), "p and q")?;
        probability_rows(p, "p")?;
        probability_rows(q, "q")?;
        let (pf, qf) = (p.mapv(|v| v as f32), q.mapv(|v| v as f32));
        self.measures_run(pf.view(), qf.view(), 0)
    }

    /// The same measures of `softmax(p_logits)` and `softmax(q_logits)`.
    pub fn measures_from_logits(&self, p_logits: ArrayView2<f32>, q_logits: ArrayView2<f32>) -> Result<Measures> {
        same_rows(p_logits.dim(), q_logits.dim(), "p and q logits")?;
        self.measures_run(p_logits, q_logits, flags::LOGITS)
    }

    fn measures_run(&self, p: ArrayView2<f32>, q: ArrayView2<f32>, f: u32) -> Result<Measures> {
        let out = self.pair_rows(Shader::Dist, q, p, Self::pair_params(f, 0, 0.0, 1.0, 1.0), 4, false)?;
        let col = |k: usize| out.rows.chunks(4).map(|r| r[k] as f64).collect::<Array1<f64>>();
        Ok(Measures { entropy: col(0), cross_entropy: col(1), kl: col(2), js: col(3) })
    }
}
