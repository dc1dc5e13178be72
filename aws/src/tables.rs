//! Creating the DynamoDB tables iotpipe uses (the lease table here, the
//! rollup table in `processors`): string keys `pk` and `sk`, on-demand
//! billing, and optionally a TTL attribute.

use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, TableStatus,
    TimeToLiveSpecification,
};

use crate::client::describe;

/// How long a new table may take to become ACTIVE (seconds on AWS, none on
/// a stand-in).
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(120);
const ACTIVE_POLL: Duration = Duration::from_millis(500);

/// Creates table `name` unless it exists, waits until it is ACTIVE, and
/// enables TTL on `ttl_attribute` when given. Safe to call concurrently and
/// repeatedly.
pub async fn ensure_table(
    client: &Client,
    name: &str,
    ttl_attribute: Option<&str>,
) -> Result<(), String> {
    let created = client
        .create_table()
        .table_name(name)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attribute("pk")?)
        .attribute_definitions(attribute("sk")?)
        .key_schema(key("pk", KeyType::Hash)?)
        .key_schema(key("sk", KeyType::Range)?)
        .send()
        .await;
    if let Err(e) = created {
        let exists = e
            .as_service_error()
            .is_some_and(|s| s.is_resource_in_use_exception());
        if !exists {
            return Err(format!("creating table {name}: {}", describe(&e)));
        }
    }
    wait_active(client, name).await?;
    if let Some(attr) = ttl_attribute {
        let spec = TimeToLiveSpecification::builder()
            .enabled(true)
            .attribute_name(attr)
            .build()
            .map_err(|e| e.to_string())?;
        let enabled = client
            .update_time_to_live()
            .table_name(name)
            .time_to_live_specification(spec)
            .send()
            .await;
        if let Err(e) = enabled {
            // Enabling it twice is refused with a ValidationException that
            // says so; anything else is a real failure.
            let already = describe(&e).contains("already enabled");
            if !already {
                return Err(format!("enabling TTL on {name}: {}", describe(&e)));
            }
        }
    }
    Ok(())
}

async fn wait_active(client: &Client, name: &str) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + ACTIVE_TIMEOUT;
    loop {
        let out = client
            .describe_table()
            .table_name(name)
            .send()
            .await
            .map_err(|e| format!("describing table {name}: {}", describe(&e)))?;
        let status = out.table().and_then(|t| t.table_status());
        if status == Some(&TableStatus::Active) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "table {name} is still {status:?} after {ACTIVE_TIMEOUT:?}"
            ));
        }
        tokio::time::sleep(ACTIVE_POLL).await;
    }
}

fn attribute(name: &str) -> Result<AttributeDefinition, String> {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(ScalarAttributeType::S)
        .build()
        .map_err(|e| e.to_string())
}

fn key(name: &str, kind: KeyType) -> Result<KeySchemaElement, String> {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kind)
        .build()
        .map_err(|e| e.to_string())
}
