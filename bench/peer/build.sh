#!/usr/bin/env bash
# Builds the nearest peer — azure-workload-identity's proxy sidecar (azwi-proxy) and mutating
# webhook (azwi-webhook) — from the Go module proxy at the exact release bench/peer/go.mod
# requires, verified against the committed go.sum, the way its images are built (CGO off,
# version stamped, not stripped). Prints the directory holding the two binaries on its last line.
#
#   bench/peer/build.sh          # cold ~5 min on 2 cores (niced), warm (cached) < 1 s
#
# Output: target/peer/<version>/{azwi-proxy,azwi-webhook}, skipped when that directory holds
# binaries built from the same go.mod/go.sum/stand-in sources (a stamp file). Compiled packages
# stay in Go's default build cache, so a rebuild after `rm -rf target/peer` only links.
set -euo pipefail
cd "$(dirname "$0")"
command -v go >/dev/null || { echo "bench/peer/build.sh: go is required (Go 1.26)" >&2; exit 1; }

# Modules only through the module proxy, exactly as go.sum pins them.
export GOFLAGS="-mod=readonly" CGO_ENABLED=0
mod=github.com/Azure/azure-workload-identity
version=$(go list -m -f '{{.Version}}' "$mod")
out="$(cd ../.. && pwd)/target/peer/$version"
stamp=$(find . -type f \( -name '*.go' -o -name go.mod -o -name go.sum -o -name build.sh \) -print0 \
    | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
if [[ -f "$out/.stamp" && "$(cat "$out/.stamp")" == "$stamp" ]]; then
    echo "bench/peer: azwi $version cached in $out" >&2
else
    echo "bench/peer: building azwi-proxy and azwi-webhook $version" >&2
    start=$SECONDS
    rm -rf "$out" && mkdir -p "$out/tmp"
    # -trimpath: no local paths in the binaries; the version as the upstream Makefile stamps it.
    nice -n 10 go build -trimpath -ldflags "-X $mod/pkg/version.BuildVersion=$version" \
        -o "$out/tmp/" "$mod/cmd/proxy" "$mod/cmd/webhook"
    mv "$out/tmp/proxy" "$out/azwi-proxy"
    mv "$out/tmp/webhook" "$out/azwi-webhook"
    rmdir "$out/tmp"
    echo "$stamp" > "$out/.stamp"
    echo "bench/peer: built in $((SECONDS - start)) s" >&2
fi
echo "$out"
