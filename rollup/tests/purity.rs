//! The core's purity is its dependency list (ARCHITECTURE.md, `rollup`):
//! this asks cargo for every crate the core links and refuses any that does
//! I/O, so a change that reaches for a runtime, a clock crate, a socket or a
//! store fails here, not in review.

use std::process::Command;

/// Crates whose presence would mean the core can do I/O or read the time.
const FORBIDDEN: &[&str] = &[
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

#[test]
fn the_core_links_nothing_that_does_io() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "--locked",
            "-p",
            "rollup",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let crates: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(crates.contains(&"schemas"), "unexpected tree: {tree}");
    let found: Vec<&&str> = crates
        .iter()
        .filter(|c| FORBIDDEN.contains(c) || c.starts_with("aws-"))
        .collect();
    assert!(found.is_empty(), "the core links {found:?}:\n{tree}");
}
