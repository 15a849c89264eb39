"""Velero's own storage path against Azurite with OAuth on, the broker its only credential.

For each Velero version with a module in tests/conformance/velero/ (built by
scripts/test-storage.sh into target/velero-kopia/<version>/velero-roundtrip), the program:
prepares the data mover's kopia repository in an azure BSL the way the Velero server does
(udmrepo/kopialib repo service: Init(false) -> not initialized -> Init(true) on 1.15/1.17,
IsReady -> Create on 1.18), connects a data-mover config to it, snapshots a small directory
tree with Velero's kopia uploader, restores it elsewhere and compares. BSL config:
storageAccount, storageAccountURI (Azurite's path-style URL), useAAD=true, caCert (base64, as
the BSL passes it); the credentials file names AZURE_CLIENT_ID only. The environment holds
IDENTITY_ENDPOINT/IDENTITY_HEADER (the emulated broker) and no AZURE_* secret.

Node mode (issue 21): the same program as a pod of a node served by `imds-broker node` on a
non-loopback address with attestation on. Two network namespaces made here stand for two pods,
each joined to the host's namespace (the node) by a veth pair: 10.203.0.2 (ServiceAccount
velero-server) and 10.203.0.6 (ServiceAccount default), registered in examples/fake_kube_pods
on node `node-storage`. The node broker listens on the node side, 10.203.0.1, as does a second
Azurite (its certificate names 10.203.0.1), so both are reached over the pod's default route
with no other change; the program runs inside the pod's namespace (ip netns exec) with
IDENTITY_ENDPOINT=http://10.203.0.1:<port>/msi/token. The velero-server pod completes the round
trip; the `default` pod fails with the broker's 403 reason in the program's error. Needs root
and `ip netns` (skipped elsewhere; CI=true or IMDS_BROKER_REQUIRE_NETNS=1 fails instead).

Run by scripts/test-storage.sh (IMDS_BROKER_STORAGE_E2E=1).
"""

import json
import os
import subprocess
import time

import pytest

from conftest import Netns, netns_unavailable
from storage_support import (
    EMULATOR_CLIENT_ID,
    HERE,
    TARGET,
    Azurite,
    EmulatedBroker,
    FakeKubePods,
    make_test_pki,
)

if os.environ.get("IMDS_BROKER_STORAGE_E2E") != "1":
    pytest.skip("storage end-to-end tests run in scripts/test-storage.sh (IMDS_BROKER_STORAGE_E2E=1)", allow_module_level=True)

VELERO_DIR = HERE / "velero"
ALL_VERSIONS = sorted(p.name[len("velero-"):] for p in VELERO_DIR.glob("velero-*") if (p / "go.mod").exists())
SELECTED = os.environ.get("VELERO_VERSIONS", "").split() or ALL_VERSIONS


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def azurite(pki, tmp_path_factory):
    a = Azurite(pki, tmp_path_factory.mktemp("azurite"))
    yield a
    a.stop()


@pytest.fixture(scope="module")
def broker():
    b = EmulatedBroker()
    yield b
    b.stop()


def test_every_velero_module_is_selected_or_deliberately_skipped():
    # Guards against a silently empty parametrisation (e.g. a typo in VELERO_VERSIONS).
    assert ALL_VERSIONS, f"no Velero modules under {VELERO_DIR}"
    unknown = set(SELECTED) - set(ALL_VERSIONS)
    assert not unknown, f"VELERO_VERSIONS names versions without a module: {sorted(unknown)}"


def run_roundtrip(version, azurite, broker, pki, tmp_path, identity_header=None, pod=None):
    """Creates the BSL container (with a token from `broker`), runs the version's program;
    returns (result dict, Popen result, elapsed s, container). `pod`: (Netns, its App Service
    env): the program runs inside that namespace with that env instead of `broker`'s."""
    binary = TARGET / "velero-kopia" / version / "velero-roundtrip"
    if not binary.exists():
        pytest.fail(f"{binary} is missing: run scripts/test-storage.sh (it builds it)")
    container = f"velero-{version.replace('.', '-')}-{time.time_ns() % 10**9}"
    # The container exists before the repository is prepared (the kopia fork lists blobs first);
    # created with a token from the broker, as an operator's tooling would with the identity.
    status, code, body = azurite.request("PUT", f"/{container}?restype=container", token=broker.token())
    assert status == 201, (status, code, body)

    work = tmp_path / "work"
    work.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        # kopia keeps its cache and logs under these; keep them in the test's directory.
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }
    env.update(pod[1] if pod else broker.app_service_env())
    if identity_header is not None:
        env["IDENTITY_HEADER"] = identity_header
    argv = [
        str(binary),
        "-account", "devstoreaccount1",
        "-uri", azurite.account_url,
        "-container", container,
        "-ca-file", pki["ca"],
        "-client-id", EMULATOR_CLIENT_ID,
        "-work", str(work),
    ]
    if pod:
        argv = [*pod[0].prefix, *argv]
    started = time.monotonic()
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - started
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    assert lines, f"no result line; rc={p.returncode}\nstderr:\n{p.stderr[-6000:]}"
    return json.loads(lines[-1]), p, elapsed, container


@pytest.mark.parametrize("version", SELECTED)
def test_velero_kopia_repository_round_trip(version, azurite, broker, pki, tmp_path):
    before = broker.token_requests()
    r, p, elapsed, container = run_roundtrip(version, azurite, broker, pki, tmp_path)
    assert r["ok"] and p.returncode == 0, f"{r}\nstderr:\n{p.stderr[-6000:]}"
    assert r["velero"] == f"v{version}"
    steps = [s["name"] for s in r["steps"]]
    assert steps == ["tree", "prepare", "connect", "backup", "restore", "compare"], steps
    assert r["snapshot_id"], r
    assert r["files"] >= 8 and r["bytes"] > 4 * 1024 * 1024, r
    # Every Storage call was authorised by a bearer token from the broker.
    assert broker.token_requests() > before
    # The repository is in the BSL container under Velero's prefix: kopia's format blob is
    # there, plus pack and index blobs holding the data.
    status, code, listing = azurite.request(
        "GET", f"/{container}?restype=container&comp=list&prefix={r['repo_prefix']}", token=broker.token()
    )
    assert status == 200, (status, code, listing[:500])
    assert f"<Name>{r['repo_prefix']}kopia.repository</Name>" in listing, listing[:2000]
    assert listing.count("<Name>") >= 4, listing[:2000]
    print(f"velero {version}: round trip in {elapsed:.1f}s; steps (ms): {r['durations_ms']}")


@pytest.mark.parametrize("version", SELECTED)
def test_velero_without_the_brokers_credential_writes_nothing(version, azurite, broker, pki, tmp_path):
    """The broker is the only credential: with a wrong IDENTITY_HEADER the broker refuses (401),
    azidentity fails at once with the broker's error text, and nothing lands in the container."""
    r, p, elapsed, container = run_roundtrip(version, azurite, broker, pki, tmp_path, identity_header="not-the-header")
    assert not r["ok"] and p.returncode == 1, r
    assert [s["name"] for s in r["steps"]] == ["tree", "prepare"], r["steps"]
    assert "ManagedIdentityCredential" in r["error"], r["error"]
    assert "X-IDENTITY-HEADER does not match" in r["error"], r["error"]
    assert elapsed < 30, f"took {elapsed:.1f}s"
    status, code, listing = azurite.request("GET", f"/{container}?restype=container&comp=list", token=broker.token())
    assert status == 200 and "<Blobs />" in listing.replace("<Blobs/>", "<Blobs />"), listing[:1000]


# --- node mode --------------------------------------------------------------------------------

NODE_ADDR = "10.203.0.1"
NODE_NAME = "node-storage"
NAMESPACE = "velero"
# (pod address, node-side address of its veth, ServiceAccount)
MOVER = ("10.203.0.2", "10.203.0.1", "velero-server")
INTRUDER = ("10.203.0.6", "10.203.0.5", "default")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """Two pod namespaces joined to this (the node's) namespace, the fake pod API holding them,
    the node broker on NODE_ADDR and an Azurite on NODE_ADDR. Yields {pod name: (Netns, env)}
    plus the broker and Azurite."""
    reason = netns_unavailable()
    if reason:
        msg = f"node-mode storage tests need root and `ip netns`: {reason}"
        if os.environ.get("CI") == "true" or os.environ.get("IMDS_BROKER_REQUIRE_NETNS") == "1":
            pytest.fail(msg + " (required: CI=true or IMDS_BROKER_REQUIRE_NETNS=1)")
        pytest.skip(msg)
    spaces, stop = [], []
    try:
        kube = FakeKubePods()
        stop.append(kube)
        pods = {}
        for name, (ip, node_ip, sa) in (("mover", MOVER), ("intruder", INTRUDER)):
            ns = Netns()
            spaces.append(ns)
            ns.veth(f"{ip}/30", f"{node_ip}/30")
            kube.add({"namespace": NAMESPACE, "name": name, "node": NODE_NAME, "service_account": sa, "ip": ip})
            pods[name] = ns
        pki = make_test_pki(tmp_path_factory.mktemp("node-pki"), extra_ips=[NODE_ADDR])
        azurite = Azurite(pki, tmp_path_factory.mktemp("node-azurite"), host=NODE_ADDR)
        stop.append(azurite)
        broker = EmulatedBroker(
            ["--node-name", NODE_NAME, "--allow-namespace", NAMESPACE],
            command="node",
            listen=f"{NODE_ADDR}:0",
            env={"KUBECONFIG": kube.kubeconfig},
        )
        stop.append(broker)
        assert broker.token_addr.startswith(f"{NODE_ADDR}:"), broker.token_addr
        yield {"pods": {k: (ns, broker.app_service_env()) for k, ns in pods.items()},
               "broker": broker, "azurite": azurite, "pki": pki}
    finally:
        for x in reversed(stop):
            x.stop()
        for ns in spaces:
            ns.close()


@pytest.mark.parametrize("version", SELECTED)
def test_velero_round_trip_through_a_node_broker_with_attestation(version, node, broker, tmp_path):
    """A velero-server pod of the node, on its own address, gets its tokens from the node
    broker (attested by that address) and completes the round trip."""
    nb = node["broker"]
    before = nb.token_requests()
    r, p, elapsed, container = run_roundtrip(version, node["azurite"], broker, node["pki"], tmp_path,
                                             pod=node["pods"]["mover"])
    assert r["ok"] and p.returncode == 0, f"{r}\nstderr:\n{p.stderr[-6000:]}\nbroker:\n{nb.log_text()[-3000:]}"
    assert [s["name"] for s in r["steps"]] == ["tree", "prepare", "connect", "backup", "restore", "compare"], r["steps"]
    # The node broker served the program (the test's own container request went to `broker`).
    assert nb.token_requests() > before
    status, code, listing = node["azurite"].request(
        "GET", f"/{container}?restype=container&comp=list&prefix={r['repo_prefix']}", token=broker.token()
    )
    assert status == 200, (status, code, listing[:500])
    assert f"<Name>{r['repo_prefix']}kopia.repository</Name>" in listing, listing[:2000]
    print(f"velero {version} via the node broker: round trip in {elapsed:.1f}s")


@pytest.mark.parametrize("version", SELECTED)
def test_velero_as_a_pod_with_another_service_account_is_refused(version, node, broker, tmp_path):
    """The same program, env and identity header, from a pod of the node running as
    ServiceAccount `default`: the broker refuses it (403 naming the reason), azidentity fails
    at once with that text, and nothing lands in the container."""
    r, p, elapsed, container = run_roundtrip(version, node["azurite"], broker, node["pki"], tmp_path,
                                             pod=node["pods"]["intruder"])
    assert not r["ok"] and p.returncode == 1, r
    assert [s["name"] for s in r["steps"]] == ["tree", "prepare"], r["steps"]
    assert "ManagedIdentityCredential" in r["error"], r["error"]
    assert "403" in r["error"], r["error"]
    assert (f"caller {INTRUDER[0]} is pod {NAMESPACE}/intruder with ServiceAccount default; allowed: velero-server"
            in r["error"]), r["error"]
    assert elapsed < 30, f"took {elapsed:.1f}s"
    status, code, listing = node["azurite"].request("GET", f"/{container}?restype=container&comp=list",
                                                    token=broker.token())
    assert status == 200 and "<Blobs />" in listing.replace("<Blobs/>", "<Blobs />"), listing[:1000]
