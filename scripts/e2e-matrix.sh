#!/usr/bin/env bash
# The release matrix: on every Kubernetes minor pinned under e2e/k8s/, oldest to newest, the
# simulated-cluster suite (e2e/harness/tests/sim_cluster.rs), the chart against the real API
# server (e2e/chart-tests/tests/apiserver.rs: dry run, admission policy, the code under the
# chart's RBAC) and, where the minor has one, the real-node scenarios (the upstream kubelet with
# containerd: e2e/harness/tests/real_node/scenarios.rs), and a Markdown table of the results for
# docs/reference/dra-features.md. `make test` (and CI) runs only the oldest and the newest; this is
# the opt-in rest: each minor is its own Go build of the control plane (~10 min cold on 2 cores,
# a no-op once built).
#
#   scripts/e2e-matrix.sh [1.32 1.34 ...]     # default: every pinned minor
#
# Exit status 0 when the suite passed on every minor asked for.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
export TESSERA_E2E=1
log_dir="$TESSERA_CACHE/logs/e2e-matrix"
mkdir -p "$log_dir"

if [[ $# -gt 0 ]]; then
    minors=("$@")
else
    mapfile -t minors < <(ls -d e2e/k8s/v1.* | sed 's#.*/v##' | sort -t. -k2 -n)
fi
for minor in "${minors[@]}"; do
    [[ -f e2e/k8s/v$minor/go.mod ]] || die "no pinned module e2e/k8s/v$minor (pin one with e2e/scripts/pin-k8s.sh)"
done

step "podman and runc for the simulated nodes"
scripts/install-podman.sh

step "helm, for the chart's tests (e2e/helm; a no-op once built)"
e2e/scripts/build-helm.sh > "$log_dir/helm-build.log" 2>&1 || { tail -n 30 "$log_dir/helm-build.log"; die "building helm failed"; }

step "runc, CNI plugins, busybox and containerd for the real-node scenarios"
scripts/install-node-packages.sh
e2e/scripts/build-containerd.sh > "$log_dir/containerd-build.log" 2>&1 || { tail -n 30 "$log_dir/containerd-build.log"; die "building containerd failed"; }

step "building every crate"
cargo build --workspace --all-targets

rows=()
failed=0
for minor in "${minors[@]}"; do
    step "v$minor: the control plane (log: $log_dir/build-v$minor.log)"
    began=$(date +%s)
    if ! e2e/scripts/build-k8s.sh "e2e/k8s/v$minor" > "$log_dir/build-v$minor.log" 2>&1; then
        tail -n 30 "$log_dir/build-v$minor.log"
        rows+=("| $minor | $(sed -n 's#^[[:space:]]*k8s\.io/kubernetes[[:space:]]\+\(v[^[:space:]]*\).*#\1#p' "e2e/k8s/v$minor/go.mod" | head -n1) | build failed | – | – | – | – |")
        failed=1
        continue
    fi
    built=$(( $(date +%s) - began ))
    suite="simulated_cluster_v${minor/./_}"
    step "v$minor: $suite (log: $log_dir/test-v$minor.log)"
    began=$(date +%s)
    if cargo test -p tessera-e2e-harness --test sim_cluster -- --include-ignored --exact "$suite" --nocapture \
        > "$log_dir/test-v$minor.log" 2>&1; then
        result=passed
    else
        result=FAILED
        failed=1
        grep -E "panicked|FAILED" "$log_dir/test-v$minor.log" | head -n 5 || true
    fi
    chart="chart_on_v${minor/./_}"
    step "v$minor: $chart (log: $log_dir/chart-v$minor.log)"
    if cargo test -p tessera-chart-tests --test apiserver -- --include-ignored --exact "$chart" --nocapture \
        > "$log_dir/chart-v$minor.log" 2>&1; then
        chart_result=passed
    else
        chart_result=FAILED
        failed=1
        grep -E "panicked|FAILED" "$log_dir/chart-v$minor.log" | head -n 5 || true
    fi
    # The real kubelet with containerd, where the minor has a scenario test (1.31, 1.36, 1.37).
    node="real_node_scenarios_v${minor/./_}"
    if grep -q "fn $node()" e2e/harness/tests/real_node/scenarios.rs; then
        step "v$minor: $node (log: $log_dir/real-node-v$minor.log)"
        if cargo test -p tessera-e2e-harness --test real_node -- --include-ignored --exact "scenarios::$node" --nocapture \
            > "$log_dir/real-node-v$minor.log" 2>&1; then
            node_result=passed
        else
            node_result=FAILED
            failed=1
            grep -E "panicked|FAILED" "$log_dir/real-node-v$minor.log" | head -n 5 || true
        fi
    else
        node_result="–"
    fi
    ran=$(( $(date +%s) - began ))
    release=$(sed -n 's#^[[:space:]]*k8s\.io/kubernetes[[:space:]]\+\(v[^[:space:]]*\).*#\1#p' "e2e/k8s/v$minor/go.mod" | head -n1)
    mode=$(sed -n 's#.*: sharing mode asked \(.*\), published \(.*\)$#`\1` → \2#p' "$log_dir/test-v$minor.log" | head -n1)
    rows+=("| $minor | $release | $result | $chart_result | $node_result | ${mode:-–} | build ${built} s, tests ${ran} s |")
done

printf '\nRelease matrix, %s, %s (%s cores)\n\n' "$(date -u +%Y-%m-%d)" "$(uname -n)" "$(nproc)"
printf '| minor | release | simulated-cluster suite | chart on the API server | real kubelet scenarios | sharing mode (asked → published) | time |\n'
printf '|---|---|---|---|---|---|---|\n'
printf '%s\n' "${rows[@]}"
exit "$failed"
