//! `stem-host canvas ...`: submit a chain, group or chord from a spec file; show a canvas as a
//! tree (also what `result get` prints for a canvas id).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;

use super::Connections;
use super::result;
use super::units::parse_duration;
use crate::backend::TaskState;
use crate::canvas::{Canvases, TreeNode, spec};

/// Members of one group or chord a text tree shows before it summarises the rest.
const SHOWN_MEMBERS: usize = 10;

#[derive(Subcommand)]
pub enum CanvasCommand {
    /// Submit a canvas from a JSON or YAML spec (see the README's Canvas section).
    ///
    /// Prints the canvas id; `result get ID` shows its tree, `result wait ID` waits for it.
    /// Submitting the same spec with the same `id` again publishes nothing twice.
    Submit {
        /// The spec file; `-` reads standard input.
        file: PathBuf,
        /// Wait for the whole canvas to finish, then print it as `result get` does.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, value_parser = parse_duration, default_value = "60s", requires = "wait")]
        timeout: Duration,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show a canvas as a tree with each node's state.
    ///
    /// Exits 0 if the canvas succeeded, 1 otherwise.
    Show {
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(command: CanvasCommand, connections: &Connections) -> anyhow::Result<ExitCode> {
    let canvases = connections.canvases().await?;
    match command {
        CanvasCommand::Submit {
            file,
            wait,
            timeout,
            json,
        } => {
            let text = if file.as_os_str() == "-" {
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("cannot read the spec from standard input")?;
                text
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?
            };
            let root = spec::parse(&text)?;
            let submitted = canvases.submit(root).await?;
            if !wait {
                if json {
                    println!("{}", serde_json::to_string_pretty(&submitted)?);
                } else {
                    println!("{}", submitted.id);
                    eprintln!(
                        "canvas {} submitted: {} tasks, {} published now",
                        submitted.id, submitted.tasks, submitted.published
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            let backend = connections.backend().await?;
            let status = result::wait(backend.as_ref(), &submitted.id, timeout).await?;
            if !status.as_ref().is_some_and(|s| s.state.is_terminal()) {
                return result::finish_wait(&submitted.id, status, timeout, json);
            }
            show(&canvases, &submitted.id, json)
                .await?
                .context("the canvas disappeared while it ran")
        }
        CanvasCommand::Show { id, json } => show(&canvases, &id, json)
            .await?
            .with_context(|| format!("no canvas {id}: it is unknown or has expired")),
    }
}

/// Prints the canvas `id` as a tree (or JSON); `None` if there is no such canvas.
pub async fn show(canvases: &Canvases, id: &str, json: bool) -> anyhow::Result<Option<ExitCode>> {
    let Some(tree) = canvases.tree(id).await? else {
        return Ok(None);
    };
    if json {
        let report = json!({
            "canvas_id": tree.id,
            "state": tree.state,
            "result": tree.result,
            "error": tree.error,
            "tree": tree,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let mut lines = Vec::new();
        draw(&tree, "", "", &mut lines);
        for line in &lines {
            eprintln!("{line}");
        }
        if let Some(result) = &tree.result {
            println!("{}", serde_json::to_string_pretty(result)?);
        }
    }
    Ok(Some(if tree.state == TaskState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }))
}

/// One line per node, children indented below it; long groups summarised.
fn draw(node: &TreeNode, lead: &str, indent: &str, lines: &mut Vec<String>) {
    let name = match &node.task {
        Some(task) => format!("{} {task}", node.id),
        None => format!("{} {}", node.kind, node.id),
    };
    // The kind only when it says more than the state (`time_limit`, `enqueue_failed`, ...).
    let error = match &node.error {
        Some(e) if e.kind == node.state.as_str() => format!(": {}", e.message),
        Some(e) => format!(": {}: {}", e.kind, e.message),
        None => String::new(),
    };
    lines.push(format!("{lead}{name}  {}{error}", node.state));
    let shown = if node.children.len() > SHOWN_MEMBERS + 1 {
        &node.children[..SHOWN_MEMBERS]
    } else {
        &node.children[..]
    };
    let hidden = &node.children[shown.len()..];
    let mut below: Vec<Line> = shown.iter().map(Line::Node).collect();
    if !hidden.is_empty() {
        below.push(Line::Summary(summarise(hidden)));
    }
    below.extend(
        [&node.callback, &node.link, &node.link_error]
            .into_iter()
            .flatten()
            .map(|child| Line::Node(child)),
    );
    let count = below.len();
    for (at, line) in below.into_iter().enumerate() {
        let (branch, more) = if at + 1 == count {
            ("└─ ", "   ")
        } else {
            ("├─ ", "│  ")
        };
        match line {
            Line::Node(child) => draw(
                child,
                &format!("{indent}{branch}"),
                &format!("{indent}{more}"),
                lines,
            ),
            Line::Summary(text) => lines.push(format!("{indent}{branch}{text}")),
        }
    }
}

enum Line<'a> {
    Node(&'a TreeNode),
    Summary(String),
}

/// `… 990 more: 980 succeeded, 10 started`.
fn summarise(hidden: &[TreeNode]) -> String {
    let mut counts: Vec<(TaskState, usize)> = Vec::new();
    for child in hidden {
        match counts.iter_mut().find(|(state, _)| *state == child.state) {
            Some((_, count)) => *count += 1,
            None => counts.push((child.state, 1)),
        }
    }
    let counts: Vec<String> = counts
        .iter()
        .map(|(state, count)| format!("{count} {state}"))
        .collect();
    format!("… {} more: {}", hidden.len(), counts.join(", "))
}
