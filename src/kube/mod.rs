//! The Kubernetes side: the agent's own Node (watch, annotations), Events
//! about it, the guard pod that keeps `kubectl drain` waiting (watched too),
//! and the Evacuation objects that record each run. It knows nothing of
//! OpenStack.

pub mod annotations;
pub mod cluster;
pub mod evacuation;
mod finalizer;
pub mod guard;
pub mod leases;
pub mod relief;

use std::sync::{Arc, Mutex};

use futures::Stream;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod};
use k8s_openapi::api::events::v1::Event as KubeEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde_json::json;

pub use annotations::{DrainState, Phase, VM_ACTION, operator_view, vm_action};
pub use cluster::{Cluster, KubeCluster};
pub use finalizer::FinalizerError;
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

/// Publishes events.k8s.io/v1 Events about one cluster-scoped object (the
/// agent's Node, or the Evacuation of its current run), in namespace
/// `default` as the API server requires for cluster-scoped objects.
///
/// An Event that repeats an earlier one exactly (type, reason and note) is
/// counted in that Event's `series`, as Kubernetes' own recorders do, instead
/// of being written again: a node retrying a VM that cannot move shows one
/// Event with a growing count. Not kube's `Recorder`: it folds events with the
/// same reason into one series that keeps the first note, and our notes name
/// the VMs.
#[derive(Clone)]
pub struct ObjectEvents {
    api: Api<KubeEvent>,
    regarding: ObjectReference,
    instance: String,
    series: Arc<Mutex<EventSeries>>,
}

/// Most distinct Events remembered for counting repeats; the oldest are forgotten first.
const SERIES_KEPT: usize = 256;

/// What makes two Events the same: type, reason and note.
type SeriesKey = (&'static str, String, String);

/// The Events written so far, by what makes two of them the same.
#[derive(Default)]
struct EventSeries {
    /// Each Event's key, name and count so far, oldest first.
    seen: Vec<(SeriesKey, (String, i32))>,
}

impl EventSeries {
    fn find(&mut self, key: &SeriesKey) -> Option<&mut (String, i32)> {
        self.seen.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn remember(&mut self, key: SeriesKey, name: String) {
        self.seen.retain(|(k, _)| *k != key);
        if self.seen.len() >= SERIES_KEPT {
            self.seen.remove(0);
        }
        self.seen.push((key, (name, 1)));
    }
}

impl ObjectEvents {
    /// Events about a Node.
    pub fn for_node(client: Client, node: &Node, instance: &str) -> ObjectEvents {
        ObjectEvents::for_object(
            client,
            ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: node.metadata.name.clone(),
                uid: node.metadata.uid.clone(),
                ..ObjectReference::default()
            },
            instance,
        )
    }

    /// Events about any cluster-scoped object (`kubectl describe` finds
    /// them by its kind, name and uid).
    pub fn for_object(client: Client, regarding: ObjectReference, instance: &str) -> ObjectEvents {
        ObjectEvents {
            api: Api::namespaced(client, "default"),
            regarding,
            instance: instance.to_string(),
            series: Arc::default(),
        }
    }

    /// Creates one Event, or counts a repeat of an earlier one in its series;
    /// `reason` is PascalCase, `note` says what happened to which VM.
    pub async fn publish(&self, severity: Severity, reason: &str, action: &str, note: &str) -> Result<(), kube::Error> {
        let now = jiff::Timestamp::now();
        let object = self.regarding.name.clone().unwrap_or_default();
        let note: String = note.chars().take(1000).collect();
        let type_ = match severity {
            Severity::Normal => "Normal",
            Severity::Warning => "Warning",
        };
        let key = (type_, reason.to_string(), note.clone());
        let repeat = self.series.lock().ok().and_then(|mut s| s.find(&key).cloned());
        if let Some((name, count)) = repeat {
            let patch = json!({"series": {"count": count + 1, "lastObservedTime": MicroTime(now)}});
            match self
                .api
                .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                Ok(_) => {
                    if let Ok(mut series) = self.series.lock()
                        && let Some(entry) = series.find(&key)
                    {
                        entry.1 = count + 1;
                    }
                    return Ok(());
                }
                // Expired (the API server keeps Events for an hour) or deleted: write it anew.
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let name = format!("{object}.{:x}", now.as_nanosecond());
        let event = KubeEvent {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some("default".into()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(type_.into()),
            reason: Some(reason.into()),
            action: Some(action.into()),
            note: Some(note),
            regarding: Some(self.regarding.clone()),
            reporting_controller: Some(CONTROLLER.into()),
            reporting_instance: Some(self.instance.clone()),
            ..KubeEvent::default()
        };
        self.api.create(&PostParams::default(), &event).await?;
        if let Ok(mut series) = self.series.lock() {
            series.remember(key, name);
        }
        Ok(())
    }
}
