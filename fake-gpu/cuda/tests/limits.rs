//! NVML 13.4's per-cgroup device-memory limits, as the driver enforces them: agents placed in
//! cgroups of the test's own (root and a writable cgroup filesystem needed; without them these
//! tests fail, saying why) and limits set in the node's state file as NVML sets them.

#[macro_use]
mod support;

use std::path::Path;

use support::*;
use tessera_built_libs::cgroup::{Hierarchy, TestCgroup, hierarchies};
use tessera_fake_gpu_model::NO_LIMIT;

/// Device 0: 4 GiB, each context costs 64 MiB. Device 1: 1 GiB, contexts free.
const NODE: &str = r#"{
    "devices": [
        {"uuid": "GPU-11111111-2222-4333-8444-555555555555", "name": "NVIDIA GeForce RTX 4090",
         "memory": 4294967296, "contextMemory": 67108864, "memoryLimits": true},
        {"uuid": "GPU-aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee", "name": "NVIDIA L40S",
         "memory": 1073741824, "contextMemory": 0, "memoryLimits": true}
    ]
}"#;

const OOM: &str = "err 2";

#[test]
fn agent() {
    agent_main();
}

fn in_parent() -> bool {
    std::env::var_os("FAKEGPU_TEST_SCENARIO").is_none()
}

fn available_hierarchies() -> Vec<Hierarchy> {
    let found = hierarchies();
    assert!(
        !found.is_empty(),
        "no cgroup hierarchy (unified or memory) is mounted under /sys/fs/cgroup: these tests \
         place processes in cgroups"
    );
    found
}

fn cgroup(hierarchy: &Hierarchy, label: &str) -> TestCgroup {
    TestCgroup::create(hierarchy, label)
        .unwrap_or_else(|e| panic!("this test needs a cgroup of its own: {e}"))
}

fn current_used(node: &Node, device: usize, dir: &Path) -> u64 {
    node.memory_limit(device, dir)
        .expect("the limit is set")
        .current_used
}

#[test]
fn a_hard_limit_is_a_wall_for_the_processes_in_its_cgroup() {
    if !in_parent() {
        return;
    }
    for hierarchy in available_hierarchies() {
        let node = Node::new(NODE);
        let mut wall = cgroup(&hierarchy, "fakegpu-wall");
        let mut inside = node.agent_in(&wall);
        let mut outside = node.agent();
        // Set after the processes attached: the driver reads limits at every reservation.
        node.set_memory_limit(0, wall.dir(), 0, GIB);
        assert_eq!(
            current_used(&node, 0, wall.dir()),
            64 * MIB,
            "{hierarchy:?}: the primary context's memory counts"
        );

        assert_eq!(
            inside.ask(&format!("alloc 0 {}", GIB - 64 * MIB + 1)),
            OOM,
            "{hierarchy:?}"
        );
        assert_eq!(inside.ask(&format!("alloc 0 {}", 512 * MIB)), "ok 0");
        assert_eq!(inside.ask("ctx 0"), "ok", "a second context: 64 MiB more");
        assert_eq!(inside.ask(&format!("async 0 {}", 384 * MIB)), "ok 1");
        assert_eq!(current_used(&node, 0, wall.dir()), GIB);
        assert_eq!(inside.ask("alloc 0 1"), OOM);
        assert_eq!(inside.ask("async 0 1"), OOM);
        assert_eq!(
            inside.ask("ctx 0"),
            OOM,
            "a context's own memory hits the wall"
        );
        assert_eq!(
            inside.ask(&format!("managed 0 {}", GIB)),
            "ok 2",
            "managed memory is host memory to the fake, outside the wall as outside the card"
        );
        assert_eq!(
            inside.ask(&format!("alloc 1 {}", GIB)),
            "ok 3",
            "the limit is device 0's"
        );
        assert_eq!(
            outside.ask(&format!("alloc 0 {}", 2 * GIB)),
            "ok 0",
            "{hierarchy:?}: a process outside the cgroup allocates past the limit"
        );
        assert_eq!(
            inside.ask("info 0"),
            format!("{} {}", 4 * GIB - 3 * GIB - 64 * MIB, 4 * GIB),
            "cuMemGetInfo still reports the card"
        );
        assert_eq!(inside.ask("free 0"), "rc 0");
        assert_eq!(inside.ask(&format!("alloc 0 {}", 512 * MIB)), "ok 4");

        inside.quit();
        outside.quit();
        wall.remove().unwrap();
    }
}

#[test]
fn processes_in_one_cgroup_and_below_share_its_limit() {
    if !in_parent() {
        return;
    }
    let hierarchy = &available_hierarchies()[0];
    let node = Node::new(NODE);
    let mut shared = cgroup(hierarchy, "fakegpu-shared");
    let mut below = shared.child("below").unwrap();
    let mut a = node.agent_in(&shared);
    let mut b = node.agent_in(&shared);
    let mut c = node.agent_in(&below);
    node.set_memory_limit(1, shared.dir(), 0, 768 * MIB);

    assert_eq!(a.ask(&format!("alloc 1 {}", 512 * MIB)), "ok 0");
    assert_eq!(b.ask(&format!("alloc 1 {}", 512 * MIB)), OOM);
    assert_eq!(c.ask(&format!("alloc 1 {}", 256 * MIB)), "ok 0");
    assert_eq!(
        b.ask("alloc 1 1"),
        OOM,
        "a, b and the cgroup below share it"
    );
    assert_eq!(current_used(&node, 1, shared.dir()), 768 * MIB);
    assert_eq!(a.ask("free 0"), "rc 0");
    assert_eq!(c.ask("free 0"), "rc 0");

    // Two processes filling the cgroup at once stop exactly at the wall.
    a.send(&format!("fill 1 {MIB}"));
    b.send(&format!("fill 1 {MIB}"));
    let filled: u64 = [a.reply(), b.reply()]
        .iter()
        .map(|reply| {
            reply
                .strip_prefix("filled ")
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{reply}"))
        })
        .sum();
    assert_eq!(filled, 768);
    assert_eq!(current_used(&node, 1, shared.dir()), 768 * MIB);

    for agent in [a, b, c] {
        agent.quit();
    }
    below.remove().unwrap();
    shared.remove().unwrap();
}

#[test]
fn clearing_or_raising_the_limit_lifts_the_wall() {
    if !in_parent() {
        return;
    }
    let hierarchy = &available_hierarchies()[0];
    let node = Node::new(NODE);
    let mut limited = cgroup(hierarchy, "fakegpu-clear");
    let mut agent = node.agent_in(&limited);
    node.set_memory_limit(1, limited.dir(), 0, 256 * MIB);
    assert_eq!(agent.ask(&format!("alloc 1 {}", 256 * MIB)), "ok 0");
    assert_eq!(agent.ask("alloc 1 1"), OOM);

    node.set_memory_limit(1, limited.dir(), 0, 512 * MIB);
    assert_eq!(agent.ask(&format!("alloc 1 {}", 256 * MIB)), "ok 1");
    assert_eq!(agent.ask("alloc 1 1"), OOM);

    node.set_memory_limit(1, limited.dir(), 128 * MIB, NO_LIMIT);
    assert_eq!(
        agent.ask(&format!("alloc 1 {}", 256 * MIB)),
        "ok 2",
        "a soft limit alone is no wall"
    );
    node.set_memory_limit(1, limited.dir(), 0, 768 * MIB);
    assert_eq!(agent.ask("alloc 1 1"), OOM);
    node.set_memory_limit(1, limited.dir(), 0, NO_LIMIT);
    assert_eq!(node.memory_limit(1, limited.dir()), None, "cleared");
    assert_eq!(agent.ask(&format!("alloc 1 {}", 256 * MIB)), "ok 3");

    agent.quit();
    limited.remove().unwrap();
}

#[test]
fn removing_the_cgroup_lifts_the_wall() {
    if !in_parent() {
        return;
    }
    let hierarchy = &available_hierarchies()[0];
    let node = Node::new(NODE);
    let mut doomed = cgroup(hierarchy, "fakegpu-removed");
    let dir = doomed.dir().to_owned();
    let mut agent = node.agent_in(&doomed);
    node.set_memory_limit(1, &dir, 0, 256 * MIB);
    assert_eq!(agent.ask(&format!("alloc 1 {}", 256 * MIB)), "ok 0");
    assert_eq!(agent.ask("alloc 1 1"), OOM);

    // A cgroup with a process cannot be removed: move the agent out first. (It keeps the
    // cgroups it had when it attached, so only the removal can lift the wall.)
    doomed.move_home(agent.pid()).unwrap();
    doomed.remove().unwrap();
    assert_eq!(agent.ask(&format!("alloc 1 {}", 512 * MIB)), "ok 1");

    // A new cgroup of the same name is another cgroup: the limit does not come back.
    std::fs::create_dir(&dir).unwrap();
    assert_eq!(node.memory_limit(1, &dir), None);
    assert_eq!(agent.ask(&format!("alloc 1 {}", 128 * MIB)), "ok 2");
    std::fs::remove_dir(&dir).unwrap();
    agent.quit();
}
