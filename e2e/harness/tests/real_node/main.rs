//! Real nodes: the upstream kubelet with containerd 2 and runc, joined to the harness's control
//! plane, and Tessera on them: the plugin as a host process (basics), Tessera's images and
//! chart (chart), what happens to prepared claims when the node's parts come and go
//! (scenarios), the real node `tessera-cluster up` leaves running (cluster_up), and the demo
//! on a real node (demo), and the driver's own memory wall (driver_wall).

#[path = "../common/mod.rs"]
mod common;

mod basics;
mod chart;
mod cluster_up;
mod demo;
mod driver_wall;
mod scenarios;
mod support;
