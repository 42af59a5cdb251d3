//! Helpers shared by the integration tests.
#![allow(dead_code)]

#[cfg(feature = "gpu")]
pub use gpu::*;

use ndarray::{Array1, Array2, ArrayView1, ArrayView2};

/// True when `XENT_REQUIRE_GPU` is set to a non-empty value other than `0`: GPU tests then fail
/// instead of skipping when no adapter is found.
pub fn gpu_required() -> bool {
    std::env::var("XENT_REQUIRE_GPU").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// GPU contexts every GPU test uses (feature `gpu`).
#[cfg(feature = "gpu")]
mod gpu {
    use std::sync::OnceLock;

    use xent::{GpuContext, GpuOptions};

    /// The shared GPU context, or `None` (with a printed notice) when there is no adapter and
    /// `XENT_REQUIRE_GPU` is not set. With `XENT_REQUIRE_GPU=1` a missing adapter fails the test.
    pub fn gpu() -> Option<&'static GpuContext> {
        static CTX: OnceLock<Option<GpuContext>> = OnceLock::new();
        CTX.get_or_init(|| make(GpuOptions::default())).as_ref()
    }

    /// A context that reduces in workgroup memory (no subgroup operations).
    pub fn gpu_no_subgroups() -> Option<&'static GpuContext> {
        static CTX: OnceLock<Option<GpuContext>> = OnceLock::new();
        CTX.get_or_init(|| make(GpuOptions::default().with_subgroups(false))).as_ref()
    }

    /// A context whose storage bindings are capped at 64 KiB, so small tensors span many chunks.
    pub fn gpu_small_bindings() -> Option<&'static GpuContext> {
        static CTX: OnceLock<Option<GpuContext>> = OnceLock::new();
        CTX.get_or_init(|| make(GpuOptions::default().with_max_binding_bytes(64 << 10))).as_ref()
    }

    /// A context that splits rows into segments of 96 columns (two dispatches per row pass)
    /// with 32-invocation workgroups: the split-row path.
    pub fn gpu_segments() -> Option<&'static GpuContext> {
        static CTX: OnceLock<Option<GpuContext>> = OnceLock::new();
        CTX.get_or_init(|| make(GpuOptions::default().with_segment_len(96).with_workgroup_size(32))).as_ref()
    }

    /// Split rows in small chunks: segments of 40 columns and 16 KiB bindings.
    pub fn gpu_segments_chunked() -> Option<GpuContext> {
        make(GpuOptions::default().with_segment_len(40).with_max_binding_bytes(16 << 10))
    }

    /// A new private context (for tests that count its allocations or destroy its device).
    pub fn fresh_gpu() -> Option<GpuContext> {
        make(GpuOptions::default())
    }

    /// A new private context with `opts` (failing as [`gpu`] does when a GPU is required).
    pub fn gpu_with(opts: GpuOptions) -> Option<GpuContext> {
        make(opts)
    }

    fn make(opts: GpuOptions) -> Option<GpuContext> {
        match GpuContext::with_options(opts) {
            Ok(c) => Some(c),
            Err(e) if super::gpu_required() => {
                panic!("XENT_REQUIRE_GPU is set but no GPU is usable: {e}")
            }
            Err(e) => {
                eprintln!("SKIPPED GPU test: {e} (set XENT_REQUIRE_GPU=1 to make this a failure)");
                None
            }
        }
    }

    /// Every GPU context the tests exercise: default (subgroups if available), workgroup-memory
    /// reductions, and tiny bindings (multi-chunk).
    pub fn gpus() -> Vec<(&'static str, &'static GpuContext)> {
        let mut v = Vec::new();
        if let Some(g) = gpu() {
            v.push(("gpu", g));
        }
        if let Some(g) = gpu_no_subgroups() {
            v.push(("gpu-no-subgroups", g));
        }
        if let Some(g) = gpu_small_bindings() {
            v.push(("gpu-64KiB-bindings", g));
        }
        if let Some(g) = gpu_segments() {
            v.push(("gpu-split-rows", g));
        }
        v
    }
}

/// GPU contexts: none without the `gpu` feature (the type only lets GPU loops compile).
#[cfg(not(feature = "gpu"))]
pub fn gpus() -> Vec<(&'static str, &'static xent::Cpu)> {
    Vec::new()
}

/// Every GPU context of [`gpus`] as a boxed [`xent::Backend`].
pub fn gpu_backends() -> Vec<(&'static str, Box<dyn xent::Backend>)> {
    #[cfg(feature = "gpu")]
    {
        gpus().into_iter().map(|(n, g)| (n, Box::new(g.clone()) as Box<dyn xent::Backend>)).collect()
    }
    #[cfg(not(feature = "gpu"))]
    {
        Vec::new()
    }
}

/// SplitMix64: deterministic test data without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn logits(&mut self, n: usize, v: usize, scale: f64) -> Array2<f32> {
        Array2::from_shape_fn((n, v), |_| (self.normal() * scale) as f32)
    }
    pub fn targets(&mut self, n: usize, v: usize, ignore_every: usize) -> Array1<i64> {
        Array1::from_shape_fn(
            n,
            |i| {
                if ignore_every > 0 && i % ignore_every == 1 {
                    -100
                } else {
                    self.below(v) as i64
                }
            },
        )
    }
}

/// Asserts |got - want| <= atol + rtol * |want| element-wise (NaN matches NaN, inf matches inf).
pub fn assert_close_2d(what: &str, got: ArrayView2<f32>, want: ArrayView2<f64>, atol: f64, rtol: f64) {
    assert_eq!(got.dim(), want.dim(), "{what}: shape");
    let mut worst = (0.0, (0, 0));
    for ((i, &g), &w) in got.indexed_iter().zip(want.iter()) {
        let g = g as f64;
        if w.is_nan() || w.is_infinite() {
            assert!(g.is_nan() && w.is_nan() || g == w, "{what}{i:?}: got {g}, want {w}");
            continue;
        }
        let err = (g - w).abs() - rtol * w.abs();
        if err > worst.0 {
            worst = (err, i);
        }
        assert!(err <= atol, "{what}{i:?}: got {g}, want {w} (atol {atol}, rtol {rtol})");
    }
}

pub fn assert_close_1d(what: &str, got: ArrayView1<f32>, want: ArrayView1<f64>, atol: f64, rtol: f64) {
    let g2 = got.insert_axis(ndarray::Axis(0));
    let w2 = want.insert_axis(ndarray::Axis(0));
    assert_close_2d(what, g2, w2, atol, rtol);
}

pub fn assert_scalar(what: &str, got: f64, want: f64, atol: f64, rtol: f64) {
    if want.is_nan() {
        assert!(got.is_nan(), "{what}: got {got}, want NaN");
        return;
    }
    assert!(
        (got - want).abs() <= atol + rtol * want.abs(),
        "{what}: got {got}, want {want} (atol {atol}, rtol {rtol})"
    );
}

/// Runs `program args` under `mpirun -n ranks` (as root too, more ranks than cores allowed),
/// failing the test when `mpirun` is missing or the run does not end within two minutes: a
/// distributed failure must end every rank, never hang.
#[cfg(feature = "mpi")]
pub fn mpirun(ranks: usize, program: &std::path::Path, args: &[&str]) -> std::process::Output {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let mut child = Command::new("mpirun")
        .args(["-n", &ranks.to_string(), "--allow-run-as-root", "--oversubscribe"])
        // Containers often forbid the cross-memory attach of OpenMPI's shared-memory transport.
        .args(["--mca", "btl_vader_single_copy_mechanism", "none"])
        .arg(program)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("mpirun (OpenMPI: apt-get install openmpi-bin) cannot start: {e}"));
    // Drain the pipes on threads so a chatty run cannot block on a full pipe.
    let (mut so, mut se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut so, &mut b).unwrap();
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut se, &mut b).unwrap();
        b
    });
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("mpirun -n {ranks} {} {args:?} hung for two minutes", program.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::process::Output { status, stdout: out_t.join().unwrap(), stderr: err_t.join().unwrap() }
}

/// The f64 reference of fused linear cross-entropy: the logits `h w^T + b` formed in f64 and
/// rounded to f32 (as the kernels see them), the reference loss and logits gradient on them, and
/// `h`, `w` in f64 for the chain rule's products (`grad_hidden = G w`, `grad_weight = G^T h`).
pub fn linear_reference(
    h: &Array2<f32>,
    w: &Array2<f32>,
    b: Option<&Array1<f32>>,
    t: &[i64],
    cfg: &xent::CrossEntropy,
) -> (xent::cpu::reference::RefCe, Array2<f64>, Array2<f64>) {
    let (h64, w64) = (h.mapv(f64::from), w.mapv(f64::from));
    let mut z = h64.dot(&w64.t());
    if let Some(b) = b {
        z += &b.mapv(f64::from);
    }
    let r = xent::cpu::reference::cross_entropy(&z.mapv(|x| x as f32), t, cfg).unwrap();
    (r, h64, w64)
}
