//! The event stream: every task state change and worker lifecycle step, as it happens.
//!
//! Events are named after the seeds' signals (`taskSucceeded`, `workerReady`, …) and travel
//! on the broadcast channel `NS.events` as JSON arrays, so a busy worker sends one message per
//! batch rather than one per event. `stem-host events` tails them. Like Celery's events they
//! are for watching, not for bookkeeping: a listener that is not connected misses them, and a
//! worker whose buffer is full drops (and counts) them rather than slow its tasks down. Also
//! like Celery's, they are off unless asked for (`worker start --events`, or `worker
//! enable-events` at run time; producers with `STEM_TASK_SENT_EVENT`): three events per task
//! cost a busy Redis worker about an eighth of its throughput.
//!
//! | event | Celery | sent by | when |
//! | --- | --- | --- | --- |
//! | `taskSent` | `task-sent` | the producer | the envelope is on the broker |
//! | `taskReceived` | `task-received` | a worker | it leased the delivery |
//! | `taskStarted` | `task-started` | a worker | the run begins in the sandbox |
//! | `taskRetried` | `task-retried` | a worker | the next attempt is stored |
//! | `taskSucceeded` | `task-succeeded` | a worker | the result is recorded |
//! | `taskFailed` | `task-failed` | a worker | failed for good (dead-lettered) |
//! | `taskRevoked` | `task-revoked` | a worker | revoked, expired, or stopped |
//! | `workerReady` | `worker-online` | a worker | it starts fetching |
//! | `workerHeartbeat` | `worker-heartbeat` | a worker | every heartbeat interval |
//! | `workerShutdown` | `worker-offline` | a worker | it stopped |

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::broker::{Broker, Subscription};
use crate::envelope::Envelope;
use crate::storage::StorageError;
use crate::time::Timestamp;

/// What happened. See the module documentation for when each is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum EventKind {
    TaskSent,
    TaskReceived,
    TaskStarted,
    TaskRetried,
    TaskSucceeded,
    TaskFailed,
    TaskRevoked,
    WorkerReady,
    WorkerHeartbeat,
    WorkerShutdown,
}

impl EventKind {
    pub fn is_task(self) -> bool {
        !matches!(
            self,
            EventKind::WorkerReady | EventKind::WorkerHeartbeat | EventKind::WorkerShutdown
        )
    }
}

/// One event. Task events carry the task's id, name, queue and attempt; worker events the
/// worker's counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub event: EventKind,
    pub at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// The error kind and message of a failed, retried or revoked task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long the run took (succeeded, failed, retried, revoked after starting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_ms: Option<u64>,
    /// Tasks running now (worker events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<u32>,
    /// Tasks finished since the worker started (worker events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processed: Option<u64>,
}

impl Event {
    /// An event about the task in `envelope`.
    pub fn task(event: EventKind, envelope: &Envelope) -> Event {
        Event {
            task_id: Some(envelope.id.clone()),
            task: Some(envelope.task.clone()),
            queue: Some(envelope.queue.clone()),
            attempt: Some(envelope.attempt),
            ..Event::bare(event)
        }
    }

    /// An event about the worker `worker`.
    pub fn worker(event: EventKind, worker: &str) -> Event {
        Event {
            worker: Some(worker.to_owned()),
            ..Event::bare(event)
        }
    }

    pub(crate) fn bare(event: EventKind) -> Event {
        Event {
            event,
            at: Timestamp::now(),
            worker: None,
            task_id: None,
            task: None,
            queue: None,
            attempt: None,
            error: None,
            runtime_ms: None,
            in_flight: None,
            processed: None,
        }
    }
}

/// Publishes events on one channel, at once.
#[derive(Clone)]
pub struct EventChannel {
    broker: Arc<dyn Broker>,
    channel: String,
}

impl EventChannel {
    pub fn new(broker: Arc<dyn Broker>, channel: String) -> EventChannel {
        EventChannel { broker, channel }
    }

    /// Sends `events` as one message.
    pub async fn publish(&self, events: &[Event]) -> Result<(), StorageError> {
        if events.is_empty() {
            return Ok(());
        }
        let text = serde_json::to_string(events).expect("events always serialise");
        self.broker.broadcast(&self.channel, &text).await
    }

    /// Events from now on, a batch at a time.
    pub async fn subscribe(&self) -> Result<EventStream, StorageError> {
        Ok(EventStream {
            subscription: self.broker.subscribe(&self.channel).await?,
        })
    }
}

/// Events as they arrive.
pub struct EventStream {
    subscription: Subscription,
}

impl EventStream {
    /// The next batch; `None` once the broker is gone. A message that is not a batch of
    /// events (another producer's) is skipped.
    pub async fn next(&mut self) -> Option<Vec<Event>> {
        loop {
            let message = self.subscription.recv().await?;
            match serde_json::from_str::<Vec<Event>>(&message) {
                Ok(events) => return Some(events),
                Err(error) => tracing::debug!(%error, "skipping a message that is not events"),
            }
        }
    }
}

/// How a producer sends its events.
#[derive(Clone, Default)]
pub enum EventPublisher {
    /// Not at all.
    #[default]
    Off,
    /// Through a worker's batches.
    Batched(EventSink),
    /// At once, one message per call (a command-line producer that exits right after).
    Direct(EventChannel),
}

impl EventPublisher {
    pub fn is_off(&self) -> bool {
        match self {
            EventPublisher::Off => true,
            EventPublisher::Batched(sink) => !sink.is_enabled(),
            EventPublisher::Direct(_) => false,
        }
    }

    /// Sends `events`; a failure is logged, never returned: events must not fail a publish.
    pub async fn send(&self, events: Vec<Event>) {
        match self {
            EventPublisher::Off => {}
            EventPublisher::Batched(sink) => {
                for event in events {
                    sink.emit(|| event);
                }
            }
            EventPublisher::Direct(channel) => {
                if let Err(error) = channel.publish(&events).await {
                    tracing::warn!(%error, "sending events failed");
                }
            }
        }
    }
}

/// Events buffered before a worker drops new ones.
const BUFFER: usize = 16_384;
/// How long a worker gathers events before it sends them.
const FLUSH_EVERY: Duration = Duration::from_millis(10);
/// Most events in one message.
const MAX_BATCH: usize = 512;

/// A worker's events, sent in batches by a task of their own while enabled; emitting never
/// waits.
#[derive(Clone)]
pub struct EventSink {
    sender: mpsc::Sender<Event>,
    enabled: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
}

/// Sends what an [`EventSink`] gathers; [`EventFlusher::close`] sends the rest.
pub struct EventFlusher {
    task: Option<tokio::task::JoinHandle<()>>,
    closing: Arc<tokio::sync::Notify>,
}

impl EventSink {
    /// A sink sending to `channel` while enabled, and the task that does it.
    pub fn start(channel: EventChannel, enabled: bool) -> (EventSink, EventFlusher) {
        let (sender, receiver) = mpsc::channel(BUFFER);
        let closing = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(flush(channel, receiver, closing.clone()));
        let sink = EventSink {
            sender,
            enabled: Arc::new(AtomicBool::new(enabled)),
            dropped: Arc::default(),
        };
        let flusher = EventFlusher {
            task: Some(task),
            closing,
        };
        (sink, flusher)
    }

    /// Sends the event `make` builds, if events are enabled (otherwise nothing is built).
    pub fn emit(&self, make: impl FnOnce() -> Event) {
        if !self.is_enabled() {
            return;
        }
        if self.sender.try_send(make()).is_err()
            && self.dropped.fetch_add(1, Ordering::Relaxed) == 0
        {
            tracing::warn!("the event buffer is full; events are dropped until it drains");
        }
    }

    /// Starts or stops sending (`worker enable-events` / `disable-events`).
    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Relaxed);
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Events dropped because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl EventFlusher {
    /// Sends the events emitted so far, waiting up to `patience`; later ones are dropped.
    pub async fn close(mut self, patience: Duration) {
        self.closing.notify_one();
        if let Some(task) = self.task.take()
            && tokio::time::timeout(patience, task).await.is_err()
        {
            tracing::warn!("the last events could not be sent");
        }
    }
}

impl Drop for EventFlusher {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

async fn flush(
    channel: EventChannel,
    mut receiver: mpsc::Receiver<Event>,
    closing: Arc<tokio::sync::Notify>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut closed = false;
    while !closed {
        tokio::select! {
            first = receiver.recv() => match first {
                Some(first) => batch.push(first),
                None => closed = true,
            },
            () = closing.notified() => closed = true,
        }
        if !closed {
            tokio::select! {
                () = tokio::time::sleep(FLUSH_EVERY) => {}
                () = closing.notified() => closed = true,
            }
        }
        loop {
            while batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(event) => batch.push(event),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                break;
            }
            if let Err(error) = channel.publish(&batch).await {
                tracing::warn!(%error, events = batch.len(), "sending events failed; they are lost");
            }
            let full = batch.len() == MAX_BATCH;
            batch.clear();
            if !full {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_use_the_seed_signal_names() {
        let envelope = Envelope::new("reports.generate", crate::codec::Payload::json("{}"));
        let text =
            serde_json::to_string(&Event::task(EventKind::TaskSucceeded, &envelope)).unwrap();
        assert!(text.contains(r#""event":"taskSucceeded""#), "{text}");
        assert!(
            !text.contains("runtime_ms"),
            "unset fields are left out: {text}"
        );
        let worker = serde_json::to_string(&Event::worker(EventKind::WorkerReady, "w1")).unwrap();
        assert!(worker.contains(r#""event":"workerReady""#), "{worker}");
        assert!(!EventKind::WorkerHeartbeat.is_task());
        assert!(EventKind::TaskSent.is_task());
    }

    #[tokio::test]
    async fn a_sink_sends_batches_and_the_rest_on_close() {
        let broker: Arc<dyn Broker> = Arc::new(crate::broker::memory::MemoryBroker::default());
        let channel = EventChannel::new(broker, "stem.events".into());
        let mut stream = channel.subscribe().await.unwrap();
        let (sink, flusher) = EventSink::start(channel, false);
        let envelope = Envelope::new("t", crate::codec::Payload::json("{}"));
        sink.emit(|| Event::task(EventKind::TaskSent, &envelope));
        sink.set_enabled(true);
        for kind in [EventKind::TaskReceived, EventKind::TaskStarted] {
            sink.emit(|| Event::task(kind, &envelope));
        }
        flusher.close(Duration::from_secs(5)).await;
        let batch = stream.next().await.unwrap();
        let kinds: Vec<EventKind> = batch.iter().map(|e| e.event).collect();
        assert_eq!(
            kinds,
            [EventKind::TaskReceived, EventKind::TaskStarted],
            "nothing is sent while disabled"
        );
    }
}
