//! Cgroups of a test's own, for tests that place child processes in a cgroup (NVML's
//! per-cgroup memory limits). Needs root and a writable cgroup filesystem; a test that cannot
//! make one gets an error saying why, and should fail with it rather than skip.
//!
//! Each cgroup is made below the test process's own cgroup in one hierarchy, with a unique
//! name, and removed when dropped (after its processes have exited or moved out). A child is
//! put in it before it runs anything by writing `0` to the cgroup's `cgroup.procs` from the
//! child between fork and exec (`CommandExt::pre_exec`), or by [`TestCgroup::add`].

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const CGROUP_FS: &str = "/sys/fs/cgroup";

/// A cgroup hierarchy of the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v2: all of `/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified` on a
    /// hybrid one.
    Unified,
    /// A v1 hierarchy by controller (`memory`), mounted at `/sys/fs/cgroup/<controller>`.
    V1(String),
}

impl Hierarchy {
    /// Where the hierarchy is mounted, if it is.
    pub fn mount(&self) -> Option<PathBuf> {
        let base = Path::new(CGROUP_FS);
        let mount = match self {
            Hierarchy::Unified if base.join("cgroup.controllers").exists() => base.to_owned(),
            Hierarchy::Unified => base.join("unified"),
            Hierarchy::V1(controller) => base.join(controller),
        };
        mount.join("cgroup.procs").exists().then_some(mount)
    }

    /// This process's cgroup in the hierarchy, from `/proc/self/cgroup`, as a path below the
    /// mount (`/` for its root).
    fn own_path(&self) -> Result<String, String> {
        let text = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        text.lines()
            .filter_map(|line| {
                let mut fields = line.splitn(3, ':');
                Some((fields.next()?, fields.next()?, fields.next()?))
            })
            .find(|(id, controllers, _)| match self {
                Hierarchy::Unified => *id == "0" && controllers.is_empty(),
                Hierarchy::V1(controller) => controllers.split(',').any(|c| c == controller),
            })
            .map(|(_, _, path)| path.to_owned())
            .ok_or_else(|| format!("/proc/self/cgroup has no line for {self:?}:\n{text}"))
    }
}

/// The hierarchies a test cgroup can be made in, the unified one first: on this kind of host,
/// what a container runtime and the kubelet use.
pub fn hierarchies() -> Vec<Hierarchy> {
    [Hierarchy::Unified, Hierarchy::V1("memory".into())]
        .into_iter()
        .filter(|h| h.mount().is_some())
        .collect()
}

/// A cgroup made for a test, removed on drop.
#[derive(Debug)]
pub struct TestCgroup {
    dir: PathBuf,
    /// The cgroup the test process was in (in the same hierarchy), where processes go back to.
    home: PathBuf,
    hierarchy: Hierarchy,
    removed: bool,
}

static SERIAL: AtomicU32 = AtomicU32::new(0);

impl TestCgroup {
    /// A new cgroup named after `label`, below this process's own cgroup in `hierarchy`.
    pub fn create(hierarchy: &Hierarchy, label: &str) -> Result<TestCgroup, String> {
        let mount = hierarchy
            .mount()
            .ok_or_else(|| format!("{hierarchy:?} is not mounted under {CGROUP_FS}"))?;
        let own = hierarchy.own_path()?;
        let home = mount.join(own.trim_start_matches('/'));
        let name = format!(
            "{label}-{}-{}",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        );
        let dir = home.join(name);
        std::fs::create_dir(&dir).map_err(|e| {
            format!(
                "cannot create the cgroup {} (tests that place processes in cgroups need root \
                 and a writable cgroup filesystem): {e}",
                dir.display()
            )
        })?;
        Ok(TestCgroup {
            dir,
            home,
            hierarchy: hierarchy.clone(),
            removed: false,
        })
    }

    /// A new cgroup in the first hierarchy that allows one; the error lists why none did.
    pub fn create_any(label: &str) -> Result<TestCgroup, String> {
        let mut reasons = Vec::new();
        for hierarchy in hierarchies() {
            match TestCgroup::create(&hierarchy, label) {
                Ok(cgroup) => return Ok(cgroup),
                Err(reason) => reasons.push(reason),
            }
        }
        if reasons.is_empty() {
            reasons.push(format!("no cgroup hierarchy is mounted under {CGROUP_FS}"));
        }
        Err(reasons.join("; "))
    }

    /// A cgroup below this one (removed on drop, which must come before this one's).
    pub fn child(&self, name: &str) -> Result<TestCgroup, String> {
        let dir = self.dir.join(name);
        std::fs::create_dir(&dir)
            .map_err(|e| format!("cannot create the cgroup {}: {e}", dir.display()))?;
        Ok(TestCgroup {
            dir,
            home: self.home.clone(),
            hierarchy: self.hierarchy.clone(),
            removed: false,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hierarchy
    }

    /// The file a process joins the cgroup through (write its PID, or `0` for the writer).
    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Moves `pid` into the cgroup.
    pub fn add(&self, pid: u32) -> Result<(), String> {
        write_pid(&self.procs(), pid)
    }

    /// Moves `pid` back to the cgroup the test process is in.
    pub fn move_home(&self, pid: u32) -> Result<(), String> {
        write_pid(&self.home.join("cgroup.procs"), pid)
    }

    /// The processes in the cgroup (not those below it).
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.procs())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Removes the cgroup, waiting up to 5 s for exiting processes to leave it.
    pub fn remove(&mut self) -> Result<(), String> {
        if self.removed {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                // Busy: a process or a cgroup is still in it.
                Err(e)
                    if Instant::now() < deadline
                        && e.kind() == std::io::ErrorKind::ResourceBusy =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(format!(
                        "cannot remove the cgroup {} (processes {:?}): {e}",
                        self.dir.display(),
                        self.pids()
                    ));
                }
            }
        }
        self.removed = true;
        Ok(())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("{e}");
        }
    }
}

fn write_pid(procs: &Path, pid: u32) -> Result<(), String> {
    std::fs::write(procs, pid.to_string())
        .map_err(|e| format!("cannot move process {pid} into {}: {e}", procs.display()))
}

/// Makes the child of `command` join the cgroup whose `cgroup.procs` is `procs` before it execs,
/// so that it is in the cgroup before a driver reads its cgroups (as a runtime puts a container's
/// first process in its cgroup before it runs).
#[allow(unsafe_code)]
pub fn join_cgroup(command: &mut Command, procs: &Path) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let path = std::ffi::CString::new(procs.as_os_str().as_bytes()).expect("cgroup.procs path");
    // SAFETY: the closure only makes async-signal-safe calls (open, write, close) on memory
    // prepared before the fork; `last_os_error` does not allocate.
    unsafe {
        command.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let error = std::io::Error::last_os_error();
            libc::close(fd);
            if written == 1 { Ok(()) } else { Err(error) }
        });
    }
}
