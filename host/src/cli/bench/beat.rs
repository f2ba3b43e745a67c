//! `stem-host bench beat`: what a Beat round costs with many entries, and how late firings are.
//!
//! Runs against the configured schedule store, lock store and broker, in a namespace of its
//! own that it empties afterwards: rounds over entries none of which is due (the cost of
//! every tick), a round where all of them are due at once (publish and record each), and
//! a Beat running for a while with entries due every second, whose firings' publish times
//! are compared with their slots.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;

use super::super::Connections;
use super::super::units::{human_duration, parse_duration};
use crate::beat::{Beat, BeatConfig, SLOT_HEADER};
use crate::broker::{Broker, ConsumeOptions};
use crate::client::Client;
use crate::codec::Codecs;
use crate::config::{self, Role};
use crate::schedule::Schedule;
use crate::stores::schedule::{EntryDefinition, ScheduleEntry, ScheduleStore};
use crate::time::Timestamp;

const QUEUE: &str = "bench-beat";

#[derive(Args)]
pub(super) struct BeatBench {
    /// Entries in the schedule for the round measurements.
    #[arg(long, default_value_t = 10_000)]
    entries: usize,
    /// The task every entry enqueues; it must be registered.
    #[arg(long, default_value = "hello.add")]
    task: String,
    /// Entries firing every second while the lateness is measured.
    #[arg(long, default_value_t = 100)]
    per_second: usize,
    /// How long Beat runs while the lateness is measured.
    #[arg(long, value_parser = parse_duration, default_value = "20s", value_name = "DURATION")]
    duration: Duration,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn entry(id: String, task: &str, every: Duration, next: Timestamp) -> ScheduleEntry {
    let schedule = Schedule::Interval {
        every_ms: u64::try_from(every.as_millis()).unwrap_or(u64::MAX),
        start_at: None,
        end_at: None,
    };
    let definition = EntryDefinition {
        queue: Some(QUEUE.to_owned()),
        ..EntryDefinition::new(task, r#"{"a":1,"b":2}"#, schedule)
    };
    ScheduleEntry::new(id, definition, next)
}

/// Saves entries in batches of a thousand, as `schedule apply` would.
async fn save_all(store: &dyn ScheduleStore, entries: &[ScheduleEntry]) -> anyhow::Result<()> {
    for chunk in entries.chunks(1000) {
        let saved = store.save_many(chunk).await?;
        anyhow::ensure!(
            saved.iter().all(|s| *s),
            "the benchmark's entries changed under it"
        );
    }
    Ok(())
}

/// Takes every firing off the benchmark's queue; returns how late each was published.
async fn drain(broker: &dyn Broker) -> anyhow::Result<Vec<u64>> {
    let options = ConsumeOptions {
        max: 1000,
        ..ConsumeOptions::default()
    };
    let mut late = Vec::new();
    loop {
        let deliveries = broker.consume(&[QUEUE.to_owned()], &options).await?;
        if deliveries.is_empty() {
            return Ok(late);
        }
        let receipts: Vec<_> = deliveries
            .iter()
            .map(|d| (d.receipt.clone(), crate::broker::Settle::Ack))
            .collect();
        broker.settle_many(&receipts).await?;
        for delivery in deliveries {
            let envelope = delivery.envelope;
            let Some(slot) = envelope
                .headers
                .get(SLOT_HEADER)
                .and_then(|slot| slot.parse::<jiff::Timestamp>().ok())
            else {
                continue;
            };
            let slot = u64::try_from(slot.as_millisecond()).unwrap_or(0);
            late.push(envelope.created_at.as_millis().saturating_sub(slot));
        }
    }
}

pub(super) async fn run(bench: BeatBench, connections: &Connections) -> anyhow::Result<ExitCode> {
    let namespace = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let ns = Some(namespace.as_str());
    let store = config::open_schedule_store(&connections.url(Role::Schedule)?, ns).await?;
    let locks = config::open_lock_store(&connections.url(Role::Lock)?, ns).await?;
    let broker = config::open_broker(&connections.url(Role::Broker)?, ns).await?;
    let backend = config::open_backend(&connections.url(Role::Backend)?, ns).await?;
    let client = Client::new(
        broker.clone(),
        connections.registry().await?,
        Codecs::default(),
    )
    .with_signing(connections.signing()?);
    let beat = Beat::new(BeatConfig::default(), store.clone(), locks, client, backend);

    // Rounds with nothing due: every tick of a quiet schedule.
    let later = Timestamp::now().saturating_add(Duration::from_secs(3600));
    let entries: Vec<ScheduleEntry> = (0..bench.entries)
        .map(|i| {
            entry(
                format!("bench-{i}"),
                &bench.task,
                Duration::from_secs(3600),
                later,
            )
        })
        .collect();
    save_all(&*store, &entries).await?;
    let mut idle = Vec::new();
    for _ in 0..50 {
        let start = Instant::now();
        beat.fire_due(Timestamp::now()).await?;
        idle.push(start.elapsed());
    }
    idle.sort();

    // One moment when every entry is due: publish and record each.
    let now = Timestamp::now();
    let mut due = store.list().await?;
    for entry in &mut due {
        entry.state.next_run_at = Some(now);
    }
    save_all(&*store, &due).await?;
    let start = Instant::now();
    let (mut fired, mut rounds) = (0, 0);
    while fired < bench.entries && rounds < bench.entries {
        fired += beat.fire_due(Timestamp::now()).await?.fired;
        rounds += 1;
    }
    let all_due = start.elapsed();
    drain(&*broker).await?;
    for entry in &due {
        store.remove(&entry.id).await?;
    }

    // A running Beat with entries due every second, spread over the second.
    let base = Timestamp::now().saturating_add(Duration::from_secs(1));
    let steady: Vec<ScheduleEntry> = (0..bench.per_second)
        .map(|i| {
            let offset = (i * 1000 / bench.per_second.max(1)) as u64;
            let first = Timestamp::from_millis(base.as_millis() + offset);
            entry(
                format!("steady-{i}"),
                &bench.task,
                Duration::from_secs(1),
                first,
            )
        })
        .collect();
    save_all(&*store, &steady).await?;
    beat.run(tokio::time::sleep(bench.duration)).await;
    let mut late = drain(&*broker).await?;
    late.sort_unstable();
    for entry in &steady {
        store.remove(&entry.id).await?;
    }
    broker.purge(QUEUE).await?;

    let pick = |p: f64| {
        late.get(((late.len().max(1) - 1) as f64 * p) as usize)
            .copied()
    };
    let per_entry = all_due / u32::try_from(bench.entries.max(1)).unwrap_or(u32::MAX);
    if bench.json {
        println!(
            "{}",
            json!({
                "entries": bench.entries,
                "idle_round_p50_us": idle[idle.len() / 2].as_micros() as u64,
                "idle_round_p99_us": idle[idle.len() * 99 / 100].as_micros() as u64,
                "all_due_ms": all_due.as_millis() as u64,
                "all_due_rounds": rounds,
                "per_entry_us": per_entry.as_micros() as u64,
                "firings": late.len(),
                "late_p50_ms": pick(0.5),
                "late_p99_ms": pick(0.99),
                "late_max_ms": late.last(),
            })
        );
    } else {
        println!(
            "schedule store {}, broker {}",
            connections.url(Role::Schedule)?,
            connections.url(Role::Broker)?
        );
        println!(
            "a round with {} entries, none due: p50 {}, p99 {}",
            bench.entries,
            human_duration(idle[idle.len() / 2]),
            human_duration(idle[idle.len() * 99 / 100])
        );
        println!(
            "all {} entries due at once: fired in {} ({rounds} rounds, {} per entry)",
            bench.entries,
            human_duration(all_due),
            human_duration(per_entry)
        );
        println!(
            "lateness of {} firings ({} entries every second for {}): p50 {} ms, p99 {} ms, max {} ms",
            late.len(),
            bench.per_second,
            human_duration(bench.duration),
            pick(0.5).unwrap_or(0),
            pick(0.99).unwrap_or(0),
            late.last().copied().unwrap_or(0)
        );
    }
    Ok(ExitCode::SUCCESS)
}
