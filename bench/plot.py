#!/usr/bin/env python3
"""Plots the hot-path latency percentiles of bench/bench.py's results.json.

    .venv/bin/python bench/plot.py bench/out/results.json bench/latency.png

Three panels (p50, p99, p99.9; log scale, microseconds) by concurrency, broker IMDS and
App Service beside nginx, plus a requests/s panel.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERIES = [
    ("imds", "broker IMDS", "tab:blue", "o"),
    ("app_service", "broker App Service", "tab:orange", "s"),
    ("hyper", "bare hyper + Tokio (reference)", "tab:green", "D"),
    ("nginx", "nginx static file", "tab:gray", "^"),
]


def main(src, dst):
    res = json.load(open(src))
    s = res["hot_path"]["summary"]
    series = [row for row in SERIES if row[0] in s]
    conns = list(s["nginx"])
    x = range(len(conns))
    fig, grid = plt.subplots(2, 2, figsize=(12, 8.6))
    axes = grid.flatten()
    for ax, (key, title) in zip(axes, [("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")]):
        for name, label, color, marker in series:
            ax.plot(x, [s[name][c][key] for c in conns], marker=marker, color=color, label=label)
        ax.set_yscale("log")
        ax.set_title(f"{title} latency (lower is better)")
        ax.set_ylabel("µs (log scale)")
        ax.set_xticks(list(x), conns)
        ax.set_xlabel("concurrent keep-alive connections")
        ax.grid(True, which="both", alpha=0.3)
    ax = axes[3]
    width = 0.8 / len(series)
    for i, (name, label, color, _) in enumerate(series):
        ax.bar([j + (i - (len(series) - 1) / 2) * width for j in x], [s[name][c]["rps"] / 1000 for c in conns],
               width, color=color, label=label)
    ax.set_title("throughput (higher is better)")
    ax.set_ylabel("thousand requests/s")
    ax.set_xticks(list(x), conns)
    ax.set_xlabel("concurrent keep-alive connections")
    ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(loc="upper left", fontsize=9)
    top = max(s[n][c]["rps"] for n, *_ in series for c in conns) / 1000
    ax.set_ylim(0, top * 1.3)
    ax.legend(loc="upper center", fontsize=8, ncol=2)
    m = res["machine"]
    fig.suptitle(f"imds-broker vs nginx (static file of the same size), warm cache\n"
                 f"wrk -t1 on CPU 0, server pinned to CPU 1; {m['cpu']}, {m['cpus']} vCPU "
                 f"({res.get('mode', '')} run, median of {res['params']['rounds']} rounds, "
                 f"{res['params'].get('c1_rounds', res['params']['rounds'])} at 1 connection)", fontsize=11)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
