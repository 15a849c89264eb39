#!/usr/bin/env bash
# The operator's path, tested with the real tools: the Dockerfile (dockerfile-parse), the image
# scripts/build-image assembles without a container engine (umoci, skopeo; run in a chroot as
# UID 65532), the Helm chart (helm lint/template, strict Kubernetes schemas, equal to the
# kustomize overlays), the alert rules (promtool check/test rules) and the monitoring objects.
#
#   scripts/test-packaging.sh            (root: chroot, image file ownership, apt-get)
#   scripts/test-packaging.sh -k chart   extra arguments go to pytest
#
# Installs what it needs: Debian's umoci, skopeo, prometheus (for promtool), openssl; the pinned
# Python packages into .venv; helm and kustomize built with `go build` from
# tests/packaging/tools (versions and checksums in its go.mod/go.sum, from the Go module proxy)
# into target/packaging-tools/<hash of go.mod+go.sum>/, so they are built once per pin.
# Cold: the Go tools build took 12 min on 2 busy cores (load ~15; less on an idle machine), plus
# the release binary when no earlier stage built it (the bench stage does, in scripts/test);
# warm (tools, binary cached): ~25 s, of which the tests ~17 s.
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- Debian packages (only the missing ones) ----------------------------------------------
need=()
for tool in umoci:umoci skopeo:skopeo promtool:prometheus openssl:openssl readelf:binutils; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
[[ -s /etc/ssl/certs/ca-certificates.crt ]] || need+=(ca-certificates)
if ((${#need[@]})); then
  echo "--- apt-get install ${need[*]}"
  apt-get update -qq
  # --no-install-recommends: the prometheus package recommends node exporters and web assets
  # that promtool does not need.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# ---- Python: the same pins as scripts/test-webhook-manifests.sh, plus the parser and pytest --
VENV=.venv
PACKAGES=(kubernetes-validate==1.37.0 PyYAML==6.0.4 dockerfile-parse==2.0.1 pytest==9.2.0)
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
if ! "$VENV/bin/python" - "${PACKAGES[@]}" <<'EOF' 2>/dev/null; then
import sys
from importlib.metadata import version
sys.exit(any(version(n) != v for n, v in (p.split("==") for p in sys.argv[1:])))
EOF
  echo "--- pip install ${PACKAGES[*]}"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PACKAGES[@]}"
fi

# ---- helm, kustomize, monitoringcheck from their Go modules (cached per pin) ---------------
TOOLS=$(scripts/build-packaging-tools | tail -n1)
"$TOOLS/helm" version --short
"$TOOLS/kustomize" version

# ---- the shipped binary and the image ------------------------------------------------------
echo "--- scripts/build-release, scripts/build-image"
BINARY="$(nice -n 10 scripts/build-release | tail -n1)/imds-broker"
IMAGE_DIR=$(BINARY="$BINARY" OUT="${CARGO_TARGET_DIR:-target}/image" scripts/build-image | tail -n1)
ls -l "$IMAGE_DIR"/*.tar

# ---- alert rules ---------------------------------------------------------------------------
echo "--- promtool check rules / test rules"
promtool check rules deploy/monitoring/imds-broker.rules.yml
promtool test rules tests/packaging/alerts_test.yml

# ---- the tests -----------------------------------------------------------------------------
echo "--- pytest tests/packaging"
IMDS_BROKER_PKG_HELM=$(realpath "$TOOLS/helm")
IMDS_BROKER_PKG_KUSTOMIZE=$(realpath "$TOOLS/kustomize")
IMDS_BROKER_PKG_BINARY=$(realpath "$BINARY")
IMDS_BROKER_PKG_IMAGE_DIR=$(realpath "$IMAGE_DIR")
IMDS_BROKER_PKG_MONITORINGCHECK=$(realpath "$TOOLS/monitoringcheck")
export IMDS_BROKER_PKG_HELM IMDS_BROKER_PKG_KUSTOMIZE IMDS_BROKER_PKG_MONITORINGCHECK IMDS_BROKER_PKG_BINARY IMDS_BROKER_PKG_IMAGE_DIR
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/packaging "$@"
