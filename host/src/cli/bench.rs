//! `stem-host bench ...`: measurements in the spirit of redis-benchmark and pgbench.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::json;

use super::units::human_duration;
use crate::runtime::{DetachedHooks, RunHandle, RunLimits, RuntimeConfig};
use crate::task::Invocation;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time instantiate + call of one task with its component already compiled and linked.
    ///
    /// Every iteration is a complete run: a fresh Store and instance, the call, the teardown.
    Runtime {
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
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(command: BenchCommand, config: RuntimeConfig) -> anyhow::Result<ExitCode> {
    match command {
        BenchCommand::Runtime {
            component,
            task,
            args,
            iterations,
            json,
        } => {
            let runtime = super::sandbox(config)?;
            let pooling = runtime.uses_pooling_allocator();
            let path = component.clone();
            let component = tokio::task::spawn_blocking(move || runtime.load_file(&path))
                .await?
                .with_context(|| format!("cannot load {}", component.display()))?;
            component.describe().await?;
            let hooks = Arc::new(DetachedHooks);
            let limits = RunLimits::default();
            let handle = RunHandle::new();
            let invocation = Invocation::new(&task, args);
            let once = |invocation: &Invocation| {
                let hooks = hooks.clone();
                let component = component.clone();
                let handle = handle.clone();
                let invocation = invocation.clone();
                async move { component.run(&invocation, limits, hooks, &handle).await }
            };
            if let Err(error) = once(&invocation).await {
                bail!("{task} does not run: {error}");
            }
            for _ in 0..iterations / 10 {
                once(&invocation).await?;
            }
            let mut samples = Vec::with_capacity(iterations as usize);
            let started = Instant::now();
            for _ in 0..iterations {
                let start = Instant::now();
                once(&invocation).await?;
                samples.push(start.elapsed());
            }
            let total = started.elapsed();
            samples.sort();
            let p = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
            let (p50, p99, max) = (p(0.50), p(0.99), p(1.0));
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
                println!("  {per_second:.0} runs/s");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
