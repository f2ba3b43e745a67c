//! Integration tests of the host, in one binary so that wasmtime is linked once.
//!
//! The guest components are built from `examples/` and `tests/guests/` once per run, by
//! `scripts/build-guests` (or taken from `STEM_GUEST_DIR`).

mod beat;
mod canvas;
mod capabilities;
mod cli;
mod conformance;
mod control;
mod dashboard;
mod e2e;
mod hardening;
mod health;
mod languages;
mod observability;
mod platform;
mod postgres_enqueue;
mod postgres_tls;
mod redis_recovery;
mod redis_server;
mod redis_tls;
mod routing;
mod sandbox;
mod signing;
mod sqlite_crash;
mod support;
