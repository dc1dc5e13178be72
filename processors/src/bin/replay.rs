//! The `replay` Lambda function: messages the IoT rule could not put into
//! Kinesis, from its error queue back into the stream.
//! Configuration: see `processors::lambda::replay::ReplayConfig`.

use std::sync::Arc;

use aws::AwsConfig;
use processors::lambda::env::FromEnv;
use processors::lambda::replay::{ReplayConfig, ReplayHandler};
use processors::lambda::serve;
use stream::kinesis::KinesisStream;

/// The function only puts records and never reads the stream, so the lease
/// table its stream handle could keep checkpoints in is never touched.
const NO_LEASE_TABLE: &str = "iotpipe-replay-reads-nothing";

// One invocation at a time per process: a single-threaded runtime starts
// faster and loses nothing.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let config = ReplayConfig::from_env()?;
    let stream =
        KinesisStream::connect(&AwsConfig::default(), &config.stream_name, NO_LEASE_TABLE).await;
    serve(ReplayHandler::new(Arc::new(stream), config.metrics)).await
}
