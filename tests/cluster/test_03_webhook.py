"""The webhook as the API server calls it: Velero's pod shapes (tests/fixtures/velero), pods it
must leave alone, re-invocation next to a second mutating webhook, Pod Security, and what the
API server does when the webhook is slow or down."""

import base64
import copy
import http.server
import json
import signal
import ssl
import threading
import time

import pytest

from checks import (SIDECAR, assert_injected, assert_untouched, create_pod, delete_pod, elapsed,
                    env_of, fixture_pod)
from conftest import VELERO_NS
from harness import ApiError, pods_path, wait_for

FIXTURES = [
    "velero-1.15-data-upload.json",
    "velero-1.16-data-download.json",
    "velero-1.17-pod-volume-backup.json",
    "velero-1.18-maintenance-job.json",
]


@pytest.fixture(scope="module", autouse=True)
def velero_installed(cluster):
    if cluster.installed_velero is None:
        cluster.install_velero(cluster.velero[-1][0])


_seq = [0]


def unique(pod, prefix):
    """A fresh name per creation (fixtures are created more than once)."""
    _seq[0] += 1
    pod = copy.deepcopy(pod)
    meta = pod["metadata"]
    meta.pop("generateName", None)
    meta["name"] = f"{prefix}-{_seq[0]}"
    return pod


@pytest.mark.parametrize("fixture", FIXTURES)
def test_velero_pod_shapes_are_injected(fixture, cluster, api):
    pod = unique(fixture_pod(fixture), "fx")
    stored = create_pod(api, pod)
    # What the API server stored is what a GET returns.
    assert api.get(pods_path(VELERO_NS, stored["metadata"]["name"]))["spec"] == stored["spec"]
    assert_injected(stored, client_id=cluster.entra["client_id"],
                    tenant_id=cluster.entra["tenant_id"])
    # The app containers keep what Velero gave them (volumes, mounts, env), plus the two vars.
    before = {c["name"]: c for c in pod["spec"]["containers"]}
    for c in stored["spec"]["containers"]:
        want = {e["name"] for e in before[c["name"]].get("env", [])}
        assert want | {"IDENTITY_ENDPOINT", "IDENTITY_HEADER"} == set(env_of(c)), c["name"]


def test_generate_name_pod_is_injected(api):
    pod = fixture_pod("velero-1.18-maintenance-job.json")
    assert "generateName" in pod["metadata"] and "name" not in pod["metadata"]
    stored = create_pod(api, pod)
    assert stored["metadata"]["name"].startswith(pod["metadata"]["generateName"])
    assert_injected(stored)


def test_pod_without_velero_labels_is_untouched(api):
    pod = unique(fixture_pod("velero-1.16-data-download.json"), "nolabel")
    pod["metadata"]["labels"] = {"app": "something-else"}
    stored = create_pod(api, pod)
    assert_untouched(stored)
    assert stored["spec"]["containers"][0]["env"] == pod["spec"]["containers"][0]["env"]


def test_opted_out_pod_is_untouched(api):
    pod = unique(fixture_pod("velero-1.15-data-upload.json"), "optout")
    pod["metadata"].setdefault("annotations", {})["imds-broker.io/inject"] = "false"
    stored = create_pod(api, pod)
    assert_untouched(stored)


def test_velero_labels_in_another_namespace_are_untouched(api):
    api.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                    "metadata": {"name": "not-velero"}})
    api.post("/api/v1/namespaces/not-velero/serviceaccounts", {
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "velero-server"}})
    pod = unique(fixture_pod("velero-1.16-data-download.json"), "otherns")
    pod["metadata"]["namespace"] = "not-velero"
    stored = create_pod(api, pod, ns="not-velero")
    assert_untouched(stored)


def test_pod_matching_two_entries_gets_one_sidecar(api):
    pod = unique(fixture_pod("velero-1.15-data-upload.json"), "twolabels")
    pod["metadata"]["labels"]["velero.io/repo-name"] = "also"
    stored = create_pod(api, pod)
    assert_injected(stored)  # exactly one sidecar, one token volume


# ---------------------------------------------------------------------------------------------
# Re-invocation next to a second mutating webhook


class SecondWebhook:
    """Another mutating webhook (a test HTTPS server on 127.0.0.1), called after imds-broker's
    (configurations are called in name order). Label `cluster-test/second=container` makes it
    add an app container, `=annotation` only an annotation."""

    def __init__(self, tls_dir):
        outer = self
        self.calls = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.calls += 1
                req = review["request"]
                pod = req["object"]
                mode = pod["metadata"].get("labels", {}).get("cluster-test/second")
                patch = []
                if mode == "container" and not any(c["name"] == "late-app"
                                                   for c in pod["spec"]["containers"]):
                    patch.append({"op": "add", "path": "/spec/containers/-", "value": {
                        "name": "late-app", "image": "busybox:1.36",
                        "command": ["sleep", "1"], "env": [{"name": "KEEP", "value": "me"}]}})
                elif mode == "annotation":
                    if "cluster-test/seen" not in (pod["metadata"].get("annotations") or {}):
                        patch.append({"op": "add", "path": "/metadata/annotations/cluster-test~1seen",
                                      "value": "yes"})
                resp = {"uid": req["uid"], "allowed": True}
                if patch:
                    resp["patchType"] = "JSONPatch"
                    resp["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
                body = json.dumps({"apiVersion": "admission.k8s.io/v1",
                                   "kind": "AdmissionReview", "response": resp}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(f"{tls_dir}/tls.crt", f"{tls_dir}/tls.key")
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def second_webhook(cluster, api):
    hook = SecondWebhook(cluster.webhook_tls)
    name = "zz-cluster-test-second"
    api.post("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations", {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "second.cluster-test.local", "admissionReviewVersions": ["v1"],
            "clientConfig": {"url": f"https://127.0.0.1:{hook.port}/", "caBundle": cluster.ca_bundle},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                       "resources": ["pods"]}],
            "objectSelector": {"matchExpressions": [{"key": "cluster-test/second",
                                                     "operator": "Exists"}]},
            "sideEffects": "None", "failurePolicy": "Fail", "timeoutSeconds": 5,
            "reinvocationPolicy": "Never"}]})
    try:
        yield hook
    finally:
        api.delete(f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}")
        hook.stop()


def wait_second_webhook_active(api, hook):
    """The API server picks up a new webhook configuration asynchronously (informer): probe
    with dry-run creations until the second webhook is called."""
    probe = unique(fixture_pod("velero-1.16-data-download.json"), "probe")
    probe["metadata"]["labels"] = {"cluster-test/second": "probe"}
    before = hook.calls

    def called():
        create_pod(api, unique(probe, "probe"), query={"dryRun": "All"})
        return hook.calls > before
    wait_for("second webhook active", called, 30, interval=0.2)


def test_reinvocation_gives_a_later_container_the_identity_env(second_webhook, api):
    wait_second_webhook_active(api, second_webhook)
    pod = unique(fixture_pod("velero-1.16-data-download.json"), "reinvoke")
    pod["metadata"]["labels"]["cluster-test/second"] = "container"
    stored = create_pod(api, pod)
    names = [c["name"] for c in stored["spec"]["containers"]]
    assert "late-app" in names, names
    assert_injected(stored)  # late-app got IDENTITY_ENDPOINT/HEADER too, one sidecar
    late = [c for c in stored["spec"]["containers"] if c["name"] == "late-app"][0]
    assert env_of(late)["KEEP"] == "me"


def test_reinvocation_is_idempotent(second_webhook, cluster, api):
    wait_second_webhook_active(api, second_webhook)
    before = cluster.webhook_metrics()
    pod = unique(fixture_pod("velero-1.15-data-upload.json"), "idem")
    pod["metadata"]["labels"]["cluster-test/second"] = "annotation"
    stored = create_pod(api, pod)
    assert stored["metadata"]["annotations"]["cluster-test/seen"] == "yes"
    assert_injected(stored)
    assert len(stored["spec"]["initContainers"]) == 1
    after = cluster.webhook_metrics()
    # The re-invocation was answered as "already injected" (no second patch).
    assert metric(after, 'result="already_injected"') > metric(before, 'result="already_injected"')


def metric(text, label):
    total = 0.0
    for line in text.splitlines():
        if line.startswith("imds_broker_webhook_admissions_total") and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---------------------------------------------------------------------------------------------
# Pod Security


def set_enforce(cluster, ns, level):
    cluster.cp.kubectl("label", "namespace", ns, "--overwrite",
                       f"pod-security.kubernetes.io/enforce={level}")


def test_velero_namespace_level_admits_injected_pods(cluster, api):
    """Velero's installer sets `privileged` (every pod above was admitted under it); its
    data movers without hostPath volumes also fit `baseline` with the sidecar."""
    ns = api.get(f"/api/v1/namespaces/{VELERO_NS}")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    set_enforce(cluster, VELERO_NS, "baseline")
    try:
        pod = unique(fixture_pod("velero-1.18-maintenance-job.json"), "baseline")
        stored = create_pod(api, pod)
        assert_injected(stored)
        # Control: baseline really is enforced (a hostPath pod is refused).
        fsb = unique(fixture_pod("velero-1.17-pod-volume-backup.json"), "baseline-hostpath")
        with pytest.raises(ApiError) as err:
            create_pod(api, fsb)
        assert err.value.status == 403 and "violates PodSecurity" in err.value.message
    finally:
        set_enforce(cluster, VELERO_NS, "privileged")


def test_sidecar_alone_passes_restricted(cluster, api):
    injected = create_pod(api, unique(fixture_pod("velero-1.16-data-download.json"), "forrestricted"))
    sidecar = [c for c in injected["spec"]["initContainers"] if c["name"] == SIDECAR][0]
    token_vol = [v for v in injected["spec"]["volumes"] if v["name"] == "imds-broker-token"][0]
    api.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": "restricted-check", "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
    api.post("/api/v1/namespaces/restricted-check/serviceaccounts", {
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "velero-server"}})

    def pod_with(name, init, containers):
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                "spec": {"serviceAccountName": "velero-server", "restartPolicy": "Never",
                         "initContainers": init, "containers": containers,
                         "volumes": [token_vol]}}

    # The ServiceAccount admission plugin (re-run after the webhooks) gave every container the
    # pod's kube-api-access mount; the new pod gets its own.
    sidecar = copy.deepcopy(sidecar)
    sidecar["volumeMounts"] = [m for m in sidecar["volumeMounts"]
                               if not m["name"].startswith("kube-api-access-")]
    as_container = {k: v for k, v in sidecar.items() if k != "restartPolicy"}
    # Only the sidecar, as the pod's one container.
    create_pod(api, pod_with("sidecar-only", [], [as_container]), ns="restricted-check")
    # The sidecar as a native sidecar next to a restricted-clean app container.
    clean_app = {"name": "app", "image": "busybox:1.36", "securityContext": copy.deepcopy(
        sidecar["securityContext"])}
    create_pod(api, pod_with("native-sidecar", [sidecar], [clean_app]), ns="restricted-check")
    # Control: Velero's own app container (runAsUser 0 at pod level) is refused there.
    velero_app = copy.deepcopy(injected["spec"]["containers"][0])
    velero_app["volumeMounts"] = []
    bad = pod_with("velero-app", [], [velero_app])
    bad["spec"]["securityContext"] = {"runAsUser": 0}
    with pytest.raises(ApiError) as err:
        create_pod(api, bad, ns="restricted-check")
    assert err.value.status == 403 and "violates PodSecurity" in err.value.message


# ---------------------------------------------------------------------------------------------
# Webhook slow, webhook down (these stop the webhook: keep them last)


def test_slow_webhook_hits_the_api_server_timeout(cluster, api):
    """timeoutSeconds: 5 and failurePolicy: Fail (docs/velero-on-aks.md step 6): a webhook that
    does not answer in time fails the pod's creation after about 5 s, naming the webhook."""
    cluster.webhook.signal(signal.SIGSTOP)
    try:
        pod = unique(fixture_pod("velero-1.15-data-upload.json"), "slow")
        _, err, took = elapsed(lambda: create_pod(api, pod))
    finally:
        cluster.webhook.signal(signal.SIGCONT)
    assert err is not None, "pod created although the webhook never answered"
    assert 'failed calling webhook "data-upload.imds-broker.io"' in err.message, err.message
    assert "deadline exceeded" in err.message or "timeout" in err.message.lower(), err.message
    assert 4.5 <= took <= 15, took
    with pytest.raises(ApiError) as missing:
        api.get(pods_path(VELERO_NS, pod["metadata"]["name"]))
    assert missing.value.status == 404
    # Continued: it answers again.
    assert_injected(create_pod(api, unique(fixture_pod("velero-1.15-data-upload.json"), "after-slow")))


def test_stopped_webhook_refuses_data_mover_pods_only(cluster, api):
    cluster.stop_webhook()
    try:
        pod = unique(fixture_pod("velero-1.16-data-download.json"), "down")
        with pytest.raises(ApiError) as err:
            create_pod(api, pod)
        assert err.value.status >= 500 or err.value.status == 403, err.value.status
        msg = err.value.message
        assert "imds-broker" in msg and 'failed calling webhook "data-download.imds-broker.io"' in msg, msg
        # The blast radius is Velero's labelled pods: others are still admitted.
        other = unique(fixture_pod("velero-1.16-data-download.json"), "down-unlabelled")
        other["metadata"]["labels"] = {"app": "unrelated"}
        assert_untouched(create_pod(api, other))
    finally:
        cluster.start_webhook()
    assert_injected(create_pod(api, unique(fixture_pod("velero-1.16-data-download.json"), "back")))
