//! The evacuation's account of itself: one line per VM saying what happened
//! and why, so an operator never has to reconstruct it from logs.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::compute::{Capacity, HostCapacity, Resources};
use super::plan::{Action, NeedsFrom, Unplaced, VmNeeds, show};

mod table;

/// What finally happened to one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Now runs on another host.
    Migrated,
    /// Was deleted by someone while the evacuation ran.
    Deleted,
    /// Left alone by the state policy.
    Skipped,
    /// Every attempt failed, or the VM is in a state that forbids moving it.
    Failed,
    /// Its migration was aborted (budget, stall or time-out) and it stayed on the source.
    Aborted,
    /// Still migrating when the run ended; Nova goes on with it.
    InProgress,
    /// Never started: the run ended first.
    NotStarted,
    /// Would be moved (dry run).
    Planned,
}

impl Outcome {
    /// Whether the VM is no longer a reason for the host to hold VMs.
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Migrated | Outcome::Deleted)
    }

    /// As `--output json` spells it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Migrated => "migrated",
            Outcome::Deleted => "deleted",
            Outcome::Skipped => "skipped",
            Outcome::Failed => "failed",
            Outcome::Aborted => "aborted",
            Outcome::InProgress => "in-progress",
            Outcome::NotStarted => "not-started",
            Outcome::Planned => "planned",
        }
    }
}

/// One VM's line in the report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VmReport {
    pub id: String,
    pub name: String,
    pub project_id: String,
    /// The project's name, when Keystone told it.
    pub project: Option<String>,
    /// Nova status when the evacuation found it.
    pub status: String,
    pub ram_mb: u64,
    pub action: Action,
    pub source: String,
    pub destination: Option<String>,
    pub attempts: u32,
    pub duration_seconds: f64,
    pub outcome: Outcome,
    /// Why, for every outcome but a plain success.
    pub reason: Option<String>,
}

/// How the whole run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunResult {
    /// The host is empty.
    Succeeded,
    /// Some VM could not be moved.
    Failed,
    /// The overall time-out ended the run first.
    TimedOut,
    /// Stopped from outside (signal, uncordon) before the end.
    Interrupted,
    /// Dry run: nothing was changed.
    Planned,
}

/// The capacity check's verdict, as a dry run shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CapacityCheck {
    /// The enabled, up hypervisors the VMs may go to, with what they have free.
    pub candidates: Vec<HostCapacity>,
    /// Free amounts of the sharing providers candidates draw on, by name.
    pub shared: BTreeMap<String, Resources>,
    /// What each VM to move needs on its destination, and where that was read.
    pub needs: Vec<VmNeeds>,
    /// Per resource class some VM needs: the total needed and the total free
    /// on the candidates (each sharing provider counted once).
    pub classes: Vec<ClassBalance>,
    /// Ids of the VMs that would not fit (none: they all fit).
    pub unplaced: Vec<String>,
    /// Why each of those does not fit, naming the classes in the way.
    pub unplaced_reasons: BTreeMap<String, String>,
}

/// One resource class's balance in the capacity check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClassBalance {
    pub class: String,
    pub needed: u64,
    pub free: u64,
}

impl CapacityCheck {
    pub fn new(capacity: Capacity, needs: Vec<VmNeeds>, unplaced: Vec<Unplaced>) -> CapacityCheck {
        let mut needed: BTreeMap<&str, u64> = BTreeMap::new();
        for (class, amount) in needs.iter().flat_map(|n| &n.resources) {
            *needed.entry(class).or_default() += amount;
        }
        let classes = needed
            .into_iter()
            .map(|(class, needed)| {
                let own: u64 = capacity.hosts.iter().filter_map(|h| h.free.get(class)).sum();
                let pools: std::collections::BTreeSet<&String> =
                    capacity.hosts.iter().filter_map(|h| h.shared.get(class)).collect();
                let pooled: u64 = pools
                    .into_iter()
                    .filter_map(|pool| capacity.shared.get(pool)?.get(class))
                    .sum();
                ClassBalance {
                    class: class.to_string(),
                    needed,
                    free: own + pooled,
                }
            })
            .collect();
        CapacityCheck {
            candidates: capacity.hosts,
            shared: capacity.shared,
            needs,
            classes,
            unplaced: unplaced.iter().map(|u| u.needs.id.clone()).collect(),
            unplaced_reasons: unplaced.into_iter().map(|u| (u.needs.id, u.reason)).collect(),
        }
    }
}

/// The whole evacuation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub node: String,
    pub host: String,
    pub result: RunResult,
    /// Whether this run (or an earlier one of ours) disabled the service.
    pub service_disabled_by_us: bool,
    pub service_disabled_reason: Option<String>,
    pub duration_seconds: f64,
    /// Servers Nova still lists on the host at the end.
    pub servers_left_on_host: usize,
    pub vms: Vec<VmReport>,
    /// A dry run's capacity check (none when skipped, and in a real run,
    /// which stops with an error on a shortfall).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<CapacityCheck>,
    /// A dry run's forecast of the real run (none in a real run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction: Option<Prediction>,
}

/// Where the human report is read, which decides its layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    /// The columns to fit, a terminal's width; `None` (a pipe, a file) cuts nothing.
    pub width: Option<usize>,
    /// How the operator runs the drainer (`drainer -config-path c.yaml`): the
    /// next steps name commands to paste.
    pub command: String,
}

impl Default for View {
    fn default() -> Self {
        View {
            width: None,
            command: "drainer".into(),
        }
    }
}

/// What the real run would do now, and how it would end, as a dry run
/// forecasts it: a dry run that exits 0 where the run exits 1 would send an
/// operator into a maintenance that cannot finish. It assumes every
/// migration Nova is asked for succeeds; failures no look ahead can see
/// (a destination that refuses, a migration that never converges) can still
/// make the run end worse.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Prediction {
    /// Whether the run would disable the nova-compute service (it is enabled
    /// and nothing stops the run before).
    pub disables_service: bool,
    pub live_migrations: usize,
    pub cold_migrations: usize,
    /// Whether the capacity check would stop the run before any migration.
    pub stopped_by_capacity_check: bool,
    /// Ids of the VMs the run would leave on the host (the state policy skips them).
    pub stays: Vec<String>,
    /// How the run would end: `succeeded` or `failed`.
    pub result: RunResult,
    /// The exit code it would end with; the dry run exits with it too.
    pub exit_code: i32,
    /// Why it would not succeed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

impl Prediction {
    /// The forecast from a dry run's plan (`vms`) and capacity check, for a
    /// service now `enabled`; `disable_first` when the run disables the
    /// service before it checks the capacity (the agent: the node is cordoned already).
    pub fn new(enabled: bool, disable_first: bool, vms: &[VmReport], capacity: Option<&CapacityCheck>) -> Prediction {
        let count = |action| vms.iter().filter(|vm| vm.action == action).count();
        let stays: Vec<&VmReport> = vms.iter().filter(|vm| vm.action == Action::Skip).collect();
        let shortfall = capacity.map(|c| c.unplaced.len()).filter(|n| *n > 0);
        let why = if let Some(unplaced) = shortfall {
            Some(format!(
                "the capacity check would stop it before any migration: {unplaced} VM(s) do not fit on the other \
                 hypervisors"
            ))
        } else if !stays.is_empty() {
            let mut states: Vec<&str> = stays.iter().map(|vm| vm.status.as_str()).collect();
            states.sort_unstable();
            states.dedup();
            Some(format!(
                "{} VM(s) would stay on the host ({}: left in place by the state policy, Nova cannot move them)",
                stays.len(),
                states.join(", ")
            ))
        } else {
            None
        };
        let (result, exit_code) = match why {
            None => (RunResult::Succeeded, crate::exit::DONE),
            Some(_) => (RunResult::Failed, crate::exit::FAILED),
        };
        Prediction {
            disables_service: enabled && (shortfall.is_none() || disable_first),
            stopped_by_capacity_check: shortfall.is_some(),
            live_migrations: count(Action::LiveMigrate),
            cold_migrations: count(Action::ColdMigrate),
            stays: stays.iter().map(|vm| vm.id.clone()).collect(),
            result,
            exit_code,
            why,
        }
    }

    /// The forecast in two lines: what the run would do, and how it would end.
    pub fn describe(&self, host: &str) -> String {
        let mut steps = Vec::new();
        if self.disables_service {
            steps.push(format!("disable nova-compute on {host}"));
        }
        if self.stopped_by_capacity_check {
            steps.push("stop at the capacity check, before any migration".to_string());
        } else {
            if self.live_migrations > 0 {
                steps.push(format!("live-migrate {} VM(s)", self.live_migrations));
            }
            if self.cold_migrations > 0 {
                steps.push(format!("cold-migrate {} VM(s)", self.cold_migrations));
            }
            if !self.stays.is_empty() {
                steps.push(format!("leave {} VM(s) in place", self.stays.len()));
            }
        }
        let plan = if steps.is_empty() {
            "change nothing (no VM on the host, the service already disabled)".to_string()
        } else {
            steps.join(", ")
        };
        let ending = match &self.why {
            None => format!(
                "end with the host empty, exit {}, if every migration succeeds",
                self.exit_code
            ),
            Some(why) => format!("end FAILED, exit {}: {why}", self.exit_code),
        };
        format!(
            "a run now would: {plan}\nit would {ending}; this dry run exits {} likewise",
            self.exit_code
        )
    }
}

impl Report {
    /// Process exit code: 0 only when the host is empty; a dry run exits as
    /// the run it plans would end ([`Prediction::exit_code`]).
    pub fn exit_code(&self) -> i32 {
        match self.result {
            RunResult::Succeeded => crate::exit::DONE,
            RunResult::Planned => match &self.prediction {
                Some(prediction) => prediction.exit_code,
                None => crate::exit::DONE,
            },
            RunResult::Interrupted => crate::exit::INTERRUPTED,
            RunResult::Failed | RunResult::TimedOut => crate::exit::FAILED,
        }
    }

    /// The report as an operator reads it, laid out for `view`.
    pub fn to_human(&self, view: &View) -> String {
        let mut out = String::new();
        let verdict = match self.result {
            RunResult::Succeeded => "evacuated: the hypervisor is empty",
            RunResult::Failed => "FAILED: VMs are left on the hypervisor",
            RunResult::TimedOut => "TIMED OUT: VMs are left on the hypervisor",
            RunResult::Interrupted => "INTERRUPTED: VMs are left on the hypervisor",
            RunResult::Planned => "dry run: nothing was changed",
        };
        let left = if self.result == RunResult::Planned {
            "on the host"
        } else {
            "left"
        };
        let _ = writeln!(
            out,
            "node {} / nova-compute host {}: {verdict} ({} server(s) {left}, {:.1} s)",
            self.node, self.host, self.servers_left_on_host, self.duration_seconds
        );
        let service = match (&self.service_disabled_reason, self.service_disabled_by_us) {
            // A dry run changed nothing: the marker is an earlier run's.
            (Some(reason), true) if self.result == RunResult::Planned => {
                format!("disabled by an earlier drainer run ({reason}); `-enable` re-enables it")
            }
            (Some(reason), true) => format!("disabled by us ({reason})"),
            (Some(reason), false) => format!("disabled by someone else ({reason}); left as it is"),
            (None, _) => "enabled".to_string(),
        };
        let _ = writeln!(out, "service: {service}");
        if let Some(capacity) = &self.capacity {
            let _ = writeln!(out, "capacity: {}", self.capacity_verdict(capacity));
            for balance in &capacity.classes {
                let _ = writeln!(
                    out,
                    "  {:<20}  needed {:>10}  free {:>10}",
                    balance.class, balance.needed, balance.free
                );
            }
            let guessed: Vec<&str> = capacity
                .needs
                .iter()
                .filter(|n| n.from == NeedsFrom::Flavor)
                .map(|n| n.id.as_str())
                .collect();
            if !guessed.is_empty() {
                let _ = writeln!(
                    out,
                    "  needs read from the flavor (Placement shows no allocation on this host): {}",
                    guessed.join(", ")
                );
            }
            for (id, reason) in &capacity.unplaced_reasons {
                let _ = writeln!(out, "  {id} does not fit: {reason}");
            }
        }
        if !self.vms.is_empty() {
            out.push_str(&self.table(view.width));
        }
        if let Some(prediction) = &self.prediction {
            let _ = writeln!(out, "{}", prediction.describe(&self.host));
        }
        for step in self.next_steps(&view.command) {
            let _ = writeln!(out, "next: {step}");
        }
        out
    }

    /// One row per VM, fitted to `width` (see [`table`]).
    fn table(&self, width: Option<usize>) -> String {
        use table::{Align, Column, Fit};
        let column = |header, align, fit| Column { header, align, fit };
        let columns = [
            column("id", Align::Left, Fit::Prefix),
            column("name", Align::Left, Fit::Middle),
            column("project", Align::Left, Fit::Middle),
            column("state", Align::Left, Fit::Keep),
            column("RAM MiB", Align::Right, Fit::Keep),
            column("action", Align::Left, Fit::Keep),
            column("to", Align::Left, Fit::Keep),
            column("try", Align::Right, Fit::Keep),
            column("seconds", Align::Right, Fit::Keep),
            column("outcome", Align::Left, Fit::Keep),
        ];
        let rows: Vec<Vec<String>> = self
            .vms
            .iter()
            .map(|vm| {
                vec![
                    vm.id.clone(),
                    vm.name.clone(),
                    vm.project.clone().unwrap_or_else(|| vm.project_id.clone()),
                    vm.status.clone(),
                    vm.ram_mb.to_string(),
                    vm.action.as_str().to_string(),
                    vm.destination.clone().unwrap_or_else(|| "-".into()),
                    vm.attempts.to_string(),
                    format!("{:.1}", vm.duration_seconds),
                    vm.outcome.as_str().to_string(),
                ]
            })
            .collect();
        let reasons: Vec<Option<String>> = self.vms.iter().map(|vm| vm.reason.clone()).collect();
        table::render(&columns, &rows, &reasons, "reason", width)
    }

    /// What the operator does next, with the commands to type; `command` is
    /// how they run the drainer (`drainer -config-path c.yaml`).
    pub fn next_steps(&self, command: &str) -> Vec<String> {
        let again = format!("`{command} --node {}`", self.node);
        let enable = format!("`{command} -enable --node {}`", self.node);
        let by_hand = format!("`openstack compute service set --enable {} nova-compute`", self.host);
        let still_moving = self.vms.iter().any(|vm| vm.outcome == Outcome::InProgress);
        match self.result {
            RunResult::Planned => {
                let Some(prediction) = &self.prediction else {
                    return vec![];
                };
                if prediction.exit_code == crate::exit::DONE {
                    vec![format!("{again} evacuates the host")]
                } else if !prediction.stays.is_empty() {
                    vec![format!(
                        "make the VMs that would stay movable (resume a SUSPENDED one, ask its owner about an ERROR one) \
                         or move them yourself, then {again}; a run now would move the others and exit 1"
                    )]
                } else {
                    vec![format!(
                        "make room on the other hypervisors (or enable another), then {again}; \
                         --skip-capacity-check moves the VMs anyway"
                    )]
                }
            }
            RunResult::Succeeded if self.service_disabled_by_us => vec![format!(
                "do the maintenance; afterwards {enable} re-enables nova-compute on {}",
                self.host
            )],
            RunResult::Succeeded => match &self.service_disabled_reason {
                Some(_) => vec![format!(
                    "do the maintenance; nova-compute on {} stays disabled as someone else left it (-enable \
                     does not touch it): {by_hand} when it should take VMs again",
                    self.host
                )],
                None => vec![],
            },
            RunResult::Failed | RunResult::TimedOut => {
                let mut steps = vec![format!(
                    "{} VM(s) are still on {}: act on the reasons above, then {again} carries on with what is left",
                    self.servers_left_on_host, self.host
                )];
                if still_moving {
                    steps.push("migrations left in progress go on in Nova; a new run follows them".to_string());
                }
                steps.push(self.call_off(&enable, &by_hand, still_moving));
                steps
            }
            RunResult::Interrupted => {
                let mut steps = vec![format!("{again} carries on with what is left")];
                if still_moving {
                    steps[0] = format!(
                        "migrations in flight go on in Nova; {again} carries on with what is left and follows them"
                    );
                }
                steps.push(self.call_off(&enable, &by_hand, still_moving));
                steps
            }
        }
    }

    /// How to give up the maintenance and let the host take VMs again.
    fn call_off(&self, enable: &str, by_hand: &str, still_moving: bool) -> String {
        match (self.service_disabled_by_us, still_moving) {
            (true, false) => format!("to call the maintenance off instead: {enable}"),
            (true, true) => format!(
                "to call the maintenance off instead: {enable} once the migrations in flight have ended \
                 (--force enables at once)"
            ),
            (false, _) if self.service_disabled_reason.is_some() => format!(
                "nova-compute on {} was disabled by someone else and stays so; {by_hand} enables it",
                self.host
            ),
            (false, _) => format!("nova-compute on {} is enabled", self.host),
        }
    }

    fn capacity_verdict(&self, capacity: &CapacityCheck) -> String {
        let moving = self.vms.iter().filter(|vm| vm.outcome == Outcome::Planned).count();
        let mut candidates: Vec<&HostCapacity> = capacity.candidates.iter().collect();
        candidates.sort_by(|a, b| a.host.cmp(&b.host));
        let hosts: Vec<String> = candidates
            .into_iter()
            .map(|h| {
                let shared: Vec<String> = h
                    .shared
                    .iter()
                    .map(|(class, pool)| format!("; {class} from {pool}"))
                    .collect();
                format!("{} ({} free{})", h.host, show(&h.free), shared.concat())
            })
            .collect();
        let hosts = if hosts.is_empty() {
            "no other enabled, up hypervisor".to_string()
        } else {
            hosts.join(", ")
        };
        if capacity.unplaced.is_empty() {
            format!("the {moving} VM(s) to move fit on {hosts}")
        } else {
            format!(
                "SHORTFALL: {} of the {moving} VM(s) to move do not fit ({}) on {hosts}; a run would stop before changing anything",
                capacity.unplaced.len(),
                capacity.unplaced.join(", ")
            )
        }
    }
}
