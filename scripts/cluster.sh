#!/usr/bin/env bash
# `make cluster-up` / `make cluster-down` / `make demo`: a simulated Tessera cluster on this machine.
#
#   scripts/cluster.sh up     # control plane + simulated GPU nodes (e2e/nodes/*.json) + tessera-controller
#                             # + a real node (upstream kubelet and containerd)
#   scripts/cluster.sh down   # stops everything `up` started, containers included
#   scripts/cluster.sh demo   # up, the two-workers scenario on the real node, down
#
# K8S_VERSION=1.31 selects the oldest supported release (default: the newest pinned one).
# Whatever the machine lacks is installed or built first: podman and runc, the upstream
# Kubernetes binaries and helm (from their Go modules, cached), and Tessera's own programs.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

command="${1:-}"
case "$command" in
    up | down | demo | status) ;;
    *) die "usage: scripts/cluster.sh {up|down|status|demo}  (K8S_VERSION=1.37|1.31)" ;;
esac
version="${K8S_VERSION:-1.37}"
case "$version" in
    1.37 | v1.37) module=e2e/k8s/v1.37 ;;
    1.31 | v1.31) module=e2e/k8s/v1.31 ;;
    *) die "K8S_VERSION=$version is not pinned; use 1.37 or 1.31" ;;
esac
cluster="$CARGO_TARGET_DIR/debug/tessera-cluster"

if [ "$command" != down ] && [ "$command" != status ]; then
    log_dir="$TESSERA_CACHE/logs"
    mkdir -p "$log_dir"
    step "podman and runc (containers of the simulated nodes)"
    scripts/install-podman.sh
    if [ "$command" = up ] || [ "$command" = demo ]; then
        step "runc, CNI plugins and busybox-static (the real node)"
        scripts/install-node-packages.sh
    fi
    step "the upstream control plane $version, helm and containerd (built once, then cached; logs: $log_dir/k8s-build-$version.log, $log_dir/helm-build.log, $log_dir/containerd-build.log)"
    # On a cold machine the control plane's Go build is the long pole (≈15 min on 2 cores):
    # everything else builds beside it at a lower priority, so that it gets the CPU first and
    # the rest fills the gaps (docs/benchmarks.md, "make demo cold").
    e2e/scripts/build-k8s.sh "$module" > "$log_dir/k8s-build-$version.log" 2>&1 &
    k8s_build=$!
    nice -n 10 e2e/scripts/build-helm.sh > "$log_dir/helm-build.log" 2>&1 &
    helm_build=$!
    containerd_build=
    if [ "$command" = up ] || [ "$command" = demo ]; then
        nice -n 10 e2e/scripts/build-containerd.sh > "$log_dir/containerd-build.log" 2>&1 &
        containerd_build=$!
    fi
    trap 'kill "$k8s_build" "$helm_build" $containerd_build 2>/dev/null || true' EXIT
    step "Tessera's programs"
    nice -n 10 cargo build -p tessera-e2e-harness -p tessera-kubelet-plugin -p tessera-kubelet-standin \
        -p tessera-controller -p tessera-gpu-worker -p tessera-shim -p tessera-fake-cuda -p tessera-fake-nvml
    step "waiting for the Go builds"
    if ! wait "$k8s_build"; then
        tail -n 40 "$log_dir/k8s-build-$version.log"
        die "building the control plane failed (full log: $log_dir/k8s-build-$version.log)"
    fi
    if ! wait "$helm_build"; then
        tail -n 40 "$log_dir/helm-build.log"
        die "building helm failed (full log: $log_dir/helm-build.log)"
    fi
    if [ -n "$containerd_build" ] && ! wait "$containerd_build"; then
        tail -n 40 "$log_dir/containerd-build.log"
        die "building containerd failed (full log: $log_dir/containerd-build.log)"
    fi
    trap - EXIT
fi
[ -x "$cluster" ] || die "$cluster is not built: run 'make cluster-up' first"

if [ "$command" = demo ]; then
    # The harness's own progress lines would bury the demo's output; failures still print.
    RUST_LOG="${RUST_LOG:-warn,kube_client::client::builder=off}" exec "$cluster" demo --k8s-version "$version" --nodes e2e/nodes
fi
exec "$cluster" "$command" --k8s-version "$version" --nodes e2e/nodes
