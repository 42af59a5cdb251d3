//! Fast f32 row-wise log-softmax and softmax on the CPU.

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use super::simd;
use crate::api::config::SoftmaxKind;
use crate::error::{Result, XentError};

pub(crate) fn log_softmax(pool: &rayon::ThreadPool, logits: ArrayView2<f32>, kind: SoftmaxKind) -> Result<Array2<f32>> {
    let (n, v) = logits.dim();
    if v == 0 {
        return Err(XentError::Shape(format!("logits [{n}, 0] have no classes")));
    }
    let x = logits.as_standard_layout();
    let x = x.as_slice().expect("standard layout");
    let mut out = Array2::<f32>::zeros((n, v));
    let o = out.as_slice_mut().expect("fresh array");
    pool.install(|| {
        o.par_chunks_mut(v).zip(x.par_chunks(v)).for_each(|(o, x)| {
            let m = simd::max(x);
            let (s0, ties) = simd::exp_sum(x, m, Some(o));
            let s = s0 + (ties - 1.0);
            match kind {
                SoftmaxKind::LogSoftmax => {
                    simd::log_softmax_row(x, m, s.ln_1p() as f32, o);
                }
                SoftmaxKind::Softmax => {
                    let inv = (1.0 / (1.0 + s)) as f32;
                    simd::scale_shift(o, inv, 0.0, None);
                }
            }
        })
    });
    Ok(out)
}
