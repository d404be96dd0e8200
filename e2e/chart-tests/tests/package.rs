//! The chart as it is shipped: `scripts/package-chart.sh` (`make chart`) lints and packages it,
//! the package renders exactly as the source directory does, and it travels as an OCI artifact:
//! pushed with `helm push` to a real OCI registry (CNCF distribution, built by
//! `e2e/scripts/build-oci-registry.sh`) on loopback, then rendered from `oci://` by version.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tessera_chart_tests::{Capabilities, parse_documents};

fn registry_binary() -> PathBuf {
    tessera_e2e_harness::binaries::cache_root().join("oci-registry/bin/registry")
}

/// The chart's version, from Chart.yaml.
fn chart_version() -> String {
    let chart = std::fs::read_to_string(tessera_chart_tests::chart_dir().join("Chart.yaml"))
        .expect("Chart.yaml");
    chart
        .lines()
        .find_map(|l| l.strip_prefix("version:"))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .expect("a version in Chart.yaml")
}

/// A registry serving from `dir` on a free loopback port; killed on drop.
struct Registry {
    child: Child,
    address: String,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    fn start(binary: &Path, dir: &Path) -> Registry {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let address = format!("127.0.0.1:{port}");
        let config = dir.join("registry.yaml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {}}}}}\nhttp: {{addr: \"{address}\"}}\n",
                dir.join("storage").display()
            ),
        )
        .expect("registry config");
        let log = std::fs::File::create(dir.join("registry.log")).expect("registry log");
        let child = Command::new(binary)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting the registry");
        let registry = Registry { child, address };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&registry.address).is_err() {
            assert!(
                Instant::now() < deadline,
                "the registry did not listen on {} in 30 s: {}",
                registry.address,
                std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        registry
    }
}

/// helm with its state in `home`, never the user's.
fn helm(helm: &Path, home: &Path) -> Command {
    let mut command = Command::new(helm);
    command
        .env("HELM_CACHE_HOME", home)
        .env("HELM_CONFIG_HOME", home)
        .env("HELM_DATA_HOME", home)
        .env("HELM_REGISTRY_CONFIG", home.join("registry.json"))
        .env_remove("KUBECONFIG");
    command
}

fn run(command: &mut Command, what: &str) -> String {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{what} failed:\n{text}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn the_packaged_chart_renders_as_the_source_and_travels_as_an_oci_artifact() {
    let test = "the_packaged_chart_renders_as_the_source_and_travels_as_an_oci_artifact";
    let Some(helm_bin) = helm_or_skip(test) else {
        return;
    };
    let registry_bin = registry_binary();
    if tessera_built_libs::require(test, registry_bin.is_file(), || {
        format!(
            "the OCI registry is not built at {} (run e2e/scripts/build-oci-registry.sh)",
            registry_bin.display()
        )
    })
    .is_none()
    {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("tessera-package-")
        .tempdir()
        .expect("tempdir");
    let out = dir.path().join("charts");
    let printed = run(
        Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/package-chart.sh"))
            .arg(&out),
        "scripts/package-chart.sh",
    );
    let version = chart_version();
    let package = out.join(format!("tessera-{version}.tgz"));
    assert_eq!(printed.trim(), package.display().to_string());
    assert!(package.is_file(), "{}", package.display());

    let caps = Capabilities::offline("v1.37.1", &[]);
    let release = tessera_chart_tests::Release::new(RELEASE, NAMESPACE);
    let from_source = helm_bin
        .render(&release, &caps)
        .expect("rendering the source");
    let from_package = helm_bin
        .render_chart(&package, &release, &caps)
        .expect("rendering the package");
    assert_eq!(
        from_package, from_source,
        "the package renders as the source"
    );
    assert!(
        kinds(&from_package).contains(&"ConfigMap".to_string()),
        "the dashboard (files/) is in the package"
    );

    let registry = Registry::start(&registry_bin, dir.path());
    let home = dir.path().join("helm-home");
    std::fs::create_dir_all(&home).expect("helm home");
    let repository = format!("oci://{}/charts", registry.address);
    run(
        helm(helm_bin.path(), &home)
            .arg("push")
            .arg(&package)
            .arg(&repository)
            .arg("--plain-http"),
        "helm push",
    );
    let rendered = run(
        helm(helm_bin.path(), &home)
            .args(["template", RELEASE])
            .arg(format!("{repository}/tessera"))
            .args([
                "--version",
                &version,
                "--namespace",
                NAMESPACE,
                "--plain-http",
            ])
            .args(["--kube-version", "v1.37.1"]),
        "helm template from the registry",
    );
    let from_registry = parse_documents(&rendered).expect("rendered YAML");
    assert_eq!(
        from_registry, from_source,
        "the chart pulled from {repository} renders as the source"
    );
}
