//! `helm template` of charts/tessera, offline: the default values and a non-default set, what each
//! object must say (GPU node affinity, the admission policy, least-privilege RBAC, API versions by
//! Kubernetes version), bad values refused, and a dashboard that uses only real metric names.

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::{Value, json};
use tessera_chart_tests::Capabilities;

fn helm(test: &str) -> Option<tessera_chart_tests::Helm> {
    helm_or_skip(test)
}

fn newest() -> Capabilities {
    Capabilities::offline("v1.37.1", &[])
}

/// Every rule of a role as (apiGroups, resources, resourceNames, verbs), sorted.
fn rules(role: &Value) -> BTreeSet<String> {
    let list = |v: &Value| {
        let mut items: Vec<String> = v
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| x.as_str().unwrap_or("?").to_string())
                    .collect()
            })
            .unwrap_or_default();
        items.sort();
        items.join(",")
    };
    role["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| {
            format!(
                "{} {} {} {}",
                list(&r["apiGroups"]),
                list(&r["resources"]),
                list(&r["resourceNames"]),
                list(&r["verbs"])
            )
        })
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn default_values() {
    let Some(helm) = helm("default_values") else {
        return;
    };
    let objects = render(&helm, "", &newest());
    assert_eq!(
        kinds(&objects),
        [
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "Deployment",
            "DeviceClass",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
            "ServiceAccount",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ],
        "offline, without the monitoring CRDs, no PodMonitor/ServiceMonitor"
    );
    for o in &objects {
        if o["metadata"]["namespace"].is_string() {
            assert_eq!(o["metadata"]["namespace"], NAMESPACE, "{o}");
        }
        assert_eq!(
            o["metadata"]["labels"]["app.kubernetes.io/instance"],
            RELEASE
        );
    }

    // The kubelet plugin: GPU nodes found by the GPU Operator's or NFD's labels, opt-out label.
    let ds = find(&objects, "DaemonSet", PLUGIN);
    let pod = &ds["spec"]["template"]["spec"];
    let terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"]
        .as_array()
        .expect("nodeSelectorTerms");
    let first_keys: Vec<&str> = terms
        .iter()
        .map(|t| t["matchExpressions"][0]["key"].as_str().expect("key"))
        .collect();
    assert_eq!(
        first_keys,
        [
            "nvidia.com/gpu.present",
            "feature.node.kubernetes.io/pci-10de.present",
            "feature.node.kubernetes.io/pci-0300_10de.present",
            "feature.node.kubernetes.io/pci-0302_10de.present",
            "gpu.tessera.dev/enabled",
        ]
    );
    for t in terms {
        let exprs = t["matchExpressions"].as_array().expect("expressions");
        assert_eq!(exprs[0]["operator"], "In");
        assert_eq!(exprs[0]["values"], json!(["true"]));
        assert!(
            exprs.contains(
                &json!({"key": "gpu.tessera.dev/enabled", "operator": "NotIn", "values": ["false"]})
            ),
            "every term honours the opt-out label: {t}"
        );
    }
    assert_eq!(pod["serviceAccountName"], PLUGIN);
    let c = &pod["containers"][0];
    let a = args(c);
    for want in [
        "--sharing-mode=auto",
        "--cdi-mode=toolkit",
        "--registrar-dir=/var/lib/kubelet/plugins_registry",
        "--plugin-dir=/var/lib/kubelet/plugins/gpu.tessera.dev",
        "--cdi-dir=/var/run/cdi",
        "--state-dir=/var/lib/tessera",
        "--metrics-address=0.0.0.0:9477",
    ] {
        assert!(a.iter().any(|x| x == want), "missing {want} in {a:?}");
    }
    // Every host path is mounted at the same path inside (the CDI specs name host paths).
    let volumes = pod["volumes"].as_array().expect("volumes");
    for m in c["volumeMounts"].as_array().expect("mounts") {
        let v = volumes
            .iter()
            .find(|v| v["name"] == m["name"])
            .expect("volume of mount");
        if m["name"] != "driver-root" {
            assert_eq!(v["hostPath"]["path"], m["mountPath"], "{m}");
        }
    }
    // A host-installed driver is seen under /host, read-only.
    let driver = c["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "driver-root"))
        .expect("driver-root mount");
    assert_eq!(driver["mountPath"], "/host");
    assert_eq!(driver["readOnly"], true);
    assert!(
        c["env"]
            .as_array()
            .expect("env")
            .contains(&json!({"name": "TESSERA_DRIVER_ROOT", "value": "/host"})),
        "{}",
        c["env"]
    );
    assert!(
        !c["env"].to_string().contains("LD_LIBRARY_PATH"),
        "the host's libc must not leak in"
    );
    nvml_search_finds_the_library(c);
    // 1.33+: surge updates with per-pod instance IDs.
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"], 1);
    let env: Vec<&str> = c["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(
        env.contains(&"NODE_NAME") && env.contains(&"POD_UID"),
        "{env:?}"
    );

    // The controller: 2 replicas, leader election, its Lease name matches its Role.
    let deploy = find(&objects, "Deployment", CONTROLLER);
    assert_eq!(deploy["spec"]["replicas"], 2);
    let ca = args(&deploy["spec"]["template"]["spec"]["containers"][0]);
    assert!(ca.contains(&"--leader-elect=true".to_string()), "{ca:?}");
    assert!(ca.contains(&format!("--lease-name={CONTROLLER}")), "{ca:?}");
    assert_eq!(
        deploy["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"],
        true
    );

    // Least privilege: exactly these rules, no wildcard anywhere.
    assert_eq!(
        rules(find(&objects, "ClusterRole", PLUGIN)),
        set(&[
            " namespaces  get",
            " nodes  get",
            "events.k8s.io events  create,patch",
            "resource.k8s.io resourceclaims  get",
            "resource.k8s.io resourceclaims/driver gpu.tessera.dev associated-node:patch",
            "resource.k8s.io resourceclaims/status  patch",
            "resource.k8s.io resourceslices  create,delete,get,list,update,watch",
        ])
    );
    assert_eq!(
        rules(find(&objects, "ClusterRole", CONTROLLER)),
        set(&[
            "events.k8s.io events  create,patch",
            "resource.k8s.io deviceclasses  create,delete,get,list,update",
            "resource.k8s.io devicetaintrules,resourceclaims,resourceslices  list",
        ])
    );
    assert_eq!(
        rules(find(&objects, "Role", CONTROLLER)),
        set(&[
            "coordination.k8s.io leases  create",
            &format!("coordination.k8s.io leases {CONTROLLER} get,patch"),
        ])
    );
    for o in objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
    {
        assert!(
            !o["rules"].to_string().contains('*'),
            "wildcard in {}: {}",
            o["metadata"]["name"],
            o["rules"]
        );
        assert!(!o["rules"].to_string().contains("secrets"), "{o}");
    }
    for (kind, name, sa) in [
        ("ClusterRoleBinding", PLUGIN, PLUGIN),
        ("ClusterRoleBinding", CONTROLLER, CONTROLLER),
        ("RoleBinding", CONTROLLER, CONTROLLER),
    ] {
        let b = find(&objects, kind, name);
        assert_eq!(
            b["subjects"],
            json!([{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}])
        );
        assert_eq!(b["roleRef"]["name"], name);
    }

    // The admission policy: only the plugin's service account, only its own node's slices.
    let vap = find(
        &objects,
        "ValidatingAdmissionPolicy",
        &format!("{PLUGIN}-resourceslices"),
    );
    assert_eq!(vap["apiVersion"], "admissionregistration.k8s.io/v1");
    assert_eq!(vap["spec"]["failurePolicy"], "Fail");
    assert_eq!(
        vap["spec"]["matchConstraints"]["resourceRules"],
        json!([{"apiGroups": ["resource.k8s.io"], "apiVersions": ["*"],
                "operations": ["CREATE", "UPDATE", "DELETE"], "resources": ["resourceslices"]}])
    );
    let condition = vap["spec"]["matchConditions"][0]["expression"]
        .as_str()
        .expect("matchCondition");
    assert!(
        condition.contains(&format!("\"system:serviceaccount:{NAMESPACE}:{PLUGIN}\"")),
        "{condition}"
    );
    let variables = vap["spec"]["variables"].to_string();
    assert!(
        variables.contains("request.userInfo.extra[?'authentication.kubernetes.io/node-name']"),
        "{variables}"
    );
    assert!(variables.contains("spec.?nodeName"), "{variables}");
    let binding = find(
        &objects,
        "ValidatingAdmissionPolicyBinding",
        &format!("{PLUGIN}-resourceslices"),
    );
    assert_eq!(binding["spec"]["policyName"], vap["metadata"]["name"]);
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));

    // The generic DeviceClass, carrying the default GpuConfig.
    let class = find(&objects, "DeviceClass", "gpu.tessera.dev");
    assert_eq!(class["apiVersion"], "resource.k8s.io/v1");
    assert_eq!(
        class["spec"]["selectors"],
        json!([{"cel": {"expression": "device.driver == \"gpu.tessera.dev\""}}])
    );
    assert_eq!(
        class["spec"]["config"],
        json!([{"opaque": {"driver": "gpu.tessera.dev", "parameters": {
            "apiVersion": "gpu.tessera.dev/v1alpha1", "kind": "GpuConfig",
            "corePolicy": "default", "priority": "normal"}}}])
    );

    let dashboard = find(&objects, "ConfigMap", "tessera-dashboard");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
}

const NON_DEFAULT: &str = r#"
sharingMode: "fixed:8"
defaults: {corePolicy: force, priority: low}
deviceClass:
  extendedResourceName: gpu.tessera.dev/gpu
  extra:
    - name: l40s.example.com
      cel: device.attributes["gpu.tessera.dev"].productName == "NVIDIA L40S"
      priority: high
      extendedResourceName: example.com/l40s
nodeSelection:
  nfd: false
  manualLabel: false
  extraTerms:
    - - {key: example.com/accelerator, operator: In, values: [nvidia]}
kubeletPlugin:
  nodeSelector: {pool: gpu}
  affinity:
    nodeAffinity:
      preferredDuringSchedulingIgnoredDuringExecution:
        - {weight: 10, preference: {matchExpressions: [{key: example.com/zone, operator: In, values: [a]}]}}
    podAntiAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
        - {topologyKey: kubernetes.io/hostname, labelSelector: {matchLabels: {app: legacy-device-plugin}}}
  podLabels: {team: ml-platform}
  extraEnv: [{name: EXTRA, value: "1"}]
  extraVolumes: [{name: scratch, emptyDir: {}}]
  extraVolumeMounts: [{name: scratch, mountPath: /scratch}]
  driverRoot: /run/nvidia/driver
  cdiMode: standalone
  nvmlLibrary: /run/nvidia/driver/usr/lib64/libnvidia-ml.so.1
  contextOverhead: 600Mi
  kubeletRoot: /var/lib/k0s/kubelet
  rollingUpdate: replace
  metricsAuth: kubernetes
  metricsTLS: {secretName: tessera-metrics-tls}
controller:
  replicas: 3
  leaderElection: false
admissionPolicy: {enabled: false}
monitoring:
  enabled: true
  labels: {release: kube-prometheus-stack}
  authorization: {name: prometheus-token, key: token}
  insecureSkipVerify: false
  dashboard: {enabled: false}
image: {registry: registry.example.com/gpu, tag: "9.9.9"}
"#;

#[test]
fn non_default_values() {
    let Some(helm) = helm("non_default_values") else {
        return;
    };
    let objects = render(&helm, NON_DEFAULT, &newest());
    let k = kinds(&objects);
    assert!(
        !k.contains(&"ValidatingAdmissionPolicy".to_string()),
        "{k:?}"
    );
    assert!(!k.contains(&"ConfigMap".to_string()), "{k:?}");

    let ds = find(&objects, "DaemonSet", PLUGIN);
    let pod = &ds["spec"]["template"]["spec"];
    let terms = &pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"];
    assert_eq!(terms.as_array().map(Vec::len), Some(2), "{terms}");
    assert_eq!(
        terms[0]["matchExpressions"][0]["key"],
        "nvidia.com/gpu.present"
    );
    assert_eq!(
        terms[1]["matchExpressions"][0]["key"],
        "example.com/accelerator"
    );
    let c = &pod["containers"][0];
    assert_eq!(
        c["image"],
        "registry.example.com/gpu/tessera-kubelet-plugin:9.9.9"
    );
    // The pod-level extras: a node selector beside the affinity, labels, env, a volume.
    assert_eq!(pod["nodeSelector"], json!({"pool": "gpu"}));
    // kubeletPlugin.affinity joins nodeSelection's required node affinity, not replaces it.
    assert_eq!(
        pod["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"],
        10
    );
    assert_eq!(
        pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]["labelSelector"]
            ["matchLabels"]["app"],
        "legacy-device-plugin"
    );
    assert!(pod["affinity"].get("podAffinity").is_none(), "{pod}");
    assert_eq!(
        ds["spec"]["template"]["metadata"]["labels"]["team"],
        "ml-platform"
    );
    assert!(
        c["env"]
            .as_array()
            .is_some_and(|e| e.contains(&json!({"name": "EXTRA", "value": "1"}))),
        "{}",
        c["env"]
    );
    assert!(
        pod["volumes"]
            .as_array()
            .is_some_and(|v| v.contains(&json!({"name": "scratch", "emptyDir": {}}))),
        "{}",
        pod["volumes"]
    );
    assert!(
        c["volumeMounts"]
            .as_array()
            .is_some_and(|v| v.contains(&json!({"name": "scratch", "mountPath": "/scratch"}))),
        "{}",
        c["volumeMounts"]
    );
    let a = args(c);
    for want in [
        "--sharing-mode=fixed:8",
        "--cdi-mode=standalone",
        "--driver-root=/run/nvidia/driver",
        "--host-driver-root=/run/nvidia/driver",
        "--nvml-library=/run/nvidia/driver/usr/lib64/libnvidia-ml.so.1",
        "--context-overhead=600Mi",
        "--registrar-dir=/var/lib/k0s/kubelet/plugins_registry",
        "--plugin-dir=/var/lib/k0s/kubelet/plugins/gpu.tessera.dev",
    ] {
        assert!(a.iter().any(|x| x == want), "missing {want} in {a:?}");
    }
    // The GPU Operator's driver root is mounted at its own path: the CDI spec's paths are host paths.
    let mount = c["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "driver-root"))
        .expect("driver-root");
    assert_eq!(mount["mountPath"], "/run/nvidia/driver");
    assert_eq!(mount["mountPropagation"], "HostToContainer");
    assert!(c["command"].is_null(), "nvmlLibrary given: no search");
    // Metrics for authorised scrapers only, over TLS from the given Secret.
    for want in [
        "--metrics-auth=kubernetes",
        "--metrics-tls-cert-file=/etc/tessera/metrics-tls/tls.crt",
        "--metrics-tls-key-file=/etc/tessera/metrics-tls/tls.key",
    ] {
        assert!(a.iter().any(|x| x == want), "missing {want} in {a:?}");
    }
    assert_eq!(c["livenessProbe"]["httpGet"]["scheme"], "HTTPS");
    let tls_volume = pod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "metrics-tls"))
        .expect("metrics-tls volume");
    assert_eq!(tls_volume["secret"]["secretName"], "tessera-metrics-tls");
    assert_eq!(
        find(
            &objects,
            "ClusterRole",
            &format!("{RELEASE}-metrics-reader")
        )["rules"],
        json!([{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}])
    );
    let delegator = find(
        &objects,
        "ClusterRoleBinding",
        &format!("{PLUGIN}-auth-delegator"),
    );
    assert_eq!(delegator["roleRef"]["name"], "system:auth-delegator");
    assert_eq!(delegator["subjects"][0]["name"], PLUGIN);
    // replace: no second instance, no instance ID.
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"], 0);
    assert!(!c["env"].to_string().contains("POD_UID"));

    let deploy = find(&objects, "Deployment", CONTROLLER);
    assert_eq!(deploy["spec"]["replicas"], 3);
    assert!(
        args(&deploy["spec"]["template"]["spec"]["containers"][0])
            .contains(&"--leader-elect=false".to_string())
    );

    let class = find(&objects, "DeviceClass", "gpu.tessera.dev");
    assert_eq!(
        class["spec"]["config"][0]["opaque"]["parameters"]["corePolicy"],
        "force"
    );
    assert_eq!(
        class["spec"]["config"][0]["opaque"]["parameters"]["priority"],
        "low"
    );
    let extra = find(&objects, "DeviceClass", "l40s.example.com");
    assert_eq!(
        extra["spec"]["selectors"][0]["cel"]["expression"],
        r#"device.driver == "gpu.tessera.dev" && (device.attributes["gpu.tessera.dev"].productName == "NVIDIA L40S")"#
    );
    assert_eq!(
        extra["spec"]["config"][0]["opaque"]["parameters"]["priority"],
        "high"
    );
    // Extended resources: a pod's `resources.limits` maps to these classes.
    assert_eq!(extra["spec"]["extendedResourceName"], "example.com/l40s");
    assert_eq!(class["spec"]["extendedResourceName"], "gpu.tessera.dev/gpu");

    let pm = find(&objects, "PodMonitor", PLUGIN);
    assert_eq!(pm["metadata"]["labels"]["release"], "kube-prometheus-stack");
    let endpoint = &pm["spec"]["podMetricsEndpoints"][0];
    assert_eq!(
        (
            &endpoint["scheme"],
            &endpoint["tlsConfig"]["insecureSkipVerify"],
            &endpoint["authorization"]["credentials"]["name"]
        ),
        (&json!("https"), &json!(false), &json!("prometheus-token"))
    );
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["honorLabels"], true);
    assert_eq!(
        pm["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["targetLabel"],
        "node"
    );
    let sm = find(&objects, "ServiceMonitor", CONTROLLER);
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    let svc = find(&objects, "Service", CONTROLLER);
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"],
        svc["spec"]["selector"]
    );
}

/// Runs the container's start script (with `echo` for the plugin) over fake driver roots.
fn nvml_search_finds_the_library(container: &Value) {
    let command = container["command"].as_array().expect("command");
    assert_eq!(command[0], "/bin/sh");
    assert_eq!(command[1], "-c");
    let script = command[2].as_str().expect("script");
    assert!(
        script.contains("exec /usr/bin/tessera-kubelet-plugin \"$@\""),
        "{script}"
    );
    let script = script.replace("exec /usr/bin/tessera-kubelet-plugin", "echo");
    let run = |root: &std::path::Path| {
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&script)
            .arg("tessera-kubelet-plugin")
            .arg("--node-name=n")
            .env("TESSERA_DRIVER_ROOT", root)
            .output()
            .expect("sh");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let root = tempfile::tempdir().expect("tempdir");
    assert_eq!(
        run(root.path()),
        "--node-name=n",
        "no NVML: the plugin's own search"
    );
    for dir in ["usr/lib/x86_64-linux-gnu", "usr/lib64"] {
        std::fs::create_dir_all(root.path().join(dir)).expect("mkdir");
        std::fs::write(root.path().join(dir).join("libnvidia-ml.so.1"), b"").expect("lib");
    }
    // RHEL's lib64 is looked at first; Debian's multiarch directory when there is no lib64.
    assert_eq!(
        run(root.path()),
        format!(
            "--nvml-library={}/usr/lib64/libnvidia-ml.so.1 --node-name=n",
            root.path().display()
        )
    );
    std::fs::remove_dir_all(root.path().join("usr/lib64")).expect("rm");
    assert_eq!(
        run(root.path()),
        format!(
            "--nvml-library={}/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1 --node-name=n",
            root.path().display()
        )
    );
}

#[test]
fn controller_disabled_leaves_only_the_node_side() {
    let Some(helm) = helm("controller_disabled_leaves_only_the_node_side") else {
        return;
    };
    let objects = render(&helm, "controller: {enabled: false}\n", &newest());
    for o in &objects {
        assert!(
            !o["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .contains("controller"),
            "{}",
            o["metadata"]["name"]
        );
    }
    find(&objects, "DeviceClass", "gpu.tessera.dev");
}

#[test]
fn api_versions_follow_the_cluster() {
    let Some(helm) = helm("api_versions_follow_the_cluster") else {
        return;
    };
    let class_version = |caps: &Capabilities| {
        let objects = render(&helm, "", caps);
        let class = find(&objects, "DeviceClass", "gpu.tessera.dev");
        let ds = find(&objects, "DaemonSet", PLUGIN);
        (
            class["apiVersion"]
                .as_str()
                .expect("apiVersion")
                .to_string(),
            ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"].clone(),
        )
    };
    // Offline: from the Kubernetes version.
    for (kube, want, surge) in [
        ("v1.31.4", "resource.k8s.io/v1alpha3", 0),
        ("v1.32.0", "resource.k8s.io/v1beta1", 0),
        ("v1.33.2", "resource.k8s.io/v1beta1", 1),
        ("v1.34.0", "resource.k8s.io/v1", 1),
        ("v1.37.1", "resource.k8s.io/v1", 1),
    ] {
        assert_eq!(
            class_version(&Capabilities::offline(kube, &[])),
            (want.to_string(), json!(surge)),
            "{kube}"
        );
    }
    // What the cluster serves wins: a 1.33 cluster with v1beta2 switched on.
    assert_eq!(
        class_version(&Capabilities::offline(
            "v1.33.2",
            &[
                "resource.k8s.io/v1beta2",
                "resource.k8s.io/v1beta2/DeviceClass"
            ]
        ))
        .0,
        "resource.k8s.io/v1beta2"
    );
    // Monitors appear when the cluster serves the prometheus-operator API.
    let objects = render(
        &helm,
        "",
        &Capabilities::offline(
            "v1.37.1",
            &[
                "monitoring.coreos.com/v1",
                "monitoring.coreos.com/v1/ServiceMonitor",
            ],
        ),
    );
    find(&objects, "PodMonitor", PLUGIN);
    find(&objects, "ServiceMonitor", CONTROLLER);
    let objects = render(
        &helm,
        "monitoring: {enabled: false}\n",
        &Capabilities::offline(
            "v1.37.1",
            &[
                "monitoring.coreos.com/v1",
                "monitoring.coreos.com/v1/ServiceMonitor",
            ],
        ),
    );
    assert!(!kinds(&objects).contains(&"PodMonitor".to_string()));
    // No extendedResourceName by default; one asked for on a release without it is refused.
    let objects = render(&helm, "", &newest());
    assert!(
        find(&objects, "DeviceClass", "gpu.tessera.dev")["spec"]
            .get("extendedResourceName")
            .is_none()
    );
    let refused = helm
        .render(
            &tessera_chart_tests::Release::new(RELEASE, NAMESPACE)
                .values("deviceClass: {extendedResourceName: gpu.tessera.dev/gpu}\n"),
            &Capabilities::offline("v1.33.2", &[]),
        )
        .expect_err("extendedResourceName on 1.33");
    assert!(
        refused
            .to_string()
            .contains("extendedResourceName needs resource.k8s.io/v1"),
        "{refused}"
    );
}

#[test]
fn bad_values_are_refused_with_the_reason() {
    let Some(helm) = helm("bad_values_are_refused_with_the_reason") else {
        return;
    };
    let release = |values: &str| {
        helm.render(
            &tessera_chart_tests::Release::new(RELEASE, NAMESPACE).values(values),
            &newest(),
        )
    };
    for (values, reason) in [
        (
            "kubeletPlugin: {cdiMode: nvidia}\n",
            "kubeletPlugin.cdiMode must be",
        ),
        ("sharingMode: shared\n", "sharingMode must be"),
        ("sharingMode: \"fixed:x\"\n", "sharingMode must be"),
        (
            "kubeletPlugin: {cdiMode: standalone}\n",
            "cdiMode=standalone needs the driver",
        ),
        (
            "monitoring: {enabled: maybe}\n",
            "monitoring.enabled must be",
        ),
        (
            "kubeletPlugin: {rollingUpdate: fast}\n",
            "rollingUpdate must be",
        ),
        (
            "nodeSelection: {gpuOperator: false, nfd: false, manualLabel: false}\n",
            "selects no node",
        ),
        ("deviceClass: {extra: [{cel: x}]}\n", "needs a name"),
        // values.schema.json: a misspelt key fails instead of rendering with no effect.
        (
            "kubeletPlugin: {nodeSelecter: {pool: gpu}}\n",
            "additional properties 'nodeSelecter' not allowed",
        ),
        (
            "sharingMod: fixed\n",
            "additional properties 'sharingMod' not allowed",
        ),
        ("controller: {replicas: two}\n", "/controller/replicas"),
        ("defaults: {corePolicy: soft}\n", "corePolicy"),
        ("defaults: {priority: urgent}\n", "priority"),
        (
            "kubeletPlugin: {metricsAuth: tls}\n",
            "kubeletPlugin.metricsAuth must be none or kubernetes",
        ),
        (
            "kubeletPlugin: {image: {digest: \"sha256:abc\"}}\n",
            "/kubeletPlugin/image/digest",
        ),
        (
            "kubeletPlugin: {contextOverhead: 600MB}\n",
            "/kubeletPlugin/contextOverhead",
        ),
        // Which nodes run the plugin is nodeSelection's; a required node affinity would replace it.
        (
            "kubeletPlugin: {affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {}}}}\n",
            "additional properties 'requiredDuringSchedulingIgnoredDuringExecution' not allowed",
        ),
    ] {
        match release(values) {
            Ok(_) => panic!("{values:?} was accepted"),
            Err(e) => assert!(e.to_string().contains(reason), "{values:?}: {e}"),
        }
    }
}

/// Names, images and the controller's disruption budget as platform teams set them: a registry
/// mirror for every image, an image pinned by digest, fullnameOverride and nameOverride, the
/// plugin's own securityContext, and the budget's settings (none with one replica).
#[test]
fn names_images_security_context_and_disruption_budget() {
    let Some(helm) = helm("names_images_security_context_and_disruption_budget") else {
        return;
    };
    let image = |objects: &[Value], kind: &str, name: &str| {
        find(objects, kind, name)["spec"]["template"]["spec"]["containers"][0]["image"].clone()
    };
    let defaults = render(&helm, "", &newest());
    assert_eq!(
        image(&defaults, "DaemonSet", PLUGIN),
        "ghcr.io/tessera-gpu/tessera-kubelet-plugin:0.1.0"
    );
    assert_eq!(
        image(&defaults, "Deployment", CONTROLLER),
        "ghcr.io/tessera-gpu/tessera-controller:0.1.0"
    );
    assert_eq!(
        find(&defaults, "DaemonSet", PLUGIN)["spec"]["template"]["spec"]["containers"][0]["securityContext"],
        json!({ "privileged": true })
    );
    assert_eq!(
        find(&defaults, "PodDisruptionBudget", CONTROLLER)["spec"]["maxUnavailable"],
        1
    );

    let digest = format!("sha256:{}", "ab".repeat(32));
    let objects = render(
        &helm,
        &format!(
            "fullnameOverride: gpu-share\nglobal: {{imageRegistry: mirror.example.com/gpu}}\nkubeletPlugin:\n  image: {{digest: \"{digest}\"}}\n  securityContext: {{privileged: false, capabilities: {{add: [SYS_ADMIN]}}}}\ncontroller:\n  replicas: 3\n  podDisruptionBudget: {{maxUnavailable: \"50%\"}}\n"
        ),
        &newest(),
    );
    assert_eq!(
        image(&objects, "DaemonSet", "gpu-share-kubelet-plugin"),
        format!("mirror.example.com/gpu/tessera-kubelet-plugin@{digest}").as_str()
    );
    assert_eq!(
        image(&objects, "Deployment", "gpu-share-controller"),
        "mirror.example.com/gpu/tessera-controller:0.1.0"
    );
    assert_eq!(
        find(&objects, "DaemonSet", "gpu-share-kubelet-plugin")["spec"]["template"]["spec"]["containers"]
            [0]["securityContext"],
        json!({ "privileged": false, "capabilities": { "add": ["SYS_ADMIN"] } })
    );
    assert_eq!(
        find(&objects, "PodDisruptionBudget", "gpu-share-controller")["spec"]["maxUnavailable"],
        "50%"
    );
    for object in &objects {
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let cluster_wide_class = object["kind"] == "DeviceClass";
        assert!(
            cluster_wide_class || name.starts_with("gpu-share"),
            "{} {name} is not named after fullnameOverride",
            object["kind"]
        );
    }

    let objects = render(&helm, "nameOverride: gpu\n", &newest());
    find(&objects, "DaemonSet", "tessera-gpu-kubelet-plugin");
    let objects = render(&helm, "controller: {replicas: 1}\n", &newest());
    assert!(!kinds(&objects).contains(&"PodDisruptionBudget".to_string()));
    let objects = render(
        &helm,
        "controller: {podDisruptionBudget: {enabled: false}}\n",
        &newest(),
    );
    assert!(!kinds(&objects).contains(&"PodDisruptionBudget".to_string()));
}

/// Every metric the dashboard queries is one of the reference page's (docs/reference/metrics.md),
/// and the reference page lists what the code registers.
#[test]
fn dashboard_uses_real_metric_names() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let reference =
        std::fs::read_to_string(root.join("docs/reference/metrics.md")).expect("metrics.md");
    let documented: BTreeSet<String> = metric_names(&reference);
    assert!(documented.len() >= 15, "{documented:?}");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("charts/tessera/files/dashboard.json"))
            .expect("dashboard.json"),
    )
    .expect("the dashboard is JSON");
    let mut exprs = String::new();
    collect_exprs(&dashboard, &mut exprs);
    let used = metric_names(&exprs);
    assert!(used.len() >= 12, "{used:?}");
    for m in &used {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| m.strip_suffix(s))
            .filter(|b| documented.contains(*b))
            .unwrap_or(m);
        assert!(
            documented.contains(base),
            "the dashboard queries {m}, which docs/reference/metrics.md does not list"
        );
    }
    // The code registers exactly the documented names (without the prefix/suffix the client adds).
    let plugin = std::fs::read_to_string(root.join("kubelet-plugin/src/metrics.rs"))
        .expect("plugin metrics");
    let controller = std::fs::read_to_string(root.join("controller/src/cluster/metrics.rs"))
        .expect("controller metrics");
    for (name, suffix) in [
        ("prepare_duration", "_seconds"),
        ("prepared_claims", "_total"),
        ("prepare_errors", "_total"),
        ("prepare_refusals", "_total"),
        ("unprepared_claims", "_total"),
        ("unprepare_errors", "_total"),
        ("claims_prepared", ""),
        ("claim_memory_used", "_bytes"),
        ("claim_memory_limit", "_bytes"),
        ("claim_cores_limit", "_ratio"),
        ("claim_processes", ""),
        ("kubelet_health_streams", ""),
        ("gpu_healthy", ""),
        ("gpu_memory_physical", "_bytes"),
    ] {
        assert!(
            plugin.contains(&format!("\"{name}\"")),
            "plugin registers {name}"
        );
        assert!(
            documented.contains(&format!("tessera_{name}{suffix}")),
            "{name}{suffix}"
        );
    }
    for name in [
        "gpu_memory_capacity_bytes",
        "gpu_memory_allocated_bytes",
        "gpu_cores_allocated_ratio",
        "gpu_shares_allocated",
        "claim_memory_bytes",
        "claim_cores_ratio",
        "claim_devices",
        "controller_reconcile_duration_seconds",
    ] {
        assert!(
            controller.contains(&format!("\"{name}\"")),
            "controller registers {name}"
        );
        assert!(documented.contains(&format!("tessera_{name}")), "{name}");
    }
    assert!(controller.contains("\"controller_reconcile_errors\""));
    assert!(documented.contains("tessera_controller_reconcile_errors_total"));
}

fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("tessera_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        let before_ok =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if before_ok {
            out.insert(text[start..end].trim_end_matches('_').to_string());
        }
        i = end.max(start + 1);
    }
    out
}

fn collect_exprs(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if k == "expr" || k == "definition" {
                    if let Some(s) = v.as_str() {
                        out.push_str(s);
                        out.push('\n');
                    }
                } else {
                    collect_exprs(v, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// `helm lint --strict` (warnings are errors) with the default and the non-default values.
#[test]
fn lint_strict() {
    let Some(helm) = helm("lint_strict") else {
        return;
    };
    let values = tempfile::NamedTempFile::new().expect("values file");
    std::fs::write(values.path(), NON_DEFAULT).expect("values");
    for extra in [None, Some(values.path())] {
        let mut cmd = std::process::Command::new(helm.path());
        cmd.arg("lint")
            .arg("--strict")
            .arg(tessera_chart_tests::chart_dir())
            .arg("--namespace")
            .arg(NAMESPACE)
            .env("HELM_CACHE_HOME", std::env::temp_dir())
            .env("HELM_CONFIG_HOME", std::env::temp_dir())
            .env("HELM_DATA_HOME", std::env::temp_dir());
        if let Some(v) = extra {
            cmd.arg("--values").arg(v);
        }
        let out = cmd.output().expect("helm lint");
        assert!(
            out.status.success(),
            "helm lint --strict ({extra:?}):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
