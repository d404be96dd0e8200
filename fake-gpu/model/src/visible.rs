//! `CUDA_VISIBLE_DEVICES`: which of the node's GPUs a CUDA process sees, and in which order.
//!
//! The rules follow the real driver's documented behaviour: a comma-separated list of NVML
//! indices or UUIDs (`GPU-…`, any unambiguous prefix of the full UUID); devices are enumerated
//! in list order; the first entry that is invalid — out of range, unknown, ambiguous, negative
//! (`-1` is the conventional "no GPU"), a MIG UUID, or a device already listed — ends the list,
//! and the entries before it stay visible. Unset means every device in NVML order; set but
//! empty means none. NVML ignores the variable, as the real NVML does.

/// The NVML indices of the devices CUDA sees, in CUDA ordinal order.
///
/// `value` is the variable's value (`None` when unset); `uuids` are the devices' UUIDs in NVML
/// order.
pub fn visible_devices(value: Option<&str>, uuids: &[&str]) -> Vec<usize> {
    let Some(value) = value else {
        return (0..uuids.len()).collect();
    };
    let mut visible = Vec::new();
    for entry in value.split(',') {
        match resolve(entry.trim(), uuids) {
            Some(index) if !visible.contains(&index) => visible.push(index),
            _ => break,
        }
    }
    visible
}

fn resolve(entry: &str, uuids: &[&str]) -> Option<usize> {
    if entry.is_empty() {
        return None;
    }
    if entry.bytes().all(|b| b.is_ascii_digit()) {
        let index: usize = entry.parse().ok()?;
        return (index < uuids.len()).then_some(index);
    }
    if entry.len() > 4 && entry[..4].eq_ignore_ascii_case("GPU-") {
        let mut matches = uuids
            .iter()
            .enumerate()
            .filter(|(_, uuid)| starts_with_ignore_case(uuid, entry));
        let first = matches.next()?;
        // A prefix that fits two devices names neither.
        return matches.next().is_none().then_some(first.0);
    }
    None
}

fn starts_with_ignore_case(text: &str, prefix: &str) -> bool {
    text.len() >= prefix.len()
        && text.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::visible_devices;

    const UUIDS: [&str; 3] = [
        "GPU-4090a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2b",
        "GPU-40540c5d-e6f7-4a8b-9c0d-1e2f3a4b5c6d",
        "GPU-aaaa0000-0000-4000-8000-000000000002",
    ];

    fn visible(value: Option<&str>) -> Vec<usize> {
        visible_devices(value, &UUIDS)
    }

    #[test]
    fn unset_shows_everything_and_empty_shows_nothing() {
        assert_eq!(visible(None), vec![0, 1, 2]);
        assert_eq!(visible(Some("")), Vec::<usize>::new());
        assert_eq!(visible(Some("  ")), Vec::<usize>::new());
    }

    #[test]
    fn indices_filter_and_reorder() {
        assert_eq!(visible(Some("2,0")), vec![2, 0]);
        assert_eq!(visible(Some("1")), vec![1]);
        assert_eq!(visible(Some(" 1 , 2 ")), vec![1, 2]);
    }

    #[test]
    fn the_first_invalid_entry_ends_the_list() {
        assert_eq!(visible(Some("0,2,-1,1")), vec![0, 2]);
        assert_eq!(visible(Some("0,7,1")), vec![0]);
        assert_eq!(visible(Some("-1")), Vec::<usize>::new());
        assert_eq!(visible(Some("1,,2")), vec![1]);
        assert_eq!(visible(Some("1,x,2")), vec![1]);
        assert_eq!(
            visible(Some("0,1,0,2")),
            vec![0, 1],
            "a repeated device ends the list"
        );
    }

    #[test]
    fn uuids_and_unambiguous_prefixes() {
        assert_eq!(
            visible(Some("GPU-40540c5d-e6f7-4a8b-9c0d-1e2f3a4b5c6d")),
            vec![1]
        );
        assert_eq!(visible(Some("GPU-aaaa,GPU-4090")), vec![2, 0]);
        assert_eq!(
            visible(Some("gpu-4090A1B2")),
            vec![0],
            "case does not matter"
        );
        assert_eq!(visible(Some("GPU-405")), vec![1]);
        // `GPU-40` fits both the 4090 and the L40S.
        assert_eq!(visible(Some("GPU-40,1")), Vec::<usize>::new());
        assert_eq!(visible(Some("1,GPU-ffff")), vec![1]);
        assert_eq!(visible(Some("GPU-")), Vec::<usize>::new());
    }

    #[test]
    fn mixed_indices_and_uuids() {
        assert_eq!(visible(Some("2,GPU-4090a1b2")), vec![2, 0]);
        assert_eq!(
            visible(Some("0,GPU-4090a1b2")),
            vec![0],
            "the same device twice"
        );
    }

    #[test]
    fn mig_uuids_are_not_simulated() {
        assert_eq!(
            visible(Some("0,MIG-4090a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2b")),
            vec![0]
        );
    }
}
