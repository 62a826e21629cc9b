//! The queue for the cluster's evacuation slots, as the agents run it: the
//! real coordinator of `src/daemon/coordinator.rs`, one per simulated agent,
//! against one API server (the in-process one of `tests/support/kube_api.rs`,
//! or the real cluster named by `DRAINER_TEST_KUBECONFIG`, in a namespace of
//! its own), with its Lease objects. Each test plays the agents' runs: an
//! agent that holds a slot "evacuates" for a while, then lets it go.

mod support;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use nova_kubernetes_drain::daemon::coordinator::{self, CoordinationSettings, Standing, Want};
use nova_kubernetes_drain::daemon::queue::{Limits, ZoneRule};
use nova_kubernetes_drain::kube::leases::CoordinationLeases;
use serde_json::json;
use support::cluster::KUBECONFIG_ENV;
use support::kube_api::KubeApi;
use support::proxy::Proxy;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Short, so that expiries are seen within seconds.
const LEASE: Duration = Duration::from_secs(4);

fn settings(slots: u32) -> CoordinationSettings {
    CoordinationSettings {
        limits: Limits {
            slots,
            migrations: 5,
            zones: ZoneRule::Any,
        },
        lease: LEASE,
    }
}

/// The API server the agents share.
struct Cluster {
    fake: Option<KubeApi>,
    config: kube::Config,
    namespace: String,
}

impl Cluster {
    async fn start() -> Cluster {
        match std::env::var_os(KUBECONFIG_ENV).filter(|v| !v.is_empty()) {
            None => {
                let fake = KubeApi::start();
                fake.add_namespace("nova-drain");
                Cluster {
                    config: fake.kube_config(),
                    fake: Some(fake),
                    namespace: "nova-drain".into(),
                }
            }
            Some(path) => {
                let file = kube::config::Kubeconfig::read_from(path).expect("read the kubeconfig");
                let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
                    .await
                    .expect("load the kubeconfig");
                let namespace = format!("nova-drain-coordination-{:x}", rand_suffix());
                let namespaces: Api<Namespace> = Api::all(Client::try_from(config.clone()).expect("client"));
                let object: Namespace =
                    serde_json::from_value(json!({"metadata": {"name": namespace}})).expect("a namespace");
                namespaces
                    .create(&PostParams::default(), &object)
                    .await
                    .expect("create the test namespace");
                Cluster {
                    fake: None,
                    config,
                    namespace,
                }
            }
        }
    }

    fn client(&self) -> Client {
        Client::try_from(self.config.clone()).expect("kube client")
    }

    /// Where the API server listens.
    fn address(&self) -> SocketAddr {
        let url = &self.config.cluster_url;
        let host = url.host().expect("the server's host");
        let port = url
            .port_u16()
            .unwrap_or(if url.scheme_str() == Some("https") { 443 } else { 80 });
        (host, port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .expect("resolve the API server")
    }

    /// A client whose way to the API server goes through `proxy`.
    fn client_through(&self, proxy: &Proxy) -> Client {
        let mut config = self.config.clone();
        let url = &config.cluster_url;
        let scheme = url.scheme_str().unwrap_or("https").to_string();
        config.tls_server_name = config
            .tls_server_name
            .clone()
            .or_else(|| url.host().map(str::to_string));
        config.cluster_url = format!("{scheme}://{}", proxy.addr()).parse().expect("proxy url");
        Client::try_from(config).expect("kube client")
    }

    async fn finish(self) {
        if self.fake.is_none() {
            let namespaces: Api<Namespace> = Api::all(self.client());
            let _ = namespaces.delete(&self.namespace, &DeleteParams::default()).await;
        }
    }
}

fn rand_suffix() -> u32 {
    use std::hash::BuildHasher;
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::collections::hash_map::RandomState::new().hash_one((std::process::id(), n, std::time::Instant::now())) as u32
}

/// The simulated agents and what each was told, in order.
struct Agents {
    wants: Vec<watch::Sender<Option<Want>>>,
    /// Each agent's availability zone.
    zones: Vec<Option<String>>,
    told: Vec<watch::Receiver<Standing>>,
    tasks: Vec<JoinHandle<()>>,
    /// Every change of standing, by agent; the test records an agent's end
    /// of a run as `Idle` when it lets the slot go (its run is over then).
    timeline: Arc<Mutex<Vec<(Instant, usize, Standing)>>>,
}

impl Agents {
    fn new() -> Agents {
        Agents {
            wants: Vec::new(),
            zones: Vec::new(),
            told: Vec::new(),
            tasks: Vec::new(),
            timeline: Arc::default(),
        }
    }

    /// An agent of node `name`, talking to the API server through `client`.
    fn add(&mut self, client: Client, namespace: &str, name: &str, settings: CoordinationSettings) -> usize {
        let index = self.wants.len();
        let leases = CoordinationLeases::new(client, namespace, name, &format!("nova-{name}"), settings.lease);
        let (want, asked) = watch::channel(None);
        let (standing, told) = watch::channel(Standing::Idle);
        self.tasks
            .push(tokio::spawn(coordinator::run(leases, settings, asked, standing)));
        let timeline = self.timeline.clone();
        let mut watching = told.clone();
        tokio::spawn(async move {
            while watching.changed().await.is_ok() {
                let standing = watching.borrow_and_update().clone();
                timeline
                    .lock()
                    .expect("timeline")
                    .push((Instant::now(), index, standing));
            }
        });
        self.wants.push(want);
        self.told.push(told);
        self.zones.push(None);
        index
    }

    /// [`Agents::add`], its hypervisor in availability zone `zone`.
    fn add_in(
        &mut self,
        client: Client,
        namespace: &str,
        name: &str,
        settings: CoordinationSettings,
        zone: &str,
    ) -> usize {
        let index = self.add(client, namespace, name, settings);
        self.zones[index] = Some(zone.to_string());
        index
    }

    fn want(&self, agent: usize) {
        self.wants[agent].send_replace(Some(Want {
            since: jiff::Timestamp::now(),
            zone: self.zones[agent].clone(),
        }));
    }

    /// The agent's run is over: it lets its slot go.
    fn done(&self, agent: usize) {
        self.timeline
            .lock()
            .expect("timeline")
            .push((Instant::now(), agent, Standing::Idle));
        self.wants[agent].send_replace(None);
    }

    /// SIGKILL: the agent stops without letting anything go.
    fn kill(&self, agent: usize) {
        self.tasks[agent].abort();
        self.timeline
            .lock()
            .expect("timeline")
            .push((Instant::now(), agent, Standing::Idle));
    }

    fn standing(&self, agent: usize) -> Standing {
        self.told[agent].borrow().clone()
    }

    fn holds(&self, agent: usize) -> bool {
        matches!(self.standing(agent), Standing::Holding { .. })
    }

    /// The most agents holding a slot at one moment, replaying the timeline.
    fn most_holding_at_once(&self) -> usize {
        let mut timeline = self.timeline.lock().expect("timeline").clone();
        timeline.sort_by_key(|(at, _, _)| *at);
        let mut now = vec![false; self.wants.len()];
        let mut most = 0;
        for (_, agent, standing) in timeline {
            now[agent] = matches!(standing, Standing::Holding { .. });
            most = most.max(now.iter().filter(|h| **h).count());
        }
        most
    }

    /// Every set of agents holding slots at one moment, replaying the timeline.
    fn holding_together(&self) -> Vec<Vec<usize>> {
        let mut timeline = self.timeline.lock().expect("timeline").clone();
        timeline.sort_by_key(|(at, _, _)| *at);
        let mut now = vec![false; self.wants.len()];
        timeline
            .into_iter()
            .map(|(_, agent, standing)| {
                now[agent] = matches!(standing, Standing::Holding { .. });
                (0..now.len()).filter(|a| now[*a]).collect()
            })
            .collect()
    }

    /// When each agent first held a slot.
    fn first_held(&self, agent: usize) -> Option<Instant> {
        self.timeline
            .lock()
            .expect("timeline")
            .iter()
            .find(|(_, a, s)| *a == agent && matches!(s, Standing::Holding { .. }))
            .map(|(at, _, _)| *at)
    }

    /// Plays the agents' runs: each that holds a slot lets it go after
    /// `runs_for`, until `agents` have all run; returns, per agent, when it
    /// took its slot and when it let it go.
    async fn serve(&self, agents: &[usize], runs_for: Duration, limit: Duration) -> Vec<(Instant, Instant)> {
        let deadline = Instant::now() + limit;
        let mut runs: Vec<Option<(Instant, Option<Instant>)>> = vec![None; self.wants.len()];
        while agents.iter().any(|a| !matches!(runs[*a], Some((_, Some(_))))) {
            assert!(
                Instant::now() < deadline,
                "not every agent ran within {limit:?}: {runs:?}"
            );
            for &agent in agents {
                match runs[agent] {
                    None if self.holds(agent) => runs[agent] = Some((Instant::now(), None)),
                    Some((took, None)) if took.elapsed() >= runs_for => {
                        self.done(agent);
                        runs[agent] = Some((took, Some(Instant::now())));
                    }
                    _ => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        agents
            .iter()
            .map(|a| match runs[*a] {
                Some((took, Some(left))) => (took, left),
                _ => unreachable!("every agent ran"),
            })
            .collect()
    }
}

async fn until(what: &str, limit: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "never within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn with_one_slot_nodes_cordoned_within_a_second_evacuate_one_after_another_in_cordon_order() {
    let cluster = Cluster::start().await;
    let mut agents = Agents::new();
    let nodes: Vec<usize> = ["node-c", "node-a", "node-b"]
        .iter()
        .map(|name| agents.add(cluster.client(), &cluster.namespace, name, settings(1)))
        .collect();
    // Cordoned 300 ms apart, in the order c, a, b (not the names' order).
    for &node in &nodes {
        agents.want(node);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    until("the last one in line knows its place", Duration::from_secs(10), || {
        agents.standing(nodes[2])
            == Standing::Waiting {
                position: 2,
                waiting: 2,
            }
    })
    .await;
    let runs = agents
        .serve(&nodes, Duration::from_millis(600), Duration::from_secs(60))
        .await;
    assert_eq!(agents.most_holding_at_once(), 1, "never two at once");
    assert!(
        runs[0].1 <= runs[1].0 && runs[1].1 <= runs[2].0,
        "in cordon order: {runs:?}"
    );
    let handovers: Vec<f64> = runs
        .windows(2)
        .map(|w| w[1].0.duration_since(w[0].1).as_secs_f64())
        .collect();
    eprintln!("from one run's end to the next one's slot: {handovers:?} s");
    cluster.finish().await;
}

#[tokio::test]
async fn with_two_slots_never_more_than_two_nodes_evacuate_at_once() {
    let cluster = Cluster::start().await;
    let mut agents = Agents::new();
    let nodes: Vec<usize> = (0..5)
        .map(|i| agents.add(cluster.client(), &cluster.namespace, &format!("node-{i}"), settings(2)))
        .collect();
    for &node in &nodes {
        agents.want(node);
    }
    let runs = agents
        .serve(&nodes, Duration::from_millis(700), Duration::from_secs(60))
        .await;
    assert_eq!(agents.most_holding_at_once(), 2, "two at once, never three: {runs:?}");
    let shares: Vec<u32> = nodes
        .iter()
        .filter_map(|n| {
            agents
                .timeline
                .lock()
                .expect("timeline")
                .iter()
                .find_map(|(_, a, s)| match s {
                    Standing::Holding { share, .. } if a == n => Some(*share),
                    _ => None,
                })
        })
        .collect();
    assert!(
        shares.iter().all(|s| *s == 2 || *s == 3),
        "5 migrations split 3 + 2: {shares:?}"
    );
    // Two at once know each other's Nova host (what is still there is spoken for).
    let beside = agents
        .timeline
        .lock()
        .expect("timeline")
        .iter()
        .any(|(_, a, s)| match s {
            Standing::Holding { beside, .. } => beside.len() == 1 && beside[0] != format!("nova-node-{a}"),
            _ => false,
        });
    assert!(beside, "a holder is told the host evacuated beside it");
    cluster.finish().await;
}

#[tokio::test]
async fn a_killed_holder_is_replaced_after_the_lease_time_and_a_killed_waiter_loses_its_place() {
    let cluster = Cluster::start().await;
    let mut agents = Agents::new();
    let [holder, dead_waiter, waiter] =
        ["node-a", "node-b", "node-c"].map(|name| agents.add(cluster.client(), &cluster.namespace, name, settings(1)));
    agents.want(holder);
    until("the first holds", Duration::from_secs(10), || agents.holds(holder)).await;
    agents.want(dead_waiter);
    tokio::time::sleep(Duration::from_millis(200)).await;
    agents.want(waiter);
    until("both wait", Duration::from_secs(10), || {
        agents.standing(waiter)
            == Standing::Waiting {
                position: 2,
                waiting: 2,
            }
    })
    .await;
    agents.kill(dead_waiter);
    let killed = Instant::now();
    agents.kill(holder);
    until("the live waiter takes the slot", Duration::from_secs(20), || {
        agents.holds(waiter)
    })
    .await;
    let took = agents.first_held(waiter).expect("held");
    let after = took.duration_since(killed);
    eprintln!(
        "the slot of a killed holder was taken {:.1} s later (lease {LEASE:?})",
        after.as_secs_f64()
    );
    // Its last renewal came at most a third of the lease before the kill.
    assert!(
        after >= LEASE * 2 / 3 - Duration::from_millis(100),
        "taken before it expired: {after:?}"
    );
    assert!(after <= LEASE * 3, "taken once expired: {after:?}");
    assert_eq!(agents.most_holding_at_once(), 1);
    cluster.finish().await;
}

#[tokio::test]
async fn a_holder_cut_off_from_the_api_server_stops_before_another_can_take_its_slot() {
    let cluster = Cluster::start().await;
    let proxy = Proxy::start(cluster.address()).await;
    let mut agents = Agents::new();
    let cut_off = agents.add(
        cluster.client_through(&proxy),
        &cluster.namespace,
        "node-a",
        settings(1),
    );
    let other = agents.add(cluster.client(), &cluster.namespace, "node-b", settings(1));
    agents.want(cut_off);
    until("the first holds", Duration::from_secs(10), || agents.holds(cut_off)).await;
    agents.want(other);
    until("the other waits", Duration::from_secs(10), || {
        agents.standing(other)
            == Standing::Waiting {
                position: 1,
                waiting: 1,
            }
    })
    .await;
    // Let a renewal or two go through, then cut it off.
    tokio::time::sleep(LEASE / 2).await;
    proxy.cut(true);
    let cut = Instant::now();
    until("the holder stops counting on its slot", LEASE, || {
        matches!(agents.standing(cut_off), Standing::Unsure { .. })
    })
    .await;
    let unsure = cut.elapsed();
    until("the other takes the slot", LEASE * 3, || agents.holds(other)).await;
    let taken = agents.first_held(other).expect("held").duration_since(cut);
    eprintln!(
        "cut off: unsure after {:.2} s, the slot taken by another after {:.2} s (lease {LEASE:?})",
        unsure.as_secs_f64(),
        taken.as_secs_f64()
    );
    // Unsure half a lease after its last renewal (at most a third of a
    // lease before the cut), within one request's time-out.
    assert!(unsure < LEASE, "unsure before its lease could expire: {unsure:?}");
    assert!(taken > unsure, "two holders at once");
    assert_eq!(agents.most_holding_at_once(), 1);
    // Mended: the cut-off agent learns the slot is gone and queues behind.
    proxy.cut(false);
    until("the cut-off one waits again", LEASE * 3, || {
        agents.standing(cut_off)
            == Standing::Waiting {
                position: 1,
                waiting: 1,
            }
    })
    .await;
    assert_eq!(agents.most_holding_at_once(), 1);
    cluster.finish().await;
}

/// What the API server was asked in a window, per kind of request.
#[derive(Debug, Default)]
struct Asked {
    lease_writes: usize,
    lease_reads: usize,
    watches: usize,
    other: usize,
}

impl Asked {
    fn of(requests: &[(String, String)]) -> Asked {
        let mut asked = Asked::default();
        for (method, path) in requests {
            let lease = path.contains("/leases");
            match method.as_str() {
                "POST" | "PUT" | "PATCH" | "DELETE" if lease => asked.lease_writes += 1,
                "GET" if path.contains("watch=true") || path.contains("watch=1") => asked.watches += 1,
                "GET" if lease => asked.lease_reads += 1,
                _ => asked.other += 1,
            }
        }
        asked
    }

    fn total(&self) -> usize {
        self.lease_writes + self.lease_reads + self.watches + self.other
    }
}

/// A hundred agents against one API server, each with the watches an agent
/// keeps (its Node, its guard pod, its Evacuations) and its coordinator:
/// idle, then ten nodes cordoned at once taking the one slot in turn. What
/// the server is asked, per agent and per lease period, must not grow with
/// the number of agents. Prints the figures BENCHMARKS.md quotes.
#[tokio::test]
async fn a_hundred_agents_cost_the_api_server_what_one_costs_each() {
    const AGENTS: usize = 100;
    const CORDONED: usize = 10;
    let fake = KubeApi::start();
    fake.add_namespace("nova-drain");
    let crd =
        serde_json::to_value(<nova_kubernetes_drain::kube::evacuation::Evacuation as kube::CustomResourceExt>::crd())
            .expect("the CRD");
    fake.add_crd(crd).expect("install the CRD");
    let settings = CoordinationSettings {
        limits: Limits {
            slots: 1,
            migrations: 5,
            zones: ZoneRule::Any,
        },
        lease: Duration::from_secs(6),
    };
    let periods = |window: Duration| window.as_secs_f64() / settings.lease.as_secs_f64();
    let mut agents = Agents::new();
    let mut watches = Vec::new();
    for i in 0..AGENTS {
        let node = format!("node-{i:03}");
        fake.add_node(&node);
        // Each agent has a client of its own, as each process does.
        let client = fake.kube_client();
        agents.add(client.clone(), "nova-drain", &node, settings);
        let drain = |stream: futures::stream::BoxStream<'static, _>| tokio::spawn(stream.for_each(|_| async {}));
        use futures::StreamExt;
        watches.push(drain(
            nova_kubernetes_drain::kube::watch_node(client.clone(), &node)
                .map(drop)
                .boxed(),
        ));
        watches.push(drain(
            nova_kubernetes_drain::kube::watch_guard(client.clone(), "nova-drain", &format!("nova-drain-guard-{node}"))
                .map(drop)
                .boxed(),
        ));
        watches.push(drain(
            nova_kubernetes_drain::kube::evacuation::watch_evacuations(client, &node)
                .map(drop)
                .boxed(),
        ));
    }
    until("every agent watching", Duration::from_secs(30), || {
        fake.open_watches() >= 3 * AGENTS
    })
    .await;

    // Idle.
    let idle_window = settings.lease * 2;
    let before = fake.requests().len();
    tokio::time::sleep(idle_window).await;
    let idle = Asked::of(&fake.requests()[before..]);
    let idle_watches = fake.open_watches();
    eprintln!(
        "idle, {AGENTS} agents, {:.0} s: {} requests ({idle:?}), {idle_watches} watches open ({:.1} per agent)",
        idle_window.as_secs_f64(),
        idle.total(),
        idle_watches as f64 / AGENTS as f64
    );
    assert_eq!(
        idle.lease_writes + idle.lease_reads,
        0,
        "an idle agent touches no Lease"
    );

    // Ten cordoned at once, served one after another (each "evacuates" 2 s).
    let before = fake.requests().len();
    let started = Instant::now();
    let cordoned: Vec<usize> = (0..CORDONED).collect();
    for &agent in &cordoned {
        agents.want(agent);
    }
    until("the ten in the queue", Duration::from_secs(10), || {
        cordoned.iter().all(|a| agents.standing(*a) != Standing::Idle)
    })
    .await;
    let peak_watches = fake.open_watches();
    let runs = agents
        .serve(&cordoned, Duration::from_secs(2), Duration::from_secs(120))
        .await;
    let window = started.elapsed();
    let busy = Asked::of(&fake.requests()[before..]);
    let handovers: Vec<f64> = runs
        .windows(2)
        .map(|w| w[1].0.duration_since(w[0].1).as_secs_f64())
        .collect();
    let per_agent_period = busy.lease_writes as f64 / CORDONED as f64 / periods(window);
    eprintln!(
        "{CORDONED} of {AGENTS} cordoned at once, {:.1} s ({:.1} lease periods of {:?}): {} requests ({busy:?}), \
         {:.2} Lease writes per cordoned agent per lease period, 0 by the {} others; {peak_watches} watches open \
         at most ({} for coordination); slot handovers {:.3}..{:.3} s",
        window.as_secs_f64(),
        periods(window),
        settings.lease,
        busy.total(),
        per_agent_period,
        AGENTS - CORDONED,
        peak_watches - idle_watches,
        handovers.iter().cloned().fold(f64::INFINITY, f64::min),
        handovers.iter().cloned().fold(0.0, f64::max),
    );
    assert_eq!(agents.most_holding_at_once(), 1);
    // Each waiting or holding agent: its ticket or slot renewed three times a
    // period, plus a take, a release and a dequeue once: O(1), whatever the
    // number of agents.
    assert!(
        per_agent_period <= 6.0,
        "{per_agent_period:.2} Lease writes per agent per period"
    );
    assert!(
        peak_watches - idle_watches <= CORDONED,
        "one coordination watch per active agent"
    );
    for task in watches {
        task.abort();
    }
}

#[tokio::test]
async fn under_a_zone_rule_the_hypervisors_evacuating_together_share_a_zone_or_never_do() {
    for (rule, agents_per_zone) in [(ZoneRule::Same, 3), (ZoneRule::Different, 2)] {
        let cluster = Cluster::start().await;
        let mut agents = Agents::new();
        let settings = CoordinationSettings {
            limits: Limits {
                slots: 2,
                migrations: 4,
                zones: rule,
            },
            lease: LEASE,
        };
        // Zones interleaved in the queue: az1, az2, az1, az2...
        let nodes: Vec<usize> = (0..2 * agents_per_zone)
            .map(|i| {
                let zone = if i % 2 == 0 { "az1" } else { "az2" };
                agents.add_in(
                    cluster.client(),
                    &cluster.namespace,
                    &format!("node-{i}"),
                    settings,
                    zone,
                )
            })
            .collect();
        for &node in &nodes {
            agents.want(node);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        agents
            .serve(&nodes, Duration::from_millis(600), Duration::from_secs(60))
            .await;
        let together = agents.holding_together();
        let zone = |a: usize| agents.zones[a].clone();
        for holders in &together {
            match rule {
                ZoneRule::Same => assert!(
                    holders.iter().all(|a| zone(*a) == zone(holders[0])),
                    "{rule:?}: {holders:?} evacuate together across zones"
                ),
                _ => assert!(
                    holders.len() < 2 || zone(holders[0]) != zone(holders[1]),
                    "{rule:?}: {holders:?} evacuate together in one zone"
                ),
            }
        }
        assert_eq!(
            together.iter().map(Vec::len).max(),
            Some(2),
            "{rule:?}: two at once where the rule allows it"
        );
        cluster.finish().await;
    }
}

/// Memory relief's Leases, as agents use them: the cluster's relief
/// migrations are taken by one agent at a time (a second finds them all in
/// use until the first lets go), and a node whose memory is low is known to
/// the others until it says otherwise (or stops renewing).
#[tokio::test]
async fn relief_migrations_go_to_one_agent_at_a_time_and_low_memory_is_told_to_the_others() {
    use nova_kubernetes_drain::kube::relief::MemoryLeases;
    let cluster = Cluster::start().await;
    let agent = |node: &str, host: &str| MemoryLeases::new(cluster.client(), &cluster.namespace, node, host, LEASE);
    let (one, other) = (agent("node-1", "host1"), agent("node-2", "host2"));
    let held = one.take_relief(1).await.expect("asked").expect("free");
    assert!(
        other.take_relief(1).await.expect("asked").is_none(),
        "one relief migration, held"
    );
    let held = one.renew(&held).await.expect("renewed");
    let second = other
        .take_relief(2)
        .await
        .expect("asked")
        .expect("a second one with two");
    other.release(&second).await.expect("released");
    one.release(&held).await.expect("released");
    let taken = other
        .take_relief(1)
        .await
        .expect("asked")
        .expect("free again once let go");
    assert_eq!(taken.spec.and_then(|s| s.holder_identity).as_deref(), Some("node-2"));

    one.tell_low(true).await.expect("told");
    assert_eq!(other.low_hosts().await.expect("listed"), ["host1"]);
    one.tell_low(true).await.expect("renewed");
    one.tell_low(false).await.expect("taken back");
    assert!(other.low_hosts().await.expect("listed").is_empty());
    // An agent that stops renewing is no longer taken for short of memory.
    one.tell_low(true).await.expect("told");
    let told = Instant::now();
    loop {
        if other.low_hosts().await.expect("listed").is_empty() {
            break;
        }
        assert!(told.elapsed() < 2 * LEASE, "never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        told.elapsed() >= LEASE - Duration::from_millis(200),
        "expired early: {:?}",
        told.elapsed()
    );
}
