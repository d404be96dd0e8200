//! Where a GPU sits on the node, for the standard DRA attributes (`resource.kubernetes.io/…`,
//! as `k8s.io/dynamic-resource-allocation/deviceattribute` defines them): `pciBusID` in extended
//! BDF form, `pcieRoot` (the PCIe root complex, `pci<domain>:<bus>`) and `numaNode`. A claim that
//! constrains two requests with `matchAttribute: resource.kubernetes.io/pcieRoot` gets a GPU
//! slice and, say, an RDMA NIC under one root complex.
//!
//! Read from sysfs: `/sys/bus/pci/devices/<bus id>` links to the device's place in
//! `/sys/devices/pci<domain>:<bus>/…`, whose first component is the root complex, and its
//! `numa_node` file holds the node (`-1`: no affinity, so no attribute, as upstream requires: a
//! `-1` would match every other device without one).

use std::path::Path;

use crate::inventory::Inventory;

/// A PCI address in extended BDF form (`0000:01:00.0`, lower case). NVML writes the domain with
/// eight digits (`00000000:01:00.0`); sysfs and the standard attribute use four.
pub fn bus_id(text: &str) -> Option<String> {
    let text = text.trim().to_ascii_lowercase();
    let (domain, rest) = text.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (device, function) = rest.split_once('.')?;
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let domain = match domain.len() {
        4 => domain,
        8 if domain.starts_with("0000") => &domain[4..],
        _ => return None,
    };
    (hex(domain, 4) && hex(bus, 2) && hex(device, 2) && hex(function, 1))
        .then(|| format!("{domain}:{bus}:{device}.{function}"))
}

/// The PCIe root complex of `bus_id` (`pci0000:00`), from the sysfs link under `sysfs`.
pub fn pcie_root(sysfs: &Path, bus_id: &str) -> Result<String, String> {
    let link = sysfs.join("bus/pci/devices").join(bus_id);
    let target = std::fs::read_link(&link).map_err(|e| format!("{}: {e}", link.display()))?;
    let target = link.parent().map(|dir| dir.join(&target)).unwrap_or(target);
    // `…/bus/pci/devices/../../../devices/pci0000:00/0000:00:01.0/0000:01:00.0`, lexically.
    let mut parts: Vec<String> = Vec::new();
    for part in target.components() {
        match part {
            std::path::Component::ParentDir => {
                parts.pop();
            }
            std::path::Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            _ => {}
        }
    }
    let devices = parts.iter().rposition(|p| p == "devices");
    match (devices.and_then(|i| parts.get(i + 1)), parts.last()) {
        (Some(root), Some(last)) if root.starts_with("pci") && last == bus_id => Ok(root.clone()),
        _ => Err(format!(
            "{} does not lead to devices/pci<domain>:<bus>/…/{bus_id}",
            link.display()
        )),
    }
}

/// The NUMA node of `bus_id`; `None` where the device has no affinity (`-1`).
pub fn numa_node(sysfs: &Path, bus_id: &str) -> Result<Option<u32>, String> {
    let path = sysfs.join("bus/pci/devices").join(bus_id).join("numa_node");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let node: i64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{}: {:?} is not a number", path.display(), text.trim()))?;
    match node {
        -1 => Ok(None),
        0..=1023 => Ok(Some(node as u32)),
        _ => Err(format!(
            "{}: NUMA node {node} is out of range",
            path.display()
        )),
    }
}

impl Inventory {
    /// Fills in each GPU's root complex and NUMA node from `sysfs` (normally `/sys`) where the
    /// inventory does not already say them. Returns what could not be read, one line per GPU
    /// and attribute: the attribute is then left out, which only matters to claims that ask.
    pub fn fill_topology(&mut self, sysfs: &Path) -> Vec<String> {
        let mut problems = Vec::new();
        for gpu in &mut self.gpus {
            let Some(bus) = gpu.pci_bus_id.as_deref().and_then(bus_id) else {
                problems.push(format!(
                    "GPU {} ({}): no PCI bus ID in extended BDF form ({:?})",
                    gpu.index, gpu.uuid, gpu.pci_bus_id
                ));
                continue;
            };
            let entry = sysfs.join("bus/pci/devices").join(&bus);
            if std::fs::symlink_metadata(&entry).is_err() {
                problems.push(format!(
                    "GPU {}: no {} (not a PCI device this node's sysfs shows)",
                    gpu.index,
                    entry.display()
                ));
                continue;
            }
            if gpu.pcie_root.is_none() {
                match pcie_root(sysfs, &bus) {
                    Ok(root) => gpu.pcie_root = Some(root),
                    Err(e) => problems.push(format!("GPU {} PCIe root: {e}", gpu.index)),
                }
            }
            if gpu.numa_node.is_none() {
                match numa_node(sysfs, &bus) {
                    Ok(node) => gpu.numa_node = node,
                    Err(e) => problems.push(format!("GPU {} NUMA node: {e}", gpu.index)),
                }
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Gpu;

    #[test]
    fn bus_ids_in_extended_bdf_form() {
        assert_eq!(bus_id("00000000:01:00.0").as_deref(), Some("0000:01:00.0"));
        assert_eq!(bus_id("0000:3B:00.0").as_deref(), Some("0000:3b:00.0"));
        for bad in [
            "",
            "01:00.0",
            "0000:01:00",
            "0001000:01:00.0",
            "zzzz:01:00.0",
        ] {
            assert_eq!(bus_id(bad), None, "{bad:?}");
        }
    }

    /// A sysfs tree as a two-socket server has it: GPU 0 under root complex pci0000:00 on NUMA
    /// node 0 behind a bridge, GPU 1 under pci0000:80 on node 1, GPU 2 without NUMA affinity,
    /// GPU 3 not in sysfs at all.
    fn sysfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let devices = root.join("bus/pci/devices");
        std::fs::create_dir_all(&devices).expect("mkdir");
        for (bus, path, numa) in [
            ("0000:01:00.0", "pci0000:00/0000:00:01.0/0000:01:00.0", "0"),
            ("0000:81:00.0", "pci0000:80/0000:80:01.0/0000:81:00.0", "1"),
            ("0000:41:00.0", "pci0000:40/0000:41:00.0", "-1"),
        ] {
            let real = root.join("devices").join(path);
            std::fs::create_dir_all(&real).expect("mkdir");
            std::fs::write(real.join("numa_node"), format!("{numa}\n")).expect("numa_node");
            std::os::unix::fs::symlink(Path::new("../../../devices").join(path), devices.join(bus))
                .expect("symlink");
        }
        dir
    }

    fn gpu(index: u32, bus: &str) -> Gpu {
        Gpu {
            uuid: format!("GPU-{index}"),
            index,
            minor: index,
            product_name: "NVIDIA H100 80GB HBM3".into(),
            memory: 80 << 30,
            brand: None,
            architecture: None,
            cuda_compute_capability: None,
            pci_bus_id: Some(bus.into()),
            pcie_root: None,
            numa_node: None,
            context_overhead: 0,
            driver_memory_wall: false,
        }
    }

    #[test]
    fn root_complex_and_numa_node_from_sysfs() {
        let sysfs = sysfs();
        let mut inventory = Inventory {
            driver_version: None,
            gpus: vec![
                gpu(0, "00000000:01:00.0"),
                gpu(1, "0000:81:00.0"),
                gpu(2, "0000:41:00.0"),
                gpu(3, "0000:c1:00.0"),
            ],
        };
        let problems = inventory.fill_topology(sysfs.path());
        let got: Vec<_> = inventory
            .gpus
            .iter()
            .map(|g| (g.pcie_root.as_deref(), g.numa_node))
            .collect();
        assert_eq!(
            got,
            [
                (Some("pci0000:00"), Some(0)),
                (Some("pci0000:80"), Some(1)),
                (Some("pci0000:40"), None),
                (None, None),
            ]
        );
        assert_eq!(problems.len(), 1, "GPU 3, once: {problems:?}");
        assert!(problems[0].starts_with("GPU 3: no "), "{problems:?}");
    }

    #[test]
    fn what_the_inventory_says_stands() {
        let sysfs = sysfs();
        let mut g = gpu(0, "0000:01:00.0");
        g.pcie_root = Some("pci0000:aa".into());
        g.numa_node = Some(3);
        let mut inventory = Inventory {
            driver_version: None,
            gpus: vec![g],
        };
        assert!(inventory.fill_topology(sysfs.path()).is_empty());
        assert_eq!(inventory.gpus[0].pcie_root.as_deref(), Some("pci0000:aa"));
        assert_eq!(inventory.gpus[0].numa_node, Some(3));
    }

    #[test]
    fn a_link_elsewhere_is_refused() {
        let sysfs = sysfs();
        let devices = sysfs.path().join("bus/pci/devices");
        std::os::unix::fs::symlink("/tmp", devices.join("0000:02:00.0")).expect("symlink");
        assert!(pcie_root(sysfs.path(), "0000:02:00.0").is_err());
    }
}
