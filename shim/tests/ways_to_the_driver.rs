//! Every way a program reaches the driver meets the same wall.

mod support;
use support::*;

fn wall_holds(way: &str) {
    let scene = Scene::new();
    let claim = scene.claim("c", &[(GPU0, GIB, 0)]);
    let mut app = scene.start(way, Some(&claim));
    assert_eq!(app.rc("init 0"), 0, "{way}: init");
    assert_eq!(
        app.run(&format!("alloc {}", 600 * MIB)),
        [0, 0],
        "{way}: first 600 MiB fits"
    );
    let physical = app.run("physical 0")[0];
    assert_eq!(
        app.rc(&format!("alloc {}", 600 * MIB)),
        CUDA_ERROR_OUT_OF_MEMORY,
        "{way}: 1200 MiB must not fit a 1 GiB claim"
    );
    assert_eq!(
        app.run("physical 0")[0],
        physical,
        "{way}: a refused allocation allocates nothing"
    );
    assert_eq!(
        app.run("info"),
        [0, (GIB - 600 * MIB) as i64, GIB as i64],
        "{way}: cuMemGetInfo shows the slice"
    );
    assert_eq!(
        app.run("total 0"),
        [0, GIB as i64],
        "{way}: cuDeviceTotalMem shows the slice"
    );
    assert_eq!(app.rc("free 0"), 0);
    assert_eq!(
        app.run("info"),
        [0, GIB as i64, GIB as i64],
        "{way}: free gives it back"
    );
    assert_eq!(
        app.run(&format!("alloc {}", GIB)),
        [0, 1],
        "{way}: the whole slice is usable"
    );
    assert_eq!(
        app.rc("alloc 1"),
        CUDA_ERROR_OUT_OF_MEMORY,
        "{way}: not one byte more"
    );
    app.finish();
}

#[test]
fn linked_with_lcuda() {
    wall_holds("direct");
}

#[test]
fn dlopen_and_dlsym() {
    wall_holds("dlsym");
}

#[test]
fn cu_get_proc_address() {
    wall_holds("procaddr");
}

#[test]
fn the_way_libcudart_loads_the_driver() {
    wall_holds("cudart");
}

#[test]
fn cudart_keeps_using_the_shims_get_proc_address() {
    let scene = Scene::new();
    let claim = scene.claim("c", &[(GPU0, GIB, 0)]);
    let fixture = fixture();
    let output = std::process::Command::new(&fixture.app)
        .arg("cudart")
        .arg(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data/libcudart-12.9-driver-requests.txt"),
        )
        .env("LD_LIBRARY_PATH", &fixture.lib_dir)
        .env("LD_PRELOAD", shim_path())
        .env("TESSERA_CONFIG", &claim)
        .env("FAKEGPU_CONFIG", &scene.fake_config)
        .env("FAKEGPU_STATE", scene.dir.path().join("fakegpu.state"))
        .output()
        .expect("run app");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("replayed 419 "),
        "all 419 requests replayed: {stdout}"
    );
    // Without the shim the same replay ends on the driver's own cuGetProcAddress (the control).
    assert!(
        stdout.contains("getproc-is-shim 1"),
        "cudart's cuGetProcAddress must be the shim's: {stdout}"
    );
}

#[test]
fn without_the_shim_the_fake_card_is_whole() {
    // The control: the same program, no shim, sees the 24 GiB card and is not limited.
    let scene = Scene::new();
    let mut app = scene.start_with("dlsym", None, false);
    assert_eq!(app.rc("init 0"), 0);
    assert_eq!(app.run(&format!("alloc {}", 2 * GIB)), [0, 0]);
    assert_eq!(app.run("total 0"), [0, 24 * GIB as i64]);
    app.finish();
}
