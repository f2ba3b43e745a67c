//! Small tasks that show the SDK and exercise the worker: arithmetic, echo, busy work that
//! honours revocation and the soft time limit, and tasks that retry or fail on purpose.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use stem_guest::{TaskContext, TaskError};

#[derive(Deserialize)]
pub struct AddArgs {
    a: i64,
    b: i64,
}

/// Adds two integers.
#[stem_guest::task(name = "hello.add")]
pub fn add(args: AddArgs) -> Result<i64, TaskError> {
    args.a
        .checked_add(args.b)
        .ok_or_else(|| TaskError::reject(format!("{} + {} overflows", args.a, args.b)))
}

/// Adds two integers, at most ten times a second across every worker.
#[stem_guest::task(name = "hello.throttled", rate_limit = "10/s")]
pub fn throttled(args: AddArgs) -> Result<i64, TaskError> {
    add(args)
}

/// Returns its arguments unchanged.
#[stem_guest::task(name = "hello.echo")]
pub fn echo(ctx: &TaskContext, args: serde_json::Value) -> Result<serde_json::Value, TaskError> {
    ctx.debug("echoing");
    Ok(args)
}

#[derive(Deserialize)]
pub struct BusyArgs {
    /// How long to keep the CPU busy.
    ms: u64,
    /// Stop early when revoked or past the soft time limit (default true).
    #[serde(default = "yes")]
    cooperative: bool,
}

fn yes() -> bool {
    true
}

#[derive(Serialize)]
pub struct BusyReport {
    iterations: u64,
    elapsed_ms: u64,
    stopped_early: Option<&'static str>,
}

/// Keeps the CPU busy for `ms` milliseconds, reporting progress as it goes.
#[stem_guest::task(name = "hello.busy", time_limit = "5m")]
pub fn busy(ctx: &TaskContext, args: BusyArgs) -> Result<BusyReport, TaskError> {
    let start = Instant::now();
    let budget = Duration::from_millis(args.ms);
    let mut iterations: u64 = 0;
    let mut accumulator: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut last_progress = 0;
    while start.elapsed() < budget {
        for _ in 0..10_000 {
            accumulator = accumulator.rotate_left(5) ^ iterations;
            iterations += 1;
        }
        if args.cooperative {
            if ctx.is_revoked() {
                return Ok(report(iterations, start, Some("revoked")));
            }
            if ctx.soft_time_limit_exceeded() {
                return Ok(report(iterations, start, Some("soft time limit")));
            }
        }
        let percent = (start.elapsed().as_millis() * 100 / budget.as_millis().max(1)) as u8;
        if percent >= last_progress + 10 {
            last_progress = percent;
            ctx.progress(percent, "busy");
        }
    }
    std::hint::black_box(accumulator);
    Ok(report(iterations, start, None))
}

fn report(iterations: u64, start: Instant, stopped_early: Option<&'static str>) -> BusyReport {
    BusyReport {
        iterations,
        elapsed_ms: start.elapsed().as_millis() as u64,
        stopped_early,
    }
}

#[derive(Deserialize)]
pub struct FlakyArgs {
    /// The attempt that succeeds; earlier attempts ask to be retried.
    succeed_on: u32,
    #[serde(default = "default_retry_ms")]
    retry_after_ms: u64,
}

fn default_retry_ms() -> u64 {
    100
}

/// Asks to be retried until attempt `succeed_on`, then returns the attempt number.
#[stem_guest::task(name = "hello.flaky", max_retries = 5)]
pub fn flaky(ctx: &TaskContext, args: FlakyArgs) -> Result<u32, TaskError> {
    if ctx.attempt() < args.succeed_on {
        return Err(TaskError::retry_after(
            Duration::from_millis(args.retry_after_ms),
            format!("attempt {} of {}", ctx.attempt(), args.succeed_on),
        ));
    }
    Ok(ctx.attempt())
}

#[derive(Deserialize)]
pub struct FailArgs {
    message: String,
}

/// Always fails with the given message.
#[stem_guest::task(name = "hello.fail", max_retries = 2, retry_backoff = "100ms")]
pub fn fail(args: FailArgs) -> Result<(), TaskError> {
    Err(TaskError::fail(args.message))
}

#[derive(Deserialize, Serialize)]
pub struct MaintenanceArgs {
    action: String,
}

#[derive(Serialize)]
pub struct MaintenanceReport {
    action: String,
    /// The task id of this worker's copy (`ID@WORKER`).
    copy: String,
}

/// The seed's broadcast task: `enqueue broadcast://maintenance --args '{"action":"restart"}'`
/// runs it once on every worker started with `--broadcasts maintenance`.
#[stem_guest::task(name = "maintenance")]
pub fn maintenance(
    ctx: &TaskContext,
    args: MaintenanceArgs,
) -> Result<MaintenanceReport, TaskError> {
    ctx.info(&format!("maintenance: {}", args.action));
    Ok(MaintenanceReport {
        action: args.action,
        copy: ctx.id().to_owned(),
    })
}
