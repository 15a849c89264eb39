#!/usr/bin/env python3
"""One broker at the worst load the hostile-load rules allow, inside the memory limit the
webhook injects (32 Mi), with its admin probe timed throughout. Two floods, one after the other:

1. **Every buffer full at once.** `--max-connections` (1024) token connections and the admin
   listener's cap (256) of connections, each holding an unfinished 8,000-byte request head;
   then 1,000 distinct cold resources asked for at once (a fake Entra answering after 500 ms;
   the broker admits 16 at once and 2/s after, the rest get 429: the bound under test). The
   cold callers' connections evict held heads, as any new caller at the cap does.
2. **Oversized heads.** 1,500 clients at once, each sending a 15,000-byte head (past the 8-KiB
   cap: each must get a JSON 431, and the broker must not buffer them).
3. **A hostile authority.** A second broker, in a 32 MiB cgroup of its own, whose "Entra"
   (examples/hostile_authority) answers everything — the discovery document at start-up, every
   token request — with 50 MB: in turn a 500 with `Content-Length`, a 200 chunked, a 503
   chunked and paced with `Retry-After: 1`, a 200 with `Content-Length`. Four callers ask for
   tokens for 12 s; each must get a JSON 503, and the broker's peak RSS (VmHWM, start-up
   included) is reported against its idle RSS: the transport reads 64 KiB at most.

After each flood a legitimate token request must be answered 200 within 2 s, and `/readyz`
(polled every 50 ms on new connections) within 1 s throughout.

Reports RSS (idle, with the heads held, peak VmHWM), the cgroup's peak charge and OOM kills,
Entra calls, how the callers were answered, and the slowest probe. Bounded (one broker and one
fake on 127.0.0.1, started and stopped here, ~5 s). Exits 1 on a functional failure (a probe
or the legitimate request late or refused, a caller unanswered, the broker gone or OOM-killed),
never on the memory figure.

    bench/broker_load.py BROKER FAKE_ENTRA [HOSTILE_AUTHORITY]
"""
import asyncio
import collections
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench  # noqa: E402  (process registry, fake Entra and broker launchers)
from cgroup import MemoryLimit  # noqa: E402

LIMIT = 32 * 1024 * 1024  # the sidecar's memory limit the webhook injects
MAX_CONNECTIONS = 1024  # serve's default --max-connections
ADMIN_CONNECTIONS = 256  # the admin listener's cap (listener::Limits::admin)
COLD_RESOURCES = 1000
OVERSIZED = 1500
TOKEN = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource="
HELD_HEAD = b"GET " + TOKEN.encode() + b"x HTTP/1.1\r\nX-Fill: " + b"a" * 7900
OVERSIZED_HEAD = (b"GET " + TOKEN.encode() + b"x HTTP/1.1\r\nMetadata: true\r\nX-Fill: "
                  + b"a" * 15000 + b"\r\n\r\n")


async def request(port, head, timeout):
    """Sends `head` on a new connection; the status code (0 if none came) and the time taken."""
    started = time.monotonic()
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        try:
            w.write(head)
            await w.drain()
            line = await asyncio.wait_for(r.readline(), timeout)
        finally:
            w.close()
        status = int(line.split()[1]) if line.startswith(b"HTTP/1.1 ") else 0
    except (OSError, asyncio.TimeoutError, ValueError, IndexError):
        status = 0
    return status, time.monotonic() - started


def get(target, headers=""):
    return f"GET {target} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n".encode()


async def hold(port, count):
    """`count` connections each holding an unfinished head; the writers, to close later."""
    async def one():
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(HELD_HEAD)
        await w.drain()
        return w
    return await asyncio.gather(*(one() for _ in range(count)))


async def probe(admin, stop, probes):
    while not stop.is_set():
        probes.append(await request(admin, get("/readyz"), 5))
        await asyncio.sleep(0.05)


async def legitimate(port, failures, after):
    status, took = await request(port, get(TOKEN + "https%3A%2F%2Fstorage.azure.com%2F",
                                           "Metadata: true\r\n"), 10)
    print(f"a legitimate token request after {after}: {status} in {took * 1000:.0f} ms")
    if status != 200 or took > 2:
        failures.append(f"legitimate request after {after}: {status} in {took:.2f} s")


async def floods(broker, fake, failures):
    pid, port, admin = broker.pid, broker.port, broker.admin
    idle = bench.vm_kib(pid, "VmRSS")
    probes, stop = [], asyncio.Event()
    prober = asyncio.create_task(probe(admin, stop, probes))

    held = await hold(port, MAX_CONNECTIONS) + await hold(admin, ADMIN_CONNECTIONS)
    await asyncio.sleep(0.3)
    with_heads = bench.vm_kib(pid, "VmRSS")
    cold = await asyncio.gather(*(
        request(port, get(f"{TOKEN}api%3A%2F%2Fload-{i}", "Metadata: true\r\n"), 40)
        for i in range(COLD_RESOURCES)))
    for w in held:
        w.close()
    calls = fake.calls()
    statuses = collections.Counter(s for s, _ in cold)
    print(f"RSS idle {idle / 1024:.1f} MiB; with {MAX_CONNECTIONS} token and {ADMIN_CONNECTIONS} "
          f"admin connections holding unfinished 8,000-byte heads {with_heads / 1024:.1f} MiB")
    print(f"{COLD_RESOURCES} cold resources at once: answers {dict(sorted(statuses.items()))}, "
          f"slowest {max(t for _, t in cold):.2f} s, Entra calls {calls}")
    if set(statuses) - {200, 429, 503}:
        failures.append(f"cold callers unanswered or refused oddly: {dict(statuses)}")
    await legitimate(port, failures, "flood 1")

    oversized = await asyncio.gather(*(request(port, OVERSIZED_HEAD, 20)
                                       for _ in range(OVERSIZED)))
    statuses = collections.Counter(s for s, _ in oversized)
    print(f"{OVERSIZED} oversized (15,000-byte) heads at once: answers "
          f"{dict(sorted(statuses.items()))}, slowest {max(t for _, t in oversized):.2f} s")
    # 431 is the answer; a client whose head the broker stopped reading may see the
    # connection reset before it (0): never a 200, and never a buffered head.
    if set(statuses) - {431, 0} or statuses[431] == 0:
        failures.append(f"oversized heads: {dict(statuses)}")
    await legitimate(port, failures, "flood 2")
    stop.set()
    await prober
    worst = max(t for _, t in probes)
    bad = [s for s, _ in probes if s != 200]
    print(f"/readyz during both floods: {len(probes)} probes, {len(bad)} not 200, "
          f"slowest {worst * 1000:.1f} ms")
    if worst > 1.0 or bad:
        failures.append(f"probes: slowest {worst:.3f} s, not 200: {bad[:5]}")
    print(f"peak RSS {bench.vm_kib(pid, 'VmHWM') / 1024:.1f} MiB (injected limit 32 MiB)")


class Hostile:
    """examples/hostile_authority: the broker's Entra, answering 50 MB to everything."""

    def __init__(self, procs, binary):
        self.proc, self.info = bench.start_announcing(procs, [str(binary)], "hostile_authority")

    def broker_args(self):
        return bench.entra_args(self.info)


HOSTILE_SECS = 12


async def hostile_flood(broker, failures):
    pid, port = broker.pid, broker.port
    await asyncio.sleep(1)
    idle = bench.vm_kib(pid, "VmRSS")
    answers = []

    async def caller(i):
        end = time.monotonic() + HOSTILE_SECS
        resource_ = ["https%3A%2F%2Fstorage.azure.com%2F", "https%3A%2F%2Fmanagement.azure.com%2F"][i % 2]
        while time.monotonic() < end:
            answers.append(await request(port, get(TOKEN + resource_, "Metadata: true\r\n"), 40))

    await asyncio.gather(*(caller(i) for i in range(4)))
    statuses = collections.Counter(s for s, _ in answers)
    exchanges = broker.metric("imds_broker_entra_requests_total")
    peak = bench.vm_kib(pid, "VmHWM")
    print(f"hostile authority (50 MB answers) for {HOSTILE_SECS} s: {len(answers)} token requests "
          f"answered {dict(sorted(statuses.items()))}, slowest {max(t for _, t in answers):.2f} s, "
          f"{exchanges:.0f} exchanges")
    print(f"  RSS idle {idle / 1024:.1f} MiB, peak (VmHWM, start-up included) {peak / 1024:.1f} MiB: "
          f"+{(peak - idle) / 1024:.1f} MiB")
    if set(statuses) != {503}:
        failures.append(f"hostile authority: callers answered {dict(statuses)}, not all 503")
    if exchanges < 2:
        failures.append(f"hostile authority: only {exchanges:.0f} exchanges were tried")


def main():
    broker_bin, fake_bin = Path(sys.argv[1]), Path(sys.argv[2])
    hostile_bin = Path(sys.argv[3]) if len(sys.argv) > 3 else fake_bin.with_name("hostile_authority")
    # This process holds ~2,300 sockets at once (the held heads and the cold callers).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 8192:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(8192, hard), hard))
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
        asyncio.run(asyncio.wait_for(floods(broker, fake, failures), 120))
        if cg.available:
            kills = cg.oom_kills()
            print(f"inside a {LIMIT >> 20} MiB memory cgroup: peak charge "
                  f"{(cg.peak_bytes() or 0) / 2**20:.1f} MiB, OOM kills {kills}")
            if kills:
                failures.append(f"the broker was OOM-killed in its {LIMIT >> 20} MiB limit")
        if broker.proc.poll() is not None:
            failures.append(f"the broker exited ({broker.proc.returncode})")
        procs.stop(broker.proc)
        hostile_cg = MemoryLimit("imds-broker-hostile", LIMIT)
        try:
            hostile = Hostile(procs, hostile_bin)
            broker = bench.Broker(procs, broker_bin, out, "hostile", fake=hostile,
                                  extra=["--request-timeout", "5s"],
                                  preexec=hostile_cg.preexec() if hostile_cg.available else None)
            asyncio.run(asyncio.wait_for(hostile_flood(broker, failures), 60))
            if hostile_cg.available:
                kills = hostile_cg.oom_kills()
                print(f"  inside a {LIMIT >> 20} MiB memory cgroup: peak charge "
                      f"{(hostile_cg.peak_bytes() or 0) / 2**20:.1f} MiB, OOM kills {kills}")
                if kills:
                    failures.append("the broker facing the hostile authority was OOM-killed")
            if broker.proc.poll() is not None:
                failures.append(f"the broker facing the hostile authority exited "
                                f"({broker.proc.returncode})")
        finally:
            hostile_cg.close()
    finally:
        procs.stop_all()
        cg.close()
    if failures:
        print("FAILED:", *failures, sep="\n  ")
        sys.exit(1)


if __name__ == "__main__":
    main()
