//! The command line as an operator types it, run as the real binary: bad
//! input is one line on standard error and exit 2, before any request (no
//! cloud is needed: every case here fails before Keystone is asked), and the
//! binary works as the kubectl plugin `kubectl drainer` through the real
//! `kubectl` (installed by `tests/lab/up.sh`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const DRAINER: &str = env!("CARGO_BIN_EXE_drainer");

/// A directory of its own for one test, with no config.yaml and no clouds.yaml.
fn scratch(case: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("drainer-cli-{}-{case}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("home")).expect("scratch dir");
    dir
}

/// `program args` in `dir`, with nothing of this machine's environment but
/// PATH (`path_first` before it) and a HOME inside `dir`.
fn run(program: &str, args: &[&str], dir: &Path, env: &[(&str, &str)], path_first: Option<&Path>) -> Output {
    let path = std::env::var("PATH").unwrap_or_default();
    let path = match path_first {
        Some(first) => format!("{}:{path}", first.display()),
        None => path,
    };
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", path)
        .env("HOME", dir.join("home"))
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Exit 2 with exactly one line on standard error; that line.
fn usage_error(output: &Output, case: &str) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{case}: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{case}: one line: {stderr}");
    assert!(output.stdout.is_empty(), "{case}: nothing on stdout");
    stderr.trim().to_string()
}

#[test]
fn a_node_given_twice_differently_is_refused_on_one_line() {
    let dir = scratch("two-nodes");
    for args in [["host1", "--node", "host2"], ["host1", "-node", "host2"]] {
        let line = usage_error(&run(DRAINER, &args, &dir, &[], None), &format!("{args:?}"));
        assert!(
            line.contains("two nodes given: host1 (argument) and host2 (--node)"),
            "{line}"
        );
    }
    // The node typed wins over the DaemonSet's NODE_NAME: the run goes on to
    // the configuration (none here), which is what stops it.
    let line = usage_error(
        &run(DRAINER, &["host1"], &dir, &[("NODE_NAME", "host2")], None),
        "NODE_NAME",
    );
    assert!(line.contains("missing auth_url"), "{line}");
    let line = usage_error(&run(DRAINER, &["-frobnicate"], &dir, &[], None), "unknown flag");
    assert!(line.contains("'--frobnicate'"), "{line}");
}

#[test]
fn a_cloud_not_found_says_where_clouds_yaml_was_looked_for() {
    let dir = scratch("nope");
    let home = dir.join("home");
    for (args, env, named) in [
        (vec!["host1", "--dry-run"], vec![("OS_CLOUD", "nope")], "OS_CLOUD nope"),
        (
            vec!["--os-cloud", "nope", "host1", "--dry-run"],
            vec![],
            "--os-cloud nope",
        ),
        (
            vec!["-os-cloud", "nope", "-node", "host1"],
            vec![("OS_CLOUD", "lab")],
            "--os-cloud nope",
        ),
    ] {
        let line = usage_error(&run(DRAINER, &args, &dir, &env, None), named);
        let expected = format!(
            "{named}: no clouds.yaml found; looked, in openstacksdk's order, at clouds.yaml, clouds.yml, \
             clouds.json in {}, {}/.config/openstack, /etc/xdg/openstack, /etc/openstack",
            dir.display(),
            home.display()
        );
        assert!(line.ends_with(&expected), "{line}\nexpected it to end with\n{expected}");
    }
    let line = usage_error(
        &run(
            DRAINER,
            &["--os-cloud", "nope", "host1"],
            &dir,
            &[("OS_CLIENT_CONFIG_FILE", "/nonexistent/clouds.yaml")],
            None,
        ),
        "OS_CLIENT_CONFIG_FILE",
    );
    assert!(
        line.contains("at OS_CLIENT_CONFIG_FILE /nonexistent/clouds.yaml (absent), then clouds.yaml"),
        "{line}"
    );
}

/// `kubectl drainer ...` runs `kubectl-drainer ...` from the PATH (krew's
/// convention): a symlink to the binary is the whole installation.
#[test]
fn works_as_the_kubectl_plugin_kubectl_drainer() {
    let dir = scratch("plugin");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    std::os::unix::fs::symlink(DRAINER, bin.join("kubectl-drainer")).expect("symlink");

    // Run directly under the plugin's name, usage speaks of `kubectl drainer`.
    let plugin = bin.join("kubectl-drainer").display().to_string();
    let help = run(&plugin, &["--help"], &dir, &[], None);
    assert_eq!(help.status.code(), Some(0));
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("Usage: kubectl drainer [OPTIONS] [NODE]"), "{help}");

    let kubectl_found = run("sh", &["-c", "command -v kubectl"], &dir, &[], None)
        .status
        .success();
    if !kubectl_found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "kubectl is needed (tests/lab/up.sh installs it)"
        );
        eprintln!("kubectl not found: skipping the run through kubectl");
        return;
    }
    let listed = run("kubectl", &["plugin", "list"], &dir, &[], Some(&bin));
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains("kubectl-drainer"), "kubectl finds the plugin: {listed}");
    let through = run("kubectl", &["drainer", "--help"], &dir, &[], Some(&bin));
    assert_eq!(through.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&through.stdout).contains("Usage: kubectl drainer"));
    // kubectl hands the plugin the arguments and returns its exit code and stderr unchanged.
    let line = usage_error(
        &run(
            "kubectl",
            &["drainer", "host1", "--node", "host2"],
            &dir,
            &[],
            Some(&bin),
        ),
        "through kubectl",
    );
    assert!(line.contains("two nodes given"), "{line}");
    let line = usage_error(
        &run(
            "kubectl",
            &["drainer", "--os-cloud", "nope", "host1"],
            &dir,
            &[],
            Some(&bin),
        ),
        "through kubectl",
    );
    assert!(line.contains("--os-cloud nope: no clouds.yaml found"), "{line}");
}
