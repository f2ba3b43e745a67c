//! The settle stage: records how deliveries ended and settles their broker entries, many at
//! once.
//!
//! Runs hand their [`Settlement`] to one [`Settler`] per worker and wait for it. The settler
//! takes whatever has arrived since its last write and applies it as one batch: first every
//! status in one backend call, then every broker entry in one broker call. Under load, runs
//! that finish while a batch is being written form the next batch (group commit); an idle
//! worker writes each settlement at once, with no added wait.
//!
//! The order is what makes a crash harmless: a status is recorded before its entry is settled,
//! so an entry whose settle is lost comes back, and the worker that receives it again finds the
//! outcome recorded (terminal statuses never change) and settles it without running the task.
//! The broker applies each settle only while its lease holds.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::backend::{ResultBackend, TaskStatus};
use crate::broker::{Broker, Receipt, Settle};

/// The most settlements written together, and about the most bytes of results and retried
/// envelopes in one write: a batch is one round trip, which must stay well within the
/// connection's timeout.
const MAX_BATCH: usize = 256;
const MAX_BATCH_BYTES: usize = 8 << 20;

/// How one delivery ended: the status to record (if any) and what becomes of its entry.
#[derive(Debug)]
pub(super) struct Settlement {
    pub receipt: Receipt,
    pub status: Option<TaskStatus>,
    pub settle: Settle,
}

impl Settlement {
    /// Roughly what writing it sends: the result or error, and a retried envelope's
    /// arguments or a dead letter's reason.
    fn bytes(&self) -> usize {
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

type Pending = (Settlement, oneshot::Sender<bool>);

/// Batches the settlements of one worker's runs.
pub(super) struct Settler {
    sender: mpsc::UnboundedSender<Pending>,
}

impl Settler {
    /// Starts the settle loop; it ends when the settler is dropped and the last batch is
    /// written.
    pub fn start(broker: Arc<dyn Broker>, backend: Arc<dyn ResultBackend>) -> Settler {
        let (sender, mut receiver) = mpsc::unbounded_channel::<Pending>();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while receiver.recv_many(&mut batch, MAX_BATCH).await > 0 {
                let mut pending = std::mem::take(&mut batch).into_iter().peekable();
                while pending.peek().is_some() {
                    let mut chunk = Vec::new();
                    let mut bytes = 0;
                    while let Some(next) = pending.next_if(|(next, _)| {
                        chunk.is_empty() || bytes + next.bytes() <= MAX_BATCH_BYTES
                    }) {
                        bytes += next.0.bytes();
                        chunk.push(next);
                    }
                    write(broker.as_ref(), backend.as_ref(), chunk).await;
                }
            }
        });
        Settler { sender }
    }

    /// Records and settles one delivery; whether it was settled (`false` when storage failed
    /// or the lease was lost: the entry then comes back to some worker).
    pub async fn settle(&self, settlement: Settlement) -> bool {
        let (done, settled) = oneshot::channel();
        if self.sender.send((settlement, done)).is_err() {
            return false;
        }
        settled.await.unwrap_or(false)
    }
}

/// Writes one batch and tells every run how its settlement went.
async fn write(broker: &dyn Broker, backend: &dyn ResultBackend, batch: Vec<Pending>) {
    let statuses: Vec<TaskStatus> = batch
        .iter()
        .filter_map(|(settlement, _)| settlement.status.clone())
        .collect();
    if let Err(error) = backend.set_many(&statuses, None).await {
        tracing::error!(%error, tasks = batch.len(), "recording task states failed; the deliveries will come back");
        return;
    }
    let settles: Vec<(Receipt, Settle)> = batch
        .iter()
        .map(|(settlement, _)| (settlement.receipt.clone(), settlement.settle.clone()))
        .collect();
    let held = match broker.settle_many(&settles).await {
        Ok(held) => held,
        Err(error) => {
            tracing::error!(%error, tasks = batch.len(), "settling deliveries failed; they will come back");
            return;
        }
    };
    for ((settlement, done), held) in batch.into_iter().zip(held) {
        if !held {
            tracing::warn!(
                entry = settlement.receipt.entry,
                "the lease was lost before the delivery was settled; another worker has it"
            );
        }
        let _ = done.send(held);
    }
}
