//! The kubelet's gRPC protocols, generated from `proto/` at build time.
#![allow(clippy::all, missing_docs)]

/// `pluginregistration.Registration`: how the kubelet's plugin watcher learns about the plugin.
pub mod registration {
    tonic::include_proto!("pluginregistration");
}

/// `k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin`: kubelet 1.34 and newer (`share_id` from 1.35).
pub mod v1 {
    tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1");
}

/// `k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin`: kubelet 1.32 and newer.
pub mod v1beta1 {
    tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1beta1");
}

/// `v1alpha3.Node` (the kubelet's `dra/v1alpha4` API): kubelet 1.31.
pub mod v1alpha3 {
    tonic::include_proto!("v1alpha3");
}

/// `v1.DRAResourceHealth`: kubelet 1.37 and newer.
pub mod health_v1 {
    tonic::include_proto!("v1");
}

/// `v1alpha1.DRAResourceHealth`: kubelet 1.34 to 1.39 (the same messages as `v1`).
pub mod health_v1alpha1 {
    tonic::include_proto!("v1alpha1");
}
