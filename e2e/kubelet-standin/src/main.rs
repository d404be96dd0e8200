//! `tessera-kubelet-standin`: the parts of a kubelet Tessera's simulated GPU nodes need.
//!
//! Per node it registers the Node object and renews its Lease, watches the plugin registration
//! directory like the kubelet's plugin watcher (GetInfo, NotifyRegistrationStatus), and for each
//! pod bound to the node: waits for its ResourceClaims to be allocated and reserved, calls the
//! plugin's NodePrepareResources over the real gRPC socket, runs each container's command with
//! podman + runc on the host's root filesystem as an overlay (no image is pulled) with the CDI
//! devices the plugin returned, reports phase and exit codes in the pod's status, and calls
//! NodeUnprepareResources when the pod has finished or is deleted.
//!
//! What it does not do, on purpose: pull images, restart containers (every restartPolicy runs a
//! container once), networking, probes, volumes other than emptyDir and hostPath, or re-attaching to
//! containers after its own restart (such pods are failed, as their containers were stopped).

mod checkpoint;
mod claims;
mod container;
mod events;
mod node;
mod plugin;
mod pods;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

/// The kubelet stand-in of one simulated node.
#[derive(Debug, Clone, Parser)]
#[command(name = "tessera-kubelet-standin", version, about)]
pub struct Args {
    /// The node this stand-in is the kubelet of.
    #[arg(long)]
    pub node_name: String,
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: PathBuf,
    /// Where plugins put their registration sockets (the kubelet's plugins_registry).
    #[arg(long)]
    pub registrar_dir: PathBuf,
    /// The stand-in's own state: the prepared-claims checkpoint, pod logs and emptyDir volumes.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// The DRA gRPC API to speak, as the kubelet of the simulated release would.
    #[arg(long, value_enum, default_value_t = plugin::DraApi::V1)]
    pub dra_api: plugin::DraApi,
    /// Reported as the node's kubelet version.
    #[arg(long, default_value = "v0.0.0-tessera-standin")]
    pub kubelet_version: String,
    /// A label for the Node object, `key=value`; repeatable.
    #[arg(long = "node-label", value_parser = parse_pair)]
    pub node_labels: Vec<(String, String)>,
    /// An environment variable for every container, `KEY=VALUE`; repeatable (the simulated
    /// node's fake GPU driver reads its config from the environment).
    #[arg(long = "container-env", value_parser = parse_pair)]
    pub container_env: Vec<(String, String)>,
    /// A host directory every container gets, `HOST:PATH`; repeatable.
    #[arg(long = "container-volume")]
    pub container_volumes: Vec<String>,
    /// Container names start with it (unique on the host when several simulated clusters run).
    #[arg(long, default_value = "tessera")]
    pub container_prefix: String,
    /// Passed to podman when it has the flag (podman 4.3 reads only /etc/cdi and /var/run/cdi).
    #[arg(long)]
    pub cdi_spec_dir: Option<PathBuf>,
    /// Log lines as JSON.
    #[arg(long)]
    pub log_json: bool,
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,kube_client::client::builder=off")
    });
    // Colours only for a person at a terminal, never into a log file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if args.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tessera-kubelet-standin: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating the state directory {}", args.state_dir.display()))?;
    let kubeconfig = kube::config::Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading kubeconfig {}", args.kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .context("using the kubeconfig")?;
    let client = kube::Client::try_from(config).context("building the API client")?;

    node::register(&client, &args).await?;
    let resource_api = claims::ResourceApi::discover(&client).await?;
    tracing::info!(node = %args.node_name, api = %resource_api.version(), dra = ?args.dra_api, "kubelet stand-in started");

    let plugins = plugin::Watcher::start(args.registrar_dir.clone(), args.dra_api);
    let checkpoint = checkpoint::Checkpoint::open(&args.state_dir.join("checkpoint.json"))?;
    let runtime = container::Podman::new(&args)?;
    let context = Arc::new(pods::Context {
        client: client.clone(),
        node: args.node_name.clone(),
        container_prefix: args.container_prefix.clone(),
        state_dir: args.state_dir.clone(),
        resource_api,
        plugins,
        checkpoint: tokio::sync::Mutex::new(checkpoint),
        runtime,
    });

    let heartbeat = tokio::spawn(node::heartbeat(client.clone(), args.node_name.clone()));
    let sync = pods::run(context);
    tokio::select! {
        result = sync => result,
        result = heartbeat => match result {
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => Ok(()),
            Err(e) => Err(anyhow::anyhow!("node heartbeat task ended: {e}")),
        },
        _ = shutdown_signal() => {
            tracing::info!("stopping");
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pairs_need_a_key_and_an_equals_sign() {
        assert_eq!(super::parse_pair("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(super::parse_pair("A="), Ok(("A".into(), String::new())));
        assert!(super::parse_pair("=b").is_err());
        assert!(super::parse_pair("Ab").is_err());
    }
}
