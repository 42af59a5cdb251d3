//! What every command shares: the backend flags, stdout that never panics, JSON lines, the
//! reduction flag and the progress bar.

use std::io::Write;
use std::time::Duration;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};
use xent::{Backend, Cpu, Reduction, Result, XentError};

/// Which backend runs a command.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// A GPU through wgpu (Vulkan, Metal or DX12).
    Gpu,
    /// xent's multi-threaded CPU path.
    Cpu,
}

/// Which backend runs a command, or `auto`: the GPU when an adapter exists, else the CPU.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// The GPU when this build has it and an adapter is found, else the CPU (the output's
    /// `backend` field says which ran).
    Auto,
    /// The GPU (wgpu: Vulkan, Metal or DX12); an error when there is no adapter.
    Gpu,
    /// The CPU (AVX-512 / AVX2 / portable row kernels).
    Cpu,
}

/// The `--backend` and `--threads` options shared by the commands.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Backend")]
pub struct BackendArgs {
    /// Backend to run on.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendChoice,
    /// CPU worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// An opened backend.
pub enum Engine {
    /// The CPU backend.
    Cpu(Cpu),
    /// A wgpu context on the default adapter.
    #[cfg(feature = "gpu")]
    Gpu(xent::GpuContext),
}

impl Engine {
    /// The backend as xent's `Backend` trait.
    pub fn backend(&self) -> &dyn Backend {
        match self {
            Engine::Cpu(c) => c,
            #[cfg(feature = "gpu")]
            Engine::Gpu(g) => g,
        }
    }

    /// The backend's name, as the JSON output reports it (`cpu` or `gpu`).
    pub fn name(&self) -> &'static str {
        self.backend().name()
    }
}

impl BackendArgs {
    /// Opens the chosen backend: a CPU pool of `--threads` threads, or a GPU context (an error
    /// naming the problem when there is no adapter, or in a build without the `gpu` feature).
    pub fn open(&self) -> Result<Engine> {
        match self.backend {
            BackendChoice::Cpu => Ok(Engine::Cpu(cpu(self.threads)?)),
            #[cfg(feature = "gpu")]
            BackendChoice::Gpu => Ok(Engine::Gpu(xent::GpuContext::new()?)),
            #[cfg(not(feature = "gpu"))]
            BackendChoice::Gpu => {
                Err(XentError::InvalidOption("this xent was built without the `gpu` feature: use --backend cpu".into()))
            }
            // No adapter (or none that gives a device) means the CPU; any other GPU failure
            // is reported, not hidden behind a silent fallback.
            #[cfg(feature = "gpu")]
            BackendChoice::Auto => match xent::GpuContext::new() {
                Ok(g) => Ok(Engine::Gpu(g)),
                Err(XentError::NoAdapter { .. } | XentError::RequestDevice { .. }) => {
                    Ok(Engine::Cpu(cpu(self.threads)?))
                }
                Err(e) => Err(e),
            },
            #[cfg(not(feature = "gpu"))]
            BackendChoice::Auto => Ok(Engine::Cpu(cpu(self.threads)?)),
        }
    }
}

/// A CPU backend with `threads` worker threads, or one per core.
pub fn cpu(threads: Option<usize>) -> Result<Cpu> {
    match threads {
        Some(t) => Cpu::with_threads(t),
        None => Ok(Cpu::new()),
    }
}

/// Writes `text` to stdout. A closed pipe ends the process quietly with 141 (the status a
/// SIGPIPE gives); any other failure (a full disk) is one error line and status 1.
pub fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let res = out.write_all(text.as_bytes()).and_then(|_| out.flush());
    match res {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(141),
        Err(e) => {
            eprintln!("error: writing to stdout: {e}");
            std::process::exit(1);
        }
    }
}

/// One line on stderr; a closed or full stderr is ignored (there is nowhere left to report it).
pub fn error_line(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{text}");
}

/// [`emit`] with a newline.
pub fn emitln(text: impl AsRef<str>) {
    emit(&format!("{}\n", text.as_ref()));
}

/// A number as JSON, with non-finite values as the strings "NaN", "Infinity", "-Infinity".
pub fn num(x: f64) -> Value {
    if x.is_nan() {
        Value::String("NaN".into())
    } else if x.is_infinite() {
        Value::String(if x > 0.0 { "Infinity" } else { "-Infinity" }.into())
    } else {
        serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
    }
}

/// A JSON array of numbers, with non-finite values as strings (see [`num`]).
pub fn nums(v: impl IntoIterator<Item = f64>) -> Value {
    Value::Array(v.into_iter().map(num).collect())
}

/// A JSON object builder.
#[derive(Default)]
pub struct Obj(pub Map<String, Value>);

impl Obj {
    /// Sets key `k` to `v`.
    pub fn set(mut self, k: &str, v: impl Into<Value>) -> Self {
        self.0.insert(k.into(), v.into());
        self
    }
    /// Sets key `k` to the number `x` (non-finite values as strings, see [`num`]).
    pub fn num(self, k: &str, x: f64) -> Self {
        self.set(k, num(x))
    }
    /// The object as one line of JSON.
    pub fn line(&self) -> String {
        Value::Object(self.0.clone()).to_string()
    }

    /// Prints one JSON line (`--json`) or `key: value` lines for people.
    pub fn print(&self, json: bool) {
        if json {
            emitln(self.line());
        } else {
            let text: String = self.0.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
            emit(&text);
        }
    }
}

/// The `--reduction` option.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum ReductionArg {
    /// The mean over counted rows (PyTorch's weighted mean).
    Mean,
    /// The sum over rows.
    Sum,
    /// One loss per row.
    None,
}

impl From<ReductionArg> for Reduction {
    fn from(r: ReductionArg) -> Reduction {
        match r {
            ReductionArg::Mean => Reduction::Mean,
            ReductionArg::Sum => Reduction::Sum,
            ReductionArg::None => Reduction::None,
        }
    }
}

impl ReductionArg {
    /// The reduction's name as the output reports it.
    pub fn name(self) -> &'static str {
        match self {
            ReductionArg::Mean => "mean",
            ReductionArg::Sum => "sum",
            ReductionArg::None => "none",
        }
    }
}

/// A progress bar on stderr (drawn only when stderr is a terminal): rows done, rate, ETA.
pub fn progress(rows: u64, bytes_per_row: f64) -> ProgressBar {
    let pb = ProgressBar::new(rows);
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} rows {msg} ETA {eta}")
            .expect("valid template"),
    );
    pb.enable_steady_tick(Duration::from_millis(200));
    pb.set_message(String::new());
    let _ = bytes_per_row;
    pb
}

/// Updates the bar's rate message (GB/s of logits read).
pub fn progress_rate(pb: &ProgressBar, bytes: f64, started: std::time::Instant) {
    let s = started.elapsed().as_secs_f64().max(1e-9);
    pb.set_message(format!("{:.2} GB/s", bytes / s / 1e9));
}

/// Peak resident memory of this process so far (VmHWM), in bytes; 0 where unknown.
pub fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// A flag value that must be finite and >= 0.
pub fn non_negative(x: f32, flag: &str) -> Result<f32> {
    if x.is_finite() && x >= 0.0 {
        Ok(x)
    } else {
        Err(XentError::InvalidOption(format!("{flag} must be finite and >= 0, got {x}")))
    }
}

/// The first `bytes` bytes of a buffer, rounded up to whole 4-byte words.
#[cfg(feature = "gpu")]
#[cfg_attr(docsrs, doc(cfg(feature = "gpu")))]
pub fn head(b: &wgpu::Buffer, bytes: u64) -> wgpu::BufferSlice<'_> {
    b.slice(..bytes.max(4).next_multiple_of(4))
}
