#!/usr/bin/env python3
"""Plots node mode vs sidecar mode from bench/node_fleet.py's node_fleet.json.

    .venv/bin/python bench/node_fleet_plot.py bench/out/node_fleet.json bench/node_fleet.png

Left: cumulative distribution of the token latency, cold (each pod's first requests, no broker
holding a token) and warm, both modes. Right: per node, side by side: Entra calls per refresh
period, PSS (MiB) and broker CPU start to exit (100 ms units), node mode vs sidecar mode.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fleet_plot import cdf  # noqa: E402


def main(src, dst):
    res = json.load(open(src))
    nd, sc = res.get("node"), res.get("sidecar")
    if not nd or not sc:
        print(f"node_fleet_plot: {src} lacks a mode; {dst} left as it was", file=sys.stderr)
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    cdf(ax, nd["cold_samples_ms"], "node mode, cold", "tab:blue")
    cdf(ax, nd["warm_samples_ms"], "node mode, warm", "tab:cyan")
    cdf(ax, sc["cold_samples_ms"], "sidecar mode, cold", "tab:red")
    cdf(ax, sc["warm_samples_ms"], "sidecar mode, warm", "tab:orange")
    ax.axvline(res["params"].get("entra_delay_ms", 50), color="tab:gray", ls=":",
               label="fake Entra's delay")
    ax.axhline(0.99, color="tab:gray", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("token request latency (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"{nd['nodes']} nodes x {nd['pods_per_node']} pods: storage + ARM tokens", fontsize=10)

    def med(xs):
        return sorted(xs)[len(xs) // 2]

    labels = ["Entra calls per\nrefresh period", "PSS (MiB)", "broker CPU,\nstart to exit (100 ms)"]
    vals = {
        name: [med(r["entra_calls_per_node_per_refresh_period"]),
               r["pss_per_node_kib"]["p50"] / 1024,
               r["cpu_ms_per_node"]["p50"] / 100]
        for name, r in (("node", nd), ("sidecar", sc))
    }
    w = 0.38
    xs = range(len(labels))
    for k, (name, color) in enumerate((("node", "tab:blue"), ("sidecar", "tab:red"))):
        bars = bx.bar([x + (k - 0.5) * w for x in xs], vals[name], w,
                      label=f"{name} mode" + (" (1 broker)" if name == "node" else
                                              f" ({sc['pods_per_node']} brokers)"), color=color)
        bx.bar_label(bars, fmt="%.1f", fontsize=8)
    bx.set_xticks(list(xs), labels, fontsize=9)
    bx.set_title("per node (median)", fontsize=10)
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3, axis="y")
    m = res["machine"]
    fig.suptitle(f"imds-broker: node mode vs sidecar mode ({m['cpus']} vCPU, load at start "
                 f"{res['load_start'][0]}, {res['params']['lifetime']}-s tokens)", fontsize=11)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
