//! The evacuation's progress recorded on the Node itself, so that a restarted
//! agent (or an operator with `kubectl describe node`) knows where it stands.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use serde_json::{Value, json};

/// Prefix of every annotation we write.
pub const PREFIX: &str = "nova-kubernetes-drain/";
/// The operator's annotation (not ours to write) that sets what happens to
/// the node's VMs that no tag of their own decides: `live-migrate`,
/// `cold-migrate`, `stop` or `leave`.
pub const VM_ACTION: &str = "nova-kubernetes-drain/vm-action";

/// The node's [`VM_ACTION`], as written.
pub fn vm_action(node: &Node) -> Option<&str> {
    node.metadata.annotations.as_ref()?.get(VM_ACTION).map(String::as_str)
}

/// Where the evacuation of a node stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    /// Nothing in progress; the service is ours to leave alone.
    #[default]
    Idle,
    /// Cordoned (or asked by hand), the service disabled, waiting for one
    /// of the cluster's evacuation slots.
    Waiting,
    Evacuating,
    /// The hypervisor is empty and disabled; the guard is released.
    Evacuated,
    /// The last run left VMs behind; it is tried again later while cordoned.
    Failed,
    TimedOut,
    /// The Evacuation driving it is paused: its plan is written, nothing changed in Nova.
    Paused,
    /// The Evacuation driving it was deleted: no new run while the node stays
    /// cordoned (uncordon, or make an Evacuation by hand, to go on).
    Cancelled,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "Idle",
            Phase::Waiting => "Waiting",
            Phase::Evacuating => "Evacuating",
            Phase::Evacuated => "Evacuated",
            Phase::Failed => "Failed",
            Phase::TimedOut => "TimedOut",
            Phase::Paused => "Paused",
            Phase::Cancelled => "Cancelled",
        }
    }

    fn parse(text: &str) -> Phase {
        match text {
            "Waiting" => Phase::Waiting,
            "Evacuating" => Phase::Evacuating,
            "Evacuated" => Phase::Evacuated,
            "Failed" => Phase::Failed,
            "TimedOut" => Phase::TimedOut,
            "Paused" => Phase::Paused,
            "Cancelled" => Phase::Cancelled,
            _ => Phase::Idle,
        }
    }

    /// Every phase, for metrics that show one of them as 1.
    pub const ALL: [Phase; 8] = [
        Phase::Idle,
        Phase::Waiting,
        Phase::Evacuating,
        Phase::Evacuated,
        Phase::Failed,
        Phase::TimedOut,
        Phase::Paused,
        Phase::Cancelled,
    ];
}

/// The annotations as a value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DrainState {
    pub phase: Phase,
    /// RFC 3339 time the current evacuation started.
    pub started_at: Option<String>,
    /// Whether we disabled the nova-compute service (and so may enable it).
    pub disabled_by_us: bool,
    pub vms_total: Option<usize>,
    pub vms_left: Option<usize>,
    pub last_error: Option<String>,
    /// Failed runs in a row while cordoned: each doubles the wait before the next.
    pub failures: u32,
    /// RFC 3339 time of the next try after a failure, where an operator looks for it.
    pub next_retry_at: Option<String>,
    /// The Evacuation object recording the current (or last) run, if one was created.
    pub evacuation: Option<String>,
}

fn key(name: &str) -> String {
    format!("{PREFIX}{name}")
}

impl DrainState {
    /// Reads the state from a Node's annotations; absent or unknown values mean Idle.
    pub fn from_node(node: &Node) -> DrainState {
        let empty = BTreeMap::new();
        let annotations = node.metadata.annotations.as_ref().unwrap_or(&empty);
        let get = |name: &str| annotations.get(&key(name)).cloned();
        DrainState {
            phase: get("phase").map(|p| Phase::parse(&p)).unwrap_or_default(),
            started_at: get("started-at"),
            disabled_by_us: get("disabled-by-us").is_some_and(|v| v == "true"),
            vms_total: get("vms-total").and_then(|v| v.parse().ok()),
            vms_left: get("vms-left").and_then(|v| v.parse().ok()),
            last_error: get("last-error"),
            failures: get("failures").and_then(|v| v.parse().ok()).unwrap_or(0),
            next_retry_at: get("next-retry-at"),
            evacuation: get("evacuation"),
        }
    }

    /// A JSON merge patch writing this state (absent values remove their annotation).
    pub fn to_merge_patch(&self) -> Value {
        let text = |v: &Option<String>| v.as_ref().map_or(Value::Null, |s| json!(s));
        let number = |v: Option<usize>| v.map_or(Value::Null, |n| json!(n.to_string()));
        let last_error = self
            .last_error
            .as_ref()
            .map(|e| e.chars().take(1024).collect::<String>());
        json!({
            "metadata": {
                "annotations": {
                    key("phase"): self.phase.as_str(),
                    key("started-at"): text(&self.started_at),
                    key("disabled-by-us"): if self.disabled_by_us { json!("true") } else { Value::Null },
                    key("vms-total"): number(self.vms_total),
                    key("vms-left"): number(self.vms_left),
                    key("last-error"): text(&last_error),
                    key("failures"): if self.failures > 0 { json!(self.failures.to_string()) } else { Value::Null },
                    key("next-retry-at"): text(&self.next_retry_at),
                    key("evacuation"): text(&self.evacuation),
                }
            }
        })
    }
}

/// What an operator (or another controller) can change about a Node: its
/// labels, annotations other than ours, and spec (taints, unschedulable); not
/// the status the kubelet rewrites every few seconds. A change of it while
/// failed runs back off starts the backoff over (`kubectl annotate node` is
/// the way to ask for a try sooner).
pub fn operator_view(node: &Node) -> String {
    let theirs: BTreeMap<&String, &String> = node
        .metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(key, _)| !key.starts_with(PREFIX) || key.as_str() == VM_ACTION)
        .collect();
    json!({
        "labels": node.metadata.labels,
        "annotations": theirs,
        "spec": node.spec,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_node_annotations() {
        let state = DrainState {
            phase: Phase::Evacuating,
            started_at: Some("2026-11-21T10:00:00Z".into()),
            disabled_by_us: true,
            vms_total: Some(7),
            vms_left: Some(3),
            last_error: None,
            failures: 2,
            next_retry_at: Some("2026-11-21T10:04:00Z".into()),
            evacuation: Some("host1-20261121-100000".into()),
        };
        let patch = state.to_merge_patch();
        let annotations: BTreeMap<String, String> = patch["metadata"]["annotations"]
            .as_object()
            .unwrap()
            .iter()
            .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
            .collect();
        let mut node = Node::default();
        node.metadata.annotations = Some(annotations);
        assert_eq!(DrainState::from_node(&node), state);
        assert!(patch["metadata"]["annotations"]["nova-kubernetes-drain/last-error"].is_null());
    }

    #[test]
    fn the_operator_view_leaves_out_our_annotations_and_the_status() {
        let mut node = Node::default();
        let before = operator_view(&node);
        node.metadata.annotations = Some(BTreeMap::from([(key("phase"), "Failed".to_string())]));
        node.status = Some(Default::default());
        assert_eq!(operator_view(&node), before);
        node.metadata
            .annotations
            .get_or_insert_default()
            .insert("example.org/retry".into(), "1".into());
        assert_ne!(operator_view(&node), before);
    }

    #[test]
    fn a_node_without_annotations_is_idle() {
        assert_eq!(DrainState::from_node(&Node::default()), DrainState::default());
    }
}
