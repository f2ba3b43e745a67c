//! `stem-host routing dump`: the routing table, and why a task goes where it goes.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use super::Connections;
use crate::routing::{Decision, RouteRequest};

#[derive(Subcommand)]
pub enum RoutingCommand {
    /// Print the routing file's default queue, queues, routes and broadcasts; with --sample,
    /// where each named task goes and which rule sends it there.
    Dump {
        /// A task name to route (repeatable); its declared queue and priority are read from
        /// the registry when it is registered.
        #[arg(long, value_name = "TASK")]
        sample: Vec<String>,
        /// The priority the sampled enqueue asks for.
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=9))]
        priority: Option<u8>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(command: RoutingCommand, connections: &Connections) -> anyhow::Result<ExitCode> {
    let RoutingCommand::Dump {
        sample,
        priority,
        json,
    } = command;
    let routing = connections.routing()?;
    let registry = connections.registry().await?;
    let mut decisions: Vec<(String, Decision)> = Vec::new();
    for task in sample {
        let declared = registry.task(&task).await?.map(|v| v.definition.options);
        let decision = routing.decide(&RouteRequest {
            task: &task,
            priority,
            declared_queue: declared.as_ref().and_then(|o| o.queue.as_deref()),
            declared_priority: declared.as_ref().and_then(|o| o.priority),
            ..RouteRequest::default()
        });
        decisions.push((task, decision));
    }
    if json {
        let samples: Vec<_> = decisions
            .iter()
            .map(|(task, decision)| json!({"task": task, "decision": decision}))
            .collect();
        let report = json!({"routing": routing.as_ref(), "samples": samples});
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let default = &routing.default_queue;
    println!("default queue: {}", default.queue);
    if !default.alias.is_empty() {
        println!("  aliases: {}", default.alias.join(", "));
    }
    if !default.fallbacks.is_empty() {
        println!(
            "  fallbacks (consumed with it): {}",
            default.fallbacks.join(", ")
        );
    }
    for (name, rule) in &routing.queues {
        let range = rule
            .priority_range
            .map(|[min, max]| format!(", priorities {min}..={max}"))
            .unwrap_or_default();
        println!(
            "queue {name}: routing keys [{}]{range}",
            rule.routing_key.join(", ")
        );
    }
    for (at, route) in routing.routes.iter().enumerate() {
        let target = match (&route.queue, &route.broadcast) {
            (Some(queue), _) => format!("queue {queue}"),
            (None, Some(name)) => format!("broadcast {name}"),
            (None, None) => "nothing".to_owned(),
        };
        let headers: Vec<String> = route
            .matches
            .headers
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let priority = route
            .priority
            .map(|p| format!(" at priority {p}"))
            .unwrap_or_default();
        println!(
            "routes[{at}]: task {} headers [{}] -> {target}{priority}",
            route.matches.task.as_deref().unwrap_or("*"),
            headers.join(", ")
        );
    }
    for (name, rule) in &routing.broadcasts {
        println!("broadcast {name}: {:?}", rule.delivery);
    }
    for (task, decision) in &decisions {
        println!("{task} -> {decision}");
    }
    Ok(ExitCode::SUCCESS)
}
