#!/usr/bin/env bash
# Packages charts/tessera with the pinned helm (built if missing): lints it strictly, then
# writes tessera-<version>.tgz into $TESSERA_CACHE/charts (or the directory given) and prints
# its path. Push it as an OCI artifact with:
#   helm push <tgz> oci://<registry>/<repository>
# and install from there with:
#   helm install tessera oci://<registry>/<repository>/tessera --version <version> -n tessera-system --create-namespace
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
out=${1:-$TESSERA_CACHE/charts}
helm=$TESSERA_CACHE/helm/bin/helm
if [[ ! -x $helm ]]; then
    step "building helm (e2e/helm)" >&2
    e2e/scripts/build-helm.sh >&2
fi
mkdir -p "$out"
export HELM_CACHE_HOME=$TESSERA_CACHE/helm/home HELM_CONFIG_HOME=$TESSERA_CACHE/helm/home HELM_DATA_HOME=$TESSERA_CACHE/helm/home
"$helm" lint --strict charts/tessera >&2
"$helm" package charts/tessera --destination "$out" >&2
version=$(sed -n 's/^version: *//p' charts/tessera/Chart.yaml)
echo "$out/tessera-$version.tgz"
