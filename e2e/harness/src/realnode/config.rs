//! The configuration files of a real node: containerd's, the kubelet's and the CNI network's.
//!
//! Rendered as text with every path quoted (TOML literal strings and JSON strings, which YAML
//! also reads), so an odd state directory cannot break them.

use std::net::Ipv4Addr;
use std::path::Path;

/// What the files are made of; every path lies under the node's directory except the
/// programs the host provides.
pub(crate) struct NodeConfig<'a> {
    pub root: &'a Path,
    pub containerd_socket: &'a Path,
    pub runc: &'a Path,
    pub cni_bin_dir: &'a Path,
    pub cdi_dirs: &'a [std::path::PathBuf],
    pub sandbox_image: &'a str,
    pub address: Ipv4Addr,
    pub kubelet_port: u16,
    pub healthz_port: u16,
    pub cgroup_root: &'a str,
    pub ca_cert: &'a Path,
    pub serving_cert: &'a Path,
    pub serving_key: &'a Path,
    pub feature_gates: &'a [(String, bool)],
}

fn json(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

fn json_path(p: &Path) -> String {
    json(&p.to_string_lossy())
}

/// A TOML basic string is JSON-compatible for everything a path holds.
fn toml_path(p: &Path) -> String {
    json_path(p)
}

/// containerd's state directory under the node's directory (`/run/containerd` on a real node).
pub(crate) fn containerd_state_dir(node_root: &Path) -> std::path::PathBuf {
    node_root.join("containerd/state")
}

/// runc's root under the node's directory (`/run/runc` on a real node).
pub(crate) fn runc_root(node_root: &Path) -> std::path::PathBuf {
    node_root.join("runc")
}

pub(crate) fn containerd(c: &NodeConfig<'_>) -> String {
    let root = c.root.join("containerd");
    let cdi_dirs = c
        .cdi_dirs
        .iter()
        .map(|d| toml_path(d))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"# containerd 2 for one real e2e node: every path under the node's directory.
version = 3
root = {root}
state = {state}

[grpc]
  address = {socket}

[ttrpc]
  address = {ttrpc}

[plugins]
  [plugins.'io.containerd.internal.v1.opt']
    path = {opt}

  [plugins.'io.containerd.nri.v1.nri']
    disable = true

  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    # No registry is reachable: the sandbox image is imported before the kubelet starts.
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = {sandbox}

  [plugins.'io.containerd.cri.v1.runtime']
    cdi_spec_dirs = [{cdi_dirs}]
    # Hosts whose bounding set lacks CAP_SYS_RESOURCE cannot lower oom_score_adj below 0, and
    # runc fails every sandbox on the -998 the kubelet asks for; clamp to containerd's own.
    restrict_oom_score_adj = true
    # Pod network namespaces are mounted here, not in the host's /var/run/netns.
    netns_mounts_under_state_dir = true
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = {runc}
          SystemdCgroup = false
          Root = {runc_root}
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = [{cni_bin}]
      conf_dir = {cni_conf}

  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = '127.0.0.1'
    stream_server_port = '0'
"#,
        root = toml_path(&root.join("root")),
        state = toml_path(&containerd_state_dir(c.root)),
        socket = toml_path(c.containerd_socket),
        ttrpc = toml_path(&c.containerd_socket.with_extension("sock.ttrpc")),
        opt = toml_path(&root.join("opt")),
        sandbox = json(c.sandbox_image),
        runc = toml_path(c.runc),
        runc_root = toml_path(&runc_root(c.root)),
        cni_bin = toml_path(c.cni_bin_dir),
        cni_conf = toml_path(&c.root.join("cni/net.d")),
    )
}

/// A bridge that exists only in containerd's own network namespace (the harness starts
/// containerd in a fresh one): pods can reach each other and nothing else. containerd refuses a
/// sandbox whose `eth0` has no address, so a loopback-only network is not enough.
pub(crate) fn cni(c: &NodeConfig<'_>) -> String {
    format!(
        r#"{{
  "cniVersion": "1.0.0",
  "name": "tessera-e2e",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "tessera0",
      "isGateway": true,
      "isDefaultGateway": true,
      "ipMasq": false,
      "ipam": {{
        "type": "host-local",
        "ranges": [[{{ "subnet": "10.88.0.0/24" }}]],
        "dataDir": {ipam}
      }}
    }}
  ]
}}
"#,
        ipam = json_path(&c.root.join("cni/ipam")),
    )
}

pub(crate) fn kubelet(c: &NodeConfig<'_>) -> String {
    let gates = c
        .feature_gates
        .iter()
        .map(|(name, on)| format!("  {name}: {on}\n"))
        .collect::<String>();
    format!(
        r#"# The kubelet of one real e2e node.
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: {runtime}
cgroupDriver: cgroupfs
# 1.35+ refuses cgroup v1 unless told not to; the test machines offer only v1 controllers.
failCgroupV1: false
failSwapOn: false
# Created beforehand in every hierarchy (the kubelet refuses a missing one) and removed at stop.
cgroupRoot: {cgroup_root}
cgroupsPerQOS: true
# Lowering it below 0 needs CAP_SYS_RESOURCE, which the test machines' bounding set lacks.
oomScoreAdj: 0
podLogsDir: {pod_logs}
# Loopback only: the apiserver dials the node by its name, which is this address.
address: {address}
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
tlsCertFile: {tls_cert}
tlsPrivateKeyFile: {tls_key}
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: {ca}
authorization:
  mode: Webhook
# A small test machine: do not evict over the disk or memory other builds use.
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
  nodefs.inodesFree: "1%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
# Pods have no route out of their network namespace; they need no resolver either.
resolvConf: ""
featureGates:
{gates}"#,
        runtime = json(&format!("unix://{}", c.containerd_socket.display())),
        cgroup_root = json(c.cgroup_root),
        pod_logs = json_path(&c.root.join("pod-logs")),
        address = json(&c.address.to_string()),
        port = c.kubelet_port,
        healthz = c.healthz_port,
        tls_cert = json_path(c.serving_cert),
        tls_key = json_path(c.serving_key),
        ca = json_path(c.ca_cert),
    )
}
