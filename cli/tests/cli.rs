//! The `xent` command-line contract: JSON output, output files, and one-line errors.

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;
use support::*;

fn xent(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xent"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("xent-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn file(name: &str) -> String {
    dir().join(name).display().to_string()
}

fn write_i64(path: &str, v: &[i64]) {
    write_npy(path, &[v.len()], v)
}

fn json_line(o: &Output) -> Value {
    assert!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8(o.stdout.clone()).unwrap();
    serde_json::from_str(s.lines().last().unwrap()).unwrap()
}

/// The shared logits and targets, written once per process: the tests run in parallel, and a
/// test rewriting the files (truncated, then filled) while another reads them read 0 bytes.
fn fixture() -> (String, String) {
    static FILES: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    FILES
        .get_or_init(|| {
            let (x, l) = (file("x.npy"), file("t.npy"));
            let logits = ndarray::array![[1.0f32, 2.0, 3.0], [0.5, 0.5, 0.5], [3.0, -1.0, 0.0], [0.0, 1.0, 0.0]];
            write_npy(&x, &[4, 3], logits.as_slice().unwrap());
            write_i64(&l, &[2, -100, 0, 1]);
            (x, l)
        })
        .clone()
}

fn backends() -> Vec<&'static str> {
    if gpu_ok() {
        vec!["cpu", "gpu"]
    } else {
        vec!["cpu"]
    }
}

#[test]
fn eval_json_and_files() {
    let (x, t) = fixture();
    for b in backends() {
        let g = file(&format!("g-{b}.npy"));
        let r = file(&format!("r-{b}.npy"));
        let o = xent(
            &["eval", "--logits", &x, "--targets", &t, "--backend", b, "--json", "--grad-out", &g, "--loss-out", &r],
            &[],
        );
        let j = json_line(&o);
        assert_eq!(j["backend"], b);
        assert_eq!(j["rows"], 4);
        assert_eq!(j["counted"], 3);
        assert_eq!(j["weight_sum"], 3.0);
        let want = ((1f64 + 1f64.exp() + 2f64.exp()).ln() - 2.0 + 3.0 + (1.0 + (-4f64).exp() + (-3f64).exp()).ln()
            - 3.0
            + (2.0 + 1f64.exp()).ln()
            - 1.0)
            / 3.0;
        let want = want + 2.0 / 3.0 * 0.0; // row terms above already include the max shifts
        let got = j["loss"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-6, "{b}: loss {got} want {want}");
        assert!((j["perplexity"].as_f64().unwrap() - want.exp()).abs() < 1e-4);
        let grad = read_2d(&g);
        assert_eq!(grad.dim(), (4, 3));
        assert!(grad.row(1).iter().all(|&v| v == 0.0));
        assert!((grad.sum()).abs() < 1e-6, "rows of a CE gradient sum to 0");
        let rows = read_1d(&r);
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[1], 0.0);
        assert!((rows.sum() / 3.0 - want).abs() < 1e-6);

        let o = xent(&["eval", "--logits", &x, "--targets", &t, "--backend", b, "--json", "--reduction", "none"], &[]);
        assert!(json_line(&o)["loss"].is_null());
        let o = xent(
            &[
                "eval",
                "--logits",
                &x,
                "--targets",
                &t,
                "--backend",
                b,
                "--json",
                "--reduction",
                "sum",
                "--ignore-index",
                "1",
            ],
            &[],
        );
        // With ignore_index 1 the -100 target is out of range.
        assert!(!o.status.success());
    }
}

#[test]
fn non_finite_values_are_strings() {
    let x = file("nan-x.npy");
    let t = file("nan-t.npy");
    write_npy(&x, &[2, 2], &[1.0f32, 2.0, 3.0, 4.0]);
    write_i64(&t, &[-100, -100]);
    for b in backends() {
        let j = json_line(&xent(&["eval", "--logits", &x, "--targets", &t, "--backend", b, "--json"], &[]));
        assert_eq!(j["loss"], "NaN", "{b}");
        assert_eq!(j["counted"], 0);
    }
}

#[test]
fn log_softmax_command() {
    let (x, _) = fixture();
    for b in backends() {
        for soft in [false, true] {
            let out = file(&format!("ls-{b}-{soft}.npy"));
            let mut args = vec!["log-softmax", "--logits", &x, "--out", &out, "--backend", b, "--json"];
            if soft {
                args.push("--softmax");
            }
            let j = json_line(&xent(&args, &[]));
            assert_eq!(j["rows"], 4);
            let y = read_2d(&out);
            let row0: f64 = y.row(0).iter().map(|&v| if soft { v } else { v.exp() }).sum();
            assert!((row0 - 1.0).abs() < 1e-6, "{b} softmax={soft}: row sums to {row0}");
        }
    }
}

fn assert_one_line_error(o: &Output, needle: &str) {
    assert!(!o.status.success(), "expected failure");
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty() && !l.contains("XDG_RUNTIME_DIR")).collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {err}");
    assert!(lines[0].contains(needle), "{:?} does not mention {needle:?}", lines[0]);
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
}

#[test]
fn errors_are_one_line() {
    let (x, t) = fixture();
    let missing = file("missing.npy");
    let bad_t = file("bad-t.npy");
    write_i64(&bad_t, &[0, 1, 9, 1]);
    let short_t = file("short-t.npy");
    write_i64(&short_t, &[0, 1]);
    let int_x = file("int-x.npy");
    write_npy(&int_x, &[4, 3], &[0i64; 12]);
    for b in backends() {
        let o = xent(&["eval", "--logits", &missing, "--targets", &t, "--backend", b], &[]);
        assert_one_line_error(&o, "missing.npy");
        // int64 logits: wrong dtype.
        let o = xent(&["eval", "--logits", &int_x, "--targets", &t, "--backend", b], &[]);
        assert_one_line_error(&o, "float32");
        let o = xent(&["eval", "--logits", &x, "--targets", &x, "--backend", b], &[]);
        assert_one_line_error(&o, "int64 or int32");
        let o = xent(&["eval", "--logits", &x, "--targets", &short_t, "--backend", b], &[]);
        assert_one_line_error(&o, "shape mismatch");
        let o = xent(&["eval", "--logits", &x, "--targets", &bad_t, "--backend", b], &[]);
        assert_one_line_error(&o, "target 9 at row 2");
        let o = xent(&["eval", "--logits", &x, "--targets", &t, "--backend", b, "--label-smoothing", "2"], &[]);
        assert_one_line_error(&o, "label_smoothing");
        let o = xent(&["eval", "--logits", &x, "--targets", &t, "--backend", b, "--temperature", "0"], &[]);
        assert_one_line_error(&o, "temperature");
        let o = xent(
            &["eval", "--logits", &x, "--targets", &t, "--backend", b, "--grad-out", "/nonexistent/dir/g.npy"],
            &[],
        );
        assert_one_line_error(&o, "/nonexistent/dir/g.npy");
    }
    let o = xent(&["eval", "--logits", &x, "--targets", &t, "--reduction", "avg"], &[]);
    assert_one_line_error(&o, "avg");
    let o = xent(&["eval", "--logits", &x, "--targets", &t, "--backend", "tpu"], &[]);
    assert_one_line_error(&o, "tpu");
    let o = xent(&["eval", "--logits", &x], &[]);
    assert_one_line_error(&o, "--targets");
    let o = xent(&["frobnicate"], &[]);
    assert_one_line_error(&o, "frobnicate");
}

#[test]
fn gpu_backend_without_adapter_is_an_error_with_advice() {
    let (x, t) = fixture();
    // No Metal adapter exists on Linux: the instance finds nothing.
    let o = xent(&["eval", "--logits", &x, "--targets", &t, "--backend", "gpu"], &[("WGPU_BACKEND", "metal")]);
    assert_one_line_error(&o, "apt-get install mesa-vulkan-drivers");
    // With --backend left out (auto), eval runs on the CPU and says so.
    let o = xent(&["eval", "--logits", &x, "--targets", &t, "--json"], &[("WGPU_BACKEND", "metal")]);
    assert_eq!(json_line(&o)["backend"], "cpu");
    // The default job falls back to its CPU part and says how to get a GPU.
    let o = xent(&["demo", "--rows", "64", "--classes", "1000"], &[("WGPU_BACKEND", "metal")]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("mesa-vulkan-drivers"), "{err}");
    assert!(out.contains("CPU") && out.contains("GPU: not run"), "{out}");
}

#[test]
fn backend_left_out_takes_the_gpu_when_there_is_one() {
    let (x, t) = fixture();
    let j = json_line(&xent(&["eval", "--logits", &x, "--targets", &t, "--json"], &[]));
    assert_eq!(j["backend"], if gpu_ok() { "gpu" } else { "cpu" });
}

#[test]
fn default_job_compares_gpu_and_cpu() {
    // `xent` with no arguments runs 4096 x 32000; the same job on a smaller shape here.
    let o = xent(&["demo", "--rows", "300", "--classes", "5003"], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("perplexity") && out.contains("CPU time"), "{out}");
    if gpu_ok() {
        assert!(out.contains("largest GPU-vs-CPU difference"), "{out}");
        let line = out.lines().find(|l| l.contains("largest GPU-vs-CPU")).unwrap();
        let grad_diff: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(grad_diff < 1e-7, "{line}");
    }
}

#[test]
fn metrics_commands() {
    // Two sequences of 3 tokens over 4 classes with uniform logits: perplexity 4 exactly.
    let x = file("ppl-x.npy");
    write_npy(&x, &[6, 4], &[0.0f32; 24]);
    let t = file("ppl-t.npy");
    write_i64(&t, &[0, 1, 2, 3, 0, 1]);
    let lengths = file("ppl-len.npy");
    write_i64(&lengths, &[3, 1]);
    for b in backends() {
        let j = json_line(&xent(
            &["perplexity", "--logits", &x, "--targets", &t, "--lengths", &lengths, "--backend", b, "--json"],
            &[],
        ));
        assert_eq!(j["tokens"], 4);
        assert!((j["corpus_ppl"].as_f64().unwrap() - 4.0).abs() < 1e-5, "{b}: {j}");
        assert_eq!(j["ppl_per_sequence"].as_array().unwrap().len(), 2);
        assert!((j["bits_per_token"].as_f64().unwrap() - 2.0).abs() < 1e-5);

        // Calibration of overconfident logits: the fitted temperature is above 1.
        let cx = file("cal-x.npy");
        let rows: Vec<f32> = (0..40).flat_map(|i| if i % 4 == 0 { [0.0, 6.0] } else { [6.0, 0.0] }).collect();
        write_npy(&cx, &[40, 2], &rows);
        let ct = file("cal-t.npy");
        write_i64(&ct, &(0..40).map(|i| if i % 3 == 0 { 1 } else { 0 }).collect::<Vec<_>>());
        let j = json_line(&xent(
            &["calibrate", "--logits", &cx, "--targets", &ct, "--bins", "10", "--backend", b, "--json"],
            &[],
        ));
        for key in ["temperature", "nll_before", "nll_after", "ece_before", "ece_after", "accuracy"] {
            assert!(j[key].is_number(), "{b}: {key} in {j}");
        }
        assert!(j["temperature"].as_f64().unwrap() > 1.0 && j["nll_after"].as_f64() < j["nll_before"].as_f64());

        let (c, r) = (file("pc.npy"), file("pr.npy"));
        write_npy(&c, &[3], &[1.0f32, 2.0, 0.0]);
        write_npy(&r, &[3], &[0.0f32, 2.0, 1.0]);
        let g = file(&format!("pg-{b}.npy"));
        let j = json_line(&xent(
            &[
                "preference",
                "--chosen",
                &c,
                "--rejected",
                &r,
                "--margin",
                "0.5",
                "--grad-chosen-out",
                &g,
                "--backend",
                b,
                "--json",
            ],
            &[],
        ));
        let want = [0.5f64, -0.5, -1.5].iter().map(|d| (1.0 + (-d).exp()).ln()).sum::<f64>() / 3.0;
        assert!((j["loss"].as_f64().unwrap() - want).abs() < 1e-6, "{b}: {j}");
        assert_eq!(read_1d(&g).len(), 3);
        let o = xent(&["preference", "--chosen", &c, "--rejected", &t, "--backend", b], &[]);
        assert_one_line_error(&o, "float32");
    }
}

#[test]
fn bench_command() {
    let backends = backends().join(",");
    let (png, svg) = (file("bench.png"), file("bench.svg"));
    for plot in [&png, &svg] {
        let o = xent(
            &["bench", "--backend", &backends, "--shapes", "8x100,4x1000", "--reps", "2", "--json", "--plot", plot],
            &[],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let out = String::from_utf8(o.stdout).unwrap();
        let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2 * backends.split(',').count(), "one line per (backend, shape, op)");
        for j in &lines {
            for key in ["backend", "n", "v", "op", "median_s", "min_s", "gbps", "peak_rss_bytes"] {
                assert!(!j[key].is_null(), "{key} missing in {j}");
            }
            assert_eq!(j["op"], "fwd-bwd");
            assert!(j["min_s"].as_f64().unwrap() <= j["median_s"].as_f64().unwrap());
        }
    }
    assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.starts_with("<svg") && s.contains("<polyline"), "{s}");
    let table = xent(&["bench", "--backend", "cpu", "--shapes", "8x100", "--reps", "1", "--op", "fwd"], &[]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("median s"));
    assert_one_line_error(&xent(&["bench", "--backend", "cpu", "--shapes", "8y100"], &[]), "8y100");
    assert_one_line_error(&xent(&["bench", "--backend", "cpu", "--plot", &file("x.jpg")], &[]), "SVG or PNG");
    assert_one_line_error(&xent(&["bench", "--backend", "cpu", "--reps", "0"], &[]), "--reps");
    assert_one_line_error(&xent(&["bench", "--backend", "cpu", "--load-width", "4"], &[]), "--load-width");
    if gpu_ok() {
        // Both load widths in one run: 16-bit rows once per width, f32 rows once.
        let args = ["bench", "--backend", "gpu", "--shapes", "4x1000", "--dtype", "f32,bf16", "--reps", "1", "--json"];
        let o = xent(&[&args[..], &["--op", "fwd", "--load-width", "16,8"]].concat(), &[]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let lines: Vec<Value> =
            String::from_utf8(o.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let seen: Vec<(String, Option<u64>)> =
            lines.iter().map(|j| (j["dtype"].as_str().unwrap().to_string(), j["load_width"].as_u64())).collect();
        let want = [("f32", None), ("bf16", Some(16)), ("bf16", Some(8))].map(|(d, w)| (d.to_string(), w));
        assert_eq!(seen, want, "rows of --load-width 16,8");
    }
}
