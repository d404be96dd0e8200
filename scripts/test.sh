#!/usr/bin/env bash
# The whole test suite: `make test` and CI run this. Installs or builds what a fresh machine
# lacks (podman and runc, the upstream Kubernetes binaries and kubelet, containerd, helm, an OCI
# registry, the standard gRPC clients, promtool, zig for the shipping shim), and
# runs every test with TESSERA_E2E=1, so a missing prerequisite is a failure, never a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
export TESSERA_E2E=1
log_dir="$TESSERA_CACHE/logs"
mkdir -p "$log_dir"

# The Go builds of the control plane are the long pole on a cold machine (~21 min on 2 cores)
# and keep only ~1.5 cores busy: start them first and let cargo fill the gaps.
step "building the upstream control plane (v1.37, v1.31) in the background; log: $log_dir/k8s-build.log"
( e2e/scripts/build-k8s.sh e2e/k8s/v1.37 && e2e/scripts/build-k8s.sh e2e/k8s/v1.31 ) > "$log_dir/k8s-build.log" 2>&1 &
k8s_build=$!
# helm for the chart tests (e2e/chart-tests): ~5 min cold on 2 cores, a no-op when built.
step "building helm (e2e/helm) in the background; log: $log_dir/helm-build.log"
e2e/scripts/build-helm.sh > "$log_dir/helm-build.log" 2>&1 &
helm_build=$!
# CNCF distribution's registry, for the chart's OCI push test: ~1 min cold on 2 cores.
step "building the OCI registry (e2e/oci-registry) in the background; log: $log_dir/oci-registry-build.log"
e2e/scripts/build-oci-registry.sh > "$log_dir/oci-registry-build.log" 2>&1 &
oci_registry_build=$!
# grpcurl (grpc-go) and grpcio (grpc C-core), the standard clients the plugin's sockets are
# tested with: ~1.5 min cold.
step "building the standard gRPC clients in the background; log: $log_dir/grpc-clients-build.log"
e2e/scripts/build-grpc-clients.sh > "$log_dir/grpc-clients-build.log" 2>&1 &
grpc_clients_build=$!
# containerd, ctr and its runc shim for the real node (e2e/harness/tests/real_node.rs): ~3 min cold.
step "building containerd for the real-node tests in the background; log: $log_dir/containerd-build.log"
e2e/scripts/build-containerd.sh > "$log_dir/containerd-build.log" 2>&1 &
containerd_build=$!
trap 'kill "$k8s_build" "$helm_build" "$oci_registry_build" "$grpc_clients_build" "$containerd_build" 2>/dev/null || true' EXIT

step "podman and runc for the container tests"
scripts/install-podman.sh

step "runc, CNI plugins and busybox-static for the real-node tests"
scripts/install-node-packages.sh

step "promtool from Debian's prometheus package, for the tests of what /metrics serves"
e2e/scripts/install-promtool.sh

step "building every crate (the shim's tests load the cdylibs)"
cargo build --workspace --all-targets

step "the shipping shim: glibc 2.17 build and its exported symbols"
release_shim="$(scripts/build-shim-release.sh | tail -n 1)"

step "waiting for the control plane build"
if ! wait "$k8s_build"; then
    tail -n 60 "$log_dir/k8s-build.log"
    die "building the control plane failed (full log: $log_dir/k8s-build.log)"
fi
step "waiting for the helm build"
if ! wait "$helm_build"; then
    tail -n 60 "$log_dir/helm-build.log"
    die "building helm failed (full log: $log_dir/helm-build.log)"
fi
step "waiting for the OCI registry build"
if ! wait "$oci_registry_build"; then
    tail -n 30 "$log_dir/oci-registry-build.log"
    die "building the OCI registry failed (full log: $log_dir/oci-registry-build.log)"
fi
step "waiting for the standard gRPC clients"
if ! wait "$grpc_clients_build"; then
    tail -n 30 "$log_dir/grpc-clients-build.log"
    die "building the standard gRPC clients failed (full log: $log_dir/grpc-clients-build.log)"
fi
step "waiting for the containerd build"
if ! wait "$containerd_build"; then
    tail -n 60 "$log_dir/containerd-build.log"
    die "building containerd failed (full log: $log_dir/containerd-build.log)"
fi
trap - EXIT

step "unit, integration and end-to-end tests"
cargo test --workspace --no-fail-fast

step "the memory-wall tests again, against the shipping shim"
TESSERA_SHIM="$release_shim" cargo test -p tessera-shim --test ways_to_the_driver --test processes --test allocation_kinds
