//! A claim's limit holds across all its processes, survives SIGKILL and fork, and races never
//! overshoot it.

mod support;
use support::*;
use tessera_api::region::RegionSnapshot;

#[test]
fn two_processes_share_one_limit_and_a_killed_one_gives_its_memory_back() {
    let scene = Scene::new();
    let config = scene.claim("c", &[(GPU0, GIB, 0)]);
    let mut first = scene.start("procaddr", Some(&config));
    let mut second = scene.start("direct", Some(&config));
    assert_eq!(first.rc("init 0"), 0);
    assert_eq!(second.rc("init 0"), 0);
    assert_eq!(first.run(&format!("alloc {}", 600 * MIB))[0], 0);
    assert_eq!(
        second.run(&format!("alloc {}", 600 * MIB))[0],
        CUDA_ERROR_OUT_OF_MEMORY,
        "the second process sees the first's usage"
    );
    let info = second.run("info");
    assert_eq!(
        info[1],
        (GIB - 600 * MIB) as i64,
        "cuMemGetInfo counts the other process"
    );
    first.kill();
    assert_eq!(
        second.run(&format!("alloc {}", 600 * MIB))[0],
        0,
        "SIGKILL of the first returns its memory with no cleanup step of its own"
    );
    second.finish();
}

#[test]
fn fork_children_work_and_share_the_limit() {
    let scene = Scene::new();
    let config = scene.claim("c", &[(GPU0, GIB, 0)]);
    let mut app = scene.start("dlsym", Some(&config));
    assert_eq!(app.rc("init 0"), 0);
    assert_eq!(app.run(&format!("alloc {}", 600 * MIB))[0], 0);
    assert_eq!(
        app.rc(&format!("fork {}", 300 * MIB)),
        0,
        "the child allocates within what is left"
    );
    assert_eq!(
        app.rc(&format!("fork {}", 600 * MIB)),
        CUDA_ERROR_OUT_OF_MEMORY,
        "the parent's usage counts"
    );
    assert_eq!(
        app.run("info")[1],
        (GIB - 600 * MIB) as i64,
        "the child's exit left the parent's charge alone"
    );
    app.finish();
}

#[test]
fn racing_processes_never_overshoot() {
    let scene = Scene::new();
    let config = scene.claim("c", &[(GPU0, GIB, 0)]);
    let mut apps: Vec<App> = (0..6)
        .map(|_| scene.start("procaddr", Some(&config)))
        .collect();
    for app in &mut apps {
        assert_eq!(app.rc("init 0"), 0);
    }
    // Each process asks for 300 MiB four times, all at once, and holds what it got until every
    // process is done: at most three can ever fit.
    let (sender, receiver) = std::sync::mpsc::channel();
    for mut app in apps {
        let sender = sender.clone();
        std::thread::spawn(move || {
            app.send_lines(&vec![format!("alloc {}", 300 * MIB); 4]);
            let replies: Vec<String> = (0..4).map(|_| app.read_line()).collect();
            sender.send((app, replies)).expect("send");
        });
    }
    drop(sender);
    let results: Vec<(App, Vec<String>)> = receiver.iter().collect();
    assert_eq!(results.len(), 6);
    let granted: usize = results
        .iter()
        .map(|(_, replies)| replies.iter().filter(|l| l.starts_with("alloc 0 ")).count())
        .sum();
    for (app, _) in results {
        app.finish();
    }
    assert!(
        (1..=3).contains(&granted),
        "{granted} × 300 MiB granted on a 1 GiB claim"
    );
}

#[test]
fn the_region_records_each_process_by_slot() {
    let scene = Scene::new();
    let config = scene.claim("c", &[(GPU0, GIB, 0)]);
    let mut a = scene.start("procaddr", Some(&config));
    let mut b = scene.start("procaddr", Some(&config));
    assert_eq!(a.rc("init 0"), 0);
    assert_eq!(b.rc("init 0"), 0);
    assert_eq!(a.run(&format!("alloc {}", 100 * MIB))[0], 0);
    assert_eq!(b.run(&format!("alloc {}", 200 * MIB))[0], 0);
    let snapshot =
        RegionSnapshot::parse(&std::fs::read(scene.region("c")).expect("region")).expect("parse");
    assert_eq!(snapshot.devices[0].uuid, GPU0);
    assert_eq!(snapshot.devices[0].memory_limit, GIB);
    let mut used: Vec<u64> = snapshot.slots.iter().map(|s| s.memory_used[0]).collect();
    used.sort();
    assert_eq!(used, [100 * MIB, 200 * MIB]);
    a.finish();
    b.finish();
}

/// A program that closes descriptors it did not open (`closefrom`, a daemonising helper) keeps
/// its slot: its charge still counts for the claim's other processes, which would otherwise
/// take the slot for a dead one's, zero it and overshoot the limit.
#[test]
fn a_process_that_closes_every_descriptor_keeps_its_charge() {
    let scene = Scene::new();
    let config = scene.claim("c", &[(GPU0, GIB, 0)]);
    let mut first = scene.start("procaddr", Some(&config));
    let mut second = scene.start("direct", Some(&config));
    assert_eq!(first.rc("init 0"), 0);
    assert_eq!(second.rc("init 0"), 0);
    assert_eq!(first.run(&format!("alloc {}", 600 * MIB))[0], 0);
    assert_eq!(first.rc("closefrom 3"), 0, "close_range(3, ~0)");
    assert_eq!(
        second.run(&format!("alloc {}", 600 * MIB))[0],
        CUDA_ERROR_OUT_OF_MEMORY,
        "the first process's 600 MiB still count after it closed every descriptor"
    );
    assert_eq!(
        first.run(&format!("alloc {}", 300 * MIB))[0],
        0,
        "the first process goes on charging its own slot"
    );
    assert_eq!(
        second.run(&format!("alloc {}", 200 * MIB))[0],
        CUDA_ERROR_OUT_OF_MEMORY,
        "900 MiB of the 1 GiB are held"
    );
    let snapshot =
        RegionSnapshot::parse(&std::fs::read(scene.region("c")).expect("region")).expect("parse");
    let used: u64 = snapshot.slots.iter().map(|s| s.memory_used[0]).sum();
    assert_eq!(used, 900 * MIB);
    first.kill();
    assert_eq!(
        second.run(&format!("alloc {}", 600 * MIB))[0],
        0,
        "its death still gives its memory back"
    );
    second.finish();
}
