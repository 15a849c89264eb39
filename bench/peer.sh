#!/usr/bin/env bash
# The nearest peer, side by side (issue 16 item 1; bench/README.md, "Nearest peer"): builds
# imds-broker (shipped static build) and the bench tools (bench/setup.sh), azwi-proxy and
# azwi-webhook v1.6.0 (bench/peer/build.sh) and, for the webhook part, the kube-apiserver +
# etcd the cluster tests use (scripts/test-cluster.sh builds them; here it is called with
# pytest's --collect-only, so it builds and caches but runs no test), then runs bench/peer.py
# and plots bench/peer.png. Not part of the test run: a cold build takes ~15-25 minutes.
#
#   bench/peer.sh                      # full run (~7 minutes of measuring, once built)
#   bench/peer.sh --mode smoke         # ~1-minute scaled-down run (plot in bench/out)
#   bench/peer.sh --only proxy         # skip the webhook part (and the Kubernetes build)
#
# Extra arguments go to bench/peer.py. BENCH_WAIT_QUIET (seconds, default 1800) bounds the
# wait for a quiet machine (1-minute load < 0.7) before measuring; 0 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

dir=$(bench/setup.sh release --plot | tail -n1)
peer=$(bench/peer/build.sh | tail -n1)
version=$(basename "$peer")

k8s_args=()
case " $* " in
  *" --only proxy "*|*" --only=proxy "*) ;;
  *)
    # Builds (cached) the control plane, the Velero drivers and the debug broker, and
    # installs the cluster tests' .venv packages (PyYAML); --collect-only runs no test.
    scripts/test-cluster.sh --collect-only -q >/dev/null
    k8s_version=$(cd tests/cluster/k8s && go list -m -f '{{.Version}}' k8s.io/kubernetes)
    k8s_args=(--k8s-bin "target/cluster-bin/kubernetes-$k8s_version")
    ;;
esac

# Wait (bounded) for the machine to calm down: other builds share the two cores.
wait_max=${BENCH_WAIT_QUIET:-1800}
waited=0
while (( waited < wait_max )) && awk '{exit !($1 >= 0.7)}' /proc/loadavg; do
    echo "bench/peer.sh: 1-minute load $(cut -d' ' -f1 /proc/loadavg) >= 0.7, waiting" >&2
    sleep 30
    waited=$((waited + 30))
done

status=0
.venv/bin/python bench/peer.py --out bench/out \
    --broker "$dir/imds-broker" --client "$dir/examples/bench_client" --fake "$dir/examples/fake_entra" \
    --peer "$peer/azwi-proxy" --peer-webhook "$peer/azwi-webhook" --peer-version "$version" \
    "${k8s_args[@]}" "$@" || status=$?
# The committed plot is the full run's; a smoke run's plot stays in bench/out.
plot=bench/peer.png
case " $* " in *" --mode smoke "*|*" --mode=smoke "*) plot=bench/out/peer.png ;; esac
if [ -f bench/out/peer.json ]; then
    .venv/bin/python bench/peer_plot.py bench/out/peer.json "$plot"
fi
exit $status
