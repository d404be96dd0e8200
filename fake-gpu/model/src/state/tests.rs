use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use super::*;
use crate::config::Config;

const GIB: u64 = 1 << 30;

fn node() -> Config {
    Config::from_json(
        r#"{"devices": [
            {"uuid": "GPU-00000000-0000-4000-8000-000000000000", "name": "a", "memory": 4294967296},
            {"uuid": "GPU-00000000-0000-4000-8000-000000000001", "name": "b", "memory": 1073741824}]}"#,
    )
    .unwrap()
}

fn state_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.state");
    (dir, path)
}

#[test]
fn processes_share_the_card_and_its_limit() {
    let (_dir, path) = state_file();
    let config = node();
    // Two regions and two leases in one process behave as two processes: each has its own open
    // file description, and OFD locks tell them apart.
    let first = Region::open(&path, &config).unwrap();
    let second = Region::open(&path, &config).unwrap();
    let a = first.claim().unwrap();
    let b = second.claim().unwrap();
    assert_ne!(a.slot_index(), b.slot_index());

    a.reserve(0, 3 * GIB).unwrap();
    assert_eq!(
        second.used(0),
        3 * GIB,
        "the second process sees the first one's memory"
    );
    let err = b.reserve(0, 2 * GIB).unwrap_err();
    assert_eq!(
        err,
        OutOfMemory {
            device: 0,
            requested: 2 * GIB,
            used: 3 * GIB,
            capacity: 4 * GIB
        }
    );
    b.reserve(0, GIB).unwrap();
    assert_eq!(first.used(0), 4 * GIB);
    assert!(b.reserve(0, 1).is_err(), "the card is full");
    assert_eq!(first.used(1), 0, "devices are separate");
    assert_eq!((a.used(0), b.used(0)), (3 * GIB, GIB));

    a.release(0, 3 * GIB);
    b.reserve(0, 2 * GIB).unwrap();
    assert_eq!(first.used(0), 3 * GIB);
}

#[test]
fn managed_memory_is_counted_apart_and_not_limited() {
    let (_dir, path) = state_file();
    let region = Region::open(&path, &node()).unwrap();
    let lease = region.claim().unwrap();
    lease.add_managed(1, 8 * GIB);
    assert_eq!(region.managed(1), 8 * GIB);
    assert_eq!(region.used(1), 0);
    lease.reserve(1, GIB).unwrap();
    lease.release_managed(1, 8 * GIB);
    assert_eq!((region.managed(1), lease.managed(1)), (0, 0));
}

#[test]
fn dropping_a_lease_gives_everything_back() {
    let (_dir, path) = state_file();
    let region = Region::open(&path, &node()).unwrap();
    let lease = region.claim().unwrap();
    lease.reserve(0, GIB).unwrap();
    lease.reserve(1, GIB).unwrap();
    lease.add_managed(0, GIB);
    lease.set_device_open(0, true);
    assert_eq!(region.processes().len(), 1);
    drop(lease);
    assert_eq!(
        (region.used(0), region.used(1), region.managed(0)),
        (0, 0, 0)
    );
    assert!(region.processes().is_empty());
}

#[test]
fn processes_are_listed_with_pid_and_usage() {
    let (_dir, path) = state_file();
    let region = Region::open(&path, &node()).unwrap();
    let lease = region.claim().unwrap();
    lease.reserve(1, 5 << 20).unwrap();
    lease.set_device_open(0, true);
    let processes = region.processes();
    assert_eq!(processes.len(), 1);
    let me = &processes[0];
    assert_eq!(me.pid, std::process::id());
    assert_eq!(me.slot, lease.slot_index());
    assert_eq!(me.used, vec![0, 5 << 20]);
    assert!(me.is_on(0) && me.is_on(1));
    lease.set_device_open(0, false);
    assert!(!region.processes()[0].is_on(0));
}

#[test]
fn reservations_from_many_threads_never_pass_the_card() {
    let (_dir, path) = state_file();
    let region = Region::open(&path, &node()).unwrap();
    let lease = Arc::new(region.claim().unwrap());
    let chunk = 10 << 20;
    let granted: u64 = (0..8)
        .map(|_| {
            let lease = Arc::clone(&lease);
            std::thread::spawn(move || {
                (0..200).filter(|_| lease.reserve(1, chunk).is_ok()).count() as u64
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .sum();
    assert_eq!(granted, GIB / chunk, "exactly what fits is granted");
    assert_eq!(region.used(1), granted * chunk);
    assert!(region.used(1) <= region.capacity(1));
}

#[test]
fn a_sole_user_resets_the_file_and_a_newcomer_validates_it() {
    let (_dir, path) = state_file();
    let config = node();
    // A process dies holding memory while nobody else has the file open.
    let child = spawn_child(&path);
    child.kill();
    // Alone with the file, the next process starts from zero without draining anything.
    let region = Region::open(&path, &config).unwrap();
    assert_eq!(region.used_now(0), 0);
    assert!(region.processes().is_empty());

    // While it is in use, a different device list is refused with a message saying why.
    let mut other = config.clone();
    other.devices[0].memory *= 2;
    let err = Region::open(&path, &other)
        .err()
        .expect("a different config must be refused");
    let message = err.to_string();
    assert!(message.contains("different device list"), "{message}");
    assert!(message.contains("FAKEGPU_STATE"), "{message}");
    drop(region);
    // Once free, the other config takes it over.
    let region = Region::open(&path, &other).unwrap();
    assert_eq!(region.capacity(0), 8 * GIB);
}

#[test]
fn a_foreign_file_in_use_is_refused_not_misread() {
    let (_dir, path) = state_file();
    std::fs::write(&path, vec![0x5a; FILE_SIZE]).unwrap();
    // Hold the users lock as another process would, through a separate description.
    let holder = File::open(&path).unwrap();
    assert!(lock::try_lock(holder.as_fd(), LOCK_USERS, LockKind::Shared).unwrap());
    let err = Region::open(&path, &node()).err().expect("must refuse");
    assert!(
        err.to_string().contains("not a fake GPU state file"),
        "{err}"
    );
    drop(holder);
    // Another test of this binary may fork a child (before its exec) while `holder` is open;
    // the child's copy of the descriptor keeps the lock until it execs, so wait for that.
    let mut opened = Region::open(&path, &node());
    for _ in 0..100 {
        if opened.is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        opened = Region::open(&path, &node());
    }
    opened.unwrap();
}

// --- A real second process, killed with SIGKILL. ------------------------------------------------

const CHILD_ENV: &str = "FAKEGPU_MODEL_TEST_CHILD_STATE";
const READY: &str = "FAKEGPU-CHILD-READY";

/// Run only as a child of `a_killed_process_memory_is_reclaimed`: claims a slot, takes 1 GiB of
/// device 0 and waits to be killed.
#[test]
fn child_process_holding_memory() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let region = Region::open(Path::new(&path), &node()).unwrap();
    let lease = region.claim().unwrap();
    lease.reserve(0, GIB).unwrap();
    lease.set_device_open(0, true);
    println!("{READY} {}", lease.slot_index());
    loop {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

/// A child that is killed (SIGKILL) at the latest when the test ends, pass or fail.
struct ChildProcess {
    child: Child,
    slot: usize,
}

impl ChildProcess {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn kill(mut self) {
        self.kill_and_wait();
    }

    fn kill_and_wait(&mut self) {
        let _ = self.child.kill(); // SIGKILL: no destructor, no atexit.
        let _ = self.child.wait();
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.kill_and_wait();
    }
}

fn spawn_child(path: &Path) -> ChildProcess {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "state::tests::child_process_holding_memory",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        // libtest prints the test's name on the same line first.
        if let Some((_, slot)) = line.split_once(READY) {
            return ChildProcess {
                child,
                slot: slot.trim().parse().unwrap(),
            };
        }
    }
    let status = child.wait().unwrap();
    panic!("the child exited ({status}) before taking its memory");
}

#[test]
fn a_killed_process_memory_is_reclaimed() {
    let (_dir, path) = state_file();
    let config = node();
    let region = Region::open(&path, &config).unwrap();
    let child = spawn_child(&path);
    let child_slot = child.slot;

    // Alive: its memory counts, and it is listed under its own PID.
    assert_eq!(region.used(0), GIB);
    let processes = region.processes();
    assert_eq!(processes.len(), 1);
    assert_eq!(processes[0].pid, child.pid());
    assert_eq!(processes[0].slot, child_slot);
    assert!(processes[0].is_on(0));
    assert_eq!(region.reclaim_dead(), 0, "a live process is never drained");

    child.kill();

    // The kernel dropped its lock; the next look returns its memory.
    assert_eq!(region.used(0), 0);
    assert!(region.processes().is_empty());
    // And its slot is free for the next process.
    let lease = region.claim().unwrap();
    assert_eq!(lease.slot_index(), child_slot);
}

#[test]
fn a_reservation_that_does_not_fit_first_reclaims_the_dead() {
    let (_dir, path) = state_file();
    let config = node();
    let region = Region::open(&path, &config).unwrap();
    let lease = region.claim().unwrap();
    let child = spawn_child(&path);
    lease.reserve(0, 3 * GIB).unwrap();
    assert!(
        lease.reserve(0, GIB).is_err(),
        "the child holds the last GiB"
    );
    child.kill();
    // No explicit reclaim: the failing reservation finds the dead child's memory itself.
    assert_eq!(region.used_now(0), 4 * GIB, "not yet drained");
    lease.reserve(0, GIB).unwrap();
    assert_eq!(region.used_now(0), 4 * GIB);
}

#[test]
fn kernels_queue_on_the_device_and_clocks_advance_in_lockstep() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    let (_dir, path) = state_file();
    let region = Region::open(&path, &node()).unwrap();
    let first = region.claim().unwrap();
    let second = region.claim().unwrap();
    let start = first.clock_now();
    assert_eq!(start, clock::EPOCH_NS, "virtual time starts at the epoch");
    assert_eq!(second.clock_now(), start);

    // Both launch at the same virtual time: the second kernel waits for the SMs.
    let a = first.run_kernel(0, 1_000_000);
    let b = second.run_kernel(0, 1_000_000);
    assert_eq!((a.start, a.end), (start, start + 1_000_000));
    assert_eq!((b.start, b.end), (start + 1_000_000, start + 2_000_000));
    assert_eq!(region.device_busy(0), 2_000_000);
    assert_eq!((first.busy(0), second.busy(0)), (1_000_000, 1_000_000));

    // The first may not run ahead of the second (which takes part: it ran a kernel) ...
    let done = Arc::new(AtomicBool::new(false));
    let waiter = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            first.advance_to(start + 10_000_000);
            done.store(true, Ordering::Release);
            let now = first.clock_now();
            first.leave_lockstep();
            now
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !done.load(Ordering::Acquire),
        "ran ahead of a process that has not moved"
    );
    // ... until the second waits for a later time: the earlier waiter goes first.
    second.advance_to(start + 20_000_000);
    assert_eq!(waiter.join().unwrap(), start + 10_000_000);
    assert_eq!(second.clock_now(), start + 20_000_000);
    assert_eq!(region.clock_now(), start + 20_000_000, "the node's present");
}

// --- Per-cgroup memory limits (NVML 13.4). Ordinary directories stand in for cgroups: the model
// --- keys limits by any directory; NVML alone insists on a cgroup filesystem. -----------------

mod memory_limits {
    use super::*;
    use crate::cgroup::{CgroupSet, Membership};
    use crate::state::limits::{CgroupDir, CgroupDirError, LimitError, MemoryLimit, NO_LIMIT};

    const MIB: u64 = 1 << 20;

    /// A fake hierarchy: `root/{a/{a1,a2},b}`.
    struct Tree {
        dir: tempfile::TempDir,
    }

    impl Tree {
        fn new() -> Tree {
            let dir = tempfile::tempdir().unwrap();
            for sub in ["a/a1", "a/a2", "b"] {
                std::fs::create_dir_all(dir.path().join(sub)).unwrap();
            }
            Tree { dir }
        }

        fn path(&self, sub: &str) -> PathBuf {
            self.dir.path().join(sub)
        }

        fn cgroup(&self, sub: &str) -> CgroupDir {
            CgroupDir::open(&self.path(sub)).unwrap()
        }

        /// The set of a process in `sub`.
        fn member(&self, sub: &str) -> CgroupSet {
            CgroupSet::from_memberships(&[Membership {
                root: self.dir.path().to_owned(),
                dir: self.path(sub),
            }])
        }
    }

    #[test]
    fn limits_round_trip_by_device_and_canonical_path() {
        let (_dir, path) = state_file();
        let region = Region::open(&path, &node()).unwrap();
        let tree = Tree::new();
        let a = tree.cgroup("a");
        assert_eq!(region.memory_limit(0, &a).unwrap(), None);
        assert_eq!(region.memory_limits_live(), 0);

        region.set_memory_limit(0, &a, GIB, 2 * GIB).unwrap();
        let limit = |soft, hard| {
            Some(MemoryLimit {
                soft,
                hard,
                current_used: 0,
            })
        };
        assert_eq!(region.memory_limit(0, &a).unwrap(), limit(GIB, 2 * GIB));
        let spelt_otherwise = CgroupDir::open(&tree.path("a/a1/..//")).unwrap();
        assert_eq!(
            region.memory_limit(0, &spelt_otherwise).unwrap(),
            limit(GIB, 2 * GIB),
            "keyed by the canonical path"
        );
        assert_eq!(region.memory_limit(1, &a).unwrap(), None, "per device");
        assert_eq!(
            region.memory_limit(0, &tree.cgroup("a/a1")).unwrap(),
            None,
            "a limit belongs to its own directory, not to those below"
        );

        region.set_memory_limit(0, &a, 0, GIB).unwrap();
        assert_eq!(region.memory_limit(0, &a).unwrap(), limit(0, GIB));
        assert_eq!(region.memory_limits_live(), 1, "updated in place");
        region.set_memory_limit(0, &a, GIB, NO_LIMIT).unwrap();
        assert_eq!(region.memory_limit(0, &a).unwrap(), limit(GIB, NO_LIMIT));

        region.set_memory_limit(0, &a, 0, NO_LIMIT).unwrap();
        assert_eq!(region.memory_limit(0, &a).unwrap(), None, "cleared");
        assert_eq!(region.memory_limits_live(), 0);
        region.set_memory_limit(0, &a, 0, NO_LIMIT).unwrap();
        assert_eq!(region.memory_limits_live(), 0, "clearing nothing is fine");
    }

    /// A runtime's hook sets a container's limit and exits before the container's first process
    /// attaches, alone, to the node: the limit is the driver's and must survive the reset.
    #[test]
    fn limits_outlive_the_process_that_set_them() {
        let (_dir, path) = state_file();
        let tree = Tree::new();
        let a = tree.cgroup("a");
        let hook = Region::open(&path, &node()).unwrap();
        hook.set_memory_limit(0, &a, 0, GIB).unwrap();
        drop(hook);
        let container = Region::open(&path, &node()).unwrap();
        assert_eq!(
            container.memory_limit(0, &a).unwrap().map(|l| l.hard),
            Some(GIB)
        );
        assert_eq!(container.memory_limits_live(), 1);
        drop(container);
        // A file made for another node keeps nothing.
        let mut other = node();
        other.devices.truncate(1);
        let foreign = Region::open(&path, &other).unwrap();
        assert_eq!(foreign.memory_limits_live(), 0);
    }

    #[test]
    fn a_hard_limit_binds_the_processes_of_its_cgroup_and_below() {
        let (_dir, path) = state_file();
        let config = node();
        let tree = Tree::new();
        // Separate regions: separate processes, as far as locks go.
        let regions: Vec<_> = (0..4)
            .map(|_| Region::open(&path, &config).unwrap())
            .collect();
        let in_a1 = regions[0].claim_in(tree.member("a/a1")).unwrap();
        let in_a2 = regions[1].claim_in(tree.member("a/a2")).unwrap();
        let in_b = regions[2].claim_in(tree.member("b")).unwrap();
        let nowhere = regions[3].claim().unwrap();
        in_a1.reserve(0, 100 * MIB).unwrap();
        in_b.reserve(0, 300 * MIB).unwrap();

        // Set after the processes attached: limits are read at each reservation.
        let a = tree.cgroup("a");
        regions[3].set_memory_limit(0, &a, 0, GIB).unwrap();
        let used = |region: &Region| region.memory_limit(0, &a).unwrap().unwrap().current_used;
        assert_eq!(used(&regions[3]), 100 * MIB, "a1 is below a; b is not");

        in_a2.reserve(0, 924 * MIB).unwrap();
        assert_eq!(used(&regions[3]), GIB);
        let err = in_a1.reserve(0, 1).unwrap_err();
        assert_eq!(
            err,
            OutOfMemory {
                device: 0,
                requested: 1,
                used: GIB,
                capacity: GIB
            },
            "the cgroup's wall, shared by a1 and a2"
        );
        assert!(in_a2.reserve(0, 1).is_err());
        assert_eq!(
            regions[3].used(0),
            1324 * MIB,
            "nothing taken by the refusals"
        );
        in_b.reserve(0, 2 * GIB).unwrap();
        nowhere.reserve(0, 512 * MIB).unwrap();
        in_a1.reserve(1, 512 * MIB).unwrap();
        in_b.release(0, 2 * GIB + 300 * MIB);
        nowhere.release(0, 512 * MIB);

        in_a2.release(0, 924 * MIB);
        in_a1.reserve(0, 924 * MIB).unwrap();
        assert!(in_a1.reserve(0, 1).is_err());

        // A soft limit alone is no wall.
        regions[3].set_memory_limit(0, &a, GIB, NO_LIMIT).unwrap();
        in_a1.reserve(0, GIB).unwrap();
        assert_eq!(used(&regions[3]), 2 * GIB);

        // A limit on a deeper cgroup binds only its own processes, and nested limits all hold.
        regions[3].set_memory_limit(0, &a, 0, 3 * GIB).unwrap();
        regions[3]
            .set_memory_limit(0, &tree.cgroup("a/a2"), 0, 100 * MIB)
            .unwrap();
        assert!(in_a2.reserve(0, 101 * MIB).is_err());
        in_a2.reserve(0, 100 * MIB).unwrap();
        assert!(
            in_a1.reserve(0, 925 * MIB).is_err(),
            "a's 3 GiB: 2 GiB + 100 MiB in use"
        );
        in_a1.reserve(0, 924 * MIB).unwrap();
        assert_eq!(used(&regions[3]), 3 * GIB);
    }

    #[test]
    fn processes_racing_under_one_limit_stop_exactly_at_it() {
        let (_dir, path) = state_file();
        let config = node();
        let tree = Tree::new();
        let leases: Vec<Arc<Lease>> = ["a/a1", "a/a2"]
            .iter()
            .map(|sub| {
                let region = Region::open(&path, &config).unwrap();
                Arc::new(region.claim_in(tree.member(sub)).unwrap())
            })
            .collect();
        let a = tree.cgroup("a");
        leases[0]
            .region()
            .set_memory_limit(0, &a, 0, 640 * MIB)
            .unwrap();
        let granted: u64 = (0..8)
            .map(|i| {
                let lease = Arc::clone(&leases[i % 2]);
                std::thread::spawn(move || {
                    let mut granted = 0;
                    while lease.reserve(0, MIB).is_ok() {
                        granted += MIB;
                    }
                    granted
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(granted, 640 * MIB);
        let limit = leases[1].region().memory_limit(0, &a).unwrap().unwrap();
        assert_eq!(limit.current_used, 640 * MIB);
    }

    #[test]
    fn a_dead_process_under_a_limit_is_drained_before_a_refusal() {
        let (_dir, path) = state_file();
        let config = node();
        let tree = Tree::new();
        let survivor_region = Region::open(&path, &config).unwrap();
        let survivor = survivor_region.claim_in(tree.member("a")).unwrap();
        {
            let region = Region::open(&path, &config).unwrap();
            let doomed = region.claim_in(tree.member("a/a1")).unwrap();
            doomed.reserve(0, GIB).unwrap();
            survivor_region
                .set_memory_limit(0, &tree.cgroup("a"), 0, GIB)
                .unwrap();
            assert!(survivor.reserve(0, 1).is_err());
            // The slot stays active with its memory, as after a SIGKILL; its lock goes.
            let fd = doomed.lock_fd();
            std::mem::forget(doomed);
            // SAFETY: the forgotten lease never closes its descriptor itself.
            unsafe { libc::close(fd) };
        }
        survivor.reserve(0, GIB).unwrap();
    }

    #[test]
    fn removing_the_cgroup_clears_its_limits() {
        let (_dir, path) = state_file();
        let region = Region::open(&path, &node()).unwrap();
        let tree = Tree::new();
        let lease = region.claim_in(tree.member("b")).unwrap();
        let b = tree.cgroup("b");
        region.set_memory_limit(0, &b, 0, GIB).unwrap();
        lease.reserve(0, GIB).unwrap();
        assert!(lease.reserve(0, 1).is_err());

        std::fs::remove_dir(tree.path("b")).unwrap();
        lease.reserve(0, 1).unwrap();
        assert_eq!(region.memory_limits_live(), 0, "freed when found gone");
        // The same name again is another cgroup, without limits.
        std::fs::create_dir(tree.path("b")).unwrap();
        assert_eq!(region.memory_limit(0, &tree.cgroup("b")).unwrap(), None);
    }

    #[test]
    fn the_table_holds_64_limits_and_paths_of_512_bytes() {
        let (_dir, path) = state_file();
        let region = Region::open(&path, &node()).unwrap();
        let tree = Tree::new();
        for i in 0..64 {
            let dir = tree.path(&format!("b/{i}"));
            std::fs::create_dir(&dir).unwrap();
            region
                .set_memory_limit(i % 2, &CgroupDir::open(&dir).unwrap(), 0, GIB)
                .unwrap();
        }
        let full = region.set_memory_limit(0, &tree.cgroup("a"), 0, GIB);
        assert!(matches!(full, Err(LimitError::TableFull)), "{full:?}");
        std::fs::remove_dir(tree.path("b/7")).unwrap();
        region
            .set_memory_limit(0, &tree.cgroup("a"), 0, GIB)
            .expect("a removed cgroup's record is reused");

        // Paths are stored whole, so names that differ only at the end stay apart.
        let long = tree.path(&format!("a/{}/{}", "x".repeat(200), "y".repeat(200)));
        std::fs::create_dir_all(&long).unwrap();
        let too_long = long.join("z".repeat(100));
        std::fs::create_dir(&too_long).unwrap();
        assert!(matches!(
            CgroupDir::open(&too_long),
            Err(CgroupDirError::TooLong(n)) if n > 512
        ));
        assert!(matches!(
            CgroupDir::open(&tree.path("missing")),
            Err(CgroupDirError::Open(_))
        ));
        std::fs::write(tree.path("file"), "").unwrap();
        assert!(matches!(
            CgroupDir::open(&tree.path("file")),
            Err(CgroupDirError::NotADirectory)
        ));
        assert!(matches!(
            tree.cgroup("a").require_cgroup_fs(),
            Err(CgroupDirError::NotCgroup)
        ));
    }

    #[test]
    fn a_slot_publishes_its_cgroups() {
        let (_dir, path) = state_file();
        let region = Region::open(&path, &node()).unwrap();
        let tree = Tree::new();
        let set = tree.member("a/a1");
        assert_eq!(set.len(), 3, "a1, a and the root");
        let lease = region.claim_in(set.clone()).unwrap();
        assert_eq!(region.slot_cgroups(lease.slot_index()), set);
        assert_eq!(lease.cgroups(), &set);
        drop(lease);
        let plain = region.claim().unwrap();
        assert!(region.slot_cgroups(plain.slot_index()).is_empty());
    }
}
