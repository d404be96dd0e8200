//! Events injected into the fake node: an append-only log of JSON lines that the fake NVML's
//! event sets read (`nvmlEventSetWait_v2`), the way the real driver reports an XID it saw.
//!
//! One line per event, `{"uuid": "GPU-…", "xid": 79}`, written by anyone (a test, a shell's
//! `echo … >>`) at any time; the file is created when first written. A reader only takes
//! complete lines (ending in `\n`), so a half-written line is read once it is finished. Each
//! reader keeps its own offset, so every reader sees every event once, and nothing is ever
//! removed from the file. A file shorter than a reader's offset has been truncated or replaced:
//! the reader starts again at its beginning.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Names the events file; defaults to the state file's path plus `.events`.
pub const EVENTS_ENV: &str = "FAKEGPU_EVENTS";

/// Where the events file lives: `FAKEGPU_EVENTS`, else `<state>.events`.
pub fn events_path_from_env(state_path: &Path) -> PathBuf {
    if let Some(path) = std::env::var_os(EVENTS_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(path);
    }
    let mut path = state_path.as_os_str().to_owned();
    path.push(".events");
    PathBuf::from(path)
}

/// One line of the events file: an XID error on the GPU with this UUID (any case).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XidEvent {
    pub uuid: String,
    pub xid: u64,
}

/// A line of the events file as a reader finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logged {
    /// The offset at which the line starts.
    pub offset: u64,
    /// The event, or why the line is not one.
    pub event: Result<XidEvent, String>,
}

/// Appends one event in a single `write` (so concurrent writers never interleave), creating
/// the file (mode 0666, as the state file) if needed.
pub fn inject_xid(path: &Path, uuid: &str, xid: u64) -> std::io::Result<()> {
    let mut line = serde_json::to_string(&XidEvent {
        uuid: uuid.to_string(),
        xid,
    })
    .map_err(std::io::Error::other)?;
    line.push('\n');
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o666)
        .open(path)?;
    let _ = file.set_permissions(std::fs::Permissions::from_mode(0o666));
    file.write_all(line.as_bytes())
}

/// The file's length now (0 when it does not exist): where a reader that starts now begins.
pub fn end(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The complete lines from `offset` on, and the offset after the last of them; `None` when the
/// file is now shorter than `offset` (truncated, replaced or removed: start again from 0).
pub fn read_from(path: &Path, offset: u64) -> Option<(Vec<Logged>, u64)> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(_) if offset == 0 => return Some((Vec::new(), 0)),
        Err(_) => return None,
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len < offset {
        return None;
    }
    if len == offset {
        return Some((Vec::new(), offset));
    }
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(offset)).is_err() || file.read_to_end(&mut bytes).is_err() {
        return Some((Vec::new(), offset));
    }
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut logged = Vec::new();
    let mut start = 0;
    for line in bytes[..complete].split_inclusive(|&b| b == b'\n') {
        let line_offset = offset + start as u64;
        start += line.len();
        let text = String::from_utf8_lossy(line);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let event = serde_json::from_str::<XidEvent>(text).map_err(|e| e.to_string());
        logged.push(Logged {
            offset: line_offset,
            event,
        });
    }
    Some((logged, offset + complete as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_read_once_complete_and_from_an_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.state.events");
        assert_eq!(end(&path), 0);
        assert_eq!(read_from(&path, 0), Some((Vec::new(), 0)));
        assert_eq!(read_from(&path, 5), None, "no file: start again");
        inject_xid(&path, "GPU-a", 79).expect("inject");
        let first = end(&path);
        // A half-written line, a bad line and a blank one.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| {
                f.write_all(b"\n{\"uuid\": \"GPU-b\", \"xid\": 13, \"x\": 1}\n{\"uuid\"")
            })
            .expect("append");
        let (lines, next) = read_from(&path, 0).expect("read");
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0],
            Logged {
                offset: 0,
                event: Ok(XidEvent {
                    uuid: "GPU-a".into(),
                    xid: 79
                })
            }
        );
        assert_eq!(lines[1].offset, first + 1);
        assert!(
            lines[1]
                .event
                .as_ref()
                .unwrap_err()
                .contains("unknown field")
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b": \"GPU-c\", \"xid\": 48}\n"))
            .expect("finish the line");
        let (lines, last) = read_from(&path, next).expect("read");
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].offset, next);
        assert_eq!(lines[0].event.as_ref().unwrap().xid, 48);
        assert_eq!(last, end(&path));
        assert_eq!(read_from(&path, last), Some((Vec::new(), last)));
        std::fs::write(&path, b"").expect("truncate");
        assert_eq!(read_from(&path, last), None, "truncated: start again");
    }

    #[test]
    fn the_path_defaults_next_to_the_state_file() {
        if std::env::var_os(EVENTS_ENV).is_none() {
            assert_eq!(
                events_path_from_env(Path::new("/tmp/n.json.state")),
                PathBuf::from("/tmp/n.json.state.events")
            );
        }
    }
}
