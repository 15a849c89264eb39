#!/usr/bin/env bash
# Storage end to end, no Azure account: Azurite (the real Storage emulator, HTTPS, OAuth checked)
# with tokens from `imds-broker serve --emulate`, through
#   - the real Python and Node Storage SDKs (ManagedIdentityCredential over the App Service env),
#   - Velero's own data-mover storage path (udmrepo/kopialib + Velero's kopia uploader), built
#     from the Go module proxy for each Velero version in tests/conformance/velero/.
# See docs/storage-e2e.md.
#
# Installs what it needs: Azurite + the Node SDK (npm ci in tests/conformance/storage-node), the
# Python SDKs (.venv, shared with the conformance stage), the Go modules (module proxy, go.sum
# committed). The Velero programs are big Go builds: built one at a time under `nice -n 10`, and
# kept in target/velero-kopia/<version>/ with a stamp of their inputs, so a warm run skips them.
#
#   scripts/test-storage.sh                         everything
#   VELERO_VERSIONS=1.18.3 scripts/test-storage.sh  only that Velero round trip (space-separated;
#                                                   "none" for the SDK tests only)
#   scripts/test-storage.sh -k node                 pytest arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

echo "--- building the broker"
# With an example in the build, cargo unifies dev-dependency features as `cargo test` does, so
# this reuses the test build instead of compiling every dependency a second time.
cargo build --locked --bin imds-broker --example fake_entra --example fake_kube_pods

echo "--- Python SDKs (.venv)"
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check \
  -r tests/conformance/requirements.txt -r tests/conformance/storage-requirements.txt

echo "--- Azurite and the Node Storage SDK (npm ci)"
command -v node >/dev/null || { echo "node (>= 20) is required"; exit 1; }
NODE_DIR=tests/conformance/storage-node
# npm ci wipes and reinstalls (~50 s): skipped when node_modules was installed from this very lock
# (npm records the installed tree in node_modules/.package-lock.json, newer than the lock file).
if [[ -x $NODE_DIR/node_modules/.bin/azurite-blob && $NODE_DIR/node_modules/.package-lock.json -nt $NODE_DIR/package-lock.json ]]; then
  echo "already installed from package-lock.json"
else
  (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error)
fi

# Every Velero version that has a module here, unless VELERO_VERSIONS narrows it.
if [[ -z "${VELERO_VERSIONS:-}" ]]; then
  VELERO_VERSIONS=$(cd tests/conformance/velero && ls -d velero-*/ | sed 's#velero-##; s#/##' | tr '\n' ' ')
fi
[[ "$VELERO_VERSIONS" == none ]] && VELERO_VERSIONS=""

build_velero() {
  # One version's round-trip program. The stamp covers the Go toolchain and every input file
  # (the version's module and the shared ../roundtrip), so any change rebuilds.
  local version=$1
  local mod=tests/conformance/velero/velero-$version
  local out=$TARGET/velero-kopia/$version
  [[ -f $mod/go.mod ]] || { echo "no module $mod"; return 1; }
  local stamp
  stamp=$( { go version; cd tests/conformance/velero && find "velero-$version" roundtrip -type f \
    \( -name '*.go' -o -name go.mod -o -name go.sum \) | sort | xargs sha256sum; } | sha256sum | cut -d' ' -f1)
  if [[ -x $out/velero-roundtrip && "$(cat "$out/stamp" 2>/dev/null)" == "$stamp" ]]; then
    echo "velero $version: cached ($out)"
    return 0
  fi
  mkdir -p "$out"
  local start=$SECONDS
  # -mod=readonly: go.mod/go.sum are committed and must already be complete. The Go build cache
  # (default location) keeps compiled packages for the next run.
  (cd "$mod" && GOFLAGS=-mod=readonly nice -n 10 go build -trimpath -o "$out/velero-roundtrip.tmp" .)
  mv "$out/velero-roundtrip.tmp" "$out/velero-roundtrip"
  echo "$stamp" >"$out/stamp"
  echo "velero $version: built in $((SECONDS - start))s"
}

for v in $VELERO_VERSIONS; do
  echo "--- Velero $v kopia round-trip program (go build)"
  build_velero "$v"
done

echo "--- storage tests"
cd tests/conformance
export IMDS_BROKER_STORAGE_E2E=1 VELERO_VERSIONS
exec ../../.venv/bin/python -m pytest test_storage_azurite.py test_storage_velero.py "$@"
