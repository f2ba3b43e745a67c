//! The in-memory rate limiter: limits shared by the workers of one process only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{Permit, RateLimiter, gcra, interval_ms};
use crate::storage::StorageError;
use crate::task::RateLimit;
use crate::time::Timestamp;

/// Arrival times by key. Clones share them.
#[derive(Clone, Default)]
pub struct MemoryRateLimiter {
    arrivals: Arc<Mutex<HashMap<String, Timestamp>>>,
}

#[async_trait]
impl RateLimiter for MemoryRateLimiter {
    async fn acquire(&self, key: &str, limit: RateLimit) -> Result<Permit, StorageError> {
        let mut arrivals = self.arrivals.lock().unwrap_or_else(|p| p.into_inner());
        let (permit, tat) = gcra(
            arrivals.get(key).copied(),
            Timestamp::now(),
            interval_ms(limit),
        );
        arrivals.insert(key.to_owned(), tat);
        Ok(permit)
    }
}
