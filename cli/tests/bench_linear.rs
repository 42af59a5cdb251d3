//! `xent bench --op linear-fwd-bwd`: every CPU row says which matrix-product kernels ran
//! (`cpu_matmul`), one row per `--cpu-matmul` choice; kernels the CPU lacks or an unknown name
//! are one error line.

mod support;

use support::*;
use xent::cpu::CpuMatmul;
use xent::DType;

#[test]
fn cpu_rows_name_their_matrix_kernels() {
    let args = ["bench", "--backend", "cpu", "--op", "linear-fwd-bwd", "--shapes", "9x16x40", "--reps", "1", "--json"];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xent"))
        .args(args)
        .args(["--dtype", "f32,bf16", "--cpu-matmul", "auto,f32"])
        .env_remove("XENT_CPU_MATMUL")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let got: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r["dtype"].as_str().unwrap().to_string(), r["cpu_matmul"].as_str().unwrap().to_string()))
        .collect();
    let best_bf16 = CpuMatmul::detect().for_dtype(DType::BF16).name();
    let want = [("f32", "f32"), ("f32", "f32"), ("bf16", best_bf16), ("bf16", "f32")];
    assert_eq!(got, want.map(|(a, b)| (a.to_string(), b.to_string())));
    for r in &rows {
        assert!(number(&r["median_s"]) > 0.0);
    }
    let e = xent_error(&[&args[..], &["--cpu-matmul", "amx-bf16"]].concat());
    assert!(e.contains("amx-bf16"), "{e}");
    let e = xent_error(&[&args[..], &["--cpu-matmul", "bf17"]].concat());
    assert!(e.contains("bf17"), "{e}");
    if !CpuMatmul::Avx512Bf16.available() {
        let e = xent_error(&[&args[..], &["--cpu-matmul", "avx512-bf16"]].concat());
        assert!(e.contains("AVX512-BF16"), "{e}");
        println!("this CPU lacks AVX512-BF16: checked that forcing it is refused");
    }
}

/// GPU rows name the product kernel that ran (`matmul`), one row per `--matmul` choice; asking
/// for cooperative matrices where the adapter has none is one error line, never a silent
/// fallback to the SIMT kernel.
#[test]
fn gpu_rows_name_their_matrix_kernel() {
    if !gpu_ok() {
        println!("skipped: no GPU adapter (XENT_REQUIRE_GPU makes that a failure)");
        return;
    }
    let args = ["bench", "--backend", "gpu", "--op", "linear-fwd-bwd", "--shapes", "9x16x40", "--reps", "1", "--json"];
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_xent")).args(args).args(["--matmul", "simt"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["matmul"], "simt");
    let coop = std::process::Command::new(env!("CARGO_BIN_EXE_xent"))
        .args(args)
        .args(["--matmul", "simt,coop16"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&coop.stdout);
    if coop.status.success() {
        let kinds: Vec<String> = stdout
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["matmul"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(kinds[0], "simt");
        assert!(kinds[1].starts_with("coop"), "{kinds:?}");
    } else {
        let e = xent_error(&[&args[..], &["--matmul", "coop16"]].concat());
        assert!(e.contains("cooperative"), "{e}");
        println!("this adapter has no cooperative matrices: checked that asking for them is refused ({e})");
    }
}

/// `--bf16-grad split,rounded`: one row per form on bf16 kernels, each named (`bf16_grad`);
/// rows on f32 kernels carry none; an unknown form is one error line.
#[test]
fn bf16_rows_name_their_gradient_form() {
    let args = ["bench", "--backend", "cpu", "--op", "linear-fwd-bwd", "--shapes", "9x16x40", "--reps", "1", "--json"];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xent"))
        .args(args)
        .args(["--dtype", "bf16", "--cpu-matmul", "auto", "--bf16-grad", "split,rounded"])
        .env_remove("XENT_CPU_MATMUL")
        .env_remove("XENT_CPU_BF16_TERMS")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    if CpuMatmul::Avx512Bf16.available() {
        assert_eq!(rows[0]["bf16_grad"], "split");
        assert_eq!(rows[1]["bf16_grad"], "rounded");
    } else {
        assert!(rows.iter().all(|r| r.get("bf16_grad").is_none()), "{rows:?}");
        println!("this CPU lacks AVX512-BF16: checked that f32 rows name no gradient form");
    }
    let e = xent_error(&[&args[..], &["--bf16-grad", "halved"]].concat());
    assert!(e.contains("halved") && e.contains("rounded"), "{e}");
}
