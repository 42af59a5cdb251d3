//! Fallible allocation: sizes that come from files, flags or callers are reserved with
//! `try_reserve`, so an impossible size is a typed error instead of an aborted process.

use ndarray::Array2;

use crate::error::{Result, XentError};

fn too_big(what: &str, bytes: u128) -> XentError {
    XentError::Alloc { what: what.into(), bytes: bytes.min(u64::MAX as u128) as u64 }
}

/// An empty vector with room for `n` elements.
pub(crate) fn vec_with_capacity<T>(n: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| too_big(what, n as u128 * std::mem::size_of::<T>() as u128))?;
    Ok(v)
}

/// A vector of `n` copies of `x`.
pub fn filled<T: Clone>(n: usize, x: T, what: &str) -> Result<Vec<T>> {
    let mut v = vec_with_capacity(n, what)?;
    v.resize(n, x);
    Ok(v)
}

/// A zero-filled `[rows, cols]` array.
pub fn zeros2<T: bytemuck::Zeroable>(dim: (usize, usize), what: &str) -> Result<Array2<T>> {
    let n = dim.0.checked_mul(dim.1).ok_or_else(|| too_big(what, dim.0 as u128 * dim.1 as u128))?;
    let v = zeroed_vec(n, what)?;
    Ok(Array2::from_shape_vec(dim, v).expect("n = rows * cols"))
}

/// `n` zeros, from the allocator's zeroed memory: a large block is fresh pages that nothing
/// has touched, so the caller's own writes are the first (no memset pass before them).
pub fn zeroed_vec<T: bytemuck::Zeroable>(n: usize, what: &str) -> Result<Vec<T>> {
    let size = std::mem::size_of::<T>();
    if n == 0 || size == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<T>(n).map_err(|_| too_big(what, n as u128 * size as u128))?;
    // SAFETY: the layout's size is not zero.
    let p = unsafe { std::alloc::alloc_zeroed(layout) } as *mut T;
    if p.is_null() {
        return Err(too_big(what, layout.size() as u128));
    }
    huge_pages(p as *mut u8, layout.size());
    // SAFETY: `p` comes from the global allocator with the layout of `n` T's, all bytes zero,
    // which is a valid T (`Zeroable`).
    Ok(unsafe { Vec::from_raw_parts(p, n, n) })
}

/// Asks Linux to back a large fresh block with 2 MiB pages (`MADV_HUGEPAGE`, honoured where
/// transparent huge pages are `madvise` or `always`): a block that large is a fresh mapping
/// whose pages all fault in on the first write, and one fault per 2 MiB instead of per 4 KiB
/// takes most of that cost away (a 524 MB gradient faulted in at 0.15-0.5 s on the
/// development VM). Only whole 2 MiB pages inside the block are affected; advice that is not
/// taken changes nothing.
fn huge_pages(p: *mut u8, bytes: usize) {
    #[cfg(target_os = "linux")]
    if bytes >= HUGE_MIN {
        const HUGE: usize = 2 << 20;
        let start = (p as usize).next_multiple_of(HUGE);
        let end = (p as usize + bytes) / HUGE * HUGE;
        if end > start {
            // SAFETY: the range lies inside the caller's fresh allocation; madvise only advises.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (p, bytes);
}

/// Blocks at least this large are advised to use huge pages.
#[cfg(target_os = "linux")]
const HUGE_MIN: usize = 64 << 20;
