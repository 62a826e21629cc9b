//! The evacuation's account of itself: one line per VM saying what happened
//! and why, so an operator never has to reconstruct it from logs.

use std::fmt::Write as _;

use serde::Serialize;

use super::plan::Action;

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
}

impl Report {
    /// Process exit code: 0 only when the host is empty (or nothing would need moving in a dry run).
    pub fn exit_code(&self) -> i32 {
        match self.result {
            RunResult::Succeeded | RunResult::Planned => 0,
            _ => 1,
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
            (Some(reason), true) => format!("disabled by us ({reason})"),
            (Some(reason), false) => format!("disabled by someone else ({reason}); left as it is"),
            (None, _) => "enabled".to_string(),
        };
        let _ = writeln!(out, "service: {service}");
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
                truncate(&vm.project_id, 32),
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
