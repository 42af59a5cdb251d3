//! Sequence evaluation: token NLL, per-sequence and corpus perplexity, bits per token, top-k
//! accuracy, with masks or lengths, over a corpus evaluated in batches.
//!
//! Token losses come from one cross-entropy pass (GPU or CPU) with masked tokens ignored; only
//! per-token values are read back. [`CorpusEval`] sums them in exact fixed point (each f32 loss
//! rounded once to a multiple of 2^-80, then integer sums), so evaluating a corpus in any split
//! into batches, on any number of threads or machines, and merging the accumulators gives
//! bit-for-bit the result of one call.

use ndarray::{Array1, ArrayView1, ArrayView2};

use crate::api::config::{CrossEntropy, Reduction};
use crate::api::Backend;
use crate::error::{Result, XentError};

/// Which tokens of a `[B, T]` batch count.
#[derive(Debug, Clone, Copy)]
pub enum SeqMask<'a> {
    /// `[B, T]`, non-zero = counted.
    Mask(ArrayView2<'a, u8>),
    /// Counted prefix length of each sequence `[B]`.
    Lengths(ArrayView1<'a, i64>),
}

/// An exact, order-independent sum of f32 values (fixed point at 2^-80 in an i128).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExactSum {
    fixed: i128,
    /// Non-finite inputs: +inf count, NaN seen.
    pos_inf: u64,
    nan: bool,
}

const SCALE: f64 = 1208925819614629174706176.0; // 2^80

impl ExactSum {
    /// Adds one value (rounded once to a multiple of 2^-80).
    pub fn add(&mut self, x: f32) {
        if x.is_nan() || x == f32::NEG_INFINITY {
            self.nan = true;
        } else if x == f32::INFINITY {
            self.pos_inf += 1;
        } else {
            self.fixed += (x as f64 * SCALE).round() as i128;
        }
    }

    /// Adds another sum.
    pub fn merge(&mut self, o: &ExactSum) {
        self.fixed += o.fixed;
        self.pos_inf += o.pos_inf;
        self.nan |= o.nan;
    }

    /// The sum as f64.
    pub fn value(&self) -> f64 {
        if self.nan {
            f64::NAN
        } else if self.pos_inf > 0 {
            f64::INFINITY
        } else {
            self.fixed as f64 / SCALE
        }
    }
}

/// One sequence's totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqTotals {
    /// Sum of token NLLs.
    pub nll: ExactSum,
    /// Counted tokens.
    pub tokens: u64,
}

/// Mergeable corpus accumulator.
///
/// ```
/// use ndarray::{array, Array2};
/// use xent::{sequence::{CorpusEval, SeqMask}, Cpu};
/// let cpu = Cpu::new();
/// let logits = Array2::<f32>::zeros((4, 8)); // B = 2 sequences of T = 2 tokens, V = 8
/// let targets = array![1i64, 2, 3, 4];
/// let mut acc = CorpusEval::default();
/// acc.add_batch(&cpu, logits.view(), targets.view(), 2, SeqMask::Lengths(array![2i64, 1].view())).unwrap();
/// let r = acc.finish();
/// assert_eq!(r.tokens, 3);
/// assert!((r.corpus_ppl - 8.0).abs() < 1e-4); // uniform over 8 classes
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CorpusEval {
    /// Corpus NLL sum.
    pub nll: ExactSum,
    /// Counted tokens.
    pub tokens: u64,
    /// Counted tokens whose target had rank 0 (top-1) and rank < 5 (top-5).
    pub top1: u64,
    /// Top-5 hits.
    pub top5: u64,
    /// Per-sequence totals, in the order the batches were added.
    pub sequences: Vec<SeqTotals>,
}

/// Corpus results.
#[derive(Debug, Clone, PartialEq)]
pub struct CorpusReport {
    /// Token-weighted mean NLL (nats per token); NaN with no tokens.
    pub corpus_nll: f64,
    /// `exp(corpus_nll)`.
    pub corpus_ppl: f64,
    /// `corpus_nll / ln 2`.
    pub bits_per_token: f64,
    /// Perplexity of each sequence (NaN for a sequence with no counted token).
    pub ppl_per_sequence: Vec<f64>,
    /// NLL of each sequence (nats per token).
    pub nll_per_sequence: Vec<f64>,
    /// Counted tokens.
    pub tokens: u64,
    /// Top-1 and top-5 accuracy over counted tokens.
    pub top1: f64,
    /// Top-5 accuracy.
    pub top5: f64,
}

impl CorpusEval {
    /// Evaluates a batch: `logits [B*T, V]` (rows in sequence order), `targets [B*T]`, `seq_len`
    /// = T, and which tokens count. Targets of uncounted tokens are not looked at.
    pub fn add_batch(
        &mut self,
        backend: &dyn Backend,
        logits: ArrayView2<f32>,
        targets: ArrayView1<i64>,
        seq_len: usize,
        mask: SeqMask,
    ) -> Result<()> {
        let n = logits.nrows();
        if seq_len == 0 || !n.is_multiple_of(seq_len) {
            return Err(XentError::Shape(format!("{n} rows are not a whole number of sequences of {seq_len} tokens")));
        }
        let b = n / seq_len;
        if targets.len() != n {
            return Err(XentError::Shape(format!("logits have {n} rows but targets have {}", targets.len())));
        }
        let counted = |s: usize, t: usize| -> Result<bool> {
            Ok(match mask {
                SeqMask::Mask(m) => m[[s, t]] != 0,
                SeqMask::Lengths(l) => (t as i64) < l[s],
            })
        };
        match mask {
            SeqMask::Mask(m) if m.dim() != (b, seq_len) => {
                return Err(XentError::Shape(format!("mask is {:?} but the batch is [{b}, {seq_len}]", m.dim())))
            }
            SeqMask::Lengths(l) if l.len() != b => {
                return Err(XentError::Shape(format!("{} lengths for {b} sequences", l.len())))
            }
            SeqMask::Lengths(l) => {
                if let Some((i, &v)) = l.iter().enumerate().find(|(_, &v)| v < 0 || v as usize > seq_len) {
                    return Err(XentError::InvalidOption(format!(
                        "length {v} of sequence {i} is outside 0..={seq_len}"
                    )));
                }
            }
            _ => {}
        }
        // Uncounted tokens get a sentinel the data cannot hold.
        let ignore = i64::MIN;
        let mut t = Array1::<i64>::zeros(n);
        for s in 0..b {
            for k in 0..seq_len {
                let i = s * seq_len + k;
                t[i] = if counted(s, k)? { targets[i] } else { ignore };
            }
        }
        let cfg = CrossEntropy { reduction: Reduction::None, ignore_index: ignore, ranks: true, ..Default::default() };
        let out = backend.cross_entropy(logits, t.view().into(), &cfg)?;
        let (rows, ranks) = (out.row_loss.expect("per-row losses"), out.row_rank.expect("ranks"));
        for s in 0..b {
            let mut seq = SeqTotals::default();
            for k in 0..seq_len {
                let i = s * seq_len + k;
                if t[i] != ignore {
                    seq.nll.add(rows[i]);
                    seq.tokens += 1;
                    self.top1 += (ranks[i] < 1) as u64;
                    self.top5 += (ranks[i] < 5) as u64;
                }
            }
            self.nll.merge(&seq.nll);
            self.tokens += seq.tokens;
            self.sequences.push(seq);
        }
        Ok(())
    }

    /// Adds another accumulator's results (its sequences after this one's).
    pub fn merge(&mut self, o: &CorpusEval) {
        self.nll.merge(&o.nll);
        self.tokens += o.tokens;
        self.top1 += o.top1;
        self.top5 += o.top5;
        self.sequences.extend_from_slice(&o.sequences);
    }

    /// The corpus report.
    pub fn finish(&self) -> CorpusReport {
        let div = |a: f64, b: u64| if b == 0 { f64::NAN } else { a / b as f64 };
        let corpus_nll = div(self.nll.value(), self.tokens);
        let nll_per_sequence: Vec<f64> = self.sequences.iter().map(|s| div(s.nll.value(), s.tokens)).collect();
        CorpusReport {
            corpus_nll,
            corpus_ppl: corpus_nll.exp(),
            bits_per_token: corpus_nll / std::f64::consts::LN_2,
            ppl_per_sequence: nll_per_sequence.iter().map(|v| v.exp()).collect(),
            nll_per_sequence,
            tokens: self.tokens,
            top1: div(self.top1 as f64, self.tokens),
            top5: div(self.top5 as f64, self.tokens),
        }
    }
}
