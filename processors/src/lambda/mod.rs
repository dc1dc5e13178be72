//! The processors as AWS Lambda functions: thin shells around the same
//! functions the local loop and the local API use.
//!
//! - `env`: the functions' configuration, read from environment variables
//!   once at start.
//! - `aggregate`: the Kinesis event handler around
//!   [`crate::run::process_batch`], reporting per-record failures.
//! - `alerts`: the scheduled handler that evaluates the alert rules against
//!   the table and publishes each alert to an SNS topic.
//! - `emf`: the aggregate function's per-invocation metrics, as one
//!   CloudWatch Embedded Metric Format line.
//! - `query`: the query API router served through `lambda_http`.
//! - `lazy`: the DynamoDB store built on first use, for short cold starts.
//! - `replay`: the SQS handler that puts messages the IoT rule could not
//!   deliver back into the stream.
//!
//! The binaries in `src/bin/` only read the environment, build clients and
//! call [`serve`] with a [`Handler`], or [`query::run`].
//!
//! **Architecture Invariant:** nothing survives between invocations but
//! clients and configuration; a batch is reported successful only once its
//! effect is durable in the store.

pub mod aggregate;
pub mod alerts;
pub mod emf;
pub mod env;
pub mod lazy;
pub mod query;
pub mod replay;

use std::future::Future;
use std::sync::Arc;

use lambda_runtime::streaming::Body;
use lambda_runtime::{FunctionResponse, LambdaEvent, service_fn};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A function's handler: one event in, one response out. Failures are part
/// of the response (`batchItemFailures`), never an error of the invocation,
/// so that Lambda retries exactly what failed.
pub trait Handler: 'static {
    type Event: DeserializeOwned;
    type Response: Serialize;

    fn handle(&self, event: Self::Event) -> impl Future<Output = Self::Response>;
}

/// Runs a function: serves its events until the runtime stops.
pub async fn serve<H: Handler>(handler: H) -> Result<(), lambda_runtime::Error> {
    let handler = Arc::new(handler);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<H::Event>| {
        let handler = handler.clone();
        async move {
            let response = handler.handle(event.payload).await;
            // What a plain serializable return value becomes in the runtime;
            // spelled out because a generic response type leaves it ambiguous.
            Ok::<_, lambda_runtime::Error>(FunctionResponse::<_, Body>::BufferedResponse(response))
        }
    }))
    .await
}
