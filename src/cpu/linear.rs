//! Fused linear cross-entropy on the CPU: Liger's chunked form on row chunks. For each chunk
//! of rows, `Z = H_c W^T + b` (the `gemm` crate, f32, the machine's threads), xent's fused
//! cross-entropy over `Z` in place (`Z` becomes `G = d loss / d Z`), then
//! `grad_hidden[c] = G W`, `grad_weight += G^T H_c` and `grad_bias += colsum(G)`: three matrix
//! products of work and one `[chunk, V]` workspace. Chunks run in row order and each product's
//! reduction order is fixed by its blocking, not by the thread count, so the results are the
//! same bits on every run and thread count.

use std::borrow::Cow;

use ndarray::{s, Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut2, Zip};

use super::Cpu;
use crate::alloc::zeros2;
use crate::api::config::Totals;
use crate::api::linear::{check, chunk_cfg, grad_dtype, LinearCe, LinearCeOutput};
use crate::api::targets::Targets;
use crate::dtype::{DType, Element, Logits, Tensor2};
use crate::error::Result;

/// `dst[m, n] (+)= lhs[m, k] rhs[k, n]`, each operand given by (slice, row stride, column
/// stride) in elements.
pub(super) struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

pub(super) fn matmul(
    threads: usize,
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rs: usize, cs: usize, rows: usize, cols: usize| (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs;
    assert!(dst.len() > last(dst_rs, 1, m, n), "destination holds the product");
    assert!(k == 0 || lhs.data.len() > last(lhs.rs, lhs.cs, m, k), "lhs holds m x k");
    assert!(k == 0 || rhs.data.len() > last(rhs.rs, rhs.cs, k, n), "rhs holds k x n");
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the asserts above keep every index the strides reach inside the slices; `dst`
    // is borrowed mutably and does not alias `lhs` or `rhs` (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Row-major f32 values of `x` (borrowed when they already are).
pub(super) fn f32_rows<'a>(x: &'a Logits<'_>) -> Cow<'a, [f32]> {
    match x {
        Logits::F32(a) if a.is_standard_layout() => Cow::Borrowed(a.as_slice().expect("standard layout")),
        other => Cow::Owned(other.to_f32().into_raw_vec_and_offset().0),
    }
}

/// Rows `r0..r1` of `x` as f32 into `out` (row-major).
pub(super) fn widen_rows(x: &Logits<'_>, r0: usize, r1: usize, out: &mut [f32]) {
    fn go<T: Element>(a: &ArrayView2<'_, T>, r0: usize, r1: usize, out: &mut [f32]) {
        let d = a.ncols();
        let mut o = ArrayViewMut2::from_shape((r1 - r0, d), out).expect("chunk buffer");
        Zip::from(&mut o).and(a.slice(s![r0..r1, ..])).par_for_each(|o, &v| *o = v.to_f32());
    }
    match x {
        Logits::F32(a) => go(a, r0, r1, out),
        Logits::F16(a) => go(a, r0, r1, out),
        Logits::BF16(a) => go(a, r0, r1, out),
    }
}

pub(super) fn in_dtype(a: Array2<f32>, dtype: DType) -> Tensor2 {
    match dtype {
        DType::F32 => Tensor2::F32(a),
        DType::F16 => Tensor2::F16(a.mapv(half::f16::from_f32)),
        DType::BF16 => Tensor2::BF16(a.mapv(half::bf16::from_f32)),
    }
}

impl Cpu {
    /// Fused linear cross-entropy: the loss of `F.cross_entropy(hidden @ weight.T + bias,
    /// targets)` (PyTorch's semantics, every [`crate::CrossEntropy`] option) and its gradients
    /// w.r.t. `hidden [N, D]`, `weight [V, D]` (both f32, f16 or bf16, one dtype; products in
    /// f32) and `bias [V]`, never holding more than [`LinearCe::chunk_rows`] rows of logits.
    ///
    /// ```
    /// use ndarray::array;
    /// use xent::{Cpu, LinearCe};
    /// let hidden = array![[1.0f32, 0.5], [-0.5, 2.0], [0.0, 1.0]];
    /// let weight = array![[0.2f32, -0.1], [0.4, 0.3], [-0.3, 0.8], [0.1, 0.1]];
    /// let out = Cpu::new().linear_cross_entropy(&hidden, &weight, None, &[1i64, 2, -100][..], &LinearCe::default())?;
    /// assert_eq!(out.grad_weight.unwrap().dim(), (4, 2));
    /// # Ok::<(), xent::XentError>(())
    /// ```
    pub fn linear_cross_entropy<'a, 'b, 'c>(
        &self,
        hidden: impl Into<Logits<'a>>,
        weight: impl Into<Logits<'b>>,
        bias: Option<ArrayView1<'_, f32>>,
        targets: impl Into<Targets<'c>>,
        cfg: &LinearCe,
    ) -> Result<LinearCeOutput> {
        let (hidden, weight, targets) = (hidden.into(), weight.into(), targets.into());
        let (n, d, v) = check(&hidden, &weight, bias, &targets, cfg)?;
        let threads = self.threads();
        let totals = Totals::of(&targets, &cfg.ce);
        let rows = cfg.chunk_rows(n, v);
        let w = f32_rows(&weight);
        let mut z = zeros2::<f32>((rows.min(n).max(1), v), "linear cross-entropy workspace")?;
        let widen = hidden.dtype() != DType::F32 || !matches!(&hidden, Logits::F32(a) if a.is_standard_layout());
        let mut h_chunk =
            if widen { zeros2::<f32>((rows.min(n).max(1), d), "hidden chunk")? } else { Array2::zeros((0, 0)) };
        let mut gh = if cfg.grad_hidden { Some(zeros2::<f32>((n, d), "grad_hidden")?) } else { None };
        let mut gw = if cfg.grad_weight { Some(zeros2::<f32>((v, d), "grad_weight")?) } else { None };
        let mut gb = (cfg.grad_bias && bias.is_some()).then(|| vec![0f64; v]);
        let per_row = cfg.ce.per_row || cfg.ce.reduction == crate::Reduction::None;
        let mut row_loss = per_row.then(|| Vec::with_capacity(n));
        let mut row_lse = cfg.ce.per_row.then(|| Vec::with_capacity(n));
        let mut row_rank = cfg.ce.ranks.then(|| Vec::with_capacity(n));
        let mut loss = 0.0;
        for r0 in (0..n).step_by(rows.max(1)) {
            let r1 = (r0 + rows).min(n);
            let b = r1 - r0;
            let h: &[f32] = if widen {
                let buf = &mut h_chunk.as_slice_mut().expect("fresh")[..b * d];
                widen_rows(&hidden, r0, r1, buf);
                buf
            } else {
                let Logits::F32(a) = &hidden else { unreachable!("f32 hidden") };
                &a.as_slice().expect("standard layout")[r0 * d..r1 * d]
            };
            let zc = &mut z.as_slice_mut().expect("fresh")[..b * v];
            if let Some(bias) = bias {
                for row in zc.chunks_mut(v) {
                    row.iter_mut().zip(bias.iter()).for_each(|(z, &b)| *z = b);
                }
            }
            // Z = H_c W^T (+ b).
            let wt = Mat { data: &w, rs: 1, cs: d };
            self.pool.install(|| matmul(threads, (b, v, d), zc, v, bias.is_some(), Mat { data: h, rs: d, cs: 1 }, wt));
            let ccfg = chunk_cfg(cfg, totals, r0..r1);
            let t = match &targets {
                Targets::I64(t) => Targets::I64(t.slice(s![r0..r1])),
                Targets::I32(t) => Targets::I32(t.slice(s![r0..r1])),
                Targets::Probs(_) => unreachable!("checked: class indices"),
            };
            let out = if gh.is_some() || gw.is_some() || gb.is_some() {
                self.cross_entropy_in_place(ArrayViewMut2::from_shape((b, v), &mut *zc).expect("chunk"), t, &ccfg)?
            } else {
                self.cross_entropy(ArrayView2::from_shape((b, v), &*zc).expect("chunk"), t, &ccfg)?
            };
            loss += out.loss;
            if let (Some(all), Some(part)) = (row_loss.as_mut(), out.row_loss.as_ref()) {
                all.extend(part.iter());
            }
            if let (Some(all), Some(part)) = (row_lse.as_mut(), out.row_lse.as_ref()) {
                all.extend(part.iter());
            }
            if let (Some(all), Some(part)) = (row_rank.as_mut(), out.row_rank.as_ref()) {
                all.extend(part.iter());
            }
            let g: &[f32] = zc;
            if let Some(gh) = gh.as_mut() {
                let dst = &mut gh.as_slice_mut().expect("fresh")[r0 * d..r1 * d];
                let w_kn = Mat { data: &w, rs: d, cs: 1 };
                self.pool.install(|| matmul(threads, (b, d, v), dst, d, false, Mat { data: g, rs: v, cs: 1 }, w_kn));
            }
            if let Some(gw) = gw.as_mut() {
                let dst = gw.as_slice_mut().expect("fresh");
                let gt = Mat { data: g, rs: 1, cs: v };
                self.pool.install(|| matmul(threads, (v, d, b), dst, d, r0 > 0, gt, Mat { data: h, rs: d, cs: 1 }));
            }
            if let Some(gb) = gb.as_mut() {
                for row in g.chunks(v) {
                    gb.iter_mut().zip(row).for_each(|(s, &x)| *s += x as f64);
                }
            }
        }
        let gdt = grad_dtype(cfg, hidden.dtype());
        Ok(LinearCeOutput {
            loss,
            counted: totals.counted,
            weight_sum: totals.weight_sum,
            row_loss: row_loss.map(Array1::from),
            row_lse: row_lse.map(Array1::from),
            row_rank: row_rank.map(Array1::from),
            grad_hidden: gh.map(|a| in_dtype(a, gdt)),
            grad_weight: gw.map(|a| in_dtype(a, gdt)),
            grad_bias: gb.map(|b| b.into_iter().map(|x| x as f32).collect()),
            chunk_rows: rows.min(n),
        })
    }
}
