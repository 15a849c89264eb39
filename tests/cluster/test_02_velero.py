"""Velero's own objects (`velero install --dry-run -o yaml --use-node-agent`) and the pods Velero's
own code creates: the restore exposer's Expose for a DataDownload and the repository
maintenance Job (whose pod the real Job controller creates). Then the identity chain with the
API server's own service-account issuer: TokenRequest → fake Entra verifying with the API
server's JWKS → the broker, run as the injected sidecar spec says → a token served."""

import base64
import json
import os
import subprocess
import urllib.error
import urllib.request

import pytest

from checks import assert_injected, assert_untouched, env_of, make_target_pvc, wait_pod
from conftest import VELERO_NS, VELERO_SA, velero_bins
from harness import Proc, free_port, jwt_claims, pods_path, wait_for

VERSIONS = [v for v, _ in velero_bins()]


@pytest.fixture(scope="module", params=VERSIONS)
def velero(request, cluster):
    version = request.param
    cluster.install_velero(version)
    return version


def test_installed_objects(velero, cluster, api):
    ns = api.get(f"/api/v1/namespaces/{VELERO_NS}")
    labels = ns["metadata"]["labels"]
    # Velero's installer labels its namespace for the privileged Pod Security level.
    assert labels.get("pod-security.kubernetes.io/enforce") == "privileged", labels
    sa = api.get(f"/api/v1/namespaces/{VELERO_NS}/serviceaccounts/{VELERO_SA}")
    assert sa["metadata"]["annotations"]["azure.workload.identity/client-id"] == cluster.entra["client_id"]
    ds = api.get(f"/apis/apps/v1/namespaces/{VELERO_NS}/daemonsets/node-agent")
    assert len(ds["spec"]["template"]["spec"]["containers"]) == 1
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == VELERO_SA
    bsl = api.get(f"/apis/velero.io/v1/namespaces/{VELERO_NS}/backupstoragelocations/default")
    assert bsl["spec"]["provider"] == "azure"
    assert bsl["spec"]["config"]["useAAD"] == "true"
    dep = api.get(f"/apis/apps/v1/namespaces/{VELERO_NS}/deployments/velero")
    image = dep["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"velero/velero:{velero}", image


def test_server_and_node_agent_pods_are_not_injected(velero, api):
    """The Velero server pod (ReplicaSet controller) and the node-agent pod (DaemonSet
    controller) of `velero install` carry none of the webhook's label keys (no
    imds-broker.io/sidecar without the guide's values): the webhook is never called for them.
    1.15.0's maintenance Job pods copy the server's labels, hence the job-name exclusion."""
    server = wait_pod(api, VELERO_NS, "deploy=velero,!batch.kubernetes.io/job-name")
    agent = wait_pod(api, VELERO_NS, "name=node-agent")
    for pod in (server, agent):
        assert_untouched(pod)


@pytest.fixture(scope="module")
def restore_pod(velero, cluster, api):
    tag = velero.replace(".", "-")
    make_target_pvc(api, "app", f"data-{tag}")
    out = cluster.velero_driver(velero, "expose-restore", cluster.cp.kubeconfig,
                                f"restore-{tag}", "app", f"data-{tag}")
    return api.get(pods_path(VELERO_NS, out["pod"]))


def test_restore_exposer_pod_is_injected(velero, restore_pod, cluster):
    pod = restore_pod
    assert pod["metadata"]["labels"]["velero.io/data-download"] == pod["metadata"]["name"]
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "DataDownload"
    # What Velero copied from the node-agent DaemonSet is still there.
    app = pod["spec"]["containers"][0]
    assert app["command"][:3] == ["/velero", "data-mover", "restore"]
    assert pod["spec"]["securityContext"]["runAsUser"] == 0
    assert_injected(pod, client_id=cluster.entra["client_id"], tenant_id=cluster.entra["tenant_id"])


def test_maintenance_job_pod_from_the_job_controller_is_injected(velero, cluster, api):
    tag = velero.replace(".", "-")
    out = cluster.velero_driver(velero, "maintenance-job", cluster.cp.kubeconfig,
                                f"app-default-kopia-{tag}", "app", "default")
    job = api.get(f"/apis/batch/v1/namespaces/{VELERO_NS}/jobs/{out['job']}")
    pod = wait_pod(api, VELERO_NS, f"job-name={out['job']}")
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "Job"
    assert pod["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    assert pod["spec"]["containers"][0]["args"][0] == "repo-maintenance"
    labels = pod["metadata"]["labels"]
    if velero.startswith("v1.15."):
        # Velero 1.15 replaces the Job template's labels with the Velero server pod's labels
        # (repository/manager buildMaintenanceJob), so velero.io/repo-name is gone
        # (velero#8974): the Job controller's batch.kubernetes.io/job-name selects the pod.
        assert "velero.io/repo-name" not in labels and labels.get("deploy") == "velero", labels
    else:
        assert labels["velero.io/repo-name"], labels
    assert labels["batch.kubernetes.io/job-name"] == out["job"], labels
    assert_injected(pod, client_id=cluster.entra["client_id"])


# ---------------------------------------------------------------------------------------------
# The identity chain


def run_sidecar(cluster, pod, token_file, name):
    """The broker started with the injected sidecar's own args and env (as kubelet would run
    it), but with loopback ports of our choosing and the token file we minted."""
    sidecar = [c for c in pod["spec"]["initContainers"] if c["name"] == "imds-broker"][0]
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    port, admin = free_port(), free_port()
    env.update({
        "PATH": os.environ.get("PATH", ""), "RUST_LOG": "info",
        "IMDS_BROKER_LISTEN": f"127.0.0.1:{port}",
        "IMDS_BROKER_ADMIN_LISTEN": f"127.0.0.1:{admin}",
        "AZURE_FEDERATED_TOKEN_FILE": token_file,
        "AZURE_AUTHORITY_HOST": cluster.entra["authority"],
        "IMDS_BROKER_CA_FILE": cluster.entra["ca_file"],
    })
    proc = Proc(name, [cluster.broker_bin, *sidecar["args"]], cluster.dir, env=env).start()
    wait_for(f"{name} /readyz", lambda: urllib.request.urlopen(
        f"http://127.0.0.1:{admin}/readyz", timeout=2).status == 200, 30,
        proc=proc.popen, log=proc.log)
    return proc, port


def app_service_get(port, header, resource="https://storage.azure.com/"):
    url = (f"http://127.0.0.1:{port}/msi/token?api-version=2019-08-01&resource={resource}")
    req = urllib.request.Request(url, headers={"X-IDENTITY-HEADER": header})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def projected_token(cluster, pod):
    """What kubelet would write into the sidecar's projected volume: a TokenRequest for the
    pod's ServiceAccount, bound to the pod, with the volume's audience and lifetime."""
    vol = [v for v in pod["spec"]["volumes"] if v["name"] == "imds-broker-token"][0]
    sat = vol["projected"]["sources"][0]["serviceAccountToken"]
    return cluster.cp.token_request(VELERO_NS, pod["spec"]["serviceAccountName"],
                                    audiences=[sat["audience"]],
                                    seconds=sat["expirationSeconds"], bound_pod=pod)


def test_token_request_claims(restore_pod, cluster):
    token = projected_token(cluster, restore_pod)
    claims = jwt_claims(token)
    assert claims["iss"] == cluster.cp.issuer
    assert claims["sub"] == f"system:serviceaccount:{VELERO_NS}:{VELERO_SA}"
    assert claims["aud"] == ["api://AzureADTokenExchange"]
    assert claims["kubernetes.io"]["pod"]["name"] == restore_pod["metadata"]["name"]


def test_identity_chain_serves_a_token(velero, restore_pod, cluster):
    token_file = cluster.cp.write_secret_file(f"sidecar-{velero}.token",
                                              projected_token(cluster, restore_pod))
    calls_before = cluster.entra_calls()
    proc, port = run_sidecar(cluster, restore_pod, token_file, f"sidecar-{velero}")
    try:
        header = env_of(restore_pod["spec"]["containers"][0])["IDENTITY_HEADER"]
        # Velero's spelling of Storage (no slash): the injected prefetch already holds it.
        for resource in ("https://storage.azure.com", "https://management.core.windows.net/"):
            status, body = app_service_get(port, header, resource)
            assert status == 200, body
            access = jwt_claims(body["access_token"])
            assert access["aud"].rstrip("/") == resource.rstrip("/")
            assert access["appid"] == cluster.entra["client_id"]
            assert access["tid"] == cluster.entra["tenant_id"]
            assert body["client_id"] == cluster.entra["client_id"]
        # One call for the prefetched Storage token (the request above was a hit or joined
        # it), one for ARM: no more.
        assert cluster.entra_calls() == calls_before + 2
        # The wrong header is refused (the app container's header is the one that works).
        status, _ = app_service_get(port, "not-the-header")
        assert status in (400, 401, 403)
    finally:
        proc.stop()


def test_identity_chain_refuses_another_service_account(velero, restore_pod, cluster, api):
    """Entra's subject check is real: a token of another ServiceAccount of the same issuer
    (signed by the same API server key) is refused with AADSTS70021."""
    other = f"not-velero-{velero.replace('.', '-')}"
    api.post(f"/api/v1/namespaces/{VELERO_NS}/serviceaccounts",
             {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": other}})
    token = cluster.cp.token_request(VELERO_NS, other, audiences=["api://AzureADTokenExchange"])
    token_file = cluster.cp.write_secret_file(f"other-{velero}.token", token)
    proc, port = run_sidecar(cluster, restore_pod, token_file, f"sidecar-other-{velero}")
    try:
        header = env_of(restore_pod["spec"]["containers"][0])["IDENTITY_HEADER"]
        status, body = app_service_get(port, header)
        assert status >= 400, body
        assert "AADSTS70021" in json.dumps(body), body
    finally:
        proc.stop()


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_identity_chain_refuses_a_key_the_issuer_does_not_publish(velero, restore_pod, cluster):
    """The signature is checked against the API server's JWKS: an assertion with the right
    issuer, subject and audience, but signed by a key the API server does not publish, is
    refused (AADSTS700027)."""
    real = jwt_claims(projected_token(cluster, restore_pod))
    header = json.loads(base64.urlsafe_b64decode(
        projected_token(cluster, restore_pod).split(".")[0] + "=="))
    d = os.path.join(cluster.dir, f"foreign-{velero}")
    os.makedirs(d, exist_ok=True)
    subprocess.run(["openssl", "genrsa", "-out", "k.pem", "2048"], cwd=d, check=True,
                   capture_output=True)
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(real).encode())}"
    sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", "k.pem"], cwd=d, check=True,
                         input=signing_input.encode(), capture_output=True).stdout
    forged = f"{signing_input}.{b64url(sig)}"
    token_file = cluster.cp.write_secret_file(f"forged-{velero}.token", forged)
    proc, port = run_sidecar(cluster, restore_pod, token_file, f"sidecar-forged-{velero}")
    try:
        header_value = env_of(restore_pod["spec"]["containers"][0])["IDENTITY_HEADER"]
        status, body = app_service_get(port, header_value)
        assert status >= 400, body
        assert "AADSTS700027" in json.dumps(body), body
    finally:
        proc.stop()


def test_no_secret_in_any_log(velero, restore_pod, cluster):
    """Tokens and the identity header never reach a log: every token file this run wrote and
    every IDENTITY_HEADER the webhook handed out are searched for in every log."""
    secrets = []
    for name in os.listdir(cluster.dir):
        if name.endswith(".token"):
            with open(os.path.join(cluster.dir, name)) as f:
                secrets.append(f.read().strip())
    secrets.append(env_of(restore_pod["spec"]["containers"][0])["IDENTITY_HEADER"])
    assert len(secrets) >= 3
    logs = [n for n in os.listdir(cluster.dir) if n.endswith(".log")]
    assert "imds-broker-webhook.log" in logs and any(n.startswith("sidecar-") for n in logs)
    for name in logs:
        if name.startswith(("kube-", "etcd")):
            continue  # the control plane's own logs: not ours to judge
        with open(os.path.join(cluster.dir, name), errors="replace") as f:
            text = f.read()
        for secret in secrets:
            assert secret not in text, f"a secret appears in {name}"
