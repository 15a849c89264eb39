"""Webhook side of bench/peer.py: `imds-broker webhook` and azwi-webhook on the same
AdmissionReview (the Velero 1.15 data-mover pod of tests/fixtures/velero), against one real
kube-apiserver + etcd started with tests/cluster/harness.py (the same control plane the
cluster tests use; its binaries come from scripts/test-cluster.sh's cached build).

Both webhooks look the pod's ServiceAccount up in that API server (ours: GET with a 30 s
cache; azwi: controller-runtime's informer cache) and both mutate: the ServiceAccount carries
`azure.workload.identity/client-id` and `tenant-id`, the pod the label
`azure.workload.identity/use: "true"` (what azwi's MutatingWebhookConfiguration selects on)
and `azure.workload.identity/inject-proxy-sidecar: "true"` (so azwi injects its proxy, the
counterpart of our sidecar). Each webhook's first answer is checked (allowed, a JSON patch
that adds what it should) before the load; the load is wrk -t1 POSTing the same review over
keep-alive TLS connections, interleaved rounds per concurrency, the webhook pinned to CPU 1
and wrk to CPU 0.
"""

import base64
import copy
import json
import os
import ssl
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import bench as B

ROOT = B.ROOT
sys.path.insert(0, str(ROOT / "tests" / "cluster"))
import harness  # noqa: E402  (tests/cluster/harness.py: the control plane)

FIXTURE = "velero-1.15-data-upload.json"
NS, SA = "velero", "velero-server"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
TENANT_ID = "66666666-7777-8888-9999-000000000000"
AZWI_PORT = 9443  # controller-runtime's default; azwi v1.6.0 has no flag for it


def review_body():
    pod = json.loads((ROOT / "tests" / "fixtures" / "velero" / FIXTURE).read_text())
    pod = copy.deepcopy(pod)
    pod["metadata"].setdefault("labels", {})["azure.workload.identity/use"] = "true"
    pod["metadata"].setdefault("annotations", {})["azure.workload.identity/inject-proxy-sidecar"] = "true"
    return json.dumps({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": NS, "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:velero:velero-server"},
            "object": pod, "oldObject": None, "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }, separators=(",", ":")).encode()


def setup_cluster(cp):
    """The Velero namespace and annotated ServiceAccount; a ServiceAccount for our webhook
    with read access to ServiceAccounts (what deploy/base/rbac.yaml grants)."""
    docs = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {
            "name": SA, "namespace": NS, "annotations": {
                "azure.workload.identity/client-id": CLIENT_ID,
                "azure.workload.identity/tenant-id": TENANT_ID}}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "imds-broker"}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "imds-broker-webhook", "namespace": "imds-broker"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "bench-read-serviceaccounts"},
         "rules": [{"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "bench-read-serviceaccounts"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "bench-read-serviceaccounts"},
         "subjects": [{"kind": "ServiceAccount", "name": "imds-broker-webhook", "namespace": "imds-broker"}]},
    ]
    cp.kubectl("apply", "-f", "-", input="\n".join(json.dumps(d) for d in docs))
    token = cp.token_request("imds-broker", "imds-broker-webhook", seconds=86400)
    return cp.write_secret_file("webhook-kube-token", token)


def post_review(port, path, body, ca):
    ctx = ssl.create_default_context(cafile=ca)
    req = urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
        return json.loads(r.read())


def check_patch(name, answer):
    """The answer allows the pod with a JSON patch; returns (ops, bytes, summary of paths)."""
    resp = answer.get("response") or {}
    if resp.get("allowed") is not True or resp.get("patchType") != "JSONPatch" or not resp.get("patch"):
        raise B.Failure(f"{name}: no mutation in the answer: {json.dumps(resp)[:400]}")
    raw = base64.b64decode(resp["patch"])
    ops = json.loads(raw)
    text = json.dumps(ops)
    needs = {"imds-broker": ["imds-broker"],
             "azwi-webhook": ["AZURE_CLIENT_ID", "AZURE_FEDERATED_TOKEN_FILE", "azwi-proxy"]}[name]
    missing = [n for n in needs if n not in text]
    if missing or CLIENT_ID not in text:
        raise B.Failure(f"{name}: patch lacks {missing or [CLIENT_ID]}: {text[:400]}")
    return ops, len(raw)


def redact(v):
    """The patch with every IDENTITY_HEADER value replaced: the identity header is a secret
    and never goes to a file or log, even a benchmark's."""
    if isinstance(v, list):
        return [redact(x) for x in v]
    if isinstance(v, dict):
        if v.get("name") == "IDENTITY_HEADER" and "value" in v:
            return {**v, "value": "<redacted>"}
        return {k: redact(x) for k, x in v.items()}
    return v


def describe(ops):
    """`op path` per operation, with the names of containers/volumes/env added."""
    out = []
    for o in ops:
        v = o.get("value")
        what = ""
        if isinstance(v, dict) and "name" in v:
            what = f" {v['name']}"
        elif isinstance(v, list):
            names = [x.get("name") for x in v if isinstance(x, dict) and x.get("name")]
            what = f" [{', '.join(names)}]" if names else ""
        out.append(f"{o['op']} {o['path']}{what}")
    return out


class Webhook:
    def __init__(self, procs, name, argv, env, port, path, ready_port, out, cpu):
        self.name, self.port, self.path, self.ready_port = name, port, path, ready_port
        self.log = out / f"webhook-{name}.log"
        self.proc = procs.start(B.pinned(argv, cpu), env=env, stdin=subprocess.DEVNULL,
                                stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        B.wait_until(f"{name} /readyz", self.ready, 60, every=0.05)

    def ready(self):
        if self.proc.poll() is not None:
            raise B.Failure(f"{self.name} exited ({self.proc.returncode}); see {self.log}")
        return B.http_get(self.ready_port, "/readyz", timeout=1)[0] == 200


def ours(procs, paths, cp, tls, token_file, out, cpu, port=None, admin=None):
    port, admin = port or B.free_port(), admin or B.free_port()
    env = {"PATH": os.environ.get("PATH", ""),
           "IMDS_BROKER_WEBHOOK_SIDECAR_IMAGE": "imds-broker:bench",
           "IMDS_BROKER_LOG_FORMAT": "json",
           "IMDS_BROKER_WEBHOOK_LISTEN": f"127.0.0.1:{port}",
           "IMDS_BROKER_WEBHOOK_ADMIN_LISTEN": f"127.0.0.1:{admin}",
           "IMDS_BROKER_WEBHOOK_TLS_CERT_FILE": f"{tls}/tls.crt",
           "IMDS_BROKER_WEBHOOK_TLS_KEY_FILE": f"{tls}/tls.key",
           "IMDS_BROKER_WEBHOOK_KUBE_API_URL": cp.url,
           "IMDS_BROKER_WEBHOOK_KUBE_TOKEN_FILE": token_file,
           "IMDS_BROKER_WEBHOOK_KUBE_CA_FILE": cp.ca_file,
           "IMDS_BROKER_WEBHOOK_SHUTDOWN_DELAY": "0s"}
    argv = [str(paths["broker"]), "webhook"]
    return argv, env, port, "/mutate", admin


def azwi(procs, paths, cp, tls, out, cpu, health=None):
    health = health or B.free_port()
    env = {"PATH": os.environ.get("PATH", ""), "KUBECONFIG": cp.kubeconfig,
           "AZURE_TENANT_ID": TENANT_ID, "POD_NAMESPACE": "azure-workload-identity-system",
           # The image names its Helm chart sets (here without a registry host).
           "PROXY_IMAGE": "azwi-proxy:v1.6.0", "PROXY_INIT_IMAGE": "azwi-proxy-init:v1.6.0"}
    argv = [str(paths["peer_webhook"]), "--disable-cert-rotation", f"--webhook-cert-dir={tls}",
            f"--health-addr=127.0.0.1:{health}", f"--metrics-addr=127.0.0.1:{B.free_port()}"]
    return argv, env, AZWI_PORT, "/mutate-v1-pod", health


def post_script(out, body_file):
    """wrk script: POST the review, then report.lua's JSON line."""
    p = out / "webhook-post.lua"
    p.write_text(
        f'local f = assert(io.open("{body_file}", "rb"))\n'
        'wrk.method = "POST"\nwrk.body = f:read("*a")\nf:close()\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'dofile("{B.BENCH / "report.lua"}")\n')
    return p


def wrk_post(port, path, script, conns, secs, cpu):
    argv = B.pinned(["wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--timeout", "5s", "-s", str(script),
                     f"https://127.0.0.1:{port}{path}"], cpu)
    p = subprocess.run(argv, capture_output=True, text=True, timeout=secs + 60)
    import re
    m = re.search(r"^BENCHJSON (.*)$", p.stdout, re.M)
    if p.returncode != 0 or not m:
        raise B.Failure(f"wrk failed ({p.returncode}): {(p.stdout + p.stderr)[-500:]}")
    return json.loads(m.group(1))


def startup_ms(paths, spec, runs):
    """bench_client startup: process start to /readyz 200 on the admin/health port."""
    argv, env, _, _, ready_port = spec
    p = subprocess.run([str(paths["client"]), "startup", "--admin", f"127.0.0.1:{ready_port}",
                        "--runs", str(runs), "--"] + argv, capture_output=True, text=True,
                       timeout=300, env=env)
    if p.returncode != 0:
        raise B.Failure(f"webhook start-up: {p.stderr.strip()}")
    return json.loads(p.stdout)


def run(cfg, procs, out, paths, pin):
    if not paths.get("peer_webhook") or not paths.get("k8s_bin"):
        raise B.Failure("webhook part needs --peer-webhook and --k8s-bin")
    res = {"fixture": f"tests/fixtures/velero/{FIXTURE}", "secs": cfg["wh_secs"],
           "rounds": cfg["wh_rounds"], "failures": []}
    run_dir = out / "peer-cluster"
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    run_dir.mkdir(parents=True)
    cp = harness.ControlPlane(str(paths["k8s_bin"]), str(run_dir))
    B.log("webhooks: starting etcd + kube-apiserver + kube-controller-manager")
    try:
        cp.start()
        token_file = setup_cluster(cp)
        tls = run_dir / "webhook-tls"
        tls.mkdir()
        harness.make_ca(str(tls), "ca", "bench-webhook-ca")
        harness.make_cert(str(tls), "ca", "tls", "/CN=webhook.bench.svc",
                          "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
        body = review_body()
        body_file = out / "webhook-review.json"
        body_file.write_bytes(body)
        res["review_bytes"] = len(body)
        script = post_script(out, body_file)
        ca = str(tls / "ca.crt")
        specs = {"imds-broker": ours(procs, paths, cp, tls, token_file, out, pin[1]),
                 "azwi-webhook": azwi(procs, paths, cp, tls, out, pin[1])}
        # Start-up first (each started and stopped by bench_client), then one long-lived each.
        res["startup_ms"] = {}
        res["startup"] = {}
        for n, spec in specs.items():
            st = startup_ms(paths, spec, 5 if cfg["startup_runs"] >= 5 else 2)
            res["startup"][n] = st
            res["startup_ms"][n] = st["median_ms"]
        hooks, res["patch"], res["idle_rss_kib"] = {}, {}, {}
        for n, (argv, env, port, path, ready) in specs.items():
            hooks[n] = Webhook(procs, n, argv, env, port, path, ready, out, pin[1])
            ops, nbytes = check_patch(n, post_review(port, path, body, ca))
            res["patch"][n] = {"ops": len(ops), "bytes": nbytes, "operations": describe(ops)}
            (out / f"webhook-patch-{n}.json").write_text(json.dumps(redact(ops), indent=1))
        time.sleep(1)
        for n, h in hooks.items():
            res["idle_rss_kib"][n] = B.vm_kib(h.pid, "VmRSS")
        names = list(hooks)
        runs = {n: {c: [] for c in cfg["wh_conns"]} for n in names}
        hwm = {n: {c: 0 for c in cfg["wh_conns"]} for n in names}
        for rnd in range(cfg["wh_rounds"]):
            for c in cfg["wh_conns"]:
                k = rnd % len(names)
                for n in names[k:] + names[:k]:
                    h = hooks[n]
                    B.reset_peak_rss(h.pid)
                    r = wrk_post(h.port, h.path, script, c, cfg["wh_secs"], pin[0])
                    hwm[n][c] = max(hwm[n][c], B.vm_kib(h.pid, "VmHWM") or 0)
                    runs[n][c].append(r)
                    B.log(f"webhook round {rnd + 1} c={c:<3} {n:<12} {B.req_per_s(r):>7.0f} reviews/s "
                          f"p99 {r['latency_us']['p99']} us errors {sum(r['errors'].values())}")
        # Still mutating after the load.
        for n, h in hooks.items():
            check_patch(n, post_review(h.port, h.path, body, ca))
        summary = {}
        for n in names:
            summary[n] = {}
            for c in cfg["wh_conns"]:
                rs = runs[n][c]
                med = lambda f: statistics.median(f(r) for r in rs)  # noqa: E731
                summary[n][str(c)] = {
                    "rps": med(B.req_per_s),
                    "p50_ms": med(lambda r: r["latency_us"]["p50"]) / 1000,
                    "p99_ms": med(lambda r: r["latency_us"]["p99"]) / 1000,
                    "errors": sum(sum(r["errors"].values()) for r in rs),
                    "hwm_kib": hwm[n][c],
                    "bytes_per_response": sum(r["bytes"] for r in rs) / max(sum(r["requests"] for r in rs), 1),
                }
                if summary[n][str(c)]["errors"]:
                    res["failures"].append(f"webhook {n} c={c}: {summary[n][str(c)]['errors']} errors")
        res["summary"] = summary
        res["runs"] = runs
        for h in hooks.values():
            procs.stop(h.proc)
    finally:
        cp.stop()
    return res
