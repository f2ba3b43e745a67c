//! The Redis broker recovers from keys that went missing behind its back (a `DEL`, an
//! eviction): a queue whose stream vanished keeps working, and entries whose lane marks
//! vanished are still found.

use std::time::Duration;

use stem_host::broker::redis::{RedisBroker, RedisBrokerOptions};
use stem_host::broker::{Broker, ConsumeOptions};
use stem_host::codec::Payload;
use stem_host::envelope::Envelope;

use crate::support::redis_url;

async fn broker(namespace: &str) -> (RedisBroker, redis::aio::MultiplexedConnection) {
    let options = RedisBrokerOptions {
        namespace: namespace.to_owned(),
        sweeper_interval: Duration::from_millis(100),
        ..RedisBrokerOptions::default()
    };
    let broker = RedisBroker::connect(&redis_url(), options).await.unwrap();
    let admin = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    (broker, admin)
}

fn take(lease: Duration, wait: Duration) -> ConsumeOptions {
    ConsumeOptions {
        max: 10,
        lease: Some(lease),
        wait,
    }
}

async fn delete(admin: &mut redis::aio::MultiplexedConnection, key: String) {
    let _: u64 = redis::cmd("DEL").arg(key).query_async(admin).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_stream_does_not_break_its_queue() {
    let namespace = format!("stem-recovery-{}", uuid::Uuid::new_v4().simple());
    let (broker, mut admin) = broker(&namespace).await;
    let queues = ["default".to_owned()];
    broker
        .publish(&Envelope::new("t.lost", Payload::json("{}")))
        .await
        .unwrap();
    let got = broker
        .consume(&queues, &take(Duration::from_millis(200), Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    delete(&mut admin, format!("{namespace}:q:default:0")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The expired lease points at a stream that is gone: the consume must carry on.
    let none = broker
        .consume(&queues, &take(Duration::from_secs(5), Duration::ZERO))
        .await
        .unwrap();
    assert!(none.is_empty());
    let fresh = Envelope::new("t.after", Payload::json("{}"));
    broker.publish(&fresh).await.unwrap();
    let got = broker
        .consume(
            &queues,
            &take(Duration::from_secs(5), Duration::from_secs(5)),
        )
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].envelope.id, fresh.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_whose_lane_marks_vanished_are_still_delivered() {
    let namespace = format!("stem-recovery-{}", uuid::Uuid::new_v4().simple());
    let (broker, mut admin) = broker(&namespace).await;
    let queues = ["default".to_owned()];
    let sent = Envelope::new("t.unmarked", Payload::json("{}")).with_priority(7);
    broker.publish(&sent).await.unwrap();
    delete(&mut admin, format!("{namespace}:ready:default")).await;
    let got = broker
        .consume(&queues, &take(Duration::from_secs(60), Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].envelope.id, sent.id);
    broker.ack(&got[0].receipt).await.unwrap();
}
