//! The cluster-wide queue for evacuation slots, as plain decisions over the
//! coordination Leases an agent has seen (see [`crate::kube::leases`]): which
//! slot it may take, where it stands in the queue, and how many live
//! migrations its slot allows. No I/O and no clock of its own.
//!
//! At most `slots` hypervisors evacuate at once: each holds one slot Lease.
//! The nodes waiting are served first come, first served by the time they
//! started waiting (then by node name); the first `k` of them take the `k`
//! free slots, each the free slot of its rank, so two waiters never race for
//! one slot unless their views differ (then the Lease's resourceVersion picks
//! one). A Lease nobody has renewed for its duration, by the reader's clock,
//! is free (a slot) or gone (a ticket): an agent that died loses its place.

use jiff::Timestamp;
use tokio::time::Instant;

/// The cluster's limits, the same on every agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Hypervisors evacuating at once across the cluster.
    pub slots: u32,
    /// Live migrations at once across all of them.
    pub migrations: u32,
    /// Which availability zones may evacuate at the same time.
    pub zones: ZoneRule,
}

/// Which availability zones hypervisors evacuating at the same time may be in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ZoneRule {
    /// Any.
    #[default]
    Any,
    /// All in one zone: every other zone stays whole while they evacuate.
    Same,
    /// Each in a zone of its own: no zone loses two hypervisors at once.
    Different,
}

impl ZoneRule {
    /// Whether a hypervisor in `zone` may evacuate beside those in `others`
    /// (a zone Nova does not tell counts as one of its own).
    pub fn allows(self, zone: Option<&str>, others: &[Option<&str>]) -> bool {
        match self {
            ZoneRule::Any => true,
            ZoneRule::Same => others.iter().all(|other| *other == zone),
            ZoneRule::Different => others.iter().all(|other| *other != zone),
        }
    }
}

impl Limits {
    /// The live migrations the holder of slot `index` may run: the cluster's
    /// limit split evenly over the slots (the lower slots take the
    /// remainder), so that the slots together never exceed it whatever each
    /// holder does, with no further coordination. Never 0: the limits are
    /// checked (`migrations >= slots`) when read.
    pub fn share(&self, index: u32) -> u32 {
        let slots = self.slots.max(1);
        let share = self.migrations / slots + u32::from(index < self.migrations % slots);
        share.max(1)
    }
}

/// What a coordination Lease is, as the queue needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Slot(u32),
    /// A waiting node's ticket: since when it waits.
    Ticket {
        since: Timestamp,
    },
}

/// One coordination Lease as last seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenLease {
    pub kind: Kind,
    /// `holderIdentity`: the agent's node.
    pub holder: Option<String>,
    /// The Nova host of the agent that wrote it.
    pub nova_host: Option<String>,
    /// Its availability zone.
    pub zone: Option<String>,
    /// By the reader's clock: when it was last seen to change, plus its duration.
    pub live_until: Instant,
}

impl SeenLease {
    fn live(&self, now: Instant) -> bool {
        self.holder.is_some() && now < self.live_until
    }
}

/// What the agent should do about the slots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Move {
    /// It holds slot `index` (seen held by it): renew it.
    Keep(u32),
    /// Take free slot `index`.
    Take(u32),
    /// Wait: `position` in the queue (1: next), of `waiting` nodes.
    Wait { position: usize, waiting: usize },
}

/// The Nova hosts of the other agents holding a slot: evacuated at the same time as `me`'s.
pub fn evacuating_beside(me: &str, seen: &[SeenLease], now: Instant) -> Vec<String> {
    let mut hosts: Vec<String> = seen
        .iter()
        .filter(|lease| matches!(lease.kind, Kind::Slot(_)) && lease.live(now) && lease.holder.as_deref() != Some(me))
        .filter_map(|lease| lease.nova_host.clone())
        .collect();
    hosts.sort();
    hosts.dedup();
    hosts
}

/// The next move of the agent of node `me` (its hypervisor in `zone`),
/// waiting since `since`, given the Leases it has seen. Under a zone rule one
/// node takes a slot at a time: the first in line whose zone the rule allows
/// beside the holders (a slot taken under a zone rule is checked again
/// before use, see the coordinator).
pub fn next_move(
    me: &str,
    since: Timestamp,
    zone: Option<&str>,
    seen: &[SeenLease],
    limits: Limits,
    now: Instant,
) -> Move {
    let in_range = |index: u32| index < limits.slots;
    if let Some(index) = seen.iter().find_map(|lease| match lease.kind {
        Kind::Slot(index) if in_range(index) && lease.holder.as_deref() == Some(me) => Some(index),
        _ => None,
    }) {
        return Move::Keep(index);
    }
    let holding: Vec<&SeenLease> = seen
        .iter()
        .filter(|lease| lease.live(now) && matches!(lease.kind, Kind::Slot(_)))
        .collect();
    let holders: Vec<&str> = holding.iter().filter_map(|lease| lease.holder.as_deref()).collect();
    let holder_zones: Vec<Option<&str>> = holding.iter().map(|lease| lease.zone.as_deref()).collect();
    // A holder's ticket may outlive its taking a slot for a moment: it waits no more.
    let mut waiting: Vec<(Timestamp, &str, Option<&str>)> = seen
        .iter()
        .filter(|lease| lease.live(now))
        .filter_map(|lease| match (&lease.kind, lease.holder.as_deref()) {
            (Kind::Ticket { since }, Some(holder)) if holder != me && !holders.contains(&holder) => {
                Some((*since, holder, lease.zone.as_deref()))
            }
            _ => None,
        })
        .collect();
    waiting.push((since, me, zone));
    waiting.sort();
    let rank = waiting.iter().position(|(_, holder, _)| *holder == me).unwrap_or(0);
    let held: Vec<u32> = seen
        .iter()
        .filter(|lease| lease.live(now))
        .filter_map(|lease| match lease.kind {
            Kind::Slot(index) if in_range(index) => Some(index),
            _ => None,
        })
        .collect();
    let free: Vec<u32> = (0..limits.slots).filter(|index| !held.contains(index)).collect();
    let wait = Move::Wait {
        position: rank + 1 - free.len().min(rank),
        waiting: waiting.len(),
    };
    if limits.zones != ZoneRule::Any && zone.is_none() {
        // Its zone not known yet (Nova not asked yet): the rule cannot be kept.
        return wait;
    }
    if limits.zones != ZoneRule::Any {
        let first_allowed = waiting
            .iter()
            .find(|(_, _, zone)| limits.zones.allows(*zone, &holder_zones))
            .map(|(_, holder, _)| *holder);
        return match free.first() {
            Some(index) if first_allowed == Some(me) => Move::Take(*index),
            _ => wait,
        };
    }
    match free.get(rank) {
        Some(index) => Move::Take(*index),
        None => wait,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const ONE: Limits = Limits {
        slots: 1,
        migrations: 5,
        zones: ZoneRule::Any,
    };

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).expect("a valid time")
    }

    fn slot(index: u32, holder: Option<&str>, live_until: Instant) -> SeenLease {
        SeenLease {
            kind: Kind::Slot(index),
            holder: holder.map(str::to_string),
            nova_host: holder.map(|h| format!("host-{h}")),
            zone: None,
            live_until,
        }
    }

    fn ticket(holder: &str, since: i64, live_until: Instant) -> SeenLease {
        SeenLease {
            kind: Kind::Ticket { since: at(since) },
            holder: Some(holder.to_string()),
            nova_host: Some(format!("host-{holder}")),
            zone: None,
            live_until,
        }
    }

    #[test]
    fn the_first_waiter_takes_the_free_slot_and_the_others_wait_in_order() {
        let now = Instant::now();
        let later = now + Duration::from_secs(30);
        let seen = [ticket("b", 2, later), ticket("a", 1, later), ticket("c", 3, later)];
        assert_eq!(next_move("a", at(1), None, &seen, ONE, now), Move::Take(0));
        assert_eq!(
            next_move("b", at(2), None, &seen, ONE, now),
            Move::Wait {
                position: 1,
                waiting: 3
            }
        );
        assert_eq!(
            next_move("c", at(3), None, &seen, ONE, now),
            Move::Wait {
                position: 2,
                waiting: 3
            }
        );
    }

    #[test]
    fn a_held_slot_is_kept_and_waited_for_until_it_expires() {
        let now = Instant::now();
        let later = now + Duration::from_secs(30);
        let seen = [slot(0, Some("a"), later), ticket("b", 2, later)];
        assert_eq!(next_move("a", at(1), None, &seen, ONE, now), Move::Keep(0));
        assert_eq!(
            next_move("b", at(2), None, &seen, ONE, now),
            Move::Wait {
                position: 1,
                waiting: 1
            }
        );
        // Not renewed for its duration: the holder died, the slot is free.
        assert_eq!(next_move("b", at(2), None, &seen, ONE, later), Move::Take(0));
        // A released slot (no holder) is free at once.
        let released = [slot(0, None, later), ticket("b", 2, later)];
        assert_eq!(next_move("b", at(2), None, &released, ONE, now), Move::Take(0));
    }

    #[test]
    fn a_dead_waiter_loses_its_place_and_ties_go_by_name() {
        let now = Instant::now();
        let later = now + Duration::from_secs(30);
        let seen = [ticket("a", 1, now), ticket("b", 5, later)];
        assert_eq!(
            next_move("c", at(5), None, &seen, ONE, now),
            Move::Wait {
                position: 1,
                waiting: 2
            }
        );
        assert_eq!(next_move("b", at(5), None, &seen, ONE, now), Move::Take(0));
    }

    #[test]
    fn with_two_slots_the_first_two_take_one_each() {
        let two = Limits {
            slots: 2,
            migrations: 5,
            zones: ZoneRule::Any,
        };
        let now = Instant::now();
        let later = now + Duration::from_secs(30);
        let seen = [ticket("a", 1, later), ticket("b", 2, later), ticket("c", 3, later)];
        assert_eq!(next_move("a", at(1), None, &seen, two, now), Move::Take(0));
        assert_eq!(next_move("b", at(2), None, &seen, two, now), Move::Take(1));
        assert_eq!(
            next_move("c", at(3), None, &seen, two, now),
            Move::Wait {
                position: 1,
                waiting: 3
            }
        );
        // Slot 0 held: the first waiter takes slot 1, the next waits first in line.
        let one_held = [slot(0, Some("x"), later), ticket("b", 2, later), ticket("c", 3, later)];
        assert_eq!(next_move("b", at(2), None, &one_held, two, now), Move::Take(1));
        assert_eq!(
            next_move("c", at(3), None, &one_held, two, now),
            Move::Wait {
                position: 1,
                waiting: 2
            }
        );
    }

    #[test]
    fn the_hosts_evacuated_beside_are_those_of_the_other_live_holders() {
        let now = Instant::now();
        let later = now + Duration::from_secs(30);
        let seen = [
            slot(0, Some("a"), later),
            slot(1, Some("b"), later),
            slot(2, Some("dead"), now),
            slot(3, None, later),
            ticket("c", 1, later),
        ];
        assert_eq!(evacuating_beside("a", &seen, now), ["host-b"]);
    }

    fn in_zone(mut lease: SeenLease, zone: &str) -> SeenLease {
        lease.zone = Some(zone.to_string());
        lease
    }

    #[test]
    fn under_a_zone_rule_the_first_in_line_the_rule_allows_takes_a_slot_one_at_a_time() {
        let now = Instant::now();
        let later = now + Duration::from_secs(30);
        let limits = |zones| Limits {
            slots: 3,
            migrations: 6,
            zones,
        };
        let queue = [
            in_zone(slot(0, Some("a"), later), "az1"),
            in_zone(ticket("b", 1, later), "az2"),
            in_zone(ticket("c", 2, later), "az1"),
            in_zone(ticket("d", 3, later), "az3"),
        ];
        // Same zone: c (az1, beside a) goes before b (az2), who waits for az1 to finish.
        let same = limits(ZoneRule::Same);
        assert_eq!(next_move("c", at(2), Some("az1"), &queue, same, now), Move::Take(1));
        assert!(matches!(
            next_move("b", at(1), Some("az2"), &queue, same, now),
            Move::Wait { .. }
        ));
        // Different zones: b (az2) goes first; c (az1, like a) waits; d after b.
        let different = limits(ZoneRule::Different);
        assert_eq!(
            next_move("b", at(1), Some("az2"), &queue, different, now),
            Move::Take(1)
        );
        assert!(matches!(
            next_move("c", at(2), Some("az1"), &queue, different, now),
            Move::Wait { .. }
        ));
        assert!(matches!(
            next_move("d", at(3), Some("az3"), &queue, different, now),
            Move::Wait { .. }
        ));
        // With no holder, only the first in line takes, whatever its zone.
        let empty = [
            in_zone(ticket("b", 1, later), "az2"),
            in_zone(ticket("c", 2, later), "az1"),
        ];
        assert_eq!(next_move("b", at(1), Some("az2"), &empty, same, now), Move::Take(0));
        assert!(matches!(
            next_move("c", at(2), Some("az1"), &empty, same, now),
            Move::Wait { .. }
        ));
    }

    #[test]
    fn zone_rules_allow_what_they_say() {
        assert!(ZoneRule::Same.allows(Some("a"), &[Some("a"), Some("a")]));
        assert!(!ZoneRule::Same.allows(Some("a"), &[Some("b")]));
        assert!(ZoneRule::Different.allows(Some("a"), &[Some("b"), None]));
        assert!(!ZoneRule::Different.allows(None, &[None]));
        assert!(ZoneRule::Any.allows(None, &[Some("a")]));
    }

    #[test]
    fn slots_beyond_the_limit_are_ignored() {
        let now = Instant::now();
        let later = now + Duration::from_secs(30);
        // Left from a time the limit was 2: slot 1 is no slot now.
        let seen = [slot(1, Some("a"), later)];
        assert_eq!(next_move("a", at(1), None, &seen, ONE, now), Move::Take(0));
        assert_eq!(next_move("b", at(1), None, &seen, ONE, now), Move::Take(0));
    }

    #[test]
    fn the_migration_limit_is_split_over_the_slots_and_never_exceeded() {
        for slots in 1..=7 {
            for migrations in slots..=20 {
                let limits = Limits {
                    slots,
                    migrations,
                    zones: ZoneRule::Any,
                };
                let total: u32 = (0..slots).map(|i| limits.share(i)).sum();
                assert_eq!(total, migrations, "{limits:?}");
            }
        }
        let limits = Limits {
            slots: 2,
            migrations: 5,
            zones: ZoneRule::Any,
        };
        assert_eq!((limits.share(0), limits.share(1)), (3, 2));
    }
}
