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

/// Every fixture in `valid` passes both `schema` and `decode`; every one in
/// `invalid` fails both.
fn schema_and_decoder_agree<T, E: std::fmt::Display>(
    schema: &str,
    (valid, invalid): (&str, &str),
    decode: impl Fn(&[u8]) -> Result<T, E>,
) {
    let v = validator(schema);
    for (name, bytes) in fixtures(valid) {
        let json: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(v.is_valid(&json), "schema refuses {name}");
        if let Err(e) = decode(&bytes) {
            panic!("decoder refuses {name}: {e}");
        }
    }
    for (name, bytes) in fixtures(invalid) {
        let json: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(!v.is_valid(&json), "schema accepts {name}");
        assert!(decode(&bytes).is_err(), "decoder accepts {name}");
    }
}

#[test]
fn payload_schema_and_decoder_agree() {
    schema_and_decoder_agree(
        "payload-v1.schema.json",
        ("valid", "invalid"),
        schemas::decode_payload,
    );
}

#[test]
fn rule_record_schema_and_decoder_agree() {
    schema_and_decoder_agree(
        "rule-record-v1.schema.json",
        ("rule-valid", "rule-invalid"),
        schemas::decode_rule_json,
    );
}
