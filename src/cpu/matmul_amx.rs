//! Matrix products with bf16 inputs on AMX tiles (`tdpbf16ps`): the kernels of
//! [`crate::cpu::CpuMatmul::AmxBf16`], run by the driver of `super::matmul_bf16` (same blocking,
//! same packed right operand, same split of an f32 left operand into bf16 terms, same bound).
//!
//! `tdpbf16ps tmm_c, tmm_a, tmm_b` adds to a 16 x 16 f32 tile `C` the product of a 16 x 32 bf16
//! tile `A` (16 rows of 16 pairs of `k`) and a 16 x 16 tile `B` of pairs (16 pairs of `k`, each
//! row 16 columns of a pair): 8192 multiply-adds per instruction, pairs of bf16 products exact in
//! f32, f32 sums (Intel SDM: denormal inputs taken as zero, denormal results flushed, round to
//! nearest even). Here one micro-panel of 32 rows times one panel of [`NR`] = 32 columns is four
//! `C` tiles (`tmm0..3`), two `A` tiles (`tmm4`, `tmm5`: rows 0-15 and 16-31) and two `B` tiles
//! (`tmm6`, `tmm7`: columns 0-15 and 16-31), every tile 16 rows of 64 bytes (palette 1):
//!
//! - `B` is [`super::matmul_bf16::PackedB`] as it is: a pair of a panel is 32 columns x 2 bf16 =
//!   128 bytes, so 16 pairs at a stride of 128 bytes are the `B` tile of columns 0-15, and the
//!   same 64 bytes further the tile of columns 16-31 (panels are padded to whole tiles of pairs).
//! - `A` is packed per micro-panel and term as 32 rows of the block's `k` values (rounded up to
//!   32, zero past the end) in bf16: a row of bf16 is already the pairs a tile row holds. f32
//!   left operands are split into bf16 terms as the `vdpbf16ps` kernels split them
//!   (`vcvtneps2bf16`, AVX512-BF16, which every CPU with AMX-BF16 has).
//! - `C` tiles are loaded from the destination and stored back per block of `k` where the
//!   micro-panel and panel are whole, else through a 32 x 32 scratch tile.
//!
//! Chosen at run time: cpuid (AMX-TILE, AMX-BF16; and AVX512-BF16 for the packing), then, on
//! Linux, the kernel's permission for the tile data, asked for once per process with
//! `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)` (Linux 5.16 and later; without it the
//! first tile instruction faults). Linux refuses it (`ENOSPC`) where some thread's signal stack
//! is too small for the 8 KiB of tile data; Rust's std sizes its own (`AT_MINSIGSTKSZ`, since
//! Rust 1.73), but a C library's thread may not. A refusal keeps these kernels off, and
//! [`unavailable`] says why. Other systems are not offered these kernels in this version.
//! Last, since no AMX CPU ran these instructions before release, the first probe of a process
//! runs one small product per operand form on them and on the `vdpbf16ps` kernels
//! ([`self_check`]); a disagreement beyond both kernels' bounds keeps them off, with the
//! reason.
//!
//! Why hand-written: stable Rust has no AMX intrinsics (`x86_amx_intrinsics` is unstable), so
//! the six instructions are `asm!`. `tract-linalg` 0.23.9 has an AMX bf16 kernel, but for f32
//! products whose operands it rounds to bf16 once, inside its own packed-input framework: not
//! bf16 operands as they are, nor an f32 `G` split into two terms. The `gemm` crate has no bf16,
//! and oneDNN is C++.
//!
//! Testing without the hardware: every instruction goes through [`Tiles`], implemented by the
//! instructions ([`Native`]) and, in the unit tests, by a software model of the tiles
//! (`Model`, the SDM's pseudo-code): the driver, packing, edges and tile layout above run
//! against the f64 product on any CPU with AVX512-BF16; only the six one-instruction wrappers of
//! [`Native`] need an AMX CPU, where the same tests run them too. On a Linux CPU without AMX,
//! the unit tests also run [`Native`] itself: each instruction traps, and a test-only handler
//! decodes and emulates it (`trap`). That checks the `asm!` (encodings, operands, tile
//! numbers), though not the hardware's own rounding or speed.

#![cfg(target_arch = "x86_64")]

use std::arch::asm;
use std::arch::x86_64::*;
use std::marker::PhantomData;
use std::sync::OnceLock;

use super::matmul_bf16::{col_pair_terms, lane_mask, split16, Kernel, Lhs, NR};

/// Rows of a micro-panel: two `A` tiles.
const MRA: usize = 32;
/// Values of `k` per block: twice the `vdpbf16ps` kernels' 256. The four `C` tiles are loaded
/// and stored once per block, so at 512 that is 8 tile moves per 64 `tdpbf16ps` of one term.
/// A panel's block of `B` is then 32 KiB (Sapphire Rapids' L1 holds 48), and a task's packed
/// left block at most 224 rows x 512 x 2 terms x 2 bytes = 448 KiB (its L2 holds 2 MiB).
/// Chosen by reasoning, not yet measured: `XENT_AMX_KC` overrides it ([`blocks`]).
const KCA: usize = 512;
/// Rows of a task's tile at most: the `vdpbf16ps` kernels' 240, in whole micro-panels. Chosen
/// by reasoning, not yet measured: `XENT_AMX_MC` overrides it ([`blocks`]).
const MCA: usize = 224;

/// The AMX kernels' blocking `(kc, mc)`: [`KCA`] and [`MCA`], or `XENT_AMX_KC` and
/// `XENT_AMX_MC` where set (read once per process), so that a first AMX machine can measure
/// other blockings with the same binary: its build tools may be missing. Each is a multiple of
/// 32 from 32 to 4096; another value is the reason in the `Err`, which
/// [`crate::Cpu::linear_matmul`] returns as an [`crate::XentError::InvalidOption`] wherever
/// these kernels would run.
pub(super) fn blocks() -> Result<(usize, usize), &'static str> {
    static BLOCKS: OnceLock<Result<(usize, usize), String>> = OnceLock::new();
    let read = |name: &str, default: usize| -> Result<usize, String> {
        match std::env::var(name) {
            Err(_) => Ok(default),
            Ok(s) => match s.trim().parse::<usize>() {
                Ok(v) if (32..=4096).contains(&v) && v % 32 == 0 => Ok(v),
                _ => Err(format!("{name}={s}: a multiple of 32 from 32 to 4096 (default {default})")),
            },
        }
    };
    BLOCKS
        .get_or_init(|| Ok((read("XENT_AMX_KC", KCA)?, read("XENT_AMX_MC", MCA)?)))
        .as_ref()
        .map(|b| *b)
        .map_err(|e| e.as_str())
}

/// Why this CPU and OS do not run the AMX kernels, or `None` where they do (probed once).
pub(super) fn unavailable() -> Option<&'static str> {
    static PROBE: OnceLock<Option<String>> = OnceLock::new();
    PROBE.get_or_init(probe).as_deref()
}

/// Whether this CPU and OS run the AMX kernels.
pub(super) fn available() -> bool {
    unavailable().is_none()
}

/// Whether the unit tests' emulator of the instructions is on (`trap`); never outside them.
pub(super) fn emulated() -> bool {
    #[cfg(all(test, target_os = "linux"))]
    return trap::active();
    #[cfg(not(all(test, target_os = "linux")))]
    false
}

fn probe() -> Option<String> {
    gate(cpu_lacks(), request_tile_data, self_check::<Native>)
}

/// What cpuid says this CPU lacks for the AMX kernels, if anything.
fn cpu_lacks() -> Option<String> {
    if !super::matmul_bf16::available() {
        return Some("cpuid reports no AVX512-BF16 (and so no AMX-BF16)".into());
    }
    let (max_leaf, _) = __get_cpuid_max(0);
    let edx = if max_leaf >= 7 { __cpuid_count(7, 0).edx } else { 0 };
    // CPUID.(EAX=7, ECX=0):EDX bit 24 AMX-TILE, bit 22 AMX-BF16.
    (edx >> 24 & 1 == 0 || edx >> 22 & 1 == 0).then(|| "cpuid reports no AMX-BF16 tiles".into())
}

/// The probe's order: the CPU, then Linux's grant of the tile data, then the first-use check;
/// each step runs only after the one before passed (no tile instruction before the grant), and
/// the first failure is the reason.
fn gate(
    cpu_lacks: Option<String>,
    grant: impl FnOnce() -> Result<(), String>,
    check: impl FnOnce() -> Result<(), String>,
) -> Option<String> {
    if cpu_lacks.is_some() {
        return cpu_lacks;
    }
    if let Err(e) = grant() {
        return Some(e);
    }
    check().err().map(|e| {
        format!("the AMX kernels disagreed with the AVX512-BF16 ones on a test product ({e}), so they are kept off")
    })
}

/// One small product per left-operand form (bf16 rows; f32 rows and f32 columns in two terms,
/// accumulating) on the AMX kernels over the tiles `U` and on the `vdpbf16ps` kernels, on a
/// pool of one thread of its own (so that a caller on any pool cannot wait on itself). They
/// multiply the same bf16 terms, so they differ by at most both f32 summations,
/// `2 (terms k + 2) 2^-24 sum |a b|` per element: the first AMX call of a process checks the
/// instructions against the kernels that the tests ran, since no AMX CPU ran them before
/// release.
pub(super) fn self_check<U: Tiles>() -> Result<(), String> {
    use super::matmul_bf16::{gemm, Dp, PackedB};
    let (m, n, k) = (37, 45, 300);
    let val = |i: usize| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * [1.0, 0.01, 30.0][i % 3];
    let a: Vec<f32> = (0..m * k).map(val).collect();
    let abf: Vec<u16> = a.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
    let bsrc: Vec<u16> = (0..k * n).map(|i| half::bf16::from_f32(val(i + 5)).to_bits()).collect();
    let b = PackedB::new(&bsrc, (k, n), n, 1);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().map_err(|e| e.to_string())?;
    for (name, lhs, terms, acc) in [
        ("bf16 rows", Lhs::Bf16Rows { data: &abf, rs: k }, 1, false),
        ("f32 rows", Lhs::F32Rows { data: &a, rs: k }, 2, true),
        ("f32 columns", Lhs::F32Cols { data: &a, cs: m }, 2, true),
    ] {
        let (mut amx, mut dp) = (vec![0.5f32; m * n], vec![0.5f32; m * n]);
        pool.install(|| {
            gemm::<Amx<U>>(1, (m, n, k), &mut amx, n, acc, lhs, terms, &b);
            gemm::<Dp>(1, (m, n, k), &mut dp, n, acc, lhs, terms, &b);
        });
        let a_at = |i: usize, kk: usize| match lhs {
            Lhs::F32Cols { .. } => a[kk * m + i],
            _ => a[i * k + kk],
        };
        for i in 0..m {
            for j in 0..n {
                let mag: f64 = 0.5
                    + (0..k)
                        .map(|kk| (a_at(i, kk) as f64 * half::bf16::from_bits(bsrc[kk * n + j]).to_f64()).abs())
                        .sum::<f64>();
                let tol = 2.0 * (terms * k + 2) as f64 * 2f64.powi(-24) * mag;
                let (x, y) = (amx[i * n + j], dp[i * n + j]);
                let diff = (x as f64 - y as f64).abs();
                if diff.is_nan() || diff > tol {
                    return Err(format!("{name} [{i}, {j}]: {x} against {y}"));
                }
            }
        }
    }
    Ok(())
}

/// Asks Linux for the tile data state (`ARCH_REQ_XCOMP_PERM`, `XFEATURE_XTILEDATA`): granted
/// for the whole process, once.
#[cfg(target_os = "linux")]
fn request_tile_data() -> Result<(), String> {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments reads and writes no user memory.
    let rc = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "the CPU has AMX-BF16 but Linux refused the tile data (arch_prctl ARCH_REQ_XCOMP_PERM: {}; \
             Linux 5.16 or later grants it)",
            std::io::Error::last_os_error()
        ))
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> Result<(), String> {
    Err("the CPU has AMX-BF16, but this version asks only Linux for the tile data state".into())
}

/// The tile instructions the kernels use, on tiles `0..8` of 16 rows x 64 bytes: `C` tiles
/// `0..4`, `A` tiles 4 and 5, `B` tiles 6 and 7.
pub(crate) trait Tiles {
    /// Tiles configured (palette 1, every tile 16 x 64 bytes) on this thread.
    ///
    /// # Safety
    /// [`available`] (for the instructions).
    unsafe fn begin() -> Self;
    /// `tileloadd`: tile `t` from 16 rows of 64 bytes at `p`, `stride` bytes apart.
    ///
    /// # Safety
    /// The rows are readable.
    unsafe fn load(&mut self, t: usize, p: *const u8, stride: usize);
    /// `tilestored`: tile `t` (a `C` tile) to 16 rows of 64 bytes at `p`, `stride` bytes apart.
    ///
    /// # Safety
    /// The rows are writable.
    unsafe fn store(&mut self, t: usize, p: *mut u8, stride: usize);
    /// `tilezero` of `C` tile `c`.
    fn zero(&mut self, c: usize);
    /// `tdpbf16ps`: `C` tile `c` += `A` tile `4 + c / 2` times `B` tile `6 + c % 2`.
    fn dp(&mut self, c: usize);
}

/// The instructions themselves. Stable Rust allocates no tile registers, so the state lives
/// from [`Tiles::begin`] (`ldtilecfg`) to the drop (`tilerelease`) of one task, on one thread,
/// with nothing else using the tiles between.
pub(crate) struct Native(());

/// The `ldtilecfg` operand: palette 1, no start row, every tile 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

static CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        // Bytes 16..32: colsb of tiles 0..8 (u16, little endian); bytes 48..56: rows.
        c[16 + 2 * t] = 64;
        c[48 + t] = 16;
        t += 1;
    }
    TileConfig(c)
};

impl Tiles for Native {
    unsafe fn begin() -> Native {
        asm!("ldtilecfg [{}]", in(reg) &CONFIG.0, options(nostack, readonly, preserves_flags));
        Native(())
    }

    #[inline(always)]
    unsafe fn load(&mut self, t: usize, p: *const u8, stride: usize) {
        macro_rules! ld {
            ($($n:literal)*) => {
                match t {
                    $($n => asm!(concat!("tileloadd tmm", $n, ", [{p} + {s}*1]"), p = in(reg) p, s = in(reg) stride,
                        options(nostack, readonly, preserves_flags)),)*
                    _ => unreachable!("tile {t}"),
                }
            };
        }
        ld!(0 1 2 3 4 5 6 7)
    }

    #[inline(always)]
    unsafe fn store(&mut self, t: usize, p: *mut u8, stride: usize) {
        macro_rules! st {
            ($($n:literal)*) => {
                match t {
                    $($n => asm!(concat!("tilestored [{p} + {s}*1], tmm", $n), p = in(reg) p, s = in(reg) stride,
                        options(nostack, preserves_flags)),)*
                    _ => unreachable!("C tile {t}"),
                }
            };
        }
        st!(0 1 2 3)
    }

    #[inline(always)]
    fn zero(&mut self, c: usize) {
        macro_rules! z {
            ($($n:literal)*) => {
                // SAFETY: tiles configured (begin); no memory.
                match c {
                    $($n => unsafe { asm!(concat!("tilezero tmm", $n), options(nostack, nomem, preserves_flags)) },)*
                    _ => unreachable!("C tile {c}"),
                }
            };
        }
        z!(0 1 2 3)
    }

    #[inline(always)]
    fn dp(&mut self, c: usize) {
        // SAFETY: tiles configured (begin); registers only.
        unsafe {
            match c {
                0 => asm!("tdpbf16ps tmm0, tmm4, tmm6", options(nostack, nomem, preserves_flags)),
                1 => asm!("tdpbf16ps tmm1, tmm4, tmm7", options(nostack, nomem, preserves_flags)),
                2 => asm!("tdpbf16ps tmm2, tmm5, tmm6", options(nostack, nomem, preserves_flags)),
                3 => asm!("tdpbf16ps tmm3, tmm5, tmm7", options(nostack, nomem, preserves_flags)),
                _ => unreachable!("C tile {c}"),
            }
        }
    }
}

impl Drop for Native {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by begin; this returns them to the init state.
        unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) }
    }
}

/// The AMX kernels of the driver, on the tiles `U`.
pub(super) struct Amx<U>(PhantomData<U>);

/// Per task: the tiles, and a scratch `C` tile pair for partial micro-panels and panels.
pub(super) struct AmxState<U> {
    tiles: U,
    scratch: Box<[f32; MRA * NR]>,
}

impl<U: Tiles> Kernel for Amx<U> {
    const MR: usize = MRA;
    type State = AmxState<U>;

    fn kc() -> usize {
        blocks().map_or(KCA, |b| b.0)
    }

    fn mc_max() -> usize {
        blocks().map_or(MCA, |b| b.1)
    }

    fn per_micro(kc: usize, terms: usize) -> usize {
        terms * MRA * kc.next_multiple_of(32) / 2
    }

    unsafe fn begin() -> AmxState<U> {
        AmxState { tiles: U::begin(), scratch: Box::new([0.0; MRA * NR]) }
    }

    /// For each term, [`MRA`] rows of `kcw = kc` rounded up to 32 bf16 (zero past the rows and
    /// `kc`; `dst` comes zeroed).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pack<const T: usize>(a: Lhs<'_>, r0: usize, rows: usize, k0: usize, kc: usize, dst: &mut [u32]) {
        let kcw = kc.next_multiple_of(32);
        debug_assert!(dst.len() >= T * MRA * kcw / 2);
        let d16 = dst.as_mut_ptr().cast::<u16>();
        match a {
            Lhs::Bf16Rows { data, rs } => {
                for r in 0..rows {
                    let row = &data[(r0 + r) * rs + k0..(r0 + r) * rs + k0 + kc];
                    std::ptr::copy_nonoverlapping(row.as_ptr(), d16.add(r * kcw), kc);
                }
            }
            Lhs::F32Rows { data, rs } => {
                for r in 0..rows {
                    let row = &data[(r0 + r) * rs + k0..(r0 + r) * rs + k0 + kc];
                    for e0 in (0..kc).step_by(16) {
                        let mask = lane_mask(kc - e0);
                        let s = split16::<T>(_mm512_maskz_loadu_ps(mask, row.as_ptr().add(e0)));
                        for (t, v) in s.iter().enumerate() {
                            _mm512_mask_cvtepi32_storeu_epi16(d16.add((t * MRA + r) * kcw + e0).cast(), mask, *v);
                        }
                    }
                }
            }
            Lhs::F32Cols { data, cs } => {
                // Pairs of k for 16 rows at a time: one u32 per row, scattered down the rows.
                let words = kcw / 2;
                let vindex = _mm512_mullo_epi32(
                    _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                    _mm512_set1_epi32(words as i32),
                );
                for h in 0..rows.div_ceil(16) {
                    let mask = lane_mask(rows - 16 * h);
                    let rh = r0 + 16 * h;
                    for p in 0..kc.div_ceil(2) {
                        let v = col_pair_terms::<T>(data, cs, k0 + 2 * p, rh, mask, 2 * p + 1 < kc);
                        for (t, v) in v.iter().enumerate() {
                            let base = dst.as_mut_ptr().add((t * MRA + 16 * h) * words + p);
                            _mm512_mask_i32scatter_epi32::<4>(base.cast(), mask, vindex, *v);
                        }
                    }
                }
            }
        }
    }

    unsafe fn micro<const T: usize>(
        state: &mut AmxState<U>,
        kc: usize,
        a: *const u32,
        b: *const u16,
        c: *mut f32,
        c_rs: usize,
        (rows, cols): (usize, usize),
        add: bool,
    ) {
        let kcw = kc.next_multiple_of(32);
        let a_rs = kcw * 2;
        let whole = rows == MRA && cols == NR;
        let tiles = &mut state.tiles;
        let scratch = state.scratch.as_mut_ptr();
        // `C` rows 0-15 / 16-31 (tiles 0, 1 / 2, 3), columns 0-15 / 16-31 (tiles 0, 2 / 1, 3).
        let (cp, cs) = if whole { (c.cast::<u8>(), c_rs * 4) } else { (scratch.cast::<u8>(), NR * 4) };
        let at = |q: usize| cp.add(q / 2 * 16 * cs + q % 2 * 64);
        if add {
            if !whole {
                for r in 0..rows {
                    std::ptr::copy_nonoverlapping(c.add(r * c_rs), scratch.add(r * NR), cols);
                }
            }
            for q in 0..4 {
                tiles.load(q, at(q), cs);
            }
        } else {
            for q in 0..4 {
                tiles.zero(q);
            }
        }
        let (a8, b8) = (a.cast::<u8>(), b.cast::<u8>());
        for s in 0..kcw / 32 {
            // 16 pairs of 128 bytes.
            let bs = b8.add(s * 16 * NR * 4);
            tiles.load(6, bs, NR * 4);
            tiles.load(7, bs.add(64), NR * 4);
            for t in 0..T {
                let ap = a8.add(t * MRA * a_rs + s * 64);
                tiles.load(4, ap, a_rs);
                tiles.load(5, ap.add(16 * a_rs), a_rs);
                for q in 0..4 {
                    tiles.dp(q);
                }
            }
        }
        for q in 0..4 {
            tiles.store(q, at(q), cs);
        }
        if !whole {
            for r in 0..rows {
                std::ptr::copy_nonoverlapping(scratch.add(r * NR), c.add(r * c_rs), cols);
            }
        }
    }
}

/// A software model of the eight tiles and the four instructions (the SDM's pseudo-code for
/// `tdpbf16ps`: bf16 inputs widened with denormals as zero, each pair's two products added in
/// turn in f32, denormal results flushed): the driver and packing of [`Amx`] run on it in the
/// unit tests on any CPU.
#[cfg(test)]
pub(crate) struct Model {
    t: Box<[[[u32; 16]; 16]; 8]>,
}

#[cfg(test)]
impl Tiles for Model {
    unsafe fn begin() -> Model {
        // Fresh state, as ldtilecfg leaves it: every tile zero.
        Model { t: Box::new([[[0; 16]; 16]; 8]) }
    }

    unsafe fn load(&mut self, t: usize, p: *const u8, stride: usize) {
        for (r, row) in self.t[t].iter_mut().enumerate() {
            for (w, x) in row.iter_mut().enumerate() {
                *x = p.add(r * stride + 4 * w).cast::<u32>().read_unaligned();
            }
        }
    }

    unsafe fn store(&mut self, t: usize, p: *mut u8, stride: usize) {
        assert!(t < 4, "C tiles only");
        for (r, row) in self.t[t].iter().enumerate() {
            for (w, x) in row.iter().enumerate() {
                p.add(r * stride + 4 * w).cast::<u32>().write_unaligned(*x);
            }
        }
    }

    fn zero(&mut self, c: usize) {
        assert!(c < 4, "C tiles only");
        self.t[c] = [[0; 16]; 16];
    }

    // Indices as the SDM's pseudo-code writes them.
    #[allow(clippy::needless_range_loop)]
    fn dp(&mut self, c: usize) {
        let (a, b) = (self.t[4 + c / 2], self.t[6 + c % 2]);
        for m in 0..16 {
            for n in 0..16 {
                let mut acc = f32::from_bits(self.t[c][m][n]);
                for k in 0..16 {
                    acc = sdm_pair(acc, a[m][k], b[k][n]);
                }
                self.t[c][m][n] = sdm_flush(acc).to_bits();
            }
        }
    }
}

/// One step of `tdpbf16ps` for one element, as the SDM's pseudo-code writes it: `acc` plus the
/// products of the low halves of the words `x` (of `A`) and `y` (of `B`), then of the high
/// halves, each bf16 widened with a denormal taken as zero, in f32.
#[cfg(test)]
fn sdm_pair(acc: f32, x: u32, y: u32) -> f32 {
    let (lo, hi) = sdm_products(x, y);
    acc + lo + hi
}

/// The two products of a pair in `tdpbf16ps`: of the low halves of the words `x` and `y`, and
/// of the high halves, each bf16 widened to f32 with a denormal taken as zero. Each product is
/// exact in f32 (8-bit by 8-bit significands).
#[cfg(test)]
fn sdm_products(x: u32, y: u32) -> (f32, f32) {
    let widen = |h: u32| sdm_flush(f32::from_bits(h << 16));
    (widen(x & 0xffff) * widen(y & 0xffff), widen(x >> 16) * widen(y >> 16))
}

/// A denormal flushed to zero (keeping its sign), as `tdpbf16ps` takes its inputs and writes
/// its results.
#[cfg(test)]
fn sdm_flush(acc: f32) -> f32 {
    if acc.is_subnormal() {
        0.0f32.copysign(acc)
    } else {
        acc
    }
}

/// The instructions emulated where the CPU lacks them (unit tests, Linux): see the module.
#[cfg(all(test, target_os = "linux"))]
pub(super) mod trap;

#[cfg(test)]
mod tests {
    use super::super::matmul_bf16::tests::{products_on, same_bits_on};
    use super::*;

    /// `on_model` (a check of `matmul_bf16`'s tests on the AMX driver over the model of the
    /// tiles), then `on_tiles` (the same over the instructions) where the CPU and OS offer them.
    fn on_model_and_tiles(on_model: fn(&str), on_tiles: fn(&str)) {
        if !super::super::matmul_bf16::available() {
            println!("skipped: this CPU has no AVX512-BF16 (cpuid), which the packing uses");
            return;
        }
        on_model("AMX on the model");
        on_the_instructions(|| on_tiles("AMX"));
    }

    /// Runs `run` where the CPU and OS offer the AMX instructions, else says why it did not.
    fn on_the_instructions(run: impl FnOnce()) {
        match unavailable() {
            None => run(),
            Some(why) => println!("AMX instructions skipped: {why}"),
        }
    }

    /// Every operand form, terms, accumulation, odd sizes across tiles, pairs and blocks,
    /// against f64.
    #[test]
    fn products_match_f64_within_the_bound() {
        on_model_and_tiles(products_on::<Amx<Model>>, products_on::<Amx<Native>>);
    }

    #[test]
    fn same_bits_on_any_thread_count() {
        on_model_and_tiles(same_bits_on::<Amx<Model>>, same_bits_on::<Amx<Native>>);
    }

    /// The probe's order: nothing after a failed step runs (above all, no tile instruction of
    /// the check before Linux granted the tile data), and the first failure is the reason.
    #[test]
    fn probe_steps_run_in_order_and_stop_at_the_first_failure() {
        use std::cell::Cell;
        // A step that counts its runs and fails with `err` unless `ok`.
        fn step<'a>(runs: &'a Cell<u32>, ok: bool, err: &'a str) -> impl FnOnce() -> Result<(), String> + 'a {
            move || {
                runs.set(runs.get() + 1);
                if ok {
                    Ok(())
                } else {
                    Err(err.to_string())
                }
            }
        }
        let (granted, checked) = (Cell::new(0), Cell::new(0));
        let grant = |ok| step(&granted, ok, "refused");
        let check = |ok| step(&checked, ok, "bf16 rows [0, 0]: 1 against 2");
        assert_eq!(gate(Some("no tiles".into()), grant(true), check(true)).as_deref(), Some("no tiles"));
        assert_eq!((granted.get(), checked.get()), (0, 0));
        assert_eq!(gate(None, grant(false), check(true)).as_deref(), Some("refused"));
        assert_eq!((granted.get(), checked.get()), (1, 0), "no check without the grant");
        let e = gate(None, grant(true), check(false)).unwrap();
        assert!(e.contains("disagreed") && e.contains("bf16 rows [0, 0]"), "{e}");
        assert_eq!((granted.get(), checked.get()), (2, 1));
        assert_eq!(gate(None, grant(true), check(true)), None);
        assert_eq!((granted.get(), checked.get()), (3, 2), "the check runs after a grant");
    }

    /// The model with the second column tile's `dp` on the first (`tdpbf16ps tmm0, tmm4, tmm6`
    /// written for `tmm1, tmm4, tmm7`): what a slip in the instructions would do.
    struct Faulty(Model);

    impl Tiles for Faulty {
        unsafe fn begin() -> Faulty {
            Faulty(Model::begin())
        }
        unsafe fn load(&mut self, t: usize, p: *const u8, stride: usize) {
            self.0.load(t, p, stride)
        }
        unsafe fn store(&mut self, t: usize, p: *mut u8, stride: usize) {
            self.0.store(t, p, stride)
        }
        fn zero(&mut self, c: usize) {
            self.0.zero(c)
        }
        fn dp(&mut self, c: usize) {
            self.0.dp(c & 2)
        }
    }

    /// The first-use check passes on the model of the tiles (and on the instructions where the
    /// CPU has them) and catches a wrong tile.
    #[test]
    fn self_check_passes_and_catches_a_wrong_tile() {
        if !super::super::matmul_bf16::available() {
            println!("skipped: this CPU has no AVX512-BF16 (cpuid), which the check compares against");
            return;
        }
        assert_eq!(self_check::<Model>(), Ok(()));
        let e = self_check::<Faulty>().unwrap_err();
        assert!(e.starts_with("bf16 rows ["), "{e}");
        on_the_instructions(|| {
            assert_eq!(self_check::<Native>(), Ok(()));
            println!("the AMX instructions passed the check");
        });
    }

    /// Linux's grant of the tile data: given where cpuid reports AMX tiles, refused with the
    /// OS's reason where it does not (Linux 5.16 and later: "Operation not supported"; before:
    /// "Invalid argument"), never granted for a state the CPU lacks.
    #[cfg(target_os = "linux")]
    #[test]
    fn linux_grants_the_tile_data_only_with_the_tiles() {
        match (cpu_lacks(), request_tile_data()) {
            (None, Ok(())) => println!("Linux granted the tile data"),
            // A Linux before 5.16 has no such request; a later one grants it on an AMX CPU.
            (None, Err(e)) => assert!(e.contains("Invalid argument"), "an AMX CPU, refused: {e}"),
            (Some(why), Err(e)) => {
                assert!(e.contains("arch_prctl ARCH_REQ_XCOMP_PERM: "), "{e}");
                println!("{why}; Linux said: {e}");
            }
            (Some(why), Ok(())) => panic!("Linux granted the tile data, yet {why}"),
        }
    }

    /// `Native`'s instructions themselves, and the driver and first-use check over them, on a
    /// CPU without AMX: each traps (`SIGILL`) and `trap` runs it (see that module for what this
    /// shows and what only an AMX CPU can).
    #[cfg(target_os = "linux")]
    #[test]
    fn native_instructions_under_emulation() {
        if !super::super::matmul_bf16::available() {
            println!("skipped: this CPU has no AVX512-BF16 (cpuid), which the packing uses");
            return;
        }
        if !trap::install() {
            println!("not emulated: this CPU has AMX tiles, so the tests above ran the instructions themselves");
            return;
        }
        let (before, here) = (trap::emulated(), trap::emulated_here());
        one_tile_exactly::<Native>();
        let one_tile = "ldtilecfg, 3 tileloadd, tdpbf16ps, tilestored, tilerelease";
        assert_eq!(trap::emulated_here() - here, 7, "{one_tile}");
        assert_eq!(self_check::<Native>(), Ok(()));
        products_on::<Amx<Native>>("AMX instructions, emulated");
        same_bits_on::<Amx<Native>>("AMX instructions, emulated");
        let n = trap::emulated() - before;
        let (order, blocks) = (trap::sum_order(), blocks());
        let blocks = blocks.map_or_else(|e| e.to_string(), |(kc, mc)| format!("blocks ({kc}, {mc})"));
        println!(
            "the AMX instructions of Native ran here under trap and emulate, sums in {order} order, {blocks}: \
             {n} in the process during this test"
        );
    }

    /// The tile configuration `ldtilecfg` reads: palette 1, eight tiles of 16 x 64 bytes, the
    /// rest zero (reserved bytes must be).
    #[test]
    fn tile_configuration() {
        let c = &CONFIG.0;
        assert_eq!((c[0], c[1]), (1, 0));
        assert!(c[2..16].iter().all(|&x| x == 0));
        for t in 0..16 {
            let colsb = u16::from_le_bytes([c[16 + 2 * t], c[17 + 2 * t]]);
            assert_eq!((colsb, c[48 + t]), if t < 8 { (64, 16) } else { (0, 0) }, "tile {t}");
        }
        assert_eq!(std::mem::align_of::<TileConfig>(), 64);
    }

    /// The model of `tdpbf16ps` (and the instruction, where the CPU and OS offer it) against a
    /// direct sum on one tile: `C[m][n] += sum_k A[m][k] B[k][n]` with `A[m][2q + h]` the half
    /// `h` of word `q` of row `m`, and `B[2q + h][n]` the half `h` of word `n` of row `q`.
    #[test]
    fn model_multiplies_tiles_as_the_sdm_says() {
        one_tile_exactly::<Model>();
        on_the_instructions(|| {
            one_tile_exactly::<Native>();
            println!("the AMX instructions multiplied one tile exactly, as the model does");
        });
    }

    #[allow(clippy::needless_range_loop)]
    fn one_tile_exactly<U: Tiles>() {
        let bf = |x: f32| half::bf16::from_f32(x).to_bits() as u32;
        let a_of = |m: usize, k: usize| (m as f32 - 7.5) * 0.25 + k as f32 * 0.125;
        let b_of = |k: usize, n: usize| (k as f32 - n as f32) * 0.5;
        let mut a = [[0u32; 16]; 16];
        let mut b = [[0u32; 16]; 16];
        for m in 0..16 {
            for q in 0..16 {
                a[m][q] = bf(a_of(m, 2 * q)) | bf(a_of(m, 2 * q + 1)) << 16;
                b[q][m] = bf(b_of(2 * q, m)) | bf(b_of(2 * q + 1, m)) << 16;
            }
        }
        // SAFETY: the model reads and writes its own arrays; the instructions run only where
        // `unavailable()` said they may, and read and write the arrays above.
        let mut t = unsafe { U::begin() };
        let mut c = [[1.0f32; 16]; 16];
        unsafe {
            t.load(4, a.as_ptr().cast(), 64);
            t.load(6, b.as_ptr().cast(), 64);
            t.load(0, c.as_ptr().cast(), 64);
            t.dp(0);
            t.store(0, c.as_mut_ptr().cast(), 64);
        }
        for m in 0..16 {
            for n in 0..16 {
                let want: f64 = 1.0 + (0..32).map(|k| a_of(m, k) as f64 * b_of(k, n) as f64).sum::<f64>();
                assert_eq!(c[m][n] as f64, want, "[{m}][{n}] (small exact values)");
            }
        }
    }
}
