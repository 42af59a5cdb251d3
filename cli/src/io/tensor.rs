//! Input tensors: `path.npy`, `path.safetensors` (one tensor) or `path.safetensors:name`.

use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use xent::{Result, XentError};

/// Element types a tensor file can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileDType {
    /// IEEE binary64 (`float64`).
    F64,
    /// IEEE binary32 (`float32`).
    F32,
    /// IEEE binary16 (`float16`).
    F16,
    /// bfloat16: the top 16 bits of a binary32.
    BF16,
    /// Signed 64-bit integers (`int64`).
    I64,
    /// Signed 32-bit integers (`int32`).
    I32,
    /// Unsigned bytes (`uint8`).
    U8,
    /// Booleans, one byte each.
    Bool,
}

impl FileDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FileDType::F64 | FileDType::I64 => 8,
            FileDType::F32 | FileDType::I32 => 4,
            FileDType::F16 | FileDType::BF16 => 2,
            FileDType::U8 | FileDType::Bool => 1,
        }
    }

    /// The dtype's name in messages (`float32`, `bfloat16`, `int64`, ...).
    pub fn name(self) -> &'static str {
        match self {
            FileDType::F64 => "float64",
            FileDType::F32 => "float32",
            FileDType::F16 => "float16",
            FileDType::BF16 => "bfloat16",
            FileDType::I64 => "int64",
            FileDType::I32 => "int32",
            FileDType::U8 => "uint8",
            FileDType::Bool => "bool",
        }
    }

    /// The logits dtype, for floating types xent computes on.
    pub fn logits(self) -> Option<xent::DType> {
        match self {
            FileDType::F32 => Some(xent::DType::F32),
            FileDType::F16 => Some(xent::DType::F16),
            FileDType::BF16 => Some(xent::DType::BF16),
            _ => None,
        }
    }

    fn from_npy(descr: &str) -> Option<FileDType> {
        Some(match descr {
            "<f8" => FileDType::F64,
            "<f4" => FileDType::F32,
            "<f2" => FileDType::F16,
            "<i8" => FileDType::I64,
            "<i4" => FileDType::I32,
            "|u1" | "<u1" => FileDType::U8,
            "|b1" | "<b1" => FileDType::Bool,
            _ => return None,
        })
    }

    fn from_safetensors(d: safetensors::Dtype) -> Option<FileDType> {
        use safetensors::Dtype as D;
        Some(match d {
            D::F64 => FileDType::F64,
            D::F32 => FileDType::F32,
            D::F16 => FileDType::F16,
            D::BF16 => FileDType::BF16,
            D::I64 => FileDType::I64,
            D::I32 => FileDType::I32,
            D::U8 => FileDType::U8,
            D::BOOL => FileDType::Bool,
            _ => return None,
        })
    }
}

/// A format error, its message folded onto one line (parsers' messages can span several).
fn fmt_err(path: &Path, message: impl Into<String>) -> XentError {
    let message: String = message.into().split_whitespace().collect::<Vec<_>>().join(" ");
    XentError::Format { path: path.display().to_string(), message }
}

pub(crate) fn io_err(path: &Path, e: std::io::Error) -> XentError {
    XentError::io(path.display(), e)
}

/// An opened tensor: where its elements are in which file.
#[derive(Debug)]
pub struct TensorFile {
    /// The file, as given (named in error messages).
    pub path: PathBuf,
    /// The element type.
    pub dtype: FileDType,
    /// The dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Fortran (column-major) order; read whole and transposed.
    pub fortran: bool,
    file: File,
    offset: u64,
}

/// Splits `path[:name]`: the whole spec when it names a file, else the part after the last ':'
/// is a tensor name.
fn split_spec(spec: &Path) -> (PathBuf, Option<String>) {
    if spec.exists() {
        return (spec.to_path_buf(), None);
    }
    let s = spec.to_string_lossy();
    match s.rsplit_once(':') {
        Some((p, name)) if !name.is_empty() && !name.contains('/') => (PathBuf::from(p), Some(name.to_string())),
        _ => (spec.to_path_buf(), None),
    }
}

impl TensorFile {
    /// Opens `spec` (`file.npy`, `file.safetensors`, `file.safetensors:name`) and checks its
    /// header against the file's length, without reading the data.
    pub fn open(spec: &Path, what: &str) -> Result<TensorFile> {
        let (path, name) = split_spec(spec);
        let meta = std::fs::metadata(&path).map_err(|e| io_err(&path, e))?;
        if meta.is_dir() {
            return Err(XentError::Io {
                path: path.display().to_string(),
                message: format!("{what}: is a directory"),
                source: None,
            });
        }
        let mut file = File::open(&path).map_err(|e| io_err(&path, e))?;
        let mut magic = [0u8; 8];
        let got = read_up_to(&mut file, &mut magic).map_err(|e| io_err(&path, e))?;
        file.rewind().map_err(|e| io_err(&path, e))?;
        let t = if got >= 6 && &magic[..6] == b"\x93NUMPY" {
            if let Some(n) = name {
                return Err(fmt_err(&path, format!("is an .npy file: it has no tensor named {n:?}")));
            }
            Self::open_npy(path, file, meta.len())?
        } else if got == 8 {
            Self::open_safetensors(path, file, name.as_deref(), what)?
        } else {
            return Err(fmt_err(&path, format!("{what}: not an .npy or safetensors file ({} bytes)", meta.len())));
        };
        Ok(t)
    }

    fn open_npy(path: PathBuf, mut file: File, len: u64) -> Result<TensorFile> {
        // The header length comes first: refuse one longer than the file before npyz reads it.
        let mut pre = [0u8; 12];
        let got = read_up_to(&mut file, &mut pre).map_err(|e| io_err(&path, e))?;
        let hlen = match (got, pre[6]) {
            (n, 1) if n >= 10 => u16::from_le_bytes([pre[8], pre[9]]) as u64 + 10,
            (n, 2 | 3) if n >= 12 => u32::from_le_bytes([pre[8], pre[9], pre[10], pre[11]]) as u64 + 12,
            (n, v) if n >= 8 => return Err(fmt_err(&path, format!("unsupported .npy version {v}"))),
            _ => return Err(fmt_err(&path, "truncated .npy header")),
        };
        if hlen > len {
            return Err(fmt_err(&path, format!("the .npy header claims {hlen} bytes but the file has {len}")));
        }
        file.rewind().map_err(|e| io_err(&path, e))?;
        let header =
            npyz::NpyHeader::from_reader(&mut file).map_err(|e| fmt_err(&path, format!("bad .npy header: {e}")))?;
        let offset = file.stream_position().map_err(|e| io_err(&path, e))?;
        let descr = match header.dtype() {
            npyz::DType::Plain(t) => t.to_string(),
            other => return Err(fmt_err(&path, format!("unsupported structured dtype {}", other.descr()))),
        };
        let dtype = FileDType::from_npy(&descr).ok_or_else(|| fmt_err(&path, format!("unsupported dtype {descr}")))?;
        let shape = header
            .shape()
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| fmt_err(&path, format!("dimension {d} is too large"))))
            .collect::<Result<Vec<_>>>()?;
        let fortran = header.order() == npyz::Order::Fortran && shape.len() > 1;
        let t = TensorFile { path, dtype, shape, fortran, file, offset };
        t.check_length(len)?;
        Ok(t)
    }

    fn open_safetensors(path: PathBuf, file: File, name: Option<&str>, what: &str) -> Result<TensorFile> {
        // SAFETY: the map is read-only and used only to parse the header; xent does not write the
        // file. (Another process truncating it would be a bug in that process; reads then fail.)
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_err(&path, e))?;
        let (n, meta) = safetensors::SafeTensors::read_metadata(&map)
            .map_err(|e| fmt_err(&path, format!("not an .npy file or a valid safetensors file: {e:?}")))?;
        let tensors = meta.tensors();
        let (tname, info) = match name {
            Some(n) => (
                n.to_string(),
                *tensors.get(n).ok_or_else(|| {
                    let mut names: Vec<&String> = tensors.keys().collect();
                    names.sort();
                    fmt_err(&path, format!("no tensor named {n:?} (it has {names:?})"))
                })?,
            ),
            None if tensors.len() == 1 => {
                let (k, v) = tensors.iter().next().expect("one tensor");
                (k.clone(), *v)
            }
            None => {
                let mut names: Vec<&String> = tensors.keys().collect();
                names.sort();
                return Err(fmt_err(
                    &path,
                    format!(
                        "{what}: the file holds {} tensors {names:?}: pick one with {}:NAME",
                        names.len(),
                        path.display()
                    ),
                ));
            }
        };
        let dtype = FileDType::from_safetensors(info.dtype)
            .ok_or_else(|| fmt_err(&path, format!("tensor {tname:?} has unsupported dtype {:?}", info.dtype)))?;
        let offset = 8 + n as u64 + info.data_offsets.0 as u64;
        let len = map.len() as u64;
        let t = TensorFile { path, dtype, shape: info.shape.clone(), fortran: false, file, offset };
        t.check_length(len)?;
        Ok(t)
    }

    fn check_length(&self, file_len: u64) -> Result<()> {
        let n = self
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .and_then(|n| n.checked_mul(self.dtype.size() as u64))
            .ok_or_else(|| fmt_err(&self.path, format!("shape {:?} is too large", self.shape)))?;
        if self.offset + n > file_len {
            return Err(fmt_err(
                &self.path,
                format!(
                    "data is truncated: shape {:?} of {} needs {n} bytes, the file has {}",
                    self.shape,
                    self.dtype.name(),
                    file_len.saturating_sub(self.offset)
                ),
            ));
        }
        Ok(())
    }

    /// Elements in the tensor.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Reads `count` elements of `T` (of the file's dtype's size) starting at element `start`,
    /// into `out` (C order; Fortran-order files only as a whole).
    pub fn read_into<T: bytemuck::Pod>(&self, start: usize, out: &mut [T]) -> Result<()> {
        assert_eq!(std::mem::size_of::<T>(), self.dtype.size(), "element size");
        let pos = self.offset + (start * self.dtype.size()) as u64;
        super::pos::read_exact_at(&self.file, bytemuck::cast_slice_mut(out), pos).map_err(|e| io_err(&self.path, e))
    }

    /// The whole tensor as `T` (after checking the size; Fortran order transposed to C order).
    pub fn read_all<T: bytemuck::Pod + Default>(&self) -> Result<Vec<T>> {
        let n = self.elements();
        let mut v = xent::alloc::filled(n, T::default(), &format!("{}", self.path.display()))?;
        self.read_into(0, &mut v)?;
        if self.fortran {
            let rev: Vec<usize> = self.shape.iter().rev().copied().collect();
            let a = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&rev), v).expect("shape matches data");
            v = a.reversed_axes().as_standard_layout().iter().copied().collect();
        }
        Ok(v)
    }

    fn want(&self, ok: &[FileDType], what: &str) -> Result<()> {
        if ok.contains(&self.dtype) {
            return Ok(());
        }
        let names: Vec<&str> = ok.iter().map(|d| d.name()).collect();
        Err(fmt_err(&self.path, format!("{what} must be {}, got {}", names.join(" or "), self.dtype.name())))
    }

    /// Checks that the tensor has one of the numbers of dimensions in `rank`; the error names the
    /// file, `what` and the shape.
    pub fn want_rank(&self, rank: &[usize], what: &str) -> Result<()> {
        if rank.contains(&self.shape.len()) {
            return Ok(());
        }
        Err(XentError::Shape(format!(
            "{}: {what} must have {} dimension(s), got shape {:?}",
            self.path.display(),
            rank.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(" or "),
            self.shape
        )))
    }

    /// f32 values of any float dtype (widened exactly).
    pub fn read_f32(&self, what: &str) -> Result<Vec<f32>> {
        self.want(&[FileDType::F32, FileDType::F16, FileDType::BF16], what)?;
        Ok(match self.dtype {
            FileDType::F16 => self.read_all::<f16>()?.into_iter().map(f32::from).collect(),
            FileDType::BF16 => self.read_all::<bf16>()?.into_iter().map(f32::from).collect(),
            _ => self.read_all::<f32>()?,
        })
    }

    /// Integer values (int64, int32, uint8, bool) as i64: class indices, lengths, masks.
    pub fn read_ints(&self, what: &str) -> Result<Vec<i64>> {
        self.want(&[FileDType::I64, FileDType::I32, FileDType::U8, FileDType::Bool], what)?;
        Ok(match self.dtype {
            FileDType::I64 => self.read_all::<i64>()?,
            FileDType::I32 => self.read_all::<i32>()?.into_iter().map(i64::from).collect(),
            _ => self.read_all::<u8>()?.into_iter().map(i64::from).collect(),
        })
    }

    /// Any real values as f64 (expected values, probabilities).
    pub fn read_f64(&self, what: &str) -> Result<Vec<f64>> {
        Ok(match self.dtype {
            FileDType::F64 => self.read_all::<f64>()?,
            FileDType::F32 | FileDType::F16 | FileDType::BF16 => {
                self.read_f32(what)?.into_iter().map(f64::from).collect()
            }
            _ => self.read_ints(what)?.into_iter().map(|v| v as f64).collect(),
        })
    }
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// Reads a 1-D f32 tensor (weights).
pub fn read_f32_1d(spec: &Path, what: &str) -> Result<ndarray::Array1<f32>> {
    let t = TensorFile::open(spec, what)?;
    t.want_rank(&[1], what)?;
    Ok(ndarray::Array1::from(t.read_f32(what)?))
}

/// Reads a float32 weight vector given by `flag`, one entry per `each` (`expected` of them),
/// and checks with the library's own check that every entry is finite; an error names the
/// flag, the file and the entry.
pub fn read_weights(spec: &Path, flag: &str, expected: usize, each: &str) -> Result<ndarray::Array1<f32>> {
    let w = read_f32_1d(spec, flag)?;
    let name = format!("{flag} {}", spec.display());
    if w.len() != expected {
        return Err(XentError::Shape(format!("{name} has {} entries, expected {expected} (one per {each})", w.len())));
    }
    xent::check::finite_values(w.view(), &name)?;
    Ok(w)
}

/// Reads integer class indices (int64, int32; floats are refused, not truncated) of one of the
/// given ranks, flattened.
pub fn read_targets(spec: &Path, ranks: &[usize]) -> Result<(ndarray::Array1<i64>, Vec<usize>)> {
    let t = TensorFile::open(spec, "targets")?;
    t.want(&[FileDType::I64, FileDType::I32], "targets")?;
    t.want_rank(ranks, "targets")?;
    Ok((ndarray::Array1::from(t.read_ints("targets")?), t.shape.clone()))
}
