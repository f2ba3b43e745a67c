//! The settlement contract (`stem_host::settlement`), for every store: the generic
//! statuses-then-entries store over each adapter family's broker and backend, and the Redis
//! and Postgres stores that do both in one step.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use stem_host::backend::{ResultBackend, TaskFailure, TaskState, TaskStatus};
use stem_host::broker::{Broker, ConsumeOptions, Delivery, Settle};
use stem_host::codec::Payload;
use stem_host::envelope::Envelope;
use stem_host::settlement::{Settlement, SettlementStore, StatusesThenEntries};
use stem_host::storage::StorageError;

use super::{Connect, PATIENCE, SHORT, adapters};

/// One test per case for the store whose harness `$make` builds.
macro_rules! settlement_suite {
    ($store:ident, $make:expr) => {
        mod $store {
            use super::*;
            settlement_suite!(@cases $make;
                statuses_are_recorded_and_entries_settled, a_lost_lease_settles_nothing,
                a_recorded_terminal_status_is_kept, an_invalid_retry_settles_nothing);
        }
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let harness = $make.await;
                super::$case(&harness).await;
            }
        )*
    };
}

settlement_suite!(memory, Separate::new(adapters::Memory::new()));
settlement_suite!(sqlite, Separate::new(adapters::Sqlite::new()));
settlement_suite!(redis_separate, Separate::new(adapters::Redis::new()));
settlement_suite!(redis, Together::new(adapters::Redis::new()));
settlement_suite!(postgres_separate, Separate::new(adapters::Postgres::new()));
settlement_suite!(postgres, Together::new(adapters::Postgres::new()));

const NS: &str = "conformance";

/// What a case works with: one storage's broker and backend, and the store writing to both.
pub struct Parts {
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    settlements: Arc<dyn SettlementStore>,
}

#[async_trait]
pub trait SettlementHarness: Send + Sync + 'static {
    async fn open(&self, namespace: &str) -> Parts;
    /// Whether a status is recorded only while its lease holds (a store that writes status and
    /// entry in one step); the others may record it anyway.
    fn fences_statuses(&self) -> bool;
}

/// [`StatusesThenEntries`] over an adapter family's broker and backend.
pub struct Separate<H>(H);

impl<H> Separate<H> {
    async fn new(harness: impl Future<Output = H>) -> Separate<H> {
        Separate(harness.await)
    }
}

#[async_trait]
impl<H> SettlementHarness for Separate<H>
where
    H: Connect<dyn Broker> + Connect<dyn ResultBackend>,
{
    async fn open(&self, namespace: &str) -> Parts {
        let broker: Arc<dyn Broker> = self.0.connect(namespace).await;
        let backend: Arc<dyn ResultBackend> = self.0.connect(namespace).await;
        Parts {
            settlements: Arc::new(StatusesThenEntries::new(backend.clone(), broker.clone())),
            broker,
            backend,
        }
    }

    fn fences_statuses(&self) -> bool {
        false
    }
}

/// A family's own store on the server of its broker and backend (`RedisSettlements`,
/// `PostgresSettlements`): the harness connects it like any adapter.
pub struct Together<H>(H);

impl<H> Together<H> {
    async fn new(harness: impl Future<Output = H>) -> Together<H> {
        Together(harness.await)
    }
}

#[async_trait]
impl<H> SettlementHarness for Together<H>
where
    H: Connect<dyn Broker> + Connect<dyn ResultBackend> + Connect<dyn SettlementStore>,
{
    async fn open(&self, namespace: &str) -> Parts {
        Parts {
            broker: self.0.connect(namespace).await,
            backend: self.0.connect(namespace).await,
            settlements: self.0.connect(namespace).await,
        }
    }

    fn fences_statuses(&self) -> bool {
        true
    }
}

fn take(max: usize, lease: Duration) -> ConsumeOptions {
    ConsumeOptions {
        max,
        lease: Some(lease),
        wait: Duration::ZERO,
    }
}

fn status(delivery: &Delivery, state: TaskState, worker: &str) -> TaskStatus {
    TaskStatus {
        worker: Some(worker.to_owned()),
        error: (state != TaskState::Succeeded).then(|| TaskFailure {
            kind: "failed".into(),
            message: format!("{state} by {worker}"),
        }),
        ..TaskStatus::new(delivery.envelope.id.clone(), state)
    }
}

fn settlement(delivery: &Delivery, status: Option<TaskStatus>, settle: Settle) -> Settlement {
    Settlement {
        receipt: delivery.receipt.clone(),
        status,
        settle,
    }
}

async fn statuses_are_recorded_and_entries_settled(harness: &impl SettlementHarness) {
    let parts = harness.open(NS).await;
    let sent: Vec<Envelope> = (0..4)
        .map(|_| Envelope::new("t.settle", Payload::json("{}")))
        .collect();
    parts.broker.publish_batch(&sent).await.unwrap();
    let got = parts
        .broker
        .consume(&["default".to_owned()], &take(4, PATIENCE))
        .await
        .unwrap();
    assert_eq!(got.len(), 4);
    let mut next = got[1].envelope.clone();
    next.attempt = 2;
    let batch = [
        settlement(
            &got[0],
            Some(status(&got[0], TaskState::Succeeded, "w")),
            Settle::Ack,
        ),
        settlement(
            &got[1],
            Some(status(&got[1], TaskState::Retrying, "w")),
            Settle::Retry {
                next: Box::new(next),
                delay: Duration::ZERO,
            },
        ),
        settlement(
            &got[2],
            Some(status(&got[2], TaskState::Failed, "w")),
            Settle::DeadLetter("failed for good".into()),
        ),
        settlement(&got[3], None, Settle::Release(Duration::ZERO)),
    ];
    assert_eq!(
        parts.settlements.settle_many(&batch).await.unwrap(),
        [true; 4]
    );
    let ids: Vec<String> = got.iter().map(|d| d.envelope.id.clone()).collect();
    let states: Vec<Option<TaskState>> = parts
        .backend
        .get_many(&ids)
        .await
        .unwrap()
        .into_iter()
        .map(|status| status.map(|s| s.state))
        .collect();
    assert_eq!(
        states,
        [
            Some(TaskState::Succeeded),
            Some(TaskState::Retrying),
            Some(TaskState::Failed),
            None
        ]
    );
    let stats = parts.broker.stats("default").await.unwrap();
    assert_eq!(
        (stats.ready, stats.in_flight, stats.dead),
        (2, 0, 1),
        "{stats:?}"
    );
    let again = parts
        .broker
        .consume(&["default".to_owned()], &take(4, PATIENCE))
        .await
        .unwrap();
    let mut attempts: Vec<(String, u32)> = again
        .iter()
        .map(|d| (d.envelope.id.clone(), d.envelope.attempt))
        .collect();
    attempts.sort();
    let mut expected = vec![(ids[1].clone(), 2), (ids[3].clone(), 1)];
    expected.sort();
    assert_eq!(attempts, expected);
}

async fn a_lost_lease_settles_nothing(harness: &impl SettlementHarness) {
    let parts = harness.open(NS).await;
    let other = harness.open(NS).await;
    parts
        .broker
        .publish(&Envelope::new("t.stale", Payload::json("{}")))
        .await
        .unwrap();
    let stale = parts
        .broker
        .consume(&["default".to_owned()], &take(1, SHORT))
        .await
        .unwrap();
    tokio::time::sleep(SHORT + Duration::from_millis(100)).await;
    let current = other
        .broker
        .consume(&["default".to_owned()], &take(1, PATIENCE))
        .await
        .unwrap();
    assert_eq!(current.len(), 1, "the expired lease is taken over");

    let late = [settlement(
        &stale[0],
        Some(status(&stale[0], TaskState::Failed, "stale")),
        Settle::DeadLetter("too late".into()),
    )];
    assert_eq!(parts.settlements.settle_many(&late).await.unwrap(), [false]);
    let stats = other.broker.stats("default").await.unwrap();
    assert_eq!((stats.in_flight, stats.dead), (1, 0), "{stats:?}");
    if harness.fences_statuses() {
        assert_eq!(
            other.backend.get(&current[0].envelope.id).await.unwrap(),
            None,
            "a worker that lost its lease records nothing"
        );
    }

    let done = [settlement(
        &current[0],
        Some(status(&current[0], TaskState::Succeeded, "current")),
        Settle::Ack,
    )];
    assert_eq!(other.settlements.settle_many(&done).await.unwrap(), [true]);
    let recorded = other
        .backend
        .get(&current[0].envelope.id)
        .await
        .unwrap()
        .unwrap();
    assert!(recorded.state.is_terminal());
    if harness.fences_statuses() {
        assert_eq!(recorded.worker.as_deref(), Some("current"));
    }
    let stats = other.broker.stats("default").await.unwrap();
    assert_eq!(
        (stats.ready, stats.in_flight, stats.dead),
        (0, 0, 0),
        "{stats:?}"
    );
}

async fn a_recorded_terminal_status_is_kept(harness: &impl SettlementHarness) {
    let parts = harness.open(NS).await;
    parts
        .broker
        .publish(&Envelope::new("t.twice", Payload::json("{}")))
        .await
        .unwrap();
    let got = parts
        .broker
        .consume(&["default".to_owned()], &take(1, PATIENCE))
        .await
        .unwrap();
    let first = status(&got[0], TaskState::Succeeded, "first");
    assert!(parts.backend.set(&first, None).await.unwrap());
    let again = [settlement(
        &got[0],
        Some(status(&got[0], TaskState::Failed, "second")),
        Settle::Ack,
    )];
    assert_eq!(parts.settlements.settle_many(&again).await.unwrap(), [true]);
    let kept = parts
        .backend
        .get(&got[0].envelope.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (kept.state, kept.worker.as_deref()),
        (TaskState::Succeeded, Some("first"))
    );
    let stats = parts.broker.stats("default").await.unwrap();
    assert_eq!(
        (stats.ready, stats.in_flight, stats.dead),
        (0, 0, 0),
        "{stats:?}"
    );
}

async fn an_invalid_retry_settles_nothing(harness: &impl SettlementHarness) {
    let parts = harness.open(NS).await;
    let sent: Vec<Envelope> = (0..2)
        .map(|_| Envelope::new("t.invalid", Payload::json("{}")))
        .collect();
    parts.broker.publish_batch(&sent).await.unwrap();
    let got = parts
        .broker
        .consume(&["default".to_owned()], &take(2, PATIENCE))
        .await
        .unwrap();
    let elsewhere = got[1].envelope.clone().with_queue("elsewhere");
    let batch = [
        settlement(
            &got[0],
            Some(status(&got[0], TaskState::Succeeded, "w")),
            Settle::Ack,
        ),
        settlement(
            &got[1],
            Some(status(&got[1], TaskState::Retrying, "w")),
            Settle::Retry {
                next: Box::new(elsewhere),
                delay: Duration::ZERO,
            },
        ),
    ];
    let refused = parts.settlements.settle_many(&batch).await.unwrap_err();
    assert!(
        matches!(refused, StorageError::InvalidEnvelope(_)),
        "{refused}"
    );
    let stats = parts.broker.stats("default").await.unwrap();
    assert_eq!((stats.ready, stats.in_flight), (0, 2), "{stats:?}");
}
