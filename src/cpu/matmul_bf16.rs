//! Matrix products with bf16 inputs on AVX512-BF16 (`vdpbf16ps`, `_mm512_dpbf16_ps`): the three
//! products of the fused linear cross-entropy when `hidden` and `weight` are bf16.
//!
//! `vdpbf16ps` multiplies pairs of bf16 values exactly (8 x 8 significant bits fit in f32) and
//! adds both products to an f32 accumulator (round to nearest even, denormal inputs and results
//! flushed to zero): per instruction 32 multiply-adds, twice an f32 FMA's 16. bf16 inputs reach it
//! unchanged, so `Z = H W^T` has the f32 product's accuracy (exact products, f32 sums).
//!
//! The gradient `G = d loss / d Z` is f32. Each f32 left operand is split into `terms` bf16
//! values `g = g_1 + g_2 (+ g_3) + r` (each the bf16 rounding of what the earlier ones leave), and
//! every term is multiplied by the same packed right operand: one term is PyTorch's bf16 autograd
//! (`G` rounded to bf16, 8 significant bits: `|r| <= 2^-8 |g|`), two leave `|r| <= 2^-16 |g|`,
//! three `2^-24 |g|` (f32's own unit roundoff). The sums stay f32. So a product `sum_k g_k x_k`
//! made from `terms` terms differs from the exact one by at most `2^(-8 terms) sum_k |g_k x_k|`
//! beside the roundings of its `terms k` f32 additions (`terms k 2^-24 sum_k |g_k x_k|` at
//! worst, far less in practice). Which product uses how many terms is chosen in
//! `crate::cpu::linear` (see its `GRAD_TERMS`) from the measured errors in
//! `docs/cpu-bf16-matmul.md`.
//!
//! Why not a crate: `gemm` 0.19 (already a dependency, used for the f32 products) has f16 but no
//! bf16 type, and its f16 path widens to f32 and runs the f32 kernels; `tract-linalg` has no
//! AVX512-BF16 kernels (for its AMX ones see `super::matmul_amx`); oneDNN, which does, is a
//! C++ library. The kernel here is the classic
//! Goto/BLIS shape: the right operand packed once into panels of [`NR`] columns with pairs of
//! `k` interleaved as `vdpbf16ps` wants them, the left operand packed into micro-panels of
//! [`MR`] rows (once for a bf16 one; an f32 one split into its terms by the task that uses
//! it, 16 lanes at a time with `vcvtneps2bf16`), a [`MR`] x [`NR`] register tile (24
//! accumulators), `k` in blocks of [`KC`]. Measured on a 2-core AMD EPYC (Zen 4), one thread,
//! `512 x 512 x 32000` products: about 200 GFLOP/s per core with one term (the f32 `gemm`
//! crate: 85-100), half that with two terms.
//!
//! The driver ([`gemm`]) is generic over its [`Kernel`]: these `vdpbf16ps` register tiles
//! ([`Dp`]), or the AMX tiles of `super::matmul_amx` (same packed right operand, same terms,
//! 32-row micro-panels of their own layout). `super::linear` picks one per call.
//!
//! Determinism: every output element is computed by one task, its `k` sum running in the same
//! order (block by block of [`KC`], pair by pair, term by term) whatever the thread count or
//! tile size, so the results are the same bits on every run and thread count.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use rayon::prelude::*;

/// Rows of the register tile.
pub(super) const MR: usize = 12;
/// Columns of the register tile (two vectors of 16 f32).
pub(super) const NR: usize = 32;
/// Inner-dimension elements per block of the `vdpbf16ps` kernels (a [`KC`] x [`NR`] bf16 panel
/// is 16 KiB: half of L1).
const KC: usize = 256;
/// Largest row block of a task (its packed left block, 240 x 256 x 2 terms x 2 bytes, is
/// 240 KiB: within L2).
const MC_MAX: usize = 240;
/// Columns per task.
const NC: usize = 512;

/// Whether this CPU runs `vdpbf16ps` (cpuid, at run time).
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
}

/// The right operand `B [k, n]` packed: panels of [`NR`] columns, each `ceil(k / 2)` pairs of
/// rows rounded up to a multiple of 16 (the pairs of one AMX tile), each pair [`NR`] `u32`s
/// holding `(B[2p, j], B[2p + 1, j])` (low half first), zero past `k` and `n`. A pair is 128
/// bytes: an AMX `B` tile of 16 columns is 16 pairs at that stride, the vectors of `vdpbf16ps`
/// the two halves of a pair.
pub(super) struct PackedB {
    data: Vec<u16>,
    k: usize,
    n: usize,
}

impl PackedB {
    /// Packs `B[kk, j] = src[kk * rs + j * cs]` (`k x n`, bf16 bits), panels in parallel.
    pub(super) fn new(src: &[u16], (k, n): (usize, usize), rs: usize, cs: usize) -> PackedB {
        let kp = k.div_ceil(2);
        let panel = kp.next_multiple_of(16) * NR * 2;
        let panels = n.div_ceil(NR);
        let mut data = vec![0u16; panels * panel];
        if k > 0 && n > 0 {
            let last = (k - 1) * rs + (n - 1) * cs;
            assert!(src.len() > last, "B holds k x n");
        }
        data.par_chunks_mut(panel.max(1)).enumerate().for_each(|(pi, out)| {
            let j0 = pi * NR;
            let cols = (n - j0).min(NR);
            if cs > rs {
                // Columns of B are rows of the source: read each once, in order (the panel,
                // written across, stays in L1).
                for j in 0..cols {
                    let col = &src[(j0 + j) * cs..];
                    for kk in 0..k {
                        out[(kk / 2) * NR * 2 + 2 * j + kk % 2] = col[kk * rs];
                    }
                }
            } else {
                for p in 0..kp {
                    let row = &mut out[p * NR * 2..(p + 1) * NR * 2];
                    let k0 = 2 * p;
                    for j in 0..cols {
                        row[2 * j] = src[k0 * rs + (j0 + j) * cs];
                        if k0 + 1 < k {
                            row[2 * j + 1] = src[(k0 + 1) * rs + (j0 + j) * cs];
                        }
                    }
                }
            }
        });
        PackedB { data, k, n }
    }

    /// Pairs of `k` per panel, padding included.
    fn kp(&self) -> usize {
        self.k.div_ceil(2).next_multiple_of(16)
    }

    /// The pairs `p0 ..` of panel `pi`.
    pub(super) fn panel_at(&self, pi: usize, p0: usize) -> *const u16 {
        let kp = self.kp();
        self.data[pi * kp * NR * 2 + p0 * NR * 2..].as_ptr()
    }
}

/// The left operand `A [m, k]`.
#[derive(Clone, Copy)]
pub(super) enum Lhs<'a> {
    /// bf16 bits, `A[i, kk] = data[i * rs + kk]`.
    Bf16Rows { data: &'a [u16], rs: usize },
    /// f32, `A[i, kk] = data[i * rs + kk]`, split into bf16 terms.
    F32Rows { data: &'a [f32], rs: usize },
    /// f32, `A[i, kk] = data[kk * cs + i]`, split into bf16 terms.
    F32Cols { data: &'a [f32], cs: usize },
}

/// Raw output pointer shared by the tasks, each writing its own tile.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint tiles of the destination, which outlives the parallel loop.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// What a kernel of the driver [`gemm`] provides: its row micro-panels, their packing, and the
/// register (or tile) product of one micro-panel and one panel of [`NR`] columns over one
/// block of `k`.
pub(super) trait Kernel {
    /// Rows of a micro-panel.
    const MR: usize;
    /// Values of `k` per block (a multiple of 32).
    fn kc() -> usize;
    /// Rows of a tile at most (before rounding down to whole micro-panels).
    fn mc_max() -> usize {
        MC_MAX
    }
    /// Per-task state (the AMX tile configuration).
    type State;
    /// `u32`s of one packed micro-panel: `kc` values of `k`, `T` terms.
    fn per_micro(kc: usize, terms: usize) -> usize;
    /// The state of a task on this thread.
    ///
    /// # Safety
    /// The CPU runs these kernels.
    unsafe fn begin() -> Self::State;
    /// Rows `r0..r0 + rows` (at most [`Kernel::MR`]) and `k0..k0 + kc` of `a` into `dst` (zeroed,
    /// [`Kernel::per_micro`] long).
    ///
    /// # Safety
    /// AVX512-BF16; `a` holds the rows and columns.
    unsafe fn pack<const T: usize>(a: Lhs<'_>, r0: usize, rows: usize, k0: usize, kc: usize, dst: &mut [u32]);
    /// `c[0..rows, 0..cols] (+)= a b` over `kc` values of `k`, `a` one packed micro-panel, `b`
    /// the panel's pairs of this block.
    ///
    /// # Safety
    /// As [`Kernel::begin`]; `a` and `b` hold the block; rows `0..rows` of `c` at stride `c_rs`,
    /// columns `0..cols`, are writable and this task's.
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro<const T: usize>(
        state: &mut Self::State,
        kc: usize,
        a: *const u32,
        b: *const u16,
        c: *mut f32,
        c_rs: usize,
        rows_cols: (usize, usize),
        add: bool,
    );
}

/// The `vdpbf16ps` register tile of [`MR`] x [`NR`].
pub(super) struct Dp;

impl Kernel for Dp {
    const MR: usize = MR;
    type State = ();

    fn kc() -> usize {
        KC
    }

    fn per_micro(kc: usize, terms: usize) -> usize {
        kc.div_ceil(2) * terms * MR
    }

    unsafe fn begin() {}

    unsafe fn pack<const T: usize>(a: Lhs<'_>, r0: usize, rows: usize, k0: usize, kc: usize, dst: &mut [u32]) {
        pack_a::<T>(a, r0, rows, k0, kc, dst)
    }

    unsafe fn micro<const T: usize>(
        _: &mut (),
        kc: usize,
        a: *const u32,
        b: *const u16,
        c: *mut f32,
        c_rs: usize,
        (rows, cols): (usize, usize),
        add: bool,
    ) {
        let masks = [lane_mask(cols.min(16)), lane_mask(cols.saturating_sub(16))];
        kernel::<T>(kc.div_ceil(2), a, b, c, c_rs, rows, masks, add)
    }
}

/// `c[m, n] (+)= A[m, k] B[k, n]` (`c` row stride `c_rs`) on the kernels `K`, the f32 left
/// operands split into `terms` bf16 terms (1 to 3; bf16 ones are exact in one), tiles in
/// parallel on the current rayon pool, `threads` its size (it sets the tile size only, never
/// the bits).
///
/// A bf16 left operand (small: a chunk of hidden rows) is packed once and shared by tiles of
/// [`NC`] columns; an f32 one (a chunk's gradient, `b x V`) is packed by the task that uses
/// it, tiles spanning all `n` columns, so that each of its values is split once.
///
/// # Panics
/// If the CPU lacks AVX512-BF16, `terms` is not 1 to 3, or an operand is shorter than its
/// shape. The caller checks that the CPU runs `K` (`super::matmul_amx::available` for AMX).
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm<K: Kernel>(
    threads: usize,
    (m, n, k): (usize, usize, usize),
    c: &mut [f32],
    c_rs: usize,
    accumulate: bool,
    a: Lhs<'_>,
    terms: usize,
    b: &PackedB,
) {
    assert!(available(), "AVX512-BF16");
    assert!((1..=3).contains(&terms), "1 to 3 terms");
    assert!(b.k == k && b.n == n, "B is k x n");
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() > (m - 1) * c_rs + n - 1, "destination holds the product");
    if k == 0 {
        if !accumulate {
            c.chunks_mut(c_rs.max(1)).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    match a {
        Lhs::Bf16Rows { data, rs } => assert!(data.len() > (m - 1) * rs + k - 1, "A holds m x k"),
        Lhs::F32Rows { data, rs } => assert!(data.len() > (m - 1) * rs + k - 1, "A holds m x k"),
        Lhs::F32Cols { data, cs } => assert!(data.len() > (k - 1) * cs + m - 1, "A holds m x k"),
    }
    let out = Out(c.as_mut_ptr());
    let shape = Shape { c_rs, accumulate, k, kc: K::kc(), micro_all: m.div_ceil(K::MR) };
    match a {
        Lhs::Bf16Rows { .. } => {
            // Packed once: for each block of k, every micro-panel.
            let kcb = shape.kc;
            let per_block = K::per_micro(kcb, 1) * shape.micro_all;
            let last = K::per_micro(k - (k - 1) / kcb * kcb, 1) * shape.micro_all;
            let mut packed = vec![0u32; (k - 1) / kcb * per_block + last];
            packed.par_chunks_mut(per_block).enumerate().for_each(|(kb, block)| {
                let k0 = kb * kcb;
                let kc = (k - k0).min(kcb);
                for (mp, dst) in block.chunks_mut(K::per_micro(kc, 1)).enumerate() {
                    let r0 = mp * K::MR;
                    // SAFETY: AVX512-BF16 checked above.
                    unsafe { K::pack::<1>(a, r0, (m - r0).min(K::MR), k0, kc, dst) };
                }
            });
            let n_tiles = n.div_ceil(NC);
            let m_tiles = row_tiles::<K>(m, n_tiles, threads);
            (0..n_tiles * m_tiles).into_par_iter().for_each(|tile| {
                let (ni, mi) = (tile / m_tiles, tile % m_tiles);
                let rows = tile_span::<K>(m, m_tiles, mi);
                let cols = (ni * NC, ((ni + 1) * NC).min(n));
                // SAFETY: the kernels checked; the asserts keep accesses in bounds, and this task
                // alone writes these rows and columns of `c`.
                unsafe { tile_task::<K, 1>(out, &shape, Left::Packed(&packed), b, rows, cols, &mut Vec::new()) };
            });
        }
        _ => {
            let m_tiles = row_tiles::<K>(m, 1, threads);
            (0..m_tiles).into_par_iter().for_each_init(Vec::<u32>::new, |buf, mi| {
                let rows = tile_span::<K>(m, m_tiles, mi);
                // SAFETY: as above.
                unsafe {
                    match terms {
                        1 => tile_task::<K, 1>(out, &shape, Left::Pack(a), b, rows, (0, n), buf),
                        2 => tile_task::<K, 2>(out, &shape, Left::Pack(a), b, rows, (0, n), buf),
                        _ => tile_task::<K, 3>(out, &shape, Left::Pack(a), b, rows, (0, n), buf),
                    }
                }
            });
        }
    }
}

/// Tiles of rows: four per thread over the `n_tiles` column tiles where the rows allow, none
/// over [`Kernel::mc_max`] rows (rounded to whole micro-panels).
fn row_tiles<K: Kernel>(m: usize, n_tiles: usize, threads: usize) -> usize {
    let micro = m.div_ceil(K::MR);
    let wanted = (4 * threads.max(1)).div_ceil(n_tiles).max(1);
    wanted.max(micro.div_ceil((K::mc_max() / K::MR).max(1))).min(micro)
}

/// Rows of tile `i` of `tiles`: whole micro-panels, the counts differing by one at most.
fn tile_span<K: Kernel>(m: usize, tiles: usize, i: usize) -> (usize, usize) {
    let micro = m.div_ceil(K::MR);
    ((i * micro / tiles * K::MR).min(m), ((i + 1) * micro / tiles * K::MR).min(m))
}

/// What every tile shares.
struct Shape {
    c_rs: usize,
    accumulate: bool,
    k: usize,
    /// Values of `k` per block ([`Kernel::kc`], asked once per product): the packed left
    /// operand's blocks and the tiles' must agree.
    kc: usize,
    /// Micro-panels of all `m` rows.
    micro_all: usize,
}

/// The left operand of a tile: packed already (all rows, block by block of `k`), or to pack.
#[derive(Clone, Copy)]
enum Left<'a> {
    Packed(&'a [u32]),
    Pack(Lhs<'a>),
}

/// One tile `rows i0..i1 x columns j0..j1` (`i0` a multiple of `K::MR`): for each block of `k`,
/// its left block (packed into `buf`, or found packed), then every panel of columns times every
/// micro-panel of rows.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn tile_task<K: Kernel, const T: usize>(
    out: Out,
    shape: &Shape,
    a: Left<'_>,
    b: &PackedB,
    (i0, i1): (usize, usize),
    (j0, j1): (usize, usize),
    buf: &mut Vec<u32>,
) {
    let mut state = K::begin();
    let micro = (i1 - i0).div_ceil(K::MR);
    let k = shape.k;
    let kcb = shape.kc;
    for k0 in (0..k).step_by(kcb) {
        let kc = (k - k0).min(kcb);
        let per_micro = K::per_micro(kc, T);
        let block: &[u32] = match a {
            Left::Packed(all) => {
                let start = k0 / kcb * K::per_micro(kcb, 1) * shape.micro_all + (i0 / K::MR) * per_micro;
                &all[start..start + micro * per_micro]
            }
            Left::Pack(a) => {
                buf.clear();
                buf.resize(micro * per_micro, 0);
                for (mp, dst) in buf.chunks_mut(per_micro).enumerate() {
                    let r0 = i0 + mp * K::MR;
                    K::pack::<T>(a, r0, (i1 - r0).min(K::MR), k0, kc, dst);
                }
                buf
            }
        };
        let add = shape.accumulate || k0 > 0;
        for j in (j0..j1).step_by(NR) {
            let cols = (j1 - j).min(NR);
            let bp = b.panel_at(j / NR, k0 / 2);
            for (mp, ap) in block.chunks(per_micro).enumerate() {
                let r0 = i0 + mp * K::MR;
                let rows = (i1 - r0).min(K::MR);
                // SAFETY (caller): rows r0..r0+rows, columns j..j+cols are this task's.
                let cp = out.0.add(r0 * shape.c_rs + j);
                K::micro::<T>(&mut state, kc, ap.as_ptr(), bp, cp, shape.c_rs, (rows, cols), add);
            }
        }
    }
}

/// The low `n` lanes of 16.
pub(super) fn lane_mask(n: usize) -> u16 {
    if n >= 16 {
        u16::MAX
    } else {
        (1u16 << n) - 1
    }
}

/// `T` bf16 terms of 16 f32 lanes, as 16 u32 (the bf16 in the low half): each the rounding
/// (`vcvtneps2bf16`: nearest even, denormals to zero) of what the earlier ones leave; after a
/// non-finite term the rest are zero.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) fn split16<const T: usize>(x: __m512) -> [__m512i; T] {
    let mut out = [_mm512_setzero_si512(); T];
    let mut r = x;
    let inf = _mm512_set1_ps(f32::INFINITY);
    for (t, o) in out.iter_mut().enumerate() {
        // SAFETY: both are 256 bits of plain data.
        let bits = unsafe { std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(r)) };
        let h = _mm512_cvtepu16_epi32(bits);
        *o = h;
        if t + 1 < T {
            let hf = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h));
            let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_abs_ps(hf), inf);
            r = _mm512_maskz_sub_ps(finite, r, hf);
        }
    }
    out
}

/// The `T` bf16 terms of the pairs `(A[r, kk], A[r, kk + 1])` of 16 rows `r0..` (the lanes set
/// in `mask`) of `A[i, kk] = data[kk * cs + i]`, each a u32 (`A[r, kk]` in the low half);
/// `A[r, kk + 1]` taken as zero unless `second`.
///
/// # Safety
/// AVX512-BF16; `data` holds the rows of `mask` in columns `kk` (and `kk + 1`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn col_pair_terms<const T: usize>(
    data: &[f32],
    cs: usize,
    kk: usize,
    r0: usize,
    mask: u16,
    second: bool,
) -> [__m512i; T] {
    let x0 = _mm512_maskz_loadu_ps(mask, data[kk * cs + r0..].as_ptr());
    let x1 =
        if second { _mm512_maskz_loadu_ps(mask, data[(kk + 1) * cs + r0..].as_ptr()) } else { _mm512_setzero_ps() };
    let (s0, s1) = (split16::<T>(x0), split16::<T>(x1));
    let mut out = s0;
    for (o, hi) in out.iter_mut().zip(s1) {
        *o = _mm512_or_si512(*o, _mm512_slli_epi32::<16>(hi));
    }
    out
}

/// Rows `r0..r0 + rows` (at most [`MR`]) and columns `k0..k0 + kc` of `a` into `dst`: for each
/// pair `p` of `k`, for each term `t`, [`MR`] `u32`s (`(A[i, 2p], A[i, 2p + 1])`, zero past the
/// rows and `kc`).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_a<const T: usize>(a: Lhs<'_>, r0: usize, rows: usize, k0: usize, kc: usize, dst: &mut [u32]) {
    let kcp = kc.div_ceil(2);
    debug_assert!(dst.len() >= kcp * T * MR);
    match a {
        Lhs::Bf16Rows { data, rs } => {
            let pair = |lo: u16, hi: u16| lo as u32 | (hi as u32) << 16;
            for r in 0..rows {
                let row = &data[(r0 + r) * rs + k0..(r0 + r) * rs + k0 + kc];
                for p in 0..kcp {
                    let hi = row.get(2 * p + 1).copied().unwrap_or(0);
                    dst[p * T * MR + r] = pair(row[2 * p], hi);
                }
            }
        }
        Lhs::F32Rows { data, rs } => {
            // 16 pairs of a row at a time: split, then each pair's u32 to its place.
            let mut lanes = [[0u32; 16]; T];
            for r in 0..rows {
                let row = &data[(r0 + r) * rs + k0..(r0 + r) * rs + k0 + kc];
                for q0 in (0..kcp).step_by(16) {
                    let e0 = 2 * q0;
                    let len = (kc - e0).min(32);
                    let lo_mask = lane_mask(len.min(16));
                    let hi_mask = lane_mask(len.saturating_sub(16));
                    let x0 = _mm512_maskz_loadu_ps(lo_mask, row.as_ptr().add(e0));
                    let x1 = _mm512_maskz_loadu_ps(hi_mask, row.as_ptr().wrapping_add(e0 + 16));
                    let (s0, s1) = (split16::<T>(x0), split16::<T>(x1));
                    for t in 0..T {
                        // u32 lane q: (x[2q], x[2q + 1]) from the 32 bf16 of (x0, x1).
                        let idx_even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
                        let idx_odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
                        let ev = _mm512_permutex2var_epi32(s0[t], idx_even, s1[t]);
                        let od = _mm512_permutex2var_epi32(s0[t], idx_odd, s1[t]);
                        let v = _mm512_or_si512(ev, _mm512_slli_epi32::<16>(od));
                        _mm512_storeu_si512(lanes[t].as_mut_ptr().cast(), v);
                    }
                    for q in 0..(kcp - q0).min(16) {
                        for (t, l) in lanes.iter().enumerate() {
                            *dst.get_unchecked_mut((q0 + q) * T * MR + t * MR + r) = l[q];
                        }
                    }
                }
            }
        }
        Lhs::F32Cols { data, cs } => {
            let mask = lane_mask(rows);
            for p in 0..kcp {
                let v = col_pair_terms::<T>(data, cs, k0 + 2 * p, r0, mask, 2 * p + 1 < kc);
                for (t, v) in v.iter().enumerate() {
                    _mm512_mask_storeu_epi32(dst[p * T * MR + t * MR..].as_mut_ptr().cast(), lane_mask(MR), *v);
                }
            }
        }
    }
}

/// The register tile: `c[0..rows, lanes of masks] (+)= sum over kcp pairs and T terms of
/// a[p][t][r] . b[p][j]`.
///
/// # Safety
/// AVX512-BF16; `a` holds `kcp * T * MR` u32s, `b` `kcp * NR * 2` u16s; `c` rows `0..rows` at
/// stride `c_rs`, lanes set in `masks`, are writable.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn kernel<const T: usize>(
    kcp: usize,
    a: *const u32,
    b: *const u16,
    c: *mut f32,
    c_rs: usize,
    rows: usize,
    masks: [u16; 2],
    add: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..kcp {
        let bp = b.add(p * NR * 2);
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.cast()));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(32).cast()));
        let ap = a.add(p * T * MR);
        for t in 0..T {
            for (r, acc) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(t * MR + r) as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate().take(rows) {
        for (v, (&x, &mask)) in acc.iter().zip(&masks).enumerate() {
            if mask == 0 {
                continue;
            }
            let ptr = c.add(r * c_rs + v * 16);
            let x = if add { _mm512_add_ps(_mm512_maskz_loadu_ps(mask, ptr), x) } else { x };
            _mm512_mask_storeu_ps(ptr, mask, x);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A few thousand values over many binades, both signs, some exactly bf16.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 40) as f32 / (1u64 << 24) as f32;
                let e = ((s >> 8) % 9) as i32 - 6;
                (u - 0.5) * 2f32.powi(e)
            })
            .collect()
    }

    fn bf(x: &[f32]) -> Vec<u16> {
        x.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect()
    }

    fn f(x: u16) -> f64 {
        half::bf16::from_bits(x).to_f64()
    }

    #[test]
    fn split_terms_bound() {
        if !available() {
            println!("skipped: this CPU has no AVX512-BF16 (cpuid), so vcvtneps2bf16 cannot run here");
            return;
        }
        fn terms<const T: usize>(x: &[f32; 16]) -> [[u16; 16]; T] {
            // SAFETY: AVX512-BF16 checked by the caller; 16 f32 read, 16 u32 written per term.
            unsafe {
                let s = split16::<T>(_mm512_loadu_ps(x.as_ptr()));
                s.map(|v| {
                    let mut w = [0u32; 16];
                    _mm512_storeu_si512(w.as_mut_ptr().cast(), v);
                    w.map(|u| u as u16)
                })
            }
        }
        fn check<const T: usize>(x: &[f32; 16]) {
            let s = terms::<T>(x);
            for (l, &v) in x.iter().enumerate() {
                let sum: f64 = s.iter().map(|t| f(t[l])).sum();
                let bound = 2f64.powi(-(8 * T as i32)) * v.abs() as f64;
                // Below f32's smallest normal the instruction flushes to zero.
                assert!((sum - v as f64).abs() <= bound.max(2e-38), "{v} {T}: {sum}");
            }
        }
        for x in values(16_000, 7).chunks_exact(16) {
            let x: [f32; 16] = x.try_into().unwrap();
            check::<1>(&x);
            check::<2>(&x);
            check::<3>(&x);
        }
        let mut x = [1.0f32; 16];
        x[0] = f32::INFINITY;
        x[1] = f32::NAN;
        let s = terms::<2>(&x);
        assert_eq!((s[0][0], s[1][0]), (half::bf16::INFINITY.to_bits(), 0), "inf is one term");
        assert!(half::bf16::from_bits(s[0][1]).is_nan() && s[1][1] == 0, "NaN is one term");
    }

    #[test]
    fn products_match_f64_within_the_bound() {
        if !available() {
            println!("skipped: this CPU has no AVX512-BF16 (cpuid), so vdpbf16ps cannot run here");
            return;
        }
        products_on::<Dp>("vdpbf16ps");
    }

    /// Every left-operand form and term count on the kernels `K` against an f64 product of the
    /// operands as the kernel sees them (exact bf16 values, the f32 values for split operands),
    /// with the bound of the module docs: `2^(-8 terms) sum|a b| + terms k 2^-24 sum|a b|`
    /// (bf16 operands: the second part only, one term). Odd sizes, edges of tiles, blocks and
    /// pairs. Needs AVX512-BF16 (the packing).
    pub(in crate::cpu) fn products_on<K: Kernel>(kern: &str) {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for &(m, n, k) in &[(1, 1, 1), (13, 33, 7), (25, 70, 257), (40, 31, 600), (251, 530, 513)] {
            let a32 = values(m * k, (m * 31 + k) as u64);
            let bsrc = bf(&values(k * n, (n * 17 + k) as u64));
            let packed = PackedB::new(&bsrc, (k, n), n, 1);
            let bval = |kk: usize, j: usize| f(bsrc[kk * n + j]);
            for form in 0..3 {
                for terms in 1..=3 {
                    if form == 0 && terms > 1 {
                        continue;
                    }
                    let abf = bf(&a32);
                    let at: Vec<f32> = (0..m * k).map(|x| a32[(x % k) * m + x / k]).collect();
                    // a_of(i, kk): the value the product should use.
                    let a_of = |i: usize, kk: usize| match form {
                        0 => f(abf[i * k + kk]),
                        1 => a32[i * k + kk] as f64,
                        _ => at[kk * m + i] as f64,
                    };
                    let lhs = match form {
                        0 => Lhs::Bf16Rows { data: &abf, rs: k },
                        1 => Lhs::F32Rows { data: &a32, rs: k },
                        _ => Lhs::F32Cols { data: &at, cs: m },
                    };
                    for accumulate in [false, true] {
                        let c_rs = n + 3;
                        let mut c = vec![0.25f32; m * c_rs];
                        pool.install(|| gemm::<K>(3, (m, n, k), &mut c, c_rs, accumulate, lhs, terms, &packed));
                        let unit = if form == 0 { 0.0 } else { 2f64.powi(-8 * terms as i32) };
                        for i in 0..m {
                            for j in 0..n {
                                let (mut want, mut mag) = (0.0f64, 0.0f64);
                                for kk in 0..k {
                                    want += a_of(i, kk) * bval(kk, j);
                                    mag += (a_of(i, kk) * bval(kk, j)).abs();
                                }
                                if accumulate {
                                    want += 0.25;
                                    mag += 0.25;
                                }
                                let got = c[i * c_rs + j] as f64;
                                let tol = (unit + (terms * k + 2) as f64 * 2f64.powi(-24)) * mag + 1e-30;
                                assert!(
                                    (got - want).abs() <= tol,
                                    "{kern} {m}x{n}x{k} form {form} terms {terms} acc {accumulate} [{i},{j}]: {got} vs {want} (tol {tol})"
                                );
                            }
                            assert!(c[i * c_rs + n..(i + 1) * c_rs].iter().all(|&x| x == 0.25), "padding untouched");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn same_bits_on_any_thread_count() {
        if !available() {
            println!("skipped: this CPU has no AVX512-BF16 (cpuid), so vdpbf16ps cannot run here");
            return;
        }
        same_bits_on::<Dp>("vdpbf16ps");
    }

    /// The kernels `K` give the same bits on 1, 2, 3 and 8 threads. Needs AVX512-BF16.
    pub(in crate::cpu) fn same_bits_on<K: Kernel>(kern: &str) {
        let (m, n, k) = (97, 1100, 900);
        let a = values(m * k, 3);
        let bsrc = bf(&values(k * n, 4));
        let packed = PackedB::new(&bsrc, (k, n), n, 1);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut c = vec![0f32; m * n];
            let lhs = Lhs::F32Rows { data: &a, rs: k };
            pool.install(|| gemm::<K>(threads, (m, n, k), &mut c, n, false, lhs, 2, &packed));
            c.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        let one = run(1);
        for t in [2, 3, 8] {
            assert_eq!(run(t), one, "{kern}: {t} threads");
        }
    }
}
