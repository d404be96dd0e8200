//! Renders `charts/tessera` with the pinned helm (`e2e/scripts/build-helm.sh`) and applies the
//! objects to an API server: server-side dry run for the chart's tests, for real to install
//! Tessera's RBAC, admission policy and DeviceClasses into the e2e control plane.
//!
//! ```no_run
//! # async fn f(client: kube::Client) -> tessera_chart_tests::Result<()> {
//! use tessera_chart_tests::{Capabilities, Helm, Release, apply, Apply};
//! let helm = Helm::locate()?;
//! let caps = Capabilities::discover(&client).await?;
//! let objects = helm.render(&Release::new("tessera", "tessera-system").values("controller:\n  enabled: false\n"), &caps)?;
//! let rbac: Vec<_> = objects.into_iter().filter(|o| o["kind"] != "DaemonSet").collect();
//! apply(&client, &rbac, Apply::Create).await?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams, ValidationDirective};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use serde_json::{Value, json};

/// Why rendering or applying failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "helm not found at {0} (build it: e2e/scripts/build-helm.sh, or set TESSERA_HELM to a helm v3 binary)"
    )]
    HelmMissing(PathBuf),
    #[error("running {helm}: {source}")]
    HelmSpawn {
        helm: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("helm template failed ({status}): {stderr}")]
    HelmFailed { status: String, stderr: String },
    #[error("writing the values file: {0}")]
    Values(#[source] std::io::Error),
    #[error("helm's output is not YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("rendered object #{index} has no {field}: {object}")]
    Malformed {
        index: usize,
        field: &'static str,
        object: String,
    },
    #[error("{kind} {name}: {source}")]
    Api {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("discovering the API server's capabilities: {0}")]
    Discovery(#[source] kube::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The chart in this checkout.
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../charts/tessera")
}

/// The minimal prometheus-operator CRDs (PodMonitor, ServiceMonitor) the chart's monitors need,
/// for a control plane that has no prometheus-operator.
pub fn monitoring_crds() -> Result<Vec<Value>> {
    parse_documents(include_str!("../fixtures/monitoring-crds.yaml"))
}

/// A helm binary.
#[derive(Clone, Debug)]
pub struct Helm {
    path: PathBuf,
}

/// What a cluster serves, as helm's `.Capabilities` sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// `v1.31.4`; `None`: helm's default (the Kubernetes version helm was built against).
    pub kube_version: Option<String>,
    /// `group/version` and `group/version/Kind` entries, as helm's own discovery lists them.
    pub api_versions: BTreeSet<String>,
}

/// One release to render.
#[derive(Clone, Debug)]
pub struct Release {
    pub name: String,
    pub namespace: String,
    /// A values file's contents (YAML); empty for the chart's defaults.
    pub values_yaml: String,
}

impl Release {
    pub fn new(name: &str, namespace: &str) -> Release {
        Release {
            name: name.into(),
            namespace: namespace.into(),
            values_yaml: String::new(),
        }
    }

    pub fn values(mut self, yaml: &str) -> Release {
        self.values_yaml = yaml.into();
        self
    }
}

impl Helm {
    /// `$TESSERA_HELM`, else `${TESSERA_CACHE:-~/.cache/tessera}/helm/bin/helm` (where
    /// `e2e/scripts/build-helm.sh` puts it).
    pub fn locate() -> Result<Helm> {
        let path = match std::env::var_os("TESSERA_HELM") {
            Some(p) => PathBuf::from(p),
            None => {
                let cache = std::env::var_os("TESSERA_CACHE")
                    .map(PathBuf::from)
                    .or_else(|| {
                        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/tessera"))
                    })
                    .unwrap_or_else(|| PathBuf::from(".cache/tessera"));
                cache.join("helm/bin/helm")
            }
        };
        if path.is_file() {
            Ok(Helm { path })
        } else {
            Err(Error::HelmMissing(path))
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `helm template` of the chart: every object, in helm's install order.
    pub fn render(&self, release: &Release, caps: &Capabilities) -> Result<Vec<Value>> {
        self.render_chart(&chart_dir(), release, caps)
    }

    /// `helm template` of any chart directory.
    pub fn render_chart(
        &self,
        chart: &Path,
        release: &Release,
        caps: &Capabilities,
    ) -> Result<Vec<Value>> {
        let mut values = tempfile::Builder::new()
            .prefix("tessera-values-")
            .suffix(".yaml")
            .tempfile()
            .map_err(Error::Values)?;
        values
            .write_all(release.values_yaml.as_bytes())
            .and_then(|()| values.flush())
            .map_err(Error::Values)?;
        let mut cmd = Command::new(&self.path);
        cmd.arg("template")
            .arg(&release.name)
            .arg(chart)
            .arg("--namespace")
            .arg(&release.namespace)
            .arg("--values")
            .arg(values.path());
        if let Some(v) = &caps.kube_version {
            cmd.arg("--kube-version").arg(v);
        }
        for api in &caps.api_versions {
            cmd.arg("--api-versions").arg(api);
        }
        // helm keeps its state in these; none of it is wanted here.
        let scratch = std::env::temp_dir();
        cmd.env("HELM_CACHE_HOME", &scratch)
            .env("HELM_CONFIG_HOME", &scratch)
            .env("HELM_DATA_HOME", &scratch)
            .env_remove("KUBECONFIG");
        let out = cmd.output().map_err(|source| Error::HelmSpawn {
            helm: self.path.clone(),
            source,
        })?;
        if !out.status.success() {
            return Err(Error::HelmFailed {
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        parse_documents(&String::from_utf8_lossy(&out.stdout))
    }
}

/// Multi-document YAML → JSON objects; empty documents are skipped.
pub fn parse_documents(text: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value: Value = serde::Deserialize::deserialize(doc)?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

impl Capabilities {
    /// What `helm install` would see on this cluster: its version and every served
    /// `group/version` and `group/version/Kind`.
    pub async fn discover(client: &Client) -> Result<Capabilities> {
        let version = client.apiserver_version().await.map_err(Error::Discovery)?;
        let mut api_versions = BTreeSet::new();
        let core = client
            .list_core_api_versions()
            .await
            .map_err(Error::Discovery)?;
        for v in core.versions {
            let resources = client
                .list_core_api_resources(&v)
                .await
                .map_err(Error::Discovery)?;
            api_versions.insert(v.clone());
            for r in resources.resources {
                api_versions.insert(format!("{v}/{}", r.kind));
            }
        }
        let groups = client.list_api_groups().await.map_err(Error::Discovery)?;
        for g in groups.groups {
            for gv in g.versions {
                let resources = client
                    .list_api_group_resources(&gv.group_version)
                    .await
                    .map_err(Error::Discovery)?;
                api_versions.insert(gv.group_version.clone());
                for r in resources.resources {
                    api_versions.insert(format!("{}/{}", gv.group_version, r.kind));
                }
            }
        }
        Ok(Capabilities {
            kube_version: Some(version.git_version),
            api_versions,
        })
    }

    /// Offline, for a given Kubernetes version and extra API versions.
    pub fn offline(kube_version: &str, api_versions: &[&str]) -> Capabilities {
        Capabilities {
            kube_version: Some(kube_version.into()),
            api_versions: api_versions.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// How [`apply`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Apply {
    /// Server-side apply with `dryRun=All` and strict field validation: the API server validates,
    /// defaults and admits each object and stores nothing.
    DryRun,
    /// Server-side apply for real (field manager `tessera-chart`).
    Create,
}

/// Server-side applies `objects` in order; the first refusal is the error. Returns what the API
/// server answered for each object.
pub async fn apply(client: &Client, objects: &[Value], mode: Apply) -> Result<Vec<Value>> {
    let mut answers = Vec::with_capacity(objects.len());
    for (index, object) in objects.iter().enumerate() {
        let field = |field: &'static str| Error::Malformed {
            index,
            field,
            object: object.to_string(),
        };
        let api_version = object["apiVersion"]
            .as_str()
            .ok_or_else(|| field("apiVersion"))?;
        let kind = object["kind"].as_str().ok_or_else(|| field("kind"))?;
        let name = object["metadata"]["name"]
            .as_str()
            .ok_or_else(|| field("metadata.name"))?;
        let api_error = |source| Error::Api {
            kind: kind.to_string(),
            name: name.to_string(),
            source,
        };
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let (resource, caps) = kube::discovery::pinned_kind(client, &gvk)
            .await
            .map_err(api_error)?;
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Namespaced => {
                let namespace = object["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default");
                Api::namespaced_with(client.clone(), namespace, &resource)
            }
            Scope::Cluster => Api::all_with(client.clone(), &resource),
        };
        let mut params = PatchParams::apply("tessera-chart").force();
        params.dry_run = mode == Apply::DryRun;
        params.field_validation = Some(ValidationDirective::Strict);
        let answer = api
            .patch(name, &params, &Patch::Apply(object))
            .await
            .map_err(api_error)?;
        answers.push(serde_json::to_value(answer).unwrap_or(Value::Null));
    }
    Ok(answers)
}

/// Creates `namespace` unless it exists.
pub async fn ensure_namespace(client: &Client, namespace: &str) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": namespace }
    }))
    .map_err(|e| Error::Api {
        kind: "Namespace".into(),
        name: namespace.into(),
        source: kube::Error::SerdeError(e),
    })?;
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(source) => Err(Error::Api {
            kind: "Namespace".into(),
            name: namespace.into(),
            source,
        }),
    }
}

/// Kinds [`install`] applies for a control plane whose kubelet plugin and controller run as
/// local processes rather than pods: identities, RBAC, the admission policy and DeviceClasses.
pub const CLUSTER_OBJECT_KINDS: &[&str] = &[
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "DeviceClass",
];

/// Renders the chart with this cluster's capabilities and applies the objects whose kind is in
/// `kinds` (all of them with `None`) for real, after creating the release namespace. Returns
/// the applied objects as the API server answered them.
pub async fn install(
    client: &Client,
    helm: &Helm,
    release: &Release,
    kinds: Option<&[&str]>,
) -> Result<Vec<Value>> {
    let caps = Capabilities::discover(client).await?;
    let objects: Vec<Value> = helm
        .render(release, &caps)?
        .into_iter()
        .filter(|o| kinds.is_none_or(|k| o["kind"].as_str().is_some_and(|kind| k.contains(&kind))))
        .collect();
    ensure_namespace(client, &release.namespace).await?;
    apply(client, &objects, Apply::Create).await
}
