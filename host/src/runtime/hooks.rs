//! How a running guest reaches the rest of the host: logs, progress, heartbeats, sub-tasks and
//! canvases.
//!
//! The sandbox knows nothing of brokers or backends; whoever runs a task (the worker, or
//! `stem-host task run` locally) passes an implementation of [`TaskHooks`].

use std::time::Duration;

use crate::task::LogLevel;

/// The task a hook call comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskInfo {
    pub id: String,
    pub name: String,
    pub attempt: u32,
}

/// A sub-task a guest asks to enqueue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubTaskRequest {
    pub name: String,
    /// JSON-encoded arguments.
    pub args: String,
    pub queue: Option<String>,
    pub priority: Option<u8>,
    pub countdown: Option<Duration>,
}

#[async_trait::async_trait]
pub trait TaskHooks: Send + Sync + 'static {
    fn log(&self, task: &TaskInfo, level: LogLevel, message: &str) {
        let id = task.id.as_str();
        let name = task.name.as_str();
        match level {
            LogLevel::Trace => tracing::trace!(task.id = id, task.name = name, "{message}"),
            LogLevel::Debug => tracing::debug!(task.id = id, task.name = name, "{message}"),
            LogLevel::Info => tracing::info!(task.id = id, task.name = name, "{message}"),
            LogLevel::Warn => tracing::warn!(task.id = id, task.name = name, "{message}"),
            LogLevel::Error => tracing::error!(task.id = id, task.name = name, "{message}"),
        }
    }

    /// Progress also counts as a heartbeat.
    fn progress(&self, task: &TaskInfo, percent: u8, message: &str) {
        tracing::debug!(
            task.id = task.id,
            task.name = task.name,
            percent,
            "progress: {message}"
        );
    }

    fn heartbeat(&self, _task: &TaskInfo) {}

    /// Enqueues a sub-task and returns its id, or a message the guest receives as the error.
    async fn enqueue(&self, parent: &TaskInfo, request: SubTaskRequest) -> Result<String, String>;

    /// Submits a canvas as a child of `parent` and returns its id, or a message the guest
    /// receives as the error. `spec` is valid JSON; its size is for the implementation to bound,
    /// as it bounds sub-task arguments.
    async fn submit_canvas(&self, parent: &TaskInfo, spec: String) -> Result<String, String>;
}

/// Hooks for runs that have nowhere to send sub-tasks: logs go to `tracing`, enqueues and
/// canvases are refused with a clear message.
pub struct DetachedHooks;

#[async_trait::async_trait]
impl TaskHooks for DetachedHooks {
    async fn enqueue(&self, _parent: &TaskInfo, request: SubTaskRequest) -> Result<String, String> {
        Err(format!(
            "cannot enqueue `{}`: this run is not connected to a broker",
            request.name
        ))
    }

    async fn submit_canvas(&self, _parent: &TaskInfo, _spec: String) -> Result<String, String> {
        Err("cannot submit a canvas: this run is not connected to a broker".to_owned())
    }
}
