#!/usr/bin/env bash
# Tessera's container images, built without a registry or a container engine (`make images`):
# each a rootfs of our binaries and the shared libraries they load, copied from this machine's
# Debian packages, written as one-layer docker-archive tarballs. The same layout as
# images/*.Dockerfile (same paths, user, entrypoint).
#
#   scripts/make-images.sh [--profile release|debug] [--out DIR] [--registry REG] [--tag TAG]
#                          [--load CONTAINERD_SOCKET]
#
#   --profile  release (default): `cargo build --release --locked` of the three programs and the
#              shipping libtessera.so from scripts/build-shim-release.sh (glibc 2.17).
#              debug: what `cargo build --workspace` (make build) left in $CARGO_TARGET_DIR/debug;
#              builds nothing.
#   --out      where the tarballs go (default $TESSERA_CACHE/images).
#   --registry image names are <registry>/<name>:<tag>, as the chart's image.registry and
#              image.tag make them (default localhost/tessera).
#   --tag      default: the chart's appVersion (charts/tessera/Chart.yaml).
#   --load     also `ctr images import` each tarball into the k8s.io namespace of the containerd
#              at that socket (ctr from $TESSERA_CONTAINERD_BIN_DIR, default
#              $TESSERA_CACHE/containerd/bin, which e2e/scripts/build-containerd.sh fills).
#
# Writes <out>/tessera-kubelet-plugin.tar, <out>/tessera-controller.tar and
# <out>/tessera-gpu-worker.tar, and prints one line for each: "<tarball> <image-ref>".
# Progress and errors go to stderr. Copies of the binaries lose their debug info (objcopy
# --strip-debug); the originals in the target directory are left as they are. Each image holds
# /usr/share/doc/tessera/base-packages, the Debian packages (and versions) its libraries came
# from, also in the label dev.tessera.image.base-packages.
#
# Environment: TESSERA_BUSYBOX (default /bin/busybox, statically linked: Debian's busybox-static,
# which scripts/install-node-packages.sh installs).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$root/scripts/lib.sh"
die() { printf 'make-images: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'make-images: %s\n' "$*" >&2; }
# shellcheck source=scripts/lib-images.sh
. "$root/scripts/lib-images.sh"
umask 022

usage() {
  awk '/^#   scripts\/make-images.sh/ { p = 1 } /^# Writes/ { exit } p { sub(/^# ?/, ""); print }' \
    "${BASH_SOURCE[0]}" >&2
  exit "${1:-2}"
}

profile=release
out=$TESSERA_CACHE/images
registry=localhost/tessera
tag=
load=
while [[ $# -gt 0 ]]; do
  case $1 in
    --profile|--out|--registry|--tag|--load)
      [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"
      opt=${1#--}; val=$2; shift 2 ;;
    --profile=*|--out=*|--registry=*|--tag=*|--load=*)
      opt=${1%%=*}; opt=${opt#--}; val=${1#*=}; shift
      [[ -n $val ]] || die "--$opt needs a value (see --help)" ;;
    -h|--help) usage 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  case $opt in
    profile) profile=$val ;;
    out) out=$val ;;
    registry) registry=${val%/} ;;
    tag) tag=$val ;;
    load) load=$val ;;
  esac
done
[[ $profile == release || $profile == debug ]] || die "--profile is release or debug, not '$profile'"
if [[ -z $tag ]]; then
  chart=$root/charts/tessera/Chart.yaml
  tag=$(sed -n 's/^appVersion:[[:space:]]*"\{0,1\}\([^"[:space:]]*\)"\{0,1\}[[:space:]]*$/\1/p' "$chart")
  [[ -n $tag ]] || die "no appVersion in $chart: pass --tag"
fi
[[ $out == /* ]] || out=$PWD/$out

# The tools, before anything is built.
tar --version 2>/dev/null | grep -q 'GNU tar' || die "GNU tar is missing (the tarballs use its --sort and --pax-option): apt-get install tar"
for tool in objcopy readelf; do
  command -v "$tool" >/dev/null || die "$tool is missing: apt-get install binutils"
done
command -v ldd >/dev/null || die "ldd is missing: apt-get install libc-bin"
command -v dpkg-query >/dev/null \
  || die "dpkg-query is missing: the images record the Debian packages their libraries come from, so build them on Debian or Ubuntu"
busybox=${TESSERA_BUSYBOX:-/bin/busybox}
image_check_static_busybox "$busybox"
case $(uname -m) in
  x86_64) export IMAGE_ARCH=amd64 ;;
  aarch64) export IMAGE_ARCH=arm64 ;;
  *) die "no image architecture for $(uname -m)" ;;
esac
if [[ -n $load ]]; then
  ctr=${TESSERA_CONTAINERD_BIN_DIR:-$TESSERA_CACHE/containerd/bin}/ctr
  [[ -x $ctr ]] || die "$ctr is missing: run e2e/scripts/build-containerd.sh (or set TESSERA_CONTAINERD_BIN_DIR)"
  if [[ $load != *://* && ! -S $load ]]; then
    die "--load $load: no socket there (is containerd running? its [grpc] address is the socket)"
  fi
fi

mkdir -p "$out"
work=$(mktemp -d "$out/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The programs.
if [[ $profile == release ]]; then
  say "building the release binaries (cargo build --release --locked)"
  cargo build --release --locked --manifest-path "$root/Cargo.toml" \
    -p tessera-kubelet-plugin --bin tessera-kubelet-plugin \
    -p tessera-node-tools --bin tessera-gpu-probe \
    -p tessera-controller --bin tessera-controller \
    -p tessera-gpu-worker --bin tessera-gpu-worker >&2 \
    || die "cargo build --release failed (see above)"
  bindir=$CARGO_TARGET_DIR/release
  say "building the shipping libtessera.so (scripts/build-shim-release.sh)"
  "$root/scripts/build-shim-release.sh" | tee "$work/shim.log" >&2 \
    || die "scripts/build-shim-release.sh failed (see above)"
  shim=$(tail -n 1 "$work/shim.log")
  [[ -f $shim ]] || die "scripts/build-shim-release.sh named no library on its last line ('$shim')"
  hook=$(tail -n 2 "$work/shim.log" | head -n 1)
  [[ -f $hook ]] || die "scripts/build-shim-release.sh named no hook on its line before last ('$hook')"
else
  bindir=$CARGO_TARGET_DIR/debug
  shim=$bindir/libtessera.so
  hook=$bindir/tessera-cdi-hook
fi
for f in "$bindir/tessera-kubelet-plugin" "$bindir/tessera-gpu-probe" "$bindir/tessera-controller" "$bindir/tessera-gpu-worker" "$shim" "$hook"; do
  [[ -f $f ]] && continue
  if [[ $profile == debug ]]; then
    die "$f is missing: --profile debug takes the binaries \`cargo build --workspace\` (make build) left in $bindir; run that first, or use --profile release"
  fi
  die "$f is missing after the release build"
done

# glibc's libraries beyond what our programs link: the plugin dlopens the host's NVML, and the
# shim (built for glibc 2.17) and the driver libraries that reach a workload through CDI name
# these, while the images hold no ld.so.cache and nothing else to find them by.
add_glibc() {
  local rootfs=$1 elf=$2 libc libdir name
  libc=$(image_elf_deps "$elf" | grep '/libc\.so\.6$' | head -n 1) \
    || die "$elf does not load libc.so.6 (ldd); a glibc program was expected"
  libdir=$(dirname "$libc")
  for name in libc.so.6 libm.so.6 libdl.so.2 libpthread.so.0 librt.so.1 libutil.so.1 libgcc_s.so.1; do
    [[ -e $libdir/$name ]] || die "$libdir/$name is missing: apt-get install libc6 libgcc-s1"
    image_add_host_file "$rootfs" "$libdir/$name"
    image_add_elf_deps "$rootfs" "$libdir/$name"
  done
  # The dynamic loader under its soname in the library directory too (programs find it through
  # /lib64): a dlmopen into a new namespace loads libc's dependencies by soname from there.
  for name in ld-linux-x86-64.so.2 ld-linux-aarch64.so.1; do
    [[ -e $libdir/$name ]] && image_add_host_file "$rootfs" "$libdir/$name"
  done
  return 0
}

source_url=https://github.com/tessera-gpu/tessera
# config <title> <provenance-label> <json-fields>: the image config's "config" object.
config() {
  printf '{%s,"WorkingDir":"/","Labels":{"org.opencontainers.image.title":%s,"org.opencontainers.image.source":%s,"org.opencontainers.image.licenses":"Apache-2.0","dev.tessera.image.base-packages":%s}}' \
    "$3" "$(image_json_str "$1")" "$(image_json_str "$source_url")" "$(image_json_str "$2")"
}

# finish <name> <rootfs> <json-fields>: the provenance file, the layer, <out>/<name>.tar.
finish() {
  local name=$1 rootfs=$2 fields=$3 label
  label=$(image_write_provenance "$rootfs" /usr/share/doc/tessera/base-packages)
  image_layer "$rootfs" "$work/$name.layer.tar"
  image_archive "$work" "$out/$name.tar" "$registry/$name:$tag" "$(config "$name" "$label" "$fields")" \
    "$work/$name.layer.tar"
  rm -f "$work/$name.layer.tar"
  written+=("$out/$name.tar $registry/$name:$tag")
}
written=()

# tessera-kubelet-plugin: root, with /bin/sh (busybox) for the chart's start script.
say "tessera-kubelet-plugin ($profile)"
r=$work/kubelet-plugin
mkdir -p "$r"/{bin,etc,root,tmp}
chmod 1777 "$r/tmp"
image_add_stripped "$r" "$bindir/tessera-kubelet-plugin" /usr/bin/tessera-kubelet-plugin 0755
image_add_stripped "$r" "$bindir/tessera-gpu-probe" /usr/bin/tessera-gpu-probe 0755
# Installed by the plugin on the host and run there by the runtime: built for the host's glibc
# (2.17 and later) in the release profile, its own libraries left to the host.
image_add_stripped "$r" "$hook" /usr/bin/tessera-cdi-hook 0755
image_add_stripped "$r" "$shim" /usr/lib/tessera/libtessera.so 0755
image_add_elf_deps "$r" "$bindir/tessera-kubelet-plugin"
image_add_elf_deps "$r" "$bindir/tessera-gpu-probe"
image_add_elf_deps "$r" "$shim"
add_glibc "$r" "$bindir/tessera-kubelet-plugin"
image_add_busybox "$r" "$busybox" sh ash '[' test echo cat ls env sleep true false
echo 'root:x:0:0:root:/root:/bin/sh' > "$r/etc/passwd"
echo 'root:x:0:' > "$r/etc/group"
finish tessera-kubelet-plugin "$r" \
  '"Env":["PATH=/usr/bin:/bin"],"Entrypoint":["/usr/bin/tessera-kubelet-plugin"]'

# tessera-controller: no shell, user 65532 (the chart's runAsUser).
say "tessera-controller ($profile)"
r=$work/controller
mkdir -p "$r"/{etc,tmp}
chmod 1777 "$r/tmp"
image_add_stripped "$r" "$bindir/tessera-controller" /usr/bin/tessera-controller 0755
image_add_elf_deps "$r" "$bindir/tessera-controller"
printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' 'nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin' \
  > "$r/etc/passwd"
printf '%s\n' 'root:x:0:' 'nonroot:x:65532:' > "$r/etc/group"
finish tessera-controller "$r" \
  '"User":"65532:65532","Env":["PATH=/usr/bin"],"Entrypoint":["/usr/bin/tessera-controller"]'

# tessera-gpu-worker: the e2e and demo workload. The shim and the (fake) driver arrive through
# CDI and load into it, so it holds glibc's libraries too, and a /tmp (CUDA programs expect
# one; the fake driver keeps its state there); nothing else.
say "tessera-gpu-worker ($profile)"
r=$work/gpu-worker
mkdir -p "$r/tmp"
chmod 1777 "$r/tmp"
image_add_stripped "$r" "$bindir/tessera-gpu-worker" /usr/bin/tessera-gpu-worker 0755
image_add_elf_deps "$r" "$bindir/tessera-gpu-worker"
image_add_elf_deps "$r" "$shim"
add_glibc "$r" "$bindir/tessera-gpu-worker"
finish tessera-gpu-worker "$r" \
  '"Env":["PATH=/usr/bin"],"Entrypoint":["/usr/bin/tessera-gpu-worker"]'

if [[ -n $load ]]; then
  for line in "${written[@]}"; do
    tarball=${line%% *}
    say "importing $tarball into $load (namespace k8s.io)"
    "$ctr" --address "$load" --namespace k8s.io images import "$tarball" >&2 \
      || die "ctr images import $tarball failed (see above); is $load containerd's socket?"
  done
fi
printf '%s\n' "${written[@]}"
