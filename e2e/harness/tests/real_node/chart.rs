//! Tessera as a user installs it, on the real node.

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, LogParams, Patch, PatchParams, PostParams,
};
use std::path::Path;

use serde_json::{Value, json};
use tessera_chart_tests::{Helm, Release, install};
use tessera_e2e_harness::K8sVersion;
use tessera_e2e_harness::cluster::default_sharing_mode;
use tessera_e2e_harness::cluster::workspace::{Artifacts, bin_dir};
use tessera_e2e_harness::realnode::{RealNode, tessera};
use tessera_e2e_harness::workloads::{self, Selection, Share};

use crate::support::*;

pub(crate) use tessera_e2e_harness::realnode::tessera::Worker;

pub(crate) fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Tessera installed as a user installs it: Tessera's images (built here, imported into the
/// node's containerd) and the Helm chart, unchanged in shape, with the fake driver under a
/// driver root as the GPU Operator lays it out.
pub(crate) struct Tessera {
    workloads: tessera::Workloads,
    system_pods: Api<Pod>,
}

pub(crate) const NAMESPACE: &str = tessera::NAMESPACE;
/// The extended resource the chart maps to the generic DeviceClass on 1.36+.
pub(crate) const EXTENDED_RESOURCE: &str = "gpu.tessera.dev/gpu";

impl Tessera {
    /// Installs the chart and waits until the plugin's pod runs on the node and is registered
    /// with the kubelet, the node's slices are published and both controller pods are Ready.
    /// `None` where the test cannot run (see `require`).
    pub(crate) async fn install(setup: &Setup, version: K8sVersion) -> Option<Tessera> {
        Tessera::install_with(setup, version, None).await
    }

    /// [`Tessera::install`], with the fake GPU's state and node config (`node.json`) in
    /// `fake_gpu`, a host directory, for the plugin (mounted at `/fakegpu`) and the workload pods
    /// alike; `None`: the fake driver's default node.
    pub(crate) async fn install_with(
        setup: &Setup,
        version: K8sVersion,
        fake_gpu: Option<&Path>,
    ) -> Option<Tessera> {
        let test = &setup.test;
        let node = &setup.node;
        let client = setup.control_plane.client();
        required(test, Artifacts::locate(&bin_dir()))?;
        let helm = required(test, Helm::locate())?;
        let tag = tessera::prepare_node(node)
            .unwrap_or_else(|e| panic!("Tessera's images and the fake driver on the node: {e}"));
        let nodes: Api<Node> = Api::all(client.clone());
        nodes
            .patch(
                node.name(),
                &PatchParams::default(),
                &Patch::Merge(
                    json!({ "metadata": { "labels": { "gpu.tessera.dev/enabled": "true" } } }),
                ),
            )
            .await
            .expect("labelling the node");
        // Extended resources where the release has them (1.36+): scenarios ask for a GPU
        // through `resources.limits` too.
        let extra = if version.minor() >= 36 {
            json!({ "deviceClass": { "extendedResourceName": EXTENDED_RESOURCE } })
        } else {
            json!({})
        };
        let mut values = tessera::chart_values(node, default_sharing_mode(version), &tag, extra);
        if let Some(dir) = fake_gpu {
            let plugin = &mut values["kubeletPlugin"];
            for (name, value) in [
                ("FAKEGPU_CONFIG", "/fakegpu/node.json"),
                ("FAKEGPU_STATE", "/fakegpu/state"),
            ] {
                if let Some(env) = plugin["extraEnv"].as_array_mut() {
                    env.push(json!({ "name": name, "value": value }));
                }
            }
            if let Some(volumes) = plugin["extraVolumes"].as_array_mut() {
                volumes.push(
                    json!({ "name": "fake-gpu", "hostPath": { "path": dir, "type": "Directory" } }),
                );
            }
            if let Some(mounts) = plugin["extraVolumeMounts"].as_array_mut() {
                mounts.push(json!({ "name": "fake-gpu", "mountPath": "/fakegpu" }));
            }
        }
        install(
            &client,
            &helm,
            &Release::new(tessera::RELEASE, NAMESPACE).values(&values.to_string()),
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("installing the chart: {e}"));
        let tessera = Tessera {
            workloads: match fake_gpu {
                Some(dir) => tessera::Workloads::with_fake_gpu(&tag, dir),
                None => tessera::Workloads::for_node(node, &tag)
                    .unwrap_or_else(|e| panic!("the node's workload pods: {e}")),
            },
            system_pods: Api::namespaced(client.clone(), NAMESPACE),
        };

        tessera.wait_plugin_ready(node, &[]).await;
        wait_until("the kubelet registering the plugin", node, || async {
            (kubelet_registrations(&node.kubelet_log_since_start()) > 0)
                .then_some(())
                .ok_or_else(|| "no registration in the kubelet's log".to_owned())
        })
        .await;

        let slices_resource = version.resource_api("ResourceSlice", "resourceslices");
        let slices: Api<DynamicObject> = Api::all_with(client.clone(), &slices_resource);
        wait_until("a ResourceSlice of the node, from NVML", node, || async {
            let list = slices
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            let devices: usize = list
                .items
                .iter()
                .filter(|s| s.data["spec"]["nodeName"].as_str() == Some(node.name()))
                .map(|s| s.data["spec"]["devices"].as_array().map_or(0, Vec::len))
                .sum();
            (devices > 0).then_some(()).ok_or_else(|| {
                format!(
                    "{} slices, none with devices for the node",
                    list.items.len()
                )
            })
        })
        .await;
        wait_until("both controller pods Ready", node, || async {
            let pods = tessera.pods("controller").await?;
            if pods.len() == 2 && pods.iter().all(all_ready) {
                Ok(())
            } else {
                Err(pods.iter().map(pod_summary).collect::<Vec<_>>().join(" | "))
            }
        })
        .await;
        Some(tessera)
    }

    /// The chart's pods of one component (`kubelet-plugin`, `controller`).
    pub(crate) async fn pods(&self, component: &str) -> Result<Vec<Pod>, String> {
        self.system_pods
            .list(
                &ListParams::default().labels(&format!("app.kubernetes.io/component={component}")),
            )
            .await
            .map(|l| l.items)
            .map_err(|e| e.to_string())
    }

    /// Waits for exactly one plugin pod, Ready on the node, whose UID is none of `not`;
    /// returns it.
    pub(crate) async fn wait_plugin_ready(&self, node: &RealNode, not: &[String]) -> Pod {
        let found = std::sync::Mutex::new(None);
        wait_until("one plugin pod Running on the node", node, || {
            let found = &found;
            async move {
                let pods = self.pods("kubelet-plugin").await?;
                match pods.as_slice() {
                    [pod]
                        if all_ready(pod)
                            && pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
                                == Some(node.name())
                            && !pod.metadata.uid.as_ref().is_some_and(|u| not.contains(u)) =>
                    {
                        *found.lock().expect("lock") = Some(pod.clone());
                        Ok(())
                    }
                    other => Err(other
                        .iter()
                        .map(pod_summary)
                        .collect::<Vec<_>>()
                        .join(" | ")),
                }
            }
        })
        .await;
        found.into_inner().expect("lock").expect("set when done")
    }

    /// A pod of the workload image (see [`tessera::Workloads::pod`]) with `/sync` shared
    /// between its workers: a host directory when given (the test releases holders by writing
    /// into it), else an emptyDir.
    pub(crate) fn pod(
        &self,
        name: &str,
        claim: Value,
        workers: &[Worker<'_>],
        sync: Option<&Path>,
    ) -> Pod {
        let shared = match sync {
            Some(dir) => json!({ "hostPath": { "path": dir, "type": "Directory" } }),
            None => json!({ "emptyDir": {} }),
        };
        self.workloads
            .pod(name, claim, workers, shared, "/sync")
            .expect("pod object")
    }

    /// Runs a one-worker pod on claim template `template` until it ends; returns the pod and
    /// its log.
    pub(crate) async fn run_worker(
        &self,
        client: &kube::Client,
        node: &RealNode,
        name: &str,
        template: &str,
        worker_args: &[&str],
    ) -> (Pod, String) {
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        let worker = Worker {
            name: "worker",
            args: args(worker_args),
        };
        let pod = self.pod(
            name,
            json!({ "resourceClaimTemplateName": template }),
            &[worker],
            None,
        );
        pods.create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("creating pod {name}: {e}"));
        let pod = wait_for_phase(&pods, name, &["Succeeded", "Failed"], node).await;
        let log = pods
            .logs(name, &LogParams::default())
            .await
            .unwrap_or_else(|e| panic!("pods/log of {name}: {e}"));
        (pod, log)
    }
}

/// How many times the kubelet logged registering Tessera's DRA plugin in `log`.
pub(crate) fn kubelet_registrations(log: &str) -> usize {
    log.lines()
        .filter(|l| {
            // 1.37 logs the first after validating the plugin's versions, 1.31 the second.
            (l.contains("Registered DRA plugin") || l.contains("Register new DRA plugin"))
                && l.contains("gpu.tessera.dev")
        })
        .count()
}

/// The cuMemGetInfo total the worker printed, in GiB.
pub(crate) fn worker_total_gib(log: &str) -> f64 {
    log.lines()
        .find_map(|l| l.split(" free of ").nth(1))
        .and_then(|t| t.trim().strip_suffix(" GiB"))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no cuMemGetInfo line in the worker's output:\n{log}"))
}

/// The chart on the real node: the plugin DaemonSet runs there (privileged, host paths),
/// registers with the real kubelet and publishes the node's slices from NVML; the controller
/// Deployment's pods become Ready (the kubelet probes them on the pod network); and a pod of
/// the workload image, holding only the test CUDA program, gets the shim, its config and the
/// driver through the CDI spec alone: it sees its slice and hits the wall.
async fn the_chart_runs_on_the_node(version: K8sVersion) {
    let Some(setup) = setup(version, "real_node_chart", 3).await else {
        return;
    };
    let Some(tessera) = Tessera::install(&setup, version).await else {
        return;
    };
    let (test, began) = (setup.test.clone(), setup.began);
    let node = &setup.node;
    let client = setup.control_plane.client();
    let share = Share {
        memory: "2Gi".into(),
        cores: 25,
        tenths: 2,
        gpu_config: None,
    };
    let template = workloads::claim_template(
        version,
        "default",
        "one-gpu",
        &Selection::class("gpu.tessera.dev"),
        &share,
    );
    workloads::create(&client, &template)
        .await
        .expect("creating ResourceClaimTemplate one-gpu");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    // What the slice is differs by sharing mode (2 GiB, or 2 tenths of the card): read it.
    let (pod, log) = tessera
        .run_worker(
            &client,
            node,
            "sees-its-slice",
            "one-gpu",
            &["--allocate", "256Mi"],
        )
        .await;
    assert_eq!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded"),
        "status: {}\noutput:\n{log}\nkubelet log:\n{}",
        pod_summary(&pod),
        node.kubelet_log_tail(40)
    );
    let total_gib = worker_total_gib(&log);
    assert!(
        total_gib > 0.0 && total_gib < 24.0,
        "cuMemGetInfo's total is {total_gib} GiB, not the slice's (the card has 24):\n{log}"
    );
    let beyond = format!("{}Mi", (total_gib * 1024.0) as u64 + 512);
    let (pod, log) = tessera
        .run_worker(
            &client,
            node,
            "hits-the-wall",
            "one-gpu",
            &["--allocate", &beyond, "--step", "256Mi"],
        )
        .await;
    assert_eq!(
        workloads::exit_code(&pod, "worker"),
        Some(1),
        "allocating {beyond} in a {total_gib} GiB slice: {}\noutput:\n{log}",
        pod_summary(&pod)
    );
    assert!(
        log.contains("CUDA_ERROR_OUT_OF_MEMORY"),
        "the wall was not the driver's out-of-memory:\n{log}"
    );
    for name in ["sees-its-slice", "hits-the-wall"] {
        pods.delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("deleting pod {name}: {e}"));
        wait_gone(&pods, name, node).await;
    }
    // The kubelet probed both kinds of pod over the pod network all along.
    for component in ["kubelet-plugin", "controller"] {
        for pod in tessera
            .pods(component)
            .await
            .expect("listing Tessera's pods")
        {
            let restarts: i32 = pod
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .map_or(0, |cs| cs.iter().map(|c| c.restart_count).sum());
            assert_eq!(restarts, 0, "{} restarted", pod_summary(&pod));
        }
    }
    stop_node(setup.node);
    eprintln!("{test}: passed in {:.1}s", began.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_node_chart_v1_37() {
    the_chart_runs_on_the_node(K8sVersion::newest()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_node_chart_v1_31() {
    the_chart_runs_on_the_node(tessera_e2e_harness::versions::PINNED[0]).await;
}
