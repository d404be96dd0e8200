//! The `tessera` binary: generate, list and remove slices from a fake inventory file or the
//! fake NVML, and an error that names the problem for every bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const GPU0: &str = "GPU-4090a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2b";
const GPU1: &str = "GPU-40540c5d-e6f7-4a8b-9c0d-1e2f3a4b5c6d";
const GIB: u64 = 1 << 30;

fn inventory_json() -> String {
    serde_json::json!({
        "driverVersion": "570.86.15",
        "devices": [
            {"uuid": GPU0, "name": "NVIDIA GeForce RTX 4090", "memory": 24 * GIB, "pciBusId": "0000:01:00.0", "computeCapability": "8.9"},
            {"uuid": GPU1, "name": "NVIDIA L40S", "memory": 48 * GIB, "pciBusId": "0000:41:00.0", "computeCapability": "8.9"},
        ]
    })
    .to_string()
}

struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("inventory.json"), inventory_json()).expect("inventory");
        std::fs::create_dir_all(dir.path().join("cdi")).expect("CDI directory");
        // Any ELF file passes for the shim here; the podman test uses the real one.
        std::fs::copy(
            std::env::current_exe().expect("test exe"),
            dir.path().join("libtessera.so"),
        )
        .expect("shim stand-in");
        Host { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn tessera(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(args)
            .env("TESSERA_CDI_DIR", self.path("cdi"))
            .env("TESSERA_STATE_DIR", self.path("state"))
            .env("TESSERA_SHIM", self.path("libtessera.so"))
            .output()
            .expect("run tessera")
    }

    /// `tessera cdi generate` from the inventory file, with the toolkit providing the GPU.
    fn generate(&self, extra: &[&str]) -> Output {
        let inventory = self.path("inventory.json");
        let mut args = vec![
            "cdi",
            "generate",
            "--inventory",
            inventory.to_str().expect("utf-8"),
            "--toolkit",
        ];
        args.extend_from_slice(extra);
        self.tessera(&args)
    }
}

fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "tessera failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn fails(output: &Output) -> String {
    assert!(!output.status.success(), "tessera should have failed");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn spec(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("spec")).expect("spec JSON")
}

#[test]
fn generate_list_remove() {
    let host = Host::new();
    let out = ok(&host.generate(&[
        "--name", "web", "--gpu", "1", "--memory", "4Gi", "--cores", "25",
    ]));
    assert!(out.contains("--device gpu.tessera.dev/slice=web"), "{out}");
    assert!(
        out.contains(&format!("--device nvidia.com/gpu={GPU1}")),
        "{out}"
    );

    let spec = spec(&host.path("cdi/tessera-slice-web.json"));
    assert_eq!(spec["kind"], "gpu.tessera.dev/slice");
    assert_eq!(spec["devices"][0]["name"], "web");
    assert_eq!(
        spec["devices"][0]["containerEdits"]["env"][0],
        format!("TESSERA_GPU_1={GPU1}")
    );
    let mounts = spec["containerEdits"]["mounts"].as_array().expect("mounts");
    let mounted = |container: &str| {
        mounts
            .iter()
            .find(|m| m["containerPath"] == container)
            .and_then(|m| m["hostPath"].as_str())
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("{container} not mounted: {mounts:?}"))
    };
    assert_eq!(
        mounted("/etc/tessera/config.json"),
        host.path("state/slices/web/config.json")
    );
    assert_eq!(
        mounted("/etc/ld.so.preload"),
        host.path("state/lib/ld.so.preload")
    );
    assert!(mounted("/usr/lib/tessera/libtessera.so").exists());
    assert!(mounted("/etc/tessera/region").exists());
    let config = tessera_api::ShimConfig::from_json(
        &std::fs::read(host.path("state/slices/web/config.json")).expect("config"),
    )
    .expect("a valid shim config");
    assert_eq!(config.claim_uid, "web");
    assert_eq!(config.region, "/etc/tessera/region");
    assert_eq!(
        (
            config.devices[0].uuid.as_str(),
            config.devices[0].memory_limit,
            config.devices[0].cores
        ),
        (GPU1, 4 * GIB, 25)
    );

    assert_eq!(config.priority, tessera_api::Priority::Normal);

    // By UUID, with a priority and a core policy; the same name again is refused.
    ok(&host.generate(&[
        "--name",
        "capped",
        "--gpu",
        GPU0,
        "--memory",
        "1Gi",
        "--cores",
        "10",
        "--priority",
        "low",
        "--core-policy",
        "force",
    ]));
    let capped = tessera_api::ShimConfig::from_json(
        &std::fs::read(host.path("state/slices/capped/config.json")).expect("config"),
    )
    .expect("a valid shim config");
    assert_eq!(
        (capped.priority, capped.core_policy),
        (tessera_api::Priority::Low, tessera_api::CorePolicy::Force)
    );
    ok(&host.tessera(&["cdi", "remove", "--name", "capped"]));
    let err = fails(&host.generate(&[
        "--name",
        "x",
        "--gpu",
        "0",
        "--memory",
        "1Gi",
        "--priority",
        "urgent",
    ]));
    assert!(
        err.contains("--priority") && err.contains("urgent"),
        "{err}"
    );
    ok(&host.generate(&["--name", "batch", "--gpu", GPU0, "--memory", "512Mi"]));
    let err = fails(&host.generate(&["--name", "web", "--gpu", "0", "--memory", "1Gi"]));
    assert!(
        err.contains("\"web\" already exists") && err.contains("tessera cdi remove --name web"),
        "{err}"
    );

    let list = ok(&host.tessera(&["cdi", "list"]));
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 3, "{list}");
    assert!(
        lines[1].starts_with("batch") && lines[1].contains("512Mi") && lines[1].contains(GPU0),
        "{list}"
    );
    assert!(
        lines[2].starts_with("web") && lines[2].contains("4Gi") && lines[2].contains(" 25 "),
        "{list}"
    );

    ok(&host.tessera(&["cdi", "remove", "--name", "web"]));
    assert!(!host.path("cdi/tessera-slice-web.json").exists());
    assert!(!host.path("state/slices/web").exists());
    let err = fails(&host.tessera(&["cdi", "remove", "--name", "web"]));
    assert!(err.contains("no slice \"web\""), "{err}");
    assert!(!ok(&host.tessera(&["cdi", "list"])).contains("web"));
}

#[test]
fn bad_input_is_refused_naming_the_problem() {
    let host = Host::new();
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--name", "a", "--gpu", "7", "--memory", "1Gi"],
            &["--gpu 7", "no such GPU", GPU0, GPU1],
        ),
        (
            &["--name", "a", "--gpu", "GPU-nope", "--memory", "1Gi"],
            &["--gpu GPU-nope", "no such GPU"],
        ),
        (
            &["--name", "a", "--gpu", "first", "--memory", "1Gi"],
            &["--gpu \"first\"", "index", "UUID"],
        ),
        (
            &["--name", "a", "--gpu", "0", "--memory", "25Gi"],
            &["--memory 25Gi", "GPU 0", "NVIDIA GeForce RTX 4090", "24Gi"],
        ),
        (
            &["--name", "a", "--gpu", "0", "--memory", "4GB"],
            &["--memory \"4GB\""],
        ),
        (
            &["--name", "a", "--gpu", "0", "--memory", "0"],
            &["--memory \"0\"", "more than 0"],
        ),
        (
            &[
                "--name", "a", "--gpu", "0", "--memory", "1Gi", "--cores", "0",
            ],
            &["--cores 0", "1 to 100"],
        ),
        (
            &[
                "--name", "a", "--gpu", "0", "--memory", "1Gi", "--cores", "101",
            ],
            &["--cores 101", "1 to 100"],
        ),
        (
            &["--name", "../etc", "--gpu", "0", "--memory", "1Gi"],
            &["--name \"../etc\""],
        ),
    ];
    for (args, expected) in cases {
        let err = fails(&host.generate(args));
        for e in *expected {
            assert!(err.contains(e), "{args:?}: {e:?} not in {err:?}");
        }
    }
    let specs = std::fs::read_dir(host.path("cdi"))
        .expect("CDI directory")
        .count();
    assert!(
        specs == 0 && !host.path("state/slices").exists(),
        "nothing written"
    );

    // No driver under the roots (without --toolkit).
    let inventory = host.path("inventory.json");
    let empty = host.path("empty-root");
    std::fs::create_dir_all(&empty).expect("dir");
    let err = fails(&host.tessera(&[
        "cdi",
        "generate",
        "--inventory",
        inventory.to_str().expect("utf-8"),
        "--name",
        "web",
        "--gpu",
        "0",
        "--memory",
        "1Gi",
        "--driver-root",
        empty.to_str().expect("utf-8"),
        "--dev-root",
        empty.to_str().expect("utf-8"),
    ]));
    assert!(
        err.contains("libcuda.so.1") && err.contains("--toolkit"),
        "{err}"
    );
    // Only flags this command has: `--cdi-mode` is the plugin's.
    assert!(!err.contains("--cdi-mode"), "{err}");

    // A CDI directory that does not exist and is not one a runtime reads by default (a typo,
    // or one under a file) is refused, not made: no runtime would read the spec.
    std::fs::write(host.path("blocker"), b"").expect("file");
    for (dir, named) in [("cdii", "cdii"), ("blocker/cdi", "blocker/cdi")] {
        let dir = host.path(dir);
        let err = fails(&host.generate(&[
            "--name",
            "web",
            "--gpu",
            "0",
            "--memory",
            "1Gi",
            "--cdi-dir",
            dir.to_str().expect("utf-8"),
        ]));
        assert!(
            err.contains("--cdi-dir") && err.contains(named) && err.contains("does not exist"),
            "{err}"
        );
        assert!(!dir.exists(), "{} was made", dir.display());
        assert!(!host.path("state/slices/web").exists(), "nothing written");
    }
}

/// Slices on one GPU that together promise more than the card are made, with a warning naming
/// the total, the card and the other slices; within the card, no warning.
#[test]
fn slices_promising_more_than_the_card_are_warned_about() {
    let host = Host::new();
    let first = host.generate(&["--name", "a", "--gpu", "0", "--memory", "10Gi"]);
    ok(&first);
    assert!(
        !String::from_utf8_lossy(&first.stderr).contains("warning"),
        "{first:?}"
    );
    let second = host.generate(&["--name", "b", "--gpu", "0", "--memory", "10Gi"]);
    ok(&second);
    assert!(
        !String::from_utf8_lossy(&second.stderr).contains("warning"),
        "20 of 24 GiB: {second:?}"
    );
    // Another GPU's slice does not count.
    ok(&host.generate(&["--name", "other", "--gpu", "1", "--memory", "40Gi"]));
    let third = host.generate(&["--name", "c", "--gpu", "0", "--memory", "6Gi"]);
    ok(&third);
    let warning = String::from_utf8_lossy(&third.stderr);
    assert!(
        warning.contains(
            "the slices on GPU 0 now promise 26Gi of its 24Gi (a 10Gi, b 10Gi, and this one)"
        ),
        "{warning}"
    );
}

fn fake_nvml() -> Option<PathBuf> {
    tessera_built_libs::fake_nvml("CLI on NVML")
}

#[test]
fn gpus_come_from_nvml() {
    let Some(nvml) = fake_nvml() else {
        return;
    };
    let host = Host::new();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["cdi", "generate", "--toolkit", "--nvml-library"])
            .arg(&nvml)
            .args(args)
            .env("FAKEGPU_CONFIG", host.path("inventory.json"))
            .env("FAKEGPU_STATE", host.path("fakegpu.state"))
            .env("TESSERA_CDI_DIR", host.path("cdi"))
            .env("TESSERA_STATE_DIR", host.path("state"))
            .env("TESSERA_SHIM", host.path("libtessera.so"))
            .output()
            .expect("run tessera")
    };
    let out = ok(&run(&["--name", "web", "--gpu", GPU1, "--memory", "40Gi"]));
    assert!(out.contains("GPU 1 (NVIDIA L40S"), "{out}");
    let err = fails(&run(&["--name", "big", "--gpu", "0", "--memory", "30Gi"]));
    assert!(err.contains("has only 24Gi"), "{err}");
}

/// `--context-overhead`: the figure goes into the slice's config and region, and a wall below one
/// context is refused, naming both.
#[test]
fn each_context_is_charged_what_the_admin_says() {
    let host = Host::new();
    ok(&host.generate(&[
        "--name",
        "ctx",
        "--gpu",
        "0",
        "--memory",
        "2Gi",
        "--context-overhead",
        "500Mi",
    ]));
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(host.path("state/slices/ctx/config.json")).expect("config"),
    )
    .expect("config JSON");
    assert_eq!(config["devices"][0]["contextOverhead"], 500u64 << 20);
    let error = fails(&host.generate(&[
        "--name",
        "tiny",
        "--gpu",
        "0",
        "--memory",
        "256Mi",
        "--context-overhead",
        "500Mi",
    ]));
    assert!(
        error.contains("--memory 256Mi is less than one CUDA context") && error.contains("500Mi"),
        "{error}"
    );
    let error = fails(&host.generate(&[
        "--name",
        "bad",
        "--gpu",
        "0",
        "--memory",
        "1Gi",
        "--context-overhead",
        "lots",
    ]));
    assert!(error.contains("--context-overhead"), "{error}");
}
