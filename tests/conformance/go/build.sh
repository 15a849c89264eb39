#!/usr/bin/env bash
# Builds the real Go azidentity clients of the conformance suite, one binary per azidentity
# version Velero pins (the modules next to this script), into $OUT (default
# target/go-clients/azidentity-vX.Y.Z/go-client).
#
# Modules come through the Go module proxy, checked against each module's committed go.sum
# (GOFLAGS=-mod=readonly: a go.mod/go.sum that does not match fails the build instead of being
# rewritten). Go's own build and module caches (default locations) make a warm run ~1 s.
#
#   tests/conformance/go/build.sh          build all four
#
# The client source main.go is one file, copied into every module (each module stays a plain
# `go build`-able directory, no symlinks for checkouts to mangle); this script refuses to build
# when a copy differs from the one in azidentity-v1.13.1, so they cannot drift.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
out="${OUT:-${CARGO_TARGET_DIR:-$root/target}/go-clients}"

command -v go >/dev/null || { echo "go (>= 1.22) is required to build the Go clients"; exit 1; }

canonical="$here/azidentity-v1.13.1/main.go"
for dir in "$here"/azidentity-v*/; do
  if ! cmp -s "$canonical" "$dir/main.go"; then
    echo "$dir/main.go differs from $canonical; copy it: the clients must share one source"
    exit 1
  fi
done

export GOFLAGS=-mod=readonly
for dir in "$here"/azidentity-v*/; do
  name="$(basename "$dir")"
  mkdir -p "$out/$name"
  (cd "$dir" && go build -trimpath -o "$out/$name/go-client" .)
  echo "built $out/$name/go-client"
done
