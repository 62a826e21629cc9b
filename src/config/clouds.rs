//! `clouds.yaml` entries, read as openstacksdk (and so the `openstack` CLI)
//! reads them: the same files in the same places, `secure.yaml` merged in by
//! cloud name, `clouds-public.yaml` profiles, keys given beside `auth:` or
//! under it, and the old spellings (`tenant_name`, `endpoint_type`,
//! `auth_plugin`, dashes). osauth's loader, used before, dropped every auth
//! key it had no field for (`user_domain_id` among them), so a cloud that
//! worked for the CLI could authenticate here as something else or not at
//! all; here every auth key is honoured or refused by name.

use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde_json::{Map, Value as Yaml};

use super::{ConfigError, Environment, Layer, Setting, Value, invalid, is_secret, known_key, yaml_error};

/// What a clouds.yaml entry holds for the drainer.
#[derive(Default)]
pub(super) struct Entry {
    /// Credentials settings in the vocabulary of [`super::HONOURED`] and [`super::REFUSED`].
    pub(super) settings: Layer,
    /// The entry's `compute_api_version` (the CLI's microversion pin), with where it was written.
    pub(super) compute_api_version: Option<(String, String)>,
    /// The regions the entry lists: a region asked for elsewhere must be one of them, as in openstacksdk.
    pub(super) regions: Vec<String>,
    /// `clouds.yaml entry NAME (PATH)`, to name where the credentials came from.
    pub(super) source: Option<String>,
}

/// Auth keys with their old spellings, oldest first: as openstacksdk's
/// `_fix_backwards_project`, the last one present wins, and under `auth:`
/// beats beside it.
const ALIASES: &[(&str, &[&str])] = &[
    ("domain_id", &["domain_id"]),
    ("domain_name", &["domain_name"]),
    ("user_domain_id", &["user_domain_id"]),
    ("user_domain_name", &["user_domain_name"]),
    ("project_domain_id", &["project_domain_id"]),
    ("project_domain_name", &["project_domain_name"]),
    ("token", &["auth_token", "token"]),
    ("project_id", &["tenant_id", "project_id"]),
    ("project_name", &["tenant_name", "project_name"]),
    ("username", &["user_name", "username"]),
];

/// Auth plugin options openstacksdk also takes from beside `auth:` when
/// `auth:` lacks them (`_validate_auth`).
const PLUGIN_OPTIONS: &[&str] = &[
    "auth_url",
    "user_id",
    "password",
    "default_domain_id",
    "default_domain_name",
    "application_credential_id",
    "application_credential_name",
    "application_credential_secret",
    "trust_id",
    "system_scope",
    "passcode",
];

/// Settings beside `auth:` that concern Keystone or Nova and that the
/// drainer does not honour. Other keys (other services' settings, the CLI's
/// own such as `api_timeout` or `networks`) play no part in a drain.
fn refused_beside_auth(key: &str) -> Option<&'static str> {
    match key {
        "cert" | "key" => Some("TLS client certificates are not supported"),
        "auth_methods" => Some("multi-factor authentication is not supported"),
        "compute_api_version" | "identity_api_version" | "placement_api_version" => None,
        _ if ["compute_", "placement_", "identity_"]
            .iter()
            .any(|service| key.starts_with(service)) =>
        {
            Some("per-service endpoints, interfaces and regions are not supported; the catalog's are used")
        }
        _ => None,
    }
}

/// The directories openstacksdk (0.101, with appdirs) searches, in its
/// order, without the repeats: the current directory, `CONFIG_HOME`
/// (`$XDG_CONFIG_HOME/openstack`, else `~/.config/openstack`),
/// `UNIX_CONFIG_HOME` (`$SNAP_REAL_HOME/.config/openstack`, else
/// `~/.config/openstack`), `SITE_CONFIG_HOME` (`/etc/xdg/openstack`, or each
/// of `$XDG_CONFIG_DIRS` + `/openstack` joined by `:` as one path, as appdirs'
/// multipath gives it) and `/etc/openstack`.
fn search_dirs(env: &dyn Environment) -> Vec<PathBuf> {
    let home_config = env.var("HOME").map(|home| Path::new(&home).join(".config/openstack"));
    let config_home = env
        .var("XDG_CONFIG_HOME")
        .map(|config_home| Path::new(&config_home).join("openstack"))
        .or_else(|| home_config.clone());
    let unix_config_home = env
        .var("SNAP_REAL_HOME")
        .map(|real_home| Path::new(&real_home).join(".config/openstack"))
        .or(home_config);
    let site_dirs = env.var("XDG_CONFIG_DIRS").unwrap_or_else(|| "/etc/xdg".into());
    let site_config_home: Vec<String> = site_dirs
        .split(':')
        .map(|dir| format!("{}/openstack", dir.trim_end_matches('/')))
        .collect();
    let mut dirs: Vec<PathBuf> = Vec::new();
    let all = env
        .current_dir()
        .into_iter()
        .chain(config_home)
        .chain(unix_config_home)
        .chain([
            PathBuf::from(site_config_home.join(":")),
            PathBuf::from("/etc/openstack"),
        ]);
    for dir in all {
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    dirs
}

/// Every file openstacksdk would try for `stem`, in its order: the one
/// `override_var` names, then `stem`.yaml, .yml and .json in each directory.
fn candidates(env: &dyn Environment, override_var: Option<&str>, stem: &str) -> Vec<PathBuf> {
    override_var
        .and_then(|var| env.var(var))
        .map(PathBuf::from)
        .into_iter()
        .chain(
            search_dirs(env)
                .into_iter()
                .flat_map(|dir| ["yaml", "yml", "json"].map(|suffix| dir.join(format!("{stem}.{suffix}")))),
        )
        .collect()
}

/// The first of `stem`.yaml, .yml or .json found (after the file named by `override_var`).
fn find(env: &dyn Environment, override_var: Option<&str>, stem: &str) -> Option<PathBuf> {
    candidates(env, override_var, stem)
        .into_iter()
        .find(|path| path.is_file())
}

/// Where clouds.yaml was looked for, in order, for a message: an operator
/// whose cloud is not found sees at once which file or directory they meant.
fn searched(env: &dyn Environment) -> String {
    let dirs: Vec<String> = search_dirs(env).iter().map(|d| d.display().to_string()).collect();
    let named = env.var("OS_CLIENT_CONFIG_FILE").map_or_else(String::new, |file| {
        let state = if Path::new(&file).is_file() { "" } else { " (absent)" };
        format!("OS_CLIENT_CONFIG_FILE {file}{state}, then ")
    });
    format!("{named}clouds.yaml, clouds.yml, clouds.json in {}", dirs.join(", "))
}

fn read_yaml(path: &Path) -> Result<Map<String, Yaml>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
    if text.trim().is_empty() {
        return Ok(Map::new());
    }
    match serde_saphyr::from_str::<Yaml>(&text) {
        Ok(Yaml::Object(map)) => Ok(map),
        Ok(Yaml::Null) => Ok(Map::new()),
        Ok(_) => Err(invalid(format!("{}: not a mapping", path.display()))),
        Err(e) => Err(invalid(format!("{}: {}", path.display(), yaml_error(&e, &text)))),
    }
}

/// `over` merged into `base`, mappings key by key (openstacksdk's `merge_clouds`).
fn merge_into(base: &mut Map<String, Yaml>, over: Map<String, Yaml>) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(Yaml::Object(old)), Yaml::Object(new)) => merge_into(old, new),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Keys with dashes spelt with underscores, at every level (openstacksdk's `normalize_keys`).
fn normalise(map: Map<String, Yaml>) -> Map<String, Yaml> {
    map.into_iter()
        .map(|(key, value)| {
            let value = match value {
                Yaml::Object(inner) => Yaml::Object(normalise(inner)),
                other => other,
            };
            (key.replace('-', "_"), value)
        })
        .collect()
}

fn mapping(value: Option<Yaml>, what: &str) -> Result<Map<String, Yaml>, ConfigError> {
    match value {
        None | Some(Yaml::Null) => Ok(Map::new()),
        Some(Yaml::Object(map)) => Ok(map),
        Some(_) => Err(invalid(format!("{what} must be a mapping"))),
    }
}

/// Reads cloud `name` (`named_by`: `--os-cloud`, `OS_CLOUD` or the config
/// file's cloud) from the first clouds.yaml found, with its secure.yaml part
/// and its profile.
pub(super) fn read(name: &str, named_by: &str, env: &dyn Environment) -> Result<Entry, ConfigError> {
    let at = format!("cloud {name:?}");
    let Some(path) = find(env, Some("OS_CLIENT_CONFIG_FILE"), "clouds") else {
        return Err(invalid(format!(
            "{named_by} {name}: no clouds.yaml found; looked, in openstacksdk's order, at {}",
            searched(env)
        )));
    };
    let mut root = read_yaml(&path)?;
    if let Some(secure) = find(env, Some("OS_CLIENT_SECURE_FILE"), "secure") {
        merge_into(&mut root, read_yaml(&secure)?);
    }
    let mut clouds = mapping(root.remove("clouds"), &format!("{}: clouds", path.display()))?;
    let Some(entry) = clouds.remove(name) else {
        let names: Vec<&String> = clouds.keys().collect();
        return Err(invalid(format!(
            "{named_by} {name} is not in {} (it has {names:?}), the first found of {}: openstacksdk reads only that one",
            path.display(),
            searched(env)
        )));
    };
    let mut cloud = normalise(mapping(Some(entry), &at)?);
    let profile = cloud.remove("profile").or_else(|| cloud.remove("cloud"));
    if let Some(profile) = profile {
        cloud = with_profile(cloud, &profile, env, &at)?;
    }
    let mut entry = entry_settings(cloud, &at)?;
    entry.source = Some(format!("clouds.yaml entry {name} ({})", path.display()));
    Ok(entry)
}

/// The entry laid over its `clouds-public.yaml` profile: keys replace the
/// profile's, `auth:` is merged key by key (openstacksdk's `_auth_update`).
fn with_profile(
    cloud: Map<String, Yaml>,
    profile: &Yaml,
    env: &dyn Environment,
    at: &str,
) -> Result<Map<String, Yaml>, ConfigError> {
    let Some(profile) = profile.as_str() else {
        return Err(invalid(format!("{at}: profile must be a name")));
    };
    let unknown = || {
        invalid(format!(
            "{at}: profile {profile:?} is not in a clouds-public.yaml (openstacksdk's built-in vendor profiles are not known here; copy its settings into the entry)"
        ))
    };
    let path = find(env, None, "clouds-public").ok_or_else(unknown)?;
    let mut public = mapping(read_yaml(&path)?.remove("public-clouds"), "public-clouds")?;
    let mut merged = normalise(mapping(Some(public.remove(profile).ok_or_else(unknown)?), profile)?);
    for (key, value) in cloud {
        match (merged.get_mut(&key), value) {
            (Some(Yaml::Object(auth)), Yaml::Object(over)) if key == "auth" => auth.extend(over),
            (_, value) => {
                merged.insert(key, value);
            }
        }
    }
    Ok(merged)
}

/// A scalar as text, as openstacksdk passes it on (`project_id: 42` is "42").
fn scalar(value: &Yaml, origin: &str) -> Result<Option<String>, ConfigError> {
    match value {
        Yaml::Null => Ok(None),
        Yaml::String(text) if text.is_empty() => Ok(None),
        Yaml::String(text) => Ok(Some(text.clone())),
        Yaml::Number(number) => Ok(Some(number.to_string())),
        Yaml::Bool(flag) => Ok(Some(flag.to_string())),
        _ => Err(invalid(format!("{origin} must be a single value"))),
    }
}

fn entry_settings(mut cloud: Map<String, Yaml>, at: &str) -> Result<Entry, ConfigError> {
    let mut auth = mapping(cloud.remove("auth"), &format!("{at} auth"))?;
    // The old names: `endpoint_type` wins over `interface` in openstacksdk, `auth_type` over `auth_plugin`.
    if let Some(value) = cloud.remove("endpoint_type") {
        cloud.insert("interface".into(), value);
    }
    if let Some(value) = cloud.remove("auth_plugin") {
        cloud.entry("auth_type").or_insert(value);
    }
    for (target, spellings) in ALIASES {
        let mut found = None;
        for spelling in *spellings {
            for place in [&mut cloud, &mut auth] {
                if let Some(value) = place.remove(*spelling) {
                    found = Some(value);
                }
            }
        }
        if let Some(value) = found {
            auth.insert((*target).to_string(), value);
        }
    }
    for option in PLUGIN_OPTIONS {
        if let Some(value) = cloud.remove(*option) {
            auth.entry(*option).or_insert(value);
        }
    }

    let mut entry = Entry::default();
    for (key, value) in &auth {
        let origin = format!("{at} auth.{key}");
        let Some(known) = auth_key(key) else {
            return Err(invalid(format!(
                "{origin}: not a key the drainer knows for password or application-credential authentication"
            )));
        };
        if let Some(text) = scalar(value, &origin)? {
            let value = if is_secret(known) {
                Value::Secret(SecretString::from(text))
            } else {
                Value::Text(text)
            };
            entry.settings.insert(known, Setting { value, origin });
        }
    }
    for (key, value) in &cloud {
        let origin = format!("{at} {key}");
        if let Some(why) = refused_beside_auth(key) {
            return Err(invalid(format!("{origin}: {why}")));
        }
        let setting = |value| Setting {
            value,
            origin: origin.clone(),
        };
        match key.as_str() {
            "auth_type" | "interface" | "cacert" | "identity_api_version" => {
                if let (Some(text), Some(known)) = (scalar(value, &origin)?, known_key(key)) {
                    entry.settings.insert(known, setting(Value::Text(text)));
                }
            }
            "compute_api_version" => {
                entry.compute_api_version = scalar(value, &origin)?.map(|text| (origin.clone(), text));
            }
            // Insecure is the most aggressive setting, so it wins (as in openstacksdk).
            "verify" | "insecure" => {
                let Yaml::Bool(flag) = value else {
                    return Err(invalid(format!(
                        "{origin} must be true or false (a CA bundle goes in cacert)"
                    )));
                };
                let insecure = if key == "verify" { !flag } else { *flag };
                if insecure || !entry.settings.contains_key("insecure") {
                    entry.settings.insert("insecure", setting(Value::Flag(insecure)));
                }
            }
            _ => {}
        }
    }
    entry.regions = regions(&cloud, at)?;
    if let Some(region) = entry.regions.first() {
        entry.settings.insert(
            "region_name",
            Setting {
                value: Value::Text(region.clone()),
                origin: format!("{at} region_name"),
            },
        );
    }
    Ok(entry)
}

/// The static name of a key that may stand under `auth:`: a known key
/// (honoured, or refused later with why) other than those that belong
/// beside it.
fn auth_key(key: &str) -> Option<&'static str> {
    known_key(key).filter(|k| {
        !matches!(
            *k,
            "auth_type" | "region_name" | "interface" | "cacert" | "insecure" | "identity_api_version"
        )
    })
}

/// The regions of the entry, the one openstacksdk picks when none is asked
/// for first: `regions`, else `region_name` (a list, or comma-separated).
fn regions(cloud: &Map<String, Yaml>, at: &str) -> Result<Vec<String>, ConfigError> {
    let list = |key: &str| -> Result<Vec<String>, ConfigError> {
        let origin = format!("{at} {key}");
        let items = match cloud.get(key) {
            None | Some(Yaml::Null) => return Ok(Vec::new()),
            Some(Yaml::Array(items)) => items.clone(),
            Some(Yaml::String(text)) => text.split(',').map(|s| Yaml::String(s.trim().to_string())).collect(),
            Some(_) => return Err(invalid(format!("{origin} must be a name or a list of names"))),
        };
        let mut names = Vec::new();
        for item in items {
            let name = match item {
                Yaml::Object(region) => {
                    if region.keys().any(|k| k != "name") {
                        return Err(invalid(format!(
                            "{origin}: per-region values are not supported; set them on the cloud"
                        )));
                    }
                    scalar(region.get("name").unwrap_or(&Yaml::Null), &origin)?
                }
                name => scalar(&name, &origin)?,
            };
            names.extend(name);
        }
        Ok(names)
    };
    let regions = list("regions")?;
    if regions.is_empty() {
        list("region_name")
    } else {
        Ok(regions)
    }
}
