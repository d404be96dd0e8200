#!/usr/bin/env bash
# Installs podman and runc from Debian's packages when they are missing, for the kubelet
# plugin's container test (kubelet-plugin/tests/container.rs), which runs a real container from
# the CDI spec the plugin writes. Needs root (apt-get); does nothing when both are present.
set -euo pipefail

missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v runc >/dev/null 2>&1 || missing+=(runc)
if [ "${#missing[@]}" -eq 0 ]; then
    echo "podman and runc are installed: $(podman --version), $(runc --version | head -n 1)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "error: ${missing[*]} missing and not root; run: sudo $0" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# fuse-overlayfs is not needed: the test runs as root with the kernel's overlayfs.
apt-get update -qq
apt-get install -y -qq --no-install-recommends podman runc >/dev/null
echo "installed: $(podman --version), $(runc --version | head -n 1)"
