//! `drainer`: wires the command line, configuration, Nova client and
//! evacuation engine together. All logic lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use nova_kubernetes_drain::cli::{self, Cli, Command, CrdKind, Output};
use nova_kubernetes_drain::config::{self, CloudIdentity, Config, ProcessEnvironment};
use nova_kubernetes_drain::daemon::coordinator::CoordinationSettings;
use nova_kubernetes_drain::daemon::queue::{Limits, ZoneRule};
use nova_kubernetes_drain::daemon::release::{GuardRelease, release_guards};
use nova_kubernetes_drain::daemon::relief::{ClusterMode, ReliefSettings};
use nova_kubernetes_drain::daemon::{DaemonSettings, RetryBackoff};
use nova_kubernetes_drain::evacuation::{
    Engine, EvacuationError, Report, RestoreOptions, StopRequest, Target, View, report,
};
use nova_kubernetes_drain::kube::Guard;
use nova_kubernetes_drain::nova::NovaClient;
use nova_kubernetes_drain::pressure::choice::Policy;
use nova_kubernetes_drain::pressure::detector::PressureRule;
use nova_kubernetes_drain::{exit, telemetry};
use tokio::sync::watch;
use tracing::{error, info, warn};

fn main() -> ExitCode {
    let cli = match Cli::parse_compatible(std::env::args()) {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            eprintln!("{}", cli::one_line(&e));
            return ExitCode::from(exit::USAGE as u8);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(0);
        }
    };
    telemetry::init(cli.log_format);
    if matches!(cli.command, Some(Command::Guard)) {
        return ExitCode::from(guard() as u8);
    }
    if let Some(Command::Crd { kind }) = cli.command {
        let yaml = match kind {
            CrdKind::Evacuations => nova_kubernetes_drain::kube::evacuation::crd_yaml(),
            CrdKind::Vmmigrations => nova_kubernetes_drain::kube::relief::crd_yaml(),
        };
        return match yaml {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                error!("{e}");
                ExitCode::from(exit::FAILED as u8)
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILED as u8);
        }
    };
    ExitCode::from(runtime.block_on(run(cli)) as u8)
}

/// The guard pod's process: one thread, no configuration, no network; waits to be told to stop.
fn guard() -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return exit::FAILED;
        }
    };
    runtime.block_on(async {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(e) => {
                error!("cannot listen for SIGTERM: {e}");
                return exit::FAILED;
            }
        };
        info!("guarding: `kubectl drain` of this node waits until the agent has emptied its hypervisor");
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        exit::DONE
    })
}

/// Fails with a one-line message and exit code 2.
fn usage(message: impl std::fmt::Display) -> i32 {
    error!("{message}");
    exit::USAGE
}

async fn run(cli: Cli) -> i32 {
    if let Some(Command::ReleaseGuard { node, all, force }) = &cli.command {
        return release_guard(&cli, node.as_deref(), *all, *force).await;
    }
    let mut config = match load_config(&cli) {
        Ok(config) => config,
        Err(e) => return usage(e),
    };
    apply_flags(&cli, &mut config);
    let node = match node_name(&cli) {
        Ok(node) => node,
        Err(e) => return usage(e),
    };
    let run = match (&cli.daemon, &cli.pod_name) {
        (true, Some(pod)) => format!("agent {pod}"),
        (true, None) => format!("agent drainer-{node}"),
        (false, _) => format!(
            "run-once on {} pid {}",
            hostname().unwrap_or_else(|| "unknown host".into()),
            std::process::id()
        ),
    };
    let target = Target {
        host: config.nova_host_for(&node),
        node,
        run,
    };
    if cli.daemon {
        info!("cloud: {}", config.cloud);
        // The agent reaches Nova by itself, with backoff: an outage at start-up must not crash-loop it.
        return daemon(&cli, config, target).await;
    }
    let client = match NovaClient::connect(&config.credentials, config.compute_api_version).await {
        Ok(client) => client,
        Err(e) => return usage(format!("cannot use the cloud: {e}")),
    };
    // Said once Keystone took the credentials, before anything changes (bad input stays one line).
    info!("cloud: {}", config.cloud);
    info!(node = %target.node, host = %target.host, microversion = %client.microversion(), "connected to Nova");

    let observer = telemetry::ConsoleObserver::for_stderr();
    let engine = Engine::new(&client, &config.evacuation, &observer);
    if cli.enable {
        return enable(&cli, &engine, &target).await;
    }
    let result = if cli.dry_run {
        engine.preview(&target).await
    } else {
        let (stop_tx, stop_rx) = watch::channel(StopRequest::Continue);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                warn!("interrupted: starting no more migrations, leaving in-flight ones to Nova");
                let _ = stop_tx.send(StopRequest::LeaveInFlight);
            }
        });
        engine.evacuate(&target, stop_rx).await
    };
    observer.finish();
    match result {
        Ok(report) => {
            print_report(&report, &config.cloud, cli.output, &report_view(&cli));
            info!(nova_requests = client.requests(), "done");
            report.exit_code()
        }
        Err(e) => fail(e),
    }
}

/// `drainer -enable`: re-enables the service if our marker is its reason
/// and starts the VMs we stopped for the maintenance.
async fn enable(cli: &Cli, engine: &Engine<'_, NovaClient>, target: &Target) -> i32 {
    let options = RestoreOptions {
        even_while_moving: cli.force,
        dry_run: cli.dry_run,
    };
    match engine.restore_and_start(target, options).await {
        Ok(restored) => {
            match cli.output {
                Output::Json => {
                    let json = serde_json::json!({
                        "host": target.host,
                        "node": target.node,
                        "restore": restored.outcome,
                        "started": restored.restarts,
                    });
                    println!("{json:#}");
                }
                Output::Human => println!("{}", restored.describe(&target.host)),
            }
            restored.exit_code()
        }
        Err(e) => fail(e),
    }
}

/// `drainer release-guard`: releases the guard of `node` (or of every node, `all`).
async fn release_guard(cli: &Cli, node: Option<&str>, all: bool, force: bool) -> i32 {
    let kube = match kube_client(cli).await {
        Ok(client) => client,
        Err(e) => return usage(format!("cannot use the Kubernetes API: {e}")),
    };
    // Nova is asked only without --force, so a cloud that is down does not block the release.
    let (config, nova) = if force {
        (None, None)
    } else {
        let config = match load_config(cli) {
            Ok(config) => config,
            Err(e) => return usage(e),
        };
        match NovaClient::connect(&config.credentials, config.compute_api_version).await {
            Ok(client) => {
                info!("cloud: {}", config.cloud);
                (Some(config), Some(client))
            }
            Err(e) => return usage(format!("cannot use the cloud (--force releases without it): {e}")),
        }
    };
    let only = node.filter(|_| !all);
    let guards = match only {
        Some(node) => vec![Guard::new(kube.clone(), &cli.namespace, node)],
        None => match Guard::all_in(kube.clone(), &cli.namespace).await {
            Ok(guards) => guards,
            Err(e) => {
                error!("cannot list the guards in namespace {}: {e}", cli.namespace);
                return exit::FAILED;
            }
        },
    };
    let host_of = |node: &str| {
        config
            .as_ref()
            .map_or_else(|| node.to_string(), |c| c.nova_host_for(node))
    };
    let mut outcomes = release_guards(guards, nova.as_ref(), host_of).await;
    // A node whose guard stays (VMs still run there, or it could not be
    // released) keeps its Evacuations held too: its maintenance is not over.
    let kept: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.done())
        .map(|o| o.node().to_string())
        .collect();
    let keep = |node: &str| kept.iter().any(|k| k == node);
    match nova_kubernetes_drain::kube::evacuation::let_go_all(kube, only, keep).await {
        Ok(let_go) => outcomes.extend(
            let_go
                .into_iter()
                .map(|(evacuation, node)| GuardRelease::EvacuationLetGo { node, evacuation }),
        ),
        // Without the CRD there is nothing to let go.
        Err(nova_kubernetes_drain::kube::FinalizerError::Api(kube::Error::Api(status))) if status.code == 404 => {}
        Err(e) => outcomes.push(GuardRelease::Failed {
            node: only.unwrap_or("*").to_string(),
            error: format!("taking our finalizer off Evacuations: {e}"),
        }),
    }
    match cli.output {
        Output::Json => match serde_json::to_string_pretty(&outcomes) {
            Ok(json) => println!("{json}"),
            Err(e) => error!("cannot render the outcome: {e}"),
        },
        Output::Human if outcomes.is_empty() => println!("no guard of ours in namespace {}", cli.namespace),
        Output::Human => outcomes.iter().for_each(|o| println!("{}", o.describe())),
    }
    if outcomes.iter().all(GuardRelease::done) {
        exit::DONE
    } else {
        exit::FAILED
    }
}

/// The Kubernetes client: `--kubeconfig`, else `$KUBECONFIG` or the in-cluster service account.
async fn kube_client(cli: &Cli) -> Result<kube::Client, String> {
    let kube_config = match &cli.kubeconfig {
        Some(path) => match kube::config::Kubeconfig::read_from(path) {
            Ok(file) => kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
        None => kube::Config::infer().await.map_err(|e| e.to_string()),
    };
    kube_config.and_then(|c| kube::Client::try_from(c).map_err(|e| e.to_string()))
}

/// Runs the agent of a DaemonSet pod until it is told to stop.
async fn daemon(cli: &Cli, config: Config, target: Target) -> i32 {
    let kube = match kube_client(cli).await {
        Ok(client) => client,
        Err(e) => return usage(format!("cannot use the Kubernetes API: {e}")),
    };
    let relief = relief_settings(cli);
    let coordination = match coordination_settings(cli, relief.as_ref()) {
        Ok(coordination) => coordination,
        Err(why) => return usage(why),
    };
    let settings = DaemonSettings {
        coordination,
        relief,
        namespace: cli.namespace.clone(),
        guard_image: cli.guard_image.clone(),
        own_pod: cli.pod_name.clone(),
        guard_grace: Duration::from_secs(cli.guard_grace),
        listen: cli.listen,
        release_guard_on_failure: cli.release_guard_on_failure,
        start_paused: cli.start_paused,
        retry: RetryBackoff {
            first: Duration::from_secs(cli.retry_after_failure.max(1)),
            max: Duration::from_secs(cli.max_retry_after_failure.max(1)),
        },
        instance: cli
            .pod_name
            .clone()
            .unwrap_or_else(|| format!("drainer-{}", target.node)),
        target,
    };
    nova_kubernetes_drain::daemon::run(settings, config, kube).await
}

/// The cluster's evacuation slots and live migrations (`None`: agents not
/// coordinated); the relief migrations are taken out of the live migrations
/// when relief may move VMs.
fn coordination_settings(cli: &Cli, relief: Option<&ReliefSettings>) -> Result<Option<CoordinationSettings>, String> {
    if cli.max_evacuating == 0 {
        return Ok(None);
    }
    let reserved = match relief.map(|r| r.mode) {
        Some(ClusterMode::Nodes | ClusterMode::On) => cli.relief_migrations,
        _ => 0,
    };
    let migrations = cli.max_live_migrations.saturating_sub(reserved);
    if migrations < cli.max_evacuating {
        let relief = if reserved > 0 {
            format!(" once --relief-migrations {reserved} are set aside for memory relief")
        } else {
            String::new()
        };
        return Err(format!(
            "--max-live-migrations {}{relief} is below --max-evacuating {}: every evacuating hypervisor needs at \
             least one",
            cli.max_live_migrations, cli.max_evacuating
        ));
    }
    Ok(Some(CoordinationSettings {
        limits: Limits {
            slots: cli.max_evacuating,
            migrations,
            zones: match cli.evacuating_zones {
                cli::Zones::Any => ZoneRule::Any,
                cli::Zones::Same => ZoneRule::Same,
                cli::Zones::Different => ZoneRule::Different,
            },
        },
        lease: Duration::from_secs(cli.slot_lease),
    }))
}

/// Memory relief as the flags set it; `None`: off.
fn relief_settings(cli: &Cli) -> Option<ReliefSettings> {
    let mode = match cli.memory_relief {
        cli::MemoryRelief::Off => return None,
        cli::MemoryRelief::Nodes => ClusterMode::Nodes,
        cli::MemoryRelief::On => ClusterMode::On,
        cli::MemoryRelief::DryRun => ClusterMode::DryRun,
    };
    Some(ReliefSettings {
        mode,
        meminfo: cli.meminfo_path.clone(),
        rule: PressureRule {
            threshold: cli.memory_threshold,
            window: Duration::from_secs(cli.memory_window),
            margin: cli.memory_margin,
        },
        sample_every: Duration::from_secs(cli.memory_sample_interval),
        policy: match cli.relief_choice {
            cli::ReliefChoice::Fewest => Policy::Fewest,
            cli::ReliefChoice::Largest => Policy::Largest,
        },
        vm_cool_down: Duration::from_secs(cli.relief_vm_cool_down),
        host_cool_down: Duration::from_secs(cli.relief_host_cool_down),
        cap: cli.relief_migrations,
        lease: Duration::from_secs(cli.slot_lease),
    })
}

fn fail(error: EvacuationError) -> i32 {
    error!("{error}");
    if error.is_usage() { exit::USAGE } else { exit::FAILED }
}

/// The flags that override the config file (checked by clap already).
fn apply_flags(cli: &Cli, config: &mut Config) {
    if let Some(time_out) = cli.time_out {
        config.evacuation.timeout = Some(time_out);
    }
    if cli.skip_capacity_check {
        config.evacuation.check_capacity = false;
    }
    if let Some(action) = cli.vm_action {
        config.evacuation.node_default = Some(action);
    }
}

/// `drainer NODE`, `--node` or `NODE_NAME` (set from the downward API in a DaemonSet), else the hostname.
fn node_name(cli: &Cli) -> Result<String, String> {
    if let Some(node) = cli.node.clone() {
        let node = node.trim().to_string();
        if node.is_empty() {
            return Err("the node name is empty (--node / NODE_NAME)".into());
        }
        return Ok(node);
    }
    let node = hostname().ok_or_else(|| "cannot tell the node name: pass --node or set NODE_NAME".to_string())?;
    warn!("no --node and no NODE_NAME: acting on this machine's own node {node} (its hostname)");
    Ok(node)
}

/// This machine's hostname, as the kernel has it.
fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
}

/// The config named by the flags (or `./config.yaml`, or the environment
/// alone), after warning of each `OS_*` value the config file overrides.
fn load_config(cli: &Cli) -> Result<Config, config::ConfigError> {
    let explicit = cli.config_path.is_some();
    let path = cli.config_path.clone().unwrap_or_else(|| PathBuf::from("config.yaml"));
    let config = config::load(&path, explicit, cli.os_cloud.as_deref(), &ProcessEnvironment)?;
    for overridden in &config.cloud.overridden {
        warn!("{overridden}: the config file wins (leave the key out of the file to use the environment)");
    }
    Ok(config)
}

/// Where the human report is read: the terminal's width, and the command
/// its next steps name, with the config file this run used.
fn report_view(cli: &Cli) -> View {
    let mut command = "drainer".to_string();
    if let Some(path) = &cli.config_path {
        command.push_str(&format!(" -config-path {}", shell_word(&path.display().to_string())));
    }
    if let Some(cloud) = &cli.os_cloud {
        command.push_str(&format!(" --os-cloud {}", shell_word(cloud)));
    }
    View {
        width: telemetry::report_width(),
        command,
    }
}

/// `word` as a shell reads it back: quoted when it holds more than plain path characters.
fn shell_word(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+:@%,=".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The report, with the cloud it was made on.
fn print_report(report: &Report, cloud: &CloudIdentity, output: Output, view: &View) {
    match output {
        Output::Human => print!(
            "{}{}",
            report::fit(&format!("cloud: {cloud}"), view.width),
            report.to_human(view)
        ),
        Output::Json => {
            let json = serde_json::to_value(report).map(|mut json| {
                json["cloud"] = serde_json::json!(cloud);
                json
            });
            match json.and_then(|json| serde_json::to_string_pretty(&json)) {
                Ok(json) => println!("{json}"),
                Err(e) => error!("cannot render the report: {e}"),
            }
        }
    }
}
