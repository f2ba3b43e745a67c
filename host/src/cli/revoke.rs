//! `stem-host revoke`: tasks that must not run, or must stop running.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::Connections;
use super::units::parse_duration;
use crate::control::revoke::Revoker;
use crate::stores::revoke::Revocation;

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
    let revokes = connections.revokes().await?;
    let backend = connections.backend().await?;
    let broker = connections.broker().await?;
    let channels = connections.channels();
    let revoker = Revoker {
        revokes: revokes.as_ref(),
        backend: backend.as_ref(),
        broker: &broker,
        channels: &channels,
    };
    let template = Revocation {
        reason: args.reason.clone(),
        ..Revocation::new("", args.terminate, args.ttl)
    };
    let done = revoker
        .revoke(&args.ids, &template, || connections.canvases())
        .await?;
    let what = if args.terminate {
        "revoked and terminating"
    } else {
        "revoked"
    };
    for revoked in &done.revoked {
        match revoked.canvas {
            true => println!(
                "{} {what} (a canvas: {} unfinished tasks)",
                revoked.id,
                revoked.tasks.len()
            ),
            false => println!("{} {what}", revoked.id),
        }
    }
    if let Some(error) = done.push_failed {
        eprintln!(
            "warning: telling the workers at once failed ({error}); they find the \
             revocation in the revoke store within a second"
        );
    }
    Ok(ExitCode::SUCCESS)
}
