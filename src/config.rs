//! One validated configuration from the config file, `clouds.yaml` and the
//! `OS_*` environment. Every problem is reported naming the key, before any
//! request is made.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::evacuation::{Action, Budget, BudgetAction, Settings, StatePolicy};
use crate::nova::microversion::{self, Microversion};

/// A value that must never be printed: Debug and Display show `<redacted>`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A configuration problem: the message names the key and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

fn invalid(message: impl Into<String>) -> ConfigError {
    ConfigError(message.into())
}

/// Keystone credentials and how to reach the cloud.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Credentials {
    pub auth_url: String,
    pub username: Option<String>,
    pub user_id: Option<String>,
    pub password: Option<Secret<String>>,
    pub user_domain_id: Option<String>,
    pub user_domain_name: Option<String>,
    pub project_id: Option<String>,
    pub project_name: Option<String>,
    pub project_domain_id: Option<String>,
    pub project_domain_name: Option<String>,
    pub application_credential_id: Option<String>,
    pub application_credential_name: Option<String>,
    pub application_credential_secret: Option<Secret<String>>,
    pub region_name: Option<String>,
    /// Catalog interface: public, internal or admin.
    pub interface: String,
    pub cacert: Option<PathBuf>,
    pub insecure: bool,
}

/// Everything the drainer runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub credentials: Credentials,
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
    password: Option<Secret<String>>,
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
    application_credential_secret: Option<Secret<String>>,
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
pub fn load(path: &Path, path_is_explicit: bool, env: &dyn Environment) -> Result<Config, ConfigError> {
    let file = match std::fs::read_to_string(path) {
        Ok(text) => parse(&text).map_err(|e| invalid(format!("{}: {e}", path.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !path_is_explicit => {
            // Only the environment can hold the credentials: say so, not "config.yaml: missing ...".
            return build(FileConfig::default(), env).map_err(|e| {
                invalid(format!(
                    "{e}: there is no {} (the default config file) and the OS_* variables do not say it either; \
                     pass -config-path FILE (see config.example.yaml) or source an openrc",
                    path.display()
                ))
            });
        }
        Err(e) => return Err(invalid(format!("cannot read config file {}: {e}", path.display()))),
    };
    build(file, env).map_err(|e| invalid(format!("{}: {e}", path.display())))
}

/// Parses and validates config text (no file, no clouds.yaml unless `cloud` is set).
pub fn from_str(text: &str, env: &dyn Environment) -> Result<Config, ConfigError> {
    build(parse(text)?, env)
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

fn build(file: FileConfig, env: &dyn Environment) -> Result<Config, ConfigError> {
    let credentials = credentials(&file, env)?;
    let nova_host = file.nova_host.clone().unwrap_or_else(|| "{node}".to_string());
    validate_template(&nova_host)?;
    let evacuation = settings(&file)?;
    let compute_api_version = match &file.compute_api_version {
        None => None,
        Some(text) => {
            let version: Microversion = text.parse().map_err(|e| invalid(format!("compute_api_version: {e}")))?;
            if version < microversion::OLDEST || version > microversion::NEWEST {
                return Err(invalid(format!(
                    "compute_api_version {version} is outside {} to {}",
                    microversion::OLDEST,
                    microversion::NEWEST
                )));
            }
            Some(version)
        }
    };
    Ok(Config {
        credentials,
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

fn credentials(file: &FileConfig, env: &dyn Environment) -> Result<Credentials, ConfigError> {
    let mut c = Credentials {
        interface: "public".to_string(),
        ..Credentials::default()
    };
    let mut auth_url = None;
    let mut insecure = None;
    if let Some(cloud) = file.cloud.clone().or_else(|| env.var("OS_CLOUD")) {
        apply_cloud(&cloud, &mut c, &mut auth_url, &mut insecure)?;
    }

    let env_string = |name: &str| env.var(name);
    let overlay = |slot: &mut Option<String>, file_value: &Option<String>, env_name: &str| {
        if let Some(v) = file_value
            .clone()
            .filter(|v| !v.is_empty())
            .or_else(|| env_string(env_name))
        {
            *slot = Some(v);
        }
    };
    overlay(&mut auth_url, &file.auth_url, "OS_AUTH_URL");
    overlay(&mut c.username, &file.username, "OS_USERNAME");
    overlay(&mut c.user_id, &file.user_id, "OS_USER_ID");
    overlay(&mut c.project_name, &file.project_name, "OS_PROJECT_NAME");
    overlay(&mut c.project_id, &file.project_id, "OS_PROJECT_ID");
    overlay(&mut c.user_domain_id, &file.user_domain_id, "OS_USER_DOMAIN_ID");
    overlay(&mut c.user_domain_name, &file.user_domain_name, "OS_USER_DOMAIN_NAME");
    overlay(
        &mut c.project_domain_id,
        &file.project_domain_id,
        "OS_PROJECT_DOMAIN_ID",
    );
    overlay(
        &mut c.project_domain_name,
        &file.project_domain_name,
        "OS_PROJECT_DOMAIN_NAME",
    );
    overlay(
        &mut c.application_credential_id,
        &file.application_credential_id,
        "OS_APPLICATION_CREDENTIAL_ID",
    );
    overlay(
        &mut c.application_credential_name,
        &file.application_credential_name,
        "OS_APPLICATION_CREDENTIAL_NAME",
    );
    overlay(&mut c.region_name, &file.region_name, "OS_REGION_NAME");
    let mut interface = None;
    overlay(&mut interface, &file.interface, "OS_INTERFACE");
    if let Some(interface) = interface {
        c.interface = interface.trim_end_matches("URL").to_ascii_lowercase();
    }
    let mut cacert = None;
    overlay(
        &mut cacert,
        &file.cacert.as_ref().map(|p| p.display().to_string()),
        "OS_CACERT",
    );
    if let Some(cacert) = cacert {
        c.cacert = Some(PathBuf::from(cacert));
    }
    if let Some(password) = file.password.clone() {
        c.password = Some(password);
    } else if let Some(password) = env.var("OS_PASSWORD") {
        c.password = Some(Secret::new(password));
    }
    if let Some(secret) = file.application_credential_secret.clone() {
        c.application_credential_secret = Some(secret);
    } else if let Some(secret) = env.var("OS_APPLICATION_CREDENTIAL_SECRET") {
        c.application_credential_secret = Some(Secret::new(secret));
    }
    if let Some(value) = file.insecure {
        insecure = Some(value);
    } else if let Some(value) = env.var("OS_INSECURE") {
        insecure = Some(matches!(value.to_ascii_lowercase().as_str(), "1" | "true" | "yes"));
    }
    c.insecure = insecure.unwrap_or(false);
    // The old tool's DomainID (or a domain name) stands for both the user's and the project's domain.
    if let Some(domain) = &file.domain_id {
        c.user_domain_id.get_or_insert_with(|| domain.clone());
        c.project_domain_id.get_or_insert_with(|| domain.clone());
    }
    if let Some(domain) = &file.domain_name {
        c.user_domain_name.get_or_insert_with(|| domain.clone());
        c.project_domain_name.get_or_insert_with(|| domain.clone());
    }

    c.auth_url = auth_url.ok_or_else(|| {
        invalid("missing auth_url (IdentityEndpoint in the old tool's format; OS_AUTH_URL in the environment)")
    })?;
    let url = url::Url::parse(&c.auth_url).map_err(|e| invalid(format!("auth_url {:?}: {e}", c.auth_url)))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(format!(
            "auth_url {:?} must be an http or https URL",
            c.auth_url
        )));
    }
    if !matches!(c.interface.as_str(), "public" | "internal" | "admin") {
        return Err(invalid(format!(
            "interface {:?} must be public, internal or admin",
            c.interface
        )));
    }
    if let Some(cacert) = &c.cacert
        && let Err(e) = std::fs::metadata(cacert)
    {
        return Err(invalid(format!("cacert {}: {e}", cacert.display())));
    }

    if let Some(secret) = &c.application_credential_secret {
        if secret.expose().is_empty() {
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
    } else if c.application_credential_id.is_some() || c.application_credential_name.is_some() {
        return Err(invalid(
            "missing application_credential_secret (OS_APPLICATION_CREDENTIAL_SECRET)",
        ));
    } else {
        if c.username.is_none() && c.user_id.is_none() {
            return Err(invalid(
                "missing username (Username in the old tool's format; OS_USERNAME)",
            ));
        }
        match &c.password {
            None => {
                return Err(invalid(
                    "missing password (Password in the old tool's format; OS_PASSWORD)",
                ));
            }
            Some(p) if p.expose().is_empty() => return Err(invalid("password is empty")),
            Some(_) => {}
        }
        if c.project_name.is_none() && c.project_id.is_none() {
            return Err(invalid(
                "missing project: set project_name (TenantName in the old tool's format) or project_id; listing every project's servers needs an admin project-scoped token",
            ));
        }
    }
    Ok(c)
}

/// Starts from a `clouds.yaml` entry (osauth finds the file as openstacksdk does).
fn apply_cloud(
    cloud: &str,
    c: &mut Credentials,
    auth_url: &mut Option<String>,
    insecure: &mut Option<bool>,
) -> Result<(), ConfigError> {
    let config = osauth::CloudConfig::from_config(cloud).map_err(|e| invalid(format!("cloud {cloud:?}: {e}")))?;
    let value = serde_json::to_value(&config).map_err(|e| invalid(format!("cloud {cloud:?}: {e}")))?;
    let text = |v: &Value| v.as_str().map(str::to_string);
    let auth = &value["auth"];
    *auth_url = text(&auth["auth_url"]);
    c.username = text(&auth["username"]);
    c.user_id = text(&auth["user_id"]);
    c.password = text(&auth["password"]).map(Secret::new);
    c.project_name = text(&auth["project_name"]);
    c.project_id = text(&auth["project_id"]);
    c.user_domain_name = text(&auth["user_domain_name"]);
    c.project_domain_id = text(&auth["project_domain_id"]);
    c.project_domain_name = text(&auth["project_domain_name"]);
    c.application_credential_id = text(&auth["application_credential_id"]);
    c.application_credential_name = text(&auth["application_credential_name"]);
    c.application_credential_secret = text(&auth["application_credential_secret"]).map(Secret::new);
    c.region_name = text(&value["region_name"]);
    if let Some(interface) = text(&value["interface"]) {
        c.interface = interface;
    }
    c.cacert = text(&value["cacert"]).map(PathBuf::from);
    if let Some(verify) = value["verify"].as_bool() {
        *insecure = Some(!verify);
    }
    Ok(())
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
        check_capacity: true,
        disable_first: false,
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
        assert_eq!(c.password.as_ref().unwrap().expose(), "s3cret");
        assert_eq!(config.evacuation, Settings::default());
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let config = from_str(OLD_TOOL, &no_env()).unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("<redacted>"));
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

    #[test]
    fn malformed_yaml_is_a_clear_error() {
        let error = from_str("IdentityEndpoint: [unclosed\n", &no_env())
            .unwrap_err()
            .to_string();
        assert!(!error.is_empty());
        assert!(!error.contains('\n'), "one line: {error}");
    }
}
