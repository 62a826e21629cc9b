//! The evacuation itself: disable the service, move every VM within the
//! configured limits, judge each outcome from Nova's own records, report.
//! The steps around the moves (disable, stop, re-enable, start again) are in
//! `maintenance`; the knobs in `settings`; what is told in `event`.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use futures::future::{BoxFuture, join_all};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::compute::{
    Capacity, ChangeMark, Compute, ComputeError, ComputeResult, ComputeService, Migration, Server, is_ended,
};
use super::error::{EvacuationError, step};
use super::event::{Event, Observer};
use super::maintenance::{NO_MARKER, is_our_reason};
use super::plan::{self, Action, ActionFrom, ActionSource, PlannedVm, VmPolicy};
use super::report::{CapacityCheck, Outcome, Prediction, Report, RunResult, VmReport};
use super::settings::{BudgetAction, Settings, StopRequest, Target};

/// How often in-flight migrations' progress numbers are read.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);
/// The longest between two progress reads of a live migration whose status
/// is read host-wide: a lost migration (no longer in progress, its server
/// still migrating) is noticed this much later at most.
const SLOW_PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// How long an accepted abort may leave the migration running before it is
/// sent again: Nova accepts an abort while the migration is `preparing` but
/// cannot stop it then, and it goes on to run.
const ABORT_AGAIN_AFTER: Duration = Duration::from_secs(5);
/// How long a force-completed migration may take before it is aborted.
const FORCE_COMPLETE_GRACE: Duration = Duration::from_secs(60);
/// After a time-out or cancellation, how long to wait for in-flight
/// migrations to settle (aborts to roll back) before reporting.
const SETTLE_GRACE: Duration = Duration::from_secs(120);
/// How long a server may show `migrating` with no migration in progress
/// before its migration record is read, and how long that record may show an
/// end with the server still `migrating` before the migration is taken as lost.
const ORPHAN_GRACE: Duration = Duration::from_secs(30);
/// A listing younger than this is trusted for a VM's first migration request
/// (saving a read per VM on the way to the first migrations); anything older
/// is read again first. Nova still refuses a request the server's state forbids.
const FRESH_LISTING: Duration = Duration::from_secs(1);
/// Retry delays never grow beyond this.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The servers of a plan that will move (the capacity check's subject).
fn to_move(planned: &[PlannedVm]) -> Vec<&Server> {
    planned
        .iter()
        .filter(|p| matches!(p.action, Action::LiveMigrate | Action::ColdMigrate))
        .map(|p| &p.server)
        .collect()
}

/// Refuses a plan whose VMs do not fit on the other hosts (`None`: no check
/// asked for). With nothing to move, the look-up's own failure does not matter.
fn check_fit(
    planned: &[PlannedVm],
    capacity: Result<Option<Capacity>, EvacuationError>,
) -> Result<(), EvacuationError> {
    let moving = to_move(planned);
    if moving.is_empty() {
        return Ok(());
    }
    let Some(capacity) = capacity? else { return Ok(()) };
    let needs = plan::needs(&moving, &capacity.allocations);
    plan::check_capacity(&needs, &capacity).map_err(EvacuationError::Capacity)
}

/// Runs evacuations of one host against a compute cloud.
pub struct Engine<'a, C: Compute> {
    pub(super) compute: &'a C,
    pub(super) settings: &'a Settings,
    pub(super) observer: &'a dyn Observer,
}

struct Job {
    server: Server,
    action: Action,
    from: ActionFrom,
    attempts: u32,
    first_started: Option<Instant>,
    not_before: Instant,
    /// When `server` was read from Nova, while that reading is fresh enough to act on.
    listed_at: Option<Instant>,
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    Moving,
    ForceCompleting {
        since: Instant,
    },
    /// An abort was accepted at `since`.
    Aborting {
        reason: String,
        since: Instant,
    },
    Confirming,
}

struct Flight {
    job: Job,
    attempt_started: Instant,
    budget: Duration,
    phase: Phase,
    migration_id: Option<String>,
    remaining: Option<u64>,
    last_progress: Instant,
    next_progress_check: Instant,
    over_budget_noted: bool,
    /// An abort or force-complete asked for by a time-out or a cancellation,
    /// tried again at each poll until Nova accepts it.
    requested: Option<(BudgetAction, String)>,
    /// Since when Nova has listed no migration in progress while the server still migrates.
    orphaned_since: Option<Instant>,
    /// Since when its migration record has shown an end while the server
    /// still showed `migrating` (see `ended_without_the_server`).
    ended_record_since: Option<Instant>,
    /// Handed to Nova beyond `max_parallel`, and (as far as we know) still
    /// queued there behind the running ones: its budget has not started.
    waiting_in_nova: bool,
    /// The migration record's status at the last progress read.
    nova_status: Option<String>,
    /// Aborted because Nova started it beyond `max_parallel`: queued again
    /// once stopped, not counted as an attempt.
    withdrawn: bool,
    /// The quickest this run moved a VM with no more RAM, if it moved one:
    /// this migration is not expected to end sooner.
    expected: Option<Duration>,
    /// The earliest Nova can have begun to run it: when it was asked for,
    /// or for one handed ahead, when the migration before it was last seen
    /// still moving (Nova starts the next the moment one ends, before we see it end).
    running_from: Instant,
    /// When its server is next read.
    next_poll: Instant,
    /// When it was seen still moving before the latest look (its server
    /// read, or its record listed unended).
    read_before: Option<Instant>,
    read_last: Option<Instant>,
    /// The host-wide look at changed records listed its record ended (or
    /// one that may be an earlier attempt's): its server is read next.
    record_ended: bool,
}

impl Flight {
    /// What a look at Nova's records of this migration tells: its id and
    /// status, and, while it waits queued, that its clocks have not started.
    fn note_record(&mut self, migration: &Migration, now: Instant) {
        self.migration_id = Some(migration.id.clone());
        if matches!(migration.status.as_str(), "accepted" | "queued") {
            // Not running yet (Nova's own slots are taken): its budget and stall clock have not started.
            self.attempt_started = now;
            self.last_progress = now;
        }
        self.nova_status = Some(migration.status.clone());
    }

    /// Takes in the host-wide look at changed records (newest first). A
    /// record not listed has not changed since the previous look; one that
    /// has not ended is this attempt's (Nova moves a server once at a time).
    fn note_changes(&mut self, changed: &[Migration], now: Instant) {
        if self.job.action != Action::LiveMigrate {
            return;
        }
        let Some(record) = changed
            .iter()
            .find(|m| m.server_id.as_deref() == Some(self.job.server.id.as_str()))
        else {
            return;
        };
        if !record.ended() {
            self.note_record(record, now);
            self.read_before = self.read_last.replace(now);
        } else {
            if self.migration_id.as_deref() == Some(record.id.as_str()) {
                self.nova_status = Some(record.status.clone());
                // What it ended as is known: no progress read is needed to see it.
                self.next_progress_check = self.next_progress_check.min(now);
            }
            self.record_ended = true;
        }
    }

    /// When its live migration is to be judged: the end of its budget, and
    /// the moment it counts as stalled unless it progresses meanwhile.
    fn judgement_moments(&self, stall_after: Option<Duration>) -> impl Iterator<Item = Instant> {
        let judged = self.job.action == Action::LiveMigrate && self.phase == Phase::Moving && !self.waiting_in_nova;
        let stall = stall_after
            .filter(|_| self.remaining.is_some())
            .map(|s| self.last_progress + s);
        [Some(self.attempt_started + self.budget), stall]
            .into_iter()
            .flatten()
            .filter(move |_| judged)
    }

    /// Whether, by this run's quickest comparable move, its live migration
    /// cannot have ended by `now`: only an early failure is to be seen.
    fn quiet(&self, now: Instant) -> bool {
        self.job.action == Action::LiveMigrate
            && self.phase == Phase::Moving
            && self.requested.is_none()
            && self
                .expected
                .is_some_and(|quickest| now < self.running_from + quickest * 3 / 4)
    }

    /// Called as the server is read at `now`: when to read it next. Before
    /// three quarters of the quickest comparable migration of this run there
    /// is nothing to see but an early failure (that one's time counts Nova's
    /// scheduling and our noticing its end, so comparable ones run a little
    /// shorter): read every [`QUIET_POLLS`] poll intervals; from then
    /// until two poll intervals after it, the end is near and the server is
    /// read at half the poll interval, so that its end is seen sooner (only
    /// when it is `alone` in flight: with several, at the poll interval, or
    /// reads would grow with the migrations in flight); otherwise, or once
    /// an abort or force-complete was asked for, at the poll interval.
    fn schedule_next_poll(&mut self, now: Instant, poll_interval: Duration, alone: bool) {
        self.next_poll = match self.expected {
            Some(quickest) if self.job.action == Action::LiveMigrate && self.phase == Phase::Moving => {
                let earliest_end = self.running_from + quickest * 3 / 4;
                if now < earliest_end {
                    // A migration that fails early is still seen soon.
                    earliest_end.min(now + poll_interval * QUIET_POLLS)
                } else if alone && now < self.running_from + quickest + poll_interval * 2 {
                    now + poll_interval / 2
                } else {
                    now + poll_interval
                }
            }
            _ => now + poll_interval,
        };
    }
}

/// Poll intervals between reads of a migration that cannot have ended yet.
const QUIET_POLLS: u32 = 10;

/// How long this run's live migrations took, from running in Nova to seen
/// ended, with the VM's RAM: a VM with more RAM is not expected to move
/// quicker than the quickest with less.
#[derive(Default)]
struct MoveTimes(Vec<(u64, Duration)>);

impl MoveTimes {
    fn record(&mut self, ram_mb: u64, took: Duration) {
        self.0.push((ram_mb, took));
    }

    fn quickest_up_to(&self, ram_mb: u64) -> Option<Duration> {
        self.0
            .iter()
            .filter(|(ram, _)| *ram <= ram_mb)
            .map(|(_, took)| *took)
            .min()
    }
}

/// What the run has learnt about Nova holding migrations queued for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NovaQueue {
    /// Nothing handed ahead yet, or not seen queued yet.
    Unknown,
    /// A migration handed ahead was seen `queued` while `max_parallel` ran:
    /// Nova's own limit holds the rest back.
    Holds,
    /// Nova started a migration handed ahead at once (its
    /// `max_concurrent_live_migrations` is above `max_parallel`): none is
    /// handed ahead for the rest of the run.
    RunsAtOnce,
}

enum Ending {
    TimedOut,
    Stopped(StopRequest),
}

enum Step {
    Continue,
    Done(VmReport),
    Retry(Job, String),
    /// Back to the queue as if never started (a withdrawn migration).
    Requeue(Job),
}

impl<'a, C: Compute> Engine<'a, C> {
    pub fn new(compute: &'a C, settings: &'a Settings, observer: &'a dyn Observer) -> Self {
        Engine {
            compute,
            settings,
            observer,
        }
    }

    /// What an evacuation would do, changing nothing: the plan and the
    /// capacity check's verdict (unless the settings skip it).
    pub async fn preview(&self, target: &Target) -> Result<Report, EvacuationError> {
        let started = Instant::now();
        let (service, destinations) = self.survey(target).await?;
        let (planned, capacity) = tokio::join!(self.plan(target), self.spare_capacity(target, &destinations));
        let planned = planned?;
        let capacity = capacity?.map(|capacity| {
            let needs = plan::needs(&to_move(&planned), &capacity.allocations);
            let unplaced = match plan::check_capacity(&needs, &capacity) {
                Ok(()) => vec![],
                Err(shortfall) => shortfall.unplaced,
            };
            CapacityCheck::new(capacity, needs, unplaced)
        });
        let vms = planned
            .iter()
            .map(|p| {
                let (outcome, reason) = match p.action {
                    Action::Skip => left_as_planned(p),
                    Action::Stop if !self.compute.reads_server_tags() => (Outcome::Failed, Some(NO_MARKER.into())),
                    _ => (Outcome::Planned, None),
                };
                planned_report(p, &target.host, outcome, reason)
            })
            .collect();
        let vms = self.name_projects(vms, HashMap::new()).await;
        let prediction = Prediction::new(service.enabled, self.settings.disable_first, &vms, capacity.as_ref());
        Ok(Report {
            node: target.node.clone(),
            host: target.host.clone(),
            result: RunResult::Planned,
            service_disabled_by_us: is_our_reason(service.disabled_reason.as_deref()),
            service_disabled_reason: service.disabled_reason.clone().filter(|_| !service.enabled),
            duration_seconds: started.elapsed().as_secs_f64(),
            servers_left_on_host: planned.len(),
            vms,
            capacity,
            prediction: Some(prediction),
            warnings: self.tag_warnings(),
        })
    }

    /// Disables the host's service and moves every VM off it, within the settings' limits.
    pub async fn evacuate(
        &self,
        target: &Target,
        mut stop: watch::Receiver<StopRequest>,
    ) -> Result<Report, EvacuationError> {
        let started = Instant::now();
        let (service, destinations) = self.survey(target).await?;

        // Independent look-ups run side by side: they sit between the decision and the first migration.
        let listed_at;
        let mut relisting: Option<BoxFuture<'_, Result<Vec<PlannedVm>, EvacuationError>>> = None;
        let ((by_us, reason), planned) = if self.settings.disable_first {
            // Listed after the disable, so no VM can land unseen: one listing serves both.
            let disabled = self.disable(target, &service).await?;
            listed_at = Instant::now();
            let (planned, capacity) = tokio::join!(self.plan(target), self.spare_capacity(target, &destinations));
            let planned = planned?;
            check_fit(&planned, capacity)?;
            (disabled, planned)
        } else if self.settings.check_capacity {
            let (planned, capacity) = tokio::join!(self.plan(target), self.spare_capacity(target, &destinations));
            let planned = planned?;
            check_fit(&planned, capacity)?;
            listed_at = Instant::now();
            let disabled = self.disable(target, &service).await?;
            // VMs may have landed between the check and the disable: the host
            // is listed again while the checked ones already move.
            relisting = Some(Box::pin(self.plan(target)));
            (disabled, planned)
        } else {
            let disabled = self.disable(target, &service).await?;
            listed_at = Instant::now();
            (disabled, self.plan(target).await?)
        };

        // The projects are named while the VMs move, so that a report cut
        // short (Ctrl-C returns at once) names them too.
        let project_ids = planned.iter().map(|p| p.server.project_id.clone()).collect();
        let warnings = self.tag_warnings();
        let deadline = self.settings.timeout.map(|t| started + t);
        let (planned, stopped) = self.stop_planned(target, planned, deadline, &stop).await;
        let relisting = relisting.map(|listing| without(listing, &stopped));
        let mut naming = std::pin::pin!(self.project_names(project_ids));
        let mut moving = std::pin::pin!(self.move_all(target, planned, listed_at, relisting, started, &mut stop));
        let mut names = None;
        let (moved, ending) = loop {
            tokio::select! {
                moved = &mut moving => break moved,
                found = &mut naming, if names.is_none() => names = Some(found),
            }
        };
        let vms: Vec<VmReport> = stopped.into_iter().chain(moved).collect();

        // Housekeeping kept off the way to the first migration; not when asked to return at once.
        let leave_at_once = matches!(ending, Some(Ending::Stopped(StopRequest::LeaveInFlight)));
        let (left, (), vms) = tokio::join!(
            self.compute.servers_on_host(&target.host),
            async {
                if !leave_at_once {
                    self.confirm_leftover_cold_migrations(&target.host).await;
                }
            },
            async {
                let names = match names {
                    Some(names) => names,
                    // Not waited for when asked to return at once.
                    None if leave_at_once => HashMap::new(),
                    None => naming.await,
                };
                if leave_at_once {
                    name(vms, &names)
                } else {
                    // VMs a second listing found may belong to other projects.
                    self.name_projects(vms, names).await
                }
            }
        );
        let (left, result) = verdict(left, &vms, ending.as_ref());
        Ok(Report {
            node: target.node.clone(),
            host: target.host.clone(),
            result,
            service_disabled_by_us: by_us,
            service_disabled_reason: Some(reason).filter(|r| !r.is_empty()),
            duration_seconds: started.elapsed().as_secs_f64(),
            servers_left_on_host: left,
            vms,
            capacity: None,
            prediction: None,
            warnings,
        })
    }

    /// The report's VMs with their projects' names, `known` already (a
    /// `None`: Keystone was asked and did not name it), the others looked up.
    async fn name_projects(&self, vms: Vec<VmReport>, mut known: ProjectNames) -> Vec<VmReport> {
        let unknown = vms
            .iter()
            .filter(|vm| !known.contains_key(&vm.project_id))
            .map(|vm| vm.project_id.clone())
            .collect();
        known.extend(self.project_names(unknown).await);
        name(vms, &known)
    }

    /// The names of these projects: one Keystone look-up per project, side
    /// by side. Best effort: a project Keystone does not name (deleted, or
    /// the account may not read it) maps to `None`, and the report keeps its id.
    async fn project_names(&self, mut ids: Vec<String>) -> ProjectNames {
        ids.sort_unstable();
        ids.dedup();
        join_all(ids.into_iter().map(|id| async move {
            match self.compute.project_name(&id).await {
                Ok(name) => (id, Some(name)),
                Err(e) => {
                    debug!(project = id, error = %e, "no project name");
                    (id, None)
                }
            }
        }))
        .await
        .into_iter()
        .collect()
    }

    /// Every server on the host now, with its action, in the order they will move.
    async fn plan(&self, target: &Target) -> Result<Vec<PlannedVm>, EvacuationError> {
        let servers = self
            .compute
            .servers_on_host(&target.host)
            .await
            .map_err(step("listing servers"))?;
        Ok(plan::plan(
            servers,
            &self.settings.state_policy,
            self.settings.node_default,
        ))
    }

    /// The host's own service and the hosts its VMs may go to (enabled and up), in one look-up.
    async fn survey(&self, target: &Target) -> Result<(ComputeService, Vec<String>), EvacuationError> {
        let services = self
            .compute
            .compute_services()
            .await
            .map_err(step("looking up the nova-compute services"))?;
        let destinations = services
            .iter()
            .filter(|s| s.enabled && s.up && s.host != target.host)
            .map(|s| s.host.clone())
            .collect();
        // Exact host match: never a substring or case-folded one.
        let service =
            services
                .into_iter()
                .find(|s| s.host == target.host)
                .ok_or_else(|| EvacuationError::ServiceNotFound {
                    node: target.node.clone(),
                    host: target.host.clone(),
                })?;
        Ok((service, destinations))
    }

    pub(super) async fn service(&self, target: &Target) -> Result<ComputeService, EvacuationError> {
        self.compute
            .find_service(&target.host)
            .await
            .map_err(step("looking up the nova-compute service"))?
            .ok_or_else(|| EvacuationError::ServiceNotFound {
                node: target.node.clone(),
                host: target.host.clone(),
            })
    }

    /// The other hosts' free resources and what the VMs hold on the drained
    /// one, when the settings ask for a capacity check.
    async fn spare_capacity(
        &self,
        target: &Target,
        destinations: &[String],
    ) -> Result<Option<Capacity>, EvacuationError> {
        if !self.settings.check_capacity {
            return Ok(None);
        }
        self.compute
            .spare_capacity(&target.host, destinations)
            .await
            .map(Some)
            .map_err(step("checking the other hypervisors' capacity"))
    }

    /// What the run cannot do as asked, said once: below compute API 2.26
    /// no server shows its tags, so the VMs are planned without them.
    fn tag_warnings(&self) -> Vec<String> {
        if self.compute.reads_server_tags() {
            return Vec::new();
        }
        let warning = "the compute API version in use is below 2.26, which shows no server tags: nova-drain: tags \
                       are not read, the VMs are planned by the node's default and the state policy, and none is \
                       stopped (stopping needs our marker tag)";
        warn!("{warning}");
        vec![warning.to_string()]
    }

    /// A cold migration whose confirmation an earlier, interrupted run never sent.
    async fn confirm_leftover_cold_migrations(&self, host: &str) {
        let ids = match self.compute.unconfirmed_migrations_from(host).await {
            Ok(ids) => ids,
            Err(e) => {
                warn!(error = %e, "could not look for unconfirmed cold migrations");
                return;
            }
        };
        for id in ids {
            match self.compute.confirm_resize(&id).await {
                Ok(()) => info!(server = %id, "confirmed a cold migration left unconfirmed"),
                Err(e) => warn!(server = %id, error = %e, "could not confirm a finished cold migration"),
            }
        }
    }

    /// Moves the planned VMs; `relisting`, when given, lists the host again
    /// meanwhile, and the VMs only it finds are moved too.
    async fn move_all(
        &self,
        target: &Target,
        planned: Vec<PlannedVm>,
        listed_at: Instant,
        mut relisting: Option<BoxFuture<'_, Result<Vec<PlannedVm>, EvacuationError>>>,
        started: Instant,
        stop: &mut watch::Receiver<StopRequest>,
    ) -> (Vec<VmReport>, Option<Ending>) {
        let now = Instant::now();
        let mut reports = Vec::new();
        let mut queue = VecDeque::new();
        let mut total = self.admit(target, planned, listed_at, &mut queue, &mut reports);
        self.observer.event(&Event::EvacuationStarted {
            to_move: total,
            to_skip: reports.len(),
        });

        let deadline = self.settings.timeout.map(|t| started + t);
        let max_running = self.settings.max_parallel.max(1);
        let mut queue_ahead = if self.compute.aborts_queued_migrations() {
            self.settings.queue_ahead
        } else {
            0
        };
        let mut nova_queue = NovaQueue::Unknown;
        let mut move_times = MoveTimes::default();
        let mut flights: Vec<Flight> = Vec::new();
        let mut change_mark: Option<ChangeMark> = None;
        let mut ending: Option<Ending> = None;
        let mut ending_since = now;
        loop {
            if ending.is_none() {
                let request = *stop.borrow();
                if request != StopRequest::Continue {
                    ending = Some(Ending::Stopped(request));
                } else if deadline.is_some_and(|d| Instant::now() >= d) {
                    ending = Some(Ending::TimedOut);
                }
                if let Some(end) = &ending {
                    ending_since = Instant::now();
                    let (what, reason) = match end {
                        Ending::TimedOut => (
                            Some(self.settings.on_budget_exceeded),
                            format!(
                                "the overall time-out of {} s ran out",
                                self.settings.timeout.unwrap_or_default().as_secs()
                            ),
                        ),
                        Ending::Stopped(StopRequest::AbortInFlight) => {
                            (Some(BudgetAction::Abort), "the evacuation was cancelled".to_string())
                        }
                        Ending::Stopped(_) => (None, String::new()),
                    };
                    if let Some(what) = what {
                        for flight in flights.iter_mut().filter(|f| f.phase == Phase::Moving) {
                            flight.requested = Some((what, reason.clone()));
                            self.intervene(flight, what, &reason).await;
                        }
                    }
                }
            }
            if matches!(ending, Some(Ending::Stopped(StopRequest::LeaveInFlight))) {
                break;
            }

            // Fill the free slots, side by side; a VM that needs no move frees its slot for the next.
            while ending.is_none() {
                let now = Instant::now();
                let mut ready = Vec::new();
                while flights.len() + ready.len() < max_running + queue_ahead {
                    // Beyond max_parallel only live migrations: Nova queues those per host.
                    let ahead = flights.len() + ready.len() >= max_running;
                    let Some(position) = queue
                        .iter()
                        .position(|job| job.not_before <= now && (!ahead || job.action == Action::LiveMigrate))
                    else {
                        break;
                    };
                    ready.extend(queue.remove(position).map(|job| (job, ahead)));
                }
                if ready.is_empty() {
                    break;
                }
                let starts = join_all(ready.into_iter().map(|(job, ahead)| self.start(target, job, ahead))).await;
                for start in starts {
                    match start {
                        Start::Flying(mut flight) => {
                            flight.expected = move_times.quickest_up_to(flight.job.server.flavor.ram_mb);
                            flight.schedule_next_poll(Instant::now(), self.settings.poll_interval, true);
                            flights.push(*flight);
                        }
                        Start::Done(report) => reports.push(report),
                        Start::Later(job) => queue.push_back(job),
                        Start::Failed(job, reason) => self.retry_or_fail(target, job, reason, &mut queue, &mut reports),
                    }
                }
            }
            if flights.is_empty() && (ending.is_some() || (queue.is_empty() && relisting.is_none())) {
                break;
            }
            if ending.is_some() && ending_since.elapsed() >= SETTLE_GRACE {
                break;
            }
            self.observer.event(&progress(total, &reports, &flights));

            let next_poll = flights.iter().filter(|f| !f.waiting_in_nova).map(|f| f.next_poll).min();
            if let Some(listed) = self.pause(stop, next_poll, &mut relisting).await {
                relisting = None;
                match listed {
                    Ok(planned) => total += self.admit_newcomers(target, planned, &flights, &mut queue, &mut reports),
                    Err(e) => {
                        warn!(error = %e, "could not list the host again after disabling it; what is left is counted at the end")
                    }
                }
                continue;
            }

            let learning = queue_ahead > 0 && nova_queue == NovaQueue::Unknown;
            let changed = self.read_changes(target, &flights, learning, &mut change_mark).await;
            if let Some(changed) = &changed {
                let now = Instant::now();
                for flight in &mut flights {
                    flight.note_changes(changed, now);
                }
            }
            let batched = changed.is_some();
            let alone = flights.iter().filter(|f| !f.waiting_in_nova).count() <= 1;
            let tick_started = Instant::now();
            let judgement = flights
                .iter()
                .flat_map(|f| f.judgement_moments(self.settings.stall_after))
                .filter(|at| *at > tick_started)
                .min();
            let polls = join_all(
                flights
                    .iter_mut()
                    .map(|flight| self.poll(target, flight, batched, alone)),
            );
            // A read stuck in Nova (30 s x 3 tries) must not hold back a stop,
            // the time-out or another flight's budget or stall check: the
            // polls are dropped (each leaves its flight as a failed read
            // would) and the next tick acts at once.
            let steps = tokio::select! {
                steps = polls => Some(steps),
                Ok(()) = stop.changed() => continue,
                () = sleep_until_some(deadline), if ending.is_none() => continue,
                () = sleep_until_some(judgement) => None,
            };
            let Some(steps) = steps else {
                // The flights whose moment came are read at the next tick, due or not.
                let now = Instant::now();
                for flight in &mut flights {
                    if flight
                        .judgement_moments(self.settings.stall_after)
                        .any(|at| tick_started < at && at <= now)
                    {
                        flight.next_poll = flight.next_poll.min(now);
                    }
                }
                continue;
            };
            let mut still = Vec::with_capacity(flights.len());
            // Nova starts what it holds queued once a running migration ends:
            // not before the ended ones were last seen still moving.
            let mut slot_freed_after: Option<Instant> = None;
            for (flight, step) in flights.into_iter().zip(steps) {
                if !matches!(step, Step::Continue) && !flight.waiting_in_nova {
                    let seen_moving = flight.read_before.unwrap_or(flight.running_from);
                    slot_freed_after = Some(slot_freed_after.map_or(seen_moving, |t| t.min(seen_moving)));
                }
                match step {
                    Step::Continue => still.push(flight),
                    Step::Done(report) => {
                        if report.outcome == Outcome::Migrated && flight.job.action == Action::LiveMigrate {
                            move_times.record(flight.job.server.flavor.ram_mb, flight.running_from.elapsed());
                        }
                        reports.push(report);
                    }
                    Step::Retry(job, reason) => self.retry_or_fail(target, job, reason, &mut queue, &mut reports),
                    Step::Requeue(job) => queue.push_front(job),
                }
            }
            flights = still;
            self.start_waiting(&mut flights, max_running, &move_times, slot_freed_after);
            if queue_ahead > 0 && nova_queue == NovaQueue::Unknown {
                nova_queue = self.learn_nova_queue(&mut flights, max_running, batched).await;
                if nova_queue == NovaQueue::RunsAtOnce {
                    queue_ahead = 0;
                }
            }
        }

        let reason_left = match ending {
            Some(Ending::TimedOut) => "the overall time-out ran out",
            Some(Ending::Stopped(_)) => "the evacuation was stopped",
            None => "the evacuation ended",
        };
        for flight in flights {
            let job = flight.job;
            let reason = format!("{reason_left} while it was migrating; Nova goes on with it");
            reports.push(self.job_report(target, &job, Outcome::InProgress, Some(reason), None));
        }
        for job in queue {
            let outcome = if job.attempts == 0 {
                Outcome::NotStarted
            } else {
                Outcome::Failed
            };
            reports.push(self.job_report(
                target,
                &job,
                outcome,
                Some(format!("{reason_left} before it was moved")),
                None,
            ));
        }
        self.observer.event(&progress(total, &reports, &[]));
        (reports, ending)
    }

    /// Waits until the next flight is due (at most one poll interval), or
    /// less if a stop is requested or the listing in the background ends
    /// meanwhile; returns that listing when it ended.
    async fn pause(
        &self,
        stop: &mut watch::Receiver<StopRequest>,
        next_poll: Option<Instant>,
        relisting: &mut Option<BoxFuture<'_, Result<Vec<PlannedVm>, EvacuationError>>>,
    ) -> Option<Result<Vec<PlannedVm>, EvacuationError>> {
        let interval = self.settings.poll_interval;
        let until_due = next_poll.map_or(interval, |due| due.saturating_duration_since(Instant::now()));
        let listing = async {
            match relisting.as_mut() {
                Some(listing) => listing.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(until_due.min(interval)) => None,
            changed = stop.changed() => {
                if changed.is_err() {
                    // Nobody can ask us to stop any more: just wait.
                    tokio::time::sleep(interval).await;
                }
                None
            }
            listed = listing => Some(listed),
        }
    }

    /// Queues the planned VMs to move and reports those the policy leaves;
    /// returns how many were queued.
    fn admit(
        &self,
        target: &Target,
        planned: Vec<PlannedVm>,
        listed_at: Instant,
        queue: &mut VecDeque<Job>,
        reports: &mut Vec<VmReport>,
    ) -> usize {
        let mut queued = 0;
        for planned in planned {
            match planned.action {
                Action::LiveMigrate | Action::ColdMigrate => {
                    queued += 1;
                    queue.push_back(Job {
                        server: planned.server,
                        action: planned.action,
                        from: planned.from,
                        attempts: 0,
                        first_started: None,
                        not_before: listed_at,
                        listed_at: Some(listed_at),
                    });
                }
                Action::Stop => {
                    // Only a VM found by the second listing: the stops are over by then.
                    let why = "landed on the host after the VMs to stop were stopped; a new run stops it";
                    reports.push(planned_report(
                        &planned,
                        &target.host,
                        Outcome::Failed,
                        Some(why.into()),
                    ));
                }
                Action::Skip => {
                    let (outcome, reason) = left_as_planned(&planned);
                    let reason = reason.unwrap_or_default();
                    if outcome == Outcome::Left {
                        info!(server = %planned.server.id, %reason, "left on the host as asked");
                    } else {
                        self.observer.event(&Event::NotMigratable {
                            server: &planned.server,
                            reason: &reason,
                        });
                    }
                    reports.push(planned_report(&planned, &target.host, outcome, Some(reason)));
                }
            }
        }
        queued
    }

    /// Admits from a second listing the VMs the run does not know yet (queued,
    /// in flight or reported); returns how many were queued.
    fn admit_newcomers(
        &self,
        target: &Target,
        listed: Vec<PlannedVm>,
        flights: &[Flight],
        queue: &mut VecDeque<Job>,
        reports: &mut Vec<VmReport>,
    ) -> usize {
        let known: std::collections::HashSet<&str> = queue
            .iter()
            .map(|job| job.server.id.as_str())
            .chain(flights.iter().map(|f| f.job.server.id.as_str()))
            .chain(reports.iter().map(|r| r.id.as_str()))
            .collect();
        let newcomers: Vec<PlannedVm> = listed
            .into_iter()
            .filter(|p| !known.contains(p.server.id.as_str()))
            .collect();
        if newcomers.is_empty() {
            return 0;
        }
        info!(
            count = newcomers.len(),
            "VMs landed on the host before it was disabled; moving them too"
        );
        self.admit(target, newcomers, Instant::now(), queue, reports)
    }

    /// Starts (or follows) one VM's migration; `ahead` when it is handed to
    /// Nova beyond `max_parallel`, to wait queued there.
    async fn start(&self, target: &Target, mut job: Job, ahead: bool) -> Start {
        let now = Instant::now();
        let fresh = job.listed_at.take().is_some_and(|t| now - t < FRESH_LISTING);
        let current = if fresh {
            job.server.clone()
        } else {
            match self.compute.server(&job.server.id).await {
                Ok(Some(server)) => server,
                Ok(None) => return Start::Done(self.job_report(target, &job, Outcome::Deleted, None, None)),
                Err(e) => {
                    warn!(server = %job.server.id, error = %e, "could not read the server; will try again");
                    job.not_before = now + self.settings.poll_interval.max(Duration::from_secs(1));
                    return Start::Later(job);
                }
            }
        };
        let moving_task = match current.task_state.as_deref() {
            Some("migrating") => Some(Action::LiveMigrate),
            Some(task) if task.starts_with("resize") => Some(Action::ColdMigrate),
            _ => None,
        };
        if current.host.as_deref() != Some(target.host.as_str()) && current.task_state.is_none() {
            let destination = current.host.clone();
            return Start::Done(self.job_report(target, &job, Outcome::Migrated, None, destination));
        }
        job.first_started.get_or_insert(now);
        if let Some(action) = moving_task {
            // Already migrating (an earlier run of ours, or an operator): follow it, never start a second one.
            info!(server = %job.server.id, "following a migration already in progress");
            job.action = action;
            job.attempts += 1;
            return Start::Flying(Box::new(self.flight(job, now, false)));
        }
        if current.status == "ERROR" {
            return Start::Done(self.job_report(
                target,
                &job,
                Outcome::Failed,
                Some("the VM is in ERROR".into()),
                None,
            ));
        }
        if current.task_state.is_some() {
            // Rebooting, pausing...: wait for Nova to finish that first.
            job.not_before = now + self.settings.poll_interval;
            return Start::Later(job);
        }
        if !job.action.allowed_for(&current.status)
            && let Some(report) = self.replan(target, &mut job, &current)
        {
            return Start::Done(report);
        }
        if ahead && job.action != Action::LiveMigrate {
            // Now a cold migration: Nova would run it at once, so it waits for a slot of its own.
            job.not_before = now + self.settings.poll_interval;
            return Start::Later(job);
        }
        job.server.status = current.status.clone();
        job.attempts += 1;
        let request = match job.action {
            Action::LiveMigrate => self.compute.live_migrate(&job.server.id).await,
            _ => self.compute.cold_migrate(&job.server.id).await,
        };
        match request {
            Ok(()) => {
                self.observer.event(&Event::MigrationStarted {
                    server: &job.server,
                    action: job.action,
                    attempt: job.attempts,
                });
                Start::Flying(Box::new(self.flight(job, now, ahead)))
            }
            Err(ComputeError::Other(message)) => {
                // The request may or may not have reached Nova; the next start looks at the server first.
                job.attempts -= 1;
                warn!(server = %job.server.id, error = %message, "migration request failed; will look again");
                job.not_before = now + self.settings.poll_interval.max(Duration::from_secs(1));
                Start::Later(job)
            }
            Err(ComputeError::Conflict(message)) if fresh => {
                // The server changed since the listing (someone else is moving or rebooting it): not a failed
                // attempt of ours; look at it now.
                job.attempts -= 1;
                debug!(server = %job.server.id, error = %message, "the listing was out of date; looking again");
                Start::Later(job)
            }
            Err(e) => Start::Failed(job, format!("Nova refused the migration: {e}")),
        }
    }

    /// A VM whose state changed since it was planned, so that Nova cannot
    /// take its action now: a tag's action is reported failed (the owner's
    /// word is followed or reported, never replaced); otherwise the state
    /// policy decides again. `Some` when the VM is done with.
    fn replan(&self, target: &Target, job: &mut Job, current: &Server) -> Option<VmReport> {
        if let Some(tag) = job.from.tag.clone().filter(|_| job.from.source == ActionSource::Tag) {
            let why = format!(
                "tag {tag}: Nova cannot {} a {} server",
                job.action.as_str(),
                current.status
            );
            return Some(self.job_report(target, job, Outcome::Failed, Some(why), None));
        }
        job.from = ActionFrom::default();
        job.action = self.settings.state_policy.action_for(&current.status);
        if job.action == Action::Skip {
            let reason = skip_reason(current);
            return Some(self.job_report(target, job, Outcome::Skipped, Some(reason), None));
        }
        None
    }

    fn flight(&self, job: Job, now: Instant, waiting_in_nova: bool) -> Flight {
        let budget = self.settings.budget.for_ram(job.server.flavor.ram_mb);
        Flight {
            job,
            attempt_started: now,
            budget,
            phase: Phase::Moving,
            migration_id: None,
            remaining: None,
            last_progress: now,
            next_progress_check: now + PROGRESS_INTERVAL,
            over_budget_noted: false,
            requested: None,
            orphaned_since: None,
            ended_record_since: None,
            waiting_in_nova,
            nova_status: None,
            withdrawn: false,
            expected: None,
            running_from: now,
            next_poll: now,
            read_before: None,
            read_last: None,
            record_ended: false,
        }
    }

    /// A running migration ended: Nova starts the oldest it holds queued in
    /// the freed slot, so its budget starts now.
    fn start_waiting(
        &self,
        flights: &mut [Flight],
        max_running: usize,
        move_times: &MoveTimes,
        slot_freed_after: Option<Instant>,
    ) {
        let now = Instant::now();
        let free = max_running.saturating_sub(flights.iter().filter(|f| !f.waiting_in_nova).count());
        // Oldest first: flights are kept in the order they started.
        for flight in flights.iter_mut().filter(|f| f.waiting_in_nova).take(free) {
            flight.waiting_in_nova = false;
            flight.attempt_started = now;
            flight.last_progress = now;
            flight.next_progress_check = now + PROGRESS_INTERVAL;
            flight.running_from = slot_freed_after.unwrap_or(now);
            flight.expected = move_times.quickest_up_to(flight.job.server.flavor.ram_mb);
            flight.schedule_next_poll(now, self.settings.poll_interval, true);
        }
    }

    /// Whether Nova holds the migrations handed ahead queued, from the
    /// statuses last read. More started in Nova than `max_parallel` means
    /// Nova's own limit is higher: the newest is withdrawn at once (aborted,
    /// queued again) and none is handed ahead any more, so `max_parallel`
    /// bounds what runs. Nova may also start the one handed ahead before the
    /// other: then that one is the one waiting.
    async fn learn_nova_queue(&self, flights: &mut [Flight], max_running: usize, batched: bool) -> NovaQueue {
        // Fresh statuses: one host-wide look gives them all at one moment.
        // Else read one by one, those handed ahead first: Nova starts a
        // queued migration only once the running one has ended (and left
        // its in-progress list), so one read running after another was read
        // started really ran beside it, and a migration that ended between
        // two reads is never counted twice.
        if !batched {
            let now = Instant::now();
            for flight in flights
                .iter_mut()
                .filter(|f| f.waiting_in_nova && f.phase == Phase::Moving)
            {
                self.read_progress(flight, now).await;
            }
            for flight in flights
                .iter_mut()
                .filter(|f| !f.waiting_in_nova && f.phase == Phase::Moving)
            {
                self.read_progress(flight, now).await;
            }
        }
        fn started(flight: &Flight) -> bool {
            matches!(
                flight.nova_status.as_deref(),
                Some("preparing" | "running" | "post-migrating")
            )
        }
        let in_nova = flights.iter().filter(|f| started(f)).count();
        if in_nova > max_running {
            if let Some(flight) = flights.iter_mut().rev().find(|f| started(f)) {
                warn!(
                    server = %flight.job.server.id,
                    max_parallel = max_running,
                    "Nova runs more migrations than max_parallel (its max_concurrent_live_migrations is \
                     higher): withdrawing the newest, handing none ahead any more"
                );
                flight.waiting_in_nova = false;
                flight.withdrawn = true;
                let reason = format!("Nova ran it beside {max_running} other(s); it is moved again later");
                flight.requested = Some((BudgetAction::Abort, reason.clone()));
                self.intervene(flight, BudgetAction::Abort, &reason).await;
            }
            return NovaQueue::RunsAtOnce;
        }
        for i in 0..flights.len() {
            if flights[i].waiting_in_nova
                && started(&flights[i])
                && let Some(j) = flights
                    .iter()
                    .position(|f| !f.waiting_in_nova && f.nova_status.as_deref() == Some("queued"))
            {
                flights[i].waiting_in_nova = false;
                flights[j].waiting_in_nova = true;
            }
        }
        if flights.iter().any(|f| f.nova_status.as_deref() == Some("queued")) {
            NovaQueue::Holds
        } else {
            NovaQueue::Unknown
        }
    }

    /// One look at every live migration from the host whose record changed
    /// since the previous look, when it saves reads: while Nova's queueing is
    /// being learnt (instead of a progress read of every flight), or when a
    /// flight that cannot have ended yet is due a read and another is
    /// followed. Not for a migration near its expected end: Nova marks its
    /// record `completed` only after its post-migration bookkeeping on the
    /// source (a resource audit, 0.5-2 s on the lab), while the server has
    /// already settled on the destination; that end is seen sooner by
    /// reading the server. `None`: each flight is read on its own this tick.
    async fn read_changes(
        &self,
        target: &Target,
        flights: &[Flight],
        learning_queue: bool,
        mark: &mut Option<ChangeMark>,
    ) -> Option<Vec<Migration>> {
        if !self.compute.lists_migration_changes() {
            return None;
        }
        let now = Instant::now();
        let followed: Vec<&Flight> = flights.iter().filter(|f| !f.waiting_in_nova).collect();
        let quiet_due = followed.iter().any(|f| f.quiet(now) && now >= f.next_poll);
        let any_due = followed.iter().any(|f| now >= f.next_poll || f.requested.is_some());
        let look = (learning_queue && flights.len() >= 2 && any_due) || (quiet_due && followed.len() >= 2);
        if !look {
            return None;
        }
        match self.compute.live_migrations_changed(&target.host, *mark).await {
            Ok(changes) => {
                *mark = Some(changes.next);
                Some(changes.migrations)
            }
            Err(e) => {
                debug!(error = %e, "could not list changed migrations; reading each server");
                None
            }
        }
    }

    /// How often a live migration's progress numbers are read: every
    /// [`PROGRESS_INTERVAL`] while they serve a stall check, or while an
    /// abort or force-complete is seen through. Where the cloud offers the
    /// host-wide look at changed records (2.59+) and nothing checks for
    /// stalls, the status needs no read of its own; the read serves only to
    /// notice a migration lost (no longer in progress, its server still
    /// migrating).
    fn progress_every(&self, flight: &Flight) -> Duration {
        if self.compute.lists_migration_changes()
            && self.settings.stall_after.is_none()
            && flight.phase == Phase::Moving
        {
            SLOW_PROGRESS_INTERVAL
        } else {
            PROGRESS_INTERVAL
        }
    }

    /// Follows one flight; `batched` when this tick's host-wide look at
    /// changed records covers it: one that cannot have ended yet is then read
    /// only when its record shows an end, or was not listed for
    /// [`QUIET_POLLS`] poll intervals. `alone`: no other migration is followed.
    async fn poll(&self, target: &Target, flight: &mut Flight, batched: bool, alone: bool) -> Step {
        if flight.waiting_in_nova && flight.requested.is_none() {
            // Queued behind the running ones: nothing to watch until a slot
            // frees (until Nova has shown that it queues, `learn_nova_queue`
            // reads its status).
            return Step::Continue;
        }
        let now = Instant::now();
        let seen = flight.read_last.unwrap_or(flight.running_from);
        if batched
            && flight.quiet(now)
            && !flight.record_ended
            && now - seen < self.settings.poll_interval * QUIET_POLLS
        {
            // Still moving, or unchanged since the last look: only the budget and stall checks.
            flight.schedule_next_poll(now, self.settings.poll_interval, alone);
            if let Some(reason) = self.watch_live(flight).await {
                return Step::Done(self.finish(target, flight, Outcome::Failed, Some(reason), None));
            }
            return Step::Continue;
        }
        if flight.requested.is_none() && !flight.record_ended && now < flight.next_poll {
            return Step::Continue;
        }
        flight.record_ended = false;
        flight.schedule_next_poll(now, self.settings.poll_interval, alone);
        flight.read_before = flight.read_last.replace(now);

        let id = flight.job.server.id.clone();
        let server = match self.compute.server(&id).await {
            Ok(Some(server)) => server,
            Ok(None) => return Step::Done(self.finish(target, flight, Outcome::Deleted, None, None)),
            Err(e) => {
                debug!(server = %id, error = %e, "could not read the server; looking again next time");
                return Step::Continue;
            }
        };
        if server.status == "ERROR" {
            return self.errored_while_migrating(target, flight, &server).await;
        }
        let on_source = server.host.as_deref() == Some(target.host.as_str());
        match flight.job.action {
            // A stop never flies; a skipped VM neither.
            Action::LiveMigrate | Action::Stop | Action::Skip => {
                if server.task_state.is_none() {
                    if !on_source {
                        return Step::Done(self.finish(target, flight, Outcome::Migrated, None, server.host));
                    }
                    return self.ended_on_source(target, flight, "live-migration").await;
                }
                if let Some(reason) = self.watch_live(flight).await {
                    return Step::Done(self.finish(target, flight, Outcome::Failed, Some(reason), None));
                }
                Step::Continue
            }
            Action::ColdMigrate => {
                if server.status == "VERIFY_RESIZE" {
                    if flight.phase != Phase::Confirming {
                        match self.compute.confirm_resize(&id).await {
                            Ok(()) => flight.phase = Phase::Confirming,
                            Err(e) => debug!(server = %id, error = %e, "confirming the cold migration; will retry"),
                        }
                    }
                    return Step::Continue;
                }
                if server.task_state.is_none() {
                    if !on_source {
                        return Step::Done(self.finish(target, flight, Outcome::Migrated, None, server.host));
                    }
                    return self.ended_on_source(target, flight, "migration").await;
                }
                if !flight.over_budget_noted && flight.attempt_started.elapsed() > flight.budget {
                    flight.over_budget_noted = true;
                    warn!(server = %id, budget_s = flight.budget.as_secs(), "cold migration runs past its budget; Nova cannot abort it");
                }
                Step::Continue
            }
        }
    }

    /// Nova put the server in ERROR during our migration. Its conductor does
    /// so when a step fails unexpectedly before any hypervisor took part (seen
    /// when RabbitMQ restarts and the scheduler's reply is lost: the call times
    /// out after a minute): the guest still runs untouched on the source, and
    /// an operator would reset the state and try again. Only in exactly that
    /// case is it set back to ACTIVE and tried again; in any other, the VM is
    /// left to an operator.
    async fn errored_while_migrating(&self, target: &Target, flight: &mut Flight, server: &Server) -> Step {
        let id = &flight.job.server.id;
        let untouched_so_far = flight.job.action == Action::LiveMigrate
            && flight.job.server.status == "ACTIVE"
            && server.running
            && server.task_state.is_none()
            && server.host.as_deref() == Some(target.host.as_str());
        let mut reason = "the VM went to ERROR while migrating; an operator must look at it".to_string();
        if untouched_so_far {
            match self.compute.failed_before_any_hypervisor(id).await {
                Ok(false) => {}
                Ok(true) => match self.compute.reset_to_active(id).await {
                    Ok(()) => {
                        warn!(
                            server = %id,
                            "Nova put the VM in ERROR when its live migration failed before reaching any hypervisor; \
                             it runs untouched on {}: set back to ACTIVE",
                            target.host
                        );
                        return self.ended_on_source(target, flight, "live-migration").await;
                    }
                    Err(e) => {
                        reason = format!(
                            "Nova put the VM in ERROR before its live migration reached any hypervisor, and \
                             setting it back to ACTIVE failed ({e}); it runs on {}",
                            target.host
                        );
                    }
                },
                Err(e) => {
                    debug!(server = %id, error = %e, "could not read the server's actions; looking again next time");
                    return Step::Continue;
                }
            }
        }
        Step::Done(self.finish(target, flight, Outcome::Failed, Some(reason), None))
    }

    /// A migration that ended with the VM still on the source: aborted by us, or failed.
    async fn ended_on_source(&self, target: &Target, flight: &mut Flight, migration_type: &str) -> Step {
        if flight.withdrawn {
            return Step::Requeue(Job {
                server: flight.job.server.clone(),
                action: flight.job.action,
                from: flight.job.from.clone(),
                attempts: flight.job.attempts.saturating_sub(1),
                first_started: flight.job.first_started,
                not_before: Instant::now(),
                listed_at: None,
            });
        }
        if let Phase::Aborting { reason, .. } = &flight.phase {
            let reason = reason.clone();
            return Step::Done(self.finish(target, flight, Outcome::Aborted, Some(reason), None));
        }
        let record = match self
            .compute
            .migration_history(&flight.job.server.id, migration_type)
            .await
        {
            Ok(history) => match &flight.migration_id {
                Some(id) => history.into_iter().find(|m| &m.id == id),
                None => history.into_iter().next(),
            },
            Err(e) => {
                debug!(error = %e, "could not read the migration history");
                None
            }
        };
        let reason = match &record {
            Some(m) if m.status == "cancelled" => {
                let reason = "the migration was cancelled outside the drainer".to_string();
                return Step::Done(self.finish(target, flight, Outcome::Aborted, Some(reason), None));
            }
            Some(m) => format!(
                "the {migration_type} ended {} with the VM still on {}",
                m.status, target.host
            ),
            None => format!("the {migration_type} ended with the VM still on {}", target.host),
        };
        let job = Job {
            server: flight.job.server.clone(),
            action: flight.job.action,
            from: flight.job.from.clone(),
            attempts: flight.job.attempts,
            first_started: flight.job.first_started,
            not_before: Instant::now(),
            listed_at: None,
        };
        Step::Retry(job, reason)
    }

    /// Budget, stall and force-complete follow-up of a live migration in flight.
    /// Returns why the migration is lost when Nova will never finish it.
    async fn watch_live(&self, flight: &mut Flight) -> Option<String> {
        let now = Instant::now();
        if now >= flight.next_progress_check {
            // A record seen ended needs no read to tell that nothing is in progress.
            let record_ended = flight.nova_status.as_deref().is_some_and(is_ended);
            flight.next_progress_check = now
                + if record_ended {
                    PROGRESS_INTERVAL
                } else {
                    self.progress_every(flight)
                };
            let in_progress = if record_ended {
                Some(false)
            } else {
                self.read_progress(flight, now).await
            };
            if in_progress == Some(false) {
                if let Some(reason) = self.ended_without_the_server(flight, now).await {
                    return Some(reason);
                }
            } else {
                flight.orphaned_since = None;
                flight.ended_record_since = None;
            }
        }
        match flight.phase {
            Phase::Moving => {
                let elapsed = now - flight.attempt_started;
                if let Some((what, reason)) = flight.requested.clone() {
                    self.intervene(flight, what, &reason).await;
                } else if elapsed >= flight.budget {
                    let reason = format!("it exceeded its budget of {} s", flight.budget.as_secs());
                    self.intervene(flight, self.settings.on_budget_exceeded, &reason).await;
                } else if let Some(stall) = self.settings.stall_after
                    && flight.remaining.is_some()
                    && now - flight.last_progress >= stall
                {
                    let reason = format!("no progress for {} s", stall.as_secs());
                    self.intervene(flight, self.settings.on_budget_exceeded, &reason).await;
                }
            }
            Phase::Aborting { ref reason, since }
                if now - since > ABORT_AGAIN_AFTER && flight.nova_status.as_deref() == Some("running") =>
            {
                let reason = reason.trim_start_matches("aborted: ").to_string();
                debug!(server = %flight.job.server.id, "the migration still runs after its abort; aborting again");
                self.intervene(flight, BudgetAction::Abort, &reason).await;
            }
            Phase::ForceCompleting { since } if now - since > FORCE_COMPLETE_GRACE => {
                let reason = format!(
                    "it did not complete within {} s of force-complete",
                    FORCE_COMPLETE_GRACE.as_secs()
                );
                self.intervene(flight, BudgetAction::Abort, &reason).await;
            }
            _ => {}
        }
        None
    }

    /// The server still shows `migrating` but Nova has no migration in progress
    /// for it: normal for a moment at the start and the end of a migration,
    /// and for as long as Nova's conductor schedules it (`accepted` is not
    /// listed in progress). The VM is given up on only when its record has
    /// shown an end for [`ORPHAN_GRACE`] with the server still `migrating`:
    /// then the destination never took it over (seen when the destination
    /// compute dies, or its reply is lost while RabbitMQ restarts), and no
    /// amount of waiting will change that. Not at the first sight of an
    /// ended record: the server was read before it, and Nova writes a failed
    /// migration's record before its server (the conductor sets the record to
    /// `error`, then the server to ERROR).
    async fn ended_without_the_server(&self, flight: &mut Flight, now: Instant) -> Option<String> {
        let since = *flight.orphaned_since.get_or_insert(now);
        if now - since < ORPHAN_GRACE {
            return None;
        }
        let history = self
            .compute
            .migration_history(&flight.job.server.id, "live-migration")
            .await
            .ok()?;
        let record = match &flight.migration_id {
            Some(id) => history.into_iter().find(|m| &m.id == id),
            None => history.into_iter().next(),
        }?;
        if !record.ended() {
            flight.ended_record_since = None;
            return None;
        }
        let ended = *flight.ended_record_since.get_or_insert(now);
        (now - ended >= ORPHAN_GRACE).then(|| {
            format!(
                "Nova recorded the live migration as {} but {} s later the server still shows task_state \
                 migrating on its source: the destination ({}) never took it over; an operator must check \
                 where it runs before resetting its state",
                record.status,
                (now - ended).as_secs(),
                record.dest_host.as_deref().unwrap_or("unknown")
            )
        })
    }

    /// Reads progress numbers; `Some(false)` when Nova lists no migration in progress.
    async fn read_progress(&self, flight: &mut Flight, now: Instant) -> Option<bool> {
        let migrations = match self.compute.in_progress_migrations(&flight.job.server.id).await {
            Ok(migrations) => migrations,
            Err(e) => {
                debug!(error = %e, "could not read migration progress");
                return None;
            }
        };
        let Some(migration) = migrations.into_iter().next() else {
            flight.nova_status = None;
            return Some(false);
        };
        flight.note_record(&migration, now);
        // Drivers that report nothing (a zero or missing total) give no stall signal.
        if let (Some(total), Some(remaining)) = (migration.memory_total_bytes, migration.memory_remaining_bytes)
            && total > 0
        {
            // Progress is a new low: a non-converging migration's remaining memory falls
            // within each pre-copy pass and rises again with the next one.
            if flight.remaining.is_none_or(|lowest| remaining < lowest) {
                flight.last_progress = now;
                flight.remaining = Some(remaining);
            }
        }
        Some(true)
    }

    /// Aborts or force-completes a live migration; retried on the next poll if Nova is not ready for it.
    async fn intervene(&self, flight: &mut Flight, what: BudgetAction, reason: &str) {
        if flight.job.action != Action::LiveMigrate {
            return;
        }
        if flight.migration_id.is_none() {
            self.read_progress(flight, Instant::now()).await;
        }
        let Some(migration_id) = flight.migration_id.clone() else {
            debug!(server = %flight.job.server.id, "no in-progress migration record yet");
            return;
        };
        let id = flight.job.server.id.clone();
        let (result, verb) = match what {
            BudgetAction::Abort => (self.compute.abort_migration(&id, &migration_id).await, "abort"),
            BudgetAction::ForceComplete => (self.compute.force_complete(&id, &migration_id).await, "force-complete"),
        };
        match result {
            Ok(()) => {
                flight.requested = None;
                self.observer.event(&Event::Intervened {
                    server: &flight.job.server,
                    what: verb,
                    reason,
                });
                // Its end is now expected any moment, not at the usual time.
                flight.next_poll = flight.next_poll.min(Instant::now() + self.settings.poll_interval);
                flight.phase = match what {
                    BudgetAction::Abort => Phase::Aborting {
                        reason: format!("aborted: {reason}"),
                        since: Instant::now(),
                    },
                    BudgetAction::ForceComplete => Phase::ForceCompleting { since: Instant::now() },
                };
            }
            Err(e) => debug!(server = %id, error = %e, "could not {verb} the migration yet; will retry"),
        }
    }

    fn retry_or_fail(
        &self,
        target: &Target,
        mut job: Job,
        reason: String,
        queue: &mut VecDeque<Job>,
        reports: &mut Vec<VmReport>,
    ) {
        if job.attempts <= self.settings.retries {
            let backoff = self
                .settings
                .retry_backoff
                .saturating_mul(2u32.saturating_pow(job.attempts.saturating_sub(1)))
                .min(MAX_BACKOFF);
            self.observer.event(&Event::MigrationFailed {
                server: &job.server,
                action: job.action,
                reason: &reason,
                retry_in: Some(backoff),
            });
            job.not_before = Instant::now() + backoff;
            queue.push_back(job);
        } else {
            self.observer.event(&Event::MigrationFailed {
                server: &job.server,
                action: job.action,
                reason: &reason,
                retry_in: None,
            });
            let reason = format!("{} attempt(s) failed; last: {reason}", job.attempts);
            reports.push(self.job_report(target, &job, Outcome::Failed, Some(reason), None));
        }
    }

    fn finish(
        &self,
        target: &Target,
        flight: &Flight,
        outcome: Outcome,
        reason: Option<String>,
        destination: Option<String>,
    ) -> VmReport {
        let report = self.job_report(target, &flight.job, outcome, reason, destination);
        if report.outcome == Outcome::Migrated {
            self.observer.event(&Event::MigrationSucceeded {
                server: &flight.job.server,
                action: flight.job.action,
                destination: report.destination.as_deref().unwrap_or("?"),
                seconds: report.duration_seconds,
            });
        } else if let Some(reason) = &report.reason {
            self.observer.event(&Event::NotMigratable {
                server: &flight.job.server,
                reason,
            });
        }
        report
    }

    fn job_report(
        &self,
        target: &Target,
        job: &Job,
        outcome: Outcome,
        reason: Option<String>,
        destination: Option<String>,
    ) -> VmReport {
        let seconds = job.first_started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let report = vm_report(
            &job.server,
            job.action,
            &target.host,
            job.attempts,
            seconds,
            outcome,
            reason,
            destination,
        );
        VmReport {
            from: job.from.clone(),
            ..report
        }
    }
}

enum Start {
    Flying(Box<Flight>),
    Done(VmReport),
    Later(Job),
    Failed(Job, String),
}

/// Sleeps until `at`; never wakes without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Project names by id; `None` where Keystone did not name the project.
type ProjectNames = HashMap<String, Option<String>>;

/// The VMs with the names of their projects where known.
fn name(mut vms: Vec<VmReport>, names: &ProjectNames) -> Vec<VmReport> {
    for vm in &mut vms {
        vm.project = names.get(&vm.project_id).cloned().flatten();
    }
    vms
}

/// Where the moves stand, from the VMs reported and the migrations in flight.
fn progress(total: usize, reports: &[VmReport], flights: &[Flight]) -> Event<'static> {
    let moves = || {
        reports
            .iter()
            .filter(|r| matches!(r.action, Action::LiveMigrate | Action::ColdMigrate))
    };
    let left_to_nova = moves().filter(|r| r.outcome == Outcome::InProgress).count();
    let queued_in_nova = flights.iter().filter(|f| f.waiting_in_nova).count();
    Event::Progress {
        total,
        moved: moves().filter(|r| r.outcome.is_success()).count(),
        not_moved: moves()
            .filter(|r| !r.outcome.is_success() && r.outcome != Outcome::InProgress)
            .count(),
        running: flights.len() - queued_in_nova + left_to_nova,
        queued_in_nova,
    }
}

/// How many servers are left on the host and how the run ended. VMs
/// stopped or left as their tags or the node ask stay, and the run still
/// succeeds; any other server left fails it.
fn verdict(left: ComputeResult<Vec<Server>>, vms: &[VmReport], ending: Option<&Ending>) -> (usize, RunResult) {
    let kept: std::collections::HashSet<&str> = vms
        .iter()
        .filter(|vm| vm.outcome.is_kept_by_choice())
        .map(|vm| vm.id.as_str())
        .collect();
    let (left, unwanted) = match left {
        Ok(servers) => {
            let unwanted = servers.iter().filter(|s| !kept.contains(s.id.as_str())).count();
            (servers.len(), unwanted)
        }
        Err(e) => {
            warn!(error = %e, "could not count the servers left on the host");
            let unwanted = vms
                .iter()
                .filter(|vm| !vm.outcome.is_success() && !kept.contains(vm.id.as_str()))
                .count();
            (unwanted + kept.len(), unwanted)
        }
    };
    let all_done = vms
        .iter()
        .all(|vm| vm.outcome.is_success() || vm.outcome.is_kept_by_choice());
    let result = match ending {
        Some(Ending::TimedOut) => RunResult::TimedOut,
        Some(Ending::Stopped(_)) => RunResult::Interrupted,
        None if unwanted == 0 && all_done => RunResult::Succeeded,
        None => RunResult::Failed,
    };
    (left, result)
}

/// A second listing less the VMs already reported (stopped): they are
/// not newcomers.
fn without<'f>(
    listing: BoxFuture<'f, Result<Vec<PlannedVm>, EvacuationError>>,
    reported: &[VmReport],
) -> BoxFuture<'f, Result<Vec<PlannedVm>, EvacuationError>> {
    let known: std::collections::HashSet<String> = reported.iter().map(|r| r.id.clone()).collect();
    Box::pin(async move {
        let planned = listing.await?;
        Ok(planned.into_iter().filter(|p| !known.contains(&p.server.id)).collect())
    })
}

/// A VM of the plan, reported as it stands before anything is done to it.
pub(super) fn planned_report(planned: &PlannedVm, source: &str, outcome: Outcome, reason: Option<String>) -> VmReport {
    VmReport {
        from: planned.from.clone(),
        ..vm_report(&planned.server, planned.action, source, 0, 0.0, outcome, reason, None)
    }
}

/// How a VM the plan leaves on the host is reported: failed when its tags
/// cannot be followed, left when its tag or the node asked for it, else
/// skipped by the state policy.
fn left_as_planned(planned: &PlannedVm) -> (Outcome, Option<String>) {
    if let Some(why) = &planned.refused {
        return (Outcome::Failed, Some(format!("not touched: {why}")));
    }
    if !planned.kept_by_choice() {
        return (Outcome::Skipped, Some(skip_reason(&planned.server)));
    }
    let by = match &planned.from.tag {
        Some(tag) => format!("its tag {tag}"),
        None => format!(
            "the node's default ({})",
            planned.asked.map_or("leave", VmPolicy::as_str)
        ),
    };
    let why = if planned.asked == Some(VmPolicy::Stop) {
        format!("already SHUTOFF (stopped by its owner), {by} asks for stop: left as it is, never started by us")
    } else {
        format!("left in place as {by} asks")
    };
    (Outcome::Left, Some(why))
}

fn skip_reason(server: &Server) -> String {
    format!("{} VMs are left in place by the state policy", server.status)
}

#[allow(clippy::too_many_arguments)]
fn vm_report(
    server: &Server,
    action: Action,
    source: &str,
    attempts: u32,
    seconds: f64,
    outcome: Outcome,
    reason: Option<String>,
    destination: Option<String>,
) -> VmReport {
    VmReport {
        id: server.id.clone(),
        name: server.name.clone(),
        project_id: server.project_id.clone(),
        project: None,
        status: server.status.clone(),
        ram_mb: server.flavor.ram_mb,
        action,
        from: ActionFrom::default(),
        source: source.to_string(),
        destination,
        attempts,
        duration_seconds: (seconds * 10.0).round() / 10.0,
        outcome,
        reason,
    }
}
