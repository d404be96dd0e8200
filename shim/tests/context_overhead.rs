//! Every byte a claim takes on the card is inside its wall: each CUDA context costs device
//! memory no allocation call reports, and the shim charges the figure the node measured
//! (`tessera-gpu-probe`, run by the kubelet plugin, which writes it into every claim's config)
//! per context. Without it a claim with several processes takes more of the card than its wall,
//! and a neighbour then meets the driver's out-of-memory inside its own limit.

mod support;

use support::*;

/// What a context costs on the simulated card: about what a bare context takes on a current
/// data-centre GPU.
const CONTEXT: u64 = 300 * MIB;
const CHUNK: u64 = 64 * MIB;

/// Allocates `CHUNK`s in every app in turn until each is refused; the bytes each got.
fn fill(apps: &mut [App]) -> Vec<u64> {
    let mut got = vec![0; apps.len()];
    let mut full = vec![false; apps.len()];
    while full.iter().any(|f| !f) {
        for (i, app) in apps.iter_mut().enumerate() {
            if full[i] {
                continue;
            }
            match app.run(&format!("alloc {CHUNK}"))[0] {
                0 => got[i] += CHUNK,
                CUDA_ERROR_OUT_OF_MEMORY => full[i] = true,
                rc => panic!("alloc answered {rc}"),
            }
        }
    }
    got
}

/// The card holds two 2 GiB claims on a 4 GiB card, each with two processes. The first claim
/// fills its wall; the card's own accounting then shows it holding no more than its wall, and
/// the second claim still gets all of its own.
#[test]
fn a_card_filled_with_slices_of_several_processes_each_keeps_inside_its_wall() {
    let scene = Scene::with_gpu0(serde_json::json!({"memory": 4 * GIB, "contextMemory": CONTEXT}));
    let Some(report) = scene.probe("context overhead") else {
        return;
    };
    let measured = report["gpus"]
        .as_array()
        .expect("gpus")
        .iter()
        .find(|g| g["uuid"] == GPU0)
        .and_then(|g| g["contextOverhead"].as_u64())
        .unwrap_or_else(|| panic!("the probe measured no context on GPU0: {report}"));
    assert_eq!(measured, CONTEXT, "the probe reads what a context costs");

    let wall = 2 * GIB;
    let first = scene.claim("first", &[(GPU0, wall, measured)]);
    let second = scene.claim("second", &[(GPU0, wall, measured)]);
    let start = |config: &std::path::Path| {
        let mut app = scene.start("dlsym", Some(config));
        assert_eq!(app.rc("init 0"), 0);
        app
    };

    let mut first_apps = [start(&first), start(&first)];
    let first_got: u64 = fill(&mut first_apps).iter().sum();
    let card = first_apps[0].run("physical 0")[0] as u64;
    assert_eq!(
        card,
        first_got + 2 * CONTEXT,
        "the card holds its allocations and contexts"
    );
    assert!(
        card <= wall,
        "the first claim holds {card} bytes of the card, more than its {wall}-byte wall"
    );
    assert!(
        card + CHUNK > wall,
        "it could use its whole wall ({card} of {wall})"
    );

    let mut second_apps = [start(&second), start(&second)];
    let second_got: u64 = fill(&mut second_apps).iter().sum();
    let second_card = second_got + 2 * CONTEXT;
    assert!(
        second_card + CHUNK > wall,
        "the second claim met the card's end at {second_card} bytes, inside its {wall}-byte wall"
    );
    let card = second_apps[0].run("physical 0")[0] as u64;
    assert!(card <= 4 * GIB, "{card} bytes used on a 4 GiB card");
    // Each process's slice in cuMemGetInfo leaves no room the wall would refuse.
    let info = second_apps[0].run("info");
    assert_eq!(info[0], 0);
    assert!((info[1] as u64) < CHUNK, "free {} after the fill", info[1]);

    for app in first_apps.into_iter().chain(second_apps) {
        app.finish();
    }
}
