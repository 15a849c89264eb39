"""Harness for the real-client conformance suite: the fake Entra, broker processes, client
subprocesses, and the client x protocol x result table printed at the end of the run.

Everything runs on this machine: the fake Entra and the broker listen on 127.0.0.1 (or, in
test_transparent.py, inside network namespaces this run creates). Client subprocesses get a
clean environment (no proxy, no AZURE_* but what a test sets, HOME in a temp dir), so no
credential in the SDK chains can reach the internet.
"""

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
BROKER_BIN = Path(os.environ.get("IMDS_BROKER_BIN", TARGET / "debug" / "imds-broker"))
FAKE_ENTRA_BIN = TARGET / "debug" / "examples" / "fake_entra"
FAKE_KUBE_PODS_BIN = TARGET / "debug" / "examples" / "fake_kube_pods"
RUST_CLIENT_BIN = TARGET / "debug" / "examples" / "rust_mi_client"
PY_CLIENT = Path(__file__).parent / "clients" / "py_client.py"
RETRY_PROBE = Path(__file__).parent / "clients" / "retry_probe.py"
# Built by tests/conformance/go/build.sh (scripts/test-conformance.sh runs it).
GO_CLIENT_DIR = Path(os.environ.get("GO_CLIENTS_DIR", TARGET / "go-clients"))
NODE_CLIENT = Path(__file__).parent / "node" / "client.mjs"
NODE_BIN = shutil.which("node") or "node"
IP_BIN = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip", "/bin/ip") if os.path.exists(p)), "ip")

STORAGE = "https://storage.azure.com/"
ARM = "https://management.azure.com/"
# The two scopes Velero's Go code asks for (storage, and ARM in its classic spelling).
VELERO_STORAGE_SCOPE = "https://storage.azure.com/.default"
VELERO_ARM_SCOPE = "https://management.core.windows.net//.default"
ARM_CLASSIC = "https://management.core.windows.net/"
# The identity's other names, configured on every broker so ResourceID/ObjectID selectors work.
IDENTITY_RESOURCE_ID = ("/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/velero"
                        "/providers/Microsoft.ManagedIdentity/userAssignedIdentities/velero-conformance")
IDENTITY_OBJECT_ID = "0b1ec7ed-0000-4000-8000-00000000cafe"
REFUSED = "https://vault.azure.net/"
UNKNOWN_CLIENT_ID = "00000000-0000-0000-0000-00000000dead"
IDENTITY_HEADER = "conformance-identity-header-5ecr3t"
# Distinctive, and under 2 h so no SDK switches to its "refresh at half life" rule.
TOKEN_LIFETIME = 5000


# (lang, kind) -> name in the results table; shared by the env-based and transparent suites.
CLIENTS = {
    ("python", "mic"): "Python azure-identity ManagedIdentityCredential",
    ("python", "dac"): "Python azure-identity DefaultAzureCredential",
    ("python", "msal"): "Python msal ManagedIdentityClient",
    ("node", "mic"): "Node @azure/identity ManagedIdentityCredential",
    ("node", "dac"): "Node @azure/identity DefaultAzureCredential",
    ("rust", "mic"): "Rust azure_identity ManagedIdentityCredential",
}

# Go azidentity, one module per version a Velero release pins (tests/conformance/go/).
GO_VERSIONS = {"v1.6.0": "1.15", "v1.8.1": "1.16", "v1.10.1": "1.17", "v1.13.1": "1.18"}
for _v, _velero in GO_VERSIONS.items():
    CLIENTS[("go", _v)] = f"Go azidentity {_v} (Velero {_velero}) ManagedIdentityCredential"


def go_client_bin(version):
    return GO_CLIENT_DIR / f"azidentity-{version}" / "go-client"


def go_version_tuple(version):
    return tuple(int(x) for x in version.lstrip("v").split("."))


def go_extra_steps(client_id):
    """Go-only steps (after the four shared ones): Velero's two scopes with Velero's option,
    ClientID(""), ResourceID, ObjectID."""
    return [
        {"resource": STORAGE, "scope": VELERO_STORAGE_SCOPE, "client_id": client_id},
        {"resource": ARM_CLASSIC, "scope": VELERO_ARM_SCOPE, "client_id": client_id},
        {"resource": STORAGE, "scope": VELERO_STORAGE_SCOPE, "client_id": ""},
        {"resource": STORAGE, "scope": VELERO_STORAGE_SCOPE, "resource_id": IDENTITY_RESOURCE_ID},
        {"resource": STORAGE, "scope": VELERO_STORAGE_SCOPE, "object_id": IDENTITY_OBJECT_ID},
    ]


# Index of each Go-only step in a Go client's results (after the four shared steps).
GO_STEP = {"velero_storage_scope": 4, "velero_arm_scope": 5, "client_id_empty": 6, "resource_id": 7, "object_id": 8}

def wait_for(cond, timeout, what, interval=0.05):
    """Polls cond() until it returns a truthy value; fails with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def http_get(url, headers=None, timeout=10):
    """(status, headers, parsed JSON body or raw text)."""
    req = urllib.request.Request(url, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            status, hdrs, raw = resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as e:
        status, hdrs, raw = e.code, dict(e.headers), e.read().decode()
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw


class Process:
    """A child process whose stderr lines are collected by a thread."""

    def __init__(self, argv, env=None, cwd=None, stdout=subprocess.DEVNULL):
        self.argv = argv
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def log(self):
        with self._lock:
            return "\n".join(self.lines)

    def json_lines(self):
        with self._lock:
            lines = list(self.lines)
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


NS_GET = """
import json, sys, urllib.error, urllib.request
req = urllib.request.Request(sys.argv[1], headers=json.loads(sys.argv[2]))
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(req, timeout=10) as r:
        status, headers, raw = r.status, dict(r.headers), r.read().decode()
except urllib.error.HTTPError as e:
    status, headers, raw = e.code, dict(e.headers), e.read().decode()
print(json.dumps([status, headers, raw]))
"""


def ns_http_get(netns, url, headers=None, timeout=20):
    """http_get from inside network namespace `netns` (its 127.0.0.1 is not ours)."""
    p = subprocess.run(
        [IP_BIN, "netns", "exec", netns, sys.executable, "-c", NS_GET, url, json.dumps(headers or {})],
        capture_output=True, text=True, timeout=timeout,
    )
    if p.returncode != 0:
        raise AssertionError(f"GET {url} in netns {netns} failed: {p.stderr[-2000:]}")
    status, hdrs, raw = json.loads(p.stdout)
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw


NS_REQUEST = """
import json, sys, urllib.request
method, url, body = sys.argv[1], sys.argv[2], sys.argv[3]
req = urllib.request.Request(url, method=method, data=body.encode() if body else None,
                             headers={"Content-Type": "application/json"})
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(req, timeout=10) as r:
    print(r.read().decode())
"""


def fake_control(fake, method, path, body=None, netns=None):
    """The fake Entra's control API (examples/fake_entra.rs: /calls, /call-log, /fault), from
    this process or from inside `netns` (where that fake's 127.0.0.1 is). Returns parsed JSON."""
    url = fake["calls_url"].rsplit("/", 1)[0] + path
    payload = json.dumps(body) if body is not None else ""
    if netns:
        p = subprocess.run([IP_BIN, "netns", "exec", netns, sys.executable, "-c", NS_REQUEST, method, url, payload],
                           capture_output=True, text=True, timeout=20)
        if p.returncode != 0:
            raise AssertionError(f"{method} {url} in netns {netns} failed: {p.stderr[-2000:]}")
        raw = p.stdout
    else:
        req = urllib.request.Request(url, method=method, data=payload.encode() if payload else None,
                                     headers={"Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=10) as r:
            raw = r.read().decode()
    return json.loads(raw)


def start_fake_entra(prefix=()):
    """Starts examples/fake_entra (optionally under a prefix such as `ip netns exec NS`);
    returns (Popen, its JSON line: authority, ca_file, tenant_id, client_id, token_file)."""
    proc = subprocess.Popen(
        list(prefix) + [str(FAKE_ENTRA_BIN), "--token-lifetime-secs", str(TOKEN_LIFETIME), "--remint-secs", "600"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError("fake_entra printed nothing: " + proc.stderr.read())
    return proc, json.loads(line)


def stop_process(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Broker:
    """`imds-broker serve` (or `subcommand`, e.g. `node`) on ephemeral ports (read back from its
    "listening" log line). With `netns`, it runs inside that network namespace and is queried
    from there."""

    def __init__(self, args, prefix=(), env_extra=None, netns=None, subcommand="serve"):
        env = {"PATH": os.environ.get("PATH", ""), "RUST_LOG": "info", "IMDS_BROKER_LOG_FORMAT": "json"}
        env.update(env_extra or {})
        self.netns = netns
        if netns:
            prefix = [IP_BIN, "netns", "exec", netns] + list(prefix)
        self.process = Process(list(prefix) + [str(BROKER_BIN), subcommand] + list(args), env=env)

        def listening():
            if self.process.proc.poll() is not None:
                raise AssertionError(f"broker exited at start-up:\n{self.process.log()}")
            for line in self.process.json_lines():
                if line.get("message") == "imds-broker listening":
                    return line
            return None

        line = wait_for(listening, 20, "the broker's 'imds-broker listening' line")
        self.listen = line["listen"].split(",")
        self.token_addr = self.listen[0]
        self.admin_addr = line["admin_listen"]

    @property
    def base(self):
        return f"http://{self.token_addr}"

    def imds(self, resource, headers=None, **params):
        q = urllib.parse.urlencode(dict({"api-version": "2018-02-01", "resource": resource}, **params))
        hdrs = {"Metadata": "true"} if headers is None else headers
        return self.get(f"{self.base}/metadata/identity/oauth2/token?{q}", hdrs)

    def get(self, url, headers=None):
        if self.netns:
            return ns_http_get(self.netns, url, headers)
        return http_get(url, headers)

    def metrics(self):
        status, _, body = self.get(f"http://{self.admin_addr}/metrics")
        assert status == 200, body
        return body

    def requests_served(self, status=None, endpoint=None):
        """Sum of imds_broker_http_requests_total for this status (any if None) and endpoint."""
        total = 0.0
        for m in re.finditer(r'^imds_broker_http_requests_total\{([^}]*)\} (\S+)$', self.metrics(), re.M):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            if (status is None or labels.get("status") == str(status)) and (endpoint is None or labels.get("endpoint") == endpoint):
                total += float(m.group(2))
        return int(total)

    def stop(self):
        self.process.stop()


@pytest.fixture(scope="session")
def fake_entra():
    """The fake Entra (examples/fake_entra.rs) for the whole run: its authority, CA, ids and a
    valid service-account token file (re-minted by the fake; tests copy it)."""
    for binary in (BROKER_BIN, FAKE_ENTRA_BIN, RUST_CLIENT_BIN, *(go_client_bin(v) for v in GO_VERSIONS)):
        if not binary.exists():
            pytest.fail(f"{binary} is missing: run scripts/test-conformance.sh (it builds it)")
    proc, info = start_fake_entra()
    yield info
    stop_process(proc)


@pytest.fixture
def token_file(fake_entra, tmp_path):
    """A private copy of the fake's service-account token, which a test may delete/restore."""
    path = tmp_path / "sa-token"
    shutil.copy(fake_entra["token_file"], path)
    return path


def production_broker_args(fake, token_file):
    """What the webhook configures, with the broker's production retry defaults."""
    return [
        "--listen", "127.0.0.1:0",
        "--admin-listen", "127.0.0.1:0",
        "--client-id", fake["client_id"],
        "--tenant-id", fake["tenant_id"],
        "--authority-host", fake["authority"],
        "--ca-file", fake["ca_file"],
        "--token-file", str(token_file),
        "--identity-header", IDENTITY_HEADER,
        "--allow-resource", f"{STORAGE},{ARM},{ARM_CLASSIC}",
        "--resource-id", IDENTITY_RESOURCE_ID,
        "--object-id", IDENTITY_OBJECT_ID,
    ]


def broker_args(fake, token_file, *extra):
    """The production configuration with fast retries, so failure cases stay short."""
    return [
        *production_broker_args(fake, token_file),
        "--retry-initial-backoff", "50ms",
        "--retry-max-backoff", "2s",
        "--entra-timeout", "5s",
        *extra,
    ]


@pytest.fixture
def start_broker():
    """Factory: start_broker(args, prefix=(), env_extra=None) -> Broker; all stopped at teardown."""
    started = []

    def start(args, prefix=(), env_extra=None):
        b = Broker(args, prefix=prefix, env_extra=env_extra)
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()


# --- clients -----------------------------------------------------------------------------

def client_env(protocol, broker_base, home, extra=None):
    """The environment a pod would give the client, and nothing else."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8"}
    if protocol == "appservice":
        env["IDENTITY_ENDPOINT"] = f"{broker_base}/msi/token"
        env["IDENTITY_HEADER"] = IDENTITY_HEADER
    elif protocol == "imds":
        env["AZURE_POD_IDENTITY_AUTHORITY_HOST"] = broker_base
    elif protocol != "transparent":
        raise ValueError(protocol)
    env.update(extra or {})
    return env


def client_argv(lang, kind, steps, go_kind="mic"):
    if lang == "go":
        # kind is the azidentity version; go_kind the credential (mic, or dac).
        return [str(go_client_bin(kind)), go_kind, json.dumps(steps)]
    if lang == "python":
        return [sys.executable, str(PY_CLIENT), kind, json.dumps(steps)]
    if lang == "node":
        return [NODE_BIN, str(NODE_CLIENT), kind, json.dumps(steps)]
    raise ValueError(lang)


def parse_results(out, err, argv):
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"client {argv[:3]} printed no result.\nstdout:\n{out}\nstderr:\n{err[-4000:]}")


def run_rust_steps(steps, env, prefix=(), timeout=120):
    """The Rust client does one call per process; run one per step."""
    results = []
    for step in steps:
        argv = list(prefix) + [str(RUST_CLIENT_BIN), "--resource", step["resource"]]
        if step.get("client_id"):
            argv += ["--client-id", step["client_id"]]
        p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
        r = parse_results(p.stdout, p.stderr, argv)
        r.setdefault("attempts", 1)
        r.setdefault("errors", [r["error"]] if not r["ok"] else [])
        results.append(r)
    return results


def run_client(lang, kind, steps, env, prefix=(), timeout=120, go_kind="mic"):
    """Runs one client process over `steps`; returns the list of per-step results."""
    if lang == "rust":
        return run_rust_steps(steps, env, prefix=prefix, timeout=timeout)
    argv = list(prefix) + client_argv(lang, kind, steps, go_kind=go_kind)
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(env["HOME"]))
    return parse_results(p.stdout, p.stderr, argv)["results"]


def start_client(lang, kind, steps, env, prefix=()):
    """Starts a client process without waiting (the 503 test restores the token file while it
    retries). Returns the Popen; finish with finish_client()."""
    if lang == "rust":
        step = steps[0]
        argv = list(prefix) + [str(RUST_CLIENT_BIN), "--resource", step["resource"]]
        if step.get("client_id"):
            argv += ["--client-id", step["client_id"]]
    else:
        argv = list(prefix) + client_argv(lang, kind, steps)
    return subprocess.Popen(
        argv, env=env, cwd=str(env["HOME"]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish_client(proc, timeout=90):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"client did not finish within {timeout}s; stderr:\n{err[-4000:]}")
    parsed = parse_results(out, err, proc.args)
    if "results" in parsed:
        return parsed["results"][0]
    parsed.setdefault("attempts", 1)
    return parsed


# --- Go checks shared by test_clients.py and test_transparent.py ------------------------------

def check_go_token(r, fake, audience):
    """A Go result that carries the fake Entra's token for this identity and audience."""
    assert r["ok"], r.get("error") or r
    assert r["phase"] == "get_token" and r["requests"] >= 1, r
    claims = r["claims"]
    assert claims["appid"] == fake["client_id"], claims
    assert claims["tid"] == fake["tenant_id"], claims
    # The audience is the resource as the broker asked Entra for it; Go trims "/.default"
    # (storage without a slash, ARM's classic spelling keeps its own trailing slash).
    assert claims["aud"].rstrip("/") == audience.rstrip("/"), claims
    # A second GetToken on the same credential is the SDK's cache, not another request.
    assert r.get("again_us", 10**9) < 50_000, r


def check_go_velero_case(case, version, r, fake):
    """Shared by the App Service (here) and transparent (test_transparent.py) suites."""
    if case == "velero_storage_scope":
        check_go_token(r, fake, "https://storage.azure.com")
    elif case == "velero_arm_scope":
        check_go_token(r, fake, ARM_CLASSIC)
    elif case == "client_id_empty":
        if go_version_tuple(version) < (1, 9):
            # <= 1.8 sends `client_id=` (empty); the broker serves its configured identity.
            check_go_token(r, fake, "https://storage.azure.com")
            assert r["options"] == {"ID": "ClientID", "value": ""}, r
        else:
            # MSAL Go refuses an empty user-assigned ID when the credential is built: no request
            # is ever sent, so no broker can help. Velero 1.17+ needs AZURE_CLIENT_ID.
            assert not r["ok"], r
            assert r["phase"] == "constructor", r
            assert r["requests"] == 0, r
            assert "empty" in r["error"].lower() and "UserAssignedClientID" in r["error"], r["error"]
    elif case == "resource_id":
        check_go_token(r, fake, "https://storage.azure.com")
    elif case == "object_id":
        if go_version_tuple(version) < (1, 8):
            # azidentity v1.6.0 has no ObjectID option at all (added in v1.8.0).
            assert not r["ok"] and r["phase"] == "constructor" and r["requests"] == 0, r
            assert "no ObjectID option" in r["error"], r
        else:
            check_go_token(r, fake, "https://storage.azure.com")
    else:
        raise ValueError(case)


# --- the results table -----------------------------------------------------------------------

RESULTS = {}
CASE_ORDER = ["token", "token_client_id", "expiry", "unknown_client_id", "refused_resource", "recovers_after_503",
              *GO_STEP, "dac_probe",  # Go only: test_clients.py / test_transparent.py
              # Go only: test_go_faults.py
              "throttle_429_ra10", "throttle_429_ra30", "throttle_429_ra120", "entra_down_60s"]


def pytest_runtest_makereport(item, call):
    marker = item.get_closest_marker("matrix")
    if marker is None or call.when not in ("setup", "call"):
        return
    client, protocol, case = marker.args
    key = (client, protocol)
    if call.when == "setup" and call.excinfo is None:
        return
    if call.excinfo is None:
        outcome = "pass"
    elif call.excinfo.errisinstance(pytest.skip.Exception):
        outcome = "skip"
    elif item.get_closest_marker("xfail") is not None:
        outcome = "FAIL (xfail)"
    else:
        outcome = "FAIL"
    RESULTS.setdefault(key, {})[case] = outcome


def results_markdown():
    cases = [c for c in CASE_ORDER if any(c in v for v in RESULTS.values())]
    lines = ["| client | protocol | " + " | ".join(cases) + " |", "|---|---|" + "---|" * len(cases)]
    for (client, protocol), outcomes in sorted(RESULTS.items()):
        cells = [outcomes.get(c, "n/a") for c in cases]
        lines.append(f"| {client} | {protocol} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pytest_configure(config):
    config.addinivalue_line("markers", "matrix(client, protocol, case): a cell of the results table")


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    table = results_markdown()
    terminalreporter.write_sep("=", "client x protocol x result")
    terminalreporter.write_line(table)
    out = TARGET / "conformance"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    terminalreporter.write_line(f"(also written to {out / 'results.md'})")


# --- network namespaces (test_transparent.py, test_storage_velero.py) ------------------------

_names = itertools.count()


def netns_unavailable():
    """Why this run cannot make network namespaces, or None."""
    if os.geteuid() != 0:
        return "not root"
    probe = f"ibconf-probe-{os.getpid()}"
    p = subprocess.run([IP_BIN, "netns", "add", probe], capture_output=True, text=True)
    if p.returncode != 0:
        return f"`ip netns add` failed: {p.stderr.strip()}"
    subprocess.run([IP_BIN, "netns", "del", probe], capture_output=True)
    return None


class Netns:
    """A network namespace made by this run; deleted (with whatever we started in it) at exit."""

    def __init__(self):
        self.name = f"ibconf-{os.getpid()}-{next(_names)}"
        subprocess.run([IP_BIN, "netns", "add", self.name], check=True)
        self.procs = []

    @property
    def prefix(self):
        return [IP_BIN, "netns", "exec", self.name]

    def run(self, argv, **kw):
        return subprocess.run(self.prefix + list(argv), capture_output=True, text=True, timeout=60, **kw)

    def ip(self, *args):
        p = subprocess.run([IP_BIN, "-n", self.name, *args], capture_output=True, text=True, check=True)
        return p.stdout

    def lo_addresses(self):
        return self.ip("-o", "-4", "addr", "show", "dev", "lo")

    def veth(self, addr, peer_addr, peer=None):
        """A veth pair from this namespace to `peer` (a Netns; None: the namespace this runs
        in, i.e. the host's, standing for the node), addresses in CIDR form on each end, both
        ends and this namespace's loopback up, and this namespace's default route via
        `peer_addr`. Deleting the namespace deletes the pair."""
        tag = f"{os.getpid() % 100000}{next(_names)}"
        here, there = f"ibv{tag}p", f"ibv{tag}n"  # at most 15 characters
        subprocess.run([IP_BIN, "link", "add", here, "netns", self.name, "type", "veth", "peer", "name", there,
                        *(["netns", peer.name] if peer else [])], check=True)
        there_ip = [IP_BIN, *(["-n", peer.name] if peer else [])]
        subprocess.run([*there_ip, "addr", "add", peer_addr, "dev", there], check=True)
        subprocess.run([*there_ip, "link", "set", "dev", there, "up"], check=True)
        self.ip("addr", "add", addr, "dev", here)
        for dev in (here, "lo"):
            self.ip("link", "set", "dev", dev, "up")
        self.ip("route", "add", "default", "via", peer_addr.split("/")[0])
        return here, there

    def close(self):
        for proc in self.procs:
            stop_process(proc)
        subprocess.run([IP_BIN, "netns", "del", self.name], capture_output=True)
