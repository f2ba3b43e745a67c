//! Processing one delivery, from the revocation check to the ack.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Shared;
use super::hooks::WorkerHooks;
use super::retry::RetryPolicy;
use crate::backend::{TaskFailure, TaskState, TaskStatus};
use crate::broker::{Broker, Delivery, Receipt};
use crate::components::ComponentError;
use crate::envelope::Envelope;
use crate::runtime::{RunError, RunHandle, RunLimits};
use crate::storage::StorageError;
use crate::stores::rate_limit::Permit;
use crate::task::{Invocation, RateLimit};
use crate::time::Timestamp;

/// How long a delivery waits before it is tried again when the worker, not the task, could
/// not run it (the registry unreachable, no free sandbox slot).
const WORKER_TROUBLE_DELAY: Duration = Duration::from_secs(5);

/// What becomes of the broker entry once the outcome is recorded.
enum Settle {
    /// Done with: succeeded, failed into a retry that was published, or revoked.
    Ack,
    /// Not run now (a rate limit, or the worker's trouble); deliver again after the delay.
    Later(Duration),
    /// Failed for good.
    DeadLetter(String),
    /// Stopped by shutdown; deliver again at once.
    Returned,
}

pub(super) async fn process(shared: &Arc<Shared>, delivery: Delivery) {
    let id = delivery.envelope.id.clone();
    let settle = match run_delivery(shared, &delivery).await {
        Ok(settle) => settle,
        Err(error) => {
            tracing::error!(task.id = id, %error, "recording the task's state failed; it will be delivered again");
            Settle::Later(WORKER_TROUBLE_DELAY)
        }
    };
    let broker = &shared.broker;
    let receipt = &delivery.receipt;
    let settled = match &settle {
        Settle::Ack => broker.ack(receipt).await,
        Settle::Later(delay) => broker.nack(receipt, *delay).await,
        Settle::DeadLetter(reason) => broker.dead_letter(receipt, reason).await,
        Settle::Returned => broker.nack(receipt, Duration::ZERO).await,
    };
    match settle {
        Settle::Ack | Settle::DeadLetter(_) => shared.processed.fetch_add(1, Ordering::Relaxed),
        Settle::Returned => shared.returned.fetch_add(1, Ordering::Relaxed),
        Settle::Later(_) => 0,
    };
    if let Err(error) = settled {
        tracing::warn!(task.id = id, %error, "settling the delivery failed");
    }
}

/// Records the states of one delivery and says what to do with its broker entry.
async fn run_delivery(shared: &Arc<Shared>, delivery: &Delivery) -> Result<Settle, StorageError> {
    let envelope = &delivery.envelope;
    let mut record = Recorder {
        shared,
        envelope,
        component: None,
    };

    if envelope.expires_at.is_some_and(|at| at <= Timestamp::now()) {
        record
            .finished(
                TaskState::Revoked,
                failure("expired", "the task expired before it ran"),
            )
            .await?;
        return Ok(Settle::Ack);
    }
    if let Some(revocation) = shared.revokes.get(&envelope.id).await? {
        let message = revocation
            .reason
            .unwrap_or_else(|| "revoked before it ran".to_owned());
        record
            .finished(TaskState::Revoked, failure("revoked", &message))
            .await?;
        return Ok(Settle::Ack);
    }
    if let Some(existing) = shared.backend.get(&envelope.id).await?
        && existing.state == TaskState::Succeeded
    {
        tracing::debug!(
            task.id = envelope.id,
            "already succeeded; a repeated delivery is skipped"
        );
        return Ok(Settle::Ack);
    }

    let (version, component) = match shared.components.resolve(&envelope.task).await {
        Ok(found) => found,
        Err(error @ ComponentError::UnknownTask(_)) => {
            let message = error.to_string();
            record
                .finished(TaskState::Failed, failure("unknown_task", &message))
                .await?;
            return Ok(Settle::DeadLetter(message));
        }
        Err(error) => {
            tracing::error!(task.id = envelope.id, task.name = envelope.task, %error, "cannot get the task's component; the task waits");
            record
                .state(
                    TaskState::Retrying,
                    Some(failure("component_unavailable", &error.to_string())),
                    None,
                )
                .await?;
            return Ok(Settle::Later(WORKER_TROUBLE_DELAY));
        }
    };
    record.component = Some(version.digest.clone());
    let options = &version.definition.options;
    if let Some(limit) = options.rate_limit.as_deref().and_then(RateLimit::parse)
        && let Permit::RetryAfter(wait) = shared.rate_limiter.acquire(&envelope.task, limit).await?
    {
        return Ok(Settle::Later(wait));
    }
    let args = match shared.codecs.decode(&envelope.args) {
        Ok(args) => args,
        Err(error) => {
            let message = format!("cannot decode the arguments: {error}");
            record
                .finished(
                    TaskState::Failed,
                    failure("undecodable_arguments", &message),
                )
                .await?;
            return Ok(Settle::DeadLetter(message));
        }
    };

    record.state(TaskState::Received, None, None).await?;
    record.state(TaskState::Started, None, None).await?;
    let defaults = RunLimits::default();
    let limits = RunLimits {
        memory_bytes: options.memory_limit_bytes.unwrap_or(defaults.memory_bytes),
        hard_time_limit: envelope
            .time_limit_ms
            .map(Duration::from_millis)
            .or(options.hard_time_limit())
            .unwrap_or(defaults.hard_time_limit),
        soft_time_limit: envelope
            .soft_time_limit_ms
            .map(Duration::from_millis)
            .or(options.soft_time_limit()),
    };
    let invocation = Invocation {
        id: envelope.id.clone(),
        name: envelope.task.clone(),
        args,
        attempt: envelope.attempt,
        headers: envelope.headers.clone().into_iter().collect(),
    };
    let hooks = Arc::new(WorkerHooks {
        client: shared.client.clone(),
        root_id: envelope
            .root_id
            .clone()
            .unwrap_or_else(|| envelope.id.clone()),
    });
    let handle = RunHandle::new();
    shared.running().insert(envelope.id.clone(), handle.clone());
    let keeper = LeaseKeeper::start(
        shared.broker.clone(),
        delivery.receipt.clone(),
        shared.config.lease,
    );
    let outcome = component.run(&invocation, limits, hooks, &handle).await;
    drop(keeper);
    shared.running().remove(&envelope.id);

    let error = match outcome {
        Ok(json) => {
            let encoder = envelope
                .result_encoder
                .as_deref()
                .or(options.result_encoder.as_deref());
            return match shared.codecs.encode_result(encoder, &json) {
                Ok(payload) => {
                    record
                        .state(TaskState::Succeeded, None, Some(payload))
                        .await?;
                    Ok(Settle::Ack)
                }
                Err(error) => {
                    let message = format!("cannot encode the result: {error}");
                    record
                        .finished(TaskState::Failed, failure("unencodable_result", &message))
                        .await?;
                    Ok(Settle::DeadLetter(message))
                }
            };
        }
        Err(error) => error,
    };
    let cause = failure(error.kind(), &error.to_string());
    match error {
        RunError::Revoked if shared.stopping.load(Ordering::SeqCst) => {
            let returned = failure(
                "returned",
                "the worker shut down before the task finished; it was returned to the queue",
            );
            record
                .state(TaskState::Pending, Some(returned), None)
                .await?;
            Ok(Settle::Returned)
        }
        RunError::Revoked => {
            record.finished(TaskState::Revoked, cause).await?;
            Ok(Settle::Ack)
        }
        RunError::Instantiate(_) => {
            tracing::warn!(task.id = envelope.id, %error, "cannot start the task; it waits");
            record.state(TaskState::Retrying, Some(cause), None).await?;
            Ok(Settle::Later(WORKER_TROUBLE_DELAY))
        }
        error => {
            let policy = RetryPolicy::new(options, envelope.max_retries);
            match policy.next_delay(envelope.attempt, &error) {
                Some(delay) => {
                    let mut retry = envelope.clone();
                    retry.attempt += 1;
                    retry.not_before = Some(Timestamp::now().saturating_add(delay));
                    shared.broker.publish(&retry).await?;
                    record.state(TaskState::Retrying, Some(cause), None).await?;
                    tracing::info!(task.id = envelope.id, attempt = envelope.attempt, delay_ms = delay.as_millis() as u64, %error, "retrying");
                    Ok(Settle::Ack)
                }
                None => {
                    let reason = match error {
                        RunError::Rejected(_) => error.to_string(),
                        _ => format!(
                            "{error} (attempt {} of {})",
                            envelope.attempt,
                            policy.max_retries + 1
                        ),
                    };
                    record.finished(TaskState::Failed, cause).await?;
                    Ok(Settle::DeadLetter(reason))
                }
            }
        }
    }
}

fn failure(kind: &str, message: &str) -> TaskFailure {
    TaskFailure {
        kind: kind.to_owned(),
        message: message.to_owned(),
    }
}

/// Writes the statuses of one envelope.
struct Recorder<'a> {
    shared: &'a Shared,
    envelope: &'a Envelope,
    /// The digest of the task's component, once it is known.
    component: Option<String>,
}

impl Recorder<'_> {
    async fn state(
        &self,
        state: TaskState,
        error: Option<TaskFailure>,
        result: Option<crate::codec::Payload>,
    ) -> Result<(), StorageError> {
        let envelope = self.envelope;
        let status = TaskStatus {
            task: Some(envelope.task.clone()),
            result,
            error,
            attempt: envelope.attempt,
            worker: Some(self.shared.config.worker_id.clone()),
            component: self.component.clone(),
            group_id: envelope.group_id.clone(),
            parent_id: envelope.parent_id.clone(),
            root_id: envelope.root_id.clone(),
            ..TaskStatus::new(envelope.id.clone(), state)
        };
        self.shared.backend.set(&status, None).await
    }

    async fn finished(&self, state: TaskState, error: TaskFailure) -> Result<(), StorageError> {
        self.state(state, Some(error), None).await
    }
}

/// Extends a delivery's lease every third of it until dropped.
struct LeaseKeeper(tokio::task::JoinHandle<()>);

impl LeaseKeeper {
    fn start(broker: Arc<dyn Broker>, receipt: Receipt, lease: Duration) -> LeaseKeeper {
        LeaseKeeper(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(lease / 3);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                if let Err(error) = broker.extend_lease(&receipt, lease).await {
                    tracing::warn!(entry = receipt.entry, %error, "extending the lease failed");
                }
            }
        }))
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.0.abort();
    }
}
