//! The command line, drop-in compatible with the old Go tool: its
//! single-dash flags (`-config-path`, `-run-once`, `-daemon`, `-time-out`)
//! work exactly as written, beside the usual `--long` forms and the habits
//! of the tools an operator types beside it: `drainer NODE` as `kubectl
//! drain NODE`, `--os-cloud` as the `openstack` CLI, and `kubectl drainer`
//! when installed as the kubectl plugin `kubectl-drainer`.

use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};

use crate::pressure::detector::Amount;

/// Drains a nova-compute hypervisor: disables its service and moves every VM off it.
#[derive(Debug, Parser)]
#[command(
    name = "drainer",
    version,
    about,
    long_about = None,
    after_help = "Every long flag also works with one dash, as the old Go tool wrote them: \
                  -config-path, -run-once, -daemon, -time-out, -enable, -node ...\n\n\
                  As a kubectl plugin (the binary or a symlink named kubectl-drainer on the PATH): \
                  kubectl drainer NODE ...\n\n\
                  Exit codes: 0 the hypervisor is empty, or the requested change is done; 1 some VM \
                  could not be moved or the time ran out, or -enable / release-guard left the service or a \
                  guard as it was; 2 bad usage, configuration or credentials (nothing was changed); 130 \
                  stopped by Ctrl-C. A dry run exits as the run would end (1: a VM would stay or would not \
                  fit)."
)]
pub struct Cli {
    /// The Kubernetes node to act on, as `kubectl drain NODE` takes it (the same as --node).
    #[arg(value_name = "NODE")]
    node_arg: Option<String>,

    /// Config file (the old tool's keys or the documented ones) [default: ./config.yaml, which may be absent when
    /// OS_* variables hold the credentials].
    #[arg(long = "config-path", value_name = "PATH", global = true)]
    pub config_path: Option<PathBuf>,

    /// The clouds.yaml entry to use, as `openstack --os-cloud` (and OS_CLOUD) selects it; takes the place of
    /// OS_CLOUD and of the config file's `cloud` key.
    #[arg(long = "os-cloud", value_name = "NAME", global = true)]
    pub os_cloud: Option<String>,

    /// Evacuate the node's hypervisor once and exit (the default).
    #[arg(long = "run-once", conflicts_with_all = ["daemon", "enable"])]
    pub run_once: bool,

    /// Watch the Kubernetes node and evacuate whenever it is cordoned.
    #[arg(long, conflicts_with = "enable")]
    pub daemon: bool,

    /// Re-enable the nova-compute service after maintenance, only if the drainer disabled it
    /// and no server is being moved off the host (an evacuation runs).
    #[arg(long)]
    pub enable: bool,

    /// With -enable: re-enable even while servers are being moved off the host.
    #[arg(long, requires = "enable")]
    pub force: bool,

    /// Overall time limit: no new migrations after it, in-flight ones are handled per policy.
    /// A bare number is minutes (the old tool's -time-out 30); or a duration: 90s, 5m, 1h30m.
    #[arg(long = "time-out", value_name = "DURATION", value_parser = parse_time_out)]
    pub time_out: Option<std::time::Duration>,

    /// Kubernetes node name, or as the first argument: `drainer NODE` [default: this machine's hostname].
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node: Option<String>,

    /// Print the plan (service, each VM and what would happen to it), or with -enable whether the
    /// service would be enabled, and change nothing. Not for -daemon or release-guard.
    #[arg(long, conflicts_with = "daemon")]
    pub dry_run: bool,

    /// Move VMs even if the other hypervisors seem too full to hold them.
    #[arg(long)]
    pub skip_capacity_check: bool,

    /// The node's default for each VM without a nova-drain: server tag: live-migrate, cold-migrate, stop or
    /// leave (the config's node_default_action). A VM's own tag comes first, the state policy last.
    #[arg(long = "vm-action", value_name = "ACTION", value_parser = parse_vm_action)]
    pub vm_action: Option<crate::evacuation::VmPolicy>,

    /// Format of the final report on standard output (-o json, as kubectl; -f json, as openstack).
    #[arg(short = 'o', short_alias = 'f', long, value_enum, default_value_t = Output::Human, global = true)]
    pub output: Output,

    /// Daemon: kubeconfig file [default: $KUBECONFIG, then the in-cluster service account].
    #[arg(long, value_name = "PATH", global = true)]
    pub kubeconfig: Option<PathBuf>,

    /// Daemon: namespace of the drain guard pod and budget (the agent's own).
    #[arg(
        long,
        env = "POD_NAMESPACE",
        value_name = "NAME",
        default_value = "nova-drain",
        global = true
    )]
    pub namespace: String,

    /// Daemon: the agent's own pod, whose image the guard runs and which names the agent in Events.
    #[arg(long, env = "POD_NAME", value_name = "NAME")]
    pub pod_name: Option<String>,

    /// Daemon: address for /metrics, /healthz and /readyz.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9102")]
    pub listen: std::net::SocketAddr,

    /// Daemon: image of the guard pod [default: the agent's own image, read from its pod --pod-name].
    #[arg(long, value_name = "IMAGE")]
    pub guard_image: Option<String>,

    /// Daemon: seconds the guard pod may take to become Running before it is reported (Event, /readyz, metric).
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub guard_grace: u64,

    /// Daemon: let `kubectl drain` finish when VMs could not be moved, instead of keeping it waiting.
    #[arg(long)]
    pub release_guard_on_failure: bool,

    /// Daemon: the Evacuation a cordon creates starts paused: its plan is written and nothing
    /// changes in Nova until a person sets its spec.paused to false.
    #[arg(long)]
    pub start_paused: bool,

    /// Daemon: seconds to wait before evacuating again after a failed run while still cordoned;
    /// doubled after each further failure in a row, up to --max-retry-after-failure.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub retry_after_failure: u64,

    /// Daemon: longest wait between two runs that fail in a row (a change of the Node, or of
    /// the VMs on its hypervisor, starts the doubling over).
    #[arg(long, value_name = "SECONDS", default_value_t = 960)]
    pub max_retry_after_failure: u64,

    /// Daemon: hypervisors evacuating at once across the cluster; the others wait their turn,
    /// first come first served (0: no limit, no coordination between agents).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub max_evacuating: u32,

    /// Daemon: live migrations at once across all the hypervisors evacuating, split evenly
    /// between --max-evacuating slots (at least one each).
    #[arg(long, value_name = "M", default_value_t = 5)]
    pub max_live_migrations: u32,

    /// Daemon: the availability zones of hypervisors evacuating at the same time (with
    /// --max-evacuating above 1): `same` (one zone at a time: the others stay whole),
    /// `different` (never two of one zone), or `any`.
    #[arg(long, value_enum, value_name = "RULE", default_value_t = Zones::Any)]
    pub evacuating_zones: Zones,

    /// Daemon: seconds an evacuation slot stays held when its agent stops renewing it
    /// (it dies, or cannot reach the API server); it stops migrating after half of it.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(3..=3600))]
    pub slot_lease: u64,

    /// Daemon: memory relief, live-migrating VMs off a hypervisor whose MemAvailable stays below
    /// --memory-threshold for --memory-window seconds, before the OOM killer ends a guest: `off`,
    /// `nodes` (only the nodes annotated nova-kubernetes-drain/memory-relief=on), `on` (every node
    /// not annotated off or paused), or `dry-run` (VmMigrations and Events tell what would move;
    /// nothing moves).
    #[arg(long, value_enum, value_name = "MODE", default_value_t = MemoryRelief::Off)]
    pub memory_relief: MemoryRelief,

    /// Daemon: where the hypervisor's memory is read, in /proc/meminfo's format (refused when
    /// lxcfs or another FUSE file system hides the host's view there).
    #[arg(long, value_name = "PATH", default_value = "/proc/meminfo")]
    pub meminfo_path: PathBuf,

    /// Daemon: memory pressure is MemAvailable below this: a share of MemTotal (`10%`) or a
    /// size (`4Gi`, `512Mi`).
    #[arg(long, value_name = "AMOUNT", default_value = "10%")]
    pub memory_threshold: Amount,

    /// Daemon: a host under memory pressure is relieved once MemAvailable is above the
    /// threshold plus this (`5%`, `2Gi`): the VMs moved are the fewest that free that much.
    #[arg(long, value_name = "AMOUNT", default_value = "5%")]
    pub memory_margin: Amount,

    /// Daemon: seconds MemAvailable must stay below the threshold before VMs move.
    #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub memory_window: u64,

    /// Daemon: seconds between two readings of the memory.
    #[arg(long, value_name = "SECONDS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub memory_sample_interval: u64,

    /// Daemon: which VM a memory relief moves: `fewest` (the smallest VM that frees enough on
    /// its own, else the largest; recently moved VMs last) or `largest`.
    #[arg(long, value_enum, value_name = "POLICY", default_value_t = ReliefChoice::Fewest)]
    pub relief_choice: ReliefChoice,

    /// Daemon: seconds a VM moved for memory relief (by anyone, as Nova's records show) is
    /// not moved again for it.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    pub relief_vm_cool_down: u64,

    /// Daemon: seconds after a relief move from a host before the next one (the memory
    /// freed shows in MemAvailable first).
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    pub relief_host_cool_down: u64,

    /// Daemon: memory relief moves at once across the cluster (Leases shared by the agents);
    /// with --max-evacuating above 0 they are taken out of --max-live-migrations.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub relief_migrations: u32,

    /// Format of the log lines on standard error.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Modes other than evacuating.
#[derive(Clone, Debug, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// Run as the drain guard pod the agent creates on its node: do nothing until
    /// SIGTERM or SIGINT, then exit 0 (its finalizer, not this process, holds drains).
    #[command(hide = true)]
    Guard,
    /// Let drains finish on a node whose agent is gone (uninstalled, or its node out of the
    /// DaemonSet): delete the guard's budget and remove our finalizer (only ours) from the
    /// guard pod. Refuses while Nova lists servers on the node's host, unless --force.
    /// Exit 0 released (or nothing to release), 1 a guard kept or a call failed, 2 bad usage.
    ReleaseGuard {
        /// The node whose guard to release.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        node: Option<String>,
        /// Every guard of ours in --namespace.
        #[arg(long)]
        all: bool,
        /// Release without asking Nova (it is down, or VMs are knowingly left on the host).
        #[arg(long)]
        force: bool,
    },
    /// Print a CustomResourceDefinition: of the Evacuation resource (as deploy/crd.yaml holds it), or
    /// with `vmmigrations`, of the VmMigration resource (deploy/crd-vmmigrations.yaml).
    Crd {
        #[arg(value_enum, default_value_t = CrdKind::Evacuations)]
        kind: CrdKind,
    },
}

/// `--memory-relief`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MemoryRelief {
    Off,
    Nodes,
    On,
    DryRun,
}

/// `--relief-choice`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReliefChoice {
    Fewest,
    Largest,
}

/// The custom resources whose definitions `drainer crd` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CrdKind {
    Evacuations,
    Vmmigrations,
}

/// Report format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Human,
    Json,
}

/// Log format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `--evacuating-zones`: which availability zones may evacuate at the same time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Zones {
    Any,
    Same,
    Different,
}

/// The name kubectl runs a plugin by: `kubectl drainer` executes `kubectl-drainer` from the PATH.
pub const KUBECTL_PLUGIN: &str = "kubectl-drainer";

impl Cli {
    /// Parses arguments, accepting the old tool's single-dash long flags.
    pub fn parse_compatible<I: IntoIterator<Item = String>>(args: I) -> Result<Cli, clap::Error> {
        let args = normalize(args);
        let mut command = Cli::command();
        // Invoked by kubectl as a plugin, usage and errors say what the operator typed.
        let as_plugin = args
            .first()
            .and_then(|arg0| std::path::Path::new(arg0).file_name())
            .is_some_and(|name| name == KUBECTL_PLUGIN);
        if as_plugin {
            command = command.bin_name("kubectl drainer");
        }
        let matches = command.try_get_matches_from_mut(args)?;
        let mut cli = Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut command))?;
        if let Some(node) = cli.node_arg.take() {
            // NODE_NAME (the DaemonSet's) gives way to a node typed on the command line;
            // two different nodes typed are a mistake not ours to settle.
            let typed = matches.value_source("node") == Some(ValueSource::CommandLine);
            match &cli.node {
                Some(flag) if typed && flag.trim() != node.trim() => {
                    return Err(command.error(
                        clap::error::ErrorKind::ArgumentConflict,
                        format!("two nodes given: {node} (argument) and {flag} (--node); give one"),
                    ));
                }
                _ => cli.node = Some(node),
            }
        }
        if cli.dry_run && matches!(cli.command, Some(Command::ReleaseGuard { .. })) {
            return Err(command.error(
                clap::error::ErrorKind::ArgumentConflict,
                "release-guard has no --dry-run: list what it would release with \
                 `kubectl get pods,pdb -n NAMESPACE -l app.kubernetes.io/name=nova-drain-guard`",
            ));
        }
        Ok(cli)
    }
}

/// A usage error as one line for standard error, as every other bad input
/// is: clap's message and tips, without its usage block, so scripts and logs
/// that keep the first line keep the whole story.
pub fn one_line(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    rendered
        .split("\n\n")
        .map(|block| block.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|block| !block.is_empty() && !block.starts_with("Usage:") && !block.starts_with("For more information"))
        .collect::<Vec<_>>()
        .join("; ")
        + " (try --help)"
}

/// Longest `--time-out` taken: a week.
const LONGEST_TIME_OUT: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// `--time-out`: a bare number of minutes, as the old tool took it, or a duration (`90s`, `5m`, `1h30m`).
/// `--vm-action`: one of the words a `nova-drain:` tag takes.
fn parse_vm_action(text: &str) -> Result<crate::evacuation::VmPolicy, String> {
    text.parse()
}

fn parse_time_out(text: &str) -> Result<std::time::Duration, String> {
    let duration = match text.trim().parse::<f64>() {
        Ok(minutes) if minutes.is_finite() && minutes > 0.0 => {
            std::time::Duration::try_from_secs_f64(minutes * 60.0).map_err(|e| e.to_string())?
        }
        Ok(_) => return Err(format!("must be above 0, got {text}")),
        Err(_) => text
            .trim()
            .parse::<jiff::SignedDuration>()
            .ok()
            .filter(|d| d.is_positive())
            .and_then(|d| std::time::Duration::try_from(d).ok())
            .ok_or_else(|| format!("{text:?} is neither minutes nor a duration such as 90s, 5m or 1h30m"))?,
    };
    if duration > LONGEST_TIME_OUT {
        return Err(format!("{text} is longer than a week"));
    }
    Ok(duration)
}

/// Turns `-config-path x` / `-time-out=30` into `--config-path x` / `--time-out=30`
/// for every long flag we know; short flags and values are left alone.
fn normalize<I: IntoIterator<Item = String>>(args: I) -> Vec<String> {
    let command = Cli::command();
    let longs: Vec<String> = command
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .chain(["help".to_string(), "version".to_string()])
        .collect();
    let mut out = Vec::new();
    let mut rest_is_positional = false;
    for (index, arg) in args.into_iter().enumerate() {
        if index == 0 || rest_is_positional {
            out.push(arg);
            continue;
        }
        if arg == "--" {
            rest_is_positional = true;
            out.push(arg);
            continue;
        }
        let single_dash = arg.strip_prefix('-').filter(|rest| !rest.starts_with('-'));
        match single_dash {
            Some(rest) if longs.iter().any(|l| l == rest.split('=').next().unwrap_or(rest)) => {
                out.push(format!("-{arg}"))
            }
            // An unknown word after one dash is an unknown long flag in the old tool's
            // style: named whole, not as clap's short flag '-f' of "-frobnicate".
            Some(rest) if rest.len() > 1 && rest.starts_with(|c: char| c.is_ascii_alphabetic()) => {
                out.push(format!("-{arg}"))
            }
            _ => out.push(arg),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::parse_compatible(std::iter::once("drainer").chain(args.iter().copied()).map(String::from))
    }

    #[test]
    fn an_unknown_single_dash_word_is_named_whole() {
        let error = parse(&["-frobnicate"]).unwrap_err().to_string();
        assert!(error.contains("'--frobnicate'"), "{error}");
        assert!(parse(&["-h"]).is_err(), "short flags stay short (help)");
        let known = parse(&["-node", "compute-1", "-time-out=5"]).unwrap();
        assert_eq!(
            (known.node.as_deref(), known.time_out),
            (Some("compute-1"), Some(Duration::from_secs(300)))
        );
    }

    #[test]
    fn vm_action_takes_the_tag_vocabulary() {
        use crate::evacuation::VmPolicy;
        let cli = parse(&["--vm-action", "stop", "-node", "compute-1"]).unwrap();
        assert_eq!(cli.vm_action, Some(VmPolicy::Stop));
        let error = parse(&["--vm-action", "migrate"]).unwrap_err().to_string();
        assert!(
            error.contains("expected live-migrate, cold-migrate, stop or leave"),
            "{error}"
        );
    }

    #[test]
    fn guard_subcommand_needs_nothing_else() {
        let cli = parse(&["guard"]).unwrap();
        assert_eq!(cli.command, Some(Command::Guard));
        assert!(!cli.daemon);
    }

    #[test]
    fn time_outs_are_minutes_or_durations_and_output_has_short_forms() {
        let time_out = |arg: &str| parse(&["--time-out", arg]).map(|c| c.time_out);
        assert_eq!(time_out("2.5").unwrap(), Some(Duration::from_secs(150)));
        assert_eq!(time_out("90s").unwrap(), Some(Duration::from_secs(90)));
        assert_eq!(time_out("5m").unwrap(), Some(Duration::from_secs(300)));
        assert_eq!(time_out("1h30m").unwrap(), Some(Duration::from_secs(5400)));
        for bad in ["0", "-5", "soon", "0s", "8d", "NaN"] {
            assert!(time_out(bad).is_err(), "{bad}");
        }
        assert_eq!(parse(&["-o", "json"]).unwrap().output, Output::Json);
        assert_eq!(parse(&["-f", "json"]).unwrap().output, Output::Json);
    }

    #[test]
    fn release_guard_takes_a_node_or_all() {
        let cli = parse(&["release-guard", "compute-1", "--namespace", "ops"]).unwrap();
        assert_eq!(
            cli.command,
            Some(Command::ReleaseGuard {
                node: Some("compute-1".into()),
                all: false,
                force: false
            })
        );
        assert_eq!(cli.namespace, "ops");
        let cli = parse(&["release-guard", "-all", "-force", "-output", "json"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::ReleaseGuard {
                all: true,
                force: true,
                ..
            })
        ));
        assert_eq!(cli.output, Output::Json);
        assert!(parse(&["release-guard"]).is_err(), "a node or --all");
        assert!(
            parse(&["--dry-run", "release-guard", "n1"]).is_err(),
            "a dry run it would not honour"
        );
        assert!(parse(&["-daemon", "--dry-run"]).is_err());
        assert!(parse(&["-enable", "--dry-run"]).is_ok());
        assert!(parse(&["release-guard", "n1", "--all"]).is_err());
    }

    #[test]
    fn old_tool_single_dash_flags() {
        let cli = parse(&["-config-path", "c.yaml", "-run-once", "-time-out", "30"]).unwrap();
        assert_eq!(cli.config_path, Some(PathBuf::from("c.yaml")));
        assert!(cli.run_once);
        assert_eq!(cli.time_out, Some(Duration::from_secs(1800)));
        let cli = parse(&["-daemon", "-time-out=5"]).unwrap();
        assert!(cli.daemon);
        assert_eq!(cli.time_out, Some(Duration::from_secs(300)));
    }

    #[test]
    fn double_dash_forms() {
        let cli = parse(&["--config-path=c.yaml", "--node", "n1", "--dry-run", "--output", "json"]).unwrap();
        assert_eq!(cli.node.as_deref(), Some("n1"));
        assert!(cli.dry_run);
        assert_eq!(cli.output, Output::Json);
        let cli = parse(&["-enable", "-node", "n2"]).unwrap();
        assert!(cli.enable);
        assert_eq!(cli.node.as_deref(), Some("n2"));
    }

    #[test]
    fn the_node_is_an_argument_as_kubectl_drain_takes_it() {
        let cli = parse(&["host1", "--dry-run"]).unwrap();
        assert_eq!((cli.node.as_deref(), cli.dry_run), (Some("host1"), true));
        let cli = parse(&["-enable", "host2", "-config-path", "c.yaml"]).unwrap();
        assert_eq!((cli.node.as_deref(), cli.enable), (Some("host2"), true));
        assert_eq!(
            parse(&["host1", "-node", "host1"]).unwrap().node.as_deref(),
            Some("host1")
        );
        for args in [
            ["host1", "--node", "host2"],
            ["host1", "-node", "host2"],
            ["--node=host2", "--", "host1"],
        ] {
            let error = parse(&args).unwrap_err();
            assert_eq!(error.kind(), clap::error::ErrorKind::ArgumentConflict, "{args:?}");
            let line = one_line(&error);
            assert!(line.contains("host1") && line.contains("host2"), "{line}");
            assert!(!line.contains('\n'), "{line}");
        }
        // The subcommands keep their names; a node called so is given with --node.
        assert_eq!(parse(&["guard"]).unwrap().command, Some(Command::Guard));
        assert_eq!(parse(&["--node", "guard"]).unwrap().node.as_deref(), Some("guard"));
        assert!(parse(&["host1", "host2"]).is_err(), "one node");
    }

    #[test]
    fn os_cloud_as_the_openstack_cli_takes_it() {
        assert_eq!(
            parse(&["--os-cloud", "prod", "host1"]).unwrap().os_cloud.as_deref(),
            Some("prod")
        );
        assert_eq!(parse(&["-os-cloud=prod"]).unwrap().os_cloud.as_deref(), Some("prod"));
        let cli = parse(&["release-guard", "--all", "--os-cloud", "prod"]).unwrap();
        assert_eq!(cli.os_cloud.as_deref(), Some("prod"), "release-guard asks Nova too");
    }

    #[test]
    fn as_a_kubectl_plugin_it_parses_alike_and_says_kubectl_drainer() {
        let plugin = |args: &[&str]| {
            Cli::parse_compatible(
                std::iter::once("/usr/local/bin/kubectl-drainer")
                    .chain(args.iter().copied())
                    .map(String::from),
            )
        };
        let cli = plugin(&["host1", "-o", "json", "--dry-run"]).unwrap();
        assert_eq!((cli.node.as_deref(), cli.output), (Some("host1"), Output::Json));
        let help = plugin(&["--help"]).unwrap_err();
        assert_eq!(help.kind(), clap::error::ErrorKind::DisplayHelp);
        assert!(help.to_string().contains("Usage: kubectl drainer"), "{help}");
        assert!(parse(&["--help"]).unwrap_err().to_string().contains("Usage: drainer"));
    }

    #[test]
    fn usage_errors_are_one_line_with_the_tip() {
        let line = one_line(&parse(&["--nod", "host1"]).unwrap_err());
        assert!(line.starts_with("error: unexpected argument '--nod'"), "{line}");
        assert!(line.contains("'--node'"), "the tip stays: {line}");
        assert!(!line.contains("Usage") && !line.contains('\n'), "{line}");
        let line = one_line(&parse(&["-daemon", "-run-once"]).unwrap_err());
        assert!(line.contains("cannot be used with"), "{line}");
    }

    #[test]
    fn conflicting_and_unknown_flags_are_usage_errors() {
        assert!(parse(&["-daemon", "-run-once"]).is_err());
        assert!(parse(&["-frobnicate"]).is_err());
        assert!(parse(&["-time-out", "soon"]).is_err());
    }
}
