//! Settlements: how deliveries ended, recorded in the result backend and applied to their
//! broker entries, many at once. The worker's settle stage writes through a
//! [`SettlementStore`]; the shared conformance suite
//! (`host/tests/all/conformance/settlement.rs`) runs unchanged against each store.
//!
//! Every store keeps two promises:
//! - a settlement's status is recorded no later than its entry is settled, so an entry never
//!   leaves the broker while its outcome is unrecorded (after a crash in between, the entry
//!   comes back and the worker that gets it finds the outcome, terminal statuses never
//!   changing);
//! - an entry is settled only while the settlement's receipt holds its lease.
//!
//! [`StatusesThenEntries`] serves any backend with any broker: one backend write for the
//! batch's statuses, then one broker call for its entries. A store that keeps both on one
//! server does both in one step, and then records a status only while its lease holds
//! ([`crate::broker::redis::RedisSettlements`]).

use std::sync::Arc;

use async_trait::async_trait;

use crate::backend::{ResultBackend, TaskStatus};
use crate::broker::{Broker, Receipt, Settle, validate_settles};
use crate::storage::StorageError;

/// How one delivery ended: the status to record (if any) and what becomes of its entry.
#[derive(Clone, Debug)]
pub struct Settlement {
    pub receipt: Receipt,
    pub status: Option<TaskStatus>,
    pub settle: Settle,
}

impl Settlement {
    /// Roughly what writing it sends: the result or error, and a retried envelope's
    /// arguments or a dead letter's reason.
    pub fn bytes(&self) -> usize {
        let status = self.status.as_ref().map_or(0, |s| {
            s.result.as_ref().map_or(0, |r| r.data.len())
                + s.error.as_ref().map_or(0, |e| e.message.len())
        });
        let settle = match &self.settle {
            Settle::Retry { next, .. } => next.args.data.len(),
            Settle::DeadLetter(reason) => reason.len(),
            _ => 0,
        };
        status + settle
    }
}

/// Where settlements are written. See the module documentation for the promises.
#[async_trait]
pub trait SettlementStore: Send + Sync {
    /// Records and applies a batch: per settlement, whether its lease held and its entry was
    /// settled. The status of a settlement whose lease was lost may or may not be recorded.
    async fn settle_many(&self, batch: &[Settlement]) -> Result<Vec<bool>, StorageError>;
}

/// Any result backend with any broker: the batch's statuses in one write, then its entries.
pub struct StatusesThenEntries {
    backend: Arc<dyn ResultBackend>,
    broker: Arc<dyn Broker>,
}

impl StatusesThenEntries {
    pub fn new(backend: Arc<dyn ResultBackend>, broker: Arc<dyn Broker>) -> StatusesThenEntries {
        StatusesThenEntries { backend, broker }
    }
}

#[async_trait]
impl SettlementStore for StatusesThenEntries {
    async fn settle_many(&self, batch: &[Settlement]) -> Result<Vec<bool>, StorageError> {
        validate_settles(batch.iter().map(|s| (&s.receipt, &s.settle)))?;
        let statuses: Vec<TaskStatus> = batch
            .iter()
            .filter_map(|settlement| settlement.status.clone())
            .collect();
        self.backend.set_many(&statuses, None).await?;
        let settles: Vec<(Receipt, Settle)> = batch
            .iter()
            .map(|settlement| (settlement.receipt.clone(), settlement.settle.clone()))
            .collect();
        self.broker.settle_many(&settles).await
    }
}
