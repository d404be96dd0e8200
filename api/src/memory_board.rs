//! The layout of a claim's memory entry on a GPU's board (see [`crate::board`]): where the
//! claims on an overcommitted GPU publish their memory limits and, for the claims that may
//! spill, the bytes they hold on the card (see `docs/oversubscription.md`). The shim writes its
//! claim's entry; other claims' shims and the kubelet plugin read it.
//!
//! 64 bytes, four native-endian `u64`s (claim key, memory limit, flags, device-resident bytes)
//! and padding. An entry is live while a process of its claim holds a shared
//! open-file-description (`F_OFD_*`) lock on its 64 bytes: the kernel drops the lock when the
//! process dies, however it dies.

/// Bytes per entry.
pub const ENTRY_SIZE: usize = crate::board::ENTRY_SIZE;
/// Offsets of an entry's fields.
pub const CLAIM_OFFSET: usize = 0;
pub const LIMIT_OFFSET: usize = 8;
pub const FLAGS_OFFSET: usize = 16;
pub const RESIDENT_OFFSET: usize = 24;
/// The entry's claim may spill: its resident bytes count for the card, not its limit.
pub const FLAG_SPILLS: u64 = 1;

/// Where containers see the kubelet plugin's reservation files: a read-only mount of a directory
/// only the plugin writes (never a board directory, where claims write their entries).
pub const RESERVATIONS_DIR: &str = "/run/tessera/reservations";

/// The kubelet plugin's reservation file of GPU `uuid` (decimal bytes): what the GPU's prepared
/// claims that may not spill are owed on the card.
pub fn reservation_file_name(uuid: &str) -> String {
    format!("{uuid}.reserved")
}

/// One entry in use, as read (liveness is a lock, checked by the reader).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoardEntry {
    pub claim: u64,
    pub limit: u64,
    pub spills: bool,
    pub resident: u64,
}

/// The entry in an entry file's bytes; `None` when it is short or not in use (claim key 0).
pub fn parse_entry(bytes: &[u8]) -> Option<BoardEntry> {
    let entry = bytes.get(..ENTRY_SIZE)?;
    let field = |offset: usize| {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&entry[offset..offset + 8]);
        u64::from_ne_bytes(raw)
    };
    let claim = field(CLAIM_OFFSET);
    (claim != 0).then(|| BoardEntry {
        claim,
        limit: field(LIMIT_OFFSET),
        spills: field(FLAGS_OFFSET) & FLAG_SPILLS != 0,
        resident: field(RESIDENT_OFFSET),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_in_use_is_read_with_its_fields() {
        let mut bytes = vec![0u8; ENTRY_SIZE];
        let mut put = |offset: usize, value: u64| {
            bytes[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
        };
        put(CLAIM_OFFSET, 7);
        put(LIMIT_OFFSET, 6 << 30);
        put(FLAGS_OFFSET, FLAG_SPILLS);
        put(RESIDENT_OFFSET, 1 << 30);
        assert_eq!(
            parse_entry(&bytes),
            Some(BoardEntry {
                claim: 7,
                limit: 6 << 30,
                spills: true,
                resident: 1 << 30
            })
        );
        assert_eq!(parse_entry(&bytes[..ENTRY_SIZE - 1]), None, "short file");
        assert_eq!(parse_entry(&[0u8; ENTRY_SIZE]), None, "not in use");
    }

    proptest::proptest! {
        /// A claim can write its own entry file: whatever is there, parsing reads at most one
        /// entry, in bounds, and only an entry in use.
        #[test]
        fn any_bytes_parse_in_bounds(raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3 * ENTRY_SIZE)) {
            if let Some(entry) = parse_entry(&raw) {
                proptest::prop_assert!(raw.len() >= ENTRY_SIZE);
                proptest::prop_assert!(entry.claim != 0);
            }
        }
    }
}
