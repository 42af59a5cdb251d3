//! Second order on the CPU: Hessian-vector products of softmax cross-entropy w.r.t. the logits
//! (`H = diag(p) - p p^T`, the covariance of the softmax distribution), the dense Hessian for
//! small V, and symmetric eigenvalues (Jacobi) to check it is positive semidefinite.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis};
use rayon::prelude::*;

use crate::cpu::divergence::log_softmax_row;
use crate::dtype::Logits;
use crate::error::{Result, XentError};

pub(crate) fn hvp(pool: &rayon::ThreadPool, logits: Logits<'_>, v: ArrayView2<f32>) -> Result<Array2<f32>> {
    crate::check::same_rows(logits.dim(), v.dim(), "logits and v")?;
    let mut out = crate::alloc::zeros2::<f32>(logits.dim(), "Hessian-vector products")?;
    pool.install(|| {
        out.axis_iter_mut(Axis(0)).into_par_iter().enumerate().for_each(|(r, mut o)| {
            let mut buf = Vec::new();
            logits.row_into(r, &mut buf);
            let p: Vec<f64> = log_softmax_row(&buf, 1.0).into_iter().map(f64::exp).collect();
            let pv: f64 = p.iter().zip(v.row(r)).map(|(&p, &x)| p * x as f64).sum();
            for (k, o) in o.iter_mut().enumerate() {
                *o = (p[k] * (v[[r, k]] as f64 - pv)) as f32;
            }
        })
    });
    Ok(out)
}

/// The dense logit-space Hessian `diag(p) - p p^T` of one row's cross-entropy, in f64.
///
/// ```
/// let h = xent::cpu::hessian(ndarray::array![1.4f32, 0.1, -0.8, 0.3].view()).unwrap();
/// assert!(h.rows().into_iter().all(|r| r.sum().abs() < 1e-15)); // rows sum to 0
/// ```
pub fn hessian(logits: ArrayView1<f32>) -> Result<Array2<f64>> {
    let v = logits.len();
    if v == 0 || v > 4096 {
        return Err(XentError::InvalidOption(format!("dense Hessian wants 1..=4096 classes, got {v}")));
    }
    let x: Vec<f32> = logits.to_vec();
    let p: Vec<f64> = log_softmax_row(&x, 1.0).into_iter().map(f64::exp).collect();
    Ok(Array2::from_shape_fn((v, v), |(i, j)| if i == j { p[i] - p[i] * p[i] } else { -p[i] * p[j] }))
}

/// Eigenvalues of a symmetric matrix (cyclic Jacobi rotations), ascending.
pub fn symmetric_eigenvalues(m: &Array2<f64>) -> Result<Array1<f64>> {
    let n = m.nrows();
    if m.ncols() != n {
        return Err(XentError::Shape(format!("matrix is {:?}, not square", m.dim())));
    }
    let mut a = m.clone();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[[i, j]].powi(2))
            .sum();
        if off < 1e-30 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[[p, q]].abs() < 1e-300 {
                    continue;
                }
                let theta = (a[[q, q]] - a[[p, p]]) / (2.0 * a[[p, q]]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let (c, s) = (1.0 / (t * t + 1.0).sqrt(), t / (t * t + 1.0).sqrt());
                for k in 0..n {
                    let (akp, akq) = (a[[k, p]], a[[k, q]]);
                    a[[k, p]] = c * akp - s * akq;
                    a[[k, q]] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[[p, k]], a[[q, k]]);
                    a[[p, k]] = c * apk - s * aqk;
                    a[[q, k]] = s * apk + c * aqk;
                }
            }
        }
    }
    let mut e: Vec<f64> = (0..n).map(|i| a[[i, i]]).collect();
    e.sort_by(f64::total_cmp);
    Ok(Array1::from(e))
}
