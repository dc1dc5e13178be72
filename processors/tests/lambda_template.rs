//! The SAM template in `deploy/` against the code it deploys: cfn-lint finds
//! nothing, and the settings exactly-once depends on are in place.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;

fn template_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/template.yaml")
}

fn template() -> String {
    std::fs::read_to_string(template_path()).unwrap()
}

#[test]
fn cfn_lint_reports_nothing() {
    let out = match Command::new("cfn-lint").arg(template_path()).output() {
        Ok(out) => out,
        Err(e) => panic!("cfn-lint could not run ({e}); pip install cfn-lint"),
    };
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.trim().is_empty(),
        "cfn-lint: {report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_event_source_mapping_keeps_exactly_once() {
    let t = template();
    for setting in [
        // Applied marks assume a shard's batches arrive in order.
        "ParallelizationFactor: 1",
        // The handler names the first unapplied record instead of failing.
        "- ReportBatchItemFailures",
        "BisectBatchOnFunctionError: true",
        // Lateness is judged against the rule's timestamp, keyed by device.
        "timestamp() AS received_at",
        "PartitionKey: \"${topic(3)}\"",
        "AttributeName: ttl",
    ] {
        assert!(t.contains(setting), "template.yaml lacks `{setting}`");
    }
}

#[test]
fn the_functions_get_every_variable_they_read() {
    let t = template();
    for var in [
        "TABLE_NAME:",
        "RESOLUTIONS:",
        "ALLOWED_LATENESS:",
        "STREAM_RETENTION:",
    ] {
        assert!(t.contains(var), "template.yaml does not set {var}");
    }
    assert_eq!(t.matches("Runtime: provided.al2023").count(), 1);
    assert!(t.contains("- arm64"));
}
