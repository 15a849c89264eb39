"""A real Kubernetes control plane on 127.0.0.1 for the cluster tests, started the way envtest
starts one: etcd, kube-apiserver (client-certificate admin in system:masters, RBAC, a
service-account issuer with its signing key, the default admission plugins including
ServiceAccount, PodSecurity and MutatingAdmissionWebhook) and kube-controller-manager (so the
Job, ReplicaSet, DaemonSet, ServiceAccount and garbage-collector controllers run). No kubelet and
no scheduler: pods are stored, admitted and validated, never run.

Also the processes around it: `imds-broker webhook`, the fake Entra, the broker. Every process is
started here, logs to a file in the run directory, and is stopped by its own PID.

Nothing here prints a token: tokens are written to files (mode 0600) in the run directory.
"""

import base64
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import yaml


def free_port(address="127.0.0.1"):
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def wait_for(what, check, timeout, interval=0.1, proc=None, log=None):
    """Polls check() until it returns a truthy value (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout
    last_err = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited ({proc.returncode})\n{tail(log)}")
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - keep polling, report the last error
            last_err = e
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout}s (last error: {last_err})\n{tail(log)}")


def tail(path, lines=40):
    if not path or not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# PKI with the openssl CLI (the same tool docs/velero-on-aks.md uses for the manual-TLS overlay)


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d, name, cn):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-days", "2", "-subj", f"/CN={cn}", "-keyout", f"{name}.key", "-out", f"{name}.crt",
            cwd=d)


def make_cert(d, ca, name, subj, ext):
    """A certificate signed by `ca` with the given extensions (one per line)."""
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-subj", subj, "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
    with open(os.path.join(d, f"{name}.ext"), "w") as f:
        f.write(ext)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt",
            cwd=d)


# ---------------------------------------------------------------------------------------------
# Processes


class Proc:
    """A child process started by the tests, stopped by its own PID."""

    def __init__(self, name, argv, log_dir, env=None):
        self.name = name
        self.argv = argv
        self.log = os.path.join(log_dir, f"{name}.log")
        self.env = env
        self.popen = None

    def start(self):
        out = open(self.log, "ab")
        self.popen = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=self.env)
        out.close()
        return self

    @property
    def pid(self):
        return self.popen.pid

    def running(self):
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig):
        os.kill(self.popen.pid, sig)

    def stop(self, timeout=15):
        if not self.running():
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


# ---------------------------------------------------------------------------------------------
# The API server's REST API (plain HTTPS with the admin client certificate)


class ApiError(Exception):
    def __init__(self, status, body):
        super().__init__(f"HTTP {status}: {body.get('message', body) if isinstance(body, dict) else body}")
        self.status = status
        self.body = body

    @property
    def message(self):
        return self.body.get("message", "") if isinstance(self.body, dict) else str(self.body)


class Api:
    def __init__(self, url, ca_file, cert_file=None, key_file=None, token=None):
        self.url = url.rstrip("/")
        self.ctx = ssl.create_default_context(cafile=ca_file)
        if cert_file:
            self.ctx.load_cert_chain(cert_file, key_file)
        self.token = token

    def request(self, method, path, body=None, content_type="application/json", query=None,
                timeout=30, want_headers=False):
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=timeout) as resp:
                raw = resp.read()
                doc = json.loads(raw) if raw else None
                if want_headers:
                    return doc, resp.headers
                return doc
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = raw.decode(errors="replace")
            raise ApiError(e.code, parsed) from None

    def raw(self, path, timeout=10):
        req = urllib.request.Request(self.url + path)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(req, context=self.ctx, timeout=timeout) as resp:
            return resp.read()

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body, **kw):
        return self.request("POST", path, body, **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)

    def patch(self, path, body, content_type="application/merge-patch+json", **kw):
        return self.request("PATCH", path, body, content_type=content_type, **kw)


def pods_path(ns, name=None):
    return f"/api/v1/namespaces/{ns}/pods" + (f"/{name}" if name else "")


# ---------------------------------------------------------------------------------------------
# The control plane


class ControlPlane:
    def __init__(self, bin_dir, run_dir, address="127.0.0.1", for_nodes=False):
        """`address`: where the API server listens and what it advertises (a real node's
        pods reach it there: tests/cluster/node). `for_nodes`: also the Node authorizer and
        NodeRestriction (a kubelet's own credentials, as on AKS) and a client certificate
        for calling kubelets (logs, exec)."""
        self.bin_dir = bin_dir
        self.dir = run_dir
        self.pki = os.path.join(run_dir, "pki")
        os.makedirs(self.pki, exist_ok=True)
        self.procs = []
        self.address = address
        self.for_nodes = for_nodes
        self.api_port = free_port(address)
        self.url = f"https://{address}:{self.api_port}"
        # The service-account issuer is the API server itself, as on AKS with the OIDC issuer
        # on (there the issuer URL is public; here it is the loopback address).
        self.issuer = self.url
        self.kubeconfig = os.path.join(run_dir, "admin.kubeconfig")

    def bin(self, name):
        return os.path.join(self.bin_dir, name)

    def make_pki(self):
        d = self.pki
        make_ca(d, "ca", "cluster-test-ca")
        make_cert(d, "ca", "apiserver", "/CN=kube-apiserver",
                  "subjectAltName=IP:127.0.0.1,DNS:localhost"
                  + (f",IP:{self.address}" if self.address != "127.0.0.1" else "")
                  # In-cluster clients (pods on a real node) use the `kubernetes` Service.
                  + (",IP:10.0.0.1,DNS:kubernetes.default.svc,DNS:kubernetes.default"
                     if self.for_nodes else "") + "\n"
                  "extendedKeyUsage=serverAuth\n")
        # envtest's admin: a client certificate in system:masters.
        make_cert(d, "ca", "admin", "/O=system:masters/CN=cluster-test-admin",
                  "extendedKeyUsage=clientAuth\n")
        # The service-account signing key (RSA: Entra accepts RS256 assertions only).
        openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
        openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)
        self.ca_file = os.path.join(d, "ca.crt")

    def write_kubeconfig(self, path, user):
        config = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "test", "cluster": {
                "server": self.url, "certificate-authority": self.ca_file}}],
            "users": [{"name": "u", "user": user}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "u"}}],
            "current-context": "test",
        }
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        os.chmod(path, 0o600)

    def start(self):
        self.make_pki()
        p = self.pki
        etcd_port, etcd_peer = free_port(), free_port()
        etcd = Proc("etcd", [
            self.bin("etcd"), "--name", "default", "--data-dir", os.path.join(self.dir, "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-cluster", f"default=http://127.0.0.1:{etcd_peer}",
            "--listen-metrics-urls", f"http://127.0.0.1:{free_port()}",
            "--unsafe-no-fsync",  # a throw-away store; fsync only slows the tests
        ], self.dir).start()
        self.procs.append(etcd)
        wait_for("etcd health", lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{etcd_port}/health", timeout=2).status == 200,
            30, proc=etcd.popen, log=etcd.log)

        node_args = []
        if self.for_nodes:
            node_args = ["--kubelet-client-certificate", f"{p}/admin.crt",
                         "--kubelet-client-key", f"{p}/admin.key",
                         # Node names do not resolve here; the kubelet's address does.
                         "--kubelet-preferred-address-types", "InternalIP"]
        if self.address == "127.0.0.1":
            # A loopback advertise address is refused by the endpoint reconciler of the
            # `kubernetes` Service; nothing here reaches the API server through that Service.
            node_args += ["--endpoint-reconciler-type", "none"]
        apiserver = Proc("kube-apiserver", [
            self.bin("kube-apiserver"),
            "--etcd-servers", f"http://127.0.0.1:{etcd_port}",
            "--bind-address", self.address, "--advertise-address", self.address,
            *node_args,
            "--secure-port", str(self.api_port),
            "--cert-dir", os.path.join(self.dir, "apiserver-certs"),
            "--tls-cert-file", f"{p}/apiserver.crt", "--tls-private-key-file", f"{p}/apiserver.key",
            "--client-ca-file", f"{p}/ca.crt",
            "--service-cluster-ip-range", "10.0.0.0/24",
            "--allow-privileged=true",
            "--authorization-mode", "Node,RBAC" if self.for_nodes else "RBAC",
            "--service-account-issuer", self.issuer,
            "--service-account-key-file", f"{p}/sa.pub",
            "--service-account-signing-key-file", f"{p}/sa.key",
            # The defaults, named so a change of defaults cannot silently drop one the tests
            # rely on (ServiceAccount, PodSecurity, the webhooks).
            "--enable-admission-plugins",
            "NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultTolerationSeconds,Priority,"
            "PodSecurity,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ResourceQuota"
            + (",NodeRestriction" if self.for_nodes else ""),
            "--profiling=false",
            # Webhooks with a Service clientConfig (the Helm chart's) are called at the
            # Service's ready endpoints, not its ClusterIP: no kube-proxy runs here.
            "--enable-aggregator-routing=true",
        ], self.dir).start()
        self.procs.append(apiserver)
        self.apiserver = apiserver
        self.admin = Api(self.url, self.ca_file, f"{p}/admin.crt", f"{p}/admin.key")
        wait_for("kube-apiserver /readyz", lambda: self.admin.raw("/readyz") == b"ok",
                 120, interval=0.3, proc=apiserver.popen, log=apiserver.log)
        self.write_kubeconfig(self.kubeconfig, {
            "client-certificate": f"{p}/admin.crt", "client-key": f"{p}/admin.key"})

        kcm = Proc("kube-controller-manager", [
            self.bin("kube-controller-manager"),
            "--kubeconfig", self.kubeconfig,
            "--authentication-kubeconfig", self.kubeconfig,
            "--authorization-kubeconfig", self.kubeconfig,
            "--leader-elect=false",
            "--bind-address", "127.0.0.1", "--secure-port", str(free_port()),
            "--cert-dir", os.path.join(self.dir, "kcm-certs"),
            "--service-account-private-key-file", f"{p}/sa.key",
            "--root-ca-file", f"{p}/ca.crt",
            "--use-service-account-credentials=false",
            "--controllers", "*",
            # Fast enough for tests: the Job controller syncs at once on a new Job anyway.
            "--concurrent-job-syncs", "2",
        ], self.dir).start()
        self.procs.append(kcm)
        self.kcm = kcm
        # The ServiceAccount controller creates `default` in every namespace: proof it runs.
        wait_for("kube-controller-manager (default ServiceAccount)",
                 lambda: self.admin.get("/api/v1/namespaces/default/serviceaccounts/default"),
                 120, interval=0.3, proc=kcm.popen, log=kcm.log)

    def stop(self):
        for proc in reversed(self.procs):
            proc.stop()

    # -- helpers ---------------------------------------------------------------------------

    def kubectl(self, *args, input=None, check=True, kubeconfig=None):
        res = subprocess.run([self.bin("kubectl"), "--kubeconfig", kubeconfig or self.kubeconfig,
                              *args], input=input, capture_output=True, text=True)
        if check and res.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({res.returncode}):\n"
                               f"{res.stdout}\n{res.stderr}")
        return res

    def token_request(self, ns, sa, audiences=None, seconds=3600, bound_pod=None):
        """A service-account token through the TokenRequest API (as kubelet asks for one)."""
        spec = {"expirationSeconds": seconds}
        if audiences:
            spec["audiences"] = audiences
        if bound_pod:
            spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1",
                                      "name": bound_pod["metadata"]["name"],
                                      "uid": bound_pod["metadata"]["uid"]}
        out = self.admin.post(f"/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token",
                              {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                               "spec": spec})
        return out["status"]["token"]

    def write_secret_file(self, name, text):
        path = os.path.join(self.dir, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path


# ---------------------------------------------------------------------------------------------
# kubelet's part (there is no kubelet): addresses for "pods", Ready pods, env expansion in
# args, Secret volumes


class LocalAddresses:
    """Addresses of this host the API server can route to that are not loopback (Endpoints
    refuse 127.0.0.0/8), kept on the loopback interface: nothing leaves the machine. Each is
    added once and removed by remove_all(), only if this run added it."""

    def __init__(self):
        self.added = []

    def add(self, ip):
        if ip in self.added:
            return ip
        res = subprocess.run(["ip", "addr", "add", f"{ip}/32", "dev", "lo"],
                             capture_output=True, text=True)
        if res.returncode == 0:
            self.added.append(ip)
        elif "File exists" not in res.stderr:
            raise RuntimeError(f"cannot add {ip} to lo (the cluster stage runs as root): {res.stderr}")
        return ip

    def remove_all(self):
        while self.added:
            subprocess.run(["ip", "addr", "del", f"{self.added.pop()}/32", "dev", "lo"],
                           capture_output=True)


def make_pod_ready(api, ns, selector, ip, node="node-1"):
    """kubelet's part: the first pod matching `selector` (made by a Deployment's ReplicaSet)
    bound to a node and Ready at `ip`. Returns the pod's name."""
    pods = wait_for(f"pods {selector} in {ns}", lambda: api.get(
        pods_path(ns), query={"labelSelector": selector})["items"] or None, 60)
    pod = pods[0]
    name = pod["metadata"]["name"]
    if not pod["spec"].get("nodeName"):
        api.post(f"{pods_path(ns, name)}/binding", {
            "apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node}})
    containers = pod["spec"]["containers"]
    api.patch(f"{pods_path(ns, name)}/status", {"status": {
        "phase": "Running", "hostIP": ip, "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": t, "status": "True"} for t in
                       ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
        "containerStatuses": [{"name": c["name"], "image": c["image"], "imageID": "", "ready": True,
                               "restartCount": 0, "started": True,
                               "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}
                              for c in containers]}})
    return name


def wait_for_ready_endpoint(api, ns, service, ip, timeout=60):
    """Until the Service's EndpointSlices hold `ip` as a ready endpoint (the EndpointSlice
    controller's work after make_pod_ready)."""
    def ready():
        slices = api.get(f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
                         query={"labelSelector": f"kubernetes.io/service-name={service}"})["items"]
        return any(ip in ep["addresses"] and ep.get("conditions", {}).get("ready")
                   for s in slices for ep in s.get("endpoints") or [])
    wait_for(f"the Service {ns}/{service}'s endpoint at {ip}", ready, timeout)


def container_env(container, namespace):
    """A container's env as kubelet resolves it for a pod in `namespace`: literal values and
    the metadata.namespace fieldRef (the only downward-API field the charts here use)."""
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif (e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")) == "metadata.namespace":
            env[e["name"]] = namespace
    return env


def expand_args(args, env):
    """kubelet's $(VAR) expansion of container args ($$ escapes, unknown names stay as they are)."""
    return [re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                   lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), a)
            for a in args]


def project_secret(directory, data):
    """Writes a Secret's data into `directory` as kubelet updates a Secret volume (its
    AtomicWriter): the files go into a new timestamped directory, `..data` is swapped to it by
    one rename, and each key is a symlink through `..data`, so a reader sees either the old or
    the new set, never a mix."""
    os.makedirs(directory, exist_ok=True)
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.") + str(time.monotonic_ns() % 1_000_000_000)
    payload = os.path.join(directory, stamp)
    os.mkdir(payload, 0o700)
    for key, value in data.items():
        fd = os.open(os.path.join(payload, key), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(base64.b64decode(value))
    link = os.path.join(directory, "..data")
    old = os.readlink(link) if os.path.islink(link) else None
    tmp = os.path.join(directory, "..data_tmp")
    os.symlink(stamp, tmp)
    os.rename(tmp, link)
    for key in data:
        path = os.path.join(directory, key)
        if not os.path.islink(path):
            os.symlink(os.path.join("..data", key), path)
    if old:
        shutil.rmtree(os.path.join(directory, old), ignore_errors=True)


def served_certificate(host, port, server_name=None):
    """The PEM certificate a TLS server presents (no verification: the caller compares it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=5) as sock:
        with ctx.wrap_socket(sock, server_hostname=server_name or host) as tls:
            return ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True))


def x509_fields(pem, cwd):
    """serial, subject, issuer, SANs (list) and CA flag of a PEM certificate, by openssl."""
    res = subprocess.run(["openssl", "x509", "-noout", "-serial", "-subject", "-issuer",
                          "-ext", "subjectAltName,basicConstraints", "-nameopt", "RFC2253"],
                         input=pem, capture_output=True, text=True, cwd=cwd, check=True)
    out = res.stdout
    fields = {"sans": [], "ca": False}
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("serial="):
            fields["serial"] = line.split("=", 1)[1]
        elif line.startswith("subject="):
            fields["subject"] = line.split("=", 1)[1]
        elif line.startswith("issuer="):
            fields["issuer"] = line.split("=", 1)[1]
        elif "Subject Alternative Name" in line and i + 1 < len(lines):
            fields["sans"] = [n.strip() for n in lines[i + 1].split(",")]
        elif "CA:TRUE" in line:
            fields["ca"] = True
    return fields


def verify_chain(leaf_pem, ca_pem, workdir, purpose="sslserver"):
    """openssl verify of `leaf_pem` against `ca_pem` only; returns (ok, output)."""
    ca_path = os.path.join(workdir, "verify-ca.pem")
    leaf_path = os.path.join(workdir, "verify-leaf.pem")
    for path, pem in ((ca_path, ca_pem), (leaf_path, leaf_pem)):
        with open(path, "w") as f:
            f.write(pem)
    res = subprocess.run(["openssl", "verify", "-purpose", purpose, "-CAfile", ca_path, leaf_path],
                         capture_output=True, text=True)
    return res.returncode == 0, (res.stdout + res.stderr).strip()


def jwt_claims(token):
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
