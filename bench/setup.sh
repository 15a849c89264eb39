#!/usr/bin/env bash
# Installs what the benchmarks need and builds the binaries they drive.
#   bench/setup.sh [debug|release] [--plot]
# wrk and nginx come from Debian (apt-get, non-interactive, only if missing); the broker,
# the fake Entra and the load clients are built with cargo; --plot adds matplotlib to the
# repository's .venv. Prints the directory holding the binaries on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${1:-release}
plot=${2:-}

need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
    sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo -n)
    echo "bench: installing ${need[*]} with apt-get" >&2
    # Keep the package's init script from starting a system nginx on port 80.
    policy_created=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee /usr/sbin/policy-rc.d >/dev/null
        "${sudo[@]}" chmod +x /usr/sbin/policy-rc.d
        policy_created=1
    fi
    install() { "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2; }
    if ! install; then
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
        install
    fi
    [ -z "$policy_created" ] || "${sudo[@]}" rm -f /usr/sbin/policy-rc.d
fi

if [ "$profile" = release ]; then
    # The shipped binary (static, scripts/build-release); the tools in a second invocation so
    # their dev-dependency features do not change the broker.
    scripts/build-release >/dev/null
    dir=$(scripts/build-release --example bench_client --example fake_entra --example fake_kube_pods --example hostile_authority --example hyper_static | tail -n1)
else
    cargo build --locked --bin imds-broker --example bench_client --example fake_entra --example fake_kube_pods --example hostile_authority --example hyper_static >&2
    dir=target/debug
fi

if [ "$plot" = --plot ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv >&2
    .venv/bin/python -c 'import matplotlib' 2>/dev/null || .venv/bin/pip install -q matplotlib >&2
fi
echo "$dir"
