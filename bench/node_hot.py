#!/usr/bin/env python3
"""The hot path with attestation on (issue 21 item 3): warm App Service token requests to a
node broker (`imds-broker node`, every request attested against the pod index) and to a sidecar
broker (`serve`, no attestation), with nginx serving a static body of the same size as the
reference, interleaved round by round with wrk as bench.py's hot path does. The wrk client is a
pod of the node to the node broker: its source address, 127.0.0.1, is registered in
examples/fake_kube_pods as pod velero/bench with ServiceAccount velero-server.

Prints requests per second and p99 per concurrency and each broker's ratio to nginx. Bounded:
three servers, one fake Entra and one fake pod API on 127.0.0.1, stopped by PID.

    bench/node_hot.py BROKER FAKE_ENTRA FAKE_KUBE_PODS [--mode smoke|full] [--rounds N] [--wrk-secs S] [--conns 1,16]
"""
import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
from node_fleet import FakeKube  # noqa: E402

NODE = "bench-node"


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("broker", type=Path)
    ap.add_argument("fake", type=Path)
    ap.add_argument("pods", type=Path)
    ap.add_argument("--mode", choices=sorted(bench.MODES), default="smoke")
    ap.add_argument("--rounds", type=int, help="override the mode's rounds")
    ap.add_argument("--wrk-secs", type=int, help="override the mode's seconds per wrk run")
    ap.add_argument("--conns", help="comma-separated concurrencies (default: the mode's)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "node-hot")
    args = ap.parse_args()
    cfg = dict(bench.MODES[args.mode])
    if args.conns:
        cfg["conns"] = [int(c) for c in args.conns.split(",")]
    # The same for 1 connection as for the others.
    if args.rounds is not None:
        cfg["rounds"] = cfg["c1_rounds"] = args.rounds
    if args.wrk_secs is not None:
        cfg["wrk_secs"] = cfg["c1_secs"] = args.wrk_secs
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pin = (None, None) if (os.cpu_count() or 1) < 2 else (0, 1)
    workers = 1 if pin[1] is not None else None
    procs = bench.Procs()
    try:
        fake = bench.Fake(procs, args.fake, cpu=pin[0])
        pods = FakeKube(procs, args.pods)
        # The one pod wrk stands for.
        pods.add([{"namespace": "velero", "name": "bench", "node": NODE,
                   "service_account": "velero-server", "ip": "127.0.0.1"}])
        sidecar = bench.Broker(procs, args.broker, out, "sidecar", fake=fake, cpu=pin[1],
                               workers=workers)
        env = dict(bench.image_env(), KUBECONFIG=pods.info["kubeconfig"], POD_NAMESPACE="velero")
        node = bench.Broker(procs, args.broker, out, "node", fake=fake, cpu=pin[1],
                            workers=workers, subcommand="node", env=env,
                            extra=["--node-name", NODE])
        status, body = node.get("app_service")
        if status != 200:
            raise bench.Failure(f"node broker: {status} {body[:300]!r}")
        sidecar.get("app_service")
        nginx = bench.Nginx(procs, out, body, cpu=pin[1])
        targets = {
            "node (attested)": (node.port, bench.APP_TARGET, bench.APP_HEADER, node.pid),
            "sidecar": (sidecar.port, bench.APP_TARGET, bench.APP_HEADER, sidecar.pid),
            "nginx": (nginx.port, bench.IMDS_TARGET, bench.IMDS_HEADER, nginx.worker),
        }
        runs, _, _ = bench.interleaved_wrk(cfg, targets, pin)
    finally:
        procs.stop_all()
    print(f"hot path, App Service, {args.mode} mode ({cfg['rounds']} rounds of {cfg['wrk_secs']} s)")
    print("| conns | target | req/s | ×nginx (median of rounds) | p99 µs | errors |")
    print("|---:|---|---:|---:|---:|---:|")
    failures = []
    for c in cfg["conns"]:
        for name in targets:
            rs = runs[name][c]
            rps = statistics.median(bench.req_per_s(r) for r in rs)
            p99 = statistics.median(r["latency_us"]["p99"] for r in rs)
            errors = sum(sum(r["errors"].values()) for r in rs)
            ratio = "" if name == "nginx" else f"{statistics.median(bench.req_per_s(a) / bench.req_per_s(b) for a, b in zip(rs, runs['nginx'][c])):.2f}"
            print(f"| {c} | {name} | {rps:,.0f} | {ratio} | {p99:,.0f} | {errors} |")
            if errors:
                failures.append(f"{name} at {c} connections: {errors} errors")
    if failures:
        print("FAILED:", *failures, sep="\n  ")
        sys.exit(1)


if __name__ == "__main__":
    main()
