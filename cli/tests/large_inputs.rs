//! LLM-scale inputs through the command line: f16 and bf16 logits in `.npy` and safetensors
//! files, gradients in the logits' dtype, and files streamed in row blocks with results equal
//! to one pass over the whole tensor.

mod support;

use std::path::Path;

use half::{bf16, f16};
use ndarray::{Array1, Array2};
use support::*;
use xent::cpu::reference;
use xent::{CrossEntropy, Reduction};

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn backends() -> Vec<&'static str> {
    if gpu_ok() {
        vec!["cpu", "gpu"]
    } else {
        vec!["cpu"]
    }
}

/// Random logits and targets with every 5th row ignored.
fn problem(n: usize, v: usize, seed: u64) -> (Array2<f32>, Array1<i64>) {
    let mut rng = Rng(seed);
    (rng.logits(n, v, 3.0), rng.targets(n, v, 5))
}

/// One bf16 ulp at |w|.
fn bf16_ulp(w: f64) -> f64 {
    let e = if w == 0.0 { -126 } else { w.abs().log2().floor() as i32 };
    2f64.powi(e.max(-126) - 7)
}

#[test]
fn safetensors_logits_in_each_dtype() {
    let d = scratch_dir("st");
    let (n, v) = (37, 1001);
    let (x, t) = problem(n, v, 3);
    let tp = d.join("t.npy");
    write_npy(&tp, &[n], t.as_slice().unwrap());
    let cases: Vec<(&str, Array2<f32>, Vec<u8>)> = vec![
        ("F32", x.clone(), bytemuck::cast_slice(x.as_slice().unwrap()).to_vec()),
        (
            "F16",
            x.mapv(|v| f16::from_f32(v).to_f32()),
            bytemuck::cast_slice(&x.mapv(f16::from_f32).into_raw_vec_and_offset().0).to_vec(),
        ),
        (
            "BF16",
            x.mapv(|v| bf16::from_f32(v).to_f32()),
            bytemuck::cast_slice(&x.mapv(bf16::from_f32).into_raw_vec_and_offset().0).to_vec(),
        ),
    ];
    for (dtype, rounded, bytes) in cases {
        let f = d.join(format!("{dtype}.safetensors"));
        // A second tensor in the file: the logits are picked by name.
        write_safetensors(&f, &[("bias", "F32", &[3], &[0u8; 12]), ("logits", dtype, &[n, v], &bytes)]);
        let want = reference::cross_entropy(&rounded, &t, &CrossEntropy::default()).unwrap();
        for b in backends() {
            let spec = format!("{}:logits", s(&f));
            let g = d.join(format!("g-{dtype}-{b}.safetensors"));
            let j = xent_json(&[
                "eval",
                "--logits",
                &spec,
                "--targets",
                &s(&tp),
                "--backend",
                b,
                "--json",
                "--grad-out",
                &s(&g),
                "--grad-dtype",
                "bf16",
            ]);
            assert_eq!(j["dtype"], dtype.to_lowercase(), "{dtype} {b}");
            let loss = number(&j["loss"]);
            assert!((loss - want.loss).abs() <= 1e-6 + 1e-6 * want.loss.abs(), "{dtype} {b}: {loss} vs {}", want.loss);
            // The bf16 gradient is within one bf16 ulp of the f64 value.
            let (shape, grad) = read_any(&g);
            assert_eq!(shape, [n, v]);
            for (k, (&gv, &w)) in grad.iter().zip(want.grad.iter()).enumerate() {
                assert!((gv - w).abs() <= bf16_ulp(w), "{dtype} {b}: grad[{}, {}] {gv} vs {w}", k / v, k % v);
            }
        }
        // f16 logits in .npy work too (NumPy has f16, not bf16).
        if dtype == "F16" {
            let np = d.join("f16.npy");
            write_npy(&np, &[n, v], &x.mapv(f16::from_f32).into_raw_vec_and_offset().0);
            for b in backends() {
                let j = xent_json(&["eval", "--logits", &s(&np), "--targets", &s(&tp), "--backend", b, "--json"]);
                assert!((number(&j["loss"]) - want.loss).abs() <= 1e-6 + 1e-6 * want.loss.abs());
            }
        }
    }
    // One clear line for each mistake.
    let f = d.join("BF16.safetensors");
    let e = xent_error(&["eval", "--logits", &s(&f), "--targets", &s(&tp), "--backend", "cpu"]);
    assert!(e.contains("pick one") && e.contains("logits") && e.contains("bias"), "{e}");
    let e = xent_error(&["eval", "--logits", &format!("{}:nope", s(&f)), "--targets", &s(&tp), "--backend", "cpu"]);
    assert!(e.contains("no tensor named \"nope\""), "{e}");
    let e = xent_error(&["eval", "--logits", &format!("{}:bias", s(&f)), "--targets", &s(&tp), "--backend", "cpu"]);
    assert!(e.contains("2 dimension"), "{e}");
    let e = xent_error(&[
        "eval",
        "--logits",
        &format!("{}:logits", s(&f)),
        "--targets",
        &s(&tp),
        "--backend",
        "cpu",
        "--grad-out",
        &s(&d.join("g.npy")),
        "--grad-dtype",
        "bf16",
    ]);
    assert!(e.contains("bfloat16"), "{e}");
    let ti = d.join("ti.safetensors");
    write_safetensors(&ti, &[("t", "I64", &[n], bytemuck::cast_slice(t.as_slice().unwrap()))]);
    let j = xent_json(&[
        "eval",
        "--logits",
        &format!("{}:logits", s(&f)),
        "--targets",
        &s(&ti),
        "--backend",
        "cpu",
        "--json",
    ]);
    assert_eq!(j["rows"], n);
}

#[test]
fn streaming_in_blocks_equals_one_pass() {
    let d = scratch_dir("blocks");
    let (n, v) = (203, 517);
    let (x, t) = problem(n, v, 9);
    let (xp, tp) = (d.join("x.npy"), d.join("t.npy"));
    write_npy(&xp, &[n, v], x.as_slice().unwrap());
    write_npy(&tp, &[n], t.as_slice().unwrap());
    let w = d.join("w.npy");
    write_npy(&w, &[n], &(0..n).map(|i| 0.5 + (i % 3) as f32 * 0.25).collect::<Vec<f32>>());
    for b in backends() {
        for reduction in ["mean", "sum"] {
            let mut runs = Vec::new();
            for rows in ["7", "64", "100000"] {
                let (g, r) = (d.join(format!("g{rows}.npy")), d.join(format!("r{rows}.npy")));
                let j = xent_json(&[
                    "eval",
                    "--logits",
                    &s(&xp),
                    "--targets",
                    &s(&tp),
                    "--backend",
                    b,
                    "--json",
                    "--reduction",
                    reduction,
                    "--z-loss",
                    "1e-3",
                    "--label-smoothing",
                    "0.1",
                    "--sample-weight",
                    &s(&w),
                    "--block-rows",
                    rows,
                    "--grad-out",
                    &s(&g),
                    "--loss-out",
                    &s(&r),
                ]);
                runs.push((number(&j["loss"]), read_2d(&g), read_1d(&r)));
            }
            let (l0, g0, r0) = &runs[2];
            let cfg = CrossEntropy::default()
                .with_reduction(if reduction == "mean" { Reduction::Mean } else { Reduction::Sum })
                .with_z_loss(1e-3)
                .with_label_smoothing(0.1)
                .with_sample_weight(Array1::from_shape_fn(n, |i| 0.5 + (i % 3) as f32 * 0.25));
            let want = reference::cross_entropy(&x, &t, &cfg).unwrap();
            assert!(
                (l0 - want.loss).abs() <= 1e-6 * want.loss.abs().max(1.0),
                "{b} {reduction}: {l0} vs {}",
                want.loss
            );
            for (l, g, r) in &runs[..2] {
                assert!((l - l0).abs() <= 1e-6 * l0.abs().max(1.0), "{b} {reduction}: blocks {l} vs {l0}");
                assert_eq!(g, g0, "{b} {reduction}: the gradient does not depend on the blocks");
                assert_eq!(r, r0, "{b} {reduction}: nor do the row losses");
            }
        }
    }
}

#[test]
fn perplexity_and_calibration_in_blocks() {
    let d = scratch_dir("ppl-blocks");
    let (b, tt, v) = (12, 9, 300);
    let (x, t) = problem(b * tt, v, 21);
    let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let xp = d.join("x.safetensors");
    write_safetensors(&xp, &[("logits", "BF16", &[b, tt, v], bytemuck::cast_slice(&xb))]);
    let tp = d.join("t.npy");
    write_npy(&tp, &[b, tt], &t.mapv(|y| y.max(0)).into_raw_vec_and_offset().0);
    let lp = d.join("l.npy");
    write_npy(&lp, &[b], &(0..b).map(|i| (i % tt) as i64 + 1).collect::<Vec<i64>>());
    for be in backends() {
        let one = xent_json(&[
            "perplexity",
            "--logits",
            &s(&xp),
            "--targets",
            &s(&tp),
            "--lengths",
            &s(&lp),
            "--backend",
            be,
            "--json",
        ]);
        let blocks = xent_json(&[
            "perplexity",
            "--logits",
            &s(&xp),
            "--targets",
            &s(&tp),
            "--lengths",
            &s(&lp),
            "--backend",
            be,
            "--json",
            "--block-rows",
            "9",
        ]);
        // Exact accumulators: bit for bit, however the rows are split.
        assert_eq!(one["corpus_nll"], blocks["corpus_nll"], "{be}");
        assert_eq!(one["ppl_per_sequence"], blocks["ppl_per_sequence"], "{be}");
        assert_eq!(blocks["dtype"], "bf16");
    }
    // Overconfident predictions that are right 70% of the time: a temperature above 1 fits.
    let (mut xc, tc) = problem(400, 50, 5);
    for (i, mut row) in xc.rows_mut().into_iter().enumerate() {
        let y = tc[i].max(0) as usize;
        let hit = if i % 10 < 7 { y } else { (y + 1) % 50 };
        row[hit] += 9.0;
    }
    let (xp, tp) = (d.join("cx.npy"), d.join("ct.npy"));
    write_npy(&xp, &[400, 50], &xc.into_raw_vec_and_offset().0);
    write_npy(&tp, &[400], t_of(&tc));
    for be in backends() {
        let one = xent_json(&["calibrate", "--logits", &s(&xp), "--targets", &s(&tp), "--backend", be, "--json"]);
        let blocks = xent_json(&[
            "calibrate",
            "--logits",
            &s(&xp),
            "--targets",
            &s(&tp),
            "--backend",
            be,
            "--json",
            "--block-rows",
            "33",
        ]);
        let (a, c) = (number(&one["temperature"]), number(&blocks["temperature"]));
        assert!((a - c).abs() <= 1e-5 * a, "{be}: {a} vs {c}");
        assert!((number(&one["nll_after"]) - number(&blocks["nll_after"])).abs() < 1e-6);
    }
}

fn t_of(t: &Array1<i64>) -> &[i64] {
    t.as_slice().unwrap()
}

#[test]
fn memory_stays_bounded_while_streaming() {
    // 32 and 64 MiB of logits in 2 MiB blocks: the peak memory does not grow with the file.
    let d = scratch_dir("rss");
    let v = 8192;
    let mut rng = Rng(4);
    let mut files = Vec::new();
    for n in [1024usize, 2048] {
        let x: Vec<f32> = (0..n * v).map(|_| (rng.normal() * 2.0) as f32).collect();
        let (xp, tp) = (d.join(format!("x{n}.npy")), d.join(format!("t{n}.npy")));
        write_npy(&xp, &[n, v], &x);
        write_npy(&tp, &[n], &(0..n).map(|i| (i * 31 % v) as i64).collect::<Vec<i64>>());
        files.push((xp, tp));
    }
    for be in backends() {
        let g = d.join("g.npy");
        let peaks: Vec<f64> = files
            .iter()
            .map(|(xp, tp)| {
                let j = xent_json(&[
                    "eval",
                    "--logits",
                    &s(xp),
                    "--targets",
                    &s(tp),
                    "--backend",
                    be,
                    "--json",
                    "--block-rows",
                    "64",
                    "--grad-out",
                    &s(&g),
                ]);
                number(&j["peak_rss_bytes"])
            })
            .collect();
        // Twice the file, (almost) the same peak: 32 MiB more input may cost at most 4 MiB.
        assert!(peaks[1] - peaks[0] < 4.0 * (1 << 20) as f64, "{be}: peaks {peaks:?}");
    }
}
