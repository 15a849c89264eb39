"""Node mode, the real chain: charts/imds-broker installed with `mode=node` by the real `helm`
into Velero's namespace (no webhook), Velero's templates given the env exactly as
`imds-broker velero-env` prints it, and the pods Velero's own code creates from those templates
(restore exposer, repository-maintenance Job through the real Job controller, the 1.17+
pod-volume exposer) stored with that env inherited — no webhook called, no label needed.

Velero's templates, one variant at a time, in namespace `velero`:
  kubectl      `velero install`'s objects (Velero 1.15.0, then 1.18.3), patched by running the
               `kubectl patch` lines `velero-env --format kubectl` prints, verbatim;
  helm-legacy  Velero's chart 8.1.0 (Velero 1.15.0) rendered with `--format helm-legacy`;
  helm         Velero's chart 12.1.0 (Velero 1.18) rendered with `--format helm`.
The charts' renderings are tests/fixtures/velero-chart (real helm, Velero's real chart; its
README says why they are kept rendered); each variant first checks that the env the chart
appended equals what `velero-env` prints now.

Switching this cluster from sidecar to node mode starts as README "Remove" says: deploy/'s
MutatingWebhookConfiguration is deleted first. Runs last: the tests before it need that
configuration. The local `imds-broker webhook` keeps running, and its admission counter must
not move.
"""

import base64
import json
import os
import re
import shlex
import shutil
import subprocess

import pytest
import yaml

from checks import (SIDECAR, normalized, ensure_namespace, get_if_exists, make_target_pvc, token_volumes,
                    wait_pod)
from conftest import ROOT, VELERO_NS, velero_bins
from harness import ApiError, pods_path, wait_for

RELEASE = "imds-broker"  # the docs' release name: objects `imds-broker-node`
NODE = "imds-broker-node"
CHART = os.path.join(ROOT, "charts", "imds-broker")
CHART_FIXTURES = os.path.join(ROOT, "tests", "fixtures", "velero-chart")
# node.identityHeader.value for the helm-legacy variant: the header its chart rendering holds.
LEGACY_HEADER = "cluster-test-identity-header-0123456789"
APPS = "/apis/apps/v1/namespaces/" + VELERO_NS
RBAC = "/apis/rbac.authorization.k8s.io/v1"
MWC = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"


def version_of(prefix):
    """The Velero build of this run whose version starts with `prefix`, or None."""
    return next((v for v, _ in velero_bins() if v.startswith(prefix)), None)


# (variant id, velero-env format, Velero version, chart rendering or None for `velero install`)
VARIANTS = [(f"kubectl-{v}", "kubectl", v, None) for v, _ in velero_bins()]
if version_of("v1.15."):
    VARIANTS.append(("helm-legacy", "helm-legacy", version_of("v1.15."),
                     "velero-8.1.0-helm-legacy.yaml"))
if version_of("v1.18."):
    VARIANTS.append(("helm", "helm", version_of("v1.18."), "velero-12.1.0-helm.yaml"))


def admissions(cluster):
    """The local webhook's admission count (all results), or None when it is not running."""
    if not (cluster.webhook and cluster.webhook.running()):
        return None
    return sum(float(line.rsplit(" ", 1)[1]) for line in cluster.webhook_metrics().splitlines()
               if line.startswith("imds_broker_webhook_admissions_total"))


def node_values(cluster):
    return ["--set", "mode=node", "--set", "image.repository=registry.example/imds-broker",
            "--set", f"identity.clientId={cluster.entra['client_id']}",
            "--set", f"identity.tenantId={cluster.entra['tenant_id']}"]


@pytest.fixture(scope="module")
def node_mode(cluster, helm):
    """Sidecar mode removed (its webhook configuration first), node mode installed as
    docs/node-mode-install.md step 4 says: the chart into Velero's namespace."""
    api = cluster.api
    ensure_namespace(api, VELERO_NS)
    cluster.cp.kubectl("delete", "mutatingwebhookconfiguration", "imds-broker", "--ignore-not-found")
    before = admissions(cluster)
    out = helm("install", RELEASE, CHART, "-n", VELERO_NS, *node_values(cluster), "-o", "json")
    secret = api.get(f"/api/v1/namespaces/{VELERO_NS}/secrets/{NODE}")
    yield {"release": json.loads(out), "admissions": before,
           "header": base64.b64decode(secret["data"]["identity-header"]).decode()}
    # Nothing to undo for later tests: this module runs last in a throw-away control plane.


def velero_env(cluster, fmt, header=None):
    """`imds-broker velero-env` as docs/node-mode-install.md step 5 runs it."""
    args = [cluster.broker_bin, "velero-env", "--format", fmt, "--namespace", VELERO_NS,
            "--client-id", cluster.entra["client_id"]]
    if header is not None:
        args += ["--identity-header-file", "-"]
    res = subprocess.run(args, input=header, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, f"velero-env --format {fmt}:\n{res.stderr}"
    return res.stdout


def printed_entries(fmt, text):
    """The env entries velero-env printed, in the order a container gets them: the helm list
    as is; the helm-legacy map as Velero's old chart renders it (`range` sorts the keys); the
    entries of the kubectl patches (the same for both objects)."""
    if fmt == "kubectl":
        patches = [json.loads(shlex.split(line)[-1]) for line in text.splitlines()
                   if line.startswith("kubectl ") and " patch " in line]
        envs = [p["spec"]["template"]["spec"]["containers"][0]["env"] for p in patches]
        assert len(envs) == 2 and envs[0] == envs[1], envs
        return envs[0]
    values = yaml.safe_load(text)["configuration"]["extraEnvVars"]
    if fmt == "helm-legacy":
        return [{"name": k, "value": values[k]} for k in sorted(values)]
    return values


def run_kubectl_lines(cluster, text):
    """The `kubectl ... patch` lines velero-env printed, run verbatim against this cluster
    (only --kubeconfig added). The `rollout status` lines are not run: no kubelet runs here,
    so no pod ever becomes ready and they would wait out their 300 s."""
    lines = [line for line in text.splitlines() if line.startswith("kubectl ")]
    patches = [line for line in lines if " patch " in line]
    rollouts = [line for line in lines if " rollout status " in line]
    assert len(patches) == 2 and len(rollouts) == 2 and len(lines) == 4, lines
    for line in patches:
        cluster.cp.kubectl(*shlex.split(line)[1:])


def templates(api):
    dep = api.get(f"{APPS}/deployments/velero")
    ds = api.get(f"{APPS}/daemonsets/node-agent")
    return dep, ds


def container0(obj):
    return obj["spec"]["template"]["spec"]["containers"][0]


def delete_templates(api):
    """Velero's Deployment and DaemonSet deleted in the foreground: gone once the garbage
    collector removed their ReplicaSets and pods, so no pod of an old template is left."""
    for path in (f"{APPS}/deployments/velero", f"{APPS}/daemonsets/node-agent"):
        try:
            api.delete(path, query={"propagationPolicy": "Foreground"})
        except ApiError as e:
            if e.status != 404:
                raise
        wait_for(f"{path} deleted", lambda: get_if_exists(api, path) is None, 60, interval=0.2)


@pytest.fixture(scope="module", params=VARIANTS, ids=[v[0] for v in VARIANTS])
def velero(request, node_mode, cluster, helm):
    """Velero's objects for one variant, with the env velero-env printed. Returns what the
    tests compare against: the version, the printed entries, the stored templates."""
    name, fmt, version, rendering = request.param
    api = cluster.api
    # Each variant from fresh templates (a chart's Deployment selector differs from the
    # installer's and is immutable). CRDs, namespace, ServiceAccount, credentials: `velero
    # install`'s (the chart's are the same CRDs); a chart's Deployment and DaemonSet then
    # replace the installer's, as on a fresh Helm install.
    delete_templates(api)
    cluster.install_velero(version)
    header = None
    if fmt == "helm-legacy":
        # Old charts take the header as a plain value: set the one the rendering holds, as
        # docs/node-mode-install.md "Changing the identity header" says, then read it back
        # from the Secret and pipe it into velero-env as step 5 does.
        helm("upgrade", RELEASE, CHART, "-n", VELERO_NS, "--reuse-values",
             "--set", f"node.identityHeader.value={LEGACY_HEADER}")
        secret = api.get(f"/api/v1/namespaces/{VELERO_NS}/secrets/{NODE}")
        header = base64.b64decode(secret["data"]["identity-header"]).decode()
        assert header == LEGACY_HEADER
    text = velero_env(cluster, fmt, header)
    printed = printed_entries(fmt, text)
    if rendering is None:
        run_kubectl_lines(cluster, text)
        # "Merged by name: running this again changes nothing."
        generations = [o["metadata"]["generation"] for o in templates(api)]
        run_kubectl_lines(cluster, text)
        assert [o["metadata"]["generation"] for o in templates(api)] == generations
    else:
        with open(os.path.join(CHART_FIXTURES, rendering)) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        # The rendering is current: the chart appended exactly what velero-env prints now.
        for d in docs:
            env = container0(d)["env"]
            assert env[-len(printed):] == printed, \
                f"{rendering} ({d['kind']}) is stale: render it again (its README)"
        delete_templates(api)
        cluster.cp.kubectl("apply", "--server-side", "--field-manager", "helm", "-n", VELERO_NS,
                           "-f", "-", input=yaml.safe_dump_all(docs))
    dep, ds = templates(api)
    return {"name": name, "format": fmt, "version": version, "printed": printed,
            "deployment": dep, "daemonset": ds, "tag": name.replace(".", "-"),
            "admissions": node_mode["admissions"]}


# ---------------------------------------------------------------------------------------------
# The install


def test_node_mode_install_stores_its_objects_and_no_webhook(node_mode, cluster):
    api = cluster.api
    assert node_mode["release"]["info"]["status"] == "deployed"
    ns = f"/api/v1/namespaces/{VELERO_NS}"
    ds = api.get(f"{APPS}/daemonsets/{NODE}")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec["serviceAccountName"] == NODE
    assert not any("ports" in c for c in spec["containers"]), "a declared port is a hostPort"
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] == 1
    assert api.get(f"{ns}/serviceaccounts/{NODE}")
    role = api.get(f"{RBAC}/namespaces/{VELERO_NS}/roles/{NODE}")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}]
    binding = api.get(f"{RBAC}/namespaces/{VELERO_NS}/rolebindings/{NODE}")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NODE}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": NODE, "namespace": VELERO_NS}]
    # A Role, not a ClusterRole: nothing cluster-scoped carries node mode's labels (deploy/'s
    # webhook ClusterRole from test_01 has the same release label, component webhook).
    release = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=node"
    for kind in ("clusterroles", "clusterrolebindings"):
        found = api.get(f"{RBAC}/{kind}", query={"labelSelector": release})["items"]
        assert not found, [o["metadata"]["name"] for o in found]
    # The identity header the install generated: 48 letters and digits.
    assert re.fullmatch(r"[A-Za-z0-9]{48}", node_mode["header"])
    svc = api.get(f"{ns}/services/{NODE}")
    assert svc["spec"]["internalTrafficPolicy"] == "Local"
    assert [p["port"] for p in svc["spec"]["ports"]] == [8400]
    # No webhook: deploy/'s configuration was removed and the chart rendered none.
    assert api.get(MWC)["items"] == []
    # The DaemonSet controller made one broker pod per Linux node (each pinned to its node by
    # a matchFields affinity), on the host network, as its own ServiceAccount.
    nodes = sorted(n["metadata"]["name"] for n in api.get("/api/v1/nodes")["items"])

    def one_per_node():
        pods = api.get(pods_path(VELERO_NS), query={"labelSelector": release})["items"]
        pinned = sorted(term["matchFields"][0]["values"][0] for p in pods for term in
                        p["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"])
        return pods if pinned == nodes else None
    pods = wait_for("one broker pod per node", one_per_node, 60, interval=0.2)
    assert all(p["spec"]["hostNetwork"] and p["spec"]["serviceAccountName"] == NODE for p in pods)


def access(cluster, ns, verb, resource):
    """May the broker's ServiceAccount do this? (a SubjectAccessReview, as the API server decides)"""
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {
        "user": f"system:serviceaccount:{VELERO_NS}:{NODE}",
        "groups": ["system:serviceaccounts", f"system:serviceaccounts:{VELERO_NS}"],
        "resourceAttributes": {"verb": verb, "resource": resource, **({"namespace": ns} if ns else {})}}}
    return cluster.api.post("/apis/authorization.k8s.io/v1/subjectaccessreviews", review)["status"]["allowed"]


def test_broker_may_only_list_and_watch_pods_of_its_namespace(node_mode, cluster):
    assert access(cluster, VELERO_NS, "list", "pods") and access(cluster, VELERO_NS, "watch", "pods")
    assert not access(cluster, VELERO_NS, "get", "secrets")
    assert not access(cluster, VELERO_NS, "create", "pods")
    assert not access(cluster, "app", "list", "pods")
    assert not access(cluster, None, "list", "pods")  # cluster-wide


def test_upgrade_keeps_the_identity_header(node_mode, cluster, helm):
    """The header is generated once and read back by the chart's lookup on every upgrade."""
    path = f"/api/v1/namespaces/{VELERO_NS}/secrets/{NODE}"
    before = cluster.api.get(path)["data"]
    helm("upgrade", RELEASE, CHART, "-n", VELERO_NS, *node_values(cluster))
    assert cluster.api.get(path)["data"] == before


# ---------------------------------------------------------------------------------------------
# Velero's templates and the pods Velero's code makes from them


def assert_identity_env(velero, env, where):
    """The printed entries, stored as printed and in order; for the node-IP endpoint, HOST_IP
    (fieldRef status.hostIP) before the IDENTITY_ENDPOINT that expands it."""
    names = [e["name"] for e in env]
    printed = normalized(velero["printed"])
    for e in printed:
        assert names.count(e["name"]) == 1, f"{where}: {e['name']} x{names.count(e['name'])}: {names}"
    stored = [env[names.index(e["name"])] for e in printed]
    assert stored == printed, f"{where}: {stored}"
    assert [names.index(e["name"]) for e in printed] == sorted(names.index(e["name"]) for e in printed)
    by_name = {e["name"]: e for e in env}
    if velero["format"] == "helm-legacy":
        # Old charts: plain values only — the Service, and the header copied from the Secret.
        assert by_name["IDENTITY_ENDPOINT"]["value"] == f"http://{NODE}.{VELERO_NS}.svc:8400/msi/token"
        assert by_name["IDENTITY_HEADER"]["value"] == LEGACY_HEADER
        assert "HOST_IP" not in by_name
        return
    assert names.index("HOST_IP") < names.index("IDENTITY_ENDPOINT"), f"{where}: {names}"
    assert by_name["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert by_name["IDENTITY_ENDPOINT"]["value"] == "http://$(HOST_IP):8400/msi/token"
    assert by_name["IDENTITY_HEADER"]["valueFrom"]["secretKeyRef"] == {"name": NODE, "key": "identity-header"}


def assert_inherited(pod, template, velero, cluster):
    """Velero copied the template's containers[0].env verbatim, and nothing else put identity
    there: no sidecar, no token volume, no webhook annotation, no Workload Identity label, and
    the local webhook has not been called since node mode was installed."""
    name = pod["metadata"]["name"]
    if velero["admissions"] is not None:
        assert admissions(cluster) == velero["admissions"], f"{name}: the webhook was called"
    env = pod["spec"]["containers"][0].get("env", [])
    assert env == container0(template)["env"], f"{name}: env differs from its template's"
    assert_identity_env(velero, env, name)
    assert not [c for c in pod["spec"].get("initContainers", []) if c["name"] == SIDECAR], name
    assert SIDECAR not in [c["name"] for c in pod["spec"]["containers"]], name
    assert not token_volumes(pod), f"{name}: a token volume"
    assert "imds-broker.io/injected" not in (pod["metadata"].get("annotations") or {}), name
    assert "azure.workload.identity/use" not in (pod["metadata"].get("labels") or {}), name


def test_templates_carry_the_printed_env(velero):
    for obj in (velero["deployment"], velero["daemonset"]):
        assert_identity_env(velero, container0(obj)["env"], obj["metadata"]["name"])
        assert "azure.workload.identity/use" not in obj["spec"]["template"]["metadata"].get("labels", {})


def test_velero_server_pod_inherits_the_env(velero, cluster):
    """The ReplicaSet controller's pod for the Deployment as it is now (a patched template
    rolls out a new ReplicaSet)."""
    api = cluster.api
    dep = velero["deployment"]
    selector = ",".join(f"{k}={v}" for k, v in dep["spec"]["selector"]["matchLabels"].items())

    def current():
        for pod in api.get(pods_path(VELERO_NS), query={"labelSelector": selector})["items"]:
            if pod["spec"]["containers"][0].get("env") == container0(dep)["env"]:
                return pod
        return None
    assert_inherited(wait_for("the velero server pod of the current template", current, 60,
                              interval=0.2), dep, velero, cluster)


def test_restore_exposer_pod_inherits_the_env(velero, cluster):
    api = cluster.api
    tag = velero["tag"]
    make_target_pvc(api, "app", f"node-{tag}")
    out = cluster.velero_driver(velero["version"], "expose-restore", cluster.cp.kubeconfig,
                                f"node-restore-{tag}", "app", f"node-{tag}")
    pod = api.get(pods_path(VELERO_NS, out["pod"]))
    assert pod["metadata"]["labels"]["velero.io/data-download"] == pod["metadata"]["name"]
    assert pod["spec"]["containers"][0]["command"][:3] == ["/velero", "data-mover", "restore"]
    assert pod["spec"]["serviceAccountName"] == velero["daemonset"]["spec"]["template"]["spec"]["serviceAccountName"]
    assert_inherited(pod, velero["daemonset"], velero, cluster)


def test_maintenance_job_pod_inherits_the_env(velero, cluster):
    api = cluster.api
    # Earlier maintenance Jobs never finish (no kubelet), and Velero 1.15 starts none while
    # the namespace's latest one is unfinished: delete them, as if they had completed.
    jobs = f"/apis/batch/v1/namespaces/{VELERO_NS}/jobs"
    api.delete(jobs, query={"labelSelector": "velero.io/repo-name", "propagationPolicy": "Background"})
    wait_for("earlier maintenance Jobs deleted", lambda: not api.get(
        jobs, query={"labelSelector": "velero.io/repo-name"})["items"], 60, interval=0.2)
    out = cluster.velero_driver(velero["version"], "maintenance-job", cluster.cp.kubeconfig,
                                f"app-default-kopia-node-{velero['tag']}", "app", "default")
    job = api.get(f"/apis/batch/v1/namespaces/{VELERO_NS}/jobs/{out['job']}")
    pod = wait_pod(api, VELERO_NS, f"job-name={out['job']}")
    assert pod["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    assert pod["spec"]["containers"][0]["args"][0] == "repo-maintenance"
    assert_inherited(pod, velero["deployment"], velero, cluster)


@pytest.fixture
def client_pod(velero, cluster):
    """An application pod on node-1 with an emptyDir volume `data`, and that volume's
    directory where kubelet keeps it (/var/lib/kubelet/pods/<uid>/volumes/...), as the
    node-agent sees it through its host-pods mount: /host_pods/<uid>/volumes/. Only what this
    fixture created is removed."""
    api = cluster.api
    ensure_namespace(api, "app")
    pod = api.post(pods_path("app"), {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"fs-backup-client-{velero['tag']}"},
        "spec": {"nodeName": "node-1", "containers": [{"name": "app", "image": "registry.example/app:1",
                                                       "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                 "volumes": [{"name": "data", "emptyDir": {}}]}})
    top = "/host_pods"
    created = top if not os.path.exists(top) else os.path.join(top, pod["metadata"]["uid"])
    os.makedirs(os.path.join(top, pod["metadata"]["uid"], "volumes", "kubernetes.io~empty-dir", "data"))
    try:
        yield pod
    finally:
        shutil.rmtree(created, ignore_errors=True)


def test_pod_volume_backup_pod_inherits_the_env(velero, client_pod, cluster):
    """1.17+ backs a pod volume up in its own pod (pod_volume.go); 1.15-1.16 do it inside the
    node-agent pod, whose env is the template's (test_templates_carry_the_printed_env)."""
    if not velero["version"].startswith("v1.18."):
        pytest.skip(f"Velero {velero['version']} has no pod-volume exposer (file-system backup runs in the node-agent)")
    api = cluster.api
    uid = client_pod["metadata"]["uid"]
    out = cluster.velero_driver(velero["version"], "expose-pvb", cluster.cp.kubeconfig,
                                f"node-pvb-{velero['tag']}", "app", client_pod["metadata"]["name"], "data")
    pod = api.get(pods_path(VELERO_NS, out["pod"]))
    assert pod["metadata"]["labels"]["velero.io/pod-volume-backup"] == pod["metadata"]["name"]
    assert pod["spec"]["containers"][0]["command"][:3] == ["/velero", "pod-volume", "backup"]
    # The client volume, found on the host and translated to the node-agent's host-pods path.
    host = [v["hostPath"]["path"] for v in pod["spec"]["volumes"] if v.get("hostPath")]
    assert f"/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~empty-dir/data" in host, host
    assert_inherited(pod, velero["daemonset"], velero, cluster)


def test_no_webhook_configuration_after_the_variants(velero, cluster):
    """After each variant's pods: still no webhook configuration anywhere in the cluster."""
    assert cluster.api.get(MWC)["items"] == []
