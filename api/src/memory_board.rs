//! The layout of a GPU's memory board, `<board dir>/<GPU UUID>.memory`: where the claims on an
//! overcommitted GPU publish their memory limits and, for the claims that may spill, the bytes
//! they hold on the card (see `docs/oversubscription.md`). The shim writes it; the kubelet
//! plugin reads it before preparing a claim that may not spill.
//!
//! 64 entries of 64 bytes, each four native-endian `u64`s (claim key, memory limit, flags,
//! device-resident bytes) and padding. An entry is live while a process of its claim holds a
//! shared open-file-description (`F_OFD_*`) lock on its 64 bytes: the kernel drops the lock when
//! the process dies, however it dies.

/// Entries in a board.
pub const ENTRIES: usize = 64;
/// Bytes per entry.
pub const ENTRY_SIZE: usize = 64;
/// The board file's size.
pub const FILE_SIZE: usize = ENTRIES * ENTRY_SIZE;
/// Offsets of an entry's fields.
pub const CLAIM_OFFSET: usize = 0;
pub const LIMIT_OFFSET: usize = 8;
pub const FLAGS_OFFSET: usize = 16;
pub const RESIDENT_OFFSET: usize = 24;
/// The entry's claim may spill: its resident bytes count for the card, not its limit.
pub const FLAG_SPILLS: u64 = 1;

/// The board file of GPU `uuid`.
pub fn board_file_name(uuid: &str) -> String {
    format!("{uuid}.memory")
}

/// Where containers see the kubelet plugin's reservation files: a read-only mount of a directory
/// only the plugin writes (never the board directory, which every claim can write).
pub const RESERVATIONS_DIR: &str = "/run/tessera/reservations";

/// The kubelet plugin's reservation file of GPU `uuid` (decimal bytes): what the GPU's prepared
/// claims that may not spill are owed on the card.
pub fn reservation_file_name(uuid: &str) -> String {
    format!("{uuid}.reserved")
}

/// One entry in use, as read (liveness is a lock, checked by the reader).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoardEntry {
    pub index: usize,
    pub claim: u64,
    pub limit: u64,
    pub spills: bool,
    pub resident: u64,
}

/// The entries in use (claim key ≠ 0) in a board's bytes; a short file has fewer entries.
pub fn parse_entries(bytes: &[u8]) -> Vec<BoardEntry> {
    let field = |entry: &[u8], offset: usize| {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&entry[offset..offset + 8]);
        u64::from_ne_bytes(raw)
    };
    bytes
        .chunks_exact(ENTRY_SIZE)
        .take(ENTRIES)
        .enumerate()
        .filter_map(|(index, entry)| {
            let claim = field(entry, CLAIM_OFFSET);
            (claim != 0).then(|| BoardEntry {
                index,
                claim,
                limit: field(entry, LIMIT_OFFSET),
                spills: field(entry, FLAGS_OFFSET) & FLAG_SPILLS != 0,
                resident: field(entry, RESIDENT_OFFSET),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_in_use_are_read_with_their_fields() {
        let mut board = vec![0u8; FILE_SIZE];
        let mut put = |index: usize, offset: usize, value: u64| {
            let at = index * ENTRY_SIZE + offset;
            board[at..at + 8].copy_from_slice(&value.to_ne_bytes());
        };
        put(2, CLAIM_OFFSET, 7);
        put(2, LIMIT_OFFSET, 6 << 30);
        put(2, FLAGS_OFFSET, FLAG_SPILLS);
        put(2, RESIDENT_OFFSET, 1 << 30);
        put(5, CLAIM_OFFSET, 9);
        put(5, LIMIT_OFFSET, 2 << 30);
        // A limit without a claim key is a free entry.
        put(6, LIMIT_OFFSET, 1);
        let entries = parse_entries(&board);
        assert_eq!(
            entries,
            vec![
                BoardEntry {
                    index: 2,
                    claim: 7,
                    limit: 6 << 30,
                    spills: true,
                    resident: 1 << 30
                },
                BoardEntry {
                    index: 5,
                    claim: 9,
                    limit: 2 << 30,
                    spills: false,
                    resident: 0
                },
            ]
        );
        assert_eq!(
            parse_entries(&board[..3 * ENTRY_SIZE + 10]).len(),
            1,
            "short file"
        );
    }

    proptest::proptest! {
        /// Every claim on the node can write the board: whatever is there, parsing reads at
        /// most the board's entries, in bounds, and only entries in use.
        #[test]
        fn any_bytes_parse_in_bounds(raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2 * FILE_SIZE + 100)) {
            let entries = parse_entries(&raw);
            proptest::prop_assert!(entries.len() <= ENTRIES.min(raw.len() / ENTRY_SIZE));
            for entry in &entries {
                proptest::prop_assert!(entry.index < ENTRIES);
                proptest::prop_assert!(entry.claim != 0);
            }
        }
    }
}
