//! A C program linked with `-lcuda` (the way CUDA programs are built) binds to the fake driver
//! and works: the soname, the symbol names and the C signatures all match.

#[macro_use]
mod support;

use std::path::Path;
use std::process::Command;

use support::*;

#[test]
fn a_program_linked_with_lcuda_runs_on_the_fake_driver() {
    let library = built_library("libcuda.so");
    let node = Node::two_cards();
    let lib_dir = node.dir.path().join("lib");
    std::fs::create_dir(&lib_dir).unwrap();
    // What a driver install provides: the soname and the development link.
    for link in ["libcuda.so.1", "libcuda.so"] {
        std::os::unix::fs::symlink(&library, lib_dir.join(link)).unwrap();
    }
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs/direct.c");
    let program = node.dir.path().join("direct");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .arg("-o")
        .arg(&program)
        .arg(&source)
        .arg("-L")
        .arg(&lib_dir)
        .arg("-lcuda")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cc}: {e}"));
    assert!(status.success(), "compiling {} failed", source.display());

    if let Ok(output) = Command::new("readelf").arg("-d").arg(&program).output() {
        let dynamic = String::from_utf8_lossy(&output.stdout);
        assert!(
            dynamic.contains("Shared library: [libcuda.so.1]"),
            "the program must need the soname:\n{dynamic}"
        );
    }

    let output = Command::new(&program)
        .env("LD_LIBRARY_PATH", &lib_dir)
        .env("FAKEGPU_CONFIG", &node.config)
        .env("FAKEGPU_STATE", &node.state)
        .env_remove("CUDA_VISIBLE_DEVICES")
        .output()
        .expect("run the program");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "driver 12080 devices 2 name NVIDIA GeForce RTX 4090 memory 4294967296",
            &format!(
                "used {} free {} total {}",
                2 * MIB,
                4 * GIB - 2 * MIB,
                4 * GIB
            ),
            "launches 1",
            "used 0",
            "ok",
        ]
    );
}
