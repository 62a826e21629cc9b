//! nova-kubernetes-drain: when a Kubernetes node that hosts a nova-compute
//! hypervisor is drained, disable that service and move every VM off it,
//! bounded by timeouts, and tell the operator exactly what happened.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod evacuation;
pub mod kube;
pub mod nova;
pub mod pressure;
pub mod telemetry;

/// Process exit codes, the same for every mode.
pub mod exit {
    /// The hypervisor is empty (or already was); the requested change is done.
    pub const DONE: i32 = 0;
    /// Some VM could not be moved, or the time ran out.
    pub const FAILED: i32 = 1;
    /// Bad usage, configuration or credentials, found before any change.
    pub const USAGE: i32 = 2;
    /// Stopped by Ctrl-C (SIGINT) before the end, as shells report it (128 + 2).
    pub const INTERRUPTED: i32 = 130;
}
