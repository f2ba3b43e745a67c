//! The producer side: turning "run task X with these arguments" into a published envelope.
//!
//! The client refuses what a worker could never run (unknown task names, arguments that are
//! not JSON, out-of-range priorities) before anything reaches the broker, picks the queue and
//! priority (the request's, the routing file's, the task's declared defaults: see
//! [`crate::routing`]) and encodes the arguments with the task's encoder.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::broker::Broker;
use crate::codec::{CodecError, Codecs};
use crate::components::VERSION_CACHE_TTL;
use crate::envelope::{Envelope, EnvelopeError};
use crate::routing::{RouteRequest, Routing, Target};
use crate::storage::StorageError;
use crate::stores::registry::ComponentRegistry;
use crate::task::TaskDefinition;
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
        "`{task}` is routed to broadcast `{broadcast}`, and broadcast delivery is not built yet: \
         route it to a queue"
    )]
    Broadcast { task: String, broadcast: String },
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
    definitions: Arc<Mutex<HashMap<String, (TaskDefinition, Instant)>>>,
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
            definitions: Arc::default(),
        }
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

    /// Checks, fills in and encodes one request, without publishing it.
    pub async fn prepare(&self, request: EnqueueRequest) -> Result<Envelope, EnqueueError> {
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
        let queue = match decision.target {
            Target::Queue(queue) => queue,
            Target::Broadcast(broadcast) => {
                return Err(EnqueueError::Broadcast {
                    task: request.task,
                    broadcast,
                });
            }
        };
        let mut envelope = Envelope::new(request.task, args);
        if let Some(id) = request.task_id {
            envelope.id = id;
        }
        envelope.queue = queue;
        envelope.priority = decision.priority;
        envelope.not_before = request.not_before;
        envelope.max_retries = request.max_retries;
        envelope.time_limit_ms = request.time_limit_ms;
        envelope.soft_time_limit_ms = request.soft_time_limit_ms;
        envelope.expires_at = request.expires_at;
        envelope.headers = request.headers;
        envelope.parent_id = request.parent_id;
        envelope.root_id = request.root_id;
        envelope.depth = request.depth;
        envelope.validate()?;
        Ok(envelope)
    }

    /// Publishes one task and returns its envelope.
    pub async fn enqueue(&self, request: EnqueueRequest) -> Result<Envelope, EnqueueError> {
        let envelope = self.prepare(request).await?;
        self.broker.publish(&envelope).await?;
        Ok(envelope)
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
        Ok(envelopes)
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
