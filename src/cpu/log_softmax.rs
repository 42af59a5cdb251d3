//! Fast row-wise log-softmax and softmax on the CPU, from logits of any dtype (f32 output).

use ndarray::Array2;
use rayon::prelude::*;

use super::simd;
use crate::api::config::SoftmaxKind;
use crate::dtype::{Element, Logits};
use crate::error::{Result, XentError};

pub(crate) fn log_softmax(pool: &rayon::ThreadPool, logits: Logits<'_>, kind: SoftmaxKind) -> Result<Array2<f32>> {
    let (n, v) = logits.dim();
    if v == 0 {
        return Err(XentError::Shape(format!("logits [{n}, 0] have no classes")));
    }
    let mut out = crate::alloc::zeros2::<f32>((n, v), "log-softmax output")?;
    let o = out.as_slice_mut().expect("fresh array");
    fn rows<T: Element>(pool: &rayon::ThreadPool, x: ndarray::ArrayView2<T>, o: &mut [f32], kind: SoftmaxKind) {
        let v = x.ncols();
        let x = x.as_standard_layout();
        let x = x.as_slice().expect("standard layout");
        pool.install(|| {
            o.par_chunks_mut(v).zip(x.par_chunks(v)).for_each_init(Vec::new, |buf, (o, x)| {
                let x: &[f32] = if T::DTYPE == crate::DType::F32 {
                    bytemuck::cast_slice(x)
                } else {
                    buf.resize(v, 0.0);
                    T::widen(x, buf);
                    buf
                };
                let m = simd::max(x);
                let (s0, ties) = simd::exp_sum(x, m, Some(o));
                let s = s0 + (ties - 1.0);
                match kind {
                    SoftmaxKind::LogSoftmax => simd::log_softmax_row(x, m, s.ln_1p() as f32, o),
                    SoftmaxKind::Softmax => simd::scale_shift(o, (1.0 / (1.0 + s)) as f32, 0.0, None),
                }
            })
        });
    }
    match logits {
        Logits::F32(x) => rows(pool, x, o, kind),
        Logits::F16(x) => rows(pool, x, o, kind),
        Logits::BF16(x) => rows(pool, x, o, kind),
    }
    Ok(out)
}
