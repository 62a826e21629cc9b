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

/// The next move of the agent of node `me`, waiting since `since`, given the
/// Leases it has seen.
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

pub fn next_move(me: &str, since: Timestamp, seen: &[SeenLease], limits: Limits, now: Instant) -> Move {
    let in_range = |index: u32| index < limits.slots;
    if let Some(index) = seen.iter().find_map(|lease| match lease.kind {
        Kind::Slot(index) if in_range(index) && lease.holder.as_deref() == Some(me) => Some(index),
        _ => None,
    }) {
        return Move::Keep(index);
    }
    let holders: Vec<&str> = seen
        .iter()
        .filter(|lease| lease.live(now) && matches!(lease.kind, Kind::Slot(_)))
        .filter_map(|lease| lease.holder.as_deref())
        .collect();
    // A holder's ticket may outlive its taking a slot for a moment: it waits no more.
    let mut waiting: Vec<(Timestamp, &str)> = seen
        .iter()
        .filter(|lease| lease.live(now))
        .filter_map(|lease| match (&lease.kind, lease.holder.as_deref()) {
            (Kind::Ticket { since }, Some(holder)) if holder != me && !holders.contains(&holder) => {
                Some((*since, holder))
            }
            _ => None,
        })
        .collect();
    waiting.push((since, me));
    waiting.sort();
    let rank = waiting.iter().position(|(_, holder)| *holder == me).unwrap_or(0);
    let held: Vec<u32> = seen
        .iter()
        .filter(|lease| lease.live(now))
        .filter_map(|lease| match lease.kind {
            Kind::Slot(index) if in_range(index) => Some(index),
            _ => None,
        })
        .collect();
    let free: Vec<u32> = (0..limits.slots).filter(|index| !held.contains(index)).collect();
    match free.get(rank) {
        Some(index) => Move::Take(*index),
        None => Move::Wait {
            position: rank + 1 - free.len().min(rank),
            waiting: waiting.len(),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const ONE: Limits = Limits {
        slots: 1,
        migrations: 5,
    };

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).expect("a valid time")
    }

    fn slot(index: u32, holder: Option<&str>, live_until: Instant) -> SeenLease {
        SeenLease {
            kind: Kind::Slot(index),
            holder: holder.map(str::to_string),
            nova_host: holder.map(|h| format!("host-{h}")),
            live_until,
        }
    }

    fn ticket(holder: &str, since: i64, live_until: Instant) -> SeenLease {
        SeenLease {
            kind: Kind::Ticket { since: at(since) },
            holder: Some(holder.to_string()),
            nova_host: Some(format!("host-{holder}")),
            live_until,
        }
    }

    #[test]
    fn the_first_waiter_takes_the_free_slot_and_the_others_wait_in_order() {
        let now = Instant::now();
        let later = now + Duration::from_secs(30);
        let seen = [ticket("b", 2, later), ticket("a", 1, later), ticket("c", 3, later)];
        assert_eq!(next_move("a", at(1), &seen, ONE, now), Move::Take(0));
        assert_eq!(
            next_move("b", at(2), &seen, ONE, now),
            Move::Wait {
                position: 1,
                waiting: 3
            }
        );
        assert_eq!(
            next_move("c", at(3), &seen, ONE, now),
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
        assert_eq!(next_move("a", at(1), &seen, ONE, now), Move::Keep(0));
        assert_eq!(
            next_move("b", at(2), &seen, ONE, now),
            Move::Wait {
                position: 1,
                waiting: 1
            }
        );
        // Not renewed for its duration: the holder died, the slot is free.
        assert_eq!(next_move("b", at(2), &seen, ONE, later), Move::Take(0));
        // A released slot (no holder) is free at once.
        let released = [slot(0, None, later), ticket("b", 2, later)];
        assert_eq!(next_move("b", at(2), &released, ONE, now), Move::Take(0));
    }

    #[test]
    fn a_dead_waiter_loses_its_place_and_ties_go_by_name() {
        let now = Instant::now();
        let later = now + Duration::from_secs(30);
        let seen = [ticket("a", 1, now), ticket("b", 5, later)];
        assert_eq!(
            next_move("c", at(5), &seen, ONE, now),
            Move::Wait {
                position: 1,
                waiting: 2
            }
        );
        assert_eq!(next_move("b", at(5), &seen, ONE, now), Move::Take(0));
    }

    #[test]
    fn with_two_slots_the_first_two_take_one_each() {
        let two = Limits {
            slots: 2,
            migrations: 5,
        };
        let now = Instant::now();
        let later = now + Duration::from_secs(30);
        let seen = [ticket("a", 1, later), ticket("b", 2, later), ticket("c", 3, later)];
        assert_eq!(next_move("a", at(1), &seen, two, now), Move::Take(0));
        assert_eq!(next_move("b", at(2), &seen, two, now), Move::Take(1));
        assert_eq!(
            next_move("c", at(3), &seen, two, now),
            Move::Wait {
                position: 1,
                waiting: 3
            }
        );
        // Slot 0 held: the first waiter takes slot 1, the next waits first in line.
        let one_held = [slot(0, Some("x"), later), ticket("b", 2, later), ticket("c", 3, later)];
        assert_eq!(next_move("b", at(2), &one_held, two, now), Move::Take(1));
        assert_eq!(
            next_move("c", at(3), &one_held, two, now),
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

    #[test]
    fn slots_beyond_the_limit_are_ignored() {
        let now = Instant::now();
        let later = now + Duration::from_secs(30);
        // Left from a time the limit was 2: slot 1 is no slot now.
        let seen = [slot(1, Some("a"), later)];
        assert_eq!(next_move("a", at(1), &seen, ONE, now), Move::Take(0));
        assert_eq!(next_move("b", at(1), &seen, ONE, now), Move::Take(0));
    }

    #[test]
    fn the_migration_limit_is_split_over_the_slots_and_never_exceeded() {
        for slots in 1..=7 {
            for migrations in slots..=20 {
                let limits = Limits { slots, migrations };
                let total: u32 = (0..slots).map(|i| limits.share(i)).sum();
                assert_eq!(total, migrations, "{limits:?}");
            }
        }
        let limits = Limits {
            slots: 2,
            migrations: 5,
        };
        assert_eq!((limits.share(0), limits.share(1)), (3, 2));
    }
}
