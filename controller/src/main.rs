//! `tessera-controller`: the cluster-wide Deployment. With the lease held it keeps the generic
//! DeviceClass and one per GPU model present in the slices; every replica serves the cluster's
//! allocation metrics. Never exits on API server errors: it retries with backoff.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use kube::Client;
use prometheus_client::registry::Registry;
use tessera_controller::backoff::Backoff;
use tessera_controller::cluster::{self, http, metrics::ClusterMetrics};
use tessera_controller::discovery::ServerDra;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Parser)]
#[command(
    name = "tessera-controller",
    version,
    about = "Tessera's cluster controller: DeviceClasses per GPU model, cluster GPU metrics"
)]
struct Args {
    /// kubeconfig file; in-cluster configuration when unset.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Address of /metrics and /healthz.
    #[arg(long, env = "TESSERA_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Seconds between reconciles (each lists all ResourceSlices and ResourceClaims).
    #[arg(long, env = "TESSERA_RESYNC_SECONDS", default_value_t = 30)]
    resync_seconds: u64,
    /// Take the Lease before managing DeviceClasses (off: this replica always manages them).
    #[arg(long, env = "TESSERA_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "tessera-system")]
    namespace: String,
    /// This replica's identity in the Lease; the pod name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Name of the Lease.
    #[arg(long, default_value = "tessera-controller")]
    lease_name: String,
    #[arg(long, env = "TESSERA_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// One reconcile, printed as JSON, then exit (diagnostics).
    #[arg(long)]
    once: bool,
    /// Print the ResourceSlices a node with this inventory file (the fake GPU node's JSON) would
    /// publish, then exit; no API server needed. With --node, --mode, --api-version.
    #[arg(long)]
    render_inventory: Option<PathBuf>,
    #[arg(long, default_value = "node-0")]
    node: String,
    /// consumable, partitioned, fixed, fixed:<n>, exclusive.
    #[arg(long, default_value = "consumable")]
    mode: String,
    /// v1, v1beta2, v1beta1, v1alpha3.
    #[arg(long, default_value = "v1")]
    api_version: String,
    /// With --render-inventory: the node's memory overcommit, `1.5` or `NVIDIA L40S=2,default=1.2`
    /// (1.0–4.0), as `tessera-kubelet-plugin --memory-overcommit` takes it.
    #[arg(long, default_value = "1")]
    memory_overcommit: tessera_driver::MemoryOvercommit,
}

/// `--render-inventory`: a bad inventory file is refused with the file and field named.
fn render(args: &Args, path: &std::path::Path) -> Result<()> {
    use tessera_controller::node::ModeSetting;
    use tessera_controller::slices::{CounterLayout, SliceMeta, build_pool_with, render_pool};
    let inventory = tessera_driver::Inventory::from_file(path)?;
    args.memory_overcommit
        .check(&inventory)
        .context("--memory-overcommit")?;
    let mode = match args
        .mode
        .parse::<ModeSetting>()
        .map_err(anyhow::Error::msg)?
    {
        ModeSetting::Mode(m) => m,
        ModeSetting::Auto => anyhow::bail!("--mode auto needs an API server; name a mode"),
    };
    let version = tessera_controller::ApiVersion::parse(&args.api_version).with_context(|| {
        format!(
            "--api-version {:?}: expected v1, v1beta2, v1beta1 or v1alpha3",
            args.api_version
        )
    })?;
    anyhow::ensure!(
        version.supports(mode),
        "mode {} needs resource.k8s.io v1 or v1beta2",
        mode.name()
    );
    let plan = build_pool_with(
        &inventory,
        &args.node,
        mode,
        CounterLayout::Separate,
        &args.memory_overcommit,
        &Default::default(),
    )?;
    for slice in render_pool(
        &plan,
        version,
        &SliceMeta {
            generation: 1,
            node_uid: None,
        },
    ) {
        println!("{}", serde_json::to_string_pretty(&slice)?);
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colours only for a person at a terminal, never into a log collector's file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match args.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Once, through the logger, each cause once.
            tracing::error!("{}", tessera_api::error_chain::Chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn client(kubeconfig: Option<&PathBuf>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?
        }
        None => kube::Config::infer()
            .await
            .context("no --kubeconfig and no in-cluster configuration")?,
    };
    Ok(Client::try_from(config)?)
}

/// Discovery with backoff: an API server that is down is waited for, never a crash loop.
async fn discover(client: &Client) -> ServerDra {
    let mut backoff = Backoff::default();
    loop {
        match ServerDra::discover(client).await {
            Ok(s) => return s,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "discovering resource.k8s.io");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Discovery for `--once`: a few quick tries, then the error, so a script is told the API
/// server cannot be reached instead of waiting for ever.
async fn discover_once(client: &Client) -> Result<ServerDra> {
    const TRIES: u32 = 3;
    let mut tried = 1;
    loop {
        match ServerDra::discover(client).await {
            Ok(s) => return Ok(s),
            Err(e) if tried < TRIES => {
                tracing::warn!(error = %e, tried, "discovering resource.k8s.io; trying again in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                tried += 1;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("--once: the API server did not answer discovery of resource.k8s.io ({TRIES} tries)")
                });
            }
        }
    }
}

async fn run(args: Args) -> Result<()> {
    if let Some(path) = &args.render_inventory {
        return render(&args, path);
    }
    let client = client(args.kubeconfig.as_ref()).await?;
    if args.once {
        let server = discover_once(&client).await?;
        let (view, report) = cluster::reconcile(&client, server.version, true).await?;
        println!(
            "{}",
            serde_json::json!({ "gpus": view.gpus.len(), "claims": view.claims.len(), "products": view.products, "classes": format!("{report:?}") })
        );
        return Ok(());
    }
    let metrics = ClusterMetrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    // Bound first, so an address in use stops the controller at once, naming it.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {} (--listen)", args.listen))?;
    let server_task = tokio::spawn(http::serve_on(listener, Arc::new(registry)));

    let mut leader = if args.leader_elect {
        let identity = args
            .identity
            .clone()
            .unwrap_or_else(|| format!("tessera-controller-{}", std::process::id()));
        // build() talks to the API server: retried like everything else.
        let mut backoff = Backoff::default();
        let manager = loop {
            match kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &args.lease_name)
                .with_namespace(&args.namespace)
                .with_identity(&identity)
                .with_duration(15)
                .with_grace(5)
                .build()
                .await
            {
                Ok(m) => break m,
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %tessera_api::error_chain::Chain(&e), retry_in = ?delay, "setting up leader election");
                    tokio::time::sleep(delay).await;
                }
            }
        };
        tracing::info!(%identity, lease = %args.lease_name, namespace = %args.namespace, "leader election");
        Some(manager.watch().await)
    } else {
        None
    };

    let mut server = discover(&client).await;
    tracing::info!(
        version = server.version.version(),
        "watching ResourceSlices and ResourceClaims"
    );
    let interval = Duration::from_secs(args.resync_seconds.max(1));
    let mut backoff = Backoff::default();
    let mut taint_rules = cluster::taint_rules::TaintRuleCheck::new(client.clone());
    loop {
        let leading = leader.as_ref().is_none_or(|(rx, _)| *rx.borrow());
        let start = Instant::now();
        let wait = match cluster::reconcile(&client, server.version, leading).await {
            Ok((view, report)) => {
                metrics.update(&view);
                metrics
                    .last_reconcile_seconds
                    .set(start.elapsed().as_secs_f64());
                if let Some(r) = report.filter(|r| *r != Default::default()) {
                    tracing::info!(created = ?r.created, updated = ?r.updated, deleted = ?r.deleted, "DeviceClasses");
                }
                if leading && let Err(e) = taint_rules.check(&view).await {
                    tracing::warn!(error = %tessera_api::error_chain::Chain(&e), "checking DeviceTaintRules");
                }
                backoff.reset();
                interval
            }
            Err(e) => {
                metrics.reconcile_errors.inc();
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "reconcile");
                // A 404 may mean the served version changed (cluster upgrade): look again.
                if matches!(&e, kube::Error::Api(s) if s.code == 404) {
                    server = discover(&client).await;
                }
                delay
            }
        };
        let leader_change = async {
            match leader.as_mut() {
                Some((rx, _)) => {
                    if rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = leader_change => tracing::info!(leading = leader.as_ref().is_some_and(|(rx, _)| *rx.borrow()), "leadership changed"),
            _ = tokio::signal::ctrl_c() => break,
            r = wait_task(&server_task) => { r?; }
        }
    }
    // Dropping the receiver makes the lease manager release the Lease for a fast handover.
    if let Some((rx, task)) = leader {
        drop(rx);
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    Ok(())
}

async fn wait_task(task: &tokio::task::JoinHandle<std::io::Result<()>>) -> Result<()> {
    while !task.is_finished() {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    anyhow::bail!("the /metrics server stopped")
}
