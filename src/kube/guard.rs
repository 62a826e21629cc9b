//! The guard that makes `kubectl drain` wait for the VMs: a pause pod on the
//! node (not part of the DaemonSet, owned by the Node so drain evicts it
//! without `--force`) held by a PodDisruptionBudget that forbids its eviction
//! while VMs remain. Releasing the guard deletes the budget, so drain's next
//! eviction retry succeeds.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, Node, Pod, PodSpec, SeccompProfile, SecurityContext, Toleration,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use tracing::info;

/// Label on the guard pod and its budget naming the node they guard.
pub const NODE_LABEL: &str = "nova-kubernetes-drain/node";
/// Label on every guard budget, so a `PodDisruptionBudgetAtLimit` alert can exclude them.
pub const GUARD_LABEL: &str = "nova-kubernetes-drain/guard";

/// The guard pod and budget of one node, in the agent's namespace.
pub struct Guard {
    pods: Api<Pod>,
    budgets: Api<PodDisruptionBudget>,
    node: String,
    name: String,
    image: String,
}

impl Guard {
    pub fn new(client: Client, namespace: &str, node: &str, image: &str) -> Guard {
        Guard {
            pods: Api::namespaced(client.clone(), namespace),
            budgets: Api::namespaced(client, namespace),
            node: node.to_string(),
            name: guard_name(node),
            image: image.to_string(),
        }
    }

    /// Name of the guard pod and of its budget.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Puts the budget and the pod in place if missing; a pod still terminating
    /// after an eviction is left to go and recreated on a later call.
    pub async fn ensure(&self, node: &Node) -> Result<(), kube::Error> {
        if self.budgets.get_opt(&self.name).await?.is_none() {
            create_ignoring_conflict(&self.budgets, &self.budget(node)).await?;
            info!(budget = %self.name, "guard budget created");
        }
        if self.pods.get_opt(&self.name).await?.is_none() {
            create_ignoring_conflict(&self.pods, &self.pod(node)).await?;
            info!(pod = %self.name, "guard pod created");
        }
        Ok(())
    }

    /// Deletes the budget: the guard pod may now be evicted and drain can finish.
    pub async fn release(&self) -> Result<bool, kube::Error> {
        match self.budgets.delete(&self.name, &DeleteParams::default()).await {
            Ok(_) => {
                info!(budget = %self.name, "guard released");
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".to_string(), "nova-drain-guard".to_string()),
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
                max_unavailable: Some(IntOrString::Int(0)),
                selector: Some(LabelSelector {
                    match_labels: Some(BTreeMap::from([(NODE_LABEL.to_string(), label_value(&self.node))])),
                    match_expressions: None,
                }),
                ..PodDisruptionBudgetSpec::default()
            }),
            status: None,
        }
    }

    fn pod(&self, node: &Node) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(self.labels()),
                annotations: Some(BTreeMap::from([(
                    "kubernetes.io/description".to_string(),
                    "Keeps `kubectl drain` waiting until nova-kubernetes-drain has moved every VM off this node's hypervisor"
                        .to_string(),
                )])),
                owner_references: Some(self.owner(node)),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(self.node.clone()),
                // Runs while the node is cordoned, like a DaemonSet pod would.
                tolerations: Some(vec![Toleration {
                    operator: Some("Exists".into()),
                    ..Toleration::default()
                }]),
                priority_class_name: None,
                termination_grace_period_seconds: Some(0),
                automount_service_account_token: Some(false),
                enable_service_links: Some(false),
                containers: vec![Container {
                    name: "pause".into(),
                    image: Some(self.image.clone()),
                    // Meets the `restricted` Pod Security Standard.
                    security_context: Some(SecurityContext {
                        allow_privilege_escalation: Some(false),
                        read_only_root_filesystem: Some(true),
                        run_as_non_root: Some(true),
                        run_as_user: Some(65535),
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

/// `nova-drain-guard-NODE`, shortened with a hash when the node name is long.
pub fn guard_name(node: &str) -> String {
    let name = format!("nova-drain-guard-{node}");
    if name.len() <= 63 {
        name
    } else {
        format!("nova-drain-guard-{}-{:08x}", &node[..node.len().min(36)], fnv(node))
    }
}

/// A label value (at most 63 characters) naming the node.
fn label_value(node: &str) -> String {
    if node.len() <= 63 {
        node.to_string()
    } else {
        format!("{}-{:08x}", &node[..54], fnv(node))
    }
}

fn fnv(text: &str) -> u32 {
    text.bytes().fold(0x811c9dc5u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x01000193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_kubernetes_limits() {
        assert_eq!(guard_name("compute-1"), "nova-drain-guard-compute-1");
        let long = "a".repeat(200);
        assert!(guard_name(&long).len() <= 63);
        assert!(label_value(&long).len() <= 63);
        assert_ne!(guard_name(&format!("{long}x")), guard_name(&format!("{long}y")));
    }
}
