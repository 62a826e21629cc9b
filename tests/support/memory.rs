//! Simulated hypervisor memory for the lab's hosts (`host1`..`host4`), for
//! the tests of memory relief.
//!
//! The lab's fake virt driver uses no memory, so the agent's `MemAvailable`
//! would never move. [`HostMemory`] closes the loop instead: every
//! [`TICK`] it lists every server once, charges each running server's flavor
//! RAM to the host Nova places it on (`OS-EXT-SRV-ATTR:host`), and writes one
//! file per host in `/proc/meminfo` format for the agent's `--meminfo-path`:
//!
//! `available = MemTotal - base_used(host) - Σ flavor RAM of its running servers`
//!
//! so a VM that leaves a host gives its memory back there, and only once Nova
//! says it left: during a live migration the server still names its source
//! host, which is where a real VM's memory still is. `base_used` is the
//! scripted part (memory the VMs' flavors do not show: guest growth, the
//! host's own processes), set with [`HostMemory::set_base_used`].
//!
//! ```ignore
//! let lab = Arc::new(Lab::connect().await);
//! let memory = HostMemory::start(lab.clone(), &dir, &[("host1", 8192), ("host2", 8192)]).await;
//! // agent of host1: --meminfo-path memory.path("host1")
//! memory.set_base_used("host1", 7000); // pressure: relief should move VMs off host1
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::task::JoinHandle;

use super::openstack::{Lab, MICROVERSION};

/// How often the files are recomputed (a tick may last longer: the listing
/// is paged, `[api] max_limit` servers a page, and a slow page delays the
/// next tick rather than piling up requests).
pub const TICK: Duration = Duration::from_millis(100);
/// One Nova page may take this long; a hung nova-api costs a few ticks, not the test.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`HostMemory::start`] tries for the first files before it panics.
const START_LIMIT: Duration = Duration::from_secs(30);
/// While Nova keeps failing, one line per this much time (not one per tick).
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Statuses of a server whose guest is not in memory: powered off, suspended
/// to disk, shelved, soft-deleted (powered off until reclaimed). Every other
/// status (ACTIVE, PAUSED, MIGRATING, BUILD, ERROR, ...) is charged: a guest
/// keeps its memory until it is stopped or leaves.
const NOT_IN_MEMORY: [&str; 5] = ["SHUTOFF", "SUSPENDED", "SHELVED", "SHELVED_OFFLOADED", "SOFT_DELETED"];

/// The text of `/proc/meminfo` for a host with `total_mib` of RAM of which
/// `available_mib` is available, laid out as the kernel does (label padded
/// to 16 columns, value right-aligned in 8, `kB` meaning KiB; the
/// `HugePages_*` counts have no unit, as in the kernel's file, so a parser
/// meets them too). `MemFree + Buffers + Cached = MemAvailable`, the rest of
/// the fields are plausible fillers; MiB values convert to kB exactly, so a
/// reader that divides by 1024 gets `available_mib` back.
pub fn meminfo_text(total_mib: u64, available_mib: u64) -> String {
    let available = available_mib.min(total_mib) * 1024;
    let total = total_mib * 1024;
    let used = total - available;
    let buffers = available / 64;
    let cached = available / 8;
    let free = available - buffers - cached;
    let kib = [
        ("MemTotal:", total),
        ("MemFree:", free),
        ("MemAvailable:", available),
        ("Buffers:", buffers),
        ("Cached:", cached),
        ("SwapCached:", 0),
        ("Active:", used / 2 + cached / 2),
        ("Inactive:", used / 2 - used / 4 + cached / 2),
        ("SwapTotal:", 0),
        ("SwapFree:", 0),
        ("Dirty:", 0),
        ("AnonPages:", used / 2),
        ("Shmem:", 0),
        ("Slab:", used / 32),
    ];
    let mut text: String = kib.iter().map(|(k, v)| format!("{k:<16}{v:>8} kB\n")).collect();
    for count in [
        "HugePages_Total:",
        "HugePages_Free:",
        "HugePages_Rsvd:",
        "HugePages_Surp:",
    ] {
        text.push_str(&format!("{count:<16}{:>8}\n", 0));
    }
    text.push_str(&format!("{:<16}{:>8} kB\n", "Hugepagesize:", 2048));
    text
}

/// The simulated memory of some lab hosts and the task that keeps their
/// files current. The task stops when this is dropped (the files stay).
pub struct HostMemory {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

/// What the test and the task both see.
struct Shared {
    dir: PathBuf,
    /// `(host, MemTotal in MiB)`, in the order given to [`HostMemory::start`].
    totals: Vec<(String, u64)>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// MiB used by something other than the VMs, per host (0 when unset).
    base_used: HashMap<String, u64>,
    /// MiB of flavor RAM of the running servers per host, from the last
    /// listing that succeeded.
    vm_used: HashMap<String, u64>,
    /// Every value written per host, with when.
    history: HashMap<String, Vec<(Instant, u64)>>,
}

impl HostMemory {
    /// Writes `dir/<host>.meminfo` for each `(host, MemTotal in MiB)` of
    /// `hosts` from one listing of the servers before it returns (an agent
    /// started afterwards always finds its file; panics if Nova gives no
    /// listing within 30 s), then spawns the task that rewrites them every
    /// [`TICK`]. Call it inside the tokio runtime of the test.
    ///
    /// The task never panics: a failed listing (nova-api killed by a fault
    /// test, Keystone down, a page timing out) is logged and the files keep
    /// their last values until Nova answers again, as a real host's memory
    /// does not jump when its control plane is down.
    pub async fn start(lab: Arc<Lab>, dir: &Path, hosts: &[(&str, u64)]) -> HostMemory {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            totals: hosts.iter().map(|(h, t)| (h.to_string(), *t)).collect(),
            state: Mutex::new(State::default()),
        });
        let nova = Nova::new(lab);
        let deadline = Instant::now() + START_LIMIT;
        loop {
            match nova.vm_used(&shared.totals).await.and_then(|vm| shared.refresh(vm)) {
                Ok(()) => break,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("host memory: first files not written yet, trying again: {e}");
                    tokio::time::sleep(TICK * 5).await;
                }
                Err(e) => panic!("host memory: no first files after {START_LIMIT:?}: {e}"),
            }
        }
        let task = tokio::spawn(run(shared.clone(), nova));
        HostMemory { shared, task }
    }

    /// The directory of the files.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// `dir/<host>.meminfo`: what the agent of `host` gets as `--meminfo-path`.
    pub fn path(&self, host: &str) -> PathBuf {
        self.shared.path(host)
    }

    /// Sets the MiB `host` uses besides its VMs' flavor RAM and rewrites its
    /// file at once, with the VM usage of the last listing: a scripted step
    /// (pressure on, pressure off) is on disk when this returns, not up to a
    /// tick later, so a test or a benchmark can time from this call. The
    /// next tick keeps the value and refreshes the VM part. Panics on a host
    /// not given to [`HostMemory::start`] or a failed write (test code).
    pub fn set_base_used(&self, host: &str, mib: u64) {
        let mut state = self.shared.lock();
        state.base_used.insert(host.to_string(), mib);
        self.shared
            .write_host(&mut state, host)
            .unwrap_or_else(|e| panic!("host memory: {e}"));
    }

    /// The `MemAvailable` last written for `host`, in MiB (`None`: not a host of this simulator).
    pub fn available_mib(&self, host: &str) -> Option<u64> {
        self.shared.lock().history.get(host)?.last().map(|(_, v)| *v)
    }

    /// The flavor RAM (MiB) of the running servers on `host` at the last listing that succeeded.
    pub fn vm_used_mib(&self, host: &str) -> Option<u64> {
        self.shared.lock().vm_used.get(host).copied()
    }

    /// Every `MemAvailable` (MiB) written for `host`, oldest first, with when
    /// it was written (one per tick, plus one per [`HostMemory::set_base_used`]):
    /// a benchmark finds in it when the value crossed a threshold and when
    /// relief brought it back.
    pub fn history(&self, host: &str) -> Vec<(Instant, u64)> {
        self.shared.lock().history.get(host).cloned().unwrap_or_default()
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Shared {
    fn path(&self, host: &str) -> PathBuf {
        self.dir.join(format!("{host}.meminfo"))
    }

    /// The state, also after a panic elsewhere while it was held (the data stays usable).
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a new VM usage and rewrites every host's file. Under the lock,
    /// so a concurrent [`HostMemory::set_base_used`] is never overwritten by
    /// a value computed from the base before it.
    fn refresh(&self, vm_used: HashMap<String, u64>) -> Result<(), String> {
        let mut state = self.lock();
        state.vm_used = vm_used;
        let errors: Vec<String> = self
            .totals
            .iter()
            .filter_map(|(host, _)| self.write_host(&mut state, host).err())
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Writes `host`'s file from the state and records the value.
    fn write_host(&self, state: &mut State, host: &str) -> Result<u64, String> {
        let total = self
            .totals
            .iter()
            .find(|(h, _)| h == host)
            .map(|(_, t)| *t)
            .ok_or_else(|| format!("{host} is not one of the simulated hosts {:?}", self.totals))?;
        let base = state.base_used.get(host).copied().unwrap_or(0);
        let vm = state.vm_used.get(host).copied().unwrap_or(0);
        let available = total.saturating_sub(base).saturating_sub(vm);
        let path = self.path(host);
        write_atomically(&path, &meminfo_text(total, available))
            .map_err(|e| format!("write {}: {e}", path.display()))?;
        state
            .history
            .entry(host.to_string())
            .or_default()
            .push((Instant::now(), available));
        Ok(available)
    }
}

/// Writes a temporary file next to `path` and renames it over `path`: a
/// reader sees the old text or the new one, never a partial file.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// The task: a listing and a rewrite every [`TICK`] until aborted.
async fn run(shared: Arc<Shared>, nova: Nova) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await; // the first tick is immediate; start() has just written
    let mut failures = Failures::default();
    loop {
        interval.tick().await;
        match nova.vm_used(&shared.totals).await.and_then(|vm| shared.refresh(vm)) {
            Ok(()) => failures.ok(),
            Err(e) => failures.failed(&e),
        }
    }
}

/// A run of failed ticks, logged at its start, every [`LOG_EVERY`] and at its end.
#[derive(Default)]
struct Failures {
    streak: u64,
    logged: Option<Instant>,
}

impl Failures {
    fn failed(&mut self, error: &str) {
        self.streak += 1;
        if self.logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            eprintln!(
                "host memory: {error} ({} failed tick(s) in a row; the files keep their last values)",
                self.streak
            );
            self.logged = Some(Instant::now());
        }
    }

    fn ok(&mut self) {
        if self.streak > 0 {
            eprintln!("host memory: files current again after {} failed tick(s)", self.streak);
        }
        *self = Failures::default();
    }
}

/// The listing of the servers, by its own requests rather than
/// [`Lab::all_servers`]: the lab's helpers panic on any failure, right for a
/// test step but not for a task that must outlive a Nova outage.
struct Nova {
    lab: Arc<Lab>,
    http: reqwest::Client,
}

impl Nova {
    fn new(lab: Arc<Lab>) -> Nova {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(2))
            .build()
            .expect("reqwest client");
        Nova { lab, http }
    }

    /// MiB of flavor RAM of the running servers on each host of `totals`
    /// (0 for a host without any). The listing runs in a task of its own, so
    /// a panic in it ([`Lab::token`] panics when Keystone refuses) comes back
    /// as an error; the task is aborted if this future is dropped.
    async fn vm_used(&self, totals: &[(String, u64)]) -> Result<HashMap<String, u64>, String> {
        let (lab, http) = (self.lab.clone(), self.http.clone());
        let mut listing = AbortOnDrop(tokio::spawn(async move { list_servers(&lab, &http).await }));
        let servers = (&mut listing.0).await.map_err(|e| match e.try_into_panic() {
            Ok(panic) => match (panic.downcast_ref::<String>(), panic.downcast_ref::<&str>()) {
                (Some(s), _) => format!("listing the servers panicked: {s}"),
                (_, Some(s)) => format!("listing the servers panicked: {s}"),
                _ => "listing the servers panicked".to_string(),
            },
            Err(e) => format!("listing the servers: {e}"),
        })??;
        vm_used_per_host(&servers, totals)
    }
}

/// Aborts the task when dropped (a [`JoinHandle`] only detaches it).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Every server of every project, all pages of `GET
/// /servers/detail?all_tenants=1` at [`MICROVERSION`] (>= 2.47: each server
/// embeds its flavor, `flavor.ram` in MiB, so one listing a tick is enough).
async fn list_servers(lab: &Lab, http: &reqwest::Client) -> Result<Vec<Value>, String> {
    let token = lab.token("admin").await;
    let mut servers = Vec::new();
    let mut next = Some(format!("{}/servers/detail?all_tenants=1", lab.nova_url()));
    let mut pages = 0;
    while let Some(url) = next.take() {
        pages += 1;
        if pages > 1000 {
            return Err(format!("paging loop listing the servers, at {url}"));
        }
        let response = http
            .get(&url)
            .header("X-Auth-Token", &token)
            .header("Accept", "application/json")
            .header("OpenStack-API-Version", format!("compute {MICROVERSION}"))
            .header("X-OpenStack-Nova-API-Version", MICROVERSION)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| format!("GET {url}: body: {e}"))?;
        if !status.is_success() {
            return Err(format!("GET {url} -> {status}: {text}"));
        }
        let page: Value = serde_json::from_str(&text).map_err(|e| format!("GET {url}: {e}: {text}"))?;
        let items = page["servers"]
            .as_array()
            .ok_or_else(|| format!("GET {url}: no servers: {page}"))?;
        servers.extend(items.iter().cloned());
        next = page["servers_links"]
            .as_array()
            .and_then(|links| links.iter().find(|l| l["rel"] == "next"))
            .and_then(|l| l["href"].as_str())
            .map(str::to_string);
    }
    Ok(servers)
}

/// Sums the flavor RAM of the servers in memory per host of `totals`
/// (servers on other hosts, or on none yet, are left out). A server without
/// `flavor.ram` fails the whole listing rather than being counted as 0,
/// which would free memory that is not free.
fn vm_used_per_host(servers: &[Value], totals: &[(String, u64)]) -> Result<HashMap<String, u64>, String> {
    let mut used: HashMap<String, u64> = totals.iter().map(|(h, _)| (h.clone(), 0)).collect();
    for server in servers {
        let Some(sum) = server["OS-EXT-SRV-ATTR:host"].as_str().and_then(|h| used.get_mut(h)) else {
            continue;
        };
        if NOT_IN_MEMORY.contains(&server["status"].as_str().unwrap_or_default()) {
            continue;
        }
        let ram = server["flavor"]["ram"].as_u64().ok_or_else(|| {
            format!(
                "server {} has no flavor.ram (microversion {MICROVERSION}): {}",
                server["id"], server["flavor"]
            )
        })?;
        *sum += ram;
    }
    Ok(used)
}
