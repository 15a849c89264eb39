#!/usr/bin/env python3
"""Plots bench/peer.py's peer.json: side-by-side latency percentiles and throughput.

    .venv/bin/python bench/peer_plot.py bench/out/peer.json bench/peer.png

Top row: hot-path p50 / p99 / p99.9 by concurrency (log scale, µs) for imds-broker,
azwi-proxy and nginx. Bottom row: hot-path requests/s; webhook p50 and p99 (ms) and
reviews/s for `imds-broker webhook` and azwi-webhook, when the run has the webhook part.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HOT = [("broker", "imds-broker", "tab:blue", "o"),
       ("azwi-proxy", "azwi-proxy v1.6.0", "tab:red", "s"),
       ("nginx", "nginx static file", "tab:gray", "^")]
HOOK = [("imds-broker", "imds-broker webhook", "tab:blue", "o"),
        ("azwi-webhook", "azwi-webhook v1.6.0", "tab:red", "s")]


def bars(ax, series, data, conns, key, scale):
    width = 0.8 / len(series)
    for i, (name, label, color, _) in enumerate(series):
        ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(conns))],
               [data[name][c][key] / scale for c in conns], width, color=color, label=label)
    ax.set_xticks(list(range(len(conns))), conns)
    ax.grid(True, axis="y", alpha=0.3)


def main(src, dst):
    res = json.load(open(src))
    fig, grid = plt.subplots(2, 3, figsize=(15, 8.6))
    hot = res.get("hot")
    if hot:
        conns = list(hot["broker"])
        for ax, (key, title) in zip(grid[0], [("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")]):
            for name, label, color, marker in HOT:
                ax.plot(range(len(conns)), [hot[name][c][key] for c in conns], marker=marker,
                        color=color, label=label)
            ax.set_yscale("log")
            ax.set_title(f"token request {title} latency (lower is better)")
            ax.set_ylabel("µs (log scale)")
            ax.set_xticks(list(range(len(conns))), conns)
            ax.set_xlabel("concurrent keep-alive connections")
            ax.grid(True, which="both", alpha=0.3)
        grid[0][0].legend(loc="upper left", fontsize=9)
        ax = grid[1][0]
        bars(ax, HOT, hot, conns, "rps", 1000)
        ax.set_title("token requests/s (higher is better)")
        ax.set_ylabel("thousand requests/s")
        ax.set_xlabel("concurrent keep-alive connections")
        ax.legend(loc="upper left", fontsize=8)
    wh = res.get("webhook", {}).get("summary")
    if wh:
        conns = list(wh["imds-broker"])
        ax = grid[1][1]
        for name, label, color, marker in HOOK:
            ax.plot(range(len(conns)), [wh[name][c]["p50_ms"] for c in conns], marker=marker,
                    color=color, label=f"{label} p50")
            ax.plot(range(len(conns)), [wh[name][c]["p99_ms"] for c in conns], marker=marker,
                    color=color, linestyle="--", label=f"{label} p99")
        ax.set_yscale("log")
        ax.set_title("AdmissionReview latency (lower is better)")
        ax.set_ylabel("ms (log scale)")
        ax.set_xticks(list(range(len(conns))), conns)
        ax.set_xlabel("concurrent reviews (keep-alive TLS connections)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax = grid[1][2]
        bars(ax, HOOK, wh, conns, "rps", 1)
        ax.set_title("reviews/s (higher is better)")
        ax.set_ylabel("reviews/s")
        ax.set_xlabel("concurrent reviews")
        ax.legend(loc="upper left", fontsize=8)
    else:
        grid[1][1].axis("off")
        grid[1][2].axis("off")
    m = res["machine"]
    fig.suptitle(f"imds-broker vs the nearest peer (azure-workload-identity {res.get('peer_version')}) "
                 f"and nginx; clients on CPU 0, server pinned to CPU 1\n{m['cpu']}, {m['cpus']} vCPU, "
                 f"{res['mode']} run, load at start {' '.join(res['load_start'])}", fontsize=11)
    fig.tight_layout()
    fig.savefig(dst, dpi=100)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
