//! Numerically hard rows: confident predictions, masked (-inf) vocabulary, all -inf rows.

mod common;

use common::*;
use ndarray::{array, Array1, Array2};
use xent::cpu::reference;
use xent::*;

/// Rows whose target probability is within ~1e-7 of 1. A naive f32 log-softmax returns a
/// loss of exactly 0 there (PyTorch does); xent must return ~1e-7 with a few ulps of error.
fn confident_rows() -> (Array2<f32>, Array1<i64>) {
    // Row r: target logit 0, the other V-1 logits at -d_r, so s = (V-1) e^-d_r.
    let ds = [14.0f32, 16.0, 17.5, 19.0, 21.0];
    let v = 5;
    let mut x = Array2::<f32>::zeros((ds.len(), v));
    for (r, &d) in ds.iter().enumerate() {
        for c in 0..v {
            x[[r, c]] = if c == r % v { 0.0 } else { -d };
        }
    }
    let t = Array1::from_iter((0..ds.len()).map(|r| (r % v) as i64));
    (x, t)
}

type Run = Box<dyn Fn(&Array2<f32>, &Array1<i64>, &CrossEntropy) -> CeOutput>;

fn all_backends() -> Vec<(String, Run)> {
    let mut v: Vec<(String, Run)> =
        vec![("cpu".into(), Box::new(|x, t, c| Cpu::new().cross_entropy_with_grad(x, t, c).unwrap()))];
    for (name, g) in gpus() {
        v.push((name.into(), Box::new(move |x, t, c| g.cross_entropy_with_grad(x, t, c).unwrap())));
    }
    v
}

#[test]
fn confident_rows_keep_their_tiny_loss_and_gradient() {
    let (x, t) = confident_rows();
    let cfg = CrossEntropy::default().with_reduction(Reduction::None);
    let r = reference::cross_entropy(&x, &t, &cfg).unwrap();
    for (name, run) in all_backends() {
        let o = run(&x, &t, &cfg);
        let rows = o.row_loss.unwrap();
        let g = o.grad.unwrap();
        for i in 0..x.nrows() {
            let want = r.row_loss[i];
            assert!(want > 1e-10 && want < 1e-5, "test row {i} must be confident: {want}");
            let rel = (rows[i] as f64 - want).abs() / want;
            println!("{name} row {i}: loss {:e} want {want:e} rel err {rel:.1e}", rows[i]);
            assert!(rel < 1e-5, "{name} row {i}: loss {} want {want}", rows[i]);
            let y = t[i] as usize;
            let (gy, wy) = (g[[i, y]] as f64, r.grad[[i, y]]);
            assert!(gy < 0.0, "{name} row {i}: target gradient must be non-zero, got {gy}");
            assert!((gy - wy).abs() / wy.abs() < 1e-5, "{name} row {i}: target gradient {gy} want {wy}");
        }
    }
}

#[test]
fn confident_log_softmax() {
    let (x, _) = confident_rows();
    let want = reference::log_softmax(&x, SoftmaxKind::LogSoftmax).unwrap();
    let mut outs = vec![("cpu".to_string(), Cpu::new().log_softmax(&x, SoftmaxKind::LogSoftmax).unwrap())];
    for (name, g) in gpus() {
        outs.push((name.into(), g.log_softmax(&x, SoftmaxKind::LogSoftmax).unwrap()));
    }
    for (name, got) in outs {
        for i in 0..x.nrows() {
            let c = i % 5;
            let (g, w) = (got[[i, c]] as f64, want[[i, c]]);
            assert!(g < 0.0 && (g - w).abs() / w.abs() < 1e-5, "{name} row {i}: log p = {g}, want {w}");
        }
    }
}

#[test]
fn masked_vocabulary_and_all_masked_rows() {
    let ninf = f32::NEG_INFINITY;
    let x = array![
        [1.0, ninf, 2.0, ninf, 0.5],    // masked classes: valid, finite loss
        [ninf, ninf, 3.0, ninf, ninf],  // one live class, which is the target: loss 0
        [1.0, ninf, 2.0, 0.0, 0.5],     // target is masked: +inf loss
        [ninf, ninf, ninf, ninf, ninf]  // all masked: NaN, as in PyTorch
    ];
    let t = array![2i64, 2, 1, 0];
    let none = CrossEntropy::default().with_reduction(Reduction::None);
    let r = reference::cross_entropy(&x, &t, &none).unwrap();
    assert!(r.row_loss[2].is_infinite() && r.row_loss[3].is_nan());
    for (name, run) in all_backends() {
        let o = run(&x, &t, &none);
        let rows = o.row_loss.unwrap();
        assert_close_1d(&format!("{name} rows"), rows.view(), r.row_loss.view(), 1e-6, 1e-6);
        let g = o.grad.unwrap();
        // Masked classes get exactly zero gradient in the live rows.
        for &(i, c) in &[(0, 1), (0, 3), (1, 0), (1, 4)] {
            assert_eq!(g[[i, c]], 0.0, "{name} grad[{i},{c}]");
        }
        assert_close_2d(
            &format!("{name} grad rows 0-1"),
            g.slice(ndarray::s![0..2, ..]),
            r.grad.slice(ndarray::s![0..2, ..]),
            1e-7,
            1e-5,
        );
        assert!(g.row(3).iter().all(|v| v.is_nan()), "{name}: all -inf row has a NaN gradient");
        // The mean over rows with a NaN row is NaN.
        let m = run(&x, &t, &CrossEntropy::default());
        assert!(m.loss.is_nan(), "{name}: mean {}", m.loss);
        // Without the NaN row the mean is +inf.
        let m = run(
            &x.slice(ndarray::s![0..3, ..]).to_owned(),
            &t.slice(ndarray::s![0..3]).to_owned(),
            &CrossEntropy::default(),
        );
        assert!(m.loss.is_infinite() && m.loss > 0.0, "{name}: mean {}", m.loss);
    }
}

#[test]
fn all_ignored_batch() {
    let x = array![[1.0f32, 2.0], [3.0, 4.0]];
    let t = array![-100i64, -100];
    for (name, run) in all_backends() {
        let cfg = CrossEntropy::default();
        let m = run(&x, &t, &cfg);
        assert!(m.loss.is_nan(), "{name}: all-ignored mean must be NaN, got {}", m.loss);
        assert_eq!(m.counted, 0);
        assert!(m.grad.unwrap().iter().all(|&g| g == 0.0), "{name}: all-ignored gradient must be zero");
        let s = run(&x, &t, &cfg.with_reduction(Reduction::Sum));
        assert_eq!(s.loss, 0.0, "{name}: all-ignored sum");
    }
}

#[test]
fn large_logits_do_not_overflow() {
    let x = array![[1e4f32, -1e4, 0.0], [-3e38, 3e38, 0.0], [88.0, 89.0, 90.0]];
    let t = array![1i64, 1, 0];
    let cfg = CrossEntropy::default().with_reduction(Reduction::None);
    let r = reference::cross_entropy(&x, &t, &cfg).unwrap();
    for (name, run) in all_backends() {
        let o = run(&x, &t, &cfg);
        assert_close_1d(&format!("{name} rows"), o.row_loss.unwrap().view(), r.row_loss.view(), 1e-6, 1e-6);
        assert_close_2d(&format!("{name} grad"), o.grad.unwrap().view(), r.grad.view(), 1e-7, 1e-5);
    }
}

/// Confident rows at LLM vocabulary sizes, where one 16-lane sum holds the maximum's 1 and
/// hundreds of tiny terms: the loss (read once) and the gradient (two passes) must keep the
/// tiny sum's precision in every logits dtype, wherever the maximum sits.
#[test]
fn confident_rows_at_llm_vocabularies_keep_their_tiny_loss_and_gradient() {
    let cpu = Cpu::new();
    let mut backends: Vec<(&str, &dyn Backend)> = vec![("cpu", &cpu)];
    for (name, g) in gpus() {
        backends.push((name, g));
    }
    for v in [4099usize, 32000] {
        let (ds, spots) = ([22.0f32, 26.0], [0usize, 1777, v - 1]);
        let n = ds.len() * spots.len();
        let mut x = Array2::<f32>::zeros((n, v));
        let mut t = Array1::<i64>::zeros(n);
        for (r, (d, at)) in ds.iter().flat_map(|d| spots.iter().map(move |a| (d, a))).enumerate() {
            // The others spread over a few values (exact in f16 and bf16), the target the maximum
            // (not 0, so that the loss's unshifted block sums must be scaled by exp(-max)).
            x.row_mut(r).iter_mut().enumerate().for_each(|(j, e)| *e = 5.0 - d - (j % 4) as f32);
            x[[r, *at]] = 5.0;
            t[r] = *at as i64;
        }
        let cfg = CrossEntropy::default().with_reduction(Reduction::None);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let xt = Tensor2::from_f32(x.clone(), dtype);
            let r = reference::cross_entropy(&xt.to_f32(), &t, &cfg).unwrap();
            for &(name, b) in &backends {
                let loss_only = match b.cross_entropy(xt.view(), t.view().into(), &cfg) {
                    // The backend that binds 64 KiB at most takes no row longer than that.
                    Err(XentError::TooLarge { .. }) if name == "gpu-64KiB-bindings" => continue,
                    r => r.unwrap().row_loss.unwrap(),
                };
                let mut g = Tensor2::zeros(dtype, (n, v));
                let with_grad =
                    b.cross_entropy_into(xt.view(), t.view().into(), &cfg, g.view_mut()).unwrap().row_loss.unwrap();
                let g = g.to_f32();
                for i in 0..n {
                    let want = r.row_loss[i];
                    assert!(want > 1e-9 && want < 1e-5, "row {i} must be confident: {want}");
                    for (how, got) in [("loss only", loss_only[i]), ("with gradient", with_grad[i])] {
                        let rel = (got as f64 - want).abs() / want;
                        assert!(rel < 1e-5, "{name} {v} {dtype:?} {how} row {i}: loss {got} want {want}");
                    }
                    let y = t[i] as usize;
                    let (gy, wy) = (g[[i, y]] as f64, r.grad[[i, y]]);
                    // Rounded once to the gradient's dtype (the logits'), from f32: within one ulp
                    // of it (f16's subnormal spacing is 2^-24).
                    let ulp = match dtype {
                        DType::F32 => 0.0,
                        DType::BF16 => wy.abs() / 128.0,
                        DType::F16 => (wy.abs() / 1024.0).max(2f64.powi(-24)),
                    };
                    let tol = 1e-5 * wy.abs() + ulp;
                    assert!((gy - wy).abs() <= tol, "{name} {v} {dtype:?} row {i}: target gradient {gy} want {wy}");
                    // The others, tiny as they are, within the same rounding.
                    for (j, (&gj, &wj)) in g.row(i).iter().zip(r.grad.row(i)).enumerate() {
                        let ulp = match dtype {
                            DType::F32 => 0.0,
                            DType::BF16 => wj.abs() / 128.0,
                            DType::F16 => (wj.abs() / 1024.0).max(2f64.powi(-24)),
                        };
                        let (gj, tol) = (gj as f64, 1e-5 * wj.abs() + ulp);
                        assert!(
                            (gj - wj).abs() <= tol,
                            "{name} {v} {dtype:?} row {i} class {j}: gradient {gj} want {wj}"
                        );
                    }
                }
            }
        }
    }
}
