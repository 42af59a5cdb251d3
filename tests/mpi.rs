//! The vocabulary-parallel example under `mpirun -n 2` and `-n 3` (feature `mpi`; the test
//! command installs OpenMPI), on the CPU and on each rank's GPU: loss and gradient equal one
//! process's for ignored rows, class weights, smoothing and z-loss, and a failing rank ends
//! every rank with one message.
#![cfg(feature = "mpi")]

mod common;

use std::path::PathBuf;

/// The example, built by `cargo test` beside this test's binary (`target/<profile>/examples`).
fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join("examples").join("vocab_parallel");
    assert!(p.exists(), "{} is missing: build with `cargo test --features mpi`", p.display());
    p
}

fn json(out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "failed: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line from rank 0: {stdout}");
    serde_json::from_str(lines[0]).unwrap()
}

#[test]
fn vocabulary_parallel_equals_one_process_on_two_and_three_ranks() {
    let options: [&[&str]; 4] = [
        &["--rows", "300", "--classes", "4099"],
        &[
            "--rows",
            "257",
            "--classes",
            "5003",
            "--ignore-every",
            "4",
            "--class-weights",
            "--smoothing",
            "0.1",
            "--z-loss",
            "1e-3",
        ],
        &["--rows", "64", "--classes", "32000", "--smoothing", "0.05", "--ignore-every", "3"],
        // A linear layer's weight split by vocabulary (grad_hidden summed over ranks).
        &[
            "--linear",
            "64",
            "--rows",
            "200",
            "--classes",
            "3001",
            "--class-weights",
            "--smoothing",
            "0.1",
            "--z-loss",
            "1e-3",
            "--ignore-every",
            "4",
        ],
    ];
    for ranks in [2, 3] {
        for args in options {
            let j = json(&common::mpirun(ranks, &example(), args));
            assert_eq!(j["ranks"], ranks as u64);
            let (l, s) = (j["loss"].as_f64().unwrap(), j["loss_single"].as_f64().unwrap());
            assert!((l - s).abs() <= 1e-6 * s.abs().max(1.0), "{ranks} ranks {args:?}: {l} vs {s}");
            assert!(j["max_grad_diff"].as_f64().unwrap() <= 1e-7, "{ranks} ranks {args:?}: {j}");
            assert_eq!(j["ok"], true);
        }
    }
}

#[test]
#[cfg(feature = "gpu")]
fn vocabulary_parallel_on_each_ranks_gpu() {
    if common::gpu().is_none() {
        return; // no adapter and XENT_REQUIRE_GPU unset (set, `gpu()` fails the test)
    }
    for ranks in [2, 3] {
        let args = [
            "--gpu",
            "--rows",
            "96",
            "--classes",
            "5003",
            "--ignore-every",
            "4",
            "--class-weights",
            "--smoothing",
            "0.1",
            "--z-loss",
            "1e-3",
        ];
        let j = json(&common::mpirun(ranks, &example(), &args));
        assert_eq!(j["backend"], "gpu");
        assert_eq!(j["ok"], true, "{ranks} ranks: {j}");
        assert!(j["max_grad_diff"].as_f64().unwrap() <= 1e-5, "{j}");
        // The weight of a linear layer split by vocabulary, on each rank's GPU.
        let args = [
            "--gpu",
            "--linear",
            "32",
            "--rows",
            "150",
            "--classes",
            "2003",
            "--smoothing",
            "0.1",
            "--ignore-every",
            "5",
        ];
        let j = json(&common::mpirun(ranks, &example(), &args));
        assert_eq!(j["backend"], "gpu-linear");
        assert_eq!(j["ok"], true, "{ranks} ranks: {j}");
    }
}

#[test]
fn a_failing_rank_ends_every_rank_with_one_message() {
    let out = common::mpirun(3, &example(), &["--rows", "16", "--classes", "300", "--fail-rank", "2"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(ours.len(), 1, "one message: {err}");
    assert!(ours[0].contains("rank 2") && ours[0].contains("shape"), "{err}");
    assert!(out.stdout.is_empty(), "no result line on failure");
}
