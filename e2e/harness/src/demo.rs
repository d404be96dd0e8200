//! The two-workers scenario: `make demo` prints it, the e2e suite asserts on it.
//!
//! Worker A asks for 2 GiB of one GPU's memory and 25% of its cores, worker B for 3 GiB and
//! 40%. The real scheduler puts both on the same GPU; A then allocates past its wall and gets
//! CUDA_ERROR_OUT_OF_MEMORY (and exits 1, as a training job would), while B keeps its memory
//! and finishes normally. On releases before 1.34 the shares are tenths of the GPU (2 and 3),
//! so cores are 20% and 30% there and the walls follow the GPU's size.
//!
//! The workers run on a [`Stage`]: the real node (`make demo`: the upstream kubelet and
//! containerd, Tessera from its chart and images) or a simulated node (the e2e suite's
//! many-node simulations).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject, LogParams};
use serde_json::{Value, json};

use crate::cluster::SimCluster;
use crate::error::{Error, Result};
use crate::readiness::http_get_at;
use crate::realnode::RealNode;
use crate::realnode::tessera::{Worker, Workloads};
use crate::workloads::{self, ContainerSpec, Selection, Share};

pub const NAMESPACE: &str = "default";
/// The simulated 10 GiB GPU's model (e2e/nodes/gpu-node-b.json).
pub const SMALL_GPU_CLASS: &str = "nvidia-geforce-rtx-3080.gpu.tessera.dev";
/// The real node's (fake) 24 GiB GPU's model, the fake driver's default first GPU.
pub const REAL_NODE_GPU_CLASS: &str = "nvidia-geforce-rtx-4090.gpu.tessera.dev";
const GIB: f64 = (1u64 << 30) as f64;

/// Where the two workers run.
pub enum Stage<'a> {
    /// On the simulated node with the 10 GiB RTX 3080: the kubelet stand-in runs this build's
    /// `tessera-gpu-worker` on the host, beside the stand-in's own plugin process.
    Simulated,
    /// On the real node, through the upstream kubelet and containerd, from
    /// `tessera-gpu-worker`'s image, on its 24 GiB RTX 4090; Tessera's plugin there is the
    /// chart's DaemonSet pod.
    Real {
        node: &'a RealNode,
        workloads: &'a Workloads,
        /// The plugin's metrics port, forwarded from the node's namespace.
        metrics: SocketAddr,
    },
}

/// A GPU as its node's (fake) driver describes it.
struct GpuInfo {
    uuid: String,
    name: String,
    memory: u64,
}

/// Where a worker's log is read: the stand-in's files, or the apiserver's `pods/log`.
enum Logs {
    Files(PathBuf),
    Api(Box<Api<Pod>>),
}

impl Logs {
    async fn read(&self, name: &str, pod: &Pod) -> String {
        match self {
            Logs::Files(dir) => read_log(
                &dir.join(format!("{NAMESPACE}_{name}_{}", pod_uid(pod)))
                    .join("train.log"),
            ),
            Logs::Api(pods) => pods
                .logs(name, &LogParams::default())
                .await
                .unwrap_or_default(),
        }
    }
}
const STEP: Duration = Duration::from_secs(120);

/// One sample of the plugin's /metrics.
#[derive(Clone, Debug)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the text exposition format (what the plugin serves).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    Some((k.trim().to_owned(), v.trim_matches('"').to_owned()))
                })
                .collect();
            Some(Sample {
                name: name.to_owned(),
                labels,
                value,
            })
        })
        .collect()
}

/// A claim's limits and usage on one GPU, from the plugin's metrics.
#[derive(Clone, Debug, Default)]
pub struct ClaimUsage {
    pub claim: String,
    pub gpu_uuid: String,
    pub memory_limit: u64,
    pub memory_used: u64,
    /// Of `memory_used`, the bytes served from host memory (oversubscription).
    pub memory_spilled: u64,
    /// Percent of the GPU's compute.
    pub cores: f64,
}

/// Every claim the node's plugin reports.
pub async fn claim_usage(metrics_port: u16) -> Result<Vec<ClaimUsage>> {
    claim_usage_at(SocketAddr::from(([127, 0, 0, 1], metrics_port))).await
}

/// [`claim_usage`] from the plugin at `metrics`.
pub async fn claim_usage_at(metrics: SocketAddr) -> Result<Vec<ClaimUsage>> {
    let (status, body) = http_get_at(metrics, "/metrics")
        .await
        .map_err(|e| Error::State {
            dir: PathBuf::new(),
            reason: format!("the plugin's metrics: {e}"),
        })?;
    if status != 200 {
        return Err(Error::State {
            dir: PathBuf::new(),
            reason: format!("the plugin's /metrics answered {status}"),
        });
    }
    let mut claims: BTreeMap<(String, String), ClaimUsage> = BTreeMap::new();
    for sample in parse_metrics(&body) {
        let (Some(claim), Some(gpu)) = (sample.labels.get("claim"), sample.labels.get("gpu_uuid"))
        else {
            continue;
        };
        let entry = claims
            .entry((claim.clone(), gpu.clone()))
            .or_insert_with(|| ClaimUsage {
                claim: claim.clone(),
                gpu_uuid: gpu.clone(),
                ..ClaimUsage::default()
            });
        match sample.name.as_str() {
            "tessera_claim_memory_limit_bytes" => entry.memory_limit = sample.value as u64,
            "tessera_claim_memory_used_bytes" => entry.memory_used = sample.value as u64,
            "tessera_claim_memory_spilled_bytes" => entry.memory_spilled = sample.value as u64,
            // A ratio of the whole GPU, or (older name) a percentage.
            "tessera_claim_cores_limit_ratio" => entry.cores = sample.value * 100.0,
            "tessera_claim_cores" => entry.cores = sample.value,
            _ => {}
        }
    }
    Ok(claims.into_values().collect())
}

/// What the scenario saw, for the e2e test to check.
pub struct Outcome {
    pub worker_a: Pod,
    /// B after A had failed: still running.
    pub worker_b_running: Pod,
    pub worker_b: Pod,
    pub worker_a_log: String,
    pub worker_b_log: String,
    /// The plugin's view while B ran.
    pub usage: Vec<ClaimUsage>,
    /// Generated claim names of A and B.
    pub claims: (String, String),
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / GIB)
}

fn claim_name(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.resource_claim_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.resource_claim_name.clone())
        .unwrap_or_default()
}

fn pod_uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

fn container_state(pod: &Pod) -> String {
    let Some(statuses) = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
    else {
        return "-".into();
    };
    statuses
        .iter()
        .map(|c| {
            let state = c.state.as_ref();
            let text = if let Some(t) = state.and_then(|s| s.terminated.as_ref()) {
                format!(
                    "exited {} ({})",
                    t.exit_code,
                    t.reason.clone().unwrap_or_default()
                )
            } else if state.and_then(|s| s.running.as_ref()).is_some() {
                "running".into()
            } else if let Some(w) = state.and_then(|s| s.waiting.as_ref()) {
                format!("waiting ({})", w.reason.clone().unwrap_or_default())
            } else {
                "-".into()
            };
            format!("{}: {text}", c.name)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn io_error(e: std::io::Error) -> Error {
    Error::State {
        dir: PathBuf::new(),
        reason: format!("writing the demo's output: {e}"),
    }
}

/// Runs the scenario on a started cluster, its workers on `stage`, printing to `out`.
pub async fn two_workers(
    cluster: &mut SimCluster,
    stage: &Stage<'_>,
    out: &mut dyn Write,
) -> Result<Outcome> {
    let version = cluster.version();
    let client = cluster.client();
    let (class, shared) = match stage {
        Stage::Simulated => (
            SMALL_GPU_CLASS,
            cluster.control_plane().state().root().join("demo"),
        ),
        Stage::Real { node, .. } => (REAL_NODE_GPU_CLASS, node.root().join("demo")),
    };
    std::fs::create_dir_all(&shared).map_err(Error::io(&shared, "creating"))?;
    for file in ["go-a", "finish"] {
        let _ = std::fs::remove_file(shared.join(file));
    }
    let shared_text = shared.display().to_string();

    let (a_share, b_share) = (
        Share {
            memory: "2Gi".into(),
            cores: 25,
            tenths: 2,
            gpu_config: None,
        },
        Share {
            memory: "3Gi".into(),
            cores: 40,
            tenths: 3,
            gpu_config: None,
        },
    );
    // A asks for the next whole GiB past its wall: 2 GiB where shares are absolute, two
    // tenths of the GPU before 1.34.
    let gpu_memory = match stage {
        Stage::Simulated => 10u64 << 30,
        Stage::Real { .. } => 24u64 << 30,
    };
    let a_wall = if version.minor() >= 34 {
        2u64 << 30
    } else {
        gpu_memory * u64::from(a_share.tenths) / 10
    };
    let a_allocates = a_wall / (1 << 30) + 1;
    let arg = |s: &str| s.to_owned();
    let shares = [
        (
            "worker-a",
            a_share,
            vec![
                arg("--wait-for"),
                arg("/demo/go-a"),
                arg("--allocate"),
                format!("{a_allocates}Gi"),
            ],
        ),
        (
            "worker-b",
            b_share,
            vec![
                arg("--allocate"),
                arg("2560Mi"),
                arg("--hold-until"),
                arg("/demo/finish"),
            ],
        ),
    ];
    let place = match stage {
        Stage::Simulated => "a simulated node".to_owned(),
        Stage::Real { node, .. } => format!(
            "the real node {} (upstream kubelet and containerd)",
            node.name()
        ),
    };
    writeln!(
        out,
        "\n== Two workers on the {} GiB GPU (DeviceClass {class}) of {place}, {}",
        gpu_memory >> 30,
        cluster.control_plane().record().version_string
    )
    .map_err(io_error)?;
    for (name, share, args) in &shares {
        let template = format!("{name}-gpu");
        let object = workloads::claim_template(
            version,
            NAMESPACE,
            &template,
            &Selection::class(class),
            share,
        );
        workloads::create(&client, &object).await?;
        let asks = if version.minor() >= 34 {
            format!("memory {} and {} cores", share.memory, share.cores)
        } else {
            format!(
                "{} tenths of one GPU (this release has no consumable capacity)",
                share.tenths
            )
        };
        writeln!(
            out,
            "  {name}: ResourceClaimTemplate {template} asks for {asks}"
        )
        .map_err(io_error)?;
        writeln!(
            out,
            "            runs tessera-gpu-worker {}",
            args.join(" ")
        )
        .map_err(io_error)?;
        let pod = match stage {
            Stage::Simulated => {
                let mut command = vec![cluster.artifacts.gpu_worker.display().to_string()];
                command.extend(args.iter().cloned());
                let container = ContainerSpec {
                    name: "train".into(),
                    command,
                    claims: vec!["gpu".into()],
                };
                workloads::pod(
                    NAMESPACE,
                    name,
                    &[("gpu", &template)],
                    &[container],
                    &[(&shared_text, "/demo")],
                    &[],
                )
            }
            Stage::Real { workloads, .. } => {
                let pod = workloads.pod(
                    name,
                    json!({ "resourceClaimTemplateName": template }),
                    &[Worker {
                        name: "train",
                        args: args.clone(),
                    }],
                    json!({ "hostPath": { "path": shared_text, "type": "Directory" } }),
                    "/demo",
                )?;
                serde_json::to_value(&pod).map_err(|e| Error::State {
                    dir: shared.clone(),
                    reason: format!("pod {name}: {e}"),
                })?
            }
        };
        workloads::create(&client, &pod).await?;
    }

    // 1. Both running on the same GPU: A waits for its go, B holds its 2.5 GiB.
    let logs = match stage {
        Stage::Simulated => Logs::Files(pods_dir_of(cluster, "worker-b").await?),
        Stage::Real { .. } => Logs::Api(Box::new(Api::namespaced(client.clone(), NAMESPACE))),
    };
    let worker_a_running = wait_logged(cluster, &logs, "worker-a", "cuMemGetInfo").await?;
    let worker_b_running = wait_logged(cluster, &logs, "worker-b", "holding").await?;
    let node_name = workloads::node_name(&worker_b_running);
    let (metrics, gpus) = match stage {
        Stage::Simulated => {
            let node = cluster
                .nodes
                .iter()
                .find(|n| n.name == node_name)
                .ok_or_else(|| Error::State {
                    dir: PathBuf::new(),
                    reason: format!("worker-b runs on {node_name:?}, not a simulated node"),
                })?;
            (
                SocketAddr::from(([127, 0, 0, 1], node.metrics_port)),
                inventory_gpus(&read_log(&node.inventory)),
            )
        }
        Stage::Real { metrics, .. } => (*metrics, fake_driver_gpus()),
    };
    let claims = (claim_name(&worker_a_running), claim_name(&worker_b_running));
    write_pods(out, &[&worker_a_running, &worker_b_running])?;
    writeln!(
        out,
        "\n== ResourceClaims (allocated by kube-scheduler, prepared by tessera-kubelet-plugin)"
    )
    .map_err(io_error)?;
    let claim_api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        NAMESPACE,
        &cluster.resource_api("ResourceClaim", "resourceclaims"),
    );
    for (pod, claim) in [("worker-a", &claims.0), ("worker-b", &claims.1)] {
        let devices = match claim_api.get_opt(claim).await {
            Ok(Some(object)) => allocated_devices(&object.data),
            _ => "(gone)".into(),
        };
        writeln!(out, "  {claim:<22} for {pod:<9} devices: {devices}").map_err(io_error)?;
    }
    write_usage(out, &node_name, &gpus, &claim_usage_at(metrics).await?)?;

    // 2. A allocates past its wall; B goes on.
    writeln!(
        out,
        "\n== worker-a now allocates {a_allocates} GiB in 512 MiB steps"
    )
    .map_err(io_error)?;
    std::fs::write(shared.join("go-a"), b"").map_err(Error::io(&shared, "writing go-a"))?;
    let terminal = |p: &Pod| matches!(workloads::phase(p), "Succeeded" | "Failed");
    let worker_a =
        workloads::wait_pod(cluster, NAMESPACE, "worker-a", "finished", STEP, terminal).await?;
    let worker_a_log = logs.read("worker-a", &worker_a).await;
    for line in worker_a_log.lines() {
        writeln!(out, "  worker-a | {line}").map_err(io_error)?;
    }
    let worker_b_still =
        workloads::wait_pod(cluster, NAMESPACE, "worker-b", "running", STEP, |_| true).await?;
    write_pods(out, &[&worker_a, &worker_b_still])?;
    let usage = claim_usage_at(metrics).await?;
    write_usage(out, &node_name, &gpus, &usage)?;

    // 3. B finishes its work.
    writeln!(out, "\n== worker-b finishes").map_err(io_error)?;
    std::fs::write(shared.join("finish"), b"").map_err(Error::io(&shared, "writing finish"))?;
    let worker_b =
        workloads::wait_pod(cluster, NAMESPACE, "worker-b", "finished", STEP, terminal).await?;
    let worker_b_log = logs.read("worker-b", &worker_b).await;
    for line in worker_b_log.lines() {
        writeln!(out, "  worker-b | {line}").map_err(io_error)?;
    }
    write_pods(out, &[&worker_a, &worker_b])?;

    let pods: Api<Pod> = Api::namespaced(client, NAMESPACE);
    for name in ["worker-a", "worker-b"] {
        pods.delete(name, &DeleteParams::default())
            .await
            .map_err(Error::kube(format!("deleting pod {name}")))?;
    }
    for name in ["worker-a", "worker-b"] {
        workloads::wait_gone(cluster, NAMESPACE, name, STEP).await?;
    }
    writeln!(
        out,
        "\n== Pods deleted; their claims were unprepared on {node_name}"
    )
    .map_err(io_error)?;
    Ok(Outcome {
        worker_a,
        worker_b_running: worker_b_still,
        worker_b,
        worker_a_log,
        worker_b_log,
        usage,
        claims,
    })
}

/// Waits until pod `name` runs and its log contains `needle`.
async fn wait_logged(
    cluster: &mut SimCluster,
    logs: &Logs,
    name: &str,
    needle: &str,
) -> Result<Pod> {
    let what = format!("running, its log saying {needle:?}");
    let deadline = Instant::now() + STEP;
    loop {
        let pod = workloads::wait_pod(cluster, NAMESPACE, name, &what, STEP, |p| {
            workloads::phase(p) == "Running"
        })
        .await?;
        let log = logs.read(name, &pod).await;
        if log.contains(needle) {
            return Ok(pod);
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("pod {NAMESPACE}/{name} to be {what}"),
                seconds: STEP.as_secs(),
                log: Default::default(),
                tail: log,
            });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn write_pods(out: &mut dyn Write, pods: &[&Pod]) -> Result<()> {
    writeln!(out, "\n== Pods").map_err(io_error)?;
    // A real node's name is its address, longer than a simulated node's.
    let width = pods
        .iter()
        .map(|p| workloads::node_name(p).len())
        .max()
        .unwrap_or(0)
        .max(12);
    writeln!(
        out,
        "  {:<10} {:<width$} {:<10} CONTAINERS",
        "NAME", "NODE", "PHASE"
    )
    .map_err(io_error)?;
    for pod in pods {
        writeln!(
            out,
            "  {:<10} {:<width$} {:<10} {}",
            pod.metadata.name.as_deref().unwrap_or_default(),
            workloads::node_name(pod),
            workloads::phase(pod),
            container_state(pod)
        )
        .map_err(io_error)?;
    }
    Ok(())
}

fn write_usage(
    out: &mut dyn Write,
    node: &str,
    gpus: &[GpuInfo],
    usage: &[ClaimUsage],
) -> Result<()> {
    writeln!(
        out,
        "\n== Limits and usage (tessera-kubelet-plugin /metrics on {node})"
    )
    .map_err(io_error)?;
    writeln!(
        out,
        "  {:<22} {:<50} {:>10} {:>10} {:>6}",
        "CLAIM", "GPU", "MEM LIMIT", "MEM USED", "CORES"
    )
    .map_err(io_error)?;
    for u in usage {
        writeln!(
            out,
            "  {:<22} {:<50} {:>10} {:>10} {:>5.0}%",
            u.claim,
            format!(
                "{} {}",
                short_uuid(&u.gpu_uuid),
                product_of(gpus, &u.gpu_uuid)
            ),
            gib(u.memory_limit),
            gib(u.memory_used),
            u.cores
        )
        .map_err(io_error)?;
    }
    if usage.is_empty() {
        writeln!(out, "  (no claims prepared)").map_err(io_error)?;
    }
    Ok(())
}

/// The stand-in's pod directory of the node the pod is bound to.
async fn pods_dir_of(cluster: &mut SimCluster, pod: &str) -> Result<PathBuf> {
    let bound = workloads::wait_pod(cluster, NAMESPACE, pod, "bound to a node", STEP, |p| {
        !workloads::node_name(p).is_empty()
    })
    .await?;
    let node = workloads::node_name(&bound);
    Ok(cluster.node(&node).root.join("standin/pods"))
}

fn allocated_devices(claim: &Value) -> String {
    let results = claim
        .pointer("/status/allocation/devices/results")
        .and_then(Value::as_array);
    let Some(results) = results else {
        return "(not allocated)".into();
    };
    results
        .iter()
        .map(|r| {
            let mut text = format!(
                "{}/{}",
                r["pool"].as_str().unwrap_or("?"),
                r["device"].as_str().unwrap_or("?")
            );
            if let Some(capacity) = r.get("consumedCapacity").and_then(Value::as_object) {
                let parts: Vec<String> = capacity
                    .iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?")))
                    .collect();
                text.push_str(&format!(" [{}]", parts.join(", ")));
            }
            text
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The GPUs of a simulated node's inventory (the fake driver's config format).
fn inventory_gpus(inventory: &str) -> Vec<GpuInfo> {
    let parsed: Value = serde_json::from_str(inventory).unwrap_or(Value::Null);
    parsed["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| GpuInfo {
            uuid: d["uuid"].as_str().unwrap_or_default().to_owned(),
            name: d["name"].as_str().unwrap_or("?").to_owned(),
            memory: d["memory"].as_u64().unwrap_or(0),
        })
        .collect()
}

/// The real node's GPUs: its fake driver runs with no config, so these are the defaults.
fn fake_driver_gpus() -> Vec<GpuInfo> {
    tessera_fake_gpu_model::Config::default()
        .devices
        .iter()
        .map(|d| GpuInfo {
            uuid: d.uuid.to_string(),
            name: d.name.clone(),
            memory: d.memory,
        })
        .collect()
}

fn product_of(gpus: &[GpuInfo], uuid: &str) -> String {
    gpus.iter()
        .find(|g| g.uuid == uuid)
        .map(|g| format!("{} ({})", g.name, gib(g.memory)))
        .unwrap_or_default()
}

fn short_uuid(uuid: &str) -> &str {
    &uuid[..uuid.len().min(12)]
}
