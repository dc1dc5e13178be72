//! The `alerts` Lambda function: every minute (an EventBridge schedule), the
//! alert rules against the DynamoDB table, each alert to an SNS topic.
//! Configuration: see `processors::lambda::alerts`.

use std::sync::Arc;

use aws::AwsConfig;
use processors::lambda::alerts::{AlertsFunctionConfig, AlertsHandler, SnsTopic};
use processors::lambda::env::FromEnv;
use processors::lambda::lazy::LazyDynamoStore;
use processors::lambda::serve;

/// Now, ms since the epoch: stamps `fired_at` and `delivered_at`.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let config = AlertsFunctionConfig::from_env()?;
    let aws = AwsConfig::default();
    let sns = aws_sdk_sns::Client::new(&aws.load().await);
    let topic = SnsTopic::new(sns, config.topic_arn.clone());
    let store = LazyDynamoStore::new(
        aws,
        config.function.table_name.clone(),
        config.function.aggregate.clone(),
    );
    let handler = AlertsHandler::new(Arc::new(store), config, Arc::new(topic), Arc::new(now_ms));
    serve(handler).await
}
