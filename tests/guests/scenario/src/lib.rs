//! The cross-language scenario in Rust: the same tasks as `tests/guests/scenario-py` and
//! `tests/guests/scenario-js`, under the prefix `rs.`.

use serde::Deserialize;
use stem_guest::{TaskContext, TaskError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddArgs {
    a: i64,
    b: i64,
}

/// Adds two integers.
#[stem_guest::task(name = "rs.add")]
pub fn add(args: AddArgs) -> Result<i64, TaskError> {
    args.a
        .checked_add(args.b)
        .ok_or_else(|| TaskError::reject("the sum overflows"))
}

#[derive(Deserialize)]
pub struct MessageArgs {
    message: String,
}

/// Fails, so the worker retries it twice, then records it failed.
#[stem_guest::task(name = "rs.fail", max_retries = 2, retry_backoff = "100ms")]
pub fn fail(args: MessageArgs) -> Result<(), TaskError> {
    Err(TaskError::fail(format!("ValueError: {}", args.message)))
}

#[derive(Deserialize)]
pub struct RejectArgs {
    reason: String,
}

#[stem_guest::task(name = "rs.reject")]
pub fn reject(args: RejectArgs) -> Result<(), TaskError> {
    Err(TaskError::reject(args.reason))
}

/// Loops until the hard time limit stops it.
#[stem_guest::task(name = "rs.spin", time_limit = "2s")]
pub fn spin(_args: serde_json::Value) -> Result<(), TaskError> {
    let mut counter = 0u64;
    loop {
        counter = std::hint::black_box(counter.wrapping_add(1));
    }
}

/// Allocates until the memory limit stops it.
#[stem_guest::task(name = "rs.hog", memory_limit = "96MiB")]
pub fn hog(_args: serde_json::Value) -> Result<usize, TaskError> {
    let mut blocks = Vec::new();
    loop {
        blocks.push(std::hint::black_box(vec![1u8; 1 << 20]));
    }
}

#[derive(Deserialize)]
pub struct SpawnArgs {
    n: i64,
}

/// Enqueues rs.add(n, n) and returns its id.
#[stem_guest::task(name = "rs.spawn")]
pub fn spawn(ctx: &TaskContext, args: SpawnArgs) -> Result<String, TaskError> {
    ctx.enqueue("rs.add", &serde_json::json!({ "a": args.n, "b": args.n }))
}
