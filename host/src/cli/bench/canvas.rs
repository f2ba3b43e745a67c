//! `stem-host bench canvas`: a chord of many members run by `stem-host worker start`
//! processes, timed from the submit to the callback's end.
//!
//! Like `bench --processes`, it works in a namespace of its own with a copy of the component.
//! The workers are ready before the chord is submitted, so the figures cover storing the tree,
//! publishing the members, running and counting them, collecting their results in order and
//! running the callback. Every instant comes from the statuses the workers recorded.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use serde_json::{Value, json};

use super::super::Connections;
use super::super::progress::Progress;
use super::super::units::human_duration;
use super::processes::{BenchSpace, WorkerChild, start_worker};
use crate::backend::TaskState;
use crate::canvas::{Canvases, Node};
use crate::client::EnqueueRequest;
use crate::codec::Codecs;
use crate::time::Timestamp;

#[derive(Args)]
pub(super) struct CanvasBench {
    /// Members of the chord's header.
    #[arg(long, default_value_t = 10_000)]
    members: usize,
    /// The members' task.
    #[arg(long, default_value = "hello.add")]
    task: String,
    /// JSON arguments (an object) of every member.
    #[arg(long, default_value = r#"{"a":1,"b":2}"#)]
    args: String,
    /// The callback's task; it receives the members' results as `input`.
    #[arg(long, default_value = "hello.echo")]
    callback: String,
    /// Upload this component first (it must declare both tasks).
    #[arg(long, value_name = "FILE")]
    component: Option<PathBuf>,
    /// `stem-host worker start` processes.
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// Concurrency of each worker.
    #[arg(long, short = 'c', default_value_t = 64)]
    concurrency: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub(super) async fn run(bench: CanvasBench, connections: &Connections) -> anyhow::Result<ExitCode> {
    if bench.members == 0 || bench.processes == 0 || bench.concurrency == 0 {
        bail!("--members, --processes and --concurrency must be at least 1");
    }
    let args: Value = serde_json::from_str(&bench.args)?;
    let BenchSpace {
        namespace,
        broker_url,
        backend_url,
        backend,
        client,
        ..
    } = BenchSpace::open(connections, bench.component.as_deref(), &bench.task).await?;
    let mut queues = Vec::new();
    for task in [&bench.task, &bench.callback] {
        let queue = client.prepare(EnqueueRequest::new(task, "{}")).await?.queue;
        if !queues.contains(&queue) {
            queues.push(queue);
        }
    }
    let canvases = Canvases::new(client, backend.clone(), Codecs::default());

    let mut workers: Vec<WorkerChild> = Vec::with_capacity(bench.processes);
    for _ in 0..bench.processes {
        workers.push(start_worker(
            connections,
            &namespace,
            &queues.join(","),
            bench.concurrency,
        )?);
    }
    for worker in &mut workers {
        worker.ready()?;
    }

    let members = (0..bench.members).map(|_| Node::task(&bench.task, args.clone()));
    let chord = Node::chord(members, Node::task(&bench.callback, json!({})));
    let submitted_at = Timestamp::now();
    let started = Instant::now();
    let submitted = canvases.submit(chord).await?;
    let submit_took = started.elapsed();
    let id = submitted.id;

    let mut progress = Progress::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    let chord = loop {
        let status = backend.wait(&id, Duration::from_millis(500)).await?;
        if let Some(status) = status.filter(|s| s.state.is_terminal()) {
            break status;
        }
        if Instant::now() > deadline {
            bail!("the chord had not finished after 10 minutes");
        }
        let finished = backend
            .get_group(&id)
            .await?
            .map_or(0, |g| g.finished.len());
        progress.update(format_args!(
            "{finished}/{} members finished ({})",
            bench.members,
            human_duration(started.elapsed())
        ));
    };
    progress.finish();
    for worker in &mut workers {
        worker.stop();
    }
    if chord.state != TaskState::Succeeded {
        bail!("the chord ended {}: {:?}", chord.state, chord.error);
    }

    let ids: Vec<String> = (0..bench.members).map(|at| format!("{id}:{at}")).collect();
    let mut last_member = submitted_at;
    for chunk in ids.chunks(1000) {
        for status in backend.get_many(chunk).await?.into_iter().flatten() {
            last_member = last_member.max(status.updated_at);
        }
    }
    let members_took = last_member.saturating_since(submitted_at);
    let callback = backend
        .get(&format!("{id}:cb"))
        .await?
        .filter(|s| s.state.is_terminal());
    let Some(callback) = callback else {
        bail!("the chord finished without a recorded callback");
    };
    let to_callback = callback.updated_at.saturating_since(last_member);
    let members_per_second = bench.members as f64 / members_took.as_secs_f64().max(1e-3);

    if bench.json {
        let report = json!({
            "bench": "canvas",
            "broker": broker_url.to_string(),
            "backend": backend_url.to_string(),
            "members": bench.members,
            "worker_processes": bench.processes,
            "concurrency": bench.concurrency,
            "submit_ms": submit_took.as_secs_f64() * 1e3,
            "members_per_second": members_per_second,
            "last_member_to_callback_done_ms": to_callback.as_secs_f64() * 1e3,
            "total_ms": callback.updated_at.saturating_since(submitted_at).as_secs_f64() * 1e3,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "====== canvas: chord of {} x {} -> {} ======",
            bench.members, bench.task, bench.callback
        );
        println!("  broker {broker_url}, backend {backend_url}");
        println!(
            "  {} worker processes x concurrency {}",
            bench.processes, bench.concurrency
        );
        println!(
            "  submitted (tree stored, members published) in {}",
            human_duration(submit_took)
        );
        println!(
            "  members done {} after the submit: {members_per_second:.0} members/s",
            human_duration(members_took)
        );
        println!(
            "  last member's end -> callback done: {} (results collected, callback published, \
             run and recorded)",
            human_duration(to_callback)
        );
    }
    Ok(ExitCode::SUCCESS)
}
