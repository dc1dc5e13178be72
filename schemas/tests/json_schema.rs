//! The JSON Schema files and the Rust decoder must agree on every fixture.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;

use serde_json::Value;

fn fixtures(dir: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("json/fixtures")
        .join(dir);
    let mut out: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no fixtures in {}", dir.display());
    out
}

fn validator(file: &str) -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("json")
        .join(file);
    let schema: Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
    jsonschema::validator_for(&schema).unwrap()
}

#[test]
fn payload_schema_and_decoder_agree() {
    let v = validator("payload-v1.schema.json");
    for (name, bytes) in fixtures("valid") {
        let json: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(v.is_valid(&json), "schema refuses {name}");
        schemas::decode_payload(&bytes).unwrap_or_else(|e| panic!("decoder refuses {name}: {e}"));
    }
    for (name, bytes) in fixtures("invalid") {
        let json: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(!v.is_valid(&json), "schema accepts {name}");
        assert!(
            schemas::decode_payload(&bytes).is_err(),
            "decoder accepts {name}"
        );
    }
}

#[test]
fn rule_record_schema_and_decoder_agree() {
    let v = validator("rule-record-v1.schema.json");
    for (name, bytes) in fixtures("rule-valid") {
        let json: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(v.is_valid(&json), "schema refuses {name}");
        schemas::decode_rule_json(&bytes).unwrap_or_else(|e| panic!("decoder refuses {name}: {e}"));
    }
    for (name, bytes) in fixtures("rule-invalid") {
        let json: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(!v.is_valid(&json), "schema accepts {name}");
        assert!(
            schemas::decode_rule_json(&bytes).is_err(),
            "decoder accepts {name}"
        );
    }
}
