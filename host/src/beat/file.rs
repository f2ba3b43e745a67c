//! The schedule file (YAML or JSON) and what applying it changes.
//!
//! ```yaml
//! entries:
//!   - id: nightly-report
//!     task: reports.generate
//!     args: {customerId: 42}
//!     cron: "0 2 * * *"          # or every: 30s, run_at: ..., solar: sunrise
//!     timezone: Europe/Berlin
//!     queue: reports
//! ```
//!
//! The file is a list of entries, or an object with an `entries` list. Every entry is checked
//! before anything is written; the errors name the entry and the field.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::time::Duration;

use jiff::tz::TimeZone;
use serde_json::{Map, Value};

use crate::envelope::{MAX_PRIORITY, is_valid_queue_name};
use crate::schedule::{Schedule, ScheduleError, SolarEvent, time_zone};
use crate::stores::schedule::{CatchUp, EntryDefinition, Overlap, ScheduleEntry};
use crate::time::Timestamp;

/// The longest entry id: with the slot appended it must still be a valid task id.
pub const MAX_ENTRY_ID_LEN: usize = 200;
/// Bounds on the durations an entry may give.
const MIN_INTERVAL: Duration = Duration::from_secs(1);
const MAX_INTERVAL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
const MAX_JITTER: Duration = Duration::from_secs(24 * 3600);
const MAX_TASK_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// One entry of a schedule file, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct EntrySpec {
    pub id: String,
    pub definition: EntryDefinition,
}

/// What is wrong with one field of one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The entry's id, or `#N` (1-based) when it has none.
    pub entry: String,
    pub field: String,
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "entry `{}`, field `{}`: {}",
            self.entry, self.field, self.reason
        )
    }
}

/// Why a schedule file was refused: it does not parse, or these entries are invalid.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("the schedule file is not valid YAML or JSON: {0}")]
    Syntax(String),
    #[error("the schedule file must be a list of entries or an object with an `entries` list")]
    Shape,
    #[error("{} invalid: {}", plural(.0.len()), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldError>),
}

fn plural(count: usize) -> String {
    match count {
        1 => "1 field is".to_owned(),
        n => format!("{n} fields are"),
    }
}

const FIELDS: &[&str] = &[
    "id",
    "task",
    "args",
    "every",
    "cron",
    "run_at",
    "solar",
    "latitude",
    "longitude",
    "start_at",
    "end_at",
    "timezone",
    "queue",
    "priority",
    "max_retries",
    "time_limit",
    "soft_time_limit",
    "expires",
    "headers",
    "enabled",
    "jitter",
    "expire_at",
    "catch_up",
    "overlap",
    "meta",
];

/// Parses and checks a whole schedule file.
pub fn parse(text: &str) -> Result<Vec<EntrySpec>, FileError> {
    let document: Value =
        serde_norway::from_str(text).map_err(|e| FileError::Syntax(e.to_string()))?;
    let items = match document {
        Value::Array(items) => items,
        Value::Object(mut object) if object.len() == 1 => match object.remove("entries") {
            Some(Value::Array(items)) => items,
            _ => return Err(FileError::Shape),
        },
        Value::Null => Vec::new(),
        _ => return Err(FileError::Shape),
    };
    let mut errors = Vec::new();
    let mut specs = Vec::new();
    let mut seen = HashSet::new();
    for (index, item) in items.iter().enumerate() {
        let label = item
            .get("id")
            .and_then(Value::as_str)
            .map_or_else(|| format!("#{}", index + 1), str::to_owned);
        let Value::Object(fields) = item else {
            errors.push(FieldError {
                entry: label,
                field: "(entry)".into(),
                reason: "an entry must be a mapping of fields".into(),
            });
            continue;
        };
        match parse_entry(fields) {
            Ok(spec) => {
                if !seen.insert(spec.id.clone()) {
                    errors.push(FieldError {
                        entry: label,
                        field: "id".into(),
                        reason: "another entry has the same id".into(),
                    });
                }
                specs.push(spec);
            }
            Err(failures) => {
                errors.extend(failures.into_iter().map(|(field, reason)| FieldError {
                    entry: label.clone(),
                    field,
                    reason,
                }))
            }
        }
    }
    if errors.is_empty() {
        Ok(specs)
    } else {
        Err(FileError::Invalid(errors))
    }
}

type Failures = Vec<(String, String)>;

/// Reads the fields of one entry, collecting every problem.
struct Reader<'a> {
    fields: &'a Map<String, Value>,
    failures: Failures,
}

impl Reader<'_> {
    fn fail(&mut self, field: &str, reason: impl Into<String>) {
        self.failures.push((field.to_owned(), reason.into()));
    }

    fn has(&self, field: &str) -> bool {
        self.fields.get(field).is_some_and(|v| !v.is_null())
    }

    fn string(&mut self, field: &str) -> Option<String> {
        match self.fields.get(field)? {
            Value::Null => None,
            Value::String(text) => Some(text.clone()),
            other => {
                self.fail(field, format!("expected text, found {other}"));
                None
            }
        }
    }

    fn number(&mut self, field: &str) -> Option<f64> {
        match self.fields.get(field)? {
            Value::Null => None,
            Value::Number(number) => number.as_f64(),
            other => {
                self.fail(field, format!("expected a number, found {other}"));
                None
            }
        }
    }

    fn whole(&mut self, field: &str, max: u64) -> Option<u64> {
        let value = self.fields.get(field)?;
        match value.as_u64() {
            Some(n) if n <= max => Some(n),
            _ if value.is_null() => None,
            _ => {
                self.fail(
                    field,
                    format!("expected a whole number 0..{max}, found {value}"),
                );
                None
            }
        }
    }

    fn boolean(&mut self, field: &str) -> Option<bool> {
        match self.fields.get(field)? {
            Value::Null => None,
            Value::Bool(flag) => Some(*flag),
            other => {
                self.fail(field, format!("expected true or false, found {other}"));
                None
            }
        }
    }

    /// `30s`, `5m`, `1h 30m`, `500ms`; a bare number is seconds. At most `max`.
    fn duration(&mut self, field: &str, max: Duration) -> Option<Duration> {
        let value = self.fields.get(field)?;
        let parsed = match value {
            Value::Null => return None,
            Value::Number(n) => n
                .as_f64()
                .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
                .ok_or_else(|| format!("{n} is not a duration")),
            Value::String(text) => humantime::parse_duration(text)
                .map_err(|e| format!("`{text}` is not a duration ({e}); write e.g. 30s, 5m, 1h")),
            other => Err(format!("expected a duration such as 30s, found {other}")),
        };
        let checked = parsed.and_then(|duration| match duration <= max {
            true => Ok(duration),
            false => Err(format!(
                "{} is longer than the {} allowed",
                humantime::format_duration(duration),
                humantime::format_duration(max)
            )),
        });
        checked.map_err(|reason| self.fail(field, reason)).ok()
    }

    /// An instant: RFC 3339 with an offset, or a wall-clock time in the entry's time zone.
    fn instant(&mut self, field: &str, zone: &TimeZone) -> Option<Timestamp> {
        let text = self.string(field)?;
        let parsed = text
            .parse::<jiff::Timestamp>()
            .ok()
            .or_else(|| {
                let civil: jiff::civil::DateTime = text.parse().ok()?;
                Some(civil.to_zoned(zone.clone()).ok()?.timestamp())
            })
            .and_then(|at| u64::try_from(at.as_millisecond()).ok());
        match parsed {
            Some(millis) => Some(Timestamp::from_millis(millis)),
            None => {
                self.fail(
                    field,
                    format!(
                        "`{text}` is not a time; write e.g. 2026-12-24T18:00:00Z, or \
                         2026-12-24T18:00 in the entry's timezone"
                    ),
                );
                None
            }
        }
    }
}

fn parse_entry(fields: &Map<String, Value>) -> Result<EntrySpec, Failures> {
    let mut read = Reader {
        fields,
        failures: Vec::new(),
    };
    for name in fields.keys() {
        if !FIELDS.contains(&name.as_str()) {
            read.fail(
                name,
                format!("unknown field; the fields are {}", FIELDS.join(", ")),
            );
        }
    }
    let id = read.string("id");
    match &id {
        None => read.fail("id", "every entry needs an id"),
        Some(id) => {
            if let Err(reason) = check_id(id) {
                read.fail("id", reason);
            }
        }
    }
    let task = read.string("task");
    match &task {
        None if !read.has("task") => {
            read.fail("task", "every entry needs the name of the task to enqueue")
        }
        Some(name) if name.is_empty() => read.fail("task", "the task name is empty"),
        _ => {}
    }
    let args = match fields.get("args") {
        None | Some(Value::Null) => "{}".to_owned(),
        Some(value) => value.to_string(),
    };
    let timezone = read.string("timezone");
    let zone = match time_zone(timezone.as_deref()) {
        Ok(zone) => zone,
        Err(error) => {
            read.fail(error.field, error.reason);
            TimeZone::UTC
        }
    };
    let schedule = parse_schedule(&mut read, &zone);
    let queue = read.string("queue");
    if let Some(queue) = &queue
        && !is_valid_queue_name(queue)
    {
        read.fail("queue", format!("`{queue}` is not a valid queue name"));
    }
    let priority = read
        .whole("priority", u64::from(MAX_PRIORITY))
        .map(|p| p as u8);
    let max_retries = read
        .whole("max_retries", u64::from(u32::MAX))
        .map(|n| n as u32);
    let time_limit_ms = read.duration("time_limit", MAX_TASK_DURATION).map(millis);
    let soft_time_limit_ms = read
        .duration("soft_time_limit", MAX_TASK_DURATION)
        .map(millis);
    let expires_ms = read.duration("expires", MAX_INTERVAL).map(millis);
    let headers = match fields.get("headers") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(map)) => {
            let mut headers = BTreeMap::new();
            for (name, value) in map {
                match value {
                    Value::String(text) => {
                        headers.insert(name.clone(), text.clone());
                    }
                    other => read.fail("headers", format!("header `{name}` is {other}, not text")),
                }
            }
            headers
        }
        Some(other) => {
            read.fail(
                "headers",
                format!("expected a mapping of names to text, found {other}"),
            );
            BTreeMap::new()
        }
    };
    let enabled = read.boolean("enabled").unwrap_or(true);
    let jitter_ms = read.duration("jitter", MAX_JITTER).map_or(0, millis);
    let expire_at = read.instant("expire_at", &zone);
    let catch_up = match read.string("catch_up").as_deref() {
        None | Some("one") => CatchUp::One,
        Some("none") => CatchUp::None,
        Some("all") => CatchUp::All,
        Some(other) => {
            read.fail(
                "catch_up",
                format!("`{other}` is not one of none, one, all"),
            );
            CatchUp::One
        }
    };
    let overlap = match read.string("overlap").as_deref() {
        None | Some("allow") => Overlap::Allow,
        Some("skip") => Overlap::Skip,
        Some(other) => {
            read.fail("overlap", format!("`{other}` is not one of allow, skip"));
            Overlap::Allow
        }
    };
    let meta = match fields.get("meta") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(meta)) => meta.clone(),
        Some(other) => {
            read.fail("meta", format!("expected a mapping, found {other}"));
            Map::new()
        }
    };
    match (read.failures.is_empty(), id, task, schedule) {
        (true, Some(id), Some(task), Some(schedule)) => Ok(EntrySpec {
            id,
            definition: EntryDefinition {
                task,
                args,
                schedule,
                timezone,
                queue,
                priority,
                max_retries,
                time_limit_ms,
                soft_time_limit_ms,
                expires_ms,
                headers,
                enabled,
                jitter_ms,
                expire_at,
                catch_up,
                overlap,
                meta,
            },
        }),
        _ => Err(read.failures),
    }
}

/// Entry ids become part of task ids: short, printable, no spaces.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ENTRY_ID_LEN {
        return Err(format!("an id is 1 to {MAX_ENTRY_ID_LEN} bytes long"));
    }
    if id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "`{}` holds spaces or control characters",
            id.escape_debug()
        ));
    }
    Ok(())
}

fn parse_schedule(read: &mut Reader<'_>, zone: &TimeZone) -> Option<Schedule> {
    let kinds: Vec<&str> = ["every", "cron", "run_at", "solar"]
        .into_iter()
        .filter(|kind| read.has(kind))
        .collect();
    let schedule = match kinds.as_slice() {
        [] => {
            read.fail(
                "every",
                "an entry needs one of every, cron, run_at or solar",
            );
            return None;
        }
        [_, _, ..] => {
            read.fail(
                kinds[1],
                format!(
                    "give only one of every, cron, run_at or solar (found {})",
                    kinds.join(", ")
                ),
            );
            return None;
        }
        ["every"] => {
            let every = read.duration("every", MAX_INTERVAL)?;
            if every < MIN_INTERVAL {
                read.fail(
                    "every",
                    "the shortest interval is 1s (Beat fires whole seconds)",
                );
                return None;
            }
            Schedule::Interval {
                every_ms: millis(every),
                start_at: read.instant("start_at", zone),
                end_at: read.instant("end_at", zone),
            }
        }
        ["cron"] => Schedule::Cron {
            expression: read.string("cron")?,
        },
        ["run_at"] => Schedule::Once {
            run_at: read.instant("run_at", zone)?,
        },
        _ => {
            let event: SolarEvent = match read.string("solar")?.parse() {
                Ok(event) => event,
                Err(ScheduleError { field, reason }) => {
                    read.fail(field, reason);
                    return None;
                }
            };
            let latitude = read.number("latitude");
            let longitude = read.number("longitude");
            let (Some(latitude), Some(longitude)) = (latitude, longitude) else {
                read.fail("latitude", "a solar entry needs latitude and longitude");
                return None;
            };
            Schedule::Solar {
                event,
                latitude,
                longitude,
            }
        }
    };
    for field in ["start_at", "end_at"] {
        if read.has(field) && !matches!(schedule, Schedule::Interval { .. }) {
            read.fail(field, "only an `every` entry has a start and an end");
        }
    }
    for field in ["latitude", "longitude"] {
        if read.has(field) && !matches!(schedule, Schedule::Solar { .. }) {
            read.fail(field, "only a `solar` entry has a place");
        }
    }
    match schedule.validate() {
        Ok(()) => Some(schedule),
        Err(error) => {
            read.fail(error.field, error.reason);
            None
        }
    }
}

/// What applying a file does to one entry.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Create(ScheduleEntry),
    /// A changed definition; `rescheduled` when its next slot was worked out again (its
    /// schedule, time zone, end or enabled flag changed). Counters are kept.
    Update {
        entry: ScheduleEntry,
        rescheduled: bool,
    },
    Unchanged(ScheduleEntry),
    /// In the store but not in the file (with `--prune`).
    Remove(ScheduleEntry),
}

impl Change {
    pub fn id(&self) -> &str {
        &self.entry().id
    }

    pub fn entry(&self) -> &ScheduleEntry {
        match self {
            Change::Create(entry)
            | Change::Update { entry, .. }
            | Change::Unchanged(entry)
            | Change::Remove(entry) => entry,
        }
    }

    pub fn action(&self) -> &'static str {
        match self {
            Change::Create(_) => "create",
            Change::Update { .. } => "update",
            Change::Unchanged(_) => "unchanged",
            Change::Remove(_) => "remove",
        }
    }
}

/// A new entry for `spec`, first due at its first slot at or after `now` (an interval at
/// once).
pub fn new_entry(spec: &EntrySpec, now: Timestamp) -> ScheduleEntry {
    let mut entry = ScheduleEntry::new(&spec.id, spec.definition.clone(), now);
    reschedule(&mut entry, now);
    entry
}

/// Works the entry's next slot out again: its first slot at or after `now`.
pub fn reschedule(entry: &mut ScheduleEntry, now: Timestamp) {
    let zone = entry.definition.zone();
    entry.state.next_run_at = entry.definition.next_slot(&zone, entry.state.anchor, now);
}

/// What applying `specs` over the `stored` entries changes; with `prune`, stored entries the
/// file does not name are removed.
pub fn plan_apply(
    specs: &[EntrySpec],
    stored: &[ScheduleEntry],
    prune: bool,
    now: Timestamp,
) -> Vec<Change> {
    let by_id: BTreeMap<&str, &ScheduleEntry> = stored
        .iter()
        .map(|entry| (entry.id.as_str(), entry))
        .collect();
    let mut changes: Vec<Change> = specs
        .iter()
        .map(|spec| match by_id.get(spec.id.as_str()) {
            None => Change::Create(new_entry(spec, now)),
            Some(current) if current.definition == spec.definition => {
                Change::Unchanged((*current).clone())
            }
            Some(current) => {
                let before = &current.definition;
                let after = &spec.definition;
                let rescheduled = before.schedule != after.schedule
                    || before.timezone != after.timezone
                    || before.expire_at != after.expire_at
                    || (after.enabled && !before.enabled);
                let mut entry = (*current).clone();
                entry.definition = after.clone();
                if rephased(&before.schedule, &after.schedule) {
                    // A new interval counts from now; an edited end or zone keeps the phase.
                    entry.state.anchor = now;
                }
                if rescheduled {
                    reschedule(&mut entry, now);
                }
                Change::Update { entry, rescheduled }
            }
        })
        .collect();
    if prune {
        let named: HashSet<&str> = specs.iter().map(|spec| spec.id.as_str()).collect();
        changes.extend(
            stored
                .iter()
                .filter(|entry| !named.contains(entry.id.as_str()))
                .map(|entry| Change::Remove(entry.clone())),
        );
    }
    changes
}

/// Whether an edit changes where an interval counts from (or the kind of schedule).
fn rephased(before: &Schedule, after: &Schedule) -> bool {
    match (before, after) {
        (
            Schedule::Interval {
                every_ms: a,
                start_at: x,
                ..
            },
            Schedule::Interval {
                every_ms: b,
                start_at: y,
                ..
            },
        ) => a != b || x != y,
        _ => before != after,
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_yaml_file_with_every_kind_parses() {
        let specs = parse(
            r#"
entries:
  - id: nightly
    task: reports.generate
    args: {customerId: 42}
    cron: "0 2 * * *"
    timezone: Europe/Berlin
    queue: reports
    priority: 5
  - id: heartbeat
    task: hello.add
    every: 30s
    start_at: 2026-12-01T00:00:00Z
    overlap: skip
    catch_up: all
  - id: launch
    task: hello.add
    run_at: "2026-12-24T18:00"
    timezone: America/New_York
  - id: lights
    task: hello.add
    solar: sunset
    latitude: 52.52
    longitude: 13.405
    jitter: 5m
"#,
        )
        .unwrap();
        assert_eq!(specs.len(), 4);
        assert_eq!(specs[0].definition.args, r#"{"customerId":42}"#);
        assert_eq!(specs[0].definition.priority, Some(5));
        assert_eq!(specs[1].definition.overlap, Overlap::Skip);
        assert_eq!(specs[1].definition.catch_up, CatchUp::All);
        assert!(matches!(
            specs[1].definition.schedule,
            Schedule::Interval {
                every_ms: 30_000,
                start_at: Some(_),
                ..
            }
        ));
        // A wall-clock time is read in the entry's time zone: 18:00 EST is 23:00 UTC.
        match &specs[2].definition.schedule {
            Schedule::Once { run_at } => assert_eq!(run_at.to_string(), "2026-12-24T23:00:00.000Z"),
            other => panic!("{other:?}"),
        }
        assert_eq!(specs[3].definition.jitter_ms, 300_000);
        // JSON works as well, as a plain list.
        let json = parse(r#"[{"id": "a", "task": "hello.add", "every": 1}]"#).unwrap();
        assert!(json[0].definition.enabled);
    }

    #[test]
    fn applying_keeps_counters_and_reschedules_only_what_changed() {
        let now = Timestamp::from_millis(1_800_000_000_000);
        let specs = parse("[{id: a, task: t, every: 10s}, {id: b, task: t, every: 1m}]").unwrap();
        let created = plan_apply(&specs, &[], false, now);
        assert!(created.iter().all(|c| c.action() == "create"));
        assert_eq!(created[0].entry().state.next_run_at, Some(now));
        let mut stored: Vec<ScheduleEntry> = created.iter().map(|c| c.entry().clone()).collect();
        stored[0].state.total_run_count = 7;
        stored[0].state.next_run_at = Some(Timestamp::from_millis(now.as_millis() + 70_000));
        stored.push(new_entry(
            &parse("[{id: gone, task: t, every: 1s}]").unwrap()[0],
            now,
        ));

        let later = Timestamp::from_millis(now.as_millis() + 75_000);
        let edited =
            parse("[{id: a, task: t, every: 10s, queue: other}, {id: b, task: t, every: 2m}]")
                .unwrap();
        let changes = plan_apply(&edited, &stored, true, later);
        let actions: Vec<(&str, &str)> = changes.iter().map(|c| (c.id(), c.action())).collect();
        assert_eq!(
            actions,
            [("a", "update"), ("b", "update"), ("gone", "remove")]
        );
        let Change::Update { entry, rescheduled } = &changes[0] else {
            panic!()
        };
        assert!(!rescheduled, "a queue change keeps the next slot");
        assert_eq!(entry.state.total_run_count, 7);
        assert_eq!(entry.state.next_run_at, stored[0].state.next_run_at);
        let Change::Update { entry, rescheduled } = &changes[1] else {
            panic!()
        };
        assert!(rescheduled);
        assert_eq!(entry.state.next_run_at, Some(later));
        let again = plan_apply(&edited, &[changes[0].entry().clone()], false, later);
        assert_eq!(again[0].action(), "unchanged");
    }

    #[test]
    fn every_broken_field_is_named_with_its_entry() {
        let FileError::Invalid(errors) = parse(
            r#"
- id: fine
  task: hello.add
  every: 1m
- id: broken
  task: hello.add
  cron: "61 * * * *"
  priority: 12
  overlapp: skip
- task: hello.add
  every: soon
"#,
        )
        .unwrap_err() else {
            panic!("expected field errors");
        };
        let named: Vec<(&str, &str)> = errors
            .iter()
            .map(|e| (e.entry.as_str(), e.field.as_str()))
            .collect();
        assert_eq!(
            named,
            [
                ("broken", "overlapp"),
                ("broken", "cron"),
                ("broken", "priority"),
                ("#3", "id"),
                ("#3", "every"),
            ]
        );
        let FileError::Invalid(bounds) = parse(
            "[{id: a, task: t, every: 1e20}, {id: b, task: t, every: 10ms}, \
              {id: c, task: t, every: 1m, jitter: 1000000000y}]",
        )
        .unwrap_err() else {
            panic!("expected field errors");
        };
        let fields: Vec<&str> = bounds.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["every", "every", "jitter"]);
        assert!(parse("id: [").is_err());
        assert!(matches!(parse("just text"), Err(FileError::Shape)));
        let FileError::Invalid(twice) =
            parse("[{id: a, task: t, every: 1s}, {id: a, task: t, every: 2s}]").unwrap_err()
        else {
            panic!()
        };
        assert_eq!(twice[0].field, "id");
    }
}
