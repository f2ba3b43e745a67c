//! The worker: takes deliveries from the broker and runs them in the sandbox.
//!
//! One [`Worker`] per process, running up to `concurrency` tasks at once. A delivery goes
//! through three stages:
//!
//! 1. **Fetch** ([`Worker::run`]): one loop leases deliveries in batches, looks up their
//!    recorded statuses and revocations in one round trip each, and hands each to a task that
//!    waits for one of the `concurrency` run slots. The worker holds up to
//!    `concurrency × prefetch_multiplier` deliveries, and fetches again once a batch's worth
//!    has room (half the concurrency), so the sandbox never waits for the broker and the
//!    broker sees few large consumes instead of many small ones. From the moment a delivery is
//!    taken, its lease is kept ([`keep_leases`]); a lease that is lost stops the run and
//!    nothing of it is settled.
//! 2. **Execute** (`execute.rs`): decides what the delivery needs (skip a finished or revoked
//!    task, dead-letter one delivered too often, wait for a rate limit), runs the task under
//!    the operator's [`Budgets`], and turns the outcome into a settlement.
//! 3. **Settle** (`settle.rs`): records the status and settles the broker entry, in batches
//!    shared by concurrent runs, through a [`SettlementStore`]: the status no later than the
//!    entry, so nothing is lost if the settle is.
//!
//! `started` is recorded only for runs that last longer than
//! [`WorkerConfig::started_after`]; the terminal status always. Revocations are pushed over
//! the control channel and reach running tasks at once; the revoke store is also polled every
//! [`WorkerConfig::revoke_poll_interval`], for a push that was missed.
//!
//! Prefetch never holds tasks hostage: a delivery that waited [`PREFETCH_PATIENCE`] for a
//! slot (every slot busy with long runs) is given back for an idle worker to take, and the
//! worker fetches only for free slots for a while. With [`WorkerConfig::autoscale`], the
//! number of slots follows the backlog (`autoscale.rs`). Control commands (`control.rs`)
//! answer pings, report stats, pause and resume queues and shut the worker down; events
//! (`crate::control::events`) report every state a delivery goes through.
//!
//! On shutdown ([`ShutdownMode`]) the worker stops fetching (a fetch under way is finished and
//! what it took is given back) and gives back the deliveries still waiting for a slot. Then,
//! warm: running tasks finish; soft: they get [`WorkerConfig::shutdown_grace`]; hard: they are
//! stopped at once; stopped runs are given back. A gentler shutdown can be made harder while
//! it drains. Nothing is lost: an entry leaves the broker only once its outcome is recorded,
//! and anything unsettled comes back when its lease runs out.

mod autoscale;
mod budget;
mod control;
mod execute;
mod hooks;
pub mod retry;
mod settle;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use opentelemetry::trace::SpanKind;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

pub use crate::control::ShutdownMode;
pub use autoscale::Autoscale;
pub use budget::Budgets;

use crate::backend::{ResultBackend, TaskStatus, WorkerHeartbeat};
use crate::broker::{Broker, ConsumeOptions, Delivery, Receipt, Settle};
use crate::canvas::Canvases;
use crate::client::Client;
use crate::codec::Codecs;
use crate::components::ComponentSource;
use crate::control::Channels;
use crate::control::events::{
    Event, EventChannel, EventFlusher, EventKind, EventPublisher, EventSink,
};
use crate::metrics::{Metrics, QUEUE_SAMPLE_EVERY};
use crate::routing::Routing;
use crate::runtime::{RunHandle, Runtime};
use crate::settlement::SettlementStore;
use crate::signing::{Keys, TrustedKeys};
use crate::storage::StorageError;
use crate::stores::rate_limit::RateLimiter;
use crate::stores::registry::ComponentRegistry;
use crate::stores::revoke::{Revocation, RevokeStore};
use crate::sync::lock;
use crate::telemetry::{self, TaskSpan};
use crate::time::Timestamp;
use execute::task_attributes;
use settle::Settler;

/// How long a fetched delivery waits for a run slot before it is given back for another
/// worker (see the module documentation).
pub const PREFETCH_PATIENCE: Duration = Duration::from_secs(1);

/// How long after giving back a waiting delivery the worker fetches only for free slots.
const FAIR_FETCH_FOR: Duration = Duration::from_secs(3);

/// How soon a worker compiles a newly uploaded component, ahead of its first delivery.
const PREPARE_EVERY: Duration = Duration::from_secs(5);

/// Revocations remembered for `inspect --revoked`.
const RECENT_REVOCATIONS: usize = 1_000;

/// The queue of the broadcast copies for one worker: `worker.`, its id with every character
/// a queue name cannot hold replaced by `-` (cut to fit), and a digest of the whole id, so two
/// ids never share one.
pub fn direct_queue(worker_id: &str) -> String {
    let readable: String = worker_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(96)
        .collect();
    let digest = crate::digest::sha256_hex(worker_id.as_bytes());
    format!("{DIRECT_QUEUE_PREFIX}{readable}-{}", &digest[..12])
}

/// What every worker's direct queue is named with first; reserved: producers refuse queues
/// named so.
pub const DIRECT_QUEUE_PREFIX: &str = "worker.";

/// Whether `queue` is in the reserved space of direct queues.
pub fn is_direct_queue(queue: &str) -> bool {
    queue.starts_with(DIRECT_QUEUE_PREFIX)
}

/// Whether `queue` has the exact shape [`direct_queue`] gives: the only queues the sweep of
/// gone workers' queues touches.
fn has_direct_queue_shape(queue: &str) -> bool {
    queue
        .strip_prefix(DIRECT_QUEUE_PREFIX)
        .and_then(|rest| rest.rsplit_once('-'))
        .is_some_and(|(_, digest)| {
            digest.len() == 12 && digest.bytes().all(|b| b.is_ascii_hexdigit())
        })
}

/// How a worker runs.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Unique per worker process; shows in heartbeats and task statuses.
    pub worker_id: String,
    pub queues: Vec<String>,
    /// Tasks run at once; where autoscaling starts.
    pub concurrency: usize,
    /// Bounds for growing and shrinking `concurrency` with the backlog; `None` keeps it.
    pub autoscale: Option<Autoscale>,
    /// Broadcasts whose tasks this worker runs (each copy arrives on its [`direct_queue`]).
    pub broadcasts: Vec<String>,
    /// Where control commands arrive and events are sent.
    pub control: Channels,
    /// Whether to send events from the start (`worker enable-events` turns them on later).
    pub events: bool,
    /// Deliveries held at once, running or waiting for a free slot, as a multiple of
    /// `concurrency`; 1 fetches only for free slots.
    pub prefetch_multiplier: usize,
    /// Lease of each delivery; renewed every third of it while the task runs.
    pub lease: Duration,
    /// How long one fetch waits for work before looking at shutdown again.
    pub fetch_wait: Duration,
    pub heartbeat_interval: Duration,
    pub revoke_poll_interval: Duration,
    /// How long running tasks may take to finish after shutdown begins.
    pub shutdown_grace: Duration,
    /// A run still going after this is recorded as `started`; zero records every start.
    pub started_after: Duration,
    /// What each task may use.
    pub budgets: Budgets,
}

impl Default for WorkerConfig {
    fn default() -> WorkerConfig {
        WorkerConfig {
            worker_id: default_worker_id(),
            queues: vec![crate::envelope::DEFAULT_QUEUE.to_owned()],
            concurrency: 8,
            autoscale: None,
            broadcasts: Vec::new(),
            control: Channels::default(),
            events: false,
            prefetch_multiplier: DEFAULT_PREFETCH_MULTIPLIER,
            lease: crate::broker::DEFAULT_VISIBILITY_TIMEOUT,
            fetch_wait: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(5),
            revoke_poll_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(30),
            started_after: Duration::from_millis(200),
            budgets: Budgets::default(),
        }
    }
}

/// How many deliveries a worker holds per run slot unless configured.
pub const DEFAULT_PREFETCH_MULTIPLIER: usize = 2;

impl WorkerConfig {
    /// Deliveries held at once at `concurrency`: running, or fetched and waiting for a slot.
    fn held_capacity(&self, concurrency: usize) -> usize {
        concurrency.max(1) * self.prefetch_multiplier.max(1)
    }

    /// Free room that makes the fetch loop fetch again: half the concurrency, so a fetch
    /// brings a batch, but never more than the prefetch allows (without prefetch, one free slot
    /// is enough).
    fn fetch_threshold(&self, concurrency: usize) -> usize {
        let concurrency = concurrency.max(1);
        (concurrency / 2)
            .min(self.held_capacity(concurrency) - concurrency)
            .max(1)
    }

    /// How long a heartbeat counts: three intervals, so one late beat is not a death.
    fn heartbeat_ttl(&self) -> Duration {
        self.heartbeat_interval * 3
    }

    /// The most tasks this worker ever runs at once.
    pub fn max_concurrency(&self) -> usize {
        self.autoscale
            .map_or(self.concurrency, |autoscale| autoscale.max)
            .max(1)
    }

    /// The queues fetched from: the configured ones, and the direct queue for broadcasts.
    fn fetched_queues(&self) -> Vec<String> {
        let mut queues = self.queues.clone();
        if !self.broadcasts.is_empty() {
            queues.push(direct_queue(&self.worker_id));
        }
        queues
    }
}

/// `hostname:pid`, as in Celery's worker names.
pub fn default_worker_id() -> String {
    format!("{}:{}", hostname(), std::process::id())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The adapters and the sandbox a worker works with.
pub struct WorkerParts {
    pub broker: Arc<dyn Broker>,
    pub backend: Arc<dyn ResultBackend>,
    /// Where outcomes are written: [`crate::settlement::StatusesThenEntries`] of the two
    /// above, or a store that writes both in one step.
    pub settlements: Arc<dyn SettlementStore>,
    pub revokes: Arc<dyn RevokeStore>,
    pub rate_limiter: Arc<dyn RateLimiter>,
    pub registry: Arc<dyn ComponentRegistry>,
    pub runtime: Arc<Runtime>,
    pub codecs: Codecs,
    /// Applied to the sub-tasks and canvas steps the worker publishes.
    pub routing: Arc<Routing>,
    /// Signing keys: deliveries must be signed by one of them, and the worker signs what it
    /// publishes when it holds a secret or private key. `None` verifies nothing.
    pub signing: Option<Arc<Keys>>,
    /// With keys, the worker runs only components signed by one of them.
    pub trusted_keys: Option<TrustedKeys>,
    /// Where the worker counts what it does, when metrics are on.
    pub metrics: Option<Arc<Metrics>>,
}

/// What a worker did, reported when it stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerSummary {
    /// Deliveries whose outcome was recorded.
    pub processed: u64,
    /// Deliveries stopped by shutdown and given back to the queue.
    pub returned: u64,
}

pub struct Worker {
    shared: Arc<Shared>,
    /// Sends the events the worker emits; closed when the worker stops.
    flusher: Mutex<Option<EventFlusher>>,
}

/// Asks a running worker to stop; see [`ShutdownMode`]. A harder mode than one asked for
/// before takes over; a gentler one changes nothing.
#[derive(Clone)]
pub struct ShutdownHandle {
    requested: watch::Sender<Option<ShutdownMode>>,
}

impl ShutdownHandle {
    pub fn request(&self, mode: ShutdownMode) {
        self.requested.send_if_modified(|requested| {
            if requested.is_some_and(|current| current >= mode) {
                return false;
            }
            *requested = Some(mode);
            true
        });
    }
}

/// What every delivery's processing needs.
struct Shared {
    config: WorkerConfig,
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    revokes: Arc<dyn RevokeStore>,
    rate_limiter: Arc<dyn RateLimiter>,
    components: ComponentSource,
    client: Client,
    /// Moves canvases on as their tasks finish, and submits those tasks create.
    canvases: Arc<Canvases>,
    codecs: Codecs,
    settler: Settler,
    events: EventSink,
    /// Deliveries must carry a signature these keys verify.
    verifier: Option<Arc<Keys>>,
    /// Deliveries taken and not yet settled, by a key of their own (two deliveries of one
    /// task id can be here at once), so leases, revocations and shutdown reach each.
    running: Mutex<HashMap<u64, Running>>,
    next_run: AtomicU64,
    /// The run slots: a delivery runs once it holds one. As many as `concurrency`.
    slots: Arc<Semaphore>,
    /// One permit per delivery held, running or waiting for a slot.
    held: Arc<Semaphore>,
    /// Run slots now (changed by autoscaling).
    concurrency: AtomicUsize,
    /// Runs holding a slot now.
    busy: AtomicUsize,
    /// When a delivery was last given back for waiting too long (fetch only for free slots
    /// for a while after).
    gave_back_waiting: Mutex<Option<Instant>>,
    /// Queues not fetched from until resumed.
    paused: watch::Sender<BTreeSet<String>>,
    /// Held while a heartbeat is written, so the one written when draining begins is last.
    beating: tokio::sync::Mutex<()>,
    shutdown: ShutdownHandle,
    /// Revocations applied recently, newest last.
    recent_revocations: Mutex<VecDeque<AppliedRevocation>>,
    /// Set when shutdown begins: deliveries still waiting for a slot go back to the queue.
    draining: watch::Sender<bool>,
    /// Set when running tasks are being stopped for shutdown: stopped runs go back to the
    /// queue.
    stopping: AtomicBool,
    processed: AtomicU64,
    returned: AtomicU64,
    started_at: Timestamp,
    metrics: Option<Arc<Metrics>>,
}

/// A revocation as `inspect --revoked` reports it.
#[derive(Clone, Debug, serde::Serialize)]
struct AppliedRevocation {
    task_id: String,
    terminate: bool,
    at: Timestamp,
}

/// One delivery between being taken and being settled.
struct Running {
    task_id: String,
    task: String,
    attempt: u32,
    receipt: Receipt,
    handle: RunHandle,
    /// Set when the lease was lost: the run is stopped and nothing of it is settled.
    lost: Arc<AtomicBool>,
    /// When the lease was last taken or extended.
    leased_at: Instant,
    /// When the delivery was taken.
    taken_at: Timestamp,
    /// When its run began, once it did.
    started: Option<(Timestamp, Instant)>,
}

/// A delivery's place in [`Shared::running`]; removes it when dropped.
struct RunSlot {
    shared: Arc<Shared>,
    key: u64,
    handle: RunHandle,
    lost: Arc<AtomicBool>,
}

impl RunSlot {
    /// Whether the lease may have run out by this worker's clock: its last extension is half
    /// a lease ago (extensions come every third of one, so only a stalled process or failing
    /// extensions get here; the margin covers the time the lease was taken before
    /// `leased_at` was).
    fn lease_may_have_lapsed(&self) -> bool {
        let lease = self.shared.config.lease;
        self.shared
            .running()
            .get(&self.key)
            .is_some_and(|running| running.leased_at.elapsed() >= lease / 2)
    }

    /// Before an outcome is recorded: `false` when the lease is known to be lost, so another
    /// worker has the entry and this outcome must not be written over its own.
    async fn still_leased(&self, receipt: &Receipt) -> bool {
        if self.lost.load(Ordering::SeqCst) {
            return false;
        }
        if !self.lease_may_have_lapsed() {
            return true;
        }
        // When the broker cannot say, the outcome is recorded: its settle checks the lease.
        self.confirm_lease(receipt).await || !self.lost.load(Ordering::SeqCst)
    }

    /// Extends the lease now: `false` when it was lost (another delivery of the entry may be
    /// running), or the broker could not say.
    async fn confirm_lease(&self, receipt: &Receipt) -> bool {
        if self.lost.load(Ordering::SeqCst) {
            return false;
        }
        match self
            .shared
            .broker
            .extend_lease(receipt, self.shared.config.lease)
            .await
        {
            Ok(_) => {
                if let Some(running) = self.shared.running().get_mut(&self.key) {
                    running.leased_at = Instant::now();
                }
                if let Some(metrics) = &self.shared.metrics {
                    metrics.lease_renewed();
                }
                true
            }
            Err(StorageError::LeaseLost(_)) => {
                self.lost.store(true, Ordering::SeqCst);
                false
            }
            Err(_) => false,
        }
    }

    /// Marks the run as begun.
    fn started(&self) {
        if let Some(running) = self.shared.running().get_mut(&self.key) {
            running.started = Some((Timestamp::now(), Instant::now()));
        }
    }

    /// How long the run has been going, if it began.
    fn runtime(&self) -> Option<Duration> {
        self.shared
            .running()
            .get(&self.key)
            .and_then(|running| running.started)
            .map(|(_, at)| at.elapsed())
    }
}

impl Drop for RunSlot {
    fn drop(&mut self) {
        self.shared.running().remove(&self.key);
    }
}

impl Shared {
    fn running(&self) -> MutexGuard<'_, HashMap<u64, Running>> {
        lock(&self.running)
    }

    /// Brings the slot gauges up to date with `busy` runs, when metrics are on.
    fn count_slots(&self, busy: usize) {
        if let Some(metrics) = &self.metrics {
            metrics.slots(self.concurrency.load(Ordering::SeqCst), busy);
        }
    }

    /// The `task` label of a delivery's metrics: its name once the registry resolved it.
    fn task_label<'a>(&self, name: &'a str) -> &'a str {
        if self.components.knows(name) {
            name
        } else {
            crate::metrics::UNKNOWN_TASK
        }
    }

    /// Registers a delivery as running from now on.
    fn register(self: &Arc<Self>, delivery: &Delivery) -> RunSlot {
        let key = self.next_run.fetch_add(1, Ordering::Relaxed);
        let handle = RunHandle::new();
        let lost = Arc::new(AtomicBool::new(false));
        if self.stopping.load(Ordering::SeqCst) {
            handle.terminate();
        }
        let envelope = &delivery.envelope;
        self.running().insert(
            key,
            Running {
                task_id: envelope.id.clone(),
                task: envelope.task.clone(),
                attempt: envelope.attempt,
                receipt: delivery.receipt.clone(),
                handle: handle.clone(),
                lost: lost.clone(),
                leased_at: Instant::now(),
                taken_at: Timestamp::now(),
                started: None,
            },
        );
        self.events
            .emit(|| self.task_event(EventKind::TaskReceived, envelope));
        RunSlot {
            shared: self.clone(),
            key,
            handle,
            lost,
        }
    }

    /// An event about a task this worker holds.
    fn task_event(&self, kind: EventKind, envelope: &crate::envelope::Envelope) -> Event {
        Event {
            worker: Some(self.config.worker_id.clone()),
            ..Event::task(kind, envelope)
        }
    }

    /// An event about this worker, with its counters.
    fn worker_event(&self, kind: EventKind) -> Event {
        Event {
            in_flight: Some(u32::try_from(self.running().len()).unwrap_or(u32::MAX)),
            processed: Some(self.processed.load(Ordering::Relaxed)),
            ..Event::worker(kind, &self.config.worker_id)
        }
    }

    /// Stops or flags the runs of revoked tasks, and remembers the revocations.
    fn apply_revocations<'a>(&self, task_ids: impl IntoIterator<Item = &'a str>, terminate: bool) {
        let task_ids: std::collections::HashSet<&str> = task_ids.into_iter().collect();
        for run in self
            .running()
            .values()
            .filter(|run| task_ids.contains(run.task_id.as_str()))
        {
            if terminate {
                run.handle.terminate();
            } else {
                run.handle.revoke();
            }
        }
        let mut recent = lock(&self.recent_revocations);
        for task_id in task_ids {
            if recent
                .iter()
                .any(|r| r.task_id == task_id && r.terminate == terminate)
            {
                continue;
            }
            if recent.len() == RECENT_REVOCATIONS {
                recent.pop_front();
            }
            recent.push_back(AppliedRevocation {
                task_id: task_id.to_owned(),
                terminate,
                at: Timestamp::now(),
            });
        }
    }

    /// Changes the number of run slots (and the deliveries held with them). Slots taken away
    /// leave as their runs finish.
    fn set_concurrency(&self, new: usize) {
        let new = new.max(1);
        let old = self.concurrency.swap(new, Ordering::SeqCst);
        let multiplier = self.config.prefetch_multiplier.max(1);
        if new > old {
            self.slots.add_permits(new - old);
            self.held.add_permits((new - old) * multiplier);
        } else if new < old {
            for (semaphore, count) in [
                (self.slots.clone(), old - new),
                (self.held.clone(), (old - new) * multiplier),
            ] {
                let count = u32::try_from(count).unwrap_or(u32::MAX);
                tokio::spawn(async move {
                    if let Ok(permits) = semaphore.acquire_many_owned(count).await {
                        permits.forget();
                    }
                });
            }
        }
        if new != old {
            tracing::info!(from = old, to = new, "concurrency changed");
        }
    }

    /// Whether prefetching is paused because a delivery waited too long for a slot.
    fn fair_fetch(&self) -> bool {
        lock(&self.gave_back_waiting).is_some_and(|at| at.elapsed() < FAIR_FETCH_FOR)
    }
}

impl Worker {
    pub fn new(parts: WorkerParts, config: WorkerConfig) -> Worker {
        let channel = EventChannel::new(parts.broker.clone(), config.control.events());
        let (events, flusher) = EventSink::start(channel, config.events);
        let client = Client::new(
            parts.broker.clone(),
            parts.registry.clone(),
            parts.codecs.clone(),
        )
        .with_max_args_bytes(config.budgets.subtask_args_bytes)
        .with_routing(parts.routing.clone())
        .with_events(EventPublisher::Batched(events.clone()))
        .with_signing(parts.signing.clone());
        // What a canvas publishes next (results passed on) is held to the same bound.
        let canvas_client = Client::new(
            parts.broker.clone(),
            parts.registry.clone(),
            parts.codecs.clone(),
        )
        .with_max_args_bytes(config.budgets.subtask_args_bytes)
        .with_routing(parts.routing)
        .with_events(EventPublisher::Batched(events.clone()))
        .with_signing(parts.signing.clone());
        let canvases = Arc::new(Canvases::new(
            canvas_client,
            parts.backend.clone(),
            parts.codecs.clone(),
        ));
        let concurrency = config.concurrency.max(1);
        Worker {
            shared: Arc::new(Shared {
                components: ComponentSource::new(parts.registry, parts.runtime, parts.trusted_keys),
                settler: Settler::start(parts.settlements),
                broker: parts.broker,
                backend: parts.backend,
                revokes: parts.revokes,
                rate_limiter: parts.rate_limiter,
                codecs: parts.codecs,
                client,
                canvases,
                events,
                verifier: parts.signing,
                running: Mutex::default(),
                next_run: AtomicU64::new(0),
                slots: Arc::new(Semaphore::new(concurrency)),
                held: Arc::new(Semaphore::new(config.held_capacity(concurrency))),
                concurrency: AtomicUsize::new(concurrency),
                busy: AtomicUsize::new(0),
                gave_back_waiting: Mutex::default(),
                paused: watch::Sender::new(BTreeSet::new()),
                beating: tokio::sync::Mutex::new(()),
                shutdown: ShutdownHandle {
                    requested: watch::Sender::new(None),
                },
                recent_revocations: Mutex::default(),
                draining: watch::Sender::new(false),
                stopping: AtomicBool::new(false),
                config,
                processed: AtomicU64::new(0),
                returned: AtomicU64::new(0),
                started_at: Timestamp::now(),
                metrics: parts.metrics,
            }),
            flusher: Mutex::new(Some(flusher)),
        }
    }

    /// Stops the worker when asked; control commands use it too.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shared.shutdown.clone()
    }

    /// Runs until a shutdown is requested through [`Worker::shutdown_handle`] (or a control
    /// command), then drains as described in the module documentation.
    pub async fn run(&self) -> WorkerSummary {
        let shared = &self.shared;
        let config = &shared.config;
        // Subscribed before the first fetch, so no command sent after the worker is ready is
        // missed.
        let commands = control::subscribe(shared).await;
        shared
            .events
            .emit(|| shared.worker_event(EventKind::WorkerReady));
        let background = [
            tokio::spawn(heartbeats(shared.clone())),
            tokio::spawn(revocations(shared.clone())),
            tokio::spawn(keep_leases(shared.clone())),
            tokio::spawn(control::serve(shared.clone(), commands)),
            tokio::spawn(autoscale::run(shared.clone())),
            tokio::spawn(sweep_direct_queues(shared.clone())),
            tokio::spawn(sample_queues(shared.clone())),
            tokio::spawn(prepare_components(shared.clone())),
        ];
        let mut batches = JoinSet::new();
        let mut queues = config.fetched_queues();
        let mut requested = shared.shutdown.requested.subscribe();
        let mut paused = shared.paused.subscribe();
        let shutdown = async move {
            let _ = requested.wait_for(Option::is_some).await;
        };
        tokio::pin!(shutdown);
        tracing::info!(worker = config.worker_id, queues = ?queues, concurrency = config.concurrency, autoscale = ?config.autoscale, prefetch = config.prefetch_multiplier, "worker started");
        loop {
            let concurrency = shared.concurrency.load(Ordering::SeqCst);
            let threshold = u32::try_from(config.fetch_threshold(concurrency)).unwrap_or(u32::MAX);
            let mut room = tokio::select! {
                permits = shared.held.clone().acquire_many_owned(threshold) => permits.expect("the semaphore is never closed"),
                () = &mut shutdown => break,
            };
            if let Ok(more) = shared.held.clone().try_acquire_many_owned(
                u32::try_from(shared.held.available_permits()).unwrap_or(u32::MAX),
            ) {
                room.merge(more);
            }
            if shared.fair_fetch() {
                // Fetch only for a slot that is free, so nothing waits behind a long run.
                let free = tokio::select! {
                    permit = shared.slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                    () = &mut shutdown => break,
                };
                let slots = shared.slots.available_permits() + 1;
                drop(free);
                if room.num_permits() > slots {
                    room = room.split(slots).expect("fewer than the room holds");
                }
            }
            // Queues of one priority take turns being read first.
            queues.rotate_left(1);
            let fetched_from: Vec<String> = {
                let paused = paused.borrow_and_update();
                queues
                    .iter()
                    .filter(|queue| !paused.contains(*queue))
                    .cloned()
                    .collect()
            };
            if fetched_from.is_empty() {
                drop(room);
                tokio::select! {
                    _ = paused.changed() => continue,
                    () = &mut shutdown => break,
                }
            }
            let options = ConsumeOptions {
                max: room.num_permits(),
                lease: Some(config.lease),
                wait: config.fetch_wait,
            };
            let consume = shared.broker.consume(&fetched_from, &options);
            tokio::pin!(consume);
            // A fetch under way when shutdown begins is finished, and what it took given back.
            let (fetched, stop) = tokio::select! {
                fetched = &mut consume => (fetched, false),
                () = &mut shutdown => (consume.await, true),
            };
            let deliveries = match fetched {
                Ok(deliveries) => deliveries,
                Err(error) => {
                    tracing::error!(%error, "fetching from the broker failed; retrying in 1s");
                    drop(room);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if stop {
                        break;
                    }
                    continue;
                }
            };
            if stop {
                give_back(shared, &deliveries).await;
                break;
            }
            // A queue paused while the fetch waited: what came from it goes back untouched.
            let (deliveries, paused_meanwhile): (Vec<Delivery>, Vec<Delivery>) = {
                let paused = shared.paused.borrow();
                deliveries
                    .into_iter()
                    .partition(|delivery| !paused.contains(&delivery.receipt.queue))
            };
            release(shared, &paused_meanwhile, Duration::ZERO).await;
            let taken: Vec<Taken> = deliveries
                .into_iter()
                .map(|delivery| Taken {
                    slot: shared.register(&delivery),
                    held: room.split(1).expect("fetched no more than the room taken"),
                    delivery,
                })
                .collect();
            drop(room);
            batches.spawn(start_batch(shared.clone(), taken));
            while let Some(finished) = batches.try_join_next() {
                log_panic(finished);
            }
        }

        shared.draining.send_replace(true);
        tracing::info!(
            in_flight = shared.running().len(),
            "shutting down: no more fetching"
        );
        if !config.broadcasts.is_empty() {
            // Beside the drain: a slow backend must not hold up a hard shutdown.
            let shared = shared.clone();
            tokio::spawn(async move { beat(&shared).await });
        }
        drain(shared, &mut batches).await;
        for task in background {
            task.abort();
        }
        shared
            .events
            .emit(|| shared.worker_event(EventKind::WorkerShutdown));
        let flusher = lock(&self.flusher).take();
        if let Some(flusher) = flusher {
            flusher.close(Duration::from_secs(2)).await;
        }
        WorkerSummary {
            processed: shared.processed.load(Ordering::SeqCst),
            returned: shared.returned.load(Ordering::SeqCst),
        }
    }
}

/// Waits for the running tasks as the shutdown mode says, stopping them when it is hard or
/// the soft grace runs out.
async fn drain(shared: &Shared, batches: &mut JoinSet<()>) {
    let mut requested = shared.shutdown.requested.subscribe();
    let mut grace_ends: Option<tokio::time::Instant> = None;
    loop {
        let mode = (*requested.borrow_and_update()).unwrap_or(ShutdownMode::Soft);
        match mode {
            ShutdownMode::Hard => break,
            ShutdownMode::Soft if grace_ends.is_none() => {
                grace_ends = Some(tokio::time::Instant::now() + shared.config.shutdown_grace);
            }
            _ => {}
        }
        let grace = async {
            match grace_ends {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            finished = batches.join_next() => match finished {
                Some(finished) => log_panic(finished),
                None => return,
            },
            _ = requested.changed() => {}
            () = grace => break,
        }
    }
    shared.stopping.store(true, Ordering::SeqCst);
    for running in shared.running().values() {
        running.handle.terminate();
    }
    while let Some(finished) = batches.join_next().await {
        log_panic(finished);
    }
}

/// Gives deliveries back untouched, to be delivered again after `delay` (not counted as a
/// delivery); whether the broker took them.
async fn release<'a>(
    shared: &Shared,
    deliveries: impl IntoIterator<Item = &'a Delivery>,
    delay: Duration,
) -> bool {
    let releases: Vec<(Receipt, Settle)> = deliveries
        .into_iter()
        .map(|delivery| (delivery.receipt.clone(), Settle::Release(delay)))
        .collect();
    if releases.is_empty() {
        return true;
    }
    match shared.broker.settle_many(&releases).await {
        Ok(_) => true,
        Err(error) => {
            tracing::warn!(%error, "giving deliveries back failed; they return when their lease runs out");
            false
        }
    }
}

/// Gives back what a fetch took after shutdown began.
async fn give_back(shared: &Shared, deliveries: &[Delivery]) {
    if release(shared, deliveries, Duration::ZERO).await {
        shared
            .returned
            .fetch_add(deliveries.len() as u64, Ordering::Relaxed);
    }
}

/// What is recorded about a batch of deliveries before any of them runs.
#[derive(Default)]
struct Recorded {
    status: Option<TaskStatus>,
    revocation: Option<Revocation>,
}

/// A delivery from the moment it is taken until it is settled.
struct Taken {
    slot: RunSlot,
    delivery: Delivery,
    /// Its place among the deliveries the worker holds.
    held: OwnedSemaphorePermit,
}

/// Looks up the batch's statuses and revocations in one round trip each, then hands every
/// delivery to a task of its own that runs it once a slot is free.
async fn start_batch(shared: Arc<Shared>, taken: Vec<Taken>) {
    let ids: Vec<String> = taken
        .iter()
        .map(|taken| taken.delivery.envelope.id.clone())
        .collect();
    let recorded =
        match tokio::try_join!(shared.backend.get_many(&ids), shared.revokes.get_many(&ids)) {
            Ok((statuses, revocations)) => statuses
                .into_iter()
                .zip(revocations)
                .map(|(status, revocation)| Recorded { status, revocation }),
            Err(error) => {
                tracing::error!(%error, "reading the recorded states failed; the deliveries wait");
                let deliveries = taken.iter().map(|taken| &taken.delivery);
                release(&shared, deliveries, execute::WORKER_TROUBLE_DELAY).await;
                return;
            }
        };
    let runs: Vec<_> = taken
        .into_iter()
        .zip(recorded)
        .map(|(taken, recorded)| tokio::spawn(run_when_free(shared.clone(), taken, recorded)))
        .collect();
    for run in runs {
        log_panic(run.await);
    }
}

/// Waits for a run slot, then processes the delivery. A delivery still waiting when shutdown
/// begins goes back to the queue untouched, and so does one that waited
/// [`PREFETCH_PATIENCE`] while the worker holds more than it runs: an idle worker may take it.
async fn run_when_free(shared: Arc<Shared>, taken: Taken, recorded: Recorded) {
    let Taken {
        slot,
        delivery,
        held,
    } = taken;
    let mut draining = shared.draining.subscribe();
    let free = match *draining.borrow_and_update() {
        true => None,
        false => shared.slots.clone().try_acquire_owned().ok(),
    };
    // Only a delivery that has to wait arms the patience timer.
    let running = match free {
        Some(permit) => Some(permit),
        None => tokio::select! {
            biased;
            _ = draining.wait_for(|draining| *draining) => None,
            permit = shared.slots.clone().acquire_owned() => Some(permit.expect("the semaphore is never closed")),
            () = tokio::time::sleep(PREFETCH_PATIENCE) => {
                *lock(&shared.gave_back_waiting) = Some(Instant::now());
                tracing::debug!(task.id = delivery.envelope.id, "waited too long for a slot; given back for another worker");
                None
            }
        },
    };
    match running {
        Some(permit) => {
            let busy = Busy::new(&shared);
            // Lines logged while the delivery is processed name it. At ERROR, so that any
            // level filter keeps the span; the fields as strings, so they are printed quoted
            // and escaped (they come from producers).
            let envelope = &delivery.envelope;
            let consume = TaskSpan::start(
                "stem.consume",
                SpanKind::Consumer,
                telemetry::parent(&envelope.headers).as_ref(),
                || task_attributes(envelope, &delivery.receipt.queue),
            );
            let trace_id = consume.trace_id().to_string();
            let span = tracing::error_span!(
                "task",
                task.id = envelope.id.as_str(),
                task.name = envelope.task.as_str(),
                queue = delivery.receipt.queue.as_str(),
                attempt = envelope.attempt,
                trace.id = trace_id.as_str(),
            );
            execute::process(&shared, slot, delivery, recorded, consume)
                .instrument(span)
                .await;
            drop(busy);
            drop(permit);
        }
        None if *draining.borrow() => execute::give_back(&shared, slot, delivery).await,
        None => execute::hand_over(&shared, slot, delivery).await,
    }
    drop(held);
}

/// Counts a run in [`Shared::busy`] while it lives, however the run ends.
struct Busy<'a>(&'a Shared);

impl<'a> Busy<'a> {
    fn new(shared: &'a Shared) -> Busy<'a> {
        let busy = shared.busy.fetch_add(1, Ordering::SeqCst) + 1;
        shared.count_slots(busy);
        Busy(shared)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let busy = self.0.busy.fetch_sub(1, Ordering::SeqCst) - 1;
        self.0.count_slots(busy);
    }
}

fn log_panic(finished: Result<(), tokio::task::JoinError>) {
    if let Err(error) = finished {
        tracing::error!(%error, "processing a delivery panicked");
    }
}

/// Extends the lease of every delivery taken and not yet settled, once a third of it has
/// passed. A lease that was lost stops its run: another worker has the entry now.
async fn keep_leases(shared: Arc<Shared>) {
    let lease = shared.config.lease;
    let mut ticks = tokio::time::interval((lease / 6).max(Duration::from_millis(10)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let due: Vec<(u64, Receipt)> = shared
            .running()
            .iter()
            .filter(|(_, running)| running.leased_at.elapsed() >= lease / 3)
            .map(|(key, running)| (*key, running.receipt.clone()))
            .collect();
        for (key, receipt) in due {
            let extended = shared.broker.extend_lease(&receipt, lease).await;
            let mut running = shared.running();
            let Some(entry) = running.get_mut(&key) else {
                continue;
            };
            match extended {
                Ok(_) => {
                    entry.leased_at = Instant::now();
                    if let Some(metrics) = &shared.metrics {
                        metrics.lease_renewed();
                    }
                }
                Err(StorageError::LeaseLost(_)) => {
                    tracing::warn!(
                        task.id = entry.task_id,
                        "the lease was lost; stopping the run"
                    );
                    entry.lost.store(true, Ordering::SeqCst);
                    entry.handle.terminate();
                }
                Err(error) => {
                    tracing::warn!(task.id = entry.task_id, %error, "extending the lease failed");
                }
            }
        }
    }
}

/// With metrics on and scraped, reads the depths of the worker's queues from the broker every
/// [`QUEUE_SAMPLE_EVERY`].
async fn sample_queues(shared: Arc<Shared>) {
    let Some(metrics) = shared.metrics.clone() else {
        return;
    };
    let mut ticks = tokio::time::interval(QUEUE_SAMPLE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        shared.count_slots(shared.busy.load(Ordering::SeqCst));
        if !metrics.watched() {
            continue;
        }
        for queue in shared.config.fetched_queues() {
            match shared.broker.stats(&queue).await {
                Ok(stats) => metrics.queue_depth(&stats),
                Err(error) => tracing::warn!(queue, %error, "sampling a queue's depth failed"),
            }
        }
    }
}

/// Compiles the registered components of this worker's queues ahead of their first delivery:
/// at start, then within [`PREPARE_EVERY`] of each upload.
async fn prepare_components(shared: Arc<Shared>) {
    let mut ticks = tokio::time::interval(PREPARE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let queues = shared.config.fetched_queues();
        if let Err(error) = shared.components.prepare_registered(&queues).await {
            tracing::warn!(%error, "cannot list the registered components to prepare them");
        }
    }
}

/// Tells the result backend every few seconds that this worker is alive.
async fn heartbeats(shared: Arc<Shared>) {
    let mut ticks = tokio::time::interval(shared.config.heartbeat_interval);
    loop {
        ticks.tick().await;
        beat(&shared).await;
        shared
            .events
            .emit(|| shared.worker_event(EventKind::WorkerHeartbeat));
    }
}

/// Records one heartbeat. A draining worker lists no broadcasts, so no copy is sent to a
/// direct queue it no longer reads.
async fn beat(shared: &Shared) {
    let _beating = shared.beating.lock().await;
    let config = &shared.config;
    let broadcasts = match *shared.draining.borrow() {
        true => Vec::new(),
        false => config.broadcasts.clone(),
    };
    let heartbeat = WorkerHeartbeat {
        worker_id: config.worker_id.clone(),
        hostname: hostname(),
        pid: std::process::id(),
        queues: config.queues.clone(),
        broadcasts,
        concurrency: u32::try_from(shared.concurrency.load(Ordering::Relaxed)).unwrap_or(u32::MAX),
        in_flight: u32::try_from(shared.running().len()).unwrap_or(u32::MAX),
        processed: shared.processed.load(Ordering::Relaxed),
        started_at: shared.started_at,
        last_seen: Timestamp::now(),
    };
    if let Err(error) = shared
        .backend
        .heartbeat(&heartbeat, Some(config.heartbeat_ttl()))
        .await
    {
        tracing::warn!(%error, "recording the worker heartbeat failed");
    }
}

/// Purges the direct queues of workers that have no heartbeat: copies of broadcasts sent to a
/// worker that is gone (a worker that restarts gets a new id unless `--worker-id` is fixed).
async fn sweep_direct_queues(shared: Arc<Shared>) {
    // After a heartbeat's lifetime, so peers restarting together have announced themselves.
    tokio::time::sleep(shared.config.heartbeat_ttl()).await;
    let (queues, workers) = match tokio::try_join!(shared.broker.queues(), shared.backend.workers())
    {
        Ok(found) => found,
        Err(error) => {
            tracing::warn!(%error, "looking for the direct queues of gone workers failed");
            return;
        }
    };
    let mine = direct_queue(&shared.config.worker_id);
    let alive: std::collections::HashSet<String> = workers
        .iter()
        .map(|worker| direct_queue(&worker.worker_id))
        .collect();
    for queue in queues {
        if !has_direct_queue_shape(&queue) || queue == mine || alive.contains(&queue) {
            continue;
        }
        match shared.broker.purge(&queue).await {
            Ok(0) => {}
            Ok(purged) => {
                tracing::info!(
                    queue,
                    purged,
                    "purged broadcast copies of a worker that is gone"
                )
            }
            Err(error) => tracing::warn!(queue, %error, "purging a gone worker's queue failed"),
        }
    }
}

/// Passes new revocations on to the runs they name, for any push that did not arrive.
async fn revocations(shared: Arc<Shared>) {
    // Looks back a little further than one interval, so a revocation written just before the
    // previous poll, or by a host whose clock is slightly behind, is not missed.
    let look_back = shared.config.revoke_poll_interval + Duration::from_secs(5);
    let mut ticks = tokio::time::interval(shared.config.revoke_poll_interval);
    loop {
        ticks.tick().await;
        if shared.running().is_empty() {
            continue;
        }
        let since = Timestamp::from_millis(
            Timestamp::now()
                .as_millis()
                .saturating_sub(u64::try_from(look_back.as_millis()).unwrap_or(u64::MAX)),
        );
        match shared.revokes.list_since(since).await {
            Ok(revocations) => {
                for terminate in [false, true] {
                    let ids = revocations
                        .iter()
                        .filter(|revocation| revocation.terminate == terminate)
                        .map(|revocation| revocation.task_id.as_str());
                    shared.apply_revocations(ids, terminate);
                }
            }
            Err(error) => tracing::warn!(%error, "polling the revoke store failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_queues_are_distinct_valid_and_recognised() {
        let a = direct_queue("host:1");
        let b = direct_queue("host-1");
        assert_ne!(a, b, "ids that read alike still get their own queue");
        let long = direct_queue(&"x".repeat(200));
        for queue in [&a, &b, &long] {
            assert!(crate::envelope::is_valid_queue_name(queue), "{queue}");
            assert!(has_direct_queue_shape(queue), "{queue}");
            assert!(is_direct_queue(queue));
        }
        assert!(!has_direct_queue_shape("worker.emails"), "a user's queue");
        assert!(!has_direct_queue_shape("worker.node-a-1"), "no digest");
    }
}
