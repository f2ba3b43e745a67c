//! The canvas spec: reading a tree from JSON or YAML, and the checks every canvas passes
//! before anything of it is stored or published.

use serde_json::Value;

use super::{Kind, Node, Step, node_id};
use crate::envelope::{MAX_PRIORITY, MAX_TASK_ID_LEN, is_valid_queue_name};
use crate::task::is_valid_task_name;

/// Most task nodes in one canvas.
pub const MAX_TASKS: usize = 100_000;

/// Longest canvas id a producer may choose.
pub const MAX_CANVAS_ID_LEN: usize = 128;

/// Why a spec was refused; `at` names the node (its position, as in task ids).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("the canvas spec is not valid JSON or YAML: {0}")]
    Syntax(String),
    #[error("{at}: {message}")]
    Node { at: String, message: String },
    #[error(
        "invalid canvas id `{0}`: use 1 to {MAX_CANVAS_ID_LEN} letters, digits, `.`, `_`, `-` \
         and `@` (no `:`, which separates the positions of its tasks)"
    )]
    CanvasId(String),
    #[error("the canvas has {0} tasks, over the limit of {MAX_TASKS}")]
    TooManyTasks(usize),
    #[error(
        "the canvas id is too long for its deepest task: `{0}` is over {MAX_TASK_ID_LEN} bytes"
    )]
    IdTooLong(String),
}

/// Reads a spec from JSON or YAML text.
pub fn parse(text: &str) -> Result<Node, SpecError> {
    serde_norway::from_str(text).map_err(|error| SpecError::Syntax(error.to_string()))
}

/// Whether `id` may name a canvas.
pub fn is_valid_canvas_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CANVAS_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
}

/// Checks a whole tree whose canvas will be `canvas_id`; returns how many tasks it has.
pub fn validate(root: &Node, canvas_id: &str) -> Result<usize, SpecError> {
    let mut tasks = 0;
    let mut stack = vec![(root, Vec::new())];
    while let Some((node, path)) = stack.pop() {
        let at = || position(&path);
        let fail = |message: String| SpecError::Node { at: at(), message };
        if node.id.is_some() && !path.is_empty() {
            return Err(fail("only the root may carry an `id`".into()));
        }
        let kinds = [
            node.task.is_some(),
            node.chain.is_some(),
            node.group.is_some(),
            node.chord.is_some(),
        ];
        match kinds.iter().filter(|set| **set).count() {
            1 => {}
            0 => {
                return Err(fail(
                    "give one of `task`, `chain`, `group` or `chord`".into(),
                ));
            }
            _ => {
                return Err(fail(
                    "give only one of `task`, `chain`, `group` and `chord`".into(),
                ));
            }
        }
        let is_callback = matches!(path.last(), Some(Step::Link | Step::LinkError));
        match node.kind() {
            Kind::Task(name) => {
                tasks += 1;
                check_task(node, name).map_err(fail)?;
                let id = node_id(canvas_id, &path);
                if id.len() > MAX_TASK_ID_LEN {
                    return Err(SpecError::IdTooLong(id));
                }
            }
            kind => {
                if node.args.is_some()
                    || node.queue.is_some()
                    || node.priority.is_some()
                    || node.max_retries.is_some()
                {
                    return Err(fail(format!(
                        "`args`, `queue`, `priority` and `max_retries` belong on tasks, not on \
                         a {}",
                        kind.label()
                    )));
                }
                if is_callback {
                    return Err(fail("`link` and `link_error` callbacks are tasks".into()));
                }
                let members = node.members();
                if members.is_empty() {
                    let what = if matches!(kind, Kind::Chord(_)) {
                        "a chord's header"
                    } else {
                        kind.label()
                    };
                    return Err(fail(format!("{what} needs at least one node")));
                }
                // Counted before they are looked at: a huge flat group is refused at once.
                if tasks + members.len() > MAX_TASKS {
                    return Err(SpecError::TooManyTasks(tasks + members.len()));
                }
                for at in 0..members.len() {
                    let step = Step::Index(
                        u32::try_from(at).map_err(|_| SpecError::TooManyTasks(members.len()))?,
                    );
                    stack.push((&members[at], [path.as_slice(), &[step]].concat()));
                }
                if let Kind::Chord(chord) = kind {
                    stack.push((
                        &chord.callback,
                        [path.as_slice(), &[Step::Callback]].concat(),
                    ));
                }
            }
        }
        if tasks > MAX_TASKS {
            return Err(SpecError::TooManyTasks(tasks));
        }
        if is_callback && (node.link.is_some() || node.link_error.is_some()) {
            return Err(fail(
                "a `link` or `link_error` callback has no callbacks of its own".into(),
            ));
        }
        if let Some(link) = &node.link {
            stack.push((link, [path.as_slice(), &[Step::Link]].concat()));
        }
        if let Some(link_error) = &node.link_error {
            stack.push((link_error, [path.as_slice(), &[Step::LinkError]].concat()));
        }
    }
    Ok(tasks)
}

/// Checks one task node's own fields.
fn check_task(node: &Node, name: &str) -> Result<(), String> {
    if !is_valid_task_name(name) {
        return Err(format!(
            "invalid task name `{name}`: use letters, digits, `.`, `_`, `-` and `:`"
        ));
    }
    if let Some(queue) = &node.queue
        && !is_valid_queue_name(queue)
    {
        return Err(format!("invalid queue name `{queue}`"));
    }
    if let Some(priority) = node.priority
        && priority > MAX_PRIORITY
    {
        return Err(format!("priority {priority} is out of range: use 0 to 9"));
    }
    match &node.args {
        None | Some(Value::Object(_)) => Ok(()),
        Some(other) => Err(format!(
            "the arguments of `{name}` must be a JSON object (the previous step's result is \
             added to it as `input`), not {}",
            describe(other)
        )),
    }
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// How errors name a node: `root`, or its position as in task ids (`2:cb`).
fn position(path: &[Step]) -> String {
    if path.is_empty() {
        return "root".to_owned();
    }
    let steps: Vec<String> = path.iter().map(Step::to_string).collect();
    format!("node {}", steps.join(":"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> String {
        let node = parse(text).unwrap();
        validate(&node, "c").unwrap_err().to_string()
    }

    #[test]
    fn reads_yaml_and_json_alike() {
        let yaml = "chord:\n  header:\n    - task: reports.render\n      args: {week: 2024-W28}\n  \
                    callback: {task: billing.email-receipt, queue: emails}\n";
        let json = r#"{"chord": {"header": [{"task": "reports.render", "args": {"week": "2024-W28"}}],
                       "callback": {"task": "billing.email-receipt", "queue": "emails"}}}"#;
        assert_eq!(parse(yaml).unwrap(), parse(json).unwrap());
        assert_eq!(validate(&parse(yaml).unwrap(), "c"), Ok(2));
    }

    #[test]
    fn refusals_name_the_node_and_the_problem() {
        assert!(
            refused(r#"{"chain": [{"task": "a.b"}, {"task": "a.c", "group": [{"task": "a.d"}]}]}"#)
                .starts_with("node 1: give only one")
        );
        assert!(refused(r#"{"chain": []}"#).contains("chain needs at least one node"));
        assert!(
            refused(r#"{"group": [{"task": "a b"}]}"#).starts_with("node 0: invalid task name")
        );
        assert!(refused(r#"{"chain": [{"task": "a.b", "args": [1]}]}"#).contains("not an array"));
        assert!(
            refused(r#"{"group": [{"task": "a.b"}], "queue": "q"}"#).contains("belong on tasks")
        );
        assert!(
            refused(r#"{"task": "a.b", "link": {"chain": [{"task": "a.c"}]}}"#)
                .starts_with("node link: `link` and `link_error` callbacks are tasks")
        );
        assert!(refused(r#"{"chain": [{"task": "a.b", "id": "x"}]}"#).contains("only the root"));
        assert!(refused(r#"{"task": "a.b", "priority": 12}"#).contains("out of range"));
        assert!(
            parse(r#"{"tsk": "a.b"}"#)
                .unwrap_err()
                .to_string()
                .contains("unknown field")
        );
    }

    #[test]
    fn canvas_ids_cannot_collide_with_positions() {
        assert!(is_valid_canvas_id("image-assets"));
        assert!(is_valid_canvas_id("nightly@2026-12-01"));
        assert!(!is_valid_canvas_id("a:1"));
        assert!(!is_valid_canvas_id(""));
        let long = "x".repeat(MAX_TASK_ID_LEN - 2);
        let deep = parse(r#"{"chain": [{"chain": [{"task": "a.b"}]}]}"#).unwrap();
        assert!(matches!(
            validate(&deep, &long),
            Err(SpecError::IdTooLong(_))
        ));
    }
}
