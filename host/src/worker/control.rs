//! The worker's side of the control plane: answering the commands of `crate::control`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};

use super::{Shared, hostname, lock};
use crate::broker::Subscription;
use crate::control::{Command, Inspect, Reply, Request};
use crate::time::Timestamp;

/// How long to wait before subscribing again after the broker refused or dropped the
/// subscription.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// Larger control messages are ignored unread (the CLI sends revocations 1,000 ids at a time).
const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Subscribes to the control channel; `None` if the broker refused (the serving loop tries
/// again).
pub(super) async fn subscribe(shared: &Shared) -> Option<Subscription> {
    match shared
        .broker
        .subscribe(&shared.config.control.control())
        .await
    {
        Ok(subscription) => Some(subscription),
        Err(error) => {
            tracing::warn!(%error, "subscribing to control commands failed; trying again");
            None
        }
    }
}

/// Answers commands until the worker stops, subscribing again whenever the subscription
/// ends.
pub(super) async fn serve(shared: Arc<Shared>, mut subscription: Option<Subscription>) {
    loop {
        if let Some(subscription) = subscription.as_mut() {
            while let Some(message) = subscription.recv().await {
                handle(&shared, &message).await;
            }
        }
        tokio::time::sleep(RESUBSCRIBE_AFTER).await;
        subscription = subscribe(&shared).await;
    }
}

async fn handle(shared: &Arc<Shared>, message: &str) {
    if message.len() > MAX_MESSAGE_BYTES {
        tracing::warn!(
            bytes = message.len(),
            "ignoring a control message too large to be one"
        );
        return;
    }
    let request: Request = match serde_json::from_str(message) {
        Ok(request) => request,
        Err(error) => {
            tracing::debug!(%error, "ignoring an unreadable control message");
            return;
        }
    };
    let worker_id = &shared.config.worker_id;
    if !request.addresses(worker_id) {
        return;
    }
    let (ok, body) = answer(shared, &request.command).await;
    if request.command.wants_reply() {
        let reply = Reply {
            request_id: request.id.clone(),
            worker: worker_id.clone(),
            replied_at: Timestamp::now(),
            ok,
            body,
        };
        let text = serde_json::to_string(&reply).expect("a reply always serialises");
        let channel = shared.config.control.reply(&request.id);
        if let Err(error) = shared.broker.broadcast(&channel, &text).await {
            tracing::warn!(%error, "replying to a control command failed");
        }
    }
    if let Command::Shutdown { mode } = request.command {
        tracing::info!(?mode, "shutdown requested by a control command");
        shared.shutdown.request(mode);
    }
}

async fn answer(shared: &Arc<Shared>, command: &Command) -> (bool, Value) {
    match command {
        Command::Ping => (true, json!("pong")),
        Command::Stats => (true, stats(shared)),
        Command::Inspect { what } => inspect(shared, *what).await,
        Command::Shutdown { mode } => (true, json!({ "shutdown": mode })),
        Command::Pause { queues } | Command::Resume { queues } => {
            let pause = matches!(command, Command::Pause { .. });
            let unknown: Vec<&String> = queues
                .iter()
                .filter(|queue| !shared.config.queues.contains(queue))
                .collect();
            if !unknown.is_empty() {
                return (
                    false,
                    json!({ "error": format!("not consuming {unknown:?}"), "queues": shared.config.queues }),
                );
            }
            shared.paused.send_modify(|paused| {
                for queue in queues {
                    if pause {
                        paused.insert(queue.clone());
                    } else {
                        paused.remove(queue);
                    }
                }
            });
            (true, json!({ "paused": *shared.paused.borrow() }))
        }
        Command::Events { enabled } => {
            shared.events.set_enabled(*enabled);
            (true, json!({ "events": shared.events.is_enabled() }))
        }
        Command::Revoke {
            task_ids,
            terminate,
        } => {
            shared.apply_revocations(task_ids.iter().map(String::as_str), *terminate);
            (true, Value::Null)
        }
    }
}

fn stats(shared: &Shared) -> Value {
    let config = &shared.config;
    let held = shared.running().len();
    let busy = shared.busy.load(Ordering::Relaxed);
    json!({
        "hostname": hostname(),
        "pid": std::process::id(),
        "queues": config.queues,
        "paused": *shared.paused.borrow(),
        "broadcasts": config.broadcasts,
        "concurrency": shared.concurrency.load(Ordering::Relaxed),
        "autoscale": config.autoscale.map(|a| json!({ "min": a.min, "max": a.max })),
        "prefetch_multiplier": config.prefetch_multiplier,
        "running": busy,
        "waiting": held.saturating_sub(busy),
        "processed": shared.processed.load(Ordering::Relaxed),
        "returned": shared.returned.load(Ordering::Relaxed),
        "events": shared.events.is_enabled(),
        "events_dropped": shared.events.dropped(),
        "started_at": shared.started_at,
        "uptime_ms": Timestamp::now().saturating_since(shared.started_at).as_millis() as u64,
    })
}

async fn inspect(shared: &Shared, what: Inspect) -> (bool, Value) {
    match what {
        Inspect::Active => {
            let mut active: Vec<Value> = shared
                .running()
                .values()
                .map(|run| {
                    json!({
                        "task_id": run.task_id,
                        "task": run.task,
                        "queue": run.receipt.queue,
                        "attempt": run.attempt,
                        "taken_at": run.taken_at,
                        "started_at": run.started.map(|(at, _)| at),
                        "running": run.started.is_some(),
                    })
                })
                .collect();
            active.sort_by_key(|run| run["taken_at"].as_u64());
            (true, Value::Array(active))
        }
        Inspect::Registered => match shared.components.registry().tasks().await {
            Ok(tasks) => {
                let loaded = shared.components.loaded();
                let tasks: Vec<Value> = tasks
                    .iter()
                    .map(|version| {
                        json!({
                            "task": version.definition.name,
                            "digest": version.digest,
                            "loaded": loaded.contains(&version.digest),
                        })
                    })
                    .collect();
                (true, Value::Array(tasks))
            }
            Err(error) => (false, json!({ "error": error.to_string() })),
        },
        Inspect::Revoked => {
            let recent: Vec<Value> = lock(&shared.recent_revocations)
                .iter()
                .map(|revocation| json!(revocation))
                .collect();
            (true, Value::Array(recent))
        }
    }
}
