//! Every kind of bad input gets a typed error on both backends, never a panic.

mod common;

use common::*;
use ndarray::{array, Array1, Array2};
use xent::*;

fn each_backend(f: impl Fn(&str, &dyn Backend)) {
    f("cpu", &Cpu::new());
    for (name, g) in gpus() {
        f(name, g);
    }
}

#[test]
fn shape_mismatches() {
    let x = Array2::<f32>::zeros((3, 4));
    each_backend(|name, b| {
        let t = array![0i64, 1];
        let e = b.cross_entropy(x.view().into(), t.view().into(), &CrossEntropy::default()).unwrap_err();
        assert!(matches!(e, XentError::Shape(ref m) if m.contains("3 rows") && m.contains("2")), "{name}: {e}");
        let t = array![0i64, 1, 2];
        let cfg = CrossEntropy::default().with_class_weight(Array1::ones(5));
        let e = b.cross_entropy(x.view().into(), t.view().into(), &cfg).unwrap_err();
        assert!(matches!(e, XentError::Shape(ref m) if m.contains("class_weight")), "{name}: {e}");
        let cfg = CrossEntropy::default().with_sample_weight(Array1::ones(2));
        let e = b.cross_entropy(x.view().into(), t.view().into(), &cfg).unwrap_err();
        assert!(matches!(e, XentError::Shape(ref m) if m.contains("sample_weight")), "{name}: {e}");
        let empty = Array2::<f32>::zeros((3, 0));
        let e = b.cross_entropy(empty.view().into(), t.view().into(), &CrossEntropy::default()).unwrap_err();
        assert!(matches!(e, XentError::Shape(_)), "{name}: {e}");
        assert!(
            matches!(b.log_softmax(empty.view().into(), SoftmaxKind::LogSoftmax), Err(XentError::Shape(_))),
            "{name}"
        );
    });
}

#[test]
fn targets_out_of_range() {
    let x = Array2::<f32>::zeros((4, 3));
    each_backend(|name, b| {
        for bad in [3i64, -1, -101, i64::MAX] {
            let t = array![0i64, 1, bad, 2];
            let e = b.cross_entropy(x.view().into(), t.view().into(), &CrossEntropy::default()).unwrap_err();
            assert_eq!(e, XentError::TargetOutOfRange { row: 2, target: bad, classes: 3 }, "{name}");
        }
        let t = array![0i32, 7, 1, 2];
        let e = b.cross_entropy(x.view().into(), t.view().into(), &CrossEntropy::default()).unwrap_err();
        assert_eq!(e, XentError::TargetOutOfRange { row: 1, target: 7, classes: 3 }, "{name}");
    });
}

#[test]
fn bad_options() {
    let x = Array2::<f32>::zeros((2, 3));
    let t = array![0i64, 1];
    let bad = [
        CrossEntropy::default().with_label_smoothing(1.5),
        CrossEntropy::default().with_label_smoothing(-0.1),
        CrossEntropy::default().with_label_smoothing(f32::NAN),
        CrossEntropy::default().with_temperature(0.0),
        CrossEntropy::default().with_temperature(-1.0),
        CrossEntropy::default().with_softcap(0.0),
        CrossEntropy::default().with_softcap(f32::INFINITY),
        CrossEntropy::default().with_z_loss(-1e-4),
        CrossEntropy::default().with_grad_scale(f32::NAN),
    ];
    each_backend(|name, b| {
        for cfg in &bad {
            let e = b.cross_entropy(x.view().into(), t.view().into(), cfg).unwrap_err();
            assert!(matches!(e, XentError::InvalidOption(_)), "{name} {cfg:?}: {e}");
        }
    });
    assert!(Cpu::with_threads(0).is_err());
}

#[cfg(feature = "gpu")]
#[test]
fn row_larger_than_a_binding() {
    let Some(g) = gpu_small_bindings() else {
        return;
    };
    let x = Array2::<f32>::zeros((2, 20_000)); // 80 KB rows, 64 KiB bindings
    let t = array![0i64, 1];
    let e = g.cross_entropy(&x, &t, &CrossEntropy::default()).unwrap_err();
    assert!(matches!(e, XentError::TooLarge { limit: 65536, .. }), "{e}");
    assert!(e.to_string().contains("20000 elements"), "{e}");
    let e = g.log_softmax(&x, SoftmaxKind::Softmax).unwrap_err();
    assert!(matches!(e, XentError::TooLarge { .. }), "{e}");
}

#[cfg(feature = "gpu")]
#[test]
fn tensor_larger_than_any_buffer() {
    let Some(g) = gpu() else { return };
    // The recorded path checks sizes without allocating: 2^20 rows x 2^13 classes is 32 GiB.
    let small = g.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 1024,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let plan = g.cross_entropy_plan(1 << 20, 1 << 13, DType::F32, &CrossEntropy::default()).unwrap();
    let mut enc = g.device().create_command_encoder(&Default::default());
    let inputs = CeInputs {
        logits: small.slice(..),
        targets: DeviceTargets::Classes(small.slice(..)),
        sample_weight: None,
        grad: DeviceGrad::None,
    };
    let e = plan.record(&mut enc, inputs).unwrap_err();
    assert!(matches!(e, XentError::Shape(ref m) if m.contains("logits slice")), "{e}");
}

#[test]
fn errors_print_one_line_messages() {
    let e = XentError::TargetOutOfRange { row: 2, target: 9, classes: 3 };
    assert_eq!(e.to_string(), "target 9 at row 2 is out of range: expected 0..3 or the ignore_index");
    let e = XentError::NoAdapter { message: "none found".into(), source: None };
    assert!(e.to_string().contains("apt-get install mesa-vulkan-drivers"));
}

#[test]
fn bad_probability_targets() {
    let x = Array2::<f32>::zeros((2, 3));
    each_backend(|name, b| {
        let y = array![[0.5f32, 0.5, 0.0], [0.2, -0.1, 0.9]];
        let e = b.cross_entropy(x.view().into(), y.view().into(), &CrossEntropy::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "target probabilities must be finite and >= 0, got -0.1 at row 1, column 1",
            "{name}"
        );
        let y = array![[0.5f32, f32::NAN, 0.0], [0.2, 0.1, 0.7]];
        let e = b.cross_entropy(x.view().into(), y.view().into(), &CrossEntropy::default()).unwrap_err();
        assert!(
            matches!(e, XentError::InvalidValue { ref input, ref index, value, .. }
                if input == "target probabilities" && index == &[0, 1] && value.is_nan()),
            "{name}: {e}"
        );
        let y = Array2::<f32>::zeros((2, 4));
        let e = b.cross_entropy(x.view().into(), y.view().into(), &CrossEntropy::default()).unwrap_err();
        assert!(matches!(e, XentError::Shape(_)), "{name}: {e}");
    });
}

/// `Cpu::distill_into` checks the caller's gradient array: its shape and its layout.
#[test]
fn distill_into_a_bad_gradient_array() {
    let (s, t) = (Array2::<f32>::zeros((2, 3)), Array2::<f32>::ones((2, 3)));
    let cpu = Cpu::new();
    let mut wrong = Array2::<f32>::zeros((3, 2));
    let e = cpu.distill_into(&s, &t, &Distill::default(), wrong.view_mut()).unwrap_err();
    assert!(matches!(e, XentError::Shape(ref m) if m.contains("gradient")), "{e}");
    let mut transposed = Array2::<f32>::zeros((3, 2));
    let e = cpu.distill_into(&s, &t, &Distill::default(), transposed.view_mut().reversed_axes()).unwrap_err();
    assert!(matches!(e, XentError::InvalidOption(ref m) if m.contains("contiguous")), "{e}");
    let mut g = Array2::<f32>::from_elem((2, 3), f32::NAN);
    let e = cpu.distill_into(&s, &t, &Distill::default().with_temperature(-1.0), g.view_mut()).unwrap_err();
    assert!(matches!(e, XentError::InvalidOption(_)), "{e}");
    // A good call overwrites every entry of a reused array.
    cpu.distill_into(&s, &t, &Distill::default().with_mode(DistillMode::ReverseKl), g.view_mut()).unwrap();
    assert!(g.iter().all(|x| x.is_finite()));
}

#[test]
fn bad_bce_distill_and_measure_inputs() {
    let x = Array2::<f32>::zeros((2, 3));
    let y = Array2::<f32>::from_elem((2, 3), 0.5);
    each_backend(|name, b| {
        let bad_t = array![[0.5f32, 1.5, 0.0], [0.0, 0.0, 0.0]];
        let e = b.bce_with_logits(x.view(), bad_t.view(), &Bce::default()).unwrap_err();
        assert!(matches!(e, XentError::InvalidOption(ref m) if m.contains("[0, 1]")), "{name}: {e}");
        let bad_p = array![[0.5f32, -0.1, 0.0], [0.0, 0.0, 0.0]];
        assert!(matches!(b.bce(bad_p.view(), y.view(), &Bce::default()), Err(XentError::InvalidOption(_))), "{name}");
        let pw = Bce::default().with_pos_weight(Array1::ones(3));
        assert!(matches!(b.bce(y.view(), y.view(), &pw), Err(XentError::InvalidOption(_))), "{name}");
        let w = Bce::default().with_weight(BceWeight::PerClass(Array1::ones(4)));
        assert!(matches!(b.bce_with_logits(x.view(), y.view(), &w), Err(XentError::Shape(_))), "{name}");
        let short = Array2::<f32>::zeros((2, 2));
        assert!(
            matches!(b.bce_with_logits(x.view(), short.view(), &Bce::default()), Err(XentError::Shape(_))),
            "{name}"
        );

        for cfg in [
            Distill::default().with_temperature(0.0),
            Distill::default().with_temperature(f32::NAN),
            Distill::default().with_mode(DistillMode::Jsd { beta: 1.5 }),
        ] {
            assert!(
                matches!(b.distill(x.view().into(), x.view().into(), &cfg, false), Err(XentError::InvalidOption(_))),
                "{name} {cfg:?}"
            );
        }
        assert!(
            matches!(
                b.distill(x.view().into(), short.view().into(), &Distill::default(), false),
                Err(XentError::Shape(_))
            ),
            "{name}"
        );

        let p = array![[0.5f64, 0.5], [0.2, 0.8]];
        let neg = array![[0.5f64, 0.5], [1.2, -0.2]];
        let e = b.measures(p.view(), neg.view()).unwrap_err();
        assert!(
            matches!(e, XentError::InvalidValue { ref input, ref index, .. } if input == "q" && index == &[1, 1]),
            "{name}: {e}"
        );
        let wide = Array2::<f64>::zeros((2, 3));
        assert!(matches!(b.measures(p.view(), wide.view()), Err(XentError::Shape(_))), "{name}");
    });
}

#[test]
fn bad_sequence_calibration_and_preference_inputs() {
    use xent::calibration::calibrate;
    use xent::preference::{preference, Preference};
    use xent::sequence::{CorpusEval, SeqMask};
    let x = Array2::<f32>::zeros((6, 4));
    let y = Array1::<i64>::zeros(6);
    each_backend(|name, b| {
        let mut acc = CorpusEval::default();
        let e = acc.add_batch(b, x.view(), y.view(), 4, SeqMask::Lengths(array![1i64].view())).unwrap_err();
        assert!(matches!(e, XentError::Shape(ref m) if m.contains("whole number")), "{name}: {e}");
        let e = acc.add_batch(b, x.view(), y.view(), 3, SeqMask::Lengths(array![1i64, 4].view())).unwrap_err();
        assert!(matches!(e, XentError::InvalidOption(ref m) if m.contains("length 4")), "{name}: {e}");
        let m = Array2::<u8>::ones((3, 2));
        let e = acc.add_batch(b, x.view(), y.view(), 3, SeqMask::Mask(m.view())).unwrap_err();
        assert!(matches!(e, XentError::Shape(ref m) if m.contains("mask")), "{name}: {e}");
        assert_eq!(acc, CorpusEval::default(), "{name}: failed batches leave the accumulator as it was");
        assert!(matches!(calibrate(b, x.view(), y.view(), 1.0, 0), Err(XentError::InvalidOption(_))));
        let (c, r) = (array![1.0f32, 2.0], array![0.0f32]);
        assert!(matches!(preference(b, c.view(), r.view(), &Preference::default()), Err(XentError::Shape(_))));
        let r = array![0.0f32, f32::NAN];
        assert!(matches!(preference(b, c.view(), r.view(), &Preference::default()), Err(XentError::InvalidOption(_))));
        let bad = Preference::default().with_beta(0.0);
        assert!(matches!(preference(b, c.view(), c.view(), &bad), Err(XentError::InvalidOption(_))));
        let v = Array2::<f32>::zeros((6, 3));
        assert!(matches!(b.hvp(x.view().into(), v.view()), Err(XentError::Shape(_))), "{name}");
    });
}

/// Non-finite class or sample weights (issue 26): refused before any work with the same typed
/// error on every backend, naming the option and the entry, for the logits loss, its
/// sum/none reductions and the fused linear loss; unnormalised probability rows are accepted
/// (as in PyTorch) with the same loss on every backend.
#[test]
fn non_finite_weights_are_named_the_same_on_every_backend() {
    let x = Array2::from_shape_fn((3, 4), |(r, c)| (r as f32 - c as f32) * 0.3);
    let t = array![0i64, 3, 1];
    let mut cases = Vec::new();
    for (k, bad) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY].into_iter().enumerate() {
        let mut cw = Array1::ones(4);
        cw[k + 1] = bad;
        let mut sw = Array1::ones(3);
        sw[k] = bad;
        for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
            let at_class = vec![k + 1];
            let at_row = vec![k];
            cases.push((
                CrossEntropy::default().with_class_weight(cw.clone()).with_reduction(reduction),
                "class_weight",
                at_class,
                bad,
            ));
            cases.push((
                CrossEntropy::default().with_sample_weight(sw.clone()).with_reduction(reduction),
                "sample_weight",
                at_row,
                bad,
            ));
        }
    }
    let expected = |input: &str, index: &[usize], bad: f32| {
        let at = format!("index {}", index[0]);
        format!("{input} must be finite, got {bad} at {at}")
    };
    each_backend(|name, b| {
        for (cfg, input, index, bad) in &cases {
            let e = b.cross_entropy(x.view().into(), t.view().into(), cfg).unwrap_err();
            assert!(
                matches!(e, XentError::InvalidValue { input: ref i, index: ref at, .. } if i == input && at == index),
                "{name} {cfg:?}: {e}"
            );
            assert_eq!(e.to_string(), expected(input, index, *bad), "{name}");
            let e = b.cross_entropy_with_grad(x.view().into(), t.view().into(), cfg).unwrap_err();
            assert_eq!(e.to_string(), expected(input, index, *bad), "{name} with grad");
        }
    });
    // The fused linear loss takes the same options and gives the same words.
    let h = Array2::from_shape_fn((3, 2), |(r, c)| (r + c) as f32 * 0.1);
    let w = Array2::from_shape_fn((4, 2), |(r, c)| (r as f32 - c as f32) * 0.2);
    type Run<'a> = Box<dyn Fn(&LinearCe) -> Result<LinearCeOutput> + 'a>;
    let linear: Vec<(&str, Run)> = {
        #[cfg_attr(not(feature = "gpu"), allow(unused_mut))]
        let mut v: Vec<(&str, Run)> =
            vec![("cpu", Box::new(|c| Cpu::new().linear_cross_entropy(&h, &w, None, t.view(), c)))];
        #[cfg(feature = "gpu")]
        for (name, g) in gpus() {
            let (h, w, t) = (&h, &w, &t);
            v.push((name, Box::new(move |c| g.linear_cross_entropy(h, w, None, t.view(), c))));
        }
        v
    };
    for (name, run) in &linear {
        for (cfg, input, index, bad) in &cases {
            let e = run(&LinearCe::default().with_ce(cfg.clone())).map(|_| ()).expect_err("an error");
            assert_eq!(e.to_string(), expected(input, index, *bad), "linear {name}");
        }
    }
    // Probability rows that do not sum to 1 are PyTorch's business too: accepted, same loss.
    let p = array![[0.5f32, 0.9, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0], [2.0, 0.1, 0.0, 0.0]];
    let cpu = Cpu::new().cross_entropy(x.view(), p.view(), &CrossEntropy::default()).unwrap();
    assert!(cpu.loss.is_finite());
    each_backend(|name, b| {
        let out = b.cross_entropy(x.view().into(), p.view().into(), &CrossEntropy::default()).unwrap();
        assert!((out.loss - cpu.loss).abs() <= 1e-6 * cpu.loss.abs().max(1.0), "{name}: {} vs {}", out.loss, cpu.loss);
    });
}
