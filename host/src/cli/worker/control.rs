//! `stem-host worker ping|stats|inspect|shutdown|pause|resume`: control commands to running
//! workers, one reply collected per worker.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde_json::Value;

use super::super::Connections;
use super::super::units::parse_duration;
use crate::control::{self, Command, Inspect, Replies, Request, ShutdownMode};
use crate::routing::glob_matches;

/// Which workers, how long to wait for them, and how to print their answers.
#[derive(Args)]
pub struct Target {
    /// Only these workers (ids or globs such as `host-a:*`), comma-separated [default: all].
    #[arg(long, value_delimiter = ',', value_name = "ID")]
    worker: Vec<String>,
    /// How long to wait for replies. Replies are collected until every worker alive (by its
    /// heartbeat) has answered, or this passes.
    #[arg(long, value_parser = parse_duration, default_value = "1s", value_name = "DURATION")]
    timeout: Duration,
    /// Print JSON: `{replies: [...], missing: [...], elapsed_ms}`.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct InspectArgs {
    /// The deliveries each worker holds, running or waiting for a slot (the default).
    #[arg(long, group = "what")]
    active: bool,
    /// The tasks each worker can run, and whether it has compiled them.
    #[arg(long, group = "what")]
    registered: bool,
    /// The revocations each worker applied recently.
    #[arg(long, group = "what")]
    revoked: bool,
    #[command(flatten)]
    target: Target,
}

#[derive(Args)]
pub struct ShutdownArgs {
    /// warm: running tasks finish; soft: they get the worker's shutdown grace; hard: they are
    /// stopped at once. Either way what was not run goes back to the queue.
    #[arg(long, value_enum, default_value = "warm")]
    mode: ShutdownMode,
    #[command(flatten)]
    target: Target,
}

#[derive(Args)]
pub struct QueueArgs {
    /// The queues, comma-separated.
    #[arg(long, value_delimiter = ',', required = true, value_name = "QUEUE")]
    queue: Vec<String>,
    #[command(flatten)]
    target: Target,
}

pub async fn ping(target: Target, connections: &Connections) -> anyhow::Result<ExitCode> {
    let replies = send(&target, Command::Ping, connections).await?;
    let sent_at = replies.sent_at;
    report(&target, &replies, |reply| {
        let took = reply.replied_at.saturating_since(sent_at).as_millis();
        format!("pong ({took} ms)")
    })
}

pub async fn stats(target: Target, connections: &Connections) -> anyhow::Result<ExitCode> {
    let replies = send(&target, Command::Stats, connections).await?;
    report(&target, &replies, |reply| {
        let body = &reply.body;
        format!(
            "concurrency {} running {} waiting {} processed {} queues {} paused {} up {}s",
            body["concurrency"],
            body["running"],
            body["waiting"],
            body["processed"],
            list(&body["queues"]),
            list(&body["paused"]),
            body["uptime_ms"].as_u64().unwrap_or(0) / 1000
        )
    })
}

pub async fn inspect(args: InspectArgs, connections: &Connections) -> anyhow::Result<ExitCode> {
    let what = if args.registered {
        Inspect::Registered
    } else if args.revoked {
        Inspect::Revoked
    } else {
        Inspect::Active
    };
    let replies = send(&args.target, Command::Inspect { what }, connections).await?;
    report(&args.target, &replies, |reply| {
        let Some(items) = reply.body.as_array() else {
            return reply.body.to_string();
        };
        let lines: Vec<String> = items
            .iter()
            .map(|item| match what {
                Inspect::Active => format!(
                    "\n  {} {} queue={} attempt={}{}",
                    text(&item["task"]),
                    text(&item["task_id"]),
                    text(&item["queue"]),
                    item["attempt"],
                    if item["running"] == Value::Bool(true) {
                        " running"
                    } else {
                        " waiting"
                    }
                ),
                Inspect::Registered => format!(
                    "\n  {} {}{}",
                    text(&item["task"]),
                    text(&item["digest"]).get(..12).unwrap_or_default(),
                    if item["loaded"] == Value::Bool(true) {
                        " (compiled)"
                    } else {
                        ""
                    }
                ),
                Inspect::Revoked => format!(
                    "\n  {}{}",
                    text(&item["task_id"]),
                    if item["terminate"] == Value::Bool(true) {
                        " (terminate)"
                    } else {
                        ""
                    }
                ),
            })
            .collect();
        format!("{} items{}", items.len(), lines.concat())
    })
}

pub async fn shutdown(args: ShutdownArgs, connections: &Connections) -> anyhow::Result<ExitCode> {
    let command = Command::Shutdown { mode: args.mode };
    let replies = send(&args.target, command, connections).await?;
    let mode = args
        .mode
        .to_possible_value()
        .map(|v| v.get_name().to_owned());
    report(&args.target, &replies, |_| {
        format!("shutting down ({})", mode.as_deref().unwrap_or_default())
    })
}

pub async fn pause(
    args: QueueArgs,
    pause: bool,
    connections: &Connections,
) -> anyhow::Result<ExitCode> {
    let command = match pause {
        true => Command::Pause { queues: args.queue },
        false => Command::Resume { queues: args.queue },
    };
    let replies = send(&args.target, command, connections).await?;
    report(&args.target, &replies, |reply| {
        format!("paused: {}", list(&reply.body["paused"]))
    })
}

pub async fn events(
    target: Target,
    enabled: bool,
    connections: &Connections,
) -> anyhow::Result<ExitCode> {
    let replies = send(&target, Command::Events { enabled }, connections).await?;
    report(&target, &replies, |reply| {
        format!(
            "events {}",
            if reply.body["events"] == Value::Bool(true) {
                "on"
            } else {
                "off"
            }
        )
    })
}

/// Sends `command` to the target workers and collects their replies.
async fn send(
    target: &Target,
    command: Command,
    connections: &Connections,
) -> anyhow::Result<Replies> {
    ask(command, &target.worker, target.timeout, connections).await
}

/// Sends `command` to `workers` (ids or globs; empty for all) and collects their replies.
pub(in crate::cli) async fn ask(
    command: Command,
    workers: &[String],
    timeout: Duration,
    connections: &Connections,
) -> anyhow::Result<Replies> {
    let broker = connections.broker().await?;
    let expected = expected_workers(workers, connections).await;
    let request = Request::new(command, workers.to_vec());
    Ok(control::request(
        &broker,
        &connections.channels(),
        &request,
        expected,
        timeout,
    )
    .await?)
}

/// The workers that should answer: those named exactly, else those alive by their heartbeats
/// that the filter selects; `None` (wait for the whole timeout) if the heartbeats cannot be
/// read.
async fn expected_workers(
    patterns: &[String],
    connections: &Connections,
) -> Option<BTreeSet<String>> {
    let is_glob = |pattern: &String| pattern.contains(['*', '?', '[']);
    if !patterns.is_empty() && !patterns.iter().any(is_glob) {
        return Some(patterns.iter().cloned().collect());
    }
    let backend = connections.backend().await.ok()?;
    let workers = backend.workers().await.ok()?;
    Some(
        workers
            .into_iter()
            .map(|worker| worker.worker_id)
            .filter(|id| {
                patterns.is_empty() || patterns.iter().any(|pattern| glob_matches(pattern, id))
            })
            .collect(),
    )
}

/// Prints one line per reply (or the JSON), the workers that did not answer on stderr; fails
/// when nobody answered.
fn report(
    target: &Target,
    replies: &Replies,
    line: impl Fn(&control::Reply) -> String,
) -> anyhow::Result<ExitCode> {
    if target.json {
        println!("{}", serde_json::to_string_pretty(replies)?);
    } else {
        for reply in &replies.replies {
            let text = match reply.ok {
                true => line(reply),
                false => format!("refused: {}", text(&reply.body["error"])),
            };
            println!("{}: {text}", reply.worker);
        }
        eprintln!(
            "{} replies in {} ms",
            replies.replies.len(),
            replies.elapsed_ms
        );
    }
    for worker in &replies.missing {
        eprintln!("no reply from {worker} within {:?}", target.timeout);
    }
    if replies.replies.is_empty() {
        eprintln!("error: no worker replied within {:?}", target.timeout);
        return Ok(ExitCode::FAILURE);
    }
    if replies.replies.iter().any(|reply| !reply.ok) {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn text(value: &Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), str::to_owned)
}

fn list(value: &Value) -> String {
    match value.as_array() {
        Some(items) if items.is_empty() => "-".to_owned(),
        Some(items) => items.iter().map(text).collect::<Vec<_>>().join(","),
        None => text(value),
    }
}
