//! Memory relief on the Kubernetes side: each move as a `VmMigration`
//! object (`kubectl get vmmigrations`, as Koordinator's PodMigrationJob is to
//! pods), the cluster-wide pause switch, and the Leases through which agents
//! tell each other which hosts are short of memory and share the cluster's
//! relief migrations.
//!
//! - `VmMigration` (cluster-scoped, owned by the Node, labelled with it):
//!   written by the agent only; the last [`HISTORY_PER_NODE`] of a node are kept.
//! - ConfigMap `nova-drain-memory-relief` in the agents' namespace:
//!   `data.paused: "true"` stops every agent from starting a move.
//! - Lease `nova-drain-pressure-<node>`: this node's memory is below its
//!   threshold (renewed while it is); no agent sends a VM there.
//! - Lease `nova-drain-relief-<i>`, `i` below the cluster's relief
//!   migrations: held while one relief move runs.

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, CustomResource, CustomResourceExt, KubeSchema, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::evacuation::{NODE_LABEL, delete_oldest, node_owner, node_selector};
use super::leases::NOVA_HOST_ANNOTATION;

/// Finished VmMigrations kept per node; older ones are deleted.
pub const HISTORY_PER_NODE: usize = 10;
/// The ConfigMap whose `paused: "true"` pauses memory relief cluster-wide.
pub const PAUSE_CONFIG_MAP: &str = "nova-drain-memory-relief";
/// Label on the memory Leases: `pressure` or `relief`.
pub const MEMORY_LABEL: &str = "nova-kubernetes-drain/memory";
const PRESSURE_PREFIX: &str = "nova-drain-pressure-";
const RELIEF_PREFIX: &str = "nova-drain-relief-";

/// One VM moved (or, in a dry run, that would be moved) off a hypervisor.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[kube(
    group = "nova-kubernetes-drain.io",
    version = "v1alpha1",
    kind = "VmMigration",
    plural = "vmmigrations",
    shortname = "vmmig",
    category = "nova",
    status = "VmMigrationStatus",
    doc = "One VM moved off a hypervisor by nova-kubernetes-drain (memory relief).",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"VM","type":"string","jsonPath":".spec.serverName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"To","type":"string","jsonPath":".status.destination"}"#,
    printcolumn = r#"{"name":"RAM-MiB","type":"integer","jsonPath":".spec.ramMb"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".spec.reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    selectable = ".spec.nodeName"
)]
#[serde(rename_all = "camelCase")]
pub struct VmMigrationSpec {
    /// The node whose hypervisor the VM leaves.
    pub node_name: String,
    /// The Nova server's id and name.
    pub server_id: String,
    pub server_name: String,
    pub ram_mb: u64,
    /// Why it moves: `MemoryPressure`.
    pub reason: String,
    /// Reported only: nothing was moved.
    #[serde(default)]
    pub dry_run: bool,
}

/// Where a VmMigration stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum VmMigrationPhase {
    /// A dry run's verdict: this VM would move.
    Proposed,
    Migrating,
    Succeeded,
    Failed,
    /// The node was cordoned during the move: its evacuation follows the migration.
    HandedOver,
    /// The agent stopped during the move (Nova finished or rolled it back on
    /// its own; its migration records tell which).
    Interrupted,
}

/// What happened, written by the agent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmMigrationStatus {
    pub phase: Option<VmMigrationPhase>,
    /// The Nova host it leaves and the one chosen for it.
    pub source: Option<String>,
    pub destination: Option<String>,
    /// `MemAvailable` and the threshold when the move was chosen, in MiB.
    pub mem_available_mib: Option<u64>,
    pub threshold_mib: Option<u64>,
    /// What had to be freed to be relieved (threshold plus margin), in MiB.
    pub short_mib: Option<u64>,
    /// Why this VM and this host.
    pub why: Option<String>,
    pub start_time: Option<String>,
    pub completion_time: Option<String>,
    /// Why it failed, or what Nova said.
    pub message: Option<String>,
}

/// The CRD as YAML, exactly as `deploy/crd-vmmigrations.yaml` holds it.
pub fn crd_yaml() -> Result<String, String> {
    let crd: CustomResourceDefinition = VmMigration::crd();
    let body = serde_saphyr::to_string(&crd).map_err(|e| format!("writing the CRD as YAML: {e}"))?;
    Ok(format!(
        "# Generated by `drainer crd` from src/kube/relief.rs; do not edit by hand.\n---\n{body}"
    ))
}

/// The agent's VmMigration objects for its node.
#[derive(Clone)]
pub struct VmMigrations {
    api: Api<VmMigration>,
    node: String,
}

impl VmMigrations {
    pub fn new(client: Client, node: &str) -> VmMigrations {
        VmMigrations {
            api: Api::all(client),
            node: node.to_string(),
        }
    }

    /// Creates the object of a move starting now (owned by the Node) with
    /// its first status, and trims the node's history; returns its name.
    pub async fn create(
        &self,
        node: &Node,
        spec: VmMigrationSpec,
        status: &VmMigrationStatus,
    ) -> Result<String, kube::Error> {
        let vm: String = spec.server_id.chars().take(8).collect();
        // The node's name and the VM's, shortened with a hash when too long, then the time.
        let name = super::evacuation::evacuation_name(&format!("{}-{vm}", self.node), Timestamp::now());
        let owner = node_owner(node);
        let object = VmMigration {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(NODE_LABEL.to_string(), super::guard::label_value(&self.node))].into()),
                owner_references: Some(vec![owner]),
                ..ObjectMeta::default()
            },
            spec,
            status: None,
        };
        match self.api.create(&PostParams::default(), &object).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
        if let Err(e) = self.write_status(&name, status).await {
            // The object exists: its name is still the one to write the outcome to.
            tracing::warn!(name, error = %e, "cannot write the VmMigration's first status");
        }
        self.trim_history(&name).await;
        Ok(name)
    }

    /// The node's VmMigrations still `Migrating`: a move the agent did not
    /// see to its end (it stopped or was killed).
    pub async fn unfinished(&self) -> Result<Vec<(String, VmMigrationStatus)>, kube::Error> {
        Ok(self
            .api
            .list(&ListParams::default().labels(&node_selector(&self.node)))
            .await?
            .items
            .into_iter()
            .filter(|m| m.spec.node_name == self.node)
            .filter_map(|m| {
                let status = m.status.clone()?;
                (status.phase == Some(VmMigrationPhase::Migrating)).then(|| (m.name_any(), status))
            })
            .collect())
    }

    /// Writes `status` through the status subresource, as of the resourceVersion just read.
    pub async fn write_status(&self, name: &str, status: &VmMigrationStatus) -> Result<(), kube::Error> {
        let mut current = self.api.get_status(name).await?;
        current.status = Some(status.clone());
        self.api
            .replace_status(name, &PostParams::default(), &current)
            .await
            .map(drop)
    }

    /// Deletes the node's oldest VmMigrations beyond [`HISTORY_PER_NODE`];
    /// failures only cost tidiness.
    async fn trim_history(&self, current: &str) {
        let Ok(list) = self
            .api
            .list(&ListParams::default().labels(&node_selector(&self.node)))
            .await
        else {
            return;
        };
        let old: Vec<VmMigration> = list
            .items
            .into_iter()
            .filter(|m| m.spec.node_name == self.node && m.name_any() != current)
            .filter(|m| m.status.as_ref().and_then(|s| s.phase) != Some(VmMigrationPhase::Migrating))
            .collect();
        // The current one makes the history's last.
        delete_oldest(&self.api, old, HISTORY_PER_NODE - 1).await;
    }
}

/// Whether memory relief is paused cluster-wide (ConfigMap
/// [`PAUSE_CONFIG_MAP`] in the agents' namespace says `paused: "true"`).
pub async fn paused_cluster_wide(client: Client, namespace: &str) -> Result<bool, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    Ok(api
        .get_opt(PAUSE_CONFIG_MAP)
        .await?
        .and_then(|map| map.data)
        .and_then(|data| data.get("paused").cloned())
        .is_some_and(|paused| paused.trim().eq_ignore_ascii_case("true")))
}

/// The memory Leases as one agent reads and writes them.
#[derive(Clone)]
pub struct MemoryLeases {
    api: Api<Lease>,
    node: String,
    nova_host: String,
    duration_seconds: i32,
}

/// Why a memory Lease could not be written or read.
#[derive(Debug, thiserror::Error)]
#[error("memory lease {name}: {source}")]
pub struct MemoryLeaseError {
    name: String,
    #[source]
    source: kube::Error,
}

impl MemoryLeaseError {
    /// The Lease changed or went since it was read: another agent took it.
    pub fn taken_by_another(&self) -> bool {
        matches!(&self.source, kube::Error::Api(status) if matches!(status.code, 404 | 409))
    }
}

impl MemoryLeases {
    pub fn new(client: Client, namespace: &str, node: &str, nova_host: &str, duration: std::time::Duration) -> Self {
        MemoryLeases {
            api: Api::namespaced(client, namespace),
            node: node.to_string(),
            nova_host: nova_host.to_string(),
            duration_seconds: i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX),
        }
    }

    /// Says (renews) that this node's memory is low, or takes that back.
    pub async fn tell_low(&self, low: bool) -> Result<(), MemoryLeaseError> {
        let name = super::leases::node_lease_name(PRESSURE_PREFIX, &self.node);
        let fail = |source| MemoryLeaseError {
            name: name.clone(),
            source,
        };
        if !low {
            return match self.api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                Err(e) => Err(fail(e)),
            };
        }
        let seen = self.api.get_opt(&name).await.map_err(fail)?;
        self.write(&name, "pressure", seen.as_ref(), None)
            .await
            .map(drop)
            .map_err(fail)
    }

    /// The Nova hosts whose agents say their memory is low now.
    pub async fn low_hosts(&self) -> Result<Vec<String>, MemoryLeaseError> {
        Ok(self
            .listed("pressure")
            .await?
            .iter()
            .filter(|lease| self.fresh(lease))
            .filter_map(|lease| lease.annotations().get(NOVA_HOST_ANNOTATION).cloned())
            .collect())
    }

    /// Whether all `count` relief Leases are held by other agents now (one list, no write).
    pub async fn relief_all_held(&self, count: u32) -> Result<bool, MemoryLeaseError> {
        let listed = self.listed("relief").await?;
        let held = (0..count)
            .filter(|index| {
                let name = format!("{RELIEF_PREFIX}{index}");
                listed.iter().any(|l| l.name_any() == name && self.held_by_other(l))
            })
            .count();
        Ok(held as u32 >= count)
    }

    /// Takes one of the `count` relief Leases, free or expired; `None`: all are held.
    pub async fn take_relief(&self, count: u32) -> Result<Option<Lease>, MemoryLeaseError> {
        let held = self.listed("relief").await?;
        for index in 0..count {
            let name = format!("{RELIEF_PREFIX}{index}");
            let seen = held.iter().find(|l| l.name_any() == name);
            if seen.is_some_and(|lease| self.held_by_other(lease)) {
                continue;
            }
            match self.write(&name, "relief", seen, Some(self.node.clone())).await {
                Ok(lease) => return Ok(Some(lease)),
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(source) => return Err(MemoryLeaseError { name, source }),
            }
        }
        Ok(None)
    }

    /// Renews a relief Lease this agent holds.
    pub async fn renew(&self, held: &Lease) -> Result<Lease, MemoryLeaseError> {
        let name = held.name_any();
        self.write(&name, "relief", Some(held), Some(self.node.clone()))
            .await
            .map_err(|source| MemoryLeaseError { name, source })
    }

    /// Lets a relief Lease go (no holder).
    pub async fn release(&self, held: &Lease) -> Result<(), MemoryLeaseError> {
        let name = held.name_any();
        self.write(&name, "relief", Some(held), None)
            .await
            .map(drop)
            .map_err(|source| MemoryLeaseError { name, source })
    }

    async fn listed(&self, role: &str) -> Result<Vec<Lease>, MemoryLeaseError> {
        let selector = format!("{MEMORY_LABEL}={role}");
        self.api
            .list(&ListParams::default().labels(&selector))
            .await
            .map(|list| list.items)
            .map_err(|source| MemoryLeaseError {
                name: format!("({role})"),
                source,
            })
    }

    /// Renewed within its duration, by our clock (a one-off read cannot
    /// watch it change; agents' clocks are kept by NTP).
    fn fresh(&self, lease: &Lease) -> bool {
        let Some(spec) = &lease.spec else { return false };
        let (Some(renewed), Some(seconds)) = (&spec.renew_time, spec.lease_duration_seconds) else {
            return false;
        };
        let until = renewed.0 + jiff::SignedDuration::from_secs(i64::from(seconds));
        spec.holder_identity.is_some() && until > Timestamp::now()
    }

    fn held_by_other(&self, lease: &Lease) -> bool {
        let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref());
        self.fresh(lease) && holder != Some(self.node.as_str())
    }

    /// Creates (`seen` is `None`) or replaces Lease `name` as of its
    /// resourceVersion; `holder` `None` writes it free.
    async fn write(
        &self,
        name: &str,
        role: &str,
        seen: Option<&Lease>,
        holder: Option<String>,
    ) -> Result<Lease, kube::Error> {
        let holder = if role == "pressure" {
            Some(self.node.clone())
        } else {
            holder
        };
        let now = holder.as_ref().map(|_| MicroTime(Timestamp::now()));
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                labels: Some([(MEMORY_LABEL.to_string(), role.to_string())].into()),
                annotations: Some([(NOVA_HOST_ANNOTATION.to_string(), self.nova_host.clone())].into()),
                resource_version: seen.and_then(|l| l.metadata.resource_version.clone()),
                uid: seen.and_then(|l| l.metadata.uid.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder,
                lease_duration_seconds: Some(self.duration_seconds),
                acquire_time: now.clone(),
                renew_time: now,
                ..LeaseSpec::default()
            }),
        };
        match seen {
            None => self.api.create(&PostParams::default(), &lease).await,
            Some(_) => self.api.replace(name, &PostParams::default(), &lease).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_crd_is_the_generated_one() {
        let committed = include_str!("../../deploy/crd-vmmigrations.yaml");
        let generated = crd_yaml().expect("the CRD serialises");
        assert!(
            committed == generated,
            "deploy/crd-vmmigrations.yaml is stale: run `cargo run -- crd vmmigrations > deploy/crd-vmmigrations.yaml`"
        );
    }
}
