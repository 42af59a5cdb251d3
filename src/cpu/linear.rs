//! Fused linear cross-entropy on the CPU: Liger's chunked form on row chunks. For each chunk
//! of rows, `Z = H_c W^T + b` (the `gemm` crate, f32, the machine's threads), xent's fused
//! cross-entropy over `Z` in place (`Z` becomes `G = d loss / d Z`), then
//! `grad_hidden[c] = G W`, `grad_weight += G^T H_c` and `grad_bias += colsum(G)`: three matrix
//! products of work and one `[chunk, V]` workspace. Chunks run in row order and each product's
//! reduction order is fixed by its blocking, not by the thread count, so the results are the
//! same bits on every run and thread count. Rows whose target is ignored are left out of the
//! chunks where nothing per row is asked for (`counted_rows`): padding costs nothing.
//!
//! bf16 inputs on a CPU with AVX512-BF16 ([`CpuMatmul::Avx512Bf16`]) or AMX-BF16
//! ([`CpuMatmul::AmxBf16`]), chosen by cpuid, `XENT_CPU_MATMUL` or [`Cpu::with_matmul`], take
//! `super::matmul_bf16` (and its AMX kernels, `super::matmul_amx`) instead: the bf16
//! values multiplied as they are, f32 sums, and the f32 gradient `G` split into
//! [`GRAD_TERMS`] bf16 terms per product (the bound is in that module and
//! `docs/cpu-bf16-matmul.md`).

use std::borrow::Cow;

use ndarray::{s, Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut2, Zip};
use rayon::prelude::*;

use super::{Cpu, CpuMatmul};
use crate::alloc::zeros2;
use crate::api::config::{CeCall, CeLogits, GradDest};
use crate::api::linear::{check, counted_rows, grad_dtype, ChunkOutputs, LinearCall, LinearCe, LinearCeOutput};
use crate::api::targets::Targets;
use crate::dtype::{DType, Element, Logits, Tensor2};
use crate::error::{Result, XentError};

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

/// Row `i` of `g` (rows of `v`) times `scale(i)`, the rows in parallel.
fn scale_rows(g: &mut [f32], v: usize, scale: impl Fn(usize) -> f32 + Sync) {
    g.par_chunks_mut(v.max(1)).enumerate().for_each(|(i, row)| {
        let s = scale(i);
        row.iter_mut().for_each(|x| *x *= s);
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

/// bf16 terms of the f32 gradient `G` in `(grad_hidden = G W, grad_weight = G^T H)` on
/// AVX512-BF16 by default ([`super::Bf16Grad::Split`]): two each, `|G - (g_1 + g_2)| <= 2^-16
/// |G|`, so each product is within `2^-16 sum |G| |X|` (+ f32 sums) of the exact one. One term
/// ([`super::Bf16Grad::Rounded`], PyTorch's bf16 autograd: `G` rounded to bf16, `2^-8`) runs
/// these products twice as fast but gives errors of a few 1e-3 of an entry, over the bounds of
/// the f64 and PyTorch float64 checks (`tests/linear.rs`); measured side by side in
/// `docs/cpu-bf16-matmul.md`. `XENT_CPU_BF16_TERMS=gh,gw` (1 to 3 each) sets them for such
/// measurements.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) const GRAD_TERMS: (usize, usize) = (2, 2);

/// [`GRAD_TERMS`], or `XENT_CPU_BF16_TERMS` when set.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) fn grad_terms() -> Result<(usize, usize)> {
    let Ok(s) = std::env::var("XENT_CPU_BF16_TERMS") else { return Ok(GRAD_TERMS) };
    let bad = || XentError::InvalidOption(format!("XENT_CPU_BF16_TERMS={s:?}: give two counts 1 to 3, as 2,1"));
    let parts: Vec<usize> = s.split(',').map(|p| p.trim().parse().map_err(|_| bad())).collect::<Result<_>>()?;
    match parts[..] {
        [gh, gw] if (1..=3).contains(&gh) && (1..=3).contains(&gw) => Ok((gh, gw)),
        _ => Err(bad()),
    }
}

/// The weight as the chosen products read it.
pub(super) enum Weight<'w> {
    /// f32 rows `[V, D]` for the `gemm` crate.
    F32(Cow<'w, [f32]>),
    /// bf16 panels for `vdpbf16ps` or AMX tiles (`kern`): of `W^T [D, V]` for the logits and,
    /// when `grad_hidden` is asked for, of `W [V, D]`; and the terms of `G` per gradient product.
    #[cfg(target_arch = "x86_64")]
    Bf16 {
        fwd: super::matmul_bf16::PackedB,
        bwd: Option<super::matmul_bf16::PackedB>,
        terms: (usize, usize),
        /// [`CpuMatmul::Avx512Bf16`] or [`CpuMatmul::AmxBf16`].
        kern: CpuMatmul,
    },
}

/// One chunk's hidden rows, row-major `[b, D]`: f32, or bf16 bits for the bf16 products.
#[derive(Clone, Copy)]
pub(super) enum Rows<'a> {
    /// For [`Weight::F32`].
    F32(&'a [f32]),
    /// For [`Weight::Bf16`].
    Bf16(&'a [u16]),
}

impl<'w> Weight<'w> {
    /// `weight [V, D]` for `path`'s products (`grad_hidden`: also the panels of `G W`).
    /// `terms`: of `G` per gradient product on bf16 kernels ([`Cpu::bf16_grad_terms`]).
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    pub(super) fn new(
        weight: &'w Logits<'_>,
        path: CpuMatmul,
        grad_hidden: bool,
        terms: (usize, usize),
    ) -> Result<Weight<'w>> {
        match (path, weight) {
            #[cfg(target_arch = "x86_64")]
            (CpuMatmul::Avx512Bf16 | CpuMatmul::AmxBf16, Logits::BF16(a)) => {
                use super::matmul_bf16::PackedB;
                let (v, d) = a.dim();
                let std = a.as_standard_layout();
                let bits: &[u16] = bytemuck::cast_slice(std.as_slice().expect("standard layout"));
                // B[k = d, n = v] = W[v, d] and B[k = v, n = d] = W[v, d].
                let fwd = PackedB::new(bits, (d, v), 1, d);
                let bwd = grad_hidden.then(|| PackedB::new(bits, (v, d), d, 1));
                Ok(Weight::Bf16 { fwd, bwd, terms, kern: path })
            }
            _ => Ok(Weight::F32(f32_rows(weight))),
        }
    }

    /// Whether the products take bf16 hidden rows ([`Rows::Bf16`]).
    pub(super) fn bf16(&self) -> bool {
        !matches!(self, Weight::F32(_))
    }

    /// `z[b, v] (+)= h[b, d] w[v, d]^T`.
    pub(super) fn logits(
        &self,
        threads: usize,
        (b, v, d): (usize, usize, usize),
        z: &mut [f32],
        accumulate: bool,
        h: Rows<'_>,
    ) {
        match (self, h) {
            (Weight::F32(w), Rows::F32(h)) => logits_product(threads, (b, v, d), z, accumulate, h, w),
            #[cfg(target_arch = "x86_64")]
            (Weight::Bf16 { fwd, kern, .. }, Rows::Bf16(h)) => {
                use super::matmul_bf16::Lhs;
                bf16_gemm(*kern, threads, (b, v, d), z, v, accumulate, Lhs::Bf16Rows { data: h, rs: d }, 1, fwd)
            }
            _ => unreachable!("hidden rows in the weight's form"),
        }
    }

    /// `dst[b, d] = g[b, v] w[v, d]`.
    pub(super) fn hidden_grad(&self, threads: usize, (b, d, v): (usize, usize, usize), dst: &mut [f32], g: &[f32]) {
        match self {
            Weight::F32(w) => hidden_grad_product(threads, (b, d, v), dst, g, w),
            #[cfg(target_arch = "x86_64")]
            Weight::Bf16 { bwd, terms, kern, .. } => {
                use super::matmul_bf16::Lhs;
                let bwd = bwd.as_ref().expect("packed for grad_hidden");
                bf16_gemm(*kern, threads, (b, d, v), dst, d, false, Lhs::F32Rows { data: g, rs: v }, terms.0, bwd)
            }
        }
    }

    /// `dst[v, d] (+)= g[b, v]^T h[b, d]`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn weight_grad(
        &self,
        threads: usize,
        (v, d, b): (usize, usize, usize),
        dst: &mut [f32],
        accumulate: bool,
        g: &[f32],
        h: Rows<'_>,
    ) {
        match (self, h) {
            (Weight::F32(_), Rows::F32(h)) => weight_grad_product(threads, (v, d, b), dst, accumulate, g, h),
            #[cfg(target_arch = "x86_64")]
            (Weight::Bf16 { terms, kern, .. }, Rows::Bf16(h)) => {
                use super::matmul_bf16::{Lhs, PackedB};
                // B[k = row, n = d] = h[row, d].
                let hb = PackedB::new(h, (b, d), d, 1);
                let g = Lhs::F32Cols { data: g, cs: v };
                bf16_gemm(*kern, threads, (v, d, b), dst, d, accumulate, g, terms.1, &hb)
            }
            _ => unreachable!("hidden rows in the weight's form"),
        }
    }
}

/// `super::matmul_bf16::gemm` on the kernels `kern` names: AMX tiles for
/// [`CpuMatmul::AmxBf16`], else `vdpbf16ps`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn bf16_gemm(
    kern: CpuMatmul,
    threads: usize,
    shape: (usize, usize, usize),
    c: &mut [f32],
    c_rs: usize,
    accumulate: bool,
    a: super::matmul_bf16::Lhs<'_>,
    terms: usize,
    b: &super::matmul_bf16::PackedB,
) {
    use super::matmul_amx::{Amx, Native};
    use super::matmul_bf16::{gemm, Dp};
    if kern == CpuMatmul::AmxBf16 {
        assert!(super::matmul_amx::available() || super::matmul_amx::emulated(), "AMX-BF16");
        gemm::<Amx<Native>>(threads, shape, c, c_rs, accumulate, a, terms, b)
    } else {
        gemm::<Dp>(threads, shape, c, c_rs, accumulate, a, terms, b)
    }
}

/// Rows of a batch: these, or the range `r0..r1`.
#[derive(Clone, Copy)]
pub(super) enum RowSel<'a> {
    Rows(&'a [usize]),
    Range(usize, usize),
}

/// bf16 rows of `x` (bf16): `rows` gathered, or the range `r0..r1` (borrowed when contiguous),
/// into `buf` when copied.
pub(super) fn bf16_rows<'a>(x: &'a Logits<'_>, sel: RowSel<'_>, buf: &'a mut Vec<u16>) -> &'a [u16] {
    let Logits::BF16(a) = x else { unreachable!("bf16 hidden states") };
    let d = a.ncols();
    if let RowSel::Range(r0, r1) = sel {
        if let Some(all) = a.as_slice() {
            return bytemuck::cast_slice(&all[r0 * d..r1 * d]);
        }
    }
    let n = match sel {
        RowSel::Rows(ix) => ix.len(),
        RowSel::Range(r0, r1) => r1 - r0,
    };
    buf.clear();
    buf.resize(n * d, 0);
    buf.par_chunks_mut(d.max(1)).enumerate().for_each(|(i, o)| {
        let r = match sel {
            RowSel::Rows(ix) => ix[i],
            RowSel::Range(r0, _) => r0 + i,
        };
        o.iter_mut().zip(a.row(r)).for_each(|(o, v)| *o = v.to_bits());
    });
    buf
}

/// What the chunk loop of the fused linear losses runs over, besides the operands.
pub(super) struct ChunkRun<'k> {
    /// Rows of logits per chunk.
    pub rows: usize,
    /// The batch rows the products run over, when not all of them (see `counted_rows`).
    pub kept: Option<&'k [usize]>,
    pub grad_hidden: bool,
    pub grad_weight: bool,
    pub grad_bias: bool,
}

impl ChunkRun<'_> {
    /// Whether any gradient is asked for (the bias's only when there is a bias).
    pub fn any_grad(&self, has_bias: bool) -> bool {
        self.grad_hidden || self.grad_weight || (self.grad_bias && has_bias)
    }
}

/// The f32 gradients a chunk loop accumulates (`bias` in f64).
pub(super) struct ChunkGrads {
    pub hidden: Option<Array2<f32>>,
    pub weight: Option<Array2<f32>>,
    pub bias: Option<Vec<f64>>,
}

impl Cpu {
    /// The chunk loop of the fused linear losses: for each chunk of rows, `Z = H_c W^T + b`
    /// into a `[chunk, V]` workspace, then `step(c0, c1, rows, Z)` (the chunk's batch rows:
    /// the range `c0..c1` of the rows run over, and their batch indices when gathered), which
    /// overwrites `Z` with `G = d loss / d Z` where gradients are asked for; then
    /// `grad_hidden[c] = G W`, `grad_weight += G^T H_c` and `grad_bias += colsum(G)`. Chunks
    /// run in order and each product's reduction order is fixed, so the results are the same
    /// bits on every run.
    pub(super) fn linear_chunks(
        &self,
        hidden: &Logits<'_>,
        weight: &Logits<'_>,
        bias: Option<ArrayView1<'_, f32>>,
        run: &ChunkRun<'_>,
        mut step: impl FnMut(usize, usize, Option<&[usize]>, &mut [f32]) -> Result<()>,
    ) -> Result<ChunkGrads> {
        let ((n, d), v) = (hidden.dim(), weight.dim().0);
        let threads = self.threads();
        let rows = run.rows;
        let kept = run.kept;
        let m = kept.map_or(n, |k| k.len());
        let w = Weight::new(weight, self.linear_matmul(hidden.dtype())?, run.grad_hidden, self.bf16_grad_terms()?)?;
        let bias_c = bias.map(|b| b.to_vec());
        let mut z = zeros2::<f32>((rows.min(n).max(1), v), "linear cross-entropy workspace")?;
        let widen = hidden.dtype() != DType::F32 || !matches!(hidden, Logits::F32(a) if a.is_standard_layout());
        // bf16 products: the chunk's rows as bf16 bits, copied when gathered or strided.
        let mut hb_chunk = Vec::new();
        let mut h_chunk = if !w.bf16() && (widen || kept.is_some()) {
            zeros2::<f32>((rows.min(n).max(1), d), "hidden chunk")?
        } else {
            Array2::zeros((0, 0))
        };
        let mut gh = if run.grad_hidden { Some(zeros2::<f32>((n, d), "grad_hidden")?) } else { None };
        // Gathered rows' grad_hidden, scattered back after each chunk.
        let mut gh_chunk = if run.grad_hidden && kept.is_some() {
            zeros2::<f32>((rows.min(n).max(1), d), "grad_hidden chunk")?
        } else {
            Array2::zeros((0, 0))
        };
        let mut gw = if run.grad_weight { Some(zeros2::<f32>((v, d), "grad_weight")?) } else { None };
        let mut gb = (run.grad_bias && bias.is_some()).then(|| vec![0f64; v]);
        for c0 in (0..m).step_by(rows.max(1)) {
            let c1 = (c0 + rows).min(m);
            let b = c1 - c0;
            // This chunk's batch rows: the range c0..c1, or these.
            let idx = kept.map(|k| &k[c0..c1]);
            let h: Rows<'_> = match idx {
                _ if w.bf16() => {
                    let sel = idx.map_or(RowSel::Range(c0, c1), RowSel::Rows);
                    Rows::Bf16(self.pool.install(|| bf16_rows(hidden, sel, &mut hb_chunk)))
                }
                Some(ix) => {
                    let buf = &mut h_chunk.as_slice_mut().expect("fresh")[..b * d];
                    self.pool.install(|| gather_rows(hidden, ix, buf));
                    Rows::F32(buf)
                }
                None if widen => {
                    let buf = &mut h_chunk.as_slice_mut().expect("fresh")[..b * d];
                    widen_rows(hidden, c0, c1, buf);
                    Rows::F32(buf)
                }
                None => {
                    let Logits::F32(a) = hidden else { unreachable!("f32 hidden") };
                    Rows::F32(&a.as_slice().expect("standard layout")[c0 * d..c1 * d])
                }
            };
            let zc = &mut z.as_slice_mut().expect("fresh")[..b * v];
            if let Some(bias) = bias_c.as_ref() {
                self.pool.install(|| fill_bias(zc, bias));
            }
            // Z = H_c W^T (+ b).
            self.pool.install(|| w.logits(threads, (b, v, d), zc, bias.is_some(), h));
            step(c0, c1, idx, zc)?;
            let g: &[f32] = zc;
            if let Some(gh) = gh.as_mut() {
                let all = gh.as_slice_mut().expect("fresh");
                match idx {
                    Some(ix) => {
                        let dst = &mut gh_chunk.as_slice_mut().expect("fresh")[..b * d];
                        self.pool.install(|| w.hidden_grad(threads, (b, d, v), dst, g));
                        for (row, &r) in dst.chunks(d.max(1)).zip(ix) {
                            all[r * d..(r + 1) * d].copy_from_slice(row);
                        }
                    }
                    None => {
                        let dst = &mut all[c0 * d..c1 * d];
                        self.pool.install(|| w.hidden_grad(threads, (b, d, v), dst, g));
                    }
                }
            }
            if let Some(gw) = gw.as_mut() {
                let dst = gw.as_slice_mut().expect("fresh");
                self.pool.install(|| w.weight_grad(threads, (v, d, b), dst, c0 > 0, g, h));
            }
            if let Some(gb) = gb.as_mut() {
                self.pool.install(|| add_col_sums(gb, g));
            }
        }
        Ok(ChunkGrads { hidden: gh, weight: gw, bias: gb })
    }

    /// Both of the above: the gradient of the losses, or of `sum_n upstream[n] * loss_n`.
    pub(crate) fn linear_ce(&self, call: LinearCall<'_>, cfg: &LinearCe) -> Result<LinearCeOutput> {
        let (n, _, v) = check(&call, cfg)?;
        let totals = call.totals(cfg);
        let LinearCall { hidden, weight, bias, targets, upstream, .. } = &call;
        let (hidden, weight, bias, targets, upstream) = (*hidden, *weight, *bias, *targets, *upstream);
        // The rows the products run over: all, or the counted ones gathered chunk by chunk.
        let kept = counted_rows(&hidden, &targets, cfg);
        let run = ChunkRun {
            rows: cfg.chunk_rows(n, v),
            kept: kept.as_deref(),
            grad_hidden: cfg.grad_hidden,
            grad_weight: cfg.grad_weight,
            grad_bias: cfg.grad_bias,
        };
        let mut outs = ChunkOutputs::new(cfg, n);
        let any_grad = run.any_grad(bias.is_some());
        let grads = self.linear_chunks(&hidden, &weight, bias, &run, |c0, c1, idx, zc| {
            let b = c1 - c0;
            let (data, t_owned) = match idx {
                Some(ix) => {
                    let t: Array1<i64> = ix.iter().map(|&r| targets.get(r)).collect();
                    (call.chunk_data(cfg, totals, Err(ix)), Some(t))
                }
                None => (call.chunk_data(cfg, totals, Ok(c0..c1)), None),
            };
            let t = match (&t_owned, &targets) {
                (Some(t), _) => Targets::I64(t.view()),
                (None, Targets::I64(t)) => Targets::I64(t.slice(s![c0..c1])),
                (None, Targets::I32(t)) => Targets::I32(t.slice(s![c0..c1])),
                (None, Targets::Probs(_)) => unreachable!("checked: class indices"),
            };
            let out = if any_grad {
                let z = ArrayViewMut2::from_shape((b, v), &mut *zc).expect("chunk");
                let ce = CeCall { logits: CeLogits::InPlace(z.into()), targets: t, grad: GradDest::None, data };
                let out = self.ce_run(ce, &cfg.ce)?;
                // Reduction none: row r of G is d(loss_r)/dZ, so the upstream scales it.
                if let Some(u) = upstream {
                    self.pool.install(|| scale_rows(zc, v, |i| u[idx.map_or(c0 + i, |ix| ix[i])]));
                }
                out
            } else {
                let z = ArrayView2::from_shape((b, v), &*zc).expect("chunk");
                self.ce_run(
                    CeCall { logits: CeLogits::Read(z.into()), targets: t, grad: GradDest::None, data },
                    &cfg.ce,
                )?
            };
            outs.add(&out);
            Ok(())
        })?;
        let (gh, gw, gb) = (grads.hidden, grads.weight, grads.bias);
        let rows = run.rows;
        let gdt = grad_dtype(cfg, hidden.dtype());
        let grads = (
            gh.map(|a| Tensor2::from_f32(a, gdt)),
            gw.map(|a| Tensor2::from_f32(a, gdt)),
            gb.map(|b| b.into_iter().map(|x| x as f32).collect()),
        );
        Ok(outs.finish(totals, grads, rows.min(n)))
    }
}
