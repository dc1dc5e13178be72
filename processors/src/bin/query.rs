//! The `query` Lambda function: the query API behind API Gateway.
//! Configuration: see `processors::lambda::env`.

use std::sync::Arc;

use aws::AwsConfig;
use processors::api::ApiState;
use processors::lambda::env::{self, FromEnv, FunctionConfig};
use processors::lambda::lazy::LazyDynamoStore;
use processors::lambda::query;

// One request at a time per process: a single-threaded runtime starts
// faster and loses nothing.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_http::Error> {
    lambda_http::tracing::init_default_subscriber();
    let config = FunctionConfig::from_env()?;
    let stale_after = env::stale_after_from_vars(|name| std::env::var(name).ok())?;
    let store = LazyDynamoStore::reading(
        AwsConfig::default(),
        config.table_name,
        config.aggregate.clone(),
    );
    let mut state = ApiState::new(Arc::new(store), Arc::new(config.aggregate));
    state.stale_after = Arc::new(stale_after);
    query::run(state).await
}
