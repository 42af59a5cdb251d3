//! Data-parallel `xent eval` and `xent perplexity` under `mpirun -n 2` and `-n 3` (feature
//! `mpi`; the test command installs OpenMPI): perplexity equal bit for bit to one process,
//! the loss to f32 rounding, and a failure on any rank ends every rank with one message.
#![cfg(feature = "mpi")]

mod support;

use std::path::Path;

use serde_json::Value;
use support::*;

const B: usize = 11;
const T: usize = 13;
const V: usize = 777;

/// Seeded logits [B*T, V], targets, lengths and class weights in `dir`.
fn corpus(dir: &Path, bad_last_target: bool) -> [String; 4] {
    let mut s = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    let x: Vec<f32> = (0..B * T * V).map(|_| 6.0 * next() - 3.0).collect();
    let mut t: Vec<i64> = (0..B * T).map(|i| ((i * 37) % V) as i64).collect();
    if bad_last_target {
        t[B * T - 1] = V as i64; // counted (the last sequence is full): only the last rank sees it
    }
    let mut lengths: Vec<i64> = (0..B).map(|b| ((b * 5) % (T + 1)) as i64).collect();
    lengths[B - 1] = T as i64;
    let cw: Vec<f32> = (0..V).map(|c| 0.5 + (c % 5) as f32 * 0.25).collect();
    let p = |n: &str| dir.join(n).to_string_lossy().into_owned();
    write_npy(p("x.npy"), &[B, T, V], &x);
    write_npy(p("t.npy"), &[B * T], &t);
    write_npy(p("len.npy"), &[B], &lengths);
    write_npy(p("cw.npy"), &[V], &cw);
    [p("x.npy"), p("t.npy"), p("len.npy"), p("cw.npy")]
}

fn xent_path() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_xent"))
}

/// The one JSON line of a successful run (rank 0's; no other rank prints).
fn one_json(out: &std::process::Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stdout}");
    serde_json::from_str(lines[0]).unwrap()
}

/// The one `error:` line of a failed run.
fn one_error(out: &std::process::Output) -> String {
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "no result on failure: {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(ours.len(), 1, "one message: {err}");
    ours[0].to_string()
}

#[test]
fn perplexity_over_ranks_is_bit_for_bit_one_process() {
    let dir = scratch_dir("mpi-ppl");
    let [x, t, len, _] = corpus(&dir, false);
    let mut backends = vec!["cpu"];
    if gpu_ok() {
        backends.push("gpu");
    }
    for b in backends {
        // Blocks of two sequences: each rank streams several.
        let args = [
            "perplexity",
            "--logits",
            &x,
            "--targets",
            &t,
            "--lengths",
            &len,
            "--backend",
            b,
            "--block-rows",
            "26",
            "--json",
        ];
        let single = one_json(&xent(&args));
        for ranks in [2, 3] {
            let j = one_json(&mpirun(ranks, xent_path(), &args));
            assert_eq!(j["ranks"], ranks as u64);
            for (k, v) in single.as_object().unwrap() {
                // Same JSON text: the same f64 bits.
                assert_eq!(&j[k], v, "{b}, {ranks} ranks: {k}");
            }
        }
    }
}

#[test]
fn eval_over_ranks_equals_one_process() {
    let dir = scratch_dir("mpi-eval");
    let [x3, t, _, cw] = corpus(&dir, false);
    // eval takes [N, V]: the same data as 2-D.
    let x = dir.join("x2.npy").to_string_lossy().into_owned();
    let data: Vec<f32> = read_f64(&x3).iter().map(|&v| v as f32).collect();
    write_npy(&x, &[B * T, V], &data);
    let mut tv: Vec<i64> = read_1d(&t).iter().map(|&v| v as i64).collect();
    for i in (0..tv.len()).step_by(4) {
        tv[i] = -100;
    }
    write_npy(&t, &[B * T], &tv);
    for extra in [
        &[][..],
        &["--class-weight", &cw, "--label-smoothing", "0.1", "--z-loss", "1e-3"][..],
        &["--reduction", "sum"][..],
    ] {
        let mut args =
            vec!["eval", "--logits", &x, "--targets", &t, "--backend", "cpu", "--block-rows", "20", "--json"];
        args.extend_from_slice(extra);
        let single = one_json(&xent(&args));
        for ranks in [2, 3] {
            let j = one_json(&mpirun(ranks, xent_path(), &args));
            let (l, s) = (number(&j["loss"]), number(&single["loss"]));
            assert!((l - s).abs() <= 2e-7 * s.abs().max(1.0), "{ranks} ranks {extra:?}: {l} vs {s}");
            assert_eq!(j["counted"], single["counted"]);
            assert_eq!(j["accuracy"], single["accuracy"]);
            assert!((number(&j["weight_sum"]) - number(&single["weight_sum"])).abs() < 1e-9);
        }
    }
    // Outputs are one process's job.
    let g = dir.join("g.npy").to_string_lossy().into_owned();
    let err = one_error(&mpirun(2, xent_path(), &["eval", "--logits", &x, "--targets", &t, "--grad-out", &g]));
    assert!(err.contains("one process"), "{err}");
    assert!(!Path::new(&g).exists());
}

#[test]
fn a_failure_on_one_rank_or_all_ends_every_rank_with_one_message() {
    let dir = scratch_dir("mpi-fail");
    let [x, t, len, _] = corpus(&dir, true);
    let args = ["perplexity", "--logits", &x, "--targets", &t, "--lengths", &len, "--backend", "cpu", "--json"];
    // Only the last rank reads the bad target's sequence.
    let err = one_error(&mpirun(3, xent_path(), &args));
    assert!(err.contains("rank 2") && err.contains("target"), "{err}");
    // One process fails on it too.
    assert!(xent_error(&args).contains("target"));
    // A truncated file: every rank fails.
    let bytes = std::fs::read(&x).unwrap();
    let short = dir.join("short.npy");
    std::fs::write(&short, &bytes[..bytes.len() / 2]).unwrap();
    let short = short.to_string_lossy().into_owned();
    let err =
        one_error(&mpirun(2, xent_path(), &["perplexity", "--logits", &short, "--targets", &t, "--lengths", &len]));
    assert!(err.starts_with("error:"), "{err}");
    // A command that runs in one process says so, once.
    let err = one_error(&mpirun(2, xent_path(), &["demo"]));
    assert!(err.contains("one process"), "{err}");
}
