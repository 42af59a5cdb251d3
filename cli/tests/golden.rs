//! Every case of the golden set in `tests/golden` (PyTorch, float64; see its README), run
//! through the `xent` binary on both backends.
//!
//! Tolerances (against the f64 values): loss |err| <= 2e-6 + 2e-6 |want|; gradient and
//! log-probabilities |err| <= 1e-7 + 2e-5 |want| (f32 storage of values that are themselves
//! differences of O(1) f32 quantities).

mod support;

use std::path::{Path, PathBuf};

use serde_json::Value;
use support::*;

fn golden_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden");
    assert!(dir.join("manifest.json").is_file(), "golden cases not found at {}", dir.display());
    dir
}

fn manifest() -> Vec<Value> {
    let text = std::fs::read_to_string(golden_dir().join("manifest.json")).unwrap();
    // Python's json writes bare NaN / Infinity; make them strings for serde.
    let text = text
        .replace(": NaN", ": \"NaN\"")
        .replace(": -Infinity", ": \"-Infinity\"")
        .replace(": Infinity", ": \"Infinity\"");
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

/// `xent CMD --json --backend B FLAG VALUE ...`
fn cli(cmd: &str, backend: &str, flags: &[(&str, String)]) -> Vec<String> {
    let mut v = vec![cmd.to_string(), "--json".into(), "--backend".into(), backend.into()];
    for (f, x) in flags {
        v.push(f.to_string());
        v.push(x.clone());
    }
    v
}

fn run(args: &[String]) -> Value {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    xent_json(&args)
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("xent-golden-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn cases(backend: &str) -> usize {
    let dir = golden_dir();
    let p = |f: &Value| dir.join(f.as_str().unwrap()).display().to_string();
    let mut ran = 0;
    for case in manifest() {
        let name = case["name"].as_str().unwrap();
        let (params, inputs, expected) = (&case["params"], &case["inputs"], &case["expected"]);
        match case["op"].as_str().unwrap() {
            "cross_entropy" => {
                let grad = scratch(&format!("{backend}-{name}-grad.npy"));
                let rows = scratch(&format!("{backend}-{name}-rows.npy"));
                let mut args: Vec<String> = vec!["eval".into(), "--json".into(), "--backend".into(), backend.into()];
                let mut add = |k: &str, v: String| {
                    args.push(k.into());
                    args.push(v);
                };
                add("--logits", p(&inputs["logits"]));
                add("--targets", p(&inputs["targets"]));
                add("--reduction", params["reduction"].as_str().unwrap().into());
                add("--ignore-index", params["ignore_index"].to_string());
                add("--label-smoothing", params["label_smoothing"].to_string());
                if let Some(w) = inputs.get("class_weight") {
                    add("--class-weight", p(w));
                }
                if let Some(c) = params.get("softcap") {
                    add("--softcap", c.to_string());
                }
                if let Some(z) = params.get("z_loss_scale") {
                    add("--z-loss", z.to_string());
                }
                add("--grad-out", grad.display().to_string());
                add("--loss-out", rows.display().to_string());
                let out = run(&args);
                assert_eq!(out["backend"], backend);
                let n = read_2d(p(&inputs["logits"])).nrows();
                assert_eq!(out["rows"], n);
                match &expected["loss"] {
                    Value::String(f) if f.ends_with(".npy") => {
                        assert!(out["loss"].is_null(), "{name}: loss must be null for none");
                        let want = read_f64(dir.join(f)).into_dimensionality().unwrap();
                        let got = read_1d(&rows).mapv(|x| x as f32);
                        assert_close_1d(&format!("{backend} {name} row loss"), got.view(), want.view(), 2e-6, 2e-6);
                    }
                    v => assert_scalar(&format!("{backend} {name} loss"), number(&out["loss"]), number(v), 2e-6, 2e-6),
                }
                if let Some(g) = expected.get("grad") {
                    let want = read_f64(p(g)).into_dimensionality().unwrap();
                    let got = read_2d(&grad).mapv(|x| x as f32);
                    assert_close_2d(&format!("{backend} {name} grad"), got.view(), want.view(), 1e-7, 2e-5);
                }
            }
            "linear_cross_entropy" => {
                let files = ["gh", "gw", "gb", "rows"].map(|k| scratch(&format!("{backend}-{name}-{k}.npy")));
                let mut args: Vec<String> = vec!["eval".into(), "--json".into(), "--backend".into(), backend.into()];
                let mut add = |k: &str, v: String| {
                    args.push(k.into());
                    args.push(v);
                };
                add("--hidden", p(&inputs["hidden"]));
                add("--weight", p(&inputs["weight"]));
                add("--targets", p(&inputs["targets"]));
                add("--reduction", params["reduction"].as_str().unwrap().into());
                add("--ignore-index", params["ignore_index"].to_string());
                add("--label-smoothing", params["label_smoothing"].to_string());
                for (key, flag) in [("bias", "--bias"), ("class_weight", "--class-weight")] {
                    if let Some(f) = inputs.get(key) {
                        add(flag, p(f));
                    }
                }
                if let Some(c) = params.get("softcap") {
                    add("--softcap", c.to_string());
                }
                if let Some(z) = params.get("z_loss_scale") {
                    add("--z-loss", z.to_string());
                }
                add("--grad-hidden-out", files[0].display().to_string());
                add("--grad-weight-out", files[1].display().to_string());
                if inputs.get("bias").is_some() {
                    add("--grad-bias-out", files[2].display().to_string());
                }
                add("--loss-out", files[3].display().to_string());
                // bf16 cases hold bf16 values exactly in f32: the f32 path gives PyTorch's answer too.
                let out = run(&args);
                match &expected["loss"] {
                    Value::String(f) if f.ends_with(".npy") => {
                        let want = read_f64(dir.join(f)).into_dimensionality().unwrap();
                        let got = read_1d(&files[3]).mapv(|x| x as f32);
                        assert_close_1d(&format!("{backend} {name} row loss"), got.view(), want.view(), 2e-6, 2e-6);
                    }
                    v => assert_scalar(&format!("{backend} {name} loss"), number(&out["loss"]), number(v), 2e-6, 2e-6),
                }
                for (key, file) in [("grad_hidden", &files[0]), ("grad_weight", &files[1])] {
                    if let Some(g) = expected.get(key) {
                        let want = read_f64(p(g)).into_dimensionality().unwrap();
                        let got = read_2d(file).mapv(|x| x as f32);
                        assert_close_2d(&format!("{backend} {name} {key}"), got.view(), want.view(), 1e-6, 2e-5);
                    }
                }
                if let Some(g) = expected.get("grad_bias") {
                    let want = read_f64(p(g)).into_dimensionality().unwrap();
                    let got = read_1d(&files[2]).mapv(|x| x as f32);
                    assert_close_1d(&format!("{backend} {name} grad_bias"), got.view(), want.view(), 1e-6, 2e-5);
                }
            }
            "cross_entropy_soft" => {
                let grad = scratch(&format!("{backend}-{name}-grad.npy"));
                let args = cli(
                    "eval",
                    backend,
                    &[
                        ("--logits", p(&inputs["logits"])),
                        ("--target-probs", p(&inputs["target_probs"])),
                        ("--reduction", params["reduction"].as_str().unwrap().to_string()),
                        ("--label-smoothing", params["label_smoothing"].to_string()),
                        ("--grad-out", grad.display().to_string()),
                    ],
                );
                let out = run(&args);
                assert_scalar(
                    &format!("{backend} {name} loss"),
                    number(&out["loss"]),
                    number(&expected["loss"]),
                    2e-6,
                    2e-6,
                );
                let want = read_f64(p(&expected["grad"])).into_dimensionality().unwrap();
                let got = read_2d(&grad).mapv(|x| x as f32);
                assert_close_2d(&format!("{backend} {name} grad"), got.view(), want.view(), 1e-7, 2e-5);
            }
            op @ ("bce_with_logits" | "bce") => {
                let grad = scratch(&format!("{backend}-{name}-grad.npy"));
                let rows = scratch(&format!("{backend}-{name}-elem.npy"));
                let input = if op == "bce" { ("--probs", &inputs["probs"]) } else { ("--logits", &inputs["logits"]) };
                let mut args: Vec<String> = vec!["bce".into(), "--json".into(), "--backend".into(), backend.into()];
                args.extend([input.0.to_string(), p(input.1), "--targets".into(), p(&inputs["targets"])]);
                args.extend(["--reduction".into(), params["reduction"].as_str().unwrap().into()]);
                for (flag, key) in [("--weight", "weight"), ("--pos-weight", "pos_weight")] {
                    if let Some(f) = inputs.get(key) {
                        args.extend([flag.into(), p(f)]);
                    }
                }
                args.extend([
                    "--grad-out".into(),
                    grad.display().to_string(),
                    "--loss-out".into(),
                    rows.display().to_string(),
                ]);
                let out = run(&args);
                match &expected["loss"] {
                    Value::String(f) if f.ends_with(".npy") => {
                        assert!(out["loss"].is_null());
                        let want = read_f64(dir.join(f)).into_dimensionality().unwrap();
                        let got = read_2d(&rows).mapv(|x| x as f32);
                        assert_close_2d(&format!("{backend} {name} element loss"), got.view(), want.view(), 2e-6, 2e-6);
                    }
                    v => assert_scalar(&format!("{backend} {name} loss"), number(&out["loss"]), number(v), 2e-6, 2e-6),
                }
                if let Some(g) = expected.get("grad") {
                    let want = read_f64(p(g)).into_dimensionality().unwrap();
                    let got = read_2d(&grad).mapv(|x| x as f32);
                    assert_close_2d(&format!("{backend} {name} grad"), got.view(), want.view(), 1e-7, 2e-5);
                }
            }
            "distill_kl" => {
                // PyTorch's `batchmean` is `--reduction mean`; `sum` and `none` are the same
                // case times N (the rows written by --loss-out add up to the sum).
                assert_eq!(params["reduction"], "batchmean");
                let want_grad: ndarray::Array2<f64> = read_f64(p(&expected["grad"])).into_dimensionality().unwrap();
                let rows_n = want_grad.nrows() as f64;
                for (reduction, k) in [("mean", 1.0), ("sum", rows_n), ("none", rows_n)] {
                    let grad = scratch(&format!("{backend}-{name}-{reduction}-grad.npy"));
                    let rows = scratch(&format!("{backend}-{name}-{reduction}-rows.npy"));
                    let args = cli(
                        "distill",
                        backend,
                        &[
                            ("--student", p(&inputs["student_logits"])),
                            ("--teacher", p(&inputs["teacher_logits"])),
                            ("--temperature", params["temperature"].to_string()),
                            ("--reduction", reduction.to_string()),
                            ("--grad-out", grad.display().to_string()),
                            ("--loss-out", rows.display().to_string()),
                        ],
                    );
                    let out = run(&args);
                    let what = format!("{backend} {name} {reduction}");
                    let want_loss = k * number(&expected["loss"]);
                    let row_sum: f64 = read_1d(&rows).iter().sum();
                    assert_scalar(&format!("{what} rows' sum"), row_sum * k / rows_n, want_loss, 2e-6, 2e-6);
                    if reduction == "none" {
                        assert!(out["loss"].is_null(), "{what}: {}", out["loss"]);
                    } else {
                        assert_scalar(&format!("{what} loss"), number(&out["loss"]), want_loss, 2e-6, 2e-6);
                    }
                    let want = want_grad.mapv(|g| g * k);
                    let got = read_2d(&grad).mapv(|x| x as f32);
                    assert_close_2d(&format!("{what} grad"), got.view(), want.view(), 1e-7 * k, 2e-5);
                }
            }
            "distribution_measures" => {
                let args = cli("dist", backend, &[("--p", p(&inputs["p"])), ("--q", p(&inputs["q"]))]);
                let out = run(&args);
                // The CPU computes in f64 from f64 inputs; the GPU in f32.
                let tol = if backend == "cpu" { 1e-12 } else { 2e-6 };
                for key in ["entropy", "cross_entropy", "kl"] {
                    let want = read_f64(p(&expected[key]));
                    let got: Vec<f64> = out[key].as_array().unwrap().iter().map(number).collect();
                    assert_eq!(got.len(), want.len(), "{name} {key}");
                    for (g, w) in got.iter().zip(want.iter()) {
                        if w.is_infinite() {
                            assert_eq!(g, w, "{backend} {name} {key}");
                        } else {
                            assert_scalar(&format!("{backend} {name} {key}"), *g, *w, tol, tol);
                        }
                    }
                }
                // JS is finite and bounded by ln 2 even under support mismatch.
                assert!(out["js"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(number)
                    .all(|j| (0.0..=std::f64::consts::LN_2 + 1e-6).contains(&j)));
            }
            "perplexity" => {
                let args = cli(
                    "perplexity",
                    backend,
                    &[
                        ("--logits", p(&inputs["logits"])),
                        ("--targets", p(&inputs["targets"])),
                        ("--mask", p(&inputs["mask"])),
                    ],
                );
                let out = run(&args);
                assert_scalar(
                    &format!("{backend} {name} nll"),
                    number(&out["corpus_nll"]),
                    number(&expected["corpus_nll"]),
                    1e-6,
                    1e-6,
                );
                assert_scalar(
                    &format!("{backend} {name} ppl"),
                    number(&out["corpus_ppl"]),
                    number(&expected["corpus_ppl"]),
                    0.0,
                    2e-6,
                );
                let want = read_f64(p(&expected["ppl_per_sequence"]));
                let got: Vec<f64> = out["ppl_per_sequence"].as_array().unwrap().iter().map(number).collect();
                assert_eq!(got.len(), want.len());
                for (g, w) in got.iter().zip(want.iter()) {
                    assert_scalar(&format!("{backend} {name} sequence ppl"), *g, *w, 0.0, 2e-6);
                }
            }
            "preference" => {
                let (gc, gr) =
                    (scratch(&format!("{backend}-{name}-gc.npy")), scratch(&format!("{backend}-{name}-gr.npy")));
                let args = cli(
                    "preference",
                    backend,
                    &[
                        ("--chosen", p(&inputs["chosen"])),
                        ("--rejected", p(&inputs["rejected"])),
                        ("--grad-chosen-out", gc.display().to_string()),
                        ("--grad-rejected-out", gr.display().to_string()),
                    ],
                );
                let out = run(&args);
                assert_scalar(
                    &format!("{backend} {name} loss"),
                    number(&out["loss"]),
                    number(&expected["loss"]),
                    2e-6,
                    2e-6,
                );
                for (file, key) in [(&gc, "grad_chosen"), (&gr, "grad_rejected")] {
                    let want = read_f64(p(&expected[key])).into_dimensionality().unwrap();
                    let got = read_1d(file).mapv(|x| x as f32);
                    assert_close_1d(&format!("{backend} {name} {key}"), got.view(), want.view(), 1e-8, 2e-5);
                }
            }
            "log_softmax" => {
                let outp = scratch(&format!("{backend}-{name}-out.npy"));
                let args = cli(
                    "log-softmax",
                    backend,
                    &[("--logits", p(&inputs["logits"])), ("--out", outp.display().to_string())],
                );
                run(&args);
                let want = read_f64(p(&expected["output"])).into_dimensionality().unwrap();
                let got = read_2d(&outp).mapv(|x| x as f32);
                assert_close_2d(&format!("{backend} {name}"), got.view(), want.view(), 1e-6, 2e-6);
            }
            _ => continue,
        }
        ran += 1;
    }
    let expected = manifest()
        .iter()
        .filter(|c| {
            matches!(
                c["op"].as_str(),
                Some(
                    "cross_entropy"
                        | "cross_entropy_soft"
                        | "log_softmax"
                        | "bce_with_logits"
                        | "bce"
                        | "distill_kl"
                        | "distribution_measures"
                        | "perplexity"
                        | "preference"
                        | "linear_cross_entropy"
                )
            )
        })
        .count();
    assert_eq!(ran, expected);
    ran
}

#[test]
fn every_golden_case_cpu() {
    assert_eq!(cases("cpu"), manifest().len(), "every golden case");
}

#[test]
fn every_golden_case_gpu() {
    if !gpu_ok() {
        return; // gpu() printed the skip (or panicked under XENT_REQUIRE_GPU)
    }
    assert_eq!(cases("gpu"), manifest().len(), "every golden case");
}
