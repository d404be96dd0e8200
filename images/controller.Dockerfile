# syntax=docker/dockerfile:1.7
# tessera-controller: DeviceClasses, cluster metrics, leader election.
#
#   docker build -f images/controller.Dockerfile -t ghcr.io/tessera-gpu/tessera-controller:0.1.0 .
#
# from the repository root (not built in CI). The same layout as `make images`
# (scripts/make-images.sh builds this image with no container engine): the same path, user
# (65532:65532), entrypoint, and no shell.

ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
ENV CARGO_TARGET_DIR=/cache/target
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/cache \
    set -eux; \
    cargo build --release --locked -p tessera-controller --bin tessera-controller; \
    mkdir -p /out; \
    cp "$CARGO_TARGET_DIR/release/tessera-controller" /out/

# glibc and libgcc_s, nothing else; user 65532 (the chart's runAsUser).
FROM ${RUNTIME_IMAGE}
COPY --from=build /out/tessera-controller /usr/bin/tessera-controller
LABEL org.opencontainers.image.title="tessera-controller" \
      org.opencontainers.image.source="https://github.com/tessera-gpu/tessera" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 65532:65532
ENTRYPOINT ["/usr/bin/tessera-controller"]
