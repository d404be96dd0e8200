//! The rendered chart against the real kube-apiserver of each pinned version (e2e harness):
//! every object of the default and a non-default set of values passes a server-side dry run
//! (with the prometheus-operator CRDs' minimal copies applied first, so the monitors are checked
//! too); the RBAC grants exactly what the reference says (SubjectAccessReview); and the admission
//! policy really stops a plugin from writing another node's ResourceSlices, with a service
//! account token bound to a pod on its node; and the plugin's slice publisher, its claim status
//! writes and the controller's reconcile and leader election work with exactly the chart's RBAC.

mod common;

use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use tessera_chart_tests::{
    Apply, CLUSTER_OBJECT_KINDS, Capabilities, Helm, Release, apply, ensure_namespace, install,
    monitoring_crds,
};
use tessera_controller::SharingMode;
use tessera_controller::publish::Publisher;
use tessera_controller::slices::build_pool;
use tessera_driver::Inventory;
use tessera_e2e_harness::binaries::Binaries;
use tessera_e2e_harness::{ControlPlane, ControlPlaneOptions, K8sVersion};

struct Cluster {
    cp: ControlPlane,
    helm: Helm,
    _state: tempfile::TempDir,
}

async fn start(minor: u32, test: &str) -> Option<Cluster> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("RUST_LOG")
                .unwrap_or_else(|_| tessera_e2e_harness::DEFAULT_LOG_FILTER.into()),
        )
        .with_test_writer()
        .try_init();
    let helm = helm_or_skip(test)?;
    let version = tessera_e2e_harness::versions::PINNED
        .into_iter()
        .find(|v| v.minor() == minor)
        .expect("pinned version");
    let binaries = binaries_or_skip(version, test)?;
    let state = tempfile::Builder::new()
        .prefix(&format!("tessera-chart-{test}-"))
        .tempdir()
        .expect("temp dir");
    // The harness picks free ports, then starts the components: on a busy machine another
    // process can take a port in between. Only that is retried.
    let mut attempt = 0;
    let cp = loop {
        attempt += 1;
        let mut options = ControlPlaneOptions::new(version, state.path().join(attempt.to_string()));
        options.binaries = Some(binaries.clone());
        match ControlPlane::start(options).await {
            Ok(cp) => break cp,
            Err(e) if attempt < 3 && e.to_string().contains("address already in use") => {
                eprintln!("{test}: a port was taken during start-up, starting again: {e}");
            }
            Err(e) => panic!("{test}: control plane: {e}"),
        }
    };
    Some(Cluster {
        cp,
        helm,
        _state: state,
    })
}

fn binaries_or_skip(version: K8sVersion, test: &str) -> Option<Binaries> {
    Binaries::for_test(version, test)
}

/// Applies the monitoring CRDs and waits until discovery serves them.
async fn with_monitoring_crds(client: &kube::Client) -> Capabilities {
    apply(client, &monitoring_crds().expect("crds"), Apply::Create)
        .await
        .expect("applying the monitoring CRDs");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let caps = Capabilities::discover(client).await.expect("discovery");
        if caps
            .api_versions
            .contains("monitoring.coreos.com/v1/PodMonitor")
            && caps
                .api_versions
                .contains("monitoring.coreos.com/v1/ServiceMonitor")
            && caps
                .api_versions
                .contains("monitoring.coreos.com/v1/PrometheusRule")
        {
            return caps;
        }
        assert!(
            Instant::now() < deadline,
            "the monitoring CRDs were never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const NON_DEFAULT: &str = r#"
sharingMode: "fixed:8"
defaults: {corePolicy: force, priority: low}
deviceClass:
  extra:
    - name: l40s.example.com
      cel: device.attributes["gpu.tessera.dev"].productName == "NVIDIA L40S"
nodeSelection:
  nfd: false
  extraTerms:
    - - {key: example.com/accelerator, operator: In, values: [nvidia]}
kubeletPlugin:
  driverRoot: /run/nvidia/driver
  cdiMode: standalone
  rollingUpdate: replace
  metricsAuth: kubernetes
  metricsTLS: {secretName: tessera-metrics-tls}
controller:
  replicas: 3
  leaderElection: false
monitoring:
  labels: {release: kube-prometheus-stack}
  authorization: {name: prometheus-token, key: token}
  insecureSkipVerify: false
"#;

async fn dry_run(cluster: &Cluster, minor: u32) {
    let client = cluster.cp.client();
    let caps = with_monitoring_crds(&client).await;
    let served = cluster.cp.version().resource_group_version();
    ensure_namespace(&client, NAMESPACE)
        .await
        .expect("namespace");
    // Extended resources (1.36+): the name is the API server's to validate.
    const EXTENDED: &str = "deviceClass: {extendedResourceName: gpu.tessera.dev/gpu}\n";
    let mut sets = vec![("default", ""), ("non-default", NON_DEFAULT)];
    if minor >= 36 {
        sets.push(("extended resource", EXTENDED));
    }
    for (label, values) in sets {
        let objects = cluster
            .helm
            .render(&Release::new(RELEASE, NAMESPACE).values(values), &caps)
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        let k = kinds(&objects);
        for want in [
            "DaemonSet",
            "Deployment",
            "DeviceClass",
            "PodMonitor",
            "PrometheusRule",
            "ServiceMonitor",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ] {
            assert!(
                k.contains(&want.to_string()),
                "{label}: {want} not rendered: {k:?}"
            );
        }
        for class in objects.iter().filter(|o| o["kind"] == "DeviceClass") {
            assert_eq!(class["apiVersion"], served.as_str(), "{label}: {class}");
        }
        let answers = apply(&client, &objects, Apply::DryRun)
            .await
            .unwrap_or_else(|e| panic!("v1.{minor} {label}: the API server refused: {e}"));
        assert_eq!(answers.len(), objects.len());
        // Defaulted by the server, so it really went through validation and defaulting.
        let ds = answers
            .iter()
            .find(|a| a["kind"] == "DaemonSet")
            .expect("daemonset answer");
        assert_eq!(
            ds["spec"]["template"]["spec"]["dnsPolicy"], "ClusterFirst",
            "{ds}"
        );
        eprintln!(
            "v1.{minor} {label}: {} objects accepted by a server-side dry run",
            answers.len()
        );
    }
    // A dry run stores nothing.
    let ds: Api<k8s_openapi::api::apps::v1::DaemonSet> = Api::namespaced(client.clone(), NAMESPACE);
    assert!(
        ds.get_opt(PLUGIN).await.expect("get").is_none(),
        "dry run stored the DaemonSet"
    );
    // And a broken object is refused, so the dry run can fail.
    let mut objects = cluster
        .helm
        .render(&Release::new(RELEASE, NAMESPACE), &caps)
        .expect("render");
    let pm = objects
        .iter_mut()
        .find(|o| o["kind"] == "PodMonitor")
        .expect("podmonitor");
    pm["spec"]["podMetricsEndpoints"][0]["scrapeEvery"] = json!("30s");
    let err = apply(&client, &objects, Apply::DryRun)
        .await
        .expect_err("an unknown field must be refused");
    assert!(err.to_string().contains("scrapeEvery"), "{err}");
}

/// Asks the authorizer whether `user` may do `verb` on `resource`, until RBAC has caught up
/// with the bindings just written (its informers lag by milliseconds).
async fn allowed(
    client: &kube::Client,
    user: &str,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
    name: Option<&str>,
) -> bool {
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    let review: SubjectAccessReview = serde_json::from_value(json!({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {
            "user": user,
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{NAMESPACE}"), "system:authenticated"],
            "resourceAttributes": { "verb": verb, "group": group, "resource": resource,
                                    "namespace": namespace, "name": name }
        }
    }))
    .expect("review");
    let answer = api
        .create(&PostParams::default(), &review)
        .await
        .expect("SubjectAccessReview");
    answer.status.is_some_and(|s| s.allowed)
}

async fn wait_allowed(client: &kube::Client, user: &str, verb: &str, group: &str, resource: &str) {
    wait_allowed_in(client, user, verb, group, resource, None, None).await;
}

async fn wait_allowed_in(
    client: &kube::Client,
    user: &str,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
    name: Option<&str>,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !allowed(client, user, verb, group, resource, namespace, name).await {
        assert!(
            Instant::now() < deadline,
            "{user} never got {verb} {resource}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn slice_resource(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("resource.k8s.io", version, "ResourceSlice"),
        "resourceslices",
    )
}

fn slice(version: &str, name: &str, node: Option<&str>) -> DynamicObject {
    let mut spec = json!({
        "driver": "gpu.tessera.dev",
        "pool": { "name": node.unwrap_or("shared"), "generation": 1, "resourceSliceCount": 1 },
    });
    match node {
        Some(n) => spec["nodeName"] = json!(n),
        None => spec["allNodes"] = json!(true),
    }
    serde_json::from_value(json!({
        "apiVersion": format!("resource.k8s.io/{version}"), "kind": "ResourceSlice",
        "metadata": { "name": name }, "spec": spec,
    }))
    .expect("slice")
}

/// A pod of the service account `sa` bound to `node` (never started: there is no kubelet).
async fn create_pod(client: &kube::Client, name: &str, node: &str, sa: &str) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name },
        "spec": { "nodeName": node, "serviceAccountName": sa,
                  "containers": [{ "name": "main", "image": "example.invalid/tessera" }] }
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("pod")
}

async fn create_node(client: &kube::Client, name: &str) {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": { "name": name }
    }))
    .expect("node");
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("node");
}

/// A client authenticated as the service account `sa`, with a token bound to `pod`.
async fn token_client(cp: &ControlPlane, sa: &str, pod: &Pod) -> kube::Client {
    let sas: Api<ServiceAccount> = Api::namespaced(cp.client(), NAMESPACE);
    let request = json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": { "expirationSeconds": 600, "boundObjectRef": {
            "apiVersion": "v1", "kind": "Pod",
            "name": pod.metadata.name, "uid": pod.metadata.uid } }
    });
    let answer: Value = sas
        .create_subresource("token", sa, &PostParams::default(), &request)
        .await
        .expect("TokenRequest");
    let token = answer["status"]["token"].as_str().expect("token");
    let kubeconfig = Kubeconfig::read_from(cp.kubeconfig()).expect("kubeconfig");
    let mut raw = serde_json::to_value(&kubeconfig).expect("kubeconfig json");
    for user in raw["users"].as_array_mut().expect("users") {
        user["user"] = json!({ "token": token });
    }
    let kubeconfig: Kubeconfig = serde_json::from_value(raw).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    kube::Client::try_from(config).expect("client")
}

async fn admission_policy(cluster: &Cluster, minor: u32) {
    let cp = &cluster.cp;
    let client = cp.client();
    let version = cp.version().resource_api_version();
    install(
        &client,
        &cluster.helm,
        &Release::new(RELEASE, NAMESPACE),
        Some(CLUSTER_OBJECT_KINDS),
    )
    .await
    .expect("installing the chart's cluster objects");

    // RBAC: what the reference says, nothing more.
    let plugin = format!("system:serviceaccount:{NAMESPACE}:{PLUGIN}");
    let controller = format!("system:serviceaccount:{NAMESPACE}:{CONTROLLER}");
    wait_allowed(
        &client,
        &plugin,
        "create",
        "resource.k8s.io",
        "resourceslices",
    )
    .await;
    wait_allowed(
        &client,
        &controller,
        "create",
        "resource.k8s.io",
        "deviceclasses",
    )
    .await;
    // The Role's binding is a separate object: wait for it too.
    wait_allowed_in(
        &client,
        &controller,
        "patch",
        "coordination.k8s.io",
        "leases",
        Some(NAMESPACE),
        Some(CONTROLLER),
    )
    .await;
    for (user, verb, group, resource, ns, name, want) in [
        (
            &plugin,
            "get",
            "resource.k8s.io",
            "resourceclaims",
            Some("team-a"),
            None,
            true,
        ),
        (
            &plugin,
            "list",
            "resource.k8s.io",
            "resourceclaims",
            Some("team-a"),
            None,
            false,
        ),
        (
            &plugin,
            "watch",
            "resource.k8s.io",
            "resourceslices",
            None,
            None,
            true,
        ),
        (&plugin, "get", "", "nodes", None, Some("node-a"), true),
        (&plugin, "update", "", "nodes", None, Some("node-a"), false),
        (&plugin, "get", "", "namespaces", None, Some("team-a"), true),
        (&plugin, "list", "", "namespaces", None, None, false),
        (
            &plugin,
            "patch",
            "",
            "namespaces",
            None,
            Some("team-a"),
            false,
        ),
        (
            &plugin,
            "create",
            "events.k8s.io",
            "events",
            Some("default"),
            None,
            true,
        ),
        (&plugin, "list", "", "secrets", Some(NAMESPACE), None, false),
        (
            &plugin,
            "create",
            "resource.k8s.io",
            "deviceclasses",
            None,
            None,
            false,
        ),
        (
            &controller,
            "list",
            "resource.k8s.io",
            "resourceslices",
            None,
            None,
            true,
        ),
        (
            &controller,
            "create",
            "resource.k8s.io",
            "resourceslices",
            None,
            None,
            false,
        ),
        (
            &controller,
            "delete",
            "resource.k8s.io",
            "deviceclasses",
            None,
            Some("x"),
            true,
        ),
        (
            &controller,
            "patch",
            "coordination.k8s.io",
            "leases",
            Some(NAMESPACE),
            Some(CONTROLLER),
            true,
        ),
        (
            &controller,
            "patch",
            "coordination.k8s.io",
            "leases",
            Some(NAMESPACE),
            Some("other"),
            false,
        ),
        (
            &controller,
            "create",
            "coordination.k8s.io",
            "leases",
            Some("kube-system"),
            None,
            false,
        ),
        (
            &controller,
            "get",
            "",
            "secrets",
            Some(NAMESPACE),
            None,
            false,
        ),
    ] {
        assert_eq!(
            allowed(&client, user, verb, group, resource, ns, name).await,
            want,
            "v1.{minor}: {user} {verb} {group}/{resource} ns={ns:?} name={name:?}"
        );
    }

    // The plugin's pod on node-a, and a token bound to it.
    for n in ["node-a", "node-b"] {
        create_node(&client, n).await;
    }
    let pod = create_pod(&client, "plugin-on-node-a", "node-a", PLUGIN).await;
    let as_plugin = token_client(cp, PLUGIN, &pod).await;
    let admin_slices: Api<DynamicObject> = Api::all_with(client.clone(), &slice_resource(version));
    let plugin_slices: Api<DynamicObject> =
        Api::all_with(as_plugin.clone(), &slice_resource(version));
    let pp = PostParams::default();

    // The policy is loaded asynchronously: wait until it refuses node-b, with its own message.
    let deadline = Instant::now() + Duration::from_secs(30);
    let denial = loop {
        match plugin_slices
            .create(&pp, &slice(version, "node-b-slice", Some("node-b")))
            .await
        {
            Err(kube::Error::Api(s))
                if s.message
                    .contains("may not write ResourceSlices of node node-b") =>
            {
                break s;
            }
            Ok(_) => {
                // Not loaded yet: undo and retry.
                admin_slices
                    .delete("node-b-slice", &DeleteParams::default())
                    .await
                    .expect("delete");
            }
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "v1.{minor}: never denied by the policy; last: {e}"
                );
            }
        }
        assert!(
            Instant::now() < deadline,
            "v1.{minor}: the plugin on node-a could still write node-b's slices"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("v1.{minor}: refused as it should be: {}", denial.message);
    assert_eq!(denial.code, 403, "{denial:?}");
    assert!(
        denial.message.contains(&format!("{PLUGIN}-resourceslices")),
        "the denial names the policy: {denial:?}"
    );

    // Its own node: create, update, delete all allowed.
    let mine = plugin_slices
        .create(&pp, &slice(version, "node-a-slice", Some("node-a")))
        .await
        .unwrap_or_else(|e| {
            panic!("v1.{minor}: the plugin on node-a may write its own slice: {e}")
        });
    let mut changed = mine.clone();
    changed.data["spec"]["pool"]["generation"] = json!(2);
    plugin_slices
        .replace("node-a-slice", &pp, &changed)
        .await
        .expect("update own slice");
    // On its own node, neither another driver's slice nor a pool named for another node: the
    // scheduler would read either as devices the plugin does not have.
    let mut foreign_driver = slice(version, "node-a-other-driver", Some("node-a"));
    foreign_driver.data["spec"]["driver"] = json!("gpu.nvidia.com");
    let mut foreign_pool = slice(version, "node-a-other-pool", Some("node-a"));
    foreign_pool.data["spec"]["pool"]["name"] = json!("node-b");
    for (object, refusal) in [
        (
            &foreign_driver,
            "may write only ResourceSlices of driver gpu.tessera.dev, not of gpu.nvidia.com",
        ),
        (
            &foreign_pool,
            "on node node-a may write only its pool node-a, not pool node-b",
        ),
    ] {
        let err = plugin_slices
            .create(&pp, object)
            .await
            .expect_err("a node's plugin may write only Tessera's pool of its node");
        assert!(err.to_string().contains(refusal), "v1.{minor}: {err}");
    }
    // A slice for all nodes is not its to write either.
    let err = plugin_slices
        .create(&pp, &slice(version, "cluster-slice", None))
        .await
        .expect_err("a node's plugin may not write a cluster-wide slice");
    assert!(
        err.to_string()
            .contains("may not write ResourceSlices without a node"),
        "{err}"
    );
    // Someone else's slice (written by an admin, whom the policy does not match) cannot be
    // deleted by the plugin.
    admin_slices
        .create(&pp, &slice(version, "node-b-slice", Some("node-b")))
        .await
        .expect("the admin is not restricted");
    let err = plugin_slices
        .delete("node-b-slice", &DeleteParams::default())
        .await
        .expect_err("deleting node-b's slice");
    assert!(err.to_string().contains("of node node-b"), "{err}");
    plugin_slices
        .delete("node-a-slice", &DeleteParams::default())
        .await
        .expect("delete own slice");
}

/// The project's own code paths, run with the identities and RBAC the chart gives them: the
/// plugin's slice publisher (through the admission policy too) and the controller's reconcile
/// and leader election.
async fn code_under_chart_rbac(cluster: &Cluster, minor: u32) {
    let cp = &cluster.cp;
    let client = cp.client();
    install(
        &client,
        &cluster.helm,
        &Release::new(RELEASE, NAMESPACE),
        Some(CLUSTER_OBJECT_KINDS),
    )
    .await
    .expect("installing the chart's cluster objects");
    let controller = format!("system:serviceaccount:{NAMESPACE}:{CONTROLLER}");
    wait_allowed(
        &client,
        &controller,
        "create",
        "resource.k8s.io",
        "deviceclasses",
    )
    .await;
    wait_allowed_in(
        &client,
        &controller,
        "patch",
        "coordination.k8s.io",
        "leases",
        Some(NAMESPACE),
        Some(CONTROLLER),
    )
    .await;
    wait_allowed(
        &client,
        &format!("system:serviceaccount:{NAMESPACE}:{PLUGIN}"),
        "create",
        "resource.k8s.io",
        "resourceslices",
    )
    .await;
    const NODE: &str = "gpu-node-0";
    create_node(&client, NODE).await;
    let plugin_pod = create_pod(&client, "plugin", NODE, PLUGIN).await;
    let controller_pod = create_pod(&client, "controller", NODE, CONTROLLER).await;
    let as_plugin = token_client(cp, PLUGIN, &plugin_pod).await;
    let as_controller = token_client(cp, CONTROLLER, &controller_pod).await;

    // The plugin publishes its node's pool, as tessera-kubelet-plugin does.
    let server = tessera_controller::discovery::ServerDra::discover(&as_plugin)
        .await
        .expect("discovery as the plugin");
    let mode = if minor >= 34 {
        SharingMode::Consumable
    } else {
        SharingMode::Fixed { slices: 4 }
    };
    let plan = build_pool(&inventory(), NODE, mode, server.counter_layout()).expect("plan");
    let publisher = Publisher::new(as_plugin.clone(), NODE, server.version);
    let deadline = Instant::now() + Duration::from_secs(20);
    let report = loop {
        // RBAC and the policy are loaded asynchronously.
        match publisher.sync(&plan).await {
            Ok(r) => break r,
            Err(e) if Instant::now() < deadline => {
                eprintln!("v1.{minor}: publishing as the plugin, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("v1.{minor}: the plugin cannot publish under the chart's RBAC: {e}"),
        }
    };
    assert!(report.changed(), "{report:?}");
    assert!(report.dropped.is_empty(), "{report:?}");
    let published = publisher.existing().await.expect("list as the plugin");
    assert!(!published.is_empty());
    for s in published.values() {
        assert!(
            !s["metadata"]["ownerReferences"][0]["uid"].is_null(),
            "the plugin read its Node for the owner reference: {s}"
        );
    }

    claim_status_under_chart_rbac(cp, &as_plugin, minor, NODE).await;

    // The controller lists slices and claims and keeps the per-model classes; the chart's
    // generic class is not its own and stays as the chart made it.
    let (view, classes) =
        tessera_controller::cluster::reconcile(&as_controller, server.version, true)
            .await
            .unwrap_or_else(|e| {
                panic!("v1.{minor}: the controller's reconcile under the chart's RBAC: {e}")
            });
    assert_eq!(view.gpus.len(), 2, "{view:?}");
    taint_rule_naming_nothing(cp, &as_controller, &view, minor).await;
    let classes = classes.expect("leading");
    let mut created = classes.created.clone();
    created.sort();
    assert_eq!(
        created,
        [
            "nvidia-geforce-rtx-4090.gpu.tessera.dev",
            "nvidia-l40s.gpu.tessera.dev"
        ],
        "{classes:?}"
    );
    let class_api: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("resource.k8s.io", server.version.version(), "DeviceClass"),
            "deviceclasses",
        ),
    );
    let generic = class_api
        .get("gpu.tessera.dev")
        .await
        .expect("generic class");
    assert_eq!(
        generic
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("app.kubernetes.io/managed-by")),
        Some(&"Helm".to_string())
    );
    assert_eq!(
        generic.data["spec"]["config"][0]["opaque"]["parameters"]["kind"], "GpuConfig",
        "{:?}",
        generic.data
    );

    // Leader election with the Role's lease verbs, as tessera-controller sets it up.
    let manager = kube_lease_manager::LeaseManagerBuilder::new(as_controller.clone(), CONTROLLER)
        .with_namespace(NAMESPACE)
        .with_identity("controller")
        .with_duration(15)
        .with_grace(5)
        .build()
        .await
        .unwrap_or_else(|e| panic!("v1.{minor}: lease manager under the chart's Role: {e}"));
    let (mut leader, task) = manager.watch().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !*leader.borrow_and_update() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "v1.{minor}: never took the Lease");
        let _ = tokio::time::timeout(left, leader.changed()).await;
    }
    drop(leader);
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
}

/// The plugin says in a claim allocated on its node what it prepared, and clears it again, with
/// exactly the chart's RBAC; on 1.36+ it may not write the status of a claim allocated on
/// another node (`associated-node:patch` on `resourceclaims/driver`); 1.31 has no
/// `status.devices`, and the writer says so instead of failing.
async fn claim_status_under_chart_rbac(
    cp: &ControlPlane,
    as_plugin: &kube::Client,
    minor: u32,
    node: &str,
) {
    use tessera_kubelet_plugin::claims::ClaimReader;
    use tessera_kubelet_plugin::claims::ClaimRef;
    use tessera_kubelet_plugin::claims::status::{self, DeviceStatus, Outcome};
    let version: K8sVersion = format!("1.{minor}").parse().expect("version");
    let api_version = format!("resource.k8s.io/{}", version.resource_api_version());
    let claims: Api<DynamicObject> = Api::namespaced_with(
        cp.client(),
        NAMESPACE,
        &version.resource_api("ResourceClaim", "resourceclaims"),
    );
    let request = if minor >= 34 {
        json!({ "name": "gpu", "exactly": { "deviceClassName": "gpu.tessera.dev" } })
    } else {
        json!({ "name": "gpu", "deviceClassName": "gpu.tessera.dev" })
    };
    // A claim as the scheduler leaves it: allocated on `on`, device gpu-0 of `on`'s pool.
    let allocated = |name: &str, on: &str| {
        let claims = claims.clone();
        let (name, on, request, api_version) = (
            name.to_string(),
            on.to_string(),
            request.clone(),
            api_version.clone(),
        );
        async move {
            let claim: DynamicObject = serde_json::from_value(json!({
                "apiVersion": api_version, "kind": "ResourceClaim",
                "metadata": { "name": name },
                "spec": { "devices": { "requests": [request] } },
            }))
            .expect("claim");
            let mut claim = claims
                .create(&PostParams::default(), &claim)
                .await
                .expect("creating the claim");
            claim.data["status"] = json!({ "allocation": {
                "devices": { "results": [{ "request": "gpu", "driver": "gpu.tessera.dev",
                                           "pool": on, "device": "gpu-0" }] },
                "nodeSelector": { "nodeSelectorTerms": [{ "matchFields": [
                    { "key": "metadata.name", "operator": "In", "values": [on] }] }] },
            }});
            claims
                .replace_status(&name, &PostParams::default(), &claim)
                .await
                .expect("allocating the claim")
        }
    };
    let name_of = |claim: &DynamicObject| ClaimRef {
        namespace: NAMESPACE.into(),
        name: claim.metadata.name.clone().expect("name"),
        uid: claim.metadata.uid.clone().expect("uid"),
    };
    let prepared = |pool: &str| {
        let device: tessera_driver::allocation::AllocatedDevice = serde_json::from_value(json!({
            "request": "gpu", "pool": pool, "device": "gpu-0",
            "gpuUuid": "GPU-4090a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2b", "gpuIndex": 0, "gpuMinor": 0,
            "memory": 24u64 << 30, "cores": 100,
        }))
        .expect("device");
        DeviceStatus::of_claim(
            &[tessera_driver::checkpoint::PreparedDevice {
                device,
                cdi_device_ids: Vec::new(),
            }],
            &inventory(),
        )
    };
    let reader = ClaimReader::new(as_plugin.clone());
    let here = allocated("status-here", node).await;
    let outcome = status::write(as_plugin, &reader, &name_of(&here), &prepared(node))
        .await
        .unwrap_or_else(|e| panic!("v1.{minor}: writing the claim's status: {e}"));
    if minor < 32 {
        assert!(
            matches!(outcome, Outcome::NotServed(_)),
            "v1.{minor}: {outcome:?}"
        );
        return;
    }
    assert!(
        matches!(outcome, Outcome::Written),
        "v1.{minor}: {outcome:?}"
    );
    let read = claims.get("status-here").await.expect("claim");
    let devices = &read.data["status"]["devices"];
    assert_eq!(devices.as_array().map(Vec::len), Some(1), "{devices}");
    assert_eq!(devices[0]["driver"], "gpu.tessera.dev");
    assert_eq!(
        devices[0]["data"]["gpuUUID"],
        "GPU-4090a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2b"
    );
    assert_eq!(devices[0]["data"]["memoryLimit"], "24Gi");
    assert_eq!(devices[0]["conditions"][0]["type"], "Ready");
    assert_eq!(devices[0]["conditions"][0]["status"], "True");
    // What the reader hands to prepare is what was written: a repeated prepare writes nothing.
    let again = reader
        .get(NAMESPACE, "status-here", &name_of(&here).uid)
        .await
        .expect("reading the claim as the plugin");
    assert!(
        status::up_to_date(&again.device_status, &prepared(node)),
        "{:?}",
        again.device_status
    );

    // A claim replaced under the same name is not written to.
    let mut stale = name_of(&here);
    stale.uid = "00000000-0000-0000-0000-000000000000".into();
    let outcome = status::write(as_plugin, &reader, &stale, &prepared(node))
        .await
        .expect("writing with a stale UID");
    assert!(matches!(outcome, Outcome::Gone), "v1.{minor}: {outcome:?}");

    let outcome = status::write(as_plugin, &reader, &name_of(&here), &[])
        .await
        .expect("clearing the claim's status");
    assert!(
        matches!(outcome, Outcome::Cleared),
        "v1.{minor}: {outcome:?}"
    );
    let read = claims.get("status-here").await.expect("claim");
    assert!(
        read.data["status"]["devices"]
            .as_array()
            .is_none_or(Vec::is_empty),
        "v1.{minor}: cleared: {}",
        read.data["status"]
    );

    if minor >= 36 {
        let elsewhere = allocated("status-elsewhere", "gpu-node-9").await;
        let outcome = status::write(
            as_plugin,
            &reader,
            &name_of(&elsewhere),
            &prepared("gpu-node-9"),
        )
        .await
        .expect_err("a claim allocated on another node");
        let message = outcome.to_string();
        assert!(
            message.contains("resourceclaims/driver"),
            "v1.{minor}: {message}"
        );
    }
}

/// The controller, with exactly the chart's RBAC, lists DeviceTaintRules and warns with an
/// Event on one that names a device its pool does not publish (1.37); where rules are not
/// served (1.31) it finds none and fails nothing.
async fn taint_rule_naming_nothing(
    cp: &ControlPlane,
    as_controller: &kube::Client,
    view: &tessera_controller::cluster::ClusterView,
    minor: u32,
) {
    use tessera_controller::cluster::taint_rules::{REASON, TaintRuleCheck};
    let mut check = TaintRuleCheck::new(as_controller.clone());
    if minor >= 37 {
        let rules: Api<DynamicObject> = Api::all_with(
            cp.client(),
            &ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("resource.k8s.io", "v1", "DeviceTaintRule"),
                "devicetaintrules",
            ),
        );
        let rule: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "DeviceTaintRule",
            "metadata": { "name": "drain-typo" },
            "spec": {
                "deviceSelector": { "driver": "gpu.tessera.dev", "pool": "gpu-node-0", "device": "gpu-9" },
                "taint": { "key": "example.com/maintenance", "effect": "NoSchedule" },
            },
        }))
        .expect("rule");
        rules
            .create(&PostParams::default(), &rule)
            .await
            .expect("creating the rule");
    }
    let found = check.check(view).await.unwrap_or_else(|e| {
        panic!("v1.{minor}: checking DeviceTaintRules under the chart's RBAC: {e}")
    });
    if minor < 37 {
        assert!(found.is_empty(), "{found:?}");
        return;
    }
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].reason.contains(r#"no device "gpu-9""#),
        "{found:?}"
    );
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(cp.client(), "default");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = events.list(&Default::default()).await.expect("events");
        if let Some(event) = list
            .items
            .iter()
            .find(|e| e.reason.as_deref() == Some(REASON))
        {
            let note = event.note.clone().unwrap_or_default();
            assert!(note.contains("gpu-9") && note.contains("gpu-0"), "{note}");
            break;
        }
        assert!(Instant::now() < deadline, "no {REASON} Event");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Once per rule and generation.
    assert_eq!(check.check(view).await.expect("again").len(), 1);
}

fn inventory() -> Inventory {
    serde_json::from_value(json!({
        "driverVersion": "570.86.15",
        "gpus": [
            { "uuid": "GPU-4090a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2b", "index": 0, "minor": 0,
              "productName": "NVIDIA GeForce RTX 4090", "memory": 24u64 << 30 },
            { "uuid": "GPU-40540c5d-e6f7-4a8b-9c0d-1e2f3a4b5c6d", "index": 1, "minor": 1,
              "productName": "NVIDIA L40S", "memory": 48u64 << 30 },
        ]
    }))
    .expect("inventory")
}

/// One control plane per version for all three scenarios, in an order where none disturbs the
/// next: the dry run stores nothing but the monitoring CRDs; the policy scenario uses nodes
/// node-a/node-b, the code scenario gpu-node-0.
async fn chart_on(minor: u32, test: &str) {
    let Some(cluster) = start(minor, test).await else {
        return;
    };
    dry_run(&cluster, minor).await;
    admission_policy(&cluster, minor).await;
    code_under_chart_rbac(&cluster, minor).await;
    cluster.cp.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_on_v1_37() {
    chart_on(37, "chart_on_v1_37").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_on_v1_31() {
    chart_on(31, "chart_on_v1_31").await;
}

// The release matrix (`make e2e-matrix`): the chart against every pinned minor between the
// oldest and the newest — above all 1.36, the first with granular claim-status authorisation.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "release matrix: make e2e-matrix"]
async fn chart_on_v1_32() {
    chart_on(32, "chart_on_v1_32").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "release matrix: make e2e-matrix"]
async fn chart_on_v1_33() {
    chart_on(33, "chart_on_v1_33").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "release matrix: make e2e-matrix"]
async fn chart_on_v1_34() {
    chart_on(34, "chart_on_v1_34").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "release matrix: make e2e-matrix"]
async fn chart_on_v1_35() {
    chart_on(35, "chart_on_v1_35").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "release matrix: make e2e-matrix"]
async fn chart_on_v1_36() {
    chart_on(36, "chart_on_v1_36").await;
}
