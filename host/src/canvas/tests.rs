//! Canvases advanced by a stand-in worker over the in-memory adapters: the tasks are computed
//! here, in Rust, so every path through the engine runs in milliseconds.

use std::sync::Arc;

use serde_json::{Value, json};

use super::*;
use crate::backend::memory::MemoryBackend;
use crate::backend::{ResultBackend, TaskFailure, TaskState, TaskStatus};
use crate::broker::memory::MemoryBroker;
use crate::broker::{Broker, ConsumeOptions};
use crate::client::Client;
use crate::codec::{Codecs, Payload};
use crate::stores::registry::ComponentRegistry;
use crate::stores::registry::memory::MemoryRegistry;
use crate::stores::revoke::memory::MemoryRevokeStore;
use crate::stores::revoke::{Revocation, RevokeStore};
use crate::task::{TaskDefinition, TaskOptions};

struct Parts {
    broker: Arc<MemoryBroker>,
    backend: Arc<MemoryBackend>,
    revokes: Arc<MemoryRevokeStore>,
    canvases: Canvases,
}

async fn parts() -> Parts {
    parts_with_limit(crate::client::DEFAULT_MAX_ARGS_BYTES).await
}

/// Parts whose client publishes arguments of at most `limit` bytes.
async fn parts_with_limit(limit: usize) -> Parts {
    let registry = Arc::new(MemoryRegistry::default());
    let definitions: Vec<TaskDefinition> = ["t.add", "t.sum", "t.fail", "t.echo"]
        .into_iter()
        .map(|name| TaskDefinition {
            name: name.into(),
            description: None,
            options: TaskOptions::default(),
            capabilities: Default::default(),
        })
        .collect();
    registry.register("digest", &definitions).await.unwrap();
    let broker = Arc::new(MemoryBroker::default());
    let backend = Arc::new(MemoryBackend::default());
    let client =
        Client::new(broker.clone(), registry, Codecs::default()).with_max_args_bytes(limit);
    Parts {
        canvases: Canvases::new(client, backend.clone(), Codecs::default()),
        broker,
        backend,
        revokes: Arc::new(MemoryRevokeStore::default()),
    }
}

/// What the stand-in tasks compute from their arguments.
fn compute(task: &str, args: &Value) -> Result<Value, String> {
    let input = &args[INPUT_KEY];
    match task {
        "t.add" => Ok(json!(
            input.as_i64().unwrap_or(0) + args["add"].as_i64().unwrap()
        )),
        "t.sum" => Ok(json!(
            input
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .sum::<i64>()
        )),
        "t.echo" => Ok(args.clone()),
        _ => Err(args["message"].as_str().unwrap_or("failed").to_owned()),
    }
}

impl Parts {
    /// Runs what the broker holds until it is empty, as a worker would: record, advance, ack.
    /// With `twice`, every task is advanced a second time, as after a crash before its ack.
    /// Returns the ids run, in order.
    async fn run_all(&self, twice: bool) -> Vec<String> {
        let mut ran = Vec::new();
        let queues = vec!["default".to_owned()];
        loop {
            let options = ConsumeOptions {
                max: 1,
                ..ConsumeOptions::default()
            };
            let Some(delivery) = self.broker.consume(&queues, &options).await.unwrap().pop() else {
                return ran;
            };
            let envelope = &delivery.envelope;
            ran.push(envelope.id.clone());
            let revoked = self.revokes.get(&envelope.id).await.unwrap().is_some();
            let args: Value = serde_json::from_str(&envelope.args.data).unwrap();
            let mut status = TaskStatus {
                task: Some(envelope.task.clone()),
                ..TaskStatus::new(envelope.id.clone(), TaskState::Succeeded)
            };
            match compute(&envelope.task, &args) {
                _ if revoked => {
                    status.state = TaskState::Revoked;
                    status.error = Some(failure("revoked", "revoked before it ran"));
                }
                Ok(value) => status.result = Some(Payload::json(value.to_string())),
                Err(message) => {
                    status.state = TaskState::Failed;
                    status.error = Some(failure("failed", &message));
                }
            }
            self.backend.set(&status, None).await.unwrap();
            self.canvases.advance(envelope, &status).await.unwrap();
            if twice {
                self.canvases.advance(envelope, &status).await.unwrap();
            }
            self.broker.ack(&delivery.receipt).await.unwrap();
        }
    }

    async fn status(&self, id: &str) -> Option<TaskStatus> {
        self.backend.get(id).await.unwrap()
    }

    async fn result(&self, id: &str) -> Value {
        let status = self.status(id).await.unwrap();
        assert_eq!(status.state, TaskState::Succeeded, "{status:?}");
        serde_json::from_str(&status.result.unwrap().data).unwrap()
    }
}

fn failure(kind: &str, message: &str) -> TaskFailure {
    TaskFailure {
        kind: kind.into(),
        message: message.into(),
    }
}

fn add(n: i64) -> Node {
    Node::task("t.add", json!({ "add": n }))
}

/// A chain holding a group of chains, a chord, and an immutable step.
fn nested() -> Node {
    Node::chain([
        add(1),
        Node::group([Node::chain([add(10), add(100)]), add(2)]),
        Node::task("t.sum", json!({})),
        Node::chord([add(1)], Node::task("t.sum", json!({}))),
        add(1000).immutable(),
        add(1),
    ])
    .with_id("nested")
}

#[tokio::test]
async fn nested_canvases_pass_results_down_the_tree() {
    let parts = parts().await;
    let submitted = parts.canvases.submit(nested()).await.unwrap();
    assert_eq!((submitted.tasks, submitted.published), (9, 1));
    assert_eq!(
        parts.status("nested").await.unwrap().state,
        TaskState::Pending
    );
    let ran = parts.run_all(false).await;
    assert_eq!(ran.len(), 9, "{ran:?}");
    // 1 → [1+10+100, 1+2] → 114 → chord [115] → 115 → immutable 1000 → 1001.
    assert_eq!(parts.result("nested:1").await, json!([111, 3]));
    assert_eq!(parts.result("nested:3").await, json!(115));
    assert_eq!(parts.result("nested").await, json!(1001));
    let group = parts.status("nested:1:0").await.unwrap();
    assert_eq!(group.task.as_deref(), Some("chain"));
    assert_eq!(group.group_id.as_deref(), Some("nested:1"));

    let tree = parts.canvases.tree("nested").await.unwrap().unwrap();
    assert_eq!(tree.state, TaskState::Succeeded);
    assert_eq!(tree.children.len(), 6);
    assert_eq!(
        tree.children[3].callback.as_ref().unwrap().id,
        "nested:3:cb"
    );
}

#[tokio::test]
async fn advancing_twice_publishes_nothing_twice() {
    let parts = parts().await;
    let members: Vec<Node> = (0..50).map(add).collect();
    let chord = Node::chord(members, Node::task("t.sum", json!({}))).with_id("twice");
    parts.canvases.submit(chord.clone()).await.unwrap();
    let again = parts.canvases.submit(chord).await.unwrap();
    assert_eq!(
        again.published, 0,
        "the same submit again publishes nothing"
    );
    let ran = parts.run_all(true).await;
    assert_eq!(ran.len(), 51, "each member and the callback once: {ran:?}");
    assert_eq!(ran.iter().filter(|id| *id == "twice:cb").count(), 1);
    assert_eq!(parts.result("twice").await, json!((0..50).sum::<i64>()));

    let other = Node::group([add(1)]).with_id("twice");
    assert!(matches!(
        parts.canvases.submit(other).await,
        Err(CanvasError::IdInUse(_))
    ));
}

#[tokio::test]
async fn a_chain_stops_at_its_first_failure_and_runs_link_error() {
    let parts = parts().await;
    let chain = Node::chain([
        add(1).link(Node::task("t.echo", json!({"note": "linked"}))),
        Node::task("t.fail", json!({"message": "boom"})),
        add(1),
    ])
    .link_error(Node::task("t.echo", json!({})))
    .with_id("fails");
    parts.canvases.submit(chain).await.unwrap();
    let ran = parts.run_all(false).await;
    assert_eq!(ran, ["fails:0", "fails:0:link", "fails:1", "fails:err"]);
    let status = parts.status("fails").await.unwrap();
    assert_eq!(status.state, TaskState::Failed);
    let error = status.error.unwrap();
    assert_eq!(error.message, "step fails:1 (t.fail) failed: boom");
    assert!(parts.status("fails:2").await.is_none());
    assert_eq!(
        parts.result("fails:0:link").await,
        json!({"note": "linked", "input": 1})
    );
    let handed = parts.result("fails:err").await;
    assert_eq!(handed["error"]["id"], "fails");
    assert_eq!(handed["error"]["state"], "failed");
    assert_eq!(handed["error"]["message"], error.message);
}

#[tokio::test]
async fn a_failed_member_fails_its_chord_without_the_callback() {
    let parts = parts().await;
    let chord = Node::chord(
        [
            add(1),
            Node::task("t.fail", json!({"message": "no paper"})),
            add(2),
        ],
        Node::task("t.sum", json!({})),
    )
    .link_error(Node::task("t.echo", json!({})))
    .with_id("chord");
    parts.canvases.submit(chord).await.unwrap();
    let ran = parts.run_all(true).await;
    assert!(!ran.contains(&"chord:cb".to_owned()), "{ran:?}");
    assert_eq!(ran.iter().filter(|id| *id == "chord:err").count(), 1);
    let status = parts.status("chord").await.unwrap();
    assert_eq!(status.state, TaskState::Failed);
    assert_eq!(
        status.error.unwrap().message,
        "member chord:1 (t.fail) failed: no paper"
    );
    let tree = parts.canvases.tree("chord").await.unwrap().unwrap();
    assert_eq!(tree.callback.unwrap().state, TaskState::Pending);
}

#[tokio::test]
async fn revoking_a_canvas_revokes_what_has_not_run() {
    let parts = parts().await;
    let chain = Node::chain([add(1), Node::group([add(2), add(3)]), add(4)]).with_id("revoked");
    parts.canvases.submit(chain).await.unwrap();
    let template = Revocation::new("revoked", false, std::time::Duration::from_secs(60));
    let revoked = parts
        .canvases
        .revoke(parts.revokes.as_ref(), "revoked", &template)
        .await
        .unwrap();
    assert_eq!(
        revoked.len(),
        4,
        "every task, published or not: {revoked:?}"
    );
    let ran = parts.run_all(false).await;
    assert_eq!(
        ran,
        ["revoked:0"],
        "the chain stops at its revoked first step"
    );
    assert_eq!(
        parts.status("revoked").await.unwrap().state,
        TaskState::Revoked
    );
    assert_eq!(
        parts.status("revoked:0").await.unwrap().state,
        TaskState::Revoked
    );
    assert!(parts.status("revoked:1:0").await.is_none());
}

#[tokio::test]
async fn unknown_tasks_are_refused_before_anything_is_stored() {
    let parts = parts().await;
    let chain = Node::chain([add(1), Node::task("t.missing", json!({}))]).with_id("unknown");
    let error = parts.canvases.submit(chain).await.unwrap_err();
    assert!(error.to_string().contains("t.missing"), "{error}");
    assert!(parts.canvases.tree("unknown").await.unwrap().is_none());
    assert!(parts.broker.stats("default").await.unwrap().ready == 0);
}

#[tokio::test]
async fn results_too_large_together_fail_the_chord_instead_of_its_callback() {
    let parts = parts_with_limit(200).await;
    let members: Vec<Node> = (0..10)
        .map(|_| Node::task("t.echo", json!({"pad": "x".repeat(40)})))
        .collect();
    let chord = Node::chord(members, Node::task("t.sum", json!({}))).with_id("big");
    parts.canvases.submit(chord).await.unwrap();
    let ran = parts.run_all(false).await;
    assert_eq!(ran.len(), 10, "no callback: {ran:?}");
    let status = parts.status("big").await.unwrap();
    assert_eq!(status.state, TaskState::Failed);
    assert_eq!(status.error.unwrap().kind, "result_too_large");
}

#[tokio::test]
async fn only_the_task_a_node_names_moves_the_canvas() {
    let parts = parts().await;
    parts
        .canvases
        .submit(Node::chain([add(1), add(2)]).with_id("forged"))
        .await
        .unwrap();
    let options = ConsumeOptions::default();
    let queues = vec!["default".to_owned()];
    let delivery = parts
        .broker
        .consume(&queues, &options)
        .await
        .unwrap()
        .pop()
        .unwrap();
    let status = TaskStatus {
        result: Some(Payload::json("1")),
        ..TaskStatus::new("forged:0", TaskState::Succeeded)
    };
    for (id, task) in [
        ("forged:00", "t.add"),
        ("forged:0", "t.sum"),
        ("forged:7", "t.add"),
    ] {
        let mut envelope = delivery.envelope.clone();
        envelope.id = id.to_owned();
        envelope.task = task.to_owned();
        let refused = parts.canvases.advance(&envelope, &status).await;
        assert!(
            matches!(refused, Err(CanvasError::NotInCanvas(_))),
            "{id} {task}"
        );
    }
    assert_eq!(parts.broker.stats("default").await.unwrap().ready, 0);
    assert_eq!(
        parts.status("forged").await.unwrap().state,
        TaskState::Pending
    );
}

#[tokio::test]
async fn every_task_of_a_canvas_continues_one_trace() {
    let parts = parts().await;
    let canvas = Node::chain([Node::group([add(1), add(2)]), add(3)]).with_id("traced");
    parts.canvases.submit(canvas).await.unwrap();
    let queues = vec!["default".to_owned()];
    let mut traces = Vec::new();
    while let Some(delivery) = parts
        .broker
        .consume(&queues, &ConsumeOptions::default())
        .await
        .unwrap()
        .pop()
    {
        let envelope = &delivery.envelope;
        let trace = crate::telemetry::parent(&envelope.headers).expect("a traceparent");
        traces.push(trace.trace_id());
        let status = TaskStatus {
            task: Some(envelope.task.clone()),
            result: Some(Payload::json("1".to_owned())),
            ..TaskStatus::new(envelope.id.clone(), TaskState::Succeeded)
        };
        parts.backend.set(&status, None).await.unwrap();
        parts.canvases.advance(envelope, &status).await.unwrap();
        parts.broker.ack(&delivery.receipt).await.unwrap();
    }
    assert_eq!(traces.len(), 3, "both members and the last step ran");
    assert!(traces.iter().all(|trace| *trace == traces[0]), "{traces:?}");
}
