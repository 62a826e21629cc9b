//! What to do with each VM, decided before anything moves: the per-state
//! policy, the order of moves and the capacity check.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::compute::{HostCapacity, Server};

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

/// VMs that found no room on any destination in the capacity check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shortfall {
    pub unplaced: Vec<Server>,
    pub hosts: usize,
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .unplaced
            .iter()
            .map(|s| {
                format!(
                    "{} ({} MiB RAM, {} vCPU, {} GiB disk)",
                    s.id, s.flavor.ram_mb, s.flavor.vcpus, s.flavor.disk_gb
                )
            })
            .collect();
        write!(
            f,
            "the {} other enabled hypervisor(s) cannot hold {} of the VMs to move: {}",
            self.hosts,
            self.unplaced.len(),
            names.join(", ")
        )
    }
}

/// Checks that the VMs to move fit on the destinations, placing the largest
/// first on the host with the most free RAM (first-fit decreasing), as a
/// conservative stand-in for the scheduler.
pub fn check_capacity(moving: &[&Server], hosts: &[HostCapacity]) -> Result<(), Shortfall> {
    let mut free: Vec<HostCapacity> = hosts.to_vec();
    let mut order: Vec<&Server> = moving.to_vec();
    order.sort_by(|a, b| b.flavor.ram_mb.cmp(&a.flavor.ram_mb).then_with(|| a.id.cmp(&b.id)));
    let mut unplaced = Vec::new();
    for server in order {
        free.sort_by_key(|h| std::cmp::Reverse(h.free_ram_mb));
        let need = &server.flavor;
        match free
            .iter_mut()
            .find(|h| h.free_ram_mb >= need.ram_mb && h.free_vcpus >= need.vcpus && h.free_disk_gb >= need.disk_gb)
        {
            Some(host) => {
                host.free_ram_mb -= need.ram_mb;
                host.free_vcpus -= need.vcpus;
                host.free_disk_gb -= need.disk_gb;
            }
            None => unplaced.push(server.clone()),
        }
    }
    if unplaced.is_empty() {
        Ok(())
    } else {
        Err(Shortfall {
            unplaced,
            hosts: hosts.len(),
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

    fn host(name: &str, ram: u64) -> HostCapacity {
        HostCapacity {
            host: name.into(),
            free_ram_mb: ram,
            free_vcpus: 100,
            free_disk_gb: 100,
        }
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
        assert!(check_capacity(&[&c, &b, &a], &[host("h1", 4000), host("h2", 2000)]).is_ok());
        let shortfall = check_capacity(&[&a, &b, &c], &[host("h1", 3500), host("h2", 2000)]).unwrap_err();
        assert_eq!(shortfall.unplaced.len(), 1);
        assert_eq!(shortfall.unplaced[0].id, "c");
        assert!(check_capacity(&[&a], &[]).is_err());
    }
}
