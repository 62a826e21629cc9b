//! The Lease objects (`coordination.k8s.io/v1`, in the agents' namespace)
//! through which agents share the cluster's evacuation slots, with no
//! component of their own to deploy.
//!
//! - `nova-drain-slot-<i>`, `i` below the cluster's limit: held by the agent
//!   (its node's name in `holderIdentity`) whose hypervisor is being
//!   evacuated, renewed while it runs, released when it ends.
//! - `nova-drain-queue-<node>`: a node waiting for a slot; `acquireTime` is
//!   when it started waiting (the queue is first come, first served by it),
//!   renewed while it waits, so a node whose agent died leaves the queue
//!   when its ticket stops being renewed.
//!
//! Every write names the `resourceVersion` it was made from (a taker and a
//! renewer cannot both win). Whether a Lease is still held is judged by the
//! reader's own clock (how long since it last changed), never by comparing
//! its `renewTime` with our clock, as client-go's leader election does.

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{DeleteParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

/// Label on every coordination Lease: `slot` or `queue`; agents watch by it.
pub const ROLE_LABEL: &str = "nova-kubernetes-drain/coordination";
/// Annotation on every coordination Lease: the Nova host of its agent's node
/// (an agent evacuating beside it counts what is still there as spoken for).
pub const NOVA_HOST_ANNOTATION: &str = "nova-kubernetes-drain/nova-host";
/// Annotation on every coordination Lease: the availability zone of that
/// host, where Nova tells it (for a rule on the zones evacuating at once).
pub const ZONE_ANNOTATION: &str = "nova-kubernetes-drain/zone";
const SLOT_PREFIX: &str = "nova-drain-slot-";
const TICKET_PREFIX: &str = "nova-drain-queue-";

/// What a coordination Lease stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// One of the slots: whoever holds it may evacuate.
    Slot(u32),
    /// A node waiting for a slot.
    Ticket,
}

/// The name of slot `index`.
pub fn slot_name(index: u32) -> String {
    format!("{SLOT_PREFIX}{index}")
}

/// Longest object name the API server takes.
const NAME_MAX: usize = 253;

/// The name of the ticket of the agent of `node`; a node name too long for
/// it is cut, with a hash of the whole name, so it stays the node's own.
pub fn ticket_name(node: &str) -> String {
    node_lease_name(TICKET_PREFIX, node)
}

/// `prefix` and the node's name, cut with a hash of the whole name where
/// too long, so that it stays the node's own.
pub fn node_lease_name(prefix: &str, node: &str) -> String {
    let name = format!("{prefix}{node}");
    if name.len() <= NAME_MAX {
        return name;
    }
    // FNV-1a: the same on every agent and every release, unlike std's hasher.
    let hash = node.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let kept: String = node.chars().take(NAME_MAX - prefix.len() - 17).collect();
    format!("{prefix}{}-{hash:016x}", kept.trim_end_matches(['-', '.']))
}

/// What a Lease of ours stands for, by its name; `None` for anything else.
pub fn role_of(name: &str) -> Option<Role> {
    if let Some(index) = name.strip_prefix(SLOT_PREFIX) {
        // Only the plain decimal form we write: `nova-drain-slot-01` is not a slot.
        return index
            .parse()
            .ok()
            .filter(|i: &u32| i.to_string() == index)
            .map(Role::Slot);
    }
    name.starts_with(TICKET_PREFIX).then_some(Role::Ticket)
}

/// Why a Lease write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Someone else wrote it since it was read (or created it first).
    #[error("lease {0} was changed by another agent")]
    Conflict(String),
    #[error("no answer about a lease within {} s", .0.as_secs_f64())]
    TimedOut(std::time::Duration),
    #[error("lease {name}: {source}")]
    Api {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// The coordination Leases as one agent writes them.
#[derive(Clone)]
pub struct CoordinationLeases {
    api: Api<Lease>,
    /// The agent's node: `holderIdentity` of what it holds, and its ticket's name.
    holder: String,
    /// Its Nova host, told in [`NOVA_HOST_ANNOTATION`].
    nova_host: String,
    duration_seconds: i32,
}

impl CoordinationLeases {
    pub fn new(
        client: Client,
        namespace: &str,
        holder: &str,
        nova_host: &str,
        duration: std::time::Duration,
    ) -> CoordinationLeases {
        CoordinationLeases {
            api: Api::namespaced(client, namespace),
            holder: holder.to_string(),
            nova_host: nova_host.to_string(),
            duration_seconds: i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX),
        }
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Every coordination Lease (label [`ROLE_LABEL`]), listed then watched,
    /// re-listed after a dropped watch, with backoff.
    pub fn watch(&self) -> impl futures::Stream<Item = Result<watcher::Event<Lease>, watcher::Error>> + Send + use<> {
        watcher(self.api.clone(), watcher::Config::default().labels(ROLE_LABEL)).default_backoff()
    }

    /// Takes slot `index`, free or expired as `seen` (the Lease as last read;
    /// `None`: it does not exist yet).
    pub async fn take(&self, index: u32, seen: Option<&Lease>, zone: Option<&str>) -> Result<Lease, LeaseError> {
        let now = MicroTime(Timestamp::now());
        let transitions = seen
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.lease_transitions)
            .unwrap_or(0);
        let spec = LeaseSpec {
            holder_identity: Some(self.holder.clone()),
            lease_duration_seconds: Some(self.duration_seconds),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(if seen.is_some() {
                transitions.saturating_add(1)
            } else {
                0
            }),
            ..LeaseSpec::default()
        };
        self.write(&slot_name(index), "slot", seen, spec, zone).await
    }

    /// Renews a Lease this agent holds (a slot) or owns (its ticket).
    pub async fn renew(&self, held: &Lease, zone: Option<&str>) -> Result<Lease, LeaseError> {
        let name = held.metadata.name.clone().unwrap_or_default();
        let spec = LeaseSpec {
            renew_time: Some(MicroTime(Timestamp::now())),
            lease_duration_seconds: Some(self.duration_seconds),
            ..held.spec.clone().unwrap_or_default()
        };
        let role = if matches!(role_of(&name), Some(Role::Ticket)) {
            "queue"
        } else {
            "slot"
        };
        self.write(&name, role, Some(held), spec, zone).await
    }

    /// Lets a slot go at once (no holder), so the next in the queue need not wait for it to expire.
    pub async fn release(&self, held: &Lease) -> Result<(), LeaseError> {
        let name = held.metadata.name.clone().unwrap_or_default();
        let spec = LeaseSpec {
            holder_identity: None,
            renew_time: None,
            acquire_time: None,
            ..held.spec.clone().unwrap_or_default()
        };
        self.write(&name, "slot", Some(held), spec, None).await.map(drop)
    }

    /// Puts this agent in the queue, waiting since `queued_at` (`seen`: its ticket as last read).
    pub async fn enqueue(
        &self,
        seen: Option<&Lease>,
        queued_at: Timestamp,
        zone: Option<&str>,
    ) -> Result<Lease, LeaseError> {
        let spec = LeaseSpec {
            holder_identity: Some(self.holder.clone()),
            lease_duration_seconds: Some(self.duration_seconds),
            acquire_time: Some(MicroTime(queued_at)),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..LeaseSpec::default()
        };
        self.write(&ticket_name(&self.holder), "queue", seen, spec, zone).await
    }

    /// Takes this agent out of the queue.
    pub async fn dequeue(&self) -> Result<(), LeaseError> {
        let name = ticket_name(&self.holder);
        match self.api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(source) => Err(LeaseError::Api { name, source }),
        }
    }

    /// The slots as they are now (not as a watch last showed them).
    pub async fn slots(&self) -> Result<Vec<Lease>, LeaseError> {
        let selector = format!("{ROLE_LABEL}=slot");
        self.api
            .list(&kube::api::ListParams::default().labels(&selector))
            .await
            .map(|list| list.items)
            .map_err(|source| LeaseError::Api {
                name: "(slots)".to_string(),
                source,
            })
    }

    /// Lease `name` as it is now.
    pub async fn get(&self, name: &str) -> Result<Option<Lease>, LeaseError> {
        self.api.get_opt(name).await.map_err(|source| LeaseError::Api {
            name: name.to_string(),
            source,
        })
    }

    /// Creates Lease `name` (`seen` is `None`) or replaces it, as of the
    /// resourceVersion it was seen at.
    async fn write(
        &self,
        name: &str,
        role: &str,
        seen: Option<&Lease>,
        spec: LeaseSpec,
        zone: Option<&str>,
    ) -> Result<Lease, LeaseError> {
        let mut annotations =
            std::collections::BTreeMap::from([(NOVA_HOST_ANNOTATION.to_string(), self.nova_host.clone())]);
        if let Some(zone) = zone {
            annotations.insert(ZONE_ANNOTATION.to_string(), zone.to_string());
        }
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                labels: Some([(ROLE_LABEL.to_string(), role.to_string())].into()),
                annotations: Some(annotations),
                resource_version: seen.and_then(|l| l.metadata.resource_version.clone()),
                // A precondition: a Lease deleted meanwhile is not made anew by the replace.
                uid: seen.and_then(|l| l.metadata.uid.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(spec),
        };
        let written = match seen {
            None => self.api.create(&PostParams::default(), &lease).await,
            Some(_) => self.api.replace(name, &PostParams::default(), &lease).await,
        };
        match written {
            Ok(lease) => Ok(lease),
            // 409: changed since it was read, or created meanwhile; 404: deleted meanwhile.
            Err(kube::Error::Api(status)) if status.code == 409 || (seen.is_some() && status.code == 404) => {
                Err(LeaseError::Conflict(name.to_string()))
            }
            Err(source) => Err(LeaseError::Api {
                name: name.to_string(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_say_what_a_lease_stands_for() {
        assert_eq!(role_of(&slot_name(3)), Some(Role::Slot(3)));
        assert_eq!(role_of("nova-drain-slot-03"), None);
        assert_eq!(role_of(&ticket_name("node-a")), Some(Role::Ticket));
        assert_eq!(role_of("kube-node-lease"), None);
    }

    #[test]
    fn a_ticket_of_a_node_with_a_long_name_is_a_valid_name_of_its_own() {
        let long = |last: char| format!("{}{last}", "a".repeat(250));
        let (one, other) = (ticket_name(&long('b')), ticket_name(&long('c')));
        assert!(one.len() <= 253 && other.len() <= 253);
        assert_ne!(one, other);
        assert_eq!(one, ticket_name(&long('b')), "the same on every agent");
    }
}
