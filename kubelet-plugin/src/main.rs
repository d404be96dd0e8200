//! `tessera-kubelet-plugin`: wires flags, inventory, the API client, the gRPC servers and the
//! metrics endpoint, and runs until SIGTERM.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Parser;
use kube::runtime::events::EventType;
use tessera_driver::Inventory;
use tessera_driver::cdi::{CdiMode, DriverFiles};
use tessera_kubelet_plugin::cli::{Args, CdiModeArg, LogFormat, MetricsAuthArg};
use tessera_kubelet_plugin::metrics::Metrics;
use tessera_kubelet_plugin::metrics_auth::Authorizer;
use tessera_kubelet_plugin::node::health::{
    self, HealthConfig, HealthSource, NodeEvents, REASON_PLUGIN_FAILED,
};
use tessera_kubelet_plugin::{
    Node, NodeConfig, Plugin, Sockets, context_overhead, driver_wall, gpu_probe, http, install,
};

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Once, through the logger, so JSON logs stay one object per line.
            tracing::error!("{}", tessera_api::error_chain::Chain(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colours only for a person at a terminal, never into a log collector's file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Makes the API client first (it connects only when used), so that whatever stops the
/// plugin is also recorded as an Event on the Node (`kubectl describe node` shows why the node
/// offers no GPUs); the node's own checks still come before a missing kubeconfig is reported.
async fn run(args: Args) -> Result<()> {
    let client = kube_client(args.kubeconfig.as_deref()).await;
    let events = client
        .as_ref()
        .ok()
        .map(|c| NodeEvents::new(c.clone(), &args.node_name));
    let result = serve(args, client, events.clone()).await;
    if let (Err(error), Some(events)) = (&result, &events) {
        events
            .publish(
                EventType::Warning,
                REASON_PLUGIN_FAILED,
                "Start",
                format!(
                    "tessera-kubelet-plugin stopped: {}",
                    tessera_api::error_chain::Chain(error.as_ref())
                ),
            )
            .await;
    }
    result
}

async fn serve(args: Args, client: Result<kube::Client>, events: Option<NodeEvents>) -> Result<()> {
    let mut inventory = match &args.inventory {
        // A fake node states its topology in the file; the host's sysfs is not its.
        Some(path) => Inventory::from_file(path)?,
        None => {
            let mut inventory =
                tessera_driver::nvml::discover(args.nvml_library.as_deref().map(|p| p.as_os_str()))
                    .context("no --inventory given, and NVML found no GPUs")?;
            // Only claims that ask for pcieRoot or numaNode miss them: not worth more than
            // a debug line each (a VM's emulated bus, a fake node).
            for problem in inventory.fill_topology(std::path::Path::new("/sys")) {
                tracing::debug!(%problem, "GPU topology attribute left out");
            }
            inventory
        }
    };
    for gpu in &inventory.gpus {
        tracing::info!(index = gpu.index, uuid = %gpu.uuid, product = %gpu.product_name, memory = gpu.memory, pcie_root = gpu.pcie_root.as_deref(), numa_node = gpu.numa_node, "GPU");
    }
    // The guard rail: no overcommit on GPUs that cannot page managed memory on demand.
    args.memory_overcommit
        .check(&inventory)
        .context("--memory-overcommit")?;
    let missing = args.memory_overcommit.models_not_on(&inventory);
    if !missing.is_empty() {
        let here: Vec<&str> = inventory
            .gpus
            .iter()
            .map(|g| g.product_name.as_str())
            .collect();
        tracing::warn!(models = ?missing, node_models = ?here, "--memory-overcommit names GPU models this node does not have (a typo, or models of other nodes); their factors apply nowhere here");
    }
    for gpu in &inventory.gpus {
        let factor = args.memory_overcommit.factor(gpu);
        if factor.overcommits() {
            tracing::info!(index = gpu.index, uuid = %gpu.uuid, %factor, offered = args.memory_overcommit.offered_memory(gpu), "GPU memory overcommitted");
        }
    }
    if args.oversubscribe_by_default {
        tracing::info!(
            "claims that do not set oversubscribe spill on overcommitted GPUs (--oversubscribe-by-default)"
        );
    }
    let probe_program = args
        .gpu_probe
        .clone()
        .unwrap_or_else(|| gpu_probe::beside_this_program("tessera-gpu-probe"));
    // A fake inventory has a driver to ask only when given its NVML.
    let probe = if args.inventory.is_none() || args.nvml_library.is_some() {
        Some(
            gpu_probe::run(&gpu_probe::Probe {
                program: &probe_program,
                nvml_library: args.nvml_library.as_deref(),
                cuda_library: args.cuda_library.as_deref(),
            })
            .await,
        )
    } else {
        None
    };
    let context_overheads =
        context_overhead::resolve(args.context_overhead, &mut inventory, probe.as_ref());
    let walled = driver_wall::resolve(args.driver_memory_wall, &mut inventory, probe.as_ref());
    let driver_wall = if walled.is_empty() {
        None
    } else {
        let hook = args
            .cdi_hook_path
            .clone()
            .unwrap_or_else(|| gpu_probe::beside_this_program("tessera-cdi-hook"));
        match install::install_hook(&hook, &args.state_dir) {
            Ok(program) => Some(driver_wall::NodeDriverWall {
                hook: tessera_driver::cdi::DriverWallHook {
                    program,
                    driver_root: args
                        .host_driver_root
                        .clone()
                        .unwrap_or_else(|| args.driver_root.clone()),
                },
                gpus: walled,
            }),
            // The shim's wall still holds: the node serves, and says which wall it lacks.
            Err(error) => {
                tracing::warn!(%error, "cannot install the driver-wall hook; claims get the shim's wall alone");
                for gpu in &mut inventory.gpus {
                    gpu.driver_memory_wall = false;
                }
                None
            }
        }
    };
    install::install_shim(&args.shim_path, &args.state_dir)?;
    let (cdi_mode, driver_files) = match args.cdi_mode {
        CdiModeArg::Toolkit => (CdiMode::Toolkit, None),
        CdiModeArg::Standalone => (
            CdiMode::Standalone,
            Some(
                DriverFiles::discover(&args.driver_root, &args.dev_root)
                    .context("--cdi-mode=standalone: the driver's files for the CDI specs")?,
            ),
        ),
    };
    let config = NodeConfig {
        node_name: args.node_name.clone(),
        plugin_dir: args.plugin_dir.clone(),
        cdi_dir: args.cdi_dir.clone(),
        state_dir: args.state_dir.clone(),
        cdi_mode,
        driver_files,
        inventory,
        memory_overcommit: args.memory_overcommit.clone(),
        oversubscribe_by_default: args.oversubscribe_by_default,
        boot_id: boot_id(&args.boot_id_file)?,
        booted_at: booted_at(),
        driver_wall,
    };
    std::fs::create_dir_all(&config.cdi_dir)
        .with_context(|| format!("creating {}", config.cdi_dir.display()))?;
    let client = client?;
    // Made before anything is served, so a bad certificate stops the plugin at once.
    let metrics_tls = match args.metrics_auth {
        MetricsAuthArg::None => None,
        MetricsAuthArg::Kubernetes => {
            let files = args
                .metrics_tls_cert_file
                .as_deref()
                .zip(args.metrics_tls_key_file.as_deref());
            let mut names = vec![args.node_name.clone(), "localhost".into()];
            if !args.metrics_address.ip().is_unspecified() {
                names.push(args.metrics_address.ip().to_string());
            }
            Some(
                http::tls_config(files, names)
                    .context("the metrics endpoint's TLS (--metrics-auth=kubernetes)")?,
            )
        }
    };
    let inventory = config.inventory.clone();
    let metrics = Arc::new(Metrics::new(args.state_dir.clone()));
    metrics.observe_inventory(&config.inventory);
    metrics.observe_context_overhead(&config.inventory, &context_overheads);
    let node = Arc::new(Node::new(config, client.clone(), metrics.clone()));
    let sockets = Sockets::new(
        &args.registrar_dir,
        &args.plugin_dir,
        args.instance_id.as_deref(),
    );
    // The health watcher's first look comes before the plugin registers: a GPU already
    // unhealthy is never published as healthy, nor reported so to the kubelet.
    let health = HealthConfig {
        source: match (&args.inventory, args.health_interval) {
            (_, 0) => HealthSource::Off,
            (Some(path), _) => HealthSource::File(path.clone()),
            (None, _) => HealthSource::Nvml(args.nvml_library.clone()),
        },
        interval: std::time::Duration::from_secs(args.health_interval),
    };
    let health = health::watch(health, inventory, events.clone());
    if health.observed {
        let (metrics, gpus) = (metrics.clone(), health.gpus.clone());
        tokio::spawn(async move { metrics.follow_gpu_health(gpus).await });
    }
    let plugin = Plugin::start(
        node,
        sockets,
        events,
        health.observed.then(|| health.gpus.clone()),
    )
    .await
    .context("serving the plugin's sockets")?;
    // Slices only once the plugin is registered: the kubelet removes a node's slices of drivers
    // it has no plugin for.
    let slices = tessera_kubelet_plugin::slices::start_with(
        client.clone(),
        &args.node_name,
        &args.sharing_mode,
        health,
        args.memory_overcommit.clone(),
    )?;
    let http = match metrics_tls {
        None => tokio::spawn(http::serve(args.metrics_address, metrics)),
        Some(tls) => {
            let router = http::router_with_auth(metrics, Arc::new(Authorizer::new(client.clone())));
            let listener = tokio::net::TcpListener::bind(args.metrics_address)
                .await
                .with_context(|| format!("listening on {}", args.metrics_address))?;
            tokio::spawn(http::serve_tls(listener, router, tls))
        }
    };

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
        result = http => {
            drop(slices);
            plugin.stop().await;
            match result {
                Ok(Err(error)) => bail!("metrics server on {}: {error}", args.metrics_address),
                _ => bail!("metrics server stopped"),
            }
        }
    }
    // The slice controller stops before the plugin unregisters: never re-create what the
    // kubelet deletes for a departing plugin.
    drop(slices);
    plugin.stop().await;
    Ok(())
}

async fn kube_client(kubeconfig: Option<&Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await?
        }
        None => {
            kube::Config::incluster().context("no --kubeconfig and not running in a cluster")?
        }
    };
    Ok(kube::Client::try_from(config)?)
}

/// This boot's ID. Without it a reboot could not be told from a plugin restart, and claims
/// whose CDI specs the reboot cleared would be answered as prepared: so no ID, no start.
fn boot_id(file: &Path) -> Result<String> {
    let id = std::fs::read_to_string(file)
        .with_context(|| format!("reading this boot's ID from {}", file.display()))?;
    let id = id.trim();
    if id.is_empty() {
        bail!("{} holds no boot ID", file.display());
    }
    Ok(id.to_owned())
}

/// When this boot began: `btime` of `/proc/stat` (the epoch if unknown, which makes every
/// unreadable checkpoint an error rather than a discard).
fn booted_at() -> std::time::SystemTime {
    let btime = std::fs::read_to_string("/proc/stat").ok().and_then(|stat| {
        stat.lines().find_map(|l| {
            l.strip_prefix("btime ")
                .and_then(|s| s.trim().parse::<u64>().ok())
        })
    });
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(btime.unwrap_or(0))
}
