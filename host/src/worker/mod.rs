//! The worker: takes deliveries from the broker and runs them in the sandbox.
//!
//! One [`Worker`] per process, running up to `concurrency` tasks at once. For each delivery it
//! records `received`, then `started`, then how the run ended (`succeeded`, `retrying`,
//! `failed`, `revoked`), and writes that state before it acks. While a task runs its lease is
//! extended, so a long task is not delivered twice; revocations are polled and reach running
//! tasks within [`WorkerConfig::revoke_poll_interval`].
//!
//! On shutdown the worker stops fetching and gives running tasks
//! [`WorkerConfig::shutdown_grace`] to finish; what is still running then is stopped and
//! returned to the queue. Nothing is lost: a delivery is acked only after its outcome is
//! recorded (a retry published, a failure dead-lettered), and anything unacked comes back
//! when its lease runs out.

mod execute;
mod hooks;
pub mod retry;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::backend::{ResultBackend, WorkerHeartbeat};
use crate::broker::{Broker, ConsumeOptions};
use crate::client::Client;
use crate::codec::Codecs;
use crate::components::ComponentSource;
use crate::runtime::{RunHandle, Runtime};
use crate::stores::rate_limit::RateLimiter;
use crate::stores::registry::ComponentRegistry;
use crate::stores::revoke::RevokeStore;
use crate::time::Timestamp;

/// How a worker runs.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Unique per worker process; shows in heartbeats and task statuses.
    pub worker_id: String,
    pub queues: Vec<String>,
    /// Tasks run at once.
    pub concurrency: usize,
    /// Lease of each delivery; renewed every third of it while the task runs.
    pub lease: Duration,
    /// How long one fetch waits for work before looking at shutdown again.
    pub fetch_wait: Duration,
    pub heartbeat_interval: Duration,
    pub revoke_poll_interval: Duration,
    /// How long running tasks may take to finish after shutdown begins.
    pub shutdown_grace: Duration,
}

impl Default for WorkerConfig {
    fn default() -> WorkerConfig {
        WorkerConfig {
            worker_id: default_worker_id(),
            queues: vec![crate::envelope::DEFAULT_QUEUE.to_owned()],
            concurrency: 8,
            lease: crate::broker::DEFAULT_VISIBILITY_TIMEOUT,
            fetch_wait: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(5),
            revoke_poll_interval: Duration::from_millis(250),
            shutdown_grace: Duration::from_secs(30),
        }
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
    pub revokes: Arc<dyn RevokeStore>,
    pub rate_limiter: Arc<dyn RateLimiter>,
    pub registry: Arc<dyn ComponentRegistry>,
    pub runtime: Arc<Runtime>,
    pub codecs: Codecs,
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
    codecs: Codecs,
    /// Runs in progress, by task id, so revocations and shutdown can reach them.
    running: Mutex<HashMap<String, RunHandle>>,
    /// Set when the shutdown grace ran out: stopped runs go back to the queue.
    stopping: AtomicBool,
    processed: AtomicU64,
    returned: AtomicU64,
    started_at: Timestamp,
}

impl Shared {
    fn running(&self) -> MutexGuard<'_, HashMap<String, RunHandle>> {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Worker {
    pub fn new(parts: WorkerParts, config: WorkerConfig) -> Worker {
        let client = Client::new(
            parts.broker.clone(),
            parts.registry.clone(),
            parts.codecs.clone(),
        );
        Worker {
            shared: Arc::new(Shared {
                components: ComponentSource::new(parts.registry, parts.runtime),
                broker: parts.broker,
                backend: parts.backend,
                revokes: parts.revokes,
                rate_limiter: parts.rate_limiter,
                codecs: parts.codecs,
                client,
                config,
                running: Mutex::default(),
                stopping: AtomicBool::new(false),
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
        ];
        let permits = Arc::new(Semaphore::new(config.concurrency.max(1)));
        let mut runs = JoinSet::new();
        tokio::pin!(shutdown);
        tracing::info!(worker = config.worker_id, queues = ?config.queues, concurrency = config.concurrency, "worker started");
        loop {
            let first = tokio::select! {
                permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                () = &mut shutdown => break,
            };
            let options = ConsumeOptions {
                max: 1 + permits.available_permits(),
                lease: Some(config.lease),
                wait: config.fetch_wait,
            };
            let fetched = tokio::select! {
                fetched = shared.broker.consume(&config.queues, &options) => fetched,
                () = &mut shutdown => break,
            };
            let deliveries = match fetched {
                Ok(deliveries) => deliveries,
                Err(error) => {
                    tracing::error!(%error, "fetching from the broker failed; retrying in 1s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let mut first = Some(first);
            for delivery in deliveries {
                let permit = match first.take() {
                    Some(permit) => permit,
                    None => permits
                        .clone()
                        .try_acquire_owned()
                        .expect("fetched no more than the free permits"),
                };
                let shared = shared.clone();
                runs.spawn(async move {
                    execute::process(&shared, delivery).await;
                    drop(permit);
                });
            }
            while let Some(finished) = runs.try_join_next() {
                log_panic(finished);
            }
        }

        tracing::info!(in_flight = runs.len(), "shutting down: no more fetching");
        let drained = tokio::time::timeout(config.shutdown_grace, async {
            while let Some(finished) = runs.join_next().await {
                log_panic(finished);
            }
        })
        .await;
        if drained.is_err() {
            shared.stopping.store(true, Ordering::SeqCst);
            for handle in shared.running().values() {
                handle.terminate();
            }
            while let Some(finished) = runs.join_next().await {
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

fn log_panic(finished: Result<(), tokio::task::JoinError>) {
    if let Err(error) = finished {
        tracing::error!(%error, "processing a delivery panicked");
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
                    if let Some(handle) = running.get(&revocation.task_id) {
                        if revocation.terminate {
                            handle.terminate();
                        } else {
                            handle.revoke();
                        }
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "polling the revoke store failed"),
        }
    }
}
