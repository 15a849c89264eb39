"""Azurite (the real Azure Storage emulator) with OAuth on, and an emulated imds-broker, for
test_storage_azurite.py and scripts/demo.

- Azurite's blob service runs from tests/conformance/storage-node/node_modules (npm `azurite`
  3.35.0), on 127.0.0.1 with an ephemeral port, HTTPS with a certificate made here at start
  (a throw-away CA and a server certificate for 127.0.0.1/localhost), `--oauth basic` (it then
  checks a bearer token's issuer, audience and lifetime, not its signature), in-memory storage,
  API-version check off (the SDKs are newer than Azurite 3.35), telemetry off (Azurite otherwise reports to an outside endpoint).
- The broker is `imds-broker serve --emulate`: its v1 tokens (issuer https://sts.windows.net/…)
  are what Azurite accepts; it serves the App Service endpoint, which is how the SDKs here find it.

Every process is started with its own session and stopped by PID.
"""

import base64
import datetime
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STORAGE_NODE = HERE / "storage-node"
AZURITE_BLOB = STORAGE_NODE / "node_modules" / ".bin" / "azurite-blob"
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
BROKER_BIN = Path(os.environ.get("IMDS_BROKER_BIN", TARGET / "debug" / "imds-broker"))
FAKE_KUBE_PODS_BIN = TARGET / "debug" / "examples" / "fake_kube_pods"

# Azurite's built-in account (its well-known development account; path-style URLs).
ACCOUNT = "devstoreaccount1"
# Defaults of `serve --emulate` (src/serve/mod.rs).
EMULATOR_CLIENT_ID = "11111111-1111-1111-1111-111111111111"
EMULATOR_TENANT_ID = "22222222-2222-2222-2222-222222222222"
STORAGE_IDENTITY_HEADER = "storage-e2e-identity-header-5ecr3t"


def _deadline_poll(cond, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Child:
    """A child process in its own session; stdout+stderr lines collected by a thread."""

    def __init__(self, argv, env, cwd=None):
        self.argv = argv
        self.proc = subprocess.Popen(
            [str(a) for a in argv],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def output(self):
        with self._lock:
            return list(self.lines)

    def wait_line(self, pattern, timeout, what):
        rx = re.compile(pattern)

        def found():
            if self.proc.poll() is not None:
                raise AssertionError(f"{what}: process exited ({self.proc.returncode}):\n" + "\n".join(self.output()[-40:]))
            for line in self.output():
                m = rx.search(line)
                if m:
                    return m
            return None

        return _deadline_poll(found, timeout, what)

    def stop(self):
        """SIGTERM this PID (not its group: we started it, we stop it), then SIGKILL after 10 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- test PKI -----------------------------------------------------------------------------------

def make_test_pki(directory, extra_ips=()):
    """A throw-away CA and a server certificate for 127.0.0.1, localhost and `extra_ips` (EC
    P-256, 1 day). Returns {"ca": path, "cert": path, "key": path} (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    import ipaddress

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imds-broker storage-e2e test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", *extra_ips)] + [x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": directory / "ca.pem", "cert": directory / "server.pem", "key": directory / "server-key.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return {k: str(v) for k, v in paths.items()}


# --- Azurite ------------------------------------------------------------------------------------

class Azurite:
    """Azurite's blob service, HTTPS + `--oauth basic`, on <host>:<ephemeral> (the PKI's
    certificate must name `host`)."""

    def __init__(self, pki, workdir, host="127.0.0.1"):
        if not AZURITE_BLOB.exists():
            raise AssertionError(f"{AZURITE_BLOB} is missing: run scripts/test-storage.sh (it runs npm ci)")
        self.pki = pki
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(workdir), "LANG": "C.UTF-8"}
        self.child = Child(
            [
                AZURITE_BLOB,
                "--blobHost", host,
                "--blobPort", "0",
                "--oauth", "basic",
                "--cert", pki["cert"],
                "--key", pki["key"],
                "--inMemoryPersistence",
                "--disableTelemetry",
                # The pinned SDKs send newer x-ms-version values than Azurite 3.35 lists (up to
                # 2025-11-05); this skips only that header check, not authentication.
                "--skipApiVersionCheck",
            ],
            env=env,
            cwd=str(workdir),
        )
        m = self.child.wait_line(rf"listens on https://{re.escape(host)}:(\d+)", 60, "Azurite's 'listens on' line")
        self.host = host
        self.port = int(m.group(1))
        self.endpoint = f"https://{host}:{self.port}"
        # Path-style account URL, as a BSL's storageAccountURI for Azurite.
        self.account_url = f"{self.endpoint}/{ACCOUNT}"

    def request(self, method, path, token=None, body=None, headers=None):
        """One raw HTTPS request (no SDK) -> (status, error code header, body text)."""
        import http.client
        import ssl

        ctx = ssl.create_default_context(cafile=self.pki["ca"])
        conn = http.client.HTTPSConnection(self.host, self.port, context=ctx, timeout=20)
        hdrs = {"x-ms-version": "2021-08-06", "x-ms-date": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())}
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        hdrs.update(headers or {})
        try:
            conn.request(method, f"/{ACCOUNT}{path}", body=body, headers=hdrs)
            resp = conn.getresponse()
            text = resp.read().decode(errors="replace")
            return resp.status, resp.getheader("x-ms-error-code"), text
        finally:
            conn.close()

    def stop(self):
        self.child.stop()


# --- the emulated broker ------------------------------------------------------------------------

class EmulatedBroker:
    """`imds-broker serve --emulate` on 127.0.0.1:<ephemeral> with the App Service endpoint on.
    `command="node"`, `listen` (the node's address) and `env` (KUBECONFIG) run a node broker."""

    def __init__(self, extra_args=(), identity_header=STORAGE_IDENTITY_HEADER, command="serve",
                 listen="127.0.0.1:0", env=None):
        if not BROKER_BIN.exists():
            raise AssertionError(f"{BROKER_BIN} is missing: run scripts/test-storage.sh (it builds it)")
        self.identity_header = identity_header
        env = {"PATH": os.environ.get("PATH", ""), "RUST_LOG": "info", "IMDS_BROKER_LOG_FORMAT": "json", **(env or {})}
        self.child = Child(
            [
                BROKER_BIN, command, "--emulate",
                "--listen", listen,
                "--admin-listen", "127.0.0.1:0",
                "--identity-header", identity_header,
                *extra_args,
            ],
            env=env,
        )

        def listening():
            if self.child.proc.poll() is not None:
                raise AssertionError("broker exited at start-up:\n" + "\n".join(self.child.output()))
            for line in self.child.output():
                try:
                    j = json.loads(line)
                except ValueError:
                    continue
                if j.get("message") == "imds-broker listening":
                    return j
            return None

        line = _deadline_poll(listening, 20, "the broker's 'imds-broker listening' line")
        self.token_addr = line["listen"].split(",")[0]
        self.admin_addr = line["admin_listen"]
        self.base = f"http://{self.token_addr}"

    def app_service_env(self):
        """What the webhook injects into a pod: the App Service managed-identity endpoint."""
        return {"IDENTITY_ENDPOINT": f"{self.base}/msi/token", "IDENTITY_HEADER": self.identity_header}

    def token(self, resource="https://storage.azure.com"):
        """A token straight from the App Service endpoint, asked for as azidentity asks."""
        import urllib.parse
        import urllib.request

        q = urllib.parse.urlencode({"api-version": "2019-08-01", "resource": resource})
        req = urllib.request.Request(f"{self.base}/msi/token?{q}", headers={"X-IDENTITY-HEADER": self.identity_header})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=10) as r:
            assert r.status == 200
            return json.loads(r.read())["access_token"]

    def metrics(self):
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://{self.admin_addr}/metrics", timeout=10) as r:
            return r.read().decode()

    def token_requests(self, endpoint="app_service", status="200"):
        """imds_broker_http_requests_total for this endpoint and status."""
        total = 0.0
        for m in re.finditer(r"^imds_broker_http_requests_total\{([^}]*)\} (\S+)$", self.metrics(), re.M):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            if labels.get("endpoint") == endpoint and labels.get("status") == status:
                total += float(m.group(2))
        return int(total)

    def log_text(self):
        return "\n".join(self.child.output())

    def stop(self):
        self.child.stop()


# --- the fake pod API (node mode) ---------------------------------------------------------------

class FakeKubePods:
    """examples/fake_kube_pods: the pod list/watch API a node broker attests callers against.
    `kubeconfig` points a broker at it; `add` registers pods (dicts: namespace, name, node,
    service_account, ip)."""

    def __init__(self):
        if not FAKE_KUBE_PODS_BIN.exists():
            raise AssertionError(f"{FAKE_KUBE_PODS_BIN} is missing: run scripts/test-storage.sh (it builds it)")
        self.child = Child([FAKE_KUBE_PODS_BIN], env={"PATH": os.environ.get("PATH", "")})
        info = json.loads(self.child.wait_line(r"^\{.*\}$", 20, "fake_kube_pods' JSON line").group(0))
        self.kubeconfig, self.control = info["kubeconfig"], info["control"]

    def add(self, *pods):
        import urllib.request

        req = urllib.request.Request(f"{self.control}/pods", data=json.dumps(list(pods)).encode(), method="POST",
                                     headers={"content-type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=10) as r:
            assert r.status == 200, r.status

    def stop(self):
        self.child.stop()


# --- tokens for the negative cases --------------------------------------------------------------

def _b64(obj):
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def unsigned_jwt(**claims):
    """A JWT with these claims and a junk signature: Azurite's basic OAuth checks claims only,
    so each negative case changes one claim of an otherwise acceptable token."""
    now = int(time.time())
    base = {
        "aud": "https://storage.azure.com",
        "iss": f"https://sts.windows.net/{EMULATOR_TENANT_ID}/",
        "iat": now - 300,
        "nbf": now - 300,
        "exp": now + 3600,
        "appid": EMULATOR_CLIENT_ID,
        "tid": EMULATOR_TENANT_ID,
        "ver": "1.0",
    }
    base.update(claims)
    base = {k: v for k, v in base.items() if v is not None}
    return f"{_b64({'alg': 'ES256', 'typ': 'JWT'})}.{_b64(base)}.{base64.urlsafe_b64encode(b'not-a-signature').rstrip(b'=').decode()}"


def jwt_claims(token):
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
