//! The agent's part in the cluster-wide queue for evacuation slots: a task
//! that, while the agent wants a slot, watches the coordination Leases, keeps
//! its ticket in the queue, takes the slot its turn gives it and renews it,
//! and lets both go when the agent no longer wants them. [`queue`] decides;
//! this carries it out.
//!
//! An idle agent costs nothing: no watch, no write (past one delete at
//! start-up, of a ticket an earlier agent of its node may have left). One that waits or holds
//! renews one Lease every third of the lease time and keeps one watch open,
//! whatever the number of agents.
//!
//! A holder that cannot renew its slot stops counting on it half a lease
//! time after its last renewal was sent ([`Standing::Unsure`]): its run
//! starts nothing more and aborts what is in flight, well before any other
//! agent can see the slot expire (a full lease time after it last saw it
//! change). So two holders of one slot never migrate at once.
//!
//! [`queue`]: super::queue

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{Stream, StreamExt};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::watcher;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use super::queue::ZoneRule;
use super::queue::{Kind, Limits, Move, SeenLease, evacuating_beside, next_move};
use crate::kube::leases::{
    CoordinationLeases, LeaseError, NOVA_HOST_ANNOTATION, Role, ZONE_ANNOTATION, role_of, slot_name, ticket_name,
};

/// The agent asks for a slot, waiting since `since` (when it first asked
/// for this maintenance), its hypervisor in availability zone `zone`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    pub since: Timestamp,
    pub zone: Option<String>,
}

/// Where the agent stands in the queue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Standing {
    /// Not in the queue.
    #[default]
    Idle,
    /// In the queue: `position` 1 is next, of `waiting` nodes; 0 while the
    /// Leases are still being listed.
    Waiting { position: usize, waiting: usize },
    /// Holds slot `slot`: it may evacuate, at most `share` live migrations
    /// at once; `beside`: the Nova hosts the other holders evacuate.
    Holding { slot: u32, share: u32, beside: Vec<String> },
    /// Held slot `slot` but could not renew it in time: start nothing, abort what runs.
    Unsure { slot: u32 },
}

/// The coordination's settings, the same on every agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoordinationSettings {
    pub limits: Limits,
    /// How long a Lease nobody renews stays held.
    pub lease: Duration,
}

impl CoordinationSettings {
    fn renew_every(&self) -> Duration {
        self.lease / 3
    }

    /// How long after its last renewal was sent a holder still counts on its slot.
    fn safe_for(&self) -> Duration {
        self.lease / 2
    }

    /// Longest a Lease request may take before it counts as failed.
    fn request_timeout(&self) -> Duration {
        (self.lease / 10).max(Duration::from_millis(500))
    }

    fn retry(&self) -> Duration {
        (self.lease / 15).clamp(Duration::from_millis(200), Duration::from_secs(2))
    }
}

/// A Lease as last seen, and when (by our clock) it was last seen to change.
struct Cached {
    lease: Lease,
    changed_at: Instant,
}

/// The slot this agent holds.
struct Held {
    index: u32,
    lease: Lease,
    /// When the last successful renewal (or the taking) was sent.
    renewed: Instant,
}

struct Coordinator {
    leases: CoordinationLeases,
    settings: CoordinationSettings,
    cache: BTreeMap<String, Cached>,
    /// A (re-)list in progress: the Leases listed so far.
    relist: Option<BTreeMap<String, Lease>>,
    listed: bool,
    held: Option<Held>,
    /// Our ticket as last written, and when that write was sent.
    ticket: Option<(Lease, Instant)>,
    /// A failed write is not tried again before this.
    retry_at: Option<Instant>,
    /// The availability zone of the agent's hypervisor, as last asked.
    zone: Option<String>,
    /// An earlier agent of this node may have left a ticket (until the first let-go).
    ticket_maybe_left: bool,
    standing: watch::Sender<Standing>,
}

type LeaseEvents = std::pin::Pin<Box<dyn Stream<Item = Result<watcher::Event<Lease>, watcher::Error>> + Send>>;

/// Runs until the agent drops its side of `want`; lets go of what it holds then.
pub async fn run(
    leases: CoordinationLeases,
    settings: CoordinationSettings,
    mut want: watch::Receiver<Option<Want>>,
    standing: watch::Sender<Standing>,
) {
    let mut coordinator = Coordinator {
        leases,
        settings,
        cache: BTreeMap::new(),
        relist: None,
        listed: false,
        held: None,
        ticket: None,
        retry_at: None,
        zone: None,
        ticket_maybe_left: true,
        standing,
    };
    let mut events: Option<LeaseEvents> = None;
    loop {
        let wanted = want.borrow_and_update().clone();
        let wake = match wanted {
            None => {
                coordinator.let_go().await;
                events = None;
                None
            }
            Some(wanted) => {
                if events.is_none() {
                    events = Some(Box::pin(coordinator.leases.watch()));
                }
                coordinator.step(wanted).await
            }
        };
        tokio::select! {
            changed = want.changed() => if changed.is_err() {
                coordinator.let_go().await;
                return;
            },
            Some(event) = async { events.as_mut()?.next().await }, if events.is_some() => {
                coordinator.apply(event);
            }
            _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {}
        }
    }
}

impl Coordinator {
    fn me(&self) -> &str {
        self.leases.holder()
    }

    fn publish(&self, standing: Standing) {
        self.standing.send_if_modified(|current| {
            let changed = *current != standing;
            *current = standing;
            changed
        });
    }

    /// Takes in one watch event: a Lease's change time moves on only when its
    /// holder or times changed, so a re-list never makes a dead holder look alive.
    fn apply(&mut self, event: Result<watcher::Event<Lease>, watcher::Error>) {
        let now = Instant::now();
        match event {
            Ok(watcher::Event::Init) => self.relist = Some(BTreeMap::new()),
            Ok(watcher::Event::InitApply(lease)) => {
                if let Some(relist) = &mut self.relist {
                    relist.insert(lease.metadata.name.clone().unwrap_or_default(), lease);
                }
            }
            Ok(watcher::Event::InitDone) => {
                let listed = self.relist.take().unwrap_or_default();
                self.cache.retain(|name, _| listed.contains_key(name));
                for lease in listed.into_values() {
                    self.remember(lease, now);
                }
                self.listed = true;
            }
            Ok(watcher::Event::Apply(lease)) => self.remember(lease, now),
            Ok(watcher::Event::Delete(lease)) => {
                self.cache.remove(&lease.metadata.name.clone().unwrap_or_default());
            }
            Err(e) => warn!(error = %e, "watching the coordination leases; retrying"),
        }
    }

    fn remember(&mut self, lease: Lease, now: Instant) {
        let name = lease.metadata.name.clone().unwrap_or_default();
        let moved = |old: &Lease| {
            let (a, b) = (old.spec.as_ref(), lease.spec.as_ref());
            a.map(|s| (&s.holder_identity, &s.renew_time, &s.acquire_time))
                != b.map(|s| (&s.holder_identity, &s.renew_time, &s.acquire_time))
        };
        let changed_at = match self.cache.get(&name) {
            Some(cached) if !moved(&cached.lease) => cached.changed_at,
            _ => now,
        };
        self.cache.insert(name, Cached { lease, changed_at });
    }

    /// The Leases as the queue sees them.
    fn seen(&self) -> Vec<SeenLease> {
        self.cache
            .iter()
            .filter_map(|(name, cached)| {
                let spec = cached.lease.spec.as_ref()?;
                let kind = match role_of(name)? {
                    Role::Slot(index) => Kind::Slot(index),
                    Role::Ticket => Kind::Ticket {
                        since: spec.acquire_time.as_ref()?.0,
                    },
                };
                let duration = spec
                    .lease_duration_seconds
                    .and_then(|s| u64::try_from(s).ok())
                    .map_or(self.settings.lease, Duration::from_secs);
                Some(SeenLease {
                    kind,
                    holder: spec.holder_identity.clone(),
                    nova_host: annotation(&cached.lease, NOVA_HOST_ANNOTATION),
                    zone: annotation(&cached.lease, ZONE_ANNOTATION),
                    live_until: cached.changed_at + duration,
                })
            })
            .collect()
    }

    /// One round while the agent wants a slot; returns when to look again
    /// (`None`: at the next watch event).
    async fn step(&mut self, wanted: Want) -> Option<Instant> {
        if !self.listed {
            self.publish(Standing::Waiting {
                position: 0,
                waiting: 0,
            });
            return None;
        }
        let now = Instant::now();
        if self.held.is_some() {
            // Also while a renewal is to be tried again: the moment to stop counting on the slot must not wait.
            return self.keep_holding(now).await;
        }
        if self.retry_at.is_some_and(|at| at > now) {
            return self.retry_at;
        }
        self.retry_at = None;
        let since = self.since(&wanted);
        self.zone = wanted.zone;
        let zone = self.zone.as_deref();
        match next_move(self.me(), since, zone, &self.seen(), self.settings.limits, now) {
            Move::Keep(index) => self.adopt(index).await,
            Move::Take(index) => self.take(index).await,
            Move::Wait { position, waiting } => {
                self.publish(Standing::Waiting { position, waiting });
                self.keep_ticket(since, now).await
            }
        }
    }

    /// When the agent started waiting: what it asks, or its ticket's time if
    /// that is earlier (a restarted agent keeps its place).
    fn since(&self, wanted: &Want) -> Timestamp {
        // Written by this node's agent (the same clock): a ticket not renewed
        // for two lease times is from an earlier maintenance, not this one.
        let recent = |spec: &k8s_openapi::api::coordination::v1::LeaseSpec| {
            let renewed = spec.renew_time.as_ref()?.0;
            let age = Timestamp::now().duration_since(renewed);
            (age.unsigned_abs() < self.settings.lease * 2).then_some(())
        };
        let ticket = self.cache.get(&ticket_name(self.me())).and_then(|c| {
            let spec = c.lease.spec.as_ref()?;
            recent(spec)?;
            spec.acquire_time.as_ref().map(|t| t.0)
        });
        ticket.map_or(wanted.since, |t| t.min(wanted.since))
    }

    async fn keep_holding(&mut self, now: Instant) -> Option<Instant> {
        let Some(held) = &self.held else { return None };
        let (index, renewed) = (held.index, held.renewed);
        let unsure_at = renewed + self.settings.safe_for();
        if now >= unsure_at {
            // Told before trying again: the run must not wait for a request.
            self.publish(Standing::Unsure { slot: index });
        }
        let retry_due = self.retry_at.is_none_or(|at| at <= now);
        if now >= renewed + self.settings.renew_every() && retry_due {
            self.renew_slot(index, unsure_at).await;
        }
        let Some(held) = &self.held else {
            return Some(Instant::now());
        };
        let unsure_at = held.renewed + self.settings.safe_for();
        if Instant::now() >= unsure_at {
            self.publish(Standing::Unsure { slot: index });
        } else {
            self.publish(Standing::Holding {
                slot: index,
                share: self.settings.limits.share(index),
                beside: evacuating_beside(self.me(), &self.seen(), Instant::now()),
            });
        }
        // The next renewal (not before a failed one may be tried again), and the moment to stop counting on it.
        let now = Instant::now();
        let renew_at = (held.renewed + self.settings.renew_every()).max(self.retry_at.unwrap_or(now));
        let next = if now < unsure_at {
            renew_at.min(unsure_at)
        } else {
            renew_at
        };
        Some(next.max(now))
    }

    /// Renews the slot held; a conflict reads it again: still ours only if
    /// it names us, else it is let go (and that told at once).
    async fn renew_slot(&mut self, index: u32, unsure_at: Instant) {
        let Some(lease) = self.held.as_ref().map(|held| held.lease.clone()) else {
            return;
        };
        self.retry_at = None;
        let sent = Instant::now();
        // Never waited on past the moment to stop counting on the slot.
        let limit = match unsure_at.checked_duration_since(sent) {
            Some(left) if !left.is_zero() => left.min(self.settings.request_timeout()),
            _ => self.settings.request_timeout(),
        };
        match self
            .request_within(limit, self.leases.renew(&lease, self.zone.as_deref()))
            .await
        {
            Ok(lease) => {
                self.held = Some(Held {
                    index,
                    lease: lease.clone(),
                    renewed: sent,
                });
                self.remember(lease, Instant::now());
            }
            Err(LeaseError::Conflict(_)) => match self.request(self.leases.get(&slot_name(index))).await {
                Ok(Some(current)) if holder_of(&current) == Some(self.me()) => {
                    if let Some(held) = &mut self.held {
                        held.lease = current;
                    }
                    self.retry_at = Some(Instant::now());
                }
                Ok(current) => {
                    warn!(slot = index, "another agent holds our evacuation slot now");
                    self.held = None;
                    // Told at once: the run stops; the queue decides what comes next.
                    self.publish(Standing::Waiting {
                        position: 0,
                        waiting: 0,
                    });
                    if let Some(current) = current {
                        self.remember(current, Instant::now());
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot read our evacuation slot; trying again");
                    self.retry_at = Some(Instant::now() + self.settings.retry());
                }
            },
            Err(e) => {
                warn!(error = %e, "cannot renew our evacuation slot; trying again");
                self.retry_at = Some(Instant::now() + self.settings.retry());
            }
        }
    }

    /// Renews a slot the Leases show as ours (a restarted agent's, or one it
    /// could not renew for a while): ours again only if the renewal goes through.
    async fn adopt(&mut self, index: u32) -> Option<Instant> {
        let lease = self.cache.get(&slot_name(index))?.lease.clone();
        let sent = Instant::now();
        match self.request(self.leases.renew(&lease, self.zone.as_deref())).await {
            Ok(lease) if !self.zones_still_allow(index).await => {
                // Ours from before, but another zone holds one now (a take that timed out yet landed).
                self.yield_to_another_zone(index, &lease).await
            }
            Ok(lease) => {
                info!(slot = index, "holding our evacuation slot again");
                self.held = Some(Held {
                    index,
                    lease: lease.clone(),
                    renewed: sent,
                });
                self.remember(lease, Instant::now());
                self.keep_holding(Instant::now()).await
            }
            Err(e) => {
                if !matches!(e, LeaseError::Conflict(_)) {
                    warn!(error = %e, "cannot renew our evacuation slot; trying again");
                }
                self.retry_at = Some(Instant::now() + self.settings.retry());
                self.retry_at
            }
        }
    }

    /// Lets a slot just taken go because the zone rule forbids it beside
    /// another zone's; tries again after a jitter, so two that backed off together do not meet again.
    async fn yield_to_another_zone(&mut self, index: u32, lease: &Lease) -> Option<Instant> {
        info!(slot = index, "another availability zone holds a slot: letting ours go");
        if let Err(e) = self.request(self.leases.release(lease)).await {
            warn!(error = %e, "cannot let the slot go; it expires by itself");
        }
        self.retry_at = Some(Instant::now() + jitter(self.settings.retry() * 2));
        self.retry_at
    }

    async fn take(&mut self, index: u32) -> Option<Instant> {
        let seen = self.cache.get(&slot_name(index)).map(|c| c.lease.clone());
        let sent = Instant::now();
        match self
            .request(self.leases.take(index, seen.as_ref(), self.zone.as_deref()))
            .await
        {
            Ok(lease) if !self.zones_still_allow(index).await => {
                // Another zone took a slot at the same moment: both may let go, and try again apart.
                self.yield_to_another_zone(index, &lease).await
            }
            Ok(lease) => {
                info!(slot = index, "took an evacuation slot");
                self.held = Some(Held {
                    index,
                    lease: lease.clone(),
                    renewed: sent,
                });
                self.remember(lease, Instant::now());
                self.drop_ticket().await;
                self.keep_holding(Instant::now()).await
            }
            Err(e) => {
                if !matches!(e, LeaseError::Conflict(_)) {
                    warn!(error = %e, "cannot take an evacuation slot; trying again");
                }
                // Taken by another first: the watch shows it, and the queue moves on.
                self.retry_at = Some(Instant::now() + self.settings.retry());
                self.retry_at
            }
        }
    }

    /// Puts our ticket in the queue, or renews it when due; when to look again.
    async fn keep_ticket(&mut self, since: Timestamp, now: Instant) -> Option<Instant> {
        let due = self
            .ticket
            .as_ref()
            .is_none_or(|(_, sent)| now >= *sent + self.settings.renew_every());
        if due {
            let seen = self.cache.get(&ticket_name(self.me())).map(|c| c.lease.clone());
            let sent = Instant::now();
            let written = match &self.ticket {
                Some((ours, _)) => self.request(self.leases.renew(ours, self.zone.as_deref())).await,
                None => {
                    self.request(self.leases.enqueue(seen.as_ref(), since, self.zone.as_deref()))
                        .await
                }
            };
            match written {
                Ok(lease) => {
                    self.ticket = Some((lease.clone(), sent));
                    self.remember(lease, Instant::now());
                }
                Err(e) => {
                    if !matches!(e, LeaseError::Conflict(_)) {
                        warn!(error = %e, "cannot keep our place in the evacuation queue; trying again");
                    }
                    self.ticket = None;
                    self.retry_at = Some(Instant::now() + self.settings.retry());
                    return self.retry_at;
                }
            }
        }
        // Look again when the ticket is due, or when a Lease seen now runs out (a slot may free).
        let ticket_due = self
            .ticket
            .as_ref()
            .map(|(_, sent)| *sent + self.settings.renew_every());
        let expiry = self
            .seen()
            .into_iter()
            .map(|lease| lease.live_until)
            .filter(|at| *at > Instant::now())
            .min();
        [ticket_due, expiry].into_iter().flatten().min()
    }

    async fn drop_ticket(&mut self) {
        self.ticket = None;
        if let Err(e) = self.request(self.leases.dequeue()).await {
            warn!(error = %e, "cannot take our ticket out of the evacuation queue; it expires by itself");
        }
    }

    /// Under a zone rule, whether the slots as they are now (read after
    /// ours was written, not as the watch last showed them) hold no other
    /// zone the rule forbids beside ours. Of two agents that took slots at the
    /// same moment, the later reader always sees the earlier writer, so at
    /// most one of them goes on. A holder counts unless the watch showed its
    /// Lease unrenewed for its whole duration.
    async fn zones_still_allow(&self, index: u32) -> bool {
        let rule = self.settings.limits.zones;
        if rule == ZoneRule::Any {
            return true;
        }
        let slots = match self.request(self.leases.slots()).await {
            Ok(slots) => slots,
            Err(e) => {
                warn!(error = %e, "cannot read the slots again; letting ours go");
                return false;
            }
        };
        let now = Instant::now();
        // Seen unrenewed for its whole duration, and read the same now: its holder is gone.
        let gone = |name: &str, lease: &Lease| {
            self.cache.get(name).is_some_and(|cached| {
                let duration = cached
                    .lease
                    .spec
                    .as_ref()
                    .and_then(|s| s.lease_duration_seconds)
                    .and_then(|s| u64::try_from(s).ok())
                    .map_or(self.settings.lease, Duration::from_secs);
                now >= cached.changed_at + duration && same_renewal(&cached.lease, lease)
            })
        };
        let others: Vec<Option<String>> = slots
            .iter()
            .filter(|lease| {
                let name = lease.metadata.name.clone().unwrap_or_default();
                name != slot_name(index)
                    && matches!(role_of(&name), Some(Role::Slot(i)) if i < self.settings.limits.slots)
                    && holder_of(lease).is_some_and(|holder| holder != self.me())
                    && !gone(&name, lease)
            })
            .map(|lease| annotation(lease, ZONE_ANNOTATION))
            .collect();
        let others: Vec<Option<&str>> = others.iter().map(Option::as_deref).collect();
        rule.allows(self.zone.as_deref(), &others)
    }

    /// Lets go of the slot and the ticket (the agent wants neither any more).
    async fn let_go(&mut self) {
        if let Some(held) = self.held.take() {
            match self.request(self.leases.release(&held.lease)).await {
                Ok(()) => info!(slot = held.index, "let our evacuation slot go"),
                Err(e) => warn!(error = %e, "cannot let our evacuation slot go; it expires by itself"),
            }
        }
        // Once after start-up too: a ticket an earlier agent of this node left would keep a place.
        let maybe_left = std::mem::take(&mut self.ticket_maybe_left);
        if (self.ticket.take().is_some() || maybe_left || self.cache.contains_key(&ticket_name(self.me())))
            && let Err(e) = self.request(self.leases.dequeue()).await
        {
            warn!(error = %e, "cannot take our ticket out of the evacuation queue; it expires by itself");
        }
        self.cache.clear();
        self.relist = None;
        self.listed = false;
        self.retry_at = None;
        self.publish(Standing::Idle);
    }

    /// A Lease request, failed when it takes longer than the settings allow.
    async fn request<T>(&self, request: impl Future<Output = Result<T, LeaseError>>) -> Result<T, LeaseError> {
        self.request_within(self.settings.request_timeout(), request).await
    }

    /// A Lease request, failed when it takes longer than `limit`.
    async fn request_within<T>(
        &self,
        limit: Duration,
        request: impl Future<Output = Result<T, LeaseError>>,
    ) -> Result<T, LeaseError> {
        match tokio::time::timeout(limit, request).await {
            Ok(result) => result,
            Err(_) => Err(LeaseError::TimedOut(limit)),
        }
    }
}

/// Whether two reads of a Lease show the same holder and renewal.
fn same_renewal(a: &Lease, b: &Lease) -> bool {
    let key = |l: &Lease| {
        l.spec
            .as_ref()
            .map(|s| (s.holder_identity.clone(), s.renew_time.clone()))
    };
    key(a) == key(b)
}

/// Up to `most`, different on each call, so that agents that backed off together do not meet again.
fn jitter(most: Duration) -> Duration {
    use std::hash::BuildHasher;
    let random = std::collections::hash_map::RandomState::new().hash_one(std::time::Instant::now());
    most.mul_f64((random % 1000) as f64 / 1000.0)
}

fn annotation(lease: &Lease, key: &str) -> Option<String> {
    lease.metadata.annotations.as_ref()?.get(key).cloned()
}

fn holder_of(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref()?.holder_identity.as_deref()
}
