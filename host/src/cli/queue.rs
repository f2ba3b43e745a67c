//! `stem-host queue ...` and `stem-host dlq ...`: the broker's queues and its dead letters.

use std::process::ExitCode;

use anyhow::bail;
use clap::{Args, Subcommand};
use serde_json::json;

use super::Connections;
use crate::broker::{DeadLetterQuery, replay};
use crate::signing::SIGNATURE_INVALID;

#[derive(Subcommand)]
pub enum QueueCommand {
    /// Count ready, delayed, in-flight and dead tasks, per queue.
    Stats {
        /// Only these queues [default: every queue with tasks or dead letters].
        queues: Vec<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete every task of a queue that is not running now.
    Purge { queue: String },
}

#[derive(Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first.
    List {
        /// Only this queue's.
        #[arg(long)]
        queue: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter, by task id or dead-letter id.
    Show {
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Publish dead letters again as first attempts, and remove them from the dead-letter queue.
    Replay(ReplaySelection),
    /// Delete dead letters.
    Purge(Selection),
}

/// Which dead letters `replay` and `purge` act on.
#[derive(Args)]
pub struct Selection {
    /// Task ids or dead-letter ids.
    ids: Vec<String>,
    /// Every dead letter (of --queue, if given).
    #[arg(long, conflicts_with = "ids")]
    all: bool,
    /// Only this queue's.
    #[arg(long)]
    queue: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ReplaySelection {
    #[command(flatten)]
    selection: Selection,
    /// Also replay letters refused as `signature-invalid` (whoever published them, not a
    /// signing producer, chose their task ids).
    #[arg(long)]
    include_invalid: bool,
}

impl Selection {
    fn query(&self) -> anyhow::Result<DeadLetterQuery> {
        if self.ids.is_empty() && !self.all {
            bail!("name the dead letters by task id, or pass --all");
        }
        Ok(DeadLetterQuery {
            queue: self.queue.clone(),
            ids: self.ids.clone(),
            ..DeadLetterQuery::default()
        })
    }
}

pub async fn run_queue(
    command: QueueCommand,
    connections: &Connections,
) -> anyhow::Result<ExitCode> {
    let broker = connections.broker().await?;
    match command {
        QueueCommand::Stats { queues, json } => {
            let names = if queues.is_empty() {
                broker.queues().await?
            } else {
                queues
            };
            let mut stats = Vec::with_capacity(names.len());
            for name in &names {
                stats.push(broker.stats(name).await?);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
                return Ok(ExitCode::SUCCESS);
            }
            let width = names.iter().map(String::len).max().unwrap_or(5).max(5);
            println!(
                "{:<width$}  {:>8}  {:>8}  {:>9}  {:>8}",
                "QUEUE", "READY", "DELAYED", "IN FLIGHT", "DEAD"
            );
            for s in &stats {
                println!(
                    "{:<width$}  {:>8}  {:>8}  {:>9}  {:>8}",
                    s.queue, s.ready, s.delayed, s.in_flight, s.dead
                );
            }
            if stats.is_empty() {
                eprintln!("no queues hold tasks");
            }
        }
        QueueCommand::Purge { queue } => {
            let purged = broker.purge(&queue).await?;
            println!("purged {purged} tasks from {queue}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run_dlq(command: DlqCommand, connections: &Connections) -> anyhow::Result<ExitCode> {
    let broker = connections.broker().await?;
    match command {
        DlqCommand::List { queue, limit, json } => {
            let query = DeadLetterQuery {
                queue,
                ids: Vec::new(),
                limit: Some(limit),
                ..DeadLetterQuery::default()
            };
            let letters = broker.dead_letters(&query).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
            } else if letters.is_empty() {
                eprintln!("the dead-letter queue is empty");
            } else {
                println!(
                    "{:<36}  {:<20}  {:<12}  {:<24}  REASON",
                    "TASK ID", "TASK", "QUEUE", "DEAD AT"
                );
                for letter in &letters {
                    println!(
                        "{:<36}  {:<20}  {:<12}  {:<24}  {}",
                        letter
                            .task_id
                            .as_deref()
                            .unwrap_or(&format!("(entry {})", letter.id)),
                        letter.task.as_deref().unwrap_or("(undecodable)"),
                        letter.queue,
                        letter.dead_at.to_string(),
                        letter.reason
                    );
                }
            }
        }
        DlqCommand::Show { id, json } => {
            let query = DeadLetterQuery {
                ids: vec![id.clone()],
                ..DeadLetterQuery::default()
            };
            let Some(letter) = broker.dead_letters(&query).await?.into_iter().next() else {
                bail!("no dead letter for {id}");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&letter)?);
            } else {
                println!("dead letter {}", letter.id);
                println!(
                    "  task id: {}",
                    letter.task_id.as_deref().unwrap_or("(undecodable)")
                );
                println!(
                    "  task:    {}",
                    letter.task.as_deref().unwrap_or("(undecodable)")
                );
                println!("  queue:   {}", letter.queue);
                println!("  dead at: {}", letter.dead_at);
                println!("  reason:  {}", letter.reason);
                println!("  entry:   {}", letter.payload);
            }
        }
        DlqCommand::Replay(ReplaySelection {
            selection,
            include_invalid,
        }) => {
            let backend = connections.backend().await?;
            let query = selection.query()?;
            let replayed =
                replay::replay(broker.as_ref(), backend.as_ref(), &query, include_invalid).await?;
            let (report, left_invalid) = (replayed.report, replayed.left_invalid);
            if selection.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for id in &report.replayed {
                    println!("{id}");
                }
                for (id, why) in &report.skipped {
                    eprintln!("skipped dead letter {id}: {why}");
                }
                eprintln!("replayed {} tasks", report.replayed.len());
            }
            if left_invalid > 0 {
                eprintln!(
                    "left {left_invalid} dead letters refused as {SIGNATURE_INVALID} \
                     (--include-invalid replays them)"
                );
            }
            if report.replayed.is_empty() && !selection.ids.is_empty() {
                bail!("no dead letter matched {}", selection.ids.join(", "));
            }
        }
        DlqCommand::Purge(selection) => {
            let purged = broker.purge_dead_letters(&selection.query()?).await?;
            if selection.json {
                println!("{}", json!({ "purged": purged }));
            } else {
                println!("purged {purged} dead letters");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
