//! The CPU's matrix-product kernels for the fused linear cross-entropy, each forced on where the
//! CPU has it ([`Cpu::with_matmul`]): bf16 inputs against the f64 reference (logits
//! materialised from the bf16 values, the chain rule in f64) with the bound each kernel states,
//! odd sizes, chunk edges and ignored rows; the same bits on any thread count; the vocabulary-
//! parallel form; the choice by option, environment and cpuid. A kernel this CPU lacks is
//! skipped with a line saying so.

mod common;

use common::*;
use ndarray::{Array1, Array2};
use xent::cpu::CpuMatmul;
use xent::parallel::{SingleProcess, VocabShard};
use xent::*;

/// Every kernel `CpuMatmul` names.
const ALL: &[CpuMatmul] = CpuMatmul::ALL;

/// A CPU backend on `m`'s kernels, or `None` (with the reason printed) where this CPU lacks them.
fn forced(m: CpuMatmul, threads: Option<usize>) -> Option<Cpu> {
    if let Some(why) = m.unavailable() {
        println!("skipped {m}: {why}");
        return None;
    }
    let cpu = match threads {
        Some(t) => Cpu::with_threads(t).unwrap(),
        None => Cpu::new(),
    };
    Some(cpu.with_matmul(m).unwrap())
}

/// The f64 reference from the (bf16-rounded) inputs as f32: loss, `G` and the three products,
/// and `sum |G| |W|`, `sum |G|^T |H|`, the scales of the stated bounds.
struct Ref {
    loss: f64,
    row_loss: Vec<f64>,
    gh: Array2<f64>,
    gw: Array2<f64>,
    gb: Array1<f64>,
    gh_scale: Array2<f64>,
    gw_scale: Array2<f64>,
}

fn reference(h: &Array2<f32>, w: &Array2<f32>, b: Option<&Array1<f32>>, t: &[i64], cfg: &CrossEntropy) -> Ref {
    let (r, h64, w64) = linear_reference(h, w, b, t, cfg);
    let ga = r.grad.mapv(f64::abs);
    Ref {
        loss: r.loss,
        row_loss: r.row_loss.to_vec(),
        gh: r.grad.dot(&w64),
        gw: r.grad.t().dot(&h64),
        gb: r.grad.sum_axis(ndarray::Axis(0)),
        gh_scale: ga.dot(&w64.mapv(f64::abs)),
        gw_scale: ga.t().dot(&h64.mapv(f64::abs)),
    }
}

/// bf16 inputs (and their f32 values): hidden `[n, d]`, weight `[v, d]`, a bias, targets with
/// every 4th row ignored.
#[allow(clippy::type_complexity)]
fn inputs(
    n: usize,
    d: usize,
    v: usize,
    seed: u64,
) -> (Array2<half::bf16>, Array2<half::bf16>, Array2<f32>, Array2<f32>, Array1<f32>, Array1<i64>) {
    let mut rng = Rng(seed);
    let hb = rng.logits(n, d, 1.0).mapv(half::bf16::from_f32);
    let wb = rng.logits(v, d, 1.5 / (d as f64).sqrt()).mapv(half::bf16::from_f32);
    let b = Array1::from_shape_fn(v, |c| ((c * 37 % 11) as f32 - 5.0) * 0.1);
    let t = rng.targets(n, v, 4);
    (hb.clone(), wb.clone(), hb.mapv(f32::from), wb.mapv(f32::from), b, t)
}

/// bf16 terms of `G` per gradient product `(G W, G^T H)` on AVX512-BF16: the library's
/// default, or `XENT_CPU_BF16_TERMS` when set (as the library reads it).
fn terms() -> (i32, i32) {
    match std::env::var("XENT_CPU_BF16_TERMS") {
        Ok(s) => {
            let p: Vec<i32> = s.split(',').map(|x| x.trim().parse().unwrap()).collect();
            (p[0], p[1])
        }
        Err(_) => (2, 2),
    }
}

/// `|got - want| <= unit * scale + 2^-18 * scale + atol` element-wise: `unit` the rounding of
/// `G` into bf16 terms (`2^-8` per term; 0 for f32 products), `2^-18 scale` the f32 gradient's
/// own error and f32 sums; returns the largest `|got - want| / scale`.
fn within(what: &str, got: &Array2<f32>, want: &Array2<f64>, scale: &Array2<f64>, unit: f64, atol: f64) -> f64 {
    let mut worst = 0.0f64;
    for (((i, &g), &w), &s) in got.indexed_iter().zip(want.iter()).zip(scale.iter()) {
        let err = (g as f64 - w).abs();
        assert!(err <= (unit + 2f64.powi(-18)) * s + atol, "{what}{i:?}: {g} vs {w} (scale {s}, unit {unit})");
        if s > 0.0 {
            worst = worst.max(err / s);
        }
    }
    worst
}

fn unit_of(m: CpuMatmul, terms: i32) -> f64 {
    match m {
        CpuMatmul::Avx512Bf16 | CpuMatmul::AmxBf16 => 2f64.powi(-8 * terms),
        _ => 0.0,
    }
}

#[test]
fn every_kernel_matches_the_f64_reference_within_its_bound() {
    let (gh_terms, gw_terms) = terms();
    for &(n, d, v) in &[(37, 24, 301), (50, 33, 515), (13, 70, 40)] {
        let (hb, wb, h, w, b, t) = inputs(n, d, v, (n * d + v) as u64);
        let cw = Array1::from_shape_fn(v, |c| 0.5 + (c % 5) as f32 * 0.3);
        for ce in [
            CrossEntropy::default(),
            CrossEntropy::default().with_label_smoothing(0.1).with_class_weight(cw.clone()),
            CrossEntropy::default().with_reduction(Reduction::None).with_z_loss(1e-3).with_softcap(5.0),
        ] {
            let r = reference(&h, &w, Some(&b), t.as_slice().unwrap(), &ce);
            for &m in ALL {
                let Some(cpu) = forced(m, None) else { continue };
                // One chunk, chunks of 7 rows (edges inside and at the end), one row per chunk.
                for rows in [n, 7, 1] {
                    let cfg = LinearCe::default().with_ce(ce.clone()).with_workspace_bytes(rows * v * 4);
                    let o = cpu.linear_cross_entropy(&hb, &wb, Some(b.view()), t.view(), &cfg).unwrap();
                    let what = format!("{m} {n}x{d}x{v} {ce:?} rows {rows}");
                    if ce.reduction == Reduction::None {
                        for (&a, &e) in o.row_loss.as_ref().unwrap().iter().zip(&r.row_loss) {
                            assert!((a as f64 - e).abs() <= 2e-6 * e.abs().max(1.0), "{what}: row loss {a} vs {e}");
                        }
                    } else {
                        assert!((o.loss - r.loss).abs() <= 2e-6 * r.loss.abs().max(1.0), "{what}: loss");
                    }
                    let gh = o.grad_hidden.as_ref().unwrap().to_f32();
                    let gw = o.grad_weight.as_ref().unwrap().to_f32();
                    within(&format!("{what}: grad_hidden"), &gh, &r.gh, &r.gh_scale, unit_of(m, gh_terms), 1e-9);
                    within(&format!("{what}: grad_weight"), &gw, &r.gw, &r.gw_scale, unit_of(m, gw_terms), 1e-9);
                    for (&a, &e) in o.grad_bias.as_ref().unwrap().iter().zip(r.gb.iter()) {
                        assert!((a as f64 - e).abs() <= 1e-6 * (1.0 + e.abs()), "{what}: grad_bias {a} vs {e}");
                    }
                }
            }
        }
    }
}

/// The errors of each kernel at a language-model-like shape, printed (the figures of
/// docs/cpu-bf16-matmul.md: run with `XENT_CPU_BF16_TERMS=1,1`, `2,1`, `2,2` for the choices),
/// and held to the stated bounds.
#[test]
fn errors_at_a_realistic_shape() {
    let (n, d, v) = (192, 256, 4099);
    let (hb, wb, h, w, b, t) = inputs(n, d, v, 11);
    let r = reference(&h, &w, Some(&b), t.as_slice().unwrap(), &CrossEntropy::default());
    let (gh_terms, gw_terms) = terms();
    let rel = |got: &Array2<f32>, want: &Array2<f64>| {
        let num: f64 = got.iter().zip(want.iter()).map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
        (num / want.iter().map(|w| w * w).sum::<f64>()).sqrt()
    };
    for &m in ALL {
        let Some(cpu) = forced(m, None) else { continue };
        let cfg = LinearCe::default().with_workspace_bytes(64 * v * 4);
        let o = cpu.linear_cross_entropy(&hb, &wb, Some(b.view()), t.view(), &cfg).unwrap();
        let gh = o.grad_hidden.as_ref().unwrap().to_f32();
        let gw = o.grad_weight.as_ref().unwrap().to_f32();
        let gh_worst = within(&format!("{m} grad_hidden"), &gh, &r.gh, &r.gh_scale, unit_of(m, gh_terms), 1e-9);
        let gw_worst = within(&format!("{m} grad_weight"), &gw, &r.gw, &r.gw_scale, unit_of(m, gw_terms), 1e-9);
        println!(
            "{m} (terms G W {gh_terms}, G^T H {gw_terms}) {n}x{d}x{v}: loss rel err {:.2e}; grad_hidden rel l2 err {:.2e}, worst err/scale {:.2e}; grad_weight rel l2 err {:.2e}, worst err/scale {:.2e}",
            ((o.loss - r.loss) / r.loss).abs(),
            rel(&gh, &r.gh),
            gh_worst,
            rel(&gw, &r.gw),
            gw_worst,
        );
    }
}

#[test]
fn same_bits_on_every_thread_count() {
    let (n, d, v) = (96, 48, 1000);
    let (hb, wb, _, _, b, t) = inputs(n, d, v, 3);
    let cfg = LinearCe::default().with_workspace_bytes(16 * v * 4);
    for &m in ALL {
        let bits = |threads| {
            let cpu = forced(m, Some(threads))?;
            let o = cpu.linear_cross_entropy(&hb, &wb, Some(b.view()), t.view(), &cfg).unwrap();
            let mut bits = vec![o.loss.to_bits()];
            for g in [&o.grad_hidden, &o.grad_weight] {
                bits.extend(g.as_ref().unwrap().to_f32().iter().map(|x| x.to_bits() as u64));
            }
            bits.extend(o.grad_bias.as_ref().unwrap().iter().map(|x| x.to_bits() as u64));
            Some(bits)
        };
        let Some(first) = bits(2) else { continue };
        for threads in [1, 3, 2] {
            assert_eq!(bits(threads).unwrap(), first, "{m}: {threads} threads");
        }
    }
}

/// The vocabulary-parallel form on one process gives the whole call's answers on each kernel,
/// with a strided (non-contiguous) hidden input.
#[test]
fn vocabulary_parallel_and_strided_inputs() {
    let (n, d, v) = (29, 40, 333);
    let (hb, wb, h, w, b, t) = inputs(n, d, v, 9);
    let r = reference(&h, &w, Some(&b), t.as_slice().unwrap(), &CrossEntropy::default());
    let wide = ndarray::concatenate(ndarray::Axis(1), &[hb.view(), hb.view()]).unwrap();
    let strided = wide.slice(ndarray::s![.., ..d]);
    assert!(!strided.is_standard_layout());
    let (gh_terms, gw_terms) = terms();
    let cfg = LinearCe::default().with_workspace_bytes(8 * v * 4);
    for &m in ALL {
        let Some(cpu) = forced(m, None) else { continue };
        let shard = VocabShard { class0: 0, classes: v };
        let sharded = cpu
            .linear_cross_entropy_vocab_parallel(&hb, &wb, Some(b.view()), t.view(), shard, &cfg, &SingleProcess)
            .unwrap();
        let strided = cpu.linear_cross_entropy(strided, &wb, Some(b.view()), t.view(), &cfg).unwrap();
        for (name, o) in [("vocab-parallel", sharded), ("strided hidden", strided)] {
            assert!((o.loss - r.loss).abs() <= 2e-6 * r.loss.abs(), "{m} {name}: loss");
            let gh = o.grad_hidden.as_ref().unwrap().to_f32();
            let gw = o.grad_weight.as_ref().unwrap().to_f32();
            within(&format!("{m} {name}: grad_hidden"), &gh, &r.gh, &r.gh_scale, unit_of(m, gh_terms), 1e-9);
            within(&format!("{m} {name}: grad_weight"), &gw, &r.gw, &r.gw_scale, unit_of(m, gw_terms), 1e-9);
        }
    }
}

#[test]
fn the_choice_of_kernels() {
    let cpu = Cpu::new();
    // f32 and f16 inputs always take the f32 products.
    for dt in [DType::F32, DType::F16] {
        assert_eq!(cpu.linear_matmul(dt).unwrap(), CpuMatmul::F32);
    }
    let f32_cpu = Cpu::new().with_matmul(CpuMatmul::F32).unwrap();
    assert_eq!(f32_cpu.linear_matmul(DType::BF16).unwrap(), CpuMatmul::F32);
    let best = CpuMatmul::detect();
    assert!(best.available());
    // The best: no kernel after it in ALL (fastest last) is available.
    assert!(ALL.iter().skip_while(|&&m| m != best).skip(1).all(|m| !m.available()), "{best}");
    for &m in ALL {
        assert_eq!(m.to_string().parse::<CpuMatmul>().unwrap(), m);
        match Cpu::new().with_matmul(m) {
            Ok(c) => {
                assert_eq!(c.linear_matmul(DType::BF16).unwrap(), m);
                assert_eq!(c.linear_matmul(DType::F32).unwrap(), CpuMatmul::F32);
            }
            Err(e) => {
                let why = m.unavailable().expect("refused only where unavailable");
                assert!(
                    matches!(&e, XentError::InvalidOption(msg) if msg.contains(m.name()) && msg.contains(why)),
                    "{e}"
                );
                println!("{m} refused as it should be: {e}");
            }
        }
    }
    for (s, want) in [
        ("f32", Some(CpuMatmul::F32)),
        ("avx512-bf16", Some(CpuMatmul::Avx512Bf16)),
        ("amx-bf16", Some(CpuMatmul::AmxBf16)),
        ("bf17", None),
    ] {
        match s.parse::<CpuMatmul>() {
            Ok(m) => assert_eq!(Some(m), want, "{s}"),
            Err(e) => assert!(want.is_none() && matches!(e, XentError::InvalidOption(_)), "{s}: {e}"),
        }
    }
    if std::env::var_os("XENT_CPU_MATMUL").is_none() {
        assert_eq!(cpu.linear_matmul(DType::BF16).unwrap(), CpuMatmul::detect().for_dtype(DType::BF16));
    }
}

/// `XENT_CPU_MATMUL` as the library reads it, in a child process (the environment is the
/// process's): a bad name is one typed error from the call, not a panic.
#[test]
fn a_bad_xent_cpu_matmul_is_an_error() {
    if std::env::var_os("XENT_CPU_MATMUL_CHILD").is_some() {
        let (hb, wb, _, _, _, t) = inputs(4, 8, 10, 1);
        let e = Cpu::new().linear_cross_entropy(&hb, &wb, None, t.view(), &LinearCe::default()).unwrap_err();
        assert!(matches!(&e, XentError::InvalidOption(m) if m.contains("XENT_CPU_MATMUL")), "{e}");
        return;
    }
    // Kernels this CPU lacks, where there are such, else an unknown name.
    let bad = ALL.iter().find(|m| !m.available()).map_or("amx-int8", |m| m.name());
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--exact", "a_bad_xent_cpu_matmul_is_an_error", "--nocapture"])
        .env("XENT_CPU_MATMUL_CHILD", "1")
        .env("XENT_CPU_MATMUL", bad)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("1 passed"), "{text}{}", String::from_utf8_lossy(&out.stderr));
}

/// `Bf16Grad::Rounded` (G rounded to bf16 once, as PyTorch's bf16 autograd): its gradients
/// within the bound it states, `2^-8 sum |G| |X|` element-wise (plus f32 sums), and worse
/// than 2^-14 of the scale somewhere (the default's two terms stay under 1e-5: so the option
/// took effect); the loss and `grad_bias` as exact as the default's (they do not pass through
/// the rounded products).
#[test]
fn rounded_gradient_within_its_bound() {
    use xent::cpu::Bf16Grad;
    let (n, d, v) = (96, 128, 1031);
    let (hb, wb, h, w, b, t) = inputs(n, d, v, 5);
    let r = reference(&h, &w, Some(&b), t.as_slice().unwrap(), &CrossEntropy::default());
    let cfg = LinearCe::default().with_workspace_bytes(40 * v * 4);
    for m in ALL.iter().copied().filter(|m| m.multiplies_bf16()) {
        let Some(cpu) = forced(m, None) else { continue };
        rounded_on(m, cpu.with_bf16_grad(Bf16Grad::Rounded), (n, d, v), (&hb, &wb, &b, &t), &r, &cfg);
    }
}

fn rounded_on(
    m: CpuMatmul,
    cpu: Cpu,
    (n, d, v): (usize, usize, usize),
    (hb, wb, b, t): (&Array2<half::bf16>, &Array2<half::bf16>, &Array1<f32>, &Array1<i64>),
    r: &Ref,
    cfg: &LinearCe,
) {
    assert_eq!(cpu.bf16_grad_terms().unwrap(), (1, 1));
    let o = cpu.linear_cross_entropy(hb, wb, Some(b.view()), t.view(), cfg).unwrap();
    assert!((o.loss - r.loss).abs() <= 2e-6 * r.loss.abs().max(1.0), "{m}: loss {} vs {}", o.loss, r.loss);
    for (&a, &e) in o.grad_bias.as_ref().unwrap().iter().zip(r.gb.iter()) {
        assert!((a as f64 - e).abs() <= 1e-6 * (1.0 + e.abs()), "{m}: grad_bias {a} vs {e}");
    }
    let gh = o.grad_hidden.as_ref().unwrap().to_f32();
    let gw = o.grad_weight.as_ref().unwrap().to_f32();
    let u = 2f64.powi(-8);
    let gh_worst = within(&format!("{m} rounded grad_hidden"), &gh, &r.gh, &r.gh_scale, u, 1e-9);
    let gw_worst = within(&format!("{m} rounded grad_weight"), &gw, &r.gw, &r.gw_scale, u, 1e-9);
    println!(
        "{m} rounded {n}x{d}x{v}: worst err/scale grad_hidden {gh_worst:.2e}, grad_weight {gw_worst:.2e} (bound {u:.2e})"
    );
    assert!(gh_worst > 2f64.powi(-14) && gw_worst > 2f64.powi(-14), "{m}: the rounding took effect");
}

/// Which kernels the tests above ran on this CPU and which they skipped, and why: the test
/// script runs this with `--nocapture`, so that CI's log says it.
#[test]
fn the_kernels_on_this_cpu() {
    for &m in ALL {
        match m.unavailable() {
            None => {
                assert!(m.available() && m.check().is_ok());
                println!("cpu_matmul {m}: runs here, tested");
            }
            Some(why) => {
                assert!(!m.available() && m.check().is_err());
                assert_ne!(m, CpuMatmul::F32, "f32 runs everywhere");
                println!("cpu_matmul {m}: skipped, {why}");
            }
        }
    }
    println!("cpu_matmul auto picks {}", CpuMatmul::detect());
}
