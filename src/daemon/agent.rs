//! Carries out the steps [`decide`] names: runs the engine, records the drain
//! state (the only writer of the Node's annotations), tends the guard, tells
//! what happens (Events, metrics, readiness). Generic over the compute API and
//! the cluster, so it is tested with a fake cloud and a fake cluster.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use super::coordinator::{Standing, Want};
use super::decide::{
    AtUninstall, CancelCause, Evacuation, NodeSeen, RecordFor, RetryBackoff, Situation, Step, at_uninstall,
    cancelled_note, conclude, decide, guard_problem, hold_for_running_vms, rfc3339, run_settings,
};
use super::record::{self, Progress};
use crate::evacuation::{
    Action, Compute, Engine, EvacuationError, Event, Observer, Report, Restart, RestartOutcome, RestoreOptions,
    RestoreOutcome, Settings, StopRequest, Target,
};
use crate::kube::evacuation::{EvacuationPhase, EvacuationSeen, EvacuationStatus};
use crate::kube::{Cluster, DrainState, GuardPod, Phase, Severity, operator_view};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::server::Health;

/// How long SIGTERM may take: stop starting migrations, record state, exit.
const SHUTDOWN_BUDGET: Duration = Duration::from_secs(8);
/// How long, after that, telling an uninstall from a restart and releasing the
/// guard may take: within the DaemonSet's 15 s terminationGracePeriodSeconds.
const UNINSTALL_BUDGET: Duration = Duration::from_secs(5);
/// Wait before trying a failed restore, or a failed guard call, again.
const RETRY_SOON: Duration = Duration::from_secs(10);

/// What the agent is told: the watches, the Nova connection, signals.
pub enum Input<C> {
    /// The Node as it is now; `None`: it was deleted.
    Node(Option<Box<Node>>),
    /// The Node watch has listed once: the agent can be ready.
    NodeListed,
    /// The guard pod as it is now.
    Guard(GuardPod),
    /// The node's Evacuations as they are now (those deleted since start-up
    /// kept as being deleted).
    Evacuations(Vec<EvacuationSeen>),
    /// They cannot be listed (no CRD, not allowed): none is acted on, and
    /// none missing is taken for deleted.
    EvacuationsUnknown,
    /// Nova answered: the evacuation engine can run.
    ComputeReady(Arc<C>),
    /// Where the node stands in the cluster's queue for evacuation slots.
    Slot(Standing),
    /// SIGTERM or SIGINT.
    Terminate,
}

/// The agent's settings beside the evacuation's.
#[derive(Clone, Debug)]
pub struct AgentSettings {
    pub target: Target,
    pub evacuation: Settings,
    pub release_guard_on_failure: bool,
    pub retry: RetryBackoff,
    pub guard_grace: Duration,
    /// Evacuations created at a cordon start paused: a person approves each.
    pub start_paused: bool,
}

struct Running {
    handle: JoinHandle<Result<Report, EvacuationError>>,
    stop: Arc<watch::Sender<StopRequest>>,
    /// Set once the run is cancelled, for the observer: what stays is cancelled, not failed.
    cancelling: Arc<AtomicBool>,
    cancelled: Option<CancelCause>,
    /// Stops the run the moment its slot is no longer held, whatever the
    /// agent's loop is waiting on (a write to a stalled API server).
    slot_guard: Option<JoinHandle<()>>,
    /// Set by the slot guard when it stopped the run.
    slot_lost: Arc<AtomicBool>,
}

pub struct Agent<C: Compute + 'static, K: Cluster> {
    settings: AgentSettings,
    compute: Option<Arc<C>>,
    cluster: Arc<K>,
    metrics: Arc<Metrics>,
    health: Health,
    situation: Situation,
    /// The Node as last seen, for the guard's ownerReference.
    node: Option<Node>,
    /// Whether the drain state was read from the Node's annotations yet: only
    /// once, then ours (the watch may still deliver older copies of the Node).
    state_loaded: bool,
    /// What an operator can change about the Node (see [`operator_view`]), as last seen:
    /// a change while failed runs back off starts the backoff over.
    operator_view: Option<String>,
    /// The VMs the last failed run found on the host: another set starts the backoff over.
    failed_vms: Option<BTreeSet<String>>,
    /// The backoff was started over since the drain state was last recorded.
    backoff_restarted: bool,
    running: Option<Running>,
    /// Why tending the guard fails, and since when.
    guard_failing: Option<(Instant, String)>,
    /// The guard problem last told in an Event, so it is told once.
    guard_reported: Option<String>,
    /// When a guard's grace period ends, to look at it again then.
    guard_check_at: Option<Instant>,
    /// Wall-clock time at `epoch`: guard pods carry wall-clock creation times,
    /// the agent's timers run on tokio's clock (paused in tests).
    epoch: (Instant, jiff::Timestamp),
    progress: mpsc::UnboundedSender<Progress>,
    progress_rx: Option<mpsc::UnboundedReceiver<Progress>>,
    /// The Evacuation recording the current run and its status as last written
    /// (`None`: none could be created, e.g. the CRD is not installed).
    record: Option<(String, EvacuationStatus)>,
    /// Asks the coordinator for an evacuation slot (`None`: the cluster does not share them).
    want: Option<watch::Sender<Option<Want>>>,
    /// When this maintenance began to wait for a slot (wall clock: the queue's order), and
    /// by the agent's clock (how long it waited).
    queued: Option<(jiff::Timestamp, Instant)>,
    /// The standing last told (Events, metrics, the Evacuation's queue position).
    told: Standing,
    /// The hypervisor's availability zone, as Nova told it when the node began to wait.
    zone: Option<String>,
    /// The coordinator's standing, read by each run's slot guard.
    told_directly: Option<watch::Receiver<Standing>>,
}

impl<C: Compute + 'static, K: Cluster> Agent<C, K> {
    pub fn new(settings: AgentSettings, cluster: Arc<K>, metrics: Arc<Metrics>, health: Health) -> Self {
        let (progress, progress_rx) = mpsc::unbounded_channel();
        let situation = Situation {
            start_paused: settings.start_paused,
            ..Situation::default()
        };
        let agent = Agent {
            settings,
            compute: None,
            cluster,
            metrics,
            health,
            situation,
            node: None,
            state_loaded: false,
            operator_view: None,
            failed_vms: None,
            backoff_restarted: false,
            running: None,
            guard_failing: None,
            guard_reported: None,
            guard_check_at: None,
            epoch: (Instant::now(), jiff::Timestamp::now()),
            progress,
            progress_rx: Some(progress_rx),
            record: None,
            want: None,
            queued: None,
            told: Standing::Idle,
            zone: None,
            told_directly: None,
        };
        agent.set_phase_metric(Phase::Idle);
        agent
    }

    /// Evacuates only while holding one of the cluster's evacuation slots,
    /// asked for through `want` (see [`super::coordinator`]).
    /// `told`: the coordinator's standing, which also stops a run at once when its slot is lost.
    pub fn coordinated(mut self, want: watch::Sender<Option<Want>>, told: watch::Receiver<Standing>) -> Self {
        self.situation.coordinated = true;
        self.want = Some(want);
        self.told_directly = Some(told);
        self
    }

    /// Runs until told to terminate (or every input is gone); returns the exit code.
    pub async fn run(mut self, mut inputs: mpsc::Receiver<Input<C>>) -> i32 {
        let Some(mut progress_rx) = self.progress_rx.take() else {
            return crate::exit::FAILED;
        };
        loop {
            let wake = [
                self.situation.retry_at,
                self.situation.guard_retry_at,
                self.situation.finalizer_retry_at,
                self.guard_check_at,
            ]
            .into_iter()
            .flatten()
            .min();
            // Times already past were acted on by the last reconcile (or are stale).
            let wake = wake.filter(|at| *at > Instant::now());
            let evacuating = self.running.is_some();
            let running = &mut self.running;
            tokio::select! {
                input = inputs.recv() => match input {
                    Some(Input::Terminate) | None => return self.shutdown().await,
                    Some(input) => self.take(input),
                },
                Some(progress) = progress_rx.recv() => self.on_progress(progress).await,
                finished = async { (&mut running.as_mut().expect("guarded by the select condition").handle).await }, if evacuating => {
                    self.finished(finished).await;
                }
                _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    self.guard_check_at = None;
                }
            }
            self.reconcile().await;
        }
    }

    fn take(&mut self, input: Input<C>) {
        match input {
            Input::Node(Some(node)) => {
                let node = *node;
                self.cluster.node_seen(&node);
                if !self.state_loaded {
                    self.situation.recorded = DrainState::from_node(&node);
                    self.set_phase_metric(self.situation.recorded.phase);
                    self.state_loaded = true;
                }
                let view = operator_view(&node);
                if self.operator_view.as_ref().is_some_and(|seen| *seen != view) {
                    self.restart_backoff();
                }
                self.operator_view = Some(view);
                let cordoned = node.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false);
                if self.situation.node == NodeSeen::Deleted {
                    // The Node registered again: its guard is needed again.
                    self.situation.released = false;
                }
                self.situation.node = NodeSeen::Present { cordoned };
                self.node = Some(node);
            }
            Input::Node(None) => {
                if self.situation.node != NodeSeen::Deleted {
                    warn!("the node was deleted: its guard is released");
                }
                self.situation.node = NodeSeen::Deleted;
            }
            Input::NodeListed => self.health.set_node_listed(),
            Input::Guard(pod) => self.situation.guard = Some(pod),
            Input::Evacuations(seen) => {
                if let Some(created) = &self.situation.created_unseen
                    && seen.iter().any(|e| e.name == *created)
                {
                    self.situation.created_unseen = None;
                }
                self.situation.evacuations = Some(seen);
                self.situation.evacuations_listed = true;
            }
            Input::EvacuationsUnknown => {
                self.situation.evacuations = Some(Vec::new());
                self.situation.evacuations_listed = false;
            }
            Input::ComputeReady(compute) => {
                self.compute = Some(compute);
                self.situation.compute_ready = true;
                self.health.set_compute_ready();
            }
            Input::Slot(standing) => self.situation.slot = standing,
            Input::Terminate => {}
        }
    }

    /// Carries out what [`decide`] asks until it asks nothing more (each step
    /// changes what it sees, or sets a time to try again).
    async fn reconcile(&mut self) {
        if self.backoff_restarted {
            // Shown on the Node at once: the next try is sooner than it says.
            self.backoff_restarted = false;
            self.save(self.situation.recorded.clone()).await;
        }
        for _ in 0..4 {
            // The freshest word on the slot (the inputs may lag behind it).
            if let Some(told) = &self.told_directly {
                self.situation.slot = told.borrow().clone();
            }
            self.tell_standing().await;
            let steps = decide(&self.situation, Instant::now());
            if steps.is_empty() {
                break;
            }
            for step in steps {
                self.carry_out(step).await;
            }
        }
        self.ask_for_slot();
        self.report_guard();
    }

    /// Asks for an evacuation slot while waiting or evacuating (also a run a
    /// restart left, whose slot may still be ours), lets it go otherwise.
    fn ask_for_slot(&mut self) {
        let Some(want) = &self.want else { return };
        // A run keeps its slot until it has ended (an uncordon's aborts included).
        let asks = self.running.is_some()
            || (self.situation.wanted() && matches!(self.situation.recorded.phase, Phase::Waiting | Phase::Evacuating));
        if !asks {
            self.queued = None;
        } else if self.queued.is_none() {
            self.queued = Some((self.wall_now(), Instant::now()));
        }
        let wanted = self.queued.map(|(since, _)| Want {
            since,
            zone: self.zone.clone(),
        });
        want.send_if_modified(|current| {
            let changed = *current != wanted;
            *current = wanted;
            changed
        });
    }

    /// Tells a change of the node's standing in the queue: metrics, the
    /// Evacuation's queue position while it waits, an Event when the slot is taken.
    async fn tell_standing(&mut self) {
        let standing = self.situation.slot.clone();
        if standing == self.told {
            return;
        }
        let position = match standing {
            Standing::Waiting { position, .. } => position,
            _ => 0,
        };
        self.metrics
            .waiting
            .set(i64::from(matches!(standing, Standing::Waiting { .. })));
        self.metrics
            .queue_position
            .set(i64::try_from(position).unwrap_or(i64::MAX));
        self.metrics
            .slot_held
            .set(i64::from(matches!(standing, Standing::Holding { .. })));
        match (&self.told, &standing) {
            (Standing::Holding { .. }, Standing::Unsure { .. }) => {
                self.metrics.slots_lost.inc();
            }
            (Standing::Waiting { .. } | Standing::Idle, Standing::Holding { slot, share, .. }) => {
                let waited = self.queued.map_or(Duration::ZERO, |(_, since)| since.elapsed());
                self.metrics.slot_wait.observe(waited.as_secs_f64());
                if self.situation.recorded.phase == Phase::Waiting {
                    self.cluster.publish(
                        Severity::Normal,
                        "EvacuationSlotTaken",
                        format!(
                            "took evacuation slot {slot} after waiting {:.0} s; up to {share} live migration(s) at once",
                            waited.as_secs_f64()
                        ),
                    );
                }
            }
            _ => {}
        }
        self.told = standing;
        if self.situation.recorded.phase == Phase::Waiting
            && position > 0
            && let Some((name, status)) = self.record.clone()
            && status.queue_position != u32::try_from(position).ok()
        {
            let status = record::waiting(status, &self.settings.target.host, u32::try_from(position).ok());
            self.record = Some((name.clone(), status.clone()));
            self.write_record(&name, &status).await;
        }
    }

    async fn carry_out(&mut self, step: Step) {
        match step {
            Step::Evacuate => self.evacuate().await,
            Step::Wait => self.wait().await,
            Step::Plan => self.plan().await,
            Step::Cancel(cause) => {
                if let Some(running) = &mut self.running {
                    match cause {
                        CancelCause::Unasked => {
                            info!("nothing asks for the maintenance any more: cancelling the evacuation")
                        }
                        CancelCause::Deleted => info!("the Evacuation was deleted: cancelling the evacuation"),
                        CancelCause::SlotLost => {
                            warn!("the evacuation slot could not be renewed in time: stopping the evacuation")
                        }
                    }
                    running.cancelling.store(true, Ordering::Relaxed);
                    running.cancelled = Some(cause);
                    let _ = running.stop.send(StopRequest::AbortInFlight);
                }
                self.situation.evacuation = Evacuation::Cancelling;
            }
            Step::MarkCancelled(cause) => self.mark_cancelled(cause).await,
            Step::ReleaseGuardIfNoneRuns => self.release_guard_if_none_runs().await,
            Step::HoldEvacuation(name) => match self.cluster.hold_evacuation(&name).await {
                Ok(()) => {
                    self.situation.finalizer_retry_at = None;
                    self.mark_seen(&name, |seen| seen.held = true);
                    // Shown as taken on at once, unless a run of it wrote more already.
                    if let Ok(Some(EvacuationStatus { phase: None, .. }) | None) =
                        self.cluster.read_evacuation(&name).await
                    {
                        self.write_record(&name, &record::pending(&self.settings.target.host))
                            .await;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot put our finalizer on the Evacuation made by hand; trying again");
                    self.situation.finalizer_retry_at = Some(Instant::now() + RETRY_SOON);
                }
            },
            Step::LetEvacuationGo(name) => match self.cluster.let_evacuation_go(&name).await {
                Ok(()) => {
                    self.situation.finalizer_retry_at = None;
                    info!(evacuation = %name, "the deleted Evacuation's maintenance has ended: it may go");
                    self.mark_seen(&name, |seen| seen.held = false);
                }
                Err(e) => {
                    warn!(error = %e, "cannot let the deleted Evacuation go; trying again");
                    self.situation.finalizer_retry_at = Some(Instant::now() + RETRY_SOON);
                }
            },
            Step::Restore => self.restore().await,
            Step::PutGuard => {
                let (Some(node), Some(current)) = (self.node.clone(), self.situation.guard.clone()) else {
                    return;
                };
                match self.cluster.put_guard(&node, &current).await {
                    // What the watch will show; it corrects this if anything differs.
                    Ok(()) => self.guard_done(Some(GuardPod::Present {
                        held: true,
                        running: matches!(current, GuardPod::Present { running: true, .. }),
                        waiting: None,
                        created_at: match current {
                            GuardPod::Present { created_at, .. } => created_at,
                            _ => Some(self.wall_now()),
                        },
                    })),
                    Err(e) => self.guard_failed(e),
                }
            }
            Step::ReleaseGuard => self.release_guard().await,
            Step::LetGuardGoIfEmpty => self.let_guard_go_if_empty().await,
        }
    }

    /// Deletes the budget and takes our finalizer off the guard: drain may finish.
    async fn release_guard(&mut self) {
        match self.cluster.release_guard().await {
            Ok(()) => {
                self.situation.released = true;
                let gone = match self.situation.guard {
                    Some(GuardPod::Terminating { .. }) => Some(GuardPod::Terminating { held: false }),
                    ref other => other.clone(),
                };
                self.guard_done(gone);
            }
            Err(e) => self.guard_failed(e),
        }
    }

    async fn evacuate(&mut self) {
        let Some(compute) = self.compute.clone() else { return };
        let previous = self.situation.recorded.clone();
        let started_at = self.maintenance_started_at();
        let evacuation = self.open_record(RecordFor::of(&self.situation), &started_at).await;
        if let Some((name, status)) = self.record.clone() {
            self.write_record(&name, &status).await;
        }
        let state = DrainState {
            phase: Phase::Evacuating,
            started_at: Some(started_at),
            last_error: None,
            evacuation,
            ..previous
        };
        // Recorded before anything changes in Nova, so a crash after the disable is never forgotten.
        self.save(state).await;
        info!("evacuating the hypervisor");
        let (stop, stop_rx) = watch::channel(StopRequest::Continue);
        let stop = Arc::new(stop);
        let cancelling = Arc::new(AtomicBool::new(false));
        let slot_lost = Arc::new(AtomicBool::new(false));
        let slot_guard = self
            .told_directly
            .clone()
            .map(|told| tokio::spawn(guard_slot(told, stop.clone(), cancelling.clone(), slot_lost.clone())));
        let observer = self.observer(cancelling.clone());
        let mut settings = self.run_settings(self.record.as_ref().map(|(name, _)| name.as_str()));
        if let (Ok(settings), Standing::Holding { share, beside, .. }) = (&mut settings, &self.situation.slot) {
            // The slot's share of the cluster's live migrations, and what the others still move.
            settings.max_parallel = settings.max_parallel.min(usize::try_from(*share).unwrap_or(1)).max(1);
            settings.evacuating_elsewhere = beside.clone();
        }
        let target = self.settings.target.clone();
        let handle = tokio::spawn(async move {
            let settings = settings?;
            let engine = Engine::new(&*compute, &settings, &observer);
            engine.evacuate(&target, stop_rx).await
        });
        self.running = Some(Running {
            handle,
            stop,
            cancelling,
            cancelled: None,
            slot_guard,
            slot_lost,
        });
        self.situation.evacuation = Evacuation::Running;
        self.situation.retry_at = None;
    }

    /// When the maintenance a run belongs to began: kept across retries, a
    /// wait for a slot and restarts; now for a new one.
    fn maintenance_started_at(&self) -> String {
        let recorded = &self.situation.recorded;
        recorded
            .started_at
            .clone()
            .filter(|_| !matches!(recorded.phase, Phase::Idle | Phase::Paused | Phase::Cancelled))
            .unwrap_or_else(|| rfc3339(self.wall_now(), Duration::ZERO))
    }

    /// The maintenance is asked for but the cluster's evacuation slots are
    /// all taken: the service is disabled now (a cordon keeps new VMs off at
    /// once) and the node waits in the queue, its Evacuation in phase Waiting.
    async fn wait(&mut self) {
        let Some(compute) = self.compute.clone() else { return };
        // The queue is served in the order the maintenance was asked for.
        if self.queued.is_none() {
            self.queued = Some((self.wall_now(), Instant::now()));
        }
        let previous = self.situation.recorded.clone();
        let started_at = self.maintenance_started_at();
        let evacuation = self.open_record(RecordFor::of(&self.situation), &started_at).await;
        let position = match self.situation.slot {
            Standing::Waiting { position, .. } if position > 0 => u32::try_from(position).ok(),
            _ => None,
        };
        if let Some((name, status)) = self.record.clone() {
            let status = record::waiting(status, &self.settings.target.host, position);
            self.record = Some((name.clone(), status.clone()));
            self.write_record(&name, &status).await;
        }
        // Recorded before anything changes in Nova, so a crash after the disable is never forgotten.
        let state = DrainState {
            phase: Phase::Waiting,
            started_at: Some(started_at),
            last_error: None,
            evacuation,
            ..previous
        };
        self.save(state).await;
        // After the record is open, so that its Events tell the disable too.
        let observer = self.observer(Arc::default());
        let engine = Engine::new(&*compute, &self.settings.evacuation, &observer);
        match engine.hold_service(&self.settings.target).await {
            Ok((by_us, service)) => {
                self.zone = service.zone;
                self.situation.zone_known = true;
                if by_us && !self.situation.recorded.disabled_by_us {
                    let state = DrainState {
                        disabled_by_us: true,
                        ..self.situation.recorded.clone()
                    };
                    self.save(state).await;
                }
            }
            Err(e) => {
                warn!(
                    error = %e,
                    "cannot disable the nova-compute service while waiting for an evacuation slot; trying again"
                );
                self.situation.retry_at = Some(Instant::now() + RETRY_SOON);
            }
        }
        info!("waiting for one of the cluster's evacuation slots");
        self.cluster.publish(
            Severity::Normal,
            "EvacuationWaiting",
            format!(
                "waiting for one of the cluster's evacuation slots; nova-compute on {} is disabled meanwhile",
                self.settings.target.host
            ),
        );
        self.situation.retry_at = None;
    }

    async fn finished(&mut self, result: Result<Result<Report, EvacuationError>, tokio::task::JoinError>) {
        let cancelled = self.running.take().and_then(|running| {
            if let Some(guard) = running.slot_guard {
                guard.abort();
            }
            let lost = running
                .slot_lost
                .load(Ordering::Relaxed)
                .then_some(CancelCause::SlotLost);
            running.cancelled.or(lost)
        });
        self.situation.evacuation = Evacuation::None;
        let result = match result {
            Ok(Ok(mut report)) => {
                hold_for_running_vms(&mut report);
                Ok(report)
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("the evacuation task failed: {e}")),
        };
        let mut recorded = self.situation.recorded.clone();
        if let Ok(report) = &result {
            self.metrics.vms_remaining.set(report.servers_left_on_host as i64);
            self.metrics.record_report(report);
            let vms: BTreeSet<String> = report.vms.iter().map(|vm| vm.id.clone()).collect();
            if report.result == crate::evacuation::RunResult::Succeeded {
                self.failed_vms = None;
            } else if self.failed_vms.replace(vms.clone()).is_some_and(|before| before != vms) {
                info!("other VMs on the host than at the last failed run: the backoff starts over");
                recorded.failures = 0;
            }
        }
        let conclusion = conclude(
            &recorded,
            result.as_ref().map_err(Clone::clone),
            cancelled,
            self.settings.release_guard_on_failure,
            self.settings.retry,
            self.wall_now(),
        );
        if let (Some(delay), Some(at)) = (conclusion.retry_in, &conclusion.state.next_retry_at) {
            info!(failures = conclusion.state.failures, retry_in_seconds = delay.as_secs(), retry_at = %at, "will evacuate again while the node stays cordoned");
        }
        let waits_again = conclusion.state.phase == Phase::Waiting;
        if let Some((name, status)) = self.record.take() {
            let at = rfc3339(self.wall_now(), Duration::ZERO);
            let last = match &result {
                Ok(report) => record::finished(&status, report, cancelled.is_some(), &at),
                Err(e) => record::could_not_run(&status, e, cancelled.is_some(), &at),
            };
            if waits_again {
                // The same evacuation goes on once the slot is held again.
                let position = match self.situation.slot {
                    Standing::Waiting { position, .. } if position > 0 => u32::try_from(position).ok(),
                    _ => None,
                };
                let last = record::waiting(last, &self.settings.target.host, position);
                self.record = Some((name.clone(), last.clone()));
                self.write_record(&name, &last).await;
            } else {
                self.write_record(&name, &last).await;
            }
        }
        let (severity, reason, note) = conclusion.event;
        self.cluster.publish(severity, reason, note);
        if !waits_again {
            self.cluster.follow_evacuation(None);
        }
        self.save(conclusion.state).await;
        self.situation.retry_at = conclusion.retry_in.map(|delay| Instant::now() + delay);
        // Only a drain can be waiting, and only on a cordoned node: a hand-made
        // run on a schedulable node keeps the guard (checked again at a cordon).
        if conclusion.release_guard && self.situation.node == (NodeSeen::Present { cordoned: true }) {
            self.release_guard().await;
        }
    }

    /// The settings of a run (or plan) recorded in Evacuation `record`: the
    /// agent's, with what the Node's annotation and that Evacuation ask.
    fn run_settings(&self, record: Option<&str>) -> Result<Settings, EvacuationError> {
        let spec = record.and_then(|name| Some(&self.seen(name)?.spec));
        let annotation = self.node.as_ref().and_then(crate::kube::vm_action);
        run_settings(&self.settings.evacuation, spec, annotation).map_err(EvacuationError::Refused)
    }

    /// An operator changed the Node while failed runs back off: the next try
    /// comes after the first wait at the latest, and the doubling starts over.
    fn restart_backoff(&mut self) {
        if self.situation.recorded.failures == 0 {
            return;
        }
        info!("the node changed: the backoff after failed runs starts over");
        let soon = Instant::now() + self.settings.retry.first;
        self.situation.retry_at = self.situation.retry_at.map(|at| at.min(soon));
        self.situation.recorded.failures = 0;
        self.situation.recorded.next_retry_at = None;
        self.backoff_restarted = true;
    }

    /// When nothing asks for the maintenance any more (the uncordon, the last
    /// hand-made Evacuation deleted): re-enable the service if it is still
    /// ours, start the VMs we stopped, record Idle.
    async fn restore(&mut self) {
        let Some(compute) = self.compute.clone() else { return };
        let observer = self.observer(Arc::default());
        let engine = Engine::new(&*compute, &self.settings.evacuation, &observer);
        let host = self.settings.target.host.clone();
        // The agent's own run was cancelled before this (its in-flight migrations
        // aborted); what still moves is someone else's, and must not keep the service disabled.
        let options = RestoreOptions {
            even_while_moving: true,
            dry_run: false,
        };
        let restored = engine.restore_and_start(&self.settings.target, options).await;
        let restarts = restored.as_ref().map(|r| r.restarts.clone()).unwrap_or_default();
        match restored.map(|r| r.outcome) {
            Ok(RestoreOutcome::Enabled) => self.cluster.publish(
                Severity::Normal,
                "NovaComputeEnabled",
                format!("nova-compute on {host} enabled again"),
            ),
            Ok(RestoreOutcome::AlreadyEnabled | RestoreOutcome::WouldEnable) => {}
            Ok(RestoreOutcome::DisabledBySomeoneElse { reason }) => self.cluster.publish(
                Severity::Normal,
                "NovaComputeLeftDisabled",
                format!(
                    "nova-compute stays disabled: someone else disabled it ({}); VMs we stopped for the maintenance \
                     (tag {}) stay stopped until it is enabled and `drainer -enable --node {}` runs",
                    reason.unwrap_or_default(),
                    crate::evacuation::STOPPED_BY_US_TAG,
                    self.settings.target.node
                ),
            ),
            Ok(RestoreOutcome::StillMoving { servers }) => {
                warn!(moving = %servers.join(", "), "servers still move off the host; the service is re-enabled once they are gone");
                self.situation.retry_at = Some(Instant::now() + RETRY_SOON);
                return;
            }
            Err(e) => {
                warn!(error = %e, "could not re-enable the nova-compute service; will try again");
                self.situation.retry_at = Some(Instant::now() + RETRY_SOON);
                return;
            }
        }
        if !self.restarted(&restarts) {
            self.situation.retry_at = Some(Instant::now() + RETRY_SOON);
            return;
        }
        if let (phase @ (Phase::Paused | Phase::Waiting), Some(name)) = (
            self.situation.recorded.phase,
            self.situation.recorded.evacuation.clone(),
        ) {
            let why = if phase == Phase::Paused {
                "nothing asked for the maintenance any more (the uncordon, or the Evacuation deleted) before the plan \
                 was approved"
            } else {
                "nothing asked for the maintenance any more (the uncordon, or the Evacuation deleted) while it waited \
                 for an evacuation slot"
            };
            self.close_record(&name, EvacuationPhase::Cancelled, why).await;
            self.record = None;
            self.cluster.follow_evacuation(None);
        }
        self.situation.retry_at = None;
        self.situation.released = false;
        self.metrics.vms_remaining.set(0);
        self.save(DrainState::default()).await;
    }

    /// Tells, VM by VM, what became of those we stopped for the maintenance;
    /// `false`: one could not be started (its marker stays, the restore is tried again).
    fn restarted(&self, restarts: &[Restart]) -> bool {
        let mut all = true;
        for restart in restarts {
            let vm = format!("{} ({})", restart.name, restart.id);
            match restart.outcome {
                RestartOutcome::Started => self.cluster.publish(
                    Severity::Normal,
                    "VMStarted",
                    format!("{vm} started again: we had stopped it"),
                ),
                RestartOutcome::Unmarked | RestartOutcome::WouldStart | RestartOutcome::WouldUnmark => {}
                RestartOutcome::Failed => {
                    all = false;
                    self.cluster.publish(
                        Severity::Warning,
                        "VMStartFailed",
                        format!(
                            "{vm}, which we had stopped, could not be started: {}; trying again",
                            restart.reason.as_deref().unwrap_or("no reason given")
                        ),
                    )
                }
            }
        }
        all
    }

    /// A cordoned node recorded as evacuated (by a hand-made run, or before a
    /// restart): the guard goes only if Nova shows no VM running on the host
    /// (stopped ones may stay); otherwise the hypervisor is evacuated again.
    async fn release_guard_if_none_runs(&mut self) {
        let Some(compute) = self.compute.clone() else { return };
        let host = self.settings.target.host.clone();
        match compute.servers_on_host(&host).await {
            Ok(servers) if servers.iter().all(|s| !s.running && s.status == "SHUTOFF") => self.release_guard().await,
            Ok(servers) => {
                info!(
                    running = servers.len(),
                    "VMs run on the hypervisor recorded as evacuated: evacuating again"
                );
                if self.situation.may_evacuate() {
                    self.evacuate().await;
                } else {
                    self.wait().await;
                }
            }
            Err(e) => self.guard_failed(format!("listing the servers on {host}: {e}")),
        }
    }

    /// A guard being deleted while nothing is guarded is let go, but only once
    /// Nova lists no VM on the host: a drain may still be waiting on it.
    async fn let_guard_go_if_empty(&mut self) {
        let Some(compute) = self.compute.clone() else { return };
        let host = self.settings.target.host.clone();
        let servers = match compute.servers_on_host(&host).await {
            Ok(servers) => servers,
            Err(e) => return self.guard_failed(format!("listing the servers on {host}: {e}")),
        };
        if !servers.is_empty() {
            return self.guard_failed(format!(
                "the guard pod {} is being deleted while {} VM(s) run on {host}: it stays until the hypervisor is \
                 empty (cordon the node to have it evacuated)",
                self.cluster.guard_name(),
                servers.len()
            ));
        }
        match self.cluster.release_guard().await {
            Ok(()) => self.guard_done(Some(GuardPod::Terminating { held: false })),
            Err(e) => self.guard_failed(e),
        }
    }

    fn guard_done(&mut self, expected: Option<GuardPod>) {
        self.situation.guard = expected;
        self.situation.guard_retry_at = None;
        self.guard_failing = None;
    }

    fn guard_failed(&mut self, error: String) {
        warn!(%error, "could not tend the drain guard; trying again");
        let since = self.guard_failing.take().map_or_else(Instant::now, |(since, _)| since);
        self.guard_failing = Some((since, error));
        self.situation.guard_retry_at = Some(Instant::now() + RETRY_SOON);
    }

    /// Reports a guard that cannot keep drains waiting: a Warning Event on the
    /// Node (once per problem), `/readyz` failing and `nova_drain_guard_ready` 0.
    fn report_guard(&mut self) {
        let now = Instant::now();
        let grace = self.settings.guard_grace;
        let wall_now = self.wall_now();
        let age =
            |created: jiff::Timestamp| Duration::try_from(wall_now.duration_since(created)).unwrap_or(Duration::ZERO);
        let failing = self
            .guard_failing
            .as_ref()
            .map(|(since, error)| (now.duration_since(*since), error.as_str()));
        let name = self.cluster.guard_name().to_string();
        let problem = guard_problem(
            self.situation.guard.as_ref(),
            self.situation.released,
            failing,
            age,
            grace,
            &name,
        );
        if problem.is_none() {
            // Look again when a grace period that is running out ends.
            let ends = match (&self.guard_failing, &self.situation.guard) {
                (Some((since, _)), _) => Some(*since + grace),
                (
                    None,
                    Some(GuardPod::Present {
                        running: false,
                        created_at: Some(created),
                        ..
                    }),
                ) => Some(now + grace.saturating_sub(age(*created))),
                _ => None,
            };
            self.guard_check_at = ends.filter(|_| !self.situation.released);
        }
        self.metrics.guard_ready.set(i64::from(problem.is_none()));
        self.health.set_guard_problem(problem.clone());
        if problem != self.guard_reported {
            if let Some(problem) = &problem {
                self.cluster
                    .publish(Severity::Warning, "DrainGuardNotRunning", problem.clone());
            }
            self.guard_reported = problem;
        }
    }

    fn wall_now(&self) -> jiff::Timestamp {
        let elapsed = Instant::now().duration_since(self.epoch.0);
        jiff::SignedDuration::try_from(elapsed)
            .ok()
            .and_then(|d| self.epoch.1.checked_add(d).ok())
            .unwrap_or(self.epoch.1)
    }

    fn set_phase_metric(&self, phase: Phase) {
        let all: Vec<&str> = Phase::ALL.iter().map(|p| p.as_str()).collect();
        self.metrics.set_phase(phase.as_str(), &all);
    }

    async fn save(&mut self, state: DrainState) {
        self.set_phase_metric(state.phase);
        if let Err(e) = self.cluster.record(&state).await {
            warn!(error = %e, "could not record the drain state on the node");
        }
        self.situation.recorded = state;
    }

    /// Progress of the running evacuation. Only the agent writes the
    /// annotations and the Evacuation's status, so progress that arrives after
    /// the run ended is stale and dropped. The Evacuation is written when the
    /// run has counted its VMs and when a VM's move ends; other progress
    /// waits for the next of those writes.
    async fn on_progress(&mut self, progress: Progress) {
        if self.running.is_none() {
            return;
        }
        let worth_writing = match &progress {
            Progress::Left(_) => false,
            Progress::Found { .. } => true,
            Progress::Vm(vm) => vm.outcome != "moving",
        };
        if let Progress::Left(left) = progress
            && self.situation.recorded.vms_left != Some(left)
        {
            let state = DrainState {
                vms_left: Some(left),
                ..self.situation.recorded.clone()
            };
            self.save(state).await;
        }
        if let Some((name, status)) = &mut self.record {
            record::apply(status, progress);
            if worth_writing {
                let (name, status) = (name.clone(), status.clone());
                self.write_record(&name, &status).await;
            }
        }
    }

    /// Writes an Evacuation's status with its conditions brought up to date
    /// (kept in the run's own record too, so their transition times hold).
    async fn write_record(&mut self, name: &str, status: &EvacuationStatus) {
        let mut status = status.clone();
        record::set_conditions(&mut status, &rfc3339(self.wall_now(), Duration::ZERO));
        if let Some((recorded, kept)) = &mut self.record
            && recorded == name
        {
            kept.conditions = status.conditions.clone();
        }
        if let Err(e) = self.cluster.write_evacuation(name, &status).await {
            warn!(error = %e, "could not record the evacuation's progress");
        }
    }

    /// Opens the Evacuation recording the next run or plan (see
    /// [`RecordFor`]): the one the Node names when the agent resumes a run it
    /// was stopped in or a paused plan (what was written kept), a hand-made
    /// one, or a new one. A cluster without the CRD (or the right to create
    /// it) only loses the record: the run goes on.
    async fn open_record(&mut self, next: RecordFor, started_at: &str) -> Option<String> {
        let host = self.settings.target.host.clone();
        let (name, status) = match next {
            RecordFor::Resume(name) | RecordFor::Asked(name) => {
                let written = match self.cluster.read_evacuation(&name).await {
                    Ok(written) => written.unwrap_or_default(),
                    Err(e) => {
                        warn!(error = %e, "the Evacuation's status is written anew");
                        EvacuationStatus::default()
                    }
                };
                let status = match written.phase {
                    None | Some(EvacuationPhase::Pending | EvacuationPhase::Paused) => {
                        record::from_plan(written, &host, started_at)
                    }
                    Some(_) => record::resumed(written, &host, started_at),
                };
                (name, status)
            }
            RecordFor::Create { paused } => {
                let node = self.node.clone()?;
                match self.cluster.open_evacuation(&node, self.wall_now(), paused).await {
                    Ok(name) => {
                        self.situation.created_unseen = Some(name.clone());
                        (name, record::started(&host, started_at))
                    }
                    Err(e) => {
                        warn!(error = %e, "the run goes on without an Evacuation object");
                        self.record = None;
                        return None;
                    }
                }
            }
        };
        self.cluster.follow_evacuation(Some(&name));
        self.record = Some((name.clone(), status));
        Some(name)
    }

    /// A paused Evacuation: its plan (each VM's action, the capacity
    /// verdict) written to its status, the phase Paused recorded on the Node;
    /// nothing changes in Nova until it is unpaused.
    async fn plan(&mut self) {
        let Some(compute) = self.compute.clone() else { return };
        let observer = self.observer(Arc::default());
        let next = RecordFor::of(&self.situation);
        let named = match &next {
            RecordFor::Resume(name) | RecordFor::Asked(name) => Some(name.as_str()),
            RecordFor::Create { .. } => None,
        };
        let previewed = match self.run_settings(named) {
            Ok(settings) => Engine::new(&*compute, &settings, &observer)
                .preview(&self.settings.target)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let report = match previewed {
            Ok(report) => report,
            Err(e) => {
                warn!(error = %e, "cannot plan the paused evacuation; trying again");
                self.situation.retry_at = Some(Instant::now() + RETRY_SOON);
                return;
            }
        };
        let started_at = rfc3339(self.wall_now(), Duration::ZERO);
        let Some(name) = self.open_record(next, &started_at).await else {
            warn!("a paused evacuation needs its Evacuation object; trying again");
            self.situation.retry_at = Some(Instant::now() + RETRY_SOON);
            return;
        };
        let mut status = record::planned(&self.settings.target.host, &report);
        // The spec it was planned from; a new object starts at generation 1.
        status.observed_generation = self.seen(&name).map_or(Some(1), |seen| seen.generation);
        self.write_record(&name, &status).await;
        let verdict = status.plan.as_ref().map_or_else(String::new, |plan| {
            format!(
                "{} live and {} cold migration(s), {} VM(s) stay; expected to end {}{}",
                plan.live_migrations,
                plan.cold_migrations,
                plan.stays,
                plan.expected_result,
                plan.why.as_deref().map(|why| format!(" ({why})")).unwrap_or_default()
            )
        });
        self.cluster.publish(
            Severity::Normal,
            "EvacuationPaused",
            format!("the plan is in Evacuation {name}: {verdict}; set spec.paused to false to start it"),
        );
        self.cluster.follow_evacuation(None);
        self.record = None;
        self.situation.retry_at = None;
        self.mark_seen(&name, |seen| seen.plan_outdated = false);
        let state = DrainState {
            phase: Phase::Paused,
            evacuation: Some(name),
            vms_total: Some(report.vms.len()),
            vms_left: Some(report.servers_left_on_host),
            last_error: None,
            ..self.situation.recorded.clone()
        };
        self.save(state).await;
    }

    /// A run not under way ends. Its Evacuation deleted: recorded Cancelled
    /// on the Node (and in the Evacuation while it is still held). A plan a
    /// cordon asked for, the node uncordoned before its approval while a
    /// hand-made Evacuation asks: the plan closed, the Node Idle (nothing
    /// changed in Nova), so that the hand-made one goes on.
    async fn mark_cancelled(&mut self, cause: CancelCause) {
        let name = self.situation.recorded.evacuation.clone().unwrap_or_default();
        if cause == CancelCause::Unasked {
            let why = "the node was uncordoned before the plan was approved";
            self.close_record(&name, EvacuationPhase::Cancelled, why).await;
            self.save(DrainState::default()).await;
            return;
        }
        self.close_record(&name, EvacuationPhase::Cancelled, "the Evacuation was deleted")
            .await;
        let why = cancelled_note(&name);
        self.cluster
            .publish(Severity::Normal, "EvacuationCancelled", why.clone());
        let state = DrainState {
            phase: Phase::Cancelled,
            last_error: Some(why),
            failures: 0,
            next_retry_at: None,
            ..self.situation.recorded.clone()
        };
        self.situation.retry_at = None;
        self.save(state).await;
    }

    /// Ends the status of an Evacuation whose run is not under way (a paused
    /// plan, a run left by a stopped agent) with `phase`, unless it is over already.
    async fn close_record(&mut self, name: &str, phase: EvacuationPhase, why: &str) {
        let Ok(Some(status)) = self.cluster.read_evacuation(name).await else {
            return;
        };
        if status.phase.is_some_and(EvacuationPhase::is_finished) {
            return;
        }
        let at = rfc3339(self.wall_now(), Duration::ZERO);
        let last = record::could_not_run(&status, why, phase == EvacuationPhase::Cancelled, &at);
        self.write_record(name, &last).await;
    }

    fn seen(&self, name: &str) -> Option<&EvacuationSeen> {
        self.situation.evacuations.iter().flatten().find(|e| e.name == name)
    }

    fn mark_seen(&mut self, name: &str, change: impl FnOnce(&mut EvacuationSeen)) {
        if let Some(seen) = self.situation.evacuations.iter_mut().flatten().find(|e| e.name == name) {
            change(seen);
        }
    }

    fn observer(&self, cancelling: Arc<AtomicBool>) -> AgentObserver<K> {
        AgentObserver {
            cluster: self.cluster.clone(),
            progress: self.progress.clone(),
            metrics: self.metrics.clone(),
            total: AtomicUsize::new(0),
            cancelling,
        }
    }

    /// SIGTERM: start nothing new, leave in-flight migrations to Nova, record state, exit.
    /// After a restart or a rolling update the guard stays as it is: a drain keeps
    /// waiting for the agent's return. When the agent is being uninstalled, see
    /// [`Agent::leave_guard_if_uninstalled`].
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
                        ..self.situation.recorded.clone()
                    };
                    self.save(state).await;
                }
                _ => warn!("the evacuation did not stop in time; it resumes when the agent starts again"),
            }
        }
        if tokio::time::timeout(UNINSTALL_BUDGET, self.leave_guard_if_uninstalled())
            .await
            .is_err()
        {
            warn!(
                "could not finish releasing the guard in time; if the agent is being uninstalled, run `drainer \
                 release-guard {}`",
                self.settings.target.node
            );
        }
        crate::exit::DONE
    }

    /// An agent going for good (not restarted) releases the guard of a node
    /// that nothing drains, so that uninstalling never blocks later drains;
    /// a cordoned node whose hypervisor is not known empty keeps its guard,
    /// and an Event says so.
    async fn leave_guard_if_uninstalled(&mut self) {
        let why = match self.cluster.uninstalled().await {
            Ok(Some(why)) => why,
            Ok(None) => return,
            Err(e) => {
                warn!(
                    error = %e,
                    "cannot tell whether the agent is being uninstalled; the guard stays: if it is, run `drainer \
                     release-guard {} (or --all)` with your own credentials",
                    self.settings.target.node
                );
                return;
            }
        };
        let node = self.settings.target.node.clone();
        match at_uninstall(&self.situation) {
            AtUninstall::Nothing => info!(%why, "uninstalled; the guard was already released"),
            AtUninstall::Release => match self.cluster.release_guard().await {
                Ok(()) => {
                    self.situation.released = true;
                    info!(%why, "uninstalled: the guard is released, drains of this node no longer wait for it");
                }
                Err(e) => warn!(
                    error = %e,
                    "uninstalled ({why}), but the guard could not be released: run `drainer release-guard {node}`"
                ),
            },
            AtUninstall::Keep => {
                self.cluster.publish(
                    Severity::Warning,
                    "DrainGuardKept",
                    format!(
                        "the agent is being uninstalled ({why}) while the node is cordoned and its hypervisor is not \
                         known to be empty: the guard {} keeps `kubectl drain` waiting; once the hypervisor is empty, \
                         release it with `drainer release-guard {node}`",
                        self.cluster.guard_name()
                    ),
                );
                self.cluster.flush_events().await;
            }
        }
    }
}

/// Stops a run (no new migration, in-flight ones aborted) the moment the
/// coordinator no longer counts on the node's slot: the agent's own loop may
/// be held up by the very API server that keeps the slot from being renewed.
async fn guard_slot(
    mut told: watch::Receiver<Standing>,
    stop: Arc<watch::Sender<StopRequest>>,
    cancelling: Arc<AtomicBool>,
    slot_lost: Arc<AtomicBool>,
) {
    if told
        .wait_for(|standing| !matches!(standing, Standing::Holding { .. }))
        .await
        .is_err()
    {
        return;
    }
    warn!("the evacuation slot is no longer held: stopping the evacuation");
    slot_lost.store(true, Ordering::Relaxed);
    cancelling.store(true, Ordering::Relaxed);
    stop.send_if_modified(|request| {
        let continues = *request == StopRequest::Continue;
        if continues {
            *request = StopRequest::AbortInFlight;
        }
        continues
    });
}

/// Turns the engine's events into Kubernetes Events and progress.
struct AgentObserver<K> {
    cluster: Arc<K>,
    progress: mpsc::UnboundedSender<Progress>,
    metrics: Arc<Metrics>,
    total: AtomicUsize,
    /// Set once an uncordon asked the engine to abort: what stays is cancelled, not failed.
    cancelling: Arc<AtomicBool>,
}

fn vm(server: &crate::evacuation::Server) -> String {
    format!("{} ({})", server.name, server.id)
}

impl<K: Cluster> Observer for AgentObserver<K> {
    fn event(&self, event: &Event<'_>) {
        if let Some(progress) = record::progress_of(event, &rfc3339(jiff::Timestamp::now(), Duration::ZERO)) {
            let _ = self.progress.send(progress);
        }
        match event {
            Event::EvacuationStarted { to_move, to_skip } => {
                self.total.store(to_move + to_skip, Ordering::Relaxed);
                self.metrics.vms_remaining.set((to_move + to_skip) as i64);
            }
            Event::Progress { total, moved, .. } => {
                // A VM that failed to move is still on the host.
                let all = self.total.load(Ordering::Relaxed).max(*total);
                let left = all.saturating_sub(*moved);
                self.metrics.vms_remaining.set(left as i64);
                let _ = self.progress.send(Progress::Left(left));
            }
            _ => {}
        }
        if let Some((severity, reason, note)) = event_note(event, self.cancelling.load(Ordering::Relaxed)) {
            self.cluster.publish(severity, reason, note);
        }
    }
}

/// The Kubernetes Event that tells an engine event, if any (`cancelling`:
/// the run is being cancelled, so a VM that stays is no failure).
fn event_note(event: &Event<'_>, cancelling: bool) -> Option<(Severity, &'static str, String)> {
    let by_action = |action: &Action, cold, live| if *action == Action::ColdMigrate { cold } else { live };
    Some(match event {
        Event::ServiceDisabled { reason } => (
            Severity::Normal,
            "NovaComputeDisabled",
            format!("nova-compute disabled: {reason}"),
        ),
        Event::EvacuationStarted { to_move, to_skip } => (
            Severity::Normal,
            "EvacuationStarted",
            format!("moving {to_move} VM(s) off the hypervisor; {to_skip} left in place by policy"),
        ),
        Event::MigrationStarted {
            server,
            action,
            attempt,
        } => (
            Severity::Normal,
            by_action(action, "ColdMigrationStarted", "LiveMigrationStarted"),
            format!("{} attempt {attempt}", vm(server)),
        ),
        Event::MigrationSucceeded {
            server,
            action,
            destination,
            seconds,
        } => (
            Severity::Normal,
            by_action(action, "ColdMigrationSucceeded", "LiveMigrationSucceeded"),
            format!("{} now on {destination} after {seconds:.1} s", vm(server)),
        ),
        Event::MigrationFailed {
            server,
            action,
            reason,
            retry_in,
        } => {
            let next = match retry_in {
                Some(delay) => format!("retrying in {} s", delay.as_secs()),
                None => "no attempts left".to_string(),
            };
            (
                Severity::Warning,
                by_action(action, "ColdMigrationFailed", "LiveMigrationFailed"),
                format!("{}: {reason}; {next}", vm(server)),
            )
        }
        Event::Intervened { server, what, reason } => (
            Severity::Warning,
            "LiveMigrationIntervened",
            format!("{what} {}: {reason}", vm(server)),
        ),
        Event::NotMigratable { server, reason } if cancelling => (
            Severity::Normal,
            "MigrationCancelled",
            format!("{} stays: the evacuation was cancelled ({reason})", vm(server)),
        ),
        Event::NotMigratable { server, reason } => (
            Severity::Warning,
            "VMNotMigratable",
            format!("{} ({}) stays: {reason}", vm(server), server.status),
        ),
        Event::Stopped { server } => (
            Severity::Normal,
            "VMStopped",
            format!(
                "{} stopped for the maintenance, as asked; it is started again when the maintenance ends",
                vm(server)
            ),
        ),
        Event::ServiceAlreadyDisabled { .. } | Event::Progress { .. } => return None,
    })
}
