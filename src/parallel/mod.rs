//! Beyond one process: a [`Collective`] (the few all-reduces xent needs, on any engine), a
//! single-process one, and with the `mpi` feature one over MPI (`mpi::MpiCollective`, rsmpi).
//! Built on it: vocabulary-parallel cross-entropy ([`crate::Cpu::cross_entropy_vocab_parallel`],
//! Megatron's layout with exact label smoothing and one all-reduce per batch) and data-parallel
//! corpus evaluation ([`corpus::all_reduce_corpus`], bit for bit one process's result).

use crate::error::{Result, XentError};

pub mod corpus;
pub(crate) mod vocab;

pub use vocab::VocabShard;
#[cfg(feature = "mpi")]
#[cfg_attr(docsrs, doc(cfg(feature = "mpi")))]
pub mod mpi;

/// A merge of two records of `width` f64 (`acc` becomes `acc` merged with `x`); commutative and
/// associative, as an all-reduce needs.
pub type Merge = fn(x: &[f64], acc: &mut [f64]);

/// What xent needs from a communication engine: rank, size, and all-reduces of small f64
/// vectors. Implement it for another engine (NCCL through a binding, a thread pool in tests).
pub trait Collective {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// Processes in the group.
    fn size(&self) -> usize;
    /// Element-wise sum over ranks, in place (every rank gets the result).
    fn all_reduce_sum(&self, data: &mut [f64]) -> Result<()>;
    /// Element-wise max over ranks, in place.
    fn all_reduce_max(&self, data: &mut [f64]) -> Result<()>;
    /// Records of `width` f64 merged by `merge` over ranks, in place (records are never split).
    fn all_reduce_with(&self, data: &mut [f64], width: usize, merge: Merge) -> Result<()>;

    /// Element-wise f32 sum over ranks, in place (e.g. the hidden-state gradient of a
    /// vocabulary-sharded linear layer). By default through [`Self::all_reduce_sum`] in f64;
    /// an engine with a native f32 reduction overrides it (half the traffic).
    fn all_reduce_sum_f32(&self, data: &mut [f32]) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        let mut wide: Vec<f64> = data.iter().map(|&x| x as f64).collect();
        self.all_reduce_sum(&mut wide)?;
        data.iter_mut().zip(wide).for_each(|(d, w)| *d = w as f32);
        Ok(())
    }
}

/// Bytes of an error message that travel to the other ranks in [`agree`].
const MESSAGE_BYTES: usize = 504;
/// Record of [`agree`]: failing rank + 1 (0: none), then the message's bytes packed 8 per word.
const AGREE_WIDTH: usize = 1 + MESSAGE_BYTES / 8;

/// The failure of the lowest failing rank wins (commutative and associative).
fn first_failure(x: &[f64], acc: &mut [f64]) {
    if x[0] != 0.0 && (acc[0] == 0.0 || x[0] < acc[0]) {
        acc.copy_from_slice(x);
    }
}

/// Every rank learns whether any rank failed, in one collective that every rank reaches
/// whatever happened before it: `Ok` when none failed; otherwise every rank gets an error (a
/// failing rank its own, the others [`XentError::Remote`] with the lowest failing rank's
/// message), so that all stop together and none waits in a later collective for a rank that
/// left. Call it after each phase of local work that can fail on one rank only (files, shapes,
/// devices) and before the next collective.
pub fn agree<T>(comm: &dyn Collective, local: Result<T>) -> Result<T> {
    if comm.size() == 1 {
        return local;
    }
    let mut rec = [0f64; AGREE_WIDTH];
    if let Err(e) = &local {
        rec[0] = (comm.rank() + 1) as f64;
        let text = e.to_string();
        let mut bytes = text.as_bytes();
        if bytes.len() > MESSAGE_BYTES {
            // Cut at a character boundary.
            let mut cut = MESSAGE_BYTES;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            bytes = &bytes[..cut];
        }
        let mut padded = [0u8; MESSAGE_BYTES];
        padded[..bytes.len()].copy_from_slice(bytes);
        for (w, chunk) in rec[1..].iter_mut().zip(padded.chunks(8)) {
            *w = f64::from_bits(u64::from_le_bytes(chunk.try_into().expect("8 bytes")));
        }
    }
    comm.all_reduce_with(&mut rec, AGREE_WIDTH, first_failure)?;
    match local {
        Err(e) => Err(e),
        Ok(_) if rec[0] != 0.0 => {
            let bytes: Vec<u8> = rec[1..].iter().flat_map(|w| w.to_bits().to_le_bytes()).collect();
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            let msg = String::from_utf8_lossy(&bytes[..end]).into_owned();
            Err(XentError::Remote { rank: rec[0] as usize - 1, message: msg })
        }
        ok => ok,
    }
}

/// One process: every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_max(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_with(&self, data: &mut [f64], width: usize, _: Merge) -> Result<()> {
        check_width(data, width)
    }
}

pub(crate) fn check_width(data: &[f64], width: usize) -> Result<()> {
    if width == 0 || !data.len().is_multiple_of(width) {
        return Err(XentError::InvalidOption(format!("{} values are not records of {width}", data.len())));
    }
    Ok(())
}

/// Rows `lo..hi` of `n` that rank `rank` of `size` takes, as even as possible (the first
/// `n % size` ranks take one more).
pub fn row_range(n: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let (q, r) = (n / size.max(1), n % size.max(1));
    let lo = rank * q + rank.min(r);
    lo..lo + q + usize::from(rank < r)
}
