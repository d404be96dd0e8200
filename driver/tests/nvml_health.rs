//! `nvml::HealthProbe` against the project's fake NVML: the node's GPUs are found healthy by
//! UUID, a GPU NVML does not know is reported gone (and withdrawn by the tracker), and an NVML
//! without XID events is an error the caller can do without, not a crash.
//!
//! The fake NVML reads its node from `FAKEGPU_CONFIG` at initialisation, so the probe runs in a
//! child process (this test binary again) with that environment. Skipped when the fake NVML is
//! not built, unless `TESSERA_E2E=1`.

use std::path::PathBuf;
use std::process::Command;

use tessera_driver::health::{Change, GONE, Health, HealthTracker};
use tessera_driver::{Gpu, nvml};

const CHILD: &str = "TESSERA_NVML_HEALTH_CHILD";
const GPU0: &str = "GPU-4090a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2b";
const GPU1: &str = "GPU-40540c5d-e6f7-4a8b-9c0d-1e2f3a4b5c6d";
const MISSING: &str = "GPU-ffffffff-ffff-4fff-8fff-ffffffffffff";

fn fake_nvml() -> Option<PathBuf> {
    tessera_built_libs::fake_nvml("NVML health")
}

#[test]
fn the_probe_sees_the_fake_node() {
    let Some(lib) = fake_nvml() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("node.json");
    std::fs::write(
        &config,
        serde_json::json!({"driverVersion": "570.86.15", "devices": [
            {"uuid": GPU0, "name": "NVIDIA GeForce RTX 4090", "memory": 24u64 << 30, "pciBusId": "0000:01:00.0"},
            {"uuid": GPU1, "name": "NVIDIA L40S", "memory": 48u64 << 30, "pciBusId": "0000:41:00.0"}]})
        .to_string(),
    )
    .expect("config");
    let out = Command::new(std::env::current_exe().expect("test executable"))
        .args(["--exact", "child_probe", "--nocapture", "--test-threads=1"])
        .env(CHILD, &lib)
        .env("FAKEGPU_CONFIG", &config)
        .env("FAKEGPU_STATE", dir.path().join("state"))
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs only as the child of [`the_probe_sees_the_fake_node`].
#[test]
fn child_probe() {
    let Some(lib) = std::env::var_os(CHILD) else {
        return;
    };
    let mut known = nvml::discover(Some(&lib)).expect("the fake node through NVML");
    assert_eq!(known.gpus.len(), 2);
    let mut missing: Gpu = known.gpus[1].clone();
    missing.uuid = MISSING.into();
    missing.index = 2;
    known.gpus.push(missing);

    let probe = nvml::HealthProbe::open(Some(&lib)).expect("NVML");
    let look = probe.observe(&known);
    assert_eq!(look.seen.get(GPU0), Some(&Health::Healthy));
    assert_eq!(look.seen.get(GPU1), Some(&Health::Healthy));
    assert!(!look.seen.contains_key(MISSING), "{look:?}");

    let mut tracker = HealthTracker::new(known.clone());
    assert_eq!(
        tracker.observe(look),
        [Change::Withdrawn {
            uuid: MISSING.into(),
            index: 2,
            reason: GONE.into()
        }]
    );
    assert_eq!(tracker.offered().gpus.len(), 2);

    // The fake NVML has no event sets: an error to log, then polling only.
    known.gpus.pop();
    match probe.xid_events(&known) {
        Err(e) => eprintln!("no XID events, as expected of the fake: {e}"),
        Ok(events) => {
            let next = events.wait(std::time::Duration::from_millis(10));
            eprintln!("XID events registered; next: {next:?}");
            assert!(
                matches!(next, Ok(None) | Err(_)),
                "no XID on a fake: {next:?}"
            );
        }
    }
}
