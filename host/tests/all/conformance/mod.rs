//! One conformance suite per storage contract (broker, result backend, settlements, revoke,
//! lock, schedule, rate limiter and component registry), run unchanged against every adapter.
//!
//! Each suite is a list of async cases generic over a harness, and a macro that turns the list
//! into one test per case for an adapter. Adding an adapter is one line per suite, at the end
//! of the suite's file:
//!
//! ```ignore
//! broker_suite!(redis, adapters::RedisBroker::new());
//! ```
//!
//! A harness stands for one adapter's storage, fresh for every test (a new SQLite file, a new
//! in-memory store, a new Redis key prefix); every `connect` of the same harness reaches the
//! same storage, as a second process would.

pub mod adapters;
mod backend;
mod broker;
mod settlement;
mod stores;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

/// Opens connections to one adapter's storage.
#[async_trait]
pub trait Connect<T: ?Sized>: Send + Sync + 'static {
    /// A new connection to this harness's storage, working in `namespace`.
    async fn connect(&self, namespace: &str) -> Arc<T>;
}

/// Leases in the suites are short so that expiry is observable; margins absorb scheduling.
pub const SHORT: Duration = Duration::from_millis(400);

/// Long enough that nothing the suites wait for should take it.
pub const PATIENCE: Duration = Duration::from_secs(10);
