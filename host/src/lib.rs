//! The Stem host: everything of the platform except the tasks themselves.
//!
//! Tasks are WebAssembly components that speak the `stem:task` WIT world (`wit/` at the
//! repository root). This crate runs them and moves them around:
//!
//! - [`runtime`]: the sandbox. Compiles components once, runs each invocation in a fresh
//!   instance under a memory cap, hard and soft time limits and default-deny WASI.
//! - [`task`]: what a task is (definition, options, invocation), shared by every module.
//! - [`envelope`]: a task on its way to a worker; [`codec`]: how its arguments and result are
//!   encoded.
//! - [`broker`]: delivery of envelopes (leases, priorities, delays, dead letters, broadcast).
//! - [`backend`]: task history (states, results, groups and chords, worker heartbeats).
//! - [`settlement`]: how a delivery ended, recorded in the backend and applied to its broker
//!   entry in batches.
//! - [`worker`]: runs deliveries in the sandbox and records how each ended.
//! - [`stores`]: revocations, Beat's schedule and its locks, rate limits, the component
//!   registry.
//! - [`schedule`]: when an entry fires (intervals, cron in a time zone, one-shots, solar
//!   events), as pure functions of an instant.
//! - [`beat`]: the scheduler service: leader election over the lock store, firing due slots
//!   under ids derived from them, recording each firing once; the schedule file.
//! - [`canvas`]: chains, groups and chords, stored once and advanced by the workers that run
//!   their tasks, every child under an id derived from its position.
//! - [`routing`]: the operator's routing file: which queue and priority each task gets;
//!   [`broadcast`]: tasks run once on every subscribed worker.
//! - [`control`]: commands to running workers (ping, stats, inspect, pause, shutdown,
//!   revoke) and the event stream, over the broker's broadcast channels.
//! - [`client`]: enqueueing: checks a request, fills in the task's defaults, publishes it;
//!   [`signing`]: producers sign envelopes, workers verify them.
//! - [`components`]: uploading components to the registry and fetching them for workers.
//! - [`config`]: adapters chosen by URL (`memory://`, `sqlite://PATH`, `redis://`,
//!   `postgres://`).
//! - [`digest`]: content addresses (sha256) of components.
//! - [`metrics`]: a worker's Prometheus metrics and the `/metrics` endpoint; [`telemetry`]:
//!   trace context in envelopes and spans exported over OTLP; [`dashboard`]: the web UI.
//! - [`cli`]: the `stem-host` command line.
//!
//! Each storage contract is a trait in its module, with the in-memory adapter (tests and demos)
//! and the durable ones (SQLite, Redis, Postgres) as submodules beside it. They share one
//! error type, [`storage::StorageError`], and one notion of time, [`time::Timestamp`].
//!
//! Errors are concrete types in the library modules; `anyhow` is used only in the CLI.

pub mod backend;
pub mod beat;
pub mod broadcast;
pub mod broker;
pub mod canvas;
pub mod capabilities;
pub mod cli;
pub mod client;
pub mod codec;
pub mod components;
pub mod config;
pub mod control;
pub mod dashboard;
pub mod digest;
pub mod envelope;
mod http_server;
pub mod metrics;
mod postgres;
mod redis;
pub mod routing;
pub mod runtime;
pub mod schedule;
pub mod settlement;
pub mod signing;
mod sqlite;
pub mod storage;
pub mod stores;
mod sync;
pub mod task;
pub mod telemetry;
pub mod time;
mod wait;
pub mod worker;
