//! Per-run limits and the memory limiter that enforces the cap.

use std::time::Duration;

use super::error::RunError;

/// Limits applied to one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunLimits {
    /// Cap on the linear memory of each memory the component instantiates.
    pub memory_bytes: u64,
    /// The guest is stopped when this passes.
    pub hard_time_limit: Duration,
    /// After this, `soft-time-limit-exceeded` returns true.
    pub soft_time_limit: Option<Duration>,
}

impl Default for RunLimits {
    fn default() -> Self {
        RunLimits {
            memory_bytes: 128 << 20,
            hard_time_limit: Duration::from_secs(300),
            soft_time_limit: None,
        }
    }
}

/// The error a refused memory growth traps with, so the run reports it as such.
#[derive(Debug, thiserror::Error)]
#[error("memory limit of {limit} bytes exceeded")]
pub(crate) struct MemoryLimitHit {
    pub limit: u64,
    pub requested: u64,
}

impl From<MemoryLimitHit> for RunError {
    fn from(hit: MemoryLimitHit) -> Self {
        RunError::MemoryLimitExceeded {
            limit: hit.limit,
            requested: hit.requested,
        }
    }
}

/// Traps as soon as a memory would grow past the cap, instead of letting `memory.grow` fail:
/// a guest's allocator would turn that failure into an anonymous abort.
pub(crate) struct MemoryLimiter {
    pub limit: u64,
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.limit {
            return Err(MemoryLimitHit {
                limit: self.limit,
                requested: desired as u64,
            }
            .into());
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}
