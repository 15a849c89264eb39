"""A one-node cluster on this machine: the cluster tests' control plane (harness.ControlPlane)
listening on the pod network's gateway address, and one real node (node.Node): containerd,
kubelet, kube-scheduler, kube-proxy. Used by tests/cluster/test_08_kubelet*.py and by
`scripts/cluster up|down|status`, which runs this file.

`up` leaves every process running and writes their PIDs (with their start times, so a reused
PID is never signalled) and what the node made to <run dir>/cluster.json; `down` stops them and
removes what the node made, from another process.

With imds-broker (`up(imds_broker=True)`, what `scripts/cluster up` does) it also installs
what a person trying the project needs for a Velero-labelled pod to run with the sidecar and get
tokens: the fake Entra trusting the API server's issuer (on 127.0.0.1, reached by pods through
relay.py on the gateway address), Velero's namespace and the `velero-server` ServiceAccount
annotated as docs/velero-on-aks.md says, and charts/imds-broker installed by the real `helm`
(self-signed certificates, the webhook running as the chart's Deployment pods, image
localhost/imds-broker:<version> imported from scripts/build-image's archive with the relay's
test CA added to its trust store, as an image built for a private CA would carry it).

Inputs (set by scripts/cluster): CLUSTER_BIN_DIR (kube-apiserver, kube-controller-manager,
kubectl, etcd), NODE_BIN_DIR (kubelet, kube-scheduler, kube-proxy), NODE_IMAGES_DIR (pause and
busybox archives), CLUSTER_NODE_RUN_DIR (state and logs); for imds-broker also FAKE_ENTRA_BIN,
HELM_BIN, BROKER_IMAGE (scripts/build-image's .oci.tar).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import yaml  # noqa: E402

import harness  # noqa: E402
from harness import ControlPlane, Proc, free_port, wait_for  # noqa: E402
from node.node import (Node, kill_containers, proc_start_time, sh, stop_pid,  # noqa: E402
                       teardown_leftovers)

VELERO_NS = "velero"
VELERO_SA = "velero-server"
BROKER_NS = "imds-broker"
BROKER_RELEASE = "imds-broker"

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))


def env(name):
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"{name} is not set: run scripts/cluster (it builds and sets it)")
    return value


class NodeCluster:
    def __init__(self, run_dir=None):
        self.dir = run_dir or os.environ.get("CLUSTER_NODE_RUN_DIR") or os.path.join(
            ROOT, "target", "cluster-node")
        self.state_file = os.path.join(self.dir, "cluster.json")
        self.images_dir = env("NODE_IMAGES_DIR")
        self.node_bin_dir = env("NODE_BIN_DIR")
        self.cp_bin_dir = env("CLUSTER_BIN_DIR")
        self.cp = None
        self.node = None
        self.timings = {}

    def busybox_image(self):
        with open(os.path.join(self.images_dir, "busybox.version")) as f:
            return f"localhost/busybox:{f.read().strip()}"

    def up(self, imds_broker=False):
        """Starts everything; on any failure stops what was started and re-raises."""
        if os.path.exists(self.state_file):
            raise RuntimeError(f"{self.state_file} exists: a cluster is up (or was not taken "
                               "down); run `scripts/cluster down` first")
        # A fresh start: the run directory holds only what the last cluster left (etcd's data,
        # certificates, logs).
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        t0 = time.monotonic()
        self.node = Node(None, self.node_bin_dir, self.images_dir, self.dir)
        try:
            self.node.create_bridge()
            self.cp = ControlPlane(self.cp_bin_dir, self.dir, address=self.node.gateway,
                                   for_nodes=True)
            self.node.cp = self.cp
            self.cp.start()
            self.timings["control_plane_s"] = round(time.monotonic() - t0, 1)
            # Anonymous OIDC discovery, as a public issuer serves it (as in conftest.py).
            self.cp.kubectl("create", "clusterrolebinding", "oidc-discovery-anonymous",
                            "--clusterrole=system:service-account-issuer-discovery",
                            "--group=system:unauthenticated")
            t1 = time.monotonic()
            self.node.start(images=[(os.path.join(self.images_dir, "busybox.oci.tar"),
                                     "localhost/busybox")],
                            scheduler=True, kube_proxy=True)
            self.timings["node_ready_s"] = round(time.monotonic() - t1, 1)
            if imds_broker:
                t2 = time.monotonic()
                self.install_imds_broker()
                self.timings["imds_broker_s"] = round(time.monotonic() - t2, 1)
            self.write_state()
        except BaseException as e:
            try:
                self.down_in_process()
            except Exception as down_error:  # noqa: BLE001 - the start's error comes first
                e.add_note(f"and stopping what had started: {down_error}")
            raise
        self.timings["up_s"] = round(time.monotonic() - t0, 1)
        return self

    # -- imds-broker, the fake Entra, Velero's objects --------------------------------------

    def start_fake_entra(self):
        """The fake Entra trusting the API server's issuer (as conftest.py starts it), and the
        relay that lets pods reach it at https://<gateway>:<port>."""
        cp = self.cp
        proc = Proc("fake-entra", [
            env("FAKE_ENTRA_BIN"),
            "--oidc-issuer", cp.issuer, "--oidc-issuer-ca", cp.ca_file,
            "--federated-subject", f"system:serviceaccount:{VELERO_NS}:{VELERO_SA}",
        ], self.dir)
        # Its first stdout line is the JSON description; the rest of its output goes to a log.
        log = open(proc.log, "ab")
        proc.popen = subprocess.Popen(proc.argv, stdout=subprocess.PIPE, stderr=log,
                                      stdin=subprocess.DEVNULL, text=True)
        log.close()
        cp.procs.append(proc)
        line = proc.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"fake Entra did not start:\n{harness.tail(proc.log)}")
        # Nothing reads its stdout any more; it writes no more lines there.
        proc.popen.stdout.close()
        self.entra = json.loads(line)
        upstream_port = int(self.entra["authority"].rsplit(":", 1)[1].rstrip("/"))

        pki = os.path.join(self.dir, "relay-pki")
        os.makedirs(pki)
        harness.make_ca(pki, "ca", "imds-broker-node-test-ca")
        harness.make_cert(pki, "ca", "relay", f"/CN={self.node.gateway}",
                          f"subjectAltName=IP:{self.node.gateway}\n"
                          "extendedKeyUsage=serverAuth\n")
        self.relay_ca = os.path.join(pki, "ca.crt")
        port = free_port(self.node.gateway)
        relay = Proc("entra-relay", [
            sys.executable, os.path.join(HERE, "relay.py"), self.node.gateway, str(port),
            f"{pki}/relay.crt", f"{pki}/relay.key", "127.0.0.1", str(upstream_port),
            self.entra["ca_file"], "localhost"], self.dir).start()
        cp.procs.append(relay)
        wait_for("relay listening", lambda: socket.create_connection(
            (self.node.gateway, port), timeout=1).close() or True,
            10, interval=0.1, proc=relay.popen, log=relay.log)
        self.authority_host = f"https://{self.node.gateway}:{port}"

    def import_broker_image(self):
        """scripts/build-image's archive with the relay's CA appended to the image's CA bundle
        (SSL_CERT_FILE), imported as localhost/imds-broker:<version>; returns that reference."""
        archive = env("BROKER_IMAGE")
        work = tempfile.mkdtemp(prefix="broker-image-", dir=self.dir)
        try:
            layout = os.path.join(work, "oci")
            with tarfile.open(archive) as t:
                t.extractall(layout, filter="tar")
            with open(os.path.join(layout, "index.json")) as f:
                tag = json.load(f)["manifests"][0]["annotations"][
                    "org.opencontainers.image.ref.name"]
            bundle = os.path.join(work, "bundle")
            sh("umoci", "unpack", "--image", f"{layout}:{tag}", bundle)
            bundle_ca = os.path.join(bundle, "rootfs/etc/ssl/certs/ca-certificates.crt")
            with open(self.relay_ca) as src, open(bundle_ca, "a") as dst:
                dst.write(src.read())
            sh("umoci", "repack", "--image", f"{layout}:{tag}", "--history.created_by",
               "tests/cluster/node: the relay's test CA added", bundle)
            sh("umoci", "gc", "--layout", layout)
            out = os.path.join(self.dir, "imds-broker-test-ca.oci.tar")
            sh("tar", "-C", layout, "-cf", out, ".")
        finally:
            sh("rm", "-rf", work)
        refs = self.node.import_image(out, "localhost/imds-broker")
        self.broker_image = refs[0]
        return refs[0]

    def install_imds_broker(self):
        cp = self.cp
        self.start_fake_entra()
        image = self.import_broker_image()
        repository, tag = image.rsplit(":", 1)
        # Velero's namespace as `velero install` labels it, and the ServiceAccount as
        # docs/velero-on-aks.md step 4 annotates it.
        cp.kubectl("apply", "--server-side", "--field-manager", "cluster-node", "-f", "-",
                   input=yaml.safe_dump_all([
                       {"apiVersion": "v1", "kind": "Namespace", "metadata": {
                           "name": VELERO_NS, "labels": {
                               "pod-security.kubernetes.io/enforce": "privileged"}}},
                       {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {
                           "name": VELERO_SA, "namespace": VELERO_NS, "annotations": {
                               "azure.workload.identity/client-id": self.entra["client_id"],
                               "azure.workload.identity/tenant-id": self.entra["tenant_id"]}}},
                   ]))
        res = subprocess.run([
            env("HELM_BIN"), "--kubeconfig", cp.kubeconfig, "install", BROKER_RELEASE,
            os.path.join(ROOT, "charts", "imds-broker"), "-n", BROKER_NS, "--create-namespace",
            "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
            "--set", "certificates.mode=self-signed",
            "--set", f"identity.authorityHost={self.authority_host}",
            "--wait", "--timeout", "180s"], capture_output=True, text=True, timeout=240)
        if res.returncode != 0:
            pods = cp.kubectl("-n", BROKER_NS, "get", "pods", "-o", "wide", check=False).stdout
            raise RuntimeError(f"helm install charts/imds-broker failed:\n{res.stderr}\n{pods}")

    def write_state(self):
        procs = [{"name": p.name, "pid": p.pid, "start": proc_start_time(p.pid)}
                 for p in self.node.procs + self.cp.procs if p.running()]
        extra = {}
        if getattr(self, "entra", None):
            extra = {"entra": self.entra, "authority_host": self.authority_host,
                     "broker_image": self.broker_image}
        state = {**extra, "kubeconfig": self.cp.kubeconfig, "api": self.cp.url,
                 "kubectl": os.path.join(self.cp_bin_dir, "kubectl"),
                 "node": self.node.state_for_teardown(), "node_name": self.node.name,
                 "procs": procs}
        with open(self.state_file, "w") as f:
            json.dump(state, f, indent=1)

    def down_in_process(self):
        """Stops what this process started (the tests' fixture and a failed `up`)."""
        errors = []
        if self.node:
            try:
                self.node.stop(leftovers=False)
            except Exception as e:  # noqa: BLE001 - the control plane must stop too
                errors.append(str(e))
        if self.cp:
            self.cp.stop()
        if self.node:
            # After the API server: it listens on the bridge's address until it exits.
            errors += teardown_leftovers(self.node.state_for_teardown())
        if os.path.exists(self.state_file):
            os.remove(self.state_file)
        if errors:
            raise RuntimeError("; ".join(errors))


def down(run_dir=None):
    """Stops a cluster started by `up` in another process, from its state file."""
    c = NodeCluster.__new__(NodeCluster)
    c.dir = run_dir or os.environ.get("CLUSTER_NODE_RUN_DIR") or os.path.join(
        ROOT, "target", "cluster-node")
    state_file = os.path.join(c.dir, "cluster.json")
    if not os.path.exists(state_file):
        print(f"no cluster is up ({state_file} does not exist)")
        return 0
    with open(state_file) as f:
        state = json.load(f)
    procs = {p["name"]: p for p in state["procs"]}
    errors = []
    # The order Node.stop() uses: the kubelet and scheduler first, then the pods' containers,
    # then kube-proxy and containerd, then the control plane (newest first).
    order = ["kube-scheduler", "kubelet"]
    for name in order:
        if name in procs:
            stop_pid(procs[name]["pid"], procs[name]["start"])
    if "containerd" in procs and proc_start_time(procs["containerd"]["pid"]) == \
            procs["containerd"]["start"]:
        try:
            kill_containers(state["node"]["socket"])
        except Exception as e:  # noqa: BLE001
            errors.append(f"stop the pods' containers: {e}")
    for name in ["kube-proxy", "containerd"]:
        if name in procs:
            stop_pid(procs[name]["pid"], procs[name]["start"])
    for p in reversed(state["procs"]):
        if p["name"] not in order + ["kube-proxy", "containerd"]:
            stop_pid(p["pid"], p["start"])
    errors += teardown_leftovers(state["node"])
    os.remove(state_file)
    if errors:
        print("down: " + "; ".join(errors), file=sys.stderr)
        return 1
    print("cluster down")
    return 0


def status(run_dir=None):
    d = run_dir or os.environ.get("CLUSTER_NODE_RUN_DIR") or os.path.join(
        ROOT, "target", "cluster-node")
    state_file = os.path.join(d, "cluster.json")
    if not os.path.exists(state_file):
        print(f"down ({state_file} does not exist)")
        return 3
    with open(state_file) as f:
        state = json.load(f)
    dead = [p["name"] for p in state["procs"] if proc_start_time(p["pid"]) != p["start"]]
    for p in state["procs"]:
        alive = proc_start_time(p["pid"]) == p["start"]
        print(f"{p['name']:<24} pid {p['pid']:<8} {'running' if alive else 'NOT RUNNING'}")
    res = subprocess.run([state["kubectl"], "--kubeconfig", state["kubeconfig"], "get",
                          "nodes", "-o", "wide"], capture_output=True, text=True, timeout=30)
    print(res.stdout or res.stderr, end="")
    print_env(state)
    return 1 if dead or res.returncode != 0 else 0


def print_env(state):
    print(f"KUBECONFIG={state['kubeconfig']}")
    print(f"KUBECTL={state['kubectl']} --kubeconfig {state['kubeconfig']}")
    print(f"IMAGE_IMPORT={os.path.join(ROOT, 'scripts', 'cluster')} import")


def import_image(archive, base_name=None, run_dir=None):
    """Imports an OCI or docker archive into the running node's containerd; prints the
    image reference last."""
    d = run_dir or os.environ.get("CLUSTER_NODE_RUN_DIR") or os.path.join(
        ROOT, "target", "cluster-node")
    with open(os.path.join(d, "cluster.json")) as f:
        state = json.load(f)
    if base_name is None:
        base_name = default_base_name(archive)
    node = Node.__new__(Node)
    node.socket = state["node"]["socket"]
    refs = node.import_image(archive, base_name)
    for ref in refs:
        print(ref)
    return 0


def default_base_name(archive):
    """localhost/<image title> for an OCI archive whose index names only a tag (umoci's and
    scripts/build-image's); None lets ctr use a docker archive's own RepoTags."""
    with tarfile.open(archive) as t:
        names = t.getnames()
        if "index.json" not in names and "./index.json" not in names:
            return None
        index = json.load(t.extractfile("index.json" if "index.json" in names
                                        else "./index.json"))
    for m in index.get("manifests", []):
        ann = m.get("annotations", {})
        ref = (ann.get("io.containerd.image.name")
               or ann.get("org.opencontainers.image.ref.name", ""))
        if "/" in ref or ":" in ref:
            return None  # a full reference: ctr uses it as it is
        title = ann.get("org.opencontainers.image.title")
        if title:
            return f"localhost/{title}"
    stem = os.path.basename(archive).split(".")[0]
    # imds-broker-0.1.0.oci.tar → imds-broker
    parts = stem.split("-")
    while parts and parts[-1][:1].isdigit():
        parts.pop()
    return "localhost/" + "-".join(parts or [stem])


def main(argv):
    if len(argv) < 2 or argv[1] not in ("up", "down", "status", "import"):
        print(__doc__)
        print("usage: cluster.py up|down|status|import ARCHIVE [BASE_NAME]", file=sys.stderr)
        return 2
    cmd = argv[1]
    if cmd == "up":
        c = NodeCluster().up(imds_broker=os.environ.get("CLUSTER_IMDS_BROKER", "1") != "0")
        with open(c.state_file) as f:
            state = json.load(f)
        print(f"cluster up in {c.timings['up_s']}s (control plane "
              f"{c.timings['control_plane_s']}s, node Ready {c.timings['node_ready_s']}s); "
              f"API server {c.cp.url}, node {c.node.name} ({c.node.subnet}); "
              f"logs in {c.dir}", file=sys.stderr)
        print(f"BUSYBOX_IMAGE={c.busybox_image()}")
        if state.get("broker_image"):
            print(f"BROKER_IMAGE_REF={state['broker_image']}")
            print(f"ENTRA_CALLS_URL={state['entra']['calls_url']}")
        print_env(state)
        return 0
    if cmd == "down":
        return down()
    if cmd == "status":
        return status()
    if len(argv) < 3:
        print("usage: cluster.py import ARCHIVE [BASE_NAME]", file=sys.stderr)
        return 2
    return import_image(argv[2], argv[3] if len(argv) > 3 else None)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
