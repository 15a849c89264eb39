#!/usr/bin/env bash
# Installs the system prerequisites of scripts/test on a fresh Debian/Ubuntu machine (run as
# root; scripts/test's setup stage calls it). Each item is installed only when missing, so a
# prepared machine spends ~1 s here:
#   - the Rust toolchain's rustfmt and clippy (rustup components);
#   - Debian packages: python3-venv (the Python SDKs and validators run in .venv), nodejs and npm,
#     ca-certificates, openssl, git, curl, iproute2 and util-linux (network-namespace tests);
#   - Node.js >= 20 (Azurite 3.35 and the Node SDKs need it; Debian 12 ships 18): when the
#     system's is older, the npm package `node@20` (it carries the official binary) is
#     installed under /opt/imds-broker/node20 and linked as /usr/local/bin/node.
# Go (the packaging stage builds helm and kustomize) and Rust themselves are not installed here:
# the README names them as what a machine needs first.
#
#   scripts/ensure-prereqs.sh
set -euo pipefail

NODE_MAJOR_MIN=20
NODE_PREFIX=/opt/imds-broker/node20

log() { echo "ensure-prereqs: $*"; }

# ---- rustup components -------------------------------------------------------------------
if command -v rustup >/dev/null; then
  for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
  done
else
  log "rustup not found: install Rust with rustup first (README, Development)"
  exit 1
fi

# ---- Debian packages ----------------------------------------------------------------------
need=()
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
[[ -s /etc/ssl/certs/ca-certificates.crt ]] || need+=(ca-certificates)
for tool in openssl:openssl git:git curl:curl ip:iproute2 unshare:util-linux; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
if ((${#need[@]})); then
  command -v apt-get >/dev/null || { log "missing ${need[*]} and no apt-get: install them by hand"; exit 1; }
  log "installing ${need[*]} with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# ---- Node.js >= 20 ---------------------------------------------------------------------------
node_major() { node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
if (($(node_major) < NODE_MAJOR_MIN)); then
  log "node $(node --version 2>/dev/null || echo none) is older than $NODE_MAJOR_MIN: installing node@$NODE_MAJOR_MIN from the npm registry"
  mkdir -p "$NODE_PREFIX"
  npm install --prefix "$NODE_PREFIX" --no-audit --no-fund --loglevel=error "node@$NODE_MAJOR_MIN"
  ln -sf "$NODE_PREFIX/node_modules/node/bin/node" /usr/local/bin/node
  hash -r
  (($(node_major) >= NODE_MAJOR_MIN)) || {
    log "node is still $(node --version) (is /usr/local/bin before /usr/bin in PATH?)"
    exit 1
  }
fi
log "ok (node $(node --version), $(python3 --version), $(rustc --version | cut -d' ' -f1-2))"
