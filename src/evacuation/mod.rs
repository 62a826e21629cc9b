//! The evacuation engine: plain logic over the [`Compute`] trait, so it can
//! be read and tested without a network.

pub mod compute;
mod engine;
mod error;
mod event;
mod maintenance;
mod moves;
pub mod plan;
pub mod report;
mod settings;

pub use compute::{
    Capacity, ChangeMark, Compute, ComputeError, ComputeResult, ComputeService, Flavor, HostCapacity, Migration,
    MigrationChanges, Resources, Server,
};
pub use engine::Engine;
pub use error::EvacuationError;
pub use event::{Event, Observer};
pub use maintenance::{
    DISABLED_REASON_MARKER, Restart, RestartOutcome, RestoreOptions, RestoreOutcome, Restored, disabled_reason,
    is_our_reason,
};
pub use plan::{Action, ActionFrom, ActionSource, STOPPED_BY_US_TAG, StatePolicy, TAG_PREFIX, VmPolicy};
pub use report::{CapacityCheck, Outcome, Prediction, Report, RunResult, View, VmReport};
pub use settings::{Budget, BudgetAction, Settings, StopRequest, Target};

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;
