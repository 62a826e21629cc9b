//! The maintenance around the moves: the service disabled with our marker
//! and re-enabled only while our marker is its reason, the VMs a tag asks to
//! stop stopped (marked first) and started again at the end.

use futures::future::join_all;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::compute::{Compute, ComputeError, ComputeService, Server};
use super::engine::{Engine, planned_report};
use super::error::{EvacuationError, step};
use super::event::Event;
use super::plan::{Action, PlannedVm, STOPPED_BY_US_TAG};
use super::report::{Outcome, VmReport};
use super::settings::{StopRequest, Target};

/// Prefix of every `disabled_reason` we write; a service whose reason does not
/// start with it was disabled by someone else and is never enabled by us.
pub const DISABLED_REASON_MARKER: &str = "nova-kubernetes-drain:";

/// Why a VM to stop is not stopped below compute API 2.26.
pub(super) const NO_MARKER: &str =
    "not stopped: stopping needs compute API 2.26 (server tags) for the marker that has it started again";

/// The `disabled_reason` we write: marker, node, run and time, within Nova's 255 characters.
pub fn disabled_reason(target: &Target, now: jiff::Timestamp) -> String {
    let node: String = target.node.chars().take(110).collect();
    let run: String = target.run.chars().take(70).collect();
    format!(
        "{DISABLED_REASON_MARKER} evacuating for Kubernetes node {node} by {run} since {}",
        now.strftime("%Y-%m-%dT%H:%M:%SZ")
    )
}

/// Whether a server's `task_state` is a live or cold migration under way.
fn is_a_move(task_state: &str) -> bool {
    task_state == "migrating" || task_state.starts_with("resize")
}

/// Whether `reason` was written by us.
pub fn is_our_reason(reason: Option<&str>) -> bool {
    reason.is_some_and(|r| r.starts_with(DISABLED_REASON_MARKER))
}

/// How [`Engine::restore`] may act.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    /// Enable even while servers are being moved off the host (the agent
    /// after cancelling its own run; `-enable --force`).
    pub even_while_moving: bool,
    /// Decide, change nothing (`-enable --dry-run`).
    pub dry_run: bool,
}

/// What re-enabling a service after maintenance did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RestoreOutcome {
    Enabled,
    /// A dry run: the service would be enabled; nothing changed.
    WouldEnable,
    AlreadyEnabled,
    /// Disabled with a reason that is not ours: an operator's decision, left alone.
    DisabledBySomeoneElse {
        reason: Option<String>,
    },
    /// Left disabled: these servers are being moved off the host (an
    /// evacuation runs), and an enabled service would let the scheduler place
    /// new VMs on the host being emptied.
    StillMoving {
        servers: Vec<String>,
    },
}

impl RestoreOutcome {
    /// The line an operator reads, with the next step where one is needed.
    pub fn describe(&self, host: &str) -> String {
        match self {
            RestoreOutcome::Enabled => format!("nova-compute on {host} enabled"),
            RestoreOutcome::WouldEnable => format!("would enable nova-compute on {host} (dry run: nothing changed)"),
            RestoreOutcome::AlreadyEnabled => format!("nova-compute on {host} is already enabled"),
            RestoreOutcome::StillMoving { servers } => format!(
                "nova-compute on {host} stays disabled: an evacuation runs ({} being moved off it: {}); enabling it \
                 now would let the scheduler place new VMs on the host being emptied. Uncordon the node (agent) or \
                 stop the run first; --force enables it anyway",
                servers.len(),
                servers.join(", ")
            ),
            RestoreOutcome::DisabledBySomeoneElse { reason } => format!(
                "nova-compute on {host} stays disabled: someone else disabled it ({}); if it should run again: \
                 openstack compute service set --enable {host} nova-compute",
                reason.as_deref().unwrap_or("no reason given")
            ),
        }
    }

    /// 0 when the service is (or would be) enabled, 1 when it stays disabled.
    pub fn exit_code(&self) -> i32 {
        match self {
            RestoreOutcome::Enabled | RestoreOutcome::WouldEnable | RestoreOutcome::AlreadyEnabled => crate::exit::DONE,
            RestoreOutcome::StillMoving { .. } | RestoreOutcome::DisabledBySomeoneElse { .. } => crate::exit::FAILED,
        }
    }
}

/// What the restore did with one VM that carries our marker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartOutcome {
    /// Started (`os-start` accepted) and the marker removed.
    Started,
    /// No longer SHUTOFF (its owner started it): the marker was removed.
    Unmarked,
    /// A dry run: would be started.
    WouldStart,
    /// A dry run: would lose the marker.
    WouldUnmark,
    /// Not started; the marker stays, so the next restore tries again.
    Failed,
}

/// One VM the restore started (or looked at) again.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Restart {
    pub id: String,
    pub name: String,
    pub outcome: RestartOutcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The end of a maintenance: the service, and the VMs we had stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    pub outcome: RestoreOutcome,
    /// The servers with our marker, and what became of each.
    pub restarts: Vec<Restart>,
}

impl Restored {
    /// The service's line, then one per VM we had stopped.
    pub fn describe(&self, host: &str) -> String {
        let mut text = self.outcome.describe(host);
        for r in &self.restarts {
            let what = match r.outcome {
                RestartOutcome::Started => "started again (we had stopped it)",
                RestartOutcome::Unmarked => "already running: our marker removed",
                RestartOutcome::WouldStart => "would be started again (we had stopped it)",
                RestartOutcome::WouldUnmark => "already running: would lose our marker",
                RestartOutcome::Failed => "NOT started",
            };
            text.push_str(&format!("\nVM {} ({}): {what}", r.name, r.id));
            if let Some(reason) = &r.reason {
                text.push_str(&format!(": {reason}"));
            }
        }
        text
    }

    /// The service's exit code, or 1 when a VM we stopped was not started.
    pub fn exit_code(&self) -> i32 {
        if self.restarts.iter().any(|r| r.outcome == RestartOutcome::Failed) {
            crate::exit::FAILED
        } else {
            self.outcome.exit_code()
        }
    }
}

impl<C: Compute> Engine<'_, C> {
    /// Ends the maintenance: [`Engine::restore_and_start`], telling only
    /// what became of the service (the VMs started are logged).
    pub async fn restore(&self, target: &Target, options: RestoreOptions) -> Result<RestoreOutcome, EvacuationError> {
        Ok(self.restore_and_start(target, options).await?.outcome)
    }

    /// Re-enables the service (see `enable_if_ours`) and then starts again
    /// the VMs we stopped for the maintenance (those carrying our marker
    /// tag), whether this process or an earlier one stopped them. Once the
    /// service is enabled (or already was); never while it stays disabled,
    /// the maintenance not over. A dry run only tells what it would do.
    pub async fn restore_and_start(
        &self,
        target: &Target,
        options: RestoreOptions,
    ) -> Result<Restored, EvacuationError> {
        let outcome = self.enable_if_ours(target, options).await?;
        let restarts = match outcome {
            RestoreOutcome::Enabled | RestoreOutcome::AlreadyEnabled | RestoreOutcome::WouldEnable => {
                self.start_ours(target, options.dry_run).await?
            }
            RestoreOutcome::DisabledBySomeoneElse { .. } | RestoreOutcome::StillMoving { .. } => Vec::new(),
        };
        Ok(Restored { outcome, restarts })
    }

    /// Starts every server on the host that carries our marker and removes
    /// the marker; one no longer SHUTOFF (its owner started it) just loses
    /// the marker. One still powering off keeps it, for the next restore.
    async fn start_ours(&self, target: &Target, dry_run: bool) -> Result<Vec<Restart>, EvacuationError> {
        if !self.compute.reads_server_tags() {
            // Nothing can carry the marker: we never stop a VM without it.
            return Ok(Vec::new());
        }
        let servers = self
            .compute
            .servers_on_host(&target.host)
            .await
            .map_err(step("listing the servers on the host"))?;
        let marked = servers
            .into_iter()
            .filter(|s| s.tags.iter().flatten().any(|t| t == STOPPED_BY_US_TAG));
        Ok(join_all(marked.map(|server| self.start_one(server, dry_run))).await)
    }

    async fn start_one(&self, server: Server, dry_run: bool) -> Restart {
        let restart = |outcome, reason: Option<String>| Restart {
            id: server.id.clone(),
            name: server.name.clone(),
            outcome,
            reason,
        };
        if server.task_state.is_some() {
            let task = server.task_state.as_deref().unwrap_or_default();
            let why = format!("Nova is busy with it ({task}); the marker stays and the next restore starts it");
            return restart(RestartOutcome::Failed, Some(why));
        }
        let stopped = server.status == "SHUTOFF";
        if dry_run {
            let outcome = if stopped {
                RestartOutcome::WouldStart
            } else {
                RestartOutcome::WouldUnmark
            };
            return restart(outcome, None);
        }
        if stopped {
            if let Err(e) = self.compute.start_server(&server.id).await {
                warn!(server = %server.id, error = %e, "could not start a VM we stopped");
                return restart(RestartOutcome::Failed, Some(format!("Nova refused to start it: {e}")));
            }
            info!(server = %server.id, name = %server.name, "started the VM we stopped for the maintenance");
        }
        let outcome = if stopped {
            RestartOutcome::Started
        } else {
            RestartOutcome::Unmarked
        };
        match self.compute.remove_tag(&server.id, STOPPED_BY_US_TAG).await {
            Ok(()) => restart(outcome, None),
            Err(e) => {
                warn!(server = %server.id, error = %e, "could not remove our marker tag");
                let why = format!("our marker tag could not be removed: {e}");
                restart(outcome, Some(why))
            }
        }
    }

    /// Re-enables the host's service, but only if our marker is still its
    /// reason (Nova clears the reason when an operator disables the service
    /// again, so an operator's later disable is respected too), and, unless
    /// `even_while_moving`, only while no server is being moved off the host.
    async fn enable_if_ours(
        &self,
        target: &Target,
        options: RestoreOptions,
    ) -> Result<RestoreOutcome, EvacuationError> {
        let service = self.service(target).await?;
        if service.enabled {
            return Ok(RestoreOutcome::AlreadyEnabled);
        }
        if !is_our_reason(service.disabled_reason.as_deref()) {
            return Ok(RestoreOutcome::DisabledBySomeoneElse {
                reason: service.disabled_reason,
            });
        }
        if !options.even_while_moving {
            let servers = self
                .compute
                .servers_on_host(&target.host)
                .await
                .map_err(step("listing the servers on the host"))?;
            let moving: Vec<String> = servers
                .into_iter()
                .filter(|s| s.task_state.as_deref().is_some_and(is_a_move))
                .map(|s| format!("{} ({})", s.name, s.id))
                .collect();
            if !moving.is_empty() {
                return Ok(RestoreOutcome::StillMoving { servers: moving });
            }
        }
        if options.dry_run {
            return Ok(RestoreOutcome::WouldEnable);
        }
        self.compute
            .enable_service(&service)
            .await
            .map_err(step("enabling the nova-compute service"))?;
        Ok(RestoreOutcome::Enabled)
    }

    /// Disables the host's service ahead of its evacuation (a node waiting
    /// for its turn takes no new VMs); whether the disabling is ours, and the
    /// service as it was found (its availability zone).
    pub async fn hold_service(&self, target: &Target) -> Result<(bool, ComputeService), EvacuationError> {
        let service = self.service(target).await?;
        let (ours, _) = self.disable(target, &service).await?;
        Ok((ours, service))
    }

    /// Disables the service unless it already is; tells whether the disabling is ours.
    pub(super) async fn disable(
        &self,
        target: &Target,
        service: &ComputeService,
    ) -> Result<(bool, String), EvacuationError> {
        if !service.enabled {
            let ours = is_our_reason(service.disabled_reason.as_deref());
            self.observer.event(&Event::ServiceAlreadyDisabled {
                reason: service.disabled_reason.as_deref(),
                ours,
            });
            return Ok((ours, service.disabled_reason.clone().unwrap_or_default()));
        }
        let reason = disabled_reason(target, jiff::Timestamp::now());
        self.compute
            .disable_service(service, &reason)
            .await
            .map_err(step("disabling the nova-compute service"))?;
        self.observer.event(&Event::ServiceDisabled { reason: &reason });
        Ok((true, reason))
    }

    /// Stops, side by side, the VMs the plan stops: after the disable and
    /// before any migration, so a stopped VM is never moved. Returns the
    /// rest of the plan and the stopped VMs' reports.
    pub(super) async fn stop_planned(
        &self,
        target: &Target,
        planned: Vec<PlannedVm>,
        deadline: Option<Instant>,
        stop: &watch::Receiver<StopRequest>,
    ) -> (Vec<PlannedVm>, Vec<VmReport>) {
        let (stopping, rest): (Vec<PlannedVm>, Vec<PlannedVm>) =
            planned.into_iter().partition(|p| p.action == Action::Stop);
        let stops = stopping.iter().map(|p| async move {
            let started = Instant::now();
            let (outcome, reason) = self.stop_one(&p.server, deadline, stop.clone()).await;
            if outcome == Outcome::Stopped {
                self.observer.event(&Event::Stopped { server: &p.server });
            }
            VmReport {
                attempts: 1,
                duration_seconds: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
                ..planned_report(p, &target.host, outcome, Some(reason))
            }
        });
        (rest, join_all(stops).await)
    }

    /// Stops one ACTIVE VM: our marker first (no marker, no stop: a VM we
    /// stopped unmarked would never be started again), then `os-stop`, then
    /// waits for SHUTOFF within its budget and the run's deadline.
    async fn stop_one(
        &self,
        server: &Server,
        deadline: Option<Instant>,
        mut stop: watch::Receiver<StopRequest>,
    ) -> (Outcome, String) {
        if !self.compute.reads_server_tags() {
            return (Outcome::Failed, NO_MARKER.into());
        }
        if let Err(e) = self.compute.add_tag(&server.id, STOPPED_BY_US_TAG).await {
            return (
                Outcome::Failed,
                format!("not stopped: could not set our marker tag {STOPPED_BY_US_TAG}: {e}"),
            );
        }
        match self.compute.stop_server(&server.id).await {
            Ok(()) => info!(server = %server.id, name = %server.name, "stopping the VM, as asked, for the maintenance"),
            Err(ComputeError::Conflict(message)) => {
                // Refused for certain (its state changed): it must not keep a marker that would start it later.
                if let Err(e) = self.compute.remove_tag(&server.id, STOPPED_BY_US_TAG).await {
                    warn!(server = %server.id, error = %e, "could not remove our marker from a VM we did not stop");
                }
                return (Outcome::Failed, format!("Nova refused to stop it: {message}"));
            }
            // It may have reached Nova: the marker stays (a VM still running just loses it at the restore).
            Err(e) => return (Outcome::Failed, format!("the stop request failed: {e}")),
        }
        let budget = self.settings.budget.for_ram(server.flavor.ram_mb);
        let until = deadline.map_or(Instant::now() + budget, |d| d.min(Instant::now() + budget));
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.settings.poll_interval) => {}
                // A sender gone (nobody can ask to stop any more) just leaves the sleep.
                Ok(()) = stop.changed() => {}
            }
            match self.compute.server(&server.id).await {
                Ok(Some(now)) if now.status == "SHUTOFF" && now.task_state.is_none() => {
                    let why =
                        format!("stopped and left on the host, marked {STOPPED_BY_US_TAG}: -enable starts it again");
                    return (Outcome::Stopped, why);
                }
                Ok(None) => return (Outcome::Deleted, "deleted while it was being stopped".into()),
                Ok(Some(_)) => {}
                Err(e) => debug!(server = %server.id, error = %e, "could not read the server; will look again"),
            }
            if *stop.borrow() != StopRequest::Continue {
                let why = "the run was stopped while Nova stopped the VM; the marker stays for the restore";
                return (Outcome::InProgress, why.into());
            }
            if Instant::now() >= until {
                let why = format!(
                    "not SHUTOFF after {} s; Nova goes on stopping it, and the marker stays for the restore",
                    budget.as_secs()
                );
                return (Outcome::Failed, why);
            }
        }
    }
}
