//! What the shim does with no config, a broken config, and a config for other GPUs.

mod support;
use support::*;

#[test]
fn no_config_passes_everything_through() {
    let scene = Scene::new();
    let mut app = scene.start("procaddr", None);
    assert_eq!(app.rc("init 0"), 0);
    assert_eq!(app.run(&format!("alloc {}", 4 * GIB)), [0, 0]);
    let info = app.run("info");
    assert_eq!(info[2], 24 * GIB as i64, "the whole card");
    assert_eq!(app.run("nvml")[1], 24 * GIB as i64);
    assert!(app.finish().is_empty(), "nothing printed");
}

fn refused(config_text: Option<&str>, expected: &[&str]) {
    let scene = Scene::new();
    let path = scene.dir.path().join("claim.json");
    if let Some(text) = config_text {
        std::fs::write(&path, text).expect("write");
    }
    for way in ["direct", "procaddr", "cudart"] {
        let mut app = scene.start(way, Some(&path));
        assert_eq!(
            app.rc("init 0"),
            CUDA_ERROR_NOT_PERMITTED,
            "{way}: cuInit must refuse the GPU"
        );
        assert_eq!(
            app.rc("alloc 1"),
            CUDA_ERROR_NOT_PERMITTED,
            "{way}: and allocations"
        );
        assert_eq!(
            app.run("nvml")[0],
            4,
            "{way}: NVML refuses too (NVML_ERROR_NO_PERMISSION)"
        );
        let stderr = app.finish();
        assert!(
            stderr.contains(&path.display().to_string()),
            "names the file: {stderr}"
        );
        for word in expected {
            assert!(stderr.contains(word), "{stderr:?} should mention {word:?}");
        }
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    }
}

#[test]
fn malformed_config_fails_closed() {
    refused(Some("{not json"), &["refusing the GPU", "not valid JSON"]);
}

#[test]
fn invalid_field_fails_closed_naming_it() {
    let text = r#"{"version":1,"claimUid":"u","region":"/tmp/r","devices":[{"uuid":"GPU-1","memoryLimit":1,"cores":0}]}"#;
    refused(Some(text), &["devices[0].cores"]);
}

#[test]
fn missing_config_named_by_the_environment_fails_closed() {
    refused(None, &["cannot read"]);
}

#[test]
fn unusable_region_fails_closed() {
    let scene = Scene::new();
    let config = scene.claim("c", &[(GPU0, GIB, 0)]);
    std::fs::write(scene.region("c"), b"garbage that is not a region").expect("write");
    let mut app = scene.start("dlsym", Some(&config));
    assert_eq!(app.rc("init 0"), CUDA_ERROR_NOT_PERMITTED);
    let stderr = app.finish();
    assert!(
        stderr.contains("region") && stderr.contains("bytes"),
        "{stderr}"
    );
}

/// The region keeps the limits the claim was prepared with: a config naming the claim's region
/// with a larger limit (one a process wrote and named in TESSERA_CONFIG) is refused, and the
/// region is left as it was. Before the check, only the GPUs' UUIDs were compared and the forged
/// config got its 4 GiB.
#[test]
fn a_config_with_other_limits_than_its_region_fails_closed() {
    let scene = Scene::new();
    let config = scene.claim("c", &[(GPU0, GIB, 0)]);
    let mut app = scene.start("procaddr", Some(&config));
    assert_eq!(app.rc("init 0"), 0);
    app.finish();
    let region = std::fs::read(scene.region("c")).expect("region");

    let forged = scene.claim("c", &[(GPU0, 4 * GIB, 0)]);
    let mut app = scene.start("procaddr", Some(&forged));
    assert_eq!(app.rc("init 0"), CUDA_ERROR_NOT_PERMITTED);
    assert_eq!(
        app.rc(&format!("alloc {}", 2 * GIB)),
        CUDA_ERROR_NOT_PERMITTED
    );
    let stderr = app.finish();
    assert!(
        stderr.contains("memoryLimit 1073741824") && stderr.contains("memoryLimit 4294967296"),
        "names both limits: {stderr}"
    );
    assert_eq!(
        std::fs::read(scene.region("c")).expect("region"),
        region,
        "the region is untouched"
    );
}

#[test]
fn gpus_outside_the_claim_get_nothing() {
    let scene = Scene::new();
    let config = scene.claim("c", &[(GPU1, GIB, 0)]);
    let mut app = scene.start("procaddr", Some(&config));
    assert_eq!(app.rc("init 0"), 0, "device 0 is visible but not granted");
    assert_eq!(app.rc("alloc 1"), CUDA_ERROR_OUT_OF_MEMORY);
    assert_eq!(app.run("info")[1..], [0, 0]);
    assert_eq!(
        app.run("total 1"),
        [0, GIB as i64],
        "device 1 is the claim's"
    );
    app.finish();
}

#[test]
fn cuda_visible_devices_reordering_keeps_uuids_straight() {
    // CUDA_VISIBLE_DEVICES=1,0 swaps the ordinals: each limit follows its GPU's UUID, not the ordinal.
    let scene = Scene::new();
    let config = scene.claim("c", &[(GPU0, 2 * GIB, 0), (GPU1, GIB, 0)]);
    let fixture = fixture();
    let mut command = std::process::Command::new(&fixture.app);
    command
        .arg("dlsym")
        .env("LD_LIBRARY_PATH", &fixture.lib_dir)
        .env("LD_PRELOAD", shim_path())
        .env("TESSERA_CONFIG", &config)
        .env("FAKEGPU_CONFIG", &scene.fake_config)
        .env("FAKEGPU_STATE", scene.dir.path().join("fakegpu.state"))
        .env("CUDA_VISIBLE_DEVICES", "1,0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = command.spawn().expect("spawn");
    use std::io::Write;
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "init 0\ntotal 0\ntotal 1\nquit").expect("write");
    drop(stdin);
    let output = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    // One line per command, in order after `ready` and `init <rc>`: `total <rc> <bytes>` per ordinal.
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.get(2..4),
        Some(
            &[
                format!("total 0 {GIB}").as_str(),
                format!("total 0 {}", 2 * GIB).as_str()
            ][..]
        ),
        "ordinal 0 = GPU1 = 1 GiB, ordinal 1 = GPU0 = 2 GiB: {stdout}"
    );
}
