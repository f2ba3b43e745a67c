//! Guest stdout and stderr: captured in bounded buffers, never the host's own streams.
//!
//! Writes past the bound are dropped and counted rather than failing, so a chatty guest keeps
//! running; what was kept goes to the host log after the run and into crash reports.

use std::sync::{Arc, Mutex};

use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::sync::lock;

#[derive(Default)]
struct Buffer {
    bytes: Vec<u8>,
    dropped: usize,
}

/// One bounded capture buffer; clones share it.
#[derive(Clone)]
pub(crate) struct CapturedOutput {
    capacity: usize,
    buffer: Arc<Mutex<Buffer>>,
}

impl CapturedOutput {
    pub fn new(capacity: usize) -> Self {
        CapturedOutput {
            capacity,
            buffer: Arc::default(),
        }
    }

    /// What the guest wrote, lossily decoded, with a note when some of it was dropped.
    pub fn text(&self) -> String {
        let buffer = lock(&self.buffer);
        let mut text = String::from_utf8_lossy(&buffer.bytes)
            .trim_end()
            .to_string();
        if buffer.dropped > 0 {
            text.push_str(&format!(" [{} more bytes dropped]", buffer.dropped));
        }
        text
    }

    /// Empties the buffer, for the next run of a warm instance.
    pub fn clear(&self) {
        *lock(&self.buffer) = Buffer::default();
    }
}

impl IsTerminal for CapturedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        // Only WASIp3 guests use this stream, and the host links WASIp2 alone.
        Box::new(tokio::io::sink())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CapturedOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for CapturedOutput {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        let mut buffer = lock(&self.buffer);
        let room = self.capacity.saturating_sub(buffer.bytes.len());
        let kept = bytes.len().min(room);
        buffer.bytes.extend_from_slice(&bytes[..kept]);
        buffer.dropped += bytes.len() - kept;
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}
