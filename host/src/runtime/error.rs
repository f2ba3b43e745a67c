//! Errors of the sandbox: loading a component, and the ways one run can end badly.

use std::time::Duration;

/// Why a component could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("not a WebAssembly component: {0}")]
    NotAComponent(String),
    #[error("invalid component: {0}")]
    Compile(String),
    #[error("the component does not fit the stem:task world: {0}")]
    WrongWorld(String),
    #[error("describe failed: {0}")]
    Describe(RunError),
    #[error("the component declares no tasks")]
    NoTasks,
    #[error("the component declares task `{0}` more than once")]
    DuplicateTask(String),
    #[error(
        "the component declares an invalid task name `{0}`: use letters, digits, `.`, `_`, `-` and `:`"
    )]
    InvalidTaskName(String),
    #[error("the component declares task `{name}` with {problem}")]
    InvalidOption { name: String, problem: String },
    #[error(
        "task `{name}` declares memory_limit = {declared} bytes, but the component needs \
         {needed} bytes of memory to start: raise memory_limit to at least {needed} bytes"
    )]
    MemoryBelowStart {
        name: String,
        declared: u64,
        needed: u64,
    },
}

/// How a run ended without a result. The variants are a closed set: the worker maps each to
/// a retry decision and a final state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// The guest returned `fail`.
    #[error("task failed: {0}")]
    Failed(String),
    /// The guest asked to run again after a delay.
    #[error("task asked to be retried in {}ms: {message}", after.as_millis())]
    Retry { after: Duration, message: String },
    /// The guest refused the invocation (bad arguments, unknown task): never retried.
    #[error("task rejected the invocation: {0}")]
    Rejected(String),
    /// The hard time limit passed and the guest was stopped.
    #[error("hard time limit of {}ms exceeded; the task was stopped", limit.as_millis())]
    TimeLimitExceeded { limit: Duration },
    /// The guest tried to grow its memory past the cap.
    #[error("memory limit of {limit} bytes exceeded (the task asked for {requested} bytes)")]
    MemoryLimitExceeded { limit: u64, requested: u64 },
    /// The memory of every running task together reached the worker's budget.
    #[error("the worker's memory budget of {total} bytes for all running tasks is used up")]
    MemoryBudgetExhausted { total: u64 },
    /// The task was terminated from outside.
    #[error("task was revoked and terminated")]
    Revoked,
    /// The guest trapped: a panic, a stack overflow, an out-of-bounds access...
    #[error("task crashed: {message}")]
    Trapped { message: String },
    /// The host could not start the run (no free instance slot, for example).
    #[error("cannot start the task: {0}")]
    Instantiate(String),
}

impl RunError {
    /// A short machine-readable name of the variant, recorded with failed statuses.
    pub fn kind(&self) -> &'static str {
        match self {
            RunError::Failed(_) => "failed",
            RunError::Retry { .. } => "retry",
            RunError::Rejected(_) => "rejected",
            RunError::TimeLimitExceeded { .. } => "time_limit",
            RunError::MemoryLimitExceeded { .. } => "memory_limit",
            RunError::MemoryBudgetExhausted { .. } => "memory_budget",
            RunError::Revoked => "revoked",
            RunError::Trapped { .. } => "trapped",
            RunError::Instantiate(_) => "instantiate",
        }
    }
}
