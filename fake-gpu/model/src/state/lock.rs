//! Open-file-description (`F_OFD_*`) record locks.
//!
//! These are `fcntl` byte-range locks owned by an open file description rather than by the
//! process. Classic POSIX locks would be wrong here twice over: closing *any* descriptor of the
//! file drops all of a process's locks on it (the fake CUDA and fake NVML libraries each open the
//! state file, often in the same process), and a process can always re-take its own lock, so it
//! could not tell its own live slot from a dead one. OFD locks are still dropped by the kernel
//! when the owning process dies, even by SIGKILL, which is what slot liveness relies on.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    Shared,
    Exclusive,
}

/// Takes a lock on one byte; `Ok(false)` when another description holds a conflicting one.
pub fn try_lock(fd: BorrowedFd<'_>, byte: i64, kind: LockKind) -> io::Result<bool> {
    match fcntl_lock(fd, byte, lock_type(kind), libc::F_OFD_SETLK) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Takes a lock on one byte, waiting for conflicting holders to let go.
pub fn lock(fd: BorrowedFd<'_>, byte: i64, kind: LockKind) -> io::Result<()> {
    loop {
        match fcntl_lock(fd, byte, lock_type(kind), libc::F_OFD_SETLKW) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            other => return other,
        }
    }
}

pub fn unlock(fd: BorrowedFd<'_>, byte: i64) -> io::Result<()> {
    fcntl_lock(fd, byte, libc::F_UNLCK as libc::c_short, libc::F_OFD_SETLK)
}

fn lock_type(kind: LockKind) -> libc::c_short {
    (match kind {
        LockKind::Shared => libc::F_RDLCK,
        LockKind::Exclusive => libc::F_WRLCK,
    }) as libc::c_short
}

fn fcntl_lock(
    fd: BorrowedFd<'_>,
    byte: i64,
    l_type: libc::c_short,
    cmd: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `flock` is plain data; zero is a valid value for every field, and OFD locks
    // require `l_pid` to be 0.
    let mut request: libc::flock = unsafe { std::mem::zeroed() };
    request.l_type = l_type;
    request.l_whence = libc::SEEK_SET as libc::c_short;
    request.l_start = byte;
    request.l_len = 1;
    // SAFETY: `fd` is a live descriptor for the duration of the borrow and `request` is a valid
    // `flock` that outlives the call.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), cmd, &mut request as *mut libc::flock) };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
