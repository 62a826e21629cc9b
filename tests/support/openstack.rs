//! Test driver for the loopback OpenStack lab of `tests/lab/` (Keystone, Nova
//! with N fake hypervisors `host1..hostN`, Glance, ...; start it with
//! `tests/lab/up.sh`).
//!
//! [`Lab`] talks to the lab's REST APIs as user `admin` (password `admin`),
//! with one token per project (`admin`, `demo`), refreshed when close to
//! expiry. Every call panics with the method, URL, HTTP status and body on
//! failure: this is test code, a failed call is a failed test.
//!
//! Lab facts the helpers rely on (see `tests/lab/README.md`):
//! * Keystone `http://127.0.0.1:5000/v3` (override: env `OS_AUTH_URL`),
//!   domain `Default`, projects `admin` and `demo` (admin has role admin in
//!   both), Nova/Glance endpoints come from the token's catalog.
//! * Flavors `m1.tiny` (64 MB), `m1.small` (512 MB), `m1.large` (4096 MB),
//!   image `tiny`, servers boot with `networks: none`.
//! * Nova `[api] max_limit` is small (default 5), so lists are paged: the
//!   helpers here follow `*_links` `rel=next`.
//! * Compute driver `DrainLabDriver`: a live migration takes
//!   `1 s + 2 s/GiB` of flavor RAM; metadata `drainlab:stall=true` makes it
//!   never converge until aborted/force-completed, `drainlab:fail=true` makes
//!   it fail (migration `failed`, VM stays ACTIVE on the source).
//!   [`META_STALL`] and [`META_FAIL`] are the metadata keys.
//!
//! Typical use:
//! ```ignore
//! mod support;
//! use support::openstack::{BootSpec, Lab};
//!
//! #[tokio::test]
//! async fn drains_host1() {
//!     let _g = Lab::exclusive().await;
//!     let lab = Lab::connect().await;
//!     lab.reset().await;
//!     let ids = lab.boot(BootSpec::new("t").count(2).host("host1")).await;
//!     // ... run the drainer with lab.drainer_config() ...
//!     assert!(lab.servers_on("host1").await.is_empty());
//! }
//! ```
//! Tests sharing the lab must not run concurrently (`reset()` deletes every
//! server): start each test with `let _g = Lab::exclusive().await;`, which
//! also waits for other processes using the lab (smoke.sh, demo.sh, ...).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Nova microversion used for every compute call.
pub const MICROVERSION: &str = "2.93";
/// Placement microversion used for every Placement call: 1.28 writes
/// allocations with their consumer generation, project and user.
pub const PLACEMENT_MICROVERSION: &str = "1.28";
/// Lab admin credentials (also written into [`Lab::drainer_config`]).
pub const USERNAME: &str = "admin";
pub const PASSWORD: &str = "admin";
/// Instance metadata key: the live migration never converges.
pub const META_STALL: &str = "drainlab:stall";
/// Instance metadata key: the live migration fails on the source.
pub const META_FAIL: &str = "drainlab:fail";

/// How long the helpers wait for a state (boot, stop, delete).
const WAIT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(250);

/// What [`Lab::boot`] creates. Build it with [`BootSpec::new`] and the
/// builder methods; defaults: 1 server, project `admin`, host `host1`,
/// flavor `m1.tiny`, no metadata.
#[derive(Debug, Clone)]
pub struct BootSpec {
    /// Name prefix: servers are named `{prefix}-{i}`, i = 0..count.
    pub prefix: String,
    pub count: usize,
    /// Owning project: `"admin"` or `"demo"`.
    pub project: String,
    /// Forced host (`availability_zone: "nova:{host}"`); `None` lets the
    /// scheduler choose.
    pub host: Option<String>,
    /// Flavor name (`m1.tiny`, `m1.small`, `m1.large`).
    pub flavor: String,
    /// Instance metadata, e.g. `(META_STALL, "true")`.
    pub metadata: Vec<(String, String)>,
}

impl BootSpec {
    pub fn new(prefix: &str) -> Self {
        BootSpec {
            prefix: prefix.to_string(),
            count: 1,
            project: "admin".into(),
            host: Some("host1".into()),
            flavor: "m1.tiny".into(),
            metadata: Vec::new(),
        }
    }
    pub fn count(mut self, n: usize) -> Self {
        self.count = n;
        self
    }
    pub fn project(mut self, p: &str) -> Self {
        self.project = p.into();
        self
    }
    pub fn host(mut self, h: &str) -> Self {
        self.host = Some(h.into());
        self
    }
    pub fn any_host(mut self) -> Self {
        self.host = None;
        self
    }
    pub fn flavor(mut self, f: &str) -> Self {
        self.flavor = f.into();
        self
    }
    pub fn meta(mut self, k: &str, v: &str) -> Self {
        self.metadata.push((k.into(), v.into()));
        self
    }
    /// Shortcut for `.meta(META_STALL, "true")`.
    pub fn stall(self) -> Self {
        self.meta(META_STALL, "true")
    }
    /// Shortcut for `.meta(META_FAIL, "true")`.
    pub fn fail(self) -> Self {
        self.meta(META_FAIL, "true")
    }
}

struct Token {
    value: String,
    /// refresh after this instant (expiry minus a margin)
    refresh_at: Instant,
}

/// Admin handle on the running lab. Cheap to share by reference; all methods
/// take `&self`.
pub struct Lab {
    http: reqwest::Client,
    keystone: String,
    nova: String,
    glance: String,
    placement: String,
    tokens: tokio::sync::Mutex<HashMap<String, Token>>,
}

static EXCLUSIVE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Returned by [`Lab::exclusive`]: the lab is ours while it lives, and is
/// left clean when it goes.
pub struct LabGuard {
    _local: tokio::sync::MutexGuard<'static, ()>,
    _port: Option<std::net::TcpListener>,
}

impl Drop for LabGuard {
    /// Leaves the lab as the test found it, also when the test failed: no
    /// server, every nova-compute service enabled ([`Lab::reset`]), before
    /// the lock goes to the next user. Runs after the test's other locals
    /// (declared after the guard, so dropped first: agents killed, a
    /// [`RestoreLab`] already done). On its own thread and runtime: a drop
    /// cannot await, and a failure here must not abort a panicking test.
    fn drop(&mut self) {
        let cleaned = std::thread::spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async { Lab::connect().await.reset().await })
        })
        .join();
        if cleaned.is_err() {
            eprintln!("the lab could not be cleaned after the test (the panic above says why)");
        }
    }
}

impl Lab {
    /// Authenticates as admin on project `admin` and reads the Nova and
    /// Glance endpoints from the catalog. Panics with "lab not running: run
    /// tests/lab/up.sh" when Keystone does not answer.
    pub async fn connect() -> Lab {
        let keystone = std::env::var("OS_AUTH_URL")
            .unwrap_or_else(|_| "http://127.0.0.1:5000/v3".into())
            .trim_end_matches('/')
            .to_string();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("reqwest client");
        let (token, body) = match issue_token(&http, &keystone, "admin").await {
            Ok(t) => t,
            Err(e) => panic!("lab not running: run tests/lab/up.sh ({keystone}: {e})"),
        };
        let catalog = body["token"]["catalog"].as_array().cloned().unwrap_or_default();
        let nova =
            endpoint(&catalog, "compute").unwrap_or_else(|| panic!("no compute endpoint in the catalog: {catalog:?}"));
        let glance =
            endpoint(&catalog, "image").unwrap_or_else(|| panic!("no image endpoint in the catalog: {catalog:?}"));
        let placement = endpoint(&catalog, "placement")
            .unwrap_or_else(|| panic!("no placement endpoint in the catalog: {catalog:?}"));
        let mut tokens = HashMap::new();
        tokens.insert("admin".to_string(), token);
        Lab {
            http,
            keystone,
            nova,
            glance,
            placement,
            tokens: tokio::sync::Mutex::new(tokens),
        }
    }

    /// Takes the lab for one test: hold the guard for the whole test
    /// (`let _g = Lab::exclusive().await;`). Serialises the tests of this
    /// binary (in-process mutex) and every other lab user (other test
    /// binaries, `tests/lab/smoke.sh`, `demo.sh`, `lib/drainlab_check.py`)
    /// through a listening socket on 127.0.0.1:5990 (env `LAB_LOCK_PORT`),
    /// released by the kernel even if the holder crashes. Skipped when env
    /// `LAB_LOCK_HELD=1` (a parent such as `tests/lab/lib/lablock.py cargo
    /// test` holds it).
    pub async fn exclusive() -> LabGuard {
        let local = EXCLUSIVE.lock().await;
        if std::env::var("LAB_LOCK_HELD").as_deref() == Ok("1") {
            return LabGuard {
                _local: local,
                _port: None,
            };
        }
        let port: u16 = std::env::var("LAB_LOCK_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(5990);
        let deadline = Instant::now() + Duration::from_secs(1800);
        let mut said = false;
        loop {
            match std::net::TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => {
                    return LabGuard {
                        _local: local,
                        _port: Some(l),
                    };
                }
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "lab lock 127.0.0.1:{port} still held after 30 min ({e})"
                    );
                    if !said {
                        eprintln!("waiting for the lab lock 127.0.0.1:{port} (another lab user holds it)");
                        said = true;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Keystone v3 URL, e.g. `http://127.0.0.1:5000/v3`.
    pub fn keystone_url(&self) -> &str {
        &self.keystone
    }

    /// Nova endpoint from the catalog, e.g. `http://127.0.0.1:8774/v2.1`.
    pub fn nova_url(&self) -> &str {
        &self.nova
    }

    /// Drainer configuration (YAML, keys of the Go tool it replaces) for the
    /// lab's admin account.
    pub fn drainer_config(&self) -> String {
        format!(
            "IdentityEndpoint: {}\nUsername: {USERNAME}\nPassword: {PASSWORD}\nTenantName: admin\nDomainID: default\n",
            self.keystone
        )
    }

    /// Writes [`Lab::drainer_config`] to a fresh temporary file and returns
    /// its path.
    pub fn drainer_config_file(&self) -> std::path::PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("drainer-lab-{}-{n}.yaml", std::process::id()));
        std::fs::write(&path, self.drainer_config()).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// A valid token scoped to `project` (issued or refreshed as needed).
    pub async fn token(&self, project: &str) -> String {
        let mut tokens = self.tokens.lock().await;
        if let Some(t) = tokens.get(project)
            && Instant::now() < t.refresh_at
        {
            return t.value.clone();
        }
        let (t, _) = issue_token(&self.http, &self.keystone, project)
            .await
            .unwrap_or_else(|e| panic!("token for project {project}: {e}"));
        let v = t.value.clone();
        tokens.insert(project.to_string(), t);
        v
    }

    /// Raw compute call as admin (project `project`): `path` is relative to
    /// the Nova endpoint (`/servers/...`) or an absolute URL. Panics on
    /// status >= 400; returns the JSON body (`Value::Null` when empty).
    pub async fn nova_as(&self, project: &str, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.try_nova_as(project, method.clone(), path, body).await;
        if status >= 400 {
            panic!("{method} {} -> {status}: {v}", self.url(path));
        }
        v
    }

    /// Like [`Lab::nova_as`] but returns `(status, body)` instead of
    /// panicking on an HTTP error status.
    pub async fn try_nova_as(
        &self,
        project: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = self.url(path);
        let token = self.token(project).await;
        let mut req = self
            .http
            .request(method.clone(), &url)
            .header("X-Auth-Token", token)
            .header("Accept", "application/json")
            .header("OpenStack-API-Version", format!("compute {MICROVERSION}"))
            .header("X-OpenStack-Nova-API-Version", MICROVERSION);
        if let Some(b) = body {
            req = req.json(&b);
        }
        send(req, &method, &url).await
    }

    /// [`Lab::nova_as`] with project `admin`.
    pub async fn nova(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        self.nova_as("admin", method, path, body).await
    }

    /// Placement call as admin: `path` is relative to the Placement endpoint
    /// (`/resource_providers/...`), sent with [`PLACEMENT_MICROVERSION`].
    /// Returns `(status, body)`; `Value::Null` when the body is empty.
    pub async fn try_placement(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.placement);
        let token = self.token("admin").await;
        let mut req = self
            .http
            .request(method.clone(), &url)
            .header("X-Auth-Token", token)
            .header("Accept", "application/json")
            .header("OpenStack-API-Version", format!("placement {PLACEMENT_MICROVERSION}"));
        if let Some(b) = body {
            req = req.json(&b);
        }
        send(req, &method, &url).await
    }

    /// Like [`Lab::try_placement`], panicking on an HTTP error status.
    pub async fn placement(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.try_placement(method.clone(), path, body).await;
        if status >= 400 {
            panic!("{method} {}{path} -> {status}: {v}", self.placement);
        }
        v
    }

    /// The uuid of the resource provider named `name` (a compute node's is its hypervisor's name).
    pub async fn provider(&self, name: &str) -> String {
        let v = self
            .placement(reqwest::Method::GET, &format!("/resource_providers?name={name}"), None)
            .await;
        v["resource_providers"][0]["uuid"]
            .as_str()
            .unwrap_or_else(|| panic!("no resource provider {name}: {v}"))
            .to_string()
    }

    /// A provider's current generation, which every write to it must name.
    pub async fn provider_generation(&self, uuid: &str) -> u64 {
        let v = self
            .placement(reqwest::Method::GET, &format!("/resource_providers/{uuid}"), None)
            .await;
        v["generation"]
            .as_u64()
            .unwrap_or_else(|| panic!("provider {uuid} has no generation: {v}"))
    }

    /// Creates a flavor (admin, public) with these extra specs and returns its id.
    pub async fn create_flavor(&self, name: &str, ram_mb: u64, vcpus: u64, disk_gb: u64, extra: Value) -> String {
        let v = self
            .nova(
                reqwest::Method::POST,
                "/flavors",
                Some(json!({"flavor": {"name": name, "ram": ram_mb, "vcpus": vcpus, "disk": disk_gb}})),
            )
            .await;
        let id = str_of(&v["flavor"]["id"]).to_string();
        self.nova(
            reqwest::Method::POST,
            &format!("/flavors/{id}/os-extra_specs"),
            Some(json!({ "extra_specs": extra })),
        )
        .await;
        id
    }

    /// Boots `spec.count` servers named `{prefix}-{i}` in `spec.project`,
    /// waits until all are ACTIVE (panics on ERROR, with the fault) and
    /// returns their ids in name order.
    pub async fn boot(&self, spec: BootSpec) -> Vec<String> {
        let flavor = self.flavor_id(&spec.flavor).await;
        let image = self.image_id("tiny").await;
        let metadata: serde_json::Map<String, Value> = spec
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let mut ids = Vec::with_capacity(spec.count);
        for i in 0..spec.count {
            let mut server = json!({
                "name": format!("{}-{i}", spec.prefix),
                "imageRef": image,
                "flavorRef": flavor,
                "networks": "none",
                "metadata": metadata,
            });
            if let Some(h) = &spec.host {
                server["availability_zone"] = json!(format!("nova:{h}"));
            }
            let r = self
                .nova_as(
                    &spec.project,
                    reqwest::Method::POST,
                    "/servers",
                    Some(json!({ "server": server })),
                )
                .await;
            ids.push(str_of(&r["server"]["id"]).to_string());
        }
        for id in &ids {
            let s = self.wait_server(id, "ACTIVE", |s| s["status"] == "ACTIVE").await;
            if let Some(h) = &spec.host {
                assert_eq!(
                    s["OS-EXT-SRV-ATTR:host"],
                    json!(h),
                    "server {id} booted on the wrong host"
                );
            }
        }
        ids
    }

    /// `GET /servers/{id}` (microversion 2.93): the `server` object.
    pub async fn server(&self, id: &str) -> Value {
        let mut v = self.nova(reqwest::Method::GET, &format!("/servers/{id}"), None).await;
        v["server"].take()
    }

    /// Like [`Lab::server`] but `None` when the server does not exist (404).
    pub async fn try_server(&self, id: &str) -> Option<Value> {
        let (status, mut v) = self
            .try_nova_as("admin", reqwest::Method::GET, &format!("/servers/{id}"), None)
            .await;
        match status {
            404 => None,
            s if s >= 400 => panic!("GET /servers/{id} -> {s}: {v}"),
            _ => Some(v["server"].take()),
        }
    }

    /// Polls the server until `pred` holds (panics after 120 s, or when the
    /// server goes ERROR and `pred` does not accept that).
    pub async fn wait_server(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_server_for(id, what, WAIT, pred).await
    }

    /// [`Lab::wait_server`] with an explicit timeout.
    pub async fn wait_server_for(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.server(id).await;
            if pred(&s) {
                return s;
            }
            if s["status"] == "ERROR" {
                panic!("server {id} went ERROR while waiting for {what}: fault {}", s["fault"]);
            }
            if Instant::now() > deadline {
                panic!(
                    "timeout waiting for server {id} to be {what}: status {} task_state {} host {}",
                    s["status"], s["OS-EXT-STS:task_state"], s["OS-EXT-SRV-ATTR:host"]
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Every server (all projects) whose compute host is `host`, all pages
    /// of `GET /servers/detail?all_tenants=1&host=`.
    pub async fn servers_on(&self, host: &str) -> Vec<Value> {
        self.list_all(&format!("/servers/detail?all_tenants=1&host={host}"), "servers")
            .await
    }

    /// Every server of every project, all pages.
    pub async fn all_servers(&self) -> Vec<Value> {
        self.list_all("/servers/detail?all_tenants=1", "servers").await
    }

    /// `os-stop`, then waits for SHUTOFF.
    pub async fn stop(&self, id: &str) {
        self.action(id, json!({"os-stop": null})).await;
        self.wait_server(id, "SHUTOFF", |s| {
            s["status"] == "SHUTOFF" && s["OS-EXT-STS:task_state"].is_null()
        })
        .await;
    }

    /// `os-resetState {"state": "error"}`: the server shows ERROR at once.
    pub async fn reset_to_error(&self, id: &str) {
        self.action(id, json!({"os-resetState": {"state": "error"}})).await;
    }

    /// `POST /servers/{id}/action` with `body`.
    pub async fn action(&self, id: &str, body: Value) {
        self.nova(reqwest::Method::POST, &format!("/servers/{id}/action"), Some(body))
            .await;
    }

    /// Starts a live migration (`os-migrateLive`, `block_migration: auto`);
    /// `host: None` lets the scheduler choose. Does not wait.
    pub async fn live_migrate(&self, id: &str, host: Option<&str>) {
        self.action(id, json!({"os-migrateLive": {"host": host, "block_migration": "auto"}}))
            .await;
    }

    /// The nova-compute service record of `host` (`id` is a UUID at 2.93).
    pub async fn service(&self, host: &str) -> Value {
        let v = self
            .nova(
                reqwest::Method::GET,
                &format!("/os-services?binary=nova-compute&host={host}"),
                None,
            )
            .await;
        match v["services"].as_array().map(Vec::as_slice) {
            Some([one]) => one.clone(),
            _ => panic!("expected one nova-compute service for host {host}: {v}"),
        }
    }

    /// Asserts that `host`'s nova-compute service is disabled with the drainer's marker as its reason.
    pub async fn assert_disabled_by_drainer(&self, host: &str) {
        let service = self.service(host).await;
        assert_eq!(service["status"], "disabled", "{service}");
        let reason = service["disabled_reason"].as_str().unwrap_or_default();
        assert!(
            reason.starts_with("nova-kubernetes-drain:"),
            "not our reason: {reason:?}"
        );
    }

    /// Every nova-compute service record.
    pub async fn services(&self) -> Vec<Value> {
        let v = self
            .nova(reqwest::Method::GET, "/os-services?binary=nova-compute", None)
            .await;
        v["services"].as_array().cloned().unwrap_or_default()
    }

    /// Enables (clears the reason) or disables (with `reason`) the
    /// nova-compute service of `host`.
    pub async fn set_service(&self, host: &str, enabled: bool, reason: Option<&str>) {
        let svc = self.service(host).await;
        let body = if enabled {
            json!({"status": "enabled"})
        } else {
            match reason {
                Some(r) => json!({"status": "disabled", "disabled_reason": r}),
                None => json!({"status": "disabled"}),
            }
        };
        self.nova(
            reqwest::Method::PUT,
            &format!("/os-services/{}", str_of(&svc["id"])),
            Some(body),
        )
        .await;
    }

    /// Live-migration records of an instance, newest first, all pages of
    /// `GET /os-migrations?instance_uuid=&migration_type=live-migration`
    /// (terminal ones included: `completed`, `cancelled`, `failed`,
    /// `error`).
    pub async fn live_migrations(&self, instance: &str) -> Vec<Value> {
        self.list_all(
            &format!("/os-migrations?instance_uuid={instance}&migration_type=live-migration"),
            "migrations",
        )
        .await
    }

    /// In-progress live migrations of a server (`GET
    /// /servers/{id}/migrations`; only `queued`/`preparing`/`running`/... are
    /// listed, with `memory_*_bytes` progress).
    pub async fn server_migrations(&self, id: &str) -> Vec<Value> {
        let v = self
            .nova(reqwest::Method::GET, &format!("/servers/{id}/migrations"), None)
            .await;
        v["migrations"].as_array().cloned().unwrap_or_default()
    }

    /// Aborts an in-progress live migration (`DELETE
    /// /servers/{id}/migrations/{mid}`).
    pub async fn abort_migration(&self, id: &str, migration_id: u64) {
        self.nova(
            reqwest::Method::DELETE,
            &format!("/servers/{id}/migrations/{migration_id}"),
            None,
        )
        .await;
    }

    /// Force-completes a running live migration.
    pub async fn force_complete(&self, id: &str, migration_id: u64) {
        self.nova(
            reqwest::Method::POST,
            &format!("/servers/{id}/migrations/{migration_id}/action"),
            Some(json!({"force_complete": null})),
        )
        .await;
    }

    /// Deletes a server and waits until it is gone.
    pub async fn delete(&self, id: &str) {
        self.nova(reqwest::Method::DELETE, &format!("/servers/{id}"), None)
            .await;
        let deadline = Instant::now() + WAIT;
        while self.try_server(id).await.is_some() {
            assert!(Instant::now() < deadline, "server {id} not deleted after {WAIT:?}");
            tokio::time::sleep(POLL).await;
        }
    }

    /// Clean slate for a test: deletes every server of every project (waits
    /// until they are gone; servers stuck in a task state or ERROR are reset
    /// to active and deleted again) and enables every nova-compute service
    /// (reason cleared, forced_down cleared).
    pub async fn reset(&self) {
        for round in 0..3 {
            let servers = self.all_servers().await;
            if servers.is_empty() {
                break;
            }
            assert!(round < 2, "reset: servers left after 2 rounds: {:?}", summary(&servers));
            for s in &servers {
                let id = str_of(&s["id"]);
                if round > 0 {
                    // stuck (e.g. deleting during a migration): reset + delete again
                    self.action(id, json!({"os-resetState": {"state": "active"}})).await;
                }
                let (st, v) = self
                    .try_nova_as("admin", reqwest::Method::DELETE, &format!("/servers/{id}"), None)
                    .await;
                if st >= 400 && st != 404 {
                    eprintln!("reset: DELETE /servers/{id} -> {st}: {v}");
                }
            }
            let deadline = Instant::now() + Duration::from_secs(if round == 0 { 60 } else { 30 });
            while Instant::now() < deadline && !self.all_servers().await.is_empty() {
                tokio::time::sleep(POLL).await;
            }
        }
        for svc in self.services().await {
            let id = str_of(&svc["id"]);
            if svc["status"] != "enabled" || svc["disabled_reason"] != Value::Null {
                self.nova(
                    reqwest::Method::PUT,
                    &format!("/os-services/{id}"),
                    Some(json!({"status": "enabled"})),
                )
                .await;
            }
            if svc["forced_down"] == json!(true) {
                self.nova(
                    reqwest::Method::PUT,
                    &format!("/os-services/{id}"),
                    Some(json!({"forced_down": false})),
                )
                .await;
            }
        }
        self.wait_computes_up(None).await;
    }

    /// Waits until every nova-compute service is `up` (the scheduler and the
    /// drainer's capacity check ignore the others); with `since` (UTC,
    /// `YYYY-MM-DDTHH:MM:SS`), until each has also sent a heartbeat after it,
    /// which proves its RPC path works again after a restart.
    pub async fn wait_computes_up(&self, since: Option<&str>) {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let services = self.services().await;
            let healthy = !services.is_empty()
                && services
                    .iter()
                    .all(|s| s["state"] == "up" && since.is_none_or(|t| s["updated_at"].as_str().unwrap_or("") >= t));
            if healthy {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nova-compute services not all up{}: {:?}",
                since.map(|t| format!(" since {t}")).unwrap_or_default(),
                services
                    .iter()
                    .map(|s| format!(
                        "{} {} {}",
                        str_of(&s["host"]),
                        str_of(&s["state"]),
                        str_of(&s["updated_at"])
                    ))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    // ------------------------------------------------------------ internals

    fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            format!("{}{path}", self.nova)
        }
    }

    /// GET `path` and every `{key}_links` `rel=next` page after it.
    async fn list_all(&self, path: &str, key: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut next = Some(self.url(path));
        let mut pages = 0;
        while let Some(url) = next.take() {
            pages += 1;
            assert!(pages < 1000, "paging loop on {path}");
            let v = self.nova(reqwest::Method::GET, &url, None).await;
            let items = v[key].as_array().unwrap_or_else(|| panic!("GET {url}: no {key}: {v}"));
            out.extend(items.iter().cloned());
            next = v[format!("{key}_links")]
                .as_array()
                .and_then(|l| l.iter().find(|l| l["rel"] == "next"))
                .map(|l| str_of(&l["href"]).to_string());
        }
        out
    }

    async fn flavor_id(&self, name: &str) -> String {
        let flavors = self.list_all("/flavors?is_public=None", "flavors").await;
        flavors
            .iter()
            .find(|f| f["name"] == name)
            .map(|f| str_of(&f["id"]).to_string())
            .unwrap_or_else(|| panic!("flavor {name} not found (lab bootstrap incomplete?): {flavors:?}"))
    }

    async fn image_id(&self, name: &str) -> String {
        let url = format!("{}/v2/images?name={name}", self.glance);
        let token = self.token("admin").await;
        let resp = self
            .http
            .get(&url)
            .header("X-Auth-Token", token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert!(status.is_success(), "GET {url} -> {status}: {v}");
        v["images"]
            .as_array()
            .and_then(|is| is.iter().find(|i| i["status"] == "active"))
            .map(|i| str_of(&i["id"]).to_string())
            .unwrap_or_else(|| panic!("image {name} not found: {v}"))
    }
}

fn summary(servers: &[Value]) -> Vec<String> {
    servers
        .iter()
        .map(|s| {
            format!(
                "{} {} {} task={} host={}",
                str_of(&s["id"]),
                str_of(&s["name"]),
                str_of(&s["status"]),
                s["OS-EXT-STS:task_state"],
                s["OS-EXT-SRV-ATTR:host"]
            )
        })
        .collect()
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("expected a string, got {v}"))
}

fn endpoint(catalog: &[Value], stype: &str) -> Option<String> {
    catalog
        .iter()
        .find(|s| s["type"] == stype)?
        .get("endpoints")?
        .as_array()?
        .iter()
        .find(|e| e["interface"] == "public")
        .and_then(|e| e["url"].as_str())
        .map(|u| u.trim_end_matches('/').to_string())
}

/// POST /v3/auth/tokens scoped to `project` (domain Default).
async fn issue_token(http: &reqwest::Client, keystone: &str, project: &str) -> Result<(Token, Value), String> {
    let body = json!({"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": USERNAME, "domain": {"id": "default"}, "password": PASSWORD}}},
        "scope": {"project": {"name": project, "domain": {"id": "default"}}}}});
    let url = format!("{keystone}/auth/tokens");
    let t0 = Instant::now();
    let resp = http
        .post(&url)
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("POST {url}: {e}"))?;
    let status = resp.status();
    let value = resp
        .headers()
        .get("X-Subject-Token")
        .and_then(|h| h.to_str().ok())
        .map(str::to_string);
    let text = resp.text().await.map_err(|e| format!("POST {url}: {e}"))?;
    if !status.is_success() {
        return Err(format!("POST {url} -> {status}: {text}"));
    }
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("POST {url}: {e}: {text}"))?;
    let value = value.ok_or_else(|| format!("POST {url}: no X-Subject-Token"))?;
    // lifetime = expires_at - issued_at (both keystone clock): no clock-skew
    // issue; refresh with a margin of a quarter of the lifetime, at most 60 s
    let lifetime = match (
        v["token"]["issued_at"].as_str().and_then(epoch_seconds),
        v["token"]["expires_at"].as_str().and_then(epoch_seconds),
    ) {
        (Some(i), Some(e)) if e > i => Duration::from_secs((e - i) as u64),
        _ => Duration::from_secs(300),
    };
    let margin = (lifetime / 4).min(Duration::from_secs(60));
    Ok((
        Token {
            value,
            refresh_at: t0 + lifetime - margin,
        },
        v,
    ))
}

/// "2026-11-21T22:53:21.000000Z" -> seconds since the epoch (UTC).
fn epoch_seconds(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 19 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // days from civil (Howard Hinnant)
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + hh * 3600 + mm * 60 + ss)
}

// ------------------------------------------------- lab processes: faults

fn lab_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/lab")
}

/// Runs the lab's idempotent `up.sh` with extra environment (restarts what
/// changed or died). The caller holds the lab lock.
pub fn lab_up(env: &[(&str, &str)]) {
    let status = std::process::Command::new("bash")
        .arg(lab_dir().join("up.sh"))
        .envs(env.iter().copied())
        .env("LAB_LOCK_HELD", "1")
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run tests/lab/up.sh");
    assert!(status.success(), "tests/lab/up.sh failed");
}

/// One change a test made to the lab's Placement or flavors, to be undone.
#[derive(Debug)]
pub enum Undo {
    DeleteFlavor(String),
    /// Deletes a resource provider the test created.
    DeleteProvider(String),
    /// Puts back one class's inventory (total, reserved, ratios...) on a provider.
    PutInventory {
        provider: String,
        class: String,
        inventory: Value,
    },
    /// Sets a provider's aggregates back to these.
    SetAggregates {
        provider: String,
        aggregates: Vec<String>,
    },
    /// Deletes a custom resource class the test created.
    DeleteResourceClass(String),
}

/// Undoes the test's changes to Placement and flavors when dropped, even if
/// the test failed: deletes every server first (allocations would keep a
/// provider or an inventory from going), then undoes the changes newest
/// first. Declare it after the [`LabGuard`], so it runs while the lab is
/// still ours. On its own thread and runtime, as [`LabGuard`]'s drop.
#[derive(Default)]
pub struct RestorePlacement {
    undo: std::sync::Mutex<Vec<Undo>>,
}

impl RestorePlacement {
    /// Records what puts the lab back after a change (call it before the change).
    pub fn push(&self, undo: Undo) {
        self.undo.lock().unwrap_or_else(|e| e.into_inner()).push(undo);
    }
}

impl Drop for RestorePlacement {
    /// Every step is tried, whatever the others do; a step that fails fails
    /// the test (unless it failed already), naming what is left to repair.
    fn drop(&mut self) {
        let undo = std::mem::take(self.undo.get_mut().unwrap_or_else(|e| e.into_inner()));
        if undo.is_empty() {
            return;
        }
        let restored = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let lab = Lab::connect().await;
                lab.reset().await;
                let mut failed = Vec::new();
                for step in undo.into_iter().rev() {
                    if let Err(e) = lab.undo(&step).await {
                        failed.push(format!("{step:?}: {e}"));
                    }
                }
                failed
            })
        })
        .join();
        let failed = match restored {
            Ok(failed) => failed,
            Err(_) => vec!["the lab could not be reset (the panic above says why)".to_string()],
        };
        if !failed.is_empty() {
            eprintln!("the lab's Placement was not restored: {failed:#?}");
            if !std::thread::panicking() {
                panic!("the lab's Placement was not restored: {failed:#?}");
            }
        }
    }
}

impl Lab {
    async fn undo(&self, step: &Undo) -> Result<(), String> {
        use reqwest::Method;
        let done = |(status, v): (u16, Value), what: &str| {
            if status < 400 {
                Ok(())
            } else {
                Err(format!("{what} -> {status}: {v}"))
            }
        };
        let gone_too = |(status, v): (u16, Value), what: &str| {
            if status < 400 || status == 404 {
                Ok(())
            } else {
                Err(format!("{what} -> {status}: {v}"))
            }
        };
        match step {
            Undo::DeleteFlavor(id) => {
                let path = format!("/flavors/{id}");
                gone_too(self.try_nova_as("admin", Method::DELETE, &path, None).await, &path)
            }
            Undo::DeleteProvider(uuid) => {
                let path = format!("/resource_providers/{uuid}");
                gone_too(self.try_placement(Method::DELETE, &path, None).await, &path)
            }
            Undo::DeleteResourceClass(class) => {
                let path = format!("/resource_classes/{class}");
                gone_too(self.try_placement(Method::DELETE, &path, None).await, &path)
            }
            Undo::PutInventory {
                provider,
                class,
                inventory,
            } => {
                // A class the provider lacks is added with a POST (a PUT only updates);
                // its nova-compute may have put it back already.
                let path = format!("/resource_providers/{provider}/inventories/{class}");
                let mut body = inventory.clone();
                body["resource_provider_generation"] = json!(self.provider_generation(provider).await);
                if self.try_placement(Method::GET, &path, None).await.0 == 404 {
                    body["resource_class"] = json!(class);
                    let path = format!("/resource_providers/{provider}/inventories");
                    done(self.try_placement(Method::POST, &path, Some(body)).await, &path)
                } else {
                    done(self.try_placement(Method::PUT, &path, Some(body)).await, &path)
                }
            }
            Undo::SetAggregates { provider, aggregates } => {
                let generation = self.provider_generation(provider).await;
                let path = format!("/resource_providers/{provider}/aggregates");
                let body = json!({"aggregates": aggregates, "resource_provider_generation": generation});
                done(self.try_placement(Method::PUT, &path, Some(body)).await, &path)
            }
        }
    }
}

/// Brings the lab back to its defaults when dropped, even if the test failed.
pub struct RestoreLab;

impl Drop for RestoreLab {
    fn drop(&mut self) {
        lab_up(&[]);
    }
}

/// Stops one lab service's whole process group (a name of the lab's `pids`
/// file: `keystone`, `nova-api`, `rabbitmq`, `nova-compute-host2`, ...), as a
/// crash would.
pub fn lab_kill(service: &str) {
    let run = std::env::var("OSLAB_RUN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| lab_dir().join("run"));
    let pids = std::fs::read_to_string(run.join("pids")).expect("lab pids");
    let pid = pids
        .lines()
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            (fields.next() == Some(service))
                .then(|| fields.next().map(str::to_string))
                .flatten()
        })
        .next_back()
        .unwrap_or_else(|| panic!("{service} not in the lab's pids"));
    let status = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {service} ({pid})");
}

/// Runs `up.sh` after a fault, then waits until every compute has sent a
/// heartbeat since, so the next test starts on a healthy lab.
pub async fn recover() {
    let since = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S").to_string();
    lab_up(&[]);
    Lab::connect().await.wait_computes_up(Some(&since)).await;
}

/// Sends a lab request: `(status, body)`, `Value::Null` for an empty body,
/// the text as a string when it is not JSON.
async fn send(req: reqwest::RequestBuilder, method: &reqwest::Method, url: &str) -> (u16, Value) {
    let resp = req.send().await.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    let text = resp
        .text()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: body: {e}"));
    let v = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, v)
}
