//! Per-run limits and the memory limiter that enforces the cap.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::error::RunError;

/// Limits applied to one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunLimits {
    /// Cap on the linear memory of the run: all the memories its component instantiates.
    pub memory_bytes: u64,
    /// The guest is stopped when this passes.
    pub hard_time_limit: Duration,
    /// After this, `soft-time-limit-exceeded` returns true.
    pub soft_time_limit: Option<Duration>,
    /// Log and progress messages kept per run, in bytes and in lines; the rest is dropped
    /// and counted.
    pub log_bytes: u64,
    pub log_lines: u64,
}

impl Default for RunLimits {
    fn default() -> Self {
        RunLimits {
            memory_bytes: 128 << 20,
            hard_time_limit: Duration::from_secs(300),
            soft_time_limit: None,
            log_bytes: 1 << 20,
            log_lines: 10_000,
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

/// The error a growth traps with when the memory of all running runs together would pass the
/// process-wide budget.
#[derive(Debug, thiserror::Error)]
#[error("the worker's memory budget of {total} bytes for all running tasks is used up")]
pub(crate) struct MemoryBudgetHit {
    pub total: u64,
}

/// Linear memory of every run of one runtime, against the operator's total.
#[derive(Debug)]
pub(crate) struct MemoryBudget {
    pub total: u64,
    used: AtomicU64,
}

impl MemoryBudget {
    pub fn new(total: u64) -> MemoryBudget {
        MemoryBudget {
            total,
            used: AtomicU64::new(0),
        }
    }

    /// Takes `bytes` from the budget, unless that would pass the total.
    fn take(&self, bytes: u64) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let Some(next) = used.checked_add(bytes).filter(|next| *next <= self.total) else {
                return false;
            };
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(actual) => used = actual,
            }
        }
    }

    fn give_back(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Traps as soon as a memory would grow past the run's cap or the process-wide budget,
/// instead of letting `memory.grow` fail: a guest's allocator would turn that failure into an
/// anonymous abort. Gives the run's memory back to the budget when dropped with its store.
pub(crate) struct MemoryLimiter {
    pub limit: u64,
    budget: Arc<MemoryBudget>,
    /// Bytes of linear memory this run holds (all its memories).
    in_use: u64,
    /// The growth last granted, given back if wasmtime then fails to grow.
    granted: u64,
}

impl MemoryLimiter {
    pub fn new(limit: u64, budget: Arc<MemoryBudget>) -> MemoryLimiter {
        MemoryLimiter {
            limit,
            budget,
            in_use: 0,
            granted: 0,
        }
    }

    pub fn in_use(&self) -> u64 {
        self.in_use
    }
}

impl Drop for MemoryLimiter {
    fn drop(&mut self) {
        self.budget.give_back(self.in_use);
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // A growth past the memory's own maximum fails anyway: take nothing for it.
        if maximum.is_some_and(|maximum| desired > maximum) {
            return Ok(false);
        }
        let growth = desired.saturating_sub(current) as u64;
        // The cap covers all the run's memories together.
        let requested = self.in_use.saturating_add(growth);
        if requested > self.limit {
            return Err(MemoryLimitHit {
                limit: self.limit,
                requested,
            }
            .into());
        }
        if !self.budget.take(growth) {
            return Err(MemoryBudgetHit {
                total: self.budget.total,
            }
            .into());
        }
        self.in_use += growth;
        self.granted = growth;
        Ok(true)
    }

    /// The growth was granted but failed (past the memory's maximum, or the system had no
    /// memory): it is given back, and `memory.grow` fails for the guest as usual.
    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        tracing::debug!(%error, "a granted memory growth failed");
        self.in_use -= self.granted;
        self.budget.give_back(self.granted);
        self.granted = 0;
        Ok(())
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
