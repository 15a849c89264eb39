"""A real node (tests/cluster/node): containerd, runc and the CNI plugins from Debian, the kubelet,
kube-scheduler and kube-proxy built from the API server's own module, a pause image built here.
Pods run: asserted from what the kubelet reported (pod status, events, logs through the API
server's kubelet proxy).

Its own control plane (node.cluster.NodeCluster, the one `scripts/cluster up` starts), not the
session's: that one has node objects without a kubelet and pods earlier files left pending,
which a scheduler would place here. With imds-broker as `scripts/cluster up` installs it (the
chart's webhook as pods, the fake Entra trusting the API server's issuer) a Velero-labelled pod
runs with the injected sidecar and gets a token through the kubelet's projected token.
Skipped unless scripts/cluster built the node (NODE_BIN_DIR, NODE_IMAGES_DIR: `CLUSTER_NODE=1
scripts/test-cluster.sh -k kubelet`); the sidecar case also needs BROKER_IMAGE.
"""

import datetime
import json
import os
import time
import urllib.request

import pytest

from harness import pods_path, wait_for

if not (os.environ.get("NODE_BIN_DIR") and os.environ.get("NODE_IMAGES_DIR")):
    pytest.skip("no node built (NODE_BIN_DIR/NODE_IMAGES_DIR unset: CLUSTER_NODE=1 "
                "scripts/test-cluster.sh builds one)", allow_module_level=True)

from node.cluster import NodeCluster  # noqa: E402

NS = "kubelet-test"
WITH_BROKER = all(os.environ.get(k) for k in ("BROKER_IMAGE", "FAKE_ENTRA_BIN", "HELM_BIN"))


@pytest.fixture(scope="module")
def nc():
    run_dir = os.path.join(os.environ.get("CLUSTER_RUN_DIR", "/tmp"), "node")
    c = NodeCluster(run_dir)
    try:
        c.up(imds_broker=WITH_BROKER)
        print(f"\nnode cluster up: {c.timings}")
        c.cp.admin.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                               "metadata": {"name": NS}})
        wait_for("default ServiceAccount in the test namespace",
                 lambda: c.cp.admin.get(f"/api/v1/namespaces/{NS}/serviceaccounts/default"),
                 30, interval=0.2)
        yield c
    finally:
        c.down_in_process()


def watch_phases(api, ns, name, until, timeout):
    """The pod's phases in the order the API server reported them (a watch from the pod's
    creation), until `until(pod)` holds; returns (phases, last pod)."""
    url = (f"{api.url}{pods_path(ns)}?watch=1&fieldSelector=metadata.name%3D{name}"
           f"&timeoutSeconds={int(timeout)}")
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    phases = []
    pod = None
    with urllib.request.urlopen(req, context=api.ctx, timeout=timeout + 5) as resp:
        for line in resp:
            event = json.loads(line)
            if event["type"] == "ERROR":
                raise RuntimeError(f"watch {ns}/{name}: {event['object']}")
            pod = event["object"]
            phase = pod.get("status", {}).get("phase")
            if not phases or phases[-1] != phase:
                phases.append(phase)
            if until(pod):
                return phases, pod
    raise TimeoutError(f"pod {ns}/{name}: phases {phases} within {timeout}s, last status "
                       f"{json.dumps((pod or {}).get('status'))[:2000]}")


def events_for(api, ns, name):
    items = api.get(f"/api/v1/namespaces/{ns}/events",
                    query={"fieldSelector": f"involvedObject.name={name}"})["items"]
    return sorted(items, key=lambda e: e.get("firstTimestamp") or e.get("eventTime") or "")


def ts(value):
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_node_registers_ready_with_the_runtime_and_versions(nc):
    node = nc.cp.admin.get(f"/api/v1/nodes/{nc.node.name}")
    info = node["status"]["nodeInfo"]
    print(f"\nnode {nc.node.name}: kubelet {info['kubeletVersion']}, runtime "
          f"{info['containerRuntimeVersion']}, kernel {info['kernelVersion']}, "
          f"ready in {nc.node.startup_seconds:.1f}s")
    k8s_version = os.environ.get("NODE_K8S_VERSION") or os.environ.get("CLUSTER_K8S_VERSION")
    if k8s_version:
        assert info["kubeletVersion"] == k8s_version
    assert info["containerRuntimeVersion"].startswith("containerd://")
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == nc.node.gateway
    # The kubelet's own credentials (Node authorizer): it registered itself.
    assert node["metadata"]["labels"]["kubernetes.io/hostname"] == nc.node.name


def test_a_pod_runs_to_succeeded_with_exec_and_logs_through_the_kubelet(nc):
    """busybox (imported, never pulled) waits for a file the test creates through `kubectl
    exec` (API server → kubelet → containerd's stream server), prints, exits 0: the pod is
    Running, then Succeeded; its log comes back through the kubelet."""
    api = nc.cp.admin
    name = "busybox-once"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS},
           "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
                    "containers": [{
                        "name": "main", "image": nc.busybox_image(),
                        "imagePullPolicy": "Never",
                        "command": ["sh", "-c",
                                    "echo started; until [ -e /tmp/go ]; do sleep 0.1; done; "
                                    "echo \"pod ip $(hostname -i)\"; exit 0"]}]}}
    created = time.monotonic()
    api.post(pods_path(NS), pod)
    phases, running = watch_phases(api, NS, name, lambda p: p["status"].get("phase") == "Running",
                                   90)
    running_after = time.monotonic() - created
    assert running["spec"]["nodeName"] == nc.node.name
    pod_ip = running["status"]["podIP"]
    assert pod_ip and pod_ip in [str(h) for h in nc.node.subnet.hosts()], pod_ip
    nc.cp.kubectl("-n", NS, "exec", name, "--", "touch", "/tmp/go")
    phases2, done = watch_phases(api, NS, name,
                                 lambda p: p["status"].get("phase") in ("Succeeded", "Failed"), 60)
    assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"])[:2000]
    term = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed"
    log = nc.cp.kubectl("-n", NS, "logs", name).stdout
    assert log == f"started\npod ip {pod_ip}\n", log
    all_phases = phases + [p for p in phases2 if p != phases[-1]]
    assert all_phases[-2:] == ["Running", "Succeeded"], all_phases

    reasons = [e["reason"] for e in events_for(api, NS, name)]
    for r in ("Scheduled", "Pulled", "Created", "Started"):
        assert r in reasons, reasons
    print(f"\npod {name}: phases {all_phases}, Running {running_after:.1f}s after create; "
          f"events {reasons}; started {term['startedAt']} finished {term['finishedAt']}")


def entra_calls(nc):
    with urllib.request.urlopen(nc.entra["calls_url"], timeout=5) as r:
        return int(r.read())


@pytest.mark.skipif(not WITH_BROKER, reason="no imds-broker image (BROKER_IMAGE) to run")
def test_a_velero_labelled_pod_runs_with_the_sidecar_and_gets_a_token(nc):
    """A pod as a user applies one by hand (Velero's data-upload label, `velero-server`): the
    chart's webhook pods inject the sidecar; the kubelet writes the projected token, starts the
    sidecar, waits for its startup probe, then starts the app, whose first request gets a
    Storage token (the fake Entra verified the kubelet's token against the API server's JWKS);
    the app exits 0, the kubelet stops the sidecar and the pod is Succeeded."""
    api = nc.cp.admin
    ns, name = "velero", "hand-applied-data-upload"
    calls_before = entra_calls(nc)
    script = (
        'date -u +"app-start %s"; '
        'wget -q -O /tmp/answer --header "X-IDENTITY-HEADER: $IDENTITY_HEADER" '
        '"$IDENTITY_ENDPOINT?api-version=2019-08-01&resource=https://storage.azure.com/"; '
        'date -u +"token %s"; '
        # Never the token itself: only the other fields, and its length.
        'sed -e \'s/"access_token":"\\([^"]*\\)"/"access_token_length":"LEN"/\' /tmp/answer; echo; '
        'sed -n \'s/.*"access_token":"\\([^"]*\\)".*/\\1/p\' /tmp/answer | tr -d "\\n" | wc -c')
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns,
                        "labels": {"velero.io/data-upload": name}},
           "spec": {"serviceAccountName": "velero-server", "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{"name": "app", "image": nc.busybox_image(),
                                    "imagePullPolicy": "Never",
                                    "command": ["sh", "-c", script]}]}}
    created = time.monotonic()
    stored = api.post(pods_path(ns), pod)
    init = stored["spec"].get("initContainers", [])
    assert [c["name"] for c in init] == ["imds-broker"], init
    assert init[0]["restartPolicy"] == "Always" and init[0]["image"] == nc.broker_image
    app_env = {e["name"] for e in stored["spec"]["containers"][0]["env"]}
    assert {"IDENTITY_ENDPOINT", "IDENTITY_HEADER"} <= app_env

    phases, done = watch_phases(api, ns, name,
                                lambda p: p["status"].get("phase") in ("Succeeded", "Failed"),
                                120)
    total = time.monotonic() - created
    st = done["status"]
    assert st["phase"] == "Succeeded", json.dumps(st)[:3000]
    assert phases[-2:] == ["Running", "Succeeded"], phases
    side = st["initContainerStatuses"][0]
    app = st["containerStatuses"][0]
    assert app["state"]["terminated"]["exitCode"] == 0
    # The kubelet stopped the sidecar once the app had exited (native sidecar).
    side_term = wait_for("sidecar terminated in the pod status", lambda: (
        api.get(pods_path(ns, name))["status"]["initContainerStatuses"][0]["state"]
        .get("terminated")), 30, interval=0.3)
    assert side["restartCount"] == 0
    assert ts(side_term["startedAt"]) <= ts(app["state"]["terminated"]["startedAt"])
    assert ts(side_term["finishedAt"]) >= ts(app["state"]["terminated"]["finishedAt"])

    log = nc.cp.kubectl("-n", ns, "logs", name, "-c", "app").stdout
    lines = [line for line in log.splitlines() if line.strip()]
    answer = json.loads(next(line for line in lines if line.startswith("{")))
    assert answer["token_type"] == "Bearer"
    assert answer["resource"] == "https://storage.azure.com/"
    assert int(lines[-1]) > 100, f"no access token in the answer: {log}"
    assert entra_calls(nc) > calls_before
    app_start = int(next(line for line in lines if line.startswith("app-start ")).split()[1])
    first_token = int(next(line for line in lines if line.startswith("token ")).split()[1])

    events = events_for(api, ns, name)
    reasons = [(e["reason"], e.get("involvedObject", {}).get("fieldPath", "")) for e in events]
    started = [r for r in reasons if r[0] == "Started"]
    assert [f for _, f in started][:2] == ["spec.initContainers{imds-broker}",
                                          "spec.containers{app}"], reasons
    print(f"\nsidecar pod: phases {phases}; created -> Succeeded {total:.1f}s; sidecar started "
          f"{side_term['startedAt']}, app started {app['state']['terminated']['startedAt']} "
          f"(app's clock {app_start}), first token {first_token - app_start}s after the app "
          f"started; sidecar stopped {side_term['finishedAt']} exit "
          f"{side_term['exitCode']}; Entra calls {entra_calls(nc) - calls_before}")
