//! [`Canvases`]: submitting a canvas, advancing it as its tasks finish, revoking it and
//! reading it back as a tree.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::spec::{self, SpecError};
use super::{CANVAS_HEADER, ERROR_KEY, INPUT_KEY, Kind, Node, Step, node_id, node_path};
use crate::backend::{
    CanvasRecord, DEFAULT_GROUP_TTL, GroupRecord, ResultBackend, TaskFailure, TaskState, TaskStatus,
};
use crate::client::{Client, EnqueueError, EnqueueRequest};
use crate::codec::{CodecError, Codecs, Payload};
use crate::envelope::Envelope;
use crate::storage::StorageError;
use crate::stores::revoke::{Revocation, RevokeStore};
use crate::telemetry::{TRACEPARENT, TaskSpan};
use crate::time::Timestamp;

/// How long a published task id is remembered, so that advancing a canvas again publishes
/// nothing twice: a day, the default group TTL (a raised TTL does not lengthen it).
const DEDUPE_WINDOW: Duration = DEFAULT_GROUP_TTL;

/// Envelopes per publish, and statuses per read.
const BATCH: usize = 500;

/// Member results per read: each may be as large as a worker's result budget, and reading
/// stops once they add up to more than a task may receive.
const RESULTS_BATCH: usize = 16;

/// Bytes of canvas trees a process keeps parsed (counted as their stored size times
/// [`PARSED_WEIGHT`]); past it, the oldest are dropped and read again when needed.
const TREE_CACHE_BYTES: usize = 256 << 20;

/// About how much larger a parsed tree is than its JSON.
const PARSED_WEIGHT: usize = 16;

/// How long a parsed tree is trusted before it is read again: a canvas that expired, or an
/// id submitted again after it did, is seen within this.
const TREE_CACHE_AGE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CanvasError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(
        "canvas id `{0}` is already used by a different canvas (submitting the same spec again \
         is fine: nothing is published twice)"
    )]
    IdInUse(String),
    #[error("no canvas `{0}`: it is unknown or has expired")]
    Unknown(String),
    #[error("the stored tree of canvas `{id}` cannot be read: {reason}")]
    CorruptTree { id: String, reason: String },
    #[error("task {0} has no place in its canvas")]
    NotInCanvas(String),
    #[error("member {0} of a complete group has no recorded result")]
    MissingResult(String),
    #[error(transparent)]
    Enqueue(#[from] EnqueueError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl CanvasError {
    /// Whether trying again later may succeed: storage trouble. Anything else (a canvas
    /// gone or damaged) stays as it is.
    pub fn is_transient(&self) -> bool {
        match self {
            CanvasError::Storage(error) | CanvasError::Enqueue(EnqueueError::Storage(error)) => {
                !matches!(error, StorageError::NotFound(_)) && !error.refuses_the_data()
            }
            _ => false,
        }
    }
}

/// Where a canvas comes from: a producer (no parent) or a running task.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_id: Option<String>,
    /// The sub-task depth of the canvas's tasks.
    #[serde(default)]
    pub depth: u32,
    /// The `traceparent` every task of the canvas continues. Not part of the canvas's
    /// identity: a retried run that submits its canvas again names another span.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

/// What the backend stores for a canvas.
#[derive(Serialize, Deserialize)]
struct Tree {
    root: Node,
    #[serde(default)]
    origin: Origin,
}

/// A stored canvas, parsed.
struct Canvas {
    id: String,
    tree: Tree,
}

impl Canvas {
    /// The root task id its tasks record: the submitting task's root, else the canvas.
    fn root_id(&self) -> String {
        self.tree
            .origin
            .root_id
            .clone()
            .unwrap_or_else(|| self.id.clone())
    }

    fn node(&self, path: &[Step]) -> Result<&Node, CanvasError> {
        self.tree
            .root
            .at(path)
            .ok_or_else(|| CanvasError::NotInCanvas(node_id(&self.id, path)))
    }
}

/// What submitting did.
#[derive(Clone, Debug, Serialize)]
pub struct Submitted {
    pub id: String,
    /// Task nodes in the canvas.
    pub tasks: usize,
    /// Tasks published now (none when the same canvas was submitted before).
    pub published: usize,
}

/// How a node ended.
#[derive(Clone, Debug)]
enum Outcome {
    Succeeded(Value),
    /// `failed` or `revoked`.
    Ended {
        state: TaskState,
        error: TaskFailure,
    },
}

impl Outcome {
    fn of(status: &TaskStatus, codecs: &Codecs) -> Result<Outcome, CanvasError> {
        if status.state == TaskState::Succeeded {
            let value = match &status.result {
                Some(payload) => decode(codecs, payload)?,
                None => Value::Null,
            };
            return Ok(Outcome::Succeeded(value));
        }
        let error = status.error.clone().unwrap_or_else(|| TaskFailure {
            kind: status.state.as_str().to_owned(),
            message: format!("it was {}", status.state),
        });
        Ok(Outcome::Ended {
            state: status.state,
            error,
        })
    }

    /// The outcome a parent takes from this one: the same, with an error that names `who`.
    fn passed_up(self, who: &str) -> Outcome {
        match self {
            Outcome::Ended { state, error } => Outcome::Ended {
                state,
                error: TaskFailure {
                    message: format!("{who} {state}: {}", error.message),
                    kind: error.kind,
                },
            },
            succeeded => succeeded,
        }
    }
}

/// Why a canvas stopped for good, as recorded at its root.
fn canvas_error(error: &CanvasError) -> TaskFailure {
    TaskFailure {
        kind: "canvas_error".to_owned(),
        message: error.to_string(),
    }
}

fn decode(codecs: &Codecs, payload: &Payload) -> Result<Value, CanvasError> {
    let text = codecs.decode(payload)?;
    serde_json::from_str(&text).map_err(|error| {
        CanvasError::Codec(CodecError::Invalid {
            encoder: "json",
            reason: error.to_string(),
        })
    })
}

/// A node to publish, and what it receives (`input` or `error`).
type Start = (Vec<Step>, Option<(&'static str, Value)>);

/// One node of a canvas with its recorded state, for `result get`.
#[derive(Clone, Debug, Serialize)]
pub struct TreeNode {
    pub id: String,
    /// `task`, `chain`, `group` or `chord`.
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// As recorded; a composite node not finished yet is `pending` until one of its tasks
    /// has a status, then `started`.
    pub state: TaskState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskFailure>,
    /// A chain's steps, or a group's or chord's members, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<TreeNode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback: Option<Box<TreeNode>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<Box<TreeNode>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link_error: Option<Box<TreeNode>>,
}

/// Parsed trees, newest last, bounded by their stored size.
#[derive(Default)]
struct TreeCache {
    trees: HashMap<String, (Arc<Canvas>, usize, Instant)>,
    order: VecDeque<String>,
    bytes: usize,
}

impl TreeCache {
    fn get(&self, id: &str) -> Option<Arc<Canvas>> {
        let (canvas, _, loaded) = self.trees.get(id)?;
        (loaded.elapsed() < TREE_CACHE_AGE).then(|| canvas.clone())
    }

    fn insert(&mut self, canvas: Arc<Canvas>, stored: usize) {
        let size = stored.saturating_mul(PARSED_WEIGHT);
        while self.bytes + size > TREE_CACHE_BYTES
            && let Some(oldest) = self.order.pop_front()
        {
            if let Some((_, dropped, _)) = self.trees.remove(&oldest) {
                self.bytes -= dropped;
            }
        }
        let entry = (canvas.clone(), size, Instant::now());
        if let Some((_, replaced, _)) = self.trees.insert(canvas.id.clone(), entry) {
            self.bytes -= replaced;
            self.order.retain(|id| *id != canvas.id);
        }
        self.order.push_back(canvas.id.clone());
        self.bytes += size;
    }
}

/// Submits, advances, revokes and reads canvases. See the module documentation.
pub struct Canvases {
    client: Client,
    backend: Arc<dyn ResultBackend>,
    codecs: Codecs,
    cache: Mutex<TreeCache>,
}

impl Canvases {
    pub fn new(client: Client, backend: Arc<dyn ResultBackend>, codecs: Codecs) -> Canvases {
        Canvases {
            client,
            backend,
            codecs,
            cache: Mutex::default(),
        }
    }

    /// Submits a canvas from a producer: the root's `id` if it has one (else a fresh UUID).
    pub async fn submit(&self, root: Node) -> Result<Submitted, CanvasError> {
        let id = match &root.id {
            Some(id) if !spec::is_valid_canvas_id(id) => {
                return Err(SpecError::CanvasId(id.clone()).into());
            }
            Some(id) => id.clone(),
            None => uuid::Uuid::new_v4().to_string(),
        };
        let span = TaskSpan::start("stem.canvas", SpanKind::Producer, None, || {
            vec![KeyValue::new("stem.canvas.id", id.clone())]
        });
        let origin = Origin {
            trace: Some(span.traceparent()),
            ..Origin::default()
        };
        self.submit_as(id, root, origin).await
    }

    /// Submits a canvas under `id`. Submitting the same tree under the same id again publishes
    /// only what is missing (nothing, unless the first submit was cut short).
    pub async fn submit_as(
        &self,
        id: String,
        mut root: Node,
        origin: Origin,
    ) -> Result<Submitted, CanvasError> {
        let tasks = spec::validate(&root, &id)?;
        root.id = None;
        self.check_tasks(&root).await?;
        let text =
            serde_json::to_string(&Tree { root, origin }).expect("a canvas tree always serialises");
        // Every worker reads the tree back: refuse one it could not (nested past the parser's
        // depth limit) before any of it is stored, and keep the copy read back.
        let tree: Tree = serde_json::from_str(&text)
            .map_err(|error| SpecError::Syntax(format!("the canvas nests too deeply: {error}")))?;
        let record = CanvasRecord {
            id: id.clone(),
            tree: text,
            created_at: Timestamp::now(),
        };
        let (tree, size) = match self.backend.save_canvas(&record, None).await? {
            Some(existing) if existing.tree != record.tree => {
                // The same canvas, submitted again from another span, continues the trace
                // stored first.
                let stored: Tree = serde_json::from_str(&existing.tree)
                    .map_err(|_| CanvasError::IdInUse(id.clone()))?;
                let untraced = |tree: &Tree| {
                    let origin = Origin {
                        trace: None,
                        ..tree.origin.clone()
                    };
                    (serde_json::to_value(&tree.root).ok(), origin)
                };
                if untraced(&stored) != untraced(&tree) {
                    return Err(CanvasError::IdInUse(id));
                }
                (stored, existing.tree.len())
            }
            _ => (tree, record.tree.len()),
        };
        let canvas = Arc::new(Canvas { id, tree });
        self.cache().insert(canvas.clone(), size);
        let kind = canvas.tree.root.kind();
        if !matches!(kind, Kind::Task(_)) {
            let pending = self.node_status(&canvas, &[], TaskState::Pending);
            self.backend.set(&pending, None).await?;
        }
        let published = self
            .drive(&canvas, vec![(Vec::new(), None)], Vec::new())
            .await?;
        Ok(Submitted {
            id: canvas.id.clone(),
            tasks,
            published,
        })
    }

    /// Refuses a canvas that names a task no component declares, before any of it is stored.
    async fn check_tasks(&self, root: &Node) -> Result<(), CanvasError> {
        let mut names = std::collections::BTreeSet::new();
        walk(root, &mut Vec::new(), &mut |node, _| {
            if let Kind::Task(name) = node.kind() {
                names.insert(name.to_owned());
            }
        });
        for name in names {
            self.client.definition(&name).await?;
        }
        Ok(())
    }

    /// Moves the canvas of `envelope` on, now that its task ended with `status` (terminal and
    /// recorded). Safe to call again for the same task: nothing is published or counted twice.
    /// A task that is not part of a canvas, or whose canvas has expired, is left alone.
    pub async fn advance(
        &self,
        envelope: &Envelope,
        status: &TaskStatus,
    ) -> Result<(), CanvasError> {
        let Some(canvas_id) = envelope.headers.get(CANVAS_HEADER) else {
            return Ok(());
        };
        let Some(canvas) = self.load(canvas_id).await? else {
            tracing::warn!(
                task.id = envelope.id,
                canvas = canvas_id,
                "the task's canvas is gone (expired?); nothing follows it"
            );
            let status = TaskStatus {
                error: Some(canvas_error(&CanvasError::Unknown(canvas_id.clone()))),
                ..TaskStatus::new(canvas_id.clone(), TaskState::Failed)
            };
            self.backend.set(&status, None).await?;
            return Ok(());
        };
        // Only the task a node names, under its canonical id, moves the canvas on.
        let path = node_path(canvas_id, &envelope.id)
            .filter(|path| node_id(canvas_id, path) == envelope.id)
            .filter(|path| {
                canvas
                    .tree
                    .root
                    .at(path)
                    .and_then(|node| node.task.as_deref())
                    == Some(envelope.task.as_str())
            })
            .ok_or_else(|| CanvasError::NotInCanvas(envelope.id.clone()))?;
        let advanced = match Outcome::of(status, &self.codecs) {
            Ok(outcome) => self.drive(&canvas, Vec::new(), vec![(path, outcome)]).await,
            Err(error) => Err(error),
        };
        match advanced {
            Err(error) if !error.is_transient() => {
                self.fail_canvas(&canvas, &error).await;
                Err(error)
            }
            other => other.map(drop),
        }
    }

    /// A canvas that cannot move on for good is recorded `failed` at its root, so whoever
    /// waits for it learns why instead of waiting forever.
    async fn fail_canvas(&self, canvas: &Canvas, error: &CanvasError) {
        let status = TaskStatus {
            error: Some(canvas_error(error)),
            ..self.node_status(canvas, &[], TaskState::Failed)
        };
        if let Err(error) = self.backend.set(&status, None).await {
            tracing::warn!(canvas = canvas.id, %error, "recording the canvas as failed failed");
        }
    }

    /// Publishes `starts` and moves up from every node in `finished`, until nothing is left:
    /// a node that cannot be published (its arguments too large, its task gone) ends `failed`,
    /// which moves its parents in turn. Returns how many tasks were published.
    async fn drive(
        &self,
        canvas: &Canvas,
        mut starts: Vec<Start>,
        mut finished: Vec<(Vec<Step>, Outcome)>,
    ) -> Result<usize, CanvasError> {
        let mut published = 0;
        loop {
            while let Some((path, outcome)) = finished.pop() {
                self.finished(canvas, path, outcome, &mut starts).await?;
            }
            if starts.is_empty() {
                return Ok(published);
            }
            let (count, refused) = self.publish(canvas, std::mem::take(&mut starts)).await?;
            published += count;
            for (path, error) in refused {
                let failed = Outcome::Ended {
                    state: TaskState::Failed,
                    error,
                };
                let outcome = self.record_node(canvas, &path, failed).await?;
                finished.push((path, outcome));
            }
        }
    }

    /// What follows from the node at `path` ending with `outcome`: its callbacks, and then,
    /// level by level, its parents. Tasks to publish are added to `starts`.
    async fn finished(
        &self,
        canvas: &Canvas,
        mut path: Vec<Step>,
        mut outcome: Outcome,
        starts: &mut Vec<Start>,
    ) -> Result<(), CanvasError> {
        loop {
            let node = canvas.node(&path)?;
            match &outcome {
                Outcome::Succeeded(result) if node.link.is_some() => {
                    starts.push((child(&path, Step::Link), Some((INPUT_KEY, result.clone()))));
                }
                Outcome::Ended { state, error } if node.link_error.is_some() => {
                    let error = json!({
                        "id": node_id(&canvas.id, &path),
                        "task": node.task.as_deref().unwrap_or(node.kind().label()),
                        "state": state,
                        "kind": error.kind,
                        "message": error.message,
                    });
                    starts.push((child(&path, Step::LinkError), Some((ERROR_KEY, error))));
                }
                _ => {}
            }
            let Some((&step, parent_path)) = path.split_last() else {
                return Ok(());
            };
            if matches!(step, Step::Link | Step::LinkError) {
                return Ok(());
            }
            let parent_path = parent_path.to_vec();
            let parent = canvas.node(&parent_path)?;
            let who = describe(canvas, &path, node);
            let up = match (parent.kind(), step) {
                (Kind::Chain(steps), Step::Index(at)) => match outcome {
                    Outcome::Succeeded(result) if (at as usize) + 1 < steps.len() => {
                        let next = child(&parent_path, Step::Index(at + 1));
                        starts.push((next, Some((INPUT_KEY, result))));
                        return Ok(());
                    }
                    ended => ended.passed_up(&format!("step {who}")),
                },
                (Kind::Group(_) | Kind::Chord(_), Step::Index(_)) => {
                    let group_id = node_id(&canvas.id, &parent_path);
                    let member_id = node_id(&canvas.id, &path);
                    if let Outcome::Ended { .. } = outcome {
                        // Recorded before the member is counted: whoever sees the group
                        // complete then also sees that it failed, and runs no callback.
                        let failed = outcome.passed_up(&format!("member {who}"));
                        outcome = self.record_node(canvas, &parent_path, failed).await?;
                        self.backend
                            .group_member_finished(&group_id, &member_id)
                            .await?;
                        path = parent_path;
                        continue;
                    }
                    let progress = self
                        .backend
                        .group_member_finished(&group_id, &member_id)
                        .await?;
                    if !progress.is_complete() {
                        return Ok(());
                    }
                    if let Some(recorded) = self.recorded(&group_id).await? {
                        outcome = recorded;
                        path = parent_path;
                        continue;
                    }
                    let members = parent.members().len();
                    match self.results(canvas, &parent_path, members).await? {
                        Ok(results) if matches!(parent.kind(), Kind::Chord(_)) => {
                            let callback = child(&parent_path, Step::Callback);
                            starts.push((callback, Some((INPUT_KEY, Value::Array(results)))));
                            return Ok(());
                        }
                        Ok(results) => Outcome::Succeeded(Value::Array(results)),
                        Err(error) => Outcome::Ended {
                            state: TaskState::Failed,
                            error,
                        },
                    }
                }
                (Kind::Chord(_), Step::Callback) => outcome.passed_up(&format!("callback {who}")),
                _ => return Err(CanvasError::NotInCanvas(node_id(&canvas.id, &path))),
            };
            outcome = self.record_node(canvas, &parent_path, up).await?;
            path = parent_path;
        }
    }

    /// Writes a terminal status unless one is recorded; returns the outcome that stands.
    async fn record(&self, status: TaskStatus, outcome: Outcome) -> Result<Outcome, CanvasError> {
        if self.backend.set(&status, None).await? {
            return Ok(outcome);
        }
        Ok(self.recorded(&status.id).await?.unwrap_or(outcome))
    }

    /// Records how the node at `path` ended; returns the outcome that stands.
    async fn record_node(
        &self,
        canvas: &Canvas,
        path: &[Step],
        outcome: Outcome,
    ) -> Result<Outcome, CanvasError> {
        let status = match &outcome {
            Outcome::Succeeded(result) => TaskStatus {
                result: Some(Payload::json(result.to_string())),
                ..self.node_status(canvas, path, TaskState::Succeeded)
            },
            Outcome::Ended { state, error } => TaskStatus {
                error: Some(error.clone()),
                ..self.node_status(canvas, path, *state)
            },
        };
        self.record(status, outcome).await
    }

    /// The outcome recorded for `id`, if it is terminal.
    async fn recorded(&self, id: &str) -> Result<Option<Outcome>, CanvasError> {
        match self.backend.get(id).await? {
            Some(status) if status.state.is_terminal() => {
                Ok(Some(Outcome::of(&status, &self.codecs)?))
            }
            _ => Ok(None),
        }
    }

    /// The results of a complete group's members, in order.
    async fn results(
        &self,
        canvas: &Canvas,
        group: &[Step],
        members: usize,
    ) -> Result<Result<Vec<Value>, TaskFailure>, CanvasError> {
        let ids: Vec<String> = (0..members)
            .map(|at| node_id(&canvas.id, &child(group, index(at))))
            .collect();
        let limit = self.client.max_args_bytes();
        let mut bytes = 0;
        let mut results = Vec::with_capacity(members);
        for chunk in ids.chunks(RESULTS_BATCH) {
            let statuses = self.backend.get_many(chunk).await?;
            for (id, status) in chunk.iter().zip(statuses) {
                let Some(status) = status else {
                    return Err(CanvasError::MissingResult(id.clone()));
                };
                bytes += status.result.as_ref().map_or(0, |r| r.data.len());
                if bytes > limit {
                    return Ok(Err(TaskFailure {
                        kind: "result_too_large".to_owned(),
                        message: format!(
                            "the results of its members are over {limit} bytes together, the \
                             most a task may receive (STEM_MAX_ARGS_SIZE)"
                        ),
                    }));
                }
                match Outcome::of(&status, &self.codecs)? {
                    Outcome::Succeeded(result) => results.push(result),
                    Outcome::Ended { .. } => return Err(CanvasError::MissingResult(id.clone())),
                }
            }
        }
        Ok(Ok(results))
    }

    /// Publishes the tasks that start each node of `starts` (creating the groups on the way),
    /// under their derived ids and only once each. Returns how many were published, and the
    /// nodes that could not be (with why).
    async fn publish(
        &self,
        canvas: &Canvas,
        starts: Vec<Start>,
    ) -> Result<(usize, Vec<(Vec<Step>, TaskFailure)>), CanvasError> {
        let mut stack = starts;
        stack.reverse();
        let mut envelopes = Vec::new();
        let mut callbacks = Vec::new();
        let mut refused = Vec::new();
        while let Some((path, feed)) = stack.pop() {
            let node = canvas.node(&path)?;
            let feed = feed.filter(|_| !node.immutable);
            match node.kind() {
                Kind::Task(name) => {
                    match self
                        .client
                        .prepare(self.request(canvas, &path, node, name, feed))
                        .await
                    {
                        Ok(envelope) => {
                            envelopes.push(envelope);
                            callbacks.push(path.last() == Some(&Step::Callback));
                        }
                        Err(EnqueueError::Storage(error)) => return Err(error.into()),
                        Err(error) => refused.push((
                            path,
                            TaskFailure {
                                kind: "enqueue_failed".to_owned(),
                                message: error.to_string(),
                            },
                        )),
                    }
                    continue;
                }
                Kind::Chain(_) => {
                    stack.push((child(&path, Step::Index(0)), feed));
                    continue;
                }
                Kind::Group(_) | Kind::Chord(_) => {}
            }
            let members = node.members().len();
            let group = GroupRecord::new(
                node_id(&canvas.id, &path),
                u32::try_from(members).unwrap_or(u32::MAX),
            );
            self.backend.create_group(&group, None).await?;
            for at in (0..members).rev() {
                stack.push((child(&path, index(at)), feed.clone()));
            }
        }
        let mut published = 0;
        for (chunk, callbacks) in envelopes.chunks(BATCH).zip(callbacks.chunks(BATCH)) {
            let stored = self
                .client
                .publish_unique(chunk.to_vec(), DEDUPE_WINDOW)
                .await?;
            for ((envelope, stored), callback) in chunk.iter().zip(stored).zip(callbacks) {
                if !stored {
                    continue;
                }
                published += 1;
                if *callback {
                    tracing::info!(
                        canvas = canvas.id,
                        task.id = envelope.id,
                        "the chord is complete; its callback is published"
                    );
                }
            }
        }
        Ok((published, refused))
    }

    fn request(
        &self,
        canvas: &Canvas,
        path: &[Step],
        node: &Node,
        name: &str,
        feed: Option<(&'static str, Value)>,
    ) -> EnqueueRequest {
        let mut args = match &node.args {
            Some(Value::Object(args)) => args.clone(),
            _ => Map::new(),
        };
        if let Some((key, value)) = feed {
            args.insert(key.to_owned(), value);
        }
        let origin = &canvas.tree.origin;
        EnqueueRequest {
            queue: node.queue.clone(),
            priority: node.priority,
            max_retries: node.max_retries,
            task_id: Some(node_id(&canvas.id, path)),
            headers: BTreeMap::from_iter(
                std::iter::once((CANVAS_HEADER.to_owned(), canvas.id.clone())).chain(
                    origin
                        .trace
                        .clone()
                        .map(|trace| (TRACEPARENT.to_owned(), trace)),
                ),
            ),
            parent_id: origin.parent_id.clone(),
            root_id: Some(canvas.root_id()),
            depth: origin.depth,
            group_id: group_of(canvas, path),
            ..EnqueueRequest::new(name, Value::Object(args).to_string())
        }
    }

    /// A status of the node at `path`, named by its task, or by its kind for a composite.
    fn node_status(&self, canvas: &Canvas, path: &[Step], state: TaskState) -> TaskStatus {
        let node = canvas.tree.root.at(path);
        let task = match node {
            Some(node) => node
                .task
                .clone()
                .unwrap_or_else(|| node.kind().label().to_owned()),
            None => "canvas".to_owned(),
        };
        TaskStatus {
            task: Some(task),
            group_id: group_of(canvas, path),
            parent_id: canvas.tree.origin.parent_id.clone(),
            root_id: Some(canvas.root_id()),
            ..TaskStatus::new(node_id(&canvas.id, path), state)
        }
    }

    /// Revokes every task of the canvas that has not finished (published or not), and
    /// records the canvas as revoked. Returns the ids of the tasks revoked.
    pub async fn revoke(
        &self,
        revokes: &dyn RevokeStore,
        id: &str,
        template: &Revocation,
    ) -> Result<Vec<String>, CanvasError> {
        let canvas = self
            .load(id)
            .await?
            .ok_or_else(|| CanvasError::Unknown(id.to_owned()))?;
        let mut tasks = Vec::new();
        walk(&canvas.tree.root, &mut Vec::new(), &mut |node, path| {
            // `link_error` callbacks are what a revoked canvas runs.
            if let Kind::Task(_) = node.kind()
                && path.last() != Some(&Step::LinkError)
            {
                tasks.push(node_id(&canvas.id, path));
            }
        });
        let mut revoked = Vec::new();
        for chunk in tasks.chunks(BATCH) {
            let statuses = self.backend.get_many(chunk).await?;
            for (task, status) in chunk.iter().zip(statuses) {
                if status.is_some_and(|s| s.state.is_terminal()) {
                    continue;
                }
                let revocation = Revocation {
                    task_id: task.clone(),
                    ..template.clone()
                };
                revokes.revoke(&revocation).await?;
                revoked.push(revocation.task_id);
            }
        }
        if !matches!(canvas.tree.root.kind(), Kind::Task(_)) {
            let message = template
                .reason
                .clone()
                .unwrap_or_else(|| "the canvas was revoked".to_owned());
            let status = TaskStatus {
                error: Some(TaskFailure {
                    kind: "revoked".to_owned(),
                    message,
                }),
                ..self.node_status(&canvas, &[], TaskState::Revoked)
            };
            self.backend.set(&status, None).await?;
        }
        Ok(revoked)
    }

    /// The canvas as a tree of nodes with their recorded states; `None` if `id` names no
    /// canvas.
    pub async fn tree(&self, id: &str) -> Result<Option<TreeNode>, CanvasError> {
        let Some(canvas) = self.load(id).await? else {
            return Ok(None);
        };
        let mut paths = Vec::new();
        walk(&canvas.tree.root, &mut Vec::new(), &mut |_, path| {
            paths.push(path.to_vec())
        });
        let ids: Vec<String> = paths.iter().map(|p| node_id(&canvas.id, p)).collect();
        let mut statuses = HashMap::new();
        for chunk in ids.chunks(BATCH) {
            for status in self.backend.get_many(chunk).await?.into_iter().flatten() {
                statuses.insert(status.id.clone(), status);
            }
        }
        Ok(Some(self.tree_node(
            &canvas,
            &canvas.tree.root,
            &mut Vec::new(),
            &statuses,
        )?))
    }

    fn tree_node(
        &self,
        canvas: &Canvas,
        node: &Node,
        path: &mut Vec<Step>,
        statuses: &HashMap<String, TaskStatus>,
    ) -> Result<TreeNode, CanvasError> {
        let mut children = Vec::new();
        let (mut callback, mut link, mut link_error) = (None, None, None);
        for step in child_steps(node) {
            if let Some(below) = node.child(step) {
                path.push(step);
                let shown = self.tree_node(canvas, below, path, statuses)?;
                path.pop();
                match step {
                    Step::Index(_) => children.push(shown),
                    Step::Callback => callback = Some(Box::new(shown)),
                    Step::Link => link = Some(Box::new(shown)),
                    Step::LinkError => link_error = Some(Box::new(shown)),
                }
            }
        }
        let id = node_id(&canvas.id, path);
        let status = statuses.get(&id);
        let result = match status.and_then(|s| s.result.as_ref()) {
            Some(payload) => Some(decode(&self.codecs, payload)?),
            None => None,
        };
        let moved = children
            .iter()
            .chain(callback.as_deref())
            .any(|c| c.state != TaskState::Pending);
        let state = match status {
            Some(status) if status.state != TaskState::Pending || !moved => status.state,
            _ if moved => TaskState::Started,
            _ => TaskState::Pending,
        };
        Ok(TreeNode {
            id,
            kind: node.kind().label(),
            task: node.task.clone(),
            state,
            result,
            error: status.and_then(|s| s.error.clone()),
            children,
            callback,
            link,
            link_error,
        })
    }

    /// The canvas `id`, from this process's cache or the backend.
    async fn load(&self, id: &str) -> Result<Option<Arc<Canvas>>, CanvasError> {
        if let Some(canvas) = self.cache().get(id) {
            return Ok(Some(canvas));
        }
        let Some(record) = self.backend.get_canvas(id).await? else {
            return Ok(None);
        };
        let tree: Tree =
            serde_json::from_str(&record.tree).map_err(|error| CanvasError::CorruptTree {
                id: id.to_owned(),
                reason: error.to_string(),
            })?;
        let canvas = Arc::new(Canvas {
            id: id.to_owned(),
            tree,
        });
        self.cache().insert(canvas.clone(), record.tree.len());
        Ok(Some(canvas))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, TreeCache> {
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The group a node's task is a member of, if its parent is a group or a chord's header.
fn group_of(canvas: &Canvas, path: &[Step]) -> Option<String> {
    let (step, parent) = path.split_last()?;
    let parent_node = canvas.tree.root.at(parent)?;
    match (step, parent_node.kind()) {
        (Step::Index(_), Kind::Group(_) | Kind::Chord(_)) => Some(node_id(&canvas.id, parent)),
        _ => None,
    }
}

/// How an error names a node: its id, and its task name for a task.
fn describe(canvas: &Canvas, path: &[Step], node: &Node) -> String {
    let id = node_id(&canvas.id, path);
    match &node.task {
        Some(task) => format!("{id} ({task})"),
        None => format!("{id} ({})", node.kind().label()),
    }
}

fn child(path: &[Step], step: Step) -> Vec<Step> {
    let mut below = Vec::with_capacity(path.len() + 1);
    below.extend_from_slice(path);
    below.push(step);
    below
}

/// Member positions fit in a `u32`: [`spec::validate`] caps a canvas far below that.
fn index(at: usize) -> Step {
    Step::Index(u32::try_from(at).unwrap_or(u32::MAX))
}

/// The steps to a node's children, in the order a tree shows them.
fn child_steps(node: &Node) -> Vec<Step> {
    let mut steps: Vec<Step> = (0..node.members().len()).map(index).collect();
    if let Kind::Chord(_) = node.kind() {
        steps.push(Step::Callback);
    }
    steps.extend([Step::Link, Step::LinkError]);
    steps
}

/// Calls `visit` on every node below and including `node`, depth first.
fn walk(node: &Node, path: &mut Vec<Step>, visit: &mut impl FnMut(&Node, &[Step])) {
    visit(node, path);
    for step in child_steps(node) {
        if let Some(below) = node.child(step) {
            path.push(step);
            walk(below, path, visit);
            path.pop();
        }
    }
}
