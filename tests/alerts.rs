//! The alerting rules of `deploy/alerts/`, checked and unit-tested with the
//! real `promtool` (Debian's `prometheus` package; `.ci/run` installs it).
//! That the series they use exist in a real scrape of the agent is checked by
//! `tests/daemon.rs` (`the_guard_runs_the_agents_image_and_its_budget_is_computed`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn alerts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/alerts")
}

/// `promtool ARGS` in `deploy/alerts/`: its output, or a failure naming it.
fn promtool(args: &[&str]) -> String {
    let binary = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let output = Command::new(&binary)
        .args(args)
        .current_dir(alerts_dir())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {binary} ({e}): apt-get install prometheus, or set PROMTOOL"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {}:\n{text}", args.join(" "));
    text
}

#[test]
fn the_rules_are_valid() {
    let out = promtool(&["check", "rules", "nova-drain.rules.yaml"]);
    assert!(out.contains("SUCCESS: 6 rules found"), "{out}");
}

#[test]
fn the_rules_fire_as_their_unit_tests_expect() {
    let out = promtool(&["test", "rules", "tests.yaml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}
