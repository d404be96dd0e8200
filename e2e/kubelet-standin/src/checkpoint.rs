//! The claims this node has prepared, kept on disk as the kubelet keeps its DRA manager state:
//! after a restart the stand-in still knows what to unprepare, even when the pod and the claim
//! are gone from the API server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::plugin::{ClaimRef, PreparedDevice};

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedClaim {
    pub namespace: String,
    pub name: String,
    /// The pods (UIDs) on this node the claim is prepared for.
    pub pods: Vec<String>,
    pub devices: Vec<PreparedDevice>,
}

impl PreparedClaim {
    pub fn claim_ref(&self, uid: &str) -> ClaimRef {
        ClaimRef {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            uid: uid.to_owned(),
        }
    }
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct File {
    /// Claim UID → what was prepared.
    claims: BTreeMap<String, PreparedClaim>,
}

pub struct Checkpoint {
    path: PathBuf,
    file: File,
}

impl Checkpoint {
    pub fn open(path: &Path) -> anyhow::Result<Checkpoint> {
        let file = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!("{} is not a valid stand-in checkpoint", path.display())
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => File::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Checkpoint {
            path: path.to_owned(),
            file,
        })
    }

    fn save(&self) -> anyhow::Result<()> {
        let temp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(&self.file).context("encoding the checkpoint")?;
        std::fs::write(&temp, bytes).with_context(|| format!("writing {}", temp.display()))?;
        std::fs::rename(&temp, &self.path)
            .with_context(|| format!("replacing {}", self.path.display()))
    }

    pub fn get(&self, uid: &str) -> Option<&PreparedClaim> {
        self.file.claims.get(uid)
    }

    pub fn claims(&self) -> impl Iterator<Item = (&String, &PreparedClaim)> {
        self.file.claims.iter()
    }

    /// Records that a pod's claim is about to be prepared; its devices stay as they are (none
    /// yet, or those of another pod's earlier prepare).
    pub fn reserve(&mut self, claim: &ClaimRef, pod_uid: &str) -> anyhow::Result<()> {
        let entry = self
            .file
            .claims
            .entry(claim.uid.clone())
            .or_insert_with(|| PreparedClaim {
                namespace: claim.namespace.clone(),
                name: claim.name.clone(),
                pods: Vec::new(),
                devices: Vec::new(),
            });
        if !entry.pods.iter().any(|p| p == pod_uid) {
            entry.pods.push(pod_uid.to_owned());
        }
        self.save()
    }

    /// Records a prepared claim for a pod.
    pub fn add(
        &mut self,
        claim: &ClaimRef,
        pod_uid: &str,
        devices: Vec<PreparedDevice>,
    ) -> anyhow::Result<()> {
        let entry = self
            .file
            .claims
            .entry(claim.uid.clone())
            .or_insert_with(|| PreparedClaim {
                namespace: claim.namespace.clone(),
                name: claim.name.clone(),
                pods: Vec::new(),
                devices: Vec::new(),
            });
        entry.devices = devices;
        if !entry.pods.iter().any(|p| p == pod_uid) {
            entry.pods.push(pod_uid.to_owned());
        }
        self.save()
    }

    /// Drops the pod from the claim; true if no pod on the node uses the claim any more.
    pub fn release(&mut self, claim_uid: &str, pod_uid: &str) -> anyhow::Result<bool> {
        let Some(entry) = self.file.claims.get_mut(claim_uid) else {
            return Ok(false);
        };
        entry.pods.retain(|p| p != pod_uid);
        let unused = entry.pods.is_empty();
        self.save()?;
        Ok(unused)
    }

    /// Forgets a claim after it was unprepared.
    pub fn remove(&mut self, claim_uid: &str) -> anyhow::Result<()> {
        if self.file.claims.remove(claim_uid).is_some() {
            self.save()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(uid: &str) -> ClaimRef {
        ClaimRef {
            namespace: "ns".into(),
            name: format!("claim-{uid}"),
            uid: uid.into(),
        }
    }

    fn device() -> PreparedDevice {
        PreparedDevice {
            request_names: vec!["gpu".into()],
            device_name: "gpu-0".into(),
            cdi_device_ids: vec!["gpu.tessera.dev/claim=u1-gpu-0".into()],
        }
    }

    #[test]
    fn a_claim_shared_by_two_pods_is_unused_only_after_both() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("checkpoint.json");
        let mut checkpoint = Checkpoint::open(&path).expect("empty checkpoint");
        checkpoint
            .add(&claim("u1"), "pod-a", vec![device()])
            .expect("add a");
        checkpoint
            .add(&claim("u1"), "pod-b", vec![device()])
            .expect("add b");
        checkpoint
            .add(&claim("u1"), "pod-b", vec![device()])
            .expect("add b again");
        assert_eq!(
            checkpoint.get("u1").map(|c| c.pods.len()),
            Some(2),
            "a pod is recorded once"
        );
        assert!(!checkpoint.release("u1", "pod-a").expect("release a"));
        assert!(checkpoint.release("u1", "pod-b").expect("release b"));
        assert!(
            !checkpoint
                .release("unknown", "pod-a")
                .expect("unknown claim")
        );
    }

    #[test]
    fn a_reservation_keeps_devices_and_counts_as_a_user() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut checkpoint = Checkpoint::open(&dir.path().join("c.json")).expect("checkpoint");
        checkpoint
            .reserve(&claim("u1"), "pod-a")
            .expect("reserve before prepare");
        assert_eq!(checkpoint.get("u1").map(|c| c.devices.len()), Some(0));
        checkpoint
            .add(&claim("u1"), "pod-a", vec![device()])
            .expect("prepared");
        checkpoint
            .reserve(&claim("u1"), "pod-b")
            .expect("a second pod");
        assert_eq!(
            checkpoint
                .get("u1")
                .map(|c| (c.pods.len(), c.devices.len())),
            Some((2, 1))
        );
    }

    #[test]
    fn it_survives_a_restart_and_refuses_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("checkpoint.json");
        let mut checkpoint = Checkpoint::open(&path).expect("empty checkpoint");
        checkpoint
            .add(&claim("u1"), "pod-a", vec![device()])
            .expect("add");
        checkpoint.add(&claim("u2"), "pod-a", vec![]).expect("add");
        checkpoint.remove("u2").expect("remove");
        let reopened = Checkpoint::open(&path).expect("reopen");
        let claims: Vec<&String> = reopened.claims().map(|(uid, _)| uid).collect();
        assert_eq!(claims, vec!["u1"]);
        assert_eq!(
            reopened.get("u1").map(|c| c.claim_ref("u1")),
            Some(claim("u1"))
        );
        assert_eq!(
            reopened.get("u1").map(|c| c.devices.clone()),
            Some(vec![device()])
        );
        std::fs::write(&path, b"{not json").expect("corrupt");
        let error = Checkpoint::open(&path)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(error.contains("not a valid stand-in checkpoint"), "{error}");
    }
}
