//! Distributed runs with 1, 2 and 3 ranks (threads sharing an in-process collective;
//! `scripts/test.sh` runs the MPI one under `mpirun`): vocabulary-parallel loss and gradients
//! equal one process doing the whole tensor for every option, data-parallel corpus evaluation
//! equals it bit for bit, and a failure on one rank stops every rank with its message.

use std::sync::{Arc, Barrier, Mutex};

use ndarray::{s, Array1, Array2};
use xent::cpu::reference;
use xent::parallel::VocabShard;
use xent::parallel::{agree, corpus::all_reduce_corpus, row_range, Collective, Merge, SingleProcess};
use xent::sequence::{CorpusEval, SeqMask};
use xent::*;

mod common;

/// Ranks as threads: each all-reduce gathers every rank's buffer behind a barrier, and every
/// rank merges them in rank order.
struct Threads {
    rank: usize,
    size: usize,
    slots: Arc<Mutex<Vec<Vec<f64>>>>,
    barrier: Arc<Barrier>,
}

impl Threads {
    fn group(size: usize) -> Vec<Threads> {
        let slots = Arc::new(Mutex::new(vec![Vec::new(); size]));
        let barrier = Arc::new(Barrier::new(size));
        (0..size).map(|rank| Threads { rank, size, slots: slots.clone(), barrier: barrier.clone() }).collect()
    }

    fn reduce(&self, data: &mut [f64], f: &dyn Fn(&[f64], &mut [f64])) {
        self.slots.lock().unwrap()[self.rank] = data.to_vec();
        self.barrier.wait();
        let all = self.slots.lock().unwrap().clone();
        data.copy_from_slice(&all[0]);
        for other in &all[1..] {
            f(other, data);
        }
        self.barrier.wait();
    }
}

impl Collective for Threads {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, data: &mut [f64]) -> Result<()> {
        self.reduce(data, &|x, acc| acc.iter_mut().zip(x).for_each(|(a, b)| *a += b));
        Ok(())
    }
    fn all_reduce_max(&self, data: &mut [f64]) -> Result<()> {
        self.reduce(data, &|x, acc| acc.iter_mut().zip(x).for_each(|(a, b)| *a = a.max(*b)));
        Ok(())
    }
    fn all_reduce_with(&self, data: &mut [f64], width: usize, merge: Merge) -> Result<()> {
        self.reduce(data, &|x, acc| x.chunks(width).zip(acc.chunks_mut(width)).for_each(|(a, b)| merge(a, b)));
        Ok(())
    }
}

/// Which backend computes each rank's shard.
#[derive(Clone, Copy, Debug)]
enum On {
    Cpu,
    #[cfg(feature = "gpu")]
    Gpu(&'static GpuContext),
}

/// Runs the shards of `x` on `ranks` threads; returns (loss of each rank, the gradient
/// assembled from the shards).
fn run_on(
    on: On,
    x: &Array2<f32>,
    t: &Array1<i64>,
    cfg: &CrossEntropy,
    ranks: usize,
    dtype: DType,
) -> (Vec<f64>, Array2<f32>) {
    let v = x.ncols();
    let results: Vec<(f64, usize, Array2<f32>)> = std::thread::scope(|sc| {
        let handles: Vec<_> = Threads::group(ranks)
            .into_iter()
            .map(|comm| {
                sc.spawn(move || {
                    let cols = row_range(v, comm.rank(), comm.size());
                    let shard = Tensor2::from_f32(x.slice(s![.., cols.clone()]).to_owned(), dtype);
                    let mut g = Array2::<f32>::zeros((x.nrows(), cols.len()));
                    let sh = VocabShard { class0: cols.start, classes: v };
                    let o = match on {
                        On::Cpu => Cpu::with_threads(1).unwrap().cross_entropy_vocab_parallel(
                            shard.view(),
                            t.view(),
                            sh,
                            cfg,
                            &comm,
                            Some((&mut g).into()),
                        ),
                        #[cfg(feature = "gpu")]
                        On::Gpu(gpu) => gpu.cross_entropy_vocab_parallel(
                            shard.view(),
                            t.view(),
                            sh,
                            cfg,
                            &comm,
                            Some((&mut g).into()),
                        ),
                    };
                    (o.unwrap().loss, cols.start, g)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut grad = Array2::<f32>::zeros(x.dim());
    for (_, c0, g) in &results {
        grad.slice_mut(s![.., *c0..*c0 + g.ncols()]).assign(g);
    }
    (results.iter().map(|r| r.0).collect(), grad)
}

fn backends() -> Vec<On> {
    #[allow(unused_mut)]
    let mut v = vec![On::Cpu];
    #[cfg(feature = "gpu")]
    {
        // Whole rows, and rows split into segments (several records per row and rank).
        v.extend(common::gpu().map(On::Gpu));
        v.extend(common::gpu_segments().map(On::Gpu));
    }
    v
}

#[test]
fn shards_equal_one_process_for_every_option() {
    let (n, v) = (29, 301);
    let (mut x, mut t) = workload::synthetic(n, v, 3.0, 5, 17);
    x[[0, 7]] = 60.0; // a confident row
    t[0] = 7;
    let cw = Array1::from_shape_fn(v, |c| 0.5 + (c % 7) as f32 * 0.2);
    let sw = Array1::from_shape_fn(n, |i| 0.5 + (i % 3) as f32);
    for on in backends() {
        // The CPU shards compute in f64; the GPU in f32.
        let (tol_l, tol_g) = if matches!(on, On::Cpu) { (2e-6, 1e-7) } else { (2e-5, 2e-6) };
        for cfg in [
            CrossEntropy::default(),
            CrossEntropy::default().with_class_weight(cw.clone()).with_sample_weight(sw.clone()),
            CrossEntropy::default().with_label_smoothing(0.1).with_class_weight(cw.clone()).with_z_loss(1e-3),
            CrossEntropy::default()
                .with_reduction(Reduction::Sum)
                .with_softcap(6.0)
                .with_temperature(1.3)
                .with_label_smoothing(0.2),
        ] {
            for dtype in [DType::F32, DType::BF16] {
                // The reference sees the logits as the shards hold them.
                let xr = Tensor2::from_f32(x.clone(), dtype).to_f32();
                let r = reference::cross_entropy(&xr, &t, &cfg).unwrap();
                for ranks in [1, 2, 3] {
                    let (losses, g) = run_on(on, &xr, &t, &cfg, ranks, dtype);
                    for l in &losses {
                        assert!(
                            (l - r.loss).abs() <= tol_l * r.loss.abs().max(1.0),
                            "{on:?} {dtype:?} {ranks} ranks {cfg:?}: {l} vs {}",
                            r.loss
                        );
                    }
                    assert!(losses.iter().all(|l| l.to_bits() == losses[0].to_bits()), "every rank gets the same loss");
                    let worst = g.iter().zip(r.grad.iter()).fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
                    assert!(worst < tol_g, "{on:?} {dtype:?} {ranks} ranks {cfg:?}: gradient off by {worst}");
                }
            }
        }
    }
}

#[test]
fn ignored_rows_and_bad_shards() {
    let (x, _) = workload::synthetic(4, 10, 1.0, 0, 1);
    let t = ndarray::array![-100i64, -100, -100, -100];
    let o = Cpu::new()
        .cross_entropy_vocab_parallel(
            &x,
            t.view(),
            VocabShard { class0: 0, classes: 10 },
            &CrossEntropy::default(),
            &SingleProcess,
            None,
        )
        .unwrap();
    assert!(o.loss.is_nan(), "an all-ignored mean is NaN");
    let bad = VocabShard { class0: 5, classes: 10 };
    assert!(Cpu::new()
        .cross_entropy_vocab_parallel(&x, t.view(), bad, &CrossEntropy::default(), &SingleProcess, None)
        .is_err());
    let out_of_range = ndarray::array![0i64, 1, 10, 2];
    let sh = VocabShard { class0: 0, classes: 10 };
    assert!(matches!(
        Cpu::new().cross_entropy_vocab_parallel(
            &x,
            out_of_range.view(),
            sh,
            &CrossEntropy::default(),
            &SingleProcess,
            None
        ),
        Err(XentError::TargetOutOfRange { .. })
    ));
}

/// Runs `f(comm)` on `ranks` threads, results in rank order.
fn on_ranks<T: Send>(ranks: usize, f: impl Fn(&Threads) -> T + Sync) -> Vec<T> {
    std::thread::scope(|sc| {
        let f = &f;
        let handles: Vec<_> = Threads::group(ranks).into_iter().map(|c| sc.spawn(move || f(&c))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn corpus_split_by_sequences_equals_one_process_bit_for_bit() {
    let (b, tl, v) = (7, 5, 50);
    let (x, t) = workload::synthetic(b * tl, v, 2.0, 0, 9);
    let lengths = Array1::from_shape_fn(b, |s| ((s * 3) % (tl + 1)) as i64);
    let cpu = Cpu::with_threads(1).unwrap();
    let mut whole = CorpusEval::default();
    whole.add_batch(&cpu, &x, t.view(), tl, SeqMask::Lengths(lengths.view())).unwrap();
    for ranks in [1, 2, 3] {
        let merged = on_ranks(ranks, |comm| {
            let seqs = row_range(b, comm.rank(), comm.size());
            let rows = seqs.start * tl..seqs.end * tl;
            let mut acc = CorpusEval::default();
            // Each rank in batches of one sequence: the split does not change the bits.
            for s in seqs.clone() {
                let r = s * tl..(s + 1) * tl;
                acc.add_batch(
                    &cpu,
                    x.slice(s![r.clone(), ..]),
                    t.slice(s![r]),
                    tl,
                    SeqMask::Lengths(lengths.slice(s![s..s + 1])),
                )
                .unwrap();
            }
            assert_eq!(rows.len(), acc.sequences.len() * tl);
            all_reduce_corpus(comm, Ok(acc), seqs.start, b).unwrap()
        });
        for m in &merged {
            assert_eq!(m, &whole, "{ranks} ranks");
            let (a, w) = (m.finish(), whole.finish());
            assert_eq!(a.corpus_ppl.to_bits(), w.corpus_ppl.to_bits());
        }
    }
}

#[test]
fn a_failing_rank_stops_every_rank_with_its_message() {
    // Rank 1 fails before the collective; the others must get its message, not wait.
    let out = on_ranks(3, |comm| {
        let local: Result<u32> =
            if comm.rank() == 1 { Err(XentError::Shape("rank one's file is short".into())) } else { Ok(7) };
        agree(comm, local)
    });
    assert!(matches!(&out[1], Err(XentError::Shape(m)) if m.contains("short")));
    for r in [0, 2] {
        match &out[r] {
            Err(XentError::Remote { rank: 1, message }) => {
                assert!(message.contains("rank one's file is short"), "{message}")
            }
            other => panic!("rank {r}: {other:?}"),
        }
    }
    // The same through the vocabulary-parallel call: rank 2's gradient has the wrong shape.
    let (x, t) = workload::synthetic(6, 12, 1.0, 0, 2);
    let out = on_ranks(3, |comm| {
        let cols = row_range(12, comm.rank(), 3);
        let shard = x.slice(s![.., cols.clone()]).to_owned();
        let mut g = Array2::<f32>::zeros((6, if comm.rank() == 2 { 1 } else { cols.len() }));
        let sh = VocabShard { class0: cols.start, classes: 12 };
        Cpu::with_threads(1)
            .unwrap()
            .cross_entropy_vocab_parallel(&shard, t.view(), sh, &CrossEntropy::default(), comm, Some((&mut g).into()))
            .map(|o| o.loss)
    });
    assert!(matches!(out[2], Err(XentError::Shape(_))));
    assert!(
        matches!(out[0], Err(XentError::Remote { rank: 2, .. }))
            && matches!(out[1], Err(XentError::Remote { rank: 2, .. }))
    );
    // No failure: every rank goes on.
    assert!(on_ranks(2, |comm| agree(comm, Ok(1))).iter().all(|r| r.is_ok()));
}

/// Hidden states, weight, bias, targets, class and sample weights.
type LinearLayer = (Array2<f32>, Array2<f32>, Array1<f32>, Array1<i64>, Array1<f32>, Array1<f32>);

/// The inputs of the sharded linear layer tests: hidden states, weight, bias, targets (every
/// sixth row ignored), class and sample weights.
fn linear_layer((n, d, v): (usize, usize, usize)) -> LinearLayer {
    let (h, mut t) = workload::synthetic(n, d, 1.0, 0, 3);
    let (w, _) = workload::synthetic(v, d, 0.5, 0, 4);
    for (i, y) in t.iter_mut().enumerate() {
        *y = if i % 6 == 5 { -100 } else { ((i * 29) % v) as i64 };
    }
    let bias = Array1::from_shape_fn(v, |c| (c % 5) as f32 * 0.1 - 0.2);
    let cw = Array1::from_shape_fn(v, |c| 0.5 + (c % 7) as f32 * 0.2);
    let sw = Array1::from_shape_fn(n, |r| 0.25 + (r % 4) as f32 * 0.5);
    (h, w, bias, t, cw, sw)
}

/// Runs `shard(on, comm, rows of the vocabulary)` on 1, 2 and 3 ranks of every backend and
/// checks each rank's loss, per-row losses and gradients against one process's `whole` (the
/// shards' `grad_weight` and `grad_bias` assembled).
fn sharded_equal_whole(
    whole: &LinearCeOutput,
    (d, v): (usize, usize),
    shard: impl Fn(On, &Threads, std::ops::Range<usize>) -> Result<LinearCeOutput> + Sync,
) {
    let whole_gw = whole.grad_weight.as_ref().unwrap().to_f32();
    let whole_gh = whole.grad_hidden.as_ref().unwrap().to_f32();
    for (on, ranks) in backends().into_iter().flat_map(|on| [1, 2, 3].map(|r| (on, r))) {
        // The GPU's products and statistics are f32 throughout.
        let tol = if matches!(on, On::Cpu) { 2e-6 } else { 2e-5 };
        let outs = on_ranks(ranks, |comm| {
            let rows = row_range(v, comm.rank(), comm.size());
            (rows.start, shard(on, comm, rows).unwrap())
        });
        let mut gw = Array2::<f32>::zeros((v, d));
        let mut gb = Array1::<f32>::zeros(v);
        for (c0, o) in &outs {
            let (l, want) = (o.loss, whole.loss);
            assert!((l - want).abs() <= 1e-5 * want.abs().max(1.0), "{on:?} {ranks} ranks: {l} vs {want}");
            let gh = o.grad_hidden.as_ref().unwrap().to_f32();
            let worst = gh.iter().zip(whole_gh.iter()).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst < tol, "{on:?} {ranks} ranks: grad_hidden off by {worst}");
            let g = o.grad_weight.as_ref().unwrap().to_f32();
            gw.slice_mut(s![*c0..*c0 + g.nrows(), ..]).assign(&g);
            let b = o.grad_bias.as_ref().unwrap();
            gb.slice_mut(s![*c0..*c0 + b.len()]).assign(b);
            if let (Some(a), Some(b)) = (&o.row_loss, &whole.row_loss) {
                let worst = a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(worst < 1e-5, "{on:?}: row losses off by {worst}");
            }
        }
        let worst = gw.iter().zip(whole_gw.iter()).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst < tol, "{on:?} {ranks} ranks: grad_weight off by {worst}");
        let worst = gb.iter().zip(whole.grad_bias.as_ref().unwrap()).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst < tol, "{on:?} {ranks} ranks: grad_bias off by {worst}");
    }
}

#[test]
fn sharded_linear_layer_equals_one_process() {
    let (n, d, v) = (37, 24, 203);
    let (h, w, bias, t, cw, sw) = linear_layer((n, d, v));
    let cpu = Cpu::with_threads(2).unwrap();
    for ce in [
        CrossEntropy::default(),
        CrossEntropy::default().with_label_smoothing(0.1).with_class_weight(cw).with_z_loss(1e-3),
        CrossEntropy::default().with_reduction(Reduction::Sum).with_softcap(5.0).with_per_row(true),
        // Each chunk's sample weights (one device plan serves every chunk of a size).
        CrossEntropy::default().with_sample_weight(sw).with_label_smoothing(0.05),
    ] {
        // Small workspaces: several row chunks per pass.
        let cfg = LinearCe::default().with_ce(ce).with_workspace_bytes(8 * 60 * 4);
        let whole = cpu.linear_cross_entropy(&h, &w, Some(bias.view()), t.view(), &cfg).unwrap();
        sharded_equal_whole(&whole, (d, v), |on, comm, rows| {
            let ws = w.slice(s![rows.clone(), ..]).to_owned();
            let bs = bias.slice(s![rows.clone()]).to_owned();
            let sh = VocabShard { class0: rows.start, classes: v };
            match on {
                On::Cpu => cpu.linear_cross_entropy_vocab_parallel(&h, &ws, Some(bs.view()), t.view(), sh, &cfg, comm),
                #[cfg(feature = "gpu")]
                On::Gpu(g) => g.linear_cross_entropy_vocab_parallel(&h, &ws, Some(bs.view()), t.view(), sh, &cfg, comm),
            }
        });
    }
}

/// With reduction `none` and a per-row upstream gradient (mixed signs, zeros; z-loss, which
/// sample weights do not scale): the shards' gradients of `sum_n u_n loss_n` equal one
/// process's.
#[test]
fn sharded_linear_layer_with_upstream_equals_one_process() {
    let (n, d, v) = (37, 24, 203);
    let (h, w, bias, t, cw, sw) = linear_layer((n, d, v));
    let u = Array1::from_shape_fn(n, |r| [1.5f32, -0.75, 0.0, 0.25][r % 4]);
    let cpu = Cpu::with_threads(2).unwrap();
    let none = CrossEntropy::default().with_reduction(Reduction::None);
    for ce in [
        none.clone().with_label_smoothing(0.1).with_class_weight(cw).with_sample_weight(sw).with_z_loss(0.05),
        none.with_softcap(5.0).with_temperature(1.3).with_z_loss(1e-3).with_grad_scale(2.0),
    ] {
        let cfg = LinearCe::default().with_ce(ce).with_workspace_bytes(8 * 60 * 4);
        let whole =
            cpu.linear_cross_entropy_with_upstream(&h, &w, Some(bias.view()), t.view(), u.view(), &cfg).unwrap();
        sharded_equal_whole(&whole, (d, v), |on, comm, rows| {
            let ws = w.slice(s![rows.clone(), ..]).to_owned();
            let bs = bias.slice(s![rows.clone()]).to_owned();
            let sh = VocabShard { class0: rows.start, classes: v };
            let (b, t, u) = (Some(bs.view()), t.view(), u.view());
            match on {
                On::Cpu => cpu.linear_cross_entropy_vocab_parallel_with_upstream(&h, &ws, b, t, u, sh, &cfg, comm),
                #[cfg(feature = "gpu")]
                On::Gpu(g) => g.linear_cross_entropy_vocab_parallel_with_upstream(&h, &ws, b, t, u, sh, &cfg, comm),
            }
        });
    }
}

/// Vocabulary-parallel log-probs and entropies on 1, 2 and 3 ranks (and an empty shard) of
/// every backend equal one process's, with and without an upstream gradient.
#[test]
fn sharded_logprobs_equal_one_process() {
    let (n, d, v) = (37, 24, 203);
    let (h, w, bias, t, _, _) = linear_layer((n, d, v));
    let (a, b) =
        (Array1::from_shape_fn(n, |r| [1.0f32, -0.5, 0.0, 2.0][r % 4]), Array1::from_shape_fn(n, |r| 0.01 * r as f32));
    let cpu = Cpu::with_threads(2).unwrap();
    let cfg = LinearLogprobs::default().with_temperature(0.7).with_workspace_bytes(Some(8 * 60 * 4));
    for up in [None, Some((a.view(), b.view()))] {
        let whole = cpu.linear_logprobs(&h, &w, Some(bias.view()), t.view(), &cfg, up).unwrap();
        // 1, 2, 3 ranks, and 2 ranks of which the second holds no classes.
        let cuts = [&[0, v][..], &[0, 90, v], &[0, 70, 140, v], &[0, v, v]];
        for (on, cuts) in backends().into_iter().flat_map(|on| cuts.map(|c| (on, c))) {
            let shards: Vec<_> = cuts.windows(2).map(|c| c[0]..c[1]).collect();
            // The GPU's records and sums are f32.
            let tol = if matches!(on, On::Cpu) { 2e-6 } else { 2e-5 };
            let outs = on_ranks(shards.len(), |comm| {
                let rows = shards[comm.rank()].clone();
                let (ws, bs) = (w.slice(s![rows.clone(), ..]).to_owned(), bias.slice(s![rows.clone()]).to_owned());
                let sh = VocabShard { class0: rows.start, classes: v };
                let (b, t) = (Some(bs.view()), t.view());
                match on {
                    On::Cpu => cpu.linear_logprobs_vocab_parallel(&h, &ws, b, t, sh, &cfg, up, comm),
                    #[cfg(feature = "gpu")]
                    On::Gpu(g) => g.linear_logprobs_vocab_parallel(&h, &ws, b, t, sh, &cfg, up, comm),
                }
                .unwrap()
            });
            let what = format!("{on:?} {} ranks, upstream {}", shards.len(), up.is_some());
            let diff =
                |x: &Array1<f32>, y: &Array1<f32>| x.iter().zip(y).fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
            let mut gw = Array2::<f32>::zeros((v, d));
            let mut gb = Array1::<f32>::zeros(v);
            for (rows, o) in shards.iter().zip(&outs) {
                assert!(diff(&o.logprob, &whole.logprob) < 5.0 * tol, "{what}: logprob");
                assert!(diff(&o.entropy, &whole.entropy) < 5.0 * tol, "{what}: entropy");
                assert_eq!(o.counted, whole.counted, "{what}");
                assert_eq!(o.grad_hidden.is_some(), up.is_some(), "{what}: gradients only with an upstream one");
                if let (Some(g), Some(want)) = (&o.grad_hidden, &whole.grad_hidden) {
                    let worst =
                        g.to_f32().iter().zip(want.to_f32().iter()).fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
                    assert!(worst < tol, "{what}: grad_hidden off by {worst}");
                    gw.slice_mut(s![rows.clone(), ..]).assign(&o.grad_weight.as_ref().unwrap().to_f32());
                    gb.slice_mut(s![rows.clone()]).assign(o.grad_bias.as_ref().unwrap());
                }
            }
            if let (Some(want_w), Some(want_b)) = (&whole.grad_weight, &whole.grad_bias) {
                let worst = gw.iter().zip(want_w.to_f32().iter()).fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
                assert!(worst < tol, "{what}: grad_weight off by {worst}");
                assert!(diff(&gb, want_b) < tol, "{what}: grad_bias");
            }
        }
    }
    // A shard past the vocabulary, a target outside it: the same typed errors on every backend.
    let mut bad = t.clone();
    bad[0] = v as i64;
    let cases = [(VocabShard { class0: 10, classes: v }, &t), (VocabShard { class0: 0, classes: v }, &bad)];
    for (on, (sh, t)) in backends().into_iter().flat_map(|on| cases.map(|c| (on, c))) {
        let e = match on {
            On::Cpu => cpu.linear_logprobs_vocab_parallel(&h, &w, None, t.view(), sh, &cfg, None, &SingleProcess),
            #[cfg(feature = "gpu")]
            On::Gpu(g) => g.linear_logprobs_vocab_parallel(&h, &w, None, t.view(), sh, &cfg, None, &SingleProcess),
        }
        .unwrap_err();
        let ok = if sh.class0 == 10 {
            matches!(e, XentError::Shape(_))
        } else {
            matches!(e, XentError::TargetOutOfRange { row: 0, .. })
        };
        assert!(ok, "{on:?}: {e:?}");
    }
}
