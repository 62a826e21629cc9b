//! Memory relief, the agent's second job: while the node is in no
//! maintenance, read the hypervisor's memory every few seconds and, when it
//! stays low for the window, live-migrate the fewest VMs that bring it back
//! above the threshold plus the margin, one at a time, each to a host that is
//! neither short of memory nor in maintenance.
//!
//! The decisions are plain functions ([`decide`]: the node's mode, maintenance, the hosts no VM may go to;
//! and `crate::pressure`); [`ReliefTask`] reads, asks and writes: the
//! memory file, Nova, the memory Leases, the VmMigration objects, Events.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use std::time::Instant;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::evacuation::compute::Compute;
use crate::evacuation::{Engine, Event, Observer, Outcome, Settings, StopRequest, Target, VmReport};
use crate::kube::ObjectEvents;
use crate::kube::Severity::{Normal, Warning};

pub mod decide;

use crate::kube::relief::{
    MemoryLeases, VmMigrationPhase, VmMigrationSpec, VmMigrationStatus, VmMigrations, paused_cluster_wide,
};
use crate::nova::NovaClient;
use crate::nova::microversion::CHECKED_DESTINATION;
use crate::pressure::choice::{self, Candidate, Chosen, Policy};
use crate::pressure::detector::{Detector, Pressure, PressureRule};
use crate::pressure::meminfo::{self, MemInfo};
use crate::telemetry::metrics::{Metrics, ResultLabel};
use crate::telemetry::server::NovaSlot;
pub use decide::{ANNOTATION_VALUES, ClusterMode, NodeMode, RELIEF_ANNOTATION, in_maintenance, node_mode};
use decide::{age, excluded_hosts, no_vm_may_move, told_outcome};

/// How far back a VM's migrations count as recent.
const RECENT: Duration = Duration::from_secs(24 * 3600);
/// Migration histories read at once when choosing.
const HISTORY_READS: usize = 4;
/// Least wait before trying again when nothing could move (each try asks
/// the API server and Nova).
const HELD_RETRY: Duration = Duration::from_secs(10);

/// How relief runs, from the command line.
#[derive(Clone, Debug)]
pub struct ReliefSettings {
    pub mode: ClusterMode,
    pub meminfo: PathBuf,
    pub rule: PressureRule,
    pub sample_every: Duration,
    pub policy: Policy,
    pub vm_cool_down: Duration,
    pub host_cool_down: Duration,
    /// Relief moves at once across the cluster.
    pub cap: u32,
    /// Duration of the memory Leases.
    pub lease: Duration,
}

/// What one attempt came to.
enum Attempt {
    /// A move was made (or proposed): the host cools down.
    Acted,
    /// Nothing may move now, and why; tried again later.
    Held(String),
    /// Relief is off for this node: its memory is still read and told to
    /// the others, but no Event says it is not relieved.
    Off,
}

/// The move chosen: the VM, why, and where.
struct ReliefPlan {
    chosen: Chosen,
    destination: String,
}

/// The memory as read when the move was chosen.
#[derive(Clone, Copy)]
struct Reading {
    info: MemInfo,
    threshold_mib: u64,
    short_mib: u64,
}

/// The relief task of one agent.
pub struct ReliefTask {
    pub settings: ReliefSettings,
    pub target: Target,
    /// The evacuation's settings: budgets, stall check, polling.
    pub evacuation: Settings,
    pub kube: kube::Client,
    pub namespace: String,
    pub instance: String,
    pub node: watch::Receiver<Option<Node>>,
    pub nova: NovaSlot,
    pub metrics: Arc<Metrics>,
}

impl ReliefTask {
    /// Reads and acts until the agent stops.
    pub async fn run(self) {
        if self.hidden_by_lxcfs() {
            return;
        }
        let leases = MemoryLeases::new(
            self.kube.clone(),
            &self.namespace,
            &self.target.node,
            &self.target.host,
            self.settings.lease,
        );
        self.close_interrupted().await;
        let (no_room, told) = watch::channel(false);
        tokio::spawn(keep_telling(leases.clone(), told, self.settings.lease));
        let mut detector = Detector::new(self.settings.rule);
        let mut ticker = tokio::time::interval(self.settings.sample_every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_move = Instant::now();
        let mut last_reading = Instant::now();
        let mut unusable = false;
        let mut last_held = String::new();
        // A dry run's last proposal (VM, destination), told once per episode.
        let mut proposed = None;
        loop {
            ticker.tick().await;
            let Some((info, relieved_at)) = self.read(&mut unusable) else {
                continue;
            };
            let now = Instant::now();
            let before = detector.state();
            let state = detector.observe(now, info.total_mib, info.available_mib);
            self.account(before, state, now.duration_since(last_reading), info);
            last_reading = now;
            // No room to spare (below the relieved level): no VM is to be sent here.
            let short = info.available_mib < relieved_at;
            no_room.send_if_modified(|told| std::mem::replace(told, short) != short);
            let Pressure::Sustained { short_mib, .. } = state else {
                last_held.clear();
                proposed = None;
                continue;
            };
            if now < next_move {
                continue;
            }
            let reading = Reading {
                info,
                threshold_mib: self.settings.rule.threshold.of(info.total_mib),
                short_mib,
            };
            match self.attempt(&leases, reading, &mut proposed).await {
                Attempt::Acted => {
                    next_move = Instant::now() + self.settings.host_cool_down;
                    last_held.clear();
                }
                Attempt::Off => next_move = Instant::now() + HELD_RETRY.max(self.settings.sample_every),
                Attempt::Held(why) => {
                    next_move = Instant::now() + HELD_RETRY.max(self.settings.sample_every);
                    if why != last_held {
                        self.tell_held(&why).await;
                        last_held = why;
                    }
                }
            }
        }
    }

    /// The memory now and the level at which it leaves room (threshold
    /// plus margin); `None` when the file cannot be read or the rule does
    /// not fit the host (said once, until it can again).
    fn read(&self, warned: &mut bool) -> Option<(MemInfo, u64)> {
        let info = match meminfo::read(&self.settings.meminfo) {
            Ok(info) => info,
            Err(e) => {
                if !std::mem::replace(warned, true) {
                    warn!(error = %e, "cannot read the hypervisor's memory; memory relief waits");
                }
                return None;
            }
        };
        let rule = self.settings.rule;
        let relieved_at = rule
            .threshold
            .of(info.total_mib)
            .saturating_add(rule.margin.of(info.total_mib));
        if relieved_at >= info.total_mib {
            if !std::mem::replace(warned, true) {
                tracing::error!(
                    total_mib = info.total_mib,
                    "--memory-threshold plus --memory-margin is not below MemTotal: memory relief waits"
                );
            }
            return None;
        }
        *warned = false;
        Some((info, relieved_at))
    }

    /// Marks the moves a stopped agent left `Migrating` as `Interrupted`:
    /// Nova went on with them (or rolled them back) on its own.
    async fn close_interrupted(&self) {
        let objects = VmMigrations::new(self.kube.clone(), &self.target.node);
        let Ok(unfinished) = objects.unfinished().await else {
            return;
        };
        for (name, mut status) in unfinished {
            status.phase = Some(VmMigrationPhase::Interrupted);
            status.completion_time = Some(jiff::Timestamp::now().to_string());
            status.message = Some(
                "the agent stopped during the move; Nova finished or rolled back the migration on its own (its \
                 migration records tell which)"
                    .into(),
            );
            if let Err(e) = objects.write_status(&name, &status).await {
                warn!(name, error = %e, "cannot close an interrupted VmMigration");
            }
        }
    }

    /// Refuses (with an error in the log) to act on memory
    /// that lxcfs (or another FUSE file system) shows in place of the host's.
    fn hidden_by_lxcfs(&self) -> bool {
        let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return false;
        };
        let hidden = meminfo::hidden_by_lxcfs(&mounts, &self.settings.meminfo);
        if hidden {
            tracing::error!(
                path = %self.settings.meminfo.display(),
                "memory relief is off on this node: a FUSE file system (lxcfs) is mounted over the memory file, \
                 so it shows the container's limit, not the hypervisor's memory; give the agent the host's view \
                 (no lxcfs mount for it) or --meminfo-path to a host file"
            );
        }
        hidden
    }

    /// Metrics and logs of the pressure's changes.
    fn account(&self, before: Pressure, state: Pressure, since_last: Duration, info: MemInfo) {
        let now = Instant::now();
        let relief = &self.metrics.relief;
        relief.memory_available.set((info.available_mib * 1024 * 1024) as i64);
        relief
            .under_pressure
            .set(i64::from(matches!(state, Pressure::Sustained { .. })));
        match (before, state) {
            (Pressure::Sustained { .. }, Pressure::Sustained { .. }) => {
                relief.pressure_seconds.inc_by(since_last.as_secs_f64());
            }
            (_, Pressure::Sustained { since, short_mib }) => {
                relief.pressure_episodes.inc();
                warn!(
                    available_mib = info.available_mib,
                    short_mib,
                    below_for_seconds = now.duration_since(since).as_secs(),
                    "memory pressure: MemAvailable has stayed below the threshold for the window"
                );
            }
            (Pressure::Sustained { since, .. }, _) => {
                let took = now.duration_since(since);
                relief.time_to_relief.observe(took.as_secs_f64());
                info!(
                    available_mib = info.available_mib,
                    seconds = took.as_secs_f64(),
                    "memory pressure relieved"
                );
            }
            _ => {}
        }
    }

    /// One try at relieving the host.
    async fn attempt(
        &self,
        leases: &MemoryLeases,
        reading: Reading,
        proposed: &mut Option<(String, String)>,
    ) -> Attempt {
        let Some(node) = self.node.borrow().clone() else {
            return Attempt::Held("the Node is not known yet".into());
        };
        let annotation = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(RELIEF_ANNOTATION));
        let annotation = annotation.map(String::as_str);
        // What the Node says first; the pause switch is asked only when it could matter.
        if node_mode(self.settings.mode, annotation, false) == NodeMode::Off {
            return Attempt::Off;
        }
        if let Some(why) = in_maintenance(&node) {
            return Attempt::Held(format!("no memory relief during maintenance: {why}"));
        }
        let paused = match paused_cluster_wide(self.kube.clone(), &self.namespace).await {
            Ok(paused) => paused,
            Err(e) => return Attempt::Held(format!("cannot read the pause switch (ConfigMap): {e}")),
        };
        let mode = node_mode(self.settings.mode, annotation, paused);
        if mode == NodeMode::Paused {
            return Attempt::Held("memory relief is paused".into());
        }
        let Some(nova) = self.nova.get().cloned() else {
            return Attempt::Held("Nova has not been reached yet".into());
        };
        let plan = match self.plan(&nova, leases, reading.short_mib, mode == NodeMode::On).await {
            Ok(plan) => plan,
            Err(why) => return Attempt::Held(why),
        };
        let events = ObjectEvents::for_node(self.kube.clone(), &node, &self.instance);
        if mode == NodeMode::DryRun {
            let proposal = Some((plan.chosen.server.id.clone(), plan.destination.clone()));
            if *proposed != proposal {
                self.propose(&node, &events, &plan, reading).await;
                *proposed = proposal;
            }
            return Attempt::Acted;
        }
        match self.take_share(leases).await {
            Ok(share) => {
                self.migrate(&node, &events, &nova, plan, reading, leases, share).await;
                Attempt::Acted
            }
            Err(why) => Attempt::Held(why),
        }
    }

    /// Chooses the VM and its destination, from Nova's and the other agents' view now.
    /// `moving`: the move will be made (not a dry run), so it waits for one of the relief Leases.
    async fn plan(
        &self,
        nova: &NovaClient,
        leases: &MemoryLeases,
        short_mib: u64,
        moving: bool,
    ) -> Result<ReliefPlan, String> {
        let host = &self.target.host;
        if nova.microversion() < CHECKED_DESTINATION {
            return Err(format!(
                "the compute API offers {} only: a live migration to a chosen host needs {CHECKED_DESTINATION}",
                nova.microversion()
            ));
        }
        let services = nova
            .compute_services()
            .await
            .map_err(|e| format!("cannot list the nova-compute services: {e}"))?;
        let own = services.iter().find(|s| &s.host == host);
        match own {
            None => return Err(format!("Nova has no nova-compute service on {host}")),
            Some(own) if !own.enabled => {
                return Err(format!(
                    "no memory relief during maintenance: nova-compute on {host} is disabled"
                ));
            }
            Some(own) if !own.up => return Err(format!("nova-compute on {host} is down: nothing can leave it")),
            Some(_) => {}
        }
        if moving && leases.relief_all_held(self.settings.cap).await.unwrap_or(false) {
            return Err(format!(
                "the cluster's {} relief migration(s) are all in use; waiting",
                self.settings.cap
            ));
        }
        let servers = nova
            .servers_on_host(host)
            .await
            .map_err(|e| format!("cannot list the servers on {host}: {e}"))?;
        let mut candidates = self.candidates(nova, servers).await;
        // Nothing movable at all: said before the other hosts are asked about.
        choice::choose(&candidates, short_mib, self.settings.policy, self.settings.vm_cool_down)
            .map_err(|refused| no_vm_may_move(&refused, &BTreeMap::new(), host))?;
        let low = leases.low_hosts().await.map_err(|e| e.to_string())?;
        let zone = own.and_then(|s| s.zone.as_deref());
        let excluded = excluded_hosts(host, zone, &services, &low);
        let open: Vec<String> = services
            .iter()
            .filter(|s| !excluded.contains_key(&s.host))
            .map(|s| s.host.clone())
            .collect();
        let capacity = nova
            .spare_capacity(host, &open)
            .await
            .map_err(|e| format!("cannot read the other hosts' free resources: {e}"))?;
        // The policy's choice, else its next best, while the chosen one fits nowhere.
        let mut fits_nowhere = Vec::new();
        loop {
            let chosen = choice::choose(&candidates, short_mib, self.settings.policy, self.settings.vm_cool_down)
                .map_err(|mut refused| {
                    refused.append(&mut fits_nowhere);
                    no_vm_may_move(&refused, &excluded, host)
                })?;
            if let Some(destination) = choice::destination(&chosen.server, &capacity, &excluded) {
                return Ok(ReliefPlan { chosen, destination });
            }
            let why = format!("no host has room for its {} MiB", chosen.server.flavor.ram_mb);
            fits_nowhere.push((chosen.server.id.clone(), why));
            candidates.retain(|c| c.server.id != chosen.server.id);
        }
    }

    /// The host's VMs with their recent live migrations (Nova's records, so
    /// a restarted agent knows them too); only those that may move are looked up.
    async fn candidates(&self, nova: &NovaClient, servers: Vec<crate::evacuation::Server>) -> Vec<Candidate> {
        let now = jiff::Timestamp::now();
        futures::stream::iter(servers)
            .map(|server| async move {
                let history = if choice::not_movable(&server).is_none() {
                    nova.migration_history(&server.id, "live-migration").await
                } else {
                    Ok(Vec::new())
                };
                let (history, history_unknown) = match history {
                    Ok(history) => (history, None),
                    Err(e) => (Vec::new(), Some(e.to_string())),
                };
                let ages: Vec<Duration> = history
                    .iter()
                    .filter_map(|m| m.created_at.as_deref().and_then(|at| age(at, now)))
                    .collect();
                Candidate {
                    last_moved_ago: ages.iter().min().copied(),
                    recent_moves: ages.iter().filter(|a| **a < RECENT).count() as u32,
                    history_unknown,
                    server,
                }
            })
            .buffer_unordered(HISTORY_READS)
            .collect()
            .await
    }

    /// Takes one of the cluster's relief migrations (when agents are coordinated).
    async fn take_share(&self, leases: &MemoryLeases) -> Result<Lease, String> {
        let cap = self.settings.cap;
        match leases.take_relief(cap).await {
            Ok(Some(lease)) => Ok(lease),
            Ok(None) => Err(format!(
                "the cluster's {cap} relief migration(s) are all in use; waiting"
            )),
            Err(e) => Err(format!("cannot take a relief migration: {e}")),
        }
    }

    /// A dry run's verdict: a VmMigration `Proposed` and an Event.
    async fn propose(&self, node: &Node, events: &ObjectEvents, plan: &ReliefPlan, reading: Reading) {
        let note = format!(
            "dry run: would live-migrate {} ({} MiB) to {}: {}",
            plan.chosen.server.name, plan.chosen.server.flavor.ram_mb, plan.destination, plan.chosen.why
        );
        info!(server = %plan.chosen.server.id, destination = %plan.destination, "{note}");
        let status = self.status(plan, reading, VmMigrationPhase::Proposed, None);
        let objects = VmMigrations::new(self.kube.clone(), &self.target.node);
        if let Err(e) = objects.create(node, self.spec(plan, true), &status).await {
            warn!(error = %e, "cannot write the VmMigration of the dry run");
        }
        self.metrics
            .relief
            .moves
            .get_or_create(&ResultLabel {
                result: "proposed".into(),
            })
            .inc();
        let _ = events.publish(Normal, "MemoryReliefProposed", "Plan", &note).await;
    }

    /// Moves the chosen VM, recorded as a VmMigration and Events, while
    /// holding the cluster's relief migration `share` (renewed, released after).
    #[allow(clippy::too_many_arguments)]
    async fn migrate(
        &self,
        node: &Node,
        events: &ObjectEvents,
        nova: &Arc<NovaClient>,
        plan: ReliefPlan,
        reading: Reading,
        leases: &MemoryLeases,
        share: Lease,
    ) {
        let server = &plan.chosen.server;
        let note = format!(
            "live-migrating {} ({} MiB) to {}: MemAvailable {} MiB, below {} MiB; {}",
            server.name,
            server.flavor.ram_mb,
            plan.destination,
            reading.info.available_mib,
            reading.threshold_mib,
            plan.chosen.why
        );
        info!(server = %server.id, destination = %plan.destination, "memory relief: {note}");
        let objects = VmMigrations::new(self.kube.clone(), &self.target.node);
        let mut status = self.status(&plan, reading, VmMigrationPhase::Migrating, None);
        let name = match objects.create(node, self.spec(&plan, false), &status).await {
            Ok(name) => Some(name),
            Err(e) => {
                warn!(error = %e, "cannot write the VmMigration; moving the VM all the same");
                None
            }
        };
        let _ = events.publish(Normal, "MemoryReliefStarted", "Migrate", &note).await;
        let report = self.move_holding(nova, &plan, leases, share).await;
        let (phase, result) = match report.outcome {
            Outcome::Migrated => (VmMigrationPhase::Succeeded, "succeeded"),
            Outcome::InProgress => (VmMigrationPhase::HandedOver, "handed-over"),
            _ => (VmMigrationPhase::Failed, "failed"),
        };
        let relief = &self.metrics.relief;
        relief.moves.get_or_create(&ResultLabel { result: result.into() }).inc();
        if phase == VmMigrationPhase::Succeeded {
            relief.freed_bytes.inc_by(server.flavor.ram_mb * 1024 * 1024);
        }
        let (severity, reason, note) = told_outcome(phase, &report, &self.target.host);
        info!(server = %server.id, result, "memory relief: {note}");
        let _ = events.publish(severity, reason, "Migrate", &note).await;
        if let Some(name) = name {
            status.phase = Some(phase);
            status.destination = report.destination.clone().or(status.destination);
            status.completion_time = Some(jiff::Timestamp::now().to_string());
            status.message = Some(note);
            if let Err(e) = objects.write_status(&name, &status).await {
                warn!(error = %e, "cannot write the VmMigration's outcome");
            }
        }
    }

    /// Runs the move; renews `share` meanwhile and lets it go after. A
    /// share another agent has taken (its renewal conflicts: ours expired
    /// while the API server could not be reached) aborts the move, as the
    /// cluster's cap would no longer hold; a renewal that merely fails is
    /// tried again (the move goes on: stopping it would leave the host short
    /// of memory). A cordon leaves the migration to the evacuation, which
    /// follows it.
    async fn move_holding(
        &self,
        nova: &Arc<NovaClient>,
        plan: &ReliefPlan,
        leases: &MemoryLeases,
        mut share: Lease,
    ) -> VmReport {
        let settings = Settings {
            destination: Some(plan.destination.clone()),
            max_parallel: 1,
            queue_ahead: 0,
            retries: 0,
            timeout: None,
            check_capacity: false,
            ..self.evacuation.clone()
        };
        let (stop, stopping) = watch::channel(StopRequest::Continue);
        let engine = Engine::new(nova.as_ref(), &settings, &ReliefLog);
        let mut moving = std::pin::pin!(engine.move_one(&self.target, plan.chosen.server.clone(), stopping));
        let mut node = self.node.clone();
        let mut renew = tokio::time::interval(self.settings.lease / 3);
        renew.tick().await;
        let report = loop {
            tokio::select! {
                report = &mut moving => break report,
                _ = renew.tick() => match leases.renew(&share).await {
                    Ok(lease) => share = lease,
                    Err(e) if e.taken_by_another() => {
                        warn!(error = %e, "the relief migration was taken by another agent; aborting the move");
                        let _ = stop.send(StopRequest::AbortInFlight);
                    }
                    Err(e) => warn!(error = %e, "cannot renew the relief migration; trying again"),
                },
                Ok(()) = node.changed() => {
                    let cordoned = node.borrow().as_ref().and_then(in_maintenance);
                    if let Some(why) = cordoned {
                        info!("{why}: the relief move is left to the evacuation, which follows it");
                        let _ = stop.send(StopRequest::LeaveInFlight);
                    }
                }
            }
        };
        if let Err(e) = leases.release(&share).await {
            warn!(error = %e, "cannot let the relief migration go; it expires");
        }
        report
    }

    fn spec(&self, plan: &ReliefPlan, dry_run: bool) -> VmMigrationSpec {
        VmMigrationSpec {
            node_name: self.target.node.clone(),
            server_id: plan.chosen.server.id.clone(),
            server_name: plan.chosen.server.name.clone(),
            ram_mb: plan.chosen.server.flavor.ram_mb,
            reason: "MemoryPressure".into(),
            dry_run,
        }
    }

    fn status(
        &self,
        plan: &ReliefPlan,
        reading: Reading,
        phase: VmMigrationPhase,
        message: Option<String>,
    ) -> VmMigrationStatus {
        VmMigrationStatus {
            phase: Some(phase),
            source: Some(self.target.host.clone()),
            destination: Some(plan.destination.clone()),
            mem_available_mib: Some(reading.info.available_mib),
            threshold_mib: Some(reading.threshold_mib),
            short_mib: Some(reading.short_mib),
            why: Some(plan.chosen.why.clone()),
            start_time: Some(jiff::Timestamp::now().to_string()),
            completion_time: None,
            message,
        }
    }

    /// Says once (per reason) why the host under pressure is not relieved.
    async fn tell_held(&self, why: &str) {
        warn!("memory pressure, nothing moved: {why}");
        let node = self.node.borrow().clone();
        if let Some(node) = node {
            let events = ObjectEvents::for_node(self.kube.clone(), &node, &self.instance);
            let _ = events
                .publish(
                    Warning,
                    "MemoryReliefHeld",
                    "Plan",
                    &format!("memory pressure, nothing moved: {why}"),
                )
                .await;
        }
    }
}

/// Keeps this node's pressure Lease while its memory leaves no room
/// (`short`), renewed every third of the lease, also while a move runs;
/// deletes it once there is room again.
async fn keep_telling(leases: MemoryLeases, mut short: watch::Receiver<bool>, lease: Duration) {
    let mut told: Option<bool> = None;
    loop {
        let now_short = *short.borrow_and_update();
        if now_short || told != Some(now_short) {
            match leases.tell_low(now_short).await {
                Ok(()) => told = Some(now_short),
                Err(e) => {
                    warn!(error = %e, "cannot tell the other agents whether this host's memory is low");
                    told = None;
                }
            }
        }
        tokio::select! {
            changed = short.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep(lease / 3), if now_short || told.is_none() => {}
        }
    }
}

/// The engine's events of a relief move, as debug log lines.
struct ReliefLog;

impl Observer for ReliefLog {
    fn event(&self, event: &Event<'_>) {
        debug!(?event, "memory relief");
    }
}
