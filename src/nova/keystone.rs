//! Keystone v3 authentication for osauth sessions.
//!
//! osauth's own `Password` takes the user and domain only by name and has no
//! user id, but the old tool's `DomainID` (and many operators' configs) name
//! them by id. This auth type builds the v3 request from whatever mix of ids
//! and names the configuration holds, caches the token and its catalog, and
//! renews it before it expires or when the cloud rejects it.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use osauth::{AuthType, EndpointFilters, Error, ErrorKind, InterfaceType};
use reqwest::{Client, RequestBuilder, Url};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::RwLock;
use tracing::warn;

use secrecy::{ExposeSecret, SecretString};

use super::Credentials;

/// Renew the token when it has less than this left (or half its lifetime, if shorter).
/// Nova keeps using the caller's token for the rest of an operation (the
/// destination's Neutron port binding at the end of a live migration), so a
/// migration must never start on a token about to expire.
const RENEW_BEFORE: jiff::SignedDuration = jiff::SignedDuration::from_secs(600);
/// While Keystone cannot be reached, the current token is used until this
/// close to its expiry, and renewal is tried again at most this often.
const OUTAGE_GRACE: jiff::SignedDuration = jiff::SignedDuration::from_secs(5);

/// Keystone v3 password or application-credential authentication. Clones
/// share one token.
#[derive(Clone)]
pub struct KeystoneAuth {
    token_url: Url,
    /// The token request, JSON text: it holds the password or secret.
    body: SecretString,
    cached: Arc<RwLock<Option<CachedToken>>>,
}

impl fmt::Debug for KeystoneAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeystoneAuth")
            .field("token_url", &self.token_url.as_str())
            .finish_non_exhaustive()
    }
}

struct CachedToken {
    value: SecretString,
    expires_at: jiff::Timestamp,
    /// Renew once this close to `expires_at`.
    margin: jiff::SignedDuration,
    catalog: Vec<CatalogEntry>,
    /// A renewal failed for want of Keystone; the next try is not before this.
    next_renewal: Option<jiff::Timestamp>,
}

#[derive(Deserialize)]
struct TokenRoot {
    token: TokenBody,
}

#[derive(Deserialize)]
struct TokenBody {
    expires_at: jiff::Timestamp,
    #[serde(default)]
    issued_at: Option<jiff::Timestamp>,
    #[serde(default)]
    catalog: Vec<CatalogEntry>,
}

#[derive(Clone, Deserialize)]
struct CatalogEntry {
    #[serde(rename = "type")]
    service_type: String,
    #[serde(default)]
    endpoints: Vec<CatalogEndpoint>,
}

#[derive(Clone, Deserialize)]
struct CatalogEndpoint {
    interface: String,
    url: String,
    #[serde(default)]
    region_id: Option<String>,
    #[serde(default)]
    region: Option<String>,
}

fn id_or_name(id: &Option<String>, name: &Option<String>) -> Option<Value> {
    match (id, name) {
        (Some(id), _) => Some(json!({ "id": id })),
        (None, Some(name)) => Some(json!({ "name": name })),
        (None, None) => None,
    }
}

impl KeystoneAuth {
    /// Builds the authentication request from validated credentials.
    pub fn new(credentials: &Credentials) -> Result<KeystoneAuth, Error> {
        let base = credentials.auth_url.trim_end_matches('/');
        let base = if base.ends_with("/v3") {
            base.to_string()
        } else {
            format!("{base}/v3")
        };
        let token_url = Url::parse(&format!("{base}/auth/tokens"))
            .map_err(|e| Error::new(ErrorKind::InvalidConfig, format!("auth URL {base:?}: {e}")))?;
        let user_domain = id_or_name(&credentials.user_domain_id, &credentials.user_domain_name);
        let identity = if let Some(secret) = &credentials.application_credential_secret {
            let mut credential = match (
                &credentials.application_credential_id,
                &credentials.application_credential_name,
            ) {
                (Some(id), _) => json!({ "id": id }),
                (None, Some(name)) => json!({ "name": name }),
                (None, None) => json!({}),
            };
            credential["secret"] = json!(secret.expose_secret());
            if credentials.application_credential_id.is_none() {
                credential["user"] = user_json(credentials, user_domain);
            }
            json!({ "methods": ["application_credential"], "application_credential": credential })
        } else {
            let mut user = user_json(credentials, user_domain);
            user["password"] = json!(credentials.password.as_ref().map(ExposeSecret::expose_secret));
            json!({ "methods": ["password"], "password": { "user": user } })
        };
        let mut auth = json!({ "identity": identity });
        // Application credentials carry their own project; a scope would be rejected.
        if credentials.application_credential_secret.is_none() {
            let project = match (&credentials.project_id, &credentials.project_name) {
                (Some(id), _) => Some(json!({ "id": id })),
                (None, Some(name)) => {
                    let domain = id_or_name(&credentials.project_domain_id, &credentials.project_domain_name)
                        .unwrap_or_else(|| json!({ "id": "default" }));
                    Some(json!({ "name": name, "domain": domain }))
                }
                (None, None) => None,
            };
            if let Some(project) = project {
                auth["scope"] = json!({ "project": project });
            }
        }
        Ok(KeystoneAuth {
            token_url,
            body: SecretString::from(json!({ "auth": auth }).to_string()),
            cached: Arc::new(RwLock::new(None)),
        })
    }

    /// The token request as it is sent, for the credentials oracle test
    /// (src/config/oracle.rs), which holds it against the openstack CLI's.
    #[cfg(test)]
    pub(crate) fn request_body(&self) -> Value {
        serde_json::from_str(self.body.expose_secret()).expect("the request body is JSON")
    }

    /// Whether an operation that outlasts this call may start now. Nova keeps
    /// using the caller's token to the end of a migration, so none may start
    /// on a token that is due for renewal because Keystone cannot renew it.
    pub async fn fit_for_long_operations(&self, client: &Client) -> bool {
        self.token(client).await.is_ok() && self.cached.read().await.as_ref().is_some_and(fresh)
    }

    async fn token(&self, client: &Client) -> Result<String, Error> {
        {
            let cached = self.cached.read().await;
            if let Some(token) = cached.as_ref().filter(|t| fresh(t) || t.renewal_deferred()) {
                return Ok(token.value.expose_secret().to_string());
            }
        }
        if let Err(error) = self.renew(client, false).await {
            return self.outlive_outage(error).await;
        }
        let cached = self.cached.read().await;
        cached
            .as_ref()
            .map(|t| t.value.expose_secret().to_string())
            .ok_or_else(|| Error::new(ErrorKind::AuthenticationFailed, "no token after authenticating"))
    }

    /// Keystone failed to renew a token that still works: keep using it (an
    /// evacuation must not stop for a Keystone restart) and try again later.
    /// Refused credentials are never outlived.
    async fn outlive_outage(&self, error: Error) -> Result<String, Error> {
        if matches!(error.kind(), ErrorKind::AuthenticationFailed | ErrorKind::AccessDenied) {
            return Err(error);
        }
        let mut cached = self.cached.write().await;
        let now = jiff::Timestamp::now();
        let Some(token) = cached
            .as_mut()
            .filter(|t| now.duration_until(t.expires_at) > OUTAGE_GRACE)
        else {
            return Err(error);
        };
        warn!(error = %error, expires_at = %token.expires_at, "could not renew the Keystone token; using the current one meanwhile");
        token.next_renewal = now.checked_add(OUTAGE_GRACE).ok();
        Ok(token.value.expose_secret().to_string())
    }

    async fn renew(&self, client: &Client, force: bool) -> Result<(), Error> {
        let mut cached = self.cached.write().await;
        // Whoever held the lock before may have renewed it, or found Keystone down.
        if !force && cached.as_ref().is_some_and(|t| fresh(t) || t.renewal_deferred()) {
            return Ok(());
        }
        let response = client
            .post(self.token_url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(self.body.expose_secret().to_string())
            .send()
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::ProtocolError,
                    format!("Keystone: {}", super::net::send_error(&e)),
                )
            })?;
        let status = response.status();
        if !status.is_success() {
            let kind = match status.as_u16() {
                401 => ErrorKind::AuthenticationFailed,
                403 => ErrorKind::AccessDenied,
                404 => ErrorKind::EndpointNotFound,
                _ => ErrorKind::InternalServerError,
            };
            let body = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| status.to_string());
            let what = match kind {
                ErrorKind::AuthenticationFailed | ErrorKind::AccessDenied => "Keystone refused the credentials",
                _ => "Keystone could not issue a token",
            };
            return Err(Error::new(kind, format!("{what} ({status}): {message}")));
        }
        let value = response
            .headers()
            .get("x-subject-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| Error::new(ErrorKind::InvalidResponse, "Keystone sent no X-Subject-Token"))?;
        let root: TokenRoot = response
            .json()
            .await
            .map_err(|e| Error::new(ErrorKind::InvalidResponse, format!("Keystone token response: {e}")))?;
        let lifetime = root
            .token
            .issued_at
            .map_or(RENEW_BEFORE * 2, |issued| issued.duration_until(root.token.expires_at));
        *cached = Some(CachedToken {
            value: SecretString::from(value),
            expires_at: root.token.expires_at,
            margin: RENEW_BEFORE.min(lifetime / 2),
            catalog: root.token.catalog,
            next_renewal: None,
        });
        Ok(())
    }
}

fn user_json(credentials: &Credentials, domain: Option<Value>) -> Value {
    match (&credentials.user_id, &credentials.username) {
        (Some(id), _) => json!({ "id": id }),
        (None, name) => json!({ "name": name, "domain": domain.unwrap_or_else(|| json!({ "id": "default" })) }),
    }
}

fn fresh(token: &CachedToken) -> bool {
    jiff::Timestamp::now().duration_until(token.expires_at) > token.margin
}

impl CachedToken {
    /// A failed renewal is not retried on every request: Keystone is given a few seconds.
    fn renewal_deferred(&self) -> bool {
        let now = jiff::Timestamp::now();
        self.next_renewal.is_some_and(|next| now < next) && now.duration_until(self.expires_at) > OUTAGE_GRACE
    }
}

fn interface_name(interface: InterfaceType) -> &'static str {
    match interface {
        InterfaceType::Public => "public",
        InterfaceType::Internal => "internal",
        InterfaceType::Admin => "admin",
    }
}

#[async_trait]
impl AuthType for KeystoneAuth {
    async fn authenticate(&self, client: &Client, request: RequestBuilder) -> Result<RequestBuilder, Error> {
        let token = self.token(client).await?;
        Ok(request.header("X-Auth-Token", token))
    }

    async fn get_endpoint(&self, client: &Client, service_type: &str, filters: &EndpointFilters) -> Result<Url, Error> {
        self.token(client).await?;
        let cached = self.cached.read().await;
        let catalog = cached.as_ref().map(|t| t.catalog.as_slice()).unwrap_or_default();
        let endpoints: Vec<&CatalogEndpoint> = catalog
            .iter()
            .filter(|entry| entry.service_type == service_type)
            .flat_map(|entry| entry.endpoints.iter())
            .filter(|ep| {
                filters.region.as_deref().is_none_or(|region| {
                    ep.region_id.as_deref() == Some(region) || ep.region.as_deref() == Some(region)
                })
            })
            .collect();
        for interface in filters.interfaces.iter() {
            if let Some(ep) = endpoints.iter().find(|ep| ep.interface == interface_name(*interface)) {
                return Url::parse(&ep.url).map_err(|e| {
                    Error::new(
                        ErrorKind::InvalidResponse,
                        format!("catalog URL {:?} for {service_type}: {e}", ep.url),
                    )
                });
            }
        }
        Err(Error::new(
            ErrorKind::EndpointNotFound,
            format!(
                "no {service_type} endpoint in the catalog for interface {:?}{}",
                filters
                    .interfaces
                    .iter()
                    .map(|i| interface_name(*i))
                    .collect::<Vec<_>>(),
                filters
                    .region
                    .as_deref()
                    .map(|r| format!(" in region {r}"))
                    .unwrap_or_default()
            ),
        ))
    }

    async fn refresh(&self, client: &Client) -> Result<(), Error> {
        self.renew(client, true).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

    use axum::http::StatusCode;
    use axum::response::IntoResponse;

    use super::*;

    const ISSUE: u8 = 0;
    const UNAVAILABLE: u8 = 1;
    const REFUSE: u8 = 2;
    /// Issues an hour-long token, not due for renewal.
    const ISSUE_FRESH: u8 = 3;

    /// A Keystone stand-in: issues tokens valid for `valid_for` that are due
    /// for renewal at once, answers 503 or 401 when told to, counts requests.
    struct Keystone {
        url: String,
        mode: Arc<AtomicU8>,
        hits: Arc<AtomicUsize>,
    }

    async fn start_keystone(valid_for: i64) -> Keystone {
        let mode = Arc::new(AtomicU8::new(ISSUE));
        let hits = Arc::new(AtomicUsize::new(0));
        let (m, h) = (mode.clone(), hits.clone());
        let app = axum::Router::new().route(
            "/v3/auth/tokens",
            axum::routing::post(move || {
                let (mode, hits) = (m.clone(), h.clone());
                async move {
                    let n = hits.fetch_add(1, Ordering::SeqCst) + 1;
                    match mode.load(Ordering::SeqCst) {
                        UNAVAILABLE => StatusCode::SERVICE_UNAVAILABLE.into_response(),
                        REFUSE => (StatusCode::UNAUTHORIZED, "{}").into_response(),
                        issue => {
                            let now = jiff::Timestamp::now();
                            let hour = jiff::SignedDuration::from_secs(3600);
                            let (issued_at, expires_at) = if issue == ISSUE_FRESH {
                                (now, now + hour)
                            } else {
                                // A long lifetime almost over: past its renewal margin already.
                                (now - hour, now + jiff::SignedDuration::from_secs(valid_for))
                            };
                            let body = json!({ "token": {
                                "issued_at": issued_at.to_string(),
                                "expires_at": expires_at.to_string(),
                                "catalog": [],
                            }});
                            ([("x-subject-token", format!("token-{n}"))], axum::Json(body)).into_response()
                        }
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/v3", listener.local_addr().expect("address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Keystone { url, mode, hits }
    }

    fn auth_against(url: &str) -> KeystoneAuth {
        let credentials = Credentials {
            auth_url: url.into(),
            username: Some("drainer".into()),
            password: Some(SecretString::from("pw")),
            project_name: Some("admin".into()),
            ..Credentials::default()
        };
        KeystoneAuth::new(&credentials).expect("valid credentials")
    }

    #[tokio::test]
    async fn a_keystone_outage_is_outlived_with_the_current_token_and_not_hammered() {
        let keystone = start_keystone(300).await;
        let auth = auth_against(&keystone.url);
        let client = Client::new();
        assert_eq!(auth.token(&client).await.expect("first token"), "token-1");

        keystone.mode.store(UNAVAILABLE, Ordering::SeqCst);
        let calls = futures::future::join_all((0..8).map(|_| auth.token(&client))).await;
        for token in calls {
            assert_eq!(token.expect("outlived"), "token-1");
        }
        assert_eq!(auth.token(&client).await.expect("outlived"), "token-1");
        assert_eq!(
            keystone.hits.load(Ordering::SeqCst),
            2,
            "one failed renewal for many callers, then a pause"
        );
        assert!(
            !auth.fit_for_long_operations(&client).await,
            "no migration starts on a token Keystone cannot renew"
        );

        keystone.mode.store(ISSUE_FRESH, Ordering::SeqCst);
        auth.cached.write().await.as_mut().expect("cached").next_renewal = None;
        assert_eq!(auth.token(&client).await.expect("renewed"), "token-3");
        assert!(auth.fit_for_long_operations(&client).await);
        assert_eq!(keystone.hits.load(Ordering::SeqCst), 3, "a fresh token is not renewed");
    }

    #[tokio::test]
    async fn refused_credentials_and_expiring_tokens_are_not_outlived() {
        let keystone = start_keystone(300).await;
        let auth = auth_against(&keystone.url);
        let client = Client::new();
        auth.token(&client).await.expect("first token");
        keystone.mode.store(REFUSE, Ordering::SeqCst);
        let error = auth.token(&client).await.expect_err("credentials refused");
        assert_eq!(error.kind(), ErrorKind::AuthenticationFailed);

        let expiring = start_keystone(OUTAGE_GRACE.as_secs() - 1).await;
        let expiring_auth = auth_against(&expiring.url);
        expiring_auth.token(&client).await.expect("first token");
        expiring.mode.store(UNAVAILABLE, Ordering::SeqCst);
        assert!(
            expiring_auth.token(&client).await.is_err(),
            "a token about to expire is not handed out"
        );
    }
}
