//! Helpers of the command-line tests: the library tests' assertions and GPU contexts, small
//! `.npy` reading (through `npyz`) and running the binary.
#![allow(dead_code)]

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use common::*;
use ndarray::{Array1, Array2, ArrayD, IxDyn};
use serde_json::Value;

/// Any real or integer `.npy` array as f64.
pub fn read_f64(p: impl AsRef<Path>) -> ArrayD<f64> {
    let bytes = std::fs::read(p.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", p.as_ref().display()));
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let fortran = npy.order() == npyz::Order::Fortran;
    let descr = npy.dtype().descr();
    let v: Vec<f64> = match descr.as_str() {
        "'<f8'" => npy.into_vec::<f64>().unwrap(),
        "'<f4'" => npy.into_vec::<f32>().unwrap().into_iter().map(f64::from).collect(),
        "'<f2'" => npy.into_vec::<half::f16>().unwrap().into_iter().map(f64::from).collect(),
        "'<i8'" => npy.into_vec::<i64>().unwrap().into_iter().map(|x| x as f64).collect(),
        "'<i4'" => npy.into_vec::<i32>().unwrap().into_iter().map(f64::from).collect(),
        "'|u1'" | "'|b1'" => npy.into_vec::<u8>().unwrap().into_iter().map(f64::from).collect(),
        other => panic!("{}: dtype {other}", p.as_ref().display()),
    };
    if fortran {
        let rev: Vec<usize> = shape.iter().rev().copied().collect();
        return ArrayD::from_shape_vec(IxDyn(&rev), v).unwrap().reversed_axes().as_standard_layout().to_owned();
    }
    ArrayD::from_shape_vec(IxDyn(&shape), v).unwrap()
}

pub fn read_2d(p: impl AsRef<Path>) -> Array2<f64> {
    read_f64(p).into_dimensionality().unwrap()
}

pub fn read_1d(p: impl AsRef<Path>) -> Array1<f64> {
    read_f64(p).into_dimensionality().unwrap()
}

/// Writes an `.npy` file of `shape` (through `npyz`).
pub fn write_npy<T: npyz::AutoSerialize + Clone>(p: impl AsRef<Path>, shape: &[usize], data: &[T]) {
    let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    use npyz::WriterBuilder;
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&shape)
        .writer(std::io::BufWriter::new(std::fs::File::create(p.as_ref()).unwrap()))
        .begin_nd()
        .unwrap();
    w.extend(data.iter().cloned()).unwrap();
    w.finish().unwrap();
}

/// A fresh scratch directory for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("xent-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs the `xent` binary.
pub fn xent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xent")).args(args).output().unwrap()
}

/// Runs `xent` and parses its last stdout line as JSON (it must succeed).
pub fn xent_json(args: &[&str]) -> Value {
    let out = xent(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "xent {args:?} failed: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().expect("a JSON line")).unwrap()
}

/// Runs `xent`, which must fail with one line on stderr; returns that line.
pub fn xent_error(args: &[&str]) -> String {
    let out = xent(args);
    assert!(!out.status.success(), "xent {args:?} should have failed");
    assert!(out.status.code().is_some(), "xent {args:?} was killed by a signal: {:?}", out.status);
    assert_ne!(out.status.code(), Some(101), "xent {args:?} panicked: {}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = err.lines().filter(|l| !l.contains("XDG_RUNTIME_DIR")).collect();
    assert_eq!(lines.len(), 1, "xent {args:?}: expected one error line, got {err:?}");
    lines[0].to_string()
}

/// A JSON number (NaN and infinities are strings).
pub fn number(v: &Value) -> f64 {
    match v {
        Value::Number(n) => n.as_f64().unwrap(),
        Value::String(s) if s == "NaN" => f64::NAN,
        Value::String(s) if s == "Infinity" => f64::INFINITY,
        Value::String(s) if s == "-Infinity" => f64::NEG_INFINITY,
        other => panic!("not a number: {other}"),
    }
}

/// Whether GPU tests run (an adapter, or XENT_REQUIRE_GPU makes its absence a failure).
pub fn gpu_ok() -> bool {
    #[cfg(feature = "gpu")]
    {
        gpu().is_some()
    }
    #[cfg(not(feature = "gpu"))]
    {
        false
    }
}

/// Writes a safetensors file of named tensors `(name, dtype, shape, raw little-endian bytes)`.
pub fn write_safetensors(p: impl AsRef<Path>, tensors: &[(&str, &str, &[usize], &[u8])]) {
    let mut offset = 0;
    let mut entries = Vec::new();
    for (name, dtype, shape, data) in tensors {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        entries.push(format!(
            "\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{offset},{}]}}",
            dims.join(","),
            offset + data.len()
        ));
        offset += data.len();
    }
    let mut h = format!("{{{}}}", entries.join(",")).into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    for (_, _, _, data) in tensors {
        out.extend_from_slice(data);
    }
    std::fs::write(p, out).unwrap();
}

/// Reads any tensor file the CLI can write or read (through the CLI's own reader) as f64.
pub fn read_any(spec: impl AsRef<Path>) -> (Vec<usize>, Vec<f64>) {
    let t = xent_cli::io::TensorFile::open(spec.as_ref(), "test").unwrap();
    (t.shape.clone(), t.read_f64("test").unwrap())
}
