//! What a CUDA context costs on each GPU (`--context-overhead`), measured at start-up by
//! `tessera-gpu-probe` or set by the admin, and written into every claim's shim config so the
//! shim charges it per context against the claim's wall. Without it a card filled with slices
//! overflows by one context per process, and a neighbour meets the driver's out-of-memory
//! inside its own limit.

use crate::gpu_probe::Report;
use tessera_driver::Inventory;

/// Used where the probe could not measure a GPU: above what a bare context takes on current
/// GPUs and drivers (a few hundred MiB), so a card of slices errs on the side of room.
pub const FALLBACK: u64 = 512 << 20;

/// `--context-overhead`: `auto` or a quantity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// Measure each GPU with the probe.
    Auto,
    /// The admin's figure for every GPU (for example to cover large module images).
    Fixed(u64),
}

impl std::str::FromStr for Setting {
    type Err = String;

    fn from_str(text: &str) -> Result<Setting, String> {
        if text == "auto" {
            return Ok(Setting::Auto);
        }
        tessera_driver::quantity::parse(text)
            .map(Setting::Fixed)
            .map_err(|e| format!("{e}; expected auto or a quantity such as 600Mi"))
    }
}

/// Where a GPU's figure came from; the `source` label of `tessera_gpu_context_overhead_bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Measured,
    /// `--context-overhead=<quantity>`.
    Configured,
    /// The probe failed on this GPU: [`FALLBACK`].
    Fallback,
    /// A fake inventory without a driver to measure (`--inventory` without `--nvml-library`).
    Unmeasured,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Measured => "measured",
            Source::Configured => "configured",
            Source::Fallback => "fallback",
            Source::Unmeasured => "unmeasured",
        }
    }
}

/// Fills `context_overhead` of every GPU of `inventory` and says where each figure came from.
/// `probe` is the probe's report (or why there is none); `None` where there is no driver.
pub fn resolve(
    setting: Setting,
    inventory: &mut Inventory,
    probe: Option<&Result<Report, String>>,
) -> Vec<(String, Source)> {
    let empty = Report::default();
    let (figures, error) = match (setting, probe) {
        (Setting::Fixed(bytes), _) => {
            return set_all(inventory, bytes, Source::Configured);
        }
        (Setting::Auto, None) => {
            tracing::info!(
                "no driver to measure a CUDA context on (--inventory without --nvml-library): claims are charged nothing per context"
            );
            return set_all(inventory, 0, Source::Unmeasured);
        }
        (Setting::Auto, Some(Ok(report))) => (report, None),
        (Setting::Auto, Some(Err(error))) => (&empty, Some(error)),
    };
    if let Some(error) = &error {
        tracing::warn!(%error, fallback = FALLBACK, "cannot measure what a CUDA context costs; charging the fallback per context (set --context-overhead to choose the figure)");
    }
    let mut sources = Vec::with_capacity(inventory.gpus.len());
    for gpu in &mut inventory.gpus {
        let measured = figures
            .gpus
            .iter()
            .find(|m| m.uuid == gpu.uuid)
            .map(|m| m.context_overhead)
            // The probe is ours, but a figure above the card is no measurement.
            .filter(|bytes| *bytes < gpu.memory);
        let source = match measured {
            Some(bytes) => {
                gpu.context_overhead = bytes;
                tracing::info!(index = gpu.index, uuid = %gpu.uuid, bytes, "CUDA context cost measured");
                Source::Measured
            }
            None => {
                gpu.context_overhead = FALLBACK.min(gpu.memory);
                if error.is_none() {
                    let why = figures
                        .errors
                        .iter()
                        .find(|f| f.uuid == gpu.uuid)
                        .map(|f| f.error.as_str())
                        .unwrap_or("the probe did not report it");
                    tracing::warn!(index = gpu.index, uuid = %gpu.uuid, error = why, fallback = FALLBACK, "cannot measure what a CUDA context costs on this GPU; charging the fallback");
                }
                Source::Fallback
            }
        };
        sources.push((gpu.uuid.clone(), source));
    }
    sources
}

fn set_all(inventory: &mut Inventory, bytes: u64, source: Source) -> Vec<(String, Source)> {
    inventory
        .gpus
        .iter_mut()
        .map(|gpu| {
            gpu.context_overhead = bytes;
            (gpu.uuid.clone(), source)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    #[test]
    fn the_setting_is_auto_or_a_quantity() {
        assert_eq!("auto".parse::<Setting>(), Ok(Setting::Auto));
        assert_eq!("600Mi".parse::<Setting>(), Ok(Setting::Fixed(600 << 20)));
        assert_eq!("0".parse::<Setting>(), Ok(Setting::Fixed(0)));
        let error = "lots".parse::<Setting>().expect_err("not a quantity");
        assert!(error.contains("auto or a quantity"), "{error}");
    }

    fn node() -> Inventory {
        crate::test_inventory(&[24 << 30, 1 << 30, 48 << 30])
    }

    /// A stand-in probe printing `report`.
    fn script(dir: &Path, report: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("probe");
        std::fs::write(&path, format!("#!/bin/sh\ncat <<'EOF'\n{report}\nEOF\n")).expect("script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    async fn probe(program: &Path) -> Result<Report, String> {
        crate::gpu_probe::run(&crate::gpu_probe::Probe {
            program,
            nvml_library: None,
            cuda_library: None,
        })
        .await
    }

    #[tokio::test]
    async fn each_gpu_gets_its_measured_figure_and_the_rest_the_fallback() {
        let dir = tempfile::tempdir().expect("tempdir");
        // GPU-1's figure is above its card: no measurement. GPU-2 failed.
        let program = script(
            dir.path(),
            r#"{"gpus":[{"uuid":"GPU-0","contextOverhead":314572800,"method":"process"},{"uuid":"GPU-1","contextOverhead":2147483648,"method":"device"}],"errors":[{"uuid":"GPU-2","error":"busy"}]}"#,
        );
        let mut inventory = node();
        let report = probe(&program).await;
        let sources = resolve(Setting::Auto, &mut inventory, Some(&report));
        let figures: Vec<u64> = inventory.gpus.iter().map(|g| g.context_overhead).collect();
        assert_eq!(figures, [300 << 20, FALLBACK, FALLBACK]);
        let labels: Vec<Source> = sources.iter().map(|(_, s)| *s).collect();
        assert_eq!(
            labels,
            [Source::Measured, Source::Fallback, Source::Fallback]
        );
    }

    #[tokio::test]
    async fn a_probe_that_fails_or_prints_nonsense_leaves_every_gpu_the_fallback() {
        let dir = tempfile::tempdir().expect("tempdir");
        for program in [
            PathBuf::from("/bin/false"),
            PathBuf::from("/nonexistent/tessera-gpu-probe"),
            script(dir.path(), "not json"),
        ] {
            let mut inventory = node();
            let report = probe(&program).await;
            let sources = resolve(Setting::Auto, &mut inventory, Some(&report));
            assert!(
                sources.iter().all(|(_, s)| *s == Source::Fallback),
                "{program:?}"
            );
            // Never more than the card itself.
            assert_eq!(inventory.gpus[1].context_overhead, FALLBACK.min(1 << 30));
        }
    }

    #[tokio::test]
    async fn a_fixed_figure_is_not_measured_and_no_driver_means_nothing_charged() {
        let mut inventory = node();
        let report = probe(Path::new("/bin/false")).await;
        let sources = resolve(Setting::Fixed(600 << 20), &mut inventory, Some(&report));
        assert!(
            inventory
                .gpus
                .iter()
                .all(|g| g.context_overhead == 600 << 20)
        );
        assert!(sources.iter().all(|(_, s)| *s == Source::Configured));
        let sources = resolve(Setting::Auto, &mut inventory, None);
        assert!(inventory.gpus.iter().all(|g| g.context_overhead == 0));
        assert!(sources.iter().all(|(_, s)| *s == Source::Unmeasured));
    }
}
