"""Velero on the real node, for the data-mover cases of test_08_kubelet.py: Velero's own objects
(`velero install --dry-run`), the VolumeSnapshot CRDs of the external-snapshotter module Velero
pins, Azurite reachable from pods, and the image Velero's exposers give the data-mover pod.

Velero's server and node-agent do not run here: the test calls Velero's exposer code (the
node-agent's DataUpload controller's part) through the per-version driver, and plays the
snapshot controller and the CSI driver itself. So the Deployment is applied with 0 replicas and
the DaemonSet with a node selector no node has; the exposers read the DaemonSet's template only.

The image: the data-mover pod runs the node-agent's image (`velero/velero:vX.Y.Z`, pull policy
Never) with `/velero data-mover backup …`. Nothing can be pulled, so that reference is built
here: busybox, and as `/velero` a script that runs the storage stage's Velero kopia round trip
(tests/conformance/velero: Velero's own repository and uploader code at that version, its
credential path through azidentity) against Azurite, with the client ID from Velero's
credentials secret as the node-agent template mounts it.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import yaml

import harness
from node.node import sh

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
CONFORMANCE = os.path.join(ROOT, "tests", "conformance")

VELERO_NS = "velero"
VELERO_SA = "velero-server"


def snapshot_crds(velero_module_dir):
    """The VolumeSnapshot, VolumeSnapshotContent and VolumeSnapshotClass CRDs of the
    external-snapshotter client module the Velero module requires (its config/crd: client/v7
    for Velero 1.15, client/v8 for 1.18)."""
    errors = []
    for major in ("v8", "v7"):
        res = subprocess.run(["go", "list", "-m", "-f", "{{.Dir}}",
                              f"github.com/kubernetes-csi/external-snapshotter/client/{major}"],
                             cwd=velero_module_dir, capture_output=True, text=True,
                             env={**os.environ, "GOFLAGS": "-mod=readonly"})
        if res.returncode == 0 and res.stdout.strip():
            break
        errors.append(res.stderr.strip())
    else:
        raise RuntimeError(f"no external-snapshotter client module in {velero_module_dir}: "
                           f"{errors}")
    crd_dir = os.path.join(res.stdout.strip(), "config", "crd")
    return [os.path.join(crd_dir, f"snapshot.storage.k8s.io_{kind}.yaml")
            for kind in ("volumesnapshotclasses", "volumesnapshotcontents", "volumesnapshots")]


def install_velero(cp, velero_bin, version, client_id, bsl_uri):
    """What `velero install --dry-run -o yaml --use-node-agent` prints (as conftest.py installs
    it, BSL pointing at `bsl_uri`), with the server scaled to 0 and the node-agent kept off the
    node (see the module doc). Returns the applied documents."""
    creds = cp.write_secret_file(f"velero-credentials-{version}", (
        "AZURE_SUBSCRIPTION_ID=00000000-0000-0000-0000-000000000000\n"
        "AZURE_RESOURCE_GROUP=MC_rg_aks_westeurope\n"
        "AZURE_CLOUD_NAME=AzurePublicCloud\n"
        f"AZURE_CLIENT_ID={client_id}\n"))
    res = subprocess.run([
        velero_bin, "velero", "install", "--dry-run", "-o", "yaml",
        "--kubeconfig", cp.kubeconfig,
        "--use-node-agent", "--provider", "azure",
        "--plugins", "velero/velero-plugin-for-microsoft-azure:v1.11.0",
        "--bucket", "velero", "--secret-file", creds,
        "--backup-location-config",
        f"resourceGroup=rg,storageAccount=devstoreaccount1,useAAD=true,storageAccountURI={bsl_uri}",
        "--use-volume-snapshots=false",
        "--service-account-name", VELERO_SA,
    ], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"velero {version} install --dry-run:\n{res.stderr}")
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    if len(docs) == 1 and docs[0].get("kind") == "List":
        docs = docs[0]["items"]
    for d in docs:
        if d["kind"] == "Deployment":
            d["spec"]["replicas"] = 0
        if d["kind"] == "DaemonSet":
            d["spec"]["template"]["spec"]["nodeSelector"] = {
                "imds-broker.io/node-agent-not-run-here": "true"}
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    rest = [d for d in docs if d["kind"] != "CustomResourceDefinition"]
    ssa = ["apply", "--server-side", "--force-conflicts", "--field-manager", "velero-install",
           "-f", "-"]
    cp.kubectl(*ssa, input=yaml.safe_dump_all(crds))
    cp.kubectl("wait", "--for=condition=Established", "--timeout=60s",
               *[f"crd/{c['metadata']['name']}" for c in crds])
    cp.kubectl(*ssa, input=yaml.safe_dump_all([d for d in rest if d["kind"] == "Namespace"]))
    cp.kubectl(*ssa, input=yaml.safe_dump_all([d for d in rest if d["kind"] != "Namespace"]))
    return docs


def node_agent_image(docs):
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    return ds["spec"]["template"]["spec"]["containers"][0]["image"]


class AzuriteOnNode:
    """Azurite (tests/conformance/storage_support.py: HTTPS, `--oauth basic`) on the node's
    gateway address, with a certificate for it from a CA of its own."""

    def __init__(self, run_dir, gateway):
        sys.path.insert(0, CONFORMANCE)
        import storage_support  # noqa: E402 - the storage stage's Azurite driver

        self.support = storage_support
        pki = os.path.join(run_dir, "azurite-pki")
        os.makedirs(pki, exist_ok=True)
        harness.make_ca(pki, "ca", "azurite-test-ca")
        harness.make_cert(pki, "ca", "azurite", f"/CN={gateway}",
                          f"subjectAltName=IP:{gateway}\nextendedKeyUsage=serverAuth\n")
        self.pki = {"ca": f"{pki}/ca.crt", "cert": f"{pki}/azurite.crt",
                    "key": f"{pki}/azurite.key"}
        self.azurite = storage_support.Azurite(self.pki, os.path.join(run_dir, "azurite"),
                                               host=gateway)
        self.account_url = self.azurite.account_url

    def create_container(self, name):
        # Azurite checks a token's claims, not its signature (storage_support.unsigned_jwt).
        status, code, body = self.azurite.request(
            "PUT", f"/{name}?restype=container", token=self.support.unsigned_jwt())
        if status != 201:
            raise RuntimeError(f"Azurite: creating container {name}: {status} {code} {body}")

    def stop(self):
        self.azurite.stop()


def build_data_mover_image(node, run_dir, reference, roundtrip_bin, busybox_archive, settings,
                           ca_file):
    """The image `reference` (the node-agent's) as the module doc says, imported into the
    node. `settings`: the round trip's BSL values (URI, CONTAINER, PREFIX)."""
    work = tempfile.mkdtemp(prefix="data-mover-image-", dir=run_dir)
    try:
        layout = os.path.join(work, "oci")
        os.makedirs(layout)
        sh("tar", "-C", layout, "-xf", busybox_archive)
        with open(os.path.join(layout, "index.json")) as f:
            base_tag = json.load(f)["manifests"][0]["annotations"][
                "org.opencontainers.image.ref.name"]
        tag = reference.rsplit(":", 1)[1]
        sh("umoci", "tag", "--image", f"{layout}:{base_tag}", tag)
        sh("umoci", "rm", "--image", f"{layout}:{base_tag}")
        bundle = os.path.join(work, "bundle")
        sh("umoci", "unpack", "--image", f"{layout}:{tag}", bundle)
        rootfs = os.path.join(bundle, "rootfs")
        shutil.copy2(roundtrip_bin, os.path.join(rootfs, "velero-roundtrip"))
        # The round trip is linked against glibc (cgo): the machine's loader and libc.
        for lib in ("/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/libc.so.6"):
            dest = rootfs + lib
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copy2(os.path.realpath(lib), dest)
        os.makedirs(os.path.join(rootfs, "etc"), exist_ok=True)
        shutil.copy2(ca_file, os.path.join(rootfs, "etc", "bsl-ca.pem"))
        with open(os.path.join(rootfs, "etc", "bsl.env"), "w") as f:
            for k, v in settings.items():
                f.write(f"{k}='{v}'\n")
        script = os.path.join(rootfs, "velero")
        with open(script, "w") as f:
            f.write(DATA_MOVER_SCRIPT)
        os.chmod(script, 0o755)
        sh("umoci", "repack", "--image", f"{layout}:{tag}", "--history.created_by",
           "tests/cluster/node/velero_node.py: the data mover's stand-in image", bundle)
        sh("umoci", "gc", "--layout", layout)
        archive = os.path.join(run_dir, f"data-mover-{tag}.oci.tar")
        sh("tar", "-C", layout, "-cf", archive, ".")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    repo = reference.rsplit(":", 1)[0]
    if "/" in repo and "." not in repo.split("/")[0] and ":" not in repo.split("/")[0]:
        repo = "docker.io/" + repo  # velero/velero → docker.io/velero/velero, as CRI names it
    return node.import_image(archive, repo)


# /velero in the stand-in image: only `data-mover backup|restore`; the BSL values baked in, the
# client ID from Velero's credentials file (the cloud-credentials secret the node-agent
# template mounts, AZURE_CREDENTIALS_FILE), the token from IDENTITY_ENDPOINT (the sidecar).
DATA_MOVER_SCRIPT = """#!/bin/sh
set -e
case "$1 $2" in
  "data-mover backup" | "data-mover restore") ;;
  *) echo "velero stand-in: only 'data-mover backup|restore', got: $*" >&2; exit 2 ;;
esac
echo "velero stand-in: $* (Velero's kopia round trip, tests/conformance/velero)" >&2
. /etc/bsl.env
. "${AZURE_CREDENTIALS_FILE:-/credentials/cloud}"
mkdir -p /tmp/data-mover
exec /velero-roundtrip -uri "$URI" -container "$CONTAINER" -prefix "$PREFIX" \\
  -ca-file /etc/bsl-ca.pem -client-id "$AZURE_CLIENT_ID" -work /tmp/data-mover -timeout 3m
"""
