//! Sequence evaluation: token NLL, per-sequence and corpus perplexity, bits per token, top-k
//! accuracy, with masks or lengths, over a corpus evaluated in batches.
//!
//! Token losses come from one cross-entropy pass (GPU or CPU) with masked tokens ignored; only
//! per-token values are read back. [`CorpusEval`] sums them exactly ([`ExactSum`]: a 512-bit
//! fixed-point integer that holds any sum of f32 values without rounding or overflow), so
//! evaluating a corpus in any split into batches, on any number of threads or machines, and
//! merging the accumulators gives bit-for-bit the result of one call.

use ndarray::{Array1, ArrayView1, ArrayView2};

use crate::api::config::{CeOutput, CrossEntropy, Reduction};
use crate::api::Backend;
use crate::dtype::Logits;
use crate::error::{Result, XentError};

/// Which tokens of a `[B, T]` batch count.
#[derive(Debug, Clone, Copy)]
pub enum SeqMask<'a> {
    /// `[B, T]`, non-zero = counted.
    Mask(ArrayView2<'a, u8>),
    /// Counted prefix length of each sequence `[B]`.
    Lengths(ArrayView1<'a, i64>),
}

/// An exact, order-independent sum of f32 values: a 512-bit fixed-point integer whose lowest
/// bit weighs 2^-160 (below f32's smallest subnormal, 2^-149) and whose range (2^352) holds
/// 2^192 values as large as f32's largest. Every finite f32 adds exactly and no sum of them can
/// overflow, so batches, threads and machines merge to the same bits in any order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExactSum {
    /// Two's-complement limbs, least significant first.
    limbs: [u64; LIMBS],
    /// Non-finite inputs: +inf count, NaN (or -inf) seen.
    pos_inf: u64,
    nan: bool,
}

const LIMBS: usize = 8;
/// Bit 0 of the accumulator weighs 2^-BIAS.
const BIAS: i32 = 160;

impl Default for ExactSum {
    fn default() -> Self {
        ExactSum { limbs: [0; LIMBS], pos_inf: 0, nan: false }
    }
}

impl ExactSum {
    /// Adds one value, exactly.
    pub fn add(&mut self, x: f32) {
        if x.is_nan() || x == f32::NEG_INFINITY {
            self.nan = true;
            return;
        }
        if x == f32::INFINITY {
            self.pos_inf += 1;
            return;
        }
        let bits = x.to_bits();
        let exp = ((bits >> 23) & 0xff) as i32;
        let frac = (bits & 0x7f_ffff) as u64;
        let (m, e) = if exp == 0 { (frac, -149) } else { (frac | 0x80_0000, exp - 150) };
        if m == 0 {
            return;
        }
        let shift = (e + BIAS) as u32;
        let (limb, off) = ((shift / 64) as usize, shift % 64);
        let wide = (m as u128) << off;
        let parts = [wide as u64, (wide >> 64) as u64];
        if bits >> 31 == 0 {
            self.add_at(limb, parts);
        } else {
            self.sub_at(limb, parts);
        }
    }

    fn add_at(&mut self, limb: usize, parts: [u64; 2]) {
        let mut carry = 0u64;
        for i in limb..LIMBS {
            let p = if i - limb < 2 { parts[i - limb] } else { 0 };
            let (a, c1) = self.limbs[i].overflowing_add(p);
            let (b, c2) = a.overflowing_add(carry);
            self.limbs[i] = b;
            carry = (c1 | c2) as u64;
            if carry == 0 && i > limb {
                break;
            }
        }
    }

    fn sub_at(&mut self, limb: usize, parts: [u64; 2]) {
        let mut borrow = 0u64;
        for i in limb..LIMBS {
            let p = if i - limb < 2 { parts[i - limb] } else { 0 };
            let (a, b1) = self.limbs[i].overflowing_sub(p);
            let (b, b2) = a.overflowing_sub(borrow);
            self.limbs[i] = b;
            borrow = (b1 | b2) as u64;
            if borrow == 0 && i > limb {
                break;
            }
        }
    }

    /// Adds another sum.
    pub fn merge(&mut self, o: &ExactSum) {
        let mut carry = 0u64;
        for i in 0..LIMBS {
            let (a, c1) = self.limbs[i].overflowing_add(o.limbs[i]);
            let (b, c2) = a.overflowing_add(carry);
            self.limbs[i] = b;
            carry = (c1 | c2) as u64;
        }
        self.pos_inf += o.pos_inf;
        self.nan |= o.nan;
    }

    /// The sum as f64 (rounded once, from the exact value).
    pub fn value(&self) -> f64 {
        if self.nan {
            return f64::NAN;
        }
        if self.pos_inf > 0 {
            return f64::INFINITY;
        }
        let negative = self.limbs[LIMBS - 1] >> 63 == 1;
        let mut mag = self.limbs;
        if negative {
            // Two's-complement negation.
            let mut carry = 1u64;
            for l in mag.iter_mut() {
                let (v, c) = (!*l).overflowing_add(carry);
                *l = v;
                carry = c as u64;
            }
        }
        let Some(top) = (0..LIMBS).rev().find(|&i| mag[i] != 0) else { return 0.0 };
        // The top 128 bits (and a sticky bit for the rest) fix the f64 rounding.
        let lo = if top > 0 { mag[top - 1] } else { 0 };
        let mut wide = ((mag[top] as u128) << 64) | lo as u128;
        if top > 1 && mag[..top - 1].iter().any(|&l| l != 0) {
            wide |= 1;
        }
        let scale = 64 * top as i32 - 64 - BIAS;
        let v = wide as f64 * 2f64.powi(scale);
        if negative {
            -v
        } else {
            v
        }
    }

    /// The accumulator as words (limbs, +inf count, NaN flag), e.g. to send to other processes.
    pub fn to_words(&self) -> [u64; LIMBS + 2] {
        let mut w = [0u64; LIMBS + 2];
        w[..LIMBS].copy_from_slice(&self.limbs);
        w[LIMBS] = self.pos_inf;
        w[LIMBS + 1] = self.nan as u64;
        w
    }

    /// The inverse of [`Self::to_words`].
    pub fn from_words(w: &[u64; LIMBS + 2]) -> ExactSum {
        let mut limbs = [0u64; LIMBS];
        limbs.copy_from_slice(&w[..LIMBS]);
        ExactSum { limbs, pos_inf: w[LIMBS], nan: w[LIMBS + 1] != 0 }
    }
}

/// One sequence's totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
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
/// acc.add_batch(&cpu, &logits, targets.view(), 2, SeqMask::Lengths(array![2i64, 1].view())).unwrap();
/// let r = acc.finish();
/// assert_eq!(r.tokens, 3);
/// assert!((r.corpus_ppl - 8.0).abs() < 1e-4); // uniform over 8 classes
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
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
#[non_exhaustive]
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
    pub fn add_batch<'a>(
        &mut self,
        backend: &dyn Backend,
        logits: impl Into<Logits<'a>>,
        targets: ArrayView1<i64>,
        seq_len: usize,
        mask: SeqMask,
    ) -> Result<()> {
        let logits = logits.into();
        let n = logits.dim().0;
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
        let mut t = Array1::<i64>::zeros(n);
        for s in 0..b {
            for k in 0..seq_len {
                let i = s * seq_len + k;
                t[i] = if counted(s, k)? { targets[i] } else { Self::IGNORED };
            }
        }
        let out = backend.cross_entropy(logits, (&t).into(), &Self::pass_config())?;
        self.add_scored(&out, t.view(), seq_len)
    }

    /// Targets of uncounted tokens in [`Self::add_scored`].
    pub const IGNORED: i64 = i64::MIN;

    /// The options of a pass whose output [`Self::add_scored`] takes.
    pub fn pass_config() -> CrossEntropy {
        CrossEntropy { reduction: Reduction::None, ignore_index: Self::IGNORED, ..Default::default() }.with_ranks(true)
    }

    /// Adds a batch already scored by a cross-entropy pass with [`Self::pass_config`] (e.g. one
    /// row block of a file streamed through the GPU): `targets [B*T]` hold [`Self::IGNORED`]
    /// for uncounted tokens, rows are whole sequences of `seq_len` tokens.
    pub fn add_scored(&mut self, out: &CeOutput, targets: ArrayView1<i64>, seq_len: usize) -> Result<()> {
        let n = targets.len();
        if seq_len == 0 || !n.is_multiple_of(seq_len) {
            return Err(XentError::Shape(format!("{n} rows are not a whole number of sequences of {seq_len} tokens")));
        }
        let (rows, ranks) = match (&out.row_loss, &out.row_rank) {
            (Some(r), Some(k)) if r.len() == n && k.len() == n => (r, k),
            _ => return Err(XentError::InvalidOption("add_scored needs per-row losses and ranks of every row".into())),
        };
        for s in 0..n / seq_len {
            let mut seq = SeqTotals::default();
            for k in 0..seq_len {
                let i = s * seq_len + k;
                if targets[i] != Self::IGNORED {
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

#[cfg(test)]
mod tests {
    use super::ExactSum;

    #[test]
    fn exact_sum_is_exact_and_does_not_overflow() {
        let mut s = ExactSum::default();
        for _ in 0..1000 {
            s.add(1e30);
        }
        assert_eq!(s.value(), 1000.0 * 1e30f32 as f64);
        // Tiny and huge values together, then cancelled: exactly what remains.
        let mut s = ExactSum::default();
        s.add(f32::MAX);
        s.add(1e-45);
        s.add(3.5);
        s.add(-f32::MAX);
        assert_eq!(s.value(), 3.5 + 1e-45f32 as f64);
        // Order does not matter, bit for bit.
        let xs: Vec<f32> = (0..5000).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1.37e-3 + 1e-30 * i as f32).collect();
        let (mut a, mut b) = (ExactSum::default(), ExactSum::default());
        xs.iter().for_each(|&x| a.add(x));
        xs.iter().rev().for_each(|&x| b.add(x));
        assert_eq!(a, b);
        let (mut h1, mut h2) = (ExactSum::default(), ExactSum::default());
        xs[..1234].iter().for_each(|&x| h1.add(x));
        xs[1234..].iter().for_each(|&x| h2.add(x));
        h1.merge(&h2);
        assert_eq!(h1, a);
        assert_eq!(ExactSum::from_words(&a.to_words()), a);
        let want: f64 = xs.iter().map(|&x| x as f64).sum();
        assert!((a.value() - want).abs() <= 1e-12 * want.abs().max(1.0));
        // Negative totals.
        let mut n = ExactSum::default();
        n.add(-2.25);
        n.add(0.5);
        assert_eq!(n.value(), -1.75);
    }
}
