//! The moves of an evacuation, followed until each VM is off the host or
//! reported.
//!
//! Up to `max_parallel` migrations run at once. Every `poll_interval` (a
//! tick) the engine takes one look at the source host, whatever the number
//! of migrations in flight:
//!
//! - **Which servers are still on it**: one request
//!   (`GET /os-hypervisors/{id}?with_servers=true`, 2.53+, unpaged; older
//!   clouds page through the server list). A live-migrated server leaves it
//!   the moment post-migration sets its host to the destination, a
//!   cold-migrated one when it waits in VERIFY_RESIZE there: that is how an
//!   end is seen, within a tick.
//! - **Which migration records changed**: one more request
//!   (`GET /os-migrations?changes-since=`, 2.59+; older clouds read each
//!   migration's newest record). Records tell what the server list cannot: a
//!   migration that failed or was aborted (its server stays), Nova starting
//!   one it held queued, and the ids an abort needs. Nova marks a record
//!   `completed` only after its post-migration bookkeeping (0.5-2 s after the
//!   server settled), which is why ends are read off the server list.
//!
//! A server is read only when one of those looks says its migration may
//! have ended (it left the source, or its record shows an end); then the
//! server itself says how: on the destination, back on the source (failed or
//! aborted: tried again within `retries`), in ERROR, or deleted. Progress
//! numbers are read only for the stall check, [`PROGRESS_READS_PER_STALL`]
//! times per `stall_after`.
//!
//! Budgets and stalls are judged at every tick from our own clocks, which
//! start when Nova runs the migration; an abort or force-complete is asked
//! again at each tick until Nova accepts it. A tick's reads, and the reads
//! before new migrations are asked for, race the stop signal, the overall
//! time-out and the next budget or stall moment: a read stuck in Nova's
//! time-outs is dropped, never waited for. A request that may change
//! something in Nova (a migration, an abort) is always waited for.
//!
//! With `queue_ahead` (2.65+, where a queued migration can be aborted) more
//! live migrations are handed to Nova than run, for Nova to start the moment
//! a running one ends; their clocks start then (or when their record shows
//! them started). Should Nova run more than `max_parallel` of ours at once
//! (its own limit is higher), the newest is aborted and queued again, and
//! none is handed ahead any more.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared, join_all};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::compute::{ChangeMark, Compute, ComputeError, ComputeResult, Migration, Server};
use super::engine::{Engine, left_as_planned, planned_report, skip_reason, vm_report};
use super::error::EvacuationError;
use super::event::Event;
use super::plan::{Action, ActionFrom, ActionSource, PlannedVm};
use super::report::{Outcome, VmReport};
use super::settings::{BudgetAction, Settings, StopRequest, Target};

/// Progress reads per `stall_after` while a migration runs: a stall is
/// judged at most a tenth of that window late, at one read per migration
/// per tenth (never more often than the poll interval).
const PROGRESS_READS_PER_STALL: u32 = 10;
/// How long an accepted abort may leave the migration running before it is
/// sent again: Nova accepts an abort while the migration is `preparing` but
/// cannot stop it then, and it goes on to run.
const ABORT_AGAIN_AFTER: Duration = Duration::from_secs(5);
/// How long a force-completed migration may take before it is aborted.
const FORCE_COMPLETE_GRACE: Duration = Duration::from_secs(60);
/// After a time-out or cancellation, how long to wait for in-flight
/// migrations to settle (aborts to roll back) before reporting.
const SETTLE_GRACE: Duration = Duration::from_secs(120);
/// How long a migration record may show an end with its server still
/// `migrating` on the source before the migration is taken as lost: Nova
/// writes a failed migration's record before its server (the conductor sets
/// the record to `error`, then the server to ERROR), so not at first sight.
const ORPHAN_GRACE: Duration = Duration::from_secs(30);
/// A listing younger than this is trusted for a VM's first migration request
/// (saving a read per VM on the way to the first migrations); anything older
/// is read again first. Nova still refuses a request the server's state forbids.
const FRESH_LISTING: Duration = Duration::from_secs(1);
/// Retry delays never grow beyond this.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

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
    /// An abort or force-complete is wanted (a budget, a stall, the time-out,
    /// a cancellation, a withdrawal): asked for at each tick until Nova accepts it.
    Asking {
        what: BudgetAction,
        reason: String,
    },
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

/// One VM's migration in flight (one attempt).
struct Flight {
    job: Job,
    /// Since when Nova runs it, as far as we know: its budget counts from
    /// then. `None` while Nova holds it queued (handed ahead).
    running_since: Option<Instant>,
    phase: Phase,
    /// Its migration record as last seen: id and status.
    record: Option<(String, String)>,
    /// The lowest `memory_remaining_bytes` seen, and when: no new low for
    /// `stall_after` is a stall.
    progress: Option<(u64, Instant)>,
    /// When its progress was last read for the stall check.
    progress_read: Option<Instant>,
    /// Since when its record has shown an end with the server still `migrating`.
    ended_record_since: Option<Instant>,
    /// Aborted because Nova ran it beyond `max_parallel`: queued again once
    /// stopped, not counted as an attempt.
    withdrawn: bool,
    over_budget_noted: bool,
}

impl Flight {
    /// What a look at Nova's records of this migration tells: its id and
    /// status, and whether Nova runs it (a queued one's clocks wait).
    fn note_record(&mut self, record: &Migration, now: Instant) {
        match record.status.as_str() {
            // Not running yet (Nova's own slots are taken, or it schedules): its clocks wait.
            "accepted" | "queued" if self.running_since.is_some() => {
                self.running_since = Some(now);
                self.progress = None;
            }
            status if running(status) => {
                self.running_since.get_or_insert(now);
            }
            _ => {}
        }
        if !record.ended() {
            self.ended_record_since = None;
        }
        self.record = Some((record.id.clone(), record.status.clone()));
    }

    fn record_status(&self) -> Option<&str> {
        self.record.as_ref().map(|(_, status)| status.as_str())
    }

    fn record_ended(&self) -> bool {
        self.record_status().is_some_and(super::compute::is_ended)
    }

    /// Nova runs this live migration now (not queued, not yet ended), by its record.
    fn runs_in_nova(&self) -> bool {
        self.job.action == Action::LiveMigrate && self.record_status().is_some_and(running)
    }

    /// When its live migration is to be judged: the end of its budget, and
    /// the moment it counts as stalled unless it progresses meanwhile.
    fn judgement_moments(&self, settings: &Settings) -> impl Iterator<Item = Instant> {
        let budget = settings.budget.for_ram(self.job.server.flavor.ram_mb);
        let judged = self.job.action == Action::LiveMigrate && self.phase == Phase::Moving;
        let end = self.running_since.map(|since| since + budget);
        let stall = settings
            .stall_after
            .zip(self.progress)
            .map(|(stall, (_, at))| at + stall);
        [end, stall].into_iter().flatten().filter(move |_| judged)
    }
}

/// Whether a migration record's status says Nova runs it (past its queue, not yet ended).
fn running(status: &str) -> bool {
    matches!(status, "preparing" | "running" | "post-migrating")
}

pub(super) enum Ending {
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

/// What one tick's look at the host showed.
struct Look {
    /// The servers still on the source; `None` when the look failed.
    on_source: Option<HashSet<String>>,
    /// The migration records changed since the previous look (newest first);
    /// `None` when the cloud has no such look (before 2.59) or it failed.
    changes: Option<Vec<Migration>>,
    /// Where the look after this one starts from.
    next: Option<ChangeMark>,
}

/// Where one run's moves stand.
struct Moves {
    queue: VecDeque<Job>,
    flights: Vec<Flight>,
    reports: Vec<VmReport>,
    /// VMs queued to move in all.
    total: usize,
    /// Live migrations handed to Nova beyond `max_parallel`.
    queue_ahead: usize,
    ending: Option<(Ending, Instant)>,
    /// Where the next look at changed migration records starts from.
    mark: Option<ChangeMark>,
}

impl<C: Compute> Engine<'_, C> {
    /// Moves the planned VMs; `relisting`, when given, lists the host again
    /// meanwhile, and the VMs only it finds are moved too.
    pub(super) async fn move_all(
        &self,
        target: &Target,
        planned: Vec<PlannedVm>,
        listed_at: Instant,
        mut relisting: Option<BoxFuture<'_, Result<Vec<PlannedVm>, EvacuationError>>>,
        started: Instant,
        stop: &mut watch::Receiver<StopRequest>,
    ) -> (Vec<VmReport>, Option<Ending>) {
        let mut moves = Moves {
            queue: VecDeque::new(),
            flights: Vec::new(),
            reports: Vec::new(),
            total: 0,
            queue_ahead: if self.compute.aborts_queued_migrations() {
                self.settings.queue_ahead
            } else {
                0
            },
            ending: None,
            mark: None,
        };
        moves.total = self.admit(target, planned, listed_at, &mut moves.queue, &mut moves.reports);
        self.observer.event(&Event::EvacuationStarted {
            to_move: moves.total,
            to_skip: moves.reports.len(),
        });
        let deadline = self.settings.timeout.map(|t| started + t);
        let mut wait = self.settings.poll_interval;
        loop {
            if self.notice_ending(&mut moves, stop, deadline) {
                wait = Duration::ZERO;
            }
            match &moves.ending {
                Some((Ending::Stopped(StopRequest::LeaveInFlight), _)) => break,
                Some((_, since)) if since.elapsed() >= SETTLE_GRACE => break,
                Some(_) => {}
                None => self.fill_slots(target, &mut moves, stop, deadline).await,
            }
            if moves.flights.is_empty() && (moves.ending.is_some() || (moves.queue.is_empty() && relisting.is_none())) {
                break;
            }
            self.observer
                .event(&progress(moves.total, &moves.reports, &moves.flights));
            if let Some(listed) = self.pause(stop, wait, &mut relisting).await {
                relisting = None;
                match listed {
                    Ok(planned) => {
                        moves.total +=
                            self.admit_newcomers(target, planned, &moves.flights, &mut moves.queue, &mut moves.reports);
                    }
                    Err(e) => {
                        warn!(error = %e, "could not list the host again after disabling it; what is left is counted at the end")
                    }
                }
                continue;
            }
            wait = self.tick(target, &mut moves, stop, deadline).await;
        }
        self.left_over(target, moves)
    }

    /// Notices a stop request or the time-out (true when it just did): the
    /// live migrations still moving are then to be aborted or force-completed,
    /// as the ending wants, from the next tick on.
    fn notice_ending(&self, moves: &mut Moves, stop: &watch::Receiver<StopRequest>, deadline: Option<Instant>) -> bool {
        if moves.ending.is_some() {
            return false;
        }
        let request = *stop.borrow();
        let ending = if request != StopRequest::Continue {
            Ending::Stopped(request)
        } else if deadline.is_some_and(|d| Instant::now() >= d) {
            Ending::TimedOut
        } else {
            return false;
        };
        let wanted = match &ending {
            Ending::TimedOut => Some((
                self.settings.on_budget_exceeded,
                format!(
                    "the overall time-out of {} s ran out",
                    self.settings.timeout.unwrap_or_default().as_secs()
                ),
            )),
            Ending::Stopped(StopRequest::AbortInFlight) => {
                Some((BudgetAction::Abort, "the evacuation was cancelled".to_string()))
            }
            Ending::Stopped(_) => None,
        };
        moves.ending = Some((ending, Instant::now()));
        if let Some((what, reason)) = wanted {
            for flight in moves.flights.iter_mut().filter(|f| f.phase == Phase::Moving) {
                flight.phase = Phase::Asking {
                    what,
                    reason: reason.clone(),
                };
            }
        }
        true
    }

    /// Starts queued VMs while slots are free, side by side; a VM that needs
    /// no move frees its slot for the next. The reads before the requests
    /// race a stop, the time-out and the next budget or stall moment: when
    /// one of those comes first, the reads are dropped (their jobs stay
    /// queued) and it is seen to at once. A request, once sent, is waited for
    /// (at most one HTTP time-out): it may have changed something in Nova.
    async fn fill_slots(
        &self,
        target: &Target,
        moves: &mut Moves,
        stop: &mut watch::Receiver<StopRequest>,
        deadline: Option<Instant>,
    ) {
        loop {
            let mut ready = self.take_ready(moves);
            if ready.is_empty() {
                return;
            }
            let now = Instant::now();
            let judgement = self.next_judgement(&moves.flights, now);
            let reads = join_all(ready.iter_mut().map(|(job, _)| self.current(job, now)));
            let currents = tokio::select! {
                currents = reads => Some(currents),
                Ok(()) = stop.changed() => None,
                () = sleep_until_some(deadline) => None,
                () = sleep_until_some(judgement) => None,
            };
            let Some(currents) = currents else {
                for (job, _) in ready.into_iter().rev() {
                    moves.queue.push_front(job);
                }
                return;
            };
            let starts = ready
                .into_iter()
                .zip(currents)
                .map(|((job, ahead), current)| self.start(target, job, ahead, current));
            for start in join_all(starts).await {
                match start {
                    Start::Flying(flight) => moves.flights.push(*flight),
                    Start::Done(report) => moves.reports.push(report),
                    Start::Later(job) => moves.queue.push_back(job),
                    Start::Failed(job, reason) => {
                        self.retry_or_fail(target, job, reason, &mut moves.queue, &mut moves.reports)
                    }
                }
            }
        }
    }

    /// The queued jobs that may start now, as many as the free slots take
    /// (`true`: handed to Nova ahead, beyond `max_parallel`).
    fn take_ready(&self, moves: &mut Moves) -> Vec<(Job, bool)> {
        let max_running = self.settings.max_parallel.max(1);
        let now = Instant::now();
        let mut ready = Vec::new();
        while moves.flights.len() + ready.len() < max_running + moves.queue_ahead {
            // Beyond max_parallel only live migrations: Nova queues those per host.
            let ahead = moves.flights.len() + ready.len() >= max_running;
            let Some(position) = moves
                .queue
                .iter()
                .position(|job| job.not_before <= now && (!ahead || job.action == Action::LiveMigrate))
            else {
                break;
            };
            ready.extend(moves.queue.remove(position).map(|job| (job, ahead)));
        }
        ready
    }

    /// The next moment a flight is to be judged (its budget's end, or a stall).
    fn next_judgement(&self, flights: &[Flight], now: Instant) -> Option<Instant> {
        flights
            .iter()
            .flat_map(|f| f.judgement_moments(self.settings))
            .filter(|at| *at > now)
            .min()
    }

    /// Waits `wait`, or less if a stop is requested or the listing in the
    /// background ends meanwhile; returns that listing when it ended.
    async fn pause(
        &self,
        stop: &mut watch::Receiver<StopRequest>,
        wait: Duration,
        relisting: &mut Option<BoxFuture<'_, Result<Vec<PlannedVm>, EvacuationError>>>,
    ) -> Option<Result<Vec<PlannedVm>, EvacuationError>> {
        let listing = async {
            match relisting.as_mut() {
                Some(listing) => listing.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => None,
            changed = stop.changed() => {
                if changed.is_err() {
                    // Nobody can ask us to stop any more: just wait.
                    tokio::time::sleep(self.settings.poll_interval).await;
                }
                None
            }
            listed = listing => Some(listed),
        }
    }

    /// One tick: one look at the host and its migration records, then
    /// each flight followed on its own. The whole races a stop, the time-out
    /// and the next budget or stall moment: a read stuck in Nova is dropped
    /// (its flight stays as it was) and the next tick comes at once. Returns
    /// how long to wait before the next tick: one poll interval from this
    /// one's start.
    async fn tick(
        &self,
        target: &Target,
        moves: &mut Moves,
        stop: &mut watch::Receiver<StopRequest>,
        deadline: Option<Instant>,
    ) -> Duration {
        if moves.flights.is_empty() {
            return self.settings.poll_interval;
        }
        let started = Instant::now();
        let judgement = self.next_judgement(&moves.flights, started);
        let ongoing = moves.ending.is_none();
        let look = self.look(target, moves.mark).shared();
        let follows = join_all(
            moves
                .flights
                .iter_mut()
                .map(|flight| self.follow(target, flight, look.clone())),
        );
        let steps = tokio::select! {
            steps = follows => steps,
            Ok(()) = stop.changed() => return Duration::ZERO,
            () = sleep_until_some(deadline), if ongoing => return Duration::ZERO,
            () = sleep_until_some(judgement) => return Duration::ZERO,
        };
        // Only a tick whose every flight took the look in moves the mark on:
        // a dropped one's records are listed again.
        if let Some(next) = look.peek().and_then(|look| look.next) {
            moves.mark = Some(next);
        }
        drop(look);
        let flights = std::mem::take(&mut moves.flights);
        for (flight, step) in flights.into_iter().zip(steps) {
            match step {
                Step::Continue => moves.flights.push(flight),
                Step::Done(report) => moves.reports.push(report),
                Step::Retry(job, reason) => {
                    self.retry_or_fail(target, job, reason, &mut moves.queue, &mut moves.reports)
                }
                Step::Requeue(job) => moves.queue.push_front(job),
            }
        }
        self.start_waiting(&mut moves.flights);
        if ongoing
            && moves.queue_ahead > 0
            && let Some(newest) = self.withdraw_beyond_max(&mut moves.flights)
        {
            moves.queue_ahead = 0;
            if let Phase::Asking { what, reason } = &newest.phase {
                let (what, reason) = (*what, reason.clone());
                self.intervene(newest, what, &reason).await;
            }
        }
        // Ticks keep their pace, however long the looks took.
        self.settings.poll_interval.saturating_sub(started.elapsed())
    }

    /// The look at the host shared by a tick's flights: the servers still on
    /// it and the migration records changed since `mark`.
    fn look<'f>(&'f self, target: &'f Target, mark: Option<ChangeMark>) -> BoxFuture<'f, Arc<Look>> {
        Box::pin(async move {
            let records = self.compute.lists_migration_changes();
            let (on_source, changes) = tokio::join!(self.compute.servers_still_on(&target.host), async {
                if records {
                    Some(self.compute.migrations_changed(&target.host, mark).await)
                } else {
                    None
                }
            });
            let (changes, next) = match changes {
                Some(Ok(changes)) => (Some(changes.migrations), Some(changes.next)),
                Some(Err(e)) => {
                    debug!(error = %e, "could not list changed migrations");
                    (None, None)
                }
                None => (None, None),
            };
            let on_source = on_source
                .map_err(|e| debug!(error = %e, "could not look at the servers on the host"))
                .ok();
            Arc::new(Look {
                on_source,
                changes,
                next,
            })
        })
    }

    /// One tick of one flight: its budget, stall and intervention judged by
    /// our own clocks first (a slow look must not hold them back), then its
    /// record noted, then its server read if the look says it may have ended.
    async fn follow(&self, target: &Target, flight: &mut Flight, look: Shared<BoxFuture<'_, Arc<Look>>>) -> Step {
        self.judge(flight, Instant::now()).await;
        let look = look.await;
        // Newest first; a server moves once at a time, so its newest is this attempt's.
        let id = Some(flight.job.server.id.as_str());
        if let Some(record) = look.changes.iter().flatten().find(|m| m.server_id.as_deref() == id) {
            flight.note_record(record, Instant::now());
        }
        // Before 2.59 each record is read on its own; so is one no look has
        // shown yet (a change older than the first look's reach).
        if flight.record.is_none() || !self.compute.lists_migration_changes() {
            self.read_record(flight).await;
        }
        let left = look
            .on_source
            .as_ref()
            .is_some_and(|on| !on.contains(&flight.job.server.id));
        if left || flight.record_ended() {
            return self.inspect(target, flight).await;
        }
        Step::Continue
    }

    /// This migration's own newest record (before 2.59, or before any look showed it).
    async fn read_record(&self, flight: &mut Flight) {
        let kind = migration_type(flight.job.action);
        match self.compute.migration_history(&flight.job.server.id, kind).await {
            Ok(history) => {
                if let Some(newest) = history.first() {
                    flight.note_record(newest, Instant::now());
                }
            }
            Err(e) => debug!(server = %flight.job.server.id, error = %e, "could not read the migration record"),
        }
    }

    /// Reads the server of a migration that may have ended, and tells how it
    /// ended: on the destination, back on the source, in ERROR, deleted, a
    /// cold migration to confirm, or lost on the way.
    async fn inspect(&self, target: &Target, flight: &mut Flight) -> Step {
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
        if flight.job.action == Action::ColdMigrate && server.status == "VERIFY_RESIZE" {
            if flight.phase != Phase::Confirming {
                match self.compute.confirm_resize(&id).await {
                    Ok(()) => flight.phase = Phase::Confirming,
                    Err(e) => debug!(server = %id, error = %e, "confirming the cold migration; will retry"),
                }
            }
            return Step::Continue;
        }
        if server.task_state.is_none() {
            if server.host.as_deref() != Some(target.host.as_str()) {
                return Step::Done(self.finish(target, flight, Outcome::Migrated, None, server.host));
            }
            return self.ended_on_source(target, flight).await;
        }
        if flight.job.action == Action::LiveMigrate
            && flight.record_ended()
            && let Some(reason) = self.lost(flight).await
        {
            return Step::Done(self.finish(target, flight, Outcome::Failed, Some(reason), None));
        }
        Step::Continue
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
        let known: HashSet<&str> = queue
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

    /// The server as it stands before its job's request: the listing's copy
    /// while that is fresh (`true`), else read again.
    async fn current(&self, job: &mut Job, now: Instant) -> (ComputeResult<Option<Server>>, bool) {
        if job.listed_at.take().is_some_and(|t| now - t < FRESH_LISTING) {
            return (Ok(Some(job.server.clone())), true);
        }
        (self.compute.server(&job.server.id).await, false)
    }

    /// Starts (or follows) one VM's migration, from the server as it stands
    /// (`current`); `ahead` when it is handed to Nova beyond `max_parallel`,
    /// to wait queued there.
    async fn start(
        &self,
        target: &Target,
        mut job: Job,
        ahead: bool,
        (current, fresh): (ComputeResult<Option<Server>>, bool),
    ) -> Start {
        let now = Instant::now();
        let current = match current {
            Ok(Some(server)) => server,
            Ok(None) => return Start::Done(self.job_report(target, &job, Outcome::Deleted, None, None)),
            Err(e) => {
                warn!(server = %job.server.id, error = %e, "could not read the server; will try again");
                job.not_before = now + self.settings.poll_interval.max(Duration::from_secs(1));
                return Start::Later(job);
            }
        };
        let mut job = match self.ready_to_move(target, job, &current, ahead, now) {
            Ok(job) => job,
            Err(start) => return *start,
        };
        job.server.status = current.status.clone();
        job.attempts += 1;
        let request = match job.action {
            Action::LiveMigrate => {
                let destination = self.settings.destination.as_deref();
                self.compute.live_migrate(&job.server.id, destination).await
            }
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

    /// The job, when the server as it stands now is to be moved by a request
    /// of ours; else what becomes of it: done with, followed (already
    /// migrating), or looked at again later.
    fn ready_to_move(
        &self,
        target: &Target,
        mut job: Job,
        current: &Server,
        ahead: bool,
        now: Instant,
    ) -> Result<Job, Box<Start>> {
        let moving_task = match current.task_state.as_deref() {
            Some("migrating") => Some(Action::LiveMigrate),
            Some(task) if task.starts_with("resize") => Some(Action::ColdMigrate),
            _ => None,
        };
        if current.host.as_deref() != Some(target.host.as_str()) && current.task_state.is_none() {
            let report = self.job_report(target, &job, Outcome::Migrated, None, current.host.clone());
            return Err(Box::new(Start::Done(report)));
        }
        job.first_started.get_or_insert(now);
        if let Some(action) = moving_task {
            // Already migrating (an earlier run of ours, or an operator): follow it, never start a second one.
            info!(server = %job.server.id, "following a migration already in progress");
            job.action = action;
            job.attempts += 1;
            return Err(Box::new(Start::Flying(Box::new(self.flight(job, now, false)))));
        }
        if current.status == "ERROR" {
            let why = Some("the VM is in ERROR".into());
            return Err(Box::new(Start::Done(self.job_report(
                target,
                &job,
                Outcome::Failed,
                why,
                None,
            ))));
        }
        if current.task_state.is_some() {
            // Rebooting, pausing...: wait for Nova to finish that first.
            job.not_before = now + self.settings.poll_interval;
            return Err(Box::new(Start::Later(job)));
        }
        if !job.action.allowed_for(&current.status)
            && let Some(report) = self.replan(target, &mut job, current)
        {
            return Err(Box::new(Start::Done(report)));
        }
        if ahead && job.action != Action::LiveMigrate {
            // Now a cold migration: Nova would run it at once, so it waits for a slot of its own.
            job.not_before = now + self.settings.poll_interval;
            return Err(Box::new(Start::Later(job)));
        }
        Ok(job)
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

    fn flight(&self, job: Job, now: Instant, ahead: bool) -> Flight {
        Flight {
            job,
            running_since: (!ahead).then_some(now),
            phase: Phase::Moving,
            record: None,
            progress: None,
            progress_read: None,
            ended_record_since: None,
            withdrawn: false,
            over_budget_noted: false,
        }
    }

    /// How often a running live migration's progress numbers are read, for
    /// the stall check alone.
    fn progress_every(&self) -> Duration {
        let stall = self.settings.stall_after.unwrap_or_default();
        (stall / PROGRESS_READS_PER_STALL).max(self.settings.poll_interval)
    }

    /// Nova starts the oldest migration it holds queued the moment a running
    /// one ends: as slots free, the clocks of those handed ahead start.
    fn start_waiting(&self, flights: &mut [Flight]) {
        let now = Instant::now();
        let running = flights.iter().filter(|f| f.running_since.is_some()).count();
        let free = self.settings.max_parallel.max(1).saturating_sub(running);
        // Oldest first: flights are kept in the order they started.
        for flight in flights.iter_mut().filter(|f| f.running_since.is_none()).take(free) {
            flight.running_since = Some(now);
        }
    }

    /// Whether Nova, by the records just looked at, runs more of our
    /// migrations than `max_parallel` (its `max_concurrent_live_migrations`
    /// is higher): then the newest is withdrawn (aborted, queued again) and
    /// returned, so that none is handed ahead any more.
    fn withdraw_beyond_max<'f>(&self, flights: &'f mut [Flight]) -> Option<&'f mut Flight> {
        let max_running = self.settings.max_parallel.max(1);
        if flights.iter().filter(|f| f.runs_in_nova()).count() <= max_running {
            return None;
        }
        let newest = flights.iter_mut().rev().find(|f| f.runs_in_nova())?;
        warn!(
            server = %newest.job.server.id,
            max_parallel = max_running,
            "Nova runs more migrations than max_parallel (its max_concurrent_live_migrations is higher): \
             withdrawing the newest, handing none ahead any more"
        );
        newest.withdrawn = true;
        newest.running_since.get_or_insert_with(Instant::now);
        newest.phase = Phase::Asking {
            what: BudgetAction::Abort,
            reason: format!("Nova ran it beside {max_running} other(s); it is moved again later"),
        };
        Some(newest)
    }

    /// A live migration judged by our own clocks: its budget, a stall, the
    /// abort or force-complete asked for, and their follow-up.
    async fn judge(&self, flight: &mut Flight, now: Instant) {
        let budget = self.settings.budget.for_ram(flight.job.server.flavor.ram_mb);
        if flight.job.action != Action::LiveMigrate {
            if !flight.over_budget_noted && flight.running_since.is_some_and(|since| now - since > budget) {
                flight.over_budget_noted = true;
                warn!(server = %flight.job.server.id, budget_s = budget.as_secs(), "cold migration runs past its budget; Nova cannot abort it");
            }
            return;
        }
        let last_read = flight.progress_read.max(flight.running_since);
        if self.settings.stall_after.is_some()
            && flight.phase == Phase::Moving
            && last_read.is_some_and(|at| now >= at + self.progress_every())
        {
            flight.progress_read = Some(now);
            self.read_progress(flight, now).await;
        }
        let wanted = match &flight.phase {
            Phase::Asking { what, reason } => Some((*what, reason.clone())),
            Phase::Moving => self.overdue(flight, now, budget),
            Phase::Aborting { reason, since }
                if now - *since > ABORT_AGAIN_AFTER && flight.record_status() == Some("running") =>
            {
                debug!(server = %flight.job.server.id, "the migration still runs after its abort; aborting again");
                Some((BudgetAction::Abort, reason.trim_start_matches("aborted: ").to_string()))
            }
            Phase::ForceCompleting { since } if now - *since > FORCE_COMPLETE_GRACE => Some((
                BudgetAction::Abort,
                format!(
                    "it did not complete within {} s of force-complete",
                    FORCE_COMPLETE_GRACE.as_secs()
                ),
            )),
            _ => None,
        };
        if let Some((what, reason)) = wanted {
            self.intervene(flight, what, &reason).await;
        }
    }

    /// What to do with a running live migration past its budget or stalled, and why.
    fn overdue(&self, flight: &Flight, now: Instant, budget: Duration) -> Option<(BudgetAction, String)> {
        let since = flight.running_since?;
        let why = if now - since >= budget {
            format!("it exceeded its budget of {} s", budget.as_secs())
        } else if let Some(stall) = self.settings.stall_after
            && flight.progress.is_some_and(|(_, at)| now - at >= stall)
        {
            format!("no progress for {} s", stall.as_secs())
        } else {
            return None;
        };
        Some((self.settings.on_budget_exceeded, why))
    }

    /// The server still shows `migrating` while its record shows an end:
    /// normal for a moment (Nova writes the record first). Given up on only
    /// when the newest record has shown an end for [`ORPHAN_GRACE`]: then the
    /// destination never took it over (seen when the destination compute
    /// dies, or its reply is lost while RabbitMQ restarts), and no amount of
    /// waiting will change that.
    async fn lost(&self, flight: &mut Flight) -> Option<String> {
        let now = Instant::now();
        let since = *flight.ended_record_since.get_or_insert(now);
        if now - since < ORPHAN_GRACE {
            return None;
        }
        let history = self
            .compute
            .migration_history(&flight.job.server.id, "live-migration")
            .await
            .ok()?;
        let newest = history.into_iter().next()?;
        if !newest.ended() {
            flight.note_record(&newest, now);
            return None;
        }
        Some(format!(
            "Nova recorded the live migration as {} but {} s later the server still shows task_state \
             migrating on its source: the destination ({}) never took it over; an operator must check \
             where it runs before resetting its state",
            newest.status,
            (now - since).as_secs(),
            newest.dest_host.as_deref().unwrap_or("unknown")
        ))
    }

    /// Reads the migration's progress numbers (and its record with them).
    async fn read_progress(&self, flight: &mut Flight, now: Instant) {
        let migrations = match self.compute.in_progress_migrations(&flight.job.server.id).await {
            Ok(migrations) => migrations,
            Err(e) => {
                debug!(error = %e, "could not read migration progress");
                return;
            }
        };
        let Some(migration) = migrations.into_iter().next() else {
            return;
        };
        flight.note_record(&migration, now);
        // Drivers that report nothing (a zero or missing total) give no stall signal.
        if let (Some(total), Some(remaining)) = (migration.memory_total_bytes, migration.memory_remaining_bytes)
            && total > 0
            // Progress is a new low: a non-converging migration's remaining memory falls
            // within each pre-copy pass and rises again with the next one.
            && flight.progress.is_none_or(|(lowest, _)| remaining < lowest)
        {
            flight.progress = Some((remaining, now));
        }
    }

    /// Aborts or force-completes a live migration; asked again at the next
    /// tick if Nova is not ready for it.
    async fn intervene(&self, flight: &mut Flight, what: BudgetAction, reason: &str) {
        if flight.job.action != Action::LiveMigrate {
            return;
        }
        if flight.record.is_none() || flight.record_ended() {
            self.read_progress(flight, Instant::now()).await;
        }
        let migration_id = flight
            .record
            .as_ref()
            .filter(|_| !flight.record_ended())
            .map(|(id, _)| id.clone());
        let id = flight.job.server.id.clone();
        let result = match (&migration_id, what) {
            (None, _) => Err(ComputeError::Other("no migration in progress yet".into())),
            (Some(m), BudgetAction::Abort) => self.compute.abort_migration(&id, m).await,
            (Some(m), BudgetAction::ForceComplete) => self.compute.force_complete(&id, m).await,
        };
        let verb = match what {
            BudgetAction::Abort => "abort",
            BudgetAction::ForceComplete => "force-complete",
        };
        match result {
            Ok(()) => {
                self.observer.event(&Event::Intervened {
                    server: &flight.job.server,
                    what: verb,
                    reason,
                });
                flight.phase = match what {
                    BudgetAction::Abort => Phase::Aborting {
                        reason: format!("aborted: {reason}"),
                        since: Instant::now(),
                    },
                    BudgetAction::ForceComplete => Phase::ForceCompleting { since: Instant::now() },
                };
            }
            Err(e) => {
                debug!(server = %id, error = %e, "could not {verb} the migration yet; will retry");
                // An abort already accepted stays one: its end is reported as aborted.
                if !matches!(flight.phase, Phase::Aborting { .. }) {
                    flight.phase = Phase::Asking {
                        what,
                        reason: reason.to_string(),
                    };
                }
            }
        }
    }

    /// What is still in flight or queued when the moves end, reported.
    fn left_over(&self, target: &Target, mut moves: Moves) -> (Vec<VmReport>, Option<Ending>) {
        let ending = moves.ending.map(|(ending, _)| ending);
        let reason_left = match ending {
            Some(Ending::TimedOut) => "the overall time-out ran out",
            Some(Ending::Stopped(_)) => "the evacuation was stopped",
            None => "the evacuation ended",
        };
        for flight in moves.flights {
            let reason = format!("{reason_left} while it was migrating; Nova goes on with it");
            let report = self.job_report(target, &flight.job, Outcome::InProgress, Some(reason), None);
            moves.reports.push(report);
        }
        for job in moves.queue {
            let outcome = if job.attempts == 0 {
                Outcome::NotStarted
            } else {
                Outcome::Failed
            };
            let reason = Some(format!("{reason_left} before it was moved"));
            moves.reports.push(self.job_report(target, &job, outcome, reason, None));
        }
        self.observer.event(&progress(moves.total, &moves.reports, &[]));
        (moves.reports, ending)
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
                        return self.ended_on_source(target, flight).await;
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
    async fn ended_on_source(&self, target: &Target, flight: &mut Flight) -> Step {
        let migration_type = migration_type(flight.job.action);
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
            // Newest first: this attempt's, once the server has ended on the source.
            Ok(history) => history.into_iter().next(),
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

/// Nova's `migration_type` of an action's migrations.
fn migration_type(action: Action) -> &'static str {
    match action {
        Action::ColdMigrate => "migration",
        _ => "live-migration",
    }
}

/// Sleeps until `at`; never wakes without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Where the moves stand, from the VMs reported and the migrations in flight.
fn progress(total: usize, reports: &[VmReport], flights: &[Flight]) -> Event<'static> {
    let moves = || {
        reports
            .iter()
            .filter(|r| matches!(r.action, Action::LiveMigrate | Action::ColdMigrate))
    };
    let left_to_nova = moves().filter(|r| r.outcome == Outcome::InProgress).count();
    let queued_in_nova = flights.iter().filter(|f| f.running_since.is_none()).count();
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
