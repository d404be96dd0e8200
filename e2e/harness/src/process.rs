//! One component as a child process in its own process group, with its output
//! in a log file and its pid in a pid file.
//!
//! A [`Process`] stops its process group when dropped, so a panicking test
//! leaves nothing behind; [`Process::detach`] opts out for `tessera-cluster up`,
//! whose processes outlive it and are stopped later from their pid files by
//! [`stop_pid_file`].

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use crate::error::{Error, Result};

/// How to start one component.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub log: PathBuf,
    pub pid_file: PathBuf,
    /// Set in the process's environment, over the harness's own.
    pub env: Vec<(OsString, OsString)>,
}

/// A running component.
#[derive(Debug)]
pub struct Process {
    name: String,
    pid: i32,
    child: Child,
    log: PathBuf,
    pid_file: PathBuf,
    /// Set once the process has been reaped or handed over; Drop then does nothing.
    done: bool,
}

impl Process {
    /// Starts the component in a new process group (so that signals from a
    /// terminal reach only the harness, and stopping it reaches everything it
    /// may have started), output appended to its log.
    pub fn spawn(spec: ProcessSpec) -> Result<Self> {
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .map_err(Error::io(&spec.log, "opening log"))?;
        let command_line = std::iter::once(spec.program.as_os_str())
            .chain(spec.args.iter().map(|a| a.as_os_str()))
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        writeln!(log, "=== tessera-e2e-harness: starting {command_line}")
            .map_err(Error::io(&spec.log, "writing log"))?;
        let stderr = log
            .try_clone()
            .map_err(Error::io(&spec.log, "duplicating log handle"))?;

        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(&spec.program)
                .args(&spec.args)
                .envs(spec.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(Stdio::from(log))
                .stderr(Stdio::from(stderr))
                .process_group(0)
                .spawn()
                .map_err(Error::io(&spec.program, "starting"))?
        };
        let pid = i32::try_from(child.id()).map_err(|_| Error::State {
            dir: spec.pid_file.clone(),
            reason: format!("pid {} does not fit an i32", child.id()),
        })?;
        let process = Process {
            name: spec.name,
            pid,
            child,
            log: spec.log,
            pid_file: spec.pid_file,
            done: false,
        };
        // Written after spawn: if this fails, Drop still stops the child.
        fs::write(&process.pid_file, format!("{pid}\n"))
            .map_err(Error::io(&process.pid_file, "writing pid file"))?;
        Ok(process)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    pub fn pid_file(&self) -> &Path {
        &self.pid_file
    }

    /// `Some(status)` once the process has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.done = true;
                Some(status)
            }
            // An error here means the child was already reaped: treat as gone.
            Err(_) => {
                self.done = true;
                Some(ExitStatus::default())
            }
            Ok(None) => None,
        }
    }

    /// An error carrying the log tail if the process is no longer running.
    pub fn check_running(&mut self) -> Result<()> {
        match self.exit_status() {
            None => Ok(()),
            Some(status) => Err(Error::ComponentExited {
                name: self.name.clone(),
                status: status.to_string(),
                log: self.log.clone(),
                tail: log_tail(&self.log, 40),
            }),
        }
    }

    /// Sends `signal` to the whole process group.
    pub fn signal(&self, signal: Signal) {
        // ESRCH: already gone, which is what we want anyway.
        let _ = killpg(Pid::from_raw(self.pid), signal);
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.done || self.exit_status().is_some() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; removes the pid file.
    pub fn stop(&mut self, grace: Duration) {
        stop_all(std::slice::from_mut(self), grace);
    }

    /// Leaves the process running past the life of this handle; returns its pid.
    pub fn detach(mut self) -> i32 {
        self.done = true;
        self.pid
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if !self.done {
            self.stop(Duration::from_secs(5));
        }
    }
}

/// Stops several processes at once: SIGTERM to all, one shared grace period,
/// then SIGKILL for whatever is left. Always reaps and removes pid files.
pub fn stop_all(processes: &mut [Process], grace: Duration) {
    for p in processes.iter_mut().filter(|p| !p.done) {
        p.signal(Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    for p in processes.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        if !p.wait_exit(left) {
            tracing::warn!(component = %p.name, pid = p.pid, "did not stop on SIGTERM, killing");
            p.signal(Signal::SIGKILL);
            let _ = p.child.wait();
        }
        // The group may hold more than the leader; they get the same fate.
        p.signal(Signal::SIGKILL);
        p.done = true;
        let _ = fs::remove_file(&p.pid_file);
    }
}

/// Stops a process started by an earlier, detached run, from its pid file.
///
/// `owner_marker` must occur in the process's command line (the state
/// directory path does): a pid file outlives its process, and the pid may
/// since belong to something else. Returns whether a process was stopped.
pub fn stop_pid_file(
    name: &str,
    pid_file: &Path,
    owner_marker: &str,
    grace: Duration,
) -> Result<bool> {
    let text = match fs::read_to_string(pid_file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(pid_file, "reading pid file")(e)),
    };
    let pid: i32 = text.trim().parse().map_err(|_| Error::State {
        dir: pid_file.to_owned(),
        reason: format!("pid file holds {:?}, not a pid", text.trim()),
    })?;
    if !is_alive(pid) || !cmdline(pid).contains(owner_marker) {
        let _ = fs::remove_file(pid_file);
        return Ok(false);
    }
    let group = Pid::from_raw(pid);
    let stop_err = |reason: String| Error::Stop {
        name: name.to_owned(),
        pid,
        reason,
    };
    match killpg(group, Signal::SIGTERM) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => return Err(stop_err(format!("SIGTERM: {e}"))),
    }
    let deadline = Instant::now() + grace;
    while is_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = killpg(group, Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_alive(pid) {
        if Instant::now() >= deadline {
            return Err(stop_err("still running after SIGKILL".to_owned()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = fs::remove_file(pid_file);
    Ok(true)
}

/// Whether `pid` names a live (not zombie) process.
pub fn is_alive(pid: i32) -> bool {
    match kill(Pid::from_raw(pid), None) {
        Err(Errno::ESRCH) => false,
        // EPERM: exists but not ours; still alive.
        Ok(()) | Err(_) => {
            // A zombie answers signals until its parent reaps it; a detached
            // component's parent is init, which may be slow to do so.
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
    }
}

fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .unwrap_or_default()
}

/// The last `lines` lines of a log file (reads at most the last 64 KiB).
pub fn log_tail(path: &Path, lines: usize) -> String {
    const WINDOW: u64 = 64 * 1024;
    let read = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(WINDOW)))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            all[start..]
                .iter()
                .map(|l| format!("    | {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        }
        Err(e) => format!("    (cannot read {}: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, name: &str, script: &str) -> ProcessSpec {
        ProcessSpec {
            name: name.to_owned(),
            program: PathBuf::from("/bin/sh"),
            args: vec!["-c".into(), script.into()],
            log: dir.join(format!("{name}.log")),
            pid_file: dir.join(format!("{name}.pid")),
            env: Vec::new(),
        }
    }

    #[test]
    fn drop_kills_the_whole_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The grandchild is what a naive kill(pid) would leave behind.
        let grandchild_file = dir.path().join("grandchild");
        let script = format!(
            "sleep 300 & echo $! > '{}'; wait",
            grandchild_file.display()
        );
        let p = Process::spawn(spec(dir.path(), "sleeper", &script)).expect("spawn");
        let leader = p.pid();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !grandchild_file.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(50));
        let grandchild: i32 = fs::read_to_string(&grandchild_file)
            .expect("pid")
            .trim()
            .parse()
            .expect("number");
        assert!(is_alive(grandchild));
        drop(p);
        assert!(!is_alive(leader));
        let deadline = Instant::now() + Duration::from_secs(5);
        while is_alive(grandchild) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!is_alive(grandchild), "grandchild {grandchild} survived");
        assert!(!dir.path().join("sleeper.pid").exists());
    }

    #[test]
    fn early_exit_reports_the_log_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = Process::spawn(spec(
            dir.path(),
            "failer",
            "echo 'unknown flag: --bogus' >&2; exit 3",
        ))
        .expect("spawn");
        assert!(p.wait_exit(Duration::from_secs(5)));
        let err = p.check_running().expect_err("exited");
        let text = err.to_string();
        assert!(text.contains("failer exited"), "{text}");
        assert!(text.contains("unknown flag: --bogus"), "{text}");
    }

    #[test]
    fn stop_pid_file_checks_the_owner() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().to_string_lossy().into_owned();
        let s = spec(dir.path(), "detached", &format!("sleep 300 # {marker}"));
        let pid_file = s.pid_file.clone();
        let pid = Process::spawn(s).expect("spawn").detach();
        // Until the child has exec'd, its command line is ours, without the marker.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cmdline(pid).contains(&marker) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            !stop_pid_file(
                "detached",
                &pid_file,
                "/not/this/state",
                Duration::from_secs(1)
            )
            .expect("stop")
        );
        // The wrong-owner check removed the file; write it back to stop for real.
        fs::write(&pid_file, format!("{pid}\n")).expect("pid file");
        // Our own child: reap it in the background so it does not linger as a zombie.
        let reaper = std::thread::spawn(move || {
            let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
        });
        assert!(
            stop_pid_file("detached", &pid_file, &marker, Duration::from_secs(5)).expect("stop")
        );
        reaper.join().expect("reaper");
        assert!(!is_alive(pid));
        assert!(!pid_file.exists());
    }
}
