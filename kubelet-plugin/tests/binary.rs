//! The `tessera-kubelet-plugin` binary as a DaemonSet runs it: flags, a kubeconfig pointing at
//! an API server (the mocked one, over loopback HTTP), the fake inventory file, JSON logs, both
//! sockets, `/metrics`, and a clean stop on SIGTERM.

mod support;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::kubelet::get_info;
use support::*;

const UID: &str = "0b7c4a2e-8c1d-4f53-9f0e-3b1f6f1c2a77";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn http_get(port: u16, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect metrics");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
}

/// A kubeconfig for the mocked API server at `address` (plain HTTP, no credentials).
fn write_kubeconfig(env: &Env, address: std::net::SocketAddr) -> std::path::PathBuf {
    let kubeconfig = env.path("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: mock\n  cluster:\n    server: http://{address}\nusers:\n- name: plugin\n  user: {{}}\n\
             contexts:\n- name: mock\n  context:\n    cluster: mock\n    user: plugin\ncurrent-context: mock\n"
        ),
    )
    .expect("kubeconfig");
    kubeconfig
}

async fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_registers_prepares_serves_metrics_and_stops_cleanly() {
    let env = Env::new(&["v1beta1"]);
    let address = env.api.serve_tcp().await;
    let kubeconfig = write_kubeconfig(&env, address);
    let inventory = env.path("inventory.json");
    std::fs::write(&inventory, inventory_json()).expect("inventory");
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_tessera-kubelet-plugin"))
        .arg("--node-name")
        .arg(NODE)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--registrar-dir")
        .arg(env.path("registry"))
        .arg("--plugin-dir")
        .arg(env.path("plugins/gpu.tessera.dev"))
        .arg("--cdi-dir")
        .arg(env.path("cdi"))
        .arg("--state-dir")
        .arg(env.path("state"))
        .arg("--inventory")
        .arg(&inventory)
        // Any ELF file stands in for the shim here.
        .arg("--shim-path")
        .arg("/bin/true")
        .arg("--metrics-address")
        .arg(format!("127.0.0.1:{port}"))
        .args(["--log-format", "json", "--instance-id", "pod-1"])
        .env_remove("KUBECONFIG")
        .env_remove("POD_UID")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the plugin");

    let registration = env.path("registry/gpu.tessera.dev-pod-1-reg.sock");
    wait_for(&registration).await;
    let info = get_info(&registration).await;
    assert_eq!(
        info.endpoint,
        env.path("plugins/gpu.tessera.dev/dra-pod-1.sock")
            .display()
            .to_string()
    );
    assert_eq!(
        std::fs::read_to_string(env.path("state/lib/ld.so.preload")).expect("preload"),
        "/usr/lib/tessera/libtessera.so\n"
    );
    assert_eq!(
        std::fs::read(env.path("state/lib/libtessera.so")).expect("shim copy"),
        std::fs::read("/bin/true").expect("/bin/true")
    );

    env.api.put(claim(
        "default",
        "c",
        UID,
        Some(vec![result("gpu", "gpu-1-slice-0of2")]),
        vec![],
    ));
    let kubelet = Kubelet::connect(Path::new(&info.endpoint)).await;
    let devices = kubelet
        .prepare_ok(Version::V1beta1, &Claim::new("default", "c", UID))
        .await;
    assert_eq!(
        devices[0].cdi_device_ids,
        vec![
            format!("gpu.tessera.dev/claim={UID}-gpu-1-slice-0of2"),
            format!("nvidia.com/gpu={GPU1}"),
            format!("gpu.tessera.dev/claim={UID}-metadata-gpu"),
        ]
    );
    validate_spec(&env.spec_path(UID));

    let metrics = http_get(port, "/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.contains(&format!("tessera_claim_memory_limit_bytes{{namespace=\"default\",claim=\"c\",claim_uid=\"{UID}\",gpu_uuid=\"{GPU1}\"}} {}", 24 * GIB)), "{metrics}");
    assert!(http_get(port, "/healthz").ends_with("ok\n"));

    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let output = child.wait_with_output().expect("plugin exits");
    let logs = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "exit {:?}:\n{logs}", output.status);
    assert!(
        !registration.exists() && !env.path("plugins/gpu.tessera.dev/dra-pod-1.sock").exists(),
        "sockets removed"
    );
    for line in logs.lines() {
        let parsed: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(parsed.get("level").is_some(), "{line}");
    }
    assert!(
        logs.contains("prepared claim") && logs.contains("resource.k8s.io/v1beta1"),
        "{logs}"
    );
    // The claim stays prepared across the restart of the plugin.
    assert!(env.checkpoint().claims.contains_key(UID));
}

#[test]
fn a_bad_inventory_stops_the_binary_with_the_field_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let inventory = dir.path().join("inventory.json");
    std::fs::write(
        &inventory,
        r#"{"devices":[{"uuid":"GPU-1","name":"x","memory":-1}]}"#,
    )
    .expect("inventory");
    let output = Command::new(env!("CARGO_BIN_EXE_tessera-kubelet-plugin"))
        .args([
            "--node-name",
            "n",
            "--kubeconfig",
            "/nonexistent",
            "--inventory",
        ])
        .arg(&inventory)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("devices[0].memory") && stderr.contains("inventory.json"),
        "{stderr}"
    );
}

/// A mistyped `--sharing-mode` is refused when the flags are parsed, before the plugin loads
/// anything (no inventory, shim or kubeconfig is looked at), naming every mode, `off` included.
#[test]
fn a_bad_sharing_mode_is_refused_first_naming_every_mode() {
    let output = Command::new(env!("CARGO_BIN_EXE_tessera-kubelet-plugin"))
        .args([
            "--node-name",
            "n",
            "--sharing-mode",
            "shared",
            "--inventory",
            "/nonexistent/inventory.json",
            "--kubeconfig",
            "/nonexistent",
        ])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--sharing-mode")
            && stderr.contains("\"shared\"")
            && stderr.contains("fixed:<1-100> or exclusive, or off"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("inventory"),
        "nothing loaded first: {stderr}"
    );
}

/// `--memory-overcommit` naming a model the node does not have is a warning naming it and the
/// node's models (one setting serves every node of the DaemonSet, so it is not an error).
#[test]
fn an_overcommit_for_a_model_the_node_lacks_is_a_warning_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let inventory = dir.path().join("inventory.json");
    std::fs::write(&inventory, inventory_json()).expect("inventory");
    let output = Command::new(env!("CARGO_BIN_EXE_tessera-kubelet-plugin"))
        .args([
            "--node-name",
            "n",
            "--kubeconfig",
            "/nonexistent",
            "--log-format",
            "text",
            "--memory-overcommit",
            "Tesla T5=2",
            "--inventory",
        ])
        .arg(&inventory)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--memory-overcommit names GPU models this node does not have")
            && stderr.contains("Tesla T5")
            && stderr.contains("NVIDIA L40S"),
        "{stderr}"
    );
}

/// Without `--inventory` the plugin asks NVML; here the fake NVML over the same node file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_inventory_file_the_gpus_come_from_nvml() {
    let Some(nvml) = tessera_built_libs::fake_nvml("plugin on NVML") else {
        return;
    };
    let Some(cuda) = tessera_built_libs::fake_cuda("plugin on NVML") else {
        return;
    };
    let env = Env::new(&["v1"]);
    let node = env.path("fakegpu.json");
    std::fs::write(&node, inventory_json()).expect("node file");
    let child = Command::new(env!("CARGO_BIN_EXE_tessera-kubelet-plugin"))
        .arg("--node-name")
        .arg(NODE)
        .arg("--kubeconfig")
        .arg("/nonexistent/kubeconfig")
        .arg("--nvml-library")
        .arg(&nvml)
        .arg("--cuda-library")
        .arg(&cuda)
        .arg("--state-dir")
        .arg(env.path("state"))
        .arg("--shim-path")
        .arg("/bin/true")
        .env("FAKEGPU_CONFIG", &node)
        .env("FAKEGPU_STATE", env.path("fakegpu.state"))
        .output()
        .expect("run the plugin");
    // It stops at the missing kubeconfig, after logging the GPUs NVML reported.
    let logs = String::from_utf8_lossy(&child.stderr);
    assert!(!child.status.success());
    for expected in [
        GPU0,
        GPU1,
        "NVIDIA GeForce RTX 4090",
        "memory=25769803776",
        "kubeconfig",
    ] {
        assert!(logs.contains(expected), "{expected:?} not in:\n{logs}");
    }
    // Each cause once: the kubeconfig error's own message already quotes its source.
    assert_eq!(
        logs.matches("No such file or directory").count(),
        1,
        "a cause printed twice:\n{logs}"
    );
}

/// The fake driver as a node has it under its driver root, and the programs the plugin runs.
struct FakeDriver {
    nvml: std::path::PathBuf,
    cuda: std::path::PathBuf,
    probe: std::path::PathBuf,
}

impl FakeDriver {
    fn find(test: &str) -> Option<FakeDriver> {
        Some(FakeDriver {
            nvml: tessera_built_libs::fake_nvml(test)?,
            cuda: tessera_built_libs::fake_cuda(test)?,
            probe: tessera_built_libs::gpu_probe(test)?,
        })
    }
}

/// Starts the plugin binary against the mocked API server, on the fake node `node` with its
/// driver (the probe measures it), plus `extra` flags; answers the child, the metrics port and
/// the DRA socket once it has registered.
async fn start_on_fake_driver(
    env: &Env,
    driver: &FakeDriver,
    node: &serde_json::Value,
    extra: &[std::ffi::OsString],
) -> (std::process::Child, u16, String) {
    let address = env.api.serve_tcp().await;
    let kubeconfig = write_kubeconfig(env, address);
    let node_file = env.path("fakegpu.json");
    std::fs::write(&node_file, node.to_string()).expect("node file");
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_tessera-kubelet-plugin"))
        .args(["--node-name", NODE])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--registrar-dir")
        .arg(env.path("registry"))
        .arg("--plugin-dir")
        .arg(env.path("plugins/gpu.tessera.dev"))
        .arg("--cdi-dir")
        .arg(env.path("cdi"))
        .arg("--state-dir")
        .arg(env.path("state"))
        .arg("--inventory")
        .arg(&node_file)
        .arg("--nvml-library")
        .arg(&driver.nvml)
        .arg("--cuda-library")
        .arg(&driver.cuda)
        .arg("--gpu-probe")
        .arg(&driver.probe)
        .arg("--shim-path")
        .arg("/bin/true")
        .arg("--metrics-address")
        .arg(format!("127.0.0.1:{port}"))
        .args(["--health-interval", "0"])
        .args(extra)
        .env("FAKEGPU_CONFIG", &node_file)
        .env("FAKEGPU_STATE", env.path("fakegpu.state"))
        // The probe measures every GPU, whatever the plugin's own environment narrows.
        .env("CUDA_VISIBLE_DEVICES", "0")
        .env_remove("KUBECONFIG")
        .env_remove("POD_UID")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the plugin");
    let registration = env.path("registry/gpu.tessera.dev-reg.sock");
    wait_for(&registration).await;
    let info = get_info(&registration).await;
    (child, port, info.endpoint)
}

/// Claim `c` (half of GPU 1) prepared through the plugin's v1 service at `endpoint`.
async fn prepare_half_of_gpu1(env: &Env, endpoint: &str) {
    env.api.put(claim(
        "default",
        "c",
        UID,
        Some(vec![result("gpu", "gpu-1-slice-0of2")]),
        vec![],
    ));
    Kubelet::connect(Path::new(endpoint))
        .await
        .prepare_ok(Version::V1, &Claim::new("default", "c", UID))
        .await;
}

/// Stops the plugin; its logs.
fn stop(child: std::process::Child) -> String {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let output = child.wait_with_output().expect("plugin exits");
    let logs = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "exit {:?}:\n{logs}", output.status);
    logs
}

/// `--context-overhead=auto`: the plugin runs tessera-gpu-probe against the node's driver (here
/// the fake one, whose contexts cost what its node file says), publishes each GPU's figure and
/// writes it into every claim's shim config and region, so the shim charges it per context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_measures_what_a_context_costs_and_charges_it_to_claims() {
    let Some(driver) = FakeDriver::find("context overhead") else {
        return;
    };
    const CONTEXT: u64 = 300 << 20;
    let env = Env::new(&["v1"]);
    let mut node: serde_json::Value = serde_json::from_str(&inventory_json()).expect("node");
    node["devices"][0]["contextMemory"] = 0.into();
    node["devices"][1]["contextMemory"] = CONTEXT.into();
    let (child, port, endpoint) = start_on_fake_driver(&env, &driver, &node, &[]).await;

    let metrics = http_get(port, "/metrics");
    for (uuid, product, bytes) in [
        (GPU0, "NVIDIA GeForce RTX 4090", 0),
        (GPU1, "NVIDIA L40S", CONTEXT),
    ] {
        let series = format!(
            "tessera_gpu_context_overhead_bytes{{gpu_uuid=\"{uuid}\",product=\"{product}\",source=\"measured\"}} {bytes}"
        );
        assert!(metrics.contains(&series), "{series} not in:\n{metrics}");
    }

    prepare_half_of_gpu1(&env, &endpoint).await;
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(env.path(&format!("state/claims/{UID}/config.json"))).expect("config"),
    )
    .expect("config JSON");
    assert_eq!(config["devices"][0]["uuid"], GPU1);
    assert_eq!(config["devices"][0]["contextOverhead"], CONTEXT);
    let region = std::fs::read(env.path(&format!("state/claims/{UID}/region"))).expect("region");
    let snapshot = tessera_api::region::RegionSnapshot::parse(&region).expect("region");
    assert_eq!(snapshot.devices[0].context_overhead, CONTEXT);

    let logs = stop(child);
    assert!(logs.contains("CUDA context cost measured"), "{logs}");
}

/// `--driver-memory-wall=auto` where the driver keeps per-cgroup limits (here GPU 1 of the fake
/// node): the plugin installs tessera-cdi-hook and each claim's spec runs it; run as the runtime
/// runs it, it holds a program that never loads the shim to the claim's memory on the card.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_wall_stops_a_program_that_bypasses_the_shim_at_the_claims_limit() {
    let test = "driver memory wall";
    let Some(driver) = FakeDriver::find(test) else {
        return;
    };
    let Some(built_hook) = tessera_built_libs::cdi_hook(test) else {
        return;
    };
    const CONTEXT: u64 = 300 << 20;
    let env = Env::new(&["v1"]);
    // The host's driver root, where the hook finds NVML.
    let lib_dir = env.path("driver/usr/lib/x86_64-linux-gnu");
    std::fs::create_dir_all(&lib_dir).expect("driver root");
    for (link, target) in [
        ("libnvidia-ml.so.1", &driver.nvml),
        ("libcuda.so.1", &driver.cuda),
    ] {
        std::os::unix::fs::symlink(target, lib_dir.join(link)).expect("symlink");
    }
    let mut node: serde_json::Value = serde_json::from_str(&inventory_json()).expect("node");
    node["devices"][1]["memory"] = (4 * GIB).into();
    node["devices"][1]["memoryLimits"] = true.into();
    node["devices"][1]["contextMemory"] = CONTEXT.into();
    let extra: Vec<std::ffi::OsString> = vec![
        "--cdi-hook-path".into(),
        built_hook.into(),
        "--host-driver-root".into(),
        env.path("driver").into(),
    ];
    let (child, port, endpoint) = start_on_fake_driver(&env, &driver, &node, &extra).await;
    let metrics = http_get(port, "/metrics");
    for (uuid, product, walled) in [
        (GPU0, "NVIDIA GeForce RTX 4090", 0),
        (GPU1, "NVIDIA L40S", 1),
    ] {
        let series = format!(
            "tessera_gpu_driver_memory_wall{{gpu_uuid=\"{uuid}\",product=\"{product}\"}} {walled}"
        );
        assert!(metrics.contains(&series), "{series} not in:\n{metrics}");
    }

    // A 2 GiB slice of the 4 GiB card.
    prepare_half_of_gpu1(&env, &endpoint).await;
    let logs = stop(child);
    assert!(logs.contains("shim and driver"), "{logs}");
    validate_spec(&env.spec_path(UID));
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.spec_path(UID)).expect("spec")).expect("JSON");
    let hook = &spec["containerEdits"]["hooks"][0];
    assert_eq!(hook["hookName"], "createRuntime");
    let installed = env.path("state/bin/tessera-cdi-hook");
    assert_eq!(hook["path"], installed.display().to_string());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&installed)
        .expect("installed hook")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o755,
        "only root may change what runs as root"
    );
    let args: Vec<String> = serde_json::from_value(hook["args"].clone()).expect("args");
    let wall = 2 * GIB;
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--limit" && w[1] == format!("{GPU1}={wall}")),
        "{args:?}"
    );

    // A container of the claim, as the runtime makes it: its process in a cgroup of its own,
    // then the hook with its state, then its program, which never loads the shim.
    let cgroup = tessera_built_libs::cgroup::TestCgroup::create_any("driver-wall")
        .unwrap_or_else(|e| panic!("{e}"));
    let app = env.path("cuda_app");
    tessera_built_libs::compile_cuda_app(&app);
    let mut container = {
        let mut command = Command::new(&app);
        command
            .arg("dlsym")
            .env_clear()
            .env("LD_LIBRARY_PATH", &lib_dir)
            .env("FAKEGPU_CONFIG", env.path("fakegpu.json"))
            .env("FAKEGPU_STATE", env.path("fakegpu.state"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        tessera_built_libs::cgroup::join_cgroup(&mut command, &cgroup.procs());
        command.spawn().expect("start the container's program")
    };
    let mut hook_run = {
        use std::os::unix::process::CommandExt;
        Command::new(hook["path"].as_str().expect("path"))
            .arg0(&args[0])
            .args(&args[1..])
            // The host's driver is the fake one, which reads its node from these.
            .env("FAKEGPU_CONFIG", env.path("fakegpu.json"))
            .env("FAKEGPU_STATE", env.path("fakegpu.state"))
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the hook")
    };
    hook_run
        .stdin
        .take()
        .expect("stdin")
        .write_all(
            format!(
                r#"{{"ociVersion":"1.2.0","id":"c1","status":"creating","pid":{},"bundle":"/"}}"#,
                container.id()
            )
            .as_bytes(),
        )
        .expect("state");
    let hooked = hook_run.wait_with_output().expect("hook");
    assert!(
        hooked.status.success(),
        "the hook failed: {}",
        String::from_utf8_lossy(&hooked.stderr)
    );

    let mut app = tessera_built_libs::LineSession::attach(&mut container);
    assert_eq!(app.ask(""), ["ready"]);
    assert_eq!(app.ask("init 1"), ["init", "0"]);
    const CHUNK: u64 = 128 << 20;
    let mut got = 0;
    loop {
        let answer = app.ask(&format!("alloc {CHUNK}"));
        match answer[1].as_str() {
            "0" => got += CHUNK,
            "2" => break,
            other => panic!("alloc answered {other}: {answer:?}"),
        }
        assert!(got <= 4 * GIB, "no wall at all");
    }
    app.quit();
    let _ = container.wait();
    assert!(
        got + CONTEXT <= wall && got + CONTEXT + CHUNK > wall,
        "without the shim the program took {got} bytes besides its context, against a {wall}-byte claim"
    );
    drop(cgroup);
}

/// A driver with the wall but no hook to install (a broken image): the node still serves, with
/// the shim's wall alone, and says so — no claim's spec runs a hook that is not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_hook_the_driver_wall_is_off_and_the_node_serves() {
    let Some(driver) = FakeDriver::find("driver wall without its hook") else {
        return;
    };
    let env = Env::new(&["v1"]);
    let mut node: serde_json::Value = serde_json::from_str(&inventory_json()).expect("node");
    node["devices"][1]["memoryLimits"] = true.into();
    let extra: Vec<std::ffi::OsString> = vec![
        "--cdi-hook-path".into(),
        "/nonexistent/tessera-cdi-hook".into(),
    ];
    let (child, port, endpoint) = start_on_fake_driver(&env, &driver, &node, &extra).await;
    let metrics = http_get(port, "/metrics");
    let series =
        format!("tessera_gpu_driver_memory_wall{{gpu_uuid=\"{GPU1}\",product=\"NVIDIA L40S\"}} 0");
    assert!(metrics.contains(&series), "{series} not in:\n{metrics}");
    prepare_half_of_gpu1(&env, &endpoint).await;
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.spec_path(UID)).expect("spec")).expect("JSON");
    assert!(spec["containerEdits"]["hooks"].is_null(), "{spec}");
    let logs = stop(child);
    assert!(
        logs.contains("cannot install the driver-wall hook") && logs.contains("/nonexistent"),
        "{logs}"
    );
}
