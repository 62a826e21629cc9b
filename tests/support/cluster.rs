//! The Kubernetes cluster a test runs the agent against: the in-process fake
//! of [`super::kube_api`] by default, or a real cluster when
//! `DRAINER_TEST_KUBECONFIG` names an admin kubeconfig (as envtest does with
//! an existing cluster).
//!
//! Both modes go through the same code wherever a real cluster allows it:
//! * the test's Node is created through the API with a unique name
//!   (`<nova host>.t<random>`, the agent maps it back with `nova_host: '{short}'`),
//!   and deleted again when the [`TestCluster`] is dropped (real mode);
//! * a heartbeat keeps it Ready as a kubelet does (its Ready condition every
//!   [`STATUS_EVERY`], and on a real cluster its Lease in `kube-node-lease`
//!   every [`LEASE_EVERY`]), so the node lifecycle controller never marks it
//!   `Unknown`, taints it, or marks its pods not Ready;
//! * a kubelet player ([`TestCluster::set_kubelet`]) plays the kubelet for the
//!   pods bound to the Node through the API: a new pod becomes Running and
//!   Ready (status subresource); a pod being deleted gets its terminal status
//!   and the kubelet's final DELETE with `gracePeriodSeconds: 0` (its
//!   finalizers then keep it). On the fake, the fake's own kubelet is switched
//!   off (`KubeApi::set_kubelet(false)` stops both its start and its
//!   termination of pods), so this player is what runs there too;
//! * cordon, uncordon and drain are the real `kubectl`; Nodes, pods, budgets and
//!   Events are read through the API.
//!
//! Only a real cluster gets: `kubectl apply -k deploy/` (namespace with Pod
//! Security `restricted`, RBAC, ServiceAccount, DaemonSet; the DaemonSet's
//! nodeSelector keeps it off the test Nodes, which are not labelled), an agent
//! kubeconfig holding a token of deploy's own ServiceAccount
//! (`kubectl create token drainer`), `--guard-image` for the agent (its own pod
//! does not exist there), the Lease, and the clean-up on drop. Only the fake
//! gets: the agent's own DaemonSet pod (`$POD_NAME`, whose image the guard runs).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::kube_api::KubeApi;
use super::kubectl::Kubectl;

/// Names an admin kubeconfig of a real cluster to run against.
pub const KUBECONFIG_ENV: &str = "DRAINER_TEST_KUBECONFIG";
/// Label on every Node a test creates (to find leftovers of killed runs).
pub const TEST_LABEL: &str = "nova-kubernetes-drain.test/daemon";
/// The label of the agents' coordination Leases (`src/kube/leases.rs`).
const COORDINATION_LABEL: &str = "nova-kubernetes-drain/coordination";
/// The agent's ServiceAccount in `deploy/`.
const SERVICE_ACCOUNT: &str = "drainer";
/// How often the Node's Ready condition is posted.
pub const STATUS_EVERY: Duration = Duration::from_secs(10);
/// How often the Node's Lease is renewed (real mode; the kubelet's default is 10 s of 40 s).
pub const LEASE_EVERY: Duration = Duration::from_secs(5);
const LEASE_SECONDS: i32 = 40;
/// A test Node whose Lease has not been renewed for this long was left by a killed run.
const LEFTOVER_AFTER: Duration = Duration::from_secs(300);
/// How often the kubelet player looks at the Node's pods.
const KUBELET_EVERY: Duration = Duration::from_millis(200);
/// Bound on every kubectl call but drain.
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether `DRAINER_TEST_KUBECONFIG` asks for a real cluster.
pub fn real_cluster_requested() -> bool {
    std::env::var_os(KUBECONFIG_ENV).is_some_and(|v| !v.is_empty())
}

enum Backend {
    Fake(Arc<KubeApi>),
    Real {
        /// The admin kubeconfig (`DRAINER_TEST_KUBECONFIG`).
        kubeconfig: PathBuf,
        /// The API server's URL and CA bundle (base64), for the agent's kubeconfig.
        server: String,
        ca_data: Option<String>,
        insecure: bool,
    },
}

/// What the agent needs to run as it would in its DaemonSet pod.
pub struct AgentIdentity {
    pub env: Vec<(String, String)>,
    pub flags: Vec<String>,
}

/// One test's cluster and Node (see the module doc).
pub struct TestCluster {
    /// Shared by the Nodes of one test ([`TestCluster::join`]).
    backend: Arc<Backend>,
    client: kube::Client,
    node: String,
    namespace: String,
    agent_image: String,
    /// The fake's agent pod (`$POD_NAME`); none on a real cluster.
    agent_pod: Option<String>,
    kubectl: Arc<Kubectl>,
    /// Whether the kubelet player starts new pods.
    kubelet: Arc<AtomicBool>,
    node_deleted: AtomicBool,
    heartbeat: JoinHandle<()>,
    player: JoinHandle<()>,
}

impl TestCluster {
    /// A cluster with the agent's namespace and a Ready Node named after the
    /// Nova host `nova_host` (see [`TestCluster::node`]); the agent's guard runs `agent_image`.
    pub async fn start(nova_host: &str, namespace: &str, agent_image: &str) -> TestCluster {
        let (backend, kubectl) = match std::env::var_os(KUBECONFIG_ENV).filter(|v| !v.is_empty()) {
            None => {
                let fake = KubeApi::start();
                // The player below is the kubelet, as on a real cluster.
                fake.set_kubelet(false);
                fake.add_namespace(namespace);
                let kubectl = Kubectl::new(&fake);
                // What `kubectl apply -k deploy/` installs on a real cluster
                // and the agent writes to (the fake serves no OpenAPI document
                // for kubectl's client-side schema check).
                for file in ["deploy/crd.yaml", "deploy/crd-vmmigrations.yaml"] {
                    let crd = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
                    kubectl
                        .run(
                            &["apply", "-f", &crd.to_string_lossy(), "--validate=false"],
                            KUBECTL_TIMEOUT,
                        )
                        .await
                        .unwrap_or_else(|e| panic!("kubectl apply -f {file}: {e:?}"));
                }
                (Backend::Fake(Arc::new(fake)), kubectl)
            }
            Some(path) => {
                // Used in place: it may name certificate files relative to the working directory.
                let kubeconfig = PathBuf::from(path);
                let kubectl = Kubectl::with_kubeconfig(kubeconfig.clone());
                let view = kubectl
                    .run(
                        &["config", "view", "--raw", "--minify", "--flatten", "-o", "json"],
                        KUBECTL_TIMEOUT,
                    )
                    .await
                    .expect("kubectl config view");
                let view: Value = serde_json::from_str(&view).expect("kubectl config view -o json");
                let cluster = &view["clusters"][0]["cluster"];
                let server = cluster["server"]
                    .as_str()
                    .expect("the kubeconfig names a server")
                    .to_string();
                let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
                kubectl
                    .run(&["apply", "-k", &deploy.to_string_lossy()], KUBECTL_TIMEOUT)
                    .await
                    .expect("kubectl apply -k deploy/");
                let backend = Backend::Real {
                    kubeconfig,
                    server,
                    ca_data: cluster["certificate-authority-data"].as_str().map(str::to_string),
                    insecure: cluster["insecure-skip-tls-verify"].as_bool().unwrap_or(false),
                };
                (backend, kubectl)
            }
        };
        let client = match &backend {
            Backend::Fake(fake) => fake.kube_client(),
            Backend::Real { kubeconfig, .. } => {
                let config = kube::config::Kubeconfig::read_from(kubeconfig).expect("read the kubeconfig");
                let config = kube::Config::from_custom_kubeconfig(config, &Default::default())
                    .await
                    .expect("load the kubeconfig");
                kube::Client::try_from(config).expect("kube client")
            }
        };
        if matches!(backend, Backend::Real { .. }) {
            sweep_leftovers(&client, namespace).await;
        }
        TestCluster::with_node(
            Arc::new(backend),
            Arc::new(kubectl),
            client,
            nova_host,
            namespace,
            agent_image,
        )
        .await
    }

    /// Another Node of the same cluster, named after Nova host `nova_host`
    /// (with its own heartbeat, kubelet player and, on the fake, agent pod),
    /// for tests of several agents side by side.
    pub async fn join(&self, nova_host: &str) -> TestCluster {
        TestCluster::with_node(
            self.backend.clone(),
            self.kubectl.clone(),
            self.client.clone(),
            nova_host,
            &self.namespace,
            &self.agent_image,
        )
        .await
    }

    async fn with_node(
        backend: Arc<Backend>,
        kubectl: Arc<Kubectl>,
        client: kube::Client,
        nova_host: &str,
        namespace: &str,
        agent_image: &str,
    ) -> TestCluster {
        let node = format!("{nova_host}.t{}", random_suffix());
        let real = matches!(*backend, Backend::Real { .. });

        let nodes: Api<Node> = Api::all(client.clone());
        let created: Node = serde_json::from_value(json!({
            "metadata": {"name": node, "labels": {
                "kubernetes.io/hostname": node, "kubernetes.io/os": "linux", TEST_LABEL: "true",
            }},
            "spec": {},
        }))
        .expect("node");
        let created = nodes
            .create(&PostParams::default(), &created)
            .await
            .unwrap_or_else(|e| panic!("create node {node}: {e}"));
        let heart = Heartbeat {
            client: client.clone(),
            node: node.clone(),
            uid: created.metadata.uid.clone().unwrap_or_default(),
            since: now(),
            lease: real,
        };
        heart.post_status().await.expect("the node's first status");
        if real {
            heart.renew_lease().await.expect("the node's lease");
        }
        let heartbeat = tokio::spawn(heart.run());
        let kubelet = Arc::new(AtomicBool::new(true));
        let player = tokio::spawn(
            KubeletPlayer {
                pods: Api::all(client.clone()),
                node: node.clone(),
                start: kubelet.clone(),
                finished: HashSet::new(),
                started: HashSet::new(),
            }
            .run(),
        );

        let mut cluster = TestCluster {
            backend,
            client,
            node,
            namespace: namespace.to_string(),
            agent_image: agent_image.to_string(),
            agent_pod: None,
            kubectl,
            kubelet,
            node_deleted: AtomicBool::new(false),
            heartbeat,
            player,
        };
        if !real {
            cluster.add_agent_pod().await;
        }
        cluster
    }

    /// The test's Node name (`<nova host>.t<random>`).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The guard pod's and budget's name (`nova-drain-guard-<node>`).
    pub fn guard(&self) -> String {
        let name = format!("nova-drain-guard-{}", self.node);
        assert!(name.len() <= 63, "short enough not to be hashed: {name}");
        name
    }

    pub fn is_real(&self) -> bool {
        matches!(*self.backend, Backend::Real { .. })
    }

    /// The fake server, for tests of what only it can do (dropped watches, 410 Gone).
    pub fn fake(&self) -> Option<&KubeApi> {
        match &*self.backend {
            Backend::Fake(fake) => Some(fake),
            Backend::Real { .. } => None,
        }
    }

    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    pub fn kubectl(&self) -> &Kubectl {
        &self.kubectl
    }

    /// Whether our kubelet starts new pods on the Node (default on). Off, they
    /// stay Pending as with an image that cannot be pulled; deletions are still finished.
    pub fn set_kubelet(&self, starts_pods: bool) {
        self.kubelet.store(starts_pods, Ordering::SeqCst);
    }

    /// `kubectl cordon NODE`.
    pub async fn cordon(&self) {
        self.kubectl
            .run(&["cordon", &self.node], KUBECTL_TIMEOUT)
            .await
            .expect("kubectl cordon");
    }

    /// `kubectl uncordon NODE`.
    pub async fn uncordon(&self) {
        self.kubectl
            .run(&["uncordon", &self.node], KUBECTL_TIMEOUT)
            .await
            .expect("kubectl uncordon");
    }

    /// The Node, or `None` once it is gone.
    pub async fn node_object(&self) -> Option<Node> {
        Api::<Node>::all(self.client())
            .get_opt(&self.node)
            .await
            .expect("get the node")
    }

    /// The Node's annotation `nova-kubernetes-drain/KEY`.
    pub async fn annotation(&self, key: &str) -> Option<String> {
        self.node_object()
            .await?
            .metadata
            .annotations?
            .remove(&format!("nova-kubernetes-drain/{key}"))
    }

    /// ServiceAccount `name` of the agent's namespace, or `None` once it is gone.
    pub async fn service_account(&self, name: &str) -> Option<ServiceAccount> {
        Api::<ServiceAccount>::namespaced(self.client(), &self.namespace)
            .get_opt(name)
            .await
            .expect("get the serviceaccount")
    }

    /// The agent's namespace, or `None` once it is gone.
    pub async fn namespace_object(&self) -> Option<Namespace> {
        Api::<Namespace>::all(self.client())
            .get_opt(&self.namespace)
            .await
            .expect("get the namespace")
    }

    pub async fn pod(&self, name: &str) -> Option<Pod> {
        Api::<Pod>::namespaced(self.client(), &self.namespace)
            .get_opt(name)
            .await
            .expect("get the pod")
    }

    /// Waits until the guard pod runs (the kubelet player starts it).
    pub async fn wait_guard_running(&self, limit: Duration) {
        super::wait::eventually("the guard pod Running", limit, async || {
            self.pod(&self.guard())
                .await
                .and_then(|p| p.status)
                .and_then(|s| s.phase)
                .filter(|p| p == "Running")
        })
        .await;
    }

    /// Drains the test's Node with the real `kubectl` (and `extra` flags) and
    /// asserts the promise: when drain returns, no VM is left on `nova_host`.
    pub async fn drain_until_empty(&self, lab: &super::openstack::Lab, nova_host: &str, extra: &[&str]) -> Duration {
        let took = self
            .kubectl()
            .drain(self.node(), extra, Duration::from_secs(120))
            .await
            .expect("kubectl drain succeeds");
        assert!(
            lab.servers_on(nova_host).await.is_empty(),
            "drain returned while VMs were still on {nova_host}"
        );
        took
    }

    pub async fn pdb(&self, name: &str) -> Option<PodDisruptionBudget> {
        Api::<PodDisruptionBudget>::namespaced(self.client(), &self.namespace)
            .get_opt(name)
            .await
            .expect("get the budget")
    }

    /// Every Event (events.k8s.io/v1, any namespace) regarding the Node, oldest first.
    pub async fn events(&self) -> Vec<Value> {
        let events: Api<Event> = Api::all(self.client());
        let selector = format!("regarding.name={}", self.node);
        let list = match events.list(&ListParams::default().fields(&selector)).await {
            Ok(list) => list,
            // A server without that field selector: all of them, filtered below.
            Err(kube::Error::Api(s)) if s.code == 400 => {
                events.list(&ListParams::default()).await.expect("list events")
            }
            Err(e) => panic!("list events: {e}"),
        };
        let mut found: Vec<Value> = list
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(self.node.as_str()))
            .map(|e| serde_json::to_value(e).expect("event"))
            .collect();
        found.sort_by_key(|e| {
            let at = |k: &str| e[k].as_str().map(str::to_string);
            at("eventTime").or_else(|| e["metadata"]["creationTimestamp"].as_str().map(str::to_string))
        });
        found
    }

    /// Reasons of [`TestCluster::events`].
    pub async fn reasons(&self) -> Vec<String> {
        self.events()
            .await
            .iter()
            .filter_map(|e| e["reason"].as_str().map(str::to_string))
            .collect()
    }

    /// Writes the agent's kubeconfig, with a fresh token of deploy's
    /// ServiceAccount: on a real cluster its RBAC is what the agent gets; on
    /// the fake (ServiceAccount created if missing) the token is refused once
    /// the ServiceAccount is deleted, as on a real one.
    pub async fn write_agent_kubeconfig(&self, path: &Path) {
        match &*self.backend {
            Backend::Fake(fake) => {
                let token = fake.service_account_token(&self.namespace, SERVICE_ACCOUNT);
                fake.write_kubeconfig_with_token(path, &token);
            }
            Backend::Real {
                server,
                ca_data,
                insecure,
                ..
            } => {
                let token = self
                    .kubectl
                    .run(
                        &["create", "token", SERVICE_ACCOUNT, "-n", &self.namespace],
                        KUBECTL_TIMEOUT,
                    )
                    .await
                    .expect("kubectl create token");
                let trust = match (ca_data, insecure) {
                    (Some(ca), _) => format!("certificate-authority-data: {ca}"),
                    (None, true) => "insecure-skip-tls-verify: true".to_string(),
                    (None, false) => String::new(),
                };
                let text = format!(
                    "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    {trust}\n\
                     users:\n- name: {SERVICE_ACCOUNT}\n  user:\n    token: {}\ncontexts:\n- name: test\n  context:\n    \
                     cluster: test\n    user: {SERVICE_ACCOUNT}\n    namespace: {}\ncurrent-context: test\n",
                    token.trim(),
                    self.namespace,
                );
                std::fs::write(path, text).expect("write the agent's kubeconfig");
            }
        }
    }

    /// A kubeconfig of the cluster's admin (for what an operator runs, such
    /// as `drainer release-guard` after an uninstall): on a real cluster
    /// `DRAINER_TEST_KUBECONFIG` itself, on the fake one without a token.
    pub fn admin_kubeconfig(&self, dir: &Path) -> PathBuf {
        match &*self.backend {
            Backend::Fake(fake) => {
                let path = dir.join("admin-kubeconfig");
                fake.write_kubeconfig(&path);
                path
            }
            Backend::Real { kubeconfig, .. } => kubeconfig.clone(),
        }
    }

    /// Environment and flags of the agent: on the fake, its own pod
    /// (`$POD_NAME`, whose image the guard runs); on a real cluster, where that
    /// pod does not exist, `--guard-image`.
    pub fn agent_identity(&self) -> AgentIdentity {
        match &self.agent_pod {
            Some(pod) => AgentIdentity {
                env: vec![("POD_NAME".to_string(), pod.clone())],
                flags: vec![],
            },
            None => AgentIdentity {
                env: vec![],
                flags: vec!["--guard-image".to_string(), self.agent_image.clone()],
            },
        }
    }

    /// Deletes the Node (and stops its heartbeat and kubelet, which go with it).
    pub async fn delete_node(&self) {
        self.node_deleted.store(true, Ordering::SeqCst);
        self.heartbeat.abort();
        self.player.abort();
        Api::<Node>::all(self.client())
            .delete(&self.node, &DeleteParams::default())
            .await
            .expect("delete the node");
    }

    /// The DaemonSet pod the agent runs in on the fake (drain skips it with `--ignore-daemonsets`).
    async fn add_agent_pod(&mut self) {
        let Backend::Fake(fake) = &*self.backend else {
            return;
        };
        let name = format!("drainer-{}", self.node);
        // One DaemonSet for every Node of the cluster.
        let daemonset = fake
            .objects("apps/v1", "daemonsets")
            .into_iter()
            .find(|d| d["metadata"]["name"] == "drainer")
            .unwrap_or_else(|| fake.add_daemonset(&self.namespace, "drainer"));
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "labels": {"app": "drainer"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "drainer",
                                     "uid": daemonset["metadata"]["uid"], "controller": true}],
            },
            "spec": {"nodeName": self.node, "containers": [{"name": "drainer", "image": self.agent_image}]},
        }))
        .expect("pod");
        Api::<Pod>::namespaced(self.client(), &self.namespace)
            .create(&PostParams::default(), &pod)
            .await
            .expect("create the agent's pod");
        self.agent_pod = Some(name);
    }
}

impl Drop for TestCluster {
    /// On a real cluster: deletes the Node, its guard pod (stripping our
    /// finalizer), budget and Lease, also when the test failed. The fake goes
    /// with its process (and serves on this thread, so it could not answer here).
    fn drop(&mut self) {
        self.heartbeat.abort();
        self.player.abort();
        let Backend::Real { .. } = &*self.backend else {
            return;
        };
        let guard = self.guard();
        let namespace = self.namespace.clone();
        let node = self.node.clone();
        let strip = r#"[{"op":"remove","path":"/metadata/finalizers"}]"#;
        let (pod, pdb) = (format!("pod/{guard}"), format!("poddisruptionbudget/{guard}"));
        let steps: [&[&str]; 4] = [
            &["delete", "node", &node, "--ignore-not-found", "--wait=false"],
            &["patch", "-n", &namespace, "pod", &guard, "--type=json", "-p", strip],
            &[
                "delete",
                "-n",
                &namespace,
                &pod,
                &pdb,
                "--ignore-not-found",
                "--wait=false",
                "--grace-period=0",
                "--force",
            ],
            &[
                "delete",
                "-n",
                "kube-node-lease",
                "lease",
                &node,
                "--ignore-not-found",
                "--wait=false",
            ],
        ];
        for args in steps {
            // Errors are expected (no finalizer left, already gone): clean-up is best effort.
            let _ = self.kubectl.run_blocking(args);
        }
        // The node's place in the queue for evacuation slots, and a slot its
        // killed agent held: the next test's agents need not wait for them to expire.
        let held = format!(
            "jsonpath={{range .items[?(@.spec.holderIdentity==\"{node}\")]}}{{.metadata.name}}{{\" \"}}{{end}}"
        );
        let leases = self
            .kubectl
            .run_blocking(&["get", "leases", "-n", &namespace, "-l", COORDINATION_LABEL, "-o", &held])
            .unwrap_or_default();
        for lease in leases.split_whitespace() {
            let _ = self.kubectl.run_blocking(&[
                "delete",
                "lease",
                "-n",
                &namespace,
                lease,
                "--ignore-not-found",
                "--wait=false",
            ]);
        }
    }
}

/// Deletes the test Nodes of runs that were killed before their clean-up
/// (label [`TEST_LABEL`], Lease not renewed for [`LEFTOVER_AFTER`]) and lets
/// their guards go. Nodes of runs still going renew their Lease and are kept.
async fn sweep_leftovers(client: &kube::Client, namespace: &str) {
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), namespace);
    let Ok(list) = nodes
        .list(&ListParams::default().labels(&format!("{TEST_LABEL}=true")))
        .await
    else {
        return;
    };
    let now = jiff::Timestamp::now();
    for node in list.items {
        let Some(name) = node.metadata.name else { continue };
        let renewed = match leases.get_opt(&name).await {
            Ok(lease) => lease.and_then(|l| l.spec?.renew_time).map(|t| t.0),
            Err(_) => continue,
        };
        let last_sign = renewed.or(node.metadata.creation_timestamp.map(|t| t.0));
        if last_sign.is_some_and(|t| now.duration_since(t).unsigned_abs() < LEFTOVER_AFTER) {
            continue;
        }
        eprintln!("deleting test node {name}, left over by a killed run");
        let _ = nodes.delete(&name, &DeleteParams::default()).await;
        let guard = format!("nova-drain-guard-{name}");
        let strip: json_patch::Patch =
            serde_json::from_value(json!([{"op": "remove", "path": "/metadata/finalizers"}])).expect("patch");
        let _ = pods
            .patch(&guard, &PatchParams::default(), &Patch::<()>::Json(strip))
            .await;
        let _ = pods.delete(&guard, &DeleteParams::default().grace_period(0)).await;
        let _ = budgets.delete(&guard, &DeleteParams::default()).await;
        let _ = leases.delete(&name, &DeleteParams::default()).await;
    }
}

/// Keeps the Node Ready as a kubelet does.
struct Heartbeat {
    client: kube::Client,
    node: String,
    uid: String,
    /// When the node became Ready (the condition's lastTransitionTime).
    since: String,
    /// Renew a Lease too (the fake has no coordination.k8s.io).
    lease: bool,
}

impl Heartbeat {
    async fn run(self) {
        let mut status = tokio::time::interval(STATUS_EVERY);
        let mut lease = tokio::time::interval(LEASE_EVERY);
        status.tick().await;
        lease.tick().await;
        loop {
            tokio::select! {
                _ = status.tick() => {
                    if let Err(e) = self.post_status().await {
                        eprintln!("heartbeat of node {}: status: {e}", self.node);
                    }
                }
                _ = lease.tick(), if self.lease => {
                    if let Err(e) = self.renew_lease().await {
                        eprintln!("heartbeat of node {}: lease: {e}", self.node);
                    }
                }
            }
        }
    }

    /// The Node's conditions (we own them all: no kubelet writes them), as a merge patch of the status.
    async fn post_status(&self) -> Result<(), kube::Error> {
        let now = now();
        let condition = |type_: &str, status: &str, reason: &str, message: &str| {
            json!({"type": type_, "status": status, "reason": reason, "message": message,
                   "lastHeartbeatTime": now, "lastTransitionTime": self.since})
        };
        let patch = json!({"status": {
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
            ],
            "addresses": [{"type": "Hostname", "address": self.node}],
        }});
        Api::<Node>::all(self.client.clone())
            .patch_status(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
    }

    /// `kube-node-lease/<node>`, owned by the Node (so it goes with it), renewed now.
    async fn renew_lease(&self) -> Result<(), kube::Error> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "kube-node-lease");
        let renewed = json!({"spec": {
            "holderIdentity": self.node, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now_micro(),
        }});
        match leases
            .patch(&self.node, &PatchParams::default(), &Patch::Merge(&renewed))
            .await
        {
            Err(kube::Error::Api(status)) if status.code == 404 => {
                let mut lease = renewed;
                lease["metadata"] = json!({
                    "name": self.node,
                    "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": self.node, "uid": self.uid}],
                });
                let lease: Lease = serde_json::from_value(lease).map_err(kube::Error::SerdeError)?;
                leases.create(&PostParams::default(), &lease).await.map(drop)
            }
            other => other.map(drop),
        }
    }
}

/// Plays the kubelet for the pods bound to one Node (see the module doc).
struct KubeletPlayer {
    pods: Api<Pod>,
    node: String,
    start: Arc<AtomicBool>,
    /// UIDs already started, and already finished (terminal status + final DELETE).
    started: HashSet<String>,
    finished: HashSet<String>,
}

impl KubeletPlayer {
    async fn run(mut self) {
        let selector = format!("spec.nodeName={}", self.node);
        loop {
            match self.pods.list(&ListParams::default().fields(&selector)).await {
                Ok(list) => {
                    for pod in list.items {
                        if let Err(e) = self.play(&pod).await {
                            let name = pod.metadata.name.unwrap_or_default();
                            eprintln!("kubelet of node {}: pod {name}: {e}", self.node);
                        }
                    }
                }
                Err(e) => eprintln!("kubelet of node {}: list pods: {e}", self.node),
            }
            tokio::time::sleep(KUBELET_EVERY).await;
        }
    }

    async fn play(&mut self, pod: &Pod) -> Result<(), kube::Error> {
        let (Some(name), Some(ns), Some(uid)) = (
            pod.metadata.name.as_deref(),
            pod.metadata.namespace.as_deref(),
            pod.metadata.uid.as_deref(),
        ) else {
            return Ok(());
        };
        let pods: Api<Pod> = Api::namespaced(self.pods.clone().into_client(), ns);
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .unwrap_or("Pending");
        let value = serde_json::to_value(pod).map_err(kube::Error::SerdeError)?;
        if pod.metadata.deletion_timestamp.is_some() {
            if self.finished.contains(uid) {
                return Ok(());
            }
            if !matches!(phase, "Failed" | "Succeeded") {
                // The containers stopped: the terminal status first.
                let patch = with_version(terminated_status(&value), pod);
                match pods
                    .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if matches!(s.code, 404 | 409) => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
            // Then the kubelet's final DELETE: finalizers, if any, keep the pod.
            let last = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(uid.to_string()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match pods.delete(name, &last).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if matches!(s.code, 404 | 409) => {}
                Err(e) => return Err(e),
            }
            self.finished.insert(uid.to_string());
            return Ok(());
        }
        if phase == "Pending" && !self.started.contains(uid) && self.start.load(Ordering::SeqCst) {
            let patch = with_version(running_status(&value), pod);
            match pods
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.started.insert(uid.to_string());
                }
                Err(kube::Error::Api(s)) if matches!(s.code, 404 | 409) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Makes a merge patch conditional on the version read (a lost race answers 409).
fn with_version(mut patch: Value, pod: &Pod) -> Value {
    patch["metadata"] = json!({"resourceVersion": pod.metadata.resource_version});
    patch
}

fn pod_conditions(status: &str) -> Value {
    let now = now();
    let ready = ["Ready", "ContainersReady"];
    let conditions: Vec<Value> = [
        "PodReadyToStartContainers",
        "Initialized",
        "Ready",
        "ContainersReady",
        "PodScheduled",
    ]
    .iter()
    .map(|t| {
        let s = if ready.contains(t) { status } else { "True" };
        let mut c = json!({"type": t, "status": s, "lastProbeTime": null, "lastTransitionTime": now});
        if s == "False" {
            c["reason"] = json!("PodCompleted");
        }
        c
    })
    .collect();
    Value::Array(conditions)
}

fn containers(pod: &Value) -> Vec<Value> {
    pod.pointer("/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// The status a kubelet posts once the pod's containers run.
fn running_status(pod: &Value) -> Value {
    let now = now();
    let statuses: Vec<Value> = containers(pod)
        .iter()
        .map(|c| {
            json!({"name": c["name"], "image": c["image"], "imageID": "", "ready": true, "started": true,
                   "restartCount": 0, "state": {"running": {"startedAt": now}}})
        })
        .collect();
    json!({"status": {
        "phase": "Running", "startTime": now, "conditions": pod_conditions("True"), "containerStatuses": statuses,
    }})
}

/// The status a kubelet posts once it stopped a deleted pod's containers
/// (SIGTERM for ones that ran; never-started ones are unknown).
fn terminated_status(pod: &Value) -> Value {
    let now = now();
    let old = pod.pointer("/status/containerStatuses").and_then(Value::as_array);
    let statuses: Vec<Value> = containers(pod)
        .iter()
        .map(|c| {
            let started = old
                .and_then(|o| o.iter().find(|s| s["name"] == c["name"]))
                .and_then(|s| s.pointer("/state/running/startedAt").cloned());
            let terminated = match started {
                Some(at) => json!({"exitCode": 143, "reason": "Error", "startedAt": at, "finishedAt": now}),
                None => json!({"exitCode": 137, "reason": "ContainerStatusUnknown",
                               "message": "The container could not be located when the pod was deleted."}),
            };
            json!({"name": c["name"], "image": c["image"], "imageID": "", "ready": false, "started": false,
                   "restartCount": 0, "state": {"terminated": terminated}})
        })
        .collect();
    json!({"status": {"phase": "Failed", "conditions": pod_conditions("False"), "containerStatuses": statuses}})
}

fn now() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// A MicroTime, as Leases need.
fn now_micro() -> String {
    let now = jiff::Timestamp::now();
    format!("{}.{:06}Z", now.strftime("%Y-%m-%dT%H:%M:%S"), now.subsec_microsecond())
}

/// Eight hex digits, different for every call.
fn random_suffix() -> String {
    use std::hash::BuildHasher;
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let hash = std::collections::hash_map::RandomState::new().hash_one((std::process::id(), n, Instant::now()));
    format!("{:08x}", hash as u32)
}
