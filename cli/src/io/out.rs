//! Output files that are never left broken: each is written to a temporary file in the target's
//! directory (created before any work starts, so an unwritable path fails first) and renamed
//! over the target only when complete and flushed to disk. A failed run leaves the target as it
//! was, also when the output path is the input path.

use std::fs::File;
use std::path::{Path, PathBuf};

use xent::{Result, XentError};

use super::tensor::{io_err, FileDType};

/// One output file in the making.
#[derive(Debug)]
pub struct OutFile {
    target: PathBuf,
    temp: PathBuf,
    file: Option<File>,
}

impl OutFile {
    /// Validates `target` and creates its temporary file.
    pub fn create(target: &Path, what: &str) -> Result<OutFile> {
        let bad = |m: String| XentError::Io { path: target.display().to_string(), message: m, source: None };
        let name = target.file_name().ok_or_else(|| bad(format!("{what}: not a file name")))?;
        let dir = target.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !dir.is_dir() {
            return Err(bad(format!("{what}: directory {} does not exist", dir.display())));
        }
        if target.is_dir() {
            return Err(bad(format!("{what}: is a directory")));
        }
        // Never rename over a device, pipe or socket (/dev/full, /dev/null, a FIFO).
        if let Ok(m) = std::fs::metadata(target) {
            if !m.file_type().is_file() {
                return Err(bad(format!("{what}: not a regular file")));
            }
        }
        let mut temp = None;
        for i in 0..1000u32 {
            // The target's extension is kept last: writers that pick a format by it (plots) work.
            let ext = target.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
            let t = dir.join(format!(".{}.xent-{}-{i}.tmp{ext}", name.to_string_lossy(), std::process::id()));
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&t) {
                Ok(f) => {
                    temp = Some((t, f));
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(bad(format!("{what}: cannot write in {}: {e}", dir.display()))),
            }
        }
        let (temp, file) = temp.ok_or_else(|| bad(format!("{what}: no free temporary name")))?;
        Ok(OutFile { target: target.to_path_buf(), temp, file: Some(file) })
    }

    /// The temporary file (for writers that take a path).
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    fn file(&self) -> &File {
        self.file.as_ref().expect("open until committed")
    }

    /// Writes `bytes` at `offset`.
    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        super::pos::write_all_at(self.file(), bytes, offset).map_err(|e| io_err(&self.target, e))
    }

    /// Sets the file's length (reserves the data region).
    pub fn set_len(&self, len: u64) -> Result<()> {
        self.file().set_len(len).map_err(|e| io_err(&self.target, e))
    }

    /// Flushes the data to disk and renames the file over the target.
    pub fn commit(mut self) -> Result<()> {
        let f = self.file.take().expect("committed once");
        f.sync_all().map_err(|e| io_err(&self.target, e))?;
        drop(f);
        std::fs::rename(&self.temp, &self.target).map_err(|e| io_err(&self.target, e))
    }
}

impl Drop for OutFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Whether two paths name the same file: by the file's identity when both exist (device and
/// inode on Unix, volume and file index on Windows, through the `same-file` crate), else by
/// their canonical directories and names.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match same_file::is_same_file(a, b) {
        Ok(same) => same,
        Err(_) => {
            let canon = |p: &Path| {
                let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
                std::fs::canonicalize(dir).ok().map(|d| d.join(p.file_name().unwrap_or_default()))
            };
            canon(a).is_some() && canon(a) == canon(b)
        }
    }
}

/// The container a tensor output is written in, chosen by the file's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    /// NumPy's `.npy`.
    Npy,
    /// A safetensors file holding one tensor.
    Safetensors,
}

impl Container {
    /// The container for `path`'s extension (`.npy` or `.safetensors`), or an error naming the file.
    pub fn of(path: &Path) -> Result<Container> {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("npy") => Ok(Container::Npy),
            Some("safetensors") => Ok(Container::Safetensors),
            _ => Err(XentError::InvalidOption(format!("{}: output files end in .npy or .safetensors", path.display()))),
        }
    }
}

/// A tensor output: header written now, elements written at their offsets as they come.
#[derive(Debug)]
pub struct TensorOut {
    file: OutFile,
    data_offset: u64,
    /// The element type written.
    pub dtype: FileDType,
}

impl TensorOut {
    /// Validates the path and dtype, creates the temporary file and writes its header.
    pub fn create(path: &Path, dtype: FileDType, shape: &[usize], what: &str) -> Result<TensorOut> {
        let file = OutFile::create(path, what)?;
        let container = Container::of(path)?;
        let header = match container {
            Container::Npy => {
                npy_header(dtype, shape).map_err(|m| XentError::InvalidOption(format!("{}: {m}", path.display())))?
            }
            Container::Safetensors => safetensors_header(what, dtype, shape)?,
        };
        file.write_at(0, &header)?;
        let data = shape.iter().product::<usize>() as u64 * dtype.size() as u64;
        file.set_len(header.len() as u64 + data)?;
        Ok(TensorOut { file, data_offset: header.len() as u64, dtype })
    }

    /// Writes elements starting at element index `start`.
    pub fn write<T: bytemuck::Pod>(&self, start: usize, data: &[T]) -> Result<()> {
        debug_assert_eq!(std::mem::size_of::<T>(), self.dtype.size());
        self.file.write_at(self.data_offset + (start * self.dtype.size()) as u64, bytemuck::cast_slice(data))
    }

    /// Finishes the output: flushes it to disk and renames the temporary file over the target.
    pub fn commit(self) -> Result<()> {
        self.file.commit()
    }
}

/// An `.npy` header (version 1, C order), from the `npyz` crate.
fn npy_header(dtype: FileDType, shape: &[usize]) -> std::result::Result<Vec<u8>, String> {
    use npyz::WriterBuilder;
    let descr = match dtype {
        FileDType::F64 => "<f8",
        FileDType::F32 => "<f4",
        FileDType::F16 => "<f2",
        FileDType::I64 => "<i8",
        FileDType::I32 => "<i4",
        FileDType::U8 => "|u1",
        FileDType::Bool => "|b1",
        FileDType::BF16 => return Err("NumPy has no bfloat16: write bf16 tensors to a .safetensors file".into()),
    };
    let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut buf = Vec::new();
    npyz::WriteOptions::new_header_only()
        .dtype(npyz::DType::Plain(descr.parse().expect("valid type string")))
        .shape(&shape)
        .writer(&mut buf)
        .write_header_only()
        .map_err(|e| e.to_string())?;
    Ok(buf)
}

/// A safetensors header for one tensor named `name`, from the `safetensors` crate's metadata.
fn safetensors_header(name: &str, dtype: FileDType, shape: &[usize]) -> Result<Vec<u8>> {
    use safetensors::tensor::{Metadata, TensorInfo};
    use safetensors::Dtype;
    let d = match dtype {
        FileDType::F64 => Dtype::F64,
        FileDType::F32 => Dtype::F32,
        FileDType::F16 => Dtype::F16,
        FileDType::BF16 => Dtype::BF16,
        FileDType::I64 => Dtype::I64,
        FileDType::I32 => Dtype::I32,
        FileDType::U8 => Dtype::U8,
        FileDType::Bool => Dtype::BOOL,
    };
    let bytes = shape.iter().product::<usize>() * dtype.size();
    let info = TensorInfo { dtype: d, shape: shape.to_vec(), data_offsets: (0, bytes) };
    let meta = Metadata::new(None, vec![(name.to_string(), info)])
        .map_err(|e| XentError::InvalidOption(format!("safetensors header: {e:?}")))?;
    let mut json = serde_json::to_string(&meta).map_err(|e| XentError::InvalidOption(e.to_string()))?.into_bytes();
    // The data starts 8-byte aligned, as the safetensors crate writes it.
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    Ok(out)
}

/// The outputs of one command, validated together before the work starts: no two the same
/// file, and each distinct from the inputs unless the command overwrites an input on purpose.
#[derive(Debug, Default)]
pub struct Outputs {
    /// The tensor outputs, committed together by [`Outputs::commit`].
    pub tensors: Vec<TensorOut>,
}

impl Outputs {
    /// Checks `paths` (output, what) against each other and against `inputs`.
    pub fn check(paths: &[(&Path, &str)], inputs: &[&Path], in_place_ok: bool) -> Result<()> {
        for (i, (a, wa)) in paths.iter().enumerate() {
            for (b, wb) in &paths[..i] {
                if same_file(a, b) {
                    return Err(XentError::InvalidOption(format!("{wa} and {wb} are the same file ({})", a.display())));
                }
            }
            if !in_place_ok {
                if let Some(inp) = inputs.iter().find(|inp| same_file(a, inp)) {
                    return Err(XentError::InvalidOption(format!("{wa} {} is an input file", inp.display())));
                }
            }
        }
        Ok(())
    }

    /// Commits every output (all computations have succeeded by now).
    pub fn commit(self) -> Result<()> {
        for t in self.tensors {
            t.commit()?;
        }
        Ok(())
    }
}
