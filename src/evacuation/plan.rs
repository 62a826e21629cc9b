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
    /// Stops a running VM before the migrations and leaves it on the host,
    /// marked so that the restore after the maintenance starts it again.
    Stop,
    /// Leaves the VM where it is and reports it.
    Skip,
}

impl Action {
    /// As `--output json` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::LiveMigrate => "live-migrate",
            Action::ColdMigrate => "cold-migrate",
            Action::Stop => "stop",
            Action::Skip => "skip",
        }
    }

    /// Whether Nova accepts this action for a VM in `status`.
    pub fn allowed_for(self, status: &str) -> bool {
        match self {
            Action::LiveMigrate => matches!(status, "ACTIVE" | "PAUSED"),
            Action::ColdMigrate => matches!(status, "ACTIVE" | "SHUTOFF"),
            // Nova's `os-stop` takes ACTIVE (and ERROR, which needs an operator, not us).
            Action::Stop => status == "ACTIVE",
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
        if action == Action::Stop {
            return Err("stop is chosen per VM (tag nova-drain:stop) or per node (node_default_action)".into());
        }
        if !action.allowed_for(&status) {
            return Err(format!("Nova cannot {} a {status} server", action.as_str()));
        }
        self.by_status.insert(status, action);
        Ok(())
    }

    /// The action for a server in `status`.
    pub fn action_for(&self, status: &str) -> Action {
        self.by_status.get(status).copied().unwrap_or(self.default)
    }
}

/// What a VM's owner (a Nova server tag) or the node (a default) asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmPolicy {
    LiveMigrate,
    ColdMigrate,
    /// Stop it before the maintenance and start it again afterwards.
    Stop,
    /// Report it, do not touch it.
    Leave,
}

impl VmPolicy {
    pub const ALL: [VmPolicy; 4] = [
        VmPolicy::LiveMigrate,
        VmPolicy::ColdMigrate,
        VmPolicy::Stop,
        VmPolicy::Leave,
    ];

    /// As the tag, the annotation and the config spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            VmPolicy::LiveMigrate => "live-migrate",
            VmPolicy::ColdMigrate => "cold-migrate",
            VmPolicy::Stop => "stop",
            VmPolicy::Leave => "leave",
        }
    }

    /// The Nova server tag that asks for it (`nova-drain:stop`).
    pub fn tag(self) -> String {
        format!("{TAG_PREFIX}{}", self.as_str())
    }

    pub fn action(self) -> Action {
        match self {
            VmPolicy::LiveMigrate => Action::LiveMigrate,
            VmPolicy::ColdMigrate => Action::ColdMigrate,
            VmPolicy::Stop => Action::Stop,
            VmPolicy::Leave => Action::Skip,
        }
    }
}

impl std::str::FromStr for VmPolicy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        VmPolicy::ALL
            .into_iter()
            .find(|p| p.as_str() == text.trim())
            .ok_or_else(|| format!("unknown VM action {text:?}: expected live-migrate, cold-migrate, stop or leave"))
    }
}

impl std::fmt::Display for VmPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every Nova server tag of ours starts with this; one that does and is not
/// in our vocabulary is reported, never guessed at.
pub const TAG_PREFIX: &str = "nova-drain:";
/// Our own tag on a VM we stopped: the restore starts exactly these again
/// (never a VM its owner stopped). Kept in Nova, so a restarted agent knows.
pub const STOPPED_BY_US_TAG: &str = "nova-drain:stopped-by-drainer";

/// Which level decided a VM's action.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActionSource {
    /// A `nova-drain:` server tag set by the VM's owner.
    Tag,
    /// The node's default (Node annotation, Evacuation spec, `node_default_action`).
    NodeDefault,
    /// The per-state policy of the configuration.
    #[default]
    StatePolicy,
    /// A migration already under way, which is followed.
    InProgress,
}

impl ActionSource {
    /// The table's short word.
    pub fn short(self) -> &'static str {
        match self {
            ActionSource::Tag => "tag",
            ActionSource::NodeDefault => "node",
            ActionSource::StatePolicy => "state",
            ActionSource::InProgress => "moving",
        }
    }
}

/// Where a VM's action came from, as the report shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ActionFrom {
    #[serde(rename = "action_source")]
    pub source: ActionSource,
    /// The tag that chose it, when one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// What a server's tags ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TagChoice {
    /// No tag of ours (or tags unreadable below compute API 2.26).
    None,
    One(VmPolicy),
    /// Two different actions, or an unknown `nova-drain:` tag: never guessed.
    Invalid(String),
}

/// Reads our vocabulary from a server's tags; our own marker is no choice.
pub fn tag_choice(tags: &[String]) -> TagChoice {
    let ours: Vec<&String> = tags
        .iter()
        .filter(|t| t.starts_with(TAG_PREFIX) && t.as_str() != STOPPED_BY_US_TAG)
        .collect();
    let unknown: Vec<&str> = ours
        .iter()
        .filter(|t| !VmPolicy::ALL.iter().any(|p| p.tag() == t.as_str()))
        .map(|t| t.as_str())
        .collect();
    if !unknown.is_empty() {
        return TagChoice::Invalid(format!(
            "unknown tag(s) {}: expected one of {}",
            unknown.join(", "),
            VmPolicy::ALL.map(VmPolicy::tag).join(", ")
        ));
    }
    match ours.as_slice() {
        [] => TagChoice::None,
        [one] => VmPolicy::ALL
            .into_iter()
            .find(|p| p.tag() == one.as_str())
            .map_or(TagChoice::None, TagChoice::One),
        many => TagChoice::Invalid(format!(
            "conflicting tags {}: set only one",
            many.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// One VM and what will be done with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedVm {
    pub server: Server,
    pub action: Action,
    pub from: ActionFrom,
    /// What its tag or the node's default asked for, when one decided.
    pub asked: Option<VmPolicy>,
    /// Why the VM is not touched and counts as failed (a tag that cannot be
    /// followed); its action is then `Skip`.
    pub refused: Option<String>,
}

impl PlannedVm {
    /// Left on the host because its owner or the node asked for it (a
    /// `leave`, or a `stop` of a VM already stopped): no reason for the run to fail.
    pub fn kept_by_choice(&self) -> bool {
        self.action == Action::Skip && self.refused.is_none() && self.from.source != ActionSource::StatePolicy
    }
}

/// The action for one server that is not already moving: its tag, then the
/// node's default, then the state policy. A tag Nova cannot follow in the
/// server's state is refused; a node default that Nova cannot follow gives
/// way to the state policy (it is a default, not the owner's word). A `stop`
/// of a VM already SHUTOFF leaves it as its owner stopped it.
fn choose(server: &Server, policy: &StatePolicy, node_default: Option<VmPolicy>) -> PlannedVm {
    let status = server.status.as_str();
    let (asked, source, tag) = match tag_choice(server.tags.as_deref().unwrap_or_default()) {
        TagChoice::Invalid(why) => return planned(server, Action::Skip, ActionFrom::tag(None), None, Some(why)),
        TagChoice::One(choice) => (choice, ActionSource::Tag, Some(choice.tag())),
        TagChoice::None => match node_default {
            Some(choice) => (choice, ActionSource::NodeDefault, None),
            None => return planned(server, policy.action_for(status), ActionFrom::default(), None, None),
        },
    };
    let from = ActionFrom { source, tag };
    let action = asked.action();
    match (asked, status) {
        (VmPolicy::Stop, "SHUTOFF") => planned(server, Action::Skip, from, Some(asked), None),
        _ if action.allowed_for(status) => planned(server, action, from, Some(asked), None),
        _ if source == ActionSource::NodeDefault => {
            planned(server, policy.action_for(status), ActionFrom::default(), None, None)
        }
        _ => {
            let why = format!("tag {}: Nova cannot {asked} a {status} server", asked.tag());
            planned(server, Action::Skip, from, Some(asked), Some(why))
        }
    }
}

fn planned(
    server: &Server,
    action: Action,
    from: ActionFrom,
    asked: Option<VmPolicy>,
    refused: Option<String>,
) -> PlannedVm {
    PlannedVm {
        server: server.clone(),
        action,
        from,
        asked,
        refused,
    }
}

impl ActionFrom {
    fn tag(tag: Option<String>) -> ActionFrom {
        ActionFrom {
            source: ActionSource::Tag,
            tag,
        }
    }
}

/// Decides an action per server and orders the moves: live migrations first,
/// then cold ones, each smallest RAM first so the host empties of as many VMs
/// as early as possible; stops and skipped VMs last. Ties break on id for a
/// stable order. A server already moving keeps that move, whatever its tags.
pub fn plan(servers: Vec<Server>, policy: &StatePolicy, node_default: Option<VmPolicy>) -> Vec<PlannedVm> {
    let mut planned: Vec<PlannedVm> = servers
        .into_iter()
        .map(|server| {
            let moving = match server.task_state.as_deref() {
                // Already moving (an earlier run, or someone else): follow that move.
                Some("migrating") => Some(Action::LiveMigrate),
                Some(task) if task.starts_with("resize") => Some(Action::ColdMigrate),
                _ => None,
            };
            match moving {
                Some(action) => PlannedVm {
                    server,
                    action,
                    from: ActionFrom {
                        source: ActionSource::InProgress,
                        tag: None,
                    },
                    asked: None,
                    refused: None,
                },
                None => choose(&server, policy, node_default),
            }
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
    /// Hosts evacuated at the same time, whose VMs were placed first.
    pub spoken_for: Vec<String>,
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .unplaced
            .iter()
            .map(|u| format!("{} ({})", u.needs.id, u.reason))
            .collect();
        let after = if self.spoken_for.is_empty() {
            String::new()
        } else {
            format!(
                " once what still has to leave {} (evacuated at the same time) is placed",
                self.spoken_for.join(", ")
            )
        };
        write!(
            f,
            "the {} other enabled hypervisor(s) cannot hold {} of the VMs to move{after}: {}",
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
    let unplaced = room.place(needs);
    if unplaced.is_empty() {
        Ok(())
    } else {
        Err(Shortfall {
            unplaced,
            hosts: capacity.hosts.len(),
            spoken_for: Vec::new(),
        })
    }
}

/// Takes from the destinations' free resources what the VMs still on the
/// hosts `others` (evacuated at the same time by other agents) will need
/// there, placed the same way before ours: what the scheduler gives them is
/// not there for ours. What does not fit is the other evacuation's concern.
pub fn speak_for(capacity: &mut Capacity, others: &[VmNeeds]) {
    let mut room = Room {
        hosts: std::mem::take(&mut capacity.hosts),
        shared: std::mem::take(&mut capacity.shared),
    };
    room.place(others);
    capacity.hosts = room.hosts;
    capacity.shared = room.shared;
}

impl Room {
    /// Places the VMs, the largest (RAM) first on the host with the most
    /// free RAM; those that fit nowhere, with why.
    fn place(&mut self, needs: &[VmNeeds]) -> Vec<Unplaced> {
        let ram = |r: &Resources| r.get(MEMORY_MB).copied().unwrap_or(0);
        let mut order: Vec<&VmNeeds> = needs.iter().collect();
        order.sort_by(|a, b| ram(&b.resources).cmp(&ram(&a.resources)).then_with(|| a.id.cmp(&b.id)));
        let mut unplaced = Vec::new();
        for vm in order {
            self.hosts
                .sort_by_key(|h| std::cmp::Reverse(h.free.get(MEMORY_MB).copied().unwrap_or(0)));
            match (0..self.hosts.len()).find(|&i| self.fits(&self.hosts[i], &vm.resources)) {
                Some(index) => self.take(index, &vm.resources),
                None => unplaced.push(Unplaced {
                    needs: vm.clone(),
                    reason: self.why_not(&vm.resources),
                }),
            }
        }
        unplaced
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
            tags: Some(vec![]),
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
            None,
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
    fn tags_are_read_strictly_and_the_marker_is_no_choice() {
        let tags = |list: &[&str]| list.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        assert_eq!(tag_choice(&tags(&[])), TagChoice::None);
        assert_eq!(tag_choice(&tags(&["prod", STOPPED_BY_US_TAG])), TagChoice::None);
        assert_eq!(
            tag_choice(&tags(&["prod", "nova-drain:stop", STOPPED_BY_US_TAG])),
            TagChoice::One(VmPolicy::Stop)
        );
        let TagChoice::Invalid(why) = tag_choice(&tags(&["nova-drain:leave", "nova-drain:stop"])) else {
            panic!("two actions are a conflict");
        };
        assert_eq!(why, "conflicting tags nova-drain:leave, nova-drain:stop: set only one");
        let TagChoice::Invalid(why) = tag_choice(&tags(&["nova-drain:Stop"])) else {
            panic!("an unknown tag of ours is reported");
        };
        assert!(
            why.starts_with("unknown tag(s) nova-drain:Stop: expected one of nova-drain:live-migrate"),
            "{why}"
        );
        for policy in VmPolicy::ALL {
            let tag = policy.tag();
            assert!(
                tag.len() <= 60 && !tag.contains('/') && !tag.contains(','),
                "a valid Nova tag: {tag}"
            );
            assert_eq!(policy.as_str().parse::<VmPolicy>(), Ok(policy));
        }
        assert!(STOPPED_BY_US_TAG.len() <= 60);
        let error = "migrate".parse::<VmPolicy>().unwrap_err();
        assert_eq!(
            error,
            "unknown VM action \"migrate\": expected live-migrate, cold-migrate, stop or leave"
        );
    }

    #[test]
    fn a_moving_vm_keeps_its_move_whatever_its_tags() {
        let mut moving = server("m", "ACTIVE", 512);
        moving.task_state = Some("migrating".into());
        moving.tags = Some(vec!["nova-drain:stop".into()]);
        let mut off = server("off", "SHUTOFF", 512);
        off.tags = None; // below 2.26
        let planned = plan(vec![moving, off], &StatePolicy::default(), Some(VmPolicy::Stop));
        assert_eq!(planned[0].action, Action::LiveMigrate);
        assert_eq!(planned[0].from.source, ActionSource::InProgress);
        // A stop default for a VM already stopped leaves it, as its owner stopped it.
        assert_eq!(
            (planned[1].action, planned[1].asked),
            (Action::Skip, Some(VmPolicy::Stop))
        );
        assert!(planned[1].kept_by_choice());
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
