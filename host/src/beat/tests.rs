//! Beat rounds with a fixed clock, against the in-memory adapters.

use super::*;
use crate::backend::memory::MemoryBackend;
use crate::broker::memory::MemoryBroker;
use crate::broker::{Broker, ConsumeOptions};
use crate::codec::Codecs;
use crate::schedule::Schedule;
use crate::stores::lock::memory::MemoryLockStore;
use crate::stores::registry::ComponentRegistry;
use crate::stores::registry::memory::MemoryRegistry;
use crate::stores::schedule::EntryDefinition;
use crate::stores::schedule::memory::MemoryScheduleStore;
use crate::task::{TaskDefinition, TaskOptions};

const T0: u64 = 1_800_000_000_000;

fn at(seconds: u64) -> Timestamp {
    Timestamp::from_millis(T0 + seconds * 1000)
}

struct Parts {
    store: Arc<MemoryScheduleStore>,
    broker: Arc<MemoryBroker>,
    backend: Arc<MemoryBackend>,
    registry: Arc<MemoryRegistry>,
}

impl Parts {
    async fn new() -> Parts {
        let registry = Arc::new(MemoryRegistry::default());
        let definition = TaskDefinition {
            name: "hello.add".into(),
            description: None,
            options: TaskOptions::default(),
            capabilities: Default::default(),
        };
        registry.register("digest", &[definition]).await.unwrap();
        Parts {
            store: Arc::new(MemoryScheduleStore::default()),
            broker: Arc::new(MemoryBroker::default()),
            backend: Arc::new(MemoryBackend::default()),
            registry,
        }
    }

    fn beat(&self) -> Beat {
        let client = Client::new(
            self.broker.clone(),
            self.registry.clone(),
            Codecs::default(),
        );
        Beat::new(
            BeatConfig::default(),
            self.store.clone(),
            Arc::new(MemoryLockStore::default()),
            client,
            self.backend.clone(),
        )
    }

    async fn published(&self) -> Vec<String> {
        let options = ConsumeOptions {
            max: 10_000,
            ..ConsumeOptions::default()
        };
        let deliveries = self
            .broker
            .consume(&["default".to_owned()], &options)
            .await
            .unwrap();
        for delivery in &deliveries {
            self.broker.ack(&delivery.receipt).await.unwrap();
        }
        deliveries.into_iter().map(|d| d.envelope.id).collect()
    }

    async fn entry(&self, id: &str) -> ScheduleEntry {
        self.store.get(id).await.unwrap().unwrap()
    }
}

fn every(id: &str, seconds: u64, next: Timestamp) -> ScheduleEntry {
    let schedule = Schedule::Interval {
        every_ms: seconds * 1000,
        start_at: None,
        end_at: None,
    };
    let definition = EntryDefinition::new("hello.add", r#"{"a":1,"b":2}"#, schedule);
    ScheduleEntry::new(id, definition, next)
}

#[tokio::test]
async fn a_due_slot_fires_once_under_an_id_derived_from_it() {
    let parts = Parts::new().await;
    parts.store.save(&every("tick", 10, at(0))).await.unwrap();
    let beat = parts.beat();

    let round = beat.fire_due(at(0)).await.unwrap();
    assert_eq!((round.fired, round.skipped, round.conflicts), (1, 0, 0));
    assert_eq!(parts.published().await, [task_id("tick", at(0))]);
    let entry = parts.entry("tick").await;
    assert_eq!(entry.state.next_run_at, Some(at(10)));
    assert_eq!(entry.state.total_run_count, 1);
    assert_eq!(entry.state.last_slot, Some(at(0)));

    // Nothing more is due until the next slot, which the round reports.
    let round = beat.fire_due(at(5)).await.unwrap();
    assert_eq!(round.fired, 0);
    assert!(parts.published().await.is_empty());
    let round = beat.fire_due(at(9)).await.unwrap();
    assert_eq!(round.next_due, Some(at(10)));
    let round = beat.fire_due(at(10)).await.unwrap();
    assert_eq!(round.fired, 1);
    assert_eq!(parts.entry("tick").await.state.drift_ms, 0);
}

#[tokio::test]
async fn two_beats_on_one_slot_publish_one_id_and_record_it_once() {
    let parts = Parts::new().await;
    parts.store.save(&every("tick", 10, at(0))).await.unwrap();
    let (first, second) = (parts.beat(), parts.beat());
    let (a, b) = tokio::join!(first.fire_due(at(0)), second.fire_due(at(0)));
    let (a, b) = (a.unwrap(), b.unwrap());
    let published = parts.published().await;
    assert!(!published.is_empty());
    assert!(
        published.iter().all(|id| *id == task_id("tick", at(0))),
        "{published:?}"
    );
    assert_eq!(parts.entry("tick").await.state.total_run_count, 1);
    assert_eq!(a.conflicts + b.conflicts, published.len() - 1);
}

#[tokio::test]
async fn missed_slots_follow_the_catch_up_policy() {
    for (policy, fired, skipped) in [
        (CatchUp::All, 10, 0),
        (CatchUp::One, 1, 9),
        (CatchUp::None, 0, 10),
    ] {
        let parts = Parts::new().await;
        let mut entry = every("late", 10, at(0));
        entry.definition.catch_up = policy;
        parts.store.save(&entry).await.unwrap();
        // Slots at 0, 10, ..., 90 are due at 98 s; the latest is 8 s old, longer than a
        // takeover (lock TTL 5 s + tick 1 s), so `none` counts it missed.
        let round = parts.beat().fire_due(at(98)).await.unwrap();
        assert_eq!((round.fired, round.skipped), (fired, skipped), "{policy:?}");
        let published = parts.published().await;
        assert_eq!(published.len(), fired, "{policy:?}");
        if policy == CatchUp::One {
            assert_eq!(published, [task_id("late", at(90))]);
        }
        let entry = parts.entry("late").await;
        assert_eq!(entry.state.next_run_at, Some(at(100)), "{policy:?}");
        assert_eq!(entry.state.skipped_count, skipped);
    }
}

#[tokio::test]
async fn overlap_skip_waits_for_the_previous_task() {
    let parts = Parts::new().await;
    let mut entry = every("slow", 1, at(0));
    entry.definition.overlap = Overlap::Skip;
    parts.store.save(&entry).await.unwrap();
    let beat = parts.beat();

    assert_eq!(beat.fire_due(at(0)).await.unwrap().fired, 1);
    let first = task_id("slow", at(0));
    // Beat wrote the task's pending status, so a task still queued counts as running.
    let pending = parts.backend.get(&first).await.unwrap().unwrap();
    assert_eq!(pending.state, TaskState::Pending);
    let round = beat.fire_due(at(1)).await.unwrap();
    assert_eq!((round.fired, round.skipped), (0, 1));

    let mut done = TaskStatus::new(&first, TaskState::Succeeded);
    done.task = Some("hello.add".into());
    parts.backend.set(&done, None).await.unwrap();
    let round = beat.fire_due(at(2)).await.unwrap();
    assert_eq!((round.fired, round.skipped), (1, 0));
    assert_eq!(parts.published().await, [first, task_id("slow", at(2))]);
}

#[tokio::test]
async fn a_task_that_cannot_be_enqueued_is_recorded_and_the_entry_moves_on() {
    let parts = Parts::new().await;
    let mut entry = every("typo", 10, at(0));
    entry.definition.task = "hello.ad".into();
    parts.store.save(&entry).await.unwrap();
    let round = parts.beat().fire_due(at(0)).await.unwrap();
    assert_eq!((round.fired, round.failed), (0, 1));
    let entry = parts.entry("typo").await;
    assert!(
        entry
            .state
            .last_error
            .as_deref()
            .unwrap()
            .contains("unknown task `hello.ad`"),
        "{:?}",
        entry.state.last_error
    );
    assert_eq!(entry.state.next_run_at, Some(at(10)));
}

#[tokio::test]
async fn disabled_and_expired_entries_do_not_fire() {
    let parts = Parts::new().await;
    let mut off = every("off", 10, at(0));
    off.definition.enabled = false;
    parts.store.save(&off).await.unwrap();
    let mut ending = every("ending", 10, at(0));
    ending.definition.expire_at = Some(at(15));
    parts.store.save(&ending).await.unwrap();
    let beat = parts.beat();
    assert_eq!(beat.fire_due(at(0)).await.unwrap().fired, 1);
    assert_eq!(beat.fire_due(at(10)).await.unwrap().fired, 1);
    assert_eq!(parts.entry("ending").await.state.next_run_at, None);
    assert_eq!(beat.fire_due(at(20)).await.unwrap().fired, 0);
    assert_eq!(
        upcoming(&parts.entry("off").await, 3, at(0)),
        [at(0), at(10), at(20)]
    );
    assert_eq!(
        upcoming(&parts.entry("off").await, 2, at(25)),
        [at(30), at(40)],
        "a stale next run is not shown as upcoming"
    );
}

#[tokio::test]
async fn jitter_delays_a_firing_by_the_same_amount_everywhere() {
    let mut entry = every("spread", 60, at(0));
    entry.definition.jitter_ms = 30_000;
    let request = firing(&entry, at(0));
    let delay = request.not_before.unwrap().saturating_since(at(0));
    assert!(delay <= Duration::from_secs(30));
    assert_eq!(firing(&entry, at(0)).not_before, request.not_before);
    assert_eq!(
        request.headers.get(ENTRY_HEADER).map(String::as_str),
        Some("spread")
    );
}

#[tokio::test]
async fn overlap_skip_catches_up_one_slot_at_a_time() {
    let parts = Parts::new().await;
    let mut entry = every("backlog", 1, at(0));
    entry.definition.overlap = Overlap::Skip;
    entry.definition.catch_up = CatchUp::All;
    parts.store.save(&entry).await.unwrap();
    let beat = parts.beat();
    let round = beat.fire_due(at(5)).await.unwrap();
    assert_eq!(round.fired, 1, "the next slot waits for this one");
    assert_eq!(parts.entry("backlog").await.state.next_run_at, Some(at(1)));
    // While it runs, the rest of the backlog is skipped in one round, not one per round.
    let round = beat.fire_due(at(5)).await.unwrap();
    assert_eq!((round.fired, round.skipped, round.more), (0, 5, false));
    assert_eq!(parts.entry("backlog").await.state.next_run_at, Some(at(6)));
}

#[tokio::test]
async fn a_firing_is_recorded_over_an_edit_made_meanwhile() {
    let parts = Parts::new().await;
    parts.store.save(&every("edited", 10, at(0))).await.unwrap();
    let stale = parts.entry("edited").await;
    // An operator edits the entry between the round's read and its write.
    let mut edit = stale.clone();
    edit.definition.meta.insert("owner".into(), "ops".into());
    parts.store.save(&edit).await.unwrap();
    let beat = parts.beat();
    let outcome = Outcome {
        read_next: stale.state.next_run_at,
        fired: vec![(at(0), task_id("edited", at(0)))],
        dropped: 0,
        next: Some(at(10)),
        error: None,
        at: at(0),
    };
    let mut lost = stale.clone();
    outcome.record(&mut lost.state);
    assert!(!parts.store.save(&lost).await.unwrap());
    assert!(beat.record_again("edited", &outcome).await.unwrap());
    let entry = parts.entry("edited").await;
    assert_eq!(
        entry.state.next_run_at,
        Some(at(10)),
        "the slot is recorded: no refire"
    );
    assert_eq!(
        entry.definition.meta["owner"], "ops",
        "and the edit is kept"
    );

    // Once another Beat recorded the slot, the late one does not record it again.
    assert!(!beat.record_again("edited", &outcome).await.unwrap());
    assert_eq!(parts.entry("edited").await.state.total_run_count, 1);
}
