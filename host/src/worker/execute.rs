//! Executing one delivery: what it needs, the run, and the settlement that records its end.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::{SpanContext, SpanKind};

use super::hooks::WorkerHooks;
use super::retry::RetryPolicy;
use super::{Recorded, RunSlot, Shared};
use crate::backend::{TaskFailure, TaskState, TaskStatus};
use crate::broadcast::AT_MOST_ONCE_HEADER;
use crate::broker::{Delivery, Settle};
use crate::canvas::CANVAS_HEADER;
use crate::capabilities::RunCapabilities;
use crate::codec::Payload;
use crate::components::ComponentError;
use crate::control::events::EventKind;
use crate::envelope::Envelope;
use crate::runtime::{RunError, TaskComponent};
use crate::settlement::Settlement;
use crate::signing::SIGNATURE_INVALID;
use crate::storage::StorageError;
use crate::stores::rate_limit::Permit;
use crate::stores::registry::TaskVersion;
use crate::task::{Invocation, RateLimit};
use crate::telemetry::TaskSpan;
use crate::time::Timestamp;

/// How long a delivery waits before it is tried again when the worker, not the task, could
/// not run it (the registry or the backend unreachable). Such a wait uses no attempt: nothing
/// of the task ran.
pub(super) const WORKER_TROUBLE_DELAY: Duration = Duration::from_secs(5);

/// Runs one delivery through to its settlement.
pub(super) async fn process(
    shared: &Arc<Shared>,
    slot: RunSlot,
    delivery: Delivery,
    recorded: Recorded,
    mut consume: TaskSpan,
) {
    // Nothing of an envelope that fails its signature is trusted, its task id and canvas
    // included: it is dead-lettered with no status written and no canvas moved.
    if let Some(why) = refusal(shared, &delivery) {
        tracing::warn!(task.id = delivery.envelope.id, %why, "refusing an envelope whose signature fails");
        let reason = format!("{SIGNATURE_INVALID}: {why}");
        consume.fail(|| short_error(&reason));
        finish(shared, &slot, &delivery, None, Settle::DeadLetter(reason)).await;
        return;
    }
    let execution = Execution {
        shared,
        delivery: &delivery,
        slot: &slot,
        component: None,
        trace: consume.context(),
    };
    let ended_before = recorded.status.clone().filter(|s| s.state.is_terminal());
    // Boxed: the run's future is large, and every task future that held it inline would be
    // copied whole when it is spawned.
    let (status, settle) = match Box::pin(execution.decide(recorded)).await {
        Ok(outcome) => outcome,
        Err(error) => {
            tracing::error!(task.id = delivery.envelope.id, %error, "preparing the task failed; it waits");
            (None, Settle::Release(WORKER_TROUBLE_DELAY))
        }
    };
    let (status, settle) = if delivery.envelope.headers.contains_key(CANVAS_HEADER)
        && slot.still_leased(&delivery.receipt).await
    {
        advance_canvas(shared, &delivery.envelope, (status, settle), ended_before).await
    } else {
        (status, settle)
    };
    if let Some(error) = status.as_ref().and_then(|status| status.error.as_ref()) {
        consume.fail(|| short_error(&format!("{}: {}", error.kind, error.message)));
    }
    finish(shared, &slot, &delivery, status, settle).await;
}

/// What a worker's spans say of the task they are about.
pub(super) fn task_attributes(envelope: &Envelope, queue: &str) -> Vec<KeyValue> {
    vec![
        KeyValue::new("stem.task.id", envelope.id.clone()),
        KeyValue::new("stem.task.name", envelope.task.clone()),
        KeyValue::new("stem.task.attempt", i64::from(envelope.attempt)),
        KeyValue::new("messaging.destination.name", queue.to_owned()),
    ]
}

/// Why a verifying worker refuses the delivery: its signature fails, or its entry sits on
/// another queue than the one it was signed for (moved by someone with broker access).
fn refusal(shared: &Shared, delivery: &Delivery) -> Option<String> {
    let keys = shared.verifier.as_ref()?;
    let envelope = &delivery.envelope;
    if let Err(why) = keys.verify(envelope) {
        return Some(why.to_string());
    }
    (envelope.queue != delivery.receipt.queue).then(|| {
        format!(
            "the entry is on queue `{}`, signed for `{}`",
            delivery.receipt.queue, envelope.queue
        )
    })
}

/// A task of a canvas that ended (now, or in a delivery whose settle was lost) records its
/// status at once and moves its canvas on before its entry is settled. If either fails, the
/// entry comes back later, and its next delivery advances again: nothing is published twice.
async fn advance_canvas(
    shared: &Arc<Shared>,
    envelope: &Envelope,
    (status, settle): Outcome,
    ended_before: Option<TaskStatus>,
) -> Outcome {
    let ended = match (&status, ended_before) {
        (Some(status), _) if status.state.is_terminal() => status.clone(),
        (None, Some(before)) => before,
        _ => return (status, settle),
    };
    let mut ended = ended;
    if status.is_some() {
        // Another run of this task may have recorded its end first; that one stands.
        let recorded = match shared.backend.set(&ended, None).await {
            Ok(true) => Ok(None),
            Ok(false) => shared.backend.get(&envelope.id).await,
            Err(error) => Err(error),
        };
        match recorded {
            Ok(first) => ended = first.filter(|s| s.state.is_terminal()).unwrap_or(ended),
            Err(error) => {
                tracing::error!(task.id = envelope.id, %error, "recording the end of a canvas task failed; it comes back");
                return (None, Settle::Release(WORKER_TROUBLE_DELAY));
            }
        }
    }
    match shared.canvases.advance(envelope, &ended).await {
        Ok(()) => (status, settle),
        Err(error) if !error.is_transient() => {
            tracing::error!(task.id = envelope.id, %error, "the canvas cannot move on from this task");
            (status, settle)
        }
        Err(error) => {
            tracing::error!(task.id = envelope.id, %error, "advancing the canvas failed; the task comes back to advance it again");
            (None, Settle::Release(WORKER_TROUBLE_DELAY))
        }
    }
}

/// Gives a delivery that never started back to the queue at once.
pub(super) async fn give_back(shared: &Arc<Shared>, slot: RunSlot, delivery: Delivery) {
    finish(
        shared,
        &slot,
        &delivery,
        None,
        Settle::Release(Duration::ZERO),
    )
    .await;
}

/// Gives back a delivery that waited too long for a slot, for another worker to take. Not
/// counted as returned: the worker is not stopping.
pub(super) async fn hand_over(shared: &Arc<Shared>, slot: RunSlot, delivery: Delivery) {
    if slot.still_leased(&delivery.receipt).await {
        let settlement = Settlement {
            receipt: delivery.receipt.clone(),
            status: None,
            settle: Settle::Release(Duration::ZERO),
        };
        shared.settler.settle(settlement).await;
    }
}

/// The longest error an event or a span carries; the status keeps the whole (cut) message.
const EVENT_ERROR_BYTES: usize = 256;

/// `text`, cut to [`EVENT_ERROR_BYTES`].
fn short_error(text: &str) -> String {
    match crate::runtime::head(text, EVENT_ERROR_BYTES) {
        kept if kept.len() < text.len() => format!("{kept}…"),
        _ => text.to_owned(),
    }
}

/// Hands the outcome to the settle stage, unless the lease was lost, and counts it.
async fn finish(
    shared: &Arc<Shared>,
    slot: &RunSlot,
    delivery: &Delivery,
    status: Option<TaskStatus>,
    settle: Settle,
) {
    if !slot.still_leased(&delivery.receipt).await {
        tracing::warn!(
            task.id = delivery.envelope.id,
            "the lease was lost; the outcome is not recorded"
        );
        return;
    }
    let returned = matches!(settle, Settle::Release(delay) if delay.is_zero());
    let done = matches!(settle, Settle::Ack | Settle::DeadLetter(_));
    let event = outcome_event(status.as_ref(), &settle);
    let error = status
        .as_ref()
        .and_then(|status| status.error.as_ref())
        .filter(|_| shared.events.is_enabled())
        .map(|error| short_error(&format!("{}: {}", error.kind, error.message)));
    let settlement = Settlement {
        receipt: delivery.receipt.clone(),
        status,
        settle,
    };
    if shared.settler.settle(settlement).await {
        if let (Some(metrics), Some(kind)) = (&shared.metrics, event) {
            let task = shared.task_label(&delivery.envelope.task);
            metrics.ended(kind, task, &delivery.receipt.queue);
        }
        if done {
            shared.processed.fetch_add(1, Ordering::Relaxed);
        } else if returned {
            shared.returned.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(kind) = event {
            shared.events.emit(|| {
                let mut event = shared.task_event(kind, &delivery.envelope);
                event.runtime_ms = slot
                    .runtime()
                    .map(|runtime| u64::try_from(runtime.as_millis()).unwrap_or(u64::MAX));
                if kind != EventKind::TaskSucceeded {
                    event.error = error;
                }
                event
            });
        }
    }
}

/// The event a settled outcome sends, if it changed the task's state.
fn outcome_event(status: Option<&TaskStatus>, settle: &Settle) -> Option<EventKind> {
    if matches!(settle, Settle::Retry { .. }) {
        return Some(EventKind::TaskRetried);
    }
    match status?.state {
        TaskState::Succeeded => Some(EventKind::TaskSucceeded),
        TaskState::Failed => Some(EventKind::TaskFailed),
        TaskState::Revoked => Some(EventKind::TaskRevoked),
        _ => None,
    }
}

/// What to record, and what becomes of the broker entry.
type Outcome = (Option<TaskStatus>, Settle);

struct Execution<'a> {
    shared: &'a Arc<Shared>,
    delivery: &'a Delivery,
    slot: &'a RunSlot,
    /// The digest of the task's component, once it is known.
    component: Option<String>,
    /// The delivery's `stem.consume` span, parent of its run.
    trace: &'a SpanContext,
}

impl Execution<'_> {
    /// Everything between taking the delivery and settling it.
    async fn decide(mut self, recorded: Recorded) -> Result<Outcome, StorageError> {
        let shared = self.shared;
        let envelope = &self.delivery.envelope;
        let at_most_once = self.at_most_once();
        let began_before = recorded
            .status
            .as_ref()
            .is_some_and(|status| status.state == TaskState::Started);
        if let Some(status) = recorded.status.filter(|s| s.state.is_terminal()) {
            tracing::debug!(
                task.id = envelope.id,
                state = %status.state,
                "already finished; a repeated delivery is settled without running"
            );
            return Ok((None, settle_recorded(&status)));
        }
        // Before any exit that records a status, which would hide that its run began.
        if at_most_once && began_before {
            let cause = failure(
                "at_most_once",
                "an at-most-once broadcast whose run was interrupted is not run again",
            );
            return Ok(self.revoked(cause));
        }
        let max_deliveries = shared.config.budgets.max_deliveries;
        if self.delivery.deliveries > max_deliveries {
            let reason = format!(
                "delivered {} times without finishing (the worker's limit is {max_deliveries})",
                self.delivery.deliveries
            );
            return Ok(self.dead(failure("delivery_limit", &reason), reason));
        }
        if envelope.expires_at.is_some_and(|at| at <= Timestamp::now()) {
            let cause = failure("expired", "the task expired before it ran");
            return Ok(self.revoked(cause));
        }
        if let Some(revocation) = recorded.revocation {
            let message = revocation
                .reason
                .unwrap_or_else(|| "revoked before it ran".to_owned());
            let cause = failure("revoked", &message);
            return Ok(self.revoked(cause));
        }
        if self.slot.handle.is_terminated() {
            return Ok(self.returned());
        }
        // Revoked after it was fetched, while it waited for a run slot.
        if self.slot.handle.is_revoked() {
            let cause = failure("revoked", "revoked before it ran");
            return Ok(self.revoked(cause));
        }

        let (current, component) = match shared.components.resolve(&envelope.task).await {
            Ok(found) => found,
            Err(error @ ComponentError::UnknownTask(_)) => {
                let message = error.to_string();
                return Ok(self.dead(failure("unknown_task", &message), message));
            }
            Err(error @ ComponentError::Untrusted { .. }) => {
                // This worker's trust, not the task's fault: another worker, or this one once
                // the component is signed, may run it.
                tracing::warn!(task.id = envelope.id, task.name = envelope.task, %error, "refusing an untrusted component; the task waits");
                let cause = failure("component_untrusted", &error.to_string());
                let status = self.status(TaskState::Retrying, Some(cause));
                return Ok((Some(status), Settle::Release(WORKER_TROUBLE_DELAY)));
            }
            Err(error) => {
                tracing::error!(task.id = envelope.id, task.name = envelope.task, %error, "cannot get the task's component; the task waits");
                let cause = failure("component_unavailable", &error.to_string());
                let status = self.status(TaskState::Retrying, Some(cause));
                return Ok((Some(status), Settle::Release(WORKER_TROUBLE_DELAY)));
            }
        };
        let version = &current.version;
        self.component = Some(version.digest.clone());
        let capabilities = current.capabilities();
        if let Some(dir) = capabilities.dirs.iter().find(|dir| !dir.host.is_dir()) {
            // The worker's setup, not the task's fault: it waits for a worker that has it.
            tracing::error!(task.id = envelope.id, task.name = envelope.task, host = %dir.host.display(), guest = dir.guest, "a directory granted to the task is missing on this worker; the task waits");
            let message = format!(
                "the directory granted at {} is missing on worker {}",
                dir.guest, shared.config.worker_id
            );
            let status = self.status(
                TaskState::Retrying,
                Some(failure("capability_unavailable", &message)),
            );
            return Ok((Some(status), Settle::Release(WORKER_TROUBLE_DELAY)));
        }
        let options = &version.definition.options;
        if let Some(limit) = options.rate_limit.as_deref().and_then(RateLimit::parse)
            && let Permit::RetryAfter(wait) =
                shared.rate_limiter.acquire(&envelope.task, limit).await?
        {
            // Spread the refused deliveries over the next slots instead of bringing them
            // all back at the same instant.
            return Ok((None, Settle::Release(wait.mul_f64(1.0 + fastrand::f64()))));
        }
        let args = match shared.codecs.decode(&envelope.args) {
            Ok(args) => args,
            Err(error) => {
                let message = format!("cannot decode the arguments: {error}");
                return Ok(self.dead(failure("undecodable_arguments", &message), message));
            }
        };
        if at_most_once {
            // Only while this delivery still holds the lease (a stalled one may have lost it
            // to a redelivery), and recorded before the run, so a redelivery knows it began.
            if !self.slot.confirm_lease(&self.delivery.receipt).await {
                return Ok(self.returned());
            }
            shared
                .backend
                .set(&self.status(TaskState::Started, None), None)
                .await?;
            if self.slot.handle.is_terminated() {
                return Ok(self.returned());
            }
        }
        let outcome = self.run(version, capabilities, &component, args).await;
        if let Some(metrics) = &shared.metrics {
            let took = self.slot.runtime().unwrap_or_default();
            metrics.ran(&envelope.task, took, &self.slot.handle.measures());
        }
        if at_most_once
            && matches!(
                outcome,
                Err(RunError::Instantiate(_) | RunError::MemoryBudgetExhausted { .. })
            )
        {
            // The guest never started: the copy may still run, later.
            return Ok(self.not_begun());
        }
        Ok(self.conclude(version, outcome))
    }

    /// Runs the task, recording `started` once it has run for a while.
    async fn run(
        &self,
        version: &TaskVersion,
        capabilities: &RunCapabilities,
        component: &Arc<TaskComponent>,
        args: String,
    ) -> Result<String, RunError> {
        let shared = self.shared;
        let envelope = &self.delivery.envelope;
        let budgets = &shared.config.budgets;
        let limits = budgets.run_limits(&version.definition.options, envelope);
        let invocation = Invocation {
            id: envelope.id.clone(),
            name: envelope.task.clone(),
            args,
            attempt: envelope.attempt,
            headers: envelope.headers.clone().into_iter().collect(),
        };
        let mut span = TaskSpan::start("stem.run", SpanKind::Internal, Some(self.trace), || {
            task_attributes(envelope, &self.delivery.receipt.queue)
        });
        let started = self.status(TaskState::Started, None);
        let hooks = Arc::new(WorkerHooks {
            trace: span.traceparent(),
            client: shared.client.clone(),
            backend: shared.backend.clone(),
            started: started.clone(),
            root_id: envelope
                .root_id
                .clone()
                .unwrap_or_else(|| envelope.id.clone()),
            depth: envelope.depth,
            max_subtasks: budgets.subtasks_per_run,
            max_depth: budgets.subtask_depth,
            max_countdown: budgets.max_delay,
            subtasks: AtomicU32::new(0),
            canvas_service: shared.canvases.clone(),
            canvases: AtomicU32::new(0),
            progress: Mutex::default(),
        });
        self.slot.started();
        shared
            .events
            .emit(|| shared.task_event(EventKind::TaskStarted, envelope));
        if let Some(metrics) = &shared.metrics {
            metrics.started(&envelope.task, &self.delivery.receipt.queue);
        }
        let mut run =
            Box::pin(component.run(&invocation, limits, capabilities, hooks, &self.slot.handle));
        let quick = tokio::select! {
            outcome = &mut run => Some(outcome),
            () = tokio::time::sleep(shared.config.started_after) => None,
        };
        let outcome = match quick {
            Some(outcome) => outcome,
            None => {
                // Written beside the run, not before it: a slow backend must not pause the
                // guest.
                let backend = shared.backend.clone();
                let id = envelope.id.clone();
                tokio::spawn(async move {
                    if let Err(error) = backend.set(&started, None).await {
                        tracing::warn!(task.id = id, %error, "recording the start failed");
                    }
                });
                run.await
            }
        };
        if let Err(error) = &outcome {
            span.fail(|| short_error(&error.to_string()));
        }
        outcome
    }

    /// The settlement of a run that ended.
    fn conclude(&self, version: &TaskVersion, outcome: Result<String, RunError>) -> Outcome {
        let shared = self.shared;
        let envelope = &self.delivery.envelope;
        let options = &version.definition.options;
        let budgets = &shared.config.budgets;
        let error = match outcome {
            Ok(json) if json.len() as u64 > budgets.result_bytes => {
                let message = format!(
                    "the result is {} bytes, over the worker's limit of {} bytes",
                    json.len(),
                    budgets.result_bytes
                );
                return self.dead(failure("result_too_large", &message), message);
            }
            Ok(json) => {
                let encoder = envelope
                    .result_encoder
                    .as_deref()
                    .or(options.result_encoder.as_deref());
                return match shared.codecs.encode_result(encoder, &json) {
                    Ok(payload) => (Some(self.succeeded(payload)), Settle::Ack),
                    Err(error) => {
                        let message = format!("cannot encode the result: {error}");
                        self.dead(failure("unencodable_result", &message), message)
                    }
                };
            }
            Err(error) => error,
        };
        let cause = failure(error.kind(), &budgets.cut_error(&error.to_string()));
        match error {
            RunError::Revoked if shared.stopping.load(Ordering::SeqCst) && self.at_most_once() => {
                let cause = failure(
                    "at_most_once",
                    "the worker stopped an at-most-once broadcast; it is not run again",
                );
                self.revoked(cause)
            }
            RunError::Revoked if shared.stopping.load(Ordering::SeqCst) => self.returned(),
            RunError::Revoked => self.revoked(cause),
            error => {
                let mut policy = RetryPolicy::new(options, envelope.max_retries);
                policy.max_retries = policy.max_retries.min(budgets.max_retries);
                match policy.next_delay(envelope.attempt, &error) {
                    Some(delay) => {
                        let delay = delay.min(budgets.max_delay);
                        let mut next = envelope.clone();
                        next.attempt += 1;
                        next.not_before = Some(Timestamp::now().saturating_add(delay));
                        tracing::info!(task.id = envelope.id, attempt = envelope.attempt, delay_ms = delay.as_millis() as u64, %error, "retrying");
                        let status = self.status(TaskState::Retrying, Some(cause));
                        let settle = Settle::Retry {
                            next: Box::new(next),
                            delay,
                        };
                        (Some(status), settle)
                    }
                    None => {
                        let reason = match error {
                            RunError::Rejected(_) => cause.message.clone(),
                            _ => format!(
                                "{} (attempt {} of {})",
                                cause.message,
                                envelope.attempt,
                                policy.max_retries.saturating_add(1)
                            ),
                        };
                        self.dead(cause, reason)
                    }
                }
            }
        }
    }

    /// Revoked (or expired, or not to be run again): recorded as `revoked`, the entry acked.
    fn revoked(&self, cause: TaskFailure) -> Outcome {
        (
            Some(self.status(TaskState::Revoked, Some(cause))),
            Settle::Ack,
        )
    }

    /// Whether this is an at-most-once broadcast copy, whose run begins at most once.
    fn at_most_once(&self) -> bool {
        self.delivery
            .envelope
            .headers
            .contains_key(AT_MOST_ONCE_HEADER)
    }

    /// Failed for good: recorded as `failed`, the entry dead-lettered with `reason`.
    fn dead(&self, cause: TaskFailure, reason: String) -> Outcome {
        let reason = self.shared.config.budgets.cut_error(&reason);
        (
            Some(self.status(TaskState::Failed, Some(cause))),
            Settle::DeadLetter(reason),
        )
    }

    /// An at-most-once copy whose run did not begin after all: recorded as `pending` again
    /// (its next delivery may run it) and given back after the worker-trouble delay.
    fn not_begun(&self) -> Outcome {
        let cause = failure("not_begun", "the run could not begin; the copy waits");
        (
            Some(self.status(TaskState::Pending, Some(cause))),
            Settle::Release(WORKER_TROUBLE_DELAY),
        )
    }

    /// Stopped by shutdown: recorded as `pending` again and given back at once.
    fn returned(&self) -> Outcome {
        let returned = failure(
            "returned",
            "the worker shut down before the task finished; it was returned to the queue",
        );
        (
            Some(self.status(TaskState::Pending, Some(returned))),
            Settle::Release(Duration::ZERO),
        )
    }

    fn succeeded(&self, result: Payload) -> TaskStatus {
        TaskStatus {
            result: Some(result),
            ..self.status(TaskState::Succeeded, None)
        }
    }

    fn status(&self, state: TaskState, error: Option<TaskFailure>) -> TaskStatus {
        let envelope = &self.delivery.envelope;
        TaskStatus {
            task: Some(envelope.task.clone()),
            error,
            attempt: envelope.attempt,
            worker: Some(self.shared.config.worker_id.clone()),
            component: self.component.clone(),
            group_id: envelope.group_id.clone(),
            parent_id: envelope.parent_id.clone(),
            root_id: envelope.root_id.clone(),
            ..TaskStatus::new(envelope.id.clone(), state)
        }
    }
}

/// How to settle the entry of a task whose outcome is already recorded: a redelivery whose
/// first settle was lost, or a duplicate publish of a finished task id.
fn settle_recorded(status: &TaskStatus) -> Settle {
    match status.state {
        TaskState::Failed => Settle::DeadLetter(
            status
                .error
                .as_ref()
                .map_or_else(|| "failed".to_owned(), |e| e.message.clone()),
        ),
        _ => Settle::Ack,
    }
}

fn failure(kind: &str, message: &str) -> TaskFailure {
    TaskFailure {
        kind: kind.to_owned(),
        message: message.to_owned(),
    }
}
