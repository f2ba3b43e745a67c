//! Replaying dead letters as new runs, for `dlq replay` and the dashboard alike.

use serde::Serialize;

use super::{Broker, DeadLetterPages, DeadLetterQuery, ReplayReport};
use crate::backend::{ResultBackend, TaskState, TaskStatus};
use crate::signing::SIGNATURE_INVALID;
use crate::storage::StorageError;

/// What [`replay`] did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Replayed {
    #[serde(flatten)]
    pub report: ReplayReport,
    /// Dead letters refused as `signature-invalid`, left in place.
    pub left_invalid: usize,
}

/// Publishes the dead letters `query` selects again, each as attempt 1, a page at a time
/// (those that arrive meanwhile are left for the next replay). Letter by letter, the task's
/// terminal status is first replaced by `pending`, or the worker would take the new delivery
/// for a duplicate of a finished task and skip it (a task that succeeded meanwhile keeps its
/// status); then the letter is moved onto its queue with [`Broker::requeue_dead_letter`], so
/// that a concurrent replay (the CLI and the dashboard, a double click) publishes no letter
/// twice, and a replay cut short leaves every letter either replayed or in place. Letters
/// refused as `signature-invalid` stay unless `include_invalid`.
pub async fn replay(
    broker: &dyn Broker,
    backend: &dyn ResultBackend,
    query: &DeadLetterQuery,
    include_invalid: bool,
) -> Result<Replayed, StorageError> {
    let mut replayed = Replayed::default();
    let mut pages = DeadLetterPages::new(broker, query);
    while let Some(page) = pages.next().await? {
        for letter in page {
            if !include_invalid && letter.reason.starts_with(SIGNATURE_INVALID) {
                replayed.left_invalid += 1;
                continue;
            }
            let envelope = match letter.replay_envelope() {
                Ok(envelope) => envelope,
                Err(error) => {
                    replayed.report.skipped.push((letter.id, error.to_string()));
                    continue;
                }
            };
            let finished = backend
                .get(&envelope.id)
                .await?
                .is_some_and(|s| s.state == TaskState::Succeeded);
            if !finished {
                let status = TaskStatus {
                    task: Some(envelope.task.clone()),
                    ..TaskStatus::new(envelope.id.clone(), TaskState::Pending)
                };
                backend.replace(&status, None).await?;
            }
            // Another replay or a purge that took the letter first is the one that acts on it.
            if broker.requeue_dead_letter(&letter.id, &envelope).await? {
                replayed.report.replayed.push(envelope.id);
            }
        }
    }
    Ok(replayed)
}
