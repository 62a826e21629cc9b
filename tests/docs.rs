//! The documentation a new operator reads points at real things: every file
//! or directory of this repository it names exists (a renamed file leaves
//! no stale pointer, as `src/daemon.rs` once did), and the README tells how
//! to run against a real cloud before it tells how to build the lab.

use std::path::Path;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const DOCS: &[&str] = &["README.md", "deploy/README.md", "BENCHMARKS.md", "config.example.yaml"];
/// Where the lab writes its state (`tests/lab/.gitignore`): named by the docs, made by `up.sh`.
const GENERATED: &[&str] = &["tests/lab/run/"];

/// Every `src/...`, `tests/...` and `deploy/...` path in `text` (globs left out).
fn repository_paths(text: &str) -> Vec<String> {
    let mut paths = Vec::new();
    for (at, _) in text.char_indices() {
        let rest = &text[at..];
        if !["src/", "tests/", "deploy/"].iter().any(|top| rest.starts_with(top)) {
            continue;
        }
        // A path of ours starts a word: not `https://example.org/src/...`, not `target/src/`.
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || "/._-".contains(c)) {
            continue;
        }
        let path: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || "_./-*{}".contains(*c))
            .collect();
        let path = path.trim_end_matches(['.', ',']);
        if !path.contains(['*', '{']) {
            paths.push(path.to_string());
        }
    }
    paths
}

#[test]
fn every_file_the_docs_name_exists() {
    let mut stale = Vec::new();
    let mut checked = 0;
    for doc in DOCS {
        let text = std::fs::read_to_string(Path::new(ROOT).join(doc)).unwrap_or_else(|e| panic!("{doc}: {e}"));
        for path in repository_paths(&text) {
            checked += 1;
            let generated = GENERATED.iter().any(|dir| path.starts_with(dir));
            if !generated && !Path::new(ROOT).join(&path).exists() {
                stale.push(format!("{doc}: {path}"));
            }
        }
    }
    assert!(checked > 50, "the scan finds the paths ({checked})");
    assert!(stale.is_empty(), "named but not in the repository: {stale:#?}");
}

#[test]
fn the_readme_tells_how_to_use_a_real_cloud_before_the_lab() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).expect("README.md");
    let heading = |title: &str| {
        readme
            .lines()
            .position(|line| line.starts_with("## ") && line.contains(title))
            .unwrap_or_else(|| panic!("no section {title:?}"))
    };
    assert!(heading("Using it against a real cloud") < heading("The lab"));
    assert!(
        readme.contains("### Everything it changes in Nova"),
        "one list of the drainer's writes in Nova"
    );
}
