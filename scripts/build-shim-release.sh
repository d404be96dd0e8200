#!/usr/bin/env bash
# Builds the shipping libtessera.so against glibc 2.17 with cargo-zigbuild, so it loads into
# CUDA images as old as CentOS 7 / UBI 8 (glibc 2.28) — a library built on this machine's glibc
# 2.36 would ask for GLIBC_2.34 and fail to load there. The same for tessera-cdi-hook, which the
# plugin installs on the host and the container runtime runs there, under the host's glibc.
# zig comes from PyPI, cargo-zigbuild from crates.io; both are cached outside the clone.
# Prints the hook's path, then the shim's on the last line.
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
step "building tessera-cdi-hook for glibc 2.17"
cargo zigbuild --quiet --release -p tessera-node-tools --bin tessera-cdi-hook \
    --target x86_64-unknown-linux-gnu.2.17
hook="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/tessera-cdi-hook"
[ -f "$hook" ] || die "zigbuild produced no $hook"
scripts/check-shim-glibc.sh "$hook" 2.28 program
echo "$hook"
echo "$out"
