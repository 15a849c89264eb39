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
import subprocess
import time
import urllib.request

import pytest

from harness import pods_path, wait_for

if not (os.environ.get("NODE_BIN_DIR") and os.environ.get("NODE_IMAGES_DIR")):
    pytest.skip("no node built (NODE_BIN_DIR/NODE_IMAGES_DIR unset: CLUSTER_NODE=1 "
                "scripts/test-cluster.sh builds one)", allow_module_level=True)

from node.cluster import NodeCluster  # noqa: E402

NS = "kubelet-test"
# Container states the kubelet does not leave by itself: fail at once, with its message.
STUCK = {"CreateContainerError", "CreateContainerConfigError", "ErrImageNeverPull",
         "InvalidImageName", "RunContainerError"}
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
            status = pod.get("status", {})
            phase = status.get("phase")
            for c in status.get("initContainerStatuses", []) + status.get("containerStatuses", []):
                reason = c.get("state", {}).get("waiting", {}).get("reason", "")
                if reason in STUCK:
                    raise AssertionError(f"pod {ns}/{name}: container {c['name']} {reason}: "
                                         f"{c['state']['waiting'].get('message', '')}")
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


# -- The seed's pod: Velero's CSI snapshot backup exposer -----------------------------------------

def velero_with_backup_exposer():
    """(version, driver) of the Velero drivers that have `expose-backup`."""
    out = []
    for item in filter(None, os.environ.get("VELERO_BINS", "").split(",")):
        version, path = item.split("=", 1)
        out.append((version, path))
    return out


def roundtrip_bin(version):
    base = os.environ.get("VELERO_KOPIA_DIR") or os.path.join(ROOT, "target", "velero-kopia")
    return os.path.join(base, version.lstrip("v"), "velero-roundtrip")


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DRIVER = "disk.csi.imds-broker.test"


@pytest.fixture(scope="module")
def azurite(nc):
    if not os.path.exists(os.path.join(ROOT, "tests/conformance/storage-node/node_modules/.bin",
                                       "azurite-blob")):
        pytest.skip("Azurite is not installed (scripts/test-storage.sh runs npm ci)")
    from node.velero_node import AzuriteOnNode
    a = AzuriteOnNode(nc.dir, nc.node.gateway)
    yield a
    a.stop()


def apply(nc, *docs):
    nc.cp.kubectl("apply", "--server-side", "--field-manager", "kubelet-test", "-f", "-",
                  input="\n---\n".join(json.dumps(d) for d in docs))


def source_volume_and_ready_snapshot(nc, ns, pvc, snapshot):
    """What exists when Velero's CSI plugin has taken a snapshot: a bound PVC of a CSI storage
    class, a VolumeSnapshot of it and its VolumeSnapshotContent, both ready. The test is the
    CSI driver (a hostPath PV) and the snapshot controller (the statuses)."""
    host_dir = os.path.join(nc.node.dir, "volumes", f"{ns}-{pvc}")
    os.makedirs(host_dir)
    with open(os.path.join(host_dir, "data.txt"), "w") as f:
        f.write("the application's data\n")
    content = f"snapcontent-{ns}-{snapshot}"
    apply(nc,
          {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
          {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
           "metadata": {"name": "csi-standin"}, "provisioner": DRIVER,
           "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate"},
          {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
           "metadata": {"name": "csi-standin-snap"}, "driver": DRIVER,
           "deletionPolicy": "Delete"},
          {"apiVersion": "v1", "kind": "PersistentVolume",
           "metadata": {"name": f"{ns}-{pvc}"},
           "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                    "storageClassName": "csi-standin", "hostPath": {"path": host_dir},
                    "claimRef": {"namespace": ns, "name": pvc}}},
          {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
           "metadata": {"name": pvc, "namespace": ns},
           "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "csi-standin",
                    "volumeName": f"{ns}-{pvc}",
                    "resources": {"requests": {"storage": "1Gi"}}}},
          {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
           "metadata": {"name": content},
           "spec": {"deletionPolicy": "Delete", "driver": DRIVER,
                    "source": {"snapshotHandle": f"handle-{ns}-{snapshot}"},
                    "volumeSnapshotClassName": "csi-standin-snap",
                    "volumeSnapshotRef": {"name": snapshot, "namespace": ns}}},
          {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
           "metadata": {"name": snapshot, "namespace": ns},
           "spec": {"source": {"persistentVolumeClaimName": pvc},
                    "volumeSnapshotClassName": "csi-standin-snap"}})
    wait_for(f"PVC {ns}/{pvc} Bound", lambda: nc.cp.admin.get(
        f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{pvc}")["status"].get("phase") == "Bound",
        60, interval=0.3)
    api = nc.cp.admin
    now_ns = int(time.time() * 1e9)
    api.patch(f"/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents/{content}/status",
              {"status": {"snapshotHandle": f"handle-{ns}-{snapshot}", "readyToUse": True,
                          "restoreSize": 1 << 30, "creationTime": now_ns}})
    api.patch(f"/apis/snapshot.storage.k8s.io/v1/namespaces/{ns}/volumesnapshots/{snapshot}"
              "/status", {"status": {"boundVolumeSnapshotContentName": content,
                                     "readyToUse": True, "restoreSize": "1Gi",
                                     "creationTime": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                   time.gmtime())}})


def provision_backup_pvc(nc, ns, name, timeout=60):
    """The CSI driver's part for the backup PVC Velero's exposer creates from the backup
    VolumeSnapshot: a volume with the snapshot's data (a hostPath PV bound to that claim)."""
    pvc = wait_for(f"backup PVC {ns}/{name}", lambda: nc.cp.admin.get(
        f"/api/v1/namespaces/{ns}/persistentvolumeclaims",
        query={"fieldSelector": f"metadata.name={name}"})["items"], timeout, interval=0.2)[0]
    host_dir = os.path.join(nc.node.dir, "volumes", f"{ns}-{name}")
    os.makedirs(host_dir)
    with open(os.path.join(host_dir, "data.txt"), "w") as f:
        f.write("the application's data, as snapshotted\n")
    apply(nc, {"apiVersion": "v1", "kind": "PersistentVolume",
               "metadata": {"name": f"{ns}-{name}"},
               "spec": {"capacity": pvc["spec"]["resources"]["requests"],
                        "accessModes": pvc["spec"]["accessModes"],
                        "storageClassName": pvc["spec"].get("storageClassName", ""),
                        "hostPath": {"path": host_dir},
                        "claimRef": {"namespace": ns, "name": name,
                                     "uid": pvc["metadata"]["uid"]}}})
    return pvc


@pytest.fixture(scope="module", params=velero_with_backup_exposer() or [("none", "")],
                ids=lambda p: p[0])
def velero_on_node(request, nc, azurite):
    """Velero `version` on the node (one version after the other: 1.15.0, then 1.18.3 applied
    over it), with the VolumeSnapshot CRDs of its external-snapshotter module, a container of
    its own in Azurite, and the node-agent's image built here (velero_node.py)."""
    version, driver = request.param
    if not WITH_BROKER:
        pytest.skip("no imds-broker image (BROKER_IMAGE) to run")
    if not driver:
        pytest.skip("no Velero driver (VELERO_BINS)")
    from node.velero_node import (build_data_mover_image, install_velero, node_agent_image,
                                  snapshot_crds)
    roundtrip = roundtrip_bin(version)
    if not os.path.exists(roundtrip):
        pytest.skip(f"{roundtrip} is missing (scripts/test-storage.sh builds it)")
    module_dir = os.path.join(ROOT, "tests", "cluster", f"velero-{version.rsplit('.', 1)[0]}")
    for crd in snapshot_crds(module_dir):
        nc.cp.kubectl("apply", "--server-side", "-f", crd)
    nc.cp.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                  "crd/volumesnapshots.snapshot.storage.k8s.io",
                  "crd/volumesnapshotcontents.snapshot.storage.k8s.io")
    docs = install_velero(nc.cp, driver, version, nc.entra["client_id"], azurite.account_url)
    container = f"velero-{version.replace('.', '-')}"
    azurite.create_container(container)
    image = node_agent_image(docs)
    refs = build_data_mover_image(
        nc.node, nc.dir, image, roundtrip, os.path.join(nc.images_dir, "busybox.oci.tar"),
        {"URI": azurite.account_url, "CONTAINER": container, "PREFIX": "velero"},
        azurite.pki["ca"])
    print(f"\nVelero {version}: node-agent image {image} built here as {refs}")
    return {"version": version, "driver": driver, "image": image}


def run_data_mover(nc, name, kind, image, calls_before, timeout=300):
    """Velero's data-mover pod `velero/<name>` (made by an exposer) run by the kubelet: the
    assertions every data mover shares; returns what the test prints."""
    api = nc.cp.admin
    stored = api.get(pods_path("velero", name))
    created = ts(stored["metadata"]["creationTimestamp"])
    label = {"DataUpload": "velero.io/data-upload", "DataDownload": "velero.io/data-download"}[kind]
    assert [o["kind"] for o in stored["metadata"]["ownerReferences"]] == [kind]
    assert stored["metadata"]["labels"][label] == name
    init = stored["spec"].get("initContainers", [])
    assert [c["name"] for c in init] == ["imds-broker"] and init[0]["restartPolicy"] == "Always"
    app_spec = stored["spec"]["containers"][0]
    verb = {"DataUpload": "backup", "DataDownload": "restore"}[kind]
    assert app_spec["command"] == ["/velero", "data-mover", verb], app_spec["command"]
    assert app_spec["image"] == image and app_spec["imagePullPolicy"] == "Never"
    assert {"IDENTITY_ENDPOINT", "IDENTITY_HEADER"} <= {e["name"] for e in app_spec["env"]}
    claims = [v["persistentVolumeClaim"]["claimName"] for v in stored["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == [name]

    phases, done = watch_phases(api, "velero", name,
                                lambda p: p["status"].get("phase") in ("Succeeded", "Failed"),
                                timeout)
    st = done["status"]
    app_log = nc.cp.kubectl("-n", "velero", "logs", name, "-c", app_spec["name"],
                            check=False).stdout
    assert st["phase"] == "Succeeded", f"{json.dumps(st)[:3000]}\n{app_log[-3000:]}"
    assert phases[-2:] == ["Running", "Succeeded"], phases
    app = st["containerStatuses"][0]["state"]["terminated"]
    assert app["exitCode"] == 0
    # The round trip's result is its one stdout line; its steps go to stderr (same log).
    result = json.loads(next(line for line in app_log.splitlines() if line.startswith('{"ok"')))
    assert result["ok"] is True, result
    side = wait_for("sidecar terminated in the pod status", lambda: (
        api.get(pods_path("velero", name))["status"]["initContainerStatuses"][0]["state"]
        .get("terminated")), 30, interval=0.3)
    assert ts(side["startedAt"]) <= ts(app["startedAt"])
    assert ts(side["finishedAt"]) >= ts(app["finishedAt"])
    assert entra_calls(nc) > calls_before
    events = events_for(api, "velero", name)
    started = [e.get("involvedObject", {}).get("fieldPath", "")
               for e in events if e["reason"] == "Started"]
    assert started[:2] == ["spec.initContainers{imds-broker}",
                           f"spec.containers{{{app_spec['name']}}}"], started
    scheduled = next(e for e in events if e["reason"] == "Scheduled")
    d = result["durations_ms"]
    return (f"{kind} data mover {name}: phases {phases}; pod created {created:%H:%M:%S} -> "
            f"scheduled {scheduled.get('eventTime') or scheduled.get('firstTimestamp')} -> "
            f"sidecar started {side['startedAt']} -> app started {app['startedAt']} -> app "
            f"exited {app['finishedAt']} (exit 0) -> sidecar stopped {side['finishedAt']}; "
            f"round trip: prepare (first token + repository) {d.get('prepare', 0):.0f} ms, "
            f"backup {d.get('backup', 0):.0f} ms, {result['files']} files; "
            f"Entra calls {entra_calls(nc) - calls_before}"), result


def run_exposer(nc, argv, pvc_name):
    """The driver's exposer call, while the test provisions the PVC the exposer creates."""
    expose = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        provision_backup_pvc(nc, "velero", pvc_name)
        out, err = expose.communicate(timeout=120)
    finally:
        if expose.poll() is None:
            expose.kill()
            expose.wait()
    assert expose.returncode == 0, f"{argv[1]}:\n{err[-4000:]}"
    return json.loads(out.strip().splitlines()[-1])


def test_the_seeds_pod_velero_backup_data_mover_runs_to_succeeded(nc, velero_on_node):
    """Velero's own CSI snapshot backup exposer (`csiSnapshotExposer.Expose`, what the
    node-agent's DataUpload controller runs) creates the data-mover pod for a ready
    VolumeSnapshot; the chart's webhook pods inject the sidecar; the scheduler places it once
    the backup PVC is bound; the kubelet runs it: the sidecar is ready before the app starts,
    the app (Velero's kopia repository and uploader code at this version, its azidentity
    credential over IDENTITY_ENDPOINT) writes a backup to Azurite and reads it back, exits 0,
    the kubelet stops the sidecar, the pod is Succeeded (what Velero watches)."""
    version, driver = velero_on_node["version"], velero_on_node["driver"]
    tag = version.replace(".", "-")
    ns, pvc, snapshot = "app", f"data-{tag}", f"data-{tag}-snap"
    source_volume_and_ready_snapshot(nc, ns, pvc, snapshot)
    calls_before = entra_calls(nc)
    name = f"backup-{tag}"
    out = run_exposer(nc, [driver, "expose-backup", nc.cp.kubeconfig, name, ns, pvc, snapshot],
                      name)
    assert out == {"pod": name}
    line, result = run_data_mover(nc, name, "DataUpload", velero_on_node["image"], calls_before)
    assert result["velero"] == version
    print(f"Velero {version} {line}")


def test_the_restore_data_mover_runs_to_succeeded(nc, velero_on_node):
    """Velero's generic restore exposer (what the DataDownload controller runs) creates the
    restore data-mover pod for a target PVC; the test provisions the restore PVC it creates;
    the pod runs as the backup's does and ends Succeeded."""
    version, driver = velero_on_node["version"], velero_on_node["driver"]
    tag = version.replace(".", "-")
    ns, target = "app", f"restore-target-{tag}"
    apply(nc, {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
               "metadata": {"name": target, "namespace": ns},
               "spec": {"accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": "1Gi"}}}})
    calls_before = entra_calls(nc)
    name = f"restore-{tag}"
    out = run_exposer(nc, [driver, "expose-restore", nc.cp.kubeconfig, name, ns, target], name)
    assert out == {"pod": name}
    line, result = run_data_mover(nc, name, "DataDownload", velero_on_node["image"], calls_before)
    assert result["velero"] == version
    print(f"Velero {version} {line}")
