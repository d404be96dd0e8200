# syntax=docker/dockerfile:1.7
# tessera-kubelet-plugin, with the shipping libtessera.so it installs onto each node.
#
#   docker build -f images/kubelet-plugin.Dockerfile -t ghcr.io/tessera-gpu/tessera-kubelet-plugin:0.1.0 .
#
# from the repository root (not built in CI). The same layout as `make images`
# (scripts/make-images.sh builds this image with no container engine): the same paths, user
# (root) and entrypoint, /bin/sh for the chart's start script. The shim is built by
# scripts/build-shim-release.sh against glibc 2.17 (zig + cargo-zigbuild), so it loads into old
# CUDA images; it lands at /usr/lib/tessera/libtessera.so, the plugin's --shim-path default. At
# start the plugin copies it to <state-dir>/lib/libtessera.so on the host (/var/lib/tessera,
# mounted by the chart at the same path), the path every claim's CDI spec mounts into
# containers. x86_64 only: the shim's target is x86_64-unknown-linux-gnu.2.17.

ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
# python3-venv: zig comes from PyPI (ziglang); binutils: objdump/nm for check-shim-glibc.sh.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv binutils \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ENV TESSERA_CACHE=/cache CARGO_TARGET_DIR=/cache/target
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/cache \
    set -eux; \
    cargo build --release --locked -p tessera-kubelet-plugin --bin tessera-kubelet-plugin \
      -p tessera-node-tools --bin tessera-gpu-probe; \
    scripts/build-shim-release.sh > /tmp/release.log; \
    shim="$(tail -n 1 /tmp/release.log)"; \
    hook="$(tail -n 2 /tmp/release.log | head -n 1)"; \
    mkdir -p /out; \
    cp "$CARGO_TARGET_DIR/release/tessera-kubelet-plugin" "$CARGO_TARGET_DIR/release/tessera-gpu-probe" /out/; \
    cp "$shim" /out/libtessera.so; \
    cp "$hook" /out/tessera-cdi-hook

# glibc (bookworm: 2.36) for the plugin, which dlopens the host's libnvidia-ml.so.1, and /bin/sh
# for the chart's start script that finds that library under the driver root.
FROM ${RUNTIME_IMAGE}
COPY --from=build /out/tessera-kubelet-plugin /usr/bin/tessera-kubelet-plugin
# What a CUDA context costs on each GPU, measured by the plugin at start (--context-overhead).
COPY --from=build /out/tessera-gpu-probe /usr/bin/tessera-gpu-probe
COPY --from=build /out/libtessera.so /usr/lib/tessera/libtessera.so
# The driver-wall hook the plugin installs on the host (glibc 2.17, like the shim).
COPY --from=build /out/tessera-cdi-hook /usr/bin/tessera-cdi-hook
LABEL org.opencontainers.image.title="tessera-kubelet-plugin" \
      org.opencontainers.image.source="https://github.com/tessera-gpu/tessera" \
      org.opencontainers.image.licenses="Apache-2.0"
# Runs as root, privileged (NVML, host paths): see charts/tessera/templates/kubelet-plugin.yaml.
ENTRYPOINT ["/usr/bin/tessera-kubelet-plugin"]
