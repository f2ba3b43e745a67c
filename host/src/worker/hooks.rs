//! What a running guest reaches through the worker: sub-tasks and canvases go to the same
//! broker, with their parent, root and depth recorded and the operator's sub-task budgets
//! applied (a canvas's tasks count as sub-tasks); progress and heartbeats are recorded in the
//! result backend.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::backend::{ResultBackend, TaskProgress, TaskStatus};
use crate::canvas::{Canvases, Node, Origin, spec};
use crate::client::{Client, EnqueueError, EnqueueRequest};
use crate::runtime::{SubTaskRequest, TaskHooks, TaskInfo};
use crate::telemetry::TRACEPARENT;
use crate::time::Timestamp;

/// Largest canvas spec a task may submit.
pub const MAX_GUEST_SPEC_BYTES: usize = 4 << 20;

/// Progress is written at most this often per run; the terminal status follows anyway.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

pub(super) struct WorkerHooks {
    /// The `traceparent` of the run, parent of what it enqueues.
    pub trace: String,
    pub client: Client,
    pub backend: Arc<dyn ResultBackend>,
    /// The `started` status of this run, which progress updates.
    pub started: TaskStatus,
    /// The first task of the tree the running task belongs to.
    pub root_id: String,
    /// The running task's depth below its root.
    pub depth: u32,
    pub max_subtasks: u32,
    pub max_depth: u32,
    /// Longest countdown a sub-task may ask for; a longer one is cut to it.
    pub max_countdown: Duration,
    pub subtasks: AtomicU32,
    /// Submits the canvases the run creates.
    pub canvas_service: Arc<Canvases>,
    /// Canvases this run submitted, which numbers their ids.
    pub canvases: AtomicU32,
    /// The last progress reported, and when a status was last written for it.
    pub progress: Mutex<Progress>,
}

/// What the guest last said about its progress.
#[derive(Default)]
pub(super) struct Progress {
    reported: Option<TaskProgress>,
    written_at: Option<Instant>,
}

impl WorkerHooks {
    /// The depth of what the run enqueues, or why it may not (`cannot {what}: ... {subject}
    /// would be at depth N`).
    fn sub_task_depth(&self, what: &str, subject: &str) -> Result<u32, String> {
        let depth = self.depth + 1;
        if depth > self.max_depth {
            return Err(format!(
                "cannot {what}: sub-tasks may nest {} deep below the task a producer enqueued, \
                 and {subject} would be at depth {depth}",
                self.max_depth
            ));
        }
        Ok(depth)
    }

    /// Takes `count` from the run's sub-task budget; when it has too little left, takes
    /// nothing and returns how much was used before.
    fn reserve_subtasks(&self, count: u32) -> Result<(), u32> {
        let before = self.subtasks.fetch_add(count, Ordering::Relaxed);
        if before.saturating_add(count) > self.max_subtasks {
            self.subtasks.fetch_sub(count, Ordering::Relaxed);
            return Err(before);
        }
        Ok(())
    }

    /// Gives back what an enqueue that failed had taken.
    fn release_subtasks(&self, count: u32) {
        self.subtasks.fetch_sub(count, Ordering::Relaxed);
    }

    /// Records the `started` status with the last progress, at most every [`PROGRESS_EVERY`];
    /// `report` replaces the progress first.
    fn record(&self, task: &TaskInfo, report: Option<TaskProgress>) {
        let progress = {
            let mut progress = self
                .progress
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(report) = report {
                progress.reported = Some(report);
            }
            if progress
                .written_at
                .is_some_and(|at| at.elapsed() < PROGRESS_EVERY)
            {
                return;
            }
            progress.written_at = Some(Instant::now());
            progress.reported.clone()
        };
        let status = TaskStatus {
            progress,
            updated_at: Timestamp::now(),
            ..self.started.clone()
        };
        let backend = self.backend.clone();
        let id = task.id.clone();
        tokio::spawn(async move {
            if let Err(error) = backend.set(&status, None).await {
                tracing::warn!(task.id = id, %error, "recording progress failed");
            }
        });
    }
}

#[async_trait]
impl TaskHooks for WorkerHooks {
    fn progress(&self, task: &TaskInfo, percent: u8, message: &str) {
        let report = TaskProgress {
            percent,
            message: message.to_owned(),
        };
        self.record(task, Some(report));
    }

    /// A heartbeat refreshes the recorded `started` status, so `result get` shows the task
    /// alive.
    fn heartbeat(&self, task: &TaskInfo) {
        self.record(task, None);
    }

    async fn enqueue(&self, parent: &TaskInfo, request: SubTaskRequest) -> Result<String, String> {
        let what = format!("enqueue `{}`", request.name);
        let depth = self.sub_task_depth(&what, "this one")?;
        self.reserve_subtasks(1).map_err(|_| {
            format!(
                "cannot {what}: a run may enqueue at most {} sub-tasks",
                self.max_subtasks
            )
        })?;
        let sub_task = EnqueueRequest {
            queue: request.queue,
            priority: request.priority,
            not_before: request.countdown.map(|countdown| {
                Timestamp::now().saturating_add(countdown.min(self.max_countdown))
            }),
            parent_id: Some(parent.id.clone()),
            root_id: Some(self.root_id.clone()),
            depth,
            headers: BTreeMap::from([(TRACEPARENT.to_owned(), self.trace.clone())]),
            ..EnqueueRequest::new(request.name, request.args)
        };
        match self.client.enqueue(sub_task).await {
            Ok(envelope) => Ok(envelope.id),
            Err(error) => {
                self.release_subtasks(1);
                Err(error.to_string())
            }
        }
    }

    /// The spec is held to the operator's bound on sub-task arguments, and to
    /// [`MAX_GUEST_SPEC_BYTES`]: a parsed tree takes many times its text's size.
    async fn submit_canvas(&self, parent: &TaskInfo, spec: String) -> Result<String, String> {
        if spec.len() > MAX_GUEST_SPEC_BYTES {
            return Err(format!(
                "the canvas is {} bytes, over the limit of {MAX_GUEST_SPEC_BYTES} bytes for a \
                 canvas a task submits",
                spec.len()
            ));
        }
        self.client
            .check_args_size("canvas", &spec)
            .map_err(|error| match error {
                EnqueueError::ArgsTooLarge { size, limit, .. } => format!(
                    "the canvas is {size} bytes, over the limit of {limit} bytes for sub-task \
                     arguments (STEM_MAX_ARGS_SIZE)"
                ),
                other => other.to_string(),
            })?;
        let depth = self.sub_task_depth("submit a canvas", "its tasks")?;
        let root: Node = serde_json::from_str(&spec)
            .map_err(|error| format!("the canvas spec is not valid: {error}"))?;
        if root.id.is_some() {
            return Err(
                "a task's canvases take ids derived from the task's own: leave out `id`".into(),
            );
        }
        // Derived from the task id, so a retried run that submits again publishes nothing twice.
        let number = self.canvases.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}~{number}", parent.id);
        let tasks = spec::validate(&root, &id).map_err(|error| error.to_string())?;
        let tasks = u32::try_from(tasks).unwrap_or(u32::MAX);
        self.reserve_subtasks(tasks).map_err(|before| {
            format!(
                "cannot submit a canvas of {tasks} tasks: a run may enqueue at most {} sub-tasks \
                 ({before} so far)",
                self.max_subtasks
            )
        })?;
        let origin = Origin {
            parent_id: Some(parent.id.clone()),
            root_id: Some(self.root_id.clone()),
            depth,
            trace: Some(self.trace.clone()),
        };
        match self.canvas_service.submit_as(id, root, origin).await {
            Ok(submitted) => Ok(submitted.id),
            Err(error) => {
                self.release_subtasks(tasks);
                Err(error.to_string())
            }
        }
    }
}
