#!/usr/bin/env bash
# Real Azure SDK clients against imds-broker (with the fake Entra behind it), and transparent
# mode (169.254.169.254 on a network namespace's loopback) for real. See
# docs/client-compatibility.md and docs/transparent-mode.md.
#
# Installs what it needs: the pinned Python SDKs into .venv (shared with other scripts), the
# pinned Node SDK into tests/conformance/node/node_modules, the Go azidentity clients (one per
# version Velero pins; modules through the Go module proxy, checked against the committed
# go.sum) into target/go-clients, iproute2/util-linux if missing.
# The transparent-mode tests need root and `ip netns`; elsewhere they skip, except with CI=true
# (or IMDS_BROKER_REQUIRE_NETNS=1), where they must run.
#
#   scripts/test-conformance.sh                 everything
#   scripts/test-conformance.sh -k transparent  pytest arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."

echo "--- building the broker, the fake Entra, the fake pod API and the Rust SDK client"
cargo build --locked --bin imds-broker --example fake_entra --example fake_kube_pods --example rust_mi_client

echo "--- Python SDKs (.venv)"
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r tests/conformance/requirements.txt

echo "--- Go azidentity clients (tests/conformance/go, one module per version Velero pins)"
if ! command -v go >/dev/null && [[ $(id -u) -eq 0 ]]; then
  # CI images have Go; a bare Debian gets its packaged one (go.mod's `go` lines are <= 1.24).
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go >/dev/null
fi
bash tests/conformance/go/build.sh

echo "--- Node SDK"
command -v node >/dev/null || { echo "node (>= 20) is required"; exit 1; }
(cd tests/conformance/node && npm ci --no-audit --no-fund --loglevel=error)

if [[ $(id -u) -eq 0 ]] && { ! command -v ip >/dev/null || ! command -v setpriv >/dev/null; }; then
  echo "--- iproute2 / util-linux for the network-namespace tests"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 util-linux >/dev/null
fi

echo "--- conformance suite"
cd tests/conformance
exec ../../.venv/bin/python -m pytest "$@"
