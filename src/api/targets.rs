//! Class-index targets: accepted as i64 or i32, checked once, normalised to i32 for the kernels.

use ndarray::ArrayView1;

use crate::error::{Result, XentError};

/// Class-index targets `[N]`, as PyTorch's int64 or as int32.
#[derive(Debug, Clone, Copy)]
pub enum Targets<'a> {
    /// int64 targets.
    I64(ArrayView1<'a, i64>),
    /// int32 targets.
    I32(ArrayView1<'a, i32>),
}

impl<'a> From<ArrayView1<'a, i64>> for Targets<'a> {
    fn from(v: ArrayView1<'a, i64>) -> Self {
        Targets::I64(v)
    }
}
impl<'a> From<ArrayView1<'a, i32>> for Targets<'a> {
    fn from(v: ArrayView1<'a, i32>) -> Self {
        Targets::I32(v)
    }
}
impl<'a> From<&'a [i64]> for Targets<'a> {
    fn from(v: &'a [i64]) -> Self {
        Targets::I64(ArrayView1::from(v))
    }
}
impl<'a> From<&'a [i32]> for Targets<'a> {
    fn from(v: &'a [i32]) -> Self {
        Targets::I32(ArrayView1::from(v))
    }
}

/// The i32 value that marks an ignored row once targets are normalised.
pub(crate) const IGNORED: i32 = i32::MIN;

impl Targets<'_> {
    /// Number of rows.
    pub fn len(&self) -> usize {
        match self {
            Targets::I64(v) => v.len(),
            Targets::I32(v) => v.len(),
        }
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(&self, i: usize) -> i64 {
        match self {
            Targets::I64(v) => v[i],
            Targets::I32(v) => v[i] as i64,
        }
    }

    /// Checks every target against `classes` and maps ignored rows to [`IGNORED`].
    pub(crate) fn normalise(&self, classes: usize, ignore_index: i64) -> Result<Vec<i32>> {
        let mut out = Vec::with_capacity(self.len());
        for row in 0..self.len() {
            let t = self.get(row);
            if t == ignore_index {
                out.push(IGNORED);
            } else if t < 0 || t >= classes as i64 {
                return Err(XentError::TargetOutOfRange { row, target: t, classes });
            } else {
                out.push(t as i32);
            }
        }
        Ok(out)
    }
}
