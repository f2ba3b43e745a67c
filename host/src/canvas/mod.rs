//! Canvas: tasks composed into chains, groups and chords, driven by the workers that run them.
//!
//! A canvas is a tree of [`Node`]s: a task, a `chain` (each step gets the previous step's
//! result as `input`, unless the step is `immutable`), a `group` (members in parallel; its
//! result is the list of their results, in order) or a `chord` (a group whose list of results
//! goes to a callback). Any node may carry a `link` task (run with the node's result) and a
//! `link_error` task (run with its error). The same tree is the JSON/YAML spec `canvas submit`
//! reads, the value the SDK's builders produce, and what the backend stores.
//!
//! How it moves ([`Canvases`]):
//! - Submitting stores the tree once in the result backend, under the canvas id, and publishes
//!   the tasks that start it. The submitter may exit at once.
//! - Every node has a task id derived from the canvas id and its position ([`node_id`]):
//!   `C` for the root, `C:2` for its third child, `C:2:cb` for a chord's callback, `C:0:link`
//!   and `C:0:err` for callbacks. Tasks carry the canvas id in the [`CANVAS_HEADER`] header.
//! - When a task of a canvas reaches a terminal state, the worker that ran it records the
//!   status, then advances the canvas before it acks the delivery: it publishes the next chain
//!   step, counts a group member, and once a group is complete publishes the chord callback or
//!   moves up. A composite node's status is recorded under its own id when it finishes, so
//!   `result get`/`result wait` work on any node, the whole canvas included.
//! - Everything an advance publishes goes through [`Broker::publish_unique`] under the derived
//!   id, and every write is idempotent (statuses never leave a terminal state, group members
//!   count once). A worker that crashes mid-advance leaves its delivery unacked; whoever
//!   receives it again finds the status recorded and advances again, publishing nothing
//!   twice. That is what makes a chord callback run once.
//!
//! Failure: a chain stops at the first step that ends in `failed` or `revoked` and takes that
//! state, with an error naming the step; a group or chord takes the state of its first member
//! that fails, names it, and never runs its callback. Revoking a canvas ([`Canvases::revoke`])
//! revokes every task of it that has not finished, including those not yet published.
//!
//! [`Broker::publish_unique`]: crate::broker::Broker::publish_unique

mod engine;
pub mod spec;
#[cfg(test)]
mod tests;

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use engine::{CanvasError, Canvases, Origin, Submitted, TreeNode};

/// The header that marks a task as part of a canvas; its value is the canvas id.
pub const CANVAS_HEADER: &str = "stem-canvas";

/// The key under which a step receives what came before it.
pub const INPUT_KEY: &str = "input";

/// The key under which a `link_error` task receives the error.
pub const ERROR_KEY: &str = "error";

/// One node of a canvas: exactly one of `task`, `chain`, `group`, `chord`
/// ([`spec::validate`] checks it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// The canvas id; only on the root, and optional there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// A task node: the task name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// A task's arguments: a JSON object (`{}` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<Vec<Node>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<Vec<Node>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chord: Option<Chord>,
    /// Does not receive the previous step's result.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub immutable: bool,
    /// A task run with this node's result once it succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<Box<Node>>,
    /// A task run with this node's error once it fails or is revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_error: Option<Box<Node>>,
}

/// A group and the callback that receives its results.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chord {
    pub header: Vec<Node>,
    pub callback: Box<Node>,
}

/// What a node is, once validated.
#[derive(Clone, Copy, Debug)]
pub enum Kind<'a> {
    Task(&'a str),
    Chain(&'a [Node]),
    Group(&'a [Node]),
    Chord(&'a Chord),
}

impl Kind<'_> {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Task(_) => "task",
            Kind::Chain(_) => "chain",
            Kind::Group(_) => "group",
            Kind::Chord(_) => "chord",
        }
    }
}

impl Node {
    /// A task with JSON-object arguments.
    pub fn task(name: impl Into<String>, args: Value) -> Node {
        Node {
            task: Some(name.into()),
            args: Some(args),
            ..Node::default()
        }
    }

    pub fn chain(steps: impl IntoIterator<Item = Node>) -> Node {
        Node {
            chain: Some(steps.into_iter().collect()),
            ..Node::default()
        }
    }

    pub fn group(members: impl IntoIterator<Item = Node>) -> Node {
        Node {
            group: Some(members.into_iter().collect()),
            ..Node::default()
        }
    }

    pub fn chord(header: impl IntoIterator<Item = Node>, callback: Node) -> Node {
        Node {
            chord: Some(Chord {
                header: header.into_iter().collect(),
                callback: Box::new(callback),
            }),
            ..Node::default()
        }
    }

    pub fn with_id(mut self, id: impl Into<String>) -> Node {
        self.id = Some(id.into());
        self
    }

    pub fn queue(mut self, queue: impl Into<String>) -> Node {
        self.queue = Some(queue.into());
        self
    }

    pub fn priority(mut self, priority: u8) -> Node {
        self.priority = Some(priority);
        self
    }

    pub fn immutable(mut self) -> Node {
        self.immutable = true;
        self
    }

    pub fn link(mut self, callback: Node) -> Node {
        self.link = Some(Box::new(callback));
        self
    }

    pub fn link_error(mut self, callback: Node) -> Node {
        self.link_error = Some(Box::new(callback));
        self
    }

    /// What the node is. Only meaningful once [`spec::validate`] accepted the tree: a node
    /// with none of the four is read as an empty chain.
    pub fn kind(&self) -> Kind<'_> {
        if let Some(task) = &self.task {
            Kind::Task(task)
        } else if let Some(members) = &self.group {
            Kind::Group(members)
        } else if let Some(chord) = &self.chord {
            Kind::Chord(chord)
        } else {
            Kind::Chain(self.chain.as_deref().unwrap_or_default())
        }
    }

    /// A chain's steps, a group's members or a chord's header; none for a task.
    pub fn members(&self) -> &[Node] {
        match self.kind() {
            Kind::Task(_) => &[],
            Kind::Chain(nodes) | Kind::Group(nodes) => nodes,
            Kind::Chord(chord) => &chord.header,
        }
    }

    /// The child at `step`, if there is one.
    pub fn child(&self, step: Step) -> Option<&Node> {
        match (step, self.kind()) {
            (Step::Link, _) => self.link.as_deref(),
            (Step::LinkError, _) => self.link_error.as_deref(),
            (Step::Index(at), Kind::Chain(nodes) | Kind::Group(nodes)) => nodes.get(at as usize),
            (Step::Index(at), Kind::Chord(chord)) => chord.header.get(at as usize),
            (Step::Callback, Kind::Chord(chord)) => Some(&chord.callback),
            _ => None,
        }
    }

    /// The node at `path` below this one.
    pub fn at(&self, path: &[Step]) -> Option<&Node> {
        path.iter().try_fold(self, |node, step| node.child(*step))
    }
}

/// One step of a path from the root to a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// A chain step, a group member or a chord header member.
    Index(u32),
    /// A chord's callback.
    Callback,
    Link,
    LinkError,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Index(at) => write!(f, "{at}"),
            Step::Callback => f.write_str("cb"),
            Step::Link => f.write_str("link"),
            Step::LinkError => f.write_str("err"),
        }
    }
}

impl Step {
    fn parse(text: &str) -> Option<Step> {
        match text {
            "cb" => Some(Step::Callback),
            "link" => Some(Step::Link),
            "err" => Some(Step::LinkError),
            _ if text.bytes().all(|b| b.is_ascii_digit()) => text.parse().ok().map(Step::Index),
            _ => None,
        }
    }
}

/// The task id of the node at `path` in canvas `canvas`.
pub fn node_id(canvas: &str, path: &[Step]) -> String {
    let mut id = canvas.to_owned();
    for step in path {
        id.push(':');
        id.push_str(&step.to_string());
    }
    id
}

/// The path of the node whose task id is `id` in canvas `canvas`.
pub fn node_path(canvas: &str, id: &str) -> Option<Vec<Step>> {
    let rest = id.strip_prefix(canvas)?;
    if rest.is_empty() {
        return Some(Vec::new());
    }
    rest.strip_prefix(':')?
        .split(':')
        .map(Step::parse)
        .collect()
}

#[cfg(test)]
mod path_tests {
    use super::*;

    #[test]
    fn ids_and_paths_round_trip() {
        let path = [
            Step::Index(2),
            Step::Callback,
            Step::LinkError,
            Step::Index(10),
        ];
        let id = node_id("image-assets", &path);
        assert_eq!(id, "image-assets:2:cb:err:10");
        assert_eq!(node_path("image-assets", &id).unwrap(), path);
        assert_eq!(node_path("image-assets", "image-assets").unwrap(), []);
        assert_eq!(node_path("image-assets", "image-assets:x"), None);
        assert_eq!(node_path("image-assets", "other:1"), None);
        assert_eq!(node_path("a", "ab:1"), None);
    }

    #[test]
    fn paths_reach_every_kind_of_child() {
        let tree = Node::chain([
            Node::task("a.b", serde_json::json!({})).link(Node::task("a.link", Value::Null)),
            Node::chord(
                [
                    Node::task("a.m0", Value::Null),
                    Node::task("a.m1", Value::Null),
                ],
                Node::task("a.cb", Value::Null),
            ),
        ]);
        let name = |path: &[Step]| tree.at(path).and_then(|n| n.task.clone());
        assert_eq!(name(&[Step::Index(0), Step::Link]).unwrap(), "a.link");
        assert_eq!(name(&[Step::Index(1), Step::Index(1)]).unwrap(), "a.m1");
        assert_eq!(name(&[Step::Index(1), Step::Callback]).unwrap(), "a.cb");
        assert!(tree.at(&[Step::Index(2)]).is_none());
        assert!(tree.at(&[Step::Callback]).is_none());
    }
}
