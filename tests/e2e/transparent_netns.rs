//! Transparent mode in real network namespaces that each test makes and removes: a "switch"
//! namespace holding a bridge (as kubenet's `cbr0` or the bridge CNI plugin wire pods), and
//! "pods" attached to it by veth pairs. Clients run on a test thread that entered a pod's
//! namespace (setns), so nothing touches this host's own network.
//!
//! Needs root and `ip` (iproute2). Elsewhere the tests skip with a message; with CI=true or
//! IMDS_BROKER_REQUIRE_NETNS=1 they fail instead, as tests/conformance/test_transparent.py does.

use crate::support::BIN;
use serde_json::Value;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use testkit::process::Process;

const IMDS: &str = "169.254.169.254";
/// A token request on a keep-alive connection: the answer ends when the server closes.
const TOKEN_REQUEST: &str = "GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fstorage.azure.com%2F HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n\r\n";
/// The same, asking the server to close after its answer.
const TOKEN_REQUEST_CLOSE: &str = "GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fstorage.azure.com%2F HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nConnection: close\r\n\r\n";

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Why these tests cannot run here, if they cannot (probed once per test run).
fn unavailable() -> Option<String> {
    static PROBED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    PROBED.get_or_init(probe).clone()
}

fn probe() -> Option<String> {
    if !is_root() {
        return Some("not root".into());
    }
    let probe = format!("ibe2e-probe-{}", std::process::id());
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Ok(o) if o.status.success() => {
            let _ = Command::new("ip").args(["netns", "del", &probe]).output();
            None
        }
        Ok(o) => Some(format!(
            "`ip netns add` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("no `ip` (iproute2): {e}")),
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// `true` if the test may go on; `false` (after saying why) if it must skip.
fn netns_available() -> bool {
    let Some(reason) = unavailable() else {
        return true;
    };
    let required = std::env::var("CI").as_deref() == Ok("true")
        || std::env::var("IMDS_BROKER_REQUIRE_NETNS").as_deref() == Ok("1");
    assert!(
        !required,
        "transparent-mode tests need root and `ip netns`: {reason} (required: CI=true or \
         IMDS_BROKER_REQUIRE_NETNS=1)"
    );
    eprintln!("skipped: transparent-mode tests need root and `ip netns`: {reason}");
    false
}

/// The namespaces and processes one test made: the processes are killed and the namespaces
/// (with the veths and bridge inside them) deleted when it ends, passed or failed.
struct Lab {
    tag: String,
    namespaces: Vec<String>,
    processes: Vec<Process>,
}

impl Lab {
    fn new() -> Lab {
        let tag = format!(
            "{}{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        Lab {
            tag,
            namespaces: Vec::new(),
            processes: Vec::new(),
        }
    }

    /// A new, empty network namespace (only `lo`, down).
    fn namespace(&mut self, role: &str) -> String {
        let name = format!("ibe2e-{role}-{}", self.tag);
        ip(&["netns", "add", &name]);
        self.namespaces.push(name.clone());
        name
    }

    /// A namespace holding the bridge `br0`, up.
    fn switch(&mut self) -> String {
        let sw = self.namespace("sw");
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        sw
    }

    /// A pod's namespace: `lo` up and `eth0` at `addr`/24, whose veth peer is on `sw`'s bridge.
    fn pod(&mut self, role: &str, sw: &str, addr: &str) -> String {
        let ns = self.namespace(role);
        let peer = format!("v{role}{}", self.tag);
        let peer = &peer[..peer.len().min(15)];
        ip(&[
            "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", peer, "netns", sw,
        ]);
        ip(&["-n", sw, "link", "set", peer, "master", "br0", "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// Starts `imds-broker ARGS` in `ns` (`ip netns exec` execs it: the PID is the broker's).
    fn spawn(&mut self, ns: &str, args: &[&str]) -> &mut Process {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, BIN])
            .args(args)
            .env_clear()
            .env("RUST_LOG", "info")
            .env("IMDS_BROKER_LOG_FORMAT", "json");
        self.processes.push(Process::spawn(&mut cmd));
        self.processes.last_mut().expect("just pushed")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Processes first (Process kills and reaps on drop), so no namespace stays alive.
        self.processes.clear();
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Runs `ip ARGS`; the test fails with its stderr if it does.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `imds-broker init-network ARGS` in `ns` to completion (bounded at 30 s).
fn init_network(ns: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.args(["30", "ip", "netns", "exec", ns, BIN, "init-network"])
        .args(args)
        .env_clear()
        .env("IMDS_BROKER_LOG_FORMAT", "json");
    cmd.output().expect("run init-network")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The IPv4 addresses of `ns`, one `ip -o` line each.
fn addresses(ns: &str) -> String {
    ip(&["-n", ns, "-o", "-4", "addr", "show"])
}

/// Sends `request` to `to` from inside network namespace `ns` and reads the answer until the
/// server closes (connect, write and read bounded at 5 s each; after 5 s of silence what came
/// so far is the answer). Runs on a thread of its own,
/// which enters the namespace: the socket belongs to the namespace it was made in.
async fn send_from(ns: &str, to: SocketAddr, request: &'static str) -> std::io::Result<String> {
    let path = format!("/run/netns/{ns}");
    tokio::task::spawn_blocking(move || {
        let netns = std::fs::File::open(&path)?;
        nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        let limit = Duration::from_secs(5);
        let mut s = TcpStream::connect_timeout(&to, limit)?;
        s.set_read_timeout(Some(limit))?;
        s.set_write_timeout(Some(limit))?;
        s.write_all(request.as_bytes())?;
        let mut answer = Vec::new();
        match s.read_to_end(&mut answer) {
            Ok(_) => {}
            // Still open after 5 s: what came is the answer (the callers check the closing).
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e),
        }
        Ok(String::from_utf8_lossy(&answer).into_owned())
    })
    .await
    .expect("client thread")
}

/// The JSON body of an HTTP answer.
fn body(answer: &str) -> Value {
    let json = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(json).unwrap_or(Value::Null)
}

/// Issue 24, item 6: `169.254.169.254` sits on the victim pod's `lo`, yet Linux delivers a
/// packet for it that arrives on `eth0`. A neighbour on the same bridge that routes
/// 169.254.169.254 via the victim's pod IP reached the broker and got the victim's token. Now
/// it is answered 403 `access_denied` and the connection closes; a client inside the victim
/// still gets its token, on the same listener.
#[tokio::test]
async fn a_neighbour_routing_imds_via_the_pod_ip_is_refused() {
    if !netns_available() {
        return;
    }
    let mut lab = Lab::new();
    let sw = lab.switch();
    let victim = lab.pod("victim", &sw, "10.213.0.2");
    let neighbour = lab.pod("nbr", &sw, "10.213.0.3");

    let init = init_network(&victim, &[]);
    assert!(init.status.success(), "{}", stderr(&init));
    let broker = lab.spawn(
        &victim,
        &[
            "serve",
            "--emulate",
            "--listen",
            &format!("{IMDS}:80"),
            "--admin-listen",
            "127.0.0.1:0",
        ],
    );
    broker
        .expect_json_line("imds-broker listening", Duration::from_secs(20))
        .await;
    ip(&[
        "-n",
        &neighbour,
        "route",
        "add",
        &format!("{IMDS}/32"),
        "via",
        "10.213.0.2",
    ]);
    let imds: SocketAddr = format!("{IMDS}:80").parse().unwrap();

    let asked = std::time::Instant::now();
    let stolen = send_from(&neighbour, imds, TOKEN_REQUEST)
        .await
        .expect("the neighbour reaches the victim's listener (the route works)");
    let closed_after = asked.elapsed();
    assert!(
        stolen.starts_with("HTTP/1.1 403 "),
        "the neighbour was not refused:\n{stolen}"
    );
    assert!(!stolen.contains("access_token"), "{stolen}");
    let refusal = body(&stolen);
    assert_eq!(refusal["error"], "access_denied", "{stolen}");
    let why = refusal["error_description"].as_str().unwrap_or_default();
    assert!(
        why.contains("inside its own pod") && why.contains("10.213.0.3"),
        "{why}"
    );
    // Closed right after the answer although the request kept the connection alive (the
    // head timeout is 5 s, as is the read timeout), and logged like any refusal.
    assert!(closed_after < Duration::from_secs(3), "{closed_after:?}");
    let logs = lab.processes[0].logs();
    assert!(
        logs.contains("token request refused") && logs.contains("10.213.0.3"),
        "{logs}"
    );

    let own = send_from(&victim, imds, TOKEN_REQUEST_CLOSE)
        .await
        .expect("a client inside the victim reaches its broker");
    assert!(own.starts_with("HTTP/1.1 200 "), "{own}");
    assert!(body(&own)["access_token"].is_string(), "{own}");
}

/// Issue 24, item 7: run by mistake in a hostNetwork pod, init-network added 169.254.169.254
/// to the node's `lo`. A namespace holding a bridge (as a kubenet or bridge-CNI node does) is
/// now refused and left as it was; `--skip-host-network-check` overrides the check.
#[tokio::test]
async fn init_network_refuses_a_namespace_that_looks_like_a_node() {
    if !netns_available() {
        return;
    }
    let mut lab = Lab::new();
    let node = lab.switch();
    ip(&["-n", &node, "link", "set", "lo", "up"]);

    let refused = init_network(&node, &[]);
    let err = stderr(&refused);
    assert!(
        !refused.status.success(),
        "ran in a node's namespace: {err}"
    );
    for needle in ["br0", "hostNetwork", "--skip-host-network-check"] {
        assert!(err.contains(needle), "no {needle:?} in: {err}");
    }
    assert!(!addresses(&node).contains(IMDS), "{}", addresses(&node));

    let forced = init_network(&node, &["--skip-host-network-check"]);
    assert!(forced.status.success(), "{}", stderr(&forced));
    assert!(addresses(&node).contains(&format!("{IMDS}/32")));
}

/// Issue 24, item 7: "already exists" was success, so init-network "succeeded" on top of an
/// IMDS address something else had put there (the node's, a stand-in IMDS). An address it did
/// not add is now refused and left alone; its own (labelled `lo:imdsb`) is still success, so a
/// restarted init container passes.
#[tokio::test]
async fn init_network_refuses_an_address_it_did_not_add_and_accepts_its_own() {
    if !netns_available() {
        return;
    }
    let mut lab = Lab::new();
    let sw = lab.switch();

    let taken = lab.pod("taken", &sw, "10.213.1.2");
    ip(&[
        "-n",
        &taken,
        "addr",
        "add",
        &format!("{IMDS}/32"),
        "dev",
        "lo",
    ]);
    let refused = init_network(&taken, &[]);
    let err = stderr(&refused);
    assert!(
        !refused.status.success(),
        "took over another's address: {err}"
    );
    assert!(err.contains("did not put it there"), "{err}");
    let theirs = addresses(&taken);
    assert!(
        theirs.contains(&format!("{IMDS}/32 scope global lo")),
        "left as it was: {theirs}"
    );

    let pod = lab.pod("pod", &sw, "10.213.1.3");
    let first = init_network(&pod, &[]);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(
        stderr(&first).contains(r#""added":true"#),
        "{}",
        stderr(&first)
    );
    let second = init_network(&pod, &[]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(
        stderr(&second).contains(r#""added":false"#),
        "{}",
        stderr(&second)
    );
    let ours = addresses(&pod);
    assert!(
        ours.contains(&format!("{IMDS}/32 scope host lo:imdsb")),
        "{ours}"
    );
    assert_eq!(ours.matches(IMDS).count(), 1, "{ours}");
}
