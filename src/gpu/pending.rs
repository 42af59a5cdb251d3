//! Results on their way back from the device: a staging buffer that the caller's submission
//! fills, mapped only when the caller asks (blocking with `wait`, or polled with `try_get`).

use std::sync::mpsc::{Receiver, TryRecvError};

use crate::error::{Result, XentError};
use crate::gpu::context::GpuContext;
use crate::gpu::pool::Pooled;

type MapResult = std::result::Result<(), wgpu::BufferAsyncError>;

/// `len` bytes of a staging buffer filled by a recorded copy.
pub(crate) struct PendingBytes {
    ctx: GpuContext,
    staging: Option<Pooled>,
    len: u64,
    map: Option<Receiver<MapResult>>,
}

impl PendingBytes {
    /// `staging` (MAP_READ) receives `len` bytes from a copy the caller records; `None` when
    /// nothing was recorded (the bytes are zeros).
    pub fn new(ctx: &GpuContext, staging: Option<Pooled>, len: u64) -> Self {
        PendingBytes { ctx: ctx.clone(), staging, len, map: None }
    }

    /// Waits for the submission that holds the copy and returns the bytes.
    pub fn wait(self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.len as usize];
        if let Some(s) = &self.staging {
            self.ctx.read_mapped(s, self.len, &mut out)?;
        }
        Ok(out)
    }

    /// Without blocking: `None` while the copy has not finished, then the bytes once. Call it
    /// only after the encoder holding the copy was submitted.
    pub fn try_get(&mut self) -> Option<Result<Vec<u8>>> {
        let Some(staging) = &self.staging else {
            return Some(Ok(vec![0u8; self.len as usize]));
        };
        if self.map.is_none() {
            let (tx, rx) = std::sync::mpsc::channel();
            let len = self.len;
            if let Err(e) = self.ctx.scoped(|| {
                staging.map_async(wgpu::MapMode::Read, 0..len, move |r| {
                    let _ = tx.send(r);
                })
            }) {
                return Some(Err(e));
            }
            self.map = Some(rx);
        }
        let _ = self.ctx.device().poll(wgpu::PollType::Poll);
        match self.map.as_ref().expect("mapping").try_recv() {
            Err(TryRecvError::Empty) => None,
            Err(e) => Some(Err(XentError::gpu(format!("map callback dropped: {e}"), e))),
            Ok(Err(e)) => Some(Err(XentError::gpu(format!("map failed: {e}"), e))),
            Ok(Ok(())) => {
                let bytes = match staging.get_mapped_range(0..self.len) {
                    Ok(view) => view.to_vec(),
                    Err(e) => return Some(Err(XentError::gpu(format!("mapped range: {e}"), e))),
                };
                staging.unmap();
                self.ctx.inner.bytes_to_host.fetch_add(self.len, std::sync::atomic::Ordering::Relaxed);
                Some(Ok(bytes))
            }
        }
    }
}
