//! The driver's own memory wall on the real node (NVML 13.4 per-cgroup limits, which the fake
//! driver models): the plugin finds it at start-up, each claim's CDI spec runs
//! `tessera-cdi-hook` as containerd creates the container, and a program that never loads the
//! shim stops at its claim's memory on the card, where the shim alone could not hold it.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use tessera_e2e_harness::K8sVersion;
use tessera_e2e_harness::workloads::{self, Selection, Share};

use crate::chart::{Tessera, worker_total_gib};
use crate::support::*;

/// The fake GPU of the node: the default node's RTX 4090 with the driver's wall, and contexts
/// that cost what the fake driver's default charges (320 MiB).
const NODE: &str = r#"{"driverVersion": "595.10.01", "cudaDriverVersion": 13040, "devices": [
    {"uuid": "GPU-4090a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2b", "name": "NVIDIA GeForce RTX 4090",
     "memory": 25769803776, "pciBusId": "0000:01:00.0", "brand": "geforce",
     "memoryLimits": true}]}"#;

async fn a_program_that_bypasses_the_shim_stops_at_its_claims_limit(version: K8sVersion) {
    // containerd runs the hook; the hook's NVML (the fake one) reads the node and its state
    // from containerd's environment, as the real one needs none.
    let fake_gpu_dir = std::cell::RefCell::new(None);
    let Some(setup) = setup_with(version, "real_node_driver_wall", 3, |state| {
        let dir = state.join("fake-gpu");
        std::fs::create_dir_all(&dir).expect("the fake GPU's directory");
        std::fs::write(dir.join("node.json"), NODE).expect("the fake GPU's node");
        *fake_gpu_dir.borrow_mut() = Some(dir.clone());
        vec![
            ("FAKEGPU_CONFIG".into(), dir.join("node.json").into()),
            ("FAKEGPU_STATE".into(), dir.join("state").into()),
        ]
    })
    .await
    else {
        return;
    };
    let fake_gpu = fake_gpu_dir.into_inner().expect("made by the setup");
    let Some(tessera) = Tessera::install_with(&setup, version, Some(&fake_gpu)).await else {
        return;
    };
    let (test, began) = (setup.test.clone(), setup.began);
    let node = &setup.node;
    let client = setup.control_plane.client();
    let share = Share {
        memory: "2Gi".into(),
        cores: 25,
        tenths: 1,
        gpu_config: None,
    };
    let template = workloads::claim_template(
        version,
        "default",
        "walled",
        &Selection::class("gpu.tessera.dev")
            .cel("device.attributes[\"gpu.tessera.dev\"].driverMemoryWall"),
        &share,
    );
    workloads::create(&client, &template)
        .await
        .expect("creating ResourceClaimTemplate walled");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    // Through the shim: its own wall, in the slice it sees.
    let (pod, shimmed) = tessera
        .run_worker(
            &client,
            node,
            "through-the-shim",
            "walled",
            &["--allocate", "24Gi", "--step", "256Mi"],
        )
        .await;
    assert_eq!(workloads::exit_code(&pod, "worker"), Some(1), "{shimmed}");
    let wall = worker_total_gib(&shimmed);
    // Around the shim: only the driver's wall can stop it.
    let (pod, bypassing) = tessera
        .run_worker(
            &client,
            node,
            "around-the-shim",
            "walled",
            &["--allocate", "24Gi", "--step", "256Mi", "--bypass-shim"],
        )
        .await;
    assert_eq!(
        workloads::exit_code(&pod, "worker"),
        Some(1),
        "a program that bypasses the shim was not stopped (claim of {wall} GiB):\n{bypassing}\nkubelet log:\n{}",
        node.kubelet_log_tail(40)
    );
    let allocated: f64 = bypassing
        .lines()
        .find_map(|l| l.split(" with ").nth(1))
        .and_then(|t| t.split(" GiB").next())
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("no out-of-memory line:\n{bypassing}"));
    assert!(
        allocated <= wall && allocated + 0.25 + 320.0 / 1024.0 >= wall,
        "without the shim the program got {allocated} GiB of a {wall} GiB claim:\n{bypassing}"
    );
    for name in ["through-the-shim", "around-the-shim"] {
        pods.delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("deleting pod {name}: {e}"));
        wait_gone(&pods, name, node).await;
    }
    stop_node(setup.node);
    eprintln!("{test}: passed in {:.1}s", began.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_node_driver_wall_v1_37() {
    a_program_that_bypasses_the_shim_stops_at_its_claims_limit(K8sVersion::newest()).await;
}
