//! `stem-host revoke`: tasks that must not run, or must stop running.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::Connections;
use super::units::parse_duration;
use crate::control::{self, Command, Request};
use crate::stores::revoke::Revocation;

/// Task ids per pushed revocation message.
const PUSH_BATCH: usize = 1_000;

#[derive(Args)]
pub struct RevokeArgs {
    /// The task ids to revoke. A canvas id revokes every task of the canvas that has not
    /// finished, including those not published yet.
    #[arg(required = true)]
    ids: Vec<String>,
    /// Also stop the tasks if they are running now.
    #[arg(long)]
    terminate: bool,
    /// Recorded with the revocation and in the task's status.
    #[arg(long)]
    reason: Option<String>,
    /// How long the revocation is remembered.
    #[arg(long, value_parser = parse_duration, default_value = "7d", value_name = "DURATION")]
    ttl: Duration,
}

pub async fn run(args: RevokeArgs, connections: &Connections) -> anyhow::Result<ExitCode> {
    let store = connections.revokes().await?;
    let backend = connections.backend().await?;
    let what = if args.terminate {
        "revoked and terminating"
    } else {
        "revoked"
    };
    let mut revoked = Vec::new();
    for id in &args.ids {
        let revocation = Revocation {
            reason: args.reason.clone(),
            ..Revocation::new(id, args.terminate, args.ttl)
        };
        if backend.get_canvas(id).await?.is_some() {
            let canvases = connections.canvases().await?;
            let tasks = canvases.revoke(store.as_ref(), id, &revocation).await?;
            println!("{id} {what} (a canvas: {} unfinished tasks)", tasks.len());
            revoked.extend(tasks);
            continue;
        }
        store.revoke(&revocation).await?;
        println!("{id} {what}");
        revoked.push(id.clone());
    }
    // Stored first, then pushed: a worker that misses the push finds it by polling.
    let broker = connections.broker().await?;
    for chunk in revoked.chunks(PUSH_BATCH) {
        let push = Request::new(
            Command::Revoke {
                task_ids: chunk.to_vec(),
                terminate: args.terminate,
            },
            Vec::new(),
        );
        let channels = connections.channels();
        if let Err(error) = control::request(&broker, &channels, &push, None, Duration::ZERO).await
        {
            eprintln!(
                "warning: telling the workers at once failed ({error}); they find the \
                 revocation in the revoke store within a second"
            );
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}
