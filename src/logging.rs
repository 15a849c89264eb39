//! Logging: JSON lines by default (log pipelines), text for humans; level from RUST_LOG.
//! Nothing in this crate logs a token, the service-account assertion or the identity header.

use crate::cli::LogFormat;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

/// RUST_LOG takes `level` or `target=level` directives, comma-separated (e.g. `debug` or
/// `info,imds_broker=trace`). This is tracing-subscriber's `Targets` filter rather than
/// `EnvFilter`: span and field filters are not needed here, and `EnvFilter`'s regex engine
/// would add ~0.3 MiB to every pod's resident memory (bench/RESULTS.md).
pub fn init(format: LogFormat) {
    let spec = std::env::var("RUST_LOG").unwrap_or_default();
    let (filter, bad) = parse_filter(&spec);
    let builder = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Json => registry
            .with(builder.json().flatten_event(true).with_current_span(false))
            .try_init(),
        LogFormat::Text => registry.with(builder).try_init(),
    };
    if let Some(e) = bad {
        tracing::warn!(
            rust_log = %spec,
            error = %e,
            "RUST_LOG is not a valid filter (use `level` or `target=level`, comma-separated); logging at info"
        );
    }
}

/// The filter for a RUST_LOG value: `info` when it is empty or invalid (with the parse error).
fn parse_filter(spec: &str) -> (Targets, Option<String>) {
    let default = || Targets::new().with_default(Level::INFO);
    if spec.trim().is_empty() {
        return (default(), None);
    }
    match spec.parse::<Targets>() {
        Ok(t) => (t, None),
        Err(e) => (default(), Some(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_means_info() {
        let (t, bad) = parse_filter("  ");
        assert!(bad.is_none());
        assert!(t.would_enable("imds_broker", &Level::INFO));
        assert!(!t.would_enable("imds_broker", &Level::DEBUG));
    }

    #[test]
    fn level_and_target_directives() {
        let (t, _) = parse_filter("debug");
        assert!(t.would_enable("hyper", &Level::DEBUG));
        let (t, bad) = parse_filter("warn,imds_broker=trace");
        assert!(bad.is_none());
        assert!(t.would_enable("imds_broker::broker", &Level::TRACE));
        assert!(t.would_enable("rustls", &Level::WARN));
        assert!(!t.would_enable("rustls", &Level::INFO));
    }

    #[test]
    fn invalid_spec_falls_back_to_info_with_the_error() {
        let (t, bad) = parse_filter("imds_broker=loud");
        assert!(bad.is_some_and(|e| !e.is_empty()));
        assert!(t.would_enable("imds_broker", &Level::INFO));
        assert!(!t.would_enable("imds_broker", &Level::DEBUG));
    }
}
