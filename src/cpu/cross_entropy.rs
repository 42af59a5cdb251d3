//! Fast cross-entropy on the CPU: rows in parallel, one exponential per element, f32, bf16 or
//! f16 logits with f32 arithmetic.
//!
//! Per row: (1) the max `m`; (2) `e_j = exp(z_j - m)`, summed in f64 blocks *without* the max's
//! own 1, so that `s = sum e_j - 1` keeps its precision when the row is confident (a loss-only
//! row does (1) and (2) in one read, block by block); (3) the gradient row is `K e_j - c0 w_j`,
//! with the target element's `p_t - 1` computed as `(expm1(z_t - m) - s) / (1 + s)`. Where no
//! option needs more, the exponentials go to a scratch row and step (3) writes the destination
//! once, rounded to its dtype in the same pass ([`Finish`]); 16-bit rows are read in registers
//! ([`RowIn::Half`]).

use ndarray::ArrayView2;
use rayon::prelude::*;

use super::simd::{self, RowIn};
use crate::api::config::{CallData, CeOutput, CeOutputs, CrossEntropy, GradDest};
use crate::api::targets::{Targets, IGNORED};
use crate::dtype::{Element, Logits, LogitsMut};
use crate::error::Result;

/// Per-call constants shared by every row.
struct RowCtx<'a> {
    cfg: &'a CrossEntropy,
    /// The per-row results asked for.
    outputs: CeOutputs,
    v: usize,
    cw: Option<&'a [f32]>,
    sw: Option<&'a [f32]>,
    /// Gradient coefficient of the weighted CE part (scale / weight_sum for mean).
    a: f64,
    /// Gradient coefficient of the z-loss part (scale / counted for mean).
    b: f64,
    /// Sum of class weights (V without weights).
    wtot: f64,
    transform: bool,
    /// Probability targets `[N, V]` (row-major) instead of class indices.
    probs: Option<&'a [f32]>,
    /// The gradient rows are rounded to bf16 or f16 and nothing else reads their
    /// exponentials: those may be a few f32 ulp off (`RowIn::exp_sum_ahead`'s `coarse`).
    narrow_grad: bool,
}

/// Per-thread scratch rows: transformed logits, widened logits, exponentials, f32 gradient.
#[derive(Default)]
struct Scratch {
    z: Vec<f32>,
    x: Vec<f32>,
    e: Vec<f32>,
    g: Vec<f32>,
}

/// What one row yields besides its gradient.
#[derive(Clone, Copy, Default)]
struct RowOut {
    /// Weighted loss, CE part (z-loss excluded).
    loss: f64,
    lse: f64,
    max: f32,
    /// Target rank (u32::MAX when ignored); with `ranks`.
    rank: u32,
    /// E_p\[z\] - z_t; with `gaps`.
    gap: f64,
    /// What remains of the gradient row when the row was asked to defer it.
    finish: Finish,
}

/// The last step of a gradient row, left to the caller to fuse with rounding it to 16 bits.
#[derive(Clone, Copy, Default)]
enum Finish {
    /// The f32 row is the gradient.
    #[default]
    Done,
    /// The gradient row is zero (an ignored row).
    Zero,
    /// The f32 row holds exponentials `e_j`: the gradient is `k e_j - c0`, then `gy` at `y`.
    Scale { k: f32, c0: f32, y: usize, gy: f32 },
}

impl RowCtx<'_> {
    /// Whether a 16-bit row may be read in registers ([`RowIn::Half`]): no option of this call
    /// needs the whole row in f32 (transforms, probability targets, ranks, gaps, smoothing).
    fn reads_half_rows(&self) -> bool {
        let cfg = self.cfg;
        !self.transform
            && self.probs.is_none()
            && !self.outputs.ranks
            && !self.outputs.gaps
            && cfg.label_smoothing == 0.0
    }

    /// Whether a row may leave its gradient's last step to the caller ([`Finish`]): the
    /// gradient is `k e_j - c0` throughout (no class weights, transforms or soft targets).
    fn defers(&self) -> bool {
        self.cw.is_none() && !self.transform && self.probs.is_none()
    }

    /// Loss (CE part, weighted) and lse of one row; writes the gradient row if given (with
    /// `defer`, only its exponentials, and says the rest in `RowOut::finish`). `max`: the row's
    /// maximum when the caller already has it (from widening).
    #[allow(clippy::too_many_arguments)]
    fn row(
        &self,
        x: RowIn<'_>,
        max: Option<f32>,
        ahead: &[u8],
        t: i32,
        r: usize,
        mut grad: Option<&mut [f32]>,
        defer: bool,
        sc: &mut Scratch,
    ) -> RowOut {
        let cfg = self.cfg;
        let z = if self.transform {
            let x = f32_row(x);
            let inv_t = 1.0 / cfg.temperature;
            sc.z.clear();
            match cfg.softcap {
                Some(c) => sc.z.extend(x.iter().map(|&v| c * (v * inv_t / c).tanh())),
                None => sc.z.extend(x.iter().map(|&v| v * inv_t)),
            }
            RowIn::F32(&sc.z)
        } else {
            x
        };
        let (m, s0, ties) = match (max, grad.is_none()) {
            // Loss only: the row is read once.
            (None, true) => z.lse_parts(ahead),
            _ => {
                let m = match max {
                    Some(m) if !self.transform => m,
                    _ => z.max(),
                };
                let (s0, ties) = z.exp_sum_ahead(m, grad.as_deref_mut(), ahead, self.narrow_grad);
                (m, s0, ties)
            }
        };
        // s: sum of exp(z_j - m) over all but one occurrence of the max (ties add exact 1s).
        let s = s0 + (ties - 1.0);
        let m64 = m as f64;
        let lse = m64 + s.ln_1p();
        let mut out = RowOut { loss: 0.0, lse, max: m, rank: u32::MAX, gap: 0.0, finish: Finish::Done };
        if let Some(pr) = self.probs {
            out.loss = self.soft_row(f32_row(z), &pr[r * self.v..(r + 1) * self.v], r, s, lse, grad);
            return out;
        }
        if t == IGNORED {
            match grad {
                Some(_) if defer => out.finish = Finish::Zero,
                Some(g) => g.fill(0.0),
                None => {}
            }
            return out;
        }
        let y = t as usize;
        if self.outputs.ranks {
            out.rank = simd::count_greater(f32_row(z), z.at(y)) as u32;
        }
        if self.outputs.gaps {
            let z = f32_row(z);
            // E_p[z] - z_y from the exponentials (in the gradient row when there is one).
            let e: &[f32] = match grad.as_deref() {
                Some(g) => g,
                None => {
                    sc.e.resize(z.len(), 0.0);
                    simd::exp_sum(z, m, Some(&mut sc.e));
                    &sc.e
                }
            };
            let (ez, _) = simd::weighted_sum(z, Some(e));
            // sum_j e_j (z_j - z_y) / (1 + s), with sum_j e_j = 1 + s.
            out.gap = ez / (1.0 + s) - z[y] as f64;
        }
        let swn = self.sw.map_or(1.0, |w| w[r] as f64);
        let w = swn * self.cw.map_or(1.0, |w| w[y] as f64);
        let eps = cfg.label_smoothing as f64;
        let zy = z.at(y) as f64;
        let mut loss = w * (1.0 - eps) * ((m64 - zy) + s.ln_1p());
        if eps > 0.0 {
            let (swz, _) = simd::weighted_sum(f32_row(z), self.cw);
            loss += swn * eps / self.v as f64 * (self.wtot * lse - swz);
        }
        if let Some(g) = grad {
            let big_s = 1.0 + s;
            let hard = self.a * w * (1.0 - eps);
            let c0 = self.a * swn * eps / self.v as f64;
            let k_coef = (hard + c0 * self.wtot + self.b * 2.0 * cfg.z_loss as f64 * lse) / big_s;
            let ey = (zy - m64).exp();
            let cwy = self.cw.map_or(1.0, |w| w[y] as f64);
            let gy = hard * (((zy - m64).exp_m1() - s) / big_s) + (k_coef - hard / big_s) * ey - c0 * cwy;
            if defer {
                out.finish = Finish::Scale { k: k_coef as f32, c0: c0 as f32, y, gy: gy as f32 };
            } else {
                simd::scale_shift(g, k_coef as f32, c0 as f32, self.cw);
                g[y] = gy as f32;
                if self.transform {
                    self.chain(g, f32_row(z));
                }
            }
        }
        out.loss = loss;
        out
    }

    /// A row with probability targets `y`: loss `sw sum_c w_c q_c (lse - z_c)`, gradient
    /// `a sw (sum_c w_c q_c) p_j - a sw w_j q_j` (+ z-loss), with `q = (1 - eps) y + eps / V`.
    fn soft_row(&self, z: &[f32], y: &[f32], r: usize, s: f64, lse: f64, grad: Option<&mut [f32]>) -> f64 {
        let cfg = self.cfg;
        let eps = cfg.label_smoothing;
        let (qa, qb) = (1.0 - eps, eps / self.v as f32);
        let swn = self.sw.map_or(1.0, |w| w[r] as f64);
        let (sqz, sq) = simd::soft_sums(z, y, self.cw, qa, qb);
        let loss = swn * (sq * lse - sqz);
        if let Some(g) = grad {
            let k = (self.a * swn * sq + self.b * 2.0 * cfg.z_loss as f64 * lse) / (1.0 + s);
            simd::soft_grad(g, y, self.cw, qa, qb, k as f32, (self.a * swn) as f32);
            self.chain(g, z);
        }
        loss
    }

    /// Chain rule through temperature and soft-capping.
    fn chain(&self, g: &mut [f32], z: &[f32]) {
        if !self.transform {
            return;
        }
        let cfg = self.cfg;
        let inv_t = 1.0 / cfg.temperature;
        match cfg.softcap {
            Some(c) => g.iter_mut().zip(z).for_each(|(g, &zv)| {
                let th = zv / c;
                *g *= (1.0 - th * th) * inv_t
            }),
            None => g.iter_mut().for_each(|g| *g *= inv_t),
        }
    }
}

/// Rounds a gradient row from scratch `g` into `dst`, with its last step ([`Finish`]) fused.
fn finish<D: Element>(f: Finish, g: &mut [f32], dst: &mut [D]) {
    match f {
        Finish::Done => super::convert::narrow(g, dst),
        Finish::Zero => dst.fill(D::from_f32(0.0)),
        Finish::Scale { k, c0, y, gy } => {
            super::convert::scale_narrow(g, k, c0, dst);
            dst[y] = D::from_f32(gy);
        }
    }
}

/// The f32 row, for the options that need it ([`RowCtx::reads_half_rows`] keeps 16-bit rows
/// read in registers away from them).
fn f32_row(z: RowIn<'_>) -> &[f32] {
    z.as_f32().expect("a 16-bit row read in registers reached an option that needs f32")
}

/// Counted rows and their weight sum, in f64.
pub(crate) fn weight_totals(t: &[i32], cfg: &CrossEntropy, call: &CallData<'_>) -> (u64, f64) {
    let mut counted = 0u64;
    let mut ws = 0.0f64;
    for (r, &y) in t.iter().enumerate() {
        if y != IGNORED {
            counted += 1;
            let sw = call.sw(r);
            let cw = cfg.class_weight.as_ref().map_or(1.0, |w| w[y as usize] as f64);
            ws += sw * cw;
        }
    }
    (counted, ws)
}

/// Row-major element storage of one task's rows.
enum Src<'a, T> {
    Read(&'a [T]),
    InPlace(&'a mut [T]),
}

/// The fast path over logits of any dtype: class or probability targets, the gradient to
/// `dest` or, with `in_place`, over the logits.
pub(crate) fn cross_entropy(
    pool: &rayon::ThreadPool,
    logits: Logits<'_>,
    targets: Targets<'_>,
    (cfg, call): (&CrossEntropy, &CallData<'_>),
    dest: GradDest<'_>,
) -> Result<CeOutput> {
    match logits {
        Logits::F32(x) => run_read(pool, x, targets, (cfg, call), dest),
        Logits::F16(x) => run_read(pool, x, targets, (cfg, call), dest),
        Logits::BF16(x) => run_read(pool, x, targets, (cfg, call), dest),
    }
}

/// Cross-entropy that overwrites `logits` (any dtype) with the gradient.
pub(crate) fn cross_entropy_in_place(
    pool: &rayon::ThreadPool,
    logits: LogitsMut<'_>,
    targets: Targets<'_>,
    cfg: (&CrossEntropy, &CallData<'_>),
) -> Result<CeOutput> {
    fn go<T: Element>(
        pool: &rayon::ThreadPool,
        mut x: ndarray::ArrayViewMut2<T>,
        targets: Targets<'_>,
        cfg: (&CrossEntropy, &CallData<'_>),
    ) -> Result<CeOutput> {
        let dim = x.dim();
        match x.as_slice_mut() {
            Some(s) => run::<T, T>(pool, dim, Src::InPlace(s), targets, cfg, None),
            None => {
                let mut tmp = x.as_standard_layout().into_owned();
                let out = run::<T, T>(pool, dim, Src::InPlace(tmp.as_slice_mut().expect("fresh")), targets, cfg, None)?;
                x.assign(&tmp);
                Ok(out)
            }
        }
    }
    match logits {
        LogitsMut::F32(x) => go(pool, x, targets, cfg),
        LogitsMut::F16(x) => go(pool, x, targets, cfg),
        LogitsMut::BF16(x) => go(pool, x, targets, cfg),
    }
}

fn run_read<T: Element>(
    pool: &rayon::ThreadPool,
    x: ArrayView2<T>,
    targets: Targets<'_>,
    cfg: (&CrossEntropy, &CallData<'_>),
    dest: GradDest<'_>,
) -> Result<CeOutput> {
    let dim = x.dim();
    // Contiguous logits (a copy only if the caller's view is strided).
    let owned;
    let xs: &[T] = match x.to_slice() {
        Some(s) => s,
        None => {
            owned = x.as_standard_layout().into_owned();
            owned.as_slice().expect("standard layout")
        }
    };
    match dest {
        GradDest::None => run::<T, f32>(pool, dim, Src::Read(xs), targets, cfg, None),
        GradDest::New => {
            crate::check::ce_call(dim, &targets, cfg.0, cfg.1)?;
            let mut g = crate::alloc::zeros2::<f32>(dim, "gradient")?;
            let mut out =
                run::<T, f32>(pool, dim, Src::Read(xs), targets, cfg, Some(g.as_slice_mut().expect("fresh")))?;
            out.grad = Some(g);
            Ok(out)
        }
        GradDest::Into(g) => {
            if g.dim() != dim {
                return Err(crate::XentError::Shape(format!(
                    "gradient {:?} and logits {:?} differ in shape",
                    g.dim(),
                    dim
                )));
            }
            fn into<T: Element, G: Element>(
                pool: &rayon::ThreadPool,
                dim: (usize, usize),
                xs: &[T],
                targets: Targets<'_>,
                cfg: (&CrossEntropy, &CallData<'_>),
                mut g: ndarray::ArrayViewMut2<G>,
            ) -> Result<CeOutput> {
                match g.as_slice_mut() {
                    Some(gs) => run::<T, G>(pool, dim, Src::Read(xs), targets, cfg, Some(gs)),
                    None => {
                        let mut tmp = crate::alloc::zeros2::<f32>(dim, "gradient")?;
                        let out = run::<T, f32>(pool, dim, Src::Read(xs), targets, cfg, tmp.as_slice_mut())?;
                        ndarray::Zip::from(&mut g).and(&tmp).for_each(|d, &s| *d = G::from_f32(s));
                        Ok(out)
                    }
                }
            }
            match g {
                LogitsMut::F32(g) => into(pool, dim, xs, targets, cfg, g),
                LogitsMut::F16(g) => into(pool, dim, xs, targets, cfg, g),
                LogitsMut::BF16(g) => into(pool, dim, xs, targets, cfg, g),
            }
        }
    }
}

/// f32 view of an element slice, when the element type is f32.
fn as_f32<T: Element>(s: &[T]) -> Option<&[f32]> {
    (T::DTYPE == crate::DType::F32).then(|| bytemuck::cast_slice(s))
}

fn as_f32_mut<T: Element>(s: &mut [T]) -> Option<&mut [f32]> {
    (T::DTYPE == crate::DType::F32).then(|| bytemuck::cast_slice_mut(s))
}

/// The row loop: rows in parallel tasks, each row widened to f32 when stored narrower, its
/// gradient computed in f32 and rounded once into `grad` (or over the logits when in place).
fn run<T: Element, G: Element>(
    pool: &rayon::ThreadPool,
    (n, v): (usize, usize),
    src: Src<'_, T>,
    targets: Targets<'_>,
    (cfg, call): (&CrossEntropy, &CallData<'_>),
    grad: Option<&mut [G]>,
) -> Result<CeOutput> {
    crate::check::ce_call((n, v), &targets, cfg, call)?;
    let t = targets.normalise(v, cfg.ignore_index)?;
    let probs_owned;
    let probs = match targets {
        Targets::Probs(p) => {
            probs_owned = match p.to_slice() {
                Some(s) => std::borrow::Cow::Borrowed(s),
                None => std::borrow::Cow::Owned(p.iter().copied().collect::<Vec<f32>>()),
            };
            Some(&probs_owned[..])
        }
        _ => None,
    };
    let (counted, weight_sum) = match probs {
        // Every row counts; W = the sum of sample weights (the weights kernel agrees).
        Some(_) => (n as u64, call.sample_weight.as_ref().map_or(n as f64, |w| w.iter().map(|&x| x as f64).sum())),
        None => weight_totals(&t, cfg, call),
    };
    let (a, b) = call.grad_coefficients(cfg, counted, weight_sum);
    let cw = cfg.class_weight.as_ref().map(|w| w.to_vec());
    let sw = call.sample_weight.as_ref().map(|w| w.to_vec());
    let wtot = cw.as_ref().map_or(v as f64, |w| w.iter().map(|&x| x as f64).sum());
    let in_place = matches!(src, Src::InPlace(_));
    let grad_dtype = if in_place { T::DTYPE } else { G::DTYPE };
    let narrow_grad = grad_dtype != crate::DType::F32 && !call.outputs.gaps;
    let ctx = RowCtx {
        cfg,
        outputs: call.outputs,
        v,
        cw: cw.as_deref(),
        sw: sw.as_deref(),
        a,
        b,
        wtot,
        transform: cfg.transforms_logits(),
        probs,
        narrow_grad,
    };
    let want_grad = in_place || grad.is_some();
    let half_rows = ctx.reads_half_rows();
    let defers = ctx.defers();

    let mut rows_out = vec![RowOut::default(); n];
    let rows_per_task = (n / (pool.current_num_threads() * 8)).clamp(1, 256);
    let step = rows_per_task * v;
    // Tasks: (first row, logits rows, gradient rows, outputs).
    type Task<'b, T, G> = (usize, Src<'b, T>, Option<&'b mut [G]>, &'b mut [RowOut]);
    let mut tasks: Vec<Task<T, G>> = Vec::new();
    {
        let mut outs = &mut rows_out[..];
        let mut grads = grad;
        match src {
            Src::Read(x) => {
                for (i, xc) in x.chunks(step.max(1)).enumerate() {
                    let cnt = xc.len() / v;
                    let gc = grads.take().map(|g| {
                        let (head, tail) = g.split_at_mut(cnt * v);
                        grads = Some(tail);
                        head
                    });
                    let (o, rest) = std::mem::take(&mut outs).split_at_mut(cnt);
                    outs = rest;
                    tasks.push((i * rows_per_task, Src::Read(xc), gc, o));
                }
            }
            Src::InPlace(x) => {
                for (i, xc) in x.chunks_mut(step.max(1)).enumerate() {
                    let cnt = xc.len() / v;
                    let (o, rest) = std::mem::take(&mut outs).split_at_mut(cnt);
                    outs = rest;
                    tasks.push((i * rows_per_task, Src::InPlace(xc), None, o));
                }
            }
        }
    }

    let (sum_ce, sum_lse2) = pool.install(|| {
        tasks
            .into_par_iter()
            .map(|(r0, mut xs, mut gs, out)| {
                let mut sc = Scratch::default();
                let (mut sce, mut sl2) = (0.0f64, 0.0f64);
                for (i, o) in out.iter_mut().enumerate() {
                    let r = r0 + i;
                    let span = i * v..(i + 1) * v;
                    // The row as f32: borrowed when it is f32 and read-only, else widened.
                    let mut xw = std::mem::take(&mut sc.x);
                    let (row_in, ahead): (&[T], &[u8]) = match &xs {
                        Src::Read(x) => {
                            (&x[span.clone()], bytemuck::cast_slice(x.get(span.end..span.end + v).unwrap_or(&[])))
                        }
                        Src::InPlace(x) => (&x[span.clone()], &[]),
                    };
                    let (x32, m): (RowIn, Option<f32>) = match (as_f32(row_in), in_place) {
                        (Some(s), false) => (RowIn::F32(s), None),
                        _ => match RowIn::half(row_in).filter(|_| half_rows) {
                            Some(h) => (h, None),
                            None => {
                                xw.resize(v, 0.0);
                                let m = super::convert::widen_max(row_in, &mut xw);
                                (RowIn::F32(&xw), Some(m))
                            }
                        },
                    };
                    let mut gw = std::mem::take(&mut sc.g);
                    *o = if !want_grad {
                        ctx.row(x32, m, ahead, t[r], r, None, false, &mut sc)
                    } else {
                        // Gradient straight into an f32 destination, else into scratch then rounded
                        // (fused with the row's last step where it allows).
                        // Where the row defers its last step, even an f32 gradient takes the
                        // scratch row: the step then writes the destination once, streaming.
                        let direct =
                            gs.as_deref_mut().and_then(|g| as_f32_mut(&mut g[span.clone()])).filter(|_| !defers);
                        match direct {
                            Some(g) => ctx.row(x32, m, ahead, t[r], r, Some(g), false, &mut sc),
                            None => {
                                gw.resize(v, 0.0);
                                let o = ctx.row(x32, m, ahead, t[r], r, Some(&mut gw), defers, &mut sc);
                                match (&mut xs, gs.as_deref_mut()) {
                                    (Src::InPlace(x), _) => finish(o.finish, &mut gw, &mut x[span.clone()]),
                                    (_, Some(g)) => finish(o.finish, &mut gw, &mut g[span.clone()]),
                                    _ => {}
                                }
                                o
                            }
                        }
                    };
                    sc.x = xw;
                    sc.g = gw;
                    sce += o.loss;
                    if t[r] != IGNORED {
                        sl2 += o.lse * o.lse;
                    }
                }
                (sce, sl2)
            })
            .reduce(|| (0.0, 0.0), |x, y| (x.0 + y.0, x.1 + y.1))
    });

    let loss = call.reduce(cfg, sum_ce, sum_lse2, counted, weight_sum);
    let per_row = call.outputs.row_losses(cfg.reduction);
    Ok(CeOutput {
        loss,
        counted,
        weight_sum,
        row_loss: per_row.then(|| {
            let zl = cfg.z_loss as f64;
            rows_out
                .iter()
                .zip(&t)
                .map(|(o, &y)| (o.loss + if y != IGNORED { zl * o.lse * o.lse } else { 0.0 }) as f32)
                .collect()
        }),
        row_lse: call.outputs.per_row.then(|| rows_out.iter().map(|o| o.lse as f32).collect()),
        row_max: call.outputs.ranks.then(|| rows_out.iter().map(|o| o.max).collect()),
        row_rank: call.outputs.ranks.then(|| rows_out.iter().map(|o| o.rank).collect()),
        row_gap: call.outputs.gaps.then(|| rows_out.iter().map(|o| o.gap as f32).collect()),
        grad: None,
    })
}
