//! Stores the platform keeps beside the broker and the result backend.
//!
//! - [`revoke`]: revocations, which survive restarts and which workers honour before and
//!   during a run.
//! - [`schedule`]: Beat's periodic schedule entries, shared by every Beat instance.
//! - [`lock`]: named locks with an owner and a TTL, so only one Beat fires each entry.
//! - [`rate_limit`]: global per-task rate limits (`rate_limit = "10/s"`) shared by workers.
//! - [`registry`]: task components by sha256, and which one implements each task name.
//!
//! Each is a small contract with an in-memory adapter; the durable adapters (`sqlite`,
//! `redis`) sit beside it. One
//! conformance suite per contract (`host/tests/all/conformance/`) runs against every adapter.

pub mod lock;
pub mod rate_limit;
pub mod registry;
pub mod revoke;
pub mod schedule;
