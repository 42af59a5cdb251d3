//! What cross-entropy scores a row against: class indices (i64 or i32, checked once and
//! normalised to i32 for the kernels) or probability rows.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2};

use crate::error::{Result, XentError};

/// Cross-entropy targets: class indices `[N]` (PyTorch's int64, or int32) or probabilities
/// `[N, V]` (soft labels, PyTorch's float target).
///
/// ```
/// use ndarray::array;
/// use xent::Targets;
/// let classes: Targets = (&[1i64, -100][..]).into();
/// assert_eq!(classes.len(), 2);
/// let probs = array![[0.25f32, 0.75]];
/// let soft: Targets = (&probs).into();
/// assert!(soft.is_probs());
/// ```
#[derive(Debug, Clone, Copy)]
pub enum Targets<'a> {
    /// int64 class indices.
    I64(ArrayView1<'a, i64>),
    /// int32 class indices.
    I32(ArrayView1<'a, i32>),
    /// Probability rows `[N, V]`, finite and non-negative.
    Probs(ArrayView2<'a, f32>),
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
impl<'a> From<&'a Array1<i64>> for Targets<'a> {
    fn from(v: &'a Array1<i64>) -> Self {
        Targets::I64(v.view())
    }
}
impl<'a> From<&'a Array1<i32>> for Targets<'a> {
    fn from(v: &'a Array1<i32>) -> Self {
        Targets::I32(v.view())
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
impl<'a> From<ArrayView2<'a, f32>> for Targets<'a> {
    fn from(v: ArrayView2<'a, f32>) -> Self {
        Targets::Probs(v)
    }
}
impl<'a> From<&'a Array2<f32>> for Targets<'a> {
    fn from(v: &'a Array2<f32>) -> Self {
        Targets::Probs(v.view())
    }
}

/// The i32 class index that marks an ignored row on a device (a value no class can have):
/// GPU plans take class targets as i32 with ignored rows set to this, and are made with
/// `ignore_index: DEVICE_IGNORED as i64` (see [`Targets::device_classes`]).
pub const DEVICE_IGNORED: i32 = i32::MIN;
pub(crate) const IGNORED: i32 = DEVICE_IGNORED;

impl<'a> Targets<'a> {
    /// The same view with a shorter lifetime (ndarray views are invariant in their lifetime).
    pub(crate) fn reborrow<'b>(self) -> Targets<'b>
    where
        'a: 'b,
    {
        match self {
            Targets::I64(t) => Targets::I64(t.reborrow()),
            Targets::I32(t) => Targets::I32(t.reborrow()),
            Targets::Probs(p) => Targets::Probs(p.reborrow()),
        }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        match self {
            Targets::I64(v) => v.len(),
            Targets::I32(v) => v.len(),
            Targets::Probs(p) => p.nrows(),
        }
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True for probability targets.
    pub fn is_probs(&self) -> bool {
        matches!(self, Targets::Probs(_))
    }

    /// Row `i`'s class index (0 for probability targets).
    pub(crate) fn get(&self, i: usize) -> i64 {
        match self {
            Targets::I64(v) => v[i],
            Targets::I32(v) => v[i] as i64,
            Targets::Probs(_) => 0,
        }
    }

    /// Class indices as GPU plans take them (`DeviceTargets::Classes`): i32, each checked
    /// against `classes` (the first out of range is [`XentError::TargetOutOfRange`]), rows
    /// whose target is `ignore_index` as [`DEVICE_IGNORED`]. Probability targets give 0 for
    /// every row.
    ///
    /// ```
    /// use xent::{Targets, DEVICE_IGNORED};
    /// let t = Targets::from(&[3i64, -100, 0][..]);
    /// assert_eq!(t.device_classes(5, -100).unwrap(), vec![3, DEVICE_IGNORED, 0]);
    /// assert!(t.device_classes(3, -100).is_err());
    /// ```
    pub fn device_classes(&self, classes: usize, ignore_index: i64) -> Result<Vec<i32>> {
        self.normalise(classes, ignore_index)
    }

    /// Checks every class index against `classes` and maps ignored rows to [`IGNORED`].
    /// Probability targets give class 0 for every row (every row counts).
    pub(crate) fn normalise(&self, classes: usize, ignore_index: i64) -> Result<Vec<i32>> {
        let n = self.len();
        if self.is_probs() {
            return Ok(vec![0; n]);
        }
        let mut out = crate::alloc::vec_with_capacity(n, "targets")?;
        for row in 0..n {
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
