//! `xent score`: per-token log-probs and entropies from hidden states against an f64 reference
//! on each backend, in row blocks; a file far larger than a block in bounded memory; bad input
//! as one error line.

mod support;

use ndarray::{Array1, Array2};
use support::*;

/// f64 log-probs of `t` and entropies of `softmax((h w^T + b) / temp)`; 0 for ignored rows.
fn reference(h: &Array2<f32>, w: &Array2<f32>, b: &Array1<f32>, t: &[i64], temp: f64) -> (Vec<f64>, Vec<f64>) {
    let (h, w) = (h.mapv(f64::from), w.mapv(f64::from));
    let z = (h.dot(&w.t()) + &b.mapv(f64::from)) / temp;
    let mut lp = vec![0.0; t.len()];
    let mut ent = vec![0.0; t.len()];
    for (r, row) in z.rows().into_iter().enumerate() {
        if t[r] == -100 {
            continue;
        }
        let m = row.fold(f64::NEG_INFINITY, |a, &x| a.max(x));
        let lse = m + row.iter().map(|&x| (x - m).exp()).sum::<f64>().ln();
        lp[r] = row[t[r] as usize] - lse;
        ent[r] = -row.iter().map(|&x| (x - lse).exp() * (x - lse)).sum::<f64>();
    }
    (lp, ent)
}

#[test]
fn score_matches_the_f64_reference_on_each_backend() {
    let dir = scratch_dir("score");
    let (n, d, v) = (37, 24, 301);
    let mut rng = Rng(7);
    let h = rng.logits(n, d, 1.0);
    let w = rng.logits(v, d, 2.0 / (d as f64).sqrt());
    let b = Array1::from_shape_fn(v, |c| ((c % 7) as f32 - 3.0) * 0.1);
    let t = rng.targets(n, v, 5);
    let p = |name: &str| dir.join(name).display().to_string();
    write_npy(p("h.npy"), &[n, d], h.as_slice().unwrap());
    write_npy(p("w.npy"), &[v, d], w.as_slice().unwrap());
    write_npy(p("b.npy"), &[v], b.as_slice().unwrap());
    write_npy(p("t.npy"), &[n], t.as_slice().unwrap());
    let temp = 0.7;
    let (lp, ent) = reference(&h, &w, &b, t.as_slice().unwrap(), temp);
    let counted = t.iter().filter(|&&y| y != -100).count();
    let mut backends = vec!["cpu"];
    if gpu_ok() {
        backends.push("gpu");
    } else {
        println!("gpu skipped: no GPU adapter (XENT_REQUIRE_GPU makes that a failure)");
    }
    for backend in backends {
        let (lp_out, ent_out) = (p(&format!("lp-{backend}.npy")), p(&format!("ent-{backend}.npy")));
        #[rustfmt::skip]
        let j = xent_json(&[
            "score", "--hidden", &p("h.npy"), "--weight", &p("w.npy"), "--bias", &p("b.npy"),
            "--targets", &p("t.npy"), "--temperature", "0.7", "--block-rows", "5",
            "--logprobs-out", &lp_out, "--entropy-out", &ent_out, "--backend", backend, "--json",
        ]);
        assert_eq!(j["backend"], backend);
        assert_eq!(j["rows"], n);
        assert_eq!(j["counted"], counted as u64);
        let (got_lp, got_ent) = (read_1d(&lp_out), read_1d(&ent_out));
        for r in 0..n {
            // f32 logits of magnitude ~5 and sums over 301 classes: 2e-5 absolute.
            assert!(
                (got_lp[r] - lp[r]).abs() <= 2e-5 * (1.0 + lp[r].abs()),
                "{backend} row {r}: logprob {} vs {}",
                got_lp[r],
                lp[r]
            );
            assert!(
                (got_ent[r] - ent[r]).abs() <= 2e-5 * (1.0 + ent[r]),
                "{backend} row {r}: entropy {} vs {}",
                got_ent[r],
                ent[r]
            );
            if t[r] == -100 {
                assert_eq!((got_lp[r], got_ent[r]), (0.0, 0.0), "{backend}: ignored row {r}");
            }
        }
        let mean_lp = lp.iter().sum::<f64>() / counted as f64;
        let mean_ent = ent.iter().sum::<f64>() / counted as f64;
        assert!((number(&j["mean_logprob"]) - mean_lp).abs() <= 1e-5 * (1.0 + mean_lp.abs()), "{j}");
        assert!((number(&j["mean_entropy"]) - mean_ent).abs() <= 1e-5 * (1.0 + mean_ent), "{j}");
        assert!((number(&j["perplexity"]) - (-mean_lp).exp()).abs() <= 1e-4 * (-mean_lp).exp(), "{j}");
    }
}

/// A 128 MiB hidden-state file scored in blocks of 2048 rows (2 MiB): the process's peak
/// resident memory stays under half the file (it would exceed the file were it read whole).
#[test]
fn score_streams_a_large_file_in_bounded_memory() {
    let dir = scratch_dir("score-large");
    let (n, d, v) = (131_072, 256, 8);
    let h: Vec<f32> = (0..n * d).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3).collect();
    let w: Vec<f32> = (0..v * d).map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.01).collect();
    let t: Vec<i64> = (0..n).map(|r| if r % 9 == 0 { -100 } else { (r % v) as i64 }).collect();
    let p = |name: &str| dir.join(name).display().to_string();
    write_npy(p("h.npy"), &[n, d], &h);
    drop(h);
    write_npy(p("w.npy"), &[v, d], &w);
    write_npy(p("t.npy"), &[n], &t);
    #[rustfmt::skip]
    let j = xent_json(&[
        "score", "--hidden", &p("h.npy"), "--weight", &p("w.npy"), "--targets", &p("t.npy"),
        "--block-rows", "2048", "--backend", "cpu", "--json",
    ]);
    assert_eq!(j["rows"], n);
    assert_eq!(j["counted"], t.iter().filter(|&&y| y != -100).count() as u64);
    let file = (n * d * 4) as f64;
    let peak = number(&j["peak_rss_bytes"]);
    println!("peak RSS {:.1} MiB scoring a {:.0} MiB file", peak / (1 << 20) as f64, file / (1 << 20) as f64);
    if peak > 0.0 {
        assert!(peak < file / 2.0, "peak RSS {peak} bytes for a {file}-byte file");
    } else {
        println!("peak RSS unknown on this OS: the bound is not checked");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_is_one_error_line() {
    let dir = scratch_dir("score-bad");
    let (n, d, v) = (6, 4, 5);
    let p = |name: &str| dir.join(name).display().to_string();
    write_npy(p("h.npy"), &[n, d], &vec![0.5f32; n * d]);
    write_npy(p("w.npy"), &[v, d], &vec![0.1f32; v * d]);
    write_npy(p("w3.npy"), &[v, 3], &vec![0.1f32; v * 3]);
    write_npy(p("t.npy"), &[n], &[0i64, 1, 2, 3, 4, 0]);
    write_npy(p("t_bad.npy"), &[n], &[0i64, 1, 9, 3, 4, 0]);
    let base = |t: &str, w: &str| {
        ["score", "--hidden", &p("h.npy"), "--weight", &p(w), "--targets", &p(t), "--backend", "cpu"]
            .map(String::from)
            .to_vec()
    };
    let run = |args: Vec<String>| xent_error(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let e = run(base("t_bad.npy", "w.npy"));
    assert!(e.contains("row 2") && e.contains('9'), "{e}");
    let e = run(base("t.npy", "w3.npy"));
    assert!(e.contains("[6, 4]") && e.contains("[5, 3]"), "{e}");
    let e = run([base("t.npy", "w.npy"), vec!["--temperature".into(), "0".into()]].concat());
    assert!(e.contains("temperature"), "{e}");
    let e = run([base("t.npy", "w.npy"), vec!["--logprobs-out".into(), p("h.npy")]].concat());
    assert!(e.contains("--logprobs-out") && e.contains("input"), "{e}");
    assert_eq!(read_2d(p("h.npy")).dim(), (n, d), "the input is untouched");
}
