#!/usr/bin/env bash
# The full benchmark (about 26 minutes): installs wrk and nginx if missing, builds the release
# binaries, waits (up to BENCH_WAIT_QUIET seconds, default 45 min) for a quiet machine, runs
# the five measurements, prints the table and writes bench/out/results.{json,md} and
# bench/latency.png. Extra arguments go to bench/bench.py (e.g. --only hot,cold).
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
dir=$(bench/setup.sh release --plot | tail -n1)
status=0
python3 bench/bench.py --mode full --out bench/out \
    --broker "$dir/imds-broker" --client "$dir/examples/bench_client" --fake "$dir/examples/fake_entra" \
    --hyper "$dir/examples/hyper_static" \
    --wait-quiet "${BENCH_WAIT_QUIET:-2700}" "$@" || status=$?
if [ -f bench/out/results.json ]; then
    .venv/bin/python bench/plot.py bench/out/results.json bench/latency.png
fi
exit $status
