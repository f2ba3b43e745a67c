//! Enqueue a task in the same Postgres transaction as your own write: the order row and the
//! task that bills it are committed together, or neither is.
//!
//! ```text
//! export STEM_BROKER_URL=postgres://postgres@127.0.0.1:5432/test
//! cargo run -p stem-host -- task upload target/wasm32-wasip2/release/hello.wasm
//! cargo run -p stem-host --example transactional_enqueue -- 7 35      # commits: a task
//! cargo run -p stem-host --example transactional_enqueue -- 7 35 fail # rolls back: none
//! cargo run -p stem-host -- worker start                              # runs what committed
//! ```

use std::sync::Arc;

use anyhow::{Context, bail};
use sqlx::Connection;
use stem_host::broker::postgres::{PostgresBroker, PostgresBrokerOptions};
use stem_host::client::{Client, EnqueueRequest};
use stem_host::codec::Codecs;
use stem_host::stores::registry::postgres::PostgresRegistry;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("STEM_BROKER_URL").context("set STEM_BROKER_URL=postgres://...")?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [a, b, rest @ ..] = args.as_slice() else {
        bail!("usage: transactional_enqueue A B [fail]");
    };
    let (a, b): (i64, i64) = (a.parse()?, b.parse()?);

    let broker = PostgresBroker::connect(&url, PostgresBrokerOptions::default()).await?;
    let registry = PostgresRegistry::connect(&url, None).await?;
    let client = Client::new(
        Arc::new(broker.clone()),
        Arc::new(registry),
        Codecs::default(),
    );

    let mut conn = sqlx::PgConnection::connect(&url).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS example_sums (a BIGINT, b BIGINT, task_id TEXT)")
        .execute(&mut conn)
        .await?;

    let mut tx = conn.begin().await?;
    // Checked and completed as any enqueue is (the task must be uploaded), not yet published.
    let request = EnqueueRequest::new("hello.add", format!(r#"{{"a":{a},"b":{b}}}"#));
    let envelope = client.prepare(request).await?;
    sqlx::query("INSERT INTO example_sums (a, b, task_id) VALUES ($1, $2, $3)")
        .bind(a)
        .bind(b)
        .bind(&envelope.id)
        .execute(&mut *tx)
        .await?;
    broker
        .publish_in(&mut tx, std::slice::from_ref(&envelope))
        .await?;
    if rest.first().map(String::as_str) == Some("fail") {
        tx.rollback().await?;
        println!(
            "rolled back: neither the row nor task {} exists",
            envelope.id
        );
    } else {
        tx.commit().await?;
        println!("committed: the row and task {} exist together", envelope.id);
    }
    Ok(())
}
