//! Minimal `.npy` reading and writing (little-endian f32/f64/i64/i32/u8/bool, C or Fortran order).

use std::io::Write;
use std::path::Path;

use ndarray::{Array1, Array2, ArrayD, IxDyn};

use crate::error::{Result, XentError};

/// The element data of an `.npy` file.
#[derive(Debug, Clone, PartialEq)]
pub enum NpyData {
    /// `<f4`
    F32(Vec<f32>),
    /// `<f8`
    F64(Vec<f64>),
    /// `<i8`
    I64(Vec<i64>),
    /// `<i4`
    I32(Vec<i32>),
    /// `|u1` or `|b1`
    U8(Vec<u8>),
}

impl NpyData {
    fn dtype(&self) -> &'static str {
        match self {
            NpyData::F32(_) => "float32",
            NpyData::F64(_) => "float64",
            NpyData::I64(_) => "int64",
            NpyData::I32(_) => "int32",
            NpyData::U8(_) => "uint8",
        }
    }
}

/// An `.npy` array in C order.
#[derive(Debug, Clone, PartialEq)]
pub struct Npy {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Elements in C (row-major) order.
    pub data: NpyData,
}

fn fmt_err(path: &Path, message: impl Into<String>) -> XentError {
    XentError::Format { path: path.display().to_string(), message: message.into() }
}

fn field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let start = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[start..].trim_start().strip_prefix(':')?.trim_start();
    if let Some(r) = rest.strip_prefix('(') {
        return Some(&r[..r.find(')')?]);
    }
    if let Some(r) = rest.strip_prefix('\'') {
        return Some(&r[..r.find('\'')?]);
    }
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

/// Reads any supported `.npy` file. The data is read straight into the typed vector, so peak
/// memory is the array itself (no second copy of the file's bytes).
pub fn read(path: impl AsRef<Path>) -> Result<Npy> {
    use std::io::Read;
    let path = path.as_ref();
    let io = |e: std::io::Error| XentError::Io { path: path.display().to_string(), message: e.to_string() };
    let mut f = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
    let mut pre = [0u8; 8];
    f.read_exact(&mut pre).map_err(|_| fmt_err(path, "not an .npy file (too short)"))?;
    if &pre[..6] != b"\x93NUMPY" {
        return Err(fmt_err(path, "not an .npy file (bad magic)"));
    }
    let hlen = match pre[6] {
        1 => {
            let mut b = [0u8; 2];
            f.read_exact(&mut b).map_err(io)?;
            u16::from_le_bytes(b) as usize
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            f.read_exact(&mut b).map_err(io)?;
            u32::from_le_bytes(b) as usize
        }
        v => return Err(fmt_err(path, format!("unsupported .npy version {v}"))),
    };
    let mut hbytes = vec![0u8; hlen];
    f.read_exact(&mut hbytes).map_err(|_| fmt_err(path, "truncated header"))?;
    let header = std::str::from_utf8(&hbytes).map_err(|_| fmt_err(path, "non-UTF-8 header"))?;
    let descr = field(header, "descr").ok_or_else(|| fmt_err(path, "header has no descr"))?;
    let fortran = field(header, "fortran_order").ok_or_else(|| fmt_err(path, "header has no fortran_order"))?;
    let shape_s = field(header, "shape").ok_or_else(|| fmt_err(path, "header has no shape"))?;
    let shape = shape_s
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| fmt_err(path, format!("bad shape ({shape_s})"))))
        .collect::<Result<Vec<_>>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| fmt_err(path, format!("shape ({shape_s}) is too large")))?;
    fn fill<T: bytemuck::Pod + Default>(f: &mut impl Read, count: usize, path: &Path) -> Result<Vec<T>> {
        // Little-endian files on a little-endian host: bytes go straight into the vector.
        let mut v = vec![T::default(); count];
        f.read_exact(bytemuck::cast_slice_mut(&mut v))
            .map_err(|_| fmt_err(path, format!("data is truncated: fewer than {count} elements")))?;
        Ok(v)
    }
    let data = match descr {
        "<f4" => NpyData::F32(fill(&mut f, count, path)?),
        "<f8" => NpyData::F64(fill(&mut f, count, path)?),
        "<i8" => NpyData::I64(fill(&mut f, count, path)?),
        "<i4" => NpyData::I32(fill(&mut f, count, path)?),
        "|u1" | "|b1" => NpyData::U8(fill(&mut f, count, path)?),
        other => return Err(fmt_err(path, format!("unsupported dtype {other}"))),
    };
    let mut npy = Npy { shape, data };
    if fortran.trim() == "True" && npy.shape.len() > 1 {
        npy = to_c_order(npy);
    }
    Ok(npy)
}

fn to_c_order(npy: Npy) -> Npy {
    fn reorder<T: Clone>(v: Vec<T>, shape: &[usize]) -> Vec<T> {
        let rev: Vec<usize> = shape.iter().rev().copied().collect();
        let a = ArrayD::from_shape_vec(IxDyn(&rev), v).expect("shape matches data");
        a.reversed_axes().as_standard_layout().iter().cloned().collect()
    }
    let s = npy.shape.clone();
    let data = match npy.data {
        NpyData::F32(v) => NpyData::F32(reorder(v, &s)),
        NpyData::F64(v) => NpyData::F64(reorder(v, &s)),
        NpyData::I64(v) => NpyData::I64(reorder(v, &s)),
        NpyData::I32(v) => NpyData::I32(reorder(v, &s)),
        NpyData::U8(v) => NpyData::U8(reorder(v, &s)),
    };
    Npy { shape: s, data }
}

fn want_rank(path: &Path, npy: &Npy, rank: usize, what: &str) -> Result<()> {
    if npy.shape.len() != rank {
        return Err(XentError::Shape(format!(
            "{}: {what} must have {rank} dimension(s), got shape {:?}",
            path.display(),
            npy.shape
        )));
    }
    Ok(())
}

/// Reads an f32 `[N, V]` array (logits, probabilities).
pub fn read_f32_2d(path: impl AsRef<Path>, what: &str) -> Result<Array2<f32>> {
    let path = path.as_ref();
    let npy = read(path)?;
    want_rank(path, &npy, 2, what)?;
    match npy.data {
        NpyData::F32(v) => Ok(Array2::from_shape_vec((npy.shape[0], npy.shape[1]), v).expect("shape")),
        d => Err(fmt_err(path, format!("{what} must be float32, got {}", d.dtype()))),
    }
}

/// Reads an f32 array of any rank.
pub fn read_f32_nd(path: impl AsRef<Path>, what: &str) -> Result<ArrayD<f32>> {
    let path = path.as_ref();
    let npy = read(path)?;
    match npy.data {
        NpyData::F32(v) => Ok(ArrayD::from_shape_vec(IxDyn(&npy.shape), v).expect("shape matches data")),
        d => Err(fmt_err(path, format!("{what} must be float32, got {}", d.dtype()))),
    }
}

/// Reads an f32 `[N]` array (weights).
pub fn read_f32_1d(path: impl AsRef<Path>, what: &str) -> Result<Array1<f32>> {
    let path = path.as_ref();
    let npy = read(path)?;
    want_rank(path, &npy, 1, what)?;
    match npy.data {
        NpyData::F32(v) => Ok(Array1::from(v)),
        d => Err(fmt_err(path, format!("{what} must be float32, got {}", d.dtype()))),
    }
}

/// Reads int64 or int32 class indices `[N]`.
pub fn read_targets(path: impl AsRef<Path>) -> Result<Array1<i64>> {
    let path = path.as_ref();
    let npy = read(path)?;
    want_rank(path, &npy, 1, "targets")?;
    match npy.data {
        NpyData::I64(v) => Ok(Array1::from(v)),
        NpyData::I32(v) => Ok(v.into_iter().map(i64::from).collect()),
        d => Err(fmt_err(path, format!("targets must be int64 or int32, got {}", d.dtype()))),
    }
}

/// Reads any real array as f64 (for expected values in tests and golden files).
pub fn read_f64(path: impl AsRef<Path>) -> Result<ArrayD<f64>> {
    let path = path.as_ref();
    let npy = read(path)?;
    let v: Vec<f64> = match npy.data {
        NpyData::F32(v) => v.into_iter().map(f64::from).collect(),
        NpyData::F64(v) => v,
        NpyData::I64(v) => v.into_iter().map(|x| x as f64).collect(),
        NpyData::I32(v) => v.into_iter().map(f64::from).collect(),
        NpyData::U8(v) => v.into_iter().map(f64::from).collect(),
    };
    Ok(ArrayD::from_shape_vec(IxDyn(&npy.shape), v).expect("shape matches data"))
}

/// Writes an f32 array of `shape` in C order.
pub fn write_f32(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> Result<()> {
    let path = path.as_ref();
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_s = if dims.len() == 1 { format!("{},", dims[0]) } else { dims.join(", ") };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({shape_s}), }}");
    // Pad so that the data starts on a 64-byte boundary, header ends with '\n'.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let io = |e: std::io::Error| XentError::Io { path: path.display().to_string(), message: e.to_string() };
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    f.write_all(b"\x93NUMPY\x01\x00").map_err(io)?;
    f.write_all(&(header.len() as u16).to_le_bytes()).map_err(io)?;
    f.write_all(header.as_bytes()).map_err(io)?;
    f.write_all(bytemuck::cast_slice(data)).map_err(io)?;
    f.flush().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = std::env::temp_dir().join(format!("xent-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.npy");
        write_f32(&p, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.5]).unwrap();
        let a = read_f32_2d(&p, "logits").unwrap();
        assert_eq!(a, ndarray::array![[1.0, 2.0, 3.0], [4.0, 5.0, 6.5]]);
        assert!(matches!(read_targets(&p), Err(XentError::Shape(_))));
        write_f32(&p, &[3], &[1.0, 2.0, 3.0]).unwrap();
        assert!(matches!(read_targets(&p), Err(XentError::Format { .. })));
        assert_eq!(read_f32_1d(&p, "w").unwrap().len(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
