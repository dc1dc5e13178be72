//! The kit is test support only (ARCHITECTURE.md, `testkit`): no crate of
//! the workspace may link it into a library or binary, which would ship
//! launchers and fault wrappers in a release build.

use std::process::Command;

#[test]
fn no_crate_links_the_kit_outside_its_tests() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "--locked",
            "--workspace",
            "-e",
            "normal",
            "-i",
            "testkit",
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
    let dependents: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "testkit")
        .collect();
    assert!(
        tree.lines().any(|l| l.starts_with("testkit ")),
        "unexpected tree: {tree}"
    );
    assert!(
        dependents.is_empty(),
        "{dependents:?} link the test kit as a normal dependency:\n{tree}"
    );
}
