//! Small tasks for the canvas tests: their results show what each step received as `input`,
//! and `canvas.count`'s log lines show how often a task ran.

use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Number, Value, json};
use stem_guest::canvas::task;
use stem_guest::{TaskContext, TaskError};

/// Integers stay integers (so `1 + 2` is `3`, not `3.0`); anything else is added as floats.
fn add_numbers(a: &Number, b: &Number) -> Result<Number, TaskError> {
    if let (Some(a), Some(b)) = (a.as_i64(), b.as_i64()) {
        return a
            .checked_add(b)
            .map(Number::from)
            .ok_or_else(|| TaskError::reject(format!("{a} + {b} overflows")));
    }
    let sum = a.as_f64().unwrap_or(f64::NAN) + b.as_f64().unwrap_or(f64::NAN);
    Number::from_f64(sum).ok_or_else(|| TaskError::reject(format!("{a} + {b} is not finite")))
}

#[derive(Deserialize)]
pub struct AddArgs {
    /// The previous step's result in a chain; 0 when absent.
    #[serde(default)]
    input: Option<Number>,
    add: Number,
    /// Sleep this long first, so that tests can kill workers while a big canvas runs.
    #[serde(default)]
    sleep_ms: u64,
}

/// `input` (default 0) plus `add`, after sleeping `sleep_ms` (default 0).
#[stem_guest::task(name = "canvas.add")]
pub fn add(ctx: &TaskContext, args: AddArgs) -> Result<Number, TaskError> {
    sleep_unless_revoked(ctx, Duration::from_millis(args.sleep_ms))?;
    add_numbers(&args.input.unwrap_or_else(|| Number::from(0)), &args.add)
}

#[derive(Deserialize)]
pub struct SumArgs {
    /// A group's results, as a chord callback receives them.
    input: Vec<Number>,
}

/// The sum of `input`.
#[stem_guest::task(name = "canvas.sum")]
pub fn sum(args: SumArgs) -> Result<Number, TaskError> {
    args.input
        .iter()
        .try_fold(Number::from(0), |total, n| add_numbers(&total, n))
}

/// Returns its whole arguments, `input` and `error` included.
#[stem_guest::task(name = "canvas.echo")]
pub fn echo(args: Value) -> Result<Value, TaskError> {
    Ok(args)
}

#[derive(Deserialize)]
pub struct FailArgs {
    #[serde(default = "default_message")]
    message: String,
}

fn default_message() -> String {
    "canvas.fail failed on purpose".to_owned()
}

/// Fails with `message`, never retried.
#[stem_guest::task(name = "canvas.fail", max_retries = 0)]
pub fn fail(args: FailArgs) -> Result<(), TaskError> {
    Err(TaskError::fail(args.message))
}

#[derive(Deserialize)]
pub struct SleepArgs {
    ms: u64,
}

/// Step of the sleep between two revocation checks.
const SLEEP_STEP: Duration = Duration::from_millis(10);

/// Sleeps `ms` milliseconds in short steps, and stops with a failure once revoked.
#[stem_guest::task(name = "canvas.sleep")]
pub fn sleep(ctx: &TaskContext, args: SleepArgs) -> Result<u64, TaskError> {
    sleep_unless_revoked(ctx, Duration::from_millis(args.ms))?;
    Ok(args.ms)
}

fn sleep_unless_revoked(ctx: &TaskContext, duration: Duration) -> Result<(), TaskError> {
    let deadline = Instant::now() + duration;
    loop {
        if ctx.is_revoked() {
            return Err(TaskError::fail("revoked while sleeping"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(SLEEP_STEP));
    }
}

#[derive(Deserialize)]
pub struct CountArgs {
    #[serde(default)]
    input: Value,
}

/// Logs one line, `ran <task id>`, and passes `input` on (null when absent).
#[stem_guest::task(name = "canvas.count")]
pub fn count(ctx: &TaskContext, args: CountArgs) -> Result<Value, TaskError> {
    ctx.info(&format!("ran {}", ctx.id()));
    Ok(args.input)
}

#[derive(Deserialize)]
pub struct SpawnArgs {
    n: u32,
}

/// Submits a chord of `n` `canvas.add` (0 to n-1) into `canvas.sum`; returns the canvas id.
#[stem_guest::task(name = "canvas.spawn")]
pub fn spawn(ctx: &TaskContext, args: SpawnArgs) -> Result<String, TaskError> {
    ctx.chord(
        (0..args.n).map(|i| task("canvas.add", &json!({"add": i}))),
        task("canvas.sum", &json!({})),
    )
}
