//! The rate limiter: a global limit per task name (`rate_limit = "10/s"`), shared by every
//! worker that uses the same limiter.
//!
//! The algorithm is GCRA (a token bucket of capacity one): for `N/period` one run is allowed
//! every `period / N`, so runs spread out evenly, as Celery's rate limits do. A worker that is
//! refused puts the delivery back for the time the limiter names: a limited task is delayed,
//! never failed.

pub mod memory;
pub mod postgres;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;

use crate::storage::StorageError;
use crate::task::RateLimit;
use crate::time::Timestamp;

/// Whether a run may start now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permit {
    Granted,
    /// Not before this much time has passed.
    RetryAfter(Duration),
}

/// Global rate limits, keyed by task name (or any key).
#[async_trait]
pub trait RateLimiter: Send + Sync {
    /// Takes the next slot of `key` under `limit` if it is due.
    async fn acquire(&self, key: &str, limit: RateLimit) -> Result<Permit, StorageError>;
}

/// The time between two runs under `limit`, in milliseconds (at least 1).
pub(crate) fn interval_ms(limit: RateLimit) -> u64 {
    let period = u64::try_from(limit.period.as_millis()).unwrap_or(u64::MAX);
    (period / u64::from(limit.count.max(1))).max(1)
}

/// One GCRA step: with the theoretical arrival time `tat` (if any) at `now`, the permit and
/// the new arrival time to store.
pub(crate) fn gcra(
    tat: Option<Timestamp>,
    now: Timestamp,
    interval_ms: u64,
) -> (Permit, Timestamp) {
    let tat = tat.unwrap_or(now).max(now);
    if tat > now {
        return (Permit::RetryAfter(tat.saturating_since(now)), tat);
    }
    (
        Permit::Granted,
        Timestamp::from_millis(now.as_millis() + interval_ms),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_spread_one_interval_apart() {
        let limit = RateLimit::parse("10/s").unwrap();
        let interval = interval_ms(limit);
        assert_eq!(interval, 100);
        let start = Timestamp::from_millis(1_000);
        let (first, tat) = gcra(None, start, interval);
        assert_eq!(first, Permit::Granted);
        let (second, same) = gcra(Some(tat), Timestamp::from_millis(1_030), interval);
        assert_eq!(second, Permit::RetryAfter(Duration::from_millis(70)));
        assert_eq!(same, tat, "a refusal does not move the schedule");
        let (third, _) = gcra(Some(tat), Timestamp::from_millis(1_100), interval);
        assert_eq!(third, Permit::Granted);
        assert_eq!(interval_ms(RateLimit::parse("1000000/s").unwrap()), 1);
    }
}
