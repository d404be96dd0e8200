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

[[ $# -eq 1 ]] || die "usage: $0 <out-dir>"
out=$1
busybox=${TESSERA_BUSYBOX:-/bin/busybox}
[[ -x $busybox ]] || die "$busybox is missing: run scripts/install-node-packages.sh (Debian's busybox-static)"
if ldd "$busybox" >/dev/null 2>&1; then
  die "$busybox is dynamically linked; the images hold no libc (install busybox-static)"
fi

mkdir -p "$out"
work=$(mktemp -d "$out/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT

rootfs=$work/rootfs
mkdir -p "$rootfs"/{bin,etc,tmp,proc,sys,dev,root}
chmod 1777 "$rootfs/tmp"
cp "$busybox" "$rootfs/bin/busybox"
for applet in $("$busybox" --list); do
  [[ $applet == busybox ]] || ln -sf busybox "$rootfs/bin/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' > "$rootfs/etc/passwd"
echo 'root:x:0:' > "$rootfs/etc/group"

reproducible_tar() { tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix \
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime "$@"; }

layer=$work/layer.tar
reproducible_tar -C "$rootfs" -cf "$layer" .
diff_id=$(sha256sum "$layer" | cut -d' ' -f1)

# image <file> <name> <config-json-fragment>
image() {
  local file=$1 name=$2 config=$3 dir=$work/$1.d
  mkdir -p "$dir/$diff_id"
  ln "$layer" "$dir/$diff_id/layer.tar"
  printf '{"architecture":"amd64","os":"linux","config":%s,"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$config" "$diff_id" > "$dir/config.json"
  local config_id
  config_id=$(sha256sum "$dir/config.json" | cut -d' ' -f1)
  mv "$dir/config.json" "$dir/$config_id.json"
  printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["%s/layer.tar"]}]' \
    "$config_id" "$name" "$diff_id" > "$dir/manifest.json"
  reproducible_tar -C "$dir" -cf "$out/$file.tmp" manifest.json "$config_id.json" "$diff_id/layer.tar"
  mv -f "$out/$file.tmp" "$out/$file"
}

# The sandbox only has to hold the pod's namespaces open; containerd stops it with SIGKILL.
image pause.tar localhost/tessera-pause:1 \
  '{"Entrypoint":["/bin/sleep","2147483647"],"Env":["PATH=/bin"]}'
image busybox.tar localhost/tessera-busybox:1 \
  '{"Cmd":["/bin/sh"],"Env":["PATH=/bin"]}'
echo "make-node-images: wrote $out/pause.tar and $out/busybox.tar"
