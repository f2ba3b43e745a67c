//! Settlements in one step, for a Postgres result backend in the Postgres broker's database.
//! A batch of acks (the usual case) is one statement that deletes the entries whose lease
//! holds and records the statuses of exactly those; any other batch is one transaction that
//! locks the held entries, records their statuses and settles them. Either way a status is
//! never recorded by a worker that lost its lease, and never without its entry's settle.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::postgres::PgPool;

use super::{millis, notify_ready, settle_on};
use crate::backend::postgres::{RESULTS_CHANNEL, StatusColumns, set_statuses, unless_terminal};
use crate::backend::{TaskStatus, Ttls, distinct_slices};
use crate::broker::{Receipt, Settle, validate_settles};
use crate::postgres::{self, NOW_MS};
use crate::settlement::{Settlement, SettlementStore};
use crate::storage::StorageError;

/// Writes settlements where a [`super::PostgresBroker`] and a
/// [`crate::backend::postgres::PostgresBackend`] of the same namespace keep their rows.
pub struct PostgresSettlements {
    pool: Arc<PgPool>,
    namespace: String,
    /// The result TTL in milliseconds; `None` keeps results.
    result_ttl: Option<i64>,
}

impl PostgresSettlements {
    /// Connects to the database at `url`; `ttls` must be the result backend's. The broker
    /// and the backend must have created their tables (they do when they connect).
    pub async fn connect(
        url: &str,
        namespace: &str,
        ttls: Ttls,
    ) -> Result<PostgresSettlements, StorageError> {
        Ok(PostgresSettlements {
            pool: postgres::connect(url).await?,
            namespace: namespace.to_owned(),
            result_ttl: ttls.result.map(millis),
        })
    }

    /// Acks with their statuses in one statement; per settlement, whether its lease held.
    async fn ack_all(&self, batch: &[Settlement]) -> Result<Vec<bool>, StorageError> {
        let mut entries = Vec::with_capacity(batch.len());
        let mut tokens = Vec::with_capacity(batch.len());
        let mut status_entries = Vec::new();
        let mut statuses: Vec<&TaskStatus> = Vec::new();
        for settlement in batch {
            let Ok(entry) = settlement.receipt.entry.parse::<i64>() else {
                continue;
            };
            entries.push(entry);
            tokens.push(settlement.receipt.token.as_str());
            if let Some(status) = &settlement.status {
                status_entries.push(entry);
                statuses.push(status);
            }
        }
        let columns = StatusColumns::of(&statuses);
        let held: Vec<i64> = sqlx::query_scalar(&format!(
            "WITH acked AS (
                 DELETE FROM stem_queue_entries e
                 USING unnest($2::bigint[], $3::text[]) AS a(id, token)
                 WHERE e.id = a.id AND e.lease_token = a.token AND e.namespace = $1
                 RETURNING e.id),
             written AS (
                 INSERT INTO stem_task_results AS r
                     (namespace, id, state, task, status, updated_at, expires_at)
                 SELECT $1, s.id, s.state, s.task, s.status, s.updated_at, {NOW_MS} + $10
                 FROM unnest($4::bigint[], $5::text[], $6::text[], $7::text[], $8::text[],
                             $9::bigint[]) AS s(entry, id, state, task, status, updated_at)
                 JOIN acked ON acked.id = s.entry
                 {conflict}
                 RETURNING 1),
             notified AS (
                 SELECT pg_notify($11, $1) FROM (SELECT 1 FROM written LIMIT 1) AS w
                 WHERE $12)
             SELECT id FROM acked
             -- Evaluated once, before the scan: an unused join to it would be planned away.
             WHERE (SELECT count(*) FROM notified) >= 0",
            conflict = unless_terminal("")
        ))
        .bind(&self.namespace)
        .bind(&entries)
        .bind(&tokens)
        .bind(&status_entries)
        .bind(&columns.ids)
        .bind(&columns.states)
        .bind(&columns.tasks)
        .bind(&columns.texts)
        .bind(&columns.updated)
        .bind(self.result_ttl)
        .bind(RESULTS_CHANNEL)
        .bind(columns.terminal)
        .fetch_all(&*self.pool)
        .await?;
        let mut held: std::collections::HashSet<i64> = held.into_iter().collect();
        Ok(batch
            .iter()
            .map(|s| {
                s.receipt
                    .entry
                    .parse::<i64>()
                    .is_ok_and(|e| held.remove(&e))
            })
            .collect())
    }

    /// Any batch, in one transaction: lock the entries still held, record their statuses,
    /// settle them.
    async fn in_transaction(&self, batch: &[Settlement]) -> Result<Vec<bool>, StorageError> {
        let mut tx = self.pool.begin().await?;
        let entries: Vec<i64> = batch
            .iter()
            .map(|s| s.receipt.entry.parse::<i64>().unwrap_or(-1))
            .collect();
        let tokens: Vec<&str> = batch.iter().map(|s| s.receipt.token.as_str()).collect();
        let locked: std::collections::HashSet<i64> = sqlx::query_scalar(
            "SELECT e.id FROM stem_queue_entries e
             JOIN unnest($2::bigint[], $3::text[]) AS a(id, token)
                 ON e.id = a.id AND e.lease_token = a.token
             WHERE e.namespace = $1
             FOR UPDATE OF e",
        )
        .bind(&self.namespace)
        .bind(&entries)
        .bind(&tokens)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        let statuses: Vec<TaskStatus> = batch
            .iter()
            .zip(&entries)
            .filter(|(_, entry)| locked.contains(entry))
            .filter_map(|(s, _)| s.status.clone())
            .collect();
        let slices = distinct_slices(&statuses, usize::MAX);
        set_statuses(&mut tx, &self.namespace, &slices, self.result_ttl).await?;
        let pairs: Vec<(&Receipt, &Settle)> =
            batch.iter().map(|s| (&s.receipt, &s.settle)).collect();
        let (held, released) = settle_on(&mut tx, &self.namespace, &pairs).await?;
        if released {
            notify_ready(&mut tx, &self.namespace).await?;
        }
        tx.commit().await?;
        Ok(held)
    }
}

#[async_trait]
impl SettlementStore for PostgresSettlements {
    async fn settle_many(&self, batch: &[Settlement]) -> Result<Vec<bool>, StorageError> {
        validate_settles(batch.iter().map(|s| (&s.receipt, &s.settle)))?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let statuses: Vec<TaskStatus> = batch.iter().filter_map(|s| s.status.clone()).collect();
        let only_acks = batch.iter().all(|s| s.settle == Settle::Ack);
        if only_acks && distinct_slices(&statuses, usize::MAX).len() <= 1 {
            return self.ack_all(batch).await;
        }
        self.in_transaction(batch).await
    }
}
