# syntax=docker/dockerfile:1
#
# One image for every role of imds-broker:
#   imds-broker serve          the token broker (the injected native sidecar)
#   imds-broker webhook        the mutating admission webhook (deploy/)
#   imds-broker init-network   routes 169.254.169.254 to the pod's loopback (transparent mode;
#                              that init container runs with NET_ADMIN and its own runAsUser)
#
#   docker build -t imds-broker:dev .
#   az acr build --registry <acr> --image imds-broker:0.1.0 .     # no local Docker needed

# ---- build: the shipped binary (scripts/build-release: release, glibc linked statically),
# dependencies cached across builds (BuildKit cache mounts) ----
FROM rust:1-bookworm AS build
WORKDIR /src
# The whole context (.dockerignore drops target/, .git, docs, manifests): Cargo resolves every
# target the manifest declares, so tests/, examples/ and benches stay in.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    dir=$(scripts/build-release | tail -n1) \
 && install -D -m 0755 "$dir/imds-broker" /out/imds-broker

# ---- runtime: distroless static (CA certificates, /etc/nsswitch.conf, no libc: the binary is
# statically linked), no shell, no package manager, non-root by default ----
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/imds-broker /imds-broker
USER 65532:65532
# 8400 token listener (loopback), 8401 admin (/healthz, /readyz, /metrics), 8443 webhook.
EXPOSE 8400 8401 8443
ENTRYPOINT ["/imds-broker"]
CMD ["--help"]
