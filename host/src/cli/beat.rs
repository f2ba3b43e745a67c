//! `stem-host beat ...`: the scheduler process, and who leads.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;

use super::Connections;
use super::units::parse_duration;
use crate::beat::{Beat, BeatConfig, LEADER_LOCK};
use crate::config::Role;
use crate::time::Timestamp;

#[derive(Subcommand)]
pub enum BeatCommand {
    /// Run Beat: enqueue each schedule entry's task at its slots.
    ///
    /// Start as many as you like, on any hosts, sharing one schedule store and lock store: one
    /// of them leads and fires; if it dies, another takes over within --lock-ttl plus --tick,
    /// and every slot still fires once (task ids are derived from the entry and the slot).
    /// SIGTERM or Ctrl-C stops it and hands leadership on at once.
    Start(StartArgs),
    /// Show which Beat leads and when the next entry is due.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct StartArgs {
    /// This Beat's name in the lock store [default: beat-<uuid>].
    #[arg(long, value_name = "NAME")]
    id: Option<String>,
    /// How often the store is read (changes reach Beat within a tick) and a standby Beat
    /// tries to lead.
    #[arg(long, value_parser = parse_duration, default_value = "1s", value_name = "DURATION")]
    tick: Duration,
    /// How long the leader's lock lasts without renewal: a dead leader's successor starts
    /// firing at most this (plus a tick) later.
    #[arg(long, value_parser = parse_duration, default_value = "5s", value_name = "DURATION")]
    lock_ttl: Duration,
    /// Entries fired per round.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
}

pub async fn run(command: BeatCommand, connections: &Connections) -> anyhow::Result<ExitCode> {
    match command {
        BeatCommand::Start(args) => start(args, connections).await,
        BeatCommand::Status { json } => status(connections, json).await,
    }
}

async fn start(args: StartArgs, connections: &Connections) -> anyhow::Result<ExitCode> {
    if args.tick.is_zero() || args.lock_ttl <= args.tick {
        anyhow::bail!(
            "--lock-ttl ({:?}) must be longer than --tick ({:?}), or the leader loses its lock \
             between two renewals",
            args.lock_ttl,
            args.tick
        );
    }
    let defaults = BeatConfig::default();
    let config = BeatConfig {
        id: args.id.unwrap_or(defaults.id),
        tick: args.tick,
        lock_ttl: args.lock_ttl,
        batch: args.batch.max(1),
    };
    let beat = Beat::new(
        config.clone(),
        connections.schedules().await?,
        connections.locks().await?,
        connections.client().await?,
        connections.backend().await?,
    );
    eprintln!(
        "beat {} started: schedule store {}, lock store {}, broker {}",
        config.id,
        connections.url(Role::Schedule)?,
        connections.url(Role::Lock)?,
        connections.url(Role::Broker)?,
    );
    beat.run(super::terminate_or_interrupt()).await;
    eprintln!("beat {} stopped", config.id);
    Ok(ExitCode::SUCCESS)
}

async fn status(connections: &Connections, json: bool) -> anyhow::Result<ExitCode> {
    let leader = connections.locks().await?.owner(LEADER_LOCK).await?;
    let entries = connections.schedules().await?.list().await?;
    let enabled = entries.iter().filter(|e| e.definition.enabled).count();
    let next_due = entries.iter().filter_map(|e| e.due_at()).min();
    if json {
        println!(
            "{}",
            json!({
                "leader": leader,
                "entries": entries.len(),
                "enabled": enabled,
                "next_due": next_due.map(|t| t.to_string()),
                "now": Timestamp::now().to_string(),
            })
        );
    } else {
        println!("leader:   {}", leader.as_deref().unwrap_or("none"));
        println!("entries:  {} ({enabled} enabled)", entries.len());
        println!(
            "next due: {}",
            next_due.map_or_else(|| "-".to_owned(), |t| t.to_string())
        );
    }
    Ok(ExitCode::SUCCESS)
}
