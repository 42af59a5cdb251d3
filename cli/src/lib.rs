//! The `xent` command line as a library: its file formats (`io`), the row-block pipeline
//! (`blocks`), and one module per command (`cmd`). The binary (`src/main.rs`) parses the
//! arguments and calls into here; tests call the readers directly. Everything here is a client
//! of the `xent` library's public API.

#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs)]

pub mod blocks;
pub mod cmd;
pub mod common;
pub mod dist;
pub mod heap;
pub mod io;
pub mod plot;

/// Ignores SIGXFSZ, so that a write over the process's file-size limit returns an error
/// (reported, with the output's target untouched) instead of ending the process.
pub fn ignore_sigxfsz() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_IGN at start-up, before any thread exists,
    // has no memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}
