//! What the agent does to its cluster, behind a small trait so that the
//! agent's logic is tested against a fake cluster, and [`KubeCluster`], the
//! real one over the Kubernetes API.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::{Api, Client};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::evacuation::{EvacuationStatus, Evacuations};
use super::guard::{Guard, GuardImage, GuardPod};
use super::{DrainState, ObjectEvents, Severity, record_state};

/// The agent's writes to its cluster. Reads come in through the watches.
pub trait Cluster: Send + Sync + 'static {
    /// Name of the guard pod and of its budget.
    fn guard_name(&self) -> &str;
    /// The Node as last seen (Events name it, the guard is owned by it).
    fn node_seen(&self, node: &Node);
    /// Records the drain state in the Node's annotations.
    fn record(&self, state: &DrainState) -> impl Future<Output = Result<(), String>> + Send;
    /// Creates the guard pod (with our finalizer) and budget where missing, or
    /// puts the finalizer back on a pod that lacks it.
    fn put_guard(&self, node: &Node, current: &GuardPod) -> impl Future<Output = Result<(), String>> + Send;
    /// Deletes the budget and takes our finalizer off the pod: drain may finish.
    fn release_guard(&self) -> impl Future<Output = Result<(), String>> + Send;
    /// Publishes an Event about the Node without waiting for the API server,
    /// and about the Evacuation being followed, if any.
    fn publish(&self, severity: Severity, reason: &'static str, note: String);
    /// From now on (in the order of the Events published), Events are also
    /// about Evacuation `name`; `None`: no longer.
    fn follow_evacuation(&self, name: Option<&str>);
    /// Waits until the Events published so far have been handed to the API server.
    fn flush_events(&self) -> impl Future<Output = ()> + Send;
    /// Why this agent is being uninstalled rather than restarted, if it is:
    /// its namespace terminating, its DaemonSet gone or being deleted, or no
    /// longer selecting the node. `Ok(None)`: a restart or a rolling update
    /// (the DaemonSet stays), or nothing tells.
    fn uninstalled(&self) -> impl Future<Output = Result<Option<String>, String>> + Send;
    /// Creates the Evacuation recording a run that starts at `at` on `node`
    /// (`paused`: waiting for approval); its name.
    fn open_evacuation(
        &self,
        node: &Node,
        at: jiff::Timestamp,
        paused: bool,
    ) -> impl Future<Output = Result<String, String>> + Send;
    /// The status of Evacuation `name` as last written.
    fn read_evacuation(&self, name: &str) -> impl Future<Output = Result<Option<EvacuationStatus>, String>> + Send;
    /// Writes the status of Evacuation `name`.
    fn write_evacuation(
        &self,
        name: &str,
        status: &EvacuationStatus,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Puts our finalizer on a hand-made Evacuation, so its deletion waits for the agent.
    fn hold_evacuation(&self, name: &str) -> impl Future<Output = Result<(), String>> + Send;
    /// Takes our finalizer off an Evacuation being deleted: it may go.
    fn let_evacuation_go(&self, name: &str) -> impl Future<Output = Result<(), String>> + Send;
}

/// What the Event publisher is handed.
enum Notice {
    Event(Severity, &'static str, String),
    /// The Evacuation the next Events are also about.
    Follow(Option<String>),
    /// Answered once every Event before it has been written.
    Flush(oneshot::Sender<()>),
}

/// [`Cluster`] over the Kubernetes API.
pub struct KubeCluster {
    client: Client,
    node: String,
    namespace: String,
    guard: Guard,
    /// Set: `--guard-image`; else read once from the agent's own pod.
    guard_image: tokio::sync::Mutex<Option<GuardImage>>,
    own_pod: Option<String>,
    instance: String,
    events: Arc<Mutex<Option<ObjectEvents>>>,
    notices: mpsc::UnboundedSender<Notice>,
    /// The Node's labels as last seen, to tell whether the DaemonSet still selects it.
    node_labels: Mutex<BTreeMap<String, String>>,
    evacuations: Evacuations,
}

impl KubeCluster {
    /// Starts the Event publisher on the current runtime.
    pub fn new(
        client: Client,
        node: &str,
        namespace: &str,
        guard_image: Option<String>,
        own_pod: Option<String>,
        instance: &str,
    ) -> KubeCluster {
        let events: Arc<Mutex<Option<ObjectEvents>>> = Arc::default();
        let (notices, receiver) = mpsc::unbounded_channel();
        tokio::spawn(publish_events(
            receiver,
            events.clone(),
            client.clone(),
            instance.to_string(),
        ));
        KubeCluster {
            guard: Guard::new(client.clone(), namespace, node),
            evacuations: Evacuations::new(client.clone(), node),
            client,
            node: node.to_string(),
            namespace: namespace.to_string(),
            guard_image: tokio::sync::Mutex::new(guard_image.map(|image| GuardImage {
                image,
                pull_secrets: Vec::new(),
            })),
            own_pod,
            instance: instance.to_string(),
            events,
            notices,
            node_labels: Mutex::default(),
        }
    }

    async fn guard_image(&self) -> Result<GuardImage, String> {
        let mut slot = self.guard_image.lock().await;
        if let Some(image) = slot.as_ref() {
            return Ok(image.clone());
        }
        let own_pod = self
            .own_pod
            .as_deref()
            .ok_or("cannot tell the guard's image: pass --guard-image, or set POD_NAME to the agent's pod")?;
        let image = GuardImage::of_own_pod(self.client.clone(), &self.namespace, own_pod).await?;
        info!(image = %image.image, "the guard runs the agent's own image");
        *slot = Some(image.clone());
        Ok(image)
    }
}

impl Cluster for KubeCluster {
    fn guard_name(&self) -> &str {
        self.guard.name()
    }

    fn node_seen(&self, node: &Node) {
        if let Ok(mut labels) = self.node_labels.lock() {
            *labels = node.metadata.labels.clone().unwrap_or_default();
        }
        if let Ok(mut events) = self.events.lock()
            && events.is_none()
        {
            *events = Some(ObjectEvents::for_node(self.client.clone(), node, &self.instance));
        }
    }

    async fn record(&self, state: &DrainState) -> Result<(), String> {
        record_state(&self.client, &self.node, state)
            .await
            .map_err(|e| format!("recording the drain state on node {}: {e}", self.node))
    }

    async fn put_guard(&self, node: &Node, current: &GuardPod) -> Result<(), String> {
        let image = self.guard_image().await?;
        self.guard
            .ensure(node, &image, current)
            .await
            .map_err(|e| format!("putting the guard {} in place: {e}", self.guard.name()))
    }

    async fn release_guard(&self) -> Result<(), String> {
        self.guard
            .release()
            .await
            .map_err(|e| format!("releasing the guard {}: {e}", self.guard.name()))
    }

    fn publish(&self, severity: Severity, reason: &'static str, note: String) {
        match severity {
            Severity::Normal => info!(%reason, %note, "event"),
            Severity::Warning => warn!(%reason, %note, "event"),
        }
        let _ = self.notices.send(Notice::Event(severity, reason, note));
    }

    fn follow_evacuation(&self, name: Option<&str>) {
        let _ = self.notices.send(Notice::Follow(name.map(str::to_string)));
    }

    async fn flush_events(&self) {
        let (done, written) = oneshot::channel();
        if self.notices.send(Notice::Flush(done)).is_ok() {
            let _ = written.await;
        }
    }

    async fn uninstalled(&self) -> Result<Option<String>, String> {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let namespace = namespaces.get_opt(&self.namespace).await.map_err(|e| {
            credentials_refused(&e).unwrap_or_else(|| format!("reading namespace {}: {e}", self.namespace))
        })?;
        match namespace {
            None => return Ok(Some(format!("its namespace {} is gone", self.namespace))),
            Some(ns) if ns.metadata.deletion_timestamp.is_some() => {
                return Ok(Some(format!("its namespace {} is being deleted", self.namespace)));
            }
            Some(_) => {}
        }
        let Some(own_pod) = &self.own_pod else {
            return Ok(None);
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let pod = pods
            .get_opt(own_pod)
            .await
            .map_err(|e| format!("reading the agent's own pod {own_pod}: {e}"))?;
        let owner = pod
            .and_then(|p| p.metadata.owner_references)
            .unwrap_or_default()
            .into_iter()
            .find(|o| o.controller == Some(true) && o.kind == "DaemonSet");
        let Some(owner) = owner else {
            return Ok(None);
        };
        let daemonsets: Api<DaemonSet> = Api::namespaced(self.client.clone(), &self.namespace);
        let daemonset = daemonsets
            .get_opt(&owner.name)
            .await
            .map_err(|e| format!("reading the agent's DaemonSet {}: {e}", owner.name))?;
        let Some(daemonset) = daemonset else {
            return Ok(Some(format!("its DaemonSet {} is gone", owner.name)));
        };
        if daemonset.metadata.deletion_timestamp.is_some() {
            return Ok(Some(format!("its DaemonSet {} is being deleted", owner.name)));
        }
        if daemonset.metadata.uid.as_deref() != Some(owner.uid.as_str()) {
            // Deleted and created again: the new DaemonSet's agent takes over.
            return Ok(None);
        }
        let selector = daemonset
            .spec
            .and_then(|s| s.template.spec)
            .and_then(|s| s.node_selector)
            .unwrap_or_default();
        let labels = self.node_labels.lock().map(|l| l.clone()).unwrap_or_default();
        if selector.iter().any(|(key, value)| labels.get(key) != Some(value)) {
            return Ok(Some(format!(
                "its DaemonSet {} no longer selects node {}",
                owner.name, self.node
            )));
        }
        Ok(None)
    }

    async fn open_evacuation(&self, node: &Node, at: jiff::Timestamp, paused: bool) -> Result<String, String> {
        self.evacuations
            .create(node, at, paused)
            .await
            .map_err(|e| format!("creating the Evacuation of node {}: {e}", self.node))
    }

    async fn read_evacuation(&self, name: &str) -> Result<Option<EvacuationStatus>, String> {
        self.evacuations
            .read_status(name)
            .await
            .map_err(|e| format!("reading the status of Evacuation {name}: {e}"))
    }

    async fn write_evacuation(&self, name: &str, status: &EvacuationStatus) -> Result<(), String> {
        self.evacuations
            .write_status(name, status)
            .await
            .map_err(|e| format!("writing the status of Evacuation {name}: {e}"))
    }

    async fn hold_evacuation(&self, name: &str) -> Result<(), String> {
        self.evacuations
            .hold(name)
            .await
            .map_err(|e| format!("putting our finalizer on Evacuation {name}: {e}"))
    }

    async fn let_evacuation_go(&self, name: &str) -> Result<(), String> {
        self.evacuations
            .let_go(name)
            .await
            .map_err(|e| format!("taking our finalizer off Evacuation {name}: {e}"))
    }
}

/// The cause, said plainly, when the API server refuses the agent's
/// credentials (401): its ServiceAccount token is no longer valid, which
/// happens at once when the ServiceAccount is deleted, as `kubectl delete -k
/// deploy/` does, and then nothing the agent does can reach the API server.
fn credentials_refused(error: &kube::Error) -> Option<String> {
    match error {
        kube::Error::Api(status) if status.code == 401 => Some(
            "the API server no longer accepts the agent's credentials (its ServiceAccount was deleted, as `kubectl \
             delete -k deploy/` does)"
                .to_string(),
        ),
        _ => None,
    }
}

/// Creates the Events one after the other, off the agent's loop: an API server
/// slow to take Events never holds up a decision.
async fn publish_events(
    mut notices: mpsc::UnboundedReceiver<Notice>,
    events: Arc<Mutex<Option<ObjectEvents>>>,
    client: Client,
    instance: String,
) {
    let mut following: Option<ObjectEvents> = None;
    while let Some(notice) = notices.recv().await {
        let (severity, reason, note) = match notice {
            Notice::Event(severity, reason, note) => (severity, reason, note),
            Notice::Flush(done) => {
                let _ = done.send(());
                continue;
            }
            Notice::Follow(None) => {
                following = None;
                continue;
            }
            Notice::Follow(Some(name)) => {
                following = match Evacuations::reference(client.clone(), &name).await {
                    Ok(regarding) => Some(ObjectEvents::for_object(client.clone(), regarding, &instance)),
                    Err(e) => {
                        warn!(error = %e, evacuation = %name, "its Events go to the Node only");
                        None
                    }
                };
                continue;
            }
        };
        let node = events.lock().ok().and_then(|e| e.clone());
        for sink in node.iter().chain(following.iter()) {
            publish_retrying(sink, severity, reason, &note).await;
        }
    }
}

/// How long an Event the API server could not take is tried again: the
/// Events that matter most (a lost evacuation slot) come when it is unreachable.
const EVENT_RETRY_FOR: Duration = Duration::from_secs(300);
/// Longest wait between two tries of one Event.
const EVENT_RETRY_MAX: Duration = Duration::from_secs(30);

/// Publishes one Event, trying again with backoff while the API server
/// cannot be reached or is overloaded; one it refuses is dropped (and logged).
/// Later Events wait their turn, so they keep their order.
async fn publish_retrying(sink: &ObjectEvents, severity: Severity, reason: &'static str, note: &str) {
    let give_up = tokio::time::Instant::now() + EVENT_RETRY_FOR;
    let mut delay = Duration::from_secs(1);
    loop {
        let error = match sink.publish(severity, reason, "Evacuate", note).await {
            Ok(()) => return,
            Err(e) => e,
        };
        let refused = matches!(&error, kube::Error::Api(status) if status.code < 500 && status.code != 429);
        if refused || tokio::time::Instant::now() + delay > give_up {
            warn!(error = %error, %reason, "could not publish an Event");
            return;
        }
        warn!(error = %error, %reason, retry_in_seconds = delay.as_secs(), "could not publish an Event yet; trying again");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(EVENT_RETRY_MAX);
    }
}
