"""`imds-broker velero-env` (the shipped binary) against what it configures:

- the `helm` form's entries are valid Kubernetes env entries (strict schema, in a container
  like Velero's), declare HOST_IP before the endpoint that expands it, and reference the
  chart's own Secret;
- the `helm-legacy` form's endpoint is the chart's Service (name, namespace, port) and its
  header the chart's Secret's value, piped in as the README says;
- the `kubectl` form's patches, applied with the API machinery's own strategic merge
  (`kubectl patch --local`, when kubectl is installed), keep HOST_IP ahead of an
  IDENTITY_ENDPOINT the container already had, and a second run changes nothing.
"""

import base64
import json
import shutil
import subprocess

import pytest
import yaml

import validate_k8s as vk
from test_chart import BINARY, CLIENT_ID, HELM, node_template

pytestmark = pytest.mark.skipif(not (HELM and BINARY), reason="run through scripts/test-packaging.sh")


def velero_env(*args, stdin=None):
    return subprocess.run([str(BINARY), "velero-env", "--client-id", CLIENT_ID, *args],
                          input=stdin, capture_output=True, text=True, check=True).stdout


def container_with(env):
    """Velero's server container as its chart renders it, with `env` appended."""
    return {"name": "velero", "image": "velero/velero:v1.18.1",
            "env": [{"name": "VELERO_SCRATCH_DIR", "value": "/scratch"},
                    {"name": "VELERO_NAMESPACE",
                     "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    *env]}


def deployment(container):
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "velero", "namespace": "velero"},
            "spec": {"selector": {"matchLabels": {"deploy": "velero"}},
                     "template": {"metadata": {"labels": {"deploy": "velero"}},
                                  "spec": {"containers": [container]}}}}


def test_helm_entries_are_valid_env_in_order_and_name_the_charts_secret():
    values = yaml.safe_load(velero_env("--format", "helm", "--namespace", "backup",
                                       "--name", "bk-imds-broker-node"))
    env = values["configuration"]["extraEnvVars"]
    c = container_with(env)
    for version in vk.kube_versions():
        vk.validate_schema(deployment(c), [version])
    vk.check_env_order(c["env"])
    (secret,) = [d for d in node_template(namespace="backup", release="bk") if d["kind"] == "Secret"]
    ref = {e["name"]: e for e in env}["IDENTITY_HEADER"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], "identity-header")
    assert list(secret["data"]) == ["identity-header"]


def test_legacy_values_reach_the_charts_service_with_its_header():
    docs = node_template("node.identityHeader.value=0123456789abcdefXYZ", namespace="backup", release="bk")
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    # As the README pipes it: kubectl get secret ... -o jsonpath | base64 -d | velero-env ... -
    header = base64.b64decode(secret["data"]["identity-header"]).decode()
    out = velero_env("--format", "helm-legacy", "--namespace", "backup", "--name", svc["metadata"]["name"],
                     "--identity-header-file", "-", stdin=header)
    env = yaml.safe_load(out)["configuration"]["extraEnvVars"]
    (port,) = svc["spec"]["ports"]
    assert env["IDENTITY_ENDPOINT"] == (
        f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc:{port['port']}/msi/token"
    )
    assert env["IDENTITY_HEADER"] == header == "0123456789abcdefXYZ"


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl not installed")
def test_kubectl_patches_keep_host_ip_first_and_are_idempotent(tmp_path):
    out = velero_env("--format", "kubectl")
    patches = {}
    for line in out.splitlines():
        if " patch " in line:
            target = line.split(" patch ")[1].split()[0]
            patches[target] = line.split(" -p '", 1)[1].rstrip("'")
    assert set(patches) == {"deployment/velero", "daemonset/node-agent"}
    # An endpoint already present (e.g. an earlier Service-based setup) must not stay ahead.
    old = [{"name": "IDENTITY_ENDPOINT", "value": "http://imds-broker-node.velero.svc:8400/msi/token"}]
    for target, container_name in (("deployment/velero", "velero"), ("daemonset/node-agent", "node-agent")):
        doc = deployment(dict(container_with(old), name=container_name))
        if target.startswith("daemonset/"):
            doc.update(kind="DaemonSet", metadata={"name": "node-agent", "namespace": "velero"})
        path = tmp_path / "obj.json"
        path.write_text(json.dumps(doc))
        once = kubectl_patch(path, patches[target])
        (c,) = once["spec"]["template"]["spec"]["containers"]
        names = [e["name"] for e in c["env"]]
        assert names.count("IDENTITY_ENDPOINT") == 1 and names.count("HOST_IP") == 1, names
        vk.check_env_order(c["env"])
        path.write_text(json.dumps(once))
        assert kubectl_patch(path, patches[target]) == once, "a second run changes nothing"


def kubectl_patch(path, patch):
    res = subprocess.run(["kubectl", "patch", "--local", "-f", str(path), "--type", "strategic",
                          "-p", patch, "-o", "json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)
