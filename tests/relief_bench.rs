//! Benchmark of memory relief against the real OpenStack lab: for one
//! scripted pressure curve, the policy of `--relief-choice fewest` (the
//! smallest VM that frees enough, else the largest) against the naive
//! policy `largest` (always the largest VM), run after run, the same VMs on
//! host1, in the same lab. Numbers, not timed assertions; `#[ignore]`d:
//!
//! ```text
//! cargo test --release --test relief_bench -- --ignored --nocapture
//! ```
//!
//! The curve (MiB the guests use beside their VMs' flavor RAM, on a 16 GiB
//! host carrying 2 x 4096 + 3 x 512 + 2 x 64 MiB of VMs; threshold 2048,
//! relieved at 2304, window 3 s): at 0 s 4628 (404 MiB short), at 30 s
//! 3628 (a batch ends), at 60 s 5028 (1400 more), until 90 s. Per policy:
//! the time from each crossing of the threshold to relief (the memory
//! files' history, every 100 ms), the migrations and the RAM moved. Writes
//! `target/bench/relief.md`. Runs: `RELIEF_BENCH_RUNS` (2) per policy.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::cluster::TestCluster;
use support::memory::HostMemory;
use support::openstack::{BootSpec, Lab};
use support::wait::free_port;
use tokio::process::Command;

const DRAINER: &str = env!("CARGO_BIN_EXE_drainer");
const HOST_MIB: u64 = 16384;
const THRESHOLD_MIB: u64 = 2048;
const RELIEVED_MIB: u64 = 2304;
/// The guests' own use over time: (seconds from the start, MiB).
const CURVE: [(u64, u64); 3] = [(0, 4628), (30, 3628), (60, 5028)];
const CURVE_END: Duration = Duration::from_secs(90);

/// What one run of one policy came to.
#[derive(Debug)]
struct Run {
    policy: &'static str,
    /// Seconds from each crossing below the threshold to relief.
    to_relief: Vec<f64>,
    migrations: usize,
    moved_mib: u64,
}

#[tokio::test]
#[ignore = "benchmark: cargo test --release --test relief_bench -- --ignored --nocapture"]
async fn relief_policies_on_a_scripted_pressure_curve() {
    let _exclusive = Lab::exclusive().await;
    let lab = Arc::new(Lab::connect().await);
    let runs: usize = std::env::var("RELIEF_BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(2);
    let mut results = Vec::new();
    for round in 0..runs {
        // Alternating which goes first, so neither always meets a warmer lab.
        let order = if round % 2 == 0 {
            ["fewest", "largest"]
        } else {
            ["largest", "fewest"]
        };
        for policy in order {
            let run = one_run(&lab, policy).await;
            eprintln!("{run:?}");
            results.push(run);
        }
    }
    let table = report(&results);
    println!("{table}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    std::fs::write(dir.join("relief.md"), table).expect("relief.md");
}

/// Fresh VMs on host1, an agent with `--relief-choice policy`, the curve played out.
async fn one_run(lab: &Arc<Lab>, policy: &'static str) -> Run {
    lab.reset().await;
    let cluster = TestCluster::start("host1", "nova-drain", "localhost/nova-kubernetes-drain:test").await;
    let mut vms = lab.boot(BootSpec::new("rb-large").flavor("m1.large").count(2)).await;
    vms.extend(lab.boot(BootSpec::new("rb-small").flavor("m1.small").count(3)).await);
    vms.extend(lab.boot(BootSpec::new("rb-tiny").count(2)).await);
    let dir = std::env::temp_dir().join(format!("drainer-relief-bench-{}-{policy}", std::process::id()));
    let memory = HostMemory::start(lab.clone(), &dir, &[("host1", HOST_MIB)]).await;
    let mut agent = start_agent(&cluster, lab, &dir, &memory, policy).await;
    let started = Instant::now();
    for (at, used) in CURVE {
        tokio::time::sleep_until((started + Duration::from_secs(at)).into()).await;
        memory.set_base_used("host1", used);
    }
    tokio::time::sleep_until((started + CURVE_END).into()).await;
    let _ = agent.start_kill();
    let mut migrations = 0;
    let mut moved_mib = 0;
    for id in &vms {
        let records = lab.live_migrations(id).await;
        if !records.is_empty() {
            migrations += records.len();
            moved_mib += records.len() as u64 * ram_of(&lab.server(id).await);
        }
    }
    Run {
        policy,
        to_relief: times_to_relief(&memory.history("host1")),
        migrations,
        moved_mib,
    }
}

async fn start_agent(
    cluster: &TestCluster,
    lab: &Lab,
    dir: &std::path::Path,
    memory: &HostMemory,
    policy: &str,
) -> tokio::process::Child {
    cluster.write_agent_kubeconfig(&dir.join("kubeconfig")).await;
    let config = format!(
        "{}nova_host: '{{short}}'\nmigration:\n  poll_interval_seconds: 0.2\n",
        lab.drainer_config()
    );
    std::fs::write(dir.join("config.yaml"), config).expect("config");
    let identity = cluster.agent_identity();
    let meminfo = memory.path("host1");
    Command::new(DRAINER)
        .args(["-daemon", "--node", cluster.node(), "--namespace", "nova-drain"])
        .arg("-config-path")
        .arg(dir.join("config.yaml"))
        .arg("--kubeconfig")
        .arg(dir.join("kubeconfig"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(["--memory-relief", "on", "--relief-choice", policy, "--meminfo-path"])
        .arg(meminfo)
        .args(["--memory-threshold", &format!("{THRESHOLD_MIB}Mi")])
        .args(["--memory-margin", &format!("{}Mi", RELIEVED_MIB - THRESHOLD_MIB)])
        .args(["--memory-window", "3", "--memory-sample-interval", "1"])
        .args(["--relief-host-cool-down", "2"])
        .args(&identity.flags)
        .env_remove("KUBECONFIG")
        .env_remove("NODE_NAME")
        .env_remove("POD_NAME")
        .envs(identity.env)
        .kill_on_drop(true)
        .spawn()
        .expect("start drainer -daemon")
}

/// From each fall below the threshold to the next rise to the relieved level.
fn times_to_relief(history: &[(Instant, u64)]) -> Vec<f64> {
    let mut times = Vec::new();
    let mut crossed: Option<Instant> = None;
    for (at, available) in history {
        match crossed {
            None if *available < THRESHOLD_MIB => crossed = Some(*at),
            Some(since) if *available >= RELIEVED_MIB => {
                times.push(at.duration_since(since).as_secs_f64());
                crossed = None;
            }
            _ => {}
        }
    }
    if let Some(since) = crossed {
        // Never relieved within the curve: counted as the rest of it.
        times.push(
            history
                .last()
                .map_or(0.0, |(at, _)| at.duration_since(since).as_secs_f64()),
        );
    }
    times
}

fn ram_of(server: &Value) -> u64 {
    server["flavor"]["ram"].as_u64().unwrap_or(0)
}

fn report(results: &[Run]) -> String {
    let mut table = String::from(
        "| policy | run | episodes | time to relief (s) | total under pressure (s) | migrations | RAM moved (MiB) |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for (i, run) in results.iter().enumerate() {
        let times: Vec<String> = run.to_relief.iter().map(|t| format!("{t:.1}")).collect();
        table.push_str(&format!(
            "| {} | {} | {} | {} | {:.1} | {} | {} |\n",
            run.policy,
            i / 2 + 1,
            run.to_relief.len(),
            times.join(", "),
            run.to_relief.iter().sum::<f64>(),
            run.migrations,
            run.moved_mib
        ));
    }
    table
}
