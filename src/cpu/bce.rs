//! Binary cross-entropy on the CPU. Elementwise, so it is computed in f64 per element (rows in
//! parallel) and serves as its own reference; tests hold it to PyTorch's golden values.

use ndarray::{Array2, ArrayView2, Axis};
use rayon::prelude::*;

use crate::api::config::{Bce, BceOutput, BceWeight, Reduction};
use crate::check::{bce_inputs, BceInput};
use crate::error::Result;

fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Loss and d(loss)/d(input) of one element with weight `w` and positive weight `pw`.
pub(crate) fn element(x: f64, y: f64, w: f64, pw: f64, input: BceInput) -> (f64, f64) {
    match input {
        BceInput::Logits => {
            let sn = softplus(-x);
            let l = w * (pw * y * sn + (1.0 - y) * (sn + x));
            (l, w * ((1.0 - y) * sigmoid(x) - pw * y * sigmoid(-x)))
        }
        BceInput::Probs => {
            let lp = x.ln().max(-100.0);
            let lq = (-x).ln_1p().max(-100.0);
            (-w * (y * lp + (1.0 - y) * lq), w * (x - y) / ((1.0 - x) * x).max(1e-12))
        }
    }
}

pub(crate) fn bce(
    pool: &rayon::ThreadPool,
    x: ArrayView2<f32>,
    y: ArrayView2<f32>,
    cfg: &Bce,
    input: BceInput,
) -> Result<BceOutput> {
    bce_inputs(x, y, cfg, input)?;
    let (n, c) = x.dim();
    let count = (n * c) as f64;
    let scale = cfg.grad_scale as f64 / if cfg.reduction == Reduction::Mean { count } else { 1.0 };
    let mut loss = Array2::<f32>::zeros((n, c));
    let mut grad = if cfg.grad { Array2::<f32>::zeros((n, c)) } else { Array2::zeros((0, c)) };
    let weight = |r: usize, k: usize| match &cfg.weight {
        None => 1.0,
        Some(BceWeight::PerClass(w)) => w[k] as f64,
        Some(BceWeight::PerElement(w)) => w[[r, k]] as f64,
    };
    let pos = |k: usize| cfg.pos_weight.as_ref().map_or(1.0, |p| p[k] as f64);
    let total: f64 = pool.install(|| {
        let rows = loss.axis_iter_mut(Axis(0)).into_par_iter().enumerate();
        let sum_row =
            |r: usize, mut lrow: ndarray::ArrayViewMut1<f32>, mut grow: Option<ndarray::ArrayViewMut1<f32>>| {
                let mut s = 0.0;
                for k in 0..c {
                    let (l, g) = element(x[[r, k]] as f64, y[[r, k]] as f64, weight(r, k), pos(k), input);
                    s += l;
                    lrow[k] = l as f32;
                    if let Some(gr) = grow.as_mut() {
                        gr[k] = (g * scale) as f32;
                    }
                }
                s
            };
        if cfg.grad {
            rows.zip(grad.axis_iter_mut(Axis(0)).into_par_iter()).map(|((r, l), g)| sum_row(r, l, Some(g))).sum()
        } else {
            rows.map(|(r, l)| sum_row(r, l, None)).sum()
        }
    });
    let loss_value = if cfg.reduction == Reduction::Mean { total / count } else { total };
    Ok(BceOutput {
        loss: loss_value,
        elements: (n * c) as u64,
        elem_loss: (cfg.reduction == Reduction::None).then_some(loss),
        grad: cfg.grad.then_some(grad),
    })
}
