#!/usr/bin/env python3
"""Three faults of the broker core, reproduced from outside against one or more builds side by
side (e.g. the last release and this tree), with the fake Entra on 127.0.0.1:

1. **Unusable token file while a token is cached.** Tokens live 20 s; the token is asked for
   twice (so it is refreshed at 10 s); at 3 s the token file is replaced by an expired JWT.
   Reported for 10-16 s: log lines per second and the broker's CPU (one core = 100 %), and
   whether a caller at 14 s still gets the cached token.
2. **Entra failing past the half-life.** Tokens live 40 s, asked for once; Entra answers 503
   from then on; at 24 s, 3 callers one after another and 5 at once (`--request-timeout 3s`).
   Reported: how many were refused although a usable token was cached (until 36 s).
3. **A success in flight and a Retry-After.** A storage exchange is held 3 s by Entra; at 0.5 s
   Entra starts answering 429 with `Retry-After: 300`, which an ARM exchange gets; the storage
   exchange then succeeds. At 4 s a third resource is asked for. Reported: Entra calls made
   inside the 300 s.

Bounded: ~55 s per build, one broker and one fake at a time, stopped by PID.

    bench/fault_repro.py FAKE_ENTRA BROKER [BROKER ...]
"""
import base64
import http.client
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench  # noqa: E402

STORAGE = "https%3A%2F%2Fstorage.azure.com%2F"
ARM = "https%3A%2F%2Fmanagement.azure.com%2F"
VAULT = "https%3A%2F%2Fvault.azure.net"
TOKEN = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource="


def b64(obj):
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def expired_jwt():
    now = int(time.time())
    return ".".join([b64({"alg": "RS256", "typ": "JWT"}),
                     b64({"aud": ["api://AzureADTokenExchange"], "iss": "https://issuer.example",
                          "sub": "system:serviceaccount:velero:velero-server",
                          "iat": now - 7200, "nbf": now - 7200, "exp": now - 3600}),
                     "c2ln"])


class OwnTokenFile:
    """The fake's broker arguments with a token file of this run's own, which it can spoil."""

    def __init__(self, fake, directory):
        self.fake = fake
        self.path = Path(directory) / "token"
        self.path.write_text(Path(fake.info["token_file"]).read_text())

    def broker_args(self):
        args = self.fake.broker_args()
        args[args.index("--token-file") + 1] = str(self.path)
        return args

    def spoil(self):
        tmp = self.path.with_suffix(".new")
        tmp.write_text(expired_jwt())
        os.replace(tmp, self.path)


def post_fault(fake, spec):
    """The fake's control API: `POST /fault` (examples/fake_entra.rs)."""
    c = http.client.HTTPConnection("127.0.0.1", fake.calls_port, timeout=5)
    try:
        c.request("POST", "/fault", body=json.dumps(spec),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        if r.status != 200:
            raise bench.Failure(f"POST /fault {spec}: {r.status}")
    finally:
        c.close()


def ask(broker, resource, timeout=10):
    try:
        return bench.http_get(broker.port, TOKEN + resource, {"Metadata": "true"}, timeout)[0]
    except OSError:
        return 0


def cpu_secs(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def lines(path):
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def at(t0, secs):
    time.sleep(max(0.0, t0 + secs - time.monotonic()))


def spin(procs, binary, fake_bin, out, tmp):
    fake = bench.Fake(procs, fake_bin, lifetime=20)
    source = OwnTokenFile(fake, tmp)
    broker = bench.Broker(procs, binary, out, "spin", fake=source)
    t0 = time.monotonic()
    first = [ask(broker, STORAGE)]
    at(t0, 1)
    first.append(ask(broker, STORAGE))
    at(t0, 3)
    source.spoil()
    at(t0, 10)
    l0, c0 = lines(broker.log), cpu_secs(broker.pid)
    at(t0, 14)
    served = ask(broker, STORAGE, timeout=5)
    at(t0, 16)
    l1, c1 = lines(broker.log), cpu_secs(broker.pid)
    procs.stop(broker.proc)
    procs.stop(fake.proc)
    return {"first": first, "log_lines_per_s": round((l1 - l0) / 6),
            "cpu_percent": round(100 * (c1 - c0) / 6), "cached_token_at_14s": served}


def stale(procs, binary, fake_bin, out):
    fake = bench.Fake(procs, fake_bin, lifetime=40)
    broker = bench.Broker(procs, binary, out, "stale", fake=fake,
                          extra=["--request-timeout", "3s"])
    t0 = time.monotonic()
    first = ask(broker, STORAGE)
    post_fault(fake, {"status": 503})
    at(t0, 24)
    sequential = [ask(broker, STORAGE) for _ in range(3)]
    together = [None] * 5

    def one(i):
        together[i] = ask(broker, STORAGE)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    procs.stop(broker.proc)
    procs.stop(fake.proc)
    answers = sequential + together
    return {"first": first, "sequential": sequential, "concurrent": together,
            "refused_with_a_usable_token": sum(1 for s in answers if s != 200)}


def retry_after(procs, binary, fake_bin, out):
    fake = bench.Fake(procs, fake_bin)
    broker = bench.Broker(procs, binary, out, "retry-after", fake=fake,
                          extra=["--request-timeout", "5s"])
    t0 = time.monotonic()
    post_fault(fake, {"delay_ms": 3000})
    held = [None]
    storage = threading.Thread(target=lambda: held.__setitem__(0, ask(broker, STORAGE)))
    storage.start()
    at(t0, 0.5)
    post_fault(fake, {"status": 429, "retry_after": 300})
    throttled = [None]
    arm = threading.Thread(target=lambda: throttled.__setitem__(0, ask(broker, ARM)))
    arm.start()
    storage.join()
    at(t0, 4)
    before = fake.calls()
    third = ask(broker, VAULT)
    calls = fake.calls() - before
    arm.join()
    procs.stop(broker.proc)
    procs.stop(fake.proc)
    return {"storage": held[0], "arm": throttled[0], "third_resource": third,
            "entra_calls_inside_retry_after": calls}


def main():
    fake_bin, brokers = Path(sys.argv[1]), [Path(b) for b in sys.argv[2:]]
    out = (Path(__file__).parent / "out" / "fault-repro").resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    procs = bench.Procs()
    try:
        for b in brokers:
            with tempfile.TemporaryDirectory() as tmp:
                r = {"spin": spin(procs, b, fake_bin, out, tmp),
                     "stale": stale(procs, b, fake_bin, out),
                     "retry_after": retry_after(procs, b, fake_bin, out)}
            results[str(b)] = r
            print(f"{b}: {json.dumps(r)}", flush=True)
    finally:
        procs.stop_all()
    print("| build | 1: log lines/s, CPU % (10-16 s) | 1: cached token at 14 s | "
          "2: refused with a usable token (of 8) | 3: Entra calls inside Retry-After |")
    print("|---|---|---|---|---|")
    for b, r in results.items():
        print(f"| {b} | {r['spin']['log_lines_per_s']}, {r['spin']['cpu_percent']} % | "
              f"{r['spin']['cached_token_at_14s']} | {r['stale']['refused_with_a_usable_token']} | "
              f"{r['retry_after']['entra_calls_inside_retry_after']} |")


if __name__ == "__main__":
    main()
