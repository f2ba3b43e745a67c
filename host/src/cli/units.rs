//! Parsing of the durations and sizes users type on the command line.

use std::time::Duration;

/// Splits "250ms" into (250, "ms").
fn number_and_unit(text: &str) -> Option<(u64, &str)> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let number = text[..digits].parse().ok()?;
    Some((number, text[digits..].trim()))
}

/// `500ms`, `30s`, `5m`, `2h`, `1d`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let error = || format!("`{text}` is not a duration; write e.g. 500ms, 30s, 5m or 1h");
    let (number, unit) = number_and_unit(text).ok_or_else(error)?;
    let millis = match unit {
        "ms" => Some(number),
        "" | "s" => number.checked_mul(1_000),
        "m" => number.checked_mul(60_000),
        "h" => number.checked_mul(3_600_000),
        "d" => number.checked_mul(86_400_000),
        _ => None,
    };
    millis.map(Duration::from_millis).ok_or_else(error)
}

/// `512KiB`, `64MiB`, `1GiB` (also KB, MB, GB as powers of 1000); a bare number is bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let error = || format!("`{text}` is not a size; write e.g. 512KiB, 64MiB or 1GiB");
    let (number, unit) = number_and_unit(text).ok_or_else(error)?;
    let factor: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(error()),
    };
    number.checked_mul(factor).ok_or_else(error)
}

/// Formats a duration for people: `850µs`, `12.3ms`, `4.20s`.
pub fn human_duration(duration: Duration) -> String {
    let micros = duration.as_secs_f64() * 1e6;
    if micros < 1_000.0 {
        format!("{micros:.1}µs")
    } else if micros < 1_000_000.0 {
        format!("{:.2}ms", micros / 1e3)
    } else {
        format!("{:.2}s", micros / 1e6)
    }
}

/// Formats a whole duration the way a user would type it: `5m`, `30s`, `1500ms`.
pub fn compact_duration(duration: Duration) -> String {
    let ms = duration.as_millis();
    match ms {
        0 => "0s".to_string(),
        _ if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1_000) => format!("{}s", ms / 1_000),
        _ => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn compact() {
        assert_eq!(compact_duration(Duration::from_secs(300)), "5m");
        assert_eq!(compact_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(compact_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(compact_duration(Duration::from_secs(30)), "30s");
    }

    #[test]
    fn human() {
        assert_eq!(human_duration(Duration::from_micros(850)), "850.0µs");
        assert_eq!(human_duration(Duration::from_micros(12_300)), "12.30ms");
        assert_eq!(human_duration(Duration::from_millis(4200)), "4.20s");
    }
}
