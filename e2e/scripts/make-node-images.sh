#!/usr/bin/env bash
# Container images for the e2e suite's real node, made without a registry or a container
# engine: a rootfs of Debian's static busybox, one layer, written as docker-archive tarballs
# that `ctr images import` takes.
#
#   e2e/scripts/make-node-images.sh <out-dir>
#
# Writes <out-dir>/pause.tar (localhost/tessera-pause:1, containerd's sandbox image) and
# <out-dir>/busybox.tar (localhost/tessera-busybox:1, what workloads run). Workload images
# hold busybox only: on a GPU node the shim and the (fake) driver arrive through CDI.
# The tarballs are byte-for-byte reproducible (fixed mtimes, owners and order).
#
# Environment: TESSERA_BUSYBOX (default /bin/busybox, which must be statically linked;
# scripts/install-node-packages.sh installs Debian's busybox-static).
set -euo pipefail

die() { echo "make-node-images: error: $*" >&2; exit 1; }
# reproducible_tar, image_layer, image_archive, image_add_busybox (shared with scripts/make-images.sh).
# shellcheck source=scripts/lib-images.sh
. "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib-images.sh"

[[ $# -eq 1 ]] || die "usage: $0 <out-dir>"
out=$1
busybox=${TESSERA_BUSYBOX:-/bin/busybox}
image_check_static_busybox "$busybox"

mkdir -p "$out"
work=$(mktemp -d "$out/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT

rootfs=$work/rootfs
mkdir -p "$rootfs"/{bin,etc,tmp,proc,sys,dev,root}
chmod 1777 "$rootfs/tmp"
image_add_busybox "$rootfs" "$busybox"
echo 'root:x:0:0:root:/root:/bin/sh' > "$rootfs/etc/passwd"
echo 'root:x:0:' > "$rootfs/etc/group"

layer=$work/layer.tar
image_layer "$rootfs" "$layer"

# The sandbox only has to hold the pod's namespaces open; containerd stops it with SIGKILL.
image_archive "$work" "$out/pause.tar" localhost/tessera-pause:1 \
  '{"Entrypoint":["/bin/sleep","2147483647"],"Env":["PATH=/bin"]}' "$layer"
image_archive "$work" "$out/busybox.tar" localhost/tessera-busybox:1 \
  '{"Cmd":["/bin/sh"],"Env":["PATH=/bin"]}' "$layer"
echo "make-node-images: wrote $out/pause.tar and $out/busybox.tar"
