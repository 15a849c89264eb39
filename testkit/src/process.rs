//! A spawned process under test: its stderr collected line by line on a thread, log lines
//! awaited as events (a watch channel ticks on every line, so there is no sleep), the bound
//! addresses read from a start-up line, SIGTERM with a deadline, and a kill when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

/// A running child process whose stderr lines are recorded. Killed (and reaped) on drop.
pub struct Process {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    /// Ticks with the number of lines seen; closed when stderr reaches end of file.
    lines: watch::Receiver<usize>,
}

impl Process {
    /// Spawns `cmd` with stdin and stdout closed and stderr piped into the log.
    /// Panics with the command line if it cannot start.
    pub fn spawn(cmd: &mut Command) -> Process {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = watch::channel(0);
        let sink = logs.clone();
        // A plain thread: it keeps reading whatever the test's runtime does (blocks, pauses).
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let n = {
                    let mut l = sink.lock().unwrap();
                    l.push(line);
                    l.len()
                };
                tx.send_replace(n);
            }
            // Dropping `tx` closes the channel: waiters learn the output has ended.
        });
        Process { child, logs, lines }
    }

    /// Everything logged so far, one line each.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// The first line (from the start of the output) for which `matches` holds, awaited up to
    /// `timeout`. `None` if the time runs out or the output ends without one.
    pub async fn wait_for_line(
        &mut self,
        matches: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        let logs = self.logs.clone();
        let find = || logs.lock().unwrap().iter().find(|l| matches(l)).cloned();
        let lines = &mut self.lines;
        tokio::time::timeout(timeout, async {
            loop {
                if let Some(line) = find() {
                    return Some(line);
                }
                if lines.changed().await.is_err() {
                    return find();
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// The first JSON log line whose `message` is `message`, awaited up to `timeout`; panics
    /// with the output if the process logs none (it exited, or the time ran out).
    pub async fn expect_json_line(&mut self, message: &str, timeout: Duration) -> Value {
        let is_it =
            |l: &str| serde_json::from_str::<Value>(l).is_ok_and(|v| v["message"] == message);
        match self.wait_for_line(is_it, timeout).await {
            Some(line) => serde_json::from_str(&line).expect("the line parsed a moment ago"),
            None => {
                let exited = self.child.try_wait().ok().flatten();
                panic!(
                    "no {message:?} line within {timeout:?} (exit status: {exited:?}); logs:\n{}",
                    self.logs()
                )
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends signal `sig` (a name such as `TERM` or `HUP`) with kill(1).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{sig} {} failed", self.pid());
    }

    /// Waits up to `timeout` for the process to exit. The end of its stderr is the event
    /// (awaited); the exit status that follows it is then polled for, briefly and bounded.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        let lines = &mut self.lines;
        let _ = tokio::time::timeout_at(deadline, async { while lines.changed().await.is_ok() {} })
            .await;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM, then the exit status within `timeout`; panics with the output otherwise.
    pub async fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.signal("TERM");
        match self.wait_exit(timeout).await {
            Some(status) => status,
            None => panic!(
                "no exit within {timeout:?} of SIGTERM; logs:\n{}",
                self.logs()
            ),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first address of `field` (a comma-separated list, as bound) in a start-up log line.
pub fn bound_addr(line: &Value, field: &str) -> SocketAddr {
    line[field]
        .as_str()
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no address in field {field:?} of {line}"))
}
