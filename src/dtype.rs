//! Element types of logits and gradients: f32, f16 and bf16, with all arithmetic in f32.
//!
//! [`Logits`] and [`LogitsMut`] are typed 2-D views that every operation taking logits accepts,
//! so one call works for each dtype:
//!
//! ```
//! use half::bf16;
//! use ndarray::array;
//! use xent::{Cpu, CrossEntropy};
//! let x32 = array![[2.0f32, 0.5, -1.0]];
//! let x16 = x32.mapv(bf16::from_f32);
//! let cpu = Cpu::new();
//! let a = cpu.cross_entropy(&x32, &[0i64][..], &CrossEntropy::default()).unwrap();
//! let b = cpu.cross_entropy(&x16, &[0i64][..], &CrossEntropy::default()).unwrap();
//! assert!((a.loss - b.loss).abs() < 1e-2); // bf16 rounds the inputs, not the arithmetic
//! ```

use half::{bf16, f16};
use ndarray::{Array2, ArrayView2, ArrayViewMut2};

use crate::error::{Result, XentError};

/// Element type of a logit or gradient tensor.
///
/// Unlike xent's option and error enums, the element types (`DType`, [`Tensor2`], [`Logits`],
/// [`LogitsMut`]) and [`crate::Targets`] are not `#[non_exhaustive]`: code that moves tensors
/// matches every element type to pick a typed buffer, and a wildcard arm there could only
/// fail at run time. A new element type is therefore a breaking change, made deliberately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DType {
    /// IEEE binary32.
    #[default]
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16: the high half of a binary32.
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// `"f32"`, `"f16"` or `"bf16"`.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = XentError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "f16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            _ => Err(XentError::InvalidOption(format!("dtype must be f32, f16 or bf16, got {s:?}"))),
        }
    }
}

/// A scalar type xent reads and writes: converted to f32 for every computation and rounded
/// once (to nearest even) when stored.
pub trait Element: Copy + Send + Sync + Default + bytemuck::Pod + 'static {
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Exact widening to f32.
    fn to_f32(self) -> f32;
    /// Rounds to nearest even (NaN stays NaN, overflow gives infinity).
    fn from_f32(x: f32) -> Self;
    /// Widens a slice (vectorised where the `half` crate can).
    fn widen(src: &[Self], dst: &mut [f32]);
    /// Rounds a slice.
    fn narrow(src: &[f32], dst: &mut [Self]);
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn narrow(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn widen(src: &[Self], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst);
    }
    fn narrow(src: &[f32], dst: &mut [Self]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn widen(src: &[Self], dst: &mut [f32]) {
        // A shift: exact, and LLVM vectorises it.
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
    fn narrow(src: &[f32], dst: &mut [Self]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = bf16::from_bits(round_bf16(s));
        }
    }
}

/// f32 to bf16 bits, round to nearest even; NaN stays a (quiet) NaN. Branch-free apart from
/// the NaN test so that the loop in [`Element::narrow`] vectorises.
#[inline(always)]
pub(crate) fn round_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        ((b >> 16) as u16) | 0x0040
    } else {
        rounded
    }
}

/// Read-only logits `[N, V]` of any [`DType`]. Built with `.into()` from an `ArrayView2` (or a
/// reference to an `Array2`) of `f32`, `half::f16` or `half::bf16`.
#[derive(Debug, Clone, Copy)]
pub enum Logits<'a> {
    /// f32 logits.
    F32(ArrayView2<'a, f32>),
    /// f16 logits.
    F16(ArrayView2<'a, f16>),
    /// bf16 logits.
    BF16(ArrayView2<'a, bf16>),
}

/// Mutable `[N, V]` tensor of any [`DType`]: logits overwritten by their gradient, or a
/// caller-owned gradient destination.
#[derive(Debug)]
pub enum LogitsMut<'a> {
    /// f32.
    F32(ArrayViewMut2<'a, f32>),
    /// f16.
    F16(ArrayViewMut2<'a, f16>),
    /// bf16.
    BF16(ArrayViewMut2<'a, bf16>),
}

/// An owned `[N, V]` tensor of any [`DType`] (gradients returned in the logits' dtype).
#[derive(Debug, Clone, PartialEq)]
pub enum Tensor2 {
    /// f32.
    F32(Array2<f32>),
    /// f16.
    F16(Array2<f16>),
    /// bf16.
    BF16(Array2<bf16>),
}

macro_rules! dispatch {
    ($e:expr, $v:ident => $body:expr) => {
        match $e {
            Self::F32($v) => $body,
            Self::F16($v) => $body,
            Self::BF16($v) => $body,
        }
    };
}

macro_rules! view_from {
    ($t:ty, $variant:ident) => {
        impl<'a> From<ArrayView2<'a, $t>> for Logits<'a> {
            fn from(v: ArrayView2<'a, $t>) -> Self {
                Logits::$variant(v)
            }
        }
        impl<'a> From<&'a Array2<$t>> for Logits<'a> {
            fn from(v: &'a Array2<$t>) -> Self {
                Logits::$variant(v.view())
            }
        }
        impl<'a> From<&'a ArrayView2<'a, $t>> for Logits<'a> {
            fn from(v: &'a ArrayView2<'a, $t>) -> Self {
                Logits::$variant(v.view())
            }
        }
        impl<'a> From<ArrayViewMut2<'a, $t>> for LogitsMut<'a> {
            fn from(v: ArrayViewMut2<'a, $t>) -> Self {
                LogitsMut::$variant(v)
            }
        }
        impl<'a> From<&'a mut Array2<$t>> for LogitsMut<'a> {
            fn from(v: &'a mut Array2<$t>) -> Self {
                LogitsMut::$variant(v.view_mut())
            }
        }
        impl From<Array2<$t>> for Tensor2 {
            fn from(v: Array2<$t>) -> Self {
                Tensor2::$variant(v)
            }
        }
    };
}
view_from!(f32, F32);
view_from!(f16, F16);
view_from!(bf16, BF16);

impl<'a> Logits<'a> {
    /// The same view with a shorter lifetime (ndarray views are invariant in their lifetime).
    pub fn reborrow<'b>(self) -> Logits<'b>
    where
        'a: 'b,
    {
        match self {
            Logits::F32(v) => Logits::F32(v.reborrow()),
            Logits::F16(v) => Logits::F16(v.reborrow()),
            Logits::BF16(v) => Logits::BF16(v.reborrow()),
        }
    }

    /// `(rows, classes)`.
    pub fn dim(&self) -> (usize, usize) {
        dispatch!(self, v => v.dim())
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Logits::F32(_) => DType::F32,
            Logits::F16(_) => DType::F16,
            Logits::BF16(_) => DType::BF16,
        }
    }
    /// Widened to f32 (a copy for f16/bf16, a clone of the view's data for f32).
    pub fn to_f32(&self) -> Array2<f32> {
        dispatch!(self, v => v.mapv(Element::to_f32))
    }
    /// Row `r` widened to f32 into `out` (resized to V).
    pub(crate) fn row_into(&self, r: usize, out: &mut Vec<f32>) {
        fn go<T: Element>(v: &ArrayView2<T>, r: usize, out: &mut Vec<f32>) {
            let row = v.row(r);
            out.resize(row.len(), 0.0);
            match row.as_slice() {
                Some(s) => T::widen(s, out),
                None => out.iter_mut().zip(row.iter()).for_each(|(o, &x)| *o = x.to_f32()),
            }
        }
        dispatch!(self, v => go(v, r, out))
    }

    /// The raw little-endian bytes in row-major order (copied only when the view is strided).
    pub fn bytes(&self) -> std::borrow::Cow<'a, [u8]> {
        fn raw<'b, T: Element>(v: &ArrayView2<'b, T>) -> std::borrow::Cow<'b, [u8]> {
            match v.to_slice() {
                Some(s) => std::borrow::Cow::Borrowed(bytemuck::cast_slice(s)),
                None => std::borrow::Cow::Owned(bytemuck::cast_slice(&v.iter().copied().collect::<Vec<T>>()).to_vec()),
            }
        }
        dispatch!(self, v => raw(v))
    }
}

impl LogitsMut<'_> {
    /// `(rows, classes)`.
    pub fn dim(&self) -> (usize, usize) {
        dispatch!(self, v => v.dim())
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            LogitsMut::F32(_) => DType::F32,
            LogitsMut::F16(_) => DType::F16,
            LogitsMut::BF16(_) => DType::BF16,
        }
    }
    /// A read-only view of the same data.
    pub fn view(&self) -> Logits<'_> {
        match self {
            LogitsMut::F32(v) => Logits::F32(v.view()),
            LogitsMut::F16(v) => Logits::F16(v.view()),
            LogitsMut::BF16(v) => Logits::BF16(v.view()),
        }
    }
    /// Reborrows for a shorter lifetime.
    pub fn reborrow(&mut self) -> LogitsMut<'_> {
        match self {
            LogitsMut::F32(v) => LogitsMut::F32(v.view_mut()),
            LogitsMut::F16(v) => LogitsMut::F16(v.view_mut()),
            LogitsMut::BF16(v) => LogitsMut::BF16(v.view_mut()),
        }
    }
    /// The contiguous row-major bytes, when the view is in standard layout.
    pub fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        dispatch!(self, v => v.as_slice_mut().map(bytemuck::cast_slice_mut))
    }
    /// Stores f32 values `src` (row-major, same shape), rounding once.
    pub fn assign_f32(&mut self, src: ArrayView2<f32>) {
        fn put<T: Element>(dst: &mut ArrayViewMut2<T>, src: ArrayView2<f32>) {
            ndarray::Zip::from(dst).and(src).for_each(|d, &s| *d = T::from_f32(s));
        }
        dispatch!(self, v => put(v, src))
    }
}

impl Tensor2 {
    /// An all-zero tensor of `dtype`.
    ///
    /// # Panics
    /// When the allocation fails, as `Array2::zeros` ([`crate::alloc::zeros2`] is the fallible
    /// form).
    pub fn zeros(dtype: DType, dim: (usize, usize)) -> Tensor2 {
        fn z<T: bytemuck::Zeroable>(dim: (usize, usize)) -> Array2<T> {
            crate::alloc::zeros2(dim, "tensor").unwrap_or_else(|e| panic!("{e}"))
        }
        match dtype {
            DType::F32 => Tensor2::F32(z(dim)),
            DType::F16 => Tensor2::F16(z(dim)),
            DType::BF16 => Tensor2::BF16(z(dim)),
        }
    }
    /// `(rows, classes)`.
    pub fn dim(&self) -> (usize, usize) {
        dispatch!(self, v => v.dim())
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Tensor2::F32(_) => DType::F32,
            Tensor2::F16(_) => DType::F16,
            Tensor2::BF16(_) => DType::BF16,
        }
    }
    /// A read-only view.
    pub fn view(&self) -> Logits<'_> {
        match self {
            Tensor2::F32(v) => Logits::F32(v.view()),
            Tensor2::F16(v) => Logits::F16(v.view()),
            Tensor2::BF16(v) => Logits::BF16(v.view()),
        }
    }
    /// A mutable view.
    pub fn view_mut(&mut self) -> LogitsMut<'_> {
        match self {
            Tensor2::F32(v) => LogitsMut::F32(v.view_mut()),
            Tensor2::F16(v) => LogitsMut::F16(v.view_mut()),
            Tensor2::BF16(v) => LogitsMut::BF16(v.view_mut()),
        }
    }
    /// `a` in `dtype`: moved as it is for f32, rounded once (to nearest even) for f16/bf16.
    ///
    /// ```
    /// use xent::{DType, Tensor2};
    /// let t = Tensor2::from_f32(ndarray::array![[1.0f32, 1.00390625]], DType::BF16);
    /// assert_eq!(t.to_f32(), ndarray::array![[1.0f32, 1.0]]); // the tie rounds to even
    /// ```
    pub fn from_f32(a: Array2<f32>, dtype: DType) -> Tensor2 {
        // Rounded in parallel into xent's allocator, as every tensor xent allocates (large
        // blocks on huge pages where the OS gives them).
        fn round<T: Element>(a: &Array2<f32>) -> Array2<T> {
            let mut o = crate::alloc::zeros2(a.dim(), "tensor").unwrap_or_else(|e| panic!("{e}"));
            ndarray::Zip::from(&mut o).and(a).par_for_each(|o, &x| *o = T::from_f32(x));
            o
        }
        match dtype {
            DType::F32 => Tensor2::F32(a),
            DType::F16 => Tensor2::F16(round(&a)),
            DType::BF16 => Tensor2::BF16(round(&a)),
        }
    }
    /// Widened to f32.
    pub fn to_f32(&self) -> Array2<f32> {
        self.view().to_f32()
    }
}
