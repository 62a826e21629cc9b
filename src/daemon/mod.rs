//! Daemon mode: the agent of one node. Level-triggered: every decision looks
//! at the Node and the guard pod as they are now (cordoned or not, the drain
//! state in the Node's annotations, the guard pod's finalizer and phase),
//! never at which events were seen, so a node already cordoned at start-up or
//! after a restart is handled the same way as a fresh cordon.
//!
//! [`decide`] holds the decisions, [`agent`] carries them out; this module
//! wires them to the Kubernetes watches, the Nova connection and the signals.
//! The agent starts without Nova and connects in the background, so a control
//! plane that is down (as it often is in a maintenance window) never keeps it
//! from watching its Node.

pub mod agent;
pub mod decide;
pub mod record;
pub mod release;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::runtime::watcher;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::config::{Config, Credentials};
use crate::evacuation::Target;
use crate::kube::evacuation::{Evacuation, EvacuationSeen};
use crate::kube::{GuardPod, KubeCluster, watch_guard, watch_node};
use crate::nova::NovaClient;
use crate::nova::microversion::Microversion;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::server::{Health, NovaSlot};
use agent::{Agent, AgentSettings, Input};
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
    tokio::spawn(forward_node(
        watch_node(kube.clone(), &settings.target.node),
        inputs.clone(),
    ));
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
        nova,
        inputs.clone(),
        fatal_tx,
    ));
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

/// The Node watch, as inputs. A (re-)list that does not contain the Node means it is gone.
async fn forward_node(
    stream: impl Stream<Item = Result<watcher::Event<k8s_openapi::api::core::v1::Node>, watcher::Error>>,
    inputs: mpsc::Sender<Input<NovaClient>>,
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
                Input::Node(Some(Box::new(node)))
            }
            Ok(watcher::Event::InitDone) => {
                if !listed_node && inputs.send(Input::Node(None)).await.is_err() {
                    return;
                }
                Input::NodeListed
            }
            Ok(watcher::Event::Apply(node)) => Input::Node(Some(Box::new(node))),
            Ok(watcher::Event::Delete(_)) => Input::Node(None),
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

/// The Evacuation watch, as inputs: the node's Evacuations as a whole after
/// each change, those deleted kept as being deleted. Without the CRD the
/// list is empty (and said once): cordons work without it.
async fn forward_evacuations(
    stream: impl Stream<Item = Result<watcher::Event<Evacuation>, watcher::Error>>,
    inputs: mpsc::Sender<Input<NovaClient>>,
) {
    futures::pin_mut!(stream);
    let mut seen: BTreeMap<String, EvacuationSeen> = BTreeMap::new();
    let mut listing: BTreeMap<String, EvacuationSeen> = BTreeMap::new();
    let mut deleted: VecDeque<String> = VecDeque::new();
    let mut told_missing = false;
    while let Some(item) = stream.next().await {
        let mut gone = |seen: &mut BTreeMap<String, EvacuationSeen>, name: String| {
            if let Some(entry) = seen.get_mut(&name) {
                entry.deleting = true;
                entry.held = false;
                deleted.push_back(name);
            }
            while deleted.len() > DELETED_REMEMBERED {
                if let Some(oldest) = deleted.pop_front() {
                    seen.remove(&oldest);
                }
            }
        };
        match item {
            Ok(watcher::Event::Init) => {
                listing.clear();
                continue;
            }
            Ok(watcher::Event::InitApply(evacuation)) => {
                let entry = EvacuationSeen::of(&evacuation);
                listing.insert(entry.name.clone(), entry);
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                let vanished: Vec<String> = seen
                    .iter()
                    .filter(|(name, entry)| !entry.deleting && !listing.contains_key(*name))
                    .map(|(name, _)| name.clone())
                    .collect();
                for name in vanished {
                    gone(&mut seen, name);
                }
                seen.retain(|name, entry| entry.deleting || listing.contains_key(name));
                seen.extend(std::mem::take(&mut listing));
            }
            Ok(watcher::Event::Apply(evacuation)) => {
                let entry = EvacuationSeen::of(&evacuation);
                seen.insert(entry.name.clone(), entry);
            }
            Ok(watcher::Event::Delete(evacuation)) => {
                let entry = EvacuationSeen::of(&evacuation);
                let name = entry.name.clone();
                seen.insert(name.clone(), entry);
                gone(&mut seen, name);
            }
            // Without the CRD, or the right to watch it, cordons are still acted on.
            Err(watcher::Error::InitialListFailed(kube::Error::Api(status))) if matches!(status.code, 403 | 404) => {
                if !told_missing {
                    warn!(
                        code = status.code,
                        "cannot list the Evacuations (the CRD is not installed, or the agent may not watch it): \
                         cordons are evacuated, Evacuations made by hand are not acted on"
                    );
                    told_missing = true;
                }
                listing.clear();
                if inputs.send(Input::Evacuations(Vec::new())).await.is_err() {
                    return;
                }
                continue;
            }
            Err(e) => {
                warn!(error = %e, "Evacuation watch failed; retrying");
                continue;
            }
        }
        if inputs
            .send(Input::Evacuations(seen.values().cloned().collect()))
            .await
            .is_err()
        {
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
