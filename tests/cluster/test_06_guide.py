"""docs/velero-on-aks.md, run as written: its kubectl and helm blocks, verbatim, in one bash session
per mode, against the real API server — node mode, then its Remove blocks, then sidecar mode and
its Remove blocks.

Which blocks run is decided by the marker before each ```sh block (guide.py): `run` blocks run
(those with `mode=` only in that mode); `pods` blocks need running pods and are reported as
skipped (no kubelet here); `azure`, `external` and `alternative` blocks are covered elsewhere
(guide.KINDS says where) and reported as skipped too. A shell block without a marker fails the
parse.

The reader's part is played as the guide tells it: step 0's edit of velero.env (the test's
names, MODE, the local chart repository) and what step 1's az block appends (SUBSCRIPTION_ID,
TENANT_ID, CLIENT_ID, ISSUER: the fake Entra's identity and this API server's issuer). The
session's working directory is target/cluster-run/guide-<mode>/ with `charts` and `deploy`
linked to the checkout, so the files the guide writes (velero.env, velero-azure.yaml) stay out
of it; its PATH holds the real kubectl and helm, KUBECONFIG the admin's, HELM_* dirs its own.

What AKS provides is stood in for first: the VolumeSnapshot CRDs (external-snapshotter's own,
from its Go module), the VolumeSnapshotClass csi-azuredisk-vsc and the StorageClass managed-csi.
Velero's chart 12.1.0 comes from its Go module (scripts/test-cluster.sh), served as a Helm
repository on 127.0.0.1: the guide reads the repository URL from velero.env.

Runs last: it removes what the earlier modules installed (their Helm releases, deploy/'s
webhook, `velero install`'s objects), so the guide starts from an empty cluster.
"""

import base64
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import time

import pytest
import yaml

import guide
from checks import (SIDECAR, assert_injected, delete_pod, get_if_exists, normalized,
                    token_volumes, wait_pod)
from conftest import ROOT, VELERO_NS, env_path, velero_bins
from harness import make_pod_ready, pods_path, wait_for, wait_for_ready_endpoint

GUIDE = os.path.join(ROOT, "docs", "velero-on-aks.md")
try:
    with open(GUIDE) as f:
        BLOCKS = guide.parse(f.read())
    PARSE_ERROR = None
except guide.GuideError as e:
    BLOCKS, PARSE_ERROR = [], e
NOT_RUN = [b for b in BLOCKS if b.kind != "run"]

APPS = f"/apis/apps/v1/namespaces/{VELERO_NS}"
MWC = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
WEBHOOK_NS = "imds-broker"  # sidecar mode's namespace in the guide (step 4)
WEBHOOK = "imds-broker-webhook"
NODE = "imds-broker-node"
JOB_NAME_KEY = "batch.kubernetes.io/job-name"
LOCAL_IP = "10.255.254.1"  # the webhook pod's address, as in test_04_helm.py

# Step 0: the reader's edits of velero.env. Not the guide's defaults, so every value seen in the
# cluster provably came from this file.
TEST_NAMES = {
    "RG": "cluster-test-rg",
    "CLUSTER": "cluster-test",
    "ACR": "clustertestregistry",
    "STORAGE_ACCOUNT": "clustertestbackups",
    "BLOB_CONTAINER": "velero-cluster-test",
    "IDENTITY": "velero-cluster-test",
    "IMDS_BROKER_VERSION": "0.0.0-cluster-test",
}
SUBSCRIPTION_ID = "5ab5c71b-0000-4000-8000-00000000c1e5"


def blocks_for(mode, section_remove):
    return [b for b in BLOCKS if b.kind == "run" and b.for_mode(mode)
            and (b.section == "Remove") == section_remove]


def find(blocks, what, predicate):
    """The one block the test hooks onto (its output is checked, or the reader's part comes
    before or after it)."""
    found = [b for b in blocks if predicate(b)]
    if len(found) != 1:
        raise guide.GuideError(f"test_06 hooks onto the guide's {what} block, found {len(found)} "
                               f"(the guide changed? update test_06_guide.py): "
                               f"{[b.summary() for b in found]}")
    return found[0]


def env_file_block(blocks):
    return find(blocks, "`cp deploy/velero/guide.env velero.env`",
                lambda b: "guide.env velero.env" in b.text)


def velero_install_block(blocks):
    return find(blocks, "Velero install", lambda b: "helm upgrade --install velero" in b.text)


# ---------------------------------------------------------------------------------------------
# The guide itself


def test_every_shell_block_is_marked():
    """Parsing fails on a ```sh block without a marker, an unknown kind or mode, or an orphan
    marker (guide.parse); and each mode has what the test hooks onto."""
    if PARSE_ERROR:
        pytest.fail(str(PARSE_ERROR))
    for mode in guide.MODES:
        install, remove = blocks_for(mode, False), blocks_for(mode, True)
        assert install and remove, f"{mode}: no run blocks (install {len(install)}, remove {len(remove)})"
        env_file_block(install)
        velero_install_block(install)
    find(blocks_for("node", False), "node-mode check", node_check_predicate)
    find(blocks_for("sidecar", False), "sidecar-mode check", sidecar_check_predicate)


@pytest.mark.parametrize("text, problem", [
    ("x\n```sh\nkubectl get pods\n```\n", "without a marker"),
    ("<!-- guide: runn -->\n```sh\nls\n```\n", "unknown kind 'runn'"),
    ("<!-- guide: run mode=nodes -->\n```sh\nls\n```\n", "unknown mode 'nodes'"),
    ("<!-- guide: run -->\n\n```sh\nls\n```\n", "not followed by a fence"),
    ("<!-- guide: run -->\n```yaml\na: 1\n```\n", "before a ```yaml block"),
    ("<!-- guide:run -->\n```sh\nls\n```\n", "malformed marker"),
])
def test_parser_refuses_what_would_slip_through(text, problem):
    with pytest.raises(guide.GuideError, match=re.escape(problem)):
        guide.parse(text, "doc.md")


def test_parser_reads_kind_mode_section_and_text():
    doc = ("## A\n<!-- guide: run -->\n```sh\nfoo \\\n  --bar\n```\n## B\n"
           "<!-- guide: pods mode=sidecar -->\n```sh\nbaz\n```\n")
    a, b = guide.parse(doc)
    assert (a.kind, a.mode, a.section, a.text, a.line) == ("run", None, "A", "foo \\\n  --bar\n", 3)
    assert (b.kind, b.mode, b.section, b.for_mode("node"), b.for_mode("sidecar")) == \
        ("pods", "sidecar", "B", False, True)


@pytest.mark.parametrize("block", NOT_RUN, ids=[b.id for b in NOT_RUN])
def test_block_not_run_here(block):
    """Listed, with the reason, so the skipped count shows in the summary."""
    pytest.skip(f"guide block `{block.kind}`: {guide.KINDS[block.kind]}")


# ---------------------------------------------------------------------------------------------
# The cluster as AKS gives it


def helm_json(helm, *args):
    return json.loads(helm(*args, "-o", "json") or "null")


def releases(helm):
    """Helm releases, but cert-manager's (the guide's prerequisite, installed by the
    cert_manager fixture; the guide neither installs nor removes it)."""
    return [r for r in helm_json(helm, "list", "--all-namespaces") or []
            if r["namespace"] != "cert-manager"]


def delete_namespace(api, ns):
    """Deleted and gone. Pods bound to a node are deleted as kubelet confirms a deletion (grace
    period 0; no kubelet runs here): without it they never finish terminating, and the
    namespace controller would wait out their grace period before looking again."""
    if get_if_exists(api, f"/api/v1/namespaces/{ns}") is None:
        return

    def delete_bound_pods():
        for pod in api.get(pods_path(ns))["items"]:
            if pod["spec"].get("nodeName"):
                delete_pod(api, ns, pod["metadata"]["name"])
    delete_bound_pods()
    api.delete(f"/api/v1/namespaces/{ns}")

    def gone():
        delete_bound_pods()
        return get_if_exists(api, f"/api/v1/namespaces/{ns}") is None
    wait_for(f"namespace {ns} deleted", gone, 180, interval=0.3)


def clear_earlier_installs(cluster, helm):
    """The earlier modules' installs, removed as their own docs say: Helm releases uninstalled,
    deploy/'s objects deleted (README, "Remove"), `velero install`'s namespace, CRDs and
    ClusterRoleBindings deleted. Then nothing the guide creates exists yet."""
    api, kubectl = cluster.api, cluster.cp.kubectl
    for release in releases(helm):
        helm("uninstall", release["name"], "-n", release["namespace"], "--wait", "--timeout", "120s")
    manifests = getattr(cluster, "manifests", None)
    if manifests:
        kubectl("delete", "--ignore-not-found", "--wait=false", "-f", "-",
                input=yaml.safe_dump_all(manifests))
    for ns in (VELERO_NS, WEBHOOK_NS, "demo"):
        delete_namespace(api, ns)
    kubectl("delete", "crd", "-l", "component=velero", "--ignore-not-found")
    kubectl("delete", "clusterrolebinding", "-l", "component=velero", "--ignore-not-found")
    # test_02's stand-in for the chart's binding (same name as the chart's, not Helm's)
    kubectl("delete", "clusterrolebinding", "velero-server", "--ignore-not-found")


# AKS's own objects for its Azure Disk CSI driver, as `kubectl get -o yaml` shows them on a
# cluster (status and server fields left out).
AKS_OBJECTS = [
    {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
     "metadata": {"name": "managed-csi", "labels": {"addonmanager.kubernetes.io/mode": "EnsureExists",
                                                    "kubernetes.io/cluster-service": "true"}},
     "provisioner": "disk.csi.azure.com", "parameters": {"skuname": "StandardSSD_LRS"},
     "reclaimPolicy": "Delete", "volumeBindingMode": "WaitForFirstConsumer",
     "allowVolumeExpansion": True},
    {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
     "metadata": {"name": "csi-azuredisk-vsc", "labels": {"addonmanager.kubernetes.io/mode": "EnsureExists",
                                                          "kubernetes.io/cluster-service": "true"}},
     "driver": "disk.csi.azure.com", "deletionPolicy": "Delete",
     "parameters": {"incremental": "true"}},
]


@pytest.fixture(scope="module")
def aks(cluster, helm):
    started = time.monotonic()
    clear_earlier_installs(cluster, helm)
    kubectl = cluster.cp.kubectl
    crd_dir = env_path("SNAPSHOT_CRDS_DIR")
    files = sorted(f for f in os.listdir(crd_dir) if f.endswith(".yaml"))
    assert len(files) == 3, files
    for f in files:
        kubectl("apply", "--server-side", "--field-manager", "aks", "-f", os.path.join(crd_dir, f))
    kubectl("wait", "--for=condition=Established", "--timeout=60s",
            *[f"crd/{n}.snapshot.storage.k8s.io" for n in
              ("volumesnapshots", "volumesnapshotcontents", "volumesnapshotclasses")])
    kubectl("apply", "--server-side", "--field-manager", "aks", "-f", "-",
            input=yaml.safe_dump_all(AKS_OBJECTS))
    print(f"cluster cleared and AKS's objects in place in {time.monotonic() - started:.1f}s")


@pytest.fixture(scope="module")
def chart_repo():
    """Velero's chart as a Helm repository on 127.0.0.1 (index.yaml and the packaged chart)."""
    handler = functools.partial(QuietHandler, directory=env_path("VELERO_CHART_REPO_DIR"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def local_ip():
    """An address for the webhook's Ready pod (not loopback: Endpoints refuse 127.0.0.0/8), added
    to `lo` for this module; removed at its end if this module added it."""
    add = subprocess.run(["ip", "addr", "add", f"{LOCAL_IP}/32", "dev", "lo"],
                         capture_output=True, text=True)
    added = add.returncode == 0
    # Already there ("File exists"; newer iproute2: "Address already assigned"): kept as found.
    if not added and "File exists" not in add.stderr and "already assigned" not in add.stderr:
        pytest.fail(f"cannot add {LOCAL_IP} to lo (the cluster stage runs as root): {add.stderr}")
    try:
        yield LOCAL_IP
    finally:
        if added:
            subprocess.run(["ip", "addr", "del", f"{LOCAL_IP}/32", "dev", "lo"], capture_output=True)


# ---------------------------------------------------------------------------------------------
# The reader


class GuideRun:
    """One mode of the guide in one bash session."""

    def __init__(self, cluster, mode, repo_url):
        self.cluster = cluster
        self.mode = mode
        self.dir = os.path.join(cluster.dir, f"guide-{mode}")
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        for name in ("charts", "deploy"):
            os.symlink(os.path.join(ROOT, name), os.path.join(self.dir, name))
        # Outside the working directory: the guide's commands only see what a checkout has.
        home = os.path.join(cluster.dir, f"guide-{mode}-home")
        shutil.rmtree(home, ignore_errors=True)
        bin_dir = os.path.join(home, "bin")
        os.makedirs(bin_dir)
        helm_bin = env_path("HELM_BIN")
        tools = {"kubectl": cluster.cp.bin("kubectl"), "helm": helm_bin,
                 "kustomize": os.path.join(os.path.dirname(helm_bin), "kustomize")}
        for name, target in tools.items():
            if os.path.exists(target):
                os.symlink(target, os.path.join(bin_dir, name))
        env = {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "HOME": home,
               "KUBECONFIG": cluster.cp.kubeconfig, "LANG": "C.UTF-8",
               "HELM_CACHE_HOME": os.path.join(home, "helm-cache"),
               "HELM_CONFIG_HOME": os.path.join(home, "helm-config"),
               "HELM_DATA_HOME": os.path.join(home, "helm-data")}
        self.values = {**TEST_NAMES, "MODE": mode, "VELERO_CHART_REPO": repo_url,
                       "SUBSCRIPTION_ID": SUBSCRIPTION_ID,
                       "TENANT_ID": cluster.entra["tenant_id"],
                       "CLIENT_ID": cluster.entra["client_id"],
                       "ISSUER": cluster.cp.issuer}
        self.log = os.path.join(cluster.dir, f"guide-{mode}.log")
        self.shell = guide.Shell(self.dir, env, self.log)
        self.outputs = {}
        self.seconds = {}

    def edit_env_file(self):
        """Step 0's edit, then what step 1's az block appends (its values: test values)."""
        step0 = ["MODE", *TEST_NAMES, "VELERO_CHART_REPO"]
        step1 = ["SUBSCRIPTION_ID", "TENANT_ID", "CLIENT_ID", "ISSUER"]
        with open(os.path.join(self.dir, "velero.env"), "a") as f:
            f.write("\n# test_06_guide.py: the reader's edits (step 0)\n")
            f.writelines(f"{k}={self.values[k]}\n" for k in step0)
            f.write("# what step 1's az block appends\n")
            f.writelines(f"{k}={self.values[k]}\n" for k in step1)

    def run(self, blocks, before=None, after=None):
        """Runs the blocks in order; before/after: {block.id: fn} for the reader's or the
        cluster's part between two blocks."""
        started = time.monotonic()
        for block in blocks:
            if before and block.id in before:
                before[block.id]()
            self.outputs[block.id] = self.shell.run(block)
            if after and block.id in after:
                after[block.id]()
        return time.monotonic() - started

    def install(self, before=None, after=None):
        blocks = blocks_for(self.mode, False)
        after = {env_file_block(blocks).id: self.edit_env_file, **(after or {})}
        self.seconds["install"] = self.run(blocks, before, after)

    def release_objects(self, helm):
        """What each release holds (helm get manifest), read before the Remove blocks."""
        out = {}
        for release in releases(helm):
            manifest = helm("get", "manifest", release["name"], "-n", release["namespace"])
            out[(release["name"], release["namespace"])] = manifest
        return out

    def remove(self):
        self.seconds["remove"] = self.run(blocks_for(self.mode, True))

    def close(self):
        self.shell.close()


def assert_removed(cluster, helm, installed):
    """No release left (cert-manager's aside), and none of the objects the releases held
    (kubectl get of each object of each release's manifest finds nothing)."""
    assert installed, "no Helm release was installed"
    assert releases(helm) == [], "helm list after the Remove blocks"
    for (name, ns), manifest in installed.items():
        left = cluster.cp.kubectl("get", "-n", ns, "--ignore-not-found", "-o", "name", "-f", "-",
                                  input=manifest).stdout.split()
        assert not left, f"release {name} ({ns}): left after the Remove blocks: {left}"
    hooks = imds_broker_hooks(cluster.api)
    assert not hooks, f"imds-broker MutatingWebhookConfigurations left: {hooks}"


def imds_broker_hooks(api):
    """Names of imds-broker's MutatingWebhookConfigurations (cert-manager's own may exist)."""
    return [m["metadata"]["name"] for m in api.get(MWC)["items"]
            if (m["metadata"].get("labels") or {}).get("app.kubernetes.io/name") == "imds-broker"
            or m["metadata"]["name"] == "imds-broker"]


# ---------------------------------------------------------------------------------------------
# What both modes check


def container0(obj):
    return obj["spec"]["template"]["spec"]["containers"][0]


def templates(api):
    return api.get(f"{APPS}/deployments/velero"), api.get(f"{APPS}/daemonsets/node-agent")


def server_pod(api):
    """The ReplicaSet controller's pod for the velero Deployment's current revision."""
    def current():
        dep = api.get(f"{APPS}/deployments/velero")
        revision = (dep["metadata"].get("annotations") or {}).get("deployment.kubernetes.io/revision")
        selector = ",".join(f"{k}={v}" for k, v in dep["spec"]["selector"]["matchLabels"].items())
        sets = [rs["metadata"]["uid"] for rs in api.get(
            f"{APPS}/replicasets", query={"labelSelector": selector})["items"]
            if rs["metadata"].get("annotations", {}).get("deployment.kubernetes.io/revision") == revision]
        for pod in api.get(pods_path(VELERO_NS), query={"labelSelector": selector})["items"]:
            if any(o["uid"] in sets for o in pod["metadata"].get("ownerReferences", [])):
                return pod
        return None
    return wait_for("the velero server pod of the Deployment's current revision", current, 60,
                    interval=0.2)


def node_agent_pods(api):
    """One pod per node (the DaemonSet controller's; two Node objects here)."""
    nodes = sorted(n["metadata"]["name"] for n in api.get("/api/v1/nodes")["items"])

    def one_per_node():
        pods = api.get(pods_path(VELERO_NS), query={"labelSelector": "name=node-agent"})["items"]
        pinned = sorted(t["matchFields"][0]["values"][0] for p in pods for t in
                        p["spec"]["affinity"]["nodeAffinity"]
                        ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"])
        if pinned != nodes:  # raised, so a timeout reports what there was
            raise AssertionError(f"node-agent pods for {pinned}, nodes {nodes}")
        return pods
    # 120 s: under load the DaemonSet controller requeues with backoff while its informer lags
    # its own writes ("read version … is not as new as written version"); seen past 60 s once.
    return wait_for("a node-agent pod per node", one_per_node, 120, interval=0.2)


def assert_velero_configured(api, values):
    """The backup storage location and credentials file of step 5, from velero.env's values."""
    bsl = api.get(f"/apis/velero.io/v1/namespaces/{VELERO_NS}/backupstoragelocations/default")
    spec = bsl["spec"]
    assert spec["provider"] == "azure" and spec["default"] is True, spec
    assert spec["objectStorage"]["bucket"] == values["BLOB_CONTAINER"], spec
    assert spec["config"] == {
        "storageAccount": values["STORAGE_ACCOUNT"],
        "storageAccountURI": f"https://{values['STORAGE_ACCOUNT']}.blob.core.windows.net",
        "resourceGroup": values["RG"], "subscriptionId": values["SUBSCRIPTION_ID"],
        "useAAD": "true"}, spec["config"]
    secret = api.get(f"/api/v1/namespaces/{VELERO_NS}/secrets/velero")
    cloud = base64.b64decode(secret["data"]["cloud"]).decode().splitlines()
    assert f"AZURE_CLIENT_ID={values['CLIENT_ID']}" in cloud, cloud
    assert f"AZURE_SUBSCRIPTION_ID={values['SUBSCRIPTION_ID']}" in cloud, cloud
    assert not [line for line in cloud if line.startswith("AZURE_CLIENT_SECRET")], cloud
    # The server and node-agent read that file (the chart mounts the Secret there).
    dep, ds = templates(api)
    for obj in (dep, ds):
        env = {e["name"]: e.get("value") for e in container0(obj).get("env", [])}
        assert env.get("AZURE_CREDENTIALS_FILE") == "/credentials/cloud", (obj["metadata"]["name"], env)
    # Velero 1.18.1 and the Azure plugin of deploy/velero/values.yaml.
    assert container0(dep)["image"] == "docker.io/velero/velero:v1.18.1"
    assert [c["image"] for c in dep["spec"]["template"]["spec"]["initContainers"]] == \
        ["docker.io/velero/velero-plugin-for-microsoft-azure:v1.14.2"]


def velero_driver_version():
    version = next((v for v, _ in velero_bins() if v.startswith("v1.18.")), None)
    if version is None:
        pytest.skip("no Velero 1.18 driver in VELERO_BINS")
    return version


def maintenance_job_pod(cluster, mode):
    """Velero 1.18's maintenance.StartNewJob for a BackupRepository of the demo namespace, and
    the pod the Job controller makes from it."""
    api = cluster.api
    out = cluster.velero_driver(velero_driver_version(), "maintenance-job", cluster.cp.kubeconfig,
                                f"demo-default-kopia-guide-{mode}", "demo", "default")
    job = api.get(f"/apis/batch/v1/namespaces/{VELERO_NS}/jobs/{out['job']}")
    pod = wait_pod(api, VELERO_NS, f"{JOB_NAME_KEY}={out['job']}")
    assert pod["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    assert pod["spec"]["containers"][0]["args"][0] == "repo-maintenance"
    return pod


def delete_maintenance_jobs(api):
    jobs = f"/apis/batch/v1/namespaces/{VELERO_NS}/jobs"
    api.delete(jobs, query={"labelSelector": "velero.io/repo-name", "propagationPolicy": "Background"})


# ---------------------------------------------------------------------------------------------
# Node mode


def node_check_predicate(b):
    return b.mode == "node" and "deployment/velero daemonset/node-agent" in b.text


def sidecar_check_predicate(b):
    return b.mode == "sidecar" and "get pods -l name=velero" in b.text


@pytest.fixture(scope="module")
def node_guide(aks, cluster, chart_repo):
    run = GuideRun(cluster, "node", chart_repo)
    try:
        run.install()
        yield run
    finally:
        run.close()


@pytest.fixture(scope="module")
def node_removed(node_guide, cluster, helm):
    installed = node_guide.release_objects(helm)
    node_guide.remove()
    print(f"node mode: install blocks {node_guide.seconds['install']:.1f}s, "
          f"Remove blocks {node_guide.seconds['remove']:.1f}s")
    return installed


def test_node_values_file_is_what_velero_env_prints(cluster):
    """deploy/velero/values-node.yaml holds exactly `imds-broker velero-env --format helm`'s values,
    so the shipped file cannot drift from the command."""
    res = subprocess.run([cluster.broker_bin, "velero-env", "--format", "helm", "--namespace",
                          VELERO_NS, "--client-id", cluster.entra["client_id"]],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    with open(os.path.join(ROOT, "deploy", "velero", "values-node.yaml")) as f:
        shipped = yaml.safe_load(f)
    assert shipped == yaml.safe_load(res.stdout)


def printed_lists(output):
    """`name: A B C` lines (the check blocks' jsonpath output) → {name: [A, B, C]}; the
    `kubectl wait` line before them (`pod/NAME condition met`) is not one."""
    out = {}
    for line in output.splitlines():
        if line.strip() and not line.endswith(" condition met"):
            name, _, rest = line.partition(":")
            out[name.strip()] = rest.split()
    return out


def test_node_check_block_shows_the_env_on_both_templates(node_guide, cluster):
    block = find(blocks_for("node", False), "node-mode check", node_check_predicate)
    printed = printed_lists(node_guide.outputs[block.id])
    assert set(printed) == {"velero", "node-agent"}, node_guide.outputs[block.id]
    dep, ds = templates(cluster.api)
    for obj in (dep, ds):
        names = printed[obj["metadata"]["name"]]
        # "prints HOST_IP IDENTITY_ENDPOINT IDENTITY_HEADER for both (after Velero's own entries)"
        assert names[-3:] == ["HOST_IP", "IDENTITY_ENDPOINT", "IDENTITY_HEADER"], names
        assert names == [e["name"] for e in container0(obj)["env"]]


def shipped_node_env():
    with open(os.path.join(ROOT, "deploy", "velero", "values-node.yaml")) as f:
        return normalized(yaml.safe_load(f)["configuration"]["extraEnvVars"])


def test_node_broker_and_velero_installed(node_guide, cluster):
    api = cluster.api
    values = node_guide.values
    ds = api.get(f"{APPS}/daemonsets/{NODE}")
    image = ds["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"{values['ACR']}.azurecr.io/imds-broker:{values['IMDS_BROKER_VERSION']}"
    secret = api.get(f"/api/v1/namespaces/{VELERO_NS}/secrets/{NODE}")
    assert len(base64.b64decode(secret["data"]["identity-header"])) >= 32
    assert imds_broker_hooks(api) == [], "node mode installs no webhook"
    assert_velero_configured(api, values)
    dep, ds = templates(api)
    for obj in (dep, ds):
        assert container0(obj)["env"][-3:] == shipped_node_env(), obj["metadata"]["name"]


def assert_inherits(pod, template):
    name = pod["metadata"]["name"]
    assert pod["spec"]["containers"][0].get("env") == container0(template)["env"], \
        f"{name}: env differs from {template['metadata']['name']}'s"
    assert pod["spec"]["containers"][0]["env"][-3:] == shipped_node_env(), name
    assert SIDECAR not in [c["name"] for c in pod["spec"].get("initContainers", [])], name
    assert not token_volumes(pod), name


def test_node_velero_pods_inherit_the_env(node_guide, cluster):
    """The server (ReplicaSet controller), the node-agent (DaemonSet controller), and what
    Velero 1.18's own code creates from them: the restore exposer's data-mover pod for the
    guide's demo PVC and the repository-maintenance Job's pod (Job controller)."""
    api = cluster.api
    dep, ds = templates(api)
    assert_inherits(server_pod(api), dep)
    for pod in node_agent_pods(api):
        assert_inherits(pod, ds)
    # The scheduler's part for the demo pod (managed-csi binds on first consumer): the node it
    # chose, on the PVC. The restore exposer waits for it and selects that node for its pod.
    api.patch("/api/v1/namespaces/demo/persistentvolumeclaims/demo-data", {"metadata": {
        "annotations": {"volume.kubernetes.io/selected-node": "node-1"}}})
    out = cluster.velero_driver(velero_driver_version(), "expose-restore", cluster.cp.kubeconfig,
                                "guide-node-restore", "demo", "demo-data")
    restore = api.get(pods_path(VELERO_NS, out["pod"]))
    try:
        assert restore["metadata"]["labels"]["velero.io/data-download"] == out["pod"]
        assert restore["spec"]["nodeSelector"]["kubernetes.io/hostname"] == "node-1"
        assert_inherits(restore, ds)
    finally:
        # Velero deletes it when the data mover has finished.
        delete_pod(api, VELERO_NS, out["pod"])
    assert_inherits(maintenance_job_pod(cluster, "node"), dep)


def test_node_remove_leaves_no_release(node_removed, cluster, helm):
    assert_removed(cluster, helm, node_removed)


# ---------------------------------------------------------------------------------------------
# Sidecar mode


@pytest.fixture(scope="module")
def sidecar_guide(node_removed, cluster, chart_repo, request):
    """Sidecar mode after node mode's Remove blocks. Its certificates come from cert-manager,
    which the session fixture `cert_manager` runs against this API server."""
    try:
        request.getfixturevalue("cert_manager")
    except pytest.FixtureLookupError:
        pytest.skip("sidecar mode needs the `cert_manager` fixture (cert-manager's controller, "
                    "cainjector and webhook against this API server), which conftest.py lacks")
    local_ip = request.getfixturevalue("local_ip")
    api = cluster.api
    # The reader of one mode starts without the other's demo namespace and maintenance Jobs
    # (the guide's step 7, a pods block, deletes the namespace).
    delete_namespace(api, "demo")
    delete_maintenance_jobs(api)
    run = GuideRun(cluster, "sidecar", chart_repo)
    state = {"run": run}
    install = blocks_for("sidecar", False)

    def webhook_pod_running():
        """kubelet's part for the webhook (step 4's `rollout status` waits for it): once
        cert-manager issued the Secret and its cainjector filled every caBundle, one of the
        Deployment's pods is Ready at local_ip, where `imds-broker webhook` runs as that pod
        would, with cert-manager's certificate."""
        secret_path = f"/api/v1/namespaces/{WEBHOOK_NS}/secrets/{WEBHOOK}-tls"
        secret = wait_for("cert-manager's Secret for the webhook",
                          lambda: get_if_exists(api, secret_path), 120, interval=0.3)
        ca = secret["data"]["ca.crt"]
        wait_for("the caBundle injected into every webhook", lambda: all(
            h["clientConfig"].get("caBundle") == ca
            for h in api.get(f"{MWC}/imds-broker")["webhooks"]), 120, interval=0.3)
        state["pod"] = make_pod_ready(api, WEBHOOK_NS,
                                      "app.kubernetes.io/instance=imds-broker", local_ip)
        state["webhook"], *_ = cluster.run_webhook_as_deployed(
            "imds-broker-webhook-guide", WEBHOOK_NS, WEBHOOK, local_ip)
        wait_for_ready_endpoint(api, WEBHOOK_NS, WEBHOOK, local_ip)

    def server_pod_created():
        """The seconds a reader takes to type the check: the ReplicaSet controller's pod."""
        server_pod(api)

    before = {velero_install_block(install).id: webhook_pod_running,
              find(install, "sidecar-mode check", sidecar_check_predicate).id: server_pod_created}
    try:
        run.install(before=before)
        yield state
    finally:
        run.close()
        if state.get("webhook"):
            state["webhook"].stop()


@pytest.fixture(scope="module")
def sidecar_removed(sidecar_guide, cluster, helm):
    run = sidecar_guide["run"]
    installed = run.release_objects(helm)
    # kubelet's part, done first: the Remove blocks delete the webhook's namespace and wait for
    # it, and a pod bound to a node is only gone once its kubelet confirms. Nothing is admitted
    # during Remove (it creates no pod), so the webhook process can stop before it.
    sidecar_guide["webhook"].stop()
    delete_pod(cluster.api, WEBHOOK_NS, sidecar_guide["pod"])
    run.remove()
    print(f"sidecar mode: install blocks {run.seconds['install']:.1f}s, "
          f"Remove blocks {run.seconds['remove']:.1f}s")
    return installed


def test_sidecar_check_block_shows_the_injected_server_pod(sidecar_guide, cluster):
    run = sidecar_guide["run"]
    block = find(blocks_for("sidecar", False), "sidecar-mode check", sidecar_check_predicate)
    printed = printed_lists(run.outputs[block.id])
    pod = server_pod(cluster.api)
    assert printed == {pod["metadata"]["name"]: [SIDECAR, "velero-plugin-for-microsoft-azure"]}, \
        run.outputs[block.id]


def test_sidecar_velero_configured(sidecar_guide, cluster):
    assert_velero_configured(cluster.api, sidecar_guide["run"].values)


def test_sidecar_server_and_node_agent_are_injected(sidecar_guide, cluster):
    """Selected by the label of deploy/velero/values-sidecar.yaml, through the chart's webhook
    configuration and cert-manager's certificate."""
    api = cluster.api
    values = sidecar_guide["run"].values
    for pod in [server_pod(api), node_agent_pod_as_created(api)]:
        assert "imds-broker.io/sidecar" in pod["metadata"]["labels"], pod["metadata"]["name"]
        assert_injected(pod, values["CLIENT_ID"], values["TENANT_ID"])


def node_agent_pod_as_created(api):
    """A node-agent pod from the stored DaemonSet's template, created as the DaemonSet
    controller creates one (its template, pinned to a node), through admission with
    dryRun=All. Not the controller's own pod: for `velero/node-agent`, deleted and recreated
    seconds before by the node-mode run, the 1.37 controller can wait out its expectations
    and backoff for minutes before it creates any (seen in CI: no pod within 160 s)."""
    ds = api.get(f"/apis/apps/v1/namespaces/{VELERO_NS}/daemonsets/node-agent")
    template = ds["spec"]["template"]
    node = sorted(n["metadata"]["name"] for n in api.get("/api/v1/nodes")["items"])[0]
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {**template["metadata"], "generateName": "node-agent-",
                        "namespace": VELERO_NS},
           "spec": {**template["spec"], "affinity": {"nodeAffinity": {
               "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                   {"matchFields": [{"key": "metadata.name", "operator": "In",
                                     "values": [node]}]}]}}}}}
    return api.post(pods_path(VELERO_NS), pod, query={"dryRun": "All"})


def test_sidecar_maintenance_job_pod_is_injected_by_job_name(sidecar_guide, cluster):
    """The Job controller's pod for Velero 1.18's maintenance Job is injected, and the chart's
    webhooks select on batch.kubernetes.io/job-name, which the Job controller sets on every Job
    pod (Velero 1.16-1.18.2 Job pods lack velero.io/repo-name; the driver is 1.18.3, whose pods
    carry both, so this pod alone does not show which entry matched)."""
    api = cluster.api
    keys = [e["key"] for h in api.get(f"{MWC}/imds-broker")["webhooks"]
            for e in (h.get("objectSelector") or {}).get("matchExpressions", [])]
    assert JOB_NAME_KEY in keys, f"the chart's webhooks select on {keys}"
    pod = maintenance_job_pod(cluster, "sidecar")
    values = sidecar_guide["run"].values
    assert_injected(pod, values["CLIENT_ID"], values["TENANT_ID"])


def test_sidecar_remove_leaves_no_release(sidecar_removed, cluster, helm):
    assert_removed(cluster, helm, sidecar_removed)
