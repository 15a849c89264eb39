"""charts/imds-broker installed with the real `helm` on the real API server, self-signed mode
(this cluster has no cert-manager): install, every object stored, admission through the
chart's own MutatingWebhookConfiguration, Service and certificate, upgrade, uninstall.

Nothing of the chart's output is changed. What a cluster would add is played here: there is no
kubelet, so one of the Deployment's pods is bound to a node and marked Ready with an address the
test adds to the loopback interface (10.255.254.1/32, removed after the session), where a local
`imds-broker webhook` runs with the Deployment's own args and env and the chart's Secret. The
API server (started with `--enable-aggregator-routing`, as its service resolution for webhooks
then goes to the Service's endpoints instead of its ClusterIP) finds that pod through the
Service and verifies the chart's certificate for the Service's DNS name, as in a cluster.

Runs last. Its cluster-scoped objects are named after the release, so they never meet deploy/'s;
`helm uninstall` removes the release (asserted), the address is removed from `lo`; its two
namespaces and their pods stay, as everything else in this throw-away control plane does.
"""

import json
import os
import subprocess

import pytest

from checks import (assert_injected, assert_untouched, create_annotated_velero_sa, create_pod,
                    env_of, fixture_pod, get_if_exists)
from conftest import env_path
from harness import make_pod_ready, wait_for_ready_endpoint

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
def local_ip(local_addresses):
    return local_addresses.add(LOCAL_IP)


@pytest.fixture(scope="module")
def installed(cluster, helm, local_ip):
    api = cluster.api
    create_annotated_velero_sa(api, APP_NS, cluster.entra)
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


def test_admission_through_the_charts_own_webhook_configuration(installed, cluster):
    api = cluster.api
    make_pod_ready(api, NS, f"app.kubernetes.io/instance={RELEASE}", LOCAL_IP)
    proc, container, _, _ = cluster.run_webhook_as_deployed("imds-broker-webhook-helm", NS, WEBHOOK,
                                                            LOCAL_IP)
    installed["webhook"] = proc
    wait_for_ready_endpoint(api, NS, WEBHOOK, LOCAL_IP)

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
