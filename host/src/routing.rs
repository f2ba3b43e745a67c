//! Routing: the queue, and the priority, a task is published with, from the operator's routing
//! file (`--routing-config`, `STEM_ROUTING_CONFIG`; YAML or JSON). Every producer applies it
//! through [`crate::client::Client`]: the CLI, the Rust client, Beat, canvases and the
//! sub-tasks guests enqueue.
//!
//! The queue is the first of these that applies ([`Routing::decide`] says which):
//! 1. the queue the enqueue names;
//! 2. the first entry of `routes` whose task glob and headers match;
//! 3. the first of `queues` with a `routing_key` equal to the task name, then the first whose
//!    glob (`*` any run of characters, `?` one) matches it;
//! 4. the queue the task declares;
//! 5. `default_queue`.
//!
//! A queue named by an alias of the default queue is the default queue. The priority (the
//! route's, else the enqueue's, else the task's, else 0) is clamped into the chosen queue's
//! `priority_range`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::envelope::{DEFAULT_QUEUE, MAX_PRIORITY, is_valid_queue_name};

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("cannot read the routing file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("the routing file is not valid YAML or JSON: {0}")]
    Syntax(String),
    #[error("{at}: {message}")]
    Invalid { at: String, message: String },
}

fn invalid(at: impl Into<String>, message: impl Into<String>) -> RoutingError {
    RoutingError::Invalid {
        at: at.into(),
        message: message.into(),
    }
}

/// One name or a list of them.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(untagged)]
enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::None => Vec::new(),
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum DefaultQueueFile {
    Name(String),
    Full(DefaultQueue),
}

/// The queue of tasks nothing else routes, the names that mean it, and the queues a worker
/// consuming it also consumes.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultQueue {
    pub queue: String,
    #[serde(default, deserialize_with = "names")]
    pub alias: Vec<String>,
    #[serde(default)]
    pub fallbacks: Vec<String>,
}

fn names<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    OneOrMany::deserialize(deserializer).map(OneOrMany::into_vec)
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueRule {
    /// Task names (exact, or globs) routed to this queue.
    #[serde(default, deserialize_with = "names")]
    pub routing_key: Vec<String>,
    /// `[min, max]`: priorities published to this queue are clamped into it.
    #[serde(default)]
    pub priority_range: Option<[u8; 2]>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// A task-name glob; any task when absent.
    #[serde(default)]
    pub task: Option<String>,
    /// Headers the enqueue must carry, with these values.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(rename = "match", default)]
    pub matches: RouteMatch,
    #[serde(default)]
    pub queue: Option<String>,
    #[serde(default)]
    pub broadcast: Option<String>,
    #[serde(default)]
    pub priority: Option<u8>,
}

/// How a broadcast reaches its subscribers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Every subscriber, at least once, also after a brief disconnection.
    Fanout,
    /// Every subscriber connected at the time, at most once.
    AtMostOnce,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BroadcastRule {
    pub delivery: Delivery,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutingFile {
    #[serde(default)]
    default_queue: Option<DefaultQueueFile>,
    #[serde(default)]
    queues: IndexMap<String, QueueRule>,
    #[serde(default)]
    routes: Vec<Route>,
    #[serde(default)]
    broadcasts: IndexMap<String, BroadcastRule>,
}

/// A checked routing file.
#[derive(Clone, Debug, Serialize)]
pub struct Routing {
    pub default_queue: DefaultQueue,
    pub queues: IndexMap<String, QueueRule>,
    pub routes: Vec<Route>,
    pub broadcasts: IndexMap<String, BroadcastRule>,
}

impl Default for Routing {
    /// No file: the task's own queue, else `default`.
    fn default() -> Routing {
        Routing {
            default_queue: DefaultQueue {
                queue: DEFAULT_QUEUE.to_owned(),
                alias: Vec::new(),
                fallbacks: Vec::new(),
            },
            queues: IndexMap::new(),
            routes: Vec::new(),
            broadcasts: IndexMap::new(),
        }
    }
}

/// What is being enqueued, as far as routing cares.
#[derive(Clone, Copy, Debug, Default)]
pub struct RouteRequest<'a> {
    pub task: &'a str,
    pub headers: Option<&'a BTreeMap<String, String>>,
    /// The queue the enqueue names.
    pub queue: Option<&'a str>,
    pub priority: Option<u8>,
    /// What the task declares.
    pub declared_queue: Option<&'a str>,
    pub declared_priority: Option<u8>,
}

/// Where a task goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Queue(String),
    Broadcast(String),
}

/// A routing decision and why it was made.
#[derive(Clone, Debug, Serialize)]
pub struct Decision {
    pub target: Target,
    pub priority: u8,
    /// Which rule picked the target.
    pub rule: String,
    /// The range the priority was clamped into, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clamped_to: Option<[u8; 2]>,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Queue(queue) => write!(f, "queue {queue}")?,
            Target::Broadcast(name) => write!(f, "broadcast {name}")?,
        }
        write!(f, " at priority {} ({})", self.priority, self.rule)?;
        if let Some([min, max]) = self.clamped_to {
            write!(f, ", clamped into {min}..={max}")?;
        }
        Ok(())
    }
}

impl Routing {
    /// Reads and checks a routing file.
    pub fn load(path: &Path) -> Result<Routing, RoutingError> {
        let text = std::fs::read_to_string(path).map_err(|error| RoutingError::Read {
            path: path.display().to_string(),
            reason: error.to_string(),
        })?;
        Routing::parse(&text)
    }

    /// Reads and checks routing YAML or JSON; every problem names where it is.
    pub fn parse(text: &str) -> Result<Routing, RoutingError> {
        let file: RoutingFile = serde_norway::from_str(text)
            .map_err(|error| RoutingError::Syntax(error.to_string()))?;
        let default_queue = match file.default_queue {
            None => Routing::default().default_queue,
            Some(DefaultQueueFile::Name(queue)) => DefaultQueue {
                queue,
                alias: Vec::new(),
                fallbacks: Vec::new(),
            },
            Some(DefaultQueueFile::Full(full)) => full,
        };
        let queue_names = std::iter::once(&default_queue.queue)
            .chain(&default_queue.alias)
            .chain(&default_queue.fallbacks);
        for name in queue_names {
            check_queue("default_queue", name)?;
        }
        for (name, rule) in &file.queues {
            let at = format!("queues.{name}");
            check_queue(&at, name)?;
            if rule.routing_key.iter().any(String::is_empty) {
                return Err(invalid(at, "a routing_key is empty"));
            }
            if let Some([min, max]) = rule.priority_range {
                if min > max {
                    return Err(invalid(
                        at,
                        format!("priority_range [{min}, {max}] has its minimum above its maximum"),
                    ));
                }
                if max > MAX_PRIORITY {
                    return Err(invalid(
                        at,
                        format!("priority_range [{min}, {max}] goes past {MAX_PRIORITY}"),
                    ));
                }
            }
        }
        for (at, route) in file.routes.iter().enumerate() {
            let at = format!("routes[{at}]");
            match (&route.queue, &route.broadcast) {
                (Some(queue), None) => check_queue(&at, queue)?,
                (None, Some(name)) if !file.broadcasts.contains_key(name) => {
                    return Err(invalid(
                        at,
                        format!("broadcast `{name}` is not declared under `broadcasts`"),
                    ));
                }
                (None, Some(_)) => {}
                _ => return Err(invalid(at, "give one of `queue` and `broadcast`")),
            }
            if let Some(priority) = route.priority
                && priority > MAX_PRIORITY
            {
                return Err(invalid(
                    at,
                    format!("priority {priority} is out of range: use 0 to 9"),
                ));
            }
        }
        for name in file.broadcasts.keys() {
            check_queue(&format!("broadcasts.{name}"), name)?;
        }
        Ok(Routing {
            default_queue,
            queues: file.queues,
            routes: file.routes,
            broadcasts: file.broadcasts,
        })
    }

    /// The queue a name means: the default queue for its aliases, else the name.
    pub fn queue_named<'a>(&'a self, name: &'a str) -> &'a str {
        if self.default_queue.alias.iter().any(|alias| alias == name) {
            &self.default_queue.queue
        } else {
            name
        }
    }

    /// The queues a worker asked for `names` consumes: aliases resolved, and the default
    /// queue's fallbacks after it.
    pub fn worker_queues(&self, names: &[String]) -> Vec<String> {
        let mut queues: Vec<String> = Vec::new();
        for name in names {
            let queue = self.queue_named(name);
            let also = if queue == self.default_queue.queue {
                self.default_queue.fallbacks.as_slice()
            } else {
                &[]
            };
            for queue in std::iter::once(queue).chain(also.iter().map(String::as_str)) {
                if !queues.iter().any(|q| q == queue) {
                    queues.push(queue.to_owned());
                }
            }
        }
        queues
    }

    /// Where `request` goes, and why.
    pub fn decide(&self, request: &RouteRequest<'_>) -> Decision {
        let (target, priority, rule) = self.pick(request);
        let priority = priority.unwrap_or(0);
        let range = match &target {
            Target::Queue(queue) => self.queues.get(queue).and_then(|q| q.priority_range),
            Target::Broadcast(_) => None,
        };
        let (priority, clamped_to) = match range {
            Some([min, max]) if !(min..=max).contains(&priority) => {
                (priority.clamp(min, max), Some([min, max]))
            }
            _ => (priority, None),
        };
        Decision {
            target,
            priority,
            rule,
            clamped_to,
        }
    }

    fn pick(&self, request: &RouteRequest<'_>) -> (Target, Option<u8>, String) {
        let priority = request.priority.or(request.declared_priority);
        if let Some(queue) = request.queue {
            let queue = self.queue_named(queue).to_owned();
            return (
                Target::Queue(queue),
                priority,
                "the enqueue names the queue".into(),
            );
        }
        for (at, route) in self.routes.iter().enumerate() {
            if route.matches.selects(request) {
                let target = match (&route.queue, &route.broadcast) {
                    (Some(queue), _) => Target::Queue(self.queue_named(queue).to_owned()),
                    (None, Some(name)) => Target::Broadcast(name.clone()),
                    (None, None) => continue,
                };
                return (target, route.priority.or(priority), format!("routes[{at}]"));
            }
        }
        for exact in [true, false] {
            for (name, rule) in &self.queues {
                let key = rule.routing_key.iter().find(|key| {
                    if exact {
                        **key == request.task
                    } else {
                        glob_matches(key, request.task)
                    }
                });
                if let Some(key) = key {
                    let rule = format!("queues.{name}.routing_key `{key}`");
                    return (Target::Queue(name.clone()), priority, rule);
                }
            }
        }
        if let Some(queue) = request.declared_queue {
            let queue = self.queue_named(queue).to_owned();
            return (
                Target::Queue(queue),
                priority,
                "the task declares the queue".into(),
            );
        }
        let queue = self.default_queue.queue.clone();
        (Target::Queue(queue), priority, "default_queue".into())
    }
}

impl RouteMatch {
    fn selects(&self, request: &RouteRequest<'_>) -> bool {
        self.task
            .as_deref()
            .is_none_or(|glob| glob_matches(glob, request.task))
            && self.headers.iter().all(|(key, value)| {
                request
                    .headers
                    .and_then(|headers| headers.get(key))
                    .is_some_and(|given| given == value)
            })
    }
}

fn check_queue(at: &str, name: &str) -> Result<(), RoutingError> {
    if crate::worker::is_direct_queue(name) {
        Err(invalid(
            at,
            format!("queue `{name}` is reserved for the broadcast copies of one worker"),
        ))
    } else if is_valid_queue_name(name) {
        Ok(())
    } else {
        Err(invalid(
            at,
            format!("invalid queue name `{name}`: use letters, digits, `.`, `_` and `-`"),
        ))
    }
}

/// Whether `text` matches `glob`: `*` stands for any run of characters, `?` for one.
pub fn glob_matches(glob: &str, text: &str) -> bool {
    let glob: Vec<char> = glob.chars().collect();
    let text: Vec<char> = text.chars().collect();
    // Greedy with one backtrack point, linear in practice: the last `*` seen and where the
    // text stood then.
    let (mut g, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match glob.get(g) {
            Some('*') => {
                star = Some((g, t));
                g += 1;
            }
            Some(&c) if c == '?' || c == text[t] => {
                g += 1;
                t += 1;
            }
            _ => match star {
                Some((star_g, star_t)) => {
                    g = star_g + 1;
                    t = star_t + 1;
                    star = Some((star_g, star_t + 1));
                }
                None => return false,
            },
        }
    }
    glob[g..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed's routing file, verbatim.
    const SEED: &str = include_str!("../tests/fixtures/seed-routing.yaml");

    fn decide(routing: &Routing, task: &str, priority: Option<u8>) -> Decision {
        routing.decide(&RouteRequest {
            task,
            priority,
            ..RouteRequest::default()
        })
    }

    #[test]
    fn the_seeds_file_routes_and_clamps() {
        let routing = Routing::parse(SEED).unwrap();
        let report = decide(&routing, "reports.generate", Some(8));
        assert_eq!(report.target, Target::Queue("reports".into()));
        assert_eq!((report.priority, report.clamped_to), (7, Some([2, 7])));
        let email = decide(&routing, "billing.email-receipt", None);
        assert_eq!(email.target, Target::Queue("emails".into()));
        assert_eq!(email.rule, "queues.emails.routing_key `billing.email-*`");
        let other = decide(&routing, "hello.add", Some(3));
        assert_eq!(other.target, Target::Queue("critical".into()));
        assert_eq!(other.priority, 3);
        assert_eq!(routing.broadcasts["maintenance"].delivery, Delivery::Fanout);
    }

    #[test]
    fn routes_come_first_and_aliases_name_the_default_queue() {
        let routing = Routing::parse(
            r#"{"default_queue": {"queue": "primary", "alias": "default", "fallbacks": ["spare"]},
                "queues": {"reports": {"routing_key": ["reports.*"]}},
                "routes": [{"match": {"task": "reports.*", "headers": {"tenant": "acme"}},
                            "queue": "acme", "priority": 9}],
                "broadcasts": {}}"#,
        )
        .unwrap();
        let headers = BTreeMap::from([("tenant".to_owned(), "acme".to_owned())]);
        let acme = routing.decide(&RouteRequest {
            task: "reports.render",
            headers: Some(&headers),
            ..RouteRequest::default()
        });
        assert_eq!(
            (acme.target, acme.priority),
            (Target::Queue("acme".into()), 9)
        );
        assert_eq!(acme.rule, "routes[0]");
        let named = routing.decide(&RouteRequest {
            task: "reports.render",
            queue: Some("default"),
            ..RouteRequest::default()
        });
        assert_eq!(named.target, Target::Queue("primary".into()));
        let declared = routing.decide(&RouteRequest {
            task: "media.resize",
            declared_queue: Some("media"),
            ..RouteRequest::default()
        });
        assert_eq!(declared.target, Target::Queue("media".into()));
        assert_eq!(
            routing.worker_queues(&["default".into(), "media".into()]),
            ["primary", "spare", "media"]
        );
    }

    #[test]
    fn mistakes_are_refused_with_where_they_are() {
        let refused = |text: &str| Routing::parse(text).unwrap_err().to_string();
        assert_eq!(
            refused("queues: {reports: {priority_range: [7, 2]}}"),
            "queues.reports: priority_range [7, 2] has its minimum above its maximum"
        );
        assert!(refused("routes: [{queue: a, broadcast: b}]").contains("routes[0]: give one"));
        assert!(refused("routes: [{broadcast: gone}]").contains("is not declared"));
        assert!(refused("queues: {\"bad:name\": {}}").contains("invalid queue name"));
        assert!(refused("queus: {}").contains("unknown field"));
        assert!(refused("broadcasts: {x: {delivery: sometimes}}").contains("unknown variant"));
    }

    #[test]
    fn globs_match_runs_and_single_characters() {
        assert!(glob_matches("billing.email-*", "billing.email-receipt"));
        assert!(glob_matches("*.render", "reports.render"));
        assert!(glob_matches("a*b*c", "axxbyyc"));
        assert!(glob_matches("report?.x", "reports.x"));
        assert!(!glob_matches("billing.email-*", "billing.invoice"));
        assert!(!glob_matches("a*b", "acd"));
        assert!(glob_matches("*", ""));
    }
}
