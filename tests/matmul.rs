//! The GPU matrix product of the fused linear losses, product by product: every layout, every
//! operand dtype, sizes that are not multiples of the tile (16 x 256) or of 4 along k, operands
//! that start at unaligned offsets with row strides wider than their rows, accumulation and
//! bias; each against an f64 product of the same (rounded) inputs, to f32 accumulation
//! tolerance. Run on every context of the GPU tests (subgroup broadcast and without).
#![cfg(feature = "gpu")]

mod common;

use common::*;
use ndarray::Array2;
use xent::gpu::{MatmulArgs, MatmulLayout};
use xent::{DType, GpuContext, GpuOptions, Tensor2, XentError};

/// Deterministic values in [-1, 1), rounded to `dtype`.
fn values(len: usize, seed: u32, dtype: DType) -> Tensor2 {
    let a = Array2::from_shape_fn((1, len), |(_, i)| {
        let h = (i as u32 ^ seed.wrapping_mul(0x9e37_79b9)).wrapping_mul(0x85eb_ca6b);
        let h = (h ^ (h >> 13)).wrapping_mul(0xc2b2_ae35);
        (h >> 8) as f32 / (1u32 << 23) as f32 - 1.0
    });
    Tensor2::from_f32(a, dtype)
}

struct Case {
    layout: MatmulLayout,
    mnk: (usize, usize, usize),
    /// Element offsets of A, B and C, and extra elements per row beyond each operand's rows.
    first: (usize, usize, usize),
    pad: (usize, usize, usize),
    accumulate: bool,
    bias: bool,
}

/// Runs `c` with `da` / `db` operands on `g` and compares with the f64 product: to f32
/// accumulation tolerance, or (a cooperative-matrix context) to the bound of its f16 tiles.
fn check(g: &xent::GpuContext, name: &str, c: &Case, da: DType, db: DType) {
    let coop = g.matmul_kind() != "simt";
    let (m, n, k) = c.mnk;
    // Each operand's (strided rows, contiguous elements).
    let (sa, sb) = match c.layout {
        MatmulLayout::Nt => ((m, k), (n, k)),
        MatmulLayout::Nn => ((m, k), (k, n)),
        MatmulLayout::Tn => ((k, m), (k, n)),
    };
    let (a_rs, b_rs, c_rs) = (sa.1 + c.pad.0, sb.1 + c.pad.1, n + c.pad.2);
    let a = values(c.first.0 + sa.0 * a_rs, 1, da);
    let b = values(c.first.1 + sb.0 * b_rs, 2, db);
    let c0 = values(c.first.2 + m * c_rs, 3, DType::F32).to_f32().into_raw_vec_and_offset().0;
    let bias_v = values(n + 5, 4, DType::F32).to_f32().into_raw_vec_and_offset().0;
    let (af, bf) = (a.to_f32(), b.to_f32());
    let (af, bf) = (af.as_slice().unwrap(), bf.as_slice().unwrap());
    let at = |i: usize, kk: usize| match c.layout {
        MatmulLayout::Tn => af[c.first.0 + kk * a_rs + i],
        _ => af[c.first.0 + i * a_rs + kk],
    } as f64;
    let bt = |kk: usize, j: usize| match c.layout {
        MatmulLayout::Nt => bf[c.first.1 + j * b_rs + kk],
        _ => bf[c.first.1 + kk * b_rs + j],
    } as f64;
    // The context is shared by this file's tests: one product at a time, so that the counter
    // below counts this one.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let before = g.counters().unchecked_products;
    let got = g
        .matmul_host(&MatmulArgs {
            layout: c.layout,
            m,
            n,
            k,
            a: a.view(),
            a_first: c.first.0,
            a_rs,
            b: b.view(),
            b_first: c.first.1,
            b_rs,
            c: &c0,
            c_first: c.first.2,
            c_rs,
            accumulate: c.accumulate,
            bias: c.bias.then_some((&bias_v[..], 5)),
        })
        .unwrap();
    // The SIMT kernel runs without runtime checks exactly where every access is proven in
    // range: 4-wide operands (starts and strides multiples of 4) and m, n, k multiples of 4.
    let aligned = [c.first.0, a_rs, c.first.1, b_rs, m, n, k].iter().all(|x| x % 4 == 0) && m * n > 0;
    let unchecked = g.counters().unchecked_products - before;
    assert_eq!(unchecked, u64::from(aligned && !coop), "{name}: products run without runtime checks");
    let mut worst = 0f64;
    for (e, (&gv, &old)) in got.iter().zip(&c0).enumerate() {
        let inside = e >= c.first.2 && (e - c.first.2) / c_rs < m && (e - c.first.2) % c_rs < n;
        if !inside {
            assert_eq!(gv.to_bits(), old.to_bits(), "{name}: element {e} outside C was written");
            continue;
        }
        let (i, j) = ((e - c.first.2) / c_rs, (e - c.first.2) % c_rs);
        let (mut want, mut mag) = (0f64, 0f64);
        for kk in 0..k {
            want += at(i, kk) * bt(kk, j);
            mag += (at(i, kk) * bt(kk, j)).abs();
        }
        if c.bias {
            want += bias_v[5 + j] as f64;
            mag += (bias_v[5 + j] as f64).abs();
        }
        if c.accumulate {
            want += old as f64;
            mag += (old as f64).abs();
        }
        // f32 accumulation over k terms: a few ulps of the sum of magnitudes per term; f16
        // tiles add 2^-10 of each rounded input's magnitude (2^-9 of each product).
        let tile = if coop { 2f64.powi(-9) } else { 0.0 };
        let tol = (2.0 * (k as f64 + 2.0) * f32::EPSILON as f64 + tile) * mag + 1e-30;
        let err = (gv as f64 - want).abs();
        assert!(err <= tol, "{name}: C[{i}, {j}] = {gv}, want {want} (error {err:.3e} > {tol:.3e})");
        worst = worst.max(err / mag.max(1e-30));
    }
    eprintln!("{name}: worst error / magnitude {worst:.2e}");
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for layout in [MatmulLayout::Nt, MatmulLayout::Nn, MatmulLayout::Tn] {
        for (mnk, first, pad) in [
            // Aligned: the 4-wide loads, whole tiles along m.
            ((32, 256, 32), (0, 0, 0), (0, 0, 0)),
            // Tile edges in m and n, k not a multiple of 4, unaligned starts and strides.
            ((13, 37, 23), (3, 1, 2), (1, 3, 5)),
            // Aligned starts, k % 4 = 1, an edge tile of both m and n.
            ((9, 300, 17), (4, 8, 0), (4, 0, 3)),
            // A single row / column / k.
            ((1, 5, 1), (0, 2, 0), (0, 0, 0)),
            ((7, 1, 6), (1, 0, 1), (2, 1, 0)),
        ] {
            v.push(Case { layout, mnk, first, pad, accumulate: false, bias: false });
        }
        v.push(Case { layout, mnk: (11, 70, 9), first: (0, 4, 1), pad: (0, 4, 2), accumulate: true, bias: true });
        // Aligned, so run without runtime checks, with edge tiles in m (28 of 16-row tiles) and
        // n (260 of 256-column tiles), padded rows, and bias and accumulation.
        v.push(Case { layout, mnk: (28, 260, 20), first: (4, 8, 1), pad: (4, 4, 3), accumulate: true, bias: true });
        // 4-wide operands but m, n, k not multiples of 4 (a partial k-step, partial 4-groups):
        // these keep the runtime checks.
        v.push(Case { layout, mnk: (10, 38, 22), first: (0, 4, 0), pad: (2, 2, 0), accumulate: false, bias: true });
        // No k at all: C is its old value (plus bias).
        v.push(Case { layout, mnk: (3, 6, 0), first: (0, 0, 0), pad: (0, 0, 0), accumulate: true, bias: true });
    }
    v
}

#[test]
fn every_layout_dtype_and_edge_matches_the_f64_product() {
    for (i, (ctx, g)) in gpus().into_iter().enumerate() {
        // Every dtype pair on the first context; the others (no subgroups, small bindings)
        // differ in the kernel's A fragments or bindings only: f32 and bf16.
        let pairs: &[(DType, DType)] = if i == 0 {
            &[
                (DType::F32, DType::F32),
                (DType::BF16, DType::BF16),
                (DType::F16, DType::F16),
                (DType::F32, DType::BF16),
                (DType::F16, DType::F32),
            ]
        } else {
            &[(DType::F32, DType::F32), (DType::BF16, DType::BF16)]
        };
        for c in cases() {
            for &(da, db) in pairs {
                let name = format!(
                    "{ctx} {:?} {:?} first {:?} pad {:?} {da:?}x{db:?} acc {} bias {}",
                    c.layout, c.mnk, c.first, c.pad, c.accumulate, c.bias
                );
                check(g, &name, &c, da, db);
            }
        }
    }
}

#[test]
fn a_large_product_with_many_tiles_and_a_long_k() {
    let Some(g) = gpu() else { return };
    // Several column tiles, a row-tile edge, k long enough to cross many 4-steps.
    for layout in [MatmulLayout::Nt, MatmulLayout::Nn, MatmulLayout::Tn] {
        let c = Case { layout, mnk: (20, 530, 301), first: (0, 0, 0), pad: (0, 0, 0), accumulate: false, bias: false };
        check(g, &format!("{layout:?} large"), &c, DType::F32, DType::F32);
        check(g, &format!("{layout:?} large bf16"), &c, DType::BF16, DType::BF16);
    }
}

#[test]
fn an_operand_shorter_than_its_extent_is_a_shape_error() {
    let Some(g) = gpu() else { return };
    let a = values(10, 1, DType::F32);
    let b = values(12, 2, DType::F32);
    let c = vec![0f32; 6];
    let args = MatmulArgs {
        layout: MatmulLayout::Nt,
        m: 2,
        n: 3,
        k: 5,
        a: a.view(),
        a_first: 1,
        a_rs: 5,
        b: b.view(),
        b_first: 0,
        b_rs: 4,
        c: &c,
        c_first: 0,
        c_rs: 3,
        accumulate: false,
        bias: None,
    };
    assert!(matches!(g.matmul_host(&args), Err(XentError::Shape(_))));
}

/// The cooperative-matrix kernel, where the adapter offers an f16 x f16 -> f32 configuration
/// (tensor cores); elsewhere (lavapipe) it says that it skipped and why.
#[test]
fn cooperative_matrix_products_where_the_adapter_offers_them() {
    let opts = GpuOptions::default().with_cooperative_matrix(true);
    let g = match GpuContext::with_options(opts) {
        Ok(g) => g,
        Err(XentError::InvalidOption(msg)) if msg.contains("no cooperative matrix") => {
            println!("skipped: adapter has no cooperative matrix f16 16x16x16 configuration ({msg})");
            return;
        }
        Err(e @ XentError::NoAdapter { .. }) if !gpu_required() => {
            println!("skipped: {e}");
            return;
        }
        Err(e) => panic!("cooperative_matrix context: {e}"),
    };
    assert!(g.matmul_kind().starts_with("coop"), "{}", g.matmul_kind());
    for c in cases() {
        for (da, db) in [(DType::F32, DType::F32), (DType::BF16, DType::BF16), (DType::F16, DType::F32)] {
            let name = format!("{} {:?} {:?} {da:?}x{db:?}", g.matmul_kind(), c.layout, c.mnk);
            check(&g, &name, &c, da, db);
        }
    }
    // Magnitudes f16 cannot hold, scaled per tile: still within the bound.
    let (m, n, k) = (24, 40, 33);
    let a = Tensor2::from_f32(values(m * k, 7, DType::F32).to_f32().mapv(|x| x * 1e6), DType::F32);
    let b = Tensor2::from_f32(values(n * k, 8, DType::F32).to_f32().mapv(|x| x * 1e-7), DType::F32);
    let c0 = vec![0f32; m * n];
    let got = g
        .matmul_host(&MatmulArgs {
            layout: MatmulLayout::Nt,
            m,
            n,
            k,
            a: a.view(),
            a_first: 0,
            a_rs: k,
            b: b.view(),
            b_first: 0,
            b_rs: k,
            c: &c0,
            c_first: 0,
            c_rs: n,
            accumulate: false,
            bias: None,
        })
        .unwrap();
    let (af, bf) = (a.to_f32(), b.to_f32());
    for i in 0..m {
        for j in 0..n {
            let (mut want, mut mag) = (0f64, 0f64);
            for kk in 0..k {
                let p = af[[0, i * k + kk]] as f64 * bf[[0, j * k + kk]] as f64;
                want += p;
                mag += p.abs();
            }
            let err = (got[i * n + j] as f64 - want).abs();
            assert!(err <= 2f64.powi(-8) * mag, "scaled C[{i}, {j}] = {}, want {want}", got[i * n + j]);
        }
    }
}
