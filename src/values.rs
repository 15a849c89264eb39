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
}
