#!/usr/bin/env bash
# Build the helm CLI pinned by e2e/helm/go.mod (a `tool` directive), for the chart tests.
#
#   e2e/scripts/build-helm.sh [e2e/helm]
#
# Output: ${TESSERA_CACHE:-$HOME/.cache/tessera}/helm/bin/helm
# Same conventions as build-k8s.sh: Go module and build caches under the cache
# (outside the clone), no DWARF, stripped, and a stamp keyed on go.mod, go.sum,
# the Go version and the flags, so a repeated call is a no-op.
#
# Environment: TESSERA_CACHE, TESSERA_GO_PARALLEL (default 2), GOMODCACHE/GOCACHE.
set -euo pipefail

die() { echo "build-helm: error: $*" >&2; exit 1; }
now() { date +%s; }

src=${1:-$(dirname "$0")/../helm}
command -v go >/dev/null || die "go is not on PATH (need Go >= the 'go' line of $src/go.mod)"
[[ -f $src/go.mod && -f $src/go.sum ]] || die "$src is not the helm tool module (go.mod, go.sum)"
src=$(cd "$src" && pwd)
cache=${TESSERA_CACHE:-$HOME/.cache/tessera}
out=$cache/helm/bin
parallel=${TESSERA_GO_PARALLEL:-2}

export GOMODCACHE=${GOMODCACHE:-$cache/go/mod}
export GOCACHE=${GOCACHE:-$cache/go/build}
export GOFLAGS="-mod=readonly -buildvcs=false"
export CGO_ENABLED=${CGO_ENABLED:-0}

helm_version=$(sed -n 's#^[[:space:]]*helm\.sh/helm/v3[[:space:]]\+\(v[^[:space:]]*\).*#\1#p' "$src/go.mod" | head -n1)
[[ -n $helm_version ]] || die "cannot read the helm.sh/helm/v3 version from $src/go.mod"
k8s_api=$(sed -n 's#^[[:space:]]*k8s\.io/client-go[[:space:]]\+v0\.\([0-9]\+\)\..*#\1#p' "$src/go.mod" | head -n1)
[[ -n $k8s_api ]] || die "cannot read the k8s.io/client-go version from $src/go.mod"
# What upstream's Makefile stamps in: `helm version` and the default
# .Capabilities.KubeVersion of `helm template` (1.20 without it).
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_api"
done
gcflags="all=-dwarf=false"
stamp_key=$( { cat "$src/go.mod" "$src/go.sum"; go version; echo "$gcflags $ldflags CGO_ENABLED=$CGO_ENABLED"; } | sha256sum | cut -d' ' -f1)
stamp=$out/.stamp

mkdir -p "$out"
exec 9>"$out/.lock"
if command -v flock >/dev/null; then
  flock -n 9 || { echo "build-helm: another build holds $out/.lock, waiting"; flock 9; }
fi

if [[ -x $out/helm && -f $stamp && $(cat "$stamp") == "$stamp_key" ]]; then
  echo "build-helm: helm $helm_version is up to date in $out"
  exit 0
fi

echo "build-helm: building helm $helm_version with $(go version | cut -d' ' -f3)"
echo "build-helm:   module cache $GOMODCACHE"
echo "build-helm:   build cache  $GOCACHE"
timings=$out/../build-timings.txt
t0=$(now)
echo "build-helm: [1/2] go mod download"
(cd "$src" && go mod download) || die "go mod download failed (is the Go module proxy reachable?)"
t1=$(now)
echo "build-helm: [1/2] go mod download done in $((t1 - t0))s"
echo "build-helm: [2/2] go build -p $parallel"
buildlog=$out/../build.log
if ! (cd "$src" && go build -p "$parallel" -v -trimpath -gcflags="$gcflags" -ldflags="$ldflags" -o "$out/helm.tmp" helm.sh/helm/v3/cmd/helm) 2>"$buildlog"; then
  tail -n 40 "$buildlog" >&2
  die "go build failed; full log in $buildlog"
fi
mv -f "$out/helm.tmp" "$out/helm"
echo "$stamp_key" > "$stamp"
t2=$(now)
echo "build-helm: [2/2] go build done in $((t2 - t1))s ($(du -h "$out/helm" | cut -f1), $(wc -l < "$buildlog") packages)"
printf '%s %s download=%ss build=%ss\n' "$(date -u +%FT%TZ)" "$helm_version" "$((t1 - t0))" "$((t2 - t1))" >> "$timings"
"$out/helm" version --short
