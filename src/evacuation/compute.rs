//! The small slice of a compute cloud the engine needs, as a trait, so the
//! evacuation logic can be read and tested without a network.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;

use serde::Serialize;

/// Amounts per Placement resource class (`MEMORY_MB`, `VCPU`, `DISK_GB`,
/// `PCPU`, `VGPU`, `CUSTOM_*`, ...): what a VM holds or a host has free.
pub type Resources = BTreeMap<String, u64>;

/// The classes a flavor stands for, when Placement shows no allocation.
pub const MEMORY_MB: &str = "MEMORY_MB";
pub const VCPU: &str = "VCPU";
pub const DISK_GB: &str = "DISK_GB";

/// A nova-compute service as the engine sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComputeService {
    /// UUID (microversion 2.53+) or the legacy integer id, as text.
    pub id: String,
    pub host: String,
    pub enabled: bool,
    /// Whether the service heartbeat is current (`state: up`) and it is not forced down.
    pub up: bool,
    pub disabled_reason: Option<String>,
    /// Its availability zone, as Nova tells it.
    pub zone: Option<String>,
}

/// A server (VM) with the fields that decide how to move it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Server {
    pub id: String,
    pub name: String,
    pub project_id: String,
    /// Nova's `status`: ACTIVE, PAUSED, SHUTOFF, SUSPENDED, ERROR, VERIFY_RESIZE, ...
    pub status: String,
    /// `OS-EXT-STS:task_state`; `None` when no operation is running.
    pub task_state: Option<String>,
    /// `OS-EXT-SRV-ATTR:host`, the nova-compute service host.
    pub host: Option<String>,
    /// `OS-EXT-STS:power_state` is RUNNING: the guest runs, whatever `status` says.
    pub running: bool,
    /// Its Nova server tags (`nova-drain:stop` ...); `None` where the
    /// compute API is older than 2.26, which does not show them.
    pub tags: Option<Vec<String>>,
    pub flavor: Flavor,
}

/// The resources a server needs on its destination.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Flavor {
    pub ram_mb: u64,
    pub vcpus: u64,
    /// Root + ephemeral + swap disk, in GiB.
    pub disk_gb: u64,
}

impl Flavor {
    /// What Nova would ask Placement for with this flavor alone: the
    /// stand-in for a server Placement holds nothing for. Classes of zero
    /// are left out, as Nova leaves them out of its request.
    pub fn resources(&self) -> Resources {
        [(MEMORY_MB, self.ram_mb), (VCPU, self.vcpus), (DISK_GB, self.disk_gb)]
            .into_iter()
            .filter(|(_, amount)| *amount > 0)
            .map(|(class, amount)| (class.to_string(), amount))
            .collect()
    }
}

/// A migration record (in flight from `GET /servers/{id}/migrations`, or from history).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Migration {
    pub id: String,
    /// The migrated server (`instance_uuid`); in a host-wide listing it tells whose record this is.
    pub server_id: Option<String>,
    pub status: String,
    pub source_host: Option<String>,
    pub dest_host: Option<String>,
    /// `memory_remaining_bytes`; `None` (or a zero total) when the driver reports no progress.
    pub memory_remaining_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    /// Creation time, RFC 3339 without zone as Nova returns it (UTC).
    pub created_at: Option<String>,
}

impl Migration {
    /// Whether the record shows the migration over, one way or the other.
    pub fn ended(&self) -> bool {
        is_ended(&self.status)
    }
}

/// Whether a live migration status is terminal (`completed`, or a failure).
pub fn is_ended(status: &str) -> bool {
    matches!(status, "completed" | "error" | "failed" | "cancelled")
}

/// A point in time from which changed migration records are asked for
/// (Nova's `changes-since`). Each answer gives the next one, so the caller
/// needs no clock of Nova's: what the mark leaves out, only the cloud knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChangeMark(pub jiff::Timestamp);

/// The live migrations from one host whose records changed since a mark.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationChanges {
    /// Newest first.
    pub migrations: Vec<Migration>,
    /// Where the next look should start from.
    pub next: ChangeMark,
}

/// Free resources on one possible destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostCapacity {
    pub host: String,
    /// Free amount of each class the host holds itself (its compute node
    /// provider and that provider's children, such as a GPU's), as Placement
    /// computes it: (total - reserved) x allocation ratio - used.
    pub free: Resources,
    /// Classes the host does not hold itself but draws from a sharing
    /// provider of one of its aggregates (a Ceph pool's `DISK_GB`): class ->
    /// that provider's name, a key of [`Capacity::shared`].
    pub shared: BTreeMap<String, String>,
}

/// What the capacity check weighs: the destinations, the sharing providers
/// they draw on, and what the VMs hold on the drained host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capacity {
    pub hosts: Vec<HostCapacity>,
    /// Free amounts of each sharing provider some destination draws on, by
    /// name: one pool for all its hosts, so what one VM takes, no other gets.
    pub shared: BTreeMap<String, Resources>,
    /// What each consumer (a server's id) holds on the drained host's own
    /// providers: what it needs on its destination. What it holds on a
    /// sharing provider stays where it is and is not counted. A server
    /// missing here has no allocation Placement could show.
    pub allocations: BTreeMap<String, Resources>,
}

/// What a compute call failed with, in terms the engine can act on.
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    /// The request was refused because of the object's current state (HTTP 409, or
    /// a 400 for an action not allowed now); the state will be looked at again.
    #[error("{0}")]
    Conflict(String),
    /// Authentication failed or credentials lack the rights needed.
    #[error("{0}")]
    Auth(String),
    /// The cloud does not offer a call this step needs.
    #[error("{0}")]
    Unsupported(String),
    /// Anything else: network, server errors, malformed responses.
    #[error("{0}")]
    Other(String),
}

/// Result of a compute call.
pub type ComputeResult<T> = Result<T, ComputeError>;

/// The compute calls an evacuation is made of. Implemented by the Nova client
/// and by test doubles.
pub trait Compute: Send + Sync {
    /// The nova-compute service on exactly this host, if there is one.
    fn find_service(&self, host: &str) -> impl Future<Output = ComputeResult<Option<ComputeService>>> + Send;
    /// Every nova-compute service: one call gives the host's own service and the possible destinations.
    fn compute_services(&self) -> impl Future<Output = ComputeResult<Vec<ComputeService>>> + Send;
    /// Disables the service, recording `reason`.
    fn disable_service(
        &self,
        service: &ComputeService,
        reason: &str,
    ) -> impl Future<Output = ComputeResult<ComputeService>> + Send;
    /// Enables the service (clearing its reason).
    fn enable_service(&self, service: &ComputeService) -> impl Future<Output = ComputeResult<ComputeService>> + Send;
    /// Every server on the host, in every project, every page.
    fn servers_on_host(&self, host: &str) -> impl Future<Output = ComputeResult<Vec<Server>>> + Send;
    /// One server, `None` once it is deleted.
    fn server(&self, id: &str) -> impl Future<Output = ComputeResult<Option<Server>>> + Send;
    /// Asks for a live migration to `destination`, checked by the scheduler
    /// (compute API 2.30; `None`: the scheduler picks the host).
    fn live_migrate(
        &self,
        server_id: &str,
        destination: Option<&str>,
    ) -> impl Future<Output = ComputeResult<()>> + Send;
    /// Asks for a cold migration; the scheduler picks the destination.
    fn cold_migrate(&self, server_id: &str) -> impl Future<Output = ComputeResult<()>> + Send;
    /// Confirms a finished cold migration (`VERIFY_RESIZE`).
    fn confirm_resize(&self, server_id: &str) -> impl Future<Output = ComputeResult<()>> + Send;
    /// Live migrations of this server still in progress.
    fn in_progress_migrations(&self, server_id: &str) -> impl Future<Output = ComputeResult<Vec<Migration>>> + Send;
    /// Past and present migrations of this server of the given type
    /// (`live-migration` or `migration`), newest first.
    fn migration_history(
        &self,
        server_id: &str,
        migration_type: &str,
    ) -> impl Future<Output = ComputeResult<Vec<Migration>>> + Send;
    /// Servers cold-migrated off `host` that still wait for a confirmation.
    fn unconfirmed_migrations_from(&self, host: &str) -> impl Future<Output = ComputeResult<Vec<String>>> + Send;
    /// Whether the newest request on this server is a live migration that
    /// failed before any hypervisor took part (its instance action has no
    /// event beyond the conductor's scheduling and the pre-checks): the guest
    /// was never touched, whatever state Nova left the server in. `false`
    /// whenever that cannot be shown.
    fn failed_before_any_hypervisor(&self, server_id: &str) -> impl Future<Output = ComputeResult<bool>> + Send;
    /// Sets the server's state back to ACTIVE (`os-resetState`), for a VM
    /// that Nova put in ERROR although its guest was never touched.
    fn reset_to_active(&self, server_id: &str) -> impl Future<Output = ComputeResult<()>> + Send;
    /// Lets a running live migration finish now (pausing the VM if needed).
    fn force_complete(&self, server_id: &str, migration_id: &str) -> impl Future<Output = ComputeResult<()>> + Send;
    /// Cancels a live migration; the server stays on its source.
    fn abort_migration(&self, server_id: &str, migration_id: &str) -> impl Future<Output = ComputeResult<()>> + Send;
    /// Whether [`Compute::migrations_changed`] can be asked (compute API
    /// 2.59: `changes-since` on `GET /os-migrations`).
    fn lists_migration_changes(&self) -> bool;
    /// The migrations (live and cold) from `host` whose records changed
    /// since `since` (`None`: in the last few seconds): one look, usually one
    /// short page, for every migration in flight from the host. Records left
    /// unchanged are not listed (nor those never updated since they were
    /// created, nor those of deleted servers).
    fn migrations_changed(
        &self,
        host: &str,
        since: Option<ChangeMark>,
    ) -> impl Future<Output = ComputeResult<MigrationChanges>> + Send;
    /// The ids of the servers Nova places on `host` now, in one look however
    /// many there are (`GET /os-hypervisors/{id}?with_servers=true`, 2.53+,
    /// unpaged; below 2.53 the paged server listing). A live-migrated server
    /// leaves it the moment post-migration sets its host to the destination,
    /// a cold-migrated one when it waits in VERIFY_RESIZE on the destination.
    fn servers_still_on(&self, host: &str) -> impl Future<Output = ComputeResult<HashSet<String>>> + Send;
    /// Free resources on each of these compute hosts, and what the servers
    /// of `source` hold there.
    fn spare_capacity(&self, source: &str, hosts: &[String]) -> impl Future<Output = ComputeResult<Capacity>> + Send;
    /// Whether a live migration Nova holds queued (or preparing) can be
    /// aborted (compute API 2.65): only then may migrations be handed to Nova
    /// ahead of a free slot.
    fn aborts_queued_migrations(&self) -> bool;
    /// Whether servers show their tags and tags can be set (compute API 2.26).
    fn reads_server_tags(&self) -> bool;
    /// Adds a tag to a server (`PUT /servers/{id}/tags/{tag}`, 2.26).
    fn add_tag(&self, server_id: &str, tag: &str) -> impl Future<Output = ComputeResult<()>> + Send;
    /// Removes a tag from a server; one already gone is no error.
    fn remove_tag(&self, server_id: &str, tag: &str) -> impl Future<Output = ComputeResult<()>> + Send;
    /// Asks Nova to stop (power off) an ACTIVE server (`os-stop`).
    fn stop_server(&self, server_id: &str) -> impl Future<Output = ComputeResult<()>> + Send;
    /// Asks Nova to start a SHUTOFF server (`os-start`).
    fn start_server(&self, server_id: &str) -> impl Future<Output = ComputeResult<()>> + Send;
    /// The name of the project with this id (from Keystone), for the report.
    fn project_name(&self, project_id: &str) -> impl Future<Output = ComputeResult<String>> + Send;
}
