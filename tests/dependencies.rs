//! What the crate graph must not contain (ARCHITECTURE.md): cargo is asked
//! which crates a crate links, so a change that reaches too far fails here,
//! not in review.

#![allow(clippy::expect_used)]

use std::process::Command;

/// Crates whose presence would mean the core can do I/O or read the time.
const FORBIDDEN_IN_THE_CORE: &[&str] = &[
    "tokio",
    "mio",
    "socket2",
    "hyper",
    "axum",
    "reqwest",
    "rusqlite",
    "libsqlite3-sys",
    "aws-config",
    "aws-smithy-runtime",
    "chrono",
    "rumqttc",
    "async-trait",
    "futures",
];

/// The crates `cargo tree` lists over normal edges for `args`, one per
/// line, with the whole output for a failure message.
fn normal_tree(args: &[&str]) -> (Vec<String>, String) {
    let out = Command::new(env!("CARGO"))
        .args(["tree", "--offline", "--locked", "-e", "normal"])
        .args(args)
        .args(["--prefix", "none", "--format", "{p}"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout).into_owned();
    let crates = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    (crates, tree)
}

#[test]
fn the_core_links_nothing_that_does_io() {
    let (crates, tree) = normal_tree(&["-p", "rollup"]);
    assert!(
        crates.iter().any(|c| c == "schemas"),
        "unexpected tree: {tree}"
    );
    let found: Vec<&String> = crates
        .iter()
        .filter(|c| FORBIDDEN_IN_THE_CORE.contains(&c.as_str()) || c.starts_with("aws-"))
        .collect();
    assert!(found.is_empty(), "the core links {found:?}:\n{tree}");
}

/// Crates that may link the test kit as a normal dependency: development
/// tools that are never shipped (`publish = false`), built on its launchers.
const DEV_TOOLS: &[&str] = &["bench"];

/// The test kit ships launchers and fault wrappers: no library or binary
/// that ships may link it, only tests and the development tools.
#[test]
fn no_crate_links_the_test_kit_outside_its_tests() {
    let (crates, tree) = normal_tree(&["--workspace", "-i", "testkit"]);
    assert!(
        crates.iter().any(|c| c == "testkit"),
        "unexpected tree: {tree}"
    );
    let dependents: Vec<&String> = crates
        .iter()
        .filter(|c| *c != "testkit" && !DEV_TOOLS.contains(&c.as_str()))
        .collect();
    assert!(
        dependents.is_empty(),
        "{dependents:?} link the test kit as a normal dependency:\n{tree}"
    );
}
