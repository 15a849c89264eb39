"""charts/imds-broker installed with the real `helm` on the real API server, self-signed mode
(this cluster has no cert-manager): install, every object stored, admission through the
chart's own MutatingWebhookConfiguration, Service and certificate, upgrade, uninstall.

Nothing of the chart's output is changed. What a cluster would add is played here: there is no
kubelet, so one of the Deployment's pods is bound to a node and marked Ready with an address the
test adds to the loopback interface (10.255.254.1/32, removed at the end), where a local
`imds-broker webhook` runs with the Deployment's own args and env and the chart's Secret. The
API server (started with `--enable-aggregator-routing`, as its service resolution for webhooks
then goes to the Service's endpoints instead of its ClusterIP) finds that pod through the
Service and verifies the chart's certificate for the Service's DNS name, as in a cluster.

Runs last. Its cluster-scoped objects are named after the release, so they never meet deploy/'s;
`helm uninstall` removes the release (asserted), the address is removed from `lo`; its two
namespaces and their pods stay, as everything else in this throw-away control plane does.
"""

import base64
import json
import os
import subprocess

import pytest

from checks import (assert_injected, assert_untouched, create_pod, env_of, fixture_pod,
                    get_if_exists)
from conftest import env_path
from harness import free_port, pods_path, wait_for

RELEASE = "ibhelm"
NS = "imds-broker-helm"
APP_NS = "helm-velero"  # the chart's webhook.namespaces: Velero's namespace in this install
FULL = f"{RELEASE}-imds-broker"
WEBHOOK = f"{FULL}-webhook"
LOCAL_IP = "10.255.254.1"
CHART = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     "charts", "imds-broker")
VALUES = ["--set", "image.repository=registry.example/imds-broker",
          "--set", "certificates.mode=self-signed",
          "--set", "networkPolicy.enabled=true",
          "--set", f"webhook.namespaces={{{APP_NS}}}"]


@pytest.fixture(scope="module")
def local_ip():
    """An address of this host the API server can route to that is not loopback (Endpoints
    refuse 127.0.0.0/8), kept on the loopback interface: nothing leaves the machine."""
    add = subprocess.run(["ip", "addr", "add", f"{LOCAL_IP}/32", "dev", "lo"],
                         capture_output=True, text=True)
    added = add.returncode == 0
    if not added and "File exists" not in add.stderr:
        pytest.fail(f"cannot add {LOCAL_IP} to lo (the cluster stage runs as root): {add.stderr}")
    try:
        yield LOCAL_IP
    finally:
        if added:  # only what this run added
            subprocess.run(["ip", "addr", "del", f"{LOCAL_IP}/32", "dev", "lo"], capture_output=True)


@pytest.fixture(scope="module")
def installed(cluster, helm, local_ip):
    api = cluster.api
    api.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                    "metadata": {"name": APP_NS}})
    # The Velero ServiceAccount of this namespace, annotated as docs/velero-on-aks.md says.
    api.post(f"/api/v1/namespaces/{APP_NS}/serviceaccounts", {
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "velero-server", "annotations": {
            "azure.workload.identity/client-id": cluster.entra["client_id"],
            "azure.workload.identity/tenant-id": cluster.entra["tenant_id"]}}})
    out = helm("install", RELEASE, CHART, "-n", NS, "--create-namespace", *VALUES, "-o", "json")
    state = {"release": json.loads(out)}
    try:
        yield state
    finally:
        # Whatever a failed test left: the local webhook, and the release (its webhook
        # configuration would refuse data-mover pods in APP_NS).
        if state.get("webhook"):
            state["webhook"].stop()
        subprocess.run([env_path("HELM_BIN"), "--kubeconfig", cluster.cp.kubeconfig,
                        "uninstall", RELEASE, "-n", NS], capture_output=True)


def stored_objects(api):
    return {
        "ServiceAccount": get_if_exists(api, f"/api/v1/namespaces/{NS}/serviceaccounts/{WEBHOOK}"),
        "ClusterRole": get_if_exists(api, f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{WEBHOOK}"),
        "ClusterRoleBinding": get_if_exists(api, f"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{WEBHOOK}"),
        "Deployment": get_if_exists(api, f"/apis/apps/v1/namespaces/{NS}/deployments/{WEBHOOK}"),
        "PodDisruptionBudget": get_if_exists(api, f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/{WEBHOOK}"),
        "Service": get_if_exists(api, f"/api/v1/namespaces/{NS}/services/{WEBHOOK}"),
        "Secret": get_if_exists(api, f"/api/v1/namespaces/{NS}/secrets/{FULL}-webhook-tls"),
        "NetworkPolicy": get_if_exists(api, f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/{WEBHOOK}"),
        "MutatingWebhookConfiguration": get_if_exists(
            api, f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{FULL}"),
    }


def test_helm_install_stores_every_object(installed, cluster):
    assert installed["release"]["info"]["status"] == "deployed", installed["release"]["info"]
    objects = stored_objects(cluster.api)
    missing = [kind for kind, obj in objects.items() if obj is None]
    assert not missing, f"not stored: {missing}"
    secret, mwc = objects["Secret"], objects["MutatingWebhookConfiguration"]
    hooks = mwc["webhooks"]
    assert [h["name"] for h in hooks] == [
        "data-upload.imds-broker.io", "data-download.imds-broker.io",
        "pod-volume-backup.imds-broker.io", "pod-volume-restore.imds-broker.io",
        "repo-maintenance.imds-broker.io", "job.imds-broker.io", "opt-in.imds-broker.io"]
    for h in hooks:
        # The chart wrote the caBundle of the CA that signed the Secret's certificate.
        assert h["clientConfig"]["caBundle"] == secret["data"]["ca.crt"], h["name"]
        assert h["clientConfig"]["service"] == {"name": WEBHOOK, "namespace": NS,
                                                "path": "/mutate", "port": 443}, h
        assert h["namespaceSelector"]["matchExpressions"][0]["values"] == [APP_NS]


def make_one_pod_ready(api, ip):
    """kubelet's part: one of the Deployment's pods bound to a node and Ready at `ip`."""
    pods = wait_for("the Deployment's pods", lambda: api.get(
        pods_path(NS), query={"labelSelector": f"app.kubernetes.io/instance={RELEASE}"})["items"] or None, 60)
    pod = pods[0]
    name = pod["metadata"]["name"]
    api.post(f"{pods_path(NS, name)}/binding", {
        "apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
        "target": {"apiVersion": "v1", "kind": "Node", "name": "node-1"}})
    containers = pod["spec"]["containers"]
    api.patch(f"{pods_path(NS, name)}/status", {"status": {
        "phase": "Running", "hostIP": ip, "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": t, "status": "True"} for t in
                       ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
        "containerStatuses": [{"name": c["name"], "image": c["image"], "imageID": "", "ready": True,
                               "restartCount": 0, "started": True,
                               "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}
                              for c in containers]}})
    return name


def start_webhook_as_deployed(cluster, ip):
    """`imds-broker webhook` with the stored Deployment's args and env, the chart's Secret as its
    certificate and the chart's ServiceAccount as its API identity; on ip:8443, the pod port."""
    api = cluster.api
    dep = api.get(f"/apis/apps/v1/namespaces/{NS}/deployments/{WEBHOOK}")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "https")
    secret = api.get(f"/api/v1/namespaces/{NS}/secrets/{FULL}-webhook-tls")
    tls = os.path.join(cluster.dir, "helm-tls")
    os.makedirs(tls, exist_ok=True)
    for key in ("tls.crt", "tls.key"):
        cluster.cp.write_secret_file(f"helm-tls/{key}", base64.b64decode(secret["data"][key]).decode())
    token = cluster.cp.write_secret_file("helm-webhook-sa.token", cluster.cp.token_request(NS, WEBHOOK))
    proc = cluster.run_webhook("imds-broker-webhook-helm", container, listen=f"{ip}:{port}",
                               admin_port=free_port(), tls_dir=tls, token_file=token)
    return proc, container


def test_admission_through_the_charts_own_webhook_configuration(installed, cluster):
    api = cluster.api
    make_one_pod_ready(api, LOCAL_IP)
    proc, container = start_webhook_as_deployed(cluster, LOCAL_IP)
    installed["webhook"] = proc

    def endpoint_ready():
        slices = api.get(f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices",
                         query={"labelSelector": f"kubernetes.io/service-name={WEBHOOK}"})["items"]
        return any(LOCAL_IP in ep["addresses"] and ep.get("conditions", {}).get("ready")
                   for s in slices for ep in s.get("endpoints") or [])
    wait_for("the Service's endpoint at the ready pod", endpoint_ready, 60)

    pod = fixture_pod("velero-1.15-data-upload.json")
    pod["metadata"]["namespace"] = APP_NS
    pod["metadata"].pop("generateName", None)
    pod["metadata"]["name"] = "helm-data-upload"
    stored = create_pod(api, pod, ns=APP_NS)
    sidecar = assert_injected(stored, cluster.entra["client_id"], cluster.entra["tenant_id"])
    # The sidecar is the chart's: its image and memory limit come from the chart's values.
    chart_env = env_of(container)
    assert sidecar["image"] == chart_env["IMDS_BROKER_WEBHOOK_SIDECAR_IMAGE"] == \
        "registry.example/imds-broker:" + installed["release"]["chart"]["metadata"]["appVersion"]
    assert sidecar["resources"]["limits"]["memory"] == chart_env["IMDS_BROKER_WEBHOOK_SIDECAR_MEMORY_LIMIT"]
    # deploy/'s webhook (Velero's namespace "velero") was not asked: one sidecar only.
    assert [c["name"] for c in stored["spec"]["initContainers"]].count("imds-broker") == 1


def test_upgrade_keeps_the_certificate_and_applies_values(installed, cluster, helm):
    api = cluster.api
    before = stored_objects(api)
    out = helm("upgrade", RELEASE, CHART, "-n", NS, *VALUES,
               "--set", "sidecar.resources.limits.memory=48Mi", "-o", "json")
    assert json.loads(out)["version"] == 2
    after = stored_objects(api)
    # Self-signed mode reads its CA back from the Secret (helm's lookup against the server).
    assert after["Secret"]["data"] == before["Secret"]["data"]
    assert [h["clientConfig"]["caBundle"] for h in after["MutatingWebhookConfiguration"]["webhooks"]] == \
        [h["clientConfig"]["caBundle"] for h in before["MutatingWebhookConfiguration"]["webhooks"]]
    env = env_of(after["Deployment"]["spec"]["template"]["spec"]["containers"][0])
    assert env["IMDS_BROKER_WEBHOOK_SIDECAR_MEMORY_LIMIT"] == "48Mi"


def test_uninstall_removes_every_object(installed, cluster, helm):
    api = cluster.api
    proc = installed.pop("webhook", None)
    if proc:
        proc.stop()
    helm("uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "60s")
    left = [kind for kind, obj in stored_objects(api).items() if obj is not None]
    assert not left, f"left after helm uninstall: {left}"
    # With the configuration gone, a data-mover pod there is admitted untouched (no webhook asked).
    pod = fixture_pod("velero-1.15-data-upload.json")
    pod["metadata"].update(namespace=APP_NS, name="helm-after-uninstall")
    pod["metadata"].pop("generateName", None)
    assert_untouched(create_pod(api, pod, ns=APP_NS))
