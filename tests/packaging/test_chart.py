"""The Helm chart (charts/imds-broker), checked with the real helm and kustomize binaries
(built from tests/packaging/tools by scripts/test-packaging.sh):

- `helm lint --strict`; rendering without an image fails with a message;
- every rendered object valid against the Kubernetes JSON schemas (kubernetes-validate,
  strict), plus tests/validate_k8s.py's consistency checks (webhook <-> Service <->
  Deployment <-> PDB <-> RBAC <-> certificates);
- the chart's objects equal the kustomize overlays' object by object, after normalising what
  legitimately differs (Helm's release labels; settings the chart passes explicitly with the
  webhook's own defaults), so the two installs never drift;
- the values do what values.yaml says;
- node mode (mode=node): valid objects that agree with each other (validate_k8s's node
  checks: host network, no declared ports, env order, Roles only), equal to deploy/node, the
  identity-header Secret's choices, and NOTES.txt printing what `imds-broker velero-env` prints;
- values.schema.json: a misspelt key or a value out of range fails the render, and every
  example in values.yaml's comments renders;
- the certificates: self-signed mode's lookups (kept, rotated with both CAs trusted, renewed
  before expiry) through the real helm against a stand-in API server (fake_apiserver.py), and
  manual mode equal to deploy/overlays/manual-tls;
- the PrometheusRule naming the release's webhook Deployment, proven with `promtool test rules`.
"""

import base64
import copy
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile

import pytest
import yaml

from conftest import ROOT, cargo_version, env_path
from fake_apiserver import FakeAPIServer

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


def helm(*args, check=True, cwd=None):
    res = subprocess.run([str(HELM), *args], capture_output=True, text=True, cwd=cwd)
    if check and res.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{res.stderr}")
    return res


def template(*sets, namespace=NAMESPACE, release=RELEASE, chart=CHART):
    args = ["template", release, str(chart), "--namespace", namespace]
    for s in sets:
        args += ["--set", s]
    out = helm(*args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def kustomize(overlay, components=(), edits=(), path=None):
    """The overlay rendered the way the README says: image set with `kustomize edit`,
    `components` added with `kustomize edit add component`, then any further `kustomize edit`
    argument lists in `edits`. `path`: a directory under deploy/ instead of overlays/OVERLAY."""
    res = kustomize_run(overlay, components, edits, path)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def kustomize_run(overlay, components=(), edits=(), path=None, set_image=True):
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ROOT / "deploy", os.path.join(tmp, "deploy"))
        kdir = os.path.join(tmp, "deploy", *(path or f"overlays/{overlay}").split("/"))
        if set_image:
            subprocess.run([str(KUSTOMIZE), "edit", "set", "image", f"imds-broker={IMAGE}"],
                           cwd=kdir, check=True, capture_output=True)
        for c in components:
            subprocess.run([str(KUSTOMIZE), "edit", "add", "component", f"../../components/{c}"],
                           cwd=kdir, check=True, capture_output=True)
        for edit in edits:
            subprocess.run([str(KUSTOMIZE), "edit", *edit], cwd=kdir, check=True, capture_output=True)
        return subprocess.run([str(KUSTOMIZE), "build", kdir], capture_output=True, text=True)


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


@pytest.mark.parametrize("mode", ["sidecar", "node"])
def test_helm_lint(mode):
    res = helm("lint", "--strict", str(CHART), "--set", f"image.repository={REPO}", "--set", f"mode={mode}",
               "--set", "identity.clientId=c", "--set", "identity.tenantId=t")
    assert "0 chart(s) failed" in res.stdout, res.stdout


def test_render_without_image_fails_with_a_message():
    res = helm("template", RELEASE, str(CHART), check=False)
    assert res.returncode != 0
    assert "image.repository is required" in res.stderr, res.stderr
    assert "scripts/build-image" in res.stderr, res.stderr


def render_fails(*sets, message):
    """helm template with these --set values fails, and stderr holds every part of message."""
    res = helm("template", RELEASE, str(CHART), "--set", f"image.repository={REPO}",
               *[a for s in sets for a in ("--set", s)], check=False)
    parts = [message] if isinstance(message, str) else message
    assert res.returncode != 0 and all(p in res.stderr for p in parts), (sets, res.stderr)
    return res.stderr


def test_invalid_choices_fail_with_a_message():
    """values.schema.json names the value and the allowed choices."""
    render_fails("certificates.mode=acme",
                 message=["/certificates/mode", "'cert-manager', 'self-signed', 'manual'"])
    render_fails("webhook.failurePolicy=Never", message=["/webhook/failurePolicy", "'Fail', 'Ignore'"])
    render_fails("webhook.missingIdentity=allow", message=["/webhook/missingIdentity", "'refuse', 'admit'"])


ALL_ON = [
    f"image.repository={REPO}",
    "namespace.create=true",
    "networkPolicy.enabled=true",
    "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring",
    "monitoring.podMonitor.enabled=true",
    "monitoring.prometheusRule.enabled=true",
]


@pytest.mark.parametrize("mode", ["cert-manager", "self-signed", "manual"])
def test_rendered_objects_are_valid(mode, test_ca):
    docs = template(*ALL_ON, f"certificates.mode={mode}", *(
        [f"certificates.manual.caBundle={base64.b64encode(test_ca['ca.crt']).decode()}"] if mode == "manual" else []))
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


def test_sidecar_pull_secrets_and_missing_identity_reach_the_webhook():
    """Rendered only when set (as the chart's other optional settings), so the default install
    equals deploy/ and leaves the webhook's defaults (no pull secrets; refuse)."""
    _, env = deployment_env(template(f"image.repository={REPO}"))
    assert "IMDS_BROKER_WEBHOOK_SIDECAR_IMAGE_PULL_SECRETS" not in env
    assert "IMDS_BROKER_WEBHOOK_MISSING_IDENTITY" not in env
    docs = template(f"image.repository={REPO}", "sidecar.imagePullSecrets[0]=acr-pull",
                    "sidecar.imagePullSecrets[1].name=other-pull", "webhook.missingIdentity=admit",
                    "imagePullSecrets[0].name=webhook-pull")
    container, env = deployment_env(docs)
    assert env["IMDS_BROKER_WEBHOOK_SIDECAR_IMAGE_PULL_SECRETS"] == "acr-pull,other-pull"
    assert env["IMDS_BROKER_WEBHOOK_MISSING_IDENTITY"] == "admit"
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    # The top-level imagePullSecrets are the webhook pods' own, and only theirs.
    assert dep["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "webhook-pull"}]
    render_fails("sidecar.imagePullSecrets[0].nmae=x", message="/sidecar/imagePullSecrets/0")
    _, env = deployment_env(template(f"image.repository={REPO}", "webhook.missingIdentity=refuse"))
    assert "IMDS_BROKER_WEBHOOK_MISSING_IDENTITY" not in env


def test_default_match_labels_cover_every_velero_pod_kind():
    docs = template(f"image.repository={REPO}")
    _, env = deployment_env(docs)
    keys = ["velero.io/data-upload", "velero.io/data-download", "velero.io/pod-volume-backup",
            "velero.io/pod-volume-restore", "velero.io/repo-name", "batch.kubernetes.io/job-name",
            "imds-broker.io/sidecar"]
    assert env["IMDS_BROKER_WEBHOOK_MATCH_LABELS"] == ",".join(keys)
    (mwc,) = [d for d in docs if d["kind"] == "MutatingWebhookConfiguration"]
    assert [w["objectSelector"]["matchExpressions"][0]["key"] for w in mwc["webhooks"]] == keys
    assert [w["name"] for w in mwc["webhooks"]][-2:] == ["job.imds-broker.io", "opt-in.imds-broker.io"]


def test_webhook_pod_survives_probes_and_pressure():
    """Readiness tolerates a slow probe (failureThreshold 3) and the pods get a critical
    priority class by default, which can be turned off."""
    docs = template(f"image.repository={REPO}")
    container, _ = deployment_env(docs)
    assert container["readinessProbe"]["failureThreshold"] == 3
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    assert dep["spec"]["template"]["spec"]["priorityClassName"] == "system-cluster-critical"
    (dep,) = [d for d in template(f"image.repository={REPO}", "priorityClassName=") if d["kind"] == "Deployment"]
    assert "priorityClassName" not in dep["spec"]["template"]["spec"]


def pdb_spec(*sets):
    (pdb,) = [d for d in template(f"image.repository={REPO}", *sets) if d["kind"] == "PodDisruptionBudget"]
    return pdb["spec"]


def test_pdb_never_blocks_a_drain():
    """maxUnavailable 1 by default, with any replica count; a minAvailable that leaves no
    replica to evict fails the render instead of blocking every node drain."""
    for replicas in (1, 2, 5):
        spec = pdb_spec(f"replicaCount={replicas}")
        assert spec["maxUnavailable"] == 1 and "minAvailable" not in spec, spec
    spec = pdb_spec("podDisruptionBudget.minAvailable=1")
    assert spec["minAvailable"] == 1 and "maxUnavailable" not in spec, spec
    assert pdb_spec("replicaCount=3", "podDisruptionBudget.minAvailable=50%")["minAvailable"] == "50%"
    for sets in (["replicaCount=1", "podDisruptionBudget.minAvailable=1"],
                 ["podDisruptionBudget.minAvailable=2"],
                 ["replicaCount=1", "podDisruptionBudget.minAvailable=50%"],
                 ["podDisruptionBudget.minAvailable=100%"]):
        render_fails(*sets, message=["podDisruptionBudget.minAvailable", "must be less than replicaCount",
                                     "node drains"])
    render_fails("podDisruptionBudget.maxUnavailable=0", message="/podDisruptionBudget/maxUnavailable")
    render_fails("replicaCount=0", message="/replicaCount")


def test_image_tag_and_digest_together_fail():
    """A digest kept by --reuse-values must not silently win over a new tag."""
    digest = "sha256:" + "ab" * 32
    err = render_fails("image.tag=0.2.0", f"image.digest={digest}",
                       message=["image.tag (0.2.0) and image.digest", "--set image.digest="])
    assert "docs/upgrading.md" in err
    for mode in ("sidecar", "node"):
        docs = template(f"image.repository={REPO}", f"mode={mode}", "image.tag=0.2.0",
                        f"identity.clientId={CLIENT_ID}", f"identity.tenantId={TENANT_ID}", namespace="velero")
        images = {c["image"] for d in docs if d["kind"] in ("Deployment", "DaemonSet")
                  for c in d["spec"]["template"]["spec"]["containers"]}
        assert images == {f"{REPO}:0.2.0"}, images
    container, env = deployment_env(template(f"image.repository={REPO}", f"image.digest={digest}"))
    assert container["image"] == env["IMDS_BROKER_WEBHOOK_SIDECAR_IMAGE"] == f"{REPO}@{digest}"


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


# ---- node mode ----------------------------------------------------------------------------

CLIENT_ID = vk.TEST_CLIENT_ID
TENANT_ID = vk.TEST_TENANT_ID
NODE = [f"image.repository={REPO}", "mode=node", f"identity.clientId={CLIENT_ID}",
        f"identity.tenantId={TENANT_ID}"]


def node_template(*sets, namespace="velero", **kw):
    return template(*NODE, *sets, namespace=namespace, **kw)


def test_invalid_mode_fails_with_a_message():
    render_fails("mode=daemonset", message=["/mode", "'sidecar', 'node'"])


def test_node_mode_objects_are_valid_and_agree():
    docs = node_template("monitoring.podMonitor.enabled=true", "monitoring.prometheusRule.enabled=true",
                         "node.networkPolicy.enabled=true", "node.networkPolicy.nodeCIDRs={10.224.0.0/16}",
                         "node.allowNamespaces={velero,backup}")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["DaemonSet", "ServiceAccount", "Secret", "Service", "Role", "Role",
                            "RoleBinding", "RoleBinding", "NetworkPolicy", "NetworkPolicy",
                            "PodMonitor", "PrometheusRule"]), kinds
    versions = vk.kube_versions()
    for doc in docs:
        if not doc["apiVersion"].startswith("monitoring.coreos.com/"):
            vk.validate_doc(doc, versions)
    vk.check_node_workload(docs)
    for np in (d for d in docs if d["kind"] == "NetworkPolicy"):
        assert np["spec"]["policyTypes"] == ["Egress"]
        assert np["spec"]["egress"] == [{"to": [{"ipBlock": {"cidr": "10.224.0.0/16"}}],
                                         "ports": [{"port": 8400, "protocol": "TCP"}]}]


def test_node_checks_catch_what_they_guard():
    """check_node_workload fails on the mistakes it exists for."""
    def broken(edit):
        docs = node_template()
        (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
        edit(ds["spec"]["template"]["spec"], docs)
        with pytest.raises(AssertionError) as e:
            vk.check_node_workload(docs)
        return str(e.value)

    def endpoint_first(spec, _):
        env = spec["containers"][0]["env"]
        env.insert(0, env.pop([e["name"] for e in env].index("IMDS_BROKER_ADMIN_LISTEN")))
    assert "before it is declared" in broken(endpoint_first)
    assert "hostPort" in broken(lambda spec, _: spec["containers"][0].update(
        ports=[{"containerPort": 8400}]))

    def cluster_role(spec, docs):
        docs.append({"kind": "ClusterRole", "metadata": {"name": "x"}})
    assert "cluster-wide" in broken(cluster_role)


def test_node_mode_needs_the_identity():
    for missing, message in (("identity.clientId", "needs identity.clientId"),
                             ("identity.tenantId", "needs identity.tenantId")):
        sets = [s for s in NODE if not s.startswith(missing)]
        res = helm("template", RELEASE, str(CHART), "-n", "velero",
                   *[a for s in sets for a in ("--set", s)], check=False)
        assert res.returncode != 0 and message in res.stderr, res.stderr
    res = helm("template", RELEASE, str(CHART), "-n", "velero", "--set", "namespace.create=true",
               *[a for s in NODE for a in ("--set", s)], check=False)
    assert res.returncode != 0 and "namespace.create is for sidecar mode" in res.stderr, res.stderr


def test_node_mode_equals_deploy_node():
    chart = node_template("node.identityHeader.createSecret=false")
    docs = kustomize(None, path="node", edits=[
        ["set", "configmap", "imds-broker-node-identity", f"--from-literal=client-id={CLIENT_ID}",
         f"--from-literal=tenant-id={TENANT_ID}"],
    ])
    chart = {k: normalise(v, {}, []) for k, v in by_key(chart).items()}
    kust = {k: normalise(v, {}, []) for k, v in by_key(docs).items()}
    assert sorted(chart) == sorted(kust), (sorted(chart), sorted(kust))
    for k in chart:
        assert chart[k] == kust[k], (
            f"{k} differs:\nchart: {json.dumps(chart[k], sort_keys=True)}\n"
            f"deploy: {json.dumps(kust[k], sort_keys=True)}"
        )


def test_deploy_node_refuses_to_build_until_the_identity_is_set():
    res = kustomize_run(None, path="node")
    assert res.returncode != 0 and "CLIENT_ID_NOT_SET" in res.stderr, res.stderr
    res = kustomize_run(None, path="node", set_image=False)
    assert res.returncode != 0 and "IMAGE-NOT-SET" in res.stderr, res.stderr


def node_secret(docs):
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    return base64.b64decode(secret["data"]["identity-header"]).decode()


def test_identity_header_secret():
    """Generated when no value is given (48 letters and digits; without a cluster, as in helm
    template, lookup finds no Secret, so each render generates anew: the documented reason to
    set a value there), exactly the given value otherwise, and absent with createSecret=false
    while the DaemonSet still references it."""
    first, second = node_secret(node_template()), node_secret(node_template())
    assert re.fullmatch(r"[A-Za-z0-9]{48}", first) and first != second
    assert node_secret(node_template("node.identityHeader.value=0123456789abcdef0123")) == "0123456789abcdef0123"
    for bad in ("short", "has space in it here", 'quote"inside-the-value'):
        res = helm("template", RELEASE, str(CHART), "-n", "velero",
                   *[a for s in NODE for a in ("--set", s)],
                   "--set-string", f"node.identityHeader.value={bad}", check=False)
        assert res.returncode != 0 and "node.identityHeader.value must be" in res.stderr, (bad, res.stderr)
    docs = node_template("node.identityHeader.createSecret=false")
    assert not [d for d in docs if d["kind"] == "Secret"]
    vk.check_node_workload(docs)  # the DaemonSet still names <fullname>-node / identity-header


def test_node_values_reach_the_broker():
    docs = node_template("node.allowServiceAccounts={velero,backup/other}", "node.allowHostNetwork=true",
                         "node.allowResources={https://storage.azure.com/}", "node.prefetch=null",
                         "node.adminPort=9401", "identity.tokenAudience=api://AzureADTokenExchangeUSGov",
                         "identity.tokenExpiration=7200", "node.priorityClassName=",
                         "node.service.enabled=false", namespace="backup")
    (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
    spec = ds["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    env = env_map(c)
    assert env["IMDS_BROKER_ALLOW_SERVICE_ACCOUNTS"] == "velero,backup/other"
    assert env["IMDS_BROKER_ALLOW_NAMESPACES"] == "backup", "default: the release namespace"
    assert env["IMDS_BROKER_ALLOW_HOST_NETWORK"] == "true"
    assert env["IMDS_BROKER_ALLOW_RESOURCES"] == "https://storage.azure.com/"
    assert "IMDS_BROKER_PREFETCH" not in env
    assert env["IMDS_BROKER_ADMIN_LISTEN"] == "$(HOST_IP):9401"
    assert ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9401"
    assert env["IMDS_BROKER_TOKEN_AUDIENCE"] == "api://AzureADTokenExchangeUSGov"
    (token,) = spec["volumes"][0]["projected"]["sources"]
    assert token["serviceAccountToken"]["audience"] == "api://AzureADTokenExchangeUSGov"
    assert token["serviceAccountToken"]["expirationSeconds"] == 7200
    assert "priorityClassName" not in spec
    assert not [d for d in docs if d["kind"] == "Service"]
    (sa,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert sa["metadata"]["annotations"] == {"azure.workload.identity/client-id": CLIENT_ID,
                                             "azure.workload.identity/tenant-id": TENANT_ID}
    res = helm("template", RELEASE, str(CHART), "-n", "velero", *[a for s in NODE for a in ("--set", s)],
               "--set", "node.adminPort=8400", check=False)
    assert res.returncode != 0 and "node.adminPort must be a port other than 8400" in res.stderr


def test_node_mode_podmonitor_scrapes_the_admin_port_on_the_pod_ip():
    docs = node_template("monitoring.podMonitor.enabled=true", "node.adminPort=9401")
    (pm,) = [d for d in docs if d["kind"] == "PodMonitor"]
    (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
    assert vk.selector_matches(pm["spec"]["selector"]["matchLabels"], ds["spec"]["template"]["metadata"]["labels"])
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    # No port selector: the pods declare none, and one would drop every target.
    assert not {"port", "portNumber", "targetPort"} & set(ep), ep
    (address,) = [r for r in ep["relabelings"] if r["targetLabel"] == "__address__"]
    assert address["sourceLabels"] == ["__meta_kubernetes_pod_ip"] and address["replacement"] == "${1}:9401"


def render_notes(*sets, namespace, release):
    """NOTES.txt as `helm install` prints it: helm template does not render NOTES, so a copy of
    the chart renders it through tpl into a ConfigMap."""
    with tempfile.TemporaryDirectory() as tmp:
        chart = os.path.join(tmp, "imds-broker")
        shutil.copytree(CHART, chart)
        shutil.copy(os.path.join(chart, "templates", "NOTES.txt"), os.path.join(chart, "files", "NOTES.txt"))
        with open(os.path.join(chart, "templates", "zz-notes.yaml"), "w") as f:
            f.write('apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n'
                    'data:\n  notes: {{ tpl (.Files.Get "files/NOTES.txt") . | toJson }}\n')
        docs = template(*sets, namespace=namespace, release=release, chart=chart)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    return cm["data"]["notes"]


def test_node_notes_print_what_velero_env_prints():
    """Under another release name and namespace, so names are not the defaults by luck."""
    notes = render_notes(*NODE, namespace="backup", release="bk")
    start = notes.index("# Velero Helm chart")
    snippet = notes[start:notes.index("\n\n", start) + 1]
    printed = subprocess.run(
        [str(BINARY), "velero-env", "--format", "helm", "--namespace", "backup",
         "--client-id", CLIENT_ID, "--name", "bk-imds-broker-node"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert snippet == printed, f"NOTES.txt:\n{snippet}\nvelero-env:\n{printed}"
    assert "--subject system:serviceaccount:backup:bk-imds-broker-node" in notes
    docs = node_template(namespace="backup", release="bk")
    names = {d["metadata"]["name"] for d in docs if d["kind"] in ("DaemonSet", "Secret", "Service", "ServiceAccount")}
    assert names == {"bk-imds-broker-node"}, names
    # The sidecar-mode notes are unchanged by the mode switch.
    assert "webhook installed in namespace" in render_notes(f"image.repository={REPO}", namespace="x", release="y")


# ---- values.schema.json -------------------------------------------------------------------


@pytest.mark.parametrize("sets, path", [
    (["webhok.failurePolicy=Fail"], "webhok"),                       # top level
    (["webhook.failurPolicy=Fail"], "failurPolicy"),                 # in an object of the chart
    (["sidecar.imagePullSecret={x}"], "imagePullSecret"),
    (["podDisruptionBudget.minAvailabe=1"], "minAvailabe"),
    (["certificates.selfSigned.validDays=30"], "validDays"),
    (["node.allowServiceAccount={velero}"], "allowServiceAccount"),
    (["webhook.timeoutSeconds=31"], "/webhook/timeoutSeconds"),       # ranges
    (["webhook.timeoutSeconds=0"], "/webhook/timeoutSeconds"),
    (["node.adminPort=70000"], "/node/adminPort"),
    (["identity.tokenExpiration=60"], "/identity/tokenExpiration"),
    (["image.pullPolicy=Sometimes"], "/image/pullPolicy"),            # enums
    (["webhook.logFormat=xml"], "/webhook/logFormat"),
    (["sidecar.resources.limits.memory=lots"], "/sidecar/resources/limits/memory"),
    (["webhook.matchLabels[0].name=Data_Upload"], "/webhook/matchLabels/0/name"),
    (["replicaCount=two"], "/replicaCount"),                          # types
])
def test_schema_refuses_typos_and_out_of_range_values(sets, path):
    err = render_fails(*sets, message=path)
    assert "values don't meet the specifications of the schema" in err, err


def test_schema_refuses_a_typo_in_a_values_file(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text("image:\n  repository: registry.example/imds-broker\nwebhook:\n  namespace: [backup]\n")
    res = helm("template", RELEASE, str(CHART), "-f", str(values), check=False)
    assert res.returncode != 0 and "namespace" in res.stderr and "additional properties" in res.stderr, res.stderr
    values.write_text("image:\n  repository: registry.example/imds-broker\nwebhook:\n  namespaces: [backup]\n")
    helm("template", RELEASE, str(CHART), "-f", str(values))


def test_schema_is_the_whole_values_file():
    """Every key of values.yaml is declared in the schema (so additionalProperties: false
    cannot refuse a default), and the schema declares no key values.yaml lacks."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(value, node, path):
        # Definitions (#/definitions/...) are Kubernetes types, whose optional fields values.yaml
        # need not show; the chart's own objects are declared in place, key for key.
        own = "$ref" not in node
        while "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
        if isinstance(value, dict) and node.get("additionalProperties") is False:
            declared = set(node["properties"])
            assert set(value) <= declared, f"{path}: not in the schema: {sorted(set(value) - declared)}"
            if own:
                assert declared <= set(value) | {"global"}, f"{path}: only in the schema: {sorted(declared - set(value))}"
            for k, v in value.items():
                walk(v, node["properties"][k], f"{path}.{k}")

    assert schema["additionalProperties"] is False
    walk(values, schema, "values")


def value_examples():
    """The `e.g. --set ...` examples of values.yaml's comments: one list of (flag, value) per
    comment line."""
    examples = []
    for n, line in enumerate((CHART / "values.yaml").read_text().splitlines(), 1):
        m = re.match(r"\s*#.*?\be\.g\. (--set.*)$", line)
        if not m:
            continue
        words = shlex.split(m.group(1))
        assert len(words) % 2 == 0 and all(w.startswith("--set") for w in words[::2]), (n, line)
        examples.append((n, list(zip(words[::2], words[1::2]))))
    return examples


def test_every_values_example_renders(tmp_path, test_ca):
    """Each example renders (in node mode with the identity node mode requires) and changes
    the output, so it names a key the chart uses."""
    (tmp_path / "ca.crt").write_bytes(test_ca["ca.crt"])
    examples = value_examples()
    assert len(examples) >= 30, f"only {len(examples)} examples found: is the e.g. format still used?"

    def render(pairs):
        node = ("--set", "mode=node") in pairs
        args = ["template", RELEASE, str(CHART), "-n", "velero" if node else NAMESPACE,
                "--set", f"image.repository={REPO}"]
        if node:
            args += ["--set", f"identity.clientId={CLIENT_ID}", "--set", f"identity.tenantId={TENANT_ID}"]
        for flag, value in pairs:
            args += [flag, value]
        return helm(*args, check=False, cwd=tmp_path)

    defaults = {mode: render([("--set", f"mode={mode}")]).stdout for mode in ("sidecar", "node")}
    for n, pairs in examples:
        res = render(pairs)
        assert res.returncode == 0, f"values.yaml:{n}: {pairs}\n{res.stderr}"
        mode = "node" if ("--set", "mode=node") in pairs else "sidecar"
        assert res.stdout != defaults[mode], f"values.yaml:{n}: {pairs} changes nothing"


# ---- certificates -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory):
    """A CA and a serving certificate for the default Service name, made with openssl (PEM)."""
    d = tmp_path_factory.mktemp("ca")
    run = lambda *a: subprocess.run(["openssl", *a], cwd=d, check=True, capture_output=True)
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
        "-subj", "/CN=test-ca", "-keyout", "ca.key", "-out", "ca.crt")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-subj", "/CN=imds-broker-webhook.imds-broker.svc", "-keyout", "tls.key", "-out", "tls.csr")
    (d / "ext").write_text("subjectAltName=DNS:imds-broker-webhook.imds-broker.svc\n")
    run("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-days", "2",
        "-extfile", "ext", "-out", "tls.crt")
    return {name: (d / name).read_bytes() for name in ("ca.crt", "tls.crt", "tls.key")}


def test_manual_mode_equals_manual_tls_overlay_plus_the_ca(test_ca):
    """certificates.mode manual: no Secret and no cert-manager object, the given CA in every
    caBundle (PEM or base64 given), the Deployment mounting the named Secret; otherwise
    deploy/overlays/manual-tls."""
    pem = test_ca["ca.crt"].decode()
    for given in (pem, base64.b64encode(test_ca["ca.crt"]).decode()):
        chart = template(f"image.repository={REPO}", "namespace.create=true", "certificates.mode=manual",
                         f"certificates.manual.caBundle={given}")
        assert not [d for d in chart if d["kind"] == "Secret" or d["apiVersion"].startswith("cert-manager.io/")]
        (mwc,) = [d for d in chart if d["kind"] == "MutatingWebhookConfiguration"]
        assert "annotations" not in mwc["metadata"], "no cert-manager CA injection"
        bundles = {base64.b64decode(w["clientConfig"].pop("caBundle")).decode().strip() for w in mwc["webhooks"]}
        assert bundles == {pem.strip()}
        assert_equivalent(chart, kustomize("manual-tls"))
    docs = template(f"image.repository={REPO}", "certificates.mode=manual", "certificates.manual.secretName=my-tls",
                    f"certificates.manual.caBundle={pem}")
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    assert dep["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"] == "my-tls"
    render_fails("certificates.mode=manual", message=["certificates.manual.caBundle", "--set-file"])
    render_fails("certificates.mode=manual", "certificates.manual.caBundle=bm90IGEgY2VydA==",
                 message="holds no PEM certificate")


def notes_of(*sets, namespace=NAMESPACE, release=RELEASE):
    return render_notes(f"image.repository={REPO}", *sets, namespace=namespace, release=release)


def test_self_signed_without_cluster_access_says_so():
    """helm template cannot tell a first install from a render without the cluster: the
    output and NOTES.txt say what happens there."""
    out = helm("template", RELEASE, str(CHART), "--set", f"image.repository={REPO}",
               "--set", "certificates.mode=self-signed").stdout
    assert "# Self-signed certificate, generate: no Secret imds-broker-webhook-tls found" in out
    assert "helm template, Argo CD), this happens at every render" in out
    notes = notes_of("certificates.mode=self-signed")
    assert "WARNING: self-signed mode reads the certificate back from the cluster" in notes
    assert "use certificates.mode manual or" in notes
    render_fails("certificates.mode=self-signed", "certificates.selfSigned.renewBeforeDays=3650",
                 message="renewBeforeDays (3650) must be less than validityDays (3650)")


def pem_certs(pem):
    return re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n?", pem, re.S)


class Cluster:
    """The stand-in API server holding what the chart stored: its Secret and webhook
    configuration, as `helm install/upgrade` would leave them."""

    def __init__(self, api, tmp):
        self.api, self.kubeconfig = api, api.kubeconfig(tmp)

    def render(self, *sets):
        """helm template --dry-run=server: the chart's lookups go to the API server."""
        out = helm("template", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=server",
                   "--kubeconfig", self.kubeconfig, "--set", f"image.repository={REPO}",
                   "--set", "certificates.mode=self-signed", *[a for s in sets for a in ("--set", s)]).stdout
        docs = [d for d in yaml.safe_load_all(out) if d]
        (secret,) = [d for d in docs if d["kind"] == "Secret"]
        (mwc,) = [d for d in docs if d["kind"] == "MutatingWebhookConfiguration"]
        data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        bundles = {w["clientConfig"]["caBundle"] for w in mwc["webhooks"]}
        assert len(bundles) == 1
        assert base64.b64decode(bundles.pop()).decode() == data["ca.crt"], "the caBundle is the Secret's ca.crt"
        action = re.search(r"# Self-signed certificate, (\w+):", out).group(1)
        return {"secret": secret, "mwc": mwc, "data": data, "action": action}

    def apply(self, r):
        self.api.put(r["secret"])
        self.api.put(r["mwc"])


def verifies(tmp, ca_pem, crt_pem):
    (tmp / "bundle.pem").write_text(ca_pem)
    (tmp / "leaf.pem").write_text(crt_pem)
    res = subprocess.run(["openssl", "verify", "-CAfile", str(tmp / "bundle.pem"), "-purpose", "sslserver",
                          "-verify_hostname", "imds-broker-webhook.imds-broker.svc", str(tmp / "leaf.pem")],
                         capture_output=True, text=True)
    return res.returncode == 0


def test_self_signed_is_kept_and_rotates_without_an_untrusted_moment(tmp_path):
    """Through the real helm's lookup: a stored certificate is kept render after render; a
    forced rotation issues a new CA and certificate with a caBundle trusting both the new and
    the old CA (the replicas serve the old one until kubelet refreshes the Secret volume), and
    happens once per forceRotation value."""
    with FakeAPIServer() as api:
        cluster = Cluster(api, tmp_path)
        first = cluster.render()
        assert first["action"] == "generate" and len(pem_certs(first["data"]["ca.crt"])) == 1
        not_after = datetime.datetime.fromisoformat(first["secret"]["metadata"]["annotations"]["imds-broker.io/not-after"])
        assert abs(not_after - datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=3650)) < \
            datetime.timedelta(minutes=5)
        cluster.apply(first)

        for _ in range(2):
            again = cluster.render()
            assert again["action"] == "keep"
            assert again["data"] == first["data"]
            assert again["secret"]["metadata"]["annotations"] == first["secret"]["metadata"]["annotations"]
        assert ("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets/imds-broker-webhook-tls") in api.requests

        rotated = cluster.render("certificates.selfSigned.forceRotation=2026-12-05")
        assert rotated["action"] == "rotate"
        old, new = first["data"], rotated["data"]
        assert new["tls.crt"] != old["tls.crt"] and new["tls.key"] != old["tls.key"]
        assert pem_certs(new["ca.crt"])[1:] == pem_certs(old["ca.crt"]), "the new CA first, then the old one"
        assert verifies(tmp_path, new["ca.crt"], old["tls.crt"]), "the old certificate stays trusted"
        assert verifies(tmp_path, new["ca.crt"], new["tls.crt"])
        assert not verifies(tmp_path, old["ca.crt"], new["tls.crt"]), "a new CA signed the new certificate"
        assert rotated["secret"]["metadata"]["annotations"]["imds-broker.io/force-rotation"] == "2026-12-05"
        cluster.apply(rotated)

        kept = cluster.render("certificates.selfSigned.forceRotation=2026-12-05")
        assert kept["action"] == "keep" and kept["data"] == rotated["data"], "the same value rotates once"
        notes = render_notes_against(cluster, "certificates.selfSigned.forceRotation=2026-12-05")
        assert "keep: the certificate in Secret imds-broker-webhook-tls is kept" in notes

        # A second rotation drops the oldest CA: the bundle is the new CA and the previous one.
        again = cluster.render("certificates.selfSigned.forceRotation=2027-01-01")
        assert again["action"] == "rotate"
        assert pem_certs(again["data"]["ca.crt"])[1] == pem_certs(rotated["data"]["ca.crt"])[0]
        assert len(pem_certs(again["data"]["ca.crt"])) == 2
        assert not api.unexpected, api.unexpected


def with_not_after(render, when):
    secret = copy.deepcopy(render["secret"])
    secret["metadata"]["annotations"]["imds-broker.io/not-after"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    return secret


def test_self_signed_renews_before_expiry(tmp_path):
    """An upgrade renews a certificate that expires within renewBeforeDays (the date in the
    Secret's annotation), keeps one that does not, and rotates one of an older chart, which
    recorded no date; the previous CA stays trusted each time."""
    now = datetime.datetime.now(datetime.timezone.utc)
    with FakeAPIServer() as api:
        cluster = Cluster(api, tmp_path)
        first = cluster.render()
        cluster.apply(first)
        for days, action in ((10, "rotate"), (29, "rotate"), (31, "keep"), (400, "keep"), (-1, "rotate")):
            api.put(with_not_after(first, now + datetime.timedelta(days=days)))
            r = cluster.render()
            assert r["action"] == action, (days, r["action"])
            if action == "rotate":
                assert verifies(tmp_path, r["data"]["ca.crt"], first["data"]["tls.crt"]), days
                assert verifies(tmp_path, r["data"]["ca.crt"], r["data"]["tls.crt"]), days
        api.put(with_not_after(first, now + datetime.timedelta(days=50)))
        assert cluster.render("certificates.selfSigned.renewBeforeDays=60")["action"] == "rotate"
        legacy = copy.deepcopy(first["secret"])
        del legacy["metadata"]["annotations"]
        api.put(legacy)
        r = cluster.render()
        assert r["action"] == "rotate" and verifies(tmp_path, r["data"]["ca.crt"], first["data"]["tls.crt"])
        assert not api.unexpected, api.unexpected


def test_self_signed_without_its_secret_keeps_trusting_the_served_ca(tmp_path):
    """The Secret deleted (the old renewal recipe), the webhook configuration still there: the
    new caBundle keeps the CA the replicas still serve under, read from the caBundle."""
    with FakeAPIServer() as api:
        cluster = Cluster(api, tmp_path)
        first = cluster.render()
        cluster.apply(first)
        api.remove("Secret", "imds-broker-webhook-tls")
        r = cluster.render()
        assert r["action"] == "rotate"
        assert verifies(tmp_path, r["data"]["ca.crt"], first["data"]["tls.crt"])
        assert verifies(tmp_path, r["data"]["ca.crt"], r["data"]["tls.crt"])
        assert ("GET", "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/imds-broker") in api.requests


def render_notes_against(cluster, *sets):
    """NOTES.txt rendered with the chart's lookups answered by the stand-in API server."""
    with tempfile.TemporaryDirectory() as tmp:
        chart = os.path.join(tmp, "imds-broker")
        shutil.copytree(CHART, chart)
        shutil.copy(os.path.join(chart, "templates", "NOTES.txt"), os.path.join(chart, "files", "NOTES.txt"))
        with open(os.path.join(chart, "templates", "zz-notes.yaml"), "w") as f:
            f.write('apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n'
                    'data:\n  notes: {{ tpl (.Files.Get "files/NOTES.txt") . | toJson }}\n')
        out = helm("template", RELEASE, chart, "-n", NAMESPACE, "--dry-run=server", "--kubeconfig", cluster.kubeconfig,
                   "--set", f"image.repository={REPO}", "--set", "certificates.mode=self-signed",
                   *[a for s in sets for a in ("--set", s)]).stdout
    (cm,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "ConfigMap"]
    return cm["data"]["notes"]


# ---- the PrometheusRule -------------------------------------------------------------------


def chart_rules(*sets, namespace=NAMESPACE, release=RELEASE):
    docs = template(f"image.repository={REPO}", "monitoring.prometheusRule.enabled=true", *sets,
                    namespace=namespace, release=release)
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    return rule["spec"]


def test_prometheus_rule_names_the_release_and_leaves_node_mode_without_the_webhook():
    rules = yaml.safe_load((ROOT / "deploy" / "monitoring" / "imds-broker.rules.yml").read_text())
    spec = chart_rules(namespace="backup-tools", release="bk")
    (unavailable,) = [r for g in spec["groups"] for r in g["rules"] if r["alert"] == "ImdsBrokerWebhookUnavailable"]
    assert unavailable["expr"].count('namespace="backup-tools", deployment="bk-imds-broker-webhook"') == 2
    assert "imds-broker-webhook\"" not in unavailable["expr"].replace("bk-imds-broker-webhook", "")
    # Only that expression differs from deploy/monitoring's.
    plain = json.dumps(spec).replace('namespace=\\"backup-tools\\", deployment=\\"bk-imds-broker-webhook\\"',
                                     'namespace=\\"imds-broker\\", deployment=\\"imds-broker-webhook\\"')
    assert json.loads(plain) == rules
    node = chart_rules(*NODE[1:], namespace="velero")
    assert [g["name"] for g in node["groups"]] == [g["name"] for g in rules["groups"] if g["name"] != "imds-broker-webhook"]


def promtool_cases(unavailable):
    """promtool test groups for ImdsBrokerWebhookUnavailable of release bk in backup-tools:
    the expected annotations are the rule's own, with the alert's labels filled in."""
    labels = {"namespace": "backup-tools", "deployment": "bk-imds-broker-webhook"}
    annotations = {}
    for k, v in unavailable["annotations"].items():
        for name, value in labels.items():
            v = v.replace("{{ $labels.%s }}" % name, value)
        assert "{{" not in v, v
        annotations[k] = v
    fires = [{"exp_labels": {"severity": "critical", **labels}, "exp_annotations": annotations}]
    series = 'kube_deployment_status_replicas_available{namespace="backup-tools",deployment="bk-imds-broker-webhook"}'

    def case(input_series, quiet_at, fires_at):
        return {"interval": "1m", "input_series": input_series, "alert_rule_test": [
            {"eval_time": quiet_at, "alertname": "ImdsBrokerWebhookUnavailable", "exp_alerts": []},
            {"eval_time": fires_at, "alertname": "ImdsBrokerWebhookUnavailable",
             "exp_alerts": fires if fires_at else []}][: 2 if fires_at else 1]}

    return [
        # The release's Deployment loses its replicas (for: 2m).
        case([{"series": series, "values": "2 2 0 0 0 0"}], "3m", "5m"),
        # The release's Deployment is deleted while kube-state-metrics reports others: absent.
        case([{"series": series, "values": "2 2 stale"},
              {"series": 'kube_deployment_status_replicas_available{namespace="kube-system",deployment="coredns"}',
               "values": "2x8"}], "3m", "6m"),
        # deploy/'s names at 0 are another install: not this release's alert, but its
        # Deployment is absent, so it fires for bk (kube-state-metrics is there).
        case([{"series": 'kube_deployment_status_replicas_available{namespace="imds-broker",deployment="imds-broker-webhook"}',
               "values": "0x8"}], "1m", "4m"),
        # No kube-state-metrics at all: nothing to say.
        case([{"series": 'up{job="other"}', "values": "1x8"}], "6m", None),
    ]


def test_prometheus_rule_of_another_release_fires(tmp_path):
    """promtool on the rules the chart renders for release bk in namespace backup-tools: the
    alert fires for that release's Deployment, without replicas and when it is gone."""
    spec = chart_rules(namespace="backup-tools", release="bk")
    (unavailable,) = [r for g in spec["groups"] for r in g["rules"] if r["alert"] == "ImdsBrokerWebhookUnavailable"]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(spec))
    (tmp_path / "test.yml").write_text(yaml.safe_dump({
        "rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": promtool_cases(unavailable)}))
    res = subprocess.run(["promtool", "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
