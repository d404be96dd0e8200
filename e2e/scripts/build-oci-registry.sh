#!/usr/bin/env bash
# Build the OCI registry (CNCF distribution's `registry`) pinned by e2e/oci-registry/go.mod (a
# `tool` directive), for the chart test that pushes the packaged chart as an OCI artifact and
# installs it from there, on loopback.
#
#   e2e/scripts/build-oci-registry.sh [e2e/oci-registry]
#
# Output: ${TESSERA_CACHE:-$HOME/.cache/tessera}/oci-registry/bin/registry
# Same conventions as build-helm.sh: Go caches under the cache (outside the clone), no DWARF,
# stripped, and a stamp keyed on go.mod, go.sum, the Go version and the flags, so a repeated
# call is a no-op.
#
# Environment: TESSERA_CACHE, TESSERA_GO_PARALLEL (default 2), GOMODCACHE/GOCACHE.
set -euo pipefail

die() { echo "build-oci-registry: error: $*" >&2; exit 1; }
now() { date +%s; }

src=${1:-$(dirname "$0")/../oci-registry}
command -v go >/dev/null || die "go is not on PATH (need Go >= the 'go' line of $src/go.mod)"
[[ -f $src/go.mod && -f $src/go.sum ]] || die "$src is not the registry tool module (go.mod, go.sum)"
src=$(cd "$src" && pwd)
cache=${TESSERA_CACHE:-$HOME/.cache/tessera}
out=$cache/oci-registry/bin
parallel=${TESSERA_GO_PARALLEL:-2}

export GOMODCACHE=${GOMODCACHE:-$cache/go/mod}
export GOCACHE=${GOCACHE:-$cache/go/build}
export GOFLAGS="-mod=readonly -buildvcs=false"
export CGO_ENABLED=${CGO_ENABLED:-0}

version=$(sed -n 's#^[[:space:]]*github\.com/distribution/distribution/v3[[:space:]]\+\(v[^[:space:]]*\).*#\1#p' "$src/go.mod" | head -n1)
[[ -n $version ]] || die "cannot read the distribution version from $src/go.mod"
gcflags="all=-dwarf=false"
ldflags="-s -w"
stamp_key=$( { cat "$src/go.mod" "$src/go.sum"; go version; echo "$gcflags $ldflags CGO_ENABLED=$CGO_ENABLED"; } | sha256sum | cut -d' ' -f1)
stamp=$out/.stamp

mkdir -p "$out"
exec 9>"$out/.lock"
if command -v flock >/dev/null; then
  flock -n 9 || { echo "build-oci-registry: another build holds $out/.lock, waiting"; flock 9; }
fi

if [[ -x $out/registry && -f $stamp && $(cat "$stamp") == "$stamp_key" ]]; then
  echo "build-oci-registry: registry $version is up to date in $out"
  exit 0
fi

echo "build-oci-registry: building registry $version with $(go version | cut -d' ' -f3)"
t0=$(now)
(cd "$src" && go mod download) || die "go mod download failed (is the Go module proxy reachable?)"
t1=$(now)
buildlog=$out/../build.log
if ! (cd "$src" && go build -p "$parallel" -v -trimpath -gcflags="$gcflags" -ldflags="$ldflags" -o "$out/registry.tmp" github.com/distribution/distribution/v3/cmd/registry) 2>"$buildlog"; then
  tail -n 40 "$buildlog" >&2
  die "go build failed; full log in $buildlog"
fi
mv -f "$out/registry.tmp" "$out/registry"
echo "$stamp_key" > "$stamp"
t2=$(now)
echo "build-oci-registry: done: download $((t1 - t0))s, build $((t2 - t1))s ($(du -h "$out/registry" | cut -f1), $(wc -l < "$buildlog") packages)"
printf '%s %s download=%ss build=%ss\n' "$(date -u +%FT%TZ)" "$version" "$((t1 - t0))" "$((t2 - t1))" >> "$out/../build-timings.txt"
