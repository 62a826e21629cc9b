//! What to do with each VM, decided before anything moves: the per-state
//! policy, the order of moves and the capacity check.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::compute::{Capacity, HostCapacity, MEMORY_MB, Resources, Server};

/// How one VM leaves the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Moves a running VM without stopping it (ACTIVE, PAUSED).
    LiveMigrate,
    /// Moves a stopped VM and confirms the move (SHUTOFF; ACTIVE VMs are stopped by Nova while moving).
    ColdMigrate,
    /// Leaves the VM where it is and reports it.
    Skip,
}

impl Action {
    /// As `--output json` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::LiveMigrate => "live-migrate",
            Action::ColdMigrate => "cold-migrate",
            Action::Skip => "skip",
        }
    }

    /// Whether Nova accepts this action for a VM in `status`.
    pub fn allowed_for(self, status: &str) -> bool {
        match self {
            Action::LiveMigrate => matches!(status, "ACTIVE" | "PAUSED"),
            Action::ColdMigrate => matches!(status, "ACTIVE" | "SHUTOFF"),
            Action::Skip => true,
        }
    }
}

/// The action for each Nova server status; statuses not listed get `default`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatePolicy {
    by_status: BTreeMap<String, Action>,
    default: Action,
}

impl Default for StatePolicy {
    fn default() -> Self {
        let by_status = [
            ("ACTIVE", Action::LiveMigrate),
            ("PAUSED", Action::LiveMigrate),
            ("SHUTOFF", Action::ColdMigrate),
        ]
        .into_iter()
        .map(|(status, action)| (status.to_string(), action))
        .collect();
        StatePolicy {
            by_status,
            default: Action::Skip,
        }
    }
}

impl StatePolicy {
    /// Overrides the action for `status` (upper-case Nova status), refusing one Nova would reject.
    pub fn set(&mut self, status: &str, action: Action) -> Result<(), String> {
        let status = status.to_ascii_uppercase();
        if !action.allowed_for(&status) {
            return Err(format!(
                "Nova cannot {} a {status} server",
                match action {
                    Action::LiveMigrate => "live-migrate",
                    _ => "cold-migrate",
                }
            ));
        }
        self.by_status.insert(status, action);
        Ok(())
    }

    /// The action for a server in `status`.
    pub fn action_for(&self, status: &str) -> Action {
        self.by_status.get(status).copied().unwrap_or(self.default)
    }
}

/// One VM and what will be done with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedVm {
    pub server: Server,
    pub action: Action,
}

/// Decides an action per server and orders the moves: live migrations first,
/// then cold ones, each smallest RAM first so the host empties of as many VMs
/// as early as possible; skipped VMs last. Ties break on id for a stable order.
pub fn plan(servers: Vec<Server>, policy: &StatePolicy) -> Vec<PlannedVm> {
    let mut planned: Vec<PlannedVm> = servers
        .into_iter()
        .map(|server| {
            let action = match server.task_state.as_deref() {
                // Already moving (an earlier run, or someone else): follow that move.
                Some("migrating") => Action::LiveMigrate,
                Some(task) if task.starts_with("resize") => Action::ColdMigrate,
                _ => policy.action_for(&server.status),
            };
            PlannedVm { server, action }
        })
        .collect();
    planned.sort_by(|a, b| {
        (a.action, a.server.flavor.ram_mb, &a.server.id).cmp(&(b.action, b.server.flavor.ram_mb, &b.server.id))
    });
    planned
}

/// Where a VM's needs were read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NeedsFrom {
    /// Its allocations on the drained host's providers.
    Placement,
    /// Its flavor: Placement showed no allocation for it there.
    Flavor,
}

/// What one VM to move needs on its destination, class by class.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VmNeeds {
    pub id: String,
    pub resources: Resources,
    pub from: NeedsFrom,
}

/// Each moving server's needs: its own allocations on the drained host when
/// Placement has them (so a volume-backed server needs no `DISK_GB`, and
/// `PCPU`, `VGPU` or custom classes count too), else its flavor's.
pub fn needs(moving: &[&Server], allocations: &BTreeMap<String, Resources>) -> Vec<VmNeeds> {
    moving
        .iter()
        .map(|server| match allocations.get(&server.id) {
            Some(held) => VmNeeds {
                id: server.id.clone(),
                resources: held.clone(),
                from: NeedsFrom::Placement,
            },
            None => VmNeeds {
                id: server.id.clone(),
                resources: server.flavor.resources(),
                from: NeedsFrom::Flavor,
            },
        })
        .collect()
}

/// One VM that found no room, and which classes stood in the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unplaced {
    pub needs: VmNeeds,
    pub reason: String,
}

/// VMs that found no room on any destination in the capacity check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shortfall {
    pub unplaced: Vec<Unplaced>,
    pub hosts: usize,
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .unplaced
            .iter()
            .map(|u| format!("{} ({})", u.needs.id, u.reason))
            .collect();
        write!(
            f,
            "the {} other enabled hypervisor(s) cannot hold {} of the VMs to move: {}",
            self.hosts,
            self.unplaced.len(),
            names.join("; ")
        )
    }
}

/// What is left on the destinations while VMs are placed on them in thought.
struct Room {
    hosts: Vec<HostCapacity>,
    shared: BTreeMap<String, Resources>,
}

impl Room {
    /// The amount of `class` a VM could take on `host`: its own when it holds
    /// the class, else its sharing provider's, else none.
    fn available(&self, host: &HostCapacity, class: &str) -> Option<u64> {
        if let Some(free) = host.free.get(class) {
            return Some(*free);
        }
        let pool = host.shared.get(class)?;
        Some(self.shared.get(pool)?.get(class).copied().unwrap_or(0))
    }

    fn fits(&self, host: &HostCapacity, needs: &Resources) -> bool {
        needs
            .iter()
            .all(|(class, amount)| *amount == 0 || self.available(host, class).is_some_and(|free| free >= *amount))
    }

    fn take(&mut self, index: usize, needs: &Resources) {
        let host = &mut self.hosts[index];
        for (class, amount) in needs {
            if let Some(free) = host.free.get_mut(class) {
                *free = free.saturating_sub(*amount);
            } else if let Some(free) = host
                .shared
                .get(class)
                .and_then(|pool| self.shared.get_mut(pool))
                .and_then(|pool| pool.get_mut(class))
            {
                *free = free.saturating_sub(*amount);
            }
        }
    }

    /// Why a VM fits nowhere, by class: those no destination holds at all,
    /// and those no single one has enough of.
    fn why_not(&self, needs: &Resources) -> String {
        let mut reasons = Vec::new();
        for (class, amount) in needs.iter().filter(|(_, amount)| **amount > 0) {
            match self.hosts.iter().filter_map(|h| self.available(h, class)).max() {
                None => reasons.push(format!("needs {amount} {class}, which no candidate holds")),
                Some(most) if most < *amount => {
                    reasons.push(format!("needs {amount} {class}, at most {most} free on one host"))
                }
                Some(_) => {}
            }
        }
        if reasons.is_empty() {
            format!("no single host has room for all of {}", show(needs))
        } else {
            reasons.join(", ")
        }
    }
}

/// `CLASS amount` pairs, for a reason or the report.
pub fn show(resources: &Resources) -> String {
    let parts: Vec<String> = resources
        .iter()
        .map(|(class, amount)| format!("{class} {amount}"))
        .collect();
    parts.join(", ")
}

/// Checks that the VMs to move fit on the destinations, class by class,
/// placing the largest (RAM) first on the host with the most free RAM
/// (first-fit decreasing), as a conservative stand-in for the scheduler. A
/// class a destination holds neither itself nor through a sharing provider
/// has no room there, but stands in the way only of a VM that needs it.
pub fn check_capacity(needs: &[VmNeeds], capacity: &Capacity) -> Result<(), Shortfall> {
    let mut room = Room {
        hosts: capacity.hosts.clone(),
        shared: capacity.shared.clone(),
    };
    let ram = |r: &Resources| r.get(MEMORY_MB).copied().unwrap_or(0);
    let mut order: Vec<&VmNeeds> = needs.iter().collect();
    order.sort_by(|a, b| ram(&b.resources).cmp(&ram(&a.resources)).then_with(|| a.id.cmp(&b.id)));
    let mut unplaced = Vec::new();
    for vm in order {
        room.hosts
            .sort_by_key(|h| std::cmp::Reverse(h.free.get(MEMORY_MB).copied().unwrap_or(0)));
        match (0..room.hosts.len()).find(|&i| room.fits(&room.hosts[i], &vm.resources)) {
            Some(index) => room.take(index, &vm.resources),
            None => unplaced.push(Unplaced {
                needs: vm.clone(),
                reason: room.why_not(&vm.resources),
            }),
        }
    }
    if unplaced.is_empty() {
        Ok(())
    } else {
        Err(Shortfall {
            unplaced,
            hosts: capacity.hosts.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evacuation::compute::Flavor;

    fn server(id: &str, status: &str, ram_mb: u64) -> Server {
        Server {
            id: id.into(),
            name: id.into(),
            project_id: "p".into(),
            status: status.into(),
            task_state: None,
            host: Some("src".into()),
            running: true,
            flavor: Flavor {
                ram_mb,
                vcpus: 1,
                disk_gb: 1,
            },
        }
    }

    fn resources(pairs: &[(&str, u64)]) -> Resources {
        pairs
            .iter()
            .map(|(class, amount)| (class.to_string(), *amount))
            .collect()
    }

    fn host(name: &str, ram: u64) -> HostCapacity {
        HostCapacity {
            host: name.into(),
            free: resources(&[("MEMORY_MB", ram), ("VCPU", 100), ("DISK_GB", 100)]),
            shared: BTreeMap::new(),
        }
    }

    fn capacity(hosts: Vec<HostCapacity>) -> Capacity {
        Capacity {
            hosts,
            ..Capacity::default()
        }
    }

    fn flavor_needs(servers: &[&Server]) -> Vec<VmNeeds> {
        needs(servers, &BTreeMap::new())
    }

    #[test]
    fn default_policy_moves_running_and_stopped_vms_only() {
        let policy = StatePolicy::default();
        assert_eq!(policy.action_for("ACTIVE"), Action::LiveMigrate);
        assert_eq!(policy.action_for("PAUSED"), Action::LiveMigrate);
        assert_eq!(policy.action_for("SHUTOFF"), Action::ColdMigrate);
        assert_eq!(policy.action_for("SUSPENDED"), Action::Skip);
        assert_eq!(policy.action_for("ERROR"), Action::Skip);
        assert_eq!(policy.action_for("RESCUE"), Action::Skip);
    }

    #[test]
    fn policy_refuses_actions_nova_rejects() {
        let mut policy = StatePolicy::default();
        assert!(policy.set("SUSPENDED", Action::LiveMigrate).is_err());
        assert!(policy.set("error", Action::ColdMigrate).is_err());
        assert!(policy.set("shutoff", Action::Skip).is_ok());
        assert_eq!(policy.action_for("SHUTOFF"), Action::Skip);
    }

    #[test]
    fn plan_orders_live_then_cold_smallest_first_skips_last() {
        let mut migrating = server("e", "ACTIVE", 4096);
        migrating.task_state = Some("migrating".into());
        let planned = plan(
            vec![
                server("a", "ERROR", 64),
                server("b", "SHUTOFF", 64),
                server("c", "ACTIVE", 2048),
                server("d", "ACTIVE", 512),
                migrating,
            ],
            &StatePolicy::default(),
        );
        let order: Vec<(&str, Action)> = planned.iter().map(|p| (p.server.id.as_str(), p.action)).collect();
        assert_eq!(
            order,
            vec![
                ("d", Action::LiveMigrate),
                ("c", Action::LiveMigrate),
                ("e", Action::LiveMigrate),
                ("b", Action::ColdMigrate),
                ("a", Action::Skip),
            ]
        );
    }

    #[test]
    fn capacity_fits_largest_first() {
        let a = server("a", "ACTIVE", 3000);
        let b = server("b", "ACTIVE", 2000);
        let c = server("c", "ACTIVE", 1000);
        // 3000 + 1000 on one host, 2000 on the other: fits exactly.
        let fits = capacity(vec![host("h1", 4000), host("h2", 2000)]);
        assert!(check_capacity(&flavor_needs(&[&c, &b, &a]), &fits).is_ok());
        let short = capacity(vec![host("h1", 3500), host("h2", 2000)]);
        let shortfall = check_capacity(&flavor_needs(&[&a, &b, &c]), &short).unwrap_err();
        assert_eq!(shortfall.unplaced.len(), 1);
        assert_eq!(shortfall.unplaced[0].needs.id, "c");
        assert_eq!(
            shortfall.unplaced[0].reason,
            "needs 1000 MEMORY_MB, at most 500 free on one host"
        );
        assert!(check_capacity(&flavor_needs(&[&a]), &capacity(vec![])).is_err());
    }

    #[test]
    fn allocations_outrank_the_flavor_and_flavors_stand_in_for_the_rest() {
        let volume_backed = server("vol", "ACTIVE", 512);
        let local = server("local", "ACTIVE", 512);
        // Placement holds no DISK_GB for the volume-backed one, and nothing for `local`.
        let held = BTreeMap::from([("vol".to_string(), resources(&[("MEMORY_MB", 512), ("VCPU", 1)]))]);
        let needs = needs(&[&volume_backed, &local], &held);
        assert_eq!(needs[0].from, NeedsFrom::Placement);
        assert_eq!(needs[0].resources, resources(&[("MEMORY_MB", 512), ("VCPU", 1)]));
        assert_eq!(needs[1].from, NeedsFrom::Flavor);
        assert_eq!(
            needs[1].resources,
            resources(&[("MEMORY_MB", 512), ("VCPU", 1), ("DISK_GB", 1)])
        );
        // A destination without any DISK_GB inventory takes the volume-backed VM only.
        let diskless = HostCapacity {
            host: "rbd".into(),
            free: resources(&[("MEMORY_MB", 4096), ("VCPU", 8)]),
            shared: BTreeMap::new(),
        };
        let shortfall = check_capacity(&needs, &capacity(vec![diskless.clone()])).unwrap_err();
        assert_eq!(shortfall.unplaced.len(), 1);
        assert_eq!(shortfall.unplaced[0].needs.id, "local");
        assert_eq!(
            shortfall.unplaced[0].reason,
            "needs 1 DISK_GB, which no candidate holds"
        );
    }

    #[test]
    fn a_sharing_provider_is_one_pool_for_every_host_that_draws_on_it() {
        let pooled = |name: &str| HostCapacity {
            host: name.into(),
            free: resources(&[("MEMORY_MB", 4096), ("VCPU", 8)]),
            shared: BTreeMap::from([("DISK_GB".to_string(), "ceph".to_string())]),
        };
        let vms: Vec<Server> = ["a", "b", "c"].iter().map(|id| server(id, "ACTIVE", 512)).collect();
        let moving: Vec<&Server> = vms.iter().collect();
        let with_pool = |disk: u64| Capacity {
            hosts: vec![pooled("h1"), pooled("h2")],
            shared: BTreeMap::from([("ceph".to_string(), resources(&[("DISK_GB", disk)]))]),
            allocations: BTreeMap::new(),
        };
        assert!(check_capacity(&flavor_needs(&moving), &with_pool(3)).is_ok());
        // Two hosts, but one pool of 2 GiB for three VMs of 1 GiB each.
        let shortfall = check_capacity(&flavor_needs(&moving), &with_pool(2)).unwrap_err();
        assert_eq!(shortfall.unplaced.len(), 1);
        assert_eq!(
            shortfall.unplaced[0].reason,
            "needs 1 DISK_GB, at most 0 free on one host"
        );
    }

    #[test]
    fn classes_beyond_the_flavor_count_and_are_named_when_missing() {
        let pinned = server("pinned", "ACTIVE", 512);
        let held = BTreeMap::from([(
            "pinned".to_string(),
            resources(&[("MEMORY_MB", 512), ("PCPU", 2), ("CUSTOM_FPGA", 1)]),
        )]);
        let mut with_pcpu = host("h1", 4096);
        with_pcpu.free.insert("PCPU".into(), 1);
        let shortfall = check_capacity(
            &needs(&[&pinned], &held),
            &capacity(vec![with_pcpu.clone(), host("h2", 4096)]),
        )
        .unwrap_err();
        assert_eq!(
            shortfall.unplaced[0].reason,
            "needs 1 CUSTOM_FPGA, which no candidate holds, needs 2 PCPU, at most 1 free on one host"
        );
        assert!(
            shortfall.to_string().contains("pinned (needs 1 CUSTOM_FPGA"),
            "{shortfall}"
        );
        with_pcpu.free.insert("PCPU".into(), 2);
        with_pcpu.free.insert("CUSTOM_FPGA".into(), 1);
        assert!(check_capacity(&needs(&[&pinned], &held), &capacity(vec![with_pcpu])).is_ok());
    }
}
