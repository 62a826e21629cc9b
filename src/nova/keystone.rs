//! Keystone v3 authentication for osauth sessions.
//!
//! osauth's own `Password` takes the user and domain only by name and has no
//! user id, but the old tool's `DomainID` (and many operators' configs) name
//! them by id. This auth type builds the v3 request from whatever mix of ids
//! and names the configuration holds, caches the token and its catalog, and
//! renews it before it expires or when the cloud rejects it.

use std::fmt;

use async_trait::async_trait;
use osauth::{AuthType, EndpointFilters, Error, ErrorKind, InterfaceType};
use reqwest::{Client, RequestBuilder, Url};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::RwLock;

use crate::config::{Credentials, Secret};

/// Renew the token when it has less than this left (or half its lifetime, if shorter).
/// Nova keeps using the caller's token for the rest of an operation (the
/// destination's Neutron port binding at the end of a live migration), so a
/// migration must never start on a token about to expire.
const RENEW_BEFORE: jiff::SignedDuration = jiff::SignedDuration::from_secs(600);

/// Keystone v3 password or application-credential authentication.
pub struct KeystoneAuth {
    token_url: Url,
    body: Secret<Value>,
    cached: RwLock<Option<CachedToken>>,
}

impl fmt::Debug for KeystoneAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeystoneAuth")
            .field("token_url", &self.token_url.as_str())
            .finish_non_exhaustive()
    }
}

struct CachedToken {
    value: Secret<String>,
    expires_at: jiff::Timestamp,
    /// Renew once this close to `expires_at`.
    margin: jiff::SignedDuration,
    catalog: Vec<CatalogEntry>,
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
            credential["secret"] = json!(secret.expose());
            if credentials.application_credential_id.is_none() {
                credential["user"] = user_json(credentials, user_domain);
            }
            json!({ "methods": ["application_credential"], "application_credential": credential })
        } else {
            let mut user = user_json(credentials, user_domain);
            user["password"] = json!(credentials.password.as_ref().map(Secret::expose));
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
            body: Secret::new(json!({ "auth": auth })),
            cached: RwLock::new(None),
        })
    }

    async fn token(&self, client: &Client) -> Result<String, Error> {
        {
            let cached = self.cached.read().await;
            if let Some(token) = cached.as_ref().filter(|t| fresh(t)) {
                return Ok(token.value.expose().clone());
            }
        }
        self.renew(client, false).await?;
        let cached = self.cached.read().await;
        cached
            .as_ref()
            .map(|t| t.value.expose().clone())
            .ok_or_else(|| Error::new(ErrorKind::AuthenticationFailed, "no token after authenticating"))
    }

    async fn renew(&self, client: &Client, force: bool) -> Result<(), Error> {
        let mut cached = self.cached.write().await;
        if !force && cached.as_ref().is_some_and(fresh) {
            return Ok(());
        }
        let response = client
            .post(self.token_url.clone())
            .json(self.body.expose())
            .send()
            .await
            .map_err(|e| Error::new(ErrorKind::ProtocolError, format!("Keystone at {}: {e}", self.token_url)))?;
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
            return Err(Error::new(
                kind,
                format!("Keystone refused the credentials ({status}): {message}"),
            ));
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
            value: Secret::new(value),
            expires_at: root.token.expires_at,
            margin: RENEW_BEFORE.min(lifetime / 2),
            catalog: root.token.catalog,
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
