#!/usr/bin/env bash
# promtool, from Debian's prometheus package, for the tests that check what /metrics serves
# (`promtool check metrics`) and, later, the chart's alert rules. Only the promtool binary is
# unpacked into the cache: the package's server and its service are never installed or started.
#
#   e2e/scripts/install-promtool.sh
#
# Output: ${TESSERA_CACHE:-$HOME/.cache/tessera}/tools/prometheus/promtool
set -euo pipefail

die() { echo "install-promtool: error: $*" >&2; exit 1; }

cache=${TESSERA_CACHE:-$HOME/.cache/tessera}
out=$cache/tools/prometheus
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9
if [ -x "$out/promtool" ] && "$out/promtool" --version >/dev/null 2>&1; then
    echo "promtool is installed: $("$out/promtool" --version 2>&1 | head -n 1)"
    exit 0
fi
command -v apt-get >/dev/null || die "apt-get is missing (promtool comes from Debian's prometheus package)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# apt-get download needs no root, but drops privileges to _apt when it can: a directory _apt
# may write keeps its warning away.
chmod 0777 "$work"
(cd "$work" && apt-get download -q prometheus >/dev/null 2>&1) \
    || { apt-get update -qq >/dev/null 2>&1 && (cd "$work" && apt-get download -q prometheus >/dev/null); } \
    || die "apt-get download prometheus failed"
dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
install -m 0755 "$work/root/usr/bin/promtool" "$out/promtool.tmp"
mv "$out/promtool.tmp" "$out/promtool"
echo "installed: $("$out/promtool" --version 2>&1 | head -n 1)"
