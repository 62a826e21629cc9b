//! The small slice of a compute cloud the engine needs, as a trait, so the
//! evacuation logic can be read and tested without a network.

use std::future::Future;

use serde::Serialize;

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
    pub free_ram_mb: u64,
    pub free_vcpus: u64,
    pub free_disk_gb: u64,
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
    /// Asks for a live migration; the scheduler picks the destination.
    fn live_migrate(&self, server_id: &str) -> impl Future<Output = ComputeResult<()>> + Send;
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
    /// Whether [`Compute::live_migrations_changed`] can be asked (compute API
    /// 2.59: `changes-since` on `GET /os-migrations`).
    fn lists_migration_changes(&self) -> bool;
    /// The live migrations from `host` whose records changed since `since`
    /// (`None`: in the last few seconds): one look, usually one short page,
    /// for every migration in flight from the host. Records left unchanged
    /// are not listed (nor those never updated since they were created, nor
    /// those of deleted servers).
    fn live_migrations_changed(
        &self,
        host: &str,
        since: Option<ChangeMark>,
    ) -> impl Future<Output = ComputeResult<MigrationChanges>> + Send;
    /// Free resources on each of these compute hosts.
    fn spare_capacity(&self, hosts: &[String]) -> impl Future<Output = ComputeResult<Vec<HostCapacity>>> + Send;
    /// Whether a live migration Nova holds queued (or preparing) can be
    /// aborted (compute API 2.65): only then may migrations be handed to Nova
    /// ahead of a free slot.
    fn aborts_queued_migrations(&self) -> bool;
    /// The name of the project with this id (from Keystone), for the report.
    fn project_name(&self, project_id: &str) -> impl Future<Output = ComputeResult<String>> + Send;
}
