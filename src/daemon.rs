//! Daemon mode: ties the Node's state to the evacuation engine. Level-
//! triggered: every decision looks at the Node as it is now (cordoned or not,
//! and the drain state in its annotations), never at which events were seen,
//! so a node already cordoned at start-up or after a restart is handled the
//! same way as a fresh cordon.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::evacuation::{
    Action, Engine, EvacuationError, Event, Observer, Outcome, Report, RestoreOutcome, RunResult, StopRequest, Target,
};
use crate::kube::{DrainState, Guard, NodeEvents, Phase, Severity, record_state, watch_node};
use crate::nova::NovaClient;
use crate::telemetry::metrics::{Metrics, OutcomeLabel};

/// How the agent runs, beside the evacuation settings.
#[derive(Clone, Debug)]
pub struct DaemonSettings {
    pub target: Target,
    /// Namespace of the guard pod and budget (the agent's own).
    pub namespace: String,
    pub guard_image: String,
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
/// How often, at most, the guard's presence is checked while idle.
const GUARD_CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// What the engine's observer hands to the async side (Events, annotations).
enum Notice {
    Event {
        severity: Severity,
        reason: &'static str,
        note: String,
    },
    Left(usize),
}

struct DaemonObserver {
    notices: mpsc::UnboundedSender<Notice>,
    metrics: Arc<Metrics>,
    total: std::sync::atomic::AtomicUsize,
}

impl DaemonObserver {
    fn send(&self, severity: Severity, reason: &'static str, note: String) {
        let _ = self.notices.send(Notice::Event { severity, reason, note });
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
                destination,
                seconds,
            } => {
                self.metrics
                    .migrations
                    .get_or_create(&OutcomeLabel {
                        outcome: "migrated".into(),
                    })
                    .inc();
                self.metrics.migration_duration.observe(*seconds);
                self.send(
                    Severity::Normal,
                    "LiveMigrationSucceeded",
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
                if retry_in.is_none() {
                    self.metrics
                        .migrations
                        .get_or_create(&OutcomeLabel {
                            outcome: "failed".into(),
                        })
                        .inc();
                }
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
            Event::NotMigratable { server, reason } => {
                self.metrics
                    .migrations
                    .get_or_create(&OutcomeLabel {
                        outcome: "not-migrated".into(),
                    })
                    .inc();
                self.send(
                    Severity::Warning,
                    "VMNotMigratable",
                    format!("{} ({}) stays: {reason}", vm(server), server.status),
                )
            }
            Event::Progress { done, total, .. } => {
                let all = self.total.load(Ordering::Relaxed).max(*total);
                let left = all.saturating_sub(*done);
                self.metrics.vms_remaining.set(left as i64);
                let _ = self.notices.send(Notice::Left(left));
            }
        }
    }
}

/// Shared readiness: the Node watch has listed once and Nova answered.
#[derive(Clone, Default)]
pub struct Health {
    pub node_synced: Arc<AtomicBool>,
}

struct Running {
    handle: JoinHandle<Result<Report, EvacuationError>>,
    stop: watch::Sender<StopRequest>,
    cancelling: bool,
}

struct Agent {
    settings: DaemonSettings,
    config: Arc<Config>,
    nova: Arc<NovaClient>,
    kube: kube::Client,
    metrics: Arc<Metrics>,
    guard: Guard,
    node: Option<Node>,
    /// What we last recorded: read from the Node's annotations once at start-up,
    /// then ours (the watch may still deliver older copies of the Node).
    state: Option<DrainState>,
    running: Option<Running>,
    retry_at: Option<Instant>,
    guard_checked_at: Option<Instant>,
    released: bool,
    notices: mpsc::UnboundedSender<Notice>,
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
    let events_slot: Arc<tokio::sync::Mutex<Option<NodeEvents>>> = Arc::default();
    tokio::spawn(publish_notices(
        notices_rx,
        events_slot.clone(),
        kube.clone(),
        settings.target.node.clone(),
    ));

    let guard = Guard::new(
        kube.clone(),
        &settings.namespace,
        &settings.target.node,
        &settings.guard_image,
    );
    let mut agent = Agent {
        settings,
        config: Arc::new(config),
        nova,
        kube: kube.clone(),
        metrics,
        guard,
        node: None,
        state: None,
        running: None,
        retry_at: None,
        guard_checked_at: None,
        released: false,
        notices: notices_tx,
        events: None,
    };
    agent.set_phase_metric(Phase::Idle);

    let stream = watch_node(kube, &agent.settings.target.node);
    futures::pin_mut!(stream);
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
        tokio::select! {
            item = stream.next() => match item {
                Some(Ok(event)) => {
                    match event {
                        watcher::Event::Apply(node) | watcher::Event::InitApply(node) => agent.set_node(node, &events_slot).await,
                        watcher::Event::Delete(_) => agent.node = None,
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
            finished = async { (&mut agent.running.as_mut().expect("guarded by the select condition").handle).await }, if agent.running.is_some() => {
                agent.finished(finished).await;
                agent.reconcile().await;
            }
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                agent.retry_at = None;
                agent.reconcile().await;
            }
            _ = terminate.recv() => return agent.shutdown().await,
            _ = tokio::signal::ctrl_c() => return agent.shutdown().await,
        }
    }
}

async fn publish_notices(
    mut notices: mpsc::UnboundedReceiver<Notice>,
    events: Arc<tokio::sync::Mutex<Option<NodeEvents>>>,
    kube: kube::Client,
    node: String,
) {
    let mut last_left = None;
    while let Some(notice) = notices.recv().await {
        match notice {
            Notice::Event { severity, reason, note } => {
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
            Notice::Left(left) if last_left != Some(left) => {
                last_left = Some(left);
                let patch = serde_json::json!({"metadata": {"annotations": {
                    format!("{}vms-left", crate::kube::annotations::PREFIX): left.to_string()
                }}});
                let nodes: kube::Api<Node> = kube::Api::all(kube.clone());
                if let Err(e) = nodes
                    .patch(
                        &node,
                        &kube::api::PatchParams::default(),
                        &kube::api::Patch::Merge(patch),
                    )
                    .await
                {
                    warn!(error = %e, "could not record progress on the node");
                }
            }
            Notice::Left(_) => {}
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

    fn notice(&self, severity: Severity, reason: &'static str, note: String) {
        let _ = self.notices.send(Notice::Event { severity, reason, note });
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

    /// Brings the world in line with the Node as it is now.
    async fn reconcile(&mut self) {
        let Some(node) = self.node.clone() else { return };
        let cordoned = node.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false);
        let state = self.state.get_or_insert_with(|| DrainState::from_node(&node)).clone();
        if cordoned {
            if self.running.is_some() {
                return;
            }
            match state.phase {
                Phase::Evacuated => {
                    if !self.released {
                        self.release_guard().await;
                    }
                }
                Phase::Failed | Phase::TimedOut if self.retry_at.is_some() => {}
                _ => self.start(&node, state).await,
            }
            return;
        }
        if let Some(running) = &mut self.running {
            if !running.cancelling {
                info!("node uncordoned: cancelling the evacuation");
                running.cancelling = true;
                let _ = running.stop.send(StopRequest::AbortInFlight);
            }
            return;
        }
        self.retry_at = None;
        if state.phase != Phase::Idle {
            self.restore(&node).await;
        } else if self
            .guard_checked_at
            .is_none_or(|t| t.elapsed() >= GUARD_CHECK_INTERVAL)
        {
            self.ensure_guard(&node).await;
        }
    }

    async fn ensure_guard(&mut self, node: &Node) {
        match self.guard.ensure(node).await {
            Ok(()) => {
                self.guard_checked_at = Some(Instant::now());
                self.released = false;
            }
            Err(e) => warn!(error = %e, "could not put the drain guard in place"),
        }
    }

    async fn release_guard(&mut self) {
        match self.guard.release().await {
            Ok(_) => self.released = true,
            Err(e) => warn!(error = %e, "could not release the drain guard"),
        }
    }

    async fn start(&mut self, node: &Node, previous: DrainState) {
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
        let observer = DaemonObserver {
            notices: self.notices.clone(),
            metrics: self.metrics.clone(),
            total: std::sync::atomic::AtomicUsize::new(0),
        };
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
            cancelling: false,
        });
        // A guard missing at cordon time (an agent started on a cordoned node, or deleted
        // by hand) is put back so drain still waits; done while the engine already works.
        if !self.released && self.guard_checked_at.is_none() {
            self.ensure_guard(node).await;
        }
    }

    async fn finished(&mut self, result: Result<Result<Report, EvacuationError>, tokio::task::JoinError>) {
        let cancelled = self.running.take().is_some_and(|r| r.cancelling);
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
                for vm in &report.vms {
                    if matches!(vm.outcome, Outcome::Aborted | Outcome::Deleted | Outcome::InProgress) {
                        let outcome = serde_json::to_value(&vm.outcome)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default();
                        self.metrics.migrations.get_or_create(&OutcomeLabel { outcome }).inc();
                    }
                }
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
                        info!("evacuation cancelled by the uncordon");
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

    /// After an uncordon: re-enable the service if it is still ours, put the guard back.
    async fn restore(&mut self, node: &Node) {
        let observer = DaemonObserver {
            notices: self.notices.clone(),
            metrics: self.metrics.clone(),
            total: std::sync::atomic::AtomicUsize::new(0),
        };
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
        self.ensure_guard(node).await;
        self.save(&DrainState::default()).await;
        self.metrics.vms_remaining.set(0);
    }

    /// SIGTERM: start nothing new, leave in-flight migrations to Nova, record state, exit.
    async fn shutdown(&mut self) -> i32 {
        info!("terminating: starting no more migrations, leaving in-flight ones to Nova");
        if let Some(running) = self.running.take() {
            let _ = running.stop.send(StopRequest::LeaveInFlight);
            match tokio::time::timeout(SHUTDOWN_BUDGET, running.handle).await {
                Ok(Ok(Ok(report))) => {
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
