#!/usr/bin/env bash
# The standard gRPC clients the plugin's socket tests call it with
# (kubelet-plugin/tests/standard_clients.rs):
# - grpc-go-call, one unary call through grpc-go, pinned by e2e/grpc-clients/go.mod at the
#   grpc-go release the v1.37 kubelet is built with; it dials a bare socket path exactly as the
#   kubelet's plugin watcher does (no authority override);
# - grpc C-core through Python's grpcio (pinned below), in a virtual environment.
#
#   e2e/scripts/build-grpc-clients.sh
#
# Output: ${TESSERA_CACHE:-$HOME/.cache/tessera}/grpc-clients/{bin/grpc-go-call,venv/}
# Same conventions as build-helm.sh: caches outside the clone, a stamp per client.
set -euo pipefail

die() { echo "build-grpc-clients: error: $*" >&2; exit 1; }

GRPCIO_VERSION=1.85.4
src=$(cd "$(dirname "$0")/../grpc-clients" && pwd)
cache=${TESSERA_CACHE:-$HOME/.cache/tessera}
out=$cache/grpc-clients
parallel=${TESSERA_GO_PARALLEL:-2}
mkdir -p "$out/bin"
exec 9>"$out/.lock"
flock 9

export GOMODCACHE=${GOMODCACHE:-$cache/go/mod}
export GOCACHE=${GOCACHE:-$cache/go/build}
export GOFLAGS="-mod=readonly -buildvcs=false"
export CGO_ENABLED=0
command -v go >/dev/null || die "go is not on PATH"
go_key=$( { cat "$src/go.mod" "$src/go.sum" "$src/grpc-go-call/main.go"; go version; } | sha256sum | cut -d' ' -f1)
if [[ -x $out/bin/grpc-go-call && $(cat "$out/bin/.stamp" 2>/dev/null) == "$go_key" ]]; then
  echo "build-grpc-clients: grpc-go-call is up to date"
else
  echo "build-grpc-clients: building grpc-go-call"
  (cd "$src" && go build -p "$parallel" -trimpath -ldflags="-s -w" -gcflags="all=-dwarf=false" \
    -o "$out/bin/grpc-go-call.tmp" ./grpc-go-call) \
    || die "go build of grpc-go-call failed (is the Go module proxy reachable?)"
  mv -f "$out/bin/grpc-go-call.tmp" "$out/bin/grpc-go-call"
  echo "$go_key" > "$out/bin/.stamp"
fi

command -v python3 >/dev/null || die "python3 is not on PATH"
py_key=$( { echo "grpcio==$GRPCIO_VERSION"; python3 --version; } | sha256sum | cut -d' ' -f1)
if [[ -x $out/venv/bin/python && $(cat "$out/venv/.stamp" 2>/dev/null) == "$py_key" ]]; then
  echo "build-grpc-clients: grpcio is up to date"
else
  echo "build-grpc-clients: installing grpcio $GRPCIO_VERSION"
  rm -rf "$out/venv"
  python3 -m venv "$out/venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  "$out/venv/bin/pip" install --quiet --disable-pip-version-check "grpcio==$GRPCIO_VERSION" \
    || die "pip install grpcio==$GRPCIO_VERSION failed (is PyPI reachable?)"
  echo "$py_key" > "$out/venv/.stamp"
fi
echo "build-grpc-clients: ready in $out"
