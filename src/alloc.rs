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
pub fn zeros2<T: Clone + num_zero::Zero>(dim: (usize, usize), what: &str) -> Result<Array2<T>> {
    let n = dim.0.checked_mul(dim.1).ok_or_else(|| too_big(what, dim.0 as u128 * dim.1 as u128))?;
    let v = filled(n, T::zero(), what)?;
    Ok(Array2::from_shape_vec(dim, v).expect("n = rows * cols"))
}

/// Zero values of the element types xent allocates.
pub mod num_zero {
    /// A type with a zero.
    pub trait Zero {
        /// The zero.
        fn zero() -> Self;
    }
    impl Zero for f32 {
        fn zero() -> Self {
            0.0
        }
    }
    impl Zero for f64 {
        fn zero() -> Self {
            0.0
        }
    }
    impl Zero for half::f16 {
        fn zero() -> Self {
            half::f16::ZERO
        }
    }
    impl Zero for half::bf16 {
        fn zero() -> Self {
            half::bf16::ZERO
        }
    }
}
