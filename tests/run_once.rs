//! `drainer` run-once end to end against the real OpenStack lab of
//! `tests/lab/` (real Keystone, Nova API, scheduler, conductor and four
//! fake-driver computes). Start it with `tests/lab/up.sh` first.
//!
//! Each test takes the lab exclusively, resets it (no servers, every service
//! enabled), boots what it needs on host1 and runs the real binary.

mod support;

use reqwest::Method;
use serde_json::{Value, json};
use support::openstack::{BootSpec, Lab, RestorePlacement, Undo};

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
    drainer_with_env(config, args, &[]).await
}

/// [`drainer`] with more environment variables.
async fn drainer_with_env(config: &str, args: &[&str], env: &[(&str, &str)]) -> Run {
    let path = std::env::temp_dir().join(format!("drainer-test-{}-{}.yaml", std::process::id(), rand_suffix()));
    std::fs::write(&path, config).expect("write config");
    let output = tokio::process::Command::new(DRAINER)
        .arg("-config-path")
        .arg(&path)
        .args(args)
        .env_remove("NODE_NAME")
        .env_remove("OS_CLOUD")
        .envs(env.iter().copied())
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

    // The dry run foresees it: it exits as the run will, and says why.
    let config = format!("{}{FAST}", lab.drainer_config());
    let dry = drainer(&config, &["--node", "host1", "--dry-run", "--output", "json"]).await;
    assert_eq!(dry.code, 1, "{}", dry.stderr);
    let prediction = &dry.report()["prediction"];
    assert_eq!(prediction["exit_code"], 1, "{prediction}");
    assert_eq!(prediction["result"], "failed");
    assert_eq!(prediction["disables_service"], true);
    assert_eq!(prediction["stays"], serde_json::json!([broken]));
    assert_eq!(
        (&prediction["live_migrations"], &prediction["cold_migrations"]),
        (&serde_json::json!(1), &serde_json::json!(1))
    );
    let dry = drainer(&config, &["--node", "host1", "--dry-run"]).await;
    assert_eq!(dry.code, 1, "{}", dry.stderr);
    assert!(
        dry.stdout.contains("a run now would: disable nova-compute on host1")
            && dry.stdout.contains("this dry run exits 1"),
        "{}",
        dry.stdout
    );
    assert_eq!(
        lab.service("host1").await["status"],
        "enabled",
        "a dry run changes nothing"
    );

    let run = drainer(&config, &["--node", "host1", "--output", "json"]).await;
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

/// Nova server tags choose per VM: the one tagged live-migrate moves, the
/// one tagged stop is stopped on the host with our marker, the one tagged
/// leave is not touched; the run succeeds with those two on the host. Then
/// `-enable` starts the stopped one and removes the marker.
#[tokio::test]
async fn server_tags_choose_per_vm_and_enable_starts_what_we_stopped() {
    let _exclusive = Lab::exclusive().await;
    let lab = Lab::connect().await;
    lab.reset().await;
    let ids = lab.boot(BootSpec::new("tagged").count(3)).await;
    let (live, stopped, left) = (&ids[0], &ids[1], &ids[2]);
    for (id, tag) in [
        (live, "nova-drain:live-migrate"),
        (stopped, "nova-drain:stop"),
        (left, "nova-drain:leave"),
    ] {
        lab.nova(Method::PUT, &format!("/servers/{id}/tags/{tag}"), None).await;
    }
    let marker = "nova-drain:stopped-by-drainer";
    let tags = |server: &Value| -> Vec<String> {
        server["tags"]
            .as_array()
            .map(|t| t.iter().filter_map(|t| t.as_str().map(String::from)).collect())
            .unwrap_or_default()
    };

    let config = format!("{}{FAST}", lab.drainer_config());
    let run = drainer(&config, &["--node", "host1", "--output", "json"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let report = run.report();
    assert_eq!(report["result"], "succeeded", "{report:#}");
    assert_eq!(report["servers_left_on_host"], 2);
    for (id, action, outcome, tag) in [
        (live, "live-migrate", "migrated", "nova-drain:live-migrate"),
        (stopped, "stop", "stopped", "nova-drain:stop"),
        (left, "skip", "left", "nova-drain:leave"),
    ] {
        let line = vm(&report, id);
        assert_eq!(
            (&line["action"], &line["outcome"], &line["action_source"], &line["tag"]),
            (&json!(action), &json!(outcome), &json!("tag"), &json!(tag)),
            "{line}"
        );
    }
    let server = lab.server(live).await;
    assert_eq!(server["status"], "ACTIVE");
    assert_ne!(host_of(&server), "host1");
    let server = lab.server(stopped).await;
    assert_eq!((&server["status"], host_of(&server)), (&json!("SHUTOFF"), "host1"));
    assert!(tags(&server).contains(&marker.to_string()), "{server}");
    let server = lab.server(left).await;
    assert_eq!((&server["status"], host_of(&server)), (&json!("ACTIVE"), "host1"));
    assert_eq!(tags(&server), ["nova-drain:leave"]);
    assert!(lab.live_migrations(left).await.is_empty(), "never touched");

    let enable = drainer(
        &lab.drainer_config(),
        &["-enable", "--node", "host1", "--output", "json"],
    )
    .await;
    assert_eq!(enable.code, 0, "{}", enable.stderr);
    let restored: Value = serde_json::from_str(&enable.stdout).expect("JSON");
    assert_eq!(restored["restore"]["outcome"], "enabled", "{restored:#}");
    assert_eq!(
        restored["started"],
        json!([{"id": stopped, "name": "tagged-1", "outcome": "started"}])
    );
    let server = lab
        .wait_server(stopped, "ACTIVE", |s| {
            s["status"] == "ACTIVE" && s["OS-EXT-STS:task_state"].is_null()
        })
        .await;
    assert_eq!(
        tags(&server),
        ["nova-drain:stop"],
        "the marker is gone, the owner's tag stays"
    );
    assert_eq!(lab.service("host1").await["status"], "enabled");
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
    // A sourced openrc of another cloud beside a config file: the file wins, and that is said.
    let run = drainer_with_env(
        &lab.drainer_config(),
        &["--node", "host1", "--dry-run", "--output", "json"],
        &[("OS_AUTH_URL", "http://127.0.0.1:1/v3"), ("OS_PASSWORD", "wrong")],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let report = run.report();
    assert_eq!(report["result"], "planned");
    let cloud = &report["cloud"];
    let auth_url = cloud["auth_url"].as_str().unwrap_or_default().to_string();
    assert!(
        lab.drainer_config()
            .contains(&format!("IdentityEndpoint: {auth_url}\n")),
        "the file's: {cloud}"
    );
    assert_eq!(cloud["project"], "admin");
    assert!(
        cloud["sources"][0]
            .as_str()
            .unwrap_or_default()
            .starts_with("config file "),
        "{cloud}"
    );
    let overridden = cloud["overridden"].to_string();
    assert!(
        overridden.contains("overrides OS_AUTH_URL (http://127.0.0.1:1/v3)")
            && overridden.contains("overrides OS_PASSWORD"),
        "{overridden}"
    );
    assert!(!overridden.contains("wrong"), "no secret shown");
    assert!(
        run.stderr.contains(&format!("cloud: {auth_url} region")),
        "named at start: {}",
        run.stderr
    );
    assert!(run.stderr.contains("overrides OS_PASSWORD"), "{}", run.stderr);
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
    assert_eq!(
        vm(&report, &stuck)["project"],
        "admin",
        "named though the run returned at once"
    );

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

/// A name no earlier run left behind.
fn unique(prefix: &str) -> String {
    format!("{prefix}-{:x}", rand_suffix())
}

/// A fresh aggregate uuid (Placement needs no other record of it).
fn aggregate_uuid() -> String {
    let hex = format!("{:032x}", rand_suffix());
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// A flavor whose servers Nova allocates no `DISK_GB` for, as for a
/// volume-backed server or an ephemeral disk on a shared pool
/// (`resources:DISK_GB=0`, what operators of RBD-backed clouds set): the
/// lab has no Cinder to boot from a volume, and the scheduler, unlike a
/// rewritten allocation, leaves such a server's disk out of every move too.
async fn volume_backed_flavor(lab: &Lab, restore: &RestorePlacement, disk_gb: u64) -> String {
    let name = unique("drainer-volume-backed");
    let id = lab
        .create_flavor(&name, 64, 1, disk_gb, json!({"resources:DISK_GB": "0"}))
        .await;
    restore.push(Undo::DeleteFlavor(id));
    name
}

/// What Placement holds for a server: resource provider uuid -> class -> amount.
async fn allocations_of(lab: &Lab, server: &str) -> Value {
    lab.placement(Method::GET, &format!("/allocations/{server}"), None)
        .await
}

fn capacity_need<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["capacity"]["needs"]
        .as_array()
        .and_then(|needs| needs.iter().find(|n| n["id"] == id))
        .unwrap_or_else(|| panic!("no needs for {id} in {report:#}"))
}

fn class_balance<'a>(report: &'a Value, class: &str) -> &'a Value {
    report["capacity"]["classes"]
        .as_array()
        .and_then(|classes| classes.iter().find(|c| c["class"] == class))
        .unwrap_or_else(|| panic!("no {class} balance in {report:#}"))
}

/// (1) A server Placement holds no `DISK_GB` for needs none on its
/// destination: it moves although its flavor's disk is larger than any
/// candidate's free `DISK_GB`, which the flavor-based check refused.
#[tokio::test]
async fn a_volume_backed_vm_moves_although_its_flavor_disk_fits_nowhere() {
    let _exclusive = Lab::exclusive().await;
    let restore = RestorePlacement::default();
    let lab = Lab::connect().await;
    lab.reset().await;
    // The lab's computes each report 600000 GiB of DISK_GB.
    let flavor = volume_backed_flavor(&lab, &restore, 700_000).await;
    let id = lab.boot(BootSpec::new("vol").flavor(&flavor)).await.remove(0);
    let held = allocations_of(&lab, &id).await;
    let classes: Vec<&String> = held["allocations"]
        .as_object()
        .into_iter()
        .flat_map(|by_provider| by_provider.values())
        .flat_map(|a| a["resources"].as_object().into_iter().flat_map(|r| r.keys()))
        .collect();
    assert!(
        !classes.is_empty() && !classes.iter().any(|c| *c == "DISK_GB"),
        "{held}"
    );

    let dry = drainer(
        &lab.drainer_config(),
        &["--node", "host1", "--dry-run", "--output", "json"],
    )
    .await;
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    let report = dry.report();
    assert_eq!(report["capacity"]["unplaced"], json!([]), "{report:#}");
    let need = capacity_need(&report, &id);
    assert_eq!(need["from"], "placement");
    assert_eq!(need["resources"], json!({"MEMORY_MB": 64, "VCPU": 1}));
    for candidate in report["capacity"]["candidates"].as_array().expect("candidates") {
        let disk = candidate["free"]["DISK_GB"].as_u64().unwrap_or(0);
        assert!(disk < 700_000, "a flavor-based check would have fit: {candidate}");
    }

    let run = drainer(
        &format!("{}{FAST}", lab.drainer_config()),
        &["--node", "host1", "--output", "json"],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(vm(&run.report(), &id)["outcome"], "migrated");
    assert_ne!(host_of(&lab.server(&id).await), "host1");
}

/// Removes `DISK_GB` from these providers, recording how to put it back once.
async fn remove_disk(lab: &Lab, restore: &RestorePlacement, providers: &[String], saved: &mut Vec<String>) {
    for uuid in providers {
        let path = format!("/resource_providers/{uuid}/inventories/DISK_GB");
        let (status, inventory) = lab.try_placement(Method::GET, &path, None).await;
        if status == 404 {
            continue;
        }
        assert_eq!(status, 200, "{inventory}");
        if !saved.contains(uuid) {
            restore.push(Undo::PutInventory {
                provider: uuid.clone(),
                class: "DISK_GB".into(),
                inventory,
            });
            saved.push(uuid.clone());
        }
        lab.placement(Method::DELETE, &path, None).await;
    }
}

/// Whether a nova-compute put its `DISK_GB` back (its report does so once
/// it refreshes its view of Placement, every 300 s by default).
async fn disk_came_back(lab: &Lab, providers: &[String]) -> bool {
    for uuid in providers {
        let path = format!("/resource_providers/{uuid}/inventories/DISK_GB");
        if lab.try_placement(Method::GET, &path, None).await.0 != 404 {
            return true;
        }
    }
    false
}

/// Runs the drainer with `args` on candidates without `DISK_GB`, again if a
/// compute put its `DISK_GB` back meanwhile.
async fn run_without_disk(
    lab: &Lab,
    restore: &RestorePlacement,
    providers: &[String],
    saved: &mut Vec<String>,
    args: &[&str],
) -> Run {
    for _ in 0..3 {
        remove_disk(lab, restore, providers, saved).await;
        let run = drainer(&lab.drainer_config(), args).await;
        if !disk_came_back(lab, providers).await {
            return run;
        }
        eprintln!("a nova-compute reported its DISK_GB again during the run: once more");
    }
    panic!("the computes keep putting their DISK_GB back");
}

/// (2) Computes that report no `DISK_GB` (their disks are on a shared
/// pool): a volume-backed VM needs none, a VM with a local disk finds none
/// until a sharing provider of the computes' aggregate offers it.
#[tokio::test]
async fn computes_without_disk_inventory_take_disk_from_a_sharing_provider() {
    let _exclusive = Lab::exclusive().await;
    let restore = RestorePlacement::default();
    let lab = Lab::connect().await;
    lab.reset().await;
    let flavor = volume_backed_flavor(&lab, &restore, 1).await;
    let volume = lab.boot(BootSpec::new("shared-vol").flavor(&flavor)).await.remove(0);
    let local = lab.boot(BootSpec::new("shared-local")).await.remove(0);
    let mut candidates = Vec::new();
    for host in ["host2", "host3", "host4"] {
        candidates.push(lab.provider(host).await);
    }
    let mut saved = Vec::new();
    let dry_json = ["--node", "host1", "--dry-run", "--output", "json"];

    let dry = run_without_disk(&lab, &restore, &candidates, &mut saved, &dry_json).await;
    assert_eq!(dry.code, 1, "a shortfall: {}", dry.stderr);
    let report = dry.report();
    assert_eq!(report["capacity"]["unplaced"], json!([local]), "{report:#}");
    assert_eq!(
        report["capacity"]["unplaced_reasons"][&local],
        "needs 1 DISK_GB, which no candidate holds"
    );
    assert_eq!(capacity_need(&report, &volume)["resources"]["DISK_GB"], Value::Null);
    assert_eq!(class_balance(&report, "DISK_GB")["free"], 0);
    let refused = run_without_disk(&lab, &restore, &candidates, &mut saved, &["--node", "host1"]).await;
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused
            .stderr
            .contains(&format!("{local} (needs 1 DISK_GB, which no candidate holds)")),
        "{}",
        refused.stderr
    );
    assert_eq!(lab.service("host1").await["status"], "enabled", "nothing changed");

    // A Ceph-like pool: a provider with DISK_GB and MISC_SHARES_VIA_AGGREGATE, in the computes' aggregate.
    let pool_name = unique("drainer-test-pool");
    let created = lab
        .placement(Method::POST, "/resource_providers", Some(json!({"name": pool_name})))
        .await;
    let pool = created["uuid"].as_str().expect("pool uuid").to_string();
    restore.push(Undo::DeleteProvider(pool.clone()));
    let generation = lab.provider_generation(&pool).await;
    lab.placement(
        Method::PUT,
        &format!("/resource_providers/{pool}/inventories"),
        Some(json!({"resource_provider_generation": generation, "inventories": {"DISK_GB": {"total": 100}}})),
    )
    .await;
    let generation = lab.provider_generation(&pool).await;
    lab.placement(
        Method::PUT,
        &format!("/resource_providers/{pool}/traits"),
        Some(json!({"resource_provider_generation": generation, "traits": ["MISC_SHARES_VIA_AGGREGATE"]})),
    )
    .await;
    let aggregate = aggregate_uuid();
    for provider in candidates.iter().chain([&pool]) {
        let path = format!("/resource_providers/{provider}/aggregates");
        let current = lab.placement(Method::GET, &path, None).await;
        let mut aggregates: Vec<String> = serde_json::from_value(current["aggregates"].clone()).expect("aggregates");
        if provider != &pool {
            restore.push(Undo::SetAggregates {
                provider: provider.clone(),
                aggregates: aggregates.clone(),
            });
        }
        aggregates.push(aggregate.clone());
        let generation = current["resource_provider_generation"].as_u64().expect("generation");
        lab.placement(
            Method::PUT,
            &path,
            Some(json!({"aggregates": aggregates, "resource_provider_generation": generation})),
        )
        .await;
    }

    let dry = run_without_disk(&lab, &restore, &candidates, &mut saved, &dry_json).await;
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    let report = dry.report();
    assert_eq!(report["capacity"]["unplaced"], json!([]), "{report:#}");
    for candidate in report["capacity"]["candidates"].as_array().expect("candidates") {
        assert_eq!(candidate["free"]["DISK_GB"], Value::Null, "{candidate}");
        assert_eq!(candidate["shared"]["DISK_GB"], pool_name, "{candidate}");
    }
    assert_eq!(report["capacity"]["shared"][&pool_name]["DISK_GB"], 100);
    let disk = class_balance(&report, "DISK_GB");
    assert_eq!(
        (disk["needed"].as_u64(), disk["free"].as_u64()),
        (Some(1), Some(100)),
        "the pool counted once"
    );
    let human = run_without_disk(
        &lab,
        &restore,
        &candidates,
        &mut saved,
        &["--node", "host1", "--dry-run"],
    )
    .await;
    assert!(
        human.stdout.contains("capacity: the 2 VM(s) to move fit on host2")
            && human.stdout.contains(&format!("DISK_GB from {pool_name}")),
        "{}",
        human.stdout
    );
}

/// (3) A VM holding a class beyond RAM, vCPU and disk (here a custom one on
/// a child provider of host1, as a GPU's `VGPU` would be) that no candidate
/// holds: the run is refused before any change, naming the class.
#[tokio::test]
async fn a_vm_holding_a_class_no_candidate_has_is_refused_naming_the_class() {
    let _exclusive = Lab::exclusive().await;
    let restore = RestorePlacement::default();
    let lab = Lab::connect().await;
    lab.reset().await;
    let id = lab.boot(BootSpec::new("custom")).await.remove(0);
    let class = "CUSTOM_DRAINER_TEST";
    lab.placement(Method::PUT, &format!("/resource_classes/{class}"), None)
        .await;
    restore.push(Undo::DeleteResourceClass(class.into()));
    let host1 = lab.provider("host1").await;
    let created = lab
        .placement(
            Method::POST,
            "/resource_providers",
            Some(json!({"name": unique("host1-drainer-test"), "parent_provider_uuid": host1})),
        )
        .await;
    let child = created["uuid"].as_str().expect("child uuid").to_string();
    restore.push(Undo::DeleteProvider(child.clone()));
    let generation = lab.provider_generation(&child).await;
    lab.placement(
        Method::PUT,
        &format!("/resource_providers/{child}/inventories"),
        Some(json!({"resource_provider_generation": generation, "inventories": {class: {"total": 4}}})),
    )
    .await;
    // The server's allocation, rewritten with one unit of the class on host1's child.
    let mut held = allocations_of(&lab, &id).await;
    held["allocations"][&child] = json!({"resources": {class: 1}});
    let body = json!({
        "allocations": held["allocations"],
        "consumer_generation": held["consumer_generation"],
        "project_id": held["project_id"],
        "user_id": held["user_id"],
    });
    lab.placement(Method::PUT, &format!("/allocations/{id}"), Some(body))
        .await;

    let dry = drainer(
        &lab.drainer_config(),
        &["--node", "host1", "--dry-run", "--output", "json"],
    )
    .await;
    assert_eq!(dry.code, 1, "{}", dry.stderr);
    let report = dry.report();
    assert_eq!(capacity_need(&report, &id)["resources"][class], 1, "{report:#}");
    assert_eq!(report["capacity"]["unplaced"], json!([id]));
    assert_eq!(class_balance(&report, class)["free"], 0);

    let refused = drainer(&lab.drainer_config(), &["--node", "host1"]).await;
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused
            .stderr
            .contains(&format!("{id} (needs 1 {class}, which no candidate holds)")),
        "{}",
        refused.stderr
    );
    assert_eq!(lab.service("host1").await["status"], "enabled", "nothing changed");
    assert_eq!(host_of(&lab.server(&id).await), "host1");
    assert!(lab.live_migrations(&id).await.is_empty());
}

/// The habits of kubectl and the openstack CLI, end to end on the lab:
/// `kubectl drainer host1 --os-cloud lab --dry-run -o json` (the kubectl
/// plugin, the node as an argument, a clouds.yaml entry, kubectl's short
/// output flag) plans host1 of the lab from that entry and changes nothing.
#[tokio::test]
async fn kubectl_drainer_host1_os_cloud_plans_from_clouds_yaml() {
    let _exclusive = Lab::exclusive().await;
    let lab = Lab::connect().await;
    lab.reset().await;
    let id = lab.boot(BootSpec::new("habits")).await.remove(0);

    let dir = std::env::temp_dir().join(format!("drainer-habits-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(dir.join("bin")).expect("scratch dir");
    std::os::unix::fs::symlink(DRAINER, dir.join("bin/kubectl-drainer")).expect("plugin symlink");
    let clouds = format!(
        "clouds:\n  lab:\n    auth:\n      auth_url: {}\n      username: {}\n      password: {}\n      \
         project_name: admin\n      user_domain_id: default\n      project_domain_id: default\n",
        lab.keystone_url(),
        support::openstack::USERNAME,
        support::openstack::PASSWORD
    );
    std::fs::write(dir.join("clouds.yaml"), clouds).expect("clouds.yaml");
    let path = format!(
        "{}:{}",
        dir.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = tokio::process::Command::new("kubectl")
        .args(["drainer", "host1", "--os-cloud", "lab", "--dry-run", "-o", "json"])
        .current_dir(&dir)
        .env_clear()
        .env("PATH", path)
        .env("HOME", &dir)
        .output()
        .await
        .expect("run kubectl (tests/lab/up.sh installs it)");
    let _ = std::fs::remove_dir_all(&dir);
    let run = Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    assert_eq!(run.code, 0, "{}", run.stderr);
    let report = run.report();
    assert_eq!(report["result"], "planned", "{report:#}");
    assert_eq!((&report["node"], &report["host"]), (&json!("host1"), &json!("host1")));
    assert_eq!(vm(&report, &id)["outcome"], "planned");
    let source = report["cloud"]["sources"][0].as_str().unwrap_or_default();
    assert!(source.starts_with("clouds.yaml entry lab ("), "{:#}", report["cloud"]);
    assert_eq!(report["cloud"]["auth_url"], lab.keystone_url());
    assert!(!run.stderr.contains("its hostname"), "the node came from the argument");
    assert_eq!(lab.service("host1").await["status"], "enabled");
    assert_eq!(host_of(&lab.server(&id).await), "host1");
    assert!(lab.live_migrations(&id).await.is_empty());
}
