# Tessera's entry points. The quick start in README.md uses exactly two: `make demo`, `make test`.
# Build outputs live outside the clone so a warm machine rebuilds little.
TESSERA_CACHE ?= $(HOME)/.cache/tessera
export TESSERA_CACHE
export CARGO_TARGET_DIR ?= $(TESSERA_CACHE)/target

.PHONY: test demo cluster-up cluster-down build shim-release check-shim-glibc images chart bench bench-instructions bench-priority e2e-matrix

## The whole test suite (what CI runs).
test:
	scripts/test.sh

## The local demo on the embedded control plane.
demo:
	scripts/demo.sh

## A simulated cluster that stays up (K8S_VERSION=1.31 for the oldest release); last line: export KUBECONFIG=...
cluster-up:
	scripts/cluster.sh up

## Stops everything cluster-up started.
cluster-down:
	scripts/cluster.sh down

## Debug build of every crate, the cdylibs included (the shim's tests load them).
build:
	cargo build --workspace --all-targets

## libtessera.so for shipping: built against glibc 2.17 so it loads into old CUDA images.
shim-release:
	scripts/build-shim-release.sh

## Container images (kubelet plugin, controller, gpu-worker) as docker-archive tarballs, with no container engine or registry (docs/helm.md).
images:
	scripts/make-images.sh

## The chart, linted and packaged (helm package) into $(TESSERA_CACHE)/charts; prints the .tgz (push it with helm push <tgz> oci://<registry>/<repo>).
chart:
	scripts/package-chart.sh

## Measure the shim's per-call overhead against the bare fake driver.
bench:
	cargo build --release -p tessera-shim -p tessera-fake-cuda -p tessera-fake-nvml
	cargo bench -p tessera-shim --bench call_overhead

## The simulated-cluster suite on every pinned Kubernetes minor (1.31-1.37), with a results
## table; `make test` runs only the oldest and the newest. Each minor builds its own control
## plane (~10 min cold on 2 cores).
e2e-matrix:
	scripts/e2e-matrix.sh

## Instructions per driver call with and without the shim, counted by callgrind (exact,
## whatever the machine's load).
bench-instructions:
	cargo build --release -p tessera-shim -p tessera-fake-cuda -p tessera-fake-nvml
	cargo bench -p tessera-shim --bench call_instructions

## Inference beside training on the simulated GPU: the inference's latency and the training's
## share per setup, as tables for docs/benchmarks.md (virtual time: host load does not move them).
bench-priority:
	cargo build -p tessera-shim -p tessera-fake-cuda -p tessera-fake-nvml
	cargo test -p tessera-shim --test inference_beside_training -- --ignored --nocapture table
