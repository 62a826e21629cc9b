//! Tests of the evacuation engine against [`FakeCloud`], an in-memory Nova, on
//! tokio's paused clock: the engine's sleeps advance virtual time at once, so
//! every timing below is exact and every test runs in milliseconds.
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
const SOURCE: &str = "cmp-src";
const NODE: &str = "node-a";
/// Nova's `migration_type`s.
const LIVE: &str = "live-migration";
const COLD: &str = "migration";
const MIB: u64 = 1024 * 1024;

fn secs(seconds: u64) -> Duration {
    Duration::from_secs(seconds)
}

fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// How one migration of a server goes, as the fake's hypervisors play it.
#[derive(Clone, Copy, Debug)]
enum Script {
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
}

/// What a migration is given when its server has no script.
const DEFAULT_SCRIPT: Script = Script::Complete {
    after: Duration::from_secs(30),
};

/// What the in-progress migration records say about memory; drivers differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Progress {
    /// `memory_total_bytes` and `memory_remaining_bytes` filled in, as libvirt does.
    Reported,
    /// Both zero: a driver that tracks nothing.
    Zero,
    /// Both null.
    Missing,
}

struct FakeVm {
    server: Server,
    /// How its successive migrations go; the last one repeats for ever.
    scripts: VecDeque<Script>,
    progress: Progress,
}

impl FakeVm {
    fn next_script(&mut self) -> Script {
        if self.scripts.len() > 1 {
            self.scripts.pop_front().unwrap_or(DEFAULT_SCRIPT)
        } else {
            self.scripts.front().copied().unwrap_or(DEFAULT_SCRIPT)
        }
    }
}

/// A migration record, as `os-migrations` keeps it.
struct FakeMigration {
    id: String,
    server_id: String,
    /// [`LIVE`] or [`COLD`].
    kind: &'static str,
    /// Live: running -> completed | error | cancelled.
    /// Cold: migrating -> finished (server in VERIFY_RESIZE) -> confirmed, or -> error.
    status: &'static str,
    source: String,
    dest: String,
    script: Script,
    progress: Progress,
    total_bytes: u64,
    started: Instant,
    ended: Option<Instant>,
    /// The server's status before a cold migration; the confirmation brings it back (SHUTOFF stays SHUTOFF).
    status_before: String,
}

impl FakeMigration {
    /// Still moving, by itself, towards an end.
    fn moving(&self) -> bool {
        matches!(self.status, "running" | "migrating")
    }

    /// Occupies the source: moving, or a cold migration waiting for its confirmation.
    fn in_flight(&self) -> bool {
        self.moving() || self.status == "finished"
    }

    fn remaining_bytes(&self, now: Instant) -> u64 {
        if self.status == "completed" {
            return 0;
        }
        let elapsed = self.ended.unwrap_or(now) - self.started;
        let total = self.total_bytes;
        let copied = match self.script {
            Script::Complete { after } | Script::Fail { after } | Script::DestinationLost { after } => {
                share(total, elapsed.min(after), after)
            }
            Script::Stall { progress_for } => share(total / 2, elapsed.min(progress_for), progress_for),
            Script::Thrash { period } => {
                let into_pass = Duration::from_nanos((elapsed.as_nanos() % period.as_nanos().max(1)) as u64);
                total / 2 + share(total / 4, into_pass, period)
            }
        };
        total - copied
    }

    fn record(&self, now: Instant) -> Migration {
        let (remaining, total) = match self.progress {
            Progress::Reported => (Some(self.remaining_bytes(now)), Some(self.total_bytes)),
            Progress::Zero => (Some(0), Some(0)),
            Progress::Missing => (None, None),
        };
        Migration {
            id: self.id.clone(),
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
fn share(amount: u64, part: Duration, whole: Duration) -> u64 {
    if whole.is_zero() {
        return amount;
    }
    (u128::from(amount) * part.as_nanos() / whole.as_nanos()) as u64
}

/// Every call the engine made, for the tests to look at. Times are virtual, from the fake's creation (the test's start).
#[derive(Clone, Debug, Default)]
struct Calls {
    live_migrate: Vec<(String, Duration)>,
    cold_migrate: Vec<(String, Duration)>,
    /// Every migration request, live or cold, in order.
    starts: Vec<String>,
    confirm_resize: Vec<String>,
    abort: Vec<(String, Duration)>,
    force_complete: Vec<(String, Duration)>,
    /// The reasons of every disable call.
    disable: Vec<String>,
    enable: usize,
    /// The most migrations in flight from the drained host at once (a cold one until confirmed).
    max_in_flight: usize,
}

impl Calls {
    fn live_migrate_times(&self, server: &str) -> Vec<Duration> {
        self.live_migrate
            .iter()
            .filter(|(id, _)| id == server)
            .map(|(_, at)| *at)
            .collect()
    }

    fn abort_times(&self, server: &str) -> Vec<Duration> {
        self.abort
            .iter()
            .filter(|(id, _)| id == server)
            .map(|(_, at)| *at)
            .collect()
    }
}

/// A change to the cloud made by someone other than the engine.
type CloudChange = Box<dyn FnOnce(&mut Cloud) + Send>;

struct Cloud {
    service: ComputeService,
    vms: BTreeMap<String, FakeVm>,
    /// Oldest first.
    migrations: Vec<FakeMigration>,
    /// The other hypervisors, as `spare_capacity` reports them and as the scheduler picks destinations.
    other_hosts: Vec<HostCapacity>,
    /// The scheduler places round-robin and ignores capacity: capacity is the engine's own pre-check.
    placed: usize,
    /// Placement is unreachable: `spare_capacity` fails.
    placement_down: bool,
    /// Other hosts' services that are disabled or down: (enabled, up).
    unusable: BTreeMap<String, (bool, bool)>,
    /// Someone else's change, made right after the next host listing is answered.
    after_listing: Option<CloudChange>,
    calls: Calls,
}

impl Cloud {
    /// Lets every moving migration end whose time has come.
    fn settle(&mut self, now: Instant) {
        for i in 0..self.migrations.len() {
            let migration = &self.migrations[i];
            if !migration.moving() {
                continue;
            }
            let elapsed = now - migration.started;
            match migration.script {
                Script::Complete { after } if elapsed >= after => self.land(i, now),
                Script::Fail { after } if elapsed >= after => self.end_on_source(i, "error", now),
                Script::DestinationLost { after } if elapsed >= after => {
                    let migration = &mut self.migrations[i];
                    migration.ended = Some(now);
                    migration.status = "completed";
                }
                _ => {}
            }
        }
    }

    /// The move succeeded: the server is on the destination (a cold-migrated one in VERIFY_RESIZE).
    fn land(&mut self, i: usize, now: Instant) {
        let migration = &mut self.migrations[i];
        migration.ended = Some(now);
        migration.status = if migration.kind == LIVE {
            "completed"
        } else {
            "finished"
        };
        if let Some(vm) = self.vms.get_mut(&migration.server_id) {
            vm.server.host = Some(migration.dest.clone());
            vm.server.task_state = None;
            if migration.kind == COLD {
                vm.server.status = "VERIFY_RESIZE".into();
            }
        }
    }

    /// The move failed or was cancelled: the server keeps running on its source, no task.
    fn end_on_source(&mut self, i: usize, status: &'static str, now: Instant) {
        let migration = &mut self.migrations[i];
        migration.ended = Some(now);
        migration.status = status;
        if let Some(vm) = self.vms.get_mut(&migration.server_id) {
            vm.server.task_state = None;
        }
    }

    /// What the API does on `os-migrateLive` / `migrate`: refuse (409) a server that is busy or in the wrong state,
    /// else set the task state at once and let the conductor schedule and move it.
    fn start_migration(&mut self, server_id: &str, kind: &'static str, now: Instant) -> ComputeResult<()> {
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
            .filter(|h| h.host != source)
            .map(|h| h.host.clone())
            .collect();
        let dest = candidates.get(self.placed % candidates.len().max(1)).cloned();
        self.placed += 1;

        let vm = self.vms.get_mut(server_id).expect("looked up above");
        let mut script = vm.next_script();
        if dest.is_none() {
            // NoValidHost: the API has accepted the request; the conductor then fails it.
            script = Script::Fail { after: Duration::ZERO };
        }
        vm.server.task_state = Some(task.into());
        let migration = FakeMigration {
            id: (self.migrations.len() + 1).to_string(),
            server_id: server_id.into(),
            kind,
            status: if kind == LIVE { "running" } else { "migrating" },
            source: source.clone(),
            dest: dest.unwrap_or_default(),
            script,
            progress: vm.progress,
            total_bytes: vm.server.flavor.ram_mb * MIB,
            started: now,
            ended: None,
            status_before: vm.server.status.clone(),
        };
        self.migrations.push(migration);
        let in_flight = self
            .migrations
            .iter()
            .filter(|m| m.source == source && m.in_flight())
            .count();
        self.calls.max_in_flight = self.calls.max_in_flight.max(in_flight);
        Ok(())
    }

    /// The running live migration `migration_id` of `server_id`; Nova answers 400 for any other state.
    fn running_live(&self, server_id: &str, migration_id: &str) -> ComputeResult<usize> {
        let Some(i) = self
            .migrations
            .iter()
            .position(|m| m.id == migration_id && m.server_id == server_id && m.kind == LIVE)
        else {
            return Err(ComputeError::Other(format!("404: migration {migration_id} not found")));
        };
        if self.migrations[i].status != "running" {
            return Err(ComputeError::Conflict(format!(
                "Migration {migration_id} state of instance {server_id} is {}",
                self.migrations[i].status
            )));
        }
        Ok(i)
    }
}

/// An in-memory Nova with one compute service to drain ([`SOURCE`]) and other hypervisors to move to.
struct FakeCloud {
    epoch: Instant,
    state: Mutex<Cloud>,
}

impl FakeCloud {
    fn new() -> Self {
        let big = |host: &str| HostCapacity {
            host: host.into(),
            free_ram_mb: 256 * 1024,
            free_vcpus: 128,
            free_disk_gb: 4000,
        };
        FakeCloud {
            epoch: Instant::now(),
            state: Mutex::new(Cloud {
                service: ComputeService {
                    id: "7b8a1a4e-0000-4000-8000-000000000001".into(),
                    host: SOURCE.into(),
                    enabled: true,
                    up: true,
                    disabled_reason: None,
                },
                vms: BTreeMap::new(),
                migrations: Vec::new(),
                other_hosts: vec![big("cmp-dst-1"), big("cmp-dst-2")],
                placed: 0,
                placement_down: false,
                unusable: BTreeMap::new(),
                after_listing: None,
                calls: Calls::default(),
            }),
        }
    }

    /// The state, brought up to the current (virtual) time first.
    fn lock(&self) -> MutexGuard<'_, Cloud> {
        let mut cloud = self.state.lock().expect("fake cloud lock");
        cloud.settle(Instant::now());
        cloud
    }

    /// Virtual time since the test started.
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    // Setting the scene.

    /// A server on [`SOURCE`] with 2 vCPU and 20 GiB disk.
    fn add_vm(&self, id: &str, status: &str, ram_mb: u64) {
        let server = Server {
            id: id.into(),
            name: format!("vm-{id}"),
            project_id: "tenant-1".into(),
            status: status.into(),
            task_state: None,
            host: Some(SOURCE.into()),
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
        };
        self.lock().vms.insert(id.into(), vm);
    }

    /// How the server's successive migrations go; the last script repeats.
    fn script(&self, id: &str, scripts: &[Script]) {
        self.lock().vms.get_mut(id).expect("known VM").scripts = scripts.iter().copied().collect();
    }

    fn progress(&self, id: &str, progress: Progress) {
        self.lock().vms.get_mut(id).expect("known VM").progress = progress;
    }

    /// Replaces the other hypervisors by these, each with `free_ram_mb` and plenty of everything else.
    fn other_hosts(&self, hosts: &[(&str, u64)]) {
        self.lock().other_hosts = hosts
            .iter()
            .map(|(host, free_ram_mb)| HostCapacity {
                host: (*host).into(),
                free_ram_mb: *free_ram_mb,
                free_vcpus: 128,
                free_disk_gb: 4000,
            })
            .collect();
    }

    // Someone else acting on the cloud.

    /// Makes `change` right after the next host listing is answered, before the engine can act on it.
    fn after_next_listing(&self, change: impl FnOnce(&mut Cloud) + Send + 'static) {
        self.lock().after_listing = Some(Box::new(change));
    }

    fn placement_down(&self) {
        self.lock().placement_down = true;
    }

    /// Sets the state of another host's nova-compute service.
    fn other_service(&self, host: &str, enabled: bool, up: bool) {
        self.lock().unusable.insert(host.into(), (enabled, up));
    }

    fn disable_by_operator(&self, reason: &str) {
        let mut cloud = self.lock();
        cloud.service.enabled = false;
        cloud.service.disabled_reason = Some(reason.into());
    }

    /// An operator (or an earlier run) live-migrates the server: not one of the engine's calls.
    fn live_migrate_by_operator(&self, id: &str) {
        self.lock()
            .start_migration(id, LIVE, Instant::now())
            .expect("operator's migration starts");
    }

    /// A user deletes the server; its running migrations end with it.
    fn delete_vm(&self, id: &str) {
        let now = Instant::now();
        let mut cloud = self.lock();
        cloud.vms.remove(id);
        for migration in cloud.migrations.iter_mut().filter(|m| m.server_id == id && m.moving()) {
            migration.status = "error";
            migration.ended = Some(now);
        }
    }

    // Looking at the outcome.

    fn calls(&self) -> Calls {
        self.lock().calls.clone()
    }

    fn vm(&self, id: &str) -> Server {
        self.lock().vms.get(id).expect("known VM").server.clone()
    }

    fn service(&self) -> ComputeService {
        self.lock().service.clone()
    }

    /// Statuses of the server's migration records, oldest first.
    fn migration_statuses(&self, id: &str) -> Vec<&'static str> {
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
        let cloud = self.lock();
        Ok(Some(cloud.service.clone()).filter(|s| s.host == host))
    }

    async fn disable_service(&self, service: &ComputeService, reason: &str) -> ComputeResult<ComputeService> {
        let mut cloud = self.lock();
        cloud.calls.disable.push(reason.into());
        assert_eq!(service.id, cloud.service.id, "disables the service it looked up");
        cloud.service.enabled = false;
        cloud.service.disabled_reason = Some(reason.into());
        Ok(cloud.service.clone())
    }

    async fn enable_service(&self, service: &ComputeService) -> ComputeResult<ComputeService> {
        let mut cloud = self.lock();
        cloud.calls.enable += 1;
        assert_eq!(service.id, cloud.service.id, "enables the service it looked up");
        cloud.service.enabled = true;
        cloud.service.disabled_reason = None;
        Ok(cloud.service.clone())
    }

    async fn servers_on_host(&self, host: &str) -> ComputeResult<Vec<Server>> {
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

    async fn server(&self, id: &str) -> ComputeResult<Option<Server>> {
        Ok(self.lock().vms.get(id).map(|vm| vm.server.clone()))
    }

    async fn live_migrate(&self, server_id: &str) -> ComputeResult<()> {
        let at = self.now();
        let mut cloud = self.lock();
        cloud.calls.live_migrate.push((server_id.into(), at));
        cloud.calls.starts.push(server_id.into());
        cloud.start_migration(server_id, LIVE, Instant::now())
    }

    async fn cold_migrate(&self, server_id: &str) -> ComputeResult<()> {
        let at = self.now();
        let mut cloud = self.lock();
        cloud.calls.cold_migrate.push((server_id.into(), at));
        cloud.calls.starts.push(server_id.into());
        cloud.start_migration(server_id, COLD, Instant::now())
    }

    async fn confirm_resize(&self, server_id: &str) -> ComputeResult<()> {
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
        migration.status = "confirmed";
        vm.server.status = migration.status_before.clone();
        vm.server.task_state = None;
        Ok(())
    }

    async fn in_progress_migrations(&self, server_id: &str) -> ComputeResult<Vec<Migration>> {
        let now = Instant::now();
        let cloud = self.lock();
        Ok(cloud
            .migrations
            .iter()
            .rev()
            .filter(|m| m.server_id == server_id && m.kind == LIVE && m.moving())
            .map(|m| m.record(now))
            .collect())
    }

    async fn migration_history(&self, server_id: &str, migration_type: &str) -> ComputeResult<Vec<Migration>> {
        let now = Instant::now();
        let cloud = self.lock();
        Ok(cloud
            .migrations
            .iter()
            .rev()
            .filter(|m| m.server_id == server_id && m.kind == migration_type)
            .map(|m| m.record(now))
            .collect())
    }

    async fn unconfirmed_migrations_from(&self, host: &str) -> ComputeResult<Vec<String>> {
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

    async fn force_complete(&self, server_id: &str, migration_id: &str) -> ComputeResult<()> {
        let at = self.now();
        let mut cloud = self.lock();
        cloud.calls.force_complete.push((server_id.into(), at));
        let i = cloud.running_live(server_id, migration_id)?;
        cloud.land(i, Instant::now());
        Ok(())
    }

    async fn abort_migration(&self, server_id: &str, migration_id: &str) -> ComputeResult<()> {
        let at = self.now();
        let mut cloud = self.lock();
        cloud.calls.abort.push((server_id.into(), at));
        let i = cloud.running_live(server_id, migration_id)?;
        cloud.end_on_source(i, "cancelled", Instant::now());
        Ok(())
    }

    async fn compute_services(&self) -> ComputeResult<Vec<ComputeService>> {
        let cloud = self.lock();
        let others = cloud.other_hosts.iter().map(|h| {
            let (enabled, up) = cloud.unusable.get(&h.host).copied().unwrap_or((true, true));
            ComputeService {
                id: format!("svc-{}", h.host),
                host: h.host.clone(),
                enabled,
                up,
                disabled_reason: None,
            }
        });
        Ok(std::iter::once(cloud.service.clone()).chain(others).collect())
    }

    async fn spare_capacity(&self, hosts: &[String]) -> ComputeResult<Vec<HostCapacity>> {
        let cloud = self.lock();
        if cloud.placement_down {
            return Err(ComputeError::Other("placement: connection refused".into()));
        }
        assert!(!hosts.iter().any(|h| h == SOURCE), "the drained host is no destination");
        Ok(cloud
            .other_hosts
            .iter()
            .filter(|h| hosts.contains(&h.host))
            .cloned()
            .collect())
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

struct Quiet;

impl Observer for Quiet {
    fn event(&self, _: &Event<'_>) {}
}

fn target() -> Target {
    Target {
        node: NODE.into(),
        host: SOURCE.into(),
    }
}

/// One evacuation that nobody stops.
async fn evacuate(cloud: &FakeCloud, settings: &Settings) -> Report {
    let (_never_stop, stop) = watch::channel(StopRequest::Continue);
    Engine::new(cloud, settings, &Quiet)
        .evacuate(&target(), stop)
        .await
        .expect("the evacuation runs")
}

/// One evacuation that is asked to `request` a stop `after` this long.
async fn evacuate_stopped(cloud: &FakeCloud, settings: &Settings, after: Duration, request: StopRequest) -> Report {
    let (stop, stop_rx) = watch::channel(StopRequest::Continue);
    let target = target();
    let engine = Engine::new(cloud, settings, &Quiet);
    let (report, ()) = tokio::join!(engine.evacuate(&target, stop_rx), async {
        sleep(after).await;
        stop.send(request).expect("the engine listens");
    });
    report.expect("the evacuation runs")
}

fn vm<'r>(report: &'r Report, id: &str) -> &'r VmReport {
    report
        .vms
        .iter()
        .find(|vm| vm.id == id)
        .unwrap_or_else(|| panic!("{id} is in the report"))
}

fn reason<'r>(report: &'r Report, id: &str) -> &'r str {
    vm(report, id).reason.as_deref().unwrap_or_default()
}

#[track_caller]
fn assert_within(at: Duration, from: Duration, to: Duration) {
    assert!(from <= at && at <= to, "{at:?} is not within {from:?}..={to:?}");
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn moves_every_vm_in_planned_order_never_more_than_max_parallel_at_once() {
    let cloud = FakeCloud::new();
    cloud.add_vm("a", "ACTIVE", 4096);
    cloud.add_vm("b", "ACTIVE", 1024);
    cloud.add_vm("c", "PAUSED", 2048);
    cloud.add_vm("d", "SHUTOFF", 512);
    cloud.add_vm("e", "ACTIVE", 1024);
    cloud.script("a", &[Script::Complete { after: secs(30) }]);
    cloud.script("b", &[Script::Complete { after: secs(20) }]);
    cloud.script("c", &[Script::Complete { after: secs(10) }]);
    cloud.script("d", &[Script::Complete { after: secs(15) }]);
    cloud.script("e", &[Script::Complete { after: secs(40) }]);
    let settings = Settings {
        max_parallel: 2,
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    let calls = cloud.calls();
    // Live before cold, smallest RAM first, ties by id.
    assert_eq!(calls.starts, ["b", "e", "c", "a", "d"]);
    assert_eq!(calls.max_in_flight, 2);
    assert_eq!(calls.cold_migrate.len(), 1);
    assert_eq!(calls.confirm_resize, ["d"]);

    assert_eq!(calls.disable.len(), 1);
    let service = cloud.service();
    assert!(!service.enabled);
    assert!(
        service
            .disabled_reason
            .as_deref()
            .unwrap()
            .starts_with(DISABLED_REASON_MARKER)
    );
    assert!(report.service_disabled_by_us);
    assert_eq!(report.service_disabled_reason, service.disabled_reason);

    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.exit_code(), 0);
    assert_eq!(report.servers_left_on_host, 0);
    assert_eq!(report.vms.len(), 5);
    for vm in &report.vms {
        assert_eq!(vm.outcome, Outcome::Migrated, "{vm:?}");
        assert!(vm.destination.as_deref().is_some_and(|d| d != SOURCE), "{vm:?}");
        assert_eq!(vm.attempts, 1);
        assert_eq!(vm.destination, cloud.vm(&vm.id).host);
    }
    assert_eq!(vm(&report, "d").action, Action::ColdMigrate);
    let d = cloud.vm("d");
    assert_eq!((d.status.as_str(), d.task_state), ("SHUTOFF", None));
}

#[tokio::test(start_paused = true)]
async fn failed_migration_is_retried_with_doubling_backoff_then_reported_failed() {
    let cloud = FakeCloud::new();
    cloud.add_vm("flaky", "ACTIVE", 512);
    cloud.add_vm("fine", "ACTIVE", 1024);
    cloud.script("flaky", &[Script::Fail { after: secs(5) }]);
    let settings = Settings {
        max_parallel: 2,
        retries: 2,
        retry_backoff: secs(10),
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    let starts = cloud.calls().live_migrate_times("flaky");
    assert_eq!(starts.len(), 3, "one attempt and two retries: {starts:?}");
    // Each attempt fails after 5 s; the retry waits 10 s, then 20 s (to within one poll interval).
    assert_within(starts[1] - starts[0], secs(15), secs(15) + millis(500));
    assert_within(starts[2] - starts[1], secs(25), secs(25) + millis(500));

    let flaky = vm(&report, "flaky");
    assert_eq!(flaky.outcome, Outcome::Failed);
    assert_eq!(flaky.attempts, settings.retries + 1);
    assert!(reason(&report, "flaky").contains("3 attempt(s) failed"), "{flaky:?}");
    assert!(reason(&report, "flaky").contains("error"), "{flaky:?}");
    assert_eq!(cloud.vm("flaky").host.as_deref(), Some(SOURCE));

    assert_eq!(vm(&report, "fine").outcome, Outcome::Migrated);
    assert_eq!(report.result, RunResult::Failed);
    assert_eq!(report.exit_code(), 1);
    assert_eq!(report.servers_left_on_host, 1);
}

#[tokio::test(start_paused = true)]
async fn migration_over_budget_is_aborted_and_vm_stays_on_source() {
    let cloud = FakeCloud::new();
    cloud.add_vm("big", "ACTIVE", 8192);
    cloud.script("big", &[Script::Stall { progress_for: secs(10) }]);
    let settings = Settings {
        budget: Budget::Fixed(secs(60)),
        stall_after: None,
        on_budget_exceeded: BudgetAction::Abort,
        retries: 3,
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    let calls = cloud.calls();
    assert_eq!(calls.abort.len(), 1);
    assert_within(calls.abort[0].1, secs(60), secs(61));
    assert!(calls.force_complete.is_empty());
    assert_eq!(calls.live_migrate.len(), 1, "an aborted migration is not retried");

    let big = vm(&report, "big");
    assert_eq!(big.outcome, Outcome::Aborted);
    assert!(reason(&report, "big").contains("budget of 60 s"), "{big:?}");
    let server = cloud.vm("big");
    assert_eq!(server.host.as_deref(), Some(SOURCE));
    assert_eq!((server.status.as_str(), server.task_state), ("ACTIVE", None));
    assert_eq!(cloud.migration_statuses("big"), ["cancelled"]);
    assert_eq!(report.result, RunResult::Failed);
}

#[tokio::test(start_paused = true)]
async fn migration_over_budget_is_force_completed_when_so_configured() {
    let cloud = FakeCloud::new();
    cloud.add_vm("big", "ACTIVE", 8192);
    cloud.script("big", &[Script::Stall { progress_for: secs(10) }]);
    let settings = Settings {
        budget: Budget::Fixed(secs(60)),
        stall_after: None,
        on_budget_exceeded: BudgetAction::ForceComplete,
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    let calls = cloud.calls();
    assert_eq!(calls.force_complete.len(), 1);
    assert_within(calls.force_complete[0].1, secs(60), secs(61));
    assert!(calls.abort.is_empty());
    let big = vm(&report, "big");
    assert_eq!(big.outcome, Outcome::Migrated);
    assert_eq!(big.destination, cloud.vm("big").host);
    assert_ne!(big.destination.as_deref(), Some(SOURCE));
    assert_eq!(report.result, RunResult::Succeeded);
}

#[tokio::test(start_paused = true)]
async fn stalled_migration_is_aborted_before_its_budget() {
    let cloud = FakeCloud::new();
    cloud.add_vm("stuck", "ACTIVE", 4096);
    // Progresses for 20 s, then memory_remaining_bytes stays put.
    cloud.script("stuck", &[Script::Stall { progress_for: secs(20) }]);
    let settings = Settings {
        budget: Budget::Fixed(secs(600)),
        stall_after: Some(secs(30)),
        on_budget_exceeded: BudgetAction::Abort,
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    let aborts = cloud.calls().abort_times("stuck");
    assert_eq!(aborts.len(), 1);
    // Last progress seen at the first reading after 20 s (readings every 2 s), then 30 s without.
    assert_within(aborts[0], secs(50), secs(54));
    assert_eq!(vm(&report, "stuck").outcome, Outcome::Aborted);
    assert!(reason(&report, "stuck").contains("no progress for 30 s"), "{report:?}");
}

#[tokio::test(start_paused = true)]
async fn without_progress_numbers_only_the_budget_applies() {
    let cloud = FakeCloud::new();
    cloud.add_vm("zero", "ACTIVE", 1024);
    cloud.add_vm("null", "ACTIVE", 2048);
    cloud.progress("zero", Progress::Zero);
    cloud.progress("null", Progress::Missing);
    cloud.script(
        "zero",
        &[Script::Stall {
            progress_for: Duration::ZERO,
        }],
    );
    cloud.script(
        "null",
        &[Script::Stall {
            progress_for: Duration::ZERO,
        }],
    );
    let settings = Settings {
        max_parallel: 2,
        budget: Budget::Fixed(secs(120)),
        stall_after: Some(secs(30)),
        on_budget_exceeded: BudgetAction::Abort,
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    for id in ["zero", "null"] {
        let aborts = cloud.calls().abort_times(id);
        assert_eq!(aborts.len(), 1, "{id}");
        assert_within(aborts[0], secs(120), secs(121));
        assert_eq!(vm(&report, id).outcome, Outcome::Aborted);
        assert!(reason(&report, id).contains("budget of 120 s"), "{report:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn migration_whose_remaining_memory_only_oscillates_is_stalled() {
    let cloud = FakeCloud::new();
    cloud.add_vm("busy", "ACTIVE", 4096);
    // The classic non-converging guest: each pre-copy pass brings remaining memory down, the next one starts higher.
    cloud.script("busy", &[Script::Thrash { period: secs(10) }]);
    let settings = Settings {
        budget: Budget::Fixed(secs(600)),
        stall_after: Some(secs(30)),
        on_budget_exceeded: BudgetAction::Abort,
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    let aborts = cloud.calls().abort_times("busy");
    assert_eq!(aborts.len(), 1);
    // The lowest reading is the last of the first pass (8.5 s); none lower in the 30 s after it.
    assert_within(aborts[0], secs(38), secs(41));
    assert!(reason(&report, "busy").contains("no progress"), "{report:?}");
}

#[tokio::test(start_paused = true)]
async fn overall_timeout_aborts_in_flight_and_starts_nothing_new() {
    let cloud = FakeCloud::new();
    cloud.add_vm("quick", "ACTIVE", 512);
    cloud.add_vm("stuck", "ACTIVE", 1024);
    cloud.add_vm("later", "ACTIVE", 2048);
    cloud.script("quick", &[Script::Complete { after: secs(30) }]);
    cloud.script("stuck", &[Script::Stall { progress_for: secs(5) }]);
    let settings = Settings {
        timeout: Some(secs(60)),
        budget: Budget::Fixed(secs(600)),
        stall_after: None,
        on_budget_exceeded: BudgetAction::Abort,
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    let calls = cloud.calls();
    assert_eq!(calls.starts, ["quick", "stuck"]);
    assert!(calls.live_migrate.iter().all(|(_, at)| *at < secs(60)), "{calls:?}");
    assert_eq!(calls.abort.len(), 1);
    assert_within(calls.abort[0].1, secs(60), secs(61));

    assert_eq!(vm(&report, "quick").outcome, Outcome::Migrated);
    assert_eq!(vm(&report, "stuck").outcome, Outcome::Aborted);
    assert!(reason(&report, "stuck").contains("time-out of 60 s"), "{report:?}");
    assert_eq!(cloud.vm("stuck").host.as_deref(), Some(SOURCE));
    assert_eq!(vm(&report, "later").outcome, Outcome::NotStarted);
    assert_eq!(vm(&report, "later").attempts, 0);
    assert_eq!(report.result, RunResult::TimedOut);
    assert_eq!(report.exit_code(), 1);
    assert_eq!(report.servers_left_on_host, 2);
}

#[tokio::test(start_paused = true)]
async fn overall_timeout_force_completes_in_flight_when_so_configured() {
    let cloud = FakeCloud::new();
    cloud.add_vm("stuck", "ACTIVE", 1024);
    cloud.add_vm("later", "ACTIVE", 2048);
    cloud.script("stuck", &[Script::Stall { progress_for: secs(5) }]);
    let settings = Settings {
        timeout: Some(secs(60)),
        budget: Budget::Fixed(secs(600)),
        stall_after: None,
        on_budget_exceeded: BudgetAction::ForceComplete,
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    assert_eq!(cloud.calls().force_complete.len(), 1);
    assert_eq!(vm(&report, "stuck").outcome, Outcome::Migrated);
    assert_eq!(vm(&report, "later").outcome, Outcome::NotStarted);
    assert_eq!(report.result, RunResult::TimedOut);
    assert_eq!(report.servers_left_on_host, 1);
}

#[tokio::test(start_paused = true)]
async fn service_disabled_by_someone_else_is_left_alone_and_never_enabled() {
    let cloud = FakeCloud::new();
    cloud.add_vm("a", "ACTIVE", 512);
    cloud.disable_by_operator("RAM errors, ticket 4711");
    let settings = Settings::default();

    let report = evacuate(&cloud, &settings).await;

    assert!(cloud.calls().disable.is_empty());
    assert!(!report.service_disabled_by_us);
    assert_eq!(
        report.service_disabled_reason.as_deref(),
        Some("RAM errors, ticket 4711")
    );
    assert_eq!(report.result, RunResult::Succeeded, "the VMs are moved all the same");

    let restored = Engine::new(&cloud, &settings, &Quiet).restore(&target()).await.unwrap();
    assert_eq!(
        restored,
        RestoreOutcome::DisabledBySomeoneElse {
            reason: Some("RAM errors, ticket 4711".into())
        }
    );
    assert_eq!(cloud.calls().enable, 0);
    assert!(!cloud.service().enabled);
}

#[tokio::test(start_paused = true)]
async fn restore_enables_only_a_service_we_disabled() {
    let cloud = FakeCloud::new();
    cloud.add_vm("a", "ACTIVE", 512);
    let settings = Settings::default();
    let engine = Engine::new(&cloud, &settings, &Quiet);

    evacuate(&cloud, &settings).await;
    assert!(is_our_reason(cloud.service().disabled_reason.as_deref()));

    assert_eq!(engine.restore(&target()).await.unwrap(), RestoreOutcome::Enabled);
    assert_eq!(cloud.calls().enable, 1);
    let service = cloud.service();
    assert!(service.enabled);
    assert_eq!(service.disabled_reason, None);

    assert_eq!(engine.restore(&target()).await.unwrap(), RestoreOutcome::AlreadyEnabled);
    assert_eq!(cloud.calls().enable, 1);
}

#[tokio::test(start_paused = true)]
async fn vm_already_migrating_is_followed_not_migrated_again() {
    let cloud = FakeCloud::new();
    cloud.add_vm("moving", "ACTIVE", 2048);
    cloud.script("moving", &[Script::Complete { after: secs(20) }]);
    cloud.live_migrate_by_operator("moving");
    assert_eq!(cloud.vm("moving").task_state.as_deref(), Some("migrating"));

    let report = evacuate(&cloud, &Settings::default()).await;

    assert!(cloud.calls().live_migrate.is_empty());
    let moving = vm(&report, "moving");
    assert_eq!(moving.outcome, Outcome::Migrated);
    assert_eq!(moving.destination, cloud.vm("moving").host);
    assert_eq!(moving.attempts, 1);
    assert_eq!(report.result, RunResult::Succeeded);
}

#[tokio::test(start_paused = true)]
async fn migration_whose_destination_never_takes_over_is_reported_not_waited_for() {
    let cloud = FakeCloud::new();
    cloud.add_vm("orphan", "ACTIVE", 1024);
    cloud.add_vm("fine", "ACTIVE", 2048);
    cloud.script("orphan", &[Script::DestinationLost { after: secs(10) }]);
    cloud.script("fine", &[Script::Complete { after: secs(10) }]);

    let report = evacuate(&cloud, &Settings::default()).await;

    let orphan = vm(&report, "orphan");
    assert_eq!(orphan.outcome, Outcome::Failed);
    let reason = orphan.reason.as_deref().unwrap_or_default();
    assert!(reason.contains("never took it over"), "{reason}");
    // Found within the grace after the record completed, not after the 150 s budget or the 30 min time-out.
    assert!(orphan.duration_seconds < 60.0, "{orphan:?}");
    assert!(
        cloud.calls().abort.is_empty(),
        "nothing to abort: Nova says it completed"
    );
    assert_eq!(
        cloud.calls().live_migrate_times("orphan").len(),
        1,
        "never started twice"
    );
    assert_eq!(vm(&report, "fine").outcome, Outcome::Migrated, "the others still move");
    assert_eq!(report.result, RunResult::Failed);
}

#[tokio::test(start_paused = true)]
async fn an_agent_disables_first_even_when_the_capacity_check_then_fails() {
    let cloud = FakeCloud::new();
    cloud.add_vm("huge", "ACTIVE", 16384);
    cloud.other_hosts(&[("cmp-dst-1", 8192)]);
    let settings = Settings {
        disable_first: true,
        ..Settings::default()
    };
    let (_never_stop, stop) = watch::channel(StopRequest::Continue);

    let result = Engine::new(&cloud, &settings, &Quiet).evacuate(&target(), stop).await;

    assert!(matches!(result, Err(EvacuationError::Capacity(_))), "{result:?}");
    assert!(!cloud.service().enabled, "no new VM may land once the node is cordoned");
    assert!(is_our_reason(cloud.service().disabled_reason.as_deref()));
    assert!(cloud.calls().starts.is_empty());
}

#[tokio::test(start_paused = true)]
async fn capacity_shortfall_refuses_to_start_and_changes_nothing() {
    let cloud = FakeCloud::new();
    cloud.add_vm("small", "ACTIVE", 512);
    cloud.add_vm("huge", "ACTIVE", 16384);
    cloud.add_vm("broken", "ERROR", 65536); // skipped, so not counted
    cloud.other_hosts(&[("cmp-dst-1", 8192)]);
    let settings = Settings::default();
    let (_never_stop, stop) = watch::channel(StopRequest::Continue);

    let result = Engine::new(&cloud, &settings, &Quiet).evacuate(&target(), stop).await;

    let Err(EvacuationError::Capacity(shortfall)) = result else {
        panic!("expected a capacity error, got {result:?}");
    };
    let unplaced: Vec<&str> = shortfall.unplaced.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(unplaced, ["huge"]);
    assert_eq!(shortfall.hosts, 1);
    let calls = cloud.calls();
    assert!(calls.disable.is_empty());
    assert!(calls.starts.is_empty());
    assert!(cloud.service().enabled);
}

#[tokio::test(start_paused = true)]
async fn capacity_look_up_failure_stops_an_evacuation_only_when_something_must_move() {
    let cloud = FakeCloud::new();
    cloud.add_vm("broken", "ERROR", 512); // skipped by the state policy: nothing to place
    cloud.placement_down();

    let report = evacuate(&cloud, &Settings::default()).await;
    assert_eq!(vm(&report, "broken").outcome, Outcome::Skipped);
    assert!(!cloud.service().enabled);

    cloud.add_vm("a", "ACTIVE", 512);
    let (_never_stop, stop) = watch::channel(StopRequest::Continue);
    let result = Engine::new(&cloud, &Settings::default(), &Quiet)
        .evacuate(&target(), stop)
        .await;
    assert!(
        matches!(&result, Err(EvacuationError::Compute { step, .. }) if step.contains("capacity")),
        "{result:?}"
    );
    assert!(cloud.calls().starts.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_listing_overtaken_by_someone_else_is_read_again_not_counted_as_a_failure() {
    let cloud = FakeCloud::new();
    cloud.add_vm("deleted", "ACTIVE", 512);
    cloud.add_vm("moved-by-operator", "ACTIVE", 1024);
    cloud.add_vm("plain", "ACTIVE", 2048);
    cloud.script("moved-by-operator", &[Script::Complete { after: secs(20) }]);
    // Between the listing and the engine's first requests: a user deletes one VM, an operator starts moving another.
    cloud.after_next_listing(|cloud| {
        cloud.vms.remove("deleted");
        cloud
            .start_migration("moved-by-operator", LIVE, Instant::now())
            .expect("operator's migration starts");
    });
    let settings = Settings {
        max_parallel: 3,
        disable_first: true,
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    assert_eq!(report.result, RunResult::Succeeded, "{report:?}");
    assert_eq!(vm(&report, "deleted").outcome, Outcome::Deleted);
    let followed = vm(&report, "moved-by-operator");
    assert_eq!((&followed.outcome, followed.attempts), (&Outcome::Migrated, 1));
    assert_eq!(cloud.migration_statuses("moved-by-operator"), ["completed"]);
    assert_eq!(vm(&report, "plain").attempts, 1);
    // The first requests went out on the listing's word, with no read of each server in between.
    assert_eq!(cloud.calls().starts, ["deleted", "moved-by-operator", "plain"]);
}

#[tokio::test(start_paused = true)]
async fn only_enabled_and_up_hosts_count_as_room() {
    let cloud = FakeCloud::new();
    cloud.add_vm("big", "ACTIVE", 16384);
    cloud.other_hosts(&[("cmp-disabled", 65536), ("cmp-down", 65536), ("cmp-small", 8192)]);
    cloud.other_service("cmp-disabled", false, true);
    cloud.other_service("cmp-down", true, false);
    let (_never_stop, stop) = watch::channel(StopRequest::Continue);

    let result = Engine::new(&cloud, &Settings::default(), &Quiet)
        .evacuate(&target(), stop)
        .await;

    let Err(EvacuationError::Capacity(shortfall)) = result else {
        panic!("expected a capacity error, got {result:?}");
    };
    assert_eq!(shortfall.hosts, 1, "only cmp-small can take VMs");
    assert!(cloud.service().enabled);
}

#[tokio::test(start_paused = true)]
async fn capacity_check_can_be_skipped() {
    let cloud = FakeCloud::new();
    cloud.add_vm("huge", "ACTIVE", 16384);
    cloud.other_hosts(&[("cmp-dst-1", 8192)]);
    let settings = Settings {
        check_capacity: false,
        ..Settings::default()
    };

    let report = evacuate(&cloud, &settings).await;

    // The fake scheduler ignores capacity; the point is that the engine tried.
    assert_eq!(cloud.calls().starts, ["huge"]);
    assert_eq!(report.result, RunResult::Succeeded);
}

#[tokio::test(start_paused = true)]
async fn stop_leave_in_flight_returns_at_once_and_leaves_the_migration_to_nova() {
    let cloud = FakeCloud::new();
    cloud.add_vm("long", "ACTIVE", 512);
    cloud.add_vm("next", "ACTIVE", 1024);
    cloud.script("long", &[Script::Complete { after: secs(100) }]);

    let report = evacuate_stopped(&cloud, &Settings::default(), secs(10), StopRequest::LeaveInFlight).await;

    assert!(
        report.duration_seconds < 10.5,
        "returned after {} s",
        report.duration_seconds
    );
    assert_eq!(vm(&report, "long").outcome, Outcome::InProgress);
    assert_eq!(vm(&report, "next").outcome, Outcome::NotStarted);
    assert_eq!(report.result, RunResult::Interrupted);
    assert_eq!(report.exit_code(), 1);
    let calls = cloud.calls();
    assert!(calls.abort.is_empty());
    assert_eq!(calls.starts, ["long"]);
    assert_eq!(
        cloud.vm("long").task_state.as_deref(),
        Some("migrating"),
        "still moving"
    );
}

#[tokio::test(start_paused = true)]
async fn stop_abort_in_flight_aborts_the_live_migration() {
    let cloud = FakeCloud::new();
    cloud.add_vm("long", "ACTIVE", 512);
    cloud.add_vm("next", "ACTIVE", 1024);
    cloud.script("long", &[Script::Complete { after: secs(100) }]);

    let report = evacuate_stopped(&cloud, &Settings::default(), secs(10), StopRequest::AbortInFlight).await;

    let aborts = cloud.calls().abort_times("long");
    assert_eq!(aborts.len(), 1);
    assert_within(aborts[0], secs(10), secs(11));
    assert!(
        report.duration_seconds < 15.0,
        "returned after {} s",
        report.duration_seconds
    );
    assert_eq!(vm(&report, "long").outcome, Outcome::Aborted);
    assert!(reason(&report, "long").contains("cancelled"), "{report:?}");
    assert_eq!(vm(&report, "next").outcome, Outcome::NotStarted);
    assert_eq!(report.result, RunResult::Interrupted);
    let long = cloud.vm("long");
    assert_eq!((long.host.as_deref(), long.task_state), (Some(SOURCE), None));
}

#[tokio::test(start_paused = true)]
async fn error_and_suspended_vms_are_skipped_shutoff_ones_cold_migrated() {
    let cloud = FakeCloud::new();
    cloud.add_vm("broken", "ERROR", 512);
    cloud.add_vm("asleep", "SUSPENDED", 512);
    cloud.add_vm("off", "SHUTOFF", 2048);

    let report = evacuate(&cloud, &Settings::default()).await;

    for (id, status) in [("broken", "ERROR"), ("asleep", "SUSPENDED")] {
        let skipped = vm(&report, id);
        assert_eq!(skipped.outcome, Outcome::Skipped);
        assert_eq!(skipped.action, Action::Skip);
        assert!(reason(&report, id).contains(status), "{skipped:?}");
        assert_eq!(cloud.vm(id).host.as_deref(), Some(SOURCE));
    }
    let calls = cloud.calls();
    assert_eq!(calls.starts, ["off"]);
    assert!(calls.live_migrate.is_empty());
    assert_eq!(calls.confirm_resize, ["off"]);
    let off = vm(&report, "off");
    assert_eq!((off.action, &off.outcome), (Action::ColdMigrate, &Outcome::Migrated));
    let server = cloud.vm("off");
    assert_eq!(server.status, "SHUTOFF");
    assert_eq!(server.task_state, None);
    assert_eq!(off.destination, server.host);
    assert_eq!(cloud.migration_statuses("off"), ["confirmed"]);

    assert_eq!(report.result, RunResult::Failed);
    assert_eq!(report.servers_left_on_host, 2);
    assert_eq!(report.exit_code(), 1);
}

#[tokio::test(start_paused = true)]
async fn vm_deleted_while_migrating_counts_as_gone() {
    let cloud = FakeCloud::new();
    cloud.add_vm("doomed", "ACTIVE", 512);
    cloud.script("doomed", &[Script::Complete { after: secs(60) }]);
    let settings = Settings::default();
    let (_never_stop, stop) = watch::channel(StopRequest::Continue);
    let target = target();
    let engine = Engine::new(&cloud, &settings, &Quiet);

    let (report, ()) = tokio::join!(engine.evacuate(&target, stop), async {
        sleep(secs(10)).await;
        cloud.delete_vm("doomed");
    });
    let report = report.unwrap();

    assert_eq!(vm(&report, "doomed").outcome, Outcome::Deleted);
    assert!(report.duration_seconds < 11.0);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.servers_left_on_host, 0);
}

#[tokio::test(start_paused = true)]
async fn running_again_after_success_changes_nothing() {
    let cloud = FakeCloud::new();
    cloud.add_vm("a", "ACTIVE", 512);
    cloud.add_vm("b", "SHUTOFF", 512);
    let settings = Settings::default();
    let first = evacuate(&cloud, &settings).await;
    assert_eq!(first.result, RunResult::Succeeded);
    let before = cloud.calls();

    let again = evacuate(&cloud, &settings).await;

    assert_eq!(again.result, RunResult::Succeeded);
    assert!(again.vms.is_empty());
    assert!(again.service_disabled_by_us);
    assert_eq!(again.service_disabled_reason, first.service_disabled_reason);
    let after = cloud.calls();
    assert_eq!(after.disable.len(), 1);
    assert_eq!(after.starts, before.starts);
    assert_eq!(after.confirm_resize, before.confirm_resize);
}

#[tokio::test(start_paused = true)]
async fn cold_migration_left_unconfirmed_by_an_interrupted_run_is_confirmed_next_time() {
    let cloud = FakeCloud::new();
    cloud.add_vm("off", "SHUTOFF", 1024);
    cloud.script("off", &[Script::Complete { after: secs(20) }]);
    let settings = Settings::default();

    let first = evacuate_stopped(&cloud, &settings, secs(5), StopRequest::LeaveInFlight).await;
    assert_eq!(vm(&first, "off").outcome, Outcome::InProgress);
    sleep(secs(30)).await;
    assert_eq!(
        cloud.vm("off").status,
        "VERIFY_RESIZE",
        "moved, waiting for a confirmation"
    );

    let again = evacuate(&cloud, &settings).await;

    assert_eq!(cloud.calls().confirm_resize, ["off"]);
    let off = cloud.vm("off");
    assert_eq!((off.status.as_str(), off.task_state), ("SHUTOFF", None));
    assert_eq!(again.result, RunResult::Succeeded);
}
