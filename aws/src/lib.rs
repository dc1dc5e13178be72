//! What iotpipe's AWS adapters share: the Kinesis stream and its lease table
//! (`stream::kinesis`), the DynamoDB rollup store
//! (`processors::store::dynamodb`) and the Lambda functions.
//!
//! - [`client`]: SDK configuration ([`AwsConfig`]: AWS or a wire-compatible
//!   stand-in, the HTTPS client on ring) and the classification of SDK
//!   errors as retryable or not.
//! - [`backoff`]: exponential backoff with full jitter.
//! - [`tables`]: creating the DynamoDB tables iotpipe uses (lease and rollup
//!   tables share one key shape).
//! - [`seq`]: Kinesis sequence numbers, decimal strings, as `SeqNo`s.
//!
//! It is its own crate so that no adapter borrows another's internals: the
//! store and the Lambda functions depend on this, not on the stream crate's
//! Kinesis backend.

pub mod backoff;
pub mod client;
pub mod seq;
pub mod tables;

pub use self::client::AwsConfig;
