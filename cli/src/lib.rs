//! The `tessera` command: Tessera's GPU slices on a host without Kubernetes. `tessera cdi
//! generate` writes a CDI spec (and the shim's config and accounting region) for a slice of one
//! GPU, so `podman run --device gpu.tessera.dev/slice=<name>` (or docker with CDI) gets the shim
//! and the limits; `list` and `remove` manage them. See `docs/standalone.md`.
#![forbid(unsafe_code)]

pub mod slice;
