//! A bounded pool of GPU buffers. Buffers go back to the pool when their [`Pooled`] handle
//! drops (by ownership, never by a hand-written call); free buffers are kept in size classes
//! (steps of at most 25%, so shapes that differ a little share buffers) and evicted least
//! recently used first whenever the free bytes pass the budget.
//!
//! The default budget follows the work: twice the largest number of bytes in use at once over
//! the recent past (two windows of 256 takes), at least 16 MiB. A fixed budget can be set with
//! [`crate::GpuOptions::pool_budget_bytes`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

const MIN_BUDGET: u64 = 16 << 20;
const WINDOW: u64 = 256;

/// Size class of a request: the smallest of 2^k, 1.25 2^k, 1.5 2^k, 1.75 2^k (at least 256
/// bytes) that holds `size`.
pub(crate) fn size_class(size: u64) -> u64 {
    let size = size.max(256);
    let p = 63 - size.leading_zeros(); // 2^p <= size
    let base = 1u64 << p;
    if base == size || p < 3 {
        return size.next_multiple_of(4);
    }
    let step = base / 4;
    size.div_ceil(step) * step
}

#[derive(Default)]
struct Free {
    /// Free buffers by (size, usage), each with the tick it was returned at.
    lists: HashMap<(u64, wgpu::BufferUsages), Vec<(wgpu::Buffer, u64)>>,
    bytes: u64,
    tick: u64,
    /// Bytes handed out and not yet returned.
    in_use: u64,
    /// Largest `in_use` in the current and the previous window of takes.
    peak_now: u64,
    peak_prev: u64,
    /// Largest `in_use` ever.
    peak_ever: u64,
}

pub(crate) struct PoolInner {
    free: Mutex<Free>,
    fixed_budget: Option<u64>,
}

/// Counters of the pool (see [`crate::GpuContext::counters`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct PoolStats {
    /// Bytes held in free buffers.
    pub free_bytes: u64,
    /// Bytes in buffers currently handed out.
    pub in_use_bytes: u64,
    /// The current budget of free bytes.
    pub budget_bytes: u64,
    /// The most bytes ever handed out at once (pooled buffers: working sets of host-API calls).
    pub peak_in_use_bytes: u64,
}

impl PoolInner {
    fn budget(&self, f: &Free) -> u64 {
        self.fixed_budget.unwrap_or_else(|| (2 * f.peak_now.max(f.peak_prev)).max(MIN_BUDGET))
    }

    fn evict(&self, f: &mut Free) {
        let budget = self.budget(f);
        while f.bytes > budget {
            // The least recently returned free buffer.
            let key = f
                .lists
                .iter()
                .filter_map(|(k, v)| v.first().map(|(_, t)| (*t, *k)))
                .min_by_key(|(t, _)| *t)
                .map(|(_, k)| k);
            let Some(key) = key else { break };
            let list = f.lists.get_mut(&key).expect("key from the map");
            let (buf, _) = list.remove(0);
            if list.is_empty() {
                f.lists.remove(&key);
            }
            f.bytes -= buf.size();
        }
    }

    fn put_back(&self, buf: wgpu::Buffer) {
        let mut f = self.free.lock().unwrap();
        f.in_use = f.in_use.saturating_sub(buf.size());
        f.tick += 1;
        let tick = f.tick;
        f.bytes += buf.size();
        f.lists.entry((buf.size(), buf.usage())).or_default().push((buf, tick));
        self.evict(&mut f);
    }
}

/// The pool owned by a context.
pub(crate) struct Pool {
    inner: Arc<PoolInner>,
}

impl Pool {
    pub fn new(fixed_budget: Option<u64>) -> Pool {
        Pool { inner: Arc::new(PoolInner { free: Mutex::new(Free::default()), fixed_budget }) }
    }

    /// A free buffer of this size class and usage, if one is pooled.
    pub fn take(&self, class: u64, usage: wgpu::BufferUsages) -> Option<Pooled> {
        let mut f = self.lock();
        let list = f.lists.get_mut(&(class, usage))?;
        let (buf, _) = list.pop()?;
        if list.is_empty() {
            f.lists.remove(&(class, usage));
        }
        f.bytes -= buf.size();
        drop(f);
        self.note_taken(buf.size());
        Some(self.wrap(buf))
    }

    /// Counts a buffer of `bytes` as handed out (taken from the pool or newly created).
    pub fn note_taken(&self, bytes: u64) {
        let mut f = self.lock();
        f.in_use += bytes;
        f.peak_now = f.peak_now.max(f.in_use);
        f.peak_ever = f.peak_ever.max(f.in_use);
        f.tick += 1;
        if f.tick.is_multiple_of(WINDOW) {
            f.peak_prev = f.peak_now;
            f.peak_now = f.in_use;
        }
    }

    /// Wraps a buffer so that it returns here when dropped.
    pub fn wrap(&self, buf: wgpu::Buffer) -> Pooled {
        Pooled { buf: Some(buf), home: Some(Arc::downgrade(&self.inner)) }
    }

    pub fn stats(&self) -> PoolStats {
        let f = self.lock();
        PoolStats {
            free_bytes: f.bytes,
            in_use_bytes: f.in_use,
            budget_bytes: self.inner.budget(&f),
            peak_in_use_bytes: f.peak_ever,
        }
    }

    /// Drops every free buffer.
    pub fn clear(&self) {
        let mut f = self.lock();
        f.lists.clear();
        f.bytes = 0;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Free> {
        self.inner.free.lock().unwrap()
    }
}

/// A GPU buffer that returns to its pool when dropped (or, for buffers a plan owns for its
/// lifetime, is simply freed).
pub struct Pooled {
    buf: Option<wgpu::Buffer>,
    home: Option<Weak<PoolInner>>,
}

impl Pooled {
    /// A buffer that is freed on drop instead of pooled.
    pub(crate) fn unpooled(buf: wgpu::Buffer) -> Pooled {
        Pooled { buf: Some(buf), home: None }
    }
}

impl std::ops::Deref for Pooled {
    type Target = wgpu::Buffer;
    fn deref(&self) -> &wgpu::Buffer {
        self.buf.as_ref().expect("buffer present until drop")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let (Some(buf), Some(home)) = (self.buf.take(), self.home.as_ref().and_then(Weak::upgrade)) {
            home.put_back(buf);
        }
    }
}

impl std::fmt::Debug for Pooled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pooled({} bytes)", self.size())
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_waste_at_most_a_quarter() {
        for s in [1u64, 255, 256, 257, 300, 1000, 4096, 4097, 5000, 1 << 20, (1 << 20) + 1, 123_456_789] {
            let c = size_class(s);
            assert!(c >= s && c.is_multiple_of(4), "{s} -> {c}");
            if s > 256 {
                assert!((c - s) as f64 <= 0.25 * s as f64 + 4.0, "{s} -> {c}");
            }
        }
        assert_eq!(size_class(1000), 1024);
        assert_eq!(size_class(4097), 5120);
    }
}
