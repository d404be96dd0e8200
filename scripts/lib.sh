# Shared helpers for the project's scripts (sourced, not run).
TESSERA_CACHE="${TESSERA_CACHE:-$HOME/.cache/tessera}"
export TESSERA_CACHE
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$TESSERA_CACHE/target}"

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
