//! Value parsers for flags and environment variables, shared by every subcommand.

use std::time::Duration;

/// The entries of a repeatable or comma-separated list flag, trimmed, empty ones dropped (so
/// `""` means "none").
pub fn non_empty(list: &[String]) -> Vec<String> {
    list.iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A duration in humantime syntax (`500ms`, `30s`, `5m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 5m)"))
}

/// Durations for flag ranges, readable in `#[arg]` attributes.
pub const fn millis(n: u64) -> Duration {
    Duration::from_millis(n)
}
pub const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
pub const fn mins(n: u64) -> Duration {
    Duration::from_secs(n * 60)
}
pub const fn hours(n: u64) -> Duration {
    Duration::from_secs(n * 3600)
}

/// A duration flag's parser that also enforces its allowed range, so a value that would
/// misbehave (`0s` retry delays hammering Entra, a timeout so large that adding it to the
/// clock overflows) is refused at start with the flag, the value and the range.
pub fn duration_in(
    min: Duration,
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |s| {
        let range = range_text(&show_duration(min), &show_duration(max));
        let d = humantime::parse_duration(s.trim())
            .map_err(|e| format!("{e}; {range} (examples: 500ms, 30s, 5m)"))?;
        if (min..=max).contains(&d) {
            Ok(d)
        } else {
            Err(format!("{} is outside the {range}", s.trim()))
        }
    }
}

/// A whole-number flag's parser with its allowed range (e.g. a connection cap: above some
/// size the semaphore behind it panics, and 0 would be raised to 1 without a word).
pub fn number_in<T>(
    min: T,
    max: T,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy + Send + Sync + 'static,
{
    move |s| {
        let range = range_text(&min.to_string(), &max.to_string());
        match s.trim().parse::<T>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            Ok(_) => Err(format!("{} is outside the {range}", s.trim())),
            Err(_) => Err(format!("{:?} is not a whole number; {range}", s.trim())),
        }
    }
}

/// How a range appears in errors, `--help` and the docs (tests/e2e/flags_documented.rs
/// checks that each flag's documentation row carries it).
fn range_text(min: &str, max: &str) -> String {
    format!("allowed range {min}–{max}")
}

/// `d` in the largest unit that shows it exactly (`50ms`, `30s`, `5m`, `24h`): humantime's
/// own format writes `1day` and `1m 30s`.
pub fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 || !d.subsec_nanos().is_multiple_of(1_000_000) {
        return humantime::format_duration(d).to_string();
    }
    for (unit, per) in [("h", 3_600_000), ("m", 60_000), ("s", 1000)] {
        if ms.is_multiple_of(per) {
            return format!("{}{unit}", ms / per);
        }
    }
    format!("{ms}ms")
}

/// Test check: a flag error `err` names the flag, the value and the allowed range.
#[cfg(test)]
pub(crate) fn assert_out_of_range(err: &str, flag: &str, value: &str, range: &str) {
    assert!(err.contains(flag), "{flag} {value}: {err}");
    assert!(err.contains(value), "{flag} {value}: {err}");
    assert!(
        err.contains(&format!("allowed range {range}")),
        "{flag} {value}: {err}"
    );
}

/// A resource quantity for the sidecar; an empty value means "not set".
pub fn parse_quantity(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() || quantity_value(s).is_some() {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a Kubernetes quantity (examples: 10m, 0.5, 16Mi, 1Gi)"
        ))
    }
}

/// The numeric value of a Kubernetes quantity (`100m`, `16Mi`, `1e3`), for validation.
pub fn quantity_value(s: &str) -> Option<f64> {
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let number_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_end);
    let digits_ok = number
        .trim_start_matches(['+', '-'])
        .chars()
        .all(|c| c.is_ascii_digit() || c == '.')
        && number.chars().any(|c| c.is_ascii_digit())
        && number.matches('.').count() <= 1;
    if !digits_ok {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let factor = if suffix.is_empty() {
        1.0
    } else if let Some((_, f)) = SUFFIXES.iter().find(|(k, _)| *k == suffix) {
        *f
    } else if let Some(exp) = suffix.strip_prefix(['e', 'E']) {
        10f64.powi(exp.parse::<i32>().ok()?)
    } else {
        return None;
    };
    Some(value * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        for (s, v) in [
            ("10m", 0.01),
            ("16Mi", 16.0 * 1048576.0),
            ("0.5", 0.5),
            ("1e3", 1000.0),
            ("2k", 2000.0),
        ] {
            assert_eq!(quantity_value(s), Some(v), "{s}");
        }
        for bad in ["", "Mi", "1.2.3", "10x", "1ee", "-", "1 Mi"] {
            assert_eq!(quantity_value(bad), None, "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("soon").unwrap_err().contains("examples"));
    }

    #[test]
    fn ranged_durations_name_the_value_and_the_range() {
        let parse = duration_in(Duration::from_millis(50), Duration::from_secs(60));
        assert_eq!(parse("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(parse("1m"), Ok(Duration::from_secs(60)));
        let zero = parse("0s").unwrap_err();
        assert_eq!(zero, "0s is outside the allowed range 50ms–1m");
        assert!(parse("61s").unwrap_err().contains("allowed range 50ms–1m"));
        // Beyond what a Duration holds: an error with the range, not an overflow.
        let huge = parse("99999999999999999999999y").unwrap_err();
        assert!(huge.contains("allowed range 50ms–1m"), "{huge}");
        assert!(parse("soon").unwrap_err().contains("examples"));
    }

    #[test]
    fn ranged_numbers_name_the_value_and_the_range() {
        let parse = number_in(1usize, 65_536);
        assert_eq!(parse("1024"), Ok(1024));
        assert_eq!(
            parse("0").unwrap_err(),
            "0 is outside the allowed range 1–65536"
        );
        let huge = parse("3000000000000000000").unwrap_err();
        assert!(huge.contains("allowed range 1–65536"), "{huge}");
        let overflow = parse("99999999999999999999999").unwrap_err();
        assert!(overflow.contains("not a whole number"), "{overflow}");
        assert!(parse("-1").is_err());
    }

    #[test]
    fn durations_show_in_their_largest_exact_unit() {
        for (d, shown) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(50), "50ms"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(300), "5m"),
            (Duration::from_secs(86_400), "24h"),
        ] {
            assert_eq!(show_duration(d), shown);
        }
    }
}
