//! Pods bound to this node, one task each, from claims to containers to a final phase.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::{Value, json};
use tokio::sync::{Mutex, watch};

use crate::checkpoint::Checkpoint;
use crate::claims::{self, PodClaim, Resolution, ResourceApi};
use crate::container::{self, Podman};
use crate::events::{self, Kind};
use crate::plugin::{self, ClaimRef};

/// A test (and the demo) can hold a pod between prepare and container start, to restart the
/// plugin in that window: the stand-in waits while the pod has this annotation.
pub const HOLD_BEFORE_START: &str = "e2e.tessera.dev/hold-before-start";
const RETRY: Duration = Duration::from_secs(1);
const STOP_GRACE_SECONDS: u32 = 2;

pub struct Context {
    pub client: kube::Client,
    pub node: String,
    pub container_prefix: String,
    pub state_dir: PathBuf,
    pub resource_api: ResourceApi,
    pub plugins: plugin::Watcher,
    pub checkpoint: Mutex<Checkpoint>,
    pub runtime: Podman,
}

struct Worker {
    pod: watch::Sender<Option<Pod>>,
    task: tokio::task::JoinHandle<()>,
}

/// Watches the node's pods until the watch ends (it retries with backoff, so: forever).
pub async fn run(context: Arc<Context>) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::all(context.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", context.node));
    let mut stream = watcher::watcher(pods, config).default_backoff().boxed();
    let mut workers: HashMap<String, Worker> = HashMap::new();
    let mut listed: Option<HashSet<String>> = None;
    let mut reconciled = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => listed = Some(HashSet::new()),
            Ok(Event::InitApply(pod)) => {
                if let (Some(seen), Some(uid)) = (listed.as_mut(), pod.metadata.uid.clone()) {
                    seen.insert(uid);
                }
                apply(&context, &mut workers, pod);
            }
            Ok(Event::InitDone) => {
                let seen = listed.take().unwrap_or_default();
                for (uid, worker) in &workers {
                    if !seen.contains(uid) {
                        worker.pod.send_replace(None);
                    }
                }
                if !reconciled {
                    reconciled = true;
                    tokio::spawn(unprepare_orphans(context.clone(), seen));
                }
            }
            Ok(Event::Apply(pod)) => apply(&context, &mut workers, pod),
            Ok(Event::Delete(pod)) => {
                if let Some(worker) = pod.metadata.uid.as_ref().and_then(|uid| workers.get(uid)) {
                    worker.pod.send_replace(None);
                }
            }
            Err(e) => tracing::warn!("watching pods: {e}"),
        }
        workers.retain(|_, w| !w.task.is_finished());
    }
    Ok(())
}

fn apply(context: &Arc<Context>, workers: &mut HashMap<String, Worker>, pod: Pod) {
    let Some(uid) = pod.metadata.uid.clone() else {
        return;
    };
    if let Some(worker) = workers.get(&uid)
        && !worker.task.is_finished()
    {
        worker.pod.send_replace(Some(pod));
        return;
    }
    let (tx, rx) = watch::channel(Some(pod.clone()));
    let task = tokio::spawn(pod_worker(context.clone(), pod, rx));
    workers.insert(uid, Worker { pod: tx, task });
}

/// After a restart: claims in the checkpoint whose pods are all gone are unprepared, as the
/// kubelet does from its own checkpoint. The claim objects may be gone too; the plugin needs
/// only the UID.
async fn unprepare_orphans(context: Arc<Context>, live_pods: HashSet<String>) {
    let orphans: Vec<ClaimRef> = {
        let mut checkpoint = context.checkpoint.lock().await;
        let mut orphans = Vec::new();
        let entries: Vec<(String, Vec<String>, ClaimRef)> = checkpoint
            .claims()
            .map(|(uid, c)| (uid.clone(), c.pods.clone(), c.claim_ref(uid)))
            .collect();
        for (uid, pods, claim) in entries {
            let mut unused = pods.is_empty();
            for pod in pods.iter().filter(|p| !live_pods.contains(*p)) {
                match checkpoint.release(&uid, pod) {
                    Ok(now_unused) => unused = now_unused,
                    Err(e) => tracing::error!("updating the checkpoint: {e:#}"),
                }
            }
            if unused {
                orphans.push(claim);
            }
        }
        orphans
    };
    for claim in orphans {
        tracing::info!(claim = %claim.name, uid = %claim.uid, "unpreparing a claim whose pods are gone");
        unprepare_until_done(&context, &claim, None).await;
    }
}

/// Retries until the plugin unprepares the claim (it may be restarting); then forgets it.
async fn unprepare_until_done(context: &Context, claim: &ClaimRef, pod: Option<&Pod>) {
    let mut reported = false;
    loop {
        match context.plugins.unprepare(claim).await {
            Ok(()) => {
                tracing::info!(claim = %claim.name, uid = %claim.uid, "unprepared");
                if let Err(e) = context.checkpoint.lock().await.remove(&claim.uid) {
                    tracing::error!("updating the checkpoint: {e:#}");
                }
                return;
            }
            Err(e) => {
                if !reported {
                    tracing::warn!(claim = %claim.name, uid = %claim.uid, "unprepare failed, retrying: {e}");
                    if let Some(pod) = pod {
                        let message = format!("claim {}/{}: {e}", claim.namespace, claim.name);
                        events::record(
                            &context.client,
                            &context.node,
                            pod,
                            Kind::Warning,
                            "FailedUnprepareDynamicResources",
                            &message,
                        )
                        .await;
                    }
                    reported = true;
                }
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

fn pod_label(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("?")
    )
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

fn deleting(pod: &Option<Pod>) -> bool {
    pod.as_ref()
        .is_none_or(|p| p.metadata.deletion_timestamp.is_some())
}

/// The outcome of waiting for something while the pod may be deleted.
enum Wait<T> {
    Done(T),
    Deleted,
}

struct PodTask {
    context: Arc<Context>,
    pod: Pod,
    updates: watch::Receiver<Option<Pod>>,
    uid: String,
    label: String,
    /// Every container's last status: the pod's `containerStatuses` has no merge key, so each
    /// update sends the whole list.
    statuses: Vec<Value>,
}

async fn pod_worker(context: Arc<Context>, pod: Pod, updates: watch::Receiver<Option<Pod>>) {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let label = pod_label(&pod);
    let mut task = PodTask {
        context,
        pod,
        updates,
        uid,
        label,
        statuses: Vec::new(),
    };
    if let Err(e) = task.run().await {
        tracing::error!(pod = %task.label, "{e:#}");
    }
}

impl PodTask {
    /// The newest view of the pod; `Deleted` once it is being deleted or gone.
    fn refresh(&mut self) -> Wait<()> {
        let latest = self.updates.borrow_and_update().clone();
        if deleting(&latest) {
            if let Some(pod) = latest {
                self.pod = pod;
            }
            return Wait::Deleted;
        }
        if let Some(pod) = latest {
            self.pod = pod;
        }
        Wait::Done(())
    }

    /// Sleeps up to `period`, waking early on a pod update.
    async fn pause(&mut self, period: Duration) {
        let _ = tokio::time::timeout(period, self.updates.changed()).await;
    }

    async fn run(&mut self) -> anyhow::Result<()> {
        if let Wait::Deleted = self.refresh() {
            return self.finish_deletion().await;
        }
        match phase(&self.pod) {
            "Succeeded" | "Failed" => {
                self.release_claims().await;
            }
            "Running" => {
                // A pod this stand-in ran before it restarted: its containers were stopped with
                // it, and are not re-attached.
                self.fail_lost_pod().await?;
                self.release_claims().await;
            }
            _ => {
                if let Wait::Deleted = self.start_and_run().await? {
                    self.release_claims().await;
                    return self.finish_deletion().await;
                }
                self.release_claims().await;
            }
        }
        loop {
            if let Wait::Deleted = self.refresh() {
                return self.finish_deletion().await;
            }
            if self.updates.changed().await.is_err() {
                return Ok(());
            }
        }
    }

    async fn start_and_run(&mut self) -> anyhow::Result<Wait<()>> {
        let ctx = self.context.clone();
        tracing::info!(pod = %self.label, "pod bound to this node");
        if let Some(policy) = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref())
            && policy != "Never"
        {
            tracing::warn!(pod = %self.label, "restartPolicy {policy} is not simulated: containers run once");
        }

        // 1. The claims, allocated and reserved for the pod.
        let mut last_reason = String::new();
        let claims = loop {
            if let Wait::Deleted = self.refresh() {
                return Ok(Wait::Deleted);
            }
            match claims::resolve(&ctx.client, &ctx.resource_api, &self.pod).await {
                Ok(Resolution::Ready(claims)) => break claims,
                Ok(Resolution::Waiting(reason)) => {
                    if reason != last_reason {
                        self.patch_status(waiting_status(&self.pod, "ContainerCreating", &reason))
                            .await;
                        last_reason = reason;
                    }
                }
                Err(e) => tracing::warn!(pod = %self.label, "{e:#}"),
            }
            self.pause(RETRY).await;
        };

        // 2. Prepared by the plugin (retried: the plugin may be starting or restarting).
        for claim in &claims {
            // Recorded before the call, as the kubelet does: if this process dies while the
            // plugin prepares, the restarted stand-in still knows to unprepare the claim.
            ctx.checkpoint
                .lock()
                .await
                .reserve(&claim.claim, &self.uid)?;
            let mut reported = String::new();
            loop {
                if let Wait::Deleted = self.refresh() {
                    return Ok(Wait::Deleted);
                }
                match ctx.plugins.prepare(&claim.claim).await {
                    Ok(devices) => {
                        let ids: Vec<&str> = devices
                            .iter()
                            .flat_map(|d| d.cdi_device_ids.iter().map(String::as_str))
                            .collect();
                        tracing::info!(pod = %self.label, claim = %claim.claim.name, cdi = ?ids, "claim prepared");
                        ctx.checkpoint
                            .lock()
                            .await
                            .add(&claim.claim, &self.uid, devices)?;
                        break;
                    }
                    Err(e) => {
                        let message = format!("claim {}: {e}", claim.claim.name);
                        if message != reported {
                            tracing::warn!(pod = %self.label, "{message}");
                            events::record(
                                &ctx.client,
                                &ctx.node,
                                &self.pod,
                                Kind::Warning,
                                "FailedPrepareDynamicResources",
                                &message,
                            )
                            .await;
                            self.patch_status(waiting_status(
                                &self.pod,
                                "ContainerCreating",
                                &message,
                            ))
                            .await;
                            reported = message;
                        }
                        self.pause(RETRY).await;
                    }
                }
            }
        }
        let names: Vec<&str> = claims.iter().map(|c| c.claim.name.as_str()).collect();
        if !names.is_empty() {
            let message = format!("prepared ResourceClaims {}", names.join(", "));
            events::record(
                &ctx.client,
                &ctx.node,
                &self.pod,
                Kind::Normal,
                "PreparedDynamicResources",
                &message,
            )
            .await;
        }

        // 3. The hold, for tests that act between prepare and start.
        loop {
            if let Wait::Deleted = self.refresh() {
                return Ok(Wait::Deleted);
            }
            let held = self
                .pod
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(HOLD_BEFORE_START));
            if !held {
                break;
            }
            self.pause(RETRY).await;
        }

        // 4. The containers.
        let specs = self.container_specs(&claims).await?;
        let started_at = Timestamp::now().to_string();
        let mut running = Vec::new();
        let mut failed_to_start = Vec::new();
        for (container, spec) in &specs {
            match spec {
                Ok(spec) => match ctx.runtime.start(spec).await {
                    Ok(child) => running.push((container.clone(), spec.name.clone(), child)),
                    Err(e) => failed_to_start.push((container.clone(), format!("{e:#}"))),
                },
                Err(message) => failed_to_start.push((container.clone(), message.clone())),
            }
        }
        let running_names: Vec<String> = running.iter().map(|(c, _, _)| c.clone()).collect();
        self.patch_status(running_status(&running_names, &started_at))
            .await;
        for (container, message) in &failed_to_start {
            tracing::error!(pod = %self.label, container, "cannot start: {message}");
            events::record(
                &ctx.client,
                &ctx.node,
                &self.pod,
                Kind::Warning,
                "Failed",
                &format!("container {container}: {message}"),
            )
            .await;
            self.patch_status(terminated_status(
                container,
                128,
                "StartError",
                message,
                &started_at,
            ))
            .await;
        }
        for container in &running_names {
            events::record(
                &ctx.client,
                &ctx.node,
                &self.pod,
                Kind::Normal,
                "Started",
                &format!("Started container {container}"),
            )
            .await;
        }

        // 5. Until they exit, or the pod is deleted.
        let mut codes: Vec<i32> = failed_to_start.iter().map(|_| 128).collect();
        let mut waits = futures::stream::FuturesUnordered::new();
        for (container, name, mut child) in running {
            waits.push(async move {
                let status = child.wait().await;
                (container, name, status)
            });
        }
        let mut deleted = false;
        while !waits.is_empty() {
            tokio::select! {
                Some((container, _name, status)) = waits.next() => {
                    let code = match status {
                        Ok(status) => status.code().unwrap_or(137),
                        Err(e) => {
                            tracing::error!(pod = %self.label, container, "waiting for podman: {e}");
                            128
                        }
                    };
                    codes.push(code);
                    tracing::info!(pod = %self.label, container, code, "container exited");
                    let reason = container::exit_reason(code);
                    let message = if code == 0 { String::new() } else { format!("exit code {code}") };
                    self.patch_status(terminated_status(&container, code, reason, &message, &started_at)).await;
                }
                changed = self.updates.changed(), if !deleted => {
                    if changed.is_err() || deleting(&self.updates.borrow().clone()) {
                        deleted = true;
                        for (container, spec) in &specs {
                            if let Ok(spec) = spec {
                                tracing::info!(pod = %self.label, container, "stopping: the pod is being deleted");
                                ctx.runtime.stop(&spec.name, STOP_GRACE_SECONDS).await;
                            }
                        }
                    }
                }
            }
        }
        if deleted {
            return Ok(Wait::Deleted);
        }
        let phase = if codes.iter().all(|c| *c == 0) {
            "Succeeded"
        } else {
            "Failed"
        };
        self.patch_status(json!({ "status": {
            "phase": phase,
            "conditions": [
                { "type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": Timestamp::now().to_string() },
                { "type": "ContainersReady", "status": "False", "reason": "PodCompleted", "lastTransitionTime": Timestamp::now().to_string() },
            ],
        }}))
        .await;
        tracing::info!(pod = %self.label, phase, "pod finished");
        Ok(Wait::Done(()))
    }

    /// What podman needs for each container, or why it cannot run.
    async fn container_specs(
        &self,
        claims: &[PodClaim],
    ) -> anyhow::Result<Vec<(String, Result<container::Spec, String>)>> {
        let ctx = &self.context;
        let spec = self.pod.spec.clone().unwrap_or_default();
        let pod_dir = ctx.state_dir.join("pods").join(format!(
            "{}_{}_{}",
            self.pod.metadata.namespace.as_deref().unwrap_or("default"),
            self.pod.metadata.name.as_deref().unwrap_or("pod"),
            self.uid
        ));
        std::fs::create_dir_all(&pod_dir)
            .with_context(|| format!("creating {}", pod_dir.display()))?;
        let checkpoint = ctx.checkpoint.lock().await;
        let mut specs = Vec::new();
        for container in &spec.containers {
            let result = (|| {
                let command: Vec<String> = container
                    .command
                    .iter()
                    .flatten()
                    .chain(container.args.iter().flatten())
                    .cloned()
                    .collect();
                if command.is_empty() {
                    return Err("no command: images are not pulled, so the container must name a program on the host".to_string());
                }
                let mut cdi_devices = Vec::new();
                for reference in container
                    .resources
                    .as_ref()
                    .and_then(|r| r.claims.as_ref())
                    .into_iter()
                    .flatten()
                {
                    let Some(claim) = claims.iter().find(|c| c.pod_claim_name == reference.name)
                    else {
                        // A claim without devices of ours (or another driver's): nothing to add.
                        continue;
                    };
                    let Some(prepared) = checkpoint.get(&claim.claim.uid) else {
                        return Err(format!("claim {} was not prepared", claim.claim.name));
                    };
                    for device in &prepared.devices {
                        let wanted = match &reference.request {
                            Some(request) => device.request_names.iter().any(|r| r == request),
                            None => true,
                        };
                        if wanted {
                            cdi_devices.extend(device.cdi_device_ids.iter().cloned());
                        }
                    }
                }
                let mut mounts = Vec::new();
                for mount in container.volume_mounts.iter().flatten() {
                    let volume = spec.volumes.iter().flatten().find(|v| v.name == mount.name);
                    match volume {
                        Some(v) if v.empty_dir.is_some() => {
                            let host = pod_dir.join("volumes").join(&v.name);
                            std::fs::create_dir_all(&host)
                                .map_err(|e| format!("creating {}: {e}", host.display()))?;
                            mounts.push((host, mount.mount_path.clone()));
                        }
                        Some(v) if v.host_path.is_some() => {
                            let path = v
                                .host_path
                                .as_ref()
                                .map(|h| h.path.clone())
                                .unwrap_or_default();
                            mounts.push((PathBuf::from(path), mount.mount_path.clone()));
                        }
                        // The service-account token volume every pod gets, and other kinds: not simulated.
                        _ => {
                            tracing::debug!(pod = %self.label, volume = %mount.name, "volume kind not simulated; not mounted")
                        }
                    }
                }
                Ok(container::Spec {
                    name: self.container_name(&container.name),
                    command,
                    env: container_env(&self.pod, container, &ctx.node),
                    cdi_devices,
                    mounts,
                    working_dir: container.working_dir.clone(),
                    log: pod_dir.join(format!("{}.log", container.name)),
                })
            })();
            specs.push((container.name.clone(), result));
        }
        Ok(specs)
    }

    /// Unique on the host, and the same after a restart of the stand-in.
    fn container_name(&self, container: &str) -> String {
        format!(
            "{}-{}-{container}",
            self.context.container_prefix,
            &self.uid[..self.uid.len().min(8)]
        )
    }

    async fn fail_lost_pod(&mut self) -> anyhow::Result<()> {
        let message =
            "the kubelet stand-in restarted while the pod ran; its containers were stopped";
        tracing::warn!(pod = %self.label, "{message}");
        let names: Vec<String> = self
            .pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter().map(|c| c.name.clone()))
            .collect();
        let now = Timestamp::now().to_string();
        for name in &names {
            // podman's conmon may have kept the container running without us: stop it before
            // its claims are unprepared.
            let container = self.container_name(name);
            self.context
                .runtime
                .stop(&container, STOP_GRACE_SECONDS)
                .await;
            self.patch_status(terminated_status(
                name,
                137,
                "ContainerStatusUnknown",
                message,
                &now,
            ))
            .await;
        }
        self.patch_status(json!({ "status": { "phase": "Failed", "reason": "NodeRestarted", "message": message } })).await;
        Ok(())
    }

    /// Unprepares each of the pod's claims that no other pod on the node still uses.
    async fn release_claims(&mut self) {
        let ctx = self.context.clone();
        let unused: Vec<ClaimRef> = {
            let mut checkpoint = ctx.checkpoint.lock().await;
            let mine: Vec<(String, ClaimRef)> = checkpoint
                .claims()
                .filter(|(_, c)| c.pods.contains(&self.uid))
                .map(|(uid, c)| (uid.clone(), c.claim_ref(uid)))
                .collect();
            let mut unused = Vec::new();
            for (uid, claim) in mine {
                match checkpoint.release(&uid, &self.uid) {
                    Ok(true) => unused.push(claim),
                    Ok(false) => {}
                    Err(e) => tracing::error!(pod = %self.label, "updating the checkpoint: {e:#}"),
                }
            }
            unused
        };
        for claim in unused {
            unprepare_until_done(&ctx, &claim, Some(&self.pod)).await;
        }
    }

    /// The kubelet's last word on a deleted pod: remove the object (grace period 0).
    async fn finish_deletion(&mut self) -> anyhow::Result<()> {
        self.release_claims().await;
        let Some(namespace) = self.pod.metadata.namespace.clone() else {
            return Ok(());
        };
        let Some(name) = self.pod.metadata.name.clone() else {
            return Ok(());
        };
        let pods: Api<Pod> = Api::namespaced(self.context.client.clone(), &namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match pods.delete(&name, &params).await {
            Ok(_) => tracing::info!(pod = %self.label, "pod removed"),
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
            Err(e) => tracing::warn!(pod = %self.label, "removing the pod: {e}"),
        }
        Ok(())
    }

    async fn patch_status(&mut self, mut status: Value) {
        if let Some(updates) = status
            .pointer_mut("/status/containerStatuses")
            .and_then(Value::as_array_mut)
        {
            for update in updates.drain(..) {
                let name = update["name"].clone();
                let image = self
                    .pod
                    .spec
                    .iter()
                    .flat_map(|s| s.containers.iter())
                    .find(|c| Some(c.name.as_str()) == name.as_str())
                    .and_then(|c| c.image.clone())
                    .unwrap_or_default();
                let mut update = update;
                update["image"] = json!(image);
                match self.statuses.iter_mut().find(|s| s["name"] == name) {
                    Some(entry) => *entry = update,
                    None => self.statuses.push(update),
                }
            }
            *updates = self.statuses.clone();
        }
        let Some(namespace) = self.pod.metadata.namespace.clone() else {
            return;
        };
        let Some(name) = self.pod.metadata.name.clone() else {
            return;
        };
        let pods: Api<Pod> = Api::namespaced(self.context.client.clone(), &namespace);
        if let Err(e) = pods
            .patch_status(&name, &PatchParams::default(), &Patch::Strategic(status))
            .await
        {
            tracing::warn!(pod = %self.label, "updating the pod's status: {e}");
        }
    }
}

fn container_env(pod: &Pod, container: &Container, node: &str) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for var in container.env.iter().flatten() {
        if let Some(value) = &var.value {
            env.push((var.name.clone(), value.clone()));
            continue;
        }
        let field = var
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        let value = match field {
            Some("metadata.name") => pod.metadata.name.clone(),
            Some("metadata.namespace") => pod.metadata.namespace.clone(),
            Some("metadata.uid") => pod.metadata.uid.clone(),
            Some("spec.nodeName") => Some(node.to_owned()),
            _ => None,
        };
        match value {
            Some(value) => env.push((var.name.clone(), value)),
            None => tracing::debug!(variable = %var.name, "environment source not simulated"),
        }
    }
    env
}

fn waiting_status(pod: &Pod, reason: &str, message: &str) -> Value {
    let containers: Vec<Value> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .map(|c| {
            json!({
                "name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "",
                "ready": false, "restartCount": 0, "started": false,
                "state": { "waiting": { "reason": reason, "message": message } },
            })
        })
        .collect();
    json!({ "status": { "phase": "Pending", "hostIP": "127.0.0.1", "containerStatuses": containers } })
}

fn running_status(containers: &[String], started_at: &str) -> Value {
    let statuses: Vec<Value> = containers
        .iter()
        .map(|name| {
            json!({
                "name": name, "ready": true, "restartCount": 0, "started": true, "imageID": "",
                "containerID": format!("podman://{name}"),
                "state": { "running": { "startedAt": started_at } },
            })
        })
        .collect();
    let condition =
        |kind: &str| json!({ "type": kind, "status": "True", "lastTransitionTime": started_at });
    json!({ "status": {
        "phase": "Running", "hostIP": "127.0.0.1", "startTime": started_at,
        "conditions": [condition("Initialized"), condition("ContainersReady"), condition("Ready")],
        "containerStatuses": statuses,
    }})
}

fn terminated_status(
    container: &str,
    code: i32,
    reason: &str,
    message: &str,
    started_at: &str,
) -> Value {
    json!({ "status": { "containerStatuses": [{
        "name": container, "ready": false, "restartCount": 0, "started": false, "imageID": "",
        "state": { "terminated": {
            "exitCode": code, "reason": reason, "message": message,
            "startedAt": started_at, "finishedAt": Timestamp::now().to_string(),
        }},
    }]}})
}
