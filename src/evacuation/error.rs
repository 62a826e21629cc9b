//! Why an evacuation could not run at all.

use super::compute::ComputeError;
use super::plan::Shortfall;

/// Why an evacuation could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum EvacuationError {
    #[error("no nova-compute service on host {host:?} (node {node:?}); check --node and nova_host")]
    ServiceNotFound { node: String, host: String },
    #[error("capacity check failed: {0}; nothing was changed (--skip-capacity-check overrides)")]
    Capacity(Shortfall),
    /// What the operator asked for cannot be followed (never guessed at).
    #[error("{0}; nothing was changed")]
    Refused(String),
    #[error("{step}: {source}")]
    Compute {
        step: &'static str,
        #[source]
        source: ComputeError,
    },
}

impl EvacuationError {
    /// Whether the cause is the user's input (unknown node, bad credentials) rather than the evacuation.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            EvacuationError::ServiceNotFound { .. }
                | EvacuationError::Compute {
                    source: ComputeError::Auth(_),
                    ..
                }
        )
    }
}

pub(super) fn step(step: &'static str) -> impl FnOnce(ComputeError) -> EvacuationError {
    move |source| EvacuationError::Compute { step, source }
}
