//! The two-workers scenario: `make demo` prints it, the e2e suite asserts on it.
//!
//! Worker A asks for 20% of the 10 GiB GPU's memory and 25% of its cores, worker B for 30% and
//! 40%. The real scheduler puts both on the same GPU; A then allocates past its 2 GiB and gets
//! CUDA_ERROR_OUT_OF_MEMORY (and exits 1, as a training job would), while B keeps its memory
//! and finishes normally. On releases before 1.34 the shares are tenths of the GPU (2 and 3),
//! so cores are 20% and 30% there.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject};
use serde_json::Value;

use crate::cluster::SimCluster;
use crate::error::{Error, Result};
use crate::readiness::http_get;
use crate::workloads::{self, ContainerSpec, Selection, Share};

pub const NAMESPACE: &str = "default";
/// The simulated 10 GiB GPU's model (e2e/nodes/gpu-node-b.json).
pub const SMALL_GPU_CLASS: &str = "nvidia-geforce-rtx-3080.gpu.tessera.dev";
const GIB: f64 = (1u64 << 30) as f64;
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
    let (status, body) = http_get(metrics_port, "/metrics")
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

/// Runs the scenario on a started cluster, printing to `out`.
pub async fn two_workers(cluster: &mut SimCluster, out: &mut dyn Write) -> Result<Outcome> {
    let version = cluster.version();
    let client = cluster.client();
    let worker = cluster.artifacts.gpu_worker.display().to_string();
    let shared = cluster.control_plane().state().root().join("demo");
    std::fs::create_dir_all(&shared).map_err(Error::io(&shared, "creating"))?;
    for file in ["go-a", "finish"] {
        let _ = std::fs::remove_file(shared.join(file));
    }
    let shared_text = shared.display().to_string();

    let arg = |s: &str| s.to_owned();
    let shares = [
        (
            "worker-a",
            Share {
                memory: "2Gi".into(),
                cores: 25,
                tenths: 2,
                gpu_config: None,
            },
            vec![
                worker.clone(),
                arg("--wait-for"),
                arg("/demo/go-a"),
                arg("--allocate"),
                arg("3Gi"),
            ],
        ),
        (
            "worker-b",
            Share {
                memory: "3Gi".into(),
                cores: 40,
                tenths: 3,
                gpu_config: None,
            },
            vec![
                worker.clone(),
                arg("--allocate"),
                arg("2560Mi"),
                arg("--hold-until"),
                arg("/demo/finish"),
            ],
        ),
    ];
    writeln!(
        out,
        "\n== Two workers on the 10 GiB GPU (DeviceClass {SMALL_GPU_CLASS}, {})",
        cluster.control_plane().record().version_string
    )
    .map_err(io_error)?;
    for (name, share, command) in &shares {
        let template = format!("{name}-gpu");
        let object = workloads::claim_template(
            version,
            NAMESPACE,
            &template,
            &Selection::class(SMALL_GPU_CLASS),
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
            command[1..].join(" ")
        )
        .map_err(io_error)?;
        let container = ContainerSpec {
            name: "train".into(),
            command: command.clone(),
            claims: vec!["gpu".into()],
        };
        let pod = workloads::pod(
            NAMESPACE,
            name,
            &[("gpu", &template)],
            &[container],
            &[(&shared_text, "/demo")],
            &[],
        );
        workloads::create(&client, &pod).await?;
    }

    // 1. Both running on the same GPU: A waits for its go, B holds its 2.5 GiB.
    let pods_dir = pods_dir_of(cluster, "worker-b").await?;
    let log_of = |name: &str, pod: &Pod| {
        read_log(
            &pods_dir
                .join(format!("{NAMESPACE}_{name}_{}", pod_uid(pod)))
                .join("train.log"),
        )
    };
    let worker_a_running =
        workloads::wait_pod(cluster, NAMESPACE, "worker-a", "running", STEP, |p| {
            workloads::phase(p) == "Running" && log_of("worker-a", p).contains("cuMemGetInfo")
        })
        .await?;
    let worker_b_running = workloads::wait_pod(
        cluster,
        NAMESPACE,
        "worker-b",
        "running with its memory allocated",
        STEP,
        |p| workloads::phase(p) == "Running" && log_of("worker-b", p).contains("holding"),
    )
    .await?;
    let node_name = workloads::node_name(&worker_b_running);
    let metrics_port = cluster
        .nodes
        .iter()
        .find(|n| n.name == node_name)
        .map(|n| n.metrics_port)
        .ok_or_else(|| Error::State {
            dir: PathBuf::new(),
            reason: format!("worker-b runs on {node_name:?}, not a simulated node"),
        })?;
    let inventory = cluster
        .nodes
        .iter()
        .find(|n| n.name == node_name)
        .map(|n| read_log(&n.inventory))
        .unwrap_or_default();
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
    write_usage(
        out,
        &node_name,
        &inventory,
        &claim_usage(metrics_port).await?,
    )?;

    // 2. A allocates past its wall; B goes on.
    writeln!(out, "\n== worker-a now allocates 3 GiB in 512 MiB steps").map_err(io_error)?;
    std::fs::write(shared.join("go-a"), b"").map_err(Error::io(&shared, "writing go-a"))?;
    let terminal = |p: &Pod| matches!(workloads::phase(p), "Succeeded" | "Failed");
    let worker_a =
        workloads::wait_pod(cluster, NAMESPACE, "worker-a", "finished", STEP, terminal).await?;
    let worker_a_log = log_of("worker-a", &worker_a);
    for line in worker_a_log.lines() {
        writeln!(out, "  worker-a | {line}").map_err(io_error)?;
    }
    let worker_b_still =
        workloads::wait_pod(cluster, NAMESPACE, "worker-b", "running", STEP, |_| true).await?;
    write_pods(out, &[&worker_a, &worker_b_still])?;
    let usage = claim_usage(metrics_port).await?;
    write_usage(out, &node_name, &inventory, &usage)?;

    // 3. B finishes its work.
    writeln!(out, "\n== worker-b finishes").map_err(io_error)?;
    std::fs::write(shared.join("finish"), b"").map_err(Error::io(&shared, "writing finish"))?;
    let worker_b =
        workloads::wait_pod(cluster, NAMESPACE, "worker-b", "finished", STEP, terminal).await?;
    let worker_b_log = log_of("worker-b", &worker_b);
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

fn write_pods(out: &mut dyn Write, pods: &[&Pod]) -> Result<()> {
    writeln!(out, "\n== Pods").map_err(io_error)?;
    writeln!(
        out,
        "  {:<10} {:<12} {:<10} CONTAINERS",
        "NAME", "NODE", "PHASE"
    )
    .map_err(io_error)?;
    for pod in pods {
        writeln!(
            out,
            "  {:<10} {:<12} {:<10} {}",
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
    inventory: &str,
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
                product_of(inventory, &u.gpu_uuid)
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

fn product_of(inventory: &str, uuid: &str) -> String {
    let parsed: Value = serde_json::from_str(inventory).unwrap_or(Value::Null);
    parsed["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["uuid"] == uuid)
        .map(|d| {
            format!(
                "{} ({})",
                d["name"].as_str().unwrap_or("?"),
                gib(d["memory"].as_u64().unwrap_or(0))
            )
        })
        .unwrap_or_default()
}

fn short_uuid(uuid: &str) -> &str {
    &uuid[..uuid.len().min(12)]
}
