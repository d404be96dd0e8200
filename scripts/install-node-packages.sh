#!/usr/bin/env bash
# Installs, from Debian's packages, what the e2e suite's real node needs beside the binaries it
# builds (kubelet, containerd): runc for containerd's shim, the CNI plugins (only
# `bridge`, `host-local` and `loopback` are used, inside containerd's own network namespace), and
# busybox-static, the only program of the images e2e/scripts/make-node-images.sh builds.
# Needs root (apt-get); does nothing when everything is present.
set -euo pipefail

missing=()
command -v runc >/dev/null 2>&1 || missing+=(runc)
[ -x /usr/lib/cni/loopback ] || missing+=(containernetworking-plugins)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx sh && ! ldd /bin/busybox >/dev/null 2>&1 \
    || missing+=(busybox-static)
if [ "${#missing[@]}" -eq 0 ]; then
    echo "real-node packages are installed: $(runc --version | head -n 1), CNI plugins in /usr/lib/cni, static busybox"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "error: ${missing[*]} missing and not root; run: sudo $0" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "installed: ${missing[*]}"
