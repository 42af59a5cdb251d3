//! Data-parallel corpus evaluation: each rank scores a contiguous range of whole sequences
//! into its own [`CorpusEval`]; one all-reduce merges them. The NLL sums travel as the words
//! of their [`ExactSum`] (bit patterns carried in f64 slots, merged as integers), so the merged
//! report is bit for bit that of one process scoring everything.

use super::{agree, Collective};
use crate::error::{Result, XentError};
use crate::sequence::{CorpusEval, ExactSum, SeqTotals};

/// Words of an [`ExactSum`].
const SUM_WORDS: usize = 10;
/// Record: NLL sum words, tokens, top-1 hits, top-5 hits (all u64 bit patterns).
const WIDTH: usize = SUM_WORDS + 3;

fn words(r: &[f64]) -> [u64; SUM_WORDS] {
    std::array::from_fn(|i| r[i].to_bits())
}

/// Integer merge of two records (the all-reduce's operation).
fn merge(x: &[f64], acc: &mut [f64]) {
    let mut s = ExactSum::from_words(&words(acc));
    s.merge(&ExactSum::from_words(&words(x)));
    for (a, w) in acc.iter_mut().zip(s.to_words()) {
        *a = f64::from_bits(w);
    }
    for k in SUM_WORDS..WIDTH {
        acc[k] = f64::from_bits(acc[k].to_bits().wrapping_add(x[k].to_bits()));
    }
}

fn record(r: &mut [f64], nll: &ExactSum, counts: [u64; 3]) {
    for (a, w) in r.iter_mut().zip(nll.to_words()) {
        *a = f64::from_bits(w);
    }
    for (a, c) in r[SUM_WORDS..].iter_mut().zip(counts) {
        *a = f64::from_bits(c);
    }
}

/// Merges the ranks' accumulators: `local` holds this rank's sequences
/// `first_sequence .. first_sequence + local.sequences.len()` of `sequences` in all (ranges
/// that do not overlap). Every rank gets the whole corpus's accumulator, sequences in corpus
/// order. A rank whose `local` is an error passes it in; then every rank gets an error (see
/// [`agree`]) and none is left waiting.
///
/// ```
/// use xent::parallel::{corpus::all_reduce_corpus, SingleProcess};
/// use xent::sequence::CorpusEval;
/// let merged = all_reduce_corpus(&SingleProcess, Ok(CorpusEval::default()), 0, 0)?;
/// assert_eq!(merged.tokens, 0);
/// # Ok::<(), xent::XentError>(())
/// ```
pub fn all_reduce_corpus(
    comm: &dyn Collective,
    local: Result<CorpusEval>,
    first_sequence: usize,
    sequences: usize,
) -> Result<CorpusEval> {
    let local = local.and_then(|l| {
        if first_sequence + l.sequences.len() > sequences {
            return Err(XentError::Shape(format!(
                "sequences {first_sequence}..{} pass the corpus's {sequences}",
                first_sequence + l.sequences.len()
            )));
        }
        Ok(l)
    });
    let local = agree(comm, local)?;
    if comm.size() == 1 && first_sequence == 0 && local.sequences.len() == sequences {
        return Ok(local);
    }
    // One record per sequence, then the corpus totals.
    let mut data = vec![0f64; (sequences + 1) * WIDTH];
    for (k, s) in local.sequences.iter().enumerate() {
        let i = first_sequence + k;
        record(&mut data[i * WIDTH..(i + 1) * WIDTH], &s.nll, [s.tokens, 0, 0]);
    }
    record(&mut data[sequences * WIDTH..], &local.nll, [local.tokens, local.top1, local.top5]);
    comm.all_reduce_with(&mut data, WIDTH, merge)?;
    let unpack =
        |r: &[f64]| (ExactSum::from_words(&words(r)), r[SUM_WORDS..].iter().map(|w| w.to_bits()).collect::<Vec<_>>());
    let (nll, c) = unpack(&data[sequences * WIDTH..]);
    Ok(CorpusEval {
        nll,
        tokens: c[0],
        top1: c[1],
        top5: c[2],
        sequences: data[..sequences * WIDTH]
            .chunks(WIDTH)
            .map(|r| {
                let (nll, c) = unpack(r);
                SeqTotals { nll, tokens: c[0] }
            })
            .collect(),
    })
}
