//! The `aggregate` Lambda function: Kinesis batches into DynamoDB rollups.
//! Configuration: see `processors::lambda::env`.

use std::sync::Arc;

use aws::AwsConfig;
use processors::lambda::aggregate::AggregateHandler;
use processors::lambda::env::{FromEnv, FunctionConfig};
use processors::lambda::lazy::LazyDynamoStore;
use processors::lambda::serve;

// One invocation at a time per process: a single-threaded runtime starts
// faster and loses nothing.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let config = FunctionConfig::from_env()?;
    let store = LazyDynamoStore::new(
        AwsConfig::default(),
        config.table_name,
        config.aggregate.clone(),
    );
    let handler = AggregateHandler::new(Arc::new(store), config.aggregate).with_emf(config.metrics);
    serve(handler).await
}
