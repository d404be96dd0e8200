//! Files that the claims on one GPU share by mapping them: the compute board and the memory
//! board (`/run/tessera/board/<UUID>`, `<UUID>.memory`).

use std::ffi::CString;

/// Opens `path` (creating it, mode 0666, so processes of any user can join), grows it to `size`
/// bytes if it is shorter, and maps those bytes shared and read-write. Returns the descriptor
/// (the caller closes it, or keeps it for `fcntl` locks) and the mapping; `None` when any step
/// fails, with nothing left open.
pub fn map_shared(path: &str, size: usize) -> Option<(i32, *mut libc::c_void)> {
    let path = CString::new(path).ok()?;
    // SAFETY: a NUL-terminated path.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC,
            0o666,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: our descriptor. Growing a file others map only adds zero bytes.
    unsafe { libc::fchmod(fd, 0o666) };
    // The size by seeking rather than fstat: `fstat` is not a dynamic symbol before glibc 2.33,
    // and the shim must load into old images.
    // SAFETY: our descriptor.
    let current = unsafe { libc::lseek(fd, 0, libc::SEEK_END) };
    let sized = current >= size as libc::off_t
        // SAFETY: our descriptor.
        || (current >= 0 && unsafe { libc::ftruncate(fd, size as libc::off_t) } == 0);
    let base = if sized {
        // SAFETY: a shared mapping of `size` bytes of a file at least that long.
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        }
    } else {
        libc::MAP_FAILED
    };
    if base == libc::MAP_FAILED {
        // SAFETY: our descriptor.
        unsafe { libc::close(fd) };
        return None;
    }
    Some((fd, base))
}
