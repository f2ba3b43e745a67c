//! Revoking tasks, for `stem-host revoke` and the dashboard alike: each revocation is stored
//! first (a canvas id stands for every unfinished task of the canvas), then pushed to the
//! running workers, so that a running task stops at once; a worker that misses the push finds
//! the revocation in the revoke store at its next poll (every second).

use std::borrow::Borrow;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::{Channels, Command, Request, request};
use crate::backend::ResultBackend;
use crate::broker::Broker;
use crate::canvas::{CanvasError, Canvases};
use crate::storage::StorageError;
use crate::stores::revoke::{Revocation, RevokeStore};

/// Task ids per pushed revocation message.
pub const PUSH_BATCH: usize = 1_000;

/// Where revocations are stored and pushed.
pub struct Revoker<'a> {
    pub revokes: &'a dyn RevokeStore,
    pub backend: &'a dyn ResultBackend,
    pub broker: &'a Arc<dyn Broker>,
    pub channels: &'a Channels,
}

/// What revoking one id came to.
#[derive(Clone, Debug)]
pub struct Revoked {
    pub id: String,
    /// The task ids revoked: the id itself, or the unfinished tasks of the canvas it names.
    pub tasks: Vec<String>,
    pub canvas: bool,
}

/// What [`Revoker::revoke`] did.
#[derive(Debug)]
pub struct Revocations {
    pub revoked: Vec<Revoked>,
    /// Why telling the workers at once failed, if it did; they find the revocations in the
    /// store within a second.
    pub push_failed: Option<StorageError>,
}

impl Revocations {
    /// Every task id revoked, in order.
    pub fn task_ids(&self) -> Vec<String> {
        self.revoked
            .iter()
            .flat_map(|r| r.tasks.iter().cloned())
            .collect()
    }
}

impl Revoker<'_> {
    /// Revokes each of `ids` as `template` says (its task id is replaced by each id): stores
    /// the revocations, then pushes every task id to the workers in messages of at most
    /// [`PUSH_BATCH`] ids. `canvases` is asked for only when an id names a canvas.
    pub async fn revoke<C, F, Fut, E>(
        &self,
        ids: &[String],
        template: &Revocation,
        canvases: F,
    ) -> Result<Revocations, E>
    where
        C: Borrow<Canvases>,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<C, E>>,
        E: From<StorageError> + From<CanvasError>,
    {
        let mut revoked = Vec::with_capacity(ids.len());
        for id in ids {
            let revocation = Revocation {
                task_id: id.clone(),
                ..template.clone()
            };
            let (tasks, canvas) = if self.backend.get_canvas(id).await?.is_some() {
                let canvases = canvases().await?;
                let tasks = canvases
                    .borrow()
                    .revoke(self.revokes, id, &revocation)
                    .await?;
                (tasks, true)
            } else {
                self.revokes.revoke(&revocation).await?;
                (vec![id.clone()], false)
            };
            revoked.push(Revoked {
                id: id.clone(),
                tasks,
                canvas,
            });
        }
        let mut done = Revocations {
            revoked,
            push_failed: None,
        };
        for chunk in done.task_ids().chunks(PUSH_BATCH) {
            let push = Request::new(
                Command::Revoke {
                    task_ids: chunk.to_vec(),
                    terminate: template.terminate,
                },
                Vec::new(),
            );
            let pushed = request(self.broker, self.channels, &push, None, Duration::ZERO);
            if let Err(error) = pushed.await {
                done.push_failed = Some(error);
                break;
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryBackend;
    use crate::broker::memory::MemoryBroker;
    use crate::stores::revoke::memory::MemoryRevokeStore;

    #[tokio::test]
    async fn stores_every_revocation_then_pushes_them_in_batches() {
        let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
        let (revokes, backend) = (MemoryRevokeStore::default(), MemoryBackend::default());
        let channels = Channels::default();
        let mut heard = broker.subscribe(&channels.control()).await.unwrap();
        let revoker = Revoker {
            revokes: &revokes,
            backend: &backend,
            broker: &broker,
            channels: &channels,
        };
        let ids: Vec<String> = (0..2_500).map(|n| format!("task-{n}")).collect();
        let template = Revocation::new("", true, Duration::from_secs(60));
        let no_canvas = || async { Err::<Canvases, _>(CanvasError::Unknown("none".into())) };
        let done = revoker.revoke(&ids, &template, no_canvas).await.unwrap();
        assert!(done.push_failed.is_none());
        assert_eq!(done.task_ids(), ids);
        assert!(
            revokes
                .get("task-2499")
                .await
                .unwrap()
                .is_some_and(|r| r.terminate)
        );
        let mut sizes = Vec::new();
        while sizes.iter().sum::<usize>() < ids.len() {
            let message = heard.recv().await.unwrap();
            let request: Request = serde_json::from_str(&message).unwrap();
            let Command::Revoke {
                task_ids,
                terminate,
            } = request.command
            else {
                panic!("a revocation: {message}");
            };
            assert!(terminate);
            sizes.push(task_ids.len());
        }
        assert_eq!(sizes, vec![1_000, 1_000, 500]);
    }
}
