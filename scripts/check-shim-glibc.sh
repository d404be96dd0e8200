#!/usr/bin/env bash
# Fails if LIBRARY needs a glibc symbol version newer than MAX (e.g. 2.28), or exports anything
# but the driver, NVML and dlsym entry points it is meant to. A third argument `program` checks
# an executable: the glibc version only.
set -euo pipefail
lib="$1"
max="${2:-2.28}"
newest="$(objdump -T "$lib" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n 1)"
echo "$lib: newest glibc symbol version required: $newest (limit $max)"
if [ "$(printf '%s\n%s\n' "$newest" "$max" | sort -V | tail -n 1)" != "$max" ]; then
    echo "error: $lib needs GLIBC_$newest, newer than $max" >&2
    exit 1
fi
if [ "${3:-}" = program ]; then
    exit 0
fi
stray="$(nm -D --defined-only "$lib" | awk '{print $3}' | grep -vE '^(cu|nvml)[A-Za-z0-9_]+$|^dlsym$' || true)"
if [ -n "$stray" ]; then
    echo "error: $lib exports symbols beyond its hooks:" >&2
    echo "$stray" >&2
    exit 1
fi
echo "$lib: exports only its hooks"
