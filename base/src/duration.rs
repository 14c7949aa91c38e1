//! Human-written durations (`250ms`, `30s`, `1h30m`) for flags and config files.
//!
//! Shared by the command line, the hub settings, `spokelet run` and the Flux objects (whose
//! `interval` and `timeout` are Go durations in the same notation).

use std::time::Duration;

/// Why a duration does not parse; its message names the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("invalid duration {input:?}: expected a number before {before:?}")]
    NoNumber { input: String, before: String },
    #[error("invalid number {number:?} in duration {input:?}")]
    BadNumber { input: String, number: String },
    #[error("invalid duration {input:?}: missing unit after {number} (ms, s, m, h)")]
    NoUnit { input: String, number: String },
    #[error("invalid duration {input:?}: unknown unit {unit:?} (ms, s, m, h)")]
    UnknownUnit { input: String, unit: String },
    #[error("invalid duration {input:?}: {reason}")]
    OutOfRange { input: String, reason: String },
    #[error("invalid duration {input:?}: too long")]
    TooLong { input: String },
}

/// Parse a duration such as `250ms`, `30s`, `5m`, `1h`, `1h30m`, or a bare number of seconds.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(DurationError::NoNumber {
                input: input.into(),
                before: rest.into(),
            });
        }
        let (num, tail) = rest.split_at(digits);
        let value: f64 = num.parse().map_err(|_| DurationError::BadNumber {
            input: input.into(),
            number: num.into(),
        })?;
        let unit_len = tail.find(|c: char| c.is_ascii_digit()).unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let seconds = match unit {
            "ms" => value / 1000.0,
            "s" => value,
            "m" => value * 60.0,
            "h" => value * 3600.0,
            "" => {
                return Err(DurationError::NoUnit {
                    input: input.into(),
                    number: num.into(),
                });
            }
            other => {
                return Err(DurationError::UnknownUnit {
                    input: input.into(),
                    unit: other.into(),
                });
            }
        };
        let part = Duration::try_from_secs_f64(seconds).map_err(|e| DurationError::OutOfRange {
            input: input.into(),
            reason: e.to_string(),
        })?;
        total = total
            .checked_add(part)
            .ok_or_else(|| DurationError::TooLong { input: input.into() })?;
        rest = tail;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_adding_up_past_the_largest_duration_are_an_error() {
        let e = parse_duration("10000000000000000000s10000000000000000000s").unwrap_err();
        assert!(e.to_string().contains("too long"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        for bad in ["", "m", "5x", "5 m", "1e400s", "-3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should not parse");
        }
    }
}
