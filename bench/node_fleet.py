#!/usr/bin/env python3
"""Fleet economics, node mode vs sidecar mode, side by side in one run (issue 21, item 5).

N nodes x M pods, every pod a Velero data mover asking for the two Velero scopes (storage,
then ARM) over App Service with the identity header, against ONE fake Entra
(examples/fake_entra) answering after 50 ms with short-lived tokens (L seconds):

  node:    N `imds-broker node` processes, one per "node" (its own --node-name, token file,
           listen address 127.0.<node+1>.1, admin port), attesting callers against ONE
           examples/fake_kube_pods holding the N x M pods (namespace velero, ServiceAccount
           velero-server). Pod j of node i has the address 127.<100+i>.<j//250>.<j%250+1>
           (Linux routes 127/8 to lo); its client binds its socket to that address before
           connecting, so the broker sees the pod's address as the source.
  sidecar: N x M `imds-broker serve` processes, one per pod (127.0.0.1, ephemeral ports),
           each asked by its own pod only.

Each mode, in turn, on the same fake: start its brokers and wait until every one is ready
(node mode: pods listed); a cold round (every pod at once asks for storage, then ARM: no
broker has a token yet); then `periods` refresh periods (L/2 s each: the broker refreshes at
half-life) in which every pod asks for both tokens once per period at a random moment (the
warm requests). Measures Entra calls per node (cold round: target exactly 2, whatever M; the
whole window: within the refresh schedule, i.e. 2 per node per refresh period), per-request
latency p50/p99 cold and warm, PSS per node broker vs per sidecar broker (and per node:
M sidecars), broker CPU (wait4, start to exit) per node.

Writes OUT/node_fleet.json and .md (OUT/node_fleet-smoke.* with --mode smoke) and prints
them; bench/node_fleet_plot.py draws bench/node_fleet.png. Exits non-zero only on functional
failures (a client failure, Entra calls != 2 per node in the cold round, calls off the
refresh schedule), never on a timing.

Every process started here is stopped by its PID; all traffic stays on 127/8 (lo).
"""

import argparse
import asyncio
import json
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import fleet  # noqa: E402  (the sidecar fleet: its client, broker driver and readers)
from bench import Failure, log, memory_breakdown  # noqa: E402
from fleet import ARM, STORAGE, dist, pct  # noqa: E402

ENTRA_DELAY_MS = fleet.ENTRA_DELAY_MS
NAMESPACE, SERVICE_ACCOUNT = "velero", "velero-server"

MODES = {
    # nodes, pods per node, token lifetime (s), refresh periods observed after the cold round
    "full": dict(nodes=20, pods=50, lifetime=20, periods=3),
    "smoke": dict(nodes=2, pods=5, lifetime=6, periods=2),
}


def pod_ip(node, j):
    return f"127.{100 + node}.{j // 250}.{j % 250 + 1}"


def node_listen(node):
    return f"127.0.{node + 1}.1"


class FakeKube:
    """examples/fake_kube_pods: prints {kubeconfig, control}; POST /pods registers pods."""

    def __init__(self, procs, binary):
        self.proc, self.info = bench.start_announcing(procs, [str(binary)], "fake_kube_pods")
        self.control_port = int(self.info["control"].rsplit(":", 1)[1])

    def add(self, pods):
        import http.client
        c = http.client.HTTPConnection("127.0.0.1", self.control_port, timeout=30)
        c.request("POST", "/pods", json.dumps(pods), {"content-type": "application/json"})
        r = c.getresponse()
        body = r.read()
        if r.status != 200:
            raise Failure(f"fake_kube_pods POST /pods answered {r.status}: {body[:200]!r}")


async def pod_round(port, host, source, out, key):
    """One pod asks for storage, then ARM; each request's latency (ms) goes to out[key],
    failures to out['errors']."""
    for res_ in (STORAGE, ARM):
        rec = {"retries": 0, "errors": []}
        t = time.monotonic()
        if await fleet.get_token(port, res_, rec, "t", host, source):
            out[key].append(1000 * (rec["t"] - t))
        out["errors"] += [f"{source or port}: {e}" for e in rec["errors"]]
        out["retries"] += rec["retries"]


async def start_brokers(procs, argvs, env):
    """Starts every broker back to back, then waits until each is ready."""
    started = []
    for argv in argvs:
        p, rec, reader, listening = await fleet.spawn(procs, argv, env)
        rec["log"] = reader
        started.append((p, rec, listening))
        await asyncio.sleep(0)
    await asyncio.gather(*(fleet.wait_ready(p, rec, ls) for p, rec, ls in started))
    return [(p, rec) for p, rec, _ in started]


async def run_mode(mode, procs, paths, fake, kube, cfg, first_file):
    """One mode's fleet: start, cold round, warm periods; returns its measurements."""
    n, m, L = cfg["nodes"], cfg["pods"], cfg["lifetime"]
    files = fake.info["token_files"]
    env = dict(bench.image_env(), RUST_LOG="info")
    if mode == "node":
        env["KUBECONFIG"] = kube.info["kubeconfig"]
        argvs = [fleet.broker_argv(paths["broker"], fake, files[first_file + i],
                                   ["--node-name", f"node-{i}", "--allow-namespace", NAMESPACE],
                                   sub="node", listen=f"{node_listen(i)}:0")
                 for i in range(n)]
    else:
        argvs = [fleet.broker_argv(paths["broker"], fake, files[first_file + k])
                 for k in range(n * m)]
    t_start = time.monotonic()
    started = await start_brokers(procs, argvs, env)
    t_ready = time.monotonic()
    for k, (_, rec) in enumerate(started):
        rec["jti"] = f"fleet-{first_file + k + 1}"

    def target(i, j):
        """(broker port, broker host, client source address) of pod j of node i."""
        if mode == "node":
            return started[i][1]["port"], node_listen(i), pod_ip(i, j)
        return started[i * m + j][1]["port"], "127.0.0.1", None

    out = {"cold": [], "warm": [], "errors": [], "retries": 0}
    pods = [(i, j) for i in range(n) for j in range(m)]
    t_cold = time.monotonic()
    await asyncio.gather(*(pod_round(*target(i, j), out, "cold") for i, j in pods))
    t_cold_done = time.monotonic()
    # Warm: each pod once per refresh period, at a random moment of it.
    half = L / 2
    rnd = random.Random(21)

    async def later(at, i, j):
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        await pod_round(*target(i, j), out, "warm")

    t_warm = time.monotonic()
    await asyncio.gather(*(later(t_warm + k * half + rnd.uniform(0, half), i, j)
                           for k in range(cfg["periods"]) for i, j in pods))
    t_end = time.monotonic()
    # Entra calls per broker (by the jti of its token file), from its first call to t_end.
    offset = fleet.fake_clock_offset(fake)
    by = fleet.per_broker_calls(fleet.call_log(fake), offset)
    recs = [rec for _, rec in started]
    per_broker = [sorted(by.get(r["jti"], []), key=lambda c: c["t"]) for r in recs]
    cold_calls = [sum(1 for c in calls if c["t"] <= t_cold_done) for calls in per_broker]
    window_calls = [len(calls) for calls in per_broker]
    firsts = [calls[0]["t"] for calls in per_broker if calls]
    window = t_end - min(firsts) if firsts else 0.0
    # Each broker's schedule runs from its own first call: a thousand sidecars' first calls
    # spread over the seconds the cold round takes.
    expected = [fleet.expected_refresh_calls(t_end - calls[0]["t"], L) if calls else [2, 2]
                for calls in per_broker]
    per_node = (lambda xs: xs) if mode == "node" else (
        lambda xs: [sum(xs[i * m:(i + 1) * m]) for i in range(n)])
    periods_in_window = 1 + int(window // half)
    mem = [memory_breakdown(r["pid"]) for r in recs]
    pss = [x.get("Pss") or 0 for x in mem]
    cpu = fleet.stop_and_reap(procs, [p for p, _ in started])
    cpu_by = [cpu.get(r["pid"], 0.0) for r in recs]
    res = {
        "mode": mode, "brokers": len(recs), "nodes": n, "pods_per_node": m,
        "start_to_all_ready_s": t_ready - t_start,
        "cold_round_s": t_cold_done - t_cold, "window_s": window,
        "refresh_period_s": half, "refresh_periods_in_window": periods_in_window,
        "cold_ms": dist(out["cold"]), "warm_ms": dist(out["warm"]),
        "cold_samples_ms": sorted(out["cold"]), "warm_samples_ms": sorted(out["warm"]),
        "client_requests": len(out["cold"]) + len(out["warm"]),
        "client_errors": out["errors"], "client_retries": out["retries"],
        "entra_calls": sum(window_calls),
        "entra_calls_cold_per_node": per_node(cold_calls),
        "entra_calls_per_node": per_node(window_calls),
        "entra_calls_per_node_per_refresh_period": [
            c / periods_in_window for c in per_node(window_calls)],
        "entra_calls_expected_per_broker": [min(e[0] for e in expected), max(e[1] for e in expected)],
        "brokers_off_schedule": sum(1 for c, (lo, hi) in zip(window_calls, expected) if not lo <= c <= hi),
        "pss_per_broker_kib": dist(pss),
        "pss_per_node_kib": dist(per_node(pss)),
        "rss_per_broker_kib": dist([x.get("VmRSS") or 0 for x in mem]),
        "cpu_s_total": sum(cpu_by),
        "cpu_ms_per_broker": dist([1000 * c for c in cpu_by]),
        "cpu_ms_per_node": dist([1000 * c for c in per_node(cpu_by)]),
        "cpu_ms_at_ready_per_node": dist(per_node([1000 * (r.get("cpu_at_ready_s") or 0)
                                                   for r in recs])),
    }
    log(f"{mode}: {len(recs)} brokers, {res['client_requests']} requests, "
        f"{len(out['errors'])} failures, {res['entra_calls']} Entra calls")
    return res


async def run(cfg, paths, res, procs):
    n, m = cfg["nodes"], cfg["pods"]
    fake = fleet.FakeFleet(procs, paths["fake"], delay_ms=ENTRA_DELAY_MS,
                           lifetime=cfg["lifetime"], extra=["--token-files", str(n + n * m)])
    kube = FakeKube(procs, paths["kube"])
    kube.add([{"namespace": NAMESPACE, "name": f"mover-{i}-{j}", "node": f"node-{i}",
               "service_account": SERVICE_ACCOUNT, "ip": pod_ip(i, j)}
              for i in range(n) for j in range(m)])
    log(f"node mode: {n} node brokers, {n * m} pods")
    res["node"] = await run_mode("node", procs, paths, fake, kube, cfg, 0)
    log(f"sidecar mode: {n * m} brokers")
    res["sidecar"] = await run_mode("sidecar", procs, paths, fake, kube, cfg, n)
    res["fake_entra_cpu_s"] = fleet.stop_and_reap(procs, [fake.proc]).get(fake.proc.pid)


def evaluate(res):
    t, f = [], []
    for mode in ("node", "sidecar"):
        r = res.get(mode)
        if not r:
            continue
        if r["client_errors"]:
            f.append(f"{mode}: client failures: {r['client_errors'][:5]}")
        t.append((f"{mode}: no client failure ({r['client_requests']} requests)",
                  str(len(r["client_errors"])), not r["client_errors"]))
        lo, hi = r["entra_calls_expected_per_broker"]
        if r["brokers_off_schedule"]:
            f.append(f"{mode}: {r['brokers_off_schedule']} brokers made Entra calls off the "
                     f"refresh schedule from their first call ({lo}-{hi})")
        t.append((f"{mode}: every broker's Entra calls on its refresh schedule ({lo}-{hi})",
                  f"{r['brokers_off_schedule']} off", not r["brokers_off_schedule"]))
    r = res.get("node")
    if r:
        cold = r["entra_calls_cold_per_node"]
        ok = all(c == 2 for c in cold)
        if not ok:
            f.append(f"node: Entra calls in the cold round per node {cold}, expected 2 each")
        t.append((f"node: Entra calls == 2 per node in the cold round, {r['pods_per_node']} pods each",
                  f"min {min(cold)} / max {max(cold)}", ok))
    return t, f


def fmt(d, unit="ms", nd=1, scale=1.0):
    if not d:
        return "n/a"
    return (f"p50 {d['p50'] * scale:.{nd}f} / p99 {d['p99'] * scale:.{nd}f} / "
            f"max {d['max'] * scale:.{nd}f} {unit}")


def render(res, targets, failures):
    L = []
    mc = res["machine"]
    c = res["params"]
    L.append(f"Machine: {mc['cpu']} ({mc['cpus']} vCPU), {mc['memory']} RAM, kernel {mc['kernel']}")
    L.append(f"Mode: {res['mode']}; broker {res['broker']}; load average at start "
             f"{' '.join(res['load_start'])}, at end {' '.join(res.get('load_end', ['?']))}; "
             f"{res['priorities']}")
    L.append(f"{c['nodes']} nodes x {c['pods']} pods; fake Entra {ENTRA_DELAY_MS} ms, "
             f"{c['lifetime']}-s tokens (refresh period {c['lifetime'] / 2:g} s), "
             f"{c['periods']} refresh periods after the cold round")
    L.append("")
    L.append("| per node | node mode (1 broker) | sidecar mode (M brokers) |")
    L.append("|---|---|---|")
    nd, sc = res.get("node"), res.get("sidecar")

    def row(name, get):
        L.append(f"| {name} | {get(nd) if nd else 'n/a'} | {get(sc) if sc else 'n/a'} |")

    row("brokers", lambda r: f"{r['brokers']} ({r['brokers'] // r['nodes']} per node)")
    row("Entra calls, cold round (per node: min / max)",
        lambda r: f"{min(r['entra_calls_cold_per_node'])} / {max(r['entra_calls_cold_per_node'])}")
    row("Entra calls per node per refresh period (p50)",
        lambda r: f"{pct(r['entra_calls_per_node_per_refresh_period'], 50):.2f} "
                  f"({r['entra_calls']} calls over {r['window_s']:.1f} s = "
                  f"{r['refresh_periods_in_window']} periods)")
    row("token latency, cold (first request of each pod)", lambda r: fmt(r["cold_ms"]))
    row("token latency, warm", lambda r: fmt(r["warm_ms"]))
    row("PSS per broker", lambda r: fmt(r["pss_per_broker_kib"], "MiB", 2, 1 / 1024))
    row("PSS per node", lambda r: fmt(r["pss_per_node_kib"], "MiB", 2, 1 / 1024))
    row("RSS per broker", lambda r: fmt(r["rss_per_broker_kib"], "MiB", 2, 1 / 1024))
    row("broker CPU per node, start to exit", lambda r: fmt(r["cpu_ms_per_node"]))
    row("broker CPU per node, start to ready", lambda r: fmt(r["cpu_ms_at_ready_per_node"]))
    row("broker CPU, all brokers", lambda r: f"{r['cpu_s_total']:.2f} s")
    row("start -> every broker ready", lambda r: f"{r['start_to_all_ready_s']:.2f} s")
    row("client requests / retries / failures",
        lambda r: f"{r['client_requests']} / {r['client_retries']} / {len(r['client_errors'])}")
    L.extend(bench.verdict_lines(targets, failures))
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=MODES, default="full")
    ap.add_argument("--out", type=Path, default=bench.BENCH / "out")
    ap.add_argument("--broker", type=Path, required=True, help="an imds-broker with `node`")
    ap.add_argument("--fake", type=Path, required=True, help="examples/fake_entra")
    ap.add_argument("--kube", type=Path, required=True, help="examples/fake_kube_pods")
    ap.add_argument("--nodes", type=int)
    ap.add_argument("--pods", type=int, help="pods per node")
    args = ap.parse_args()
    cfg = dict(MODES[args.mode])
    cfg.update({k: v for k, v in (("nodes", args.nodes), ("pods", args.pods)) if v})
    if cfg["pods"] > 250 * 256 or cfg["nodes"] > 150:
        raise SystemExit("at most 150 nodes and 64000 pods per node (127.<100+node>.x.y)")
    paths = {"broker": args.broker, "fake": args.fake, "kube": args.kube}
    for k, p in paths.items():
        if not p.exists():
            raise SystemExit(f"{k} binary {p} missing")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    # Each sidecar broker holds a pipe here; each pod up to one connection at a time.
    total = cfg["nodes"] * cfg["pods"]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * total + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    res = {"mode": args.mode, "params": cfg, "broker": str(args.broker),
           "priorities": fleet.raise_driver_priority(),
           "machine": bench.machine_info(), "load_start": bench.loadavg()}
    stem = "node_fleet" if args.mode == "full" else "node_fleet-smoke"
    return fleet.run_and_report(lambda procs: run(cfg, paths, res, procs), res, evaluate, render,
                                args.out, stem, "node fleet")


if __name__ == "__main__":
    sys.exit(main())
