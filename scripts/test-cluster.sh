#!/usr/bin/env bash
# The webhook against a real Kubernetes control plane (docs/cluster-tests.md): builds
# kube-apiserver, kube-controller-manager, kubectl and etcd from the Go module proxy
# (tests/cluster/k8s), the Velero CLI + pod-creating driver for each Velero version
# (tests/cluster/velero-v*), helm (scripts/build-packaging-tools), the debug imds-broker binary
# and the fake Entra, then runs the pytest suite in tests/cluster against them.
#
#   scripts/test-cluster.sh                 everything but the real node
#   CLUSTER_NODE=1 scripts/test-cluster.sh  also the real node (test_08_kubelet.py: containerd,
#                                           kubelet; scripts/test runs the stage this way)
#   scripts/test-cluster.sh -k restricted   extra arguments go to pytest
#
# Outputs are cached: binaries under target/cluster-bin/<name>/ (rebuilt when their module's
# go.mod/go.sum/sources change), compiled packages in Go's default build cache.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# Go modules only through the module proxy, verified against the committed go.sum files.
export GOFLAGS="-mod=readonly"
command -v go >/dev/null || { echo "go is required (Go 1.26)"; exit 1; }
command -v openssl >/dev/null || { apt-get update -qq && apt-get install -y -qq openssl; }

OUT="$ROOT/target/cluster-bin"
mkdir -p "$OUT"

# A module's stamp: the hash of every file that decides what gets built.
stamp_of() {
  (cd "$1" && find . -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) -print0 \
    | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
}

# build_module DIR OUTDIR LDFLAGS PACKAGES...: one `go build` (one link per main package),
# skipped when OUTDIR holds binaries from the same stamp. Niced: other builds share the cores.
build_module() {
  local dir="$1" outdir="$2" ldflags="$3"; shift 3
  local stamp
  stamp="$(stamp_of "$dir")"
  if [[ -f "$outdir/.stamp" && "$(cat "$outdir/.stamp")" == "$stamp" ]]; then
    echo "--- $(basename "$outdir"): cached"
    return
  fi
  echo "--- building $(basename "$outdir") from $dir"
  local start=$SECONDS
  rm -rf "$outdir" && mkdir -p "$outdir"
  (cd "$dir" && nice -n 10 go build -ldflags "$ldflags" -o "$outdir/" "$@")
  echo "$stamp" > "$outdir/.stamp"
  echo "--- built $(basename "$outdir") in $((SECONDS - start))s"
}

# The Kubernetes release is the one tests/cluster/k8s requires (scripts/build-cluster-k8s:
# the control plane; with CLUSTER_NODE=1 also the real node, test_08_kubelet*.py).
module_version() { (cd "$1" && go list -m -f '{{.Version}}' "$2"); }
[[ "${CLUSTER_NODE:-0}" == 0 ]] && CLUSTER_NODE=""
K8S_ENV="$(scripts/build-cluster-k8s ${CLUSTER_NODE:+--node})"
while IFS='=' read -r key value; do
  case "$key" in
    CLUSTER_K8S_VERSION) K8S_VERSION="$value" ;;
    CLUSTER_BIN_DIR) K8S_BIN="$value" ;;
    NODE_BIN_DIR | NODE_IMAGES_DIR) export "$key=$value" ;;
  esac
done <<< "$K8S_ENV"

# One driver per Velero version (oldest first: the tests install it, then upgrade).
VELERO_BINS=""
VELERO_VERSIONS=""
for dir in tests/cluster/velero-v1.15 tests/cluster/velero-v1.18; do
  version="$(module_version "$dir" github.com/vmware-tanzu/velero)"
  name="$(basename "$dir")"
  build_module "$dir" "$OUT/$name-$version" \
    "-X github.com/vmware-tanzu/velero/pkg/buildinfo.Version=$version" .
  # `go build .` names the binary after the module's last path element.
  VELERO_BINS+="${VELERO_BINS:+,}$version=$OUT/$name-$version/$name"
  VELERO_VERSIONS+=" $version"
done

# helm, for installing charts/imds-broker on the API server (test_04_helm.py); the same pinned
# build the packaging stage uses, cached per pin.
HELM_BIN="$(scripts/build-packaging-tools | tail -n1)/helm"
export HELM_BIN

echo "--- cargo build (imds-broker, fake_entra example)"
cargo build --locked --quiet --bin imds-broker --example fake_entra
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
if [[ -n "${CLUSTER_NODE:-}" ]]; then
  # The real node runs the shipped image (scripts/build-image: the release build, as the
  # packaging stage makes it) for the chart's webhook pods and the injected sidecar.
  echo "--- the imds-broker image (scripts/build-image)"
  BROKER_IMAGE_DIR="$(realpath "$(nice -n 10 scripts/build-image | tail -n1)")"
  BROKER_VERSION=$(sed -n '/^\[package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n1)
  export BROKER_IMAGE="$BROKER_IMAGE_DIR/imds-broker-$BROKER_VERSION.oci.tar"
fi

echo "--- Python test driver (.venv)"
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r tests/cluster/requirements.txt

export CLUSTER_BIN_DIR="$K8S_BIN"
export CLUSTER_K8S_VERSION="$K8S_VERSION"
export VELERO_BINS
export IMDS_BROKER_BIN="$TARGET/debug/imds-broker"
export FAKE_ENTRA_BIN="$TARGET/debug/examples/fake_entra"
export CLUSTER_RUN_DIR="$ROOT/target/cluster-run"
echo "--- pytest tests/cluster (Kubernetes $K8S_VERSION, Velero$VELERO_VERSIONS)"
cd tests/cluster
exec ../../.venv/bin/python -m pytest "$@"
