//! The guard that makes `kubectl drain` wait for the VMs.
//!
//! A pod on the node (not part of the DaemonSet; owned by the Node, so drain
//! evicts it without `--force` and it goes when the Node goes) that carries a
//! finalizer of ours, [`FINALIZER`], removed only once the hypervisor is empty.
//! `kubectl drain` (like most drain tools) waits after an eviction or a delete
//! until the pod has disappeared, and a pod with a finalizer does not disappear:
//! so drain waits whatever happens to the pod. Evicted while Running, deleted
//! with `--disable-eviction`, evicted at once because it never became Running
//! (the eviction API ignores budgets for pods that are not Running), deleted by
//! hand, or the agent restarted meanwhile: the finalizer holds it all the same.
//!
//! A PodDisruptionBudget with an integer `minAvailable: 1` sits beside it: while
//! the pod is Running it makes the eviction itself answer 429, so drain keeps
//! retrying and the pod keeps running until the hypervisor is empty (the
//! disruption controller computes an integer `minAvailable` from the selected
//! pods alone; a `maxUnavailable` would need the Node's scale subresource, which
//! does not exist, and the budget would only hold because its status is broken).
//!
//! Releasing the guard deletes the budget and removes the finalizer, so drain's
//! next eviction goes through and the pod disappears.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, LocalObjectReference, Node, Pod, PodSpec, ResourceRequirements, SeccompProfile,
    SecurityContext, Toleration,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tracing::info;

/// Label on the guard pod and its budget naming the node they guard.
pub const NODE_LABEL: &str = "nova-kubernetes-drain/node";
/// Label on every guard budget, so a `PodDisruptionBudgetAtLimit` alert can exclude them.
pub const GUARD_LABEL: &str = "nova-kubernetes-drain/guard";
/// Our finalizer on the guard pod: the pod cannot disappear, and so `kubectl
/// drain` cannot return, until the agent has seen the hypervisor empty.
pub const FINALIZER: &str = "nova-kubernetes-drain/hypervisor-empty";
/// The argument that makes the agent's binary run as the guard (see `drainer guard`).
pub const GUARD_COMMAND: &str = "guard";
/// `app.kubernetes.io/name` of every guard pod.
const GUARD_APP: &str = "nova-drain-guard";

/// The guard pod as the agent judges it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuardPod {
    /// Not there (never created, or gone after its finalizer was removed).
    Missing,
    /// Being deleted (evicted, deleted, or its Node deleted); `held` while our finalizer is on it.
    Terminating { held: bool },
    /// There and not being deleted.
    Present {
        held: bool,
        /// Running and Ready: only then does the budget protect it from eviction.
        running: bool,
        /// Why it is not running, as the kubelet says (`ImagePullBackOff`, `Pending` ...).
        waiting: Option<String>,
        created_at: Option<jiff::Timestamp>,
    },
}

impl GuardPod {
    /// Reads what matters from the pod (or its absence).
    pub fn of(pod: Option<&Pod>) -> GuardPod {
        let Some(pod) = pod else {
            return GuardPod::Missing;
        };
        let held = pod
            .metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| f.iter().any(|f| f == FINALIZER));
        if pod.metadata.deletion_timestamp.is_some() {
            return GuardPod::Terminating { held };
        }
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let running = phase == "Running" && ready;
        let waiting = if running {
            None
        } else {
            let container_reason = status.and_then(|s| s.container_statuses.as_ref()).and_then(|c| {
                c.iter()
                    .find_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone())
            });
            Some(container_reason.unwrap_or_else(|| {
                if phase == "Running" {
                    "NotReady".into()
                } else {
                    phase.into()
                }
            }))
        };
        GuardPod::Present {
            held,
            running,
            waiting,
            created_at: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
        }
    }
}

/// Why the guard could not be put in place or released.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error(transparent)]
    Finalizer(#[from] super::finalizer::FinalizerError),
}

/// The guard pod and budget of one node, in the agent's namespace.
pub struct Guard {
    pods: Api<Pod>,
    budgets: Api<PodDisruptionBudget>,
    node: String,
    name: String,
}

/// What the guard pod runs: the agent's own image, which the node already has.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GuardImage {
    pub image: String,
    /// The agent pod's pull secrets, in case the node must pull the image again.
    pub pull_secrets: Vec<LocalObjectReference>,
}

impl GuardImage {
    /// The image of the agent's own container (`drainer`, else the first one) in its pod.
    pub async fn of_own_pod(client: Client, namespace: &str, pod: &str) -> Result<GuardImage, String> {
        let pods: Api<Pod> = Api::namespaced(client, namespace);
        let own = pods
            .get(pod)
            .await
            .map_err(|e| format!("cannot read the agent's own pod {namespace}/{pod} for its image: {e}"))?;
        let spec = own.spec.unwrap_or_default();
        let image = spec
            .containers
            .iter()
            .find(|c| c.name == "drainer")
            .or(spec.containers.first())
            .and_then(|c| c.image.clone())
            .ok_or_else(|| format!("the agent's own pod {namespace}/{pod} names no image"))?;
        Ok(GuardImage {
            image,
            pull_secrets: spec.image_pull_secrets.unwrap_or_default(),
        })
    }
}

impl Guard {
    pub fn new(client: Client, namespace: &str, node: &str) -> Guard {
        Guard {
            pods: Api::namespaced(client.clone(), namespace),
            budgets: Api::namespaced(client, namespace),
            node: node.to_string(),
            name: guard_name(node),
        }
    }

    /// Name of the guard pod and of its budget.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node this guard holds drains of.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Every guard in `namespace` that still holds anything: a pod with our
    /// finalizer, or a budget of ours. Named by the node the pod is bound to
    /// (or the budget's node label).
    pub async fn all_in(client: Client, namespace: &str) -> Result<Vec<Guard>, kube::Error> {
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), namespace);
        let mut guards: BTreeMap<String, String> = BTreeMap::new();
        for pod in pods
            .list(&ListParams::default().labels(&format!("app.kubernetes.io/name={GUARD_APP}")))
            .await?
        {
            let held = pod.metadata.finalizers.iter().flatten().any(|f| f == FINALIZER);
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            if let (true, Some(name), Some(node)) = (held, pod.metadata.name, node) {
                guards.insert(name, node);
            }
        }
        for budget in budgets.list(&ListParams::default().labels(GUARD_LABEL)).await? {
            let node = budget.metadata.labels.as_ref().and_then(|l| l.get(NODE_LABEL)).cloned();
            if let (Some(name), Some(node)) = (budget.metadata.name, node) {
                guards.entry(name).or_insert(node);
            }
        }
        Ok(guards
            .into_iter()
            .map(|(name, node)| Guard {
                pods: pods.clone(),
                budgets: budgets.clone(),
                node,
                name,
            })
            .collect())
    }

    /// Whether our finalizer or our budget is still there.
    pub async fn holds(&self) -> Result<bool, kube::Error> {
        let finalized = self
            .pods
            .get_opt(&self.name)
            .await?
            .is_some_and(|pod| pod.metadata.finalizers.iter().flatten().any(|f| f == FINALIZER));
        Ok(finalized || self.budgets.get_opt(&self.name).await?.is_some())
    }

    /// Puts the budget and the finalized pod in place. A pod still terminating is
    /// left alone: it is created again once it is gone (the pod watch says when).
    pub async fn ensure(&self, node: &Node, image: &GuardImage, current: &GuardPod) -> Result<(), GuardError> {
        match self.budgets.get_opt(&self.name).await? {
            None => {
                create_ignoring_conflict(&self.budgets, &self.budget(node)).await?;
                info!(budget = %self.name, "guard budget created");
            }
            Some(budget)
                if budget.spec.as_ref().and_then(|s| s.min_available.as_ref()) != Some(&IntOrString::Int(1)) =>
            {
                // A budget of an older agent (`maxUnavailable: 0`, which the disruption
                // controller cannot compute for a Node-owned pod): set ours.
                let patch = json!({"spec": {"minAvailable": 1, "maxUnavailable": null}});
                self.budgets
                    .patch(&self.name, &PatchParams::default(), &Patch::Merge(patch))
                    .await?;
                info!(budget = %self.name, "guard budget set to minAvailable: 1");
            }
            Some(_) => {}
        }
        match current {
            GuardPod::Missing => {
                create_ignoring_conflict(&self.pods, &self.pod(node, image)).await?;
                info!(pod = %self.name, "guard pod created");
            }
            GuardPod::Present { held: false, .. } => {
                self.add_finalizer().await?;
                info!(pod = %self.name, "finalizer put on the guard pod");
            }
            GuardPod::Present { held: true, .. } | GuardPod::Terminating { .. } => {}
        }
        Ok(())
    }

    /// Lets drain finish: deletes the budget and takes our finalizer off the pod.
    pub async fn release(&self) -> Result<(), GuardError> {
        match self.budgets.delete(&self.name, &DeleteParams::default()).await {
            Ok(_) => info!(budget = %self.name, "guard budget deleted"),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        self.remove_finalizer().await
    }

    async fn remove_finalizer(&self) -> Result<(), GuardError> {
        if super::finalizer::remove(&self.pods, &self.name, FINALIZER).await? {
            info!(pod = %self.name, "guard pod's finalizer removed");
        }
        Ok(())
    }

    async fn add_finalizer(&self) -> Result<(), GuardError> {
        super::finalizer::add(&self.pods, &self.name, FINALIZER).await?;
        Ok(())
    }

    fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".to_string(), GUARD_APP.to_string()),
            (NODE_LABEL.to_string(), label_value(&self.node)),
        ])
    }

    fn owner(&self, node: &Node) -> Vec<OwnerReference> {
        vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: self.node.clone(),
            uid: node.metadata.uid.clone().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: None,
        }]
    }

    fn budget(&self, node: &Node) -> PodDisruptionBudget {
        let mut labels = self.labels();
        labels.insert(GUARD_LABEL.to_string(), "true".to_string());
        PodDisruptionBudget {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(labels),
                owner_references: Some(self.owner(node)),
                ..ObjectMeta::default()
            },
            spec: Some(PodDisruptionBudgetSpec {
                min_available: Some(IntOrString::Int(1)),
                selector: Some(LabelSelector {
                    match_labels: Some(self.labels()),
                    match_expressions: None,
                }),
                ..PodDisruptionBudgetSpec::default()
            }),
            status: None,
        }
    }

    fn pod(&self, node: &Node, image: &GuardImage) -> Pod {
        let tiny = |cpu: &str, memory: &str| {
            Some(BTreeMap::from([
                ("cpu".to_string(), Quantity(cpu.into())),
                ("memory".to_string(), Quantity(memory.into())),
            ]))
        };
        Pod {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(self.labels()),
                annotations: Some(BTreeMap::from([(
                    "kubernetes.io/description".to_string(),
                    format!(
                        "Keeps `kubectl drain` waiting until nova-kubernetes-drain has moved every VM off this node's \
                         hypervisor. If its agent is gone for good, release it with `drainer release-guard {}` \
                         (it refuses while Nova lists servers on the host; without the binary, see \"The guard\" \
                         in the project's deploy/README.md: remove only the finalizer {FINALIZER})",
                        self.node
                    ),
                )])),
                owner_references: Some(self.owner(node)),
                finalizers: Some(vec![FINALIZER.to_string()]),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(self.node.clone()),
                // Runs while the node is cordoned, like a DaemonSet pod would.
                tolerations: Some(vec![Toleration {
                    operator: Some("Exists".into()),
                    ..Toleration::default()
                }]),
                termination_grace_period_seconds: Some(0),
                automount_service_account_token: Some(false),
                enable_service_links: Some(false),
                image_pull_secrets: Some(image.pull_secrets.clone()).filter(|s| !s.is_empty()),
                containers: vec![Container {
                    name: "guard".into(),
                    image: Some(image.image.clone()),
                    image_pull_policy: Some("IfNotPresent".into()),
                    args: Some(vec![GUARD_COMMAND.into()]),
                    resources: Some(ResourceRequirements {
                        requests: tiny("1m", "4Mi"),
                        limits: tiny("10m", "16Mi"),
                        ..ResourceRequirements::default()
                    }),
                    // Meets the `restricted` Pod Security Standard.
                    security_context: Some(SecurityContext {
                        allow_privilege_escalation: Some(false),
                        read_only_root_filesystem: Some(true),
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        capabilities: Some(Capabilities {
                            drop: Some(vec!["ALL".into()]),
                            add: None,
                        }),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            localhost_profile: None,
                        }),
                        ..SecurityContext::default()
                    }),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: None,
        }
    }
}

async fn create_ignoring_conflict<K>(api: &Api<K>, object: &K) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    match api.create(&PostParams::default(), object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// `nova-drain-guard-NODE`, shortened with a hash when the node name is long:
/// at most 63 characters and a valid DNS-1123 name (pod and budget) for every
/// Node name the API server accepts. The cut never leaves a `.` or `-` before
/// the hash, which would make a label of the name start or end with one.
pub fn guard_name(node: &str) -> String {
    let name = format!("nova-drain-guard-{node}");
    if name.len() <= 63 {
        name
    } else {
        let kept: String = node.chars().take(36).collect();
        let kept = kept.trim_end_matches(['.', '-']);
        format!("nova-drain-guard-{kept}-{:08x}", fnv(node))
    }
}

/// A label value (at most 63 characters) naming the node.
pub(super) fn label_value(node: &str) -> String {
    if node.len() <= 63 {
        node.to_string()
    } else {
        let kept: String = node.chars().take(54).collect();
        format!("{kept}-{:08x}", fnv(node))
    }
}

pub(super) fn fnv(text: &str) -> u32 {
    text.bytes().fold(0x811c9dc5u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x01000193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStateWaiting, ContainerStatus, PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    /// A DNS-1123 subdomain as the API server validates Pod and budget names.
    fn is_dns1123_subdomain(name: &str) -> bool {
        name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
    }

    /// A label value as the API server validates it.
    fn is_label_value(value: &str) -> bool {
        value.len() <= 63
            && (value.is_empty()
                || (value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                    && value.starts_with(|c: char| c.is_ascii_alphanumeric())
                    && value.ends_with(|c: char| c.is_ascii_alphanumeric())))
    }

    proptest::proptest! {
        /// Every Node name the API server accepts (a DNS-1123 subdomain) gives valid guard names.
        #[test]
        fn guard_names_are_valid_for_every_node_name(
            labels in proptest::collection::vec("[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", 1..6)
        ) {
            let node = labels.join(".");
            proptest::prop_assume!(node.len() <= 253);
            let name = guard_name(&node);
            proptest::prop_assert!(name.len() <= 63, "{name}");
            proptest::prop_assert!(is_dns1123_subdomain(&name), "{name} from {node}");
            proptest::prop_assert!(is_label_value(&label_value(&node)), "{node}");
        }
    }

    #[test]
    fn names_fit_kubernetes_limits() {
        let cut_at_a_dot = format!("{}.{}", "a".repeat(35), "b".repeat(60));
        assert!(
            is_dns1123_subdomain(&guard_name(&cut_at_a_dot)),
            "{}",
            guard_name(&cut_at_a_dot)
        );
        let cut_at_a_dash = format!("{}-{}", "a".repeat(35), "b".repeat(60));
        assert!(is_dns1123_subdomain(&guard_name(&cut_at_a_dash)));
        assert_eq!(guard_name("compute-1"), "nova-drain-guard-compute-1");
        let long = "a".repeat(200);
        assert!(guard_name(&long).len() <= 63);
        assert!(label_value(&long).len() <= 63);
        assert_ne!(guard_name(&format!("{long}x")), guard_name(&format!("{long}y")));
    }

    fn guard(finalizers: &[&str]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                finalizers: Some(finalizers.iter().map(|f| f.to_string()).collect()),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    #[test]
    fn a_pod_is_judged_by_its_finalizer_deletion_and_readiness() {
        assert_eq!(GuardPod::of(None), GuardPod::Missing);

        let mut pulling = guard(&[FINALIZER]);
        pulling.status = Some(PodStatus {
            phase: Some("Pending".into()),
            container_statuses: Some(vec![ContainerStatus {
                state: Some(ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some("ImagePullBackOff".into()),
                        message: None,
                    }),
                    ..ContainerState::default()
                }),
                ..ContainerStatus::default()
            }]),
            ..PodStatus::default()
        });
        assert!(matches!(
            GuardPod::of(Some(&pulling)),
            GuardPod::Present { held: true, running: false, waiting: Some(w), .. } if w == "ImagePullBackOff"
        ));

        let mut running = guard(&["other.example/keep"]);
        running.status = Some(PodStatus {
            phase: Some("Running".into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        });
        assert!(matches!(
            GuardPod::of(Some(&running)),
            GuardPod::Present {
                held: false,
                running: true,
                waiting: None,
                ..
            }
        ));

        running.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(GuardPod::of(Some(&running)), GuardPod::Terminating { held: false });
    }

    #[tokio::test]
    async fn the_guard_pod_holds_drain_and_meets_restricted() {
        let guard = Guard {
            pods: Api::namespaced(dummy_client(), "nova-drain"),
            budgets: Api::namespaced(dummy_client(), "nova-drain"),
            node: "compute-1".into(),
            name: guard_name("compute-1"),
        };
        let node = Node {
            metadata: ObjectMeta {
                name: Some("compute-1".into()),
                uid: Some("u1".into()),
                ..ObjectMeta::default()
            },
            ..Node::default()
        };
        let image = GuardImage {
            image: "registry.example/nova-kubernetes-drain:1.2.3".into(),
            pull_secrets: vec![],
        };
        let pod = guard.pod(&node, &image);
        assert_eq!(pod.metadata.finalizers, Some(vec![FINALIZER.to_string()]));
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.controller), ("Node", Some(true)));
        let spec = pod.spec.unwrap();
        assert_eq!(spec.image_pull_secrets, None);
        let container = &spec.containers[0];
        assert_eq!(container.image.as_deref(), Some(image.image.as_str()));
        assert_eq!(container.args, Some(vec!["guard".to_string()]));
        let security = container.security_context.as_ref().unwrap();
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        let budget = guard.budget(&node).spec.unwrap();
        assert_eq!(budget.min_available, Some(IntOrString::Int(1)));
        assert_eq!(budget.max_unavailable, None);
        assert_eq!(budget.selector.unwrap().match_labels, pod.metadata.labels);
    }

    fn dummy_client() -> Client {
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        Client::try_from(config).unwrap()
    }
}
