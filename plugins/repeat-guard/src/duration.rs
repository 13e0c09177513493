//! Durations in options: a string with a unit, such as `"500ms"`, `"30s"`,
//! `"5m"` or `"1h"` (the same syntax as the server's config file).

use std::time::Duration;

/// Parses `"<number><unit>"` where the unit is `ms`, `s`, `m` or `h`; the
/// number may have a fraction (`"1.5s"`).
pub(crate) fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(|| format!("`{text}` has no unit; write e.g. \"{text}s\" (units: ms, s, m, h)"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 =
        number.parse().map_err(|_| format!("`{text}` is not a duration; write e.g. \"30s\" or \"500ms\""))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown unit `{other}` in `{text}` (units: ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("`{text}` is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_fractions() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse(" 1.5s "), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("10 s"), Ok(Duration::from_secs(10)));
    }

    #[test]
    fn refuses_missing_or_unknown_units_and_non_numbers() {
        assert!(parse("30").unwrap_err().contains("no unit"));
        assert!(parse("5 weeks").unwrap_err().contains("unknown unit"));
        assert!(parse("1e3s").unwrap_err().contains("unknown unit"));
        assert!(parse("s").unwrap_err().contains("not a duration"));
        assert!(parse("-5s").unwrap_err().contains("not a duration"));
        assert!(parse("1.2.3s").unwrap_err().contains("not a duration"));
        assert!(parse(&format!("{}h", "9".repeat(400))).unwrap_err().contains("out of range"));
    }
}
