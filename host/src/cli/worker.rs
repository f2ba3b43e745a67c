//! `stem-host worker start`: run tasks from the broker until SIGTERM or Ctrl-C.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::Connections;
use super::units::parse_duration;
use crate::codec::Codecs;
use crate::worker::{Worker, WorkerConfig, WorkerParts, default_worker_id};

#[derive(Subcommand)]
pub enum WorkerCommand {
    /// Start a worker in the foreground.
    ///
    /// On SIGTERM or Ctrl-C the worker stops fetching, lets running tasks finish within the
    /// shutdown grace, and returns the rest to the queue. A second signal skips the grace.
    Start(StartArgs),
    /// List the workers alive now, from their heartbeats in the result backend.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct StartArgs {
    /// Queues to consume, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "default")]
    queues: Vec<String>,
    /// Tasks run at once.
    #[arg(long, short = 'c', default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    concurrency: u32,
    /// This worker's name in heartbeats and statuses [default: HOSTNAME:PID].
    #[arg(long)]
    worker_id: Option<String>,
    /// Lease of each delivery (at least 100ms); extended while the task runs. Redelivery after
    /// a crash takes this long.
    #[arg(long, value_parser = parse_lease, default_value = "30s", value_name = "DURATION")]
    lease: Duration,
    /// How long running tasks may take to finish after a shutdown signal.
    #[arg(long, value_parser = parse_duration, default_value = "30s", value_name = "DURATION")]
    shutdown_grace: Duration,
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
        WorkerCommand::Start(args) => start(args, connections).await,
        WorkerCommand::List { json } => list(json, connections).await,
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
    let concurrency = args.concurrency as usize;
    let parts = WorkerParts {
        broker: connections.broker().await?,
        backend: connections.backend().await?,
        revokes: connections.revokes().await?,
        rate_limiter: connections.rate_limiter().await?,
        registry: connections.registry().await?,
        runtime: connections.sandbox(Some(args.concurrency + 1))?,
        codecs: Codecs::default(),
    };
    let config = WorkerConfig {
        worker_id: args.worker_id.unwrap_or_else(default_worker_id),
        queues: args.queues,
        concurrency,
        lease: args.lease,
        shutdown_grace: args.shutdown_grace,
        ..WorkerConfig::default()
    };
    eprintln!(
        "worker {} ready: queues {}, concurrency {concurrency}",
        config.worker_id,
        config.queues.join(",")
    );
    let worker = Worker::new(parts, config);
    let summary = worker.run(shutdown_signal()).await;
    eprintln!(
        "worker stopped: {} tasks processed, {} returned to the queue",
        summary.processed, summary.returned
    );
    Ok(ExitCode::SUCCESS)
}

/// Completes on the first SIGTERM or SIGINT; a second one exits at once.
async fn shutdown_signal() {
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let next = async {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = async {
                match terminate.as_mut() {
                    Some(signal) => { signal.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {},
        }
    };
    next.await;
    eprintln!("shutting down: finishing running tasks (signal again to stop at once)");
    tokio::spawn(async {
        let _ = tokio::signal::ctrl_c().await;
        std::process::exit(130);
    });
    if let Ok(mut again) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        tokio::spawn(async move {
            again.recv().await;
            std::process::exit(143);
        });
    }
}
