//! Nova and Placement JSON as sent on the wire, and its conversion to the engine's types.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use url::Url;

use crate::evacuation::{ComputeService, Flavor as Resources, Migration as EngineMigration, Server as EngineServer};

#[derive(Deserialize)]
pub struct Link {
    pub rel: String,
    #[serde(default)]
    pub href: String,
}

/// One page of a paged Nova list: its items and its links.
pub trait Paged: DeserializeOwned {
    type Item;
    fn into_page(self) -> (Vec<Self::Item>, Vec<Link>);
}

/// The marker of the next page, read from the page's own `next` link, or `None` on the last page.
///
/// Nova writes there the identifier it wants back (a server's UUID, a hypervisor's
/// id or a migration's UUID, depending on the list and the microversion), so the
/// client never turns an id into text itself: a hypervisor id once sent with its
/// JSON quotes made Nova refuse the second page of every hypervisor list.
pub fn next_marker(links: &[Link]) -> Result<Option<String>, String> {
    let Some(next) = links.iter().find(|l| l.rel == "next") else {
        return Ok(None);
    };
    let url = Url::parse(&next.href).map_err(|e| format!("next-page link {:?} is not a URL: {e}", next.href))?;
    url.query_pairs()
        .find(|(key, _)| key == "marker")
        .map(|(_, marker)| Some(marker.into_owned()))
        .ok_or_else(|| format!("next-page link {} has no marker", next.href))
}

/// A service or hypervisor id is a UUID from 2.53 and an integer before.
pub fn id_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[derive(Deserialize)]
pub struct ServicesRoot {
    pub services: Vec<Service>,
}

#[derive(Deserialize)]
pub struct ServiceRoot {
    pub service: Service,
}

#[derive(Deserialize)]
pub struct Service {
    pub id: Value,
    pub host: String,
    pub status: String,
    pub state: String,
    #[serde(default)]
    pub disabled_reason: Option<String>,
    #[serde(default)]
    pub forced_down: bool,
    #[serde(default)]
    pub zone: Option<String>,
}

impl Service {
    pub fn into_service(self) -> ComputeService {
        ComputeService {
            id: id_text(&self.id),
            enabled: self.status == "enabled",
            up: self.state == "up" && !self.forced_down,
            host: self.host,
            disabled_reason: self.disabled_reason,
            zone: self.zone,
        }
    }
}

#[derive(Deserialize)]
pub struct ServersRoot {
    pub servers: Vec<Server>,
    #[serde(default)]
    pub servers_links: Vec<Link>,
}

impl Paged for ServersRoot {
    type Item = Server;
    fn into_page(self) -> (Vec<Server>, Vec<Link>) {
        (self.servers, self.servers_links)
    }
}

/// `GET /servers` (no detail): ids and names only.
#[derive(Deserialize)]
pub struct ServerIdsRoot {
    pub servers: Vec<ServerId>,
    #[serde(default)]
    pub servers_links: Vec<Link>,
}

#[derive(Deserialize)]
pub struct ServerId {
    pub id: String,
}

impl Paged for ServerIdsRoot {
    type Item = ServerId;
    fn into_page(self) -> (Vec<ServerId>, Vec<Link>) {
        (self.servers, self.servers_links)
    }
}

#[derive(Deserialize)]
pub struct ServerRoot {
    pub server: Server,
}

/// `OS-EXT-STS:power_state` of a running guest.
const POWER_STATE_RUNNING: u8 = 1;

#[derive(Deserialize)]
pub struct Server {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub tenant_id: String,
    pub status: String,
    #[serde(rename = "OS-EXT-STS:task_state", default)]
    pub task_state: Option<String>,
    #[serde(rename = "OS-EXT-SRV-ATTR:host", default)]
    pub host: Option<Value>,
    /// 1 is RUNNING (nova.compute.power_state).
    #[serde(rename = "OS-EXT-STS:power_state", default)]
    pub power_state: Option<u8>,
    /// From compute API 2.26.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    pub flavor: ServerFlavor,
}

impl Server {
    /// `None` when the host attribute is missing altogether: the caller is not an admin.
    pub fn into_server(self, flavor: Resources) -> Option<EngineServer> {
        let host = match self.host? {
            Value::String(host) => Some(host),
            _ => None,
        };
        Some(EngineServer {
            id: self.id,
            name: self.name,
            project_id: self.tenant_id,
            status: self.status,
            task_state: self.task_state,
            host,
            running: self.power_state == Some(POWER_STATE_RUNNING),
            tags: self.tags,
            flavor,
        })
    }
}

/// Before 2.47 a link to the flavor (`id`), from 2.47 its resources inline.
#[derive(Deserialize)]
pub struct ServerFlavor {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub ram: Option<u64>,
    #[serde(default)]
    pub vcpus: Option<u64>,
    #[serde(default)]
    pub disk: Option<u64>,
    #[serde(default)]
    pub ephemeral: Option<u64>,
    #[serde(default)]
    pub swap: Option<Value>,
}

impl ServerFlavor {
    pub fn embedded(&self) -> Option<Resources> {
        Some(Resources {
            ram_mb: self.ram?,
            vcpus: self.vcpus.unwrap_or(0),
            disk_gb: disk_gb(self.disk, self.ephemeral, self.swap.as_ref()),
        })
    }
}

/// Root + ephemeral + swap (swap is in MiB, and `""` when none).
fn disk_gb(disk: Option<u64>, ephemeral: Option<u64>, swap: Option<&Value>) -> u64 {
    let swap_mb = swap.and_then(Value::as_u64).unwrap_or(0);
    disk.unwrap_or(0) + ephemeral.unwrap_or(0) + swap_mb.div_ceil(1024)
}

#[derive(Deserialize)]
pub struct FlavorRoot {
    pub flavor: FlavorDetail,
}

#[derive(Deserialize)]
pub struct FlavorDetail {
    pub ram: u64,
    pub vcpus: u64,
    #[serde(default)]
    pub disk: u64,
    #[serde(rename = "OS-FLV-EXT-DATA:ephemeral", default)]
    pub ephemeral: u64,
    #[serde(default)]
    pub swap: Option<Value>,
}

impl FlavorDetail {
    pub fn resources(&self) -> Resources {
        Resources {
            ram_mb: self.ram,
            vcpus: self.vcpus,
            disk_gb: disk_gb(Some(self.disk), Some(self.ephemeral), self.swap.as_ref()),
        }
    }
}

/// `GET /servers/{id}/os-instance-actions`, newest first.
#[derive(Deserialize)]
pub struct InstanceActionsRoot {
    #[serde(rename = "instanceActions")]
    pub instance_actions: Vec<InstanceAction>,
}

/// `GET /servers/{id}/os-instance-actions/{request_id}`.
#[derive(Deserialize)]
pub struct InstanceActionRoot {
    #[serde(rename = "instanceAction")]
    pub instance_action: InstanceAction,
}

/// One request made on a server (`live-migration`, `resetState`, ...) and,
/// in the single-action view, the steps Nova's services took for it.
#[derive(Deserialize)]
pub struct InstanceAction {
    pub action: String,
    pub request_id: String,
    #[serde(default)]
    pub events: Vec<InstanceActionEvent>,
}

#[derive(Deserialize)]
pub struct InstanceActionEvent {
    /// The service prefix and method: `conductor_live_migrate_instance`, `compute_live_migration`, ...
    pub event: String,
}

impl InstanceAction {
    /// A live migration whose every step ran in the conductor or was a
    /// pre-check: no hypervisor began to move (or roll back) the guest.
    pub fn live_migration_stopped_before_hypervisors(&self) -> bool {
        const BEFORE_ANY_HYPERVISOR: [&str; 3] = [
            "conductor_live_migrate_instance",
            "compute_check_can_live_migrate_destination",
            "compute_check_can_live_migrate_source",
        ];
        self.action == "live-migration"
            && self
                .events
                .iter()
                .all(|e| BEFORE_ANY_HYPERVISOR.contains(&e.event.as_str()))
    }
}

#[derive(Deserialize)]
pub struct MigrationsRoot {
    pub migrations: Vec<Migration>,
    /// Present from 2.59, when `GET /os-migrations` is paged.
    #[serde(default)]
    pub migrations_links: Vec<Link>,
}

impl Paged for MigrationsRoot {
    type Item = Migration;
    fn into_page(self) -> (Vec<Migration>, Vec<Link>) {
        (self.migrations, self.migrations_links)
    }
}

#[derive(Deserialize)]
pub struct Migration {
    pub id: Value,
    pub status: String,
    #[serde(default)]
    pub instance_uuid: Option<String>,
    #[serde(default)]
    pub migration_type: Option<String>,
    #[serde(default)]
    pub source_compute: Option<String>,
    #[serde(default)]
    pub dest_compute: Option<String>,
    #[serde(default)]
    pub memory_total_bytes: Option<u64>,
    #[serde(default)]
    pub memory_remaining_bytes: Option<u64>,
    #[serde(default)]
    pub created_at: Option<String>,
}

impl Migration {
    pub fn into_migration(self) -> EngineMigration {
        EngineMigration {
            id: id_text(&self.id),
            server_id: self.instance_uuid,
            status: self.status,
            source_host: self.source_compute,
            dest_host: self.dest_compute,
            memory_remaining_bytes: self.memory_remaining_bytes,
            memory_total_bytes: self.memory_total_bytes,
            created_at: self.created_at,
        }
    }
}

#[derive(Deserialize)]
pub struct HypervisorsRoot {
    pub hypervisors: Vec<Hypervisor>,
    #[serde(default)]
    pub hypervisors_links: Vec<Link>,
}

impl Paged for HypervisorsRoot {
    type Item = Hypervisor;
    fn into_page(self) -> (Vec<Hypervisor>, Vec<Link>) {
        (self.hypervisors, self.hypervisors_links)
    }
}

#[derive(Deserialize)]
pub struct Hypervisor {
    /// A UUID from 2.53 (the legacy integer before it), kept as Nova wrote it.
    #[serde(default)]
    pub id: Value,
    pub hypervisor_hostname: String,
    #[serde(default)]
    pub service: Option<HypervisorService>,
}

#[derive(Deserialize)]
pub struct HypervisorService {
    pub host: String,
}

/// `GET /os-hypervisors/{id}?with_servers=true` (2.53+).
#[derive(Deserialize)]
pub struct HypervisorServersRoot {
    pub hypervisor: HypervisorServers,
}

#[derive(Deserialize)]
pub struct HypervisorServers {
    /// Absent (before 2.75) or empty when no server is on the hypervisor.
    #[serde(default)]
    pub servers: Option<Vec<HypervisorServer>>,
}

#[derive(Deserialize)]
pub struct HypervisorServer {
    pub uuid: String,
}

/// Keystone's `GET /v3/projects/{id}`.
#[derive(Deserialize)]
pub struct ProjectRoot {
    pub project: Project,
}

#[derive(Deserialize)]
pub struct Project {
    pub name: String,
}

#[derive(Deserialize)]
pub struct ResourceProvidersRoot {
    pub resource_providers: Vec<ResourceProvider>,
}

#[derive(Deserialize)]
pub struct ResourceProvider {
    pub uuid: String,
    pub name: String,
    /// The root of the provider's tree (Placement 1.14): a compute node's
    /// children (a GPU's `VGPU`, a NIC's bandwidth) share its root.
    #[serde(default)]
    pub root_provider_uuid: Option<String>,
}

impl ResourceProvider {
    /// The provider's tree: its root's uuid, itself when it has no parent.
    pub fn root(&self) -> &str {
        self.root_provider_uuid.as_deref().unwrap_or(&self.uuid)
    }
}

/// `GET /resource_providers/{uuid}/aggregates`.
#[derive(Deserialize)]
pub struct AggregatesRoot {
    pub aggregates: Vec<String>,
}

/// `GET /resource_providers/{uuid}/allocations`: every consumer's allocation against one provider.
#[derive(Deserialize)]
pub struct ProviderAllocationsRoot {
    pub allocations: BTreeMap<String, ConsumerResources>,
}

#[derive(Deserialize)]
pub struct ConsumerResources {
    pub resources: BTreeMap<String, u64>,
}

#[derive(Deserialize)]
pub struct InventoriesRoot {
    pub inventories: BTreeMap<String, Inventory>,
}

#[derive(Deserialize)]
pub struct Inventory {
    pub total: u64,
    #[serde(default)]
    pub reserved: u64,
    #[serde(default = "one")]
    pub allocation_ratio: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Deserialize)]
pub struct UsagesRoot {
    pub usages: BTreeMap<String, u64>,
}

/// Free amount of each class the provider has an inventory of, as Placement
/// computes it: (total - reserved) x ratio - used. A class without inventory
/// is left out rather than taken as zero: it may be found on a sharing provider.
pub fn free(inventories: &InventoriesRoot, usages: &UsagesRoot) -> BTreeMap<String, u64> {
    inventories
        .inventories
        .iter()
        .map(|(class, inventory)| {
            let capacity =
                (inventory.total.saturating_sub(inventory.reserved) as f64 * inventory.allocation_ratio) as u64;
            let used = usages.usages.get(class).copied().unwrap_or(0);
            (class.clone(), capacity.saturating_sub(used))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_from_microversion_2_93() {
        let json = r#"{"id":"a","name":"vm","tenant_id":"p","status":"ACTIVE","OS-EXT-STS:task_state":null,
            "OS-EXT-STS:power_state":1,"OS-EXT-SRV-ATTR:host":"host1","flavor":{"original_name":"m1.small","ram":512,"vcpus":1,"disk":1,
            "ephemeral":0,"swap":0,"extra_specs":{}}}"#;
        let server: Server = serde_json::from_str(json).unwrap();
        let flavor = server.flavor.embedded().unwrap();
        assert_eq!(flavor.ram_mb, 512);
        let server = server.into_server(flavor).unwrap();
        assert_eq!(server.host.as_deref(), Some("host1"));
        assert_eq!(server.task_state, None);
        assert!(server.running);
    }

    #[test]
    fn non_admins_do_not_see_the_host() {
        let json = r#"{"id":"a","status":"ACTIVE","flavor":{"id":"1"}}"#;
        let server: Server = serde_json::from_str(json).unwrap();
        assert!(server.flavor.embedded().is_none());
        assert!(server.into_server(Resources::default()).is_none());
    }

    #[test]
    fn placement_free_capacity() {
        let inventories: InventoriesRoot = serde_json::from_str(
            r#"{"inventories":{"MEMORY_MB":{"total":8192,"reserved":512,"allocation_ratio":1.5},
                "VCPU":{"total":4,"reserved":0,"allocation_ratio":16.0}}}"#,
        )
        .unwrap();
        let usages: UsagesRoot = serde_json::from_str(r#"{"usages":{"MEMORY_MB":1024,"VCPU":3}}"#).unwrap();
        let free = free(&inventories, &usages);
        assert_eq!(free.get("MEMORY_MB"), Some(&(11520 - 1024)));
        assert_eq!(free.get("VCPU"), Some(&61));
        assert_eq!(free.get("DISK_GB"), None, "no inventory: not zero, absent");
    }

    #[test]
    fn next_marker_is_taken_verbatim_from_the_next_link() {
        // Shapes Nova Zed sends with `max_limit = 2` (hypervisor ids are UUIDs from 2.53).
        let page: HypervisorsRoot = serde_json::from_str(
            r#"{"hypervisors":[{"id":"5d3c6b5e-0f0e-4a43-9f57-0d9d1d2c3b4a","hypervisor_hostname":"host2"}],
                "hypervisors_links":[{"rel":"next","href":"http://127.0.0.1:8774/v2.1/os-hypervisors/detail?limit=2&marker=5d3c6b5e-0f0e-4a43-9f57-0d9d1d2c3b4a"}]}"#,
        )
        .unwrap();
        let (_, links) = page.into_page();
        assert_eq!(
            next_marker(&links).unwrap().as_deref(),
            Some("5d3c6b5e-0f0e-4a43-9f57-0d9d1d2c3b4a")
        );
        let integer_ids: HypervisorsRoot = serde_json::from_str(
            r#"{"hypervisors":[],"hypervisors_links":[{"rel":"next","href":"http://nova/v2.1/os-hypervisors/detail?marker=7"}]}"#,
        )
        .unwrap();
        assert_eq!(next_marker(&integer_ids.into_page().1).unwrap().as_deref(), Some("7"));
        let last: MigrationsRoot = serde_json::from_str(r#"{"migrations":[]}"#).unwrap();
        assert_eq!(next_marker(&last.into_page().1).unwrap(), None);
    }

    #[test]
    fn a_next_link_without_a_marker_is_an_error_not_the_last_page() {
        let links = vec![Link {
            rel: "next".into(),
            href: "http://nova/v2.1/servers/detail?limit=2".into(),
        }];
        assert!(next_marker(&links).unwrap_err().contains("no marker"));
    }

    #[test]
    fn swap_counts_toward_disk() {
        assert_eq!(disk_gb(Some(10), Some(5), Some(&Value::from(1536))), 17);
        assert_eq!(disk_gb(Some(1), None, Some(&Value::from(""))), 1);
    }

    /// Shapes as Nova 2.93 returns them; event names from nova.compute.manager's `wrap_instance_event`.
    #[test]
    fn live_migration_that_never_reached_a_hypervisor() {
        let action = |events: &str| -> InstanceAction {
            let json = format!(
                r#"{{"instanceAction":{{"action":"live-migration","request_id":"req-1","message":"Error",
                "events":[{events}]}}}}"#
            );
            serde_json::from_str::<InstanceActionRoot>(&json)
                .unwrap()
                .instance_action
        };
        let event = |name: &str| format!(r#"{{"event":"{name}","result":"Error","host":"h","details":null}}"#);
        let conductor = event("conductor_live_migrate_instance");
        assert!(action(&conductor).live_migration_stopped_before_hypervisors());
        let checked = format!("{conductor},{}", event("compute_check_can_live_migrate_destination"));
        assert!(action(&checked).live_migration_stopped_before_hypervisors());
        let started = format!("{conductor},{}", event("compute_live_migration"));
        assert!(!action(&started).live_migration_stopped_before_hypervisors());
        let list = r#"{"instanceActions":[{"action":"resetState","request_id":"req-2"},
            {"action":"live-migration","request_id":"req-1"}],"links":[]}"#;
        let newest = serde_json::from_str::<InstanceActionsRoot>(list)
            .unwrap()
            .instance_actions
            .remove(0);
        assert!(!newest.live_migration_stopped_before_hypervisors());
    }
}
