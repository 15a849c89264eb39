#!/usr/bin/env python3
"""Validates the webhook's Kubernetes objects against the Kubernetes JSON schemas shipped by
the kubernetes-validate package (strict: unknown fields fail), for the oldest version with
native sidecars (1.29) up to the newest the package ships:

- every kustomization under deploy/ (rendered with `kustomize build` or `kubectl kustomize`
  when one is installed; otherwise each resource file on its own), plus consistency checks the
  schemas cannot express (webhook <-> Service <-> Deployment <-> PDB <-> RBAC <-> certificate;
  node mode's DaemonSet <-> env order <-> token volume <-> Roles <-> Service);
- the pods the golden test mutated (<target>/webhook-mutated/*.json, written by
  `cargo test --test e2e webhook_golden::`) and the Velero pod fixtures they came from.

cert-manager kinds have no schema in kubernetes-validate; they get a structural check here.

Usage: tests/validate_k8s.py [--mutated DIR]. Prints one line per check and a closing
"N passed, M failed" line; exits 1 on any failure.
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import kubernetes_validate
import yaml
from packaging.version import Version
from kubernetes_validate import utils as kv_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
MIN_VERSION = "1.29.0"  # native sidecars (SidecarContainers) are on by default from 1.29

RESULTS = []  # (ok, name, detail)


def record(ok, name, detail=""):
    RESULTS.append((ok, name, detail))
    line = ("ok    " if ok else "FAIL  ") + name
    if detail and not ok:
        line += "\n      " + detail.replace("\n", "\n      ")
    print(line)


def check(name, fn):
    """Runs fn; an AssertionError (or any exception) is a failed check, not a crash."""
    try:
        fn()
        record(True, name)
    except Exception as e:  # noqa: BLE001 - report every failure the same way
        record(False, name, f"{type(e).__name__}: {e}")


def kube_versions():
    versions = [v for v in kv_utils.all_versions() if Version(v) >= Version(MIN_VERSION)]
    assert versions, "kubernetes-validate ships no schema for Kubernetes >= 1.29"
    picked = [versions[0]]
    if "1.33.0" in versions:
        picked.append("1.33.0")  # the API version the webhook's k8s-openapi types follow
    if versions[-1] not in picked:
        picked.append(versions[-1])
    return picked


def match_labels_from_source():
    """The webhook's default --match-label keys, read from src/webhook/args.rs."""
    with open(os.path.join(ROOT, "src/webhook/args.rs")) as f:
        text = f.read()
    block = re.search(r"DEFAULT_MATCH_LABELS: &\[&str\] = &\[(.*?)\];", text, re.S)
    assert block, "DEFAULT_MATCH_LABELS not found in src/webhook/args.rs"
    return sorted(re.findall(r'"([^"]+)"', block.group(1)))


# ---------------------------------------------------------------------------------------
# Rendering


def kustomize_command():
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def load_yaml_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def kustomization_dirs():
    found = []
    for path in sorted(glob.glob(os.path.join(DEPLOY, "**", "kustomization.yaml"), recursive=True)):
        found.append(os.path.dirname(path))
    return found


def referenced_files(kdir):
    """Files a kustomization references (resources, patches), checked to exist."""
    with open(os.path.join(kdir, "kustomization.yaml")) as f:
        k = yaml.safe_load(f)
    refs = []
    for entry in k.get("resources", []):
        refs.append(("resource", entry))
    for entry in k.get("patches", []) + k.get("patchesStrategicMerge", []):
        path = entry.get("path") if isinstance(entry, dict) else entry
        if path:
            refs.append(("patch", path))
    for entry in k.get("replacements", []):
        if "path" in entry:
            refs.append(("replacement", entry["path"]))
    out = []
    for kind, rel in refs:
        full = os.path.normpath(os.path.join(kdir, rel))
        assert os.path.exists(full), f"{kdir}: {kind} {rel} does not exist"
        out.append((kind, full))
    return out


def render_unrendered(kdir):
    """Without kustomize: the resource files as they are (patches and transformers not applied)."""
    docs = []
    for kind, full in referenced_files(kdir):
        if kind != "resource":
            continue
        if os.path.isdir(full):
            docs.extend(render_unrendered(full))
        else:
            docs.extend(load_yaml_docs(full))
    return docs


# The overlays ship an image placeholder that fails `kustomize build` on purpose (so it is never
# applied by accident); the checks render a copy with an image set, as an operator would.
TEST_IMAGE = "registry.example/imds-broker:0.1.0"
PLACEHOLDER_ERROR = "out of bounds for value IMAGE-NOT-SET--run-kustomize-edit-set-image"


# deploy/node's identity placeholders refuse to build too; the checks fill them in.
TEST_CLIENT_ID = "11111111-2222-3333-4444-555555555555"
TEST_TENANT_ID = "66666666-7777-8888-9999-000000000000"


def with_image(kdir, tmp):
    """A copy of deploy/ in tmp whose kustomization for kdir sets TEST_IMAGE (and deploy/node's
    identity); its path."""
    copy = os.path.join(tmp, "deploy")
    shutil.copytree(DEPLOY, copy)
    target = os.path.join(copy, os.path.relpath(kdir, DEPLOY), "kustomization.yaml")
    with open(target) as f:
        k = yaml.safe_load(f)
    name, _, tag = TEST_IMAGE.rpartition(":")
    for entry in k.get("images", []):
        if entry.get("name") == "imds-broker":
            entry.update(newName=name, newTag=tag)
    for entry in k.get("configMapGenerator", []):
        if entry.get("name") == "imds-broker-node-identity":
            entry["literals"] = [f"client-id={TEST_CLIENT_ID}", f"tenant-id={TEST_TENANT_ID}"]
    with open(target, "w") as f:
        yaml.safe_dump(k, f, sort_keys=False)
    return os.path.dirname(target)


def render(kdir, tool):
    if tool is None:
        return render_unrendered(kdir), False
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            tool + [with_image(kdir, tmp)], check=True, capture_output=True, text=True
        ).stdout
    return [d for d in yaml.safe_load_all(out) if d], True


def check_placeholder_refused(kdir, tool):
    """The overlay as committed (image not set) must not render."""
    res = subprocess.run(tool + [kdir], capture_output=True, text=True)
    assert res.returncode != 0, "renders with the image placeholder"
    assert PLACEHOLDER_ERROR in res.stderr, f"unexpected error: {res.stderr.strip()}"


# ---------------------------------------------------------------------------------------
# Schemas


def validate_schema(doc, versions):
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.path)
            raise AssertionError(f"Kubernetes {version}: {path}: {e.message}") from None


CERT_MANAGER_FIELDS = {
    "Certificate": {
        "secretName", "commonName", "dnsNames", "ipAddresses", "uris", "emailAddresses",
        "duration", "renewBefore", "usages", "privateKey", "issuerRef", "isCA", "subject",
        "secretTemplate", "revisionHistoryLimit", "keystores", "literalSubject",
        "additionalOutputFormats", "encodeUsagesInRequest", "nameConstraints", "otherNames",
        "renewBeforePercentage",
    },
    "Issuer": {"selfSigned", "ca", "acme", "vault", "venafi"},
}


def validate_cert_manager(doc):
    kind, spec = doc["kind"], doc.get("spec") or {}
    assert doc["apiVersion"] == "cert-manager.io/v1", f"apiVersion {doc['apiVersion']}"
    assert kind in CERT_MANAGER_FIELDS, f"unexpected cert-manager kind {kind}"
    assert doc["metadata"].get("name") and doc["metadata"].get("namespace"), "name/namespace"
    unknown = set(spec) - CERT_MANAGER_FIELDS[kind]
    assert not unknown, f"unknown {kind} spec fields {sorted(unknown)}"
    if kind == "Issuer":
        assert len(spec) == 1, f"an Issuer needs exactly one issuer type, got {sorted(spec)}"
        if "ca" in spec:
            assert spec["ca"].get("secretName"), "ca.secretName"
    else:
        assert spec.get("secretName"), "secretName"
        assert spec.get("issuerRef", {}).get("name"), "issuerRef.name"
        assert spec.get("dnsNames") or spec.get("commonName") or spec.get("isCA"), "no subject"
        key = spec.get("privateKey", {})
        if key.get("algorithm") == "ECDSA":
            assert key.get("size", 256) in (256, 384, 521), "ECDSA size"
            assert "key encipherment" not in spec.get("usages", []), "ECDSA cannot encipher keys"


def validate_doc(doc, versions):
    if doc.get("apiVersion", "").startswith("cert-manager.io/"):
        validate_cert_manager(doc)
    else:
        validate_schema(doc, versions)


# ---------------------------------------------------------------------------------------
# Consistency


def one(docs, kind):
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def selector_matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def check_workload(docs, rendered):
    dep = one(docs, "Deployment")
    svc = one(docs, "Service")
    pdb = one(docs, "PodDisruptionBudget")
    sa = one(docs, "ServiceAccount")
    role = one(docs, "ClusterRole")
    binding = one(docs, "ClusterRoleBinding")
    ns = one(docs, "Namespace")["metadata"]["name"]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    spec = pod["spec"]

    assert dep["spec"]["replicas"] == 2, "two webhook replicas"
    assert selector_matches(dep["spec"]["selector"]["matchLabels"], labels)
    # maxUnavailable, not minAvailable: a drain can always evict one replica (minAvailable 1
    # with one replica blocked node drains and AKS upgrades).
    assert pdb["spec"].get("maxUnavailable") == 1 and "minAvailable" not in pdb["spec"], (
        f"PDB maxUnavailable 1, got {pdb['spec']}")
    assert selector_matches(pdb["spec"]["selector"]["matchLabels"], labels), "PDB selects the pods"
    assert selector_matches(svc["spec"]["selector"], labels), "Service selects the pods"
    for obj in (dep, svc, pdb, sa):
        assert obj["metadata"]["namespace"] == ns, f"{obj['kind']} in {ns}"

    (container,) = spec["containers"]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["port"] == 443 and port_names.get(svc_port["targetPort"]) == 8443, "443 -> 8443"
    assert container["args"] == ["webhook"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] != 0
    assert spec["serviceAccountName"] == sa["metadata"]["name"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # A fail-closed webhook: one slow probe must not drop a replica from the Service.
    assert container["readinessProbe"]["failureThreshold"] >= 3, "readiness failureThreshold >= 3"
    assert spec.get("priorityClassName") == "system-cluster-critical", "priorityClassName"

    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    if rendered:
        assert env.get("IMDS_BROKER_WEBHOOK_SIDECAR_IMAGE") == container["image"], (
            f"sidecar image {env.get('IMDS_BROKER_WEBHOOK_SIDECAR_IMAGE')!r} "
            f"!= webhook image {container['image']!r}"
        )

    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get"]}
    ], f"least privilege: get serviceaccounts only, got {role['rules']}"
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": ns}
    ]


def check_webhook_configuration(docs, match_labels):
    mwc = one(docs, "MutatingWebhookConfiguration")
    svc = one(docs, "Service")
    names, keys = set(), []
    for w in mwc["webhooks"]:
        name = w["name"]
        assert name not in names, f"duplicate webhook name {name}"
        names.add(name)
        assert w["failurePolicy"] == "Fail", f"{name}: failurePolicy"
        assert w["sideEffects"] == "None", f"{name}: sideEffects"
        assert w["reinvocationPolicy"] == "IfNeeded", f"{name}: reinvocationPolicy"
        assert w["admissionReviewVersions"] == ["v1"], f"{name}: admissionReviewVersions"
        assert w["timeoutSeconds"] <= 5, f"{name}: timeoutSeconds"
        target = w["clientConfig"]["service"]
        assert (target["name"], target["namespace"]) == (
            svc["metadata"]["name"],
            svc["metadata"]["namespace"],
        ), f"{name}: clientConfig points at the Service"
        assert target["path"] == "/mutate" and target["port"] == svc["spec"]["ports"][0]["port"]
        (rule,) = w["rules"]
        assert rule["operations"] == ["CREATE"] and rule["resources"] == ["pods"], name
        assert rule["apiGroups"] == [""] and rule["apiVersions"] == ["v1"], name
        (expr,) = w["objectSelector"]["matchExpressions"]
        assert expr["operator"] == "Exists", f"{name}: objectSelector Exists"
        keys.append(expr["key"])
        ns_exprs = w["namespaceSelector"]["matchExpressions"]
        assert any(e["key"] == "kubernetes.io/metadata.name" for e in ns_exprs), name
    assert sorted(keys) == match_labels, (
        f"objectSelector keys {sorted(keys)} != the webhook's --match-label defaults {match_labels}"
    )


def check_cert_manager(docs):
    mwc = one(docs, "MutatingWebhookConfiguration")
    dep = one(docs, "Deployment")
    svc = one(docs, "Service")
    certs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Certificate"}
    issuers = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Issuer"}
    ref = mwc["metadata"].get("annotations", {}).get("cert-manager.io/inject-ca-from", "")
    ns, _, name = ref.partition("/")
    assert name in certs and certs[name]["metadata"]["namespace"] == ns, (
        f"inject-ca-from {ref!r} names no Certificate"
    )
    serving = certs[name]["spec"]
    secrets = [
        v["secret"]["secretName"] for v in dep["spec"]["template"]["spec"]["volumes"] if "secret" in v
    ]
    assert serving["secretName"] in secrets, "the Deployment mounts the serving certificate"
    host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
    assert host in serving["dnsNames"], f"{host} in dnsNames"
    for cert in certs.values():
        issuer = cert["spec"]["issuerRef"]["name"]
        assert issuer in issuers, f"Certificate {cert['metadata']['name']} -> missing Issuer {issuer}"
    for issuer in issuers.values():
        ca = issuer["spec"].get("ca")
        if ca:
            assert any(
                c["spec"]["secretName"] == ca["secretName"] and c["spec"].get("isCA")
                for c in certs.values()
            ), f"Issuer {issuer['metadata']['name']}: no CA Certificate writes {ca['secretName']}"


def token_file_from_source():
    """Where the broker reads its projected token (src/webhook/patch/mod.rs's mount path and
    file name, the sidecar's): node mode mounts it at the same place."""
    with open(os.path.join(ROOT, "src/webhook/patch/mod.rs")) as f:
        text = f.read()
    consts = dict(re.findall(r'pub const (TOKEN_MOUNT_PATH|TOKEN_FILE_NAME): &str = "([^"]+)";', text))
    assert len(consts) == 2, "TOKEN_MOUNT_PATH/TOKEN_FILE_NAME not found in src/webhook/patch/mod.rs"
    return consts["TOKEN_MOUNT_PATH"], consts["TOKEN_FILE_NAME"]


NODE_ROLE_RULES = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}]


def check_env_order(env, args=()):
    """Every $(VAR) in an env value names an entry declared before it, and every one in args an
    entry of the container: Kubernetes expands only those and leaves the text otherwise."""
    names = [e["name"] for e in env]
    for i, e in enumerate(env):
        for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value", "")):
            assert var in names[:i], f"env {e['name']} uses $({var}) before it is declared"
    for arg in args:
        for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
            assert var in names, f"arg {arg!r} uses $({var}), which the env does not declare"


def check_node_workload(docs):
    """Node mode: one broker per node on the host network, reached on the node's IP."""
    kinds = {d.get("kind") for d in docs}
    assert not kinds & {"Deployment", "MutatingWebhookConfiguration", "ClusterRole",
                        "ClusterRoleBinding"}, f"webhook or cluster-wide objects in node mode: {kinds}"
    ds = one(docs, "DaemonSet")
    sa = one(docs, "ServiceAccount")
    name, ns = ds["metadata"]["name"], ds["metadata"]["namespace"]
    pod = ds["spec"]["template"]
    spec = pod["spec"]
    assert selector_matches(ds["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}
    }, "surge first: the new broker is ready before the old one stops"
    assert spec["serviceAccountName"] == sa["metadata"]["name"] == name
    assert sa["metadata"]["namespace"] == ns
    assert spec.get("priorityClassName") == "system-node-critical"

    (c,) = spec["containers"]
    # A declared port on the host network is a hostPort: the scheduler would keep the surge
    # pod off a node whose old pod holds it.
    assert "ports" not in c, f"declared container ports (hostPorts on the host network): {c['ports']}"
    assert c["args"][:5] == ["node", "--listen", "$(HOST_IP):8400", "--node-name", "$(NODE_NAME)"], c["args"]
    env = c["env"]
    check_env_order(env, c["args"])
    by_name = {e["name"]: e for e in env}
    assert by_name["HOST_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    assert by_name["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert by_name["IDENTITY_HEADER"]["valueFrom"] == {
        "secretKeyRef": {"name": name, "key": "identity-header"}
    }, "the Secret Velero's env references (velero-env --name)"
    for e in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "IMDS_BROKER_ALLOW_SERVICE_ACCOUNTS"):
        assert by_name[e].get("value"), f"{e} is empty"
    admin = by_name["IMDS_BROKER_ADMIN_LISTEN"]["value"]
    assert admin.startswith("$(HOST_IP):") and admin != "$(HOST_IP):8400", admin
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = c[probe]["httpGet"]
        # No host: kubelet probes a host-network pod on the node's IP, where it listens.
        assert get == {"path": path, "port": 8400}, f"{probe}: {get}"
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] != 0

    mount_path, file_name = token_file_from_source()
    assert by_name["AZURE_FEDERATED_TOKEN_FILE"]["value"] == f"{mount_path}/{file_name}"
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == mount_path]
    (vol,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    (source,) = vol["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["path"] == file_name and token["audience"] == "api://AzureADTokenExchange", token

    allowed = by_name["IMDS_BROKER_ALLOW_NAMESPACES"]["value"].split(",")
    roles = [d for d in docs if d["kind"] == "Role"]
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(allowed), (
        "one Role in each allowed namespace"
    )
    for role in roles:
        assert role["metadata"]["name"] == name
        assert role["rules"] == NODE_ROLE_RULES, f"least privilege: {role['rules']}"
    for b in bindings:
        assert b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": ns}]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == sorted(allowed)

    for svc in (d for d in docs if d["kind"] == "Service"):
        assert svc["spec"]["internalTrafficPolicy"] == "Local", "the broker on the caller's node"
        assert selector_matches(svc["spec"]["selector"], pod["metadata"]["labels"])
        assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(8400, 8400)]
        assert svc["metadata"]["name"] == name, "velero-env --name names the Secret and the Service"


VELERO_GUIDE = os.path.join(DEPLOY, "velero")


def check_no_orphans():
    referenced = set()
    for kdir in kustomization_dirs():
        referenced.add(os.path.join(kdir, "kustomization.yaml"))
        referenced.update(full for _, full in referenced_files(kdir))
    files = set(glob.glob(os.path.join(DEPLOY, "**", "*.yaml"), recursive=True))
    # deploy/velero holds the guide's files for Velero's own chart (values, checked against
    # that chart's schema by tests/cluster/test_06_guide.py) and its demo app (checked below).
    files = {f for f in files if not f.startswith(VELERO_GUIDE + os.sep)}
    orphans = sorted(os.path.relpath(f, ROOT) for f in files - referenced)
    assert not orphans, f"YAML files no kustomization uses: {orphans}"


# ---------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    parser.add_argument("--mutated", default=os.path.join(target, "webhook-mutated"))
    args = parser.parse_args()

    versions = kube_versions()
    match_labels = match_labels_from_source()
    tool = kustomize_command()
    print(f"Kubernetes schemas: {', '.join(versions)}; kustomize: {' '.join(tool) if tool else 'none'}")

    check("deploy/: every kustomization's files exist", lambda: [referenced_files(k) for k in kustomization_dirs()])
    check("deploy/: every YAML file is used by a kustomization", check_no_orphans)
    demo = os.path.join(VELERO_GUIDE, "demo-app.yaml")
    with open(demo) as f:
        demo_docs = [d for d in yaml.safe_load_all(f) if d]
    for doc in demo_docs:
        label = f"deploy/velero/demo-app.yaml: {doc.get('kind')}/{doc['metadata']['name']} valid"
        check(label, lambda doc=doc: validate_doc(doc, versions))

    for kdir in kustomization_dirs():
        rel = os.path.relpath(kdir, ROOT)
        try:
            docs, rendered = render(kdir, tool)
        except Exception as e:  # noqa: BLE001
            record(False, f"{rel}: renders", str(e))
            continue
        how = "rendered" if rendered else "unrendered files"
        if rendered and "IMAGE-NOT-SET" in open(os.path.join(kdir, "kustomization.yaml")).read():
            check(f"{rel}: refuses to render until the image is set", lambda k=kdir: check_placeholder_refused(k, tool))
        record(True, f"{rel}: {len(docs)} objects ({how})")
        for doc in docs:
            label = f"{rel}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')} valid"
            check(label, lambda doc=doc: validate_doc(doc, versions))
        kinds = {d.get("kind") for d in docs}
        if "Deployment" in kinds:
            check(f"{rel}: workload, Service, PDB and RBAC agree", lambda d=docs, r=rendered: check_workload(d, r))
        if "DaemonSet" in kinds:
            check(f"{rel}: node mode's DaemonSet, env, token, RBAC and Service agree", lambda d=docs: check_node_workload(d))
        if "MutatingWebhookConfiguration" in kinds:
            check(f"{rel}: webhook configuration", lambda d=docs: check_webhook_configuration(d, match_labels))
        if "Certificate" in kinds and rendered:
            check(f"{rel}: cert-manager wiring", lambda d=docs: check_cert_manager(d))

    fixtures = sorted(glob.glob(os.path.join(ROOT, "tests/fixtures/velero/*.json")))
    mutated = sorted(glob.glob(os.path.join(args.mutated, "*.json")))
    def enough_mutated_pods():
        assert len(mutated) >= len(fixtures), (
            f"{len(mutated)} found, {len(fixtures)} expected: run `cargo test --test e2e webhook_golden::` first"
        )

    check(f"mutated pods present in {os.path.relpath(args.mutated, ROOT)}", enough_mutated_pods)
    for path in fixtures + mutated:
        with open(path) as f:
            pod = json.load(f)
        check(f"{os.path.relpath(path, ROOT)} valid", lambda pod=pod: validate_schema(pod, versions))

    failed = sum(1 for ok, _, _ in RESULTS if not ok)
    print(f"{len(RESULTS) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
