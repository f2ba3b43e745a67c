//! The settle stage: records how deliveries ended and settles their broker entries, many at
//! once.
//!
//! Runs hand their [`Settlement`] to one [`Settler`] per worker and wait for it. The settler
//! takes whatever has arrived since its last write and applies it as one batch through the
//! worker's [`SettlementStore`] (one or two round trips, whatever the batch's size). Under
//! load, runs that finish while a batch is being written form the next batch (group commit);
//! an idle worker writes each settlement at once, with no added wait.
//!
//! The store records a status no later than it settles its entry, which is what makes a crash
//! harmless: an entry whose settle is lost comes back, and the worker that receives it again
//! finds the outcome recorded (terminal statuses never change) and settles it without running
//! the task. Each entry is settled only while its lease holds.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::settlement::{Settlement, SettlementStore};

/// The most settlements written together, and about the most bytes of results and retried
/// envelopes in one write: a batch is one round trip, which must stay well within the
/// connection's timeout.
const MAX_BATCH: usize = 256;
const MAX_BATCH_BYTES: usize = 8 << 20;

type Pending = (Settlement, oneshot::Sender<bool>);

/// Batches the settlements of one worker's runs.
pub(super) struct Settler {
    sender: mpsc::UnboundedSender<Pending>,
}

impl Settler {
    /// Starts the settle loop; it ends when the settler is dropped and the last batch is
    /// written.
    pub fn start(store: Arc<dyn SettlementStore>) -> Settler {
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
                    write(store.as_ref(), chunk).await;
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
async fn write(store: &dyn SettlementStore, batch: Vec<Pending>) {
    let (settlements, waiting): (Vec<Settlement>, Vec<oneshot::Sender<bool>>) =
        batch.into_iter().unzip();
    let held = match store.settle_many(&settlements).await {
        Ok(held) => held,
        Err(error) if settlements.len() > 1 && error.refuses_the_data() => {
            // One settlement the store refuses must not send the whole batch back to run
            // again: each is tried on its own. (A store that is down or slow is not asked
            // again per settlement: the batch comes back, as below.)
            tracing::warn!(%error, tasks = settlements.len(), "settling a batch failed; settling its deliveries one by one");
            let mut held = Vec::with_capacity(settlements.len());
            for settlement in &settlements {
                held.push(match store.settle_many(std::slice::from_ref(settlement)).await {
                    Ok(one) => one.first() == Some(&true),
                    Err(error) => {
                        tracing::error!(%error, entry = settlement.receipt.entry, "settling a delivery failed; it will come back");
                        false
                    }
                });
            }
            held
        }
        Err(error) => {
            tracing::error!(%error, tasks = settlements.len(), "settling deliveries failed; they will come back");
            return;
        }
    };
    for ((settlement, done), held) in settlements.iter().zip(waiting).zip(held) {
        if !held {
            tracing::warn!(
                entry = settlement.receipt.entry,
                "the lease was lost before the delivery was settled; another worker has it"
            );
        }
        let _ = done.send(held);
    }
}
