//! Write Stem tasks in plain Rust and compile them to WebAssembly components.
//!
//! A task is an ordinary function marked with [`task`]. It takes a [`TaskContext`] (optional)
//! and one argument of any type that implements `serde::Deserialize`, and returns
//! `Result<impl Serialize, TaskError>`:
//!
//! ```no_run
//! use serde::Deserialize;
//! use stem_guest::{TaskContext, TaskError};
//!
//! #[derive(Deserialize)]
//! struct AddArgs { a: i64, b: i64 }
//!
//! /// Adds two numbers.
//! #[stem_guest::task(name = "hello.add", max_retries = 3)]
//! fn add(ctx: &TaskContext, args: AddArgs) -> Result<i64, TaskError> {
//!     ctx.info("adding");
//!     Ok(args.a + args.b)
//! }
//! ```
//!
//! Build the crate as a `cdylib` with `cargo build --release --target wasm32-wasip2`; the
//! resulting `.wasm` file is a component that `stem-host task upload` accepts.
//!
//! How it fits together: the WIT world `stem:task/task` (in the repository's `wit/`) is bound
//! here, once, with wit-bindgen; the crate implements the world's `handler` export itself. Each
//! `#[task]` registers its function in a table through a static constructor, which the
//! component runs before its first export call, so `describe` lists every task the final crate
//! declares and `run` dispatches by name. Authors never see WIT or wit-bindgen.
//!
//! Argument decoding errors become a `reject` naming the task and the serde error, so a bad
//! enqueue is never retried. A panic aborts the wasm instance; the host reports it as a failed
//! run together with the panic message, and the worker carries on.
//!
//! # Canvas
//!
//! A task can start a whole workflow as its child: a chain, a group or a chord built with
//! [`canvas`]. Each call returns the canvas id from the host; the workers run the canvas on
//! their own, and this task does not wait for it.
//!
//! ```no_run
//! use serde_json::{Value, json};
//! use stem_guest::canvas::{chord, task};
//! use stem_guest::{TaskContext, TaskError};
//!
//! /// Renders two weeks in parallel, then mails one receipt with both results as `input`.
//! #[stem_guest::task(name = "billing.close-month")]
//! fn close_month(ctx: &TaskContext, _args: Value) -> Result<String, TaskError> {
//!     let weeks = ["2024-W27", "2024-W28"];
//!     ctx.chord(
//!         weeks.map(|week| task("reports.render", &json!({"week": week}))),
//!         task("billing.email-receipt", &json!({"to": "finance@example.com"})).queue("emails"),
//!     )
//! }
//! ```

//!
//! # Capabilities
//!
//! A task computes and nothing else unless it declares what it needs and an operator grants
//! it (`stem-host task grant`); a run gets what both say. Declare outbound URL patterns,
//! secret names and directories in the attribute:
//!
//! ```no_run
//! use serde_json::Value;
//! use stem_guest::{TaskContext, TaskError};
//!
//! #[stem_guest::task(
//!     name = "mail.send",
//!     outbound = ["https://api.mailer.example"],
//!     secrets = ["MAILER_TOKEN"],
//!     dirs = ["/templates:ro"],
//! )]
//! fn send(ctx: &TaskContext, message: Value) -> Result<u16, TaskError> {
//!     let token = ctx.secret("MAILER_TOKEN")?;
//!     let template = std::fs::read_to_string("/templates/welcome.txt").map_err(TaskError::fail)?;
//!     let response = stem_guest::http::Request::post("https://api.mailer.example/v1/send")
//!         .header("authorization", &format!("Bearer {token}"))
//!         .json(&serde_json::json!({ "message": message, "template": template }))?
//!         .send()?;
//!     Ok(response.status)
//! }
//! ```
//!
//! The host masks secret values the run read in its logs, errors and result.

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

pub use stem_guest_macros::task;

pub mod canvas;
pub mod http;

mod bindings {
    wit_bindgen::generate!({
        world: "task",
        path: "../../wit",
    });
}

use bindings::exports::stem::task::handler;
use bindings::stem::task::{context, types};

/// Severity of a log line sent to the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl From<LogLevel> for types::LogLevel {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Trace => types::LogLevel::Trace,
            LogLevel::Debug => types::LogLevel::Debug,
            LogLevel::Info => types::LogLevel::Info,
            LogLevel::Warn => types::LogLevel::Warn,
            LogLevel::Error => types::LogLevel::Error,
        }
    }
}

/// How a run ends when it does not produce a result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskError {
    /// The run failed; the worker retries it while retries are left.
    Fail(String),
    /// Run again after `after`; counts as an attempt.
    Retry { after: Duration, message: String },
    /// The invocation can never succeed: it is not retried.
    Reject(String),
}

impl TaskError {
    pub fn fail(message: impl fmt::Display) -> Self {
        TaskError::Fail(message.to_string())
    }

    pub fn retry_after(after: Duration, message: impl fmt::Display) -> Self {
        TaskError::Retry {
            after,
            message: message.to_string(),
        }
    }

    pub fn reject(message: impl fmt::Display) -> Self {
        TaskError::Reject(message.to_string())
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskError::Fail(message) => write!(f, "failed: {message}"),
            TaskError::Retry { after, message } => {
                write!(f, "retry after {}ms: {message}", after.as_millis())
            }
            TaskError::Reject(message) => write!(f, "rejected: {message}"),
        }
    }
}

impl std::error::Error for TaskError {}

impl From<TaskError> for types::TaskError {
    fn from(error: TaskError) -> Self {
        match error {
            TaskError::Fail(message) => types::TaskError::Fail(message),
            TaskError::Retry { after, message } => types::TaskError::Retry(types::RetryRequest {
                after_ms: u64::try_from(after.as_millis()).unwrap_or(u64::MAX),
                message,
            }),
            TaskError::Reject(message) => types::TaskError::Reject(message),
        }
    }
}

/// Options of a sub-task enqueued with [`TaskContext::enqueue_with`].
#[derive(Clone, Debug, Default)]
pub struct EnqueueOptions {
    pub queue: Option<String>,
    pub priority: Option<u8>,
    pub countdown: Option<Duration>,
}

/// What a running task knows about its invocation, and its line to the host.
pub struct TaskContext {
    invocation: types::Invocation,
}

impl TaskContext {
    /// The id of this task, stable across retries.
    pub fn id(&self) -> &str {
        &self.invocation.id
    }

    pub fn name(&self) -> &str {
        &self.invocation.name
    }

    /// 1 on the first run, 2 on the first retry, and so on.
    pub fn attempt(&self) -> u32 {
        self.invocation.attempt
    }

    pub fn header(&self, key: &str) -> Option<&str> {
        self.invocation
            .headers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn log(&self, level: LogLevel, message: &str) {
        context::log(level.into(), message);
    }

    pub fn debug(&self, message: &str) {
        self.log(LogLevel::Debug, message);
    }

    pub fn info(&self, message: &str) {
        self.log(LogLevel::Info, message);
    }

    pub fn warn(&self, message: &str) {
        self.log(LogLevel::Warn, message);
    }

    pub fn error(&self, message: &str) {
        self.log(LogLevel::Error, message);
    }

    /// Reports progress (clamped to 0..=100); also counts as a heartbeat.
    pub fn progress(&self, percent: u8, message: &str) {
        context::progress(percent.min(100), message);
    }

    pub fn heartbeat(&self) {
        context::heartbeat();
    }

    /// True once this task was revoked: a long task should check it and stop.
    pub fn is_revoked(&self) -> bool {
        context::is_revoked()
    }

    /// True once the soft time limit has passed: time to wrap up before the hard limit.
    pub fn soft_time_limit_exceeded(&self) -> bool {
        context::soft_time_limit_exceeded()
    }

    /// Enqueues the task `name` with `args` and returns the new task's id.
    pub fn enqueue<A: Serialize>(&self, name: &str, args: &A) -> Result<String, TaskError> {
        self.enqueue_with(name, args, EnqueueOptions::default())
    }

    pub fn enqueue_with<A: Serialize>(
        &self,
        name: &str,
        args: &A,
        options: EnqueueOptions,
    ) -> Result<String, TaskError> {
        let args = serde_json::to_string(args).map_err(|e| {
            TaskError::fail(format!("cannot encode arguments of sub-task `{name}`: {e}"))
        })?;
        let options = types::EnqueueOptions {
            queue: options.queue,
            priority: options.priority,
            countdown_ms: options
                .countdown
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        };
        context::enqueue(name, &args, &options)
            .map_err(|e| TaskError::fail(format!("cannot enqueue sub-task `{name}`: {e}")))
    }

    /// The value of a secret this task declares (`#[task(secrets = ["NAME"])]`) and an operator
    /// granted; an error says which of the two is missing. The host masks the value wherever
    /// this run would write it (logs, errors, the result).
    pub fn secret(&self, name: &str) -> Result<String, TaskError> {
        context::secret(name).map_err(TaskError::fail)
    }

    /// Submits `canvas` as a child of this task and returns its id. See [`canvas`] for how
    /// results flow between its tasks.
    pub fn submit(&self, canvas: &canvas::Node) -> Result<String, TaskError> {
        let spec = serde_json::to_string(canvas).map_err(TaskError::fail)?;
        context::submit_canvas(&spec)
            .map_err(|e| TaskError::fail(format!("cannot submit the canvas: {e}")))
    }

    /// Submits a [`canvas::chain`] of `steps`.
    pub fn chain(
        &self,
        steps: impl IntoIterator<Item = canvas::Node>,
    ) -> Result<String, TaskError> {
        self.submit(&canvas::chain(steps))
    }

    /// Submits a [`canvas::group`] of `members`.
    pub fn group(
        &self,
        members: impl IntoIterator<Item = canvas::Node>,
    ) -> Result<String, TaskError> {
        self.submit(&canvas::group(members))
    }

    /// Submits a [`canvas::chord`]: `header` in parallel, then `callback` with their results.
    pub fn chord(
        &self,
        header: impl IntoIterator<Item = canvas::Node>,
        callback: canvas::Node,
    ) -> Result<String, TaskError> {
        self.submit(&canvas::chord(header, callback))
    }
}

/// Support for the code `#[task]` generates. Not a stable API.
#[doc(hidden)]
pub mod __private {
    use super::*;
    use serde::de::DeserializeOwned;

    /// Default options as written in `#[task(...)]`.
    pub struct StaticOptions {
        pub queue: Option<&'static str>,
        pub priority: Option<u8>,
        pub max_retries: Option<u32>,
        pub retry_backoff_ms: Option<u64>,
        pub retry_backoff_max_ms: Option<u64>,
        pub retry_jitter: Option<bool>,
        pub soft_time_limit_ms: Option<u64>,
        pub hard_time_limit_ms: Option<u64>,
        pub rate_limit: Option<&'static str>,
        pub memory_limit_bytes: Option<u64>,
        pub args_encoder: Option<&'static str>,
        pub result_encoder: Option<&'static str>,
        pub outbound: &'static [&'static str],
        pub secrets: &'static [&'static str],
        pub dirs: &'static [&'static str],
    }

    pub type RunFn = fn(&TaskContext, &str) -> Result<String, TaskError>;

    pub struct TaskEntry {
        pub name: &'static str,
        pub description: Option<&'static str>,
        pub options: StaticOptions,
        pub run: RunFn,
    }

    pub(crate) static TASKS: Mutex<Vec<TaskEntry>> = Mutex::new(Vec::new());

    /// Called once per `#[task]` by a static constructor.
    pub fn register(entry: TaskEntry) {
        TASKS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(entry);
    }

    /// Decodes the JSON arguments, runs the handler and encodes its result.
    pub fn invoke<A, R, F>(name: &str, args: &str, handler: F) -> Result<String, TaskError>
    where
        A: DeserializeOwned,
        R: Serialize,
        F: FnOnce(A) -> Result<R, TaskError>,
    {
        let args: A = serde_json::from_str(args)
            .map_err(|e| TaskError::reject(format!("invalid arguments for task `{name}`: {e}")))?;
        let result = handler(args)?;
        serde_json::to_string(&result).map_err(|e| {
            TaskError::fail(format!(
                "result of task `{name}` cannot be encoded as JSON: {e}"
            ))
        })
    }
}

struct Component;

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| v.to_string()).collect()
}

impl handler::Guest for Component {
    fn describe() -> Vec<types::TaskDefinition> {
        let tasks = __private::TASKS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut definitions: Vec<types::TaskDefinition> = tasks
            .iter()
            .map(|entry| {
                let o = &entry.options;
                types::TaskDefinition {
                    name: entry.name.to_string(),
                    description: entry.description.map(str::to_string),
                    options: types::TaskOptions {
                        queue: o.queue.map(str::to_string),
                        priority: o.priority,
                        max_retries: o.max_retries,
                        retry_backoff_ms: o.retry_backoff_ms,
                        retry_backoff_max_ms: o.retry_backoff_max_ms,
                        retry_jitter: o.retry_jitter,
                        soft_time_limit_ms: o.soft_time_limit_ms,
                        hard_time_limit_ms: o.hard_time_limit_ms,
                        rate_limit: o.rate_limit.map(str::to_string),
                        memory_limit_bytes: o.memory_limit_bytes,
                        args_encoder: o.args_encoder.map(str::to_string),
                        result_encoder: o.result_encoder.map(str::to_string),
                    },
                    capabilities: types::Capabilities {
                        outbound: strings(o.outbound),
                        secrets: strings(o.secrets),
                        dirs: strings(o.dirs),
                    },
                }
            })
            .collect();
        definitions.sort_by(|a, b| a.name.cmp(&b.name));
        definitions
    }

    fn run(mut invocation: types::Invocation) -> Result<String, types::TaskError> {
        let run = {
            let tasks = __private::TASKS
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            tasks
                .iter()
                .find(|entry| entry.name == invocation.name)
                .map(|entry| entry.run)
        };
        let Some(run) = run else {
            return Err(types::TaskError::Reject(format!(
                "this component does not implement task `{}`",
                invocation.name
            )));
        };
        let args = std::mem::take(&mut invocation.args);
        let ctx = TaskContext { invocation };
        run(&ctx, &args).map_err(Into::into)
    }
}

bindings::export!(Component with_types_in bindings);
