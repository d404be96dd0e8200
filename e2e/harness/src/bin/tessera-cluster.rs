//! `tessera-cluster`: a real control plane for hands-on work and scripts.
//!
//! ```text
//! tessera-cluster up     [--k8s-version 1.37] [--state-dir DIR] [--nodes DIR] [--no-real-node | --control-plane-only]
//! tessera-cluster status [--k8s-version 1.37] [--state-dir DIR]   # exit 0 only if all is up
//! tessera-cluster down   [--k8s-version 1.37] [--state-dir DIR]
//! tessera-cluster demo   [--k8s-version 1.37] [--state-dir DIR] [--nodes DIR]
//! ```
//!
//! `up` starts the control plane and, unless `--control-plane-only`, one simulated GPU node
//! per fake inventory in `--nodes` (a kubelet plugin and a kubelet stand-in each),
//! tessera-controller, and (unless `--no-real-node`) one real node: the upstream kubelet with
//! containerd, in a network namespace of its own, joined to the control plane by this
//! program's `node-forwards` command. Its last line is `export KUBECONFIG=...`. The components
//! keep running after it exits (each in its own process group, pids under `DIR/run/`); `down`
//! stops exactly those, the containers the stand-ins and the real node started, and removes
//! the real node's mounts, cgroups and directory. `demo` starts a simulated cluster,
//! runs the two-workers scenario (see `tessera_e2e_harness::demo`) and stops it again.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use tessera_e2e_harness::binaries::cache_root;
use tessera_e2e_harness::cluster::{
    ClusterOptions, SimCluster, container_prefix, remove_containers,
};
use tessera_e2e_harness::process::{is_alive, stop_pid_file};
use tessera_e2e_harness::realnode::{
    self, FORWARDS_READY, ForwardSpec, NodeBinaries, RealNode, RealNodeOptions, start_forwards,
};
use tessera_e2e_harness::state::{ComponentRecord, RealNodeRecord, StateDir};
use tessera_e2e_harness::{ControlPlane, ControlPlaneOptions, K8sVersion};

const USAGE: &str = "usage: tessera-cluster {up|down|status|demo} [--k8s-version 1.37] [--state-dir DIR] [--nodes DIR] [--control-plane-only]
  --k8s-version   a pinned Kubernetes minor (default: the newest pinned)
  --nodes         a directory of fake GPU inventories, one simulated node per *.json (default: e2e/nodes)
  --control-plane-only  no nodes, no Tessera: the upstream components only
  --no-real-node  only simulated nodes (a real node needs root, containerd from
                  e2e/scripts/build-containerd.sh and scripts/install-node-packages.sh)
  --state-dir     where certificates, etcd data, logs and pids live
                  (default: $TESSERA_CACHE/clusters/<version>, TESSERA_CACHE defaults to ~/.cache/tessera)";

/// What `up` may delete from a state directory before starting afresh: only
/// things it creates itself, so a mistyped --state-dir cannot lose data.
const OWNED_ENTRIES: &[&str] = &[
    "cluster.json",
    "kubeconfig",
    "kube-scheduler.kubeconfig",
    "kube-controller-manager.kubeconfig",
    "pki",
    "etcd",
    "logs",
    "run",
    "apiserver-certs",
    "nodes",
];

struct Args {
    command: String,
    version: K8sVersion,
    state_dir: PathBuf,
    nodes: PathBuf,
    control_plane_only: bool,
    real_node: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut command = None;
    let mut version = None;
    let mut state_dir = None;
    let mut nodes = PathBuf::from("e2e/nodes");
    let mut control_plane_only = false;
    let mut real_node = true;
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--k8s-version" => version = Some(value("--k8s-version")?.parse::<K8sVersion>()?),
            "--state-dir" => state_dir = Some(PathBuf::from(value("--state-dir")?)),
            "--nodes" => nodes = PathBuf::from(value("--nodes")?),
            "--control-plane-only" => control_plane_only = true,
            "--no-real-node" => real_node = false,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "up" | "down" | "status" | "demo" if command.is_none() => command = Some(flag),
            other => bail!("unexpected argument {other:?}\n{USAGE}"),
        }
    }
    let command = command.with_context(|| format!("missing command\n{USAGE}"))?;
    let version = version.unwrap_or_else(K8sVersion::newest);
    let state_dir = state_dir.unwrap_or_else(|| {
        let name = if command == "demo" {
            format!("demo-{}", version.dir_name())
        } else {
            version.dir_name()
        };
        cache_root().join("clusters").join(name)
    });
    Ok(Args {
        command,
        version,
        state_dir,
        nodes,
        control_plane_only,
        real_node,
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(tessera_e2e_harness::DEFAULT_LOG_FILTER)
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    if std::env::args().nth(1).as_deref() == Some("node-forwards") {
        return node_forwards();
    }
    let result = parse_args().and_then(|args| {
        let runtime = runtime()?;
        runtime.block_on(async {
            match args.command.as_str() {
                "up" => up(&args).await,
                "down" => down(&args.state_dir),
                "demo" => demo(&args).await,
                _ => status(&args.state_dir).await,
            }
        })
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tessera-cluster: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn up(args: &Args) -> anyhow::Result<ExitCode> {
    if let Ok(state) = StateDir::open(&args.state_dir)
        && let Ok(record) = state.read_record()
    {
        let alive = record.components.iter().filter(|c| is_alive(c.pid)).count();
        if alive == record.components.len() {
            eprintln!(
                "already running ({}) in {}",
                record.version_string,
                state.root().display()
            );
            println!("export KUBECONFIG={}", record.kubeconfig.display());
            return Ok(ExitCode::SUCCESS);
        }
        if alive > 0 {
            bail!(
                "{} holds a partly running control plane ({alive} of {} components); run `tessera-cluster down --state-dir {}` first",
                state.root().display(),
                record.components.len(),
                state.root().display()
            );
        }
    }
    clean_state_dir(&args.state_dir)?;
    let began = std::time::Instant::now();
    let record = if args.control_plane_only {
        let options = ControlPlaneOptions::new(args.version, &args.state_dir);
        let cp = ControlPlane::start(options)
            .await
            .context("starting the control plane")?;
        cp.detach()
    } else {
        let state_dir = std::path::absolute(&args.state_dir).context("resolving --state-dir")?;
        let nodes = std::path::absolute(&args.nodes).context("resolving --nodes")?;
        let options = ClusterOptions::new(args.version, &state_dir, &nodes)
            .context("preparing the simulated cluster")?;
        let cluster = SimCluster::start(options)
            .await
            .context("starting the simulated cluster")?;
        let real = if args.real_node {
            Some(start_real_node(&cluster).await?)
        } else {
            None
        };
        let state = cluster.control_plane().state().clone();
        let mut record = cluster.detach();
        if let Some((components, node)) = real {
            record.components.extend(components);
            record.real_nodes.push(node);
            state
                .write_record(&record)
                .context("writing the cluster record")?;
        }
        record
    };
    let took = began.elapsed();
    eprintln!(
        "{} is up in {:.1}s: {}",
        record.version_string,
        took.as_secs_f64(),
        record.server
    );
    for c in &record.components {
        eprintln!("  {:<24} pid {:<8} log {}", c.name, c.pid, c.log.display());
    }
    eprintln!(
        "stop with: tessera-cluster down --state-dir {}",
        args.state_dir.display()
    );
    println!("export KUBECONFIG={}", record.kubeconfig.display());
    Ok(ExitCode::SUCCESS)
}

async fn demo(args: &Args) -> anyhow::Result<ExitCode> {
    if let Ok(state) = StateDir::open(&args.state_dir)
        && let Ok(record) = state.read_record()
        && record.components.iter().any(|c| is_alive(c.pid))
    {
        bail!(
            "{} holds a running cluster; run `tessera-cluster down --state-dir {}` first",
            state.root().display(),
            state.root().display()
        );
    }
    clean_state_dir(&args.state_dir)?;
    let state_dir = std::path::absolute(&args.state_dir).context("resolving --state-dir")?;
    let nodes = std::path::absolute(&args.nodes).context("resolving --nodes")?;
    println!(
        "== Starting a simulated cluster: {} (state and logs in {})",
        args.version,
        state_dir.display()
    );
    let began = std::time::Instant::now();
    let options = ClusterOptions::new(args.version, &state_dir, &nodes)
        .context("preparing the simulated cluster")?;
    let mut cluster = SimCluster::start(options)
        .await
        .context("starting the simulated cluster")?;
    println!(
        "   {} is up in {:.1}s with {} simulated GPU nodes: {}",
        cluster.control_plane().record().version_string,
        began.elapsed().as_secs_f64(),
        cluster.nodes.len(),
        cluster
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut stdout = std::io::stdout();
    let result = if args.real_node {
        demo_on_real_node(&mut cluster, &mut stdout).await
    } else {
        tessera_e2e_harness::demo::two_workers(
            &mut cluster,
            &tessera_e2e_harness::demo::Stage::Simulated,
            &mut stdout,
        )
        .await
        .context("the two-workers scenario")
    };
    println!(
        "\n== Stopping the cluster (logs stay in {})",
        state_dir.join("logs").display()
    );
    drop(cluster);
    let outcome = result?;
    let a_failed = tessera_e2e_harness::workloads::phase(&outcome.worker_a) == "Failed";
    let b_done = tessera_e2e_harness::workloads::phase(&outcome.worker_b) == "Succeeded";
    if a_failed && b_done && outcome.worker_a_log.contains("CUDA_ERROR_OUT_OF_MEMORY") {
        println!("== Done: worker-a hit its memory wall, worker-b finished beside it");
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "== Unexpected outcome: worker-a {}, worker-b {}",
            a_failed, b_done
        );
        Ok(ExitCode::FAILURE)
    }
}

/// The two-workers scenario on a real node started beside the simulated ones, with Tessera's
/// plugin from the chart and this build's images; the node stops when this returns.
async fn demo_on_real_node(
    cluster: &mut SimCluster,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<tessera_e2e_harness::demo::Outcome> {
    let began = std::time::Instant::now();
    let control_plane = cluster.control_plane();
    let (mut node, workloads) =
        real_node_with_plugin(control_plane, None, "runs the demo on a simulated node").await?;
    let plugin = realnode::tessera::plugin_metrics_address(&control_plane.client(), &node).await?;
    let metrics = node
        .forward_into_netns(plugin)
        .context("reaching the plugin's metrics")?;
    // The controller adds the node's GPU models' DeviceClasses once its slices are published.
    cluster
        .wait_device_class(
            tessera_e2e_harness::demo::REAL_NODE_GPU_CLASS,
            Duration::from_secs(60),
        )
        .await?;
    writeln!(
        out,
        "   real node {} (upstream kubelet and containerd) Ready in {:.1}s; Tessera's chart runs its plugin there ({:.1}s in all)",
        node.name(),
        node.ready_in().as_secs_f64(),
        began.elapsed().as_secs_f64()
    )?;
    let stage = tessera_e2e_harness::demo::Stage::Real {
        node: &node,
        workloads: &workloads,
        metrics,
    };
    let outcome = tessera_e2e_harness::demo::two_workers(cluster, &stage, out)
        .await
        .context("the two-workers scenario");
    let problems = node.stop();
    if !problems.is_empty() {
        eprintln!(
            "tessera-cluster: stopping the real node: {}",
            problems.join("; ")
        );
    }
    outcome
}

/// A real node beside the simulated ones, left running: its forwards run in a process of
/// their own (this program's `node-forwards`), so it outlives `up`.
async fn start_real_node(
    cluster: &SimCluster,
) -> anyhow::Result<(Vec<ComponentRecord>, RealNodeRecord)> {
    let control_plane = cluster.control_plane();
    let forwarder = std::env::current_exe().context("finding this program")?;
    let (node, _) =
        real_node_with_plugin(control_plane, Some(forwarder), "starts without one").await?;
    eprintln!(
        "real node {} Ready in {:.1}s (kubelet and containerd; its pods' network exists only in its own namespace); the chart's tessera-kubelet-plugin pod runs there and its slices are published",
        node.name(),
        node.ready_in().as_secs_f64()
    );
    node.detach().context("leaving the real node running")
}

/// A real node for `control_plane`, its forwards in `forwarder`'s process if given (see
/// `RealNodeOptions::forwarder`), with Tessera's plugin from the chart's DaemonSet and this
/// build's images; also what its workload pods are made of. `instead` says what
/// `--no-real-node` does, for the error when the node's programs are missing.
async fn real_node_with_plugin(
    control_plane: &ControlPlane,
    forwarder: Option<PathBuf>,
    instead: &str,
) -> anyhow::Result<(RealNode, realnode::tessera::Workloads)> {
    let binaries = NodeBinaries::locate(control_plane.binaries())
        .with_context(|| format!("a real node (--no-real-node {instead})"))?;
    let options = RealNodeOptions {
        forwarder,
        ..RealNodeOptions::new(binaries)
    };
    let node = RealNode::start(control_plane, options)
        .await
        .context("starting the real node")?;
    let workloads = realnode::tessera::install_plugin(
        control_plane,
        &node,
        Duration::from_secs(180),
    )
    .await
    .context(
        "Tessera's plugin on the real node (the chart's DaemonSet, with this build's images)",
    )?;
    Ok((node, workloads))
}

/// `tessera-cluster node-forwards --netns PATH --owner DIR (--into-host L=T | --into-netns L=T)...`:
/// the forwards of a real node left running by `up` (see `realnode::netns`), until killed.
fn node_forwards() -> ExitCode {
    let result = (|| -> anyhow::Result<()> {
        let mut args = std::env::args().skip(2);
        let mut netns = None;
        let mut specs = Vec::new();
        while let Some(flag) = args.next() {
            let value = args
                .next()
                .with_context(|| format!("node-forwards: {flag} needs a value"))?;
            match flag.as_str() {
                "--netns" => netns = Some(PathBuf::from(value)),
                // Only so that `down` recognises the process as this cluster's.
                "--owner" => {}
                _ => specs.push(
                    ForwardSpec::from_args(&flag, &value)
                        .map_err(|e| anyhow::anyhow!("node-forwards: {e}"))?,
                ),
            }
        }
        let netns = netns.context("node-forwards: --netns is required")?;
        let runtime = runtime()?;
        runtime.block_on(async {
            let _forwards = start_forwards(&netns, &specs)?;
            // What the harness waits for (whatever the log filter).
            eprintln!(
                "{FORWARDS_READY}: {} forwards into {}",
                specs.len(),
                netns.display()
            );
            std::future::pending::<()>().await;
            Ok::<(), anyhow::Error>(())
        })
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera-cluster: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn clean_state_dir(dir: &Path) -> anyhow::Result<()> {
    for entry in OWNED_ENTRIES {
        let path = dir.join(entry);
        let result = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("removing {} from a previous run", path.display()));
            }
        }
    }
    Ok(())
}

fn down(dir: &Path) -> anyhow::Result<ExitCode> {
    let state = match StateDir::open(dir) {
        Ok(state) => state,
        Err(_) => {
            eprintln!("nothing to stop: {} does not exist", dir.display());
            return Ok(ExitCode::SUCCESS);
        }
    };
    let marker = state.owner_marker();
    // In reverse start order: Tessera's processes before the control plane, etcd last, so
    // every client shuts down cleanly instead of retrying.
    let mut components: Vec<(String, PathBuf)> = match state.read_record() {
        Ok(record) => record
            .components
            .into_iter()
            .map(|c| (c.name, c.pid_file))
            .collect(),
        Err(_) => [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
        ]
        .into_iter()
        .map(|name| (name.to_owned(), state.pid_file(name)))
        .collect(),
    };
    components.reverse();
    let real_nodes = state
        .read_record()
        .map(|r| r.real_nodes)
        .unwrap_or_default();
    let mut stopped = 0;
    for (name, pid_file) in components {
        if stop_pid_file(&name, &pid_file, &marker, Duration::from_secs(10))? {
            eprintln!("stopped {name}");
            stopped += 1;
        }
    }
    remove_containers(&container_prefix(state.root()));
    for node in &real_nodes {
        for problem in realnode::clean_up(node) {
            eprintln!("real node {}: {problem}", node.name);
        }
        eprintln!("real node {} removed", node.name);
    }
    let _ = std::fs::remove_file(state.record());
    eprintln!(
        "{stopped} component(s) stopped; logs stay in {}",
        state.logs().display()
    );
    Ok(ExitCode::SUCCESS)
}

async fn status(dir: &Path) -> anyhow::Result<ExitCode> {
    let state = StateDir::open(dir)
        .with_context(|| format!("no control plane state in {}", dir.display()))?;
    let record = match state.read_record() {
        Ok(record) => record,
        Err(_) => {
            println!(
                "not running (no cluster.json in {})",
                state.root().display()
            );
            return Ok(ExitCode::FAILURE);
        }
    };
    println!(
        "{} at {} (state {})",
        record.version_string,
        record.server,
        state.root().display()
    );
    let mut healthy = true;
    for c in &record.components {
        let alive = is_alive(c.pid);
        healthy &= alive;
        println!(
            "  {:<24} pid {:<8} {}",
            c.name,
            c.pid,
            if alive { "running" } else { "NOT RUNNING" }
        );
    }
    let ready = apiserver_ready(&record.kubeconfig).await;
    match &ready {
        Ok(()) => println!("  kube-apiserver /readyz ok"),
        Err(e) => println!("  kube-apiserver /readyz failed: {e:#}"),
    }
    healthy &= ready.is_ok();
    println!("export KUBECONFIG={}", record.kubeconfig.display());
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn apiserver_ready(kubeconfig: &Path) -> anyhow::Result<()> {
    let parsed = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let mut config = kube::Config::from_custom_kubeconfig(parsed, &Default::default()).await?;
    config.connect_timeout = Some(Duration::from_secs(2));
    config.read_timeout = Some(Duration::from_secs(2));
    let client = kube::Client::try_from(config)?;
    let request = http::Request::get("/readyz").body(Vec::new())?;
    client.request_text(request).await?;
    Ok(())
}
