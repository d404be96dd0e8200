//! Every claim is on its GPUs' boards, however many came before it: a claim's entries (one
//! compute, one memory file per GPU) are created when it is prepared and removed when it is
//! unprepared, so a GPU that has seen 1,000 claims start and end holds only the entries of the
//! claims still prepared — there is no table to fill and no entry left to age out. (The shim
//! side, a claim yielding to a higher one and using an idle GPU through its entry, is
//! `shim/tests/compute_share.rs`; a shim that cannot open its entry says so on stderr.)

mod support;

use support::*;

const NS: &str = "batch";

fn uid(n: u32) -> String {
    format!("{n:08x}-0000-4000-8000-00000000b0a2")
}

fn share_id(n: u32) -> String {
    format!("{n:08x}-1111-4000-8000-000000000001")
}

/// Every file under the GPU's board directory.
fn board_of(env: &Env, gpu: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(env.path("state/boards").join(gpu))
        .map(|dir| {
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_claims_come_and_go_on_one_gpu_and_the_last_is_still_on_the_board() {
    let env = Env::new(&["v1"]);
    let instance = env.start(None, None).await;
    // A neighbour prepared throughout, as a long-running inference claim would be.
    env.api.put(claim(
        NS,
        "resident",
        &uid(100_000),
        Some(vec![share("gpu", "gpu-0", &share_id(100_000), "2Gi", "30")]),
        vec![],
    ));
    let resident = Claim::new(NS, "resident", &uid(100_000));
    instance.kubelet.prepare_ok(Version::V1, &resident).await;
    const CLAIMS: u32 = 1_000;
    for n in 0..CLAIMS {
        let name = format!("job-{n}");
        env.api.put(claim(
            NS,
            &name,
            &uid(n),
            Some(vec![share("gpu", "gpu-0", &share_id(n), "1Gi", "10")]),
            vec![],
        ));
        let job = Claim::new(NS, &name, &uid(n));
        instance.kubelet.prepare_ok(Version::V1, &job).await;
        if n + 1 < CLAIMS {
            instance.kubelet.unprepare_ok(Version::V1, &job).await;
        }
    }
    let last = uid(CLAIMS - 1);
    // `assert_prepared` checks the last claim's own compute and memory entries on GPU 0.
    env.assert_prepared(&last);
    let mut expected: Vec<String> = [&last, &uid(100_000)]
        .iter()
        .flat_map(|u| env.board_entries(u))
        .map(|e| e.trim_start_matches(&format!("{GPU0}/")).to_string())
        .collect();
    expected.sort();
    assert_eq!(expected.len(), 4, "{expected:?}");
    assert_eq!(
        board_of(&env, GPU0),
        expected,
        "only the two prepared claims' entries are left on GPU 0"
    );
    for n in [0, 500, CLAIMS - 2] {
        env.assert_clean(&uid(n));
    }
    instance.stop().await;
}
