//! `drainer -daemon` end to end: the real binary, the real OpenStack lab of
//! `tests/lab/` and a Kubernetes cluster ([`support::cluster`]: the in-process
//! API server of `tests/support/kube_api.rs`, or the real cluster named by
//! `DRAINER_TEST_KUBECONFIG`), driven the way operators do it (cordon,
//! `kubectl drain`, uncordon) and the way nodes fail (SIGKILL, SIGTERM,
//! dropped watches, 410 Gone, nova-api down at the uncordon).

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::cluster::{TestCluster, real_cluster_requested};
use support::openstack::{BootSpec, Lab, RestoreLab, lab_kill};
use support::proxy::Proxy;
use support::wait::{eventually, free_port};
use tokio::process::{Child, Command};

const DRAINER: &str = env!("CARGO_BIN_EXE_drainer");
/// The lab's Nova host the tests drain. The test's Node is `host1.t<random>`,
/// mapped back to it by `nova_host: '{short}'`.
const NOVA_HOST: &str = "host1";
const NAMESPACE: &str = "nova-drain";
/// The agent's image: its pod's on the fake, `--guard-image` on a real cluster.
const AGENT_IMAGE: &str = "localhost/nova-kubernetes-drain:test";
const NOVA_HOST_CONFIG: &str = "nova_host: '{short}'\n";
const FAST: &str = "migration:\n  poll_interval_seconds: 0.2\n  retry_backoff_seconds: 1\n";

/// Changes the agent's kubeconfig before it starts.
type KubeconfigHook = Box<dyn FnOnce(&std::path::Path)>;

struct Agent {
    child: Child,
    dir: PathBuf,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    port: u16,
}

impl Agent {
    /// Starts `drainer -daemon` against the test's cluster and the lab.
    async fn start(cluster: &TestCluster, lab: &Lab, extra_config: &str) -> Agent {
        Agent::start_with(cluster, lab, extra_config, &[]).await
    }

    /// [`Agent::start`] with more flags.
    async fn start_with(cluster: &TestCluster, lab: &Lab, extra_config: &str, flags: &[&str]) -> Agent {
        Agent::spawn(cluster, lab, extra_config, flags, None).await
    }

    /// [`Agent::start_with`], its way to the API server through a proxy the test cuts.
    async fn start_through_proxy(cluster: &TestCluster, lab: &Lab, flags: &[&str]) -> (Agent, Proxy) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let hook = move |kubeconfig: &std::path::Path| {
            let text = std::fs::read_to_string(kubeconfig).expect("the agent's kubeconfig");
            let (line, server) = text
                .lines()
                .find_map(|l| Some((l, l.trim().strip_prefix("server: ")?)))
                .expect("a server in the kubeconfig");
            let url: reqwest::Url = server.parse().expect("the server's URL");
            let host = url.host_str().expect("a host").to_string();
            let port = url.port_or_known_default().expect("a port");
            let target = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
                .ok()
                .and_then(|mut a| a.next())
                .expect("resolve the API server");
            let proxy = futures::executor::block_on(Proxy::start(target));
            let indent = &line[..line.len() - line.trim_start().len()];
            let through = format!(
                "{indent}server: {}://{}\n{indent}tls-server-name: {host}",
                url.scheme(),
                proxy.addr()
            );
            std::fs::write(kubeconfig, text.replace(line, &through)).expect("rewrite the kubeconfig");
            let _ = tx.send(proxy);
        };
        let agent = Agent::spawn(cluster, lab, "", flags, Some(Box::new(hook))).await;
        (agent, rx.await.expect("the proxy"))
    }

    async fn spawn(
        cluster: &TestCluster,
        lab: &Lab,
        extra_config: &str,
        flags: &[&str],
        kubeconfig_hook: Option<KubeconfigHook>,
    ) -> Agent {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("drainer-daemon-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        cluster.write_agent_kubeconfig(&dir.join("kubeconfig")).await;
        if let Some(hook) = kubeconfig_hook {
            hook(&dir.join("kubeconfig"));
        }
        std::fs::write(
            dir.join("config.yaml"),
            format!("{}{NOVA_HOST_CONFIG}{FAST}{extra_config}", lab.drainer_config()),
        )
        .expect("config");
        let port = free_port();
        let identity = cluster.agent_identity();
        let child = Command::new(DRAINER)
            .arg("-daemon")
            .arg("-config-path")
            .arg(dir.join("config.yaml"))
            .arg("--kubeconfig")
            .arg(dir.join("kubeconfig"))
            .args([
                "--node",
                cluster.node(),
                "--namespace",
                NAMESPACE,
                "--retry-after-failure",
                "2",
            ])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(&identity.flags)
            .args(flags)
            .env_remove("KUBECONFIG")
            .env_remove("NODE_NAME")
            .env_remove("POD_NAME")
            .envs(identity.env)
            .kill_on_drop(true)
            .spawn()
            .expect("start drainer -daemon");
        Agent { child, dir, port }
    }

    /// `GET /PATH` on the agent's HTTP port: status, content type and body.
    async fn get(&self, path: &str) -> Option<(u16, String, String)> {
        let response = reqwest::get(format!("http://127.0.0.1:{}/{path}", self.port))
            .await
            .ok()?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        Some((status, content_type, response.text().await.ok()?))
    }

    async fn ready(&self) -> Option<bool> {
        self.get("readyz").await.map(|(status, _, _)| status == 200)
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

const FINALIZER: &str = "nova-kubernetes-drain/hypervisor-empty";

/// The guard pod (not being deleted, with our finalizer) and its budget.
async fn guard_in_place(cluster: &TestCluster) -> bool {
    let guard = cluster.guard();
    let pod = cluster.pod(&guard).await.is_some_and(|pod| {
        pod.metadata.deletion_timestamp.is_none()
            && pod
                .metadata
                .finalizers
                .is_some_and(|f| f.iter().any(|f| f == FINALIZER))
    });
    pod && cluster.pdb(&guard).await.is_some()
}

async fn phase(cluster: &TestCluster) -> Option<String> {
    cluster.annotation("phase").await
}

async fn wait_phase(cluster: &TestCluster, phase: &str, limit: Duration) {
    eventually(&format!("phase {phase}"), limit, async || {
        (cluster.annotation("phase").await.as_deref() == Some(phase)).then_some(())
    })
    .await;
}

async fn wait_guard(cluster: &TestCluster, limit: Duration) {
    eventually("the guard pod and its PDB", limit, async || {
        guard_in_place(cluster).await.then_some(())
    })
    .await;
}

/// A clean lab and a cluster with our node and namespace.
async fn setup() -> (Lab, TestCluster) {
    let lab = Lab::connect().await;
    lab.reset().await;
    let cluster = TestCluster::start(NOVA_HOST, NAMESPACE, AGENT_IMAGE).await;
    (lab, cluster)
}

fn host_of(server: &Value) -> String {
    server["OS-EXT-SRV-ATTR:host"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn kubectl_drain_waits_for_the_vms_and_uncordon_restores_everything() {
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    let mut ids = lab.boot(BootSpec::new("dmn-a").count(2)).await;
    ids.extend(lab.boot(BootSpec::new("dmn-d").project("demo")).await);
    let _agent = Agent::start(&cluster, &lab, "").await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    cluster.wait_guard_running(Duration::from_secs(10)).await;

    let took = cluster.drain_until_empty(&lab, NOVA_HOST, &[]).await;
    for id in &ids {
        let server = lab.server(id).await;
        assert_eq!(server["status"], "ACTIVE");
        assert_ne!(host_of(&server), NOVA_HOST);
    }
    assert!(
        took > Duration::from_secs(1),
        "drain waited for the migrations ({took:?})"
    );
    lab.assert_disabled_by_drainer(NOVA_HOST).await;
    assert_eq!(phase(&cluster).await.as_deref(), Some("Evacuated"));
    assert_eq!(cluster.annotation("vms-left").await.as_deref(), Some("0"));
    let seen = cluster.reasons().await;
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
    let events = cluster.events().await;
    let notes: Vec<String> = events
        .iter()
        .filter_map(|e| e["note"].as_str().map(str::to_string))
        .collect();
    assert!(
        ids.iter().all(|id| notes.iter().any(|n| n.contains(id.as_str()))),
        "events name the VMs"
    );
    assert!(events.iter().all(|e| e["metadata"]["namespace"] == "default"));

    cluster.uncordon().await;
    eventually(
        "the service enabled after uncordon",
        Duration::from_secs(15),
        async || (lab.service(NOVA_HOST).await["status"] == "enabled").then_some(()),
    )
    .await;
    wait_guard(&cluster, Duration::from_secs(15)).await;
    wait_phase(&cluster, "Idle", Duration::from_secs(10)).await;
    assert!(cluster.reasons().await.iter().any(|r| r == "NovaComputeEnabled"));
}

/// The drain is recorded in an Evacuation object: named in the Node's
/// annotations, owned by the Node, listed by `kubectl get evacuations` with its
/// printer columns, `Succeeded` with one entry per VM and where it went.
#[tokio::test]
async fn a_drain_is_recorded_in_an_evacuation_object() {
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    let ids: Vec<String> = lab.boot(BootSpec::new("dmn-record").count(2)).await;
    let _agent = Agent::start(&cluster, &lab, "").await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    cluster.cordon().await;
    cluster.drain_until_empty(&lab, NOVA_HOST, &[]).await;
    let name = cluster
        .annotation("evacuation")
        .await
        .expect("the Node names its Evacuation");
    let evacuation = eventually("the Evacuation Succeeded", Duration::from_secs(30), async || {
        let text = cluster
            .kubectl()
            .run(&["get", "evacuation", &name, "-o", "json"], Duration::from_secs(30))
            .await
            .ok()?;
        let evacuation: Value = serde_json::from_str(&text).ok()?;
        (evacuation["status"]["phase"] == "Succeeded").then_some(evacuation)
    })
    .await;
    assert_eq!(evacuation["spec"]["nodeName"], cluster.node());
    assert_eq!(evacuation["metadata"]["ownerReferences"][0]["kind"], "Node");
    let status = &evacuation["status"];
    assert_eq!(status["novaHost"], NOVA_HOST);
    assert_eq!(status["serviceDisabledByUs"], true);
    assert_eq!(status["counts"]["total"], 2);
    assert_eq!(status["counts"]["moved"], 2);
    assert_eq!(status["counts"]["left"], 0);
    let vms = status["vms"].as_array().expect("one entry per VM");
    let mut recorded: Vec<String> = vms
        .iter()
        .map(|vm| vm["id"].as_str().unwrap_or_default().to_string())
        .collect();
    recorded.sort();
    let mut booted = ids.clone();
    booted.sort();
    assert_eq!(recorded, booted);
    for vm in vms {
        assert_eq!(vm["outcome"], "migrated", "{vm}");
        assert_eq!(vm["source"], NOVA_HOST, "{vm}");
        assert!(vm["destination"].as_str().is_some_and(|d| d != NOVA_HOST), "{vm}");
        assert!(vm["startTime"].is_string(), "{vm}");
    }
    let listed = cluster
        .kubectl()
        .run(&["get", "evac", &name], Duration::from_secs(30))
        .await
        .expect("kubectl get evac");
    let header: Vec<&str> = listed.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "NODE", "PHASE", "QUEUE", "LEFT", "TOTAL", "FAILED", "AGE"],
        "{listed}"
    );
    assert!(listed.contains("Succeeded"), "{listed}");
    // The run's Events are about the Evacuation too, by its kind, name and uid.
    let selector = format!(
        "regarding.kind=Evacuation,regarding.name={name},regarding.uid={}",
        evacuation["metadata"]["uid"].as_str().unwrap_or_default()
    );
    let reasons = eventually("the Evacuation's Events", Duration::from_secs(30), async || {
        let text = cluster
            .kubectl()
            .run(
                &[
                    "get",
                    "events.events.k8s.io",
                    "-n",
                    "default",
                    "--field-selector",
                    &selector,
                    "-o",
                    "json",
                ],
                Duration::from_secs(30),
            )
            .await
            .ok()?;
        let events: Value = serde_json::from_str(&text).ok()?;
        let reasons: Vec<String> = events["items"]
            .as_array()?
            .iter()
            .filter_map(|e| e["reason"].as_str().map(str::to_string))
            .collect();
        reasons.iter().any(|r| r == "EvacuationSucceeded").then_some(reasons)
    })
    .await;
    for reason in ["NovaComputeDisabled", "EvacuationStarted", "LiveMigrationSucceeded"] {
        assert!(reasons.iter().any(|r| r == reason), "{reason} in {reasons:?}");
    }
}

#[tokio::test]
async fn a_node_cordoned_before_start_up_is_evacuated() {
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    let ids = lab.boot(BootSpec::new("dmn-pre").count(2)).await;
    cluster.cordon().await;
    let _agent = Agent::start(&cluster, &lab, "").await;
    wait_phase(&cluster, "Evacuated", Duration::from_secs(60)).await;
    assert!(lab.servers_on(NOVA_HOST).await.is_empty());
    for id in &ids {
        assert_ne!(host_of(&lab.server(id).await), NOVA_HOST);
    }
    assert!(
        cluster.pdb(&cluster.guard()).await.is_none(),
        "the guard is released once the hypervisor is empty"
    );
}

#[tokio::test]
async fn uncordon_mid_evacuation_aborts_and_re_enables() {
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    let stuck = lab.boot(BootSpec::new("dmn-stall").stall()).await.remove(0);
    let _agent = Agent::start(&cluster, &lab, "").await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    cluster.cordon().await;
    eventually("the live migration running", Duration::from_secs(30), async || {
        lab.server_migrations(&stuck)
            .await
            .first()
            .filter(|m| m["status"] == "running")
            .map(drop)
    })
    .await;

    let uncordoned = Instant::now();
    cluster.uncordon().await;
    eventually("the service enabled", Duration::from_secs(20), async || {
        (lab.service(NOVA_HOST).await["status"] == "enabled").then_some(())
    })
    .await;
    let reaction = uncordoned.elapsed();
    assert!(reaction < Duration::from_secs(15), "took {reaction:?}");
    let server = lab.server(&stuck).await;
    assert_eq!(server["status"], "ACTIVE");
    assert_eq!(host_of(&server), NOVA_HOST, "the aborted VM stays on its source");
    let history = lab.live_migrations(&stuck).await;
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0]["status"], "cancelled");
    wait_guard(&cluster, Duration::from_secs(15)).await;

    // A quick re-cordon/uncordon flip ends in the right state too, with no duplicate migration.
    cluster.cordon().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.uncordon().await;
    eventually("enabled after the flip", Duration::from_secs(20), async || {
        let enabled = lab.service(NOVA_HOST).await["status"] == "enabled";
        let idle = phase(&cluster).await.as_deref() == Some("Idle");
        (enabled && idle && lab.server_migrations(&stuck).await.is_empty()).then_some(())
    })
    .await;
    let history = lab.live_migrations(&stuck).await;
    assert!(history.len() <= 2, "at most one migration per cordon: {history:?}");
    assert!(history.iter().all(|m| m["status"] == "cancelled"), "{history:?}");
    assert_eq!(host_of(&lab.server(&stuck).await), NOVA_HOST);
}

#[tokio::test]
async fn a_service_disabled_by_an_operator_stays_disabled() {
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    let id = lab.boot(BootSpec::new("dmn-op")).await.remove(0);
    lab.set_service(NOVA_HOST, false, Some("RMA 4711: bad DIMM")).await;
    let _agent = Agent::start(&cluster, &lab, "").await;
    cluster.cordon().await;
    wait_phase(&cluster, "Evacuated", Duration::from_secs(60)).await;
    assert_ne!(host_of(&lab.server(&id).await), NOVA_HOST);
    cluster.uncordon().await;
    wait_phase(&cluster, "Idle", Duration::from_secs(20)).await;
    let service = lab.service(NOVA_HOST).await;
    assert_eq!(service["status"], "disabled");
    assert_eq!(service["disabled_reason"], "RMA 4711: bad DIMM");
}

#[tokio::test]
async fn nova_api_down_at_the_uncordon_delays_the_re_enable_until_it_is_back() {
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    let id = lab.boot(BootSpec::new("dmn-reenable")).await.remove(0);
    let _agent = Agent::start(&cluster, &lab, "").await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    cluster.cordon().await;
    wait_phase(&cluster, "Evacuated", Duration::from_secs(60)).await;

    lab_kill("nova-api");
    let restore = RestoreLab;
    cluster.uncordon().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        phase(&cluster).await.as_deref(),
        Some("Evacuated"),
        "not Idle while the service could not be enabled"
    );
    assert!(!cluster.reasons().await.iter().any(|r| r == "NovaComputeEnabled"));

    drop(restore); // up.sh brings nova-api back (also if an assertion above failed)
    eventually("the service enabled", Duration::from_secs(40), async || {
        (lab.service(NOVA_HOST).await["status"] == "enabled").then_some(())
    })
    .await;
    eventually("phase Idle and the guard back", Duration::from_secs(15), async || {
        (phase(&cluster).await.as_deref() == Some("Idle") && guard_in_place(&cluster).await).then_some(())
    })
    .await;
    assert!(cluster.reasons().await.iter().any(|r| r == "NovaComputeEnabled"));
    assert_ne!(host_of(&lab.server(&id).await), NOVA_HOST, "the VM stays where it went");
}

#[tokio::test]
async fn sigkill_mid_evacuation_then_restart_resumes_without_duplicate_migrations() {
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    let ids = lab.boot(BootSpec::new("dmn-kill").count(3).flavor("m1.small")).await;
    let mut agent = Agent::start(&cluster, &lab, "").await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    cluster.cordon().await;
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
        phase(&cluster).await.as_deref(),
        Some("Evacuating"),
        "progress is on the node"
    );

    let _again = Agent::start(&cluster, &lab, "").await;
    wait_phase(&cluster, "Evacuated", Duration::from_secs(90)).await;
    assert!(lab.servers_on(NOVA_HOST).await.is_empty());
    for id in &ids {
        // Nova marks a live migration's record completed 0.5-2 s after the
        // server has settled on its destination (the source's post-migration
        // resource audit comes first), so the last one may still say running.
        let history = eventually("its migration record completed", Duration::from_secs(30), async || {
            let history = lab.live_migrations(id).await;
            (history.len() != 1 || history[0]["status"] == "completed").then_some(history)
        })
        .await;
        assert_eq!(history.len(), 1, "exactly one migration of {id}: {history:?}");
        assert_eq!(history[0]["status"], "completed");
    }
    assert_ne!(host_of(&lab.server(&migrating).await), NOVA_HOST);
}

#[tokio::test]
async fn dropped_watches_and_410_gone_are_survived() {
    if real_cluster_requested() {
        eprintln!(
            "skipped on the real cluster of DRAINER_TEST_KUBECONFIG: dropping watches, compacting the watch \
             history and counting requests need the in-process API server"
        );
        return;
    }
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    let fake = cluster.fake().expect("the in-process API server");
    let id = lab.boot(BootSpec::new("dmn-watch")).await.remove(0);
    let _agent = Agent::start(&cluster, &lab, "").await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    fake.drop_watches();
    fake.compact();
    cluster.cordon().await;
    wait_phase(&cluster, "Evacuated", Duration::from_secs(60)).await;
    assert_ne!(host_of(&lab.server(&id).await), NOVA_HOST);
    let relists = fake
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
    let (lab, cluster) = setup().await;
    let stuck = lab.boot(BootSpec::new("dmn-term").stall()).await.remove(0);
    let mut agent = Agent::start(&cluster, &lab, "").await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    cluster.cordon().await;
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
    assert_eq!(phase(&cluster).await.as_deref(), Some("Evacuating"));
    // Leave the lab clean for the next test: stop the stalled migration.
    let migration = lab.server_migrations(&stuck).await[0]["id"]
        .as_u64()
        .expect("migration id");
    lab.abort_migration(&stuck, migration).await;
}

/// The `nova_drain_*` series named in a text.
fn series_named(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("nova_drain_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

/// The guard runs the agent's own image, carries our finalizer, and its budget
/// is one the disruption controller can compute (not `SyncFailed`).
#[tokio::test]
async fn the_guard_runs_the_agents_image_and_its_budget_is_computed() {
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    let agent = Agent::start(&cluster, &lab, "").await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    let pod = cluster.pod(&cluster.guard()).await.expect("guard pod");
    let spec = pod.spec.expect("spec");
    let container = &spec.containers[0];
    assert_eq!(container.image.as_deref(), Some(AGENT_IMAGE));
    assert_eq!(container.args, Some(vec!["guard".to_string()]));
    assert_eq!(spec.node_name.as_deref(), Some(cluster.node()));
    let owner = &pod.metadata.owner_references.expect("owned")[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("Node", cluster.node()));
    // The real disruption controller computes it asynchronously too.
    let budget = eventually("the budget computed", Duration::from_secs(30), async || {
        cluster
            .pdb(&cluster.guard())
            .await
            .and_then(|p| p.status)
            .filter(|s| s.expected_pods == 1 && s.current_healthy == 1)
    })
    .await;
    assert_eq!(budget.disruptions_allowed, 0);
    assert_eq!(budget.desired_healthy, 1);
    let sync_failed = budget
        .conditions
        .unwrap_or_default()
        .iter()
        .any(|c| c.reason == "SyncFailed");
    assert!(!sync_failed, "the disruption controller computes the budget");

    eventually("ready", Duration::from_secs(20), async || {
        agent.ready().await.filter(|r| *r)
    })
    .await;
    let (status, content_type, body) = agent.get("metrics").await.expect("metrics");
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(body.contains("nova_drain_guard_ready 1"), "{body}");
    assert!(body.trim_end().ends_with("# EOF"));
    // Every series the alerting rules of deploy/alerts/ use is in this scrape.
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/alerts/nova-drain.rules.yaml"
    ))
    .expect("the alerting rules");
    let without_comments: String = rules
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let used = series_named(&without_comments);
    assert!(used.len() >= 5, "{used:?}");
    for series in used {
        assert!(
            body.lines().any(|line| line
                .strip_prefix(series.as_str())
                .is_some_and(|rest| rest.starts_with([' ', '{']))),
            "{series} (used by an alert) is not in the scrape:\n{body}"
        );
    }
}

/// A guard pod that cannot start is evicted at once (the eviction API ignores
/// budgets for pods that are not Running); its finalizer still keeps the real
/// `kubectl drain` waiting until the hypervisor is empty. It is reported.
#[tokio::test]
async fn kubectl_drain_waits_even_when_the_guard_never_runs() {
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    cluster.set_kubelet(false);
    lab.boot(BootSpec::new("dmn-pending").count(2)).await;
    let agent = Agent::start_with(&cluster, &lab, "", &["--guard-grace", "2"]).await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    eventually("the guard reported", Duration::from_secs(20), async || {
        cluster
            .reasons()
            .await
            .iter()
            .any(|r| r == "DrainGuardNotRunning")
            .then_some(())
    })
    .await;
    assert_eq!(agent.ready().await, Some(false), "not ready while the guard cannot run");
    let (_, _, metrics) = agent.get("metrics").await.expect("metrics");
    assert!(metrics.contains("nova_drain_guard_ready 0"), "{metrics}");

    cluster.drain_until_empty(&lab, NOVA_HOST, &[]).await;
    assert_eq!(phase(&cluster).await.as_deref(), Some("Evacuated"));
    assert!(cluster.pod(&cluster.guard()).await.is_none());
}

#[tokio::test]
async fn kubectl_drain_with_disable_eviction_waits_for_the_vms() {
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    lab.boot(BootSpec::new("dmn-delete").count(3)).await;
    let _agent = Agent::start(&cluster, &lab, "").await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    cluster
        .drain_until_empty(&lab, NOVA_HOST, &["--disable-eviction"])
        .await;
}

/// The agent SIGKILLed while `kubectl drain` waits on the deleted guard: the
/// next agent finishes the evacuation and only then lets drain return.
#[tokio::test]
async fn an_agent_restarted_mid_drain_still_holds_it_until_the_hypervisor_is_empty() {
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    lab.boot(BootSpec::new("dmn-mid").count(3).flavor("m1.small")).await;
    // Continues the `migration:` mapping of FAST: one VM at a time, so the kill lands mid-evacuation.
    let mut agent = Agent::start(&cluster, &lab, "  max_parallel: 1\n").await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    let drain = cluster
        .kubectl()
        .drain(cluster.node(), &["--disable-eviction"], Duration::from_secs(180));
    let restart = async {
        eventually("the guard being deleted", Duration::from_secs(30), async || {
            cluster
                .pod(&cluster.guard())
                .await
                .and_then(|p| p.metadata.deletion_timestamp)
                .map(drop)
        })
        .await;
        agent.signal("KILL");
        assert!(agent.wait_exit(Duration::from_secs(5)).await.is_some());
        let left = lab.servers_on(NOVA_HOST).await.len();
        let again = Agent::start(&cluster, &lab, "").await;
        (left, again)
    };
    let (drained, (left_at_kill, _again)) = tokio::join!(drain, restart);
    drained.expect("kubectl drain succeeds");
    assert!(left_at_kill > 0, "the agent was killed mid-evacuation");
    assert!(
        lab.servers_on(NOVA_HOST).await.is_empty(),
        "drain returned while VMs were still on {NOVA_HOST}"
    );
}

/// A rolling update of the DaemonSet (its image changed) in the middle of an
/// evacuation: the old agent gets SIGTERM while its DaemonSet stays, keeps the
/// guard, and the new agent finishes the evacuation; `kubectl drain` returns
/// only once the hypervisor is empty.
#[tokio::test]
async fn a_rolling_update_mid_evacuation_keeps_the_guard_and_the_new_agent_finishes() {
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    lab.boot(BootSpec::new("dmn-rollout").count(3).flavor("m1.small")).await;
    // One VM at a time, so the update lands mid-evacuation.
    let mut agent = Agent::start(&cluster, &lab, "  max_parallel: 1\n").await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    let drain = async {
        let drained = cluster
            .kubectl()
            .drain(cluster.node(), &[], Duration::from_secs(180))
            .await;
        (drained, lab.servers_on(NOVA_HOST).await.len())
    };
    let rollout = async {
        eventually("a VM moved", Duration::from_secs(60), async || {
            let left = lab.servers_on(NOVA_HOST).await.len();
            (left < 3).then_some(())
        })
        .await;
        let new_image = r#"{"spec":{"template":{"spec":{"containers":[{"name":"drainer","image":"localhost/nova-kubernetes-drain:next"}]}}}}"#;
        cluster
            .kubectl()
            .run(
                &["-n", NAMESPACE, "patch", "daemonset", "drainer", "-p", new_image],
                Duration::from_secs(30),
            )
            .await
            .expect("kubectl patch daemonset");
        agent.signal("TERM");
        assert_eq!(agent.wait_exit(Duration::from_secs(15)).await, Some(0));
        let left = lab.servers_on(NOVA_HOST).await.len();
        let guard_kept = cluster
            .pod(&cluster.guard())
            .await
            .and_then(|p| p.metadata.finalizers)
            .is_some_and(|f| f.iter().any(|f| f == FINALIZER));
        let again = Agent::start(&cluster, &lab, "").await;
        (left, guard_kept, again)
    };
    let ((drained, left_at_return), (left_at_update, guard_kept, _again)) = tokio::join!(drain, rollout);
    drained.expect("kubectl drain succeeds");
    assert!(left_at_update > 0, "the update landed mid-evacuation");
    assert!(guard_kept, "a rolling update keeps the guard");
    assert_eq!(left_at_return, 0, "drain returned while VMs were still on {NOVA_HOST}");
}

/// Uncordoned while the guard is being deleted and a VM is still on the
/// hypervisor: the guard stays (a drain waiting on it must not return) and is
/// let go, then made anew, once the hypervisor is empty. Nothing stays stuck.
#[tokio::test]
async fn uncordon_while_the_guard_is_terminating_holds_it_until_the_hypervisor_is_empty() {
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    let stuck = lab.boot(BootSpec::new("dmn-held").stall()).await.remove(0);
    let _agent = Agent::start(&cluster, &lab, "").await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    cluster.cordon().await;
    cluster
        .kubectl()
        .delete_pod(NAMESPACE, &cluster.guard(), &[])
        .await
        .expect("kubectl delete pod");
    eventually("the live migration running", Duration::from_secs(30), async || {
        lab.server_migrations(&stuck)
            .await
            .first()
            .filter(|m| m["status"] == "running")
            .map(drop)
    })
    .await;
    cluster.uncordon().await;
    wait_phase(&cluster, "Idle", Duration::from_secs(30)).await;
    assert_eq!(host_of(&lab.server(&stuck).await), NOVA_HOST);
    assert!(
        cluster
            .pod(&cluster.guard())
            .await
            .is_some_and(|p| p.metadata.deletion_timestamp.is_some()),
        "the guard is held while a VM runs on the hypervisor"
    );

    lab.delete(&stuck).await;
    eventually("a new guard in place", Duration::from_secs(40), async || {
        guard_in_place(&cluster).await.then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_deleted_node_lets_its_guard_go() {
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    let _agent = Agent::start(&cluster, &lab, "").await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    cluster.delete_node().await;
    if !cluster.is_real() {
        // The garbage collector deletes the pods the Node owned; the fake has
        // none (on a real cluster, kube-controller-manager's does it).
        cluster
            .kubectl()
            .delete_pod(NAMESPACE, &cluster.guard(), &[])
            .await
            .expect("kubectl delete pod");
    }
    eventually("the guard gone", Duration::from_secs(60), async || {
        cluster.pod(&cluster.guard()).await.is_none().then_some(())
    })
    .await;
}

/// `drainer release-guard NODE` with the agent's kubeconfig and the lab's config; exit code and stdout.
async fn release_guard(cluster: &TestCluster, lab: &Lab, flags: &[&str]) -> (Option<i32>, String) {
    let mut args = vec![cluster.node()];
    args.extend_from_slice(flags);
    run_release_guard(cluster, lab, &args, false).await
}

/// `drainer release-guard ARGS` with the lab's config, and the agent's
/// kubeconfig or (`as_admin`) the cluster admin's; exit code and stdout.
async fn run_release_guard(cluster: &TestCluster, lab: &Lab, args: &[&str], as_admin: bool) -> (Option<i32>, String) {
    let dir = std::env::temp_dir().join(format!("drainer-release-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let kubeconfig = if as_admin {
        cluster.admin_kubeconfig(&dir)
    } else {
        let path = dir.join("kubeconfig");
        cluster.write_agent_kubeconfig(&path).await;
        path
    };
    std::fs::write(
        dir.join("config.yaml"),
        format!("{}{NOVA_HOST_CONFIG}", lab.drainer_config()),
    )
    .expect("config");
    let output = Command::new(DRAINER)
        .arg("release-guard")
        .args(args)
        .arg("-config-path")
        .arg(dir.join("config.yaml"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--namespace", NAMESPACE])
        .env_remove("KUBECONFIG")
        .output()
        .await
        .expect("run drainer release-guard");
    let _ = std::fs::remove_dir_all(&dir);
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

async fn guard_finalizers(cluster: &TestCluster) -> Vec<String> {
    cluster
        .pod(&cluster.guard())
        .await
        .and_then(|p| p.metadata.finalizers)
        .unwrap_or_default()
}

/// The agent is gone for good (here SIGKILLed and not started again): `drainer
/// release-guard` keeps the guard while Nova lists a VM on the host, releases
/// it with `--force` or once the host is empty, and removes only our
/// finalizer; so does the manual way deploy/README.md documents.
#[tokio::test]
async fn release_guard_after_the_agent_is_gone_removes_only_ours_and_only_when_empty() {
    const OTHER: &str = "example.org/keep";
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    let vm = lab.boot(BootSpec::new("dmn-release")).await.remove(0);
    let mut agent = Agent::start(&cluster, &lab, "").await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    agent.signal("KILL");
    assert!(agent.wait_exit(Duration::from_secs(5)).await.is_some());
    let guard = cluster.guard();
    cluster
        .kubectl()
        .patch_pod_json(
            NAMESPACE,
            &guard,
            &serde_json::json!([{"op": "add", "path": "/metadata/finalizers/0", "value": OTHER}]),
        )
        .await
        .expect("another finalizer");

    let (code, out) = release_guard(&cluster, &lab, &[]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("kept") && out.contains("1 server(s)"), "{out}");
    assert!(guard_in_place(&cluster).await, "kept while a VM runs on the host");

    let (code, out) = release_guard(&cluster, &lab, &["--force", "--output", "json"]).await;
    assert_eq!(code, Some(0), "{out}");
    let outcome: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(outcome[0]["outcome"], "released", "{out}");
    assert!(cluster.pdb(&guard).await.is_none(), "the budget is gone");
    assert_eq!(guard_finalizers(&cluster).await, [OTHER], "only ours is removed");

    // The manual way of deploy/README.md: find our finalizer's index, then a
    // JSON patch that tests that index before removing it.
    cluster
        .kubectl()
        .patch_pod_json(
            NAMESPACE,
            &guard,
            &serde_json::json!([{"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER}]),
        )
        .await
        .expect("our finalizer back");
    let template = format!(
        r#"{{{{range $i, $f := .metadata.finalizers}}}}{{{{if eq $f "{FINALIZER}"}}}}{{{{$i}}}}{{{{end}}}}{{{{end}}}}"#
    );
    let index = cluster
        .kubectl()
        .run(
            &[
                "-n",
                NAMESPACE,
                "get",
                "pod",
                &guard,
                "-o",
                &format!("go-template={template}"),
            ],
            Duration::from_secs(30),
        )
        .await
        .expect("kubectl get -o go-template");
    assert_eq!(index.trim(), "1");
    let remove = |at: &str| {
        serde_json::json!([
            {"op": "test", "path": format!("/metadata/finalizers/{at}"), "value": FINALIZER},
            {"op": "remove", "path": format!("/metadata/finalizers/{at}")},
        ])
    };
    assert!(
        cluster
            .kubectl()
            .patch_pod_json(NAMESPACE, &guard, &remove("0"))
            .await
            .is_err(),
        "the test at a wrong index refuses the patch"
    );
    cluster
        .kubectl()
        .patch_pod_json(NAMESPACE, &guard, &remove(index.trim()))
        .await
        .expect("the documented patch");
    assert_eq!(guard_finalizers(&cluster).await, [OTHER]);
    cluster
        .kubectl()
        .patch_pod_json(
            NAMESPACE,
            &guard,
            &serde_json::json!([{"op": "remove", "path": "/metadata/finalizers/0"}]),
        )
        .await
        .expect("the other finalizer removed");

    // The host emptied by someone else: released without --force.
    lab.delete(&vm).await;
    let mut agent = Agent::start(&cluster, &lab, "").await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    agent.signal("KILL");
    assert!(agent.wait_exit(Duration::from_secs(5)).await.is_some());
    let (code, out) = release_guard(&cluster, &lab, &[]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("Nova lists no server"), "{out}");
    assert!(guard_finalizers(&cluster).await.is_empty());
    assert!(cluster.pdb(&guard).await.is_none());
    let (code, out) = release_guard(&cluster, &lab, &[]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("no guard of ours"), "{out}");
}

/// SIGTERM from a rolling update (its DaemonSet stays) keeps the guard for the
/// next agent; SIGTERM after its DaemonSet was deleted (an uninstall) releases
/// the guard of the idle node, VMs and all (nothing drains it), so a later
/// `kubectl drain` returns at once instead of waiting for ever.
#[tokio::test]
async fn deleting_the_daemonset_releases_an_idle_guard_and_a_later_drain_returns_at_once() {
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    if cluster.is_real() {
        // The agent runs outside the cluster there: no DaemonSet pod of its own to judge by.
        eprintln!("skipped on a real cluster: the agent's own DaemonSet pod exists only on the fake");
        return;
    }
    lab.boot(BootSpec::new("dmn-uninstall")).await;
    let mut agent = Agent::start(&cluster, &lab, "").await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(15)).await, Some(0));
    assert!(guard_in_place(&cluster).await, "a restart keeps the guard");

    let mut agent = Agent::start(&cluster, &lab, "").await;
    eventually("the agent ready", Duration::from_secs(30), async || {
        (agent.ready().await == Some(true)).then_some(())
    })
    .await;
    cluster
        .kubectl()
        .run(
            &["-n", NAMESPACE, "delete", "daemonset", "drainer", "--wait=false"],
            Duration::from_secs(30),
        )
        .await
        .expect("kubectl delete daemonset");
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(15)).await, Some(0));
    assert!(cluster.pdb(&cluster.guard()).await.is_none(), "the budget is gone");
    assert!(guard_finalizers(&cluster).await.is_empty(), "our finalizer is gone");
    // The garbage collector deletes the pods of a deleted DaemonSet; the fake has none.
    let agent_pod = format!("drainer-{}", cluster.node());
    cluster
        .kubectl()
        .delete_pod(NAMESPACE, &agent_pod, &[])
        .await
        .expect("kubectl delete pod");
    eventually("the agent's pod gone", Duration::from_secs(30), async || {
        cluster.pod(&agent_pod).await.is_none().then_some(())
    })
    .await;

    cluster.cordon().await;
    let took = cluster
        .kubectl()
        .drain(cluster.node(), &[], Duration::from_secs(60))
        .await
        .expect("kubectl drain");
    assert!(took < Duration::from_secs(30), "drain returned after {took:?}");
}

/// `kubectl delete -k deploy/` in one step, the agent running: Kubernetes
/// refuses the agent's token once its ServiceAccount is deleted, in the same
/// instant as the DaemonSet, so the agent stopped by the uninstall cannot
/// release its guard and the namespace stays Terminating (as observed on
/// kube-apiserver 1.36). `drainer release-guard --all`, run with the
/// operator's credentials, releases it: the namespace goes within 60 s of the
/// delete and a later `kubectl drain` returns at once.
#[tokio::test]
async fn uninstalling_in_one_step_then_release_guard_all_leaves_nothing_of_ours() {
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");
    if !cluster.is_real() {
        // A real cluster got it at start; the fake serves no OpenAPI document
        // for kubectl's client-side schema check.
        cluster
            .kubectl()
            .run(&["apply", "-k", deploy, "--validate=false"], Duration::from_secs(60))
            .await
            .expect("kubectl apply -k deploy/");
    }
    let mut agent = Agent::start(&cluster, &lab, "").await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    // A hand-made Evacuation the agent holds with its finalizer.
    let held = format!("uninstall-{}", cluster.node());
    apply_evacuation(&cluster, &held, true).await;
    eventually("the Evacuation held", Duration::from_secs(30), async || {
        let finalizers = cluster
            .kubectl()
            .run(
                &["get", "evacuation", &held, "-o", "jsonpath={.metadata.finalizers}"],
                Duration::from_secs(30),
            )
            .await
            .ok()?;
        finalizers
            .contains("nova-kubernetes-drain.io/maintenance")
            .then_some(())
    })
    .await;

    let uninstalled_at = Instant::now();
    cluster
        .kubectl()
        .run(&["delete", "-k", deploy, "--wait=false"], Duration::from_secs(60))
        .await
        .expect("kubectl delete -k deploy/");
    eventually("the agent's ServiceAccount gone", Duration::from_secs(30), async || {
        cluster.service_account("drainer").await.is_none().then_some(())
    })
    .await;
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(15)).await, Some(0));
    assert_eq!(
        guard_finalizers(&cluster).await,
        [FINALIZER],
        "the agent could not release the guard without credentials"
    );

    let (code, out) = run_release_guard(&cluster, &lab, &["--all"], true).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("released"), "{out}");
    assert!(out.contains(&format!("Evacuation {held} let go")), "{out}");
    eventually("the namespace gone", Duration::from_secs(60), async || {
        cluster.namespace_object().await.is_none().then_some(())
    })
    .await;
    eventually("the Evacuation CRD gone", Duration::from_secs(60), async || {
        let crd = cluster
            .kubectl()
            .run(
                &[
                    "get",
                    "crd",
                    "evacuations.nova-kubernetes-drain.io",
                    "--ignore-not-found",
                    "-o",
                    "name",
                ],
                Duration::from_secs(30),
            )
            .await
            .ok()?;
        crd.trim().is_empty().then_some(())
    })
    .await;
    let took = uninstalled_at.elapsed();
    assert!(took < Duration::from_secs(60), "the uninstall took {took:?}");

    cluster.cordon().await;
    let drained = cluster
        .kubectl()
        .drain(cluster.node(), &[], Duration::from_secs(60))
        .await
        .expect("kubectl drain");
    assert!(drained < Duration::from_secs(30), "drain returned after {drained:?}");
}

/// Keystone and nova-api down when the agent starts: it does not exit, reports
/// not ready, and acts on a cordon made during the outage once they are back.
#[tokio::test]
async fn nova_and_keystone_down_at_start_up_are_outlived() {
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    let id = lab.boot(BootSpec::new("dmn-outage")).await.remove(0);
    lab_kill("nova-api");
    lab_kill("keystone");
    let restore = RestoreLab;
    let mut agent = Agent::start(&cluster, &lab, "").await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    cluster.cordon().await;
    assert_eq!(
        agent.wait_exit(Duration::from_secs(5)).await,
        None,
        "the agent keeps running through the outage"
    );
    assert_eq!(agent.ready().await, Some(false));
    assert_ne!(phase(&cluster).await.as_deref(), Some("Evacuated"));

    drop(restore); // up.sh brings Keystone and nova-api back
    wait_phase(&cluster, "Evacuated", Duration::from_secs(90)).await;
    assert_ne!(host_of(&lab.server(&id).await), NOVA_HOST);
    eventually("ready", Duration::from_secs(10), async || {
        agent.ready().await.filter(|r| *r)
    })
    .await;
    cluster.uncordon().await;
    wait_phase(&cluster, "Idle", Duration::from_secs(30)).await;
    assert_eq!(lab.service(NOVA_HOST).await["status"], "enabled");
}

#[tokio::test]
async fn a_bad_password_still_exits_2() {
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    let config = lab.drainer_config().replace("Password: admin", "Password: wrong");
    assert_ne!(config, lab.drainer_config(), "the config names the password");
    let dir = std::env::temp_dir().join(format!("drainer-badpass-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("config.yaml"), config).expect("config");
    cluster.write_agent_kubeconfig(&dir.join("kubeconfig")).await;
    let identity = cluster.agent_identity();
    let status = Command::new(DRAINER)
        .arg("-daemon")
        .arg("-config-path")
        .arg(dir.join("config.yaml"))
        .arg("--kubeconfig")
        .arg(dir.join("kubeconfig"))
        .args([
            "--node",
            cluster.node(),
            "--namespace",
            NAMESPACE,
            "--listen",
            "127.0.0.1:0",
        ])
        .args(&identity.flags)
        .env_remove("KUBECONFIG")
        .env_remove("NODE_NAME")
        .env_remove("POD_NAME")
        .envs(identity.env)
        .kill_on_drop(true)
        .status();
    let status = tokio::time::timeout(Duration::from_secs(30), status)
        .await
        .expect("exits")
        .expect("runs");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(status.code(), Some(2), "refused credentials can never work");
}

/// `drainer guard`, what the guard pod runs: waits, and exits 0 on SIGTERM.
#[tokio::test]
async fn the_guard_process_waits_for_sigterm() {
    let mut guard = Command::new(DRAINER)
        .arg("guard")
        .kill_on_drop(true)
        .spawn()
        .expect("start drainer guard");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), guard.wait())
            .await
            .is_err(),
        "it waits"
    );
    let pid = guard.id().expect("running").to_string();
    let killed = std::process::Command::new("kill").args(["-TERM", &pid]).status();
    assert!(killed.expect("kill").success());
    let status = tokio::time::timeout(Duration::from_secs(5), guard.wait())
        .await
        .expect("exits on SIGTERM")
        .expect("status");
    assert_eq!(status.code(), Some(0));
}

/// `kubectl apply` of a hand-written Evacuation of the test's node.
async fn apply_evacuation(cluster: &TestCluster, name: &str, paused: bool) {
    let manifest = std::env::temp_dir().join(format!("{name}-{}.yaml", std::process::id()));
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: nova-kubernetes-drain.io/v1alpha1\nkind: Evacuation\nmetadata:\n  name: {name}\nspec:\n  \
             nodeName: {}\n  paused: {paused}\n",
            cluster.node()
        ),
    )
    .expect("write the manifest");
    let path = manifest.to_string_lossy().to_string();
    cluster
        .kubectl()
        .run(&["apply", "--validate=false", "-f", &path], Duration::from_secs(30))
        .await
        .expect("kubectl apply");
    let _ = std::fs::remove_file(manifest);
}

/// A unique name for an Evacuation made by a test (a real cluster keeps earlier ones).
fn unique_evacuation_name(prefix: &str, cluster: &TestCluster) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!("{prefix}-{}-{now}", cluster.node())
}

/// Hypervisor-only maintenance, as an operator does it with kubectl: a
/// hand-written Evacuation with `paused: true` gets the plan and nothing
/// changes in Nova; unpaused, the hypervisor is emptied while the node stays
/// schedulable; `kubectl delete` (which waits for our finalizer) re-enables
/// the service before the object goes.
#[tokio::test]
async fn a_hand_made_evacuation_is_planned_approved_run_and_deleted() {
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    let ids: Vec<String> = lab.boot(BootSpec::new("dmn-hand").count(2)).await;
    let _agent = Agent::start(&cluster, &lab, "").await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    let name = unique_evacuation_name("maintenance", &cluster);
    apply_evacuation(&cluster, &name, true).await;
    let kubectl = cluster.kubectl();
    let get = async || -> Option<Value> {
        let text = kubectl
            .run(&["get", "evacuation", &name, "-o", "json"], Duration::from_secs(30))
            .await
            .ok()?;
        serde_json::from_str(&text).ok()
    };
    let planned = eventually("the plan", Duration::from_secs(60), async || {
        get().await.filter(|e| e["status"]["phase"] == "Paused")
    })
    .await;
    let vms = planned["status"]["vms"].as_array().cloned().unwrap_or_default();
    assert_eq!(vms.len(), 2, "{planned}");
    for vm in &vms {
        assert_eq!(
            (vm["outcome"].as_str(), vm["action"].as_str()),
            (Some("planned"), Some("live-migrate")),
            "{vm}"
        );
    }
    assert_eq!(planned["status"]["plan"]["liveMigrations"], 2, "{planned}");
    assert_eq!(planned["status"]["plan"]["expectedResult"], "succeeded", "{planned}");
    let approved = planned["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Approved").cloned())
        .unwrap_or_default();
    assert_eq!(
        (&approved["status"], &approved["reason"]),
        (&Value::from("False"), &Value::from("Paused")),
        "{planned}"
    );
    assert!(
        planned["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "nova-kubernetes-drain.io/maintenance")),
        "{planned}"
    );
    assert_eq!(
        lab.service(NOVA_HOST).await["status"],
        "enabled",
        "nothing changed in Nova"
    );
    assert_eq!(lab.servers_on(NOVA_HOST).await.len(), 2);

    kubectl
        .run(
            &[
                "patch",
                "evacuation",
                &name,
                "--type",
                "merge",
                "-p",
                r#"{"spec":{"paused":false}}"#,
            ],
            Duration::from_secs(30),
        )
        .await
        .expect("kubectl patch");
    kubectl
        .run(
            &[
                "wait",
                "--for=condition=HypervisorEmpty",
                &format!("evacuation/{name}"),
                "--timeout=240s",
            ],
            Duration::from_secs(250),
        )
        .await
        .expect("kubectl wait for the hypervisor empty");
    let done = eventually("the run recorded Succeeded", Duration::from_secs(30), async || {
        get().await.filter(|e| e["status"]["phase"] == "Succeeded")
    })
    .await;
    assert_eq!(done["status"]["counts"]["moved"], 2, "{done}");
    assert!(lab.servers_on(NOVA_HOST).await.is_empty());
    assert_eq!(
        lab.service(NOVA_HOST).await["status"],
        "disabled",
        "disabled while the Evacuation exists"
    );
    for id in &ids {
        assert_eq!(lab.server(id).await["status"], "ACTIVE");
    }
    let node = kubectl
        .run(&["get", "node", cluster.node(), "-o", "json"], Duration::from_secs(30))
        .await
        .expect("kubectl get node");
    let node: Value = serde_json::from_str(&node).expect("a Node");
    assert_ne!(node["spec"]["unschedulable"], true, "the node was never cordoned");

    kubectl
        .run(
            &["delete", "evacuation", &name, "--timeout=90s"],
            Duration::from_secs(120),
        )
        .await
        .expect("kubectl delete returns once our finalizer is off");
    assert_eq!(
        lab.service(NOVA_HOST).await["status"],
        "enabled",
        "re-enabled before the object went"
    );
    assert!(get().await.is_none());
}

/// Per-VM policy on a cordon: `nova-drain:stop` is stopped (and marked),
/// `nova-drain:leave` on a VM its owner stopped stays untouched, the Node's
/// `vm-action` annotation cold-migrates the untagged one; drain returns. A
/// new agent (the first one killed) sees the uncordon and starts the VM we
/// stopped, never the one its owner stopped.
#[tokio::test]
async fn tags_and_the_node_default_decide_per_vm_and_stopped_vms_start_after_the_uncordon() {
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    let ids: Vec<String> = lab.boot(BootSpec::new("dmn-tags").count(3)).await;
    let (to_stop, owners, untagged) = (&ids[0], &ids[1], &ids[2]);
    lab.nova(
        reqwest::Method::POST,
        &format!("/servers/{owners}/action"),
        Some(serde_json::json!({"os-stop": null})),
    )
    .await;
    lab.wait_server(owners, "SHUTOFF", |s| {
        s["status"] == "SHUTOFF" && s["OS-EXT-STS:task_state"].is_null()
    })
    .await;
    for (id, tag) in [(to_stop, "nova-drain:stop"), (owners, "nova-drain:leave")] {
        lab.nova(reqwest::Method::PUT, &format!("/servers/{id}/tags/{tag}"), None)
            .await;
    }
    let kubectl = cluster.kubectl();
    kubectl
        .run(
            &[
                "annotate",
                "node",
                cluster.node(),
                "nova-kubernetes-drain/vm-action=cold-migrate",
            ],
            Duration::from_secs(30),
        )
        .await
        .expect("kubectl annotate");
    let agent = Agent::start(&cluster, &lab, "").await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    kubectl
        .drain(cluster.node(), &[], Duration::from_secs(180))
        .await
        .expect("kubectl drain returns");
    let tags = |server: &Value| -> Vec<String> {
        server["tags"]
            .as_array()
            .map(|t| t.iter().filter_map(|t| t.as_str().map(String::from)).collect())
            .unwrap_or_default()
    };
    let stopped = lab.server(to_stop).await;
    assert_eq!(
        (&stopped["status"], host_of(&stopped)),
        (&Value::from("SHUTOFF"), NOVA_HOST.to_string())
    );
    assert!(
        tags(&stopped).contains(&"nova-drain:stopped-by-drainer".to_string()),
        "{stopped}"
    );
    let left = lab.server(owners).await;
    assert_eq!(
        (&left["status"], host_of(&left)),
        (&Value::from("SHUTOFF"), NOVA_HOST.to_string())
    );
    assert_eq!(tags(&left), ["nova-drain:leave"]);
    let moved = lab.server(untagged).await;
    assert_ne!(host_of(&moved), NOVA_HOST);
    assert!(
        lab.live_migrations(untagged).await.is_empty(),
        "cold, as the node's default says"
    );
    let on_host: Vec<String> = lab
        .servers_on(NOVA_HOST)
        .await
        .iter()
        .map(|s| s["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(on_host.len(), 2, "only the stopped and the left one: {on_host:?}");

    drop(agent);
    let _agent = Agent::start(&cluster, &lab, "").await;
    cluster.uncordon().await;
    eventually(
        "the VM we stopped started again",
        Duration::from_secs(120),
        async || {
            let server = lab.server(to_stop).await;
            (server["status"] == "ACTIVE" && !tags(&server).contains(&"nova-drain:stopped-by-drainer".to_string()))
                .then_some(())
        },
    )
    .await;
    assert_eq!(lab.service(NOVA_HOST).await["status"], "enabled");
    assert_eq!(
        lab.server(owners).await["status"],
        "SHUTOFF",
        "its owner stopped it: never started by us"
    );
    kubectl
        .run(
            &["annotate", "node", cluster.node(), "nova-kubernetes-drain/vm-action-"],
            Duration::from_secs(30),
        )
        .await
        .expect("kubectl annotate");
}

/// `kubectl delete` of a hand-made Evacuation mid-run: the in-flight
/// migration is aborted, the VM stays (ACTIVE) on the hypervisor, and the
/// service is re-enabled before the object goes.
#[tokio::test]
async fn deleting_a_running_hand_made_evacuation_cancels_it_and_re_enables() {
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    let stuck = lab.boot(BootSpec::new("dmn-hand-held").stall()).await.remove(0);
    let _agent = Agent::start(&cluster, &lab, "").await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    let name = unique_evacuation_name("cancel-me", &cluster);
    apply_evacuation(&cluster, &name, false).await;
    eventually("the live migration running", Duration::from_secs(60), async || {
        lab.server_migrations(&stuck)
            .await
            .first()
            .filter(|m| m["status"] == "running")
            .map(drop)
    })
    .await;
    assert_eq!(lab.service(NOVA_HOST).await["status"], "disabled");
    cluster
        .kubectl()
        .run(
            &["delete", "evacuation", &name, "--timeout=90s"],
            Duration::from_secs(120),
        )
        .await
        .expect("kubectl delete returns once the maintenance has ended");
    assert_eq!(
        lab.service(NOVA_HOST).await["status"],
        "enabled",
        "re-enabled before the object went"
    );
    let server = lab.server(&stuck).await;
    assert_eq!(
        (host_of(&server), &server["status"]),
        (NOVA_HOST.to_string(), &Value::from("ACTIVE"))
    );
    let in_progress = lab.server_migrations(&stuck).await;
    assert!(in_progress.is_empty(), "no move left in progress: {in_progress:?}");
    let records = lab.live_migrations(&stuck).await;
    assert!(
        records.iter().any(|m| m["status"] == "cancelled"),
        "the move was aborted: {records:?}"
    );
    lab.delete(&stuck).await;
}

/// Nova's record timestamps (`2026-12-07T16:10:54.000000`, UTC, whole seconds).
fn nova_time(value: &Value) -> jiff::Timestamp {
    let text = value.as_str().expect("a timestamp");
    let civil: jiff::civil::DateTime = text.parse().expect("Nova's timestamp");
    civil.to_zoned(jiff::tz::TimeZone::UTC).expect("UTC").timestamp()
}

/// An RFC 3339 time of a Kubernetes object (`eventTime`).
fn event_time(value: &Value) -> jiff::Timestamp {
    value.as_str().and_then(|t| t.parse().ok()).expect("an RFC 3339 time")
}

/// Three nodes cordoned within a second, with the default of one hypervisor
/// evacuating at a time across the cluster: they evacuate one after another,
/// in cordon order, as Nova's own migration records show (the records of one
/// host all end before the next host's first begins); meanwhile the waiting
/// ones have their service disabled, so every VM goes to the fourth host.
#[tokio::test]
async fn three_nodes_cordoned_at_once_evacuate_one_at_a_time_in_cordon_order() {
    let _exclusive = Lab::exclusive().await;
    let (lab, first) = setup().await;
    let second = first.join("host2").await;
    let third = first.join("host3").await;
    let nodes = [(&first, "host1"), (&second, "host2"), (&third, "host3")];
    let mut vms = Vec::new();
    for (_, host) in nodes {
        vms.push(
            lab.boot(BootSpec::new(&format!("dmn-q-{host}")).count(2).host(host))
                .await,
        );
    }
    let mut agents = Vec::new();
    for (cluster, _) in nodes {
        agents.push(Agent::start(cluster, &lab, "").await);
    }
    for (cluster, _) in nodes {
        wait_guard(cluster, Duration::from_secs(20)).await;
    }
    let cordoned = Instant::now();
    for (cluster, _) in nodes {
        cluster.cordon().await;
    }
    eprintln!("three nodes cordoned in {:.2} s", cordoned.elapsed().as_secs_f64());
    wait_phase(&third, "Waiting", Duration::from_secs(20)).await;
    eventually("host3 disabled while it waits", Duration::from_secs(10), async || {
        (lab.service("host3").await["status"] == "disabled").then_some(())
    })
    .await;
    lab.assert_disabled_by_drainer("host3").await;
    for (cluster, _) in nodes {
        wait_phase(cluster, "Evacuated", Duration::from_secs(240)).await;
    }
    // Each host's span in Nova's records: its first migration's creation to its last one's end.
    let mut spans = Vec::new();
    for (ids, (_, host)) in vms.iter().zip(nodes) {
        let mut records = Vec::new();
        for id in ids {
            records.extend(lab.live_migrations(id).await);
            assert_eq!(
                host_of(&lab.server(id).await),
                "host4",
                "{id} went to the one host not in maintenance"
            );
        }
        assert!(records.iter().all(|r| r["source_compute"] == host), "{records:?}");
        let start = records
            .iter()
            .map(|r| nova_time(&r["created_at"]))
            .min()
            .expect("records");
        let end = records
            .iter()
            .map(|r| nova_time(&r["updated_at"]))
            .max()
            .expect("records");
        spans.push((host, start, end));
    }
    for pair in spans.windows(2) {
        let ((before, _, ended), (after, began, _)) = (pair[0], pair[1]);
        assert!(ended <= began, "{before}'s migrations overlap {after}'s: {spans:?}");
        eprintln!(
            "from {before}'s last migration's end to {after}'s first migration: {} s (whole seconds, Nova's clock)",
            began.duration_since(ended).as_secs()
        );
    }
    // The same, by the agents' Events (to the microsecond): one run's end to the next one's first migration.
    let mut times = Vec::new();
    for (cluster, _) in nodes {
        let events = cluster.events().await;
        let at = |reason: &str| {
            events
                .iter()
                .find(|e| e["reason"] == reason)
                .map(|e| event_time(&e["eventTime"]))
                .unwrap_or_else(|| panic!("no {reason} Event"))
        };
        times.push((at("LiveMigrationStarted"), at("EvacuationSucceeded")));
    }
    let handovers: Vec<f64> = times
        .windows(2)
        .map(|w| w[1].0.duration_since(w[0].1).as_secs_f64())
        .collect();
    eprintln!("from one evacuation's end to the next one's first migration (agents' Events): {handovers:.3?} s");
    assert!(handovers.iter().all(|s| *s > 0.0), "overlap: {handovers:?}");
    for cluster in [&second, &third] {
        let reasons = cluster.reasons().await;
        assert!(reasons.iter().any(|r| r == "EvacuationWaiting"), "{reasons:?}");
        assert!(reasons.iter().any(|r| r == "EvacuationSlotTaken"), "{reasons:?}");
    }
    for (cluster, host) in nodes {
        cluster.uncordon().await;
        eventually(
            "the service enabled after uncordon",
            Duration::from_secs(20),
            async || (lab.service(host).await["status"] == "enabled").then_some(()),
        )
        .await;
    }
}

/// The agent cut off from the API server mid-evacuation (a proxy between
/// them, cut): it cannot renew its evacuation slot, so half a slot lease
/// after its last renewal it aborts its live migration and starts no other,
/// before the slot can expire for any other agent. Mended, it takes its slot
/// back and goes on; the uncordon then ends the maintenance as usual.
#[tokio::test]
async fn an_agent_cut_off_from_the_api_server_stops_migrating_before_its_slot_can_expire() {
    const LEASE: Duration = Duration::from_secs(12);
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    let stuck = lab.boot(BootSpec::new("dmn-cut").stall()).await.remove(0);
    let (agent, proxy) = Agent::start_through_proxy(&cluster, &lab, &["--slot-lease", "12"]).await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    cluster.cordon().await;
    eventually("the live migration running", Duration::from_secs(30), async || {
        lab.server_migrations(&stuck)
            .await
            .first()
            .filter(|m| m["status"] == "running")
            .map(drop)
    })
    .await;

    proxy.cut(true);
    let cut = Instant::now();
    eventually("the migration aborted", LEASE, async || {
        (lab.live_migrations(&stuck).await.first()?["status"] == "cancelled").then_some(())
    })
    .await;
    let aborted = cut.elapsed();
    eprintln!(
        "cut off from the API server: the live migration aborted {:.1} s later (slot lease {LEASE:?})",
        aborted.as_secs_f64()
    );
    // Its last renewal was sent before the cut: no other agent could take the slot yet.
    assert!(aborted < LEASE, "{aborted:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        lab.live_migrations(&stuck).await.len(),
        1,
        "no migration started while cut off"
    );
    assert_eq!(host_of(&lab.server(&stuck).await), NOVA_HOST);

    proxy.cut(false);
    eventually("migrating again once mended", Duration::from_secs(60), async || {
        (lab.live_migrations(&stuck).await.len() == 2).then_some(())
    })
    .await;
    // Said once the API server can be reached again: the Event, and the metric meanwhile.
    eventually("the EvacuationSlotLost Event", Duration::from_secs(30), async || {
        cluster
            .reasons()
            .await
            .iter()
            .any(|r| r == "EvacuationSlotLost")
            .then_some(())
    })
    .await;
    let (_, _, metrics) = agent.get("metrics").await.expect("/metrics");
    assert!(metrics.contains("nova_drain_slots_lost_total 1"), "{metrics}");
    let reasons = cluster.reasons().await;
    assert!(!reasons.iter().any(|r| r == "EvacuationFailed"), "{reasons:?}");
    cluster.uncordon().await;
    wait_phase(&cluster, "Idle", Duration::from_secs(30)).await;
    assert_eq!(lab.service(NOVA_HOST).await["status"], "enabled");
    assert_eq!(host_of(&lab.server(&stuck).await), NOVA_HOST);
}

/// The agent holding the cluster's one evacuation slot SIGKILLed mid-run: the
/// node waiting behind it takes the slot only once the Lease has gone
/// unrenewed for its time (`--slot-lease 10`), then evacuates. The killed
/// node's agent, started again, takes its turn and follows the migration
/// its predecessor left in flight; the uncordon ends it as usual.
#[tokio::test]
async fn a_killed_holders_slot_goes_to_the_next_node_after_the_lease_time() {
    const LEASE: Duration = Duration::from_secs(10);
    let _exclusive = Lab::exclusive().await;
    let (lab, first) = setup().await;
    let second = first.join("host2").await;
    let stuck = lab.boot(BootSpec::new("dmn-kill-holder").stall()).await.remove(0);
    let waiting = lab.boot(BootSpec::new("dmn-next").host("host2")).await.remove(0);
    let flags = ["--slot-lease", "10"];
    let mut holder = Agent::start_with(&first, &lab, "", &flags).await;
    let _next = Agent::start_with(&second, &lab, "", &flags).await;
    wait_guard(&first, Duration::from_secs(20)).await;
    wait_guard(&second, Duration::from_secs(20)).await;
    first.cordon().await;
    eventually(
        "the first node's migration running",
        Duration::from_secs(30),
        async || {
            lab.server_migrations(&stuck)
                .await
                .first()
                .filter(|m| m["status"] == "running")
                .map(drop)
        },
    )
    .await;
    second.cordon().await;
    wait_phase(&second, "Waiting", Duration::from_secs(20)).await;

    holder.signal("KILL");
    assert!(holder.wait_exit(Duration::from_secs(5)).await.is_some());
    let killed = jiff::Timestamp::now();
    wait_phase(&second, "Evacuated", Duration::from_secs(60)).await;
    let took = second
        .events()
        .await
        .iter()
        .find(|e| e["reason"] == "EvacuationSlotTaken")
        .map(|e| event_time(&e["eventTime"]))
        .expect("an EvacuationSlotTaken Event");
    let after = took.duration_since(killed).as_secs_f64();
    eprintln!("the killed holder's slot taken {after:.1} s after the kill (slot lease {LEASE:?})");
    // Its last renewal came at most a third of the lease before the kill.
    assert!(
        after >= LEASE.as_secs_f64() * 2.0 / 3.0 - 1.0,
        "taken before it could expire: {after:.1} s"
    );
    assert_ne!(host_of(&lab.server(&waiting).await), "host2");

    // Started again, the killed node's agent takes the free slot and follows the migration in flight.
    let _again = Agent::start_with(&first, &lab, "", &flags).await;
    wait_phase(&first, "Evacuating", Duration::from_secs(30)).await;
    assert_eq!(
        lab.live_migrations(&stuck).await.len(),
        1,
        "no second migration of the same VM"
    );
    first.uncordon().await;
    wait_phase(&first, "Idle", Duration::from_secs(30)).await;
    assert_eq!(lab.service(NOVA_HOST).await["status"], "enabled");
    assert_eq!(host_of(&lab.server(&stuck).await), NOVA_HOST);
    second.uncordon().await;
    wait_phase(&second, "Idle", Duration::from_secs(30)).await;
}

/// Two slots (`--max-evacuating 2`), three nodes cordoned at once: two
/// evacuate side by side and the third waits for one of them; never three
/// at once, as the Nodes' phases show throughout.
#[tokio::test]
async fn with_two_slots_three_nodes_cordoned_at_once_never_evacuate_three_together() {
    let _exclusive = Lab::exclusive().await;
    let (lab, first) = setup().await;
    let second = first.join("host2").await;
    let third = first.join("host3").await;
    let nodes = [(&first, "host1"), (&second, "host2"), (&third, "host3")];
    for (_, host) in nodes {
        lab.boot(BootSpec::new(&format!("dmn-two-{host}")).count(2).host(host))
            .await;
    }
    let flags = ["--max-evacuating", "2", "--max-live-migrations", "2"];
    let mut agents = Vec::new();
    for (cluster, _) in nodes {
        agents.push(Agent::start_with(cluster, &lab, "", &flags).await);
        wait_guard(cluster, Duration::from_secs(20)).await;
    }
    for (cluster, _) in nodes {
        cluster.cordon().await;
    }
    let mut most = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let mut phases = Vec::new();
        for (cluster, _) in nodes {
            phases.push(phase(cluster).await.unwrap_or_default());
        }
        let evacuating = phases.iter().filter(|p| *p == "Evacuating").count();
        assert!(evacuating <= 2, "three at once: {phases:?}");
        most = most.max(evacuating);
        if phases.iter().all(|p| p == "Evacuated") {
            break;
        }
        assert!(Instant::now() < deadline, "not all evacuated: {phases:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(most, 2, "two side by side");
    let waited = third.reasons().await;
    assert!(waited.iter().any(|r| r == "EvacuationSlotTaken"), "{waited:?}");
    for (_, host) in nodes {
        assert!(lab.servers_on(host).await.is_empty(), "{host} emptied");
    }
    for (cluster, _) in nodes {
        cluster.uncordon().await;
    }
    for (cluster, _) in nodes {
        wait_phase(cluster, "Idle", Duration::from_secs(30)).await;
    }
}

// ---------------------------------------------------------------------------
// Memory relief: the lab's hypervisors' memory from files the tests write
// (`support::memory`: MemAvailable = total - what the test says is used -
// the flavor RAM of the VMs Nova places there, so a VM that leaves frees it).
// ---------------------------------------------------------------------------

/// MemTotal of each simulated hypervisor, MiB.
const HOST_MIB: u64 = 16384;
/// Relief threshold and margin of the tests (MiB): relieved at 2304.
const THRESHOLD_MIB: u64 = 2048;
const RELIEVED_MIB: u64 = 2304;

/// The agent's memory relief flags, reading `meminfo` (window 3 s, read every second).
fn relief_flags(meminfo: &std::path::Path, window: &str) -> Vec<String> {
    [
        "--memory-relief",
        "on",
        "--meminfo-path",
        &meminfo.to_string_lossy(),
        "--memory-threshold",
        &format!("{THRESHOLD_MIB}Mi"),
        "--memory-margin",
        &format!("{}Mi", RELIEVED_MIB - THRESHOLD_MIB),
        "--memory-window",
        window,
        "--memory-sample-interval",
        "1",
        "--relief-host-cool-down",
        "5",
        "--slot-lease",
        "6",
    ]
    .map(str::to_string)
    .to_vec()
}

async fn start_relieving(cluster: &TestCluster, lab: &Lab, meminfo: &std::path::Path, window: &str) -> Agent {
    // A pause a killed run left on a real cluster would hold every move.
    let unpause = [
        "-n",
        NAMESPACE,
        "delete",
        "configmap",
        "nova-drain-memory-relief",
        "--ignore-not-found",
    ];
    cluster
        .kubectl()
        .run(&unpause, Duration::from_secs(30))
        .await
        .expect("unpause");
    let flags = relief_flags(meminfo, window);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Agent::start_with(cluster, lab, "", &flags).await
}

/// The VmMigrations of the cluster's node, oldest first.
async fn vm_migrations(cluster: &TestCluster) -> Vec<Value> {
    let listed = cluster
        .kubectl()
        .run(&["get", "vmmigrations", "-o", "json"], Duration::from_secs(30))
        .await
        .expect("kubectl get vmmigrations");
    let listed: Value = serde_json::from_str(&listed).expect("a list");
    let mut items: Vec<Value> = listed["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m["spec"]["nodeName"] == cluster.node())
        .collect();
    items.sort_by_key(|m| m["status"]["startTime"].as_str().unwrap_or_default().to_string());
    items
}

async fn wait_vm_migration(cluster: &TestCluster, phase: &str, limit: Duration) -> Value {
    eventually(&format!("a VmMigration {phase}"), limit, async || {
        vm_migrations(cluster)
            .await
            .into_iter()
            .find(|m| m["status"]["phase"] == phase)
    })
    .await
}

async fn wait_event(cluster: &TestCluster, reason: &str, containing: &str, limit: Duration) -> String {
    eventually(&format!("Event {reason} ({containing})"), limit, async || {
        cluster.events().await.into_iter().find_map(|e| {
            let note = e["note"].as_str().unwrap_or_default();
            (e["reason"] == reason && note.contains(containing)).then(|| note.to_string())
        })
    })
    .await
}

/// Sustained pressure on host1 moves the fewest VMs that relieve it (one
/// 512 MiB VM for 504 MiB short, not the 4096 MiB one, which is tagged to
/// stay anyway), to the one host neither short of memory (host2, its agent
/// says so) nor in maintenance (host3, disabled): host4. The VM just moved
/// is then not moved again from host4 (cool-down), though host4 runs short.
#[tokio::test]
async fn sustained_memory_pressure_moves_the_fewest_vms_to_a_host_with_room_never_one_tagged_to_stay() {
    let _exclusive = Lab::exclusive().await;
    let (lab, first) = setup().await;
    let lab = std::sync::Arc::new(lab);
    let second = first.join("host2").await;
    let fourth = first.join("host4").await;
    let stay = lab.boot(BootSpec::new("rlf-stay").flavor("m1.large")).await;
    lab.nova(
        reqwest::Method::PUT,
        &format!("/servers/{}/tags/nova-drain:leave", stay[0]),
        None,
    )
    .await;
    let small = lab.boot(BootSpec::new("rlf-small").flavor("m1.small").count(2)).await;
    let tiny = lab.boot(BootSpec::new("rlf-tiny")).await;
    lab.set_service("host3", false, Some("operator: hardware check")).await;
    let dir = tempdir("relief-fewest");
    let hosts = [("host1", HOST_MIB), ("host2", HOST_MIB), ("host4", HOST_MIB)];
    let memory = support::memory::HostMemory::start(lab.clone(), &dir, &hosts).await;
    // host2 short of memory from the start: its agent tells the others.
    memory.set_base_used("host2", HOST_MIB - 1000);
    let mut agents = Vec::new();
    for (cluster, host) in [(&first, "host1"), (&second, "host2"), (&fourth, "host4")] {
        agents.push(start_relieving(cluster, &lab, &memory.path(host), "3").await);
    }
    wait_event(
        &second,
        "MemoryReliefHeld",
        "no VM on the host",
        Duration::from_secs(30),
    )
    .await;
    // host1: 504 MiB short of relief.
    let on_host1 = 4096 + 2 * 512 + 64;
    memory.set_base_used("host1", HOST_MIB - on_host1 - (RELIEVED_MIB - 504));
    let pressured = Instant::now();
    let done = wait_vm_migration(&first, "Succeeded", Duration::from_secs(60)).await;
    eprintln!(
        "from host1's pressure to its relief move's end: {:.1} s",
        pressured.elapsed().as_secs_f64()
    );
    let moved = done["spec"]["serverId"].as_str().expect("a server").to_string();
    assert!(
        small.contains(&moved),
        "a 512 MiB VM, the smallest that frees enough: {done}"
    );
    assert_eq!(done["status"]["destination"], "host4", "{done}");
    assert_eq!(host_of(&lab.server(&moved).await), "host4");
    eventually("host1 relieved", Duration::from_secs(10), async || {
        (memory.available_mib("host1")? >= RELIEVED_MIB).then_some(())
    })
    .await;
    // Nothing else moves: relieved, and the rest stays where it was.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(vm_migrations(&first).await.len(), 1);
    for id in stay.iter().chain(&tiny).chain(small.iter().filter(|id| **id != moved)) {
        assert_eq!(host_of(&lab.server(id).await), "host1", "{id}");
        assert!(lab.live_migrations(id).await.is_empty(), "{id} never moved");
    }
    let reasons = first.reasons().await;
    for reason in ["MemoryReliefStarted", "MemoryReliefSucceeded"] {
        assert!(reasons.iter().any(|r| r == reason), "{reasons:?}");
    }
    let (_, _, metrics) = agents[0].get("metrics").await.expect("metrics");
    assert!(
        metrics.contains(r#"nova_drain_memory_relief_moves_total{result="succeeded"} 1"#),
        "{metrics}"
    );
    // host4 runs short now: the one VM there has just moved (cool-down).
    memory.set_base_used("host4", HOST_MIB - 512 - 1000);
    let held = wait_event(&fourth, "MemoryReliefHeld", "cool-down", Duration::from_secs(30)).await;
    eprintln!("host4: {held}");
    assert_eq!(lab.live_migrations(&moved).await.len(), 1, "not moved again");
    assert!(vm_migrations(&fourth).await.is_empty());
    lab.set_service("host3", true, None).await;
}

/// A dip shorter than the window moves nothing; the cluster-wide pause
/// (ConfigMap) holds moves; a node annotated dry-run gets a VmMigration
/// `Proposed` and nothing moves; annotated on, the VM moves; a cordon then
/// leaves the host to its evacuation (no relief move from a host in maintenance).
#[tokio::test]
async fn short_dips_pause_and_dry_run_move_nothing_and_a_cordoned_host_is_left_to_its_evacuation() {
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    let lab = std::sync::Arc::new(lab);
    let vms = lab.boot(BootSpec::new("rlf-pause").flavor("m1.small").count(2)).await;
    let dir = tempdir("relief-pause");
    let memory = support::memory::HostMemory::start(lab.clone(), &dir, &[("host1", HOST_MIB)]).await;
    let agent = start_relieving(&cluster, &lab, &memory.path("host1"), "4").await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    let short = |available: u64| HOST_MIB - 1024 - available;
    // A dip of about two seconds, under a four-second window.
    memory.set_base_used("host1", short(1500));
    eventually("the dip read", Duration::from_secs(10), async || {
        let (_, _, metrics) = agent.get("metrics").await?;
        metrics
            .contains(&format!("nova_drain_memory_available_bytes {}", 1500 * 1024 * 1024))
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    memory.set_base_used("host1", 0);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (_, _, metrics) = agent.get("metrics").await.expect("metrics");
    assert!(
        metrics.contains("nova_drain_memory_pressure_episodes_total 0"),
        "{metrics}"
    );
    assert!(vm_migrations(&cluster).await.is_empty());
    // Paused cluster-wide: sustained pressure moves nothing.
    let kubectl = cluster.kubectl();
    let pause = [
        "-n",
        NAMESPACE,
        "create",
        "configmap",
        "nova-drain-memory-relief",
        "--from-literal=paused=true",
    ];
    kubectl.run(&pause, Duration::from_secs(30)).await.expect("pause");
    memory.set_base_used("host1", short(1500));
    wait_event(&cluster, "MemoryReliefHeld", "paused", Duration::from_secs(30)).await;
    // Dry run on this node, unpaused: proposed, not moved.
    let node = cluster.node().to_string();
    let annotate = |mode: &str| format!("nova-kubernetes-drain/memory-relief={mode}");
    let dry = annotate("dry-run");
    kubectl
        .run(
            &["annotate", "node", &node, &dry, "--overwrite"],
            Duration::from_secs(30),
        )
        .await
        .expect("annotate");
    let unpause = ["-n", NAMESPACE, "delete", "configmap", "nova-drain-memory-relief"];
    kubectl.run(&unpause, Duration::from_secs(30)).await.expect("unpause");
    let proposed = wait_vm_migration(&cluster, "Proposed", Duration::from_secs(30)).await;
    assert_eq!(proposed["spec"]["dryRun"], true, "{proposed}");
    // Told once while the verdict stays the same (beyond the host's 5 s cool-down).
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(vm_migrations(&cluster).await.len(), 1, "one proposal");
    for id in &vms {
        assert!(lab.live_migrations(id).await.is_empty(), "the dry run moved {id}");
    }
    // On: it moves.
    let on = annotate("on");
    kubectl
        .run(
            &["annotate", "node", &node, &on, "--overwrite"],
            Duration::from_secs(30),
        )
        .await
        .expect("annotate");
    let done = wait_vm_migration(&cluster, "Succeeded", Duration::from_secs(60)).await;
    let moved = done["spec"]["serverId"].as_str().expect("a server").to_string();
    assert_ne!(host_of(&lab.server(&moved).await), "host1");
    // Still short (1500 + 512 < 2304), but cordoned: the evacuation moves the rest, relief nothing.
    cluster.cordon().await;
    wait_phase(&cluster, "Evacuated", Duration::from_secs(120)).await;
    let phases: Vec<Value> = vm_migrations(&cluster)
        .await
        .iter()
        .map(|m| m["status"]["phase"].clone())
        .collect();
    assert_eq!(
        phases,
        ["Proposed", "Succeeded"],
        "no relief move from a host in maintenance"
    );
    let rest = vms.iter().find(|id| **id != moved).expect("the other VM");
    assert_eq!(
        lab.live_migrations(rest).await.len(),
        1,
        "moved once, by the evacuation"
    );
    cluster.uncordon().await;
    eventually("the service enabled", Duration::from_secs(20), async || {
        (lab.service("host1").await["status"] == "enabled").then_some(())
    })
    .await;
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("drainer-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Two hosts short of memory at once, one relief migration for the
/// cluster (`--relief-migrations 1`): the two moves never overlap (Nova's
/// records), the second waits for the first (an Event says so).
#[tokio::test]
async fn relief_moves_of_two_hosts_at_once_stay_within_the_clusters_relief_migrations() {
    let _exclusive = Lab::exclusive().await;
    let (lab, first) = setup().await;
    let lab = std::sync::Arc::new(lab);
    let second = first.join("host2").await;
    let mut vms = Vec::new();
    for host in ["host1", "host2"] {
        vms.extend(
            lab.boot(BootSpec::new(&format!("rlf-cap-{host}")).flavor("m1.large").host(host))
                .await,
        );
    }
    let dir = tempdir("relief-cap");
    let hosts = [("host1", HOST_MIB), ("host2", HOST_MIB)];
    let memory = support::memory::HostMemory::start(lab.clone(), &dir, &hosts).await;
    let mut agents = Vec::new();
    for (cluster, host) in [(&first, "host1"), (&second, "host2")] {
        agents.push(start_relieving(cluster, &lab, &memory.path(host), "3").await);
    }
    for cluster in [&first, &second] {
        wait_guard(cluster, Duration::from_secs(20)).await;
    }
    for host in ["host1", "host2"] {
        memory.set_base_used(host, HOST_MIB - 4096 - 1000);
    }
    for cluster in [&first, &second] {
        wait_vm_migration(cluster, "Succeeded", Duration::from_secs(90)).await;
    }
    let mut spans = Vec::new();
    for id in &vms {
        let records = lab.live_migrations(id).await;
        assert_eq!(records.len(), 1, "{id}: {records:?}");
        spans.push((
            nova_time(&records[0]["created_at"]),
            nova_time(&records[0]["updated_at"]),
        ));
    }
    spans.sort();
    assert!(spans[0].1 <= spans[1].0, "the relief moves overlap: {spans:?}");
    let mut waited = Vec::new();
    for cluster in [&first, &second] {
        waited.extend(cluster.events().await.into_iter().filter(|e| {
            e["reason"] == "MemoryReliefHeld" && e["note"].as_str().is_some_and(|n| n.contains("all in use"))
        }));
    }
    assert!(!waited.is_empty(), "the second one waited for the relief migration");
}

/// A cordon while a relief move runs: the move is left to the evacuation,
/// which follows the same migration (never a second one for that VM) and
/// moves the rest; the VmMigration says `HandedOver`.
#[tokio::test]
async fn a_cordon_during_a_relief_move_hands_the_migration_to_the_evacuation() {
    let _exclusive = Lab::exclusive().await;
    let (lab, cluster) = setup().await;
    let lab = std::sync::Arc::new(lab);
    let large = lab.boot(BootSpec::new("rlf-hand-large").flavor("m1.large")).await;
    let small = lab.boot(BootSpec::new("rlf-hand-small").flavor("m1.small")).await;
    let dir = tempdir("relief-handover");
    let memory = support::memory::HostMemory::start(lab.clone(), &dir, &[("host1", HOST_MIB)]).await;
    let _agent = start_relieving(&cluster, &lab, &memory.path("host1"), "3").await;
    wait_guard(&cluster, Duration::from_secs(20)).await;
    // 1000 MiB short: no 512 MiB VM frees it, the 4096 MiB one moves (about 9 s in the lab).
    memory.set_base_used("host1", HOST_MIB - 4096 - 512 - (RELIEVED_MIB - 1000));
    wait_vm_migration(&cluster, "Migrating", Duration::from_secs(30)).await;
    cluster.cordon().await;
    let handed = wait_vm_migration(&cluster, "HandedOver", Duration::from_secs(60)).await;
    assert_eq!(handed["spec"]["serverId"], large[0].as_str(), "{handed}");
    wait_phase(&cluster, "Evacuated", Duration::from_secs(120)).await;
    assert_eq!(
        lab.live_migrations(&large[0]).await.len(),
        1,
        "followed, not started again"
    );
    assert_eq!(lab.live_migrations(&small[0]).await.len(), 1, "moved by the evacuation");
    for id in large.iter().chain(&small) {
        let server = lab.server(id).await;
        assert_ne!(host_of(&server), "host1");
        assert_eq!(server["status"], "ACTIVE", "{id}");
    }
    let reasons = cluster.reasons().await;
    assert!(reasons.iter().any(|r| r == "MemoryReliefHandedOver"), "{reasons:?}");
    cluster.uncordon().await;
    eventually("the service enabled", Duration::from_secs(20), async || {
        (lab.service("host1").await["status"] == "enabled").then_some(())
    })
    .await;
}
