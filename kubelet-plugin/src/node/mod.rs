//! Prepare and unprepare: the node half of DRA, independent of the gRPC version it arrives in.
//!
//! Every call reads the claims from the API server first (without the lock, as the upstream
//! helper does), then takes the cross-instance lock, reloads the checkpoint and works from disk
//! alone, so two plugin instances behave as one. A batch is recorded `PrepareStarted` in one
//! checkpoint write before any of its files is written and `PrepareCompleted` in one write
//! after, so a restart between any two steps is recoverable: see `tessera_driver::checkpoint`.
//! Nothing is fsynced: every write is atomic against a crash of the plugin, and a power cut
//! means a reboot, after which every claim is prepared afresh (see `Checkpoint::load_since_boot`).

mod card_room;
pub mod health;
pub mod metadata;
mod plan;
mod priority_grant;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tessera_driver::cdi::{CdiMode, DriverFiles};
use tessera_driver::checkpoint::{self, Checkpoint, ClaimState, PreparedClaim, PreparedDevice};
use tessera_driver::{Inventory, claim_files, fsutil};

pub use crate::claims::ClaimRef;
use crate::claims::status::{DeviceStatus, StatusWriter};
use crate::claims::{self, ClaimReader};
use crate::lock;
use crate::metrics::Metrics;
pub use plan::{CardShare, Plan, PlanError, check_uid};
use priority_grant::PriorityGrants;

/// How long a claim held back for card room (see [`card_room`]) stays reserved without the
/// kubelet asking again: the kubelet retries a failed preparation within a few minutes while
/// the pod exists, and a claim nobody asks for any more must stop holding the card.
const WAITING_EXPIRY: std::time::Duration = std::time::Duration::from_secs(600);

/// A claim held back until the card has its share, counted as reserved meanwhile.
#[derive(Debug)]
struct Waiting {
    asked_at: Instant,
    shares: Vec<CardShare>,
}

/// What prepare and unprepare need to know about the node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_name: String,
    pub plugin_dir: PathBuf,
    pub cdi_dir: PathBuf,
    pub state_dir: PathBuf,
    pub cdi_mode: CdiMode,
    /// Device nodes and libraries for `--cdi-mode=standalone`.
    pub driver_files: Option<DriverFiles>,
    pub inventory: Inventory,
    /// The node's memory overcommit (`--memory-overcommit`): shares are cut from the offered
    /// memory, as the node's slices publish them.
    pub memory_overcommit: tessera_driver::MemoryOvercommit,
    /// The node's spill policy (`--oversubscribe-by-default`): what a claim whose GpuConfig does
    /// not set `oversubscribe` gets.
    pub oversubscribe_by_default: bool,
    /// This boot's `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
    /// When this boot began (`btime` of `/proc/stat`).
    pub booted_at: SystemTime,
    /// The driver's own memory wall on the GPUs that have it (`--driver-memory-wall`).
    pub driver_wall: Option<crate::driver_wall::NodeDriverWall>,
}

impl NodeConfig {
    pub fn checkpoint_path(&self) -> PathBuf {
        self.state_dir.join("checkpoint.json")
    }

    /// The checkpoint; one torn by a power cut before this boot is started afresh.
    fn load_checkpoint(&self) -> Result<Checkpoint, CallError> {
        let (checkpoint, discarded) =
            Checkpoint::load_since_boot(&self.checkpoint_path(), self.booted_at)?;
        if discarded {
            tracing::warn!(path = %self.checkpoint_path().display(), "checkpoint from before this boot is unreadable; starting afresh");
        }
        Ok(checkpoint)
    }
}

/// The devices of a prepared claim, or why it could not be prepared.
pub type PreparedClaimResult = Result<Vec<PreparedDevice>, String>;

/// Why a claim was refused, as opposed to failing: what it asks for cannot be prepared here as
/// things stand, and the kubelet's retries get the same answer until something changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Its allocation or opaque config cannot be prepared (a bad GpuConfig, a device this node
    /// does not have).
    Invalid,
    /// It asks for high priority without the admin's grant.
    Priority,
    /// It may not spill and its share is not free on an overcommitted card yet.
    CardRoom,
}

impl Refusal {
    /// Its `reason` label in `tessera_prepare_refusals_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Invalid => "invalid",
            Refusal::Priority => "priority",
            Refusal::CardRoom => "card_room",
        }
    }
}

/// The points between the steps of a call, where tests simulate a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The batch is recorded `PrepareStarted`.
    Started,
    ConfigWritten,
    RegionWritten,
    SpecWritten,
    /// The batch is recorded `PrepareCompleted`.
    Completed,
    SpecRemoved,
    ClaimDirRemoved,
}

/// Called after each [`Step`] with the claim's UID; returning true stops the call right there,
/// as a crash would (tests only).
pub type FaultHook = Arc<dyn Fn(Step, &str) -> bool + Send + Sync>;

/// A failure of a whole call (the kubelet retries the call).
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("taking the plugin lock: {0}")]
    Lock(#[source] std::io::Error),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::Error),
    #[error("simulated crash after {0:?}")]
    Crashed(Step),
}

/// A claim read for preparation, with the reason it may not be prepared afresh, if any.
struct Fetched {
    claim: claims::Claim,
    refusal: Option<String>,
}

/// Prepares and unprepares claims.
pub struct Node {
    config: NodeConfig,
    reader: Arc<ClaimReader>,
    grants: PriorityGrants,
    /// Says in each prepared claim's `status.devices` what it got (`claims::status`).
    status: StatusWriter,
    metrics: Arc<Metrics>,
    fault: Option<FaultHook>,
    /// Claims that may not spill, held back until an overcommitted card has their share.
    waiting: std::sync::Mutex<BTreeMap<String, Waiting>>,
    /// Marked after every call that may have changed what is prepared, so the health stream
    /// reports a newly prepared device at once ([`Node::prepared_changes`]).
    prepared: tokio::sync::watch::Sender<()>,
}

impl Node {
    /// Must be called in a Tokio runtime: it starts the task that writes claims' status.
    pub fn new(config: NodeConfig, client: kube::Client, metrics: Arc<Metrics>) -> Node {
        let reader = Arc::new(ClaimReader::new(client.clone()));
        let (status, _task) = StatusWriter::start(client.clone(), reader.clone(), metrics.clone());
        Node {
            config,
            reader,
            status,
            grants: PriorityGrants::new(client),
            metrics,
            fault: None,
            waiting: Default::default(),
            prepared: tokio::sync::watch::Sender::new(()),
        }
    }

    /// Changes each time a prepare or unprepare call of this instance has ended.
    pub fn prepared_changes(&self) -> tokio::sync::watch::Receiver<()> {
        self.prepared.subscribe()
    }

    /// The devices of every claim prepared on the node since this boot, read from the
    /// checkpoint (which every instance on the node shares).
    pub fn prepared_devices(&self) -> Result<Vec<PreparedDevice>, CallError> {
        let checkpoint = self.config.load_checkpoint()?;
        Ok(checkpoint
            .claims
            .keys()
            .filter_map(|uid| checkpoint.completed(uid, &self.config.boot_id))
            .flat_map(|claim| claim.devices.iter().cloned())
            .collect())
    }

    /// Installs a fault hook (tests).
    pub fn with_fault_hook(mut self, hook: FaultHook) -> Node {
        self.fault = Some(hook);
        self
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn step(&self, step: Step, uid: &str) -> Result<(), CallError> {
        match &self.fault {
            Some(hook) if hook(step, uid) => Err(CallError::Crashed(step)),
            _ => Ok(()),
        }
    }

    /// Prepares `claims`; every claim gets an entry.
    pub async fn prepare(
        &self,
        claims: &[ClaimRef],
    ) -> Result<BTreeMap<String, PreparedClaimResult>, CallError> {
        let start = Instant::now();
        let fetches = claims.iter().map(|c| async move {
            check_uid(&c.uid)?;
            let claim = self
                .reader
                .get(&c.namespace, &c.name, &c.uid)
                .await
                .map_err(|e| e.to_string())?;
            let refusal = self.grants.check(&claim).await.err();
            Ok(Fetched { claim, refusal })
        });
        let fetched: Vec<Result<Fetched, String>> = futures::future::join_all(fetches).await;
        let said: BTreeMap<String, Vec<serde_json::Value>> = fetched
            .iter()
            .flatten()
            .map(|f| (f.claim.uid.clone(), f.claim.device_status.clone()))
            .collect();
        let _lock = lock::acquire(&self.config.plugin_dir)
            .await
            .map_err(CallError::Lock)?;
        let mut refused = BTreeMap::new();
        let result = self.prepare_locked(claims, fetched, &mut refused);
        let elapsed = start.elapsed();
        if let Ok(results) = &result {
            let failed = results.values().filter(|r| r.is_err()).count();
            self.metrics.observe_prepare(
                elapsed,
                results.len() - failed,
                failed,
                refused.values().map(|r| r.label()),
            );
            for (uid, result) in results {
                match result {
                    Ok(devices) => {
                        tracing::info!(claim_uid = %uid, devices = devices.len(), "prepared claim");
                        self.say_prepared(claims, uid, devices, said.get(uid));
                    }
                    Err(error) => tracing::warn!(claim_uid = %uid, %error, "claim not prepared"),
                }
            }
        }
        self.prepared.send_replace(());
        result
    }

    /// Queues the write of a prepared claim's `status.devices`, unless the claim already says it.
    fn say_prepared(
        &self,
        claims: &[ClaimRef],
        uid: &str,
        devices: &[PreparedDevice],
        said: Option<&Vec<serde_json::Value>>,
    ) {
        let Some(claim) = claims.iter().find(|c| c.uid == uid) else {
            return;
        };
        let status = DeviceStatus::of_claim(devices, &self.config.inventory);
        if said.is_some_and(|said| claims::status::up_to_date(said, &status)) {
            return;
        }
        self.status.prepared(claim.clone(), status);
    }

    /// Prepares what it can; each claim refused (rather than failed) is in `refused`.
    fn prepare_locked(
        &self,
        claims: &[ClaimRef],
        fetched: Vec<Result<Fetched, String>>,
        refused: &mut BTreeMap<String, Refusal>,
    ) -> Result<BTreeMap<String, PreparedClaimResult>, CallError> {
        let path = self.config.checkpoint_path();
        let mut checkpoint = self.config.load_checkpoint()?;
        let mut results = BTreeMap::new();
        let mut plans = Vec::new();
        for (claim, fetched) in claims.iter().zip(fetched) {
            let plan = fetched.and_then(|f| {
                let plan = Plan::new(&self.config, &f.claim).map_err(|e| {
                    refused.insert(claim.uid.clone(), Refusal::Invalid);
                    e.to_string()
                })?;
                Ok((plan, f.refusal))
            });
            match plan {
                Err(error) => {
                    results.insert(claim.uid.clone(), Err(error));
                }
                Ok((plan, refusal)) => {
                    match checkpoint.completed(&plan.uid, &self.config.boot_id) {
                        // Already prepared: make sure nothing was lost, answer as before.
                        Some(done) if done.devices == plan.devices => {
                            results.insert(
                                plan.uid.clone(),
                                repair(&plan).map(|()| done.devices.clone()),
                            );
                        }
                        // Prepared, but the plugin would now prepare it differently (an upgrade, or a
                        // changed inventory). Containers may be running with what was prepared and
                        // charging its region, so that stands until the claim is unprepared.
                        Some(done) => {
                            tracing::warn!(claim_uid = %plan.uid, "claim would be prepared differently now; keeping what was prepared");
                            results.insert(plan.uid.clone(), Ok(done.devices.clone()));
                        }
                        // A grant, and a wall above one context, are checked before a claim is
                        // first prepared; one already prepared keeps what its running containers
                        // were started with.
                        None => match (
                            refusal,
                            tessera_driver::allocation::check_context_overhead(&plan.limits),
                        ) {
                            (Some(error), _) => {
                                refused.insert(plan.uid.clone(), Refusal::Priority);
                                results.insert(plan.uid.clone(), Err(error));
                            }
                            (None, Err(below)) => {
                                refused.insert(plan.uid.clone(), Refusal::Invalid);
                                results.insert(plan.uid.clone(), Err(below.to_string()));
                            }
                            (None, Ok(())) => plans.push(plan),
                        },
                    }
                }
            }
        }
        let (plans, held_back) = self.admit_to_cards(plans, &mut results, refused);
        if plans.is_empty() {
            if held_back {
                self.publish_memory_reservations();
            }
            return Ok(results);
        }
        for plan in &plans {
            checkpoint.claims.insert(
                plan.uid.clone(),
                record(plan, ClaimState::PrepareStarted, &self.config.boot_id),
            );
        }
        checkpoint.save(&path, false)?;
        self.step(Step::Started, &plans[0].uid)?;
        for plan in &plans {
            let written = self.write(plan)?;
            if let Err(error) = &written {
                // Left `PrepareStarted`: the next prepare retries, an unprepare removes it all.
                results.insert(
                    plan.uid.clone(),
                    Err(format!("writing claim files: {error}")),
                );
                continue;
            }
            checkpoint.claims.insert(
                plan.uid.clone(),
                record(plan, ClaimState::PrepareCompleted, &self.config.boot_id),
            );
            results.insert(plan.uid.clone(), Ok(plan.devices.clone()));
        }
        checkpoint.save(&path, false)?;
        self.step(Step::Completed, &plans[0].uid)?;
        self.publish_memory_reservations();
        Ok(results)
    }

    /// Holds back the plans of claims that may not spill whose share is not free on the card of
    /// an overcommitted GPU (see [`card_room`]): they get the reason as their result and stay
    /// reserved while the kubelet retries. Returns the plans that go on, and whether any was
    /// held back.
    fn admit_to_cards(
        &self,
        plans: Vec<Plan>,
        results: &mut BTreeMap<String, PreparedClaimResult>,
        refused: &mut BTreeMap<String, Refusal>,
    ) -> (Vec<Plan>, bool) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        waiting.retain(|_, w| now.duration_since(w.asked_at) < WAITING_EXPIRY);
        if plans.iter().all(|p| p.card_shares.is_empty()) {
            return (plans, false);
        }
        let batch: Vec<&str> = plans.iter().map(|p| p.uid.as_str()).collect();
        let mut owed = match claim_files::memory_reservations(&self.config.state_dir, &batch) {
            Ok(owed) => owed,
            Err(error) => {
                for plan in plans {
                    results.insert(
                        plan.uid.clone(),
                        Err(format!(
                            "reading what the prepared claims are owed on the card: {error}"
                        )),
                    );
                }
                return (Vec::new(), false);
            }
        };
        for (_, held) in waiting
            .iter()
            .filter(|(uid, _)| !batch.contains(&uid.as_str()))
        {
            for share in &held.shares {
                *owed.entry(share.uuid.clone()).or_insert(0) += share.bytes;
            }
        }
        let boards = self.config.state_dir.join("boards");
        let mut admitted = Vec::new();
        let mut held_back = false;
        for plan in plans {
            let refusal = plan.card_shares.iter().find_map(|share| {
                let held = match card_room::held_by_spilling_claims(&boards, &share.uuid) {
                    Ok(held) => held,
                    Err(error) => {
                        return Some(format!(
                            "reading the memory board of GPU {}: {error}",
                            share.uuid
                        ));
                    }
                };
                card_room::CardRoom {
                    physical: share.physical,
                    held_by_spilling: held,
                    reserved: owed.get(&share.uuid).copied().unwrap_or(0),
                }
                .check(&share.uuid, share.bytes)
                .err()
            });
            // Earlier claims of the batch come first, held back or not.
            for share in &plan.card_shares {
                *owed.entry(share.uuid.clone()).or_insert(0) += share.bytes;
            }
            match refusal {
                Some(reason) => {
                    held_back = true;
                    waiting.insert(
                        plan.uid.clone(),
                        Waiting {
                            asked_at: now,
                            shares: plan.card_shares.clone(),
                        },
                    );
                    refused.insert(plan.uid.clone(), Refusal::CardRoom);
                    results.insert(plan.uid.clone(), Err(reason));
                }
                None => {
                    waiting.remove(&plan.uid);
                    admitted.push(plan);
                }
            }
        }
        (admitted, held_back)
    }

    /// What the prepared claims that did not opt in to spilling, and those held back for card
    /// room, are owed on each overcommitted GPU, for the shims of the claims that did (see
    /// `claim_files::write_memory_reservations`). Best effort: without it those claims are still
    /// protected once their processes start.
    fn publish_memory_reservations(&self) {
        let mut waiting = claim_files::Reservations::new();
        for held in self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            for share in &held.shares {
                *waiting.entry(share.uuid.clone()).or_insert(0) += share.bytes;
            }
        }
        if let Err(error) = claim_files::write_memory_reservations(&self.config.state_dir, &waiting)
        {
            tracing::error!(%error, "publishing the card memory reserved for claims that may not spill");
        }
    }

    /// Writes one claim's files; the outer error is a simulated crash.
    fn write(&self, plan: &Plan) -> Result<std::io::Result<()>, CallError> {
        if let Err(e) = plan.write_config() {
            return Ok(Err(e));
        }
        self.step(Step::ConfigWritten, &plan.uid)?;
        if let Err(e) = plan.write_region() {
            return Ok(Err(e));
        }
        self.step(Step::RegionWritten, &plan.uid)?;
        if let Err(e) = plan.write_board_entries() {
            return Ok(Err(e));
        }
        if let Err(e) = plan.write_metadata() {
            return Ok(Err(e));
        }
        if let Err(e) = plan.write_spec() {
            return Ok(Err(e));
        }
        self.step(Step::SpecWritten, &plan.uid)?;
        Ok(Ok(()))
    }

    /// Unprepares `claims`: removes the CDI spec, then the claim directory, then the record.
    /// Works from the UID alone, so a claim deleted from the API server is no obstacle.
    pub async fn unprepare(
        &self,
        claims: &[ClaimRef],
    ) -> Result<BTreeMap<String, Result<(), String>>, CallError> {
        let _lock = lock::acquire(&self.config.plugin_dir)
            .await
            .map_err(CallError::Lock)?;
        let path = self.config.checkpoint_path();
        let mut checkpoint = self.config.load_checkpoint()?;
        let mut results = BTreeMap::new();
        // A claim held back for card room that the kubelet gives up on stops holding the card.
        let mut changed = {
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            claims
                .iter()
                .filter(|c| waiting.remove(&c.uid).is_some())
                .count()
                > 0
        };
        for claim in claims {
            let result = self.unprepare_one(&claim.uid)?;
            if result.is_ok() && checkpoint.claims.remove(&claim.uid).is_some() {
                changed = true;
            }
            match &result {
                Ok(()) => {
                    tracing::info!(claim_uid = %claim.uid, "unprepared claim");
                    self.status.unprepared(claim.clone());
                }
                Err(error) => {
                    tracing::warn!(claim_uid = %claim.uid, %error, "claim not unprepared")
                }
            }
            self.metrics.observe_unprepare(result.is_ok());
            results.insert(claim.uid.clone(), result);
        }
        if changed {
            checkpoint.save(&path, false)?;
            self.publish_memory_reservations();
            self.prepared.send_replace(());
        }
        Ok(results)
    }

    fn unprepare_one(&self, uid: &str) -> Result<Result<(), String>, CallError> {
        if let Err(e) = check_uid(uid) {
            return Ok(Err(e));
        }
        let spec = self
            .config
            .cdi_dir
            .join(tessera_driver::cdi::spec_file_name(uid));
        if let Err(e) = fsutil::remove_file(&spec) {
            return Ok(Err(format!("removing CDI spec {}: {e}", spec.display())));
        }
        self.step(Step::SpecRemoved, uid)?;
        let host = tessera_driver::cdi::HostPaths::new(&self.config.state_dir, uid);
        if let Err(e) = claim_files::remove_board_entries(&host) {
            return Ok(Err(format!("removing the claim's board entries: {e}")));
        }
        let dir = tessera_driver::cdi::claim_dir(&self.config.state_dir, uid);
        if let Err(e) = fsutil::remove_dir_all(&dir) {
            return Ok(Err(format!(
                "removing claim directory {}: {e}",
                dir.display()
            )));
        }
        self.step(Step::ClaimDirRemoved, uid)?;
        Ok(Ok(()))
    }
}

/// Rewrites whatever of a completed claim's files has gone missing; an existing region is never
/// replaced, since running containers charge it.
fn repair(plan: &Plan) -> Result<(), String> {
    let missing = |p: &std::path::Path| !p.exists();
    let result = (|| {
        if plan.metadata.iter().any(|m| missing(&m.host_file)) {
            plan.write_metadata()?;
        }
        if plan.admin {
            if missing(&plan.spec_path) {
                plan.write_spec()?;
            }
            return Ok(());
        }
        if missing(&plan.host.config) {
            plan.write_config()?;
        }
        if missing(&plan.host.region) {
            plan.write_region()?;
        }
        // Only the missing ones: an existing entry is in use by the claim's processes.
        plan.write_board_entries()?;
        if missing(&plan.spec_path) {
            plan.write_spec()?;
        }
        Ok::<(), std::io::Error>(())
    })();
    result.map_err(|e| format!("restoring claim files: {e}"))
}

fn record(plan: &Plan, state: ClaimState, boot_id: &str) -> PreparedClaim {
    PreparedClaim {
        namespace: plan.namespace.clone(),
        name: plan.name.clone(),
        state,
        boot_id: boot_id.to_string(),
        devices: plan.devices.clone(),
        gpus: plan.limits.gpus.clone(),
    }
}
