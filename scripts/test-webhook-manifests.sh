#!/usr/bin/env bash
# Validates the webhook's Kubernetes objects: every kustomization in deploy/ and the pods the
# webhook mutates (written by the golden test), against the Kubernetes 1.29+ JSON schemas of
# the kubernetes-validate PyPI package. Creates/reuses a virtualenv in .venv.
#
#   scripts/test-webhook-manifests.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PACKAGES=(kubernetes-validate==1.37.0 PyYAML==6.0.4)

if ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import kubernetes_validate, yaml' 2>/dev/null \
   || [[ "$("$VENV/bin/python" -c 'import kubernetes_validate.version as v; print(v.__version__)')" != "1.37.0" ]]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PACKAGES[@]}"
fi

# Fresh mutated pods (target/webhook-mutated/*.json): the golden test writes them.
rm -rf "${CARGO_TARGET_DIR:-target}/webhook-mutated"
cargo test --quiet --locked --test e2e webhook_golden::

"$VENV/bin/python" tests/validate_k8s.py
