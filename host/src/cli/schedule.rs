//! `stem-host schedule ...`: Beat's entries in the schedule store.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::json;

use super::Connections;
use crate::beat;
use crate::beat::file::{self, Change};
use crate::stores::schedule::{ScheduleEntry, ScheduleStore};
use crate::time::Timestamp;

#[derive(Subcommand)]
pub enum ScheduleCommand {
    /// Make the store match a schedule file (YAML or JSON).
    ///
    /// Every entry is checked first; if one is invalid, nothing is written and every broken
    /// field is named. Entries whose definition is unchanged keep their state; a changed
    /// schedule is worked out again from now; counters are always kept.
    Apply {
        file: PathBuf,
        /// Show what would change without writing.
        #[arg(long)]
        dry_run: bool,
        /// Also remove stored entries the file does not name.
        #[arg(long)]
        prune: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List every entry with its next and last firing.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one entry: its definition and what Beat recorded.
    Show {
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete an entry.
    Remove { id: String },
    /// Let an entry fire again, from its next slot after now.
    Enable { id: String },
    /// Stop an entry from firing (it stays in the store).
    Disable { id: String },
    /// Enqueue an entry's task now, outside its schedule.
    Run {
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Preview an entry's next firings.
    Next {
        id: String,
        /// How many (at most 1000).
        #[arg(long, default_value_t = 5)]
        count: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Entries written per store call by `apply`, so a big file does not hold the store long.
const APPLY_BATCH: usize = 500;
/// The most firings `schedule next` previews.
const MAX_PREVIEW: usize = 1000;

pub async fn run(command: ScheduleCommand, connections: &Connections) -> anyhow::Result<ExitCode> {
    let store = connections.schedules().await?;
    match command {
        ScheduleCommand::Apply {
            file,
            dry_run,
            prune,
            json,
        } => apply(&*store, &file, dry_run, prune, json).await,
        ScheduleCommand::List { json } => list(&*store, json).await,
        ScheduleCommand::Show { id, json } => {
            let entry = existing(&*store, &id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entry)?);
            } else {
                print!("{}", describe(&entry));
            }
            Ok(ExitCode::SUCCESS)
        }
        ScheduleCommand::Remove { id } => {
            if !store.remove(&id).await? {
                bail!("no schedule entry `{id}` (see `stem-host schedule list`)");
            }
            println!("removed {id}");
            Ok(ExitCode::SUCCESS)
        }
        ScheduleCommand::Enable { id } => set_enabled(&*store, &id, true).await,
        ScheduleCommand::Disable { id } => set_enabled(&*store, &id, false).await,
        ScheduleCommand::Run { id, json } => {
            let client = connections.client().await?;
            let backend = connections.backend().await?;
            let Some(envelope) = beat::run_now(&*store, &client, &*backend, &id).await? else {
                bail!("no schedule entry `{id}` (see `stem-host schedule list`)");
            };
            if json {
                println!(
                    "{}",
                    json!({"id": envelope.id, "task": envelope.task, "queue": envelope.queue})
                );
            } else {
                println!("{}", envelope.id);
            }
            Ok(ExitCode::SUCCESS)
        }
        ScheduleCommand::Next { id, count, json } => {
            let entry = existing(&*store, &id).await?;
            let slots = beat::upcoming(&entry, count.min(MAX_PREVIEW), Timestamp::now());
            if json {
                let slots: Vec<String> = slots.iter().map(ToString::to_string).collect();
                println!("{}", json!({"id": id, "next": slots}));
            } else if slots.is_empty() {
                println!("{id} fires no more");
            } else {
                for slot in slots {
                    println!("{slot}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn existing(store: &dyn ScheduleStore, id: &str) -> anyhow::Result<ScheduleEntry> {
    store
        .get(id)
        .await?
        .with_context(|| format!("no schedule entry `{id}` (see `stem-host schedule list`)"))
}

async fn apply(
    store: &dyn ScheduleStore,
    path: &std::path::Path,
    dry_run: bool,
    prune: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the schedule file {}", path.display()))?;
    let specs = match file::parse(&text) {
        Ok(specs) => specs,
        Err(file::FileError::Invalid(errors)) => {
            eprintln!("error: {} is invalid; nothing was applied:", path.display());
            for error in &errors {
                eprintln!("  {error}");
            }
            return Ok(ExitCode::FAILURE);
        }
        Err(error) => bail!("{}: {error}; nothing was applied", path.display()),
    };
    if prune && specs.is_empty() {
        bail!(
            "{} names no entries; --prune would remove every entry (use `schedule remove`)",
            path.display()
        );
    }
    // A Beat recording a firing meanwhile makes a save fail; plan again over what it wrote.
    let mut changes = Vec::new();
    for attempt in 0.. {
        changes = file::plan_apply(&specs, &store.list().await?, prune, Timestamp::now());
        if dry_run {
            break;
        }
        let writes: Vec<ScheduleEntry> = changes
            .iter()
            .filter(|change| matches!(change, Change::Create(_) | Change::Update { .. }))
            .map(|change| change.entry().clone())
            .collect();
        let mut conflicts = false;
        for chunk in writes.chunks(APPLY_BATCH) {
            conflicts |= store.save_many(chunk).await?.iter().any(|saved| !*saved);
        }
        if !conflicts {
            break;
        }
        if attempt == 10 {
            bail!("the schedule kept changing while it was applied; try again");
        }
    }
    if !dry_run {
        for change in &changes {
            if let Change::Remove(entry) = change {
                store.remove(&entry.id).await?;
            }
        }
    }
    if json {
        let report: Vec<_> = changes
            .iter()
            .map(|change| {
                json!({
                    "id": change.id(),
                    "action": change.action(),
                    "next_run_at": change.entry().state.next_run_at.map(|t| t.to_string()),
                })
            })
            .collect();
        println!("{}", json!({"dry_run": dry_run, "changes": report}));
        return Ok(ExitCode::SUCCESS);
    }
    let verb = |action: &str| match (dry_run, action) {
        (true, "unchanged") => "unchanged".to_owned(),
        (true, action) => format!("would {action}"),
        (false, "create") => "created".to_owned(),
        (false, "update") => "updated".to_owned(),
        (false, "remove") => "removed".to_owned(),
        (false, other) => other.to_owned(),
    };
    for change in &changes {
        let entry = change.entry();
        let next = entry
            .state
            .next_run_at
            .map_or_else(|| "none".to_owned(), |t| t.to_string());
        println!(
            "{:<12} {}  ({}, next {next})",
            verb(change.action()),
            entry.id,
            entry.definition.schedule.describe()
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn list(store: &dyn ScheduleStore, json: bool) -> anyhow::Result<ExitCode> {
    let entries = store.list().await?;
    if json {
        println!("{}", serde_json::to_string(&entries)?);
        return Ok(ExitCode::SUCCESS);
    }
    if entries.is_empty() {
        println!("no schedule entries (add some with `stem-host schedule apply FILE`)");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<24} {:<22} {:<8} {:<26} {:>6}  LAST ERROR",
        "ID", "TASK", "SCHEDULE", "ENABLED", "NEXT RUN", "RUNS"
    );
    for entry in &entries {
        println!(
            "{:<24} {:<24} {:<22} {:<8} {:<26} {:>6}  {}",
            entry.id,
            entry.definition.task,
            entry.definition.schedule.describe(),
            if entry.definition.enabled {
                "yes"
            } else {
                "no"
            },
            entry
                .state
                .next_run_at
                .map_or_else(|| "-".to_owned(), |t| t.to_string()),
            entry.state.total_run_count,
            entry.state.last_error.as_deref().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(entry: &ScheduleEntry) -> String {
    let definition = &entry.definition;
    let state = &entry.state;
    let time = |at: Option<Timestamp>| at.map_or_else(|| "-".to_owned(), |t| t.to_string());
    let mut text = format!(
        "id:              {}\ntask:            {}\nargs:            {}\nschedule:        {}\n\
         timezone:        {}\nenabled:         {}\ncatch up:        {:?}\noverlap:         {:?}\n",
        entry.id,
        definition.task,
        definition.args,
        definition.schedule.describe(),
        definition.timezone.as_deref().unwrap_or("UTC"),
        definition.enabled,
        definition.catch_up,
        definition.overlap,
    );
    if let Some(queue) = &definition.queue {
        text.push_str(&format!("queue:           {queue}\n"));
    }
    text.push_str(&format!(
        "next run:        {}\nlast run:        {}\nlast slot:       {}\nlast task:       {}\n\
         runs:            {}\nskipped:         {}\ndrift:           {}ms\n",
        time(state.next_run_at),
        time(state.last_run_at),
        time(state.last_slot),
        state.last_task_id.as_deref().unwrap_or("-"),
        state.total_run_count,
        state.skipped_count,
        state.drift_ms,
    ));
    if let Some(error) = &state.last_error {
        text.push_str(&format!("last error:      {error}\n"));
    }
    text
}

async fn set_enabled(
    store: &dyn ScheduleStore,
    id: &str,
    enabled: bool,
) -> anyhow::Result<ExitCode> {
    for _ in 0..10 {
        let mut entry = existing(store, id).await?;
        if entry.definition.enabled == enabled {
            println!(
                "{id} is already {}",
                if enabled { "enabled" } else { "disabled" }
            );
            return Ok(ExitCode::SUCCESS);
        }
        entry.definition.enabled = enabled;
        if enabled {
            // Disabled time is not caught up: the entry fires from its next slot.
            file::reschedule(&mut entry, Timestamp::now());
        }
        if store.save(&entry).await? {
            let next = entry
                .state
                .next_run_at
                .map_or_else(|| "none".to_owned(), |t| t.to_string());
            match enabled {
                true => println!("enabled {id} (next run {next})"),
                false => println!("disabled {id}"),
            }
            return Ok(ExitCode::SUCCESS);
        }
    }
    bail!("`{id}` kept changing; try again")
}
