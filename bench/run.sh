#!/usr/bin/env bash
# The full benchmark (about 26 minutes, plus ~6 for the fleet): installs wrk and nginx if
# missing, builds the release binaries, waits (up to BENCH_WAIT_QUIET seconds, default 45 min)
# for a quiet machine, runs the five measurements, prints the table and writes
# bench/out/results.{json,md} and bench/latency.png; then the fleet (bench/fleet.py: 200-broker
# burst, throttled burst, 6-simulated-hour cost run, idle wake-ups) into bench/out/fleet.{json,md}
# and bench/fleet.png; then node mode vs sidecar mode (bench/node_fleet.py) into
# bench/out/node_fleet.{json,md} and bench/node_fleet.png. Extra arguments go to bench/bench.py (e.g. --only hot,cold);
# `bench/run.sh fleet [fleet.py arguments]` runs only the fleet.
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
dir=$(bench/setup.sh release --plot | tail -n1)
status=0
fleet_only=
if [ "${1:-}" = fleet ]; then
    fleet_only=1
    shift
fi
if [ -z "$fleet_only" ]; then
    python3 bench/bench.py --mode full --out bench/out \
        --broker "$dir/imds-broker" --client "$dir/examples/bench_client" --fake "$dir/examples/fake_entra" \
        --hyper "$dir/examples/hyper_static" \
        --wait-quiet "${BENCH_WAIT_QUIET:-2700}" "$@" || status=$?
    if [ -f bench/out/results.json ]; then
        .venv/bin/python bench/plot.py bench/out/results.json bench/latency.png
    fi
    set --
fi
# 200 brokers on a shared machine: the same quiet-machine wait (bench.py's, one minute at a
# time) unless bench.py just had it.
if [ -n "$fleet_only" ] && [ "${BENCH_WAIT_QUIET:-2700}" != 0 ]; then
    python3 -c 'import sys; sys.path.insert(0, "bench"); import bench; print(bench.wait_quiet(0.7, float(sys.argv[1])))' \
        "${BENCH_WAIT_QUIET:-2700}" >&2
fi
python3 bench/fleet.py --mode full --out bench/out \
    --broker "$dir/imds-broker" --fake "$dir/examples/fake_entra" "$@" || status=$?
if [ -f bench/out/fleet.json ]; then
    .venv/bin/python bench/fleet_plot.py bench/out/fleet.json bench/fleet.png
fi
# Node mode vs sidecar mode, 20 nodes x 50 pods (bench/node_fleet.py, ~3 min).
python3 bench/node_fleet.py --mode full --out bench/out --broker "$dir/imds-broker" \
    --fake "$dir/examples/fake_entra" --kube "$dir/examples/fake_kube_pods" || status=$?
if [ -f bench/out/node_fleet.json ]; then
    .venv/bin/python bench/node_fleet_plot.py bench/out/node_fleet.json bench/node_fleet.png
fi
exit $status
