//! `stem-host bench`: measurements in the spirit of redis-benchmark and pgbench.
//!
//! The default benchmark runs the whole platform in this process: workers with their own
//! connections to the broker and backend (as separate processes would have), a producer
//! publishing in batches, and every result read back. With `--processes N` the workers are
//! `stem-host worker start` processes instead, as operators run them, draining a queue filled
//! beforehand; that mode also reports the CPU each task costs the workers and Redis
//! ([`processes`]). `bench runtime` times the sandbox alone; `bench beat` the scheduler
//! ([`beat`]); `bench canvas` a big chord ([`canvas`]).

mod beat;
mod canvas;
mod processes;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::json;
use tokio::sync::watch;

use super::Connections;
use super::progress::Progress;
use super::units::human_duration;
use crate::backend::TaskState;
use crate::client::{Client, EnqueueRequest};
use crate::codec::Codecs;
use crate::components;
use crate::runtime::{DetachedHooks, RunHandle, RunLimits};
use crate::task::Invocation;
use crate::time::Timestamp;
use crate::worker::{ShutdownMode, Worker, WorkerConfig, WorkerParts};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    #[command(flatten)]
    end_to_end: EndToEnd,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Time instantiate + call of one task with its component already compiled and linked.
    ///
    /// Every iteration is a complete run: a fresh Store and instance, the call, the teardown.
    Runtime(RuntimeBench),
    /// Cost of Beat's rounds over many entries, and how late its firings are published.
    Beat(beat::BeatBench),
    /// A chord of many members run by worker processes: members per second, and the time
    /// from the last member's end to the callback's.
    Canvas(canvas::CanvasBench),
}

/// Enqueue N tasks and run them with in-process workers against the configured broker and
/// backend; report throughput and enqueue-to-result latency.
#[derive(Args)]
pub(super) struct EndToEnd {
    /// The task to enqueue; it must be registered, or given with --component.
    #[arg(long, default_value = "hello.add")]
    task: String,
    /// JSON arguments of every task.
    #[arg(long, default_value = r#"{"a":1,"b":2}"#)]
    args: String,
    /// Upload this component first.
    #[arg(long, value_name = "FILE")]
    component: Option<PathBuf>,
    /// Tasks to run.
    #[arg(long, short = 'n', default_value_t = 10_000)]
    tasks: usize,
    /// Worker instances in this process, each with its own connections.
    #[arg(long, default_value_t = 2, conflicts_with = "processes")]
    workers: usize,
    /// Run the workers as this many `stem-host worker start` processes instead, draining a
    /// queue filled first; reports worker and Redis CPU per task.
    #[arg(long, value_name = "N")]
    processes: Option<usize>,
    /// Concurrency of each worker.
    #[arg(long, short = 'c', default_value_t = 8)]
    concurrency: usize,
    /// Tasks per publish.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Tasks run one at a time afterwards, to measure latency on an idle system.
    #[arg(long, default_value_t = 50)]
    idle_samples: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RuntimeBench {
    /// The component to measure.
    #[arg(long, value_name = "FILE")]
    component: PathBuf,
    /// The task to call.
    #[arg(long, default_value = "hello.add")]
    task: String,
    /// JSON arguments of every call.
    #[arg(long, default_value = r#"{"a":1,"b":2}"#)]
    args: String,
    /// Measured iterations (after 10% as many warm-up runs).
    #[arg(long, short = 'n', default_value_t = 20_000)]
    iterations: u32,
    /// Grant the task this (as `task grant` would, e.g. `outbound http://127.0.0.1:8080`) to
    /// measure runs with capabilities; repeatable. The run gets what the task also declares.
    #[arg(long = "grant", value_name = "GRANT")]
    grants: Vec<String>,
    /// Let one instance serve up to N runs (`worker start --warm-runs`); 0 measures a fresh
    /// instance per run.
    #[arg(long, default_value_t = 0, value_name = "N")]
    warm_runs: u32,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: BenchArgs, connections: &Connections) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(BenchCommand::Runtime(bench)) => runtime_bench(bench, connections).await,
        Some(BenchCommand::Beat(bench)) => beat::run(bench, connections).await,
        Some(BenchCommand::Canvas(bench)) => canvas::run(bench, connections).await,
        None if args.end_to_end.processes.is_some() => {
            processes::drain(args.end_to_end, connections).await
        }
        None => end_to_end(args.end_to_end, connections).await,
    }
}

/// Enqueue → result latency of `--idle-samples` tasks run one at a time, sorted.
async fn idle_latencies(
    bench: &EndToEnd,
    client: &Client,
    backend: &dyn crate::backend::ResultBackend,
) -> anyhow::Result<Vec<Duration>> {
    let mut idle = Vec::with_capacity(bench.idle_samples);
    for _ in 0..bench.idle_samples {
        let start = Instant::now();
        let envelope = client
            .enqueue(EnqueueRequest::new(&bench.task, bench.args.clone()))
            .await?;
        let status = backend.wait(&envelope.id, Duration::from_secs(60)).await?;
        if !status.is_some_and(|s| s.state.is_terminal()) {
            bail!("task {} did not finish within a minute", envelope.id);
        }
        idle.push(start.elapsed());
    }
    idle.sort();
    Ok(idle)
}

fn report_idle_json(report: &mut serde_json::Value, idle: &[Duration]) {
    if !idle.is_empty() {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        report["idle_latency_p50_ms"] = json!(ms(percentile(idle, 0.5)));
        report["idle_latency_p99_ms"] = json!(ms(percentile(idle, 0.99)));
    }
}

fn print_idle(idle: &[Duration]) {
    if !idle.is_empty() {
        println!(
            "  enqueue -> result idle ({} one at a time): p50 {}  p99 {}",
            idle.len(),
            human_duration(percentile(idle, 0.5)),
            human_duration(percentile(idle, 0.99))
        );
    }
}

/// Success only when no task failed.
fn exit_code(failed: usize) -> ExitCode {
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Latency percentiles of sorted samples.
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

async fn end_to_end(bench: EndToEnd, connections: &Connections) -> anyhow::Result<ExitCode> {
    if bench.tasks == 0 || bench.workers == 0 || bench.concurrency == 0 {
        bail!("--tasks, --workers and --concurrency must be at least 1");
    }
    let registry = connections.registry().await?;
    let slots = u32::try_from(bench.workers * bench.concurrency + 1).unwrap_or(u32::MAX);
    let runtime = connections.sandbox(|config| config.max_instances = slots)?;
    if let Some(path) = &bench.component {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        components::upload(registry.as_ref(), &runtime, bytes, None)
            .await
            .with_context(|| format!("cannot upload {}", path.display()))?;
    }
    // A namespace of its own keeps the benchmark's tasks apart from real ones.
    let namespace = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let broker_url = connections.url(crate::config::Role::Broker)?;
    let backend_url = connections.url(crate::config::Role::Backend)?;
    let broker = crate::config::open_broker(&broker_url, Some(&namespace)).await?;
    let backend = crate::config::open_backend(&backend_url, Some(&namespace)).await?;
    let client = Client::new(broker.clone(), registry.clone(), Codecs::default())
        .with_signing(connections.signing()?);
    let queue = client
        .prepare(EnqueueRequest::new(&bench.task, bench.args.clone()))
        .await?
        .queue;

    let (stop, stopped) = watch::channel(false);
    let mut workers = Vec::new();
    for _ in 0..bench.workers {
        let worker_broker = crate::config::open_broker(&broker_url, Some(&namespace)).await?;
        let worker_backend = crate::config::open_backend(&backend_url, Some(&namespace)).await?;
        let parts = WorkerParts {
            settlements: crate::config::open_settlements(
                &broker_url,
                &backend_url,
                Some(&namespace),
                worker_broker.clone(),
                worker_backend.clone(),
            )
            .await?,
            broker: worker_broker,
            backend: worker_backend,
            revokes: Arc::new(crate::stores::revoke::memory::MemoryRevokeStore::default()),
            rate_limiter: connections.rate_limiter().await?,
            registry: registry.clone(),
            runtime: runtime.clone(),
            codecs: Codecs::default(),
            routing: Arc::default(),
            signing: connections.signing()?,
            trusted_keys: None,
            metrics: None,
        };
        let config = WorkerConfig {
            worker_id: format!("{namespace}-{}", workers.len() + 1),
            queues: vec![queue.clone()],
            concurrency: bench.concurrency,
            ..WorkerConfig::default()
        };
        let mut stopped = stopped.clone();
        let worker = Worker::new(parts, config);
        let handle = worker.shutdown_handle();
        tokio::spawn(async move {
            let _ = stopped.wait_for(|stop| *stop).await;
            handle.request(ShutdownMode::Soft);
        });
        workers.push(tokio::spawn(async move { worker.run().await }));
    }

    let mut progress = Progress::new();
    let started = Instant::now();
    let mut envelopes = Vec::with_capacity(bench.tasks);
    while envelopes.len() < bench.tasks {
        let count = bench.batch.max(1).min(bench.tasks - envelopes.len());
        let requests = vec![EnqueueRequest::new(&bench.task, bench.args.clone()); count];
        envelopes.extend(client.enqueue_many(requests).await?);
        progress.update(format_args!("enqueued {}/{}", envelopes.len(), bench.tasks));
    }
    let enqueued_in = started.elapsed();
    let mut latencies = Vec::with_capacity(bench.tasks);
    let mut last_finish = Timestamp::from_millis(0);
    let mut failed = 0;
    for (done, envelope) in envelopes.iter().enumerate() {
        let status = backend.wait(&envelope.id, Duration::from_secs(300)).await?;
        let Some(status) = status.filter(|s| s.state.is_terminal()) else {
            bail!("task {} did not finish within 5 minutes", envelope.id);
        };
        failed += usize::from(status.state != TaskState::Succeeded);
        latencies.push(status.updated_at.saturating_since(envelope.created_at));
        last_finish = last_finish.max(status.updated_at);
        progress.update(format_args!("finished {}/{}", done + 1, bench.tasks));
    }
    let wall = last_finish.saturating_since(envelopes[0].created_at);
    progress.finish();

    let idle = idle_latencies(&bench, &client, backend.as_ref()).await?;
    let _ = stop.send(true);
    for worker in workers {
        worker.await?;
    }

    latencies.sort();
    let throughput = bench.tasks as f64 / wall.as_secs_f64().max(1e-3);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    if bench.json {
        let mut report = json!({
            "bench": "end_to_end",
            "broker": broker_url.to_string(),
            "backend": backend_url.to_string(),
            "task": bench.task,
            "tasks": bench.tasks,
            "failed": failed,
            "workers": bench.workers,
            "concurrency": bench.concurrency,
            "enqueue_per_second": bench.tasks as f64 / enqueued_in.as_secs_f64(),
            "tasks_per_second": throughput,
            "latency_p50_ms": ms(percentile(&latencies, 0.5)),
            "latency_p99_ms": ms(percentile(&latencies, 0.99)),
        });
        report_idle_json(&mut report, &idle);
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("====== end to end: {} x {} ======", bench.tasks, bench.task);
        println!("  broker {broker_url}, backend {backend_url}");
        println!(
            "  {} workers x concurrency {}",
            bench.workers, bench.concurrency
        );
        println!(
            "  enqueued in {} ({:.0} tasks/s)",
            human_duration(enqueued_in),
            bench.tasks as f64 / enqueued_in.as_secs_f64()
        );
        println!(
            "  all results in {}: {throughput:.0} tasks/s, {failed} failed",
            human_duration(wall)
        );
        println!(
            "  enqueue -> result under load: p50 {}  p99 {}",
            human_duration(percentile(&latencies, 0.5)),
            human_duration(percentile(&latencies, 0.99))
        );
        print_idle(&idle);
    }
    Ok(exit_code(failed))
}

async fn runtime_bench(
    RuntimeBench {
        component,
        task,
        args,
        iterations,
        grants,
        warm_runs,
        json,
    }: RuntimeBench,
    connections: &Connections,
) -> anyhow::Result<ExitCode> {
    let runtime = connections.sandbox(|config| config.warm_runs = warm_runs)?;
    let pooling = runtime.uses_pooling_allocator();
    let path = component.clone();
    let component = tokio::task::spawn_blocking(move || runtime.load_file(&path))
        .await?
        .with_context(|| format!("cannot load {}", component.display()))?;
    let definitions = component.describe().await?;
    let declared = definitions
        .iter()
        .find(|d| d.name == task)
        .map(|d| d.capabilities.clone())
        .unwrap_or_default();
    let capabilities = Arc::new(super::task::granted_by_flags(&declared, &grants)?);
    let hooks = Arc::new(DetachedHooks);
    let limits = RunLimits::default();
    let handle = RunHandle::new();
    let invocation = Invocation::new(&task, args);
    let once = |invocation: &Invocation| {
        let hooks = hooks.clone();
        let component = component.clone();
        let handle = handle.clone();
        let invocation = invocation.clone();
        let capabilities = capabilities.clone();
        async move {
            component
                .run(&invocation, limits, &capabilities, hooks, &handle)
                .await
        }
    };
    if let Err(error) = once(&invocation).await {
        bail!("{task} does not run: {error}");
    }
    for _ in 0..iterations / 10 {
        once(&invocation).await?;
    }
    let mut samples = Vec::with_capacity(iterations as usize);
    let mut instantiations = Vec::with_capacity(iterations as usize);
    let started = Instant::now();
    for _ in 0..iterations {
        let start = Instant::now();
        once(&invocation).await?;
        samples.push(start.elapsed());
        instantiations.extend(handle.measures().instantiate);
    }
    let total = started.elapsed();
    samples.sort();
    instantiations.sort();
    let p = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    let (p50, p99, max) = (p(0.50), p(0.99), p(1.0));
    let instantiate_p50 = instantiations
        .get(instantiations.len() / 2)
        .copied()
        .unwrap_or_default();
    let memory_bytes = handle.measures().memory_bytes;
    let per_second = f64::from(iterations) / total.as_secs_f64();
    if json {
        let micros = |d: Duration| d.as_secs_f64() * 1e6;
        let report = json!({
            "bench": "runtime",
            "task": task,
            "iterations": iterations,
            "pooling_allocator": pooling,
            "p50_us": micros(p50),
            "p99_us": micros(p99),
            "max_us": micros(max),
            "warm_runs": warm_runs,
            "instantiate_p50_us": micros(instantiate_p50),
            "memory_bytes": memory_bytes,
            "runs_per_second": per_second,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("====== runtime: instantiate + call {task} ======");
        println!(
            "  {iterations} runs in {}, one at a time",
            human_duration(total)
        );
        println!(
            "  allocator: {}",
            if pooling { "pooling" } else { "on-demand" }
        );
        println!(
            "  p50 {}  p99 {}  max {}",
            human_duration(p50),
            human_duration(p99),
            human_duration(max)
        );
        println!(
            "  instantiation p50 {}, linear memory at the end of a run {} KiB",
            human_duration(instantiate_p50),
            memory_bytes / 1024
        );
        println!("  {per_second:.0} runs/s");
    }
    Ok(ExitCode::SUCCESS)
}
