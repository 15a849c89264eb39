#!/usr/bin/env python3
"""The webhook under the load issue 12 names, with the numbers printed:

1. four concurrent ~3.8 MB AdmissionReviews (a pod with 40,000 env entries, under the 4 MiB
   cap): every one answered 200; the webhook's peak RSS (VmHWM) next to its 128 Mi limit;
2. 1,500 idle TCP connections held open: five ordinary admissions answered, each latency.

Bounded: one webhook process on 127.0.0.1 (started and stopped here, by PID), 4 + 5 reviews,
1,500 sockets, about 5 s. Exits 1 on a functional failure (a review not answered 200, an
admission slower than 2 s with the idle connections held), never on the memory figure.

    bench/webhook_load.py BINARY [extra webhook flags]
"""
import http.client
import json
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cgroup import MemoryLimit  # noqa: E402

LIMIT = 128 * 1024 * 1024  # what the manifests give the webhook


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kib(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def review(pod):
    return json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "namespace": "velero",
        "operation": "CREATE", "object": pod}}).encode()


def main():
    binary, extra = sys.argv[1], sys.argv[2:]
    tmp = Path(tempfile.mkdtemp(prefix="webhook-load-"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", tmp / "key.pem", "-out", tmp / "cert.pem", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    port, admin = free_port(), free_port()
    cg = MemoryLimit("imds-broker-webhook-load", LIMIT)
    if not cg.available:
        print(f"memory limit not applied: {cg.why}")
    proc = subprocess.Popen([binary, "webhook", "--listen", f"127.0.0.1:{port}",
                             "--admin-listen", f"127.0.0.1:{admin}",
                             "--tls-cert-file", tmp / "cert.pem", "--tls-key-file", tmp / "key.pem",
                             "--sidecar-image", "img:1", "--kube-api-url", "none",
                             "--client-id", "11111111-2222-3333-4444-555555555555",
                             "--tenant-id", "contoso.onmicrosoft.com", *extra],
                            stderr=subprocess.DEVNULL,
                            preexec_fn=cg.preexec() if cg.available else None)
    failures = []
    try:
        deadline = time.time() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", admin), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise SystemExit("webhook did not start")
                time.sleep(0.02)
        ctx = ssl.create_default_context(cafile=str(tmp / "cert.pem"))

        def post(body, out, i):
            started = time.monotonic()
            try:
                c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
                c.request("POST", "/mutate", body, {"Content-Type": "application/json"})
                r = c.getresponse()
                r.read()
                out[i] = (r.status, time.monotonic() - started)
            except OSError as e:  # the webhook gone (OOM-killed), reset, timeout
                out[i] = (type(e).__name__, time.monotonic() - started)

        labels = {"velero.io/data-upload": "x"}
        env = [{"name": f"VAR_{i:06d}", "value": "v" * 60} for i in range(40000)]
        big = review({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "big", "labels": labels},
                      "spec": {"containers": [{"name": "c", "image": "i", "env": env}]}})
        small = review({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": labels},
                        "spec": {"containers": [{"name": "c", "image": "i"}]}})
        idle_rss = kib(proc.pid, "VmRSS")
        out = {}
        threads = [threading.Thread(target=post, args=(big, out, i)) for i in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        peak = kib(proc.pid, "VmHWM")
        print(f"4 concurrent reviews of {len(big) / 1e6:.2f} MB: statuses "
              f"{sorted(map(str, (s for s, _ in out.values())))}, slowest {max(t for _, t in out.values()):.3f} s; "
              f"RSS idle {idle_rss / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB (limit 128 MiB)")
        if len(out) != 4 or any(s != 200 for s, _ in out.values()):
            failures.append(f"large reviews: {out}")
        if proc.poll() is not None:
            failures.append(f"the webhook died (exit {proc.returncode}; -9 is the OOM killer)")
            raise SystemExit("FAILED:\n  " + "\n  ".join(failures))

        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(1500)]
        time.sleep(0.2)
        out = {}
        for i in range(5):
            post(small, out, i)
        worst = max(t for _, t in out.values())
        print(f"with 1,500 idle connections held: 5 admissions, statuses "
              f"{sorted(map(str, (s for s, _ in out.values())))}, slowest {worst * 1000:.1f} ms; "
              f"RSS {kib(proc.pid, 'VmRSS') / 1024:.1f} MiB")
        for s in socks:
            s.close()
        if any(s != 200 for s, _ in out.values()) or worst > 2.0:
            failures.append(f"admission with idle connections: {out}")
        if cg.available:
            kills = cg.oom_kills()
            print(f"inside a {LIMIT >> 20} MiB memory cgroup: peak charge "
                  f"{(cg.peak_bytes() or 0) / 2**20:.1f} MiB, OOM kills {kills}")
            if kills or proc.poll() is not None:
                failures.append(f"the webhook did not survive its {LIMIT >> 20} MiB limit")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        cg.close()
    if failures:
        print("FAILED:", *failures, sep="\n  ")
        sys.exit(1)


if __name__ == "__main__":
    main()
