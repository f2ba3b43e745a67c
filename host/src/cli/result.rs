//! `stem-host result ...`: read a task's status, or wait for it to finish.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Subcommand;
use serde_json::json;

use super::Connections;
use super::canvas;
use super::progress::Progress;
use super::units::{human_duration, parse_duration};
use crate::backend::{ResultBackend, StatusQuery, TaskState, TaskStatus};
use crate::codec::Codecs;

#[derive(Subcommand)]
pub enum ResultCommand {
    /// Print a task's current status and, once it succeeded, its result. For a canvas id,
    /// the canvas as a tree with each node's state, and its result once it succeeded.
    ///
    /// Exits 0 if the task succeeded, 1 otherwise.
    Get {
        /// The task id `enqueue` printed.
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Wait until a task (or a whole canvas) finishes, then print it as `get` does.
    ///
    /// Exits 0 if the task succeeded, 1 if it failed, was revoked or the wait timed out.
    Wait {
        /// The task id `enqueue` printed.
        id: String,
        /// Give up after this long (e.g. 30s, 5m).
        #[arg(long, value_parser = parse_duration, default_value = "60s")]
        timeout: Duration,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List recent statuses, most recently updated first.
    List {
        /// Only tasks in this state: pending, received, started, retrying, succeeded, failed
        /// or revoked.
        #[arg(long)]
        state: Option<TaskState>,
        /// Only this task name.
        #[arg(long)]
        task: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(command: ResultCommand, connections: &Connections) -> anyhow::Result<ExitCode> {
    let backend = connections.backend().await?;
    match command {
        ResultCommand::Get { id, json } => {
            if backend.get_canvas(&id).await?.is_some()
                && let Some(code) = canvas::show(&connections.canvases().await?, &id, json).await?
            {
                return Ok(code);
            }
            match backend.get(&id).await? {
                Some(status) => report(&status, json),
                None => bail!(
                    "no status for task {id}: it is unknown, still waiting in the queue, or its \
                     result expired"
                ),
            }
        }
        ResultCommand::Wait { id, timeout, json } => {
            let status = wait(backend.as_ref(), &id, timeout).await?;
            if status.as_ref().is_some_and(|s| s.state.is_terminal())
                && backend.get_canvas(&id).await?.is_some()
                && let Some(code) = canvas::show(&connections.canvases().await?, &id, json).await?
            {
                return Ok(code);
            }
            finish_wait(&id, status, timeout, json)
        }
        ResultCommand::List {
            state,
            task,
            limit,
            json,
        } => {
            let query = StatusQuery { state, task, limit };
            let statuses = backend.list(&query).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&statuses)?);
            } else if statuses.is_empty() {
                eprintln!("no statuses match");
            } else {
                println!(
                    "{:<36}  {:<20}  {:<9}  {:>7}  {:<24}  ERROR",
                    "TASK ID", "TASK", "STATE", "ATTEMPT", "UPDATED"
                );
                for status in &statuses {
                    println!(
                        "{:<36}  {:<20}  {:<9}  {:>7}  {:<24}  {}",
                        status.id,
                        status.task.as_deref().unwrap_or("-"),
                        status.state.as_str(),
                        status.attempt,
                        status.updated_at.to_string(),
                        status.error.as_ref().map_or("", |e| e.message.as_str())
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Waits for a terminal status, showing the current state on a terminal.
pub async fn wait(
    backend: &dyn ResultBackend,
    id: &str,
    timeout: Duration,
) -> anyhow::Result<Option<TaskStatus>> {
    let started = Instant::now();
    let mut progress = Progress::new();
    let mut last = None;
    loop {
        let remaining = timeout.saturating_sub(started.elapsed());
        let slice = remaining.min(Duration::from_millis(500));
        last = backend.wait(id, slice).await?.or(last);
        let done = last
            .as_ref()
            .is_some_and(|s: &TaskStatus| s.state.is_terminal());
        if done || remaining.is_zero() {
            progress.finish();
            return Ok(last);
        }
        let state = last.as_ref().map_or("pending", |s| s.state.as_str());
        let reported = last
            .as_ref()
            .and_then(|s| s.progress.as_ref())
            .map(|p| format!(", {}% {}", p.percent, p.message))
            .unwrap_or_default();
        progress.update(format_args!(
            "waiting for {id}: {state}{reported} ({})",
            human_duration(started.elapsed())
        ));
    }
}

/// Prints the outcome of a wait and picks the exit code.
pub fn finish_wait(
    id: &str,
    status: Option<TaskStatus>,
    timeout: Duration,
    json: bool,
) -> anyhow::Result<ExitCode> {
    match status {
        Some(status) if status.state.is_terminal() => report(&status, json),
        last => {
            let state = last.map_or(TaskState::Pending, |s| s.state);
            bail!(
                "timed out after {} waiting for task {id}; it is {state}",
                human_duration(timeout)
            )
        }
    }
}

/// Prints a status: the decoded result on stdout (or everything as JSON with `json`), the
/// rest on stderr. Exit code 0 only for a success.
pub fn report(status: &TaskStatus, json: bool) -> anyhow::Result<ExitCode> {
    let result = match &status.result {
        Some(payload) => Some(Codecs::default().decode(payload)?),
        None => None,
    };
    let result_value = match &result {
        Some(text) => Some(serde_json::from_str::<serde_json::Value>(text)?),
        None => None,
    };
    if json {
        let report = json!({
            "task_id": status.id,
            "task": status.task,
            "state": status.state,
            "attempt": status.attempt,
            "result": result_value,
            "result_encoder": status.result.as_ref().map(|p| &p.encoder),
            "error": status.error,
            "worker": status.worker,
            "component": status.component,
            "progress": status.progress,
            "parent_id": status.parent_id,
            "root_id": status.root_id,
            "updated_at": status.updated_at.to_string(),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let task = status.task.as_deref().unwrap_or("task");
        match (&result_value, &status.error) {
            (Some(value), _) => {
                println!("{}", serde_json::to_string_pretty(value)?);
                eprintln!("{task} {} {}: {}", status.id, status.state, attempt(status));
            }
            (None, Some(error)) => eprintln!(
                "{task} {} {} ({}): {}: {}",
                status.id,
                status.state,
                attempt(status),
                error.kind,
                error.message
            ),
            (None, None) => match &status.progress {
                Some(progress) => eprintln!(
                    "{task} {} {} ({}): {}% {}",
                    status.id,
                    status.state,
                    attempt(status),
                    progress.percent,
                    progress.message
                ),
                None => eprintln!(
                    "{task} {} {} ({})",
                    status.id,
                    status.state,
                    attempt(status)
                ),
            },
        }
    }
    Ok(if status.state == TaskState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn attempt(status: &TaskStatus) -> String {
    format!("attempt {}", status.attempt)
}
