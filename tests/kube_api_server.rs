//! Self-test of the fake Kubernetes API server of `tests/support/kube_api.rs`,
//! driven by kube 5 itself (watcher, Api, Recorder) and by raw HTTP.

mod support;

use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Resource;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, EvictParams, GroupVersionKind, ListParams, Patch, PatchParams,
    PostParams,
};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, Event as WEvent};
use serde_json::{Value, json};
use support::kube_api::KubeApi;
use support::kubectl::Kubectl;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

fn pod_json(name: &str, node: &str, app: &str, owned: bool) -> Pod {
    let mut p = json!({
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox:1"}]}
    });
    if owned {
        p["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-rs"),
            "uid": "0f0f0f0f-0000-4000-8000-000000000001", "controller": true
        }]);
    }
    serde_json::from_value(p).unwrap()
}

fn pdb_json(name: &str, app: &str, spec_extra: Value) -> PodDisruptionBudget {
    let mut spec = json!({"selector": {"matchLabels": {"app": app}}});
    spec.as_object_mut()
        .unwrap()
        .extend(spec_extra.as_object().unwrap().clone());
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`wait_for`] for what takes kubectl's 5 s retry interval or more.
async fn wait_for_long(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pod_running(api: &KubeApi, ns: &str, name: &str) -> bool {
    api.pod(ns, name)
        .and_then(|p| p.status)
        .and_then(|s| s.phase)
        .is_some_and(|p| p == "Running")
}

fn pdb_computed(api: &KubeApi, ns: &str, name: &str) -> bool {
    api.pdbs(ns).iter().any(|p| {
        p.metadata.name.as_deref() == Some(name)
            && p.status
                .as_ref()
                .is_some_and(|s| s.observed_generation == p.metadata.generation)
    })
}

type Events = mpsc::UnboundedReceiver<Result<WEvent<Node>, watcher::Error>>;

/// Polls a kube watcher in the background (it only makes requests while
/// polled) and forwards what it yields.
fn spawn_watcher<S>(mut s: S) -> Events
where
    S: Stream<Item = Result<WEvent<Node>, watcher::Error>> + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(ev) = s.next().await {
            if tx.send(ev).is_err() {
                break;
            }
        }
    });
    rx
}

/// Next watcher event that is not an error, with a timeout.
async fn next_event(s: &mut Events) -> WEvent<Node> {
    loop {
        match tokio::time::timeout(WAIT, s.recv())
            .await
            .expect("watcher event in time")
        {
            Some(Ok(ev)) => return ev,
            Some(Err(_)) => continue,
            None => panic!("watcher stream ended"),
        }
    }
}

async fn next_apply(s: &mut Events) -> Node {
    loop {
        if let WEvent::Apply(n) | WEvent::InitApply(n) = next_event(s).await {
            return n;
        }
    }
}

async fn until_init_done(s: &mut Events) -> Vec<Node> {
    let mut seen = vec![];
    loop {
        match next_event(s).await {
            WEvent::Init => seen.clear(),
            WEvent::InitApply(n) => seen.push(n),
            WEvent::InitDone => return seen,
            other => panic!("unexpected event before InitDone: {other:?}"),
        }
    }
}

#[tokio::test]
async fn watcher_sees_own_node_only() {
    let api = KubeApi::start();
    api.add_node("n1");
    api.add_node("n2");
    let nodes: Api<Node> = Api::all(api.kube_client());
    let cfg = watcher::Config::default().fields("metadata.name=n1");
    let mut s = spawn_watcher(watcher::watcher(nodes, cfg).boxed());

    let init = until_init_done(&mut s).await;
    assert_eq!(init.len(), 1);
    assert_eq!(init[0].metadata.name.as_deref(), Some("n1"));
    // Wait for the watch request itself.
    wait_for("watch request", || api.open_watches() == 1).await;
    let reqs = api.requests();
    let list = reqs
        .iter()
        .find(|(m, p)| m == "GET" && p.starts_with("/api/v1/nodes?") && !p.contains("watch=true"))
        .unwrap();
    assert!(list.1.contains("fieldSelector=metadata.name%3Dn1"), "{list:?}");
    // kube 5's default ListSemantic is MostRecent: a consistent list, no RV.
    assert!(!list.1.contains("resourceVersion"), "{list:?}");
    assert!(list.1.contains("limit=500"), "{list:?}");
    let watch = reqs.iter().find(|(_, p)| p.contains("watch=true")).unwrap();
    assert!(
        watch.1.contains("allowWatchBookmarks=true") && watch.1.contains("timeoutSeconds=290"),
        "{watch:?}"
    );
    assert!(!watch.1.contains("sendInitialEvents"), "{watch:?}");

    // Other nodes changing: nothing reaches this watch.
    api.set_unschedulable("n2", true);
    api.add_node("n3");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(api.watch_events_sent(), 0);

    api.set_unschedulable("n1", true);
    let n = next_apply(&mut s).await;
    assert_eq!(n.metadata.name.as_deref(), Some("n1"));
    assert_eq!(n.spec.unwrap().unschedulable, Some(true));
    assert_eq!(api.watch_events_sent(), 1);
    // Resource versions are a global, increasing counter.
    let rv: u64 = n.metadata.resource_version.unwrap().parse().unwrap();
    assert_eq!(rv, api.resource_version());

    api.set_unschedulable("n1", false);
    let n = next_apply(&mut s).await;
    assert_eq!(n.spec.unwrap().unschedulable, None);
}

#[tokio::test]
async fn watcher_recovers_from_dropped_and_compacted_watches() {
    let api = KubeApi::start();
    api.add_node("n1");
    let nodes: Api<Node> = Api::all(api.kube_client());
    let cfg = watcher::Config::default().fields("metadata.name=n1");
    let mut s = spawn_watcher(watcher::watcher(nodes, cfg).default_backoff().boxed());
    until_init_done(&mut s).await;
    wait_for("watch", || api.open_watches() == 1).await;

    // Dropped connection: the watcher re-watches from its resourceVersion
    // and gets the change made while it was away.
    api.drop_watches();
    api.set_unschedulable("n1", true);
    let n = next_apply(&mut s).await;
    assert_eq!(n.spec.unwrap().unschedulable, Some(true));

    // Compacted history: the re-watch gets 410 in-stream, the watcher
    // re-lists and sees the latest state.
    wait_for("watch", || api.open_watches() == 1).await;
    api.drop_watches();
    api.set_unschedulable("n1", false);
    api.compact();
    let lists_before = api
        .requests()
        .iter()
        .filter(|(_, p)| p.starts_with("/api/v1/nodes?") && !p.contains("watch="))
        .count();
    let init = until_init_done(&mut s).await;
    assert_eq!(init.len(), 1);
    assert_eq!(init[0].spec.as_ref().unwrap().unschedulable, None);
    let lists_after = api
        .requests()
        .iter()
        .filter(|(_, p)| p.starts_with("/api/v1/nodes?") && !p.contains("watch="))
        .count();
    assert_eq!(lists_after, lists_before + 1, "re-listed after 410");

    // And it keeps watching afterwards.
    api.set_unschedulable("n1", true);
    let n = next_apply(&mut s).await;
    assert_eq!(n.spec.unwrap().unschedulable, Some(true));
}

#[tokio::test]
async fn raw_watch_protocol() {
    let api = KubeApi::start();
    api.add_node("n1");
    api.set_bookmark_interval(Duration::from_millis(200));
    let http = reqwest::Client::new();
    let list: Value = http
        .get(format!("{}/api/v1/nodes", api.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["kind"], "NodeList");
    assert_eq!(list["apiVersion"], "v1");
    let rv = list["metadata"]["resourceVersion"].as_str().unwrap().to_string();

    // A node that stops matching the label selector is a DELETED event.
    let url = format!(
        "{}/api/v1/nodes?watch=true&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=1&labelSelector=role%3Dcompute",
        api.url()
    );
    let resp = http.get(url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let nodes: Api<Node> = Api::all(api.kube_client());
    let pp = PatchParams::default();
    nodes
        .patch(
            "n1",
            &pp,
            &Patch::Merge(json!({"metadata": {"labels": {"role": "compute"}}})),
        )
        .await
        .unwrap();
    nodes
        .patch(
            "n1",
            &pp,
            &Patch::Merge(json!({"metadata": {"labels": {"role": null}}})),
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let text = resp.text().await.unwrap(); // stream closes after timeoutSeconds
    assert!(started.elapsed() < Duration::from_secs(3));
    let events: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .filter(|t| *t != "BOOKMARK")
        .collect();
    assert_eq!(types, ["ADDED", "DELETED"], "{text}");
    let bookmark = events.iter().find(|e| e["type"] == "BOOKMARK").expect("a bookmark");
    assert_eq!(bookmark["object"]["kind"], "Node");
    assert!(bookmark["object"]["metadata"]["resourceVersion"].is_string());

    // Watch from a compacted resourceVersion: 200 + in-stream 410 ERROR.
    api.compact();
    let url = format!("{}/api/v1/nodes?watch=true&resourceVersion={rv}", api.url());
    let text = http.get(url).send().await.unwrap().text().await.unwrap();
    let ev: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(ev["type"], "ERROR");
    assert_eq!(ev["object"]["code"], 410);
    assert_eq!(ev["object"]["reason"], "Expired");
    assert!(
        ev["object"]["message"]
            .as_str()
            .unwrap()
            .starts_with("too old resource version")
    );

    // Stale update: 409 Conflict; unknown path: 404 Status.
    let mut n = nodes.get("n1").await.unwrap();
    n.metadata.resource_version = Some("2".into());
    let err = nodes.replace("n1", &PostParams::default(), &n).await.unwrap_err();
    let kube::Error::Api(s) = err else { panic!("{err:?}") };
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
    let r = http.get(format!("{}/api/v1/widgets", api.url())).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["kind"].as_str(), v["status"].as_str()),
        (Some("Status"), Some("Failure"))
    );

    // Server-side apply with a JSON body, and an unsupported field selector.
    let ssa = PatchParams::apply("drainer").force();
    let applied = nodes
        .patch(
            "n1",
            &ssa,
            &Patch::Apply(
                json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "annotations": {"a": "b"}}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(applied.metadata.annotations.unwrap()["a"], "b");
    let err = nodes
        .list(&ListParams::default().fields("spec.foo=x"))
        .await
        .unwrap_err();
    let kube::Error::Api(s) = err else { panic!("{err:?}") };
    assert_eq!(s.code, 400);
}

#[tokio::test]
async fn eviction_honours_pdb() {
    let api = KubeApi::start();
    api.add_node("n1");
    // kube 5 retries 429s by default (up to 15 times): turn that off.
    let client = api.kube_client_no_retry();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client, "default");
    pods.create(&PostParams::default(), &pod_json("guard", "n1", "guard", false))
        .await
        .unwrap();
    pdbs.create(
        &PostParams::default(),
        &pdb_json("guard", "guard", json!({"maxUnavailable": 0})),
    )
    .await
    .unwrap();
    wait_for("guard running", || pod_running(&api, "default", "guard")).await;
    wait_for("pdb status", || pdb_computed(&api, "default", "guard")).await;

    let err = pods.evict("guard", &EvictParams::default()).await.unwrap_err();
    let kube::Error::Api(s) = err else { panic!("{err:?}") };
    assert_eq!(s.code, 429);
    assert_eq!(s.reason, "TooManyRequests");
    assert_eq!(
        s.message,
        "Cannot evict pod as it would violate the pod's disruption budget."
    );
    let cause = &s.details.as_ref().unwrap().causes[0];
    assert_eq!(cause.reason, "DisruptionBudget");
    assert_eq!(
        cause.message,
        "The disruption budget guard needs 0 healthy pods and has 1 currently"
    );

    // More than one PDB: 500.
    pdbs.create(
        &PostParams::default(),
        &pdb_json("other", "guard", json!({"minAvailable": 0})),
    )
    .await
    .unwrap();
    let err = pods.evict("guard", &EvictParams::default()).await.unwrap_err();
    let kube::Error::Api(s) = err else { panic!("{err:?}") };
    assert_eq!(s.code, 500);
    pdbs.delete("other", &DeleteParams::default()).await.unwrap();

    pdbs.delete("guard", &DeleteParams::default()).await.unwrap();
    let st = pods.evict("guard", &EvictParams::default()).await.unwrap();
    assert!(st.is_success());
    // Graceful deletion: terminating, then removed by the kubelet.
    let p = pods.get("guard").await.unwrap();
    assert!(p.metadata.deletion_timestamp.is_some());
    assert!(
        p.status
            .unwrap()
            .conditions
            .unwrap()
            .iter()
            .any(|c| c.type_ == "DisruptionTarget")
    );
    wait_for("pod gone", || api.pod("default", "guard").is_none()).await;
    let err = pods.evict("guard", &EvictParams::default()).await.unwrap_err();
    let kube::Error::Api(s) = err else { panic!("{err:?}") };
    assert_eq!(s.code, 404);
}

#[tokio::test]
async fn eviction_of_running_pod_with_budget_decrements_it() {
    let api = KubeApi::start();
    api.add_node("n1");
    let client = api.kube_client_no_retry();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client, "default");
    for i in 0..3 {
        pods.create(
            &PostParams::default(),
            &pod_json(&format!("web-{i}"), "n1", "web", true),
        )
        .await
        .unwrap();
    }
    pdbs.create(
        &PostParams::default(),
        &pdb_json("web", "web", json!({"minAvailable": 2})),
    )
    .await
    .unwrap();
    wait_for("pods running", || {
        (0..3).all(|i| pod_running(&api, "default", &format!("web-{i}")))
    })
    .await;
    wait_for("pdb allows 1", || {
        api.pdbs("default")[0]
            .status
            .as_ref()
            .is_some_and(|s| s.disruptions_allowed == 1)
    })
    .await;
    pods.evict("web-0", &EvictParams::default()).await.unwrap();
    let s = api.pdbs("default")[0].status.clone().unwrap();
    assert_eq!(s.disruptions_allowed, 0);
    assert!(s.disrupted_pods.unwrap().contains_key("web-0"));
    let err = pods.evict("web-1", &EvictParams::default()).await.unwrap_err();
    let kube::Error::Api(s) = err else { panic!("{err:?}") };
    assert_eq!(s.code, 429);
}

#[tokio::test]
async fn eviction_of_pending_pod_ignores_pdb() {
    let api = KubeApi::start();
    api.set_kubelet(false);
    api.add_node("n1");
    let client = api.kube_client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client, "default");
    pods.create(&PostParams::default(), &pod_json("guard", "n1", "guard", false))
        .await
        .unwrap();
    pdbs.create(
        &PostParams::default(),
        &pdb_json("guard", "guard", json!({"maxUnavailable": 0})),
    )
    .await
    .unwrap();
    wait_for("pdb status", || pdb_computed(&api, "default", "guard")).await;
    assert_eq!(
        api.pod("default", "guard").unwrap().status.unwrap().phase.as_deref(),
        Some("Pending")
    );
    pods.evict("guard", &EvictParams::default()).await.unwrap();
    // No kubelet: the pod stays terminating.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let p = api.pod("default", "guard").expect("still there without a kubelet");
    assert!(p.metadata.deletion_timestamp.is_some());
    api.set_kubelet(true);
    wait_for("pod gone", || api.pod("default", "guard").is_none()).await;
}

#[tokio::test]
async fn pdb_without_disruption_controller_is_still_being_processed() {
    let api = KubeApi::start();
    api.add_node("n1");
    api.set_disruption_controller(false);
    let client = api.kube_client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client, "default");
    pods.create(&PostParams::default(), &pod_json("guard", "n1", "guard", false))
        .await
        .unwrap();
    pdbs.create(
        &PostParams::default(),
        &pdb_json("guard", "guard", json!({"minAvailable": 0})),
    )
    .await
    .unwrap();
    wait_for("guard running", || pod_running(&api, "default", "guard")).await;

    let url = format!("{}/api/v1/namespaces/default/pods/guard/eviction", api.url());
    let r = reqwest::Client::new()
        .post(url)
        .json(&json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "guard", "namespace": "default"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "10");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["reason"], "TooManyRequests");
    assert_eq!(v["details"]["causes"][0]["reason"], "DisruptionBudget");
    assert_eq!(
        v["details"]["causes"][0]["message"],
        "The disruption budget guard is still being processed by the server."
    );
    assert!(api.pdbs("default")[0].status.is_none());

    // Once the controller runs, minAvailable 0 allows the eviction.
    api.set_disruption_controller(true);
    wait_for("pdb status", || pdb_computed(&api, "default", "guard")).await;
    pods.evict("guard", &EvictParams::default()).await.unwrap();
}

/// A pod whose controller owner is its Node, like the drainer's guard pod.
fn node_owned_pod(api: &KubeApi, name: &str, node: &str, app: &str) -> Pod {
    let mut pod = pod_json(name, node, app, false);
    pod.metadata.owner_references = Some(vec![
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node", "name": node, "uid": api.node(node).metadata.uid, "controller": true
        }))
        .unwrap(),
    ]);
    pod
}

fn evictions_of(api: &KubeApi, pod: &str) -> usize {
    api.requests()
        .iter()
        .filter(|(m, p)| m == "POST" && p.ends_with(&format!("/{pod}/eviction")))
        .count()
}

#[tokio::test]
async fn kubectl_drain_waits_while_an_integer_min_available_forbids_eviction() {
    let api = KubeApi::start();
    api.add_node("n1");
    api.add_node("n2");
    api.add_namespace("nova");
    let kubectl = Kubectl::new(&api);
    let client = api.kube_client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "nova");
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client, "nova");
    let pp = PostParams::default();
    pods.create(&pp, &node_owned_pod(&api, "guard", "n1", "guard"))
        .await
        .unwrap();
    pods.create(&pp, &pod_json("web", "n1", "web", true)).await.unwrap();
    pods.create(&pp, &pod_json("elsewhere", "n2", "web", true))
        .await
        .unwrap();
    let ds = api.add_daemonset("nova", "agent");
    let mut agent = pod_json("agent-x", "n1", "agent", false);
    agent.metadata.owner_references = Some(vec![serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet", "name": "agent", "uid": ds["metadata"]["uid"], "controller": true
    })).unwrap()]);
    pods.create(&pp, &agent).await.unwrap();
    pdbs.create(&pp, &pdb_json("guard", "guard", json!({"minAvailable": 1})))
        .await
        .unwrap();
    wait_for("pods running", || {
        ["guard", "web", "agent-x"].iter().all(|p| pod_running(&api, "nova", p))
    })
    .await;
    // Integer minAvailable: computed from the selected pods alone, even
    // though their controller (a Node) has no scale subresource.
    wait_for("pdb status", || {
        api.pdbs("nova")[0]
            .status
            .as_ref()
            .is_some_and(|s| s.current_healthy == 1)
    })
    .await;
    let status = api.pdbs("nova")[0].status.clone().unwrap();
    assert_eq!(
        (
            status.expected_pods,
            status.desired_healthy,
            status.current_healthy,
            status.disruptions_allowed
        ),
        (1, 1, 1, 0)
    );
    let condition = &status.conditions.unwrap()[0];
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("False", "InsufficientPods")
    );

    let drain = kubectl.drain("n1", &[], Duration::from_secs(60));
    let unblock = async {
        wait_for("cordon", || api.node("n1").spec.unwrap().unschedulable == Some(true)).await;
        wait_for("web evicted", || api.pod("nova", "web").is_none()).await;
        // kubectl retries a 429 every 5 s: wait for a retry.
        wait_for_long("a retried eviction", || evictions_of(&api, "guard") >= 2).await;
        assert!(api.pod("nova", "guard").is_some(), "the PDB must hold the guard");
        pdbs.delete("guard", &DeleteParams::default()).await.unwrap();
    };
    let (took, ()) = tokio::join!(drain, unblock);
    let took = took.expect("drain succeeds");
    assert!(took >= Duration::from_secs(5), "{took:?}");
    assert!(api.pod("nova", "guard").is_none());
    assert!(api.pod("nova", "agent-x").is_some(), "DaemonSet pods are ignored");
    assert!(api.pod("nova", "elsewhere").is_some());
    assert!(
        api.requests().iter().any(|(m, p)| m == "GET"
            && p.starts_with("/api/v1/pods?")
            && p.contains("fieldSelector=spec.nodeName%3Dn1"))
    );

    // A bare pod refuses the drain (no --force); with --force, a budget
    // that never allows runs into kubectl's --timeout.
    pods.create(&pp, &pod_json("bare", "n2", "bare", false)).await.unwrap();
    let err = kubectl.drain("n2", &[], Duration::from_secs(20)).await.unwrap_err();
    assert!(err.contains("declare no controller"), "{err}");
    pdbs.create(&pp, &pdb_json("web", "web", json!({"minAvailable": 1})))
        .await
        .unwrap();
    wait_for("pdb status", || pdb_computed(&api, "nova", "web")).await;
    let err = kubectl
        .drain("n2", &["--force"], Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(err.contains("global timeout reached"), "{err}");
}

#[tokio::test]
async fn node_events_must_be_in_default_namespace() {
    let api = KubeApi::start();
    let node = api.add_node("n1");
    let client = api.kube_client();
    let mk = |ns: &str| -> K8sEvent {
        serde_json::from_value(json!({
            "metadata": {"name": "n1.1", "namespace": ns},
            "eventTime": "2025-01-01T00:00:00.000000Z",
            "regarding": {"kind": "Node", "apiVersion": "v1", "name": "n1", "uid": node.metadata.uid},
            "reason": "Draining", "action": "Evacuate", "note": "x", "type": "Normal",
            "reportingController": "nova-kubernetes-drain", "reportingInstance": "drainer-n1"
        }))
        .unwrap()
    };
    let events: Api<K8sEvent> = Api::namespaced(client.clone(), "kube-public");
    let err = events
        .create(&PostParams::default(), &mk("kube-public"))
        .await
        .unwrap_err();
    let kube::Error::Api(s) = err else { panic!("{err:?}") };
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"), "{s:?}");
    assert!(s.message.contains("does not match event.namespace"), "{}", s.message);
    let events: Api<K8sEvent> = Api::namespaced(client, "default");
    events.create(&PostParams::default(), &mk("default")).await.unwrap();
    assert_eq!(api.events().len(), 1);
}

#[tokio::test]
async fn recorder_publishes_node_events() {
    let api = KubeApi::start();
    let node = api.add_node("n1");
    let reporter = Reporter {
        controller: "nova-kubernetes-drain".into(),
        instance: Some("drainer-n1".into()),
    };
    let recorder = Recorder::new(api.kube_client(), reporter);
    let ev = Event {
        type_: EventType::Normal,
        reason: "EvacuationStarted".into(),
        note: Some("evacuating 3 servers".into()),
        action: "Evacuate".into(),
        secondary: None,
    };
    let oref = node.object_ref(&());
    recorder.publish(&ev, &oref).await.unwrap();
    recorder.publish(&ev, &oref).await.unwrap(); // series: a merge PATCH
    let events = api.events();
    assert_eq!(events.len(), 2, "{events:#?}");
    assert_eq!(events[0]["metadata"]["namespace"], "default");
    assert_eq!(events[0]["regarding"]["kind"], "Node");
    assert_eq!(events[1]["series"]["count"], 2);
    let reqs = api.requests();
    assert!(
        reqs.iter()
            .any(|(m, p)| m == "POST" && p.starts_with("/apis/events.k8s.io/v1/namespaces/default/events"))
    );
    assert!(
        reqs.iter()
            .any(|(m, p)| m == "PATCH" && p.starts_with("/apis/events.k8s.io/v1/namespaces/default/events/n1."))
    );
}

#[tokio::test]
async fn repeated_node_events_are_counted_in_one_series() {
    use nova_kubernetes_drain::kube::{ObjectEvents, Severity};
    let api = KubeApi::start();
    let node = api.add_node("n1");
    let events = ObjectEvents::for_node(api.kube_client(), &node, "drainer-n1");
    let stuck = "1 server(s) left on n1: vm (id-1): SUSPENDED";
    for _ in 0..3 {
        events
            .publish(Severity::Warning, "EvacuationFailed", "Evacuate", stuck)
            .await
            .unwrap();
    }
    events
        .publish(Severity::Warning, "EvacuationFailed", "Evacuate", "another note")
        .await
        .unwrap();
    let stored: Api<K8sEvent> = Api::namespaced(api.kube_client(), "default");
    let list = stored.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(list.len(), 2, "one Event per distinct note: {list:#?}");
    let repeated = list.iter().find(|e| e.note.as_deref() == Some(stuck)).unwrap();
    assert_eq!(repeated.series.as_ref().map(|s| s.count), Some(3));
    let patches = api
        .requests()
        .iter()
        .filter(|(m, p)| m == "PATCH" && p.starts_with("/apis/events.k8s.io/v1/namespaces/default/events/n1."))
        .count();
    assert_eq!(patches, 2);

    // An Event that expired (or was deleted) is written anew.
    let name = repeated.metadata.name.clone().unwrap();
    stored.delete(&name, &DeleteParams::default()).await.unwrap();
    events
        .publish(Severity::Warning, "EvacuationFailed", "Evacuate", stuck)
        .await
        .unwrap();
    let list = stored.list(&ListParams::default()).await.unwrap().items;
    let anew = list.iter().find(|e| e.note.as_deref() == Some(stuck)).unwrap();
    assert_ne!(anew.metadata.name.as_deref(), Some(name.as_str()));
    assert_eq!(anew.series, None);
}

fn pdb_condition(api: &KubeApi, ns: &str) -> Option<(String, String, String)> {
    let pdb = api.pdbs(ns).into_iter().next()?;
    let c = pdb.status?.conditions?.into_iter().next()?;
    Some((c.status, c.reason, c.message))
}

/// `reason: message` of the Events about PodDisruptionBudgets, as listed over HTTP.
async fn pdb_event_reasons(api: &KubeApi) -> Vec<String> {
    let list: Value = reqwest::get(format!("{}/api/v1/events", api.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["involvedObject"]["kind"] == "PodDisruptionBudget")
        .map(|e| format!("{}: {}", e["reason"].as_str().unwrap(), e["message"].as_str().unwrap()))
        .collect()
}

#[tokio::test]
async fn budgets_over_pods_whose_controller_has_no_scale_fail_safe() {
    let api = KubeApi::start();
    api.add_node("n1");
    let client = api.kube_client_no_retry();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client, "default");
    let pp = PostParams::default();
    pods.create(&pp, &node_owned_pod(&api, "guard", "n1", "guard"))
        .await
        .unwrap();
    pdbs.create(&pp, &pdb_json("guard", "guard", json!({"maxUnavailable": 0})))
        .await
        .unwrap();
    wait_for("guard running", || pod_running(&api, "default", "guard")).await;
    wait_for("sync failure", || pdb_condition(&api, "default").is_some()).await;
    let (status, reason, message) = pdb_condition(&api, "default").unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("False", "SyncFailed"));
    assert_eq!(message, "nodes does not implement the scale subresource");
    let s = api.pdbs("default")[0].status.clone().unwrap();
    assert_eq!((s.expected_pods, s.disruptions_allowed), (0, 0));
    // failSafe never records the generation as observed.
    assert_eq!(s.observed_generation, None);
    let err = pods.evict("guard", &EvictParams::default()).await.unwrap_err();
    let kube::Error::Api(e) = err else { panic!("{err:?}") };
    assert_eq!(e.code, 429);
    // The first sync already recorded its event.
    assert!(pdb_event_reasons(&api).await.contains(
        &"CalculateExpectedPodCountFailed: Failed to calculate the number of expected pods: nodes does not implement the scale subresource".to_string()
    ));

    // A percentage minAvailable needs the controller's scale too.
    pdbs.patch(
        "guard",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"maxUnavailable": null, "minAvailable": "50%"}})),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(pdb_condition(&api, "default").unwrap().1, "SyncFailed");

    // Pods with no controller at all: UnmanagedPods, and never a disruption.
    pods.create(&pp, &pod_json("bare", "n1", "bare", false)).await.unwrap();
    pdbs.create(&pp, &pdb_json("bare", "bare", json!({"maxUnavailable": 1})))
        .await
        .unwrap();
    wait_for("bare running", || pod_running(&api, "default", "bare")).await;
    wait_for("bare pdb status", || pdb_computed(&api, "default", "bare")).await;
    let bare = api
        .pdbs("default")
        .into_iter()
        .find(|p| p.metadata.name.as_deref() == Some("bare"))
        .unwrap();
    let s = bare.status.unwrap();
    assert_eq!((s.expected_pods, s.current_healthy, s.disruptions_allowed), (0, 1, 0));
    assert_eq!(s.conditions.unwrap()[0].reason, "InsufficientPods");
    let events = pdb_event_reasons(&api).await;
    assert!(
        events
            .iter()
            .any(|r| r.starts_with("UnmanagedPods: Pods selected by this PodDisruptionBudget")),
        "{events:?}"
    );
    // Controller events are not what clients wrote.
    assert!(api.events().is_empty());
}

#[tokio::test]
async fn eviction_ignores_budgets_for_pods_not_running_or_terminating() {
    let api = KubeApi::start();
    api.set_kubelet(false);
    api.add_node("n1");
    let client = api.kube_client_no_retry();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client, "default");
    let pp = PostParams::default();
    pdbs.create(&pp, &pdb_json("guard", "guard", json!({"minAvailable": 1})))
        .await
        .unwrap();
    for (name, phase) in [
        ("running", "Running"),
        ("succeeded", "Succeeded"),
        ("failed", "Failed"),
        ("pending", "Pending"),
    ] {
        pods.create(&pp, &node_owned_pod(&api, name, "n1", "guard"))
            .await
            .unwrap();
        api.set_pod_phase("default", name, phase);
    }
    wait_for("pdb status", || {
        api.pdbs("default")[0]
            .status
            .as_ref()
            .is_some_and(|s| s.expected_pods == 4 && s.current_healthy == 1)
    })
    .await;
    let err = pods.evict("running", &EvictParams::default()).await.unwrap_err();
    let kube::Error::Api(e) = err else { panic!("{err:?}") };
    assert_eq!(e.code, 429);
    for name in ["succeeded", "failed", "pending"] {
        pods.evict(name, &EvictParams::default()).await.unwrap();
    }
    // Terminal pods go at once; the Pending one waits for a kubelet.
    assert!(api.pod("default", "succeeded").is_none());
    assert!(api.pod("default", "failed").is_none());
    assert!(
        api.pod("default", "pending")
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_some()
    );

    // A terminating pod is evicted (201) whatever its budget says.
    pods.delete("running", &DeleteParams::default()).await.unwrap();
    assert!(
        api.pod("default", "running")
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_some()
    );
    let url = format!("{}/api/v1/namespaces/default/pods/running/eviction", api.url());
    let r = reqwest::Client::new()
        .post(url)
        .json(&json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "running", "namespace": "default"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn kubectl_drain_evicts_a_pending_pod_under_a_budget_at_once() {
    let api = KubeApi::start();
    api.set_kubelet(false);
    api.add_node("n1");
    let kubectl = Kubectl::new(&api);
    let client = api.kube_client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client, "default");
    let pp = PostParams::default();
    pods.create(&pp, &node_owned_pod(&api, "guard", "n1", "guard"))
        .await
        .unwrap();
    pdbs.create(&pp, &pdb_json("guard", "guard", json!({"minAvailable": 1})))
        .await
        .unwrap();
    wait_for("pdb status", || pdb_computed(&api, "default", "guard")).await;
    let drain = kubectl.drain("n1", &[], Duration::from_secs(30));
    let kubelet = async {
        // Evicted (terminating): a kubelet finishes it.
        wait_for("guard terminating", || {
            api.pod("default", "guard")
                .is_some_and(|p| p.metadata.deletion_timestamp.is_some())
        })
        .await;
        api.set_kubelet(true);
    };
    let (took, ()) = tokio::join!(drain, kubelet);
    let took = took.expect("drain succeeds");
    assert_eq!(evictions_of(&api, "guard"), 1, "no 429 to retry");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test]
async fn finalizers_hold_deleted_objects() {
    let api = KubeApi::start();
    api.add_node("n1");
    let client = api.kube_client_no_retry();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pp = PostParams::default();
    let mut pod = node_owned_pod(&api, "guard", "n1", "guard");
    pod.metadata.finalizers = Some(vec![FINALIZER.into()]);
    pods.create(&pp, &pod).await.unwrap();
    wait_for("guard running", || pod_running(&api, "default", "guard")).await;
    let rv = api.resource_version();
    let url = format!(
        "{}/api/v1/namespaces/default/pods?watch=true&resourceVersion={rv}&timeoutSeconds=4&fieldSelector=metadata.name%3Dguard",
        api.url()
    );
    let watch = tokio::spawn(async move { reqwest::get(url).await.unwrap().text().await.unwrap() });
    wait_for("watch", || api.open_watches() == 1).await;

    // --force --grace-period=0 marks it deleted; the finalizer keeps it.
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    let kept = pods
        .delete("guard", &dp)
        .await
        .unwrap()
        .left()
        .expect("kept, not deleted");
    assert!(kept.metadata.deletion_timestamp.is_some());
    assert_eq!(kept.metadata.deletion_grace_period_seconds, Some(0));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(api.pod("default", "guard").is_some());

    // No new finalizer on an object being deleted.
    let err = pods
        .patch(
            "guard",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": [FINALIZER, "example.com/other"]}})),
        )
        .await
        .unwrap_err();
    let kube::Error::Api(e) = err else { panic!("{err:?}") };
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        e.message,
        "Pod \"guard\" is invalid: metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers []string{\"example.com/other\"}"
    );

    // Removing the last finalizer (a JSON patch with a test) removes it.
    let ops = json!([
        {"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
        {"op": "remove", "path": "/metadata/finalizers/0"}
    ]);
    api.json_patch_pod("default", "guard", ops).unwrap();
    assert!(api.pod("default", "guard").is_none());
    let text = watch.await.unwrap();
    let types: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(types.first().map(String::as_str), Some("MODIFIED"), "{text}");
    assert_eq!(types.last().map(String::as_str), Some("DELETED"), "{text}");
    assert!(!types.contains(&"ADDED".to_string()), "{text}");

    // Kinds without graceful deletion (a Node) are marked at once too.
    let nodes: Api<Node> = Api::all(api.kube_client());
    nodes
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": [FINALIZER]}})),
        )
        .await
        .unwrap();
    nodes.delete("n1", &DeleteParams::default()).await.unwrap();
    let n = api.node("n1");
    assert!(n.metadata.deletion_timestamp.is_some());
    nodes
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    assert!(nodes.get_opt("n1").await.unwrap().is_none());
}

/// PATCH with `application/json-patch+json`: status code and body.
async fn json_patch_http(api: &KubeApi, path: &str, ops: &Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .patch(format!("{}{path}", api.url()))
        .header("content-type", "application/json-patch+json")
        .body(ops.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

const FINALIZER: &str = "nova-kubernetes-drain/hypervisor-empty";

#[tokio::test]
async fn kubectl_drain_waits_for_a_finalizer() {
    let api = KubeApi::start();
    api.add_node("n1");
    api.add_node("n2");
    let kubectl = Kubectl::new(&api);
    let pods: Api<Pod> = Api::namespaced(api.kube_client(), "default");
    for (node, extra) in [("n1", &[][..]), ("n2", &["--disable-eviction"][..])] {
        let name = format!("guard-{node}");
        let mut pod = node_owned_pod(&api, &name, node, "guard");
        pod.metadata.finalizers = Some(vec![FINALIZER.into()]);
        pods.create(&PostParams::default(), &pod).await.unwrap();
        wait_for("guard running", || pod_running(&api, "default", &name)).await;
        let drain = kubectl.drain(node, extra, Duration::from_secs(60));
        tokio::pin!(drain);
        // The kubelet stopped it; only the finalizer keeps it (and drain waiting).
        let terminated = wait_for("guard terminated", || {
            api.pod("default", &name).is_some_and(|p| {
                p.metadata.deletion_grace_period_seconds == Some(0)
                    && p.status.and_then(|s| s.phase).as_deref() == Some("Failed")
            })
        });
        tokio::select! {
            r = &mut drain => panic!("drain {node} {extra:?} ended with the finalizer on: {r:?}"),
            () = terminated => {}
        }
        tokio::select! {
            r = &mut drain => panic!("drain {node} {extra:?} ended with the finalizer on: {r:?}"),
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        let ops = json!([
            {"op": "test", "path": "/metadata/finalizers", "value": [FINALIZER]},
            {"op": "remove", "path": "/metadata/finalizers"}
        ]);
        if node == "n1" {
            api.json_patch_pod("default", &name, ops).unwrap();
        } else {
            kubectl.patch_pod_json("default", &name, &ops).await.unwrap();
        }
        let took = drain.await;
        let took = took.unwrap_or_else(|e| panic!("drain {node} {extra:?}: {e}"));
        assert!(took >= Duration::from_secs(2), "{took:?}");
        assert!(api.pod("default", &name).is_none());
    }
    let deleted = api
        .requests()
        .iter()
        .any(|(m, p)| m == "DELETE" && p.starts_with("/api/v1/namespaces/default/pods/guard-n2"));
    assert!(deleted, "--disable-eviction deletes");
}

#[tokio::test]
async fn json_patch_and_stale_resource_versions() {
    let api = KubeApi::start();
    api.add_node("n1");
    let client = api.kube_client_no_retry();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let nodes: Api<Node> = Api::all(client);
    let mut pod = node_owned_pod(&api, "guard", "n1", "guard");
    pod.metadata.finalizers = Some(vec![FINALIZER.into()]);
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let pp = PatchParams::default();

    // add, replace, test and remove on a node.
    let ops = json!([
        {"op": "add", "path": "/metadata/labels/role", "value": "compute"},
        {"op": "replace", "path": "/metadata/labels/role", "value": "storage"},
        {"op": "test", "path": "/metadata/labels/role", "value": "storage"},
        {"op": "remove", "path": "/metadata/labels/kubernetes.io~1os"}
    ]);
    let (code, n) = json_patch_http(&api, "/api/v1/nodes/n1", &ops).await;
    assert_eq!(code, 200, "{n}");
    let n: Node = serde_json::from_value(n).unwrap();
    let labels = n.metadata.labels.unwrap();
    assert_eq!(labels.get("role").map(String::as_str), Some("storage"));
    assert!(!labels.contains_key("kubernetes.io/os"));

    // A failed test: 422 and nothing changes.
    let ops = json!([
        {"op": "test", "path": "/metadata/finalizers/0", "value": "example.com/other"},
        {"op": "remove", "path": "/metadata/finalizers/0"}
    ]);
    let (code, e) = json_patch_http(&api, "/api/v1/namespaces/default/pods/guard", &ops).await;
    assert_eq!((code, e["reason"].as_str()), (422, Some("Invalid")), "{e}");
    assert_eq!(
        e["message"],
        "the server rejected our request due to an error in our request"
    );
    assert_eq!(
        e["details"]["causes"][0],
        json!({"reason": "UnexpectedServerResponse", "message": "testing value /metadata/finalizers/0 failed: test failed"})
    );
    assert_eq!(
        api.pod("default", "guard").unwrap().metadata.finalizers.unwrap(),
        [FINALIZER]
    );

    // A stale resourceVersion in a merge patch, a JSON patch or a PUT: 409.
    let stale = api.pod("default", "guard").unwrap().metadata.resource_version.unwrap();
    nodes
        .patch("n1", &pp, &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})))
        .await
        .unwrap();
    pods.patch("guard", &pp, &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})))
        .await
        .unwrap();
    let conflict =
        |err: kube::Error| {
            let kube::Error::Api(e) = err else { panic!("{err:?}") };
            assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"), "{e:?}");
            assert!(e.message.ends_with(
                "the object has been modified; please apply your changes to the latest version and try again"
            ));
        };
    conflict(
        pods.patch(
            "guard",
            &pp,
            &Patch::Merge(json!({"metadata": {"resourceVersion": stale, "finalizers": null}})),
        )
        .await
        .unwrap_err(),
    );
    let ops = json!([
        {"op": "replace", "path": "/metadata/resourceVersion", "value": stale},
        {"op": "remove", "path": "/metadata/finalizers"}
    ]);
    let (code, e) = json_patch_http(&api, "/api/v1/namespaces/default/pods/guard", &ops).await;
    assert_eq!((code, e["reason"].as_str()), (409, Some("Conflict")), "{e}");
    let mut old = api.pod("default", "guard").unwrap();
    old.metadata.resource_version = Some(stale);
    conflict(pods.replace("guard", &PostParams::default(), &old).await.unwrap_err());
    assert_eq!(
        api.pod("default", "guard").unwrap().metadata.finalizers.unwrap(),
        [FINALIZER]
    );

    // kubectl patch --type=json: the same 422 for a failed test.
    let kubectl = Kubectl::new(&api);
    let err = kubectl
        .patch_pod_json(
            "default",
            "guard",
            &json!([{"op": "test", "path": "/metadata/finalizers/0", "value": "nope"}]),
        )
        .await
        .unwrap_err();
    assert!(
        err.contains("The request is invalid") && err.contains("testing value /metadata/finalizers/0 failed"),
        "{err}"
    );
}

/// What an uninstall with `kubectl delete -k deploy/` meets, as on kube-apiserver
/// 1.36 with its controller manager: the real `kubectl apply -k` and `delete -k`
/// work on every kind in deploy/; the ServiceAccount's token is refused as soon
/// as it is deleted; the namespace stays Terminating, refusing new content,
/// while a pod in it keeps a finalizer, and goes once the finalizer is removed.
#[tokio::test]
async fn an_uninstall_deletes_deploy_and_a_finalizer_holds_the_namespace() {
    let api = KubeApi::start();
    api.add_node("n1");
    let kubectl = Kubectl::new(&api);
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");
    kubectl
        // The fake serves no OpenAPI document for kubectl's client-side schema check.
        .run(&["apply", "-k", deploy, "--validate=false"], Duration::from_secs(60))
        .await
        .expect("kubectl apply -k deploy/");
    let token = api.service_account_token("nova-drain", "drainer");
    let agent_config = std::env::temp_dir().join(format!("fake-kube-agent-{}", std::process::id()));
    api.write_kubeconfig_with_token(&agent_config, &token);
    // The agent is a kube client (kubectl sends no token over plain HTTP).
    let agent_config = kube::config::Kubeconfig::read_from(&agent_config).unwrap();
    let mut agent_config = kube::Config::from_custom_kubeconfig(agent_config, &Default::default())
        .await
        .unwrap();
    agent_config.default_retry = false;
    let agent: Api<Pod> = Api::namespaced(kube::Client::try_from(agent_config).unwrap(), "nova-drain");
    agent
        .list(&ListParams::default())
        .await
        .expect("the agent's token is accepted");

    let client = api.kube_client_no_retry();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "nova-drain");
    let mut guard = node_owned_pod(&api, "guard", "n1", "guard");
    guard.metadata.finalizers = Some(vec![FINALIZER.into()]);
    pods.create(&PostParams::default(), &guard).await.unwrap();

    kubectl
        .run(&["delete", "-k", deploy, "--wait=false"], Duration::from_secs(60))
        .await
        .expect("kubectl delete -k deploy/");
    let refused = agent
        .get("guard")
        .await
        .expect_err("the token of a deleted ServiceAccount is refused");
    let kube::Error::Api(e) = refused else {
        panic!("{refused:?}")
    };
    assert_eq!((e.code, e.reason.as_str()), (401, "Unauthorized"));

    wait_for("the guard being deleted", || {
        api.pod("nova-drain", "guard")
            .is_some_and(|p| p.metadata.deletion_timestamp.is_some())
    })
    .await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let terminating = namespaces.get("nova-drain").await.unwrap();
    assert_eq!(terminating.status.and_then(|s| s.phase).as_deref(), Some("Terminating"));
    let mut late = pod_json("late", "n1", "late", false);
    late.metadata.namespace = None;
    let err = pods.create(&PostParams::default(), &late).await.unwrap_err();
    let kube::Error::Api(e) = err else { panic!("{err:?}") };
    assert_eq!((e.code, e.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        e.message,
        "pods \"late\" is forbidden: unable to create new content in namespace nova-drain because it is being terminated"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        namespaces.get_opt("nova-drain").await.unwrap().is_some(),
        "a finalizer in it holds the namespace"
    );

    api.json_patch_pod(
        "nova-drain",
        "guard",
        json!([{"op": "remove", "path": "/metadata/finalizers"}]),
    )
    .unwrap();
    let mut gone = false;
    for _ in 0..100 {
        if namespaces.get_opt("nova-drain").await.unwrap().is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the namespace goes once nothing holds it");
}

// ---------------------------------------------------------------------------
// Custom resources
// ---------------------------------------------------------------------------

const TEST_GROUP: &str = "drain-test.example.io";

/// A small cluster-scoped test CRD (kind Widget, status subresource, printer
/// columns), in the shape kube's `CustomResourceExt::crd()` produces.
fn widget_crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("widgets.{TEST_GROUP}")},
        "spec": {
            "group": TEST_GROUP,
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget", "shortNames": ["wd"], "categories": ["testing"]},
            "scope": "Cluster",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Node", "type": "string", "jsonPath": ".spec.node"},
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Moved", "type": "integer", "jsonPath": ".status.moved"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object", "required": ["spec"],
                    "properties": {
                        "spec": {
                            "type": "object", "required": ["node"],
                            "properties": {
                                "node": {"type": "string"},
                                "maxParallel": {"type": "integer", "format": "uint32", "minimum": 0.0, "nullable": true},
                                "mode": {"type": "string", "enum": ["live", "cold", null], "nullable": true},
                                "dryRun": {"type": "boolean", "default": false},
                                "labels": {"type": "object", "additionalProperties": {"type": "string"}, "default": {}},
                                "deadline": {"type": "string", "format": "date-time", "nullable": true},
                                "budget": {"x-kubernetes-int-or-string": true},
                                "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
                            }
                        },
                        "status": {
                            "type": "object", "nullable": true,
                            "properties": {
                                "phase": {"type": "string"},
                                "moved": {"type": "integer"},
                                "vms": {"type": "array", "items": {
                                    "type": "object", "required": ["id"],
                                    "properties": {"id": {"type": "string"}, "ramMib": {"type": "integer", "format": "uint64", "minimum": 0.0}}
                                }}
                            }
                        }
                    }
                }}
            }]
        }
    })
}

/// A namespaced test CRD with no status subresource and no printer columns.
fn gadget_crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("gadgets.{TEST_GROUP}")},
        "spec": {
            "group": TEST_GROUP,
            "names": {"kind": "Gadget", "plural": "gadgets"},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                    "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
                }}}
            }]
        }
    })
}

fn widget_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(TEST_GROUP, "v1", "Widget"), "widgets")
}

fn widget(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": format!("{TEST_GROUP}/v1"), "kind": "Widget",
        "metadata": {"name": name}, "spec": spec
    }))
    .unwrap()
}

async fn create_crd(api: &KubeApi, crd: Value) -> CustomResourceDefinition {
    let crds: Api<CustomResourceDefinition> = Api::all(api.kube_client_no_retry());
    crds.create(&PostParams::default(), &serde_json::from_value(crd).unwrap())
        .await
        .unwrap()
}

fn api_error(e: kube::Error) -> kube::core::Status {
    match e {
        kube::Error::Api(s) => *s,
        other => panic!("{other:?}"),
    }
}

/// An HTTP request with a JSON body: status, Warning headers, body.
async fn http_json(method: reqwest::Method, url: String, ct: &str, body: &Value) -> (u16, Vec<String>, Value) {
    let r = reqwest::Client::new()
        .request(method, url)
        .header("content-type", ct)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let warnings = r
        .headers()
        .get_all("warning")
        .iter()
        .map(|h| h.to_str().unwrap().to_string())
        .collect();
    (r.status().as_u16(), warnings, r.json().await.unwrap())
}

fn write_yaml(dir: &std::path::Path, name: &str, v: &Value) -> String {
    let path = dir.join(name);
    // JSON is YAML.
    std::fs::write(&path, v.to_string()).unwrap();
    path.to_string_lossy().into_owned()
}

/// Until the CRD exists its resource is a 404 and not discovered; `kubectl
/// apply` creates it (the server fills in its status), then a custom
/// resource; `kubectl get` by plural, short name and category prints the
/// CRD's printer columns from the server's Table; `kubectl delete` removes it.
#[tokio::test]
async fn kubectl_applies_a_crd_and_prints_its_custom_resources() {
    let api = KubeApi::start();
    let http = reqwest::Client::new();
    let url = format!("{}/apis/{TEST_GROUP}/v1/widgets", api.url());
    assert_eq!(http.get(&url).send().await.unwrap().status(), 404);
    let groups: Value = http
        .get(format!("{}/apis", api.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(!groups.to_string().contains(TEST_GROUP), "{groups}");

    let kubectl = Kubectl::new(&api);
    let dir = std::env::temp_dir().join(format!("fake-kube-crd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let crd_file = write_yaml(&dir, "crd.yaml", &widget_crd());
    kubectl
        .run(&["apply", "-f", &crd_file, "--validate=false"], Duration::from_secs(30))
        .await
        .expect("kubectl apply -f crd.yaml");
    let crds: Api<CustomResourceDefinition> = Api::all(api.kube_client());
    let crd = crds.get(&format!("widgets.{TEST_GROUP}")).await.unwrap();
    let status = crd.status.unwrap();
    let conditions: Vec<(String, String)> = status
        .conditions
        .unwrap()
        .into_iter()
        .map(|c| (c.type_, c.status))
        .collect();
    assert!(
        conditions.contains(&("Established".into(), "True".into())),
        "{conditions:?}"
    );
    assert!(
        conditions.contains(&("NamesAccepted".into(), "True".into())),
        "{conditions:?}"
    );
    assert_eq!(status.stored_versions, Some(vec!["v1".to_string()]));
    assert_eq!(status.accepted_names.unwrap().kind, "Widget");
    assert_eq!(crd.metadata.generation, Some(1));
    let discovered: Value = http
        .get(format!("{}/apis/{TEST_GROUP}/v1", api.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = discovered["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["widgets", "widgets/status"]);

    let mut w1 = serde_json::to_value(widget("w1", json!({"node": "n1", "colour": "blue"}))).unwrap();
    w1["status"] = json!({"phase": "Done"});
    let w1_file = write_yaml(&dir, "w1.yaml", &w1);
    kubectl
        .run(&["apply", "-f", &w1_file, "--validate=false"], Duration::from_secs(30))
        .await
        .expect("kubectl apply -f w1.yaml");
    let widgets: Api<DynamicObject> = Api::all_with(api.kube_client(), &widget_resource());
    let stored = widgets.get("w1").await.unwrap();
    assert_eq!(
        stored.data["spec"],
        json!({"node": "n1", "dryRun": false, "labels": {}}),
        "unknown fields are pruned, defaults applied"
    );
    assert!(stored.data.get("status").is_none(), "a create sets no status");
    assert_eq!(stored.metadata.generation, Some(1));

    // A second apply is a JSON merge patch (no strategic merge for custom
    // resources): a spec change is a new generation.
    w1["spec"]["node"] = json!("n2");
    let w1_file = write_yaml(&dir, "w1.yaml", &w1);
    kubectl
        .run(&["apply", "-f", &w1_file, "--validate=false"], Duration::from_secs(30))
        .await
        .expect("kubectl apply -f w1.yaml, again");
    let stored = widgets.get("w1").await.unwrap();
    assert_eq!(
        stored.data["spec"],
        json!({"node": "n2", "dryRun": false, "labels": {}})
    );
    assert_eq!(stored.metadata.generation, Some(2));
    let printed = kubectl.run(&["get", "widgets"], Duration::from_secs(30)).await.unwrap();
    let header: Vec<&str> = printed.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "NODE", "PHASE", "MOVED", "AGE"], "{printed}");
    widgets
        .patch_status(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Moving", "moved": 3}})),
        )
        .await
        .unwrap();
    for what in ["wd", "testing", "widget.drain-test.example.io/w1"] {
        let printed = kubectl.run(&["get", what], Duration::from_secs(30)).await.unwrap();
        let row: Vec<&str> = printed.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(&row[..4], ["w1", "n2", "Moving", "3"], "kubectl get {what}: {printed}");
    }
    // kubectl get -w: the watch's events are Tables too (header once).
    let kubectl = std::sync::Arc::new(kubectl);
    let watching = tokio::spawn({
        let kubectl = kubectl.clone();
        async move {
            kubectl
                .run(
                    &["get", "widgets", "-w", "--request-timeout=3s"],
                    Duration::from_secs(30),
                )
                .await
        }
    });
    wait_for("kubectl's watch", || api.open_watches() == 1).await;
    widgets
        .patch_status(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"moved": 4}})),
        )
        .await
        .unwrap();
    let printed = watching.await.unwrap().expect("kubectl get -w");
    let lines: Vec<Vec<&str>> = printed.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(lines.len(), 3, "{printed}");
    assert_eq!(lines[0][0], "NAME", "{printed}");
    assert_eq!(&lines[2][..4], ["w1", "n2", "Moving", "4"], "{printed}");

    kubectl
        .run(&["delete", "-f", &w1_file], Duration::from_secs(30))
        .await
        .expect("kubectl delete -f w1.yaml");
    assert!(widgets.get_opt("w1").await.unwrap().is_none());
    kubectl
        .run(&["delete", "-f", &crd_file], Duration::from_secs(30))
        .await
        .expect("kubectl delete -f crd.yaml");
    assert!(crds.get_opt(&format!("widgets.{TEST_GROUP}")).await.unwrap().is_none());
    assert_eq!(http.get(&url).send().await.unwrap().status(), 404);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Status subresource semantics, generation and optimistic concurrency.
#[tokio::test]
async fn custom_resource_status_subresource_and_conflicts() {
    let api = KubeApi::start();
    create_crd(&api, widget_crd()).await;
    let widgets: Api<DynamicObject> = Api::all_with(api.kube_client_no_retry(), &widget_resource());
    let mut w = widget("w1", json!({"node": "n1"}));
    w.data["status"] = json!({"phase": "Done"});
    let owner = json!([{"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "0f0f0f0f-0000-4000-8000-000000000002", "controller": true}]);
    w.metadata.owner_references = Some(serde_json::from_value(owner.clone()).unwrap());
    let created = widgets.create(&PostParams::default(), &w).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert_eq!(serde_json::to_value(&created.metadata.owner_references).unwrap(), owner);
    assert!(created.data.get("status").is_none());

    // The main resource ignores status; metadata changes keep the generation.
    let mut edit = created.clone();
    edit.data["status"] = json!({"phase": "Done"});
    edit.metadata.labels = Some([("a".to_string(), "b".to_string())].into());
    let replaced = widgets.replace("w1", &PostParams::default(), &edit).await.unwrap();
    assert!(replaced.data.get("status").is_none());
    assert_eq!(replaced.metadata.labels.as_ref().unwrap()["a"], "b");
    assert_eq!(replaced.metadata.generation, Some(1));
    let patched = widgets
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"maxParallel": 2}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.metadata.generation, Some(2));

    // /status keeps everything but status, labels included.
    let after_status = widgets
        .patch_status(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"phase": "Moving"}, "spec": {"node": "other"}, "metadata": {"labels": {"c": "d"}}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(after_status.data["status"]["phase"], "Moving");
    assert_eq!(after_status.data["spec"]["node"], "n1");
    assert!(!after_status.metadata.labels.as_ref().unwrap().contains_key("c"));
    assert_eq!(after_status.metadata.generation, Some(2));

    // A stale resourceVersion is a 409 on both, exactly as for built-ins.
    let mut stale = created.clone();
    stale.data["spec"]["node"] = json!("n2");
    let e = api_error(widgets.replace("w1", &PostParams::default(), &stale).await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        e.message,
        "Operation cannot be fulfilled on widgets.drain-test.example.io \"w1\": the object has been modified; please apply your changes to the latest version and try again"
    );
    let mut stale_status = serde_json::to_value(&created).unwrap();
    stale_status["status"] = json!({"phase": "Failed"});
    let e = api_error(
        widgets
            .replace_status(
                "w1",
                &PostParams::default(),
                &serde_json::from_value(stale_status).unwrap(),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    // An update must name a resourceVersion (AllowUnconditionalUpdate false).
    let mut unconditional = after_status.clone();
    unconditional.metadata.resource_version = None;
    let e = api_error(
        widgets
            .replace("w1", &PostParams::default(), &unconditional)
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 422);
    assert!(
        e.message
            .ends_with("metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"),
        "{}",
        e.message
    );

    // The status written is validated against the schema too.
    let e = api_error(
        widgets
            .patch_status(
                "w1",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"moved": "x"}})),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 422);
    assert_eq!(
        e.message,
        "Widget.drain-test.example.io \"w1\" is invalid: status.moved: Invalid value: \"string\": status.moved in body must be of type integer: \"string\""
    );
}

/// Schema validation (422 with the real messages), pruning with a warning or
/// a strict 400, strategic merge patch refused, field selectors limited.
#[tokio::test]
async fn custom_resources_are_validated_and_pruned_against_the_schema() {
    let api = KubeApi::start();
    create_crd(&api, widget_crd()).await;
    let widgets: Api<DynamicObject> = Api::all_with(api.kube_client_no_retry(), &widget_resource());
    let pp = PostParams::default();
    let invalid = |spec: Value| {
        let widgets = widgets.clone();
        async move {
            let e = api_error(
                widgets
                    .create(&PostParams::default(), &widget("w", spec))
                    .await
                    .unwrap_err(),
            );
            assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"), "{}", e.message);
            e.message
        }
    };
    assert_eq!(
        invalid(json!({"node": "n1", "maxParallel": "three"})).await,
        "Widget.drain-test.example.io \"w\" is invalid: spec.maxParallel: Invalid value: \"string\": spec.maxParallel in body must be of type integer: \"string\""
    );
    assert_eq!(
        invalid(json!({"maxParallel": 1})).await,
        "Widget.drain-test.example.io \"w\" is invalid: spec.node: Required value"
    );
    assert_eq!(
        invalid(json!({"node": "n1", "mode": "fast"})).await,
        "Widget.drain-test.example.io \"w\" is invalid: spec.mode: Unsupported value: \"fast\": supported values: \"live\", \"cold\", \"null\""
    );
    for bad in [
        "tomorrow",
        "2026-12-07 03:00:00Z",
        "2026-12-07T03:00Z",
        "2026-12-07T03:00:00+0100",
    ] {
        assert_eq!(
            invalid(json!({"node": "n1", "deadline": bad})).await,
            format!(
                "Widget.drain-test.example.io \"w\" is invalid: spec.deadline: Invalid value: \"{bad}\": spec.deadline in body must be of type date-time: \"{bad}\""
            )
        );
    }
    assert!(
        invalid(json!({"node": "n1", "maxParallel": -1}))
            .await
            .contains("spec.maxParallel in body should be greater than or equal to 0")
    );
    assert!(
        invalid(json!({"node": "n1", "budget": true}))
            .await
            .contains("spec.budget in body must be of type integer,string")
    );
    assert!(
        invalid(json!({"node": "n1", "labels": {"a": 1}}))
            .await
            .contains("spec.labels.a in body must be of type string")
    );
    let e = api_error(
        widgets
            .create(
                &pp,
                &serde_json::from_value(
                    json!({"apiVersion": format!("{TEST_GROUP}/v1"), "kind": "Widget", "metadata": {"name": "w"}}),
                )
                .unwrap(),
            )
            .await
            .unwrap_err(),
    );
    assert!(e.message.ends_with("spec: Required value"), "{}", e.message);

    // Nested arrays of objects: required fields and bounds, with their paths.
    widgets.create(&pp, &widget("w0", json!({"node": "n1"}))).await.unwrap();
    let e = api_error(
        widgets
            .patch_status(
                "w0",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"vms": [{"id": "a", "ramMib": 1}, {"ramMib": -1}]}})),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(
        e.message,
        "Widget.drain-test.example.io \"w0\" is invalid: [status.vms[1].ramMib: Invalid value: -1: status.vms[1].ramMib in body should be greater than or equal to 0, status.vms[1].id: Required value]"
    );
    widgets.delete("w0", &DeleteParams::default()).await.unwrap();

    // A schema node without a type (what schemars makes of a serde_json::Value)
    // is not structural: the CRD is refused.
    let mut untyped = gadget_crd();
    untyped["metadata"]["name"] = json!(format!("things.{TEST_GROUP}"));
    untyped["spec"]["names"] = json!({"kind": "Thing", "plural": "things"});
    untyped["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"] =
        json!({"type": "object", "properties": {"extra": {}}});
    let e = api.add_crd(untyped).unwrap_err();
    assert_eq!(
        e.message,
        "CustomResourceDefinition.apiextensions.k8s.io \"things.drain-test.example.io\" is invalid: spec.versions[0].schema.openAPIV3Schema.properties[spec].properties[extra].type: Required value: must not be empty for specified object fields"
    );

    // What the schema allows: nulls where nullable, int-or-string, 1.0 as an
    // integer, anything under preserve-unknown-fields.
    let ok = widgets
        .create(
            &pp,
            &widget(
                "w1",
                json!({"node": "n1", "maxParallel": 1.0, "deadline": null, "budget": "50%", "mode": "live",
                       "extra": {"any": {"thing": [1, "two"]}}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(ok.data["spec"]["extra"]["any"]["thing"], json!([1, "two"]));
    assert_eq!(ok.data["spec"]["deadline"], Value::Null);
    assert_eq!(api.objects(&format!("{TEST_GROUP}/v1"), "widgets").len(), 1);
    widgets
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"deadline": "2026-12-07T03:00:00.5+01:00", "budget": 2}})),
        )
        .await
        .unwrap();

    // Unknown fields: dropped with a warning by default, silently with
    // Ignore, refused with Strict.
    let url = format!("{}/apis/{TEST_GROUP}/v1/widgets", api.url());
    let body = serde_json::to_value(widget("w2", json!({"node": "n1", "colour": "blue"}))).unwrap();
    let (code, warnings, created) = http_json(reqwest::Method::POST, url.clone(), "application/json", &body).await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(warnings, [r#"299 - "unknown field \"spec.colour\"""#]);
    assert_eq!(created["spec"], json!({"node": "n1", "dryRun": false, "labels": {}}));
    let mut body3 = body.clone();
    body3["metadata"]["name"] = json!("w3");
    let (code, warnings, _) = http_json(
        reqwest::Method::POST,
        format!("{url}?fieldValidation=Ignore"),
        "application/json",
        &body3,
    )
    .await;
    assert_eq!((code, warnings.len()), (201, 0));
    body3["metadata"]["name"] = json!("w4");
    let (code, _, status) = http_json(
        reqwest::Method::POST,
        format!("{url}?fieldValidation=Strict"),
        "application/json",
        &body3,
    )
    .await;
    assert_eq!(code, 400, "{status}");
    assert_eq!(
        status["message"],
        "Widget in version \"v1\" cannot be handled as a Widget: strict decoding error: unknown field \"spec.colour\""
    );

    // Metadata is an ObjectMeta.
    let mut bad_meta = body.clone();
    bad_meta["metadata"] = json!({"name": "w6", "labels": {"a": 1}});
    let (code, _, status) = http_json(reqwest::Method::POST, url.clone(), "application/json", &bad_meta).await;
    assert_eq!(code, 400, "{status}");

    // Server-side apply is typed against the schema: unknown fields are an error.
    let ssa = PatchParams::apply("test").force();
    let e = api_error(
        widgets
            .patch(
                "w5",
                &ssa,
                &Patch::Apply(serde_json::to_value(widget("w5", json!({"node": "n1", "colour": "blue"}))).unwrap()),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (e.code, e.message.as_str()),
        (
            400,
            "failed to create typed patch object (drain-test.example.io/v1, Kind=Widget): .spec.colour: field not declared in schema"
        )
    );
    let applied = widgets
        .patch(
            "w5",
            &ssa,
            &Patch::Apply(serde_json::to_value(widget("w5", json!({"node": "n1"}))).unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(applied.metadata.generation, Some(1));

    // No strategic merge patch for custom resources.
    let (code, _, status) = http_json(
        reqwest::Method::PATCH,
        format!("{url}/w1"),
        "application/strategic-merge-patch+json",
        &json!({"spec": {"node": "n2"}}),
    )
    .await;
    assert_eq!(
        (code, status["reason"].as_str()),
        (415, Some("UnsupportedMediaType")),
        "{status}"
    );
    let e = api_error(
        widgets
            .patch(
                "w1",
                &PatchParams::default(),
                &Patch::Strategic(json!({"spec": {"node": "n2"}})),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 415);
    // JSON patch works, and its result is validated.
    let (code, status) = json_patch_http(
        &api,
        &format!("/apis/{TEST_GROUP}/v1/widgets/w1"),
        &json!([{"op": "replace", "path": "/spec/node", "value": 5}]),
    )
    .await;
    assert_eq!(code, 422, "{status}");

    // Lists of custom resources are unstructured: items keep apiVersion/kind.
    let list: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    assert_eq!(list["kind"], "WidgetList");
    assert_eq!(list["items"][0]["kind"], "Widget");
    assert_eq!(list["items"][0]["apiVersion"], format!("{TEST_GROUP}/v1"));

    // Field selectors: metadata.name only (cluster-scoped).
    let named = widgets
        .list(&ListParams::default().fields("metadata.name=w1"))
        .await
        .unwrap();
    assert_eq!(named.items.len(), 1);
    let e = api_error(
        widgets
            .list(&ListParams::default().fields("spec.node=n1"))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (e.code, e.message.as_str()),
        (400, "field label not supported: spec.node")
    );
    let e = api_error(
        widgets
            .list(&ListParams::default().fields("metadata.namespace=default"))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 400);
}

/// A kube watcher sees custom resources come, change and go; a finalizer
/// holds a deleted one; a CRD's deletion waits for its instances, refuses
/// new ones meanwhile and then takes the resource away; a namespace's
/// deletion deletes its namespaced custom resources.
#[tokio::test]
async fn custom_resource_watches_finalizers_and_deletions() {
    let api = KubeApi::start();
    create_crd(&api, widget_crd()).await;
    let client = api.kube_client_no_retry();
    let widgets: Api<DynamicObject> = Api::all_with(client.clone(), &widget_resource());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut stream = watcher::watcher(widgets.clone(), watcher::Config::default()).boxed();
    tokio::spawn(async move {
        while let Some(ev) = stream.next().await {
            if tx.send(ev).is_err() {
                break;
            }
        }
    });
    let mut next = async || loop {
        match tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("watch event in time")
        {
            Some(Ok(WEvent::Apply(o))) => return ("apply", o),
            Some(Ok(WEvent::Delete(o))) => return ("delete", o),
            Some(_) => continue,
            None => panic!("watcher ended"),
        }
    };
    wait_for("the watch", || api.open_watches() == 1).await;

    let mut w = widget("w1", json!({"node": "n1"}));
    w.metadata.finalizers = Some(vec![FINALIZER.into()]);
    widgets.create(&PostParams::default(), &w).await.unwrap();
    let (what, o) = next().await;
    assert_eq!((what, o.metadata.name.as_deref()), ("apply", Some("w1")));
    widgets.delete("w1", &DeleteParams::default()).await.unwrap();
    let (what, o) = next().await;
    assert_eq!(what, "apply");
    assert!(o.metadata.deletion_timestamp.is_some(), "a finalizer holds it");
    assert!(widgets.get_opt("w1").await.unwrap().is_some());

    // Deleting the CRD waits for its instances and refuses new ones.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.delete(&format!("widgets.{TEST_GROUP}"), &DeleteParams::default())
        .await
        .unwrap();
    let terminating = crds.get(&format!("widgets.{TEST_GROUP}")).await.unwrap();
    assert!(terminating.metadata.deletion_timestamp.is_some());
    assert_eq!(
        terminating.metadata.finalizers.as_deref(),
        Some(&["customresourcecleanup.apiextensions.k8s.io".to_string()][..])
    );
    // A terminating CRD can still be updated (its finalizer is a valid name).
    crds.patch(
        &format!("widgets.{TEST_GROUP}"),
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
    )
    .await
    .unwrap();
    let e = api_error(
        widgets
            .create(&PostParams::default(), &widget("w2", json!({"node": "n1"})))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 405, "{}", e.message);
    widgets
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Json::<()>(
                serde_json::from_value(json!([{"op": "remove", "path": "/metadata/finalizers"}])).unwrap(),
            ),
        )
        .await
        .unwrap();
    let (what, o) = next().await;
    assert_eq!((what, o.metadata.name.as_deref()), ("delete", Some("w1")));
    let mut gone = false;
    for _ in 0..100 {
        if crds.get_opt(&format!("widgets.{TEST_GROUP}")).await.unwrap().is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the CRD goes once its instances are gone");
    wait_for("the watch on the removed resource to end", || api.open_watches() == 0).await;
    let e = api_error(widgets.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(e.code, 404);

    // Namespaced custom resources go with their namespace.
    api.add_crd(gadget_crd()).unwrap();
    api.add_namespace("ns1");
    let gadget_resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(TEST_GROUP, "v1", "Gadget"), "gadgets");
    let gadgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), "ns1", &gadget_resource);
    let g: DynamicObject = serde_json::from_value(json!({
        "apiVersion": format!("{TEST_GROUP}/v1"), "kind": "Gadget",
        "metadata": {"name": "g1"}, "spec": {"anything": 1}, "status": {"set": true}
    }))
    .unwrap();
    let created = gadgets.create(&PostParams::default(), &g).await.unwrap();
    assert_eq!(
        created.data["status"]["set"], true,
        "no status subresource: status is written"
    );
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces.delete("ns1", &DeleteParams::default()).await.unwrap();
    let mut gone = false;
    for _ in 0..100 {
        if namespaces.get_opt("ns1").await.unwrap().is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the namespace goes once its content is deleted");
    let all_gadgets: Api<DynamicObject> = Api::all_with(client, &gadget_resource);
    assert!(all_gadgets.list(&ListParams::default()).await.unwrap().items.is_empty());
    assert!(api.objects(&format!("{TEST_GROUP}/v1"), "gadgets").is_empty());
}

/// The agent's Evacuations against the fake with deploy/crd.yaml: a status
/// write goes through the status subresource, and creating a run's Evacuation
/// keeps the ten most recent finished ones of the node, whatever else exists.
#[tokio::test]
async fn evacuation_history_is_trimmed_to_the_ten_most_recent_finished() {
    use nova_kubernetes_drain::kube::evacuation::{EvacuationPhase, EvacuationStatus, Evacuations};
    let api = KubeApi::start();
    let node = api.add_node("n1");
    let crd: Value = serde_saphyr::from_str(include_str!("../deploy/crd.yaml")).unwrap();
    api.add_crd(crd).unwrap();
    let evacuations = Evacuations::new(api.kube_client(), "n1");
    let finished = EvacuationStatus {
        phase: Some(EvacuationPhase::Failed),
        ..EvacuationStatus::default()
    };
    let start: jiff::Timestamp = "2026-12-07T00:00:00Z".parse().unwrap();
    let mut names = Vec::new();
    for minute in 0..12 {
        let at = start + jiff::SignedDuration::from_mins(minute);
        let name = evacuations.create(&node, at, false).await.unwrap();
        evacuations.write_status(&name, &finished).await.unwrap();
        names.push(name);
    }
    let running = evacuations
        .create(&node, start + jiff::SignedDuration::from_hours(1), false)
        .await
        .unwrap();
    let left: Vec<String> = api
        .objects("nova-kubernetes-drain.io/v1alpha1", "evacuations")
        .iter()
        .map(|e| e["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left.len(), 11, "{left:?}");
    assert!(left.contains(&running));
    for gone in &names[..2] {
        assert!(!left.contains(gone), "the oldest finished {gone} is deleted: {left:?}");
    }
    let stored = api.objects("nova-kubernetes-drain.io/v1alpha1", "evacuations");
    let last = stored
        .iter()
        .find(|e| e["metadata"]["name"] == names[11].as_str())
        .unwrap();
    assert_eq!(last["status"]["phase"], "Failed");
    assert_eq!(last["metadata"]["ownerReferences"][0]["kind"], "Node");
    assert_eq!(last["metadata"]["labels"]["nova-kubernetes-drain/node"], "n1");
}

/// The agent's watch of its node's Evacuations selects by `spec.nodeName`,
/// which the CRD declares selectable (a field it does not declare is refused,
/// as the real server refuses it); our finalizer holds a deleted Evacuation
/// until the agent lets it go, and leaves anyone else's in place.
#[tokio::test]
async fn evacuations_are_selected_by_node_and_held_by_our_finalizer() {
    use nova_kubernetes_drain::kube::evacuation::{Evacuation, EvacuationSeen, Evacuations, FINALIZER};
    let api = KubeApi::start();
    let crd: Value = serde_saphyr::from_str(include_str!("../deploy/crd.yaml")).unwrap();
    api.add_crd(crd).unwrap();
    let client = api.kube_client();
    let all: Api<Evacuation> = Api::all(client.clone());
    for (name, node) in [("mine", "n1"), ("other", "n2")] {
        let evacuation: Evacuation = serde_json::from_value(json!({
            "apiVersion": "nova-kubernetes-drain.io/v1alpha1", "kind": "Evacuation",
            "metadata": {"name": name, "finalizers": ["example.com/keep"]},
            "spec": {"nodeName": node, "paused": true},
        }))
        .unwrap();
        all.create(&PostParams::default(), &evacuation).await.unwrap();
    }
    let selected = all
        .list(&ListParams::default().fields("spec.nodeName=n1"))
        .await
        .unwrap();
    let names: Vec<String> = selected
        .items
        .iter()
        .map(|e| e.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["mine"]);
    let e = api_error(
        all.list(&ListParams::default().fields("spec.paused=true"))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 400, "{}", e.message);
    let seen = EvacuationSeen::of(&selected.items[0]);
    assert!(
        seen.by_hand && seen.spec.paused && !seen.held && !seen.deleting,
        "{seen:?}"
    );
    let moved = api_error(
        all.patch(
            "mine",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodeName": "n2"}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(
        (moved.code, moved.message.as_str()),
        (
            422,
            "Evacuation.nova-kubernetes-drain.io \"mine\" is invalid: spec.nodeName: Invalid value: \"string\": \
             nodeName is immutable"
        )
    );
    all.patch(
        "mine",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"paused": false}})),
    )
    .await
    .expect("the rest of the spec may change");

    let evacuations = Evacuations::new(client, "n1");
    evacuations.hold("mine").await.unwrap();
    evacuations.hold("mine").await.unwrap();
    all.delete("mine", &DeleteParams::default()).await.unwrap();
    let held = all.get("mine").await.unwrap();
    assert_eq!(
        held.metadata.finalizers.clone().unwrap_or_default(),
        ["example.com/keep", FINALIZER],
        "put on once, after the others"
    );
    assert!(EvacuationSeen::of(&held).deleting);
    evacuations.let_go("mine").await.unwrap();
    let after = all.get("mine").await.unwrap();
    assert_eq!(after.metadata.finalizers.unwrap_or_default(), ["example.com/keep"]);
    all.patch(
        "mine",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(
        all.get_opt("mine").await.unwrap().is_none(),
        "gone once no finalizer holds it"
    );
}

const ROLE_LABEL: &str = "nova-kubernetes-drain/coordination";

fn lease(name: &str, role: Option<&str>, spec: Value) -> Lease {
    let mut l = json!({"metadata": {"name": name}, "spec": spec});
    if let Some(role) = role {
        l["metadata"]["labels"] = json!({ROLE_LABEL: role});
    }
    serde_json::from_value(l).unwrap()
}

fn lease_names(list: &[Lease]) -> Vec<String> {
    list.iter().map(|l| l.metadata.name.clone().unwrap()).collect()
}

/// coordination.k8s.io/v1 Leases as kube-apiserver serves them: discovered,
/// created, read and replaced through `Api<Lease>` with optimistic
/// concurrency (a replace must name the resourceVersion it read:
/// AllowUnconditionalUpdate is false; a stale one is a 409), MicroTimes kept
/// to the microsecond (and decoded as strictly as Go does), no generation,
/// validation as ValidateLeaseSpec, a PUT to a missing Lease creates it.
#[tokio::test]
async fn leases_are_served_with_optimistic_concurrency() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let api = KubeApi::start();
    let leases: Api<Lease> = Api::namespaced(api.kube_client_no_retry(), "default");
    let http = reqwest::Client::new();

    // Discovery: /apis, the group, the group version.
    let groups: Value = http
        .get(format!("{}/apis", api.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let coordination = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "coordination.k8s.io")
        .cloned()
        .expect("coordination.k8s.io in /apis");
    assert_eq!(
        coordination["preferredVersion"]["groupVersion"],
        "coordination.k8s.io/v1"
    );
    let group: Value = http
        .get(format!("{}/apis/coordination.k8s.io", api.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(group["kind"], "APIGroup");
    assert_eq!(
        group["versions"],
        json!([{"groupVersion": "coordination.k8s.io/v1", "version": "v1"}])
    );
    let resources: Value = http
        .get(format!("{}/apis/coordination.k8s.io/v1", api.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        resources["resources"],
        json!([{"name": "leases", "singularName": "lease", "namespaced": true, "kind": "Lease",
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}])
    );

    // Create: MicroTimes to the microsecond, no generation, no status.
    let at = jiff::Timestamp::from_nanosecond(1_750_000_000_123_456_789).unwrap();
    let micro = jiff::Timestamp::from_microsecond(1_750_000_000_123_456).unwrap();
    let mut l = lease(
        "nova-drain-slot-0",
        Some("slot"),
        json!({"holderIdentity": "agent-a", "leaseDurationSeconds": 15, "leaseTransitions": 0}),
    );
    let spec = l.spec.as_mut().unwrap();
    spec.acquire_time = Some(MicroTime(at));
    spec.renew_time = Some(MicroTime(at));
    let created = leases.create(&PostParams::default(), &l).await.unwrap();
    assert_eq!(created.metadata.generation, None);
    assert!(created.metadata.uid.is_some() && created.metadata.resource_version.is_some());
    let spec = created.spec.clone().unwrap();
    assert_eq!(spec.renew_time, Some(MicroTime(micro)));
    assert_eq!(spec.acquire_time, Some(MicroTime(micro)));
    assert_eq!(spec.holder_identity.as_deref(), Some("agent-a"));
    let stored = &api.leases("default")[0];
    assert_eq!(stored["spec"]["renewTime"], "2025-06-15T15:06:40.123456Z");
    assert_eq!(stored["apiVersion"], "coordination.k8s.io/v1");
    assert_eq!(leases.get("nova-drain-slot-0").await.unwrap(), created);

    // Creating it again: 409 AlreadyExists.
    let e = api_error(leases.create(&PostParams::default(), &l).await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(
        e.message,
        "leases.coordination.k8s.io \"nova-drain-slot-0\" already exists"
    );

    // Replace as of the version read: accepted, a new resourceVersion.
    let mut renew = created.clone();
    renew.spec.as_mut().unwrap().renew_time = Some(MicroTime(micro + jiff::SignedDuration::from_secs(5)));
    let renewed = leases
        .replace("nova-drain-slot-0", &PostParams::default(), &renew)
        .await
        .unwrap();
    assert_ne!(renewed.metadata.resource_version, created.metadata.resource_version);
    assert_eq!(renewed.metadata.generation, None);

    // The same again (now stale): 409 Conflict, nothing changes.
    let mut steal = created.clone();
    steal.spec.as_mut().unwrap().holder_identity = Some("agent-b".into());
    let e = api_error(
        leases
            .replace("nova-drain-slot-0", &PostParams::default(), &steal)
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        e.message,
        "Operation cannot be fulfilled on leases.coordination.k8s.io \"nova-drain-slot-0\": the object has been modified; please apply your changes to the latest version and try again"
    );
    let details = e.details.unwrap();
    assert_eq!(
        (details.group.as_str(), details.kind.as_str(), details.name.as_str()),
        ("coordination.k8s.io", "leases", "nova-drain-slot-0")
    );
    assert_eq!(
        leases
            .get("nova-drain-slot-0")
            .await
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
            .as_deref(),
        Some("agent-a")
    );

    // Without a resourceVersion: 422 (AllowUnconditionalUpdate is false).
    let mut unconditional = renewed.clone();
    unconditional.metadata.resource_version = None;
    let e = api_error(
        leases
            .replace("nova-drain-slot-0", &PostParams::default(), &unconditional)
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        e.message,
        "leases.coordination.k8s.io \"nova-drain-slot-0\" is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"
    );

    // A uid in the body is a precondition.
    let mut other_uid = renewed.clone();
    other_uid.metadata.uid = Some("0f0f0f0f-0000-4000-8000-00000000000f".into());
    let e = api_error(
        leases
            .replace("nova-drain-slot-0", &PostParams::default(), &other_uid)
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert!(
        e.message.contains("Precondition failed: UID in precondition"),
        "{}",
        e.message
    );

    // A merge patch applies to the latest version.
    let patched = leases
        .patch(
            "nova-drain-slot-0",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"leaseTransitions": 1}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.spec.unwrap().lease_transitions, Some(1));

    // Validation (ValidateLeaseSpec): 422 with a cause per field.
    let bad = lease("bad", None, json!({"leaseDurationSeconds": 0, "leaseTransitions": -1}));
    let e = api_error(leases.create(&PostParams::default(), &bad).await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        e.message,
        "Lease.coordination.k8s.io \"bad\" is invalid: [spec.leaseDurationSeconds: Invalid value: 0: must be greater than 0, spec.leaseTransitions: Invalid value: -1: must be greater than or equal to 0]"
    );
    let causes: Vec<(String, String)> = e
        .details
        .unwrap()
        .causes
        .into_iter()
        .map(|c| (c.field, c.reason))
        .collect();
    assert_eq!(
        causes,
        [
            ("spec.leaseDurationSeconds".to_string(), "FieldValueInvalid".to_string()),
            ("spec.leaseTransitions".to_string(), "FieldValueInvalid".to_string())
        ]
    );
    let e = api_error(
        leases
            .create(&PostParams::default(), &lease("Not_A_Name", None, json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    let mut zero = renewed.clone();
    zero.metadata.resource_version = patched.metadata.resource_version.clone();
    zero.spec.as_mut().unwrap().lease_duration_seconds = Some(0);
    let e = api_error(
        leases
            .replace("nova-drain-slot-0", &PostParams::default(), &zero)
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 422, "an update is validated too: {}", e.message);

    // MicroTime decodes as Go's time.Parse(RFC3339Micro): six fractional
    // digits exactly; any offset, stored in UTC.
    let url = format!("{}/apis/coordination.k8s.io/v1/namespaces/default/leases", api.url());
    let (code, _, e) = http_json(
        reqwest::Method::POST,
        url.clone(),
        "application/json",
        &json!({"metadata": {"name": "seconds"}, "spec": {"renewTime": "2025-01-01T00:00:00Z"}}),
    )
    .await;
    assert_eq!((code, e["reason"].as_str()), (400, Some("BadRequest")), "{e}");
    assert_eq!(
        e["message"],
        "Lease in version \"v1\" cannot be handled as a Lease: parsing time \"2025-01-01T00:00:00Z\" as \"2006-01-02T15:04:05.000000Z07:00\": cannot parse \"Z\" as \".000000\""
    );
    let (code, _, e) = http_json(
        reqwest::Method::POST,
        url.clone(),
        "application/json",
        &json!({"metadata": {"name": "nanos"}, "spec": {"renewTime": "2025-01-01T00:00:00.123456789Z"}}),
    )
    .await;
    assert_eq!(code, 400, "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .ends_with("cannot parse \"789Z\" as \"Z07:00\""),
        "{e}"
    );
    let (code, _, created_offset) = http_json(
        reqwest::Method::POST,
        url.clone(),
        "application/json",
        &json!({"metadata": {"name": "offset"}, "spec": {"renewTime": "2025-01-01T02:00:00.000001+02:00"}}),
    )
    .await;
    assert_eq!(code, 201, "{created_offset}");
    assert_eq!(created_offset["spec"]["renewTime"], "2025-01-01T00:00:00.000001Z");

    // A resourceVersion on a create: the storage's 500.
    let (code, _, e) = http_json(
        reqwest::Method::POST,
        url.clone(),
        "application/json",
        &json!({"metadata": {"name": "with-rv", "resourceVersion": "5"}, "spec": {}}),
    )
    .await;
    assert_eq!(code, 500, "{e}");
    assert_eq!(
        e["message"],
        "resourceVersion should not be set on objects to be created"
    );

    // strategy and preferredHolder are dropped (CoordinatedLeaderElection off).
    let (code, _, coordinated) = http_json(
        reqwest::Method::POST,
        url.clone(),
        "application/json",
        &json!({"metadata": {"name": "coordinated"}, "spec": {"strategy": "OldestEmulationVersion", "preferredHolder": "x"}}),
    )
    .await;
    assert_eq!(code, 201, "{coordinated}");
    assert_eq!(coordinated["spec"], json!({}));

    // A PUT must name the object.
    let (code, _, e) = http_json(
        reqwest::Method::PUT,
        format!("{url}/offset"),
        "application/json",
        &json!({"metadata": {"resourceVersion": created_offset["metadata"]["resourceVersion"]}, "spec": {}}),
    )
    .await;
    assert_eq!(code, 400, "{e}");

    // Delete with a stale precondition: 409; with the current one: gone.
    let e = api_error(
        leases
            .delete(
                "nova-drain-slot-0",
                &DeleteParams::default().preconditions(kube::api::Preconditions {
                    resource_version: created.metadata.resource_version.clone(),
                    uid: None,
                }),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert!(e.message.starts_with("Operation cannot be fulfilled on leases.coordination.k8s.io \"nova-drain-slot-0\": Precondition failed: ResourceVersion in precondition"), "{}", e.message);
    let current = leases.get("nova-drain-slot-0").await.unwrap();
    leases
        .delete(
            "nova-drain-slot-0",
            &DeleteParams::default().preconditions(kube::api::Preconditions {
                resource_version: current.metadata.resource_version.clone(),
                uid: current.metadata.uid.clone(),
            }),
        )
        .await
        .unwrap();
    assert!(leases.get_opt("nova-drain-slot-0").await.unwrap().is_none());

    // A replace of the deleted Lease re-creates it (AllowCreateOnUpdate),
    // whatever resourceVersion it names; without its old uid.
    let mut again = current.clone();
    again.metadata.uid = None;
    let recreated = leases
        .replace("nova-drain-slot-0", &PostParams::default(), &again)
        .await
        .unwrap();
    assert_ne!(recreated.metadata.uid, current.metadata.uid);
    assert_eq!(recreated.spec, current.spec);
    // With its old uid: the precondition fails on the missing object.
    leases
        .delete("nova-drain-slot-0", &DeleteParams::default())
        .await
        .unwrap();
    let e = api_error(
        leases
            .replace("nova-drain-slot-0", &PostParams::default(), &current)
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"), "{}", e.message);
    assert!(leases.get_opt("nova-drain-slot-0").await.unwrap().is_none());
}

/// Lists and watches of Leases by label select what kube-apiserver would:
/// an existence selector, `key=value`, and a Lease that loses the label
/// leaves the watch as a DELETED. `kubectl get leases -l` too.
#[tokio::test]
async fn leases_are_listed_and_watched_by_label() {
    use kube::api::{WatchEvent, WatchParams};
    let api = KubeApi::start();
    let leases: Api<Lease> = Api::namespaced(api.kube_client_no_retry(), "default");
    let pp = PostParams::default();
    leases
        .create(&pp, &lease("nova-drain-slot-0", Some("slot"), json!({})))
        .await
        .unwrap();
    leases
        .create(&pp, &lease("nova-drain-queue-n1", Some("queue"), json!({})))
        .await
        .unwrap();
    leases
        .create(&pp, &lease("someone-else", None, json!({})))
        .await
        .unwrap();
    let kube_system: Api<Lease> = Api::namespaced(api.kube_client_no_retry(), "kube-system");
    kube_system
        .create(&pp, &lease("elsewhere", Some("slot"), json!({})))
        .await
        .unwrap();

    let labelled = leases.list(&ListParams::default().labels(ROLE_LABEL)).await.unwrap();
    assert_eq!(
        lease_names(&labelled.items),
        ["nova-drain-queue-n1", "nova-drain-slot-0"]
    );
    let slots = leases
        .list(&ListParams::default().labels(&format!("{ROLE_LABEL}=slot")))
        .await
        .unwrap();
    assert_eq!(lease_names(&slots.items), ["nova-drain-slot-0"]);
    let all: Api<Lease> = Api::all(api.kube_client_no_retry());
    let everywhere = all.list(&ListParams::default().labels(ROLE_LABEL)).await.unwrap();
    assert_eq!(everywhere.items.len(), 3);
    let unlabelled = leases
        .list(&ListParams::default().labels(&format!("!{ROLE_LABEL}")))
        .await
        .unwrap();
    assert_eq!(lease_names(&unlabelled.items), ["someone-else"]);

    let rv = labelled.metadata.resource_version.unwrap();
    let mut events = leases
        .watch(&WatchParams::default().labels(ROLE_LABEL), &rv)
        .await
        .unwrap()
        .boxed();
    let mut next = async || -> (String, String) {
        let ev = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("watch event in time")
            .expect("watch open")
            .unwrap();
        match ev {
            WatchEvent::Added(l) => ("ADDED".into(), l.metadata.name.unwrap()),
            WatchEvent::Modified(l) => ("MODIFIED".into(), l.metadata.name.unwrap()),
            WatchEvent::Deleted(l) => ("DELETED".into(), l.metadata.name.unwrap()),
            other => panic!("{other:?}"),
        }
    };
    let pm = PatchParams::default();
    // Unlabelled: not seen. Labelled: seen; losing the label: DELETED.
    leases
        .patch(
            "someone-else",
            &pm,
            &Patch::Merge(json!({"spec": {"holderIdentity": "x"}})),
        )
        .await
        .unwrap();
    leases
        .patch(
            "nova-drain-slot-0",
            &pm,
            &Patch::Merge(json!({"spec": {"holderIdentity": "a"}})),
        )
        .await
        .unwrap();
    assert_eq!(next().await, ("MODIFIED".into(), "nova-drain-slot-0".into()));
    leases
        .create(&pp, &lease("nova-drain-slot-1", Some("slot"), json!({})))
        .await
        .unwrap();
    assert_eq!(next().await, ("ADDED".into(), "nova-drain-slot-1".into()));
    leases
        .patch(
            "nova-drain-queue-n1",
            &pm,
            &Patch::Merge(json!({"metadata": {"labels": {ROLE_LABEL: null}}})),
        )
        .await
        .unwrap();
    assert_eq!(next().await, ("DELETED".into(), "nova-drain-queue-n1".into()));
    leases
        .delete("nova-drain-slot-1", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(next().await, ("DELETED".into(), "nova-drain-slot-1".into()));

    // kubectl finds the resource by discovery and lists it with the selector.
    let out = Kubectl::new(&api)
        .run(
            &[
                "get",
                "leases",
                "-n",
                "default",
                "-l",
                &format!("{ROLE_LABEL}=slot"),
                "-o",
                "name",
            ],
            Duration::from_secs(30),
        )
        .await
        .expect("kubectl get leases");
    assert_eq!(out.trim(), "lease.coordination.k8s.io/nova-drain-slot-0");
}

/// set_unreachable: requests fail with a connection error (no HTTP
/// response), an open watch ends; once off, the server answers again with
/// its state intact.
#[tokio::test]
async fn an_unreachable_server_fails_requests_and_ends_watches() {
    use kube::api::WatchParams;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let api = KubeApi::start();
    let leases: Api<Lease> = Api::namespaced(api.kube_client_no_retry(), "default");
    let created = leases
        .create(
            &PostParams::default(),
            &lease("nova-drain-slot-0", Some("slot"), json!({})),
        )
        .await
        .unwrap();
    let rv = created.metadata.resource_version.clone().unwrap();
    let mut events = leases.watch(&WatchParams::default(), &rv).await.unwrap().boxed();
    wait_for("watch", || api.open_watches() == 1).await;

    api.set_unreachable(true);
    // The watch breaks (a reset, not a clean end), without an event.
    match tokio::time::timeout(WAIT, events.next()).await.expect("the watch ends") {
        Some(Err(_)) => {}
        None => panic!("a clean end, not a broken stream"),
        Some(Ok(ev)) => panic!("event from an unreachable server: {ev:?}"),
    }
    assert_eq!(api.open_watches(), 0);
    let e = leases.get("nova-drain-slot-0").await.unwrap_err();
    assert!(!matches!(e, kube::Error::Api(_)), "no API answer: {e:?}");
    // No HTTP response at all on a raw connection.
    let addr = api.url().trim_start_matches("http://").to_string();
    if let Ok(mut conn) = tokio::net::TcpStream::connect(&addr).await {
        let _ = conn
            .write_all(b"GET /api/v1/namespaces HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        let mut buf = vec![];
        let _ = tokio::time::timeout(WAIT, conn.read_to_end(&mut buf))
            .await
            .expect("closed");
        assert!(buf.is_empty(), "{}", String::from_utf8_lossy(&buf));
    }

    api.set_unreachable(false);
    let back = leases.get("nova-drain-slot-0").await.unwrap();
    assert_eq!(back, created, "state intact");
    let mut events = leases.watch(&WatchParams::default(), &rv).await.unwrap().boxed();
    leases
        .patch(
            "nova-drain-slot-0",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holderIdentity": "b"}})),
        )
        .await
        .unwrap();
    let ev = tokio::time::timeout(WAIT, events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(ev, kube::api::WatchEvent::Modified(_)), "{ev:?}");
}

const PAUSE_CM: &str = "nova-drain-memory-relief";
const AGENT_NS: &str = "nova-drain";

fn config_map(name: &str, cm: Value) -> ConfigMap {
    let mut v = cm;
    v["metadata"] = json!({"name": name});
    serde_json::from_value(v).unwrap()
}

fn paused(cm: &ConfigMap) -> Option<&str> {
    cm.data.as_ref()?.get("paused").map(String::as_str)
}

/// `FIELD REASON` of every cause of a Status.
fn causes(e: &kube::core::Status) -> Vec<String> {
    let details = e.details.as_ref().expect("details");
    details
        .causes
        .iter()
        .map(|c| format!("{} {}", c.field, c.reason))
        .collect()
}

/// `TYPE paused=VALUE` of the next event of a ConfigMap watch.
async fn next_event_of<S>(events: &mut S) -> String
where
    S: Stream<Item = kube::Result<kube::api::WatchEvent<ConfigMap>>> + Unpin,
{
    use kube::api::WatchEvent;
    let event = tokio::time::timeout(WAIT, events.next()).await.expect("event in time");
    let (kind, cm) = match event.expect("event").expect("not an error") {
        WatchEvent::Added(cm) => ("ADDED", cm),
        WatchEvent::Modified(cm) => ("MODIFIED", cm),
        WatchEvent::Deleted(cm) => ("DELETED", cm),
        other => panic!("{other:?}"),
    };
    format!("{kind} paused={}", paused(&cm).unwrap_or_default())
}

/// `/api/v1` lists configmaps as kube-apiserver does (shortName `cm`, the
/// verbs served here), and a list is a ConfigMapList.
#[tokio::test]
async fn config_maps_are_discovered_and_listed() {
    let api = KubeApi::start();
    let http = reqwest::Client::new();
    let core: Value = http
        .get(format!("{}/api/v1", api.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let cm = core["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "configmaps")
        .cloned()
        .expect("configmaps in /api/v1");
    assert_eq!(
        cm,
        json!({"name": "configmaps", "singularName": "configmap", "namespaced": true, "kind": "ConfigMap",
               "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"], "shortNames": ["cm"]})
    );
    let url = format!("{}/api/v1/namespaces/default/configmaps", api.url());
    let list: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        (&list["kind"], &list["apiVersion"]),
        (&json!("ConfigMapList"), &json!("v1"))
    );
    assert_eq!(list["items"], json!([]));
    let all = format!("{}/api/v1/configmaps", api.url());
    assert_eq!(http.get(&all).send().await.unwrap().status(), 200);
}

/// The pause switch through `Api<ConfigMap>`: create, get, merge patch (a
/// watch sees it), stale replace (409), unconditional replace, delete.
#[tokio::test]
async fn config_maps_are_created_patched_watched_and_deleted() {
    use kube::api::WatchParams;
    let api = KubeApi::start();
    api.add_namespace(AGENT_NS);
    let cms: Api<ConfigMap> = Api::namespaced(api.kube_client_no_retry(), AGENT_NS);
    assert!(cms.get_opt(PAUSE_CM).await.unwrap().is_none());
    let created = cms
        .create(
            &PostParams::default(),
            &config_map(PAUSE_CM, json!({"data": {"paused": "true"}})),
        )
        .await
        .unwrap();
    assert_eq!(paused(&created), Some("true"));
    assert_eq!(created.metadata.namespace.as_deref(), Some(AGENT_NS));
    assert_eq!(created.metadata.generation, None);
    assert_eq!(cms.get(PAUSE_CM).await.unwrap(), created);
    assert_eq!(api.config_maps(AGENT_NS)[0]["data"], json!({"paused": "true"}));

    let rv = created.metadata.resource_version.clone().unwrap();
    let mut events = cms.watch(&WatchParams::default(), &rv).await.unwrap().boxed();
    let patch = Patch::Merge(json!({"data": {"paused": "false"}}));
    let patched = cms.patch(PAUSE_CM, &PatchParams::default(), &patch).await.unwrap();
    assert_eq!(paused(&patched), Some("false"));
    assert_ne!(patched.metadata.resource_version, created.metadata.resource_version);
    assert_eq!(next_event_of(&mut events).await, "MODIFIED paused=false");

    let e = api_error(
        cms.replace(PAUSE_CM, &PostParams::default(), &created)
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        e.message,
        format!(
            "Operation cannot be fulfilled on configmaps \"{PAUSE_CM}\": the object has been modified; please apply your changes to the latest version and try again"
        )
    );
    let mut unconditional = created.clone();
    unconditional.metadata.resource_version = None;
    let replaced = cms
        .replace(PAUSE_CM, &PostParams::default(), &unconditional)
        .await
        .unwrap();
    assert_eq!(paused(&replaced), Some("true"));

    cms.delete(PAUSE_CM, &DeleteParams::default()).await.unwrap();
    assert!(cms.get_opt(PAUSE_CM).await.unwrap().is_none());
    assert_eq!(next_event_of(&mut events).await, "MODIFIED paused=true");
    assert_eq!(next_event_of(&mut events).await, "DELETED paused=true");
    let e = api_error(cms.get(PAUSE_CM).await.unwrap_err());
    assert_eq!(
        (e.code, e.message.as_str()),
        (404, "configmaps \"nova-drain-memory-relief\" not found")
    );
}

/// Keys are config keys (IsConfigMapKey), in one map only; names are DNS
/// subdomains: 422 with kube-apiserver's messages and causes.
#[tokio::test]
async fn config_map_keys_and_names_are_validated() {
    let api = KubeApi::start();
    let cms: Api<ConfigMap> = Api::namespaced(api.kube_client_no_retry(), "default");
    let create = |cm: ConfigMap| {
        let cms = cms.clone();
        async move { api_error(cms.create(&PostParams::default(), &cm).await.unwrap_err()) }
    };
    let e = create(config_map("bad", json!({"data": {"bad key": "1"}}))).await;
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        e.message,
        "ConfigMap \"bad\" is invalid: data[bad key]: Invalid value: \"bad key\": a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"
    );
    assert_eq!(causes(&e), ["data[bad key] FieldValueInvalid"]);

    let e = create(config_map(
        "dots",
        json!({"data": {"..": "1"}, "binaryData": {"..x": "AA=="}}),
    ))
    .await;
    assert_eq!(
        e.message,
        "ConfigMap \"dots\" is invalid: [data[..]: Invalid value: \"..\": must not be '..', binaryData[..x]: Invalid value: \"..x\": must not start with '..']"
    );
    let long = "k".repeat(254);
    let e = create(config_map("long", json!({"data": {long.clone(): "1"}}))).await;
    assert_eq!(
        e.message,
        format!(
            "ConfigMap \"long\" is invalid: data[{long}]: Invalid value: \"{long}\": must be no more than 253 characters"
        )
    );

    let e = create(config_map(
        "both",
        json!({"data": {"paused": "true"}, "binaryData": {"paused": "dHJ1ZQ=="}}),
    ))
    .await;
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        e.message,
        "ConfigMap \"both\" is invalid: data[paused]: Invalid value: \"paused\": duplicate of key present in binaryData"
    );
    assert_eq!(causes(&e), ["data[paused] FieldValueInvalid"]);

    let e = create(config_map("Not_A_Name", json!({}))).await;
    assert_eq!(e.code, 422);
    assert_eq!(causes(&e), ["metadata.name FieldValueInvalid"]);
    assert!(api.config_maps("default").is_empty());
    let ok = config_map("ok", json!({"data": {"a-b_C.d": ""}, "binaryData": {"bin": "AAEC"}}));
    let made = cms.create(&PostParams::default(), &ok).await.unwrap();
    assert_eq!(made.binary_data.unwrap()["bin"].0, vec![0u8, 1, 2]);
}

/// What Go's decoder refuses is a 400 (a non-string value in `data`), and
/// more than 1 MiB of values is a 422, both as kube-apiserver answers.
#[tokio::test]
async fn config_map_values_must_be_strings_and_fit_in_a_mebibyte() {
    let api = KubeApi::start();
    let url = format!("{}/api/v1/namespaces/default/configmaps", api.url());
    let post = |body: Value| {
        let url = url.clone();
        async move { http_json(reqwest::Method::POST, url, "application/json", &body).await }
    };
    let (code, _, status) = post(json!({"metadata": {"name": "b"}, "data": {"paused": true}})).await;
    assert_eq!((code, &status["reason"]), (400, &json!("BadRequest")));
    assert_eq!(
        status["message"],
        "ConfigMap in version \"v1\" cannot be handled as a ConfigMap: json: cannot unmarshal bool into Go struct field ConfigMap.data of type string"
    );
    let (code, _, status) = post(json!({"metadata": {"name": "n"}, "data": {"n": 1}})).await;
    assert_eq!(code, 400, "{status}");
    let (code, _, status) = post(json!({"metadata": {"name": "m"}, "data": ["x"]})).await;
    assert_eq!(code, 400, "{status}");
    let (code, _, status) = post(json!({"metadata": {"name": "i"}, "immutable": "yes"})).await;
    assert_eq!(code, 400, "{status}");
    let (code, _, status) = post(json!({"metadata": {"name": "z"}, "data": {"k": null}, "binaryData": {}})).await;
    assert_eq!(code, 201, "{status}");
    assert_eq!(status["data"], json!({"k": ""}));
    assert!(
        status.get("binaryData").is_none(),
        "empty maps are not stored: {status}"
    );

    let half = "x".repeat(512 * 1024);
    let fits = json!({"metadata": {"name": "fits"}, "data": {"a": half, "b": half}});
    assert_eq!(post(fits).await.0, 201);
    let big = json!({"metadata": {"name": "big"}, "data": {"a": half, "b": half}, "binaryData": {"c": "AA=="}});
    let (code, _, status) = post(big).await;
    assert_eq!((code, &status["reason"]), (422, &json!("Invalid")), "{status}");
    assert_eq!(
        status["message"],
        "ConfigMap \"big\" is invalid: []: Too long: may not be more than 1048576 bytes"
    );
    assert_eq!(
        status["details"]["causes"],
        json!([{"reason": "FieldValueTooLong", "message": "Too long: may not be more than 1048576 bytes", "field": "[]"}])
    );
}

/// `immutable: true`: data, binaryData and `immutable` itself are frozen
/// (metadata is not); a mutable one may become immutable.
#[tokio::test]
async fn immutable_config_maps_refuse_data_changes() {
    let api = KubeApi::start();
    let cms: Api<ConfigMap> = Api::namespaced(api.kube_client_no_retry(), "default");
    let frozen = config_map(PAUSE_CM, json!({"data": {"paused": "true"}, "immutable": true}));
    cms.create(&PostParams::default(), &frozen).await.unwrap();
    let patch = |p: Value| {
        let cms = cms.clone();
        async move { cms.patch(PAUSE_CM, &PatchParams::default(), &Patch::Merge(p)).await }
    };
    let e = api_error(patch(json!({"data": {"paused": "false"}})).await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        e.message,
        format!("ConfigMap \"{PAUSE_CM}\" is invalid: data: Forbidden: field is immutable when `immutable` is set")
    );
    assert_eq!(causes(&e), ["data FieldValueForbidden"]);
    let e = api_error(
        patch(json!({"immutable": false, "binaryData": {"b": "AA=="}}))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        causes(&e),
        ["immutable FieldValueForbidden", "binaryData FieldValueForbidden"]
    );
    let e = api_error(patch(json!({"immutable": null})).await.unwrap_err());
    assert_eq!(causes(&e), ["immutable FieldValueForbidden"]);
    let labelled = patch(json!({"metadata": {"labels": {"a": "b"}}})).await.unwrap();
    assert_eq!(paused(&labelled), Some("true"));

    let thawed = config_map("thawed", json!({"data": {"paused": "true"}}));
    cms.create(&PostParams::default(), &thawed).await.unwrap();
    let frozen = cms
        .patch(
            "thawed",
            &PatchParams::default(),
            &Patch::Merge(json!({"immutable": true, "data": {"paused": "false"}})),
        )
        .await
        .unwrap();
    assert_eq!((frozen.immutable, paused(&frozen)), (Some(true), Some("false")));
}

/// The real kubectl: `create configmap --from-literal`, `get -o json` (and
/// by short name), `patch`, `delete`, and the 422 of a patch to an
/// immutable one.
#[tokio::test]
async fn kubectl_creates_patches_and_deletes_a_config_map() {
    let api = KubeApi::start();
    api.add_namespace(AGENT_NS);
    let kubectl = Kubectl::new(&api);
    let t = Duration::from_secs(30);
    let run = |args: &[&str]| {
        let mut all = vec!["-n", AGENT_NS];
        all.extend_from_slice(args);
        let all: Vec<String> = all.into_iter().map(String::from).collect();
        let kubectl = &kubectl;
        async move {
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            kubectl.run(&refs, t).await
        }
    };
    run(&["create", "configmap", PAUSE_CM, "--from-literal=paused=true"])
        .await
        .expect("kubectl create configmap");
    let printed = run(&["get", "configmap", PAUSE_CM, "-o", "json"]).await.unwrap();
    let cm: Value = serde_json::from_str(&printed).unwrap();
    assert_eq!(
        (&cm["kind"], &cm["data"]),
        (&json!("ConfigMap"), &json!({"paused": "true"}))
    );
    assert_eq!(cm["metadata"]["namespace"], AGENT_NS);

    run(&["patch", "configmap", PAUSE_CM, "-p", r#"{"data":{"paused":"false"}}"#])
        .await
        .expect("kubectl patch configmap");
    let printed = run(&["get", "cm", PAUSE_CM, "-o", "jsonpath={.data.paused}"])
        .await
        .unwrap();
    assert_eq!(printed, "false");
    let cms: Api<ConfigMap> = Api::namespaced(api.kube_client(), AGENT_NS);
    assert_eq!(paused(&cms.get(PAUSE_CM).await.unwrap()), Some("false"));

    run(&["patch", "configmap", PAUSE_CM, "-p", r#"{"immutable":true}"#])
        .await
        .expect("kubectl patch immutable");
    let e = run(&["patch", "configmap", PAUSE_CM, "-p", r#"{"data":{"paused":"true"}}"#])
        .await
        .unwrap_err();
    assert!(
        e.contains(&format!(
            "The ConfigMap \"{PAUSE_CM}\" is invalid: data: Forbidden: field is immutable when `immutable` is set"
        )),
        "{e}"
    );
    run(&["delete", "configmap", PAUSE_CM])
        .await
        .expect("kubectl delete configmap");
    assert!(cms.get_opt(PAUSE_CM).await.unwrap().is_none());

    // Not UTF-8: kubectl sends it as binaryData.
    let file = std::env::temp_dir().join(format!("fake-kube-cm-{}.bin", std::process::id()));
    std::fs::write(&file, [0xff_u8, 0, 1]).unwrap();
    let from_file = format!("--from-file=blob={}", file.display());
    run(&["create", "configmap", "blob", &from_file, "--from-literal=paused=true"])
        .await
        .expect("kubectl create configmap --from-file");
    let _ = std::fs::remove_file(&file);
    let blob = cms.get("blob").await.unwrap();
    assert_eq!(blob.binary_data.as_ref().unwrap()["blob"].0, [0xff, 0, 1]);
    assert_eq!(paused(&blob), Some("true"));
    let e = run(&["get", "configmap", PAUSE_CM]).await.unwrap_err();
    assert!(e.contains("NotFound") && e.contains("not found"), "{e}");
}

/// The history trim both Evacuations and VmMigrations use: the oldest go,
/// the `keep` newest stay (made in name order: creation times are whole
/// seconds, and within one the name decides).
#[tokio::test]
async fn the_oldest_objects_beyond_the_kept_are_deleted() {
    let api = KubeApi::start();
    api.add_namespace("nova-drain");
    let maps: Api<ConfigMap> = Api::namespaced(api.kube_client(), "nova-drain");
    for name in ["h-1", "h-2", "h-3", "h-4", "h-5"] {
        let map: ConfigMap = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        maps.create(&PostParams::default(), &map).await.unwrap();
    }
    let all = maps.list(&ListParams::default()).await.unwrap().items;
    nova_kubernetes_drain::kube::evacuation::delete_oldest(&maps, all.clone(), 5).await;
    assert_eq!(
        maps.list(&ListParams::default()).await.unwrap().items.len(),
        5,
        "none beyond the kept"
    );
    nova_kubernetes_drain::kube::evacuation::delete_oldest(&maps, all, 2).await;
    let mut left: Vec<String> = maps
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|m| m.metadata.name)
        .collect();
    left.sort();
    assert_eq!(left, ["h-4", "h-5"]);
}
