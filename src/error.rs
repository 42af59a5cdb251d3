//! The one public error type of xent.

use std::sync::Arc;

/// Everything that can go wrong in xent, as a typed value.
///
/// Bad input is reported before any work starts; GPU failures (no adapter, validation errors,
/// device loss, buffers over the device's limits) are caught and turned into these variants
/// instead of panicking. Errors from the operating system and from wgpu are kept as the
/// variant's `source` ([`IoSource`], [`GpuSource`]), reachable through
/// [`std::error::Error::source`], and their text is in the message.
///
/// `XentError` is `Clone` (and `PartialEq`) because one error is used in more than one place:
/// a vocabulary-parallel step hands a copy of its local error to the agreement with the other
/// ranks ([`crate::parallel::agree`]) while it still holds the buffers of the step, and callers
/// keep errors, pass them on and compare them (front ends, tests, a training loop's log). `Clone`
/// was public before the sources were kept, so removing it would break those callers. The
/// sources are therefore shared (`Arc`) rather than owned, which is why they are wrapped in
/// [`IoSource`] and [`GpuSource`] instead of appearing as `io::Error` and `wgpu::Error`.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum XentError {
    /// Two inputs disagree in shape, or an input has the wrong rank.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A class-index target is neither `ignore_index` nor in `0..classes`.
    #[error("target {target} at row {row} is out of range: expected 0..{classes} or the ignore_index")]
    TargetOutOfRange {
        /// Row of the first bad target.
        row: usize,
        /// Its value.
        target: i64,
        /// Number of classes (V).
        classes: usize,
    },
    /// An option is outside its domain (smoothing outside `[0, 1]`, temperature <= 0, ...).
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// One entry of an input is outside its domain: a NaN or negative target probability, a
    /// non-finite class or sample weight. Reported before any work starts, with the same words
    /// on every backend; `input` is the name the caller knows the input by (the option's name
    /// in the library, the flag and file on the command line).
    ///
    /// ```
    /// use ndarray::array;
    /// use xent::{check, XentError};
    /// let e = check::finite_values(array![1.0f32, f32::NAN].view(), "class_weight").unwrap_err();
    /// assert_eq!(e.to_string(), "class_weight must be finite, got NaN at index 1");
    /// assert!(matches!(e, XentError::InvalidValue { ref index, .. } if index == &[1]));
    /// ```
    #[error("{input} must be {domain}, got {} at {}", shortest(*.value), position(.index))]
    InvalidValue {
        /// The input, in the caller's words.
        input: String,
        /// What its entries must be ("finite", "finite and >= 0").
        domain: String,
        /// The first bad entry.
        value: f64,
        /// Its position: `[i]` in a vector, `[row, column]` in a matrix.
        index: Vec<usize>,
    },
    /// A tensor is larger than the device can bind or allocate.
    #[error("{what} needs {bytes} bytes, over the device limit of {limit} bytes")]
    TooLarge {
        /// Which tensor or buffer.
        what: String,
        /// Bytes it needs.
        bytes: u64,
        /// The limit it exceeds.
        limit: u64,
    },
    /// No GPU adapter could be found.
    #[error(
        "no GPU adapter found ({message}); `apt-get install mesa-vulkan-drivers` gives a software Vulkan driver \
         (lavapipe)"
    )]
    NoAdapter {
        /// Why (wgpu's words).
        message: String,
        /// wgpu's error (`wgpu::RequestAdapterError`), when there was one.
        #[source]
        source: Option<GpuSource>,
    },
    /// The adapter refused to create a device.
    #[error("could not create a GPU device: {message}")]
    RequestDevice {
        /// Why (wgpu's words).
        message: String,
        /// wgpu's error (`wgpu::RequestDeviceError`), when there was one.
        #[source]
        source: Option<GpuSource>,
    },
    /// wgpu reported a validation, internal or out-of-memory error, or a buffer could not be
    /// mapped or waited for.
    #[error("GPU error: {message}")]
    Gpu {
        /// What went wrong, with wgpu's words.
        message: String,
        /// wgpu's error (`wgpu::Error`, `wgpu::BufferAsyncError`, `wgpu::PollError`, ...), when
        /// there was one.
        #[source]
        source: Option<GpuSource>,
    },
    /// The device was lost (driver reset, destroyed, ...).
    #[error("GPU device lost: {0}")]
    DeviceLost(String),
    /// Memory for a tensor could not be allocated (a size from a file or flag that cannot be met).
    #[error("could not allocate {bytes} bytes for {what}")]
    Alloc {
        /// What the memory was for.
        what: String,
        /// Bytes asked for.
        bytes: u64,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
        /// The operating system's error, when there was one (kept for `Error::source` and
        /// its `kind()`).
        #[source]
        source: Option<IoSource>,
    },
    /// A file (`.npy`, safetensors) has a dtype, layout or header xent cannot use.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// Another process of a distributed run failed (see [`crate::parallel::agree`]).
    #[error("rank {rank}: {message}")]
    Remote {
        /// The failing process's rank.
        rank: usize,
        /// Its error.
        message: String,
    },
}

impl XentError {
    /// An [`XentError::Io`] for `path` that keeps `e` as its source.
    ///
    /// ```
    /// use std::error::Error;
    /// let e = xent::XentError::io("data.npy", std::io::Error::from(std::io::ErrorKind::NotFound));
    /// assert!(e.to_string().starts_with("data.npy: "));
    /// let source = e.source().unwrap().downcast_ref::<xent::IoSource>().unwrap();
    /// assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
    /// ```
    pub fn io(path: impl std::fmt::Display, e: std::io::Error) -> Self {
        XentError::Io { path: path.to_string(), message: e.to_string(), source: Some(IoSource(Arc::new(e))) }
    }

    /// An [`XentError::Gpu`] with `message` that keeps `e` (a wgpu error, or a framework's) as
    /// its source.
    ///
    /// ```
    /// use std::error::Error;
    /// let e = xent::XentError::gpu("map failed", std::fmt::Error);
    /// assert_eq!(e.to_string(), "GPU error: map failed");
    /// let source = e.source().unwrap().downcast_ref::<xent::GpuSource>().unwrap();
    /// assert!(source.downcast_ref::<std::fmt::Error>().is_some());
    /// ```
    pub fn gpu(message: impl std::fmt::Display, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        XentError::Gpu { message: message.to_string(), source: Some(GpuSource::new(e)) }
    }

    /// An [`XentError::Gpu`] with `message` and no source.
    pub fn gpu_message(message: impl std::fmt::Display) -> Self {
        XentError::Gpu { message: message.to_string(), source: None }
    }
}

/// A wgpu error (or a GPU framework's) kept as the source of an [`XentError`] (`Gpu`,
/// `NoAdapter`, `RequestDevice`).
///
/// Shared (`Arc`) so that `XentError` stays `Clone` (see [`XentError`]); compared by message.
/// [`GpuSource::downcast_ref`] reaches the error itself (`wgpu::Error`,
/// `wgpu::RequestAdapterError`, ...).
#[derive(Debug, Clone)]
pub struct GpuSource(Arc<dyn std::error::Error + Send + Sync + 'static>);

impl GpuSource {
    /// Keeps `e`.
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        GpuSource(Arc::new(e))
    }

    /// The error.
    pub fn get_ref(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }

    /// The error as `E`, when it is one.
    pub fn downcast_ref<E: std::error::Error + 'static>(&self) -> Option<&E> {
        self.0.downcast_ref::<E>()
    }
}

impl PartialEq for GpuSource {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_string() == other.0.to_string()
    }
}

impl std::fmt::Display for GpuSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for GpuSource {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// An [`std::io::Error`] kept as the source of an [`XentError::Io`].
///
/// Shared (`Arc`) so that `XentError` stays `Clone`: a distributed run hands one process's
/// error to every phase that reports it, and callers keep and compare errors (`PartialEq`,
/// here by kind and message, as `io::Error` has no equality of its own).
#[derive(Debug, Clone)]
pub struct IoSource(pub Arc<std::io::Error>);

impl IoSource {
    /// The error's kind.
    pub fn kind(&self) -> std::io::ErrorKind {
        self.0.kind()
    }
}

impl PartialEq for IoSource {
    fn eq(&self, other: &Self) -> bool {
        self.0.kind() == other.0.kind() && self.0.to_string() == other.0.to_string()
    }
}

impl std::fmt::Display for IoSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for IoSource {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// A value as the user wrote it: an f32 input's `-0.1` prints as `-0.1`, not as the f64
/// `-0.10000000149011612` it widens to.
fn shortest(value: f64) -> String {
    let narrow = value as f32;
    if narrow as f64 == value || value.is_nan() {
        narrow.to_string()
    } else {
        value.to_string()
    }
}

/// "index 3", "row 2, column 5": where an entry of a vector or matrix is, in words.
fn position(index: &[usize]) -> String {
    match index {
        [i] => format!("index {i}"),
        [r, c] => format!("row {r}, column {c}"),
        _ => format!("{index:?}"),
    }
}

/// Result alias used throughout xent.
pub type Result<T, E = XentError> = std::result::Result<T, E>;

/// `Ok` when every value is finite, else [`XentError::InvalidValue`] naming `input` and the
/// first offending entry (the body of [`crate::check::finite_values`], here so that the option
/// types' own checks need not import `check`).
pub(crate) fn finite<D: ndarray::Dimension>(values: ndarray::ArrayView<f32, D>, input: &str) -> Result<()> {
    use ndarray::IntoDimension;
    match values.indexed_iter().find(|(_, x)| !x.is_finite()) {
        Some((at, &x)) => Err(XentError::InvalidValue {
            input: input.to_string(),
            domain: "finite".into(),
            value: x as f64,
            index: at.into_dimension().slice().to_vec(),
        }),
        None => Ok(()),
    }
}
