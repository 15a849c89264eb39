//! Load clients for `bench/` that `wrk` cannot play: the cold-path burst, the rate-limited
//! soak and the start-up timer. Each prints ONE JSON object on stdout for `bench/bench.py`.
//!
//! * `cold`: opens N keep-alive connections first, then sends N token requests at once and
//!   times every answer from the first request written (measures coalescing, not TCP
//!   set-up), and from its own request. Connections are closed only after the last answer.
//! * `soak`: a steady open-loop request rate over K keep-alive connections, alternating IMDS
//!   and App Service; checks every answer (status, JSON, `expires_on - now` against a margin),
//!   counts distinct tokens and samples the broker's RSS from /proc.
//! * `startup`: spawns a command and times process start to the first `/readyz` 200.
//!
//! HTTP/1.1 is written by hand on a raw `TcpStream` so the client adds as little as possible
//! to what is measured. Only 127.0.0.1 addresses are accepted.

// Measurement code: microsecond counts and percentile ranks fit their types by construction.
#![allow(clippy::cast_possible_truncation)]

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser)]
#[command(about = "imds-broker benchmark clients (cold burst, soak, start-up)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// N concurrent first requests for one resource, released together.
    Cold {
        #[arg(long)]
        addr: SocketAddr,
        /// Request target (path and query).
        #[arg(long)]
        target: String,
        /// Extra request header `Name: value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Give up on an answer after this long.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Steady request rate for a fixed time.
    Soak {
        #[arg(long)]
        addr: SocketAddr,
        /// IMDS request target (path and query); sent with `Metadata: true`.
        #[arg(long)]
        imds_target: String,
        /// App Service request target; sent with `X-IDENTITY-HEADER`.
        #[arg(long)]
        app_target: String,
        #[arg(long)]
        identity_header: String,
        /// Requests per second, all connections together.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 600)]
        duration_secs: u64,
        /// Keep-alive connections (even ones IMDS, odd ones App Service).
        #[arg(long, default_value_t = 10)]
        connections: u64,
        /// A served token must have at least this many seconds left.
        #[arg(long)]
        min_remaining_secs: u64,
        /// Broker PID whose VmRSS is sampled.
        #[arg(long)]
        pid: Option<u32>,
        #[arg(long, default_value_t = 5)]
        rss_every_secs: u64,
        /// Progress line on stderr every this many seconds (0 = none).
        #[arg(long, default_value_t = 60)]
        progress_secs: u64,
    },
    /// Process start to the first 200 from GET /readyz, repeated.
    Startup {
        /// Admin listener of the started process.
        #[arg(long)]
        admin: SocketAddr,
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// The command to start, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let addr = match &cli.cmd {
        Cmd::Cold { addr, .. } | Cmd::Soak { addr, .. } => *addr,
        Cmd::Startup { admin, .. } => *admin,
    };
    if !addr.ip().is_loopback() {
        eprintln!("bench_client: refusing non-loopback address {addr}");
        return ExitCode::FAILURE;
    }
    let result = match cli.cmd {
        Cmd::Startup {
            admin,
            runs,
            command,
        } => startup(admin, runs, &command),
        cmd => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| rt.block_on(run_async(cmd))),
    };
    match result {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench_client: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_async(cmd: Cmd) -> Result<Value, String> {
    match cmd {
        Cmd::Cold {
            addr,
            target,
            headers,
            connections,
            timeout_ms,
        } => cold(addr, &target, &headers, connections, timeout_ms).await,
        Cmd::Soak {
            addr,
            imds_target,
            app_target,
            identity_header,
            rate,
            duration_secs,
            connections,
            min_remaining_secs,
            pid,
            rss_every_secs,
            progress_secs,
        } => {
            let imds = request_bytes(&imds_target, &["Metadata: true".to_owned()]);
            let app = request_bytes(
                &app_target,
                &[format!("X-IDENTITY-HEADER: {identity_header}")],
            );
            soak(SoakPlan {
                addr,
                requests: [imds, app],
                rate: rate.max(1),
                duration: Duration::from_secs(duration_secs),
                connections: connections.max(1),
                min_remaining: min_remaining_secs,
                pid,
                rss_every: Duration::from_secs(rss_every_secs.max(1)),
                progress_every: Duration::from_secs(progress_secs),
            })
            .await
        }
        Cmd::Startup { .. } => unreachable!("handled without a runtime"),
    }
}

fn request_bytes(target: &str, headers: &[String]) -> Arc<[u8]> {
    let mut r = format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    Arc::from(r.into_bytes())
}

/// One response: status and body. `buf` is reused between requests of a connection.
async fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> Result<(u16, Vec<u8>), String> {
    stream
        .write_all(request)
        .await
        .map_err(|e| format!("write: {e}"))?;
    buf.clear();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed before the response head".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "non-UTF-8 head")?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("bad status line")?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .ok_or("no content-length")?;
    while buf.len() < head_end + length {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed inside the body".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok((status, buf[head_end..head_end + length].to_vec()))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `(access_token, expires_on)` of a token answer.
fn token_of(body: &[u8]) -> Result<(String, u64), String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let token = v["access_token"].as_str().ok_or("no access_token")?;
    let exp = v["expires_on"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or("no numeric-string expires_on")?;
    Ok((token.to_owned(), exp))
}

/// Percentiles (nearest rank) of microsecond samples, in milliseconds.
fn percentiles_ms(samples: &mut [u64]) -> Value {
    samples.sort_unstable();
    let at = |p: f64| -> f64 {
        if samples.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
        samples[rank.clamp(1, samples.len()) - 1] as f64 / 1000.0
    };
    json!({
        "min": at(0.0), "p50": at(50.0), "p90": at(90.0), "p99": at(99.0),
        "p999": at(99.9), "max": at(100.0),
    })
}

async fn cold(
    addr: SocketAddr,
    target: &str,
    headers: &[String],
    n: usize,
    timeout_ms: u64,
) -> Result<Value, String> {
    let request = request_bytes(target, headers);
    let mut streams = Vec::with_capacity(n);
    let connect_started = Instant::now();
    for i in 0..n {
        let s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connection {i}: {e}"))?;
        let _ = s.set_nodelay(true);
        streams.push(s);
    }
    let connect_ms = connect_started.elapsed().as_secs_f64() * 1000.0;
    // Let the broker accept every connection before the burst.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let go = Arc::new(tokio::sync::Barrier::new(n + 1));
    let timeout = Duration::from_millis(timeout_ms);
    let mut tasks = tokio::task::JoinSet::new();
    for mut s in streams {
        let go = go.clone();
        let request = request.clone();
        tasks.spawn(async move {
            let mut buf = Vec::with_capacity(4096);
            go.wait().await;
            let sent = Instant::now();
            let r = tokio::time::timeout(timeout, exchange(&mut s, &request, &mut buf)).await;
            // The connection is returned, not dropped: closing it here would put 1,000
            // closes (client and server side) inside the window being measured.
            (sent, Instant::now(), r, s)
        });
    }
    go.wait().await;
    let mut latencies = Vec::with_capacity(n);
    let mut own = Vec::with_capacity(n);
    let mut errors: HashMap<String, u64> = HashMap::new();
    let mut tokens: HashMap<String, u64> = HashMap::new();
    // Answers are checked only after the last one is in, so that parsing them does not
    // delay the timestamps of the others (this client runs on one core).
    let mut answers = Vec::with_capacity(n);
    while let Some(joined) = tasks.join_next().await {
        answers.push(joined.map_err(|e| e.to_string())?);
    }
    // The burst starts with the first request written. Not with this task's own wait: the
    // spawned tasks have not run yet when it arrives at the barrier, and reaching it takes
    // them ~1.7 ms.
    let Some(t0) = answers.iter().map(|a| a.0).min() else {
        return Err("no connections".into());
    };
    let last_sent = answers.iter().map(|a| a.0).max().unwrap_or(t0);
    for (sent, done, r, _stream) in answers {
        let outcome = match r {
            Err(_) => Err("timeout".to_owned()),
            Ok(Err(e)) => Err(e),
            Ok(Ok((200, body))) => token_of(&body).map(|(t, _)| t),
            Ok(Ok((status, _))) => Err(format!("HTTP {status}")),
        };
        match outcome {
            Ok(token) => {
                latencies.push(done.duration_since(t0).as_micros() as u64);
                own.push(done.duration_since(sent).as_micros() as u64);
                *tokens.entry(token).or_default() += 1;
            }
            Err(e) => *errors.entry(e).or_default() += 1,
        }
    }
    Ok(json!({
        "connections": n,
        "ok": latencies.len(),
        "errors": errors,
        "distinct_tokens": tokens.len(),
        "connect_ms": connect_ms,
        "latency_ms": percentiles_ms(&mut latencies),
        "own_latency_ms": percentiles_ms(&mut own),
        "send_spread_ms": last_sent.duration_since(t0).as_secs_f64() * 1000.0,
    }))
}

struct SoakPlan {
    addr: SocketAddr,
    /// IMDS and App Service requests, used by even and odd connections.
    requests: [Arc<[u8]>; 2],
    rate: u64,
    duration: Duration,
    connections: u64,
    min_remaining: u64,
    pid: Option<u32>,
    rss_every: Duration,
    progress_every: Duration,
}

#[derive(Default)]
struct ConnStats {
    /// Send to last byte, microseconds.
    service_us: Vec<u64>,
    /// Scheduled send time to last byte (includes waiting behind a slow answer).
    scheduled_us: Vec<u64>,
    ok: u64,
    errors: HashMap<String, u64>,
    min_remaining: Option<u64>,
    /// Each distinct token with when (seconds into the soak) it was first seen.
    tokens: HashMap<String, f64>,
    below_margin: u64,
}

async fn soak(plan: SoakPlan) -> Result<Value, String> {
    let period = Duration::from_nanos(1_000_000_000 / plan.rate);
    let total = plan.rate * plan.duration.as_secs();
    let mut streams = Vec::new();
    for i in 0..plan.connections {
        let s = TcpStream::connect(plan.addr)
            .await
            .map_err(|e| format!("connection {i}: {e}"))?;
        let _ = s.set_nodelay(true);
        streams.push(s);
    }
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut stream) in streams.into_iter().enumerate() {
        let i = i as u64;
        let request = plan.requests[(i % 2) as usize].clone();
        let (k, min_remaining, addr, done) = (
            plan.connections,
            plan.min_remaining,
            plan.addr,
            done.clone(),
        );
        tasks.spawn(async move {
            let mut st = ConnStats::default();
            let mut buf = Vec::with_capacity(4096);
            // Request j of this connection is due at start + (i + j*k) * period.
            let mut seq = i;
            while seq < total {
                let due = start + period * (seq as u32);
                tokio::time::sleep_until(due).await;
                let sent = tokio::time::Instant::now();
                let r = exchange(&mut stream, &request, &mut buf).await;
                let end = tokio::time::Instant::now();
                let outcome = match r {
                    Ok((200, body)) => token_of(&body),
                    Ok((status, _)) => Err(format!("HTTP {status}")),
                    Err(e) => {
                        // Reconnect so one broken connection does not end the run.
                        if let Ok(s) = TcpStream::connect(addr).await {
                            let _ = s.set_nodelay(true);
                            stream = s;
                        }
                        Err(e)
                    }
                };
                match outcome {
                    Ok((token, exp)) => {
                        st.ok += 1;
                        st.service_us.push((end - sent).as_micros() as u64);
                        st.scheduled_us.push((end - due).as_micros() as u64);
                        let left = exp.saturating_sub(now_unix());
                        st.min_remaining = Some(st.min_remaining.map_or(left, |m| m.min(left)));
                        if left < min_remaining {
                            st.below_margin += 1;
                        }
                        st.tokens
                            .entry(token)
                            .or_insert_with(|| (sent - start).as_secs_f64());
                    }
                    Err(e) => *st.errors.entry(e).or_default() += 1,
                }
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                seq += k;
            }
            st
        });
    }

    // RSS sampler and progress reporter run until the workers are done.
    let mut rss: Vec<(f64, u64)> = Vec::new();
    let mut sample = tokio::time::interval_at(start, plan.rss_every);
    let mut last_progress = start;
    let mut stats = Vec::new();
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(r) => stats.push(r.map_err(|e| e.to_string())?),
                None => break,
            },
            t = sample.tick() => {
                if let Some(kib) = plan.pid.and_then(|p| vm_kib(p, "VmRSS")) {
                    rss.push(((t - start).as_secs_f64(), kib));
                }
                if !plan.progress_every.is_zero() && t - last_progress >= plan.progress_every {
                    last_progress = t;
                    eprintln!(
                        "soak: {:>4.0}s {} requests, RSS {} KiB",
                        (t - start).as_secs_f64(),
                        done.load(std::sync::atomic::Ordering::Relaxed),
                        rss.last().map_or(0, |r| r.1)
                    );
                }
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut all = ConnStats::default();
    for st in stats {
        all.ok += st.ok;
        all.service_us.extend(st.service_us);
        all.scheduled_us.extend(st.scheduled_us);
        all.below_margin += st.below_margin;
        for (e, n) in st.errors {
            *all.errors.entry(e).or_default() += n;
        }
        all.min_remaining = match (all.min_remaining, st.min_remaining) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        for (t, at) in st.tokens {
            let e = all.tokens.entry(t).or_insert(at);
            *e = e.min(at);
        }
    }
    let mut first_seen: Vec<f64> = all.tokens.values().copied().collect();
    first_seen.sort_by(f64::total_cmp);
    let errors: u64 = all.errors.values().sum();
    Ok(json!({
        "planned": total,
        "ok": all.ok,
        "errors": errors,
        "error_kinds": all.errors,
        "elapsed_s": elapsed,
        "achieved_rps": all.ok as f64 / elapsed,
        "min_remaining_s": all.min_remaining,
        "below_margin": all.below_margin,
        "margin_s": plan.min_remaining,
        "distinct_tokens": all.tokens.len(),
        "token_first_seen_s": first_seen,
        "service_latency_ms": percentiles_ms(&mut all.service_us),
        "scheduled_latency_ms": percentiles_ms(&mut all.scheduled_us),
        "rss_kib": rss,
        "vm_hwm_kib": plan.pid.and_then(|p| vm_kib(p, "VmHWM")),
    }))
}

/// A `Vm*:` field of /proc/PID/status, in KiB.
fn vm_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn startup(admin: SocketAddr, runs: usize, command: &[String]) -> Result<Value, String> {
    let mut ms = Vec::with_capacity(runs);
    for run in 0..runs {
        // The previous run's listener must be gone, or we would time the old process.
        wait_port_closed(admin)?;
        let started = Instant::now();
        let mut child = Command::new(&command[0])
            .args(&command[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", command[0]))?;
        let ready = loop {
            if readyz_ok(admin) {
                break Some(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(5) {
                break None;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("run {run}: process exited early ({status})"));
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        let _ = child.kill();
        let _ = child.wait();
        match ready {
            Some(d) => ms.push(d.as_secs_f64() * 1000.0),
            None => return Err(format!("run {run}: /readyz not 200 within 5 s")),
        }
    }
    let mut sorted = ms.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(json!({
        "runs_ms": ms,
        "min_ms": sorted[0],
        "median_ms": sorted[sorted.len() / 2],
        "max_ms": sorted[sorted.len() - 1],
    }))
}

fn readyz_ok(admin: SocketAddr) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&admin, Duration::from_millis(100)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = s.set_nodelay(true);
    if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && &head[9..12] == b"200"
}

fn wait_port_closed(addr: SocketAddr) -> Result<(), String> {
    for _ in 0..500 {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(50)).is_err() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!("{addr} still accepts connections"))
}
