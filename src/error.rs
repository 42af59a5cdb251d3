//! The one public error type of xent.

/// Everything that can go wrong in xent, as a typed value.
///
/// Bad input is reported before any work starts; GPU failures (no adapter, validation errors,
/// device loss, buffers over the device's limits) are caught and turned into these variants
/// instead of panicking.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
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
        "no GPU adapter found ({0}); `apt-get install mesa-vulkan-drivers` gives a software Vulkan driver (lavapipe)"
    )]
    NoAdapter(String),
    /// The adapter refused to create a device.
    #[error("could not create a GPU device: {0}")]
    RequestDevice(String),
    /// wgpu reported a validation or out-of-memory error.
    #[error("GPU error: {0}")]
    Gpu(String),
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
    },
    /// A file (`.npy`, safetensors) has a dtype, layout or header xent cannot use.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// Another process of a distributed run failed (see [`crate::dist::agree`]).
    #[error("rank {rank}: {message}")]
    Remote {
        /// The failing process's rank.
        rank: usize,
        /// Its error.
        message: String,
    },
}

/// Result alias used throughout xent.
pub type Result<T, E = XentError> = std::result::Result<T, E>;
