//! Memory oversubscription, shim level: on an overcommitted GPU, claims that opted in spill to
//! host (managed) memory when the card's memory left to them is used up; claims that did not opt
//! in never spill and always find their limit on the card; every claim's wall still holds.

mod support;
use std::path::{Path, PathBuf};

use support::*;
use tessera_api::region::RegionSnapshot;

/// An 8 GiB card, as in issue 8's scenario.
const CARD: u64 = 8 * GIB;

/// Writes the config of claim `name` on GPU0 of an overcommitted 8 GiB card.
fn claim(
    scene: &Scene,
    name: &str,
    limit: u64,
    oversubscribe: bool,
    spill_limit: Option<u64>,
) -> PathBuf {
    let mut device = serde_json::json!({
        "uuid": GPU0, "memoryLimit": limit, "cores": 100, "physicalMemory": CARD,
    });
    if let Some(spill_limit) = spill_limit {
        device["spillLimit"] = spill_limit.into();
    }
    let config = serde_json::json!({
        "version": 1,
        "claimUid": format!("uid-{name}"),
        "region": scene.region(name),
        "devices": [device],
        "oversubscribe": oversubscribe,
    });
    let path = scene.dir.path().join(format!("{name}.json"));
    std::fs::write(&path, config.to_string()).expect("claim config");
    path
}

fn region(scene: &Scene, name: &str) -> RegionSnapshot {
    RegionSnapshot::parse(&std::fs::read(scene.region(name)).expect("region")).expect("parse")
}

/// (charged, spilled) on GPU0 over the region's active slots.
fn totals(scene: &Scene, name: &str) -> (u64, u64) {
    let snapshot = region(scene, name);
    let active = snapshot.slots.iter().filter(|s| s.state == 1);
    active.fold((0, 0), |(used, spilled), s| {
        (used + s.memory_used[0], spilled + s.memory_spilled[0])
    })
}

fn start(scene: &Scene, config: &Path) -> App {
    let mut app = scene.start_with_board("procaddr", Some(config));
    assert_eq!(app.rc("init 0"), 0);
    app
}

/// (node-wide managed bytes on GPU0, this process's managed bytes advised to the host).
fn managed(app: &mut App) -> (u64, u64) {
    let reply = app.run("managedused 0");
    (reply[0] as u64, reply[1] as u64)
}

#[test]
fn three_6_gib_claims_on_an_8_gib_card_all_get_their_limit_and_only_opted_ones_spill() {
    let scene = Scene::with_gpu0_memory(CARD);
    let a = claim(&scene, "a", 6 * GIB, true, None);
    let b = claim(&scene, "b", 6 * GIB, true, None);
    let c = claim(&scene, "c", 6 * GIB, false, None);
    let mut fixed = start(&scene, &c);
    let mut first = start(&scene, &a);
    let mut second = start(&scene, &b);

    for (name, app) in [("a", &mut first), ("b", &mut second), ("c", &mut fixed)] {
        for i in 0..6 {
            assert_eq!(app.rc(&format!("alloc {GIB}")), 0, "claim {name}: GiB {i}");
        }
        assert_eq!(
            app.rc(&format!("alloc {MIB}")),
            CUDA_ERROR_OUT_OF_MEMORY,
            "claim {name}'s 6 GiB limit still holds"
        );
        let info = app.run("info");
        assert_eq!(
            (info[1], info[2]),
            (0, (6 * GIB) as i64),
            "claim {name}: slice view"
        );
    }

    // The claim that did not opt in: all on the card, nothing spilled.
    assert_eq!(totals(&scene, "c"), (6 * GIB, 0));
    // a took the 2 GiB the card has beyond c's reserve, b found nothing left on the card.
    assert_eq!(totals(&scene, "a"), (6 * GIB, 4 * GIB));
    assert_eq!(totals(&scene, "b"), (6 * GIB, 6 * GIB));
    assert_eq!(
        fixed.run("physical 0")[0] as u64,
        CARD,
        "the card is exactly full: c's 6 GiB and a's 2 GiB"
    );
    // What the region says was spilled is what the driver holds as managed memory, advised to
    // stay on the host.
    assert_eq!(managed(&mut first), (10 * GIB, 4 * GIB));
    assert_eq!(managed(&mut second).1, 6 * GIB);
    assert_eq!(managed(&mut fixed).1, 0);

    // Frees give back what each pointer took: a's spilled GiB and a device one.
    assert_eq!(first.rc("free 5"), 0);
    assert_eq!(totals(&scene, "a"), (5 * GIB, 3 * GIB));
    assert_eq!(first.rc("free 0"), 0);
    assert_eq!(totals(&scene, "a"), (4 * GIB, 3 * GIB));
    assert_eq!(managed(&mut first), (9 * GIB, 3 * GIB));
    assert_eq!(fixed.run("physical 0")[0] as u64, 7 * GIB);
    for app in [first, second, fixed] {
        let stderr = app.finish();
        assert!(!stderr.contains("tessera:"), "no refusal lines: {stderr}");
    }
}

#[test]
fn the_spill_limit_is_a_clear_out_of_memory_and_freed_spill_comes_back() {
    let scene = Scene::with_gpu0_memory(CARD);
    let a = claim(&scene, "a", 6 * GIB, true, Some(GIB));
    let c = claim(&scene, "c", 7 * GIB, false, None);
    let fixed = start(&scene, &c);
    let mut app = start(&scene, &a);
    assert_eq!(
        app.rc(&format!("alloc {GIB}")),
        0,
        "on the card (8 − 7 GiB)"
    );
    assert_eq!(app.rc(&format!("alloc {GIB}")), 0, "spilled");
    assert_eq!(totals(&scene, "a"), (2 * GIB, GIB));
    assert_eq!(
        app.rc(&format!("alloc {GIB}")),
        CUDA_ERROR_OUT_OF_MEMORY,
        "the spill limit is reached"
    );
    assert_eq!(
        app.rc(&format!("alloc {GIB}")),
        CUDA_ERROR_OUT_OF_MEMORY,
        "and stays reached"
    );
    assert_eq!(
        totals(&scene, "a"),
        (2 * GIB, GIB),
        "refusals leave nothing charged"
    );
    assert_eq!(app.rc("free 1"), 0, "the spilled pointer");
    assert_eq!(totals(&scene, "a"), (GIB, 0));
    assert_eq!(managed(&mut app), (0, 0));
    assert_eq!(app.rc(&format!("alloc {GIB}")), 0, "spilled again");
    assert_eq!(totals(&scene, "a"), (2 * GIB, GIB));
    let stderr = app.finish();
    assert_eq!(
        stderr.matches("spill limit").count(),
        1,
        "one line, once: {stderr}"
    );
    assert!(
        stderr.contains("claim uid-a: GPU GPU-11111111-2222-3333-4444-555555555555 is full and the claim's spill limit (1073741824 bytes of host memory) is reached"),
        "{stderr}"
    );
    fixed.finish();
}

#[test]
fn a_killed_process_gives_back_its_spilled_bytes() {
    let scene = Scene::with_gpu0_memory(CARD);
    let a = claim(&scene, "a", 6 * GIB, true, None);
    let c = claim(&scene, "c", 6 * GIB, false, None);
    let fixed = start(&scene, &c);
    let mut doomed = start(&scene, &a);
    for _ in 0..4 {
        assert_eq!(doomed.rc(&format!("alloc {GIB}")), 0);
    }
    assert_eq!(totals(&scene, "a"), (4 * GIB, 2 * GIB));
    doomed.kill();

    let mut next = start(&scene, &a);
    for i in 0..6 {
        assert_eq!(
            next.rc(&format!("alloc {GIB}")),
            0,
            "GiB {i}: the dead process's charge is reclaimed when the wall is reached"
        );
    }
    let snapshot = region(&scene, "a");
    let live: Vec<_> = snapshot.slots.iter().filter(|s| s.state == 1).collect();
    assert_eq!(live.len(), 1, "the killed process's slot was reclaimed");
    let (used, spilled) = totals(&scene, "a");
    assert_eq!(used, 6 * GIB);
    assert_eq!(
        managed(&mut next).1,
        spilled,
        "the region's spill is the live process's"
    );
    assert!(
        spilled >= 4 * GIB,
        "at most the 2 GiB beyond c's reserve are on the card: {spilled}"
    );
    assert!(
        next.run("physical 0")[0] as u64 <= 2 * GIB,
        "c's 6 GiB stay free on the card"
    );
    next.finish();
    fixed.finish();
}

#[test]
fn without_opting_in_nothing_spills_and_the_card_refuses_as_before() {
    let scene = Scene::with_gpu0_memory(CARD);
    let c = claim(&scene, "c", 6 * GIB, false, None);
    let d = claim(&scene, "d", 6 * GIB, false, None);
    let mut first = start(&scene, &c);
    let mut second = start(&scene, &d);
    for _ in 0..6 {
        assert_eq!(first.rc(&format!("alloc {GIB}")), 0);
    }
    assert_eq!(second.rc(&format!("alloc {GIB}")), 0);
    assert_eq!(second.rc(&format!("alloc {GIB}")), 0);
    assert_eq!(
        second.rc(&format!("alloc {GIB}")),
        CUDA_ERROR_OUT_OF_MEMORY,
        "the card is full and d did not opt in"
    );
    assert_eq!(totals(&scene, "d"), (2 * GIB, 0));
    assert_eq!(managed(&mut second), (0, 0));
    first.finish();
    second.finish();
}

#[test]
fn without_a_board_an_opted_in_claim_spills_when_the_driver_reports_the_card_full() {
    let scene = Scene::with_gpu0_memory(CARD);
    let a = claim(&scene, "a", 6 * GIB, true, None);
    let c = claim(&scene, "c", 6 * GIB, false, None);
    let mut fixed = scene.start("procaddr", Some(&c));
    assert_eq!(fixed.rc("init 0"), 0);
    for _ in 0..6 {
        assert_eq!(fixed.rc(&format!("alloc {GIB}")), 0);
    }
    let mut app = scene.start("procaddr", Some(&a));
    assert_eq!(app.rc("init 0"), 0);
    for i in 0..6 {
        assert_eq!(app.rc(&format!("alloc {GIB}")), 0, "GiB {i}");
    }
    assert_eq!(
        totals(&scene, "a"),
        (6 * GIB, 4 * GIB),
        "2 GiB fit on the card, the driver's out-of-memory sent the rest to host memory"
    );
    assert_eq!(fixed.run("physical 0")[0] as u64, CARD);
    assert_eq!(managed(&mut app), (4 * GIB, 4 * GIB));
    let stderr = app.finish();
    assert!(
        stderr.contains("claim uid-a: no memory board for GPU GPU-11111111-2222-3333-4444-555555555555; spilling only when the driver reports the card full"),
        "{stderr}"
    );
    fixed.finish();
}

#[test]
fn memory_an_opted_in_claim_takes_outside_cu_mem_alloc_counts_for_the_others() {
    let scene = Scene::with_gpu0_memory(CARD);
    let a = claim(&scene, "a", 6 * GIB, true, None);
    let b = claim(&scene, "b", 6 * GIB, true, None);
    let c = claim(&scene, "c", 6 * GIB, false, None);
    let fixed = start(&scene, &c);
    let mut first = start(&scene, &a);
    let mut second = start(&scene, &b);
    // Stream-ordered and pitched allocations on the card count like cuMemAlloc_v2's.
    assert_eq!(first.rc(&format!("async {GIB}")), 0);
    assert_eq!(first.rc(&format!("pitch {} 1024", 512 * 1024)), 0);
    assert_eq!(totals(&scene, "a"), (GIB + 512 * MIB, 0));
    assert_eq!(second.rc(&format!("alloc {GIB}")), 0);
    assert_eq!(
        totals(&scene, "b"),
        (GIB, GIB),
        "only 512 MiB are left beside c's reserve and a's 1.5 GiB: b spills"
    );
    assert_eq!(second.rc(&format!("alloc {}", 256 * MIB)), 0);
    assert_eq!(
        totals(&scene, "b"),
        (GIB + 256 * MIB, GIB),
        "256 MiB still fit on the card"
    );
    assert_eq!(first.rc("freeasync 0"), 0);
    assert_eq!(second.rc(&format!("alloc {GIB}")), 0);
    assert_eq!(
        totals(&scene, "b"),
        (2 * GIB + 256 * MIB, GIB),
        "a's freed GiB is b's to take"
    );
    for app in [first, second, fixed] {
        app.finish();
    }
}

#[test]
fn stream_ordered_allocations_spill_too_and_a_stream_ordered_free_gives_the_bytes_back() {
    let scene = Scene::with_gpu0_memory(CARD);
    let a = claim(&scene, "a", 6 * GIB, true, None);
    let c = claim(&scene, "c", 6 * GIB, false, None);
    let fixed = start(&scene, &c);
    let mut app = start(&scene, &a);
    for i in 0..2 {
        assert_eq!(app.rc(&format!("async {GIB}")), 0, "GiB {i}");
    }
    assert_eq!(totals(&scene, "a"), (2 * GIB, 0), "2 GiB fit beside c's 6");
    assert_eq!(managed(&mut app), (0, 0));
    assert_eq!(app.rc(&format!("async {GIB}")), 0, "the third GiB spills");
    assert_eq!(totals(&scene, "a"), (3 * GIB, GIB));
    assert_eq!(
        managed(&mut app),
        (GIB, GIB),
        "served from managed memory advised to the host"
    );
    // The spilled pointer freed stream-ordered: the stream is waited for, the managed memory
    // freed, charge and spilled bytes given back.
    assert_eq!(app.rc("freeasync 2"), 0);
    assert_eq!(totals(&scene, "a"), (2 * GIB, 0));
    assert_eq!(managed(&mut app), (0, 0));
    assert_eq!(app.rc("freeasync 0"), 0, "a card pointer, as before");
    assert_eq!(totals(&scene, "a"), (GIB, 0));
    assert_eq!(app.rc(&format!("async {GIB}")), 0);
    assert_eq!(totals(&scene, "a"), (2 * GIB, 0), "back on the card");
    for app in [app, fixed] {
        app.finish();
    }
}

#[test]
fn a_prepared_claim_that_did_not_opt_in_is_owed_its_share_before_its_processes_start() {
    let scene = Scene::with_gpu0_memory(CARD);
    let a = claim(&scene, "a", 6 * GIB, true, None);
    // The plugin has prepared a 6 GiB claim that may not spill; its container is not running
    // yet, so it has no entry on the memory board, only the plugin's reservation.
    let reservations = scene.dir.path().join("reservations");
    std::fs::create_dir_all(&reservations).expect("reservations dir");
    std::fs::write(
        reservations.join(format!("{GPU0}.reserved")),
        format!("{}\n", 6 * GIB),
    )
    .expect("reservation");
    let mut app = start(&scene, &a);
    for i in 0..6 {
        assert_eq!(app.rc(&format!("alloc {GIB}")), 0, "GiB {i}");
    }
    assert_eq!(
        totals(&scene, "a"),
        (6 * GIB, 4 * GIB),
        "only the 2 GiB beyond the reservation on the card"
    );
    assert_eq!(
        app.run("physical 0")[0] as u64,
        2 * GIB,
        "6 GiB of the card left for the prepared claim"
    );
    // The prepared claim starts and finds its whole limit on the card.
    let c = claim(&scene, "c", 6 * GIB, false, None);
    let mut fixed = start(&scene, &c);
    for i in 0..6 {
        assert_eq!(fixed.rc(&format!("alloc {GIB}")), 0, "claim c, GiB {i}");
    }
    assert_eq!(totals(&scene, "c"), (6 * GIB, 0));
    for app in [app, fixed] {
        let stderr = app.finish();
        assert!(!stderr.contains("tessera:"), "no refusal lines: {stderr}");
    }
}
