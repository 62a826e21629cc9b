//! The evacuation's account of itself: one line per VM saying what happened
//! and why, so an operator never has to reconstruct it from logs.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::compute::{Capacity, HostCapacity, Resources};
use super::plan::{Action, ActionFrom, NeedsFrom, Unplaced, VmNeeds, show};

mod table;

/// Hanging indent of a wrapped sentence's further lines.
const PROSE_INDENT: usize = 2;

/// `text` with each line wrapped at `width` as the report's sentences are
/// (for what is printed beside the report, such as the cloud's name).
pub fn fit(text: &str, width: Option<usize>) -> String {
    let mut out = String::new();
    prose(&mut out, text, width);
    out
}

/// Writes `text` line by line, each wrapped at `width` with a hanging
/// indent (a `command` is never broken: it is there to be pasted).
fn prose(out: &mut String, text: &str, width: Option<usize>) {
    for line in text.lines() {
        let words = line.trim_start();
        let lead = &line[..line.len() - words.len()];
        let lines = match width {
            Some(width) => table::wrap(words, width.saturating_sub(lead.len() + PROSE_INDENT)),
            None => vec![words.to_string()],
        };
        for (i, part) in lines.iter().enumerate() {
            let hang = if i == 0 { 0 } else { PROSE_INDENT };
            let _ = writeln!(out, "{lead}{:hang$}{part}", "");
        }
    }
}

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
    /// Stopped by us and left on the host (its tag or the node asked for
    /// `stop`); marked so that the restore starts it again.
    Stopped,
    /// Left on the host untouched, as its tag or the node's default asks.
    Left,
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

    /// Whether the VM stays on the host as asked for (stopped or left by
    /// its tag or the node's default): no reason for the run to fail.
    pub fn is_kept_by_choice(&self) -> bool {
        matches!(self, Outcome::Stopped | Outcome::Left)
    }

    /// As `--output json` spells it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Migrated => "migrated",
            Outcome::Deleted => "deleted",
            Outcome::Skipped => "skipped",
            Outcome::Stopped => "stopped",
            Outcome::Left => "left",
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
    /// Which level chose the action (`action_source`), and the tag if one did (`tag`).
    #[serde(flatten)]
    pub from: ActionFrom,
    pub source: String,
    pub destination: Option<String>,
    pub attempts: u32,
    pub duration_seconds: f64,
    pub outcome: Outcome,
    /// Why, for every outcome but a plain success.
    pub reason: Option<String>,
}

impl VmReport {
    /// The VM as a few sentences, for a terminal too narrow for the table:
    /// nothing cut, everything wrapped.
    fn record(&self) -> String {
        let mut text = format!("{} ({})\n  {}", self.name, self.id, self.outcome.as_str());
        if self.action != Action::Skip {
            text.push_str(&format!(": {} ({})", self.action.as_str(), self.from.source.short()));
            if let Some(destination) = &self.destination {
                text.push_str(&format!(" to {destination}"));
            }
        }
        if self.attempts > 0 {
            text.push_str(&format!(
                ", {} attempt(s), {:.1} s",
                self.attempts, self.duration_seconds
            ));
        }
        text.push_str(&format!(
            "; project {}, {}, {} MiB RAM",
            self.project.as_deref().unwrap_or(&self.project_id),
            self.status,
            self.ram_mb
        ));
        if let Some(reason) = &self.reason {
            text.push_str(&format!("\n  {reason}"));
        }
        text
    }
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

impl RunResult {
    /// As `--output json` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            RunResult::Succeeded => "succeeded",
            RunResult::Failed => "failed",
            RunResult::TimedOut => "timed-out",
            RunResult::Interrupted => "interrupted",
            RunResult::Planned => "planned",
        }
    }
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
    /// What the run could not do as asked, said once (server tags unreadable
    /// below compute API 2.26).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
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
    /// VMs it would stop and leave on the host (tag or node default `stop`).
    pub stops: usize,
    /// Whether the capacity check would stop the run before any migration.
    pub stopped_by_capacity_check: bool,
    /// Ids of the VMs the run would leave on the host and fail for (the
    /// state policy skips them, or their tags cannot be followed); VMs left
    /// by their tag or the node's default are not among them.
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
        let stays: Vec<&VmReport> = vms
            .iter()
            .filter(|vm| vm.action == Action::Skip && !vm.outcome.is_kept_by_choice())
            .collect();
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
            let refused = stays.iter().filter(|vm| vm.outcome == Outcome::Failed).count();
            Some(if refused > 0 {
                format!(
                    "{} VM(s) would stay on the host ({refused} of them with nova-drain: tags that cannot be \
                     followed, see their reasons)",
                    stays.len()
                )
            } else {
                format!(
                    "{} VM(s) would stay on the host ({}: left in place by the state policy, Nova cannot move them)",
                    stays.len(),
                    states.join(", ")
                )
            })
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
            stops: count(Action::Stop),
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
            if self.stops > 0 {
                steps.push(format!("stop {} VM(s) and leave them on the host", self.stops));
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
            RunResult::Succeeded if self.servers_left_on_host > 0 => {
                "evacuated: only VMs stopped or left as their tags or the node ask are on the hypervisor"
            }
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
        let prose = |out: &mut String, text: &str| prose(out, text, view.width);
        prose(
            &mut out,
            &format!(
                "node {} / nova-compute host {}: {verdict} ({} server(s) {left}, {:.1} s)",
                self.node, self.host, self.servers_left_on_host, self.duration_seconds
            ),
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
        prose(&mut out, &format!("service: {service}"));
        for warning in &self.warnings {
            prose(&mut out, &format!("warning: {warning}"));
        }
        if let Some(capacity) = &self.capacity {
            prose(&mut out, &format!("capacity: {}", self.capacity_verdict(capacity)));
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
                prose(
                    &mut out,
                    &format!(
                        "  needs read from the flavor (Placement shows no allocation on this host): {}",
                        guessed.join(", ")
                    ),
                );
            }
            for (id, reason) in &capacity.unplaced_reasons {
                prose(&mut out, &format!("  {id} does not fit: {reason}"));
            }
        }
        if !self.vms.is_empty() {
            match self.table(view.width) {
                Some(table) => out.push_str(&table),
                None => self.vms.iter().for_each(|vm| prose(&mut out, &vm.record())),
            }
        }
        if let Some(prediction) = &self.prediction {
            prose(&mut out, &prediction.describe(&self.host));
        }
        for step in self.next_steps(&view.command) {
            prose(&mut out, &format!("next: {step}"));
        }
        out
    }

    /// One row per VM, fitted to `width` (see [`table`]); `None` when the
    /// width cannot hold the columns even cut.
    fn table(&self, width: Option<usize>) -> Option<String> {
        use table::{Align, Column, Fit};
        let column = |header, align, fit| Column { header, align, fit };
        // A dry run has moved nothing: no destination, attempts or time to show.
        let moved = self.result != RunResult::Planned;
        let mut columns = vec![
            column("id", Align::Left, Fit::Prefix),
            column("name", Align::Left, Fit::Middle),
            column("project", Align::Left, Fit::Middle),
            column("state", Align::Left, Fit::Keep),
            column("RAM MiB", Align::Right, Fit::Keep),
            column("action", Align::Left, Fit::Keep),
            column("by", Align::Left, Fit::Keep),
        ];
        if moved {
            columns.extend([
                column("to", Align::Left, Fit::Keep),
                column("try", Align::Right, Fit::Keep),
                column("secs", Align::Right, Fit::Keep),
            ]);
        }
        columns.push(column("outcome", Align::Left, Fit::Keep));
        let rows: Vec<Vec<String>> = self
            .vms
            .iter()
            .map(|vm| {
                let mut row = vec![
                    vm.id.clone(),
                    vm.name.clone(),
                    vm.project.clone().unwrap_or_else(|| vm.project_id.clone()),
                    vm.status.clone(),
                    vm.ram_mb.to_string(),
                    // The table's short words; `record` and JSON spell them out.
                    match vm.action {
                        Action::LiveMigrate => "live",
                        Action::ColdMigrate => "cold",
                        Action::Stop => "stop",
                        Action::Skip => "skip",
                    }
                    .to_string(),
                    vm.from.source.short().to_string(),
                ];
                if moved {
                    row.extend([
                        vm.destination.clone().unwrap_or_else(|| "-".into()),
                        vm.attempts.to_string(),
                        format!("{:.1}", vm.duration_seconds),
                    ]);
                }
                row.push(vm.outcome.as_str().to_string());
                row
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
                         or move them yourself, then {again}"
                    )]
                } else {
                    vec![format!(
                        "make room on the other hypervisors (or enable another), then {again}; \
                         --skip-capacity-check moves the VMs anyway"
                    )]
                }
            }
            RunResult::Succeeded if self.service_disabled_by_us => {
                let stopped = self.vms.iter().filter(|vm| vm.outcome == Outcome::Stopped).count();
                let starts = if stopped > 0 {
                    format!(" and starts the {stopped} VM(s) it stopped")
                } else {
                    String::new()
                };
                vec![format!(
                    "do the maintenance; afterwards {enable} re-enables nova-compute on {}{starts}",
                    self.host
                )]
            }
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
        let moving = self
            .vms
            .iter()
            .filter(|vm| vm.outcome == Outcome::Planned && vm.action != Action::Stop)
            .count();
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

#[cfg(test)]
mod tests {
    use unicode_width::UnicodeWidthStr;

    use super::*;

    const IDS: [&str; 4] = [
        "0b5c51e4-3f7a-4a57-9e0e-3c8f1d0a6b21",
        "0b5c51e4-9d02-4c1e-8f6a-77e2b4c90d13",
        "7f3e2a10-5b6c-4d8e-9a0b-1c2d3e4f5a6b",
        "c91d4e7f-2a3b-4c5d-8e9f-0a1b2c3d4e5f",
    ];

    /// Four VMs of one fleet, as the lab's acceptance run named them (the old
    /// report showed each as `acc-admin-host1-179~`), in project `admin`.
    fn fleet(result: RunResult) -> Report {
        let vms = IDS
            .iter()
            .enumerate()
            .map(|(i, id)| VmReport {
                id: id.to_string(),
                name: format!("acc-admin-host1-1793-vm-{i}"),
                project_id: "5a1f0c3e9b7d4e2f8a6c1b3d5e7f9a0b".into(),
                project: Some("admin".into()),
                status: "ACTIVE".into(),
                ram_mb: 512,
                action: Action::LiveMigrate,
                from: Default::default(),
                source: "host1".into(),
                destination: (i < 2).then(|| "host2".into()),
                attempts: 1,
                duration_seconds: 6.2,
                outcome: if i < 2 { Outcome::Migrated } else { Outcome::Aborted },
                reason: (i >= 2)
                    .then(|| "the overall time-out of 60 s ran out; aborted, the VM stays on the source".to_string()),
            })
            .collect();
        Report {
            node: "host1".into(),
            host: "host1".into(),
            result,
            service_disabled_by_us: true,
            service_disabled_reason: Some("nova-kubernetes-drain: node host1, run-once on admin pid 4242".into()),
            duration_seconds: 61.0,
            servers_left_on_host: 2,
            vms,
            capacity: None,
            prediction: None,
            warnings: Vec::new(),
        }
    }

    fn view(width: Option<usize>) -> View {
        View {
            width,
            command: "drainer".into(),
        }
    }

    /// The table's rows (those that start with an id, whole or cut).
    fn rows(text: &str) -> Vec<Vec<&str>> {
        text.lines()
            .filter(|line| IDS.iter().any(|id| line.starts_with(&id[..8])))
            .map(|line| line.split_whitespace().collect())
            .collect()
    }

    #[test]
    fn the_report_fits_the_terminal_without_making_two_rows_alike() {
        let report = fleet(RunResult::TimedOut);
        for width in [60, 80, 100, 120] {
            let text = report.to_human(&view(Some(width)));
            for line in text.lines() {
                assert!(line.width() <= width, "{width} columns:\n{text}");
            }
            let rows = rows(&text);
            if rows.is_empty() {
                // Too narrow for the columns: one VM after the other, nothing cut.
                assert!(width < 100, "a table at {width} columns:\n{text}");
                for (i, id) in IDS.iter().enumerate() {
                    let name = format!("acc-admin-host1-1793-vm-{i}");
                    assert!(text.contains(&name) && text.contains(id), "{text}");
                }
                continue;
            }
            assert_eq!(rows.len(), 4, "{width} columns:\n{text}");
            for column in [0, 1] {
                let mut cells: Vec<&str> = rows.iter().map(|row| row[column]).collect();
                cells.sort_unstable();
                cells.dedup();
                assert_eq!(cells.len(), 4, "column {column} at {width} columns:\n{text}");
            }
            // Every reason is there, whole, whatever the width.
            let words: Vec<&str> = text.split_whitespace().collect();
            assert!(
                words
                    .join(" ")
                    .matches("the overall time-out of 60 s ran out; aborted, the VM stays on the source")
                    .count()
                    == 2,
                "{width} columns:\n{text}"
            );
        }
        // 120 columns hold the names whole once the ids are cut.
        let text = report.to_human(&view(Some(120)));
        assert!(text.contains("acc-admin-host1-1793-vm-3"), "{text}");
    }

    #[test]
    fn columns_are_as_wide_as_their_content_and_a_pipe_gets_everything_whole() {
        let text = fleet(RunResult::TimedOut).to_human(&view(None));
        for id in IDS {
            assert!(text.contains(id), "{text}");
        }
        let header = text.lines().find(|l| l.starts_with("id ")).expect("a header");
        assert!(header.contains("  project  state  "), "{header}");
        assert!(header.ends_with("  reason"), "{header}");
        assert!(
            text.lines().any(|l| l.contains("  admin    ACTIVE  ")),
            "admin in a 7-column project column:\n{text}"
        );
    }

    #[test]
    fn a_finished_run_names_the_next_step() {
        let mut report = fleet(RunResult::Succeeded);
        report.servers_left_on_host = 0;
        let text = report.to_human(&View {
            width: Some(80),
            command: "drainer -config-path c.yaml".into(),
        });
        assert!(text.contains("next: do the maintenance; afterwards"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.contains("`drainer -config-path c.yaml -enable --node host1` re-enables")),
            "the command whole on one line: {text}"
        );

        let text = fleet(RunResult::TimedOut).to_human(&view(Some(80)));
        assert!(text.contains("`drainer --node host1` carries on"), "{text}");
        assert!(
            text.contains("call the maintenance off instead: `drainer -enable --node host1`"),
            "{text}"
        );

        let mut theirs = fleet(RunResult::Succeeded);
        (theirs.service_disabled_by_us, theirs.service_disabled_reason) = (false, Some("rack move".into()));
        let text = theirs.to_human(&view(None));
        assert!(
            text.contains("`openstack compute service set --enable host1 nova-compute`"),
            "{text}"
        );
        assert!(!text.contains("-enable --node"), "-enable would refuse: {text}");
    }

    #[test]
    fn a_prediction_names_what_stops_the_run() {
        let mut vms = fleet(RunResult::Planned).vms;
        vms[3].action = Action::Skip;
        vms[3].status = "SUSPENDED".into();
        let prediction = Prediction::new(true, false, &vms, None);
        assert_eq!((prediction.result, prediction.exit_code), (RunResult::Failed, 1));
        assert_eq!(prediction.stays, [IDS[3]]);
        let text = prediction.describe("host1");
        assert!(
            text.starts_with(
                "a run now would: disable nova-compute on host1, live-migrate 3 VM(s), leave 1 VM(s) in place"
            ),
            "{text}"
        );
        assert!(
            text.contains("end FAILED, exit 1: 1 VM(s) would stay on the host (SUSPENDED"),
            "{text}"
        );

        // A shortfall stops a run-once before it disables anything.
        let capacity = CapacityCheck {
            candidates: vec![],
            shared: BTreeMap::new(),
            needs: vec![],
            classes: vec![],
            unplaced: vec![IDS[0].into()],
            unplaced_reasons: BTreeMap::new(),
        };
        let prediction = Prediction::new(true, false, &vms, Some(&capacity));
        assert!(!prediction.disables_service && prediction.stopped_by_capacity_check);
        assert_eq!(prediction.exit_code, 1);
        assert!(Prediction::new(true, true, &vms, Some(&capacity)).disables_service);
    }
}
