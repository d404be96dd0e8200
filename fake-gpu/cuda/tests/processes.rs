//! The node across processes: one card's memory shared by every process, given back when a
//! process dies however it dies, and a fork child that can use the driver afresh.

#[macro_use]
mod support;

use support::*;

#[test]
fn agent() {
    agent_main();
}

#[test]
fn processes_share_each_card() {
    if std::env::var_os("FAKEGPU_TEST_SCENARIO").is_some() {
        return;
    }
    let node = Node::two_cards();
    let mut a = node.agent();
    let mut b = node.agent();
    assert_eq!(a.ask(&format!("alloc 0 {}", 3 * GIB)), "ok 0");
    assert_eq!(
        b.ask("used 0"),
        (3 * GIB).to_string(),
        "the other process sees it"
    );
    assert_eq!(
        b.ask("info 0"),
        format!("{} {}", GIB, 4 * GIB),
        "cuMemGetInfo: card minus everyone's use"
    );
    assert_eq!(
        b.ask(&format!("alloc 0 {}", 2 * GIB)),
        format!("err {CUDA_ERROR_OUT_OF_MEMORY}")
    );
    assert_eq!(
        b.ask(&format!("alloc 0 {}", GIB)),
        "ok 0",
        "what is left is usable"
    );
    assert_eq!(
        b.ask("alloc 0 1"),
        format!("err {CUDA_ERROR_OUT_OF_MEMORY}")
    );
    assert_eq!(
        b.ask(&format!("alloc 1 {}", GIB)),
        "ok 1",
        "the other card is separate"
    );
    assert_eq!(a.ask("free 0"), "rc 0");
    assert_eq!(b.ask("used 0"), GIB.to_string());
}

#[test]
fn a_killed_process_gives_its_memory_back() {
    if std::env::var_os("FAKEGPU_TEST_SCENARIO").is_some() {
        return;
    }
    let node = Node::two_cards();
    let mut survivor = node.agent();
    let mut victim = node.agent();
    assert_eq!(victim.ask(&format!("alloc 1 {}", 800 * MIB)), "ok 0");
    assert_eq!(
        survivor.ask(&format!("alloc 1 {}", 300 * MIB)),
        format!("err {CUDA_ERROR_OUT_OF_MEMORY}")
    );
    victim.kill();
    // No cleanup ran in the victim; the survivor's next look drains its slot.
    assert_eq!(survivor.ask("used 1"), "0");
    assert_eq!(survivor.ask(&format!("alloc 1 {}", GIB)), "ok 0");

    // A process that exits normally without freeing is drained the same way.
    let mut quitter = node.agent();
    assert_eq!(quitter.ask(&format!("alloc 0 {}", GIB)), "ok 0");
    assert_eq!(survivor.ask("used 0"), GIB.to_string());
    quitter.quit();
    assert_eq!(survivor.ask("used 0"), "0");
}

#[test]
fn a_fork_child_initialises_afresh() {
    scenario("a_fork_child_initialises_afresh", |cuda| {
        cuda.init_device(0);
        let held = cuda.alloc(GIB).unwrap();
        // SAFETY: the child only calls into the fake driver and `_exit`s.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = (|| {
                let mut count = 0;
                if rc!((cuda.cuDeviceGetCount)(&mut count)) != CUDA_ERROR_NOT_INITIALIZED {
                    return 10; // the parent's driver state must not leak into the child
                }
                if rc!((cuda.cuInit)(0)) != CUDA_SUCCESS {
                    return 11;
                }
                let mut ctx = std::ptr::null_mut();
                if rc!((cuda.cuDevicePrimaryCtxRetain)(&mut ctx, 0)) != 0
                    || rc!((cuda.cuCtxSetCurrent)(ctx)) != 0
                {
                    return 12;
                }
                if rc!((cuda.fakegpu_process_memory_used)(0)) != 0 {
                    return 13; // a slot of its own
                }
                if rc!((cuda.fakegpu_device_memory_used)(0)) != GIB {
                    return 14; // the parent's memory still counts on the card
                }
                let Ok(ptr) = cuda.alloc(2 * GIB) else {
                    return 15;
                };
                if cuda.alloc(2 * GIB) != Err(CUDA_ERROR_OUT_OF_MEMORY) {
                    return 16;
                }
                if rc!((cuda.cuMemFree_v2)(ptr)) != 0 {
                    return 17;
                }
                let _ = cuda.alloc(GIB); // left for the exit to give back
                0
            })();
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "child died: {status}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "child step failed (see the codes above)"
        );
        assert_eq!(
            rc!((cuda.fakegpu_device_memory_used)(0)),
            GIB,
            "only the parent's memory is left"
        );
        assert_eq!(rc!((cuda.fakegpu_process_memory_used)(0)), GIB);
        ok!((cuda.cuMemFree_v2)(held));
        assert_eq!(
            cuda.alloc(4 * GIB).map(|_| ()),
            Ok(()),
            "the parent's slot outlived the child"
        );
    });
}
