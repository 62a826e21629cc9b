//! The evacuation engine: plain logic over the [`Compute`] trait, so it can
//! be read and tested without a network.

pub mod compute;
mod engine;
pub mod plan;
pub mod report;

pub use compute::{
    Capacity, ChangeMark, Compute, ComputeError, ComputeResult, ComputeService, Flavor, HostCapacity, Migration,
    MigrationChanges, Resources, Server,
};
pub use engine::{
    Budget, BudgetAction, DISABLED_REASON_MARKER, Engine, EvacuationError, Event, Observer, Restart, RestartOutcome,
    RestoreOptions, RestoreOutcome, Restored, Settings, StopRequest, Target, disabled_reason, is_our_reason,
};
pub use plan::{Action, ActionFrom, ActionSource, STOPPED_BY_US_TAG, StatePolicy, TAG_PREFIX, VmPolicy};
pub use report::{CapacityCheck, Outcome, Prediction, Report, RunResult, View, VmReport};

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;
