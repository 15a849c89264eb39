"""A real node (tests/cluster/node): containerd, runc and the CNI plugins from Debian, the kubelet,
kube-scheduler and kube-proxy built from the API server's own module, a pause image built here.
Pods run: asserted from what the kubelet reported (pod status, events, logs through the API
server's kubelet proxy).

Its own control plane (node.cluster.NodeCluster, the one `scripts/cluster up` starts), not the
session's: that one has node objects without a kubelet and pods earlier files left pending,
which a scheduler would place here. Skipped unless scripts/cluster built the node
(NODE_BIN_DIR, NODE_IMAGES_DIR: `CLUSTER_NODE=1 scripts/test-cluster.sh -k kubelet`).
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


@pytest.fixture(scope="module")
def nc():
    run_dir = os.path.join(os.environ.get("CLUSTER_RUN_DIR", "/tmp"), "node")
    c = NodeCluster(run_dir)
    try:
        c.up()
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
