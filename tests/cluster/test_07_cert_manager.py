"""charts/imds-broker installed by the real `helm` with its DEFAULT certificates mode,
cert-manager, against the real cert-manager (the `cert_manager` fixture: its own chart, its
controller, cainjector and webhook: our mains in tests/cluster/cert-manager linked against the
pinned release module): the CA and the serving certificate issued, the CA injected, admission
through the chart's own MutatingWebhookConfiguration with the issued certificate, then renewals.

As in test_04_helm.py, kubelet's part is played here: one of the Deployment's pods is marked
Ready at an address on `lo` where `imds-broker webhook` runs with the Deployment's args and env,
and the Secret its `tls` volume mounts is projected into the webhook's TLS directory the way
kubelet updates a Secret volume (harness.project_secret), after the Secret changes. The webhook
notices the new files on its own (--tls-reload-interval, the chart leaves the default).
"""

import base64
import json
import os
import re
import subprocess
import threading
import time
import urllib.request

import pytest

from checks import (assert_injected, create_annotated_velero_sa, create_pod, ensure_namespace,
                    fixture_pod, get_if_exists)
from conftest import ROOT, run_helm
from harness import (ApiError, make_pod_ready, project_secret, served_certificate, verify_chain,
                     wait_for, wait_for_ready_endpoint, x509_fields)

RELEASE = "ibcm"
NS = "imds-broker-cm"
APP_NS = "cm-velero"
CONTROL_NS = "cm-control"
FULL = f"{RELEASE}-imds-broker"
WEBHOOK = f"{FULL}-webhook"  # Deployment, Service and serving Certificate
CA_CERT = f"{FULL}-ca"  # the CA Certificate and its Secret
LOCAL_IP = "10.255.254.3"
CHART_DIR = os.path.join(ROOT, "charts", "imds-broker")
# No certificates.mode: the chart's default is what is under test.
VALUES = ["--set", "image.repository=registry.example/imds-broker",
          "--set", f"webhook.namespaces={{{APP_NS}}}"]
# Pods created during a renewal: bounded in number and time.
MAX_PODS = 1000
MAX_SECONDS = 120


def b64(pem):
    return base64.b64encode(pem.encode()).decode()


def unb64(data):
    return base64.b64decode(data).decode()


@pytest.fixture(scope="module")
def release(cluster, cert_manager, local_addresses):
    api = cluster.api
    local_addresses.add(LOCAL_IP)
    create_annotated_velero_sa(api, APP_NS, cluster.entra)
    out = run_helm(cluster, "install", RELEASE, CHART_DIR, "-n", NS, "--create-namespace",
                   *VALUES, "-o", "json")
    state = {"release": json.loads(out), "cm": cert_manager}
    try:
        yield state
    finally:
        if state.get("webhook"):
            state["webhook"].stop()
        # The release's webhook configuration would refuse data-mover pods in APP_NS.
        subprocess.run([os.environ["HELM_BIN"], "--kubeconfig", cluster.cp.kubeconfig,
                        "uninstall", RELEASE, "-n", NS], capture_output=True)


def tls_secret_name(api):
    """The Secret the Deployment's `tls` volume mounts."""
    dep = api.get(f"/apis/apps/v1/namespaces/{NS}/deployments/{WEBHOOK}")
    volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    return volume["secret"]["secretName"]


def secret_data(api, name):
    return api.get(f"/api/v1/namespaces/{NS}/secrets/{name}")["data"]


def ca_bundles(api):
    mwc = api.get(f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{FULL}")
    return [w["clientConfig"].get("caBundle") for w in mwc["webhooks"]]


def test_the_default_mode_issues_the_ca_and_the_serving_certificate(release, cluster):
    api, cm = cluster.api, release["cm"]
    values = json.loads(run_helm(cluster, "get", "values", RELEASE, "-n", NS, "--all", "-o", "json"))
    assert values["certificates"]["mode"] == "cert-manager"
    cm.wait_certificate_ready(NS, CA_CERT, 60)
    cm.wait_certificate_ready(NS, WEBHOOK, 60)

    ca_secret = secret_data(api, CA_CERT)
    ca_pem = unb64(ca_secret["tls.crt"])
    ca = x509_fields(ca_pem, cluster.dir)
    assert ca["ca"] and ca["subject"] == ca["issuer"] == f"CN={FULL}-webhook-ca", ca

    name = tls_secret_name(api)
    assert name == f"{FULL}-webhook-tls"
    tls = secret_data(api, name)
    assert sorted(tls) == ["ca.crt", "tls.crt", "tls.key"], sorted(tls)
    assert unb64(tls["ca.crt"]) == ca_pem
    leaf_pem = unb64(tls["tls.crt"])
    leaf = x509_fields(leaf_pem, cluster.dir)
    svc = f"{WEBHOOK}.{NS}.svc"
    assert leaf["sans"] == [f"DNS:{svc}", f"DNS:{svc}.cluster.local"], leaf
    assert not leaf["ca"] and leaf["issuer"] == ca["subject"], leaf
    ok, out = verify_chain(leaf_pem, ca_pem, cluster.dir)
    assert ok, f"the serving certificate does not chain to the CA as a TLS server: {out}"

    # The cainjector put that CA into every webhook entry (inject-ca-from the Certificate).
    wait_for("the CA in every caBundle", lambda: set(ca_bundles(api)) == {b64(ca_pem)}, 60,
             proc=cm.procs["cainjector"].popen, log=cm.procs["cainjector"].log)
    # One entry per default match label of the chart (seven).
    assert len(ca_bundles(api)) == 7


def test_admission_with_the_issued_certificate(release, cluster):
    api = cluster.api
    make_pod_ready(api, NS, f"app.kubernetes.io/instance={RELEASE}", LOCAL_IP)
    proc, container, tls_dir, port = cluster.run_webhook_as_deployed(
        "imds-broker-webhook-cm", NS, WEBHOOK, LOCAL_IP)
    release.update(webhook=proc, tls_dir=tls_dir, port=port, admin_port=int(
        proc.env["IMDS_BROKER_WEBHOOK_ADMIN_LISTEN"].rsplit(":", 1)[1]))
    wait_for_ready_endpoint(api, NS, WEBHOOK, LOCAL_IP)

    served = served_certificate(LOCAL_IP, port)
    assert served == unb64(secret_data(api, tls_secret_name(api))["tls.crt"])
    stored = create_pod(api, data_mover_pod("cm-data-upload"), ns=APP_NS)
    assert_injected(stored, cluster.entra["client_id"], cluster.entra["tenant_id"])


def data_mover_pod(name):
    pod = fixture_pod("velero-1.15-data-upload.json")
    pod["metadata"].update(namespace=APP_NS, name=name)
    pod["metadata"].pop("generateName", None)
    return pod


class Admissions:
    """Velero data-mover pods created one after another from a thread (server-side dry-run:
    admitted and mutated through the webhook, never stored), until stopped or MAX_PODS /
    MAX_SECONDS. Each result is (time, None) when the pod was injected, (time, error) if not."""

    def __init__(self, cluster, name):
        self.api, self.cluster, self.name = cluster.api, cluster, name
        self.results = []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        deadline = time.monotonic() + MAX_SECONDS
        pod = data_mover_pod(self.name)
        while not self.stop_event.is_set() and len(self.results) < MAX_PODS \
                and time.monotonic() < deadline:
            try:
                out = create_pod(self.api, pod, ns=APP_NS, query={"dryRun": "All"}, timeout=15)
                assert_injected(out, self.cluster.entra["client_id"])
                self.results.append((time.monotonic(), None))
            except Exception as e:  # noqa: BLE001 - every refusal is recorded and asserted on
                self.results.append((time.monotonic(), f"{type(e).__name__}: {e}"))
            self.stop_event.wait(0.02)  # pacing, not synchronisation: ~40 pods/s at most

    def __enter__(self):
        self.thread.start()
        wait_for("the first admissions", lambda: len(self.results) >= 5, 30)
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join(30)

    def after(self, t):
        return [r for r in self.results if r[0] > t]

    def refused(self):
        return [err for _, err in self.results if err]


def established(port, ip=LOCAL_IP):
    """The client ends of the TCP connections established to ip:port (the API server's)."""
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )", "src", ip],
                         capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def reloads(admin_port):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("imds_broker_webhook_tls_reloads_total") and 'result="success"' in line)


def kubelet_sync(api, release, old_crt):
    """Waits for the Secret to carry a new tls.crt, then projects it into the webhook's TLS
    directory as kubelet would. Returns the new Secret data."""
    name = tls_secret_name(api)
    data = wait_for("the Secret's new certificate", lambda: (
        lambda d: d if d["tls.crt"] != old_crt else None)(secret_data(api, name)), 60)
    project_secret(release["tls_dir"], data)
    return data


def wait_served(release, old_pem, cluster):
    """Until the webhook serves a certificate other than old_pem (it reloads on its own)."""
    proc = release["webhook"]
    return wait_for("the webhook serving the new certificate", lambda: (
        lambda pem: pem if pem != old_pem else None)(served_certificate(LOCAL_IP, release["port"])),
        30, proc=proc.popen, log=proc.log)


def test_serving_certificate_renewal_refuses_no_admission(release, cluster):
    """`cmctl renew` of the serving Certificate while pods are created: every pod admitted and
    injected, before, during and after; the webhook serves the new certificate (another serial,
    same CA, caBundle unchanged), and a pod admitted over a TLS connection opened after the
    reload passes too."""
    api, cm = cluster.api, release["cm"]
    assert release.get("webhook"), "needs test_admission_with_the_issued_certificate"
    before = secret_data(api, tls_secret_name(api))
    old_pem = served_certificate(LOCAL_IP, release["port"])
    assert old_pem == unb64(before["tls.crt"])
    old = x509_fields(old_pem, cluster.dir)
    bundles = ca_bundles(api)
    reloads_before = reloads(release["admin_port"])

    with Admissions(cluster, "cm-renewal") as adm:
        revision = cm.renew(NS, WEBHOOK)
        cm.wait_certificate_ready(NS, WEBHOOK, 60, revision=revision + 1)
        after = kubelet_sync(api, release, before["tls.crt"])
        new_pem = wait_served(release, old_pem, cluster)
        switched = time.monotonic()
        # Connections opened before the switch carry the old certificate's session.
        old_conns = established(release["port"])
        wait_for("admissions after the switch", lambda: len(adm.after(switched)) >= 20, 30)
    assert not adm.refused(), f"{len(adm.refused())} of {len(adm.results)} refused: {adm.refused()[:3]}"

    new = x509_fields(new_pem, cluster.dir)
    assert new_pem == unb64(after["tls.crt"])
    assert new["serial"] != old["serial"], (old, new)
    assert new["sans"] == old["sans"] and new["issuer"] == old["issuer"]
    assert after["ca.crt"] == before["ca.crt"] and after["tls.key"] != before["tls.key"]
    ok, out = verify_chain(new_pem, unb64(after["ca.crt"]), cluster.dir)
    assert ok, out
    assert ca_bundles(api) == bundles
    assert reloads(release["admin_port"]) == reloads_before + 1

    # The API server verifies the new certificate on a new connection: once the webhook has
    # closed the idle ones from before (its request timeout), a pod is admitted again.
    wait_for("the connections from before the switch to close",
             lambda: not (established(release["port"]) & old_conns), 30)
    stored = create_pod(api, data_mover_pod("cm-after-renewal"), ns=APP_NS)
    assert_injected(stored, cluster.entra["client_id"])
    print(f"\nrenewal: {len(adm.results)} pods admitted, "
          f"{len(adm.after(switched))} after the switch, 0 refused")


def new_ca_only_control(api, new_ca):
    """The control: the chart's first webhook entry in a configuration of its own whose
    caBundle is the new CA alone (what the cainjector wrote before CAInjectorMerging, the
    default before cert-manager 1.19), for a namespace of its own, refuses a data-mover pod
    while the webhook serves its old certificate. Returns the refusal; deletes what it made."""
    ensure_namespace(api, CONTROL_NS)
    if not get_if_exists(api, f"/api/v1/namespaces/{CONTROL_NS}/serviceaccounts/velero-server"):
        api.post(f"/api/v1/namespaces/{CONTROL_NS}/serviceaccounts", {
            "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "velero-server"}})
    mwc = api.get(f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{FULL}")
    entry = json.loads(json.dumps(mwc["webhooks"][0]))
    entry["clientConfig"]["caBundle"] = b64(new_ca)
    entry["namespaceSelector"]["matchExpressions"][0]["values"] = [CONTROL_NS]
    path = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
    api.post(path, {"apiVersion": "admissionregistration.k8s.io/v1",
                    "kind": "MutatingWebhookConfiguration",
                    "metadata": {"name": f"{FULL}-control"}, "webhooks": [entry]})
    pod = data_mover_pod("cm-new-ca-only")
    pod["metadata"]["namespace"] = CONTROL_NS

    def refused():
        try:  # until the API server's informer has the new configuration
            create_pod(api, pod, ns=CONTROL_NS, query={"dryRun": "All"})
        except ApiError as e:
            if "imds-broker.io" not in e.message:
                raise  # not the webhook's refusal: wait_for reports it if it persists
            return e.message
    try:
        return wait_for("the control's refusal", refused, 30)
    finally:
        api.delete(f"{path}/{FULL}-control")


def bundle_serials(cluster, b64_bundle):
    """The serials of the certificates in a base64 PEM bundle, in order."""
    pem = unb64(b64_bundle)
    certs = re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n?", pem, re.S)
    return [x509_fields(c, cluster.dir)["serial"] for c in certs]


def test_ca_renewal_refuses_no_admission(release, cluster):
    """`cmctl renew` of the CA Certificate (a new key: cert-manager's default rotationPolicy
    Always), then of the serving Certificate, as its next renewal would, while pods are
    created. The cainjector merges (CAInjectorMerging, GA in cert-manager 1.21): every caBundle
    keeps the old CA next to the new one until the old one expires, so the old serving
    certificate is still trusted while kubelet has not yet synced the Secret volume (it syncs
    a minute or so later; the cainjector acts at once, so the files are projected after the
    caBundle changed), and the new one once the webhook has reloaded. Meanwhile the control
    (new_ca_only_control) shows that without the old CA the same pod is refused."""
    api, cm = cluster.api, release["cm"]
    assert release.get("webhook"), "needs test_admission_with_the_issued_certificate"
    before = secret_data(api, tls_secret_name(api))
    old_ca = unb64(secret_data(api, CA_CERT)["tls.crt"])
    old_ca_serial = x509_fields(old_ca, cluster.dir)["serial"]
    old_pem = served_certificate(LOCAL_IP, release["port"])
    bundles = ca_bundles(api)

    with Admissions(cluster, "cm-ca-renewal") as adm:
        revision = cm.renew(NS, CA_CERT)
        cm.wait_certificate_ready(NS, CA_CERT, 60, revision=revision + 1)
        new_ca = unb64(wait_for("the new CA", lambda: (
            lambda d: d["tls.crt"] if unb64(d["tls.crt"]) != old_ca else None)(
                secret_data(api, CA_CERT)), 60))
        new_ca_serial = x509_fields(new_ca, cluster.dir)["serial"]
        # The serving Secret still names the old CA: nothing the API server sees has changed.
        assert ca_bundles(api) == bundles
        revision = cm.renew(NS, WEBHOOK)
        cm.wait_certificate_ready(NS, WEBHOOK, 60, revision=revision + 1)
        merged = [old_ca_serial, new_ca_serial]
        wait_for("the cainjector's merged caBundle (old CA, new CA)", lambda: all(
            bundle_serials(cluster, b) == merged for b in ca_bundles(api)), 60,
            proc=cm.procs["cainjector"].popen, log=cm.procs["cainjector"].log)
        merged_at = time.monotonic()
        # The webhook still serves the old certificate: admitted through the old CA's entry.
        wait_for("admissions with the merged caBundle and the old certificate",
                 lambda: len(adm.after(merged_at)) >= 10, 30)
        assert served_certificate(LOCAL_IP, release["port"]) == old_pem
        merged_bundles = ca_bundles(api)
        refusal = new_ca_only_control(api, new_ca)
        after = kubelet_sync(api, release, before["tls.crt"])
        new_pem = wait_served(release, old_pem, cluster)
        switched = time.monotonic()
        old_conns = established(release["port"])
        wait_for("admissions after the switch", lambda: len(adm.after(switched)) >= 20, 30)
    refused = adm.refused()
    assert not refused, f"{len(refused)} of {len(adm.results)} refused, e.g. {refused[0]}"
    assert ca_bundles(api) == merged_bundles
    assert "data-upload.imds-broker.io" in refusal and "x509" in refusal, refusal

    assert unb64(after["ca.crt"]) == new_ca and new_pem == unb64(after["tls.crt"])
    assert verify_chain(new_pem, new_ca, cluster.dir)[0]
    assert not verify_chain(new_pem, old_ca, cluster.dir)[0]
    # A new connection: the API server verifies the new certificate against the merged bundle.
    wait_for("the connections from before the switch to close",
             lambda: not (established(release["port"]) & old_conns), 30)
    assert_injected(create_pod(api, data_mover_pod("cm-after-ca-renewal"), ns=APP_NS),
                    cluster.entra["client_id"])
    print(f"\nCA renewal: {len(adm.results)} pods admitted, {len(adm.after(merged_at))} with "
          f"the merged caBundle, {len(adm.after(switched))} after the switch, 0 refused; "
          f"control: {refusal[:300]}")
