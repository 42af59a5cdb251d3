//! The class-index cross-entropy cases of the golden set in `tests/golden` (PyTorch float64),
//! read for the framework integrations' tests (included with `#[path]`; needs `npyz` and
//! `serde_json`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use xent::{CrossEntropy, Reduction};

/// One case: inputs, options and PyTorch's results.
pub struct GoldenCe {
    pub name: String,
    pub rows: usize,
    pub classes: usize,
    /// Row-major logits `[rows, classes]`.
    pub logits: Vec<f64>,
    pub targets: Vec<i64>,
    pub cfg: CrossEntropy,
    /// `[loss]`, or the per-row losses for reduction `none`; NaN where PyTorch gives NaN.
    pub loss: Vec<f64>,
    /// d(loss)/d(logits) (of the sum of per-row losses for `none`), when the case has one.
    pub grad: Option<Vec<f64>>,
}

fn dir() -> PathBuf {
    // `CARGO_MANIFEST_DIR` of the including crate: the repository root or a member two levels in.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    [root.join("tests/golden"), root.join("../../tests/golden"), root.join("../tests/golden")]
        .into_iter()
        .find(|d| d.join("manifest.json").is_file())
        .expect("the golden cases in tests/golden")
}

fn read(file: &str) -> (Vec<usize>, Vec<f64>) {
    let bytes = std::fs::read(dir().join(file)).unwrap();
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
    let shape = npy.shape().iter().map(|&d| d as usize).collect();
    let v = match npy.dtype().descr().as_str() {
        "'<f4'" => npy.into_vec::<f32>().unwrap().into_iter().map(f64::from).collect(),
        "'<f8'" => npy.into_vec::<f64>().unwrap(),
        "'<i4'" => npy.into_vec::<i32>().unwrap().into_iter().map(f64::from).collect(),
        _ => npy.into_vec::<i64>().unwrap().into_iter().map(|x| x as f64).collect(),
    };
    (shape, v)
}

/// Every `cross_entropy` case with class-index targets.
pub fn cases() -> Vec<GoldenCe> {
    // The generator writes NaN as a bare JSON token; serde_json wants a string.
    let text = std::fs::read_to_string(dir().join("manifest.json")).unwrap().replace(": NaN", ": \"NaN\"");
    let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for case in manifest["cases"].as_array().unwrap() {
        if case["op"] != "cross_entropy" {
            continue;
        }
        let (p, inputs, expected) = (&case["params"], &case["inputs"], &case["expected"]);
        let (shape, logits) = read(inputs["logits"].as_str().unwrap());
        let targets = read(inputs["targets"].as_str().unwrap()).1.iter().map(|&t| t as i64).collect();
        let f = |k: &str| p.get(k).and_then(|x| x.as_f64());
        let cfg = CrossEntropy::default()
            .with_reduction(match p["reduction"].as_str().unwrap() {
                "sum" => Reduction::Sum,
                "none" => Reduction::None,
                _ => Reduction::Mean,
            })
            .with_ignore_index(p["ignore_index"].as_i64().unwrap())
            .with_label_smoothing(f("label_smoothing").unwrap_or(0.0) as f32)
            .with_class_weight(
                inputs.get("class_weight").map(|w| read(w.as_str().unwrap()).1.iter().map(|&v| v as f32).collect()),
            )
            .with_softcap(f("softcap").map(|c| c as f32))
            .with_z_loss(f("z_loss_scale").unwrap_or(0.0) as f32);
        let loss = match &expected["loss"] {
            serde_json::Value::String(s) if s == "NaN" => vec![f64::NAN],
            serde_json::Value::String(file) => read(file).1,
            v => vec![v.as_f64().unwrap()],
        };
        out.push(GoldenCe {
            name: case["name"].as_str().unwrap().to_string(),
            rows: shape[0],
            classes: shape[1],
            logits,
            targets,
            cfg,
            loss,
            grad: expected.get("grad").map(|g| read(g.as_str().unwrap()).1),
        });
    }
    out
}

/// `got` equals PyTorch's `want` to f32 accuracy (NaN equals NaN).
pub fn close(got: f64, want: f64, rel: f64, abs: f64) -> bool {
    (got.is_nan() && want.is_nan()) || (got - want).abs() <= abs + rel * want.abs()
}
