//! Gradient buffers for Burn's Flex backend, returned to a small pool when Burn drops the
//! tensor and reused by the next call of the same size.
//!
//! A training step's `[N, V]` gradient is hundreds of MB (524 MB at 4096 x 32000 in f32). A
//! fresh allocation that large is mapped anew by the OS on every step, and each of its pages
//! faults in on first write: on the development VM that costs 0.15-0.5 s, several times xent's
//! kernel (0.05 s). Burn hands tensor memory to an `AllocationController`, so the buffer can
//! come back here by ownership when the step's gradient is dropped: nothing to release by hand,
//! and a buffer still in use is never handed out. Hand-written because neither Burn nor the
//! allocator keeps allocations this large mapped (glibc returns anything above 32 MiB to the
//! OS on free).

use std::mem::MaybeUninit;
use std::sync::Mutex;

use burn_std::{AccessError, AccessPolicy, AllocationController, AllocationProperty, Bytes};

/// Buffers kept for reuse: a training loop needs one gradient at a time, so two cover a loss
/// called twice per step; a third returned evicts the oldest.
const KEEP: usize = 2;

static POOL: Mutex<Vec<Vec<u128>>> = Mutex::new(Vec::new());

/// A buffer of at least `bytes` bytes, 16-byte aligned: a pooled one of the same size (its old
/// contents left in place: callers overwrite every element) or a new, zeroed one.
fn take(bytes: usize) -> Vec<u128> {
    let words = bytes.div_ceil(16);
    let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    match pool.iter().position(|b| b.len() == words) {
        Some(i) => pool.swap_remove(i),
        None => vec![0u128; words],
    }
}

fn give_back(buf: Vec<u128>) {
    let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    if pool.len() == KEEP {
        pool.remove(0);
    }
    pool.push(buf);
}

/// Frees the pooled gradient buffers (they are otherwise kept until reused or evicted).
pub fn release_pooled_buffers() {
    POOL.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

/// Bytes pooled for reuse now (for tests and diagnostics).
pub fn pooled_bytes() -> usize {
    POOL.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|b| b.len() * 16).sum()
}

/// The controller Burn holds: the buffer goes back to the pool when Burn drops it.
struct Pooled(Vec<u128>);

impl Drop for Pooled {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.0));
    }
}

impl AllocationController for Pooled {
    fn alloc_align(&self) -> usize {
        16
    }

    fn property(&self) -> AllocationProperty {
        AllocationProperty::Other
    }

    unsafe fn memory_mut(&mut self, _policy: AccessPolicy) -> Result<&mut [MaybeUninit<u8>], AccessError> {
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut self.0);
        // SAFETY: `u8` and `MaybeUninit<u8>` have the same layout; the bytes are initialised.
        Ok(unsafe { &mut *(bytes as *mut [u8] as *mut [MaybeUninit<u8>]) })
    }

    fn memory(&self, _policy: AccessPolicy) -> Result<&[MaybeUninit<u8>], AccessError> {
        let bytes: &[u8] = bytemuck::cast_slice(&self.0);
        // SAFETY: as above.
        Ok(unsafe { &*(bytes as *const [u8] as *const [MaybeUninit<u8>]) })
    }
}

/// Fills a pooled buffer of `len` elements of `E` with `fill` and hands it to Burn as [`Bytes`]
/// that return to the pool when dropped.
pub(crate) fn filled<E: bytemuck::Pod, R>(len: usize, fill: impl FnOnce(&mut [E]) -> R) -> (R, Bytes) {
    let bytes = len * size_of::<E>();
    let mut buf = take(bytes);
    let r = fill(&mut bytemuck::cast_slice_mut::<u128, E>(&mut buf)[..len]);
    // SAFETY: the buffer holds at least `bytes` initialised bytes.
    (r, unsafe { Bytes::from_controller(Box::new(Pooled(buf)), bytes) })
}
