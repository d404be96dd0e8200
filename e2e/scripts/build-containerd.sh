#!/usr/bin/env bash
# Build containerd 2 (the daemon, ctr and the runc shim) for the e2e suite's real node,
# from the Go module proxy at a pinned release.
#
#   e2e/scripts/build-containerd.sh
#
# Output: ${TESSERA_CACHE:-$HOME/.cache/tessera}/containerd/bin/{containerd,ctr,containerd-shim-runc-v2}
# Same conventions as build-k8s.sh: Go module and build caches under the cache (outside the
# clone), static (no cgo), stripped, and a stamp keyed on the version, the Go version and the
# flags, so a repeated call is a no-op. runc and the CNI plugins come from Debian
# (scripts/install-node-packages.sh).
#
# Environment: TESSERA_CACHE, TESSERA_GO_PARALLEL (default 2), GOMODCACHE/GOCACHE,
# TESSERA_CONTAINERD_VERSION to try another release.
set -euo pipefail

die() { echo "build-containerd: error: $*" >&2; exit 1; }
now() { date +%s; }

command -v go >/dev/null || die "go is not on PATH"
version=${TESSERA_CONTAINERD_VERSION:-v2.4.2}
cache=${TESSERA_CACHE:-$HOME/.cache/tessera}
out=$cache/containerd/bin
parallel=${TESSERA_GO_PARALLEL:-2}
module=github.com/containerd/containerd/v2

export GOMODCACHE=${GOMODCACHE:-$cache/go/mod}
export GOCACHE=${GOCACHE:-$cache/go/build}
export GOFLAGS="-buildvcs=false"
# Static binaries: the daemon and shim then do not depend on the host's libc or libseccomp.
export CGO_ENABLED=0

# The snapshotters the node does not use would need cgo or kernel headers; urfave_cli_no_docs
# drops the man-page generator. The shim talks ttrpc only (no_grpc), as upstream builds it.
daemon_tags="no_btrfs no_devmapper no_zfs urfave_cli_no_docs"
shim_tags="no_grpc urfave_cli_no_docs"
ldflags="-s -w -X $module/version.Version=$version"
gcflags="all=-dwarf=false"
stamp_key=$( { echo "$version"; go version; echo "$daemon_tags|$shim_tags|$gcflags|$ldflags"; } | sha256sum | cut -d' ' -f1)
stamp=$out/.stamp

mkdir -p "$out"
exec 9>"$out/.lock"
if command -v flock >/dev/null; then
  flock -n 9 || { echo "build-containerd: another build holds $out/.lock, waiting"; flock 9; }
fi

if [[ -x $out/containerd && -x $out/ctr && -x $out/containerd-shim-runc-v2 && -f $stamp && $(cat "$stamp") == "$stamp_key" ]]; then
  echo "build-containerd: containerd $version is up to date in $out"
  exit 0
fi

echo "build-containerd: building containerd $version with $(go version | cut -d' ' -f3)"
echo "build-containerd:   module cache $GOMODCACHE"
echo "build-containerd:   build cache  $GOCACHE"
timings=$out/../build-timings.txt
buildlog=$out/../build.log
staging=$out/.staging
rm -rf "$staging"
mkdir -p "$staging"
t0=$(now)
echo "build-containerd: [1/2] containerd, ctr (go install -p $parallel; a cold build takes a few minutes on 2 cores)"
if ! GOBIN=$staging go install -p "$parallel" -v -trimpath -tags "$daemon_tags" -gcflags="$gcflags" -ldflags "$ldflags" \
    "$module/cmd/containerd@$version" "$module/cmd/ctr@$version" 2>"$buildlog"; then
  tail -n 40 "$buildlog" >&2
  die "go install of containerd and ctr failed; full log in $buildlog"
fi
t1=$(now)
echo "build-containerd: [2/2] containerd-shim-runc-v2"
if ! GOBIN=$staging go install -p "$parallel" -v -trimpath -tags "$shim_tags" -gcflags="$gcflags" -ldflags "$ldflags" \
    "$module/cmd/containerd-shim-runc-v2@$version" 2>>"$buildlog"; then
  tail -n 40 "$buildlog" >&2
  die "go install of containerd-shim-runc-v2 failed; full log in $buildlog"
fi
t2=$(now)
for b in containerd ctr containerd-shim-runc-v2; do
  mv -f "$staging/$b" "$out/$b"
done
rm -rf "$staging"
echo "$stamp_key" > "$stamp"
echo "$version" > "$out/.version"
printf '%s %s containerd+ctr=%ss shim=%ss\n' "$(date -u +%FT%TZ)" "$version" "$((t1 - t0))" "$((t2 - t1))" >> "$timings"
echo "build-containerd: done in $((t2 - t0))s: $("$out/containerd" --version)"
