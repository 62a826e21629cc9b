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
            } => {
                info!(server = %server.id, name = %server.name, %destination, seconds, "migrated")
            }
            Event::MigrationFailed {
                server,
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
            Event::Progress { done, total, in_flight } => {
                if self.progress_line {
                    self.draw(format!("[{done}/{total} VMs done, {in_flight} migrating]"));
                }
            }
        }
    }
}
