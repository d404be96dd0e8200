//! Containers as podman + runc runs them here: the host's root filesystem as an overlay (no
//! image is pulled), the CDI devices the plugin returned, emptyDir volumes as host directories.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::Context;
use tokio::process::{Child, Command};

use crate::Args;

/// How to start a container.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Unique on the host.
    pub name: String,
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cdi_devices: Vec<String>,
    /// Host directory → container path.
    pub mounts: Vec<(PathBuf, String)>,
    pub working_dir: Option<String>,
    /// Where stdout and stderr go.
    pub log: PathBuf,
}

pub struct Podman {
    /// Environment every container gets (the simulated node's fake driver settings).
    env: Vec<(String, String)>,
    volumes: Vec<String>,
    cdi_spec_dir: Option<PathBuf>,
}

impl Podman {
    pub fn new(args: &Args) -> anyhow::Result<Podman> {
        let help = std::process::Command::new("podman")
            .arg("--help")
            .output()
            .context("running podman (scripts/install-podman.sh installs it)")?;
        // podman 4.3 has no --cdi-spec-dir and reads /etc/cdi and /var/run/cdi only.
        let has_flag = String::from_utf8_lossy(&help.stdout).contains("--cdi-spec-dir");
        let cdi_spec_dir = match (&args.cdi_spec_dir, has_flag) {
            (Some(dir), true) => Some(dir.clone()),
            (Some(dir), false)
                if dir == Path::new("/var/run/cdi") || dir == Path::new("/etc/cdi") =>
            {
                None
            }
            (Some(dir), false) => anyhow::bail!(
                "this podman has no --cdi-spec-dir, so CDI specs must be in /var/run/cdi or /etc/cdi, not {}",
                dir.display()
            ),
            (None, _) => None,
        };
        for volume in &args.container_volumes {
            if !volume.contains(':') {
                anyhow::bail!("--container-volume {volume:?} is not HOST:PATH");
            }
        }
        Ok(Podman {
            env: args.container_env.clone(),
            volumes: args.container_volumes.clone(),
            cdi_spec_dir,
        })
    }

    fn podman(&self) -> Command {
        let mut command = Command::new("podman");
        command.args(["--runtime", "runc", "--cgroup-manager=cgroupfs"]);
        if let Some(dir) = &self.cdi_spec_dir {
            command.arg("--cdi-spec-dir").arg(dir);
        }
        command
    }

    /// Starts the container; the child is `podman run`, whose exit status is the container's.
    pub async fn start(&self, spec: &Spec) -> anyhow::Result<Child> {
        // A container of that name left by an earlier run of the stand-in would block the name.
        self.remove(&spec.name).await;
        let log = std::fs::File::create(&spec.log)
            .with_context(|| format!("creating {}", spec.log.display()))?;
        let log_err = log.try_clone().context("duplicating the log file handle")?;
        let mut command = self.podman();
        // podman takes the first positional argument as the rootfs: every flag goes before it.
        command.args(["run", "--rm", "--name", &spec.name, "--network=none"]);
        command.args([
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=4096:4096",
        ]);
        for device in &spec.cdi_devices {
            command.args(["--device", device]);
        }
        for (key, value) in self.env.iter().chain(&spec.env) {
            command.arg("-e").arg(format!("{key}={value}"));
        }
        for volume in &self.volumes {
            command.arg("-v").arg(volume);
        }
        for (host, path) in &spec.mounts {
            command.arg("-v").arg(format!("{}:{path}", host.display()));
        }
        if let Some(dir) = &spec.working_dir {
            command.args(["--workdir", dir]);
        }
        command.args(["--rootfs", "/:O"]).args(&spec.command);
        command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true);
        command
            .spawn()
            .with_context(|| format!("starting podman for container {}", spec.name))
    }

    /// Stops a running container (SIGTERM, then SIGKILL after `grace_seconds`).
    pub async fn stop(&self, name: &str, grace_seconds: u32) {
        let status = self
            .podman()
            .args(["stop", "--ignore", "-t", &grace_seconds.to_string(), name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if let Err(e) = status {
            tracing::warn!(container = name, "podman stop: {e}");
        }
    }

    pub async fn remove(&self, name: &str) {
        let _ = self
            .podman()
            .args(["rm", "--force", "--ignore", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
    }
}

/// podman's own failures (125: podman, 126: not executable, 127: not found) are not the
/// program's exit codes; the reason names them.
pub fn exit_reason(code: i32) -> &'static str {
    match code {
        0 => "Completed",
        125 => "ContainerCannotRun",
        126 | 127 => "StartError",
        137 => "Killed",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn podman_failures_are_not_mistaken_for_the_program_s() {
        assert_eq!(super::exit_reason(0), "Completed");
        assert_eq!(super::exit_reason(1), "Error");
        assert_eq!(super::exit_reason(125), "ContainerCannotRun");
        assert_eq!(super::exit_reason(127), "StartError");
        assert_eq!(super::exit_reason(137), "Killed");
    }
}
