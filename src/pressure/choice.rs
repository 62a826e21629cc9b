//! Which VM to move off a host under memory pressure, and where: plain
//! logic over what Nova and Placement told, so it reads and tests alone.
//!
//! Fewest moves: the smallest VM that frees enough on its own (moving more
//! RAM than needed costs time and bandwidth), else the largest (each move
//! frees as much as one can). A VM moved recently weighs as if it were
//! bigger: it is moved again only where no other does as well. A VM in its
//! cool-down, one its owner tagged to stay, or one Nova cannot live-migrate
//! now is never chosen.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::evacuation::compute::{Capacity, MEMORY_MB, Resources, Server};
use crate::evacuation::plan::{TagChoice, VmPolicy, tag_choice};

/// How the VM to move is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    /// The fewest moves, each the cheapest that does.
    #[default]
    Fewest,
    /// Always the largest VM (the naive policy, kept to compare against).
    Largest,
}

/// A VM on the host and its recent history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub server: Server,
    /// How long ago its last live migration (by anyone) began; `None`: none known.
    pub last_moved_ago: Option<Duration>,
    /// Its live migrations within the history Nova keeps that we read (a day).
    pub recent_moves: u32,
    /// Why its history could not be read: its cool-down cannot be known,
    /// so it is not chosen.
    pub history_unknown: Option<String>,
}

/// The VM chosen and why, in words for the Event and the object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chosen {
    pub server: Server,
    pub why: String,
}

/// Why a VM may not be moved for relief at all; `None`: it may.
pub fn not_movable(server: &Server) -> Option<String> {
    if !matches!(server.status.as_str(), "ACTIVE" | "PAUSED") {
        return Some(format!("{} (only ACTIVE and PAUSED VMs live-migrate)", server.status));
    }
    if let Some(task) = &server.task_state {
        return Some(format!("busy ({task})"));
    }
    match tag_choice(server.tags.as_deref().unwrap_or_default()) {
        TagChoice::None | TagChoice::One(VmPolicy::LiveMigrate) => None,
        TagChoice::One(asked) => Some(format!(
            "tagged {}: its owner does not want it live-migrated",
            asked.tag()
        )),
        TagChoice::Invalid(why) => Some(why),
    }
}

/// The VM to move to free `short_mib`, among `candidates`; `Err`: none
/// may move, with why for each.
pub fn choose(
    candidates: &[Candidate],
    short_mib: u64,
    policy: Policy,
    cool_down: Duration,
) -> Result<Chosen, Vec<(String, String)>> {
    let mut refused = Vec::new();
    let mut eligible = Vec::new();
    for candidate in candidates {
        let why = not_movable(&candidate.server)
            .or_else(|| {
                candidate
                    .history_unknown
                    .as_ref()
                    .map(|e| format!("its migration history cannot be read ({e})"))
            })
            .or_else(|| {
                candidate
                    .last_moved_ago
                    .filter(|ago| *ago < cool_down)
                    .map(|ago| format!("moved {} s ago (cool-down {} s)", ago.as_secs(), cool_down.as_secs()))
            });
        match why {
            Some(why) => refused.push((candidate.server.id.clone(), why)),
            None if candidate.server.flavor.ram_mb == 0 => {
                refused.push((candidate.server.id.clone(), "its flavor has no RAM to free".to_string()))
            }
            None => eligible.push(candidate),
        }
    }
    let pick = match policy {
        Policy::Largest => eligible
            .iter()
            .max_by_key(|c| (c.server.flavor.ram_mb, std::cmp::Reverse(c.server.id.clone())))
            .copied(),
        Policy::Fewest => fewest(&eligible, short_mib),
    };
    let Some(pick) = pick else {
        return Err(refused);
    };
    let ram = pick.server.flavor.ram_mb;
    let why = match policy {
        Policy::Largest => format!("the largest VM ({ram} MiB; {short_mib} MiB short)"),
        Policy::Fewest if ram >= short_mib => {
            format!("the smallest VM that frees the {short_mib} MiB short on its own ({ram} MiB)")
        }
        Policy::Fewest => format!("the largest VM ({ram} MiB): none frees the {short_mib} MiB short on its own"),
    };
    Ok(Chosen {
        server: pick.server.clone(),
        why: match pick.recent_moves {
            0 => why,
            n => format!("{why}; moved {n} time(s) recently"),
        },
    })
}

/// The smallest (by weight) of those that free enough alone, else the one
/// that frees the most per weight. The weight of a VM is its RAM times one
/// plus its recent moves: what moving it costs, and how often it paid it.
fn fewest<'c>(eligible: &[&'c Candidate], short_mib: u64) -> Option<&'c Candidate> {
    let weight = |c: &Candidate| c.server.flavor.ram_mb.saturating_mul(1 + u64::from(c.recent_moves));
    let enough = eligible
        .iter()
        .filter(|c| c.server.flavor.ram_mb >= short_mib)
        .min_by_key(|c| (weight(c), c.server.flavor.ram_mb, c.server.id.clone()));
    enough
        .or_else(|| {
            eligible.iter().max_by(|a, b| {
                // RAM freed per move, discounted by how often the VM moved lately.
                let per_weight = |c: &Candidate| c.server.flavor.ram_mb as f64 / (1 + c.recent_moves) as f64;
                per_weight(a)
                    .total_cmp(&per_weight(b))
                    .then_with(|| b.server.id.cmp(&a.server.id))
            })
        })
        .copied()
}

/// The host to send `server` to: among the hosts of `capacity` not
/// `excluded` (under pressure, in maintenance: host -> why), those where it
/// fits, the one with the most memory left free afterwards.
pub fn destination(server: &Server, capacity: &Capacity, excluded: &BTreeMap<String, String>) -> Option<String> {
    let needs: Resources = capacity
        .allocations
        .get(&server.id)
        .cloned()
        .unwrap_or_else(|| server.flavor.resources());
    capacity
        .hosts
        .iter()
        .filter(|host| !excluded.contains_key(&host.host))
        .filter(|host| {
            needs.iter().all(|(class, need)| match host.shared.get(class) {
                // On a sharing provider (a Ceph pool) the VM's share stays where it is.
                Some(_) => true,
                None => host.free.get(class).is_some_and(|free| free >= need),
            })
        })
        .max_by_key(|host| {
            let free = host.free.get(MEMORY_MB).copied().unwrap_or(0);
            (
                free.saturating_sub(needs.get(MEMORY_MB).copied().unwrap_or(0)),
                std::cmp::Reverse(host.host.clone()),
            )
        })
        .map(|host| host.host.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evacuation::compute::{Flavor, HostCapacity};

    fn vm(id: &str, ram_mb: u64) -> Server {
        Server {
            id: id.into(),
            name: id.into(),
            project_id: "p".into(),
            status: "ACTIVE".into(),
            task_state: None,
            host: Some("host1".into()),
            running: true,
            tags: Some(vec![]),
            flavor: Flavor {
                ram_mb,
                vcpus: 1,
                disk_gb: 1,
            },
        }
    }

    fn candidate(id: &str, ram_mb: u64) -> Candidate {
        Candidate {
            server: vm(id, ram_mb),
            last_moved_ago: None,
            recent_moves: 0,
            history_unknown: None,
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn the_smallest_vm_that_frees_enough_alone_is_chosen_else_the_largest() {
        let vms = [candidate("a", 512), candidate("b", 2048), candidate("c", 8192)];
        assert_eq!(choose(&vms, 1500, Policy::Fewest, HOUR).unwrap().server.id, "b");
        assert_eq!(choose(&vms, 500, Policy::Fewest, HOUR).unwrap().server.id, "a");
        assert_eq!(choose(&vms, 10000, Policy::Fewest, HOUR).unwrap().server.id, "c");
        assert_eq!(choose(&vms, 500, Policy::Largest, HOUR).unwrap().server.id, "c");
    }

    #[test]
    fn a_vm_tagged_to_stay_busy_stopped_or_cooling_down_is_never_chosen() {
        let mut leave = candidate("leave", 4096);
        leave.server.tags = Some(vec!["nova-drain:leave".into()]);
        let mut cold = candidate("cold", 4096);
        cold.server.tags = Some(vec!["nova-drain:cold-migrate".into()]);
        let mut busy = candidate("busy", 4096);
        busy.server.task_state = Some("migrating".into());
        let mut off = candidate("off", 4096);
        off.server.status = "SHUTOFF".into();
        let mut moved = candidate("moved", 4096);
        moved.last_moved_ago = Some(Duration::from_secs(60));
        let vms = [leave, cold, busy, off, moved];
        let refused = choose(&vms, 100, Policy::Largest, HOUR).unwrap_err();
        assert_eq!(refused.len(), 5);
        assert!(refused[0].1.contains("nova-drain:leave"), "{refused:?}");
        assert!(refused[4].1.contains("cool-down"), "{refused:?}");
        // Past its cool-down it may move again.
        let mut moved = candidate("moved", 4096);
        moved.last_moved_ago = Some(2 * HOUR);
        assert_eq!(choose(&[moved], 100, Policy::Fewest, HOUR).unwrap().server.id, "moved");
    }

    #[test]
    fn a_vm_moved_recently_gives_way_to_one_that_frees_as_much() {
        let mut often = candidate("often", 2048);
        often.recent_moves = 2;
        often.last_moved_ago = Some(2 * HOUR);
        let vms = [often, candidate("fresh", 4096)];
        let chosen = choose(&vms, 1024, Policy::Fewest, HOUR).unwrap();
        assert_eq!(chosen.server.id, "fresh", "2048 x 3 weighs more than 4096");
    }

    fn host(name: &str, free_mb: u64) -> HostCapacity {
        HostCapacity {
            host: name.into(),
            free: [
                (MEMORY_MB.to_string(), free_mb),
                ("VCPU".to_string(), 64),
                ("DISK_GB".to_string(), 1000),
            ]
            .into(),
            shared: BTreeMap::new(),
        }
    }

    #[test]
    fn the_destination_has_room_is_not_excluded_and_has_the_most_memory_left() {
        let capacity = Capacity {
            hosts: vec![host("host2", 1024), host("host3", 8192), host("host4", 30000)],
            ..Capacity::default()
        };
        let server = vm("a", 2048);
        let none = BTreeMap::new();
        assert_eq!(destination(&server, &capacity, &none).as_deref(), Some("host4"));
        let excluded = BTreeMap::from([("host4".to_string(), "under memory pressure".to_string())]);
        assert_eq!(destination(&server, &capacity, &excluded).as_deref(), Some("host3"));
        let excluded = BTreeMap::from([
            ("host4".to_string(), "under memory pressure".to_string()),
            ("host3".to_string(), "in maintenance".to_string()),
        ]);
        assert_eq!(destination(&server, &capacity, &excluded), None, "host2 is too small");
    }
}
