//! Footprint benchmark of `drainer -daemon`: what one agent per node costs a
//! cluster while nothing happens. A harness that reports numbers, not a test
//! with timed assertions; it is `#[ignore]`d so the normal suite never runs it:
//!
//! ```text
//! cargo test --release --test footprint -- --ignored --nocapture
//! ```
//!
//! The release binary (`--release` builds `CARGO_BIN_EXE_drainer` in release)
//! runs against the in-process fake Kubernetes API server of
//! `tests/support/kube_api.rs` and the real OpenStack lab of `tests/lab/`,
//! exactly as in `tests/daemon.rs`. Measured, in this order:
//!
//! 1. **Start-up**: time until `/readyz` answers 200 and the guard pod is
//!    Running, and the peak RSS it left behind (`VmHWM`).
//! 2. **Idle window** (`FOOTPRINT_SECONDS`, default 60 s, after a short
//!    settle): RSS (`VmRSS` max and last, `VmHWM`, anonymous vs file-backed,
//!    threads) from `/proc/PID/status`, and at the end RSS by mapping from
//!    `/proc/PID/smaps` (binary code and data, libraries, heap), to see what
//!    dominates; CPU time (`utime + stime` of `/proc/PID/stat`, 10 ms ticks)
//!    in ms and in % of one core, plus the finer sum of the threads'
//!    `schedstat` (an idle agent uses far less than a tick); Nova + Placement requests
//!    (difference of `nova_drain_nova_requests_total` on `/metrics`, which
//!    does not count Keystone; Keystone token requests and Nova API requests
//!    are cross-checked in the lab's own access logs, which see every client);
//!    Kubernetes requests of the agent (the fake server's request log; the
//!    harness itself sends none during the window).
//! 3. **200 other Nodes change**: 200 Nodes are added, cordoned and
//!    uncordoned (600 changes) while the agent runs. A control watch on all
//!    Nodes, opened by the harness, receives every change; the fake server
//!    counts events over all watch streams, so what reached the agent's
//!    own watch is the total minus the control watch's share. Bookmarks are
//!    counted apart (the control watch asks for none). Also the agent's CPU
//!    and RSS during the phase.
//! 4. **Baseline in the same run**: `/bin/sleep`, started the same way and
//!    sampled in the same idle window, so the agent's RSS is also reported
//!    as a ratio to a trivial process on this machine.
//!
//! Results: a markdown table on stdout, and `target/footprint/footprint.json`
//! and `.md`. The goals of the issue (idle RSS <= 20 MiB, no Nova requests
//! while idle, no watch events from other Nodes) are reported as met or not:
//! data, never a panic. The harness only panics when it cannot measure
//! (lab down, agent not ready).
//!
//! Environment passed through to the agent matters for RSS: run with
//! `MALLOC_ARENA_MAX=2` to compare glibc malloc arena settings; the value is
//! recorded in the report.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, WatchEvent, WatchParams};
use serde_json::{Value, json};
use support::kube_api::KubeApi;
use support::openstack::Lab;
use support::wait::free_port;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

const DRAINER: &str = env!("CARGO_BIN_EXE_drainer");
const NODE: &str = "host1";
const NAMESPACE: &str = "nova-drain";
const GUARD: &str = "nova-drain-guard-host1";

/// Idle window unless `FOOTPRINT_SECONDS` says otherwise.
const DEFAULT_WINDOW: Duration = Duration::from_secs(60);
/// Pause between readiness and the idle window, so start-up work has ended.
const SETTLE: Duration = Duration::from_secs(5);
/// How often `/proc` is read.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// Other Nodes of the "200 other Nodes change" scenario.
const OTHER_NODES: usize = 200;
/// Changes per other Node: ADDED, MODIFIED (cordon), MODIFIED (uncordon).
const CHANGES_PER_NODE: u64 = 3;
/// Pause after the control watch saw every change, so that anything queued
/// for the agent's watch has been delivered and handled.
const CHURN_SETTLE: Duration = Duration::from_secs(2);

const IDLE_RSS_GOAL_KIB: u64 = 20 * 1024;

// ---------------------------------------------------------------------------
// /proc sampling
// ---------------------------------------------------------------------------

/// One reading of `/proc/PID/status` and `/proc/PID/stat`.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    /// `VmRSS`: resident now.
    rss_kib: u64,
    /// `VmHWM`: peak resident since the process started.
    hwm_kib: u64,
    /// `RssAnon`: heap, stacks, other private memory.
    anon_kib: u64,
    /// `RssFile`: mapped files, mostly the binary's own pages.
    file_kib: u64,
    threads: u64,
    /// `utime + stime` in clock ticks, exited threads included.
    cpu_ticks: u64,
    /// On-CPU time in ns from `/proc/PID/task/*/schedstat`: finer than the
    /// ticks, but only threads alive at the reading count.
    cpu_ns: u64,
}

/// Sum of the first field (ns on CPU) of every live thread's `schedstat`.
fn schedstat_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn read_sample(pid: u32) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find_map(|l| l.strip_prefix(name))?;
        line.trim().trim_end_matches("kB").trim().parse().ok()
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields 3.. follow the last ')'.
    let after_comm: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
    // proc(5): utime and stime are fields 14 and 15, i.e. indices 11 and 12 from field 3.
    let utime: u64 = after_comm.get(11)?.parse().ok()?;
    let stime: u64 = after_comm.get(12)?.parse().ok()?;
    Some(Sample {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
        anon_kib: field("RssAnon:").unwrap_or(0),
        file_kib: field("RssFile:").unwrap_or(0),
        threads: field("Threads:").unwrap_or(0),
        cpu_ticks: utime + stime,
        cpu_ns: schedstat_ns(pid),
    })
}

/// `sysconf(_SC_CLK_TCK)` via getconf (100 on Linux in practice).
fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// Resident memory by mapping (`/proc/PID/smaps`), largest first: which
/// part of the RSS is the binary's code and data, the libraries, the heap,
/// other anonymous memory (thread stacks, malloc arenas).
fn rss_by_mapping(pid: u32) -> Vec<(String, u64)> {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return Vec::new();
    };
    let mut by_name: BTreeMap<String, u64> = BTreeMap::new();
    let mut current = String::new();
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if first == "Rss:" {
            let kib: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            *by_name.entry(current.clone()).or_insert(0) += kib;
        } else if !first.ends_with(':') {
            // A mapping header: range, perms, offset, dev, inode, [path].
            // Files are split by permissions: r-xp is code, r--p read-only
            // data, rw-p data written since (private, counted as anonymous).
            let perms = fields.next().unwrap_or("");
            let path = fields.nth(3).unwrap_or("");
            current = match path {
                "" => "[anonymous]".to_string(),
                p if p.starts_with('[') => p.to_string(),
                p => {
                    let file = Path::new(p).file_name().map_or(p.into(), |f| f.to_string_lossy());
                    format!("{file} {perms}")
                }
            };
        }
    }
    let mut sorted: Vec<(String, u64)> = by_name.into_iter().filter(|(_, kib)| *kib > 0).collect();
    sorted.sort_by_key(|(_, kib)| std::cmp::Reverse(*kib));
    sorted
}

/// What one process used over one window.
#[derive(Clone, Copy, Debug)]
struct Usage {
    seconds: f64,
    samples: u32,
    rss_max_kib: u64,
    rss_last_kib: u64,
    hwm_kib: u64,
    anon_last_kib: u64,
    file_last_kib: u64,
    threads_last: u64,
    /// From the clock ticks of `/proc/PID/stat` (resolution 1000 / CLK_TCK ms).
    cpu_ms: f64,
    /// CPU time over wall time, in % of one core.
    cpu_percent: f64,
    /// From `schedstat` (ns resolution, live threads only).
    cpu_ms_schedstat: f64,
}

impl Usage {
    fn to_json(self) -> Value {
        json!({
            "seconds": round(self.seconds, 2),
            "samples": self.samples,
            "rss_max_kib": self.rss_max_kib,
            "rss_last_kib": self.rss_last_kib,
            "hwm_kib": self.hwm_kib,
            "rss_anon_last_kib": self.anon_last_kib,
            "rss_file_last_kib": self.file_last_kib,
            "threads": self.threads_last,
            "cpu_ms": round(self.cpu_ms, 1),
            "cpu_percent_of_one_core": round(self.cpu_percent, 4),
            "cpu_ms_schedstat": round(self.cpu_ms_schedstat, 3),
            "cpu_percent_of_one_core_schedstat": round(self.cpu_ms_schedstat / 10.0 / self.seconds, 5),
        })
    }
}

/// Samples one process in the background until [`Sampler::stop`], which
/// takes a last reading so the window ends exactly there.
struct Sampler {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Usage>,
}

impl Sampler {
    fn start(pid: u32, ticks_per_second: u64) -> Sampler {
        let first = read_sample(pid).unwrap_or_else(|| panic!("process {pid} is gone"));
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let (mut last, mut rss_max, mut samples) = (first, first.rss_kib, 1);
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                let stopping = tokio::select! {
                    _ = tick.tick() => false,
                    _ = &mut stopped => true,
                };
                if let Some(sample) = read_sample(pid) {
                    last = sample;
                    rss_max = rss_max.max(sample.rss_kib);
                    samples += 1;
                }
                if stopping {
                    break;
                }
            }
            let seconds = started.elapsed().as_secs_f64();
            let cpu_ms = last.cpu_ticks.saturating_sub(first.cpu_ticks) as f64 * 1000.0 / ticks_per_second as f64;
            Usage {
                seconds,
                samples,
                rss_max_kib: rss_max,
                rss_last_kib: last.rss_kib,
                hwm_kib: last.hwm_kib,
                anon_last_kib: last.anon_kib,
                file_last_kib: last.file_kib,
                threads_last: last.threads,
                cpu_ms,
                cpu_percent: cpu_ms / 10.0 / seconds,
                cpu_ms_schedstat: last.cpu_ns.saturating_sub(first.cpu_ns) as f64 / 1e6,
            }
        });
        Sampler { stop, task }
    }

    async fn stop(self) -> Usage {
        let _ = self.stop.send(());
        self.task.await.expect("sampler task")
    }
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// A child process killed when dropped; the agent's stderr goes to a log
/// file in `dir` (as a container runtime would take it), shown on failure.
struct Proc {
    child: Child,
    dir: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id().expect("the process is running")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn scratch_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("drainer-footprint-{}-{what}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Both processes are started by this function, so they differ only in program and arguments.
fn spawn(program: &str, args: &[String], dir: PathBuf) -> Proc {
    let stderr = std::fs::File::create(dir.join("stderr.log")).expect("log file");
    let child = Command::new(program)
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("NODE_NAME")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    Proc { child, dir }
}

/// `drainer -daemon` for `host1` against the fake API server and the lab.
fn start_agent(kube: &KubeApi, lab: &Lab, port: u16) -> Proc {
    let dir = scratch_dir("agent");
    kube.write_kubeconfig(dir.join("kubeconfig"));
    std::fs::write(dir.join("config.yaml"), lab.drainer_config()).expect("config");
    let path = |name: &str| dir.join(name).display().to_string();
    let args = [
        "-daemon".to_string(),
        "-config-path".into(),
        path("config.yaml"),
        "--kubeconfig".into(),
        path("kubeconfig"),
        "--node".into(),
        NODE.into(),
        "--namespace".into(),
        NAMESPACE.into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        // No agent pod to read the image from here.
        "--guard-image".into(),
        "localhost/nova-kubernetes-drain:bench".into(),
    ];
    spawn(DRAINER, &args, dir)
}

async fn wait_for(what: &str, limit: Duration, agent: &Proc, mut ready: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready().await {
        assert!(
            Instant::now() < deadline,
            "no measurement: timed out after {limit:?} waiting for {what}; agent log:\n{}",
            agent.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `nova_drain_nova_requests_total` (Nova and Placement requests; Keystone is not counted).
async fn nova_requests(http: &reqwest::Client, base: &str) -> u64 {
    let body = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .expect("GET /metrics")
        .text()
        .await
        .expect("/metrics body");
    body.lines()
        .find_map(|l| l.strip_prefix("nova_drain_nova_requests_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no nova_drain_nova_requests_total in /metrics:\n{body}"))
}

// ---------------------------------------------------------------------------
// Server-side cross-checks
// ---------------------------------------------------------------------------

/// The lab's access logs (`tests/lab/run/log`, or `$OSLAB_RUN/log`): they
/// see every client, so while nobody else uses the lab (we hold
/// `Lab::exclusive`) they confirm the agent's own counter and cover Keystone.
struct LabLogs {
    nova_api: PathBuf,
    keystone: PathBuf,
}

/// Positions in the lab's logs at the start of a window.
struct LogMarks {
    nova_api: Option<u64>,
    keystone: Option<u64>,
}

impl LabLogs {
    fn new() -> LabLogs {
        let run = std::env::var_os("OSLAB_RUN")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lab/run"));
        LabLogs {
            nova_api: run.join("log/nova-api.log"),
            keystone: run.join("log/keystone.log"),
        }
    }

    fn mark(&self) -> LogMarks {
        let len = |p: &Path| std::fs::metadata(p).ok().map(|m| m.len());
        LogMarks {
            nova_api: len(&self.nova_api),
            keystone: len(&self.keystone),
        }
    }

    /// Lines appended since `from` that contain `needle`; `None` if the log is not there.
    fn lines_since(path: &Path, from: Option<u64>, needle: &str) -> Option<Vec<String>> {
        let bytes = std::fs::read(path).ok()?;
        let start = usize::try_from(from?).ok()?.min(bytes.len());
        let text = String::from_utf8_lossy(&bytes[start..]);
        Some(
            text.lines()
                .filter(|l| l.contains(needle))
                .map(str::to_string)
                .collect(),
        )
    }

    /// Requests nova-api served since `marks` (any client), as logged.
    fn nova_api_requests_since(&self, marks: &LogMarks) -> Option<Vec<String>> {
        Self::lines_since(&self.nova_api, marks.nova_api, "nova.osapi_compute.wsgi.server")
    }

    /// Tokens Keystone issued since `marks` (any client; the only Keystone
    /// request the agent makes after start-up is a token renewal), as logged.
    fn keystone_token_issues_since(&self, marks: &LogMarks) -> Option<Vec<String>> {
        Self::lines_since(&self.keystone, marks.keystone, "\"POST /v3/auth/tokens")
    }
}

/// Number of log lines, and the first few (the request part) so a reader
/// can tell whose they are.
fn log_evidence(lines: &Option<Vec<String>>) -> Value {
    match lines {
        None => Value::Null,
        Some(lines) => json!({
            "count": lines.len(),
            "first": lines.iter().take(5).map(|l| request_part(l)).collect::<Vec<_>>(),
        }),
    }
}

/// `"GET /v2.1/... HTTP/1.1" status...` out of an access log line.
fn request_part(line: &str) -> String {
    let from = line.find(" \"").map_or(0, |i| i + 1);
    line[from..].chars().take(160).collect()
}

/// Groups `(method, path?query)` requests as `METHOD path [watch]`, with counts.
fn summarize_requests(requests: &[(String, String)]) -> BTreeMap<String, usize> {
    let mut groups = BTreeMap::new();
    for (method, path_query) in requests {
        let (path, query) = path_query.split_once('?').unwrap_or((path_query, ""));
        let watch = if query.split('&').any(|p| p == "watch=true" || p == "watch=1") {
            " (watch)"
        } else {
            ""
        };
        *groups.entry(format!("{method} {path}{watch}")).or_insert(0) += 1;
    }
    groups
}

/// A watch on every Node without a field selector or bookmarks, opened by
/// the harness: it sees every change of the other Nodes, so its count is
/// the part of the server's total that did not go to the agent.
struct ControlWatch {
    events: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl ControlWatch {
    async fn open(kube: &KubeApi) -> ControlWatch {
        let nodes: Api<Node> = Api::all(kube.kube_client());
        let from = kube.resource_version().to_string();
        let stream = nodes
            .watch(&WatchParams::default().disable_bookmarks(), &from)
            .await
            .expect("control watch");
        let events = Arc::new(AtomicU64::new(0));
        let seen = events.clone();
        let task = tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                if !matches!(event, Ok(WatchEvent::Bookmark(_))) {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        ControlWatch { events, task }
    }

    fn events(&self) -> u64 {
        self.events.load(Ordering::SeqCst)
    }
}

impl Drop for ControlWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// `n/a`, `0`, or the count and the first requests of access log lines.
fn describe_log(lines: &Option<Vec<String>>) -> String {
    match lines {
        None => "n/a (log not found)".to_string(),
        Some(lines) if lines.is_empty() => "0".to_string(),
        Some(lines) => {
            let first: Vec<String> = lines.iter().take(3).map(|l| format!("`{}`", request_part(l))).collect();
            format!("{} ({})", lines.len(), first.join(", "))
        }
    }
}

/// One goal of the issue: met when `measured <= max`.
struct Goal {
    name: &'static str,
    unit: &'static str,
    max: f64,
    measured: f64,
}

impl Goal {
    fn met(&self) -> bool {
        self.measured <= self.max
    }

    fn to_json(&self) -> Value {
        json!({"goal": self.name, "unit": self.unit, "max": self.max, "measured": self.measured, "met": self.met()})
    }
}

/// `N` or `N: METHOD path x count, ...` for the markdown report.
fn describe_requests(requests: &[(String, String)]) -> String {
    if requests.is_empty() {
        return "0".to_string();
    }
    let kinds: Vec<String> = summarize_requests(requests)
        .into_iter()
        .map(|(kind, n)| format!("`{kind}` x{n}"))
        .collect();
    format!("{}: {}", requests.len(), kinds.join(", "))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// Measures the idle footprint of `drainer -daemon` and its reaction to 200
/// other Nodes changing, next to a `/bin/sleep` baseline; prints and writes
/// the report. Goals are reported, not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --release --test footprint -- --ignored --nocapture"]
async fn footprint() {
    let window = std::env::var("FOOTPRINT_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(DEFAULT_WINDOW, Duration::from_secs_f64);
    let ticks = clock_ticks_per_second();
    let release = !cfg!(debug_assertions);
    if !release {
        eprintln!("footprint: this is a debug build; the numbers only mean something with --release");
    }

    let _exclusive = Lab::exclusive().await;
    let lab = Lab::connect().await;
    lab.reset().await;
    let kube = KubeApi::start();
    kube.add_namespace(NAMESPACE);
    kube.add_node(NODE);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client");

    // --- start-up ---
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let agent = start_agent(&kube, &lab, port);
    // The baseline starts alongside, so both have had the same time to settle.
    let baseline_seconds = (window + SETTLE + Duration::from_secs(180)).as_secs().to_string();
    let baseline = spawn("/bin/sleep", &[baseline_seconds], scratch_dir("baseline"));
    wait_for("/readyz 200", Duration::from_secs(60), &agent, async || {
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == reqwest::StatusCode::OK)
    })
    .await;
    let ready_after = started.elapsed();
    wait_for("the guard pod Running", Duration::from_secs(30), &agent, async || {
        let running = kube
            .pod(NAMESPACE, GUARD)
            .and_then(|p| p.status)
            .and_then(|s| s.phase)
            .is_some_and(|p| p == "Running");
        running
            && kube
                .pdbs(NAMESPACE)
                .iter()
                .any(|p| p.metadata.name.as_deref() == Some(GUARD))
    })
    .await;
    let guard_after = started.elapsed();
    tokio::time::sleep(SETTLE).await;
    let after_startup = read_sample(agent.pid()).expect("agent running");
    let agent_watch = kube
        .requests()
        .iter()
        .find(|(m, p)| m == "GET" && p.starts_with("/api/v1/nodes?") && p.contains("watch=true"))
        .map(|(m, p)| format!("{m} {p}"));

    // --- idle window, with the baseline sampled alongside ---
    let logs = LabLogs::new();
    let nova_before = nova_requests(&http, &base).await;
    let kube_before = kube.requests().len();
    let bookmarks_before = kube.bookmarks_sent();
    let events_before = kube.watch_events_sent();
    let marks = logs.mark();
    let agent_sampler = Sampler::start(agent.pid(), ticks);
    let baseline_sampler = Sampler::start(baseline.pid(), ticks);
    tokio::time::sleep(window).await;
    let idle = agent_sampler.stop().await;
    let sleep = baseline_sampler.stop().await;
    let rss_map = rss_by_mapping(agent.pid());
    let kube_idle: Vec<(String, String)> = kube.requests()[kube_before..].to_vec();
    let bookmarks_idle = kube.bookmarks_sent() - bookmarks_before;
    let events_idle = kube.watch_events_sent() - events_before;
    let nova_idle = nova_requests(&http, &base).await.saturating_sub(nova_before);
    let nova_api_idle = logs.nova_api_requests_since(&marks);
    let keystone_idle = logs.keystone_token_issues_since(&marks);
    drop(baseline);

    // --- 200 other Nodes change ---
    let control = ControlWatch::open(&kube).await;
    let watches_open = kube.open_watches();
    let kube_before = kube.requests().len();
    let bookmarks_before = kube.bookmarks_sent();
    let events_before = kube.watch_events_sent();
    let expected = OTHER_NODES as u64 * CHANGES_PER_NODE;
    let churn_sampler = Sampler::start(agent.pid(), ticks);
    let names: Vec<String> = (0..OTHER_NODES).map(|i| format!("other-{i:03}")).collect();
    for name in &names {
        kube.add_node(name);
    }
    for cordon in [true, false] {
        for name in &names {
            kube.set_unschedulable(name, cordon);
            tokio::task::yield_now().await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while control.events() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(CHURN_SETTLE).await;
    let churn = churn_sampler.stop().await;
    let sent_churn = kube.watch_events_sent() - events_before;
    let bookmarks_churn = kube.bookmarks_sent() - bookmarks_before;
    let control_churn = control.events();
    let to_agent_churn = sent_churn.saturating_sub(control_churn);
    let kube_churn: Vec<(String, String)> = kube.requests()[kube_before..].to_vec();
    let agent_alive = read_sample(agent.pid()).is_some();
    drop(control);

    // --- report ---
    let rss_ratio = idle.rss_max_kib as f64 / sleep.rss_max_kib.max(1) as f64;
    let goals = [
        Goal {
            name: "idle RSS (max VmRSS over the idle window)",
            unit: "MiB",
            max: IDLE_RSS_GOAL_KIB as f64 / 1024.0,
            measured: round(idle.rss_max_kib as f64 / 1024.0, 2),
        },
        Goal {
            name: "Nova requests while idle",
            unit: "requests",
            max: 0.0,
            measured: nova_idle as f64,
        },
        Goal {
            name: "watch events from 200 other Nodes reaching the agent",
            unit: "events",
            max: 0.0,
            measured: to_agent_churn as f64,
        },
    ];
    let arena = std::env::var("MALLOC_ARENA_MAX").ok();
    let command: String = ["FOOTPRINT_SECONDS", "MALLOC_ARENA_MAX"]
        .iter()
        .filter_map(|var| std::env::var(var).ok().map(|value| format!("{var}={value} ")))
        .chain(["cargo test --release --test footprint -- --ignored --nocapture".to_string()])
        .collect();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let startup_cpu_ms = after_startup.cpu_ticks as f64 * 1000.0 / ticks as f64;
    let report = json!({
        "command": command,
        "build": if release { "release" } else { "debug" },
        "binary": DRAINER,
        "idle_window_seconds": window.as_secs_f64(),
        "sample_interval_ms": SAMPLE_EVERY.as_millis() as u64,
        "clock_ticks_per_second": ticks,
        "cores": cores,
        "env": {"MALLOC_ARENA_MAX": arena},
        "startup": {
            "ready_after_ms": ready_after.as_millis() as u64,
            "guard_running_after_ms": guard_after.as_millis() as u64,
            "hwm_kib": after_startup.hwm_kib,
            "cpu_ms": startup_cpu_ms,
            "cpu_ms_schedstat": round(after_startup.cpu_ns as f64 / 1e6, 3),
            "agent_node_watch": agent_watch,
        },
        "idle": {
            "agent": idle.to_json(),
            "agent_rss_by_mapping_kib": rss_map.iter().map(|(name, kib)| json!([name, kib])).collect::<Vec<_>>(),
            "baseline_sleep": sleep.to_json(),
            "rss_ratio_to_baseline": round(rss_ratio, 2),
            "nova_requests": nova_idle,
            "nova_requests_note": "nova_drain_nova_requests_total counts Nova and Placement requests, not Keystone",
            "lab_nova_api_requests_any_client": log_evidence(&nova_api_idle),
            "lab_keystone_token_issues_any_client": log_evidence(&keystone_idle),
            "kube_requests": kube_idle.len(),
            "kube_requests_by_kind": summarize_requests(&kube_idle),
            "watch_events_to_agent": events_idle,
            "bookmarks_to_agent": bookmarks_idle,
        },
        "other_nodes": {
            "nodes": OTHER_NODES,
            "changes": expected,
            "open_watches": watches_open,
            "watch_events_sent_total": sent_churn,
            "watch_events_to_control_watch": control_churn,
            "watch_events_to_agent": to_agent_churn,
            "bookmarks_to_agent": bookmarks_churn,
            "agent_kube_requests": kube_churn.len(),
            "agent_kube_requests_by_kind": summarize_requests(&kube_churn),
            "agent": churn.to_json(),
            "agent_still_running": agent_alive,
        },
        "goals": goals.iter().map(Goal::to_json).collect::<Vec<_>>(),
    });

    let mut md = format!("# drainer -daemon footprint\n\n`{command}`\n\n");
    md += &format!(
        "{} build, idle window {:.0} s, /proc sampled every {} ms, CPU ticks of {:.0} ms, {cores} cores, \
         MALLOC_ARENA_MAX={}.\n\n",
        if release { "Release" } else { "DEBUG" },
        idle.seconds,
        SAMPLE_EVERY.as_millis(),
        1000.0 / ticks as f64,
        arena.as_deref().unwrap_or("unset"),
    );
    md += "## Goals\n\n| goal | target | measured | |\n|---|---|---|---|\n";
    for g in &goals {
        let verdict = if g.met() { "met" } else { "**NOT met**" };
        md += &format!(
            "| {} | <= {} {} | {} {} | {verdict} |\n",
            g.name, g.max, g.unit, g.measured, g.unit
        );
    }
    let cpu = |u: &Usage| format!("{:.0} ms ({:.3} ms by schedstat)", u.cpu_ms, u.cpu_ms_schedstat);
    let share = |u: &Usage| {
        format!(
            "{:.4} % ({:.5} % by schedstat)",
            u.cpu_percent,
            u.cpu_ms_schedstat / 10.0 / u.seconds
        )
    };
    md +=
        "\n## Idle (same window for both processes)\n\n| | drainer -daemon | /bin/sleep (baseline) |\n|---|---|---|\n";
    for (name, a, b) in [
        ("VmRSS max", mib(idle.rss_max_kib), mib(sleep.rss_max_kib)),
        ("VmRSS last", mib(idle.rss_last_kib), mib(sleep.rss_last_kib)),
        ("VmHWM (peak since start)", mib(idle.hwm_kib), mib(sleep.hwm_kib)),
        ("RssAnon last", mib(idle.anon_last_kib), mib(sleep.anon_last_kib)),
        ("RssFile last", mib(idle.file_last_kib), mib(sleep.file_last_kib)),
        ("threads", idle.threads_last.to_string(), sleep.threads_last.to_string()),
        ("CPU time", cpu(&idle), cpu(&sleep)),
        ("CPU, % of one core", share(&idle), share(&sleep)),
    ] {
        md += &format!("| {name} | {a} | {b} |\n");
    }
    let top: Vec<String> = rss_map
        .iter()
        .take(8)
        .map(|(name, kib)| format!("{name} {}", mib(*kib)))
        .collect();
    md += &format!("\n- agent RSS / baseline RSS: {rss_ratio:.1}x\n");
    md += &format!("- agent RSS by mapping (smaps): {}\n", top.join(", "));
    md += &format!(
        "- Nova + Placement requests (`nova_drain_nova_requests_total` delta; Keystone not counted): {nova_idle}\n"
    );
    md += &format!(
        "- lab access logs, any client (the harness sends none in the window): nova-api requests {}; \
         Keystone token issues {}\n",
        describe_log(&nova_api_idle),
        describe_log(&keystone_idle)
    );
    md += &format!(
        "- Kubernetes requests by the agent: {}; watch events to it {events_idle}, bookmarks {bookmarks_idle} \
         (the fake server sends one per 5 s, a real one about one per minute)\n",
        describe_requests(&kube_idle)
    );
    md += &format!(
        "- start-up: `/readyz` 200 after {} ms, guard Running after {} ms, peak RSS {}, \
         CPU {startup_cpu_ms:.0} ms ({:.1} ms by schedstat)\n",
        ready_after.as_millis(),
        guard_after.as_millis(),
        mib(after_startup.hwm_kib),
        after_startup.cpu_ns as f64 / 1e6,
    );
    if let Some(watch) = &agent_watch {
        md += &format!("- the agent's Node watch: `{watch}`\n");
    }
    md += &format!(
        "\n## {OTHER_NODES} other Nodes change ({expected} changes: add, cordon, uncordon)\n\n| | |\n|---|---|\n"
    );
    for (name, value) in [
        ("watches open (agent + control)", watches_open.to_string()),
        ("watch events sent by the fake server", sent_churn.to_string()),
        ("... to the control watch (all Nodes)", control_churn.to_string()),
        ("... to the agent's watch", to_agent_churn.to_string()),
        ("bookmarks to the agent", bookmarks_churn.to_string()),
        ("Kubernetes requests by the agent", describe_requests(&kube_churn)),
        ("phase duration", format!("{:.1} s", churn.seconds)),
        ("agent CPU", format!("{}, {} of one core", cpu(&churn), share(&churn))),
        ("agent VmRSS max", mib(churn.rss_max_kib)),
        ("agent still running", agent_alive.to_string()),
    ] {
        md += &format!("| {name} | {value} |\n");
    }

    println!("\n{md}");
    let out = target_dir().join("footprint");
    std::fs::create_dir_all(&out).expect("target/footprint");
    std::fs::write(
        out.join("footprint.json"),
        serde_json::to_string_pretty(&report).expect("json"),
    )
    .expect("footprint.json");
    std::fs::write(out.join("footprint.md"), &md).expect("footprint.md");
    println!("written: {}/footprint.{{json,md}}", out.display());
}
