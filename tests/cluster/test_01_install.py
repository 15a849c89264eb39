"""deploy/overlays/manual-tls applied to a real API server with server-side apply."""

import os

from conftest import WEBHOOK_NS, WEBHOOK_SA
from harness import wait_for

EXPECTED_K8S = os.environ.get("CLUSTER_K8S_VERSION", "")


def test_api_server_version(api):
    version = api.get("/version")
    assert version["gitVersion"] == EXPECTED_K8S or not EXPECTED_K8S, version
    assert (int(version["major"]), int(version["minor"].rstrip("+"))) >= (1, 29)


def test_every_rendered_object_is_stored(cluster):
    kinds = {}
    for d in cluster.manifests:
        kinds.setdefault(d["kind"], []).append(d["metadata"]["name"])
    # What the overlay ships (README of deploy/ and docs/velero-on-aks.md step 6).
    assert sorted(kinds) == sorted([
        "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment",
        "PodDisruptionBudget", "Service", "MutatingWebhookConfiguration"]), kinds
    res = cluster.cp.kubectl("get", "-n", WEBHOOK_NS, "-o", "name",
                             "namespace/imds-broker", "serviceaccount/imds-broker-webhook",
                             "clusterrole/imds-broker-webhook",
                             "clusterrolebinding/imds-broker-webhook",
                             "deployment/imds-broker-webhook", "poddisruptionbudget/imds-broker-webhook",
                             "service/imds-broker-webhook", "secret/imds-broker-webhook-tls",
                             "mutatingwebhookconfiguration/imds-broker")
    assert len(res.stdout.split()) == 9, res.stdout


def test_webhook_configuration_is_the_shipped_one_but_for_the_url(cluster, api):
    stored = api.get("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/imds-broker")
    shipped = cluster.rendered("MutatingWebhookConfiguration")[0]
    assert [w["name"] for w in stored["webhooks"]] == [w["name"] for w in shipped["webhooks"]]
    for got, want in zip(stored["webhooks"], shipped["webhooks"]):
        assert got["clientConfig"]["url"] == f"https://127.0.0.1:{cluster.webhook_port}/mutate"
        assert got["clientConfig"]["caBundle"] == cluster.ca_bundle
        for field in ("rules", "namespaceSelector", "objectSelector", "failurePolicy",
                      "sideEffects", "timeoutSeconds", "reinvocationPolicy", "matchPolicy",
                      "admissionReviewVersions"):
            assert got[field] == want[field], (w := got["name"], field, got[field], want[field])


def test_reapply_keeps_the_patched_ca_bundle(cluster, api):
    # docs/velero-on-aks.md: "Later `kubectl apply -k` runs keep the patched caBundle".
    for server_side in (True, False):
        cluster.apply_imds_broker(server_side=server_side)
        stored = api.get("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/imds-broker")
        assert all(w["clientConfig"].get("caBundle") == cluster.ca_bundle
                   for w in stored["webhooks"]), f"server_side={server_side}"


def test_webhook_pods_are_admitted_under_restricted(cluster, api):
    """The Deployment's pods pass the namespace's `restricted` Pod Security level: the
    ReplicaSet controller creates both replicas (a refused pod would be a FailedCreate)."""
    ns = api.get(f"/api/v1/namespaces/{WEBHOOK_NS}")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    pods = wait_for("2 webhook pods from the ReplicaSet", lambda: (lambda items: items if len(items) == 2 else None)(
        api.get(f"/api/v1/namespaces/{WEBHOOK_NS}/pods",
                query={"labelSelector": "app.kubernetes.io/name=imds-broker"})["items"]), 60)
    for pod in pods:
        assert pod["spec"]["serviceAccountName"] == WEBHOOK_SA
        # Not a Velero pod: the webhook's own pods never go through it.
        assert not pod["spec"].get("initContainers")


def test_shipped_rbac_is_get_serviceaccounts_only(api):
    user = f"system:serviceaccount:{WEBHOOK_NS}:{WEBHOOK_SA}"

    def allowed(verb, resource, ns="velero"):
        review = api.post("/apis/authorization.k8s.io/v1/subjectaccessreviews", {
            "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": user, "groups": ["system:serviceaccounts",
                                              f"system:serviceaccounts:{WEBHOOK_NS}",
                                              "system:authenticated"],
                     "resourceAttributes": {"namespace": ns, "verb": verb, "resource": resource}}})
        return review["status"]["allowed"]

    assert allowed("get", "serviceaccounts")
    assert allowed("get", "serviceaccounts", ns="other")
    assert not allowed("list", "serviceaccounts")
    assert not allowed("watch", "serviceaccounts")
    assert not allowed("get", "secrets")
    assert not allowed("create", "serviceaccounts/token")
