#!/usr/bin/env bash
# Builds the shipping libtessera.so against glibc 2.17 with cargo-zigbuild, so it loads into
# CUDA images as old as CentOS 7 / UBI 8 (glibc 2.28) — a library built on this machine's glibc
# 2.36 would ask for GLIBC_2.34 and fail to load there. zig comes from PyPI, cargo-zigbuild
# from crates.io; both are cached outside the clone.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

tools="$TESSERA_CACHE/tools"
venv="$tools/zig-venv"
find_zig() { find "$venv" -path '*ziglang/zig' -type f 2>/dev/null | head -n 1; }
if [ -z "$(find_zig)" ]; then
    step "installing zig (PyPI ziglang) into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet 'ziglang==0.17.1'
fi
# ziglang ships zig inside the package; expose it as `zig` on PATH.
zig_bin="$(find_zig)"
[ -n "$zig_bin" ] || die "ziglang installed no zig binary under $venv"
mkdir -p "$tools/bin"
ln -sf "$zig_bin" "$tools/bin/zig"
if [ ! -x "$tools/bin/cargo-zigbuild" ]; then
    step "installing cargo-zigbuild into $tools"
    cargo install --quiet --locked --root "$tools" cargo-zigbuild
fi
export PATH="$tools/bin:$PATH"

step "building libtessera.so for glibc 2.17"
cargo zigbuild --quiet --release -p tessera-shim --target x86_64-unknown-linux-gnu.2.17
out="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/libtessera.so"
[ -f "$out" ] || die "zigbuild produced no $out"
scripts/check-shim-glibc.sh "$out" 2.28
echo "$out"
