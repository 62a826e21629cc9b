//! The agent against the engine's [`FakeCloud`] and a [`FakeCluster`], on
//! tokio's paused clock: every transition of a node's maintenance, including
//! cordon/uncordon flips, failures, outages and SIGTERM in every phase, in
//! milliseconds of real time.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, NodeSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};

use super::agent::{Agent, AgentSettings, Input};
use super::coordinator::{Standing, Want};
use super::decide::RetryBackoff;
use crate::evacuation::fake::{FakeCloud, NODE, SOURCE, Script, target};
use crate::evacuation::{Settings, is_our_reason};
use crate::kube::evacuation::{EvacuationPhase, EvacuationSeen, EvacuationSpec, EvacuationStatus, VmStatus};
use crate::kube::{Cluster, DrainState, GuardPod, Phase, Severity};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::server::Health;

const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(60);
const MAX_RETRY_AFTER_FAILURE: Duration = Duration::from_secs(960);
const GUARD_GRACE: Duration = Duration::from_secs(60);

/// The cluster as the agent changes it, with the guard watch played back to the agent.
struct FakeCluster {
    state: Mutex<ClusterState>,
    watch: mpsc::Sender<Input<FakeCloud>>,
    epoch: (Instant, jiff::Timestamp),
}

struct ClusterState {
    /// Every drain state recorded, oldest first.
    records: Vec<DrainState>,
    guard: GuardPod,
    budget: bool,
    events: Vec<(Severity, &'static str, String)>,
    /// The API refuses guard changes with this error.
    refuse_guard: Option<String>,
    /// The kubelet runs the guard pod (false: its image cannot be pulled).
    kubelet_runs_guard: bool,
    /// Why the agent is being uninstalled (`None`: a restart or rolling update).
    uninstalled: Option<String>,
    /// Evacuation objects by name, with every status written to each, oldest first.
    evacuations: Vec<(String, Vec<EvacuationStatus>)>,
    /// The Evacuations as the agent's watch shows them (deleted ones kept as
    /// being deleted, as the agent's watch keeps them).
    objects: Vec<EvacuationSeen>,
    /// The Evacuation CRD is installed.
    crd_installed: bool,
    /// The Evacuation the Events are also about.
    following: Option<String>,
    /// The reasons of the Events about each Evacuation, in order.
    evacuation_events: Vec<(String, &'static str)>,
}

impl FakeCluster {
    fn lock(&self) -> MutexGuard<'_, ClusterState> {
        self.state.lock().expect("fake cluster lock")
    }

    fn set_guard(&self, state: &mut ClusterState, guard: GuardPod) {
        state.guard = guard.clone();
        let _ = self.watch.try_send(Input::Guard(guard));
    }

    /// Plays the Evacuations back to the agent, as its watch does after each
    /// change (a paused one whose spec changed since its plan is outdated).
    fn show_evacuations(&self, state: &ClusterState) {
        let mut shown = state.objects.clone();
        for seen in &mut shown {
            let last = state
                .evacuations
                .iter()
                .find(|(n, _)| *n == seen.name)
                .and_then(|(_, written)| written.last());
            seen.plan_outdated = last.is_some_and(|status| {
                status.phase == Some(EvacuationPhase::Paused) && status.observed_generation != seen.generation
            });
        }
        let _ = self.watch.try_send(Input::Evacuations(shown));
    }

    /// `kubectl patch` of a paused Evacuation's spec: a new generation.
    fn change_spec(&self, name: &str, change: impl FnOnce(&mut EvacuationSpec)) {
        let mut state = self.lock();
        if let Some(seen) = state.objects.iter_mut().find(|e| e.name == name) {
            change(&mut seen.spec);
            seen.generation = seen.generation.map(|g| g + 1);
        }
        self.show_evacuations(&state);
    }

    /// `kubectl apply` of an Evacuation of the node made by hand.
    fn make_evacuation(&self, name: &str, paused: bool) {
        self.make_evacuation_with(
            name,
            EvacuationSpec {
                node_name: NODE.into(),
                paused,
                ..EvacuationSpec::default()
            },
        );
    }

    /// [`FakeCluster::make_evacuation`] with a whole spec.
    fn make_evacuation_with(&self, name: &str, spec: EvacuationSpec) {
        let mut state = self.lock();
        state.evacuations.push((name.to_string(), Vec::new()));
        state.objects.push(EvacuationSeen {
            name: name.to_string(),
            by_hand: true,
            spec,
            deleting: false,
            held: false,
            plan_outdated: false,
            generation: Some(1),
            created: (self.now().to_string(), name.to_string()),
        });
        self.show_evacuations(&state);
    }

    /// `kubectl patch evacuation NAME -p '{"spec":{"paused":false}}'`.
    fn unpause(&self, name: &str) {
        let mut state = self.lock();
        if let Some(seen) = state.objects.iter_mut().find(|e| e.name == name) {
            seen.spec.paused = false;
            seen.generation = seen.generation.map(|g| g + 1);
        }
        self.show_evacuations(&state);
    }

    /// `kubectl delete evacuation NAME`: held by our finalizer, or gone at once.
    fn delete_evacuation(&self, name: &str) {
        let mut state = self.lock();
        let Some(seen) = state.objects.iter_mut().find(|e| e.name == name) else {
            return;
        };
        seen.deleting = true;
        if !seen.held {
            state.evacuations.retain(|(n, _)| n != name);
        }
        self.show_evacuations(&state);
    }

    /// Whether Evacuation `name` still exists (not gone after its deletion).
    fn evacuation_exists(&self, name: &str) -> bool {
        self.lock().evacuations.iter().any(|(n, _)| n == name)
    }

    fn held(&self, name: &str) -> bool {
        self.lock().objects.iter().any(|e| e.name == name && e.held)
    }

    /// The last status written to Evacuation `name`.
    fn status_of(&self, name: &str) -> Option<EvacuationStatus> {
        let state = self.lock();
        let (_, written) = state.evacuations.iter().find(|(n, _)| n == name)?;
        written.last().cloned()
    }

    fn now(&self) -> jiff::Timestamp {
        let elapsed = jiff::SignedDuration::try_from(Instant::now() - self.epoch.0).unwrap_or_default();
        self.epoch.1.checked_add(elapsed).unwrap_or(self.epoch.1)
    }

    /// `kubectl drain`'s eviction of the guard: refused (429) while the budget
    /// protects a running pod, else the pod is deleted (held by its finalizer).
    fn evict(&self) -> bool {
        let mut state = self.lock();
        if state.budget && matches!(state.guard, GuardPod::Present { running: true, .. }) {
            return false;
        }
        self.delete_locked(&mut state);
        true
    }

    /// `kubectl delete pod`, or `kubectl drain --disable-eviction`: budgets play no part.
    fn delete(&self) {
        let mut state = self.lock();
        self.delete_locked(&mut state);
    }

    fn delete_locked(&self, state: &mut ClusterState) {
        let next = match state.guard {
            GuardPod::Present { held: true, .. } | GuardPod::Terminating { held: true } => {
                GuardPod::Terminating { held: true }
            }
            _ => GuardPod::Missing,
        };
        self.set_guard(state, next);
    }

    /// What `kubectl drain` waits for after evicting: the pod gone.
    fn guard_gone(&self) -> bool {
        self.lock().guard == GuardPod::Missing
    }

    fn phase(&self) -> Phase {
        self.lock().records.last().map_or(Phase::Idle, |s| s.phase)
    }

    fn last_record(&self) -> DrainState {
        self.lock().records.last().cloned().unwrap_or_default()
    }

    fn reasons(&self) -> Vec<&'static str> {
        self.lock().events.iter().map(|(_, reason, _)| *reason).collect()
    }

    fn guard_in_place(&self) -> bool {
        let state = self.lock();
        state.budget && matches!(state.guard, GuardPod::Present { held: true, .. })
    }
}

impl Cluster for FakeCluster {
    fn guard_name(&self) -> &str {
        "nova-drain-guard-node-a"
    }

    fn node_seen(&self, _: &Node) {}

    async fn record(&self, state: &DrainState) -> Result<(), String> {
        self.lock().records.push(state.clone());
        Ok(())
    }

    async fn put_guard(&self, _: &Node, current: &GuardPod) -> Result<(), String> {
        let now = self.now();
        let mut state = self.lock();
        if let Some(error) = &state.refuse_guard {
            return Err(error.clone());
        }
        assert_eq!(&state.guard, current, "the agent acts on the guard as it is");
        state.budget = true;
        let running = state.kubelet_runs_guard;
        let next = match state.guard.clone() {
            GuardPod::Missing => GuardPod::Present {
                held: true,
                running,
                waiting: (!running).then(|| "ImagePullBackOff".to_string()),
                created_at: Some(now),
            },
            GuardPod::Present {
                running,
                waiting,
                created_at,
                ..
            } => GuardPod::Present {
                held: true,
                running,
                waiting,
                created_at,
            },
            terminating => terminating,
        };
        self.set_guard(&mut state, next);
        Ok(())
    }

    async fn release_guard(&self) -> Result<(), String> {
        let mut state = self.lock();
        if let Some(error) = &state.refuse_guard {
            return Err(error.clone());
        }
        state.budget = false;
        let next = match state.guard.clone() {
            GuardPod::Terminating { .. } => GuardPod::Missing,
            GuardPod::Present {
                running,
                waiting,
                created_at,
                ..
            } => GuardPod::Present {
                held: false,
                running,
                waiting,
                created_at,
            },
            GuardPod::Missing => GuardPod::Missing,
        };
        self.set_guard(&mut state, next);
        Ok(())
    }

    fn publish(&self, severity: Severity, reason: &'static str, note: String) {
        let mut state = self.lock();
        if let Some(evacuation) = state.following.clone() {
            state.evacuation_events.push((evacuation, reason));
        }
        state.events.push((severity, reason, note));
    }

    fn follow_evacuation(&self, name: Option<&str>) {
        self.lock().following = name.map(str::to_string);
    }

    async fn flush_events(&self) {}

    async fn uninstalled(&self) -> Result<Option<String>, String> {
        Ok(self.lock().uninstalled.clone())
    }

    async fn open_evacuation(&self, _node: &Node, at: jiff::Timestamp, paused: bool) -> Result<String, String> {
        let mut state = self.lock();
        if !state.crd_installed {
            return Err("the server could not find the requested resource".into());
        }
        let name = crate::kube::evacuation::evacuation_name(NODE, at);
        if !state.evacuations.iter().any(|(n, _)| *n == name) {
            state.evacuations.push((name.clone(), Vec::new()));
            state.objects.push(EvacuationSeen {
                name: name.clone(),
                by_hand: false,
                spec: EvacuationSpec {
                    node_name: NODE.into(),
                    paused,
                    ..EvacuationSpec::default()
                },
                deleting: false,
                held: false,
                plan_outdated: false,
                generation: Some(1),
                created: (at.to_string(), name.clone()),
            });
            self.show_evacuations(&state);
        }
        Ok(name)
    }

    async fn read_evacuation(&self, name: &str) -> Result<Option<EvacuationStatus>, String> {
        let state = self.lock();
        let Some((_, written)) = state.evacuations.iter().find(|(n, _)| n == name) else {
            return Err(format!("evacuations \"{name}\" not found"));
        };
        Ok(written.last().cloned())
    }

    async fn write_evacuation(&self, name: &str, status: &EvacuationStatus) -> Result<(), String> {
        let mut state = self.lock();
        let Some((_, written)) = state.evacuations.iter_mut().find(|(n, _)| n == name) else {
            return Err(format!("evacuations \"{name}\" not found"));
        };
        written.push(status.clone());
        Ok(())
    }

    async fn hold_evacuation(&self, name: &str) -> Result<(), String> {
        let mut state = self.lock();
        let Some(seen) = state.objects.iter_mut().find(|e| e.name == name && !e.deleting) else {
            return Ok(());
        };
        seen.held = true;
        self.show_evacuations(&state);
        Ok(())
    }

    async fn let_evacuation_go(&self, name: &str) -> Result<(), String> {
        let mut state = self.lock();
        let Some(seen) = state.objects.iter_mut().find(|e| e.name == name) else {
            return Ok(());
        };
        seen.held = false;
        if seen.deleting {
            state.evacuations.retain(|(n, _)| n != name);
        }
        self.show_evacuations(&state);
        Ok(())
    }
}

/// The agent's flags a test sets.
#[derive(Clone, Copy, Default)]
struct Flags {
    release_guard_on_failure: bool,
    start_paused: bool,
    /// The cluster shares evacuation slots: the test plays the coordinator.
    coordinated: bool,
    /// The agent's migrations at once (the default: 1).
    max_parallel: Option<usize>,
}

struct Harness {
    cloud: Arc<FakeCloud>,
    cluster: Arc<FakeCluster>,
    inputs: mpsc::Sender<Input<FakeCloud>>,
    agent: JoinHandle<i32>,
    health: Health,
    metrics: Arc<Metrics>,
    /// What the agent asks of the coordinator, when coordinated.
    want: Option<watch::Receiver<Option<Want>>>,
    /// The coordinator's standing as the agent's runs read it directly.
    told: Option<watch::Sender<Standing>>,
}

fn node(cordoned: bool, recorded: Option<&DrainState>) -> Node {
    let annotations = recorded.map(|state| {
        let patch = state.to_merge_patch();
        patch["metadata"]["annotations"]
            .as_object()
            .map(|a| {
                a.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    });
    Node {
        metadata: ObjectMeta {
            name: Some(NODE.into()),
            uid: Some("node-uid".into()),
            annotations,
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            unschedulable: Some(cordoned),
            ..NodeSpec::default()
        }),
        status: None,
    }
}

impl Harness {
    /// An agent whose Node is listed as `cordoned` with `recorded` in its
    /// annotations (a restart), the guard listed as `guard`, Nova reachable or not.
    async fn start_with(
        cloud: Arc<FakeCloud>,
        cordoned: bool,
        recorded: Option<DrainState>,
        guard: GuardPod,
        nova_reachable: bool,
        release_guard_on_failure: bool,
    ) -> Harness {
        Harness::start_seeded(
            cloud,
            cordoned,
            recorded,
            guard,
            nova_reachable,
            Flags {
                release_guard_on_failure,
                ..Flags::default()
            },
            Vec::new(),
        )
        .await
    }

    /// [`Harness::start_with`] with Evacuations already in the cluster, as an earlier agent left them.
    async fn start_seeded(
        cloud: Arc<FakeCloud>,
        cordoned: bool,
        recorded: Option<DrainState>,
        guard: GuardPod,
        nova_reachable: bool,
        flags: Flags,
        evacuations: Vec<(String, Vec<EvacuationStatus>)>,
    ) -> Harness {
        let (inputs, receiver) = mpsc::channel(64);
        let cluster = Arc::new(FakeCluster {
            state: Mutex::new(ClusterState {
                records: Vec::new(),
                guard: guard.clone(),
                budget: guard != GuardPod::Missing,
                events: Vec::new(),
                refuse_guard: None,
                kubelet_runs_guard: true,
                uninstalled: None,
                objects: evacuations
                    .iter()
                    .map(|(name, _)| EvacuationSeen {
                        name: name.clone(),
                        by_hand: false,
                        spec: EvacuationSpec::default(),
                        deleting: false,
                        held: false,
                        plan_outdated: false,
                        generation: Some(1),
                        created: (String::new(), name.clone()),
                    })
                    .collect(),
                evacuations,
                crd_installed: true,
                following: None,
                evacuation_events: Vec::new(),
            }),
            watch: inputs.clone(),
            epoch: (Instant::now(), jiff::Timestamp::now()),
        });
        let metrics = Arc::new(Metrics::default());
        let health = Health::default();
        let settings = AgentSettings {
            target: target(),
            evacuation: Settings {
                disable_first: true,
                max_parallel: flags.max_parallel.unwrap_or(Settings::default().max_parallel),
                ..Settings::default()
            },
            release_guard_on_failure: flags.release_guard_on_failure,
            retry: RetryBackoff {
                first: RETRY_AFTER_FAILURE,
                max: MAX_RETRY_AFTER_FAILURE,
            },
            guard_grace: GUARD_GRACE,
            start_paused: flags.start_paused,
        };
        let mut agent = Agent::new(settings, cluster.clone(), metrics.clone(), health.clone());
        let (mut want, mut told) = (None, None);
        if flags.coordinated {
            let (asks, asked) = watch::channel(None);
            let (tells, directly) = watch::channel(Standing::Idle);
            agent = agent.coordinated(asks, directly);
            want = Some(asked);
            told = Some(tells);
        }
        let agent = tokio::spawn(agent.run(receiver));
        let harness = Harness {
            cloud,
            cluster,
            inputs,
            agent,
            health,
            metrics,
            want,
            told,
        };
        harness.send(Input::Guard(guard)).await;
        let listed = harness.cluster.lock().objects.clone();
        harness.send(Input::Evacuations(listed)).await;
        harness
            .send(Input::Node(Some(Box::new(node(cordoned, recorded.as_ref())))))
            .await;
        harness.send(Input::NodeListed).await;
        if nova_reachable {
            harness.nova_reachable().await;
        }
        harness
    }

    async fn start(cloud: Arc<FakeCloud>) -> Harness {
        let harness = Harness::start_with(cloud, false, None, GuardPod::Missing, true, false).await;
        harness
            .until("the guard in place", |h| h.cluster.guard_in_place())
            .await;
        harness
    }

    async fn send(&self, input: Input<FakeCloud>) {
        self.inputs.send(input).await.expect("the agent runs");
    }

    async fn nova_reachable(&self) {
        self.send(Input::ComputeReady(self.cloud.clone())).await;
    }

    async fn cordon(&self, cordoned: bool) {
        self.send(Input::Node(Some(Box::new(node(cordoned, None))))).await;
    }

    /// Waits (in virtual time, at most a virtual hour) until `done` holds.
    async fn until(&self, what: &str, done: impl Fn(&Harness) -> bool) {
        let limit = Instant::now() + Duration::from_secs(3600);
        while !done(self) {
            assert!(Instant::now() < limit, "never: {what}");
            sleep(Duration::from_millis(100)).await;
        }
    }

    /// `kubectl drain`: evicts the guard every 5 s until allowed, then waits for it to be gone.
    /// Returns when drain would return.
    async fn drain(&self) {
        while !self.cluster.evict() {
            sleep(Duration::from_secs(5)).await;
        }
        self.until("drain returns", |h| h.cluster.guard_gone()).await;
    }

    async fn terminate(self) -> i32 {
        let started = Instant::now();
        self.send(Input::Terminate).await;
        let code = self.agent.await.expect("the agent ends");
        assert!(started.elapsed() <= Duration::from_secs(10), "stopped within 10 s");
        code
    }

    /// Until `vm-1`'s live migration runs.
    async fn migrating(&self) {
        self.until("migrating", |h| h.cloud.migration_statuses("vm-1") == ["running"])
            .await;
    }

    fn on_source(&self) -> usize {
        ["vm-1", "vm-2", "vm-3"]
            .iter()
            .filter(|id| self.cloud.try_vm(id).is_some_and(|s| s.host.as_deref() == Some(SOURCE)))
            .count()
    }

    fn service_ours(&self) -> bool {
        let service = self.cloud.service();
        !service.enabled && is_our_reason(service.disabled_reason.as_deref())
    }
}

/// One VM, `vm-1`, whose live migration never converges (until aborted).
fn stalling_vm() -> Arc<FakeCloud> {
    let cloud = cloud_with(1);
    cloud.script(
        "vm-1",
        &[Script::Stall {
            progress_for: Duration::from_secs(5),
        }],
    );
    cloud
}

fn cloud_with(vms: usize) -> Arc<FakeCloud> {
    let cloud = FakeCloud::new();
    for i in 1..=vms {
        cloud.add_vm(&format!("vm-{i}"), "ACTIVE", 2048);
    }
    Arc::new(cloud)
}

#[tokio::test(start_paused = true)]
async fn a_cordon_evacuates_and_drain_returns_only_once_the_hypervisor_is_empty() {
    let h = Harness::start(cloud_with(3)).await;
    assert_eq!(h.health.readiness(), Ok(()));
    h.cordon(true).await;
    h.until("evacuating", |h| h.cluster.phase() == Phase::Evacuating).await;
    assert!(
        !h.cluster.evict(),
        "the budget refuses the eviction of the running guard"
    );
    h.drain().await;
    assert_eq!(h.on_source(), 0, "drain returned with VMs on the hypervisor");
    assert_eq!(h.cluster.phase(), Phase::Evacuated);
    assert!(h.service_ours());
    let record = h.cluster.last_record();
    assert_eq!((record.vms_total, record.vms_left), (Some(3), Some(0)));
    assert!(record.disabled_by_us);
    let reasons = h.cluster.reasons();
    assert_eq!(reasons.iter().filter(|r| **r == "LiveMigrationSucceeded").count(), 3);
    assert!(reasons.contains(&"EvacuationSucceeded"));
    let scrape = h.metrics.render(0, 0);
    assert!(
        scrape.contains("nova_drain_migrations_total{outcome=\"migrated\"} 3"),
        "{scrape}"
    );

    // Uncordon: the service comes back and a new guard is made.
    h.cordon(false).await;
    h.until("idle with the guard back", |h| {
        h.cluster.phase() == Phase::Idle && h.cluster.guard_in_place()
    })
    .await;
    assert!(h.cloud.service().enabled);
    assert!(h.cluster.reasons().contains(&"NovaComputeEnabled"));
    assert_eq!(h.terminate().await, 0);
}

#[tokio::test(start_paused = true)]
async fn cold_migrations_are_reported_as_cold() {
    let cloud = FakeCloud::new();
    cloud.add_vm("vm-1", "SHUTOFF", 2048);
    let h = Harness::start(Arc::new(cloud)).await;
    h.cordon(true).await;
    h.until("evacuated", |h| h.cluster.phase() == Phase::Evacuated).await;
    let reasons = h.cluster.reasons();
    assert!(reasons.contains(&"ColdMigrationStarted"), "{reasons:?}");
    assert!(reasons.contains(&"ColdMigrationSucceeded"), "{reasons:?}");
    assert!(!reasons.iter().any(|r| r.starts_with("LiveMigration")), "{reasons:?}");
    assert_eq!(h.terminate().await, 0);
}

#[tokio::test(start_paused = true)]
async fn a_guard_that_never_runs_still_holds_drain_and_is_reported() {
    let h = Harness::start(cloud_with(0)).await;
    // The first guard was made before the node lost its image: deleted while the
    // hypervisor is empty, it is let go and made anew, and cannot start.
    h.cluster.lock().kubelet_runs_guard = false;
    h.cluster.delete();
    h.until("a guard that cannot start", |h| {
        matches!(h.cluster.lock().guard, GuardPod::Present { running: false, .. })
    })
    .await;
    assert_eq!(h.health.readiness(), Ok(()), "within its grace");
    sleep(GUARD_GRACE).await;
    h.until("reported", |h| h.health.readiness().is_err()).await;
    assert!(h.cluster.reasons().contains(&"DrainGuardNotRunning"));
    assert!(h.metrics.render(0, 0).contains("nova_drain_guard_ready 0"));
    h.cloud.add_vm("vm-1", "ACTIVE", 2048);
    h.cloud.add_vm("vm-2", "ACTIVE", 2048);

    // The eviction API ignores budgets for pods that are not Running: drain gets the
    // pod at once, and its finalizer still keeps drain waiting for the VMs.
    h.cordon(true).await;
    assert!(h.cluster.evict());
    h.until("drain returns", |h| h.cluster.guard_gone()).await;
    assert_eq!(h.on_source(), 0, "drain returned with VMs on the hypervisor");
    assert_eq!(h.cluster.phase(), Phase::Evacuated);
    assert_eq!(
        h.cluster
            .reasons()
            .iter()
            .filter(|r| **r == "DrainGuardNotRunning")
            .count(),
        1,
        "told once"
    );
    assert_eq!(h.health.readiness(), Ok(()), "released: nothing to guard");
    assert_eq!(h.terminate().await, 0);
}

#[tokio::test(start_paused = true)]
async fn drain_with_disable_eviction_waits_too() {
    let h = Harness::start(cloud_with(3)).await;
    h.cordon(true).await;
    h.cluster.delete();
    assert_eq!(h.cluster.lock().guard, GuardPod::Terminating { held: true });
    h.until("drain returns", |h| h.cluster.guard_gone()).await;
    assert_eq!(h.on_source(), 0, "drain returned with VMs on the hypervisor");
    assert_eq!(h.terminate().await, 0);
}

#[tokio::test(start_paused = true)]
async fn uncordon_mid_evacuation_cancels_restores_and_puts_the_guard_back() {
    let cloud = stalling_vm();
    let h = Harness::start(cloud).await;
    h.cordon(true).await;
    h.migrating().await;
    h.cordon(false).await;
    h.until("idle", |h| h.cluster.phase() == Phase::Idle).await;
    assert_eq!(h.cloud.migration_statuses("vm-1"), ["cancelled"]);
    assert_eq!(h.on_source(), 1);
    assert!(h.cloud.service().enabled);
    let reasons = h.cluster.reasons();
    assert!(reasons.contains(&"MigrationCancelled"), "{reasons:?}");
    assert!(reasons.contains(&"EvacuationCancelled"), "{reasons:?}");
    assert!(!reasons.contains(&"VMNotMigratable"), "{reasons:?}");
    assert!(!reasons.contains(&"EvacuationFailed"), "{reasons:?}");
    let scrape = h.metrics.render(0, 0);
    assert!(
        scrape.contains("nova_drain_migrations_total{outcome=\"aborted\"} 1"),
        "{scrape}"
    );
    assert!(!scrape.contains("not-migrated"), "each VM counted once: {scrape}");
    assert!(h.cluster.guard_in_place());
    assert_eq!(h.terminate().await, 0);
}

#[tokio::test(start_paused = true)]
async fn cordon_uncordon_cordon_flips_end_in_one_evacuation() {
    let cloud = cloud_with(2);
    let h = Harness::start(cloud).await;
    h.cordon(true).await;
    h.cordon(false).await;
    h.cordon(true).await;
    h.until("evacuated", |h| h.cluster.phase() == Phase::Evacuated).await;
    assert_eq!(h.on_source(), 0);
    for vm in ["vm-1", "vm-2"] {
        let statuses = h.cloud.migration_statuses(vm);
        assert_eq!(
            statuses.iter().filter(|s| **s == "completed").count(),
            1,
            "{vm}: {statuses:?}"
        );
    }
    // Flip while a cancellation is under way: it ends idle, service enabled.
    h.cordon(false).await;
    h.cordon(true).await;
    h.cordon(false).await;
    h.until("idle", |h| h.cluster.phase() == Phase::Idle).await;
    assert!(h.cloud.service().enabled);
    assert_eq!(h.terminate().await, 0);
}

#[tokio::test(start_paused = true)]
async fn a_failed_run_keeps_drain_waiting_and_is_retried_after_the_set_delay() {
    let cloud = cloud_with(1);
    cloud.script(
        "vm-1",
        &[Script::Fail {
            after: Duration::from_secs(2),
        }],
    );
    let h = Harness::start(cloud).await;
    h.cordon(true).await;
    h.until("failed", |h| h.cluster.phase() == Phase::Failed).await;
    let failed_at = Instant::now();
    assert!(!h.cluster.evict(), "drain keeps waiting");
    assert!(h.cluster.last_record().last_error.unwrap_or_default().contains("vm-1"));
    h.cloud.script(
        "vm-1",
        &[Script::Complete {
            after: Duration::from_secs(2),
        }],
    );
    h.until("evacuated by the retry", |h| h.cluster.phase() == Phase::Evacuated)
        .await;
    assert!(
        failed_at.elapsed() >= RETRY_AFTER_FAILURE,
        "retried after {:?}",
        failed_at.elapsed()
    );
    h.drain().await;
    assert_eq!(h.on_source(), 0);
    assert_eq!(h.terminate().await, 0);
}

/// Runs started so far (each begins with this Event).
fn runs(h: &Harness) -> usize {
    h.cluster
        .reasons()
        .iter()
        .filter(|r| **r == "EvacuationStarted")
        .count()
}

#[tokio::test(start_paused = true)]
async fn a_vm_that_can_never_move_backs_off_and_a_change_starts_the_backoff_over() {
    let cloud = cloud_with(0);
    cloud.add_vm("vm-1", "SUSPENDED", 2048);
    let h = Harness::start(cloud).await;
    h.cordon(true).await;
    h.until("failed", |h| h.cluster.phase() == Phase::Failed).await;
    let first_failure = Instant::now();
    let record = h.cluster.last_record();
    assert_eq!(record.failures, 1);
    assert!(record.next_retry_at.is_some(), "the next try is shown on the Node");

    // Cordoned for 30 minutes: tries at 0, 1, 3, 7 and 15 minutes (60 s doubling), not every minute.
    sleep(Duration::from_secs(30 * 60) - first_failure.elapsed()).await;
    assert_eq!(runs(&h), 5, "{:?}", h.cluster.reasons());
    assert_eq!(h.cluster.last_record().failures, 5);
    assert!(!h.cluster.evict(), "drain keeps waiting all along");

    // An operator annotates the Node: the next try comes within the first wait, and waits start over.
    let mut annotated = node(true, None);
    annotated
        .metadata
        .annotations
        .get_or_insert_default()
        .insert("example.org/retry".into(), "now".into());
    h.send(Input::Node(Some(Box::new(annotated)))).await;
    let asked = Instant::now();
    h.until("the Node shows the backoff started over", |h| {
        let record = h.cluster.last_record();
        record.failures == 0 && record.next_retry_at.is_none()
    })
    .await;
    assert_eq!(runs(&h), 5, "not tried yet");
    h.until("tried again", |h| runs(h) == 6).await;
    assert!(
        asked.elapsed() <= RETRY_AFTER_FAILURE,
        "tried {:?} after the change",
        asked.elapsed()
    );
    h.until("failed again", |h| {
        h.cluster.phase() == Phase::Failed && h.cluster.last_record().failures == 1
    })
    .await;

    // Another VM on the host: its first failure waits the first wait again.
    sleep(RETRY_AFTER_FAILURE * 2).await;
    assert_eq!(runs(&h), 7, "one try after the first wait, the next after twice that");
    assert_eq!(h.cluster.last_record().failures, 2);
    h.cloud.add_vm("vm-2", "SUSPENDED", 2048);
    h.until("failed with the new VM", |h| {
        runs(h) == 8 && h.cluster.phase() == Phase::Failed
    })
    .await;
    assert_eq!(h.cluster.last_record().failures, 1, "the VMs changed");
    assert_eq!(h.terminate().await, 0);
}

#[tokio::test(start_paused = true)]
async fn release_on_failure_lets_drain_finish() {
    let cloud = cloud_with(1);
    cloud.script(
        "vm-1",
        &[Script::Fail {
            after: Duration::from_secs(1),
        }],
    );
    let h = Harness::start_with(cloud, false, None, GuardPod::Missing, true, true).await;
    h.until("guard", |h| h.cluster.guard_in_place()).await;
    h.cordon(true).await;
    h.until("failed", |h| h.cluster.phase() == Phase::Failed).await;
    h.drain().await;
    assert_eq!(h.on_source(), 1, "as the operator asked");
    assert_eq!(h.terminate().await, 0);
}

#[tokio::test(start_paused = true)]
async fn restore_is_retried_while_nova_is_down() {
    let h = Harness::start(cloud_with(1)).await;
    h.cordon(true).await;
    h.until("evacuated", |h| h.cluster.phase() == Phase::Evacuated).await;
    h.cloud.set_nova_down(true);
    h.cordon(false).await;
    sleep(Duration::from_secs(30)).await;
    assert_eq!(
        h.cluster.phase(),
        Phase::Evacuated,
        "not Idle while the service could not be enabled"
    );
    h.cloud.set_nova_down(false);
    h.until("idle", |h| h.cluster.phase() == Phase::Idle).await;
    assert!(h.cloud.service().enabled);
    assert!(h.cluster.guard_in_place());
    assert_eq!(h.terminate().await, 0);
}

#[tokio::test(start_paused = true)]
async fn nova_down_at_start_up_is_waited_for_not_fatal() {
    let cloud = cloud_with(2);
    let h = Harness::start_with(cloud, true, None, GuardPod::Missing, false, false).await;
    h.until("the guard put in place meanwhile", |h| h.cluster.guard_in_place())
        .await;
    sleep(Duration::from_secs(120)).await;
    assert_eq!(h.cluster.phase(), Phase::Idle, "nothing to do without Nova");
    assert!(h.health.readiness().is_err(), "not ready without Nova");
    h.nova_reachable().await;
    h.until("evacuated", |h| h.cluster.phase() == Phase::Evacuated).await;
    assert_eq!(h.health.readiness(), Ok(()));
    assert_eq!(h.terminate().await, 0);
}

/// Two VMs on a host an earlier agent disabled with our marker, and the drain
/// state it left on the Node mid-run (naming `evacuation`, if any).
fn stopped_mid_run(evacuation: Option<&str>) -> (Arc<FakeCloud>, DrainState) {
    let cloud = cloud_with(2);
    cloud.disable_by_operator("nova-kubernetes-drain: evacuating for Kubernetes node node-a since earlier");
    let recorded = DrainState {
        phase: Phase::Evacuating,
        started_at: Some("2026-12-01T00:00:00Z".into()),
        disabled_by_us: true,
        evacuation: evacuation.map(str::to_string),
        ..DrainState::default()
    };
    (cloud, recorded)
}

#[tokio::test(start_paused = true)]
async fn a_restarted_agent_resumes_and_a_drain_waiting_on_the_terminating_guard_returns() {
    let (cloud, recorded) = stopped_mid_run(None);
    // The old agent died after drain had already deleted the guard.
    let h = Harness::start_with(
        cloud,
        true,
        Some(recorded),
        GuardPod::Terminating { held: true },
        true,
        false,
    )
    .await;
    h.until("drain returns", |h| h.cluster.guard_gone()).await;
    assert_eq!(h.on_source(), 0);
    assert_eq!(
        h.cluster.last_record().started_at.as_deref(),
        Some("2026-12-01T00:00:00Z")
    );
    assert_eq!(h.terminate().await, 0);
}

#[tokio::test(start_paused = true)]
async fn uncordon_while_the_guard_is_terminating_keeps_it_until_the_hypervisor_is_empty() {
    let cloud = stalling_vm();
    let h = Harness::start(cloud).await;
    h.cordon(true).await;
    h.cluster.delete();
    h.migrating().await;
    h.cordon(false).await;
    h.until("idle", |h| h.cluster.phase() == Phase::Idle).await;
    sleep(Duration::from_secs(30)).await;
    assert_eq!(
        h.cluster.lock().guard,
        GuardPod::Terminating { held: true },
        "a drain still waiting must not return while the VM runs there"
    );
    sleep(GUARD_GRACE).await;
    h.until("reported", |h| h.health.readiness().is_err()).await;
    // The VM goes (its owner deleted it): the guard is let go and made anew.
    h.cloud.delete_vm("vm-1");
    h.until("a new guard", |h| h.cluster.guard_in_place()).await;
    h.until("ready again", |h| h.health.readiness().is_ok()).await;
    assert_eq!(h.terminate().await, 0);
}

#[tokio::test(start_paused = true)]
async fn a_deleted_node_lets_its_guard_go() {
    let h = Harness::start(cloud_with(1)).await;
    h.cordon(true).await;
    h.cluster.delete();
    h.send(Input::Node(None)).await;
    h.until("the guard gone", |h| h.cluster.guard_gone()).await;
    assert_eq!(h.terminate().await, 0);
}

#[tokio::test(start_paused = true)]
async fn a_node_registered_again_gets_a_guard_again() {
    let h = Harness::start(cloud_with(0)).await;
    h.send(Input::Node(None)).await;
    h.until("released", |h| !h.cluster.lock().budget).await;
    h.cluster.delete();
    h.until("gone", |h| h.cluster.guard_gone()).await;
    h.cordon(false).await;
    h.until("a new guard", |h| h.cluster.guard_in_place()).await;
    assert_eq!(h.terminate().await, 0);
}

#[tokio::test(start_paused = true)]
async fn guard_api_errors_are_retried_and_reported_after_the_grace() {
    let cloud = cloud_with(0);
    let h = Harness::start_with(cloud, false, None, GuardPod::Missing, true, false).await;
    h.cluster.lock().refuse_guard = Some("pods is forbidden: violates PodSecurity \"restricted\"".into());
    h.cluster.delete();
    sleep(GUARD_GRACE + Duration::from_secs(11)).await;
    let why = h.health.readiness().expect_err("reported");
    assert!(why.contains("PodSecurity"), "{why}");
    h.cluster.lock().refuse_guard = None;
    h.until("the guard in place", |h| h.cluster.guard_in_place()).await;
    h.until("ready", |h| h.health.readiness().is_ok()).await;
    assert_eq!(h.terminate().await, 0);
}

#[tokio::test(start_paused = true)]
async fn sigterm_in_every_phase_exits_at_once_and_keeps_the_record() {
    // Idle.
    let h = Harness::start(cloud_with(1)).await;
    assert_eq!(h.terminate().await, 0);

    // Evacuating: the in-flight migration is left to Nova, the drain keeps waiting.
    let cloud = stalling_vm();
    let h = Harness::start(cloud.clone()).await;
    h.cordon(true).await;
    h.migrating().await;
    let cluster = h.cluster.clone();
    assert_eq!(h.terminate().await, 0);
    assert_eq!(cloud.migration_statuses("vm-1"), ["running"], "left to Nova");
    let record = cluster.last_record();
    assert_eq!(record.phase, Phase::Evacuating);
    assert!(record.last_error.unwrap_or_default().contains("resumes"));
    assert!(cluster.guard_in_place(), "drain keeps waiting for the next agent");

    // Cancelling (uncordoned while the abort is under way).
    let cloud = stalling_vm();
    let h = Harness::start(cloud).await;
    h.cordon(true).await;
    h.migrating().await;
    h.cordon(false).await;
    assert_eq!(h.terminate().await, 0);

    // Evacuated.
    let h = Harness::start(cloud_with(1)).await;
    h.cordon(true).await;
    h.until("evacuated", |h| h.cluster.phase() == Phase::Evacuated).await;
    let cluster = h.cluster.clone();
    assert_eq!(h.terminate().await, 0);
    assert_eq!(cluster.phase(), Phase::Evacuated);
}

#[tokio::test(start_paused = true)]
async fn an_uninstalled_agent_releases_an_idle_guard_and_keeps_one_a_drain_waits_on() {
    // Restarted (a rolling update): the guard stays for the next agent.
    let h = Harness::start(cloud_with(1)).await;
    let cluster = h.cluster.clone();
    assert_eq!(h.terminate().await, 0);
    assert!(cluster.guard_in_place());

    // Uninstalled while idle, VMs and all: nothing drains the node, so drains must not block later.
    let h = Harness::start(cloud_with(1)).await;
    h.cluster.lock().uninstalled = Some("its DaemonSet drainer is gone".into());
    let cluster = h.cluster.clone();
    assert_eq!(h.terminate().await, 0);
    assert!(!cluster.lock().budget, "the budget is deleted");
    assert!(
        matches!(cluster.lock().guard, GuardPod::Present { held: false, .. }),
        "our finalizer is off: {:?}",
        cluster.lock().guard
    );
    assert!(cluster.evict() && cluster.guard_gone(), "a drain now returns at once");

    // Uninstalled mid-evacuation: the drain keeps waiting, and an Event says why.
    let cloud = stalling_vm();
    let h = Harness::start(cloud.clone()).await;
    h.cordon(true).await;
    h.migrating().await;
    h.cluster.lock().uninstalled = Some("its namespace nova-drain is being deleted".into());
    let cluster = h.cluster.clone();
    assert_eq!(h.terminate().await, 0);
    assert!(cluster.guard_in_place(), "VMs may still run there");
    let events = cluster.lock().events.clone();
    let kept = events.iter().find(|(_, reason, _)| *reason == "DrainGuardKept");
    assert!(
        kept.is_some_and(|(severity, _, note)| *severity == Severity::Warning
            && note.contains("namespace nova-drain is being deleted")
            && note.contains("drainer release-guard")),
        "{events:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn progress_is_recorded_by_the_agent_alone_and_never_after_the_end() {
    let h = Harness::start(cloud_with(3)).await;
    h.cordon(true).await;
    h.until("evacuated", |h| h.cluster.phase() == Phase::Evacuated).await;
    sleep(Duration::from_secs(5)).await;
    let records = h.cluster.lock().records.clone();
    let end = records
        .iter()
        .position(|s| s.phase == Phase::Evacuated)
        .expect("the end is recorded");
    assert_eq!(end, records.len() - 1, "nothing recorded after the end: {records:?}");
    assert_eq!(records[end].vms_left, Some(0));
    let lefts: Vec<usize> = records.iter().filter_map(|s| s.vms_left).collect();
    assert!(lefts.windows(2).all(|w| w[0] >= w[1]), "counts only go down: {lefts:?}");
    assert_eq!(h.terminate().await, 0);
}

impl FakeCluster {
    /// The statuses written to each Evacuation, oldest first.
    fn evacuations(&self) -> Vec<(String, Vec<EvacuationStatus>)> {
        self.lock().evacuations.clone()
    }
}

/// A cordon opens an Evacuation named in the Node's annotations, written when
/// the VMs are counted and as each move ends, and finished from the report:
/// phase, counts, one entry per VM with its destination and start time.
#[tokio::test(start_paused = true)]
async fn a_cordon_records_its_run_in_an_evacuation() {
    let h = Harness::start(cloud_with(3)).await;
    h.cordon(true).await;
    h.drain().await;
    h.until("evacuated", |h| h.cluster.phase() == Phase::Evacuated).await;
    let evacuations = h.cluster.evacuations();
    assert_eq!(evacuations.len(), 1, "{evacuations:?}");
    let (name, written) = &evacuations[0];
    assert_eq!(h.cluster.last_record().evacuation.as_deref(), Some(name.as_str()));
    assert_eq!(written[0].phase, Some(EvacuationPhase::Running));
    assert!(
        written.len() >= 5,
        "started, counted, three moves ended, finished: {written:?}"
    );
    let during = &written[written.len() - 2];
    assert_eq!(during.phase, Some(EvacuationPhase::Running));
    assert_eq!(during.counts.map(|c| c.total), Some(3));
    let last = written.last().expect("a final status");
    assert_eq!(last.phase, Some(EvacuationPhase::Succeeded));
    assert_eq!(last.nova_host.as_deref(), Some(SOURCE));
    assert_eq!(last.service_disabled_by_us, Some(true));
    assert!(last.completion_time.is_some() && last.start_time.is_some());
    let counts = last.counts.expect("counts");
    assert_eq!((counts.total, counts.moved, counts.failed, counts.left), (3, 3, 0, 0));
    assert_eq!(last.vms.len(), 3);
    for vm in &last.vms {
        assert_eq!((vm.outcome.as_str(), vm.action.as_str()), ("migrated", "live-migrate"));
        assert!(vm.destination.is_some() && vm.start_time.is_some(), "{vm:?}");
        assert_eq!(vm.source, SOURCE);
    }
    assert_eq!(last.last_error, None);
    // The run's Events are about the Evacuation too, up to its conclusion.
    let about: Vec<&str> = h
        .cluster
        .lock()
        .evacuation_events
        .iter()
        .filter(|(evacuation, _)| evacuation == name)
        .map(|(_, reason)| *reason)
        .collect();
    assert_eq!(about.first(), Some(&"NovaComputeDisabled"), "{about:?}");
    assert_eq!(
        about.iter().filter(|r| **r == "LiveMigrationSucceeded").count(),
        3,
        "{about:?}"
    );
    assert_eq!(about.last(), Some(&"EvacuationSucceeded"), "{about:?}");
    assert_eq!(h.cluster.lock().following, None, "no longer followed once concluded");
    assert_eq!(h.terminate().await, 0);
}

/// An uncordon mid-run ends the Evacuation `Cancelled`, the VM's move aborted;
/// a failed run ends it `Failed` with the VM's reason, and the retry opens a new one.
#[tokio::test(start_paused = true)]
async fn cancelled_and_failed_runs_are_recorded_as_such() {
    let h = Harness::start(stalling_vm()).await;
    h.cordon(true).await;
    h.migrating().await;
    h.cordon(false).await;
    h.until("idle", |h| h.cluster.phase() == Phase::Idle).await;
    let evacuations = h.cluster.evacuations();
    let last = evacuations[0].1.last().expect("a final status");
    assert_eq!(last.phase, Some(EvacuationPhase::Cancelled));
    assert_eq!(last.vms[0].outcome, "aborted");
    assert_eq!(
        last.counts.map(|c| (c.failed, c.left)),
        Some((0, 1)),
        "a cancelled move is not a failure"
    );
    assert_eq!(h.terminate().await, 0);

    let cloud = FakeCloud::new();
    cloud.add_vm("vm-1", "SUSPENDED", 2048);
    let h = Harness::start(Arc::new(cloud)).await;
    h.cordon(true).await;
    h.until("failed", |h| h.cluster.phase() == Phase::Failed).await;
    let failed = h.cluster.evacuations()[0].1.last().cloned().expect("a final status");
    assert_eq!(failed.phase, Some(EvacuationPhase::Failed));
    assert_eq!(failed.counts.map(|c| (c.skipped, c.left)), Some((1, 1)), "{failed:?}");
    assert!(
        failed.last_error.as_deref().is_some_and(|e| e.contains("vm-1")),
        "{failed:?}"
    );
    tokio::time::advance(RETRY_AFTER_FAILURE).await;
    h.until("a second run", |h| h.cluster.evacuations().len() == 2).await;
    assert_eq!(h.terminate().await, 0);
}

/// Without the CRD the run goes on, recorded in the Node's annotations only.
#[tokio::test(start_paused = true)]
async fn without_the_crd_the_evacuation_still_runs() {
    let h = Harness::start(cloud_with(2)).await;
    h.cluster.lock().crd_installed = false;
    h.cordon(true).await;
    h.drain().await;
    assert_eq!(h.on_source(), 0);
    assert!(h.cluster.evacuations().is_empty());
    assert_eq!(h.cluster.last_record().evacuation, None);
    assert_eq!(h.terminate().await, 0);
}

/// An agent restarted mid-run goes on writing the Evacuation the Node names.
#[tokio::test(start_paused = true)]
async fn a_restarted_agent_goes_on_with_the_same_evacuation() {
    let (cloud, recorded) = stopped_mid_run(Some("node-a-20261201-000000"));
    // What the earlier agent wrote: one VM moved off, one move under way.
    let earlier = |id: &str, outcome: &str| VmStatus {
        id: id.into(),
        outcome: outcome.into(),
        action: "live-migrate".into(),
        ..VmStatus::default()
    };
    let written = EvacuationStatus {
        phase: Some(EvacuationPhase::Running),
        start_time: Some("2026-12-01T00:00:00Z".into()),
        vms: vec![earlier("vm-0", "migrated"), earlier("vm-9", "moving")],
        ..EvacuationStatus::default()
    };
    let h = Harness::start_seeded(
        cloud,
        true,
        Some(recorded),
        GuardPod::Terminating { held: true },
        true,
        Flags::default(),
        vec![("node-a-20261201-000000".into(), vec![written])],
    )
    .await;
    h.until("drain returns", |h| h.cluster.guard_gone()).await;
    let evacuations = h.cluster.evacuations();
    assert_eq!(evacuations.len(), 1, "no new Evacuation: {evacuations:?}");
    let last = evacuations[0].1.last().cloned().expect("written");
    assert_eq!(last.phase, Some(EvacuationPhase::Succeeded));
    assert_eq!(last.start_time.as_deref(), Some("2026-12-01T00:00:00Z"));
    let ids: Vec<&str> = last.vms.iter().map(|vm| vm.id.as_str()).collect();
    assert_eq!(
        ids,
        ["vm-1", "vm-2", "vm-0", "vm-9"],
        "the earlier agent's VMs are kept"
    );
    assert_eq!(last.vms[2].outcome, "migrated");
    assert_eq!(last.vms[3].outcome, "not-on-host");
    let counts = last.counts.expect("counts");
    assert_eq!((counts.total, counts.moved, counts.failed, counts.left), (4, 4, 0, 0));
    assert_eq!(h.terminate().await, 0);
}

/// A hand-made Evacuation of a node that stays schedulable: the hypervisor is
/// evacuated (hypervisor-only maintenance), recorded in that object, and the
/// service stays disabled while it exists; deleting it re-enables the service,
/// then our finalizer lets it go.
#[tokio::test(start_paused = true)]
async fn a_hand_made_evacuation_evacuates_without_a_cordon_and_its_deletion_re_enables() {
    let h = Harness::start(cloud_with(3)).await;
    h.cluster.make_evacuation("maintenance-1", false);
    h.until("held by our finalizer", |h| h.cluster.held("maintenance-1"))
        .await;
    h.until("evacuated", |h| h.cluster.phase() == Phase::Evacuated).await;
    assert_eq!(h.on_source(), 0);
    assert!(!h.cloud.service().enabled, "disabled while the Evacuation exists");
    assert!(
        h.cluster.guard_in_place(),
        "not cordoned, no drain waits: the guard stays until a cordon checks Nova again"
    );
    assert_eq!(h.cluster.last_record().evacuation.as_deref(), Some("maintenance-1"));
    let done = h.cluster.status_of("maintenance-1").expect("status");
    assert_eq!(done.phase, Some(EvacuationPhase::Succeeded));
    assert_eq!(done.counts.map(|c| (c.total, c.moved)), Some((3, 3)));
    assert_eq!(h.cluster.evacuations().len(), 1, "no other Evacuation was created");

    h.cluster.delete_evacuation("maintenance-1");
    h.until("the service re-enabled", |h| h.cloud.service().enabled).await;
    h.until("idle", |h| h.cluster.phase() == Phase::Idle).await;
    h.until("the Evacuation gone", |h| !h.cluster.evacuation_exists("maintenance-1"))
        .await;
    h.until("the guard back", |h| h.cluster.guard_in_place()).await;
    assert_eq!(h.terminate().await, 0);
}

/// A paused Evacuation gets the plan in its status and nothing changes in
/// Nova; unpaused, it runs, recorded in the same object with the plan kept.
#[tokio::test(start_paused = true)]
async fn a_paused_evacuation_shows_the_plan_and_changes_nothing_until_unpaused() {
    let cloud = cloud_with(2);
    cloud.add_vm("vm-3", "SUSPENDED", 1024);
    let h = Harness::start(cloud).await;
    h.cluster.make_evacuation("approve-me", true);
    h.until("paused", |h| h.cluster.phase() == Phase::Paused).await;
    let plan = h.cluster.status_of("approve-me").expect("the plan");
    assert_eq!(plan.phase, Some(EvacuationPhase::Paused));
    let verdict = plan.plan.clone().expect("a verdict");
    assert_eq!((verdict.live_migrations, verdict.stays), (2, 1), "{verdict:?}");
    assert_eq!(verdict.expected_result, "failed", "the SUSPENDED VM stays: {verdict:?}");
    let outcomes: Vec<(&str, &str)> = plan
        .vms
        .iter()
        .map(|vm| (vm.outcome.as_str(), vm.action.as_str()))
        .collect();
    assert_eq!(
        outcomes.iter().filter(|o| **o == ("planned", "live-migrate")).count(),
        2,
        "{outcomes:?}"
    );
    // A good while later, still nothing in Nova.
    tokio::time::advance(Duration::from_secs(600)).await;
    h.until("a quiet moment", |_| true).await;
    assert!(h.cloud.service().enabled);
    assert_eq!(h.on_source(), 3);
    assert!(h.cloud.migration_statuses("vm-1").is_empty());
    assert!(h.cluster.reasons().contains(&"EvacuationPaused"));

    // Its spec changed while paused: planned again from the new one.
    h.cluster.change_spec("approve-me", |spec| {
        spec.vm_action = Some(crate::kube::evacuation::VmAction::ColdMigrate)
    });
    h.until("planned again", |h| {
        h.cluster
            .status_of("approve-me")
            .is_some_and(|s| s.observed_generation == Some(2))
    })
    .await;
    let replanned = h.cluster.status_of("approve-me").expect("the plan");
    let verdict = replanned.plan.clone().expect("a verdict");
    assert_eq!(
        (verdict.live_migrations, verdict.cold_migrations),
        (0, 2),
        "{verdict:?}"
    );
    assert!(h.cloud.service().enabled, "still nothing in Nova");

    h.cluster.unpause("approve-me");
    h.until("the two movable VMs moved", |h| h.on_source() == 1).await;
    h.until("the run over", |h| h.cluster.phase() == Phase::Failed).await;
    let ran = h.cluster.status_of("approve-me").expect("status");
    assert_eq!(ran.phase, Some(EvacuationPhase::Failed), "the SUSPENDED VM stays");
    assert_eq!(ran.plan, Some(verdict), "the plan it ran from is kept");
    assert_eq!(ran.counts.map(|c| (c.moved, c.skipped)), Some((2, 1)));
    assert_eq!(h.terminate().await, 0);
}

/// `--start-paused`: a cordon creates a paused Evacuation and `kubectl drain`
/// waits until a person unpauses it and the hypervisor is empty.
#[tokio::test(start_paused = true)]
async fn with_start_paused_a_cordon_waits_for_approval() {
    let h = Harness::start_seeded(
        cloud_with(2),
        false,
        None,
        GuardPod::Missing,
        true,
        Flags {
            start_paused: true,
            ..Flags::default()
        },
        Vec::new(),
    )
    .await;
    h.until("the guard in place", |h| h.cluster.guard_in_place()).await;
    h.cordon(true).await;
    h.until("paused", |h| h.cluster.phase() == Phase::Paused).await;
    let name = h.cluster.last_record().evacuation.expect("an Evacuation");
    tokio::time::advance(Duration::from_secs(300)).await;
    assert!(!h.cluster.evict(), "drain keeps waiting while paused");
    assert!(h.cloud.service().enabled, "nothing changed in Nova");
    h.cluster.unpause(&name);
    h.drain().await;
    assert_eq!(h.on_source(), 0);
    assert_eq!(h.cluster.evacuations().len(), 1, "the approved one ran");
    assert_eq!(
        h.cluster.status_of(&name).and_then(|s| s.phase),
        Some(EvacuationPhase::Succeeded)
    );
    assert_eq!(h.terminate().await, 0);
}

/// Deleting the Evacuation of a running cordon-started run cancels it (the
/// move aborted), and no new run starts while the node stays cordoned; the
/// uncordon then re-enables the service.
#[tokio::test(start_paused = true)]
async fn deleting_the_running_evacuation_cancels_it_and_no_new_run_starts() {
    let h = Harness::start(stalling_vm()).await;
    h.cordon(true).await;
    h.migrating().await;
    let name = h.cluster.last_record().evacuation.expect("an Evacuation");
    h.cluster.delete_evacuation(&name);
    h.until("cancelled", |h| h.cluster.phase() == Phase::Cancelled).await;
    assert_eq!(h.on_source(), 1, "the VM stays");
    assert!(
        h.cloud.migration_statuses("vm-1").contains(&"cancelled"),
        "{:?}",
        h.cloud.migration_statuses("vm-1")
    );
    assert!(h.cluster.reasons().contains(&"EvacuationCancelled"));
    tokio::time::advance(Duration::from_secs(3600)).await;
    h.until("a quiet moment", |_| true).await;
    assert_eq!(h.cluster.phase(), Phase::Cancelled, "no new run while cordoned");
    assert!(h.cluster.evacuations().is_empty(), "{:?}", h.cluster.evacuations());
    assert!(h.cluster.guard_in_place(), "drain keeps waiting: VMs are on the host");
    h.cordon(false).await;
    h.until("the service re-enabled", |h| h.cloud.service().enabled).await;
    h.until("idle", |h| h.cluster.phase() == Phase::Idle).await;
    assert_eq!(h.terminate().await, 0);
}

/// Tags choose per VM: `stop` is stopped (marked) and stays, `leave` (a
/// stopped VM) stays untouched, the node's annotation sends the others the way it says; the
/// run succeeds and drain returns. After an agent restart, the uncordon
/// starts the stopped VM again and removes our marker.
#[tokio::test(start_paused = true)]
async fn tags_choose_per_vm_and_stopped_vms_are_started_again_after_a_restart() {
    let cloud = FakeCloud::new();
    cloud.add_vm("vm-1", "ACTIVE", 2048);
    cloud.add_vm("vm-2", "SHUTOFF", 2048);
    cloud.add_vm("vm-3", "ACTIVE", 2048);
    let cloud = Arc::new(cloud);
    cloud.tag("vm-1", "nova-drain:stop");
    cloud.tag("vm-2", "nova-drain:leave");
    let h = Harness::start(cloud.clone()).await;
    let mut annotated = node(true, None);
    annotated
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(crate::kube::VM_ACTION.into(), "cold-migrate".into());
    h.send(Input::Node(Some(Box::new(annotated)))).await;
    h.drain().await;
    assert_eq!(h.cluster.phase(), Phase::Evacuated);
    let vm1 = cloud.vm("vm-1");
    assert_eq!((vm1.status.as_str(), vm1.host.as_deref()), ("SHUTOFF", Some(SOURCE)));
    assert!(
        vm1.tags
            .iter()
            .flatten()
            .any(|t| t == crate::evacuation::STOPPED_BY_US_TAG)
    );
    let vm2 = cloud.vm("vm-2");
    assert_eq!((vm2.status.as_str(), vm2.host.as_deref()), ("SHUTOFF", Some(SOURCE)));
    assert!(cloud.migration_statuses("vm-2").is_empty(), "left untouched");
    assert_ne!(cloud.vm("vm-3").host.as_deref(), Some(SOURCE));
    assert_eq!(cloud.migration_statuses("vm-3").len(), 1);
    assert!(h.cluster.reasons().contains(&"VMStopped"));
    let (_, written) = h.cluster.evacuations().pop().expect("an Evacuation");
    let last = written.last().expect("a final status");
    assert_eq!(last.phase, Some(EvacuationPhase::Succeeded));
    let counts = last.counts.expect("counts");
    assert_eq!((counts.moved, counts.stopped, counts.failed), (1, 1, 0), "{counts:?}");
    let actions: Vec<(&str, &str)> = last.vms.iter().map(|vm| (vm.id.as_str(), vm.action.as_str())).collect();
    assert!(actions.contains(&("vm-3", "cold-migrate")), "{actions:?}");
    let recorded = h.cluster.last_record();
    assert_eq!(h.terminate().await, 0);

    // Another agent, after the restart, sees the uncordon.
    let h = Harness::start_with(cloud.clone(), false, Some(recorded), GuardPod::Missing, true, false).await;
    h.until("restored", |h| {
        h.cloud.service().enabled
            && h.cluster.last_record() == DrainState::default()
            && !h.cluster.lock().records.is_empty()
    })
    .await;
    let vm1 = cloud.vm("vm-1");
    assert_eq!(vm1.status, "ACTIVE", "started again");
    assert!(
        !vm1.tags
            .iter()
            .flatten()
            .any(|t| t == crate::evacuation::STOPPED_BY_US_TAG)
    );
    assert!(h.cluster.reasons().contains(&"VMStarted"));
    assert_eq!(h.terminate().await, 0);
}

/// A node default the agent cannot read fails the run and changes nothing.
#[tokio::test(start_paused = true)]
async fn an_unreadable_vm_action_annotation_fails_the_run_untouched() {
    let h = Harness::start(cloud_with(1)).await;
    let mut annotated = node(true, None);
    annotated
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(crate::kube::VM_ACTION.into(), "evacuate".into());
    h.send(Input::Node(Some(Box::new(annotated)))).await;
    h.until("failed", |h| h.cluster.phase() == Phase::Failed).await;
    assert!(h.cloud.service().enabled, "nothing changed in Nova");
    let error = h.cluster.last_record().last_error.unwrap_or_default();
    assert!(
        error.contains("nova-kubernetes-drain/vm-action") && error.contains("evacuate"),
        "{error}"
    );
    assert_eq!(h.on_source(), 1);
    assert_eq!(h.terminate().await, 0);
}

/// A VM its owner's tag leaves running keeps `kubectl drain` waiting (the
/// node is rebooted next): the run counts as failed and says why.
#[tokio::test(start_paused = true)]
async fn a_vm_left_running_by_its_tag_keeps_drain_waiting() {
    let cloud = cloud_with(2);
    cloud.tag("vm-1", "nova-drain:leave");
    let h = Harness::start(cloud.clone()).await;
    h.cordon(true).await;
    h.until("failed", |h| h.cluster.phase() == Phase::Failed).await;
    assert_eq!(cloud.vm("vm-1").host.as_deref(), Some(SOURCE), "never touched");
    assert!(cloud.migration_statuses("vm-1").is_empty());
    assert_ne!(cloud.vm("vm-2").host.as_deref(), Some(SOURCE));
    assert!(!h.cluster.evict(), "drain keeps waiting");
    let error = h.cluster.last_record().last_error.unwrap_or_default();
    assert!(
        error.contains("vm-1") && error.contains("kubectl drain waits"),
        "{error}"
    );
    assert_eq!(h.terminate().await, 0);
}

/// A hand-made Evacuation's spec overrides the agent's settings for its run:
/// `vmAction` sends the untagged VMs the way it says (over the Node's
/// annotation), `maxParallel` bounds what runs at once.
#[tokio::test(start_paused = true)]
async fn an_evacuations_spec_overrides_the_agents_settings_for_its_run() {
    let h = Harness::start(cloud_with(3)).await;
    let mut annotated = node(false, None);
    annotated
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(crate::kube::VM_ACTION.into(), "leave".into());
    h.send(Input::Node(Some(Box::new(annotated)))).await;
    h.cluster.make_evacuation_with(
        "cold-one-at-a-time",
        EvacuationSpec {
            node_name: NODE.into(),
            vm_action: Some(crate::kube::evacuation::VmAction::ColdMigrate),
            max_parallel: Some(1),
            ..EvacuationSpec::default()
        },
    );
    h.until("evacuated", |h| h.cluster.phase() == Phase::Evacuated).await;
    assert_eq!(h.on_source(), 0);
    let done = h.cluster.status_of("cold-one-at-a-time").expect("status");
    assert!(done.vms.iter().all(|vm| vm.action == "cold-migrate"), "{:?}", done.vms);
    for vm in ["vm-1", "vm-2", "vm-3"] {
        assert!(h.cloud.calls().live_migrate_times(vm).is_empty(), "{vm} moved cold");
    }
    assert_eq!(h.terminate().await, 0);
}

/// A hand-made Evacuation taken on while Nova cannot be reached shows
/// `Pending` (held by our finalizer), and runs once Nova answers.
#[tokio::test(start_paused = true)]
async fn a_hand_made_evacuation_is_pending_until_nova_answers() {
    let h = Harness::start_with(cloud_with(1), false, None, GuardPod::Missing, false, false).await;
    h.cluster.make_evacuation("waiting", false);
    h.until("held", |h| h.cluster.held("waiting")).await;
    h.until("pending", |h| {
        h.cluster.status_of("waiting").and_then(|s| s.phase) == Some(EvacuationPhase::Pending)
    })
    .await;
    let pending = h.cluster.status_of("waiting").expect("status");
    let progressing = pending.conditions.iter().find(|c| c.type_ == "Progressing").cloned();
    assert_eq!(progressing.map(|c| c.reason), Some("Pending".to_string()));
    h.nova_reachable().await;
    h.until("evacuated", |h| h.cluster.phase() == Phase::Evacuated).await;
    assert_eq!(
        h.cluster.status_of("waiting").and_then(|s| s.phase),
        Some(EvacuationPhase::Succeeded)
    );
    assert_eq!(h.terminate().await, 0);
}

/// An agent that needs one of the cluster's evacuation slots to evacuate;
/// the test plays the coordinator (`Input::Slot`).
async fn coordinated(cloud: Arc<FakeCloud>, max_parallel: usize) -> Harness {
    let flags = Flags {
        coordinated: true,
        max_parallel: Some(max_parallel),
        ..Flags::default()
    };
    let h = Harness::start_seeded(cloud, false, None, GuardPod::Missing, true, flags, Vec::new()).await;
    h.until("the guard in place", |h| h.cluster.guard_in_place()).await;
    h
}

impl Harness {
    /// What the agent asks of the coordinator now.
    fn asks(&self) -> Option<Want> {
        self.want.as_ref().and_then(|want| want.borrow().clone())
    }

    /// The coordinator tells a new standing: to the agent's loop, and to its run's slot guard.
    async fn standing(&self, standing: Standing) {
        if let Some(told) = &self.told {
            told.send_replace(standing.clone());
        }
        self.send(Input::Slot(standing)).await;
    }

    /// The coordinator stops counting on the slot while the agent's loop is
    /// held up (a write to a stalled API server): only the slot guard hears it.
    fn standing_unheard(&self, standing: Standing) {
        if let Some(told) = &self.told {
            told.send_replace(standing);
        }
    }

    /// The Evacuation the Node names.
    fn evacuation_name(&self) -> String {
        self.cluster
            .last_record()
            .evacuation
            .expect("the Node names its Evacuation")
    }
}

#[tokio::test(start_paused = true)]
async fn a_cordon_waits_for_a_slot_with_the_service_disabled_then_evacuates_within_its_share() {
    let h = coordinated(cloud_with(3), 3).await;
    assert_eq!(h.asks(), None, "an idle node asks for no slot");
    h.cordon(true).await;
    h.until("waiting", |h| h.cluster.phase() == Phase::Waiting).await;
    assert!(h.service_ours(), "no new VM lands while it waits");
    assert!(h.asks().is_some());
    let name = h.evacuation_name();
    h.standing(Standing::Waiting {
        position: 2,
        waiting: 3,
    })
    .await;
    h.until("its place shown", |h| {
        h.cluster.status_of(&name).is_some_and(|s| s.queue_position == Some(2))
    })
    .await;
    sleep(Duration::from_secs(300)).await;
    assert!(h.cloud.calls().starts.is_empty(), "nothing moves without a slot");
    assert!(!h.cluster.evict(), "drain keeps waiting");
    let status = h.cluster.status_of(&name).expect("a status");
    assert_eq!(status.phase, Some(EvacuationPhase::Waiting));
    let scrape = h.metrics.render(0, 0);
    assert!(scrape.contains("nova_drain_queue_position 2"), "{scrape}");
    assert!(scrape.contains("nova_drain_waiting 1"), "{scrape}");

    h.standing(Standing::Holding {
        slot: 0,
        share: 2,
        beside: Vec::new(),
    })
    .await;
    h.drain().await;
    assert_eq!(h.on_source(), 0);
    assert_eq!(h.cluster.phase(), Phase::Evacuated);
    assert_eq!(h.cloud.calls().max_in_flight, 2, "the slot's share caps the agent's 3");
    h.until("the slot let go", |h| h.asks().is_none()).await;
    assert_eq!(h.cluster.evacuations().len(), 1, "one Evacuation, waiting then running");
    let status = h.cluster.status_of(&name).expect("a status");
    assert_eq!(status.phase, Some(EvacuationPhase::Succeeded));
    assert_eq!(status.queue_position, None);
    let reasons = h.cluster.reasons();
    assert!(reasons.contains(&"EvacuationWaiting"), "{reasons:?}");
    assert!(reasons.contains(&"EvacuationSlotTaken"), "{reasons:?}");
    let scrape = h.metrics.render(0, 0);
    assert!(scrape.contains("nova_drain_slot_wait_seconds_count 1"), "{scrape}");
    assert!(scrape.contains("nova_drain_slot_held 1"), "{scrape}");
    assert_eq!(h.terminate().await, 0);
}

#[tokio::test(start_paused = true)]
async fn an_uncordon_while_waiting_leaves_the_queue_and_enables_the_service_again() {
    let h = coordinated(cloud_with(1), 1).await;
    h.cordon(true).await;
    h.until("waiting", |h| h.cluster.phase() == Phase::Waiting).await;
    let name = h.evacuation_name();
    h.cordon(false).await;
    h.until("idle", |h| h.cluster.phase() == Phase::Idle).await;
    assert!(h.cloud.service().enabled);
    assert_eq!(h.asks(), None, "out of the queue");
    assert_eq!(
        h.cluster.status_of(&name).and_then(|s| s.phase),
        Some(EvacuationPhase::Cancelled)
    );
    assert!(h.cloud.calls().starts.is_empty());
    assert!(h.cluster.guard_in_place());
    assert_eq!(h.terminate().await, 0);
}

#[tokio::test(start_paused = true)]
async fn a_slot_not_renewed_in_time_stops_the_run_which_waits_then_goes_on() {
    let cloud = cloud_with(1);
    cloud.script(
        "vm-1",
        &[
            Script::Stall {
                progress_for: Duration::from_secs(5),
            },
            Script::Complete {
                after: Duration::from_secs(10),
            },
        ],
    );
    let h = coordinated(cloud, 1).await;
    h.cordon(true).await;
    h.until("waiting", |h| h.cluster.phase() == Phase::Waiting).await;
    let asked = h.asks();
    h.standing(Standing::Holding {
        slot: 0,
        share: 1,
        beside: Vec::new(),
    })
    .await;
    h.migrating().await;
    h.standing(Standing::Unsure { slot: 0 }).await;
    h.until("waiting again", |h| h.cluster.phase() == Phase::Waiting).await;
    assert_eq!(
        h.cloud.migration_statuses("vm-1"),
        ["cancelled"],
        "aborted, not left running"
    );
    assert_eq!(h.on_source(), 1);
    assert_eq!(h.asks(), asked, "it keeps its place in the queue");
    assert_eq!(h.cluster.last_record().failures, 0, "no failure, no backoff");
    let name = h.evacuation_name();
    assert_eq!(
        h.cluster.status_of(&name).and_then(|s| s.phase),
        Some(EvacuationPhase::Waiting)
    );
    let reasons = h.cluster.reasons();
    assert!(reasons.contains(&"EvacuationSlotLost"), "{reasons:?}");
    assert!(!reasons.contains(&"EvacuationFailed"), "{reasons:?}");
    assert!(h.metrics.render(0, 0).contains("nova_drain_slots_lost_total 1"));

    // Held again: the same Evacuation goes on and empties the hypervisor.
    h.standing(Standing::Holding {
        slot: 0,
        share: 1,
        beside: Vec::new(),
    })
    .await;
    h.drain().await;
    assert_eq!(h.on_source(), 0);
    assert_eq!(h.cluster.evacuations().len(), 1);
    assert_eq!(
        h.cluster.status_of(&name).and_then(|s| s.phase),
        Some(EvacuationPhase::Succeeded)
    );
    assert_eq!(h.terminate().await, 0);
}

#[tokio::test(start_paused = true)]
async fn a_lost_slot_stops_the_run_even_while_the_agents_loop_hears_nothing() {
    let cloud = cloud_with(1);
    cloud.script(
        "vm-1",
        &[
            Script::Stall {
                progress_for: Duration::from_secs(5),
            },
            Script::Complete {
                after: Duration::from_secs(10),
            },
        ],
    );
    let h = coordinated(cloud, 1).await;
    h.cordon(true).await;
    h.until("waiting", |h| h.cluster.phase() == Phase::Waiting).await;
    h.standing(Standing::Holding {
        slot: 0,
        share: 1,
        beside: Vec::new(),
    })
    .await;
    h.migrating().await;
    // Only the run's slot guard hears it, as when the agent's loop waits on a stalled API server.
    h.standing_unheard(Standing::Unsure { slot: 0 });
    h.until("aborted", |h| h.cloud.migration_statuses("vm-1") == ["cancelled"])
        .await;
    h.until("waiting again", |h| h.cluster.phase() == Phase::Waiting).await;
    assert_eq!(h.cluster.last_record().failures, 0, "no failure, no backoff");
    assert!(h.cluster.reasons().contains(&"EvacuationSlotLost"));
    assert_eq!(h.terminate().await, 0);
}
