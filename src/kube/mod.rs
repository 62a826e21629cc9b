//! The Kubernetes side: the agent's own Node (watch, annotations), Events
//! about it, and the guard pod that keeps `kubectl drain` waiting (watched too).

pub mod annotations;
pub mod cluster;
pub mod guard;

use futures::Stream;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod};
use k8s_openapi::api::events::v1::Event as KubeEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

pub use annotations::{DrainState, Phase};
pub use cluster::{Cluster, KubeCluster};
pub use guard::{Guard, GuardPod};

/// Name under which Events are reported.
pub const CONTROLLER: &str = "nova-kubernetes-drain";

/// Watches exactly one Node (field selector on its name), starting from a
/// list and re-listing after a 410 Gone or a dropped watch, with backoff.
pub fn watch_node(
    client: Client,
    node: &str,
) -> impl Stream<Item = Result<watcher::Event<Node>, watcher::Error>> + Send + use<> {
    let nodes: Api<Node> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("metadata.name={node}"));
    watcher(nodes, config).default_backoff()
}

/// Watches the guard pod alone (field selector on its name), like [`watch_node`].
pub fn watch_guard(
    client: Client,
    namespace: &str,
    name: &str,
) -> impl Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Send + use<> {
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    watcher(pods, config).default_backoff()
}

/// Writes the drain state into the Node's annotations (a merge patch: nothing else is touched).
pub async fn record_state(client: &Client, node: &str, state: &DrainState) -> Result<(), kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(state.to_merge_patch()))
        .await
        .map(drop)
}

/// Whether an Event reports normal progress or something an operator should look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Normal,
    Warning,
}

/// Publishes events.k8s.io/v1 Events about one Node, in namespace `default`
/// as the API server requires for cluster-scoped objects.
///
/// Not kube's `Recorder`: it folds events with the same reason into one
/// series that keeps the first note, and our notes name the VMs.
#[derive(Clone)]
pub struct NodeEvents {
    api: Api<KubeEvent>,
    regarding: ObjectReference,
    instance: String,
}

impl NodeEvents {
    pub fn new(client: Client, node: &Node, instance: &str) -> NodeEvents {
        NodeEvents {
            api: Api::namespaced(client, "default"),
            regarding: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: node.metadata.name.clone(),
                uid: node.metadata.uid.clone(),
                ..ObjectReference::default()
            },
            instance: instance.to_string(),
        }
    }

    /// Creates one Event; `reason` is PascalCase, `note` says what happened to which VM.
    pub async fn publish(&self, severity: Severity, reason: &str, action: &str, note: &str) -> Result<(), kube::Error> {
        let now = jiff::Timestamp::now();
        let node = self.regarding.name.clone().unwrap_or_default();
        let note: String = note.chars().take(1000).collect();
        let event = KubeEvent {
            metadata: ObjectMeta {
                name: Some(format!("{node}.{:x}", now.as_nanosecond())),
                namespace: Some("default".into()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(
                match severity {
                    Severity::Normal => "Normal",
                    Severity::Warning => "Warning",
                }
                .into(),
            ),
            reason: Some(reason.into()),
            action: Some(action.into()),
            note: Some(note),
            regarding: Some(self.regarding.clone()),
            reporting_controller: Some(CONTROLLER.into()),
            reporting_instance: Some(self.instance.clone()),
            ..KubeEvent::default()
        };
        self.api.create(&PostParams::default(), &event).await.map(drop)
    }
}
