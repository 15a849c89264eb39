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
  identity-header Secret's choices, and NOTES.txt printing what `imds-broker velero-env` prints.
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


# ---- node mode ----------------------------------------------------------------------------

CLIENT_ID = vk.TEST_CLIENT_ID
TENANT_ID = vk.TEST_TENANT_ID
NODE = [f"image.repository={REPO}", "mode=node", f"identity.clientId={CLIENT_ID}",
        f"identity.tenantId={TENANT_ID}"]


def node_template(*sets, namespace="velero", **kw):
    return template(*NODE, *sets, namespace=namespace, **kw)


def test_invalid_mode_fails_with_a_message():
    res = helm("template", RELEASE, str(CHART), "--set", f"image.repository={REPO}",
               "--set", "mode=daemonset", check=False)
    assert res.returncode != 0 and "mode must be sidecar or node" in res.stderr, res.stderr


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
