//! `stem-host bench --processes N`: real worker processes drain a queue filled beforehand.
//!
//! The benchmark works in a namespace of its own: it copies the task's current component
//! there, fills the queue, starts `stem-host worker start` processes with the same adapter
//! flags, and times the drain from the moment every worker is ready to the last recorded
//! result. It reads the workers' CPU time from `/proc` and, when the broker is Redis, the
//! server's CPU time and command calls from `INFO`, so a regression shows on which side it lies.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use super::super::Connections;
use super::super::progress::Progress;
use super::super::units::human_duration;
use super::{EndToEnd, exit_code, idle_latencies, print_idle, report_idle_json};
use crate::backend::{ResultBackend, TaskState};
use crate::broker::Broker;
use crate::client::{Client, EnqueueRequest};
use crate::codec::Codecs;
use crate::components;
use crate::config::{self, AdapterUrl, Role};
use crate::time::Timestamp;

/// Linux reports process CPU time in ticks of 1/100 s (`USER_HZ`) on every architecture.
const TICKS_PER_SECOND: f64 = 100.0;

pub(super) async fn drain(bench: EndToEnd, connections: &Connections) -> anyhow::Result<ExitCode> {
    let processes = bench.processes.unwrap_or(1);
    if bench.tasks == 0 || processes == 0 || bench.concurrency == 0 {
        bail!("--tasks, --processes and --concurrency must be at least 1");
    }
    let BenchSpace {
        namespace,
        broker_url,
        backend_url,
        broker,
        backend,
        client,
    } = BenchSpace::open(connections, bench.component.as_deref(), &bench.task).await?;
    let queue = client
        .prepare(EnqueueRequest::new(&bench.task, bench.args.clone()))
        .await?
        .queue;

    let mut progress = Progress::new();
    let started = Instant::now();
    let mut ids = Vec::with_capacity(bench.tasks);
    while ids.len() < bench.tasks {
        let count = bench.batch.max(1).min(bench.tasks - ids.len());
        let requests = vec![EnqueueRequest::new(&bench.task, bench.args.clone()); count];
        ids.extend(
            client
                .enqueue_many(requests)
                .await?
                .into_iter()
                .map(|e| e.id),
        );
        progress.update(format_args!("enqueued {}/{}", ids.len(), bench.tasks));
    }
    let enqueued_in = started.elapsed();
    progress.finish();

    let redis = match connections.broker_redis_url()? {
        Some(url) => Some(
            redis::Client::open(url.as_str())?
                .get_multiplexed_async_connection()
                .await?,
        ),
        None => None,
    };
    let mut workers = Vec::with_capacity(processes);
    for _ in 0..processes {
        workers.push(start_worker(
            connections,
            &namespace,
            &queue,
            bench.concurrency,
        )?);
    }
    for worker in &mut workers {
        worker.ready()?;
    }
    let began = Timestamp::now();
    let cpu_before: Vec<u64> = workers.iter().map(|w| cpu_ticks(w.pid())).collect();
    let redis_before = match &redis {
        Some(conn) => Some(RedisUsage::read(&mut conn.clone()).await?),
        None => None,
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let stats = broker.stats(&queue).await?;
        let left = stats.ready + stats.delayed + stats.in_flight;
        progress.update(format_args!("{left} tasks left"));
        if left == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{left} tasks were still queued after 10 minutes");
        }
        // The drain is timed from the statuses, not from this loop; counting a long queue
        // often would only load the server the workers use.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    progress.finish();
    let cpu_ticks_used: u64 = workers
        .iter()
        .zip(&cpu_before)
        .map(|(w, before)| cpu_ticks(w.pid()).saturating_sub(*before))
        .sum();
    let redis_used = match (&redis, redis_before) {
        (Some(conn), Some(before)) => {
            Some(RedisUsage::read(&mut conn.clone()).await?.since(&before))
        }
        _ => None,
    };

    let mut last = began;
    let mut failed = 0;
    for chunk in ids.chunks(1000) {
        for (id, status) in chunk.iter().zip(backend.get_many(chunk).await?) {
            match status.filter(|s| s.state.is_terminal()) {
                Some(status) => {
                    failed += usize::from(status.state != TaskState::Succeeded);
                    last = last.max(status.updated_at);
                }
                None => bail!("task {id} left the queue without a terminal status"),
            }
        }
    }
    let wall = last.saturating_since(began);

    let peak_rss_kib = workers
        .iter()
        .map(|w| peak_rss_kib(w.pid()))
        .max()
        .unwrap_or(0);
    let idle = idle_latencies(&bench, &client, backend.as_ref()).await?;
    for worker in &mut workers {
        worker.stop();
    }

    let tasks = bench.tasks as f64;
    let throughput = tasks / wall.as_secs_f64().max(1e-3);
    let worker_cpu_us = cpu_ticks_used as f64 / TICKS_PER_SECOND * 1e6 / tasks;
    if bench.json {
        let mut report = json!({
            "bench": "drain",
            "broker": broker_url.to_string(),
            "backend": backend_url.to_string(),
            "task": bench.task,
            "tasks": bench.tasks,
            "failed": failed,
            "worker_processes": processes,
            "concurrency": bench.concurrency,
            "enqueue_per_second": tasks / enqueued_in.as_secs_f64(),
            "tasks_per_second": throughput,
            "worker_cpu_us_per_task": worker_cpu_us,
            "worker_peak_rss_mib": peak_rss_kib as f64 / 1024.0,
        });
        if let Some(redis) = &redis_used {
            report["redis_cpu_us_per_task"] = json!(redis.cpu_us / tasks);
            report["redis_calls_per_task"] = json!(redis.calls_per_task(tasks));
        }
        report_idle_json(&mut report, &idle);
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("====== drain: {} x {} ======", bench.tasks, bench.task);
        println!("  broker {broker_url}, backend {backend_url}");
        println!(
            "  {processes} worker processes x concurrency {}",
            bench.concurrency
        );
        println!(
            "  enqueued in {} ({:.0} tasks/s)",
            human_duration(enqueued_in),
            tasks / enqueued_in.as_secs_f64()
        );
        println!(
            "  drained in {}: {throughput:.0} tasks/s, {failed} failed",
            human_duration(wall)
        );
        println!("  worker CPU: {worker_cpu_us:.1}µs per task");
        println!(
            "  worker peak RSS (largest process): {:.1}MiB",
            peak_rss_kib as f64 / 1024.0
        );
        if let Some(redis) = &redis_used {
            println!("  Redis CPU: {:.1}µs per task", redis.cpu_us / tasks);
            println!(
                "  Redis calls per task (scripts' own calls included): {}",
                redis.calls_per_task(tasks)
            );
        }
        print_idle(&idle);
    }
    Ok(exit_code(failed))
}

/// A namespace of the benchmark's own (so it sees no one else's tasks), holding a copy of the
/// component, with the configured broker and backend opened in it.
pub(super) struct BenchSpace {
    pub namespace: String,
    pub broker_url: AdapterUrl,
    pub backend_url: AdapterUrl,
    pub broker: Arc<dyn Broker>,
    pub backend: Arc<dyn ResultBackend>,
    /// Publishes into the namespace, with its registry.
    pub client: Client,
}

impl BenchSpace {
    /// Copies the component of `task` (or the one at `component`) into a fresh namespace.
    pub(super) async fn open(
        connections: &Connections,
        component: Option<&Path>,
        task: &str,
    ) -> anyhow::Result<BenchSpace> {
        let namespace = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let runtime = connections.sandbox(|_| {})?;
        let bytes = match component {
            Some(path) => {
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
            }
            None => {
                let registry = connections.registry().await?;
                let version = registry
                    .task(task)
                    .await?
                    .with_context(|| format!("unknown task `{task}`: pass --component"))?;
                registry
                    .component(&version.digest)
                    .await?
                    .context("the task's component is missing from the registry")?
            }
        };
        let registry =
            config::open_registry(&connections.url(Role::Registry)?, Some(&namespace)).await?;
        components::upload(registry.as_ref(), &runtime, bytes, None)
            .await
            .context("cannot upload the component")?;
        let broker_url = connections.url(Role::Broker)?;
        let backend_url = connections.url(Role::Backend)?;
        let broker = config::open_broker(&broker_url, Some(&namespace)).await?;
        let backend = config::open_backend(&backend_url, Some(&namespace)).await?;
        let client = Client::new(broker.clone(), registry, Codecs::default())
            .with_signing(connections.signing()?);
        Ok(BenchSpace {
            namespace,
            broker_url,
            backend_url,
            broker,
            backend,
            client,
        })
    }
}

/// One `stem-host worker start` child; killed if still running when dropped.
pub(super) struct WorkerChild {
    child: Child,
}

pub(super) fn start_worker(
    connections: &Connections,
    namespace: &str,
    queue: &str,
    concurrency: usize,
) -> anyhow::Result<WorkerChild> {
    let exe = std::env::current_exe().context("cannot find the stem-host binary")?;
    let child = Command::new(exe)
        .envs(connections.forwarded(namespace))
        .args(["worker", "start", "--queues", queue])
        .args(["--concurrency", &concurrency.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start a worker process")?;
    Ok(WorkerChild { child })
}

impl WorkerChild {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the worker's `ready` line, then lets its stderr drain in the background.
    pub(super) fn ready(&mut self) -> anyhow::Result<()> {
        let stderr = self
            .child
            .stderr
            .take()
            .context("the worker has no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        for line in lines.by_ref() {
            let line = line?;
            if line.contains(" ready: ") {
                std::thread::spawn(move || lines.for_each(drop));
                return Ok(());
            }
            eprintln!("worker: {line}");
        }
        bail!("a worker process exited before it was ready")
    }

    pub(super) fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for WorkerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User and system CPU ticks of a process, all threads, from `/proc/PID/stat`.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command name may hold spaces; the fields after it do not.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are the 14th and 15th fields; the 3rd is the first after the name.
    field(11) + field(12)
}

/// The most resident memory a process has used (`VmHWM` in `/proc/PID/status`), KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// What the Redis server spent, from `INFO`.
struct RedisUsage {
    /// Server CPU (user + system), µs.
    cpu_us: f64,
    /// Calls by command, counting those scripts make.
    calls: HashMap<String, u64>,
}

impl RedisUsage {
    async fn read(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<RedisUsage> {
        let info: String = redis::cmd("INFO")
            .arg("cpu")
            .arg("commandstats")
            .query_async(conn)
            .await?;
        let mut usage = RedisUsage {
            cpu_us: 0.0,
            calls: HashMap::new(),
        };
        for line in info.lines() {
            if let Some((key, value)) = line.split_once(':') {
                match key {
                    "used_cpu_sys" | "used_cpu_user" => {
                        usage.cpu_us += value.trim().parse::<f64>().unwrap_or(0.0) * 1e6;
                    }
                    _ if key.starts_with("cmdstat_") => {
                        let calls = value
                            .split(',')
                            .find_map(|kv| kv.strip_prefix("calls="))
                            .and_then(|v| v.parse::<u64>().ok())
                            .unwrap_or(0);
                        usage
                            .calls
                            .insert(key["cmdstat_".len()..].to_owned(), calls);
                    }
                    _ => {}
                }
            }
        }
        Ok(usage)
    }

    fn since(&self, before: &RedisUsage) -> RedisUsage {
        RedisUsage {
            cpu_us: self.cpu_us - before.cpu_us,
            calls: self
                .calls
                .iter()
                .map(|(name, calls)| {
                    let earlier = before.calls.get(name).copied().unwrap_or(0);
                    (name.clone(), calls.saturating_sub(earlier))
                })
                .filter(|(_, calls)| *calls > 0)
                .collect(),
        }
    }

    /// The busiest commands, as calls per task.
    fn calls_per_task(&self, tasks: f64) -> String {
        let mut calls: Vec<_> = self.calls.iter().collect();
        calls.sort_by(|a, b| b.1.cmp(a.1));
        calls
            .iter()
            .take(6)
            .map(|(name, calls)| format!("{name} {:.2}", **calls as f64 / tasks))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
