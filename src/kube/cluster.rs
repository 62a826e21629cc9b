//! What the agent does to its cluster, behind a small trait so that the
//! agent's logic is tested against a fake cluster, and [`KubeCluster`], the
//! real one over the Kubernetes API.

use std::future::Future;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Node;
use kube::Client;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::guard::{Guard, GuardImage, GuardPod};
use super::{DrainState, NodeEvents, Severity, record_state};

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
    /// Publishes an Event about the Node without waiting for the API server.
    fn publish(&self, severity: Severity, reason: &'static str, note: String);
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
    events: Arc<Mutex<Option<NodeEvents>>>,
    notices: mpsc::UnboundedSender<(Severity, &'static str, String)>,
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
        let events: Arc<Mutex<Option<NodeEvents>>> = Arc::default();
        let (notices, receiver) = mpsc::unbounded_channel();
        tokio::spawn(publish_events(receiver, events.clone()));
        KubeCluster {
            guard: Guard::new(client.clone(), namespace, node),
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
        if let Ok(mut events) = self.events.lock()
            && events.is_none()
        {
            *events = Some(NodeEvents::new(self.client.clone(), node, &self.instance));
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
        let _ = self.notices.send((severity, reason, note));
    }
}

/// Creates the Events one after the other, off the agent's loop: an API server
/// slow to take Events never holds up a decision.
async fn publish_events(
    mut notices: mpsc::UnboundedReceiver<(Severity, &'static str, String)>,
    events: Arc<Mutex<Option<NodeEvents>>>,
) {
    while let Some((severity, reason, note)) = notices.recv().await {
        let sink = events.lock().ok().and_then(|e| e.clone());
        if let Some(sink) = sink
            && let Err(e) = sink.publish(severity, reason, "Evacuate", &note).await
        {
            warn!(error = %e, %reason, "could not publish an Event");
        }
    }
}
