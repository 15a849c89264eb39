#!/usr/bin/env python3
"""One broker at the worst load the hostile-load rules allow, next to the memory limit the
webhook injects (32 Mi), with its admin probe timed throughout:

- `--max-connections` (MAX_CONNECTIONS, the default) connections, each holding an unfinished 8,000-byte request head;
- 64 distinct cold resources asked for at once against a fake Entra answering after 500 ms
  (the broker admits 16 at once and 2/s after, the rest get 429 — the bound under test);
- `/readyz` and `/metrics` polled during both.

Reports peak RSS (VmHWM), Entra calls, how the 64 callers were answered, and the slowest probe.
Bounded (one broker and one fake on 127.0.0.1, started and stopped here, ~10 s). Exits 1 on a
functional failure (a probe not answered within 1 s, a cold caller not answered, the broker
gone), never on the memory figure.

    bench/broker_load.py BROKER FAKE_ENTRA
"""
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench  # noqa: E402  (process registry, fake Entra and broker launchers)
from cgroup import MemoryLimit  # noqa: E402

LIMIT = 32 * 1024 * 1024  # the sidecar's memory limit the webhook injects
MAX_CONNECTIONS = 1024  # serve's default --max-connections


def main():
    broker_bin, fake_bin = Path(sys.argv[1]), Path(sys.argv[2])
    out = (Path(__file__).parent / "out" / "broker-load").resolve()
    out.mkdir(parents=True, exist_ok=True)
    procs = bench.Procs()
    failures = []
    cg = MemoryLimit("imds-broker-load", LIMIT)
    try:
        fake = bench.Fake(procs, fake_bin, delay_ms=500)
        if not cg.available:
            print(f"memory limit not applied: {cg.why}")
        broker = bench.Broker(procs, broker_bin, out, "load", fake=fake,
                              preexec=cg.preexec() if cg.available else None)
        pid = broker.pid
        idle = bench.vm_kib(pid, "VmRSS")
        probes, stop = [], threading.Event()

        def probe():
            while not stop.is_set():
                started = time.monotonic()
                status = bench.http_get(broker.admin, "/readyz", timeout=5)[0]
                probes.append((status, time.monotonic() - started))
                time.sleep(0.05)

        prober = threading.Thread(target=probe)
        prober.start()
        # The connection cap's worth of full, never-finished heads.
        socks = []
        for _ in range(MAX_CONNECTIONS):
            s = socket.create_connection(("127.0.0.1", broker.port))
            s.sendall(b"GET /metadata/identity/oauth2/token HTTP/1.1\r\nX-Fill: " + b"a" * 7940)
            socks.append(s)
        time.sleep(0.5)
        held = bench.vm_kib(pid, "VmRSS")
        # 64 cold resources at once.
        answers = {}

        def cold(i):
            target = (f"/metadata/identity/oauth2/token?api-version=2018-02-01"
                      f"&resource=api%3A%2F%2Fload-{i}")
            answers[i] = bench.http_get(broker.port, target, {"Metadata": "true"}, timeout=40)[0]

        callers = [threading.Thread(target=cold, args=(i,)) for i in range(64)]
        [t.start() for t in callers]
        [t.join() for t in callers]
        stop.set()
        prober.join()
        for s in socks:
            s.close()
        peak = bench.vm_kib(pid, "VmHWM")
        statuses = {}
        for st in answers.values():
            statuses[st] = statuses.get(st, 0) + 1
        worst = max(t for _, t in probes)
        print(f"RSS idle {idle / 1024:.1f} MiB; with {MAX_CONNECTIONS} full unfinished heads {held / 1024:.1f} MiB; "
              f"peak {peak / 1024:.1f} MiB (injected limit 32 MiB)")
        print(f"64 cold resources: answers {dict(sorted(statuses.items()))}, Entra calls {fake.calls()}")
        print(f"/readyz during the load: {len(probes)} probes, all 200: "
              f"{all(s == 200 for s, _ in probes)}, slowest {worst * 1000:.1f} ms")
        if len(answers) != 64 or any(st not in (200, 429, 503) for st in answers.values()):
            failures.append(f"cold callers: {answers}")
        if worst > 1.0 or any(s != 200 for s, _ in probes):
            failures.append(f"probes: slowest {worst:.3f} s")
        if cg.available:
            kills = cg.oom_kills()
            print(f"inside a {LIMIT >> 20} MiB memory cgroup: peak charge "
                  f"{(cg.peak_bytes() or 0) / 2**20:.1f} MiB, OOM kills {kills}")
            if kills or broker.proc.poll() is not None:
                failures.append(f"the broker did not survive its {LIMIT >> 20} MiB limit")
    finally:
        procs.stop_all()
        cg.close()
    if failures:
        print("FAILED:", *failures, sep="\n  ")
        sys.exit(1)


if __name__ == "__main__":
    main()
