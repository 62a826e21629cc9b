//! The evacuation's account of itself: one line per VM saying what happened
//! and why, so an operator never has to reconstruct it from logs.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::compute::{Capacity, HostCapacity, Resources};
use super::plan::{Action, NeedsFrom, Unplaced, VmNeeds, show};

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
}

impl Report {
    /// Process exit code: 0 only when the host is empty, or for a dry run
    /// whose VMs fit elsewhere (a real run would stop on the shortfall).
    pub fn exit_code(&self) -> i32 {
        let shortfall = self.capacity.as_ref().is_some_and(|c| !c.unplaced.is_empty());
        match self.result {
            RunResult::Succeeded => crate::exit::DONE,
            RunResult::Planned if !shortfall => crate::exit::DONE,
            RunResult::Interrupted => crate::exit::INTERRUPTED,
            _ => crate::exit::FAILED,
        }
    }

    /// The report as an operator reads it on a terminal.
    pub fn to_human(&self) -> String {
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
        if self.vms.is_empty() {
            return out;
        }
        let _ = writeln!(
            out,
            "{:<36}  {:<20}  {:<32}  {:<9}  {:>7}  {:<12}  {:<14}  {:>3}  {:>7}  {:<11}  reason",
            "id", "name", "project", "state", "RAM MiB", "action", "destination", "try", "seconds", "outcome"
        );
        for vm in &self.vms {
            let action = match vm.action {
                Action::LiveMigrate => "live-migrate",
                Action::ColdMigrate => "cold-migrate",
                Action::Skip => "skip",
            };
            let line = format!(
                "{:<36}  {:<20}  {:<32}  {:<9}  {:>7}  {:<12}  {:<14}  {:>3}  {:>7.1}  {:<11}  {}",
                vm.id,
                truncate(&vm.name, 20),
                truncate(vm.project.as_deref().unwrap_or(&vm.project_id), 32),
                vm.status,
                vm.ram_mb,
                action,
                vm.destination.as_deref().unwrap_or("-"),
                vm.attempts,
                vm.duration_seconds,
                serde_json::to_value(&vm.outcome)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                vm.reason.as_deref().unwrap_or("")
            );
            // No padding left at the end of a line without a reason.
            let _ = writeln!(out, "{}", line.trim_end());
        }
        out
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

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_string()
    } else {
        let mut cut: String = text.chars().take(width - 1).collect();
        cut.push('~');
        cut
    }
}
