//! The Stem host: everything of the platform except the tasks themselves.
//!
//! Tasks are WebAssembly components that speak the `stem:task` WIT world (`wit/` at the
//! repository root). This crate runs them and moves them around:
//!
//! - [`runtime`]: the sandbox. Compiles components once, runs each invocation in a fresh
//!   instance under a memory cap, hard and soft time limits and default-deny WASI.
//! - [`task`]: what a task is (definition, options, invocation), shared by every module.
//! - [`digest`]: content addresses (sha256) of components.
//! - [`cli`]: the `stem-host` command line.
//!
//! Errors are concrete types in the library modules; `anyhow` is used only in the CLI.

pub mod cli;
pub mod digest;
pub mod runtime;
pub mod task;
