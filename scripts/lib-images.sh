# shellcheck shell=bash
# Container images written without a registry or a container engine (sourced, not run), for
# scripts/make-images.sh and e2e/scripts/make-node-images.sh.
#
# An image is a rootfs directory on this machine, written as a docker-archive tarball (what
# `ctr images import`, `docker load` and `skopeo copy docker-archive:...` take). The tarballs
# are byte-for-byte reproducible: fixed mtimes, owners and order, no timestamps in the config.
# Programs go in with the shared libraries they load, copied from this machine's Debian
# packages; image_write_provenance records which packages, and their versions, in the image.
#
# Needs GNU tar, sha256sum, readelf (binutils), ldd, and dpkg-query for the provenance.
# A caller may define die() before sourcing this file; a plain one is defined otherwise.
# IMAGE_ARCH (default amd64) is the architecture the image configs name.

declare -F die >/dev/null || die() { printf 'error: %s\n' "$*" >&2; exit 1; }

reproducible_tar() { tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix \
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime "$@"; }

# image_layer <rootfs> <layer.tar>: the rootfs as one layer (every file owned by 0:0).
image_layer() { reproducible_tar -C "$1" -cf "$2" .; }

# image_archive <work-dir> <out.tar> <ref> <config-json> <layer.tar>...
# Writes <out.tar> (through <out.tar>.tmp, then a rename) as a docker-archive image tagged <ref>
# whose layers are the given tarballs, lowest first. <config-json> is the image config's
# "config" object: {"Entrypoint":[...],"Env":[...],"User":"...","Labels":{...}}.
image_archive() {
  local work=$1 file=$2 name=$3 config=$4
  shift 4
  [[ $# -gt 0 ]] || die "image_archive: no layers for $name"
  local dir layer diff_id config_id diff_ids="" layer_paths="" members=()
  dir=$(mktemp -d "$work/archive.XXXXXX")
  for layer in "$@"; do
    diff_id=$(sha256sum "$layer" | cut -d' ' -f1)
    mkdir -p "$dir/$diff_id"
    ln -f "$layer" "$dir/$diff_id/layer.tar" 2>/dev/null || cp "$layer" "$dir/$diff_id/layer.tar"
    diff_ids+="${diff_ids:+,}\"sha256:$diff_id\""
    layer_paths+="${layer_paths:+,}\"$diff_id/layer.tar\""
    members+=("$diff_id/layer.tar")
  done
  printf '{"architecture":"%s","os":"linux","config":%s,"rootfs":{"type":"layers","diff_ids":[%s]}}' \
    "${IMAGE_ARCH:-amd64}" "$config" "$diff_ids" > "$dir/config.json"
  config_id=$(sha256sum "$dir/config.json" | cut -d' ' -f1)
  mv "$dir/config.json" "$dir/$config_id.json"
  printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":[%s]}]' \
    "$config_id" "$name" "$layer_paths" > "$dir/manifest.json"
  if ! reproducible_tar -C "$dir" -cf "$file.tmp" manifest.json "$config_id.json" "${members[@]}"; then
    rm -f "$file.tmp"
    die "could not write $file (tar failed; is this GNU tar, and is there room in $(dirname "$file")?)"
  fi
  mv -f "$file.tmp" "$file"
  rm -rf "$dir"
}

# image_json_str <string>: the string as a JSON string literal.
image_json_str() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
}

# image_check_static_busybox <path>: dies unless <path> is a statically linked busybox.
image_check_static_busybox() {
  local busybox=$1
  [[ -x $busybox ]] || die "$busybox is missing: run scripts/install-node-packages.sh (Debian's busybox-static)"
  if ldd "$busybox" >/dev/null 2>&1; then
    die "$busybox is dynamically linked; the images hold no libc (install busybox-static)"
  fi
}

# image_add_busybox <rootfs> <busybox> [<applet>...]: the (static) busybox at /bin/busybox,
# and /bin/<applet> links to it: the given applets, or every applet it has.
image_add_busybox() {
  local rootfs=$1 busybox=$2 applet
  shift 2
  image_add_host_file "$rootfs" "$busybox" /bin/busybox
  if [[ $# -eq 0 ]]; then
    for applet in $("$busybox" --list); do
      [[ $applet == busybox ]] || ln -sf busybox "$rootfs/bin/$applet"
    done
  else
    local have
    have=$("$busybox" --list) || die "$busybox --list failed"
    for applet in "$@"; do
      grep -qxF -- "$applet" <<<"$have" || die "$busybox has no applet $applet"
      ln -sf busybox "$rootfs/bin/$applet"
    done
  fi
}

# image_add_host_file <rootfs> <host-path> [<image-path>]: copies a file of this machine into
# the rootfs at <image-path> (default: the same path), symlinks resolved, so that the image
# holds the real file under the name asked for. Notes it in <rootfs>.host-files, which
# image_write_provenance reads. A path the rootfs already holds is left as it is.
image_add_host_file() {
  local rootfs=$1 src=$2 dest=${3:-$2} real
  real=$(readlink -f -- "$src") || die "$src is missing"
  [[ -f $real ]] || die "$src is missing (or not a regular file)"
  [[ -e $rootfs$dest || -L $rootfs$dest ]] && return 0
  mkdir -p "$(dirname "$rootfs$dest")"
  cp -- "$real" "$rootfs$dest"
  printf '%s\t%s\n' "$src" "$dest" >> "$rootfs.host-files"
}

# image_add_stripped <rootfs> <file> <image-path> <mode>: a copy of an ELF file without its
# debug info (objcopy --strip-debug); <file> itself is left untouched.
image_add_stripped() {
  local rootfs=$1 src=$2 dest=$3 mode=$4
  [[ -f $src ]] || die "$src is missing"
  command -v objcopy >/dev/null || die "objcopy is missing: install binutils"
  mkdir -p "$(dirname "$rootfs$dest")"
  objcopy --strip-debug -- "$src" "$rootfs$dest" \
    || die "objcopy --strip-debug $src failed (not an ELF file, or one of another architecture? rebuild it)"
  chmod "$mode" "$rootfs$dest"
}

# image_elf_deps <elf>: the shared objects <elf> loads, one path a line, as this machine's
# ldd resolves them, the dynamic loader included at its PT_INTERP path (the one the kernel
# opens, e.g. /lib64/ld-linux-x86-64.so.2). Nothing for a statically linked program.
image_elf_deps() {
  local elf=$1 headers interp out
  [[ -f $elf ]] || die "$elf is missing"
  command -v readelf >/dev/null || die "readelf is missing: install binutils"
  headers=$(LC_ALL=C readelf -lW -- "$elf" 2>&1) || die "readelf -l $elf failed (not an ELF file?): $headers"
  interp=$(sed -n 's/^.*\[Requesting program interpreter: \(.*\)\]$/\1/p' <<<"$headers")
  if ! grep -q '^ *DYNAMIC ' <<<"$headers"; then
    [[ -z $interp ]] || die "$elf names a loader ($interp) but has no dynamic section"
    return 0
  fi
  out=$(LC_ALL=C ldd -- "$elf" 2>&1) \
    || die "ldd $elf failed: $out (a program built for another architecture or libc cannot be inspected here)"
  if grep -q '=> not found' <<<"$out"; then
    die "ldd $elf: libraries missing on this machine: $(grep '=> not found' <<<"$out" | awk '{print $1}' | tr '\n' ' ')(install the Debian packages that ship them)"
  fi
  {
    [[ -z $interp ]] || printf '%s\n' "$interp"
    awk '$2 == "=>" && $3 ~ /^\// { print $3; next } $1 ~ /^\// { print $1 }' <<<"$out"
  } | awk '!seen[$0]++'
}

# image_add_elf_deps <rootfs> <elf>: the shared objects <elf> loads (image_elf_deps), each
# at the path ldd names.
image_add_elf_deps() {
  local rootfs=$1 elf=$2 deps dep
  deps=$(image_elf_deps "$elf")
  while IFS= read -r dep; do
    [[ -z $dep ]] || image_add_host_file "$rootfs" "$dep"
  done <<<"$deps"
}

# image_host_packages <host-path>: the Debian package(s) that ship the file, as dpkg names
# them (libc6:amd64), one a line; fails when none does. With or without merged /usr, a file
# is registered under one of its names only, so those are all tried.
image_host_packages() {
  local path=$1 candidate line
  local candidates=("$path")
  candidates+=("$(readlink -f -- "$path")")
  case $path in
    /usr/*) candidates+=("${path#/usr}") ;;
    *) candidates+=("/usr$path") ;;
  esac
  for candidate in "${candidates[@]}"; do
    line=$(LC_ALL=C dpkg-query -S "$candidate" 2>/dev/null | grep -v '^diversion' | head -n 1) || true
    if [[ -n $line ]]; then
      line=${line%%: /*}
      printf '%s\n' "${line//, /$'\n'}"
      return 0
    fi
  done
  return 1
}

# image_write_provenance <rootfs> <image-path>: writes, at <image-path> in the rootfs, which
# Debian packages (and versions) the files copied by image_add_host_file came from, one
# package a line: "<package>=<version> <image-path>...". Prints the packages on one line,
# "<package>=<version> ...", for an image label.
image_write_provenance() {
  local rootfs=$1 dest=$2 src path pkg version label=""
  command -v dpkg-query >/dev/null \
    || die "dpkg-query is missing: the images record the Debian packages their libraries come from; build them on Debian or Ubuntu"
  local -A files=()
  if [[ -f $rootfs.host-files ]]; then
    while IFS=$'\t' read -r src path; do
      local pkgs
      if ! pkgs=$(image_host_packages "$src"); then
        echo "warning: $src belongs to no Debian package; $dest lists it as unpackaged" >&2
        pkgs=unpackaged
      fi
      while IFS= read -r pkg; do
        files[$pkg]+=" $path"
      done <<<"$pkgs"
    done < "$rootfs.host-files"
  fi
  mkdir -p "$(dirname "$rootfs$dest")"
  {
    echo "# Debian packages whose files this image holds, as dpkg-query named them on the machine"
    echo "# that built it: \"<package>=<version> <path in the image>...\"."
    for pkg in $(printf '%s\n' "${!files[@]}" | LC_ALL=C sort); do
      if [[ $pkg == unpackaged ]]; then
        echo "unpackaged${files[$pkg]}"
        continue
      fi
      version=$(dpkg-query -W -f='${Version}' "$pkg") || die "dpkg-query -W $pkg failed"
      echo "$pkg=$version${files[$pkg]}"
      label+="${label:+ }$pkg=$version"
    done
  } > "$rootfs$dest"
  printf '%s\n' "$label"
}
