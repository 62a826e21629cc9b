//! The Evacuation's status as the agent writes it: built from the engine's
//! events while a run goes on, and from its report when it ends. Plain
//! functions, so that what an operator reads with `kubectl get evacuation -o
//! yaml` is tested without a cluster.

use crate::evacuation::{Action, Event, Outcome, Report, RunResult, Server, VmReport};
use crate::kube::evacuation::{
    EvacuationCondition, EvacuationPhase, EvacuationStatus, PlanVerdict, VmCounts, VmStatus,
};

/// What the engine's observer hands the agent while a run goes on.
#[derive(Clone, Debug, PartialEq)]
pub enum Progress {
    /// VMs still on the hypervisor.
    Left(usize),
    /// The run found `total` VMs.
    Found { total: usize },
    /// What became of one VM so far.
    Vm(Box<VmStatus>),
}

/// The status of a run that starts now on `host`.
pub fn started(host: &str, at: &str) -> EvacuationStatus {
    EvacuationStatus {
        phase: Some(EvacuationPhase::Running),
        nova_host: Some(host.to_string()),
        start_time: Some(at.to_string()),
        ..EvacuationStatus::default()
    }
}

/// The status of an evacuation waiting for a slot, at `position` in the
/// queue (`None`: not known yet); what an earlier run or plan wrote is kept.
pub fn waiting(written: EvacuationStatus, host: &str, position: Option<u32>) -> EvacuationStatus {
    EvacuationStatus {
        phase: Some(EvacuationPhase::Waiting),
        nova_host: Some(host.to_string()),
        queue_position: position,
        completion_time: None,
        ..written
    }
}

/// The status of a hand-made Evacuation the agent has taken on, before its run.
pub fn pending(host: &str) -> EvacuationStatus {
    EvacuationStatus {
        phase: Some(EvacuationPhase::Pending),
        nova_host: Some(host.to_string()),
        ..EvacuationStatus::default()
    }
}

/// The status of a run that starts from an approved plan: the plan kept
/// beside the run, whose VMs are recorded anew as they move.
pub fn from_plan(written: EvacuationStatus, host: &str, at: &str) -> EvacuationStatus {
    EvacuationStatus {
        plan: written.plan,
        ..started(host, at)
    }
}

/// The status of a paused evacuation: each VM with the action the run
/// would take (`planned`, or `skipped` by policy; a VM the capacity check
/// cannot place says why), and the verdict a person approves by.
pub fn planned(host: &str, report: &Report) -> EvacuationStatus {
    let unplaced = report.capacity.as_ref().map(|c| &c.unplaced_reasons);
    let vms: Vec<VmStatus> = report
        .vms
        .iter()
        .map(|vm| VmStatus {
            reason: vm.reason.clone().or_else(|| {
                unplaced
                    .and_then(|u| u.get(&vm.id))
                    .map(|why| format!("does not fit: {why}"))
            }),
            ..vm_of(vm, None)
        })
        .collect();
    let count =
        |outcome: &str| u32::try_from(vms.iter().filter(|vm| vm.outcome == outcome).count()).unwrap_or(u32::MAX);
    let prediction = report.prediction.as_ref();
    let plan = PlanVerdict {
        live_migrations: count_of(prediction.map(|p| p.live_migrations)),
        cold_migrations: count_of(prediction.map(|p| p.cold_migrations)),
        stays: count_of(prediction.map(|p| p.stays.len())),
        capacity_fits: report.capacity.as_ref().map(|c| c.unplaced.is_empty()),
        destinations: report
            .capacity
            .iter()
            .flat_map(|c| &c.candidates)
            .map(|candidate| {
                format!(
                    "{} (free: {})",
                    candidate.host,
                    crate::evacuation::plan::show(&candidate.free)
                )
            })
            .collect(),
        expected_result: prediction.map_or("unknown", |p| p.result.as_str()).to_string(),
        why: prediction.and_then(|p| p.why.clone()),
    };
    EvacuationStatus {
        phase: Some(EvacuationPhase::Paused),
        nova_host: Some(host.to_string()),
        service_disabled_by_us: Some(report.service_disabled_by_us),
        counts: Some(VmCounts {
            total: u32::try_from(vms.len()).unwrap_or(u32::MAX),
            skipped: count("skipped"),
            left: u32::try_from(report.servers_left_on_host).unwrap_or(u32::MAX),
            ..VmCounts::default()
        }),
        vms,
        plan: Some(plan),
        ..EvacuationStatus::default()
    }
}

fn count_of(n: Option<usize>) -> u32 {
    n.map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// The status of a run an agent resumes after a restart: what the earlier
/// agent wrote (its VMs, times), running again.
pub fn resumed(written: EvacuationStatus, host: &str, at: &str) -> EvacuationStatus {
    EvacuationStatus {
        phase: Some(EvacuationPhase::Running),
        nova_host: Some(host.to_string()),
        start_time: written.start_time.clone().or_else(|| Some(at.to_string())),
        completion_time: None,
        last_error: None,
        queue_position: None,
        ..written
    }
}

/// Outcomes of a VM that is off the hypervisor.
fn is_off_host(outcome: &str) -> bool {
    matches!(outcome, "migrated" | "deleted" | NOT_ON_HOST)
}

/// The outcome of a VM an earlier agent was moving, found gone from the
/// hypervisor by the agent that resumed the run.
const NOT_ON_HOST: &str = "not-on-host";

fn entry(server: &Server, action: Option<Action>) -> VmStatus {
    VmStatus {
        id: server.id.clone(),
        name: server.name.clone(),
        project: server.project_id.clone(),
        state: server.status.clone(),
        action: action.map_or("", Action::as_str).to_string(),
        source: server.host.clone().unwrap_or_default(),
        outcome: "pending".into(),
        ..VmStatus::default()
    }
}

/// What an engine event tells about the run, if anything worth recording
/// (`now`: RFC 3339, for a VM's start time).
pub fn progress_of(event: &Event<'_>, now: &str) -> Option<Progress> {
    Some(match event {
        Event::EvacuationStarted { to_move, to_skip } => Progress::Found {
            total: to_move + to_skip,
        },
        Event::MigrationStarted {
            server,
            action,
            attempt,
        } => Progress::Vm(Box::new(VmStatus {
            attempts: *attempt,
            start_time: Some(now.to_string()),
            outcome: "moving".into(),
            ..entry(server, Some(*action))
        })),
        Event::MigrationSucceeded {
            server,
            action,
            destination,
            seconds,
        } => Progress::Vm(Box::new(VmStatus {
            destination: Some(destination.to_string()),
            seconds: Some(*seconds),
            outcome: "migrated".into(),
            ..entry(server, Some(*action))
        })),
        Event::MigrationFailed {
            server,
            action,
            reason,
            retry_in,
        } => Progress::Vm(Box::new(VmStatus {
            outcome: if retry_in.is_some() { "moving" } else { "failed" }.into(),
            reason: Some(reason.to_string()),
            ..entry(server, Some(*action))
        })),
        Event::Stopped { server } => Progress::Vm(Box::new(VmStatus {
            outcome: "stopped".into(),
            ..entry(server, Some(Action::Stop))
        })),
        Event::NotMigratable { server, reason } => Progress::Vm(Box::new(VmStatus {
            outcome: "failed".into(),
            reason: Some(reason.to_string()),
            ..entry(server, None)
        })),
        _ => return None,
    })
}

/// Folds one piece of progress into the status: a VM's entry keeps what an
/// earlier event told (its start, attempts, action) unless this one tells more.
pub fn apply(status: &mut EvacuationStatus, progress: Progress) {
    match progress {
        Progress::Left(left) => {
            let counts = status.counts.get_or_insert_with(VmCounts::default);
            counts.left = u32::try_from(left).unwrap_or(u32::MAX);
        }
        Progress::Found { total } => {
            // A resumed run finds only what is still on the hypervisor; the
            // VMs the earlier agent moved off count too.
            let moved = status.vms.iter().filter(|vm| is_off_host(&vm.outcome)).count();
            let found = u32::try_from(total).unwrap_or(u32::MAX);
            status.counts = Some(VmCounts {
                total: found.saturating_add(u32::try_from(moved).unwrap_or(u32::MAX)),
                moved: u32::try_from(moved).unwrap_or(u32::MAX),
                left: found,
                ..VmCounts::default()
            });
        }
        Progress::Vm(update) => {
            match status.vms.iter_mut().find(|vm| vm.id == update.id) {
                Some(known) => {
                    let earlier = std::mem::replace(known, *update);
                    known.start_time = known.start_time.take().or(earlier.start_time);
                    known.attempts = known.attempts.max(earlier.attempts);
                    if known.action.is_empty() {
                        known.action = earlier.action;
                    }
                }
                None => status.vms.push(*update),
            }
            let moved = status.vms.iter().filter(|vm| is_off_host(&vm.outcome)).count();
            let failed = status.vms.iter().filter(|vm| vm.outcome == "failed").count();
            let counts = status.counts.get_or_insert_with(VmCounts::default);
            counts.moved = u32::try_from(moved).unwrap_or(u32::MAX);
            counts.failed = u32::try_from(failed).unwrap_or(u32::MAX);
        }
    }
}

fn vm_of(vm: &VmReport, earlier: Option<&VmStatus>) -> VmStatus {
    VmStatus {
        id: vm.id.clone(),
        name: vm.name.clone(),
        project: vm.project.clone().unwrap_or_else(|| vm.project_id.clone()),
        state: vm.status.clone(),
        action: vm.action.as_str().to_string(),
        attempts: vm.attempts,
        source: vm.source.clone(),
        destination: vm.destination.clone(),
        start_time: earlier.and_then(|e| e.start_time.clone()),
        seconds: (vm.duration_seconds > 0.0).then_some(vm.duration_seconds),
        outcome: vm.outcome.as_str().to_string(),
        reason: vm.reason.clone(),
    }
}

/// The status of a finished run from its report; `cancelled`: an uncordon
/// stopped it. Start times of the VMs come from what was recorded during the
/// run; VMs recorded earlier that the report does not list (moved off before
/// an agent restart) are kept, a move left unfinished then as `not-on-host`.
pub fn finished(status: &EvacuationStatus, report: &Report, cancelled: bool, at: &str) -> EvacuationStatus {
    let mut vms: Vec<VmStatus> = report
        .vms
        .iter()
        .map(|vm| vm_of(vm, status.vms.iter().find(|e| e.id == vm.id)))
        .collect();
    let earlier = status
        .vms
        .iter()
        .filter(|e| !report.vms.iter().any(|vm| vm.id == e.id))
        .map(|e| match e.outcome.as_str() {
            "pending" | "moving" => VmStatus {
                outcome: NOT_ON_HOST.into(),
                reason: Some("no longer on the hypervisor when the agent resumed the run".into()),
                ..e.clone()
            },
            _ => e.clone(),
        });
    vms.extend(earlier);
    let count =
        |f: &dyn Fn(&str) -> bool| u32::try_from(vms.iter().filter(|vm| f(&vm.outcome)).count()).unwrap_or(u32::MAX);
    let phase = match report.result {
        RunResult::Succeeded => EvacuationPhase::Succeeded,
        RunResult::Interrupted => EvacuationPhase::Cancelled,
        _ if cancelled => EvacuationPhase::Cancelled,
        RunResult::Failed | RunResult::TimedOut | RunResult::Planned => EvacuationPhase::Failed,
    };
    let last_error = last_error(report, phase);
    EvacuationStatus {
        phase: Some(phase),
        nova_host: Some(report.host.clone()),
        service_disabled_by_us: Some(report.service_disabled_by_us),
        start_time: status.start_time.clone(),
        completion_time: Some(at.to_string()),
        counts: Some(VmCounts {
            total: u32::try_from(vms.len()).unwrap_or(u32::MAX),
            moved: count(&is_off_host),
            skipped: count(&|o| o == "skipped"),
            stopped: count(&|o| o == "stopped"),
            // Not moved for a reason of its own; what the run's end or an
            // uncordon stopped (not started, left to Nova, aborted by the
            // cancel) is only left.
            failed: count(&|o| o == "failed" || (o == "aborted" && phase != EvacuationPhase::Cancelled)),
            left: u32::try_from(report.servers_left_on_host).unwrap_or(u32::MAX),
        }),
        vms,
        plan: status.plan.clone(),
        conditions: status.conditions.clone(),
        observed_generation: status.observed_generation,
        last_error,
        queue_position: None,
    }
}

/// What kept the run from emptying the host, unless it did: the time-out,
/// or the VMs that failed, else (a run failed only by what policy left in
/// place) those left alone.
fn last_error(report: &Report, phase: EvacuationPhase) -> Option<String> {
    let describe = |vm: &&VmReport| {
        format!(
            "{} ({}): {}",
            vm.name,
            vm.id,
            vm.reason.as_deref().unwrap_or("not moved")
        )
    };
    let mut failures: Vec<String> = report
        .vms
        .iter()
        .filter(|vm| !vm.outcome.is_success() && !vm.outcome.is_kept_by_choice() && vm.outcome != Outcome::Skipped)
        .map(|vm| describe(&vm))
        .collect();
    if failures.is_empty() {
        failures = report
            .vms
            .iter()
            .filter(|vm| !vm.outcome.is_success())
            .map(|vm| describe(&vm))
            .collect();
    }
    match (phase, report.result) {
        (EvacuationPhase::Succeeded, _) => None,
        (_, RunResult::TimedOut) => Some(format!(
            "the time-out ended the run with {} VM(s) on the hypervisor",
            report.servers_left_on_host
        )),
        _ if failures.is_empty() => None,
        _ => Some(failures.join("; ")),
    }
}

/// Sets the status's conditions from its phase and counts; one whose status
/// does not change keeps its transition time (`now`, RFC 3339, otherwise).
pub fn set_conditions(status: &mut EvacuationStatus, now: &str) {
    let phase = status.phase;
    let left = status.counts.map(|c| c.left);
    let phase_word = phase.map_or("Pending", |p| match p {
        EvacuationPhase::Pending => "Pending",
        EvacuationPhase::Paused => "Paused",
        EvacuationPhase::Waiting => "Waiting",
        EvacuationPhase::Running => "Running",
        EvacuationPhase::Succeeded => "Succeeded",
        EvacuationPhase::Failed => "Failed",
        EvacuationPhase::Cancelled => "Cancelled",
    });
    let wanted = [
        match phase {
            Some(EvacuationPhase::Paused) => (
                "Approved",
                "False",
                "Paused",
                "spec.paused is true: the plan is in the status; set it to false to start".to_string(),
            ),
            _ => ("Approved", "True", "NotPaused", "the run may change Nova".to_string()),
        },
        match phase {
            Some(EvacuationPhase::Running) => ("Progressing", "True", "Running", "VMs are being moved".to_string()),
            Some(EvacuationPhase::Waiting) => (
                "Progressing",
                "False",
                "Waiting",
                match status.queue_position {
                    Some(position) => format!("waiting for an evacuation slot: position {position} in the queue"),
                    None => "waiting for an evacuation slot".to_string(),
                },
            ),
            _ => (
                "Progressing",
                "False",
                phase_word,
                status
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "no run going on".to_string()),
            ),
        },
        match left {
            Some(0) => (
                "HypervisorEmpty",
                "True",
                "Empty",
                "no VM left on the hypervisor".to_string(),
            ),
            Some(n) => (
                "HypervisorEmpty",
                "False",
                "VMsLeft",
                format!("{n} VM(s) on the hypervisor"),
            ),
            None => (
                "HypervisorEmpty",
                "Unknown",
                "NotCounted",
                "the VMs are not counted yet".to_string(),
            ),
        },
    ];
    let before = std::mem::take(&mut status.conditions);
    status.conditions = wanted
        .into_iter()
        .map(|(kind, state, reason, message)| {
            let since = before
                .iter()
                .find(|c| c.type_ == kind && c.status == state)
                .map_or_else(|| now.to_string(), |c| c.last_transition_time.clone());
            EvacuationCondition {
                type_: kind.to_string(),
                status: state.to_string(),
                last_transition_time: since,
                reason: reason.to_string(),
                message,
            }
        })
        .collect();
}

/// The status of a run that could not start or whose task failed.
pub fn could_not_run(status: &EvacuationStatus, error: &str, cancelled: bool, at: &str) -> EvacuationStatus {
    EvacuationStatus {
        phase: Some(if cancelled {
            EvacuationPhase::Cancelled
        } else {
            EvacuationPhase::Failed
        }),
        completion_time: Some(at.to_string()),
        last_error: Some(error.to_string()),
        ..status.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(outcome: &str, action: &str, start: Option<&str>, attempts: u32) -> Progress {
        Progress::Vm(Box::new(VmStatus {
            id: "vm-1".into(),
            action: action.into(),
            start_time: start.map(str::to_string),
            attempts,
            outcome: outcome.into(),
            ..VmStatus::default()
        }))
    }

    #[test]
    fn conditions_follow_the_phase_and_keep_their_transition_time_while_unchanged() {
        let mut status = EvacuationStatus {
            phase: Some(EvacuationPhase::Paused),
            ..EvacuationStatus::default()
        };
        set_conditions(&mut status, "t1");
        let of = |status: &EvacuationStatus, kind: &str| {
            let c = status.conditions.iter().find(|c| c.type_ == kind).cloned().expect(kind);
            (c.status, c.reason, c.last_transition_time)
        };
        assert_eq!(of(&status, "Approved"), ("False".into(), "Paused".into(), "t1".into()));
        assert_eq!(of(&status, "HypervisorEmpty").0, "Unknown");
        status.phase = Some(EvacuationPhase::Running);
        status.counts = Some(VmCounts {
            total: 2,
            left: 2,
            ..VmCounts::default()
        });
        set_conditions(&mut status, "t2");
        assert_eq!(
            of(&status, "Approved"),
            ("True".into(), "NotPaused".into(), "t2".into())
        );
        assert_eq!(
            of(&status, "Progressing"),
            ("True".into(), "Running".into(), "t2".into())
        );
        status.counts = Some(VmCounts {
            total: 2,
            left: 0,
            ..VmCounts::default()
        });
        status.phase = Some(EvacuationPhase::Succeeded);
        set_conditions(&mut status, "t3");
        assert_eq!(of(&status, "Approved").2, "t2", "unchanged since t2");
        assert_eq!(
            of(&status, "Progressing"),
            ("False".into(), "Succeeded".into(), "t3".into())
        );
        assert_eq!(
            of(&status, "HypervisorEmpty"),
            ("True".into(), "Empty".into(), "t3".into())
        );
    }

    #[test]
    fn a_vm_entry_keeps_what_earlier_events_told_and_counts_follow() {
        let mut status = started("host1", "2026-12-07T00:00:00Z");
        apply(&mut status, Progress::Found { total: 2 });
        apply(
            &mut status,
            vm("moving", "live-migrate", Some("2026-12-07T00:00:01Z"), 2),
        );
        apply(&mut status, vm("failed", "", None, 0));
        apply(&mut status, Progress::Left(1));
        assert_eq!(status.vms.len(), 1);
        let entry = &status.vms[0];
        assert_eq!(entry.outcome, "failed");
        assert_eq!(entry.action, "live-migrate", "the action an earlier event told");
        assert_eq!(entry.start_time.as_deref(), Some("2026-12-07T00:00:01Z"));
        assert_eq!(entry.attempts, 2);
        let counts = status.counts.expect("counts");
        assert_eq!((counts.total, counts.failed, counts.moved, counts.left), (2, 1, 0, 1));
        assert_eq!(status.phase, Some(EvacuationPhase::Running));
    }
}
