"""No backup fails because a node broker restarts (issue 21, item 4).

Go azidentity v1.6.0 and v1.13.1 (Velero 1.15 and 1.18) over the App Service env
(IDENTITY_ENDPOINT/IDENTITY_HEADER) against a real `imds-broker node` (attesting the client as
pod velero/mover, ServiceAccount velero-server, address 127.0.0.1, through
examples/fake_kube_pods) with examples/fake_entra behind it. The client asks for a token again
and again for ~20 s, each GetToken in a FRESH client process (azidentity >= 1.8 caches
managed-identity tokens per process, across credentials), so no SDK cache hides the broker,
while the test:

- `crash`: SIGKILLs the broker ~5 s in and starts a new one on the same ports ~1 s later (a
  container restart);
- `rolling_update`: starts a second `imds-broker node` on the same --listen and --admin-listen
  (SO_REUSEPORT) ~5 s in, waits until it has listed the node's pods (its readiness; /readyz on
  the shared port cannot tell the two apart), then SIGTERMs the old one, which drains.

REQUIRED: zero failed GetTokens. And a new node, where the client starts before its broker:

- `new_node_3s`: the broker starts 3 s after the client's first GetToken, which must succeed
  within the client's own retry budget;
- `new_node_12s`: the broker starts 12 s later: beyond the budget, the GetToken fails with the
  connection refused. Its time to failure is the budget (the limit in docs/node-mode.md).

Per version and case: failures, worst GetToken latency, GetTokens and HTTP requests written by
the client (its retries are requests - GetTokens; a refused connection writes none), and the
requests each broker instance served -> target/conformance/node-restart.json.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request

import pytest

from conftest import (
    FAKE_KUBE_PODS_BIN,
    STORAGE,
    TARGET,
    VELERO_STORAGE_SCOPE,
    Broker,
    client_env,
    go_client_bin,
    http_get,
    parse_results,
    production_broker_args,
    start_fake_entra,
    stop_process,
    wait_for,
)

VERSIONS = ["v1.6.0", "v1.13.1"]
NODE = "node-1"
# How long the client keeps asking, and when the broker is disturbed (s after the client starts).
RUN_SECS = 20
DISTURB_AT = 5
RESTART_AFTER = 1
# The synchronisation point a node broker is ready at (its /readyz turns 200 with it).
LISTED = "listed the pods of the namespace on this node"
RESULTS = {}


@pytest.fixture(scope="module")
def cluster():
    """The fake Entra, the fake pod API with the client's pod, and a token file."""
    for binary in (FAKE_KUBE_PODS_BIN, *(go_client_bin(v) for v in VERSIONS)):
        if not binary.exists():
            pytest.fail(f"{binary} is missing: run scripts/test-conformance.sh (it builds it)")
    home = tempfile.mkdtemp(prefix="ibconf-noderestart-")
    entra, fake = start_fake_entra()
    pods = subprocess.Popen([str(FAKE_KUBE_PODS_BIN)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        api = json.loads(pods.stdout.readline() or "{}")
        assert "control" in api, pods.stderr.read()
        pod = {"namespace": "velero", "name": "mover", "node": NODE, "service_account": "velero-server",
               "ip": "127.0.0.1"}
        req = urllib.request.Request(f"{api['control']}/pods", method="POST", data=json.dumps(pod).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10) as r:
            assert r.status == 200, r.read()
        token = os.path.join(home, "sa-token")
        shutil.copy(fake["token_file"], token)
        yield {"fake": fake, "kubeconfig": api["kubeconfig"], "token": token, "home": home}
    finally:
        stop_process(pods)
        stop_process(entra)
        shutil.rmtree(home, ignore_errors=True)


def start_node_broker(cluster, listen="127.0.0.1:0", admin="127.0.0.1:0"):
    args = production_broker_args(cluster["fake"], cluster["token"])
    args[args.index("--listen") + 1] = listen
    args[args.index("--admin-listen") + 1] = admin
    env = {"KUBECONFIG": cluster["kubeconfig"], "POD_NAMESPACE": "velero"}
    return Broker(args + ["--node-name", NODE], env_extra=env, subcommand="node")


def wait_listed(broker):
    wait_for(lambda: any(LISTED in l.get("message", "") for l in broker.process.json_lines()), 20,
             f"the node broker's {LISTED!r} line")


def served(broker):
    """Token requests this broker answered, by status (read while it still runs, and while it
    alone holds its admin port)."""
    return {str(s): broker.requests_served(s, "app_service") for s in (200, 401, 403, 503)}


def start_client(version, env, step):
    argv = [str(go_client_bin(version)), "mic", json.dumps([step])]
    proc = subprocess.Popen(argv, env=env, cwd=env["HOME"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    return proc, time.time()


def finish_client(proc, timeout):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the Go client did not finish within {timeout} s: {err[-2000:]}")
    return parse_results(out, err, proc.args)["results"]


class Repeating:
    """One Go client process per GetToken, one after the other for `secs`: a fresh process
    each time, because azidentity >= 1.8 (MSAL Go) caches managed-identity tokens per process,
    across credentials, which would hide the broker."""

    def __init__(self, version, env, step, secs):
        self.results = []
        self.error = None
        self.began = time.time()

        def loop():
            try:
                while time.time() - self.began < secs:
                    proc, started = start_client(version, env, step)
                    r = finish_client(proc, 60)[0]
                    r["started_unix_ms"] = int(started * 1000)
                    self.results.append(r)
                    time.sleep(0.05)
            except Exception as e:  # noqa: BLE001 - re-raised by join()
                self.error = e

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()

    def join(self, timeout):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the repeating client did not stop"
        if self.error:
            raise self.error
        return self.results


def step(fake, **extra):
    # Velero's scope and option; a per-GetToken deadline well above the retry budget, so a
    # hang would show as a failure rather than stall the run.
    return dict({"resource": STORAGE, "scope": VELERO_STORAGE_SCOPE, "client_id": fake["client_id"],
                 "timeout_secs": 30}, **extra)


def summarise(results, began, events):
    failed = [r for r in results if not r["ok"]]
    worst = max(results, key=lambda r: r["elapsed_ms"])
    return {
        "get_tokens": len(results),
        "failed": len(failed),
        "failures": [{"at_s": round(r["started_unix_ms"] / 1000 - began, 2), "error": r.get("error", "")[:300]}
                     for r in failed[:5]],
        "worst_get_token_ms": worst["elapsed_ms"],
        "worst_at_s": round(worst["started_unix_ms"] / 1000 - began, 2),
        "client_requests": sum(r["requests"] for r in results),
        "client_retries": sum(max(0, r["requests"] - 1) for r in results),
        "events_s": {k: round(v - began, 2) for k, v in events.items()},
    }


def record(version, case, summary):
    RESULTS.setdefault(version, {})[case] = summary
    out = TARGET / "conformance" / "node-restart.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(RESULTS, indent=1, sort_keys=True) + "\n")
    print(f"{version} {case}: {json.dumps(summary)}")


def repeat_through(version, cluster, disturb):
    """Runs the repeating client against a node broker while `disturb(broker, began, events)`
    (returning the broker left running and the per-instance served counts) acts on it."""
    first = start_node_broker(cluster)
    wait_listed(first)
    env = client_env("appservice", first.base, cluster["home"])
    client = Repeating(version, env, step(cluster["fake"]), RUN_SECS)
    began = client.began
    events = {}
    brokers = [first]
    try:
        last, counts = disturb(first, began, events, brokers)
        results = client.join(RUN_SECS + 60)
        counts.append(served(last))
    finally:
        for b in brokers:
            b.stop()
    summary = summarise(results, began, events)
    summary["broker_served"] = counts
    return summary, results


def sleep_until(began, at):
    time.sleep(max(0.0, began + at - time.time()))


def crash(cluster):
    def disturb(old, began, events, brokers):
        sleep_until(began, DISTURB_AT)
        counts = [served(old)]
        old.process.proc.send_signal(signal.SIGKILL)
        old.process.proc.wait(timeout=10)
        events["killed"] = time.time()
        time.sleep(RESTART_AFTER)
        listen, admin = old.token_addr, old.admin_addr
        new = start_node_broker(cluster, listen, admin)
        brokers.append(new)
        events["restarted"] = time.time()
        wait_listed(new)
        events["new_listed"] = time.time()
        return new, counts
    return disturb


def rolling_update(cluster):
    def disturb(old, began, events, brokers):
        sleep_until(began, DISTURB_AT)
        # Read before the surge broker shares the admin port (then either may answer).
        counts = [served(old)]
        new = start_node_broker(cluster, old.token_addr, old.admin_addr)
        brokers.append(new)
        events["surge_started"] = time.time()
        assert new.token_addr == old.token_addr and new.admin_addr == old.admin_addr
        wait_listed(new)
        status, _, _ = http_get(f"http://{new.admin_addr}/readyz")
        assert status == 200, status
        events["surge_ready"] = time.time()
        old.process.proc.send_signal(signal.SIGTERM)
        events["old_sigterm"] = time.time()
        old.process.proc.wait(timeout=20)
        events["old_exited"] = time.time()
        assert old.process.proc.returncode == 0, old.process.log()[-2000:]
        return new, counts
    return disturb


@pytest.mark.parametrize("case", ["crash", "rolling_update"])
@pytest.mark.parametrize("version", VERSIONS)
def test_no_get_token_fails_while_the_node_broker_restarts(cluster, version, case):
    disturb = crash(cluster) if case == "crash" else rolling_update(cluster)
    summary, results = repeat_through(version, cluster, disturb)
    record(version, case, summary)
    assert summary["failed"] == 0, summary
    # The client really kept asking through the disturbance (not one long GetToken).
    assert summary["get_tokens"] >= 20, summary
    disturbed = summary["events_s"].get("killed", summary["events_s"].get("old_sigterm"))
    assert any(r["started_unix_ms"] / 1000 > disturbed for r in results if r["ok"]), summary
    # Each broker instance served tokens: the old before, the new after.
    assert all(c["200"] > 0 for c in summary["broker_served"]), summary


@pytest.mark.parametrize("delay,succeeds", [(3, True), (12, False)], ids=["new_node_3s", "new_node_12s"])
@pytest.mark.parametrize("version", VERSIONS)
def test_a_client_started_before_its_node_broker(cluster, version, delay, succeeds):
    """A new node: Velero's pod may ask before the node's broker listens (connection refused).
    The client's retry budget covers a broker that starts a few seconds late, not 12 s."""
    # The address the broker will listen on: a port bound and released now (nothing else binds
    # 127.0.0.1 ephemeral ports in this run but the test's own processes).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    listen = f"127.0.0.1:{port}"
    env = client_env("appservice", f"http://{listen}", cluster["home"])
    proc, began = start_client(version, env, step(cluster["fake"]))
    events = {}
    broker = None
    try:
        sleep_until(began, delay)
        if proc.poll() is None:
            broker = start_node_broker(cluster, listen)
            events["broker_listening"] = time.time()
        results = finish_client(proc, 60)
        for r in results:
            r["started_unix_ms"] = int(began * 1000)
    finally:
        if broker:
            broker.stop()
    summary = summarise(results, began, events)
    summary["outcome_after_s"] = round(results[0]["elapsed_ms"] / 1000, 2)
    record(version, f"new_node_{delay}s", summary)
    if succeeds:
        assert summary["failed"] == 0, summary
    else:
        # The limit: past the budget the client gives up with the connection refused.
        assert summary["failed"] == 1, summary
        err = results[0].get("error", "").lower()
        assert "refused" in err, results[0]
        assert results[0]["elapsed_ms"] < delay * 1000, summary
