//! `stem-host worker`: run a worker (`start`), list workers, and control running ones over
//! the broker (`ping`, `stats`, `inspect`, `shutdown`, `pause`, `resume`).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::capabilities::{OutboundLimits, SecretStore};
use crate::signing::TrustedKeys;
use clap::{Args, Subcommand};

use super::Connections;
use super::units::{parse_duration, parse_size};
use crate::codec::Codecs;
use crate::envelope::{MAX_QUEUE_NAME_LEN, is_valid_queue_name};
use crate::metrics::Metrics;
use crate::worker::{
    Autoscale, Budgets, DEFAULT_PREFETCH_MULTIPLIER, ShutdownHandle, ShutdownMode, Worker,
    WorkerConfig, WorkerParts, default_worker_id,
};

pub(super) mod control;

#[derive(Subcommand)]
pub enum WorkerCommand {
    /// Start a worker in the foreground.
    ///
    /// Signals stop it as the shutdown modes say: SIGTERM warm (running tasks finish),
    /// SIGINT / Ctrl-C soft (they get --shutdown-grace), SIGQUIT hard (they are stopped at
    /// once). Every mode stops fetching first and returns what was not run to the queue; a
    /// second SIGTERM or SIGINT makes the shutdown hard.
    Start(Box<StartArgs>),
    /// List the workers alive now, from their heartbeats in the result backend.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Ask running workers to answer, and show how long each took.
    Ping(control::Target),
    /// Each worker's counters: concurrency, running, processed, paused queues, uptime.
    Stats(control::Target),
    /// What workers hold: running tasks, the tasks they can run, recent revocations.
    Inspect(control::InspectArgs),
    /// Stop workers: warm (running tasks finish), soft (within their grace) or hard.
    Shutdown(control::ShutdownArgs),
    /// Stop fetching from a queue (running tasks go on) until resumed.
    Pause(control::QueueArgs),
    /// Fetch from a paused queue again.
    Resume(control::QueueArgs),
    /// Make workers send task and worker events (`stem-host events` shows them).
    EnableEvents(control::Target),
    /// Make workers stop sending events.
    DisableEvents(control::Target),
}

#[derive(Args)]
pub struct StartArgs {
    /// Queues to consume, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "default")]
    queues: Vec<String>,
    /// Tasks run at once.
    #[arg(long, short = 'c', default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024), conflicts_with = "autoscale")]
    concurrency: u32,
    /// Grow and shrink the tasks run at once between MIN and MAX (at most 1024) with the
    /// backlog, starting at MIN.
    #[arg(long, value_parser = parse_autoscale, value_name = "MIN:MAX")]
    autoscale: Option<Autoscale>,
    /// Least time between two steps up when autoscaling.
    #[arg(long, value_parser = parse_duration, default_value = "1s", value_name = "DURATION", requires = "autoscale")]
    autoscale_cooldown: Duration,
    /// How long run slots stay unused before autoscaling takes them away.
    #[arg(long, value_parser = parse_duration, default_value = "30s", value_name = "DURATION", requires = "autoscale")]
    autoscale_idle: Duration,
    /// Deliveries held per run slot: the worker fetches up to concurrency × this, so the next
    /// tasks are at hand when a slot frees. A delivery that waits over a second for a slot is
    /// given back for an idle worker, so a long task never holds short ones hostage.
    #[arg(long, env = "STEM_PREFETCH_MULTIPLIER", default_value_t = DEFAULT_PREFETCH_MULTIPLIER as u32, value_parser = clap::value_parser!(u32).range(1..=64), value_name = "N")]
    prefetch_multiplier: u32,
    /// Let one instance serve up to N runs of the same task (0: a fresh instance per run, the
    /// default). Saves the instantiation (a millisecond or more for Python and JavaScript) at
    /// the cost of isolation: a run sees what earlier runs of its task left in memory. Runs
    /// with capabilities granted always get a fresh instance.
    #[arg(
        long,
        env = "STEM_WORKER_WARM_RUNS",
        default_value_t = 0,
        value_name = "N"
    )]
    warm_runs: u32,
    /// Broadcasts whose tasks this worker runs (`enqueue broadcast://NAME`), comma-separated.
    #[arg(
        long,
        env = "STEM_WORKER_BROADCASTS",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    broadcasts: Vec<String>,
    /// Send task and worker events from the start (`stem-host events` shows them; `worker
    /// enable-events` turns them on later). Off by default, as in Celery: they cost a busy
    /// worker about an eighth of its throughput.
    #[arg(long, short = 'E', env = "STEM_WORKER_EVENTS")]
    events: bool,
    /// This worker's name in heartbeats and statuses [default: HOSTNAME:PID].
    #[arg(long)]
    worker_id: Option<String>,
    /// Lease of each delivery (at least 100ms); extended while the task runs. Redelivery after
    /// a crash takes this long.
    #[arg(long, value_parser = parse_lease, default_value = "30s", value_name = "DURATION")]
    lease: Duration,
    /// How long running tasks may take to finish in a soft shutdown (SIGINT).
    #[arg(long, value_parser = parse_duration, default_value = "30s", value_name = "DURATION")]
    shutdown_grace: Duration,
    /// Record `started` for runs still going after this long; 0s records every start (extra
    /// writes). Terminal states are always recorded.
    #[arg(long, value_parser = parse_duration, default_value = "200ms", value_name = "DURATION")]
    started_after: Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics (the README lists them); port 0 picks
    /// a free one, printed at start. STEM_METRIC_EXPORTERS=prometheus serves them at
    /// 127.0.0.1:9464 unless this says where.
    #[arg(long, env = "STEM_METRICS_ADDR", value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
    #[command(flatten)]
    budgets: BudgetArgs,
    #[command(flatten)]
    capabilities: CapabilityArgs,
}

/// Where Prometheus metrics go: `--metrics-addr`, else the default address when
/// `STEM_METRIC_EXPORTERS` (a comma-separated list, as in the seeds) names `prometheus`.
fn metrics_addr(flag: Option<SocketAddr>, exporters: Option<&str>) -> Option<SocketAddr> {
    let mut prometheus = false;
    for exporter in exporters.unwrap_or_default().split(',').map(str::trim) {
        match exporter {
            "" => {}
            "prometheus" => prometheus = true,
            // An environment shared with other Stem tools may name more; they are not a
            // reason to refuse to start.
            other => eprintln!(
                "warning: STEM_METRIC_EXPORTERS names `{other}`, which this worker does not export (only `prometheus`)"
            ),
        }
    }
    flag.or(prometheus.then(|| SocketAddr::from(([127, 0, 0, 1], 9464))))
}

/// What granted tasks reach, and which components this worker runs at all.
#[derive(Args)]
#[command(next_help_heading = "Capabilities (see the README's Capabilities section)")]
struct CapabilityArgs {
    /// Where granted secrets are read from: the file NAME in this directory, when
    /// STEM_SECRET_NAME is not set in the worker's environment.
    #[arg(long, env = "STEM_SECRETS_DIR", value_name = "DIR")]
    secrets_dir: Option<PathBuf>,
    /// Outbound HTTP requests one run may have in flight at once.
    #[arg(long, env = "STEM_WORKER_MAX_HTTP_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024), value_name = "N")]
    max_http_concurrency: u32,
    /// Largest response body one outbound request may receive; a larger one fails the request.
    #[arg(long, env = "STEM_WORKER_MAX_HTTP_RESPONSE", value_parser = parse_size, default_value = "16MiB", value_name = "SIZE")]
    max_http_response: u64,
    /// Run only components signed by one of these Ed25519 public keys (`ID:BASE64` per line;
    /// `signing keygen --algorithm ed25519 --out DIR` writes them). Others go to the
    /// dead-letter queue as `component-untrusted`.
    #[arg(long, env = "STEM_TRUSTED_KEYS", value_name = "FILE")]
    trusted_keys: Option<PathBuf>,
}

/// Ceilings a task's declared options may lower but never raise.
#[derive(Args)]
#[command(next_help_heading = "Budgets (what one task may use, whatever it declares)")]
struct BudgetArgs {
    /// Linear memory of one run.
    #[arg(long, env = "STEM_WORKER_MAX_MEMORY", value_parser = parse_size, default_value = "256MiB", value_name = "SIZE")]
    max_memory: u64,
    /// Linear memory of all running tasks together; a task that would pass it fails (and is
    /// retried).
    #[arg(long, env = "STEM_WORKER_MEMORY_TOTAL", value_parser = parse_size, default_value = "4GiB", value_name = "SIZE")]
    memory_total: u64,
    /// Longest hard time limit a task may declare or an enqueue may ask for.
    #[arg(long, env = "STEM_WORKER_MAX_TIME_LIMIT", value_parser = parse_duration, default_value = "1h", value_name = "DURATION")]
    max_time_limit: Duration,
    /// Log and progress bytes one run may write; the rest is dropped and counted.
    #[arg(long, env = "STEM_WORKER_MAX_LOG_BYTES", value_parser = parse_size, default_value = "1MiB", value_name = "SIZE")]
    max_log_bytes: u64,
    /// Log and progress lines one run may write.
    #[arg(
        long,
        env = "STEM_WORKER_MAX_LOG_LINES",
        default_value_t = 10_000,
        value_name = "N"
    )]
    max_log_lines: u64,
    /// Sub-tasks one run may enqueue.
    #[arg(
        long,
        env = "STEM_WORKER_MAX_SUBTASKS",
        default_value_t = 100,
        value_name = "N"
    )]
    max_subtasks: u32,
    /// How deep sub-tasks may nest below the task a producer enqueued.
    #[arg(
        long,
        env = "STEM_WORKER_MAX_DEPTH",
        default_value_t = 8,
        value_name = "N"
    )]
    max_depth: u32,
    /// Largest result a task may return; a larger one fails the task.
    #[arg(long, env = "STEM_WORKER_MAX_RESULT_SIZE", value_parser = parse_size, default_value = "16MiB", value_name = "SIZE")]
    max_result_size: u64,
    /// Longest error message kept in a status; the rest is cut.
    #[arg(long, env = "STEM_WORKER_MAX_ERROR_SIZE", value_parser = parse_size, default_value = "64KiB", value_name = "SIZE")]
    max_error_size: u64,
    /// Deliveries of one attempt that end without finishing (the worker died or lost the
    /// lease) before the task goes to the dead-letter queue.
    #[arg(long, env = "STEM_WORKER_MAX_DELIVERIES", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..), value_name = "N")]
    max_deliveries: u32,
    /// Most retries a task may declare or an enqueue may ask for.
    #[arg(
        long,
        env = "STEM_WORKER_MAX_TASK_RETRIES",
        default_value_t = 100,
        value_name = "N"
    )]
    max_task_retries: u32,
    /// Longest wait a guest may ask for before its retry or a sub-task's start.
    #[arg(long, env = "STEM_WORKER_MAX_DELAY", value_parser = parse_duration, default_value = "7d", value_name = "DURATION")]
    max_delay: Duration,
}

impl BudgetArgs {
    fn budgets(&self, subtask_args_bytes: usize) -> Budgets {
        Budgets {
            memory_per_run: self.max_memory,
            memory_total: self.memory_total,
            max_time_limit: self.max_time_limit,
            log_bytes: self.max_log_bytes,
            log_lines: self.max_log_lines,
            subtasks_per_run: self.max_subtasks,
            subtask_args_bytes,
            subtask_depth: self.max_depth,
            result_bytes: self.max_result_size,
            error_bytes: usize::try_from(self.max_error_size).unwrap_or(usize::MAX),
            max_deliveries: self.max_deliveries,
            max_retries: self.max_task_retries,
            max_delay: self.max_delay,
        }
    }
}

fn parse_autoscale(text: &str) -> Result<Autoscale, String> {
    let autoscale = Autoscale::parse(text)?;
    if autoscale.max > 1024 {
        return Err(format!("autoscale `{text}`: MAX is at most 1024"));
    }
    Ok(autoscale)
}

fn parse_lease(text: &str) -> Result<Duration, String> {
    let lease = parse_duration(text)?;
    if lease < Duration::from_millis(100) {
        return Err(format!(
            "a lease of {text} is too short: use at least 100ms"
        ));
    }
    Ok(lease)
}

pub async fn run(command: WorkerCommand, connections: &Connections) -> anyhow::Result<ExitCode> {
    match command {
        WorkerCommand::Start(args) => start(*args, connections).await,
        WorkerCommand::List { json } => list(json, connections).await,
        WorkerCommand::Ping(target) => control::ping(target, connections).await,
        WorkerCommand::Stats(target) => control::stats(target, connections).await,
        WorkerCommand::Inspect(args) => control::inspect(args, connections).await,
        WorkerCommand::Shutdown(args) => control::shutdown(args, connections).await,
        WorkerCommand::Pause(args) => control::pause(args, true, connections).await,
        WorkerCommand::Resume(args) => control::pause(args, false, connections).await,
        WorkerCommand::EnableEvents(target) => control::events(target, true, connections).await,
        WorkerCommand::DisableEvents(target) => control::events(target, false, connections).await,
    }
}

async fn list(json: bool, connections: &Connections) -> anyhow::Result<ExitCode> {
    let workers = connections.backend().await?.workers().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&workers)?);
    } else if workers.is_empty() {
        eprintln!("no worker has sent a heartbeat recently");
    } else {
        println!(
            "{:<28}  {:<24}  {:>9}  {:>9}  {:<24}  LAST SEEN",
            "WORKER", "QUEUES", "RUNNING", "PROCESSED", "STARTED"
        );
        for worker in &workers {
            println!(
                "{:<28}  {:<24}  {:>4}/{:<4}  {:>9}  {:<24}  {}",
                worker.worker_id,
                worker.queues.join(","),
                worker.in_flight,
                worker.concurrency,
                worker.processed,
                worker.started_at.to_string(),
                worker.last_seen
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn start(args: StartArgs, connections: &Connections) -> anyhow::Result<ExitCode> {
    let autoscale = args.autoscale.map(|autoscale| Autoscale {
        up_cooldown: args.autoscale_cooldown,
        idle: args.autoscale_idle,
        ..autoscale
    });
    let concurrency = autoscale.map_or(args.concurrency as usize, |autoscale| autoscale.min);
    let max_concurrency = autoscale.map_or(concurrency, |autoscale| autoscale.max);
    let worker_id = args.worker_id.clone().unwrap_or_else(default_worker_id);
    if worker_id.is_empty() || worker_id.len() > 200 || worker_id.chars().any(char::is_control) {
        bail!(
            "invalid worker id `{worker_id}`: use 1 to 200 characters, none of them control characters"
        );
    }
    for broadcast in &args.broadcasts {
        if broadcast.is_empty() || broadcast.contains(char::is_whitespace) {
            bail!("invalid broadcast name `{broadcast}`");
        }
    }
    for queue in &args.queues {
        if crate::worker::is_direct_queue(queue) {
            bail!("queue `{queue}` is reserved: each worker reads its own direct queue");
        }
        if !is_valid_queue_name(queue) {
            bail!(
                "invalid queue name `{queue}`: use 1 to {MAX_QUEUE_NAME_LEN} letters, digits, \
                 `.`, `_` and `-`"
            );
        }
    }
    let budgets = args.budgets.budgets(connections.max_args_bytes());
    let trusted_keys = match &args.capabilities.trusted_keys {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --trusted-keys {}", path.display()))?;
            Some(TrustedKeys::parse(&text).with_context(|| {
                format!(
                    "--trusted-keys {} is not a list of public keys",
                    path.display()
                )
            })?)
        }
        None => None,
    };
    let exporters = std::env::var("STEM_METRIC_EXPORTERS").ok();
    let metrics = match metrics_addr(args.metrics_addr, exporters.as_deref()) {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot serve metrics on {addr}"))?;
            let metrics = Arc::new(Metrics::default());
            eprintln!(
                "worker metrics at http://{}/metrics",
                listener.local_addr()?
            );
            crate::metrics::serve(listener, metrics.clone());
            Some(metrics)
        }
        None => None,
    };
    let broker = connections.broker().await?;
    let backend = connections.backend().await?;
    let parts = WorkerParts {
        settlements: connections.settlements(&broker, &backend).await?,
        broker,
        backend,
        revokes: connections.revokes().await?,
        rate_limiter: connections.rate_limiter().await?,
        registry: connections.registry().await?,
        runtime: connections.sandbox(|config| {
            config.max_instances = u32::try_from(max_concurrency + 1).unwrap_or(u32::MAX);
            config.max_memory_bytes = budgets.memory_per_run;
            config.warm_runs = args.warm_runs;
            config.memory_total_bytes = budgets.memory_total;
            config.outbound = OutboundLimits {
                max_concurrent: args.capabilities.max_http_concurrency,
                max_response_bytes: args.capabilities.max_http_response,
            };
            config.secrets = SecretStore::new(args.capabilities.secrets_dir.clone());
        })?,
        codecs: Codecs::default(),
        routing: connections.routing()?,
        signing: connections.signing()?,
        trusted_keys,
        metrics,
    };
    let config = WorkerConfig {
        worker_id,
        queues: parts.routing.worker_queues(&args.queues),
        concurrency,
        autoscale,
        broadcasts: args.broadcasts,
        control: connections.channels(),
        events: args.events,
        prefetch_multiplier: args.prefetch_multiplier as usize,
        lease: args.lease,
        shutdown_grace: args.shutdown_grace,
        started_after: args.started_after,
        budgets,
        ..WorkerConfig::default()
    };
    let scale = match autoscale {
        Some(autoscale) => format!("autoscale {}:{}", autoscale.min, autoscale.max),
        None => format!("concurrency {concurrency}"),
    };
    eprintln!(
        "worker {} ready: queues {}, {scale}",
        config.worker_id,
        config.queues.join(",")
    );
    if parts.trusted_keys.is_some() {
        eprintln!("worker runs only components signed by a trusted key");
    }
    if let Some(keys) = &parts.signing {
        let signs = match keys.can_sign() {
            true => "and signs what it publishes",
            false => "and, holding public keys only, refuses to publish sub-tasks and canvas steps",
        };
        eprintln!("worker verifies signatures ({}) {signs}", keys.describe());
    }
    let worker = Worker::new(parts, config);
    let signals = tokio::spawn(shutdown_on_signals(worker.shutdown_handle()));
    // On a runtime thread rather than the main thread's `block_on`: a fetch woken by a
    // publish or a reply then runs on the thread that woke it, without waking another.
    let summary = tokio::spawn(async move { worker.run().await })
        .await
        .context("the worker panicked")?;
    signals.abort();
    eprintln!(
        "worker stopped: {} tasks processed, {} returned to the queue",
        summary.processed, summary.returned
    );
    Ok(ExitCode::SUCCESS)
}

/// Turns signals into shutdown requests: SIGTERM warm, SIGINT soft, SIGQUIT hard; a second
/// SIGTERM or SIGINT hard.
async fn shutdown_on_signals(handle: ShutdownHandle) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt), Ok(mut quit)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::quit()),
    ) else {
        tracing::error!("cannot listen for signals; stop the worker with `worker shutdown`");
        return;
    };
    let mut asked = false;
    loop {
        let (mode, name) = tokio::select! {
            _ = terminate.recv() => (ShutdownMode::Warm, "SIGTERM"),
            _ = interrupt.recv() => (ShutdownMode::Soft, "SIGINT"),
            _ = quit.recv() => (ShutdownMode::Hard, "SIGQUIT"),
        };
        let mode = if asked { ShutdownMode::Hard } else { mode };
        asked = true;
        let what = match mode {
            ShutdownMode::Warm => "warm: running tasks finish (signal again to stop them)",
            ShutdownMode::Soft => {
                "soft: running tasks get the shutdown grace (signal again to stop them)"
            }
            ShutdownMode::Hard => "hard: running tasks are stopped and returned to the queue",
        };
        eprintln!("{name}: shutting down, {what}");
        handle.request(mode);
    }
}
