//! Debian's `promtool` (`e2e/scripts/install-promtool.sh`): what classic Prometheus tooling
//! makes of the metrics Tessera serves.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::binaries::cache_root;

/// Where the script installs it.
pub fn path() -> PathBuf {
    cache_root().join("tools/prometheus/promtool")
}

/// `promtool`, or `None` where `test` may skip without it (see `tessera_built_libs::require`).
pub fn require(test: &str) -> Option<PathBuf> {
    let path = path();
    tessera_built_libs::require(test, path.is_file(), || {
        format!(
            "promtool is not installed in {} (run e2e/scripts/install-promtool.sh)",
            path.display()
        )
    })?;
    Some(path)
}

/// `promtool check metrics` of `text` (the classic text format): `Err` with promtool's output
/// when it reports any problem, lint included.
pub fn check_metrics(promtool: &Path, text: &str) -> Result<(), String> {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", promtool.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| format!("writing to promtool: {e}"))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| format!("waiting for promtool: {e}"))?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!(
            "promtool check metrics ({}): {said}",
            output.status
        ))
    }
}

/// Runs promtool with `args` in `dir` (`check rules`, `test rules`): its output, or on failure
/// its output as the error.
pub fn run(promtool: &Path, dir: &Path, args: &[&str]) -> Result<String, String> {
    let output = Command::new(promtool)
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("running {}: {e}", promtool.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}
