//! The agent's decisions, as plain functions of what it knows: no I/O, no
//! clock of their own, so every transition is unit-tested below.
//!
//! [`decide`] looks at the Node, the recorded drain state, the node's
//! Evacuation objects (hand-made ones ask for a run, a deleted one cancels
//! it, a paused one asks for a plan only), the running evacuation and the
//! guard pod, and names the steps that bring the world in line; [`conclude`] says what a finished evacuation means for the record,
//! the guard and the next try.

use std::time::Duration;

use tokio::time::Instant;

use super::coordinator::Standing;
use crate::evacuation::{BudgetAction, Outcome, Report, RunResult, Settings, VmPolicy};
use crate::kube::evacuation::{BudgetChoice, EvacuationMode, EvacuationSeen, EvacuationSpec, VmAction};
use crate::kube::guard::GuardPod;
use crate::kube::{DrainState, Phase, Severity};

/// The agent's own Node as last seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NodeSeen {
    /// Not listed yet.
    #[default]
    Unknown,
    Present {
        cordoned: bool,
    },
    Deleted,
}

/// The evacuation task, if one runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Evacuation {
    #[default]
    None,
    Running,
    /// Asked to abort its in-flight migrations (the uncordon, its Evacuation deleted).
    Cancelling,
}

/// Everything the decisions depend on.
#[derive(Clone, Debug, Default)]
pub struct Situation {
    pub node: NodeSeen,
    /// The drain state as last recorded on the Node.
    pub recorded: DrainState,
    pub evacuation: Evacuation,
    /// A failed evacuation or restore is not tried again before this.
    pub retry_at: Option<Instant>,
    /// The guard pod; `None` until its watch has listed.
    pub guard: Option<GuardPod>,
    /// The guard has been released for the current cordon (drain may finish).
    pub released: bool,
    /// Nova and Keystone have answered at least once (the client is set up).
    pub compute_ready: bool,
    /// The guard could not be tended; not tried again before this.
    pub guard_retry_at: Option<Instant>,
    /// The node's Evacuation objects as last seen, those deleted since the
    /// agent started kept as `deleting`; `None` until listed (an empty list
    /// when they cannot be listed: see `evacuations_listed`).
    pub evacuations: Option<Vec<EvacuationSeen>>,
    /// The list came from the API server: an Evacuation missing from it is gone.
    pub evacuations_listed: bool,
    /// Evacuations created at a cordon start paused: a person approves each.
    pub start_paused: bool,
    /// An Evacuation's finalizer could not be put on or taken off; not tried again before this.
    pub finalizer_retry_at: Option<Instant>,
    /// The Evacuation the agent created that its watch has not shown yet:
    /// missing from the list, it is new, not deleted.
    pub created_unseen: Option<String>,
    /// The cluster shares a limited number of evacuation slots: a run needs one.
    pub coordinated: bool,
    /// Where the node stands in the queue for them.
    pub slot: Standing,
    /// Nova told the hypervisor's availability zone (the queue needs it under a zone rule).
    pub zone_known: bool,
}

impl Situation {
    /// The hand-made Evacuation asking for maintenance: the oldest not being deleted.
    fn asked(&self) -> Option<&EvacuationSeen> {
        self.evacuations
            .iter()
            .flatten()
            .filter(|e| e.by_hand && !e.deleting)
            .min_by(|a, b| a.created.cmp(&b.created))
    }

    fn seen(&self, name: &str) -> Option<&EvacuationSeen> {
        self.evacuations.iter().flatten().find(|e| e.name == name)
    }

    /// Whether the Evacuation recording the current run was deleted: its
    /// deletion seen, or, for a run not under way, no longer listed (deleted
    /// while no agent ran), unless the watch has not shown it yet.
    fn record_deleted(&self) -> bool {
        let Some(name) = &self.recorded.evacuation else {
            return false;
        };
        match self.seen(name) {
            Some(seen) => seen.deleting,
            None => {
                self.evacuation == Evacuation::None
                    && self.evacuations_listed
                    && self.created_unseen.as_ref() != Some(name)
            }
        }
    }

    /// Whether a run may change Nova: it holds one of the cluster's
    /// evacuation slots, or the cluster does not share them.
    pub fn may_evacuate(&self) -> bool {
        !self.coordinated || matches!(self.slot, Standing::Holding { .. })
    }

    /// Whether anything asks for the hypervisor's maintenance: a cordon, or a hand-made Evacuation.
    pub fn wanted(&self) -> bool {
        self.node == (NodeSeen::Present { cordoned: true }) || self.asked().is_some()
    }
}

/// Which Evacuation records the next run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordFor {
    /// The one a stopped agent, or a paused plan, left (the Node names it).
    Resume(String),
    /// A hand-made one asking for maintenance.
    Asked(String),
    /// A new one, owned by the Node; `paused` when the site approves each.
    Create { paused: bool },
}

impl RecordFor {
    /// Where the next run is recorded: the run the Node names if it was under
    /// way or paused, else the Evacuation made by hand, else a new one.
    pub fn of(situation: &Situation) -> RecordFor {
        let recorded = &situation.recorded;
        if let Some(name) = &recorded.evacuation
            && matches!(recorded.phase, Phase::Waiting | Phase::Evacuating | Phase::Paused)
            && !situation.record_deleted()
        {
            return RecordFor::Resume(name.clone());
        }
        match situation.asked() {
            Some(asked) => RecordFor::Asked(asked.name.clone()),
            // A retry after a failure was approved with the first run.
            None => RecordFor::Create {
                paused: situation.start_paused && recorded.phase == Phase::Idle,
            },
        }
    }

    /// Whether the run waits for approval (a run under way is never paused).
    fn paused(&self, situation: &Situation) -> bool {
        match self {
            RecordFor::Resume(name) => match situation.recorded.phase {
                Phase::Paused => situation.seen(name).is_none_or(|seen| seen.spec.paused),
                // Paused again while it waited for a slot: planned, out of the queue.
                Phase::Waiting => situation.seen(name).is_some_and(|seen| seen.spec.paused),
                _ => false,
            },
            RecordFor::Asked(name) => situation.seen(name).is_some_and(|seen| seen.spec.paused),
            RecordFor::Create { paused } => *paused,
        }
    }
}

/// Why a running evacuation (or a paused plan) is cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelCause {
    /// Nothing asks for it any more: the uncordon, or (for a plan a cordon
    /// asked for) the uncordon while a hand-made Evacuation asks.
    Unasked,
    /// The Evacuation recording it was deleted: no new run follows.
    Deleted,
    /// The node's evacuation slot could not be renewed in time: the run
    /// stops before another node can take the slot, and waits for it again.
    SlotLost,
}

/// What the agent does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Record the phase Evacuating, then start the engine.
    Evacuate,
    /// Disable the service and wait in the queue for an evacuation slot (phase Waiting).
    Wait,
    /// Write the plan to the (paused) Evacuation and record the phase Paused; nothing changes in Nova.
    Plan,
    /// Ask the running engine to abort its in-flight migrations.
    Cancel(CancelCause),
    /// A run not under way (paused, failed, or left by a stopped agent) ends:
    /// its Evacuation deleted (the phase Cancelled recorded), or its plan
    /// no longer asked for (Idle recorded).
    MarkCancelled(CancelCause),
    /// The hypervisor was emptied before: release the guard if Nova shows no
    /// VM running on it, else evacuate again.
    ReleaseGuardIfNoneRuns,
    /// Re-enable the service if it is still ours, then record Idle.
    Restore,
    /// Create the guard pod and budget, or put our finalizer back on the pod.
    PutGuard,
    /// Delete the budget and take our finalizer off: drain may finish.
    ReleaseGuard,
    /// The guard is being deleted while nothing is to be guarded: release it
    /// if Nova lists no VM on the host (a drain may still be waiting on it).
    LetGuardGoIfEmpty,
    /// Put our finalizer on a hand-made Evacuation.
    HoldEvacuation(String),
    /// Take our finalizer off a deleted Evacuation whose maintenance has ended.
    LetEvacuationGo(String),
}

/// The steps that bring the world in line with the Node and its Evacuations as they are now.
pub fn decide(situation: &Situation, now: Instant) -> Vec<Step> {
    let due = |at: Option<Instant>| at.is_none_or(|at| at <= now);
    let phase = situation.recorded.phase;
    let mut steps = Vec::new();
    match situation.node {
        NodeSeen::Unknown => return steps,
        // Nothing can drain a deleted Node; its guard must not be held for ever.
        NodeSeen::Deleted => {
            if !situation.released && due(situation.guard_retry_at) {
                steps.push(Step::ReleaseGuard);
            }
            return steps;
        }
        NodeSeen::Present { cordoned } => steps.extend(maintenance(situation, cordoned, due)),
    }
    if due(situation.finalizer_retry_at) {
        steps.extend(evacuation_finalizers(situation));
    }
    if let Some(guard) = &situation.guard
        && due(situation.guard_retry_at)
    {
        let idle = situation.node == NodeSeen::Present { cordoned: false }
            && situation.evacuation == Evacuation::None
            && phase == Phase::Idle;
        match guard {
            GuardPod::Terminating { held: true } if idle && situation.compute_ready => {
                steps.push(Step::LetGuardGoIfEmpty)
            }
            GuardPod::Missing | GuardPod::Present { held: false, .. }
                if !situation.released && phase != Phase::Evacuated =>
            {
                steps.push(Step::PutGuard)
            }
            _ => {}
        }
    }
    steps
}

/// The step the maintenance asks for: a cordon or a hand-made Evacuation
/// asks for the hypervisor to be evacuated (or planned, when paused);
/// neither, for it to be restored; a deleted Evacuation cancels its run.
fn maintenance(situation: &Situation, cordoned: bool, due: impl Fn(Option<Instant>) -> bool) -> Option<Step> {
    let phase = situation.recorded.phase;
    let recorded = situation.recorded.evacuation.as_deref();
    // A hand-made Evacuation that no run has recorded yet.
    let asked_anew = situation.asked().filter(|a| recorded != Some(a.name.as_str()));
    let ready = situation.compute_ready && due(situation.retry_at) && situation.evacuations.is_some();
    match situation.evacuation {
        Evacuation::Running if situation.record_deleted() => Some(Step::Cancel(CancelCause::Deleted)),
        Evacuation::Running if !situation.wanted() => Some(Step::Cancel(CancelCause::Unasked)),
        Evacuation::Running if !situation.may_evacuate() => Some(Step::Cancel(CancelCause::SlotLost)),
        Evacuation::Running | Evacuation::Cancelling => None,
        Evacuation::None
            if situation.record_deleted()
                && matches!(
                    phase,
                    Phase::Waiting | Phase::Evacuating | Phase::Paused | Phase::Failed | Phase::TimedOut
                ) =>
        {
            Some(Step::MarkCancelled(CancelCause::Deleted))
        }
        // The plan a cordon asked for, not approved before the uncordon, while a hand-made one asks.
        Evacuation::None
            if phase == Phase::Paused
                && !cordoned
                && situation.wanted()
                && recorded
                    .and_then(|name| situation.seen(name))
                    .is_some_and(|seen| !seen.by_hand) =>
        {
            Some(Step::MarkCancelled(CancelCause::Unasked))
        }
        Evacuation::None if situation.wanted() => match phase {
            // Emptied before: released only once Nova shows no VM running there
            // (the run may have been a hand-made one's, days ago, or the agent restarted).
            Phase::Evacuated if asked_anew.is_none() => {
                (cordoned && !situation.released && situation.compute_ready && due(situation.guard_retry_at))
                    .then_some(Step::ReleaseGuardIfNoneRuns)
            }
            // Cancelled stays until the uncordon, or a hand-made Evacuation (the
            // cancelled one was deleted: one asking now is new, whatever its name).
            Phase::Cancelled if situation.asked().is_none() => None,
            _ if ready => next_run(situation),
            _ => None,
        },
        // Only once the Evacuations are listed: a hand-made one may still ask for the maintenance.
        Evacuation::None if phase != Phase::Idle && ready => Some(Step::Restore),
        Evacuation::None => None,
    }
}

/// Runs, or plans when paused; a hand-made Evacuation only once our
/// finalizer holds it (its deletion must wait for the restore).
fn next_run(situation: &Situation) -> Option<Step> {
    let next = RecordFor::of(situation);
    if let RecordFor::Asked(name) = &next
        && !situation.seen(name).is_some_and(|seen| seen.held)
    {
        return None;
    }
    match (next.paused(situation), situation.recorded.phase) {
        // Planned again when its spec changed meanwhile.
        (true, Phase::Paused) => match &next {
            RecordFor::Resume(name) if situation.seen(name).is_some_and(|seen| seen.plan_outdated) => Some(Step::Plan),
            _ => None,
        },
        (true, _) => Some(Step::Plan),
        (false, _) if situation.may_evacuate() => Some(Step::Evacuate),
        // Waiting already; after a restart, once more to learn the zone (and disable again).
        (false, Phase::Waiting) if situation.zone_known => None,
        (false, _) => Some(Step::Wait),
    }
}

/// Our finalizer goes on every hand-made Evacuation, and comes off one being
/// deleted once what it asked for has ended: its run is neither going on nor
/// still to be recorded as cancelled, and the service is restored (or
/// something else, a cordon or another Evacuation, keeps the maintenance going).
fn evacuation_finalizers(situation: &Situation) -> Vec<Step> {
    let phase = situation.recorded.phase;
    let unsettled = |name: &str| {
        let records_it = situation.recorded.evacuation.as_deref() == Some(name);
        let its_run_open = situation.evacuation != Evacuation::None
            || matches!(
                phase,
                Phase::Waiting | Phase::Evacuating | Phase::Paused | Phase::Failed | Phase::TimedOut
            );
        (records_it && its_run_open) || (!situation.wanted() && phase != Phase::Idle)
    };
    situation
        .evacuations
        .iter()
        .flatten()
        .filter_map(|seen| match (seen.by_hand, seen.deleting, seen.held) {
            (true, false, false) => Some(Step::HoldEvacuation(seen.name.clone())),
            (_, true, true) if !unsettled(&seen.name) => Some(Step::LetEvacuationGo(seen.name.clone())),
            _ => None,
        })
        .collect()
}

/// What an agent that is being uninstalled (not restarted) does with its guard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtUninstall {
    /// Nobody will tend the guard again: let drains finish (nothing is being drained,
    /// or the hypervisor is empty).
    Release,
    /// The node is cordoned and its hypervisor not known empty: a drain may be
    /// waiting and VMs may run, so the guard stays and an Event says so.
    Keep,
    /// Nothing of the guard is left to release.
    Nothing,
}

/// The guard's fate when the agent goes for good (its DaemonSet gone or
/// being deleted, its namespace terminating, its node no longer selected).
pub fn at_uninstall(situation: &Situation) -> AtUninstall {
    if situation.released {
        return AtUninstall::Nothing;
    }
    match situation.node {
        NodeSeen::Present { cordoned: true } if situation.recorded.phase != Phase::Evacuated => AtUninstall::Keep,
        NodeSeen::Unknown => AtUninstall::Keep,
        NodeSeen::Present { .. } | NodeSeen::Deleted => AtUninstall::Release,
    }
}

/// How long a node that stays cordoned waits after failed runs: `first`
/// after one failure, doubling with each further failure in a row, never more
/// than `max`, so a VM that can never move costs a run (and its Events) every
/// `max` instead of every minute for as long as the node stays cordoned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryBackoff {
    pub first: Duration,
    pub max: Duration,
}

impl RetryBackoff {
    /// The wait after `failures` failed runs in a row (at least one).
    pub fn after(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(30);
        self.first
            .saturating_mul(1u32 << doublings)
            .min(self.max.max(self.first))
    }
}

/// `now + delay` in the form the Node's annotations use.
pub fn rfc3339(now: jiff::Timestamp, delay: Duration) -> String {
    let at = jiff::SignedDuration::try_from(delay)
        .ok()
        .and_then(|d| now.checked_add(d).ok())
        .unwrap_or(now);
    at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// What a finished evacuation means.
#[derive(Clone, Debug, PartialEq)]
pub struct Conclusion {
    /// To be recorded on the Node.
    pub state: DrainState,
    /// Release the guard: the hypervisor is empty, or the operator asked to let drains finish anyway.
    pub release_guard: bool,
    /// Evacuate again after this long if the node stays cordoned.
    pub retry_in: Option<Duration>,
    /// The Event that tells it.
    pub event: (Severity, &'static str, String),
}

/// Turns the end of an evacuation (its report, or why it could not run) into
/// the record, the guard's fate, the next try and the Event.
pub fn conclude(
    recorded: &DrainState,
    result: Result<&Report, String>,
    cancelled: Option<CancelCause>,
    release_guard_on_failure: bool,
    backoff: RetryBackoff,
    wall_now: jiff::Timestamp,
) -> Conclusion {
    let mut state = DrainState {
        last_error: None,
        failures: 0,
        next_retry_at: None,
        ..recorded.clone()
    };
    match cancelled {
        Some(CancelCause::Deleted) => return deleted(state, result),
        Some(CancelCause::SlotLost) if !result.as_ref().is_ok_and(|r| r.result == RunResult::Succeeded) => {
            return slot_lost(state, result);
        }
        _ => {}
    }
    let cancelled = cancelled.is_some();
    let failed = |state: DrainState, reason: &'static str, why: String| {
        let failures = recorded.failures.saturating_add(1);
        let retry_in = (!cancelled).then(|| backoff.after(failures));
        Conclusion {
            state: DrainState {
                last_error: Some(why.clone()),
                failures,
                next_retry_at: retry_in.map(|delay| rfc3339(wall_now, delay)),
                ..state
            },
            release_guard: release_guard_on_failure && !cancelled,
            retry_in,
            event: (Severity::Warning, reason, why),
        }
    };
    let report = match result {
        Ok(report) => report,
        Err(why) => {
            state.phase = Phase::Failed;
            return failed(state, "EvacuationFailed", why);
        }
    };
    state.disabled_by_us = report.service_disabled_by_us;
    state.vms_total = Some(report.vms.len());
    state.vms_left = Some(report.servers_left_on_host);
    match report.result {
        RunResult::Succeeded => emptied(
            state,
            format!(
                "the hypervisor {} is empty ({} VM(s) moved in {:.0} s)",
                report.host,
                report.vms.len(),
                report.duration_seconds
            ),
        ),
        RunResult::Interrupted if cancelled => Conclusion {
            // The phase stays as it was: the restore that follows records Idle.
            state,
            release_guard: false,
            retry_in: None,
            event: (
                Severity::Normal,
                "EvacuationCancelled",
                format!(
                    "nothing asks for the maintenance any more (the uncordon): {} VM(s) stay on {}",
                    report.servers_left_on_host, report.host
                ),
            ),
        },
        RunResult::TimedOut => {
            state.phase = Phase::TimedOut;
            failed(state, "EvacuationTimedOut", left_behind(report))
        }
        _ => {
            state.phase = Phase::Failed;
            failed(state, "EvacuationFailed", left_behind(report))
        }
    }
}

/// A run stopped because its slot could not be renewed: back to Waiting
/// (not a failure: no backoff), the guard kept.
fn slot_lost(mut state: DrainState, result: Result<&Report, String>) -> Conclusion {
    if let Ok(report) = result {
        state.disabled_by_us = report.service_disabled_by_us;
        state.vms_total = Some(report.vms.len());
        state.vms_left = Some(report.servers_left_on_host);
    }
    state.phase = Phase::Waiting;
    let left = state.vms_left.map_or_else(|| "its".to_string(), |n| n.to_string());
    Conclusion {
        state,
        release_guard: false,
        retry_in: None,
        event: (
            Severity::Warning,
            "EvacuationSlotLost",
            format!(
                "the cluster's evacuation slot could not be renewed in time (is the Kubernetes API server \
                 reachable?): no migration starts and those in flight were aborted; {left} VM(s) stay on the \
                 hypervisor until the slot is held again"
            ),
        ),
    }
}

/// A run that emptied the hypervisor: recorded Evacuated, the guard let go.
fn emptied(mut state: DrainState, note: String) -> Conclusion {
    state.phase = Phase::Evacuated;
    Conclusion {
        state,
        release_guard: true,
        retry_in: None,
        event: (Severity::Normal, "EvacuationSucceeded", note),
    }
}

/// The settings of one run: the agent's, overridden by what the Node's
/// `vm-action` annotation and then the Evacuation recording the run ask. An
/// annotation that cannot be read is refused, never guessed at.
pub fn run_settings(
    base: &Settings,
    spec: Option<&EvacuationSpec>,
    annotation: Option<&str>,
) -> Result<Settings, String> {
    let mut settings = base.clone();
    if let Some(text) = annotation {
        let policy: VmPolicy = text
            .parse()
            .map_err(|e: String| format!("the Node's annotation {}: {e}", crate::kube::VM_ACTION))?;
        settings.node_default = Some(policy);
    }
    let Some(spec) = spec else { return Ok(settings) };
    if let Some(action) = spec.vm_action {
        settings.node_default = Some(match action {
            VmAction::LiveMigrate => VmPolicy::LiveMigrate,
            VmAction::ColdMigrate => VmPolicy::ColdMigrate,
            VmAction::Stop => VmPolicy::Stop,
            VmAction::Leave => VmPolicy::Leave,
        });
    }
    if let Some(mode) = spec.mode {
        settings.check_capacity = mode == EvacuationMode::CheckCapacity;
    }
    if let Some(max) = spec.max_parallel {
        settings.max_parallel = usize::try_from(max.max(1)).unwrap_or(1);
    }
    if let Some(minutes) = spec.timeout_minutes {
        settings.timeout = Some(Duration::from_secs(u64::from(minutes.max(1)) * 60));
    }
    if let Some(choice) = spec.on_budget_exceeded {
        settings.on_budget_exceeded = match choice {
            BudgetChoice::Abort => BudgetAction::Abort,
            BudgetChoice::ForceComplete => BudgetAction::ForceComplete,
        };
    }
    Ok(settings)
}

/// A run that left VMs running on the host because their owner's tag (or the
/// node's default) said `leave` did what was asked, but the node must not be
/// drained yet: its next step is a reboot. Such a run counts as failed
/// (drain keeps waiting, the run is tried again later, and succeeds once
/// the owner has stopped or moved the VM); each VM says why.
pub fn hold_for_running_vms(report: &mut Report) {
    if report.result != RunResult::Succeeded {
        return;
    }
    let mut held = false;
    for vm in &mut report.vms {
        if vm.outcome == Outcome::Left && vm.status != "SHUTOFF" {
            held = true;
            vm.reason = Some(format!(
                "left {} as asked ({}), so the node is not drained: kubectl drain waits until it is stopped or \
                 moved",
                vm.status,
                vm.reason
                    .as_deref()
                    .unwrap_or("its tag or the node's default says leave")
            ));
        }
    }
    if held {
        report.result = RunResult::Failed;
    }
}

/// The end of a run whose Evacuation was deleted: recorded Cancelled (no new
/// run while the node stays cordoned), unless it had just emptied the host.
fn deleted(mut state: DrainState, result: Result<&Report, String>) -> Conclusion {
    let name = state.evacuation.clone().unwrap_or_default();
    let left = match result {
        Ok(report) => {
            state.disabled_by_us = report.service_disabled_by_us;
            state.vms_total = Some(report.vms.len());
            state.vms_left = Some(report.servers_left_on_host);
            if report.result == RunResult::Succeeded {
                let note = format!(
                    "the hypervisor {} is empty (its Evacuation {name} was deleted at the end)",
                    report.host
                );
                return emptied(state, note);
            }
            format!("{} VM(s) stay on {}", report.servers_left_on_host, report.host)
        }
        Err(why) => why,
    };
    let why = cancelled_note(&name);
    state.phase = Phase::Cancelled;
    state.last_error = Some(why.clone());
    Conclusion {
        state,
        release_guard: false,
        retry_in: None,
        event: (Severity::Normal, "EvacuationCancelled", format!("{why}: {left}")),
    }
}

/// What a deleted Evacuation means, for the Node's record and the Event.
pub fn cancelled_note(name: &str) -> String {
    format!(
        "the Evacuation {name} was deleted: nothing more moves until another Evacuation, or a new cordon, asks \
         for it"
    )
}

/// Why a guard cannot keep drains waiting, if it cannot: not Running `grace`
/// after its creation, or not put in place for `grace` because of errors.
pub fn guard_problem(
    guard: Option<&GuardPod>,
    released: bool,
    failing: Option<(Duration, &str)>,
    age: impl Fn(jiff::Timestamp) -> Duration,
    grace: Duration,
    name: &str,
) -> Option<String> {
    if released {
        return None;
    }
    if let Some((failing_for, error)) = failing {
        return (failing_for >= grace).then(|| error.to_string());
    }
    match guard? {
        GuardPod::Present {
            running: false,
            waiting,
            created_at,
            ..
        } => {
            let age = created_at.map(age).unwrap_or(Duration::ZERO);
            (age >= grace).then(|| {
                format!(
                    "the guard pod {name} is not Running after {} s ({}): evictions ignore its budget; `kubectl \
                     drain` still waits on its finalizer, drain tools that do not wait for deleted pods will not",
                    age.as_secs(),
                    waiting.as_deref().unwrap_or("Pending")
                )
            })
        }
        _ => None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evacuation::{Action, Outcome, VmReport};

    fn at(situation: Situation) -> Vec<Step> {
        decide(&situation, Instant::now())
    }

    fn node(cordoned: bool) -> NodeSeen {
        NodeSeen::Present { cordoned }
    }

    fn in_phase(phase: Phase) -> DrainState {
        DrainState {
            phase,
            ..DrainState::default()
        }
    }

    fn running_guard() -> Option<GuardPod> {
        Some(GuardPod::Present {
            held: true,
            running: true,
            waiting: None,
            created_at: None,
        })
    }

    fn ready(node: NodeSeen, phase: Phase) -> Situation {
        Situation {
            node,
            recorded: in_phase(phase),
            guard: running_guard(),
            compute_ready: true,
            evacuations: Some(vec![]),
            evacuations_listed: true,
            ..Situation::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_happens_before_the_node_is_listed() {
        let situation = Situation {
            guard: Some(GuardPod::Missing),
            compute_ready: true,
            ..Situation::default()
        };
        assert_eq!(at(situation), vec![]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cordon_evacuates_once_nova_is_reachable() {
        assert_eq!(at(ready(node(true), Phase::Idle)), vec![Step::Evacuate]);
        // A restarted agent resumes a run it left.
        assert_eq!(at(ready(node(true), Phase::Evacuating)), vec![Step::Evacuate]);
        let unreachable = Situation {
            compute_ready: false,
            ..ready(node(true), Phase::Idle)
        };
        assert_eq!(at(unreachable), vec![]);
    }

    #[tokio::test(start_paused = true)]
    async fn while_an_evacuation_runs_a_cordon_changes_nothing_and_an_uncordon_cancels_it_once() {
        let running = Situation {
            evacuation: Evacuation::Running,
            ..ready(node(true), Phase::Evacuating)
        };
        assert_eq!(at(running.clone()), vec![]);
        let uncordoned = Situation {
            node: node(false),
            ..running
        };
        assert_eq!(at(uncordoned.clone()), vec![Step::Cancel(CancelCause::Unasked)]);
        let cancelling = Situation {
            evacuation: Evacuation::Cancelling,
            ..uncordoned
        };
        assert_eq!(at(cancelling.clone()), vec![]);
        // Cordoned again before the cancellation ended: wait for it, then evacuate afresh.
        assert_eq!(
            at(Situation {
                node: node(true),
                ..cancelling
            }),
            vec![]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_hypervisor_releases_the_guard_once() {
        // Recorded as evacuated, not released (a restart, or a hand-made run
        // before the cordon): released once Nova shows nothing running there.
        assert_eq!(
            at(ready(node(true), Phase::Evacuated)),
            vec![Step::ReleaseGuardIfNoneRuns]
        );
        let released = Situation {
            released: true,
            guard: Some(GuardPod::Missing),
            ..ready(node(true), Phase::Evacuated)
        };
        assert_eq!(at(released), vec![], "drain took the pod: not put back while cordoned");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_run_is_tried_again_only_when_due() {
        let later = Instant::now() + Duration::from_secs(60);
        let failed = Situation {
            retry_at: Some(later),
            ..ready(node(true), Phase::Failed)
        };
        assert_eq!(at(failed.clone()), vec![]);
        assert_eq!(decide(&failed, later), vec![Step::Evacuate]);
        let timed_out = Situation {
            recorded: in_phase(Phase::TimedOut),
            ..failed
        };
        assert_eq!(decide(&timed_out, later), vec![Step::Evacuate]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_uncordon_restores_and_a_failed_restore_is_retried_when_due() {
        for phase in [Phase::Evacuating, Phase::Evacuated, Phase::Failed, Phase::TimedOut] {
            assert_eq!(at(ready(node(false), phase)), vec![Step::Restore], "{phase:?}");
        }
        let later = Instant::now() + Duration::from_secs(10);
        let nova_down = Situation {
            retry_at: Some(later),
            ..ready(node(false), Phase::Evacuated)
        };
        assert_eq!(at(nova_down.clone()), vec![]);
        assert_eq!(decide(&nova_down, later), vec![Step::Restore]);
        assert_eq!(at(ready(node(false), Phase::Idle)), vec![]);
    }

    fn by_hand(name: &str, paused: bool, deleting: bool, held: bool) -> EvacuationSeen {
        EvacuationSeen {
            name: name.into(),
            by_hand: true,
            spec: EvacuationSpec {
                paused,
                ..EvacuationSpec::default()
            },
            deleting,
            held,
            plan_outdated: false,
            generation: Some(1),
            created: ("2026-12-07T00:00:00Z".into(), name.into()),
        }
    }

    fn recording(phase: Phase, name: &str) -> DrainState {
        DrainState {
            phase,
            evacuation: Some(name.into()),
            ..DrainState::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hand_made_evacuation_asks_for_the_maintenance_by_itself() {
        // Held first, then evacuated, without a cordon.
        let asked = Situation {
            evacuations: Some(vec![by_hand("m1", false, false, false)]),
            ..ready(node(false), Phase::Idle)
        };
        assert_eq!(
            at(asked),
            vec![Step::HoldEvacuation("m1".into())],
            "held before it runs"
        );
        let held = Situation {
            evacuations: Some(vec![by_hand("m1", false, false, true)]),
            ..ready(node(false), Phase::Idle)
        };
        assert_eq!(at(held), vec![Step::Evacuate]);
        // Paused: the plan, once; nothing more while it stays paused.
        let paused = Situation {
            evacuations: Some(vec![by_hand("m1", true, false, true)]),
            ..ready(node(false), Phase::Idle)
        };
        assert_eq!(at(paused.clone()), vec![Step::Plan]);
        let planned = Situation {
            recorded: recording(Phase::Paused, "m1"),
            ..paused
        };
        assert_eq!(at(planned.clone()), vec![]);
        let approved = Situation {
            evacuations: Some(vec![by_hand("m1", false, false, true)]),
            ..planned
        };
        assert_eq!(at(approved), vec![Step::Evacuate]);
        // While it exists, the evacuated hypervisor stays so: no restore.
        let evacuated = Situation {
            recorded: recording(Phase::Evacuated, "m1"),
            released: true,
            evacuations: Some(vec![by_hand("m1", false, false, true)]),
            ..ready(node(false), Phase::Idle)
        };
        assert_eq!(at(evacuated.clone()), vec![]);
        // Another made by hand while the hypervisor is evacuated: a run of its own records it.
        let another = Situation {
            evacuations: Some(vec![
                by_hand("m1", false, false, true),
                EvacuationSeen {
                    created: ("2026-12-08T00:00:00Z".into(), "m2".into()),
                    ..by_hand("m2", false, false, true)
                },
            ]),
            ..evacuated.clone()
        };
        assert_eq!(at(another), vec![], "the oldest (m1) drives");
        let newer_only = Situation {
            evacuations: Some(vec![by_hand("m2", false, false, true)]),
            ..evacuated.clone()
        };
        assert_eq!(at(newer_only), vec![Step::Evacuate]);
        // A cordon's plan not approved before the uncordon gives way to a hand-made one.
        let cordon_plan = Situation {
            recorded: recording(Phase::Paused, "node-a-1"),
            evacuations: Some(vec![
                EvacuationSeen {
                    by_hand: false,
                    ..by_hand("node-a-1", true, false, false)
                },
                by_hand("m3", false, false, true),
            ]),
            ..ready(node(false), Phase::Idle)
        };
        assert_eq!(at(cordon_plan), vec![Step::MarkCancelled(CancelCause::Unasked)]);
        // Not listed yet (an agent just restarted): neither restored nor evacuated.
        let unlisted = Situation {
            evacuations: None,
            ..evacuated.clone()
        };
        assert_eq!(at(unlisted), vec![]);
        // Deleted: restored first, then let go.
        let deleted = Situation {
            evacuations: Some(vec![by_hand("m1", false, true, true)]),
            ..evacuated
        };
        assert_eq!(at(deleted.clone()), vec![Step::Restore]);
        let restored = Situation {
            recorded: DrainState::default(),
            released: false,
            ..deleted
        };
        assert_eq!(at(restored), vec![Step::LetEvacuationGo("m1".into())]);
    }

    #[tokio::test(start_paused = true)]
    async fn deleting_the_evacuation_of_a_run_cancels_it_and_a_cordon_does_not_start_another() {
        let deleted = Some(vec![EvacuationSeen {
            by_hand: false,
            ..by_hand("node-a-1", false, true, false)
        }]);
        let running = Situation {
            evacuation: Evacuation::Running,
            recorded: recording(Phase::Evacuating, "node-a-1"),
            evacuations: deleted.clone(),
            ..ready(node(true), Phase::Idle)
        };
        assert_eq!(at(running), vec![Step::Cancel(CancelCause::Deleted)]);
        let failed = Situation {
            recorded: recording(Phase::Failed, "node-a-1"),
            evacuations: deleted.clone(),
            ..ready(node(true), Phase::Idle)
        };
        assert_eq!(at(failed), vec![Step::MarkCancelled(CancelCause::Deleted)]);
        let cancelled = Situation {
            recorded: recording(Phase::Cancelled, "node-a-1"),
            evacuations: deleted,
            ..ready(node(true), Phase::Idle)
        };
        assert_eq!(at(cancelled.clone()), vec![], "no new run while cordoned");
        let asked_again = Situation {
            evacuations: Some(vec![by_hand("m2", false, false, true)]),
            ..cancelled.clone()
        };
        assert_eq!(at(asked_again), vec![Step::Evacuate]);
        // Made again under the name of the deleted one: a new one, evacuated.
        let same_name = Situation {
            evacuations: Some(vec![EvacuationSeen {
                by_hand: true,
                held: true,
                deleting: false,
                ..by_hand("node-a-1", false, false, true)
            }]),
            ..cancelled.clone()
        };
        assert_eq!(at(same_name), vec![Step::Evacuate]);
        let uncordoned = Situation {
            node: node(false),
            ..cancelled
        };
        assert_eq!(at(uncordoned), vec![Step::Restore]);
        // One just created, not shown by the watch yet, is not taken for deleted.
        let fresh = Situation {
            recorded: recording(Phase::Paused, "node-a-2"),
            created_unseen: Some("node-a-2".into()),
            start_paused: true,
            ..ready(node(true), Phase::Idle)
        };
        assert_eq!(at(fresh), vec![]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_guard_is_put_back_whenever_drains_must_wait() {
        for (cordoned, phase) in [(false, Phase::Idle), (true, Phase::Evacuating), (true, Phase::Failed)] {
            let missing = Situation {
                guard: Some(GuardPod::Missing),
                evacuation: if cordoned {
                    Evacuation::Running
                } else {
                    Evacuation::None
                },
                ..ready(node(cordoned), phase)
            };
            assert_eq!(at(missing), vec![Step::PutGuard], "{cordoned} {phase:?}");
        }
        let unfinalized = Situation {
            guard: Some(GuardPod::Present {
                held: false,
                running: true,
                waiting: None,
                created_at: None,
            }),
            ..ready(node(false), Phase::Idle)
        };
        assert_eq!(at(unfinalized), vec![Step::PutGuard]);
        let not_listed = Situation {
            guard: None,
            ..ready(node(false), Phase::Idle)
        };
        assert_eq!(at(not_listed), vec![]);
        let failing = Situation {
            guard: Some(GuardPod::Missing),
            guard_retry_at: Some(Instant::now() + Duration::from_secs(10)),
            ..ready(node(false), Phase::Idle)
        };
        assert_eq!(at(failing), vec![]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_guard_being_deleted_holds_while_guarding_and_is_let_go_only_when_idle() {
        let terminating = Some(GuardPod::Terminating { held: true });
        let evacuating = Situation {
            guard: terminating.clone(),
            evacuation: Evacuation::Running,
            ..ready(node(true), Phase::Evacuating)
        };
        assert_eq!(at(evacuating), vec![], "drain waits on it");
        let uncordoned_mid_run = Situation {
            guard: terminating.clone(),
            evacuation: Evacuation::Cancelling,
            ..ready(node(false), Phase::Evacuating)
        };
        assert_eq!(at(uncordoned_mid_run), vec![]);
        let idle = Situation {
            guard: terminating.clone(),
            ..ready(node(false), Phase::Idle)
        };
        assert_eq!(at(idle), vec![Step::LetGuardGoIfEmpty]);
        let gone_for_good = Situation {
            guard: Some(GuardPod::Terminating { held: false }),
            ..ready(node(false), Phase::Idle)
        };
        assert_eq!(at(gone_for_good), vec![], "it goes by itself, then it is made again");
    }

    #[test]
    fn at_uninstall_only_a_node_being_drained_keeps_its_guard() {
        let situation = |node, phase| Situation {
            node,
            recorded: in_phase(phase),
            ..Situation::default()
        };
        assert_eq!(at_uninstall(&situation(node(false), Phase::Idle)), AtUninstall::Release);
        assert_eq!(
            at_uninstall(&situation(node(false), Phase::Failed)),
            AtUninstall::Release,
            "uncordoned: nothing is drained"
        );
        assert_eq!(
            at_uninstall(&situation(node(true), Phase::Evacuated)),
            AtUninstall::Release
        );
        for phase in [Phase::Idle, Phase::Evacuating, Phase::Failed, Phase::TimedOut] {
            assert_eq!(
                at_uninstall(&situation(node(true), phase)),
                AtUninstall::Keep,
                "{phase:?}"
            );
        }
        assert_eq!(
            at_uninstall(&situation(NodeSeen::Unknown, Phase::Idle)),
            AtUninstall::Keep
        );
        assert_eq!(
            at_uninstall(&situation(NodeSeen::Deleted, Phase::Idle)),
            AtUninstall::Release
        );
        let released = Situation {
            released: true,
            ..situation(node(true), Phase::Evacuated)
        };
        assert_eq!(at_uninstall(&released), AtUninstall::Nothing);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deleted_node_lets_its_guard_go() {
        assert_eq!(
            at(ready(NodeSeen::Deleted, Phase::Evacuating)),
            vec![Step::ReleaseGuard]
        );
        let released = Situation {
            released: true,
            ..ready(NodeSeen::Deleted, Phase::Evacuating)
        };
        assert_eq!(at(released), vec![]);
    }

    #[test]
    fn an_evacuations_spec_outranks_the_node_annotation_which_outranks_the_config() {
        let base = Settings::default();
        let by_annotation = run_settings(&base, None, Some("stop")).expect("readable");
        assert_eq!(by_annotation.node_default, Some(VmPolicy::Stop));
        let spec = EvacuationSpec {
            vm_action: Some(VmAction::Leave),
            mode: Some(EvacuationMode::Direct),
            max_parallel: Some(4),
            timeout_minutes: Some(30),
            on_budget_exceeded: Some(BudgetChoice::ForceComplete),
            ..EvacuationSpec::default()
        };
        let run = run_settings(&base, Some(&spec), Some("stop")).expect("readable");
        assert_eq!(run.node_default, Some(VmPolicy::Leave));
        assert!(!run.check_capacity);
        assert_eq!(run.max_parallel, 4);
        assert_eq!(run.timeout, Some(Duration::from_secs(1800)));
        assert_eq!(run.on_budget_exceeded, BudgetAction::ForceComplete);
        let unchanged = run_settings(&base, Some(&EvacuationSpec::default()), None).expect("readable");
        assert_eq!(unchanged.max_parallel, base.max_parallel);
        assert_eq!(unchanged.check_capacity, base.check_capacity);
        let error = run_settings(&base, None, Some("evacuate")).expect_err("unreadable");
        assert!(error.contains("nova-kubernetes-drain/vm-action"), "{error}");
    }

    fn report(result: RunResult, left: usize) -> Report {
        Report {
            node: "node-a".into(),
            host: "cmp-a".into(),
            result,
            service_disabled_by_us: true,
            service_disabled_reason: None,
            servers_left_on_host: left,
            duration_seconds: 12.0,
            capacity: None,
            prediction: None,
            warnings: Vec::new(),
            vms: vec![VmReport {
                id: "vm-1".into(),
                name: "web".into(),
                project_id: "p".into(),
                project: None,
                status: "ACTIVE".into(),
                ram_mb: 512,
                action: Action::LiveMigrate,
                from: Default::default(),
                source: "cmp-a".into(),
                destination: None,
                attempts: 3,
                duration_seconds: 9.0,
                outcome: if left == 0 { Outcome::Migrated } else { Outcome::Failed },
                reason: (left > 0).then(|| "no valid host".to_string()),
            }],
        }
    }

    const RETRY: RetryBackoff = RetryBackoff {
        first: Duration::from_secs(60),
        max: Duration::from_secs(960),
    };

    fn conclude_at(
        recorded: &DrainState,
        result: Result<&Report, String>,
        cancelled: bool,
        release_guard_on_failure: bool,
    ) -> Conclusion {
        conclude(
            recorded,
            result,
            cancelled.then_some(CancelCause::Unasked),
            release_guard_on_failure,
            RETRY,
            jiff::Timestamp::UNIX_EPOCH,
        )
    }

    #[test]
    fn success_records_evacuated_and_releases() {
        let done = conclude_at(
            &in_phase(Phase::Evacuating),
            Ok(&report(RunResult::Succeeded, 0)),
            false,
            false,
        );
        assert_eq!(done.state.phase, Phase::Evacuated);
        assert_eq!((done.state.vms_total, done.state.vms_left), (Some(1), Some(0)));
        assert!(done.state.disabled_by_us);
        assert!(done.release_guard);
        assert_eq!(done.retry_in, None);
        assert_eq!(done.event.1, "EvacuationSucceeded");
    }

    #[test]
    fn failure_keeps_the_guard_and_retries_unless_told_to_release() {
        let failed = conclude_at(
            &in_phase(Phase::Evacuating),
            Ok(&report(RunResult::Failed, 1)),
            false,
            false,
        );
        assert_eq!(failed.state.phase, Phase::Failed);
        assert!(!failed.release_guard);
        assert_eq!(failed.retry_in, Some(RETRY.first));
        assert_eq!(failed.state.failures, 1);
        assert_eq!(failed.state.next_retry_at.as_deref(), Some("1970-01-01T00:01:00Z"));
        assert_eq!(failed.event.0, Severity::Warning);
        assert!(
            failed
                .state
                .last_error
                .as_deref()
                .unwrap_or_default()
                .contains("web (vm-1): no valid host")
        );
        let released = conclude_at(
            &in_phase(Phase::Evacuating),
            Ok(&report(RunResult::TimedOut, 1)),
            false,
            true,
        );
        assert_eq!(released.state.phase, Phase::TimedOut);
        assert_eq!(released.event.1, "EvacuationTimedOut");
        assert!(released.release_guard);
        let error = conclude_at(
            &in_phase(Phase::Evacuating),
            Err("nova-api: HTTP 503".into()),
            false,
            false,
        );
        assert_eq!(error.state.phase, Phase::Failed);
        assert_eq!(error.state.last_error.as_deref(), Some("nova-api: HTTP 503"));
        assert_eq!(error.retry_in, Some(RETRY.first));
    }

    #[test]
    fn failures_in_a_row_double_the_wait_up_to_the_bound_and_success_resets_them() {
        let mut recorded = in_phase(Phase::Evacuating);
        let mut waits = Vec::new();
        for _ in 0..7 {
            let failed = conclude_at(&recorded, Ok(&report(RunResult::Failed, 1)), false, false);
            waits.push(failed.retry_in.map(|d| d.as_secs()));
            recorded = failed.state;
        }
        let secs = |s: &[u64]| s.iter().map(|s| Some(*s)).collect::<Vec<_>>();
        assert_eq!(waits, secs(&[60, 120, 240, 480, 960, 960, 960]));
        assert_eq!(recorded.failures, 7);
        assert_eq!(recorded.next_retry_at.as_deref(), Some("1970-01-01T00:16:00Z"));
        let done = conclude_at(&recorded, Ok(&report(RunResult::Succeeded, 0)), false, false);
        assert_eq!((done.state.failures, done.state.next_retry_at), (0, None));
        assert_eq!(RETRY.after(u32::MAX), RETRY.max, "no overflow");
        let tight = RetryBackoff {
            first: Duration::from_secs(300),
            max: Duration::from_secs(60),
        };
        assert_eq!(
            tight.after(3),
            tight.first,
            "a bound under the first wait is the first wait"
        );
    }

    #[test]
    fn a_run_cancelled_by_the_uncordon_is_not_a_failure() {
        let cancelled = conclude_at(
            &in_phase(Phase::Evacuating),
            Ok(&report(RunResult::Interrupted, 1)),
            true,
            true,
        );
        assert_eq!(cancelled.state.phase, Phase::Evacuating, "the restore records Idle");
        assert_eq!(cancelled.event.0, Severity::Normal);
        assert_eq!(cancelled.event.1, "EvacuationCancelled");
        assert!(!cancelled.release_guard);
        assert_eq!(cancelled.retry_in, None);
    }

    #[test]
    fn a_guard_is_a_problem_only_after_its_grace() {
        let grace = Duration::from_secs(60);
        let pending = GuardPod::Present {
            held: true,
            running: false,
            waiting: Some("ImagePullBackOff".into()),
            created_at: Some(jiff::Timestamp::UNIX_EPOCH),
        };
        let age = |secs| move |_| Duration::from_secs(secs);
        assert_eq!(guard_problem(Some(&pending), false, None, age(59), grace, "g"), None);
        let problem = guard_problem(Some(&pending), false, None, age(61), grace, "g").unwrap_or_default();
        assert!(
            problem.contains("not Running after 61 s (ImagePullBackOff)"),
            "{problem}"
        );
        assert_eq!(guard_problem(Some(&pending), true, None, age(61), grace, "g"), None);
        let failing = Some((Duration::from_secs(70), "forbidden"));
        assert_eq!(
            guard_problem(None, false, failing, age(0), grace, "g").as_deref(),
            Some("forbidden")
        );
        let running = running_guard();
        assert_eq!(guard_problem(running.as_ref(), false, None, age(600), grace, "g"), None);
    }
}
