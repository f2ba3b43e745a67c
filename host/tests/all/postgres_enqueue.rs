//! Transactional enqueue on Postgres: a task published inside the caller's transaction exists
//! if and only if that transaction commits.

use std::time::Duration;

use sqlx::{Connection, Executor};
use stem_host::broker::postgres::{PostgresBroker, PostgresBrokerOptions};
use stem_host::broker::{Broker, ConsumeOptions};
use stem_host::codec::Payload;
use stem_host::envelope::Envelope;

use crate::conformance::adapters::Postgres;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_enqueued_in_a_transaction_exists_only_if_it_commits() {
    let harness = Postgres::new().await;
    let broker = PostgresBroker::connect(&harness.url(), PostgresBrokerOptions::default())
        .await
        .expect("the tests need Postgres");
    // The caller's own connection and table, in the harness's schema.
    let mut conn = sqlx::PgConnection::connect(&harness.base_url())
        .await
        .unwrap();
    conn.execute(
        format!(
            "CREATE TABLE {}.orders (id TEXT PRIMARY KEY)",
            harness.schema()
        )
        .as_str(),
    )
    .await
    .unwrap();
    let insert_order = format!("INSERT INTO {}.orders (id) VALUES ($1)", harness.schema());
    let order = |id: &str| sqlx::query(&insert_order).bind(id.to_owned());
    let take = ConsumeOptions {
        max: 10,
        lease: None,
        wait: Duration::from_millis(300),
    };
    let queues = vec!["default".to_owned()];

    let mut tx = conn.begin().await.unwrap();
    order("rolled-back").execute(&mut *tx).await.unwrap();
    let lost = Envelope::new(
        "billing.charge",
        Payload::json(r#"{"order":"rolled-back"}"#),
    );
    broker.publish_in(&mut tx, &[lost]).await.unwrap();
    tx.rollback().await.unwrap();
    assert!(
        broker.consume(&queues, &take).await.unwrap().is_empty(),
        "a task of a rolled-back transaction was delivered"
    );

    let mut tx = conn.begin().await.unwrap();
    order("committed").execute(&mut *tx).await.unwrap();
    let kept = Envelope::new("billing.charge", Payload::json(r#"{"order":"committed"}"#));
    broker
        .publish_in(&mut tx, std::slice::from_ref(&kept))
        .await
        .unwrap();
    // Not visible to consumers before the commit.
    assert!(
        broker
            .consume(&queues, &ConsumeOptions::default())
            .await
            .unwrap()
            .is_empty()
    );
    // A consumer already waiting is woken by the commit.
    let waiting = {
        let broker = broker.clone();
        let queues = queues.clone();
        tokio::spawn(async move {
            let wait = ConsumeOptions {
                wait: Duration::from_secs(10),
                ..take
            };
            let began = std::time::Instant::now();
            (
                broker.consume(&queues, &wait).await.unwrap(),
                began.elapsed(),
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    tx.commit().await.unwrap();
    let (delivered, waited) = waiting.await.unwrap();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].envelope.id, kept.id);
    assert!(
        waited < Duration::from_millis(900),
        "the waiting consumer was not woken by the commit: {waited:?}"
    );
    let orders: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT id FROM {}.orders ORDER BY id",
        harness.schema()
    ))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(orders, ["committed"]);
}
