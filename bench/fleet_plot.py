#!/usr/bin/env python3
"""Plots the fleet's time-to-first-token distribution from bench/fleet.py's fleet.json.

    .venv/bin/python bench/fleet_plot.py bench/out/fleet.json bench/fleet.png

Left: cumulative distribution of process start -> first token (storage) and -> both tokens
(storage, then ARM) over the brokers of the unthrottled burst, with the one-broker-alone
figures and the target (start-up + Entra latency + 50 ms) as vertical lines. Right: the same
for the throttled burst (seconds), where the bucket, not the broker, sets the pace.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def cdf(ax, xs, label, color, scale=1.0):
    xs = sorted(x * scale for x in xs)
    if not xs:
        return
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step(xs, ys, where="post", label=label, color=color)


def main(src, dst):
    res = json.load(open(src))
    panels = [k for k in ("burst", "throttled") if res.get(k)]
    if not panels:
        print(f"fleet_plot: no burst in {src}; {dst} left as it was", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, key in zip(axes[0], panels):
        b = res[key]
        scale, unit = (1.0, "ms") if key == "burst" else (1e-3, "s")
        cdf(ax, b["first_token_samples_ms"], "start → first token (storage)", "tab:blue", scale)
        cdf(ax, b["both_tokens_samples_ms"], "start → both tokens (+ ARM)", "tab:orange", scale)
        if key == "burst" and res.get("paced"):
            pc = res["paced"]
            cdf(ax, pc["first_token_samples_ms"], "paced (starts over 1 s): first token",
                "tab:cyan", scale)
            cdf(ax, pc["both_tokens_samples_ms"], "paced: both tokens", "tab:olive", scale)
        if key == "burst":
            solo = res.get("solo")
            if solo:
                base = solo["start_to_ready_ms"]["p50"]
                lim = base + b["entra_delay_ms"] + 50
                ax.axvline(lim, color="tab:red", ls="--",
                           label=f"target p99: start-up {base:.0f} + {b['entra_delay_ms']} + 50 ms")
                ax.axvline(solo["start_to_first_token_ms"]["p50"], color="tab:gray", ls=":",
                           label="one broker alone: first token (median)")
            ax.axhline(0.99, color="tab:gray", lw=0.5)
            title = (f"{b['brokers']} brokers started within {b['spawn_spread_ms']:.0f} ms, "
                     f"Entra {b['entra_delay_ms']} ms")
        else:
            t = b["throttle"]
            title = (f"{b['brokers']} brokers, Entra throttled: {t['rate']:g}/s, burst {t['burst']:g}, "
                     f"Retry-After {t['retry_after']} s")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"time since the broker's own process start ({unit})")
        ax.set_ylabel("fraction of brokers")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    m = res["machine"]
    fig.suptitle(f"imds-broker fleet: time to first token ({m['cpus']} vCPU, load at start "
                 f"{res['load_start'][0]})", fontsize=11)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
