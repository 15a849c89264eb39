#!/usr/bin/env python3
"""Idle memory of one or more broker builds, as bench.py measures it (issue 16 item 2): each
build against the fake Entra, both protocols asked once, 2 s of rest, then VmRSS split into
anonymous and file-backed pages, and PSS. Medians of ROUNDS starts per build; builds alternate.

    bench/idle_rss.py FAKE_ENTRA BROKER [BROKER...] [--rounds 3] [--host-env]

--host-env keeps this machine's SSL_CERT_FILE/SSL_CERT_DIR instead of the image's (see
bench.image_env). Bounded: ROUNDS x builds brokers, one at a time, on 127.0.0.1; each stopped
by its PID.
"""
import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

FIELDS = ("VmRSS", "RssAnon", "RssFile", "Pss")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fake", type=Path)
    ap.add_argument("brokers", type=Path, nargs="+")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--host-env", action="store_true")
    args = ap.parse_args()
    env = dict(os.environ) if args.host_env else bench.image_env()
    out = (bench.BENCH / "out" / "idle-rss").resolve()
    out.mkdir(parents=True, exist_ok=True)
    samples = {b: [] for b in args.brokers}
    procs = bench.Procs()
    try:
        fake = bench.Fake(procs, args.fake)
        for rnd in range(args.rounds):
            for i, binary in enumerate(args.brokers):
                broker = bench.Broker(procs, binary, out, f"b{i}-r{rnd}", fake=fake, env=env)
                samples[binary].append(broker.warm_then_idle()[1])
                procs.stop(broker.proc)
    finally:
        procs.stop_all()
    env = "host trust-store env" if args.host_env else "image env (SSL_CERT_FILE only)"
    print(f"idle after the first token, {env}, median of {args.rounds} starts (MiB)")
    print("| build | RSS | anonymous | file-backed | PSS |")
    print("|---|---:|---:|---:|---:|")
    for binary, rows in samples.items():
        med = {f: statistics.median(r[f] for r in rows) for f in FIELDS}
        print(f"| {binary} | " + " | ".join(f"{bench.mib(med[f]):.2f}" for f in FIELDS) + " |")


if __name__ == "__main__":
    main()
