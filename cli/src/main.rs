//! `tessera`: flags, GPU discovery (NVML or a fake inventory file) and output; the work is in
//! `tessera_cli::slice`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tessera_api::names::{CONFIG_API_VERSION, CONFIG_KIND};
use tessera_api::{CorePolicy, GpuConfig, Priority};
use tessera_cli::slice::{self, GpuFiles, Paths, Request};
use tessera_driver::Inventory;

/// Tessera's GPU slices without Kubernetes.
#[derive(Parser)]
#[command(name = "tessera", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// CDI specs of GPU slices for podman, docker and other CDI-aware runtimes.
    #[command(subcommand)]
    Cdi(Cdi),
}

#[derive(Subcommand)]
enum Cdi {
    /// Write the CDI spec of a slice: `--device gpu.tessera.dev/slice=<name>` then gets the
    /// shim, its config with the limits, and the slice's accounting region.
    Generate(Generate),
    /// List the slices whose specs are in --cdi-dir.
    List(Dirs),
    /// Remove a slice's spec and files (running containers keep theirs).
    Remove {
        /// The slice's name.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        dirs: Dirs,
    },
}

#[derive(Args)]
struct Dirs {
    /// Where the CDI spec goes: a directory the runtime reads (/etc/cdi or /var/run/cdi).
    #[arg(long, env = "TESSERA_CDI_DIR", default_value = "/etc/cdi")]
    cdi_dir: PathBuf,
    /// Tessera's host state: the shim copy (lib/) and each slice's config and region (slices/).
    #[arg(long, env = "TESSERA_STATE_DIR", default_value = "/var/lib/tessera")]
    state_dir: PathBuf,
}

#[derive(Args)]
struct Generate {
    /// The slice's name: the CDI device is gpu.tessera.dev/slice=<name>.
    #[arg(long)]
    name: String,
    /// The GPU: its NVML index (0, 1, …) or its UUID (GPU-…).
    #[arg(long)]
    gpu: String,
    /// The memory wall: a quantity such as 4Gi, 512Mi or a number of bytes.
    #[arg(long)]
    memory: String,
    /// The compute share, in percent of the GPU (1-100).
    #[arg(long, default_value_t = 100)]
    cores: u32,
    /// What each CUDA context a process creates is charged against the wall (a quantity, such
    /// as 500Mi): the driver's own memory per context, which no allocation call reports. 0
    /// charges nothing; `tessera-gpu-probe` (in the kubelet plugin's image) measures it.
    #[arg(long, default_value = "0", value_parser = context_overhead)]
    context_overhead: u64,
    /// Priority between slices sharing the GPU: high, normal or low.
    #[arg(long, default_value = "normal", value_parser = config_value::<Priority>)]
    priority: Priority,
    /// default: the cores share is guaranteed, an idle GPU may be used beyond it; force: a cap.
    #[arg(long, default_value = "default", value_parser = config_value::<CorePolicy>)]
    core_policy: CorePolicy,
    /// Describe the GPUs with this fake inventory file instead of asking NVML.
    #[arg(long)]
    inventory: Option<PathBuf>,
    /// Load NVML from this file instead of libnvidia-ml.so.1 from the loader path.
    #[arg(long)]
    nvml_library: Option<PathBuf>,
    /// The shim to install into <state-dir>/lib.
    #[arg(
        long,
        env = "TESSERA_SHIM",
        default_value = "/usr/lib/tessera/libtessera.so"
    )]
    shim_path: PathBuf,
    /// The NVIDIA Container Toolkit's spec provides the GPU: add `--device nvidia.com/gpu=<uuid>`
    /// to the run. Without it, Tessera's spec carries the device nodes and driver libraries.
    #[arg(long)]
    toolkit: bool,
    /// Where the driver's libraries are found (without --toolkit).
    #[arg(long, default_value = "/")]
    driver_root: PathBuf,
    /// Where /dev/nvidia* are found (without --toolkit).
    #[arg(long, default_value = "/")]
    dev_root: PathBuf,
    #[command(flatten)]
    dirs: Dirs,
}

impl Dirs {
    fn paths(&self) -> Paths {
        Paths {
            cdi_dir: self.cdi_dir.clone(),
            state_dir: self.state_dir.clone(),
        }
    }
}

/// `--context-overhead`: a quantity.
fn context_overhead(text: &str) -> Result<u64, String> {
    tessera_driver::quantity::parse(text)
        .map_err(|e| format!("{e}; expected a quantity such as 500Mi"))
}

/// Parses a `GpuConfig` field's value as the claim config spells it (`high`, `force`).
fn config_value<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(text.to_string())).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!(
                "tessera: {}",
                tessera_api::error_chain::Chain(error.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Cdi(Cdi::Generate(args)) => generate(args),
        Command::Cdi(Cdi::List(dirs)) => {
            let slices = slice::list(&dirs.paths())?;
            if slices.is_empty() {
                println!("no slices in {}", dirs.cdi_dir.display());
                return Ok(());
            }
            println!(
                "{:<20} {:<42} {:>8} {:>6}  DEVICE",
                "NAME", "GPU", "MEMORY", "CORES"
            );
            for s in slices {
                let (gpu, memory, cores) = match s.config.as_ref().and_then(|c| c.devices.first()) {
                    Some(d) => (
                        d.uuid.clone(),
                        tessera_driver::quantity::format(d.memory_limit),
                        d.cores.to_string(),
                    ),
                    None => ("(config missing)".into(), "-".into(), "-".into()),
                };
                println!(
                    "{:<20} {gpu:<42} {memory:>8} {cores:>6}  {}={}",
                    s.name,
                    tessera_driver::cdi::slice_kind(),
                    s.name
                );
            }
            Ok(())
        }
        Command::Cdi(Cdi::Remove { name, dirs }) => {
            slice::remove(&name, &dirs.paths())?;
            println!("removed slice {name}");
            Ok(())
        }
    }
}

fn generate(args: Generate) -> Result<()> {
    // Cheap checks first: a bad name should not wait for NVML.
    slice::check_name(&args.name)?;
    let mut inventory = match &args.inventory {
        Some(path) => Inventory::from_file(path)?,
        None => tessera_driver::nvml::discover(args.nvml_library.as_deref().map(|p| p.as_os_str()))
            .context("no --inventory given, and NVML found no GPUs")?,
    };
    for gpu in &mut inventory.gpus {
        gpu.context_overhead = args.context_overhead;
    }
    let request = Request {
        name: args.name.clone(),
        gpu: args.gpu.clone(),
        memory: args.memory.clone(),
        cores: args.cores,
        settings: GpuConfig {
            api_version: CONFIG_API_VERSION.into(),
            kind: CONFIG_KIND.into(),
            priority: args.priority,
            core_policy: args.core_policy,
            ..GpuConfig::default()
        },
    };
    let files = if args.toolkit {
        GpuFiles::Toolkit
    } else {
        GpuFiles::Standalone {
            driver_root: args.driver_root.clone(),
            dev_root: args.dev_root.clone(),
        }
    };
    let made = slice::generate(
        &inventory,
        &request,
        &args.dirs.paths(),
        &args.shim_path,
        &files,
    )?;
    println!(
        "slice {}: {} of memory and {}% of the compute of GPU {} ({}, {})",
        args.name,
        tessera_driver::quantity::format(made.memory),
        made.cores,
        made.gpu.index,
        made.gpu.product_name,
        made.gpu.uuid
    );
    println!("wrote {}", made.spec.display());
    if let Some(promised) = made.overcommitted() {
        let others: Vec<String> = made
            .neighbours
            .iter()
            .map(|(name, memory)| format!("{name} {}", tessera_driver::quantity::format(*memory)))
            .collect();
        eprintln!(
            "tessera: warning: the slices on GPU {} now promise {} of its {} ({}, and this one): they cannot all reach their walls at once, and one may meet the driver's out-of-memory inside its wall",
            made.gpu.index,
            tessera_driver::quantity::format(promised),
            tessera_driver::quantity::format(made.gpu.memory),
            others.join(", ")
        );
    }
    let mut devices = format!("--device {}", made.device_id);
    if let Some(toolkit) = &made.toolkit_device_id {
        devices.push_str(&format!(" --device {toolkit}"));
    }
    println!("run: podman run {devices} <image> <command>");
    Ok(())
}
