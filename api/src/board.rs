//! Where the claims on a GPU meet: one small file per claim and GPU, for the compute limiter
//! (priority, activity) and for memory oversubscription (limits, bytes on the card).
//!
//! Every claim writes only its own files; it reads the others'. On a node the kubelet plugin
//! creates `<state-dir>/boards/<GPU UUID>/<claim UID>.compute` and `.memory` when it prepares a
//! claim and deletes them when it unprepares it, and the claim's CDI spec mounts
//!
//! - the whole `<state-dir>/boards` read-only at [`BOARDS_DIR`] (every claim's entries), and
//! - the claim's own two files per GPU read-write at [`OWN_BOARD_DIR`]`/<GPU UUID>.compute` and
//!   `.memory`.
//!
//! So a container can change its own entries and nobody else's, and since readers `pread` the
//! others' files (never map them), a claim that truncates or extends its own files cannot make
//! a neighbour's process fault. Without the mounts (development, tests) one directory named by
//! `TESSERA_BOARD` holds the same layout and the shim creates its own files there.

use crate::Priority;

/// Every claim's entries, read-only in a container.
pub const BOARDS_DIR: &str = "/run/tessera/boards";
/// The claim's own entries, read-write in its containers.
pub const OWN_BOARD_DIR: &str = "/run/tessera/board";

/// The two entries a claim has on each of its GPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// Priority, cores and last activity (the compute limiter).
    Compute,
    /// Memory limit, whether the claim may spill, bytes on the card (oversubscription).
    Memory,
}

impl EntryKind {
    pub const ALL: [EntryKind; 2] = [EntryKind::Compute, EntryKind::Memory];

    pub fn suffix(self) -> &'static str {
        match self {
            EntryKind::Compute => ".compute",
            EntryKind::Memory => ".memory",
        }
    }
}

/// Bytes of one entry (both kinds).
pub const ENTRY_SIZE: usize = 64;

/// The file name of `owner`'s entry in a GPU's directory of [`BOARDS_DIR`]. A compute entry's
/// name carries the priority the claim was prepared with (`<owner>.<priority>.compute`): the
/// entry itself is the claim's to write, its name is not, so readers believe an entry's
/// priority only up to its name's.
pub fn entry_file_name(owner: &str, kind: EntryKind, priority: Priority) -> String {
    match kind {
        EntryKind::Compute => format!("{owner}.{}{}", priority_name(priority), kind.suffix()),
        EntryKind::Memory => format!("{owner}{}", kind.suffix()),
    }
}

/// The priority a compute entry's file name grants; `None` for a name that does not end in
/// `.<priority>.compute`.
pub fn granted_priority(file_name: &str) -> Option<Priority> {
    let stem = file_name.strip_suffix(EntryKind::Compute.suffix())?;
    let (_, priority) = stem.rsplit_once('.')?;
    [Priority::High, Priority::Normal, Priority::Low]
        .into_iter()
        .find(|p| priority_name(*p) == priority)
}

/// Whether `file_name` is one of `owner`'s entries.
pub fn is_entry_of(file_name: &str, owner: &str) -> bool {
    file_name
        .strip_prefix(owner)
        .and_then(|rest| rest.strip_prefix('.'))
        .is_some_and(|rest| {
            rest == "memory"
                || rest
                    .strip_suffix(".compute")
                    .is_some_and(|p| !p.is_empty() && !p.contains('.'))
        })
}

fn priority_name(priority: Priority) -> &'static str {
    match priority {
        Priority::High => "high",
        Priority::Normal => "normal",
        Priority::Low => "low",
    }
}

/// The file name of the claim's own entry for GPU `uuid` in [`OWN_BOARD_DIR`].
pub fn own_entry_file_name(uuid: &str, kind: EntryKind) -> String {
    format!("{uuid}{}", kind.suffix())
}

/// Whether `name` can name a file on the board (a claim UID, a slice name, a GPU UUID): no path
/// separators, no leading dot, nothing but ASCII letters, digits, `-`, `_` and `.`.
pub fn is_board_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            entry_file_name("0b7c4a2e-1111", EntryKind::Memory, Priority::High),
            "0b7c4a2e-1111.memory"
        );
        let compute = entry_file_name("0b7c4a2e-1111", EntryKind::Compute, Priority::Low);
        assert_eq!(compute, "0b7c4a2e-1111.low.compute");
        assert_eq!(granted_priority(&compute), Some(Priority::Low));
        assert_eq!(granted_priority("x.high.compute"), Some(Priority::High));
        for bad in [
            "x.compute",
            "x.urgent.compute",
            "x.high.memory",
            "high.compute",
        ] {
            assert_eq!(granted_priority(bad), None, "{bad}");
        }
        assert!(is_entry_of("uid-1.memory", "uid-1"));
        assert!(is_entry_of("uid-1.normal.compute", "uid-1"));
        assert!(!is_entry_of("uid-10.memory", "uid-1"));
        assert!(!is_entry_of("uid-1.x.y.compute", "uid-1"));
        assert_eq!(
            own_entry_file_name("GPU-1", EntryKind::Compute),
            "GPU-1.compute"
        );
        assert!(is_board_name("GPU-4090a1b2-c3d4"));
        for bad in ["", "../x", "a/b", ".hidden", "a b", "é"] {
            assert!(!is_board_name(bad), "{bad:?}");
        }
    }
}
