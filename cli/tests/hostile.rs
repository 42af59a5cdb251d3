//! Hostile input, failing outputs and extreme values: one clear error and a non-zero exit,
//! never a panic, an abort or a lost file. One test per class of defect.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};

use support::*;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A small valid problem: logits [6, 5] f32, targets int64.
fn problem(d: &Path) -> (String, String) {
    let x: Vec<f32> = (0..30).map(|i| ((i * 7) % 11) as f32 * 0.3 - 1.0).collect();
    let (xp, tp) = (d.join("x.npy"), d.join("t.npy"));
    write_npy(&xp, &[6, 5], &x);
    write_npy(&tp, &[6], &[0i64, 4, -100, 2, 1, 3]);
    (s(&xp), s(&tp))
}

fn backends() -> Vec<&'static str> {
    if gpu_ok() {
        vec!["cpu", "gpu"]
    } else {
        vec!["cpu"]
    }
}

#[test]
fn outputs_are_atomic_and_checked_before_the_work() {
    let d = scratch_dir("atomic");
    let (x, t) = problem(&d);
    let original = std::fs::read(&x).unwrap();
    for b in backends() {
        // Output = input: log-softmax replaces the file only when complete and correct.
        let j = xent_json(&["log-softmax", "--logits", &x, "--out", &x, "--backend", b, "--json"]);
        assert_eq!(j["rows"], 6);
        let y = read_2d(&x);
        for row in y.rows() {
            let total: f64 = row.iter().map(|v| v.exp()).sum();
            assert!((total - 1.0).abs() < 1e-5, "{b}: in-place log-softmax");
        }
        std::fs::write(&x, &original).unwrap();
        // A second output that cannot be written: the run stops before the work and the first
        // output's target keeps its old contents.
        let g = s(&d.join("g.npy"));
        std::fs::write(&g, b"old gradient").unwrap();
        let e = xent_error(&[
            "eval",
            "--logits",
            &x,
            "--targets",
            &t,
            "--backend",
            b,
            "--grad-out",
            &g,
            "--loss-out",
            "/nonexistent/r.npy",
        ]);
        assert!(e.contains("/nonexistent"), "{e}");
        assert_eq!(std::fs::read(&g).unwrap(), b"old gradient");
        // Devices and directories are never replaced.
        let e = xent_error(&["eval", "--logits", &x, "--targets", &t, "--backend", b, "--grad-out", "/dev/full"]);
        assert!(e.contains("not a regular file"), "{e}");
        let e = xent_error(&["eval", "--logits", &x, "--targets", &t, "--backend", b, "--grad-out", &s(&d)]);
        assert!(e.contains("directory"), "{e}");
        // Two outputs naming one file.
        let e = xent_error(&["eval", "--logits", &x, "--targets", &t, "--grad-out", &g, "--loss-out", &g]);
        assert!(e.contains("same file"), "{e}");
    }
    // A write that fails halfway (over the file-size limit): one error, target untouched, no
    // temporary file left behind.
    let big = d.join("big.npy");
    let bt = d.join("bt.npy");
    let xs: Vec<f32> = (0..64 * 1000).map(|i| (i % 17) as f32).collect();
    write_npy(&big, &[64, 1000], &xs);
    write_npy(&bt, &[64], &vec![3i64; 64]);
    let g = d.join("g2.npy");
    std::fs::write(&g, b"keep me").unwrap();
    let cmd = format!(
        "ulimit -f 64; exec {} eval --backend cpu --logits {} --targets {} --grad-out {}",
        env!("CARGO_BIN_EXE_xent"),
        s(&big),
        s(&bt),
        s(&g)
    );
    let out = Command::new("sh").arg("-c").arg(&cmd).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{:?} {}", out.status, String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.lines().filter(|l| !l.contains("XDG")).count() == 1 && err.contains("g2.npy"), "{err}");
    assert_eq!(std::fs::read(&g).unwrap(), b"keep me");
    let leftovers: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn untrusted_sizes_are_errors_not_aborts() {
    let d = scratch_dir("sizes");
    // A 192-byte .npy whose header claims 10^12 elements.
    let mut h = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }".to_vec();
    while !(h.len() + 11).is_multiple_of(64) {
        h.push(b' ');
    }
    h.push(b'\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((h.len() as u16).to_le_bytes());
    bytes.extend(&h);
    bytes.resize(192, 0);
    let f = d.join("huge.npy");
    std::fs::write(&f, &bytes).unwrap();
    let (_, t) = problem(&d);
    let e = xent_error(&["eval", "--logits", &s(&f), "--targets", &t, "--backend", "cpu"]);
    assert!(e.contains("truncated"), "{e}");
    // Header length larger than the file.
    let mut b2 = bytes.clone();
    b2[8] = 0xff;
    b2[9] = 0xff;
    std::fs::write(&f, &b2).unwrap();
    let e = xent_error(&["eval", "--logits", &s(&f), "--targets", &t, "--backend", "cpu"]);
    assert!(e.contains("header"), "{e}");
    // Flags that ask for impossible amounts of memory.
    let (x, t) = problem(&d);
    let e = xent_error(&["calibrate", "--logits", &x, "--targets", &t, "--bins", "1000000000", "--backend", "cpu"]);
    assert!(e.contains("--bins"), "{e}");
    let e = xent_error(&["bench", "--backend", "cpu", "--shapes", "1000000x1000000", "--reps", "1"]);
    assert!(e.contains("allocate") || e.contains("shape"), "{e}");
}

#[test]
fn stdout_that_closes_or_fills_up() {
    let d = scratch_dir("stdout");
    let (x, t) = problem(&d);
    // A closed pipe: the conventional quiet exit (141), no panic message.
    let mut child = Command::new(env!("CARGO_BIN_EXE_xent"))
        .args(["eval", "--backend", "cpu", "--logits", &x, "--targets", &t])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(141), "{:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    // A full device: one error line, status 1.
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xent"))
        .args(["eval", "--backend", "cpu", "--logits", &x, "--targets", &t, "--json"])
        .stdout(full)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stdout") && !err.contains("panicked"), "{err}");
}

#[test]
fn extreme_values_give_exact_or_reported_results() {
    let d = scratch_dir("extreme");
    // Logits around 1e30: token losses near 1e30 sum exactly in perplexity.
    let (b, tt, v) = (2, 3, 4);
    let x: Vec<f32> = (0..b * tt * v).map(|i| if i % 4 == 0 { 1e30 } else { -1e30 }).collect();
    let xp = d.join("x.npy");
    write_npy(&xp, &[b * tt, v], &x);
    let tp = d.join("t.npy");
    write_npy(&tp, &[b * tt], &[1i64, 2, 3, 1, 2, 3]);
    let lp = d.join("l.npy");
    write_npy(&lp, &[b], &[3i64, 2]);
    for be in backends() {
        let j = xent_json(&[
            "perplexity",
            "--logits",
            &s(&xp),
            "--targets",
            &s(&tp),
            "--lengths",
            &s(&lp),
            "--backend",
            be,
            "--json",
        ]);
        // Every counted token: loss = 1e30 - (-1e30) = 2e30 (f32: 2e30 rounds to 2.0000000e30).
        let want = 2e30f32 as f64;
        let nll = number(&j["corpus_nll"]);
        assert!((nll - want).abs() <= 1e-6 * want, "{be}: corpus NLL {nll}, want {want}");
        for v in j["nll_per_sequence"].as_array().unwrap() {
            assert!((number(v) - want).abs() <= 1e-6 * want, "{be}: {v}");
        }
    }
    // Calibrating logits that hold a NaN: a clear reason, not "no counted rows".
    let mut x: Vec<f32> = (0..30).map(|i| (i % 7) as f32).collect();
    x[3] = f32::NAN;
    let xp = d.join("nan.npy");
    write_npy(&xp, &[6, 5], &x);
    let (_, t) = problem(&d);
    for be in backends() {
        let e = xent_error(&["calibrate", "--logits", &s(&xp), "--targets", &t, "--backend", be]);
        assert!(e.contains("NaN") || e.contains("non-finite"), "{be}: {e}");
    }
    // Separable data: the optimum is outside the bracket, and the error says so.
    let xs: Vec<f32> = (0..20).flat_map(|i| if i % 2 == 0 { [4.0f32, 0.0] } else { [0.0, 4.0] }).collect();
    let xp = d.join("sep.npy");
    write_npy(&xp, &[20, 2], &xs);
    let tp = d.join("sep-t.npy");
    write_npy(&tp, &[20], &(0..20).map(|i| (i % 2) as i64).collect::<Vec<_>>());
    let e = xent_error(&["calibrate", "--logits", &s(&xp), "--targets", &s(&tp), "--backend", "cpu"]);
    assert!(e.contains("bracket"), "{e}");
    // +inf, -inf and NaN logits: the GPU agrees with the CPU (and PyTorch): NaN rows stay NaN.
    let mut x: Vec<f32> = (0..20).map(|i| i as f32 * 0.1).collect();
    x[2] = f32::INFINITY;
    x[7] = f32::NEG_INFINITY;
    x[13] = f32::NAN;
    let xp = d.join("inf.npy");
    write_npy(&xp, &[4, 5], &x);
    let tp = d.join("inf-t.npy");
    write_npy(&tp, &[4], &[0i64, 2, 1, 4]);
    let mut rows = Vec::new();
    for be in backends() {
        let r = d.join(format!("rows-{be}.npy"));
        let g = d.join(format!("grad-{be}.npy"));
        let ls = d.join(format!("ls-{be}.npy"));
        xent_json(&[
            "eval",
            "--logits",
            &s(&xp),
            "--targets",
            &s(&tp),
            "--backend",
            be,
            "--reduction",
            "none",
            "--loss-out",
            &s(&r),
            "--grad-out",
            &s(&g),
            "--json",
        ]);
        xent_json(&["log-softmax", "--logits", &s(&xp), "--out", &s(&ls), "--backend", be, "--json"]);
        rows.push((read_1d(&r), read_2d(&g), read_2d(&ls)));
    }
    let (r0, g0, l0) = &rows[0];
    assert!(r0[0].is_nan() && g0.row(0).iter().all(|v| v.is_nan()), "a +inf row is NaN: {r0}");
    assert!(l0.row(0).iter().all(|v| v.is_nan()));
    assert!(r0[2].is_nan(), "a NaN row is NaN");
    for (r, g, l) in &rows[1..] {
        for i in 0..4 {
            let same = r[i] == r0[i] || (r[i] - r0[i]).abs() < 1e-5;
            assert!(r[i].is_nan() == r0[i].is_nan() && (r0[i].is_nan() || same), "row {i}: {r} vs {r0}");
            for j in 0..5 {
                for (a, b) in [(g[[i, j]], g0[[i, j]]), (l[[i, j]], l0[[i, j]])] {
                    assert!(
                        a.is_nan() == b.is_nan() && (b.is_nan() || a == b || (a - b).abs() < 1e-5),
                        "[{i},{j}] {a} vs {b}"
                    );
                }
            }
        }
    }
}

#[test]
fn bad_input_is_refused() {
    let d = scratch_dir("refused");
    let (x, t) = problem(&d);
    // A header value xent does not understand.
    let bytes = std::fs::read(&x).unwrap();
    let text = String::from_utf8_lossy(&bytes).replace("'fortran_order': False", "'fortran_order': Maybe");
    let f = d.join("maybe.npy");
    std::fs::write(&f, text.as_bytes().iter().copied().take(bytes.len()).collect::<Vec<u8>>()).unwrap();
    let mut fixed = bytes.clone();
    let at = String::from_utf8_lossy(&bytes).find("False").unwrap();
    fixed[at..at + 5].copy_from_slice(b"Maybe");
    std::fs::write(&f, &fixed).unwrap();
    let e = xent_error(&["eval", "--logits", &s(&f), "--targets", &t, "--backend", "cpu"]);
    assert!(e.contains("header"), "{e}");
    // Float targets and float lengths are not truncated into classes.
    let ft = d.join("ft.npy");
    write_npy(&ft, &[6], &[0.0f32, 1.7, 2.0, f32::NAN, 1.0, 0.0]);
    let e = xent_error(&["eval", "--logits", &x, "--targets", &s(&ft), "--backend", "cpu"]);
    assert!(e.contains("int64 or int32"), "{e}");
    let (px, pt, fl) = (d.join("px.npy"), d.join("pt.npy"), d.join("fl.npy"));
    write_npy(&px, &[6, 5], &[0.0f32; 30]);
    write_npy(&pt, &[6], &[0i64, 1, 2, 3, 4, 0]);
    write_npy(&fl, &[2], &[3.0f32, 2.5]);
    let e = xent_error(&[
        "perplexity",
        "--logits",
        &s(&px),
        "--targets",
        &s(&ft),
        "--lengths",
        &s(&fl),
        "--backend",
        "cpu",
    ]);
    assert!(e.contains("int64 or int32"), "{e}");
    let e = xent_error(&[
        "perplexity",
        "--logits",
        &s(&px),
        "--targets",
        &s(&pt),
        "--lengths",
        &s(&fl),
        "--backend",
        "cpu",
    ]);
    assert!(e.contains("lengths must be"), "{e}");
    // Negative option values reach xent's own checks.
    for (flag, val, needle) in [
        ("--label-smoothing", "-0.1", "--label-smoothing"),
        ("--temperature", "-1", "temperature"),
        ("--z-loss", "-1e-4", "--z-loss"),
        ("--softcap", "-3", "softcap"),
    ] {
        let e = xent_error(&["eval", "--logits", &x, "--targets", &t, "--backend", "cpu", flag, val]);
        assert!(e.contains(needle) && !e.contains("unexpected argument"), "{flag}: {e}");
    }
    let e = xent_error(&["distill", "--student", &x, "--teacher", &x, "--temperature", "-2", "--backend", "cpu"]);
    assert!(e.contains("temperature"), "{e}");
    // A directory where a file belongs.
    let e = xent_error(&["eval", "--logits", &s(&d), "--targets", &t, "--backend", "cpu"]);
    assert!(e.contains("is a directory"), "{e}");
}

/// Runs `args` on every backend; each must fail with one line, the same on all, containing
/// every one of `needles`. Returns that line.
fn refused_alike(args: &[&str], needles: &[&str]) -> String {
    let mut first: Option<String> = None;
    for b in backends() {
        let mut with: Vec<&str> = args.to_vec();
        with.extend(["--backend", b]);
        let e = xent_error(&with);
        for n in needles {
            assert!(e.contains(n), "{b}: {e:?} lacks {n:?}");
        }
        match &first {
            None => first = Some(e),
            Some(f) => assert_eq!(&e, f, "{b} differs from cpu for {args:?}"),
        }
    }
    first.expect("the CPU ran")
}

/// Issue 26: probability targets, non-finite weights and mis-shaped masks and lengths are
/// refused by both backends with the same words, naming the flag, the file and the entry.
#[test]
fn both_backends_refuse_bad_values_in_the_users_words() {
    let d = scratch_dir("values");
    let (x, t) = problem(&d);
    // Probability targets: a negative entry in a later block, a NaN, an infinity.
    let p: Vec<f32> = (0..30).map(|i| if i % 5 == 0 { 0.6 } else { 0.1 }).collect();
    for (k, (at, bad, shown)) in
        [(27usize, -0.5f32, "-0.5"), (3, f32::NAN, "NaN"), (11, f32::INFINITY, "inf")].into_iter().enumerate()
    {
        let mut q = p.clone();
        q[at] = bad;
        let f = d.join(format!("p{k}.npy"));
        write_npy(&f, &[6, 5], &q);
        let e = refused_alike(
            &["eval", "--logits", &x, "--target-probs", &s(&f), "--block-rows", "2"],
            &["--target-probs", &s(&f), shown, &format!("row {}, column {}", at / 5, at % 5)],
        );
        assert!(e.contains("must be finite and >= 0"), "{e}");
    }
    // Rows that do not sum to 1 are accepted (as in PyTorch), with the same loss on both.
    let f = d.join("unnormalised.npy");
    write_npy(&f, &[6, 5], &p.iter().map(|q| q * 3.0).collect::<Vec<f32>>());
    let losses: Vec<f64> = backends()
        .into_iter()
        .map(|b| {
            number(&xent_json(&["eval", "--logits", &x, "--target-probs", &s(&f), "--json", "--backend", b])["loss"])
        })
        .collect();
    assert!(losses.iter().all(|l| (l - losses[0]).abs() <= 1e-5 * losses[0].abs()), "{losses:?}");

    // Non-finite class and sample weights, logits and hidden states alike.
    let (h, w) = (d.join("h.npy"), d.join("w.npy"));
    write_npy(&h, &[6, 3], &(0..18).map(|i| i as f32 * 0.1).collect::<Vec<f32>>());
    write_npy(&w, &[5, 3], &(0..15).map(|i| 0.2 - i as f32 * 0.05).collect::<Vec<f32>>());
    let (cw, sw) = (d.join("cw.npy"), d.join("sw.npy"));
    write_npy(&cw, &[5], &[1.0f32, 0.5, f32::NAN, 2.0, 1.0]);
    write_npy(&sw, &[6], &[1.0f32, 1.0, 1.0, 1.0, f32::NEG_INFINITY, 1.0]);
    for reduction in ["mean", "sum", "none"] {
        for input in [["--logits", x.as_str(), "", ""], ["--hidden", &s(&h), "--weight", &s(&w)]] {
            let mut base = vec!["eval", "--targets", &t, "--reduction", reduction];
            base.extend(input.iter().filter(|a| !a.is_empty()));
            let cwf = s(&cw);
            let mut a = base.clone();
            a.extend(["--class-weight", &cwf]);
            let e = refused_alike(&a, &[]);
            assert_eq!(e, format!("error: --class-weight {cwf} must be finite, got NaN at index 2"));
            let swf = s(&sw);
            let mut a = base.clone();
            a.extend(["--sample-weight", &swf]);
            let e = refused_alike(&a, &[]);
            assert_eq!(e, format!("error: --sample-weight {swf} must be finite, got -inf at index 4"));
            assert!(!e.contains("totals") && !e.contains("weight_sum"), "{e}");
        }
    }
    // BCE weights too.
    let (bx, by, pw) = (d.join("bx.npy"), d.join("by.npy"), d.join("pw.npy"));
    write_npy(&bx, &[2, 3], &[0.1f32, -0.2, 0.3, 0.0, 1.0, -1.0]);
    write_npy(&by, &[2, 3], &[1.0f32, 0.0, 1.0, 0.0, 0.5, 1.0]);
    write_npy(&pw, &[3], &[1.0f32, f32::INFINITY, 1.0]);
    let pwf = s(&pw);
    let e = refused_alike(&["bce", "--logits", &s(&bx), "--targets", &s(&by), "--pos-weight", &pwf], &[]);
    assert_eq!(e, format!("error: --pos-weight {pwf} must be finite, got inf at index 1"));

    // Perplexity: masks and lengths must match the batch's [B, T] exactly.
    let (px, pt) = (d.join("px.npy"), d.join("pt.npy"));
    write_npy(&px, &[8, 5], &(0..40).map(|i| (i % 7) as f32 * 0.2).collect::<Vec<f32>>());
    write_npy(&pt, &[2, 4], &[0i64, 1, 2, 3, 4, 0, 1, 2]);
    let (m_t, m_short, lens3) = (d.join("mt.npy"), d.join("ms.npy"), d.join("l3.npy"));
    write_npy(&m_t, &[4, 2], &[1u8; 8]);
    write_npy(&m_short, &[2, 3], &[1u8; 6]);
    write_npy(&lens3, &[4], &[2i64, 2, 2, 2]);
    let e = refused_alike(
        &["perplexity", "--logits", &s(&px), "--targets", &s(&pt), "--mask", &s(&m_t)],
        &["--mask", &s(&m_t), "[4, 2]", "[2, 4]"],
    );
    assert!(e.contains("shape mismatch"), "{e}");
    refused_alike(
        &["perplexity", "--logits", &s(&px), "--targets", &s(&pt), "--mask", &s(&m_short)],
        &["--mask", "[2, 3]", "[2, 4]"],
    );
    refused_alike(
        &["perplexity", "--logits", &s(&px), "--targets", &s(&pt), "--lengths", &s(&lens3)],
        &["--lengths", "[4]", "[2]"],
    );
    // Logits [B, T, V] fix the layout even when the targets are flat.
    let (px3, ptf) = (d.join("px3.npy"), d.join("ptf.npy"));
    write_npy(&px3, &[2, 4, 5], &(0..40).map(|i| (i % 7) as f32 * 0.2).collect::<Vec<f32>>());
    write_npy(&ptf, &[8], &[0i64, 1, 2, 3, 4, 0, 1, 2]);
    refused_alike(
        &["perplexity", "--logits", &s(&px3), "--targets", &s(&ptf), "--mask", &s(&m_t)],
        &["--mask", "[4, 2]", "[2, 4]"],
    );
    // The matching mask is accepted, and flat inputs still take [B, T] from the mask.
    let good = d.join("good.npy");
    write_npy(&good, &[2, 4], &[1u8, 1, 1, 0, 1, 1, 0, 0]);
    for b in backends() {
        xent_json(&[
            "perplexity",
            "--logits",
            &s(&px),
            "--targets",
            &s(&pt),
            "--mask",
            &s(&good),
            "--json",
            "--backend",
            b,
        ]);
        xent_json(&[
            "perplexity",
            "--logits",
            &s(&px),
            "--targets",
            &s(&ptf),
            "--mask",
            &s(&m_t),
            "--json",
            "--backend",
            b,
        ]);
    }
}
