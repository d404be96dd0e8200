//! Named slices without Kubernetes: the same host files and CDI edits a prepared claim gets
//! (`tessera_driver::claim_files`, `tessera_driver::cdi`), for one GPU and a size given on the
//! command line, under `<state-dir>/slices/<name>/` and `<cdi-dir>/tessera-slice-<name>.json`.
//! Every container started with `--device gpu.tessera.dev/slice=<name>` shares the slice's
//! memory wall, as the containers of one claim do.

use std::path::{Path, PathBuf};

use tessera_api::{GpuConfig, ShimConfig};
use tessera_driver::allocation::{AllocatedDevice, GpuLimit};
use tessera_driver::cdi::{self, DriverFiles, HostPaths, Spec, StandaloneError};
use tessera_driver::{Gpu, Inventory, claim_files, fsutil, quantity};

/// Why a slice could not be made, listed or removed; every message names the bad input.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "--name {0:?}: a slice name is 1 to 63 letters, digits, '-', '_' or '.', starting with a letter or digit"
    )]
    BadName(String),
    #[error("--gpu {0:?}: expected a GPU index (0, 1, …) or a UUID (GPU-…)")]
    BadGpu(String),
    #[error("--gpu {given}: no such GPU on this host; it has {have}")]
    UnknownGpu { given: String, have: String },
    #[error("--memory {given:?}: {why}")]
    BadMemory { given: String, why: String },
    #[error("--memory {given}: GPU {index} ({product}, {uuid}) has only {have} ({bytes} bytes)")]
    TooMuchMemory {
        given: String,
        index: u32,
        product: String,
        uuid: String,
        have: String,
        bytes: u64,
    },
    #[error("--cores {0}: must be 1 to 100 (percent of the GPU's compute)")]
    BadCores(u32),
    #[error(
        "--memory {memory} is less than one CUDA context on this GPU (--context-overhead {context}): no CUDA program could start in the slice"
    )]
    BelowContext { memory: String, context: String },
    #[error(
        "slice {name:?} already exists ({path}); remove it first: tessera cdi remove --name {name}"
    )]
    Exists { name: String, path: String },
    #[error("no slice {name:?} in {dir}")]
    NotFound { name: String, dir: String },
    #[error(
        "--cdi-dir {0} does not exist: container runtimes read CDI specs only from the directories they are configured with ({dirs} by default); create it first if your runtime reads it",
        dirs = STANDARD_CDI_DIRS.join(" and ")
    )]
    NoCdiDir(String),
    #[error(
        "the host's GPU driver (use --toolkit if the NVIDIA Container Toolkit's CDI spec provides the GPU): {0}"
    )]
    Driver(StandaloneError),
    #[error("shim config: {0}")]
    ShimConfig(tessera_api::shim_config::ShimConfigError),
    /// The cause is the source (printed by `{:#}` at the binary's boundary).
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.display().to_string();
    move |source| Error::Io { what, path, source }
}

/// The CDI spec directories container runtimes read by default: created when missing, where
/// any other `--cdi-dir` must exist (a mistyped one would take specs no runtime reads).
pub const STANDARD_CDI_DIRS: [&str; 2] = ["/etc/cdi", "/var/run/cdi"];

/// Where a slice's files go.
#[derive(Clone, Debug)]
pub struct Paths {
    /// The CDI spec directory the container runtime reads (`/etc/cdi`, `/var/run/cdi`).
    pub cdi_dir: PathBuf,
    /// Tessera's host state: `lib/` (the shim copy) and `slices/<name>/`.
    pub state_dir: PathBuf,
}

impl Paths {
    pub fn spec(&self, name: &str) -> PathBuf {
        self.cdi_dir.join(cdi::slice_spec_file_name(name))
    }

    pub fn slice_dir(&self, name: &str) -> PathBuf {
        self.state_dir.join("slices").join(name)
    }

    pub fn host(&self, name: &str) -> HostPaths {
        let dir = self.slice_dir(name);
        HostPaths {
            shim: self.state_dir.join("lib/libtessera.so"),
            preload: self.state_dir.join("lib/ld.so.preload"),
            config: dir.join("config.json"),
            region: dir.join("region"),
            boards: self.state_dir.join("boards"),
            owner: name.to_string(),
            priority: tessera_api::Priority::Normal,
            reservations: self.state_dir.join("reservations"),
        }
    }
}

/// How the GPU itself (device nodes, driver libraries) gets into the container.
#[derive(Clone, Debug)]
pub enum GpuFiles {
    /// Tessera's spec carries them, found under these roots.
    Standalone {
        driver_root: PathBuf,
        dev_root: PathBuf,
    },
    /// The NVIDIA Container Toolkit's spec does (`--device nvidia.com/gpu=<uuid>` too).
    Toolkit,
}

/// What `tessera cdi generate` was asked for.
#[derive(Clone, Debug)]
pub struct Request {
    pub name: String,
    /// An index or a UUID.
    pub gpu: String,
    /// A Kubernetes quantity (`4Gi`, `512Mi`, `4294967296`).
    pub memory: String,
    pub cores: u32,
    pub settings: GpuConfig,
}

/// What was made.
#[derive(Clone, Debug)]
pub struct Made {
    pub spec: PathBuf,
    /// `gpu.tessera.dev/slice=<name>`.
    pub device_id: String,
    /// `nvidia.com/gpu=<uuid>` with [`GpuFiles::Toolkit`].
    pub toolkit_device_id: Option<String>,
    pub gpu: Gpu,
    pub memory: u64,
    pub cores: u32,
    /// The other slices on the same GPU, by name, with their memory walls: with this one they
    /// may promise more than the card has.
    pub neighbours: Vec<(String, u64)>,
}

impl Made {
    /// The memory the GPU's slices promise together, when that is more than the card has.
    pub fn overcommitted(&self) -> Option<u64> {
        let promised = self.memory + self.neighbours.iter().map(|(_, m)| m).sum::<u64>();
        (promised > self.gpu.memory).then_some(promised)
    }
}

/// Checks a slice name: it becomes a CDI device name and a directory name.
pub fn check_name(name: &str) -> Result<()> {
    let ok = (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.to_string()))
    }
}

/// Finds `--gpu` (an index or a UUID) in `inventory`.
pub fn find_gpu<'a>(inventory: &'a Inventory, given: &str) -> Result<&'a Gpu> {
    let found = if given.starts_with("GPU-") {
        inventory.gpus.iter().find(|g| g.uuid == given)
    } else {
        let index: u32 = given
            .parse()
            .map_err(|_| Error::BadGpu(given.to_string()))?;
        inventory.by_index(index)
    };
    found.ok_or_else(|| Error::UnknownGpu {
        given: given.to_string(),
        have: match inventory.gpus.len() {
            0 => "no GPUs".to_string(),
            _ => inventory
                .gpus
                .iter()
                .map(|g| format!("{} {} ({})", g.index, g.uuid, g.product_name))
                .collect::<Vec<_>>()
                .join(", "),
        },
    })
}

/// `--memory` in bytes, checked against the GPU.
pub fn memory_for(gpu: &Gpu, given: &str) -> Result<u64> {
    let bytes = quantity::parse(given).map_err(|e| Error::BadMemory {
        given: given.to_string(),
        why: e.to_string(),
    })?;
    if bytes == 0 {
        return Err(Error::BadMemory {
            given: given.to_string(),
            why: "must be more than 0".into(),
        });
    }
    if bytes > gpu.memory {
        return Err(Error::TooMuchMemory {
            given: given.to_string(),
            index: gpu.index,
            product: gpu.product_name.clone(),
            uuid: gpu.uuid.clone(),
            have: tessera_driver::quantity::format(gpu.memory),
            bytes: gpu.memory,
        });
    }
    Ok(bytes)
}

/// Writes the slice's config, region and CDI spec (and installs the shim from `shim`). Nothing
/// is written until every input is checked; a spec that cannot be written takes the slice's
/// other files with it.
pub fn generate(
    inventory: &Inventory,
    request: &Request,
    paths: &Paths,
    shim: &Path,
    files: &GpuFiles,
) -> Result<Made> {
    check_name(&request.name)?;
    let gpu = find_gpu(inventory, &request.gpu)?;
    let memory = memory_for(gpu, &request.memory)?;
    if memory < gpu.context_overhead {
        return Err(Error::BelowContext {
            memory: request.memory.clone(),
            context: tessera_driver::quantity::format(gpu.context_overhead),
        });
    }
    if !(1..=100).contains(&request.cores) {
        return Err(Error::BadCores(request.cores));
    }
    let standard = STANDARD_CDI_DIRS
        .iter()
        .any(|d| Path::new(d) == paths.cdi_dir.as_path());
    if !standard && !paths.cdi_dir.is_dir() {
        return Err(Error::NoCdiDir(paths.cdi_dir.display().to_string()));
    }
    let spec_path = paths.spec(&request.name);
    if spec_path.exists() || paths.slice_dir(&request.name).exists() {
        return Err(Error::Exists {
            name: request.name.clone(),
            path: spec_path.display().to_string(),
        });
    }
    let driver = match files {
        GpuFiles::Standalone {
            driver_root,
            dev_root,
        } => {
            let driver = DriverFiles::discover(driver_root, dev_root).map_err(Error::Driver)?;
            driver.check_gpu_node(gpu.minor).map_err(Error::Driver)?;
            Some(driver)
        }
        GpuFiles::Toolkit => None,
    };
    let limit = GpuLimit {
        uuid: gpu.uuid.clone(),
        index: gpu.index,
        minor: gpu.minor,
        memory_limit: memory,
        cores: request.cores,
        context_overhead: gpu.context_overhead,
    };
    let device = AllocatedDevice {
        request: request.name.clone(),
        pool: "standalone".into(),
        device: format!("gpu-{}", gpu.index),
        share_id: None,
        gpu_uuid: gpu.uuid.clone(),
        gpu_index: gpu.index,
        gpu_minor: gpu.minor,
        memory,
        cores: request.cores,
        admin_access: false,
    };
    let config = claim_files::shim_config(
        &request.name,
        std::slice::from_ref(&limit),
        &request.settings,
        // A standalone slice never overcommits a GPU, so there is nothing to spill to.
        request.settings.oversubscribe.unwrap_or(false),
    )
    .map_err(Error::ShimConfig)?;
    let region = claim_files::region_bytes(std::slice::from_ref(&limit)).map_err(io(
        "building the region for",
        &paths.slice_dir(&request.name),
    ))?;
    let mut host = paths.host(&request.name);
    host.priority = request.settings.priority;
    let spec = cdi::slice_spec(
        &request.name,
        std::slice::from_ref(&device),
        &host,
        driver.as_ref(),
    );

    let neighbours = list(paths)?
        .into_iter()
        .filter_map(|listed| {
            let on_gpu: u64 = listed
                .config?
                .devices
                .iter()
                .filter(|d| d.uuid == gpu.uuid)
                .map(|d| d.memory_limit)
                .sum();
            (on_gpu > 0).then_some((listed.name, on_gpu))
        })
        .collect();
    claim_files::install_shim(shim, &paths.state_dir, "--shim-path")
        .map_err(io("installing the shim into", &paths.state_dir.join("lib")))?;
    let written = write_files(&host, &config, &region, &spec, &spec_path, paths);
    if written.is_err() {
        // Never leave half a slice: no spec without its files, no files without a spec.
        let _ = std::fs::remove_file(&spec_path);
        let _ = fsutil::remove_dir_all(&paths.slice_dir(&request.name));
        let _ = claim_files::remove_board_entries(&host);
    }
    written?;
    Ok(Made {
        spec: spec_path,
        device_id: format!("{}={}", cdi::slice_kind(), request.name),
        toolkit_device_id: matches!(files, GpuFiles::Toolkit)
            .then(|| format!("{}={}", cdi::NVIDIA_KIND, gpu.uuid)),
        gpu: gpu.clone(),
        memory,
        cores: request.cores,
        neighbours,
    })
}

fn write_files(
    host: &HostPaths,
    config: &ShimConfig,
    region: &[u8],
    spec: &Spec,
    spec_path: &Path,
    paths: &Paths,
) -> Result<()> {
    claim_files::write_config(host, &config.to_json()).map_err(io("writing", &host.config))?;
    claim_files::write_region(host, region).map_err(io("writing", &host.region))?;
    claim_files::create_board_entries(host, config.devices.iter().map(|d| d.uuid.as_str()))
        .map_err(io("creating the slice's board entries in", &host.boards))?;
    std::fs::create_dir_all(&paths.cdi_dir).map_err(io(
        "creating the CDI spec directory (choose another with --cdi-dir, or run as root)",
        &paths.cdi_dir,
    ))?;
    fsutil::write_atomic(spec_path, &spec.to_json(), 0o644).map_err(io(
        "writing the CDI spec (choose another directory with --cdi-dir, or run as root)",
        spec_path,
    ))
}

/// One slice found by [`list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub spec: PathBuf,
    /// From the slice's config; `None` if it is missing or unreadable.
    pub config: Option<ShimConfig>,
}

/// The slices whose specs are in `paths.cdi_dir`, by name.
pub fn list(paths: &Paths) -> Result<Vec<Listed>> {
    let entries = match std::fs::read_dir(&paths.cdi_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("reading", &paths.cdi_dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(name) = file
            .to_str()
            .and_then(|f| f.strip_prefix("tessera-slice-"))
            .and_then(|f| f.strip_suffix(".json"))
        else {
            continue;
        };
        let config = std::fs::read(paths.host(name).config)
            .ok()
            .and_then(|bytes| ShimConfig::from_json(&bytes).ok());
        out.push(Listed {
            name: name.to_string(),
            spec: entry.path(),
            config,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Removes a slice's spec and files. Containers still running keep their mounts.
pub fn remove(name: &str, paths: &Paths) -> Result<()> {
    check_name(name)?;
    let spec = paths.spec(name);
    let dir = paths.slice_dir(name);
    if !spec.exists() && !dir.exists() {
        return Err(Error::NotFound {
            name: name.to_string(),
            dir: paths.cdi_dir.display().to_string(),
        });
    }
    fsutil::remove_file(&spec).map_err(io("removing", &spec))?;
    let host = paths.host(name);
    claim_files::remove_board_entries(&host)
        .map_err(io("removing the board entries in", &host.boards))?;
    fsutil::remove_dir_all(&dir).map_err(io("removing", &dir))
}
