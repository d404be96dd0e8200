//! Which cgroups a process is in, for NVML 13.4's per-cgroup device-memory limits.
//!
//! A limit names a cgroup directory under the cgroup filesystem and binds every process in that
//! cgroup or in any cgroup below it. The real driver learns a process's cgroups from the kernel;
//! the fake reads `/proc/self/cgroup` once, when a process attaches to the node (a test never
//! moves a process behind the driver's back), and maps each line to the directory it names:
//!
//! - a v2 line `0::/p` → `/sys/fs/cgroup/p` on a unified host (`cgroup.controllers` at the top),
//!   else `/sys/fs/cgroup/unified/p` (a hybrid host's v2 mount);
//! - a v1 line `N:ctrl1,ctrl2:/p` → `/sys/fs/cgroup/ctrl1,ctrl2/p`; `name=systemd` →
//!   `/sys/fs/cgroup/systemd/p`.
//!
//! Directories that do not exist are skipped (a hierarchy the host does not mount there). Paths
//! are canonicalised, as a limit's directory is, so that `cpu` → `cpu,cpuacct` links and
//! trailing slashes name one cgroup.
//!
//! Other processes must be able to tell whether a limit binds this process (NVML's
//! `currentUsed`, and the wall itself, count every process under the limit), so the set is
//! published in the state file: one 64-bit hash per directory the process is in *and every
//! ancestor of it up to its hierarchy's root*. "The limit's directory is one of mine or an
//! ancestor of one" is then a lookup of the limit's hash, with no path in the slot.

use std::path::{Path, PathBuf};

use crate::config::Fnv1a;

/// Where the host mounts its cgroup hierarchies.
pub const CGROUP_FS: &str = "/sys/fs/cgroup";

/// One line of `/proc/<pid>/cgroup`, mapped: the hierarchy's mount and the cgroup's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub root: PathBuf,
    pub dir: PathBuf,
}

/// The directories (under `cgroup_fs`) that `proc_cgroup`, the text of `/proc/<pid>/cgroup`,
/// names; those that do not exist are left out.
pub fn memberships(proc_cgroup: &str, cgroup_fs: &Path) -> Vec<Membership> {
    let unified_host = cgroup_fs.join("cgroup.controllers").exists();
    let mut out = Vec::new();
    for line in proc_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let root = if controllers.is_empty() {
            // Only the v2 hierarchy has no controllers in its line (a named v1 hierarchy
            // carries `name=`).
            if id != "0" {
                continue;
            }
            if unified_host {
                cgroup_fs.to_owned()
            } else {
                cgroup_fs.join("unified")
            }
        } else {
            cgroup_fs.join(controllers.strip_prefix("name=").unwrap_or(controllers))
        };
        let relative = path.trim_start_matches('/');
        let dir = if relative.is_empty() {
            root.clone()
        } else {
            root.join(relative)
        };
        if dir.is_dir() {
            out.push(Membership { root, dir });
        } else if root.is_dir() {
            // A container's view: the runtime mounts the container's own cgroup at the
            // hierarchy's place, where the host's path of it does not exist. The directory is
            // then known by its identity alone (see `dir_key`), which is the host's.
            out.push(Membership {
                root: root.clone(),
                dir: root,
            });
        }
    }
    out
}

/// A process's cgroup directories and all their ancestors within their hierarchies, as hashes
/// of the canonical paths (see the module note). Empty: no limit can bind the process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupSet {
    /// Each membership's own directory first, then its ancestors; no repeats.
    hashes: Vec<u64>,
}

impl CgroupSet {
    /// The calling process's set, from `/proc/self/cgroup`. A process whose cgroups cannot be
    /// read is in no cgroup a limit could name.
    pub fn of_this_process() -> CgroupSet {
        match std::fs::read_to_string("/proc/self/cgroup") {
            Ok(text) => CgroupSet::from_memberships(&memberships(&text, Path::new(CGROUP_FS))),
            Err(_) => CgroupSet::default(),
        }
    }

    /// The set for these memberships. A directory that cannot be canonicalised, or that lies
    /// outside its hierarchy's root once canonical (a cgroup namespace's `/..` paths), is left
    /// out: no limit set through the cgroup filesystem could name it.
    pub fn from_memberships(memberships: &[Membership]) -> CgroupSet {
        let mut hashes = Vec::new();
        for membership in memberships {
            let (Ok(root), Ok(dir)) = (
                std::fs::canonicalize(&membership.root),
                std::fs::canonicalize(&membership.dir),
            ) else {
                continue;
            };
            if !dir.starts_with(&root) {
                continue;
            }
            for ancestor in dir.ancestors() {
                let Some(hash) = dir_key(ancestor) else {
                    continue;
                };
                if !hashes.contains(&hash) {
                    hashes.push(hash);
                }
                if ancestor == root {
                    break;
                }
            }
        }
        CgroupSet { hashes }
    }

    /// A set of exactly these hashes (the state file's copy of another process's set).
    pub fn from_hashes(hashes: Vec<u64>) -> CgroupSet {
        CgroupSet { hashes }
    }

    pub fn hashes(&self) -> &[u64] {
        &self.hashes
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Whether a limit on the directory with this hash binds the process.
    pub fn contains(&self, hash: u64) -> bool {
        self.hashes.contains(&hash)
    }
}

/// The key a limit and a process's set agree on for a cgroup directory: its identity (device and
/// inode), not its path, because a container sees its own cgroup under another path than the
/// host that set the limit (at its hierarchy's root, through a bind mount or a cgroup
/// namespace) — the same directory either way. FNV-1a, stable across toolchains, as processes
/// of different builds share one state file.
pub fn key_of(dev: u64, ino: u64) -> u64 {
    let mut hash = Fnv1a::new();
    hash.write(&dev.to_le_bytes());
    hash.write(&ino.to_le_bytes());
    hash.finish()
}

/// [`key_of`] the directory at `path`, if it can be read.
pub fn dir_key(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(key_of(meta.dev(), meta.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake `/sys/fs/cgroup` with the given directories.
    fn cgroup_fs(dirs: &[&str], unified_host: bool) -> tempfile::TempDir {
        let fs = tempfile::tempdir().unwrap();
        for dir in dirs {
            std::fs::create_dir_all(fs.path().join(dir)).unwrap();
        }
        if unified_host {
            std::fs::write(fs.path().join("cgroup.controllers"), "cpu memory\n").unwrap();
        }
        fs
    }

    fn dirs(found: &[Membership], fs: &Path) -> Vec<(String, String)> {
        let relative = |p: &Path| p.strip_prefix(fs).unwrap().display().to_string();
        found
            .iter()
            .map(|m| (relative(&m.root), relative(&m.dir)))
            .collect()
    }

    #[test]
    fn a_hybrid_host_maps_v1_lines_to_their_controllers_and_v2_to_unified() {
        let fs = cgroup_fs(
            &[
                "systemd/user.slice",
                "memory/process_api/abc",
                "cpu,cpuacct",
                "unified/work",
            ],
            false,
        );
        let text = "9:name=systemd:/user.slice\n\
                    4:memory:/process_api/abc\n\
                    2:cpu,cpuacct:/\n\
                    1:pids:/gone\n\
                    0::/work\n";
        assert_eq!(
            dirs(&memberships(text, fs.path()), fs.path()),
            [
                ("systemd", "systemd/user.slice"),
                ("memory", "memory/process_api/abc"),
                ("cpu,cpuacct", "cpu,cpuacct"),
                ("unified", "unified/work"),
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned())),
            "pids is not mounted there: skipped"
        );
    }

    #[test]
    fn a_unified_host_maps_the_v2_line_to_the_top() {
        let fs = cgroup_fs(&["kubepods/pod1"], true);
        let found = memberships("0::/kubepods/pod1\n", fs.path());
        assert_eq!(
            dirs(&found, fs.path()),
            [(String::new(), "kubepods/pod1".to_owned())]
        );
        // A container's view: its own cgroup is what it sees at the hierarchy's root.
        assert_eq!(
            dirs(&memberships("0::/elsewhere\n", fs.path()), fs.path()),
            [(String::new(), String::new())]
        );
        assert!(
            memberships("garbage\n3::/x\n", fs.path()).is_empty(),
            "malformed lines and controller-less v1 lines are skipped"
        );
    }

    #[test]
    fn the_set_holds_every_directory_up_to_the_hierarchy_root() {
        let fs = cgroup_fs(&["unified/a/b", "memory/m"], false);
        let text = "4:memory:/m\n0::/a/b\n";
        let set = CgroupSet::from_memberships(&memberships(text, fs.path()));
        let root = std::fs::canonicalize(fs.path()).unwrap();
        std::fs::create_dir_all(root.join("unified/a/b/c")).unwrap();
        std::fs::create_dir_all(root.join("unified/z")).unwrap();
        std::fs::create_dir_all(root.join("memory/a")).unwrap();
        for inside in ["unified/a/b", "unified/a", "unified", "memory/m", "memory"] {
            assert!(
                set.contains(dir_key(&root.join(inside)).unwrap()),
                "{inside}"
            );
        }
        for outside in ["", "unified/a/b/c", "unified/z", "memory/a"] {
            assert!(
                !set.contains(dir_key(&root.join(outside)).unwrap()),
                "{outside}"
            );
        }
        assert_eq!(set.len(), 5);
    }

    #[test]
    fn paths_outside_the_hierarchy_are_left_out() {
        let fs = cgroup_fs(&["unified/a"], false);
        // A cgroup namespace shows a process outside its root as `/..`.
        let set = CgroupSet::from_memberships(&memberships("0::/../..\n", fs.path()));
        assert!(set.is_empty(), "{set:?}");
    }
}
