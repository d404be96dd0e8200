//! Against the real kube-apiserver and kube-scheduler of each pinned version (e2e harness):
//! slices of every mode the version supports are accepted and read back intact, a re-sync is a
//! no-op, the cluster controller creates per-model DeviceClasses, and the real scheduler
//! allocates claims on our devices selected by per-model DeviceClass, by `productName` CEL and
//! by `uuid` CEL. The docs' ResourceClaimTemplate examples are applied so they cannot rot.

mod common;

use std::time::Duration;

use common::*;
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use tessera_controller::cluster::{self, model_class_name};
use tessera_controller::publish::Publisher;
use tessera_controller::slices::compare::same;
use tessera_controller::slices::{SliceMeta, build_pool, render_pool};
use tessera_controller::{ApiVersion, SharingMode};
use tessera_e2e_harness::ControlPlane;

const NODE: &str = "gpu-node-0";

fn resource(version: ApiVersion, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("resource.k8s.io", version.version(), kind),
        plural,
    )
}

/// Every mode publishes, reads back equal to what was sent, and re-syncs as a no-op.
async fn publish_every_mode(cp: &ControlPlane, version: ApiVersion, modes: &[SharingMode]) {
    let client = cp.client();
    let node = create_ready_node(&client, NODE).await;
    let uid = node.metadata.uid.expect("node uid");
    let publisher = Publisher::new(client.clone(), NODE, version);
    let server = tessera_controller::discovery::ServerDra::discover(&client)
        .await
        .expect("discovery");
    assert_eq!(server.version, version);
    let inventory = inventory();
    for &mode in modes {
        let plan = build_pool(&inventory, NODE, mode, server.counter_layout()).expect("plan");
        let report = publisher
            .sync(&plan)
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        assert!(
            report.dropped.is_empty(),
            "{mode:?} on {version:?}: dropped {:?}",
            report.dropped
        );
        assert!(report.changed());
        let existing = publisher.existing().await.expect("list");
        let sent = render_pool(
            &plan,
            version,
            &SliceMeta {
                generation: report.generation,
                node_uid: Some(&uid),
            },
        );
        assert_eq!(existing.len(), sent.len(), "{mode:?}: slice count");
        for s in &sent {
            let got = &existing[s["metadata"]["name"].as_str().expect("name")];
            assert!(
                same(&s["spec"], &got["spec"]),
                "{mode:?} read back differs:\nsent {}\ngot  {}",
                s["spec"],
                got["spec"]
            );
            assert_eq!(got["metadata"]["ownerReferences"][0]["uid"], uid.as_str());
        }
        let again = publisher.sync(&plan).await.expect("re-sync");
        assert!(
            !again.changed(),
            "{mode:?}: a second sync must not write: {again:?}"
        );
        assert_eq!(again.generation, report.generation);
        eprintln!(
            "{version:?} {mode:?}: {} slices, generation {}",
            sent.len(),
            report.generation
        );
    }
}

async fn create_claim(
    cp: &ControlPlane,
    version: ApiVersion,
    name: &str,
    class: &str,
    cel: Option<String>,
    capacity: Option<Value>,
) {
    let selectors: Value = cel
        .map(|e| json!([{ "cel": { "expression": e } }]))
        .unwrap_or(json!([]));
    let request = match version {
        ApiVersion::V1 | ApiVersion::V1beta2 => {
            let mut exactly = json!({ "deviceClassName": class, "selectors": selectors });
            if let Some(c) = capacity {
                exactly["capacity"] = json!({ "requests": c });
            }
            json!({ "name": "gpu", "exactly": exactly })
        }
        _ => json!({ "name": "gpu", "deviceClassName": class, "selectors": selectors }),
    };
    let claim = json!({ "apiVersion": version.api_version(), "kind": "ResourceClaim",
        "metadata": { "name": name, "namespace": "default" }, "spec": { "devices": { "requests": [request] } } });
    let api: Api<DynamicObject> = Api::namespaced_with(
        cp.client(),
        "default",
        &resource(version, "ResourceClaim", "resourceclaims"),
    );
    api.create(
        &PostParams::default(),
        &serde_json::from_value(claim).expect("claim"),
    )
    .await
    .unwrap_or_else(|e| panic!("claim {name}: {e}"));
}

/// Schedules a pod on `claim` and returns the allocated device.
async fn allocated_device(cp: &ControlPlane, version: ApiVersion, claim: &str) -> String {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(cp.client(), "default");
    pods.create(
        &PostParams::default(),
        &pod_with_claim(&format!("pod-{claim}"), claim),
    )
    .await
    .expect("pod");
    assert_eq!(
        wait_for_binding(cp, &format!("pod-{claim}"), Duration::from_secs(120)).await,
        NODE
    );
    let api: Api<DynamicObject> = Api::namespaced_with(
        cp.client(),
        "default",
        &resource(version, "ResourceClaim", "resourceclaims"),
    );
    let got = serde_json::to_value(api.get(claim).await.expect("claim")).expect("json");
    let result = &got["status"]["allocation"]["devices"]["results"][0];
    assert_eq!(result["driver"], "gpu.tessera.dev");
    assert_eq!(result["pool"], NODE);
    result["device"].as_str().expect("device").to_string()
}

/// DeviceClasses from the cluster controller, then claims by model class, productName, uuid.
/// `size`: a CEL condition added to every claim (partitioned mode: first fit would otherwise take
/// the whole GPU, and the second claim on it could not fit).
async fn classes_and_scheduling(
    cp: &ControlPlane,
    version: ApiVersion,
    consumable: bool,
    size: Option<&str>,
) {
    let client = cp.client();
    let (view, report) = cluster::reconcile(&client, version, true)
        .await
        .expect("reconcile");
    let report = report.expect("leading");
    let l40s = model_class_name("NVIDIA L40S").expect("name");
    assert!(
        report.created.contains(&"gpu.tessera.dev".to_string()) && report.created.contains(&l40s),
        "{report:?}"
    );
    assert_eq!(view.products.len(), 2);
    let (_, again) = cluster::reconcile(&client, version, true)
        .await
        .expect("reconcile");
    assert_eq!(
        again.expect("leading"),
        Default::default(),
        "second reconcile must not write"
    );

    let inv = inventory();
    let capacity = consumable.then(|| json!({ "memory": "8Gi", "cores": "25" }));
    let and_size = |cel: &str| match size {
        Some(s) => format!("({cel}) && ({s})"),
        None => cel.to_string(),
    };
    create_claim(
        cp,
        version,
        "by-model",
        &l40s,
        size.map(str::to_string),
        capacity.clone(),
    )
    .await;
    create_claim(
        cp,
        version,
        "by-product",
        "gpu.tessera.dev",
        Some(and_size(
            r#"device.attributes["gpu.tessera.dev"].productName == "NVIDIA GeForce RTX 4090""#,
        )),
        capacity.clone(),
    )
    .await;
    create_claim(
        cp,
        version,
        "by-uuid",
        "gpu.tessera.dev",
        Some(and_size(&format!(
            r#"device.attributes["gpu.tessera.dev"].uuid == "{}""#,
            inv.gpus[1].uuid
        ))),
        capacity,
    )
    .await;
    let on_gpu = |device: &str| {
        tessera_driver::DeviceName::parse(device)
            .expect("our name")
            .gpu_index()
    };
    assert_eq!(on_gpu(&allocated_device(cp, version, "by-model").await), 1);
    assert_eq!(
        on_gpu(&allocated_device(cp, version, "by-product").await),
        0
    );
    assert_eq!(on_gpu(&allocated_device(cp, version, "by-uuid").await), 1);

    let view = cluster::observe(&client, version).await.expect("observe");
    let l40s_gpu = view
        .gpus
        .values()
        .find(|g| g.product == "NVIDIA L40S")
        .expect("L40S");
    assert_eq!(l40s_gpu.shares, 2);
    if consumable {
        assert_eq!(
            (l40s_gpu.memory_allocated_bytes, l40s_gpu.cores_allocated),
            (16 << 30, 50)
        );
    }
    assert_eq!(view.claims.len(), 3);
}

/// Every folder of `docs/examples/` with a `claim-template.yaml`.
fn example_folders() -> Vec<String> {
    let dir = format!("{}/../docs/examples", env!("CARGO_MANIFEST_DIR"));
    let mut folders: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("claim-template.yaml").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    folders.sort();
    folders
}

/// The docs' ResourceClaimTemplate examples are accepted by the server.
async fn apply_examples(cp: &ControlPlane, modes: &[String]) {
    let api: Api<DynamicObject> = Api::namespaced_with(
        cp.client(),
        "default",
        &resource(
            ApiVersion::V1,
            "ResourceClaimTemplate",
            "resourceclaimtemplates",
        ),
    );
    for mode in modes {
        let path = format!(
            "{}/../docs/examples/{mode}/claim-template.yaml",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).expect("example");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(doc).expect("yaml");
            let obj: DynamicObject = serde_json::from_value(value).expect("object");
            api.create(&PostParams::default(), &obj)
                .await
                .unwrap_or_else(|e| panic!("{path}: {e}"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_37_every_mode_classes_and_scheduling() {
    let Some(c) = start(37, "v1_37_every_mode", &[]).await else {
        return;
    };
    let modes = [
        SharingMode::Partitioned,
        SharingMode::Fixed { slices: 4 },
        SharingMode::Exclusive,
        SharingMode::Consumable,
    ];
    publish_every_mode(&c.cp, ApiVersion::V1, &modes).await;
    classes_and_scheduling(&c.cp, ApiVersion::V1, true, None).await;
    let examples = example_folders();
    for expected in [
        "consumable",
        "partitioned",
        "fixed",
        "exclusive",
        "by-model",
        "by-uuid",
    ] {
        assert!(
            examples.iter().any(|e| e == expected),
            "{expected} missing: {examples:?}"
        );
    }
    apply_examples(&c.cp, &examples).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_37_partitioned_scheduling() {
    let Some(c) = start(37, "v1_37_partitioned", &[]).await else {
        return;
    };
    publish_every_mode(&c.cp, ApiVersion::V1, &[SharingMode::Partitioned]).await;
    classes_and_scheduling(
        &c.cp,
        ApiVersion::V1,
        false,
        Some(r#"device.capacity["gpu.tessera.dev"].cores == quantity("25")"#),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_31_fixed_and_exclusive_classes_and_scheduling() {
    let Some(c) = start(31, "v1_31_every_mode", &[]).await else {
        return;
    };
    publish_every_mode(
        &c.cp,
        ApiVersion::V1alpha3,
        &[SharingMode::Exclusive, SharingMode::Fixed { slices: 4 }],
    )
    .await;
    classes_and_scheduling(&c.cp, ApiVersion::V1alpha3, false, None).await;
}
