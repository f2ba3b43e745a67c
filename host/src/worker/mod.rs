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
//! [`WorkerConfig::started_after`]; the terminal status always. Revocations are polled and
//! reach running tasks within [`WorkerConfig::revoke_poll_interval`].
//!
//! On shutdown the worker stops fetching (a fetch under way is finished and what it took is
//! given back), gives back the deliveries still waiting for a slot, gives running tasks [`WorkerConfig::shutdown_grace`] to finish, then stops the
//! rest and gives them back. Nothing is lost: an entry leaves the broker only once its outcome
//! is recorded, and anything unsettled comes back when its lease runs out.

mod budget;
mod execute;
mod hooks;
pub mod retry;
mod settle;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;

pub use budget::Budgets;

use crate::backend::{ResultBackend, TaskStatus, WorkerHeartbeat};
use crate::broker::{Broker, ConsumeOptions, Delivery, Receipt, Settle};
use crate::canvas::Canvases;
use crate::client::Client;
use crate::codec::Codecs;
use crate::components::ComponentSource;
use crate::routing::Routing;
use crate::runtime::{RunHandle, Runtime};
use crate::settlement::SettlementStore;
use crate::storage::StorageError;
use crate::stores::rate_limit::RateLimiter;
use crate::stores::registry::ComponentRegistry;
use crate::stores::revoke::{Revocation, RevokeStore};
use crate::time::Timestamp;
use settle::Settler;

/// How a worker runs.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Unique per worker process; shows in heartbeats and task statuses.
    pub worker_id: String,
    pub queues: Vec<String>,
    /// Tasks run at once.
    pub concurrency: usize,
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
            prefetch_multiplier: DEFAULT_PREFETCH_MULTIPLIER,
            lease: crate::broker::DEFAULT_VISIBILITY_TIMEOUT,
            fetch_wait: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(5),
            revoke_poll_interval: Duration::from_millis(250),
            shutdown_grace: Duration::from_secs(30),
            started_after: Duration::from_millis(200),
            budgets: Budgets::default(),
        }
    }
}

/// How many deliveries a worker holds per run slot unless configured.
pub const DEFAULT_PREFETCH_MULTIPLIER: usize = 2;

impl WorkerConfig {
    /// Deliveries held at once: running, or fetched and waiting for a slot.
    fn held_capacity(&self) -> usize {
        self.concurrency.max(1) * self.prefetch_multiplier.max(1)
    }

    /// Free room that makes the fetch loop fetch again: half the concurrency, so a fetch
    /// brings a batch, but never more than the prefetch allows (without prefetch, one free slot
    /// is enough).
    fn fetch_threshold(&self) -> usize {
        let concurrency = self.concurrency.max(1);
        (concurrency / 2)
            .min(self.held_capacity() - concurrency)
            .max(1)
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
    /// Deliveries taken and not yet settled, by a key of their own (two deliveries of one
    /// task id can be here at once), so leases, revocations and shutdown reach each.
    running: Mutex<HashMap<u64, Running>>,
    next_run: AtomicU64,
    /// The run slots: a delivery runs once it holds one.
    slots: Arc<Semaphore>,
    /// Set when shutdown begins: deliveries still waiting for a slot go back to the queue.
    draining: watch::Sender<bool>,
    /// Set when the shutdown grace ran out: stopped runs go back to the queue.
    stopping: AtomicBool,
    processed: AtomicU64,
    returned: AtomicU64,
    started_at: Timestamp,
}

/// One delivery between being taken and being settled.
struct Running {
    task_id: String,
    receipt: Receipt,
    handle: RunHandle,
    /// Set when the lease was lost: the run is stopped and nothing of it is settled.
    lost: Arc<AtomicBool>,
    /// When the lease was last taken or extended.
    leased_at: Instant,
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
        let lease = self.shared.config.lease;
        match self.shared.broker.extend_lease(receipt, lease).await {
            Ok(_) => {
                if let Some(running) = self.shared.running().get_mut(&self.key) {
                    running.leased_at = Instant::now();
                }
                true
            }
            Err(StorageError::LeaseLost(_)) => {
                self.lost.store(true, Ordering::SeqCst);
                false
            }
            // The broker cannot say: record the outcome; its settle checks the lease again.
            Err(_) => true,
        }
    }
}

impl Drop for RunSlot {
    fn drop(&mut self) {
        self.shared.running().remove(&self.key);
    }
}

impl Shared {
    fn running(&self) -> MutexGuard<'_, HashMap<u64, Running>> {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a delivery as running from now on.
    fn register(self: &Arc<Self>, delivery: &Delivery) -> RunSlot {
        let key = self.next_run.fetch_add(1, Ordering::Relaxed);
        let handle = RunHandle::new();
        let lost = Arc::new(AtomicBool::new(false));
        if self.stopping.load(Ordering::SeqCst) {
            handle.terminate();
        }
        self.running().insert(
            key,
            Running {
                task_id: delivery.envelope.id.clone(),
                receipt: delivery.receipt.clone(),
                handle: handle.clone(),
                lost: lost.clone(),
                leased_at: Instant::now(),
            },
        );
        RunSlot {
            shared: self.clone(),
            key,
            handle,
            lost,
        }
    }
}

impl Worker {
    pub fn new(parts: WorkerParts, config: WorkerConfig) -> Worker {
        let client = Client::new(
            parts.broker.clone(),
            parts.registry.clone(),
            parts.codecs.clone(),
        )
        .with_max_args_bytes(config.budgets.subtask_args_bytes)
        .with_routing(parts.routing.clone());
        // What a canvas publishes next (results passed on) is held to the same bound.
        let canvas_client = Client::new(
            parts.broker.clone(),
            parts.registry.clone(),
            parts.codecs.clone(),
        )
        .with_max_args_bytes(config.budgets.subtask_args_bytes)
        .with_routing(parts.routing);
        let canvases = Arc::new(Canvases::new(
            canvas_client,
            parts.backend.clone(),
            parts.codecs.clone(),
        ));
        Worker {
            shared: Arc::new(Shared {
                components: ComponentSource::new(parts.registry, parts.runtime),
                settler: Settler::start(parts.settlements),
                broker: parts.broker,
                backend: parts.backend,
                revokes: parts.revokes,
                rate_limiter: parts.rate_limiter,
                codecs: parts.codecs,
                client,
                canvases,
                running: Mutex::default(),
                next_run: AtomicU64::new(0),
                slots: Arc::new(Semaphore::new(config.concurrency.max(1))),
                draining: watch::Sender::new(false),
                stopping: AtomicBool::new(false),
                config,
                processed: AtomicU64::new(0),
                returned: AtomicU64::new(0),
                started_at: Timestamp::now(),
            }),
        }
    }

    /// Runs until `shutdown` completes, then drains as described in the module documentation.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> WorkerSummary {
        let shared = &self.shared;
        let config = &shared.config;
        let background = [
            tokio::spawn(heartbeats(shared.clone())),
            tokio::spawn(revocations(shared.clone())),
            tokio::spawn(keep_leases(shared.clone())),
        ];
        // One permit per delivery held, running or waiting for a slot.
        let held = Arc::new(Semaphore::new(config.held_capacity()));
        let threshold = u32::try_from(config.fetch_threshold()).unwrap_or(u32::MAX);
        let mut batches = JoinSet::new();
        let mut queues = config.queues.clone();
        tokio::pin!(shutdown);
        tracing::info!(worker = config.worker_id, queues = ?config.queues, concurrency = config.concurrency, prefetch = config.held_capacity(), "worker started");
        loop {
            let mut room = tokio::select! {
                permits = held.clone().acquire_many_owned(threshold) => permits.expect("the semaphore is never closed"),
                () = &mut shutdown => break,
            };
            if let Ok(more) = held
                .clone()
                .try_acquire_many_owned(u32::try_from(held.available_permits()).unwrap_or(u32::MAX))
            {
                room.merge(more);
            }
            let options = ConsumeOptions {
                max: room.num_permits(),
                lease: Some(config.lease),
                wait: config.fetch_wait,
            };
            // Queues of one priority take turns being read first.
            queues.rotate_left(1);
            let consume = shared.broker.consume(&queues, &options);
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
        let drained = tokio::time::timeout(config.shutdown_grace, async {
            while let Some(finished) = batches.join_next().await {
                log_panic(finished);
            }
        })
        .await;
        if drained.is_err() {
            shared.stopping.store(true, Ordering::SeqCst);
            for running in shared.running().values() {
                running.handle.terminate();
            }
            while let Some(finished) = batches.join_next().await {
                log_panic(finished);
            }
        }
        for task in background {
            task.abort();
        }
        WorkerSummary {
            processed: shared.processed.load(Ordering::SeqCst),
            returned: shared.returned.load(Ordering::SeqCst),
        }
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

/// Waits for a run slot, then processes the delivery; a delivery still waiting when shutdown
/// begins goes back to the queue untouched.
async fn run_when_free(shared: Arc<Shared>, taken: Taken, recorded: Recorded) {
    let Taken {
        slot,
        delivery,
        held,
    } = taken;
    let mut draining = shared.draining.subscribe();
    let running = tokio::select! {
        biased;
        _ = draining.wait_for(|draining| *draining) => None,
        permit = shared.slots.clone().acquire_owned() => Some(permit.expect("the semaphore is never closed")),
    };
    match running {
        Some(permit) => {
            execute::process(&shared, slot, delivery, recorded).await;
            drop(permit);
        }
        None => execute::give_back(&shared, slot, delivery).await,
    }
    drop(held);
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
                Ok(_) => entry.leased_at = Instant::now(),
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

/// Tells the result backend every few seconds that this worker is alive.
async fn heartbeats(shared: Arc<Shared>) {
    let config = &shared.config;
    let mut ticks = tokio::time::interval(config.heartbeat_interval);
    loop {
        ticks.tick().await;
        let heartbeat = WorkerHeartbeat {
            worker_id: config.worker_id.clone(),
            hostname: hostname(),
            pid: std::process::id(),
            queues: config.queues.clone(),
            concurrency: u32::try_from(config.concurrency).unwrap_or(u32::MAX),
            in_flight: u32::try_from(shared.running().len()).unwrap_or(u32::MAX),
            processed: shared.processed.load(Ordering::Relaxed),
            started_at: shared.started_at,
            last_seen: Timestamp::now(),
        };
        let ttl = config.heartbeat_interval * 3;
        if let Err(error) = shared.backend.heartbeat(&heartbeat, Some(ttl)).await {
            tracing::warn!(%error, "recording the worker heartbeat failed");
        }
    }
}

/// Passes new revocations on to the runs they name.
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
                let running = shared.running();
                for revocation in revocations {
                    for run in running.values().filter(|r| r.task_id == revocation.task_id) {
                        if revocation.terminate {
                            run.handle.terminate();
                        } else {
                            run.handle.revoke();
                        }
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "polling the revoke store failed"),
        }
    }
}
