//! Distillation divergences and distribution measures on the CPU, in f64 per element (rows in
//! parallel). They are elementwise-light row reductions, so the f64 computation is both the
//! CPU path and the reference; tests hold it to PyTorch's golden values and the GPU to it.

use ndarray::{Array1, ArrayView2};
use rayon::prelude::*;

use crate::api::config::{Distill, DistillOutput, Measures};
use crate::check::{probability_rows, same_rows};
use crate::dtype::Logits;
use crate::error::Result;

/// log-softmax of a row divided by `t`, in f64.
pub(crate) fn log_softmax_row(x: &[f32], t: f64) -> Vec<f64> {
    let z: Vec<f64> = x.iter().map(|&v| v as f64 / t).collect();
    let m = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
    let lse = m + z.iter().map(|&v| (v - m).exp()).sum::<f64>().ln();
    z.into_iter().map(|v| v - lse).collect()
}

/// Divergence of one row and its gradient w.r.t. the student's log-probabilities' logits.
fn distill_row(ls: &[f64], lt: &[f64], mode: i32, beta: f64, grad: Option<&mut [f32]>, coef: f64) -> f64 {
    let ps: Vec<f64> = ls.iter().map(|v| v.exp()).collect();
    let pt: Vec<f64> = lt.iter().map(|v| v.exp()).collect();
    let (mut d, mut sg) = (0.0, 0.0);
    let lm: Vec<f64> = (0..ls.len()).map(|k| (beta * pt[k] + (1.0 - beta) * ps[k]).ln()).collect();
    for k in 0..ls.len() {
        match mode {
            0 if pt[k] > 0.0 => d += pt[k] * (lt[k] - ls[k]),
            1 if ps[k] > 0.0 => d += ps[k] * (ls[k] - lt[k]),
            2 => {
                if pt[k] > 0.0 {
                    d += beta * pt[k] * (lt[k] - lm[k]);
                }
                if ps[k] > 0.0 {
                    let g = (1.0 - beta) * (ls[k] - lm[k]);
                    d += ps[k] * g;
                    sg += ps[k] * g;
                }
            }
            _ => {}
        }
    }
    if let Some(g) = grad {
        for k in 0..ls.len() {
            let v = match mode {
                0 => ps[k] - pt[k],
                1 => ps[k] * ((ls[k] - lt[k]) - d),
                _ => ps[k] * ((1.0 - beta) * (ls[k] - lm[k]) - sg),
            };
            g[k] = (coef * v) as f32;
        }
    }
    d
}

pub(crate) fn distill(
    pool: &rayon::ThreadPool,
    student: Logits<'_>,
    teacher: Logits<'_>,
    cfg: &Distill,
    want_grad: bool,
) -> Result<DistillOutput> {
    cfg.validate()?;
    same_rows(student.dim(), teacher.dim(), "student and teacher logits")?;
    let (n, v) = student.dim();
    let t = cfg.temperature as f64;
    let (mode, beta) = cfg.mode_code();
    // d(T^2 mean_n D_n)/dx = T^2 / N * (1/T) dD/dz = T / N * dD/dz (no 1 / N for a sum).
    let coef = cfg.grad_scale as f64 * t * cfg.row_factor(n.max(1));
    let mut grad = crate::alloc::zeros2::<f32>(if want_grad { (n, v) } else { (0, v) }, "gradient")?;
    let mut rows = vec![0.0f64; n];
    pool.install(|| {
        let work = |(r, d): (usize, &mut f64), g: Option<&mut [f32]>| {
            let mut buf = Vec::new();
            student.row_into(r, &mut buf);
            let ls = log_softmax_row(&buf, t);
            teacher.row_into(r, &mut buf);
            let lt = log_softmax_row(&buf, t);
            *d = distill_row(&ls, &lt, mode, beta as f64, g, coef);
        };
        if want_grad {
            rows.par_iter_mut()
                .enumerate()
                .zip(grad.as_slice_mut().expect("fresh array").par_chunks_mut(v))
                .for_each(|(rd, g)| work(rd, Some(g)));
        } else {
            rows.par_iter_mut().enumerate().for_each(|rd| work(rd, None));
        }
    });
    let loss = t * t * rows.iter().sum::<f64>() * cfg.row_factor(n);
    Ok(DistillOutput { loss, row_loss: rows.iter().map(|&d| d as f32).collect(), grad: want_grad.then_some(grad) })
}

fn measure_row(p: &[f64], q: &[f64], lp: &[f64], lq: &[f64]) -> [f64; 4] {
    let (mut h, mut ce, mut kl, mut js) = (0.0, 0.0, 0.0, 0.0);
    for k in 0..p.len() {
        let lm = (0.5 * (p[k] + q[k])).ln();
        if p[k] > 0.0 {
            h -= p[k] * lp[k];
            ce -= p[k] * lq[k];
            kl += p[k] * (lp[k] - lq[k]);
            js += 0.5 * p[k] * (lp[k] - lm);
        }
        if q[k] > 0.0 {
            js += 0.5 * q[k] * (lq[k] - lm);
        }
    }
    [h, ce, kl, js]
}

fn collect(rows: Vec<[f64; 4]>) -> Measures {
    let col = |k: usize| rows.iter().map(|r| r[k]).collect::<Array1<f64>>();
    Measures { entropy: col(0), cross_entropy: col(1), kl: col(2), js: col(3) }
}

/// Measures of probability rows `p`, `q` (f64).
pub(crate) fn measures(pool: &rayon::ThreadPool, p: ArrayView2<f64>, q: ArrayView2<f64>) -> Result<Measures> {
    same_rows(p.dim(), q.dim(), "p and q")?;
    probability_rows(p, "p")?;
    probability_rows(q, "q")?;
    let rows = pool.install(|| {
        (0..p.nrows())
            .into_par_iter()
            .map(|r| {
                let (pr, qr) = (p.row(r).to_vec(), q.row(r).to_vec());
                let lp: Vec<f64> = pr.iter().map(|v| v.ln()).collect();
                let lq: Vec<f64> = qr.iter().map(|v| v.ln()).collect();
                measure_row(&pr, &qr, &lp, &lq)
            })
            .collect()
    });
    Ok(collect(rows))
}

/// Measures of `p = softmax(p_logits)`, `q = softmax(q_logits)`.
pub(crate) fn measures_from_logits(
    pool: &rayon::ThreadPool,
    p_logits: Logits<'_>,
    q_logits: Logits<'_>,
) -> Result<Measures> {
    same_rows(p_logits.dim(), q_logits.dim(), "p and q logits")?;
    let rows = pool.install(|| {
        (0..p_logits.dim().0)
            .into_par_iter()
            .map(|r| {
                let mut buf = Vec::new();
                p_logits.row_into(r, &mut buf);
                let lp = log_softmax_row(&buf, 1.0);
                q_logits.row_into(r, &mut buf);
                let lq = log_softmax_row(&buf, 1.0);
                let p: Vec<f64> = lp.iter().map(|v| v.exp()).collect();
                let q: Vec<f64> = lq.iter().map(|v| v.exp()).collect();
                measure_row(&p, &q, &lp, &lq)
            })
            .collect()
    });
    Ok(collect(rows))
}
