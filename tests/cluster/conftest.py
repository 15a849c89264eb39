"""Session set-up for the cluster tests: the control plane, the fake Entra trusting the API
server's service-account issuer, imds-broker installed from deploy/overlays/manual-tls the way
docs/velero-on-aks.md ("Without cert-manager") says, and a local `imds-broker webhook`.

Inputs (set by scripts/test-cluster.sh):
  CLUSTER_BIN_DIR     kube-apiserver, kube-controller-manager, etcd, kubectl
  VELERO_BINS         "v1.15.0=/path/velero-v1.15,v1.18.3=/path/velero-v1.18" (first = oldest)
  IMDS_BROKER_BIN     the cargo-built imds-broker binary
  FAKE_ENTRA_BIN      the cargo-built fake_entra example
  CLUSTER_RUN_DIR     where logs, certificates and state go (kept for inspection)
  HELM_BIN            the real helm (charts/imds-broker, cert-manager's chart)
  CERT_MANAGER_BIN_DIR, CERT_MANAGER_CHART, CERT_MANAGER_VERSION
                      cert-manager's controller, cainjector and webhook, its chart from the
                      same module release, and that release (the `cert_manager` fixture)
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
from harness import (Api, ControlPlane, LocalAddresses, Proc, container_env, expand_args,
                     free_port, make_pod_ready, project_secret, wait_for,
                     wait_for_ready_endpoint)

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

    def run_webhook_as_deployed(self, name, ns, deployment, ip):
        """`imds-broker webhook` as a pod of the stored Deployment `ns/deployment` runs it: its
        args and env, the Secret its `tls` volume mounts projected into a directory as kubelet
        does (project_secret; call it again with the Secret's new data after a renewal), the
        Deployment's ServiceAccount as its API identity (a TokenRequest token), listening on
        ip:<the https containerPort>. Returns (Proc, container, tls_dir, port)."""
        api = self.api
        dep = api.get(f"/apis/apps/v1/namespaces/{ns}/deployments/{deployment}")
        pod = dep["spec"]["template"]["spec"]
        container = pod["containers"][0]
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == "https")
        volume = next(v for v in pod["volumes"] if v["name"] == "tls")
        secret = api.get(f"/api/v1/namespaces/{ns}/secrets/{volume['secret']['secretName']}")
        tls = os.path.join(self.dir, f"{name}-tls")
        project_secret(tls, secret["data"])
        token = self.cp.write_secret_file(
            f"{name}-sa.token", self.cp.token_request(ns, pod["serviceAccountName"]))
        proc = self.run_webhook(name, container, listen=f"{ip}:{port}", admin_port=free_port(),
                                tls_dir=tls, token_file=token)
        return proc, container, tls, port

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


def run_helm(cluster, *args):
    """The real `helm` (HELM_BIN: the packaging stage's pinned build) against this API server;
    returns its stdout, fails the test with its output on a non-zero exit."""
    res = subprocess.run([env_path("HELM_BIN"), "--kubeconfig", cluster.cp.kubeconfig, *args],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, f"helm {' '.join(args)}:\n{res.stdout}\n{res.stderr}"
    return res.stdout


@pytest.fixture(scope="module")
def helm(cluster):
    return lambda *args: run_helm(cluster, *args)


@pytest.fixture(scope="session")
def local_addresses():
    """Adds addresses to `lo` for "pods" (LocalAddresses); removes what it added at the end."""
    addresses = LocalAddresses()
    try:
        yield addresses
    finally:
        addresses.remove_all()


# -- cert-manager ------------------------------------------------------------------------------

CERT_MANAGER_NS = "cert-manager"
CERT_MANAGER_RELEASE = "cert-manager"
# The address of the cert-manager webhook's "pod" (on lo), where the API server calls it.
CERT_MANAGER_WEBHOOK_IP = "10.255.254.2"


class CertManager:
    """cert-manager as its own Helm chart installs it, with its three components running here.

    The chart (deploy/charts/cert-manager of the pinned module release, rendered by the real
    helm with `crds.enabled=true`) creates the CRDs, ServiceAccounts, RBAC, Deployments,
    Services and the webhook configurations, unchanged but for three values: the post-install
    startupapicheck Job is off (no kubelet runs it, so helm would wait for it until timeout),
    the webhook's securePort is a free port (the cert-manager webhook listens on all
    interfaces), and the chart version is the release's (its release tool stamps it). Each
    Deployment's container is then run as a local process, with the Deployment's args (the
    $(POD_NAMESPACE) references expanded as kubelet does) and a kubeconfig holding a
    TokenRequest token of the Deployment's own ServiceAccount, so the chart's RBAC is what they
    get. Added locally: --kubeconfig, --leader-elect=false, and metrics/health listeners on
    free 127.0.0.1 ports. The webhook's pod is marked Ready at CERT_MANAGER_WEBHOOK_IP, so the
    API server calls it through the chart's Service and verifies the certificate the webhook
    issues itself, whose CA the cainjector puts into the webhook configurations, as in a
    cluster.

    ensure() is idempotent: it installs or upgrades the release and starts only what is not
    running, then waits until cert-manager has issued a Certificate end to end.
    """

    COMPONENTS = ("webhook", "cainjector", "controller")

    def __init__(self, cluster, addresses):
        self.cluster = cluster
        self.addresses = addresses
        self.bin_dir = env_path("CERT_MANAGER_BIN_DIR")
        self.chart_src = env_path("CERT_MANAGER_CHART")
        self.version = env_path("CERT_MANAGER_VERSION")
        self.procs = {}
        self.webhook_port = None
        self.health = {}

    @property
    def api(self):
        return self.cluster.api

    def deployment_name(self, component):
        return CERT_MANAGER_RELEASE if component == "controller" else f"{CERT_MANAGER_RELEASE}-{component}"

    def chart(self):
        """The module's chart, copied (the module cache is read-only) and stamped with the
        release's version as cert-manager's release tool does."""
        chart = os.path.join(self.cluster.dir, "cert-manager-chart")
        if not os.path.isdir(chart):
            shutil.copytree(self.chart_src, chart)
            for root, dirs, files in os.walk(chart):
                for name in dirs + files:
                    os.chmod(os.path.join(root, name), 0o755 if name in dirs else 0o644)
            os.chmod(chart, 0o755)
            path = os.path.join(chart, "Chart.yaml")
            with open(path) as f:
                meta = yaml.safe_load(f)
            meta["version"] = meta["appVersion"] = self.version
            with open(path, "w") as f:
                yaml.safe_dump(meta, f, sort_keys=False)
        return chart

    def install(self):
        if self.webhook_port is None:
            self.webhook_port = free_port()
        run_helm(self.cluster, "upgrade", "--install", CERT_MANAGER_RELEASE, self.chart(),
                 "-n", CERT_MANAGER_NS, "--create-namespace",
                 "--set", "crds.enabled=true",
                 "--set", "startupapicheck.enabled=false",
                 "--set", f"webhook.securePort={self.webhook_port}")

    def start(self, component):
        ns = CERT_MANAGER_NS
        cp = self.cluster.cp
        dep = self.api.get(f"/apis/apps/v1/namespaces/{ns}/deployments/{self.deployment_name(component)}")
        pod = dep["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = container_env(container, ns)
        sa = pod["serviceAccountName"]
        kubeconfig = os.path.join(cp.dir, f"cert-manager-{component}.kubeconfig")
        cp.write_kubeconfig(kubeconfig, {"token": cp.token_request(ns, sa, seconds=86400)})
        health = free_port()
        local = [f"--kubeconfig={kubeconfig}", f"--metrics-listen-address=127.0.0.1:{free_port()}"]
        if component == "controller":
            local += ["--leader-elect=false", f"--internal-healthz-listen-address=127.0.0.1:{health}"]
            url = f"http://127.0.0.1:{health}/livez"
        elif component == "cainjector":
            local += ["--leader-elect=false"]
            url = None
        else:
            local += [f"--healthz-port={health}"]
            url = f"http://127.0.0.1:{health}/healthz"
        argv = [os.path.join(self.bin_dir, component),
                *expand_args(container.get("args", []), env), *local]
        proc = Proc(f"cert-manager-{component}", argv, self.cluster.dir,
                    env={"PATH": os.environ.get("PATH", ""), **env}).start()
        self.procs[component] = proc
        if url:
            wait_for(f"cert-manager {component} {url}", lambda: urllib.request.urlopen(
                url, timeout=2).status == 200, 60, proc=proc.popen, log=proc.log)

    def ensure(self):
        if self.procs and all(p.running() for p in self.procs.values()):
            return self
        api = self.api
        self.addresses.add(CERT_MANAGER_WEBHOOK_IP)
        self.install()
        for component in self.COMPONENTS:
            if component not in self.procs or not self.procs[component].running():
                self.start(component)
        webhook = self.deployment_name("webhook")
        make_pod_ready(api, CERT_MANAGER_NS, f"app.kubernetes.io/instance={CERT_MANAGER_RELEASE},"
                       "app.kubernetes.io/component=webhook", CERT_MANAGER_WEBHOOK_IP)
        wait_for_ready_endpoint(api, CERT_MANAGER_NS, webhook, CERT_MANAGER_WEBHOOK_IP)

        # The webhook made its CA; the cainjector put it into both webhook configurations.
        def injected():
            ca = api.get(f"/api/v1/namespaces/{CERT_MANAGER_NS}/secrets/{webhook}-ca")["data"]["ca.crt"]
            configs = [api.get(f"/apis/admissionregistration.k8s.io/v1/{kind}/{webhook}")
                       for kind in ("validatingwebhookconfigurations", "mutatingwebhookconfigurations")]
            return all(w["clientConfig"].get("caBundle") == ca for c in configs for w in c["webhooks"])
        wait_for("the cainjector's caBundle in cert-manager's webhook configurations", injected, 60,
                 proc=self.procs["cainjector"].popen, log=self.procs["cainjector"].log)

        # End to end, as cert-manager's startupapicheck does and more: an Issuer and a Certificate
        # admitted through the webhook, issued by the controller.
        probe = [
            {"apiVersion": "cert-manager.io/v1", "kind": "Issuer",
             "metadata": {"name": "readiness-probe", "namespace": CERT_MANAGER_NS},
             "spec": {"selfSigned": {}}},
            {"apiVersion": "cert-manager.io/v1", "kind": "Certificate",
             "metadata": {"name": "readiness-probe", "namespace": CERT_MANAGER_NS},
             "spec": {"secretName": "readiness-probe", "commonName": "readiness-probe",
                      "issuerRef": {"kind": "Issuer", "name": "readiness-probe"}}},
        ]
        # The webhook may refuse until the API server has picked up the injected caBundle.
        wait_for("an Issuer and a Certificate admitted by cert-manager's webhook", lambda: self.cluster.cp.kubectl(
            "apply", "--server-side", "--field-manager", "cluster-test", "-f", "-",
            input=yaml.safe_dump_all(probe)), 60, log=self.procs["webhook"].log)
        self.wait_certificate_ready(CERT_MANAGER_NS, "readiness-probe", 60)
        return self

    def certificate(self, ns, name):
        return self.api.get(f"/apis/cert-manager.io/v1/namespaces/{ns}/certificates/{name}")

    def wait_certificate_ready(self, ns, name, timeout, revision=None):
        """Until the Certificate is Ready (and, if given, at least at `revision`)."""
        def ready():
            status = self.certificate(ns, name).get("status", {})
            ok = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))
            return status if ok and status.get("revision", 0) >= (revision or 0) else None
        return wait_for(f"Certificate {ns}/{name} Ready", ready, timeout,
                        proc=self.procs["controller"].popen, log=self.procs["controller"].log)

    def renew(self, ns, name):
        """What `cmctl renew` does: the Issuing condition set to True (ManuallyTriggered) on the
        Certificate's status; the controller then issues a new certificate."""
        crt = self.certificate(ns, name)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        conditions = [c for c in crt["status"].get("conditions", []) if c["type"] != "Issuing"]
        conditions.append({"type": "Issuing", "status": "True", "reason": "ManuallyTriggered",
                           "message": "Certificate re-issuance manually triggered",
                           "lastTransitionTime": now,
                           "observedGeneration": crt["metadata"]["generation"]})
        self.api.request("PUT", f"/apis/cert-manager.io/v1/namespaces/{ns}/certificates/{name}/status",
                         {**crt, "status": {**crt["status"], "conditions": conditions}})
        return crt["status"].get("revision", 0)

    def stop(self):
        for component in reversed(self.COMPONENTS):
            proc = self.procs.pop(component, None)
            if proc:
                proc.stop()


@pytest.fixture(scope="session")
def cert_manager(cluster, local_addresses):
    """cert-manager (CertManager) installed and running for the rest of the session."""
    cm = CertManager(cluster, local_addresses)
    try:
        yield cm.ensure()
    finally:
        cm.stop()
