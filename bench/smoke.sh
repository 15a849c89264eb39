#!/usr/bin/env bash
# ~85-second smoke version of bench/run.sh for the test run: the same five measurements,
# scaled down (1-second wrk runs, 200 cold callers, 3 start-ups, a 13-second soak with
# 24-second tokens run alongside), then the fleet path (bench/fleet.py --mode smoke: a burst
# of 20 brokers, a throttled burst of 20, a 24-second cost run with a 20-second idle window alongside,
# ~35 s), node mode vs sidecar mode (bench/node_fleet.py --mode smoke, ~15 s), and the webhook's and one broker's worst allowed load in memory cgroups of their
# limits (bench/webhook_load.py, bench/broker_load.py, ~10 s). Exits non-zero only on functional failures (errors, more than one Entra call on the
# cold path, wrong refresh count, a broker not answering; in the fleet: a broker without its
# tokens, Entra calls != 2 per broker, a client failure within its retry budget, a call before
# Retry-After), never on performance numbers. It drives the shipped binary
# (scripts/build-release: release, static), so the test run also proves that build works. The
# harness's own tools (fake Entra, load client, bare hyper) are the debug builds the tests
# already compiled: a release build of them would compile the whole dependency graph a second
# time (their dev-dependency features differ from the broker's) for numbers the smoke run
# never judges. BENCH_PROFILE=debug drives the debug broker too; BENCH_PROFILE=release builds
# everything as bench/run.sh does.
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 8192 2>/dev/null || true
case "${BENCH_PROFILE:-shipped}" in
    shipped)
        tools=$(bench/setup.sh debug | tail -n1)
        broker=$(scripts/build-release | tail -n1)/imds-broker ;;
    debug|release)
        tools=$(bench/setup.sh "$BENCH_PROFILE" | tail -n1)
        broker=$tools/imds-broker ;;
    *) echo "BENCH_PROFILE must be shipped, debug or release" >&2; exit 2 ;;
esac
fake=$tools/examples/fake_entra
status=0
# The webhook under large reviews and idle connections (about 5 s; functional checks only).
python3 bench/webhook_load.py "$broker" || status=$?
# One broker at the worst load the limits allow: both listeners full of held heads, 1,000 cold
# resources, then 1,500 oversized heads (~5 s).
python3 bench/broker_load.py "$broker" "$fake" || status=$?
python3 bench/bench.py --mode smoke --out bench/out/smoke \
    --broker "$broker" --client "$tools/examples/bench_client" --fake "$fake" \
    --hyper "$tools/examples/hyper_static" "$@" || status=$?
# The fleet runs even if the above failed, so one run reports both.
python3 bench/fleet.py --mode smoke --out bench/out/smoke --broker "$broker" --fake "$fake" || status=$?
# Node mode vs sidecar mode, 2 nodes x 5 pods, 6-s tokens (~15 s): Entra calls == 2 per node
# in the cold round, every broker on the refresh schedule, no client failure.
python3 bench/node_fleet.py --mode smoke --out bench/out/smoke --broker "$broker" --fake "$fake" \
    --kube "$tools/examples/fake_kube_pods" || status=$?
exit $status
