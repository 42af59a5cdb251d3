//! Positional reads and writes on every platform: `pread`/`pwrite` on Unix
//! (`std::os::unix::fs::FileExt`), `seek_read`/`seek_write` on Windows
//! (`std::os::windows::fs::FileExt`, which also move the file's cursor: harmless, since xent
//! reads and writes its files only by position), and a seek on a cloned handle elsewhere.
//!
//! Written here rather than taken from a crate: the standard library has both halves, and all
//! that is missing is Windows' loop over short transfers, a dozen lines.

use std::fs::File;
use std::io;

/// Fills `buf` from `file` at byte `offset`.
#[cfg(unix)]
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

/// Writes all of `buf` to `file` at byte `offset`.
#[cfg(unix)]
pub fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
}

/// Fills `buf` from `file` at byte `offset`.
#[cfg(windows)]
pub fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "failed to fill whole buffer")),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes all of `buf` to `file` at byte `offset`.
#[cfg(windows)]
pub fn write_all_at(file: &File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_write(buf, offset) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "failed to write whole buffer")),
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Fills `buf` from `file` at byte `offset`.
#[cfg(not(any(unix, windows)))]
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(buf)
}

/// Writes all of `buf` to `file` at byte `offset`.
#[cfg(not(any(unix, windows)))]
pub fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(buf)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_and_writes_by_position() {
        let f = tempfile_in_target();
        super::write_all_at(&f, b"world", 6).unwrap();
        super::write_all_at(&f, b"hello ", 0).unwrap();
        let mut buf = [0u8; 5];
        super::read_exact_at(&f, &mut buf, 6).unwrap();
        assert_eq!(&buf, b"world");
        let mut past = [0u8; 4];
        let e = super::read_exact_at(&f, &mut past, 9).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    fn tempfile_in_target() -> std::fs::File {
        let p = std::env::temp_dir().join(format!("xent-pos-{}", std::process::id()));
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
        let _ = std::fs::remove_file(&p);
        f
    }
}
