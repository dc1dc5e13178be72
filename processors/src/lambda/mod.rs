//! The processors as AWS Lambda functions: thin shells around the same
//! functions the local loop and the local API use.
//!
//! - `env`: the functions' configuration, read from environment variables
//!   once at start.
//! - `aggregate`: the Kinesis event handler around
//!   [`crate::run::process_batch`], reporting per-record failures.
//! - `emf`: the aggregate function's per-invocation metrics, as one
//!   CloudWatch Embedded Metric Format line.
//! - `query`: the query API router served through `lambda_http`.
//! - `lazy`: the DynamoDB store built on first use, for short cold starts.
//! - `replay`: the SQS handler that puts messages the IoT rule could not
//!   deliver back into the stream.
//!
//! The binaries in `src/bin/` only read the environment, build clients and
//! call [`aggregate::run`], [`query::run`] or [`replay::run`].
//!
//! **Architecture Invariant:** nothing survives between invocations but
//! clients and configuration; a batch is reported successful only once its
//! effect is durable in the store.

pub mod aggregate;
pub mod emf;
pub mod env;
pub mod lazy;
pub mod query;
pub mod replay;
