//! `drainer release-guard`: lets drains finish on nodes whose agent is gone
//! (uninstalled, its node taken out of the DaemonSet, or dead for good), the
//! one case the agent cannot handle itself.
//!
//! Only what is ours goes: the guard's budget and our finalizer on its pod,
//! never another finalizer. The promise that `kubectl drain` never returns
//! while VMs run on the hypervisor holds here too: a guard is kept while Nova
//! lists servers on the node's host, unless the operator says `--force`
//! (Nova unreachable, or the VMs knowingly left behind).

use serde::Serialize;

use crate::evacuation::Compute;
use crate::kube::Guard;

/// What happened to one node's guard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum GuardRelease {
    /// Budget deleted, finalizer removed: a drain of the node can finish.
    Released {
        node: String,
        guard: String,
        /// Servers Nova listed on the host (`None`: not asked, `--force`).
        servers_on_host: Option<usize>,
    },
    /// Nova lists servers on the host: the guard keeps drains waiting.
    Kept {
        node: String,
        guard: String,
        host: String,
        servers_on_host: usize,
    },
    /// Nothing of ours holds this node.
    NoGuard { node: String },
    /// The Kubernetes or Nova call failed; nothing was released.
    Failed { node: String, error: String },
    /// A hand-made Evacuation no agent is left to act on: our finalizer taken
    /// off, so its deletion ends at once. The service stays as it is.
    EvacuationLetGo { node: String, evacuation: String },
}

impl GuardRelease {
    /// The line an operator reads.
    pub fn describe(&self) -> String {
        match self {
            GuardRelease::Released {
                node,
                guard,
                servers_on_host: Some(_),
            } => format!("{node}: guard {guard} released (Nova lists no server on its host)"),
            GuardRelease::Released { node, guard, .. } => {
                format!("{node}: guard {guard} released (--force: Nova not asked)")
            }
            GuardRelease::Kept {
                node,
                guard,
                host,
                servers_on_host,
            } => format!(
                "{node}: guard {guard} kept: Nova lists {servers_on_host} server(s) on {host}; evacuate them \
                 (`drainer --node {node}`), or pass --force to let drains finish with them there"
            ),
            GuardRelease::NoGuard { node } => format!("{node}: no guard of ours holds this node"),
            GuardRelease::Failed { node, error } => format!("{node}: not released: {error}"),
            GuardRelease::EvacuationLetGo { node, evacuation } => format!(
                "{node}: Evacuation {evacuation} let go (our finalizer taken off); nova-compute stays as it is \
                 (`drainer -enable --node {node}` re-enables it if we disabled it)"
            ),
        }
    }

    /// The node it is about.
    pub fn node(&self) -> &str {
        match self {
            GuardRelease::Released { node, .. }
            | GuardRelease::Kept { node, .. }
            | GuardRelease::NoGuard { node }
            | GuardRelease::Failed { node, .. }
            | GuardRelease::EvacuationLetGo { node, .. } => node,
        }
    }

    /// Whether the operator's request was met (released, or nothing to release).
    pub fn done(&self) -> bool {
        matches!(
            self,
            GuardRelease::Released { .. } | GuardRelease::NoGuard { .. } | GuardRelease::EvacuationLetGo { .. }
        )
    }
}

/// Releases each guard unless Nova (`compute`; `None` with `--force`) lists
/// servers on its node's host (`host_of`).
pub async fn release_guards<C: Compute>(
    guards: Vec<Guard>,
    compute: Option<&C>,
    host_of: impl Fn(&str) -> String,
) -> Vec<GuardRelease> {
    let mut outcomes = Vec::new();
    for guard in guards {
        let node = guard.node().to_string();
        let name = guard.name().to_string();
        match guard.holds().await {
            Ok(false) => {
                outcomes.push(GuardRelease::NoGuard { node });
                continue;
            }
            Ok(true) => {}
            Err(e) => {
                outcomes.push(GuardRelease::Failed {
                    node,
                    error: format!("reading the guard {name}: {e}"),
                });
                continue;
            }
        }
        let servers_on_host = match compute {
            None => None,
            Some(compute) => {
                let host = host_of(&node);
                match compute.servers_on_host(&host).await {
                    Ok(servers) if servers.is_empty() => Some(0),
                    Ok(servers) => {
                        outcomes.push(GuardRelease::Kept {
                            node,
                            guard: name,
                            host,
                            servers_on_host: servers.len(),
                        });
                        continue;
                    }
                    Err(e) => {
                        outcomes.push(GuardRelease::Failed {
                            node,
                            error: format!("listing the servers on {host}: {e} (--force releases without asking Nova)"),
                        });
                        continue;
                    }
                }
            }
        };
        outcomes.push(match guard.release().await {
            Ok(()) => GuardRelease::Released {
                node,
                guard: name,
                servers_on_host,
            },
            Err(e) => GuardRelease::Failed {
                node,
                error: format!("releasing the guard {name}: {e}"),
            },
        });
    }
    outcomes
}
