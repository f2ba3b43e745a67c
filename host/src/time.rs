//! Wall-clock instants as brokers and backends store them: milliseconds since the Unix epoch.
//!
//! Stored times must mean the same thing in every process that reads them, so they are wall
//! clock (not `Instant`) and have millisecond precision, which every adapter can store as an
//! integer.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A point in time, in milliseconds since the Unix epoch (the default).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    pub fn now() -> Timestamp {
        Timestamp::from(SystemTime::now())
    }

    pub fn from_millis(millis: u64) -> Timestamp {
        Timestamp(millis)
    }

    pub fn as_millis(self) -> u64 {
        self.0
    }

    /// The value as SQL stores it. Millisecond timestamps fit an `i64` for 292 million years.
    pub fn as_sql(self) -> i64 {
        i64::try_from(self.0).unwrap_or(i64::MAX)
    }

    /// Reads back [`Timestamp::as_sql`]; negative values clamp to the epoch.
    pub fn from_sql(value: i64) -> Timestamp {
        Timestamp(u64::try_from(value).unwrap_or(0))
    }

    pub fn saturating_add(self, duration: Duration) -> Timestamp {
        let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(millis))
    }

    /// How long after `earlier` this is; zero if it is not later.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl From<SystemTime> for Timestamp {
    fn from(time: SystemTime) -> Timestamp {
        let millis = time
            .duration_since(UNIX_EPOCH)
            .map(|since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Timestamp(millis)
    }
}

impl From<Timestamp> for SystemTime {
    fn from(timestamp: Timestamp) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(timestamp.0)
    }
}

/// RFC 3339 in UTC with milliseconds, e.g. `2026-11-23T11:24:56.123Z`.
impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // RFC 3339 ends with the year 9999; later instants print as milliseconds.
        const YEAR_10000: u64 = 253_402_300_800_000;
        if self.0 >= YEAR_10000 {
            return write!(f, "@{}ms", self.0);
        }
        humantime::format_rfc3339_millis(SystemTime::from(*self)).fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_and_display() {
        let t = Timestamp::from_millis(1_000);
        assert_eq!(
            t.saturating_add(Duration::from_millis(500)).as_millis(),
            1_500
        );
        assert_eq!(
            Timestamp::from_millis(1_500).saturating_since(t),
            Duration::from_millis(500)
        );
        assert_eq!(
            t.saturating_since(Timestamp::from_millis(2_000)),
            Duration::ZERO
        );
        assert_eq!(t.to_string(), "1970-01-01T00:00:01.000Z");
        assert_eq!(Timestamp::from_sql(-5).as_millis(), 0);
        assert_eq!(Timestamp::from_sql(t.as_sql()), t);
    }
}
