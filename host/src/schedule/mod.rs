//! When a schedule entry fires: the schedule kinds and their maths, as pure functions of the
//! instant they are asked about (nothing here reads the clock, so tests fix it).
//!
//! - [`Schedule::Interval`]: every `every_ms`, counted from `start_at` (or from the anchor the
//!   entry was given when it was applied), up to `end_at`. Real time: DST changes nothing.
//! - [`Schedule::Cron`]: wall-clock times matching a cron expression (5 fields, or 6 with
//!   seconds first) in the entry's IANA time zone, with Vixie cron's rules for DST changes: a
//!   time that a spring-forward skips fires at the first instant after the jump; in the hour a
//!   fall-back repeats, a job with a fixed hour fires once and a job whose hour field is a
//!   wildcard fires in both passes.
//! - [`Schedule::Once`]: one firing at `run_at`.
//! - [`Schedule::Solar`]: a solar event (sunrise, sunset, noon, dawn, dusk) at a latitude and
//!   longitude, every day it happens ([`solar`]).

pub mod solar;

use std::str::FromStr;

use croner::Cron;
use croner::parser::{CronParser, Seconds};
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

pub use solar::SolarEvent;

use crate::time::Timestamp;

/// When an entry fires.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    Interval {
        every_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        start_at: Option<Timestamp>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        end_at: Option<Timestamp>,
    },
    Cron {
        expression: String,
    },
    Once {
        run_at: Timestamp,
    },
    Solar {
        event: SolarEvent,
        latitude: f64,
        longitude: f64,
    },
}

/// Why a schedule cannot fire; names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {reason}")]
pub struct ScheduleError {
    pub field: &'static str,
    pub reason: String,
}

impl ScheduleError {
    fn new(field: &'static str, reason: impl Into<String>) -> ScheduleError {
        ScheduleError {
            field,
            reason: reason.into(),
        }
    }
}

/// The time zone named `name` (`None` is UTC).
pub fn time_zone(name: Option<&str>) -> Result<TimeZone, ScheduleError> {
    match name {
        None => Ok(TimeZone::UTC),
        Some(name) => TimeZone::get(name).map_err(|_| {
            ScheduleError::new(
                "timezone",
                format!("unknown time zone `{name}`; use an IANA name such as Europe/Berlin"),
            )
        }),
    }
}

/// Parses a cron expression: 5 fields, or 6 with seconds first; names and `@daily`-style
/// aliases are accepted.
pub fn parse_cron(expression: &str) -> Result<Cron, ScheduleError> {
    let fields = expression.split_whitespace().count();
    if !expression.trim_start().starts_with('@') && !(5..=6).contains(&fields) {
        return Err(ScheduleError::new(
            "cron",
            format!(
                "`{expression}` has {fields} fields; write 5 (minute hour day month weekday) \
                 or 6 (seconds first)"
            ),
        ));
    }
    CronParser::builder()
        .seconds(Seconds::Optional)
        .build()
        .parse(expression)
        .map_err(|error| ScheduleError::new("cron", format!("`{expression}`: {error}")))
}

impl Schedule {
    /// Checks that the schedule can be evaluated, naming the field at fault.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        match self {
            Schedule::Interval {
                every_ms,
                start_at,
                end_at,
            } => {
                if *every_ms == 0 {
                    return Err(ScheduleError::new("every", "the interval must be positive"));
                }
                if let (Some(start), Some(end)) = (start_at, end_at)
                    && end < start
                {
                    return Err(ScheduleError::new(
                        "end_at",
                        format!("{end} is before start_at {start}"),
                    ));
                }
                Ok(())
            }
            Schedule::Cron { expression } => parse_cron(expression).map(|_| ()),
            Schedule::Once { .. } => Ok(()),
            Schedule::Solar {
                latitude,
                longitude,
                ..
            } => {
                if !(-90.0..=90.0).contains(latitude) {
                    return Err(ScheduleError::new(
                        "latitude",
                        format!("{latitude} is outside -90..90"),
                    ));
                }
                if !(-180.0..=180.0).contains(longitude) {
                    return Err(ScheduleError::new(
                        "longitude",
                        format!("{longitude} is outside -180..180"),
                    ));
                }
                Ok(())
            }
        }
    }

    /// The first firing strictly after `after`, or `None` when none is left. `zone` is the
    /// entry's time zone (cron only); `anchor` is where an interval without `start_at` counts
    /// from.
    pub fn next_after(
        &self,
        after: Timestamp,
        zone: &TimeZone,
        anchor: Timestamp,
    ) -> Option<Timestamp> {
        match self {
            Schedule::Interval {
                every_ms,
                start_at,
                end_at,
            } => {
                let start = start_at.unwrap_or(anchor).as_millis();
                let every = (*every_ms).max(1);
                let next = if after.as_millis() < start {
                    start
                } else {
                    let periods = (after.as_millis() - start) / every + 1;
                    start.checked_add(periods.checked_mul(every)?)?
                };
                let next = Timestamp::from_millis(next);
                (end_at.is_none_or(|end| next <= end)).then_some(next)
            }
            Schedule::Cron { expression } => {
                let cron = parse_cron(expression).ok()?;
                cron_next_after(&cron, after, zone)
            }
            Schedule::Once { run_at } => (*run_at > after).then_some(*run_at),
            Schedule::Solar {
                event,
                latitude,
                longitude,
            } => solar::next_after(*event, *latitude, *longitude, after),
        }
    }

    /// The last firing at or before `at`, or `None` when none came before.
    pub fn latest_at_or_before(
        &self,
        at: Timestamp,
        zone: &TimeZone,
        anchor: Timestamp,
    ) -> Option<Timestamp> {
        match self {
            Schedule::Interval {
                every_ms,
                start_at,
                end_at,
            } => {
                let start = start_at.unwrap_or(anchor).as_millis();
                let at = end_at.map_or(at, |end| end.min(at)).as_millis();
                let every = (*every_ms).max(1);
                (at >= start).then(|| Timestamp::from_millis(start + (at - start) / every * every))
            }
            Schedule::Cron { expression } => {
                let cron = parse_cron(expression).ok()?;
                let from = zoned(at, zone)?;
                let previous = cron.find_previous_occurrence(&from, true).ok()?;
                let millis = u64::try_from(previous.timestamp().as_millisecond()).ok()?;
                (millis <= at.as_millis()).then_some(Timestamp::from_millis(millis))
            }
            Schedule::Once { run_at } => (*run_at <= at).then_some(*run_at),
            Schedule::Solar {
                event,
                latitude,
                longitude,
            } => solar::latest_at_or_before(*event, *latitude, *longitude, at),
        }
    }

    /// The first firing at or after `at`.
    pub fn next_at_or_after(
        &self,
        at: Timestamp,
        zone: &TimeZone,
        anchor: Timestamp,
    ) -> Option<Timestamp> {
        let before = Timestamp::from_millis(at.as_millis().saturating_sub(1));
        self.next_after(before, zone, anchor)
    }

    /// A short description, e.g. `every 30s`, `cron 0 2 * * *`, `sunrise at 52.52,13.40`.
    pub fn describe(&self) -> String {
        match self {
            Schedule::Interval { every_ms, .. } => format!(
                "every {}",
                humantime::format_duration(std::time::Duration::from_millis(*every_ms))
            ),
            Schedule::Cron { expression } => format!("cron {expression}"),
            Schedule::Once { run_at } => format!("once at {run_at}"),
            Schedule::Solar {
                event,
                latitude,
                longitude,
            } => format!("{event} at {latitude},{longitude}"),
        }
    }
}

fn zoned(at: Timestamp, zone: &TimeZone) -> Option<jiff::Zoned> {
    let instant = jiff::Timestamp::from_millisecond(i64::try_from(at.as_millis()).ok()?).ok()?;
    Some(instant.to_zoned(zone.clone()))
}

fn cron_next_after(cron: &Cron, after: Timestamp, zone: &TimeZone) -> Option<Timestamp> {
    let mut from = zoned(after, zone)?;
    // Cron works in whole seconds; a search from inside a second could return that second.
    for _ in 0..2 {
        let next = cron.find_next_occurrence(&from, false).ok()?;
        let millis = u64::try_from(next.timestamp().as_millisecond()).ok()?;
        if millis > after.as_millis() {
            return Some(Timestamp::from_millis(millis));
        }
        from = next;
    }
    None
}

impl FromStr for SolarEvent {
    type Err = ScheduleError;

    fn from_str(text: &str) -> Result<SolarEvent, ScheduleError> {
        SolarEvent::ALL
            .into_iter()
            .find(|event| event.as_str() == text)
            .ok_or_else(|| {
                let names: Vec<_> = SolarEvent::ALL.iter().map(|e| e.as_str()).collect();
                ScheduleError::new(
                    "solar",
                    format!(
                        "unknown solar event `{text}`; use one of {}",
                        names.join(", ")
                    ),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The instant of a wall-clock time in `zone`, e.g. `at("America/New_York", "2026-03-08T03:00")`.
    fn local(zone: &str, civil: &str) -> Timestamp {
        let civil: jiff::civil::DateTime = civil.parse().unwrap();
        let zoned = civil.to_zoned(TimeZone::get(zone).unwrap()).unwrap();
        Timestamp::from_millis(zoned.timestamp().as_millisecond() as u64)
    }

    fn utc(text: &str) -> Timestamp {
        let instant: jiff::Timestamp = text.parse().unwrap();
        Timestamp::from_millis(instant.as_millisecond() as u64)
    }

    fn firings(schedule: &Schedule, zone: &str, after: Timestamp, count: usize) -> Vec<String> {
        let zone = TimeZone::get(zone).unwrap();
        let mut out = Vec::new();
        let mut at = after;
        for _ in 0..count {
            let Some(next) = schedule.next_after(at, &zone, after) else {
                break;
            };
            out.push(next.to_string());
            at = next;
        }
        out
    }

    fn cron(expression: &str) -> Schedule {
        Schedule::Cron {
            expression: expression.into(),
        }
    }

    #[test]
    fn a_fixed_time_in_the_spring_forward_gap_fires_once_right_after_the_jump() {
        // New York, 8 March 2026: 02:00 EST jumps to 03:00 EDT; 02:30 does not exist.
        let fired = firings(
            &cron("30 2 * * *"),
            "America/New_York",
            utc("2026-03-07T00:00:00Z"),
            3,
        );
        assert_eq!(
            fired,
            [
                "2026-03-07T07:30:00.000Z", // 02:30 EST
                "2026-03-08T07:00:00.000Z", // 03:00 EDT, the first instant after the gap
                "2026-03-09T06:30:00.000Z", // 02:30 EDT
            ]
        );
    }

    #[test]
    fn a_fixed_time_in_the_repeated_hour_fires_once() {
        // New York, 1 November 2026: 02:00 EDT falls back to 01:00 EST; 01:30 happens twice.
        let fired = firings(
            &cron("30 1 * * *"),
            "America/New_York",
            utc("2026-10-31T12:00:00Z"),
            2,
        );
        assert_eq!(
            fired,
            [
                "2026-11-01T05:30:00.000Z", // 01:30 EDT, the first of the two
                "2026-11-02T06:30:00.000Z", // 01:30 EST the next day
            ]
        );
    }

    #[test]
    fn a_wildcard_hour_keeps_real_intervals_through_the_repeated_hour() {
        let fired = firings(
            &cron("*/30 * * * *"),
            "America/New_York",
            local("America/New_York", "2026-11-01T00:15"),
            6,
        );
        assert_eq!(
            fired,
            [
                "2026-11-01T04:30:00.000Z", // 00:30 EDT
                "2026-11-01T05:00:00.000Z", // 01:00 EDT
                "2026-11-01T05:30:00.000Z", // 01:30 EDT
                "2026-11-01T06:00:00.000Z", // 01:00 EST
                "2026-11-01T06:30:00.000Z", // 01:30 EST
                "2026-11-01T07:00:00.000Z", // 02:00 EST
            ]
        );
    }

    #[test]
    fn local_times_follow_both_european_transitions() {
        // Berlin: CET (UTC+1) until 29 March 2026, CEST (UTC+2) until 25 October 2026.
        let nine = cron("0 9 * * *");
        assert_eq!(
            firings(&nine, "Europe/Berlin", utc("2026-03-28T00:00:00Z"), 2),
            ["2026-03-28T08:00:00.000Z", "2026-03-29T07:00:00.000Z"]
        );
        assert_eq!(
            firings(&nine, "Europe/Berlin", utc("2026-10-24T00:00:00Z"), 2),
            ["2026-10-24T07:00:00.000Z", "2026-10-25T08:00:00.000Z"]
        );
        // The same expression in UTC ignores both.
        assert_eq!(
            firings(&nine, "UTC", utc("2026-03-28T00:00:00Z"), 2),
            ["2026-03-28T09:00:00.000Z", "2026-03-29T09:00:00.000Z"]
        );
    }

    #[test]
    fn six_fields_count_seconds_and_bad_expressions_say_why() {
        assert_eq!(
            firings(
                &cron("*/15 * * * * *"),
                "UTC",
                utc("2026-01-01T00:00:07.250Z"),
                3
            ),
            [
                "2026-01-01T00:00:15.000Z",
                "2026-01-01T00:00:30.000Z",
                "2026-01-01T00:00:45.000Z"
            ]
        );
        assert_eq!(
            firings(&cron("0 0 * * MON"), "UTC", utc("2026-12-02T00:00:00Z"), 1),
            ["2026-12-07T00:00:00.000Z"]
        );
        let four = parse_cron("0 * * *").unwrap_err();
        assert_eq!(four.field, "cron");
        assert!(four.reason.contains("4 fields"), "{four}");
        assert!(parse_cron("61 * * * *").is_err());
        assert!(time_zone(Some("Mars/Olympus_Mons")).is_err());
    }

    #[test]
    fn intervals_count_from_their_start_and_stop_at_their_end() {
        let schedule = Schedule::Interval {
            every_ms: 10_000,
            start_at: Some(utc("2026-01-01T12:00:00Z")),
            end_at: Some(utc("2026-01-01T12:00:30Z")),
        };
        let zone = TimeZone::UTC;
        let anchor = utc("2000-01-01T00:00:00Z");
        let next = |at: &str| {
            schedule
                .next_after(utc(at), &zone, anchor)
                .map(|t| t.to_string())
        };
        assert_eq!(
            next("2026-01-01T11:00:00Z").as_deref(),
            Some("2026-01-01T12:00:00.000Z")
        );
        assert_eq!(
            next("2026-01-01T12:00:00Z").as_deref(),
            Some("2026-01-01T12:00:10.000Z")
        );
        assert_eq!(
            next("2026-01-01T12:00:25Z").as_deref(),
            Some("2026-01-01T12:00:30.000Z")
        );
        assert_eq!(next("2026-01-01T12:00:30Z"), None);
        // Without a start the anchor counts; DST is irrelevant to real-time intervals.
        let hourly = Schedule::Interval {
            every_ms: 3_600_000,
            start_at: None,
            end_at: None,
        };
        assert_eq!(
            firings(&hourly, "America/New_York", utc("2026-11-01T04:10:00Z"), 3),
            [
                "2026-11-01T05:10:00.000Z",
                "2026-11-01T06:10:00.000Z",
                "2026-11-01T07:10:00.000Z"
            ]
        );
        assert_eq!(
            hourly
                .next_at_or_after(
                    utc("2026-11-01T04:10:00Z"),
                    &zone,
                    utc("2026-11-01T04:10:00Z")
                )
                .map(|t| t.to_string())
                .as_deref(),
            Some("2026-11-01T04:10:00.000Z"),
            "the anchor itself is the first firing"
        );
        let backwards = Schedule::Interval {
            every_ms: 1000,
            start_at: Some(utc("2026-01-02T00:00:00Z")),
            end_at: Some(utc("2026-01-01T00:00:00Z")),
        };
        assert_eq!(backwards.validate().unwrap_err().field, "end_at");
    }

    #[test]
    fn the_latest_slot_before_an_instant() {
        let zone = TimeZone::get("America/New_York").unwrap();
        let anchor = utc("2026-01-01T00:00:00Z");
        let every = Schedule::Interval {
            every_ms: 10_000,
            start_at: None,
            end_at: None,
        };
        let latest = |s: &Schedule, at: &str| {
            s.latest_at_or_before(utc(at), &zone, anchor)
                .map(|t| t.to_string())
        };
        assert_eq!(
            latest(&every, "2026-01-01T00:00:25Z").as_deref(),
            Some("2026-01-01T00:00:20.000Z")
        );
        assert_eq!(latest(&every, "2025-12-31T23:59:59Z"), None);
        assert_eq!(
            latest(&cron("30 1 * * *"), "2026-11-02T06:00:00Z").as_deref(),
            Some("2026-11-01T05:30:00.000Z"),
            "01:30 EDT, the first of the two on the fall-back day"
        );
        assert_eq!(
            latest(&cron("0 * * * *"), "2026-11-02T06:00:00Z").as_deref(),
            Some("2026-11-02T06:00:00.000Z"),
            "an instant that is a slot is its own latest"
        );
    }

    #[test]
    fn a_one_shot_fires_once() {
        let run_at = utc("2026-12-24T17:00:00Z");
        let once = Schedule::Once { run_at };
        let zone = TimeZone::UTC;
        assert_eq!(
            once.next_after(utc("2026-12-01T00:00:00Z"), &zone, run_at),
            Some(run_at)
        );
        assert_eq!(once.next_at_or_after(run_at, &zone, run_at), Some(run_at));
        assert_eq!(once.next_after(run_at, &zone, run_at), None);
    }
}
