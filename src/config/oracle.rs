//! Our reading of clouds.yaml, secure.yaml and `OS_*` held against the
//! `openstack` CLI's: Debian's python3-openstacksdk reads the same files and
//! variables (tests/credentials_oracle.py) and says what keystoneauth would
//! send to Keystone; we must send the same token request to the same
//! Keystone, with the same interface, region and TLS settings, or refuse
//! the settings with a message naming the key.
//!
//! CI (`CI=true`) installs the oracle with tests/lab/up.sh and fails without
//! it; elsewhere the test is skipped when it is missing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};

use super::{Environment, from_str};
use crate::nova::KeystoneAuth;

const PYTHON: &str = "/usr/bin/python3";

/// What we must do with a case.
enum Expect {
    /// Send what the CLI sends.
    Same,
    /// Refuse, with a message naming this key (the CLI may accept it).
    Refused(&'static str),
}

struct Case {
    name: &'static str,
    clouds: &'static str,
    secure: Option<&'static str>,
    public: Option<&'static str>,
    env: &'static [(&'static str, &'static str)],
    expect: Expect,
}

const PASSWORD_CLOUD: &str = "
clouds:
  lab:
    auth:
      auth_url: http://keystone.test:5000/v3
      username: admin
      user_domain_id: default
      project_name: admin
      project_domain_id: default
    interface: publicURL
    region_name: RegionOne
";

const CASES: &[Case] = &[
    Case {
        name: "password by ids, secret in secure.yaml, v2 interface name",
        clouds: PASSWORD_CLOUD,
        secure: Some("clouds:\n  lab:\n    auth:\n      password: s3cret\n"),
        public: None,
        env: &[("OS_CLOUD", "lab")],
        expect: Expect::Same,
    },
    Case {
        name: "OS_* variables over the cloud entry",
        clouds: PASSWORD_CLOUD,
        secure: None,
        public: None,
        env: &[
            ("OS_CLOUD", "lab"),
            ("OS_USERNAME", "drainer"),
            ("OS_PASSWORD", "pw"),
            ("OS_INTERFACE", "internal"),
        ],
        expect: Expect::Same,
    },
    Case {
        name: "domain_id stands for both domains, user_name for username",
        clouds: "
clouds:
  lab:
    auth:
      auth_url: http://keystone.test:5000/v3
      user_name: admin
      password: pw
      project_name: admin
      domain_id: d0
",
        secure: None,
        public: None,
        env: &[("OS_CLOUD", "lab")],
        expect: Expect::Same,
    },
    Case {
        name: "keys beside auth, old spellings, dashes",
        clouds: "
clouds:
  lab:
    auth_url: http://keystone.test:5000/v3
    username: admin
    password: pw
    tenant-name: admin
    project-domain-name: Default
    user_domain_name: Users
    endpoint_type: internalURL
    identity_api_version: 3
",
        secure: None,
        public: None,
        env: &[("OS_CLOUD", "lab")],
        expect: Expect::Same,
    },
    Case {
        name: "user and project by id, auth_type v3password, CA bundle",
        clouds: "
clouds:
  lab:
    auth_type: v3password
    auth:
      auth_url: https://keystone.test:5000/v3/
      user_id: 7a1e
      password: pw
      project_id: 9c2b
    cacert: CACERT
",
        secure: None,
        public: None,
        env: &[("OS_CLOUD", "lab")],
        expect: Expect::Same,
    },
    Case {
        name: "OS_* only, default domain beside a user domain name",
        clouds: "clouds: {}\n",
        secure: None,
        public: None,
        env: &[
            ("OS_AUTH_URL", "http://keystone.test:5000/v3"),
            ("OS_USERNAME", "admin"),
            ("OS_PASSWORD", "pw"),
            ("OS_TENANT_NAME", "admin"),
            ("OS_DEFAULT_DOMAIN_ID", "d0"),
            ("OS_USER_DOMAIN_NAME", "Users"),
            ("OS_ENDPOINT_TYPE", "adminURL"),
            ("OS_REGION_NAME", "RegionTwo"),
        ],
        expect: Expect::Same,
    },
    Case {
        name: "application credential by id, verify off, first of regions",
        clouds: "
clouds:
  lab:
    auth_type: v3applicationcredential
    auth:
      auth_url: http://keystone.test:5000/v3
      application_credential_id: 4be1
    verify: false
    regions: [RegionA, RegionB]
",
        secure: Some("clouds:\n  lab:\n    auth:\n      application_credential_secret: xyz\n"),
        public: None,
        env: &[("OS_CLOUD", "lab")],
        expect: Expect::Same,
    },
    Case {
        name: "application credential by name and user name, region chosen by OS_REGION_NAME",
        clouds: "
clouds:
  lab:
    auth_type: v3applicationcredential
    auth:
      auth_url: http://keystone.test:5000/v3
      application_credential_name: drainer
      application_credential_secret: xyz
      username: ops
      user_domain_name: Users
    regions: [RegionA, RegionB]
",
        secure: None,
        public: None,
        env: &[("OS_CLOUD", "lab"), ("OS_REGION_NAME", "RegionB")],
        expect: Expect::Same,
    },
    Case {
        name: "profile from clouds-public.yaml",
        clouds: "
clouds:
  lab:
    profile: example
    auth:
      username: admin
      password: pw
      project_name: admin
      user_domain_name: Default
      project_domain_name: Default
",
        secure: None,
        public: Some(
            "
public-clouds:
  example:
    auth:
      auth_url: http://keystone.test:5000/v3
    region_name: RegionP
    interface: internal
",
        ),
        env: &[("OS_CLOUD", "lab")],
        expect: Expect::Same,
    },
    Case {
        name: "token auth",
        clouds: "
clouds:
  lab:
    auth_type: v3token
    auth:
      auth_url: http://keystone.test:5000/v3
      token: gAAAA
      project_id: 9c2b
",
        secure: None,
        public: None,
        env: &[("OS_CLOUD", "lab")],
        expect: Expect::Refused("token"),
    },
    Case {
        name: "OS_TOKEN",
        clouds: "clouds: {}\n",
        secure: None,
        public: None,
        env: &[
            ("OS_AUTH_URL", "http://keystone.test:5000/v3"),
            ("OS_AUTH_TYPE", "token"),
            ("OS_TOKEN", "gAAAA"),
            ("OS_PROJECT_ID", "9c2b"),
        ],
        expect: Expect::Refused("token"),
    },
    Case {
        name: "trust scope",
        clouds: "
clouds:
  lab:
    auth:
      auth_url: http://keystone.test:5000/v3
      user_id: 7a1e
      password: pw
      trust_id: 51d2
",
        secure: None,
        public: None,
        env: &[("OS_CLOUD", "lab")],
        expect: Expect::Refused("auth.trust_id"),
    },
    Case {
        name: "system scope",
        clouds: "
clouds:
  lab:
    auth:
      auth_url: http://keystone.test:5000/v3
      user_id: 7a1e
      password: pw
      system_scope: all
",
        secure: None,
        public: None,
        env: &[("OS_CLOUD", "lab")],
        expect: Expect::Refused("auth.system_scope"),
    },
    Case {
        name: "TOTP",
        clouds: "
clouds:
  lab:
    auth_type: v3totp
    auth:
      auth_url: http://keystone.test:5000/v3
      user_id: 7a1e
      passcode: '123456'
      project_id: 9c2b
",
        secure: None,
        public: None,
        env: &[("OS_CLOUD", "lab")],
        expect: Expect::Refused("auth.passcode"),
    },
    Case {
        name: "an auth key of no auth type the drainer speaks",
        clouds: "
clouds:
  lab:
    auth:
      auth_url: http://keystone.test:5000/v3
      user_id: 7a1e
      password: pw
      project_id: 9c2b
      endpoint: http://ironic.test:6385
",
        secure: None,
        public: None,
        env: &[("OS_CLOUD", "lab")],
        expect: Expect::Refused("auth.endpoint"),
    },
    Case {
        name: "Keystone v2",
        clouds: "
clouds:
  lab:
    auth:
      auth_url: http://keystone.test:5000/v2.0
      username: admin
      password: pw
      project_name: admin
      project_domain_id: default
      user_domain_id: default
    identity_api_version: 2
",
        secure: None,
        public: None,
        env: &[("OS_CLOUD", "lab")],
        expect: Expect::Refused("identity_api_version"),
    },
    Case {
        name: "a project beside an application credential",
        clouds: "
clouds:
  lab:
    auth_type: v3applicationcredential
    auth:
      auth_url: http://keystone.test:5000/v3
      application_credential_id: 4be1
      application_credential_secret: xyz
      project_name: admin
      project_domain_id: default
",
        secure: None,
        public: None,
        env: &[("OS_CLOUD", "lab")],
        expect: Expect::Refused("auth.project_name"),
    },
    Case {
        name: "a compute endpoint override",
        clouds: "
clouds:
  lab:
    auth:
      auth_url: http://keystone.test:5000/v3
      username: admin
      password: pw
      project_name: admin
      user_domain_id: default
      project_domain_id: default
    compute_endpoint_override: http://nova.test:8774/v2.1
",
        secure: None,
        public: None,
        env: &[("OS_CLOUD", "lab")],
        expect: Expect::Refused("compute_endpoint_override"),
    },
    Case {
        name: "a region the cloud does not list",
        clouds: "
clouds:
  lab:
    auth:
      auth_url: http://keystone.test:5000/v3
      application_credential_id: 4be1
      application_credential_secret: xyz
    regions: [RegionA, RegionB]
",
        secure: None,
        public: None,
        env: &[("OS_CLOUD", "lab"), ("OS_REGION_NAME", "RegionC")],
        expect: Expect::Refused("OS_REGION_NAME"),
    },
];

/// The environment of one case: its variables, and its directory as the current one.
struct CaseEnv {
    vars: HashMap<String, String>,
    dir: PathBuf,
}

impl Environment for CaseEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.vars.get(name).cloned()
    }

    fn current_dir(&self) -> Option<PathBuf> {
        Some(self.dir.clone())
    }
}

fn oracle_available() -> bool {
    Command::new(PYTHON)
        .args(["-c", "import openstack.config, keystoneauth1"])
        .output()
        .is_ok_and(|out| out.status.success())
}

/// A fresh directory holding the case's files; `CACERT` in clouds.yaml names a file in it.
fn case_dir(case: &Case) -> (PathBuf, String) {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "drainer-oracle-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(dir.join("home")).expect("create the case directory");
    let cacert = dir.join("ca.pem");
    std::fs::write(&cacert, "not read by either side\n").expect("write ca.pem");
    let clouds = case.clouds.replace("CACERT", &cacert.display().to_string());
    std::fs::write(dir.join("clouds.yaml"), &clouds).expect("write clouds.yaml");
    if let Some(secure) = case.secure {
        std::fs::write(dir.join("secure.yaml"), secure).expect("write secure.yaml");
    }
    if let Some(public) = case.public {
        std::fs::write(dir.join("clouds-public.yaml"), public).expect("write clouds-public.yaml");
    }
    (dir, clouds)
}

fn ask_oracle(dir: &Path, vars: &HashMap<String, String>) -> Value {
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/credentials_oracle.py");
    let out = Command::new(PYTHON)
        .arg(helper)
        .current_dir(dir)
        .env_clear()
        .envs(vars)
        .output()
        .expect("run the oracle");
    assert!(
        out.status.success(),
        "the oracle failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the oracle prints JSON")
}

/// keystoneauth matches `internalURL` and `internal` alike against the catalog.
fn interface(name: &str) -> String {
    name.trim_end_matches("URL").to_ascii_lowercase()
}

#[test]
fn clouds_yaml_and_os_variables_read_as_the_openstack_cli_reads_them() {
    if !oracle_available() {
        let message = format!(
            "{PYTHON} cannot import openstack.config (Debian's python3-openstacksdk, which tests/lab/up.sh installs)"
        );
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{message}");
        eprintln!("skipped: {message}");
        return;
    }
    for case in CASES {
        let (dir, clouds) = case_dir(case);
        let mut vars: HashMap<String, String> = case.env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        vars.insert("HOME".into(), dir.join("home").display().to_string());
        let oracle = ask_oracle(&dir, &vars);
        let ours = from_str("", &CaseEnv { vars, dir: dir.clone() });
        let name = case.name;
        match (&case.expect, ours) {
            (Expect::Same, Err(error)) => {
                panic!("{name}: we refused what the CLI reads as {oracle}: {error}\n{clouds}")
            }
            (Expect::Same, Ok(config)) => {
                assert!(oracle.get("error").is_none(), "{name}: the CLI refused it: {oracle}");
                let c = &config.credentials;
                let auth = KeystoneAuth::new(c).expect("valid credentials");
                let ours = json!({
                    "auth_url": c.auth_url.trim_end_matches('/').trim_end_matches("/v3"),
                    "body": auth.request_body(),
                    "interface": c.interface,
                    "region_name": c.region_name,
                    "verify": !c.insecure,
                    "cacert": c.cacert.as_ref().map(|p| p.display().to_string()),
                });
                let theirs = json!({
                    "auth_url": oracle["auth_url"].as_str().map(|u| u.trim_end_matches('/').trim_end_matches("/v3")),
                    "body": oracle["body"],
                    "interface": oracle["interface"].as_str().map(interface),
                    "region_name": oracle["region_name"],
                    "verify": oracle["verify"],
                    "cacert": oracle["cacert"],
                });
                assert_eq!(
                    ours, theirs,
                    "{name}: ours (left) and the CLI's (right) differ\n{clouds}"
                );
            }
            (Expect::Refused(key), Ok(_)) => {
                panic!("{name}: accepted, but {key} must be refused (the CLI reads {oracle})")
            }
            (Expect::Refused(key), Err(error)) => {
                let error = error.to_string();
                assert!(error.contains(key), "{name}: the refusal must name {key}: {error}");
                assert!(!error.contains('\n'), "{name}: one line: {error}");
                let cli = oracle["error"].as_str().unwrap_or("accepts it");
                eprintln!("{name}: refused: {error} (the CLI: {cli})");
                for secret in ["pw", "xyz", "gAAAA"] {
                    assert!(
                        !error.split(|c: char| !c.is_alphanumeric()).any(|w| w == secret),
                        "{name}: a secret in {error}"
                    );
                }
            }
        }
        std::fs::remove_dir_all(&dir).expect("remove the case directory");
    }
}
