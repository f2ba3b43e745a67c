//! `stem-host events`: tail the event stream, like `celery events --dump`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::Connections;
use super::units::parse_duration;
use crate::control::Command;
use crate::control::events::{Event, EventChannel};

/// How long `events` waits for the workers to say they send events.
const ENABLE_TIMEOUT: Duration = Duration::from_secs(1);
use crate::routing::glob_matches;

#[derive(Args)]
pub struct EventsArgs {
    /// Print one JSON object per line instead of text.
    #[arg(long)]
    json: bool,
    /// Only events of tasks whose name matches this glob (e.g. `reports.*`); worker events
    /// are left out.
    #[arg(long, value_name = "GLOB")]
    task: Option<String>,
    /// Only events sent by this worker (an id or a glob).
    #[arg(long, value_name = "ID")]
    worker: Option<String>,
    /// Stop after this long [default: until Ctrl-C].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    duration: Option<Duration>,
    /// Stop after this many events.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Do not ask the running workers to send events (by default they are asked, as
    /// `worker enable-events` does; workers started later send them with `--events`).
    #[arg(long)]
    no_enable: bool,
}

impl EventsArgs {
    fn selects(&self, event: &Event) -> bool {
        let task = self.task.as_deref().is_none_or(|glob| {
            event
                .task
                .as_deref()
                .is_some_and(|task| glob_matches(glob, task))
        });
        let worker = self.worker.as_deref().is_none_or(|pattern| {
            event
                .worker
                .as_deref()
                .is_some_and(|worker| worker == pattern || glob_matches(pattern, worker))
        });
        task && worker
    }
}

pub async fn run(args: EventsArgs, connections: &Connections) -> anyhow::Result<ExitCode> {
    let channel = EventChannel::new(connections.broker().await?, connections.channels().events());
    let mut stream = channel.subscribe().await?;
    let asked = if args.no_enable {
        String::new()
    } else {
        let enable = Command::Events { enabled: true };
        let workers = Vec::from_iter(args.worker.clone());
        match super::worker::control::ask(enable, &workers, ENABLE_TIMEOUT, connections).await {
            Ok(replies) => format!("; {} workers send them", replies.replies.len()),
            Err(error) => format!("; asking the workers to send them failed: {error}"),
        }
    };
    // Said on stderr once subscribed, so a script can start producing after this line.
    eprintln!("listening for events{asked} (Ctrl-C to stop)");
    let stop = async {
        match args.duration {
            Some(duration) => tokio::time::sleep(duration).await,
            None => super::terminate_or_interrupt().await,
        }
    };
    tokio::pin!(stop);
    let mut printed = 0;
    loop {
        let batch = tokio::select! {
            batch = stream.next() => batch,
            () = &mut stop => break,
        };
        let Some(batch) = batch else {
            anyhow::bail!("the broker closed the event stream");
        };
        for event in batch.iter().filter(|event| args.selects(event)) {
            if args.json {
                println!("{}", serde_json::to_string(event)?);
            } else {
                println!("{}", describe(event));
            }
            printed += 1;
            if args.count.is_some_and(|count| printed >= count) {
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One line of text: when, what, about which task or worker.
fn describe(event: &Event) -> String {
    let kind = serde_json::to_value(event.event)
        .ok()
        .and_then(|value| value.as_str().map(str::to_owned))
        .unwrap_or_default();
    let mut line = format!("{} {kind:<16}", event.at);
    if let (Some(id), Some(task)) = (&event.task_id, &event.task) {
        line.push_str(&format!(" {task} {id}"));
    }
    if let Some(queue) = &event.queue {
        line.push_str(&format!(" queue={queue}"));
    }
    if let Some(attempt) = event.attempt {
        line.push_str(&format!(" attempt={attempt}"));
    }
    if let Some(worker) = &event.worker {
        line.push_str(&format!(" worker={worker}"));
    }
    if let Some(runtime) = event.runtime_ms {
        line.push_str(&format!(" runtime={runtime}ms"));
    }
    if let (Some(in_flight), Some(processed)) = (event.in_flight, event.processed) {
        line.push_str(&format!(" running={in_flight} processed={processed}"));
    }
    if let Some(error) = &event.error {
        line.push_str(&format!(" error={error:?}"));
    }
    line
}
