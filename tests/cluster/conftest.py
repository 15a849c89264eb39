"""Session set-up for the cluster tests: the control plane, the fake Entra trusting the API
server's service-account issuer, imds-broker installed from deploy/overlays/manual-tls the way
docs/velero-on-aks.md ("Without cert-manager") says, and a local `imds-broker webhook`.

Inputs (set by scripts/test-cluster.sh):
  CLUSTER_BIN_DIR     kube-apiserver, kube-controller-manager, etcd, kubectl
  VELERO_BINS         "v1.15.0=/path/velero-v1.15,v1.18.3=/path/velero-v1.18" (first = oldest)
  IMDS_BROKER_BIN     the cargo-built imds-broker binary
  FAKE_ENTRA_BIN      the cargo-built fake_entra example
  CLUSTER_RUN_DIR     where logs, certificates and state go (kept for inspection)
"""

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request

import pytest
import yaml

import harness
from harness import Api, ControlPlane, Proc, free_port, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VELERO_NS = "velero"
VELERO_SA = "velero-server"
WEBHOOK_NS = "imds-broker"
WEBHOOK_SA = "imds-broker-webhook"


def env_path(name):
    value = os.environ.get(name)
    if not value:
        pytest.exit(f"{name} is not set: run scripts/test-cluster.sh", returncode=2)
    return value


def velero_bins():
    out = []
    for item in env_path("VELERO_BINS").split(","):
        version, path = item.split("=", 1)
        out.append((version, path))
    return out


class Cluster:
    """Everything the tests talk to."""

    def __init__(self, run_dir):
        self.dir = run_dir
        self.cp = ControlPlane(env_path("CLUSTER_BIN_DIR"), run_dir)
        self.broker_bin = env_path("IMDS_BROKER_BIN")
        self.fake_entra_bin = env_path("FAKE_ENTRA_BIN")
        self.velero = velero_bins()
        self.webhook = None
        self.fake_entra = None
        self.installed_velero = None

    @property
    def api(self):
        return self.cp.admin

    # -- fake Entra --------------------------------------------------------------------------

    def start_fake_entra(self):
        """The fake Entra, trusting the API server's issuer through its OIDC discovery document
        and /openid/v1/jwks, for the federated subject the docs register."""
        proc = Proc("fake-entra", [
            self.fake_entra_bin,
            "--oidc-issuer", self.cp.issuer, "--oidc-issuer-ca", self.cp.ca_file,
            "--federated-subject", f"system:serviceaccount:{VELERO_NS}:{VELERO_SA}",
        ], self.dir)
        # Its first stdout line is the JSON description; the rest of its output goes to a log.
        log = open(proc.log, "ab")
        proc.popen = subprocess.Popen(proc.argv, stdout=subprocess.PIPE, stderr=log,
                                      stdin=subprocess.DEVNULL, text=True)
        log.close()
        line = proc.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"fake Entra did not start:\n{harness.tail(proc.log)}")
        self.fake_entra = proc
        self.entra = json.loads(line)
        self.cp.procs.append(proc)

    def entra_calls(self):
        with urllib.request.urlopen(self.entra["calls_url"], timeout=5) as r:
            return int(r.read())

    # -- imds-broker from deploy/ ------------------------------------------------------------

    def install_imds_broker(self):
        cp = self.cp
        tls = os.path.join(self.dir, "imds-broker-tls")
        os.makedirs(tls, exist_ok=True)
        svc = "imds-broker-webhook.imds-broker.svc"
        # docs/velero-on-aks.md, "Without cert-manager": the CA and serving certificate. The
        # local webhook is reached at 127.0.0.1 (URL clientConfig), so that IP is added.
        harness.make_ca(tls, "ca", "imds-broker-webhook-ca")
        harness.make_cert(tls, "ca", "tls", f"/CN={svc}",
                          f"subjectAltName=DNS:{svc},DNS:{svc}.cluster.local,IP:127.0.0.1\n"
                          "extendedKeyUsage=serverAuth\n")
        self.webhook_tls = tls
        cp.kubectl("create", "namespace", WEBHOOK_NS)
        cp.kubectl("-n", WEBHOOK_NS, "create", "secret", "tls", "imds-broker-webhook-tls",
                   f"--cert={tls}/tls.crt", f"--key={tls}/tls.key")

        # The overlay refuses to render until an image is set (so its placeholder is never
        # applied by accident): set one in a copy, as the README's install path has the
        # operator do with `kustomize edit set image`.
        deploy = os.path.join(self.dir, "deploy")
        shutil.rmtree(deploy, ignore_errors=True)
        shutil.copytree(os.path.join(ROOT, "deploy"), deploy)
        kfile = os.path.join(deploy, "overlays/manual-tls/kustomization.yaml")
        with open(kfile) as f:
            k = yaml.safe_load(f)
        for entry in k.get("images", []):
            if entry.get("name") == "imds-broker":
                entry.update(newName="registry.example/imds-broker", newTag="0.1.0")
        with open(kfile, "w") as f:
            yaml.safe_dump(k, f, sort_keys=False)
        rendered = cp.kubectl("kustomize", os.path.dirname(kfile)).stdout
        docs = [d for d in yaml.safe_load_all(rendered) if d]
        self.manifests = docs
        self.webhook_port = free_port()
        self.webhook_admin_port = free_port()
        self.apply_imds_broker()
        # The caBundle patch, as the docs give it (one op per webhook entry of the stored
        # configuration).
        with open(f"{tls}/ca.crt", "rb") as f:
            import base64
            ca_bundle = base64.b64encode(f.read()).decode()
        entries = len(cp.admin.get(
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/imds-broker")["webhooks"])
        patch = [{"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": ca_bundle}
                 for i in range(entries)]
        cp.kubectl("patch", "mutatingwebhookconfiguration", "imds-broker", "--type=json",
                   "-p", json.dumps(patch))
        self.ca_bundle = ca_bundle

        # The webhook authenticates as its own ServiceAccount (a TokenRequest token, as the
        # in-cluster projected token would be), so the shipped RBAC is what it gets.
        self.webhook_token_file = cp.write_secret_file(
            "webhook-sa.token", cp.token_request(WEBHOOK_NS, WEBHOOK_SA))
        self.start_webhook()

    def rendered(self, kind, name=None):
        return [d for d in self.manifests
                if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]

    def apply_imds_broker(self, server_side=True):
        """deploy/overlays/manual-tls with ONE change: each webhook's clientConfig is a URL to
        the local `imds-broker webhook` instead of the in-cluster Service."""
        docs = json.loads(json.dumps(self.manifests))
        for d in docs:
            if d["kind"] == "MutatingWebhookConfiguration":
                for w in d["webhooks"]:
                    path = w["clientConfig"]["service"]["path"]
                    w["clientConfig"] = {"url": f"https://127.0.0.1:{self.webhook_port}{path}"}
        text = yaml.safe_dump_all(docs)
        args = ["apply", "-f", "-"]
        if server_side:
            args = ["apply", "--server-side", "--field-manager", "cluster-test", "-f", "-"]
        return self.cp.kubectl(*args, input=text)

    def webhook_container(self):
        """The webhook container as deploy/ renders it."""
        dep = self.rendered("Deployment", "imds-broker-webhook")[0]
        return dep["spec"]["template"]["spec"]["containers"][0]

    def start_webhook(self):
        self.webhook = self.run_webhook(
            "imds-broker-webhook", self.webhook_container(), listen=f"127.0.0.1:{self.webhook_port}",
            admin_port=self.webhook_admin_port, tls_dir=self.webhook_tls,
            token_file=self.webhook_token_file, log_format="text")

    def run_webhook(self, name, container, listen, admin_port, tls_dir, token_file, log_format=None):
        """`imds-broker webhook` as `container` (a Deployment's) runs it: its args and literal env,
        plus the local addresses, the certificate in `tls_dir` and the API server reached with
        `token_file`. Returns once /readyz answers."""
        env = {"PATH": os.environ.get("PATH", ""), "RUST_LOG": "info",
               **{e["name"]: e["value"] for e in container.get("env", []) if "value" in e}}
        if log_format:
            env["IMDS_BROKER_LOG_FORMAT"] = log_format
        env.update({
            "IMDS_BROKER_WEBHOOK_LISTEN": listen,
            "IMDS_BROKER_WEBHOOK_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
            "IMDS_BROKER_WEBHOOK_TLS_CERT_FILE": f"{tls_dir}/tls.crt",
            "IMDS_BROKER_WEBHOOK_TLS_KEY_FILE": f"{tls_dir}/tls.key",
            "IMDS_BROKER_WEBHOOK_KUBE_API_URL": self.cp.url,
            "IMDS_BROKER_WEBHOOK_KUBE_TOKEN_FILE": token_file,
            "IMDS_BROKER_WEBHOOK_KUBE_CA_FILE": self.cp.ca_file,
            "IMDS_BROKER_WEBHOOK_SHUTDOWN_DELAY": "0s",
        })
        proc = Proc(name, [self.broker_bin, *container["args"]], self.dir, env=env).start()
        wait_for(f"{name} /readyz", lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{admin_port}/readyz", timeout=2).status == 200,
            30, proc=proc.popen, log=proc.log)
        return proc

    def stop_webhook(self):
        self.webhook.stop()

    def webhook_metrics(self):
        with urllib.request.urlopen(
                f"http://127.0.0.1:{self.webhook_admin_port}/metrics", timeout=5) as r:
            return r.read().decode()

    # -- Velero ------------------------------------------------------------------------------

    def velero_bin(self, version):
        return dict(self.velero)[version]

    def install_velero(self, version):
        """What `velero install --dry-run -o yaml --use-node-agent` prints, applied with
        server-side apply (a later version is an upgrade over the earlier one). The
        ServiceAccount is velero-server, as the docs (and Velero's Helm chart) name it;
        `--service-account-name` makes the installer leave creating it to us."""
        cp = self.cp
        creds = cp.write_secret_file("velero-credentials", (
            "AZURE_SUBSCRIPTION_ID=00000000-0000-0000-0000-000000000000\n"
            "AZURE_RESOURCE_GROUP=MC_rg_aks_westeurope\n"
            "AZURE_CLOUD_NAME=AzurePublicCloud\n"
            f"AZURE_CLIENT_ID={self.entra['client_id']}\n"))
        res = subprocess.run([
            self.velero_bin(version), "velero", "install", "--dry-run", "-o", "yaml",
            "--kubeconfig", cp.kubeconfig,
            "--use-node-agent", "--provider", "azure",
            "--plugins", "velero/velero-plugin-for-microsoft-azure:v1.11.0",
            "--bucket", "velero", "--secret-file", creds,
            "--backup-location-config",
            "resourceGroup=rg,storageAccount=velerobackups,useAAD=true,"
            "storageAccountURI=https://velerobackups.blob.core.windows.net",
            "--use-volume-snapshots=false",
            "--service-account-name", VELERO_SA,
        ], capture_output=True, text=True)
        assert res.returncode == 0, f"velero {version} install --dry-run:\n{res.stderr}"
        docs = [d for d in yaml.safe_load_all(res.stdout) if d]
        if len(docs) == 1 and docs[0].get("kind") == "List":
            docs = docs[0]["items"]
        crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
        rest = [d for d in docs if d["kind"] != "CustomResourceDefinition"]
        assert crds and rest, f"velero {version} printed {len(crds)} CRDs, {len(rest)} others"
        ssa = ["apply", "--server-side", "--force-conflicts", "--field-manager", "velero-install",
               "-f", "-"]
        cp.kubectl(*ssa, input=yaml.safe_dump_all(crds))
        cp.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                   *[f"crd/{c['metadata']['name']}" for c in crds])
        namespace = [d for d in rest if d["kind"] == "Namespace"]
        others = [d for d in rest if d["kind"] != "Namespace"]
        cp.kubectl(*ssa, input=yaml.safe_dump_all(namespace))
        # The ServiceAccount (annotated as docs/velero-on-aks.md step 4 says) and its binding,
        # as the Helm chart creates them; before the Deployment/DaemonSet that use it.
        sa = {"apiVersion": "v1", "kind": "ServiceAccount",
              "metadata": {"name": VELERO_SA, "namespace": VELERO_NS, "annotations": {
                  "azure.workload.identity/client-id": self.entra["client_id"],
                  "azure.workload.identity/tenant-id": self.entra["tenant_id"]}}}
        crb = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": VELERO_SA},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                           "name": "cluster-admin"},
               "subjects": [{"kind": "ServiceAccount", "name": VELERO_SA,
                             "namespace": VELERO_NS}]}
        cp.kubectl(*ssa, input=yaml.safe_dump_all([sa, crb]))
        cp.kubectl(*ssa, input=yaml.safe_dump_all(others))
        self.installed_velero = version
        self.velero_objects = docs
        return docs

    def velero_driver(self, version, *args):
        res = subprocess.run([self.velero_bin(version), *args], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, f"velero {version} driver {args}:\n{res.stderr[-4000:]}"
        return json.loads(res.stdout.strip().splitlines()[-1])

    def cleanup(self):
        self.cp.stop()


@pytest.fixture(scope="session")
def cluster():
    run_dir = os.environ.get("CLUSTER_RUN_DIR") or os.path.join(ROOT, "target", "cluster-run")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    c = Cluster(run_dir)
    try:
        started = time.monotonic()
        c.cp.start()
        print(f"\ncontrol plane up in {time.monotonic() - started:.1f}s ({c.cp.url})")
        # Anonymous OIDC discovery, as a public issuer serves it (AKS's OIDC issuer is public):
        # the fake Entra fetches the discovery document and JWKS without credentials.
        c.cp.kubectl("create", "clusterrolebinding", "oidc-discovery-anonymous",
                     "--clusterrole=system:service-account-issuer-discovery",
                     "--group=system:unauthenticated")
        c.start_fake_entra()
        # A Linux node object (no kubelet behind it): Velero's pods and the DaemonSet look
        # for one; a fixture pod is bound to this node name.
        for node in ("node-1", "aks-nodepool1-31415926-vmss000002"):
            c.api.post("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {
                "name": node, "labels": {"kubernetes.io/os": "linux",
                                         "kubernetes.io/hostname": node}}})
        c.install_imds_broker()
        yield c
    finally:
        if c.webhook:
            c.webhook.popen and c.webhook.running() and c.webhook.signal(signal.SIGCONT)
            c.webhook.stop()
        c.cleanup()


@pytest.fixture(scope="session")
def api(cluster):
    return cluster.api


@pytest.fixture(scope="module")
def helm(cluster):
    """The real `helm` (HELM_BIN: the packaging stage's pinned build) against this API server;
    returns its stdout, fails the test with its output on a non-zero exit."""
    binary = env_path("HELM_BIN")

    def run(*args):
        res = subprocess.run([binary, "--kubeconfig", cluster.cp.kubeconfig, *args],
                             capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, f"helm {' '.join(args)}:\n{res.stdout}\n{res.stderr}"
        return res.stdout

    return run
