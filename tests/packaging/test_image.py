"""The image scripts/build-image assembled without a container engine:

- its docker-archive is what `docker load` reads (manifest.json, config, layers whose sha256
  are the config's diff_ids) and its OCI layout is valid (skopeo inspects it, digests match);
- its configuration is the Dockerfile's runtime stage (user, entrypoint, cmd, ports, labels);
- its root filesystem, unpacked and run in a chroot as UID 65532 with only the image's
  environment, serves a token from `serve --emulate` over 127.0.0.1, and the webhook starts;
- the metrics both serve are exactly the ones docs/monitoring.md documents.
"""

import hashlib
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import tarfile
import time
import urllib.request

import pytest
from dockerfile_parse import DockerfileParser

from conftest import ROOT, cargo_version, env_path

IMAGE_DIR = env_path("IMDS_BROKER_PKG_IMAGE_DIR")
pytestmark = pytest.mark.skipif(
    IMAGE_DIR is None, reason="run through scripts/test-packaging.sh (IMDS_BROKER_PKG_IMAGE_DIR)"
)
VERSION = cargo_version()
UID = 65532


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """The docker-archive unpacked: (directory, manifest entry, config)."""
    d = tmp_path_factory.mktemp("docker-archive")
    with tarfile.open(IMAGE_DIR / f"imds-broker-{VERSION}.docker.tar") as t:
        t.extractall(d, filter="data")
    (entry,) = json.loads((d / "manifest.json").read_text())
    config = json.loads((d / entry["Config"]).read_text())
    return d, entry, config


@pytest.fixture(scope="module")
def rootfs(archive, tmp_path_factory):
    """The image's root filesystem, its layers applied in order with their owners and modes."""
    d, entry, _ = archive
    root = tmp_path_factory.mktemp("rootfs")
    for layer in entry["Layers"]:
        subprocess.run(["tar", "-xpf", str(d / layer), "--numeric-owner", "-C", str(root)],
                       check=True)
    # What every container runtime adds (runc's default devices); the image has no /dev. The
    # broker needs /dev/random: getrandom's fallback in the static binary checks it (a chroot
    # without it fails with "no system randomness: OS Error: 2").
    dev = root / "dev"
    dev.mkdir(exist_ok=True)
    for name, minor in (("null", 3), ("zero", 5), ("full", 7), ("random", 8), ("urandom", 9)):
        os.mknod(dev / name, 0o20666, os.makedev(1, minor))
        os.chmod(dev / name, 0o666)
    return root


def test_docker_archive_loads(archive):
    d, entry, config = archive
    # skopeo writes the fully qualified form of imds-broker:<version>, which docker load lists
    # as imds-broker:<version>.
    assert entry["RepoTags"] == [f"docker.io/library/imds-broker:{VERSION}"]
    assert sha256(d / entry["Config"]).endswith(entry["Config"].split("/")[-1].removesuffix(".json")), \
        "config blob named by its digest"
    diff_ids = config["rootfs"]["diff_ids"]
    assert len(diff_ids) == len(entry["Layers"]) >= 1
    for layer, diff_id in zip(entry["Layers"], diff_ids):
        assert sha256(d / layer) == diff_id, f"layer {layer} does not match its diff_id"


def test_oci_layout_is_valid():
    layout = IMAGE_DIR / "oci"
    assert json.loads((layout / "oci-layout").read_text())["imageLayoutVersion"] == "1.0.0"
    index = json.loads((layout / "index.json").read_text())
    (desc,) = [m for m in index["manifests"]
               if m["annotations"]["org.opencontainers.image.ref.name"] == VERSION]
    assert desc["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    blob = lambda digest: layout / "blobs" / "sha256" / digest.split(":")[1]
    assert sha256(blob(desc["digest"])) == desc["digest"]
    manifest = json.loads(blob(desc["digest"]).read_text())
    for d in [manifest["config"], *manifest["layers"]]:
        assert sha256(blob(d["digest"])) == d["digest"], d
        assert os.path.getsize(blob(d["digest"])) == d["size"], d
    inspect = json.loads(subprocess.run(
        ["skopeo", "inspect", f"oci:{layout}:{VERSION}"], capture_output=True, text=True, check=True
    ).stdout)
    assert inspect["Labels"]["org.opencontainers.image.version"] == VERSION
    assert inspect["Os"] == "linux"
    oci_archive = IMAGE_DIR / f"imds-broker-{VERSION}.oci.tar"
    again = json.loads(subprocess.run(
        ["skopeo", "inspect", f"oci-archive:{oci_archive}:{VERSION}"], capture_output=True,
        text=True, check=True,
    ).stdout)
    assert again["Digest"] == inspect["Digest"], "the oci-archive holds the same image"


def test_config_is_the_dockerfiles_runtime_stage(archive):
    _, _, config = archive
    c = config["config"]
    df = DockerfileParser(path=str(ROOT / "Dockerfile"))
    stage = []
    for ins in df.structure:
        stage = [] if ins["instruction"] == "FROM" else stage + [ins]
    value = lambda name: [i["value"] for i in stage if i["instruction"] == name]
    assert c["User"] == value("USER")[0] == f"{UID}:{UID}"
    assert c["Entrypoint"] == json.loads(value("ENTRYPOINT")[0])
    assert c["Cmd"] == json.loads(value("CMD")[0])
    assert sorted(c["ExposedPorts"]) == sorted(f"{p}/tcp" for p in value("EXPOSE")[0].split())
    labels = dict(df.labels)
    for k, v in labels.items():
        assert c["Labels"].get(k) == v, f"label {k}"
    assert config["os"] == "linux"


def test_root_filesystem_is_distroless_like(rootfs):
    binary = rootfs / "imds-broker"
    st = binary.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o755), "root-owned, not writable by the user"
    passwd = (rootfs / "etc" / "passwd").read_text()
    assert f"nonroot:x:{UID}:{UID}:" in passwd
    assert (rootfs / "etc" / "ssl" / "certs" / "ca-certificates.crt").stat().st_size > 10000
    assert "hosts: files dns" in (rootfs / "etc" / "nsswitch.conf").read_text()
    assert (rootfs / "tmp").stat().st_mode & 0o7777 == 0o1777
    home = (rootfs / "home" / "nonroot").stat()
    assert home.st_uid == UID
    # No shell, no package manager, no libc: the binary is all there is to run.
    files = {str(p.relative_to(rootfs)) for p in rootfs.rglob("*")
             if p.is_file() and not str(p.relative_to(rootfs)).startswith("dev/")}
    assert files == {"imds-broker", "etc/passwd", "etc/group", "etc/nsswitch.conf",
                     "etc/ssl/certs/ca-certificates.crt"}, files
    elf = subprocess.run(["readelf", "-l", str(binary)], capture_output=True, text=True).stdout
    assert "Requesting program interpreter" not in elf, "statically linked"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, headers=None, context=None, timeout=2):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_until(fn, what, deadline_s=20, proc=None):
    """Polls fn until it returns a truthy value, or fails after deadline_s (at once if proc,
    the server being waited for, exits)."""
    end = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < end:
        if proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited ({proc.proc.returncode}):\n{proc.logs()}")
        try:
            value = fn()
            if value:
                return value
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last error: {last})")


class Chrooted:
    """The image's entrypoint run in its root filesystem as UID:GID 65532, with exactly the
    image's environment (no inherited variables), sharing the host's loopback."""

    def __init__(self, rootfs, config, args, log):
        c = config["config"]
        env = dict(e.split("=", 1) for e in c["Env"])
        self.log = open(log, "w+")
        self.proc = subprocess.Popen(
            [shutil.which("chroot"), f"--userspec={UID}:{UID}", "--groups=", str(rootfs), *c["Entrypoint"], *args],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd="/",
        )

    def uid(self):
        status = open(f"/proc/{self.proc.pid}/status").read()
        return re.search(r"^Uid:\s+(\d+)\s+(\d+)", status, re.M).groups()

    def logs(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()  # by PID: the process this test started
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def broker(rootfs, archive, tmp_path_factory):
    listen, admin = free_port(), free_port()
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    b = Chrooted(rootfs, archive[2], [
        "serve", "--emulate", "--listen", f"127.0.0.1:{listen}",
        "--admin-listen", f"127.0.0.1:{admin}", "--identity-header", "packaging-test-header",
    ], log)
    b.listen, b.admin = listen, admin
    try:
        wait_until(lambda: get(f"http://127.0.0.1:{admin}/healthz")[0] == 200, "broker /healthz", proc=b)
        yield b
    finally:
        b.stop()


def test_broker_serves_a_token_as_65532(broker):
    assert broker.uid() == (str(UID), str(UID)), "runs as the image's user"
    status, body = get(
        f"http://127.0.0.1:{broker.listen}/metadata/identity/oauth2/token"
        "?api-version=2018-02-01&resource=https://storage.azure.com/",
        headers={"Metadata": "true"},
    )
    assert status == 200, body
    token = json.loads(body)
    assert token["token_type"] == "Bearer" and token["resource"].startswith("https://storage.azure.com")
    assert token["access_token"].count(".") == 2, "a JWT"
    assert int(token["expires_in"]) > 60
    status, body = get(
        f"http://127.0.0.1:{broker.listen}/msi/token?api-version=2019-08-01&resource=https://storage.azure.com/",
        headers={"X-IDENTITY-HEADER": "packaging-test-header"},
    )
    assert status == 200 and json.loads(body)["access_token"], body
    # A wrong identity header is refused.
    status, _ = get(
        f"http://127.0.0.1:{broker.listen}/msi/token?api-version=2019-08-01&resource=https://storage.azure.com/",
        headers={"X-IDENTITY-HEADER": "wrong"},
    )
    assert status == 401
    assert "packaging-test-header" not in broker.logs(), "the identity header is never logged"


@pytest.fixture(scope="module")
def webhook(rootfs, archive, tmp_path_factory):
    """The webhook from the same image, with a throwaway serving certificate inside the chroot."""
    tls = rootfs / "tmp" / "tls"
    tls.mkdir(exist_ok=True)
    renew_certificate(tls)
    listen, admin = free_port(), free_port()
    log = tmp_path_factory.mktemp("webhook") / "webhook.log"
    w = Chrooted(rootfs, archive[2], [
        "webhook", "--listen", f"127.0.0.1:{listen}", "--admin-listen", f"127.0.0.1:{admin}",
        "--tls-cert-file", "/tmp/tls/tls.crt", "--tls-key-file", "/tmp/tls/tls.key",
        "--kube-api-url", "none", "--sidecar-image", f"registry.example/imds-broker:{VERSION}",
        "--tls-reload-interval", "200ms",
    ], log)
    w.listen, w.admin, w.ca, w.tls_dir = listen, admin, tls / "tls.crt", tls
    try:
        wait_until(lambda: get(f"http://127.0.0.1:{admin}/readyz")[0] == 200, "webhook /readyz", proc=w)
        yield w
    finally:
        w.stop()


REVIEW = {
    "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
    "request": {
        "uid": "packaging-1", "operation": "CREATE", "namespace": "velero",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "not-velero"},
                   "spec": {"containers": [{"name": "app", "image": "app"}]}},
    },
}


def test_webhook_answers_admission_reviews_as_65532(webhook):
    assert webhook.uid() == (str(UID), str(UID))
    ctx = ssl.create_default_context(cafile=str(webhook.ca))
    req = urllib.request.Request(
        f"https://127.0.0.1:{webhook.listen}/mutate", data=json.dumps(REVIEW).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
        answer = json.loads(r.read())
    # A pod without Velero's labels: admitted untouched.
    assert answer["response"]["uid"] == "packaging-1" and answer["response"]["allowed"] is True
    assert "patch" not in answer["response"], answer


def renew_certificate(tls_dir):
    """A new serving certificate in place of the old one (as a Secret update would do)."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(tls_dir / "tls.key.new"), "-out", str(tls_dir / "tls.crt.new")],
        check=True, capture_output=True,
    )
    for name in ("tls.key", "tls.crt"):
        os.chown(tls_dir / f"{name}.new", UID, UID)
        os.replace(tls_dir / f"{name}.new", tls_dir / name)


# ---- metrics: what the image serves is what docs/monitoring.md documents ----------------


def served_metrics(text):
    """{name: type} from the exposition's # TYPE lines."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))


def documented_metrics():
    """{name: type} from docs/monitoring.md's metric tables (| `name` | type | labels |) of the
    two roles run here (serve, webhook): the node broker's own section is left out until this
    test runs `imds-broker node` too (it needs an API server to list pods from)."""
    doc = (ROOT / "docs" / "monitoring.md").read_text().split("### Node broker", 1)[0]
    rows = re.findall(r"^\| `(imds_broker_[a-z_]+)` \| (counter|gauge|histogram) \|", doc, re.M)
    assert rows, "no metric table in docs/monitoring.md"
    return dict(rows)


def exposition_name(name, kind):
    """A documented counter is written with _total; the # TYPE line names the family without."""
    return name.removesuffix("_total") if kind == "counter" else name


def test_documented_metrics_are_the_served_ones(broker, webhook):
    """Most counter families appear at their first event: cause one of each first (a token
    exchange, an AdmissionReview, a certificate renewal), then compare."""
    test_broker_serves_a_token_as_65532(broker)
    test_webhook_answers_admission_reviews_as_65532(webhook)
    renew_certificate(webhook.tls_dir)
    wait_until(
        lambda: 'imds_broker_webhook_tls_reloads_total{result="success"}'
        in get(f"http://127.0.0.1:{webhook.admin}/metrics")[1],
        "the webhook to reload its renewed certificate", proc=webhook,
    )
    served = {}
    for port in (broker.admin, webhook.admin):
        status, text = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        served.update(served_metrics(text))
    documented = {exposition_name(n, t): t for n, t in documented_metrics().items()}
    assert documented == served, (
        f"documented only: {sorted(set(documented) - set(served))}; "
        f"served only: {sorted(set(served) - set(documented))}; "
        f"type mismatches: {[(n, documented[n], served[n]) for n in set(documented) & set(served) if documented[n] != served[n]]}"
    )


def test_build_is_reproducible(tmp_path):
    """Same commit, same binary: the same image digest (timestamps come from the commit)."""
    binary = env_path("IMDS_BROKER_PKG_BINARY")
    if binary is None:
        pytest.skip("IMDS_BROKER_PKG_BINARY not set")
    subprocess.run([str(ROOT / "scripts" / "build-image")], check=True, capture_output=True,
                   env={**os.environ, "BINARY": str(binary), "OUT": str(tmp_path / "again")})
    digest = lambda d: json.loads((d / "oci" / "index.json").read_text())["manifests"][0]["digest"]
    assert digest(tmp_path / "again") == digest(IMAGE_DIR)
