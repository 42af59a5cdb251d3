//! Fused linear cross-entropy against an f64 reference that materialises the logits, and
//! PyTorch's float64 golden cases; bit-identical results across runs and thread counts; the
//! workspace bound, shown by the allocator's peak.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use ndarray::{Array1, Array2, ArrayView1};
use xent::*;

/// Counts live and peak heap bytes (for the workspace-bound test).
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
}

/// The allocation counters are the process's: the test that measures them runs alone (write),
/// the others beside each other (read).
static MEASURING: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Held by every test that allocates while [`workspace_stays_within_its_budget`] could measure.
fn not_measuring() -> std::sync::RwLockReadGuard<'static, ()> {
    MEASURING.read().unwrap_or_else(|p| p.into_inner())
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The f64 reference: logits materialised, the cross-entropy's reference gradient, and the
/// products of the chain rule in f64.
struct Ref {
    loss: Vec<f64>,
    gh: Array2<f64>,
    gw: Array2<f64>,
    gb: Array1<f64>,
}

fn reference(h: &Array2<f32>, w: &Array2<f32>, b: Option<&Array1<f32>>, t: &[i64], cfg: &CrossEntropy) -> Ref {
    let (r, h64, w64) = linear_reference(h, w, b, t, cfg);
    let loss = if cfg.reduction == Reduction::None { r.row_loss.to_vec() } else { vec![r.loss] };
    Ref { loss, gh: r.grad.dot(&w64), gw: r.grad.t().dot(&h64), gb: r.grad.sum_axis(ndarray::Axis(0)) }
}

fn f32s(t: &Tensor2) -> Array2<f32> {
    t.to_f32()
}

fn worst(got: &Array2<f32>, want: &Array2<f64>) -> f64 {
    got.iter().zip(want.iter()).fold(0.0, |m, (&a, &b)| m.max((a as f64 - b).abs() / (1e-3 + b.abs())))
}

fn inputs(n: usize, d: usize, v: usize, seed: u64) -> (Array2<f32>, Array2<f32>, Array1<f32>, Array1<i64>) {
    let mut rng = Rng(seed);
    let h = rng.logits(n, d, 1.0);
    let w = rng.logits(v, d, 0.3);
    let b = Array1::from_shape_fn(v, |c| ((c * 37 % 11) as f32 - 5.0) * 0.1);
    let t = rng.targets(n, v, 4);
    (h, w, b, t)
}

type Run = Box<
    dyn Fn(
        Logits<'_>,
        Logits<'_>,
        Option<ArrayView1<'_, f32>>,
        ArrayView1<'_, i64>,
        &LinearCe,
    ) -> Result<LinearCeOutput>,
>;

/// The CPU and every GPU context (default, no subgroups, 64 KiB bindings: many chunks and
/// vocabulary blocks; split rows).
fn runners() -> Vec<(&'static str, Run)> {
    let cpu = Cpu::new();
    #[allow(unused_mut)] // pushed to with the `gpu` feature
    let mut v: Vec<(&'static str, Run)> =
        vec![("cpu", Box::new(move |h, w, b, t, c| cpu.linear_cross_entropy(h, w, b, t, c)))];
    #[cfg(feature = "gpu")]
    for (name, g) in gpus() {
        v.push((name, Box::new(move |h, w, b, t, c| g.linear_cross_entropy(h, w, b, t, c))));
    }
    v
}

#[test]
fn matches_the_f64_reference_in_chunks() {
    let _quiet = not_measuring();
    let (n, d, v) = (37, 24, 301);
    let (h, w, b, t) = inputs(n, d, v, 1);
    let cw = Array1::from_shape_fn(v, |c| 0.5 + (c % 5) as f32 * 0.3);
    let runs = runners();
    for ce in [
        CrossEntropy::default(),
        CrossEntropy::default().with_label_smoothing(0.1).with_class_weight(cw),
        CrossEntropy::default().with_reduction(Reduction::Sum).with_z_loss(1e-3).with_softcap(5.0),
        CrossEntropy::default().with_reduction(Reduction::None).with_temperature(1.7).with_grad_scale(0.5),
        // Sample weights follow their rows when the ignored ones are left out of the products.
        CrossEntropy::default().with_sample_weight(Array1::from_shape_fn(n, |r| 0.5 + (r % 3) as f32 * 0.25)),
    ] {
        let r = reference(&h, &w, Some(&b), t.as_slice().unwrap(), &ce);
        // One chunk, a few chunks, one row per chunk.
        for ((name, run), rows) in runs.iter().flat_map(|r| [n, 10, 1].map(|rows| (r, rows))) {
            let cfg = LinearCe::default().with_ce(ce.clone()).with_workspace_bytes(rows * v * 4);
            let o = run((&h).into(), (&w).into(), Some(b.view()), t.view(), &cfg).unwrap();
            assert!(o.chunk_rows <= rows, "{name}");
            let got = o
                .row_loss
                .as_ref()
                .filter(|_| ce.reduction == Reduction::None)
                .map_or(vec![o.loss], |r| r.iter().map(|&x| x as f64).collect());
            for (&a, &e) in got.iter().zip(&r.loss) {
                assert!((a - e).abs() <= 2e-6 * e.abs().max(1.0), "{name} {ce:?} rows {rows}: loss {a} vs {e}");
            }
            assert!(
                worst(&f32s(o.grad_hidden.as_ref().unwrap()), &r.gh) < 1e-4,
                "{name} {ce:?} rows {rows}: grad_hidden"
            );
            assert!(
                worst(&f32s(o.grad_weight.as_ref().unwrap()), &r.gw) < 1e-4,
                "{name} {ce:?} rows {rows}: grad_weight"
            );
            let gb = o.grad_bias.as_ref().unwrap();
            let gb_worst =
                gb.iter().zip(r.gb.iter()).fold(0.0f64, |m, (&a, &e)| m.max((a as f64 - e).abs() / (1e-3 + e.abs())));
            assert!(gb_worst < 1e-4, "{name} {ce:?} rows {rows}: grad_bias");
        }
    }
}

#[test]
fn bf16_inputs_and_gradients_in_the_input_dtype() {
    let _quiet = not_measuring();
    let (n, d, v) = (40, 32, 257);
    let (h, w, _, t) = inputs(n, d, v, 2);
    let (hb, wb) = (h.mapv(half::bf16::from_f32), w.mapv(half::bf16::from_f32));
    let r = reference(&hb.mapv(f32::from), &wb.mapv(f32::from), None, t.as_slice().unwrap(), &CrossEntropy::default());
    for (name, run) in runners() {
        let o = run((&hb).into(), (&wb).into(), None, t.view(), &LinearCe::default()).unwrap();
        assert!((o.loss - r.loss[0]).abs() < 2e-6 * r.loss[0], "{name}");
        assert!(worst(&f32s(o.grad_hidden.as_ref().unwrap()), &r.gh) < 1e-4, "{name}");
        assert_eq!(o.grad_bias, None, "{name}: no bias given");
        let cfg = LinearCe::default().with_grads_in_input_dtype(true);
        let o = run((&hb).into(), (&wb).into(), None, t.view(), &cfg).unwrap();
        let gw = o.grad_weight.unwrap();
        assert_eq!(gw.dtype(), DType::BF16);
        assert!(worst(&gw.to_f32(), &r.gw) < 8e-3, "{name}: one bf16 rounding");
    }
}

/// Ignored rows are left out of the CPU products, except when one holds a non-finite hidden
/// state: then, as in PyTorch (whose zero gradient row times that state is NaN), `grad_weight`
/// is NaN, while the loss and the other rows' `grad_hidden` are not.
#[test]
fn a_non_finite_ignored_row_reaches_grad_weight_as_in_pytorch() {
    let _quiet = not_measuring();
    let (n, d, v) = (12, 8, 50);
    let (mut h, w, b, mut t) = inputs(n, d, v, 5);
    t[3] = -100;
    t[7] = -100;
    let finite = Cpu::new().linear_cross_entropy(&h, &w, Some(b.view()), t.view(), &LinearCe::default()).unwrap();
    let r = reference(&h, &w, Some(&b), t.as_slice().unwrap(), &CrossEntropy::default());
    assert!((finite.loss - r.loss[0]).abs() <= 2e-6 * r.loss[0].abs());
    assert!(worst(&f32s(finite.grad_weight.as_ref().unwrap()), &r.gw) < 1e-4);
    h[[7, 2]] = f32::NAN;
    for (name, run) in runners() {
        let o = run((&h).into(), (&w).into(), Some(b.view()), t.view(), &LinearCe::default()).unwrap();
        assert!(
            (o.loss - r.loss[0]).abs() <= 2e-6 * r.loss[0].abs(),
            "{name}: the ignored row adds nothing to the loss"
        );
        assert!(f32s(o.grad_weight.as_ref().unwrap()).iter().any(|x| x.is_nan()), "{name}: NaN reaches grad_weight");
        let gh = f32s(o.grad_hidden.as_ref().unwrap());
        assert!(gh.row(0).iter().all(|x| x.is_finite()), "{name}: a counted row's grad_hidden stays finite");
    }
}

#[test]
fn same_bits_on_every_run_and_thread_count() {
    let _quiet = not_measuring();
    let (n, d, v) = (96, 48, 1000);
    let (h, w, b, t) = inputs(n, d, v, 3);
    let cfg = LinearCe::default()
        .with_ce(CrossEntropy::default().with_label_smoothing(0.05))
        .with_workspace_bytes(16 * v * 4);
    let run = |threads| {
        Cpu::with_threads(threads).unwrap().linear_cross_entropy(&h, &w, Some(b.view()), t.view(), &cfg).unwrap()
    };
    let bits = |o: &LinearCeOutput| {
        let mut v = vec![o.loss.to_bits()];
        for g in [&o.grad_hidden, &o.grad_weight] {
            v.extend(g.as_ref().unwrap().to_f32().iter().map(|x| x.to_bits() as u64));
        }
        v.extend(o.grad_bias.as_ref().unwrap().iter().map(|x| x.to_bits() as u64));
        v
    };
    let first = bits(&run(2));
    for threads in [2, 1, 3] {
        assert_eq!(bits(&run(threads)), first, "{threads} threads");
    }
    for (name, run) in runners().into_iter().skip(1) {
        let once = bits(&run((&h).into(), (&w).into(), Some(b.view()), t.view(), &cfg).unwrap());
        assert_eq!(
            bits(&run((&h).into(), (&w).into(), Some(b.view()), t.view(), &cfg).unwrap()),
            once,
            "{name}: two runs"
        );
    }
}

#[test]
fn workspace_stays_within_its_budget() {
    let _alone = MEASURING.write().unwrap_or_else(|p| p.into_inner());
    // N x V x 4 = 32 MiB of logits; the budget is a quarter of it.
    let (n, d, v) = (2048, 16, 4096);
    let (h, w, b, t) = inputs(n, d, v, 4);
    let budget = 8usize << 20;
    let cfg = LinearCe::default().with_workspace_bytes(budget);
    let cpu = Cpu::new();
    cpu.linear_cross_entropy(&h, &w, Some(b.view()), t.view(), &cfg).unwrap(); // threads and pools warm
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let o = cpu.linear_cross_entropy(&h, &w, Some(b.view()), t.view(), &cfg).unwrap();
    let extra = PEAK.load(Ordering::Relaxed) - base;
    // The results themselves: grad_hidden and grad_weight in f32.
    let results = (n * d + v * d) * 4;
    assert_eq!(o.chunk_rows, budget / (v * 4));
    assert!(extra <= budget + results + (1 << 20), "peak {extra} bytes over {budget} + {results}");
    assert!(extra < n * v * 4, "less than the logits would take");
}

/// On the GPU: the pool's peak of bytes handed out at once stays within the inputs, the
/// gradients and the workspace budget (size classes round up by at most a quarter).
#[cfg(feature = "gpu")]
#[test]
fn gpu_workspace_stays_within_its_budget() {
    let _quiet = not_measuring();
    let Some(g) = fresh_gpu() else { return };
    let (n, d, v) = (2048, 16, 4096);
    let (h, w, b, t) = inputs(n, d, v, 4);
    let budget = 8usize << 20;
    let cfg = LinearCe::default().with_workspace_bytes(budget);
    g.linear_cross_entropy(&h, &w, Some(b.view()), t.view(), &cfg).unwrap();
    let peak = g.counters().pool.peak_in_use_bytes as usize;
    let inputs_and_grads = 2 * (n * d + v * d) * 4 + (v + 2 * n) * 4;
    assert!(peak <= inputs_and_grads + budget * 5 / 4 + (1 << 20), "peak {peak} bytes");
    assert!(peak < n * v * 4, "less than the logits would take");
}

#[test]
fn all_ignored_batch_and_bad_inputs() {
    let _quiet = not_measuring();
    let (h, w, b, _) = inputs(5, 8, 20, 5);
    let cpu = Cpu::new();
    let ignored = Array1::from_elem(5, -100i64);
    let o = cpu.linear_cross_entropy(&h, &w, Some(b.view()), ignored.view(), &LinearCe::default()).unwrap();
    assert!(o.loss.is_nan(), "an all-ignored mean is NaN, as in PyTorch");
    assert!(o.grad_weight.unwrap().to_f32().iter().all(|&g| g == 0.0));
    let t = ndarray::array![0i64, 1, 2, 3, 4];
    let cfg = LinearCe::default();
    let wrong = Array2::<f32>::zeros((20, 7));
    assert!(matches!(cpu.linear_cross_entropy(&h, &wrong, None, t.view(), &cfg), Err(XentError::Shape(_))));
    let short_bias = Array1::<f32>::zeros(3);
    assert!(matches!(
        cpu.linear_cross_entropy(&h, &w, Some(short_bias.view()), t.view(), &cfg),
        Err(XentError::Shape(_))
    ));
    let bad = ndarray::array![0i64, 1, 20, 3, 4];
    assert!(matches!(
        cpu.linear_cross_entropy(&h, &w, None, bad.view(), &cfg),
        Err(XentError::TargetOutOfRange { .. })
    ));
    let hb = h.mapv(half::bf16::from_f32);
    assert!(matches!(cpu.linear_cross_entropy(&hb, &w, None, t.view(), &cfg), Err(XentError::InvalidOption(_))));
    let zero = LinearCe::default().with_workspace_bytes(0);
    assert!(cpu.linear_cross_entropy(&h, &w, None, t.view(), &zero).is_err());
}

/// PyTorch's float64 answers (`F.linear` + `F.cross_entropy`, backward for all three inputs).
#[test]
fn pytorch_golden_cases() {
    let _quiet = not_measuring();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap().replace(": NaN", ": \"NaN\"");
    let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
    let read = |f: &serde_json::Value| -> (Vec<usize>, Vec<f64>) {
        let bytes = std::fs::read(dir.join(f.as_str().unwrap())).unwrap();
        let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
        let shape = npy.shape().iter().map(|&d| d as usize).collect();
        let v = match npy.dtype().descr().as_str() {
            "'<f4'" => npy.into_vec::<f32>().unwrap().into_iter().map(f64::from).collect(),
            "'<f8'" => npy.into_vec::<f64>().unwrap(),
            _ => npy.into_vec::<i64>().unwrap().into_iter().map(|x| x as f64).collect(),
        };
        (shape, v)
    };
    let runs = runners();
    let mut ran = 0;
    for case in manifest["cases"].as_array().unwrap().iter().filter(|c| c["op"] == "linear_cross_entropy") {
        let (p, i, e) = (&case["params"], &case["inputs"], &case["expected"]);
        let name = case["name"].as_str().unwrap();
        let arr = |f: &serde_json::Value| {
            let (s, v) = read(f);
            Array2::from_shape_vec((s[0], s[1]), v.iter().map(|&x| x as f32).collect()).unwrap()
        };
        let (h, w) = (arr(&i["hidden"]), arr(&i["weight"]));
        let t: Vec<i64> = read(&i["targets"]).1.iter().map(|&x| x as i64).collect();
        let b: Option<Array1<f32>> = i.get("bias").map(|f| read(f).1.iter().map(|&x| x as f32).collect());
        let ce = CrossEntropy::default()
            .with_reduction(match p["reduction"].as_str().unwrap() {
                "sum" => Reduction::Sum,
                "none" => Reduction::None,
                _ => Reduction::Mean,
            })
            .with_ignore_index(p["ignore_index"].as_i64().unwrap())
            .with_label_smoothing(p["label_smoothing"].as_f64().unwrap() as f32)
            .with_class_weight(i.get("class_weight").map(|f| read(f).1.iter().map(|&x| x as f32).collect()))
            .with_z_loss(p.get("z_loss_scale").map_or(0.0, |z| z.as_f64().unwrap() as f32))
            .with_softcap(p.get("softcap").map(|c| c.as_f64().unwrap() as f32));
        let cfg = LinearCe::default().with_ce(ce).with_workspace_bytes(7 * w.nrows() * 4);
        let bias = b.as_ref().map(|b| b.view());
        for (backend, run) in &runs {
            let name = format!("{backend} {name}");
            let o = if p["dtype"] == "bf16" {
                let (hb, wb) = (h.mapv(half::bf16::from_f32), w.mapv(half::bf16::from_f32));
                run((&hb).into(), (&wb).into(), bias, ArrayView1::from(&t), &cfg).unwrap()
            } else {
                run((&h).into(), (&w).into(), bias, ArrayView1::from(&t), &cfg).unwrap()
            };
            let want_loss: Vec<f64> = match &e["loss"] {
                serde_json::Value::String(s) if s == "NaN" => vec![f64::NAN],
                serde_json::Value::String(_) => read(&e["loss"]).1,
                v => vec![v.as_f64().unwrap()],
            };
            let got_loss: Vec<f64> = if want_loss.len() > 1 {
                o.row_loss.as_ref().unwrap().iter().map(|&x| x as f64).collect()
            } else {
                vec![o.loss]
            };
            for (&a, &b) in got_loss.iter().zip(&want_loss) {
                assert!(
                    a.is_nan() && b.is_nan() || (a - b).abs() <= 2e-6 * b.abs().max(1.0),
                    "{name}: loss {a} vs {b}"
                );
            }
            for (key, got) in [
                ("grad_hidden", o.grad_hidden.as_ref().map(Tensor2::to_f32)),
                ("grad_weight", o.grad_weight.as_ref().map(Tensor2::to_f32)),
            ] {
                if let Some(want) = e.get(key) {
                    let want = read(want).1;
                    let got = got.unwrap();
                    for (&a, &b) in got.iter().zip(&want) {
                        assert!((a as f64 - b).abs() <= 1e-6 + 2e-5 * b.abs(), "{name}: {key} {a} vs {b}");
                    }
                }
            }
            if let Some(want) = e.get("grad_bias") {
                for (&a, &b) in o.grad_bias.as_ref().unwrap().iter().zip(&read(want).1) {
                    assert!((a as f64 - b).abs() <= 1e-6 + 2e-5 * b.abs(), "{name}: grad_bias {a} vs {b}");
                }
            }
        }
        ran += 1;
    }
    assert!(ran >= 7, "only {ran} linear golden cases");
}
