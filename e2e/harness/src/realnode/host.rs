//! What a real node leaves on the host outside its processes, and how it is taken back: the
//! kubelet's cgroup root, mounts under the node's directory, container processes and
//! containerd shims (which run in process groups of their own); and a check that the node's
//! processes talk over loopback only.

use std::collections::HashSet;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::error::{Error, Result};

const CGROUP_FS: &str = "/sys/fs/cgroup";

/// The kubelet's `cgroupRoot`, made in every hierarchy the host mounts.
#[derive(Debug)]
pub(crate) struct CgroupRoot {
    /// e.g. `/tessera-e2e-1234-1`.
    pub name: String,
    /// The directories created, one per hierarchy (just one on a cgroup v2 host).
    dirs: Vec<PathBuf>,
    /// On a hybrid host, runc mirrors the containers' cgroups into the v2 tree too.
    unified_mirror: Option<PathBuf>,
}

/// Whether the host has the unified (v2) hierarchy only, and the hierarchies a cgroup root
/// is made in.
fn hierarchies() -> Result<(bool, Vec<PathBuf>)> {
    let base = Path::new(CGROUP_FS);
    let unified = base.join("cgroup.controllers").exists();
    if unified {
        return Ok((true, vec![base.to_owned()]));
    }
    let entries = fs::read_dir(base).map_err(Error::io(base, "listing cgroup hierarchies"))?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        // `cpu` and `cpuacct` are often links to `cpu,cpuacct`: one directory each.
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        // The hybrid layout's v2 tree has no controllers the kubelet uses in v1 mode.
        .filter(|p| p.file_name().is_some_and(|n| n != "unified"))
        .collect();
    dirs.sort();
    Ok((false, dirs))
}

impl CgroupRoot {
    /// A root made earlier (by a process that has ended), to find its processes and remove
    /// it; `name` as [`CgroupRoot::keep`] returned it.
    pub(crate) fn existing(name: &str) -> CgroupRoot {
        let base = Path::new(CGROUP_FS);
        let relative = name.trim_start_matches('/');
        let (unified, hierarchies) = hierarchies().unwrap_or_default();
        CgroupRoot {
            name: name.to_owned(),
            dirs: hierarchies
                .into_iter()
                .map(|h| h.join(relative))
                .filter(|d| d.is_dir())
                .collect(),
            unified_mirror: (!unified)
                .then(|| base.join("unified").join(relative))
                .filter(|d| d.is_dir()),
        }
    }

    /// Leaves the root in place (a node left running); returns its name.
    pub(crate) fn keep(mut self) -> String {
        self.dirs.clear();
        self.unified_mirror = None;
        std::mem::take(&mut self.name)
    }

    pub(crate) fn create(name: &str) -> Result<CgroupRoot> {
        let base = Path::new(CGROUP_FS);
        let (unified, hierarchies) = hierarchies()?;
        let mut root = CgroupRoot {
            name: format!("/{name}"),
            dirs: Vec::new(),
            unified_mirror: (!unified).then(|| base.join("unified").join(name)),
        };
        for hierarchy in hierarchies {
            let dir = hierarchy.join(name);
            fs::create_dir(&dir).map_err(Error::io(&dir, "creating the kubelet's cgroup root"))?;
            root.dirs.push(dir.clone());
            // A new cpuset cgroup has no CPUs or memory nodes, and nothing can join it.
            if !unified && hierarchy.file_name().is_some_and(|n| n == "cpuset") {
                for file in ["cpuset.cpus", "cpuset.mems"] {
                    let parent = hierarchy.join(file);
                    let value =
                        fs::read_to_string(&parent).map_err(Error::io(&parent, "reading"))?;
                    let child = dir.join(file);
                    fs::write(&child, value.trim()).map_err(Error::io(&child, "writing"))?;
                }
            }
        }
        Ok(root)
    }

    /// Every pid in the tree, in any hierarchy (the container processes).
    pub(crate) fn pids(&self) -> Vec<i32> {
        pids_in_cgroups(&self.dirs())
    }

    pub(crate) fn dirs(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .chain(&self.unified_mirror)
            .cloned()
            .collect()
    }

    /// Removes the tree, deepest first; a cgroup still holding a process stays (and is named
    /// in the warning).
    pub(crate) fn remove(&mut self) {
        let mirror = self.unified_mirror.take();
        for dir in self.dirs.drain(..).chain(mirror) {
            remove_deepest_first(subtree(&dir));
        }
    }

    /// Removes every cgroup below the root, deepest first, and keeps the root itself (a reboot:
    /// the kubelet makes its pods' cgroups again).
    pub(crate) fn remove_below(&self) {
        for dir in self.dirs() {
            remove_deepest_first(subtree(&dir).into_iter().filter(|c| c != &dir).collect());
        }
    }
}

fn remove_deepest_first(mut cgroups: Vec<PathBuf>) {
    cgroups.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for cgroup in cgroups {
        if let Err(e) = fs::remove_dir(&cgroup)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(cgroup = %cgroup.display(), error = %e, "cannot remove a real node's cgroup");
        }
    }
}

impl Drop for CgroupRoot {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Every pid in the cgroup trees rooted at `dirs`.
pub(crate) fn pids_in_cgroups(dirs: &[PathBuf]) -> Vec<i32> {
    let mut pids = HashSet::new();
    for dir in dirs {
        for cgroup in subtree(dir) {
            if let Ok(text) = fs::read_to_string(cgroup.join("cgroup.procs")) {
                pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
    }
    pids.into_iter().collect()
}

/// `dir` and every cgroup below it.
fn subtree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        if let Ok(entries) = fs::read_dir(&d) {
            stack.extend(
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
            out.push(d);
        }
    }
    out
}

/// Pids whose command line contains `marker` (containerd shims carry the socket path of the
/// containerd that started them).
pub(crate) fn pids_with_cmdline(marker: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .map(|raw| {
                    String::from_utf8_lossy(&raw)
                        .replace('\0', " ")
                        .contains(marker)
                })
                .unwrap_or(false)
        })
        .collect()
}

pub(crate) fn kill_all(pids: &[i32]) {
    for &pid in pids {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Unmounts everything mounted at or below `dir` in our mount namespace, deepest first.
/// Returns the mount points that could not be unmounted.
pub(crate) fn unmount_below(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    let mut failed = Vec::new();
    // A mount can hide another at the same place; loop until nothing is left (bounded).
    for _ in 0..8 {
        let mut points: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(unescape_mount_path)
            .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
            .collect();
        if points.is_empty() {
            return Vec::new();
        }
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        failed.clear();
        for point in points {
            if let Err(e) = nix::mount::umount2(point.as_str(), nix::mount::MntFlags::MNT_DETACH) {
                failed.push(format!("{point}: {e}"));
            }
        }
    }
    failed
}

/// Bind-mounts `dir` onto itself and makes it a shared mount (recursively), so that
/// containers may mount paths below it with HostToContainer or Bidirectional propagation.
/// Undone by [`unmount_below`].
pub(crate) fn make_shared_mount(dir: &Path) -> Result<()> {
    use nix::mount::{MsFlags, mount};
    mount(
        Some(dir),
        dir,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| Error::io(dir, "bind-mounting the node's directory onto itself")(e.into()))?;
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| Error::io(dir, "making the node's directory a shared mount")(e.into()))
}

/// The kubelet links every container's log into this fixed directory, and removes the link
/// only when it removes the container.
const CONTAINER_LOG_LINKS: &str = "/var/log/containers";

/// Removes the links in `/var/log/containers` that point below `dir`.
pub(crate) fn remove_log_links_into(dir: &Path) {
    let Ok(entries) = fs::read_dir(CONTAINER_LOG_LINKS) else {
        return;
    };
    for link in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
        if fs::read_link(&link).is_ok_and(|target| target.starts_with(dir)) {
            let _ = fs::remove_file(&link);
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        if bytes[i] == b'\\'
            && let Some(v) = octal
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A socket of a watched process that leaves loopback: a connection to, or a listener on, an
/// address outside 127.0.0.0/8 and ::1, in the host's network namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OffLoopback {
    pub pid: i32,
    pub command: String,
    pub protocol: &'static str,
    pub local: String,
    pub remote: String,
}

impl std::fmt::Display for OffLoopback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (pid {}): {} {} -> {}",
            self.command, self.pid, self.protocol, self.local, self.remote
        )
    }
}

/// The sockets of `pids` (and of their threads' shared descriptor tables) that leave loopback.
/// Processes in another network namespace than ours (containerd and its pods, in the node's
/// own namespace) are skipped: whatever they do stays in there.
pub fn sockets_off_loopback(pids: &[i32]) -> Vec<OffLoopback> {
    let host_netns = fs::read_link("/proc/self/ns/net").ok();
    let mut found = Vec::new();
    for &pid in pids {
        let netns = fs::read_link(format!("/proc/{pid}/ns/net")).ok();
        if netns.is_none() || netns != host_netns {
            continue;
        }
        let inodes = socket_inodes(pid);
        if inodes.is_empty() {
            continue;
        }
        let command = fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim().to_owned())
            .unwrap_or_default();
        for (protocol, file) in [
            ("tcp", "tcp"),
            ("tcp6", "tcp6"),
            ("udp", "udp"),
            ("udp6", "udp6"),
        ] {
            let Ok(table) = fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
                continue;
            };
            for line in table.lines().skip(1) {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let (Some(local), Some(remote), Some(inode)) =
                    (fields.get(1), fields.get(2), fields.get(9))
                else {
                    continue;
                };
                if !inode.parse::<u64>().is_ok_and(|i| inodes.contains(&i)) {
                    continue;
                }
                let (Some(local_ip), Some(remote_ip)) = (parse_addr(local), parse_addr(remote))
                else {
                    continue;
                };
                // A listener or unconnected socket has an unspecified remote; its local
                // address is what it is reachable on.
                let off = if remote_ip.0.is_unspecified() {
                    !is_loopback(local_ip.0)
                } else {
                    !is_loopback(remote_ip.0) || !is_loopback(local_ip.0)
                };
                if off {
                    found.push(OffLoopback {
                        pid,
                        command: command.clone(),
                        protocol,
                        local: format!("{}:{}", local_ip.0, local_ip.1),
                        remote: format!("{}:{}", remote_ip.0, remote_ip.1),
                    });
                }
            }
        }
    }
    found
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

fn socket_inodes(pid: i32) -> HashSet<u64> {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    entries
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits (IPv6), each 32-bit word in host (little-endian)
/// order, then the port in big-endian hex.
fn parse_addr(field: &str) -> Option<(IpAddr, u16)> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match addr.len() {
        8 => {
            let b = u32::from_str_radix(addr, 16).ok()?.to_le_bytes();
            IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        }
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                let w = u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16).ok()?;
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some((ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_addresses() {
        assert_eq!(
            parse_addr("0100007F:1F90"),
            Some((IpAddr::V4(Ipv4Addr::LOCALHOST), 8080))
        );
        assert_eq!(
            parse_addr("0200007F:0050"),
            Some((IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), 80))
        );
        assert_eq!(
            parse_addr("00000000000000000000000001000000:0016"),
            Some((IpAddr::V6(Ipv6Addr::LOCALHOST), 22))
        );
        assert_eq!(
            parse_addr("0000000000000000FFFF00000100007F:01BB"),
            Some((IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()), 443))
        );
        assert_eq!(parse_addr("zz"), None);
    }

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape_mount_path("/tmp/a\\040b"), "/tmp/a b");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
    }

    #[test]
    fn a_loopback_listener_and_connection_are_fine_and_a_wildcard_one_is_not() {
        let loopback = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let _client =
            std::net::TcpStream::connect(loopback.local_addr().expect("addr")).expect("connect");
        let me = std::process::id() as i32;
        assert_eq!(sockets_off_loopback(&[me]), Vec::new());
        let wildcard = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
        let port = wildcard.local_addr().expect("addr").port();
        let off = sockets_off_loopback(&[me]);
        assert!(
            off.iter().any(|o| o.local == format!("0.0.0.0:{port}")),
            "{off:?}"
        );
    }
}
