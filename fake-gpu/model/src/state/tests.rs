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
