//! The producer side: turning "run task X with these arguments" into a published envelope.
//!
//! The client refuses what a worker could never run (unknown task names, arguments that are
//! not JSON, out-of-range priorities) before anything reaches the broker, picks the queue and
//! priority (the request's, the routing file's, the task's declared defaults: see
//! [`crate::routing`]) and encodes the arguments with the task's encoder. A task routed to a
//! broadcast goes out as one copy per subscribed worker ([`crate::broadcast`]); every publish
//! sends `taskSent` events.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;

use crate::backend::ResultBackend;
use crate::broker::Broker;
use crate::codec::{CodecError, Codecs};
use crate::components::VERSION_CACHE_TTL;
use crate::control::events::{Event, EventKind, EventPublisher};
use crate::envelope::{Envelope, EnvelopeError};
use crate::routing::{Delivery, RouteRequest, Routing, Target};
use crate::signing::Keys;
use crate::storage::StorageError;
use crate::stores::registry::ComponentRegistry;
use crate::task::TaskDefinition;
use crate::telemetry::{self, TRACEPARENT, TaskSpan};
use crate::time::Timestamp;

/// One task to enqueue. Everything but the name and the arguments is optional.
#[derive(Clone, Debug, Default)]
pub struct EnqueueRequest {
    pub task: String,
    /// JSON text.
    pub args: String,
    /// Defaults to the task's declared queue, else `default`.
    pub queue: Option<String>,
    /// Defaults to the task's declared priority, else 0.
    pub priority: Option<u8>,
    pub not_before: Option<Timestamp>,
    pub max_retries: Option<u32>,
    pub time_limit_ms: Option<u64>,
    pub soft_time_limit_ms: Option<u64>,
    pub expires_at: Option<Timestamp>,
    /// Defaults to a fresh UUID.
    pub task_id: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub parent_id: Option<String>,
    pub root_id: Option<String>,
    /// Sub-task depth below the root (0 for a task a producer enqueues).
    pub depth: u32,
    /// The group or chord the task is a member of.
    pub group_id: Option<String>,
    /// A unique task (the seeds' `unique` / `uniqueFor`): an identical enqueue (same task,
    /// same arguments) within this long after the first returns the first one's id instead of
    /// publishing again. Honoured by [`Client::send`].
    pub unique_for: Option<Duration>,
}

impl EnqueueRequest {
    pub fn new(task: impl Into<String>, args: impl Into<String>) -> EnqueueRequest {
        EnqueueRequest {
            task: task.into(),
            args: args.into(),
            ..EnqueueRequest::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("unknown task `{0}`: no uploaded component declares it (see `stem-host task list`)")]
    UnknownTask(String),
    #[error("the arguments of `{task}` are not valid JSON: {reason}")]
    InvalidArgs { task: String, reason: String },
    #[error(
        "the arguments of `{task}` are {size} bytes, over the limit of {limit} bytes \
         (STEM_MAX_ARGS_SIZE)"
    )]
    ArgsTooLarge {
        task: String,
        size: usize,
        limit: usize,
    },
    #[error(
        "`{task}` is routed to broadcast `{broadcast}`, and this producer cannot broadcast \
         (tasks running in the sandbox and canvas steps publish to queues only)"
    )]
    Broadcast { task: String, broadcast: String },
    #[error(
        "this producer holds verification keys only (STEM_SIGNING_PUBLIC_KEYS): it cannot sign \
         `{0}`, and workers that verify would refuse it unsigned"
    )]
    CannotSign(String),
    #[error(
        "queue `{0}` is reserved: queues named `worker.…` hold the broadcast copies of one \
         worker each"
    )]
    ReservedQueue(String),
    #[error(
        "no live worker subscribes to broadcast `{0}` (start one with `worker start \
         --broadcasts {0}`); nothing was published"
    )]
    NoSubscribers(String),
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Publishes tasks. Cheap to clone; a task's definition is looked up again once it is older
/// than [`VERSION_CACHE_TTL`], so a new upload's defaults apply within a second.
#[derive(Clone)]
pub struct Client {
    broker: Arc<dyn Broker>,
    registry: Arc<dyn ComponentRegistry>,
    codecs: Codecs,
    max_args_bytes: usize,
    routing: Arc<Routing>,
    /// Where broadcasts find their subscribers (worker heartbeats); none refuses broadcasts.
    workers: Option<Arc<dyn ResultBackend>>,
    events: EventPublisher,
    /// Signs everything published, when configured.
    signing: Option<Arc<Keys>>,
    definitions: Arc<Mutex<HashMap<String, (TaskDefinition, Instant)>>>,
}

/// What a send published.
#[derive(Clone, Debug)]
pub enum Sent {
    Task(Box<Envelope>),
    /// An identical unique task was enqueued within its window: its id.
    Existing {
        task: String,
        task_id: String,
    },
    /// One copy per subscribed worker.
    Broadcast {
        name: String,
        copies: Vec<Envelope>,
    },
}

impl Sent {
    /// The task's name.
    pub fn task(&self) -> &str {
        match self {
            Sent::Task(envelope) => &envelope.task,
            Sent::Existing { task, .. } => task,
            Sent::Broadcast { copies, .. } => copies.first().map_or("", |copy| &copy.task),
        }
    }
}

/// Largest arguments a client publishes unless told otherwise.
pub const DEFAULT_MAX_ARGS_BYTES: usize = 16 << 20;

impl Client {
    pub fn new(
        broker: Arc<dyn Broker>,
        registry: Arc<dyn ComponentRegistry>,
        codecs: Codecs,
    ) -> Client {
        Client {
            broker,
            registry,
            codecs,
            max_args_bytes: DEFAULT_MAX_ARGS_BYTES,
            routing: Arc::default(),
            workers: None,
            events: EventPublisher::Off,
            signing: None,
            definitions: Arc::default(),
        }
    }

    /// Lets the client broadcast, to the workers whose heartbeats `backend` holds.
    pub fn with_workers(mut self, backend: Arc<dyn ResultBackend>) -> Client {
        self.workers = Some(backend);
        self
    }

    /// Signs every envelope it publishes with the active key; with verification keys only,
    /// it refuses to publish.
    pub fn with_signing(mut self, keys: Option<Arc<Keys>>) -> Client {
        self.signing = keys;
        self
    }

    /// Signs `envelopes` for publishing, or refuses when this producer cannot sign.
    fn seal(&self, envelopes: &mut [Envelope]) -> Result<(), EnqueueError> {
        let Some(keys) = &self.signing else {
            return Ok(());
        };
        if !keys.can_sign() {
            let task = envelopes
                .first()
                .map(|e| e.task.clone())
                .unwrap_or_default();
            return Err(EnqueueError::CannotSign(task));
        }
        for envelope in envelopes {
            keys.sign(envelope);
        }
        Ok(())
    }

    /// Publishes an envelope [prepared](Client::prepare) (and so signed) earlier, unchanged
    /// since, and sends `taskSent`.
    pub async fn publish(&self, envelope: &Envelope) -> Result<(), StorageError> {
        self.broker.publish(envelope).await?;
        self.sent(std::slice::from_ref(envelope)).await;
        Ok(())
    }

    /// Publishes envelopes [prepared](Client::prepare) earlier, unchanged since, through
    /// [`Broker::publish_unique`], and sends `taskSent` for those stored: per envelope,
    /// whether it was stored.
    pub async fn publish_unique(
        &self,
        envelopes: Vec<Envelope>,
        window: Duration,
    ) -> Result<Vec<bool>, StorageError> {
        let stored = self.broker.publish_unique(&envelopes, window).await?;
        let sent: Vec<Envelope> = envelopes
            .into_iter()
            .zip(&stored)
            .filter(|(_, stored)| **stored)
            .map(|(envelope, _)| envelope)
            .collect();
        self.sent(&sent).await;
        Ok(stored)
    }

    /// Sends a `taskSent` event for every task published.
    pub fn with_events(mut self, events: EventPublisher) -> Client {
        self.events = events;
        self
    }

    /// Routes every task through the operator's routing file.
    pub fn with_routing(mut self, routing: Arc<Routing>) -> Client {
        self.routing = routing;
        self
    }

    pub fn routing(&self) -> &Arc<Routing> {
        &self.routing
    }

    /// Refuses arguments over `bytes` (of JSON text).
    pub fn with_max_args_bytes(mut self, bytes: usize) -> Client {
        self.max_args_bytes = bytes;
        self
    }

    /// The largest arguments (JSON text) this client publishes.
    pub fn max_args_bytes(&self) -> usize {
        self.max_args_bytes
    }

    /// Whether arguments of this size may be enqueued.
    pub fn check_args_size(&self, task: &str, args: &str) -> Result<(), EnqueueError> {
        if args.len() > self.max_args_bytes {
            return Err(EnqueueError::ArgsTooLarge {
                task: task.to_owned(),
                size: args.len(),
                limit: self.max_args_bytes,
            });
        }
        Ok(())
    }

    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// Checks, fills in, encodes and signs one request, without publishing it. A task routed
    /// to a broadcast is refused: [`Client::send`] publishes those.
    pub async fn prepare(&self, request: EnqueueRequest) -> Result<Envelope, EnqueueError> {
        match self.route(request, None).await? {
            (envelope, None) => Ok(envelope),
            (envelope, Some(broadcast)) => Err(EnqueueError::Broadcast {
                task: envelope.task,
                broadcast,
            }),
        }
    }

    /// The envelope for `request` and the broadcast it goes to, if it does: `broadcast` when
    /// given, else the routing decides. A broadcast's envelope is checked per copy.
    async fn route(
        &self,
        request: EnqueueRequest,
        broadcast: Option<String>,
    ) -> Result<(Envelope, Option<String>), EnqueueError> {
        self.check_args_size(&request.task, &request.args)?;
        if let Err(error) = serde_json::from_str::<serde::de::IgnoredAny>(&request.args) {
            return Err(EnqueueError::InvalidArgs {
                task: request.task,
                reason: error.to_string(),
            });
        }
        let definition = self.definition(&request.task).await?;
        let options = &definition.options;
        let args = self
            .codecs
            .encode_args(options.args_encoder.as_deref(), &request.args)?;
        let decision = self.routing.decide(&RouteRequest {
            task: &request.task,
            headers: Some(&request.headers),
            queue: request.queue.as_deref(),
            priority: request.priority,
            declared_queue: options.queue.as_deref(),
            declared_priority: options.priority,
        });
        let (queue, broadcast, priority) = match (broadcast, decision.target) {
            (Some(name), _) => (
                String::new(),
                Some(name),
                request.priority.or(options.priority).unwrap_or(0),
            ),
            (None, Target::Queue(queue)) => (queue, None, decision.priority),
            (None, Target::Broadcast(name)) => (String::new(), Some(name), decision.priority),
        };
        let mut envelope = Envelope::new(request.task, args);
        if let Some(id) = request.task_id {
            envelope.id = id;
        }
        envelope.queue = queue;
        envelope.priority = priority;
        envelope.not_before = request.not_before;
        envelope.max_retries = request.max_retries;
        envelope.time_limit_ms = request.time_limit_ms;
        envelope.soft_time_limit_ms = request.soft_time_limit_ms;
        envelope.expires_at = request.expires_at;
        envelope.headers = request.headers;
        // Continues the trace the request names (a sub-task's parent run, a canvas), else
        // starts one; retries keep the header, so every attempt joins this span.
        let span = TaskSpan::start(
            "stem.enqueue",
            SpanKind::Producer,
            telemetry::parent(&envelope.headers).as_ref(),
            || {
                vec![
                    KeyValue::new("stem.task.id", envelope.id.clone()),
                    KeyValue::new("stem.task.name", envelope.task.clone()),
                    KeyValue::new("messaging.destination.name", envelope.queue.clone()),
                ]
            },
        );
        envelope
            .headers
            .insert(TRACEPARENT.to_owned(), span.traceparent());
        envelope.parent_id = request.parent_id;
        envelope.root_id = request.root_id;
        envelope.depth = request.depth;
        envelope.group_id = request.group_id;
        if broadcast.is_none() {
            envelope.validate()?;
            if crate::worker::is_direct_queue(&envelope.queue) {
                return Err(EnqueueError::ReservedQueue(envelope.queue));
            }
            self.seal(std::slice::from_mut(&mut envelope))?;
        }
        Ok((envelope, broadcast))
    }

    /// Publishes one task and returns its envelope; a task routed to a broadcast is refused.
    pub async fn enqueue(&self, request: EnqueueRequest) -> Result<Envelope, EnqueueError> {
        let envelope = self.prepare(request).await?;
        self.publish(&envelope).await?;
        Ok(envelope)
    }

    /// Publishes one task where the routing sends it: a queue, or a broadcast; a unique
    /// task only if no identical one was enqueued within its window.
    pub async fn send(&self, request: EnqueueRequest) -> Result<Sent, EnqueueError> {
        let unique = request
            .unique_for
            .map(|window| (unique_key(&request.task, &request.args), window));
        match self.route(request, None).await? {
            (envelope, None) => {
                match unique {
                    Some((key, window)) => {
                        let holder = self.broker.publish_by_key(&key, &envelope, window).await?;
                        if let Some(task_id) = holder {
                            return Ok(Sent::Existing {
                                task: envelope.task,
                                task_id,
                            });
                        }
                    }
                    None => self.broker.publish(&envelope).await?,
                }
                self.sent(std::slice::from_ref(&envelope)).await;
                Ok(Sent::Task(Box::new(envelope)))
            }
            (envelope, Some(name)) => self.fan_out(envelope, name).await,
        }
    }

    /// Publishes one task to every worker subscribed to the broadcast `name`.
    pub async fn broadcast(
        &self,
        request: EnqueueRequest,
        name: &str,
    ) -> Result<Sent, EnqueueError> {
        let (envelope, _) = self.route(request, Some(name.to_owned())).await?;
        self.fan_out(envelope, name.to_owned()).await
    }

    async fn fan_out(&self, envelope: Envelope, name: String) -> Result<Sent, EnqueueError> {
        let Some(backend) = &self.workers else {
            return Err(EnqueueError::Broadcast {
                task: envelope.task,
                broadcast: name,
            });
        };
        let workers = backend.workers().await?;
        let subscribers: Vec<_> = workers
            .iter()
            .filter(|worker| worker.broadcasts.contains(&name))
            .collect();
        if subscribers.is_empty() {
            return Err(EnqueueError::NoSubscribers(name));
        }
        let delivery = self
            .routing
            .broadcasts
            .get(&name)
            .map_or(Delivery::Fanout, |rule| rule.delivery);
        let mut copies = crate::broadcast::copies(&envelope, &name, delivery, &subscribers);
        for copy in &copies {
            copy.validate()?;
        }
        self.seal(&mut copies)?;
        self.broker.publish_batch(&copies).await?;
        self.sent(&copies).await;
        Ok(Sent::Broadcast { name, copies })
    }

    /// Publishes many tasks in one batch: all of them, or none if one is refused.
    pub async fn enqueue_many(
        &self,
        requests: Vec<EnqueueRequest>,
    ) -> Result<Vec<Envelope>, EnqueueError> {
        let mut envelopes = Vec::with_capacity(requests.len());
        for request in requests {
            envelopes.push(self.prepare(request).await?);
        }
        self.broker.publish_batch(&envelopes).await?;
        self.sent(&envelopes).await;
        Ok(envelopes)
    }

    /// Sends `taskSent` for what was just published.
    async fn sent(&self, envelopes: &[Envelope]) {
        if self.events.is_off() {
            return;
        }
        let events = envelopes
            .iter()
            .map(|envelope| Event::task(EventKind::TaskSent, envelope))
            .collect();
        self.events.send(events).await;
    }

    /// The task's definition from the registry (cached), or [`EnqueueError::UnknownTask`].
    pub(crate) async fn definition(&self, task: &str) -> Result<TaskDefinition, EnqueueError> {
        let cached = self
            .definitions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(task)
            .filter(|(_, seen)| seen.elapsed() < VERSION_CACHE_TTL)
            .map(|(definition, _)| definition.clone());
        if let Some(definition) = cached {
            return Ok(definition);
        }
        let version = self
            .registry
            .task(task)
            .await?
            .ok_or_else(|| EnqueueError::UnknownTask(task.to_owned()))?;
        self.definitions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(
                task.to_owned(),
                (version.definition.clone(), Instant::now()),
            );
        Ok(version.definition)
    }
}

/// What makes two enqueues of a unique task identical: the task name and its arguments, with
/// object keys sorted (so `{"a":1,"b":2}` and `{"b":2,"a":1}` are the same), hashed.
pub fn unique_key(task: &str, args: &str) -> String {
    fn canonical(value: &serde_json::Value, out: &mut String) {
        match value {
            serde_json::Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (n, key) in keys.into_iter().enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::Value::String(key.clone()).to_string());
                    out.push(':');
                    canonical(&map[key], out);
                }
                out.push('}');
            }
            serde_json::Value::Array(items) => {
                out.push('[');
                for (n, item) in items.iter().enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    canonical(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut text = format!("{task}\0");
    match serde_json::from_str::<serde_json::Value>(args) {
        Ok(value) => canonical(&value, &mut text),
        Err(_) => text.push_str(args),
    }
    format!("{}:{}", task, crate::digest::sha256_hex(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::unique_key;

    #[test]
    fn unique_keys_ignore_key_order_and_whitespace_but_not_values() {
        let key = unique_key("reports.generate", r#"{"a":1,"b":[1,{"y":2,"x":1}]}"#);
        assert_eq!(
            key,
            unique_key("reports.generate", r#"{ "b": [1, {"x":1,"y":2}], "a": 1 }"#)
        );
        assert_ne!(
            key,
            unique_key("reports.generate", r#"{"a":2,"b":[1,{"y":2,"x":1}]}"#)
        );
        assert_ne!(
            key,
            unique_key("reports.other", r#"{"a":1,"b":[1,{"y":2,"x":1}]}"#)
        );
        assert!(key.starts_with("reports.generate:"));
    }
}
