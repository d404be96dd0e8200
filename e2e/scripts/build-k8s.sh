#!/usr/bin/env bash
# Build the upstream control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler) and the kubelet of the real node, pinned by one module under
# e2e/k8s/, as a single multi-call binary plus one symlink per component.
#
#   e2e/scripts/build-k8s.sh e2e/k8s/v1.37
#
# Output: ${TESSERA_CACHE:-$HOME/.cache/tessera}/k8s/<version-dir-name>/bin/
# The Go module and build caches live under the same cache (outside the clone)
# so a CI machine that keeps $HOME keeps them. A stamp keyed on go.mod, go.sum,
# main.go, the Go version and the flags makes a repeated call a no-op.
#
# Environment: TESSERA_CACHE, TESSERA_GO_PARALLEL (default 2: CI has 2 cores
# and the Rust build may run beside us), GOMODCACHE/GOCACHE to override the
# cache locations.
set -euo pipefail

die() { echo "build-k8s: error: $*" >&2; exit 1; }
now() { date +%s; }

[[ $# -eq 1 ]] || die "usage: $0 <version-dir, e.g. e2e/k8s/v1.37>"
command -v go >/dev/null || die "go is not on PATH (need Go >= the 'go' line of the module)"
[[ -f $1/go.mod && -f $1/go.sum && -f $1/main.go ]] || die "$1 is not a pinned version module (go.mod, go.sum, main.go)"

src=$(cd "$1" && pwd)
template=$(cd "$(dirname "$0")/../k8s/multicall" && pwd)/main.go
if [[ -f $template ]] && ! cmp -s "$template" "$src/main.go"; then
  echo "build-k8s: warning: $src/main.go differs from $template; re-run pin-k8s.sh to bring it in line" >&2
fi
version=$(basename "$src")
cache=${TESSERA_CACHE:-$HOME/.cache/tessera}
out=$cache/k8s/$version/bin
parallel=${TESSERA_GO_PARALLEL:-2}

export GOMODCACHE=${GOMODCACHE:-$cache/go/mod}
export GOCACHE=${GOCACHE:-$cache/go/build}
# VCS stamping would look at the Tessera checkout, which says nothing about
# the upstream code and fails on checkouts git does not trust.
export GOFLAGS="-mod=readonly -buildvcs=false"
export CGO_ENABLED=${CGO_ENABLED:-0}

k8s_version=$(sed -n 's#^[[:space:]]*k8s\.io/kubernetes[[:space:]]\+\(v[^[:space:]]*\).*#\1#p' "$src/go.mod" | head -n1)
[[ $k8s_version =~ ^v([0-9]+)\.([0-9]+)\. ]] || die "cannot read the k8s.io/kubernetes version from $src/go.mod"
# Upstream's build stamps the version in with -X (hack/lib/version.sh); without
# it every component reports v0.0.0-master, /version says so to clients, and
# `kube-apiserver --version` cannot tell which release a binary is.
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=${BASH_REMATCH[1]} -X $pkg.gitMinor=${BASH_REMATCH[2]}"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
# -w drops DWARF at link time anyway; not generating it while compiling saves
# ~5-15% of the CPU time of a cold build and a good part of the build cache.
gcflags="all=-dwarf=false"
stamp_key=$( { cat "$src/go.mod" "$src/go.sum" "$src/main.go"; go version; echo "$gcflags $ldflags CGO_ENABLED=$CGO_ENABLED"; } | sha256sum | cut -d' ' -f1)
stamp=$out/.stamp

mkdir -p "$out"
# Two test runs (or a developer and a test) may ask for the same build at once.
exec 9>"$out/.lock"
if command -v flock >/dev/null; then
  flock -n 9 || { echo "build-k8s: $version: another build holds $out/.lock, waiting"; flock 9; }
fi

if [[ -x $out/tessera-k8s && -f $stamp && $(cat "$stamp") == "$stamp_key" ]]; then
  echo "build-k8s: $version ($k8s_version) is up to date in $out"
  exit 0
fi

echo "build-k8s: $version: building k8s.io/kubernetes $k8s_version with $(go version | cut -d' ' -f3)"
echo "build-k8s:   module cache $GOMODCACHE"
echo "build-k8s:   build cache  $GOCACHE"
echo "build-k8s:   output       $out"
timings=$out/../build-timings.txt

t0=$(now)
echo "build-k8s: [1/2] go mod download"
(cd "$src" && go mod download) || die "go mod download failed (is the Go module proxy reachable?)"
t1=$(now)
echo "build-k8s: [1/2] go mod download done in $((t1 - t0))s"

echo "build-k8s: [2/2] go build -p $parallel (a cold build takes many minutes on 2 cores; progress every 30s)"
buildlog=$out/../build.log
: > "$buildlog"
(
  # go build -v names each package as it is compiled; counting them is the
  # only progress signal go gives.
  # 1 s steps: a pending `sleep 30` would outlive the script and hold its stdout open.
  for ((i = 1; ; i++)); do
    sleep 1
    ((i % 30 == 0)) && echo "build-k8s:   ... $(( $(now) - t1 ))s, $(wc -l < "$buildlog") packages compiled"
  done
) &
ticker=$!
trap 'kill $ticker 2>/dev/null || true' EXIT
if ! (cd "$src" && go build -p "$parallel" -v -trimpath -gcflags="$gcflags" -ldflags="$ldflags" -o "$out/tessera-k8s.tmp" .) 2>"$buildlog"; then
  kill $ticker 2>/dev/null || true
  tail -n 40 "$buildlog" >&2
  die "go build failed; full log in $buildlog"
fi
kill $ticker 2>/dev/null || true
mv -f "$out/tessera-k8s.tmp" "$out/tessera-k8s"
for c in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet; do
  ln -sfn tessera-k8s "$out/$c"
done
echo "$stamp_key" > "$stamp"
echo "$k8s_version" > "$out/.k8s-version"
t2=$(now)
echo "build-k8s: [2/2] go build done in $((t2 - t1))s ($(du -h "$out/tessera-k8s" | cut -f1))"
printf '%s %s download=%ss build=%ss\n' "$(date -u +%FT%TZ)" "$k8s_version" "$((t1 - t0))" "$((t2 - t1))" >> "$timings"
echo "build-k8s: $version ready: $out"
