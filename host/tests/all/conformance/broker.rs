//! The broker contract (`stem_host::broker`), for every adapter.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use stem_host::broker::{
    Broker, ConsumeOptions, DeadLetter, DeadLetterIds, DeadLetterPages, DeadLetterQuery, Delivery,
    Settle,
};
use stem_host::codec::Payload;
use stem_host::envelope::Envelope;
use stem_host::storage::StorageError;
use stem_host::time::Timestamp;

use super::{Connect, PATIENCE, SHORT, adapters};

/// Writes entries behind the broker's back, as corruption or a foreign producer would.
#[async_trait]
pub trait RawEntries: Send + Sync {
    async fn insert_raw(&self, namespace: &str, queue: &str, payload: &str);
}

pub trait BrokerHarness: Connect<dyn Broker> + RawEntries {}
impl<T: Connect<dyn Broker> + RawEntries> BrokerHarness for T {}

/// One test per case for the adapter whose harness `$make` builds.
macro_rules! broker_suite {
    ($adapter:ident, $make:expr) => {
        mod $adapter {
            use super::*;
            broker_suite!(@cases $make;
                round_trip, invalid_envelopes_are_refused, priority_order, consume_across_queues,
                not_before_delays, ack_removes, nack_requeues_after_its_delay,
                expired_lease_is_redelivered_and_not_before, extend_lease_prevents_redelivery,
                concurrent_consumers_never_share_a_delivery, consume_wakes_on_publish,
                dead_letters_list_show_replay_purge, corrupt_entries_are_dead_lettered,
                dead_letters_are_selected_by_kind_order_and_range,
                concurrent_replays_publish_each_letter_once,
                broadcast_reaches_every_subscriber, large_broadcasts_arrive_whole,
                namespaces_are_isolated,
                purge_and_stats, publish_batch_stores_everything, queue_names_cannot_share_keys,
                retry_replaces_the_entry_with_its_next_attempt,
                settle_many_applies_each_while_its_lease_holds,
                publish_unique_stores_each_id_once, publish_unique_refuses_a_whole_invalid_batch,
                publish_unique_forgets_an_id_after_its_window,
                publish_unique_ignores_plain_publishes, publish_unique_ids_are_per_namespace,
                publish_by_key_stores_once_per_key_and_names_the_holder,
                publish_by_key_forgets_a_key_after_its_window,
                publish_by_key_is_atomic_under_concurrency);
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

broker_suite!(memory, adapters::Memory::new());
broker_suite!(sqlite, adapters::Sqlite::new());
broker_suite!(redis, adapters::Redis::new());
broker_suite!(postgres, adapters::Postgres::new());

const NS: &str = "conformance";

fn envelope(task: &str) -> Envelope {
    Envelope::new(task, Payload::json(r#"{"n":1}"#))
}

fn queues(names: &[&str]) -> Vec<String> {
    names.iter().map(|name| name.to_string()).collect()
}

fn take(max: usize, lease: Duration) -> ConsumeOptions {
    ConsumeOptions {
        max,
        lease: Some(lease),
        wait: Duration::ZERO,
    }
}

fn wait_for_one(lease: Duration) -> ConsumeOptions {
    ConsumeOptions {
        max: 1,
        lease: Some(lease),
        wait: PATIENCE,
    }
}

fn ids_of(envelopes: &[Envelope]) -> Vec<String> {
    envelopes.iter().map(|e| e.id.clone()).collect()
}

fn ids(deliveries: &[Delivery]) -> Vec<String> {
    deliveries.iter().map(|d| d.envelope.id.clone()).collect()
}

async fn round_trip(harness: &impl BrokerHarness) {
    let broker = harness.connect(NS).await;
    let mut sent = envelope("hello.add").with_queue("q");
    sent.headers.insert("trace".into(), "t-1".into());
    sent.parent_id = Some("parent".into());
    broker.publish(&sent).await.unwrap();
    let got = broker
        .consume(&queues(&["q"]), &take(10, PATIENCE))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].envelope, sent);
    assert_eq!(got[0].deliveries, 1);
    assert_eq!(got[0].receipt.queue, "q");
    assert!(
        broker
            .consume(&queues(&["other"]), &take(10, PATIENCE))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn invalid_envelopes_are_refused(harness: &impl BrokerHarness) {
    let broker = harness.connect(NS).await;
    let too_high = envelope("hello.add").with_priority(10);
    let refused = broker.publish(&too_high).await.unwrap_err();
    assert!(
        matches!(refused, StorageError::InvalidEnvelope(_)),
        "{refused}"
    );
    assert!(refused.to_string().contains("priority 10"), "{refused}");
    let bad_name = envelope("not a name");
    assert!(
        broker
            .publish_batch(&[envelope("fine"), bad_name])
            .await
            .is_err()
    );
    assert_eq!(
        broker.stats("default").await.unwrap().ready,
        0,
        "a refused batch stores nothing"
    );
}

async fn queue_names_cannot_share_keys(harness: &impl BrokerHarness) {
    let broker = harness.connect(NS).await;
    for name in ["reports:data", "a b", "", "ü", &"q".repeat(129)] {
        let refused = broker
            .publish(&envelope("t.queue").with_queue(name))
            .await
            .unwrap_err();
        assert!(
            matches!(refused, StorageError::InvalidEnvelope(_)),
            "queue `{name}`: {refused}"
        );
    }
    broker
        .publish(
            &envelope("t.queue")
                .with_queue("reports.v2_x-1")
                .delayed(PATIENCE),
        )
        .await
        .unwrap();
    broker
        .publish(&envelope("t.queue").with_queue("reports"))
        .await
        .unwrap();
    let got = broker
        .consume(&queues(&["reports"]), &take(10, PATIENCE))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
}

async fn retry_replaces_the_entry_with_its_next_attempt(harness: &impl BrokerHarness) {
    let broker = harness.connect(NS).await;
    let other = harness.connect(NS).await;
    let sent = envelope("t.retry").with_priority(3);
    broker.publish(&sent).await.unwrap();
    let got = broker
        .consume(&queues(&["default"]), &take(1, PATIENCE))
        .await
        .unwrap();
    let mut next = got[0].envelope.clone();
    next.attempt = 2;
    let retried = Instant::now();
    broker
        .settle(
            &got[0].receipt,
            Settle::Retry {
                next: Box::new(next.clone()),
                delay: SHORT,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        broker.stats("default").await.unwrap(),
        stats_of("default", 0, 1, 0, 0),
        "the entry was replaced, not copied"
    );
    let stale = broker.ack(&got[0].receipt).await.unwrap_err();
    assert!(matches!(stale, StorageError::LeaseLost(_)), "{stale}");
    let again = other
        .consume(&queues(&["default"]), &wait_for_one(PATIENCE))
        .await
        .unwrap();
    assert!(retried.elapsed() >= SHORT - Duration::from_millis(20));
    assert_eq!(again.len(), 1);
    assert_eq!(
        again[0].envelope, next,
        "the next attempt is what was delivered"
    );
    assert_eq!(
        again[0].deliveries, 1,
        "a new attempt counts its deliveries afresh"
    );

    let mut moved = again[0].envelope.clone();
    moved.queue = "elsewhere".into();
    let refused = other
        .settle(
            &again[0].receipt,
            Settle::Retry {
                next: Box::new(moved),
                delay: Duration::ZERO,
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(refused, StorageError::InvalidEnvelope(_)),
        "{refused}"
    );
    other
        .settle(
            &again[0].receipt,
            Settle::Retry {
                next: Box::new(again[0].envelope.clone()),
                delay: Duration::ZERO,
            },
        )
        .await
        .unwrap();
    let at_once = broker
        .consume(&queues(&["default"]), &take(1, PATIENCE))
        .await
        .unwrap();
    assert_eq!(
        ids(&at_once),
        vec![sent.id],
        "a retry without delay is ready at once"
    );
}

async fn settle_many_applies_each_while_its_lease_holds(harness: &impl BrokerHarness) {
    let broker = harness.connect(NS).await;
    let sent: Vec<Envelope> = (0..4).map(|_| envelope("t.batch")).collect();
    broker.publish_batch(&sent).await.unwrap();
    let got = broker
        .consume(&queues(&["default"]), &take(4, SHORT))
        .await
        .unwrap();
    assert_eq!(got.len(), 4);
    // The last lease runs out and another consumer takes that entry.
    let stale = got[3].receipt.clone();
    tokio::time::sleep(SHORT + Duration::from_millis(50)).await;
    for delivery in &got[..3] {
        broker
            .extend_lease(&delivery.receipt, PATIENCE)
            .await
            .unwrap();
    }
    let retaken = broker
        .consume(&queues(&["default"]), &take(4, PATIENCE))
        .await
        .unwrap();
    assert_eq!(ids(&retaken), vec![sent[3].id.clone()]);
    assert_eq!(
        retaken[0].deliveries, 2,
        "an expired lease counts as a delivery"
    );
    let held = broker
        .settle_many(&[
            (got[0].receipt.clone(), Settle::Ack),
            (got[1].receipt.clone(), Settle::Release(PATIENCE)),
            (got[2].receipt.clone(), Settle::DeadLetter("batch".into())),
            (stale, Settle::Ack),
        ])
        .await
        .unwrap();
    assert_eq!(held, [true, true, true, false]);
    assert_eq!(
        broker.stats("default").await.unwrap(),
        stats_of("default", 0, 1, 1, 1)
    );
    broker.ack(&retaken[0].receipt).await.unwrap();
}

async fn priority_order(harness: &impl BrokerHarness) {
    let broker = harness.connect(NS).await;
    let sent: Vec<Envelope> = [0, 5, 9, 5, 1]
        .into_iter()
        .map(|priority| envelope("t.p").with_priority(priority))
        .collect();
    for envelope in &sent {
        broker.publish(envelope).await.unwrap();
    }
    let got = broker
        .consume(&queues(&["default"]), &take(10, PATIENCE))
        .await
        .unwrap();
    let expected: Vec<String> = [2, 1, 3, 4, 0]
        .iter()
        .map(|&i| sent[i].id.clone())
        .collect();
    assert_eq!(
        ids(&got),
        expected,
        "higher priority first, then first published"
    );

    for envelope in &sent {
        broker
            .publish(&envelope.clone().with_id(format!("{}-again", envelope.id)))
            .await
            .unwrap();
    }
    let one_by_one: Vec<u8> = {
        let mut order = Vec::new();
        for _ in 0..5 {
            let got = broker
                .consume(&queues(&["default"]), &take(1, PATIENCE))
                .await
                .unwrap();
            order.push(got[0].envelope.priority);
        }
        order
    };
    assert_eq!(one_by_one, vec![9, 5, 5, 1, 0]);
}

async fn consume_across_queues(harness: &impl BrokerHarness) {
    let broker = harness.connect(NS).await;
    let low = envelope("t.low").with_queue("a").with_priority(1);
    let high = envelope("t.high").with_queue("b").with_priority(7);
    let elsewhere = envelope("t.other").with_queue("c").with_priority(9);
    broker
        .publish_batch(&[low.clone(), high.clone(), elsewhere])
        .await
        .unwrap();
    let got = broker
        .consume(&queues(&["a", "b"]), &take(10, PATIENCE))
        .await
        .unwrap();
    assert_eq!(ids(&got), vec![high.id, low.id]);
    assert_eq!(got[0].receipt.queue, "b");
}

async fn not_before_delays(harness: &impl BrokerHarness) {
    let broker = harness.connect(NS).await;
    let delayed = envelope("t.later").delayed(SHORT);
    let now = envelope("t.now");
    let published = Instant::now();
    broker
        .publish_batch(&[delayed.clone(), now.clone()])
        .await
        .unwrap();
    let stats = broker.stats("default").await.unwrap();
    assert_eq!((stats.ready, stats.delayed), (1, 1));
    let first = broker
        .consume(&queues(&["default"]), &take(10, PATIENCE))
        .await
        .unwrap();
    assert_eq!(ids(&first), vec![now.id]);
    let second = broker
        .consume(&queues(&["default"]), &wait_for_one(PATIENCE))
        .await
        .unwrap();
    assert_eq!(ids(&second), vec![delayed.id.clone()]);
    let waited = published.elapsed();
    assert!(
        waited >= SHORT - Duration::from_millis(20),
        "delivered after {waited:?}"
    );
    assert_eq!(second[0].envelope.not_before, delayed.not_before);
}

async fn ack_removes(harness: &impl BrokerHarness) {
    let broker = harness.connect(NS).await;
    broker.publish(&envelope("t.ack")).await.unwrap();
    let got = broker
        .consume(&queues(&["default"]), &take(1, SHORT))
        .await
        .unwrap();
    broker.ack(&got[0].receipt).await.unwrap();
    assert_eq!(
        broker.stats("default").await.unwrap(),
        stats_of("default", 0, 0, 0, 0)
    );
    tokio::time::sleep(SHORT + Duration::from_millis(100)).await;
    assert!(
        broker
            .consume(&queues(&["default"]), &take(1, SHORT))
            .await
            .unwrap()
            .is_empty()
    );
    let again = broker.ack(&got[0].receipt).await.unwrap_err();
    assert!(matches!(again, StorageError::LeaseLost(_)), "{again}");
}

async fn nack_requeues_after_its_delay(harness: &impl BrokerHarness) {
    let broker = harness.connect(NS).await;
    let sent = envelope("t.nack");
    broker.publish(&sent).await.unwrap();
    let got = broker
        .consume(&queues(&["default"]), &take(1, PATIENCE))
        .await
        .unwrap();
    let nacked = Instant::now();
    broker.nack(&got[0].receipt, SHORT).await.unwrap();
    assert_eq!(broker.stats("default").await.unwrap().delayed, 1);
    assert!(
        broker
            .consume(&queues(&["default"]), &take(1, PATIENCE))
            .await
            .unwrap()
            .is_empty()
    );
    let again = broker
        .consume(&queues(&["default"]), &wait_for_one(PATIENCE))
        .await
        .unwrap();
    assert!(nacked.elapsed() >= SHORT - Duration::from_millis(20));
    assert_eq!(ids(&again), vec![sent.id]);
    assert_eq!(
        again[0].deliveries, 1,
        "a nack is not counted as a delivery"
    );

    broker
        .nack(&again[0].receipt, Duration::ZERO)
        .await
        .unwrap();
    let at_once = broker
        .consume(&queues(&["default"]), &take(1, PATIENCE))
        .await
        .unwrap();
    assert_eq!(at_once.len(), 1, "a nack without delay requeues at once");
}

async fn expired_lease_is_redelivered_and_not_before(harness: &impl BrokerHarness) {
    let broker = harness.connect(NS).await;
    let other = harness.connect(NS).await;
    let sent = envelope("t.lease");
    broker.publish(&sent).await.unwrap();
    let leased = Instant::now();
    let first = broker
        .consume(&queues(&["default"]), &take(1, SHORT))
        .await
        .unwrap();
    assert_eq!(broker.stats("default").await.unwrap().in_flight, 1);
    assert!(
        other
            .consume(&queues(&["default"]), &take(1, SHORT))
            .await
            .unwrap()
            .is_empty(),
        "a leased entry is not delivered to anyone else"
    );
    let second = other
        .consume(&queues(&["default"]), &wait_for_one(SHORT))
        .await
        .unwrap();
    assert!(
        leased.elapsed() >= SHORT - Duration::from_millis(20),
        "redelivered after {:?}",
        leased.elapsed()
    );
    assert_eq!(ids(&second), vec![sent.id]);
    assert_eq!(second[0].deliveries, 2);
    let stale = broker.ack(&first[0].receipt).await.unwrap_err();
    assert!(matches!(stale, StorageError::LeaseLost(_)), "{stale}");
    assert!(
        broker
            .extend_lease(&first[0].receipt, PATIENCE)
            .await
            .is_err()
    );
    other.ack(&second[0].receipt).await.unwrap();
    assert_eq!(
        broker.stats("default").await.unwrap(),
        stats_of("default", 0, 0, 0, 0)
    );
}

async fn extend_lease_prevents_redelivery(harness: &impl BrokerHarness) {
    let broker = harness.connect(NS).await;
    let other = harness.connect(NS).await;
    broker.publish(&envelope("t.extend")).await.unwrap();
    // Leases of a second, extended every 100ms for three of them: only a stall of 900ms
    // between two extensions could let the entry go, while without extensions it would.
    let lease = Duration::from_secs(1);
    let got = broker
        .consume(&queues(&["default"]), &take(1, lease))
        .await
        .unwrap();
    let started = Instant::now();
    while started.elapsed() < lease * 3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        broker.extend_lease(&got[0].receipt, lease).await.unwrap();
        assert!(
            other
                .consume(&queues(&["default"]), &take(1, SHORT))
                .await
                .unwrap()
                .is_empty()
        );
    }
    broker.ack(&got[0].receipt).await.unwrap();
}

async fn concurrent_consumers_never_share_a_delivery(harness: &impl BrokerHarness) {
    const TASKS: usize = 600;
    const CONSUMERS: usize = 8;
    let producer = harness.connect(NS).await;
    let sent: Vec<Envelope> = (0..TASKS).map(|_| envelope("t.race")).collect();
    producer.publish_batch(&sent).await.unwrap();
    let mut consumers = Vec::new();
    for _ in 0..CONSUMERS {
        let broker = harness.connect(NS).await;
        consumers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = broker
                    .consume(&queues(&["default"]), &take(7, PATIENCE))
                    .await
                    .unwrap();
                if got.is_empty() {
                    return mine;
                }
                for delivery in got {
                    broker.ack(&delivery.receipt).await.unwrap();
                    mine.push(delivery.envelope.id);
                }
            }
        }));
    }
    let mut seen = HashSet::new();
    for consumer in consumers {
        for id in consumer.await.unwrap() {
            assert!(seen.insert(id.clone()), "{id} was delivered twice");
        }
    }
    let expected: HashSet<String> = sent.into_iter().map(|e| e.id).collect();
    assert_eq!(seen, expected);
}

async fn consume_wakes_on_publish(harness: &impl BrokerHarness) {
    let consumer = harness.connect(NS).await;
    let producer = harness.connect(NS).await;
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let got = consumer
            .consume(&queues(&["default"]), &wait_for_one(PATIENCE))
            .await
            .unwrap();
        (got, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sent = envelope("t.wake");
    producer.publish(&sent).await.unwrap();
    let (got, waited) = waiting.await.unwrap();
    assert_eq!(ids(&got), vec![sent.id]);
    assert!(waited < PATIENCE / 2, "the consumer waited {waited:?}");
}

async fn dead_letters_list_show_replay_purge(harness: &impl BrokerHarness) {
    let broker = harness.connect(NS).await;
    let sent: Vec<Envelope> = (0..3)
        .map(|_| envelope("t.dead").with_queue("work"))
        .collect();
    broker.publish_batch(&sent).await.unwrap();
    let got = broker
        .consume(&queues(&["work"]), &take(3, PATIENCE))
        .await
        .unwrap();
    broker
        .dead_letter(&got[0].receipt, "max retries exceeded")
        .await
        .unwrap();
    broker
        .dead_letter(&got[1].receipt, "rejected by the task")
        .await
        .unwrap();
    broker.ack(&got[2].receipt).await.unwrap();
    assert!(
        broker.ack(&got[0].receipt).await.is_err(),
        "a dead-lettered entry is gone"
    );

    let all = broker
        .dead_letters(&DeadLetterQuery::default())
        .await
        .unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].task_id.as_deref(), Some(got[0].envelope.id.as_str()));
    assert_eq!(all[0].reason, "max retries exceeded");
    assert_eq!(all[0].queue, "work");
    assert_eq!(all[0].task.as_deref(), Some("t.dead"));
    assert_eq!(broker.stats("work").await.unwrap().dead, 2);

    let by_task = DeadLetterQuery {
        ids: vec![got[1].envelope.id.clone()],
        ..DeadLetterQuery::default()
    };
    let shown = broker.dead_letters(&by_task).await.unwrap();
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0].reason, "rejected by the task");
    let by_entry = DeadLetterQuery {
        ids: vec![shown[0].id.clone()],
        ..DeadLetterQuery::default()
    };
    assert_eq!(broker.dead_letters(&by_entry).await.unwrap().len(), 1);
    let other_queue = DeadLetterQuery {
        queue: Some("elsewhere".into()),
        ..DeadLetterQuery::default()
    };
    assert!(broker.dead_letters(&other_queue).await.unwrap().is_empty());

    let report = broker.replay_dead_letters(&by_task).await.unwrap();
    assert_eq!(report.replayed, vec![got[1].envelope.id.clone()]);
    let replayed = broker
        .consume(&queues(&["work"]), &take(5, PATIENCE))
        .await
        .unwrap();
    assert_eq!(ids(&replayed), vec![got[1].envelope.id.clone()]);
    assert_eq!(replayed[0].envelope.attempt, 1);
    assert_eq!(
        broker
            .dead_letters(&DeadLetterQuery::default())
            .await
            .unwrap()
            .len(),
        1
    );

    assert_eq!(
        broker
            .purge_dead_letters(&DeadLetterQuery::default())
            .await
            .unwrap(),
        1
    );
    assert!(
        broker
            .dead_letters(&DeadLetterQuery::default())
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(broker.stats("work").await.unwrap().dead, 0);
}

/// Publishes `sent` to queue `work` and dead-letters every one of them, in order.
async fn bury(broker: &dyn Broker, sent: &[Envelope]) -> Vec<DeadLetter> {
    broker.publish_batch(sent).await.unwrap();
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let batch = broker
            .consume(&queues(&["work"]), &take(sent.len() - got.len(), PATIENCE))
            .await
            .unwrap();
        assert!(!batch.is_empty(), "every published entry is delivered");
        got.extend(batch);
    }
    let settles: Vec<(_, _)> = got
        .iter()
        .map(|d| (d.receipt.clone(), Settle::DeadLetter("buried".into())))
        .collect();
    let held = broker.settle_many(&settles).await.unwrap();
    assert!(held.iter().all(|h| *h));
    broker
        .dead_letters(&DeadLetterQuery::default())
        .await
        .unwrap()
}

async fn dead_letters_are_selected_by_kind_order_and_range(harness: &impl BrokerHarness) {
    let broker = harness.connect(NS).await;
    let first = bury(broker.as_ref(), &[envelope("t.dead").with_queue("work")]).await;
    let letter = first[0].id.clone();
    // A producer may choose a task id that is another letter's id.
    let colliding = envelope("t.dead").with_queue("work").with_id(&letter);
    let both = bury(broker.as_ref(), &[colliding]).await;
    assert_eq!(both.len(), 2);
    let (older, newer) = (both[0].clone(), both[1].clone());
    assert_eq!(older.id, letter);
    let number = |l: &DeadLetter| l.number().expect("dead-letter ids are numbers");
    assert!(number(&newer) > number(&older), "ids grow");

    let select = |id_kind| DeadLetterQuery {
        ids: vec![letter.clone()],
        id_kind,
        ..DeadLetterQuery::default()
    };
    let found =
        |letters: Vec<DeadLetter>| -> Vec<String> { letters.into_iter().map(|l| l.id).collect() };
    let either = broker
        .dead_letters(&select(DeadLetterIds::Either))
        .await
        .unwrap();
    assert_eq!(found(either), vec![older.id.clone(), newer.id.clone()]);
    let by_letter = broker
        .dead_letters(&select(DeadLetterIds::Letter))
        .await
        .unwrap();
    assert_eq!(found(by_letter), vec![older.id.clone()]);
    let by_task = broker
        .dead_letters(&select(DeadLetterIds::Task))
        .await
        .unwrap();
    assert_eq!(found(by_task), vec![newer.id.clone()]);

    let newest = DeadLetterQuery {
        newest_first: true,
        ..DeadLetterQuery::default()
    };
    let newest = broker.dead_letters(&newest).await.unwrap();
    assert_eq!(found(newest), vec![newer.id.clone(), older.id.clone()]);
    let after = DeadLetterQuery {
        after: Some(number(&older)),
        ..DeadLetterQuery::default()
    };
    assert_eq!(
        found(broker.dead_letters(&after).await.unwrap()),
        vec![newer.id.clone()]
    );
    let up_to = DeadLetterQuery {
        up_to: Some(number(&older)),
        ..DeadLetterQuery::default()
    };
    assert_eq!(
        found(broker.dead_letters(&up_to).await.unwrap()),
        vec![older.id.clone()]
    );

    // Long lists of ids fit (SQLite limits bound values to 32,766 per statement).
    let mut many: Vec<String> = (0..40_000).map(|n| format!("no-such-{n}")).collect();
    many.push(newer.id.clone());
    let long = DeadLetterQuery {
        ids: many.clone(),
        id_kind: DeadLetterIds::Letter,
        ..DeadLetterQuery::default()
    };
    assert_eq!(
        found(broker.dead_letters(&long).await.unwrap()),
        vec![newer.id.clone()]
    );
    assert_eq!(broker.delete_dead_letters(&many).await.unwrap(), 1);
    assert_eq!(broker.stats("work").await.unwrap().dead, 1);
}

async fn concurrent_replays_publish_each_letter_once(harness: &impl BrokerHarness) {
    let brokers = [harness.connect(NS).await, harness.connect(NS).await];
    // More than a page, so that replays go on from one page to the next.
    let count = DeadLetterPages::<dyn Broker>::PAGE + 20;
    let sent: Vec<Envelope> = (0..count)
        .map(|_| envelope("t.dead").with_queue("work"))
        .collect();
    let letters = bury(brokers[0].as_ref(), &sent).await;
    assert_eq!(letters.len(), count);

    // A letter moved once is gone for a second move, which stores nothing.
    let first = &letters[0];
    let again = first.replay_envelope().unwrap();
    assert!(
        brokers[0]
            .requeue_dead_letter(&first.id, &again)
            .await
            .unwrap()
    );
    assert!(
        !brokers[1]
            .requeue_dead_letter(&first.id, &again)
            .await
            .unwrap()
    );
    assert_eq!(brokers[0].stats("work").await.unwrap().ready, 1);

    let start = Arc::new(tokio::sync::Barrier::new(2));
    let replays: Vec<_> = brokers
        .iter()
        .map(|broker| {
            let (broker, start) = (broker.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                broker
                    .replay_dead_letters(&DeadLetterQuery::default())
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut replayed = vec![first.task_id.clone().unwrap()];
    for replay in replays {
        replayed.extend(replay.await.unwrap().replayed);
    }
    let mut expected = ids_of(&sent);
    replayed.sort();
    expected.sort();
    assert_eq!(
        replayed, expected,
        "each letter is replayed by one of the two"
    );

    let mut published = Vec::new();
    loop {
        let got = brokers[0]
            .consume(&queues(&["work"]), &take(count, PATIENCE))
            .await
            .unwrap();
        if got.is_empty() {
            break;
        }
        published.extend(ids(&got));
    }
    published.sort();
    assert_eq!(published, expected, "each letter is published exactly once");
    assert_eq!(brokers[0].stats("work").await.unwrap().dead, 0);
}

async fn corrupt_entries_are_dead_lettered(harness: &impl BrokerHarness) {
    let broker = harness.connect(NS).await;
    harness.insert_raw(NS, "default", "{not an envelope").await;
    harness.insert_raw(NS, "default", r#"{"id":"half"}"#).await;
    // Decodes, but breaks a rule brokers rely on (stored before the rule, or by another
    // producer): a task id with a control character.
    let invalid = envelope("t.invalid").with_id("bad\u{7}id");
    harness.insert_raw(NS, "default", &invalid.to_json()).await;
    let good = envelope("t.good");
    broker.publish(&good).await.unwrap();
    let got = broker
        .consume(&queues(&["default"]), &take(10, PATIENCE))
        .await
        .unwrap();
    assert_eq!(
        ids(&got),
        vec![good.id],
        "the consumer carries on past corrupt entries"
    );
    let dead = broker
        .dead_letters(&DeadLetterQuery::default())
        .await
        .unwrap();
    assert_eq!(dead.len(), 3);
    for (letter, reason) in
        dead.iter()
            .zip(["undecodable entry:", "undecodable entry:", "invalid entry:"])
    {
        assert!(letter.reason.starts_with(reason), "{}", letter.reason);
        assert_eq!(letter.task_id, None);
    }
    assert_eq!(dead[0].payload, "{not an envelope");
    let report = broker
        .replay_dead_letters(&DeadLetterQuery::default())
        .await
        .unwrap();
    assert!(report.replayed.is_empty());
    assert_eq!(
        report.skipped.len(),
        3,
        "corrupt entries cannot be replayed, and stay"
    );
    assert_eq!(broker.stats("default").await.unwrap().dead, 3);
}

async fn broadcast_reaches_every_subscriber(harness: &impl BrokerHarness) {
    let broker = harness.connect(NS).await;
    let second = harness.connect(NS).await;
    let mut first_sub = broker.subscribe("control").await.unwrap();
    let mut second_sub = second.subscribe("control").await.unwrap();
    let mut unrelated = second.subscribe("other").await.unwrap();
    broker
        .broadcast("control", r#"{"command":"shutdown"}"#)
        .await
        .unwrap();
    for subscription in [&mut first_sub, &mut second_sub] {
        let message = tokio::time::timeout(PATIENCE, subscription.recv())
            .await
            .unwrap();
        assert_eq!(message.as_deref(), Some(r#"{"command":"shutdown"}"#));
    }
    let nothing = tokio::time::timeout(SHORT, unrelated.recv()).await;
    assert!(nothing.is_err(), "a message reached another channel");
}

/// Control messages can be large (a list of revoked ids); Postgres notifications cannot.
async fn large_broadcasts_arrive_whole(harness: &impl BrokerHarness) {
    let broker = harness.connect(NS).await;
    let other = harness.connect(NS).await;
    let mut subscription = other.subscribe("control").await.unwrap();
    let large = format!(r#"{{"revoked":"{}"}}"#, "r".repeat(100_000));
    broker.broadcast("control", &large).await.unwrap();
    broker.broadcast("control", "small").await.unwrap();
    let first = tokio::time::timeout(PATIENCE, subscription.recv())
        .await
        .unwrap();
    assert_eq!(first.as_deref(), Some(large.as_str()));
    let second = tokio::time::timeout(PATIENCE, subscription.recv())
        .await
        .unwrap();
    assert_eq!(second.as_deref(), Some("small"));
}

async fn namespaces_are_isolated(harness: &impl BrokerHarness) {
    let a = harness.connect("ns-a").await;
    let b = harness.connect("ns-b").await;
    a.publish(&envelope("t.ns").with_queue("shared"))
        .await
        .unwrap();
    a.publish(&envelope("t.ns").with_queue("shared"))
        .await
        .unwrap();
    let got = a
        .consume(&queues(&["shared"]), &take(1, PATIENCE))
        .await
        .unwrap();
    a.dead_letter(&got[0].receipt, "test").await.unwrap();
    assert!(
        b.consume(&queues(&["shared"]), &take(10, PATIENCE))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        b.stats("shared").await.unwrap(),
        stats_of("shared", 0, 0, 0, 0)
    );
    assert!(b.queues().await.unwrap().is_empty());
    assert!(
        b.dead_letters(&DeadLetterQuery::default())
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(b.purge("shared").await.unwrap(), 0);
    let mut b_sub = b.subscribe("control").await.unwrap();
    a.broadcast("control", "for a only").await.unwrap();
    assert!(tokio::time::timeout(SHORT, b_sub.recv()).await.is_err());
    assert_eq!(
        a.stats("shared").await.unwrap(),
        stats_of("shared", 1, 0, 0, 1)
    );
}

async fn purge_and_stats(harness: &impl BrokerHarness) {
    let broker = harness.connect(NS).await;
    let batch = [
        envelope("t.s").with_queue("q1"),
        envelope("t.s").with_queue("q1"),
        envelope("t.s").with_queue("q1"),
        envelope("t.s").with_queue("q1").delayed(PATIENCE),
        envelope("t.s").with_queue("q2"),
    ];
    broker.publish_batch(&batch).await.unwrap();
    let got = broker
        .consume(&queues(&["q1"]), &take(1, PATIENCE))
        .await
        .unwrap();
    assert_eq!(
        broker.stats("q1").await.unwrap(),
        stats_of("q1", 2, 1, 1, 0)
    );
    assert_eq!(broker.queues().await.unwrap(), vec!["q1", "q2"]);
    assert_eq!(
        broker.purge("q1").await.unwrap(),
        3,
        "ready and delayed entries go"
    );
    assert_eq!(
        broker.stats("q1").await.unwrap(),
        stats_of("q1", 0, 0, 1, 0)
    );
    broker.ack(&got[0].receipt).await.unwrap();
    // The queue works on as before, and its counts stay right.
    let later = [
        envelope("t.s").with_queue("q1"),
        envelope("t.s").with_queue("q1"),
    ];
    broker.publish_batch(&later).await.unwrap();
    let got = broker
        .consume(&queues(&["q1"]), &take(10, PATIENCE))
        .await
        .unwrap();
    assert_eq!(ids(&got), ids_of(&later));
    for delivery in &got {
        broker.ack(&delivery.receipt).await.unwrap();
    }
    assert_eq!(
        broker.stats("q1").await.unwrap(),
        stats_of("q1", 0, 0, 0, 0)
    );
    assert_eq!(broker.stats("q2").await.unwrap().ready, 1);
    assert_eq!(
        broker.stats("never-used").await.unwrap(),
        stats_of("never-used", 0, 0, 0, 0)
    );
}

async fn publish_batch_stores_everything(harness: &impl BrokerHarness) {
    let broker: Arc<dyn Broker> = harness.connect(NS).await;
    let batch: Vec<Envelope> = (0..250).map(|_| envelope("t.batch")).collect();
    broker.publish_batch(&batch).await.unwrap();
    assert_eq!(broker.stats("default").await.unwrap().ready, 250);
    let got = broker
        .consume(&queues(&["default"]), &take(1000, PATIENCE))
        .await
        .unwrap();
    assert_eq!(
        ids(&got),
        batch.into_iter().map(|e| e.id).collect::<Vec<_>>()
    );
}

async fn publish_unique_stores_each_id_once(harness: &impl BrokerHarness) {
    let producer = harness.connect(NS).await;
    let restarted = harness.connect(NS).await;
    let first = envelope("t.unique");
    assert_eq!(
        producer
            .publish_unique(std::slice::from_ref(&first), PATIENCE)
            .await
            .unwrap(),
        [true]
    );
    let mut again = first.clone();
    again.args = Payload::json(r#"{"n":2}"#);
    assert_eq!(
        restarted
            .publish_unique(std::slice::from_ref(&again), PATIENCE)
            .await
            .unwrap(),
        [false],
        "a producer publishing again (after a crash) stores no second copy"
    );

    // Inside one batch the first of an id is stored; the batch may mix ready and delayed.
    let second = envelope("t.unique");
    let mut duplicate = second.clone();
    duplicate.args = Payload::json(r#"{"n":3}"#);
    let later = envelope("t.unique").delayed(PATIENCE);
    let stored = producer
        .publish_unique(
            &[second.clone(), duplicate, first.clone(), later.clone()],
            PATIENCE,
        )
        .await
        .unwrap();
    assert_eq!(stored, [true, false, false, true]);
    assert_eq!(
        producer.stats("default").await.unwrap(),
        stats_of("default", 2, 1, 0, 0)
    );
    let got = producer
        .consume(&queues(&["default"]), &take(10, PATIENCE))
        .await
        .unwrap();
    let envelopes: Vec<Envelope> = got.iter().map(|d| d.envelope.clone()).collect();
    assert_eq!(envelopes, [first, second]);

    // Settles neither check nor record ids: a retry of a uniquely published entry goes on.
    let mut next = got[0].envelope.clone();
    next.attempt = 2;
    producer
        .settle(
            &got[0].receipt,
            Settle::Retry {
                next: Box::new(next.clone()),
                delay: Duration::ZERO,
            },
        )
        .await
        .unwrap();
    let retried = producer
        .consume(&queues(&["default"]), &take(10, PATIENCE))
        .await
        .unwrap();
    assert_eq!(retried.len(), 1);
    assert_eq!(retried[0].envelope, next);
    assert_eq!(
        producer.publish_unique(&[later], PATIENCE).await.unwrap(),
        [false],
        "a delayed entry's id is remembered too"
    );
}

async fn publish_unique_refuses_a_whole_invalid_batch(harness: &impl BrokerHarness) {
    let broker = harness.connect(NS).await;
    let good = envelope("t.unique");
    let refused = broker
        .publish_unique(
            &[good.clone(), envelope("t.unique").with_priority(10)],
            PATIENCE,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(refused, StorageError::InvalidEnvelope(_)),
        "{refused}"
    );
    assert_eq!(
        broker.stats("default").await.unwrap(),
        stats_of("default", 0, 0, 0, 0),
        "a refused batch stores nothing"
    );
    assert_eq!(
        broker
            .publish_unique(std::slice::from_ref(&good), PATIENCE)
            .await
            .unwrap(),
        [true],
        "and remembers no id"
    );
    assert!(
        broker
            .publish_unique(&[], PATIENCE)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn publish_unique_forgets_an_id_after_its_window(harness: &impl BrokerHarness) {
    let broker = harness.connect(NS).await;
    let window = Duration::from_millis(300);
    let sent = envelope("t.unique");
    let once = std::slice::from_ref(&sent);
    assert_eq!(broker.publish_unique(once, window).await.unwrap(), [true]);
    assert_eq!(broker.publish_unique(once, window).await.unwrap(), [false]);
    tokio::time::sleep(window + Duration::from_millis(200)).await;
    assert_eq!(
        broker.publish_unique(once, window).await.unwrap(),
        [true],
        "after the window the id may be published again"
    );
    assert_eq!(broker.publish_unique(once, window).await.unwrap(), [false]);
    let got = broker
        .consume(&queues(&["default"]), &take(10, PATIENCE))
        .await
        .unwrap();
    assert_eq!(ids(&got), [sent.id.clone(), sent.id]);
}

async fn publish_unique_ignores_plain_publishes(harness: &impl BrokerHarness) {
    let broker = harness.connect(NS).await;
    let sent = envelope("t.unique");
    let once = std::slice::from_ref(&sent);
    broker.publish(&sent).await.unwrap();
    assert_eq!(
        broker.publish_unique(once, PATIENCE).await.unwrap(),
        [true],
        "a plain publish records no id"
    );
    assert_eq!(
        broker.publish_unique(once, PATIENCE).await.unwrap(),
        [false]
    );
    broker.publish_batch(once).await.unwrap();
    assert_eq!(
        broker.stats("default").await.unwrap().ready,
        3,
        "nor does it check one"
    );
}

async fn publish_unique_ids_are_per_namespace(harness: &impl BrokerHarness) {
    let a = harness.connect("ns-a").await;
    let b = harness.connect("ns-b").await;
    let sent = envelope("t.unique");
    let once = std::slice::from_ref(&sent);
    assert_eq!(a.publish_unique(once, PATIENCE).await.unwrap(), [true]);
    assert_eq!(b.publish_unique(once, PATIENCE).await.unwrap(), [true]);
    assert_eq!(a.publish_unique(once, PATIENCE).await.unwrap(), [false]);
    assert_eq!(b.publish_unique(once, PATIENCE).await.unwrap(), [false]);
    for broker in [a, b] {
        let got = broker
            .consume(&queues(&["default"]), &take(10, PATIENCE))
            .await
            .unwrap();
        assert_eq!(ids(&got), vec![sent.id.clone()]);
    }
}

async fn publish_by_key_stores_once_per_key_and_names_the_holder(harness: &impl BrokerHarness) {
    let broker = harness.connect(NS).await;
    let other_namespace = harness.connect("ns-keyed").await;
    let first = envelope("t.keyed");
    let second = envelope("t.keyed");
    let mut later = envelope("t.keyed");
    later.not_before = Some(Timestamp::now().saturating_add(Duration::from_secs(60)));
    assert_eq!(
        broker.publish_by_key("k1", &first, PATIENCE).await.unwrap(),
        None
    );
    assert_eq!(
        broker
            .publish_by_key("k1", &second, PATIENCE)
            .await
            .unwrap(),
        Some(first.id.clone()),
        "a claimed key names the task holding it"
    );
    assert_eq!(
        broker.publish_by_key("k2", &later, PATIENCE).await.unwrap(),
        None
    );
    assert_eq!(
        other_namespace
            .publish_by_key("k1", &second, PATIENCE)
            .await
            .unwrap(),
        None,
        "keys are per namespace"
    );
    let mut invalid = envelope("t.keyed");
    invalid.queue = "bad queue".into();
    assert!(
        broker
            .publish_by_key("k3", &invalid, PATIENCE)
            .await
            .is_err()
    );
    assert_eq!(
        broker
            .publish_by_key("k3", &second, PATIENCE)
            .await
            .unwrap(),
        None,
        "a refused envelope claims no key"
    );
    assert_eq!(
        broker.stats("default").await.unwrap(),
        stats_of("default", 2, 1, 0, 0)
    );
    let got = broker
        .consume(&queues(&["default"]), &take(10, PATIENCE))
        .await
        .unwrap();
    assert_eq!(ids(&got), [first.id, second.id]);
}

async fn publish_by_key_forgets_a_key_after_its_window(harness: &impl BrokerHarness) {
    let broker = harness.connect(NS).await;
    let window = Duration::from_millis(300);
    let first = envelope("t.keyed");
    let second = envelope("t.keyed");
    assert_eq!(
        broker.publish_by_key("k", &first, window).await.unwrap(),
        None
    );
    tokio::time::sleep(window + Duration::from_millis(200)).await;
    assert_eq!(
        broker.publish_by_key("k", &second, window).await.unwrap(),
        None,
        "after the window the key is free"
    );
    assert_eq!(
        broker.publish_by_key("k", &first, window).await.unwrap(),
        Some(second.id.clone())
    );
}

async fn publish_by_key_is_atomic_under_concurrency(harness: &impl BrokerHarness) {
    let brokers = [harness.connect(NS).await, harness.connect(NS).await];
    let mut publishes = Vec::new();
    for n in 0..20 {
        let broker = brokers[n % 2].clone();
        publishes.push(tokio::spawn(async move {
            let sent = envelope("t.keyed");
            let holder = broker
                .publish_by_key("race", &sent, PATIENCE)
                .await
                .unwrap();
            (sent.id, holder)
        }));
    }
    let mut stored = Vec::new();
    let mut holders = HashSet::new();
    for publish in publishes {
        let (id, holder) = publish.await.unwrap();
        match holder {
            None => stored.push(id),
            Some(holder) => {
                holders.insert(holder);
            }
        }
    }
    assert_eq!(stored.len(), 1, "exactly one publish claims the key");
    assert!(
        holders.iter().all(|holder| *holder == stored[0]),
        "{holders:?}"
    );
    assert_eq!(brokers[0].stats("default").await.unwrap().ready, 1);
}

fn stats_of(
    queue: &str,
    ready: u64,
    delayed: u64,
    in_flight: u64,
    dead: u64,
) -> stem_host::broker::QueueStats {
    stem_host::broker::QueueStats {
        queue: queue.to_owned(),
        ready,
        delayed,
        in_flight,
        dead,
    }
}
