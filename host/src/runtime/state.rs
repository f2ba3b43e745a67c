//! The data of one run's Store, and the `stem:task/context` interface implemented on it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::bindings::stem::task::{context, types};
use super::control::RunHandle;
use super::hooks::{SubTaskRequest, TaskHooks, TaskInfo};
use super::limits::MemoryLimiter;
use super::secrets::SecretAccess;
use crate::capabilities::outbound::OutboundHooks;
use crate::task::LogLevel;

/// Longest log or progress message kept from a guest; longer ones are cut.
const MAX_MESSAGE_BYTES: usize = 16 * 1024;

pub(crate) struct RunState {
    pub wasi: WasiCtx,
    pub http: WasiHttpCtx,
    pub outbound: OutboundHooks,
    pub secrets: SecretAccess,
    pub table: ResourceTable,
    pub limiter: MemoryLimiter,
    pub logs: LogBudget,
    pub task: TaskInfo,
    pub handle: RunHandle,
    pub soft_deadline: Option<Instant>,
    pub hooks: Arc<dyn TaskHooks>,
}

impl WasiView for RunState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for RunState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.outbound,
        }
    }
}

impl types::Host for RunState {}

impl context::Host for RunState {
    async fn log(&mut self, level: types::LogLevel, message: String) {
        let level = match level {
            types::LogLevel::Trace => LogLevel::Trace,
            types::LogLevel::Debug => LogLevel::Debug,
            types::LogLevel::Info => LogLevel::Info,
            types::LogLevel::Warn => LogLevel::Warn,
            types::LogLevel::Error => LogLevel::Error,
        };
        let masked = self.mask(&message);
        let message = truncate(&masked);
        if self.logs.admit(message.len()) {
            self.hooks.log(&self.task, level, message);
        }
    }

    async fn progress(&mut self, percent: u8, message: String) {
        let masked = self.mask(&message);
        let message = truncate(&masked);
        if self.logs.admit(message.len()) {
            self.hooks.progress(&self.task, percent.min(100), message);
        }
    }

    async fn heartbeat(&mut self) {
        self.hooks.heartbeat(&self.task);
    }

    async fn is_revoked(&mut self) -> bool {
        self.handle.is_revoked()
    }

    async fn soft_time_limit_exceeded(&mut self) -> bool {
        self.soft_deadline
            .is_some_and(|deadline| Instant::now() >= deadline)
    }

    async fn enqueue(
        &mut self,
        name: String,
        args: String,
        options: types::EnqueueOptions,
    ) -> Result<String, String> {
        if let Err(error) = serde_json::from_str::<serde::de::IgnoredAny>(&args) {
            return Err(format!("arguments of `{name}` are not valid JSON: {error}"));
        }
        if options.priority.is_some_and(|p| p > 9) {
            return Err("priority must be 0 (lowest) to 9 (highest)".to_string());
        }
        let request = SubTaskRequest {
            name,
            args,
            queue: options.queue,
            priority: options.priority,
            countdown: options.countdown_ms.map(Duration::from_millis),
        };
        self.hooks.enqueue(&self.task, request).await
    }

    async fn submit_canvas(&mut self, spec: String) -> Result<String, String> {
        if let Err(error) = serde_json::from_str::<serde::de::IgnoredAny>(&spec) {
            return Err(format!("the canvas is not valid JSON: {error}"));
        }
        self.hooks.submit_canvas(&self.task, spec).await
    }

    async fn secret(&mut self, name: String) -> Result<String, String> {
        self.secrets.read(&self.task.name, &name)
    }
}

impl RunState {
    /// A guest message with the secrets this run read masked.
    fn mask<'a>(&self, message: &'a str) -> std::borrow::Cow<'a, str> {
        if self.secrets.revealed.is_empty() {
            std::borrow::Cow::Borrowed(message)
        } else {
            std::borrow::Cow::Owned(self.secrets.revealed.mask(message))
        }
    }
}

/// What one run may log (log and progress messages): past either bound, messages are
/// dropped and counted, and the run goes on.
pub(crate) struct LogBudget {
    bytes_left: u64,
    lines_left: u64,
    dropped_lines: u64,
    dropped_bytes: u64,
}

impl LogBudget {
    pub fn new(bytes: u64, lines: u64) -> LogBudget {
        LogBudget {
            bytes_left: bytes,
            lines_left: lines,
            dropped_lines: 0,
            dropped_bytes: 0,
        }
    }

    /// Whether a message of `len` bytes fits; takes it from the budget if so.
    fn admit(&mut self, len: usize) -> bool {
        let len = len as u64;
        if self.lines_left == 0 || self.bytes_left < len {
            self.dropped_lines += 1;
            self.dropped_bytes += len;
            return false;
        }
        self.lines_left -= 1;
        self.bytes_left -= len;
        true
    }

    /// Lines and bytes dropped, if any.
    pub fn dropped(&self) -> Option<(u64, u64)> {
        (self.dropped_lines > 0).then_some((self.dropped_lines, self.dropped_bytes))
    }
}

fn truncate(message: &str) -> &str {
    super::head(message, MAX_MESSAGE_BYTES)
}
