#!/usr/bin/env bash
# The webhook against a real Kubernetes control plane (docs/cluster-tests.md): builds
# kube-apiserver, kube-controller-manager, kubectl and etcd from the Go module proxy
# (tests/cluster/k8s), the Velero CLI + pod-creating driver for each Velero version
# (tests/cluster/velero-v*), cert-manager's controller, cainjector and webhook
# (tests/cluster/cert-manager), helm (scripts/build-packaging-tools), the debug imds-broker
# binary and the fake Entra, fetches Velero's Helm chart and the VolumeSnapshot CRDs (Go
# modules), then runs the pytest suite in tests/cluster against them.
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

# cert-manager's controller, cainjector and webhook (our own mains in tests/cluster/cert-manager,
# linked against the release module from the proxy) and its chart from the same module
# release, for the `cert_manager` fixture (test_07_cert_manager.py).
CM_DIR=tests/cluster/cert-manager
CERT_MANAGER_VERSION="$(module_version "$CM_DIR" github.com/cert-manager/cert-manager)"
CERT_MANAGER_BIN_DIR="$OUT/cert-manager-$CERT_MANAGER_VERSION"
build_module "$CM_DIR" "$CERT_MANAGER_BIN_DIR" \
  "-X github.com/cert-manager/cert-manager/pkg/util.AppVersion=$CERT_MANAGER_VERSION" \
  ./controller ./cainjector ./webhook
CERT_MANAGER_CHART="$(cd "$CM_DIR" && go mod download -json github.com/cert-manager/cert-manager \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')/deploy/charts/cert-manager"
[[ -f "$CERT_MANAGER_CHART/Chart.yaml" ]] || { echo "no chart at $CERT_MANAGER_CHART"; exit 1; }
export CERT_MANAGER_VERSION CERT_MANAGER_BIN_DIR CERT_MANAGER_CHART

# helm, for installing charts/imds-broker on the API server (test_04_helm.py) and running the
# guide's helm commands (test_06_guide.py); the same pinned build the packaging stage uses,
# cached per pin.
HELM_BIN="$(scripts/build-packaging-tools | tail -n1)/helm"
export HELM_BIN

# What docs/velero-on-aks.md needs besides the binaries (test_06_guide.py): Velero's Helm chart
# and the VolumeSnapshot CRDs AKS installs. Both come as Go modules of their repositories through
# the module proxy (the chart has no other registry the tests can reach), checked against
# sum.golang.org on first download and against the h1: sums pinned here on every run.
# module_dir MODULE@VERSION H1SUM: prints the module's directory in the module cache.
module_dir() {
  local json sum tmp
  # Outside any module: `go mod download MODULE@VERSION` then needs no go.mod to record it in.
  tmp="$(mktemp -d)"
  json="$(cd "$tmp" && GOFLAGS=-mod=mod go mod download -json "$1")" \
    || { rmdir "$tmp"; echo "go mod download $1 failed: $json" >&2; return 1; }
  rmdir "$tmp"
  sum="$(sed -n 's/^\s*"Sum": "\(.*\)",\?$/\1/p' <<<"$json")"
  [[ "$sum" == "$2" ]] || { echo "$1: sum $sum, pinned $2 (changed pin? update it here)" >&2; return 1; }
  sed -n 's/^\s*"Dir": "\(.*\)",\?$/\1/p' <<<"$json"
}
# vmware-tanzu/helm-charts at tag velero-12.1.0 (commit 73466ca), the chart the guide installs.
VELERO_CHART_MODULE=github.com/vmware-tanzu/helm-charts@v0.0.0-20260625104947-73466ca986bb
VELERO_CHART_SUM="h1:c0O1VKJLtJpeYGt9QkClrI93u9RK4f7WHO5pVKkbHFI="
SNAPSHOT_MODULE=github.com/kubernetes-csi/external-snapshotter/client/v8@v8.7.0
SNAPSHOT_SUM="h1:HVaSUeRRHPu49aSiL8eXOjS9Re9G6pM0NzdTGI7mM14="

# Velero's chart packaged as a Helm repository (a .tgz and index.yaml with relative URLs; the
# test serves the directory on 127.0.0.1), cached per pin.
VELERO_CHART_REPO_DIR="$OUT/velero-chart-$(echo "$VELERO_CHART_MODULE $VELERO_CHART_SUM" | sha256sum | cut -c1-16)"
if [[ ! -f "$VELERO_CHART_REPO_DIR/index.yaml" ]]; then
  echo "--- Velero chart from $VELERO_CHART_MODULE"
  dir="$(module_dir "$VELERO_CHART_MODULE" "$VELERO_CHART_SUM")"
  rm -rf "$VELERO_CHART_REPO_DIR" "$VELERO_CHART_REPO_DIR.tmp" && mkdir -p "$VELERO_CHART_REPO_DIR.tmp"
  "$HELM_BIN" package "$dir/charts/velero" --destination "$VELERO_CHART_REPO_DIR.tmp" >/dev/null
  "$HELM_BIN" repo index "$VELERO_CHART_REPO_DIR.tmp"
  mv "$VELERO_CHART_REPO_DIR.tmp" "$VELERO_CHART_REPO_DIR"
fi
export VELERO_CHART_REPO_DIR
SNAPSHOT_CRDS_DIR="$OUT/snapshot-crds-$(echo "$SNAPSHOT_MODULE $SNAPSHOT_SUM" | sha256sum | cut -c1-16)"
if [[ ! -f "$SNAPSHOT_CRDS_DIR/.done" ]]; then
  echo "--- VolumeSnapshot CRDs from $SNAPSHOT_MODULE"
  dir="$(module_dir "$SNAPSHOT_MODULE" "$SNAPSHOT_SUM")"
  rm -rf "$SNAPSHOT_CRDS_DIR" && mkdir -p "$SNAPSHOT_CRDS_DIR"
  # The three snapshot.storage.k8s.io CRDs (AKS installs these, not the group-snapshot ones).
  cp "$dir"/config/crd/snapshot.storage.k8s.io_*.yaml "$SNAPSHOT_CRDS_DIR/"
  touch "$SNAPSHOT_CRDS_DIR/.done"
fi
export SNAPSHOT_CRDS_DIR

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
echo "--- pytest tests/cluster (Kubernetes $K8S_VERSION, Velero$VELERO_VERSIONS, cert-manager $CERT_MANAGER_VERSION)"
cd tests/cluster
exec ../../.venv/bin/python -m pytest "$@"
