//! The `Evacuation` custom resource: one hypervisor evacuation as a
//! Kubernetes object, so that operators see it with `kubectl get evacuations`
//! (node, phase, VMs left, failures, age) and read, per VM, what happened and
//! why, after the run as well as during it.
//!
//! The agent creates one when its node is cordoned, owned by the Node, and is
//! the only writer of its status (through the status subresource, with
//! optimistic concurrency). The CRD's YAML is generated from these types
//! (`drainer crd`) and kept in `deploy/crd.yaml`; a test holds the two equal.
//!
//! An Evacuation made by hand (`kubectl apply`) asks for hypervisor-only
//! maintenance: the agent of `spec.nodeName` evacuates the hypervisor without
//! the node being cordoned, keeps the service disabled while the object
//! exists, and re-enables it once the object is deleted (a finalizer of ours
//! holds the deletion until then). `spec.paused` asks for the plan only.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, CustomResource, CustomResourceExt, KubeSchema, Resource, ResourceExt};
use schemars::JsonSchema;

use super::finalizer::FinalizerError;
use serde::{Deserialize, Serialize};

/// Label on every Evacuation: the node it evacuates (its history is listed by it).
pub const NODE_LABEL: &str = "nova-kubernetes-drain/node";
/// Finished Evacuations kept per node; older ones are deleted.
pub const HISTORY_PER_NODE: usize = 10;
/// Our finalizer on an Evacuation made by hand: its deletion ends the
/// maintenance, and the service must be re-enabled (and a run cancelled) first.
pub const FINALIZER: &str = "nova-kubernetes-drain.io/maintenance";
/// How often a status write that met a conflict is re-read and tried again.
const CONFLICT_RETRIES: usize = 5;

/// One evacuation of the hypervisor behind a Kubernetes node.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[kube(
    group = "nova-kubernetes-drain.io",
    version = "v1alpha1",
    kind = "Evacuation",
    plural = "evacuations",
    shortname = "evac",
    category = "nova",
    status = "EvacuationStatus",
    doc = "One evacuation of the hypervisor behind a Kubernetes node by nova-kubernetes-drain.",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Queue","type":"integer","jsonPath":".status.queuePosition"}"#,
    printcolumn = r#"{"name":"Left","type":"integer","jsonPath":".status.counts.left"}"#,
    printcolumn = r#"{"name":"Total","type":"integer","jsonPath":".status.counts.total"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.counts.failed"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    selectable = ".spec.nodeName"
)]
#[serde(rename_all = "camelCase")]
pub struct EvacuationSpec {
    /// The Kubernetes node whose hypervisor is evacuated (the Nova host is
    /// derived from it by the agent's `nova_host` setting). Immutable: an
    /// Evacuation belongs to one node's agent.
    #[x_kube(validation = Rule::new("self == oldSelf").message("nodeName is immutable"))]
    pub node_name: String,
    /// Plan only: the agent writes what it would do (each VM's action, the
    /// capacity verdict) to the status and changes nothing in Nova until this
    /// is set to false. Read before the run starts; a running evacuation
    /// is not paused by it (delete the Evacuation to cancel one).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// What happens to VMs no `nova-drain:` tag of their own decides
    /// (outranks the Node's `nova-kubernetes-drain/vm-action` annotation and
    /// the agent's configuration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_action: Option<VmAction>,
    /// `CheckCapacity` (the default): refuse to start when the other
    /// hypervisors cannot hold the VMs; `Direct`: move without that check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<EvacuationMode>,
    /// Migrations at once from this hypervisor, instead of the agent's setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub max_parallel: Option<u32>,
    /// Minutes after which the whole run ends (in-flight moves handled as
    /// `onBudgetExceeded` says), instead of the agent's setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub timeout_minutes: Option<u32>,
    /// What is done with a live migration over its budget, instead of the agent's setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_budget_exceeded: Option<BudgetChoice>,
}

/// What happens to a VM no tag of its own decides.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum VmAction {
    /// Moved without stopping it.
    LiveMigrate,
    /// Moved stopped, the move confirmed.
    ColdMigrate,
    /// Stopped for the maintenance, started again when it ends.
    Stop,
    /// Reported, not touched.
    Leave,
}

impl VmAction {
    /// As the tag and the annotation spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            VmAction::LiveMigrate => "live-migrate",
            VmAction::ColdMigrate => "cold-migrate",
            VmAction::Stop => "stop",
            VmAction::Leave => "leave",
        }
    }
}

/// Whether the capacity check comes first.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum EvacuationMode {
    /// Refuse to start when the other hypervisors cannot hold the VMs.
    CheckCapacity,
    /// Move without the capacity check.
    Direct,
}

/// What is done with a live migration over its budget.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum BudgetChoice {
    /// Cancel it; the VM keeps running where it was.
    Abort,
    /// Let it finish now (the VM is paused for the final copy).
    ForceComplete,
}

/// Where an evacuation stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum EvacuationPhase {
    /// Made by hand and taken on by the node's agent; its run has not started
    /// yet (Nova not reached yet, or another run of the node going on).
    Pending,
    /// `spec.paused`: the plan is in the status; nothing changed in Nova.
    Paused,
    /// Waiting for one of the cluster's evacuation slots (`queuePosition`);
    /// the service is disabled, no VM moved yet.
    Waiting,
    /// VMs are being moved.
    Running,
    /// The hypervisor is empty (or holds only VMs left alone by policy).
    Succeeded,
    /// Some VM could not be moved, or the time-out ended the run.
    Failed,
    /// Stopped before the end (uncordon, the Evacuation deleted): in-flight
    /// moves were aborted where Nova can; see each VM's outcome.
    Cancelled,
}

impl EvacuationPhase {
    /// Whether the evacuation is over (kept as history).
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            EvacuationPhase::Succeeded | EvacuationPhase::Failed | EvacuationPhase::Cancelled
        )
    }
}

/// What the agent knows of the evacuation; written by the agent only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvacuationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<EvacuationPhase>,
    /// While `Waiting`: the place in the cluster's queue for evacuation
    /// slots (1: next), first come, first served by when each node began to wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u32>,
    /// The nova-compute host evacuated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nova_host: Option<String>,
    /// Whether this evacuation disabled the nova-compute service (so it
    /// re-enables it after the uncordon); false when an operator had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_disabled_by_us: Option<bool>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// RFC 3339; set once finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<VmCounts>,
    /// One entry per VM found on the hypervisor.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<VmStatus>,
    /// `Approved` (False while paused), `Progressing` (True while VMs are
    /// moved), `HypervisorEmpty`, in the form of Kubernetes conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<EvacuationCondition>,
    /// The `metadata.generation` (the spec's version) the plan was made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// What a paused evacuation would do (kept once it runs, as the plan it ran from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanVerdict>,
    /// Why the run failed or could not start, in one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// One condition, as Kubernetes objects carry them (`kubectl wait
/// --for=condition=HypervisorEmpty evac/NAME`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvacuationCondition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// RFC 3339: when `status` last changed.
    pub last_transition_time: String,
    /// One CamelCase word.
    pub reason: String,
    pub message: String,
}

/// The verdict of a paused evacuation's plan, for the person who approves it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanVerdict {
    pub live_migrations: u32,
    pub cold_migrations: u32,
    /// VMs the run would leave on the hypervisor.
    pub stays: u32,
    /// Whether the VMs to move fit on the other hypervisors; absent when the
    /// capacity check is turned off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_fits: Option<bool>,
    /// The hypervisors the VMs may go to, each with what it has free.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<String>,
    /// How the run would end: `succeeded` or `failed`.
    pub expected_result: String,
    /// Why it would not succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

/// How many VMs are where.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmCounts {
    /// VMs on the hypervisor when the run started.
    pub total: u32,
    /// Moved to another host (or deleted by their owner meanwhile).
    pub moved: u32,
    /// Left alone by policy.
    pub skipped: u32,
    /// Stopped for the maintenance, as their `nova-drain:stop` tag or the
    /// node's default asked; started again when it ends.
    #[serde(default)]
    pub stopped: u32,
    /// Could not be moved.
    pub failed: u32,
    /// Still on the hypervisor.
    pub left: u32,
}

/// One VM: what was decided for it and what became of it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmStatus {
    /// Nova server id.
    pub id: String,
    pub name: String,
    /// The project's name, or its id when Keystone did not tell the name.
    pub project: String,
    /// Nova status when the run found it (ACTIVE, SHUTOFF...).
    pub state: String,
    /// `live-migrate`, `cold-migrate`, `stop` (stopped for the maintenance,
    /// started again when the hypervisor is re-enabled) or `skip` (left in
    /// place, by policy or by its tag).
    pub action: String,
    pub attempts: u32,
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// When its first move started, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// How long its moves took, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// `planned` (paused), `pending`, `moving`, then one of `migrated`, `deleted`, `skipped`,
    /// `stopped` (by us, to be started again), `left` (running, as its tag or
    /// the node's default asked), `failed`, `aborted`, `in-progress` (left to Nova), `not-started`, or
    /// `not-on-host` (its move was under way when the agent stopped, and it
    /// was gone from the hypervisor when the agent resumed the run).
    pub outcome: String,
    /// Why, for every outcome but a plain success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What the agent's decisions need of one Evacuation of its node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvacuationSeen {
    pub name: String,
    /// Made by hand, not by the agent at a cordon (no Node owns it): it asks
    /// for the hypervisor's maintenance by itself, for as long as it exists.
    pub by_hand: bool,
    /// What it asks of the run beside the node (overrides of the agent's settings).
    pub spec: EvacuationSpec,
    /// Being deleted (a finalizer holds it), or already gone.
    pub deleting: bool,
    /// Carries our [`FINALIZER`].
    pub held: bool,
    /// Whether its spec changed since its plan was written (a paused one is planned again).
    pub plan_outdated: bool,
    /// `metadata.generation`: the version of its spec.
    pub generation: Option<i64>,
    /// Creation time (RFC 3339, whole seconds) then name: the oldest asks first.
    pub created: (String, String),
}

impl EvacuationSeen {
    pub fn of(evacuation: &Evacuation) -> EvacuationSeen {
        let meta = &evacuation.metadata;
        let name = evacuation.name_any();
        let created = meta
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default();
        EvacuationSeen {
            by_hand: !meta.owner_references.iter().flatten().any(|o| o.kind == "Node"),
            spec: evacuation.spec.clone(),
            deleting: meta.deletion_timestamp.is_some(),
            held: meta.finalizers.iter().flatten().any(|f| f == FINALIZER),
            plan_outdated: evacuation
                .status
                .as_ref()
                .is_some_and(|s| s.phase == Some(EvacuationPhase::Paused) && s.observed_generation != meta.generation),
            generation: meta.generation,
            created: (created, name.clone()),
            name,
        }
    }
}

/// Watches the Evacuations of `node` (field selector on `spec.nodeName`, a
/// selectable field of the CRD), starting from a list.
pub fn watch_evacuations(
    client: Client,
    node: &str,
) -> impl futures::Stream<Item = Result<watcher::Event<Evacuation>, watcher::Error>> + Send + use<> {
    let api: Api<Evacuation> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    watcher(api, config).default_backoff()
}

/// Takes our finalizer off every Evacuation (of `node`, or of every node),
/// for `drainer release-guard` once the agents are gone: no agent is left to
/// act on a deletion, which would otherwise never end (and hold the CRD's own
/// deletion at an uninstall, whether or not it has reached the Evacuation
/// yet). Evacuations of a node for which `keep` says yes are left held (its
/// guard was kept: VMs still run there). An agent that comes back puts it on
/// again. Returns (name, node) of each let go.
pub async fn let_go_all(
    client: Client,
    node: Option<&str>,
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<(String, String)>, FinalizerError> {
    let api: Api<Evacuation> = Api::all(client);
    let params = match node {
        Some(node) => ListParams::default().fields(&format!("spec.nodeName={node}")),
        None => ListParams::default(),
    };
    let mut released = Vec::new();
    for evacuation in api.list(&params).await?.items {
        let seen = EvacuationSeen::of(&evacuation);
        if seen.held && !keep(&seen.spec.node_name) && super::finalizer::remove(&api, &seen.name, FINALIZER).await? {
            released.push((seen.name, evacuation.spec.node_name));
        }
    }
    Ok(released)
}

/// The CRD as YAML, exactly as `deploy/crd.yaml` holds it.
pub fn crd_yaml() -> Result<String, String> {
    let crd: CustomResourceDefinition = Evacuation::crd();
    let body = serde_saphyr::to_string(&crd).map_err(|e| format!("writing the CRD as YAML: {e}"))?;
    Ok(format!(
        "# Generated by `drainer crd` from src/kube/evacuation.rs; do not edit by hand.\n---\n{body}"
    ))
}

/// The name of a new Evacuation of `node` started at `at`: the node's name
/// and the start time, shortened (with a hash of the whole) to stay a valid
/// object name for any node name.
pub fn evacuation_name(node: &str, at: Timestamp) -> String {
    let stamp = at.strftime("%Y%m%d-%H%M%S").to_string();
    let full = format!("{node}-{stamp}");
    if full.len() <= 253 {
        return full;
    }
    let hash = format!("{:08x}", super::guard::fnv(node));
    let keep = 253 - stamp.len() - hash.len() - 2;
    let prefix: String = node.chars().take(keep).collect();
    format!("{}-{hash}-{stamp}", prefix.trim_end_matches(['.', '-']))
}

/// The agent's Evacuation objects for its node.
#[derive(Clone)]
pub struct Evacuations {
    api: Api<Evacuation>,
    node: String,
}

impl Evacuations {
    pub fn new(client: Client, node: &str) -> Evacuations {
        Evacuations {
            api: Api::all(client),
            node: node.to_string(),
        }
    }

    /// Creates the Evacuation of a run starting now, owned by the Node (so it
    /// goes with the Node), and trims the node's history of finished ones.
    /// `paused`: it waits for a person's approval.
    pub async fn create(&self, node: &Node, at: Timestamp, paused: bool) -> Result<String, kube::Error> {
        let name = evacuation_name(&self.node, at);
        let owner = node_owner(node);
        let evacuation = Evacuation {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(NODE_LABEL.to_string(), super::guard::label_value(&self.node))].into()),
                owner_references: Some(vec![owner]),
                ..ObjectMeta::default()
            },
            spec: EvacuationSpec {
                node_name: self.node.clone(),
                paused,
                ..EvacuationSpec::default()
            },
            status: None,
        };
        match self.api.create(&PostParams::default(), &evacuation).await {
            Ok(_) => {}
            // Created by an earlier attempt whose answer was lost.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
        self.trim_history(&name).await;
        Ok(name)
    }

    /// A reference to Evacuation `name` (with its uid), for Events about it.
    /// Read through the status subresource, which the agent may read.
    pub async fn reference(client: Client, name: &str) -> Result<ObjectReference, kube::Error> {
        let api: Api<Evacuation> = Api::all(client);
        let evacuation = api.get_status(name).await?;
        Ok(ObjectReference {
            api_version: Some(Evacuation::api_version(&()).into_owned()),
            kind: Some(Evacuation::kind(&()).into_owned()),
            name: Some(name.to_string()),
            uid: evacuation.metadata.uid,
            ..ObjectReference::default()
        })
    }

    /// The status of Evacuation `name` as last written (`None`: none yet).
    pub async fn read_status(&self, name: &str) -> Result<Option<EvacuationStatus>, kube::Error> {
        Ok(self.api.get_status(name).await?.status)
    }

    /// Writes `status` through the status subresource, with the
    /// resourceVersion just read: a write that meets a conflict is read again
    /// and tried again, never forced.
    pub async fn write_status(&self, name: &str, status: &EvacuationStatus) -> Result<(), kube::Error> {
        let mut conflicts = 0;
        loop {
            let mut current = self.api.get_status(name).await?;
            current.status = Some(status.clone());
            match self.api.replace_status(name, &PostParams::default(), &current).await {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(e)) if e.code == 409 && conflicts < CONFLICT_RETRIES => conflicts += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Puts our finalizer on a hand-made Evacuation: its deletion then waits
    /// until the agent has ended the maintenance it asked for.
    pub async fn hold(&self, name: &str) -> Result<(), FinalizerError> {
        super::finalizer::add(&self.api, name, FINALIZER).await.map(drop)
    }

    /// Takes our finalizer off: the Evacuation may go.
    pub async fn let_go(&self, name: &str) -> Result<(), FinalizerError> {
        super::finalizer::remove(&self.api, name, FINALIZER).await.map(drop)
    }

    /// Deletes the oldest finished Evacuations of the node beyond
    /// [`HISTORY_PER_NODE`]; failures only cost tidiness.
    async fn trim_history(&self, current: &str) {
        let Ok(list) = self
            .api
            .list(&ListParams::default().labels(&node_selector(&self.node)))
            .await
        else {
            return;
        };
        let finished: Vec<Evacuation> = list
            .items
            .into_iter()
            .filter(|e| e.spec.node_name == self.node && e.name_any() != current)
            .filter(|e| {
                e.status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(EvacuationPhase::is_finished)
            })
            .collect();
        delete_oldest(&self.api, finished, HISTORY_PER_NODE).await;
    }
}

/// The Node as the owner (not the controller) of an object of ours that
/// goes with it (an Evacuation, a VmMigration).
pub fn node_owner(node: &Node) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: node.name_any(),
        uid: node.meta().uid.clone().unwrap_or_default(),
        controller: Some(false),
        block_owner_deletion: None,
    }
}

/// The label selector of the objects of `node` ([`NODE_LABEL`]).
pub fn node_selector(node: &str) -> String {
    format!("{NODE_LABEL}={}", super::guard::label_value(node))
}

/// Deletes the oldest of `old` beyond the `keep` newest; within a second
/// (creation times are whole seconds), by name, which carries the start
/// time. Failures only cost tidiness.
pub async fn delete_oldest<K>(api: &Api<K>, mut old: Vec<K>, keep: usize)
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    if old.len() <= keep {
        return;
    }
    old.sort_by_key(|o| (o.meta().creation_timestamp.clone().map(|t| t.0), o.name_any()));
    let excess = old.len() - keep;
    for gone in old.into_iter().take(excess) {
        let _ = api.delete(&gone.name_any(), &DeleteParams::default()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_crd_is_the_generated_one() {
        let committed = include_str!("../../deploy/crd.yaml");
        let generated = crd_yaml().expect("the CRD serialises");
        assert!(
            committed == generated,
            "deploy/crd.yaml is stale: run `cargo run -- crd > deploy/crd.yaml`"
        );
    }

    #[test]
    fn names_stay_valid_for_every_node_name() {
        let at: Timestamp = "2026-12-07T03:04:05Z".parse().expect("time");
        assert_eq!(evacuation_name("host1", at), "host1-20261207-030405");
        let long = "a".repeat(250);
        let name = evacuation_name(&long, at);
        assert!(name.len() <= 253, "{}", name.len());
        assert!(name.ends_with("-20261207-030405"));
        assert_ne!(name, evacuation_name(&"a".repeat(251), at));
    }
}
