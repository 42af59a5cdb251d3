//! Distillation divergences and distribution measures on the CPU, rows in parallel.
//!
//! Distillation takes the fast path: the row's f32 exponentials from the vectorised kernels of
//! [`super::simd`], each KL term `p_j (log p_j - log q_j)` formed in f32 from the logits'
//! difference (no `log` per element; the generalised JSD's mixture takes one vectorised `log`
//! per element), summed in f32 lanes folded into f64 per block, as cross-entropy's row sums
//! are. The f64 path below (`exp` and `log` per element in f64) is its reference
//! ([`super::reference::distill`]); the measures are computed in f64 too. Tests hold the f64
//! path to PyTorch's golden values, the fast path and the GPU to it.

use ndarray::{Array1, ArrayView2};
use rayon::prelude::*;

use super::simd;
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

/// The per-thread buffers of the fast path: both rows (divided by the temperature in place)
/// and their exponentials.
#[derive(Default)]
struct Scratch {
    zs: Vec<f32>,
    zt: Vec<f32>,
    es: Vec<f32>,
    et: Vec<f32>,
    /// The JSD's `log m_j`.
    lm: Vec<f32>,
}

/// `x / t` in place, then `exp(x_j - m)` into `e`: `(m, S = sum_j exp(x_j - m))`.
fn softmax_parts(x: &mut [f32], t: f32, e: &mut Vec<f32>) -> (f32, f64) {
    x.iter_mut().for_each(|v| *v /= t);
    let m = simd::max(x);
    e.resize(x.len(), 0.0);
    let (a, ties) = simd::exp_sum(x, m, Some(e));
    (m, a + ties)
}

/// One row of forward (`mode` 0) or reverse (1) KL or the generalised JSD (2, with `beta`)
/// and, with `grad`, its gradient w.r.t. the student's logits times `coef` (`T` and the
/// reduction's factor folded in by the caller).
#[allow(clippy::too_many_arguments)]
fn fast_row(
    sc: &mut Scratch,
    student: &Logits<'_>,
    teacher: &Logits<'_>,
    r: usize,
    mode: i32,
    beta: f32,
    t: f32,
    grad: Option<&mut [f32]>,
    coef: f64,
) -> f64 {
    student.row_into(r, &mut sc.zs);
    teacher.row_into(r, &mut sc.zt);
    let (ms, ss) = softmax_parts(&mut sc.zs, t, &mut sc.es);
    let (mt, st) = softmax_parts(&mut sc.zt, t, &mut sc.et);
    // log p_j - log q_j = (z^p_j - z^q_j) - (lse_p - lse_q), formed per element in f32.
    let (lse_s, lse_t) = (ms as f64 + ss.ln(), mt as f64 + st.ln());
    if mode == 0 {
        // KL(t || s) = sum_j pt_j (lt_j - ls_j); d/dz_s = ps - pt.
        let d = simd::weighted_diff_sum(&sc.et, &sc.zt, &sc.zs, (lse_t - lse_s) as f32) / st;
        if let Some(g) = grad {
            simd::scaled_difference(g, &sc.es, &sc.et, (coef / ss) as f32, (coef / st) as f32);
        }
        d
    } else if mode == 2 {
        // beta KL(t || m) + (1 - beta) KL(s || m), m = beta pt + (1 - beta) ps: one logarithm
        // per element (log m); d/dz_s = ps ((1 - beta)(ls - lm) - (1 - beta) KL(s || m)).
        sc.lm.resize(sc.zs.len(), 0.0);
        let (ks, kt) = ((1.0 / ss) as f32, (1.0 / st) as f32);
        let (lse_s, lse_t) = (lse_s as f32, lse_t as f32);
        let (a, b) = simd::jsd_sums(&sc.es, &sc.et, &sc.zs, &sc.zt, ks, kt, lse_s, lse_t, beta, &mut sc.lm);
        let w = 1.0 - beta as f64;
        if let Some(g) = grad {
            simd::jsd_grad(g, &sc.es, &sc.zs, &sc.lm, (coef / ss) as f32, lse_s, w as f32, (w * b) as f32);
        }
        beta as f64 * a + w * b
    } else {
        // KL(s || t) = sum_j ps_j (ls_j - lt_j); d/dz_s = ps ((ls - lt) - KL).
        let c = lse_s - lse_t;
        let d = simd::weighted_diff_sum(&sc.es, &sc.zs, &sc.zt, c as f32) / ss;
        if let Some(g) = grad {
            simd::scaled_log_ratio(g, &sc.es, &sc.zs, &sc.zt, (coef / ss) as f32, (c + d) as f32);
        }
        d
    }
}

/// The f64 row: both log-softmaxes, then [`distill_row`].
#[allow(clippy::too_many_arguments)]
fn f64_row(
    buf: &mut Vec<f32>,
    student: &Logits<'_>,
    teacher: &Logits<'_>,
    r: usize,
    mode: i32,
    beta: f64,
    t: f64,
    grad: Option<&mut [f32]>,
    coef: f64,
) -> f64 {
    student.row_into(r, buf);
    let ls = log_softmax_row(buf, t);
    teacher.row_into(r, buf);
    let lt = log_softmax_row(buf, t);
    distill_row(&ls, &lt, mode, beta, grad, coef)
}

/// Distillation on `pool` (or this thread): the fast path, or with `exact` the f64 one (the
/// reference).
pub(crate) fn distill_with(
    pool: Option<&rayon::ThreadPool>,
    student: Logits<'_>,
    teacher: Logits<'_>,
    cfg: &Distill,
    want_grad: bool,
    exact: bool,
) -> Result<DistillOutput> {
    cfg.validate()?;
    same_rows(student.dim(), teacher.dim(), "student and teacher logits")?;
    let (n, v) = student.dim();
    let mut grad = crate::alloc::zeros2::<f32>(if want_grad { (n, v) } else { (0, v) }, "gradient")?;
    let g = want_grad.then(|| grad.as_slice_mut().expect("fresh array"));
    let mut out = distill_rows(pool, student, teacher, cfg, g, exact)?;
    out.grad = want_grad.then_some(grad);
    Ok(out)
}

/// The rows of a distillation, writing the gradient into `grad` (`N * V` f32, row-major) when
/// given; the output's `grad` is `None`. Options and shapes are checked by the caller.
pub(crate) fn distill_rows(
    pool: Option<&rayon::ThreadPool>,
    student: Logits<'_>,
    teacher: Logits<'_>,
    cfg: &Distill,
    grad: Option<&mut [f32]>,
    exact: bool,
) -> Result<DistillOutput> {
    let (n, v) = student.dim();
    let t = cfg.temperature as f64;
    let (mode, beta) = cfg.mode_code();
    let fast = !exact;
    // d(T^2 mean_n D_n)/dx = T^2 / N * (1/T) dD/dz = T / N * dD/dz (no 1 / N for a sum).
    let coef = cfg.grad_scale as f64 * t * cfg.row_factor(n.max(1));
    let mut rows = vec![0.0f64; n];
    let work = |sc: &mut Scratch, (r, d): (usize, &mut f64), g: Option<&mut [f32]>| {
        *d = if fast {
            fast_row(sc, &student, &teacher, r, mode, beta, t as f32, g, coef)
        } else {
            f64_row(&mut sc.zs, &student, &teacher, r, mode, beta as f64, t, g, coef)
        };
    };
    // A gradient of rows of no classes has nothing to write.
    let grad = grad.filter(|_| v > 0);
    match (pool, grad) {
        (Some(p), Some(g)) => p.install(|| {
            rows.par_iter_mut()
                .enumerate()
                .zip(g.par_chunks_mut(v))
                .for_each_init(Scratch::default, |sc, (rd, g)| work(sc, rd, Some(g)))
        }),
        (Some(p), None) => {
            p.install(|| rows.par_iter_mut().enumerate().for_each_init(Scratch::default, |sc, rd| work(sc, rd, None)))
        }
        (None, Some(g)) => {
            let mut sc = Scratch::default();
            rows.iter_mut().enumerate().zip(g.chunks_mut(v)).for_each(|(rd, g)| work(&mut sc, rd, Some(g)))
        }
        (None, None) => {
            let mut sc = Scratch::default();
            rows.iter_mut().enumerate().for_each(|rd| work(&mut sc, rd, None))
        }
    }
    let loss = t * t * rows.iter().sum::<f64>() * cfg.row_factor(n);
    Ok(DistillOutput { loss, row_loss: rows.iter().map(|&d| d as f32).collect(), grad: None })
}

pub(crate) fn distill(
    pool: &rayon::ThreadPool,
    student: Logits<'_>,
    teacher: Logits<'_>,
    cfg: &Distill,
    want_grad: bool,
) -> Result<DistillOutput> {
    distill_with(Some(pool), student, teacher, cfg, want_grad, false)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::config::DistillMode;
    use ndarray::Array2;

    fn rows(n: usize, v: usize, seed: u64, scale: f32) -> Array2<f32> {
        crate::workload::synthetic(n, v, scale, 0, seed).0
    }

    /// The fast path against the f64 one, per element. In f32 a probability
    /// `p_j = exp(z_j - m) / S` (`z = x / T`, `m` the row's maximum) carries the rounding of
    /// `z_j` and of the exponent's argument, about `(|z_j| + |m| + |z_j - m|) 2^-24`
    /// relative, besides `exp`'s 2 ulp: so each is held to `A_j 2^-22` with
    /// `A_j = 4 + 2 |z_j| + 2 |m|`. A term `p_j ((a_j - b_j) - c)` of the divergence also
    /// carries the rounding of its difference, `(|a_j| + |b_j| + |c|) 2^-24`, and `c` (the
    /// difference of the rows' log-sum-exps) the error of those sums, `sum_j p_j A_j 2^-22`
    /// for each row; a row's divergence is held to the sum of its terms' bounds, and a gradient
    /// entry to `coef` times its terms' bounds. (The f64 path forms `z` and every difference in
    /// f64.) The JSD's terms `p_j (l_j - log m_j)` carry, besides, `log m_j`'s error: `m_j`'s
    /// relative error (at most its two parts') and the logarithm's ulp. So, as in any f32
    /// computation (PyTorch's `kl_div` of f32 log-softmaxes included),
    /// two nearly equal distributions get a divergence of absolute, not relative, accuracy:
    /// about `1e-7 (1 + |z|)`. Entries below f32's smallest normal number are held to it.
    #[test]
    fn fast_path_matches_the_f64_path() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let mut cases: Vec<(String, Array2<f32>, Array2<f32>)> = Vec::new();
        for &(n, v) in &[(1, 1), (3, 7), (17, 515), (4, 4099)] {
            let s = rows(n, v, 1, 4.0);
            cases.push((format!("{n}x{v}"), s.clone(), rows(n, v, 2, 4.0)));
            // Nearly the same distributions: a divergence far below its terms.
            cases.push((format!("{n}x{v} close"), s.clone(), &s + &(rows(n, v, 3, 1.0) * 1e-3)));
            cases.push((format!("{n}x{v} equal"), s.clone(), s.clone()));
        }
        // Large logits, ties at the maximum, and masked classes (-inf) in the teacher.
        let mut s = rows(5, 300, 4, 30.0);
        let mut t = rows(5, 300, 5, 30.0);
        for r in 0..5 {
            s[[r, 10]] = 90.0;
            s[[r, 20]] = 90.0;
            t[[r, 3 * r]] = f32::NEG_INFINITY;
        }
        cases.push(("large, ties, masked".into(), s, t));
        const U: f64 = 1.0 / (1u64 << 22) as f64;
        let mut worst = 0.0f64;
        for (what, s, t) in &cases {
            let masked = t.iter().any(|x| x.is_infinite());
            for mode in [DistillMode::Kl, DistillMode::ReverseKl, DistillMode::Jsd { beta: 0.3 }] {
                if masked && mode == DistillMode::ReverseKl {
                    continue; // +inf, checked below
                }
                for temperature in [1.0f32, 0.5, 3.0] {
                    let cfg = Distill::default().with_mode(mode).with_temperature(temperature).with_grad_scale(1.5);
                    let what = format!("{what} {mode:?} T={temperature}");
                    let fast = distill(&pool, s.view().into(), t.view().into(), &cfg, true).unwrap();
                    let exact = distill_with(None, s.view().into(), t.view().into(), &cfg, true, true).unwrap();
                    let coef = 1.5 * temperature as f64 / s.nrows() as f64;
                    let (gf, ge) = (fast.grad.unwrap(), exact.grad.unwrap());
                    let tau = temperature as f64;
                    for r in 0..s.nrows() {
                        let zs: Vec<f64> = s.row(r).iter().map(|&x| x as f64 / tau).collect();
                        let zt: Vec<f64> = t.row(r).iter().map(|&x| x as f64 / tau).collect();
                        let (ls, lt) =
                            (log_softmax_row(&s.row(r).to_vec(), tau), log_softmax_row(&t.row(r).to_vec(), tau));
                        let max = |z: &[f64]| z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
                        let (ms, mt) = (max(&zs), max(&zt));
                        let a = |z: f64, m: f64| 4.0 + 2.0 * z.abs() + 2.0 * m.abs();
                        // |lse_s - lse_t| and the error of the fast path's log-sum-exps: each is
                        // `m + log S`, `S` a sum of exponentials bound as above.
                        let lse = |z: &[f64], m: f64| m + z.iter().map(|&v| (v - m).exp()).sum::<f64>().ln();
                        let (lse_s, lse_t) = (lse(&zs, ms), lse(&zt, mt));
                        let c = (lse_s - lse_t).abs();
                        let lse_err: f64 = (0..zs.len())
                            .map(|j| {
                                let p = |l: f64, z: f64, m: f64| if l.is_finite() { l.exp() * a(z, m) } else { 0.0 };
                                p(ls[j], zs[j], ms) + p(lt[j], zt[j], mt)
                            })
                            .sum::<f64>()
                            + lse_s.abs()
                            + lse_t.abs();
                        let de = exact.row_loss[r] as f64;
                        let (mut row_bound, mut bounds) = (0.0, Vec::new());
                        if let DistillMode::Jsd { beta } = mode {
                            // Each term p_j (l_j - lm_j) of either KL to the mixture: p_j as
                            // above, l_j = z_j - lse with their roundings and lse's error, and
                            // lm_j = ln m_j with m_j's relative error (at most its two parts')
                            // and ln's ulp.
                            let (b, w) = (beta as f64, 1.0 - beta as f64);
                            let pa = |p: f64, z: f64, m: f64| if p > 0.0 { a(z, m) } else { 0.0 };
                            let mut parts = Vec::new();
                            let (mut sum_t, mut sum_s, mut sg) = (0.0, 0.0, 0.0);
                            for j in 0..zs.len() {
                                let (ps, pt) = (ls[j].exp(), lt[j].exp());
                                let lm = (b * pt + w * ps).ln();
                                let (a_s, a_t) = (pa(ps, zs[j], ms), pa(pt, zt[j], mt));
                                let l_err = a_s.max(a_t) + 1.0 + lm.abs();
                                let term = |p: f64, l: f64, z: f64, ap: f64, lse: f64| {
                                    if p > 0.0 {
                                        U * p * (ap * (l - lm).abs() + z.abs() + lse.abs() + lse_err + l_err)
                                    } else {
                                        0.0
                                    }
                                };
                                sum_t += term(pt, lt[j], zt[j], a_t, lse_t);
                                sum_s += term(ps, ls[j], zs[j], a_s, lse_s);
                                sg += w * ps * (ls[j] - lm);
                                parts.push((ps, ls[j] - lm, a_s, zs[j].abs() + lse_s.abs() + lse_err + l_err));
                            }
                            row_bound = b * sum_t + w * sum_s;
                            for (ps, dl, a_s, rest) in parts {
                                bounds.push(
                                    U * coef * ps * (a_s * (w * dl - sg).abs() + w * rest) + coef * ps * w * sum_s,
                                );
                            }
                        }
                        for j in (0..zs.len()).filter(|_| !matches!(mode, DistillMode::Jsd { .. })) {
                            let (ps, pt) = (ls[j].exp(), lt[j].exp());
                            let (p, lp, lq, ap) = match mode {
                                DistillMode::Kl => (pt, lt[j], ls[j], a(zt[j], mt)),
                                _ => (ps, ls[j], lt[j], a(zs[j], ms)),
                            };
                            let diff = zs[j].abs() + zt[j].abs() + c + lse_err;
                            if p > 0.0 {
                                row_bound += U * p * (ap * (lp - lq).abs() + diff);
                            }
                            bounds.push(match mode {
                                DistillMode::Kl => {
                                    let pa = |p: f64, z: f64, m: f64| if p > 0.0 { p * a(z, m) } else { 0.0 };
                                    U * coef * (pa(ps, zs[j], ms) + pa(pt, zt[j], mt))
                                }
                                _ => U * coef * ps * (a(zs[j], ms) * ((ls[j] - lt[j]).abs() + de) + diff + de),
                            });
                        }
                        let df = fast.row_loss[r] as f64;
                        // Plus the f32 rounding of the row values themselves.
                        let e = (df - de).abs() - 2.0 * f32::EPSILON as f64 * de.abs();
                        assert!(e <= row_bound, "{what} row {r}: {df} vs {de} (bound {row_bound:e})");
                        worst = worst.max(e / row_bound);
                        for (j, b) in bounds.iter().enumerate() {
                            let (x, y) = (gf[[r, j]] as f64, ge[[r, j]] as f64);
                            let e = (x - y).abs() - f32::EPSILON as f64 * y.abs();
                            assert!(e <= b + f32::MIN_POSITIVE as f64, "{what} [{r}, {j}]: {x} vs {y} (bound {b:e})");
                            worst = worst.max(e / (b + f32::MIN_POSITIVE as f64));
                        }
                    }
                }
            }
            if masked {
                let rev = Distill::default().with_mode(DistillMode::ReverseKl);
                let out = distill(&pool, s.view().into(), t.view().into(), &rev, false).unwrap();
                assert_eq!(out.loss, f64::INFINITY, "{what}: reverse KL towards a masked class");
            }
        }
        println!("fast distillation: worst error {worst:.3} of its bound");
    }

    /// 16-bit logits are widened exactly: the fast path on bf16 rows equals it on their f32
    /// values; a NaN logit makes its row's divergence NaN; rows of no classes are an error.
    #[test]
    fn half_rows_and_nan() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let s = rows(6, 333, 7, 3.0).mapv(half::bf16::from_f32);
        let t = rows(6, 333, 8, 3.0).mapv(half::bf16::from_f32);
        let (s32, t32) = (s.mapv(f32::from), t.mapv(f32::from));
        let cfg = Distill::default().with_temperature(2.0);
        let a = distill(&pool, s.view().into(), t.view().into(), &cfg, true).unwrap();
        let b = distill(&pool, s32.view().into(), t32.view().into(), &cfg, true).unwrap();
        assert_eq!(a.loss, b.loss);
        assert_eq!(a.grad, b.grad);
        let mut sn = s32.clone();
        sn[[2, 5]] = f32::NAN;
        let c = distill(&pool, sn.view().into(), t32.view().into(), &cfg, false).unwrap();
        assert!(c.row_loss[2].is_nan() && c.row_loss[1].is_finite() && c.loss.is_nan());
        // Rows of no classes are a shape error on both paths.
        let empty = Array2::<f32>::zeros((3, 0));
        for exact in [false, true] {
            let e = distill_with(Some(&pool), empty.view().into(), empty.view().into(), &cfg, true, exact);
            assert!(matches!(e, Err(crate::error::XentError::Shape(_))), "{e:?}");
        }
    }
}
