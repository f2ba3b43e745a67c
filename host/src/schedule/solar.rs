//! Solar events at a place: the sunrise equation (the NOAA simplification of Meeus), accurate
//! to a minute or two away from the poles, which is what a schedule needs.
//!
//! Sunrise and sunset are when the sun's upper limb touches the horizon (the centre 0.833°
//! below it, for refraction); civil, nautical and astronomical dawn and dusk when the centre is
//! 6°, 12° and 18° below. Where an event does not happen on a day (polar day or night), that day
//! has no firing and the next day that has one fires.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

/// The solar events a schedule can fire on (the names Celery uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SolarEvent {
    DawnAstronomical,
    DawnNautical,
    DawnCivil,
    Sunrise,
    SolarNoon,
    Sunset,
    DuskCivil,
    DuskNautical,
    DuskAstronomical,
}

impl SolarEvent {
    pub const ALL: [SolarEvent; 9] = [
        SolarEvent::DawnAstronomical,
        SolarEvent::DawnNautical,
        SolarEvent::DawnCivil,
        SolarEvent::Sunrise,
        SolarEvent::SolarNoon,
        SolarEvent::Sunset,
        SolarEvent::DuskCivil,
        SolarEvent::DuskNautical,
        SolarEvent::DuskAstronomical,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SolarEvent::DawnAstronomical => "dawn_astronomical",
            SolarEvent::DawnNautical => "dawn_nautical",
            SolarEvent::DawnCivil => "dawn_civil",
            SolarEvent::Sunrise => "sunrise",
            SolarEvent::SolarNoon => "solar_noon",
            SolarEvent::Sunset => "sunset",
            SolarEvent::DuskCivil => "dusk_civil",
            SolarEvent::DuskNautical => "dusk_nautical",
            SolarEvent::DuskAstronomical => "dusk_astronomical",
        }
    }

    /// The sun's altitude at the event, and whether it is rising; `None` for solar noon.
    fn altitude(self) -> Option<(f64, bool)> {
        match self {
            SolarEvent::DawnAstronomical => Some((-18.0, true)),
            SolarEvent::DawnNautical => Some((-12.0, true)),
            SolarEvent::DawnCivil => Some((-6.0, true)),
            SolarEvent::Sunrise => Some((-0.833, true)),
            SolarEvent::SolarNoon => None,
            SolarEvent::Sunset => Some((-0.833, false)),
            SolarEvent::DuskCivil => Some((-6.0, false)),
            SolarEvent::DuskNautical => Some((-12.0, false)),
            SolarEvent::DuskAstronomical => Some((-18.0, false)),
        }
    }
}

impl fmt::Display for SolarEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const J2000: f64 = 2_451_545.0;
const UNIX_EPOCH_JULIAN: f64 = 2_440_587.5;
const MS_PER_DAY: f64 = 86_400_000.0;
/// Polar night can last half a year; a search longer than a year finds nothing more.
const SEARCH_DAYS: i64 = 370;

/// The solar day (days since J2000) of an instant.
fn day_of(at: Timestamp) -> i64 {
    let julian = at.as_millis() as f64 / MS_PER_DAY + UNIX_EPOCH_JULIAN;
    (julian - J2000).floor() as i64
}

/// The first `event` at (`latitude`, `longitude`) strictly after `after`.
pub fn next_after(
    event: SolarEvent,
    latitude: f64,
    longitude: f64,
    after: Timestamp,
) -> Option<Timestamp> {
    // Start a day early: far east of Greenwich, a day's event can come before its UTC date.
    let first_day = day_of(after) - 1;
    (first_day..first_day + SEARCH_DAYS)
        .filter_map(|day| event_on(event, latitude, longitude, day))
        .find(|&at| at > after)
}

/// The last `event` at (`latitude`, `longitude`) at or before `at`.
pub fn latest_at_or_before(
    event: SolarEvent,
    latitude: f64,
    longitude: f64,
    at: Timestamp,
) -> Option<Timestamp> {
    let last_day = day_of(at) + 1;
    (last_day - SEARCH_DAYS..=last_day)
        .rev()
        .filter_map(|day| event_on(event, latitude, longitude, day))
        .find(|&when| when <= at)
}

/// The event on solar day `day` (days since J2000), if the sun reaches its altitude that day.
fn event_on(event: SolarEvent, latitude: f64, longitude: f64, day: i64) -> Option<Timestamp> {
    // Mean solar time at the longitude (east positive).
    let mean = day as f64 + 0.0008 - longitude / 360.0;
    let anomaly = (357.5291 + 0.985_600_28 * mean)
        .rem_euclid(360.0)
        .to_radians();
    let centre =
        1.9148 * anomaly.sin() + 0.02 * (2.0 * anomaly).sin() + 0.0003 * (3.0 * anomaly).sin();
    let ecliptic = (anomaly.to_degrees() + centre + 180.0 + 102.9372)
        .rem_euclid(360.0)
        .to_radians();
    let transit = J2000 + mean + 0.0053 * anomaly.sin() - 0.0069 * (2.0 * ecliptic).sin();
    let declination = (ecliptic.sin() * 23.4397_f64.to_radians().sin()).asin();
    let julian = match event.altitude() {
        None => transit,
        Some((altitude, rising)) => {
            let latitude = latitude.to_radians();
            let cos_hour_angle = (altitude.to_radians().sin() - latitude.sin() * declination.sin())
                / (latitude.cos() * declination.cos());
            if !(-1.0..=1.0).contains(&cos_hour_angle) {
                return None;
            }
            let hour_angle = cos_hour_angle.acos().to_degrees() / 360.0;
            if rising {
                transit - hour_angle
            } else {
                transit + hour_angle
            }
        }
    };
    let millis = (julian - UNIX_EPOCH_JULIAN) * MS_PER_DAY;
    (millis >= 0.0).then(|| Timestamp::from_millis(millis.round() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(text: &str) -> Timestamp {
        let instant: jiff::Timestamp = text.parse().unwrap();
        Timestamp::from_millis(instant.as_millisecond() as u64)
    }

    /// Asserts `event` after `after` is within two minutes of the published time.
    fn near(event: SolarEvent, place: (f64, f64), after: &str, published: &str) {
        let found = next_after(event, place.0, place.1, utc(after)).expect("an event");
        let published = utc(published);
        let off = found.as_millis().abs_diff(published.as_millis());
        assert!(
            off <= 120_000,
            "{event} after {after}: computed {found}, published {published}"
        );
    }

    const LONDON: (f64, f64) = (51.5074, -0.1278);
    const NEW_YORK: (f64, f64) = (40.7128, -74.0060);
    const TOKYO: (f64, f64) = (35.6762, 139.6503);

    #[test]
    fn matches_published_sunrise_and_sunset_times() {
        // London, 21 June 2024: sunrise 04:43 BST, sunset 21:21 BST.
        near(
            SolarEvent::Sunrise,
            LONDON,
            "2024-06-21T00:00:00Z",
            "2024-06-21T03:43:00Z",
        );
        near(
            SolarEvent::Sunset,
            LONDON,
            "2024-06-21T00:00:00Z",
            "2024-06-21T20:21:00Z",
        );
        // New York, 21 December 2024: sunrise 07:16 EST, sunset 16:32 EST, noon 11:54 EST.
        near(
            SolarEvent::Sunrise,
            NEW_YORK,
            "2024-12-21T05:00:00Z",
            "2024-12-21T12:16:00Z",
        );
        near(
            SolarEvent::Sunset,
            NEW_YORK,
            "2024-12-21T05:00:00Z",
            "2024-12-21T21:32:00Z",
        );
        near(
            SolarEvent::SolarNoon,
            NEW_YORK,
            "2024-12-21T05:00:00Z",
            "2024-12-21T16:54:00Z",
        );
        // Tokyo, 1 January 2025: sunrise 06:51 JST, east of Greenwich (the UTC date before).
        near(
            SolarEvent::Sunrise,
            TOKYO,
            "2024-12-31T15:00:00Z",
            "2024-12-31T21:51:00Z",
        );
    }

    #[test]
    fn twilight_comes_before_sunrise_and_after_sunset() {
        // From local midnight (EDT) on.
        let at = utc("2024-06-21T04:00:00Z");
        let time = |event| next_after(event, NEW_YORK.0, NEW_YORK.1, at).unwrap();
        assert!(time(SolarEvent::DawnAstronomical) < time(SolarEvent::DawnNautical));
        assert!(time(SolarEvent::DawnNautical) < time(SolarEvent::DawnCivil));
        assert!(time(SolarEvent::DawnCivil) < time(SolarEvent::Sunrise));
        assert!(time(SolarEvent::Sunrise) < time(SolarEvent::SolarNoon));
        assert!(time(SolarEvent::SolarNoon) < time(SolarEvent::Sunset));
        assert!(time(SolarEvent::Sunset) < time(SolarEvent::DuskCivil));
    }

    #[test]
    fn polar_night_fires_on_the_first_sunrise_after_it() {
        // Tromsø has no sunrise from late November until mid-January.
        let next = next_after(
            SolarEvent::Sunrise,
            69.6496,
            18.9560,
            utc("2024-12-21T00:00:00Z"),
        )
        .unwrap();
        assert!(
            next > utc("2025-01-10T00:00:00Z") && next < utc("2025-01-20T00:00:00Z"),
            "{next}"
        );
        // And consecutive sunrises are a day apart, never the same one twice.
        let first = next_after(
            SolarEvent::Sunrise,
            LONDON.0,
            LONDON.1,
            utc("2024-06-21T00:00:00Z"),
        )
        .unwrap();
        let second = next_after(SolarEvent::Sunrise, LONDON.0, LONDON.1, first).unwrap();
        let gap = second.as_millis() - first.as_millis();
        assert!((86_300_000..86_500_000).contains(&gap), "{gap}");
        assert_eq!(
            latest_at_or_before(SolarEvent::Sunrise, LONDON.0, LONDON.1, second),
            Some(second)
        );
        assert_eq!(
            latest_at_or_before(
                SolarEvent::Sunrise,
                LONDON.0,
                LONDON.1,
                Timestamp::from_millis(second.as_millis() - 1)
            ),
            Some(first)
        );
    }
}
