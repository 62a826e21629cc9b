//! Every knob of an evacuation, what may stop it from outside, and the host it acts on.

use std::time::Duration;

use super::plan::{StatePolicy, VmPolicy};

/// What to do with a live migration that ran past its budget or stalled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BudgetAction {
    /// Cancel it; the VM keeps running on the source and is reported.
    Abort,
    /// Let it finish now (the hypervisor pauses the VM for the final copy).
    ForceComplete,
}

/// How long one VM's live migration may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// The same for every VM.
    Fixed(Duration),
    /// `max(minimum, per_gib x flavor RAM in GiB)`, as KubeVirt and Nova scale it.
    Scaled { minimum: Duration, per_gib: Duration },
}

impl Budget {
    /// The budget for a VM with `ram_mb` of memory.
    pub fn for_ram(self, ram_mb: u64) -> Duration {
        match self {
            Budget::Fixed(budget) => budget,
            Budget::Scaled { minimum, per_gib } => minimum.max(per_gib.mul_f64(ram_mb as f64 / 1024.0)),
        }
    }
}

/// Every knob of an evacuation; built from the configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Migrations running at once from this host (Nova's own default is 1).
    pub max_parallel: usize,
    /// Live migrations handed to Nova beyond `max_parallel`, for Nova to hold
    /// queued and start itself the moment a running one ends: their
    /// scheduling and preparation overlap the running ones. Only where a
    /// queued migration can be aborted (compute API 2.65).
    pub queue_ahead: usize,
    pub budget: Budget,
    /// A migration whose `memory_remaining_bytes` has not dropped for this long is stalled.
    pub stall_after: Option<Duration>,
    pub on_budget_exceeded: BudgetAction,
    /// Further attempts after a failed migration (the scheduler may pick another host).
    pub retries: u32,
    /// Delay before the first retry, doubled for each further one.
    pub retry_backoff: Duration,
    /// How often in-flight VMs are looked at.
    pub poll_interval: Duration,
    /// Ends the whole evacuation: no new migrations, in-flight ones handled per `on_budget_exceeded`.
    pub timeout: Option<Duration>,
    pub state_policy: StatePolicy,
    /// The node's default action for VMs without a `nova-drain:` tag of
    /// their own (a Node annotation, the Evacuation spec, or run-once's
    /// `node_default_action`); the state policy decides where it is `None`
    /// or Nova cannot follow it in a VM's state.
    pub node_default: Option<VmPolicy>,
    /// Refuse to start when the other hosts cannot hold the VMs.
    pub check_capacity: bool,
    /// Hosts other agents evacuate at the same time: the capacity check
    /// counts what is still on them as spoken for on the destinations.
    pub evacuating_elsewhere: Vec<String>,
    /// Disable the service before the capacity check rather than after it: an
    /// agent reacting to a cordon stops new VMs landing at once; a one-off run
    /// that finds no room changes nothing.
    pub disable_first: bool,
    /// The host live migrations go to, checked by the scheduler (a memory
    /// relief chooses it); `None`: the scheduler picks.
    pub destination: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_parallel: 1,
            queue_ahead: 1,
            budget: Budget::Scaled {
                minimum: Duration::from_secs(150),
                per_gib: Duration::from_secs(150),
            },
            stall_after: Some(Duration::from_secs(150)),
            on_budget_exceeded: BudgetAction::Abort,
            retries: 3,
            retry_backoff: Duration::from_secs(10),
            poll_interval: Duration::from_millis(500),
            timeout: Some(Duration::from_secs(30 * 60)),
            state_policy: StatePolicy::default(),
            node_default: None,
            check_capacity: true,
            evacuating_elsewhere: Vec::new(),
            disable_first: false,
            destination: None,
        }
    }
}

/// Asked of a running evacuation from outside (signals, an uncordon).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopRequest {
    /// Keep going.
    Continue,
    /// Start nothing new; leave in-flight migrations to Nova and return at once.
    LeaveInFlight,
    /// Start nothing new; abort in-flight live migrations, wait for them to roll back.
    AbortInFlight,
}

/// The node being drained, its nova-compute service host, and who drains it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub node: String,
    pub host: String,
    /// Who runs the evacuation (`agent POD`, `run-once on HOST pid N`): named
    /// in the `disabled_reason`, so an operator reading the service knows
    /// whom to ask.
    pub run: String,
}
