//! The matrix products of fused linear cross-entropy (`shaders/matmul.wgsl`, and
//! `shaders/matmul_coop.wgsl` on cooperative matrices): one kernel variant per operand layout
//! ([`MatmulLayout`]), 4-wide loads where an operand's offset and row stride allow them, f32
//! accumulation. [`Product`] is what `linear.rs` records; the hidden
//! [`GpuContext::matmul_host`] and [`GpuContext::bench_matmul`] run one product from the host
//! for tests and benchmarks.
//!
//! The family's interface (switches, parameter block, flags, bindings) is in `matmul_io.rs`
//! beside this file; this file's tests validate every variant the family builds and compare
//! that interface with `shaders/matmul_io.wgsl` through naga.

use super::matmul_io::{mm_flags, slot, MatmulLayout, MatmulParams, Mm};
use crate::dtype::{DType, Logits};
use crate::error::{Result, XentError};
use crate::gpu::context::GpuContext;
use crate::gpu::launch::{Bind, Groups, Launch, Recorder};
use crate::gpu::params::Header;
use crate::gpu::variant::{Family, Shader, Variant};

use wgpu::BufferUsages as U;

/// Whether the host ever builds the SIMT (`coop` false) or cooperative kernel in `v`.
#[cfg(test)]
pub(crate) fn valid(coop: bool, v: Variant) -> bool {
    // Only the dtypes, the subgroup switch, the workgroup size (cooperative) and `mm` apply.
    let own = Variant { input: v.input, second: v.second, subgroup: v.subgroup, mm: v.mm, ..Default::default() };
    if coop {
        v.subgroup && !v.mm.a4 && !v.mm.b4 && v == Variant { wg: v.wg, ..own }
    } else {
        !v.mm.coop8 && v == own
    }
}

/// Every variant the family's kernels are built in (for the validation tests): every layout,
/// load width (SIMT) or tile size and subgroup width (cooperative), dtype pair and subgroup
/// switch.
#[cfg(test)]
pub(crate) fn variants(coop: bool) -> Vec<Variant> {
    use DType::*;
    let mut out = Vec::new();
    for layout in [MatmulLayout::Nt, MatmulLayout::Nn, MatmulLayout::Tn] {
        for bits in 0..8u32 {
            for input in [F32, F16, BF16] {
                for second in [F32, F16, BF16] {
                    let mm = if coop {
                        Mm { layout, coop8: bits & 1 != 0, ..Default::default() }
                    } else {
                        Mm { layout, a4: bits & 1 != 0, b4: bits & 2 != 0, ..Default::default() }
                    };
                    let v = Variant {
                        input,
                        second,
                        subgroup: coop || bits & 4 != 0,
                        wg: if coop { [32, 64][(bits >> 1) as usize & 1] } else { 0 },
                        mm,
                        ..Default::default()
                    };
                    if valid(coop, v) {
                        out.push(v);
                    }
                }
            }
        }
    }
    out
}

/// The family's kernels (the SIMT and the cooperative product): their interface WGSL,
/// bindings (the same in every variant) and variants (`matmul.rs`).
pub(crate) const FAMILY: Family = Family {
    io: &[super::matmul_io::WGSL],
    bindings: |_, _| super::matmul_io::BINDINGS.to_vec(),
    #[cfg(test)]
    variants: |shader| variants(shader == Shader::MatmulCoop),
};

/// Rows and columns of C per workgroup of the SIMT kernel (`R` and `TN` in the shader).
const TILE: (usize, usize) = (16, 256);

/// CPU mirror of `coop_scale` in `shaders/matmul_coop.wgsl`: the power of two `2^s` (and
/// `2^-s`) that puts a tile's largest magnitude `max_abs` in `[2^14, 2^15)` before the tile is
/// rounded to f16; `(1, 1)` for 0, infinities and NaN.
#[cfg(test)]
fn coop_scale(max_abs: f32) -> (f32, f32) {
    let ex = ((max_abs.to_bits() >> 23) & 0xff) as i32 - 127;
    if max_abs == 0.0 || ex == 128 {
        return (1.0, 1.0);
    }
    let s = (14 - ex).clamp(-126, 126);
    (f32::from_bits(((s + 127) as u32) << 23), f32::from_bits(((127 - s) as u32) << 23))
}

/// CPU mirror of the cooperative kernel's staging of one tile: scaled by [`coop_scale`] of its
/// largest magnitude and rounded to f16; returns the f16 values and the inverse scale.
#[cfg(test)]
fn coop_stage(tile: &[f32]) -> (Vec<half::f16>, f32) {
    let max_abs = tile.iter().fold(0f32, |m, &x| m.max(x.abs()));
    let (s, inv) = coop_scale(max_abs);
    (tile.iter().map(|&x| half::f16::from_f32(x * s)).collect(), inv)
}

/// Elements `first .. first + count` (of `elem` bytes) of `buf`, bound from an aligned offset:
/// the binding and the element offset of `first` inside it.
pub(super) fn range(buf: &wgpu::Buffer, elem: u64, first: u64, count: u64, align: u64) -> (Bind<'_>, u32) {
    let start = first * elem;
    let off = start / align * align;
    let size = ((start - off) + count * elem).max(4).next_multiple_of(4).min(buf.size() - off);
    (Bind { buffer: buf, offset: off, size }, ((start - off) / elem) as u32)
}

/// An operand of a product: its binding, the element offset of its first element there, the
/// elements between its rows (along its non-contiguous axis), and its dtype.
#[derive(Clone, Copy)]
pub(super) struct Operand<'a> {
    pub bind: Bind<'a>,
    pub first: u32,
    pub rs: usize,
    pub dtype: DType,
}

/// One product `C[m, n] (+)= A B (+ bias)` in `layout`; C is f32 `(binding, first element,
/// row stride)`, and the bias `(binding, first class)` is added per column.
pub(super) struct Product<'a> {
    pub layout: MatmulLayout,
    pub mnk: (usize, usize, usize),
    pub a: Operand<'a>,
    pub b: Operand<'a>,
    pub c: (Bind<'a>, u32, usize),
    pub accumulate: bool,
    pub bias: Option<(Bind<'a>, u32)>,
}

impl GpuContext {
    /// Which matrix product the fused linear losses run: `"simt"` (the register-tiled f32
    /// kernel), or `"coop16"` / `"coop8"` (cooperative matrices of that tile size, with
    /// [`crate::GpuOptions::cooperative_matrix`]).
    pub fn matmul_kind(&self) -> &'static str {
        match self.inner.coop {
            None => "simt",
            Some((16, _)) => "coop16",
            Some(_) => "coop8",
        }
    }

    /// Records `p` into `rec`.
    pub(super) fn product<'a>(&self, rec: &mut Recorder<'a>, p: Product<'a>) -> Result<()> {
        let (m, n, k) = p.mnk;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let (kernel, tile) = match self.inner.coop {
            Some((t, lanes)) => {
                let mm = Mm { layout: p.layout, coop8: t == 8, ..Default::default() };
                let variant = Variant {
                    input: p.a.dtype,
                    second: p.b.dtype,
                    subgroup: true,
                    wg: lanes as u16,
                    mm,
                    ..Default::default()
                };
                let t = t as usize;
                (self.kernel(Shader::MatmulCoop, variant)?, (2 * t, 2 * t))
            }
            None => {
                // 4-wide reads need the alignment, and a binding of at least one such element.
                let four = |o: &Operand<'_>| o.first.is_multiple_of(4) && o.rs.is_multiple_of(4) && o.bind.size >= 16;
                let (a4, b4) = (four(&p.a), four(&p.b));
                let mm = Mm { layout: p.layout, a4, b4, unchecked: a4 && b4 && in_range(&p), coop8: false };
                if mm.unchecked {
                    self.inner.unchecked_products.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let variant = Variant {
                    input: p.a.dtype,
                    second: p.b.dtype,
                    subgroup: self.inner.mm_subgroup,
                    mm,
                    ..Default::default()
                };
                (self.kernel(Shader::Matmul, variant)?, TILE)
            }
        };
        let flags =
            if p.accumulate { mm_flags::ACCUMULATE } else { 0 } | if p.bias.is_some() { mm_flags::BIAS } else { 0 };
        let params = MatmulParams {
            head: Header { x_off: p.a.first, y_off: p.b.first, o_off: p.c.1, flags, ..Header::new(1, 1) },
            m: m as u32,
            n: n as u32,
            k: k as u32,
            a_rs: p.a.rs as u32,
            b_rs: p.b.rs as u32,
            c_rs: p.c.2 as u32,
            bias0: p.bias.as_ref().map_or(0, |b| b.1),
        };
        let tiles = m.div_ceil(tile.0) * n.div_ceil(tile.1);
        let mut l = Launch::new(kernel, params, 1, 1)
            .groups(Groups::PerRowTimes(tiles))
            .bind(slot::A, p.a.bind)
            .bind(slot::B, p.b.bind)
            .bind(slot::C, p.c.0);
        if let Some((b, _)) = p.bias {
            l = l.bind(slot::BIAS, b);
        }
        rec.push(l)
    }
}

/// Whether every access of the SIMT product `p`, read 4 wide, is in range without runtime
/// checks (the argument is in `shaders/matmul.wgsl`): M, N and K multiples of 4, and bindings
/// that hold every element of A, B and C the product covers, and its bias entries.
fn in_range(p: &Product<'_>) -> bool {
    let (m, n, k) = p.mnk;
    let holds = |o: &Operand<'_>, (rows, cols): (usize, usize)| {
        o.bind.size >= (extent(o.first as usize, o.rs, rows, cols) * o.dtype.size()) as u64
    };
    let (a, b) = match p.layout {
        MatmulLayout::Nt => ((m, k), (n, k)),
        MatmulLayout::Nn => ((m, k), (k, n)),
        MatmulLayout::Tn => ((k, m), (k, n)),
    };
    let c = Operand { bind: p.c.0, first: p.c.1, rs: p.c.2, dtype: DType::F32 };
    [m, n, k].iter().all(|x| x.is_multiple_of(4))
        && holds(&p.a, a)
        && holds(&p.b, b)
        && holds(&c, (m, n))
        && p.bias.as_ref().is_none_or(|(bias, first)| bias.size >= ((*first as usize + n) * 4) as u64)
}

/// One product run from the host ([`GpuContext::matmul_host`]): `C (+)= A B (+ bias)` with A
/// and B read from flat element arrays at `*_first` with row stride `*_rs` as `layout` says.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct MatmulArgs<'a> {
    pub layout: MatmulLayout,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// A's elements (any shape; read as a flat array).
    pub a: Logits<'a>,
    pub a_first: usize,
    pub a_rs: usize,
    pub b: Logits<'a>,
    pub b_first: usize,
    pub b_rs: usize,
    /// C's initial contents (accumulated onto when `accumulate`), its first element and row stride.
    pub c: &'a [f32],
    pub c_first: usize,
    pub c_rs: usize,
    pub accumulate: bool,
    /// Bias values and the class of column 0.
    pub bias: Option<(&'a [f32], usize)>,
}

/// The last element index an operand of `rows x cols` (rows along its strided axis) touches, plus one.
fn extent(first: usize, rs: usize, rows: usize, cols: usize) -> usize {
    if rows == 0 || cols == 0 {
        first
    } else {
        first + (rows - 1) * rs + cols
    }
}

impl GpuContext {
    /// Runs one product from the host and returns all of C (for tests of the kernel).
    #[doc(hidden)]
    pub fn matmul_host(&self, x: &MatmulArgs<'_>) -> Result<Vec<f32>> {
        let (m, n, k) = (x.m, x.n, x.k);
        let len = |l: &Logits<'_>| l.dim().0 * l.dim().1;
        // Strided axis rows x contiguous elements of each operand.
        let (a_shape, b_shape) = match x.layout {
            MatmulLayout::Nt => ((m, k), (n, k)),
            MatmulLayout::Nn => ((m, k), (k, n)),
            MatmulLayout::Tn => ((k, m), (k, n)),
        };
        let checks = [
            ("A", extent(x.a_first, x.a_rs, a_shape.0, a_shape.1), len(&x.a)),
            ("B", extent(x.b_first, x.b_rs, b_shape.0, b_shape.1), len(&x.b)),
            ("C", extent(x.c_first, x.c_rs, m, n), x.c.len()),
            ("bias", x.bias.map_or(0, |(_, c0)| c0 + n), x.bias.map_or(0, |(b, _)| b.len())),
        ];
        for (what, need, have) in checks {
            if need > have {
                return Err(XentError::Shape(format!("{what}: {need} elements needed, {have} given")));
            }
        }
        let ab = self.upload(&x.a.bytes(), U::STORAGE, "matmul A")?;
        let bb = self.upload(&x.b.bytes(), U::STORAGE, "matmul B")?;
        let cb = self.upload(bytemuck::cast_slice(x.c), U::STORAGE | U::COPY_SRC, "matmul C")?;
        let bias = x.bias.map(|(b, _)| self.upload(bytemuck::cast_slice(b), U::STORAGE, "matmul bias")).transpose()?;
        let align = self.inner.offset_align;
        let (a_bind, a_first) =
            range(&ab, x.a.dtype().size() as u64, x.a_first as u64, (len(&x.a) - x.a_first) as u64, align);
        let (b_bind, b_first) =
            range(&bb, x.b.dtype().size() as u64, x.b_first as u64, (len(&x.b) - x.b_first) as u64, align);
        let (c_bind, c_first) = range(&cb, 4, x.c_first as u64, (x.c.len() - x.c_first) as u64, align);
        let mut rec = Recorder::new(self);
        self.product(
            &mut rec,
            Product {
                layout: x.layout,
                mnk: (m, n, k),
                a: Operand { bind: a_bind, first: a_first, rs: x.a_rs, dtype: x.a.dtype() },
                b: Operand { bind: b_bind, first: b_first, rs: x.b_rs, dtype: x.b.dtype() },
                c: (c_bind, c_first, x.c_rs),
                accumulate: x.accumulate,
                bias: bias.as_ref().map(|b| (Bind::all(b), x.bias.map_or(0, |(_, c0)| c0) as u32)),
            },
        )?;
        let params = rec.params_pooled()?;
        let mut enc = self.device().create_command_encoder(&Default::default());
        rec.record(&mut enc, &params)?;
        let mut out = vec![0f32; x.c.len()];
        self.read_back(&cb, 0, bytemuck::cast_slice_mut(&mut out), Some(enc))?;
        Ok(out)
    }

    /// Seconds per product `C[m, n] = A B` in `layout` with `dtype` operands, device-resident:
    /// the median and minimum of `reps` timed runs of one submission each, after one warm-up
    /// (for benchmarks beside other libraries' matrix products).
    #[doc(hidden)]
    pub fn bench_matmul(
        &self,
        layout: MatmulLayout,
        (m, n, k): (usize, usize, usize),
        dtype: DType,
        reps: usize,
    ) -> Result<(f64, f64)> {
        let (a_rows, b_rows) = match layout {
            MatmulLayout::Nt => ((m, k), (n, k)),
            MatmulLayout::Nn => ((m, k), (k, n)),
            MatmulLayout::Tn => ((k, m), (k, n)),
        };
        let fill = |(r, c): (usize, usize), seed: u32| {
            let a = ndarray::Array2::from_shape_fn((r, c), |(i, j)| {
                let h = (i as u32).wrapping_mul(2654435761) ^ (j as u32).wrapping_mul(40503) ^ seed;
                (h % 1000) as f32 / 1000.0 - 0.5
            });
            crate::dtype::Tensor2::from_f32(a, dtype)
        };
        let (a, b) = (fill(a_rows, 1), fill(b_rows, 2));
        let ab = self.upload(&a.view().bytes(), U::STORAGE, "matmul A")?;
        let bb = self.upload(&b.view().bytes(), U::STORAGE, "matmul B")?;
        let cb = self.take((m * n * 4).max(4) as u64, U::STORAGE, "matmul C")?;
        let mut rec = Recorder::new(self);
        self.product(
            &mut rec,
            Product {
                layout,
                mnk: (m, n, k),
                a: Operand { bind: Bind::all(&ab), first: 0, rs: a_rows.1, dtype },
                b: Operand { bind: Bind::all(&bb), first: 0, rs: b_rows.1, dtype },
                c: (Bind::all(&cb), 0, n),
                accumulate: false,
                bias: None,
            },
        )?;
        let params = rec.params_pooled()?;
        let mut times = Vec::with_capacity(reps);
        for i in 0..=reps {
            let t0 = std::time::Instant::now();
            let mut enc = self.device().create_command_encoder(&Default::default());
            rec.record(&mut enc, &params)?;
            self.submit_wait(enc)?;
            if i > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        Ok((times.get(times.len() / 2).copied().unwrap_or(0.0), times.first().copied().unwrap_or(0.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::params::tests::check_family;

    /// The family's parameter block and flag bits declared in Rust are what `matmul_io.wgsl`
    /// declares, in both kernels (their every variant and bindings by slot and name:
    /// `source.rs`'s validation test).
    #[test]
    fn the_family_interface_matches_its_wgsl() {
        for shader in [Shader::Matmul, Shader::MatmulCoop] {
            check_family::<MatmulParams>(shader, "MatmulParams", Some((mm_flags::PREFIX, mm_flags::ALL)));
        }
        assert!(variants(false).len() + variants(true).len() >= 100);
    }

    /// Deterministic values spanning `2^lo .. 2^hi` in magnitude, both signs, some zeros.
    fn spread(len: usize, lo: i32, hi: i32, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 29 == 0 {
                    return 0.0;
                }
                let e = lo + (x % (hi - lo + 1) as u64) as i32;
                let m = 1.0 + (x >> 40) as f32 / (1u64 << 24) as f32;
                let v = m * (e as f32).exp2();
                if x & 1 == 0 {
                    v
                } else {
                    -v
                }
            })
            .collect()
    }

    #[test]
    fn coop_scale_is_an_exact_power_of_two_that_keeps_the_largest_in_range() {
        for max in [1e-38f32, 1.1754944e-38, 3e-30, 1e-8, 6e-5, 0.07, 1.0, 1.5, 65504.0, 1e5, 1e20, 3.4e38] {
            let (s, inv) = coop_scale(max);
            assert_eq!(s.to_bits() & 0x007f_ffff, 0, "{max}: scale {s} is a power of two");
            assert_eq!(s * inv, 1.0, "{max}: inverse");
            let scaled = max * s;
            if max >= 2f32.powi(-112) {
                assert!((16384.0..32768.0).contains(&scaled), "{max} scaled to {scaled}");
            } else {
                // The scale stops at 2^126: the tile stays below 2^14 (and finite).
                assert!(scaled < 32768.0 && scaled > 0.0, "{max} scaled to {scaled}");
            }
            assert!(half::f16::from_f32(scaled).is_finite());
        }
        assert_eq!(coop_scale(0.0), (1.0, 1.0));
        assert_eq!(coop_scale(f32::INFINITY), (1.0, 1.0));
        assert_eq!(coop_scale(f32::NAN), (1.0, 1.0));
    }

    #[test]
    fn coop_staging_never_overflows_and_meets_its_bound() {
        // Tiles of very different ranges: each element comes back within 2^-10 of itself
        // (one f16 ulp, whichever way the device rounds) or, far below the tile's largest,
        // within 2^-24 of the largest.
        for (lo, hi) in [(-30, 30), (100, 127), (-126, -100), (-20, 15), (15, 17), (-3, 3)] {
            for seed in 0..8 {
                let tile = spread(256, lo, hi, seed);
                let max = tile.iter().fold(0f32, |m, &x| m.max(x.abs()));
                let (h, inv) = coop_stage(&tile);
                for (&x, &y) in tile.iter().zip(&h) {
                    assert!(y.is_finite(), "{x} staged as {y} (range 2^{lo}..2^{hi})");
                    let back = y.to_f32() * inv;
                    let err = (back - x).abs();
                    let bound = x.abs() * 2f32.powi(-10) + max * 2f32.powi(-24) + f32::MIN_POSITIVE;
                    assert!(err <= bound, "{x} -> {back}: error {err:e} > {bound:e} (range 2^{lo}..2^{hi})");
                }
            }
        }
    }

    #[test]
    fn a_coop_product_through_the_mirror_meets_the_documented_bound() {
        // C = A B from staged tiles with f32 accumulation, against f64: within
        // 2^-9 sum |a||b| (2^-10 for each rounded input) plus f32 accumulation.
        let (m, n, k) = (16, 16, 16);
        for (ra, rb) in [((-8, 8), (-8, 8)), ((60, 80), (-90, -70)), ((-2, 2), (20, 24))] {
            let a = spread(m * k, ra.0, ra.1, 3);
            let b = spread(k * n, rb.0, rb.1, 4);
            let ((ha, ia), (hb, ib)) = (coop_stage(&a), coop_stage(&b));
            for i in 0..m {
                for j in 0..n {
                    let (mut got, mut want, mut mag) = (0f32, 0f64, 0f64);
                    for kk in 0..k {
                        got += ha[i * k + kk].to_f32() * hb[kk * n + j].to_f32();
                        want += a[i * k + kk] as f64 * b[kk * n + j] as f64;
                        mag += (a[i * k + kk] as f64 * b[kk * n + j] as f64).abs();
                    }
                    let got = (got * ia) * ib;
                    let bound = mag * (2f64.powi(-9) + k as f64 * 2f64.powi(-23)) + 1e-300;
                    let err = (got as f64 - want).abs();
                    assert!(err <= bound, "C[{i}, {j}] = {got}, want {want}: error {err:e} > {bound:e}");
                }
            }
        }
    }
}
