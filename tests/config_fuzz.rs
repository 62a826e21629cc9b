//! Property-based fuzzing of the configuration parser: whatever the file
//! holds, loading it never panics, every error is one line, and a secret
//! never appears in an error message.

use nova_kubernetes_drain::config::{Environment, from_str};
use proptest::prelude::*;

struct NoEnv;

impl Environment for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

/// A distinctive secret that must never leak into an error.
const SECRET: &str = "Zq7-SECRET-9xK";

const KEYS: &[&str] = &[
    "IdentityEndpoint",
    "Username",
    "Password",
    "TenantName",
    "DomainID",
    "auth_url",
    "password",
    "application_credential_id",
    "application_credential_secret",
    "interface",
    "insecure",
    "cacert",
    "nova_host",
    "timeout_minutes",
    "compute_api_version",
    "region_name",
    "Pasword",
];

const MIGRATION_KEYS: &[&str] = &[
    "max_parallel",
    "budget_seconds",
    "budget_minimum_seconds",
    "budget_seconds_per_gib",
    "stall_seconds",
    "on_budget_exceeded",
    "retries",
    "retry_backoff_seconds",
    "poll_interval_seconds",
    "max_paralel",
];

/// Values for the secret keys, in every shape (right and wrong types).
fn secret() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(SECRET.to_string()),
        Just(format!("'{SECRET}'")),
        Just(format!("[{SECRET}]")),
        Just(format!("{{a: {SECRET}}}")),
        Just(format!("- {SECRET}")),
        Just(format!("\"{SECRET}")),
        Just(format!("{SECRET}: {SECRET}")),
    ]
}

/// Values for the other keys (never the secret: non-secret values may be echoed in errors).
fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("http://127.0.0.1:5000/v3".to_string()),
        Just("abort".to_string()),
        Just("force-complete".to_string()),
        Just("live-migrate".to_string()),
        Just("'2.60'".to_string()),
        Just("true".to_string()),
        Just("~".to_string()),
        Just("''".to_string()),
        Just("{node}".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| n.to_string()),
        "[ -~]{0,20}",
    ]
}

const SECRET_KEYS: &[&str] = &["Password", "password", "application_credential_secret"];

fn document() -> impl Strategy<Value = String> {
    let plain = (prop::sample::select(KEYS), scalar());
    let secrets = (prop::sample::select(SECRET_KEYS), secret());
    let top = prop::collection::vec(prop_oneof![plain, secrets], 0..8);
    let migration = prop::collection::vec((prop::sample::select(MIGRATION_KEYS), scalar()), 0..4);
    let policy = prop::collection::vec(
        (
            prop::sample::select(&["ACTIVE", "SHUTOFF", "SUSPENDED", "error", "x"][..]),
            prop::sample::select(&["live-migrate", "cold-migrate", "skip", "bogus"][..]),
        ),
        0..3,
    );
    (top, migration, policy).prop_map(|(top, migration, policy)| {
        let mut text = String::new();
        for (key, value) in top {
            text.push_str(&format!("{key}: {value}\n"));
        }
        if !migration.is_empty() {
            text.push_str("migration:\n");
            for (key, value) in migration {
                text.push_str(&format!("  {key}: {value}\n"));
            }
        }
        if !policy.is_empty() {
            text.push_str("state_policy:\n");
            for (status, action) in policy {
                text.push_str(&format!("  {status}: {action}\n"));
            }
        }
        text
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn structured_documents_never_panic_or_leak(text in document()) {
        if let Err(error) = from_str(&text, &NoEnv) {
            let message = error.to_string();
            prop_assert!(!message.contains(SECRET), "secret leaked: {message}");
            prop_assert!(!message.contains('\n'), "not one line: {message}");
            prop_assert!(!message.is_empty());
        }
    }

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        if let Err(error) = from_str(&text, &NoEnv) {
            prop_assert!(!error.to_string().contains('\n'));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = from_str(&String::from_utf8_lossy(&bytes), &NoEnv);
    }
}

#[test]
fn a_valid_document_still_loads() {
    let text = format!(
        "IdentityEndpoint: http://k/v3\nUsername: u\nPassword: {SECRET}\nTenantName: p\nmigration:\n  retries: 2\n"
    );
    let config = from_str(&text, &NoEnv).expect("valid");
    assert_eq!(config.evacuation.retries, 2);
}
