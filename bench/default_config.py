#!/usr/bin/env python3
"""The hot path as a pod gets it: the broker with its default flags (no worker count, nothing
pinned), next to the same broker with 2 workers (the old default) and nginx (bench/nginx.conf
.template), all unpinned, wrk unpinned too. Rounds rotate the order of the targets; medians.

    bench/default_config.py BROKER [ROUNDS=5] [SECONDS=3]

Bounded: 3 servers on 127.0.0.1 started and stopped here, ROUNDS x 4 concurrencies x 3
targets x SECONDS of wrk. Prints req/s, p99 and the ratio to nginx per concurrency.
"""
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench  # noqa: E402


def main():
    binary = Path(sys.argv[1])
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    secs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    out = (Path(__file__).parent / "out" / "default-config").resolve()
    out.mkdir(parents=True, exist_ok=True)
    conns = (1, 16, 64, 256)
    procs = bench.Procs()
    try:
        servers = {"default": bench.Broker(procs, binary, out, "default"),
                   "2 workers": bench.Broker(procs, binary, out, "two", workers=2)}
        _, body = servers["default"].get("imds")
        nginx = bench.Nginx(procs, out, body)
        targets = {k: (b.port, bench.IMDS_TARGET, bench.IMDS_HEADER, b.pid)
                   for k, b in servers.items()}
        targets["nginx"] = (nginx.port, bench.IMDS_TARGET, bench.IMDS_HEADER, nginx.worker)
        names = list(targets)
        cfg = {"conns": conns, "rounds": rounds, "wrk_secs": secs, "c1_rounds": rounds,
               "c1_secs": secs, "warmup_secs": 0}
        runs, _, _ = bench.interleaved_wrk(cfg, targets, (None, None), peak_of=[])
        res = {n: {c: [(bench.req_per_s(r), r["latency_us"]["p99"]) for r in runs[n][c]]
                   for c in conns} for n in names}
        print(f"load average at the end: {bench.loadavg()}")
        print("| conns | " + " | ".join(f"{n} req/s (×nginx), p99 µs" for n in names) + " |")
        print("|---:|" + "---|" * len(names))
        for c in conns:
            ng = statistics.median(x for x, _ in res["nginx"][c])
            cells = []
            for n in names:
                rps = statistics.median(x for x, _ in res[n][c])
                p99 = statistics.median(y for _, y in res[n][c])
                cells.append(f"{rps:.0f} ({rps / ng:.2f}×), {p99}")
            print(f"| {c} | " + " | ".join(cells) + " |")
    finally:
        procs.stop_all()


if __name__ == "__main__":
    main()
