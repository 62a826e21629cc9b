//! Memory relief's decisions, plain functions over what the task read:
//! the node's mode, whether it is in maintenance, which hosts are no
//! destination, and how outcomes are told.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;

use crate::evacuation::VmReport;
use crate::evacuation::compute::ComputeService;
use crate::kube::Severity::{self, Normal, Warning};
use crate::kube::annotations::{DrainState, Phase};
use crate::kube::relief::VmMigrationPhase;

/// The operator's per-node switch: `on`, `off`, `dry-run` or `paused`.
pub const RELIEF_ANNOTATION: &str = "nova-kubernetes-drain/memory-relief";
/// What [`RELIEF_ANNOTATION`] takes; anything else turns relief off on the node.
pub const ANNOTATION_VALUES: [&str; 4] = ["on", "off", "dry-run", "paused"];
/// `--memory-relief`: the cluster's setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterMode {
    Off,
    /// Only nodes annotated `on` (or `dry-run`).
    Nodes,
    /// Every node not annotated `off` or `paused`.
    On,
    DryRun,
}

/// What relief does on this node now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeMode {
    Off,
    Paused,
    DryRun,
    On,
}

/// The node's mode from the cluster's setting, the node's annotation and
/// the cluster-wide pause. An annotation can narrow what the cluster
/// allows, or opt a node in where the cluster asks for it (`nodes`); never
/// move VMs where the cluster says `dry-run`.
pub fn node_mode(cluster: ClusterMode, annotation: Option<&str>, paused_cluster_wide: bool) -> NodeMode {
    let asked = annotation.map(str::trim);
    if asked.is_some_and(|a| !ANNOTATION_VALUES.contains(&a)) {
        // A typo (`dry_run`, `pause`) must never move VMs.
        return NodeMode::Off;
    }
    let mode = match (cluster, asked) {
        (ClusterMode::Off, _) | (_, Some("off")) => NodeMode::Off,
        (_, Some("paused")) => NodeMode::Paused,
        (ClusterMode::DryRun, _) | (_, Some("dry-run")) => NodeMode::DryRun,
        (ClusterMode::On, _) | (ClusterMode::Nodes, Some("on")) => NodeMode::On,
        (ClusterMode::Nodes, _) => NodeMode::Off,
    };
    match mode {
        NodeMode::On | NodeMode::DryRun if paused_cluster_wide => NodeMode::Paused,
        mode => mode,
    }
}

/// Why the node is in maintenance (no relief from or to it), if it is:
/// cordoned, or an evacuation under way or not yet undone.
pub fn in_maintenance(node: &Node) -> Option<String> {
    if node.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false) {
        return Some("the node is cordoned".into());
    }
    match DrainState::from_node(node).phase {
        Phase::Idle => None,
        phase => Some(format!("its evacuation is {}", phase.as_str())),
    }
}

/// The Event (severity, reason, note) of a finished relief move.
pub fn told_outcome(phase: VmMigrationPhase, report: &VmReport, host: &str) -> (Severity, &'static str, String) {
    let vm = format!("{} ({} MiB)", report.name, report.ram_mb);
    let to = report.destination.clone().unwrap_or_default();
    match phase {
        VmMigrationPhase::Succeeded => (
            Normal,
            "MemoryReliefSucceeded",
            format!("{vm} moved to {to} in {:.1} s", report.duration_seconds),
        ),
        VmMigrationPhase::HandedOver => (
            Normal,
            "MemoryReliefHandedOver",
            format!("{vm} is still migrating: the node was cordoned, its evacuation follows the migration"),
        ),
        _ => {
            let why = report
                .reason
                .clone()
                .unwrap_or_else(|| report.outcome.as_str().to_string());
            (Warning, "MemoryReliefFailed", format!("{vm} stays on {host}: {why}"))
        }
    }
}

/// The hosts no VM may go to, and why: this one, those disabled or down
/// (in maintenance, or broken), those of another availability zone than
/// the source's (a VM may have been booted into its zone), those whose
/// agents say their memory leaves no room.
pub fn excluded_hosts(
    host: &str,
    zone: Option<&str>,
    services: &[ComputeService],
    low: &[String],
) -> BTreeMap<String, String> {
    let mut excluded = BTreeMap::from([(host.to_string(), "the source".to_string())]);
    for service in services {
        let why = match (service.enabled, service.up) {
            (false, _) => "disabled (maintenance)".to_string(),
            (_, false) => "down".to_string(),
            _ if zone.is_some() && service.zone.as_deref() != zone => {
                format!("zone {}", service.zone.as_deref().unwrap_or("unknown"))
            }
            _ => continue,
        };
        excluded.entry(service.host.clone()).or_insert(why);
    }
    for low in low {
        excluded
            .entry(low.clone())
            .or_insert_with(|| "short of memory".to_string());
    }
    excluded
}

/// Why nothing moves: each VM's reason (the first few), and the hosts
/// that were no destination when a VM fitted nowhere.
pub fn no_vm_may_move(refused: &[(String, String)], excluded: &BTreeMap<String, String>, host: &str) -> String {
    if refused.is_empty() {
        return "no VM on the host".into();
    }
    let listed: Vec<String> = refused.iter().take(5).map(|(id, why)| format!("{id}: {why}")).collect();
    let more = if refused.len() > 5 { "; ..." } else { "" };
    let mut text = format!("no VM may move ({}{more})", listed.join("; "));
    if refused.iter().any(|(_, why)| why.starts_with("no host has room")) {
        let others: Vec<String> = excluded
            .iter()
            .filter(|(h, _)| *h != host)
            .map(|(h, why)| format!("{h}: {why}"))
            .collect();
        text.push_str(&format!("; hosts not taken: {}", others.join(", ")));
    }
    text
}

/// How long ago Nova's `created_at` (UTC, no zone) was; a time ahead of
/// our clock (the controller's clock runs ahead) counts as just now.
pub fn age(created_at: &str, now: jiff::Timestamp) -> Option<Duration> {
    let at = created_at
        .parse::<jiff::civil::DateTime>()
        .ok()?
        .to_zoned(jiff::tz::TimeZone::UTC)
        .ok()?
        .timestamp();
    Some(Duration::try_from(now.duration_since(at)).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeSpec;

    #[test]
    fn the_node_mode_follows_the_cluster_the_annotation_and_the_pause() {
        use ClusterMode as C;
        use NodeMode as N;
        assert_eq!(node_mode(C::Off, Some("on"), false), N::Off, "the cluster's off wins");
        assert_eq!(node_mode(C::Nodes, None, false), N::Off, "opt-in per node");
        assert_eq!(node_mode(C::Nodes, Some("on"), false), N::On);
        assert_eq!(node_mode(C::On, None, false), N::On);
        assert_eq!(node_mode(C::On, Some("off"), false), N::Off);
        assert_eq!(node_mode(C::On, Some("paused"), false), N::Paused);
        assert_eq!(node_mode(C::On, Some("dry-run"), false), N::DryRun);
        assert_eq!(
            node_mode(C::DryRun, Some("on"), false),
            N::DryRun,
            "never moves in a dry-run cluster"
        );
        assert_eq!(node_mode(C::On, None, true), N::Paused, "the cluster-wide pause");
        assert_eq!(node_mode(C::DryRun, None, true), N::Paused);
        assert_eq!(node_mode(C::On, Some("off"), true), N::Off);
        for typo in ["dry_run", "pause", "Dry-Run", "false"] {
            assert_eq!(node_mode(C::On, Some(typo), false), N::Off, "{typo}");
        }
    }

    #[test]
    fn a_cordoned_node_or_one_whose_evacuation_is_not_undone_is_in_maintenance() {
        let mut node = Node::default();
        assert_eq!(in_maintenance(&node), None);
        node.spec = Some(NodeSpec {
            unschedulable: Some(true),
            ..NodeSpec::default()
        });
        assert!(in_maintenance(&node).is_some());
        node.spec = None;
        node.metadata.annotations = Some([("nova-kubernetes-drain/phase".to_string(), "Waiting".to_string())].into());
        assert_eq!(in_maintenance(&node).as_deref(), Some("its evacuation is Waiting"));
    }

    #[test]
    fn hosts_short_of_memory_disabled_or_down_are_no_destination() {
        let service = |host: &str, enabled: bool, up: bool| ComputeService {
            id: host.into(),
            host: host.into(),
            enabled,
            up,
            disabled_reason: None,
            zone: None,
        };
        let services = [
            service("host1", true, true),
            service("host2", false, true),
            service("host3", true, false),
            service("host4", true, true),
            service("host5", true, true),
        ];
        let excluded = excluded_hosts("host1", None, &services, &["host4".to_string()]);
        assert_eq!(
            excluded.keys().collect::<Vec<_>>(),
            ["host1", "host2", "host3", "host4"]
        );
        assert_eq!(excluded["host4"], "short of memory");
        let mut zoned = services.to_vec();
        zoned[4].zone = Some("az2".into());
        zoned[0].zone = Some("az1".into());
        let excluded = excluded_hosts("host1", Some("az1"), &zoned, &[]);
        assert_eq!(excluded["host5"], "zone az2", "another zone than the source's");
    }

    #[test]
    fn ages_read_novas_zoneless_utc_times() {
        let now: jiff::Timestamp = "2026-12-07T12:00:00Z".parse().unwrap();
        assert_eq!(age("2026-12-07T11:59:00.000000", now), Some(Duration::from_secs(60)));
        assert_eq!(age("garbage", now), None);
        assert_eq!(
            age("2026-12-07T12:00:30", now),
            Some(Duration::ZERO),
            "ahead of our clock"
        );
    }
}
