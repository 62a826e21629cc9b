//! One validated configuration from the config file, `clouds.yaml` and the
//! `OS_*` environment. Every problem is reported naming the key, before any
//! request is made.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::evacuation::{Action, Budget, BudgetAction, Settings, StatePolicy, VmPolicy};
use crate::nova::Credentials;
use crate::nova::microversion::{self, Microversion};

mod clouds;
#[cfg(test)]
mod oracle;

/// A configuration problem: the message names the key and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    message: String,
    /// A credential no source gave: only then does the absence of the default config file explain it.
    missing: bool,
}

fn invalid(message: impl Into<String>) -> ConfigError {
    ConfigError {
        message: message.into(),
        missing: false,
    }
}

/// A credential that no source gave (see [`ConfigError::missing`]).
fn missing(message: impl Into<String>) -> ConfigError {
    ConfigError {
        message: message.into(),
        missing: true,
    }
}

/// Which cloud the credentials name, and where they came from: said at start
/// and in every report, so that a config file in the working directory or a
/// stale openrc never acts on a host of another cloud unnoticed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CloudIdentity {
    pub auth_url: String,
    pub region: Option<String>,
    /// Project name (or id), or the application credential's own project.
    pub project: Option<String>,
    /// User name (or id), or `application credential ID`.
    pub user: Option<String>,
    /// Each source a setting in force came from, in the order they take precedence.
    pub sources: Vec<String>,
    /// Settings that both the config file and `OS_*` variables give, differently: the file's win.
    pub overridden: Vec<String>,
}

impl fmt::Display for CloudIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        write!(
            f,
            "{} region {} project {} user {} (from {})",
            self.auth_url,
            or_none(&self.region),
            or_none(&self.project),
            or_none(&self.user),
            self.sources.join(", ")
        )
    }
}

/// Everything the drainer runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub credentials: Credentials,
    pub cloud: CloudIdentity,
    /// Nova service host template: `{node}` is the Kubernetes node name, `{short}` its first DNS label.
    pub nova_host: String,
    /// Newest compute microversion to use (negotiation never goes above it).
    pub compute_api_version: Option<Microversion>,
    pub evacuation: Settings,
}

impl Config {
    /// The nova-compute service host for a Kubernetes node.
    pub fn nova_host_for(&self, node: &str) -> String {
        let short = node.split('.').next().unwrap_or(node);
        self.nova_host.replace("{node}", node).replace("{short}", short)
    }
}

/// The config file as written. Keys of the old Go tool are accepted as aliases.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    cloud: Option<String>,
    #[serde(alias = "IdentityEndpoint")]
    auth_url: Option<String>,
    #[serde(alias = "Username")]
    username: Option<String>,
    #[serde(alias = "UserID")]
    user_id: Option<String>,
    #[serde(alias = "Password")]
    password: Option<SecretString>,
    #[serde(alias = "TenantName")]
    project_name: Option<String>,
    #[serde(alias = "TenantID")]
    project_id: Option<String>,
    #[serde(alias = "DomainID")]
    domain_id: Option<String>,
    #[serde(alias = "DomainName")]
    domain_name: Option<String>,
    user_domain_id: Option<String>,
    user_domain_name: Option<String>,
    project_domain_id: Option<String>,
    project_domain_name: Option<String>,
    application_credential_id: Option<String>,
    application_credential_name: Option<String>,
    application_credential_secret: Option<SecretString>,
    region_name: Option<String>,
    interface: Option<String>,
    cacert: Option<PathBuf>,
    insecure: Option<bool>,
    nova_host: Option<String>,
    compute_api_version: Option<String>,
    timeout_minutes: Option<f64>,
    #[serde(default)]
    migration: MigrationSection,
    #[serde(default)]
    state_policy: BTreeMap<String, Action>,
    /// The node's default VM action (live-migrate, cold-migrate, stop, leave):
    /// below a VM's own `nova-drain:` tag, above the state policy.
    node_default_action: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrationSection {
    max_parallel: Option<u32>,
    queue_ahead: Option<u32>,
    budget_seconds: Option<f64>,
    budget_minimum_seconds: Option<f64>,
    budget_seconds_per_gib: Option<f64>,
    stall_seconds: Option<f64>,
    on_budget_exceeded: Option<BudgetAction>,
    retries: Option<u32>,
    retry_backoff_seconds: Option<f64>,
    poll_interval_seconds: Option<f64>,
}

/// Where configuration comes from besides the file: lets tests supply their own environment.
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;

    /// Where clouds.yaml is looked for first, as openstacksdk does.
    fn current_dir(&self) -> Option<PathBuf> {
        std::env::current_dir().ok()
    }
}

/// The process environment.
pub struct ProcessEnvironment;

impl Environment for ProcessEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

/// Loads the config file (if `path` is given it must exist; the default
/// `config.yaml` may be absent when the environment holds the credentials).
/// `os_cloud` (`--os-cloud`) names the clouds.yaml entry in place of the
/// file's `cloud` key and `OS_CLOUD`.
pub fn load(
    path: &Path,
    path_is_explicit: bool,
    os_cloud: Option<&str>,
    env: &dyn Environment,
) -> Result<Config, ConfigError> {
    let file = match std::fs::read_to_string(path) {
        Ok(text) => parse(&text).map_err(|e| invalid(format!("{}: {e}", path.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !path_is_explicit => {
            // Only the environment can hold the credentials: say so, not "config.yaml: missing ...".
            return build(FileConfig::default(), None, os_cloud, env).map_err(|e| {
                if !e.missing {
                    return e;
                }
                invalid(format!(
                    "{e}: there is no {} (the default config file) and the OS_* variables do not say it either; \
                     pass -config-path FILE (see config.example.yaml), --os-cloud NAME or source an openrc",
                    path.display()
                ))
            });
        }
        Err(e) => return Err(invalid(format!("cannot read config file {}: {e}", path.display()))),
    };
    build(file, Some(path), os_cloud, env).map_err(|e| invalid(format!("{}: {e}", path.display())))
}

/// Parses and validates config text (no file, no clouds.yaml unless `cloud` is set).
pub fn from_str(text: &str, env: &dyn Environment) -> Result<Config, ConfigError> {
    build(parse(text)?, None, None, env)
}

fn parse(text: &str) -> Result<FileConfig, ConfigError> {
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    serde_saphyr::from_str::<FileConfig>(text).map_err(|e| invalid(yaml_error(&e, text)))
}

/// The first line of a YAML error with the key it concerns, never the source
/// snippet (which could show a secret on a neighbouring line).
fn yaml_error(error: &serde_saphyr::Error, text: &str) -> String {
    let rendered = error.to_string();
    let first = rendered
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("invalid YAML")
        .trim_start_matches("error: ");
    let key = first
        .strip_prefix("line ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|line| line.parse::<usize>().ok())
        .and_then(|line| key_path_at(text, line));
    match key {
        Some(key) => format!("key {key}: {first}"),
        None => first.to_string(),
    }
}

/// The dotted path of the block-style key on 1-based `line` (`migration.retries`).
fn key_path_at(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let key_of = |l: &str| -> Option<(usize, String)> {
        let indent = l.len() - l.trim_start().len();
        let (key, _) = l.trim_start().split_once(':')?;
        let key = key.trim().trim_matches(|c| c == '"' || c == '\'');
        (!key.is_empty() && !key.starts_with('#') && !key.contains(' ')).then(|| (indent, key.to_string()))
    };
    let (mut indent, key) = key_of(lines.get(line.checked_sub(1)?)?)?;
    let mut path = vec![key];
    for l in lines[..line - 1].iter().rev() {
        if let Some((parent_indent, parent)) = key_of(l)
            && parent_indent < indent
        {
            path.push(parent);
            indent = parent_indent;
        }
    }
    path.reverse();
    Some(path.join("."))
}

fn build(
    file: FileConfig,
    path: Option<&Path>,
    os_cloud: Option<&str>,
    env: &dyn Environment,
) -> Result<Config, ConfigError> {
    // Two clouds named on purpose, on the command line and in the file, are a
    // mistake about which cloud to act on: not ours to settle by precedence.
    let named = match (os_cloud, &file.cloud) {
        (Some(flag), Some(theirs)) if flag != theirs => {
            return Err(invalid(format!(
                "--os-cloud {flag} and the config file's cloud {theirs} name different clouds: give one"
            )));
        }
        (Some(name), _) => Some((name.to_string(), "--os-cloud")),
        (None, Some(name)) => Some((name.clone(), "the config file's cloud")),
        (None, None) => env.var("OS_CLOUD").map(|name| (name, "OS_CLOUD")),
    };
    let cloud = match &named {
        Some((name, named_by)) => clouds::read(name, named_by, env)?,
        None => clouds::Entry::default(),
    };
    let file_settings = file_layer(&file);
    let env_settings = env_layer(env);
    let credentials = credentials(&file_settings, &env_settings, &cloud, env)?;
    let mut identity = identify(&credentials, &file_settings, &env_settings, &cloud, path);
    // The file's cloud over a different OS_CLOUD is the same silent case as its other keys.
    if let (None, Some(ours), Some(theirs)) = (os_cloud, &file.cloud, env.var("OS_CLOUD"))
        && *ours != theirs
    {
        identity.overridden.push(format!(
            "the config file's cloud ({ours}) overrides OS_CLOUD ({theirs})"
        ));
    }
    let nova_host = file.nova_host.clone().unwrap_or_else(|| "{node}".to_string());
    validate_template(&nova_host)?;
    let evacuation = settings(&file)?;
    // The CLI's clouds.yaml pin applies unless the file sets ours; its
    // "2" and "2.latest" mean no pin.
    let version = match (&file.compute_api_version, &cloud.compute_api_version) {
        (Some(text), _) => Some(("compute_api_version".to_string(), text.clone())),
        (None, Some((_, text))) if text == "2" || text.ends_with("latest") => None,
        (None, other) => other.clone(),
    };
    let compute_api_version = match version {
        None => None,
        Some((origin, text)) => {
            let version: Microversion = text.parse().map_err(|e| invalid(format!("{origin}: {e}")))?;
            if version < microversion::OLDEST || version > microversion::NEWEST {
                return Err(invalid(format!(
                    "{origin} {version} is outside {} to {}",
                    microversion::OLDEST,
                    microversion::NEWEST
                )));
            }
            Some(version)
        }
    };
    Ok(Config {
        credentials,
        cloud: identity,
        nova_host,
        compute_api_version,
        evacuation,
    })
}

fn validate_template(template: &str) -> Result<(), ConfigError> {
    let rest = template.replace("{node}", "").replace("{short}", "");
    if rest.contains('{') || rest.contains('}') {
        return Err(invalid(format!(
            "nova_host {template:?}: only {{node}} and {{short}} may appear in braces"
        )));
    }
    if template.trim().is_empty() {
        return Err(invalid("nova_host is empty"));
    }
    Ok(())
}

/// A credentials setting as one source wrote it.
#[derive(Clone)]
enum Value {
    Text(String),
    Secret(SecretString),
    Flag(bool),
}

/// A credentials setting and where it was written, so that a message can name it.
#[derive(Clone)]
struct Setting {
    value: Value,
    origin: String,
}

/// One source's credentials settings, keyed by their clouds.yaml names
/// (`auth.` dropped), which every source is translated into.
type Layer = BTreeMap<&'static str, Setting>;

/// Keys the drainer honours, whatever the source.
const HONOURED: &[&str] = &[
    "auth_url",
    "auth_type",
    "username",
    "user_id",
    "password",
    "user_domain_id",
    "user_domain_name",
    "project_id",
    "project_name",
    "project_domain_id",
    "project_domain_name",
    "domain_id",
    "domain_name",
    "default_domain_id",
    "default_domain_name",
    "application_credential_id",
    "application_credential_name",
    "application_credential_secret",
    "region_name",
    "interface",
    "cacert",
    "insecure",
    "identity_api_version",
];

/// Why `auth_type: token` and a token are refused. Keystone's token method
/// issues a token that expires with the one given, so the drainer could not
/// renew it: a drain (or a daemon) would stop mid-way.
const TOKEN_REFUSED: &str = "token authentication is not supported: a token cannot be renewed and a drain can outlive it; use a password or an application credential";

/// Keys the `openstack` CLI accepts for the auth types it shares with the
/// drainer that the drainer cannot honour, each with why: refused by name
/// rather than ignored, so that a run never authenticates as something else
/// than the operator wrote.
const REFUSED: &[(&str, &str)] = &[
    ("token", TOKEN_REFUSED),
    (
        "trust_id",
        "trust-scoped tokens are not supported; use a project in which the drainer's user has the admin role",
    ),
    (
        "system_scope",
        "system-scoped tokens are not supported: listing every project's servers needs a project-scoped admin token",
    ),
    ("passcode", "TOTP (multi-factor) authentication is not supported"),
    ("cert", "TLS client certificates are not supported"),
    ("key", "TLS client certificates are not supported"),
];

/// The `OS_*` variables read, and the key each stands for. Where two stand
/// for one key (an old name beside the new), the first listed wins.
const ENV_VARS: &[(&str, &str)] = &[
    ("OS_AUTH_URL", "auth_url"),
    ("OS_AUTH_TYPE", "auth_type"),
    ("OS_USERNAME", "username"),
    ("OS_USER_NAME", "username"),
    ("OS_USER_ID", "user_id"),
    ("OS_PASSWORD", "password"),
    ("OS_USER_DOMAIN_ID", "user_domain_id"),
    ("OS_USER_DOMAIN_NAME", "user_domain_name"),
    ("OS_PROJECT_ID", "project_id"),
    ("OS_TENANT_ID", "project_id"),
    ("OS_PROJECT_NAME", "project_name"),
    ("OS_TENANT_NAME", "project_name"),
    ("OS_PROJECT_DOMAIN_ID", "project_domain_id"),
    ("OS_PROJECT_DOMAIN_NAME", "project_domain_name"),
    ("OS_DOMAIN_ID", "domain_id"),
    ("OS_DOMAIN_NAME", "domain_name"),
    ("OS_DEFAULT_DOMAIN_ID", "default_domain_id"),
    ("OS_DEFAULT_DOMAIN_NAME", "default_domain_name"),
    ("OS_APPLICATION_CREDENTIAL_ID", "application_credential_id"),
    ("OS_APPLICATION_CREDENTIAL_NAME", "application_credential_name"),
    ("OS_APPLICATION_CREDENTIAL_SECRET", "application_credential_secret"),
    ("OS_REGION_NAME", "region_name"),
    ("OS_INTERFACE", "interface"),
    ("OS_ENDPOINT_TYPE", "interface"),
    ("OS_CACERT", "cacert"),
    ("OS_INSECURE", "insecure"),
    ("OS_IDENTITY_API_VERSION", "identity_api_version"),
    ("OS_TOKEN", "token"),
    ("OS_TRUST_ID", "trust_id"),
    ("OS_SYSTEM_SCOPE", "system_scope"),
    ("OS_PASSCODE", "passcode"),
    ("OS_CERT", "cert"),
    ("OS_KEY", "key"),
];

/// Keys whose values are secrets: kept in a `SecretString` from the moment they are read.
fn is_secret(key: &str) -> bool {
    matches!(key, "password" | "application_credential_secret" | "token")
}

/// The static name of a known key (honoured or refused), `None` for any other.
fn known_key(key: &str) -> Option<&'static str> {
    HONOURED
        .iter()
        .copied()
        .chain(REFUSED.iter().map(|(k, _)| *k))
        .find(|k| *k == key)
}

fn env_layer(env: &dyn Environment) -> Layer {
    let mut layer = Layer::new();
    for (name, key) in ENV_VARS {
        if layer.contains_key(key) {
            continue;
        }
        if let Some(text) = env.var(name) {
            let value = if is_secret(key) {
                Value::Secret(SecretString::from(text))
            } else {
                Value::Text(text)
            };
            layer.insert(
                key,
                Setting {
                    value,
                    origin: (*name).to_string(),
                },
            );
        }
    }
    layer
}

fn file_layer(file: &FileConfig) -> Layer {
    let mut layer = Layer::new();
    let mut put = |key: &'static str, value: Option<Value>| {
        if let Some(value) = value {
            layer.insert(
                key,
                Setting {
                    value,
                    origin: key.to_string(),
                },
            );
        }
    };
    let text = |v: &Option<String>| v.clone().filter(|v| !v.is_empty()).map(Value::Text);
    put("auth_url", text(&file.auth_url));
    put("username", text(&file.username));
    put("user_id", text(&file.user_id));
    put("password", file.password.clone().map(Value::Secret));
    put("project_name", text(&file.project_name));
    put("project_id", text(&file.project_id));
    put("domain_id", text(&file.domain_id));
    put("domain_name", text(&file.domain_name));
    put("user_domain_id", text(&file.user_domain_id));
    put("user_domain_name", text(&file.user_domain_name));
    put("project_domain_id", text(&file.project_domain_id));
    put("project_domain_name", text(&file.project_domain_name));
    put("application_credential_id", text(&file.application_credential_id));
    put("application_credential_name", text(&file.application_credential_name));
    put(
        "application_credential_secret",
        file.application_credential_secret.clone().map(Value::Secret),
    );
    put("region_name", text(&file.region_name));
    put("interface", text(&file.interface));
    put(
        "cacert",
        file.cacert.as_ref().map(|p| Value::Text(p.display().to_string())),
    );
    put("insecure", file.insecure.map(Value::Flag));
    layer
}

/// The credentials settings in force: each key from the first source that
/// has it (the config file, then `OS_*`, then the clouds.yaml entry).
fn merge(layers: &[&Layer]) -> Layer {
    let mut merged = Layer::new();
    for layer in layers.iter().rev() {
        merged.extend(layer.iter().map(|(k, v)| (*k, v.clone())));
    }
    merged
}

fn text_of(settings: &Layer, key: &str) -> Result<Option<String>, ConfigError> {
    match settings.get(key) {
        None => Ok(None),
        Some(Setting {
            value: Value::Text(text),
            ..
        }) => Ok(Some(text.clone())),
        Some(Setting {
            value: Value::Flag(flag),
            ..
        }) => Ok(Some(flag.to_string())),
        Some(Setting { origin, .. }) => Err(invalid(format!("{origin} must be plain text"))),
    }
}

/// A secret key's value (every source reads those into a `SecretString`, see [`is_secret`]).
fn secret_of(settings: &Layer, key: &str) -> Option<SecretString> {
    match &settings.get(key)?.value {
        Value::Secret(secret) => Some(secret.clone()),
        Value::Text(_) | Value::Flag(_) => None,
    }
}

fn origin_of(settings: &Layer, key: &str) -> String {
    settings.get(key).map_or_else(|| key.to_string(), |s| s.origin.clone())
}

/// `true`, `yes`, `1` (any case) or a YAML boolean.
fn flag_of(settings: &Layer, key: &str) -> Option<bool> {
    settings.get(key).map(|s| match &s.value {
        Value::Flag(flag) => *flag,
        Value::Text(text) => matches!(text.to_ascii_lowercase().as_str(), "1" | "true" | "yes"),
        Value::Secret(_) => false,
    })
}

/// The keys of an application credential: any of them, without an
/// `auth_type`, asks for application-credential authentication.
const APPLICATION_CREDENTIAL: &[&str] = &[
    "application_credential_id",
    "application_credential_name",
    "application_credential_secret",
];

/// Which Keystone method the settings ask for.
#[derive(Clone, Copy, PartialEq)]
enum Method {
    Password,
    ApplicationCredential,
}

fn method(settings: &Layer) -> Result<Method, ConfigError> {
    let Some(auth_type) = text_of(settings, "auth_type")? else {
        return Ok(if APPLICATION_CREDENTIAL.iter().any(|k| settings.contains_key(k)) {
            Method::ApplicationCredential
        } else {
            Method::Password
        });
    };
    match auth_type.as_str() {
        "password" | "v3password" => Ok(Method::Password),
        "v3applicationcredential" | "applicationcredential" => Ok(Method::ApplicationCredential),
        "token" | "v3token" => Err(invalid(format!(
            "{} {auth_type}: {}",
            origin_of(settings, "auth_type"),
            TOKEN_REFUSED
        ))),
        other => Err(invalid(format!(
            "{} {other:?} is not supported: use password, v3password or v3applicationcredential",
            origin_of(settings, "auth_type")
        ))),
    }
}

/// Whom the credentials name, from which sources, and where the config file
/// overrides different `OS_*` values (the silent case that drains the wrong cloud).
fn identify(
    credentials: &Credentials,
    file: &Layer,
    env: &Layer,
    cloud: &clouds::Entry,
    path: Option<&Path>,
) -> CloudIdentity {
    let mut sources = Vec::new();
    if !file.is_empty() {
        sources.push(path.map_or_else(|| "config text".to_string(), |p| format!("config file {}", p.display())));
    }
    // Only the variables that are in force: the file's settings win over them.
    let mut from_env: Vec<&str> = env
        .iter()
        .filter(|(key, _)| !file.contains_key(*key))
        .map(|(_, setting)| setting.origin.as_str())
        .collect();
    from_env.sort_unstable();
    if !from_env.is_empty() {
        sources.push(format!("environment ({})", from_env.join(", ")));
    }
    if let Some(source) = cloud.source.as_ref().filter(|_| {
        cloud
            .settings
            .keys()
            .any(|key| !file.contains_key(key) && !env.contains_key(key))
    }) {
        sources.push(source.clone());
    }
    let overridden = file
        .iter()
        .filter_map(|(key, ours)| {
            let theirs = env.get(key)?;
            let differ = match (&ours.value, &theirs.value) {
                (Value::Text(a), Value::Text(b)) => a != b,
                (Value::Secret(a), Value::Secret(b)) => a.expose_secret() != b.expose_secret(),
                (Value::Flag(a), Value::Flag(b)) => a != b,
                _ => true,
            };
            let shown = |value: &Value| match value {
                Value::Text(text) => format!(" ({text})"),
                Value::Flag(flag) => format!(" ({flag})"),
                Value::Secret(_) => String::new(),
            };
            differ.then(|| {
                format!(
                    "the config file's {key}{} overrides {}{}",
                    shown(&ours.value),
                    theirs.origin,
                    shown(&theirs.value)
                )
            })
        })
        .collect();
    let c = credentials;
    let project = c.project_name.clone().or_else(|| c.project_id.clone());
    let user = c.username.clone().or_else(|| c.user_id.clone()).or_else(|| {
        c.application_credential_id
            .clone()
            .or_else(|| c.application_credential_name.clone())
            .map(|id| format!("application credential {id}"))
    });
    CloudIdentity {
        auth_url: c.auth_url.clone(),
        region: c.region_name.clone(),
        project,
        user,
        sources,
        overridden,
    }
}

fn credentials(
    file: &Layer,
    from_env: &Layer,
    cloud: &clouds::Entry,
    env: &dyn Environment,
) -> Result<Credentials, ConfigError> {
    let settings = merge(&[file, from_env, &cloud.settings]);
    for (key, why) in REFUSED {
        if let Some(setting) = settings.get(key) {
            return Err(invalid(format!("{}: {why}", setting.origin)));
        }
    }
    let method = method(&settings)?;
    // Keys that belong to the other method are refused, not dropped: with
    // both a password and an application credential, which one the
    // operator meant is not ours to guess.
    let foreign: &[&str] = match method {
        Method::Password => APPLICATION_CREDENTIAL,
        // An application credential carries its own project: Keystone
        // refuses a token request that also names one.
        Method::ApplicationCredential => &["password", "project_id", "project_name"],
    };
    if let Some(key) = foreign.iter().find(|k| settings.contains_key(*k)) {
        let what = match method {
            Method::Password => "password authentication",
            Method::ApplicationCredential => "application-credential authentication",
        };
        // What chose the method: auth_type, else the application credential's own keys.
        let chosen_by = ["auth_type"]
            .iter()
            .chain(APPLICATION_CREDENTIAL)
            .find_map(|k| settings.get(k))
            .map_or_else(String::new, |s| format!(" (chosen by {})", s.origin));
        return Err(invalid(format!(
            "{} does not go with {what}{chosen_by}: leave one of them out",
            origin_of(&settings, key)
        )));
    }
    if let Some(version) = text_of(&settings, "identity_api_version")?
        && !(version == "3" || version.starts_with("3."))
    {
        return Err(invalid(format!(
            "{} {version}: the drainer speaks Keystone v3 only",
            origin_of(&settings, "identity_api_version")
        )));
    }

    let text = |key: &str| text_of(&settings, key);
    let mut c = Credentials {
        auth_url: text("auth_url")?.ok_or_else(|| {
            missing("missing auth_url (IdentityEndpoint in the old tool's format; OS_AUTH_URL in the environment)")
        })?,
        username: text("username")?,
        user_id: text("user_id")?,
        password: secret_of(&settings, "password"),
        user_domain_id: text("user_domain_id")?,
        user_domain_name: text("user_domain_name")?,
        project_id: text("project_id")?,
        project_name: text("project_name")?,
        project_domain_id: text("project_domain_id")?,
        project_domain_name: text("project_domain_name")?,
        application_credential_id: text("application_credential_id")?,
        application_credential_name: text("application_credential_name")?,
        application_credential_secret: secret_of(&settings, "application_credential_secret"),
        region_name: text("region_name")?,
        interface: "public".to_string(),
        cacert: None,
        insecure: flag_of(&settings, "insecure").unwrap_or(false),
    };
    // As openstacksdk reads them: `domain_*` (the old tool's DomainID) names
    // both the user's and the project's domain, and keystoneauth's
    // `default_domain_*` stands in for whichever of them is not given.
    for fallback in ["domain", "default_domain"] {
        if let Some(id) = text(&format!("{fallback}_id"))? {
            c.user_domain_id.get_or_insert_with(|| id.clone());
            c.project_domain_id.get_or_insert(id);
        }
        if let Some(name) = text(&format!("{fallback}_name"))? {
            c.user_domain_name.get_or_insert_with(|| name.clone());
            c.project_domain_name.get_or_insert(name);
        }
    }
    // `publicURL` and the like are the v2 catalog's names, still common in openrc files.
    if let Some(interface) = text("interface")? {
        c.interface = interface.trim_end_matches("URL").to_ascii_lowercase();
    }
    // openstacksdk expands `~` in cacert; insecure wins over it.
    if let Some(cacert) = text("cacert")?.filter(|_| !c.insecure) {
        c.cacert = Some(match (cacert.strip_prefix("~/"), env.var("HOME")) {
            (Some(rest), Some(home)) => Path::new(&home).join(rest),
            _ => PathBuf::from(cacert),
        });
    }

    let url = url::Url::parse(&c.auth_url).map_err(|e| invalid(format!("auth_url {:?}: {e}", c.auth_url)))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(format!(
            "auth_url {:?} must be an http or https URL",
            c.auth_url
        )));
    }
    if let Some(region) = &c.region_name
        && !cloud.regions.is_empty()
        && !cloud.regions.contains(region)
    {
        return Err(invalid(format!(
            "{} {region:?} is not a region of the cloud (it lists {:?})",
            origin_of(&settings, "region_name"),
            cloud.regions
        )));
    }
    if !matches!(c.interface.as_str(), "public" | "internal" | "admin") {
        return Err(invalid(format!(
            "{} {:?} must be public, internal or admin",
            origin_of(&settings, "interface"),
            c.interface
        )));
    }
    if let Some(cacert) = &c.cacert
        && let Err(e) = std::fs::metadata(cacert)
    {
        return Err(invalid(format!("cacert {}: {e}", cacert.display())));
    }

    match method {
        Method::ApplicationCredential => {
            let Some(secret) = &c.application_credential_secret else {
                return Err(missing(
                    "missing application_credential_secret (OS_APPLICATION_CREDENTIAL_SECRET)",
                ));
            };
            if secret.expose_secret().is_empty() {
                return Err(invalid("application_credential_secret is empty"));
            }
            if c.application_credential_id.is_none() {
                if c.application_credential_name.is_none() {
                    return Err(invalid(
                        "application credentials need application_credential_id (or application_credential_name with user_id or username)",
                    ));
                }
                if c.user_id.is_none() && c.username.is_none() {
                    return Err(invalid("application_credential_name needs user_id or username"));
                }
            }
        }
        Method::Password => {
            if c.username.is_none() && c.user_id.is_none() {
                return Err(missing(
                    "missing username (Username in the old tool's format; OS_USERNAME)",
                ));
            }
            match &c.password {
                None => {
                    return Err(missing(
                        "missing password (Password in the old tool's format; OS_PASSWORD)",
                    ));
                }
                Some(p) if p.expose_secret().is_empty() => return Err(invalid("password is empty")),
                Some(_) => {}
            }
            if c.project_name.is_none() && c.project_id.is_none() {
                return Err(missing(
                    "missing project: set project_name (TenantName in the old tool's format) or project_id; listing every project's servers needs an admin project-scoped token",
                ));
            }
        }
    }
    Ok(c)
}

fn seconds(key: &str, value: Option<f64>, default: f64, min: f64) -> Result<Duration, ConfigError> {
    let value = value.unwrap_or(default);
    if !value.is_finite() || value < min || value > 7.0 * 24.0 * 3600.0 {
        return Err(invalid(format!(
            "{key} must be a number of seconds from {min} to 604800, got {value}"
        )));
    }
    Ok(Duration::from_secs_f64(value))
}

fn settings(file: &FileConfig) -> Result<Settings, ConfigError> {
    let defaults = Settings::default();
    let m = &file.migration;
    let max_parallel = m.max_parallel.unwrap_or(1);
    if !(1..=64).contains(&max_parallel) {
        return Err(invalid(format!(
            "migration.max_parallel must be 1 to 64, got {max_parallel}"
        )));
    }
    let queue_ahead = m.queue_ahead.unwrap_or(defaults.queue_ahead as u32);
    if queue_ahead > 64 {
        return Err(invalid(format!(
            "migration.queue_ahead must be 0 to 64, got {queue_ahead}"
        )));
    }
    let budget = match m.budget_seconds {
        Some(fixed) => Budget::Fixed(seconds("migration.budget_seconds", Some(fixed), 0.0, 0.1)?),
        None => Budget::Scaled {
            minimum: seconds("migration.budget_minimum_seconds", m.budget_minimum_seconds, 150.0, 0.1)?,
            per_gib: seconds("migration.budget_seconds_per_gib", m.budget_seconds_per_gib, 150.0, 0.0)?,
        },
    };
    let stall = seconds("migration.stall_seconds", m.stall_seconds, 150.0, 0.0)?;
    let retries = m.retries.unwrap_or(defaults.retries);
    if retries > 20 {
        return Err(invalid(format!("migration.retries must be 0 to 20, got {retries}")));
    }
    let timeout = match file.timeout_minutes {
        None => defaults.timeout,
        Some(minutes) if minutes.is_finite() && minutes > 0.0 && minutes <= 7.0 * 24.0 * 60.0 => {
            Some(Duration::from_secs_f64(minutes * 60.0))
        }
        Some(minutes) => {
            return Err(invalid(format!(
                "timeout_minutes must be above 0 and at most a week, got {minutes}"
            )));
        }
    };
    let mut state_policy = StatePolicy::default();
    for (status, action) in &file.state_policy {
        state_policy
            .set(status, *action)
            .map_err(|e| invalid(format!("state_policy.{status}: {e}")))?;
    }
    let node_default = file
        .node_default_action
        .as_deref()
        .map(str::parse::<VmPolicy>)
        .transpose()
        .map_err(|e| invalid(format!("node_default_action: {e}")))?;
    Ok(Settings {
        max_parallel: max_parallel as usize,
        queue_ahead: queue_ahead as usize,
        budget,
        stall_after: (!stall.is_zero()).then_some(stall),
        on_budget_exceeded: m.on_budget_exceeded.unwrap_or(defaults.on_budget_exceeded),
        retries,
        retry_backoff: seconds("migration.retry_backoff_seconds", m.retry_backoff_seconds, 10.0, 0.0)?,
        poll_interval: seconds("migration.poll_interval_seconds", m.poll_interval_seconds, 0.5, 0.1)?,
        timeout,
        state_policy,
        node_default,
        check_capacity: true,
        evacuating_elsewhere: Vec::new(),
        disable_first: false,
        destination: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct FakeEnv(HashMap<&'static str, &'static str>);

    impl Environment for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| v.to_string())
        }
    }

    fn no_env() -> FakeEnv {
        FakeEnv(HashMap::new())
    }

    const OLD_TOOL: &str = "IdentityEndpoint: http://keystone:5000/v3\nUsername: admin\nPassword: s3cret\nTenantName: admin\nDomainID: default\n";

    #[test]
    fn old_tool_keys_work_unchanged() {
        let config = from_str(OLD_TOOL, &no_env()).unwrap();
        let c = &config.credentials;
        assert_eq!(c.auth_url, "http://keystone:5000/v3");
        assert_eq!(c.username.as_deref(), Some("admin"));
        assert_eq!(c.project_name.as_deref(), Some("admin"));
        assert_eq!(c.user_domain_id.as_deref(), Some("default"));
        assert_eq!(c.project_domain_id.as_deref(), Some("default"));
        assert_eq!(c.password.as_ref().unwrap().expose_secret(), "s3cret");
        assert_eq!(config.evacuation, Settings::default());
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let config = from_str(OLD_TOOL, &no_env()).unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("REDACTED"), "{debug}");
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_key() {
        let unknown = from_str(&format!("{OLD_TOOL}Pasword: x\n"), &no_env())
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("Pasword"), "{unknown}");
        let nested = from_str(&format!("{OLD_TOOL}migration:\n  max_paralel: 2\n"), &no_env())
            .unwrap_err()
            .to_string();
        assert!(nested.contains("max_paralel"), "{nested}");
        let wrong_type = from_str(&format!("{OLD_TOOL}migration:\n  retries: many\n"), &no_env())
            .unwrap_err()
            .to_string();
        assert!(wrong_type.contains("key migration.retries"), "{wrong_type}");
        assert!(!wrong_type.contains("s3cret"), "{wrong_type}");
    }

    #[test]
    fn type_errors_do_not_echo_secrets() {
        let text = "IdentityEndpoint: http://k/v3\nUsername: admin\nPassword: [hunter2]\nTenantName: admin\n";
        let error = from_str(text, &no_env()).unwrap_err().to_string();
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn missing_credentials_name_the_key() {
        let error = from_str("Username: admin\nPassword: x\nTenantName: a\n", &no_env()).unwrap_err();
        assert!(error.to_string().contains("IdentityEndpoint"), "{error}");
        let error = from_str(
            "IdentityEndpoint: http://k/v3\nUsername: admin\nTenantName: a\n",
            &no_env(),
        )
        .unwrap_err();
        assert!(error.to_string().contains("password"), "{error}");
        let error = from_str(
            "IdentityEndpoint: http://k/v3\nUsername: a\nPassword: ''\nTenantName: a\n",
            &no_env(),
        )
        .unwrap_err();
        assert!(error.to_string().contains("password is empty"), "{error}");
        let error = from_str("IdentityEndpoint: http://k/v3\nUsername: a\nPassword: p\n", &no_env()).unwrap_err();
        assert!(error.to_string().contains("project"), "{error}");
    }

    #[test]
    fn the_cloud_acted_on_is_named_with_its_sources_and_the_files_overrides() {
        let env = FakeEnv(HashMap::from([
            ("OS_AUTH_URL", "https://other-cloud:5000/v3"),
            ("OS_PASSWORD", "wrong"),
            ("OS_REGION_NAME", "RegionTwo"),
        ]));
        let path = Path::new("/work/config.yaml");
        let file = parse(OLD_TOOL).unwrap();
        let config = build(file, Some(path), None, &env).unwrap();
        let cloud = &config.cloud;
        assert_eq!(cloud.auth_url, "http://keystone:5000/v3");
        assert_eq!(
            (cloud.project.as_deref(), cloud.user.as_deref(), cloud.region.as_deref()),
            (Some("admin"), Some("admin"), Some("RegionTwo"))
        );
        assert_eq!(
            cloud.sources,
            ["config file /work/config.yaml", "environment (OS_REGION_NAME)"]
        );
        assert_eq!(
            cloud.overridden,
            [
                "the config file's auth_url (http://keystone:5000/v3) overrides OS_AUTH_URL (https://other-cloud:5000/v3)",
                "the config file's password overrides OS_PASSWORD",
            ]
        );
        assert!(!format!("{cloud} {cloud:?}").contains("s3cret") && !format!("{cloud:?}").contains("wrong"));
        assert_eq!(
            cloud.to_string(),
            "http://keystone:5000/v3 region RegionTwo project admin user admin (from config file /work/config.yaml, \
             environment (OS_REGION_NAME))"
        );

        let same = FakeEnv(HashMap::from([("OS_AUTH_URL", "http://keystone:5000/v3")]));
        let config = build(parse(OLD_TOOL).unwrap(), Some(path), None, &same).unwrap();
        assert!(config.cloud.overridden.is_empty(), "the same value overrides nothing");
        assert_eq!(config.cloud.sources, ["config file /work/config.yaml"]);
    }

    #[test]
    fn environment_fills_what_the_file_leaves_out() {
        let env = FakeEnv(HashMap::from([
            ("OS_AUTH_URL", "https://keystone.example:5000/v3"),
            ("OS_USERNAME", "ops"),
            ("OS_PASSWORD", "pw"),
            ("OS_PROJECT_NAME", "admin"),
            ("OS_USER_DOMAIN_NAME", "Default"),
            ("OS_INTERFACE", "internal"),
            ("OS_REGION_NAME", "RegionTwo"),
        ]));
        let config = from_str("Username: admin\n", &env).unwrap();
        let c = &config.credentials;
        assert_eq!(
            c.username.as_deref(),
            Some("admin"),
            "the file wins over the environment"
        );
        assert_eq!(c.auth_url, "https://keystone.example:5000/v3");
        assert_eq!(c.interface, "internal");
        assert_eq!(c.region_name.as_deref(), Some("RegionTwo"));
        assert_eq!(c.user_domain_name.as_deref(), Some("Default"));
    }

    #[test]
    fn application_credentials_need_no_project() {
        let text = "auth_url: http://k/v3\napplication_credential_id: abc\napplication_credential_secret: xyz\n";
        let config = from_str(text, &no_env()).unwrap();
        assert_eq!(config.credentials.application_credential_id.as_deref(), Some("abc"));
        let missing = from_str("auth_url: http://k/v3\napplication_credential_id: abc\n", &no_env()).unwrap_err();
        assert!(missing.to_string().contains("application_credential_secret"));
    }

    #[test]
    fn a_password_and_an_application_credential_together_are_refused() {
        let env = FakeEnv(HashMap::from([("OS_APPLICATION_CREDENTIAL_SECRET", "xyz")]));
        let error = from_str(OLD_TOOL, &env).unwrap_err().to_string();
        assert!(
            error.contains("password does not go with application-credential"),
            "{error}"
        );
        let error = from_str(&format!("{OLD_TOOL}application_credential_id: abc\n"), &no_env())
            .unwrap_err()
            .to_string();
        assert!(error.contains("application_credential_id"), "{error}");
        let env = FakeEnv(HashMap::from([("OS_TRUST_ID", "51d2")]));
        let error = from_str(OLD_TOOL, &env).unwrap_err().to_string();
        assert!(error.starts_with("OS_TRUST_ID: trust-scoped"), "{error}");
    }

    /// The clouds.yaml named by OS_CLIENT_CONFIG_FILE, as in openstacksdk.
    struct CloudsEnv(PathBuf);

    impl Environment for CloudsEnv {
        fn var(&self, name: &str) -> Option<String> {
            match name {
                "OS_CLIENT_CONFIG_FILE" => Some(self.0.display().to_string()),
                "OS_CLOUD" => Some("lab".into()),
                _ => None,
            }
        }

        fn current_dir(&self) -> Option<PathBuf> {
            None
        }
    }

    fn with_cloud(name: &str, entry: &str) -> Result<Config, ConfigError> {
        let path = std::env::temp_dir().join(format!("drainer-config-{}-{name}.yaml", std::process::id()));
        let auth = "    auth:\n      auth_url: http://k/v3\n      application_credential_id: a\n      application_credential_secret: s\n";
        std::fs::write(&path, format!("clouds:\n  lab:\n{auth}{entry}")).expect("write clouds.yaml");
        let config = from_str("", &CloudsEnv(path.clone()));
        std::fs::remove_file(&path).expect("remove clouds.yaml");
        config
    }

    #[test]
    fn the_clouds_compute_api_version_caps_ours_and_verify_must_be_a_flag() {
        let pinned = with_cloud("pin", "    compute_api_version: '2.60'\n").expect("valid");
        assert_eq!(pinned.compute_api_version, Some(Microversion(2, 60)));
        let unpinned = with_cloud("latest", "    compute_api_version: 2.latest\n").expect("valid");
        assert_eq!(unpinned.compute_api_version, None);
        let error = with_cloud("high", "    compute_api_version: '3.1'\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("cloud \"lab\" compute_api_version"), "{error}");
        let error = with_cloud("verify", "    verify: /etc/ssl/ca.pem\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("verify must be true or false"), "{error}");
        let insecure = with_cloud("insecure", "    verify: false\n").expect("valid");
        assert!(insecure.credentials.insecure);
    }

    /// An environment with a home of its own and the variables given.
    struct HomeEnv {
        vars: HashMap<&'static str, String>,
        dir: PathBuf,
    }

    impl Environment for HomeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.vars.get(name).cloned()
        }

        fn current_dir(&self) -> Option<PathBuf> {
            Some(self.dir.clone())
        }
    }

    fn home_env(case: &str, vars: &[(&'static str, &str)]) -> HomeEnv {
        let dir = std::env::temp_dir().join(format!("drainer-home-{}-{case}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut vars: HashMap<&'static str, String> = vars.iter().map(|(k, v)| (*k, v.to_string())).collect();
        vars.insert("HOME", dir.join("home").display().to_string());
        HomeEnv { vars, dir }
    }

    #[test]
    fn a_cloud_not_found_says_where_clouds_yaml_was_looked_for_in_openstacksdks_order() {
        let env = home_env(
            "nope",
            &[("OS_CLOUD", "nope"), ("OS_CLIENT_CONFIG_FILE", "/nonexistent/c.yaml")],
        );
        let home = env.dir.join("home");
        let error = load(&env.dir.join("config.yaml"), false, None, &env)
            .unwrap_err()
            .to_string();
        let order = [
            "OS_CLOUD nope",
            "OS_CLIENT_CONFIG_FILE /nonexistent/c.yaml (absent)",
            "clouds.yaml, clouds.yml, clouds.json in",
            &format!("{}, ", env.dir.display()),
            &format!("{}/.config/openstack, ", home.display()),
            "/etc/xdg/openstack, /etc/openstack",
        ];
        let mut at = 0;
        for part in order {
            let found = error[at..].find(part);
            assert!(found.is_some(), "{part:?} after byte {at} in {error}");
            at += found.unwrap_or(0) + part.len();
        }
        assert!(
            !error.contains("default config file"),
            "no config file is not why: {error}"
        );

        // --os-cloud says the same, naming itself, and takes the place of OS_CLOUD.
        let error = load(&env.dir.join("config.yaml"), false, Some("other"), &env)
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("--os-cloud other"), "{error}");

        // XDG_CONFIG_HOME comes before ~/.config, as appdirs puts it.
        let env = home_env("xdg", &[("OS_CLOUD", "nope"), ("XDG_CONFIG_HOME", "/x/config")]);
        let error = from_str("", &env).unwrap_err().to_string();
        let home = format!("{}/.config/openstack", env.dir.join("home").display());
        let (xdg, home) = (error.find("/x/config/openstack"), error.find(&home));
        assert!(xdg.is_some() && home.is_some() && xdg < home, "{error}");
    }

    #[test]
    fn a_cloud_missing_from_the_clouds_yaml_found_names_that_file() {
        let env = home_env("missing", &[]);
        let clouds = env.dir.join("clouds.yaml");
        std::fs::write(&clouds, "clouds:\n  lab:\n    auth:\n      auth_url: http://k/v3\n").expect("clouds.yaml");
        let error = load(&env.dir.join("config.yaml"), false, Some("prod"), &env)
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with(&format!(
                "--os-cloud prod is not in {} (it has [\"lab\"])",
                clouds.display()
            )),
            "{error}"
        );
        assert!(error.contains("openstacksdk reads only that one"), "{error}");
    }

    #[test]
    fn os_cloud_picks_the_entry_over_os_cloud_and_refuses_another_in_the_file() {
        let env = home_env("pick", &[("OS_CLOUD", "lab")]);
        let entry = |url: &str| {
            format!(
                "    auth:\n      auth_url: {url}\n      application_credential_id: a\n      application_credential_secret: s\n"
            )
        };
        let text = format!(
            "clouds:\n  lab:\n{}  prod:\n{}",
            entry("http://lab/v3"),
            entry("http://prod/v3")
        );
        std::fs::write(env.dir.join("clouds.yaml"), text).expect("clouds.yaml");
        let no_file = env.dir.join("config.yaml");
        let lab = load(&no_file, false, None, &env).expect("OS_CLOUD");
        assert_eq!(lab.credentials.auth_url, "http://lab/v3");
        let prod = load(&no_file, false, Some("prod"), &env).expect("--os-cloud");
        assert_eq!(prod.credentials.auth_url, "http://prod/v3");
        assert!(
            prod.cloud.sources[0].starts_with("clouds.yaml entry prod"),
            "{:?}",
            prod.cloud.sources
        );

        let file = env.dir.join("drainer.yaml");
        std::fs::write(&file, "cloud: lab\n").expect("config");
        let same = load(&file, true, Some("lab"), &env).expect("the same cloud twice");
        assert_eq!(same.credentials.auth_url, "http://lab/v3");
        let same = load(&file, true, None, &env).expect("the file's cloud");
        assert!(same.cloud.overridden.is_empty(), "OS_CLOUD names the same");
        let mut other = HomeEnv {
            vars: env.vars.clone(),
            dir: env.dir.clone(),
        };
        other.vars.insert("OS_CLOUD", "prod".into());
        let file_wins = load(&file, true, None, &other).expect("the file's cloud");
        assert_eq!(file_wins.credentials.auth_url, "http://lab/v3");
        assert_eq!(
            file_wins.cloud.overridden,
            ["the config file's cloud (lab) overrides OS_CLOUD (prod)"]
        );
        let error = load(&file, true, Some("prod"), &env).unwrap_err().to_string();
        assert!(
            error.contains("--os-cloud prod and the config file's cloud lab name different clouds"),
            "{error}"
        );
    }

    #[test]
    fn migration_settings_and_policy() {
        let text = format!(
            "{OLD_TOOL}timeout_minutes: 5\nmigration:\n  max_parallel: 3\n  budget_seconds: 20\n  stall_seconds: 0\n  on_budget_exceeded: force-complete\n  retries: 1\nstate_policy:\n  SHUTOFF: skip\n  suspended: skip\n"
        );
        let settings = from_str(&text, &no_env()).unwrap().evacuation;
        assert_eq!(settings.max_parallel, 3);
        assert_eq!(settings.budget, Budget::Fixed(Duration::from_secs(20)));
        assert_eq!(settings.stall_after, None);
        assert_eq!(settings.on_budget_exceeded, BudgetAction::ForceComplete);
        assert_eq!(settings.retries, 1);
        assert_eq!(settings.timeout, Some(Duration::from_secs(300)));
        assert_eq!(settings.state_policy.action_for("SHUTOFF"), Action::Skip);
        let bad = from_str(
            &format!("{OLD_TOOL}state_policy:\n  SUSPENDED: live-migrate\n"),
            &no_env(),
        )
        .unwrap_err();
        assert!(bad.to_string().contains("state_policy.SUSPENDED"), "{bad}");
        let bad = from_str(&format!("{OLD_TOOL}migration:\n  max_parallel: 0\n"), &no_env()).unwrap_err();
        assert!(bad.to_string().contains("migration.max_parallel"), "{bad}");
        let off = from_str(&format!("{OLD_TOOL}migration:\n  queue_ahead: 0\n"), &no_env()).expect("valid");
        assert_eq!(off.evacuation.queue_ahead, 0);
        let bad = from_str(&format!("{OLD_TOOL}migration:\n  queue_ahead: 65\n"), &no_env()).unwrap_err();
        assert!(bad.to_string().contains("migration.queue_ahead"), "{bad}");
    }

    #[test]
    fn nova_host_mapping() {
        let mut config = from_str(OLD_TOOL, &no_env()).unwrap();
        assert_eq!(config.nova_host_for("compute-1.example.org"), "compute-1.example.org");
        config.nova_host = "{short}".into();
        assert_eq!(config.nova_host_for("compute-1.example.org"), "compute-1");
        config.nova_host = "{short}-kvm".into();
        assert_eq!(config.nova_host_for("compute-1"), "compute-1-kvm");
        let pinned = from_str(&format!("{OLD_TOOL}compute_api_version: '2.52'\n"), &no_env()).unwrap();
        assert_eq!(pinned.compute_api_version, Some(Microversion(2, 52)));
        assert!(from_str(&format!("{OLD_TOOL}compute_api_version: '3.0'\n"), &no_env()).is_err());
        assert!(from_str(&format!("{OLD_TOOL}nova_host: '{{host}}'\n"), &no_env()).is_err());
    }

    #[test]
    fn the_example_config_is_valid_and_matches_the_defaults() {
        let config = from_str(include_str!("../config.example.yaml"), &no_env()).unwrap();
        let defaults = Settings::default();
        for status in ["ACTIVE", "PAUSED", "SHUTOFF", "SUSPENDED", "ERROR", "RESCUE"] {
            assert_eq!(
                config.evacuation.state_policy.action_for(status),
                defaults.state_policy.action_for(status)
            );
        }
        let settings = Settings {
            state_policy: defaults.state_policy.clone(),
            ..config.evacuation
        };
        assert_eq!(settings, defaults);
        assert_eq!(config.nova_host, "{node}");
    }

    /// Records the field names (aliases included) a derived `Deserialize`
    /// asks for: the keys the parser accepts, straight from the parser.
    struct FieldNames(&'static [&'static str]);

    impl<'de> serde::Deserializer<'de> for &mut FieldNames {
        type Error = serde::de::value::Error;

        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            self.0 = fields;
            Err(serde::de::Error::custom("fields recorded"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }

    fn accepted_keys<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
        let mut names = FieldNames(&[]);
        let _ = T::deserialize(&mut names);
        names.0
    }

    #[test]
    fn the_example_config_shows_every_key_the_parser_accepts() {
        let example = include_str!("../config.example.yaml");
        // A key is shown where a line, commented out or not, starts with it at its indent.
        let shown = |key: &str, indent: &str| {
            example.lines().any(|line| {
                let text = line.trim_start_matches(' ');
                let text = text.strip_prefix("# ").unwrap_or(text);
                let line = format!("{}{text}", &line[..line.len() - line.trim_start_matches(' ').len()]);
                line.strip_prefix(indent)
                    .and_then(|rest| rest.strip_prefix(key))
                    .is_some_and(|rest| rest.starts_with(':'))
            })
        };
        let top = accepted_keys::<FileConfig>();
        for old in ["IdentityEndpoint", "Username", "UserID", "TenantID", "DomainName"] {
            assert!(top.contains(&old), "aliases are among the accepted keys: {top:?}");
        }
        let missing: Vec<&str> = top.iter().copied().filter(|key| !shown(key, "")).collect();
        assert!(missing.is_empty(), "config.example.yaml does not show {missing:?}");
        let migration = accepted_keys::<MigrationSection>();
        assert!(migration.contains(&"max_parallel"), "{migration:?}");
        let missing: Vec<&str> = migration.iter().copied().filter(|key| !shown(key, "  ")).collect();
        assert!(
            missing.is_empty(),
            "config.example.yaml's migration does not show {missing:?}"
        );
        for status in ["ACTIVE", "PAUSED", "SHUTOFF", "SUSPENDED", "ERROR"] {
            assert!(shown(status, "  "), "state_policy {status}");
        }
    }

    #[test]
    fn node_default_action_is_one_of_the_tag_words() {
        let config = from_str(&format!("{OLD_TOOL}node_default_action: leave\n"), &no_env()).unwrap();
        assert_eq!(config.evacuation.node_default, Some(VmPolicy::Leave));
        let bad = from_str(&format!("{OLD_TOOL}node_default_action: park\n"), &no_env())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(bad.contains("node_default_action: unknown VM action \"park\""), "{bad}");
        assert!(!bad.contains('\n'), "one line: {bad}");
        let stop_by_state = from_str(&format!("{OLD_TOOL}state_policy:\n  ACTIVE: stop\n"), &no_env());
        assert!(stop_by_state.is_err(), "stop is chosen per VM or per node");
    }

    #[test]
    fn malformed_yaml_is_a_clear_error() {
        let error = from_str("IdentityEndpoint: [unclosed\n", &no_env())
            .unwrap_err()
            .to_string();
        assert!(!error.is_empty());
        assert!(!error.contains('\n'), "one line: {error}");
    }
}
