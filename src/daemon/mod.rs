//! Daemon mode: the agent of one node. Level-triggered: every decision looks
//! at the Node, the guard pod and the node's Evacuation objects as they are
//! now (cordoned or not, the drain state in the Node's annotations, the
//! guard pod's finalizer and phase, which Evacuations ask for a run),
//! never at which events were seen, so a node already cordoned at start-up or
//! after a restart is handled the same way as a fresh cordon.
//!
//! [`decide`] holds the decisions, [`agent`] carries them out; this module
//! wires them to the Kubernetes watches, the Nova connection and the signals.
//! The agent starts without Nova and connects in the background, so a control
//! plane that is down (as it often is in a maintenance window) never keeps it
//! from watching its Node.

pub mod agent;
pub mod coordinator;
pub mod decide;
pub mod queue;
pub mod record;
pub mod release;
pub mod relief;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::runtime::watcher;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::config::Config;
use crate::evacuation::Target;
use crate::kube::evacuation::{Evacuation, EvacuationSeen};
use crate::kube::leases::CoordinationLeases;
use crate::kube::{GuardPod, KubeCluster, watch_guard, watch_node};
use crate::nova::microversion::Microversion;
use crate::nova::{Credentials, NovaClient};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::server::{Health, NovaSlot};
use agent::{Agent, AgentSettings, Input};
use coordinator::{CoordinationSettings, Standing};
pub use decide::RetryBackoff;

/// How the agent runs, beside the evacuation settings.
#[derive(Clone, Debug)]
pub struct DaemonSettings {
    pub target: Target,
    /// Namespace of the guard pod and budget (the agent's own).
    pub namespace: String,
    /// Image of the guard pod; `None`: the agent's own image, read from its pod.
    pub guard_image: Option<String>,
    /// The agent's own pod (`$POD_NAME`), whose image the guard runs.
    pub own_pod: Option<String>,
    /// How long the guard pod may take to become Running before it is reported.
    pub guard_grace: Duration,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub listen: SocketAddr,
    /// Let `kubectl drain` finish even when VMs could not be moved (after the time-out or failure).
    pub release_guard_on_failure: bool,
    /// The Evacuation a cordon creates starts paused (a person approves each).
    pub start_paused: bool,
    /// Waits before evacuating again after failed runs while the node stays cordoned.
    pub retry: RetryBackoff,
    /// Identifies this agent in Events (its pod name).
    pub instance: String,
    /// The cluster's shared evacuation slots; `None`: each agent evacuates alone.
    pub coordination: Option<CoordinationSettings>,
    /// Memory relief; `None`: off.
    pub relief: Option<relief::ReliefSettings>,
}

/// Longest wait between two attempts to reach Nova at start-up.
const CONNECT_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Runs the agent until SIGTERM/SIGINT; returns the exit code.
pub async fn run(settings: DaemonSettings, mut config: Config, kube: kube::Client) -> i32 {
    // A cordon is the operator's decision: stop new VMs landing before anything else.
    config.evacuation.disable_first = true;
    let metrics = Arc::new(Metrics::default());
    let health = Health::default();
    let nova = NovaSlot::default();
    crate::telemetry::server::spawn(settings.listen, metrics.clone(), nova.clone(), health.clone());

    let cluster = Arc::new(KubeCluster::new(
        kube.clone(),
        &settings.target.node,
        &settings.namespace,
        settings.guard_image.clone(),
        settings.own_pod.clone(),
        &settings.instance,
    ));
    let (inputs, receiver) = mpsc::channel(64);
    let (fatal_tx, mut fatal) = mpsc::channel::<String>(1);
    let (node_seen, node_told) = watch::channel(None);
    tokio::spawn(forward_node(
        watch_node(kube.clone(), &settings.target.node),
        inputs.clone(),
        node_seen,
    ));
    if let Some(relief) = settings.relief.clone() {
        tokio::spawn(
            relief::ReliefTask {
                settings: relief,
                target: settings.target.clone(),
                evacuation: config.evacuation.clone(),
                kube: kube.clone(),
                namespace: settings.namespace.clone(),
                instance: settings.instance.clone(),
                node: node_told,
                nova: nova.clone(),
                metrics: metrics.clone(),
            }
            .run(),
        );
    }
    tokio::spawn(forward_guard(
        watch_guard(
            kube.clone(),
            &settings.namespace,
            &crate::kube::guard::guard_name(&settings.target.node),
        ),
        inputs.clone(),
    ));
    tokio::spawn(forward_evacuations(
        crate::kube::evacuation::watch_evacuations(kube.clone(), &settings.target.node),
        inputs.clone(),
    ));
    tokio::spawn(connect(
        config.credentials.clone(),
        config.compute_api_version,
        nova.clone(),
        inputs.clone(),
        fatal_tx,
    ));
    let want = settings.coordination.map(|coordination| {
        let leases = CoordinationLeases::new(
            kube.clone(),
            &settings.namespace,
            &settings.target.node,
            &settings.target.host,
            coordination.lease,
        );
        let (want, asked) = watch::channel(None);
        let (standing, told) = watch::channel(Standing::Idle);
        tokio::spawn(coordinator::run(leases, coordination, asked, standing));
        tokio::spawn(forward_standing(told.clone(), inputs.clone()));
        (want, told)
    });
    let signals = match forward_signals(inputs) {
        Ok(task) => task,
        Err(e) => {
            error!("cannot listen for SIGTERM: {e}");
            return crate::exit::FAILED;
        }
    };

    info!(node = %settings.target.node, host = %settings.target.host, "watching the node");
    let agent = Agent::new(
        AgentSettings {
            target: settings.target,
            evacuation: config.evacuation,
            release_guard_on_failure: settings.release_guard_on_failure,
            start_paused: settings.start_paused,
            retry: settings.retry,
            guard_grace: settings.guard_grace,
        },
        cluster,
        metrics,
        health,
    );
    let agent = match want {
        Some((want, told)) => agent.coordinated(want, told),
        None => agent,
    };
    let code = tokio::select! {
        code = agent.run(receiver) => code,
        Some(why) = fatal.recv() => {
            error!("cannot use the cloud: {why}");
            crate::exit::USAGE
        }
    };
    signals.abort();
    code
}

/// Reaches Nova with backoff for as long as it takes; gives up (exit 2) only on
/// what can never work: refused credentials, a bad CA bundle, no compute
/// endpoint, no common microversion.
async fn connect(
    credentials: Credentials,
    cap: Option<Microversion>,
    slot: NovaSlot,
    inputs: mpsc::Sender<Input<NovaClient>>,
    fatal: mpsc::Sender<String>,
) {
    let mut delay = Duration::from_secs(1);
    loop {
        match NovaClient::connect(&credentials, cap).await {
            Ok(client) => {
                info!(microversion = %client.microversion(), "connected to Nova");
                let client = Arc::new(client);
                let _ = slot.set(client.clone());
                let _ = inputs.send(Input::ComputeReady(client)).await;
                return;
            }
            Err(e) if e.is_transient() => {
                warn!(error = %e, retry_in_seconds = delay.as_secs(), "Nova or Keystone cannot be reached; not ready");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(CONNECT_BACKOFF_MAX);
            }
            Err(e) => {
                let _ = fatal.send(e.to_string()).await;
                return;
            }
        }
    }
}

/// The node's standing in the queue for evacuation slots, as inputs.
async fn forward_standing(mut told: watch::Receiver<Standing>, inputs: mpsc::Sender<Input<NovaClient>>) {
    while told.changed().await.is_ok() {
        let standing = told.borrow_and_update().clone();
        if inputs.send(Input::Slot(standing)).await.is_err() {
            return;
        }
    }
}

/// The Node watch, as inputs (and as the latest Node, for memory relief).
/// A (re-)list that does not contain the Node means it is gone.
async fn forward_node(
    stream: impl Stream<Item = Result<watcher::Event<k8s_openapi::api::core::v1::Node>, watcher::Error>>,
    inputs: mpsc::Sender<Input<NovaClient>>,
    latest: watch::Sender<Option<k8s_openapi::api::core::v1::Node>>,
) {
    futures::pin_mut!(stream);
    let mut listed_node = false;
    while let Some(item) = stream.next().await {
        let input = match item {
            Ok(watcher::Event::Init) => {
                listed_node = false;
                continue;
            }
            Ok(watcher::Event::InitApply(node)) => {
                listed_node = true;
                latest.send_replace(Some(node.clone()));
                Input::Node(Some(Box::new(node)))
            }
            Ok(watcher::Event::InitDone) => {
                if !listed_node && inputs.send(Input::Node(None)).await.is_err() {
                    return;
                }
                Input::NodeListed
            }
            Ok(watcher::Event::Apply(node)) => {
                latest.send_replace(Some(node.clone()));
                Input::Node(Some(Box::new(node)))
            }
            Ok(watcher::Event::Delete(_)) => {
                latest.send_replace(None);
                Input::Node(None)
            }
            Err(e) => {
                warn!(error = %e, "node watch failed; retrying");
                continue;
            }
        };
        if inputs.send(input).await.is_err() {
            return;
        }
    }
}

/// The guard pod watch, as inputs. A (re-)list is taken in whole at its end, so
/// a pod it does not repeat counts as gone.
async fn forward_guard(
    stream: impl Stream<Item = Result<watcher::Event<k8s_openapi::api::core::v1::Pod>, watcher::Error>>,
    inputs: mpsc::Sender<Input<NovaClient>>,
) {
    futures::pin_mut!(stream);
    let mut listing = GuardPod::Missing;
    while let Some(item) = stream.next().await {
        let pod = match item {
            Ok(watcher::Event::Init) => {
                listing = GuardPod::Missing;
                continue;
            }
            Ok(watcher::Event::InitApply(pod)) => {
                listing = GuardPod::of(Some(&pod));
                continue;
            }
            Ok(watcher::Event::InitDone) => std::mem::replace(&mut listing, GuardPod::Missing),
            Ok(watcher::Event::Apply(pod)) => GuardPod::of(Some(&pod)),
            Ok(watcher::Event::Delete(_)) => GuardPod::Missing,
            Err(e) => {
                warn!(error = %e, "guard pod watch failed; retrying");
                continue;
            }
        };
        if inputs.send(Input::Guard(pod)).await.is_err() {
            return;
        }
    }
}

/// Evacuations deleted since start-up remembered, at most, so that the
/// deletion of the one recording the run is seen even after it is gone.
const DELETED_REMEMBERED: usize = 32;

/// The node's Evacuations as the agent's decisions see them: those that
/// exist, and those deleted since start-up (kept as being deleted, unless
/// one of the same name exists again).
#[derive(Default)]
struct EvacuationView {
    live: BTreeMap<String, EvacuationSeen>,
    /// A (re-)list under way.
    listing: BTreeMap<String, EvacuationSeen>,
    /// Deleted, oldest first.
    gone: VecDeque<EvacuationSeen>,
    /// A list has come from the API server once.
    listed: bool,
}

impl EvacuationView {
    /// Folds one watch event in; `true`: the view is complete and changed.
    fn apply(&mut self, event: watcher::Event<Evacuation>) -> bool {
        match event {
            watcher::Event::Init => {
                self.listing.clear();
                false
            }
            watcher::Event::InitApply(evacuation) => {
                let seen = EvacuationSeen::of(&evacuation);
                self.listing.insert(seen.name.clone(), seen);
                false
            }
            watcher::Event::InitDone => {
                let listing = std::mem::take(&mut self.listing);
                let vanished: Vec<EvacuationSeen> = std::mem::take(&mut self.live)
                    .into_values()
                    .filter(|seen| !listing.contains_key(&seen.name))
                    .collect();
                vanished.into_iter().for_each(|seen| self.bury(seen));
                self.live = listing;
                self.listed = true;
                true
            }
            watcher::Event::Apply(evacuation) => {
                let seen = EvacuationSeen::of(&evacuation);
                self.live.insert(seen.name.clone(), seen);
                self.listed
            }
            watcher::Event::Delete(evacuation) => {
                let seen = EvacuationSeen::of(&evacuation);
                self.live.remove(&seen.name);
                self.bury(seen);
                self.listed
            }
        }
    }

    fn bury(&mut self, mut seen: EvacuationSeen) {
        seen.deleting = true;
        seen.held = false;
        self.gone.retain(|g| g.name != seen.name);
        self.gone.push_back(seen);
        while self.gone.len() > DELETED_REMEMBERED {
            self.gone.pop_front();
        }
    }

    fn snapshot(&self) -> Vec<EvacuationSeen> {
        let gone = self.gone.iter().filter(|g| !self.live.contains_key(&g.name));
        self.live.values().chain(gone).cloned().collect()
    }
}

/// The Evacuation watch, as inputs: the node's Evacuations as a whole after
/// each change. Without the CRD, or the right to list it by node (an API
/// server before selectable fields), the agent is told they cannot be
/// known: cordons work without them. A failed re-list keeps the last view.
async fn forward_evacuations(
    stream: impl Stream<Item = Result<watcher::Event<Evacuation>, watcher::Error>>,
    inputs: mpsc::Sender<Input<NovaClient>>,
) {
    futures::pin_mut!(stream);
    let mut view = EvacuationView::default();
    let mut told_unavailable = false;
    while let Some(item) = stream.next().await {
        let input = match item {
            Ok(event) => {
                if !view.apply(event) {
                    continue;
                }
                Input::Evacuations(view.snapshot())
            }
            Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                if matches!(status.code, 400 | 403 | 404) =>
            {
                if told_unavailable {
                    continue;
                }
                told_unavailable = true;
                warn!(
                    code = status.code,
                    reason = %status.message,
                    "cannot list this node's Evacuations (the CRD not installed, the agent not allowed, or an API \
                     server without selectable fields): cordons are evacuated, Evacuations made by hand are not \
                     acted on"
                );
                if view.listed {
                    continue;
                }
                Input::EvacuationsUnknown
            }
            Err(e) => {
                warn!(error = %e, "Evacuation watch failed; retrying");
                continue;
            }
        };
        if inputs.send(input).await.is_err() {
            return;
        }
    }
}

fn forward_signals(inputs: mpsc::Sender<Input<NovaClient>>) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    Ok(tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let _ = inputs.send(Input::Terminate).await;
    }))
}

#[cfg(test)]
mod view_tests {
    use super::*;
    use crate::kube::evacuation::EvacuationSpec;

    fn evacuation(name: &str) -> Evacuation {
        Evacuation::new(
            name,
            EvacuationSpec {
                node_name: "node-a".into(),
                ..EvacuationSpec::default()
            },
        )
    }

    fn names(view: &EvacuationView) -> Vec<(String, bool)> {
        view.snapshot().into_iter().map(|s| (s.name, s.deleting)).collect()
    }

    #[test]
    fn deleted_evacuations_are_remembered_as_being_deleted_and_a_new_one_of_the_same_name_shadows_them() {
        let mut view = EvacuationView::default();
        assert!(!view.apply(watcher::Event::Init));
        assert!(!view.apply(watcher::Event::InitApply(evacuation("a"))));
        assert!(!view.apply(watcher::Event::InitApply(evacuation("b"))));
        assert!(view.apply(watcher::Event::InitDone), "complete once listed");
        assert!(view.apply(watcher::Event::Delete(evacuation("a"))));
        assert_eq!(names(&view), [("b".into(), false), ("a".into(), true)]);
        assert!(view.apply(watcher::Event::Apply(evacuation("a"))));
        assert_eq!(names(&view), [("a".into(), false), ("b".into(), false)], "made again");
        // A re-list that misses one (its deletion lost with the watch) buries it.
        view.apply(watcher::Event::Init);
        view.apply(watcher::Event::InitApply(evacuation("a")));
        view.apply(watcher::Event::InitDone);
        assert_eq!(names(&view), [("a".into(), false), ("b".into(), true)]);
        // Many deletions forget the oldest tombstones, never a live one.
        for i in 0..DELETED_REMEMBERED + 5 {
            view.apply(watcher::Event::Delete(evacuation(&format!("old-{i}"))));
        }
        let snapshot = names(&view);
        assert!(snapshot.contains(&("a".into(), false)));
        assert!(
            !snapshot.contains(&("b".into(), true)),
            "the oldest tombstone forgotten"
        );
        assert_eq!(snapshot.len(), 1 + DELETED_REMEMBERED);
    }
}
