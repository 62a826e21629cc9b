//! Logs and live progress for people watching a run: plain (or JSON) log
//! lines when output goes to a file, a progress line on a terminal.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::{info, warn};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::cli::LogFormat;
use crate::evacuation::{Action, Event, Observer};

/// Set while a progress line is on the terminal, so a log line clears it first.
static PROGRESS_SHOWN: AtomicBool = AtomicBool::new(false);

/// Sets up logging to standard error; `RUST_LOG` overrides the default `info` level.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Stderr)
        .with_target(false);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

struct Stderr;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = StderrLine;

    fn make_writer(&'a self) -> Self::Writer {
        StderrLine
    }
}

/// Writes one log record, clearing a progress line first.
struct StderrLine;

impl Write for StderrLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut stderr = std::io::stderr().lock();
        if PROGRESS_SHOWN.swap(false, Ordering::Relaxed) {
            stderr.write_all(b"\r\x1b[K")?;
        }
        stderr.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Reports engine events as log lines, plus a live progress line on a terminal.
pub struct ConsoleObserver {
    progress_line: bool,
    last: Mutex<String>,
}

impl ConsoleObserver {
    /// `progress_line` only makes sense when standard error is a terminal.
    pub fn new(progress_line: bool) -> Self {
        ConsoleObserver {
            progress_line,
            last: Mutex::new(String::new()),
        }
    }

    /// For a terminal if standard error is one.
    pub fn for_stderr() -> Self {
        Self::new(std::io::stderr().is_terminal())
    }

    fn draw(&self, line: String) {
        let Ok(mut last) = self.last.lock() else { return };
        if *last == line && PROGRESS_SHOWN.load(Ordering::Relaxed) {
            return;
        }
        let mut stderr = std::io::stderr().lock();
        let _ = write!(stderr, "\r\x1b[K{line}");
        let _ = stderr.flush();
        PROGRESS_SHOWN.store(true, Ordering::Relaxed);
        *last = line;
    }

    /// Ends the progress line so the report starts on a fresh line.
    pub fn finish(&self) {
        if PROGRESS_SHOWN.swap(false, Ordering::Relaxed) {
            let _ = writeln!(std::io::stderr());
        }
    }
}

impl Observer for ConsoleObserver {
    fn event(&self, event: &Event<'_>) {
        match event {
            Event::ServiceDisabled { reason } => info!(%reason, "nova-compute service disabled"),
            Event::ServiceAlreadyDisabled { reason, ours } => {
                let reason = reason.unwrap_or("");
                if *ours {
                    info!(%reason, "nova-compute service already disabled by an earlier run; continuing")
                } else {
                    info!(%reason, "nova-compute service already disabled by someone else; it will be left disabled")
                }
            }
            Event::EvacuationStarted { to_move, to_skip } => {
                info!(to_move, to_skip, "evacuation started")
            }
            Event::MigrationStarted {
                server,
                action,
                attempt,
            } => {
                let kind = if *action == Action::ColdMigrate { "cold" } else { "live" };
                info!(server = %server.id, name = %server.name, kind, attempt, "migration started")
            }
            Event::MigrationSucceeded {
                server,
                destination,
                seconds,
                ..
            } => {
                info!(server = %server.id, name = %server.name, %destination, seconds, "migrated")
            }
            Event::MigrationFailed {
                server,
                action: _,
                reason,
                retry_in,
            } => match retry_in {
                Some(delay) => {
                    warn!(server = %server.id, %reason, retry_in_s = delay.as_secs_f64(), "migration failed; will retry")
                }
                None => warn!(server = %server.id, %reason, "migration failed; no attempts left"),
            },
            Event::Intervened { server, what, reason } => {
                warn!(server = %server.id, action = %what, %reason, "intervened in a live migration")
            }
            Event::NotMigratable { server, reason } => {
                warn!(server = %server.id, name = %server.name, status = %server.status, %reason, "VM not moved")
            }
            Event::Stopped { server } => {
                info!(server = %server.id, name = %server.name, "VM stopped for the maintenance; -enable starts it again")
            }
            Event::Progress {
                total,
                moved,
                not_moved,
                running,
                queued_in_nova,
            } => {
                if self.progress_line {
                    self.draw(progress_line(*total, *moved, *not_moved, *running, *queued_in_nova));
                }
            }
        }
    }
}

/// The progress line's text: what moved, what Nova runs and holds queued
/// (with `max_parallel: 1` and `queue_ahead: 1` two are in Nova's hands but
/// one runs), and what will not move, so a time-out never reads as done.
pub fn progress_line(total: usize, moved: usize, not_moved: usize, running: usize, queued_in_nova: usize) -> String {
    let mut line = format!("[{moved}/{total} VMs moved, {running} migrating");
    if queued_in_nova > 0 {
        line.push_str(&format!(", {queued_in_nova} queued in Nova"));
    }
    if not_moved > 0 {
        line.push_str(&format!(", {not_moved} not moved"));
    }
    line.push(']');
    line
}

/// The width the human report fits when standard output is a terminal:
/// `COLUMNS` when set (as `ls` and Python's `shutil` honour it), else the
/// terminal's own. `None` when standard output is not a terminal, even with
/// `COLUMNS` exported (as CI runners and some shells do): a report piped to
/// a file or `grep` keeps every id and name whole.
pub fn report_width() -> Option<usize> {
    let stdout = std::io::stdout();
    if !stdout.is_terminal() {
        return None;
    }
    let columns = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<usize>().ok());
    if let Some(columns) = columns.filter(|c| *c > 0) {
        return Some(columns);
    }
    match rustix::termios::tcgetwinsize(&stdout) {
        Ok(size) if size.ws_col > 0 => Some(usize::from(size.ws_col)),
        // A terminal that does not tell its size (a serial console): the classic width.
        _ => Some(DEFAULT_TERMINAL_WIDTH),
    }
}

/// Columns assumed for a terminal that does not tell its size.
const DEFAULT_TERMINAL_WIDTH: usize = 80;

/// Prometheus metrics of the agent, served on `/metrics`.
pub mod metrics {
    use std::sync::atomic::{AtomicU64, Ordering};

    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
    use prometheus_client::registry::Registry;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct OutcomeLabel {
        pub outcome: String,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct PhaseLabel {
        pub phase: String,
    }

    /// Every metric the agent exports.
    pub struct Metrics {
        registry: Registry,
        /// Finished migrations by outcome (migrated, failed, aborted, ...).
        pub migrations: Family<OutcomeLabel, Counter>,
        /// Seconds from a VM's first migration request to its outcome.
        pub migration_duration: Histogram,
        /// VMs still on the hypervisor during an evacuation.
        pub vms_remaining: Gauge,
        /// 1 for the current evacuation phase, 0 for the others.
        pub phase: Family<PhaseLabel, Gauge>,
        /// 1 while the guard pod does its job (Running, or held by our finalizer), 0 when drains may not wait.
        pub guard_ready: Gauge,
        /// What `/readyz` says, for alerting where the scrape does not see readiness.
        pub agent_ready: Gauge,
        /// 1 while this node waits for one of the cluster's evacuation slots.
        pub waiting: Gauge,
        /// This node's place in the queue (1: next), 0 when not waiting.
        pub queue_position: Gauge,
        /// 1 while this node holds an evacuation slot.
        pub slot_held: Gauge,
        /// Seconds each evacuation waited for its slot.
        pub slot_wait: Histogram,
        /// Times a held slot could not be renewed in time (the run stopped).
        pub slots_lost: Counter,
        pub relief: ReliefMetrics,
        nova_requests: Counter,
        nova_errors: Counter,
        seen_requests: AtomicU64,
        seen_errors: AtomicU64,
    }

    impl Default for Metrics {
        fn default() -> Self {
            let mut registry = Registry::with_prefix("nova_drain");
            let migrations = Family::<OutcomeLabel, Counter>::default();
            registry.register("migrations", "Finished VM migrations by outcome", migrations.clone());
            let migration_duration = Histogram::new(exponential_buckets(1.0, 2.0, 14));
            registry.register(
                "migration_duration_seconds",
                "Time from a VM's first migration request to its outcome",
                migration_duration.clone(),
            );
            let vms_remaining = Gauge::default();
            registry.register("vms_remaining", "VMs still on the hypervisor", vms_remaining.clone());
            let phase = Family::<PhaseLabel, Gauge>::default();
            registry.register(
                "evacuation_phase",
                "Current evacuation phase (1 = current)",
                phase.clone(),
            );
            let guard_ready = Gauge::default();
            guard_ready.set(1);
            registry.register(
                "guard_ready",
                "1 while the drain guard pod is Running or held by its finalizer; 0 when drains may not wait for the VMs",
                guard_ready.clone(),
            );
            let agent_ready = Gauge::default();
            registry.register(
                "agent_ready",
                "1 when /readyz answers 200: the node is watched, Nova answers, the guard holds",
                agent_ready.clone(),
            );
            let waiting = Gauge::default();
            registry.register(
                "waiting",
                "1 while this node waits for one of the cluster's evacuation slots",
                waiting.clone(),
            );
            let queue_position = Gauge::default();
            registry.register(
                "queue_position",
                "This node's place in the cluster's queue for evacuation slots (1 = next), 0 when not waiting",
                queue_position.clone(),
            );
            let slot_held = Gauge::default();
            registry.register(
                "slot_held",
                "1 while this node holds an evacuation slot",
                slot_held.clone(),
            );
            let slot_wait = Histogram::new(exponential_buckets(1.0, 2.0, 14));
            registry.register(
                "slot_wait_seconds",
                "Time an evacuation waited for one of the cluster's evacuation slots",
                slot_wait.clone(),
            );
            let slots_lost = Counter::default();
            registry.register(
                "slots_lost",
                "Times a held evacuation slot could not be renewed in time, so the run stopped",
                slots_lost.clone(),
            );
            let nova_requests = Counter::default();
            registry.register(
                "nova_requests",
                "Requests sent to Nova and Placement",
                nova_requests.clone(),
            );
            let nova_errors = Counter::default();
            registry.register(
                "nova_api_errors",
                "Nova/Placement requests that failed with a transport error, 5xx or 429",
                nova_errors.clone(),
            );
            let relief = ReliefMetrics::register(&mut registry);
            Metrics {
                registry,
                relief,
                migrations,
                migration_duration,
                vms_remaining,
                phase,
                guard_ready,
                agent_ready,
                waiting,
                queue_position,
                slot_held,
                slot_wait,
                slots_lost,
                nova_requests,
                nova_errors,
                seen_requests: AtomicU64::new(0),
                seen_errors: AtomicU64::new(0),
            }
        }
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct ResultLabel {
        pub result: String,
    }

    /// Memory relief's metrics.
    pub struct ReliefMetrics {
        /// `MemAvailable` as last read, in bytes.
        pub memory_available: Gauge,
        /// 1 while the memory is below the threshold for the window (relief wanted), else 0.
        pub under_pressure: Gauge,
        /// Seconds spent under pressure (sustained), summed.
        pub pressure_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
        /// Times pressure began (sustained for the window).
        pub pressure_episodes: Counter,
        /// Relief moves by result: succeeded, failed, proposed (dry run).
        pub moves: Family<ResultLabel, Counter>,
        /// Memory moved off the host by relief moves that succeeded (flavor RAM), in bytes.
        pub freed_bytes: Counter,
        /// Seconds from the first reading below the threshold to relief.
        pub time_to_relief: Histogram,
    }

    impl ReliefMetrics {
        fn register(registry: &mut Registry) -> ReliefMetrics {
            let metrics = ReliefMetrics {
                memory_available: Gauge::default(),
                under_pressure: Gauge::default(),
                pressure_seconds: Counter::default(),
                pressure_episodes: Counter::default(),
                moves: Family::default(),
                freed_bytes: Counter::default(),
                time_to_relief: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            };
            let relief = registry.sub_registry_with_prefix("memory");
            relief.register(
                "available_bytes",
                "MemAvailable of the hypervisor as last read",
                metrics.memory_available.clone(),
            );
            relief.register(
                "pressure",
                "1 while MemAvailable has stayed below the threshold for the window",
                metrics.under_pressure.clone(),
            );
            relief.register(
                "pressure_seconds",
                "Time spent under sustained memory pressure",
                metrics.pressure_seconds.clone(),
            );
            relief.register(
                "pressure_episodes",
                "Times memory pressure was sustained for the window",
                metrics.pressure_episodes.clone(),
            );
            relief.register("relief_moves", "Memory relief moves by result", metrics.moves.clone());
            relief.register(
                "relief_freed_bytes",
                "Flavor RAM of the VMs moved off by memory relief",
                metrics.freed_bytes.clone(),
            );
            relief.register(
                "time_to_relief_seconds",
                "Time from the first reading below the threshold to relief",
                metrics.time_to_relief.clone(),
            );
            metrics
        }
    }

    impl Metrics {
        /// Marks `current` as the phase.
        pub fn set_phase(&self, current: &str, all: &[&str]) {
            for phase in all {
                let value = i64::from(*phase == current);
                self.phase
                    .get_or_create(&PhaseLabel {
                        phase: phase.to_string(),
                    })
                    .set(value);
            }
        }

        /// Counts each VM of a finished run once, by its outcome, and the time the moved ones took.
        pub fn record_report(&self, report: &crate::evacuation::Report) {
            for vm in &report.vms {
                let Ok(serde_json::Value::String(outcome)) = serde_json::to_value(&vm.outcome) else {
                    continue;
                };
                self.migrations.get_or_create(&OutcomeLabel { outcome }).inc();
                if vm.outcome == crate::evacuation::Outcome::Migrated {
                    self.migration_duration.observe(vm.duration_seconds);
                }
            }
        }

        /// The text exposition, with the Nova client's running totals brought up to date.
        pub fn render(&self, nova_requests: u64, nova_errors: u64) -> String {
            let previous = self.seen_requests.swap(nova_requests, Ordering::Relaxed);
            self.nova_requests.inc_by(nova_requests.saturating_sub(previous));
            let previous = self.seen_errors.swap(nova_errors, Ordering::Relaxed);
            self.nova_errors.inc_by(nova_errors.saturating_sub(previous));
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, &self.registry) {
                Ok(()) => out,
                Err(_) => String::from("# encoding failed\n"),
            }
        }
    }
}

/// The agent's small HTTP server: `/metrics`, `/healthz`, `/readyz`.
pub mod server {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex, OnceLock};

    use axum::Router;
    use axum::extract::State;
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    use axum::routing::get;
    use tracing::{error, info};

    use super::metrics::Metrics;
    use crate::nova::NovaClient;

    /// The Nova client once it is connected (the agent starts without it when Nova is down).
    pub type NovaSlot = Arc<OnceLock<Arc<NovaClient>>>;

    /// What `/readyz` reports: the agent is ready once it has listed its Node and
    /// reached Nova, and while its guard can keep drains waiting.
    #[derive(Clone, Default)]
    pub struct Health {
        node_listed: Arc<AtomicBool>,
        compute_ready: Arc<AtomicBool>,
        guard_problem: Arc<Mutex<Option<String>>>,
    }

    impl Health {
        pub fn set_node_listed(&self) {
            self.node_listed.store(true, Ordering::Relaxed);
        }

        pub fn set_compute_ready(&self) {
            self.compute_ready.store(true, Ordering::Relaxed);
        }

        /// Why drains may not wait for the VMs (`None`: they will).
        pub fn set_guard_problem(&self, problem: Option<String>) {
            if let Ok(mut slot) = self.guard_problem.lock() {
                *slot = problem;
            }
        }

        /// `Ok` when ready, else why not.
        pub fn readiness(&self) -> Result<(), String> {
            if !self.node_listed.load(Ordering::Relaxed) {
                return Err("waiting for the node watch".into());
            }
            if !self.compute_ready.load(Ordering::Relaxed) {
                return Err("waiting for Nova and Keystone to answer".into());
            }
            match self.guard_problem.lock().ok().and_then(|p| p.clone()) {
                Some(problem) => Err(problem),
                None => Ok(()),
            }
        }
    }

    #[derive(Clone)]
    struct AppState {
        metrics: Arc<Metrics>,
        nova: NovaSlot,
        health: Health,
    }

    /// Serves in the background; a port that cannot be bound is logged, not fatal.
    pub fn spawn(listen: SocketAddr, metrics: Arc<Metrics>, nova: NovaSlot, health: Health) {
        let app = Router::new()
            .route("/metrics", get(render))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(ready))
            .with_state(AppState { metrics, nova, health });
        tokio::spawn(async move {
            match tokio::net::TcpListener::bind(listen).await {
                Ok(listener) => {
                    info!(%listen, "serving /metrics, /healthz, /readyz");
                    if let Err(e) = axum::serve(listener, app).await {
                        error!("HTTP server failed: {e}");
                    }
                }
                Err(e) => error!("cannot listen on {listen}: {e}"),
            }
        });
    }

    async fn render(State(state): State<AppState>) -> impl IntoResponse {
        let (requests, errors) = state.nova.get().map_or((0, 0), |nova| (nova.requests(), nova.errors()));
        state
            .metrics
            .agent_ready
            .set(i64::from(state.health.readiness().is_ok()));
        let body = state.metrics.render(requests, errors);
        (
            // prometheus-client writes OpenMetrics (`# EOF`, `_total` counters), not the 0.0.4 text format.
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
    }

    async fn ready(State(state): State<AppState>) -> impl IntoResponse {
        match state.health.readiness() {
            Ok(()) => (StatusCode::OK, "ready\n".to_string()),
            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::progress_line;

    #[test]
    fn the_progress_line_tells_running_queued_and_not_moved_apart() {
        // max_parallel 1, queue_ahead 1: one runs, one waits in Nova (it read "2 migrating").
        assert_eq!(
            progress_line(4, 0, 0, 1, 1),
            "[0/4 VMs moved, 1 migrating, 1 queued in Nova]"
        );
        // After a time-out: one moved, two not (it read "3/3 VMs done").
        assert_eq!(
            progress_line(3, 1, 2, 0, 0),
            "[1/3 VMs moved, 0 migrating, 2 not moved]"
        );
    }
}
