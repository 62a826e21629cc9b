//! What the engine tells as it goes: the events and their receiver.

use std::time::Duration;

use super::compute::Server;
use super::plan::Action;

/// Progress worth telling an operator about, as it happens.
#[derive(Debug)]
pub enum Event<'a> {
    ServiceDisabled {
        reason: &'a str,
    },
    ServiceAlreadyDisabled {
        reason: Option<&'a str>,
        ours: bool,
    },
    EvacuationStarted {
        to_move: usize,
        to_skip: usize,
    },
    MigrationStarted {
        server: &'a Server,
        action: Action,
        attempt: u32,
    },
    MigrationSucceeded {
        server: &'a Server,
        action: Action,
        destination: &'a str,
        seconds: f64,
    },
    MigrationFailed {
        server: &'a Server,
        action: Action,
        reason: &'a str,
        retry_in: Option<Duration>,
    },
    Intervened {
        server: &'a Server,
        what: &'a str,
        reason: &'a str,
    },
    NotMigratable {
        server: &'a Server,
        reason: &'a str,
    },
    /// Stopped for the maintenance, as its tag or the node's default asked (marked to be started again).
    Stopped {
        server: &'a Server,
    },
    /// How the VMs to move stand; each is counted once, skipped ones not at all.
    Progress {
        /// The VMs to move (more when a second listing finds newcomers).
        total: usize,
        /// Moved off the host (or deleted meanwhile).
        moved: usize,
        /// That this run will not move: failed, aborted, not started.
        not_moved: usize,
        /// Migrations Nova runs from the host (at the end: left to Nova, still running).
        running: usize,
        /// Migrations handed to Nova ahead of a free slot, which it holds
        /// queued behind the running ones (`queue_ahead`).
        queued_in_nova: usize,
    },
}

/// Receives the engine's events (logs, progress line, Kubernetes Events, metrics).
pub trait Observer: Send + Sync {
    fn event(&self, event: &Event<'_>);
}
