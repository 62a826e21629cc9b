//! `drainer` run-once end to end against the real OpenStack lab of
//! `tests/lab/` (real Keystone, Nova API, scheduler, conductor and four
//! fake-driver computes). Start it with `tests/lab/up.sh` first.
//!
//! Each test takes the lab exclusively, resets it (no servers, every service
//! enabled), boots what it needs on host1 and runs the real binary.

mod support;

use serde_json::Value;
use support::openstack::{BootSpec, Lab};

const DRAINER: &str = env!("CARGO_BIN_EXE_drainer");
/// Quick polling and retries so the lab's second-long migrations keep tests short.
const FAST: &str = "migration:\n  poll_interval_seconds: 0.2\n  retry_backoff_seconds: 1\n";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn report(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("report is not JSON ({e}):\n{}\nstderr:\n{}", self.stdout, self.stderr))
    }
}

/// Runs the drainer with `config` (YAML text) and extra arguments.
async fn drainer(config: &str, args: &[&str]) -> Run {
    let path = std::env::temp_dir().join(format!("drainer-test-{}-{}.yaml", std::process::id(), rand_suffix()));
    std::fs::write(&path, config).expect("write config");
    let output = tokio::process::Command::new(DRAINER)
        .arg("-config-path")
        .arg(&path)
        .args(args)
        .env_remove("NODE_NAME")
        .env_remove("OS_CLOUD")
        .output()
        .await
        .expect("run drainer");
    let _ = std::fs::remove_file(&path);
    let run = Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    eprintln!("drainer {args:?} -> exit {}\n{}", run.code, run.stderr);
    run
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

fn vm<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["vms"]
        .as_array()
        .and_then(|vms| vms.iter().find(|v| v["id"] == id))
        .unwrap_or_else(|| panic!("VM {id} not in report {report:#}"))
}

fn host_of(server: &Value) -> &str {
    server["OS-EXT-SRV-ATTR:host"].as_str().unwrap_or("")
}

#[tokio::test]
async fn evacuates_two_projects_across_pages_then_reruns_as_a_no_op() {
    let _exclusive = Lab::exclusive().await;
    let lab = Lab::connect().await;
    lab.reset().await;
    // Nova's page size in the lab is 5: seven servers need two pages.
    let mut ids = lab.boot(BootSpec::new("page-admin").count(4).project("admin")).await;
    ids.extend(lab.boot(BootSpec::new("page-demo").count(3).project("demo")).await);
    let elsewhere = lab.boot(BootSpec::new("bystander").host("host2")).await;

    let run = drainer(
        &format!("{}{FAST}", lab.drainer_config()),
        &["--node", "host1", "--output", "json"],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let report = run.report();
    assert_eq!(report["result"], "succeeded");
    assert_eq!(report["servers_left_on_host"], 0);
    assert_eq!(report["vms"].as_array().map(Vec::len), Some(7));
    let projects: std::collections::HashSet<String> = report["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["project_id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(projects.len(), 2, "VMs of both projects were moved");
    for id in &ids {
        let line = vm(&report, id);
        assert_eq!(line["outcome"], "migrated", "{line}");
        let server = lab.server(id).await;
        assert_eq!(server["status"], "ACTIVE");
        assert_ne!(host_of(&server), "host1");
        assert_eq!(line["destination"].as_str(), Some(host_of(&server)));
    }
    assert!(lab.servers_on("host1").await.is_empty());
    // One migration handed ahead: asked for before the first ended, and held
    // queued by Nova (the lab's max_concurrent_live_migrations is 1); had
    // Nova run it beside the first, the drainer would have withdrawn it.
    let first_end = run.stderr.find(" migrated ").expect("a migration ended");
    assert_eq!(
        run.stderr[..first_end].matches("migration started").count(),
        2,
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("withdrawing"), "{}", run.stderr);
    let service = lab.service("host1").await;
    assert_eq!(service["status"], "disabled");
    let reason = service["disabled_reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("nova-kubernetes-drain:") && reason.contains("host1"),
        "{reason}"
    );
    // A VM on another host is never touched.
    let bystander = lab.server(&elsewhere[0]).await;
    assert_eq!(host_of(&bystander), "host2");
    assert!(lab.live_migrations(&elsewhere[0]).await.is_empty());

    let again = drainer(&lab.drainer_config(), &["--node", "host1", "--output", "json"]).await;
    assert_eq!(again.code, 0, "{}", again.stderr);
    let report = again.report();
    assert_eq!(report["result"], "succeeded");
    assert_eq!(report["vms"].as_array().map(Vec::len), Some(0));
    assert_eq!(report["service_disabled_by_us"], true);

    let enable = drainer(&lab.drainer_config(), &["-enable", "--node", "host1"]).await;
    assert_eq!(enable.code, 0, "{}", enable.stderr);
    assert_eq!(lab.service("host1").await["status"], "enabled");
}

#[tokio::test]
async fn cold_migrates_shutoff_and_leaves_error_vms_alone() {
    let _exclusive = Lab::exclusive().await;
    let lab = Lab::connect().await;
    lab.reset().await;
    let active = lab.boot(BootSpec::new("state-active")).await.remove(0);
    let shutoff = lab.boot(BootSpec::new("state-shutoff")).await.remove(0);
    let broken = lab.boot(BootSpec::new("state-error").project("demo")).await.remove(0);
    lab.stop(&shutoff).await;
    lab.reset_to_error(&broken).await;

    let run = drainer(
        &format!("{}{FAST}", lab.drainer_config()),
        &["--node", "host1", "--output", "json"],
    )
    .await;
    assert_eq!(run.code, 1, "an ERROR VM stays behind, so the host is not empty");
    let report = run.report();
    assert_eq!(report["result"], "failed");
    assert_eq!(report["servers_left_on_host"], 1);

    assert_eq!(vm(&report, &active)["outcome"], "migrated");
    let cold = vm(&report, &shutoff);
    assert_eq!(cold["action"], "cold-migrate");
    assert_eq!(cold["outcome"], "migrated");
    let server = lab.server(&shutoff).await;
    assert_eq!(server["status"], "SHUTOFF", "confirmed, back to its original state");
    assert_ne!(host_of(&server), "host1");

    let skipped = vm(&report, &broken);
    assert_eq!(skipped["outcome"], "skipped");
    assert!(skipped["reason"].as_str().unwrap_or_default().contains("ERROR"));
    let server = lab.server(&broken).await;
    assert_eq!(server["status"], "ERROR");
    assert_eq!(host_of(&server), "host1");
    assert!(lab.live_migrations(&broken).await.is_empty(), "no migration was tried");
}

/// An interrupted run can leave finished cold migrations unconfirmed. With the
/// lab's two-item pages, three such records span two pages of `/os-migrations`:
/// a client that read only the first page would leave one VM in VERIFY_RESIZE.
#[tokio::test]
async fn leftover_cold_migrations_on_every_page_are_confirmed() {
    let _exclusive = Lab::exclusive().await;
    let lab = Lab::connect().await;
    lab.reset().await;
    let ids = lab.boot(BootSpec::new("leftover").count(3)).await;
    for id in &ids {
        lab.stop(id).await;
        lab.action(id, serde_json::json!({"migrate": null})).await;
    }
    for id in &ids {
        lab.wait_server(id, "VERIFY_RESIZE", |s| s["status"] == "VERIFY_RESIZE")
            .await;
    }

    let run = drainer(
        &format!("{}{FAST}", lab.drainer_config()),
        &["--node", "host1", "--output", "json"],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    for id in &ids {
        // Nova confirms asynchronously after accepting `confirmResize`.
        let server = lab
            .wait_server(id, "confirmed (SHUTOFF)", |s| s["status"] == "SHUTOFF")
            .await;
        assert_ne!(host_of(&server), "host1");
    }
}

#[tokio::test]
async fn stalled_migration_is_aborted_or_force_completed_per_policy() {
    let _exclusive = Lab::exclusive().await;
    let lab = Lab::connect().await;
    lab.reset().await;
    let stuck = lab.boot(BootSpec::new("stall-abort").stall()).await.remove(0);
    let config = format!(
        "{}{FAST}  budget_seconds: 3\n  on_budget_exceeded: abort\n",
        lab.drainer_config()
    );
    let run = drainer(&config, &["--node", "host1", "--output", "json"]).await;
    assert_eq!(run.code, 1);
    let report = run.report();
    let line = vm(&report, &stuck);
    assert_eq!(line["outcome"], "aborted", "{line}");
    assert!(line["reason"].as_str().unwrap_or_default().contains("budget"), "{line}");
    let server = lab.server(&stuck).await;
    assert_eq!(server["status"], "ACTIVE");
    assert_eq!(host_of(&server), "host1");
    let history = lab.live_migrations(&stuck).await;
    assert_eq!(history.len(), 1, "aborted, not retried: {history:?}");
    assert_eq!(history[0]["status"], "cancelled");

    let config = format!(
        "{}{FAST}  budget_seconds: 3\n  on_budget_exceeded: force-complete\n",
        lab.drainer_config()
    );
    let run = drainer(&config, &["--node", "host1", "--output", "json"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(vm(&run.report(), &stuck)["outcome"], "migrated");
    let server = lab.server(&stuck).await;
    assert_eq!(server["status"], "ACTIVE");
    assert_ne!(host_of(&server), "host1");
}

#[tokio::test]
async fn no_destination_retries_then_fails_with_every_vm_still_active_on_the_source() {
    let _exclusive = Lab::exclusive().await;
    let lab = Lab::connect().await;
    lab.reset().await;
    let ids = lab.boot(BootSpec::new("nodest").count(2)).await;
    for host in ["host2", "host3", "host4"] {
        lab.set_service(host, false, Some("test: closed for maintenance")).await;
    }

    // The capacity check sees no room and stops before changing anything.
    let refused = drainer(&lab.drainer_config(), &["--node", "host1", "--output", "json"]).await;
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(refused.stderr.contains("capacity"), "{}", refused.stderr);
    assert_eq!(lab.service("host1").await["status"], "enabled", "nothing changed");

    let config = format!("{}{FAST}  retries: 1\n", lab.drainer_config());
    let run = drainer(
        &config,
        &["--node", "host1", "--skip-capacity-check", "--output", "json"],
    )
    .await;
    assert_eq!(run.code, 1);
    let report = run.report();
    assert_eq!(report["result"], "failed");
    for id in &ids {
        let line = vm(&report, id);
        assert_eq!(line["outcome"], "failed", "{line}");
        assert_eq!(line["attempts"], 2, "one try and one retry: {line}");
        let server = lab.server(id).await;
        assert_eq!(server["status"], "ACTIVE");
        assert_eq!(host_of(&server), "host1");
        let history = lab.live_migrations(id).await;
        assert_eq!(history.len(), 2, "{history:?}");
        assert!(
            history
                .iter()
                .all(|m| m["status"] == "error" || m["status"] == "failed"),
            "{history:?}"
        );
    }
}

#[tokio::test]
async fn dry_run_changes_nothing() {
    let _exclusive = Lab::exclusive().await;
    let lab = Lab::connect().await;
    lab.reset().await;
    let ids = lab.boot(BootSpec::new("dry").count(2)).await;
    let run = drainer(
        &lab.drainer_config(),
        &["--node", "host1", "--dry-run", "--output", "json"],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let report = run.report();
    assert_eq!(report["result"], "planned");
    for id in &ids {
        let line = vm(&report, id);
        assert_eq!(line["outcome"], "planned");
        assert_eq!(line["action"], "live-migrate");
        assert_eq!(line["ram_mb"], 64);
        assert_eq!(
            line["project"], "admin",
            "named by Keystone; the id stays in project_id"
        );
        assert!(lab.live_migrations(id).await.is_empty());
        assert_eq!(host_of(&lab.server(id).await), "host1");
    }
    assert_eq!(lab.service("host1").await["status"], "enabled");
    // The capacity check ran, read-only: the other three hosts, room for both.
    let candidates: Vec<&str> = report["capacity"]["candidates"]
        .as_array()
        .expect("capacity candidates")
        .iter()
        .filter_map(|h| h["host"].as_str())
        .collect();
    assert_eq!(candidates.len(), 3, "{report}");
    assert!(!candidates.contains(&"host1"), "{candidates:?}");
    assert_eq!(report["capacity"]["unplaced"], serde_json::json!([]));

    let human = drainer(&lab.drainer_config(), &["--node", "host1", "--dry-run"]).await;
    assert_eq!(human.code, 0);
    assert!(
        human.stdout.contains("dry run") && human.stdout.contains(&ids[0]),
        "{}",
        human.stdout
    );
    assert!(
        human.stdout.contains("capacity: the 2 VM(s) to move fit on host"),
        "{}",
        human.stdout
    );
}

#[tokio::test]
async fn bad_config_wrong_password_and_unknown_node_exit_2_with_no_change() {
    let _exclusive = Lab::exclusive().await;
    let lab = Lab::connect().await;
    lab.reset().await;
    let id = lab.boot(BootSpec::new("badinput")).await.remove(0);

    let unknown_key = drainer(&format!("{}Passwd: x\n", lab.drainer_config()), &["--node", "host1"]).await;
    assert_eq!(unknown_key.code, 2);
    assert!(unknown_key.stderr.contains("Passwd"), "{}", unknown_key.stderr);

    let wrong_type = drainer(
        &format!("{}migration:\n  retries: lots\n", lab.drainer_config()),
        &["--node", "host1"],
    )
    .await;
    assert_eq!(wrong_type.code, 2);

    let malformed = drainer("IdentityEndpoint: [http://127.0.0.1:5000/v3\n", &["--node", "host1"]).await;
    assert_eq!(malformed.code, 2);

    let wrong_password = lab
        .drainer_config()
        .replace("Password: admin", "Password: not-the-password");
    let refused = drainer(&wrong_password, &["--node", "host1"]).await;
    assert_eq!(refused.code, 2);
    assert!(refused.stderr.contains("authentication"), "{}", refused.stderr);
    assert!(!refused.stderr.contains("not-the-password"), "the password never shows");

    let unknown_node = drainer(&lab.drainer_config(), &["--node", "host1.example"]).await;
    assert_eq!(unknown_node.code, 2);
    assert!(unknown_node.stderr.contains("host1.example"), "{}", unknown_node.stderr);

    let missing_file = tokio::process::Command::new(DRAINER)
        .args(["-config-path", "/nonexistent/config.yaml", "--node", "host1"])
        .output()
        .await
        .expect("run drainer");
    assert_eq!(missing_file.status.code(), Some(2));

    assert_eq!(lab.service("host1").await["status"], "enabled");
    assert_eq!(host_of(&lab.server(&id).await), "host1");
    assert!(lab.live_migrations(&id).await.is_empty());
}

#[tokio::test]
async fn enable_refuses_a_service_disabled_by_someone_else() {
    let _exclusive = Lab::exclusive().await;
    let lab = Lab::connect().await;
    lab.reset().await;
    lab.set_service("host1", false, Some("RMA ticket 4711: bad DIMM")).await;

    let run = drainer(&lab.drainer_config(), &["-enable", "--node", "host1"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stdout.contains("RMA ticket 4711") && run.stdout.contains("openstack compute service set --enable host1"),
        "names who disabled it, and how to enable it anyway: {}",
        run.stdout
    );
    let service = lab.service("host1").await;
    assert_eq!(service["status"], "disabled");
    assert_eq!(service["disabled_reason"], "RMA ticket 4711: bad DIMM");

    // Draining such a host keeps the operator's reason.
    let drain = drainer(&lab.drainer_config(), &["--node", "host1", "--output", "json"]).await;
    assert_eq!(drain.code, 0, "{}", drain.stderr);
    assert_eq!(drain.report()["service_disabled_by_us"], false);
    assert_eq!(
        lab.service("host1").await["disabled_reason"],
        "RMA ticket 4711: bad DIMM"
    );
}

/// `-enable` refuses while an evacuation of the host runs (the scheduler
/// would place new VMs on the host being emptied), and respects an operator
/// who disables the service again after us: Nova (Zed) clears the
/// `disabled_reason` on a disable without a reason, so our marker is gone.
/// Ctrl-C ends the run with exit 130 and its report, leaving the migration to Nova.
#[tokio::test]
async fn enable_refuses_while_an_evacuation_runs_and_after_an_operators_disable() {
    let _exclusive = Lab::exclusive().await;
    let lab = Lab::connect().await;
    lab.reset().await;
    let stuck = lab.boot(BootSpec::new("enable-mid").stall()).await.remove(0);
    let config = format!("{}{FAST}", lab.drainer_config());
    let path = std::env::temp_dir().join(format!("drainer-test-{}-{}.yaml", std::process::id(), rand_suffix()));
    std::fs::write(&path, &config).expect("write config");
    let run = tokio::process::Command::new(DRAINER)
        .arg("-config-path")
        .arg(&path)
        .args(["--node", "host1", "--output", "json"])
        .env_remove("NODE_NAME")
        .env_remove("OS_CLOUD")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start drainer");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !lab
        .server_migrations(&stuck)
        .await
        .iter()
        .any(|m| m["status"] == "running")
    {
        assert!(std::time::Instant::now() < deadline, "the migration never ran");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    let reason = lab.service("host1").await["disabled_reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.starts_with("nova-kubernetes-drain:") && reason.contains("node host1 by run-once on "),
        "the marker names the node and the run: {reason}"
    );

    let enable = drainer(&config, &["-enable", "--node", "host1"]).await;
    assert_eq!(enable.code, 1, "{}", enable.stderr);
    assert!(
        enable.stdout.contains("an evacuation runs") && enable.stdout.contains(&stuck),
        "{}",
        enable.stdout
    );
    assert_eq!(lab.service("host1").await["status"], "disabled");

    let pid = run.id().expect("running").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill");
    assert!(sent.success());
    let ended = tokio::time::timeout(std::time::Duration::from_secs(30), run.wait_with_output())
        .await
        .expect("Ctrl-C ends the run")
        .expect("its output");
    let _ = std::fs::remove_file(&path);
    assert_eq!(
        ended.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&ended.stderr)
    );
    let report: Value = serde_json::from_slice(&ended.stdout).expect("the report, as JSON");
    assert_eq!(report["result"], "interrupted");
    assert_eq!(vm(&report, &stuck)["outcome"], "in-progress", "left to Nova");

    // The migration left to Nova ends with its server; then the service may come back.
    lab.delete(&stuck).await;
    for args in [
        ["-enable", "--dry-run", "--node", "host1"],
        ["--dry-run", "-enable", "--node", "host1"],
    ] {
        let dry = drainer(&config, &args).await;
        assert_eq!(dry.code, 0, "{}", dry.stderr);
        assert!(dry.stdout.contains("would enable"), "{}", dry.stdout);
        assert_eq!(
            lab.service("host1").await["status"],
            "disabled",
            "a dry run changes nothing"
        );
    }
    let enable = drainer(&config, &["-enable", "--node", "host1", "--output", "json"]).await;
    assert_eq!(enable.code, 0, "{}", enable.stderr);
    let said: Value = serde_json::from_str(&enable.stdout).expect("-enable --output json");
    assert_eq!(said["restore"]["outcome"], "enabled", "{said}");
    assert_eq!(lab.service("host1").await["status"], "enabled");

    // Disabled by us, then by an operator without a reason of their own.
    let drain = drainer(&config, &["--node", "host1"]).await;
    assert_eq!(drain.code, 0, "{}", drain.stderr);
    lab.set_service("host1", false, None).await;
    let service = lab.service("host1").await;
    assert!(
        service["disabled_reason"].is_null(),
        "Nova cleared our marker: {service}"
    );
    let enable = drainer(&config, &["-enable", "--node", "host1"]).await;
    assert_eq!(enable.code, 1, "{}", enable.stdout);
    assert_eq!(
        lab.service("host1").await["status"],
        "disabled",
        "the operator's disable stands"
    );
}

#[tokio::test]
async fn older_microversions_use_the_legacy_calls() {
    let _exclusive = Lab::exclusive().await;
    let lab = Lab::connect().await;
    lab.reset().await;
    let ids = lab.boot(BootSpec::new("legacy").count(2).project("demo")).await;
    // 2.25: services by host+binary (pre-2.53), flavors by link (pre-2.47), block_migration "auto".
    let config = format!("{}compute_api_version: '2.25'\n{FAST}", lab.drainer_config());
    let run = drainer(&config, &["--node", "host1", "--output", "json"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let report = run.report();
    for id in &ids {
        assert_eq!(vm(&report, id)["outcome"], "migrated");
        assert_eq!(vm(&report, id)["ram_mb"], 64, "flavor looked up by id");
        assert_ne!(host_of(&lab.server(id).await), "host1");
    }
    lab.assert_disabled_by_drainer("host1").await;

    let enable = drainer(&config, &["-enable", "--node", "host1"]).await;
    assert_eq!(enable.code, 0, "{}", enable.stderr);
    assert_eq!(lab.service("host1").await["status"], "enabled");
}
