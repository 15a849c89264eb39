"""Transparent mode, for real: a network namespace stands in for the pod.

1. `imds-broker init-network` runs as a non-root user holding only CAP_NET_ADMIN (what the init
   container gets), adds 169.254.169.254/32 to the namespace's loopback, and is idempotent;
   without the capability it fails and says NET_ADMIN.
2. With the namespace's `net.ipv4.ip_unprivileged_port_start=80` (the pod's safe sysctl), the
   broker runs as a non-root user with NO capabilities and listens on 169.254.169.254:80 and
   127.0.0.1:8400. The fake Entra runs inside the namespace too (its 127.0.0.1 is not ours).
3. Python, Node, Rust and Go (azidentity v1.6.0-v1.13.1, as Velero 1.15-1.18 pin it) SDK
   clients run inside the namespace with NO override env at all (no IDENTITY_ENDPOINT, no
   AZURE_POD_IDENTITY_AUTHORITY_HOST): they call the hard-coded http://169.254.169.254 and get
   tokens with the right expiry; Go also with Velero's scopes and ID options.
4. Instance metadata is not leaked: every other /metadata/... path gets a JSON 404.
5. Without init-network (a namespace with loopback up and the broker on 127.0.0.1:8400, i.e.
   the plain sidecar), the same client does not reach the broker, and the broker cannot bind
   169.254.169.254:80 (its error says to run init-network).

Needs root and `ip netns` (CI has both). Elsewhere the tests skip with a message; with CI=true
or IMDS_BROKER_REQUIRE_NETNS=1 they fail instead, so CI cannot pass without running them.
"""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import (
    ARM,
    ARM_CLASSIC,
    GO_STEP,
    GO_VERSIONS,
    VELERO_STORAGE_SCOPE,
    IDENTITY_OBJECT_ID,
    IDENTITY_RESOURCE_ID,
    BROKER_BIN,
    CLIENTS,
    IP_BIN,
    REFUSED,
    Netns,
    STORAGE,
    TOKEN_LIFETIME,
    UNKNOWN_CLIENT_ID,
    Broker,
    Process,
    client_env,
    finish_client,
    check_go_velero_case,
    go_extra_steps,
    netns_unavailable,
    run_client,
    start_client,
    start_fake_entra,
    wait_for,
)

IMDS_IP = "169.254.169.254"
NOBODY = ["--reuid=65534", "--regid=65534", "--clear-groups"]
# A non-root user with exactly CAP_NET_ADMIN (the init container's securityContext).
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"
ONLY_NET_ADMIN = [SETPRIV, *NOBODY, "--inh-caps=-all,+net_admin", "--ambient-caps=-all,+net_admin",
                  "--bounding-set=-all,+net_admin"]
# A non-root user with no capabilities at all (the broker container).
NO_CAPS = [SETPRIV, *NOBODY, "--inh-caps=-all", "--bounding-set=-all"]

SYSCTL_BIN = shutil.which("sysctl") or next(
    (p for p in ("/usr/sbin/sysctl", "/sbin/sysctl") if os.path.exists(p)), "sysctl"
)
REQUIRED = os.environ.get("CI") == "true" or os.environ.get("IMDS_BROKER_REQUIRE_NETNS") == "1"


def transparent_unavailable():
    if not shutil.which("setpriv"):
        return "setpriv (util-linux) not installed"
    return netns_unavailable()


@pytest.fixture(scope="module", autouse=True)
def require_netns():
    reason = transparent_unavailable()
    if reason:
        msg = f"transparent-mode tests need root and `ip netns`: {reason}"
        if REQUIRED:
            pytest.fail(msg + " (required: CI=true or IMDS_BROKER_REQUIRE_NETNS=1)")
        pytest.skip(msg)


@pytest.fixture
def netns():
    ns = Netns()
    yield ns
    ns.close()


def init_network(ns, *extra, as_user=ONLY_NET_ADMIN):
    return ns.run([*as_user, str(BROKER_BIN), "init-network", *extra])


# --- init-network -------------------------------------------------------------------------

def test_init_network_with_only_net_admin_is_idempotent(netns):
    assert f"{IMDS_IP}/32" not in netns.lo_addresses()
    first = init_network(netns)
    assert first.returncode == 0, first.stderr
    # Scope host, like 127.0.0.1: never the source address of a packet leaving the pod.
    assert f"{IMDS_IP}/32 scope host" in netns.lo_addresses()
    assert "UP" in netns.ip("link", "show", "dev", "lo").split(">")[0]
    # A restarted init container finds its address and succeeds.
    second = init_network(netns)
    assert second.returncode == 0, second.stderr
    assert '"added":false' in second.stderr
    assert netns.lo_addresses().count(f"{IMDS_IP}/32") == 1
    # Loopback keeps its usual address.
    assert "127.0.0.1/8" in netns.lo_addresses()


def test_init_network_without_capability_says_net_admin(netns):
    p = init_network(netns, as_user=NO_CAPS)
    assert p.returncode != 0
    assert "NET_ADMIN" in p.stderr, p.stderr
    assert f"{IMDS_IP}/32" not in netns.lo_addresses()


# --- the transparent pod --------------------------------------------------------------------

class Pod:
    """netns + init-network (non-root, NET_ADMIN only) + the pod sysctl + fake Entra + the
    broker as nobody with no capabilities on 169.254.169.254:80 and 127.0.0.1:8400."""

    def __init__(self, allow_resources=(STORAGE, ARM, ARM_CLASSIC), extra_args=()):
        self.ns = Netns()
        self.broker = None
        self.shared = tempfile.mkdtemp(prefix="ibconf-pod-")
        try:
            p = init_network(self.ns)
            assert p.returncode == 0, p.stderr
            sysctl = self.ns.run([SYSCTL_BIN, "-w", "net.ipv4.ip_unprivileged_port_start=80"])
            assert sysctl.returncode == 0, sysctl.stderr
            fake_proc, self.fake = start_fake_entra(prefix=self.ns.prefix)
            self.ns.procs.append(fake_proc)
            # The broker runs as nobody: give it readable copies of the token and the test CA.
            os.chmod(self.shared, 0o755)
            self.token = os.path.join(self.shared, "token")
            ca = os.path.join(self.shared, "ca.pem")
            shutil.copy(self.fake["token_file"], self.token)
            shutil.copy(self.fake["ca_file"], ca)
            for f in (self.token, ca):
                os.chmod(f, 0o644)
            args = [
                "--listen", f"{IMDS_IP}:80,127.0.0.1:8400",
                "--admin-listen", "127.0.0.1:8401",
                "--client-id", self.fake["client_id"],
                "--tenant-id", self.fake["tenant_id"],
                "--authority-host", self.fake["authority"],
                "--ca-file", ca,
                "--token-file", self.token,
                "--resource-id", IDENTITY_RESOURCE_ID,
                "--object-id", IDENTITY_OBJECT_ID,
                *extra_args,
            ]
            if allow_resources:
                args += ["--allow-resource", ",".join(allow_resources)]
            self.broker = Broker(args, prefix=NO_CAPS, netns=self.ns.name)
        except BaseException:
            self.close()
            raise

    def close(self):
        if self.broker:
            self.broker.stop()
        self.ns.close()
        shutil.rmtree(self.shared, ignore_errors=True)


@pytest.fixture(scope="module")
def pod(require_netns, tmp_path_factory):
    p = Pod()
    yield p.ns, p.broker, p.fake, tmp_path_factory
    p.close()


def test_broker_binds_port_80_without_root_or_capabilities(pod):
    ns, broker, _, _ = pod
    assert broker.listen == [f"{IMDS_IP}:80", "127.0.0.1:8400"]
    # The process we started is `ip netns exec … setpriv …`, which exec()s into the broker.
    with open(f"/proc/{broker.process.proc.pid}/status") as f:
        status = f.read()
    assert "imds-broker" in status.splitlines()[0], status
    assert "\nUid:\t65534" in status, status
    assert "\nCapEff:\t0000000000000000" in status, status


PROTOCOL = "transparent IMDS (169.254.169.254, no env)"


def transparent_params(case):
    return [pytest.param(lang, kind, id=f"{lang}-{kind}",
                         marks=pytest.mark.matrix(name, PROTOCOL, case))
            for (lang, kind), name in CLIENTS.items()]


@pytest.fixture(scope="module")
def transparent_runs(pod):
    ns, broker, fake, tmp_path_factory = pod
    cache = {}

    def run(lang, kind):
        if (lang, kind) not in cache:
            home = tmp_path_factory.mktemp(f"tp-home-{lang}-{kind}")
            env = client_env("transparent", None, home)
            assert not any(k.startswith(("AZURE_", "IDENTITY_", "MSI_", "IMDS_")) for k in env), env
            steps = [
                {"resource": STORAGE},
                {"resource": ARM, "client_id": fake["client_id"]},
                {"resource": STORAGE, "client_id": UNKNOWN_CLIENT_ID},
                {"resource": REFUSED},
            ]
            if lang == "go":
                steps += go_extra_steps(fake["client_id"])
            cache[(lang, kind)] = run_client(lang, kind, steps, env, prefix=ns.prefix)
        return cache[(lang, kind)]

    return run


@pytest.mark.parametrize("lang,kind", transparent_params("token"))
def test_transparent_token(transparent_runs, lang, kind):
    r = transparent_runs(lang, kind)[0]
    assert r["ok"], r.get("error")


@pytest.mark.parametrize("lang,kind", transparent_params("token_client_id"))
def test_transparent_token_client_id(transparent_runs, lang, kind):
    r = transparent_runs(lang, kind)[1]
    assert r["ok"], r.get("error")


@pytest.mark.parametrize("lang,kind", transparent_params("expiry"))
def test_transparent_expiry(pod, transparent_runs, lang, kind):
    _, broker, _, _ = pod
    for step, resource in ((0, STORAGE), (1, ARM)):
        r = transparent_runs(lang, kind)[step]
        assert r["ok"], r.get("error")
        status, _, body = broker.get(
            f"http://{IMDS_IP}/metadata/identity/oauth2/token?api-version=2018-02-01"
            f"&resource={resource.rstrip('/')}",
            {"Metadata": "true"},
        )
        assert status == 200, body
        assert abs(r["expires_on"] - int(body["expires_on"])) <= 2, (r["expires_on"], body["expires_on"])
        assert int(body["expires_in"]) > TOKEN_LIFETIME - 300


@pytest.mark.parametrize("lang,kind", transparent_params("unknown_client_id"))
def test_transparent_unknown_client_id(transparent_runs, lang, kind):
    r = transparent_runs(lang, kind)[2]
    assert not r["ok"], "a token for an identity the broker does not serve"
    if lang == "rust":
        # azure_identity replaces a 400 body with its own fixed text; the status is kept.
        assert r["status"] == 400 and "has not been assigned" in r["error"], r
    else:
        assert "Identity not found" in r["error"] and UNKNOWN_CLIENT_ID in r["error"], r["error"]
    if lang == "go":
        assert r["error_type"] == "AuthenticationFailedError" and r["status"] == 400, r
        assert r["requests"] == 1, f"a 400 must not be retried: {r}"
    assert r["elapsed_ms"] < 5000, r


@pytest.mark.parametrize("lang,kind", transparent_params("refused_resource"))
def test_transparent_refused_resource(transparent_runs, lang, kind):
    r = transparent_runs(lang, kind)[3]
    assert not r["ok"], "a token for a resource outside --allow-resource"
    assert "not allowed by this broker's policy" in r["error"], r["error"]
    if lang == "go":
        # Not "unavailable": in a credential chain Go would otherwise move on silently.
        assert r["error_type"] == "AuthenticationFailedError" and r["status"] == 403, r
    assert r["elapsed_ms"] < 5000, r


@pytest.fixture(scope="module")
def pod503(require_netns):
    """A second pod whose broker serves any resource, so each client can ask for one nobody
    asked for before (nothing cached) while the token file is missing."""
    p = Pod(allow_resources=())
    yield p
    p.close()


# Clients whose own retry policy retries a 503; plain MSAL Python relies on the application.
SDK_RETRIES_503 = {("python", "mic"), ("python", "dac"), ("node", "mic"), ("node", "dac"), ("rust", "mic"),
                   *(("go", v) for v in GO_VERSIONS)}


@pytest.mark.parametrize("lang,kind", transparent_params("recovers_after_503"))
def test_transparent_recovers_after_503(pod503, tmp_path, lang, kind):
    broker = pod503.broker
    resource = f"https://{lang}-{kind}.conformance.example/"
    hidden = pod503.token + ".hidden"
    served_before = broker.requests_served(503, "imds")
    os.rename(pod503.token, hidden)
    step = {"resource": resource}
    if (lang, kind) not in SDK_RETRIES_503:
        step["until_ok_secs"] = 30
    home = tmp_path / "home"
    home.mkdir()
    proc = start_client(lang, kind, [step], client_env("transparent", None, home), prefix=pod503.ns.prefix)
    try:
        wait_for(lambda: broker.requests_served(503, "imds") > served_before, 30, "the broker to answer 503")
    finally:
        os.rename(hidden, pod503.token)
    r = finish_client(proc)
    assert r["ok"], r.get("error")
    if (lang, kind) in SDK_RETRIES_503:
        assert r["attempts"] == 1, f"the SDK did not retry the 503 itself: {r}"
    assert r["elapsed_ms"] < 20000, r


@pytest.mark.parametrize("version,case", [
    pytest.param(version, case, id=f"go-{version}-{case}",
                 marks=pytest.mark.matrix(CLIENTS[("go", version)], PROTOCOL, case))
    for version in GO_VERSIONS for case in GO_STEP
])
def test_transparent_go_velero_cases(pod, transparent_runs, version, case):
    """Velero's scopes, ClientID(""), ResourceID and ObjectID over transparent IMDS (the same
    checks as test_clients.py's App Service ones)."""
    _, _, fake, _ = pod
    check_go_velero_case(case, version, transparent_runs("go", version)[GO_STEP[case]], fake)


@pytest.mark.parametrize("version", [
    pytest.param(version, id=f"go-{version}",
                 marks=pytest.mark.matrix(CLIENTS[("go", version)], PROTOCOL, "dac_probe"))
    for version in GO_VERSIONS
])
def test_transparent_go_default_credential_probe(pod, tmp_path, version):
    """Go's DefaultAzureCredential first probes IMDS (GET, no Metadata header, 1 s, no retry)
    and uses managed identity only if something answered. The broker's JSON 400 counts as an
    answer: the token follows. A refused resource then ends the chain with the broker's
    message (AuthenticationFailedError), instead of moving on to the developer credentials
    (except on v1.8.1, see below)."""
    ns, broker, _, _ = pod
    probes_before = broker.requests_served(400, "imds")
    steps = [{"resource": STORAGE, "scope": VELERO_STORAGE_SCOPE}, {"resource": REFUSED}]
    r = run_client("go", version, steps, client_env("transparent", None, tmp_path), prefix=ns.prefix,
                   go_kind="dac")
    token, refused = r
    assert token["ok"], token.get("error")
    # The probe, then the token request (each step is a new credential: it probes again).
    assert token["requests"] == 2, token
    assert broker.requests_served(400, "imds") == probes_before + 2, "one probe per DefaultAzureCredential"
    assert not refused["ok"]
    if version == "v1.8.1":
        # v1.8.1 alone turns every non-2xx IMDS answer in a chain (but a 400 for a user-assigned
        # ID) into "unavailable" and moves on (to the CLI credentials, absent here). The
        # broker's message still ends up in the chain's error text.
        assert refused["error_type"] == "credentialUnavailableError", refused
    else:
        assert refused["error_type"] == "AuthenticationFailedError", refused
    assert "not allowed by this broker's policy" in refused["error"], refused["error"]


@pytest.mark.parametrize(
    "path",
    [
        "/metadata/instance?api-version=2021-02-01",
        "/metadata/instance/compute?api-version=2021-02-01",
        "/metadata/instance/network/interface/0/ipv4/ipAddress/0/publicIpAddress?api-version=2021-02-01&format=text",
        "/metadata/attested/document?api-version=2020-09-01",
        "/metadata/scheduledevents?api-version=2020-07-01",
        "/metadata/versions",
    ],
)
def test_instance_metadata_is_not_served(pod, path):
    _, broker, _, _ = pod
    status, headers, body = broker.get(f"http://{IMDS_IP}{path}", {"Metadata": "true"})
    assert status == 404, body
    assert headers.get("Content-Type", headers.get("content-type", "")).startswith("application/json")
    assert body["error"] == "not_found"
    assert "not served by imds-broker" in body["error_description"]


def test_token_endpoint_answers_probes_with_json(pod):
    """Go's DefaultAzureCredential probe (no query, no Metadata header) and Python's (needs a
    JSON error body) both get a JSON answer, so the IMDS source counts as available."""
    _, broker, _, _ = pod
    status, _, body = broker.get(f"http://{IMDS_IP}/metadata/identity/oauth2/token")
    assert status == 400
    assert body["error"] and body["error_description"]


# --- without init-network -------------------------------------------------------------------

def test_without_init_network_the_client_does_not_reach_the_broker(netns, tmp_path):
    # A pod's loopback is up; only init-network's address is missing.
    netns.ip("link", "set", "dev", "lo", "up")
    # The transparent listener cannot even start, and says why.
    p = netns.run([str(BROKER_BIN), "serve", "--emulate", "--listen", f"{IMDS_IP}:80",
                   "--admin-listen", "127.0.0.1:8401"])
    assert p.returncode != 0
    assert "init-network" in p.stderr, p.stderr
    # The plain sidecar listener works, but a client with no env never reaches it.
    broker = Broker(["--emulate", "--listen", "127.0.0.1:8400", "--admin-listen", "127.0.0.1:8401"],
                    netns=netns.name)
    try:
        status, _, _ = broker.imds(STORAGE)
        assert status == 200  # the broker itself is fine
        served_before = broker.requests_served()
        home = tmp_path / "home"
        home.mkdir()
        r = run_client("python", "mic", [{"resource": STORAGE}], client_env("transparent", None, home),
                       prefix=netns.prefix)[0]
        assert not r["ok"], "a token without init-network?"
        # azure-identity's wording for "nothing answered at 169.254.169.254".
        assert "no response from the IMDS endpoint" in r["error"], r["error"]
        assert broker.requests_served() == served_before
    finally:
        broker.stop()


# The node's real IMDS, for test_init_network_takes_imds_away_from_the_node: it serves any caller
# (imds-broker serves only callers inside its own pod, so it cannot stand in). Appends one line
# per token request to argv[1]; prints "ready" once it listens.
NODE_IMDS = """
import json, sys, time, urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer
class Imds(BaseHTTPRequestHandler):
    def do_GET(self):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        with open(sys.argv[1], "a") as f:
            f.write(self.path + "\\n")
        now = int(time.time())
        body = json.dumps({"access_token": "node-token", "client_id": "99999999-9999-9999-9999-999999999999",
                           "expires_in": "3599", "expires_on": str(now + 3599), "ext_expires_in": "3599",
                           "not_before": str(now), "resource": query.get("resource", [""])[0],
                           "refresh_token": "", "token_type": "Bearer"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = HTTPServer(("169.254.169.254", 80), Imds)
print("ready", flush=True)
server.serve_forever()
"""


def test_init_network_takes_imds_away_from_the_node(tmp_path):
    """A pod with a default route to a "node" namespace whose loopback has 169.254.169.254 and
    an IMDS on it (a stand-in for the node's real IMDS and identity). Before init-network the
    pod's client gets the NODE's token; after it, the pod's own broker answers and the node sees
    no further request."""
    node, pod = Netns(), Netns()
    brokers = []
    node_imds = None
    try:
        # Link-local /30 between them: addresses only these two namespaces have.
        pod.veth("169.254.100.2/30", "169.254.100.1/30", peer=node)
        node.ip("link", "set", "dev", "lo", "up")
        node.ip("addr", "add", f"{IMDS_IP}/32", "dev", "lo")

        asked = tmp_path / "node-imds-requests"
        asked.touch()
        node_imds = Process([IP_BIN, "netns", "exec", node.name, sys.executable, "-c", NODE_IMDS, str(asked)],
                            stdout=subprocess.PIPE)
        assert node_imds.proc.stdout.readline().strip() == "ready", node_imds.log()
        node_requests = lambda: len(asked.read_text().splitlines())  # noqa: E731
        env = client_env("transparent", None, tmp_path)
        step = [{"resource": STORAGE}]

        # Without init-network the pod reaches the node's IMDS (and the node's identity).
        r = run_client("python", "mic", step, env, prefix=pod.prefix)[0]
        assert r["ok"], r.get("error")
        assert node_requests() == 1

        # With it, 169.254.169.254 is the pod's own.
        p = init_network(pod)
        assert p.returncode == 0, p.stderr
        pod_broker = Broker(["--emulate", "--listen", f"{IMDS_IP}:80", "--admin-listen", "127.0.0.1:8401"],
                            netns=pod.name)
        brokers.append(pod_broker)
        r = run_client("python", "mic", step, env, prefix=pod.prefix)[0]
        assert r["ok"], r.get("error")
        assert pod_broker.requests_served(200, "imds") == 1
        assert node_requests() == 1, "the node's IMDS was asked again"
    finally:
        if node_imds:
            node_imds.stop()
        for b in brokers:
            b.stop()
        pod.close()
        node.close()
