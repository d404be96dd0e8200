//! Messages to the user's stderr. Only ever on refusal paths, never on hot paths.

use std::io::Write;

/// Writes one `tessera: …` line to stderr, ignoring failures (stderr may be closed).
pub fn line(message: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "tessera: {message}");
}
