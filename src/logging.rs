//! Logging: JSON lines by default (log pipelines), text for humans; level from RUST_LOG.
//! Nothing in this crate logs a token, the service-account assertion or the identity header.

use clap::ValueEnum;
use std::io::{IsTerminal, Write};
use tracing::Level;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
/// How log lines are written (`--log-format`).
pub enum LogFormat {
    Json,
    Text,
}

/// RUST_LOG takes `level` or `target=level` directives, comma-separated (e.g. `debug` or
/// `info,imds_broker=trace`). This is tracing-subscriber's `Targets` filter rather than
/// `EnvFilter`: span and field filters are not needed here, and `EnvFilter`'s regex engine
/// would add ~0.3 MiB to every pod's resident memory (bench/RESULTS.md).
pub fn init(format: LogFormat) {
    let spec = std::env::var("RUST_LOG").unwrap_or_default();
    let (filter, bad) = parse_filter(&spec);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        // serde_json escapes control characters in every value.
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .json()
                    .flatten_event(true)
                    .with_current_span(false),
            )
            .try_init(),
        LogFormat::Text => {
            // Colour only for a person at a terminal; a log file or pipeline gets plain text.
            let ansi = std::io::stderr().is_terminal();
            registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_ansi(ansi)
                        .with_writer(move || Escaping {
                            inner: std::io::stderr(),
                            keep_esc: ansi,
                        }),
                )
                .try_init()
        }
    };
    if let Some(e) = bad {
        tracing::warn!(
            rust_log = %spec,
            error = %e,
            "RUST_LOG is not a valid filter (use `level` or `target=level`, comma-separated); logging at info"
        );
    }
}

/// Writes one formatted text event with its control characters escaped, so a value that came
/// from a request (`%0a`, ESC) cannot forge log lines or terminal sequences. The text layer
/// writes each event with one `write_all`, ending in its own newline, which is kept.
struct Escaping<W> {
    inner: W,
    /// The formatter's own colour sequences, when colour is on.
    keep_esc: bool,
}

impl<W: Write> Write for Escaping<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (body, newline) = match buf.strip_suffix(b"\n") {
            Some(body) => (body, true),
            None => (buf, false),
        };
        if !body
            .iter()
            .any(|&b| b.is_ascii_control() && !(b == 0x1b && self.keep_esc) && b != b'\t')
        {
            self.inner.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = Vec::with_capacity(buf.len() + 16);
        for &b in body {
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.push(b),
                0x1b if self.keep_esc => out.push(b),
                b if b.is_ascii_control() => {
                    out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
                }
                b => out.push(b),
            }
        }
        if newline {
            out.push(b'\n');
        }
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// kube-rs's HTTP layer logs every failed API request at error level, without saying what it
/// was for; `node`'s pod watch logs the same failure with its namespace and a hint
/// (attest/watch.rs), so by default this one is off. RUST_LOG can turn it on.
const KUBE_CLIENT_REQUESTS: &str = "kube_client::client::builder";

/// The filter for a RUST_LOG value: `info` when it is empty or invalid (with the parse error).
fn parse_filter(spec: &str) -> (Targets, Option<String>) {
    let default = || {
        Targets::new()
            .with_default(Level::INFO)
            .with_target(KUBE_CLIENT_REQUESTS, LevelFilter::OFF)
    };
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
    fn text_events_cannot_forge_lines_or_escapes() {
        let mut out = Vec::new();
        let mut w = Escaping {
            inner: &mut out,
            keep_esc: false,
        };
        w.write_all(b"INFO request path=/x\nFAKE line\x1b[31m\0\n")
            .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "INFO request path=/x\\nFAKE line\\x1b[31m\\x00\n"
        );
        let mut plain = Vec::new();
        Escaping {
            inner: &mut plain,
            keep_esc: true,
        }
        .write_all(b"\x1b[32mINFO\x1b[0m ok\tfine\n")
        .unwrap();
        assert_eq!(plain, b"\x1b[32mINFO\x1b[0m ok\tfine\n");
    }

    #[test]
    fn empty_means_info() {
        let (t, bad) = parse_filter("  ");
        assert!(bad.is_none());
        assert!(t.would_enable("imds_broker", &Level::INFO));
        assert!(!t.would_enable("imds_broker", &Level::DEBUG));
        assert!(!t.would_enable(KUBE_CLIENT_REQUESTS, &Level::ERROR));
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
