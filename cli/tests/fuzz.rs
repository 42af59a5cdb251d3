//! Fuzz-style test of the file readers: thousands of random and mutated `.npy` and safetensors
//! files, read in-process (every one must give a value or a typed error: no panic, no abort),
//! and a few hundred through the binary (exit 0 or 1 with one error line, never a signal or a
//! panic). Seeded, so a failure reproduces.

mod support;

use std::path::Path;

use support::*;
use xent_cli::io::TensorFile;

fn npy(descr: &str, fortran: &str, shape: &str, data: &[u8]) -> Vec<u8> {
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': ({shape}), }}").into_bytes();
    while !(h.len() + 11).is_multiple_of(64) {
        h.push(b' ');
    }
    h.push(b'\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((h.len() as u16).to_le_bytes());
    b.extend(h);
    b.extend_from_slice(data);
    b
}

fn safetensors(entries: &[(&str, &str, &str, usize, usize)], data: &[u8]) -> Vec<u8> {
    let body: Vec<String> = entries
        .iter()
        .map(|(name, dtype, shape, a, b)| {
            format!("\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":[{shape}],\"data_offsets\":[{a},{b}]}}")
        })
        .collect();
    let mut h = format!("{{{}}}", body.join(",")).into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend_from_slice(data);
    out
}

/// A valid seed file of some kind.
fn seed_file(rng: &mut Rng) -> Vec<u8> {
    let n = 1 + rng.below(5);
    let v = 1 + rng.below(6);
    let data: Vec<u8> = (0..n * v * 8 + n * 8).map(|_| rng.next_u64() as u8).collect();
    match rng.below(8) {
        0 => npy("<f4", "False", &format!("{n}, {v}"), &data[..n * v * 4]),
        1 => npy("<f2", "True", &format!("{n}, {v}"), &data[..n * v * 2]),
        2 => npy("<i8", "False", &format!("{n},"), &data[..n * 8]),
        3 => npy("|u1", "False", &format!("{n}, {v}"), &data[..n * v]),
        4 => npy("<f8", "False", &format!("{n}, {v}"), &data[..n * v * 8]),
        5 => safetensors(&[("logits", "BF16", &format!("{n},{v}"), 0, n * v * 2)], &data[..n * v * 2]),
        6 => safetensors(
            &[
                ("a", "F32", &format!("{n},{v}"), 0, n * v * 4),
                ("b", "I64", &format!("{n}"), n * v * 4, n * v * 4 + n * 8),
            ],
            &data[..n * v * 4 + n * 8],
        ),
        _ => npy("<i4", "False", &format!("{n}"), &data[..n * 4]),
    }
}

const TOKENS: &[&str] = &[
    "'<f4'",
    "'>f4'",
    "'<c8'",
    "'|O'",
    "Maybe",
    "True",
    "None",
    "(-1,)",
    "(1e12, 1e12)",
    "(18446744073709551615, 2)",
    "()",
    "(0, 5)",
    "{",
    "}",
    "'",
    "\"F16\"",
    "\"BF16\"",
    "\"U64\"",
    "[99999999999,1]",
    "[0,18446744073709551615]",
    "\u{0}",
    "\\x00",
    ":",
    ",,",
];

/// Mutates `b`: flips, truncations, insertions, header token swaps, length-field damage.
fn mutate(rng: &mut Rng, mut b: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + rng.below(4) {
        match rng.below(7) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 => b.truncate(rng.below(b.len() + 1)),
            2 => {
                let i = rng.below(b.len() + 1);
                let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                b.splice(i..i, t.iter().copied());
            }
            3 if b.len() > 12 => {
                // Damage the header-length field (npy bytes 8..10 or 8..12, safetensors 0..8).
                let i = if b.starts_with(b"\x93NUMPY") { 8 + rng.below(2) } else { rng.below(8) };
                b[i] = rng.next_u64() as u8;
            }
            4 => {
                // Replace a header token by another.
                let (from, to) = (TOKENS[rng.below(TOKENS.len())], TOKENS[rng.below(TOKENS.len())]);
                let from = from.trim_matches('\'').as_bytes();
                if let Some(i) = b.windows(from.len().max(1)).position(|w| w == from) {
                    b.splice(i..i + from.len(), to.bytes());
                }
            }
            5 => b.extend((0..rng.below(64)).map(|_| rng.next_u64() as u8)),
            _ => {
                if b.len() > 2 {
                    let i = rng.below(b.len() - 1);
                    b.swap(i, i + 1);
                }
            }
        }
    }
    b
}

/// Opens and reads `path` every way the commands do.
fn read_every_way(path: &Path) -> Result<(), String> {
    let t = TensorFile::open(path, "fuzz").map_err(|e| e.to_string())?;
    let _ = t.read_f32("fuzz");
    let _ = t.read_ints("fuzz");
    let _ = t.read_f64("fuzz");
    let _ = t.want_rank(&[2], "fuzz");
    Ok(())
}

#[test]
fn ten_thousand_hostile_files_read_in_process() {
    let d = scratch_dir("fuzz");
    let path = d.join("f.npy");
    let mut rng = Rng(0xF022);
    let (mut ok, mut refused) = (0, 0);
    for i in 0..12_000 {
        let bytes = match i % 10 {
            0 => (0..rng.below(300)).map(|_| rng.next_u64() as u8).collect(),
            1 => seed_file(&mut rng),
            _ => {
                let s = seed_file(&mut rng);
                mutate(&mut rng, s)
            }
        };
        std::fs::write(&path, &bytes).unwrap();
        let r = std::panic::catch_unwind(|| read_every_way(&path));
        match r {
            Ok(Ok(())) => ok += 1,
            Ok(Err(msg)) => {
                assert!(!msg.is_empty() && !msg.contains('\n'), "{msg}");
                refused += 1;
            }
            Err(_) => panic!(
                "case {i} panicked on {} bytes: {:?}",
                bytes.len(),
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            ),
        }
    }
    assert!(ok > 1000 && refused > 3000, "ok {ok}, refused {refused}: the mutations must exercise both");
}

#[test]
fn hostile_files_through_the_binary() {
    let d = scratch_dir("fuzz-bin");
    let x = d.join("x.npy");
    let t = d.join("t.npy");
    write_npy(&t, &[3], &[0i64, 1, 2]);
    let mut rng = Rng(0xB1A);
    for _ in 0..150 {
        let good = npy("<f4", "False", "3, 4", &(0..48).map(|_| rng.next_u64() as u8 & 0x3f).collect::<Vec<u8>>());
        let bytes = mutate(&mut rng, good);
        std::fs::write(&x, &bytes).unwrap();
        let out = xent(&[
            "eval",
            "--backend",
            "cpu",
            "--logits",
            &x.display().to_string(),
            "--targets",
            &t.display().to_string(),
        ]);
        let code = out.status.code();
        assert!(matches!(code, Some(0) | Some(1)), "status {:?} on {:?}", out.status, String::from_utf8_lossy(&bytes));
        if code == Some(1) {
            let err = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = err.lines().filter(|l| !l.contains("XDG_RUNTIME_DIR")).collect();
            assert_eq!(lines.len(), 1, "{err}");
            assert!(lines[0].starts_with("error: ") && !err.contains("panicked"), "{err}");
        }
    }
}

/// Issue 26: seeded spoiled inputs through the binary on every backend, which must agree on
/// accepting or refusing each (exit status) and on the words (the error line, or the loss).
/// Kinds: probability targets with a negative, NaN or infinite entry or left unnormalised,
/// class or sample weights with a non-finite entry, and perplexity masks and lengths of a
/// shape other than the batch's.
#[test]
fn spoiled_values_get_the_same_answer_on_every_backend() {
    let backends: Vec<&str> = if gpu_ok() { vec!["cpu", "gpu"] } else { vec!["cpu"] };
    let d = scratch_dir("spoiled");
    let mut rng = Rng(0x5901);
    for case in 0..24 {
        let (b, t) = (1 + rng.below(3), 1 + rng.below(4));
        let (n, v) = (b * t, 2 + rng.below(40));
        let path = |name: &str| d.join(format!("{case}-{name}.npy")).display().to_string();
        let (x, y) = (path("x"), path("y"));
        let logits = rng.logits(n, v, 2.0);
        write_npy(&x, &[n, v], logits.as_slice().unwrap());
        let targets = rng.targets(n, v, 3);
        write_npy(&y, &[n], targets.as_slice().unwrap());
        let bad = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.5][rng.below(4)];
        let kind = rng.below(6);
        // Spoiled entries are refused; unnormalised rows and matching layouts are not.
        let mut must_refuse = matches!(kind, 0 | 2 | 3);
        let mut args: Vec<String> = ["eval", "--logits", &x, "--json"].iter().map(|s| s.to_string()).collect();
        match kind {
            0 | 1 => {
                let mut p: Vec<f32> = (0..n * v).map(|_| rng.uniform() as f32).collect();
                if kind == 0 {
                    p[rng.below(n * v)] = bad;
                }
                let f = path("p");
                write_npy(&f, &[n, v], &p);
                args.extend(["--target-probs".into(), f, "--block-rows".into(), (1 + rng.below(n)).to_string()]);
            }
            2 | 3 => {
                let (len, flag) = if kind == 2 { (v, "--class-weight") } else { (n, "--sample-weight") };
                let mut w: Vec<f32> = (0..len).map(|_| rng.uniform() as f32).collect();
                w[rng.below(len)] = if bad == -0.5 { f32::NAN } else { bad };
                let f = path("w");
                write_npy(&f, &[len], &w);
                args.extend(["--targets".into(), y.clone(), flag.into(), f]);
            }
            _ => {
                // A mask or lengths for [b, t], given with targets laid out as [b, t] or [t, b].
                let y2 = path("y2");
                let swapped = rng.below(2) == 0 && b != t;
                let (tb, tt) = if swapped { (t, b) } else { (b, t) };
                must_refuse = swapped;
                // Every token counts under the mask, so no target is the ignore index here.
                let every: Vec<i64> = (0..n).map(|_| rng.below(v) as i64).collect();
                write_npy(&y2, &[tb, tt], &every);
                args =
                    ["perplexity", "--logits", &x, "--targets", &y2, "--json"].iter().map(|s| s.to_string()).collect();
                let f = path("m");
                if kind == 4 {
                    write_npy(&f, &[b, t], &vec![1u8; n]);
                    args.extend(["--mask".into(), f]);
                } else {
                    write_npy(&f, &[b], &vec![t as i64; b]);
                    args.extend(["--lengths".into(), f]);
                }
            }
        }
        let mut seen: Option<std::result::Result<f64, String>> = None;
        for be in &backends {
            let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
            a.extend(["--backend", be]);
            let out = xent(&a);
            assert!(out.status.code().is_some_and(|c| c != 101), "{a:?}: {:?}", out.status);
            assert_eq!(!out.status.success(), must_refuse, "{a:?}: {}", String::from_utf8_lossy(&out.stderr));
            let said = if out.status.success() {
                let line = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_string();
                let json: serde_json::Value = serde_json::from_str(&line).unwrap();
                Ok(number(&json[if kind >= 4 { "corpus_nll" } else { "loss" }]))
            } else {
                let err: Vec<String> = String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .filter(|l| !l.contains("XDG_RUNTIME_DIR"))
                    .map(str::to_string)
                    .collect();
                assert_eq!(err.len(), 1, "{a:?}: {err:?}");
                Err(err[0].clone())
            };
            match (&seen, &said) {
                (None, _) => seen = Some(said),
                (Some(Ok(first)), Ok(loss)) => {
                    assert!((first - loss).abs() <= 1e-5 * first.abs().max(1.0), "{be}: {loss} vs {first}: {a:?}")
                }
                (Some(first), _) => assert_eq!(first, &said, "{be} differs from cpu: {a:?}"),
            }
        }
    }
}
