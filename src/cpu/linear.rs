//! Fused linear cross-entropy on the CPU: Liger's chunked form on row chunks. For each chunk
//! of rows, `Z = H_c W^T + b` (the `gemm` crate, f32, the machine's threads), xent's fused
//! cross-entropy over `Z` in place (`Z` becomes `G = d loss / d Z`), then
//! `grad_hidden[c] = G W`, `grad_weight += G^T H_c` and `grad_bias += colsum(G)`: three matrix
//! products of work and one `[chunk, V]` workspace. Chunks run in row order and each product's
//! reduction order is fixed by its blocking, not by the thread count, so the results are the
//! same bits on every run and thread count. Rows whose target is ignored are left out of the
//! chunks where nothing per row is asked for (`counted_rows`): padding costs nothing.

use std::borrow::Cow;

use ndarray::{s, Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut2, Zip};
use rayon::prelude::*;

use super::Cpu;
use crate::alloc::zeros2;
use crate::api::config::Totals;
use crate::api::linear::{check, chunk_cfg, chunk_cfg_at, counted_rows, grad_dtype, LinearCe, LinearCeOutput};
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

/// Vocabulary columns per product of [`logits_product`]: the `gemm` crate packs a whole
/// `k x n` panel of its right operand at once, sized from the cache it detects (a VM that
/// reports a 260 MiB L3 gets a 65 MiB panel at V = 32000); blocks of columns bound it to
/// `D x 2048` floats with no loss of speed (each block is still a large product).
const COLS: usize = 2048;

/// `z[b, v] (+)= h[b, d] w[v, d]^T`, block by block of the vocabulary (`accumulate`: onto a
/// bias already in `z`).
pub(super) fn logits_product(
    threads: usize,
    (b, v, d): (usize, usize, usize),
    z: &mut [f32],
    accumulate: bool,
    h: &[f32],
    w: &[f32],
) {
    for c0 in (0..v).step_by(COLS) {
        let nb = (c0 + COLS).min(v) - c0;
        let wt = Mat { data: &w[c0 * d..], rs: 1, cs: d };
        matmul(threads, (b, nb, d), &mut z[c0..], v, accumulate, Mat { data: h, rs: d, cs: 1 }, wt);
    }
}

/// `dst[b, d] = g[b, v] w[v, d]`, summed block by block of the vocabulary (in order): `gemm`
/// packs its whole left operand when the inner dimension is one block, a `[b, V]` copy of the
/// gradient otherwise.
pub(super) fn hidden_grad_product(
    threads: usize,
    (b, d, v): (usize, usize, usize),
    dst: &mut [f32],
    g: &[f32],
    w: &[f32],
) {
    if v == 0 {
        dst.fill(0.0);
    }
    for c0 in (0..v).step_by(COLS) {
        let nb = (c0 + COLS).min(v) - c0;
        let w_kn = Mat { data: &w[c0 * d..], rs: d, cs: 1 };
        matmul(threads, (b, d, nb), dst, d, c0 > 0, Mat { data: &g[c0..], rs: v, cs: 1 }, w_kn);
    }
}

/// `dst[v, d] (+)= g[b, v]^T h[b, d]`, block by block of the vocabulary (rows of `dst`), so
/// that `gemm` packs a `b x 2048` panel of `g` at a time rather than all of it.
pub(super) fn weight_grad_product(
    threads: usize,
    (v, d, b): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    g: &[f32],
    h: &[f32],
) {
    for c0 in (0..v).step_by(COLS) {
        let nb = (c0 + COLS).min(v) - c0;
        let gt = Mat { data: &g[c0..], rs: 1, cs: v };
        matmul(threads, (nb, d, b), &mut dst[c0 * d..], d, accumulate, gt, Mat { data: h, rs: d, cs: 1 });
    }
}

/// Every `[V]` row of `z` set to `bias` (a contiguous copy; the rows in parallel), before the
/// logits product accumulates onto it.
pub(super) fn fill_bias(z: &mut [f32], bias: &[f32]) {
    z.par_chunks_mut(bias.len().max(1)).for_each(|row| row.copy_from_slice(bias));
}

/// `gb[j] += sum over rows of g[., j]` in f64, rows in order for every column (the columns in
/// parallel blocks, so the sums are the same bits on any thread count).
pub(super) fn add_col_sums(gb: &mut [f64], g: &[f32]) {
    const COLS_PER_TASK: usize = 1024;
    let v = gb.len();
    if v == 0 {
        return;
    }
    gb.par_chunks_mut(COLS_PER_TASK).enumerate().for_each(|(i, acc)| {
        let (c0, c1) = (i * COLS_PER_TASK, i * COLS_PER_TASK + acc.len());
        for row in g.chunks_exact(v) {
            acc.iter_mut().zip(&row[c0..c1]).for_each(|(s, &x)| *s += x as f64);
        }
    });
}

/// Batch rows `rows` of `x` as f32 into `out` (row-major, in that order).
pub(super) fn gather_rows(x: &Logits<'_>, rows: &[usize], out: &mut [f32]) {
    fn go<T: Element>(a: &ArrayView2<'_, T>, rows: &[usize], out: &mut [f32]) {
        let d = a.ncols();
        out.par_chunks_mut(d.max(1)).zip(rows.par_iter()).for_each(|(o, &r)| {
            o.iter_mut().zip(a.row(r)).for_each(|(o, &v)| *o = v.to_f32());
        });
    }
    match x {
        Logits::F32(a) => go(a, rows, out),
        Logits::F16(a) => go(a, rows, out),
        Logits::BF16(a) => go(a, rows, out),
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
        // The rows the products run over: all, or the counted ones gathered chunk by chunk.
        let kept = counted_rows(&hidden, &targets, cfg);
        let m = kept.as_ref().map_or(n, |k| k.len());
        let w = f32_rows(&weight);
        let bias_c = bias.map(|b| b.to_vec());
        let mut z = zeros2::<f32>((rows.min(n).max(1), v), "linear cross-entropy workspace")?;
        let widen = hidden.dtype() != DType::F32 || !matches!(&hidden, Logits::F32(a) if a.is_standard_layout());
        let mut h_chunk = if widen || kept.is_some() {
            zeros2::<f32>((rows.min(n).max(1), d), "hidden chunk")?
        } else {
            Array2::zeros((0, 0))
        };
        let mut gh = if cfg.grad_hidden { Some(zeros2::<f32>((n, d), "grad_hidden")?) } else { None };
        // Gathered rows' grad_hidden, scattered back after each chunk.
        let mut gh_chunk = if cfg.grad_hidden && kept.is_some() {
            zeros2::<f32>((rows.min(n).max(1), d), "grad_hidden chunk")?
        } else {
            Array2::zeros((0, 0))
        };
        let mut gw = if cfg.grad_weight { Some(zeros2::<f32>((v, d), "grad_weight")?) } else { None };
        let mut gb = (cfg.grad_bias && bias.is_some()).then(|| vec![0f64; v]);
        let per_row = cfg.ce.per_row || cfg.ce.reduction == crate::Reduction::None;
        let mut row_loss = per_row.then(|| Vec::with_capacity(n));
        let mut row_lse = cfg.ce.per_row.then(|| Vec::with_capacity(n));
        let mut row_rank = cfg.ce.ranks.then(|| Vec::with_capacity(n));
        let mut loss = 0.0;
        for c0 in (0..m).step_by(rows.max(1)) {
            let c1 = (c0 + rows).min(m);
            let b = c1 - c0;
            // This chunk's batch rows: the range c0..c1, or these.
            let idx = kept.as_ref().map(|k| &k[c0..c1]);
            let h: &[f32] = match idx {
                Some(ix) => {
                    let buf = &mut h_chunk.as_slice_mut().expect("fresh")[..b * d];
                    self.pool.install(|| gather_rows(&hidden, ix, buf));
                    buf
                }
                None if widen => {
                    let buf = &mut h_chunk.as_slice_mut().expect("fresh")[..b * d];
                    widen_rows(&hidden, c0, c1, buf);
                    buf
                }
                None => {
                    let Logits::F32(a) = &hidden else { unreachable!("f32 hidden") };
                    &a.as_slice().expect("standard layout")[c0 * d..c1 * d]
                }
            };
            let zc = &mut z.as_slice_mut().expect("fresh")[..b * v];
            if let Some(bias) = bias_c.as_ref() {
                self.pool.install(|| fill_bias(zc, bias));
            }
            // Z = H_c W^T (+ b).
            self.pool.install(|| logits_product(threads, (b, v, d), zc, bias.is_some(), h, &w));
            let (ccfg, t_owned) = match idx {
                Some(ix) => {
                    let t: Array1<i64> = ix.iter().map(|&r| targets.get(r)).collect();
                    (chunk_cfg_at(cfg, totals, ix), Some(t))
                }
                None => (chunk_cfg(cfg, totals, c0..c1), None),
            };
            let t = match (&t_owned, &targets) {
                (Some(t), _) => Targets::I64(t.view()),
                (None, Targets::I64(t)) => Targets::I64(t.slice(s![c0..c1])),
                (None, Targets::I32(t)) => Targets::I32(t.slice(s![c0..c1])),
                (None, Targets::Probs(_)) => unreachable!("checked: class indices"),
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
                let all = gh.as_slice_mut().expect("fresh");
                match idx {
                    Some(ix) => {
                        let dst = &mut gh_chunk.as_slice_mut().expect("fresh")[..b * d];
                        self.pool.install(|| hidden_grad_product(threads, (b, d, v), dst, g, &w));
                        for (row, &r) in dst.chunks(d.max(1)).zip(ix) {
                            all[r * d..(r + 1) * d].copy_from_slice(row);
                        }
                    }
                    None => {
                        let dst = &mut all[c0 * d..c1 * d];
                        self.pool.install(|| hidden_grad_product(threads, (b, d, v), dst, g, &w));
                    }
                }
            }
            if let Some(gw) = gw.as_mut() {
                let dst = gw.as_slice_mut().expect("fresh");
                self.pool.install(|| weight_grad_product(threads, (v, d, b), dst, c0 > 0, g, h));
            }
            if let Some(gb) = gb.as_mut() {
                self.pool.install(|| add_col_sums(gb, g));
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
            grad_hidden: gh.map(|a| Tensor2::from_f32(a, gdt)),
            grad_weight: gw.map(|a| Tensor2::from_f32(a, gdt)),
            grad_bias: gb.map(|b| b.into_iter().map(|x| x as f32).collect()),
            chunk_rows: rows.min(n),
        })
    }
}
