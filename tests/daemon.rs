//! `drainer -daemon` end to end: the real binary, the real OpenStack lab of
//! `tests/lab/` and the in-process Kubernetes API server of
//! `tests/support/kube_api.rs`, driven the way operators do it (cordon,
//! `kubectl drain`, uncordon) and the way nodes fail (SIGKILL, SIGTERM,
//! dropped watches, 410 Gone, nova-api down at the uncordon).

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;
use support::kube_api::KubeApi;
use support::kubectl::Kubectl;
use support::openstack::{BootSpec, Lab, RestoreLab, lab_kill};
use support::wait::{eventually, free_port};
use tokio::process::{Child, Command};

const DRAINER: &str = env!("CARGO_BIN_EXE_drainer");
const NODE: &str = "host1";
const NAMESPACE: &str = "nova-drain";
const GUARD: &str = "nova-drain-guard-host1";
/// The agent's own pod, as its DaemonSet would have made it: the guard runs its image.
const AGENT_POD: &str = "drainer-host1";
const AGENT_IMAGE: &str = "localhost/nova-kubernetes-drain:test";
const FAST: &str = "migration:\n  poll_interval_seconds: 0.2\n  retry_backoff_seconds: 1\n";

struct Agent {
    child: Child,
    dir: PathBuf,
}

impl Agent {
    /// Starts `drainer -daemon` against the fake API server and the lab.
    async fn start(kube: &KubeApi, lab: &Lab, extra_config: &str) -> Agent {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("drainer-daemon-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        kube.write_kubeconfig(dir.join("kubeconfig"));
        std::fs::write(
            dir.join("config.yaml"),
            format!("{}{FAST}{extra_config}", lab.drainer_config()),
        )
        .expect("config");
        let port = free_port();
        let child = Command::new(DRAINER)
            .arg("-daemon")
            .arg("-config-path")
            .arg(dir.join("config.yaml"))
            .arg("--kubeconfig")
            .arg(dir.join("kubeconfig"))
            .args(["--node", NODE, "--namespace", NAMESPACE, "--retry-after-failure", "2"])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .env_remove("KUBECONFIG")
            .env_remove("NODE_NAME")
            .env("POD_NAME", AGENT_POD)
            .kill_on_drop(true)
            .spawn()
            .expect("start drainer -daemon");
        Agent { child, dir }
    }

    fn pid(&self) -> i32 {
        self.child.id().map(|p| p as i32).expect("running")
    }

    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) => Some(status.code().unwrap_or(-1)),
            _ => None,
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn annotation(kube: &KubeApi, key: &str) -> Option<String> {
    kube.node(NODE)
        .metadata
        .annotations
        .and_then(|a| a.get(&format!("nova-kubernetes-drain/{key}")).cloned())
}

fn reasons(kube: &KubeApi) -> Vec<String> {
    kube.events()
        .iter()
        .filter(|e| e["regarding"]["name"] == NODE)
        .filter_map(|e| e["reason"].as_str().map(str::to_string))
        .collect()
}

fn guard_in_place(kube: &KubeApi) -> bool {
    kube.pod(NAMESPACE, GUARD).is_some()
        && kube
            .pdbs(NAMESPACE)
            .iter()
            .any(|p| p.metadata.name.as_deref() == Some(GUARD))
}

async fn wait_phase(kube: &KubeApi, phase: &str, limit: Duration) {
    eventually(&format!("phase {phase}"), limit, async || {
        (annotation(kube, "phase").as_deref() == Some(phase)).then_some(())
    })
    .await;
}

async fn wait_guard(kube: &KubeApi, limit: Duration) {
    eventually("the guard pod and its PDB", limit, async || {
        guard_in_place(kube).then_some(())
    })
    .await;
}

/// A clean lab and a fake cluster with our node and namespace.
async fn setup() -> (Lab, KubeApi) {
    let lab = Lab::connect().await;
    lab.reset().await;
    let kube = KubeApi::start();
    kube.add_namespace(NAMESPACE);
    kube.add_node(NODE);
    add_agent_pod(&kube).await;
    (lab, kube)
}

/// The DaemonSet pod the agent runs in (drain skips it with `--ignore-daemonsets`).
async fn add_agent_pod(kube: &KubeApi) {
    let daemonset = kube.add_daemonset(NAMESPACE, "drainer");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": AGENT_POD,
            "labels": {"app": "drainer"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "drainer",
                                 "uid": daemonset["metadata"]["uid"], "controller": true}],
        },
        "spec": {"nodeName": NODE, "containers": [{"name": "drainer", "image": AGENT_IMAGE}]},
    }))
    .expect("pod");
    kube::Api::<Pod>::namespaced(kube.kube_client(), NAMESPACE)
        .create(&Default::default(), &pod)
        .await
        .expect("create the agent's pod");
}

fn host_of(server: &Value) -> String {
    server["OS-EXT-SRV-ATTR:host"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn kubectl_drain_waits_for_the_vms_and_uncordon_restores_everything() {
    let _exclusive = Lab::exclusive().await;
    let (lab, kube) = setup().await;
    let mut ids = lab.boot(BootSpec::new("dmn-a").count(2)).await;
    ids.extend(lab.boot(BootSpec::new("dmn-d").project("demo")).await);
    let _agent = Agent::start(&kube, &lab, "").await;
    wait_guard(&kube, Duration::from_secs(20)).await;
    eventually("the guard pod Running", Duration::from_secs(10), async || {
        kube.pod(NAMESPACE, GUARD)
            .and_then(|p| p.status)
            .and_then(|s| s.phase)
            .filter(|p| p == "Running")
    })
    .await;

    let took = Kubectl::new(&kube)
        .drain(NODE, &[], Duration::from_secs(120))
        .await
        .expect("kubectl drain succeeds");
    // drain returned: by then every VM must have left the hypervisor.
    assert!(
        lab.servers_on(NODE).await.is_empty(),
        "drain returned while VMs were still on {NODE}"
    );
    for id in &ids {
        let server = lab.server(id).await;
        assert_eq!(server["status"], "ACTIVE");
        assert_ne!(host_of(&server), NODE);
    }
    assert!(
        took > Duration::from_secs(1),
        "drain waited for the migrations ({took:?})"
    );
    lab.assert_disabled_by_drainer(NODE).await;
    assert_eq!(annotation(&kube, "phase").as_deref(), Some("Evacuated"));
    assert_eq!(annotation(&kube, "vms-left").as_deref(), Some("0"));
    let seen = reasons(&kube);
    for reason in [
        "NovaComputeDisabled",
        "EvacuationStarted",
        "LiveMigrationStarted",
        "LiveMigrationSucceeded",
        "EvacuationSucceeded",
    ] {
        assert!(seen.iter().any(|r| r == reason), "no {reason} event in {seen:?}");
    }
    assert_eq!(seen.iter().filter(|r| *r == "LiveMigrationSucceeded").count(), 3);
    let notes: Vec<String> = kube
        .events()
        .iter()
        .filter_map(|e| e["note"].as_str().map(str::to_string))
        .collect();
    assert!(
        ids.iter().all(|id| notes.iter().any(|n| n.contains(id.as_str()))),
        "events name the VMs"
    );
    assert!(kube.events().iter().all(|e| e["metadata"]["namespace"] == "default"));

    kube.set_unschedulable(NODE, false);
    eventually(
        "the service enabled after uncordon",
        Duration::from_secs(15),
        async || (lab.service(NODE).await["status"] == "enabled").then_some(()),
    )
    .await;
    wait_guard(&kube, Duration::from_secs(15)).await;
    wait_phase(&kube, "Idle", Duration::from_secs(10)).await;
    assert!(reasons(&kube).iter().any(|r| r == "NovaComputeEnabled"));
}

#[tokio::test]
async fn a_node_cordoned_before_start_up_is_evacuated() {
    let _exclusive = Lab::exclusive().await;
    let (lab, kube) = setup().await;
    let ids = lab.boot(BootSpec::new("dmn-pre").count(2)).await;
    kube.set_unschedulable(NODE, true);
    let _agent = Agent::start(&kube, &lab, "").await;
    wait_phase(&kube, "Evacuated", Duration::from_secs(60)).await;
    assert!(lab.servers_on(NODE).await.is_empty());
    for id in &ids {
        assert_ne!(host_of(&lab.server(id).await), NODE);
    }
    assert!(
        !kube
            .pdbs(NAMESPACE)
            .iter()
            .any(|p| p.metadata.name.as_deref() == Some(GUARD)),
        "the guard is released once the hypervisor is empty"
    );
}

#[tokio::test]
async fn uncordon_mid_evacuation_aborts_and_re_enables() {
    let _exclusive = Lab::exclusive().await;
    let (lab, kube) = setup().await;
    let stuck = lab.boot(BootSpec::new("dmn-stall").stall()).await.remove(0);
    let _agent = Agent::start(&kube, &lab, "").await;
    wait_guard(&kube, Duration::from_secs(20)).await;
    kube.set_unschedulable(NODE, true);
    eventually("the live migration running", Duration::from_secs(30), async || {
        lab.server_migrations(&stuck)
            .await
            .first()
            .filter(|m| m["status"] == "running")
            .map(drop)
    })
    .await;

    let uncordoned = Instant::now();
    kube.set_unschedulable(NODE, false);
    eventually("the service enabled", Duration::from_secs(20), async || {
        (lab.service(NODE).await["status"] == "enabled").then_some(())
    })
    .await;
    let reaction = uncordoned.elapsed();
    assert!(reaction < Duration::from_secs(15), "took {reaction:?}");
    let server = lab.server(&stuck).await;
    assert_eq!(server["status"], "ACTIVE");
    assert_eq!(host_of(&server), NODE, "the aborted VM stays on its source");
    let history = lab.live_migrations(&stuck).await;
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0]["status"], "cancelled");
    wait_guard(&kube, Duration::from_secs(15)).await;

    // A quick re-cordon/uncordon flip ends in the right state too, with no duplicate migration.
    kube.set_unschedulable(NODE, true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    kube.set_unschedulable(NODE, false);
    eventually("enabled after the flip", Duration::from_secs(20), async || {
        let enabled = lab.service(NODE).await["status"] == "enabled";
        let idle = annotation(&kube, "phase").as_deref() == Some("Idle");
        (enabled && idle && lab.server_migrations(&stuck).await.is_empty()).then_some(())
    })
    .await;
    let history = lab.live_migrations(&stuck).await;
    assert!(history.len() <= 2, "at most one migration per cordon: {history:?}");
    assert!(history.iter().all(|m| m["status"] == "cancelled"), "{history:?}");
    assert_eq!(host_of(&lab.server(&stuck).await), NODE);
}

#[tokio::test]
async fn a_service_disabled_by_an_operator_stays_disabled() {
    let _exclusive = Lab::exclusive().await;
    let (lab, kube) = setup().await;
    let id = lab.boot(BootSpec::new("dmn-op")).await.remove(0);
    lab.set_service(NODE, false, Some("RMA 4711: bad DIMM")).await;
    let _agent = Agent::start(&kube, &lab, "").await;
    kube.set_unschedulable(NODE, true);
    wait_phase(&kube, "Evacuated", Duration::from_secs(60)).await;
    assert_ne!(host_of(&lab.server(&id).await), NODE);
    kube.set_unschedulable(NODE, false);
    wait_phase(&kube, "Idle", Duration::from_secs(20)).await;
    let service = lab.service(NODE).await;
    assert_eq!(service["status"], "disabled");
    assert_eq!(service["disabled_reason"], "RMA 4711: bad DIMM");
}

#[tokio::test]
async fn nova_api_down_at_the_uncordon_delays_the_re_enable_until_it_is_back() {
    let _exclusive = Lab::exclusive().await;
    let (lab, kube) = setup().await;
    let id = lab.boot(BootSpec::new("dmn-reenable")).await.remove(0);
    let _agent = Agent::start(&kube, &lab, "").await;
    wait_guard(&kube, Duration::from_secs(20)).await;
    kube.set_unschedulable(NODE, true);
    wait_phase(&kube, "Evacuated", Duration::from_secs(60)).await;

    lab_kill("nova-api");
    let restore = RestoreLab;
    kube.set_unschedulable(NODE, false);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        annotation(&kube, "phase").as_deref(),
        Some("Evacuated"),
        "not Idle while the service could not be enabled"
    );
    assert!(!reasons(&kube).iter().any(|r| r == "NovaComputeEnabled"));

    drop(restore); // up.sh brings nova-api back (also if an assertion above failed)
    eventually("the service enabled", Duration::from_secs(40), async || {
        (lab.service(NODE).await["status"] == "enabled").then_some(())
    })
    .await;
    eventually("phase Idle and the guard back", Duration::from_secs(15), async || {
        (annotation(&kube, "phase").as_deref() == Some("Idle") && guard_in_place(&kube)).then_some(())
    })
    .await;
    assert!(reasons(&kube).iter().any(|r| r == "NovaComputeEnabled"));
    assert_ne!(host_of(&lab.server(&id).await), NODE, "the VM stays where it went");
}

#[tokio::test]
async fn sigkill_mid_evacuation_then_restart_resumes_without_duplicate_migrations() {
    let _exclusive = Lab::exclusive().await;
    let (lab, kube) = setup().await;
    let ids = lab.boot(BootSpec::new("dmn-kill").count(3).flavor("m1.small")).await;
    let mut agent = Agent::start(&kube, &lab, "").await;
    wait_guard(&kube, Duration::from_secs(20)).await;
    kube.set_unschedulable(NODE, true);
    let migrating = eventually("a migration in flight", Duration::from_secs(30), async || {
        for id in &ids {
            if !lab.server_migrations(id).await.is_empty() {
                return Some(id.clone());
            }
        }
        None
    })
    .await;
    agent.signal("KILL");
    assert!(agent.wait_exit(Duration::from_secs(5)).await.is_some());
    assert_eq!(
        annotation(&kube, "phase").as_deref(),
        Some("Evacuating"),
        "progress is on the node"
    );

    let _again = Agent::start(&kube, &lab, "").await;
    wait_phase(&kube, "Evacuated", Duration::from_secs(90)).await;
    assert!(lab.servers_on(NODE).await.is_empty());
    for id in &ids {
        let history = lab.live_migrations(id).await;
        assert_eq!(history.len(), 1, "exactly one migration of {id}: {history:?}");
        assert_eq!(history[0]["status"], "completed");
    }
    assert_ne!(host_of(&lab.server(&migrating).await), NODE);
}

#[tokio::test]
async fn dropped_watches_and_410_gone_are_survived() {
    let _exclusive = Lab::exclusive().await;
    let (lab, kube) = setup().await;
    let id = lab.boot(BootSpec::new("dmn-watch")).await.remove(0);
    let _agent = Agent::start(&kube, &lab, "").await;
    wait_guard(&kube, Duration::from_secs(20)).await;
    kube.drop_watches();
    kube.compact();
    kube.set_unschedulable(NODE, true);
    wait_phase(&kube, "Evacuated", Duration::from_secs(60)).await;
    assert_ne!(host_of(&lab.server(&id).await), NODE);
    let relists = kube
        .requests()
        .iter()
        .filter(|(method, path)| method == "GET" && path.starts_with("/api/v1/nodes?") && !path.contains("watch=true"))
        .count();
    assert!(
        relists >= 2,
        "the agent listed again after losing its watch ({relists} lists)"
    );
}

#[tokio::test]
async fn sigterm_stops_within_ten_seconds_and_leaves_the_migration_to_nova() {
    let _exclusive = Lab::exclusive().await;
    let (lab, kube) = setup().await;
    let stuck = lab.boot(BootSpec::new("dmn-term").stall()).await.remove(0);
    let mut agent = Agent::start(&kube, &lab, "").await;
    wait_guard(&kube, Duration::from_secs(20)).await;
    kube.set_unschedulable(NODE, true);
    eventually("the live migration running", Duration::from_secs(30), async || {
        lab.server_migrations(&stuck).await.first().map(drop)
    })
    .await;
    let asked = Instant::now();
    agent.signal("TERM");
    let code = agent.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "exited cleanly within 10 s");
    assert!(asked.elapsed() < Duration::from_secs(10));
    assert!(
        !lab.server_migrations(&stuck).await.is_empty(),
        "the in-flight migration was left to Nova"
    );
    assert_eq!(annotation(&kube, "phase").as_deref(), Some("Evacuating"));
    // Leave the lab clean for the next test: stop the stalled migration.
    let migration = lab.server_migrations(&stuck).await[0]["id"]
        .as_u64()
        .expect("migration id");
    lab.abort_migration(&stuck, migration).await;
}
