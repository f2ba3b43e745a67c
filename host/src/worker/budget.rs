//! Operator budgets: the ceilings of what one task may use. A task's declared options (or an
//! enqueue's overrides) may lower a budget, never raise it past the ceiling.

use std::time::Duration;

use crate::envelope::Envelope;
use crate::runtime::{DEFAULT_MAX_MEMORY_BYTES, DEFAULT_MEMORY_TOTAL_BYTES, RunLimits};
use crate::task::TaskOptions;

/// What the operator allows each task, whatever it declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budgets {
    /// Linear memory of one run (`memory_limit` lowers it).
    pub memory_per_run: u64,
    /// Linear memory of all running runs together.
    pub memory_total: u64,
    /// Longest hard time limit a task or an enqueue may ask for.
    pub max_time_limit: Duration,
    /// Log and progress messages per run, in bytes and lines; the rest is dropped and counted.
    pub log_bytes: u64,
    pub log_lines: u64,
    /// Sub-tasks one run may enqueue.
    pub subtasks_per_run: u32,
    /// Largest arguments of a sub-task, in bytes of JSON.
    pub subtask_args_bytes: usize,
    /// How deep sub-tasks may nest below the task a producer enqueued.
    pub subtask_depth: u32,
    /// Largest result a task may return.
    pub result_bytes: u64,
    /// Longest error message kept in a status; longer ones are cut.
    pub error_bytes: usize,
    /// Deliveries of one attempt that end without being settled (a crashed or stuck worker)
    /// before the entry goes to the dead-letter queue.
    pub max_deliveries: u32,
    /// Most retries a task may declare or an enqueue may ask for.
    pub max_retries: u32,
    /// Longest wait before a retry or a sub-task a guest may ask for.
    pub max_delay: Duration,
}

impl Default for Budgets {
    fn default() -> Budgets {
        Budgets {
            memory_per_run: DEFAULT_MAX_MEMORY_BYTES,
            memory_total: DEFAULT_MEMORY_TOTAL_BYTES,
            max_time_limit: Duration::from_secs(3600),
            log_bytes: 1 << 20,
            log_lines: 10_000,
            subtasks_per_run: 100,
            subtask_args_bytes: crate::client::DEFAULT_MAX_ARGS_BYTES,
            subtask_depth: 8,
            result_bytes: 16 << 20,
            error_bytes: 64 << 10,
            max_deliveries: 10,
            max_retries: 100,
            max_delay: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl Budgets {
    /// The limits of one run: what the task declares and the enqueue asks, within the ceilings.
    pub fn run_limits(&self, options: &TaskOptions, envelope: &Envelope) -> RunLimits {
        let hard_time_limit = envelope
            .time_limit_ms
            .map(Duration::from_millis)
            .or(options.hard_time_limit())
            .unwrap_or(RunLimits::default().hard_time_limit)
            .min(self.max_time_limit);
        RunLimits {
            memory_bytes: options
                .memory_limit_bytes
                .unwrap_or(self.memory_per_run)
                .min(self.memory_per_run),
            hard_time_limit,
            soft_time_limit: envelope
                .soft_time_limit_ms
                .map(Duration::from_millis)
                .or(options.soft_time_limit())
                .map(|soft| soft.min(hard_time_limit)),
            log_bytes: self.log_bytes,
            log_lines: self.log_lines,
        }
    }

    /// `message` cut to the error budget, saying how much was cut.
    pub fn cut_error(&self, message: &str) -> String {
        let kept = crate::runtime::head(message, self.error_bytes);
        if kept.len() == message.len() {
            return message.to_owned();
        }
        format!("{kept} [{} more bytes cut]", message.len() - kept.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Payload;

    fn envelope() -> Envelope {
        Envelope::new("t.t", Payload::json("{}"))
    }

    #[test]
    fn declared_options_lower_budgets_but_never_raise_them() {
        let budgets = Budgets::default();
        let greedy = TaskOptions {
            memory_limit_bytes: Some(4 << 30),
            hard_time_limit_ms: Some(24 * 3600 * 1000),
            ..TaskOptions::default()
        };
        let limits = budgets.run_limits(&greedy, &envelope());
        assert_eq!(limits.memory_bytes, budgets.memory_per_run);
        assert_eq!(limits.hard_time_limit, budgets.max_time_limit);

        let modest = TaskOptions {
            memory_limit_bytes: Some(16 << 20),
            hard_time_limit_ms: Some(2_000),
            soft_time_limit_ms: Some(5_000),
            ..TaskOptions::default()
        };
        let limits = budgets.run_limits(&modest, &envelope());
        assert_eq!(limits.memory_bytes, 16 << 20);
        assert_eq!(limits.hard_time_limit, Duration::from_secs(2));
        assert_eq!(limits.soft_time_limit, Some(Duration::from_secs(2)));

        let mut asked = envelope();
        asked.time_limit_ms = Some(48 * 3600 * 1000);
        let limits = budgets.run_limits(&TaskOptions::default(), &asked);
        assert_eq!(limits.hard_time_limit, budgets.max_time_limit);
    }

    #[test]
    fn long_errors_are_cut_at_a_char_boundary() {
        let budgets = Budgets {
            error_bytes: 5,
            ..Budgets::default()
        };
        assert_eq!(budgets.cut_error("short"), "short");
        assert_eq!(budgets.cut_error("ab€€€"), "ab€ [6 more bytes cut]");
    }
}
