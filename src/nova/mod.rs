//! A small typed Nova client over an osauth session: the handful of calls an
//! evacuation needs, each sent with an explicit compute microversion.

mod credentials;
mod keystone;
pub mod microversion;
mod net;
mod wire;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use osauth::services::{COMPUTE, ServiceType};
use osauth::{AuthType, ErrorKind, InterfaceType, Session};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tracing::{debug, warn};
use url::Url;

use crate::evacuation::{
    Capacity, ChangeMark, Compute, ComputeError, ComputeResult, ComputeService, HostCapacity, Migration,
    MigrationChanges, Resources, Server,
};
use microversion::{Microversion, Negotiated};

pub use credentials::Credentials;
pub use keystone::KeystoneAuth;

/// Page size asked for; Nova caps it at its `[api] max_limit`.
const PAGE_SIZE: usize = 1000;
/// Idempotent calls are tried this many times on transport errors and 5xx answers
/// (the engine polls again anyway, so a call never blocks it for long).
const ATTEMPTS: u32 = 3;
/// Time limit of one HTTP request, and of establishing its connection.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Destination hosts whose Placement inventories and usages are read at the
/// same time (two requests each). Unbounded, a cloud of a thousand hosts
/// would send two thousand requests at once to Placement and its database
/// between a cordon and the first migration, and time out on its own load.
const PLACEMENT_HOSTS_AT_ONCE: usize = 16;
/// Placement microversion of every Placement call: 1.14 shows each
/// provider's tree (`root_provider_uuid`, for a compute node's children such
/// as GPUs), 1.18 filters providers by trait (`required=`, for sharing
/// providers). Placement has offered it since Rocky (2018).
const PLACEMENT_VERSION: &str = "placement 1.18";
/// The trait of a provider whose inventory the computes of its aggregates
/// share (a Ceph pool's `DISK_GB`).
const SHARING_TRAIT: &str = "MISC_SHARES_VIA_AGGREGATE";
/// How far each look for changed migration records reaches back before the
/// previous one was sent: Nova keeps `updated_at` in whole seconds, written
/// by its computes' and conductors' clocks, which may be a little behind ours.
const CHANGES_OVERLAP: jiff::SignedDuration = jiff::SignedDuration::from_secs(2);

/// Why the client could not be set up or a call failed.
#[derive(Debug, thiserror::Error)]
pub enum NovaError {
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("{0}")]
    Setup(String),
    #[error("{method} {path}: HTTP {status}: {message}")]
    Http {
        method: Method,
        path: String,
        status: StatusCode,
        message: String,
    },
    #[error("{method} {path}: {message}")]
    Transport {
        method: Method,
        path: String,
        message: String,
    },
    #[error("{0}")]
    Unsupported(String),
    /// Keystone or the catalog could not be reached, or answered 5xx: may work later.
    #[error("{0}")]
    Unreachable(String),
}

impl NovaError {
    /// Whether trying again later may work (an outage), as opposed to what never
    /// will (refused credentials, a bad CA bundle, no compute endpoint, no common microversion).
    pub fn is_transient(&self) -> bool {
        match self {
            NovaError::Transport { .. } | NovaError::Unreachable(_) => true,
            NovaError::Http { status, .. } => status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS,
            NovaError::Auth(_) | NovaError::Setup(_) | NovaError::Unsupported(_) => false,
        }
    }
}

impl From<NovaError> for ComputeError {
    fn from(error: NovaError) -> Self {
        match &error {
            NovaError::Auth(_) => ComputeError::Auth(error.to_string()),
            NovaError::Http { status, .. } if *status == StatusCode::FORBIDDEN => ComputeError::Auth(error.to_string()),
            NovaError::Http { status, .. } if matches!(status.as_u16(), 400 | 409) => {
                ComputeError::Conflict(error.to_string())
            }
            NovaError::Unsupported(_) => ComputeError::Unsupported(error.to_string()),
            _ => ComputeError::Other(error.to_string()),
        }
    }
}

/// Counts of calls made, for benchmarks and the report.
#[derive(Debug, Default)]
pub struct RequestCounter(std::sync::atomic::AtomicU64);

impl RequestCounter {
    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn add(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// An authenticated Nova (and Placement) client with a negotiated microversion.
pub struct NovaClient {
    session: Session,
    /// The session's authentication and HTTP client, kept to ask about the token.
    auth: KeystoneAuth,
    http: reqwest::Client,
    /// The versioned compute endpoint (`.../v2.1`) found by discovery.
    compute_url: Url,
    version: Negotiated,
    requests: RequestCounter,
    errors: RequestCounter,
    /// The hypervisors of each service host looked at, by id: found once
    /// per host, then its look at the servers still on it is one request.
    hypervisor_ids: Mutex<HashMap<String, Vec<String>>>,
}

impl std::fmt::Debug for NovaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NovaClient")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl NovaClient {
    /// Authenticates, finds the compute endpoint and negotiates the microversion.
    /// Changes nothing in the cloud.
    pub async fn connect(credentials: &Credentials, cap: Option<Microversion>) -> Result<NovaClient, NovaError> {
        // Trusted: the system's CA bundle (`SSL_CERT_FILE`, else the OS's,
        // `/etc/ssl/certs/ca-certificates.crt` in the image) and `cacert`.
        // Not the roots compiled into webpki-roots (osauth's TLS feature
        // brings them in): an operator who replaces the image's bundle must
        // be able to narrow trust, not only widen it.
        let mut http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .use_rustls_tls()
            .tls_built_in_webpki_certs(false)
            .tls_built_in_native_certs(true);
        if let Some(path) = &credentials.cacert {
            let pem = std::fs::read(path).map_err(|e| NovaError::Setup(format!("cacert {}: {e}", path.display())))?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| NovaError::Setup(format!("cacert {}: not a PEM bundle: {e}", path.display())))?;
            if certificates.is_empty() {
                return Err(NovaError::Setup(format!(
                    "cacert {}: no PEM certificate in it",
                    path.display()
                )));
            }
            for certificate in certificates {
                http = http.add_root_certificate(certificate);
            }
        }
        if credentials.insecure {
            warn!("insecure: TLS certificates of Keystone and Nova are NOT verified");
            http = http.danger_accept_invalid_certs(true);
        }
        let http = http
            .build()
            .map_err(|e| NovaError::Setup(format!("HTTP client: {e}")))?;
        let auth = KeystoneAuth::new(credentials).map_err(|e| NovaError::Setup(e.to_string()))?;
        let client = osauth::client::AuthenticatedClient::new(http.clone(), auth.clone())
            .await
            .map_err(auth_error)?;
        let mut session = Session::new_with_authenticated_client(client);
        session.set_endpoint_interface(match credentials.interface.as_str() {
            "internal" => InterfaceType::Internal,
            "admin" => InterfaceType::Admin,
            _ => InterfaceType::Public,
        });
        if let Some(region) = &credentials.region_name {
            session.set_region(region.clone());
        }
        let versions = match session.get_api_versions(COMPUTE).await {
            Ok(versions) => versions,
            Err(e) if e.kind() == ErrorKind::ProtocolError => {
                return Err(why_compute_unreachable(&auth, &http, session.endpoint_filters(), e).await);
            }
            Err(e) => return Err(auth_error(e)),
        };
        let (min, max) =
            versions.ok_or_else(|| NovaError::Setup("the compute endpoint does not announce microversions".into()))?;
        let version = Negotiated::pick(Microversion(min.0, min.1), Microversion(max.0, max.1), cap)
            .map_err(NovaError::Unsupported)?;
        let compute_url = session.get_endpoint(COMPUTE, [""; 0]).await.map_err(auth_error)?;
        debug!(version = %version.version(), endpoint = %compute_url, "negotiated compute microversion");
        Ok(NovaClient {
            session,
            auth,
            http,
            compute_url,
            version,
            requests: RequestCounter::default(),
            errors: RequestCounter::default(),
            hypervisor_ids: Mutex::default(),
        })
    }

    /// The compute microversion sent on every call.
    pub fn microversion(&self) -> Microversion {
        self.version.version()
    }

    /// Requests made so far (Keystone excluded).
    pub fn requests(&self) -> u64 {
        self.requests.get()
    }

    /// Requests that failed with a transport error or a 5xx/429 answer.
    pub fn errors(&self) -> u64 {
        self.errors.get()
    }

    fn require(&self, needed: Microversion, what: &str) -> Result<(), NovaError> {
        if self.version.supports(needed) {
            Ok(())
        } else {
            Err(NovaError::Unsupported(format!(
                "{what} needs compute API {needed}; this cloud offers up to {}",
                self.version.version()
            )))
        }
    }

    async fn compute<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &[&str],
        query: &[(&str, String)],
        body: Option<Value>,
    ) -> Result<T, NovaError> {
        let version = self.version.version().to_string();
        let headers = [
            ("OpenStack-API-Version", format!("compute {version}")),
            ("X-OpenStack-Nova-API-Version", version),
        ];
        self.call(&self.compute_url, method, path, query, body, &headers).await
    }

    async fn placement<T: DeserializeOwned>(&self, path: &[&str], query: &[(&str, String)]) -> Result<T, NovaError> {
        let url = self
            .session
            .client()
            .get_endpoint("placement", self.session.endpoint_filters())
            .await
            .map_err(auth_error)?;
        let headers = [("OpenStack-API-Version", PLACEMENT_VERSION.to_string())];
        self.call(&url, Method::GET, path, query, None, &headers).await
    }

    /// Free amount per class of one provider (only the classes it has an inventory of).
    async fn provider_free(&self, uuid: &str) -> Result<Resources, NovaError> {
        let inventories_path = ["resource_providers", uuid, "inventories"];
        let usages_path = ["resource_providers", uuid, "usages"];
        let (inventories, usages) = tokio::try_join!(
            self.placement::<wire::InventoriesRoot>(&inventories_path, &[]),
            self.placement::<wire::UsagesRoot>(&usages_path, &[]),
        )?;
        Ok(wire::free(&inventories, &usages))
    }

    /// Free amount per class of a whole provider tree (a compute node and
    /// its children), summed class by class.
    async fn tree_free(&self, members: &[String]) -> Result<Resources, NovaError> {
        let each = futures::future::try_join_all(members.iter().map(|uuid| self.provider_free(uuid))).await?;
        Ok(sum(each))
    }

    async fn aggregates(&self, uuid: &str) -> Result<Vec<String>, NovaError> {
        let root: wire::AggregatesRoot = self.placement(&["resource_providers", uuid, "aggregates"], &[]).await?;
        Ok(root.aggregates)
    }

    /// What each consumer holds on these providers (a compute node's tree),
    /// summed class by class: one request per provider, however many VMs.
    async fn held_on(&self, members: &[String]) -> Result<BTreeMap<String, Resources>, NovaError> {
        let each = futures::future::try_join_all(members.iter().map(|uuid| async move {
            let path = ["resource_providers", uuid.as_str(), "allocations"];
            self.placement::<wire::ProviderAllocationsRoot>(&path, &[]).await
        }))
        .await?;
        let mut held: BTreeMap<String, Resources> = BTreeMap::new();
        for (consumer, allocation) in each.into_iter().flat_map(|root| root.allocations) {
            let mine = held.entry(consumer).or_default();
            for (class, amount) in allocation.resources {
                *mine.entry(class).or_default() += amount;
            }
        }
        Ok(held)
    }

    /// A Keystone v3 call, at the catalog's identity endpoint (with or
    /// without its `/v3`).
    async fn identity<T: DeserializeOwned>(&self, path: &[&str]) -> Result<T, NovaError> {
        let mut url = self
            .session
            .client()
            .get_endpoint("identity", self.session.endpoint_filters())
            .await
            .map_err(auth_error)?;
        if url.path().trim_end_matches('/').ends_with("/v3") {
            let cannot = NovaError::Setup(format!("identity endpoint {url} cannot take a path"));
            url.path_segments_mut().map_err(|()| cannot)?.pop_if_empty().pop();
        }
        let path: Vec<&str> = ["v3"].into_iter().chain(path.iter().copied()).collect();
        self.call(&url, Method::GET, &path, &[], None, &[]).await
    }

    /// One request with the session's token: renews the token once on a 401,
    /// retries idempotent calls on transport errors, 5xx and 429.
    async fn call<T: DeserializeOwned>(
        &self,
        base: &Url,
        method: Method,
        path: &[&str],
        query: &[(&str, String)],
        body: Option<Value>,
        headers: &[(&str, String)],
    ) -> Result<T, NovaError> {
        let shown = format!("/{}", path.join("/"));
        let mut url = base.clone();
        url.path_segments_mut()
            .map_err(|()| NovaError::Setup(format!("endpoint {base} cannot take a path")))?
            .pop_if_empty()
            .extend(path);
        let idempotent = method != Method::POST;
        let mut reauthenticated = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut request = self.http.request(method.clone(), url.clone()).query(query);
            for (name, value) in headers {
                request = request.header(*name, value.as_str());
            }
            if let Some(body) = &body {
                request = request.json(body);
            }
            // Sent with our own client rather than osauth's, whose error keeps
            // only reqwest's text ("error sending request"), not the cause.
            let request = self
                .session
                .client()
                .auth_type()
                .authenticate(&self.http, request)
                .await;
            self.requests.add();
            let sent = Instant::now();
            let response = match request {
                Ok(request) => request.send().await.map_err(|e| NovaError::Transport {
                    method: method.clone(),
                    path: shown.clone(),
                    message: net::send_error(&e),
                }),
                // No token: refused credentials end here, an unreachable Keystone is retried.
                Err(e) => Err(auth_error(e)),
            };
            let transient = match response {
                Ok(response) => {
                    let status = response.status();
                    debug!(%method, path = %shown, status = status.as_u16(), ms = sent.elapsed().as_millis(), "request");
                    if status.is_success() {
                        let text = response.text().await.map_err(|e| NovaError::Transport {
                            method: method.clone(),
                            path: shown.clone(),
                            message: e.to_string(),
                        })?;
                        let text = if text.trim().is_empty() { "null" } else { text.as_str() };
                        return serde_json::from_str(text).map_err(|e| NovaError::Transport {
                            method: method.clone(),
                            path: shown.clone(),
                            message: format!("unexpected response: {e}"),
                        });
                    }
                    if status == StatusCode::UNAUTHORIZED && !reauthenticated {
                        // The token expired or was revoked early: authenticate again once.
                        reauthenticated = true;
                        let mut session = self.session.clone();
                        session.refresh().await.map_err(auth_error)?;
                        continue;
                    }
                    let message = error_message(&response.text().await.unwrap_or_default(), status);
                    if status == StatusCode::UNAUTHORIZED {
                        return Err(NovaError::Auth(message));
                    }
                    let error = NovaError::Http {
                        method: method.clone(),
                        path: shown.clone(),
                        status,
                        message,
                    };
                    if !(status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS) {
                        return Err(error);
                    }
                    error
                }
                Err(error) if !error.is_transient() => return Err(error),
                Err(error) => error,
            };
            self.errors.add();
            if !idempotent || attempt >= ATTEMPTS {
                return Err(transient);
            }
            debug!(error = %transient, attempt, "retrying");
            tokio::time::sleep(Duration::from_millis(250 * 2u64.pow(attempt))).await;
        }
    }

    /// Refuses to start a migration on a token Keystone cannot renew: Nova
    /// would still need it at the migration's end. Nothing is sent.
    async fn token_fit_for_migration(&self) -> Result<(), NovaError> {
        if self.auth.fit_for_long_operations(&self.http).await {
            return Ok(());
        }
        Err(NovaError::Setup(
            "not starting a migration: the Keystone token is due for renewal and Keystone cannot renew it now".into(),
        ))
    }

    async fn server_action(&self, server_id: &str, body: Value) -> Result<(), NovaError> {
        self.compute::<Value>(Method::POST, &["servers", server_id, "action"], &[], Some(body))
            .await
            .map(drop)
    }

    async fn flavor_of(&self, server: &wire::Server) -> Result<crate::evacuation::Flavor, NovaError> {
        if let Some(flavor) = server.flavor.embedded() {
            return Ok(flavor);
        }
        let id = server.flavor.id.clone().unwrap_or_default();
        let root: wire::FlavorRoot = self.compute(Method::GET, &["flavors", &id], &[], None).await?;
        Ok(root.flavor.resources())
    }

    async fn to_server(&self, server: wire::Server) -> Result<Server, NovaError> {
        let flavor = self.flavor_of(&server).await?;
        let mut server = server
            .into_server(flavor)
            .ok_or_else(|| NovaError::Auth("servers show no host: the credentials lack the admin role".to_string()))?;
        // From 2.26 Nova always shows `tags`; below it, they are unknown, not absent.
        server.tags = if self.version.supports(microversion::SERVER_TAGS) {
            Some(server.tags.unwrap_or_default())
        } else {
            None
        };
        Ok(server)
    }

    async fn services(&self, host: Option<&str>) -> Result<Vec<wire::Service>, NovaError> {
        let mut query = vec![("binary", "nova-compute".to_string())];
        if let Some(host) = host {
            query.push(("host", host.to_string()));
        }
        let root: wire::ServicesRoot = self.compute(Method::GET, &["os-services"], &query, None).await?;
        Ok(root.services)
    }

    async fn hypervisors(&self) -> Result<Vec<wire::Hypervisor>, NovaError> {
        let mut query = Vec::new();
        if self.version.supports(microversion::HYPERVISOR_PAGING) {
            query.push(("limit", PAGE_SIZE.to_string()));
        }
        self.all_pages::<wire::HypervisorsRoot>(&["os-hypervisors", "detail"], &query)
            .await
    }

    /// The ids of the hypervisors of this service host (one for a libvirt
    /// host; matched on the service host exactly, never the hypervisor name),
    /// looked up once per host.
    async fn hypervisor_ids(&self, host: &str) -> Result<Vec<String>, NovaError> {
        let known = self
            .hypervisor_ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(host)
            .cloned();
        if let Some(ids) = known {
            return Ok(ids);
        }
        let ids: Vec<String> = self
            .hypervisors()
            .await?
            .into_iter()
            .filter(|h| h.service.as_ref().is_some_and(|s| s.host == host))
            .map(|h| wire::id_text(&h.id))
            .collect();
        if ids.is_empty() {
            return Err(NovaError::Transport {
                method: Method::GET,
                path: "/os-hypervisors/detail".into(),
                message: format!("no hypervisor of compute host {host} is listed"),
            });
        }
        self.hypervisor_ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(host.to_string(), ids.clone());
        Ok(ids)
    }

    /// `GET /os-migrations` with these filters, every page of it.
    async fn migrations(&self, mut query: Vec<(&str, String)>) -> Result<Vec<wire::Migration>, NovaError> {
        if self.version.supports(microversion::MIGRATION_PAGING) {
            query.push(("limit", PAGE_SIZE.to_string()));
        }
        self.all_pages::<wire::MigrationsRoot>(&["os-migrations"], &query).await
    }

    /// Every item of a paged list: follows the `next` links Nova adds to each full
    /// page (pages hold at most its `[api] max_limit` items, whatever `limit` asks).
    async fn all_pages<P: wire::Paged>(
        &self,
        path: &[&str],
        query: &[(&str, String)],
    ) -> Result<Vec<P::Item>, NovaError> {
        let mut items = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let mut page_query = query.to_vec();
            if let Some(marker) = &marker {
                page_query.push(("marker", marker.clone()));
            }
            let page: P = self.compute(Method::GET, path, &page_query, None).await?;
            let (page_items, links) = page.into_page();
            items.extend(page_items);
            let next = wire::next_marker(&links).map_err(|message| NovaError::Transport {
                method: Method::GET,
                path: format!("/{}", path.join("/")),
                message,
            })?;
            match next {
                // A marker that does not move would page for ever.
                Some(next) if marker.as_deref() != Some(next.as_str()) => marker = Some(next),
                _ => return Ok(items),
            }
        }
    }
}

/// osauth's version discovery keeps only reqwest's text of a failure to
/// send ("error sending request for url"): the catalog's compute URL is
/// asked again here, for the cause in one line (refused, timed out, name,
/// TLS). Whatever the answer, Nova cannot be used now.
async fn why_compute_unreachable(
    auth: &KeystoneAuth,
    http: &reqwest::Client,
    filters: &osauth::EndpointFilters,
    error: osauth::Error,
) -> NovaError {
    if let Ok(url) = auth.get_endpoint(http, COMPUTE.catalog_type(), filters).await
        && let Err(e) = http.get(url).send().await
    {
        return NovaError::Unreachable(format!("Nova: {}", net::send_error(&e)));
    }
    auth_error(error)
}

fn auth_error(error: osauth::Error) -> NovaError {
    // osauth prefixes its message with a generic description of the kind
    // ("Error when accessing the server: ..."); the message alone says more.
    let text = error.to_string();
    let message = text
        .strip_prefix(&format!("{}: ", error.kind()))
        .unwrap_or(&text)
        .to_string();
    match error.kind() {
        ErrorKind::AuthenticationFailed | ErrorKind::AccessDenied => NovaError::Auth(message),
        ErrorKind::ProtocolError
        | ErrorKind::InternalServerError
        | ErrorKind::OperationTimedOut
        | ErrorKind::InvalidResponse => NovaError::Unreachable(message),
        _ => NovaError::Setup(message),
    }
}

/// Nova wraps errors as `{"badRequest": {"message": ...}}`; Placement as `{"errors": [{"detail": ...}]}`.
fn error_message(body: &str, status: StatusCode) -> String {
    let Ok(value) = serde_json::from_str::<Value>(body) else {
        let text = body.trim();
        return if text.is_empty() || text.len() > 300 {
            status.canonical_reason().unwrap_or("error").to_string()
        } else {
            text.to_string()
        };
    };
    if let Some(detail) = value["errors"][0]["detail"].as_str() {
        return detail.to_string();
    }
    value
        .as_object()
        .and_then(|o| o.values().find_map(|v| v["message"].as_str()))
        .map(str::to_string)
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_string())
}

impl Compute for NovaClient {
    async fn find_service(&self, host: &str) -> ComputeResult<Option<ComputeService>> {
        let services = self.services(Some(host)).await?;
        // The host filter is exact in Nova, but compare anyway: never a substring match.
        Ok(services
            .into_iter()
            .find(|s| s.host == host)
            .map(wire::Service::into_service))
    }

    async fn disable_service(&self, service: &ComputeService, reason: &str) -> ComputeResult<ComputeService> {
        let root: wire::ServiceRoot = if self.version.supports(microversion::SERVICE_UUID) {
            let body = json!({ "status": "disabled", "disabled_reason": reason });
            self.compute(Method::PUT, &["os-services", &service.id], &[], Some(body))
                .await?
        } else {
            let body = json!({ "host": service.host, "binary": "nova-compute", "disabled_reason": reason });
            let _: Value = self
                .compute(Method::PUT, &["os-services", "disable-log-reason"], &[], Some(body))
                .await?;
            return self
                .find_service(&service.host)
                .await?
                .ok_or_else(|| ComputeError::Other("the service disappeared".into()));
        };
        Ok(root.service.into_service())
    }

    async fn enable_service(&self, service: &ComputeService) -> ComputeResult<ComputeService> {
        if self.version.supports(microversion::SERVICE_UUID) {
            let body = json!({ "status": "enabled" });
            let root: wire::ServiceRoot = self
                .compute(Method::PUT, &["os-services", &service.id], &[], Some(body))
                .await?;
            return Ok(root.service.into_service());
        }
        let body = json!({ "host": service.host, "binary": "nova-compute" });
        let _: Value = self
            .compute(Method::PUT, &["os-services", "enable"], &[], Some(body))
            .await?;
        self.find_service(&service.host)
            .await?
            .ok_or_else(|| ComputeError::Other("the service disappeared".into()))
    }

    async fn servers_on_host(&self, host: &str) -> ComputeResult<Vec<Server>> {
        let query = [
            ("all_tenants", "1".to_string()),
            ("host", host.to_string()),
            ("limit", PAGE_SIZE.to_string()),
        ];
        let listed = self
            .all_pages::<wire::ServersRoot>(&["servers", "detail"], &query)
            .await?;
        let mut servers = Vec::with_capacity(listed.len());
        for server in listed {
            let server = self.to_server(server).await?;
            // The host filter is exact in Nova; keep only exact matches all the same.
            if server.host.as_deref() == Some(host) {
                servers.push(server);
            }
        }
        Ok(servers)
    }

    async fn server(&self, id: &str) -> ComputeResult<Option<Server>> {
        match self
            .compute::<wire::ServerRoot>(Method::GET, &["servers", id], &[], None)
            .await
        {
            Ok(root) => Ok(Some(self.to_server(root.server).await?)),
            Err(NovaError::Http { status, .. }) if status == StatusCode::NOT_FOUND => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn live_migrate(&self, server_id: &str, destination: Option<&str>) -> ComputeResult<()> {
        if destination.is_some() {
            // Below it, Nova would take the named host unchecked (no capacity or filter check).
            self.require(microversion::CHECKED_DESTINATION, "live-migrating to a chosen host")?;
        }
        let body = if self.version.supports(microversion::BLOCK_MIGRATION_AUTO) {
            json!({ "os-migrateLive": { "host": destination, "block_migration": "auto" } })
        } else {
            json!({ "os-migrateLive": { "host": destination, "block_migration": false, "disk_over_commit": false } })
        };
        self.token_fit_for_migration().await?;
        Ok(self.server_action(server_id, body).await?)
    }

    async fn cold_migrate(&self, server_id: &str) -> ComputeResult<()> {
        self.token_fit_for_migration().await?;
        Ok(self.server_action(server_id, json!({ "migrate": null })).await?)
    }

    async fn confirm_resize(&self, server_id: &str) -> ComputeResult<()> {
        Ok(self.server_action(server_id, json!({ "confirmResize": null })).await?)
    }

    async fn in_progress_migrations(&self, server_id: &str) -> ComputeResult<Vec<Migration>> {
        self.require(microversion::SERVER_MIGRATIONS, "reading migration progress")?;
        let root: wire::MigrationsRoot = self
            .compute(Method::GET, &["servers", server_id, "migrations"], &[], None)
            .await?;
        Ok(root
            .migrations
            .into_iter()
            .map(wire::Migration::into_migration)
            .collect())
    }

    async fn migration_history(&self, server_id: &str, migration_type: &str) -> ComputeResult<Vec<Migration>> {
        let mut query = vec![("instance_uuid", server_id.to_string())];
        if self.version.supports(microversion::SERVER_MIGRATIONS) {
            query.push(("migration_type", migration_type.to_string()));
        }
        let mut history: Vec<Migration> = self
            .migrations(query)
            .await?
            .into_iter()
            .filter(|m| m.instance_uuid.as_deref() == Some(server_id))
            .filter(|m| m.migration_type.as_deref().is_none_or(|t| t == migration_type))
            .map(wire::Migration::into_migration)
            .collect();
        // Newest first whatever the microversion's own ordering. Nova's timestamps
        // have whole seconds, so ties are broken by the id, an integer: compared as
        // text "10" would sort before "9".
        let id_order = |m: &Migration| (m.id.len(), m.id.clone());
        history.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| id_order(b).cmp(&id_order(a)))
        });
        Ok(history)
    }

    async fn unconfirmed_migrations_from(&self, host: &str) -> ComputeResult<Vec<String>> {
        let mut query = vec![("source_compute", host.to_string()), ("status", "finished".to_string())];
        if self.version.supports(microversion::SERVER_MIGRATIONS) {
            query.push(("migration_type", "migration".to_string()));
        }
        let mut ids = Vec::new();
        for migration in self.migrations(query).await? {
            let (Some(id), Some("migration")) = (migration.instance_uuid, migration.migration_type.as_deref()) else {
                continue;
            };
            if migration.source_compute.as_deref() != Some(host) {
                continue;
            }
            if let Some(server) = self.server(&id).await?
                && server.status == "VERIFY_RESIZE"
                && !ids.contains(&id)
            {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    async fn failed_before_any_hypervisor(&self, server_id: &str) -> ComputeResult<bool> {
        let mut query = Vec::new();
        if self.version.supports(microversion::INSTANCE_ACTION_PAGING) {
            query.push(("limit", "1".to_string()));
        }
        let root: wire::InstanceActionsRoot = self
            .compute(
                Method::GET,
                &["servers", server_id, "os-instance-actions"],
                &query,
                None,
            )
            .await?;
        let Some(newest) = root.instance_actions.into_iter().next() else {
            return Ok(false);
        };
        if newest.action != "live-migration" {
            return Ok(false);
        }
        let root: wire::InstanceActionRoot = self
            .compute(
                Method::GET,
                &["servers", server_id, "os-instance-actions", &newest.request_id],
                &[],
                None,
            )
            .await?;
        Ok(root.instance_action.live_migration_stopped_before_hypervisors())
    }

    async fn reset_to_active(&self, server_id: &str) -> ComputeResult<()> {
        Ok(self
            .server_action(server_id, json!({ "os-resetState": { "state": "active" } }))
            .await?)
    }

    async fn force_complete(&self, server_id: &str, migration_id: &str) -> ComputeResult<()> {
        self.require(microversion::FORCE_COMPLETE, "force-completing a live migration")?;
        let body = json!({ "force_complete": null });
        let _: Value = self
            .compute(
                Method::POST,
                &["servers", server_id, "migrations", migration_id, "action"],
                &[],
                Some(body),
            )
            .await?;
        Ok(())
    }

    async fn abort_migration(&self, server_id: &str, migration_id: &str) -> ComputeResult<()> {
        self.require(microversion::ABORT_RUNNING, "aborting a live migration")?;
        let _: Value = self
            .compute(
                Method::DELETE,
                &["servers", server_id, "migrations", migration_id],
                &[],
                None,
            )
            .await?;
        Ok(())
    }

    fn reads_server_tags(&self) -> bool {
        self.version.supports(microversion::SERVER_TAGS)
    }

    async fn add_tag(&self, server_id: &str, tag: &str) -> ComputeResult<()> {
        self.require(microversion::SERVER_TAGS, "tagging a server")?;
        let _: Value = self
            .compute(Method::PUT, &["servers", server_id, "tags", tag], &[], None)
            .await?;
        Ok(())
    }

    async fn remove_tag(&self, server_id: &str, tag: &str) -> ComputeResult<()> {
        self.require(microversion::SERVER_TAGS, "removing a server tag")?;
        match self
            .compute::<Value>(Method::DELETE, &["servers", server_id, "tags", tag], &[], None)
            .await
        {
            Ok(_) => Ok(()),
            // Already gone: what was asked for holds.
            Err(NovaError::Http { status, .. }) if status == StatusCode::NOT_FOUND => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn stop_server(&self, server_id: &str) -> ComputeResult<()> {
        Ok(self.server_action(server_id, json!({ "os-stop": null })).await?)
    }

    async fn start_server(&self, server_id: &str) -> ComputeResult<()> {
        Ok(self.server_action(server_id, json!({ "os-start": null })).await?)
    }

    async fn compute_services(&self) -> ComputeResult<Vec<ComputeService>> {
        let services = self.services(None).await?;
        Ok(services.into_iter().map(wire::Service::into_service).collect())
    }

    fn lists_migration_changes(&self) -> bool {
        self.version.supports(microversion::MIGRATION_PAGING)
    }

    async fn migrations_changed(&self, host: &str, since: Option<ChangeMark>) -> ComputeResult<MigrationChanges> {
        self.require(microversion::MIGRATION_PAGING, "reading changed migrations")?;
        let asked_at = jiff::Timestamp::now();
        let reach_back = |t: jiff::Timestamp| {
            let back = t.checked_sub(CHANGES_OVERLAP).unwrap_or(t);
            // Whole seconds, as Nova compares them.
            jiff::Timestamp::from_second(back.as_second()).unwrap_or(back)
        };
        let since = since.map_or_else(|| reach_back(asked_at), |mark| mark.0);
        let query = vec![
            ("source_compute", host.to_string()),
            ("changes-since", since.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()),
        ];
        let migrations = self
            .migrations(query)
            .await?
            .into_iter()
            .filter(|m| m.source_compute.as_deref() == Some(host))
            .map(wire::Migration::into_migration)
            .collect();
        Ok(MigrationChanges {
            migrations,
            next: ChangeMark(reach_back(asked_at)),
        })
    }

    async fn servers_still_on(&self, host: &str) -> ComputeResult<HashSet<String>> {
        if !self.version.supports(microversion::HYPERVISOR_SERVERS) {
            let query = [
                ("all_tenants", "1".to_string()),
                ("host", host.to_string()),
                ("limit", PAGE_SIZE.to_string()),
            ];
            let listed = self.all_pages::<wire::ServerIdsRoot>(&["servers"], &query).await?;
            return Ok(listed.into_iter().map(|s| s.id).collect());
        }
        let query = [("with_servers", "true".to_string())];
        let mut on_host = HashSet::new();
        for id in self.hypervisor_ids(host).await? {
            let path = ["os-hypervisors", id.as_str()];
            let root: wire::HypervisorServersRoot = match self.compute(Method::GET, &path, &query, None).await {
                Ok(root) => root,
                Err(e) => {
                    if matches!(&e, NovaError::Http { status, .. } if *status == StatusCode::NOT_FOUND) {
                        // Its compute node was recreated (a new id): found again at the next look.
                        self.hypervisor_ids
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .remove(host);
                    }
                    return Err(e.into());
                }
            };
            on_host.extend(root.hypervisor.servers.unwrap_or_default().into_iter().map(|s| s.uuid));
        }
        Ok(on_host)
    }

    fn aborts_queued_migrations(&self) -> bool {
        self.version.supports(Microversion(2, 65))
    }

    async fn project_name(&self, project_id: &str) -> ComputeResult<String> {
        let root: wire::ProjectRoot = self.identity(&["projects", project_id]).await?;
        Ok(root.project.name)
    }

    async fn spare_capacity(&self, source: &str, hosts: &[String]) -> ComputeResult<Capacity> {
        // Independent look-ups run side by side: this sits between a cordon and the first migration.
        let sharing_query = [("required", SHARING_TRAIT.to_string())];
        let (providers, sharing, hypervisors) = tokio::try_join!(
            self.placement::<wire::ResourceProvidersRoot>(&["resource_providers"], &[]),
            self.placement::<wire::ResourceProvidersRoot>(&["resource_providers"], &sharing_query),
            self.hypervisors(),
        )?;
        let providers = providers.resource_providers;
        let tree = |root: &str| -> Vec<String> {
            providers
                .iter()
                .filter(|p| p.root() == root)
                .map(|p| p.uuid.clone())
                .collect()
        };
        // Each hypervisor's compute node provider is named after it; its tree is what the host holds.
        let mut candidates: Vec<(String, String, Vec<String>)> = Vec::new();
        let mut source_tree: Vec<String> = Vec::new();
        for hypervisor in hypervisors {
            let Some(host) = hypervisor.service.map(|s| s.host) else {
                continue;
            };
            let Some(root) = providers
                .iter()
                .find(|p| p.name == hypervisor.hypervisor_hostname)
                .map(|p| p.root().to_string())
            else {
                continue;
            };
            if host == source {
                source_tree.extend(tree(&root));
            } else if hosts.contains(&host) {
                let members = tree(&root);
                candidates.push((host, root, members));
            }
        }
        // Aggregates matter only to find sharing providers: none, no look-up.
        let any_sharing = !sharing.resource_providers.is_empty();
        let destinations = futures::stream::iter(candidates)
            .map(|(host, root, members)| async move {
                let (free, aggregates) = tokio::try_join!(self.tree_free(&members), async {
                    if any_sharing {
                        self.aggregates(&root).await
                    } else {
                        Ok(Vec::new())
                    }
                })?;
                let host = HostCapacity {
                    host,
                    free,
                    shared: BTreeMap::new(),
                };
                Ok::<_, NovaError>((host, aggregates))
            })
            .buffer_unordered(PLACEMENT_HOSTS_AT_ONCE)
            .try_collect::<Vec<_>>();
        let pools = futures::stream::iter(sharing.resource_providers)
            .map(|provider| async move {
                let (free, aggregates) =
                    tokio::try_join!(self.provider_free(&provider.uuid), self.aggregates(&provider.uuid))?;
                Ok::<_, NovaError>((provider.name, free, aggregates))
            })
            .buffer_unordered(PLACEMENT_HOSTS_AT_ONCE)
            .try_collect::<Vec<_>>();
        let (destinations, pools, allocations) = tokio::try_join!(destinations, pools, self.held_on(&source_tree))?;
        Ok(draw_on_sharing_providers(destinations, pools, allocations))
    }
}

/// Class-by-class sum of several providers' amounts.
fn sum(each: impl IntoIterator<Item = Resources>) -> Resources {
    let mut total = Resources::new();
    for (class, amount) in each.into_iter().flatten() {
        *total.entry(class).or_default() += amount;
    }
    total
}

/// Gives each destination, for every class it does not hold itself, the
/// sharing provider of one of its aggregates with the most of that class
/// free, as Placement would let the scheduler draw on it. Pools no
/// destination draws on are left out.
fn draw_on_sharing_providers(
    destinations: Vec<(HostCapacity, Vec<String>)>,
    pools: Vec<(String, Resources, Vec<String>)>,
    allocations: BTreeMap<String, Resources>,
) -> Capacity {
    let mut shared = BTreeMap::new();
    let mut hosts = Vec::with_capacity(destinations.len());
    for (mut host, aggregates) in destinations {
        for (name, free, pool_aggregates) in &pools {
            if !pool_aggregates.iter().any(|a| aggregates.contains(a)) {
                continue;
            }
            for (class, amount) in free {
                if host.free.contains_key(class) {
                    continue;
                }
                let better = host
                    .shared
                    .get(class)
                    .and_then(|current| pools.iter().find(|(n, _, _)| n == current))
                    .is_none_or(|(_, current, _)| current.get(class).is_some_and(|c| c < amount));
                if better {
                    host.shared.insert(class.clone(), name.clone());
                    shared.insert(name.clone(), free.clone());
                }
            }
        }
        hosts.push(host);
    }
    // A pool replaced by a better one for every host is no longer drawn on.
    shared.retain(|name, _| hosts.iter().any(|h| h.shared.values().any(|pool| pool == name)));
    Capacity {
        hosts,
        shared,
        allocations,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Keystone's token route, issuing a token whose catalog has these
    /// `(service type, URL)` endpoints.
    fn keystone_route(catalog: Vec<(&'static str, String)>) -> axum::Router {
        let catalog: Vec<Value> = catalog
            .into_iter()
            .map(|(kind, url)| {
                json!({ "type": kind, "endpoints": [
                    { "interface": "public", "url": url, "region_id": "RegionOne" }
                ]})
            })
            .collect();
        axum::Router::new().route(
            "/v3/auth/tokens",
            axum::routing::post(move || {
                let catalog = catalog.clone();
                async move {
                    let now = jiff::Timestamp::now();
                    let body = json!({ "token": {
                        "issued_at": now.to_string(),
                        "expires_at": (now + jiff::SignedDuration::from_secs(3600)).to_string(),
                        "catalog": catalog,
                    }});
                    ([("x-subject-token", "token-1")], axum::Json(body))
                }
            }),
        )
    }

    async fn serve(listener: tokio::net::TcpListener, app: axum::Router) {
        tokio::spawn(async move { axum::serve(listener, app).await });
    }

    fn credentials(auth_url: String) -> Credentials {
        Credentials {
            auth_url,
            username: Some("drainer".into()),
            password: Some(secrecy::SecretString::from("pw")),
            project_name: Some("admin".into()),
            ..Credentials::default()
        }
    }

    /// A Keystone that issues a token whose catalog names a compute endpoint nobody listens on.
    async fn keystone_with_compute_at(compute: &str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/v3", listener.local_addr().expect("address"));
        serve(listener, keystone_route(vec![("compute", compute.to_string())])).await;
        url
    }

    /// Keystone, Nova and Placement on one port, with `hosts` hypervisors;
    /// Placement answers each inventory or usage read after 20 ms and
    /// records in `most_at_once` the largest number it was reading at once.
    async fn cloud_with_hosts(hosts: usize, most_at_once: Arc<AtomicUsize>) -> String {
        use axum::extract::{Path, RawQuery};
        use axum::routing::get;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let compute = format!("{base}/compute/v2.1");
        let names: Vec<String> = (1..=hosts).map(|n| format!("cmp{n}")).collect();
        let hypervisors: Vec<Value> = names
            .iter()
            .map(|name| json!({ "id": name, "hypervisor_hostname": name, "service": { "host": name } }))
            .collect();
        let providers: Vec<Value> = names.iter().map(|name| json!({ "uuid": name, "name": name })).collect();
        let reading = Arc::new(AtomicUsize::new(0));
        let read = move |Path((_, what)): Path<(String, String)>| {
            let (reading, most_at_once) = (reading.clone(), most_at_once.clone());
            async move {
                let now = reading.fetch_add(1, Ordering::SeqCst) + 1;
                most_at_once.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                reading.fetch_sub(1, Ordering::SeqCst);
                axum::Json(if what == "inventories" {
                    json!({ "inventories": { "MEMORY_MB": { "total": 4096, "reserved": 0, "allocation_ratio": 1.0 } } })
                } else {
                    json!({ "usages": { "MEMORY_MB": 1024 } })
                })
            }
        };
        let version = json!({ "version": {
            "id": "v2.1", "status": "CURRENT", "version": "2.93", "min_version": "2.1",
            "links": [{ "rel": "self", "href": format!("{compute}/") }],
        }});
        let app = keystone_route(vec![
            ("compute", compute.clone()),
            ("placement", format!("{base}/placement")),
        ])
        .route("/compute/v2.1", get(axum::Json(version.clone())))
        .route("/compute/v2.1/", get(axum::Json(version)))
        .route(
            "/compute/v2.1/os-hypervisors/detail",
            get(axum::Json(json!({ "hypervisors": hypervisors }))),
        )
        .route(
            "/placement/resource_providers",
            get(move |RawQuery(query): RawQuery| async move {
                // No sharing provider in this cloud.
                let listed = if query.is_some_and(|q| q.contains("required=")) {
                    Vec::new()
                } else {
                    providers
                };
                axum::Json(json!({ "resource_providers": listed }))
            }),
        )
        .route("/placement/resource_providers/{uuid}/{what}", get(read));
        serve(listener, app).await;
        format!("{base}/v3")
    }

    #[tokio::test]
    async fn placement_is_asked_about_a_bounded_number_of_hosts_at_once() {
        let most_at_once = Arc::new(AtomicUsize::new(0));
        let hosts = 4 * PLACEMENT_HOSTS_AT_ONCE;
        let auth_url = cloud_with_hosts(hosts, most_at_once.clone()).await;
        let nova = NovaClient::connect(&credentials(auth_url), None)
            .await
            .expect("connect");
        let destinations: Vec<String> = (1..=hosts).map(|n| format!("cmp{n}")).collect();

        let capacity = nova.spare_capacity("src", &destinations).await.expect("capacity");

        assert_eq!(capacity.hosts.len(), hosts);
        assert!(
            capacity
                .hosts
                .iter()
                .all(|host| host.free.get("MEMORY_MB") == Some(&3072))
        );
        assert!(capacity.allocations.is_empty(), "no provider for the source");
        let most = most_at_once.load(Ordering::SeqCst);
        assert!(
            (2..=2 * PLACEMENT_HOSTS_AT_ONCE).contains(&most),
            "{most} Placement reads at once"
        );
    }

    /// Keystone and a Nova offering microversions up to `newest` on one
    /// port; `compute` adds the compute calls to the app. Returns Keystone's URL.
    async fn nova_serving(newest: &str, compute: impl FnOnce(axum::Router) -> axum::Router) -> String {
        use axum::routing::get;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let endpoint = format!("{base}/compute/v2.1");
        let version = json!({ "version": {
            "id": "v2.1", "status": "CURRENT", "version": newest, "min_version": "2.1",
            "links": [{ "rel": "self", "href": format!("{endpoint}/") }],
        }});
        let app = keystone_route(vec![("compute", endpoint)])
            .route("/compute/v2.1", get(axum::Json(version.clone())))
            .route("/compute/v2.1/", get(axum::Json(version)));
        serve(listener, compute(app)).await;
        format!("{base}/v3")
    }

    /// Keystone and a Nova whose `GET /os-migrations` answers `records` and
    /// keeps each query string it was asked with.
    async fn nova_with_migrations(records: Value, queries: Arc<std::sync::Mutex<Vec<String>>>) -> String {
        use axum::extract::RawQuery;
        use axum::routing::get;
        let list = move |RawQuery(query): RawQuery| {
            queries.lock().expect("queries").push(query.unwrap_or_default());
            let records = records.clone();
            async move { axum::Json(json!({ "migrations": records, "migrations_links": [] })) }
        };
        nova_serving("2.93", |app| app.route("/compute/v2.1/os-migrations", get(list))).await
    }

    /// Keystone and a Nova offering up to `newest` with two hypervisors, of
    /// hosts `cmp10` and `cmp1` (named `cmp1.example.org`: not the service
    /// host), two servers on `cmp1`; keeps `path?query` of each compute call.
    async fn nova_with_hypervisors(newest: &'static str, calls: Arc<std::sync::Mutex<Vec<String>>>) -> String {
        use axum::response::IntoResponse;
        let answer = move |uri: axum::http::Uri| {
            calls
                .lock()
                .expect("calls")
                .push(uri.path_and_query().map(|p| p.to_string()).unwrap_or_default());
            async move {
                let body = match uri.path().trim_start_matches("/compute/v2.1") {
                    "/os-hypervisors/detail" => json!({ "hypervisors": [
                        { "id": "h-10", "hypervisor_hostname": "cmp10.example.org", "service": { "host": "cmp10" } },
                        { "id": "h-1", "hypervisor_hostname": "cmp1.example.org", "service": { "host": "cmp1" } },
                        { "id": "h-3", "hypervisor_hostname": "cmp3.example.org", "service": { "host": "cmp3" } },
                    ]}),
                    "/os-hypervisors/h-1" => json!({ "hypervisor": { "id": "h-1",
                        "servers": [{ "uuid": "vm-1", "name": "a" }, { "uuid": "vm-2", "name": "b" }] } }),
                    "/os-hypervisors/h-10" => json!({ "hypervisor": { "id": "h-10" } }),
                    "/servers" => json!({ "servers": [{ "id": "vm-1", "name": "a", "links": [] }] }),
                    _ => return StatusCode::NOT_FOUND.into_response(),
                };
                axum::Json(body).into_response()
            }
        };
        nova_serving(newest, |app| app.fallback(answer)).await
    }

    #[tokio::test]
    async fn the_servers_still_on_a_host_are_one_request_once_its_hypervisor_is_known() {
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let nova = NovaClient::connect(&credentials(nova_with_hypervisors("2.93", calls.clone()).await), None)
            .await
            .expect("connect");

        let first = nova.servers_still_on("cmp1").await.expect("first look");
        let second = nova.servers_still_on("cmp1").await.expect("second look");

        let expected: HashSet<String> = ["vm-1", "vm-2"].into_iter().map(String::from).collect();
        assert_eq!((&first, &second), (&expected, &expected));
        // The hypervisor is found by its service host exactly (not cmp10), once.
        let seen = calls.lock().expect("calls").clone();
        let paths: Vec<&str> = seen.iter().map(|c| c.trim_start_matches("/compute/v2.1")).collect();
        assert_eq!(
            paths,
            [
                "/os-hypervisors/detail?limit=1000",
                "/os-hypervisors/h-1?with_servers=true",
                "/os-hypervisors/h-1?with_servers=true"
            ]
        );

        // A host no hypervisor belongs to is an error naming it, not an empty host.
        let missing = nova.servers_still_on("cmp2").await.unwrap_err();
        assert!(
            missing.to_string().contains("no hypervisor of compute host cmp2"),
            "{missing}"
        );

        // Below 2.53 hypervisors do not show their servers: the server list of the host.
        let old_calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let old = NovaClient::connect(
            &credentials(nova_with_hypervisors("2.52", old_calls.clone()).await),
            None,
        )
        .await
        .expect("connect");
        let listed = old.servers_still_on("cmp1").await.expect("listing");
        assert_eq!(listed, HashSet::from(["vm-1".to_string()]));
        let old_calls = old_calls.lock().expect("calls").clone();
        assert_eq!(old_calls.len(), 1, "{old_calls:?}");
        assert!(
            old_calls[0].contains("/servers?") && old_calls[0].contains("host=cmp1"),
            "{old_calls:?}"
        );
    }

    /// Keystone and a Nova offering up to `newest` that lists one tagged
    /// server on `cmp1` and answers every other call 202 (an empty body),
    /// keeping `METHOD path version body` of each.
    async fn nova_recording(newest: &'static str, calls: Arc<std::sync::Mutex<Vec<String>>>) -> String {
        use axum::response::IntoResponse;
        let server = json!({ "id": "vm-1", "name": "db", "tenant_id": "p", "status": "ACTIVE",
            "OS-EXT-SRV-ATTR:host": "cmp1", "OS-EXT-STS:power_state": 1,
            "tags": ["nova-drain:stop", "prod"],
            "flavor": { "ram": 512, "vcpus": 1, "disk": 1, "ephemeral": 0, "swap": 0 } });
        let record = move |method: Method, uri: axum::http::Uri, headers: axum::http::HeaderMap, body: String| {
            let version = headers
                .get("OpenStack-API-Version")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            calls.lock().expect("calls").push(
                format!("{method} {} {version} {body}", uri.path())
                    .trim_end()
                    .to_string(),
            );
            let server = server.clone();
            async move {
                if uri.path().ends_with("/servers/detail") {
                    (StatusCode::OK, axum::Json(json!({ "servers": [server] }))).into_response()
                } else {
                    StatusCode::ACCEPTED.into_response()
                }
            }
        };
        nova_serving(newest, |app| app.fallback(record)).await
    }

    #[tokio::test]
    async fn tags_are_read_and_written_and_servers_stopped_and_started_with_the_microversion() {
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let nova = NovaClient::connect(&credentials(nova_recording("2.93", calls.clone()).await), None)
            .await
            .expect("connect");

        let servers = nova.servers_on_host("cmp1").await.expect("servers");
        nova.add_tag("vm-1", "nova-drain:stopped-by-drainer")
            .await
            .expect("tag");
        nova.stop_server("vm-1").await.expect("stop");
        nova.start_server("vm-1").await.expect("start");
        nova.remove_tag("vm-1", "nova-drain:stopped-by-drainer")
            .await
            .expect("untag");

        assert!(nova.reads_server_tags());
        assert_eq!(
            servers[0].tags,
            Some(vec!["nova-drain:stop".to_string(), "prod".to_string()])
        );
        let calls = calls.lock().expect("calls").clone();
        assert_eq!(
            calls[1..],
            [
                "PUT /compute/v2.1/servers/vm-1/tags/nova-drain:stopped-by-drainer compute 2.93",
                r#"POST /compute/v2.1/servers/vm-1/action compute 2.93 {"os-stop":null}"#,
                r#"POST /compute/v2.1/servers/vm-1/action compute 2.93 {"os-start":null}"#,
                "DELETE /compute/v2.1/servers/vm-1/tags/nova-drain:stopped-by-drainer compute 2.93",
            ]
        );

        // Below 2.26 tags are unknown, not absent, and none is written.
        let old = Arc::new(std::sync::Mutex::new(Vec::new()));
        let nova = NovaClient::connect(&credentials(nova_recording("2.25", old.clone()).await), None)
            .await
            .expect("connect");
        let servers = nova.servers_on_host("cmp1").await.expect("servers");
        assert_eq!(servers[0].tags, None);
        assert!(!nova.reads_server_tags());
        let refused = nova.add_tag("vm-1", "nova-drain:stopped-by-drainer").await.unwrap_err();
        assert!(matches!(refused, ComputeError::Unsupported(_)), "{refused}");
        assert!(refused.to_string().contains("2.26"), "{refused}");
        assert_eq!(old.lock().expect("calls").len(), 1, "only the listing was sent");
    }

    #[tokio::test]
    async fn changed_migrations_are_asked_for_since_the_previous_look_less_the_overlap() {
        let record = |id: u64, server: &str, source: &str, kind: &str| {
            json!({ "id": id, "uuid": format!("m-{id}"), "status": "running", "instance_uuid": server,
                    "source_compute": source, "dest_compute": "cmp9", "migration_type": kind,
                    "created_at": "2026-12-02T11:00:00.000000", "updated_at": "2026-12-02T11:00:01.000000" })
        };
        let records = json!([
            record(3, "vm-a", "cmp1", "live-migration"),
            record(2, "vm-b", "cmp10", "live-migration"),
            record(1, "vm-c", "cmp1", "migration"),
        ]);
        let queries = Arc::new(std::sync::Mutex::new(Vec::new()));
        let nova = NovaClient::connect(&credentials(nova_with_migrations(records, queries.clone()).await), None)
            .await
            .expect("connect");

        let before = jiff::Timestamp::now();
        let first = nova.migrations_changed("cmp1", None).await.expect("first look");
        let second = nova
            .migrations_changed("cmp1", Some(first.next))
            .await
            .expect("second look");

        // Only this host's migrations, live and cold, whatever else the answer holds.
        let ids: Vec<(&str, Option<&str>)> = first
            .migrations
            .iter()
            .map(|m| (m.id.as_str(), m.server_id.as_deref()))
            .collect();
        assert_eq!(ids, [("3", Some("vm-a")), ("1", Some("vm-c"))]);
        assert_eq!(second.migrations.len(), 2);
        // Whole seconds, reaching 2 s back from when the look was sent.
        let reach = first.next.0;
        assert_eq!(reach.subsec_nanosecond(), 0);
        let back = before.as_second() - reach.as_second();
        assert!((1..=3).contains(&back), "{reach} is {back} s before {before}");
        let queries = queries.lock().expect("queries").clone();
        assert_eq!(queries.len(), 2, "{queries:?}");
        let since = |mark: jiff::Timestamp| format!("changes-since={}", mark.strftime("%Y-%m-%dT%H%%3A%M%%3A%SZ"));
        for (query, mark) in queries.iter().zip([None, Some(first.next.0)]) {
            assert!(query.contains("source_compute=cmp1"), "{query}");
            assert!(!query.contains("migration_type"), "{query}");
            if let Some(mark) = mark {
                assert!(query.contains(&since(mark)), "{query} asks since {mark}");
            } else {
                assert!(query.contains("changes-since="), "{query}");
            }
        }
    }

    #[tokio::test]
    async fn nova_down_at_start_up_is_named_with_its_cause_and_url() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr").port()
        };
        let compute = format!("http://127.0.0.1:{port}/v2.1");
        let credentials = credentials(keystone_with_compute_at(&compute).await);

        let error = NovaClient::connect(&credentials, None).await.expect_err("Nova is down");

        assert!(error.is_transient(), "{error}");
        let said = error.to_string();
        assert!(
            said.contains(&format!("Nova: connection refused for {compute}")),
            "{said}"
        );
    }

    #[test]
    fn destinations_draw_on_the_sharing_provider_of_their_aggregate_for_what_they_lack() {
        let resources =
            |pairs: &[(&str, u64)]| -> Resources { pairs.iter().map(|(c, a)| (c.to_string(), *a)).collect() };
        let host = |name: &str, free: Resources| HostCapacity {
            host: name.into(),
            free,
            shared: BTreeMap::new(),
        };
        let destinations = vec![
            (
                host("rbd", resources(&[("MEMORY_MB", 1024)])),
                vec!["agg-ceph".to_string()],
            ),
            (
                host("local", resources(&[("MEMORY_MB", 1024), ("DISK_GB", 10)])),
                vec!["agg-ceph".to_string()],
            ),
            (host("alone", resources(&[("MEMORY_MB", 1024)])), vec![]),
        ];
        let pools = vec![
            (
                "small".to_string(),
                resources(&[("DISK_GB", 5)]),
                vec!["agg-ceph".to_string()],
            ),
            (
                "big".to_string(),
                resources(&[("DISK_GB", 500)]),
                vec!["agg-ceph".to_string()],
            ),
            (
                "elsewhere".to_string(),
                resources(&[("DISK_GB", 900)]),
                vec!["agg-other".to_string()],
            ),
        ];
        let capacity = draw_on_sharing_providers(destinations, pools, BTreeMap::new());
        let shared: Vec<Option<&String>> = capacity.hosts.iter().map(|h| h.shared.get("DISK_GB")).collect();
        assert_eq!(shared, [Some(&"big".to_string()), None, None]);
        assert_eq!(capacity.shared.keys().collect::<Vec<_>>(), ["big"]);
    }
}
