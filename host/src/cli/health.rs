//! `stem-host health`: one cheap call against every configured adapter, the seeds' `stem
//! health`. Exits non-zero naming each role that failed.

use std::future::Future;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;

use super::Connections;
use super::units::{human_duration, parse_duration};
use crate::config::Role;
use crate::task::RateLimit;

#[derive(Args)]
pub struct HealthArgs {
    /// How long each adapter may take to answer.
    #[arg(long, value_parser = parse_duration, default_value = "5s", value_name = "DURATION")]
    timeout: Duration,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// A key no task uses: the probes read it and write nothing else.
const PROBE: &str = "stem-health-probe";

/// One role's answer.
struct Check {
    role: &'static str,
    url: String,
    took: Duration,
    error: Option<String>,
}

async fn check<F>(role: &'static str, url: String, timeout: Duration, probe: F) -> Check
where
    F: Future<Output = anyhow::Result<()>>,
{
    let started = Instant::now();
    let error = match tokio::time::timeout(timeout, probe).await {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(format!("{error:#}")),
        Err(_) => Some(format!("no answer within {}", human_duration(timeout))),
    };
    Check {
        role,
        url,
        took: started.elapsed(),
        error,
    }
}

pub async fn run(args: HealthArgs, connections: &Connections) -> anyhow::Result<ExitCode> {
    let url = |role| {
        connections
            .url(role)
            .map(|url| url.to_string())
            .unwrap_or_else(|e| format!("({e:#})"))
    };
    let t = args.timeout;
    let checks = vec![
        check("broker", url(Role::Broker), t, async {
            connections.broker().await?.queues().await?;
            Ok(())
        })
        .await,
        check("result backend", url(Role::Backend), t, async {
            connections.backend().await?.get(PROBE).await?;
            Ok(())
        })
        .await,
        check("registry", url(Role::Registry), t, async {
            connections.registry().await?.task(PROBE).await?;
            Ok(())
        })
        .await,
        check("revoke store", url(Role::Revoke), t, async {
            connections.revokes().await?.get(PROBE).await?;
            Ok(())
        })
        .await,
        check("rate limiter", url(Role::RateLimiter), t, async {
            let limit = RateLimit::parse("1000000/s").expect("a valid rate");
            connections
                .rate_limiter()
                .await?
                .acquire(PROBE, limit)
                .await?;
            Ok(())
        })
        .await,
        check("schedule store", url(Role::Schedule), t, async {
            connections.schedules().await?.get(PROBE).await?;
            Ok(())
        })
        .await,
        check("lock store", url(Role::Lock), t, async {
            connections.locks().await?.owner(PROBE).await?;
            Ok(())
        })
        .await,
    ];
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| c.error.is_some())
        .map(|c| c.role)
        .collect();
    if args.json {
        let report = json!({
            "healthy": failed.is_empty(),
            "checks": checks.iter().map(|c| json!({
                "role": c.role,
                "url": c.url,
                "ok": c.error.is_none(),
                "ms": c.took.as_secs_f64() * 1e3,
                "error": c.error,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let width = checks.iter().map(|c| c.url.len()).max().unwrap_or(3).max(3);
        println!("{:<14}  {:<width$}  {:>9}  STATUS", "ROLE", "URL", "TOOK");
        for c in &checks {
            let status = c
                .error
                .as_deref()
                .map_or("ok".to_string(), |e| format!("FAILED: {e}"));
            println!(
                "{:<14}  {:<width$}  {:>9}  {status}",
                c.role,
                c.url,
                human_duration(c.took)
            );
        }
    }
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("unhealthy: {}", failed.join(", "));
        Ok(ExitCode::FAILURE)
    }
}
