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

# The k8s.io/kubernetes release a minor's module pins.
release_of() {
    sed -n 's#^[[:space:]]*k8s\.io/kubernetes[[:space:]]\+\(v[^[:space:]]*\).*#\1#p' "e2e/k8s/v$1/go.mod" | head -n1
}

# Runs one test (ignored ones included) with its output in a log; prints passed or FAILED
# (and, on failure, the panics to stderr).
run_test() {
    local label=$1 package=$2 target=$3 name=$4 log=$5
    step "$label: $name (log: $log)" >&2
    if cargo test -p "$package" --test "$target" -- --include-ignored --exact "$name" --nocapture > "$log" 2>&1; then
        echo passed
    else
        grep -E "panicked|FAILED" "$log" | head -n 5 >&2 || true
        echo FAILED
    fi
}

rows=()
failed=0
for minor in "${minors[@]}"; do
    step "v$minor: the control plane (log: $log_dir/build-v$minor.log)"
    began=$(date +%s)
    if ! e2e/scripts/build-k8s.sh "e2e/k8s/v$minor" > "$log_dir/build-v$minor.log" 2>&1; then
        tail -n 30 "$log_dir/build-v$minor.log"
        rows+=("| $minor | $(release_of "$minor") | build failed | – | – | – | – |")
        failed=1
        continue
    fi
    built=$(( $(date +%s) - began ))
    began=$(date +%s)
    result=$(run_test "v$minor" tessera-e2e-harness sim_cluster "simulated_cluster_v${minor/./_}" "$log_dir/test-v$minor.log")
    chart_result=$(run_test "v$minor" tessera-chart-tests apiserver "chart_on_v${minor/./_}" "$log_dir/chart-v$minor.log")
    # The real kubelet with containerd, where the minor has a scenario test (1.31, 1.36, 1.37).
    node="real_node_scenarios_v${minor/./_}"
    node_result="–"
    if grep -q "fn $node()" e2e/harness/tests/real_node/scenarios.rs; then
        node_result=$(run_test "v$minor" tessera-e2e-harness real_node "scenarios::$node" "$log_dir/real-node-v$minor.log")
    fi
    # Before 1.34 the suite asks fixed:10; what `auto` picks there is a test of its own (one per
    # API configuration: 1.33 also with resource.k8s.io/v1beta2 turned on).
    autos=()
    for name in $(sed -n "s/^async fn \(auto_sharing_mode_v${minor/./_}[a-z0-9_]*\)().*/\1/p" e2e/harness/tests/sim_cluster.rs); do
        outcome=$(run_test "v$minor" tessera-e2e-harness sim_cluster "$name" "$log_dir/$name.log")
        [[ $outcome == FAILED ]] && failed=1
        picked=$(sed -n 's#.*: sharing mode asked auto, published \(.*\)$#\1#p' "$log_dir/$name.log" | tail -n1)
        suffix=${name#auto_sharing_mode_v${minor/./_}}
        label="\`auto\`"
        [[ -n $suffix ]] && label="$label with ${suffix#_} on"
        autos+=("$label → ${picked:-?} ($outcome)")
    done
    [[ "$result $chart_result $node_result" == *FAILED* ]] && failed=1
    ran=$(( $(date +%s) - began ))
    release=$(release_of "$minor")
    mode=$(sed -n 's#.*: sharing mode asked \(.*\), published \(.*\)$#`\1` → \2#p' "$log_dir/test-v$minor.log" | head -n1)
    for auto in "${autos[@]}"; do
        mode="$mode; $auto"
    done
    rows+=("| $minor | $release | $result | $chart_result | $node_result | ${mode:-–} | build ${built} s, tests ${ran} s |")
done

printf '\nRelease matrix, %s, %s (%s cores)\n\n' "$(date -u +%Y-%m-%d)" "$(uname -n)" "$(nproc)"
printf '| minor | release | simulated-cluster suite | chart on the API server | real kubelet scenarios | sharing mode (asked → published) | time |\n'
printf '|---|---|---|---|---|---|---|\n'
printf '%s\n' "${rows[@]}"
exit "$failed"
