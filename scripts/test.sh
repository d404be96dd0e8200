#!/usr/bin/env bash
# The whole test suite: `make test` and CI run this. Installs what a fresh machine lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

step "building every crate (the shim's tests load the cdylibs)"
cargo build --workspace --all-targets

step "unit and integration tests"
cargo test --workspace --no-fail-fast

step "the shipping shim: glibc 2.17 build, exported symbols, and the memory-wall tests against it"
release_shim="$(scripts/build-shim-release.sh | tail -n 1)"
TESSERA_SHIM="$release_shim" cargo test -p tessera-shim --test ways_to_the_driver --test processes
