//! The subset of the CDI spec format (container-device-interface SPEC.md) that Tessera writes.
//!
//! Our own serde types rather than the `container-device-interface` crate's, whose fields are
//! crate-private and whose dependency tree is large; tests check our output with that crate.

use serde::{Deserialize, Serialize};

/// A whole spec file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    pub cdi_version: String,
    pub kind: String,
    pub devices: Vec<Device>,
    #[serde(default, skip_serializing_if = "ContainerEdits::is_empty")]
    pub container_edits: ContainerEdits,
}

/// One named device of a spec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub name: String,
    pub container_edits: ContainerEdits,
}

/// Changes a runtime makes to the OCI spec of a container that requests a device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerEdits {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_nodes: Vec<DeviceNode>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<Hook>,
}

impl ContainerEdits {
    pub fn is_empty(&self) -> bool {
        self.env.is_empty()
            && self.device_nodes.is_empty()
            && self.mounts.is_empty()
            && self.hooks.is_empty()
    }
}

/// An OCI hook the runtime runs for the container (`hookName`: `createRuntime`, …); `path` is
/// a host path, `args` include the program's name as `argv[0]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hook {
    pub hook_name: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u32>,
}

/// A device node; the runtime fills type, major and minor from `hostPath` (or `path`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceNode {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<String>,
}

/// A bind mount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mount {
    pub host_path: String,
    pub container_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#type: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Mount {
    /// A read-only bind mount.
    pub fn read_only(host: impl Into<String>, container: impl Into<String>) -> Mount {
        Mount::bind(host, container, &["ro", "nosuid", "nodev", "bind"])
    }

    /// A read-write bind mount.
    pub fn read_write(host: impl Into<String>, container: impl Into<String>) -> Mount {
        Mount::bind(host, container, &["rw", "nosuid", "nodev", "bind"])
    }

    fn bind(host: impl Into<String>, container: impl Into<String>, options: &[&str]) -> Mount {
        Mount {
            host_path: host.into(),
            container_path: container.into(),
            r#type: Some("bind".into()),
            options: options.iter().map(|o| o.to_string()).collect(),
        }
    }
}

impl Spec {
    /// The lowest CDI version whose rules this spec satisfies (container-device-interface
    /// `specs-go/version.go`), so runtimes with older vendored CDI code accept it: a mount
    /// `type` needs 0.4.0; device names starting with a digit (claim UIDs do) and
    /// `deviceNodes[].hostPath` need 0.5.0.
    pub fn minimum_version(&self) -> &'static str {
        let edits = || {
            std::iter::once(&self.container_edits)
                .chain(self.devices.iter().map(|d| &d.container_edits))
        };
        let digit_name = self
            .devices
            .iter()
            .any(|d| d.name.starts_with(|c: char| c.is_ascii_digit()));
        let host_path = edits().any(|e| e.device_nodes.iter().any(|n| n.host_path.is_some()));
        let mount_type = edits().any(|e| {
            e.mounts
                .iter()
                .any(|m| m.r#type.as_deref().is_some_and(|t| !t.is_empty()))
        });
        if digit_name || host_path {
            "0.5.0"
        } else if mount_type {
            "0.4.0"
        } else {
            "0.3.0"
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Plain strings and vectors: serialising cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}
