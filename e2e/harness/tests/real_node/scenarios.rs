//! Tessera, installed from its chart, on the real kubelet while the node's parts come and go:
//! selection by model and by UUID, device metadata read inside a container, two containers on
//! one claim, high priority granted by the admin's namespace label (under the chart's RBAC), the
//! kubelet restarted with a prepared claim, the plugin's pod deleted while claims are prepared
//! (one pod running, one between prepare and container start), a GPU's XID shown in its pod's
//! status (1.36+), the DaemonSet rolled while a claim is prepared, a claim deleted before it is
//! unprepared, and the node rebooted with a prepared claim. After each, the claim's CDI spec is
//! gone from the node: the kubelet unprepared it through whichever plugin instance ran then.

use std::path::{Path, PathBuf};
use std::time::Instant;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Event, Namespace, Pod};
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, LogParams, Patch, PatchParams, PostParams,
};
use serde_json::{Value, json};
use tessera_e2e_harness::K8sVersion;
use tessera_e2e_harness::realnode::{BUSYBOX_IMAGE, RealNode, tessera as on_node};
use tessera_e2e_harness::workloads::{self, Selection, Share};

use crate::chart::{
    EXTENDED_RESOURCE, NAMESPACE, Tessera, Worker, args, kubelet_registrations, worker_total_gib,
};
use crate::support::*;

const RTX_4090: &str = "GPU-4090a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2b";
const L40S: &str = "GPU-40540c5d-e6f7-4a8b-9c0d-1e2f3a4b5c6d";
/// The plugin's answer to a claim that gave itself high priority.
const REFUSAL: &str = "only the cluster admin may grant high priority";

struct Scenarios<'a> {
    node: &'a RealNode,
    client: kube::Client,
    pods: Api<Pod>,
    tessera: &'a Tessera,
    version: K8sVersion,
}

impl<'a> Scenarios<'a> {
    fn new(
        node: &'a RealNode,
        client: &kube::Client,
        tessera: &'a Tessera,
        version: K8sVersion,
    ) -> Scenarios<'a> {
        Scenarios {
            node,
            client: client.clone(),
            pods: Api::namespaced(client.clone(), "default"),
            tessera,
            version,
        }
    }

    async fn template(&self, name: &str, selection: &Selection) {
        self.template_with(name, selection, None).await;
    }

    /// A template that also sets `gpu_config` fields in the claim's own config.
    async fn template_with(&self, name: &str, selection: &Selection, gpu_config: Option<Value>) {
        let share = Share {
            memory: "2Gi".into(),
            cores: 25,
            tenths: 2,
            gpu_config,
        };
        let template = workloads::claim_template(self.version, "default", name, selection, &share);
        workloads::create(&self.client, &template)
            .await
            .unwrap_or_else(|e| panic!("creating ResourceClaimTemplate {name}: {e}"));
    }

    async fn create(&self, pod: &Pod) {
        let name = pod.metadata.name.clone().unwrap_or_default();
        self.pods
            .create(&PostParams::default(), pod)
            .await
            .unwrap_or_else(|e| panic!("creating pod {name}: {e}"));
    }

    async fn finished(&self, name: &str) -> (Pod, String) {
        let pod = wait_for_phase(&self.pods, name, &["Succeeded", "Failed"], self.node).await;
        (pod, self.logs(name).await)
    }

    /// Each container's log, `[name]` before it.
    async fn logs(&self, name: &str) -> String {
        self.container_logs(name)
            .await
            .into_iter()
            .map(|(container, log)| format!("[{container}]\n{log}"))
            .collect()
    }

    async fn container_logs(&self, name: &str) -> Vec<(String, String)> {
        let pod = self.pods.get(name).await.expect("reading pod");
        let mut logs = Vec::new();
        for c in pod.spec.map(|s| s.containers).unwrap_or_default() {
            let log = self
                .pods
                .logs(
                    name,
                    &LogParams {
                        container: Some(c.name.clone()),
                        ..LogParams::default()
                    },
                )
                .await
                .unwrap_or_else(|e| format!("(no log: {e})"));
            logs.push((c.name, log));
        }
        logs
    }

    /// Waits until every container of the pod has printed `holding`: its memory is allocated
    /// and its claim prepared.
    async fn holding(&self, name: &str) {
        wait_until(
            &format!("pod {name} holding its memory"),
            self.node,
            || async {
                let logs = self.container_logs(name).await;
                if !logs.is_empty() && logs.iter().all(|(_, log)| log.contains("holding ")) {
                    Ok(())
                } else {
                    Err(format!("{logs:?}"))
                }
            },
        )
        .await;
    }

    /// Deletes the pod, waits until it is gone (the kubelet unprepared its claim), and checks
    /// that the claim's CDI spec is gone from the node.
    async fn delete(&self, name: &str) {
        let claim_uids = self.claim_uids(name).await;
        self.delete_with_claims(name, claim_uids).await;
    }

    /// [`Scenarios::delete`] for a pod whose claims are `claim_uids`.
    async fn delete_with_claims(&self, name: &str, claim_uids: Vec<String>) {
        self.pods
            .delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("deleting pod {name}: {e}"));
        wait_gone(&self.pods, name, self.node).await;
        for uid in claim_uids {
            let spec = self.node.cdi_dir().join(format!("tessera-{uid}.json"));
            wait_until(
                &format!("the CDI spec of pod {name}'s claim removed"),
                self.node,
                || async {
                    (!spec.exists())
                        .then_some(())
                        .ok_or_else(|| format!("{} exists", spec.display()))
                },
            )
            .await;
        }
    }

    /// A pod that asks for `gpu.tessera.dev/gpu: 1` in `resources.limits`, with no
    /// ResourceClaim (KEP-5004): the scheduler makes the claim from the chart's class, the real
    /// kubelet has the plugin prepare it, and the worker gets one whole GPU (the class's default
    /// share in consumable mode), with the claim saying so in its status. A name no class maps
    /// stays Pending with the scheduler naming it.
    async fn extended_resource(&self, tessera: &Tessera) {
        let sync = self.sync_dir("extended");
        let as_extended = |name: &str, resource: &str| {
            let mut pod = tessera.pod(
                name,
                json!({ "resourceClaimTemplateName": "unused" }),
                &[Worker {
                    name: "worker",
                    args: args(&["--allocate", "64Mi", "--hold-until", "/sync/release"]),
                }],
                Some(&sync),
            );
            let spec = pod.spec.as_mut().expect("pod spec");
            spec.resource_claims = None;
            spec.containers[0].resources = serde_json::from_value(
                json!({ "limits": { resource: "1" }, "requests": { resource: "1" } }),
            )
            .ok();
            pod
        };
        self.create(&as_extended("extended", EXTENDED_RESOURCE))
            .await;
        self.holding("extended").await;
        // The scheduler's claim, named in the pod's status (read raw: the field is newer than
        // the typed Pod), prepared and described by the plugin while the pod runs (the claim
        // goes with the pod).
        let pods: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            "default",
            &kube::core::ApiResource::erase::<Pod>(&()),
        );
        let raw = pods.get("extended").await.expect("reading the pod");
        let claim_name = raw.data["status"]["extendedResourceClaimStatus"]["resourceClaimName"]
            .as_str()
            .unwrap_or_else(|| panic!("no extendedResourceClaimStatus: {}", raw.data["status"]))
            .to_string();
        let claim = self.claims().get(&claim_name).await.expect("the claim");
        let claim_uid = claim.metadata.uid.clone().unwrap_or_default();
        let spec = self
            .node
            .cdi_dir()
            .join(format!("tessera-{claim_uid}.json"));
        assert!(spec.exists(), "prepared: {}", spec.display());
        wait_until("the claim's status.devices", self.node, || async {
            let claim = self
                .claims()
                .get(&claim_name)
                .await
                .map_err(|e| e.to_string())?;
            let device = &claim.data["status"]["devices"][0];
            (device["conditions"][0]["type"] == "Ready" && device["data"]["cores"] == 100)
                .then_some(())
                .ok_or_else(|| format!("{}", claim.data["status"]))
        })
        .await;
        Scenarios::release(&sync);
        let (pod, log) = self.finished("extended").await;
        Scenarios::assert_succeeded(&pod, &log);
        let total = worker_total_gib(&log);
        assert!(
            total > 20.0,
            "a whole GPU (24 or 48 GiB), the class's default share: {total} GiB\n{log}"
        );
        // The scheduler's claim is named in the pod's status, not where `claim_uids` looks.
        self.delete_with_claims("extended", vec![claim_uid]).await;

        // A name no class maps: Pending, and the scheduler says which resource is missing.
        let unmapped = "gpu.tessera.dev/gpu-typo";
        self.create(&as_extended("unmapped", unmapped)).await;
        wait_until(
            "the scheduler naming the unmapped resource",
            self.node,
            || async {
                let pod = self.pods.get("unmapped").await.map_err(|e| e.to_string())?;
                let message = pod
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .into_iter()
                    .find(|c| c.type_ == "PodScheduled" && c.status == "False")
                    .and_then(|c| c.message)
                    .unwrap_or_default();
                message
                    .contains(&format!("Insufficient {unmapped}"))
                    .then_some(())
                    .ok_or(message)
            },
        )
        .await;
        self.pods
            .delete("unmapped", &DeleteParams::default())
            .await
            .expect("deleting the pod");
        wait_gone(&self.pods, "unmapped", self.node).await;
    }

    async fn claim_uids(&self, pod: &str) -> Vec<String> {
        let pod = self.pods.get(pod).await.expect("reading pod");
        let names: Vec<String> = pod
            .status
            .and_then(|s| s.resource_claim_statuses)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|s| s.resource_claim_name)
            .chain(
                pod.spec
                    .and_then(|s| s.resource_claims)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|c| c.resource_claim_name),
            )
            .collect();
        let claims = self.claims();
        let mut uids = Vec::new();
        for name in names {
            if let Some(claim) = claims.get_opt(&name).await.expect("reading claim") {
                uids.extend(claim.metadata.uid);
            }
        }
        uids
    }

    /// KEP-4680 on the real kubelet: the plugin's `DRAResourceHealth` stream puts the health
    /// of a pod's GPU into its container status (`allocatedResourcesStatus`): `Healthy` while
    /// the L40S is, then `Unhealthy` with the XID in the message once the fake driver reports
    /// XID 79 on it. The claim tolerates the XID taint, so the pod stays to show it (without,
    /// the taint evicts it). The L40S stays withdrawn until the plugin restarts.
    async fn health_in_pod_status(&self) {
        let name = "health-watched";
        let selection = Selection::class("gpu.tessera.dev").cel(&format!(
            r#"device.attributes["gpu.tessera.dev"].uuid == "{L40S}""#
        ));
        let share = Share {
            memory: "2Gi".into(),
            cores: 25,
            tenths: 2,
            gpu_config: None,
        };
        let mut template =
            workloads::claim_template(self.version, "default", name, &selection, &share);
        template["spec"]["spec"]["devices"]["requests"][0]["exactly"]["tolerations"] = json!([{
            "key": "gpu.tessera.dev/xid", "operator": "Exists", "effect": "NoExecute",
        }]);
        workloads::create(&self.client, &template)
            .await
            .unwrap_or_else(|e| panic!("creating ResourceClaimTemplate {name}: {e}"));
        let sync = self
            .start_holder(name, json!({ "resourceClaimTemplateName": name }))
            .await;
        // The pod's status as served: k8s-openapi's types lag the health message.
        let pods: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            "default",
            &kube::api::ApiResource::erase::<Pod>(&()),
        );
        let gpu_health = || async {
            let pod = pods.get(name).await.map_err(|e| e.to_string())?;
            let status = pod.data["status"]["containerStatuses"][0]["allocatedResourcesStatus"]
                .as_array()
                .and_then(|s| s.iter().find(|r| r["name"] == "claim:gpu"))
                .map(|r| r["resources"][0].clone())
                .unwrap_or(Value::Null);
            Ok::<Value, String>(status)
        };
        wait_until(
            "the pod's status showing its GPU healthy",
            self.node,
            || async {
                let status = gpu_health().await?;
                (status["health"] == "Healthy")
                    .then_some(())
                    .ok_or_else(|| format!("allocatedResourcesStatus: {status}"))
            },
        )
        .await;
        // The fake NVML delivers an XID only to a watcher already registered, as NVML does:
        // appended again until the plugin has seen it (repeats change nothing).
        let events = on_node::fake_xid_events(self.node);
        let xid = format!("{}\n", json!({ "uuid": L40S, "xid": 79 }));
        wait_until(
            "the pod's status showing its GPU unhealthy with the XID",
            self.node,
            || async {
                use std::io::Write;
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&events)
                    .and_then(|mut f| f.write_all(xid.as_bytes()))
                    .map_err(|e| format!("appending to {}: {e}", events.display()))?;
                let status = gpu_health().await?;
                let message = status["message"].as_str().unwrap_or_default();
                (status["health"] == "Unhealthy"
                    && message.contains("XID 79")
                    && message.contains(L40S))
                .then_some(())
                .ok_or_else(|| format!("allocatedResourcesStatus: {status}"))
            },
        )
        .await;
        self.release_and_delete(name, &sync).await;
    }

    fn claims(&self) -> Api<DynamicObject> {
        let resource = self.version.resource_api("ResourceClaim", "resourceclaims");
        Api::namespaced_with(self.client.clone(), "default", &resource)
    }

    /// A host directory for pod `name`'s `/sync`; writing `release` into it lets holders go.
    fn sync_dir(&self, name: &str) -> PathBuf {
        let dir = self.node.root().join("sync").join(name);
        std::fs::create_dir_all(&dir).expect("creating a sync directory");
        dir
    }

    fn release(dir: &Path) {
        std::fs::write(dir.join("release"), b"").expect("releasing the holders");
    }

    /// Starts pod `name` with one holder on `claim` and waits until it holds its memory;
    /// returns the directory whose `release` lets it go.
    async fn start_holder(&self, name: &str, claim: Value) -> PathBuf {
        let sync = self.sync_dir(name);
        self.create(
            &self
                .tessera
                .pod(name, claim, &[Scenarios::holder("worker")], Some(&sync)),
        )
        .await;
        self.holding(name).await;
        sync
    }

    /// Lets the holders of pod `name` go, checks that it succeeded, and deletes it (see
    /// [`Scenarios::delete`]).
    async fn release_and_delete(&self, name: &str, sync: &Path) {
        Scenarios::release(sync);
        let (pod, log) = self.finished(name).await;
        Scenarios::assert_succeeded(&pod, &log);
        self.delete(name).await;
    }

    /// A worker that allocates a little and holds it until `/sync/release` exists.
    fn holder(name: &str) -> Worker<'_> {
        Worker {
            name,
            args: args(&["--allocate", "256Mi", "--hold-until", "/sync/release"]),
        }
    }

    fn assert_succeeded(pod: &Pod, log: &str) {
        assert_eq!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded"),
            "{}\noutput:\n{log}",
            pod_summary(pod)
        );
    }

    async fn plugin_uid(&self) -> String {
        self.tessera
            .wait_plugin_ready(self.node, &[])
            .await
            .metadata
            .uid
            .unwrap_or_default()
    }

    /// Waits until the kubelet (since its last start) has registered the plugin `times` times.
    async fn registered(&self, times: usize) {
        wait_until(
            &format!("the kubelet registering the plugin ({times} times since it started)"),
            self.node,
            || async {
                let n = kubelet_registrations(&self.node.kubelet_log_since_start());
                (n >= times)
                    .then_some(())
                    .ok_or_else(|| format!("{n} registrations"))
            },
        )
        .await;
    }

    /// Events of the default namespace that say a claim failed to prepare or unprepare.
    async fn failed_claim_events(&self) -> Vec<String> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), "default");
        events
            .list(&ListParams::default())
            .await
            .expect("listing events")
            .items
            .into_iter()
            .filter(|e| {
                let reason = e.reason.as_deref().unwrap_or_default();
                reason.contains("DynamicResources") || reason.contains("ResourceClaim")
            })
            .filter(|e| e.type_.as_deref() == Some("Warning"))
            .map(|e| {
                format!(
                    "{} {}: {}",
                    e.involved_object.name.as_deref().unwrap_or_default(),
                    e.reason.as_deref().unwrap_or_default(),
                    e.message.as_deref().unwrap_or_default()
                )
            })
            .collect()
    }
}

async fn scenarios(version: K8sVersion) {
    let Some(mut setup) = setup(version, "real_node_scenarios", 3).await else {
        return;
    };
    let Some(tessera) = Tessera::install(&setup, version).await else {
        return;
    };
    let (test, began) = (setup.test.clone(), setup.began);
    let client = setup.control_plane.client();
    let step = |what: &str| eprintln!("{test}: {what} ({:.1}s)", began.elapsed().as_secs_f64());

    // Selection by model and by UUID: the worker sees the GPU the CEL picked.
    let class = Selection::class("gpu.tessera.dev");
    {
        let s = Scenarios::new(&setup.node, &client, &tessera, version);
        step("selection by model and by UUID");
        s.template(
            "by-model",
            &class
                .clone()
                .cel(r#"device.attributes["gpu.tessera.dev"].productName == "NVIDIA L40S""#),
        )
        .await;
        s.template(
            "by-uuid",
            &class.clone().cel(&format!(
                r#"device.attributes["gpu.tessera.dev"].uuid == "{RTX_4090}""#
            )),
        )
        .await;
        for (name, template, expected) in [
            ("model-l40s", "by-model", format!("NVIDIA L40S ({L40S})")),
            (
                "uuid-4090",
                "by-uuid",
                format!("NVIDIA GeForce RTX 4090 ({RTX_4090})"),
            ),
        ] {
            let worker = Worker {
                name: "worker",
                args: args(&["--allocate", "64Mi"]),
            };
            s.create(&tessera.pod(
                name,
                json!({ "resourceClaimTemplateName": template }),
                &[worker],
                None,
            ))
            .await;
            let (pod, log) = s.finished(name).await;
            Scenarios::assert_succeeded(&pod, &log);
            assert!(
                log.contains(&format!("GPU 0: {expected}")),
                "pod {name} should see {expected}:\n{log}"
            );
            s.delete(name).await;
        }

        // Device metadata (KEP-5304): the claim's devices and attributes, read inside the pod
        // at the well-known path, for the pod's own name of a template claim.
        step("device metadata read inside the container");
        let mut reader = tessera.pod(
            "metadata",
            json!({ "resourceClaimTemplateName": "by-uuid" }),
            &[Worker {
                name: "read",
                args: Vec::new(),
            }],
            None,
        );
        if let Some(container) = reader
            .spec
            .as_mut()
            .and_then(|spec| spec.containers.first_mut())
        {
            container.image = Some(BUSYBOX_IMAGE.into());
            container.args = None;
            container.command = Some(vec![
                "cat".into(),
                "/var/run/kubernetes.io/dra-device-attributes/resourceclaimtemplates/gpu/gpu/gpu.tessera.dev-metadata.json".into(),
            ]);
        }
        s.create(&reader).await;
        let (pod_, log) = s.finished("metadata").await;
        Scenarios::assert_succeeded(&pod_, &log);
        for expected in [
            "\"apiVersion\": \"metadata.resource.k8s.io/v1beta1\"".to_string(),
            "\"podClaimName\": \"gpu\"".to_string(),
            format!("\"string\": \"{RTX_4090}\""),
            "\"memoryLimit\"".to_string(),
        ] {
            assert!(
                log.contains(&expected),
                "{expected} in the metadata:\n{log}"
            );
        }
        s.delete("metadata").await;

        if version.minor() >= 36 {
            step("a GPU asked for as an extended resource");
            s.extended_resource(&tessera).await;
        }

        // Two containers on one claim share its wall: the second cannot take what the first
        // holds.
        step("two containers sharing one claim");
        let (pod_, log) = tessera
            .run_worker(
                &client,
                &setup.node,
                "measure",
                "by-uuid",
                &["--allocate", "64Mi"],
            )
            .await;
        Scenarios::assert_succeeded(&pod_, &log);
        s.delete("measure").await;
        let share_mib = (worker_total_gib(&log) * 1024.0 * 0.6) as u64;
        let share = format!("{share_mib}Mi");
        let first = Worker {
            name: "first",
            args: args(&[
                "--allocate",
                &share,
                "--touch",
                "/sync/first-holds",
                "--hold-until",
                "/sync/second-done",
            ]),
        };
        let second = Worker {
            name: "second",
            args: args(&[
                "--wait-for",
                "/sync/first-holds",
                "--allocate",
                &share,
                "--touch",
                "/sync/second-done",
            ]),
        };
        s.create(&tessera.pod(
            "shared",
            json!({ "resourceClaimTemplateName": "by-uuid" }),
            &[first, second],
            None,
        ))
        .await;
        let (pod_, log) = s.finished("shared").await;
        assert_eq!(
            (
                workloads::exit_code(&pod_, "first"),
                workloads::exit_code(&pod_, "second")
            ),
            (Some(0), Some(1)),
            "the first container holds 60% of the claim, so the second's 60% must hit the wall: {}\n{log}",
            pod_summary(&pod_)
        );
        assert!(log.contains("CUDA_ERROR_OUT_OF_MEMORY"), "{log}");
        s.delete("shared").await;

        // A tenant's own `priority: high` waits for the admin's namespace label: the real
        // kubelet reports the plugin's refusal, and retries it once the label is there.
        step("priority high asked for in a claim's own config");
        s.template_with("self-promoted", &class, Some(json!({ "priority": "high" })))
            .await;
        s.create(&tessera.pod(
            "promoted",
            json!({ "resourceClaimTemplateName": "self-promoted" }),
            &[Worker {
                name: "worker",
                args: args(&["--allocate", "64Mi"]),
            }],
            None,
        ))
        .await;
        wait_until("the kubelet reporting the refusal", &setup.node, || async {
            let events = s.failed_claim_events().await;
            events
                .iter()
                .any(|e| e.starts_with("promoted ") && e.contains(REFUSAL))
                .then_some(())
                .ok_or_else(|| format!("{events:?}"))
        })
        .await;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        namespaces
            .patch(
                "default",
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": { "labels": {
                    "gpu.tessera.dev/allow-high-priority": "true"
                } } })),
            )
            .await
            .expect("labelling namespace default");
        let (pod_, log) = s.finished("promoted").await;
        Scenarios::assert_succeeded(&pod_, &log);
        s.delete("promoted").await;
    }

    // The kubelet restarted while a claim is prepared: the container keeps running, the
    // plugin registers with the new kubelet, and the claim is unprepared afterwards.
    step("the kubelet restarted with a prepared claim");
    let sync = {
        let s = Scenarios::new(&setup.node, &client, &tessera, version);
        s.start_holder(
            "survivor",
            json!({ "resourceClaimTemplateName": "by-uuid" }),
        )
        .await
    };
    setup
        .node
        .restart_kubelet()
        .unwrap_or_else(|e| panic!("restarting the kubelet: {e}"));
    let s = Scenarios::new(&setup.node, &client, &tessera, version);
    s.registered(1).await;
    s.release_and_delete("survivor", &sync).await;

    // The plugin's pod deleted while a claim is prepared: the DaemonSet starts another, which
    // registers, unprepares the old claim and prepares new ones. One pod already runs on its
    // claim; another's claim is prepared but its container not started yet (an init container
    // waits): it starts after the plugin is gone, from the CDI spec prepared before.
    step("the plugin's pod deleted with a prepared claim, one pod running and one not yet started");
    let sync = s
        .start_holder("orphan", json!({ "resourceClaimTemplateName": "by-uuid" }))
        .await;
    let waiting_sync = s.sync_dir("not-started");
    let mut waiting = tessera.pod(
        "not-started",
        json!({ "resourceClaimTemplateName": "by-model" }),
        &[Worker {
            name: "worker",
            args: args(&["--allocate", "64Mi"]),
        }],
        Some(&waiting_sync),
    );
    if let Some(spec) = waiting.spec.as_mut() {
        spec.init_containers = Some(vec![
            serde_json::from_value(json!({
                "name": "wait",
                "image": BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", "until [ -e /sync/start ]; do sleep 0.2; done"],
                "volumeMounts": [{ "name": "shared", "mountPath": "/sync" }],
            }))
            .expect("init container"),
        ]);
    }
    s.create(&waiting).await;
    wait_until(
        "pod not-started's claim prepared, its init container waiting",
        &setup.node,
        || async {
            let pod = s.pods.get("not-started").await.map_err(|e| e.to_string())?;
            let waiting_in_init = pod
                .status
                .as_ref()
                .and_then(|st| st.init_container_statuses.as_ref())
                .and_then(|cs| cs.first())
                .is_some_and(|c| c.state.as_ref().is_some_and(|st| st.running.is_some()));
            let uids = s.claim_uids("not-started").await;
            let prepared = !uids.is_empty()
                && uids.iter().all(|uid| {
                    setup
                        .node
                        .cdi_dir()
                        .join(format!("tessera-{uid}.json"))
                        .exists()
                });
            (waiting_in_init && prepared)
                .then_some(())
                .ok_or_else(|| pod_summary(&pod))
        },
    )
    .await;
    let old = s.plugin_uid().await;
    let system_pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let old_name = tessera
        .wait_plugin_ready(&setup.node, &[])
        .await
        .metadata
        .name
        .unwrap_or_default();
    system_pods
        .delete(&old_name, &DeleteParams::default())
        .await
        .expect("deleting the plugin's pod");
    tessera
        .wait_plugin_ready(&setup.node, std::slice::from_ref(&old))
        .await;
    s.registered(2).await;
    std::fs::write(waiting_sync.join("start"), b"").expect("starting pod not-started");
    let (pod_, log) = s.finished("not-started").await;
    Scenarios::assert_succeeded(&pod_, &log);
    assert!(
        log.contains(&format!("GPU 0: NVIDIA L40S ({L40S})")),
        "pod not-started should see its claim's GPU:\n{log}"
    );
    s.delete("not-started").await;
    s.release_and_delete("orphan", &sync).await;
    let (pod_, log) = tessera
        .run_worker(
            &client,
            &setup.node,
            "after-restart",
            "by-uuid",
            &["--allocate", "64Mi"],
        )
        .await;
    Scenarios::assert_succeeded(&pod_, &log);
    s.delete("after-restart").await;

    // The GPU's health in the pod's status (kubelet 1.36+, ResourceHealthStatus on by
    // default); the L40S it marks unhealthy is healthy again after the rolling update below.
    if version.minor() >= 36 {
        step("a GPU's XID shown in the status of the pod using it");
        s.health_in_pod_status().await;
    }

    // A rolling update of the DaemonSet while a claim is prepared: 1.33+ kubelets take the new
    // instance beside the old one (maxSurge), older ones get it after the old one is gone;
    // pods started during the update are prepared either way (see the events check below).
    step("a rolling update with a prepared claim");
    let sync = s
        .start_holder(
            "through-update",
            json!({ "resourceClaimTemplateName": "by-uuid" }),
        )
        .await;
    let before = s.plugin_uid().await;
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), NAMESPACE);
    daemonsets
        .patch(
            "tessera-kubelet-plugin",
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "spec": { "template": { "metadata": { "annotations": {
                "kubectl.kubernetes.io/restartedAt": format!("{:?}", Instant::now()),
            } } } } }),
            ),
        )
        .await
        .expect("rolling the DaemonSet");
    s.create(&tessera.pod(
        "during-update",
        json!({ "resourceClaimTemplateName": "by-uuid" }),
        &[Worker {
            name: "worker",
            args: args(&["--allocate", "64Mi"]),
        }],
        None,
    ))
    .await;
    tessera.wait_plugin_ready(&setup.node, &[before]).await;
    let (pod_, log) = s.finished("during-update").await;
    Scenarios::assert_succeeded(&pod_, &log);
    s.delete("during-update").await;
    s.release_and_delete("through-update", &sync).await;

    // A claim deleted while its pod runs: it stays (in use) until the pod ends, is
    // unprepared, and then goes.
    step("a claim deleted before it is unprepared");
    let claim = workloads::claim_template(
        version,
        "default",
        "unused",
        &class,
        &Share {
            memory: "2Gi".into(),
            cores: 25,
            tenths: 2,
            gpu_config: None,
        },
    );
    let claim_object = json!({
        "apiVersion": claim["apiVersion"],
        "kind": "ResourceClaim",
        "metadata": { "name": "short-lived", "namespace": "default" },
        "spec": claim["spec"]["spec"],
    });
    workloads::create(&client, &claim_object)
        .await
        .expect("creating ResourceClaim short-lived");
    let sync = s
        .start_holder(
            "claim-deleted",
            json!({ "resourceClaimName": "short-lived" }),
        )
        .await;
    let uids = s.claim_uids("claim-deleted").await;
    s.claims()
        .delete("short-lived", &DeleteParams::default())
        .await
        .expect("deleting ResourceClaim short-lived");
    s.release_and_delete("claim-deleted", &sync).await;
    for uid in &uids {
        let spec = setup.node.cdi_dir().join(format!("tessera-{uid}.json"));
        assert!(!spec.exists(), "{} left behind", spec.display());
    }
    wait_until("ResourceClaim short-lived gone", &setup.node, || async {
        match s.claims().get_opt("short-lived").await {
            Ok(None) => Ok(()),
            Ok(Some(c)) => Err(format!("still there: {:?}", c.metadata.finalizers)),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;

    // A reboot while a claim is prepared: the containers, the CDI spec and the runtime's state
    // are gone, the plugin's checkpoint is from another boot. The kubelet restarts the pod,
    // asks for the claim again, and the plugin prepares it afresh: the spec is back, the
    // checkpoint names the new boot, and the worker holds its memory inside its wall again.
    step("the node rebooted with a prepared claim");
    let sync = s.sync_dir("through-reboot");
    let mut pod = tessera.pod(
        "through-reboot",
        json!({ "resourceClaimTemplateName": "by-uuid" }),
        &[Scenarios::holder("worker")],
        Some(&sync),
    );
    // Restarted after the reboot, as a Job's or a Deployment's pod would be (`Never` leaves it
    // Failed).
    if let Some(spec) = pod.spec.as_mut() {
        spec.restart_policy = Some("OnFailure".into());
    }
    s.create(&pod).await;
    s.holding("through-reboot").await;
    let uids = s.claim_uids("through-reboot").await;
    assert!(!uids.is_empty(), "pod through-reboot has no claim");
    drop(s);
    let boot = on_node::new_boot_id(&setup.node).expect("giving the node a new boot ID");
    setup
        .node
        .reboot(std::time::Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("rebooting the node: {e}"));
    let s = Scenarios::new(&setup.node, &client, &tessera, version);
    wait_until(
        "pod through-reboot restarted and holding its memory again",
        &setup.node,
        || async {
            let pod = s
                .pods
                .get("through-reboot")
                .await
                .map_err(|e| e.to_string())?;
            let restarted = pod
                .status
                .as_ref()
                .and_then(|st| st.container_statuses.as_ref())
                .and_then(|cs| cs.first())
                .is_some_and(|c| {
                    c.restart_count >= 1 && c.state.as_ref().is_some_and(|st| st.running.is_some())
                });
            let log = s.logs("through-reboot").await;
            (restarted && log.contains("holding "))
                .then_some(())
                .ok_or_else(|| format!("{}\n{log}", pod_summary(&pod)))
        },
    )
    .await;
    let checkpoint_path = on_node::state_dir(&setup.node).join("checkpoint.json");
    let checkpoint: Value = serde_json::from_slice(
        &std::fs::read(&checkpoint_path).expect("reading the plugin's checkpoint"),
    )
    .expect("parsing the plugin's checkpoint");
    for uid in &uids {
        let spec = setup.node.cdi_dir().join(format!("tessera-{uid}.json"));
        assert!(
            spec.exists(),
            "{} was not written again after the reboot",
            spec.display()
        );
        assert_eq!(
            checkpoint["claims"][uid]["bootId"].as_str(),
            Some(boot.as_str()),
            "claim {uid} should be prepared again in the new boot: {checkpoint:#}"
        );
    }
    s.release_and_delete("through-reboot", &sync).await;

    // Before 1.33 the kubelet takes one registration per driver, so the chart replaces the
    // plugin's pod in place: a prepare of the pod created during the update can land in the
    // gap and fail (the old socket gone, `Unavailable`, or no plugin registered at all), and
    // the kubelet retries it (the pod above still ran). From 1.33 the instances overlap and
    // nothing may fail.
    let expected = |event: &String| {
        (version.minor() < 33 && event.starts_with("during-update FailedPrepareDynamicResources"))
            || (event.starts_with("promoted ") && event.contains(REFUSAL))
            // Until the plugin's own pod runs again after the reboot, the kubelet has no plugin
            // to ask, and retries.
            || event.starts_with("through-reboot FailedPrepareDynamicResources")
    };
    let failed: Vec<String> = s
        .failed_claim_events()
        .await
        .into_iter()
        .filter(|e| !expected(e))
        .collect();
    assert!(
        failed.is_empty(),
        "claims failed to prepare or unprepare:\n{}",
        failed.join("\n")
    );
    drop(s);
    stop_node(setup.node);
    eprintln!("{test}: passed in {:.1}s", began.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_node_scenarios_v1_37() {
    scenarios(K8sVersion::newest()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_node_scenarios_v1_31() {
    scenarios(tessera_e2e_harness::versions::PINNED[0]).await;
}

/// The release matrix (`make e2e-matrix`): 1.36, where device taints, extended resources and
/// health in the pod's status are beta and on by default, on the real kubelet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "release matrix: make e2e-matrix"]
async fn real_node_scenarios_v1_36() {
    scenarios("1.36".parse().expect("version")).await;
}
