//! The [`Cpu`] backend type (public at the crate root as `xent::Cpu`).

use std::fmt;
use std::sync::{Arc, RwLock};

use ndarray::{Array2, ArrayView2, ArrayViewMut2};

use super::{bce, cross_entropy, divergence, hessian, linear, log_softmax, Bf16Grad, CpuMatmul};
use crate::api::config::{Bce, BceOutput, CeOutput, CrossEntropy, Distill, DistillOutput, Measures, SoftmaxKind};
use crate::api::config::{CeCall, CeLogits};
use crate::check::BceInput;
use crate::dtype::{DType, Logits};
use crate::error::{Result, XentError};

/// The CPU backend. Owns a thread pool (one thread per core by default).
///
/// ```
/// use ndarray::array;
/// use xent::{Cpu, CrossEntropy};
/// let cpu = Cpu::new();
/// let logits = array![[2.0f32, 0.5, -1.0], [0.0, 0.0, 0.0]];
/// let out = cpu.cross_entropy(&logits, &[0i64, 2][..], &CrossEntropy::default()).unwrap();
/// assert!((out.loss - 0.669_962).abs() < 1e-5);
/// ```
pub struct Cpu {
    pub(super) pool: rayon::ThreadPool,
    /// Matrix-product kernels set by [`Cpu::with_matmul`]; `None`: `XENT_CPU_MATMUL` or cpuid.
    pub(super) matmul: Option<CpuMatmul>,
    /// Set by [`Cpu::with_bf16_grad`]; `None`: `XENT_CPU_BF16_TERMS` or [`Bf16Grad::Split`].
    pub(super) bf16_grad: Option<Bf16Grad>,
}

impl fmt::Debug for Cpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cpu")
            .field("threads", &self.threads())
            .field("matmul", &self.matmul)
            .field("bf16_grad", &self.bf16_grad)
            .finish()
    }
}

impl Default for Cpu {
    fn default() -> Self {
        Self::new()
    }
}

impl Cpu {
    /// A backend with one thread per available core.
    pub fn new() -> Self {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_threads(n).expect("a thread pool with the machine's core count")
    }

    /// A backend with exactly `threads` worker threads.
    pub fn with_threads(threads: usize) -> Result<Self> {
        if threads == 0 {
            return Err(XentError::InvalidOption("threads must be at least 1".into()));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("xent-cpu-{i}"))
            .build()
            .map_err(|e| XentError::InvalidOption(format!("thread pool: {e}")))?;
        Ok(Cpu { pool, matmul: None, bf16_grad: None })
    }

    /// This backend with its matrix products (those of [`Cpu::linear_cross_entropy`]) on
    /// `matmul`'s kernels rather than the best the CPU has (or `XENT_CPU_MATMUL`'s); an
    /// [`XentError::InvalidOption`] when this CPU lacks them.
    ///
    /// ```
    /// use xent::{cpu::CpuMatmul, Cpu, DType};
    /// let cpu = Cpu::new().with_matmul(CpuMatmul::F32)?;
    /// assert_eq!(cpu.linear_matmul(DType::BF16)?, CpuMatmul::F32);
    /// # Ok::<(), xent::XentError>(())
    /// ```
    pub fn with_matmul(mut self, matmul: CpuMatmul) -> Result<Self> {
        self.matmul = Some(matmul.check()?);
        Ok(self)
    }

    /// The kernels [`Cpu::linear_cross_entropy`] runs its products on for `dtype` inputs: those
    /// of [`Cpu::with_matmul`], else `XENT_CPU_MATMUL`'s, else the best the CPU has
    /// ([`CpuMatmul::detect`]), then [`CpuMatmul::F32`] for dtypes they do not take. A bad
    /// `XENT_CPU_MATMUL` is an [`XentError::InvalidOption`], and so, where the answer is
    /// [`CpuMatmul::AmxBf16`], is a bad `XENT_AMX_KC` or `XENT_AMX_MC` (the AMX kernels' block
    /// of `k` and rows per tile, for measuring: multiples of 32 from 32 to 4096).
    pub fn linear_matmul(&self, dtype: DType) -> Result<CpuMatmul> {
        let m = match self.matmul {
            Some(m) => m,
            None => CpuMatmul::from_env()?,
        };
        let m = m.for_dtype(dtype);
        #[cfg(target_arch = "x86_64")]
        if m == CpuMatmul::AmxBf16 {
            super::matmul_amx::blocks().map_err(|e| XentError::InvalidOption(e.into()))?;
        }
        Ok(m)
    }

    /// This backend with its bf16 gradient products taking the f32 gradient as `grad` says
    /// ([`Bf16Grad::Rounded`]: rounded to bf16 as PyTorch's bf16 autograd does, faster and
    /// about 2e-3 relative; the default [`Bf16Grad::Split`] keeps f32 accuracy). Only the bf16
    /// kernels ([`CpuMatmul::Avx512Bf16`], [`CpuMatmul::AmxBf16`]) read it.
    ///
    /// ```
    /// use xent::{cpu::Bf16Grad, Cpu};
    /// let cpu = Cpu::new().with_bf16_grad(Bf16Grad::Rounded);
    /// assert_eq!(cpu.bf16_grad_terms()?, (1, 1));
    /// # Ok::<(), xent::XentError>(())
    /// ```
    pub fn with_bf16_grad(mut self, grad: Bf16Grad) -> Self {
        self.bf16_grad = Some(grad);
        self
    }

    /// bf16 terms of the gradient per product `(G W, G^T H)` on bf16 kernels: those of
    /// [`Cpu::with_bf16_grad`], else `XENT_CPU_BF16_TERMS=gh,gw` (1 to 3 each; a bad value is an
    /// [`XentError::InvalidOption`]), else [`Bf16Grad::Split`]'s.
    pub fn bf16_grad_terms(&self) -> Result<(usize, usize)> {
        match self.bf16_grad {
            Some(g) => Ok(g.terms()),
            None => linear::grad_terms(),
        }
    }

    /// Worker threads in use.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// The cross-entropy on the thread pool, rows in parallel: read logits with the gradient
    /// where `call` says, or logits overwritten by their gradient (the public methods:
    /// `crate::api::methods`).
    pub(crate) fn ce_run(&self, call: CeCall<'_>, cfg: &CrossEntropy) -> Result<CeOutput> {
        match call.logits {
            CeLogits::Read(x) => {
                cross_entropy::cross_entropy(&self.pool, x, call.targets, (cfg, &call.data), call.grad)
            }
            CeLogits::InPlace(x) => {
                cross_entropy::cross_entropy_in_place(&self.pool, x, call.targets, (cfg, &call.data))
            }
        }
    }

    /// Binary cross-entropy from logits `[N, C]` with targets in `[0, 1]` (see [`Bce`]).
    ///
    /// ```
    /// use ndarray::array;
    /// use xent::{Bce, Cpu};
    /// let out = Cpu::new().bce_with_logits(array![[0.0f32]].view(), array![[1.0f32]].view(), &Bce::default()).unwrap();
    /// assert!((out.loss - std::f64::consts::LN_2).abs() < 1e-12);
    /// ```
    pub fn bce_with_logits(&self, logits: ArrayView2<f32>, targets: ArrayView2<f32>, cfg: &Bce) -> Result<BceOutput> {
        bce::bce(&self.pool, logits, targets, cfg, BceInput::Logits)
    }

    /// Binary cross-entropy from probabilities `[N, C]` in `[0, 1]` (logs clamped at -100).
    pub fn bce(&self, probs: ArrayView2<f32>, targets: ArrayView2<f32>, cfg: &Bce) -> Result<BceOutput> {
        bce::bce(&self.pool, probs, targets, cfg, BceInput::Probs)
    }

    /// Distillation's work here (the public methods: `crate::api::methods`).
    pub(crate) fn distill_run(&self, s: Logits<'_>, t: Logits<'_>, cfg: &Distill, grad: bool) -> Result<DistillOutput> {
        divergence::distill(&self.pool, s, t, cfg, grad)
    }

    /// Distillation (as [`Cpu::distill_with_grad`]) writing the f32 gradient w.r.t. the student
    /// logits into `grad` (`[N, V]`, standard layout), which a training loop can reuse from step
    /// to step instead of a fresh `[N, V]` array per call; the output's `grad` is `None`.
    ///
    /// ```
    /// use ndarray::{array, Array2};
    /// use xent::{Cpu, Distill};
    /// let (s, t) = (array![[1.0f32, 2.0, 3.0]], array![[3.0f32, 2.0, 1.0]]);
    /// let mut g = Array2::<f32>::zeros((1, 3));
    /// let out = Cpu::new().distill_into(&s, &t, &Distill::default(), g.view_mut())?;
    /// assert!(out.loss > 0.0 && out.grad.is_none());
    /// assert_eq!(g, Cpu::new().distill_with_grad(&s, &t, &Distill::default())?.grad.unwrap());
    /// # Ok::<(), xent::XentError>(())
    /// ```
    pub fn distill_into<'a, 'b>(
        &self,
        student: impl Into<Logits<'a>>,
        teacher: impl Into<Logits<'b>>,
        cfg: &Distill,
        mut grad: ArrayViewMut2<'_, f32>,
    ) -> Result<DistillOutput> {
        let (s, t) = (student.into(), teacher.into());
        cfg.validate()?;
        crate::check::same_rows(s.dim(), t.dim(), "student and teacher logits")?;
        if grad.dim() != s.dim() {
            return Err(XentError::Shape(format!(
                "the gradient is {:?} for student logits of {:?}",
                grad.dim(),
                s.dim()
            )));
        }
        let Some(g) = grad.as_slice_mut() else {
            return Err(XentError::InvalidOption("the gradient must be a contiguous row-major array".into()));
        };
        divergence::distill_rows(Some(&self.pool), s, t, cfg, Some(g), false)
    }

    /// Entropy, cross-entropy, KL and JS per row of probability rows `p`, `q` (f64).
    pub fn measures(&self, p: ArrayView2<f64>, q: ArrayView2<f64>) -> Result<Measures> {
        divergence::measures(&self.pool, p, q)
    }

    /// The same measures of `softmax(p_logits)` and `softmax(q_logits)`.
    pub fn measures_from_logits<'a, 'b>(
        &self,
        p_logits: impl Into<Logits<'a>>,
        q_logits: impl Into<Logits<'b>>,
    ) -> Result<Measures> {
        divergence::measures_from_logits(&self.pool, p_logits.into(), q_logits.into())
    }

    /// Per-row Hessian-vector products `(diag(p) - p p^T) v` of softmax cross-entropy w.r.t.
    /// the logits, without forming the Hessian.
    pub fn hvp<'a>(&self, logits: impl Into<Logits<'a>>, v: ArrayView2<f32>) -> Result<Array2<f32>> {
        hessian::hvp(&self.pool, logits.into(), v)
    }

    /// Row-wise log-softmax or softmax (f32 output) of logits of any dtype.
    pub fn log_softmax<'a>(&self, logits: impl Into<Logits<'a>>, kind: SoftmaxKind) -> Result<Array2<f32>> {
        log_softmax::log_softmax(&self.pool, logits.into(), kind)
    }
}

/// A process-wide [`Cpu`] that can be replaced: what the framework integrations (`xent-burn`,
/// `xent-candle`) run their CPU calls on, so that a training loop chooses its threads, matrix
/// kernels and bf16 gradient precision once (their `set_cpu`). Made at first use with
/// [`Cpu::new`] unless [`SharedCpu::set`] came first; a call holds the [`Arc`] it got, so
/// replacing the backend never disturbs a call under way.
///
/// ```
/// use xent::cpu::{Bf16Grad, SharedCpu};
/// use xent::Cpu;
///
/// static CPU: SharedCpu = SharedCpu::new();
/// let before = CPU.get(); // one thread per core
/// CPU.set(Cpu::with_threads(1)?.with_bf16_grad(Bf16Grad::Rounded));
/// assert_eq!(CPU.get().threads(), 1);
/// assert_eq!(before.threads(), Cpu::new().threads()); // unchanged for whoever holds it
/// # Ok::<(), xent::XentError>(())
/// ```
#[derive(Debug, Default)]
pub struct SharedCpu(RwLock<Option<Arc<Cpu>>>);

impl SharedCpu {
    /// Empty until first used or set (usable in a `static`).
    pub const fn new() -> Self {
        SharedCpu(RwLock::new(None))
    }

    /// The backend of calls from now on.
    pub fn set(&self, cpu: Cpu) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(cpu));
    }

    /// The backend now ([`Self::set`]'s, else a [`Cpu::new`] made here once).
    pub fn get(&self) -> Arc<Cpu> {
        if let Some(c) = self.0.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return c.clone();
        }
        self.0.write().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(|| Arc::new(Cpu::new())).clone()
    }
}

crate::api::forward_backend!(Cpu, "cpu");
crate::api::methods::backend_methods!(
    Cpu,
    "Cpu",
    "Cpu::new()",
    "```",
    "On the CPU: rows in parallel on its thread pool; the linear forms' products in f32, or with bf16 multiplies and f32 sums for bf16 on AMX-BF16 tiles or AVX512-BF16 ([`crate::Cpu::linear_matmul`]), over chunks of [`LinearCe::chunk_rows`] rows."
);
