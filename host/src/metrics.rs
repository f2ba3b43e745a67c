//! Prometheus metrics of a worker process, served as OpenMetrics text at `/metrics`.
//!
//! Off unless asked for (`worker start --metrics-addr ADDR`, or `STEM_METRIC_EXPORTERS`
//! naming `prometheus`): a worker without them does no bookkeeping at all. The seeds' names,
//! in Prometheus form (dots become underscores, counters end in `_total`):
//!
//! | metric | kind | labels | what |
//! | --- | --- | --- | --- |
//! | `stem_tasks_started_total` | counter | task, queue | runs begun (instantiation included) |
//! | `stem_tasks_succeeded_total` | counter | task, queue | results recorded |
//! | `stem_tasks_failed_total` | counter | task, queue | recorded failed for good |
//! | `stem_tasks_retried_total` | counter | task, queue | next attempts stored |
//! | `stem_tasks_revoked_total` | counter | task, queue | revoked, expired or stopped |
//! | `stem_task_duration_seconds` | histogram | task | a run in the sandbox, start to end |
//! | `stem_sandbox_instantiate_seconds` | histogram | task | creating a run's instance |
//! | `stem_task_memory_bytes` | histogram | task | linear memory a run held at its end (its peak: wasm memories never shrink) |
//! | `stem_worker_concurrency` | gauge | | run slots |
//! | `stem_worker_inflight` | gauge | | runs holding a slot |
//! | `stem_queue_depth` | gauge | queue, state | `ready`, `delayed`, `in_flight`, `dead` entries, sampled from the broker every [`QUEUE_SAMPLE_EVERY`] while scraped |
//! | `stem_lease_renewed_total` | counter | | lease extensions |
//!
//! Label values stay few whatever producers send: `queue` is one the worker consumes, and
//! `task` the name of a task the worker resolved in the registry; any other name is counted as
//! `unknown`, so enqueueing made-up names cannot grow the series without end.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::broker::QueueStats;
use crate::control::events::EventKind;
use crate::http_server::ServerLimits;
use crate::runtime::RunMeasures;
use crate::sync::lock;

/// How often the queue depths are read from the broker.
pub const QUEUE_SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// How long one connection to `/metrics` may stay open.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections to `/metrics` served at once; more are dropped.
const MAX_CONNECTIONS: usize = 16;

/// Of those, how many one peer address may hold.
const MAX_CONNECTIONS_PER_PEER: usize = 4;

/// How long a request head may take to arrive, or a kept-alive connection may sit idle.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Queue depths are sampled only while someone scraped within this long: an unwatched worker
/// costs its broker nothing.
pub const SAMPLE_WHILE_SCRAPED: Duration = Duration::from_secs(60);

/// The `task` label of names the worker did not resolve.
pub const UNKNOWN_TASK: &str = "unknown";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskQueue {
    task: String,
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskName {
    task: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueState {
    queue: String,
    state: &'static str,
}

type Histograms = Family<TaskName, Histogram, fn() -> Histogram>;

fn seconds() -> Histogram {
    // 50 µs to about 27 min.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 25))
}

fn bytes() -> Histogram {
    // 64 KiB (one wasm page) to 32 GiB.
    Histogram::new(exponential_buckets(65_536.0, 2.0, 20))
}

/// One worker process's metrics.
pub struct Metrics {
    registry: Registry,
    started: Family<TaskQueue, Counter>,
    succeeded: Family<TaskQueue, Counter>,
    failed: Family<TaskQueue, Counter>,
    retried: Family<TaskQueue, Counter>,
    revoked: Family<TaskQueue, Counter>,
    duration: Histograms,
    instantiate: Histograms,
    memory: Histograms,
    concurrency: Gauge,
    inflight: Gauge,
    queue_depth: Family<QueueState, Gauge>,
    lease_renewed: Counter,
    /// When `/metrics` was last read.
    scraped: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut metrics = Metrics {
            registry: Registry::default(),
            started: Family::default(),
            succeeded: Family::default(),
            failed: Family::default(),
            retried: Family::default(),
            revoked: Family::default(),
            duration: Family::new_with_constructor(seconds),
            instantiate: Family::new_with_constructor(seconds),
            memory: Family::new_with_constructor(bytes),
            concurrency: Gauge::default(),
            inflight: Gauge::default(),
            queue_depth: Family::default(),
            lease_renewed: Counter::default(),
            scraped: std::sync::Mutex::default(),
        };
        let registry = &mut metrics.registry;
        for (name, help, family) in [
            (
                "stem_tasks_started",
                "Runs begun in the sandbox",
                &metrics.started,
            ),
            (
                "stem_tasks_succeeded",
                "Results recorded",
                &metrics.succeeded,
            ),
            (
                "stem_tasks_failed",
                "Tasks failed for good",
                &metrics.failed,
            ),
            (
                "stem_tasks_retried",
                "Next attempts stored",
                &metrics.retried,
            ),
            (
                "stem_tasks_revoked",
                "Tasks revoked, expired or stopped",
                &metrics.revoked,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        for (name, help, family) in [
            (
                "stem_task_duration_seconds",
                "A run in the sandbox, start to end",
                &metrics.duration,
            ),
            (
                "stem_sandbox_instantiate_seconds",
                "Creating a run's instance",
                &metrics.instantiate,
            ),
            (
                "stem_task_memory_bytes",
                "Linear memory a run held at its end",
                &metrics.memory,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        for (name, help, gauge) in [
            ("stem_worker_concurrency", "Run slots", &metrics.concurrency),
            (
                "stem_worker_inflight",
                "Runs holding a slot",
                &metrics.inflight,
            ),
        ] {
            registry.register(name, help, gauge.clone());
        }
        registry.register(
            "stem_queue_depth",
            "Entries of a queue by state, sampled from the broker",
            metrics.queue_depth.clone(),
        );
        registry.register(
            "stem_lease_renewed",
            "Lease extensions",
            metrics.lease_renewed.clone(),
        );
        metrics
    }
}

impl Metrics {
    pub fn started(&self, task: &str, queue: &str) {
        self.started.get_or_create(&task_queue(task, queue)).inc();
    }

    /// Counts the outcome event of a settled delivery; other events count nothing here.
    pub fn ended(&self, event: EventKind, task: &str, queue: &str) {
        let family = match event {
            EventKind::TaskSucceeded => &self.succeeded,
            EventKind::TaskFailed => &self.failed,
            EventKind::TaskRetried => &self.retried,
            EventKind::TaskRevoked => &self.revoked,
            _ => return,
        };
        family.get_or_create(&task_queue(task, queue)).inc();
    }

    /// What one run measured: its time in the sandbox, the instantiation within it, and the
    /// memory it held.
    pub fn ran(&self, task: &str, took: Duration, run: &RunMeasures) {
        let name = TaskName {
            task: task.to_owned(),
        };
        self.duration
            .get_or_create(&name)
            .observe(took.as_secs_f64());
        // A run that never got an instance held no memory worth counting.
        if let Some(instantiate) = run.instantiate {
            self.instantiate
                .get_or_create(&name)
                .observe(instantiate.as_secs_f64());
            self.memory
                .get_or_create(&name)
                .observe(run.memory_bytes as f64);
        }
    }

    pub fn slots(&self, concurrency: usize, busy: usize) {
        self.concurrency
            .set(i64::try_from(concurrency).unwrap_or(i64::MAX));
        self.inflight.set(i64::try_from(busy).unwrap_or(i64::MAX));
    }

    pub fn lease_renewed(&self) {
        self.lease_renewed.inc();
    }

    pub fn queue_depth(&self, stats: &QueueStats) {
        for (state, value) in [
            ("ready", stats.ready),
            ("delayed", stats.delayed),
            ("in_flight", stats.in_flight),
            ("dead", stats.dead),
        ] {
            let labels = QueueState {
                queue: stats.queue.clone(),
                state,
            };
            self.queue_depth
                .get_or_create(&labels)
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        }
    }

    /// Whether anyone read the metrics within [`SAMPLE_WHILE_SCRAPED`].
    pub fn watched(&self) -> bool {
        lock(&self.scraped).is_some_and(|at| at.elapsed() < SAMPLE_WHILE_SCRAPED)
    }

    /// The metrics as OpenMetrics text, for a scrape.
    pub fn encode(&self) -> String {
        *lock(&self.scraped) = Some(std::time::Instant::now());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

fn task_queue(task: &str, queue: &str) -> TaskQueue {
    TaskQueue {
        task: task.to_owned(),
        queue: queue.to_owned(),
    }
}

/// Serves `GET /metrics` on `listener` until the task is aborted; anything else gets 404.
/// At most [`MAX_CONNECTIONS`] are served at once ([`MAX_CONNECTIONS_PER_PEER`] from one
/// address), each for at most [`CONNECTION_TIMEOUT`], idle for at most [`HEADER_TIMEOUT`]:
/// whoever can reach the port must not run the worker out of file descriptors, nor lock out
/// the scraper.
pub fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> tokio::task::JoinHandle<()> {
    let limits = ServerLimits {
        connections: MAX_CONNECTIONS,
        per_peer: MAX_CONNECTIONS_PER_PEER,
        connection_time: CONNECTION_TIMEOUT,
        header_time: HEADER_TIMEOUT,
        buffer_bytes: 8192,
    };
    crate::http_server::serve(listener, "metrics", limits, move |request| {
        let response = respond(&metrics, &request);
        async move { response }
    })
}

fn respond<B>(metrics: &Metrics, request: &hyper::Request<B>) -> hyper::Response<Full<Bytes>> {
    let found = request.method() == hyper::Method::GET && request.uri().path() == "/metrics";
    let (status, content_type, body) = if found {
        (
            hyper::StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        )
    } else {
        (
            hyper::StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "only GET /metrics is served here\n".to_owned(),
        )
    };
    hyper::Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a response of fixed parts")
}
