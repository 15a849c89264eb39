"""The Helm chart (charts/imds-broker), checked with the real helm and kustomize binaries
(built from tests/packaging/tools by scripts/test-packaging.sh):

- `helm lint --strict`; rendering without an image fails with a message;
- every rendered object valid against the Kubernetes JSON schemas (kubernetes-validate,
  strict), plus tests/validate_k8s.py's consistency checks (webhook <-> Service <->
  Deployment <-> PDB <-> RBAC <-> certificates);
- the chart's objects equal the kustomize overlays' object by object, after normalising what
  legitimately differs (Helm's release labels; settings the chart passes explicitly with the
  webhook's own defaults), so the two installs never drift;
- the values do what values.yaml says.
"""

import base64
import copy
import json
import os
import re
import shutil
import subprocess
import tempfile

import pytest
import yaml

from conftest import ROOT, cargo_version, env_path

import validate_k8s as vk  # tests/validate_k8s.py (conftest puts tests/ on sys.path)

CHART = ROOT / "charts" / "imds-broker"
RELEASE = "imds-broker"
NAMESPACE = "imds-broker"
REPO = "registry.example/imds-broker"
IMAGE = f"{REPO}:{cargo_version()}"
# Labels Helm adds to every object (and the instance label to selectors): release bookkeeping.
HELM_LABELS = {
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
}
# Labels every chart object carries; some deploy/ objects (cert-manager's) have none.
CHART_LABELS = HELM_LABELS | {"app.kubernetes.io/name", "app.kubernetes.io/component"}

HELM = env_path("IMDS_BROKER_PKG_HELM")
KUSTOMIZE = env_path("IMDS_BROKER_PKG_KUSTOMIZE")
BINARY = env_path("IMDS_BROKER_PKG_BINARY")

pytestmark = pytest.mark.skipif(
    not (HELM and KUSTOMIZE and BINARY),
    reason="run through scripts/test-packaging.sh (IMDS_BROKER_PKG_HELM/KUSTOMIZE/BINARY)",
)


def helm(*args, check=True):
    res = subprocess.run([str(HELM), *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{res.stderr}")
    return res


def template(*sets, namespace=NAMESPACE):
    args = ["template", RELEASE, str(CHART), "--namespace", namespace]
    for s in sets:
        args += ["--set", s]
    out = helm(*args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def kustomize(overlay, components=()):
    """The overlay rendered the way the README says: image set with `kustomize edit`, and
    `components` added with `kustomize edit add component`."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ROOT / "deploy", os.path.join(tmp, "deploy"))
        kdir = os.path.join(tmp, "deploy", "overlays", overlay)
        subprocess.run([str(KUSTOMIZE), "edit", "set", "image", f"imds-broker={IMAGE}"],
                       cwd=kdir, check=True, capture_output=True)
        for c in components:
            subprocess.run([str(KUSTOMIZE), "edit", "add", "component", f"../../components/{c}"],
                           cwd=kdir, check=True, capture_output=True)
        out = subprocess.run([str(KUSTOMIZE), "build", kdir], check=True,
                             capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def key(doc):
    return (doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"])


def by_key(docs):
    out = {}
    for d in docs:
        assert key(d) not in out, f"duplicate object {key(d)}"
        out[key(d)] = d
    return out


def webhook_defaults():
    """The webhook's defaults per environment variable, from `imds-broker webhook --help`."""
    text = subprocess.run([str(BINARY), "webhook", "--help"], capture_output=True, text=True,
                          check=True).stdout
    flat = re.sub(r"\s+", " ", text)
    defaults = {}
    for m in re.finditer(r"\[env: (IMDS_BROKER_[A-Z_]+)=?[^\]]*\](?: \[default: ([^\]]*)\])?", flat):
        default = m.group(2)
        # clap shows an empty default as [default: ""]
        defaults[m.group(1)] = "" if default == '""' else default
    assert "IMDS_BROKER_WEBHOOK_SIDECAR_IMAGE" in defaults, "help output not understood"
    return defaults


def env_map(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def normalise(doc, defaults, explicit):
    """Removes what legitimately differs between the chart and deploy/.

    explicit collects (env name, value) pairs the chart sets and deploy/ leaves at the
    webhook's default; the caller checks each equals that default."""
    doc = copy.deepcopy(doc)

    def strip_labels(labels):
        for k in HELM_LABELS:
            labels.pop(k, None)

    def walk(node):
        if isinstance(node, dict):
            for field in ("labels", "matchLabels"):
                if isinstance(node.get(field), dict):
                    strip_labels(node[field])
            if doc["kind"] == "Service" and isinstance(node.get("selector"), dict):
                strip_labels(node["selector"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    meta = doc["metadata"]
    if not meta.get("labels"):
        meta.pop("labels", None)
    if doc["kind"] == "Deployment":
        (c,) = doc["spec"]["template"]["spec"]["containers"]
        kept = []
        for e in c.get("env", []):
            if e["name"] in ("IMDS_BROKER_WEBHOOK_SIDECAR_IMAGE", "IMDS_BROKER_LOG_FORMAT"):
                kept.append(e)
            else:
                explicit.append((e["name"], e.get("value")))
        c["env"] = kept
    return doc


def cert_manager_labels_only(doc):
    """deploy/'s cert-manager objects carry no labels; the chart's carry its standard ones."""
    labels = doc["metadata"].get("labels", {})
    assert set(labels) <= CHART_LABELS, f"{key(doc)}: unexpected labels {labels}"
    doc = copy.deepcopy(doc)
    doc["metadata"].pop("labels", None)
    return doc


def assert_equivalent(chart_docs, kustomize_docs):
    defaults = webhook_defaults()
    explicit = []
    chart = {k: normalise(v, defaults, explicit) for k, v in by_key(chart_docs).items()}
    kust = {k: normalise(v, defaults, []) for k, v in by_key(kustomize_docs).items()}
    assert sorted(chart) == sorted(kust), (
        f"only in the chart: {sorted(set(chart) - set(kust))}; "
        f"only in deploy/: {sorted(set(kust) - set(chart))}"
    )
    for k in chart:
        a, b = chart[k], kust[k]
        if a["apiVersion"].startswith("cert-manager.io/"):
            a = cert_manager_labels_only(a)
        assert a == b, f"{k} differs:\nchart: {json.dumps(a, sort_keys=True)}\ndeploy: {json.dumps(b, sort_keys=True)}"
    # Every setting the chart passes explicitly is the webhook's own default.
    assert explicit, "the chart passes the webhook no explicit settings?"
    for name, value in explicit:
        assert name in defaults, f"{name}: not a webhook setting (not in `webhook --help`)"
        default = defaults[name]
        if name == "IMDS_BROKER_WEBHOOK_MATCH_LABELS":
            assert sorted(value.split(",")) == sorted(re.split(r"[ ,]+", default)), (name, value, default)
        else:
            assert value == (default or ""), f"{name}={value!r}, the webhook's default is {default!r}"


# ---------------------------------------------------------------------------------------


def test_chart_version_follows_cargo():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == cargo_version() and chart["appVersion"] == cargo_version()


def test_rules_copy_in_chart_is_the_same():
    assert (CHART / "files" / "imds-broker.rules.yaml").read_text() == (
        ROOT / "deploy" / "monitoring" / "imds-broker.rules.yml"
    ).read_text(), "cp deploy/monitoring/imds-broker.rules.yml charts/imds-broker/files/imds-broker.rules.yaml"


def test_helm_lint():
    res = helm("lint", "--strict", str(CHART), "--set", f"image.repository={REPO}")
    assert "0 chart(s) failed" in res.stdout, res.stdout


def test_render_without_image_fails_with_a_message():
    res = helm("template", RELEASE, str(CHART), check=False)
    assert res.returncode != 0
    assert "image.repository is required" in res.stderr, res.stderr
    assert "scripts/build-image" in res.stderr, res.stderr


def test_invalid_choices_fail_with_a_message():
    res = helm("template", RELEASE, str(CHART), "--set", f"image.repository={REPO}",
               "--set", "certificates.mode=manual", check=False)
    assert res.returncode != 0 and "certificates.mode must be" in res.stderr, res.stderr
    res = helm("template", RELEASE, str(CHART), "--set", f"image.repository={REPO}",
               "--set", "webhook.failurePolicy=Never", check=False)
    assert res.returncode != 0 and "webhook.failurePolicy must be" in res.stderr, res.stderr


ALL_ON = [
    f"image.repository={REPO}",
    "namespace.create=true",
    "networkPolicy.enabled=true",
    "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring",
    "monitoring.podMonitor.enabled=true",
    "monitoring.prometheusRule.enabled=true",
]


@pytest.mark.parametrize("mode", ["cert-manager", "self-signed"])
def test_rendered_objects_are_valid(mode):
    docs = template(*ALL_ON, f"certificates.mode={mode}")
    versions = vk.kube_versions()
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "MutatingWebhookConfiguration",
            "ClusterRole", "ClusterRoleBinding", "ServiceAccount", "NetworkPolicy",
            "PodMonitor", "PrometheusRule", "Namespace"} <= kinds, kinds
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # checked against the Prometheus Operator's types by test_monitoring.py
        vk.validate_doc(doc, versions)
    vk.check_workload(docs, True)
    vk.check_webhook_configuration(docs, vk.match_labels_from_source())
    if mode == "cert-manager":
        vk.check_cert_manager(docs)


def test_chart_equals_cert_manager_overlay():
    chart = template(f"image.repository={REPO}", "namespace.create=true")
    assert_equivalent(chart, kustomize("cert-manager"))


def test_network_policy_component_equals_the_charts():
    chart = template(f"image.repository={REPO}", "namespace.create=true",
                     "networkPolicy.enabled=true")
    docs = kustomize("cert-manager", components=["network-policy"])
    assert any(d["kind"] == "NetworkPolicy" for d in docs)
    assert_equivalent(chart, docs)


def test_chart_self_signed_equals_manual_tls_overlay_plus_its_certificate():
    chart = template(f"image.repository={REPO}", "namespace.create=true",
                     "certificates.mode=self-signed")
    secret = [d for d in chart if d["kind"] == "Secret"]
    assert len(secret) == 1 and secret[0]["metadata"]["name"] == "imds-broker-webhook-tls"
    chart = [d for d in chart if d["kind"] != "Secret"]
    (mwc,) = [d for d in chart if d["kind"] == "MutatingWebhookConfiguration"]
    bundles = {w["clientConfig"].pop("caBundle") for w in mwc["webhooks"]}
    assert len(bundles) == 1, "one CA for every webhook"
    assert_equivalent(chart, kustomize("manual-tls"))


def test_self_signed_certificate_is_served_for_the_service(tmp_path):
    docs = template(f"image.repository={REPO}", "certificates.mode=self-signed")
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    (mwc,) = [d for d in docs if d["kind"] == "MutatingWebhookConfiguration"]
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    ca_bundle = base64.b64decode(mwc["webhooks"][0]["clientConfig"]["caBundle"])
    assert ca_bundle == data["ca.crt"], "the caBundle is the Secret's CA"
    (tmp_path / "ca.crt").write_bytes(data["ca.crt"])
    (tmp_path / "tls.crt").write_bytes(data["tls.crt"])
    (tmp_path / "tls.key").write_bytes(data["tls.key"])
    host = "imds-broker-webhook.imds-broker.svc"
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), "-verify_hostname", host,
         "-purpose", "sslserver", str(tmp_path / "tls.crt")],
        capture_output=True, text=True,
    )
    assert verify.returncode == 0 and ": OK" in verify.stdout, verify.stdout + verify.stderr
    # The key belongs to the certificate.
    key_pub = subprocess.run(["openssl", "pkey", "-in", str(tmp_path / "tls.key"), "-pubout"],
                             capture_output=True, check=True).stdout
    cert_pub = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "tls.crt"), "-noout", "-pubkey"],
                              capture_output=True, check=True).stdout
    assert key_pub == cert_pub, "tls.key does not match tls.crt"


def deployment_env(docs):
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c, env_map(c)


def test_values_reach_the_webhook():
    docs = template(
        f"image.repository={REPO}", "image.digest=sha256:" + "ab" * 32,
        "sidecar.image=other.example/broker:9", "sidecar.allowResources={https://storage.azure.com/}",
        "sidecar.resources.limits.cpu=100m", "identity.clientId=11111111-2222-3333-4444-555555555555",
        "identity.tenantId=66666666-7777-8888-9999-000000000000", "identity.tokenExpiration=7200",
        "webhook.failurePolicy=Ignore", "webhook.namespaces={velero,backup}", "replicaCount=3",
        "webhook.matchLabels[0].name=custom", "webhook.matchLabels[0].key=example.com/custom",
    )
    container, env = deployment_env(docs)
    assert container["image"] == f"{REPO}@sha256:" + "ab" * 32
    assert env["IMDS_BROKER_WEBHOOK_SIDECAR_IMAGE"] == "other.example/broker:9"
    assert env["IMDS_BROKER_WEBHOOK_SIDECAR_ALLOW_RESOURCES"] == "https://storage.azure.com/"
    assert env["IMDS_BROKER_WEBHOOK_SIDECAR_PREFETCH"] == "https://storage.azure.com/"
    assert env["IMDS_BROKER_WEBHOOK_SIDECAR_CPU_LIMIT"] == "100m"
    assert env["IMDS_BROKER_WEBHOOK_CLIENT_ID"] == "11111111-2222-3333-4444-555555555555"
    assert env["IMDS_BROKER_WEBHOOK_TENANT_ID"] == "66666666-7777-8888-9999-000000000000"
    assert env["IMDS_BROKER_WEBHOOK_TOKEN_EXPIRATION"] == "7200"
    assert env["IMDS_BROKER_WEBHOOK_MATCH_LABELS"] == "example.com/custom"
    (mwc,) = [d for d in docs if d["kind"] == "MutatingWebhookConfiguration"]
    assert [w["name"] for w in mwc["webhooks"]] == ["custom.imds-broker.io"]
    (w,) = mwc["webhooks"]
    assert w["failurePolicy"] == "Ignore"
    assert w["objectSelector"]["matchExpressions"][0]["key"] == "example.com/custom"
    assert w["namespaceSelector"]["matchExpressions"][0]["values"] == ["velero", "backup"]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    assert dep["spec"]["replicas"] == 3


def test_release_namespace_is_used_everywhere():
    docs = template(f"image.repository={REPO}", namespace="backup-tools")
    for d in docs:
        if d["kind"] not in ("ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"):
            assert d["metadata"]["namespace"] == "backup-tools", key(d)
    (mwc,) = [d for d in docs if d["kind"] == "MutatingWebhookConfiguration"]
    assert {w["clientConfig"]["service"]["namespace"] for w in mwc["webhooks"]} == {"backup-tools"}
    assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == "backup-tools/imds-broker-webhook"
    (cert,) = [d for d in docs if d["kind"] == "Certificate" and not d["spec"].get("isCA")]
    assert "imds-broker-webhook.backup-tools.svc" in cert["spec"]["dnsNames"]


def test_optional_objects_are_off_by_default():
    kinds = {d["kind"] for d in template(f"image.repository={REPO}")}
    assert not kinds & {"NetworkPolicy", "PodMonitor", "PrometheusRule", "Namespace", "Secret"}, kinds


def test_prometheus_rule_holds_the_rules_file():
    docs = template(f"image.repository={REPO}", "monitoring.prometheusRule.enabled=true")
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    rules = yaml.safe_load((ROOT / "deploy" / "monitoring" / "imds-broker.rules.yml").read_text())
    assert rule["spec"] == rules


def test_refuses_clusters_without_native_sidecars():
    res = helm("template", RELEASE, str(CHART), "--set", f"image.repository={REPO}",
               "--kube-version", "1.28.0", check=False)
    assert res.returncode != 0 and "kubeVersion: >=1.29.0-0" in res.stderr, res.stderr
    helm("template", RELEASE, str(CHART), "--set", f"image.repository={REPO}", "--kube-version", "1.29.0")
