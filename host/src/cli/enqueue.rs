//! `stem-host enqueue`: publish one task, or one per line of a JSON-lines file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::json;

use super::Connections;
use super::progress::Progress;
use super::result;
use super::units::parse_duration;
use crate::client::{Client, EnqueueRequest, Sent};
use crate::time::Timestamp;

/// Tasks published per batch from an arguments file, and the arguments' bytes per batch: a
/// batch is one broker round trip, which must stay well within the connection's timeout.
const BATCH: usize = 500;
const BATCH_BYTES: usize = 4 << 20;

#[derive(Args)]
pub struct EnqueueArgs {
    /// The task name, e.g. reports.generate, registered with `stem-host task upload`; or
    /// `broadcast://NAME` to run a task once on every live worker subscribed to the broadcast
    /// NAME (the task named NAME, or --task).
    name: String,
    /// The task a `broadcast://NAME` enqueue runs [default: NAME].
    #[arg(long, value_name = "TASK")]
    task: Option<String>,
    /// JSON arguments.
    #[arg(long, default_value = "{}", conflicts_with = "args_file")]
    args: String,
    /// Enqueue one task per line of this JSON-lines file (each line holds the arguments).
    #[arg(long, value_name = "FILE.jsonl")]
    args_file: Option<PathBuf>,
    /// Queue to publish to [default: the task's own, else `default`].
    #[arg(long)]
    queue: Option<String>,
    /// 0 (lowest) to 9 (highest) [default: the task's own, else 0].
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=9))]
    priority: Option<u8>,
    /// Run no sooner than this from now (e.g. 30s, 5m).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION", conflicts_with = "eta")]
    not_before: Option<Duration>,
    /// Run no sooner than this time (RFC 3339, e.g. 2026-11-23T18:00:00Z).
    #[arg(long, value_parser = parse_eta, value_name = "TIME")]
    eta: Option<Timestamp>,
    /// Retries after the first attempt [default: the task's own, else 3].
    #[arg(long)]
    max_retries: Option<u32>,
    /// Hard time limit of each run (e.g. 30s) [default: the task's own, else 5m].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    time_limit: Option<Duration>,
    /// Soft time limit the guest can observe.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    soft_time_limit: Option<Duration>,
    /// Revoke the task if it has not started this long after enqueueing.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    expires: Option<Duration>,
    /// A unique task: an identical enqueue (same task and arguments) within this long returns
    /// the first one's id instead of publishing again (the seeds' `uniqueFor`).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION", conflicts_with = "args_file")]
    unique_for: Option<Duration>,
    /// `--unique-for 1h`.
    #[arg(long, conflicts_with_all = ["unique_for", "args_file"])]
    unique: bool,
    /// Use this task id instead of a fresh UUID. A task id that already succeeded is not run again.
    #[arg(long, conflicts_with = "args_file")]
    task_id: Option<String>,
    /// Wait for the task to finish and print its result.
    #[arg(long, conflicts_with = "args_file")]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, value_parser = parse_duration, default_value = "60s", requires = "wait")]
    timeout: Duration,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_eta(text: &str) -> Result<Timestamp, String> {
    humantime::parse_rfc3339_weak(text)
        .map(Timestamp::from)
        .map_err(|e| format!("{e}: expected RFC 3339, e.g. 2026-11-23T18:00:00Z"))
}

/// The window of `--unique`.
const DEFAULT_UNIQUE_WINDOW: Duration = Duration::from_secs(3600);

/// How a task name names a broadcast.
const BROADCAST_SCHEME: &str = "broadcast://";

pub async fn run(args: EnqueueArgs, connections: &Connections) -> anyhow::Result<ExitCode> {
    let client = connections.client().await?;
    if let Some(broadcast) = args.name.strip_prefix(BROADCAST_SCHEME) {
        if args.args_file.is_some() || args.wait {
            bail!("a broadcast is enqueued one at a time, without --args-file or --wait");
        }
        return enqueue_broadcast(&args, broadcast, &client).await;
    }
    if args.task.is_some() {
        bail!("--task names the task of a broadcast://NAME enqueue only");
    }
    match &args.args_file {
        Some(path) => enqueue_file(&args, path, &client).await,
        None => enqueue_one(&args, &client, connections).await,
    }
}

async fn enqueue_broadcast(
    args: &EnqueueArgs,
    broadcast: &str,
    client: &Client,
) -> anyhow::Result<ExitCode> {
    let task = args.task.as_deref().unwrap_or(broadcast);
    let request = EnqueueRequest {
        task: task.to_owned(),
        ..request(args, args.args.clone())
    };
    let sent = client.broadcast(request, broadcast).await?;
    print_sent(&sent, args.json)?;
    Ok(ExitCode::SUCCESS)
}

/// Prints what a send published: a task id, or a broadcast's copies.
fn print_sent(sent: &Sent, json: bool) -> anyhow::Result<()> {
    match sent {
        Sent::Task(envelope) if json => {
            let report = json!({ "task_id": envelope.id, "task": envelope.task, "queue": envelope.queue, "priority": envelope.priority });
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Sent::Task(envelope) => println!("{}", envelope.id),
        Sent::Existing { task, task_id } if json => {
            let report = json!({ "task_id": task_id, "task": task, "existing": true });
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Sent::Existing { task, task_id } => {
            println!("{task_id}");
            eprintln!("an identical {task} was enqueued within its unique window: {task_id}");
        }
        Sent::Broadcast { name, copies } if json => {
            let copies: Vec<_> = copies
                .iter()
                .map(|copy| json!({ "task_id": copy.id, "queue": copy.queue }))
                .collect();
            let report = json!({ "broadcast": name, "task": sent.task(), "copies": copies });
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Sent::Broadcast { name, copies } => {
            for copy in copies {
                println!("{}", copy.id);
            }
            eprintln!(
                "broadcast {name}: {} sent to {} workers",
                sent.task(),
                copies.len()
            );
        }
    }
    Ok(())
}

fn request(args: &EnqueueArgs, json_args: String) -> EnqueueRequest {
    let now = SystemTime::now();
    let from_now = |delay: Duration| Timestamp::from(now + delay);
    EnqueueRequest {
        queue: args.queue.clone(),
        priority: args.priority,
        not_before: args.eta.or(args.not_before.map(from_now)),
        max_retries: args.max_retries,
        time_limit_ms: args.time_limit.map(|d| d.as_millis() as u64),
        soft_time_limit_ms: args.soft_time_limit.map(|d| d.as_millis() as u64),
        expires_at: args.expires.map(from_now),
        task_id: args.task_id.clone(),
        unique_for: args
            .unique_for
            .or(args.unique.then_some(DEFAULT_UNIQUE_WINDOW)),
        ..EnqueueRequest::new(&args.name, json_args)
    }
}

async fn enqueue_one(
    args: &EnqueueArgs,
    client: &Client,
    connections: &Connections,
) -> anyhow::Result<ExitCode> {
    // The backend is opened first so that a bad URL fails before anything is published.
    let backend = match args.wait {
        true => Some(connections.backend().await?),
        false => None,
    };
    let sent = client.send(request(args, args.args.clone())).await?;
    let Some(backend) = backend else {
        print_sent(&sent, args.json)?;
        return Ok(ExitCode::SUCCESS);
    };
    let id = match &sent {
        Sent::Task(envelope) => {
            if !args.json {
                eprintln!(
                    "enqueued {} as {} on queue {}",
                    envelope.task, envelope.id, envelope.queue
                );
            }
            envelope.id.clone()
        }
        Sent::Existing { task, task_id } => {
            if !args.json {
                eprintln!("an identical {task} is already enqueued as {task_id}; waiting for it");
            }
            task_id.clone()
        }
        Sent::Broadcast { .. } => {
            print_sent(&sent, args.json)?;
            return Ok(ExitCode::SUCCESS);
        }
    };
    let status = result::wait(backend.as_ref(), &id, args.timeout).await?;
    result::finish_wait(&id, status, args.timeout, args.json)
}

async fn enqueue_file(
    args: &EnqueueArgs,
    path: &std::path::Path,
    client: &Client,
) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read arguments from {}", path.display()))?;
    let mut requests = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if let Err(error) = serde_json::from_str::<serde::de::IgnoredAny>(line) {
            bail!(
                "{}:{}: not valid JSON ({error}); nothing was enqueued",
                path.display(),
                number + 1
            );
        }
        if let Err(error) = client.check_args_size(&args.name, line) {
            bail!(
                "{}:{}: {error}; nothing was enqueued",
                path.display(),
                number + 1
            );
        }
        requests.push(request(args, line.to_owned()));
    }
    let total = requests.len();
    let mut progress = Progress::new();
    let mut ids = Vec::with_capacity(total);
    let mut batches = requests.into_iter().peekable();
    while batches.peek().is_some() {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(next) = batches.next_if(|r| {
            batch.is_empty() || (batch.len() < BATCH && bytes + r.args.len() <= BATCH_BYTES)
        }) {
            bytes += next.args.len();
            batch.push(next);
        }
        let published = client
            .enqueue_many(batch)
            .await
            .with_context(|| format!("enqueued {} of {total} before this failed", ids.len()))?;
        ids.extend(published.into_iter().map(|envelope| envelope.id));
        progress.update(format_args!("enqueued {}/{total}", ids.len()));
    }
    progress.finish();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "task": args.name, "task_ids": ids }))?
        );
    } else {
        for id in &ids {
            println!("{id}");
        }
        eprintln!("enqueued {total} {} tasks", args.name);
    }
    Ok(ExitCode::SUCCESS)
}
