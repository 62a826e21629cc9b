//! [`FakeCloud`], an in-memory Nova for tests of the engine and of the daemon,
//! on tokio's paused clock: sleeps advance virtual time at once, so every
//! timing is exact and every test runs in milliseconds.
//!
//! The fake is also the written record of what the engine assumes about Nova.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, sleep};

use super::*;

// ---------------------------------------------------------------------------
// The fake cloud
// ---------------------------------------------------------------------------

/// The nova-compute host being drained, and its Kubernetes node.
pub(crate) const SOURCE: &str = "cmp-src";
pub(crate) const NODE: &str = "node-a";
/// Nova's `migration_type`s.
pub(crate) const LIVE: &str = "live-migration";
pub(crate) const COLD: &str = "migration";
pub(crate) const MIB: u64 = 1024 * 1024;

pub(crate) fn secs(seconds: u64) -> Duration {
    Duration::from_secs(seconds)
}

pub(crate) fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// How one migration of a server goes, as the fake's hypervisors play it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Script {
    /// Finishes `after` this long, memory copied at an even pace: the server then runs on the destination.
    Complete { after: Duration },
    /// Fails `after` this long (the destination refused, the network broke): the server stays ACTIVE on its source.
    Fail { after: Duration },
    /// Copies half the memory in `progress_for`, then stops converging: `memory_remaining_bytes` stays where it got
    /// to and the migration never ends by itself.
    Stall { progress_for: Duration },
    /// Never converges because the guest dirties memory as fast as it is copied: each `period` the remaining memory
    /// falls from half to a quarter of the total, then jumps back up for the next pre-copy pass.
    Thrash { period: Duration },
    /// The source finishes `after` this long and marks the migration completed, but the destination never takes the
    /// server over (its nova-compute died): the server keeps showing `migrating` on its source for ever.
    DestinationLost { after: Duration },
    /// Nova's conductor fails it `after` this long, before any hypervisor took part (the scheduler's reply was lost
    /// while RabbitMQ restarted, and the call timed out): the migration ends in `error`, and
    /// [`CONDUCTOR_WRITES_APART`] later the server in ERROR, its guest still running untouched on the source.
    ConductorError { after: Duration },
}

/// How long after a failed migration's record Nova's conductor sets its
/// server to ERROR (see [`Cloud::conductor_sets_errored_servers`]).
pub(crate) const CONDUCTOR_WRITES_APART: Duration = Duration::from_secs(2);

/// What a migration is given when its server has no script.
pub(crate) const DEFAULT_SCRIPT: Script = Script::Complete {
    after: Duration::from_secs(30),
};

/// What the in-progress migration records say about memory; drivers differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// `memory_total_bytes` and `memory_remaining_bytes` filled in, as libvirt does.
    Reported,
    /// Both zero: a driver that tracks nothing.
    Zero,
    /// Both null.
    Missing,
}

pub(crate) struct FakeVm {
    pub(crate) server: Server,
    /// How its successive migrations go; the last one repeats for ever.
    pub(crate) scripts: VecDeque<Script>,
    pub(crate) progress: Progress,
    /// Its newest instance action is a `resetState`, not a migration.
    pub(crate) reset_since_migration: bool,
    /// An `os-stop` is under way (`powering-off`) and ends at this instant.
    pub(crate) powering_off_until: Option<Instant>,
}

impl FakeVm {
    pub(crate) fn next_script(&mut self) -> Script {
        if self.scripts.len() > 1 {
            self.scripts.pop_front().unwrap_or(DEFAULT_SCRIPT)
        } else {
            self.scripts.front().copied().unwrap_or(DEFAULT_SCRIPT)
        }
    }
}

/// A migration record, as `os-migrations` keeps it.
pub(crate) struct FakeMigration {
    pub(crate) id: String,
    pub(crate) server_id: String,
    /// [`LIVE`] or [`COLD`].
    pub(crate) kind: &'static str,
    /// Live: [accepted | queued ->] running -> completed | error | cancelled.
    /// Cold: migrating -> finished (server in VERIFY_RESIZE) -> confirmed, or -> error.
    pub(crate) status: &'static str,
    pub(crate) source: String,
    pub(crate) dest: String,
    pub(crate) script: Script,
    pub(crate) progress: Progress,
    pub(crate) total_bytes: u64,
    pub(crate) started: Instant,
    pub(crate) ended: Option<Instant>,
    /// `updated_at`: unset until the record first changes after its creation, as in Nova's database.
    pub(crate) updated: Option<Instant>,
    /// The server's status before a cold migration; the confirmation brings it back (SHUTOFF stays SHUTOFF).
    pub(crate) status_before: String,
}

impl FakeMigration {
    /// A new status, written at `now` (its `updated_at`).
    pub(crate) fn set_status(&mut self, status: &'static str, now: Instant) {
        self.status = status;
        self.updated = Some(now);
    }

    /// Still moving, by itself, towards an end.
    pub(crate) fn moving(&self) -> bool {
        matches!(self.status, "running" | "migrating")
    }

    /// Occupies the source: moving, or a cold migration waiting for its confirmation.
    pub(crate) fn in_flight(&self) -> bool {
        self.moving() || self.status == "finished"
    }

    /// Queued in Nova behind its `max_concurrent_live_migrations` running ones.
    pub(crate) fn queued(&self) -> bool {
        self.status == "queued"
    }

    /// Still being scheduled in the conductor: no hypervisor has it yet.
    pub(crate) fn accepted(&self) -> bool {
        self.status == "accepted"
    }

    pub(crate) fn remaining_bytes(&self, now: Instant) -> u64 {
        if self.status == "completed" {
            return 0;
        }
        if self.queued() || self.accepted() {
            return self.total_bytes;
        }
        let elapsed = self.ended.unwrap_or(now) - self.started;
        let total = self.total_bytes;
        let copied = match self.script {
            Script::Complete { after }
            | Script::Fail { after }
            | Script::DestinationLost { after }
            | Script::ConductorError { after } => share(total, elapsed.min(after), after),
            Script::Stall { progress_for } => share(total / 2, elapsed.min(progress_for), progress_for),
            Script::Thrash { period } => {
                let into_pass = Duration::from_nanos((elapsed.as_nanos() % period.as_nanos().max(1)) as u64);
                total / 2 + share(total / 4, into_pass, period)
            }
        };
        total - copied
    }

    pub(crate) fn record(&self, now: Instant) -> Migration {
        let (remaining, total) = match self.progress {
            Progress::Reported => (Some(self.remaining_bytes(now)), Some(self.total_bytes)),
            Progress::Zero => (Some(0), Some(0)),
            Progress::Missing => (None, None),
        };
        Migration {
            id: self.id.clone(),
            server_id: Some(self.server_id.clone()),
            status: self.status.to_string(),
            source_host: Some(self.source.clone()),
            dest_host: Some(self.dest.clone()),
            memory_remaining_bytes: remaining,
            memory_total_bytes: total,
            created_at: None,
        }
    }
}

/// `part / whole` of `amount`; all of it when `whole` is zero.
pub(crate) fn share(amount: u64, part: Duration, whole: Duration) -> u64 {
    if whole.is_zero() {
        return amount;
    }
    (u128::from(amount) * part.as_nanos() / whole.as_nanos()) as u64
}

/// Every call the engine made, for the tests to look at. Times are virtual, from the fake's creation (the test's start).
#[derive(Clone, Debug, Default)]
pub(crate) struct Calls {
    pub(crate) live_migrate: Vec<(String, Duration)>,
    /// The destination each live migration asked for, in order (`None`: the scheduler's choice).
    pub(crate) live_destinations: Vec<Option<String>>,
    pub(crate) cold_migrate: Vec<(String, Duration)>,
    /// Every migration request, live or cold, in order.
    pub(crate) starts: Vec<String>,
    pub(crate) confirm_resize: Vec<String>,
    pub(crate) abort: Vec<(String, Duration)>,
    /// The server of every `GET /servers/{id}`, in order.
    pub(crate) server_reads: Vec<String>,
    /// Looks at the host's changed migration records (`GET /os-migrations?changes-since=`).
    pub(crate) change_reads: usize,
    /// Looks at the servers still on the host (`GET /os-hypervisors/{id}?with_servers=true`).
    pub(crate) host_looks: usize,
    /// Reads of one server's migrations in progress (`GET /servers/{id}/migrations`).
    pub(crate) progress_reads: usize,
    /// Reads of one server's migration records (`GET /os-migrations?instance_uuid=`).
    pub(crate) history_reads: usize,
    /// Servers set back to ACTIVE, in order.
    pub(crate) reset_to_active: Vec<String>,
    pub(crate) force_complete: Vec<(String, Duration)>,
    /// The reasons of every disable call.
    pub(crate) disable: Vec<String>,
    pub(crate) enable: usize,
    /// The most migrations in flight from the drained host at once (a cold one
    /// until confirmed; not the live ones Nova holds queued).
    pub(crate) max_in_flight: usize,
    /// The most live migrations Nova held queued at once.
    pub(crate) max_queued: usize,
    /// Tag and power calls in order: `tag ID TAG`, `untag ID TAG`, `stop ID`, `start ID`.
    pub(crate) lifecycle: Vec<String>,
}

impl Calls {
    pub(crate) fn live_migrate_times(&self, server: &str) -> Vec<Duration> {
        self.live_migrate
            .iter()
            .filter(|(id, _)| id == server)
            .map(|(_, at)| *at)
            .collect()
    }

    pub(crate) fn abort_times(&self, server: &str) -> Vec<Duration> {
        self.abort
            .iter()
            .filter(|(id, _)| id == server)
            .map(|(_, at)| *at)
            .collect()
    }
}

/// A change to the cloud made by someone other than the engine.
pub(crate) type CloudChange = Box<dyn FnOnce(&mut Cloud) + Send>;

pub(crate) struct Cloud {
    pub(crate) service: ComputeService,
    pub(crate) vms: BTreeMap<String, FakeVm>,
    /// Oldest first.
    pub(crate) migrations: Vec<FakeMigration>,
    /// The other hypervisors, as `spare_capacity` reports them and as the scheduler picks destinations.
    pub(crate) other_hosts: Vec<HostCapacity>,
    /// The scheduler places round-robin and ignores capacity: capacity is the engine's own pre-check.
    pub(crate) placed: usize,
    /// Sharing providers' free amounts, by name, as `spare_capacity` reports them.
    pub(crate) shared: BTreeMap<String, Resources>,
    /// What Placement shows each server holding on [`SOURCE`]; a server
    /// missing here has no allocation (its flavor stands in).
    pub(crate) allocations: BTreeMap<String, Resources>,
    /// What the VMs on hosts evacuated elsewhere hold there, by host.
    pub(crate) elsewhere: BTreeMap<String, BTreeMap<String, Resources>>,
    /// Placement is unreachable: `spare_capacity` fails.
    pub(crate) placement_down: bool,
    /// Nova's API is unreachable: every call fails.
    pub(crate) nova_down: bool,
    /// Other hosts' services that are disabled or down: (enabled, up).
    pub(crate) unusable: BTreeMap<String, (bool, bool)>,
    /// Someone else's change, made right after the next host listing is answered.
    pub(crate) after_listing: Option<CloudChange>,
    /// Nova's `max_concurrent_live_migrations` per source host: more live
    /// migrations wait as `queued` and start the moment one ends. `None`: no
    /// limit.
    pub(crate) nova_live_limit: Option<usize>,
    /// Whether the API lets a queued (or preparing) migration be aborted
    /// (compute microversion 2.65).
    pub(crate) aborts_queued: bool,
    /// How long Nova's conductor takes to schedule and pre-check a live
    /// migration (`accepted`) before the source compute queues or runs it;
    /// the work that handing migrations ahead overlaps with the running one.
    pub(crate) scheduling: Duration,
    /// Servers whose next abort Nova accepts but cannot carry out (it came
    /// while the migration was `preparing`): the migration goes on.
    pub(crate) abort_lost: Vec<String>,
    /// The API is older than 2.59: no `changes-since` on `GET /os-migrations`.
    pub(crate) no_changes_since: bool,
    /// The API shows and sets server tags (2.26 and later).
    pub(crate) tags_supported: bool,
    /// How long an `os-stop` takes (the guest's shutdown).
    pub(crate) stop_takes: Duration,
    /// Tag writes fail (`add_tag` answers 500).
    pub(crate) tag_writes_fail: bool,
    /// Servers whose reads take this long to answer (a Nova call stuck in
    /// its time-outs and retries).
    pub(crate) slow_reads: BTreeMap<String, Duration>,
    pub(crate) calls: Calls,
}

impl Cloud {
    /// Lets every moving migration end whose time has come; a queued one
    /// starts the moment a slot frees (migrations are kept oldest first, so
    /// it is looked at later in the same pass).
    pub(crate) fn settle(&mut self, now: Instant) {
        // First the conductor's part: what it has scheduled by now reaches
        // its compute, which queues it behind the migrations still listed
        // running; one of those that ended earlier starts it below, not
        // before it was scheduled.
        for i in 0..self.migrations.len() {
            let migration = &self.migrations[i];
            if !migration.accepted() {
                continue;
            }
            if let Script::ConductorError { after } = migration.script {
                if now - migration.started >= after {
                    // The record first; the server below, a moment later.
                    let migration = &mut self.migrations[i];
                    migration.ended = Some(now);
                    migration.set_status("error", now);
                }
                continue;
            }
            if now - migration.started >= self.scheduling {
                let at = migration.started + self.scheduling;
                let source = migration.source.clone();
                let full = self
                    .nova_live_limit
                    .is_some_and(|limit| self.running_live_from(&source) >= limit);
                let migration = &mut self.migrations[i];
                migration.started = at;
                migration.set_status(if full { "queued" } else { "running" }, at);
                self.note_in_flight(&source);
            }
        }
        self.conductor_sets_errored_servers(now);
        self.power_off_due(now);
        for i in 0..self.migrations.len() {
            let migration = &self.migrations[i];
            // Queued ones are not moving: they start in `start_queued`.
            if !migration.moving() {
                continue;
            }
            let elapsed = now - migration.started;
            let ended_at = |after: Duration| (migration.started + after).min(now);
            match migration.script {
                Script::Complete { after } if elapsed >= after => {
                    let at = ended_at(after);
                    self.land(i, now);
                    self.start_queued(i, at);
                }
                Script::Fail { after } if elapsed >= after => {
                    let at = ended_at(after);
                    self.end_on_source(i, "error", now);
                    self.start_queued(i, at);
                }
                Script::DestinationLost { after } if elapsed >= after => {
                    let migration = &mut self.migrations[i];
                    migration.ended = Some(now);
                    migration.set_status("completed", now);
                }
                _ => {}
            }
        }
    }

    /// Ends the `os-stop`s whose time has come: the server is SHUTOFF.
    fn power_off_due(&mut self, now: Instant) {
        for vm in self.vms.values_mut() {
            if vm.powering_off_until.is_some_and(|until| until <= now) {
                vm.powering_off_until = None;
                vm.server.status = "SHUTOFF".into();
                vm.server.task_state = None;
                vm.server.running = false;
            }
        }
    }

    /// The server, with its tags readable (compute API 2.26), for a tag call.
    fn taggable(&mut self, server_id: &str) -> ComputeResult<&mut Server> {
        if !self.tags_supported {
            return Err(ComputeError::Unsupported(
                "tagging a server needs compute API 2.26; this cloud offers up to 2.25".into(),
            ));
        }
        self.vms
            .get_mut(server_id)
            .map(|vm| &mut vm.server)
            .ok_or_else(|| ComputeError::Other(format!("server {server_id}: HTTP 404")))
    }

    /// Live migrations from `source` running now (not queued, not ended).
    fn running_live_from(&self, source: &str) -> usize {
        self.migrations
            .iter()
            .filter(|m| m.kind == LIVE && m.source == source && m.moving())
            .count()
    }

    /// A slot freed on the source of migration `i`, at `at`: Nova starts its oldest queued live migration.
    pub(crate) fn start_queued(&mut self, i: usize, at: Instant) {
        let source = self.migrations[i].source.clone();
        if self
            .nova_live_limit
            .is_some_and(|limit| self.running_live_from(&source) >= limit)
        {
            return;
        }
        if let Some(next) = self.migrations.iter_mut().find(|m| m.source == source && m.queued()) {
            // Not before it reached the queue.
            next.started = at.max(next.started);
            next.set_status("running", next.started);
        }
        self.note_in_flight(&source);
    }

    fn note_in_flight(&mut self, source: &str) {
        let in_flight = self
            .migrations
            .iter()
            .filter(|m| m.source == source && m.in_flight())
            .count();
        let queued = self
            .migrations
            .iter()
            .filter(|m| m.source == source && m.queued())
            .count();
        self.calls.max_in_flight = self.calls.max_in_flight.max(in_flight);
        self.calls.max_queued = self.calls.max_queued.max(queued);
    }

    /// The move succeeded: the server is on the destination (a cold-migrated one in VERIFY_RESIZE).
    pub(crate) fn land(&mut self, i: usize, now: Instant) {
        let migration = &mut self.migrations[i];
        migration.ended = Some(now);
        migration.set_status(
            if migration.kind == LIVE {
                "completed"
            } else {
                "finished"
            },
            now,
        );
        if let Some(vm) = self.vms.get_mut(&migration.server_id) {
            vm.server.host = Some(migration.dest.clone());
            vm.server.task_state = None;
            if migration.kind == COLD {
                vm.server.status = "VERIFY_RESIZE".into();
            }
        }
    }

    /// Nova's conductor writes a failed migration's record, then its server
    /// (ERROR, no task state): 13 ms apart on the lab, exaggerated here to
    /// [`CONDUCTOR_WRITES_APART`] so that a read can fall in between.
    fn conductor_sets_errored_servers(&mut self, now: Instant) {
        for migration in &self.migrations {
            let Some(ended) = migration.ended else { continue };
            if !matches!(migration.script, Script::ConductorError { .. }) || now - ended < CONDUCTOR_WRITES_APART {
                continue;
            }
            let newest = self.migrations.iter().rfind(|m| m.server_id == migration.server_id);
            if newest.map(|m| &m.id) != Some(&migration.id) {
                continue;
            }
            if let Some(vm) = self.vms.get_mut(&migration.server_id)
                && vm.server.task_state.is_some()
            {
                vm.server.status = "ERROR".into();
                vm.server.task_state = None;
            }
        }
    }

    /// The move failed or was cancelled: the server keeps running on its source, no task.
    pub(crate) fn end_on_source(&mut self, i: usize, status: &'static str, now: Instant) {
        let migration = &mut self.migrations[i];
        migration.ended = Some(now);
        migration.set_status(status, now);
        if let Some(vm) = self.vms.get_mut(&migration.server_id) {
            vm.server.task_state = None;
        }
    }

    /// What the API does on `os-migrateLive` / `migrate`: refuse (409) a server that is busy or in the wrong state,
    /// else set the task state at once and let the conductor schedule and move it.
    pub(crate) fn start_migration(
        &mut self,
        server_id: &str,
        kind: &'static str,
        now: Instant,
        asked: Option<&str>,
    ) -> ComputeResult<()> {
        let Some(vm) = self.vms.get(server_id) else {
            return Err(ComputeError::Other(format!(
                "404: instance {server_id} could not be found"
            )));
        };
        let (action, allowed, task) = if kind == LIVE {
            ("os-migrateLive", ["ACTIVE", "PAUSED"], "migrating")
        } else {
            ("migrate", ["ACTIVE", "SHUTOFF"], "resize_prep")
        };
        if let Some(busy) = &vm.server.task_state {
            return Err(ComputeError::Conflict(format!(
                "Cannot '{action}' instance {server_id} while it is in task_state {busy}"
            )));
        }
        if !allowed.contains(&vm.server.status.as_str()) {
            return Err(ComputeError::Conflict(format!(
                "Cannot '{action}' instance {server_id} while it is in vm_state {}",
                vm.server.status
            )));
        }
        let source = vm.server.host.clone().unwrap_or_default();
        let candidates: Vec<String> = self
            .other_hosts
            .iter()
            .filter(|h| h.host != source && asked.is_none_or(|asked| h.host == asked))
            .map(|h| h.host.clone())
            .collect();
        let dest = candidates.get(self.placed % candidates.len().max(1)).cloned();
        self.placed += 1;

        // NoValidHost fails in the conductor, before any compute queues it.
        let nova_queues = kind == LIVE
            && dest.is_some()
            && self
                .nova_live_limit
                .is_some_and(|limit| self.running_live_from(&source) >= limit);
        let vm = self.vms.get_mut(server_id).expect("looked up above");
        let mut script = vm.next_script();
        if dest.is_none() {
            // NoValidHost: the API has accepted the request; the conductor then fails it.
            script = Script::Fail { after: Duration::ZERO };
        }
        vm.server.task_state = Some(task.into());
        vm.reset_since_migration = false;
        let status = match kind {
            LIVE if matches!(script, Script::ConductorError { .. }) || !self.scheduling.is_zero() => "accepted",
            LIVE if nova_queues => "queued",
            LIVE => "running",
            _ => "migrating",
        };
        let migration = FakeMigration {
            id: (self.migrations.len() + 1).to_string(),
            server_id: server_id.into(),
            kind,
            status,
            source: source.clone(),
            dest: dest.unwrap_or_default(),
            script,
            progress: vm.progress,
            total_bytes: vm.server.flavor.ram_mb * MIB,
            started: now,
            ended: None,
            // The API creates the record; the conductor writes it again at
            // once unless it is still scheduling it (`accepted`).
            updated: (status != "accepted").then_some(now),
            status_before: vm.server.status.clone(),
        };
        self.migrations.push(migration);
        self.note_in_flight(&source);
        Ok(())
    }

    /// The running live migration `migration_id` of `server_id` (or a queued
    /// one, when `queued_too`); Nova answers 400 for any other state.
    pub(crate) fn running_live(&self, server_id: &str, migration_id: &str, queued_too: bool) -> ComputeResult<usize> {
        let Some(i) = self
            .migrations
            .iter()
            .position(|m| m.id == migration_id && m.server_id == server_id && m.kind == LIVE)
        else {
            return Err(ComputeError::Other(format!("404: migration {migration_id} not found")));
        };
        if self.migrations[i].status != "running" && !(queued_too && self.migrations[i].queued()) {
            return Err(ComputeError::Conflict(format!(
                "Migration {migration_id} state of instance {server_id} is {}",
                self.migrations[i].status
            )));
        }
        Ok(i)
    }
}

/// A destination with `free_ram_mb` and plenty of vCPU and disk.
pub(crate) fn roomy(host: &str, free_ram_mb: u64) -> HostCapacity {
    let free = [("MEMORY_MB", free_ram_mb), ("VCPU", 128), ("DISK_GB", 4000)]
        .into_iter()
        .map(|(class, amount)| (class.to_string(), amount))
        .collect();
    HostCapacity {
        host: host.into(),
        free,
        shared: BTreeMap::new(),
    }
}

/// An in-memory Nova with one compute service to drain ([`SOURCE`]) and other hypervisors to move to.
pub(crate) struct FakeCloud {
    pub(crate) epoch: Instant,
    pub(crate) state: Mutex<Cloud>,
}

impl FakeCloud {
    pub(crate) fn new() -> Self {
        let big = |host: &str| roomy(host, 256 * 1024);
        FakeCloud {
            epoch: Instant::now(),
            state: Mutex::new(Cloud {
                service: ComputeService {
                    id: "7b8a1a4e-0000-4000-8000-000000000001".into(),
                    host: SOURCE.into(),
                    enabled: true,
                    up: true,
                    disabled_reason: None,
                    zone: Some("nova".into()),
                },
                vms: BTreeMap::new(),
                migrations: Vec::new(),
                other_hosts: vec![big("cmp-dst-1"), big("cmp-dst-2")],
                placed: 0,
                shared: BTreeMap::new(),
                allocations: BTreeMap::new(),
                elsewhere: BTreeMap::new(),
                placement_down: false,
                nova_down: false,
                unusable: BTreeMap::new(),
                after_listing: None,
                nova_live_limit: None,
                aborts_queued: false,
                scheduling: Duration::ZERO,
                abort_lost: Vec::new(),
                no_changes_since: false,
                tags_supported: true,
                stop_takes: Duration::from_secs(3),
                tag_writes_fail: false,
                slow_reads: BTreeMap::new(),
                calls: Calls::default(),
            }),
        }
    }

    /// The state, brought up to the current (virtual) time first.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Cloud> {
        let mut cloud = self.state.lock().expect("fake cloud lock");
        cloud.settle(Instant::now());
        cloud
    }

    /// The wall-clock time Nova would write for the virtual instant `at`.
    fn timestamp(&self, at: Instant) -> jiff::Timestamp {
        let base = jiff::Timestamp::from_second(1_800_000_000).expect("a time of this century");
        let since = jiff::SignedDuration::try_from(at - self.epoch).expect("a test lasts less than centuries");
        base.checked_add(since).expect("a time of this century")
    }

    /// Virtual time since the test started.
    pub(crate) fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    // Setting the scene.

    /// A server on [`SOURCE`] with 2 vCPU and 20 GiB disk.
    pub(crate) fn add_vm(&self, id: &str, status: &str, ram_mb: u64) {
        let server = Server {
            id: id.into(),
            name: format!("vm-{id}"),
            project_id: "tenant-1".into(),
            status: status.into(),
            task_state: None,
            host: Some(SOURCE.into()),
            running: status == "ACTIVE",
            tags: Some(vec![]),
            flavor: Flavor {
                ram_mb,
                vcpus: 2,
                disk_gb: 20,
            },
        };
        let vm = FakeVm {
            server,
            scripts: VecDeque::new(),
            progress: Progress::Reported,
            reset_since_migration: false,
            powering_off_until: None,
        };
        self.lock().vms.insert(id.into(), vm);
    }

    /// The VM's owner sets a server tag.
    pub(crate) fn tag(&self, id: &str, tag: &str) {
        let mut cloud = self.lock();
        let tags = cloud
            .vms
            .get_mut(id)
            .expect("known VM")
            .server
            .tags
            .get_or_insert_with(Vec::new);
        tags.push(tag.into());
    }

    /// The compute API is older than 2.26: servers show no tags, none can be set.
    pub(crate) fn without_tags(&self) {
        let mut cloud = self.lock();
        cloud.tags_supported = false;
        for vm in cloud.vms.values_mut() {
            vm.server.tags = None;
        }
    }

    /// The VM's owner stops it (or starts it again, `running`).
    pub(crate) fn power_by_owner(&self, id: &str, running: bool) {
        let mut cloud = self.lock();
        let server = &mut cloud.vms.get_mut(id).expect("known VM").server;
        server.status = if running { "ACTIVE" } else { "SHUTOFF" }.into();
        server.running = running;
    }

    /// How the server's successive migrations go; the last script repeats.
    pub(crate) fn script(&self, id: &str, scripts: &[Script]) {
        self.lock().vms.get_mut(id).expect("known VM").scripts = scripts.iter().copied().collect();
    }

    pub(crate) fn progress(&self, id: &str, progress: Progress) {
        self.lock().vms.get_mut(id).expect("known VM").progress = progress;
    }

    /// Replaces the other hypervisors by these, each with `free_ram_mb` and plenty of everything else.
    pub(crate) fn other_hosts(&self, hosts: &[(&str, u64)]) {
        self.lock().other_hosts = hosts
            .iter()
            .map(|(host, free_ram_mb)| roomy(host, *free_ram_mb))
            .collect();
    }

    /// Another agent evacuates `host` at the same time; these VMs (RAM in MB) are still on it.
    pub(crate) fn evacuated_elsewhere(&self, host: &str, vms: &[(&str, u64)]) {
        let held = vms
            .iter()
            .map(|(id, ram)| (id.to_string(), BTreeMap::from([("MEMORY_MB".to_string(), *ram)])))
            .collect();
        self.lock().elsewhere.insert(host.to_string(), held);
    }

    /// Nova holds live migrations beyond `limit` per host queued (its
    /// `max_concurrent_live_migrations`), and queued ones can be aborted (2.65).
    pub(crate) fn nova_queues_beyond(&self, limit: Option<usize>) {
        let mut cloud = self.lock();
        cloud.nova_live_limit = limit;
        cloud.aborts_queued = true;
    }

    /// Every read of `server` takes `takes` to answer.
    pub(crate) fn server_reads_take(&self, server: &str, takes: Duration) {
        self.lock().slow_reads.insert(server.into(), takes);
    }

    /// Nova's conductor takes `scheduling` to schedule each live migration
    /// before a compute queues or runs it.
    pub(crate) fn nova_schedules_for(&self, scheduling: Duration) {
        self.lock().scheduling = scheduling;
    }

    /// When each live migration of `server` started running in Nova (after any wait in its queue).
    pub(crate) fn running_since(&self, server: &str) -> Vec<Duration> {
        self.lock()
            .migrations
            .iter()
            .filter(|m| m.server_id == server && m.kind == LIVE)
            .map(|m| m.started - self.epoch)
            .collect()
    }

    // Someone else acting on the cloud.

    /// Makes `change` right after the next host listing is answered, before the engine can act on it.
    pub(crate) fn after_next_listing(&self, change: impl FnOnce(&mut Cloud) + Send + 'static) {
        self.lock().after_listing = Some(Box::new(change));
    }

    pub(crate) fn placement_down(&self) {
        self.lock().placement_down = true;
    }

    /// Nova's API unreachable (`true`) or back (`false`): every call fails meanwhile.
    pub(crate) fn set_nova_down(&self, down: bool) {
        self.lock().nova_down = down;
    }

    fn reachable(&self) -> ComputeResult<()> {
        match self.lock().nova_down {
            true => Err(ComputeError::Other(
                "GET http://nova.test/v2.1: connect: connection refused".into(),
            )),
            false => Ok(()),
        }
    }

    /// Sets the state of another host's nova-compute service.
    pub(crate) fn other_service(&self, host: &str, enabled: bool, up: bool) {
        self.lock().unusable.insert(host.into(), (enabled, up));
    }

    pub(crate) fn disable_by_operator(&self, reason: &str) {
        let mut cloud = self.lock();
        cloud.service.enabled = false;
        cloud.service.disabled_reason = Some(reason.into());
    }

    /// An operator (or an earlier run) live-migrates the server: not one of the engine's calls.
    pub(crate) fn live_migrate_by_operator(&self, id: &str) {
        self.lock()
            .start_migration(id, LIVE, Instant::now(), None)
            .expect("operator's migration starts");
    }

    /// A user deletes the server; its running migrations end with it.
    pub(crate) fn delete_vm(&self, id: &str) {
        let now = Instant::now();
        let mut cloud = self.lock();
        cloud.vms.remove(id);
        for migration in cloud.migrations.iter_mut().filter(|m| m.server_id == id && m.moving()) {
            migration.set_status("error", now);
            migration.ended = Some(now);
        }
    }

    // Looking at the outcome.

    pub(crate) fn calls(&self) -> Calls {
        self.lock().calls.clone()
    }

    /// The server, `None` once deleted.
    pub(crate) fn try_vm(&self, id: &str) -> Option<Server> {
        self.lock().vms.get(id).map(|vm| vm.server.clone())
    }

    pub(crate) fn vm(&self, id: &str) -> Server {
        self.lock().vms.get(id).expect("known VM").server.clone()
    }

    pub(crate) fn service(&self) -> ComputeService {
        self.lock().service.clone()
    }

    /// Statuses of the server's migration records, oldest first.
    pub(crate) fn migration_statuses(&self, id: &str) -> Vec<&'static str> {
        self.lock()
            .migrations
            .iter()
            .filter(|m| m.server_id == id)
            .map(|m| m.status)
            .collect()
    }
}

impl Compute for FakeCloud {
    async fn find_service(&self, host: &str) -> ComputeResult<Option<ComputeService>> {
        self.reachable()?;
        let cloud = self.lock();
        Ok(Some(cloud.service.clone()).filter(|s| s.host == host))
    }

    async fn disable_service(&self, service: &ComputeService, reason: &str) -> ComputeResult<ComputeService> {
        self.reachable()?;
        let mut cloud = self.lock();
        cloud.calls.disable.push(reason.into());
        assert_eq!(service.id, cloud.service.id, "disables the service it looked up");
        cloud.service.enabled = false;
        cloud.service.disabled_reason = Some(reason.into());
        Ok(cloud.service.clone())
    }

    async fn enable_service(&self, service: &ComputeService) -> ComputeResult<ComputeService> {
        self.reachable()?;
        let mut cloud = self.lock();
        cloud.calls.enable += 1;
        assert_eq!(service.id, cloud.service.id, "enables the service it looked up");
        cloud.service.enabled = true;
        cloud.service.disabled_reason = None;
        Ok(cloud.service.clone())
    }

    async fn servers_on_host(&self, host: &str) -> ComputeResult<Vec<Server>> {
        self.reachable()?;
        let mut cloud = self.lock();
        let servers = cloud
            .vms
            .values()
            .filter(|vm| vm.server.host.as_deref() == Some(host))
            .map(|vm| vm.server.clone())
            .collect();
        if let Some(change) = cloud.after_listing.take() {
            change(&mut cloud);
        }
        Ok(servers)
    }

    /// One look, however many servers: as Nova's hypervisor with its servers.
    async fn servers_still_on(&self, host: &str) -> ComputeResult<std::collections::HashSet<String>> {
        self.reachable()?;
        let mut cloud = self.lock();
        cloud.calls.host_looks += 1;
        Ok(cloud
            .vms
            .values()
            .filter(|vm| vm.server.host.as_deref() == Some(host))
            .map(|vm| vm.server.id.clone())
            .collect())
    }

    async fn server(&self, id: &str) -> ComputeResult<Option<Server>> {
        self.reachable()?;
        let slow = self.lock().slow_reads.get(id).copied();
        if let Some(takes) = slow {
            sleep(takes).await;
        }
        let mut cloud = self.lock();
        cloud.calls.server_reads.push(id.into());
        Ok(cloud.vms.get(id).map(|vm| vm.server.clone()))
    }

    async fn live_migrate(&self, server_id: &str, destination: Option<&str>) -> ComputeResult<()> {
        self.reachable()?;
        let at = self.now();
        let mut cloud = self.lock();
        cloud.calls.live_migrate.push((server_id.into(), at));
        cloud.calls.starts.push(server_id.into());
        cloud.calls.live_destinations.push(destination.map(str::to_string));
        cloud.start_migration(server_id, LIVE, Instant::now(), destination)
    }

    async fn cold_migrate(&self, server_id: &str) -> ComputeResult<()> {
        self.reachable()?;
        let at = self.now();
        let mut cloud = self.lock();
        cloud.calls.cold_migrate.push((server_id.into(), at));
        cloud.calls.starts.push(server_id.into());
        cloud.start_migration(server_id, COLD, Instant::now(), None)
    }

    async fn confirm_resize(&self, server_id: &str) -> ComputeResult<()> {
        self.reachable()?;
        let mut cloud = self.lock();
        cloud.calls.confirm_resize.push(server_id.into());
        let cloud = &mut *cloud;
        let Some(vm) = cloud.vms.get_mut(server_id) else {
            return Err(ComputeError::Other(format!(
                "404: instance {server_id} could not be found"
            )));
        };
        if vm.server.status != "VERIFY_RESIZE" {
            return Err(ComputeError::Conflict(format!(
                "Cannot 'confirmResize' instance {server_id} while it is in vm_state {}",
                vm.server.status
            )));
        }
        let migration = cloud
            .migrations
            .iter_mut()
            .rev()
            .find(|m| m.server_id == server_id && m.kind == COLD && m.status == "finished")
            .expect("a VERIFY_RESIZE server has a finished migration");
        migration.set_status("confirmed", Instant::now());
        vm.server.status = migration.status_before.clone();
        vm.server.task_state = None;
        Ok(())
    }

    /// Like Nova's `GET /servers/{id}/migrations`: not the `accepted` ones
    /// (measured on the lab: a migration is invisible there while the
    /// conductor schedules it, so it cannot be aborted then either).
    async fn in_progress_migrations(&self, server_id: &str) -> ComputeResult<Vec<Migration>> {
        self.reachable()?;
        let now = Instant::now();
        let mut cloud = self.lock();
        cloud.calls.progress_reads += 1;
        Ok(cloud
            .migrations
            .iter()
            .rev()
            .filter(|m| m.server_id == server_id && m.kind == LIVE && (m.moving() || m.queued()))
            .map(|m| m.record(now))
            .collect())
    }

    async fn migration_history(&self, server_id: &str, migration_type: &str) -> ComputeResult<Vec<Migration>> {
        self.reachable()?;
        let now = Instant::now();
        let mut cloud = self.lock();
        cloud.calls.history_reads += 1;
        Ok(cloud
            .migrations
            .iter()
            .rev()
            .filter(|m| m.server_id == server_id && m.kind == migration_type)
            .map(|m| m.record(now))
            .collect())
    }

    async fn unconfirmed_migrations_from(&self, host: &str) -> ComputeResult<Vec<String>> {
        self.reachable()?;
        let cloud = self.lock();
        let mut ids: Vec<String> = cloud
            .migrations
            .iter()
            .filter(|m| m.kind == COLD && m.status == "finished" && m.source == host)
            .map(|m| m.server_id.clone())
            .collect();
        ids.dedup();
        Ok(ids)
    }

    async fn failed_before_any_hypervisor(&self, server_id: &str) -> ComputeResult<bool> {
        self.reachable()?;
        let cloud = self.lock();
        if cloud.vms.get(server_id).is_none_or(|vm| vm.reset_since_migration) {
            return Ok(false);
        }
        Ok(cloud
            .migrations
            .iter()
            .rfind(|m| m.server_id == server_id)
            .is_some_and(|m| {
                m.kind == LIVE && m.status == "error" && matches!(m.script, Script::ConductorError { .. })
            }))
    }

    async fn reset_to_active(&self, server_id: &str) -> ComputeResult<()> {
        self.reachable()?;
        let mut cloud = self.lock();
        cloud.calls.reset_to_active.push(server_id.into());
        let Some(vm) = cloud.vms.get_mut(server_id) else {
            return Err(ComputeError::Other(format!(
                "404: instance {server_id} could not be found"
            )));
        };
        vm.server.status = "ACTIVE".into();
        vm.server.task_state = None;
        vm.reset_since_migration = true;
        Ok(())
    }

    async fn force_complete(&self, server_id: &str, migration_id: &str) -> ComputeResult<()> {
        self.reachable()?;
        let at = self.now();
        let mut cloud = self.lock();
        cloud.calls.force_complete.push((server_id.into(), at));
        let i = cloud.running_live(server_id, migration_id, false)?;
        let now = Instant::now();
        cloud.land(i, now);
        cloud.start_queued(i, now);
        Ok(())
    }

    async fn abort_migration(&self, server_id: &str, migration_id: &str) -> ComputeResult<()> {
        self.reachable()?;
        let at = self.now();
        let mut cloud = self.lock();
        cloud.calls.abort.push((server_id.into(), at));
        let aborts_queued = cloud.aborts_queued;
        let i = cloud.running_live(server_id, migration_id, aborts_queued)?;
        if let Some(lost) = cloud.abort_lost.iter().position(|s| s == server_id) {
            cloud.abort_lost.remove(lost);
            return Ok(());
        }
        let was_running = !cloud.migrations[i].queued();
        let now = Instant::now();
        cloud.end_on_source(i, "cancelled", now);
        if was_running {
            cloud.start_queued(i, now);
        }
        Ok(())
    }

    async fn compute_services(&self) -> ComputeResult<Vec<ComputeService>> {
        self.reachable()?;
        let cloud = self.lock();
        let others = cloud.other_hosts.iter().map(|h| {
            let (enabled, up) = cloud.unusable.get(&h.host).copied().unwrap_or((true, true));
            ComputeService {
                id: format!("svc-{}", h.host),
                host: h.host.clone(),
                enabled,
                up,
                disabled_reason: None,
                zone: Some("nova".into()),
            }
        });
        Ok(std::iter::once(cloud.service.clone()).chain(others).collect())
    }

    async fn spare_capacity(&self, source: &str, hosts: &[String]) -> ComputeResult<Capacity> {
        self.reachable()?;
        let cloud = self.lock();
        if cloud.placement_down {
            return Err(ComputeError::Other("placement: connection refused".into()));
        }
        if let Some(held) = cloud.elsewhere.get(source) {
            assert!(
                hosts.is_empty(),
                "a host evacuated elsewhere is asked for what it holds only"
            );
            return Ok(Capacity {
                allocations: held.clone(),
                ..Capacity::default()
            });
        }
        assert_eq!(source, SOURCE, "the drained host's allocations are asked for");
        assert!(!hosts.iter().any(|h| h == SOURCE), "the drained host is no destination");
        Ok(Capacity {
            hosts: cloud
                .other_hosts
                .iter()
                .filter(|h| hosts.contains(&h.host))
                .cloned()
                .collect(),
            shared: cloud.shared.clone(),
            allocations: cloud.allocations.clone(),
        })
    }

    fn aborts_queued_migrations(&self) -> bool {
        self.lock().aborts_queued
    }

    fn reads_server_tags(&self) -> bool {
        self.lock().tags_supported
    }

    async fn add_tag(&self, server_id: &str, tag: &str) -> ComputeResult<()> {
        self.reachable()?;
        let mut cloud = self.lock();
        cloud.calls.lifecycle.push(format!("tag {server_id} {tag}"));
        if cloud.tag_writes_fail {
            return Err(ComputeError::Other(format!(
                "PUT /servers/{server_id}/tags/{tag}: HTTP 500"
            )));
        }
        let tags = cloud.taggable(server_id)?.tags.get_or_insert_with(Vec::new);
        if !tags.iter().any(|t| t == tag) {
            tags.push(tag.into());
        }
        Ok(())
    }

    async fn remove_tag(&self, server_id: &str, tag: &str) -> ComputeResult<()> {
        self.reachable()?;
        let mut cloud = self.lock();
        cloud.calls.lifecycle.push(format!("untag {server_id} {tag}"));
        if let Some(tags) = cloud.taggable(server_id)?.tags.as_mut() {
            tags.retain(|t| t != tag);
        }
        Ok(())
    }

    /// As Nova: only an ACTIVE server with no task; it powers off over `stop_takes`.
    async fn stop_server(&self, server_id: &str) -> ComputeResult<()> {
        self.reachable()?;
        let mut cloud = self.lock();
        cloud.calls.lifecycle.push(format!("stop {server_id}"));
        let until = Instant::now() + cloud.stop_takes;
        let vm = cloud
            .vms
            .get_mut(server_id)
            .ok_or_else(|| ComputeError::Other(format!("server {server_id}: HTTP 404")))?;
        if vm.server.status != "ACTIVE" || vm.server.task_state.is_some() {
            return Err(ComputeError::Conflict(format!(
                "Cannot 'stop' instance {server_id} while it is in vm_state {}",
                vm.server.status.to_lowercase()
            )));
        }
        vm.server.task_state = Some("powering-off".into());
        vm.powering_off_until = Some(until);
        Ok(())
    }

    /// As Nova: only a SHUTOFF server with no task; it runs at once here.
    async fn start_server(&self, server_id: &str) -> ComputeResult<()> {
        self.reachable()?;
        let mut cloud = self.lock();
        cloud.calls.lifecycle.push(format!("start {server_id}"));
        let vm = cloud
            .vms
            .get_mut(server_id)
            .ok_or_else(|| ComputeError::Other(format!("server {server_id}: HTTP 404")))?;
        if vm.server.status != "SHUTOFF" || vm.server.task_state.is_some() {
            return Err(ComputeError::Conflict(format!(
                "Cannot 'start' instance {server_id} while it is in vm_state {}",
                vm.server.status.to_lowercase()
            )));
        }
        vm.server.status = "ACTIVE".into();
        vm.server.running = true;
        Ok(())
    }

    fn lists_migration_changes(&self) -> bool {
        !self.lock().no_changes_since
    }

    /// As Nova does it: `updated_at` in whole seconds compared with `>=`,
    /// records never updated since their creation left out, and those of
    /// deleted servers too. Marks carry no overlap: one clock here.
    async fn migrations_changed(&self, host: &str, since: Option<ChangeMark>) -> ComputeResult<MigrationChanges> {
        self.reachable()?;
        let now = Instant::now();
        let mut cloud = self.lock();
        if cloud.no_changes_since {
            return Err(ComputeError::Unsupported("changes-since needs compute API 2.59".into()));
        }
        cloud.calls.change_reads += 1;
        let second = |at: Instant| self.timestamp(at).as_second();
        let since = since.map_or_else(|| second(now) - 2, |mark| mark.0.as_second());
        let migrations = cloud
            .migrations
            .iter()
            .rev()
            .filter(|m| m.source == host && cloud.vms.contains_key(&m.server_id))
            .filter(|m| m.updated.is_some_and(|at| second(at) >= since))
            .map(|m| m.record(now))
            .collect();
        Ok(MigrationChanges {
            migrations,
            next: ChangeMark(jiff::Timestamp::from_second(second(now)).expect("a time of this century")),
        })
    }

    /// The fake's VMs are all in project `tenant-1`, named `demo`; any other
    /// is unknown to Keystone.
    async fn project_name(&self, project_id: &str) -> ComputeResult<String> {
        self.reachable()?;
        match project_id {
            "tenant-1" => Ok("demo".into()),
            other => Err(ComputeError::Other(format!("project {other}: not found"))),
        }
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

pub(crate) struct Quiet;

impl Observer for Quiet {
    fn event(&self, _: &Event<'_>) {}
}

pub(crate) fn target() -> Target {
    Target {
        node: NODE.into(),
        host: SOURCE.into(),
        run: "agent drainer-test".into(),
    }
}

/// One evacuation that nobody stops.
pub(crate) async fn evacuate(cloud: &FakeCloud, settings: &Settings) -> Report {
    let (_never_stop, stop) = watch::channel(StopRequest::Continue);
    Engine::new(cloud, settings, &Quiet)
        .evacuate(&target(), stop)
        .await
        .expect("the evacuation runs")
}

/// One evacuation that is asked to `request` a stop `after` this long.
pub(crate) async fn evacuate_stopped(
    cloud: &FakeCloud,
    settings: &Settings,
    after: Duration,
    request: StopRequest,
) -> Report {
    let (stop, stop_rx) = watch::channel(StopRequest::Continue);
    let target = target();
    let engine = Engine::new(cloud, settings, &Quiet);
    let (report, ()) = tokio::join!(engine.evacuate(&target, stop_rx), async {
        sleep(after).await;
        stop.send(request).expect("the engine listens");
    });
    report.expect("the evacuation runs")
}

pub(crate) fn vm<'r>(report: &'r Report, id: &str) -> &'r VmReport {
    report
        .vms
        .iter()
        .find(|vm| vm.id == id)
        .unwrap_or_else(|| panic!("{id} is in the report"))
}

pub(crate) fn reason<'r>(report: &'r Report, id: &str) -> &'r str {
    vm(report, id).reason.as_deref().unwrap_or_default()
}

#[track_caller]
pub(crate) fn assert_within(at: Duration, from: Duration, to: Duration) {
    assert!(from <= at && at <= to, "{at:?} is not within {from:?}..={to:?}");
}
