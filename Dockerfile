#
# One image for every role of imds-broker:
#   imds-broker serve          the token broker (the injected native sidecar)
#   imds-broker webhook        the mutating admission webhook (deploy/, charts/imds-broker)
#   imds-broker init-network   routes 169.254.169.254 to the pod's loopback (transparent mode;
#                              that init container runs with NET_ADMIN and its own runAsUser)
#
#   docker build -t imds-broker:0.1.0 .
#   az acr build --registry "$ACR" --image imds-broker:0.1.0 .     # no local Docker needed
#   scripts/build-image                                            # no container engine at all
#
# Plain Dockerfile syntax only: it builds with the classic (non-BuildKit) builder too, which is
# what ACR Tasks and older engines use. No `# syntax=` directive, no `RUN --mount`, no
# `COPY --chmod/--link`, no heredocs (tests/packaging/test_dockerfile.py checks this). Without
# cache mounts, the dependency build is cached as its own layer instead (see below).

# Image metadata (OCI annotations). VERSION follows Cargo.toml (a test checks it); override
# SOURCE with your fork's URL: docker build --build-arg SOURCE=https://... .
ARG VERSION=0.1.0
ARG SOURCE=https://github.com/example/imds-broker

# ---- build: the shipped binary (scripts/build-release: release, glibc linked statically) ----
FROM rust:1-bookworm AS build
WORKDIR /src
# 1. Dependencies only, as a cached layer: the manifests, the lock file and empty crate roots.
#    This layer is rebuilt only when a Cargo.toml or Cargo.lock change. testkit/ (the test-support
#    workspace member) is never built here, but Cargo reads its manifest to resolve the workspace.
COPY Cargo.toml Cargo.lock ./
COPY testkit/Cargo.toml testkit/Cargo.toml
COPY scripts/build-release scripts/build-release
RUN mkdir -p src testkit/src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs testkit/src/lib.rs \
 && scripts/build-release > /dev/null \
 && rm -rf src testkit/src
# 2. The crate itself. The whole context (.dockerignore drops target/, .git, docs, manifests):
#    Cargo resolves every target the manifest declares, so tests/, examples/ and benches stay in.
#    `touch` makes Cargo rebuild the crate over the stub of step 1 whatever the copied mtimes.
COPY . .
RUN touch src/main.rs src/lib.rs \
 && dir=$(scripts/build-release | tail -n1) \
 && install -D -m 0755 "$dir/imds-broker" /out/imds-broker

# ---- runtime: distroless static (CA certificates, /etc/passwd with nonroot 65532,
# /etc/nsswitch.conf, no libc: the binary is statically linked), no shell, no package manager ----
FROM gcr.io/distroless/static-debian12:nonroot
ARG VERSION
ARG SOURCE
LABEL org.opencontainers.image.title="imds-broker" \
      org.opencontainers.image.description="Serves Entra workload-identity tokens on the IMDS and App Service managed-identity endpoints" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/imds-broker /imds-broker
USER 65532:65532
# 8400 token listener (loopback), 8401 admin (/healthz, /readyz, /metrics), 8443 webhook.
EXPOSE 8400 8401 8443
ENTRYPOINT ["/imds-broker"]
CMD ["--help"]
