//! The evacuation's progress recorded on the Node itself, so that a restarted
//! agent (or an operator with `kubectl describe node`) knows where it stands.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use serde_json::{Value, json};

/// Prefix of every annotation we write.
pub const PREFIX: &str = "nova-kubernetes-drain/";

/// Where the evacuation of a node stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    /// Nothing in progress; the service is ours to leave alone.
    #[default]
    Idle,
    Evacuating,
    /// The hypervisor is empty and disabled; the guard is released.
    Evacuated,
    /// The last run left VMs behind; it is tried again later while cordoned.
    Failed,
    TimedOut,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "Idle",
            Phase::Evacuating => "Evacuating",
            Phase::Evacuated => "Evacuated",
            Phase::Failed => "Failed",
            Phase::TimedOut => "TimedOut",
        }
    }

    fn parse(text: &str) -> Phase {
        match text {
            "Evacuating" => Phase::Evacuating,
            "Evacuated" => Phase::Evacuated,
            "Failed" => Phase::Failed,
            "TimedOut" => Phase::TimedOut,
            _ => Phase::Idle,
        }
    }

    /// Every phase, for metrics that show one of them as 1.
    pub const ALL: [Phase; 5] = [
        Phase::Idle,
        Phase::Evacuating,
        Phase::Evacuated,
        Phase::Failed,
        Phase::TimedOut,
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
                }
            }
        })
    }
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
    fn a_node_without_annotations_is_idle() {
        assert_eq!(DrainState::from_node(&Node::default()), DrainState::default());
    }
}
