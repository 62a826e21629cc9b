//! The evacuation itself: disable the service, move every VM within the
//! configured limits, judge each outcome from Nova's own records, report.
//! The steps around the moves (disable, stop, re-enable, start again) are in
//! `maintenance`; the knobs in `settings`; what is told in `event`.
//!
//! How the moves themselves are followed is in `moves`.

use std::collections::HashMap;

use futures::future::{BoxFuture, join_all};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::compute::{Capacity, Compute, ComputeResult, ComputeService, Server};
use super::error::{EvacuationError, step};
use super::event::Observer;
use super::maintenance::{NO_MARKER, is_our_reason};
use super::moves::Ending;
use super::plan::{self, Action, ActionFrom, PlannedVm, VmPolicy};
use super::report::{CapacityCheck, Outcome, Prediction, Report, RunResult, VmReport};
use super::settings::{Settings, StopRequest, Target};

/// The servers of a plan that will move (the capacity check's subject).
fn to_move(planned: &[PlannedVm]) -> Vec<&Server> {
    planned
        .iter()
        .filter(|p| matches!(p.action, Action::LiveMigrate | Action::ColdMigrate))
        .map(|p| &p.server)
        .collect()
}

/// Refuses a plan whose VMs do not fit on the other hosts (`None`: no check
/// asked for). With nothing to move, the look-up's own failure does not matter.
fn check_fit(
    planned: &[PlannedVm],
    capacity: Result<Option<Capacity>, EvacuationError>,
    spoken_for: &[String],
) -> Result<(), EvacuationError> {
    let moving = to_move(planned);
    if moving.is_empty() {
        return Ok(());
    }
    let Some(capacity) = capacity? else { return Ok(()) };
    let needs = plan::needs(&moving, &capacity.allocations);
    plan::check_capacity(&needs, &capacity).map_err(|shortfall| {
        EvacuationError::Capacity(plan::Shortfall {
            spoken_for: spoken_for.to_vec(),
            ..shortfall
        })
    })
}

/// Runs evacuations of one host against a compute cloud.
pub struct Engine<'a, C: Compute> {
    pub(super) compute: &'a C,
    pub(super) settings: &'a Settings,
    pub(super) observer: &'a dyn Observer,
}

/// The service disabled (by us, and its reason) and the VMs planned to move.
struct DisabledAndPlanned<'e> {
    disabled: (bool, String),
    planned: Vec<PlannedVm>,
    listed_at: Instant,
    /// A second listing of the host, under way, when VMs may have landed
    /// between the first one and the disable.
    relisting: Option<BoxFuture<'e, Result<Vec<PlannedVm>, EvacuationError>>>,
}

impl<'a, C: Compute> Engine<'a, C> {
    pub fn new(compute: &'a C, settings: &'a Settings, observer: &'a dyn Observer) -> Self {
        Engine {
            compute,
            settings,
            observer,
        }
    }

    /// What an evacuation would do, changing nothing: the plan and the
    /// capacity check's verdict (unless the settings skip it).
    pub async fn preview(&self, target: &Target) -> Result<Report, EvacuationError> {
        let started = Instant::now();
        let (service, destinations) = self.survey(target).await?;
        let (planned, capacity) = tokio::join!(self.plan(target), self.spare_capacity(target, &destinations));
        let planned = planned?;
        let capacity = capacity?.map(|capacity| {
            let needs = plan::needs(&to_move(&planned), &capacity.allocations);
            let unplaced = match plan::check_capacity(&needs, &capacity) {
                Ok(()) => vec![],
                Err(shortfall) => shortfall.unplaced,
            };
            CapacityCheck::new(capacity, needs, unplaced)
        });
        let vms = planned
            .iter()
            .map(|p| {
                let (outcome, reason) = match p.action {
                    Action::Skip => left_as_planned(p),
                    Action::Stop if !self.compute.reads_server_tags() => (Outcome::Failed, Some(NO_MARKER.into())),
                    _ => (Outcome::Planned, None),
                };
                planned_report(p, &target.host, outcome, reason)
            })
            .collect();
        let vms = self.name_projects(vms, HashMap::new()).await;
        let prediction = Prediction::new(service.enabled, self.settings.disable_first, &vms, capacity.as_ref());
        Ok(Report {
            node: target.node.clone(),
            host: target.host.clone(),
            result: RunResult::Planned,
            service_disabled_by_us: is_our_reason(service.disabled_reason.as_deref()),
            service_disabled_reason: service.disabled_reason.clone().filter(|_| !service.enabled),
            duration_seconds: started.elapsed().as_secs_f64(),
            servers_left_on_host: planned.len(),
            vms,
            capacity,
            prediction: Some(prediction),
            warnings: self.tag_warnings(),
        })
    }

    /// Live-migrates one VM off the host, to `settings.destination` when
    /// set (a memory relief), with everything an evacuation gives each VM:
    /// its budget, the stall check, the abort or force-complete, a VM Nova
    /// left in ERROR without touching it put back. The service is left as it is.
    pub async fn move_one(&self, target: &Target, server: Server, mut stop: watch::Receiver<StopRequest>) -> VmReport {
        let started = Instant::now();
        let planned = PlannedVm {
            server: server.clone(),
            action: Action::LiveMigrate,
            from: ActionFrom::default(),
            asked: None,
            refused: None,
        };
        let (mut reports, _) = self
            .move_all(target, vec![planned.clone()], started, None, started, &mut stop)
            .await;
        reports.pop().unwrap_or_else(|| {
            let why = "the move ended without a verdict".to_string();
            planned_report(&planned, &target.host, Outcome::Failed, Some(why))
        })
    }

    /// Disables the host's service and moves every VM off it, within the settings' limits.
    pub async fn evacuate(
        &self,
        target: &Target,
        mut stop: watch::Receiver<StopRequest>,
    ) -> Result<Report, EvacuationError> {
        let started = Instant::now();
        let (service, destinations) = self.survey(target).await?;

        let DisabledAndPlanned {
            disabled: (by_us, reason),
            planned,
            listed_at,
            relisting,
        } = self.disable_and_plan(target, &service, &destinations).await?;

        // The projects are named while the VMs move, so that a report cut
        // short (Ctrl-C returns at once) names them too.
        let project_ids = planned.iter().map(|p| p.server.project_id.clone()).collect();
        let warnings = self.tag_warnings();
        let deadline = self.settings.timeout.map(|t| started + t);
        let (planned, stopped) = self.stop_planned(target, planned, deadline, &stop).await;
        let relisting = relisting.map(|listing| without(listing, &stopped));
        let mut naming = std::pin::pin!(self.project_names(project_ids));
        let mut moving = std::pin::pin!(self.move_all(target, planned, listed_at, relisting, started, &mut stop));
        let mut names = None;
        let (moved, ending) = loop {
            tokio::select! {
                moved = &mut moving => break moved,
                found = &mut naming, if names.is_none() => names = Some(found),
            }
        };
        let vms: Vec<VmReport> = stopped.into_iter().chain(moved).collect();

        // Housekeeping kept off the way to the first migration; not when asked to return at once.
        let leave_at_once = matches!(ending, Some(Ending::Stopped(StopRequest::LeaveInFlight)));
        let (left, (), vms) = tokio::join!(
            self.compute.servers_on_host(&target.host),
            async {
                if !leave_at_once {
                    self.confirm_leftover_cold_migrations(&target.host).await;
                }
            },
            async {
                let names = match names {
                    Some(names) => names,
                    // Not waited for when asked to return at once.
                    None if leave_at_once => HashMap::new(),
                    None => naming.await,
                };
                if leave_at_once {
                    name(vms, &names)
                } else {
                    // VMs a second listing found may belong to other projects.
                    self.name_projects(vms, names).await
                }
            }
        );
        let (left, result) = verdict(left, &vms, ending.as_ref());
        Ok(Report {
            node: target.node.clone(),
            host: target.host.clone(),
            result,
            service_disabled_by_us: by_us,
            service_disabled_reason: Some(reason).filter(|r| !r.is_empty()),
            duration_seconds: started.elapsed().as_secs_f64(),
            servers_left_on_host: left,
            vms,
            capacity: None,
            prediction: None,
            warnings,
        })
    }

    /// Disables the service and plans the moves, in the order the settings
    /// ask; independent look-ups run side by side, as they sit between the
    /// decision and the first migration.
    async fn disable_and_plan(
        &self,
        target: &Target,
        service: &ComputeService,
        destinations: &[String],
    ) -> Result<DisabledAndPlanned<'_>, EvacuationError> {
        if self.settings.disable_first {
            // Listed after the disable, so no VM can land unseen: one listing serves both.
            let disabled = self.disable(target, service).await?;
            let listed_at = Instant::now();
            let (planned, capacity) = tokio::join!(self.plan(target), self.spare_capacity(target, destinations));
            let planned = planned?;
            check_fit(&planned, capacity, &self.settings.evacuating_elsewhere)?;
            return Ok(DisabledAndPlanned {
                disabled,
                planned,
                listed_at,
                relisting: None,
            });
        }
        if self.settings.check_capacity {
            let (planned, capacity) = tokio::join!(self.plan(target), self.spare_capacity(target, destinations));
            let planned = planned?;
            check_fit(&planned, capacity, &self.settings.evacuating_elsewhere)?;
            let listed_at = Instant::now();
            let disabled = self.disable(target, service).await?;
            // VMs may have landed between the check and the disable: the host
            // is listed again while the checked ones already move.
            let target = target.clone();
            return Ok(DisabledAndPlanned {
                disabled,
                planned,
                listed_at,
                relisting: Some(Box::pin(async move { self.plan(&target).await })),
            });
        }
        let disabled = self.disable(target, service).await?;
        let listed_at = Instant::now();
        Ok(DisabledAndPlanned {
            disabled,
            planned: self.plan(target).await?,
            listed_at,
            relisting: None,
        })
    }

    /// The report's VMs with their projects' names, `known` already (a
    /// `None`: Keystone was asked and did not name it), the others looked up.
    async fn name_projects(&self, vms: Vec<VmReport>, mut known: ProjectNames) -> Vec<VmReport> {
        let unknown = vms
            .iter()
            .filter(|vm| !known.contains_key(&vm.project_id))
            .map(|vm| vm.project_id.clone())
            .collect();
        known.extend(self.project_names(unknown).await);
        name(vms, &known)
    }

    /// The names of these projects: one Keystone look-up per project, side
    /// by side. Best effort: a project Keystone does not name (deleted, or
    /// the account may not read it) maps to `None`, and the report keeps its id.
    async fn project_names(&self, mut ids: Vec<String>) -> ProjectNames {
        ids.sort_unstable();
        ids.dedup();
        join_all(ids.into_iter().map(|id| async move {
            match self.compute.project_name(&id).await {
                Ok(name) => (id, Some(name)),
                Err(e) => {
                    debug!(project = id, error = %e, "no project name");
                    (id, None)
                }
            }
        }))
        .await
        .into_iter()
        .collect()
    }

    /// Every server on the host now, with its action, in the order they will move.
    async fn plan(&self, target: &Target) -> Result<Vec<PlannedVm>, EvacuationError> {
        let servers = self
            .compute
            .servers_on_host(&target.host)
            .await
            .map_err(step("listing servers"))?;
        Ok(plan::plan(
            servers,
            &self.settings.state_policy,
            self.settings.node_default,
        ))
    }

    /// The host's own service and the hosts its VMs may go to (enabled and up), in one look-up.
    async fn survey(&self, target: &Target) -> Result<(ComputeService, Vec<String>), EvacuationError> {
        let services = self
            .compute
            .compute_services()
            .await
            .map_err(step("looking up the nova-compute services"))?;
        let destinations = services
            .iter()
            .filter(|s| s.enabled && s.up && s.host != target.host)
            .map(|s| s.host.clone())
            .collect();
        // Exact host match: never a substring or case-folded one.
        let service =
            services
                .into_iter()
                .find(|s| s.host == target.host)
                .ok_or_else(|| EvacuationError::ServiceNotFound {
                    node: target.node.clone(),
                    host: target.host.clone(),
                })?;
        Ok((service, destinations))
    }

    pub(super) async fn service(&self, target: &Target) -> Result<ComputeService, EvacuationError> {
        self.compute
            .find_service(&target.host)
            .await
            .map_err(step("looking up the nova-compute service"))?
            .ok_or_else(|| EvacuationError::ServiceNotFound {
                node: target.node.clone(),
                host: target.host.clone(),
            })
    }

    /// The other hosts' free resources and what the VMs hold on the drained
    /// one, when the settings ask for a capacity check.
    async fn spare_capacity(
        &self,
        target: &Target,
        destinations: &[String],
    ) -> Result<Option<Capacity>, EvacuationError> {
        if !self.settings.check_capacity {
            return Ok(None);
        }
        let others = &self.settings.evacuating_elsewhere;
        // What each host evacuated elsewhere still holds: its VMs' needs.
        let elsewhere = futures::future::try_join_all(others.iter().map(|other| async move {
            self.compute.spare_capacity(other, &[]).await.map(|held| {
                held.allocations.into_iter().map(|(id, resources)| plan::VmNeeds {
                    id,
                    resources,
                    from: plan::NeedsFrom::Placement,
                })
            })
        }));
        let (capacity, elsewhere) =
            tokio::try_join!(self.compute.spare_capacity(&target.host, destinations), elsewhere)
                .map_err(step("checking the other hypervisors' capacity"))?;
        let mut capacity = capacity;
        let spoken: Vec<plan::VmNeeds> = elsewhere.into_iter().flatten().collect();
        plan::speak_for(&mut capacity, &spoken);
        Ok(Some(capacity))
    }

    /// What the run cannot do as asked, said once: below compute API 2.26
    /// no server shows its tags, so the VMs are planned without them.
    fn tag_warnings(&self) -> Vec<String> {
        if self.compute.reads_server_tags() {
            return Vec::new();
        }
        let warning = "the compute API version in use is below 2.26, which shows no server tags: nova-drain: tags \
                       are not read, the VMs are planned by the node's default and the state policy, and none is \
                       stopped (stopping needs our marker tag)";
        warn!("{warning}");
        vec![warning.to_string()]
    }

    /// A cold migration whose confirmation an earlier, interrupted run never sent.
    async fn confirm_leftover_cold_migrations(&self, host: &str) {
        let ids = match self.compute.unconfirmed_migrations_from(host).await {
            Ok(ids) => ids,
            Err(e) => {
                warn!(error = %e, "could not look for unconfirmed cold migrations");
                return;
            }
        };
        for id in ids {
            match self.compute.confirm_resize(&id).await {
                Ok(()) => info!(server = %id, "confirmed a cold migration left unconfirmed"),
                Err(e) => warn!(server = %id, error = %e, "could not confirm a finished cold migration"),
            }
        }
    }
}

/// Project names by id; `None` where Keystone did not name the project.
type ProjectNames = HashMap<String, Option<String>>;

/// The VMs with the names of their projects where known.
fn name(mut vms: Vec<VmReport>, names: &ProjectNames) -> Vec<VmReport> {
    for vm in &mut vms {
        vm.project = names.get(&vm.project_id).cloned().flatten();
    }
    vms
}

/// How many servers are left on the host and how the run ended. VMs
/// stopped or left as their tags or the node ask stay, and the run still
/// succeeds; any other server left fails it.
fn verdict(left: ComputeResult<Vec<Server>>, vms: &[VmReport], ending: Option<&Ending>) -> (usize, RunResult) {
    let kept: std::collections::HashSet<&str> = vms
        .iter()
        .filter(|vm| vm.outcome.is_kept_by_choice())
        .map(|vm| vm.id.as_str())
        .collect();
    let (left, unwanted) = match left {
        Ok(servers) => {
            let unwanted = servers.iter().filter(|s| !kept.contains(s.id.as_str())).count();
            (servers.len(), unwanted)
        }
        Err(e) => {
            warn!(error = %e, "could not count the servers left on the host");
            let unwanted = vms
                .iter()
                .filter(|vm| !vm.outcome.is_success() && !kept.contains(vm.id.as_str()))
                .count();
            (unwanted + kept.len(), unwanted)
        }
    };
    let all_done = vms
        .iter()
        .all(|vm| vm.outcome.is_success() || vm.outcome.is_kept_by_choice());
    let result = match ending {
        Some(Ending::TimedOut) => RunResult::TimedOut,
        Some(Ending::Stopped(_)) => RunResult::Interrupted,
        None if unwanted == 0 && all_done => RunResult::Succeeded,
        None => RunResult::Failed,
    };
    (left, result)
}

/// A second listing less the VMs already reported (stopped): they are
/// not newcomers.
fn without<'f>(
    listing: BoxFuture<'f, Result<Vec<PlannedVm>, EvacuationError>>,
    reported: &[VmReport],
) -> BoxFuture<'f, Result<Vec<PlannedVm>, EvacuationError>> {
    let known: std::collections::HashSet<String> = reported.iter().map(|r| r.id.clone()).collect();
    Box::pin(async move {
        let planned = listing.await?;
        Ok(planned.into_iter().filter(|p| !known.contains(&p.server.id)).collect())
    })
}

/// A VM of the plan, reported as it stands before anything is done to it.
pub(super) fn planned_report(planned: &PlannedVm, source: &str, outcome: Outcome, reason: Option<String>) -> VmReport {
    VmReport {
        from: planned.from.clone(),
        ..vm_report(&planned.server, planned.action, source, 0, 0.0, outcome, reason, None)
    }
}

/// How a VM the plan leaves on the host is reported: failed when its tags
/// cannot be followed, left when its tag or the node asked for it, else
/// skipped by the state policy.
pub(super) fn left_as_planned(planned: &PlannedVm) -> (Outcome, Option<String>) {
    if let Some(why) = &planned.refused {
        return (Outcome::Failed, Some(format!("not touched: {why}")));
    }
    if !planned.kept_by_choice() {
        return (Outcome::Skipped, Some(skip_reason(&planned.server)));
    }
    let by = match &planned.from.tag {
        Some(tag) => format!("its tag {tag}"),
        None => format!(
            "the node's default ({})",
            planned.asked.map_or("leave", VmPolicy::as_str)
        ),
    };
    let why = if planned.asked == Some(VmPolicy::Stop) {
        format!("already SHUTOFF (stopped by its owner), {by} asks for stop: left as it is, never started by us")
    } else {
        format!("left in place as {by} asks")
    };
    (Outcome::Left, Some(why))
}

pub(super) fn skip_reason(server: &Server) -> String {
    format!("{} VMs are left in place by the state policy", server.status)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn vm_report(
    server: &Server,
    action: Action,
    source: &str,
    attempts: u32,
    seconds: f64,
    outcome: Outcome,
    reason: Option<String>,
    destination: Option<String>,
) -> VmReport {
    VmReport {
        id: server.id.clone(),
        name: server.name.clone(),
        project_id: server.project_id.clone(),
        project: None,
        status: server.status.clone(),
        ram_mb: server.flavor.ram_mb,
        action,
        from: ActionFrom::default(),
        source: source.to_string(),
        destination,
        attempts,
        duration_seconds: (seconds * 10.0).round() / 10.0,
        outcome,
        reason,
    }
}
