//! Every call that takes device memory is charged, and every free gives exactly that back.

mod support;
use support::*;

fn used(app: &mut App) -> i64 {
    let info = app.run("info");
    info[2] - info[1]
}

#[test]
fn every_allocating_call_is_charged_and_refused_past_the_limit() {
    let scene = Scene::new();
    let config = scene.claim("c", &[(GPU0, GIB, 0)]);
    for way in ["procaddr", "dlsym"] {
        let mut app = scene.start(way, Some(&config));
        assert_eq!(app.rc("init 0"), 0);
        let big = 700 * MIB;
        // (allocate, free-by-index, name)
        let kinds = [
            (format!("alloc {big}"), "free"),
            (format!("managed {big}"), "free"),
            (format!("async {big}"), "freeasync"),
            (format!("pool {big}"), "freeasync"),
            (format!("vmm {big} 0"), "vmmfree"),
        ];
        for (allocate, free) in kinds {
            let reply = app.run(&allocate);
            assert_eq!(reply[0], 0, "{way}: {allocate}");
            let id = reply[1];
            assert_eq!(used(&mut app), big as i64, "{way}: {allocate} is charged");
            assert_eq!(
                app.run(&allocate)[0],
                CUDA_ERROR_OUT_OF_MEMORY,
                "{way}: {allocate} twice exceeds 1 GiB"
            );
            assert_eq!(app.rc(&format!("{free} {id}")), 0);
            assert_eq!(used(&mut app), 0, "{way}: {free} gives it back");
        }
        // Pitch: charged the driver's real pitch × height.
        let reply = app.run("pitch 1000 1000");
        assert_eq!(reply[0], 0);
        assert_eq!(
            used(&mut app),
            reply[2] * 1000,
            "{way}: pitched allocation charged pitch × height"
        );
        assert_eq!(app.rc(&format!("free {}", reply[1])), 0);
        // Arrays: 8192 × 8192 floats = 256 MiB each.
        let reply = app.run("array 8192 8192");
        assert_eq!(reply[0], 0);
        assert_eq!(used(&mut app), 256 * MIB as i64);
        let mut arrays = vec![reply[1]];
        for _ in 0..3 {
            let reply = app.run("array 8192 8192");
            assert_eq!(reply[0], 0);
            arrays.push(reply[1]);
        }
        assert_eq!(
            app.run("array 8192 8192")[0],
            CUDA_ERROR_OUT_OF_MEMORY,
            "{way}: a fifth array"
        );
        for id in arrays {
            assert_eq!(app.rc(&format!("arrayfree {id}")), 0);
        }
        assert_eq!(used(&mut app), 0);
        app.finish();
    }
}

#[test]
fn vmm_allocations_are_charged_to_the_device_they_name() {
    // NCCL creates physical memory from threads without a current context: the device comes
    // from the request, so device 1's allocation counts against device 1's limit only.
    let scene = Scene::new();
    let config = scene.claim("c", &[(GPU0, GIB, 0), (GPU1, 512 * MIB, 0)]);
    let mut app = scene.start("procaddr", Some(&config));
    assert_eq!(app.rc("init 0"), 0);
    assert_eq!(app.run(&format!("vmm {} 1", 400 * MIB))[0], 0);
    assert_eq!(
        app.run(&format!("vmm {} 1", 400 * MIB))[0],
        CUDA_ERROR_OUT_OF_MEMORY
    );
    assert_eq!(
        app.run(&format!("vmm {} 0", 900 * MIB))[0],
        0,
        "device 0 untouched by device 1's use"
    );
    app.finish();
}

#[test]
fn unknown_and_double_frees_pass_through_without_underflow() {
    let scene = Scene::new();
    let config = scene.claim("c", &[(GPU0, GIB, 0)]);
    let mut app = scene.start("direct", Some(&config));
    assert_eq!(app.rc("init 0"), 0);
    assert_eq!(app.run(&format!("alloc {}", 100 * MIB))[0], 0);
    // A pointer the shim never saw goes to the driver, which answers as it would.
    assert_eq!(
        app.rc("free 123456789"),
        1,
        "CUDA_ERROR_INVALID_VALUE from the driver"
    );
    assert_eq!(app.rc("free 0"), 0);
    assert_eq!(
        app.rc("free 0"),
        1,
        "double free: the driver's answer, no second uncharge"
    );
    assert_eq!(used(&mut app), 0);
    let nvml = app.run("nvml");
    assert_eq!(nvml[2], 0, "no underflowed 'used' in NVML either");
    app.finish();
}

#[test]
fn context_overhead_is_charged_per_context() {
    let scene = Scene::new();
    let config = scene.claim("c", &[(GPU0, GIB, 100 * MIB)]);
    let mut app = scene.start("dlsym", Some(&config));
    assert_eq!(app.rc("init 0"), 0);
    assert_eq!(used(&mut app), 100 * MIB as i64, "the primary context");
    let ctx = app.run("ctx 0");
    assert_eq!(ctx[0], 0);
    assert_eq!(used(&mut app), 200 * MIB as i64, "a created context");
    assert_eq!(
        app.run(&format!("alloc {}", 900 * MIB))[0],
        CUDA_ERROR_OUT_OF_MEMORY
    );
    assert_eq!(app.rc(&format!("ctxdestroy {}", ctx[1])), 0);
    assert_eq!(
        app.run(&format!("alloc {}", 900 * MIB))[0],
        0,
        "destroying a context gives its share back"
    );
    app.finish();
}

#[test]
fn nvml_reports_the_slice_as_nvidia_smi_reads_it() {
    let scene = Scene::new();
    let config = scene.claim("c", &[(GPU0, 2 * GIB, 0)]);
    let mut app = scene.start("procaddr", Some(&config));
    assert_eq!(app.rc("init 0"), 0);
    assert_eq!(app.run(&format!("alloc {}", 512 * MIB))[0], 0);
    let nvml = app.run("nvml");
    let (two, half) = (2 * GIB as i64, 512 * MIB as i64);
    assert_eq!(nvml, [0, two, half, two - half, 0, two, half, two - half]);
    app.finish();
}

/// A graph's memory allocation node takes its memory at launch, where the ledger cannot count
/// it: under a limit it is refused on every way to the driver; without a claim the driver's
/// own answer stands.
#[test]
fn graph_memory_nodes_are_refused_under_a_limit() {
    const CUDA_ERROR_NOT_SUPPORTED: i64 = 801;
    let scene = Scene::new();
    let config = scene.claim("c", &[(GPU0, GIB, 0)]);
    for way in ["direct", "dlsym", "procaddr"] {
        let mut app = scene.start(way, Some(&config));
        assert_eq!(app.rc("init 0"), 0);
        assert_eq!(
            app.run(&format!("graphalloc {}", 256 * MIB)),
            [CUDA_ERROR_NOT_SUPPORTED, 0],
            "{way}"
        );
        assert_eq!(used(&mut app), 0, "{way}: nothing taken");
        let stderr = app.finish();
        assert!(
            stderr.contains("cuGraphAddMemAllocNode refused"),
            "{way}: the refusal says why:\n{stderr}"
        );
    }
    let mut bare = scene.start("procaddr", None);
    assert_eq!(bare.rc("init 0"), 0);
    assert_eq!(
        bare.run(&format!("graphalloc {}", 256 * MIB)),
        [0, 1],
        "the fake driver's own graph memory node"
    );
    bare.finish();
}
