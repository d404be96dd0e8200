//! `tessera-gpu-probe`: measures what a CUDA context costs on each GPU of the node and prints
//! one line of JSON (`context_probe::Report`). The kubelet plugin runs it at start-up.

use std::path::PathBuf;
use std::process::ExitCode;

use tessera_node_tools::context_probe;
use tessera_node_tools::driver_libs::{self, Cuda, Nvml};

const USAGE: &str = "usage: tessera-gpu-probe [--nvml-library PATH] [--cuda-library PATH]

Measures the device memory a CUDA context takes on each GPU (a primary context with nothing
allocated) and prints {\"gpus\":[{\"uuid\",\"contextOverhead\",\"method\"}],\"errors\":[…]}.
--nvml-library  libnvidia-ml.so.1 to load (default: the dynamic loader's)
--cuda-library  libcuda.so.1 to load (default: beside --nvml-library, else the loader's)";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tessera-gpu-probe: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let mut nvml_path: Option<PathBuf> = None;
    let mut cuda_path: Option<PathBuf> = None;
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| {
            args.next()
                .map(PathBuf::from)
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a path\n{USAGE}"))
        };
        match arg.to_str() {
            Some("--nvml-library") => nvml_path = Some(value("--nvml-library")?),
            Some("--cuda-library") => cuda_path = Some(value("--cuda-library")?),
            Some("-h" | "--help") => {
                println!("{USAGE}");
                return Ok(());
            }
            _ => anyhow::bail!("unknown argument {arg:?}\n{USAGE}"),
        }
    }
    let cuda_path = cuda_path.unwrap_or_else(|| driver_libs::cuda_beside(nvml_path.as_deref()));
    let nvml_path = nvml_path.unwrap_or_else(|| PathBuf::from("libnvidia-ml.so.1"));
    let nvml = Nvml::open(&nvml_path)?;
    let cuda = Cuda::open(&cuda_path)?;
    let report = context_probe::measure_all(&cuda, &nvml)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
