//! Daemon mode: ties the Node's state to the evacuation engine. Level-
//! triggered: every decision looks at the Node and the guard pod as they are
//! now (cordoned or not, the drain state in the Node's annotations, the guard
//! pod's finalizer and phase), never at which events were seen, so a node
//! already cordoned at start-up or after a restart is handled the same way as
//! a fresh cordon.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::watcher;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::evacuation::{
    Action, Compute, Engine, EvacuationError, Event, Observer, Report, RestoreOutcome, RunResult, StopRequest, Target,
};
use crate::kube::guard::{GuardImage, GuardPod};
use crate::kube::{DrainState, Guard, NodeEvents, Phase, Severity, record_state, watch_guard, watch_node};
use crate::nova::NovaClient;
use crate::telemetry::metrics::Metrics;

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
    /// Wait before evacuating again after a failed run while the node stays cordoned.
    pub retry_after_failure: Duration,
    /// Identifies this agent in Events (its pod name).
    pub instance: String,
}

/// How long SIGTERM may take: stop starting migrations, record state, exit.
const SHUTDOWN_BUDGET: Duration = Duration::from_secs(8);
/// Wait before trying again to put the guard in place or release it after an API error.
const GUARD_RETRY: Duration = Duration::from_secs(10);

/// An Event for the publisher task.
struct Notice {
    severity: Severity,
    reason: &'static str,
    note: String,
}

struct DaemonObserver {
    notices: mpsc::UnboundedSender<Notice>,
    /// VMs left, for the agent to record on the Node (it alone writes the annotations).
    left: mpsc::UnboundedSender<usize>,
    metrics: Arc<Metrics>,
    total: AtomicUsize,
    /// Set once an uncordon asked the engine to abort: what stays is cancelled, not failed.
    cancelling: Arc<AtomicBool>,
}

impl DaemonObserver {
    fn send(&self, severity: Severity, reason: &'static str, note: String) {
        let _ = self.notices.send(Notice { severity, reason, note });
    }
}

fn vm(server: &crate::evacuation::Server) -> String {
    format!("{} ({})", server.name, server.id)
}

impl Observer for DaemonObserver {
    fn event(&self, event: &Event<'_>) {
        match event {
            Event::ServiceDisabled { reason } => self.send(
                Severity::Normal,
                "NovaComputeDisabled",
                format!("nova-compute disabled: {reason}"),
            ),
            Event::ServiceAlreadyDisabled { .. } => {}
            Event::EvacuationStarted { to_move, to_skip } => {
                self.total.store(to_move + to_skip, Ordering::Relaxed);
                self.metrics.vms_remaining.set((to_move + to_skip) as i64);
                self.send(
                    Severity::Normal,
                    "EvacuationStarted",
                    format!("moving {to_move} VM(s) off the hypervisor; {to_skip} left in place by policy"),
                )
            }
            Event::MigrationStarted {
                server,
                action,
                attempt,
            } => {
                let reason = if *action == Action::ColdMigrate {
                    "ColdMigrationStarted"
                } else {
                    "LiveMigrationStarted"
                };
                self.send(Severity::Normal, reason, format!("{} attempt {attempt}", vm(server)))
            }
            Event::MigrationSucceeded {
                server,
                action,
                destination,
                seconds,
            } => {
                let reason = if *action == Action::ColdMigrate {
                    "ColdMigrationSucceeded"
                } else {
                    "LiveMigrationSucceeded"
                };
                self.send(
                    Severity::Normal,
                    reason,
                    format!("{} now on {destination} after {seconds:.1} s", vm(server)),
                )
            }
            Event::MigrationFailed {
                server,
                reason,
                retry_in,
            } => {
                let next = match retry_in {
                    Some(delay) => format!("retrying in {} s", delay.as_secs()),
                    None => "no attempts left".to_string(),
                };
                self.send(
                    Severity::Warning,
                    "LiveMigrationFailed",
                    format!("{}: {reason}; {next}", vm(server)),
                )
            }
            Event::Intervened { server, what, reason } => self.send(
                Severity::Warning,
                "LiveMigrationIntervened",
                format!("{what} {}: {reason}", vm(server)),
            ),
            Event::NotMigratable { server, reason } if self.cancelling.load(Ordering::Relaxed) => self.send(
                Severity::Normal,
                "MigrationCancelled",
                format!("{} stays: the uncordon cancelled the evacuation ({reason})", vm(server)),
            ),
            Event::NotMigratable { server, reason } => self.send(
                Severity::Warning,
                "VMNotMigratable",
                format!("{} ({}) stays: {reason}", vm(server), server.status),
            ),
            Event::Progress { done, total, .. } => {
                let all = self.total.load(Ordering::Relaxed).max(*total);
                let left = all.saturating_sub(*done);
                self.metrics.vms_remaining.set(left as i64);
                let _ = self.left.send(left);
            }
        }
    }
}

/// What `/readyz` reports.
#[derive(Clone, Default)]
pub struct Health {
    pub node_synced: Arc<AtomicBool>,
    guard_problem: Arc<Mutex<Option<String>>>,
}

impl Health {
    /// Why drains may not wait for the VMs, if they may not.
    pub fn guard_problem(&self) -> Option<String> {
        self.guard_problem.lock().ok().and_then(|p| p.clone())
    }

    fn set_guard_problem(&self, problem: Option<String>) {
        if let Ok(mut slot) = self.guard_problem.lock() {
            *slot = problem;
        }
    }
}

struct Running {
    handle: JoinHandle<Result<Report, EvacuationError>>,
    stop: watch::Sender<StopRequest>,
    cancelling: Arc<AtomicBool>,
}

struct Agent {
    settings: DaemonSettings,
    config: Arc<Config>,
    nova: Arc<NovaClient>,
    kube: kube::Client,
    metrics: Arc<Metrics>,
    health: Health,
    guard: Guard,
    /// The guard pod as last seen by its watch; `None` until the watch has listed.
    guard_pod: Option<GuardPod>,
    /// The guard pod as a list in progress has it so far.
    guard_listing: GuardPod,
    guard_image: Option<GuardImage>,
    /// The last failure to put the guard in place or release it, and since when.
    guard_error: Option<(Instant, String)>,
    /// The guard problem last published as an Event, so it is told once.
    guard_reported: Option<String>,
    /// Whether the guard has been released for the current cordon (the hypervisor is empty).
    released: bool,
    node: Option<Node>,
    /// What we last recorded: read from the Node's annotations once at start-up,
    /// then ours (the watch may still deliver older copies of the Node).
    state: Option<DrainState>,
    running: Option<Running>,
    retry_at: Option<Instant>,
    /// When to look at the guard again (its grace period ends, or a failed call is due again).
    guard_check_at: Option<Instant>,
    notices: mpsc::UnboundedSender<Notice>,
    left: mpsc::UnboundedSender<usize>,
    events: Option<NodeEvents>,
}

/// Runs the agent until SIGTERM/SIGINT; returns the exit code.
pub async fn run(settings: DaemonSettings, mut config: Config, nova: NovaClient, kube: kube::Client) -> i32 {
    // A cordon is the operator's decision: stop new VMs landing before anything else.
    config.evacuation.disable_first = true;
    let metrics = Arc::new(Metrics::default());
    let health = Health::default();
    let nova = Arc::new(nova);
    crate::telemetry::server::spawn(settings.listen, metrics.clone(), nova.clone(), health.clone());

    let (notices_tx, notices_rx) = mpsc::unbounded_channel();
    let (left_tx, mut left_rx) = mpsc::unbounded_channel();
    let events_slot: Arc<tokio::sync::Mutex<Option<NodeEvents>>> = Arc::default();
    tokio::spawn(publish_notices(notices_rx, events_slot.clone()));

    let guard = Guard::new(kube.clone(), &settings.namespace, &settings.target.node);
    let guard_stream = watch_guard(kube.clone(), &settings.namespace, guard.name());
    let mut agent = Agent {
        guard_image: settings.guard_image.clone().map(|image| GuardImage {
            image,
            pull_secrets: Vec::new(),
        }),
        settings,
        config: Arc::new(config),
        nova,
        kube: kube.clone(),
        metrics,
        health: health.clone(),
        guard,
        guard_pod: None,
        guard_listing: GuardPod::Missing,
        guard_error: None,
        guard_reported: None,
        released: false,
        node: None,
        state: None,
        running: None,
        retry_at: None,
        guard_check_at: None,
        notices: notices_tx,
        left: left_tx,
        events: None,
    };
    agent.set_phase_metric(Phase::Idle);

    let node_stream = watch_node(kube, &agent.settings.target.node);
    futures::pin_mut!(node_stream);
    futures::pin_mut!(guard_stream);
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(e) => {
            error!("cannot listen for SIGTERM: {e}");
            return crate::exit::FAILED;
        }
    };
    info!(node = %agent.settings.target.node, host = %agent.settings.target.host, "watching the node");
    loop {
        let retry_at = agent.retry_at;
        let guard_check_at = agent.guard_check_at;
        tokio::select! {
            item = node_stream.next() => match item {
                Some(Ok(event)) => {
                    match event {
                        watcher::Event::Apply(node) | watcher::Event::InitApply(node) => agent.set_node(node, &events_slot).await,
                        watcher::Event::Delete(_) => agent.node_deleted().await,
                        watcher::Event::InitDone => health.node_synced.store(true, Ordering::Relaxed),
                        watcher::Event::Init => {}
                    }
                    agent.reconcile().await;
                }
                Some(Err(e)) => warn!(error = %e, "node watch failed; retrying"),
                None => {
                    error!("the node watch ended");
                    return crate::exit::FAILED;
                }
            },
            item = guard_stream.next() => match item {
                Some(Ok(event)) => {
                    if agent.set_guard_pod(event) {
                        agent.reconcile().await;
                    }
                }
                Some(Err(e)) => warn!(error = %e, "guard pod watch failed; retrying"),
                None => {
                    error!("the guard pod watch ended");
                    return crate::exit::FAILED;
                }
            },
            Some(left) = left_rx.recv() => agent.record_left(left).await,
            finished = async { (&mut agent.running.as_mut().expect("guarded by the select condition").handle).await }, if agent.running.is_some() => {
                agent.finished(finished).await;
                agent.reconcile().await;
            }
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                agent.retry_at = None;
                agent.reconcile().await;
            }
            _ = tokio::time::sleep_until(guard_check_at.unwrap_or_else(Instant::now)), if guard_check_at.is_some() => {
                agent.guard_check_at = None;
                agent.reconcile().await;
            }
            _ = terminate.recv() => return agent.shutdown().await,
            _ = tokio::signal::ctrl_c() => return agent.shutdown().await,
        }
    }
}

/// Logs and publishes Events, off the agent's loop (an API server that is slow
/// to take Events never holds up an evacuation decision).
async fn publish_notices(
    mut notices: mpsc::UnboundedReceiver<Notice>,
    events: Arc<tokio::sync::Mutex<Option<NodeEvents>>>,
) {
    while let Some(Notice { severity, reason, note }) = notices.recv().await {
        match severity {
            Severity::Normal => info!(%reason, %note, "event"),
            Severity::Warning => warn!(%reason, %note, "event"),
        }
        let sink = events.lock().await.clone();
        if let Some(sink) = sink
            && let Err(e) = sink.publish(severity, reason, "Evacuate", &note).await
        {
            warn!(error = %e, %reason, "could not publish an Event");
        }
    }
}

impl Agent {
    async fn set_node(&mut self, node: Node, slot: &tokio::sync::Mutex<Option<NodeEvents>>) {
        if self.events.is_none() {
            let events = NodeEvents::new(self.kube.clone(), &node, &self.settings.instance);
            *slot.lock().await = Some(events.clone());
            self.events = Some(events);
        }
        self.node = Some(node);
    }

    /// Takes in a guard pod watch event; true when the pod changed in a way that matters.
    /// A (re-)list is taken in whole at its end, so a pod it does not repeat counts as gone.
    fn set_guard_pod(&mut self, event: watcher::Event<Pod>) -> bool {
        let seen = match event {
            watcher::Event::Init => {
                self.guard_listing = GuardPod::Missing;
                return false;
            }
            watcher::Event::InitApply(pod) => {
                self.guard_listing = GuardPod::of(Some(&pod));
                return false;
            }
            watcher::Event::InitDone => std::mem::replace(&mut self.guard_listing, GuardPod::Missing),
            watcher::Event::Apply(pod) => GuardPod::of(Some(&pod)),
            watcher::Event::Delete(_) => GuardPod::Missing,
        };
        let changed = self.guard_pod.as_ref() != Some(&seen);
        self.guard_pod = Some(seen);
        changed
    }

    fn notice(&self, severity: Severity, reason: &'static str, note: String) {
        let _ = self.notices.send(Notice { severity, reason, note });
    }

    fn set_phase_metric(&self, phase: Phase) {
        let all: Vec<&str> = Phase::ALL.iter().map(|p| p.as_str()).collect();
        self.metrics.set_phase(phase.as_str(), &all);
    }

    async fn save(&mut self, state: &DrainState) {
        self.state = Some(state.clone());
        self.set_phase_metric(state.phase);
        if let Err(e) = record_state(&self.kube, &self.settings.target.node, state).await {
            warn!(error = %e, "could not record the drain state on the node");
        }
    }

    /// Progress of the running evacuation, recorded on the Node by the agent alone:
    /// a count that arrives after the run ended is stale and dropped.
    async fn record_left(&mut self, left: usize) {
        if self.running.is_none() {
            return;
        }
        let Some(state) = self.state.clone() else { return };
        if state.vms_left != Some(left) {
            self.save(&DrainState {
                vms_left: Some(left),
                ..state
            })
            .await;
        }
    }

    /// Brings the world in line with the Node and the guard pod as they are now.
    async fn reconcile(&mut self) {
        let Some(node) = self.node.clone() else { return };
        let cordoned = is_cordoned(&node);
        let state = self.state.get_or_insert_with(|| DrainState::from_node(&node)).clone();
        if cordoned {
            if self.running.is_none() {
                match state.phase {
                    Phase::Evacuated => {
                        if !self.released {
                            self.release_guard().await;
                        }
                    }
                    Phase::Failed | Phase::TimedOut if self.retry_at.is_some() => {}
                    _ => self.start(state).await,
                }
            }
        } else if let Some(running) = &self.running {
            if !running.cancelling.swap(true, Ordering::Relaxed) {
                info!("node uncordoned: cancelling the evacuation");
                let _ = running.stop.send(StopRequest::AbortInFlight);
            }
        } else {
            self.retry_at = None;
            if state.phase != Phase::Idle {
                self.restore().await;
            }
        }
        self.tend_guard(&node).await;
    }

    /// Keeps the guard in place whenever drains must wait, and tells when it cannot.
    async fn tend_guard(&mut self, node: &Node) {
        let Some(pod) = self.guard_pod.clone() else { return };
        let phase = self.state.as_ref().map_or(Phase::Idle, |s| s.phase);
        let uncordoned_and_idle = !is_cordoned(node) && self.running.is_none() && phase == Phase::Idle;
        if uncordoned_and_idle {
            self.released = false;
        }
        let result = match &pod {
            // Deleted or evicted while nothing is to be guarded: let it go (then it is
            // created again), but only if the hypervisor is empty. A drain that is
            // still waiting on it must not return while VMs run there.
            GuardPod::Terminating { held: true } if uncordoned_and_idle => self.let_go_if_safe().await,
            GuardPod::Terminating { .. } => Ok(()),
            GuardPod::Missing | GuardPod::Present { held: false, .. } if !self.released => {
                self.ensure_guard(node, &pod).await
            }
            _ => Ok(()),
        };
        match result {
            Ok(()) => self.guard_error = None,
            Err(e) => {
                warn!(error = %e, "could not tend the drain guard; trying again");
                let since = self.guard_error.take().map_or_else(Instant::now, |(since, _)| since);
                self.guard_error = Some((since, e));
                self.wake_guard_check(Instant::now() + GUARD_RETRY);
            }
        }
        self.report_guard(&pod);
    }

    async fn ensure_guard(&mut self, node: &Node, pod: &GuardPod) -> Result<(), String> {
        let image = match &self.guard_image {
            Some(image) => image.clone(),
            None => {
                let own_pod =
                    self.settings.own_pod.clone().ok_or(
                        "cannot tell the guard's image: pass --guard-image, or set POD_NAME to the agent's pod",
                    )?;
                let image = GuardImage::of_own_pod(self.kube.clone(), &self.settings.namespace, &own_pod).await?;
                self.guard_image = Some(image.clone());
                image
            }
        };
        self.guard
            .ensure(node, &image, pod)
            .await
            .map_err(|e| format!("putting the guard {} in place: {e}", self.guard.name()))
    }

    /// Removes our finalizer from a guard that is being deleted while the node is
    /// not cordoned, once Nova confirms that no VM is left on the hypervisor.
    async fn let_go_if_safe(&mut self) -> Result<(), String> {
        let host = &self.settings.target.host;
        let servers = self
            .nova
            .servers_on_host(host)
            .await
            .map_err(|e| format!("listing the servers on {host} before letting the guard go: {e}"))?;
        if !servers.is_empty() {
            let problem = format!(
                "the guard pod {} is being deleted while {} VM(s) run on {host}; it stays until the hypervisor is \
                 empty (cordon the node to evacuate it)",
                self.guard.name(),
                servers.len()
            );
            return Err(problem);
        }
        self.guard
            .release()
            .await
            .map_err(|e| format!("releasing the guard {}: {e}", self.guard.name()))
    }

    async fn release_guard(&mut self) {
        match self.guard.release().await {
            Ok(()) => self.released = true,
            Err(e) => {
                warn!(error = %e, "could not release the drain guard; trying again");
                self.wake_guard_check(Instant::now() + GUARD_RETRY);
            }
        }
    }

    fn wake_guard_check(&mut self, at: Instant) {
        self.guard_check_at = Some(self.guard_check_at.map_or(at, |t| t.min(at)));
    }

    /// Reports a guard that cannot keep drains waiting: a Warning Event on the
    /// Node (once per problem), `/readyz` failing and `nova_drain_guard_ready` 0.
    fn report_guard(&mut self, pod: &GuardPod) {
        let name = self.guard.name().to_string();
        let grace = self.settings.guard_grace;
        let problem = if self.released {
            None
        } else if let Some((since, error)) = &self.guard_error {
            if since.elapsed() >= grace {
                Some(error.clone())
            } else {
                self.wake_guard_check(*since + grace);
                None
            }
        } else {
            match pod {
                GuardPod::Present {
                    running: false,
                    waiting,
                    created_at,
                    ..
                } => {
                    let age = created_at
                        .and_then(|t| jiff::Timestamp::now().duration_since(t).try_into().ok())
                        .unwrap_or(Duration::ZERO);
                    if age >= grace {
                        Some(format!(
                            "the guard pod {name} is not Running after {} s ({}): evictions ignore its budget; \
                             `kubectl drain` still waits on its finalizer, drain tools that do not wait for \
                             deleted pods will not",
                            age.as_secs(),
                            waiting.as_deref().unwrap_or("Pending")
                        ))
                    } else {
                        self.wake_guard_check(Instant::now() + (grace - age));
                        None
                    }
                }
                _ => None,
            }
        };
        self.metrics.guard_ready.set(i64::from(problem.is_none()));
        self.health.set_guard_problem(problem.clone());
        if problem != self.guard_reported {
            if let Some(problem) = &problem {
                self.notice(Severity::Warning, "DrainGuardNotRunning", problem.clone());
            }
            self.guard_reported = problem;
        }
    }

    /// The Node is gone: nothing can drain it any more, and its guard pod (deleted
    /// with it by the garbage collector) must not be held by our finalizer for ever.
    async fn node_deleted(&mut self) {
        warn!("the node was deleted: releasing its guard");
        self.node = None;
        if let Err(e) = self.guard.release().await {
            warn!(error = %e, "could not release the guard of the deleted node");
        }
    }

    async fn start(&mut self, previous: DrainState) {
        let state = DrainState {
            phase: Phase::Evacuating,
            started_at: previous
                .started_at
                .filter(|_| previous.phase != Phase::Idle)
                .or_else(|| Some(jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string())),
            disabled_by_us: previous.disabled_by_us,
            vms_total: previous.vms_total,
            vms_left: previous.vms_left,
            last_error: None,
        };
        // Recorded before anything changes in Nova, so a crash after the disable is never forgotten.
        self.save(&state).await;
        info!("node cordoned: evacuating the hypervisor");
        let (stop, stop_rx) = watch::channel(StopRequest::Continue);
        let cancelling = Arc::new(AtomicBool::new(false));
        let observer = self.observer(cancelling.clone());
        let nova = self.nova.clone();
        let config = self.config.clone();
        let target = self.settings.target.clone();
        let handle = tokio::spawn(async move {
            let engine = Engine::new(&*nova, &config.evacuation, &observer);
            engine.evacuate(&target, stop_rx).await
        });
        self.running = Some(Running {
            handle,
            stop,
            cancelling,
        });
    }

    fn observer(&self, cancelling: Arc<AtomicBool>) -> DaemonObserver {
        DaemonObserver {
            notices: self.notices.clone(),
            left: self.left.clone(),
            metrics: self.metrics.clone(),
            total: AtomicUsize::new(0),
            cancelling,
        }
    }

    async fn finished(&mut self, result: Result<Result<Report, EvacuationError>, tokio::task::JoinError>) {
        let cancelled = self
            .running
            .take()
            .is_some_and(|r| r.cancelling.load(Ordering::Relaxed));
        let mut state = DrainState {
            last_error: None,
            ..self.state.clone().unwrap_or_default()
        };
        match result {
            Ok(Ok(report)) => {
                state.disabled_by_us = report.service_disabled_by_us;
                state.vms_total = Some(report.vms.len());
                state.vms_left = Some(report.servers_left_on_host);
                self.metrics.vms_remaining.set(report.servers_left_on_host as i64);
                self.metrics.record_report(&report);
                match report.result {
                    RunResult::Succeeded => {
                        state.phase = Phase::Evacuated;
                        self.notice(
                            Severity::Normal,
                            "EvacuationSucceeded",
                            format!(
                                "the hypervisor {} is empty ({} VM(s) moved in {:.0} s)",
                                report.host,
                                report.vms.len(),
                                report.duration_seconds
                            ),
                        );
                        self.save(&state).await;
                        self.release_guard().await;
                        return;
                    }
                    RunResult::Interrupted if cancelled => {
                        self.notice(
                            Severity::Normal,
                            "EvacuationCancelled",
                            format!(
                                "the node was uncordoned: {} VM(s) stay on {}",
                                report.servers_left_on_host, report.host
                            ),
                        );
                        self.save(&state).await;
                        return;
                    }
                    RunResult::TimedOut => {
                        state.phase = Phase::TimedOut;
                        state.last_error = Some(left_behind(&report));
                        self.notice(Severity::Warning, "EvacuationTimedOut", left_behind(&report));
                    }
                    _ => {
                        state.phase = Phase::Failed;
                        state.last_error = Some(left_behind(&report));
                        self.notice(Severity::Warning, "EvacuationFailed", left_behind(&report));
                    }
                }
            }
            Ok(Err(e)) => {
                state.phase = Phase::Failed;
                state.last_error = Some(e.to_string());
                self.notice(Severity::Warning, "EvacuationFailed", e.to_string());
            }
            Err(e) => {
                state.phase = Phase::Failed;
                state.last_error = Some(format!("the evacuation task failed: {e}"));
                self.notice(
                    Severity::Warning,
                    "EvacuationFailed",
                    format!("the evacuation task failed: {e}"),
                );
            }
        }
        self.save(&state).await;
        if cancelled {
            return;
        }
        if self.settings.release_guard_on_failure {
            self.release_guard().await;
        }
        self.retry_at = Some(Instant::now() + self.settings.retry_after_failure);
    }

    /// After an uncordon: re-enable the service if it is still ours (the guard is
    /// put back by [`Agent::tend_guard`] once the state is Idle).
    async fn restore(&mut self) {
        let observer = self.observer(Arc::default());
        let engine = Engine::new(&*self.nova, &self.config.evacuation, &observer);
        match engine.restore(&self.settings.target).await {
            Ok(RestoreOutcome::Enabled) => self.notice(
                Severity::Normal,
                "NovaComputeEnabled",
                format!("nova-compute on {} enabled again", self.settings.target.host),
            ),
            Ok(RestoreOutcome::AlreadyEnabled) => {}
            Ok(RestoreOutcome::DisabledBySomeoneElse { reason }) => self.notice(
                Severity::Normal,
                "NovaComputeLeftDisabled",
                format!(
                    "nova-compute stays disabled: someone else disabled it ({})",
                    reason.unwrap_or_default()
                ),
            ),
            Err(e) => {
                warn!(error = %e, "could not re-enable the nova-compute service; will try again");
                self.retry_at = Some(Instant::now() + Duration::from_secs(10));
                return;
            }
        }
        self.save(&DrainState::default()).await;
        self.metrics.vms_remaining.set(0);
    }

    /// SIGTERM: start nothing new, leave in-flight migrations to Nova, record state, exit.
    /// The guard stays as it is: a drain keeps waiting for the agent's return.
    async fn shutdown(&mut self) -> i32 {
        info!("terminating: starting no more migrations, leaving in-flight ones to Nova");
        if let Some(running) = self.running.take() {
            let _ = running.stop.send(StopRequest::LeaveInFlight);
            match tokio::time::timeout(SHUTDOWN_BUDGET, running.handle).await {
                Ok(Ok(Ok(report))) => {
                    self.metrics.record_report(&report);
                    let state = DrainState {
                        vms_left: Some(report.servers_left_on_host),
                        last_error: Some("the agent stopped; the evacuation resumes when it starts again".into()),
                        ..self.state.clone().unwrap_or_default()
                    };
                    self.save(&state).await;
                }
                _ => warn!("the evacuation did not stop in time; it resumes when the agent starts again"),
            }
        }
        crate::exit::DONE
    }
}

fn is_cordoned(node: &Node) -> bool {
    node.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false)
}

fn left_behind(report: &Report) -> String {
    let stuck: Vec<String> = report
        .vms
        .iter()
        .filter(|vm| !vm.outcome.is_success())
        .map(|vm| {
            format!(
                "{} ({}): {}",
                vm.name,
                vm.id,
                vm.reason.as_deref().unwrap_or("not moved")
            )
        })
        .collect();
    format!(
        "{} server(s) left on {}: {}",
        report.servers_left_on_host,
        report.host,
        stuck.join("; ")
    )
}
