//! Canvases: tasks composed into chains, groups and chords, which a task submits as its child
//! with [`TaskContext::submit`](crate::TaskContext::submit) (or `chain`, `group`, `chord`).
//!
//! - A [`chain`] runs its steps one after the other. A step that is not
//!   [`immutable`](Node::immutable) receives the previous step's result in its arguments under
//!   the key `input`.
//! - A [`group`] runs its members in parallel; its result is the list of their results, in
//!   order.
//! - A [`chord`] is a group whose list of results goes to a callback, under `input`.
//! - Any node may carry a [`link`](Node::link) task, which gets the node's result as `input`
//!   once it succeeds, and a [`link_error`](Node::link_error) task, which gets
//!   `{"error": {"id", "task", "kind", "message"}}` merged into its arguments once it fails.
//!
//! A [`Node`] serialises to the JSON spec of the README's Canvas section; the host checks it
//! (task names, queues, where each field may appear) and refuses a bad one with a message
//! naming the node, which the guest receives as a failure.

use serde::{Serialize, Serializer};
use serde_json::Value;

/// One node of a canvas: a task, a chain, a group or a chord.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Node {
    #[serde(flatten)]
    kind: Kind,
    /// Task nodes only: the host refuses these on a chain, group or chord.
    #[serde(skip_serializing_if = "Option::is_none")]
    queue: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_retries: Option<u32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    immutable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    link: Option<Box<Node>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    link_error: Option<Box<Node>>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
enum Kind {
    Task { task: String, args: Args },
    Chain { chain: Vec<Node> },
    Group { group: Vec<Node> },
    Chord { chord: Chord },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
struct Chord {
    header: Vec<Node>,
    callback: Box<Node>,
}

/// A task's arguments as JSON, or why they could not be encoded: the error surfaces when the
/// canvas is serialised, so that builders compose without a `?` at every task.
#[derive(Clone, Debug, PartialEq)]
struct Args(Result<Value, String>);

impl Serialize for Args {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Ok(value) => value.serialize(serializer),
            Err(message) => Err(serde::ser::Error::custom(message)),
        }
    }
}

impl Node {
    fn new(kind: Kind) -> Node {
        Node {
            kind,
            queue: None,
            priority: None,
            max_retries: None,
            immutable: false,
            link: None,
            link_error: None,
        }
    }

    /// The queue a task node is published to, instead of its declared one. Like `priority`
    /// and `max_retries`, it belongs on task nodes only.
    pub fn queue(mut self, queue: impl Into<String>) -> Node {
        self.queue = Some(queue.into());
        self
    }

    /// 0 (lowest) to 9 (highest), instead of the task's declared priority.
    pub fn priority(mut self, priority: u8) -> Node {
        self.priority = Some(priority);
        self
    }

    /// Retries of a task node, instead of its declared maximum.
    pub fn max_retries(mut self, max_retries: u32) -> Node {
        self.max_retries = Some(max_retries);
        self
    }

    /// The node does not receive the previous step's result as `input`.
    pub fn immutable(mut self) -> Node {
        self.immutable = true;
        self
    }

    /// A task run with this node's result as `input` once the node succeeds.
    pub fn link(mut self, callback: Node) -> Node {
        self.link = Some(Box::new(callback));
        self
    }

    /// A task run once this node fails or is revoked, with
    /// `{"error": {"id", "task", "kind", "message"}}` merged into its arguments.
    pub fn link_error(mut self, callback: Node) -> Node {
        self.link_error = Some(Box::new(callback));
        self
    }
}

/// A task node. `args` must serialise to a JSON object, since `input` is added to it; an
/// encoding error fails the submit, naming the task.
pub fn task<A: Serialize + ?Sized>(name: impl Into<String>, args: &A) -> Node {
    let task = name.into();
    let args = serde_json::to_value(args)
        .map_err(|e| format!("arguments of canvas task `{task}` cannot be encoded as JSON: {e}"));
    Node::new(Kind::Task {
        task,
        args: Args(args),
    })
}

/// Steps run one after the other, each (unless immutable) given the previous result.
pub fn chain(steps: impl IntoIterator<Item = Node>) -> Node {
    Node::new(Kind::Chain {
        chain: steps.into_iter().collect(),
    })
}

/// Members run in parallel; the result is the list of theirs, in order.
pub fn group(members: impl IntoIterator<Item = Node>) -> Node {
    Node::new(Kind::Group {
        group: members.into_iter().collect(),
    })
}

/// A group whose list of results, in order, goes to `callback` as `input`.
pub fn chord(header: impl IntoIterator<Item = Node>, callback: Node) -> Node {
    Node::new(Kind::Chord {
        chord: Chord {
            header: header.into_iter().collect(),
            callback: Box::new(callback),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn builders_produce_the_spec() {
        let canvas = chain([
            task("media.resize", &json!({"file": "hero.png"}))
                .queue("media")
                .priority(5)
                .max_retries(2)
                .link(task("media.notify", &json!({})))
                .link_error(task("media.alert", &json!({"to": "ops"}))),
            chord(
                [task("reports.render", &json!({"week": "2024-W28"}))],
                task(
                    "billing.email-receipt",
                    &json!({"to": "finance@example.com"}),
                ),
            )
            .immutable(),
            group([task("canvas.add", &json!({"add": 1}))]),
        ]);
        assert_eq!(
            serde_json::to_string(&canvas).unwrap(),
            concat!(
                r#"{"chain":[{"task":"media.resize","args":{"file":"hero.png"},"queue":"media","#,
                r#""priority":5,"max_retries":2,"link":{"task":"media.notify","args":{}},"#,
                r#""link_error":{"task":"media.alert","args":{"to":"ops"}}},"#,
                r#"{"chord":{"header":[{"task":"reports.render","args":{"week":"2024-W28"}}],"#,
                r#""callback":{"task":"billing.email-receipt","#,
                r#""args":{"to":"finance@example.com"}}},"immutable":true},"#,
                r#"{"group":[{"task":"canvas.add","args":{"add":1}}]}]}"#
            )
        );
    }

    #[test]
    fn arguments_that_cannot_be_encoded_fail_the_canvas() {
        let mut map = std::collections::HashMap::new();
        map.insert((1, 2), "a key JSON cannot hold");
        let error = serde_json::to_string(&group([task("canvas.echo", &map)])).unwrap_err();
        assert!(
            error.to_string().contains("canvas task `canvas.echo`"),
            "{error}"
        );
    }
}
